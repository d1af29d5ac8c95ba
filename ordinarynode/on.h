/*
 * The ordinary node's core (seed 004 sections 5-6, docs/protocol.md section 5):
 * finds a super node (LAN multicast, host cache, last super node, configured
 * addresses, bootstrap servers, in that order), attaches over mutual TLS, keeps the
 * attachment alive and fails over with jittered exponential back-off, and
 * keeps the node's own records published (the user's location among them)
 * until they are removed or the node stops. One instance per process, on
 * the daemon's loop.
 */
#ifndef P2P_ON_H
#define P2P_ON_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "login_client.h"

struct on_params {
    const char *state_dir;          /* host cache; credentials come in `creds` */
    const struct node_creds *creds; /* loaded by the caller, kept alive while the node runs */
    const char *listen;             /* own overlay port for probes ("host:port"), or NULL */
    const char *advertise;          /* where others reach that port (NULL = listen) */
    const char *const *supernodes;  /* configured super node addresses */
    size_t n_supernodes;
    const char *const *bootstrap_urls; /* https:// base URLs */
    size_t n_bootstrap_urls;
    const char *sip_contact;  /* "host:port" of the local SIP front end, for the user location */
    bool register_user;       /* publish the "user location" record */
    double keepalive_s;       /* our keepalive period; 0: the super node's, at most 5 s */
    double sn_timeout_s;      /* a keepalive unanswered this long means the SN is gone */
    double attach_timeout_s;  /* connect + TLS + attach answer */
    double request_timeout_s; /* any other request */
    double backoff_base_s;    /* first wait before re-attaching (drawn from [0, base)) */
    double backoff_max_s;     /* cap of the doubling waits after failed rounds */
    int64_t record_lifetime_s;
    bool stun;             /* ask the super node's STUN server for the reflexive address */
    const char *lan_group; /* LAN discovery group "239.x.y.z:port" (overlay document) */
    const char *lan_iface; /* IPv4 address of the interface to query on; NULL: no LAN query */
    double lan_timeout_s;  /* how long answers are collected */
    /* Optional: told of every attachment (tools and tests that run many nodes). */
    void (*on_attached)(void *ud, const char *sn_id, const char *sn_addr, const char *source);
    /* Optional: the super node invites us to become one (docs/protocol.md 5.6). */
    void (*on_invite)(void *ud, const char *reason);
    /* Optional: a message delivered through the overlay (protocol.md 5.4) from node `from`. */
    void (*on_deliver)(void *ud, const char *from, json_t *payload);
    /* The user location says: reach this node's SIP front end through the overlay. */
    bool sip_via_overlay;
    /* The user location says: this node takes SIP from other nodes over channels (chan.h); and
     * the node asks its super node for TURN credentials for them. */
    bool channels;
    void *ud;
};

struct onode;

/* Why a request ended. ok: `body` is the "res" body; else `code` and `reason`. */
struct on_result {
    bool ok;
    json_t *body; /* borrowed, valid during the callback */
    const char *code;
    const char *reason;
};
typedef void (*on_result_fn)(void *ud, const struct on_result *r);

/* NULL with one line in err (TLS credentials, listener, ...). */
struct onode *onode_new(struct ev_loop *loop, const struct on_params *p, char *err, size_t errlen);
/* Begins discovery. */
void onode_start(struct onode *o);
/*
 * Graceful stop: removes the records this node published (those that allow
 * it), waits for the answers for at most 3 s, detaches and closes every
 * watcher, then calls done. The loop can end after that.
 */
void onode_stop(struct onode *o, void (*done)(void *ud), void *ud);
/* After the loop has ended (or without start). NULL is fine. */
void onode_free(struct onode *o);

/* {"state", "supernode", "source", "attached_s", "reflexive", "nat", "failovers", ...}. */
json_t *onode_status(struct onode *o);

/*
 * Sends a request of docs/protocol.md 4.5 to the super node (queued while
 * the node is not attached, for at most request_timeout_s). cb is always
 * called, from the loop, never from within this call.
 */
