/*
 * The control socket (see ctlsock.h): a UNIX stream listener on the daemon's
 * libev loop, one request and one answer per connection, and the blocking
 * client the command-line tools use.
 *
 * A connection goes through three states. READING: bytes are gathered until
 * the first newline, within CTL_TIMEOUT_S of the accept and CTL_MAX_REQUEST
 * bytes. WAITING: the handler has the request; the read watcher stays on so
 * that a client that goes away is noticed at once (its connection is closed
 * and the request orphaned: the later ctl_reply() only frees it). WRITING: the
 * answer line goes out through a write watcher, again within CTL_TIMEOUT_S,
 * then the connection is closed.
 *
 * End of file from the client before the answer means "gone": it aborts the
 * request. So a client must keep its side open until it has read the answer
 * (ctl_call() never calls shutdown(SHUT_WR)). A UNIX socket cannot tell a
 * half-close from a close, and noticing Ctrl-C on a waiting CLI matters more
 * than supporting half-closing clients.
 */
#include "ctlsock.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "log.h"
#include "utf8.h"

#define COMPONENT      "ctl"
#define ACCEPT_PAUSE_S 1.0                /* after EMFILE and the like */
#define READ_CHUNK     4096               /* first buffer; grows up to CTL_MAX_REQUEST */
#define MAX_ANSWER     (64 * 1024 * 1024) /* what ctl_call() accepts */
#define SUN_PATH_MAX   (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

enum conn_state { ST_READING, ST_WAITING, ST_WRITING };

struct ctl_conn {
    struct ctl_server *s;
    struct ctl_conn *prev, *next;
    int fd;
    long pid; /* of the peer, for the log; -1 when unknown */
    enum conn_state state;
    ev_io io; /* EV_READ while READING or WAITING, EV_WRITE while WRITING */
    ev_timer timer;
    char *buf; /* READING: the request so far; WRITING: the answer line */
    size_t len, cap, off;
    struct ctl_req *req; /* WAITING: the request the handler holds */
};

struct ctl_req {
    struct ctl_conn *c; /* NULL once orphaned */
};

struct ctl_server {
    struct ev_loop *loop;
    int fd;
    char path[SUN_PATH_MAX + 1];
    dev_t dev; /* of the socket file we made, so that stop removes only ours */
    ino_t ino;
    ctl_handler handler;
    void *ud;
    ev_io accept_w;
    ev_timer pause;
    struct ctl_conn *conns;
    unsigned nconns;
};

/* ---- Helpers ---------------------------------------------------------------------------- */

/* Makes s one line of valid UTF-8 (it becomes a JSON string). */
static void one_line(char *s)
{
    size_t len = strlen(s), i = 0;
    while (i < len) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7f) {
            s[i++] = ' ';
            continue;
        }
        size_t n = utf8_sequence_len((const uint8_t *)s + i, len - i);
        if (n == 0) {
            s[i++] = '?';
            continue;
        }
        i += n;
    }
}

static json_t *error_answer(const char *msg)
{
    char *copy = strdup(msg);
    if (!copy)
        return NULL;
    one_line(copy);
    json_t *j = json_pack("{s:b,s:s}", "ok", 0, "error", copy);
    free(copy);
    return j;
}

/* ---- Server: connections ------------------------------------------------------------------ */

static void conn_close(struct ctl_conn *c)
{
    struct ctl_server *s = c->s;
    ev_io_stop(s->loop, &c->io);
    ev_timer_stop(s->loop, &c->timer);
    close(c->fd);
    if (c->req)
        c->req->c = NULL;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->buf);
    free(c);
    /* A slot is free again: resume accepting unless paused after an accept error. */
    if (s->nconns-- == CTL_MAX_CLIENTS && !ev_is_active(&s->pause))
        ev_io_start(s->loop, &s->accept_w);
}

static void on_write(struct ctl_conn *c)
{
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            log_debug(COMPONENT, "%s: writing to pid %ld: %s", c->s->path, c->pid, strerror(errno));
            break;
        }
        c->off += (size_t)n;
    }
    conn_close(c);
}

/*
 * Sends `answer` (reference taken; NULL means out of memory): at once as far
 * as the socket takes it, the rest from the write watcher. May close and free
 * c, so callers must not touch c afterwards (a handler answering at once runs
 * inside on_read(), which is why conn_request() does nothing after it).
 */
