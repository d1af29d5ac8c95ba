/*
 * The SIP front end's transport (RFC 3261 section 18) on libosip2's parser:
 * UDP and TCP on one address, TCP framed by Content-Length, with bounded
 * message size, header count and per-source rate, and per source address a
 * bounded number of TCP connections and of server transactions waiting for
 * their final response (more get 503: the owner's transaction state cannot
 * be filled from one address). Every message that parses
 * and carries the mandatory headers reaches the owner's callback; the rest is
 * answered 400 (TCP; a stream that cannot be framed any more is closed) or
 * dropped (UDP), and logged. Transactions, the registrar and the proxy are the
 * owner's (docs/sip.md).
 *
 * Everything runs on the caller's libev loop; nothing blocks.
 */
#ifndef P2P_SIP_H
#define P2P_SIP_H

#include <ev.h>
#include <osipparser2/osip_parser.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * "Source address" below is an IPv4 address or an IPv6 /64 (one host's share of a network):
 * ports never count. Per-source state lives in a table keyed by a secret SipHash, set
 * associative with eviction of the least recently used: addresses that share a slot's set
 * cannot reset each other's state, and which ones do is unpredictable from outside.
 */
struct sip_limits {
    size_t max_message;   /* bytes of one message, headers and body (0: 16384) */
    unsigned max_headers; /* header lines (0: 64) */
    double rate;          /* messages per second from one source address, bursts of twice that
                             (0: 200) */
    unsigned max_tcp;     /* simultaneous TCP connections (0: 256) */
    unsigned max_tcp_per_source; /* of them from one source address (0: 32) */
    double tcp_idle_s;           /* a TCP connection idle this long is closed (0: 300) */
    /* Server transactions (requests other than ACK, told apart by their top Via branch and
     * CSeq method) not answered finally yet: more get 503 with Retry-After. */
    unsigned max_txn;            /* in all (0: 65536) */
    unsigned max_txn_per_source; /* from one source address (0: twice the rate, at least 16) */
};

struct sip_endpoint;

/* The settings both daemons' SIP front ends share (members sip_rate, sip_dns, sip_dns_server of
 * the daemon's configuration struct T), for its cfg_field table. */
#define SIP_FRONT_FIELDS(T)                                                                        \
    {"sip_rate",                                                                                   \
     CFG_INT,                                                                                      \
     offsetof(T, sip_rate),                                                                        \
     1,                                                                                            \
     1000000,                                                                                      \
     NULL,                                                                                         \
     "200",                                                                                        \
     "SIP messages per second the front end takes from one source address (bursts of twice "       \
     "that; every phone behind one NAT address shares it); more are dropped; twice it is the "     \
     "transactions one address may have open (more get 503)"},                                     \
        {"sip_dns",                                                                                \
         CFG_BOOL,                                                                                 \
         offsetof(T, sip_dns),                                                                     \
         0,                                                                                        \
         0,                                                                                        \
         NULL,                                                                                     \
         "false",                                                                                  \
         "send calls for domains the overlay knows nothing of (no user or proxy location) to "     \
         "the SIP server DNS names (RFC 3263: SRV, then A); off: 404"},                            \
    {                                                                                              \
        "sip_dns_server", CFG_HOSTPORT, offsetof(T, sip_dns_server), 0, 0, NULL, NULL,             \
            "IPv4 address:port of the DNS server for sip_dns (default: /etc/resolv.conf's first)"  \
    }

/* Where a message came from, enough to answer it on the same path. */
struct sip_source {
    bool tcp;
    char addr[64];       /* "ip:port" ("[v6]:port") */
    uint64_t tcp_serial; /* the TCP connection (0 for UDP) */
    /* Set by the owner for messages that travel through the overlay (sip_send refuses them):
     * the other node's Node-ID and its super node's, 40 hex each. */
    char node[41], sn[41];
    bool chan; /* ...on a channel between the nodes (ordinarynode/chan.h), not `deliver` */
};

/* A message that parsed. msg stays the callback's: sip_* do not keep it. */
typedef void (*sip_message_fn)(void *ud, osip_message_t *msg, const struct sip_source *from);

struct sip_counters {
    uint64_t received, sent, dropped_garbage, dropped_rate, dropped_size, tcp_accepted, tcp_refused,
        tcp_connected, txn_refused;
};

/* Listens on UDP and TCP at "host:port" (port 0: one port picked for both). NULL + err. */
struct sip_endpoint *sip_endpoint_start(struct ev_loop *loop, const char *hostport,
                                        const struct sip_limits *limits, sip_message_fn fn,
                                        void *ud, char *err, size_t errlen);
/* "host:port" actually bound. */
const char *sip_endpoint_addr(const struct sip_endpoint *e);
void sip_endpoint_counters(const struct sip_endpoint *e, struct sip_counters *out);
void sip_endpoint_stop(struct sip_endpoint *e);

/*
 * Sends msg (serialised here; msg is not taken): back to `to` (an incoming
 * message's source: its TCP connection if still open), or to a destination
 * with to->tcp_serial 0: over UDP, or over TCP on a connection to that
 * address (one already open, else a new one, connected in the background:
 * what cannot be delivered is logged). 0, or -1 with err.
 */
int sip_send(struct sip_endpoint *e, osip_message_t *msg, const struct sip_source *to, char *err,
             size_t errlen);

/*
 * A response to req (RFC 3261 8.2.6): Via, From, To (with a To-tag added for
 * codes above 100 when the request had none), Call-ID and CSeq copied,
 * Content-Length 0. reason NULL: the standard phrase. NULL on allocation
 * failure.
 */
osip_message_t *sip_response_for(const osip_message_t *req, int code, const char *reason);

/* sip_response_for() and sip_send() to the request's source; logs failures. */
void sip_reply(struct sip_endpoint *e, const osip_message_t *req, const struct sip_source *from,
               int code, const char *reason);

/* The source-address key of "ip:port" ("[v6]:port"): family, then the IPv4 address or the
 * IPv6 /64, zero-padded. 0, or -1 when addr is no numeric address. */
#define SIP_ADDR_KEY_LEN 17
int sip_addr_key(const char *addr, unsigned char out[SIP_ADDR_KEY_LEN]);

/*
 * Token buckets (`rate` per second, at most `burst`) for keys of up to 256 bytes (source
 * addresses, user names), in a table of about `slots` entries keyed like the per-source
 * state above: a key never seen, or forgotten, starts full.
 */
struct sip_limiter;
struct sip_limiter *sip_limiter_new(size_t slots, double rate, double burst);
/* Takes `cost` tokens from key's bucket: true when it held that many (else nothing taken). */
bool sip_limiter_take(struct sip_limiter *l, const void *key, size_t len, double now, double cost);
/* Seconds until key's bucket holds `cost` tokens (0: it does now); takes nothing. */
double sip_limiter_wait(struct sip_limiter *l, const void *key, size_t len, double now,
                        double cost);
void sip_limiter_free(struct sip_limiter *l);

/* Parses one message the way the endpoint does (limits included): 0, or -1 with err. */
int sip_parse(const char *buf, size_t len, const struct sip_limits *limits, osip_message_t **out,
              char *err, size_t errlen);

#endif
