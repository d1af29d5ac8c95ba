/*
 * The super node's service to ordinary nodes (docs/protocol.md section 5):
 * attach with admission control (a cap, redirection to super nodes with
 * spare capacity), keepalives, per-node request rate and in-flight limits,
 * delivery of messages to attached nodes from anywhere in the overlay,
 * connect-back reachability probes, invitations to become a super node, and
 * health: a node that lost its ring tells its ordinary nodes to move.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "sn_int.h"
#include "turn.h"

#define ROUTE_FAILURES_UNHEALTHY 5 /* routed requests timing out in a row ... */
#define ROUTE_SILENCE_PERIODS    6 /* ... with no reply at all for this many periods */
#define INVITE_INTERVAL_S        300.0
#define PROBE_TIMEOUT_S          5.0
#define PROBE_PAD                16384 /* bytes of padding in the probe's ping */
#define ALONE_PERIODS            12    /* stabilisation periods alone before serving alone */

static size_t bucket(const nid_t *id)
{
    return ((size_t)id->b[0] << 8 | id->b[1]) % SN_ON_BUCKETS;
}

static struct attached *on_find(struct sn *s, const nid_t *id)
{
    for (struct attached *a = s->on_hash[bucket(id)]; a; a = a->next)
        if (nid_eq(&a->id, id))
            return a;
    return NULL;
}

void onsvc_init(struct sn *s)
{
    s->on_all.all_next = s->on_all.all_prev = &s->on_all;
}

static void on_unlink(struct sn *s, struct attached *a)
{
    for (struct attached **pp = &s->on_hash[bucket(&a->id)]; *pp; pp = &(*pp)->next)
        if (*pp == a) {
            *pp = a->next;
            break;
        }
    a->all_prev->all_next = a->all_next;
    a->all_next->all_prev = a->all_prev;
    if (a->link)
        a->link->on = NULL;
    s->n_attached--;
    free(a);
}

void onsvc_free(struct sn *s)
{
    while (s->on_all.all_next && s->on_all.all_next != &s->on_all)
        on_unlink(s, s->on_all.all_next);
}

size_t sn_attached(const struct sn *s)
{
    return s->n_attached;
}

bool sn_is_healthy(const struct sn *s)
{
    return s->healthy;
}

/* ---- alternates: other super nodes for an ordinary node's host cache ---- */

struct cand {
    struct peer *p;
    long spare; /* capacity - attached; LONG_MIN/2 when unknown */
};

static int cand_cmp(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    return (x->spare < y->spare) - (x->spare > y->spare);
}

json_t *onsvc_alternates(struct sn *s, size_t max)
{
    struct cand c[64];
    size_t n = 0;
    double now = sn_now(s);
    for (struct peer *p = s->peers; p && n < 64; p = p->next) {
        if (p->anon || !p->addr[0] || p->dead_at > 0)
            continue;
        /* ring neighbours, and nodes heard from lately */
        if (!peer_in_ring(s, p) && now - p->heard_at > 6 * s->p.stabilize_s)
            continue;
        long spare = p->capacity > 0 ? p->capacity - p->attached : -1000000000L;
        if (p->capacity > 0 && spare <= 0)
            continue; /* full: no use sending anyone there */
        c[n++] = (struct cand){p, spare};
    }
    qsort(c, n, sizeof(c[0]), cand_cmp);
    json_t *a = json_array();
    for (size_t i = 0; i < n && i < max; i++)
        json_array_append_new(a, peer_json(c[i].p));
    return a;
}

static void send_error_alt(struct sn *s, struct link *l, const char *tid, const char *code,
                           const char *reason)
{
    json_t *b = json_pack("{s:s,s:s,s:o}", "code", code, "reason", reason, "alternates",
                          onsvc_alternates(s, 8));
    link_send(l, "error", MSG_ERR, tid, b);
    json_decref(b);
}

/* ---- attach, keepalive ---- */

