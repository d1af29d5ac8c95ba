/*
 * The ordinary node's SIP front end (docs/sip.md): a registrar for the
 * node's own user (RFC 3261 section 10.3). A REGISTER from the user's phone
 * becomes the "bindings" of the user's signed location record in the
 * overlay; refreshes and Expires: 0 update it; 200 OK lists the bindings
 * that hold. Requests for another user get 403. Every other request goes
 * to the proxy (proxy.h), which shares the front end's port.
 */
#ifndef P2P_REGISTRAR_H
#define P2P_REGISTRAR_H

#include <ev.h>
#include <jansson.h>

#include "on.h"
#include "sip.h"

struct registrar;

/* Starts the SIP front end on `listen` for the user `uri` ("sip:alice@overlay"). NULL + err. */
struct registrar *registrar_start(struct ev_loop *loop, struct onode *on, const char *uri,
                                  const char *listen, const struct sip_limits *limits,
                                  int64_t max_expires, char *err, size_t errlen);
/* A SIP message another node delivered through the overlay: {"sip": text, "sn": its SN}. */
void registrar_deliver(struct registrar *r, const char *from, json_t *payload);
/* {"listen", "bindings": [{"contact", "expires_in"}], "counters": {...}} */
json_t *registrar_status(struct registrar *r);
struct dns_resolver;
/* Calls to domains the overlay knows nothing of go where DNS says (proxy_use_dns()). */
void registrar_use_dns(struct registrar *r, struct dns_resolver *dns);
void registrar_stop(struct registrar *r);

#endif
