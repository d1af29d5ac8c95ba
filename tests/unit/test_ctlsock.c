/*
 * The control socket against ctlsock.h: round trips through the real client
 * (ctl_call() in a forked child, since it blocks, while the parent runs the
 * server's loop), answers given at once and later, the socket file's mode and
 * what may already lie at its path, every malformed request (sent raw from
 * the parent, non-blocking, on the same loop), a request not finished in time
 * (CTL_TIMEOUT_S: that test takes 10 s), the connection limit, clients that
 * leave early, and stopping the server with requests still pending.
 * Assertions run only in the parent; a child reports through a pipe. Each
 * test's teardown checks that no descriptor leaked.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ctlsock.h"
#include "log.h"

#define SAFETY   10.0 /* seconds: no wait may last longer (the timeout test excepted) */
#define LATER_S  0.05 /* how long the "later" command takes */
#define MAX_HELD (CTL_MAX_CLIENTS + 4)

struct env {
    struct ev_loop *loop;
    char dir[64], path[256], log[128];
    struct ctl_server *s;
    int calls;
    char last_cmd[64];
    json_t *last_req;
    struct ctl_req *held[MAX_HELD]; /* "hold": answered by the test itself */
    int nheld;
    struct ctl_req *later; /* "later": answered by a timer */
    ev_timer later_w;
    ev_timer safety;
    bool timed_out;
    bool log_to_file;
    int fds; /* open after setup: the teardown checks none leaked */
};

/* ---- Handler ------------------------------------------------------------------------------ */

static void on_later(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct env *e = w->data;
    struct ctl_req *r = e->later;
    e->later = NULL;
    ctl_reply(r, json_pack("{s:b,s:s}", "ok", 1, "echo", "later"));
}

static void handler(struct ctl_req *r, json_t *req, void *ud)
{
    struct env *e = ud;
    const char *cmd = json_string_value(json_object_get(req, "cmd"));
    e->calls++;
    snprintf(e->last_cmd, sizeof(e->last_cmd), "%s", cmd);
    json_decref(e->last_req);
    e->last_req = json_incref(req);
    if (strcmp(cmd, "later") == 0 && !e->later) {
        e->later = r;
        ev_timer_set(&e->later_w, LATER_S, 0.);
        ev_timer_start(e->loop, &e->later_w);
    } else if (strcmp(cmd, "hold") == 0 && e->nheld < MAX_HELD) {
        e->held[e->nheld++] = r;
    } else if (strcmp(cmd, "fail") == 0) {
        ctl_reply_error(r, "bad %s %d\nsecond line", "thing", 42);
    } else if (strcmp(cmd, "bad") == 0) {
        ctl_reply(r, json_integer(5)); /* not an object */
    } else if (strcmp(cmd, "stop") == 0) {
        ctl_reply(r, json_pack("{s:b}", "ok", 1));
        ctl_server_stop(e->s);
        e->s = NULL;
    } else if (strcmp(cmd, "stopfirst") == 0) {
        ctl_server_stop(e->s);
        e->s = NULL;
        ctl_reply(r, json_pack("{s:b}", "ok", 1));
    } else {
        ctl_reply(r, json_pack("{s:b,s:s}", "ok", 1, "echo", cmd));
    }
}

/* ---- Loop --------------------------------------------------------------------------------- */

static void on_safety(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct env *e = w->data;
    e->timed_out = true;
}

/* Runs the loop until pred(arg) holds; fails after `limit` seconds. */
static void run_until(struct env *e, bool (*pred)(void *), void *arg, double limit)
{
    ev_timer_init(&e->safety, on_safety, limit, 0.);
    e->safety.data = e;
    e->timed_out = false;
    ev_timer_start(e->loop, &e->safety);
    while (!pred(arg) && !e->timed_out)
        ev_run(e->loop, EVRUN_ONCE);
    ev_timer_stop(e->loop, &e->safety);
    assert_false(e->timed_out);
}

/* Runs the loop for `secs` seconds. */
static void run_for(struct env *e, double secs)
{
    ev_timer_init(&e->safety, on_safety, secs, 0.);
    e->safety.data = e;
    e->timed_out = false;
    ev_timer_start(e->loop, &e->safety);
    while (!e->timed_out)
        ev_run(e->loop, EVRUN_ONCE);
}

