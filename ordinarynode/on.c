/*
 * The ordinary node's core (on.h). One link to one super node at a time.
 *
 * Discovery runs in rounds. A round lists candidates in the seed's order
 * (section 5.1): the super nodes that answer a LAN multicast query (when an
 * interface is configured for it), the alternates of the host cache (shuffled, so that the nodes of
 * a failed super node spread over its neighbours instead of all picking the first), the last super
 * node, the configured addresses, and last the bootstrap servers' lists (asked only when the rest
 * failed). Candidates are tried one after another; a refusal's alternates are tried next. A round
 * that ends without an attachment waits a back-off drawn uniformly from [0, min(max, base * 2^k))
 * ("full jitter") before the next; a lost attachment waits [0, base) first,
 * so that thousands of nodes of a dead super node do not all come back in
 * the same instant.
 */
#include "on.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "config.h"
#include "conn.h"
#include "errbuf.h"
#include "hostcache.h"
#include "http_client.h"
#include "landisc.h"
#include "log.h"
#include "msg.h"
#include "nodeid.h"
#include "record.h"
#include "sip_bindings.h"
#include "stun.h"

#define LOGM          "on"
#define MAX_CANDS     64
#define BS_COUNT      8           /* super nodes asked of each bootstrap server */
#define BS_MAX_BYTES  (64 * 1024) /* a larger bootstrap answer is refused */
#define STOP_WAIT_S   3.0         /* removal statements on the way out */
#define RETRY_PUBLISH 5.0         /* after a failed publication */
#define VERIFY_CACHE  256
#define KA_TICK_S     0.25 /* keepalive and silence checks */

enum on_state {
    S_IDLE = 0,
    S_LAN,        /* waiting for answers to the LAN discovery query */
    S_CONNECTING, /* a link to cands[cur] is being set up (TCP, TLS, attach) */
    S_BOOTSTRAP,  /* asking the bootstrap servers */
    S_ATTACHED,
    S_BACKOFF, /* waiting before the next round */
    S_STOPPING,
    S_STOPPED,
};

static const char *const state_names[] = {"idle",     "lan-discovery", "connecting", "bootstrap",
                                          "attached", "back-off",      "stopping",   "stopped"};

struct cand {
    char addr[128];
    char id[NID_HEX_LEN + 1]; /* expected Node-ID, "" when unknown */
    const char *source;       /* "multicast", "cache", "last", "config", "bootstrap", "redirect" */
};

#define REQ_BUCKETS 1024 /* requests on the wire, by tid */

struct req {
    struct req *next, **pprev; /* every request, sent or queued */
    struct req *hnext;         /* sent ones, hashed by tid */
    struct onode *o;
    char tid[MSG_TID_LEN + 1];
    char type[16];
    json_t *body; /* until sent */
    bool sent;
    ev_timer timer;
    on_result_fn cb;
    void *ud;
};

#define PUB_BUCKETS 4096 /* published records, by type and name */

struct pub {
    struct pub *next, **pprev; /* every published record */
    struct pub *hnext;         /* hash chain by (type, name) */
    struct onode *o;
    char type[REC_TYPE_MAX + 1];
    char name[REC_NAME_MAX + 1];
    json_t *value;
    bool no_update, user_location;
    int64_t lifetime_s;
    int64_t expires; /* of the last write the overlay accepted; 0 = none yet */
    double next_at;  /* when to store it (again); 0 = at the next attachment */
    bool in_flight;
    /* The first store's caller (CLI), answered once. */
    on_result_fn cb;
    void *ud;
};

struct onode {
    struct ev_loop *loop;
    struct on_params p;
    struct tls_ctx *tls;
    struct listener *lst;
    struct http_client *http;
    struct rec_verifier *verifier;
    enum on_state state;
    char self_id[NID_HEX_LEN + 1];

    struct hostcache hc;
    struct cand cands[MAX_CANDS];
    size_t n_cands, cur;
    bool bs_asked;
    unsigned bs_pending;
    struct landisc_query *lanq;
    size_t bs_found;

    struct conn *conn;
    char attach_tid[MSG_TID_LEN + 1];
    struct cand sn; /* the super node attached to (addr "" when none) */
    char reflexive[128], mapped[128], stun_addr[128];
    struct stun_query *stunq; /* asking the super node's STUN server, or NULL */
    char local[128];          /* our end of the link to the super node */
    bool nat;                 /* the super node sees another address than ours: we are behind NAT */
    double attached_at, keepalive_s;
    unsigned failed_rounds, attachments;
    uint64_t c_lookup_mismatch; /* records answering a lookup that did not ask for them */
    ev_timer attempt_timer, backoff_timer, ka_timer, pub_timer, stop_timer;
    char ka_tid[MSG_TID_LEN + 1];
    double ka_sent;

    struct req *reqs;
    struct req *sent_by_tid[REQ_BUCKETS];
    struct pub *pub_tab[PUB_BUCKETS];
    struct pub *pubs;
    char last_error[600];
    char self_sn[128];   /* our own super node role's address while promoted, else "" */
    json_t *bindings;    /* SIP registrations for the user location, or NULL */
    struct on_turn turn; /* the super node's TURN credentials (expires 0: none) */
    bool turn_pending;
    double turn_refused_at; /* the super node said it has no relay */

    void (*stop_done)(void *ud);
    void *stop_ud;
    unsigned stop_pending;
};

static void try_next(struct onode *o);
static void round_failed(struct onode *o);
static void lost(struct onode *o, const char *why);
static void pubs_run(struct onode *o);
static void req_send_queued(struct onode *o);
static void stop_finish(struct onode *o);

static double now_s(const struct onode *o)
{
    return ev_now(o->loop);
}

static double uniform01(void)
{
    uint32_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != sizeof(r))
        r = (uint32_t)rand();
    return (double)r / 4294967296.0;
}

