/*
 * HTTPS server glue (see httpd.h). libmicrohttpd runs in "external polling"
 * mode with epoll: one ev_io watches MHD's epoll descriptor, an ev_timer
 * fires when MHD_get_timeout() says so, and an ev_prepare re-arms that timer
 * before each loop iteration (MHD may have queued work, e.g. a response a
 * handler just produced, that needs a run without any new I/O).
 *
 * Deferred answers use MHD's suspend/resume. MHD must be the one to queue a
 * response, from inside the access handler: a handler that defers leaves the
 * request unanswered, on_access suspends the connection when the handler
 * returns, a later httpd_respond*() keeps the response and resumes, and the
 * next on_access call (MHD calls it again once resumed) queues it. A deferred
 * request still unanswered when MHD ends it (httpd_stop) is reported to the
 * owner's cancel callback before it is freed. MHD does not watch a suspended
 * connection, so we do: an ev_io on its socket, and a hang-up seen there
 * (POLLRDHUP: the client shut its side, closed, or reset) cancels the owner's
 * work and lets MHD close the connection, rather than keep it until the
 * owner's answer would have come.
 *
 * Connection bounds are ours rather than MHD's: MHD's per-IP limit counts
 * whole IPv6 addresses and refuses silently. MHD asks our accept policy about
 * every accepted socket, and tells us when a connection starts and when it is
 * gone; a table of sources counts what each holds.
 */
#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <poll.h>
#include <string.h>
#include <sys/resource.h>

#include "config.h"
#include "conn.h"
#include "crl.h"
#include "log.h"

#define DEF_MAX_BODY   (16 * 1024)
#define DEF_TIMEOUT_S  30
#define DEF_MAX_CONNS  1024
#define DEF_MAX_PER_IP 64
#define FD_RESERVE     64 /* descriptors left for everything but HTTPS connections */
#define SRC_BUCKETS    1024
#define MAX_CHAIN      8
#define HTTPS_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct header {
    struct header *next;
    char *name, *value;
};

/* What one source address holds; freed when it holds nothing. */
struct src {
    struct src *next;
    uint8_t key[CONN_SRC_KEY_LEN];
    unsigned n;
};

struct httpd {
    struct ev_loop *loop;
    struct MHD_Daemon *d;
    ev_io io;
    ev_timer timer;
    ev_prepare prepare;
    httpd_handler handler;
    void *ud;
    size_t max_body;
    int port;
    char *cert_pem, *key_pem, *ca_pem; /* MHD keeps pointers to these */
    gnutls_x509_trust_list_t trust;    /* for client certificates, when asked for */
    unsigned max_conns, max_per_src, n_conns;
    struct src *srcs[SRC_BUCKETS];
    struct conn_refusals refused;
    struct httpd_req *suspended; /* deferred requests waiting for their answer */
    bool kick;                   /* a connection was resumed: run MHD at the next turn */
};

struct httpd_req {
    struct httpd *h;
    struct MHD_Connection *conn;
    char method[16];
    char *path;
    char addr[INET6_ADDRSTRLEN];
    char *body;
    size_t len, cap;
    bool too_large, responded;
    bool deferred, suspended;
    struct MHD_Response *pending; /* a deferred answer, queued when MHD calls on_access again */
    unsigned pending_status;
    httpd_cancel_cb cancel;
    void *cancel_ud;
    struct httpd_req *prev, *next; /* in h->suspended while suspended */
    ev_io hangup;                  /* the socket, while suspended: is the client still there? */
    struct header *headers;
};

/* ---- Loop integration ------------------------------------------------------------------- */

static void run(struct httpd *h)
{
    h->kick = false;
    if (MHD_run(h->d) != MHD_YES)
        log_debug("http", "MHD_run reported an error");
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    run(w->data);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    run(w->data);
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    struct httpd *h = w->data;
    MHD_UNSIGNED_LONG_LONG ms;
    ev_timer_stop(loop, &h->timer);
    if (h->kick) {
        ev_timer_set(&h->timer, 0., 0.);
        ev_timer_start(loop, &h->timer);
    } else if (MHD_get_timeout(h->d, &ms) == MHD_YES) {
        ev_timer_set(&h->timer, (double)ms / 1000.0, 0.);
        ev_timer_start(loop, &h->timer);
    }
}

