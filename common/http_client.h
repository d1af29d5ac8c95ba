/*
 * An asynchronous HTTPS client for talking to the login and bootstrap
 * servers: libcurl's multi interface driven by the caller's libev loop, so a
 * daemon's single thread never blocks on the network. Only https:// URLs are
 * accepted, redirects are not followed and proxies from the environment are
 * not used (the overlay's servers are reached directly).
 *
 * Server verification is explicit per request: either against one CA file
 * only (the system's CA store is never trusted: the overlay has its own CA),
 * and then the server's certificate must also carry the service role (cred.h:
 * a node certificate from the same CA never does, so no enrolled user can
 * pose as a login or bootstrap server; checked before the request is sent),
 * or not at all ("insecure"), which exists for exactly one case, the first
 * fetch of the overlay document, which is authenticated by its signature and
 * the CA pin instead (docs/protocol.md 2.1). An insecure request never shares
 * a connection or a TLS session with a verified one.
 *
 * Callback contract: for every request that http_request_start() accepted,
 * the done callback is called exactly once, always from the loop (never from
 * inside http_request_start()), or from http_client_free() with
 * HTTP_ERR_CANCELLED for requests still in flight. Inside a callback the
 * caller may start new requests and may free the client.
 *
 * libcurl's global state is initialised once per process by the first
 * http_client_new() (a pthread once-flag); http_global_cleanup() undoes it at
 * exit and is optional.
 */
#ifndef P2P_HTTP_CLIENT_H
#define P2P_HTTP_CLIENT_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#define HTTP_DEFAULT_TIMEOUT_MS   30000L
#define HTTP_DEFAULT_MAX_RESPONSE (1024u * 1024u)
#define HTTP_MAX_RESPONSE_LIMIT   ((size_t)1 << 30) /* larger max_response values are clamped */

struct http_client;

struct http_request {
    const char *method;       /* "GET" (also when NULL), "POST", ... */
    const char *url;          /* https:// only */
    const char *body;         /* request body, copied; NULL for none */
    size_t body_len;          /* bytes of body */
    const char *content_type; /* Content-Type of the body, or NULL */
    /*
     * Verify the server's certificate (chain, host name and the service role)
     * against this PEM CA file only. Exactly one of ca_file and insecure must be given; a
     * request with neither is refused (-EINVAL), as is one with both.
     */
    const char *ca_file;
    /*
     * No server verification at all: ONLY for the first overlay document
     * fetch, which is authenticated by signature and pin instead.
     */
    bool insecure;
    /* TLS client authentication: PEM files (curl's GnuTLS build ignores in-memory blobs). */
    const char *cert_file;
    const char *key_file;
    long timeout_ms;     /* whole request, connect included; 0 = HTTP_DEFAULT_TIMEOUT_MS */
    size_t max_response; /* larger response bodies are refused; 0 = HTTP_DEFAULT_MAX_RESPONSE */
};

/* What went wrong, for callers that react differently (retry, give up, tell the user). */
enum http_error {
    HTTP_OK = 0,        /* a response arrived (any status, 4xx and 5xx included) */
    HTTP_ERR_CANCELLED, /* the client was freed first */
    HTTP_ERR_TIMEOUT,   /* timeout_ms passed */
    HTTP_ERR_CONNECT,   /* name resolution or TCP connect failed */
    HTTP_ERR_TLS,       /* handshake failed, server certificate refused, client cert unusable */
    HTTP_ERR_TOO_LARGE, /* the response body exceeded max_response */
    HTTP_ERR_OTHER,     /* anything else (protocol error, connection reset, ...) */
};

struct http_response {
    enum http_error kind;
    /* NULL when a response arrived; otherwise one line, e.g. "TLS: server certificate ..." */
    const char *error;
    long status;          /* HTTP status; 0 when no response header arrived */
    const char *body;     /* NUL-terminated (the NUL is not counted); "" on error */
    size_t body_len;      /* bytes of body */
    double retry_after_s; /* the Retry-After header in seconds (date or delay form); 0 if none */
};

/* `resp` and everything it points to are valid only during the call. */
typedef void (*http_done_cb)(const struct http_response *resp, void *ud);

/* A client on `loop` (which must outlive it). NULL on allocation or libcurl failure. */
struct http_client *http_client_new(struct ev_loop *loop);
/*
 * Cancels everything in flight (each callback is called once with
 * HTTP_ERR_CANCELLED, from inside this call) and frees the client. May be
 * called from a done callback (then the rest is cancelled once that callback
 * returns). NULL is fine.
 */
void http_client_free(struct http_client *c);

/*
 * Starts a request; `req` and the strings it points to are copied, so they
 * may go away after the call. Returns 0 (then `cb` is called exactly once,
 * later), -EINVAL for a bad request (no URL, not https://, no CA and not
 * insecure, ...), -ESHUTDOWN while the client is being freed, -ENOMEM, or
 * -EIO when libcurl refuses the setup (logged).
 */
int http_request_start(struct http_client *c, const struct http_request *req, http_done_cb cb,
                       void *ud);

/* Number of requests in flight. */
size_t http_client_pending(const struct http_client *c);

/* Optional, at process exit, once every client is freed: releases libcurl's global state. */
void http_global_cleanup(void);

#endif