static bool nheld_is(void *arg)
{
    struct env *e = ((void **)arg)[0];
    int want = *(int *)((void **)arg)[1];
    return e->nheld == want;
}

/* A held request, for answering it (the teardown answers those left). */
static struct ctl_req *take_held(struct env *e, int i)
{
    struct ctl_req *r = e->held[i];
    e->held[i] = NULL;
    return r;
}

static void wait_held(struct env *e, int n)
{
    void *arg[2] = {e, &n};
    run_until(e, nheld_is, arg, SAFETY);
}

static void start_server(struct env *e)
{
    char err[512] = "";
    e->s = ctl_server_start(e->loop, e->path, handler, e, err, sizeof(err));
    if (!e->s)
        print_error("ctl_server_start: %s\n", err);
    assert_non_null(e->s);
}

/* Whether the log has a line with `text` (always true when debugging to stderr). */
static bool log_has(struct env *e, const char *text)
{
    if (!e->log_to_file)
        return true;
    FILE *f = fopen(e->log, "r");
    if (!f)
        return false;
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof(line), f))
        found = strstr(line, text) != NULL;
    fclose(f);
    return found;
}

static void set_addr(struct sockaddr_un *sa, const char *path)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    assert_true(strlen(path) < sizeof(sa->sun_path));
    memcpy(sa->sun_path, path, strlen(path) + 1);
}

/* ---- Client in a child process ------------------------------------------------------------ */

struct call {
    pid_t pid;
    int fd;
    ev_io w;
    char buf[8192];
    size_t len;
    bool done;
    int rc, status;
    char err[512];
    json_t *resp;
};

static void call_child(int fd, const char *path, json_t *req, int timeout_ms)
{
    json_t *resp = NULL;
    char err[512] = "";
    int rc = ctl_call(path, req, timeout_ms, &resp, err, sizeof(err));
    char *text = rc == 0 ? json_dumps(resp, JSON_COMPACT) : NULL;
    dprintf(fd, "%d\n%s", rc, rc == 0 ? (text ? text : "") : err);
    free(text);
    json_decref(resp);
    close(fd);
}

static void on_call_data(struct ev_loop *loop, ev_io *w, int revents)
{
    struct call *c = w->data;
    ssize_t n = read(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n > 0 && c->len + (size_t)n < sizeof(c->buf) - 1) {
        c->len += (size_t)n;
        return;
    }
    ev_io_stop(loop, w);
    close(c->fd);
    c->buf[c->len] = '\0';
    while (waitpid(c->pid, &c->status, 0) < 0 && errno == EINTR)
        ;
    char *nl = strchr(c->buf, '\n');
    c->rc = nl ? atoi(c->buf) : 99;
    if (nl && c->rc == 0)
        c->resp = json_loads(nl + 1, 0, NULL);
    else if (nl)
        snprintf(c->err, sizeof(c->err), "%s", nl + 1);
    c->done = true;
}

static void call_start(struct env *e, struct call *c, const char *path, json_t *req, int timeout_ms)
{
    memset(c, 0, sizeof(*c));
    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    c->pid = fork();
    assert_true(c->pid >= 0);
    if (c->pid == 0) {
        close(fds[0]);
        call_child(fds[1], path, req, timeout_ms);
        _exit(0); /* no cmocka, no atexit handlers, no stdio flush in the child */
    }
    close(fds[1]);
    c->fd = fds[0];
    fcntl(c->fd, F_SETFL, O_NONBLOCK);
    ev_io_init(&c->w, on_call_data, c->fd, EV_READ);
    c->w.data = c;
    ev_io_start(e->loop, &c->w);
}

static bool call_done(void *arg)
{
    return ((struct call *)arg)->done;
}

static void call_wait(struct env *e, struct call *c)
{
    run_until(e, call_done, c, SAFETY);
    assert_true(WIFEXITED(c->status));
    assert_int_equal(WEXITSTATUS(c->status), 0); /* valgrind's --error-exitcode in the child */
}

/* ctl_call() from a child, the loop running meanwhile; returns the answer or NULL + c->err. */
static json_t *call(struct env *e, struct call *c, const char *request, int timeout_ms)
{
    json_t *req = json_loads(request, 0, NULL);
    assert_non_null(req);
    call_start(e, c, e->path, req, timeout_ms);
    json_decref(req);
    call_wait(e, c);
    return c->resp;
}