static void on_attach(struct sn *s, struct link *l, const struct msg *m)
{
    const char *listen = json_string_value(json_object_get(m->body, "listen"));
    if (json_object_get(m->body, "listen") &&
        (!listen || strlen(listen) >= SN_ADDR_MAX || cfg_parse_hostport(listen, NULL, 0, NULL))) {
        link_send_error(l, m->tid, "invalid-request", "listen must be a numeric host:port");
        return;
    }
    if (!l->has_id || !(l->roles & (ROLE_NODE | ROLE_SUPERNODE))) {
        link_send_error(l, m->tid, "forbidden", "attaching needs the node role and a Node-ID");
        return;
    }
    if (!s->healthy) {
        s->c.redirects++;
        send_error_alt(s, l, m->tid, "unavailable",
                       "this super node is not part of a working ring; try another");
        return;
    }
    struct attached *a = l->on;
    if (!a) {
        struct attached *old = on_find(s, &l->id);
        if (old) { /* the same node on a new link: the old one is stale */
            struct link *ol = old->link;
            on_unlink(s, old);
            if (ol && !ol->closing) {
                ol->closing = true;
                conn_close_with_error(ol->conn, NULL, "replaced",
                                      "the same node attached over a new connection");
            }
        }
        if (s->n_attached >= s->p.max_attached) {
            s->c.redirects++;
            char why[128];
            snprintf(why, sizeof(why),
                     "full: %zu ordinary nodes attached; try one of the "
                     "alternates",
                     s->n_attached);
            send_error_alt(s, l, m->tid, "redirect", why);
            return;
        }
        a = calloc(1, sizeof(*a));
        if (!a) {
            link_send_error(l, m->tid, "internal", "out of memory");
            return;
        }
        a->id = l->id;
        a->link = l;
        a->since = sn_now(s);
        a->tokens = 2 * s->p.on_rate;
        a->refilled = a->since;
        size_t b = bucket(&a->id);
        a->next = s->on_hash[b];
        s->on_hash[b] = a;
        a->all_next = s->on_all.all_next;
        a->all_prev = &s->on_all;
        s->on_all.all_next->all_prev = a;
        s->on_all.all_next = a;
        s->n_attached++;
        l->on = a;
        s->c.attaches++;
        /* An attach link is the node's ordinary side: never its ring link (link.h, `ring`). */
        if (l->peer && l->peer->link == l)
            l->peer->link = NULL;
        l->peer = NULL;
        l->ring = false;
    }
    a->last_seen = sn_now(s);
    snprintf(a->listen, sizeof(a->listen), "%s", listen ? listen : "");
    json_t *res =
        json_pack("{s:o,s:f,s:o,s:s}", "node", self_json(s), "keepalive_s", s->p.keepalive_s,
                  "alternates", onsvc_alternates(s, 8), "reflexive", conn_peer_addr(l->conn));
    if (s->p.stun)
        json_object_set_new(res, "stun", json_string(s->p.stun));
    link_send(l, "attach", MSG_RES, m->tid, res);
    json_decref(res);
}

bool onsvc_admit_request(struct sn *s, struct link *l, const struct msg *m)
{
    /* Only the node's own ordinary side (a promoted node, the SIP front end) is exempt. The
     * super node role is no mark of trust here: every account may be promoted, so it is the
     * default role of ordinary nodes too. */
    if (l->has_id && nid_eq(&l->id, &s->id))
        return true;
    struct attached *a = l->on;
    if (!a) {
        link_send_error(l, m->tid, "not-attached", "attach first");
        return false;
    }
    double now = sn_now(s);
    a->last_seen = now;
    a->tokens += (now - a->refilled) * s->p.on_rate;
    if (a->tokens > 2 * s->p.on_rate)
        a->tokens = 2 * s->p.on_rate;
    a->refilled = now;
    if (a->tokens < 1.0 || a->inflight >= s->p.on_inflight) {
        s->c.rate_limited++;
        char why[128];
        if (a->tokens < 1.0)
            snprintf(why, sizeof(why), "more than %.0f requests per second", s->p.on_rate);
        else
            snprintf(why, sizeof(why), "more than %u requests in progress", s->p.on_inflight);
        link_send_error(l, m->tid, "rate-limited", why);
        return false;
    }
    a->tokens -= 1.0;
    a->inflight++;
    return true;
}