static void conn_answer(struct ctl_conn *c, json_t *answer)
{
    struct ctl_server *s = c->s;
    char *line = answer ? json_dumps(answer, JSON_COMPACT) : NULL;
    json_decref(answer);
    if (!line) {
        /* json_dumps() fails only for lack of memory: try a fixed line. */
        line = strdup("{\"ok\":false,\"error\":\"out of memory\"}");
        if (!line) {
            log_error(COMPONENT, "%s: out of memory answering a request", s->path);
            conn_close(c);
            return;
        }
    }
    size_t n = strlen(line);
    char *buf = realloc(line, n + 2);
    if (!buf) {
        free(line);
        log_error(COMPONENT, "%s: out of memory answering a request", s->path);
        conn_close(c);
        return;
    }
    buf[n] = '\n';
    buf[n + 1] = '\0';
    free(c->buf);
    c->buf = buf;
    c->len = n + 1;
    c->off = 0;
    c->cap = n + 2;
    c->state = ST_WRITING;
    ev_io_stop(s->loop, &c->io);
    ev_io_set(&c->io, c->fd, EV_WRITE);
    ev_io_start(s->loop, &c->io);
    /* The client has CTL_TIMEOUT_S to read the answer too. */
    ev_timer_stop(s->loop, &c->timer);
    ev_timer_set(&c->timer, CTL_TIMEOUT_S, 0.);
    ev_timer_start(s->loop, &c->timer);
    on_write(c);
}

/* Answers a malformed request ourselves (and logs it). */
static void conn_refuse(struct ctl_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void conn_refuse(struct ctl_conn *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    log_warn(COMPONENT, "%s: refused a request from pid %ld: %s", c->s->path, c->pid, msg);
    conn_answer(c, error_answer(msg));
}

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct ctl_conn *c = w->data;
    if (c->state == ST_READING) {
        log_info(COMPONENT, "%s: no complete request from pid %ld within %.0f s", c->s->path,
                 c->pid, CTL_TIMEOUT_S);
        char msg[96];
        snprintf(msg, sizeof(msg), "no complete request within %.0f s", CTL_TIMEOUT_S);
        conn_answer(c, error_answer(msg));
        return;
    }
    log_info(COMPONENT, "%s: pid %ld did not read its answer within %.0f s", c->s->path, c->pid,
             CTL_TIMEOUT_S);
    conn_close(c);
}

/* A complete line is in c->buf[0..len): parse it and hand it over. */
static void conn_request(struct ctl_conn *c, size_t len)
{
    struct ctl_server *s = c->s;
    json_error_t jerr;
    json_t *req = json_loadb(c->buf, len, JSON_REJECT_DUPLICATES, &jerr);
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    if (!req) {
        conn_refuse(c, "malformed request: %s", jerr.text);
        return;
    }
    if (!json_is_object(req)) {
        json_decref(req);
        conn_refuse(c, "malformed request: not a JSON object");
        return;
    }
    json_t *cmd = json_object_get(req, "cmd");
    if (!json_is_string(cmd)) {
        json_decref(req);
        conn_refuse(c, "malformed request: no \"cmd\" string");
        return;
    }
    struct ctl_req *r = malloc(sizeof(*r));
    if (!r) {
        json_decref(req);
        log_error(COMPONENT, "%s: out of memory for a request", s->path);
        conn_answer(c, error_answer("out of memory"));
        return;
    }
    r->c = c;
    c->req = r;
    c->state = ST_WAITING;
    ev_timer_stop(s->loop, &c->timer); /* the handler may take its time */
    log_debug(COMPONENT, "%s: request \"%s\" from pid %ld", s->path, json_string_value(cmd),
              c->pid);
    /*
     * Last use of c and s: the handler may answer at once (which may close
     * and free c) and may even stop the server, freeing both.
     */
    ctl_handler handler = s->handler;
    void *ud = s->ud;
    handler(r, req, ud);
    json_decref(req);
}

static void on_read(struct ctl_conn *c)
{
    struct ctl_server *s = c->s;
    if (c->state == ST_WAITING) {
        /* Only to notice the client leaving; one request per connection, the rest is dropped. */
        char junk[512];
        ssize_t n = recv(c->fd, junk, sizeof(junk), 0);
        if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)))
            return;
        log_debug(COMPONENT, "%s: pid %ld left before its answer", s->path, c->pid);
        conn_close(c); /* orphans c->req */
        return;
    }
    if (c->len == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : READ_CHUNK;
        if (cap > CTL_MAX_REQUEST)
            cap = CTL_MAX_REQUEST;
        char *buf = realloc(c->buf, cap);
        if (!buf) {
            log_error(COMPONENT, "%s: out of memory reading a request", s->path);
            conn_close(c);
            return;
        }
        c->buf = buf;
        c->cap = cap;
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        log_debug(COMPONENT, "%s: reading from pid %ld: %s", s->path, c->pid, strerror(errno));
        conn_close(c);
        return;
    }
    if (n == 0) {
        log_debug(COMPONENT, "%s: pid %ld left before finishing its request", s->path, c->pid);
        conn_close(c);
        return;
    }
    char *nl = memchr(c->buf + c->len, '\n', (size_t)n);
    c->len += (size_t)n;
    if (nl) {
        conn_request(c, (size_t)(nl - c->buf));
        return;
    }
    if (c->len == CTL_MAX_REQUEST)
        conn_refuse(c, "request too long (more than %d bytes)", CTL_MAX_REQUEST);
}

