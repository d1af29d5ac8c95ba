/*
 * The ordinary node's registrar (registrar.h, RFC 3261 section 10.3).
 */
#include "registrar.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "log.h"
#include "nodeid.h"
#include "proxy.h"
#include "record.h"

#define LOGM            "sip"
#define MAX_BINDINGS    8
#define REG_MIN_EXPIRES 60   /* shorter registrations get 423 (RFC 3261 10.3 step 7) */
#define REG_DEF_EXPIRES 3600 /* when neither the Contact nor the request says */
#define BUSY_RETRY_S    0.05 /* a store found the record being stored: again this much later */
#define BUSY_TRIES      40

struct binding {
    char contact[256]; /* the Contact URI, as the phone wrote it */
    int64_t expires;   /* epoch seconds */
    char call_id[128];
    unsigned long cseq;
    uint64_t order; /* when it was registered or refreshed, in registrations counted */
};

struct pending; /* a REGISTER waiting for the overlay's answer */

struct registrar {
    struct ev_loop *loop;
    struct onode *on;
    char uri[256];
    char aor[256]; /* user@host of our user */
    int64_t max_expires;
    struct sip_endpoint *ep;
    struct proxy *px;
    struct binding b[MAX_BINDINGS];
    size_t n;
    struct pending *pending;
    uint64_t registrations;
    ev_timer expiry;
    ev_timer retry; /* the pending store again, after a "busy" */
    uint64_t registers, ok, forbidden, failed;
};

struct pending {
    struct registrar *r; /* NULL once the registrar stopped */
    unsigned tries;      /* stores found the record busy */
    osip_message_t *req; /* NULL for a publication after expiry */
    struct sip_source from;
    struct binding old[MAX_BINDINGS];
    size_t n_old;
};

static json_t *bindings_json(const struct registrar *r)
{
    json_t *a = json_array();
    for (size_t i = 0; i < r->n; i++)
        json_array_append_new(a, json_pack("{s:s,s:I}", "contact", r->b[i].contact, "expires",
                                           (json_int_t)r->b[i].expires));
    return a;
}

static void reply_bindings(struct registrar *r, const osip_message_t *req,
                           const struct sip_source *from)
{
    osip_message_t *resp = sip_response_for(req, 200, NULL);
    if (!resp)
        return;
    int64_t now = (int64_t)time(NULL);
    for (size_t i = 0; i < r->n; i++) {
        char c[320];
        snprintf(c, sizeof(c), "<%s>;expires=%lld", r->b[i].contact,
                 (long long)(r->b[i].expires > now ? r->b[i].expires - now : 0));
        osip_message_set_contact(resp, c);
    }
    char err[256];
    if (sip_send(r->ep, resp, from, err, sizeof(err)) != 0)
        log_info(LOGM, "200 to %s not sent: %s", from->addr, err);
    osip_message_free(resp);
}

static void stored(void *ud, const struct on_result *res)
{
    struct pending *p = ud;
    struct registrar *r = p->r;
    if (r && !res->ok && !strcmp(res->code, "busy") && p->tries++ < BUSY_TRIES) {
        /* The node is refreshing the same record right now: store ours right after it. */
        ev_timer_set(&r->retry, BUSY_RETRY_S, 0.);
        ev_timer_start(r->loop, &r->retry);
        return;
    }
    if (r) {
        r->pending = NULL;
        if (res->ok) {
            if (p->req) {
                r->ok++;
                log_info(LOGM, "%s: %zu binding%s of %s stored in the overlay", p->from.addr, r->n,
                         r->n == 1 ? "" : "s", r->aor);
                reply_bindings(r, p->req, &p->from);
            }
        } else {
            r->failed++;
            log_warn(LOGM, "registration of %s not stored in the overlay: %s: %s", r->aor,
                     res->code, res->reason);
            if (p->req) { /* the phone hears of it and the bindings stay as they were */
                memcpy(r->b, p->old, sizeof(r->b));
                r->n = p->n_old;
                onode_set_sip_bindings(r->on, bindings_json(r));
                char why[300];
                snprintf(why, sizeof(why), "Overlay Store Failed (%s)", res->code);
                sip_reply(r->ep, p->req, &p->from, 503, why);
            }
        }
    }
    if (p->req)
        osip_message_free(p->req);
    free(p);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct registrar *r = w->data;
    if (r->pending)
        onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored,
                      r->pending);
}

