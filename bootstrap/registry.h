/*
 * The bootstrap server's list of super nodes (docs/protocol.md section 3), as
 * pure logic: no I/O and no clock of its own. The caller feeds it announces,
 * verification results and the time, and asks it what to check and whom to
 * list. A node is listed only while it is verified (a TLS handshake with the
 * announced Node-ID and the super-node role succeeded on the announced
 * address) and keeps announcing.
 */
#ifndef P2P_BS_REGISTRY_H
#define P2P_BS_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "nodeid.h"

#define BS_ADDR_MAX   64
#define BS_REASON_MAX 160
/* Default most capacity an announce counts with (10 times a super node's default max_attached):
 * the weight of a node in picks follows its capacity, so an unbounded one captures the list. */
#define BS_CAPACITY_MAX_DEF 10000ul

enum bs_state {
    BS_PENDING = 0, /* announced; the check of its address has not finished */
    BS_LISTED,      /* verified and announcing: handed out to new nodes */
    BS_REJECTED,    /* its address failed the check; `reason` says why */
};

struct bs_entry {
    nid_t node_id;
    char address[BS_ADDR_MAX]; /* numeric host:port of its overlay port */
    unsigned long attached, capacity;
    int64_t uptime_s;
    double first_seen, last_announce, last_checked;
    enum bs_state state;
    char reason[BS_REASON_MAX];
    unsigned announces_in_period; /* for the per-certificate rate limit */
    double period_start;
};

struct bs_announce {
    nid_t node_id;
    const char *address;
    unsigned long attached, capacity;
    int64_t uptime_s;
};

enum bs_announce_result {
    BS_ANN_OK = 0, /* recorded; see the entry's state */
    BS_ANN_CHECK,  /* recorded, and the caller must now check the address */
    BS_ANN_FLOOD,  /* too many announces this period: ignored */
    BS_ANN_FULL,   /* the registry is full of other live nodes: ignored */
};

struct bs_registry;

/*
 * period_s: the announce period (3 missed drop a node); reverify_periods:
 * re-check a listed node's address after this many periods; max_entries
 * bounds memory; max_announces: per node per period before BS_ANN_FLOOD.
 */
struct bs_registry *bs_registry_new(double period_s, unsigned reverify_periods, size_t max_entries,
                                    unsigned max_announces);
void bs_registry_free(struct bs_registry *r);
/* Announced capacities above `max` count as `max` (0 = BS_CAPACITY_MAX_DEF). */
void bs_registry_set_max_capacity(struct bs_registry *r, unsigned long max);

/* Records an announce at `now`; capacity and attached are clamped to the maximum capacity.
 * Validation of the message is the caller's. */
enum bs_announce_result bs_registry_announce(struct bs_registry *r, const struct bs_announce *a,
                                             double now);

/*
 * The result of a check the registry asked for. Ignored when the node left or
 * announced another address meanwhile (a newer check is then under way).
 */
void bs_registry_checked(struct bs_registry *r, const nid_t *id, const char *address, bool ok,
                         const char *reason, double now);

/* Graceful leave. Returns false when the node was not known. */
bool bs_registry_withdraw(struct bs_registry *r, const nid_t *id);

/* Drops nodes silent for 3 periods; returns how many. */
size_t bs_registry_expire(struct bs_registry *r, double now);

/* The entry of a node, or NULL. Valid until the next call that changes the registry. */
const struct bs_entry *bs_registry_get(const struct bs_registry *r, const nid_t *id);

/*
 * Up to `count` distinct listed nodes, drawn without replacement with weights
 * 1 + max(0, capacity - attached) (capacity as clamped), equal keys in random order.
 * `rnd` returns uniform 64-bit values.
 * Returns how many were written to out[].
 */
size_t bs_registry_pick(const struct bs_registry *r, size_t count, uint64_t (*rnd)(void *ud),
                        void *rnd_ud, const struct bs_entry **out);

/* Calls cb for every entry, in Node-ID order (for the status page). */
void bs_registry_foreach(const struct bs_registry *r,
                         void (*cb)(const struct bs_entry *e, void *ud), void *ud);

size_t bs_registry_count(const struct bs_registry *r, enum bs_state state);

/*
 * Whether a numeric host ("192.0.2.7", "2001:db8::1", no brackets or port) is a public unicast
 * address other nodes could reach: false for unspecified, loopback, private (RFC 1918, fc00::/7),
 * shared (100.64.0.0/10), link-local, multicast, broadcast and reserved space, documentation and
 * benchmarking ranges, and for IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:0:0/96,
 * IPv4-compatible ::/96, NAT64 64:ff9b::/96, 6to4 2002::/16) when that address is not public.
 * Anything that does not parse is not public.
 */
bool bs_addr_public(const char *host);
/* Whether it is a loopback address (127.0.0.0/8, ::1, or 127/8 mapped into IPv6). */
bool bs_addr_loopback(const char *host);

#endif
