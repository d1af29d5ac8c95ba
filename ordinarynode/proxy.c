/*
 * The ordinary node's SIP proxy (proxy.h).
 *
 * One transaction (struct ptxn) per request forwarded: the server side is
 * matched by the branch of the Via the request arrived with, the client side
 * by the branch of the Via we add. Responses come back on our Via, which is
 * taken off before they go to where the request came from.
 *
 * Where a request may go is decided before anything is kept or sent
 * (plan()): a refusal is answered statelessly, once per datagram, so that a
 * forged source gets no more than it sent. A dialog (struct pdialog, by
 * Call-ID) remembers the two parties its INVITE came from and went to, both
 * validated when it was forwarded; in-dialog requests and late 2xx
 * retransmissions go only between them, whatever their Route or
 * Request-URI names.
 */
#include "proxy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <gnutls/crypto.h>

#include "chan.h"
#include "config.h"
#include "dns.h"
#include "log.h"
#include "media.h"
#include "nodeid.h"
#include "record.h"

#define LOGM        "sip"
#define T1_S        0.5   /* RFC 3261 timer T1 */
#define T2_S        4.0   /* RFC 3261 timer T2 */
#define TIMER_B_S   32.0  /* no answer at all to a forwarded request: 408 */
#define TIMER_C_S   180.0 /* an INVITE ringing this long is cancelled: 408 */
#define LINGER_S    32.0  /* a finished transaction absorbs retransmissions this long */
#define MAX_TXNS    65536
#define TXN_BUCKETS 8192 /* hash chains by Via branch, ours and theirs */
#define DLG_BUCKETS 1024
#define MAX_DIALOGS 4096
#define DIALOG_IDLE_S                                                                              \
    43200.0 /* a dialog without any in-dialog request this long is forgotten (then: 481) */
#define DIALOG_LINGER_S 32.0 /* after its BYE was answered or its INVITE failed */
#define SWEEP_S         30.0

struct ptxn {
    struct ptxn *next, **pprev;      /* every transaction */
    struct ptxn *in_next, *out_next; /* hash chains by in_branch and out_branch */
    bool in_out_hash;
    struct proxy *px; /* NULL once the proxy is gone (a lookup may still be out) */
    char in_branch[128];
    char method[16];
    struct sip_source from;
    osip_message_t *req; /* as received */
    osip_message_t *fwd; /* as forwarded, NULL until then */
    char out_branch[48];
    struct sip_source to;
    int best; /* highest code passed upstream */
    bool provisional, cancelled, lookup_pending;
    osip_message_t *last; /* the last response sent upstream, for retransmitted requests */
    ev_timer retrans, timeout;
    double rto;
};

/* A dialog this proxy is in (RFC 3261 section 12), by Call-ID. */
struct pdialog {
    struct pdialog *next;
    char call_id[128];
    struct sip_source side[2]; /* [0]: where its INVITE came from, [1]: where it was forwarded */
    bool confirmed;            /* a 2xx passed; else a failure ends it */
    ev_tstamp until;           /* forgotten then */
};

struct proxy {
    struct ev_loop *loop;
    struct onode *on;
    struct sip_endpoint *ep;
    char domain[256];         /* the overlay's own SIP domain */
    char served[256];         /* a domain this proxy is the P2P proxy of ("" = none) */
    struct dns_resolver *dns; /* RFC 3263 for other domains, or NULL */
    struct chans *chans;      /* channels to other nodes (chan.h), or NULL: the overlay */
    struct media *media;      /* media anchoring (media.h), or NULL: SDP untouched */
    char self[80];            /* our host:port, as Via sent-by and Record-Route */
    proxy_binding_fn binding;
    void *ud;
    struct ptxn *txns;
    size_t n_txns;
    struct ptxn *by_in[TXN_BUCKETS], *by_out[TXN_BUCKETS];
    struct pdialog *dlg[DLG_BUCKETS];
    size_t n_dlg;
    ev_timer sweep;
    uint64_t forwarded, not_found, unavailable, cancelled, looked_up, timeouts, via_overlay,
        dns_located, refused, to_nodes;
};

/* ---- helpers --------------------------------------------------------------------------------- */

static void new_branch(char *out, size_t len)
{
    uint8_t r[8];
    gnutls_rnd(GNUTLS_RND_NONCE, r, sizeof(r));
    snprintf(out, len, "z9hG4bKp2p%02x%02x%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2], r[3], r[4],
             r[5], r[6], r[7]);
}

/* ---- sending: directly, or through the overlay to a node (protocol.md 5.4) ---------------- */

static int px_send(struct proxy *px, osip_message_t *m, const struct sip_source *to, char *err,
                   size_t errlen)
{
    if (!to->node[0])
        return sip_send(px->ep, m, to, err, errlen);
    char *text = NULL;
    size_t len = 0;
    osip_message_force_update(m);
    if (osip_message_to_str(m, &text, &len) != 0 || !text) {
        snprintf(err, errlen, "cannot serialise the message");
        return -1;
    }
    if (px->chans && to->chan) { /* its channel, or the overlay when there can be none */
        chans_send(px->chans, to->node, to->sn, text, len);
        osip_free(text);
        px->to_nodes++;
        return 0;
    }
    const char *my_sn = onode_sn_id(px->on);
    json_t *payload = json_pack("{s:s%,s:s}", "sip", text, len, "sn", my_sn ? my_sn : "");
    osip_free(text);
    onode_deliver(px->on, to->node, to->sn, payload);
    json_decref(payload);
    px->via_overlay++;
    return 0;
}

static void px_reply(struct proxy *px, const osip_message_t *req, const struct sip_source *to,
                     int code, const char *reason)
{
    osip_message_t *r = sip_response_for(req, code, reason);
    char err[256];
    if (r && px_send(px, r, to, err, sizeof(err)) != 0)
        log_info(LOGM, "%d to %s not sent: %s", code, to->addr, err);
    if (r)
        osip_message_free(r);
}

