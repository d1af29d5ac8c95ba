/*
 * TLS 1.3 transport for framed messages (see conn.h for the contract).
 *
 * Each connection is one state machine driven by three libev watchers: a
 * read watcher, a write watcher that is active only while something waits to
 * be written, and one timer whose meaning follows the state (connect +
 * handshake + hello deadline, then idle deadline, then closing deadline).
 * GnuTLS runs non-blocking on the socket; whenever it says E_AGAIN we go back
 * to the loop and repeat the very same call when the socket is ready.
 *
 * Callbacks into the user may close the connection at any moment, so every
 * entry point from the loop holds a reference (depth) and the struct is only
 * freed when the outermost one returns. on_close is never called from inside
 * conn_close(), conn_send() or any other function the user calls: a close
 * the user asks for completes from the loop.
 *
 * Closing is done with care for the peer: queued frames and close_notify go
 * out first, then our side of the TCP stream is shut down and whatever the
 * peer still sends is read and dropped until it closes too ("lingering
 * close"). Closing a socket with unread data makes the kernel send a reset,
 * and a reset can destroy an alert or error frame the peer has not read yet;
 * the peer would then see "connection reset" instead of the reason.
 */
#include "conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "crl.h"
#include "log.h"
#include "version.h"

#define TLS_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3"
/* GnuTLS 3.7 has no DTLS 1.3; 1.2 with ECDHE and AEAD suites only. */
#define DTLS_PRIORITY                                                                              \
    "NORMAL:-VERS-ALL:+VERS-DTLS1.2:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:-KX-" \
    "ALL:+ECDHE-ECDSA"
#define DEF_HANDSHAKE_MS 10000u
#define DEF_WQUEUE       (1024u * 1024u)
#define LINGER_MAX_MS    2000u
#define READ_CHUNK       16384 /* one TLS record's worth of plaintext */
#define COALESCE_MAX     16384 /* queued frames joined into one record up to this */
#define READS_PER_WAKEUP 64    /* then yield to other connections */
#define ACCEPT_PAUSE_S   0.5   /* back-off when out of file descriptors */
#define DEF_MAX_HS       512u  /* connections handshaking per listener */
#define DEF_MAX_HS_SRC   64u   /* ...from one source address */
#define DEF_MAX_PER_ID   4u    /* links per certificate identity per listener */
#define FD_RESERVE_MAX   64    /* descriptors an accept leaves free for outgoing connections */
#define REFUSAL_LOG_S    10.0  /* at most one summary line of refusals per listener this often */
#define ZERO_TID         "0000000000000000"
#define COMPONENT        "tls"

struct tls_ctx {
    gnutls_certificate_credentials_t xcred;
    gnutls_priority_t prio;
    gnutls_priority_t dtls_prio; /* made at the first DTLS session */
    /* DTLS clients: GnuTLS 3.7 has no DTLS 1.3, and a DTLS 1.2 client finds no certificate of
     * its own that fits a certificate request when its key is Ed25519 (TLS 1.2 certificate
     * types know no EdDSA), though the server takes one. So DTLS clients hand theirs over
     * from a callback, from credentials of their own. */
    gnutls_certificate_credentials_t dtls_cli;
    gnutls_pcert_st pcert;
    gnutls_privkey_t pkey;
    bool have_pcert;
    struct peer_identity self;
    char overlay[MSG_OVERLAY_MAX + 1];
    unsigned hs_ms, idle_ms;
    size_t max_frame, max_wqueue;
    bool local_links;
    unsigned max_hs, max_hs_src, max_per_id;
};

/* A queued frame. The buffer never moves while GnuTLS may retry sending it. */
struct wchunk {
    struct wchunk *next;
    uint8_t *data;
    size_t len, off;
    bool tried; /* handed to GnuTLS once: its pointer and length are fixed from then on */
};

enum close_mode {
    CLOSE_GRACEFUL, /* flush, close_notify, then linger */
    CLOSE_LINGER,   /* something (an alert) was sent: shut down and linger */
    CLOSE_ABORT,    /* nothing more to say: close the socket now */
};

struct conn {
    struct ev_loop *loop;
    struct tls_ctx *ctx;
    gnutls_session_t s;
    int fd;
    bool outgoing;
    enum conn_state state;
    ev_io rio, wio;
    ev_prepare flush; /* frames queued this loop iteration are written before it polls */
    ev_timer timer;
    ev_tstamp last_rx;

    struct conn_cbs cbs;
    void *ud;
    char addr[64];
    bool opened; /* reached OPEN: the peer identity is vouched for */
    struct peer_identity peer;
    /* Revocation (crl.h): the peer certificate's serial and issuer, and the list generation
     * it was last checked against; sockets past TLS are in this thread's `tls_links`. */
    struct crl_ref crl_ref;
    uint64_t crl_gen;
    struct conn *tl_next, *tl_prev;
    bool in_tls_links;

    uint8_t *rbuf; /* partial frame carried over between records */
    size_t rlen, rcap;

    struct wchunk *whead, *wtail;
    size_t wbytes;
    bool want_drain;

    /* A link to a listener of this process, on this loop (conn_connect to our own address):
     * no socket and no TLS, messages handed over as JSON (see "Links within the process"). */
    struct conn *twin;           /* the other end while both are open; NULL for sockets */
    bool local, twin_gone;       /* local: fd is -1; twin_gone: the other end closed */
    struct lmsg *inq, *inq_tail; /* messages from the twin, delivered from `deliver` */
    size_t inq_n;
    ev_timer deliver;

    /* Accepted connections are counted by their listener while it lives (see "Listener"). */
    struct listener *lst;
    struct conn *hs_next, *hs_prev; /* in lst's list of handshakes (HANDSHAKING, HELLO) */
    struct conn *id_next, *id_prev; /* in lst's list of links past TLS (HELLO, OPEN) */
    bool in_hs, in_id;
    uint8_t src[CONN_SRC_KEY_LEN];

    int depth; /* entry points and callbacks running on this conn */
    bool graceful, lingering;
    enum conn_close_reason reason;
    char detail[256];
};

struct listener {
    struct listener *next_local; /* every listener of this thread, for local links */
    struct ev_loop *loop;
    struct tls_ctx *ctx;
    int fd;
    int port;
    struct sockaddr_storage bound;
    ev_io io;
    ev_timer pause;
    struct conn_cbs cbs;
    void *ud;
    char addr[64];
    struct conn *hs_head, *id_head;
    unsigned n_hs;
    struct conn_refusals refused;
    bool out_of_fds;         /* accept failed for lack of descriptors; logged once */
    unsigned long fd_pauses; /* pauses in this episode */
    rlim_t fd_limit;         /* RLIMIT_NOFILE as last read */
};

/* Links within the process (defined with them, below). */
struct lmsg;
static _Thread_local struct listener *local_listeners;
/* Socket links of this thread past their TLS handshake (HELLO, OPEN): what a new revocation
 * list is checked against (conn_close_revoked()). */
static _Thread_local struct conn *tls_links;
static void local_unpair(struct conn *c);
static void lmsg_free_all(struct conn *c);
static void on_deliver(struct ev_loop *loop, ev_timer *w, int revents);
static int local_send_frame(struct conn *c, const uint8_t *frame, size_t len);

static const char *const state_names[] = {"CONNECTING", "HANDSHAKING", "HELLO",
                                          "OPEN",       "CLOSING",     "CLOSED"};
static const char *const reason_names[] = {
    "closed locally",           "closed by peer",          "connect failed", "TLS error",
    "peer certificate refused", "our certificate refused", "timeout",        "idle timeout",
    "protocol error",           "error from peer",         "I/O error"};

const char *conn_state_str(enum conn_state s)
{
    return (unsigned)s < sizeof(state_names) / sizeof(state_names[0]) ? state_names[s] : "?";
}

const char *conn_close_reason_str(enum conn_close_reason r)
{
    return (unsigned)r < sizeof(reason_names) / sizeof(reason_names[0]) ? reason_names[r] : "?";
}

/* ---- Addresses ---------------------------------------------------------------------------- */

/* "host:port" or "[v6]:port" into its parts; numeric only. */
static int parse_hostport(const char *hp, bool passive, struct addrinfo **out, char *err,
                          size_t errlen)
{
    char host[INET6_ADDRSTRLEN + 8];
    const char *port;
    size_t hlen;

    if (!hp || !*hp) {
        snprintf(err, errlen, "empty address");
        return -1;
    }
    if (hp[0] == '[') {
        const char *end = strchr(hp, ']');
        if (!end || end[1] != ':') {
            snprintf(err, errlen, "bad address \"%s\": expected [v6-address]:port", hp);
            return -1;
        }
        hlen = (size_t)(end - hp - 1);
        if (hlen >= sizeof(host))
            goto bad;
        memcpy(host, hp + 1, hlen);
        port = end + 2;
    } else {
        const char *colon = strrchr(hp, ':');
        if (!colon) {
            snprintf(err, errlen, "bad address \"%s\": expected host:port", hp);
            return -1;
        }
        hlen = (size_t)(colon - hp);
        if (hlen >= sizeof(host) || memchr(hp, ':', hlen))
            goto bad;
        memcpy(host, hp, hlen);
        port = colon + 1;
    }
    host[hlen] = '\0';
    if (!*port || strspn(port, "0123456789") != strlen(port) || strlen(port) > 5 ||
        atoi(port) > 65535)
        goto bad;

    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags =
                                 AI_NUMERICHOST | AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)};
    int r = getaddrinfo(host, port, &hints, out);
    if (r != 0) {
        snprintf(err, errlen, "bad address \"%s\": %s (numeric addresses only)", hp,
                 gai_strerror(r));
        return -1;
    }
    return 0;
bad:
    snprintf(err, errlen, "bad address \"%s\": expected host:port with a numeric host and port",
             hp);
    return -1;
}