static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    /* MHD reports every client's TLS or protocol mistake here: routine noise, so debug. */
    if (!log_enabled(LL_DEBUG))
        return;
    char buf[512];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t n = strlen(buf);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0';
    log_debug("http", "%s", buf);
}

/* ---- Connection bounds ------------------------------------------------------------------ */

static struct src **src_slot(struct httpd *h, const uint8_t key[CONN_SRC_KEY_LEN])
{
    uint32_t x = 2166136261u; /* FNV-1a: the bound, not the hash, is what stops a flood */
    for (int i = 0; i < CONN_SRC_KEY_LEN; i++)
        x = (x ^ key[i]) * 16777619u;
    struct src **p = &h->srcs[x % SRC_BUCKETS];
    while (*p && memcmp((*p)->key, key, CONN_SRC_KEY_LEN) != 0)
        p = &(*p)->next;
    return p;
}

static enum MHD_Result on_accept_policy(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
    struct httpd *h = cls;
    uint8_t key[CONN_SRC_KEY_LEN];
    char from[INET6_ADDRSTRLEN + 8];
    conn_src_key(addr, key);
    if (h->n_conns >= h->max_conns) {
        conn_refusals_note(&h->refused, "from %s: %u connections open (limit %u)",
                           conn_src_key_str(key, from, sizeof(from)), h->n_conns, h->max_conns);
        return MHD_NO;
    }
    struct src *s = *src_slot(h, key);
    if (s && s->n >= h->max_per_src) {
        conn_refusals_note(&h->refused, "from %s: %u connections open from that address (limit %u)",
                           conn_src_key_str(key, from, sizeof(from)), s->n, h->max_per_src);
        return MHD_NO;
    }
    return MHD_YES;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    struct httpd *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        uint8_t key[CONN_SRC_KEY_LEN];
        if (!ci || !ci->client_addr)
            return;
        conn_src_key(ci->client_addr, key);
        struct src **p = src_slot(h, key);
        if (!*p) {
            *p = calloc(1, sizeof(**p));
            if (!*p)
                return; /* uncounted: bounded by MHD's own total */
            memcpy((*p)->key, key, sizeof(key));
        }
        (*p)->n++;
        h->n_conns++;
        *socket_context = *p;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
        struct src *s = *socket_context;
        *socket_context = NULL;
        h->n_conns--;
        if (--s->n == 0) {
            struct src **p = src_slot(h, s->key);
            *p = s->next;
            free(s);
        }
    }
}

/* The most connections the descriptor limit leaves room for. */
static unsigned fd_room(unsigned want, const char *listen)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY ||
        rl.rlim_cur >= (rlim_t)want + 2 * FD_RESERVE)
        return want;
    unsigned room = rl.rlim_cur > 2 * FD_RESERVE ? (unsigned)(rl.rlim_cur - 2 * FD_RESERVE) : 8;
    log_warn("http",
             "%s: %u connections need more descriptors than the limit of %llu allows: "
             "serving at most %u at once",
             listen, want, (unsigned long long)rl.rlim_cur, room);
    return room;
}

/* ---- Requests ----------------------------------------------------------------------------- */

static void req_free(struct httpd_req *r)
{
    if (!r)
        return;
    for (struct header *x = r->headers, *next; x; x = next) {
        next = x->next;
        free(x->name);
        free(x->value);
        free(x);
    }
    if (r->pending)
        MHD_destroy_response(r->pending);
    free(r->path);
    free(r->body);
    free(r);
}

static void suspended_unlink(struct httpd_req *r)
{
    if (!r->suspended)
        return;
    ev_io_stop(r->h->loop, &r->hangup);
    if (r->prev)
        r->prev->next = r->next;
    else
        r->h->suspended = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->suspended = false;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct httpd_req *r = *con_cls;
    *con_cls = NULL;
    if (!r)
        return;
    suspended_unlink(r);
    /* The owner still holds a deferred request it has not answered: it must let go. */
    if (r->deferred && !r->responded && r->cancel) {
        log_debug("http", "%s %s %s: ended before its deferred answer (code %d)", r->addr,
                  r->method, r->path, (int)toe);
        r->cancel(r, r->cancel_ud);
    }
    req_free(r);
}