/* order[0..n) = a random permutation of 0..n-1 (Fisher-Yates). */
static void shuffled_indices(size_t *order, size_t n)
{
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(uniform01() * (double)i);
        size_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

static void set_error(struct onode *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(struct onode *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->last_error, sizeof(o->last_error), fmt, ap);
    va_end(ap);
}

/* ---- candidates --------------------------------------------------------------------------- */

static bool cand_known(const struct onode *o, const char *addr, size_t from)
{
    for (size_t i = from; i < o->n_cands; i++)
        if (!strcmp(o->cands[i].addr, addr))
            return true;
    return false;
}

/* Appends (or, with at_cur, inserts right after the current one) a candidate not yet listed
 * among those still to try. */
static void cand_add(struct onode *o, const char *addr, const char *id, const char *source,
                     bool at_cur)
{
    if (!addr || !*addr || strlen(addr) >= sizeof(o->cands[0].addr) ||
        cfg_parse_hostport(addr, NULL, 0, NULL) != 0)
        return;
    if (cand_known(o, addr, at_cur ? o->cur : 0) || o->n_cands >= MAX_CANDS)
        return;
    bool self = !strcmp(source, "self");
    if (!self &&
        ((o->p.listen && !strcmp(addr, o->p.listen)) ||
         (o->p.advertise && !strcmp(addr, o->p.advertise)) || (id && !strcmp(id, o->self_id))))
        return; /* ourselves: only while promoted, as "self" */
    struct cand c = {.source = source};
    snprintf(c.addr, sizeof(c.addr), "%s", addr);
    if (id && strlen(id) == NID_HEX_LEN)
        snprintf(c.id, sizeof(c.id), "%s", id);
    if (!at_cur) {
        o->cands[o->n_cands++] = c;
        return;
    }
    memmove(&o->cands[o->cur + 1], &o->cands[o->cur], (o->n_cands - o->cur) * sizeof(c));
    o->cands[o->cur] = c;
    o->n_cands++;
}

/* Alternates of an attach answer, a refusal or a move: tried next, in random order. */
static void cand_add_alternates(struct onode *o, json_t *alts, const char *source)
{
    size_t n = json_array_size(alts);
    if (n == 0)
        return;
    size_t order[16], k = n < 16 ? n : 16;
    shuffled_indices(order, k);
    for (size_t i = 0; i < k; i++) {
        json_t *e = json_array_get(alts, order[i]);
        cand_add(o, json_string_value(json_object_get(e, "addr")),
                 json_string_value(json_object_get(e, "id")), source, true);
    }
}

/* Answers to the LAN query go first: a super node on the same link is the closest one. */
static void lan_done(void *ud, const struct landisc_sn *sns, size_t n, const char *err)
{
    struct onode *o = ud;
    o->lanq = NULL;
    if (err[0])
        log_warn(LOGM, "LAN discovery on %s via %s: %s; trying the next source", o->p.lan_group,
                 o->p.lan_iface, err);
    else if (n == 0)
        log_info(LOGM,
                 "LAN discovery on %s: no super node answered within %.0f ms; trying the "
                 "next source",
                 o->p.lan_group, o->p.lan_timeout_s * 1000);
    else
        log_info(LOGM, "LAN discovery on %s: %zu super nodes answered", o->p.lan_group, n);
    o->cur = 0;
    for (size_t i = n; i > 0; i--) {
        /* Already listed (the cache knows it): moved to the front, as found on the LAN. */
        for (size_t k = 0; k < o->n_cands; k++)
            if (!strcmp(o->cands[k].addr, sns[i - 1].addr)) {
                memmove(&o->cands[k], &o->cands[k + 1], (o->n_cands - k - 1) * sizeof(o->cands[0]));
                o->n_cands--;
                break;
            }
        cand_add(o, sns[i - 1].addr, sns[i - 1].id, "multicast", true);
    }
    log_info(LOGM,
             "looking for a super node: %zu from the LAN, the host cache and "
             "configuration%s",
             o->n_cands, o->p.n_bootstrap_urls ? ", then the bootstrap servers" : "");
    try_next(o);
}

static void round_start(struct onode *o)
{
    o->n_cands = 0;
    o->cur = 0;
    o->bs_asked = false;
    /* Promoted: the super node role of this very process comes before everything else. */
    if (o->self_sn[0])
        cand_add(o, o->self_sn, o->self_id, "self", false);
    /* 2: the host cache's alternates, shuffled. */
    size_t order[HOSTCACHE_MAX];
    shuffled_indices(order, o->hc.n_alt);
    for (size_t i = 0; i < o->hc.n_alt; i++)
        cand_add(o, o->hc.alt[order[i]].addr, o->hc.alt[order[i]].id, "cache", false);
    /* 3: the last super node. */
    if (o->hc.last.addr[0])
        cand_add(o, o->hc.last.addr, o->hc.last.id, "last", false);
    /* Configured addresses, before the bootstrap servers. */
    for (size_t i = 0; i < o->p.n_supernodes; i++)
        cand_add(o, o->p.supernodes[i], NULL, "config", false);
    if (o->p.lan_iface && o->p.lan_group) {
        o->state = S_LAN;
        o->lanq =
            landisc_query_start(o->loop, o->p.lan_group, o->p.lan_iface, o->p.creds->doc.overlay,
                                (unsigned)(o->p.lan_timeout_s * 1000), lan_done, o);
        if (o->lanq)
            return;
        log_warn(LOGM, "LAN discovery: out of memory");
    }
    log_info(LOGM, "looking for a super node: %zu from the host cache and configuration%s",
             o->n_cands, o->p.n_bootstrap_urls ? ", then the bootstrap servers" : "");
    try_next(o);
}

/* ---- bootstrap servers (docs/protocol.md 3.2) ---------------------------------------------- */

struct bs_req {
    struct onode *o;
    char url[1100];
};

static void bs_done(const struct http_response *resp, void *ud)
{
    struct bs_req *bq = ud;
    struct onode *o = bq->o;
    char url[1100];
    snprintf(url, sizeof(url), "%s", bq->url);
    free(bq);
    o->bs_pending--;
    if (resp->kind == HTTP_ERR_CANCELLED)
        return;
    if (resp->kind != HTTP_OK || resp->status != 200) {
        log_warn(LOGM, "bootstrap server %s: %s", url,
                 resp->error ? resp->error : "unexpected answer to GET /v1/supernodes");
        set_error(o, "bootstrap server %s: %s", url, resp->error ? resp->error : "bad answer");
    } else {
        json_error_t je;
        json_t *j = json_loadb(resp->body, resp->body_len, JSON_REJECT_DUPLICATES, &je);
        json_t *list = json_object_get(j, "supernodes");
        if (!json_is_array(list)) {
            log_warn(LOGM, "bootstrap server %s: the answer is not {\"supernodes\": [...]}%s%s",
                     url, j ? "" : ": ", j ? "" : je.text);
            set_error(o, "bootstrap server %s: malformed answer", url);
        } else {
            size_t i, added = 0, bad = 0;
            json_t *e;
            json_array_foreach(list, i, e)
            {
                const char *a = json_string_value(json_object_get(e, "address"));
                const char *id = json_string_value(json_object_get(e, "node_id"));
                if (!a || cfg_parse_hostport(a, NULL, 0, NULL) != 0 ||
                    (id && !hostcache_entry_valid(id, a))) {
                    bad++;
                    continue;
                }
                size_t before = o->n_cands;
                cand_add(o, a, id, "bootstrap", false);
                added += o->n_cands - before;
            }
            log_info(LOGM, "bootstrap server %s lists %zu super nodes (%zu new%s)", url,
                     json_array_size(list), added, bad ? ", some malformed: skipped" : "");
            if (bad)
                log_warn(LOGM, "bootstrap server %s: %zu malformed entries skipped", url, bad);
            o->bs_found += added;
        }
        json_decref(j);
    }
    if (o->bs_pending == 0 && o->state == S_BOOTSTRAP)
        try_next(o);
}

static void bs_ask(struct onode *o)
{
    o->bs_asked = true;
    o->bs_found = 0;
    if (!o->http && !(o->http = http_client_new(o->loop))) {
        log_warn(LOGM, "cannot start an HTTP client for the bootstrap servers");
        return;
    }
    for (size_t i = 0; i < o->p.n_bootstrap_urls; i++) {
        struct bs_req *bq = calloc(1, sizeof(*bq));
        if (!bq)
            break;
        bq->o = o;
        snprintf(bq->url, sizeof(bq->url), "%s/v1/supernodes?count=%d", o->p.bootstrap_urls[i],
                 BS_COUNT);
        const char *url = bq->url;
        struct http_request rq = {.url = url,
                                  .ca_file = o->p.creds->ca_file,
                                  .timeout_ms = 5000,
                                  .max_response = BS_MAX_BYTES};
        int rc = http_request_start(o->http, &rq, bs_done, bq);
        if (rc == 0) {
            o->bs_pending++;
        } else {
            log_warn(LOGM, "bootstrap server %s: cannot ask: %s", url, strerror(-rc));
            free(bq);
        }
    }
    if (o->bs_pending > 0)
        o->state = S_BOOTSTRAP;
}

/* ---- the link ------------------------------------------------------------------------------ */

static void probe_message(struct conn *c, const struct msg *m, void *ud);
static void link_open(struct conn *c, void *ud);
static void link_message(struct conn *c, const struct msg *m, void *ud);
static void link_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud);
static const struct conn_cbs link_cbs = {
    .on_open = link_open, .on_message = link_message, .on_close = link_close};

static void try_next(struct onode *o)
{
    if (o->state == S_STOPPING || o->state == S_STOPPED)
        return;
    while (o->cur < o->n_cands) {
        struct cand *c = &o->cands[o->cur];
        char err[512];
        log_debug(LOGM, "trying %s (%s)", c->addr, c->source);
        o->conn = conn_connect(o->loop, o->tls, c->addr, &link_cbs, o, err, sizeof(err));
        if (!o->conn) {
            log_warn(LOGM, "super node %s (%s): %s", c->addr, c->source, err);
            o->cur++;
            continue;
        }
        o->state = S_CONNECTING;
        o->attach_tid[0] = '\0';
        ev_timer_set(&o->attempt_timer, o->p.attach_timeout_s, 0.);
        ev_timer_start(o->loop, &o->attempt_timer);
        return;
    }
    if (!o->bs_asked && o->p.n_bootstrap_urls > 0) {
        bs_ask(o);
        if (o->state == S_BOOTSTRAP)
            return;
    }
    round_failed(o);
}

/* Gives up on the current candidate (the link is closed; link_close moves on). */
static void cand_failed(struct onode *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void cand_failed(struct onode *o, const char *fmt, ...)
{
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    struct cand *c = &o->cands[o->cur];
    log_warn(LOGM, "super node %s (%s): %s; trying the next source", c->addr, c->source, why);
    set_error(o, "super node %s: %s", c->addr, why);
    ev_timer_stop(o->loop, &o->attempt_timer);
    if (o->conn) {
        struct conn *old = o->conn;
        o->conn = NULL; /* its close is not ours to follow any more */
        conn_close(old);
    }
    o->cur++;
    try_next(o);
}

static void attempt_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct onode *o = w->data;
    if (o->state == S_CONNECTING)
        cand_failed(o, "no attachment within %.1f s (%s)", o->p.attach_timeout_s,
                    o->attach_tid[0] ? "no answer to attach" : "connect, TLS or hello unfinished");
}