/* A destination through the overlay: node and its super node. */
static void overlay_target(struct sip_source *to, const char *node, const char *sn, bool chan)
{
    memset(to, 0, sizeof(*to));
    snprintf(to->node, sizeof(to->node), "%s", node);
    snprintf(to->sn, sizeof(to->sn), "%s", sn);
    to->chan = chan;
    snprintf(to->addr, sizeof(to->addr), chan ? "node %.8s (channel)" : "node %.8s (overlay)",
             node);
}

static void direct_target(struct sip_source *to, const char *hostport, bool tcp)
{
    memset(to, 0, sizeof(*to));
    to->tcp = tcp;
    snprintf(to->addr, sizeof(to->addr), "%.63s", hostport);
}

static const char *top_branch(const osip_message_t *m)
{
    osip_via_t *v = osip_list_get(&m->vias, 0);
    osip_generic_param_t *b = NULL;
    if (v && osip_via_param_get_byname(v, "branch", &b) == 0 && b && b->gvalue)
        return b->gvalue;
    return NULL;
}

/* "host:port" of a URI (port 5060 when absent); -1 when the host is no literal address. */
static int uri_hostport(const osip_uri_t *u, char *out, size_t len)
{
    if (!u || !u->host)
        return -1;
    char tmp[300];
    const char *port = u->port && *u->port ? u->port : "5060";
    snprintf(tmp, sizeof(tmp), strchr(u->host, ':') && u->host[0] != '[' ? "[%s]:%s" : "%s:%s",
             u->host, port);
    if (cfg_parse_hostport(tmp, NULL, 0, NULL) != 0)
        return -1;
    snprintf(out, len, "%s", tmp);
    return 0;
}

static size_t bucket(const char *branch)
{
    uint32_t h = 2166136261u;
    for (const char *p = branch; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h % TXN_BUCKETS;
}

static struct ptxn *find_in(struct proxy *px, const char *branch, const char *method)
{
    for (struct ptxn *t = px->by_in[bucket(branch)]; t; t = t->in_next)
        if (!strcmp(t->in_branch, branch) && (!method || !strcmp(t->method, method)))
            return t;
    return NULL;
}

static struct ptxn *find_out(struct proxy *px, const char *branch)
{
    for (struct ptxn *t = px->by_out[bucket(branch)]; t; t = t->out_next)
        if (t->fwd && !strcmp(t->out_branch, branch))
            return t;
    return NULL;
}

static void unchain(struct ptxn **head, struct ptxn *t, bool out)
{
    for (struct ptxn **pp = head; *pp; pp = out ? &(*pp)->out_next : &(*pp)->in_next)
        if (*pp == t) {
            *pp = out ? t->out_next : t->in_next;
            return;
        }
}

static void txn_free(struct ptxn *t)
{
    struct proxy *px = t->px;
    if (px) {
        *t->pprev = t->next;
        if (t->next)
            t->next->pprev = t->pprev;
        unchain(&px->by_in[bucket(t->in_branch)], t, false);
        if (t->in_out_hash)
            unchain(&px->by_out[bucket(t->out_branch)], t, true);
        px->n_txns--;
        ev_timer_stop(px->loop, &t->retrans);
        ev_timer_stop(px->loop, &t->timeout);
    }
    if (t->req)
        osip_message_free(t->req);
    if (t->fwd)
        osip_message_free(t->fwd);
    if (t->last)
        osip_message_free(t->last);
    free(t);
}

/* A final answer went upstream: no more retransmitting; linger for retransmitted requests. */
static void finished(struct ptxn *t, int code)
{
    struct ev_loop *loop = t->px->loop;
    t->best = code;
    ev_timer_stop(loop, &t->retrans);
    ev_timer_stop(loop, &t->timeout);
    ev_timer_set(&t->timeout, LINGER_S, 0.);
    ev_timer_start(loop, &t->timeout);
}

/* Sends a response of ours upstream (and keeps finals for retransmissions). */
static void answer(struct ptxn *t, int code, const char *reason)
{
    struct proxy *px = t->px;
    if (!strcmp(t->method, "ACK")) { /* an ACK is never answered: it just ends here */
        if (code >= 200)
            finished(t, code);
        return;
    }
    osip_message_t *r = sip_response_for(t->req, code, reason);
    if (!r)
        return;
    char err[256];
    if (px_send(px, r, &t->from, err, sizeof(err)) != 0)
        log_info(LOGM, "%d to %s not sent: %s", code, t->from.addr, err);
    if (code >= 200) {
        if (t->last)
            osip_message_free(t->last);
        t->last = r;
        finished(t, code);
    } else {
        osip_message_free(r);
    }
}

/* ---- forwarding (RFC 3261 16.6) -------------------------------------------------------------- */

static void retrans_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct ptxn *t = w->data;
    char err[256];
    if (!t->fwd || t->provisional || t->best >= 200)
        return;
    px_send(t->px, t->fwd, &t->to, err, sizeof(err));
    /* Timer A doubles without a cap (17.1.1.2: 7 sends in Timer B's 32 s); Timer E stops at T2
     * (17.1.2.2: 11 sends). */
    t->rto = t->rto * 2 > T2_S && strcmp(t->method, "INVITE") ? T2_S : t->rto * 2;
    ev_timer_set(w, t->rto, 0.);
    ev_timer_start(loop, w);
}

static void send_cancel(struct ptxn *t);
static struct pdialog *dialog_find(struct proxy *px, const char *call_id);

/* The final answer `code` to t: the media of a call it ends (a BYE answered, an INVITE that
 * failed without a dialog) is let go. */
static void media_call_over(struct proxy *px, const struct ptxn *t, int code)
{
    if (!px->media || code < 200 || !t->req->call_id)
        return;
    const char *cid = t->req->call_id->number;
    if (!strcmp(t->method, "BYE")) {
        media_end(px->media, cid);
    } else if (!strcmp(t->method, "INVITE") && code >= 300) {
        const struct pdialog *d = dialog_find(px, cid);
        if (!d || !d->confirmed)
            media_end(px->media, cid);
    }
}

