/*
 * The super node's STUN server (seed 004 section 5.5; RFC 5389 Binding):
 * ordinary nodes send a Binding request to it over UDP and learn their
 * reflexive (public) address from the XOR-MAPPED-ADDRESS of the answer. Built
 * on libnice's STUN message API, on the caller's libev loop (no GLib loop).
 *
 * Only Binding requests are answered; anything else that arrives (not STUN,
 * a malformed or truncated message, a bad FINGERPRINT, a response or an
 * indication, another method) is dropped and counted, never answered, so the
 * server cannot be used to reflect traffic at a third party with amplification.
 * Both IPv4 and IPv6 work.
 */
#ifndef P2P_STUN_H
#define P2P_STUN_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>

struct stun_server;

struct stun_stats {
    uint64_t answered; /* Binding success responses sent */
    uint64_t dropped;  /* datagrams ignored (not a valid Binding request) */
};

/*
 * Binds a UDP socket on "host:port" (numeric; "[v6]:port"; port 0 picks one)
 * and serves it. NULL + one line in err on failure.
 */
struct stun_server *stun_server_start(struct ev_loop *loop, const char *hostport, char *err,
                                      size_t errlen);
/* The bound port. */
int stun_server_port(const struct stun_server *s);
void stun_server_stats(const struct stun_server *s, struct stun_stats *out);
/* Stops and frees. NULL is fine. */
void stun_server_stop(struct stun_server *s);

/*
 * Client side, blocking, for tests and the ordinary node's first discovery:
 * sends Binding requests to `server` ("host:port") from `local` ("host:port",
 * port 0 for any), retransmitting per RFC 5389 until an answer or timeout_ms,
 * and writes the XOR-MAPPED-ADDRESS as "a.b.c.d:port" / "[v6]:port" into
 * mapped. 0, or -1 with one line in err.
 */
int stun_binding_query(const char *server, const char *local, int timeout_ms, char *mapped,
                       size_t mappedlen, char *err, size_t errlen);

#endif