static void link_open(struct conn *c, void *ud)
{
    struct onode *o = ud;
    if (c != o->conn || o->state != S_CONNECTING)
        return;
    struct cand *cd = &o->cands[o->cur];
    const struct peer_identity *id = conn_peer(c);
    char who[600] = "unknown identity";
    if (id)
        cred_identity_str(id, who, sizeof(who));
    if (!id || !(id->roles & ROLE_SUPERNODE) || !id->has_node_id) {
        cand_failed(o, "its certificate lacks the super node role (%s)", who);
        return;
    }
    char hex[NID_HEX_LEN + 1];
    nid_to_hex(&id->node_id, hex);
    if (cd->id[0] && strcmp(cd->id, hex) != 0) {
        cand_failed(o, "its Node-ID is %.8s..., expected %.8s... (%s)", hex, cd->id, who);
        return;
    }
    snprintf(cd->id, sizeof(cd->id), "%s", hex);
    const char *adv = o->p.advertise ? o->p.advertise : o->p.listen;
    json_t *b = adv ? json_pack("{s:s}", "listen", adv) : json_object();
    msg_new_tid(o->attach_tid);
    if (conn_send(c, "attach", MSG_REQ, o->attach_tid, b) != 0)
        cand_failed(o, "cannot send attach");
    json_decref(b);
}

static void ka_cb(struct ev_loop *loop, ev_timer *w, int revents);

static void stun_answered(void *ud, const char *mapped, const char *err)
{
    struct onode *o = ud;
    o->stunq = NULL;
    if (!mapped) {
        log_info(LOGM, "STUN %s: %s", o->stun_addr, err);
        return;
    }
    snprintf(o->mapped, sizeof(o->mapped), "%s", mapped);
    log_info(LOGM, "STUN %s says %s", o->stun_addr, mapped);
}

/* The super node's STUN server's view of us, on the loop (a lost answer costs 2 s of waiting,
 * not of the loop's time). Channels gather their own reflexive addresses on their sockets. */
static void stun_discover(struct onode *o)
{
    o->mapped[0] = '\0';
    stun_query_cancel(o->stunq);
    o->stunq = NULL;
    if (!o->p.stun || !o->stun_addr[0])
        return;
    char err[256];
    if (!(o->stunq =
              stun_query_start(o->loop, o->stun_addr, 2000, stun_answered, o, err, sizeof(err))))
        log_info(LOGM, "STUN %s: %s", o->stun_addr, err);
}

static void attached(struct onode *o, const struct msg *m)
{
    ev_timer_stop(o->loop, &o->attempt_timer);
    struct cand *cd = &o->cands[o->cur];
    o->sn = *cd;
    json_t *node = json_object_get(m->body, "node");
    const char *nid = json_string_value(json_object_get(node, "id"));
    if (nid && !strcmp(nid, cd->id) && json_string_value(json_object_get(node, "addr")))
        snprintf(o->sn.addr, sizeof(o->sn.addr), "%s",
                 json_string_value(json_object_get(node, "addr")));
    snprintf(o->reflexive, sizeof(o->reflexive), "%s",
             json_string_value(json_object_get(m->body, "reflexive")) ?: "");
    snprintf(o->stun_addr, sizeof(o->stun_addr), "%s",
             json_string_value(json_object_get(m->body, "stun")) ?: "");
    json_int_t ka = json_integer_value(json_object_get(m->body, "keepalive_s"));
    o->keepalive_s = o->p.keepalive_s > 0 ? o->p.keepalive_s : (ka > 0 && ka < 5 ? (double)ka : 5);
    o->state = S_ATTACHED;
    o->attached_at = now_s(o);
    o->attachments++;
    o->failed_rounds = 0;
    o->last_error[0] = '\0';

    /* The host cache: this super node and its alternates, for the next start or failover. */
    struct hc_entry last, alt[HOSTCACHE_MAX];
    size_t n = 0;
    if (!strcmp(o->sn.id, o->self_id)) {
        last = o->hc.last; /* our own role is no super node to come back to as an ordinary node */
    } else {
        snprintf(last.id, sizeof(last.id), "%s", o->sn.id);
        snprintf(last.addr, sizeof(last.addr), "%s", o->sn.addr);
    }
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(m->body, "alternates"), i, e)
    {
        const char *aid = json_string_value(json_object_get(e, "id"));
        const char *aaddr = json_string_value(json_object_get(e, "addr"));
        if (n < HOSTCACHE_MAX && hostcache_entry_valid(aid, aaddr) && strcmp(aid, o->self_id)) {
            snprintf(alt[n].id, sizeof(alt[n].id), "%s", aid);
            snprintf(alt[n].addr, sizeof(alt[n].addr), "%s", aaddr);
            n++;
        }
    }
    hostcache_update(&o->hc, &last, alt, n);
    char err[512];
    if (hostcache_save(o->p.state_dir, &o->hc, err, sizeof(err)) != 0)
        log_warn(LOGM, "%s", err);

    stun_discover(o);
    /* NAT discovery (seed 004 5.5): the address the super node sees against our own. */
    if (o->conn && conn_local_addr(o->conn, o->local, sizeof(o->local)) == 0 && o->reflexive[0]) {
        bool nat = strcmp(o->local, o->reflexive) != 0;
        if (nat != o->nat || o->attachments == 1)
            log_info(LOGM, "%s: our address %s, the super node sees %s",
                     nat ? "behind NAT" : "not behind NAT", o->local, o->reflexive);
        o->nat = nat;
    }
    log_info(LOGM,
             "attached to super node %.8s at %s (found through: %s); %zu alternates; "
             "reflexive address %s",
             o->sn.id, o->sn.addr, o->sn.source, n, o->reflexive[0] ? o->reflexive : "unknown");
    o->ka_tid[0] = '\0';
    o->ka_sent = now_s(o);
    ev_timer_start(o->loop, &o->ka_timer);
    memset(&o->turn, 0, sizeof(o->turn)); /* credentials are per super node */
    o->turn_refused_at = 0;
    if (o->p.channels)
        onode_turn(o, NULL);
    if (o->p.on_attached)
        o->p.on_attached(o->p.ud, o->sn.id, o->sn.addr, o->sn.source);
    req_send_queued(o);
    /* A new super node: the user's location names it, so it is stored again at once. */
    for (struct pub *p = o->pubs; p; p = p->next)
        if (p->user_location || p->expires <= (int64_t)time(NULL))
            p->next_at = 0;
    pubs_run(o);
}

static void refused(struct onode *o, const struct msg *m)
{
    const char *code = json_string_value(json_object_get(m->body, "code")) ?: "error";
    const char *reason = json_string_value(json_object_get(m->body, "reason")) ?: "";
    size_t before = o->n_cands;
    o->cur++; /* alternates go right after the refusing node */
    cand_add_alternates(o, json_object_get(m->body, "alternates"), "redirect");
    o->cur--;
    log_info(LOGM, "super node %s refused to attach us: %s: %s (%zu alternates to try)",
             o->cands[o->cur].addr, code, reason, o->n_cands - before);
    set_error(o, "super node %s: %s: %s", o->cands[o->cur].addr, code, reason);
    ev_timer_stop(o->loop, &o->attempt_timer);
    struct conn *old = o->conn;
    o->conn = NULL;
    conn_close(old);
    o->cur++;
    try_next(o);
}