static void format_addr(const struct sockaddr *sa, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
        snprintf(buf, len, "%s:%u", ip, ntohs(in->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        snprintf(buf, len, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        snprintf(buf, len, "?");
    }
}

static void set_nodelay(int fd)
{
    int one = 1;
    /* Frames are small and latency matters more than packet count. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* ---- Context ------------------------------------------------------------------------------ */

static int load_file(const char *what, const char *path, gnutls_datum_t *out, char *err,
                     size_t errlen)
{
    errno = 0;
    if (gnutls_load_file(path, out) < 0) {
        snprintf(err, errlen, "cannot read %s %s: %s", what, path, strerror(errno ? errno : EIO));
        return -1;
    }
    return 0;
}

/* A DTLS client's certificate, whatever the request asked for (the server checks it). */
static int dtls_client_cert(gnutls_session_t s, const gnutls_datum_t *req_ca, int nreq,
                            const gnutls_pk_algorithm_t *algos, int nalgos, gnutls_pcert_st **pcert,
                            unsigned *npcert, gnutls_privkey_t *key)
{
    (void)req_ca, (void)nreq, (void)algos, (void)nalgos;
    struct tls_ctx *ctx = gnutls_session_get_ptr(s);
    *pcert = &ctx->pcert;
    *npcert = 1;
    *key = ctx->pkey;
    return 0;
}

struct tls_ctx *tls_ctx_new(const struct tls_config *cfg, char *err, size_t errlen)
{
    struct tls_ctx *ctx = NULL;
    gnutls_datum_t cert_pem = {NULL, 0}, key_pem = {NULL, 0}, ca_pem = {NULL, 0};
    gnutls_x509_crt_t crt = NULL;
    gnutls_x509_privkey_t key = NULL;
    const char *errpos = NULL;
    int r;

    if (!cfg || !cfg->ca_file || !cfg->cert_file || !cfg->key_file || !cfg->overlay) {
        snprintf(err, errlen,
                 "TLS configuration incomplete: CA, certificate, key and overlay "
                 "are all required");
        return NULL;
    }
    if (!cfg->overlay[0] || strlen(cfg->overlay) > MSG_OVERLAY_MAX) {
        snprintf(err, errlen, "overlay name must be 1 to %d characters", MSG_OVERLAY_MAX);
        return NULL;
    }
    if (cfg->max_frame > MSG_MAX_FRAME_LIMIT) {
        snprintf(err, errlen, "max_frame %zu above the limit %d", cfg->max_frame,
                 MSG_MAX_FRAME_LIMIT);
        return NULL;
    }
    ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    snprintf(ctx->overlay, sizeof(ctx->overlay), "%s", cfg->overlay);
    ctx->hs_ms = cfg->handshake_timeout_ms ? cfg->handshake_timeout_ms : DEF_HANDSHAKE_MS;
    ctx->idle_ms = cfg->idle_timeout_ms;
    ctx->max_frame = cfg->max_frame ? cfg->max_frame : MSG_MAX_FRAME_DEF;
    ctx->max_wqueue = cfg->max_wqueue ? cfg->max_wqueue : DEF_WQUEUE;
    ctx->local_links = cfg->local_links;
    ctx->max_hs = cfg->max_handshaking ? cfg->max_handshaking : DEF_MAX_HS;
    ctx->max_hs_src =
        cfg->max_handshaking_per_addr ? cfg->max_handshaking_per_addr : DEF_MAX_HS_SRC;
    ctx->max_per_id = cfg->max_links_per_identity ? cfg->max_links_per_identity : DEF_MAX_PER_ID;

    /* Our certificate: read it ourselves first so that errors name the file. */
    if (load_file("certificate", cfg->cert_file, &cert_pem, err, errlen) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_init(&crt)) < 0 ||
        (r = gnutls_x509_crt_import(crt, &cert_pem, GNUTLS_X509_FMT_PEM)) < 0) {
        snprintf(err, errlen, "cannot load certificate %s: %s", cfg->cert_file, gnutls_strerror(r));
        goto fail;
    }
    if ((r = cred_identity(crt, &ctx->self)) < 0) {
        snprintf(err, errlen, "cannot read the identity in certificate %s: %s", cfg->cert_file,
                 gnutls_strerror(r));
        goto fail;
    }
    if (load_file("key", cfg->key_file, &key_pem, err, errlen) < 0)
        goto fail;
    if ((r = gnutls_x509_privkey_init(&key)) < 0 ||
        (r = gnutls_x509_privkey_import2(key, &key_pem, GNUTLS_X509_FMT_PEM, NULL,
                                         GNUTLS_PKCS_PLAIN)) < 0) {
        snprintf(err, errlen, "cannot load key %s: %s", cfg->key_file, gnutls_strerror(r));
        goto fail;
    }
    /* GnuTLS does not notice an Ed25519 key that belongs to another certificate. */
    unsigned char id1[64], id2[64];
    size_t l1 = sizeof(id1), l2 = sizeof(id2);
    if (gnutls_x509_crt_get_key_id(crt, GNUTLS_KEYID_USE_SHA256, id1, &l1) < 0 ||
        gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, id2, &l2) < 0 || l1 != l2 ||
        memcmp(id1, id2, l1) != 0) {
        snprintf(err, errlen, "certificate %s does not match key %s", cfg->cert_file,
                 cfg->key_file);
        goto fail;
    }
    if (load_file("CA file", cfg->ca_file, &ca_pem, err, errlen) < 0)
        goto fail;

    if ((r = gnutls_certificate_allocate_credentials(&ctx->xcred)) < 0) {
        snprintf(err, errlen, "cannot allocate TLS credentials: %s", gnutls_strerror(r));
        goto fail;
    }
    r = gnutls_certificate_set_x509_trust_mem(ctx->xcred, &ca_pem, GNUTLS_X509_FMT_PEM);
    if (r <= 0) {
        snprintf(err, errlen, "cannot load CA certificates from %s: %s", cfg->ca_file,
                 r == 0 ? "no certificate in the file" : gnutls_strerror(r));
        goto fail;
    }
    r = gnutls_certificate_set_x509_key_mem2(ctx->xcred, &cert_pem, &key_pem, GNUTLS_X509_FMT_PEM,
                                             NULL, GNUTLS_PKCS_PLAIN);
    if (r < 0) {
        if (r == GNUTLS_E_CERTIFICATE_KEY_MISMATCH)
            snprintf(err, errlen, "certificate %s does not match key %s", cfg->cert_file,
                     cfg->key_file);
        else
            snprintf(err, errlen, "cannot use certificate %s with key %s: %s", cfg->cert_file,
                     cfg->key_file, gnutls_strerror(r));
        goto fail;
    }
    if ((r = gnutls_certificate_allocate_credentials(&ctx->dtls_cli)) < 0 ||
        (r = gnutls_certificate_set_x509_trust_mem(ctx->dtls_cli, &ca_pem, GNUTLS_X509_FMT_PEM)) <
            0 ||
        (r = gnutls_pcert_import_x509_raw(&ctx->pcert, &cert_pem, GNUTLS_X509_FMT_PEM, 0)) < 0) {
        snprintf(err, errlen, "cannot set up DTLS credentials from %s: %s", cfg->cert_file,
                 gnutls_strerror(r));
        goto fail;
    }
    ctx->have_pcert = true;
    if ((r = gnutls_privkey_init(&ctx->pkey)) < 0 ||
        (r = gnutls_privkey_import_x509_raw(ctx->pkey, &key_pem, GNUTLS_X509_FMT_PEM, NULL, 0)) <
            0) {
        snprintf(err, errlen, "cannot load key %s for DTLS: %s", cfg->key_file, gnutls_strerror(r));
        goto fail;
    }
    gnutls_certificate_set_retrieve_function2(ctx->dtls_cli, dtls_client_cert);
    if ((r = gnutls_priority_init(&ctx->prio, TLS_PRIORITY, &errpos)) < 0) {
        snprintf(err, errlen, "TLS priority string rejected at \"%s\": %s", errpos ? errpos : "?",
                 gnutls_strerror(r));
        goto fail;
    }

    /* Not fatal, but an operator wants to know before peers start refusing us. */
    time_t now = time(NULL);
    if (ctx->self.not_after < now)
        log_warn(COMPONENT, "our certificate %s expired; peers will refuse it", cfg->cert_file);
    else if (ctx->self.not_before > now)
        log_warn(COMPONENT, "our certificate %s is not valid yet; peers will refuse it",
                 cfg->cert_file);

    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
    gnutls_memset(key_pem.data, 0, key_pem.size);
    gnutls_free(key_pem.data);
    gnutls_free(cert_pem.data);
    gnutls_free(ca_pem.data);
    return ctx;
fail:
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
    if (key_pem.data)
        gnutls_memset(key_pem.data, 0, key_pem.size);
    gnutls_free(key_pem.data);
    gnutls_free(cert_pem.data);
    gnutls_free(ca_pem.data);
    tls_ctx_free(ctx);
    return NULL;
}

void tls_ctx_free(struct tls_ctx *ctx)
{
    if (!ctx)
        return;
    if (ctx->prio)
        gnutls_priority_deinit(ctx->prio);
    if (ctx->dtls_prio)
        gnutls_priority_deinit(ctx->dtls_prio);
    if (ctx->dtls_cli)
        gnutls_certificate_free_credentials(ctx->dtls_cli);
    if (ctx->have_pcert)
        gnutls_pcert_deinit(&ctx->pcert);
    if (ctx->pkey)
        gnutls_privkey_deinit(ctx->pkey);
    if (ctx->xcred)
        gnutls_certificate_free_credentials(ctx->xcred);
    free(ctx);
}

const struct peer_identity *tls_ctx_identity(const struct tls_ctx *ctx)
{
    return &ctx->self;
}

/* ---- Connection basics -------------------------------------------------------------------- */

static void lst_leave_hs(struct conn *c);
static void lst_detach(struct conn *c);

static void tls_links_join(struct conn *c)
{
    if (c->in_tls_links)
        return;
    c->tl_prev = NULL;
    c->tl_next = tls_links;
    if (tls_links)
        tls_links->tl_prev = c;
    tls_links = c;
    c->in_tls_links = true;
}

static void tls_links_leave(struct conn *c)
{
    if (!c->in_tls_links)
        return;
    if (c->tl_prev)
        c->tl_prev->tl_next = c->tl_next;
    else
        tls_links = c->tl_next;
    if (c->tl_next)
        c->tl_next->tl_prev = c->tl_prev;
    c->tl_next = c->tl_prev = NULL;
    c->in_tls_links = false;
}

static void conn_set_state(struct conn *c, enum conn_state st)
{
    log_debug(COMPONENT, "%s: %s -> %s", c->addr, conn_state_str(c->state), conn_state_str(st));
    c->state = st;
    /* A listener counts a handshake until OPEN, and a link until it starts closing. */
    if (st >= CONN_OPEN)
        lst_leave_hs(c);
    if (st >= CONN_CLOSING) {
        lst_detach(c);
        tls_links_leave(c);
    }
}

static void conn_destroy(struct conn *c)
{
    lmsg_free_all(c);
    struct wchunk *ch = c->whead;
    while (ch) {
        struct wchunk *next = ch->next;
        free(ch->data);
        free(ch);
        ch = next;
    }
    if (c->s)
        gnutls_deinit(c->s);
    free(c->rbuf);
    free(c);
}

static void conn_enter(struct conn *c)
{
    c->depth++;
}

/* The struct may be gone after this returns. */
static void conn_leave(struct conn *c)
{
    if (--c->depth == 0 && c->state == CONN_CLOSED)
        conn_destroy(c);
}

static void set_wio(struct conn *c, bool on)
{
    if (on && !ev_is_active(&c->wio))
        ev_io_start(c->loop, &c->wio);
    else if (!on && ev_is_active(&c->wio))
        ev_io_stop(c->loop, &c->wio);
}

static void set_rio(struct conn *c, bool on)
{
    if (on && !ev_is_active(&c->rio))
        ev_io_start(c->loop, &c->rio);
    else if (!on && ev_is_active(&c->rio))
        ev_io_stop(c->loop, &c->rio);
}

static void arm_timer(struct conn *c, double seconds)
{
    ev_timer_stop(c->loop, &c->timer);
    ev_timer_set(&c->timer, seconds, 0.);
    ev_timer_start(c->loop, &c->timer);
}

static void log_closed(struct conn *c)
{
    const char *d = c->detail[0] ? c->detail : conn_close_reason_str(c->reason);
    switch (c->reason) {
    case CONN_CLOSED_LOCAL:
    case CONN_CLOSED_REMOTE:
        log_debug(COMPONENT, "%s: connection closed (%s)", c->addr, d);
        break;
    case CONN_ERR_PEER_CERT:
    case CONN_ERR_REJECTED:
    case CONN_ERR_PROTOCOL:
    case CONN_ERR_PEER_ERROR:
        log_warn(COMPONENT, "%s: %s", c->addr, d);
        break;
    default:
        log_info(COMPONENT, "%s: %s", c->addr, d);
        break;
    }
}

/* Closes the socket and makes the one on_close call. Only from loop entry points. */
static void finish(struct conn *c)
{
    if (c->state == CONN_CLOSED)
        return;
    ev_io_stop(c->loop, &c->rio);
    ev_io_stop(c->loop, &c->wio);
    ev_prepare_stop(c->loop, &c->flush);
    ev_timer_stop(c->loop, &c->timer);
    ev_timer_stop(c->loop, &c->deliver);
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    local_unpair(c);
    conn_set_state(c, CONN_CLOSED);
    log_closed(c);
    if (c->cbs.on_close) {
        conn_enter(c);
        c->cbs.on_close(c, c->reason, c->detail, c->ud);
        conn_leave(c);
    }
}

static void start_linger(struct conn *c)
{
    c->lingering = true;
    shutdown(c->fd, SHUT_WR);
    set_wio(c, false);
    set_rio(c, true);
    unsigned ms = c->ctx->hs_ms < LINGER_MAX_MS ? c->ctx->hs_ms : LINGER_MAX_MS;
    arm_timer(c, ms / 1000.);
}

/*
 * Starts closing. The first reason given is the one reported: whatever goes
 * wrong while closing (the peer resetting, say) is a consequence of it.
 */
static void begin_close(struct conn *c, enum conn_close_reason reason, enum close_mode mode,
                        const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void begin_close(struct conn *c, enum conn_close_reason reason, enum close_mode mode,
                        const char *fmt, ...)
{
    if (c->state >= CONN_CLOSING)
        return;
    enum conn_state old = c->state;
    c->reason = reason;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->detail, sizeof(c->detail), fmt, ap);
    va_end(ap);
    conn_set_state(c, CONN_CLOSING);

    bool tls_up = old == CONN_HELLO || old == CONN_OPEN;
    if (c->local) {
        /* What it sent is already with its twin, which is told after it has taken it. */
        arm_timer(c, 0.);
    } else if (mode == CLOSE_GRACEFUL && tls_up) {
        c->graceful = true;
        set_rio(c, false);
        set_wio(c, true); /* the write side drives flush + close_notify */
        arm_timer(c, c->ctx->hs_ms / 1000.);
    } else if (mode != CLOSE_ABORT && old >= CONN_HANDSHAKING && c->fd >= 0) {
        start_linger(c);
    } else {
        /* Finish from the loop, never from inside the caller's call. */
        set_rio(c, false);
        set_wio(c, false);
        arm_timer(c, 0.);
    }
}

/* ---- Writing ------------------------------------------------------------------------------ */

static int queue_take(struct conn *c, uint8_t *data, size_t len)
{
    struct wchunk *ch = malloc(sizeof(*ch));
    if (!ch) {
        free(data);
        return -1;
    }
    ch->next = NULL;
    ch->data = data;
    ch->len = len;
    ch->off = 0;
    ch->tried = false;
    if (c->wtail)
        c->wtail->next = ch;
    else
        c->whead = ch;
    c->wtail = ch;
    c->wbytes += len;
    return 0;
}

/* Frames queued back to back leave in one TLS record (and one sendmsg) when they fit: the
 * head chunk, not yet handed to GnuTLS, takes in the chunks after it. On failure to allocate,
 * the chunks simply go one by one. */
static void coalesce(struct conn *c)
{
    struct wchunk *h = c->whead;
    if (!h || h->tried || !h->next || h->len + h->next->len > COALESCE_MAX)
        return;
    size_t total = h->len;
    struct wchunk *end = h->next;
    while (end && total + end->len <= COALESCE_MAX) {
        total += end->len;
        end = end->next;
    }
    uint8_t *buf = malloc(total);
    if (!buf)
        return;
    size_t at = 0;
    for (struct wchunk *x = h; x != end;) {
        struct wchunk *next = x->next;
        memcpy(buf + at, x->data, x->len);
        at += x->len;
        free(x->data);
        if (x != h)
            free(x);
        x = next;
    }
    h->data = buf;
    h->len = total;
    h->next = end;
    if (!end)
        c->wtail = h;
}

/* 0: queue empty; 1: blocked (E_AGAIN); <0: GnuTLS error. */
static int flush(struct conn *c)
{
    while (c->whead) {
        coalesce(c);
        struct wchunk *ch = c->whead;
        /* After E_AGAIN this repeats the exact same pointer and length, as GnuTLS requires. */
        ch->tried = true;
        ssize_t n = gnutls_record_send(c->s, ch->data + ch->off, ch->len - ch->off);
        if (n == GNUTLS_E_AGAIN)
            return 1;
        if (n == GNUTLS_E_INTERRUPTED)
            continue;
        if (n < 0)
            return (int)n;
        ch->off += (size_t)n;
        c->wbytes -= (size_t)n;
        if (ch->off == ch->len) {
            c->whead = ch->next;
            if (!c->whead)
                c->wtail = NULL;
            free(ch->data);
            free(ch);
        }
    }
    return 0;
}

static void write_some(struct conn *c)
{
    int r = flush(c);
    if (r < 0) {
        begin_close(c, CONN_ERR_IO, CLOSE_ABORT, "send failed: %s", gnutls_strerror(r));
        return;
    }
    set_wio(c, r == 1 || c->whead);
    if (c->want_drain && c->wbytes <= c->ctx->max_wqueue / 2 && c->state == CONN_OPEN) {
        c->want_drain = false;
        if (c->cbs.on_drain)
            c->cbs.on_drain(c, c->ud);
    }
}

/* Flush + close_notify + linger, step by step as the socket allows. */
static void closing_step(struct conn *c)
{
    int r = flush(c);
    if (r == 1) {
        set_wio(c, true);
        return;
    }
    if (r < 0) {
        finish(c);
        return;
    }
    r = gnutls_bye(c->s, GNUTLS_SHUT_WR);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
        set_wio(c, true);
        return;
    }
    if (r < 0) {
        finish(c);
        return;
    }
    start_linger(c);
}