static void timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct ptxn *t = w->data;
    if (t->best >= 200) { /* lingered long enough */
        txn_free(t);
        return;
    }
    t->px->timeouts++;
    media_call_over(t->px, t, 408);
    if (t->provisional) {
        log_info(LOGM, "%s %s rang for %.0f s: cancelled", t->method, t->req->req_uri->host,
                 TIMER_C_S);
        send_cancel(t);
        answer(t, 408, "Request Timeout");
    } else {
        /* A client transaction's timeout counts as a 408 (8.1.3.1). */
        log_info(LOGM, "%s to %s: no answer within %.0f s: 408", t->method, t->to.addr, TIMER_B_S);
        answer(t, 408, "No Answer From The Callee");
    }
}

/* Whether a URI asks for TCP (";transport=tcp"). */
static bool uri_tcp(const osip_uri_t *u)
{
    osip_uri_param_t *p = NULL;
    return u && osip_uri_uparam_get_byname((osip_uri_t *)u, "transport", &p) == 0 && p &&
           p->gvalue && !strcasecmp(p->gvalue, "tcp");
}

static void forward(struct ptxn *t, const struct sip_source *to, const char *new_ruri)
{
    bool tcp = to->tcp && !to->node[0];
    struct proxy *px = t->px;
    osip_message_t *f = NULL;
    if (osip_message_clone(t->req, &f) != 0) {
        answer(t, 500, "Out Of Memory");
        return;
    }
    if (new_ruri) {
        osip_uri_t *u = NULL;
        osip_uri_init(&u);
        if (osip_uri_parse(u, new_ruri) != 0) {
            osip_uri_free(u);
            osip_message_free(f);
            answer(t, 500, "Bad Binding");
            return;
        }
        osip_uri_free(f->req_uri);
        f->req_uri = u;
    }
    /* Max-Forwards, one less (70 when absent). */
    osip_header_t *mf = NULL;
    if (osip_message_get_max_forwards(f, 0, &mf) >= 0 && mf && mf->hvalue) {
        char n[24];
        snprintf(n, sizeof(n), "%ld", strtol(mf->hvalue, NULL, 10) - 1);
        osip_free(mf->hvalue);
        mf->hvalue = osip_strdup(n);
    } else {
        osip_message_set_max_forwards(f, "70");
    }
    /* Record-Route on dialog-creating INVITEs, so that ACK and BYE come this way too. */
    osip_generic_param_t *tag = NULL;
    if (!strcmp(t->method, "INVITE") && osip_to_get_tag(f->to, &tag) != 0) {
        char rr[240];
        const char *my_sn = onode_sn_id(px->on);
        if (onode_reach_via_overlay(px->on) && my_sn) /* in-dialog requests: the overlay's way */
            snprintf(rr, sizeof(rr), "<sip:%s;lr;p2p-node=%s;p2p-sn=%s>", px->self,
                     onode_id(px->on), my_sn);
        else
            snprintf(rr, sizeof(rr), "<sip:%s;lr>", px->self);
        osip_record_route_t *r = NULL;
        osip_record_route_init(&r);
        if (osip_record_route_parse(r, rr) == 0)
            osip_list_add(&f->record_routes, r, 0);
        else
            osip_record_route_free(r);
    }
    new_branch(t->out_branch, sizeof(t->out_branch));
    if (!t->in_out_hash) {
        size_t b = bucket(t->out_branch);
        t->out_next = px->by_out[b];
        px->by_out[b] = t;
        t->in_out_hash = true;
    }
    char via[200];
    snprintf(via, sizeof(via), "SIP/2.0/%s %s;branch=%s;rport", tcp ? "TCP" : "UDP", px->self,
             t->out_branch);
    osip_via_t *v = NULL;
    osip_via_init(&v);
    if (osip_via_parse(v, via) != 0) {
        osip_via_free(v);
        osip_message_free(f);
        answer(t, 500, "Internal Error");
        return;
    }
    osip_list_add(&f->vias, v, 0);
    if (px->media) { /* an SDP between a phone of ours and a node: media through us */
        const char *why = NULL;
        int code = media_sip(px->media, f, &t->from, to, &why);
        if (code) {
            osip_message_free(f);
            log_info(LOGM, "%s %s refused: %d %s", t->method, t->req->call_id->number, code, why);
            answer(t, code, why);
            return;
        }
    }
    t->fwd = f;
    t->to = *to;
    char err[256];
    if (px_send(px, f, &t->to, err, sizeof(err)) != 0) {
        log_info(LOGM, "%s to %s not forwarded: %s", t->method, to->addr, err);
        answer(t, 480, "Callee Unreachable");
        return;
    }
    px->forwarded++;
    log_debug(LOGM, "%s %s forwarded to %s", t->method, t->req->call_id->number, to->addr);
    t->rto = T1_S;
    /* TCP and the overlay's links do their own retransmitting; a channel is datagrams. */
    if (!tcp && (!to->node[0] || (px->chans && to->chan))) {
        ev_timer_set(&t->retrans, T1_S, 0.);
        ev_timer_start(px->loop, &t->retrans);
    }
    ev_timer_set(&t->timeout, TIMER_B_S, 0.);
    ev_timer_start(px->loop, &t->timeout);
}

/* A CANCEL (or ACK) of ours for what we forwarded: same Request-URI, Via branch, Call-ID. */
static osip_message_t *hop_request(const struct ptxn *t, const char *method,
                                   const osip_message_t *resp)
{
    osip_message_t *m = NULL;
    if (osip_message_init(&m) != 0)
        return NULL;
    osip_message_set_method(m, osip_strdup(method));
    osip_message_set_version(m, osip_strdup("SIP/2.0"));
    osip_uri_clone(t->fwd->req_uri, &m->req_uri);
    osip_via_t *v = osip_list_get(&t->fwd->vias, 0), *vc = NULL;
    osip_via_clone(v, &vc);
    osip_list_add(&m->vias, vc, 0);
    osip_from_clone(t->fwd->from, &m->from);
    osip_to_clone(resp ? resp->to : t->fwd->to, &m->to);
    osip_call_id_clone(t->fwd->call_id, &m->call_id);
    osip_cseq_init(&m->cseq);
    osip_cseq_set_number(m->cseq, osip_strdup(t->fwd->cseq->number));
    osip_cseq_set_method(m->cseq, osip_strdup(method));
    osip_list_clone(&t->fwd->routes, &m->routes, (int (*)(void *, void **))osip_from_clone);
    osip_message_set_max_forwards(m, "70");
    osip_message_set_content_length(m, "0");
    return m;
}