/* Stores the bindings as they are now; answers req (if any) when the overlay has answered. */
static void publish(struct registrar *r, const osip_message_t *req, const struct sip_source *from,
                    const struct binding *old, size_t n_old)
{
    struct pending *p = calloc(1, sizeof(*p));
    if (!p) {
        if (req)
            sip_reply(r->ep, req, from, 500, "Out Of Memory");
        return;
    }
    p->r = r;
    if (req) {
        osip_message_clone(req, &p->req);
        p->from = *from;
        memcpy(p->old, old, sizeof(p->old));
        p->n_old = n_old;
    }
    r->pending = p;
    onode_set_sip_bindings(r->on, bindings_json(r));
    onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored, p);
}

static struct binding *find(struct registrar *r, const char *contact)
{
    for (size_t i = 0; i < r->n; i++)
        if (!strcmp(r->b[i].contact, contact))
            return &r->b[i];
    return NULL;
}

static void drop(struct registrar *r, struct binding *b)
{
    size_t i = (size_t)(b - r->b);
    memmove(&r->b[i], &r->b[i + 1], (r->n - i - 1) * sizeof(*b));
    r->n--;
}

static void on_register(struct registrar *r, osip_message_t *m, const struct sip_source *from)
{
    r->registers++;
    const osip_uri_t *to = m->to->url;
    if (!to->username || !to->host) {
        sip_reply(r->ep, m, from, 400, "To Needs A User");
        return;
    }
    const char *at = strchr(r->aor, '@');
    if (strlen(to->username) != (size_t)(at - r->aor) ||
        strncmp(to->username, r->aor, (size_t)(at - r->aor)) != 0 || strcasecmp(to->host, at + 1)) {
        r->forbidden++;
        log_warn(LOGM, "%s: REGISTER for %s@%s refused: this node registers only %s", from->addr,
                 to->username, to->host, r->aor);
        char why[320];
        snprintf(why, sizeof(why), "Only %s Registers Here", r->aor);
        sip_reply(r->ep, m, from, 403, why);
        return;
    }
    if (r->pending) {
        osip_message_t *resp = sip_response_for(m, 500, "Registration In Progress");
        if (resp) {
            osip_message_set_header(resp, "Retry-After", "1");
            char err[200];
            sip_send(r->ep, resp, from, err, sizeof(err));
            osip_message_free(resp);
        }
        return;
    }
    long def = REG_DEF_EXPIRES;
    osip_header_t *eh = NULL;
    if (osip_message_get_expires(m, 0, &eh) >= 0 && eh && eh->hvalue) {
        char *end;
        def = strtol(eh->hvalue, &end, 10);
        if (*end || def < 0) {
            sip_reply(r->ep, m, from, 400, "Bad Expires");
            return;
        }
    }
    unsigned long cseq = strtoul(m->cseq->number, NULL, 10);
    const char *call_id = m->call_id->number;
    struct binding old[MAX_BINDINGS];
    memcpy(old, r->b, sizeof(old));
    size_t n_old = r->n;
    int64_t now = (int64_t)time(NULL);
    osip_contact_t *c = NULL;
    int n_contacts = osip_list_size(&m->contacts);
    for (int i = 0; i < n_contacts; i++) {
        osip_message_get_contact(m, i, &c);
        if (!c->url) { /* "Contact: *": every binding goes, and only with Expires: 0 */
            if (n_contacts != 1 || def != 0) {
                sip_reply(r->ep, m, from, 400, "Wildcard Contact Needs Expires 0");
                return;
            }
            r->n = 0;
            break;
        }
        char *u = NULL;
        if (osip_uri_to_str(c->url, &u) != 0 || !u || strlen(u) >= sizeof(r->b[0].contact)) {
            osip_free(u);
            memcpy(r->b, old, sizeof(old));
            r->n = n_old;
            sip_reply(r->ep, m, from, 400, "Bad Contact");
            return;
        }
        long exp = def;
        osip_generic_param_t *ep = NULL;
        if (osip_contact_param_get_byname(c, "expires", &ep) == 0 && ep && ep->gvalue)
            exp = strtol(ep->gvalue, NULL, 10);
        if (exp > 0 && exp < REG_MIN_EXPIRES) {
            osip_free(u);
            memcpy(r->b, old, sizeof(old));
            r->n = n_old;
            osip_message_t *resp = sip_response_for(m, 423, NULL);
            if (resp) {
                char mn[16];
                snprintf(mn, sizeof(mn), "%d", REG_MIN_EXPIRES);
                osip_message_set_header(resp, "Min-Expires", mn);
                char err[200];
                sip_send(r->ep, resp, from, err, sizeof(err));
                osip_message_free(resp);
            }
            return;
        }
        if (exp > r->max_expires)
            exp = (long)r->max_expires;
        struct binding *b = find(r, u);
        if (b && !strcmp(b->call_id, call_id) && cseq <= b->cseq) {
            osip_free(u);
            memcpy(r->b, old, sizeof(old));
            r->n = n_old;
            sip_reply(r->ep, m, from, 500, "Out Of Order CSeq");
            return;
        }
        if (exp <= 0) {
            if (b)
                drop(r, b);
        } else {
            if (!b) {
                if (r->n == MAX_BINDINGS) {
                    osip_free(u);
                    memcpy(r->b, old, sizeof(old));
                    r->n = n_old;
                    sip_reply(r->ep, m, from, 403, "Too Many Bindings");
                    return;
                }
                b = &r->b[r->n++];
                snprintf(b->contact, sizeof(b->contact), "%s", u);
            }
            b->expires = now + exp;
            b->order = ++r->registrations;
            snprintf(b->call_id, sizeof(b->call_id), "%s", call_id);
            b->cseq = cseq;
        }
        osip_free(u);
    }
    if (n_contacts == 0) { /* a query: what is bound now */
        reply_bindings(r, m, from);
        return;
    }
    publish(r, m, from, old, n_old);
}

