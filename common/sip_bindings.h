/*
 * The bindings of one address-of-record (RFC 3261 section 10.3), shared by
 * the ordinary node's registrar (one user) and the super node's P2P
 * registrar (the users of a domain, docs/sip.md): how a REGISTER changes
 * them, and the 200 OK that lists them.
 */
#ifndef P2P_SIP_BINDINGS_H
#define P2P_SIP_BINDINGS_H

#include <jansson.h>
#include <osipparser2/osip_parser.h>
#include <stddef.h>
#include <stdint.h>

#include "sip.h"

#define SIPB_MAX         8    /* bindings per address-of-record */
#define SIPB_MIN_EXPIRES 60   /* shorter registrations get 423 (10.3 step 7) */
#define SIPB_DEF_EXPIRES 3600 /* when neither the Contact nor the request says */

struct sip_binding {
    char contact[256]; /* the Contact URI, as the phone wrote it */
    int64_t expires;   /* epoch seconds */
    char call_id[128];
    unsigned long cseq;
    uint64_t order; /* when it was registered or refreshed, in registrations counted */
    char flow[64];  /* "ip:port" the REGISTER came from over UDP, where requests to it go (a
                       phone behind NAT is reached there, not at its Contact); "" over TCP */
};

struct sip_bindings {
    struct sip_binding b[SIPB_MAX];
    size_t n;
};

/*
 * Applies REGISTER `m` to *bs at `now` (10.3 steps 6-8): contacts added,
 * refreshed (expiry capped at max_expires) or removed, "Contact: *" with
 * Expires: 0, CSeq order within a Call-ID. *order counts registrations (the
 * most recent binding is the one with the highest order). Returns 0 when
 * *bs changed, 1 for a query (no Contact; *bs unchanged), or a SIP status
 * (400, 403, 423, 500) with *reason, *bs unchanged.
 */
int sip_bindings_apply(struct sip_bindings *bs, const osip_message_t *m, int64_t now,
                       int64_t max_expires, uint64_t *order, const char **reason);
/* Drops bindings expired at `now`; returns how many. */
size_t sip_bindings_expire(struct sip_bindings *bs, int64_t now);
/* The Contact of the binding registered (or refreshed) last, or NULL. */
const char *sip_bindings_latest(const struct sip_bindings *bs);
/* The binding registered (or refreshed) last, or NULL. */
const struct sip_binding *sip_bindings_latest_binding(const struct sip_bindings *bs);
/* After sip_bindings_apply() moved the count from `since`: the bindings it made or refreshed
 * remember where the REGISTER came from (its UDP source; a TCP one: none). */
void sip_bindings_note_flow(struct sip_bindings *bs, uint64_t since, const struct sip_source *from);
/* [{"contact", "expires"}] (epoch seconds), new reference. */
json_t *sip_bindings_json(const struct sip_bindings *bs);
/* [{"contact", "expires_in"}], for status. */
json_t *sip_bindings_status(const struct sip_bindings *bs, int64_t now);
/* Sends the 200 OK to a REGISTER: one Contact per binding with its remaining expiry. */
void sip_bindings_reply(struct sip_endpoint *ep, const struct sip_bindings *bs,
                        const osip_message_t *req, const struct sip_source *from, int64_t now);
/* A REGISTER waiting for the overlay to store the bindings it changed. */
struct sip_reg_wait {
    osip_message_t *req; /* a copy; NULL: nobody waits (a store after bindings expired) */
    struct sip_source from;
    struct sip_bindings old; /* the bindings before it */
};

/* Keeps what answering req needs (req NULL: nothing). 0, or -1 when out of memory. */
int sip_reg_wait_keep(struct sip_reg_wait *w, const osip_message_t *req,
                      const struct sip_source *from, const struct sip_bindings *old);
/*
 * The overlay's answer to the store of *bs, the bindings of `aor`: logged;
 * the phone gets 200 with the bindings, or, on failure, *bs goes back to
 * what it was and the phone gets 503. ep NULL (the front end stopped): no
 * answer. Frees the kept request. Returns 1 when a phone got its 200, 0 for
 * a store nobody waited for, -1 for a failure.
 */
int sip_reg_wait_done(struct sip_reg_wait *w, struct sip_endpoint *ep, struct sip_bindings *bs,
                      const char *aor, bool ok, const char *code, const char *reason);
/* Whether m is a retransmission of the REGISTER w waits with (same Call-ID and CSeq). */
bool sip_reg_wait_same(const struct sip_reg_wait *w, const osip_message_t *m);
/* 500 with Retry-After: 1 while a registration of the same address-of-record is being stored. */
void sip_reply_busy(struct sip_endpoint *ep, const osip_message_t *req,
                    const struct sip_source *from);
/* [{"transport": "udp"|"tcp", "host", "port"}] for a front end at "host:port" (records' contacts).
 */
json_t *sip_contacts_json(const char *hostport);

/* Sends the refusal sip_bindings_apply() chose (423 carries Min-Expires). */
void sip_bindings_refuse(struct sip_endpoint *ep, const osip_message_t *req,
                         const struct sip_source *from, int code, const char *reason);

#endif