static void send_cancel(struct ptxn *t)
{
    if (!t->fwd || t->best >= 200)
        return;
    osip_message_t *c = hop_request(t, "CANCEL", NULL);
    char err[256];
    if (c && px_send(t->px, c, &t->to, err, sizeof(err)) != 0)
        log_info(LOGM, "CANCEL to %s not sent: %s", t->to.addr, err);
    if (c)
        osip_message_free(c);
}

/* ---- routing ----------------------------------------------------------------------------------
 */

struct lookup {
    struct ptxn *t;
    char aor[300];
    char domain[256]; /* another domain's: its proxy location is looked up if the user's is not */
    bool proxy;       /* this is the proxy location lookup */
};

static void lookup_key(struct proxy *px, struct lookup *lk, const char *type, const char *name);

/* An answer (overlay or DNS) to lk came: the proxy if the transaction still wants it; else NULL,
 * with the lookup (and the transaction, when the proxy is gone) freed. */
static struct proxy *lookup_answered(struct lookup *lk)
{
    struct ptxn *t = lk->t;
    t->lookup_pending = false;
    if (!t->px) { /* the proxy stopped meanwhile */
        txn_free(t);
        free(lk);
        return NULL;
    }
    if (t->cancelled || t->best >= 200) {
        free(lk);
        return NULL;
    }
    return t->px;
}

/* DNS's answer for a domain the overlay knows nothing of. */
static void dns_located(void *ud, const char *hostport, const char *err)
{
    struct lookup *lk = ud;
    struct ptxn *t = lk->t;
    struct proxy *px = lookup_answered(lk);
    if (!px)
        return;
    if (!hostport) {
        bool down = err && !strncmp(err, "no answer", 9);
        px->not_found += !down;
        px->unavailable += down;
        answer(t, down ? 503 : 404, down ? "DNS Unavailable" : "No SIP Server For The Domain");
        free(lk);
        return;
    }
    px->dns_located++;
    log_info(LOGM, "%s for %s: not in the overlay; DNS names %s", t->method, lk->aor, hostport);
    struct sip_source to;
    direct_target(&to, hostport, false);
    forward(t, &to, NULL);
    free(lk);
}

static void looked_up(void *ud, const struct on_result *r)
{
    struct lookup *lk = ud;
    struct ptxn *t = lk->t;
    struct proxy *px = lookup_answered(lk);
    if (!px)
        return;
    if (!r->ok) {
        log_info(LOGM, "looking up %s failed: %s: %s", lk->aor, r->code, r->reason);
        px->unavailable++;
        answer(t, 503, "Overlay Lookup Failed");
        free(lk);
        return;
    }
    char target[80] = "";
    struct sip_source to;
    bool overlay = false;
    size_t i;
    json_t *rec;
    json_array_foreach(json_object_get(r->body, "records"), i, rec)
    {
        json_t *v = json_object_get(rec, "value");
        if (!json_is_true(json_object_get(rec, "verified")) ||
            (!lk->proxy && json_array_size(json_object_get(v, "bindings")) == 0))
            continue; /* a user's record without a registered phone */
        const char *node = json_string_value(json_object_get(v, "node_id"));
        const char *sn = json_string_value(json_object_get(json_object_get(v, "sn"), "id"));
        /* A node that takes channels is reached on one (chan.h), whatever its addresses; one
         * that asks for the overlay, through the overlay. */
        bool chan = px->chans && json_is_true(json_object_get(v, "channels")) &&
                    strcmp(node ? node : "", onode_id(px->on)) != 0;
        if ((chan || json_is_true(json_object_get(v, "sip_via_overlay"))) && node && sn &&
            strlen(node) == NID_HEX_LEN && strlen(sn) == NID_HEX_LEN) {
            overlay_target(&to, node, sn, chan);
            snprintf(target, sizeof(target), "%s", to.addr);
            overlay = true;
            break;
        }
        size_t k;
        json_t *c;
        json_array_foreach(json_object_get(v, "contacts"), k, c)
        {
            const char *tr = json_string_value(json_object_get(c, "transport"));
            const char *host = json_string_value(json_object_get(c, "host"));
            json_int_t port = json_integer_value(json_object_get(c, "port"));
            if (tr && !strcasecmp(tr, "udp") && host && port > 0 && port < 65536) {
                snprintf(target, sizeof(target), strchr(host, ':') ? "[%s]:%lld" : "%s:%lld", host,
                         (long long)port);
                break;
            }
        }
        if (target[0])
            break;
    }
    if (!target[0] && lk->domain[0] && !lk->proxy) {
        /* A user of another domain without a location of their own: that domain's P2P proxy. */
        lk->proxy = true;
        lookup_key(px, lk, REC_TYPE_PROXY_LOCATION, lk->domain);
        return;
    }
    if (!target[0] && lk->proxy && px->dns) { /* RFC 3263, where configured */
        const char *port = t->req->req_uri->port;
        t->lookup_pending = true;
        dns_locate_sip(px->dns, lk->domain, port ? (unsigned)strtoul(port, NULL, 10) : 0,
                       dns_located, lk);
        return;
    }
    if (!target[0]) {
        px->not_found++;
        log_info(LOGM, "%s %s: no registered phone found in the overlay: 404", t->method, lk->aor);
        answer(t, 404,
               lk->proxy ? "No Proxy For The Domain In The Overlay" : "Not Found In The Overlay");
        free(lk);
        return;
    }
    if (!overlay && !strcmp(target, px->self)) { /* a stale record naming us: no loop */
        px->unavailable++;
        log_info(LOGM, "%s %s: the overlay names this proxy, which has no binding: 480", t->method,
                 lk->aor);
        answer(t, 480, "No Phone Registered");
        free(lk);
        return;
    }
    log_info(LOGM, "%s for %s: found in the overlay, forwarded to %s at %s", t->method, lk->aor,
             lk->proxy ? "the domain's proxy" : "its node", target);
    if (!overlay)
        direct_target(&to, target, false);
    forward(t, &to, NULL);
    free(lk);
}

