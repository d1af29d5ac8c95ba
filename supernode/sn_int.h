/*
 * Internals of the super node library shared by its files: links and peers
 * (link.c), the ring and routing (ring.c), replication (repl.c).
 */
#ifndef P2P_SN_INT_H
#define P2P_SN_INT_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "conn.h"
#include "record.h"
#include "sn.h"
#include "store.h"

#define SN_MAX_SUCC             32
#define SN_HOP_LIMIT            32
#define SN_FINGERS              NID_BITS
#define SN_MAX_QUEUED           512 /* frames waiting for an outgoing link to open */
#define SN_SYNC_CHUNK           256 /* entries per sync chunk */
#define SN_ADDR_MAX             64
#define SN_TABLE_SIZE           1024 /* buckets of the request tables */
#define SN_MAX_PENDING          20000 /* routed requests in progress before clients get "overloaded" */
#define SN_MAX_PEERS            8192  /* super nodes known at once (a hard bound, docs/ring.md 8) */
#define SN_MAX_UNVERIFIED_DIALS 16    /* links in progress to addresses not yet authenticated */
#define SN_SYNC_MAX_SCAN        65536 /* entries one sync digest may compare (docs/ring.md 8) */
#define SN_SYNC_MAX_PUSH        1024  /* entries one sync chunk may make us push or ask for */
#define SN_MAX_MARKS_IN         1024  /* rollback marks one replicate may make us check */
#define SN_UNREAD_S             5.0   /* a peer leaving half our write queue unread this long */

struct link;

/* A super node we know of. */
struct peer {
    struct peer *next;
    nid_t id;
    char addr[SN_ADDR_MAX]; /* "" while unknown (an incoming link only) */
    struct link *link;      /* the link we use to reach it, or NULL */
    /*
     * addr is authenticated: the node stated it itself on its own link, or a
     * link we dialled there presented its certificate. Hearsay (another
     * node's message) never replaces an authenticated address.
     */
    bool verified;
    double srtt, rttvar; /* seconds; valid when has_rtt */
    bool has_rtt;
    int strikes;             /* consecutive unanswered requests */
    double last_used;        /* last time we sent to or heard from it */
    double dead_at;          /* when it was declared dead (0 = never) */
    double heard_at;         /* last message from it (0 = never) */
    size_t n_preqs;          /* requests to it waiting for an answer */
    bool anon;               /* an address to join through: any super node there will do */
    long attached, capacity; /* its load, as its stabilize messages said (-1 unknown) */
};

struct qframe {
    struct qframe *next;
    uint8_t *buf;
    size_t len;
};

/* First members of struct sn and struct link: an accepted connection's userdata is the sn
 * until it opens and the link afterwards. */
#define SN_MAGIC   0x736e5f5fu
#define LINK_MAGIC 0x6c696e6bu

/* One node-to-node connection. */
struct link {
    uint32_t magic;
    struct link *next, *prev;
    struct link *hnext; /* in the sn's table by serial */
    struct sn *sn;
    struct conn *conn;
    struct peer *peer; /* the super node at the other end, when it is one */
    bool outgoing, open, closing;
    unsigned roles;
    nid_t id; /* the peer's Node-ID (from its certificate) once open */
    bool has_id;
    struct qframe *q_head, *q_tail; /* frames queued before open */
    size_t q_n;
    double last_used;
    uint64_t serial;     /* unique, so that answers can tell a link was replaced */
    size_t n_preqs;      /* our requests on it waiting for an answer */
    struct attached *on; /* the ordinary node attached over this link, if any */
    /*
     * May carry ring traffic to the super node at the other end: a link we
     * opened to a peer, or an accepted one on which ring messages came. An
     * accepted link that only attaches (a promoted node's ordinary side uses
     * its super node certificate too), probes or asks for records is never
     * used to reach that node as a ring member.
     */
    bool ring;
    bool probing;              /* a connect-back probe asked for on this link is under way */
    bool unverified_dial;      /* we dialled an address not yet authenticated (counted in sn) */
    bool verify;               /* dialled to check that a claimed address is the node's */
    char dialled[SN_ADDR_MAX]; /* the address an outgoing link was opened to */
    struct talker *talker;     /* the rate budget of the certificate at the other end */
    double backlog_since;      /* since when over half our write queue waits for it (0: not) */
    bool cut;                  /* closed for abuse (link_admit): its messages are ignored */
};