/* The phone to ring for our user: the binding registered (or refreshed) last. */
static const char *current_binding(void *ud)
{
    struct registrar *r = ud;
    const struct binding *best = NULL;
    for (size_t i = 0; i < r->n; i++)
        if (!best || r->b[i].order > best->order)
            best = &r->b[i];
    return best ? best->contact : NULL;
}

static void on_message(void *ud, osip_message_t *m, const struct sip_source *from)
{
    struct registrar *r = ud;
    if (!MSG_IS_REQUEST(m)) {
        proxy_response(r->px, m, from);
        return;
    }
    if (MSG_IS_REGISTER(m))
        on_register(r, m, from);
    else if (MSG_IS_OPTIONS(m) && !m->req_uri->username) /* a phone's keepalive to us */
        sip_reply(r->ep, m, from, 200, NULL);
    else
        proxy_request(r->px, m, from);
}

void registrar_deliver(struct registrar *r, const char *from, json_t *payload)
{
    const char *text = json_string_value(json_object_get(payload, "sip"));
    const char *sn = json_string_value(json_object_get(payload, "sn"));
    struct sip_source src = {.tcp = false};
    if (!r || !text || !sn || strlen(from) != NID_HEX_LEN || strlen(sn) != NID_HEX_LEN) {
        log_info(LOGM, "message through the overlay from %.8s: not SIP for us: dropped", from);
        return;
    }
    snprintf(src.node, sizeof(src.node), "%s", from);
    snprintf(src.sn, sizeof(src.sn), "%s", sn);
    snprintf(src.addr, sizeof(src.addr), "node %.8s (overlay)", from);
    osip_message_t *m = NULL;
    char err[256];
    if (sip_parse(text, json_string_length(json_object_get(payload, "sip")), NULL, &m, err,
                  sizeof(err)) != 0) {
        log_warn(LOGM, "SIP through the overlay from node %.8s: %s: dropped", from, err);
        return;
    }
    if (!MSG_IS_REQUEST(m))
        proxy_response(r->px, m, &src);
    else if (MSG_IS_REGISTER(m)) /* a binding is made by the user's own phone, here only */
        sip_reply(r->ep, m, &src, 403, "Register Locally");
    else
        proxy_request(r->px, m, &src);
    osip_message_free(m);
}