static void assert_answer(json_t *a, bool ok, const char *key, const char *value)
{
    assert_non_null(a);
    assert_true(json_is_boolean(json_object_get(a, "ok")));
    assert_int_equal(json_is_true(json_object_get(a, "ok")), ok);
    if (key) {
        const char *v = json_string_value(json_object_get(a, key));
        assert_non_null(v);
        assert_string_equal(v, value);
    }
    if (!ok) {
        assert_int_equal(json_object_size(a), 2); /* {"ok":false,"error":...} and nothing else */
        assert_non_null(json_string_value(json_object_get(a, "error")));
    }
}

/* ---- Raw client in the parent ------------------------------------------------------------- */

struct raw {
    int fd;
    ev_io rw, ww;
    const char *out;
    size_t out_len, off;
    char in[4096];
    size_t in_len;
    bool eof;
};

static void on_raw_read(struct ev_loop *loop, ev_io *w, int revents)
{
    struct raw *r = w->data;
    char buf[1024];
    ssize_t n = recv(r->fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n > 0) {
        size_t room = sizeof(r->in) - 1 - r->in_len;
        size_t take = (size_t)n < room ? (size_t)n : room;
        memcpy(r->in + r->in_len, buf, take);
        r->in_len += take;
        r->in[r->in_len] = '\0';
        return;
    }
    /* End of file, or ECONNRESET after the server closed with our bytes unread. */
    r->eof = true;
    ev_io_stop(loop, &r->rw);
    ev_io_stop(loop, &r->ww);
}

static void on_raw_write(struct ev_loop *loop, ev_io *w, int revents)
{
    struct raw *r = w->data;
    while (r->off < r->out_len) {
        ssize_t n = send(r->fd, r->out + r->off, r->out_len - r->off, MSG_NOSIGNAL);
        if (n < 0 && errno == EAGAIN)
            return;
        if (n < 0) /* EPIPE: the server refused and closed */
            break;
        r->off += (size_t)n;
    }
    ev_io_stop(loop, w);
}

