/*
 * The node-to-node transport: framed messages (msg.h) over TLS 1.3 over TCP,
 * non-blocking on the caller's libev loop, IPv4 and IPv6, with mutual
 * certificate authentication against the overlay CA.
 *
 * Life of a connection (one state machine, transitions logged at debug):
 *   CONNECTING -> HANDSHAKING -> HELLO -> OPEN -> CLOSING -> CLOSED
 * After the TLS handshake each side sends a "hello" indication. A TLS 1.3
 * client finishes its handshake before the server has checked the client's
 * certificate, so a connection counts as authenticated (OPEN, on_open) only
 * once the peer's hello has arrived: the server sends its hello only after it
 * accepted our certificate.
 *
 * Memory is bounded: frames are limited to max_frame bytes and the write
 * queue to max_wqueue bytes; conn_send() refuses (CONN_ERR_QUEUE_FULL) rather
 * than grow, and on_drain tells when there is room again.
 *
 * Callbacks run from the loop. conn_close() may be called from any callback;
 * on_close is the last callback a connection makes, and the connection is
 * freed right after it returns. on_close is never called from inside a
 * function of this module the caller called (conn_connect, conn_send,
 * conn_close...): it always comes later, from the loop. So run the loop until
 * on_close has come for every connection before destroying the loop.
 *
 * Closing is graceful where it can be: queued frames and close_notify are
 * sent, then the socket lingers (bounded) reading until the peer closes, so
 * that a last error frame or TLS alert is not destroyed by a TCP reset.
 *
 * A listener bounds what unauthenticated and per-identity peers can hold
 * (docs/protocol.md 1.1): connections still handshaking (TCP accepted, TLS and
 * hello not done), in total and per source address; links per certificate
 * identity; and it keeps descriptors in reserve for outgoing connections. What
 * it refuses is counted and logged at most once per 10 s per listener.
 */
#ifndef P2P_CONN_H
#define P2P_CONN_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cred.h"
#include "msg.h"

struct tls_config {
    const char *ca_file;           /* PEM trust anchor(s): the overlay CA */
    const char *cert_file;         /* PEM: our certificate (chain) */
    const char *key_file;          /* PEM PKCS#8: our private key */
    const char *overlay;           /* overlay name sent in, and required of, every frame */
    unsigned handshake_timeout_ms; /* TCP connect + TLS + hello; 0 = 10000 */
    unsigned idle_timeout_ms;      /* close after this long with nothing received; 0 = never */
    size_t max_frame;              /* 0 = MSG_MAX_FRAME_DEF */
    size_t max_wqueue;             /* bytes of queued outgoing frames; 0 = 1 MiB */
    /* conn_connect() with this context to the address of a listener of this thread on the same
     * loop joins the two ends in memory: no socket, no TLS, messages handed over as JSON
     * (conn.c, "Links within the process"). For a client of the process's own server (an
     * ordinary-node side of a super node); off, both ends really use TLS (tests, benchmarks). */
    bool local_links;
    /* Per listener using this context (0 = the default in brackets): */
    unsigned max_handshaking;          /* accepted connections not yet OPEN [512] */
    unsigned max_handshaking_per_addr; /* the same from one source address [64] */
    unsigned max_links_per_identity;   /* accepted links past TLS per certificate identity [4] */
};

struct tls_ctx;
struct conn;
struct listener;

/*
 * Loads credentials and trust. On failure returns NULL and writes a one-line
 * reason naming the file to err ("cannot read key /x/key.pem: ...",
 * "certificate /x/cert.pem does not match key /x/key.pem").
 */
struct tls_ctx *tls_ctx_new(const struct tls_config *cfg, char *err, size_t errlen);
/* Frees the context; every connection and listener using it must be gone. NULL is fine. */
void tls_ctx_free(struct tls_ctx *ctx);
/* Our own identity, from our certificate. */
const struct peer_identity *tls_ctx_identity(const struct tls_ctx *ctx);