/* The message budget of one certificate's super node links (docs/ring.md 8). */
struct talker {
    struct talker *next;
    nid_t id;
    unsigned links;
    double tokens, refilled;
    bool warned;
};

/* How a peer's address was learnt (peer_get). */
enum peer_src {
    PEER_HEARSAY = 0, /* named by a third party: fills an unknown address only */
    PEER_OWN,         /* stated by the node itself on its own link, or confirmed by a dial */
};

/* An ordinary node attached to this super node (onsvc.c). */
struct attached {
    struct attached *next; /* hash chain by Node-ID */
    struct attached *all_next, *all_prev;
    struct link *link;
    nid_t id;
    char listen[SN_ADDR_MAX]; /* its own overlay port, for probes ("" if none) */
    double since, last_seen;
    double tokens, refilled; /* request rate limit (token bucket) */
    unsigned inflight;
    bool reachable; /* a connect-back probe succeeded */
    double invited_at;
};

/* The answer to a store request, kept for an origin's retry (ring.c). */
struct store_answer {
    char rid[MSG_TID_LEN + 1];
    nid_t origin;
    double at;
    bool ok;
    char code[32];
    char reason[160];
};
#define SN_STORE_ANSWERS 1024

#define SN_ON_BUCKETS   4096
#define SN_LINK_BUCKETS 4096
#define SN_REMEMBER     8

/* A request we sent on a link, waiting for its res/err there. */
struct preq;
typedef void (*preq_cb)(struct sn *s, struct preq *r, const struct msg *m, const char *failure);
struct preq {
    struct preq *next;
    char tid[MSG_TID_LEN + 1];
    struct sn *sn;
    struct peer *peer;
    uint64_t link_serial;
    ev_timer timer;
    double sent_at;
    preq_cb cb;
    void *ud;
    long long arg;
};

/* A routed request this node originated, waiting for the responsible node's reply. */
struct rreq;
typedef void (*rreq_cb)(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                        const char *reason, int hops, json_t *node);
struct rreq {
    struct rreq *next;
    char rid[MSG_TID_LEN + 1];
    struct sn *sn;
    nid_t target;
    char op[16];
    json_t *args;
    ev_timer timer;
    double started;
    int attempts;
    rreq_cb cb;
    /* The client waiting for the answer (a get/store/find request on a link). */
    uint64_t client_serial;
    struct link *client;
    char client_tid[MSG_TID_LEN + 1];
    char client_type[16];
    long long arg;
    void *ud;
};

#define SN_REQ_TYPES   4 /* get, store, find, deliver */
#define SN_LAT_BUCKETS 10

enum sn_state { SN_IDLE = 0, SN_JOINING, SN_MEMBER, SN_LEAVING, SN_LEFT };

struct sn_counters {
    uint64_t originated, forwarded, answered, hops_sum, replies, timeouts, refused;
    uint64_t replicated_in, replicated_out, sync_rounds, dropped_replicas;
    uint64_t attaches, redirects, rate_limited, delivered, moved;
    /* refused by the checks of docs/ring.md 8 */
    uint64_t replies_refused, joins_refused, routes_refused, dials_refused, links_cut,
        syncs_refused;
    /* client requests (protocol.md 4.5, 5.4) by type and outcome, with latency histograms */
    uint64_t req_ok[SN_REQ_TYPES], req_err[SN_REQ_TYPES];
    double req_seconds[SN_REQ_TYPES];
    uint64_t req_le[SN_REQ_TYPES][SN_LAT_BUCKETS];
};

struct sn {
    uint32_t magic;
    struct ev_loop *loop;
    struct sn_params p;
    char *overlay, *advertise, *stun_addr;
    struct tls_ctx *tls;
    struct listener *listener;
    const struct peer_identity *self_id;
    nid_t id;
    char id_hex[NID_HEX_LEN + 1];
    gnutls_x509_crt_t ca;
    struct rec_verifier *verifier;
    struct store *store;
    size_t max_frame;