static size_t tid_bucket(const char *tid)
{
    uint32_t h = 2166136261u;
    for (const char *p = tid; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h % REQ_BUCKETS;
}

static void req_link(struct onode *o, struct req *r)
{
    r->next = o->reqs;
    if (r->next)
        r->next->pprev = &r->next;
    r->pprev = &o->reqs;
    o->reqs = r;
}

/* Out of the list, and of the hash when it was sent; its timer stopped. */
static void req_unlink(struct onode *o, struct req *r)
{
    *r->pprev = r->next;
    if (r->next)
        r->next->pprev = r->pprev;
    if (r->sent)
        for (struct req **pp = &o->sent_by_tid[tid_bucket(r->tid)]; *pp; pp = &(*pp)->hnext)
            if (*pp == r) {
                *pp = r->hnext;
                break;
            }
    ev_timer_stop(o->loop, &r->timer);
}

static struct req *req_take(struct onode *o, const char *tid)
{
    for (struct req *r = o->sent_by_tid[tid_bucket(tid)]; r; r = r->hnext)
        if (!strcmp(r->tid, tid)) {
            req_unlink(o, r);
            return r;
        }
    return NULL;
}

static void req_finish(struct req *r, const struct on_result *res)
{
    on_result_fn cb = r->cb;
    void *ud = r->ud;
    json_decref(r->body);
    free(r);
    cb(ud, res);
}

static void on_indication(struct onode *o, const struct msg *m)
{
    if (!strcmp(m->type, "move")) {
        const char *reason = json_string_value(json_object_get(m->body, "reason")) ?: "";
        log_warn(LOGM, "super node %.8s asks us to move: %s", o->sn.id, reason);
        char why[300];
        snprintf(why, sizeof(why), "asked to move: %s", reason);
        json_t *alts = json_incref(json_object_get(m->body, "alternates"));
        lost(o, why);
        /* The next round starts with the alternates it gave. */
        for (size_t i = json_array_size(alts); i > 0; i--) {
            json_t *e = json_array_get(alts, i - 1);
            const char *aid = json_string_value(json_object_get(e, "id"));
            const char *aaddr = json_string_value(json_object_get(e, "addr"));
            if (hostcache_entry_valid(aid, aaddr) && o->hc.n_alt < HOSTCACHE_MAX) {
                struct hc_entry he;
                snprintf(he.id, sizeof(he.id), "%s", aid);
                snprintf(he.addr, sizeof(he.addr), "%s", aaddr);
                bool dup = false;
                for (size_t k = 0; k < o->hc.n_alt && !dup; k++)
                    dup = !strcmp(o->hc.alt[k].addr, aaddr);
                if (!dup)
                    o->hc.alt[o->hc.n_alt++] = he;
            }
        }
        json_decref(alts);
    } else if (!strcmp(m->type, "invite")) {
        const char *reason = json_string_value(json_object_get(m->body, "reason")) ?: "";
        log_info(LOGM, "super node %.8s invites us to become a super node (%s)", o->sn.id, reason);
        if (o->p.on_invite)
            o->p.on_invite(o->p.ud, reason);
    } else if (!strcmp(m->type, "deliver")) {
        const char *from = json_string_value(json_object_get(m->body, "from"));
        json_t *payload = json_object_get(m->body, "payload");
        if (o->p.on_deliver && from && payload)
            o->p.on_deliver(o->p.ud, from, payload);
        else
            log_info(LOGM, "message delivered from %.8s: nobody takes it", from ? from : "?");
    } else {
        log_debug(LOGM, "indication %s ignored", m->type);
    }
}

static void link_message(struct conn *c, const struct msg *m, void *ud)
{
    struct onode *o = ud;
    if (c != o->conn)
        return;
    if (m->kind == MSG_IND) {
        if (o->state == S_ATTACHED)
            on_indication(o, m);
        return;
    }
    if (m->kind == MSG_REQ) {
        probe_message(c, m, o);
        return;
    }
    if (o->state == S_CONNECTING && o->attach_tid[0] && !strcmp(m->tid, o->attach_tid)) {
        o->attach_tid[0] = '\0';
        if (m->kind == MSG_RES)
            attached(o, m);
        else
            refused(o, m);
        return;
    }
    if (o->ka_tid[0] && !strcmp(m->tid, o->ka_tid)) {
        o->ka_tid[0] = '\0';
        return;
    }
    struct req *r = req_take(o, m->tid);
    if (!r) {
        log_debug(LOGM, "answer for unknown tid %s (after a timeout?)", m->tid);
        return;
    }
    struct on_result res = {.ok = m->kind == MSG_RES, .body = m->body};
    if (!res.ok) {
        res.code = json_string_value(json_object_get(m->body, "code")) ?: "error";
        res.reason = json_string_value(json_object_get(m->body, "reason")) ?: "";
    }
    req_finish(r, &res);
}

/* Fails the requests that were sent on the link that went down; queued ones wait. */
static void reqs_fail_sent(struct onode *o, const char *why)
{
    struct req *list = NULL;
    for (struct req *r = o->reqs, *next; r; r = next) {
        next = r->next;
        if (r->sent) {
            req_unlink(o, r);
            r->next = list;
            list = r;
        }
    }
    while (list) {
        struct req *r = list;
        list = r->next;
        struct on_result res = {.code = "connection-closed", .reason = why};
        req_finish(r, &res);
    }
}

static void link_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
    struct onode *o = ud;
    if (c != o->conn)
        return;
    o->conn = NULL;
    const char *d = detail && *detail ? detail : conn_close_reason_str(why);
    switch (o->state) {
    case S_CONNECTING:
        ev_timer_stop(o->loop, &o->attempt_timer);
        if (why != CONN_CLOSED_LOCAL) {
            log_warn(LOGM, "super node %s (%s): %s; trying the next source", o->cands[o->cur].addr,
                     o->cands[o->cur].source, d);
            set_error(o, "super node %s: %s", o->cands[o->cur].addr, d);
        }
        o->cur++;
        try_next(o);
        break;
    case S_ATTACHED: {
        char w[700];
        snprintf(w, sizeof(w), "connection to super node %.8s at %s lost: %s", o->sn.id, o->sn.addr,
                 d);
        lost(o, w);
        break;
    }
    case S_STOPPING:
        stop_finish(o);
        break;
    default:
        break;
    }
}

/* ---- keepalives, failover ------------------------------------------------------------------ */

static void ka_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct onode *o = w->data;
    if (o->state != S_ATTACHED || !o->conn)
        return;
    double t = now_s(o);
    if (o->ka_tid[0]) {
        if (t - o->ka_sent >= o->p.sn_timeout_s) {
            char why[300];
            snprintf(why, sizeof(why), "super node %.8s at %s did not answer a keepalive in %.1f s",
                     o->sn.id, o->sn.addr, t - o->ka_sent);
            lost(o, why);
        }
        return;
    }
    if (t - o->ka_sent < o->keepalive_s)
        return;
    msg_new_tid(o->ka_tid);
    o->ka_sent = t;
    conn_send(o->conn, "keepalive", MSG_REQ, o->ka_tid, NULL);
}

/* Closes the link to the super node (if any) and fails what was sent on it. */
static void detach(struct onode *o, const char *why)
{
    ev_timer_stop(o->loop, &o->ka_timer);
    o->ka_tid[0] = '\0';
    o->state = S_BACKOFF;
    if (o->conn) {
        struct conn *c = o->conn;
        o->conn = NULL;
        conn_close(c);
    }
    reqs_fail_sent(o, why);
    o->sn.addr[0] = '\0';
}

/* The attachment is gone: wait [0, base) and start a new round. */
static void lost(struct onode *o, const char *why)
{
    log_warn(LOGM, "%s; re-attaching", why);
    set_error(o, "%s", why);
    detach(o, why);
    double wait = uniform01() * o->p.backoff_base_s;

    log_debug(LOGM, "next round in %.3f s", wait);
    ev_timer_set(&o->backoff_timer, wait, 0.);
    ev_timer_start(o->loop, &o->backoff_timer);
}

static void round_failed(struct onode *o)
{
    o->failed_rounds++;
    double cap =
        o->p.backoff_base_s * pow(2.0, (double)(o->failed_rounds < 20 ? o->failed_rounds : 20));
    if (cap > o->p.backoff_max_s)
        cap = o->p.backoff_max_s;
    double wait = uniform01() * cap;
    if (wait < 0.05 * cap)
        wait = 0.05 * cap;
    log_warn(LOGM, "no super node could be attached (%s); trying again in %.1f s",
             o->last_error[0] ? o->last_error : "no source gave a super node", wait);
    o->state = S_BACKOFF;
    ev_timer_set(&o->backoff_timer, wait, 0.);
    ev_timer_start(o->loop, &o->backoff_timer);
}

static void backoff_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct onode *o = w->data;
    if (o->state == S_BACKOFF)
        round_start(o);
}

/* ---- requests ------------------------------------------------------------------------------ */

static void req_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct req *r = w->data;
    struct onode *o = r->o;
    req_unlink(o, r);
    char why[200];
    snprintf(why, sizeof(why), "no answer within %.1f s%s", o->p.request_timeout_s,
             r->sent ? "" : " (not attached to a super node)");
    struct on_result res = {.code = r->sent ? "timeout" : "not-attached", .reason = why};
    req_finish(r, &res);
}

static void req_send(struct onode *o, struct req *r)
{
    msg_new_tid(r->tid);
    if (conn_send(o->conn, r->type, MSG_REQ, r->tid, r->body) == 0) {
        r->sent = true;
        size_t b = tid_bucket(r->tid);
        r->hnext = o->sent_by_tid[b];
        o->sent_by_tid[b] = r;
        json_decref(r->body);
        r->body = NULL;
    }
}

static void req_send_queued(struct onode *o)
{
    for (struct req *r = o->reqs; r; r = r->next)
        if (!r->sent && o->conn)
            req_send(o, r);
}

/* An immediate answer, still from the loop (callers may not expect re-entry). */
struct deferred {
    ev_timer t;
    on_result_fn cb;
    void *ud;
    char code[32];
    char reason[300];
};

static void deferred_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct deferred *d = w->data;
    ev_timer_stop(loop, w);
    struct on_result res = {.code = d->code, .reason = d->reason};
    d->cb(d->ud, &res);
    free(d);
}