static void linger_read(struct conn *c)
{
    char buf[4096];
    for (int i = 0; i < READS_PER_WAKEUP; i++) {
        ssize_t n = read(c->fd, buf, sizeof(buf));
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        finish(c); /* EOF or error: the peer is done */
        return;
    }
}

/* ---- Reading ------------------------------------------------------------------------------ */

static void queue_error_frame(struct conn *c, const char *tid, const char *code, const char *reason)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    if (msg_encode_error(c->ctx->overlay, tid, code, reason, c->ctx->max_frame, &buf, &len) !=
        MSG_OK)
        return;
    if (c->local) { /* the same error, handed over in memory */
        if (c->state == CONN_OPEN)
            local_send_frame(c, buf, len);
        free(buf);
        return;
    }
    /* Never beyond the bound: a peer that does not read would not get it anyway. */
    if (c->wbytes + len > c->ctx->max_wqueue) {
        free(buf);
        return;
    }
    queue_take(c, buf, len);
}

static void protocol_error(struct conn *c, int status, const char *detail)
{
    const char *code = msg_status_code(status);
    queue_error_frame(c, NULL, code, detail);
    begin_close(c, CONN_ERR_PROTOCOL, CLOSE_GRACEFUL, "malformed frame from peer: %s: %s", code,
                detail);
}

static void peer_error(struct conn *c, const struct msg *m)
{
    const char *code = json_string_value(json_object_get(m->body, "code"));
    const char *reason = json_string_value(json_object_get(m->body, "reason"));
    begin_close(c, CONN_ERR_PEER_ERROR, CLOSE_GRACEFUL, "%s: %s", code ? code : "unknown",
                reason ? reason : "");
}

static void enter_open(struct conn *c)
{
    char who[512];
    conn_set_state(c, CONN_OPEN);
    c->opened = true;
    ev_timer_stop(c->loop, &c->timer);
    if (c->ctx->idle_ms) {
        c->last_rx = ev_now(c->loop);
        arm_timer(c, c->ctx->idle_ms / 1000.);
    }
    log_info(COMPONENT, "%s: %s connection open to %s", c->addr,
             c->outgoing ? "outgoing" : "incoming", cred_identity_str(&c->peer, who, sizeof(who)));
    if (c->cbs.on_open)
        c->cbs.on_open(c, c->ud);
}

/*
 * Whether the revocation list now revokes the peer, checked again only when the list changed
 * since the last time. An open link whose peer is revoked gets an err frame (zero tid, code
 * "certificate-revoked") and is closed; our own log line names the peer and says revoked.
 * True when it closed the link.
 */
