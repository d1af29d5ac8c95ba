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
#include "sip_bindings.h"

#define LOGM         "sip"
#define BUSY_RETRY_S 0.05 /* a store found the record being stored: again this much later */
#define BUSY_TRIES   40
#define REG_BATCH    64 /* REGISTERs answered by one store (those that came while one was out) */

struct pending; /* a REGISTER waiting for the overlay's answer */

struct registrar {
    struct ev_loop *loop;
    struct onode *on;
    char uri[256];
    char aor[256]; /* user@host of our user */
    int64_t max_expires;
    struct sip_endpoint *ep;
    struct proxy *px;
    struct sip_bindings bs;
    struct pending *pending; /* the store in flight */
    struct pending *next;    /* the REGISTERs that came meanwhile: stored together after it */
    uint64_t registrations;
    ev_timer expiry;
    ev_timer retry; /* the pending store again, after a "busy" */
    uint64_t registers, ok, forbidden, failed;
};

struct pending {
    struct registrar *r; /* NULL once the registrar stopped */
    unsigned tries;      /* stores found the record busy */
    struct sip_reg_wait w[REG_BATCH];
    size_t nw;
};

static void stored(void *ud, const struct on_result *res);

static void store(struct registrar *r, struct pending *p)
{
    r->pending = p;
    onode_set_sip_bindings(r->on, sip_bindings_json(&r->bs));
    onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored, p);
}

/* Answers a batch, last first: a failure leaves the bindings as they were before the first. */
static bool answer_batch(struct registrar *r, struct pending *p, bool ok, const char *code,
                         const char *reason)
{
    bool failed = false;
    for (size_t i = p->nw; i-- > 0;) {
        int rc = sip_reg_wait_done(&p->w[i], r ? r->ep : NULL, r ? &r->bs : NULL, r ? r->aor : "",
                                   ok, code, reason);
        if (r && rc > 0)
            r->ok++;
        failed |= rc < 0;
    }
    if (r && !ok)
        r->failed++;
    return failed;
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
    struct pending *next = r ? r->next : NULL;
    if (r)
        r->pending = r->next = NULL;
    if (!res->ok && next) { /* what came after it was applied on top: undone first */
        answer_batch(r, next, false, res->code, res->reason);
        free(next);
        next = NULL;
    }
    answer_batch(r, p, res->ok, res->code, res->reason);
    if (r && !res->ok)
        onode_set_sip_bindings(r->on, sip_bindings_json(&r->bs));
    free(p);
    if (next)
        store(r, next);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct registrar *r = w->data;
    if (r->pending)
        onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored,
                      r->pending);
}

/* Whether m is a retransmission of a REGISTER still waiting for its store (its answer comes). */
static bool waiting(const struct pending *p, const osip_message_t *m)
{
    for (size_t i = 0; p && i < p->nw; i++)
        if (sip_reg_wait_same(&p->w[i], m))
            return true;
    return false;
}

/*
 * The bindings as they are now go into the overlay: at once, or right after
 * the store in flight. req (if any) is answered when the overlay has; old:
 * the bindings before it. -1 when the batch is full or memory is short (the
 * caller answers).
 */
static int publish(struct registrar *r, const osip_message_t *req, const struct sip_source *from,
                   const struct sip_bindings *old)
{
    struct pending *p = r->pending ? r->next : NULL;
    bool fresh = !p;
    if (fresh && !(p = calloc(1, sizeof(*p))))
        return -1;
    p->r = r;
    if (req && (p->nw == REG_BATCH || sip_reg_wait_keep(&p->w[p->nw], req, from, old) != 0)) {
        if (fresh)
            free(p);
        return -1;
    }
    if (req)
        p->nw++;
    if (!r->pending)
        store(r, p);
    else
        r->next = p;
    return 0;
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
    if (waiting(r->pending, m) || waiting(r->next, m))
        return;
    struct sip_bindings old = r->bs;
    const char *why = NULL;
    int rc =
        sip_bindings_apply(&r->bs, m, (int64_t)time(NULL), r->max_expires, &r->registrations, &why);
    if (rc == 1) /* a query: what is bound now */
        sip_bindings_reply(r->ep, &r->bs, m, from, (int64_t)time(NULL));
    else if (rc != 0)
        sip_bindings_refuse(r->ep, m, from, rc, why);
    else if (publish(r, m, from, &old) != 0) {
        r->bs = old;
        sip_reply_busy(r->ep, m, from);
    }
}

/* The phone to ring for our user: the binding registered (or refreshed) last. */
static const char *current_binding(void *ud, const char *aor, bool *local)
{
    struct registrar *r = ud;
    *local = !strcasecmp(aor, r->aor); /* user@host: the host is case-insensitive, the user */
    if (*local) {                      /* too here: the login server's names are lowercase */
        const char *at = strchr(aor, '@');
        *local = at && !strncmp(aor, r->aor, (size_t)(at - aor));
    }
    return *local ? sip_bindings_latest(&r->bs) : NULL;
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
    size_t gone = sip_bindings_expire(&r->bs, now);
    if (gone)
        log_info(LOGM, "%zu binding%s of %s expired", gone, gone == 1 ? "" : "s", r->aor);
    if (gone)
        publish(r, NULL, NULL, NULL);
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
    r->max_expires = max_expires > SIPB_MIN_EXPIRES ? max_expires : SIPB_DEF_EXPIRES;
    if (!strchr(r->aor, '@')) {
        snprintf(err, errlen, "the certificate's URI %s names no user@host", uri);
        free(r);
        return NULL;
    }
    if (!(r->ep = sip_endpoint_start(loop, listen, limits, on_message, r, err, errlen))) {
        free(r);
        return NULL;
    }
    if (!(r->px = proxy_new(loop, on, r->ep, strchr(r->aor, '@') + 1, current_binding, r))) {
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

void registrar_use_dns(struct registrar *r, struct dns_resolver *dns)
{
    proxy_use_dns(r->px, dns);
}

json_t *registrar_status(struct registrar *r)
{
    int64_t now = (int64_t)time(NULL);
    json_t *b = sip_bindings_status(&r->bs, now);
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
    ev_timer_stop(r->loop, &r->expiry);
    if (r->next) { /* never sent: nothing else will free it */
        answer_batch(NULL, r->next, false, "", "");
        free(r->next);
    }
    if (r->pending && ev_is_active(&r->retry)) { /* waiting to retry: likewise */
        answer_batch(NULL, r->pending, false, "", "");
        free(r->pending);
    } else if (r->pending) {
        r->pending->r = NULL; /* its answer comes (the node fails it at the latest) and frees it */
    }
    ev_timer_stop(r->loop, &r->retry);
    proxy_free(r->px);
    sip_endpoint_stop(r->ep);
    free(r);
}
