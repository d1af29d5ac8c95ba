/*
 * The super node's STUN server (seed 004 section 5.5; RFC 5389 Binding):
 * ordinary nodes send a Binding request to it over UDP and learn their
 * reflexive (public) address from the XOR-MAPPED-ADDRESS of the answer. Built
 * on libnice's STUN message API, on the caller's libev loop (no GLib loop).
 *
 * Binding requests are answered: RFC 5389 ones with XOR-MAPPED-ADDRESS,
 * classic RFC 3489 ones (no magic cookie) with MAPPED-ADDRESS (RFC 5389
 * 12.2). A request with an unknown comprehension-required attribute gets 420
 * + UNKNOWN-ATTRIBUTES (RFC 5389 7.3.1); so does a CHANGE-REQUEST asking for
 * another IP or port (RFC 5780 6.1: this server has a single address), except
 * in a classic RFC 3489 request, which is dropped (stun.c says why).
 * Anything else (not STUN, malformed or truncated, a bad FINGERPRINT, a
 * response or an indication) is dropped and counted, never answered; no answer
 * is more than 36 bytes longer than its request, so the server cannot be used
 * to reflect traffic at a third party with real amplification. With a TURN
 * server attached (turn.h), other STUN methods and ChannelData go to it.
 * Both IPv4 and IPv6 work.
 */
#ifndef P2P_STUN_H
#define P2P_STUN_H

#include <ev.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct stun_server;

struct stun_stats {
    uint64_t answered; /* Binding success responses sent (both kinds) */
    uint64_t classic;  /* ... of which to RFC 3489 requests */
    uint64_t errors;   /* 420 error responses sent */
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
/* Stops and frees. NULL is fine. Stop an attached TURN server first. */
void stun_server_stop(struct stun_server *s);

/*
 * For turn.c: datagrams that are ChannelData (first two bits 01) or STUN
 * messages of another method than Binding (with the magic cookie) go to fn
 * instead; fn NULL detaches. stun_server_fd() is the shared socket, which
 * TURN answers from.
 */
typedef void (*stun_demux_fn)(void *ud, const uint8_t *buf, size_t len,
                              const struct sockaddr_storage *from, socklen_t fromlen);
void stun_server_set_demux(struct stun_server *s, stun_demux_fn fn, void *ud);
int stun_server_fd(const struct stun_server *s);

/*
 * Client side, blocking, for tests and the ordinary node's first discovery:
 * sends Binding requests to `server` ("host:port") from `local` ("host:port",
 * port 0 for any), retransmitting per RFC 5389 until an answer or timeout_ms,
 * and writes the XOR-MAPPED-ADDRESS as "a.b.c.d:port" / "[v6]:port" into
 * mapped. 0, or -1 with one line in err.
 */
int stun_binding_query(const char *server, const char *local, int timeout_ms, char *mapped,
                       size_t mappedlen, char *err, size_t errlen);

/*
 * The same query on the caller's loop, without blocking it: done(ud, mapped, NULL) with the
 * XOR-MAPPED-ADDRESS, or done(ud, NULL, why) after timeout_ms or a malformed answer; the query
 * is gone when done runs. NULL + err when it cannot start.
 */
struct stun_query;
typedef void (*stun_query_fn)(void *ud, const char *mapped, const char *err);
struct stun_query *stun_query_start(struct ev_loop *loop, const char *server, int timeout_ms,
                                    stun_query_fn done, void *ud, char *err, size_t errlen);
/* Stops a query before done; done is not called. NULL is fine. */
void stun_query_cancel(struct stun_query *q);

#endif