static bool close_if_revoked(struct conn *c)
{
    if (c->local || c->state < CONN_HELLO || c->state >= CONN_CLOSING)
        return false;
    uint64_t gen = crl_generation();
    if (c->crl_gen == gen)
        return false;
    c->crl_gen = gen;
    if (!crl_ref_revoked(&c->crl_ref))
        return false;
    char who[512], serial[2 * CRL_SERIAL_MAX + 1];
    cred_identity_str(&c->peer, who, sizeof(who));
    crl_ref_serial_hex(&c->crl_ref, serial, sizeof(serial));
    queue_error_frame(c, NULL, "certificate-revoked",
                      "your certificate is on the overlay CA's revocation list");
    begin_close(c, CONN_ERR_PEER_CERT, CLOSE_GRACEFUL,
                "peer certificate refused: %s (serial %s) is revoked; link closed", who, serial);
    return true;
}

int conn_close_revoked(void)
{
    int n = 0;
    for (struct conn *c = tls_links, *next; c; c = next) {
        next = c->tl_next; /* closing takes c out of the list */
        n += close_if_revoked(c);
    }
    return n;
}

static void handle_msg(struct conn *c, const struct msg *m)
{
    /* A list taken since the last message (conn_close_revoked() runs when the renewer takes
     * one; this covers lists set any other way). */
    if (close_if_revoked(c))
        return;
    if (c->state == CONN_HELLO) {
        if (m->kind == MSG_ERR) {
            peer_error(c, m);
        } else if (strcmp(m->type, "hello") != 0 || m->kind != MSG_IND) {
            char why[96];
            snprintf(why, sizeof(why), "expected a hello indication first, got %s %s", m->type,
                     msg_kind_name(m->kind));
            queue_error_frame(c, m->tid, "expected-hello", why);
            begin_close(c, CONN_ERR_PROTOCOL, CLOSE_GRACEFUL, "protocol error: %s", why);
        } else {
            const char *agent = json_string_value(json_object_get(m->body, "agent"));
            log_debug(COMPONENT, "%s: hello from %s", c->addr, agent ? agent : "?");
            enter_open(c);
        }
        return;
    }
    if (m->kind == MSG_ERR && strcmp(m->tid, ZERO_TID) == 0) {
        peer_error(c, m); /* a complaint about the connection, not an answer */
        return;
    }
    if (strcmp(m->type, "hello") == 0)
        return; /* a repeated hello changes nothing */
    if (c->cbs.on_message)
        c->cbs.on_message(c, m, c->ud);
}

/* Handles every complete frame in p[0..len); returns the bytes consumed. */
static size_t process_frames(struct conn *c, const uint8_t *p, size_t len)
{
    size_t off = 0;
    while (c->state == CONN_HELLO || c->state == CONN_OPEN) {
        size_t flen = 0;
        int st = msg_frame_peek(p + off, len - off, c->ctx->max_frame, &flen);
        if (st == MSG_E_INCOMPLETE)
            break;
        if (st != MSG_OK) {
            char detail[96];
            if (st == MSG_E_OVERSIZE && len - off >= MSG_LEN_PREFIX) {
                const uint8_t *q = p + off;
                unsigned long declared = ((unsigned long)q[0] << 24) | ((unsigned long)q[1] << 16) |
                                         ((unsigned long)q[2] << 8) | q[3];
                snprintf(detail, sizeof(detail), "declared length %lu above the maximum %zu",
                         declared, c->ctx->max_frame);
            } else {
                snprintf(detail, sizeof(detail), "%s", msg_strerror(st));
            }
            protocol_error(c, st, detail);
            return len; /* nothing after a framing error can be trusted */
        }
        struct msg m;
        struct msg_error merr = {0};
        st = msg_decode_payload(p + off + MSG_LEN_PREFIX, flen - MSG_LEN_PREFIX, c->ctx->overlay,
                                &m, &merr);
        off += flen;
        if (st != MSG_OK) {
            protocol_error(c, st, merr.detail[0] ? merr.detail : msg_strerror(st));
            return len;
        }
        handle_msg(c, &m);
        msg_clear(&m);
    }
    return off;
}

static int consume(struct conn *c, const uint8_t *data, size_t n)
{
    if (c->rlen == 0) {
        /* Common case: whole frames straight from the record, nothing copied. */
        size_t used = process_frames(c, data, n);
        if (used == n || c->state >= CONN_CLOSING)
            return 0;
        data += used;
        n -= used;
    }
    if (c->rlen + n > c->rcap) {
        size_t limit = MSG_LEN_PREFIX + c->ctx->max_frame;
        size_t cap = c->rcap ? c->rcap * 2 : 4096;
        if (cap < c->rlen + n)
            cap = c->rlen + n;
        if (cap > limit)
            cap = limit;
        uint8_t *nb = realloc(c->rbuf, cap);
        if (!nb)
            return -1;
        c->rbuf = nb;
        c->rcap = cap;
    }
    memcpy(c->rbuf + c->rlen, data, n);
    c->rlen += n;
    if (c->state >= CONN_CLOSING)
        return 0;
    size_t used = process_frames(c, c->rbuf, c->rlen);
    if (c->state >= CONN_CLOSING)
        return 0;
    memmove(c->rbuf, c->rbuf + used, c->rlen - used);
    c->rlen -= used;
    if (c->rlen == 0) {
        /* Idle connections keep no read buffer. */
        free(c->rbuf);
        c->rbuf = NULL;
        c->rcap = 0;
    }
    return 0;
}

static bool cert_alert(int alert)
{
    switch (alert) {
    case GNUTLS_A_BAD_CERTIFICATE:
    case GNUTLS_A_UNSUPPORTED_CERTIFICATE:
    case GNUTLS_A_CERTIFICATE_REVOKED:
    case GNUTLS_A_CERTIFICATE_EXPIRED:
    case GNUTLS_A_CERTIFICATE_UNKNOWN:
    case GNUTLS_A_UNKNOWN_CA:
    case GNUTLS_A_CERTIFICATE_REQUIRED:
    case GNUTLS_A_ACCESS_DENIED:
        return true;
    default:
        return false;
    }
}

static void alert_received(struct conn *c)
{
    int alert = (int)gnutls_alert_get(c->s);
    const char *name = gnutls_alert_get_name((gnutls_alert_description_t)alert);
    if (cert_alert(alert))
        begin_close(c, CONN_ERR_REJECTED, CLOSE_ABORT, "peer refused our certificate: %s",
                    name ? name : "unknown alert");
    else
        begin_close(c, CONN_ERR_TLS, CLOSE_ABORT, "peer sent TLS alert: %s",
                    name ? name : "unknown alert");
}

static void read_records(struct conn *c)
{
    uint8_t buf[READ_CHUNK];
    for (int i = 0; i < READS_PER_WAKEUP; i++) {
        if (c->state != CONN_HELLO && c->state != CONN_OPEN)
            return;
        /* Never hold more than one frame's worth. */
        size_t room = MSG_LEN_PREFIX + c->ctx->max_frame - c->rlen;
        ssize_t n = gnutls_record_recv(c->s, buf, room < sizeof(buf) ? room : sizeof(buf));
        if (n > 0) {
            c->last_rx = ev_now(c->loop);
            if (consume(c, buf, (size_t)n) < 0) {
                begin_close(c, CONN_ERR_IO, CLOSE_ABORT, "out of memory reading a frame");
                return;
            }
            continue;
        }
        if (n == 0) {
            if (c->state == CONN_OPEN)
                begin_close(c, CONN_CLOSED_REMOTE, CLOSE_GRACEFUL, "peer closed the connection");
            else
                begin_close(c, CONN_ERR_TLS, CLOSE_GRACEFUL,
                            "peer closed the connection before its hello");
            return;
        }
        if (n == GNUTLS_E_AGAIN)
            return;
        if (n == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal((int)n))
            continue;
        if (n == GNUTLS_E_FATAL_ALERT_RECEIVED) {
            alert_received(c);
        } else if (n == GNUTLS_E_PREMATURE_TERMINATION && c->state == CONN_OPEN && c->rlen == 0) {
            /* No frame was cut short, so nothing was lost: as good as a clean close. */
            begin_close(c, CONN_CLOSED_REMOTE, CLOSE_ABORT,
                        "peer closed the connection (without close_notify)");
        } else if (n == GNUTLS_E_PREMATURE_TERMINATION || n == GNUTLS_E_PULL_ERROR) {
            begin_close(c, CONN_ERR_IO, CLOSE_ABORT, "connection lost: %s",
                        n == GNUTLS_E_PULL_ERROR ? "reset by peer" : "closed inside a record");
        } else {
            gnutls_alert_send_appropriate(c->s, (int)n);
            begin_close(c, CONN_ERR_TLS, CLOSE_LINGER, "TLS record error: %s",
                        gnutls_strerror((int)n));
        }
        return;
    }
    /* Decrypted bytes may wait inside GnuTLS where libev cannot see them. */
    if (gnutls_record_check_pending(c->s) > 0)
        ev_feed_event(c->loop, &c->rio, EV_READ);
}

/* ---- Handshake ---------------------------------------------------------------------------- */

static size_t append(char *buf, size_t len, size_t used, const char *s)
{
    int n = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", s);
    if (n < 0 || (size_t)n >= len - used)
        return len - 1;
    return used + (size_t)n;
}

/* Says in words why verification failed, and picks the alert that tells the peer. */
static int describe_status(struct conn *c, unsigned status, char *buf, size_t len)
{
    size_t used = 0;
    int alert = GNUTLS_A_BAD_CERTIFICATE;
    buf[0] = '\0';
    if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) {
        used = append(buf, len, used, "not issued by the overlay CA");
        alert = GNUTLS_A_UNKNOWN_CA;
    }
    if (status & GNUTLS_CERT_SIGNER_NOT_CA) {
        used = append(buf, len, used, "issuer is not a CA");
        alert = GNUTLS_A_UNKNOWN_CA;
    }
    if (status & GNUTLS_CERT_EXPIRED) {
        used = append(buf, len, used, "expired");
        alert = GNUTLS_A_CERTIFICATE_EXPIRED;
    }
    if (status & GNUTLS_CERT_NOT_ACTIVATED) {
        used = append(buf, len, used, "not yet valid");
        alert = GNUTLS_A_CERTIFICATE_EXPIRED;
    }
    if (status & GNUTLS_CERT_REVOKED) {
        used = append(buf, len, used, "revoked");
        alert = GNUTLS_A_CERTIFICATE_REVOKED;
    }
    if (status & GNUTLS_CERT_PURPOSE_MISMATCH) {
        used = append(buf, len, used,
                      c->outgoing ? "key purpose serverAuth missing"
                                  : "key purpose clientAuth missing");
        alert = GNUTLS_A_UNSUPPORTED_CERTIFICATE;
    }
    if (status & GNUTLS_CERT_SIGNATURE_FAILURE)
        used = append(buf, len, used, "bad signature");
    if (status & GNUTLS_CERT_INSECURE_ALGORITHM)
        used = append(buf, len, used, "insecure algorithm");
    if (status & GNUTLS_CERT_SIGNER_CONSTRAINTS_FAILURE)
        used = append(buf, len, used, "issuer constraints violated");
    if (used == 0) {
        gnutls_datum_t out = {NULL, 0};
        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
            snprintf(buf, len, "%s", (const char *)out.data);
            gnutls_free(out.data);
        } else {
            snprintf(buf, len, "verification failed (status 0x%x)", status);
        }
    }
    return alert;
}