    enum sn_state state;
    double started_at;
    struct link links; /* list head */
    struct link *link_hash[SN_LINK_BUCKETS];
    struct store_answer store_answers[SN_STORE_ANSWERS];
    size_t n_links;
    uint64_t next_serial;
    struct peer *peers;
    size_t n_peers;
    struct talker *talkers;
    /* dials to addresses not yet authenticated: in progress, and a token bucket */
    size_t n_unverified_dials;
    double dial_tokens, dial_refilled;
    /* why the last peer_link() returned NULL was our own trouble (descriptors, caps,
     * budgets), not the peer's: nobody is declared dead for it */
    bool dial_local;
    double last_local_warn;

    /* Chord */
    struct peer *pred;
    struct peer *succ[SN_MAX_SUCC];
    unsigned n_succ;
    struct peer *finger[SN_FINGERS];
    unsigned next_finger;
    bool stabilizing;

    /* join */
    bool rejoining; /* alone, asking a known node to take us back */
    double next_rejoin;
    char remembered[SN_REMEMBER][SN_ADDR_MAX]; /* last successors' addresses */
    size_t n_remembered;
    char **join_addrs;
    size_t n_join, join_next;
    double join_backoff;
    ev_timer join_timer;

    ev_timer tick;      /* stabilise, fix fingers, failure checks */
    ev_timer sync_tick; /* anti-entropy and expiry */
    ev_timer sync_soon; /* a ring change asks for a sync round shortly */
    double last_sync;

    struct preq *preqs[SN_TABLE_SIZE];
    size_t n_preqs;
    struct rreq *rreqs[SN_TABLE_SIZE];
    size_t n_rreqs;

    /* leaving */
    void (*leave_done)(void *);
    void *leave_ud;
    ev_timer leave_timer;
    size_t leave_pending;
    size_t n_offers;     /* unconfirmed copies offered to their responsible nodes */
    size_t marks_cursor; /* where the next push of rollback marks starts (repl.c) */

    /* ordinary nodes (onsvc.c) */
    struct attached *on_hash[SN_ON_BUCKETS];
    struct attached on_all; /* list head */
    size_t n_attached;
    bool had_peers;     /* we have been part of a ring of more than one */
    double alone_since; /* when we lost our last successor after having peers (0 = not) */
    bool healthy;
    unsigned route_failures; /* routed requests of ours timing out in a row */
    double last_reply_at;    /* when a reply to one of our routed requests last came */

    struct sn_counters c;

    /* sn_probe_self(): one at a time */
    void (*self_probe_cb)(void *ud, int verdict, const char *detail, double kbps);
    void *self_probe_ud;
};

/* ---- link.c ---- */
double sn_now(struct sn *s);
/* Find or create; addr (may be NULL) as src says; NULL at the table's bound. */
struct peer *peer_get(struct sn *s, const nid_t *id, const char *addr, enum peer_src src);
struct peer *peer_find(struct sn *s, const nid_t *id);
/* The peer as {"id","addr"} (new reference). */
json_t *peer_json(const struct peer *p);
json_t *self_json(struct sn *s);
/* Parses {"id","addr"}; 0 or -1. */
int peer_parse(json_t *j, nid_t *id, char *addr, size_t addrlen);
/* Sends a message to a peer, opening a link to it when needed. 0 or -1. */
int peer_send(struct sn *s, struct peer *p, const char *type, enum msg_kind kind, const char *tid,
              json_t *body);
/* Sends an encoded frame (prefix included) to a peer; for one message to several peers. */
int peer_send_frame(struct sn *s, struct peer *p, const uint8_t *frame, size_t len);
/* The same on a given link to p. */
struct preq *link_request(struct sn *s, struct link *l, struct peer *p, const char *type,
                          json_t *body, double timeout_s, preq_cb cb, void *ud);
/*
 * Dials addr, where p claims to be (a join routed through others), within the
 * budget of unverified dials; the link's certificate must carry p's Node-ID,
 * and then addr becomes p's authenticated address. NULL when refused.
 */
struct link *link_dial_verify(struct sn *s, struct peer *p, const char *addr);
/* A request with a response callback; timeout from the peer's RTT when timeout_s <= 0. */
struct preq *peer_request(struct sn *s, struct peer *p, const char *type, json_t *body,
                          double timeout_s, preq_cb cb, void *ud);