void onsvc_request_done(struct sn *s, struct link *l)
{
    if (l && l->on && l->on->inflight)
        l->on->inflight--;
}

void onsvc_link_closed(struct sn *s, struct link *l)
{
    if (l->on)
        on_unlink(s, l->on);
}

/* ---- delivery ---- */

void onsvc_deliver_here(struct sn *s, json_t *args, const char *origin_hex, const char **code,
                        char *err, size_t errlen)
{
    nid_t to;
    const char *hex = json_string_value(json_object_get(args, "to"));
    json_t *payload = json_object_get(args, "payload");
    *code = NULL;
    if (!hex || nid_from_hex(&to, hex) != 0 || !payload) {
        *code = "invalid-request";
        snprintf(err, errlen, "deliver needs to and payload");
        return;
    }
    struct attached *a = on_find(s, &to);
    if (!a || !a->link || a->link->closing) {
        *code = "not-attached";
        snprintf(err, errlen, "node %.8s is not attached to this super node", hex);
        return;
    }
    json_t *ind = json_pack("{s:O,s:O}", "from", json_object_get(args, "from"), "payload", payload);
    if (link_send(a->link, "deliver", MSG_IND, NULL, ind) != 0) {
        *code = "overloaded";
        snprintf(err, errlen, "cannot queue the message for node %.8s", hex);
    } else {
        s->c.delivered++;
    }
    json_decref(ind);
}

/* ---- probes: can we reach the ordinary node's own port? ---- */

struct probe {
    struct sn *s;
    struct link *client; /* the asking link (may go away: checked by serial) */
    uint64_t client_serial;
    char tid[MSG_TID_LEN + 1];
    nid_t id;
    char addr[SN_ADDR_MAX];
    struct conn *conn;
    ev_timer timer;
    char ping_tid[MSG_TID_LEN + 1];
    double ping_sent;
    double kbps; /* the padded ping's size over its round trip, once answered */
    bool answered;
};

static void probe_answer(struct probe *p, bool ok, const char *reason)
{
    if (p->answered)
        return;
    p->answered = true;
    ev_timer_stop(p->s->loop, &p->timer);
    struct link *l = link_by_serial(p->s, p->client, p->client_serial);
    if (l)
        l->probing = false;
    if (l) {
        json_t *b = ok ? json_pack("{s:b,s:s,s:I}", "reachable", 1, "addr", p->addr, "kbps",
                                   (json_int_t)p->kbps)
                       : json_pack("{s:b,s:s,s:s}", "reachable", 0, "addr", p->addr, "reason",
                                   reason ? reason : "");
        link_send(l, "probe", MSG_RES, p->tid, b);
        json_decref(b);
        if (l->on) /* invitations go only to nodes whose latest probe succeeded */
            l->on->reachable = ok;
    }
    if (ok)
        log_info("probe", "%s: reachable (about %.0f kbit/s)", p->addr, p->kbps);
    else
        log_info("probe", "%s: not reachable: %s", p->addr, reason ? reason : "");
}

static void probe_open(struct conn *c, void *ud)
{
    struct probe *p = ud;
    const struct peer_identity *id = conn_peer(c);
    if (!id->has_node_id || !nid_eq(&id->node_id, &p->id)) {
        probe_answer(p, false, "another node answers at that address");
        conn_close(c);
        return;
    }
    /* The ping carries PROBE_PAD bytes: its round trip gives a rough bandwidth figure. */
    msg_new_tid(p->ping_tid);
    static char pad[PROBE_PAD + 1];
    if (!pad[0])
        memset(pad, 'p', PROBE_PAD);
    json_t *b = json_pack("{s:s}", "pad", pad);
    p->ping_sent = ev_time();
    int rc = conn_send(c, "ping", MSG_REQ, p->ping_tid, b);
    json_decref(b);
    if (rc != 0) {
        probe_answer(p, false, "cannot send");
        conn_close(c);
    }
}