static void expiry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct registrar *r = w->data;
    int64_t now = (int64_t)time(NULL);
    bool changed = false;
    for (size_t i = r->n; i > 0; i--)
        if (r->b[i - 1].expires <= now) {
            log_info(LOGM, "binding %s of %s expired", r->b[i - 1].contact, r->aor);
            drop(r, &r->b[i - 1]);
            changed = true;
        }
    if (changed && !r->pending)
        publish(r, NULL, NULL, NULL, 0);
}

struct registrar *registrar_start(struct ev_loop *loop, struct onode *on, const char *uri,
                                  const char *listen, const struct sip_limits *limits,
                                  int64_t max_expires, char *err, size_t errlen)
{
    struct registrar *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->loop = loop;
    r->on = on;
    snprintf(r->uri, sizeof(r->uri), "%s", uri);
    snprintf(r->aor, sizeof(r->aor), "%s", rec_uri_aor(uri));
    r->max_expires = max_expires > REG_MIN_EXPIRES ? max_expires : REG_DEF_EXPIRES;
    if (!strchr(r->aor, '@')) {
        snprintf(err, errlen, "the certificate's URI %s names no user@host", uri);
        free(r);
        return NULL;
    }
    if (!(r->ep = sip_endpoint_start(loop, listen, limits, on_message, r, err, errlen))) {
        free(r);
        return NULL;
    }
    if (!(r->px = proxy_new(loop, on, r->ep, r->aor, current_binding, r))) {
        snprintf(err, errlen, "out of memory");
        sip_endpoint_stop(r->ep);
        free(r);
        return NULL;
    }
    ev_timer_init(&r->retry, retry_cb, BUSY_RETRY_S, 0.);
    r->retry.data = r;
    ev_timer_init(&r->expiry, expiry_cb, 1., 1.);
    r->expiry.data = r;
    ev_timer_start(loop, &r->expiry);
    return r;
}

json_t *registrar_status(struct registrar *r)
{
    int64_t now = (int64_t)time(NULL);
    json_t *b = json_array();
    for (size_t i = 0; i < r->n; i++)
        json_array_append_new(b, json_pack("{s:s,s:I}", "contact", r->b[i].contact, "expires_in",
                                           (json_int_t)(r->b[i].expires - now)));
    struct sip_counters c;
    sip_endpoint_counters(r->ep, &c);
    return json_pack("{s:s,s:s,s:o,s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}", "listen",
                     sip_endpoint_addr(r->ep), "aor", r->aor, "bindings", b, "proxy",
                     proxy_status(r->px), "counters", "received", (json_int_t)c.received,
                     "malformed", (json_int_t)c.dropped_garbage, "rate_limited",
                     (json_int_t)c.dropped_rate, "oversize", (json_int_t)c.dropped_size,
                     "tcp_connected", (json_int_t)c.tcp_connected, "registers",
                     (json_int_t)r->registers, "registered", (json_int_t)r->ok, "forbidden",
                     (json_int_t)r->forbidden, "store_failed", (json_int_t)r->failed);
}

void registrar_stop(struct registrar *r)
{
    if (!r)
        return;
    if (r->pending)
        r->pending->r = NULL; /* its answer comes (the node fails it at the latest) and is freed */
    ev_timer_stop(r->loop, &r->expiry);
    if (r->pending && ev_is_active(&r->retry)) { /* waiting to retry: nothing else will free it */
        if (r->pending->req)
            osip_message_free(r->pending->req);
        free(r->pending);
        r->pending = NULL;
    }
    ev_timer_stop(r->loop, &r->retry);
    proxy_free(r->px);
    sip_endpoint_stop(r->ep);
    free(r);
}