static void raw_open(struct env *e, struct raw *r)
{
    memset(r, 0, sizeof(*r));
    r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(r->fd >= 0);
    struct sockaddr_un sa;
    set_addr(&sa, e->path);
    assert_int_equal(connect(r->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ev_io_init(&r->rw, on_raw_read, r->fd, EV_READ);
    r->rw.data = r;
    ev_io_start(e->loop, &r->rw);
    ev_io_init(&r->ww, on_raw_write, r->fd, EV_WRITE);
    r->ww.data = r;
}

/* `data` must stay valid until sent. */
static void raw_send(struct env *e, struct raw *r, const char *data, size_t len)
{
    r->out = data;
    r->out_len = len;
    r->off = 0;
    ev_io_start(e->loop, &r->ww);
}

static void raw_close(struct env *e, struct raw *r)
{
    ev_io_stop(e->loop, &r->rw);
    ev_io_stop(e->loop, &r->ww);
    close(r->fd);
    r->fd = -1;
}

static bool raw_eof(void *arg)
{
    return ((struct raw *)arg)->eof;
}

/* The single answer line a raw client got before the server closed, parsed. */
static json_t *raw_answer(struct env *e, struct raw *r, double limit)
{
    run_until(e, raw_eof, r, limit);
    assert_true(r->in_len > 0);
    assert_int_equal(r->in[r->in_len - 1], '\n');
    assert_ptr_equal(strchr(r->in, '\n'), r->in + r->in_len - 1); /* exactly one line */
    json_error_t jerr;
    json_t *a = json_loads(r->in, 0, &jerr);
    if (!a)
        print_error("answer %s: %s\n", r->in, jerr.text);
    assert_non_null(a);
    return a;
}

/* Sends `len` raw bytes on a new connection and returns the answer. */
static json_t *exchange(struct env *e, const char *data, size_t len)
{
    struct raw r;
    raw_open(e, &r);
    raw_send(e, &r, data, len);
    json_t *a = raw_answer(e, &r, SAFETY);
    raw_close(e, &r);
    return a;
}

static void assert_serving(struct env *e)
{
    const char req[] = "{\"cmd\":\"ping\"}\n";
    json_t *a = exchange(e, req, sizeof(req) - 1);
    assert_answer(a, true, "echo", "ping");
    json_decref(a);
}

/* ---- Tests: round trips ------------------------------------------------------------------- */

static void test_round_trip(void **state)
{
    struct env *e = *state;
    start_server(e);
    struct call c;
    json_t *a = call(e, &c, "{\"cmd\":\"hello\",\"n\":7}", 2000);
    if (!a)
        print_error("ctl_call: %s\n", c.err);
    assert_answer(a, true, "echo", "hello");
    json_decref(a);
    assert_int_equal(e->calls, 1);
    assert_string_equal(e->last_cmd, "hello");
    assert_int_equal(json_integer_value(json_object_get(e->last_req, "n")), 7);

    /* Raw, too: the answer is exactly one compact line. */
    const char req[] = "{\"cmd\":\"hi\"}\n";
    struct raw r;
    raw_open(e, &r);
    raw_send(e, &r, req, sizeof(req) - 1);
    run_until(e, raw_eof, &r, SAFETY);
    raw_close(e, &r);
    assert_string_equal(r.in, "{\"ok\":true,\"echo\":\"hi\"}\n");
}

static void test_concurrent_calls(void **state)
{
    struct env *e = *state;
    start_server(e);
    enum { N = 12 };
    struct call *c = calloc(N, sizeof(*c));
    assert_non_null(c);
    for (int i = 0; i < N; i++) {
        json_t *req = json_pack("{s:s,s:i}", "cmd", "hello", "i", i);
        call_start(e, &c[i], e->path, req, 5000);
        json_decref(req);
    }
    for (int i = 0; i < N; i++) {
        call_wait(e, &c[i]);
        assert_int_equal(c[i].rc, 0);
        assert_answer(c[i].resp, true, "echo", "hello");
        json_decref(c[i].resp);
    }
    assert_int_equal(e->calls, N);
    free(c);
}

static void test_async_reply(void **state)
{
    struct env *e = *state;
    start_server(e);
    ev_now_update(e->loop);
    ev_tstamp t0 = ev_now(e->loop);
    struct call c;
    json_t *a = call(e, &c, "{\"cmd\":\"later\"}", 2000);
    assert_answer(a, true, "echo", "later");
    json_decref(a);
    assert_true(ev_now(e->loop) - t0 >= LATER_S * 0.9);
    assert_null(e->later);
}

static void test_reply_error(void **state)
{
    struct env *e = *state;
    start_server(e);
    struct call c;
    json_t *a = call(e, &c, "{\"cmd\":\"fail\"}", 2000);
    /* ctl_reply_error: printf format, and the answer stays one line. */
    assert_answer(a, false, "error", "bad thing 42 second line");
    json_decref(a);

    /* A handler answering with something else than an object gets an error sent for it. */
    a = call(e, &c, "{\"cmd\":\"bad\"}", 2000);
    assert_answer(a, false, "error", "internal error: no valid answer");
    json_decref(a);
    assert_true(log_has(e, "a handler answered"));

    /* NULL is harmless for both. */
    ctl_reply(NULL, json_object());
    ctl_reply_error(NULL, "nobody %d", 1);
}

/* ---- Tests: the socket file --------------------------------------------------------------- */

static void test_socket_mode(void **state)
{
    struct env *e = *state;
    mode_t old = umask(0); /* the widest umask: the server must narrow it itself */
    start_server(e);
    mode_t during = umask(old);
    assert_int_equal(during, 0); /* restored after bind */
    struct stat st;
    assert_int_equal(lstat(e->path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0600);

    /* Stopping removes the file. */
    ctl_server_stop(e->s);
    e->s = NULL;
    assert_int_equal(lstat(e->path, &st), -1);
    assert_int_equal(errno, ENOENT);
    ctl_server_stop(NULL);
}

static void make_stale_socket(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sa;
    set_addr(&sa, path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(fd); /* the file stays, nobody accepts on it */
}

static void test_stale_socket_replaced(void **state)
{
    struct env *e = *state;
    make_stale_socket(e->path);
    start_server(e);
    assert_true(log_has(e, "removing stale control socket"));
    assert_serving(e);
}

static void test_live_socket_refused(void **state)
{
    struct env *e = *state;
    start_server(e);
    char err[512] = "", want[512];
    assert_null(ctl_server_start(e->loop, e->path, handler, e, err, sizeof(err)));
    snprintf(want, sizeof(want), "another process is serving %s", e->path);
    assert_string_equal(err, want);
    /* The first server is untouched. */
    struct stat st;
    assert_int_equal(lstat(e->path, &st), 0);
    assert_serving(e);
}

static void test_not_a_socket_refused(void **state)
{
    struct env *e = *state;
    FILE *f = fopen(e->path, "w");
    assert_non_null(f);
    fputs("keep me\n", f);
    fclose(f);
    char err[512] = "", want[512];
    assert_null(ctl_server_start(e->loop, e->path, handler, e, err, sizeof(err)));
    snprintf(want, sizeof(want), "%s exists and is not a socket; not replacing it", e->path);
    assert_string_equal(err, want);
    char buf[64] = "";
    f = fopen(e->path, "r");
    assert_non_null(f);
    assert_non_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    assert_string_equal(buf, "keep me\n");

    /* Nor a directory. */
    assert_int_equal(unlink(e->path), 0);
    assert_int_equal(mkdir(e->path, 0700), 0);
    assert_null(ctl_server_start(e->loop, e->path, handler, e, err, sizeof(err)));
    assert_string_equal(err, want);
    assert_int_equal(rmdir(e->path), 0);
}

static void test_path_too_long(void **state)
{
    struct env *e = *state;
    const size_t max = sizeof(((struct sockaddr_un *)0)->sun_path) - 1;
    assert_int_equal(max, 107);
    char path[256];
    int n = snprintf(path, sizeof(path), "%s/", e->dir);
    memset(path + n, 'a', max + 1 - (size_t)n);
    path[max + 1] = '\0';

    char err[512] = "", want[512];
    snprintf(want, sizeof(want), "control socket path too long (108 bytes, at most 107): %s", path);
    assert_null(ctl_server_start(e->loop, path, handler, e, err, sizeof(err)));
    assert_string_equal(err, want);
    json_t *req = json_pack("{s:s}", "cmd", "x"), *resp = NULL;
    assert_int_equal(ctl_call(path, req, 1000, &resp, err, sizeof(err)), -1);
    assert_string_equal(err, want);
    assert_null(resp);
    json_decref(req);

    /* One byte shorter fits. */
    path[max] = '\0';
    snprintf(e->path, sizeof(e->path), "%s", path);
    start_server(e);
    assert_serving(e);
}

static void test_call_missing_path(void **state)
{
    struct env *e = *state;
    json_t *req = json_pack("{s:s}", "cmd", "status"), *sentinel = json_object();
    json_t *resp = sentinel;
    char err[512] = "", want[512];
    assert_int_equal(ctl_call(e->path, req, 1000, &resp, err, sizeof(err)), -1);
    assert_null(resp); /* set even on failure */
    json_decref(sentinel);
    snprintf(want, sizeof(want),
             "cannot connect to %s: No such file or directory (is the daemon running?)", e->path);
    assert_string_equal(err, want);

    /* A stale socket: the daemon died. */
    make_stale_socket(e->path);
    assert_int_equal(ctl_call(e->path, req, 1000, &resp, err, sizeof(err)), -1);
    snprintf(want, sizeof(want),
             "cannot connect to %s: Connection refused (is the daemon running?)", e->path);
    assert_string_equal(err, want);
    json_decref(req);
}

/* ---- Tests: bad requests ------------------------------------------------------------------ */

static void test_malformed_requests(void **state)
{
    struct env *e = *state;
    start_server(e);
    static const struct {
        const char *data;
        const char *error; /* exact, or a prefix when it ends with '*' */
    } cases[] = {
        {"not json\n", "malformed request: *"},
        {"\n", "malformed request: *"},
        {"   \r\n", "malformed request: *"},
        {"[1,2]\n", "malformed request: *"},
        {"\"cmd\"\n", "malformed request: *"},
        {"{\"cmd\":\"a\"} {\"cmd\":\"b\"}\n", "malformed request: *"},
        {"{\"cmd\":\"a\",\"cmd\":\"b\"}\n", "malformed request: *"},
        {"{\"cmd\":\"\xff\xfe\"}\n", "malformed request: *"},
        {"\xff\xfe\x01\x1b[31m\n", "malformed request: *"},
        {"{\"cmd\":\"a\\u0000b\"}\n", "malformed request: *"},
        {"{}\n", "malformed request: no \"cmd\" string"},
        {"{\"cmd\":5}\n", "malformed request: no \"cmd\" string"},
        {"{\"cmd\":null}\n", "malformed request: no \"cmd\" string"},
        {"{\"Cmd\":\"x\"}\n", "malformed request: no \"cmd\" string"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        json_t *a = exchange(e, cases[i].data, strlen(cases[i].data));
        assert_answer(a, false, NULL, NULL);
        const char *got = json_string_value(json_object_get(a, "error"));
        size_t n = strlen(cases[i].error);
        if (cases[i].error[n - 1] == '*')
            assert_memory_equal(got, cases[i].error, n - 1);
        else
            assert_string_equal(got, cases[i].error);
        json_decref(a);
    }
    assert_int_equal(e->calls, 0); /* the handler saw none of them */
    assert_true(log_has(e, "refused a request"));
    assert_serving(e);
    assert_int_equal(e->calls, 1);
}

static void test_missing_cmd_via_call(void **state)
{
    struct env *e = *state;
    start_server(e);
    struct call c;
    json_t *a = call(e, &c, "{\"command\":\"status\"}", 2000);
    assert_answer(a, false, "error", "malformed request: no \"cmd\" string");
    json_decref(a);
    assert_int_equal(e->calls, 0);
}

/* A request line of `total` bytes (newline included) with a valid command. */
static char *big_request(size_t total)
{
    const char head[] = "{\"cmd\":\"big\",\"pad\":\"", tail[] = "\"}\n";
    char *buf = malloc(total + 1);
    assert_non_null(buf);
    memcpy(buf, head, sizeof(head) - 1);
    memset(buf + sizeof(head) - 1, 'a', total - (sizeof(head) - 1) - (sizeof(tail) - 1));
    memcpy(buf + total - (sizeof(tail) - 1), tail, sizeof(tail));
    return buf;
}

static void test_request_too_long(void **state)
{
    struct env *e = *state;
    start_server(e);

    /* Exactly CTL_MAX_REQUEST bytes with its newline: accepted. */
    char *big = big_request(CTL_MAX_REQUEST);
    json_t *a = exchange(e, big, CTL_MAX_REQUEST);
    assert_answer(a, true, "echo", "big");
    json_decref(a);
    free(big);
    assert_int_equal(e->calls, 1);

    /* One more: refused (the server stops reading at the limit). */
    big = big_request(CTL_MAX_REQUEST + 1);
    a = exchange(e, big, CTL_MAX_REQUEST + 1);
    assert_answer(a, false, "error", "request too long (more than 65536 bytes)");
    json_decref(a);
    free(big);

    /* Far more, and no newline at all. */
    size_t huge = 4 * CTL_MAX_REQUEST;
    big = malloc(huge);
    assert_non_null(big);
    memset(big, '{', huge);
    a = exchange(e, big, huge);
    assert_answer(a, false, "error", "request too long (more than 65536 bytes)");
    json_decref(a);
    assert_int_equal(e->calls, 1);
    assert_true(log_has(e, "request too long"));
    assert_serving(e);

    /* The client refuses to send what the server would refuse. */
    free(big);
    big = big_request(CTL_MAX_REQUEST + 1);
    big[CTL_MAX_REQUEST] = '\0'; /* drop the newline: a JSON text */
    json_t *req = json_loads(big, 0, NULL), *resp = NULL;
    assert_non_null(req);
    char err[512] = "", want[512];
    assert_int_equal(ctl_call(e->path, req, 1000, &resp, err, sizeof(err)), -1);
    snprintf(want, sizeof(want), "request to %s too long (65537 bytes, at most 65536)", e->path);
    assert_string_equal(err, want);
    json_decref(req);
    free(big);
}

static void test_request_timeout(void **state)
{
    struct env *e = *state;
    start_server(e);
    const char part[] = "{\"cmd\":\"slow";
    struct raw r;
    raw_open(e, &r);
    raw_send(e, &r, part, sizeof(part) - 1);
    ev_now_update(e->loop);
    ev_tstamp t0 = ev_now(e->loop);
    json_t *a = raw_answer(e, &r, CTL_TIMEOUT_S + SAFETY);
    raw_close(e, &r);
    assert_true(ev_now(e->loop) - t0 >= CTL_TIMEOUT_S - 0.5);
    assert_answer(a, false, "error", "no complete request within 10 s");
    json_decref(a);
    assert_int_equal(e->calls, 0);
    assert_true(log_has(e, "no complete request"));
    assert_serving(e);
}

/* ---- Tests: connections and pending requests ---------------------------------------------- */

struct raws {
    struct raw *r;
    int n, want; /* how many must have seen end of file */
};

static bool raws_eof(void *arg)
{
    struct raws *a = arg;
    int n = 0;
    for (int i = 0; i < a->n; i++)
        n += a->r[i].eof;
    return n >= a->want;
}

static void test_max_clients(void **state)
{
    struct env *e = *state;
    start_server(e);
    const char req[] = "{\"cmd\":\"hold\"}\n";
    enum { N = CTL_MAX_CLIENTS + 1 };
    struct raw *r = calloc(N, sizeof(*r));
    assert_non_null(r);
    for (int i = 0; i < CTL_MAX_CLIENTS; i++) {
        raw_open(e, &r[i]);
        raw_send(e, &r[i], req, sizeof(req) - 1);
    }
    wait_held(e, CTL_MAX_CLIENTS);
    /* One more connects (the backlog) but is not served while all slots are taken. */
    raw_open(e, &r[N - 1]);
    raw_send(e, &r[N - 1], req, sizeof(req) - 1);
    run_for(e, 0.3);
    assert_int_equal(e->nheld, CTL_MAX_CLIENTS);
    assert_false(r[N - 1].eof);

    /* Answering one (whichever client that is) frees a slot. */
    ctl_reply(take_held(e, 0), json_pack("{s:b,s:i}", "ok", 1, "n", 0));
    struct raws all = {r, N, 1};
    run_until(e, raws_eof, &all, SAFETY);
    wait_held(e, CTL_MAX_CLIENTS + 1);
    for (int i = 1; i < N; i++)
        ctl_reply(take_held(e, i), json_pack("{s:b,s:i}", "ok", 1, "n", i));
    e->nheld = 0;
    all.want = N;
    run_until(e, raws_eof, &all, SAFETY);
    /* Every client got exactly one of the answers. */
    bool seen[N] = {false};
    for (int i = 0; i < N; i++) {
        int k = -1;
        assert_int_equal(sscanf(r[i].in, "{\"ok\":true,\"n\":%d}\n", &k), 1);
        assert_true(k >= 0 && k < N);
        assert_false(seen[k]);
        seen[k] = true;
    }
    for (int i = 0; i < N; i++)
        raw_close(e, &r[i]);
    free(r);
    assert_serving(e);
}

static void test_client_leaves_before_answer(void **state)
{
    struct env *e = *state;
    start_server(e);
    const char req[] = "{\"cmd\":\"hold\"}\n";
    struct raw r;
    raw_open(e, &r);
    raw_send(e, &r, req, sizeof(req) - 1);
    wait_held(e, 1);
    raw_close(e, &r);
    run_for(e, 0.1);
    assert_true(log_has(e, "left before its answer"));
    /* The request outlived its connection: answering just frees it. */
    ctl_reply(take_held(e, 0), json_pack("{s:b}", "ok", 1));
    e->nheld = 0;
    run_for(e, 0.05);
    assert_serving(e);

    /* Same through the real client giving up on its timeout. */
    struct call c;
    json_t *a = call(e, &c, "{\"cmd\":\"hold\"}", 300);
    assert_null(a);
    assert_int_equal(c.rc, -1);
    char want[512];
    snprintf(want, sizeof(want), "no answer from %s within 300 ms", e->path);
    assert_string_equal(c.err, want);
    assert_int_equal(e->nheld, 1);
    run_for(e, 0.1);
    ctl_reply_error(take_held(e, 0), "too late: %s", "nobody listens");
    e->nheld = 0;
    assert_serving(e);
}

static void test_stop_with_pending(void **state)
{
    struct env *e = *state;
    start_server(e);
    const char req[] = "{\"cmd\":\"hold\"}\n";
    struct raw r[3];
    for (int i = 0; i < 2; i++) {
        raw_open(e, &r[i]);
        raw_send(e, &r[i], req, sizeof(req) - 1);
    }
    wait_held(e, 2);
    /* And one still writing its request. */
    raw_open(e, &r[2]);
    raw_send(e, &r[2], req, 5);
    run_for(e, 0.05);

    ctl_server_stop(e->s);
    e->s = NULL;
    struct stat st;
    assert_int_equal(lstat(e->path, &st), -1);
    for (int i = 0; i < 3; i++) {
        run_until(e, raw_eof, &r[i], SAFETY);
        assert_int_equal(r[i].in_len, 0); /* dropped without an answer */
        raw_close(e, &r[i]);
    }
    /* The pending requests stay valid until answered. */
    ctl_reply(take_held(e, 0), json_pack("{s:b}", "ok", 1));
    ctl_reply_error(take_held(e, 1), "gone");
    e->nheld = 0;
    run_for(e, 0.05);

    /* The path is free for a new server. */
    start_server(e);
    assert_serving(e);
}

static void test_stop_from_handler(void **state)
{
    struct env *e = *state;
    start_server(e);
    /* Answer, then stop: the answer still goes out (the socket takes it at once). */
    const char stop[] = "{\"cmd\":\"stop\"}\n";
    json_t *a = exchange(e, stop, sizeof(stop) - 1);
    assert_answer(a, true, NULL, NULL);
    json_decref(a);
    assert_null(e->s);
    struct stat st;
    assert_int_equal(lstat(e->path, &st), -1);

    /* Stop, then answer: the answer is dropped, the request freed. */
    start_server(e);
    const char first[] = "{\"cmd\":\"stopfirst\"}\n";
    struct raw r;
    raw_open(e, &r);
    raw_send(e, &r, first, sizeof(first) - 1);
    run_until(e, raw_eof, &r, SAFETY);
    raw_close(e, &r);
    assert_int_equal(r.in_len, 0);
    assert_null(e->s);
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* ---- Fixture ------------------------------------------------------------------------------ */

static int setup(void **state)
{
    struct env *e = calloc(1, sizeof(*e));
    if (!e)
        return -1;
    snprintf(e->dir, sizeof(e->dir), "/tmp/ctlsock-XXXXXX");
    if (!mkdtemp(e->dir)) {
        free(e);
        return -1;
    }
    snprintf(e->path, sizeof(e->path), "%s/ctl.sock", e->dir);
    snprintf(e->log, sizeof(e->log), "%s/log", e->dir);
    e->loop = ev_loop_new(EVFLAG_AUTO);
    if (!e->loop)
        return -1;
    ev_timer_init(&e->later_w, on_later, LATER_S, 0.);
    e->later_w.data = e;
    /* Everything down to debug goes to a file the tests read (P2P_TEST_DEBUG: to stderr). */
    const char *dbg = getenv("P2P_TEST_DEBUG");
    log_init("test_ctlsock", LL_DEBUG, false);
    e->log_to_file = !(dbg && *dbg);
    if (e->log_to_file && log_use_file(e->log) < 0)
        return -1;
    e->fds = count_fds();
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    struct env *e = *state;
    ctl_server_stop(e->s);
    for (int i = 0; i < e->nheld; i++)
        ctl_reply(e->held[i], json_object());
    if (e->later) {
        ev_timer_stop(e->loop, &e->later_w);
        ctl_reply(e->later, json_object());
    }
    json_decref(e->last_req);
    int fds = count_fds(), e_fds = e->fds;
    if (fds != e->fds)
        print_error("%d descriptors open after the test, %d before\n", fds, e->fds);
    log_close();
    ev_loop_destroy(e->loop);
    DIR *d = opendir(e->dir);
    if (d) {
        struct dirent *de;
        char p[512];
        while ((de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                snprintf(p, sizeof(p), "%s/%s", e->dir, de->d_name);
                if (unlink(p) != 0)
                    rmdir(p);
            }
        closedir(d);
    }
    rmdir(e->dir);
    free(e);
    return fds == -1 || fds != e_fds ? -1 : 0;
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_round_trip),
        T(test_concurrent_calls),
        T(test_async_reply),
        T(test_reply_error),
        T(test_socket_mode),
        T(test_stale_socket_replaced),
        T(test_live_socket_refused),
        T(test_not_a_socket_refused),
        T(test_path_too_long),
        T(test_call_missing_path),
        T(test_malformed_requests),
        T(test_missing_cmd_via_call),
        T(test_request_too_long),
        T(test_max_clients),
        T(test_client_leaves_before_answer),
        T(test_stop_with_pending),
        T(test_stop_from_handler),
        T(test_request_timeout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