int link_send(struct link *l, const char *type, enum msg_kind kind, const char *tid, json_t *body);
void link_send_error(struct link *l, const char *tid, const char *code, const char *reason);
double peer_rto(const struct peer *p);
/* Drops a peer from the ring state (it failed or left). */
void peer_dead(struct sn *s, struct peer *p, const char *why);
/* A send to p failed: p is dead unless the failure was ours (s->dial_local). */
void peer_send_failed(struct sn *s, struct peer *p, const char *why);
/* Would a dial to an address not yet authenticated be allowed now (nothing is consumed)? */
bool unverified_dial_possible(struct sn *s);
/* Counts and logs (at most once per 5 s) a dial refused for that budget. */
void unverified_dial_refused(struct sn *s, const nid_t *id, const char *addr);
/* The open super node link whose certificate carries id, or NULL. */
struct link *link_to(struct sn *s, const nid_t *id);
bool peer_in_ring(const struct sn *s, const struct peer *p);
/* Closes idle links and frees unused peers: only where no peer pointer is held (the tick). */
void links_gc(struct sn *s);
struct link *link_by_serial(struct sn *s, struct link *l, uint64_t serial);
bool link_is_sn(const struct link *l);
/* A ring message came on an accepted link: the link may now reach its sender as a peer. */
void link_ring_traffic(struct sn *s, struct link *l);
void preq_cancel_all(struct sn *s);
int sn_listen(struct sn *s, char *err, size_t errlen);

/* ---- ring.c ---- */
void ring_message(struct sn *s, struct link *l, const struct msg *m);
void ring_peer_lost(struct sn *s, struct peer *p, const char *why);
bool ring_is_primary(const struct sn *s, const nid_t *key);
/* Do we know `need` live nodes (not us) in [from, to)? Peers we heard from lately (3 periods,
 * link still up) and super node links with ring traffic as lately, each counted once by its
 * certificate's Node-ID: evidence no single peer can make up. */
bool ring_live_at_least(const struct sn *s, const nid_t *from, const nid_t *to, size_t need);
void ring_changed(struct sn *s);
/* The hand-off of a leaving node is done when nothing of it is pending any more. */
void sn_leave_handoff_done(struct sn *s);
/* Routed requests this node originates (the callback runs exactly once). */
struct rreq *rreq_start(struct sn *s, const nid_t *target, const char *op, json_t *args,
                        rreq_cb cb);
void rreq_launch(struct sn *s, struct rreq *r);

/* ---- onsvc.c ---- */
void onsvc_init(struct sn *s);
/* Handles attach, keepalive, deliver and probe; false when m is none of them. */
bool onsvc_message(struct sn *s, struct link *l, const struct msg *m);
/* May this link send record requests now? Answers the error itself when not. */
bool onsvc_admit_request(struct sn *s, struct link *l, const struct msg *m);
void onsvc_request_done(struct sn *s, struct link *l);
void onsvc_link_closed(struct sn *s, struct link *l);
void onsvc_tick(struct sn *s);
void onsvc_free(struct sn *s);
/* Routed op "deliver" at the target super node. */
void onsvc_deliver_here(struct sn *s, json_t *args, const char *origin_hex, const char **code,
                        char *err, size_t errlen);
/* Peers to offer ordinary nodes (alternates), most spare capacity first: new array reference. */
json_t *onsvc_alternates(struct sn *s, size_t max);

/* ---- repl.c ---- */
void repl_after_store(struct sn *s, json_t *env);
void repl_on_replicate(struct sn *s, struct link *l, const struct msg *m);
void repl_on_sync(struct sn *s, struct link *l, const struct msg *m);
void repl_round(struct sn *s);
void repl_on_offer(struct sn *s, json_t *args, const char **code, char *err, size_t errlen);
void repl_handoff(struct sn *s, struct peer *to);
/* Verifies and applies one record; returns a store/rec status (0 = stored). */
int repl_apply(struct sn *s, json_t *env, enum store_mode mode, char *err, size_t errlen,
               const char **code);

#endif