/*
 * A DTLS 1.2 session (non-blocking) with the context's certificate and trust, for channels
 * that carry datagrams over a transport of their own (the ordinary nodes' channels, chan.c):
 * the caller sets the transport functions. The peer's chain is checked during the handshake as
 * on links (overlay CA, key purpose; a server requires a client certificate); afterwards
 * tls_session_peer() reads who it is. 0 or a GnuTLS error.
 */
int tls_ctx_dtls_session(struct tls_ctx *ctx, bool client, gnutls_session_t *out);
/* The peer of a finished handshake: its identity, refused when the revocation list (crl.h)
 * revokes it. 0, or -1 with one line in err. */
int tls_session_peer(gnutls_session_t s, struct peer_identity *out, char *err, size_t errlen);

enum conn_state {
    CONN_CONNECTING = 0, /* TCP connect in progress (outgoing only) */
    CONN_HANDSHAKING,    /* TLS handshake */
    CONN_HELLO,          /* handshake done, waiting for the peer's hello */
    CONN_OPEN,           /* authenticated; messages flow */
    CONN_CLOSING,        /* flushing queued frames and close_notify */
    CONN_CLOSED,
};

enum conn_close_reason {
    CONN_CLOSED_LOCAL = 0, /* we called conn_close() */
    CONN_CLOSED_REMOTE,    /* the peer closed cleanly */
    CONN_ERR_CONNECT,      /* TCP connect failed */
    CONN_ERR_TLS,          /* TLS handshake or record failure (not certificate related) */
    CONN_ERR_PEER_CERT,    /* the peer's certificate was refused by us */
    CONN_ERR_REJECTED,     /* the peer refused our certificate (alert) */
    CONN_ERR_TIMEOUT,      /* handshake/hello did not finish in time */
    CONN_ERR_IDLE,         /* nothing received for idle_timeout_ms */
    CONN_ERR_PROTOCOL,     /* the peer sent a malformed frame (we replied with an error) */
    CONN_ERR_PEER_ERROR,   /* the peer sent an error about our frames and closed */
    CONN_ERR_IO,           /* socket error, reset */
};
const char *conn_close_reason_str(enum conn_close_reason r);
const char *conn_state_str(enum conn_state s);

/* conn_send() results besides 0 */
#define CONN_ERR_QUEUE_FULL (-1) /* would exceed max_wqueue: nothing was queued */
#define CONN_ERR_NOT_OPEN   (-2) /* not OPEN (yet, or any more) */
#define CONN_ERR_ENCODE     (-3) /* frame too large or bad header */

struct conn_cbs {
    /* The peer is authenticated: conn_peer() is valid from now on. */
    void (*on_open)(struct conn *c, void *ud);
    /* One message; `m` is only valid during the call (json_incref what you keep). */
    void (*on_message)(struct conn *c, const struct msg *m, void *ud);
    /* Optional: the write queue fell to half after a send was refused (once per refusal). */
    void (*on_drain)(struct conn *c, void *ud);
    /*
     * Last call; `detail` is a human one-liner (may be ""), e.g. "peer
     * certificate refused: expired" (CONN_ERR_PEER_CERT), "peer refused our
     * certificate: Certificate is expired" (CONN_ERR_REJECTED), or
     * "<code>: <reason>" from the peer's error frame (CONN_ERR_PEER_ERROR).
     * conn_peer() still works here when the connection had been OPEN.
     */
    void (*on_close)(struct conn *c, enum conn_close_reason r, const char *detail, void *ud);
};

/*
 * Listens on "host:port" ("127.0.0.1:7000", "[::1]:7000", port 0 = any).
 * Accepted connections use `cbs` and `ud`. NULL + err on failure.
 */
struct listener *conn_listen(struct ev_loop *loop, struct tls_ctx *ctx, const char *hostport,
                             const struct conn_cbs *cbs, void *ud, char *err, size_t errlen);
/* The bound port. */
int listener_port(const struct listener *l);
/* Stops listening; accepted connections live on. NULL is fine. */
void listener_free(struct listener *l);

/*
 * Connects to a numeric "host:port". NULL + err when it cannot even start (bad
 * address, no socket); a refused or failing connect is reported through
 * on_close (CONN_ERR_CONNECT) like every later failure.
 */
