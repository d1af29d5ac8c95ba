/*
 * The super node role as a library (docs/ring.md): a member of the Chord ring
 * that routes requests, stores signed records and replicates them. The
 * `supernode` daemon runs one; an ordinary node that gets promoted runs one
 * inside its own process and loop.
 *
 * One struct sn owns its listener and every node-to-node link it accepts or
 * opens. Everything runs on the caller's libev loop; nothing blocks.
 */
#ifndef P2P_SN_H
#define P2P_SN_H

#include <ev.h>
#include <gnutls/x509.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "conn.h"
#include "store.h"

struct turn_server; /* turn.h */

struct sn_params {
    const char *overlay;   /* overlay name */
    const char *listen;    /* "host:port" for node-to-node TLS */
    const char *advertise; /* "host:port" other nodes use to reach us (NULL = listen) */
    struct tls_config tls; /* our credentials and transport settings */
    unsigned replication;  /* copies of each record (responsible + successors) */
    unsigned succ_list;    /* successor list length */
    double stabilize_s;    /* ring maintenance period */
    size_t max_record_bytes;
    long long max_lifetime_s;
    struct store_limits quotas;
    size_t max_connections; /* links of any kind, accepted and opened */
    double peer_idle_s;     /* close SN links unused this long that the ring does not need */
    double sn_msg_rate;     /* messages per second per certificate on SN links (0 = 20000) */
    double dial_rate;       /* dials per second to unauthenticated addresses (0 = 10) */
    /* Ordinary nodes (docs/protocol.md section 5). */
    size_t max_attached;      /* most attached at once; more are redirected */
    double on_rate;           /* requests per second per attached node (burst: 2 s worth) */
    unsigned on_inflight;     /* requests in progress per attached node */
    double keepalive_s;       /* an attached node silent for 3 of these is dropped */
    const char *stun;         /* "host:port" of our STUN server, told to attaching nodes, or NULL */
    struct turn_server *turn; /* the TURN relay on that port (turn.h), or NULL: `turn` request */
    unsigned turn_ttl_s;      /* validity of the credentials it hands out (0 = 600) */
    long long sn_target_load; /* attached nodes above which we invite one to become a super node */
    /* The overlay document's P2P proxies (record policy, docs/sip.md); copied by sn_new(). */
    const struct overlay_sip_proxy *sip_proxies;
    size_t n_sip_proxies;
    /* Optional: called when the node becomes a member of a ring, and when it stops being one. */
    void (*on_membership)(void *ud, bool member);
    /* Optional: called when health changes (sn_is_healthy). */
    void (*on_health)(void *ud, bool healthy);
    void *ud;
};

struct sn;
struct overlay_doc;

/*
 * Fills what the overlay document decides (replication, successor list,
 * stabilisation period, record size and lifetime limits, keepalive, the
 * promotion target load) and raises p->tls.max_frame to carry the largest
 * record; returns true when it had to raise it.
 */
bool sn_params_from_doc(struct sn_params *p, const struct overlay_doc *doc);

/*
 * Loads credentials, checks that our certificate has the super node role and
 * a Node-ID, and listens. NULL + one line in err on failure.
 */
struct sn *sn_new(struct ev_loop *loop, const struct sn_params *p, char *err, size_t errlen);

/* Starts a new ring with this node alone in it. */
void sn_start_seed(struct sn *s);
/*
 * Joins through any of the given super node addresses (tried in turn, again
 * and again with back-off until one admits us). NULL-terminated.
 */
void sn_start_join(struct sn *s, const char *const *addrs);

/*
 * Graceful leave: hands every record to the successor, tells predecessor and
 * successor, closes all links; then calls done(ud) (from the loop). Also
 * stops listening.
 */
void sn_leave(struct sn *s, void (*done)(void *ud), void *ud);

/* The status document of docs/ring.md section 7 (new reference). */
json_t *sn_status(struct sn *s);
/* Every entry held: [[key, owner, seq, "primary"|"replica"|"tombstone"], ...] (new reference). */
json_t *sn_records(struct sn *s);

/* Healthy: a member of a ring that works (protocol.md 5.6); what the bootstrap servers see. */
bool sn_is_healthy(const struct sn *s);
size_t sn_attached(const struct sn *s);

/* Prometheus text exposition of the node's figures (malloc'd; free()). */
char *sn_metrics(struct sn *s);

/*
 * Asks a ring neighbour to connect back to our advertised address
 * (docs/protocol.md 5.5): how a promoted node verifies that it is still
 * reachable. cb gets verdict 1 (reachable; kbps = the neighbour's rough
 * bandwidth figure), 0 (not reachable: detail says why) or -1 (no verdict:
 * the neighbour did not answer, or the request was cancelled because the
 * node is leaving). -1 (and no callback) when there is no neighbour to ask
 * or a probe is still under way; `who` gets the neighbour's address.
 */
int sn_probe_self(struct sn *s, void (*cb)(void *ud, int verdict, const char *detail, double kbps),
                  void *ud, char *who, size_t wholen);

/*
 * Replaces the TURN server the `turn` request issues credentials from (NULL:
 * none, the request is answered `unavailable`). Call it with NULL before
 * stopping that server: the node may still serve requests while it leaves.
 */
void sn_set_turn(struct sn *s, struct turn_server *t);

/* Our identity. */
const struct peer_identity *sn_identity(const struct sn *s);
bool sn_is_member(const struct sn *s);

/*
 * Frees everything. Links still open are dropped without ceremony: call it
 * after sn_leave() has completed, or when the loop is gone. While the loop
 * runs on, wait longer than the TLS handshake timeout after sn_leave():
 * connections accepted just before the listener closed still refer to the
 * node until their handshake ends.
 */
void sn_free(struct sn *s);

#endif