void onode_request(struct onode *o, const char *type, json_t *body, on_result_fn cb, void *ud);

/*
 * Signs and stores a record of this node's user, and keeps it published
 * (refreshed before it expires, stored again after a failover) until it is
 * removed or the node stops. mode "add" or "update"; "remove" takes it out
 * of the published set and stores a removal statement. value is not taken.
 * cb gets the store's answer (with "expires" added on success).
 */
void onode_publish(struct onode *o, const char *mode, const char *type, const char *name,
                   json_t *value, int64_t lifetime_s, bool no_update, on_result_fn cb, void *ud);

/*
 * Looks up a key and verifies every record found (signature, certificate
 * chain, policy). The answer body is {"records": [{"owner", "seq",
 * "expires", "value", "verified": true} or {... "verified": false,
 * "error": "..."}], "hops", "node", "pages"}. A key whose records do not fit
 * one answer is read page by page (docs/protocol.md 4.5), at most 32 pages;
 * past that, or when the super node pages without moving on, the answer holds
 * the pages read and "incomplete": true. A record that is not under the key
 * asked for (rec_answers) is no answer, on every page: it is left out and
 * logged, whoever signed it, and counted in the status ("lookup_mismatches").
 */
void onode_lookup(struct onode *o, const char *key_hex, on_result_fn cb, void *ud);

/*
 * The SIP registrations (docs/sip.md) the user location record carries as
 * "bindings": a JSON array, taken (NULL or empty: none). Call
 * onode_publish() of the user location (value NULL) afterwards to store it.
 */
void onode_set_sip_bindings(struct onode *o, json_t *bindings);

/* The Node-ID (hex) of the super node we are attached to, or NULL when not attached. */
const char *onode_sn_id(const struct onode *o);
/* Our own Node-ID (hex). */
const char *onode_id(const struct onode *o);
/* Calls must reach us through the overlay: configured so, or we are behind NAT. */
bool onode_reach_via_overlay(const struct onode *o);

/* Sends payload (not taken) to node `to`, attached to super node `sn`, through the overlay
 * (protocol.md 5.4); failures are logged. */
void onode_deliver(struct onode *o, const char *to, const char *sn, json_t *payload);
/* Our overlay credentials (for channels between nodes). */
struct tls_ctx *onode_tls(struct onode *o);
/* The super node's STUN server ("ip:port") and our own end of the link to it ("ip:port"), ""
 * when unknown. */
const char *onode_stun_addr(const struct onode *o);
const char *onode_local_addr(const struct onode *o);
/* TURN credentials for the super node's relay (protocol.md 5.8), when it offers one. */
struct on_turn {
    char server[64]; /* "ip:port" */
    char username[128], password[128], realm[128];
    int64_t expires;
    unsigned bandwidth_kbps; /* what one allocation may relay, both ways (0: no limit said) */
};
/* true and *out when valid credentials are held; asks for new ones when they run out. */
bool onode_turn(struct onode *o, struct on_turn *out);

/* ---- for promotion (promo.c): the super node role in this same process ---- */

/* Opens (true) or closes the own overlay port's listener; the super node role takes the port
 * over while it runs. 0, or -1 with err. */
int onode_set_listening(struct onode *o, bool on, char *err, size_t errlen);
/*
 * Attaches to the super node role of this process at addr (our advertised
 * address) from now on: the current attachment is dropped and that address
 * is tried first in every round. onode_attach_self(o, NULL) ends that: the
 * node looks for another super node at once.
 */
void onode_attach_self(struct onode *o, const char *addr);
/* Seconds attached to the current (other) super node; -1 when not attached to one. */
double onode_attached_for(const struct onode *o);
/* Addresses of super nodes we know (the current one first, then the host cache): at most max,
 * pointers valid until the next event. */
size_t onode_known_supernodes(const struct onode *o, const char **out, size_t max);

#endif