static void handshake_failed(struct conn *c, int r)
{
    char why[200];
    int alert = -1;
    switch (r) {
    case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
    case GNUTLS_E_CERTIFICATE_ERROR:
        alert = describe_status(c, gnutls_session_get_verify_cert_status(c->s), why, sizeof(why));
        gnutls_alert_send(c->s, GNUTLS_AL_FATAL, (gnutls_alert_description_t)alert);
        begin_close(c, CONN_ERR_PEER_CERT, CLOSE_LINGER, "peer certificate refused: %s", why);
        return;
    case GNUTLS_E_CERTIFICATE_REQUIRED:
    case GNUTLS_E_NO_CERTIFICATE_FOUND:
        /* A client with a certificate from another CA sends none at all. */
        gnutls_alert_send(c->s, GNUTLS_AL_FATAL, GNUTLS_A_CERTIFICATE_REQUIRED);
        begin_close(c, CONN_ERR_PEER_CERT, CLOSE_LINGER,
                    "peer certificate refused: peer sent no certificate acceptable for the "
                    "overlay CA");
        return;
    case GNUTLS_E_FATAL_ALERT_RECEIVED:
        alert_received(c);
        return;
    case GNUTLS_E_PREMATURE_TERMINATION:
    case GNUTLS_E_PULL_ERROR:
    case GNUTLS_E_PUSH_ERROR:
        begin_close(c, CONN_ERR_IO, CLOSE_ABORT, "connection lost during the TLS handshake: %s",
                    gnutls_strerror(r));
        return;
    default:
        gnutls_alert_send_appropriate(c->s, r);
        begin_close(c, CONN_ERR_TLS, CLOSE_LINGER, "TLS handshake failed: %s", gnutls_strerror(r));
        return;
    }
}

static int queue_hello(struct conn *c)
{
    char tid[MSG_TID_LEN + 1];
    msg_new_tid(tid);
    json_t *body = json_pack("{s:s}", "agent", "p2psip/" P2P_VERSION);
    struct msg_hdr hdr = {.overlay = c->ctx->overlay, .type = "hello", .kind = MSG_IND, .tid = tid};
    uint8_t *buf = NULL;
    size_t len = 0;
    int st = body ? msg_encode(&hdr, body, c->ctx->max_frame, &buf, &len) : MSG_E_NOMEM;
    json_decref(body);
    if (st != MSG_OK)
        return -1;
    return queue_take(c, buf, len);
}

static bool lst_identity_full(struct conn *c);

static void handshake_done(struct conn *c)
{
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(c->s, &n);
    gnutls_x509_crt_t crt = NULL;
    int r = GNUTLS_E_NO_CERTIFICATE_FOUND;
    if (certs && n > 0 && (r = gnutls_x509_crt_init(&crt)) >= 0 &&
        (r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER)) >= 0 &&
        (r = cred_identity(crt, &c->peer)) >= 0)
        r = crl_ref_of(crt, &c->crl_ref);
    gnutls_x509_crt_deinit(crt);
    if (r < 0) {
        gnutls_alert_send(c->s, GNUTLS_AL_FATAL, GNUTLS_A_BAD_CERTIFICATE);
        begin_close(c, CONN_ERR_PEER_CERT, CLOSE_LINGER,
                    "peer certificate refused: cannot read its identity: %s", gnutls_strerror(r));
        return;
    }
    /* Revocation, at every handshake and in both directions: the chain checked out, but the
     * CA may since have withdrawn this certificate (crl.h). */
    c->crl_gen = crl_generation();
    if (crl_ref_revoked(&c->crl_ref)) {
        char who[512], serial[2 * CRL_SERIAL_MAX + 1];
        gnutls_alert_send(c->s, GNUTLS_AL_FATAL, GNUTLS_A_CERTIFICATE_REVOKED);
        begin_close(c, CONN_ERR_PEER_CERT, CLOSE_LINGER,
                    "peer certificate refused: %s (serial %s) is revoked",
                    cred_identity_str(&c->peer, who, sizeof(who)),
                    crl_ref_serial_hex(&c->crl_ref, serial, sizeof(serial)));
        return;
    }
    conn_set_state(c, CONN_HELLO);
    tls_links_join(c);
    if (lst_identity_full(c))
        return;
    if (queue_hello(c) < 0) {
        begin_close(c, CONN_ERR_IO, CLOSE_ABORT, "cannot build our hello");
        return;
    }
    write_some(c);
    /* The peer's hello may have come in with the end of the handshake. */
    read_records(c);
}

static void do_handshake(struct conn *c)
{
    for (;;) {
        int r = gnutls_handshake(c->s);
        if (r == 0) {
            handshake_done(c);
            return;
        }
        if (r == GNUTLS_E_AGAIN) {
            set_wio(c, gnutls_record_get_direction(c->s) == 1);
            return;
        }
        if (r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal(r))
            continue;
        handshake_failed(c, r);
        return;
    }
}

/* What a peer certificate must be good for (no hostname: a peer is who its certificate says,
 * URI SAN and Node-ID, which callers check; GnuTLS checks the chain and the key purpose). */
static gnutls_typed_vdata_st want_server = {.type = GNUTLS_DT_KEY_PURPOSE_OID,
                                            .data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER};
static gnutls_typed_vdata_st want_client = {.type = GNUTLS_DT_KEY_PURPOSE_OID,
                                            .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT};

static int start_tls(struct conn *c)
{
    unsigned flags = (c->outgoing ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NONBLOCK |
                     GNUTLS_NO_SIGNAL | GNUTLS_NO_TICKETS;
    int r = gnutls_init(&c->s, flags);
    if (r < 0) {
        c->s = NULL;
        return r;
    }
    /*
     * No hostname: a peer is who its certificate says (URI SAN, Node-ID),
     * which callers check; GnuTLS checks the chain and the key purpose.
     */
    if ((r = gnutls_priority_set(c->s, c->ctx->prio)) < 0 ||
        (r = gnutls_credentials_set(c->s, GNUTLS_CRD_CERTIFICATE, c->ctx->xcred)) < 0)
        return r;
    if (!c->outgoing)
        gnutls_certificate_server_set_request(c->s, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert2(c->s, c->outgoing ? &want_server : &want_client, 1, 0);
    gnutls_transport_set_int(c->s, c->fd);
    gnutls_handshake_set_timeout(c->s, 0); /* our timer bounds it */
    if (c->state != CONN_HANDSHAKING)
        conn_set_state(c, CONN_HANDSHAKING);
    set_rio(c, true);
    return 0;
}

/* ---- DTLS sessions for datagram channels (chan.c) ------------------------------------------ */

int tls_ctx_dtls_session(struct tls_ctx *ctx, bool client, gnutls_session_t *out)
{
    int r;
    const char *errpos = NULL;
    *out = NULL;
    if (!ctx->dtls_prio && (r = gnutls_priority_init(&ctx->dtls_prio, DTLS_PRIORITY, &errpos)) < 0)
        return r;
    gnutls_session_t s;
    if ((r = gnutls_init(&s, (client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_DATAGRAM |
                                 GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL)) < 0)
        return r;
    gnutls_session_set_ptr(s, ctx);
    if ((r = gnutls_priority_set(s, ctx->dtls_prio)) < 0 ||
        (r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE,
                                    client ? ctx->dtls_cli : ctx->xcred)) < 0) {
        gnutls_deinit(s);
        return r;
    }
    if (!client)
        gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert2(s, client ? &want_server : &want_client, 1, 0);
    *out = s;
    return 0;
}

int tls_session_peer(gnutls_session_t s, struct peer_identity *out, char *err, size_t errlen)
{
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
    gnutls_x509_crt_t crt = NULL;
    struct crl_ref ref;
    int r = GNUTLS_E_NO_CERTIFICATE_FOUND;
    if (certs && n > 0 && (r = gnutls_x509_crt_init(&crt)) >= 0 &&
        (r = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER)) >= 0 &&
        (r = cred_identity(crt, out)) >= 0)
        r = crl_ref_of(crt, &ref);
    gnutls_x509_crt_deinit(crt);
    if (r < 0) {
        snprintf(err, errlen, "cannot read the identity in the peer's certificate: %s",
                 gnutls_strerror(r));
        return -1;
    }
    if (crl_ref_revoked(&ref)) {
        char who[512], serial[2 * CRL_SERIAL_MAX + 1];
        snprintf(err, errlen, "%s (serial %s) is revoked", cred_identity_str(out, who, sizeof(who)),
                 crl_ref_serial_hex(&ref, serial, sizeof(serial)));
        return -1;
    }
    return 0;
}

/* ---- Loop entry points -------------------------------------------------------------------- */

static void connect_done(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        begin_close(c, CONN_ERR_CONNECT, CLOSE_ABORT, "cannot connect to %s: %s", c->addr,
                    strerror(err));
        return;
    }
    set_wio(c, false);
    int r = start_tls(c);
    if (r < 0) {
        begin_close(c, CONN_ERR_TLS, CLOSE_ABORT, "cannot start TLS: %s", gnutls_strerror(r));
        return;
    }
    do_handshake(c);
}

static void on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    struct conn *c = w->data;
    conn_enter(c);
    switch (c->state) {
    case CONN_HANDSHAKING:
        do_handshake(c);
        break;
    case CONN_HELLO:
    case CONN_OPEN:
        read_records(c);
        break;
    case CONN_CLOSING:
        if (c->lingering)
            linger_read(c);
        else
            set_rio(c, false);
        break;
    default:
        set_rio(c, false);
        break;
    }
    conn_leave(c);
}