static bool is_self(const struct proxy *px, const osip_uri_t *u)
{
    char hp[300];
    return uri_hostport(u, hp, sizeof(hp)) == 0 && !strcmp(hp, px->self);
}

/* ---- dialogs: the parties in-dialog requests may go between ---------------------------------- */

static size_t dlg_bucket(const char *call_id)
{
    return bucket(call_id) % DLG_BUCKETS;
}

static struct pdialog *dialog_find(struct proxy *px, const char *call_id)
{
    ev_tstamp now = ev_now(px->loop);
    for (struct pdialog *d = px->dlg[dlg_bucket(call_id)]; d; d = d->next)
        if (!strcmp(d->call_id, call_id) && d->until > now)
            return d;
    return NULL;
}

/* Frees the dialogs forgotten by `now`; with `evict`, also the one closest to that. */
static void dialogs_sweep(struct proxy *px, ev_tstamp now, bool evict)
{
    struct pdialog **oldest = NULL;
    for (size_t b = 0; b < DLG_BUCKETS; b++)
        for (struct pdialog **pp = &px->dlg[b]; *pp;) {
            struct pdialog *d = *pp;
            if (d->until <= now) {
                *pp = d->next;
                media_end(px->media, d->call_id);
                free(d);
                px->n_dlg--;
                continue;
            }
            if (!oldest || d->until < (*oldest)->until)
                oldest = pp;
            pp = &d->next;
        }
    if (evict && px->n_dlg >= MAX_DIALOGS && oldest) {
        struct pdialog *d = *oldest;
        *oldest = d->next;
        free(d);
        px->n_dlg--;
    }
}

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct proxy *px = w->data;
    dialogs_sweep(px, ev_now(loop), false);
}

/* A response of the dialog t's INVITE created (a provisional one with a To-tag, or a 2xx)
 * passed: its parties are those of t, both validated when t was forwarded. */
static void dialog_note(struct proxy *px, const struct ptxn *t, bool confirmed)
{
    const char *cid = t->req->call_id->number;
    struct pdialog *d = dialog_find(px, cid);
    if (!d) {
        if (strlen(cid) >= sizeof(d->call_id))
            return; /* its in-dialog requests get 481 */
        if (px->n_dlg >= MAX_DIALOGS)
            dialogs_sweep(px, ev_now(px->loop), true);
        if (!(d = calloc(1, sizeof(*d))))
            return;
        snprintf(d->call_id, sizeof(d->call_id), "%s", cid);
        size_t b = dlg_bucket(cid);
        d->next = px->dlg[b];
        px->dlg[b] = d;
        px->n_dlg++;
    }
    d->side[0] = t->from;
    d->side[1] = t->to;
    d->confirmed |= confirmed;
    d->until = ev_now(px->loop) + DIALOG_IDLE_S;
}

/* The final response to t passed: a failed INVITE's early dialog, or a dialog its BYE ended, is
 * forgotten after the retransmissions. */
static void dialog_final(struct proxy *px, const struct ptxn *t, int code)
{
    struct pdialog *d = dialog_find(px, t->req->call_id->number);
    bool bye = !strcmp(t->method, "BYE");
    if (d &&
        ((bye && code >= 200) || (!strcmp(t->method, "INVITE") && code >= 300 && !d->confirmed)))
        d->until = ev_now(px->loop) + DIALOG_LINGER_S;
}

/* "host" of "host:port" or "[v6]:port" equal. */
static bool same_host(const char *a, const char *b)
{
    const char *ca = strrchr(a, ':'), *cb = strrchr(b, ':');
    return ca && cb && ca - a == cb - b && !strncmp(a, b, (size_t)(ca - a));
}

/* Whether `src` is the party recorded as `side`: the same node through the overlay; over UDP the
 * same address and port (a phone or node sends from the port it listens on); over TCP the same
 * host (a connection comes from any port). */
static bool same_party(const struct sip_source *side, const struct sip_source *src)
{
    if (side->node[0] || src->node[0])
        return side->node[0] && !strcmp(side->node, src->node);
    if (side->tcp || src->tcp)
        return same_host(side->addr, src->addr);
    return !strcmp(side->addr, src->addr);
}

/* 0 or 1: which party of d sent it; -1: neither. */
static int dialog_party(const struct pdialog *d, const struct sip_source *src)
{
    return same_party(&d->side[0], src) ? 0 : same_party(&d->side[1], src) ? 1 : -1;
}

/* ---- routing policy (RFC 3261 16.4-16.5; docs/sip.md, "Who may use the proxy") -------------- */

/* Where one request goes, decided before anything is kept or sent. */
struct plan {
    int code;           /* an answer of ours instead (0: go) */
    const char *reason; /* its phrase */
    bool refused;       /* a destination this sender may not reach: logged as such */
    bool lookup;        /* the overlay (then maybe DNS) says where: aor, domain */
    bool absorb;        /* an ACK with nowhere to go */
    struct sip_source to;
    char new_ruri[256]; /* the binding's Contact, for a user of ours ("" = unchanged) */
    char aor[300], domain[256];
};

static int plan_refuse(struct plan *p, int code, const char *reason)
{
    p->code = code;
    p->reason = reason;
    p->refused = true;
    return -1;
}