static void fail_later(struct onode *o, on_result_fn cb, void *ud, const char *code,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void fail_later(struct onode *o, on_result_fn cb, void *ud, const char *code,
                       const char *fmt, ...)
{
    struct deferred *d = calloc(1, sizeof(*d));
    if (!d) {
        struct on_result res = {.code = "internal", .reason = "out of memory"};
        cb(ud, &res);
        return;
    }
    d->cb = cb;
    d->ud = ud;
    snprintf(d->code, sizeof(d->code), "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->reason, sizeof(d->reason), fmt, ap);
    va_end(ap);
    ev_timer_init(&d->t, deferred_cb, 0., 0.);
    d->t.data = d;
    ev_timer_start(o->loop, &d->t);
}

void onode_request(struct onode *o, const char *type, json_t *body, on_result_fn cb, void *ud)
{
    if (o->state == S_STOPPING || o->state == S_STOPPED) {
        fail_later(o, cb, ud, "stopping", "the node is stopping");
        return;
    }
    struct req *r = calloc(1, sizeof(*r));
    if (!r) {
        fail_later(o, cb, ud, "internal", "out of memory");
        return;
    }
    r->o = o;
    snprintf(r->type, sizeof(r->type), "%s", type);
    r->body = body ? json_incref(body) : json_object();
    r->cb = cb;
    r->ud = ud;
    ev_timer_init(&r->timer, req_timeout_cb, o->p.request_timeout_s, 0.);
    r->timer.data = r;
    ev_timer_start(o->loop, &r->timer);
    req_link(o, r);
    if (o->state == S_ATTACHED && o->conn)
        req_send(o, r);
}

/* ---- published records --------------------------------------------------------------------- */

static int64_t lifetime_cap(const struct onode *o, int64_t want)
{
    int64_t max = o->p.creds->doc.max_record_lifetime_s;
    if (want <= 0)
        want = o->p.record_lifetime_s;
    if (max > 0 && want > max)
        want = max;
    return want;
}

/* Whether others can send to our SIP front end at its address: not on loopback or a wildcard
 * (the default 127.0.0.1:5060 is for the user's phones only). */
static bool sip_contact_usable(const char *hostport)
{
    char host[128];
    unsigned port;
    if (!hostport || cfg_parse_hostport(hostport, host, sizeof(host), &port) != 0)
        return false;
    return strncmp(host, "127.", 4) != 0 && strcmp(host, "::1") != 0 &&
           strcmp(host, "0.0.0.0") != 0 && strcmp(host, "::") != 0;
}

/* The user location value (seed 004 section 8, in JSON). Contacts only where others can use
 * them; a node whose front end they cannot reach says so (sip_via_overlay). */
static json_t *user_location_value(struct onode *o)
{
    json_t *contacts =
        sip_contact_usable(o->p.sip_contact) ? sip_contacts_json(o->p.sip_contact) : json_array();
    json_t *v = json_pack("{s:s,s:s,s:o}", "uri", o->p.creds->id.uri, "node_id", o->self_id,
                          "contacts", contacts);
    if (o->sn.addr[0])
        json_object_set_new(v, "sn", json_pack("{s:s,s:s}", "id", o->sn.id, "addr", o->sn.addr));
    const char *refl = o->mapped[0] ? o->mapped : o->reflexive;
    if (refl[0])
        json_object_set_new(v, "reflexive", json_string(refl));
    if (json_array_size(o->bindings) > 0)
        json_object_set(v, "bindings", o->bindings);
    if (onode_reach_via_overlay(o))
        json_object_set_new(v, "sip_via_overlay", json_true());
    if (o->p.channels)
        json_object_set_new(v, "channels", json_true());
    if (o->p.advertise || o->p.listen)
        json_object_set_new(v, "overlay_listen",
                            json_string(o->p.advertise ? o->p.advertise : o->p.listen));
    return v;
}

static void pub_free(struct pub *p)
{
    if (p) {
        json_decref(p->value);
        free(p);
    }
}

static size_t pub_bucket(const char *type, const char *name)
{
    uint32_t h = 2166136261u;
    for (const char *p = type; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    h = (h ^ '|') * 16777619u;
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h % PUB_BUCKETS;
}

static void pub_link(struct onode *o, struct pub *p)
{
    p->next = o->pubs;
    if (p->next)
        p->next->pprev = &p->next;
    p->pprev = &o->pubs;
    o->pubs = p;
    size_t b = pub_bucket(p->type, p->name);
    p->hnext = o->pub_tab[b];
    o->pub_tab[b] = p;
}

static void pub_unlink(struct onode *o, struct pub *p)
{
    *p->pprev = p->next;
    if (p->next)
        p->next->pprev = p->pprev;
    for (struct pub **pp = &o->pub_tab[pub_bucket(p->type, p->name)]; *pp; pp = &(*pp)->hnext)
        if (*pp == p) {
            *pp = p->hnext;
            return;
        }
}

static void pub_answer(struct pub *p, const struct on_result *r)
{
    if (p->cb) {
        on_result_fn cb = p->cb;
        void *ud = p->ud;
        p->cb = NULL;
        cb(ud, r);
    }
}

/* Permanent refusals: storing the same thing again cannot succeed. */
static bool permanent(const char *code)
{
    static const char *const codes[] = {
        "forbidden",         "bad-owner", "bad-key",   "bad-signature", "wrong-overlay",
        "too-large",         "no-update", "not-owner", "exists",        "malformed-record",
        "lifetime-too-long", "bad-mode",  "quota-key", "quota-owner"};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        if (!strcmp(code, codes[i]))
            return true;
    return false;
}

struct pub_op {
    struct pub *p;
    int64_t expires;
    char mode[8];
};

static void pub_stored(void *ud, const struct on_result *r)
{
    struct pub_op *op = ud;
    struct pub *p = op->p;
    struct onode *o = p->o;
    p->in_flight = false;
    if (r->ok) {
        bool first = p->expires == 0;
        p->expires = op->expires;
        /* Refreshed when a third of its lifetime is left. */
        p->next_at = now_s(o) + (double)p->lifetime_s * 2.0 / 3.0;
        /* The node's own user location at info (operators and tests watch it); records stored
         * for others (a P2P registrar's thousands) at debug. */
        if (p->user_location)
            log_info(LOGM, "published %s|%s (%s, expires in %" PRId64 " s)", p->type, p->name,
                     op->mode, op->expires - (int64_t)time(NULL));
        else if (first)
            log_debug(LOGM, "published %s|%s (%s, expires in %" PRId64 " s)", p->type, p->name,
                      op->mode, op->expires - (int64_t)time(NULL));
        json_object_set_new(r->body, "expires", json_integer(op->expires));
        pub_answer(p, r);
    } else {
        log_warn(LOGM, "storing %s|%s failed: %s: %s", p->type, p->name, r->code, r->reason);
        pub_answer(p, r);
        if (permanent(r->code) && !p->user_location) {
            pub_unlink(o, p);
            pub_free(p);
        } else {
            p->next_at = now_s(o) + RETRY_PUBLISH;
        }
    }
    free(op);
}

static void pub_store(struct onode *o, struct pub *p, const char *mode)
{
    if (p->user_location) {
        json_decref(p->value);
        p->value = user_location_value(o);
    }
    int64_t expires = (int64_t)time(NULL) + lifetime_cap(o, p->lifetime_s);
    struct rec_params rp = {.overlay = o->p.creds->doc.overlay,
                            .type = p->type,
                            .name = p->name,
                            .seq = rec_seq_now(),
                            .expires = expires,
                            .no_update = p->no_update,
                            .value = p->value};
    struct record rec;
    char err[512];
    int rc = rec_sign(&rp, o->p.creds->key, o->p.creds->cert, &rec, err, sizeof(err));
    if (rc != REC_OK) {
        log_warn(LOGM, "cannot sign %s|%s: %s", p->type, p->name, err);
        struct on_result res = {.code = rec_strcode(rc), .reason = err};
        pub_answer(p, &res);
        p->next_at = now_s(o) + RETRY_PUBLISH;
        return;
    }
    struct pub_op *op = calloc(1, sizeof(*op));
    if (!op) {
        rec_free(&rec);
        return;
    }
    op->p = p;
    op->expires = expires;
    snprintf(op->mode, sizeof(op->mode), "%s", mode);
    json_t *body = json_pack("{s:s,s:O}", "mode", mode, "record", rec.envelope);
    rec_free(&rec);
    p->in_flight = true;
    p->next_at = now_s(o) + o->p.request_timeout_s + RETRY_PUBLISH;
    onode_request(o, "store", body, pub_stored, op);
    json_decref(body);
}

static void pubs_run(struct onode *o)
{
    if (o->state != S_ATTACHED)
        return;
    double t = now_s(o);
    int64_t now = (int64_t)time(NULL);
    for (struct pub *p = o->pubs; p; p = p->next) {
        if (p->in_flight || p->next_at > t)
            continue;
        /* NO_UPDATE records cannot be refreshed: stored once, again only once expired. */
        if (p->no_update && p->expires > now)
            continue;
        pub_store(o, p, p->no_update ? "add" : "update");
    }
}

static void pub_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    pubs_run(w->data);
}

static struct pub *pub_find(struct onode *o, const char *type, const char *name)
{
    for (struct pub *p = o->pub_tab[pub_bucket(type, name)]; p; p = p->hnext)
        if (!strcmp(p->type, type) && !strcmp(p->name, name))
            return p;
    return NULL;
}

/* A removal statement, sent once (by the CLI, or on the way out). */
struct rm_op {
    struct onode *o;
    on_result_fn cb;
    void *ud;
    char what[REC_TYPE_MAX + REC_NAME_MAX + 2];
};

static void rm_done(void *ud, const struct on_result *r)
{
    struct rm_op *op = ud;
    if (r->ok)
        log_info(LOGM, "removed %s", op->what);
    else
        log_warn(LOGM, "removing %s failed: %s: %s", op->what, r->code, r->reason);
    if (op->cb)
        op->cb(op->ud, r);
    struct onode *o = op->o;
    free(op);
    if (o->state == S_STOPPING && o->stop_pending > 0 && --o->stop_pending == 0)
        stop_finish(o);
}

static int send_removal(struct onode *o, const char *type, const char *name, on_result_fn cb,
                        void *ud)
{
    struct rec_params rp = {.overlay = o->p.creds->doc.overlay,
                            .type = type,
                            .name = name,
                            .seq = rec_seq_now(),
                            .expires = (int64_t)time(NULL) + lifetime_cap(o, 0),
                            .removal = true};
    struct record rec;
    char err[512];
    int rc = rec_sign(&rp, o->p.creds->key, o->p.creds->cert, &rec, err, sizeof(err));
    if (rc != REC_OK) {
        if (cb)
            fail_later(o, cb, ud, rec_strcode(rc), "cannot sign: %s", err);
        return -1;
    }
    struct rm_op *op = calloc(1, sizeof(*op));
    if (!op) {
        rec_free(&rec);
        return -1;
    }
    op->o = o;
    op->cb = cb;
    op->ud = ud;
    snprintf(op->what, sizeof(op->what), "%s|%s", type, name);
    json_t *body = json_pack("{s:s,s:O}", "mode", "remove", "record", rec.envelope);
    rec_free(&rec);
    onode_request(o, "store", body, rm_done, op);
    json_decref(body);
    return 0;
}

void onode_publish(struct onode *o, const char *mode, const char *type, const char *name,
                   json_t *value, int64_t lifetime_s, bool no_update, on_result_fn cb, void *ud)
{
    struct pub *p = pub_find(o, type, name);
    if (!strcmp(mode, "remove")) {
        if (p) {
            pub_unlink(o, p);
            pub_free(p);
        }
        send_removal(o, type, name, cb, ud);
        return;
    }
    if (p && p->in_flight) {
        fail_later(o, cb, ud, "busy", "a store of %s|%s is in progress", type, name);
        return;
    }
    if (!p) {
        if (!(p = calloc(1, sizeof(*p)))) {
            fail_later(o, cb, ud, "internal", "out of memory");
            return;
        }
        p->o = o;
        snprintf(p->type, sizeof(p->type), "%s", type);
        snprintf(p->name, sizeof(p->name), "%s", name);
        p->user_location = !strcmp(type, REC_TYPE_USER_LOCATION) &&
                           !strcmp(name, rec_uri_aor(o->p.creds->id.uri)) && !value;
        pub_link(o, p);
    }
    if (value) {
        json_decref(p->value);
        p->value = json_deep_copy(value);
    }
    p->no_update = no_update;
    p->lifetime_s = lifetime_cap(o, lifetime_s);
    p->cb = cb;
    p->ud = ud;
    if (o->state == S_ATTACHED) {
        pub_store(o, p, mode);
    } else {
        p->next_at = 0;
        p->expires = 0;
        /* Without an attachment the caller hears at the timeout; the record stays queued. */
        if (cb) {
            p->cb = NULL;
            fail_later(o, cb, ud, "not-attached",
                       "not attached to a super node: %s|%s will be stored once attached", type,
                       name);
        }
    }
}

/* ---- lookups ------------------------------------------------------------------------------- */

/*
 * A key with many owners does not fit one answer: the super node pages it (docs/protocol.md
 * 4.5, "more" and "after"), and a lookup reads page after page into one answer. A page must
 * move on ("after" past the previous one, at least one record), and a lookup reads at most
 * LOOKUP_MAX_PAGES pages (about 2 MiB of records; the default key quota of 32 owners of 4 KB
 * fits in 3), so a super node cannot keep a lookup, or the node's memory, busy for ever; past
 * the bound the answer holds what was read and says "incomplete".
 */
#define LOOKUP_MAX_PAGES 32

struct lookup {
    struct onode *o;
    on_result_fn cb;
    void *ud;
    nid_t key;   /* the key asked for: it names one type and name (types hold no '|') */
    json_t *out; /* the records of the pages read so far, checked and verified */
    unsigned pages;
    char after[REC_OWNER_MAX + 1]; /* the owner the next page starts after ("" for the first) */
};

static void lookup_send(struct lookup *lk);

/*
 * Only what was asked for is an answer: the super node, and whoever it relays, can return any
 * validly signed record, for instance its owner's own under another key, or a record whose
 * type or name is not the one looked up. Such a record is dropped before anyone sees it (the
 * SIP proxy routes calls by what a lookup returns), and logged with both keys.
 */
static void lookup_free(struct lookup *lk)
{
    json_decref(lk->out);
    free(lk);
}

static void lookup_done(void *ud, const struct on_result *r)
{
    struct lookup *lk = ud;
    struct onode *o = lk->o;
    if (!r->ok) {
        lk->cb(lk->ud, r); /* a page missing: the key was not read, whatever came before */
        lookup_free(lk);
        return;
    }
    json_t *out = lk->out;
    lk->pages++;
    size_t i;
    json_t *env;
    time_t now = time(NULL);
    json_array_foreach(json_object_get(r->body, "records"), i, env)
    {
        struct record rec;
        char err[512];
        int rc = rec_parse(env, 0, &rec, err, sizeof(err));
        if (rc == REC_OK && rec_answers(&rec, &lk->key, NULL, NULL, err, sizeof(err)) != REC_OK) {
            o->c_lookup_mismatch++;
            log_warn(LOGM,
                     "super node %s (%s) answered a lookup with a record not asked for, "
                     "dropped: %s",
                     o->sn.addr[0] ? o->sn.addr : "?", o->sn.id[0] ? o->sn.id : "?", err);
            rec_free(&rec);
            continue;
        }
        if (rc == REC_OK)
            rc = rec_verify(o->verifier, &rec, now, o->p.creds->doc.max_record_lifetime_s, err,
                            sizeof(err));
        json_t *e;
        if (rc == REC_OK) {
            char seq[24];
            snprintf(seq, sizeof(seq), "%" PRIu64, rec.seq);
            e = json_pack("{s:s,s:s,s:s,s:s,s:I,s:b,s:O,s:b}", "type", rec.type, "name", rec.name,
                          "owner", rec.owner, "seq", seq, "expires", (json_int_t)rec.expires,
                          "no_update", rec.no_update, "value", rec.value ? rec.value : json_null(),
                          "verified", 1);
        } else {
            log_warn(LOGM, "a record found does not verify: %s: %s", rec_strcode(rc), err);
            e = json_pack("{s:b,s:s,s:s}", "verified", 0, "code", rec_strcode(rc), "error", err);
        }
        rec_free(&rec); /* rec_parse zeroes it on failure: always safe */
        json_array_append_new(out, e);
    }
    bool incomplete = false;
    if (json_is_true(json_object_get(r->body, "more"))) {
        const char *next = json_string_value(json_object_get(r->body, "after"));
        size_t got = json_array_size(json_object_get(r->body, "records"));
        if (!next || !next[0] || strlen(next) > REC_OWNER_MAX || strcmp(next, lk->after) <= 0 ||
            got == 0) {
            log_warn(LOGM,
                     "super node %s (%s) paged a lookup without moving on (after \"%.64s\"); "
                     "answering the %u pages read",
                     o->sn.addr[0] ? o->sn.addr : "?", o->sn.id[0] ? o->sn.id : "?",
                     next ? next : "", lk->pages);
            incomplete = true;
        } else if (lk->pages >= LOOKUP_MAX_PAGES) {
            log_warn(LOGM, "a lookup stopped after %u pages (%zu records): the key holds more",
                     lk->pages, json_array_size(out));
            incomplete = true;
        } else {
            snprintf(lk->after, sizeof(lk->after), "%s", next);
            lookup_send(lk);
            return;
        }
    }
    json_t *body =
        json_pack("{s:O,s:O,s:O,s:I}", "records", out, "hops",
                  json_object_get(r->body, "hops") ?: json_null(), "node",
                  json_object_get(r->body, "node") ?: json_null(), "pages", (json_int_t)lk->pages);
    if (incomplete)
        json_object_set_new(body, "incomplete", json_true());
    struct on_result res = {.ok = true, .body = body};
    lk->cb(lk->ud, &res);
    json_decref(body);
    lookup_free(lk);
}

static void lookup_send(struct lookup *lk)
{
    char hex[NID_HEX_LEN + 1];
    json_t *b = json_pack("{s:s}", "key", nid_to_hex(&lk->key, hex));
    if (lk->after[0])
        json_object_set_new(b, "after", json_string(lk->after));
    onode_request(lk->o, "get", b, lookup_done, lk);
    json_decref(b);
}

void onode_lookup(struct onode *o, const char *key_hex, on_result_fn cb, void *ud)
{
    struct lookup *lk = calloc(1, sizeof(*lk));
    if (!lk) {
        fail_later(o, cb, ud, "internal", "out of memory");
        return;
    }
    if (!key_hex || nid_from_hex(&lk->key, key_hex) != 0) {
        free(lk);
        fail_later(o, cb, ud, "invalid-request", "a key is 40 hex digits");
        return;
    }
    lk->o = o;
    lk->cb = cb;
    lk->ud = ud;
    lk->out = json_array();
    if (!lk->out) {
        free(lk);
        fail_later(o, cb, ud, "internal", "out of memory");
        return;
    }
    lookup_send(lk);
}

/* ---- probes: super nodes connecting back (docs/protocol.md 5.5) ---------------------------- */

static void probe_message(struct conn *c, const struct msg *m, void *ud)
{
    struct onode *o = ud;
    if (m->kind != MSG_REQ)
        return;
    if (!strcmp(m->type, "ping")) {
        json_t *b = json_pack("{s:s}", "node_id", o->self_id);
        conn_send(c, "ping", MSG_RES, m->tid, b);
        json_decref(b);
        return;
    }
    json_t *e = json_pack("{s:s,s:s}", "code", "invalid-request", "reason",
                          "an ordinary node answers only ping");
    conn_send(c, m->type, MSG_ERR, m->tid, e);
    json_decref(e);
}

static void probe_open(struct conn *c, void *ud)
{
    const struct peer_identity *id = conn_peer(c);
    if (!id || !(id->roles & ROLE_SUPERNODE)) {
        log_info(LOGM,
                 "%s: a connection to our overlay port from a node that is not a super "
                 "node: closed",
                 conn_peer_addr(c));
        conn_close_with_error(c, NULL, "forbidden", "only super nodes probe ordinary nodes");
    }
}

static void probe_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
}

static const struct conn_cbs probe_cbs = {
    .on_open = probe_open, .on_message = probe_message, .on_close = probe_close};

/* ---- life ---------------------------------------------------------------------------------- */

struct onode *onode_new(struct ev_loop *loop, const struct on_params *p, char *err, size_t errlen)
{
    struct onode *o = calloc(1, sizeof(*o));
    if (!o) {
        errbuf_set(err, errlen, -1, "out of memory");
        return NULL;
    }
    o->loop = loop;
    o->p = *p;
    if (o->p.attach_timeout_s <= 0)
        o->p.attach_timeout_s = 3;
    if (o->p.sn_timeout_s <= 0)
        o->p.sn_timeout_s = 3;
    if (o->p.request_timeout_s <= 0)
        o->p.request_timeout_s = 10;
    if (o->p.backoff_base_s <= 0)
        o->p.backoff_base_s = 1;
    if (o->p.backoff_max_s < o->p.backoff_base_s)
        o->p.backoff_max_s = 30 > o->p.backoff_base_s ? 30 : o->p.backoff_base_s;
    if (o->p.record_lifetime_s <= 0)
        o->p.record_lifetime_s = 3600;
    if (o->p.lan_timeout_s <= 0)
        o->p.lan_timeout_s = 0.3;
    const struct node_creds *cr = p->creds;
    nid_to_hex(&cr->id.node_id, o->self_id);
    struct tls_config tc = {.ca_file = cr->ca_file,
                            .cert_file = cr->cert_file,
                            .key_file = cr->key_file,
                            .overlay = cr->doc.overlay,
                            /* Longer than the attempt timer, which names the cause. */
                            .handshake_timeout_ms = (unsigned)(o->p.attach_timeout_s * 1000) + 1000,
                            /* Attached to our own super node role (a promoted node, the SIP
                             * front end of a super node), the link stays in the process. */
                            .local_links = true};
    if (!(o->tls = tls_ctx_new(&tc, err, errlen)))
        goto fail;
    if (!(o->verifier = rec_verifier_new(cr->doc.ca_crt, cr->doc.overlay, VERIFY_CACHE)) ||
        rec_verifier_set_proxies(o->verifier, cr->doc.sip_proxies, cr->doc.n_sip_proxies) != 0) {
        errbuf_set(err, errlen, -1, "out of memory");
        goto fail;
    }
    if (p->listen) {
        char e[512];
        if (!(o->lst = conn_listen(loop, o->tls, p->listen, &probe_cbs, o, e, sizeof(e)))) {
            errbuf_set(err, errlen, -1, "overlay port %s: %s", p->listen, e);
            goto fail;
        }
    }
    ev_timer_init(&o->attempt_timer, attempt_timeout, 1., 0.);
    o->attempt_timer.data = o;
    ev_timer_init(&o->backoff_timer, backoff_cb, 1., 0.);
    o->backoff_timer.data = o;
    ev_timer_init(&o->ka_timer, ka_cb, KA_TICK_S, KA_TICK_S);
    o->ka_timer.data = o;
    ev_timer_init(&o->pub_timer, pub_timer_cb, 1., 1.);
    o->pub_timer.data = o;
    return o;
fail:
    onode_free(o);
    return NULL;
}

void onode_start(struct onode *o)
{
    char err[512];
    if (hostcache_load(o->p.state_dir, &o->hc, err, sizeof(err)) != 0)
        log_warn(LOGM, "%s: ignored, the other sources are tried", err);
    else if (o->hc.last.addr[0] || o->hc.n_alt)
        log_info(LOGM, "host cache: last super node %s, %zu alternates",
                 o->hc.last.addr[0] ? o->hc.last.addr : "none", o->hc.n_alt);
    if (o->p.register_user)
        onode_publish(o, "update", REC_TYPE_USER_LOCATION, rec_uri_aor(o->p.creds->id.uri), NULL, 0,
                      false, NULL, NULL);
    ev_timer_start(o->loop, &o->pub_timer);
    round_start(o);
}

static void stop_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct onode *o = w->data;
    log_warn(LOGM, "stopping: %u removals unanswered after %.0f s", o->stop_pending, STOP_WAIT_S);
    o->stop_pending = 0;
    stop_finish(o);
}