static void on_conn_io(struct ev_loop *loop, ev_io *w, int revents)
{
    struct ctl_conn *c = w->data;
    if (c->state == ST_WRITING)
        on_write(c);
    else
        on_read(c);
}

/* ---- Server: listening -------------------------------------------------------------------- */

static void accept_one(struct ctl_server *s, int fd)
{
    struct ctl_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        log_error(COMPONENT, "%s: out of memory accepting a connection", s->path);
        close(fd);
        return;
    }
    c->s = s;
    c->fd = fd;
    c->pid = -1;
    struct ucred cred;
    socklen_t cl = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0)
        c->pid = (long)cred.pid;
    c->state = ST_READING;
    ev_io_init(&c->io, on_conn_io, fd, EV_READ);
    c->io.data = c;
    ev_timer_init(&c->timer, on_timeout, CTL_TIMEOUT_S, 0.);
    c->timer.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    if (++s->nconns == CTL_MAX_CLIENTS) {
        /* The others wait in the backlog until a connection ends. */
        log_debug(COMPONENT, "%s: %d connections, not accepting more for now", s->path,
                  CTL_MAX_CLIENTS);
        ev_io_stop(s->loop, &s->accept_w);
    }
    ev_io_start(s->loop, &c->io);
    ev_timer_start(s->loop, &c->timer);
}

static void on_accept_pause(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct ctl_server *s = w->data;
    if (s->nconns < CTL_MAX_CLIENTS)
        ev_io_start(loop, &s->accept_w);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    struct ctl_server *s = w->data;
    while (s->nconns < CTL_MAX_CLIENTS) {
        int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            accept_one(s, fd);
            continue;
        }
        switch (errno) {
        case EINTR:
        case ECONNABORTED:
        case EPROTO:
            continue;
        case EAGAIN:
#if EAGAIN != EWOULDBLOCK
        case EWOULDBLOCK:
#endif
            return;
        case EMFILE:
        case ENFILE:
        case ENOBUFS:
        case ENOMEM:
            /* The connection stays in the backlog and would wake us at once: pause instead. */
            log_warn(COMPONENT, "%s: cannot accept: %s; pausing for %.1f s", s->path,
                     strerror(errno), ACCEPT_PAUSE_S);
            ev_io_stop(loop, &s->accept_w);
            ev_timer_stop(loop, &s->pause);
            ev_timer_set(&s->pause, ACCEPT_PAUSE_S, 0.);
            ev_timer_start(loop, &s->pause);
            return;
        default:
            log_warn(COMPONENT, "%s: accept failed: %s", s->path, strerror(errno));
            return;
        }
    }
}

/*
 * Makes room for our socket at `path`: nothing there, or a socket nobody
 * accepts on (left by a daemon that died), which is removed. Anything else is
 * refused and left alone.
 */