static struct httpd_req *req_new(struct httpd *h, struct MHD_Connection *c, const char *url,
                                 const char *method)
{
    struct httpd_req *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->h = h;
    r->conn = c;
    snprintf(r->method, sizeof(r->method), "%s", method);
    r->path = strdup(url);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    strcpy(r->addr, "?");
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, r->addr,
                      sizeof(r->addr));
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, r->addr,
                      sizeof(r->addr));
    }
    if (!r->path) {
        free(r);
        return NULL;
    }
    return r;
}

/*
 * The socket of a waiting request is readable: either the client hung up, or
 * it sent more (a pipelined request, TLS records), which waits for MHD.
 */
static void on_hangup(struct ev_loop *loop, ev_io *w, int revents)
{
    struct httpd_req *r = w->data;
    struct pollfd p = {.fd = w->fd, .events = POLLRDHUP};
    ev_io_stop(loop, w); /* either way: level-triggered, it would fire again at once */
    if (poll(&p, 1, 0) != 1 || !(p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
        return;
    log_info("http", "%s %s %s: the client left before its answer", r->addr, r->method, r->path);
    r->responded = true; /* no answer: on_access closes the connection */
    if (r->cancel)
        r->cancel(r, r->cancel_ud);
    suspended_unlink(r);
    MHD_resume_connection(r->conn);
    r->h->kick = true;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *c, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls)
{
    struct httpd *h = cls;
    struct httpd_req *r = *con_cls;
    if (!r) {
        r = req_new(h, c, url, method);
        if (!r)
            return MHD_NO; /* out of memory: MHD drops the connection */
        *con_cls = r;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl) {
            char *end;
            errno = 0;
            unsigned long long n = strtoull(cl, &end, 10);
            if (errno || *end || n > h->max_body) {
                /* Refuse before reading a byte of it: the body may be huge. */
                r->too_large = true;
                char why[96];
                snprintf(why, sizeof(why), "request body above %zu bytes", h->max_body);
                httpd_respond_error(r, 413, "too-large", why);
            }
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0; /* consumed (or dropped) */
        if (r->too_large || r->responded)
            return MHD_YES;
        if (r->len + n > h->max_body) {
            /* A body without a Content-Length, found too large on the way: stop now
             * rather than read an endless upload to the end. */
            r->too_large = true;
            free(r->body);
            r->body = NULL;
            r->len = r->cap = 0;
            /* MHD cannot answer in the middle of an upload: close the connection, which
             * stops the upload at once (docs/protocol.md 2.5). */
            log_info("http", "%s %s %s: body without a length above %zu bytes: closing", r->addr,
                     r->method, r->path, h->max_body);
            r->responded = true;
            return MHD_NO;
        }
        if (r->len + n + 1 > r->cap) {
            size_t cap = r->cap ? r->cap : 1024;
            while (cap < r->len + n + 1)
                cap *= 2;
            char *grown = realloc(r->body, cap);
            if (!grown)
                return MHD_NO;
            r->body = grown;
            r->cap = cap;
        }
        memcpy(r->body + r->len, upload_data, n);
        r->len += n;
        return MHD_YES;
    }
    if (r->pending) {
        /* Resumed with the deferred answer: MHD takes it only from in here. */
        if (MHD_queue_response(c, r->pending_status, r->pending) != MHD_YES)
            log_warn("http", "%s %s: cannot queue the %u response", r->method, r->path,
                     r->pending_status);
        MHD_destroy_response(r->pending);
        r->pending = NULL;
        return MHD_YES;
    }
    if (r->deferred && r->responded)
        return MHD_NO; /* its answer could not be made: close rather than spin */
    if (r->responded || r->suspended)
        return MHD_YES;
    if (r->too_large) {
        char why[96];
        snprintf(why, sizeof(why), "request body above %zu bytes", h->max_body);
        httpd_respond_error(r, 413, "too-large", why);
        return MHD_YES;
    }
    if (!r->body) {
        r->body = calloc(1, 1);
        if (!r->body)
            return MHD_NO;
    }
    r->body[r->len] = '\0';
    h->handler(r, h->ud);
    if (!r->responded && r->deferred) {
        /* Out of MHD's polling until httpd_respond*() resumes it. */
        MHD_suspend_connection(c);
        r->suspended = true;
        r->next = h->suspended;
        if (r->next)
            r->next->prev = r;
        h->suspended = r;
        const union MHD_ConnectionInfo *fi =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (fi) {
            ev_io_init(&r->hangup, on_hangup, fi->connect_fd, EV_READ);
            r->hangup.data = r;
            ev_io_start(h->loop, &r->hangup);
        }
        return MHD_YES;
    }
    if (!r->responded) {
        log_error("http", "%s %s: handler gave no answer", r->method, r->path);
        httpd_respond_error(r, 500, "internal", "no answer");
    }
    return MHD_YES;
}

const char *httpd_req_method(const struct httpd_req *r)
{
    return r->method;
}

const char *httpd_req_path(const struct httpd_req *r)
{
    return r->path;
}

const char *httpd_req_body(const struct httpd_req *r)
{
    return r->body ? r->body : "";
}

size_t httpd_req_body_len(const struct httpd_req *r)
{
    return r->len;
}

const char *httpd_req_client_addr(const struct httpd_req *r)
{
    return r->addr;
}

const char *httpd_req_header(const struct httpd_req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

const char *httpd_req_query(const struct httpd_req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

int httpd_req_client_identity(struct httpd_req *r, struct peer_identity *id, char *err,
                              size_t errlen)
{
    if (!r->h->trust) {
        snprintf(err, errlen, "this server does not ask for client certificates");
        return -1;
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (!ci || !ci->tls_session) {
        snprintf(err, errlen, "not a TLS connection");
        return -1;
    }
    gnutls_session_t s = (gnutls_session_t)ci->tls_session;
    unsigned n = 0;
    const gnutls_datum_t *raw = gnutls_certificate_get_peers(s, &n);
    if (!raw || n == 0) {
        snprintf(err, errlen, "no client certificate");
        return -1;
    }
    if (n > MAX_CHAIN)
        n = MAX_CHAIN;
    gnutls_x509_crt_t chain[MAX_CHAIN];
    unsigned have = 0;
    int rc = -1;
    for (; have < n; have++) {
        if (gnutls_x509_crt_init(&chain[have]) < 0)
            goto out;
        if (gnutls_x509_crt_import(chain[have], &raw[have], GNUTLS_X509_FMT_DER) < 0) {
            have++;
            snprintf(err, errlen, "client certificate cannot be parsed");
            goto out;
        }
    }
    gnutls_typed_vdata_st purpose = {GNUTLS_DT_KEY_PURPOSE_OID,
                                     (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT, 0};
    unsigned status = 0;
    int vr =
        gnutls_x509_trust_list_verify_crt2(r->h->trust, chain, have, &purpose, 1, 0, &status, NULL);
    if (vr < 0) {
        snprintf(err, errlen, "client certificate not verifiable: %s", gnutls_strerror(vr));
        goto out;
    }
    if (status) {
        gnutls_datum_t text = {NULL, 0};
        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &text, 0) == 0) {
            snprintf(err, errlen, "client certificate refused: %s", (const char *)text.data);
            gnutls_free(text.data);
        } else {
            snprintf(err, errlen, "client certificate refused (status 0x%x)", status);
        }
        goto out;
    }
    if (crl_crt_revoked(chain[0])) { /* the process's revocation list (crl.h), if it holds one */
        snprintf(err, errlen, "client certificate refused: revoked by the overlay CA");
        goto out;
    }
    if (cred_identity(chain[0], id) < 0) {
        snprintf(err, errlen, "client certificate identity unreadable");
        goto out;
    }
    rc = 0;
out:
    for (unsigned i = 0; i < have; i++)
        gnutls_x509_crt_deinit(chain[i]);
    return rc;
}

int httpd_req_defer(struct httpd_req *r, httpd_cancel_cb cancel, void *ud)
{
    if (r->responded || r->deferred)
        return -1;
    r->deferred = true;
    r->cancel = cancel;
    r->cancel_ud = ud;
    return 0;
}

void httpd_add_header(struct httpd_req *r, const char *name, const char *value)
{
    struct header *x = calloc(1, sizeof(*x));
    if (!x)
        return;
    x->name = strdup(name);
    x->value = strdup(value);
    if (!x->name || !x->value) {
        free(x->name);
        free(x->value);
        free(x);
        return;
    }
    x->next = r->headers;
    r->headers = x;
}

void httpd_respond(struct httpd_req *r, unsigned status, const char *content_type, const void *body,
                   size_t len)
{
    if (r->responded)
        return;
    r->responded = true;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)(uintptr_t)body, MHD_RESPMEM_MUST_COPY);
    if (!resp) {
        if (r->suspended) { /* resumed without an answer: on_access closes it */
            suspended_unlink(r);
            MHD_resume_connection(r->conn);
            r->h->kick = true;
        }
        return;
    }
    if (content_type)
        MHD_add_response_header(resp, "Content-Type", content_type);
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    for (struct header *x = r->headers; x; x = x->next)
        MHD_add_response_header(resp, x->name, x->value);
    if (r->suspended) {
        r->pending = resp;
        r->pending_status = status;
        suspended_unlink(r);
        MHD_resume_connection(r->conn);
        r->h->kick = true;
        return;
    }
    if (MHD_queue_response(r->conn, status, resp) != MHD_YES)
        log_warn("http", "%s %s: cannot queue the %u response", r->method, r->path, status);
    MHD_destroy_response(resp);
}

void httpd_respond_json(struct httpd_req *r, unsigned status, json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);
    if (!text) {
        static const char fallback[] = "{\"error\":\"internal\",\"reason\":\"encoding failed\"}";
        httpd_respond(r, 500, "application/json", fallback, sizeof(fallback) - 1);
        return;
    }
    httpd_respond(r, status, "application/json", text, strlen(text));
    free(text);
}

void httpd_respond_error(struct httpd_req *r, unsigned status, const char *code, const char *reason)
{
    log_info("http", "%s %s %s -> %u %s: %s", r->addr, r->method, r->path, status, code, reason);
    json_t *o = json_pack("{s:s, s:s}", "error", code, "reason", reason);
    if (!o) /* reason with invalid UTF-8: say less rather than nothing */
        o = json_pack("{s:s, s:s}", "error", code, "reason", "(unprintable)");
    httpd_respond_json(r, status, o);
    json_decref(o);
}

void httpd_respond_unrouted(struct httpd_req *r, const char *allow)
{
    if (allow) {
        httpd_add_header(r, "Allow", allow);
        httpd_respond_error(r, 405, "method-not-allowed", "see the Allow header");
    } else {
        httpd_respond_error(r, 404, "not-found", "no such resource");
    }
}

/* ---- Daemon ------------------------------------------------------------------------------- */

int httpd_port(const struct httpd *h)
{
    return h->port;
}

struct httpd *httpd_start(struct ev_loop *loop, const struct httpd_config *cfg,
                          httpd_handler handler, void *ud, char *err, size_t errlen)
{
    char host[INET6_ADDRSTRLEN + 1];
    unsigned port;
    if (!cfg->listen || cfg_parse_hostport(cfg->listen, host, sizeof(host), &port) != 0) {
        snprintf(err, errlen, "cannot listen on \"%s\": not a numeric host:port",
                 cfg->listen ? cfg->listen : "");
        return NULL;
    }
    struct httpd *h = calloc(1, sizeof(*h));
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    h->loop = loop;
    h->handler = handler;
    h->ud = ud;
    h->max_body = cfg->max_body ? cfg->max_body : DEF_MAX_BODY;
    h->cert_pem = strdup(cfg->cert_pem ? cfg->cert_pem : "");
    h->key_pem = strdup(cfg->key_pem ? cfg->key_pem : "");
    if (!h->cert_pem || !h->key_pem)
        goto nomem;
    if (cfg->client_ca_pem) {
        h->ca_pem = strdup(cfg->client_ca_pem);
        if (!h->ca_pem)
            goto nomem;
        gnutls_datum_t ca = {(unsigned char *)h->ca_pem, (unsigned)strlen(h->ca_pem)};
        if (gnutls_x509_trust_list_init(&h->trust, 0) < 0 ||
            gnutls_x509_trust_list_add_trust_mem(h->trust, &ca, NULL, GNUTLS_X509_FMT_PEM, 0, 0) <=
                0) {
            snprintf(err, errlen, "client CA: no usable certificate");
            goto fail;
        }
    }

    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    /* Without a certificate: plain HTTP (a local /metrics port, never the public services). */
    bool tls = cfg->cert_pem != NULL;
    unsigned flags =
        (tls ? MHD_USE_TLS : 0) | MHD_USE_EPOLL | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    if (strchr(host, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        inet_pton(AF_INET6, host, &s6->sin6_addr);
        flags |= MHD_USE_IPv6;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, host, &s4->sin_addr);
    }
    unsigned timeout = cfg->timeout_s ? cfg->timeout_s : DEF_TIMEOUT_S;
    h->max_conns =
        fd_room(cfg->max_connections ? cfg->max_connections : DEF_MAX_CONNS, cfg->listen);
    h->max_per_src = cfg->max_per_ip ? cfg->max_per_ip : DEF_MAX_PER_IP;
    conn_refusals_init(&h->refused, loop, "http", cfg->listen);
    /* An option array, because the trust option is conditional (MHD's varargs end at the
     * first MHD_OPTION_END, which would silently drop everything after it). */
    struct MHD_OptionItem opts[16];
    size_t n = 0;
#define OPT(o, v, p) opts[n++] = (struct MHD_OptionItem){(o), (intptr_t)(v), (p)}
    OPT(MHD_OPTION_SOCK_ADDR, 0, &ss);
    if (tls) {
        OPT(MHD_OPTION_HTTPS_MEM_KEY, 0, h->key_pem);
        OPT(MHD_OPTION_HTTPS_MEM_CERT, 0, h->cert_pem);
        OPT(MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)HTTPS_PRIORITY);
        if (h->ca_pem) /* this only makes the server ask for a certificate; we verify it */
            OPT(MHD_OPTION_HTTPS_MEM_TRUST, 0, h->ca_pem);
    }
    OPT(MHD_OPTION_CONNECTION_TIMEOUT, timeout, NULL);
    /* MHD's own bound only backs ours up (it refuses without telling): a little above it. */
    OPT(MHD_OPTION_CONNECTION_LIMIT, h->max_conns + 8, NULL);
    OPT(MHD_OPTION_SIGPIPE_HANDLED_BY_APP, 1, NULL);
    OPT(MHD_OPTION_END, 0, NULL);
#undef OPT
    /* The logger goes first so that MHD reports even option problems through it. */
    h->d = MHD_start_daemon(flags, (uint16_t)port, on_accept_policy, h, on_access, h,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, h, MHD_OPTION_ARRAY, opts,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                            MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_END);
    if (!h->d) {
        snprintf(err, errlen, "cannot start %s on %s (address in use%s)", tls ? "HTTPS" : "HTTP",
                 cfg->listen, tls ? ", or bad certificate/key" : "");
        goto fail;
    }
    const union MHD_DaemonInfo *pi = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = pi ? pi->port : (int)port;
    const union MHD_DaemonInfo *ei = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
    if (!ei) {
        snprintf(err, errlen, "libmicrohttpd has no epoll descriptor");
        goto fail;
    }
    ev_io_init(&h->io, on_io, ei->epoll_fd, EV_READ);
    h->io.data = h;
    ev_io_start(loop, &h->io);
    ev_timer_init(&h->timer, on_timer, 0., 0.);
    h->timer.data = h;
    ev_prepare_init(&h->prepare, on_prepare);
    h->prepare.data = h;
    ev_prepare_start(loop, &h->prepare);
    return h;

nomem:
    snprintf(err, errlen, "out of memory");
fail:
    httpd_stop(h);
    return NULL;
}

void httpd_stop(struct httpd *h)
{
    if (!h)
        return;
    if (h->loop) {
        ev_io_stop(h->loop, &h->io);
        ev_timer_stop(h->loop, &h->timer);
        ev_prepare_stop(h->loop, &h->prepare);
    }
    /* MHD refuses to stop with suspended connections: resume them unanswered. MHD then
     * ends each, and on_completed tells its owner through the cancel callback. */
    while (h->suspended) {
        struct httpd_req *r = h->suspended;
        suspended_unlink(r);
        MHD_resume_connection(r->conn);
    }
    if (h->d)
        MHD_stop_daemon(h->d); /* tells on_connection of every connection it closes */
    conn_refusals_stop(&h->refused);
    for (size_t i = 0; i < SRC_BUCKETS; i++)
        for (struct src *s = h->srcs[i], *next; s; s = next) {
            next = s->next;
            free(s);
        }
    if (h->trust)
        gnutls_x509_trust_list_deinit(h->trust, 1);
    free(h->cert_pem);
    free(h->key_pem);
    free(h->ca_pem);
    free(h);
}