static void stop_finish(struct onode *o)
{
    if (o->state == S_STOPPED)
        return;
    if (o->conn) {
        conn_close(o->conn); /* link_close comes back here with conn NULL */
        return;
    }
    o->state = S_STOPPED;
    ev_timer_stop(o->loop, &o->stop_timer);
    ev_timer_stop(o->loop, &o->attempt_timer);
    ev_timer_stop(o->loop, &o->backoff_timer);
    ev_timer_stop(o->loop, &o->ka_timer);
    ev_timer_stop(o->loop, &o->pub_timer);
    while (o->reqs) {
        struct req *r = o->reqs;
        req_unlink(o, r);
        struct on_result res = {.code = "stopping", .reason = "the node stopped"};
        req_finish(r, &res);
    }
    listener_free(o->lst);
    o->lst = NULL;
    if (o->http) {
        http_client_free(o->http);
        o->http = NULL;
    }
    log_info(LOGM, "stopped");
    if (o->stop_done)
        o->stop_done(o->stop_ud);
}

void onode_stop(struct onode *o, void (*done)(void *ud), void *ud)
{
    if (o->state == S_STOPPING || o->state == S_STOPPED)
        return;
    o->stop_done = done;
    o->stop_ud = ud;
    bool attached = o->state == S_ATTACHED && o->conn;
    ev_timer_stop(o->loop, &o->pub_timer);
    ev_timer_stop(o->loop, &o->backoff_timer);
    ev_timer_stop(o->loop, &o->attempt_timer);
    ev_timer_stop(o->loop, &o->ka_timer);
    landisc_query_cancel(o->lanq);
    o->lanq = NULL;
    stun_query_cancel(o->stunq);
    o->stunq = NULL;
    listener_free(o->lst);
    o->lst = NULL;
    if (o->http) {
        http_client_free(o->http);
        o->http = NULL;
    }
    /* Removal statements for what we published and may remove, while still attached. */
    unsigned n = 0;
    if (attached)
        for (struct pub *p = o->pubs; p; p = p->next)
            if (p->expires > 0 && !p->no_update &&
                send_removal(o, p->type, p->name, NULL, NULL) == 0)
                n++;
    o->state = S_STOPPING;
    if (n == 0) {
        stop_finish(o);
        return;
    }
    log_info(LOGM, "stopping: removing %u published records", n);
    o->stop_pending = n;
    ev_timer_init(&o->stop_timer, stop_timeout, STOP_WAIT_S, 0.);
    o->stop_timer.data = o;
    ev_timer_start(o->loop, &o->stop_timer);
}