struct conn *conn_connect(struct ev_loop *loop, struct tls_ctx *ctx, const char *hostport,
                          const struct conn_cbs *cbs, void *ud, char *err, size_t errlen);

/*
 * Sends a message on an OPEN connection. `body` may be NULL; its reference is
 * not taken. `tid` NULL means a fresh one. The frame is queued and written
 * from the loop: 0 means queued, not delivered.
 */
int conn_send(struct conn *c, const char *type, enum msg_kind kind, const char *tid, json_t *body);
/* Queues an already encoded frame (prefix included) as is; for relays and tests. */
int conn_send_frame(struct conn *c, const uint8_t *frame, size_t len);

/*
 * Revocation (crl.h): every handshake refuses a peer whose certificate the process's revocation
 * list revokes (a certificate_revoked alert, CONN_ERR_PEER_CERT). This closes the socket links
 * of the calling thread whose peer the list revokes now (an err frame with code
 * "certificate-revoked", then CONN_ERR_PEER_CERT at our end); call it when a new list was taken.
 * Links not walked this way are checked at their next incoming message. Returns how many it
 * closed.
 */
int conn_close_revoked(void);

/* Graceful close: flush what is queued (bounded by the handshake timeout), close_notify. */
void conn_close(struct conn *c);
/*
 * Sends an "err" frame {code, reason} answering tid (NULL: the zero tid, which
 * the peer takes as a complaint about the connection and reports as
 * CONN_ERR_PEER_ERROR), then closes. Our own on_close says CONN_CLOSED_LOCAL.
 * An err frame with a real tid reaches the peer's on_message as usual.
 */
void conn_close_with_error(struct conn *c, const char *tid, const char *code, const char *reason);

/*
 * Final cleanup only, when the loop will not run again (a daemon leaving its
 * loop at the shutdown deadline): closes the socket and frees the connection
 * at once, without a close_notify and without calling on_close. Not from a
 * callback of the same connection. NULL is fine.
 */
void conn_abort(struct conn *c);

enum conn_state conn_get_state(const struct conn *c);
bool conn_is_outgoing(const struct conn *c);
/* The peer's verified identity; NULL before OPEN (and if it never got there). */
const struct peer_identity *conn_peer(const struct conn *c);
/* "203.0.113.5:7000" or "[2001:db8::1]:7000". */
const char *conn_peer_addr(const struct conn *c);
/* Our own end of the connection ("ip:port"), as the kernel bound it; 0 or -1. */
int conn_local_addr(const struct conn *c, char *buf, size_t len);
size_t conn_queued_bytes(const struct conn *c);
void conn_set_userdata(struct conn *c, void *ud);
void *conn_get_userdata(const struct conn *c);

/*
 * Per-source accounting, shared with the HTTPS server (httpd.c). A source is
 * an IPv4 address (also when it comes IPv4-mapped in IPv6) or the /64 of an
 * IPv6 address: one host usually holds a whole /64.
 */
#define CONN_SRC_KEY_LEN 9
struct sockaddr;
void conn_src_key(const struct sockaddr *sa, uint8_t key[CONN_SRC_KEY_LEN]);
/* "192.0.2.7" or "2001:db8:1:2::/64". */
const char *conn_src_key_str(const uint8_t key[CONN_SRC_KEY_LEN], char *buf, size_t len);
/* Whether two IPv4 or IPv6 socket addresses are the same address and port. */
struct sockaddr_storage;
bool conn_addr_equal(const struct sockaddr_storage *a, const struct sockaddr_storage *b);

/*
 * Refused connections, logged without flooding the log: the first one of a
 * quiet spell at once ("<where>: refused a connection <reason>"), later ones as
 * one summary line at most every 10 s with their count and the last reason.
 */
struct conn_refusals {
    struct ev_loop *loop;
    ev_timer timer;
    const char *component;
    char where[64];
    unsigned long total, pending;
    double last_line;
    char last[200];
};
void conn_refusals_init(struct conn_refusals *r, struct ev_loop *loop, const char *component,
                        const char *where);
void conn_refusals_note(struct conn_refusals *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Logs what is pending and stops the timer. */
void conn_refusals_stop(struct conn_refusals *r);

#endif
