/*
 * The super node's public SIP front end (docs/sip.md, seed 004 sections
 * 4.2-4.4.2, scenario (b) of its Table 1): the P2P registrar and proxy of a
 * SIP domain for classical phones, which know nothing of the overlay.
 *
 * A REGISTER, authenticated by HTTP Digest (RFC 3261 section 22, RFC 2617
 * MD5 with qop=auth) against the users file, becomes the "user location"
 * record of the phone's address-of-record, signed by this super node and
 * stored in the overlay like any other; the overlay document must name this
 * node as a P2P proxy of the domain ("sip_proxies"), or the ring refuses the
 * record. The node also publishes the domain's "proxy location" record.
 * Requests go through the same proxy as an ordinary node's (proxy.h): to a
 * phone registered here, or to wherever the overlay says. Anyone may call
 * into the domain; what leaves it, or claims in its From to come from one of
 * its users, needs that user's Digest credentials (407). Digest nonces are
 * stateless, their nonce counts remembered (a replay is refused), and failed
 * authentications are throttled per source address and per user name.
 *
 * The overlay is reached through an ordinary-node client (on.h) attached to
 * this very super node, so records and lookups take the usual path.
 */
#ifndef P2P_SIPFRONT_H
#define P2P_SIPFRONT_H

#include <ev.h>
#include <jansson.h>

#include "on.h"

struct sipfront_params {
    const char *listen;       /* "host:port", UDP and TCP */
    const char *advertise;    /* what records name (NULL: listen, which must not be a wildcard) */
    const char *domain;       /* the SIP domain served, "pbx.example.org" */
    const char *users_file;   /* "user:HA1" lines, HA1 = MD5(user ":" domain ":" password) */
    const char *overlay;      /* the overlay's own domain (its users register on their nodes) */
    const char *registrar;    /* this node's certificate URI, written into records */
    const char *node_id;      /* this node's Node-ID (hex) */
    int64_t max_expires;      /* longest registration granted */
    double rate;              /* messages per second per source address (0: sip.h's default) */
    struct dns_resolver *dns; /* RFC 3263 for domains the overlay does not know, or NULL */
    bool
        channels; /* the records say so: nodes call its phones on a channel (sipfront_use_channels),
                     which also carries the calls' media when sipfront_use_media anchors it */
};

struct sipfront;

/* NULL with one line in err (users file, listener, ...). `on` must outlive the front end. */
struct sipfront *sipfront_start(struct ev_loop *loop, struct onode *on,
                                const struct sipfront_params *p, char *err, size_t errlen);
/* SIP from another node, on a channel (chan) or through the overlay: answers to the calls this
 * front end sent there, and in-dialog requests of those calls (proxy_from_node()). */
void sipfront_from_node(struct sipfront *f, const char *node, const char *sn, const char *text,
                        size_t len, bool chan);
struct chans;
/* Calls to nodes that take channels go on them (proxy_use_channels()). */
void sipfront_use_channels(struct sipfront *f, struct chans *cs);
struct media;
/* Calls between its phones and the overlay's nodes have their media relayed here, latched to
 * where the phones' packets come from (media.h). */
void sipfront_use_media(struct sipfront *f, struct media *md);
/* {"listen", "domain", "users", "registered", "bindings", "counters", "proxy"} */
json_t *sipfront_status(struct sipfront *f);
void sipfront_stop(struct sipfront *f);

/* "user:HA1" for a users file: HA1 = hex MD5 of user:domain:password. 0, or -1. */
int sipfront_ha1(const char *user, const char *domain, const char *password, char out[33]);

#endif