void onode_free(struct onode *o)
{
    if (!o)
        return;
    while (o->reqs) {
        struct req *r = o->reqs;
        o->reqs = r->next;
        if (o->loop)
            ev_timer_stop(o->loop, &r->timer);
        json_decref(r->body);
        free(r);
    }
    while (o->pubs) {
        struct pub *p = o->pubs;
        o->pubs = p->next;
        pub_free(p);
    }
    landisc_query_cancel(o->lanq);
    stun_query_cancel(o->stunq);
    listener_free(o->lst);
    if (o->http)
        http_client_free(o->http);
    rec_verifier_free(o->verifier);
    tls_ctx_free(o->tls);
    json_decref(o->bindings);
    free(o);
}

json_t *onode_status(struct onode *o)
{
    json_t *st =
        json_pack("{s:s,s:s,s:s,s:I,s:I}", "state", state_names[o->state], "uri",
                  o->p.creds->id.uri, "node_id", o->self_id, "attachments",
                  (json_int_t)o->attachments, "failed_rounds", (json_int_t)o->failed_rounds);
    if (o->state == S_ATTACHED) {
        json_object_set_new(
            st, "supernode",
            json_pack("{s:s,s:s,s:s}", "id", o->sn.id, "addr", o->sn.addr, "source", o->sn.source));
        json_object_set_new(st, "attached_s", json_real(now_s(o) - o->attached_at));
        json_object_set_new(st, "reflexive",
                            o->reflexive[0] ? json_string(o->reflexive) : json_null());
        json_object_set_new(st, "stun_mapped", o->mapped[0] ? json_string(o->mapped) : json_null());
        json_object_set_new(st, "local", o->local[0] ? json_string(o->local) : json_null());
        json_object_set_new(st, "nat", json_boolean(o->nat));
        json_object_set_new(st, "keepalive_s", json_real(o->keepalive_s));
    }
    if (o->last_error[0])
        json_object_set_new(st, "last_error", json_string(o->last_error));
    json_object_set_new(st, "lookup_mismatches", json_integer((json_int_t)o->c_lookup_mismatch));
    json_t *alts = json_array();
    for (size_t i = 0; i < o->hc.n_alt; i++)
        json_array_append_new(
            alts, json_pack("{s:s,s:s}", "id", o->hc.alt[i].id, "addr", o->hc.alt[i].addr));
    json_object_set_new(st, "host_cache", alts);
    json_t *pubs = json_array();
    for (struct pub *p = o->pubs; p; p = p->next)
        json_array_append_new(pubs, json_pack("{s:s,s:s,s:I,s:b}", "type", p->type, "name", p->name,
                                              "expires", (json_int_t)p->expires, "no_update",
                                              p->no_update));
    json_object_set_new(st, "published", pubs);
    return st;
}