static void probe_message(struct conn *c, const struct msg *m, void *ud)
{
    struct probe *p = ud;
    if (strcmp(m->tid, p->ping_tid) != 0)
        return;
    double rtt = ev_time() - p->ping_sent;
    p->kbps = PROBE_PAD * 8.0 / 1000.0 / (rtt > 1e-6 ? rtt : 1e-6);
    probe_answer(p, m->kind == MSG_RES, "it refused our ping");
    conn_close(c);
}

static void probe_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct probe *p = ud;
    probe_answer(p, false, detail && *detail ? detail : conn_close_reason_str(r));
    ev_timer_stop(p->s->loop, &p->timer);
    free(p);
}

static void probe_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct probe *p = w->data;
    probe_answer(p, false, "no answer in time");
    conn_close(p->conn); /* probe_close frees it */
}

static const struct conn_cbs probe_cbs = {
    .on_open = probe_open, .on_message = probe_message, .on_close = probe_close};

static void on_probe(struct sn *s, struct link *l, const struct msg *m)
{
    /*
     * An attached ordinary node asks before it may be promoted; a super node
     * (a promoted one, checking that it is still reachable) asks a ring
     * neighbour. Either way the probe goes to the asker's own Node-ID.
     */
    bool sn_asks = !l->on && link_is_sn(l);
    if (!l->on && !sn_asks) {
        link_send_error(l, m->tid, "not-attached", "attach first");
        return;
    }
    const char *addr = json_string_value(json_object_get(m->body, "listen"));
    if (!addr && l->on)
        addr = l->on->listen[0] ? l->on->listen : NULL;
    char want[SN_ADDR_MAX], from[SN_ADDR_MAX];
    if (!addr || strlen(addr) >= SN_ADDR_MAX ||
        cfg_parse_hostport(addr, want, sizeof(want), NULL) != 0) {
        link_send_error(l, m->tid, "invalid-request", "probe needs listen: a numeric host:port");
        return;
    }
    /*
     * Back, not elsewhere: the probe goes to the address the request came
     * from (another port is fine: a port forward), so that nobody can make
     * super nodes open connections to third parties; and one at a time.
     */
    if (cfg_parse_hostport(conn_peer_addr(l->conn), from, sizeof(from), NULL) != 0 ||
        strcmp(want, from) != 0) {
        link_send_error(l, m->tid, "forbidden",
                        "a probe connects back to the address the request came from");
        return;
    }
    if (l->probing) {
        link_send_error(l, m->tid, "rate-limited", "a probe for this link is under way");
        return;
    }
    struct probe *p = calloc(1, sizeof(*p));
    if (!p) {
        link_send_error(l, m->tid, "internal", "out of memory");
        return;
    }
    p->s = s;
    p->client = l;
    p->client_serial = l->serial;
    l->probing = true;
    snprintf(p->tid, sizeof(p->tid), "%s", m->tid);
    p->id = l->id;
    snprintf(p->addr, sizeof(p->addr), "%s", addr);
    char err[256];
    p->conn = conn_connect(s->loop, s->tls, addr, &probe_cbs, p, err, sizeof(err));
    if (!p->conn) {
        probe_answer(p, false, err);
        free(p);
        return;
    }
    ev_timer_init(&p->timer, probe_timeout, PROBE_TIMEOUT_S, 0.);
    p->timer.data = p;
    ev_timer_start(s->loop, &p->timer);
}

static void on_keepalive(struct sn *s, struct link *l, const struct msg *m)
{
    if (!l->on) {
        link_send_error(l, m->tid, "not-attached", "attach first");
        return;
    }
    l->on->last_seen = sn_now(s);
    link_send(l, "keepalive", MSG_RES, m->tid, NULL);
}

/*
 * TURN credentials (docs/protocol.md 5.8): always for the link's own,
 * authenticated Node-ID (the body names nobody), rate-limited like the other
 * requests of an attached node.
 */
