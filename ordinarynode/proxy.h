/*
 * The ordinary node's SIP proxy (RFC 3261 section 16, docs/sip.md): a
 * request for a user of the overlay is routed by looking up the callee's
 * signed location record and forwarded to the callee's node, which forwards
 * it to the phone registered there; Via and Record-Route keep responses and
 * in-dialog requests on that path. Transaction stateful: retransmissions,
 * CANCEL, the ACK of a non-2xx answer, 100 Trying, UDP retransmission of what
 * it forwards, and a timeout answered 480.
 */
#ifndef P2P_PROXY_H
#define P2P_PROXY_H

#include <ev.h>

#include "on.h"
#include "sip.h"

struct proxy;

/* For address-of-record `aor` ("alice@example.org"): *local = whether its phones register here
 * (then the call goes to the phone returned: the most recent binding, or NULL for none); else
 * the overlay is asked. */
typedef const char *(*proxy_binding_fn)(void *ud, const char *aor, bool *local);

/* `domain`: the overlay's own SIP domain; a user of another one is looked up, then that domain's
 * P2P proxy (its "proxy location" record). A node reached through the overlay
 * (onode_reach_via_overlay) says so in its Record-Route. */
struct proxy *proxy_new(struct ev_loop *loop, struct onode *on, struct sip_endpoint *ep,
                        const char *domain, proxy_binding_fn binding, void *ud);
struct dns_resolver;
/* Other domains the overlay knows nothing of are located through DNS (RFC 3263, dns.h); NULL:
 * they get 404. The resolver is the caller's and outlives the proxy. */
void proxy_use_dns(struct proxy *px, struct dns_resolver *dns);
/* This proxy is the P2P proxy of `domain`: its users are looked up, never sent to a proxy. */
void proxy_serve_domain(struct proxy *px, const char *domain);
void proxy_request(struct proxy *px, osip_message_t *req, const struct sip_source *from);
void proxy_response(struct proxy *px, osip_message_t *resp, const struct sip_source *from);
/* Counters for status: {"forwarded", "not_found", "unavailable", ...} (new reference). */
json_t *proxy_status(struct proxy *px);
void proxy_free(struct proxy *px);

#endif