/* The top Route as an overlay hop (p2p-node and p2p-sn, 40 hex each): 0, else -1. */
static int route_overlay(const osip_route_t *rt, struct sip_source *to)
{
    osip_uri_param_t *pn = NULL, *ps = NULL;
    if (!rt)
        return -1;
    osip_uri_uparam_get_byname(rt->url, "p2p-node", &pn);
    osip_uri_uparam_get_byname(rt->url, "p2p-sn", &ps);
    if (!pn || !ps || !pn->gvalue || !ps->gvalue || strlen(pn->gvalue) != NID_HEX_LEN ||
        strlen(ps->gvalue) != NID_HEX_LEN)
        return -1;
    overlay_target(to, pn->gvalue, ps->gvalue, false);
    return 0;
}

/*
 * Decides where m (from `from`, of `origin`) goes: 0 with p->to (and maybe p->new_ruri), or
 * p->lookup; -1 with p->code (p->refused for a destination the sender may not reach). Takes off
 * the Routes naming us (loose routing, 16.4).
 */
static int plan(struct proxy *px, osip_message_t *m, const struct sip_source *from,
                enum proxy_origin origin, struct plan *p)
{
    memset(p, 0, sizeof(*p));
    osip_route_t *rt;
    while ((rt = osip_list_get(&m->routes, 0)) && is_self(px, rt->url)) {
        osip_list_remove(&m->routes, 0);
        osip_route_free(rt);
    }
    osip_generic_param_t *tag = NULL;
    if (m->to && osip_to_get_tag(m->to, &tag) == 0 && tag && tag->gvalue) {
        /* In a dialog: only between its parties, whoever asks and whatever the Route says. */
        struct pdialog *d = dialog_find(px, m->call_id->number);
        int s = d ? dialog_party(d, from) : -1;
        if (s < 0)
            return plan_refuse(p, 481, d ? "Not A Party To The Dialog" : "No Such Dialog Here");
        p->to = d->side[1 - s];
        /* A party behind NAT asked (its Record-Route) to be reached through the overlay. */
        struct sip_source ov;
        if (!p->to.node[0] && route_overlay(rt, &ov) == 0)
            p->to = ov;
        if (strcmp(m->sip_method, "ACK") != 0)
            d->until = ev_now(px->loop) + DIALOG_IDLE_S;
        return 0;
    }
    if (rt) /* a Route beyond us: where the sender wants it to go, not a destination of ours */
        return plan_refuse(p, 403, "Route Beyond This Node Refused");
    const osip_uri_t *ru = m->req_uri;
    char target[300];
    if (ru->username && *ru->username && ru->host)
        snprintf(p->aor, sizeof(p->aor), "%s@%s", ru->username, ru->host);
    bool local = false;
    const char *flow = NULL;
    const char *b = p->aor[0] ? px->binding(px->ud, p->aor, &local, &flow) : NULL;
    if (local) { /* a user registered here: the phone */
        if (!b) {
            p->code = 480;
            p->reason = "No Phone Registered";
            return -1;
        }
        osip_uri_t *bu = NULL;
        osip_uri_init(&bu);
        int rc = osip_uri_parse(bu, b) == 0 ? uri_hostport(bu, target, sizeof(target)) : -1;
        bool tcp = rc == 0 && uri_tcp(bu);
        osip_uri_free(bu);
        if (rc != 0 || strlen(b) >= sizeof(p->new_ruri)) {
            p->code = 480;
            p->reason = "Binding Unusable";
            return -1;
        }
        direct_target(&p->to, flow ? flow : target, flow ? false : tcp);
        snprintf(p->new_ruri, sizeof(p->new_ruri), "%s", b);
        return 0;
    }
    if (uri_hostport(ru, target, sizeof(target)) == 0) { /* a literal address */
        if (!strcmp(target, px->self)) {
            p->code = 404;
            p->reason = "Not Here";
            return -1;
        }
        /* Only the owner's phone may, and only where the operator lets calls leave for any
         * domain (RFC 3263 4.2: a numeric host is used as it is). */
        if (origin != PROXY_OWN || !px->dns)
            return plan_refuse(p, 403, "Literal Destination Refused");
        direct_target(&p->to, target, uri_tcp(ru));
        return 0;
    }
    if (!p->aor[0]) {
        p->code = 404;
        p->reason = "No User In The Request-URI";
        return -1;
    }
    if (origin != PROXY_OWN && px->served[0] && !strcasecmp(ru->host, px->served)) {
        p->code = 404; /* a user of our domain with no phone here: the caller looked it up */
        p->reason = "Not Found";
        return -1;
    }
    if (origin != PROXY_OWN) /* we are not a stranger's proxy */
        return plan_refuse(p, 403, "Not A User Of This Node");
    if (!strcmp(m->sip_method, "ACK")) { /* an ACK that matched nothing: nowhere to go */
        p->absorb = true;
        return -1;
    }
    /* The callee's signed location record says where to go; for another domain, failing that,
     * the domain's P2P proxy (seed 004 sections 4.1, 4.2). */
    if (strcasecmp(ru->host, px->domain) != 0 && strcasecmp(ru->host, px->served) != 0)
        snprintf(p->domain, sizeof(p->domain), "%s", ru->host);
    p->lookup = true;
    return 0;
}

static void route(struct ptxn *t, const struct plan *p)
{
    struct proxy *px = t->px;
    if (!p->lookup) {
        forward(t, &p->to, p->new_ruri[0] ? p->new_ruri : NULL);
        return;
    }
    struct lookup *lk = calloc(1, sizeof(*lk));
    if (!lk) {
        answer(t, 500, "Out Of Memory");
        return;
    }
    lk->t = t;
    snprintf(lk->aor, sizeof(lk->aor), "%s", p->aor);
    snprintf(lk->domain, sizeof(lk->domain), "%s", p->domain);
    lookup_key(px, lk, REC_TYPE_USER_LOCATION, p->aor);
}

static void lookup_key(struct proxy *px, struct lookup *lk, const char *type, const char *name)
{
    nid_t k;
    char hex[NID_HEX_LEN + 1];
    if (nid_key(&k, type, name) != 0) {
        lk->t->lookup_pending = false;
        answer(lk->t, 404, "Unusable Name");
        free(lk);
        return;
    }
    lk->t->lookup_pending = true;
    px->looked_up++;
    onode_lookup(px->on, nid_to_hex(&k, hex), looked_up, lk);
}