static void on_turn(struct sn *s, struct link *l, const struct msg *m)
{
    if (!l->has_id) {
        link_send_error(l, m->tid, "forbidden", "TURN credentials need a Node-ID");
        return;
    }
    if (!onsvc_admit_request(s, l, m))
        return;
    char hex[NID_HEX_LEN + 1], user[160], pass[64], realm[160];
    unsigned ttl = s->p.turn_ttl_s ? s->p.turn_ttl_s : 600;
    nid_to_hex(&l->id, hex);
    if (!s->p.turn || !s->p.stun) {
        link_send_error(l, m->tid, "unavailable", "this super node runs no TURN server");
    } else if (turn_issue(s->p.turn, hex, ttl, user, sizeof(user), pass, sizeof(pass), realm,
                          sizeof(realm)) != 0) {
        link_send_error(l, m->tid, "internal", "cannot make TURN credentials");
    } else {
        long long expires = strtoll(user, NULL, 10);
        json_t *b = json_pack("{s:s,s:s,s:s,s:s,s:I,s:I}", "server", s->p.stun, "username", user,
                              "password", pass, "realm", realm, "expires", (json_int_t)expires,
                              "bandwidth_kbps", (json_int_t)turn_bandwidth_kbps(s->p.turn));
        link_send(l, "turn", MSG_RES, m->tid, b);
        json_decref(b);
        log_debug("on", "TURN credentials for %.8s until %lld", hex, expires);
    }
    onsvc_request_done(s, l);
}

void sn_set_turn(struct sn *s, struct turn_server *t)
{
    if (s)
        s->p.turn = t;
}

bool onsvc_message(struct sn *s, struct link *l, const struct msg *m)
{
    if (m->kind != MSG_REQ)
        return false;
    if (!strcmp(m->type, "attach"))
        on_attach(s, l, m);
    else if (!strcmp(m->type, "keepalive"))
        on_keepalive(s, l, m);
    else if (!strcmp(m->type, "probe"))
        on_probe(s, l, m);
    else if (!strcmp(m->type, "turn"))
        on_turn(s, l, m);
    else
        return false;
    return true;
}

/* ---- the periodic round: health, silent nodes, invitations ---- */

static void tell_all_to_move(struct sn *s, const char *reason)
{
    json_t *b = json_pack("{s:s,s:o}", "reason", reason, "alternates", onsvc_alternates(s, 8));
    for (struct attached *a = s->on_all.all_next; a != &s->on_all; a = a->all_next)
        if (a->link && link_send(a->link, "move", MSG_IND, NULL, b) == 0)
            s->c.moved++;
    json_decref(b);
}

