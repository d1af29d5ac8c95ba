/*
 * HTTPS client on libcurl's multi interface, driven by a libev loop (see
 * http_client.h for the contract). libcurl tells us which sockets to watch
 * (socket callback: one ev_io each) and when to wake it up (timer callback:
 * one ev_timer); we call curl_multi_socket_action() from those watchers, never
 * from inside a libcurl callback (libcurl refuses recursive calls), and
 * collect finished transfers afterwards with curl_multi_info_read().
 */
#include "http_client.h"

#include <curl/curl.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "cred.h"
#include "log.h"
#include "version.h"

struct http_sock {
    ev_io io;
    struct http_client *client;
    curl_socket_t fd;
    struct http_sock *prev, *next;
};

struct http_req {
    struct http_client *client;
    CURL *easy;
    struct curl_slist *headers;
    http_done_cb cb;
    void *ud;
    char *buf; /* response body, grown up to max + 1 (room for the NUL) */
    size_t len, cap, max;
    bool too_large;
    bool not_service; /* the verified server is no service host of the overlay */
    char why_not_service[300];
    long timeout_ms;
    char errbuf[CURL_ERROR_SIZE];
    struct http_req *prev, *next;
};

struct http_client {
    struct ev_loop *loop;
    CURLM *multi;
    ev_timer timer;
    struct http_req *reqs;
    struct http_sock *socks;
    size_t pending;
    int depth;    /* > 0 while done callbacks are being dispatched */
    bool closing; /* http_client_free() was called */
};

/* Global init */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static bool g_inited;