/* ---- promotion's hooks ----------------------------------------------------------------------- */

int onode_set_listening(struct onode *o, bool on, char *err, size_t errlen)
{
    if (!on) {
        listener_free(o->lst);
        o->lst = NULL;
        return 0;
    }
    if (o->lst || !o->p.listen || o->state == S_STOPPING || o->state == S_STOPPED)
        return 0;
    char e[512];
    if (!(o->lst = conn_listen(o->loop, o->tls, o->p.listen, &probe_cbs, o, e, sizeof(e)))) {
        errbuf_set(err, errlen, -1, "overlay port %s: %s", o->p.listen, e);
        return -1;
    }
    return 0;
}

/* Drops the attachment (if any) and starts a round at once, without the failover wait. */
static void reattach_now(struct onode *o, const char *why)
{
    if (o->state == S_STOPPING || o->state == S_STOPPED || o->state == S_IDLE)
        return;
    log_info(LOGM, "%s: attaching anew", why);
    ev_timer_stop(o->loop, &o->attempt_timer);
    ev_timer_stop(o->loop, &o->backoff_timer);
    landisc_query_cancel(o->lanq);
    o->lanq = NULL;
    detach(o, why);
    o->failed_rounds = 0;
    round_start(o);
}

void onode_attach_self(struct onode *o, const char *addr)
{
    bool was = o->self_sn[0] != '\0';
    snprintf(o->self_sn, sizeof(o->self_sn), "%s", addr ? addr : "");
    if (addr)
        reattach_now(o, "promoted: using our own super node role");
    else if (was && (!strcmp(o->sn.id, o->self_id) || o->state != S_ATTACHED))
        reattach_now(o, "no longer a super node");
}

double onode_attached_for(const struct onode *o)
{
    if (o->state != S_ATTACHED || !strcmp(o->sn.id, o->self_id))
        return -1;
    return now_s(o) - o->attached_at;
}

size_t onode_known_supernodes(const struct onode *o, const char **out, size_t max)
{
    size_t n = 0;
    if (o->state == S_ATTACHED && o->sn.addr[0] && strcmp(o->sn.id, o->self_id) && n < max)
        out[n++] = o->sn.addr;
    if (o->hc.last.addr[0] && strcmp(o->hc.last.id, o->self_id) && n < max)
        out[n++] = o->hc.last.addr;
    for (size_t i = 0; i < o->hc.n_alt && n < max; i++)
        if (strcmp(o->hc.alt[i].id, o->self_id))
            out[n++] = o->hc.alt[i].addr;
    return n;
}

void onode_set_sip_bindings(struct onode *o, json_t *bindings)
{
    json_decref(o->bindings);
    o->bindings = bindings;
}

const char *onode_sn_id(const struct onode *o)
{
    return o->state == S_ATTACHED && o->sn.id[0] ? o->sn.id : NULL;
}

const char *onode_id(const struct onode *o)
{
    return o->self_id;
}

bool onode_reach_via_overlay(const struct onode *o)
{
    return o->p.sip_via_overlay || o->nat ||
           (o->p.sip_contact && !sip_contact_usable(o->p.sip_contact));
}

/* ---- for channels between nodes (chan.c) ---------------------------------------------------- */

static void deliver_done(void *ud, const struct on_result *r)
{
    (void)ud;
    if (!r->ok)
        log_info(LOGM, "message through the overlay not delivered: %s: %s", r->code, r->reason);
}

void onode_deliver(struct onode *o, const char *to, const char *sn, json_t *payload)
{
    json_t *body = json_pack("{s:s,s:s,s:O}", "to", to, "sn", sn, "payload", payload);
    onode_request(o, "deliver", body, deliver_done, NULL);
    json_decref(body);
}

struct tls_ctx *onode_tls(struct onode *o)
{
    return o->tls;
}

const char *onode_stun_addr(const struct onode *o)
{
    return o->state == S_ATTACHED ? o->stun_addr : "";
}

const char *onode_local_addr(const struct onode *o)
{
    return o->state == S_ATTACHED ? o->local : "";
}

static void turn_answered(void *ud, const struct on_result *r)
{
    struct onode *o = ud;
    o->turn_pending = false;
    if (!r->ok) {
        log_info(LOGM, "no TURN relay from our super node: %s: %s", r->code, r->reason);
        o->turn_refused_at = now_s(o);
        return;
    }
    const char *server = json_string_value(json_object_get(r->body, "server"));
    const char *user = json_string_value(json_object_get(r->body, "username"));
    const char *pass = json_string_value(json_object_get(r->body, "password"));
    const char *realm = json_string_value(json_object_get(r->body, "realm"));
    json_int_t expires = json_integer_value(json_object_get(r->body, "expires"));
    json_int_t kbps = json_integer_value(json_object_get(r->body, "bandwidth_kbps"));
    struct on_turn t = {.expires = expires,
                        .bandwidth_kbps = kbps > 0 && kbps < 100000000 ? (unsigned)kbps : 0};
    if (!server || !user || !pass || expires <= (json_int_t)time(NULL) ||
        snprintf(t.server, sizeof(t.server), "%s", server) >= (int)sizeof(t.server) ||
        snprintf(t.username, sizeof(t.username), "%s", user) >= (int)sizeof(t.username) ||
        snprintf(t.password, sizeof(t.password), "%s", pass) >= (int)sizeof(t.password) ||
        snprintf(t.realm, sizeof(t.realm), "%s", realm ? realm : "") >= (int)sizeof(t.realm)) {
        log_warn(LOGM, "the super node's TURN credentials are malformed: ignored");
        o->turn_refused_at = now_s(o);
        return;
    }
    o->turn = t;
    log_info(LOGM, "TURN relay %s (credentials until %lld)", t.server, (long long)t.expires);
}

bool onode_turn(struct onode *o, struct on_turn *out)
{
    int64_t now = (int64_t)time(NULL);
    bool valid = o->turn.expires > now + 30;
    if (o->state == S_ATTACHED && !o->turn_pending && o->turn.expires < now + 120 &&
        (o->turn_refused_at == 0 || now_s(o) - o->turn_refused_at > 300)) {
        o->turn_pending = true;
        onode_request(o, "turn", NULL, turn_answered, o);
    }
    if (valid && out)
        *out = o->turn;
    return valid;
}