static int clear_path(const char *path, const struct sockaddr_un *sa, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT)
            return 0;
        snprintf(err, errlen, "cannot use control socket %s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(err, errlen, "%s exists and is not a socket; not replacing it", path);
        return -1;
    }
    /* Non-blocking, so that a live server with a full backlog answers EAGAIN, not a hang. */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
        return -1;
    }
    int r;
    do
        r = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
    while (r < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (r == 0 || e == EAGAIN || e == EINPROGRESS) {
        snprintf(err, errlen, "another process is serving %s", path);
        return -1;
    }
    if (e == ENOENT) /* gone meanwhile */
        return 0;
    if (e != ECONNREFUSED) {
        snprintf(err, errlen, "cannot check existing control socket %s: %s", path, strerror(e));
        return -1;
    }
    log_info(COMPONENT, "removing stale control socket %s", path);
    if (unlink(path) != 0 && errno != ENOENT) {
        snprintf(err, errlen, "cannot remove stale control socket %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int make_addr(const char *path, struct sockaddr_un *sa, char *err, size_t errlen)
{
    size_t len = strlen(path);
    if (len == 0) {
        snprintf(err, errlen, "control socket path is empty");
        return -1;
    }
    if (len > SUN_PATH_MAX) {
        snprintf(err, errlen, "control socket path too long (%zu bytes, at most %zu): %s", len,
                 SUN_PATH_MAX, path);
        return -1;
    }
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, len + 1);
    return 0;
}

struct ctl_server *ctl_server_start(struct ev_loop *loop, const char *path, ctl_handler handler,
                                    void *ud, char *err, size_t errlen)
{
    char dummy[1];
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof(dummy);
    }
    struct sockaddr_un sa;
    if (make_addr(path, &sa, err, errlen) < 0 || clear_path(path, &sa, err, errlen) < 0)
        return NULL;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
        return NULL;
    }
    /*
     * The file must never be reachable with wider permissions, not even
     * between bind() and chmod(). umask is per process: daemons are single-threaded.
     */
    mode_t old = umask(0177);
    int r = bind(fd, (const struct sockaddr *)&sa, sizeof(sa));
    int e = errno;
    umask(old);
    if (r != 0) {
        snprintf(err, errlen, "cannot bind control socket %s: %s", path, strerror(e));
        close(fd);
        return NULL;
    }
    struct stat st;
    if (chmod(path, 0600) != 0 || lstat(path, &st) != 0) {
        snprintf(err, errlen, "cannot set the mode of control socket %s: %s", path,
                 strerror(errno));
        goto fail;
    }
    if (listen(fd, SOMAXCONN) != 0) {
        snprintf(err, errlen, "cannot listen on control socket %s: %s", path, strerror(errno));
        goto fail;
    }
    struct ctl_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    s->loop = loop;
    s->fd = fd;
    memcpy(s->path, sa.sun_path, sizeof(s->path));
    s->dev = st.st_dev;
    s->ino = st.st_ino;
    s->handler = handler;
    s->ud = ud;
    ev_io_init(&s->accept_w, on_accept, fd, EV_READ);
    s->accept_w.data = s;
    ev_timer_init(&s->pause, on_accept_pause, ACCEPT_PAUSE_S, 0.);
    s->pause.data = s;
    ev_io_start(loop, &s->accept_w);
    log_info(COMPONENT, "control socket listening on %s", path);
    return s;
fail:
    close(fd);
    unlink(path);
    return NULL;
}

void ctl_server_stop(struct ctl_server *s)
{
    if (!s)
        return;
    ev_io_stop(s->loop, &s->accept_w);
    ev_timer_stop(s->loop, &s->pause);
    close(s->fd);
    /* Remove the file only if it is still ours (not replaced by someone else meanwhile). */
    struct stat st;
    if (lstat(s->path, &st) == 0 && st.st_dev == s->dev && st.st_ino == s->ino)
        unlink(s->path);
    unsigned dropped = 0;
    while (s->conns) {
        struct ctl_conn *c = s->conns;
        s->conns = c->next;
        ev_io_stop(s->loop, &c->io);
        ev_timer_stop(s->loop, &c->timer);
        close(c->fd);
        if (c->req)
            c->req->c = NULL; /* the handler still holds it; ctl_reply() frees it */
        free(c->buf);
        free(c);
        dropped++;
    }
    log_info(COMPONENT, "control socket %s closed (%u connections dropped)", s->path, dropped);
    free(s);
}

void ctl_reply(struct ctl_req *r, json_t *response)
{
    if (!r) {
        json_decref(response);
        return;
    }
    struct ctl_conn *c = r->c;
    free(r);
    if (!c) {
        json_decref(response); /* the client or the server went away */
        return;
    }
    c->req = NULL;
    if (!json_is_object(response)) {
        log_error(COMPONENT, "%s: a handler answered with %s", c->s->path,
                  response ? "something other than an object" : "nothing");
        json_decref(response);
        response = error_answer("internal error: no valid answer");
    }
    conn_answer(c, response);
}

void ctl_reply_error(struct ctl_req *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = NULL;
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    json_t *answer = n >= 0 ? error_answer(msg) : NULL;
    if (n >= 0)
        free(msg);
    if (!answer)
        answer = error_answer("out of memory");
    ctl_reply(r, answer);
}

/* ---- Client ------------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left before `deadline` (-1: none), for poll(). */
static int left_ms(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - now_ms();
    return left < 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
}

/* Waits for `events` on fd; 1 when ready, 0 on timeout, -1 on error. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, left_ms(deadline));
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -1 : r > 0 ? 1 : 0;
    }
}

/*
 * Connects without blocking past the deadline: a UNIX socket with a full
 * backlog answers EAGAIN to a non-blocking connect() and cannot be polled for
 * completion, so we retry briefly. 0, -2 on timeout, or -1 with errno.
 */