static int global_init(void)
{
    int r = 0;
    pthread_mutex_lock(&g_lock);
    if (!g_inited) {
        CURLcode cr = curl_global_init(CURL_GLOBAL_DEFAULT);
        if (cr != CURLE_OK) {
            log_error("http", "cannot initialise libcurl: %s", curl_easy_strerror(cr));
            r = -EIO;
        } else {
            g_inited = true;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

void http_global_cleanup(void)
{
    pthread_mutex_lock(&g_lock);
    if (g_inited) {
        curl_global_cleanup();
        g_inited = false;
    }
    pthread_mutex_unlock(&g_lock);
}

/* Lists */

static void req_link(struct http_client *c, struct http_req *r)
{
    r->prev = NULL;
    r->next = c->reqs;
    if (c->reqs)
        c->reqs->prev = r;
    c->reqs = r;
    c->pending++;
}

static void req_unlink(struct http_client *c, struct http_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        c->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    c->pending--;
}

static void sock_unlink_free(struct http_client *c, struct http_sock *s)
{
    ev_io_stop(c->loop, &s->io);
    if (s->prev)
        s->prev->next = s->next;
    else
        c->socks = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s);
}

static void req_free(struct http_req *r)
{
    if (!r)
        return;
    if (r->easy)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->headers);
    free(r->buf);
    free(r);
}

/* Completion */

static void describe_error(struct http_req *r, CURLcode res, struct http_response *resp, char *msg,
                           size_t msglen)
{
    const char *detail = r->errbuf[0] ? r->errbuf : curl_easy_strerror(res);
    if (r->not_service) {
        resp->kind = HTTP_ERR_TLS;
        snprintf(msg, msglen, "TLS: server certificate refused: %s", r->why_not_service);
        return;
    }
    switch (res) {
    case CURLE_OPERATION_TIMEDOUT:
        resp->kind = HTTP_ERR_TIMEOUT;
        snprintf(msg, msglen, "timed out after %ld ms", r->timeout_ms);
        break;
    case CURLE_PEER_FAILED_VERIFICATION:
        resp->kind = HTTP_ERR_TLS;
        snprintf(msg, msglen, "TLS: server certificate verify failed: %s", detail);
        break;
    case CURLE_SSL_CACERT_BADFILE:
        resp->kind = HTTP_ERR_TLS;
        snprintf(msg, msglen, "TLS: cannot use the CA file: %s", detail);
        break;
    case CURLE_SSL_CERTPROBLEM:
        resp->kind = HTTP_ERR_TLS;
        snprintf(msg, msglen, "TLS: cannot use our client certificate: %s", detail);
        break;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CLIENTCERT:
        resp->kind = HTTP_ERR_TLS;
        snprintf(msg, msglen, "TLS: %s", detail);
        break;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
        resp->kind = HTTP_ERR_CONNECT;
        snprintf(msg, msglen, "cannot connect: %s", detail);
        break;
    case CURLE_FILESIZE_EXCEEDED:
    case CURLE_WRITE_ERROR:
        if (res == CURLE_FILESIZE_EXCEEDED || r->too_large) {
            resp->kind = HTTP_ERR_TOO_LARGE;
            snprintf(msg, msglen, "response larger than %zu bytes refused", r->max);
            break;
        }
        /* fall through */
    default:
        resp->kind = HTTP_ERR_OTHER;
        if (r->errbuf[0])
            snprintf(msg, msglen, "%s: %s", curl_easy_strerror(res), r->errbuf);
        else
            snprintf(msg, msglen, "%s", curl_easy_strerror(res));
        break;
    }
}

/* Takes `r` out of the multi handle, tells its owner, frees it. */
static void req_finish(struct http_client *c, struct http_req *r, CURLcode res, bool cancelled)
{
    struct http_response resp;
    char msg[CURL_ERROR_SIZE + 128];

    req_unlink(c, r);
    curl_multi_remove_handle(c->multi, r->easy);

    memset(&resp, 0, sizeof(resp));
    resp.body = "";
    if (cancelled) {
        resp.kind = HTTP_ERR_CANCELLED;
        resp.error = "cancelled";
    } else {
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &resp.status);
        if (res == CURLE_OK) {
            curl_off_t ra = 0;
            if (curl_easy_getinfo(r->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
                resp.retry_after_s = (double)ra;
            if (r->buf) {
                r->buf[r->len] = '\0';
                resp.body = r->buf;
                resp.body_len = r->len;
            }
        } else {
            describe_error(r, res, &resp, msg, sizeof(msg));
            resp.error = msg;
        }
    }
    r->cb(&resp, r->ud);
    req_free(r);
}

static void client_destroy(struct http_client *c);

static void check_done(struct http_client *c)
{
    CURLMsg *m;
    int left;

    c->depth++;
    while (!c->closing && (m = curl_multi_info_read(c->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        /* The message dies with curl_multi_remove_handle(): copy what we need first. */
        CURL *easy = m->easy_handle;
        CURLcode res = m->data.result;
        char *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        if (priv)
            req_finish(c, (struct http_req *)(void *)priv, res, false);
    }
    c->depth--;
    if (c->closing && c->depth == 0)
        client_destroy(c);
}

/* libev side */

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct http_sock *s = (struct http_sock *)w;
    struct http_client *c = s->client;
    /* `s` may be freed by the socket callback during the action: keep the fd. */
    curl_socket_t fd = s->fd;
    int action =
        ((revents & EV_READ) ? CURL_CSELECT_IN : 0) | ((revents & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    int running = 0;
    (void)loop;
    curl_multi_socket_action(c->multi, fd, action, &running);
    check_done(c);
}

static void timer_ev_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct http_client *c = w->data;
    int running = 0;
    (void)loop;
    (void)revents;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(c);
}

/* libcurl side: these run inside libcurl and must not call back into it (except assign). */

static int curl_sock_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct http_client *c = userp;
    struct http_sock *s = socketp;
    (void)easy;

    if (what == CURL_POLL_REMOVE) {
        if (s)
            sock_unlink_free(c, s);
        return 0;
    }
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s)
            return -1; /* libcurl fails the transfers using this socket */
        s->client = c;
        s->fd = fd;
        s->next = c->socks;
        if (c->socks)
            c->socks->prev = s;
        c->socks = s;
        ev_io_init(&s->io, io_cb, fd, 0);
        curl_multi_assign(c->multi, fd, s);
    }
    int events = ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    ev_io_stop(c->loop, &s->io);
    ev_io_set(&s->io, fd, events);
    if (events)
        ev_io_start(c->loop, &s->io);
    return 0;
}

static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    struct http_client *c = userp;
    (void)multi;
    ev_timer_stop(c->loop, &c->timer);
    if (timeout_ms >= 0) {
        /* Even a 0 timeout goes through the loop: acting here would recurse into libcurl. */
        ev_timer_set(&c->timer, (double)timeout_ms / 1000.0, 0.0);
        ev_timer_start(c->loop, &c->timer);
    }
    return 0;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *ud)
{
    struct http_req *r = ud;
    size_t n = size * nmemb;
    if (n > r->max - r->len) {
        r->too_large = true;
        return 0; /* anything but n aborts the transfer */
    }
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n + 1)
            cap *= 2;
        if (cap > r->max + 1)
            cap = r->max + 1;
        char *nb = realloc(r->buf, cap);
        if (!nb)
            return 0;
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, data, n);
    r->len += n;
    return n;
}

/*
 * Runs once the TLS handshake is done (on a new or a reused connection) and
 * before the request goes out: the verified server must hold the service role.
 * A node certificate chains to the same CA and may even carry a matching name,
 * so without this check any enrolled user could pose as the login server and
 * collect passwords, or as a bootstrap server and steer newcomers.
 */
