/*
 * HTTPS server for the login and bootstrap servers: libmicrohttpd with
 * GnuTLS, run from the caller's libev loop (no threads). The owner gives one
 * handler that sees every complete request and answers it before returning,
 * or defers it (httpd_req_defer) and answers later from the same loop: the
 * connection then waits, out of MHD's polling, while every other connection
 * is served.
 *
 * What this layer guarantees to handlers: the body is complete, at most
 * max_body bytes and NUL-terminated; a larger body was already answered with
 * 413 (from Content-Length alone when the client sent one, without reading
 * it). A handler that forgets to answer produces a 500. Client certificates
 * are requested when client_ca_pem is set but never required by the TLS
 * layer: httpd_req_client_identity() verifies one against that CA.
 *
 * Connections are bounded in total and per source address (an IPv4 address or
 * an IPv6 /64, as conn.h counts them); one over either bound is closed as soon
 * as it is accepted, before TLS, and the refusals are logged at most once per
 * 10 s. The total never exceeds what the descriptor limit leaves room for.
 */
#ifndef P2P_HTTPD_H
#define P2P_HTTPD_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "cred.h"

struct httpd_config {
    const char *listen;        /* numeric "host:port" or "[v6]:port"; port 0 picks one */
    const char *cert_pem;      /* server certificate chain, PEM text; NULL: plain HTTP */
    const char *key_pem;       /* server private key, PEM text */
    const char *client_ca_pem; /* when set, ask clients for a certificate from this CA */
    size_t max_body;           /* bytes; 0 = 16 KiB */
    unsigned timeout_s;        /* idle connection timeout; 0 = 30 */
    unsigned max_connections;  /* 0 = 1024 */
    unsigned max_per_ip;       /* connections from one source address; 0 = 64 */
};

struct httpd;
struct httpd_req;

/* Called once per complete request; must answer with one httpd_respond*() call, or defer. */
typedef void (*httpd_handler)(struct httpd_req *req, void *ud);
/*
 * Tells the owner of a deferred request that it ended unanswered (the client
 * went away, or httpd_stop): `req` is freed right after, so forget it and
 * never answer it.
 */
typedef void (*httpd_cancel_cb)(struct httpd_req *req, void *ud);

/* Starts serving. NULL and a one-line reason in err on failure. */
struct httpd *httpd_start(struct ev_loop *loop, const struct httpd_config *cfg,
                          httpd_handler handler, void *ud, char *err, size_t errlen);
/* The bound port. */
int httpd_port(const struct httpd *h);
/*
 * Stops listening and closes every connection; each deferred request still
 * unanswered is reported to its cancel callback first. NULL is fine.
 */
void httpd_stop(struct httpd *h);

const char *httpd_req_method(const struct httpd_req *r);
const char *httpd_req_path(const struct httpd_req *r);
/* The request body, NUL-terminated (may contain NULs before body_len). */
const char *httpd_req_body(const struct httpd_req *r);
size_t httpd_req_body_len(const struct httpd_req *r);
/* The client's IP address as text ("127.0.0.1", "::1"). */
const char *httpd_req_client_addr(const struct httpd_req *r);
/* A request header, or NULL. */
const char *httpd_req_header(const struct httpd_req *r, const char *name);
/* A query argument (?count=5), or NULL. */
const char *httpd_req_query(const struct httpd_req *r, const char *name);

/*
 * Verifies the client's TLS certificate against client_ca_pem: chain, validity
 * now, key purpose clientAuth. Returns 0 and fills *id, or -1 with the reason
 * in err (no certificate, other CA, expired, ...).
 */
int httpd_req_client_identity(struct httpd_req *r, struct peer_identity *id, char *err,
                              size_t errlen);

/*
 * Called by the handler: the answer comes later, by one httpd_respond*() call
 * from the loop's thread (e.g. when a worker's result arrives), and until
 * then `r` stays valid unless `cancel` is called: when the client hangs up
 * while waiting (its socket is watched), or at httpd_stop. An answer given
 * before the handler returns is sent as usual. A client that only shuts its
 * sending side counts as gone. Returns 0, or -1 when `r` was already answered
 * or deferred.
 */
int httpd_req_defer(struct httpd_req *r, httpd_cancel_cb cancel, void *ud);

/* Adds a header to the coming response (e.g. "Retry-After", "Allow"). */
void httpd_add_header(struct httpd_req *r, const char *name, const char *value);
/* Answers with a body (copied). */
void httpd_respond(struct httpd_req *r, unsigned status, const char *content_type, const void *body,
                   size_t len);
/* Answers with a JSON body; the reference to `body` is not taken. */
void httpd_respond_json(struct httpd_req *r, unsigned status, json_t *body);
/*
 * The answer for a request no handler took: 405 with an Allow header when the
 * path exists for other methods (`allow` lists them, e.g. "GET"), else 404.
 */
void httpd_respond_unrouted(struct httpd_req *r, const char *allow);
/* Answers {"error": code, "reason": reason} and logs it at info. */
void httpd_respond_error(struct httpd_req *r, unsigned status, const char *code,
                         const char *reason);

#endif
