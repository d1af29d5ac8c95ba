/*
 * The super node's TURN server (RFC 8656, UDP relay, IPv4), sharing the STUN
 * server's UDP socket (stun.h): Binding requests stay with stun.c, every other
 * STUN method and ChannelData come here. Written on libnice's STUN message API
 * and the caller's libev loop.
 *
 * Authentication: long-term credentials with short-lived passwords (the
 * "TURN REST API" scheme): username = "<expiry unix seconds>:<node-id hex>",
 * password = base64(HMAC-SHA1(secret, username)), key = MD5(user:realm:pass).
 * The secret is 32 random bytes made at start, kept in memory only; only
 * turn_issue() hands out passwords. Quotas are keyed by the username's node-id.
 *
 * Methods: Allocate (REQUESTED-TRANSPORT UDP only), Refresh, CreatePermission,
 * ChannelBind, Send and Data indications, ChannelData. Peers in private,
 * loopback, link-local, CGN, multicast and reserved IPv4 ranges are refused
 * (403) unless listed in allow_peers; this host's own addresses are reachable
 * only on ports of the relay range (another allocation).
 */
#ifndef P2P_TURN_H
#define P2P_TURN_H

#include <ev.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

struct stun_server;
struct turn_server;

struct turn_params {
    const char *realm;              /* REALM (NULL: "p2psip") */
    const char *relay_ip;           /* IPv4 address relayed addresses are bound to (required) */
    unsigned port_min, port_max;    /* relay port range; 0-0: any port the kernel picks */
    unsigned max_allocations;       /* in total (0: 1000); past it 508 */
    unsigned allocations_per_node;  /* per node-id (0: 8); past it 486 */
    unsigned permissions_per_alloc; /* (0: 32); past it 508 */
    unsigned channels_per_alloc;    /* (0: 32); past it 508 */
    unsigned bandwidth_kbps;        /* per allocation, both ways (0: unlimited) */
    unsigned default_lifetime_s;    /* (0: 600) */
    unsigned max_lifetime_s;        /* (0: 3600) */
    unsigned perm_lifetime_s;       /* permissions (0: 300, RFC 8656); tests shorten it */
    unsigned chan_lifetime_s;       /* channel bindings (0: 600, RFC 8656) */
    const char *const *allow_peers; /* CIDRs that override the peer deny list */
    size_t n_allow_peers;
};

struct turn_stats {
    uint64_t allocations;           /* active now */
    uint64_t permissions, channels; /* active now */
    uint64_t created;               /* allocations made */
    uint64_t challenges;            /* 401 to a request without credentials (normal) */
    uint64_t refused_auth;          /* bad, expired or foreign credentials (401), stale (438) */
    uint64_t refused_quota;         /* 486 / 508 */
    uint64_t refused_peer;          /* 403: peer address refused by the policy */
    uint64_t refused_other;         /* 400, 420, 437, 440, 442 */
    uint64_t pkts_to_peer, bytes_to_peer;
    uint64_t pkts_to_client, bytes_to_client;
    uint64_t dropped_bandwidth; /* packets over an allocation's bandwidth */
    uint64_t dropped_other;     /* no permission, peer port refused, malformed */
};

/*
 * Serves TURN on the STUN server's socket (which must stay alive until
 * turn_server_stop). NULL + one line in err on failure (bad relay_ip or CIDR,
 * no randomness).
 */
struct turn_server *turn_server_start(struct ev_loop *loop, struct stun_server *stun,
                                      const struct turn_params *p, char *err, size_t errlen);
/* Stops, closes every relay socket, frees. NULL is fine. */
void turn_server_stop(struct turn_server *t);

/*
 * Short-lived credentials for node_id_hex (40 hex digits), valid ttl_s
 * seconds. 0, or -1 when the id is malformed or a buffer is too small.
 */
int turn_issue(struct turn_server *t, const char *node_id_hex, unsigned ttl_s, char *user,
               size_t ulen, char *pass, size_t plen, char *realm, size_t rlen);

void turn_server_stats(const struct turn_server *t, struct turn_stats *out);
/* What one allocation may relay, kbit/s both ways together (0: unlimited). */
unsigned turn_bandwidth_kbps(const struct turn_server *t);
/* {"allocations":..., "created":..., ...} plus the limits (new reference). */
json_t *turn_server_status(const struct turn_server *t);
/* Prometheus text lines (p2p_turn_*), malloc'd; NULL when out of memory. */
char *turn_server_metrics(const struct turn_server *t);

#endif