static int connect_until(int fd, const struct sockaddr_un *sa, int64_t deadline)
{
    for (;;) {
        if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -1;
        int left = left_ms(deadline);
        if (left == 0)
            return -2;
        poll(NULL, 0, left < 0 || left > 10 ? 10 : left);
    }
}

int ctl_call(const char *path, json_t *request, int timeout_ms, json_t **response, char *err,
             size_t errlen)
{
    char dummy[1];
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof(dummy);
    }
    *response = NULL;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    struct sockaddr_un sa;
    if (make_addr(path, &sa, err, errlen) < 0)
        return -1;

    char *line = request ? json_dumps(request, JSON_COMPACT) : NULL;
    if (!line) {
        snprintf(err, errlen, "cannot encode the request to %s", path);
        return -1;
    }
    size_t len = strlen(line);
    if (len + 1 > CTL_MAX_REQUEST) {
        snprintf(err, errlen, "request to %s too long (%zu bytes, at most %d)", path, len + 1,
                 CTL_MAX_REQUEST);
        free(line);
        return -1;
    }
    char *tmp = realloc(line, len + 1);
    if (!tmp) {
        free(line);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    line = tmp;
    line[len++] = '\n'; /* no longer a C string */

    char *ans = NULL;
    size_t alen = 0, acap = 0;
    int ret = -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
        goto out;
    }
    int r = connect_until(fd, &sa, deadline);
    if (r == -2) {
        snprintf(err, errlen, "no answer from %s within %d ms", path, timeout_ms);
        goto out;
    }
    if (r < 0) {
        snprintf(err, errlen, "cannot connect to %s: %s (is the daemon running?)", path,
                 strerror(errno));
        goto out;
    }

    /*
     * Send the whole line, and keep our side open afterwards: the server
     * takes end of file as the client giving up (see the top of this file).
     * If sending fails, the server may still have answered (and closed):
     * read what is there.
     */
    int send_errno = 0;
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, line + off, len - off, MSG_NOSIGNAL);
        if (n >= 0) {
            off += (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            send_errno = errno;
            break;
        }
        r = wait_fd(fd, POLLOUT, deadline);
        if (r == 0) {
            snprintf(err, errlen, "no answer from %s within %d ms", path, timeout_ms);
            goto out;
        }
        if (r < 0) {
            snprintf(err, errlen, "cannot send to %s: %s", path, strerror(errno));
            goto out;
        }
    }

    /* Read up to the newline or end of file. */
    char *nl = NULL;
    bool eof = false;
    while (!nl && !eof) {
        if (acap - alen < 4096) {
            if (acap >= MAX_ANSWER) {
                snprintf(err, errlen, "malformed answer from %s (longer than %d bytes)", path,
                         MAX_ANSWER);
                goto out;
            }
            size_t cap = acap ? acap * 2 : 8192;
            char *b = realloc(ans, cap);
            if (!b) {
                snprintf(err, errlen, "out of memory");
                goto out;
            }
            ans = b;
            acap = cap;
        }
        ssize_t n = recv(fd, ans + alen, acap - alen, 0);
        if (n > 0) {
            nl = memchr(ans + alen, '\n', (size_t)n);
            alen += (size_t)n;
            continue;
        }
        if (n == 0) {
            eof = true;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            r = wait_fd(fd, POLLIN, deadline);
            if (r == 0) {
                snprintf(err, errlen, "no answer from %s within %d ms", path, timeout_ms);
                goto out;
            }
            if (r > 0)
                continue;
        }
        if (alen) { /* e.g. ECONNRESET after a complete answer without a newline */
            eof = true;
            continue;
        }
        snprintf(err, errlen, "cannot read from %s: %s", path, strerror(errno));
        goto out;
    }
    if (alen == 0) {
        if (send_errno)
            snprintf(err, errlen, "cannot send to %s: %s", path, strerror(send_errno));
        else
            snprintf(err, errlen, "%s closed the connection without an answer", path);
        goto out;
    }
    json_error_t jerr;
    json_t *j = json_loadb(ans, nl ? (size_t)(nl - ans) : alen, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(j)) {
        json_decref(j);
        snprintf(err, errlen, "malformed answer from %s", path);
        goto out;
    }
    *response = j;
    ret = 0;
out:
    if (fd >= 0)
        close(fd);
    free(line);
    free(ans);
    return ret;
}

char *ctl_default_path(const char *configured, const char *state_dir)
{
    if (configured)
        return strdup(configured);
    char buf[4096];
    if (fs_join(buf, sizeof(buf), state_dir, "control.sock") != 0)
        return NULL;
    return strdup(buf);
}