static int prereq_cb(void *ud, char *ip, char *local_ip, int primary_port, int local_port)
{
    struct http_req *r = ud;
    struct curl_tlssessioninfo *info = NULL;
    gnutls_x509_crt_t crt = NULL;
    struct peer_identity id;
    const gnutls_datum_t *peers = NULL;
    unsigned n = 0;
    char who[400];
    (void)ip;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    if (curl_easy_getinfo(r->easy, CURLINFO_TLS_SSL_PTR, &info) == CURLE_OK && info &&
        info->backend == CURLSSLBACKEND_GNUTLS && info->internals)
        peers = gnutls_certificate_get_peers((gnutls_session_t)info->internals, &n);
    const char *why = NULL;
    bool have_id = false;
    if (!peers || n == 0)
        why = "the server sent no certificate";
    else if (gnutls_x509_crt_init(&crt) < 0 ||
             gnutls_x509_crt_import(crt, &peers[0], GNUTLS_X509_FMT_DER) < 0 ||
             cred_identity(crt, &id) < 0)
        why = "its certificate is unreadable";
    else
        have_id = true;
    gnutls_x509_crt_deinit(crt);
    if (have_id && !(id.roles & ROLE_SERVICE))
        why = "it is no service certificate of the overlay";
    if (!why)
        return CURL_PREREQFUNC_OK;
    r->not_service = true;
    snprintf(r->why_not_service, sizeof(r->why_not_service), "%s%s%s", why, have_id ? ": " : "",
             have_id ? cred_identity_str(&id, who, sizeof(who)) : "");
    return CURL_PREREQFUNC_ABORT;
}

/* Client */

struct http_client *http_client_new(struct ev_loop *loop)
{
    struct http_client *c = NULL;
    if (!loop || global_init() < 0)
        return NULL;
    c = calloc(1, sizeof(*c));
    if (!c)
        goto fail;
    c->loop = loop;
    ev_timer_init(&c->timer, timer_ev_cb, 0.0, 0.0);
    c->timer.data = c;
    c->multi = curl_multi_init();
    if (!c->multi)
        goto fail;
    if (curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, curl_sock_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c) != CURLM_OK)
        goto fail;
    return c;
fail:
    if (c && c->multi)
        curl_multi_cleanup(c->multi);
    free(c);
    return NULL;
}

static void client_destroy(struct http_client *c)
{
    struct http_req *r;
    /* Callbacks below may call http_client_free() again: `closing` makes that a no-op. */
    c->depth++;
    while ((r = c->reqs))
        req_finish(c, r, CURLE_OK, true);
    curl_multi_cleanup(c->multi);
    /* After the cleanup: libcurl may still have (re)armed its timer while closing. */
    ev_timer_stop(c->loop, &c->timer);
    /* Idle connections libcurl closed without telling us, if any. */
    while (c->socks)
        sock_unlink_free(c, c->socks);
    free(c);
}

void http_client_free(struct http_client *c)
{
    if (!c || c->closing)
        return;
    c->closing = true;
    if (c->depth > 0)
        return; /* inside a done callback: check_done() finishes the job */
    client_destroy(c);
}

size_t http_client_pending(const struct http_client *c)
{
    return c ? c->pending : 0;
}

