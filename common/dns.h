/*
 * Locating a SIP server of a domain through DNS (RFC 3263, section 4),
 * asynchronously on the event loop: for sip:user@domain, the SRV records
 * _sip._udp.<domain> (lowest priority first, the heaviest weight among
 * equals), the target's address from the answer's additional section or an
 * A query; without SRV records, the domain's A record and port 5060. A URI
 * with an explicit port skips SRV (4.2). NAPTR is not queried: the client
 * speaks UDP, which RFC 3263 lets it assume without one. IPv4 only.
 *
 * Queries go over UDP to one server ("host:port"), 1 s per try, 3 tries.
 */
#ifndef P2P_DNS_H
#define P2P_DNS_H

#include <ev.h>

struct dns_resolver;

/* server: "a.b.c.d:port"; NULL: the first IPv4 nameserver of /etc/resolv.conf. NULL + err. */
struct dns_resolver *dns_new(struct ev_loop *loop, const char *server, char *err, size_t errlen);
/* Outstanding queries end, their callbacks called with "resolver stopped". NULL is fine. */
void dns_free(struct dns_resolver *r);

/* hostport: "a.b.c.d:port" of the server to use, or NULL with err (one line). */
typedef void (*dns_sip_fn)(void *ud, const char *hostport, const char *err);

/* Locates the SIP server of `domain` (port: the URI's, or 0). cb is always called later, from
 * the loop. */
void dns_locate_sip(struct dns_resolver *r, const char *domain, unsigned port, dns_sip_fn cb,
                    void *ud);

#endif