static void on_write(struct ev_loop *loop, ev_io *w, int revents)
{
    struct conn *c = w->data;
    conn_enter(c);
    switch (c->state) {
    case CONN_CONNECTING:
        connect_done(c);
        break;
    case CONN_HANDSHAKING:
        do_handshake(c);
        break;
    case CONN_HELLO:
    case CONN_OPEN:
        write_some(c);
        break;
    case CONN_CLOSING:
        if (c->graceful && !c->lingering)
            closing_step(c);
        else
            set_wio(c, false);
        break;
    default:
        set_wio(c, false);
        break;
    }
    conn_leave(c);
}

/* Frames are written just before the loop polls rather than when the socket says it is
 * writable: a socket with room (the usual case) then costs neither the two epoll_ctl calls of
 * starting and stopping the write watcher nor a wake-up of its own, and every frame queued for
 * a conn in one iteration goes out together. The write watcher is left for a full socket.
 * Sends made while frames are being written (a drain or close callback) take the write watcher:
 * libev has already picked the prepare watchers it runs before this poll. */
static _Thread_local int flushing;

static void on_flush(struct ev_loop *loop, ev_prepare *w, int revents)
{
    struct conn *c = w->data;
    ev_prepare_stop(loop, w);
    flushing++;
    conn_enter(c);
    if (c->state == CONN_HELLO || c->state == CONN_OPEN)
        write_some(c);
    else if (c->state == CONN_CLOSING && c->graceful && !c->lingering)
        closing_step(c);
    conn_leave(c);
    flushing--;
}

static void schedule_flush(struct conn *c)
{
    if (ev_is_active(&c->wio) || ev_is_active(&c->flush))
        return; /* already due */
    if (flushing)
        set_wio(c, true);
    else
        ev_prepare_start(c->loop, &c->flush);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct conn *c = w->data;
    conn_enter(c);
    unsigned hs = c->ctx->hs_ms;
    switch (c->state) {
    case CONN_CONNECTING:
        begin_close(c, CONN_ERR_TIMEOUT, CLOSE_ABORT, "connect to %s timed out after %u ms",
                    c->addr, hs);
        break;
    case CONN_HANDSHAKING:
        begin_close(c, CONN_ERR_TIMEOUT, CLOSE_ABORT, "TLS handshake not done after %u ms", hs);
        break;
    case CONN_HELLO:
        begin_close(c, CONN_ERR_TIMEOUT, CLOSE_ABORT, "no hello from peer after %u ms", hs);
        break;
    case CONN_OPEN: {
        ev_tstamp left = c->last_rx + c->ctx->idle_ms / 1000. - ev_now(loop);
        if (left > 0.001)
            arm_timer(c, left);
        else
            begin_close(c, CONN_ERR_IDLE, CLOSE_GRACEFUL, "nothing received for %u ms",
                        c->ctx->idle_ms);
        break;
    }
    case CONN_CLOSING:
        finish(c); /* done, or the closing deadline passed */
        break;
    default:
        break;
    }
    conn_leave(c);
}

static struct conn *conn_alloc(struct ev_loop *loop, struct tls_ctx *ctx, int fd, bool outgoing,
                               const struct conn_cbs *cbs, void *ud)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->loop = loop;
    c->ctx = ctx;
    c->fd = fd;
    c->outgoing = outgoing;
    c->state = outgoing ? CONN_CONNECTING : CONN_HANDSHAKING;
    if (cbs)
        c->cbs = *cbs;
    c->ud = ud;
    ev_io_init(&c->rio, on_read, fd, EV_READ);
    ev_io_init(&c->wio, on_write, fd, EV_WRITE);
    ev_prepare_init(&c->flush, on_flush);
    ev_timer_init(&c->timer, on_timer, ctx->hs_ms / 1000., 0.);
    ev_timer_init(&c->deliver, on_deliver, 0., 0.);
    c->rio.data = c->wio.data = c->flush.data = c->timer.data = c->deliver.data = c;
    return c;
}

/* ---- Links within the process ------------------------------------------------------------- */

/*
 * A conn_connect() to an address that a listener of this thread serves on the same loop (a
 * super node's SIP front end reaching the overlay through its own ordinary-node client, a
 * promoted node's ordinary side attaching to its own super node role) becomes a pair of conns
 * joined in memory: no socket, no TLS, and messages handed to the other end as JSON objects
 * (deep copies) instead of being encoded, encrypted, decrypted and parsed again. Both ends
 * behave as socket conns do towards their users: they open from the loop (the listener's end
 * first), messages arrive from the loop in order, a close reaches the other end after what was
 * sent before it, and conn_peer() is the other end's identity (its own certificate, loaded from
 * the same files the listener's context was). Each end's address is the listener's.
 */
struct lmsg {
    struct lmsg *next;
    char type[MSG_TYPE_MAX + 1];
    char tid[MSG_TID_LEN + 1];
    enum msg_kind kind;
    json_t *body;
};
#define LOCAL_QUEUE_MAX 65536 /* messages waiting at one end */

static bool sockaddr_wildcard(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return ((const struct sockaddr_in *)ss)->sin_addr.s_addr == htonl(INADDR_ANY);
    const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    return IN6_IS_ADDR_UNSPECIFIED(a);
}

static bool same_ip(const struct sockaddr *a, const struct sockaddr *b)
{
    if (a->sa_family != b->sa_family)
        return false;
    if (a->sa_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
               ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    return !memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                   &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr));
}

/* Is `to` an address of this host (what a wildcard listener is reached by)? */
static bool host_address(const struct sockaddr *to)
{
    if (to->sa_family == AF_INET &&
        (ntohl(((const struct sockaddr_in *)to)->sin_addr.s_addr) >> 24) == 127)
        return true;
    if (to->sa_family == AF_INET6 &&
        IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)to)->sin6_addr))
        return true;
    struct ifaddrs *ifs = NULL;
    bool found = false;
    if (getifaddrs(&ifs) != 0)
        return false;
    for (struct ifaddrs *i = ifs; i && !found; i = i->ifa_next)
        found = i->ifa_addr && same_ip(i->ifa_addr, to);
    freeifaddrs(ifs);
    return found;
}

static struct listener *local_listener_for(struct ev_loop *loop, const struct tls_ctx *ctx,
                                           const struct sockaddr *to)
{
    int port = to->sa_family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)to)->sin6_port)
                                         : ntohs(((const struct sockaddr_in *)to)->sin_port);
    for (struct listener *l = local_listeners; l; l = l->next_local) {
        if (l->loop != loop || l->port != port || l->bound.ss_family != to->sa_family ||
            strcmp(l->ctx->overlay, ctx->overlay) != 0)
            continue;
        if (same_ip((const struct sockaddr *)&l->bound, to) ||
            (sockaddr_wildcard(&l->bound) && host_address(to)))
            return l;
    }
    return NULL;
}

static void lmsg_free_all(struct conn *c)
{
    while (c->inq) {
        struct lmsg *x = c->inq;
        c->inq = x->next;
        json_decref(x->body);
        free(x);
    }
    c->inq_tail = NULL;
    c->inq_n = 0;
}

/* The other end is gone: `c` is told from the loop, after what it still has to take. */
static void local_unpair(struct conn *c)
{
    struct conn *t = c->twin;
    if (!t)
        return;
    c->twin = NULL;
    t->twin = NULL;
    t->twin_gone = true;
    if (t->state < CONN_CLOSING && !ev_is_active(&t->deliver))
        ev_timer_start(t->loop, &t->deliver);
}

static int local_send(struct conn *c, const char *type, enum msg_kind kind, const char *tid,
                      json_t *body)
{
    struct conn *t = c->twin;
    if (!t || c->state != CONN_OPEN)
        return CONN_ERR_NOT_OPEN;
    if (!type || strlen(type) > MSG_TYPE_MAX || !msg_tid_valid(tid) ||
        (body && !json_is_object(body)))
        return CONN_ERR_ENCODE;
    if (t->inq_n >= LOCAL_QUEUE_MAX) {
        c->want_drain = true;
        return CONN_ERR_QUEUE_FULL;
    }
    struct lmsg *x = calloc(1, sizeof(*x));
    if (!x || !(x->body = body ? json_deep_copy(body) : json_object())) {
        free(x);
        return CONN_ERR_QUEUE_FULL;
    }
    snprintf(x->type, sizeof(x->type), "%s", type);
    snprintf(x->tid, sizeof(x->tid), "%s", tid);
    x->kind = kind;
    if (t->inq_tail)
        t->inq_tail->next = x;
    else
        t->inq = x;
    t->inq_tail = x;
    t->inq_n++;
    if (!ev_is_active(&t->deliver))
        ev_timer_start(t->loop, &t->deliver);
    return 0;
}

static int local_send_frame(struct conn *c, const uint8_t *frame, size_t len)
{
    size_t flen = 0;
    if (msg_frame_peek(frame, len, c->ctx->max_frame, &flen) != MSG_OK || flen != len)
        return CONN_ERR_ENCODE;
    struct msg m;
    struct msg_error merr = {0};
    if (msg_decode_payload(frame + MSG_LEN_PREFIX, flen - MSG_LEN_PREFIX, c->ctx->overlay, &m,
                           &merr) != MSG_OK)
        return CONN_ERR_ENCODE;
    int r = local_send(c, m.type, m.kind, m.tid, m.body);
    msg_clear(&m);
    return r;
}

