/*
 * The ordinary node's SIP proxy (RFC 3261 section 16, docs/sip.md): a
 * request for a user of the overlay is routed by looking up the callee's
 * signed location record and forwarded to the callee's node, which forwards
 * it to the phone registered there; Via and Record-Route keep responses and
 * in-dialog requests on that path. Transaction stateful: retransmissions,
 * CANCEL, the ACK of a non-2xx answer, 100 Trying, UDP retransmission of what
 * it forwards, and a timeout answered 408.
 *
 * It is no open relay (docs/sip.md, "Who may use the proxy"): a request from
 * outside (anyone who reaches the port, or a node through the overlay)
 * reaches only this proxy's own users, the phones registered here; only the
 * owner's own phones may call further: the users the overlay resolves, and
 * other domains through DNS when enabled. Nothing is sent to an address
 * because a request named it: in-dialog requests go to the parties the
 * dialog's INVITE came from and went to, responses back along the
 * transaction or the dialog.
 */
#ifndef P2P_PROXY_H
#define P2P_PROXY_H

#include <ev.h>

#include "on.h"
#include "sip.h"

struct proxy;

/* For address-of-record `aor` ("alice@example.org"): *local = whether its phones register here
 * (then the call goes to the phone returned: the most recent binding's Contact, or NULL for none;
 * sent to *flow, "ip:port", when not NULL: where the phone registered from, behind its NAT);
 * else the overlay is asked. */
typedef const char *(*proxy_binding_fn)(void *ud, const char *aor, bool *local, const char **flow);

/* `domain`: the overlay's own SIP domain; a user of another one is looked up, then that domain's
 * P2P proxy (its "proxy location" record). A node reached through the overlay
 * (onode_reach_via_overlay) says so in its Record-Route. */
struct proxy *proxy_new(struct ev_loop *loop, struct onode *on, struct sip_endpoint *ep,
                        const char *domain, proxy_binding_fn binding, void *ud);
struct dns_resolver;
/* Other domains the overlay knows nothing of are located through DNS (RFC 3263, dns.h); NULL:
 * they get 404. The resolver is the caller's and outlives the proxy. */
void proxy_use_dns(struct proxy *px, struct dns_resolver *dns);
struct chans;
/* Other nodes that take channels (their location record says "channels") are reached on one
 * (chan.h), and SIP to any node goes through cs, which falls back to the overlay; NULL: every
 * message to a node goes through the overlay. cs is the caller's and outlives the proxy. */
void proxy_use_channels(struct proxy *px, struct chans *cs);
struct media;
/* Calls between this proxy's phones and other nodes have their media anchored here (media.h):
 * the SDP of what passes between them is rewritten. md is the caller's and outlives the proxy. */
void proxy_use_media(struct proxy *px, struct media *md);
/* A SIP message from node `node` (attached to super node sn), on a channel (chan true) or
 * through the overlay: parsed and handed to the proxy as from outside (responses along their
 * transaction, requests to this proxy's own users and dialogs only); a REGISTER is answered
 * 403, since bindings are made by phones. Garbage is logged and dropped. */
void proxy_from_node(struct proxy *px, const char *node, const char *sn, const char *text,
                     size_t len, bool chan);
/* This proxy is the P2P proxy of `domain`: its users are looked up, never sent to a proxy. */
void proxy_serve_domain(struct proxy *px, const char *domain);

/* Who sent a request, as the proxy's owner found out. */
enum proxy_origin {
    PROXY_OUTSIDE, /* anyone who reaches the port, or a node through the overlay: reaches only
                      this proxy's own users (their registered phones) and the parties of the
                      dialogs it is in; anything else gets 403 and is logged */
    PROXY_OWN,     /* a phone of this proxy's own (registered from that source, or authenticated
                      by the owner): may also call the overlay's users, other domains (their P2P
                      proxy, or DNS when enabled) and, with DNS on, a literal address */
};
void proxy_request_from(struct proxy *px, osip_message_t *req, const struct sip_source *from,
                        enum proxy_origin origin);
/* Whether req would be taken from outside (it reaches only this proxy's own users or a party of
 * one of its dialogs): an owner that can authenticate its phones (Digest) challenges the others
 * first, then passes them as PROXY_OWN. */
bool proxy_admits(struct proxy *px, const osip_message_t *req, const struct sip_source *from);
/* proxy_request_from(PROXY_OWN): for an owner that authenticated the sender itself. */
void proxy_request(struct proxy *px, osip_message_t *req, const struct sip_source *from);
void proxy_response(struct proxy *px, osip_message_t *resp, const struct sip_source *from);
/* Counters for status: {"forwarded", "not_found", "unavailable", "refused", "dialogs", ...}
 * (new reference). */
json_t *proxy_status(struct proxy *px);
void proxy_free(struct proxy *px);

#endif