#define SETOPT(opt, val)                                                                           \
    do {                                                                                           \
        CURLcode cr_ = curl_easy_setopt(r->easy, opt, val);                                        \
        if (cr_ != CURLE_OK) {                                                                     \
            log_warn("http", "cannot set %s: %s", #opt, curl_easy_strerror(cr_));                  \
            goto fail;                                                                             \
        }                                                                                          \
    } while (0)

static int add_header(struct http_req *r, const char *h)
{
    struct curl_slist *n = curl_slist_append(r->headers, h);
    if (!n)
        return -ENOMEM;
    r->headers = n;
    return 0;
}

int http_request_start(struct http_client *c, const struct http_request *req, http_done_cb cb,
                       void *ud)
{
    struct http_req *r = NULL;
    int ret = -EIO;

    if (!c || !req || !cb)
        return -EINVAL;
    if (c->closing)
        return -ESHUTDOWN;
    if (!req->url || strncasecmp(req->url, "https://", 8) != 0) {
        log_warn("http", "refusing request to %s: only https:// URLs are allowed",
                 req->url ? req->url : "(no URL)");
        return -EINVAL;
    }
    if (req->insecure == (req->ca_file != NULL)) {
        log_warn("http", "refusing request to %s: give exactly one of a CA file and insecure",
                 req->url);
        return -EINVAL;
    }
    if ((req->cert_file == NULL) != (req->key_file == NULL) || (req->body_len && !req->body))
        return -EINVAL;
    const char *method = req->method ? req->method : "GET";

    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->client = c;
    r->cb = cb;
    r->ud = ud;
    r->max = req->max_response ? req->max_response : HTTP_DEFAULT_MAX_RESPONSE;
    if (r->max > HTTP_MAX_RESPONSE_LIMIT)
        r->max = HTTP_MAX_RESPONSE_LIMIT;
    r->timeout_ms = req->timeout_ms > 0 ? req->timeout_ms : HTTP_DEFAULT_TIMEOUT_MS;
    r->easy = curl_easy_init();
    if (!r->easy) {
        ret = -ENOMEM;
        goto fail;
    }

    SETOPT(CURLOPT_PRIVATE, (char *)r);
    SETOPT(CURLOPT_ERRORBUFFER, r->errbuf);
    SETOPT(CURLOPT_URL, req->url);
    SETOPT(CURLOPT_PROTOCOLS_STR, "https");
    SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
    SETOPT(CURLOPT_PROXY, ""); /* ignore *_proxy environment variables */
    SETOPT(CURLOPT_NOSIGNAL, 1L);
    SETOPT(CURLOPT_NOPROGRESS, 1L);
    SETOPT(CURLOPT_USERAGENT, "p2psip/" P2P_VERSION);
    SETOPT(CURLOPT_TIMEOUT_MS, r->timeout_ms);
    SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
    SETOPT(CURLOPT_WRITEDATA, r);
    /* Refuses early when Content-Length already says too much; write_cb catches the rest. */
    SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)r->max);
    SETOPT(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);

    if (req->insecure) {
        SETOPT(CURLOPT_SSL_VERIFYPEER, 0L);
        SETOPT(CURLOPT_SSL_VERIFYHOST, 0L);
        /*
         * An unverified connection or TLS session must never carry a later
         * verified request (the password!): use a fresh connection, close it
         * afterwards and keep no session to resume.
         */
        SETOPT(CURLOPT_FRESH_CONNECT, 1L);
        SETOPT(CURLOPT_FORBID_REUSE, 1L);
        SETOPT(CURLOPT_SSL_SESSIONID_CACHE, 0L);
        /* Nothing is verified, so load no trust: curl's GnuTLS backend otherwise reads the
         * whole system CA directory for every connection (~60 ms here, measured). */
        SETOPT(CURLOPT_CAINFO, (char *)NULL);
        SETOPT(CURLOPT_CAPATH, (char *)NULL);
    } else {
        SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
        SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
        SETOPT(CURLOPT_CAINFO, req->ca_file);
        /* Without this the built-in system CA directory is trusted as well. */
        SETOPT(CURLOPT_CAPATH, (char *)NULL);
        SETOPT(CURLOPT_PREREQFUNCTION, prereq_cb);
        SETOPT(CURLOPT_PREREQDATA, r);
    }
    if (req->cert_file) {
        SETOPT(CURLOPT_SSLCERT, req->cert_file);
        SETOPT(CURLOPT_SSLCERTTYPE, "PEM");
        SETOPT(CURLOPT_SSLKEY, req->key_file);
        SETOPT(CURLOPT_SSLKEYTYPE, "PEM");
    }

    /* "Expect: 100-continue" would only add a round trip (or a wait) for small bodies. */
    if ((ret = add_header(r, "Expect:")) < 0)
        goto fail;
    if (req->content_type) {
        char h[256];
        int n = snprintf(h, sizeof(h), "Content-Type: %s", req->content_type);
        if (n < 0 || (size_t)n >= sizeof(h) || strpbrk(req->content_type, "\r\n")) {
            ret = -EINVAL;
            goto fail;
        }
        if ((ret = add_header(r, h)) < 0)
            goto fail;
    }
    ret = -EIO;
    SETOPT(CURLOPT_HTTPHEADER, r->headers);

    if (!strcmp(method, "GET") && !req->body) {
        SETOPT(CURLOPT_HTTPGET, 1L);
    } else {
        if (strcmp(method, "POST") != 0)
            SETOPT(CURLOPT_CUSTOMREQUEST, method);
        SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
        SETOPT(CURLOPT_COPYPOSTFIELDS, req->body ? req->body : "");
    }

    req_link(c, r);
    CURLMcode mr = curl_multi_add_handle(c->multi, r->easy);
    if (mr != CURLM_OK) {
        log_warn("http", "cannot start request to %s: %s", req->url, curl_multi_strerror(mr));
        req_unlink(c, r);
        goto fail;
    }
    return 0;
fail:
    req_free(r);
    return ret;
}