void onsvc_tick(struct sn *s)
{
    double now = sn_now(s);
    if (s->n_succ > 0) {
        s->had_peers = true;
        s->alone_since = 0;
    } else if (s->had_peers && s->state == SN_MEMBER) {
        /*
         * Alone after having peers: cut off, or the last one standing. A
         * partition heals within a few periods; after ALONE_PERIODS it is
         * the whole ring, and a ring of one serves like a seed (otherwise the
         * overlay's last super node would refuse everyone for good).
         */
        if (s->alone_since == 0)
            s->alone_since = now;
        else if (now - s->alone_since > ALONE_PERIODS * s->p.stabilize_s) {
            log_warn("health", "alone for %.0f s: serving as a ring of one", now - s->alone_since);
            s->had_peers = false;
            s->alone_since = 0;
        }
    }
    const char *why = NULL;
    if (s->state != SN_MEMBER)
        why = "not a member of the ring";
    else if (s->had_peers && s->n_succ == 0)
        why = "no live successor";
    else if (s->route_failures >= ROUTE_FAILURES_UNHEALTHY &&
             now - s->last_reply_at > ROUTE_SILENCE_PERIODS * s->p.stabilize_s)
        why = "requests through the ring time out"; /* slow answers are overload, not this */
    bool healthy = why == NULL;
    if (healthy != s->healthy) {
        s->healthy = healthy;
        if (healthy) {
            log_info("health", "healthy: serving ordinary nodes");
        } else {
            log_warn("health",
                     "unhealthy (%s): not accepting ordinary nodes, telling %zu "
                     "attached ones to move",
                     why, s->n_attached);
            if (s->state == SN_MEMBER || s->state == SN_LEAVING)
                tell_all_to_move(s, why);
        }
        if (s->p.on_health)
            s->p.on_health(s->p.ud, healthy);
    }
    /* Silent ordinary nodes go; so does their place in the count. */
    double limit = 3 * s->p.keepalive_s;
    struct attached *invite = NULL;
    for (struct attached *a = s->on_all.all_next, *nx; a != &s->on_all; a = nx) {
        nx = a->all_next;
        if (now - a->last_seen > limit) {
            struct link *l = a->link;
            log_info("on", "%s: no keepalive for %.0f s: dropping it",
                     l ? conn_peer_addr(l->conn) : "?", now - a->last_seen);
            on_unlink(s, a);
            if (l && !l->closing) {
                l->closing = true;
                conn_close_with_error(l->conn, NULL, "timeout", "no keepalive");
            }
            continue;
        }
        if (a->reachable && now - a->invited_at > INVITE_INTERVAL_S &&
            (!invite || a->since < invite->since))
            invite = a;
    }
    /*
     * The overlay needs another super node when this one carries more than
     * sn_target_load ordinary nodes, or when the ring is too small to hold
     * every record `replication` times: invite the longest-attached reachable
     * node then.
     */
    const char *need = NULL;
    if (s->p.sn_target_load > 0 && (long long)s->n_attached > s->p.sn_target_load)
        need = "overloaded";
    else if (s->state == SN_MEMBER && s->n_succ + 1 < s->p.replication)
        need = "too-few";
    if (invite && need && healthy) {
        json_t *b = json_pack("{s:s,s:I,s:I}", "reason", need, "attached",
                              (json_int_t)s->n_attached, "ring", (json_int_t)(s->n_succ + 1));
        if (link_send(invite->link, "invite", MSG_IND, NULL, b) == 0) {
            invite->invited_at = now;
            char hex[NID_HEX_LEN + 1];
            log_info("on",
                     "invited %.8s (attached %.0f s, reachable at %s) to become a super node: "
                     "%s (%zu attached, ring of %u seen)",
                     nid_to_hex(&invite->id, hex), now - invite->since, invite->listen, need,
                     s->n_attached, s->n_succ + 1);
        }
        json_decref(b);
    }
}

/* ---- a promoted node asks a neighbour to probe it ---- */

static void self_probe_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    void (*cb)(void *, int, const char *, double) = s->self_probe_cb;
    void *ud = s->self_probe_ud;
    s->self_probe_cb = NULL;
    if (!cb)
        return;
    if (!m || m->kind != MSG_RES) {
        const char *why = failure ? failure : json_string_value(json_object_get(m->body, "reason"));
        cb(ud, -1, why ? why : "refused", 0);
    } else if (json_is_true(json_object_get(m->body, "reachable"))) {
        cb(ud, 1, "", (double)json_integer_value(json_object_get(m->body, "kbps")));
    } else {
        cb(ud, 0, json_string_value(json_object_get(m->body, "reason")) ?: "", 0);
    }
}

int sn_probe_self(struct sn *s, void (*cb)(void *ud, int verdict, const char *detail, double kbps),
                  void *ud, char *who, size_t wholen)
{
    struct peer *p = s->state == SN_MEMBER ? (s->n_succ ? s->succ[0] : s->pred) : NULL;
    if (!p || nid_eq(&p->id, &s->id) || s->self_probe_cb)
        return -1;
    json_t *b = json_pack("{s:s}", "listen", s->advertise);
    struct preq *r = peer_request(s, p, "probe", b, PROBE_TIMEOUT_S + 2.0, self_probe_done, NULL);
    json_decref(b);
    if (!r)
        return -1;
    s->self_probe_cb = cb;
    s->self_probe_ud = ud;
    if (who)
        snprintf(who, wholen, "%s", p->addr);
    return 0;
}