static struct conn *local_connect(struct ev_loop *loop, struct tls_ctx *ctx, struct listener *l,
                                  const struct conn_cbs *cbs, void *ud, char *err, size_t errlen)
{
    struct conn *c = conn_alloc(loop, ctx, -1, true, cbs, ud);
    struct conn *s = conn_alloc(l->loop, l->ctx, -1, false, &l->cbs, l->ud);
    if (!c || !s) {
        free(c);
        free(s);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->local = s->local = true;
    c->twin = s;
    s->twin = c;
    snprintf(c->addr, sizeof(c->addr), "%s", l->addr);
    snprintf(s->addr, sizeof(s->addr), "%s", l->addr);
    c->peer = *tls_ctx_identity(l->ctx);
    s->peer = *tls_ctx_identity(ctx);
    conn_set_state(c, CONN_HELLO);
    conn_set_state(s, CONN_HELLO);
    log_debug(COMPONENT, "%s: linked within the process", c->addr);
    ev_timer_start(loop, &c->deliver); /* opens both ends from the loop */
    return c;
}

static void on_deliver(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct conn *c = w->data;
    conn_enter(c);
    if (c->state == CONN_HELLO && c->outgoing && c->twin) {
        struct conn *s = c->twin; /* the listener's end opens first, as an accept would */
        conn_enter(s);
        if (s->state == CONN_HELLO)
            enter_open(s);
        conn_leave(s);
        if (c->state == CONN_HELLO && c->twin)
            enter_open(c);
    }
    /* What is waiting now; later messages come with the next round, so nothing starves. */
    for (size_t n = c->inq_n; n > 0 && c->inq && c->state == CONN_OPEN; n--) {
        struct lmsg *x = c->inq;
        c->inq = x->next;
        if (!c->inq)
            c->inq_tail = NULL;
        c->inq_n--;
        c->last_rx = ev_now(loop);
        struct msg m = {.version = P2P_PROTOCOL_VERSION,
                        .overlay = c->ctx->overlay,
                        .type = x->type,
                        .tid = x->tid,
                        .kind = x->kind,
                        .body = x->body};
        if (x->kind == MSG_ERR && !strcmp(x->tid, ZERO_TID))
            peer_error(c, &m);
        else if (c->cbs.on_message)
            c->cbs.on_message(c, &m, c->ud);
        json_decref(x->body);
        free(x);
    }
    /* A sender refused at the bound hears, as over a socket, that there is room again. */
    struct conn *t = c->twin;
    if (t && t->want_drain && c->inq_n <= LOCAL_QUEUE_MAX / 2 && t->state == CONN_OPEN) {
        t->want_drain = false;
        if (t->cbs.on_drain) {
            conn_enter(t);
            t->cbs.on_drain(t, t->ud);
            conn_leave(t);
        }
    }
    if (c->state < CONN_CLOSING) {
        if (c->inq && c->state == CONN_OPEN)
            ev_timer_start(loop, &c->deliver);
        else if (c->twin_gone)
            begin_close(c, CONN_CLOSED_REMOTE, CLOSE_ABORT, "peer closed the connection");
    }
    conn_leave(c);
}

/* ---- Per-source accounting and refusals ------------------------------------------------- */

bool conn_addr_equal(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return a->ss_family == AF_INET6 && x->sin6_port == y->sin6_port &&
           !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
}

void conn_src_key(const struct sockaddr *sa, uint8_t key[CONN_SRC_KEY_LEN])
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    memset(key, 0, CONN_SRC_KEY_LEN);
    if (sa->sa_family == AF_INET) {
        key[0] = 4;
        memcpy(key + 1, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const uint8_t *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        if (!memcmp(a, mapped, 12)) { /* the IPv4 host it is */
            key[0] = 4;
            memcpy(key + 1, a + 12, 4);
        } else {
            key[0] = 6;
            memcpy(key + 1, a, 8);
        }
    }
}

const char *conn_src_key_str(const uint8_t key[CONN_SRC_KEY_LEN], char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];
    if (key[0] == 4 && inet_ntop(AF_INET, key + 1, ip, sizeof(ip))) {
        snprintf(buf, len, "%s", ip);
    } else if (key[0] == 6) {
        uint8_t a[16] = {0};
        memcpy(a, key + 1, 8);
        inet_ntop(AF_INET6, a, ip, sizeof(ip));
        snprintf(buf, len, "%s/64", ip);
    } else {
        snprintf(buf, len, "?");
    }
    return buf;
}

static void refusals_flush(struct conn_refusals *r)
{
    if (!r->pending)
        return;
    log_warn(r->component,
             "%s: refused %lu more connection%s in the last %.0f s (%lu in all; "
             "the last %s)",
             r->where, r->pending, r->pending == 1 ? "" : "s", ev_now(r->loop) - r->last_line,
             r->total, r->last);
    r->pending = 0;
    r->last_line = ev_now(r->loop);
}

static void on_refusals_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    refusals_flush(w->data);
}

void conn_refusals_init(struct conn_refusals *r, struct ev_loop *loop, const char *component,
                        const char *where)
{
    memset(r, 0, sizeof(*r));
    r->loop = loop;
    r->component = component;
    snprintf(r->where, sizeof(r->where), "%s", where);
    r->last_line = -1e9;
    ev_timer_init(&r->timer, on_refusals_timer, REFUSAL_LOG_S, 0.);
    r->timer.data = r;
}

void conn_refusals_note(struct conn_refusals *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->last, sizeof(r->last), fmt, ap);
    va_end(ap);
    r->total++;
    ev_tstamp now = ev_now(r->loop);
    if (!r->pending && now - r->last_line >= REFUSAL_LOG_S) {
        log_warn(r->component, "%s: refused a connection %s", r->where, r->last);
        r->last_line = now;
        return;
    }
    r->pending++;
    if (!ev_is_active(&r->timer)) {
        double in = r->last_line + REFUSAL_LOG_S - now;
        ev_timer_set(&r->timer, in > 0.01 ? in : 0.01, 0.);
        ev_timer_start(r->loop, &r->timer);
    }
}

void conn_refusals_stop(struct conn_refusals *r)
{
    if (!r->loop)
        return;
    refusals_flush(r);
    ev_timer_stop(r->loop, &r->timer);
}

/* ---- Listener ----------------------------------------------------------------------------- */

/*
 * A listener keeps two lists of what it accepted: connections still handshaking (bounded in
 * total and per source, each by the handshake deadline), and connections past TLS, whose
 * certificate identity is known (bounded per identity). Nobody without a certificate can hold
 * more than the first; nobody with one more than the second. Lists, not tables: the first is
 * short by its bound, and the second is walked only once per handshake that completes.
 */
static void lst_leave_hs(struct conn *c)
{
    if (!c->in_hs)
        return;
    if (c->hs_prev)
        c->hs_prev->hs_next = c->hs_next;
    else
        c->lst->hs_head = c->hs_next;
    if (c->hs_next)
        c->hs_next->hs_prev = c->hs_prev;
    c->hs_next = c->hs_prev = NULL;
    c->in_hs = false;
    c->lst->n_hs--;
}

static void lst_detach(struct conn *c)
{
    if (!c->lst)
        return;
    lst_leave_hs(c);
    if (c->in_id) {
        if (c->id_prev)
            c->id_prev->id_next = c->id_next;
        else
            c->lst->id_head = c->id_next;
        if (c->id_next)
            c->id_next->id_prev = c->id_prev;
        c->id_next = c->id_prev = NULL;
        c->in_id = false;
    }
    c->lst = NULL;
}

static bool same_identity(const struct peer_identity *a, const struct peer_identity *b)
{
    if (a->has_node_id != b->has_node_id ||
        (a->has_node_id && memcmp(&a->node_id, &b->node_id, sizeof(a->node_id)) != 0))
        return false;
    return !strcmp(a->uri, b->uri) && !strcmp(a->dns, b->dns) && !strcmp(a->cn, b->cn);
}

/*
 * At the end of an accepted TLS handshake, before our hello: counts the links the same
 * certificate identity holds on this listener, and refuses this one with an error frame when
 * they are at the bound. Returns true when it refused.
 */
static bool lst_identity_full(struct conn *c)
{
    struct listener *l = c->lst;
    if (!l || c->outgoing)
        return false;
    unsigned n = 0;
    for (struct conn *x = l->id_head; x; x = x->id_next)
        n += same_identity(&x->peer, &c->peer);
    if (n < c->ctx->max_per_id) {
        c->id_next = l->id_head;
        c->id_prev = NULL;
        if (l->id_head)
            l->id_head->id_prev = c;
        l->id_head = c;
        c->in_id = true;
        return false;
    }
    char who[512], why[160];
    cred_identity_str(&c->peer, who, sizeof(who));
    snprintf(why, sizeof(why), "this certificate already holds %u links to this node (limit %u)", n,
             c->ctx->max_per_id);
    conn_refusals_note(&l->refused, "from %s: %s holds %u links (limit %u)", c->addr, who, n,
                       c->ctx->max_per_id);
    queue_error_frame(c, NULL, "too-many-links", why);
    begin_close(c, CONN_ERR_PROTOCOL, CLOSE_GRACEFUL, "refused: %s", why);
    return true;
}

/* The descriptors this process may have open, re-read when accepts come close to it. */
static rlim_t fd_limit(struct listener *l, int fd)
{
    if (!l->fd_limit || (rlim_t)fd + FD_RESERVE_MAX >= l->fd_limit) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
            l->fd_limit = rl.rlim_cur == RLIM_INFINITY ? (rlim_t)1 << 30 : rl.rlim_cur;
    }
    return l->fd_limit;
}

/* Why a connection just accepted (as `fd`, from `sa`) must be closed at once; false if not. */
static bool over_bounds(struct listener *l, int fd, const uint8_t src[CONN_SRC_KEY_LEN], char *why,
                        size_t len)
{
    char from[INET6_ADDRSTRLEN + 8];
    conn_src_key_str(src, from, sizeof(from));
    /* Descriptors are taken lowest first, so fd tells how many are open. Leave some for the
     * connections this node makes itself: a node out of descriptors takes its successor for
     * dead. */
    rlim_t lim = fd_limit(l, fd);
    rlim_t reserve = lim / 8 < FD_RESERVE_MAX ? lim / 8 : FD_RESERVE_MAX;
    if ((rlim_t)fd + reserve >= lim) {
        snprintf(why, len, "from %s: descriptors nearly exhausted (%d of %llu in use)", from, fd,
                 (unsigned long long)lim);
        return true;
    }
    if (l->n_hs >= l->ctx->max_hs) {
        snprintf(why, len, "from %s: %u handshakes in progress (limit %u)", from, l->n_hs,
                 l->ctx->max_hs);
        return true;
    }
    unsigned n = 0;
    for (struct conn *x = l->hs_head; x; x = x->hs_next)
        n += !memcmp(x->src, src, CONN_SRC_KEY_LEN);
    if (n >= l->ctx->max_hs_src) {
        snprintf(why, len, "from %s: %u handshakes in progress from that address (limit %u)", from,
                 n, l->ctx->max_hs_src);
        return true;
    }
    return false;
}