/* ---- requests and responses ---------------------------------------------------------------------
 */

void proxy_request_from(struct proxy *px, osip_message_t *req, const struct sip_source *from,
                        enum proxy_origin origin)
{
    const char *branch = top_branch(req);
    const char *method = req->sip_method;
    osip_header_t *mf = NULL;
    if (osip_message_get_max_forwards(req, 0, &mf) >= 0 && mf && mf->hvalue &&
        strtol(mf->hvalue, NULL, 10) <= 0) {
        px_reply(px, req, from, 483, NULL);
        return;
    }
    if (!branch) {
        px_reply(px, req, from, 400, "Via Without Branch");
        return;
    }
    if (!strcmp(method, "ACK")) {
        struct ptxn *t = find_in(px, branch, "INVITE");
        if (t && t->best >= 300)
            return; /* the ACK of a failure we passed on: ours was sent downstream already */
    } else if (!strcmp(method, "CANCEL")) {
        struct ptxn *t = find_in(px, branch, "INVITE");
        if (!t) {
            px_reply(px, req, from, 481, NULL);
            return;
        }
        px_reply(px, req, from, 200, NULL);
        if (t->best >= 200 || t->cancelled)
            return;
        t->cancelled = true;
        px->cancelled++;
        if (t->fwd && t->provisional) {
            send_cancel(t); /* the 487 comes back from the callee's side */
        } else {
            send_cancel(t);
            answer(t, 487, NULL);
        }
        return;
    } else {
        struct ptxn *t = find_in(px, branch, method);
        if (t) { /* a retransmission */
            if (t->last) {
                char err[200];
                px_send(px, t->last, &t->from, err, sizeof(err));
            }
            return;
        }
    }
    osip_message_t *copy = NULL;
    if (osip_message_clone(req, &copy) != 0) {
        px_reply(px, req, from, 500, "Out Of Memory");
        return;
    }
    struct plan p;
    if (plan(px, copy, from, origin, &p) != 0) {
        /* Answered at once and kept nowhere: one datagram back to where this one came from,
         * whatever it forged, and its retransmission is decided the same way again. */
        px->unavailable += p.code == 480;
        px->not_found += p.code == 404;
        if (p.refused) {
            px->refused++;
            char *ruri = NULL;
            osip_uri_to_str(req->req_uri, &ruri);
            log_warn(LOGM, "%s: %s %s from %s refused: %d %s", from->addr, method,
                     ruri ? ruri : "?", origin == PROXY_OWN ? "a phone of ours" : "outside", p.code,
                     p.reason);
            osip_free(ruri);
        }
        if (p.code && strcmp(method, "ACK") != 0)
            px_reply(px, req, from, p.code, p.reason);
        osip_message_free(copy);
        return;
    }
    if (px->n_txns >= MAX_TXNS) {
        osip_message_free(copy);
        px_reply(px, req, from, 503, "Too Busy");
        return;
    }
    struct ptxn *t = calloc(1, sizeof(*t));
    if (!t) {
        osip_message_free(copy);
        px_reply(px, req, from, 500, "Out Of Memory");
        return;
    }
    t->req = copy;
    t->px = px;
    snprintf(t->in_branch, sizeof(t->in_branch), "%s", branch);
    snprintf(t->method, sizeof(t->method), "%s", method);
    t->from = *from;
    ev_timer_init(&t->retrans, retrans_cb, T1_S, 0.);
    t->retrans.data = t;
    ev_timer_init(&t->timeout, timeout_cb, TIMER_B_S, 0.);
    t->timeout.data = t;
    t->next = px->txns;
    if (t->next)
        t->next->pprev = &t->next;
    t->pprev = &px->txns;
    px->txns = t;
    size_t b = bucket(t->in_branch);
    t->in_next = px->by_in[b];
    px->by_in[b] = t;
    px->n_txns++;
    if (!strcmp(method, "INVITE"))
        answer(t, 100, NULL);
    route(t, &p);
    if (!strcmp(method, "ACK") && t->best < 200 && !t->lookup_pending)
        finished(t, 200); /* an ACK gets no answer: nothing to wait for once it is on its way */
}

bool proxy_admits(struct proxy *px, const osip_message_t *req, const struct sip_source *from)
{
    osip_message_t *copy = NULL;
    struct plan p;
    if (osip_message_clone(req, &copy) != 0)
        return false;
    bool ok = plan(px, copy, from, PROXY_OUTSIDE, &p) == 0 || !p.refused;
    osip_message_free(copy);
    return ok;
}

void proxy_request(struct proxy *px, osip_message_t *req, const struct sip_source *from)
{
    proxy_request_from(px, req, from, PROXY_OWN);
}

