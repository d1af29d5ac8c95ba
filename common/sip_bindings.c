/*
 * Bindings of an address-of-record (sip_bindings.h).
 */
#include "sip_bindings.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"

#define LOGM "sip"

static struct sip_binding *find(struct sip_bindings *bs, const char *contact)
{
    for (size_t i = 0; i < bs->n; i++)
        if (!strcmp(bs->b[i].contact, contact))
            return &bs->b[i];
    return NULL;
}

static void drop(struct sip_bindings *bs, struct sip_binding *b)
{
    size_t i = (size_t)(b - bs->b);
    memmove(&bs->b[i], &bs->b[i + 1], (bs->n - i - 1) * sizeof(*b));
    bs->n--;
}

/* Works on a copy, so that a refusal half-way leaves *bs as it was. */
int sip_bindings_apply(struct sip_bindings *bs, const osip_message_t *m, int64_t now,
                       int64_t max_expires, uint64_t *order, const char **reason)
{
    long def = SIPB_DEF_EXPIRES;
    osip_header_t *eh = NULL;
    if (osip_message_get_expires((osip_message_t *)m, 0, &eh) >= 0 && eh && eh->hvalue) {
        char *end;
        def = strtol(eh->hvalue, &end, 10);
        if (*end || def < 0) {
            *reason = "Bad Expires";
            return 400;
        }
    }
    int n_contacts = osip_list_size(&m->contacts);
    if (n_contacts == 0)
        return 1;
    unsigned long cseq = strtoul(m->cseq->number, NULL, 10);
    const char *call_id = m->call_id->number;
    struct sip_bindings nb = *bs;
    uint64_t ord = *order;
    for (int i = 0; i < n_contacts; i++) {
        osip_contact_t *c = osip_list_get(&m->contacts, i);
        if (!c->url) { /* "Contact: *": every binding goes, and only with Expires: 0 */
            if (n_contacts != 1 || def != 0) {
                *reason = "Wildcard Contact Needs Expires 0";
                return 400;
            }
            nb.n = 0;
            break;
        }
        char *u = NULL;
        if (osip_uri_to_str(c->url, &u) != 0 || !u || strlen(u) >= sizeof(nb.b[0].contact)) {
            osip_free(u);
            *reason = "Bad Contact";
            return 400;
        }
        long exp = def;
        osip_generic_param_t *ep = NULL;
        if (osip_contact_param_get_byname(c, "expires", &ep) == 0 && ep && ep->gvalue)
            exp = strtol(ep->gvalue, NULL, 10);
        if (exp > 0 && exp < SIPB_MIN_EXPIRES) {
            osip_free(u);
            *reason = NULL;
            return 423;
        }
        if (exp > max_expires)
            exp = (long)max_expires;
        struct sip_binding *b = find(&nb, u);
        if (b && !strcmp(b->call_id, call_id) && cseq <= b->cseq) {
            osip_free(u);
            *reason = "Out Of Order CSeq";
            return 500;
        }
        if (exp <= 0) {
            if (b)
                drop(&nb, b);
        } else {
            if (!b) {
                if (nb.n == SIPB_MAX) {
                    osip_free(u);
                    *reason = "Too Many Bindings";
                    return 403;
                }
                b = &nb.b[nb.n++];
                snprintf(b->contact, sizeof(b->contact), "%s", u);
            }
            b->expires = now + exp;
            b->order = ++ord;
            snprintf(b->call_id, sizeof(b->call_id), "%s", call_id);
            b->cseq = cseq;
        }
        osip_free(u);
    }
    *bs = nb;
    *order = ord;
    return 0;
}

size_t sip_bindings_expire(struct sip_bindings *bs, int64_t now)
{
    size_t gone = 0;
    for (size_t i = bs->n; i > 0; i--)
        if (bs->b[i - 1].expires <= now) {
            drop(bs, &bs->b[i - 1]);
            gone++;
        }
    return gone;
}

const struct sip_binding *sip_bindings_latest_binding(const struct sip_bindings *bs)
{
    const struct sip_binding *best = NULL;
    for (size_t i = 0; i < bs->n; i++)
        if (!best || bs->b[i].order > best->order)
            best = &bs->b[i];
    return best;
}

const char *sip_bindings_latest(const struct sip_bindings *bs)
{
    const struct sip_binding *best = sip_bindings_latest_binding(bs);
    return best ? best->contact : NULL;
}

void sip_bindings_note_flow(struct sip_bindings *bs, uint64_t since, const struct sip_source *from)
{
    for (size_t i = 0; i < bs->n; i++)
        if (bs->b[i].order > since)
            snprintf(bs->b[i].flow, sizeof(bs->b[i].flow), "%s", from->tcp ? "" : from->addr);
}

