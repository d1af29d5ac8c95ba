/*
 * The ordinary node's SIP front end (docs/sip.md): a registrar for the
 * node's own user (RFC 3261 section 10.3). A REGISTER from the user's phone
 * becomes the "bindings" of the user's signed location record in the
 * overlay; refreshes and Expires: 0 update it; 200 OK lists the bindings
 * that hold. Requests for another user get 403; so do REGISTERs from outside
 * the phones' networks, and Contacts naming another host than the phone's.
 * Every other request goes to the proxy (proxy.h), which shares the front
 * end's port, told whether it comes from the user's own phone.
 */
#ifndef P2P_REGISTRAR_H
#define P2P_REGISTRAR_H

#include <ev.h>
#include <jansson.h>

#include "config.h"
#include "on.h"
#include "sip.h"

struct registrar;

/* Starts the SIP front end on `listen` for the user `uri` ("sip:alice@overlay"). NULL + err. */
struct registrar *registrar_start(struct ev_loop *loop, struct onode *on, const char *uri,
                                  const char *listen, const struct sip_limits *limits,
                                  int64_t max_expires, char *err, size_t errlen);
/* A SIP message another node delivered through the overlay: {"sip": text, "sn": its SN}. */
void registrar_deliver(struct registrar *r, const char *from, json_t *payload);
/* A SIP message from node `from` (attached to super node sn), on a channel (chan.h). */
void registrar_from_node(struct registrar *r, const char *from, const char *sn, const char *text,
                         size_t len);
struct chans;
/* SIP to other nodes goes through cs (proxy_use_channels()). */
void registrar_use_channels(struct registrar *r, struct chans *cs);
struct media;
/* Its calls with other nodes have their media anchored here (media.h, proxy_use_media). */
void registrar_use_media(struct registrar *r, struct media *md);
/* {"listen", "bindings": [{"contact", "expires_in"}], "counters": {...}} */
json_t *registrar_status(struct registrar *r);
struct dns_resolver;
/* Calls to domains the overlay knows nothing of go where DNS says (proxy_use_dns()). */
void registrar_use_dns(struct registrar *r, struct dns_resolver *dns);
/* REGISTERs are taken only from these networks ("192.168.1.0/24", "fd00::/8", "any"); none
 * given: loopback and private networks (RFC 1918, RFC 6598, RFC 4193, link-local). 0, or -1
 * with err for an entry that is none of these. */
int registrar_phone_networks(struct registrar *r, const struct cfg_strlist *nets, char *err,
                             size_t errlen);
void registrar_stop(struct registrar *r);

#endif