void proxy_response(struct proxy *px, osip_message_t *resp, const struct sip_source *from)
{
    osip_via_t *v = osip_list_get(&resp->vias, 0);
    const char *branch = top_branch(resp);
    char sent_by[300] = "";
    if (v && v->host)
        snprintf(sent_by, sizeof(sent_by), "%s:%s", v->host, v->port ? v->port : "5060");
    if (!branch || strcmp(sent_by, px->self) != 0) {
        log_debug(LOGM, "%s: response %d not for us: dropped", from->addr, resp->status_code);
        return;
    }
    struct ptxn *t = find_out(px, branch);
    osip_list_remove(&resp->vias, 0);
    osip_via_free(v);
    if (!t) {
        /* A 2xx retransmitted after the transaction ended: to the dialog's other party, never
         * to where its Vias say (anyone can write a Via). */
        struct pdialog *d = resp->call_id ? dialog_find(px, resp->call_id->number) : NULL;
        int s = d ? dialog_party(d, from) : -1;
        char err[200];
        const char *why;
        if (resp->status_code >= 200 && resp->status_code < 300 && s >= 0 &&
            (!px->media || media_sip(px->media, resp, from, &d->side[1 - s], &why) == 0))
            px_send(px, resp, &d->side[1 - s], err, sizeof(err));
        else
            log_debug(LOGM, "%s: response %d matches nothing of ours: dropped", from->addr,
                      resp->status_code);
        return;
    }
    if (strcasecmp(resp->cseq->method, t->method) != 0)
        return; /* the answer to a CANCEL of ours (same branch): nothing to pass on */
    ev_timer_stop(px->loop, &t->retrans);
    int code = resp->status_code;
    /* The Vias below ours are those the request came with: take them from it. */
    osip_list_special_free(&resp->vias, (void (*)(void *))osip_via_free);
    osip_list_clone(&t->req->vias, &resp->vias, (int (*)(void *, void **))osip_via_clone);
    osip_generic_param_t *tag = NULL;
    if (!strcmp(t->method, "INVITE") && code > 100 && code < 300 &&
        osip_to_get_tag(resp->to, &tag) == 0 && tag)
        dialog_note(px, t, code >= 200);
    if (code >= 200)
        dialog_final(px, t, code);
    if (code < 200) {
        if (!t->provisional && !strcmp(t->method, "INVITE")) {
            t->provisional = true;
            ev_timer_stop(px->loop, &t->timeout);
            ev_timer_set(&t->timeout, TIMER_C_S, 0.);
            ev_timer_start(px->loop, &t->timeout);
            if (t->cancelled)
                send_cancel(t);
        }
        if (code == 100)
            return; /* hop by hop: we sent our own */
    } else if (!strcmp(t->method, "INVITE") && code >= 300) {
        /* The ACK of a failure is ours to send (17.1.1.3). */
        osip_message_t *ack = hop_request(t, "ACK", resp);
        char err[200];
        if (ack) {
            px_send(px, ack, &t->to, err, sizeof(err));
            osip_message_free(ack);
        }
    }
    if (t->best >= 200 && code >= 300)
        return; /* a retransmitted failure: ACKed again above, passed on once */
    const char *why = NULL;
    if (px->media && code > 100 && code < 300 && media_sip(px->media, resp, from, &t->from, &why))
        log_warn(LOGM, "%d %s: its SDP passes unchanged: %s", code, resp->call_id->number, why);
    media_call_over(px, t, code);
    char err[256];
    if (px_send(px, resp, &t->from, err, sizeof(err)) != 0)
        log_info(LOGM, "%d to %s not passed on: %s", code, t->from.addr, err);
    if (code >= 200 && t->best < 200) {
        if (code >= 300) {
            if (t->last)
                osip_message_free(t->last);
            osip_message_clone(resp, &t->last);
        }
        finished(t, code);
    }
}

/* ---- life ------------------------------------------------------------------------------------ */

struct proxy *proxy_new(struct ev_loop *loop, struct onode *on, struct sip_endpoint *ep,
                        const char *domain, proxy_binding_fn binding, void *ud)
{
    struct proxy *px = calloc(1, sizeof(*px));
    if (!px)
        return NULL;
    px->loop = loop;
    px->on = on;
    px->ep = ep;
    px->binding = binding;
    px->ud = ud;
    snprintf(px->domain, sizeof(px->domain), "%s", domain);
    snprintf(px->self, sizeof(px->self), "%s", sip_endpoint_addr(ep));
    ev_timer_init(&px->sweep, sweep_cb, SWEEP_S, SWEEP_S);
    px->sweep.data = px;
    ev_timer_start(loop, &px->sweep);
    return px;
}

void proxy_from_node(struct proxy *px, const char *node, const char *sn, const char *text,
                     size_t len, bool chan)
{
    struct sip_source src;
    overlay_target(&src, node, sn, chan);
    osip_message_t *m = NULL;
    char err[256];
    if (sip_parse(text, len, NULL, &m, err, sizeof(err)) != 0) {
        log_warn(LOGM, "SIP from %s: %s: dropped", src.addr, err);
        return;
    }
    if (!MSG_IS_REQUEST(m))
        proxy_response(px, m, &src);
    else if (MSG_IS_REGISTER(m)) /* a binding is made by the user's own phone, here only */
        px_reply(px, m, &src, 403, "Register Locally");
    else
        proxy_request_from(px, m, &src, PROXY_OUTSIDE);
    osip_message_free(m);
}

void proxy_use_channels(struct proxy *px, struct chans *cs)
{
    px->chans = cs;
}

void proxy_use_media(struct proxy *px, struct media *md)
{
    px->media = md;
}

void proxy_use_dns(struct proxy *px, struct dns_resolver *dns)
{
    px->dns = dns;
}

void proxy_serve_domain(struct proxy *px, const char *domain)
{
    snprintf(px->served, sizeof(px->served), "%s", domain);
}

json_t *proxy_status(struct proxy *px)
{
    return json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "to_nodes",
                     (json_int_t)px->to_nodes, "refused", (json_int_t)px->refused, "dialogs",
                     (json_int_t)px->n_dlg, "dns_located", (json_int_t)px->dns_located,
                     "through_overlay", (json_int_t)px->via_overlay, "transactions",
                     (json_int_t)px->n_txns, "forwarded", (json_int_t)px->forwarded, "looked_up",
                     (json_int_t)px->looked_up, "not_found", (json_int_t)px->not_found,
                     "unavailable", (json_int_t)px->unavailable, "cancelled",
                     (json_int_t)px->cancelled, "timeouts", (json_int_t)px->timeouts);
}

void proxy_free(struct proxy *px)
{
    if (!px)
        return;
    while (px->txns) {
        struct ptxn *t = px->txns;
        px->txns = t->next;
        ev_timer_stop(px->loop, &t->retrans);
        ev_timer_stop(px->loop, &t->timeout);
        t->px = NULL;
        if (!t->lookup_pending) /* else the lookup's answer frees it */
            txn_free(t);
    }
    ev_timer_stop(px->loop, &px->sweep);
    dialogs_sweep(px, 1e300, false);
    free(px);
}