static void accept_one(struct listener *l, int fd, const struct sockaddr *sa)
{
    uint8_t src[CONN_SRC_KEY_LEN];
    char why[200];
    conn_src_key(sa, src);
    if (over_bounds(l, fd, src, why, sizeof(why))) {
        close(fd); /* before TLS: nothing to say, and nothing spent on it */
        conn_refusals_note(&l->refused, "%s", why);
        return;
    }
    set_nodelay(fd);
    struct conn *c = conn_alloc(l->loop, l->ctx, fd, false, &l->cbs, l->ud);
    if (!c) {
        log_warn(COMPONENT, "%s: out of memory accepting a connection", l->addr);
        close(fd);
        return;
    }
    format_addr(sa, c->addr, sizeof(c->addr));
    int r = start_tls(c);
    if (r < 0) {
        log_warn(COMPONENT, "%s: cannot start TLS: %s", c->addr, gnutls_strerror(r));
        close(fd);
        conn_destroy(c);
        return;
    }
    memcpy(c->src, src, sizeof(c->src));
    c->lst = l;
    c->in_hs = true;
    c->hs_next = l->hs_head;
    if (l->hs_head)
        l->hs_head->hs_prev = c;
    l->hs_head = c;
    l->n_hs++;
    log_debug(COMPONENT, "%s: accepted on %s", c->addr, l->addr);
    ev_timer_start(l->loop, &c->timer);
}

static void on_accept_pause(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct listener *l = w->data;
    ev_io_start(loop, &l->io);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    struct listener *l = w->data;
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            if (l->out_of_fds) {
                log_info(COMPONENT,
                         "%s: accepting connections again (paused %lu time%s for lack "
                         "of descriptors)",
                         l->addr, l->fd_pauses, l->fd_pauses == 1 ? "" : "s");
                l->out_of_fds = false;
                l->fd_pauses = 0;
            }
            accept_one(l, fd, (struct sockaddr *)&ss);
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
            /*
             * The pending connection stays in the backlog and would wake us
             * again at once: pause accepting instead of spinning. Logged once
             * per episode: it ends with the next accept that works.
             */
            if (!l->out_of_fds)
                log_warn(COMPONENT,
                         "%s: cannot accept: %s; pausing new connections for %.1f s at a time "
                         "until descriptors are free again",
                         l->addr, strerror(errno), ACCEPT_PAUSE_S);
            l->out_of_fds = true;
            l->fd_pauses++;
            ev_io_stop(loop, &l->io);
            ev_timer_stop(loop, &l->pause);
            ev_timer_set(&l->pause, ACCEPT_PAUSE_S, 0.);
            ev_timer_start(loop, &l->pause);
            return;
        default:
            log_warn(COMPONENT, "%s: accept failed: %s", l->addr, strerror(errno));
            return;
        }
    }
}

struct listener *conn_listen(struct ev_loop *loop, struct tls_ctx *ctx, const char *hostport,
                             const struct conn_cbs *cbs, void *ud, char *err, size_t errlen)
{
    struct addrinfo *ai = NULL;
    struct listener *l = NULL;
    int fd = -1, one = 1;

    if (parse_hostport(hostport, true, &ai, err, errlen) < 0)
        return NULL;
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create socket for %s: %s", hostport, strerror(errno));
        goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ai->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", hostport, strerror(errno));
        goto fail;
    }
    if (listen(fd, 512) < 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", hostport, strerror(errno));
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        snprintf(err, errlen, "getsockname on %s: %s", hostport, strerror(errno));
        goto fail;
    }
    l = calloc(1, sizeof(*l));
    if (!l) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    l->loop = loop;
    l->ctx = ctx;
    l->fd = fd;
    if (cbs)
        l->cbs = *cbs;
    l->ud = ud;
    format_addr((struct sockaddr *)&ss, l->addr, sizeof(l->addr));
    l->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    l->bound = ss;
    l->next_local = local_listeners;
    local_listeners = l;
    ev_io_init(&l->io, on_accept, fd, EV_READ);
    ev_timer_init(&l->pause, on_accept_pause, ACCEPT_PAUSE_S, 0.);
    l->io.data = l->pause.data = l;
    conn_refusals_init(&l->refused, loop, COMPONENT, l->addr);
    ev_io_start(loop, &l->io);
    freeaddrinfo(ai);
    log_info(COMPONENT, "listening on %s", l->addr);
    return l;
fail:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return NULL;
}

int listener_port(const struct listener *l)
{
    return l->port;
}

void listener_free(struct listener *l)
{
    if (!l)
        return;
    for (struct listener **p = &local_listeners; *p; p = &(*p)->next_local)
        if (*p == l) {
            *p = l->next_local;
            break;
        }
    ev_io_stop(l->loop, &l->io);
    ev_timer_stop(l->loop, &l->pause);
    conn_refusals_stop(&l->refused);
    /* Its connections live on, uncounted. */
    while (l->hs_head)
        lst_detach(l->hs_head);
    while (l->id_head)
        lst_detach(l->id_head);
    close(l->fd);
    free(l);
}

/* ---- Public connection API ---------------------------------------------------------------- */

struct conn *conn_connect(struct ev_loop *loop, struct tls_ctx *ctx, const char *hostport,
                          const struct conn_cbs *cbs, void *ud, char *err, size_t errlen)
{
    struct addrinfo *ai = NULL;
    if (parse_hostport(hostport, false, &ai, err, errlen) < 0)
        return NULL;
    struct listener *own = ctx->local_links ? local_listener_for(loop, ctx, ai->ai_addr) : NULL;
    if (own) {
        freeaddrinfo(ai);
        return local_connect(loop, ctx, own, cbs, ud, err, errlen);
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create socket for %s: %s", hostport, strerror(errno));
        freeaddrinfo(ai);
        return NULL;
    }
    set_nodelay(fd);
    struct conn *c = conn_alloc(loop, ctx, fd, true, cbs, ud);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        close(fd);
        freeaddrinfo(ai);
        return NULL;
    }
    format_addr(ai->ai_addr, c->addr, sizeof(c->addr));
    int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
    int saved = errno;
    freeaddrinfo(ai);
    log_debug(COMPONENT, "%s: connecting", c->addr);
    ev_timer_start(loop, &c->timer);
    if (r == 0 || saved == EINPROGRESS) {
        set_wio(c, true); /* writable = connected (or failed: SO_ERROR says) */
    } else {
        /* Reported through on_close like any later failure. */
        begin_close(c, CONN_ERR_CONNECT, CLOSE_ABORT, "cannot connect to %s: %s", c->addr,
                    strerror(saved));
    }
    return c;
}

static int queue_checked(struct conn *c, uint8_t *buf, size_t len)
{
    if (c->wbytes + len > c->ctx->max_wqueue) {
        free(buf);
        c->want_drain = true;
        return CONN_ERR_QUEUE_FULL;
    }
    if (queue_take(c, buf, len) < 0)
        return CONN_ERR_QUEUE_FULL;
    /* Written from the loop: a send failure then closes the conn outside the caller's call. */
    schedule_flush(c);
    return 0;
}

int conn_send(struct conn *c, const char *type, enum msg_kind kind, const char *tid, json_t *body)
{
    if (c->state != CONN_OPEN)
        return CONN_ERR_NOT_OPEN;
    char fresh[MSG_TID_LEN + 1];
    if (!tid) {
        msg_new_tid(fresh);
        tid = fresh;
    }
    if (c->local)
        return local_send(c, type, kind, tid, body);
    struct msg_hdr hdr = {.overlay = c->ctx->overlay, .type = type, .kind = kind, .tid = tid};
    uint8_t *buf = NULL;
    size_t len = 0;
    if (msg_encode(&hdr, body, c->ctx->max_frame, &buf, &len) != MSG_OK)
        return CONN_ERR_ENCODE;
    return queue_checked(c, buf, len);
}

int conn_send_frame(struct conn *c, const uint8_t *frame, size_t len)
{
    if (c->state != CONN_OPEN)
        return CONN_ERR_NOT_OPEN;
    if (len == 0)
        return CONN_ERR_ENCODE;
    if (c->local)
        return local_send_frame(c, frame, len);
    if (c->wbytes + len > c->ctx->max_wqueue) {
        c->want_drain = true;
        return CONN_ERR_QUEUE_FULL;
    }
    uint8_t *copy = malloc(len);
    if (!copy)
        return CONN_ERR_QUEUE_FULL;
    memcpy(copy, frame, len);
    return queue_checked(c, copy, len);
}

void conn_abort(struct conn *c)
{
    if (!c)
        return;
    ev_io_stop(c->loop, &c->rio);
    ev_io_stop(c->loop, &c->wio);
    ev_prepare_stop(c->loop, &c->flush);
    ev_timer_stop(c->loop, &c->timer);
    ev_timer_stop(c->loop, &c->deliver);
    local_unpair(c);
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->state = CONN_CLOSED;
    lst_detach(c);
    tls_links_leave(c);
    if (c->depth == 0)
        conn_destroy(c);
}

void conn_close(struct conn *c)
{
    if (c && c->state < CONN_CLOSING)
        begin_close(c, CONN_CLOSED_LOCAL, CLOSE_GRACEFUL, "closed locally");
}

void conn_close_with_error(struct conn *c, const char *tid, const char *code, const char *reason)
{
    if (!c || c->state >= CONN_CLOSING)
        return;
    if (c->state == CONN_HELLO || c->state == CONN_OPEN)
        queue_error_frame(c, tid, code, reason);
    begin_close(c, CONN_CLOSED_LOCAL, CLOSE_GRACEFUL, "sent error %s: %s", code,
                reason ? reason : "");
}

enum conn_state conn_get_state(const struct conn *c)
{
    return c->state;
}

bool conn_is_outgoing(const struct conn *c)
{
    return c->outgoing;
}

const struct peer_identity *conn_peer(const struct conn *c)
{
    /* Read at the end of the handshake, but only vouched for once the peer's hello came. */
    return c->opened ? &c->peer : NULL;
}

const char *conn_peer_addr(const struct conn *c)
{
    return c->addr;
}

int conn_local_addr(const struct conn *c, char *buf, size_t len)
{
    if (c->local) { /* both ends are the listener's address */
        snprintf(buf, len, "%s", c->addr);
        return 0;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (c->fd < 0 || getsockname(c->fd, (struct sockaddr *)&ss, &sl) != 0)
        return -1;
    format_addr((const struct sockaddr *)&ss, buf, len);
    return 0;
}

size_t conn_queued_bytes(const struct conn *c)
{
    return c->wbytes;
}

void conn_set_userdata(struct conn *c, void *ud)
{
    c->ud = ud;
}

void *conn_get_userdata(const struct conn *c)
{
    return c->ud;
}