json_t *sip_bindings_json(const struct sip_bindings *bs)
{
    json_t *a = json_array();
    for (size_t i = 0; i < bs->n; i++)
        json_array_append_new(a, json_pack("{s:s,s:I}", "contact", bs->b[i].contact, "expires",
                                           (json_int_t)bs->b[i].expires));
    return a;
}

json_t *sip_bindings_status(const struct sip_bindings *bs, int64_t now)
{
    json_t *a = json_array();
    for (size_t i = 0; i < bs->n; i++)
        json_array_append_new(a, json_pack("{s:s,s:I}", "contact", bs->b[i].contact, "expires_in",
                                           (json_int_t)(bs->b[i].expires - now)));
    return a;
}

void sip_bindings_reply(struct sip_endpoint *ep, const struct sip_bindings *bs,
                        const osip_message_t *req, const struct sip_source *from, int64_t now)
{
    osip_message_t *resp = sip_response_for(req, 200, NULL);
    if (!resp)
        return;
    for (size_t i = 0; i < bs->n; i++) {
        char c[320];
        snprintf(c, sizeof(c), "<%s>;expires=%lld", bs->b[i].contact,
                 (long long)(bs->b[i].expires > now ? bs->b[i].expires - now : 0));
        osip_message_set_contact(resp, c);
    }
    char err[256];
    if (sip_send(ep, resp, from, err, sizeof(err)) != 0)
        log_info(LOGM, "200 to %s not sent: %s", from->addr, err);
    osip_message_free(resp);
}

void sip_bindings_refuse(struct sip_endpoint *ep, const osip_message_t *req,
                         const struct sip_source *from, int code, const char *reason)
{
    if (code != 423) {
        sip_reply(ep, req, from, code, reason);
        return;
    }
    osip_message_t *resp = sip_response_for(req, 423, NULL);
    if (!resp)
        return;
    char mn[16], err[200];
    snprintf(mn, sizeof(mn), "%d", SIPB_MIN_EXPIRES);
    osip_message_set_header(resp, "Min-Expires", mn);
    if (sip_send(ep, resp, from, err, sizeof(err)) != 0)
        log_info(LOGM, "423 to %s not sent: %s", from->addr, err);
    osip_message_free(resp);
}

int sip_reg_wait_keep(struct sip_reg_wait *w, const osip_message_t *req,
                      const struct sip_source *from, const struct sip_bindings *old)
{
    memset(w, 0, sizeof(*w));
    if (!req)
        return 0;
    if (osip_message_clone(req, &w->req) != 0)
        return -1;
    w->from = *from;
    w->old = *old;
    return 0;
}

int sip_reg_wait_done(struct sip_reg_wait *w, struct sip_endpoint *ep, struct sip_bindings *bs,
                      const char *aor, bool ok, const char *code, const char *reason)
{
    int rc = ok ? (w->req ? 1 : 0) : -1;
    if (ep && ok && w->req) {
        /* debug: a registrar serving many phones would log every refresh */
        log_debug(LOGM, "%s: %zu binding%s of %s stored in the overlay", w->from.addr, bs->n,
                  bs->n == 1 ? "" : "s", aor);
        sip_bindings_reply(ep, bs, w->req, &w->from, (int64_t)time(NULL));
    } else if (ep && !ok) {
        log_warn(LOGM, "registration of %s not stored in the overlay: %s: %s", aor, code, reason);
        if (w->req) { /* the phone hears of it and the bindings stay as they were */
            *bs = w->old;
            char why[300];
            snprintf(why, sizeof(why), "Overlay Store Failed (%s)", code);
            sip_reply(ep, w->req, &w->from, 503, why);
        }
    }
    if (w->req)
        osip_message_free(w->req);
    w->req = NULL;
    return rc;
}

bool sip_reg_wait_same(const struct sip_reg_wait *w, const osip_message_t *m)
{
    return w->req && !strcmp(w->req->call_id->number, m->call_id->number) &&
           !strcmp(w->req->cseq->number, m->cseq->number);
}

void sip_reply_busy(struct sip_endpoint *ep, const osip_message_t *req,
                    const struct sip_source *from)
{
    osip_message_t *resp = sip_response_for(req, 500, "Registration In Progress");
    if (!resp)
        return;
    osip_message_set_header(resp, "Retry-After", "1");
    char err[200];
    sip_send(ep, resp, from, err, sizeof(err));
    osip_message_free(resp);
}

json_t *sip_contacts_json(const char *hostport)
{
    char host[128];
    unsigned port = 0;
    json_t *c = json_array();
    if (hostport && cfg_parse_hostport(hostport, host, sizeof(host), &port) == 0) {
        json_array_append_new(
            c, json_pack("{s:s,s:s,s:i}", "transport", "udp", "host", host, "port", (int)port));
        json_array_append_new(
            c, json_pack("{s:s,s:s,s:i}", "transport", "tcp", "host", host, "port", (int)port));
    }
    return c;
}
