/*
 * LAN service location (seed 004 section 5.1, the first source of peer
 * initiation): an ordinary node multicasts a small query on the overlay's
 * LAN discovery group; super nodes on the link answer it, unicast, with their
 * own address. docs/protocol.md section 6 is the wire format. Answers are
 * hints only: the node still checks the super node's certificate (role and
 * the Node-ID answered) when it connects.
 *
 * Multicast never leaves the interface named by the caller (TTL 1), and
 * nothing here runs unless the configuration names that interface.
 */
#ifndef P2P_LANDISC_H
#define P2P_LANDISC_H

#include <ev.h>
#include <jansson.h>
#include <stddef.h>

#define LANDISC_MAX_DGRAM   1200 /* larger datagrams are dropped */
#define LANDISC_MAX_ANSWERS 16   /* super nodes kept from one query */
#define LANDISC_RATE        20   /* answers per second a responder sends at most */

struct landisc_sn {
    char id[41];
    char addr[128];
};

/* ---- super node side ---- */

/*
 * Returns what to answer: 0 and *out filled with this node's entry, or -1
 * to stay silent (not accepting ordinary nodes now).
 */
typedef int (*landisc_self_fn)(void *ud, struct landisc_sn *out);

struct landisc_responder;

/*
 * Joins `group` ("239.x.y.z:port") on the interface with IPv4 address
 * `iface` and answers queries for `overlay`. NULL + one line in err.
 */
struct landisc_responder *landisc_responder_start(struct ev_loop *loop, const char *group,
                                                  const char *iface, const char *overlay,
                                                  landisc_self_fn self, void *ud, char *err,
                                                  size_t errlen);
/* Counters: queries seen, answered, dropped (malformed, other overlay, over the rate). */
void landisc_responder_stats(const struct landisc_responder *r, unsigned long long *seen,
                             unsigned long long *answered, unsigned long long *dropped);
void landisc_responder_stop(struct landisc_responder *r);

/* ---- ordinary node side ---- */

/* The super nodes that answered (n may be 0); `err` is "" or why the query could not be sent. */
typedef void (*landisc_done_fn)(void *ud, const struct landisc_sn *sns, size_t n, const char *err);

struct landisc_query;

/*
 * Sends a query for `overlay` to `group` from interface `iface`, collects
 * answers for timeout_ms, then calls done (always from the loop, also on
 * failure). Cancel with landisc_query_cancel() before done to not hear it.
 */
struct landisc_query *landisc_query_start(struct ev_loop *loop, const char *group,
                                          const char *iface, const char *overlay,
                                          unsigned timeout_ms, landisc_done_fn done, void *ud);
void landisc_query_cancel(struct landisc_query *q);

#endif
