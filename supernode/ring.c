/*
 * The Chord ring of super nodes (docs/ring.md): joining, stabilisation with
 * successor lists, fingers, failure handling, recursive routing with direct
 * replies to the originating node, the record requests of docs/protocol.md
 * 4.5, graceful leave, and the status document.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "overlay_doc.h"
#include "sn_int.h"

static void join_send(struct sn *s, const char *addr);
static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void sync_tick_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void sync_soon_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void join_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void stabilize(struct sn *s);

static const char *hex8(const nid_t *id, char buf[NID_HEX_LEN + 1])
{
    nid_to_hex(id, buf);
    buf[8] = '\0';
    return buf;
}

/* ---- ring predicates ---- */

static struct peer *succ0(const struct sn *s)
{
    return s->n_succ ? s->succ[0] : NULL;
}

bool ring_is_primary(const struct sn *s, const nid_t *key)
{
    if (s->state != SN_MEMBER && s->state != SN_LEAVING)
        return false;
    if (!s->pred)
        return s->n_succ == 0; /* alone: everything is ours */
    return nid_in_open_closed(key, &s->pred->id, &s->id);
}

/*
 * Are we the target's successor? `final`: the sender believes so. Without a
 * predecessor (it has just failed) the sender is believed unless we heard
 * lately from a node between the target and us, which is then closer to the
 * target's successor than we are: answering from our store would say
 * "not found" for a key we do not hold.
 */
static bool responsible(const struct sn *s, const nid_t *t, bool final)
{
    if (s->n_succ == 0)
        return true;
    if (s->pred)
        return nid_in_open_closed(t, &s->pred->id, &s->id);
    if (!final)
        return false;
    double now = ev_now(s->loop), fresh = 3 * s->p.stabilize_s;
    for (const struct peer *p = s->peers; p; p = p->next)
        if (!p->anon && p->addr[0] && p->dead_at <= 0 && now - p->heard_at <= fresh &&
            !nid_eq(&p->id, &s->id) && (nid_eq(&p->id, t) || nid_in_open(&p->id, t, &s->id)))
            return false;
    return true;
}

/* The known node closest before t (fingers and successors), or NULL. */
static struct peer *closest_preceding(const struct sn *s, const nid_t *t)
{
    struct peer *best = NULL;
    nid_t bestd, d;
    for (unsigned i = 0; i < s->n_succ + SN_FINGERS; i++) {
        struct peer *p = i < s->n_succ ? s->succ[i] : s->finger[i - s->n_succ];
        if (!p || p->dead_at > 0 || !nid_in_open(&p->id, &s->id, t))
            continue;
        nid_distance(&d, &s->id, &p->id);
        if (!best || nid_cmp(&d, &bestd) > 0) {
            best = p;
            bestd = d;
        }
    }
    return best;
}

void ring_changed(struct sn *s)
{
    /* Fingers inside the successor list's span come from the list itself. */
    if (s->n_succ) {
        const struct peer *last = s->succ[s->n_succ - 1];
        for (unsigned i = 0; i < SN_FINGERS; i++) {
            nid_t start;
            nid_add_pow2(&start, &s->id, i);
            if (!nid_in_open_closed(&start, &s->id, &last->id))
                continue;
            for (unsigned k = 0; k < s->n_succ; k++)
                if (nid_in_open_closed(&start, &s->id, &s->succ[k]->id)) {
                    s->finger[i] = s->succ[k];
                    break;
                }
        }
    }
    if (!ev_is_active(&s->sync_soon) && s->state == SN_MEMBER) {
        ev_timer_set(&s->sync_soon, 0.3, 0.);
        ev_timer_start(s->loop, &s->sync_soon);
    }
}

/* Successor list = [first] + rest, without ourselves, duplicates or recently dead peers. */
static void set_succ_list(struct sn *s, struct peer *first, json_t *rest)
{
    struct peer *list[SN_MAX_SUCC];
    unsigned n = 0, max = s->p.succ_list;
    double now = sn_now(s);
    if (first && !nid_eq(&first->id, &s->id))
        list[n++] = first;
    size_t i;
    json_t *e;
    json_array_foreach(rest, i, e)
    {
        if (n >= max)
            break;
        nid_t id;
        char addr[SN_ADDR_MAX];
        if (peer_parse(e, &id, addr, sizeof(addr)) != 0 || nid_eq(&id, &s->id))
            continue;
        struct peer *p = peer_get(s, &id, addr, PEER_HEARSAY);
        if (!p || (p->dead_at > 0 && now - p->dead_at < 3 * s->p.stabilize_s))
            continue;
        bool dup = false;
        for (unsigned k = 0; k < n; k++)
            dup |= list[k] == p;
        if (!dup)
            list[n++] = p;
    }
    bool changed = n != s->n_succ;
    for (unsigned k = 0; k < n && !changed; k++)
        changed = list[k] != s->succ[k];
    if (!changed)
        return;
    memcpy(s->succ, list, n * sizeof(list[0]));
    s->n_succ = n;
    if (n > 0) { /* where to look for the ring should we ever be left alone */
        s->n_remembered = n < SN_REMEMBER ? n : SN_REMEMBER;
        for (unsigned k = 0; k < s->n_remembered; k++)
            snprintf(s->remembered[k], SN_ADDR_MAX, "%s", list[k]->addr);
    }
    if (n && log_enabled(LL_DEBUG)) {
        char a[NID_HEX_LEN + 1];
        log_debug("ring", "successor now %s at %s (%u in list)", hex8(&list[0]->id, a),
                  list[0]->addr, n);
    }
    ring_changed(s);
}

static void set_pred(struct sn *s, struct peer *p)
{
    if (s->pred == p)
        return;
    char a[NID_HEX_LEN + 1];
    s->pred = p;
    if (p)
        log_debug("ring", "predecessor now %s at %s", hex8(&p->id, a), p->addr);
    ring_changed(s);
}

static json_t *succ_json(const struct sn *s, bool with_self)
{
    json_t *a = json_array();
    if (with_self)
        json_array_append_new(a, self_json((struct sn *)s));
    for (unsigned i = 0; i < s->n_succ; i++)
        json_array_append_new(a, peer_json(s->succ[i]));
    return a;
}

static void become_member(struct sn *s, const char *how)
{
    s->state = SN_MEMBER;
    ev_timer_stop(s->loop, &s->join_timer);
    log_info("ring", "%s as %s at %s", how, s->id_hex, s->advertise);
    ring_changed(s);
    stabilize(s);
    if (s->p.on_membership)
        s->p.on_membership(s->p.ud, true);
    onsvc_tick(s); /* healthy now, not at the next period */
}

/* Our load as neighbours learn it (they redirect ordinary nodes to the least loaded). */
static json_t *load_json(const struct sn *s)
{
    return json_pack("{s:I,s:I}", "attached", (json_int_t)s->n_attached, "capacity",
                     (json_int_t)s->p.max_attached);
}

static void read_load(struct peer *p, json_t *load)
{
    json_t *a = json_object_get(load, "attached"), *c = json_object_get(load, "capacity");
    if (json_is_integer(a) && json_is_integer(c) && json_integer_value(a) >= 0 &&
        json_integer_value(c) > 0) {
        p->attached = (long)json_integer_value(a);
        p->capacity = (long)json_integer_value(c);
    }
}

/* ---- the requests we answer on a link ---- */

static bool require_sn(struct link *l, const struct msg *m)
{
    if (link_is_sn(l))
        return true;
    char who[512];
    log_warn("ring", "%s: %s from %s, which lacks the super node role: refused",
             conn_peer_addr(l->conn), m->type,
             cred_identity_str(conn_peer(l->conn), who, sizeof(who)));
    char reason[600];
    snprintf(reason, sizeof(reason), "%s needs the super node role; certificate of %s has not",
             m->type, who);
    l->closing = true;
    conn_close_with_error(l->conn, NULL, "forbidden", reason);
    return false;
}

static void on_stabilize(struct sn *s, struct link *l, const struct msg *m)
{
    nid_t id;
    char addr[SN_ADDR_MAX];
    if (peer_parse(json_object_get(m->body, "self"), &id, addr, sizeof(addr)) != 0) {
        link_send_error(l, m->tid, "invalid-request", "stabilize needs self {id, addr}");
        return;
    }
    if (!nid_eq(&id, &l->id)) {
        link_send_error(l, m->tid, "forbidden", "self.id is not the Node-ID of your certificate");
        return;
    }
    if (s->state != SN_MEMBER) {
        link_send_error(l, m->tid, "not-ready", "not a member of the ring");
        return;
    }
    struct peer *p = peer_get(s, &id, addr, PEER_OWN); /* its own word, on its own link */
    if (!p) {
        link_send_error(l, m->tid, "overloaded", "cannot record another super node now");
        return;
    }
    p->dead_at = 0;
    if (!p->link)
        p->link = l;
    l->peer = p;
    /* Rectify: adopt a closer predecessor, or any when ours is unknown. */
    if (!s->pred || nid_in_open(&id, &s->pred->id, &s->id))
        set_pred(s, p);
    if (s->n_succ == 0) /* we were alone: a ring of two */
        set_succ_list(s, p, NULL);
    read_load(p, json_object_get(m->body, "load"));
    json_t *b = json_object();
    json_object_set_new(b, "pred", s->pred ? peer_json(s->pred) : json_null());
    json_object_set_new(b, "succ", succ_json(s, false));
    json_object_set_new(b, "load", load_json(s));
    link_send(l, "stabilize", MSG_RES, m->tid, b);
    json_decref(b);
}

static void stabilize_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    s->stabilizing = false;
    struct peer *p = r->peer;
    if (s->state != SN_MEMBER)
        return;
    if (!m) {
        if (p->strikes >= 3)
            peer_dead(s, p, "no answer to 3 stabilize requests");
        return;
    }
    if (m->kind != MSG_RES) {
        const char *code = json_string_value(json_object_get(m->body, "code"));
        log_info("ring", "%s refused stabilize: %s", p->addr, code ? code : "?");
        return; /* "not-ready": it is still joining; ask again next period */
    }
    read_load(p, json_object_get(m->body, "load"));
    if (succ0(s) != p)
        return; /* the successor changed meanwhile */
    set_succ_list(s, p, json_object_get(m->body, "succ"));
    /* Its predecessor between us and it is our better successor. */
    nid_t id;
    char addr[SN_ADDR_MAX];
    json_t *pj = json_object_get(m->body, "pred");
    if (json_is_object(pj) && peer_parse(pj, &id, addr, sizeof(addr)) == 0 &&
        nid_in_open(&id, &s->id, &p->id)) {
        struct peer *x = peer_get(s, &id, addr, PEER_HEARSAY);
        double now = sn_now(s);
        if (x && !(x->dead_at > 0 && now - x->dead_at < 3 * s->p.stabilize_s)) {
            json_t *rest = succ_json(s, false);
            set_succ_list(s, x, rest);
            json_decref(rest);
            stabilize(s); /* tell it about us now rather than next period */
        }
    }
}

static void stabilize(struct sn *s)
{
    if (s->state != SN_MEMBER || s->stabilizing)
        return;
    if (s->n_succ == 0) {
        if (!s->pred)
            return; /* alone */
        set_succ_list(s, s->pred, NULL);
    }
    struct peer *p = succ0(s);
    json_t *b = json_pack("{s:o,s:o}", "self", self_json(s), "load", load_json(s));
    struct preq *r = peer_request(s, p, "stabilize", b, 0, stabilize_done, NULL);
    json_decref(b);
    if (r)
        s->stabilizing = true;
    else
        peer_send_failed(s, p, "cannot reach it");
}

static void on_leave(struct sn *s, struct link *l, const struct msg *m)
{
    struct peer *p = peer_find(s, &l->id);
    char a[NID_HEX_LEN + 1];
    log_info("ring", "%s at %s is leaving", hex8(&l->id, a), p ? p->addr : conn_peer_addr(l->conn));
    if (!p)
        return;
    json_t *succ = json_object_get(m->body, "succ");
    json_t *pj = json_object_get(m->body, "pred");
    if (succ0(s) == p) {
        /* Our successor leaves: its successors become ours. */
        json_t *rest = json_array();
        size_t i;
        json_t *e;
        json_array_foreach(succ, i, e) json_array_append(rest, e);
        for (unsigned k = 1; k < s->n_succ; k++)
            json_array_append_new(rest, peer_json(s->succ[k]));
        p->dead_at = sn_now(s);
        s->succ[0] = NULL;
        s->n_succ = 0;
        set_succ_list(s, NULL, rest);
        json_decref(rest);
    }
    if (s->pred == p) {
        nid_t id;
        char addr[SN_ADDR_MAX];
        struct peer *np = NULL;
        if (json_is_object(pj) && peer_parse(pj, &id, addr, sizeof(addr)) == 0 &&
            !nid_eq(&id, &s->id))
            np = peer_get(s, &id, addr, PEER_HEARSAY);
        set_pred(s, np);
    }
    peer_dead(s, p, "left the ring");
    stabilize(s);
}

/* ---- routing ---- */

static void rreq_finish(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                        const char *reason, int hops, json_t *node);

static struct rreq *rreq_find(struct sn *s, const char *rid, bool unlink)
{
    size_t b = strtoul(rid + 8, NULL, 16) % SN_TABLE_SIZE;
    for (struct rreq **pp = &s->rreqs[b]; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->rid, rid) == 0) {
            struct rreq *r = *pp;
            if (unlink) {
                *pp = r->next;
                s->n_rreqs--;
            }
            return r;
        }
    return NULL;
}

/* Sends the answer of a routed request to its origin (directly, seed 004 4.4.1). */
static void send_reply(struct sn *s, json_t *route, bool ok, json_t *result, const char *code,
                       const char *reason)
{
    const char *rid = json_string_value(json_object_get(route, "rid"));
    int hops = (int)json_integer_value(json_object_get(route, "hops"));
    nid_t oid;
    char oaddr[SN_ADDR_MAX];
    if (!rid || peer_parse(json_object_get(route, "origin"), &oid, oaddr, sizeof(oaddr)) != 0)
        return;
    s->c.answered++;
    if (nid_eq(&oid, &s->id)) {
        struct rreq *r = rreq_find(s, rid, true);
        if (r) {
            json_t *me = self_json(s);
            rreq_finish(s, r, ok, result, code, reason, hops, me);
            json_decref(me);
        }
        return;
    }
    json_t *b =
        json_pack("{s:s,s:i,s:o,s:b}", "rid", rid, "hops", hops, "node", self_json(s), "ok", ok);
    if (ok)
        json_object_set_new(b, "result", result ? json_incref(result) : json_object());
    else {
        json_object_set_new(b, "code", json_string(code));
        json_object_set_new(b, "reason", json_string(reason ? reason : ""));
    }
    /*
     * A known node's authenticated address is used whatever the route says; an unknown
     * origin's address is dialled within the budget of unverified dials (link.c), and
     * only then is it recorded: forged origins must not fill the peer table.
     */
    struct peer *o = peer_find(s, &oid);
    if (!o && (link_to(s, &oid) || unverified_dial_possible(s)))
        o = peer_get(s, &oid, oaddr, PEER_HEARSAY);
    else if (!o)
        unverified_dial_refused(s, &oid, oaddr);
    s->dial_local = false;
    if (!o || peer_send(s, o, "reply", MSG_IND, NULL, b) != 0) {
        char a[NID_HEX_LEN + 1];
        if (!o || s->dial_local) /* over a bound: link.c said so, once per 5 s */
            log_debug("route", "cannot reply to origin %s at %s now", hex8(&oid, a), oaddr);
        else
            log_warn("route", "cannot reply to origin %s at %s", hex8(&oid, a), oaddr);
    }
    json_decref(b);
}

static void route_step(struct sn *s, json_t *route, const nid_t *from);

/* The joining node answered on the address it claimed: route its join again, as its own. */
static void join_verified(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    json_t *route = r->ud;
    nid_t jid;
    char jaddr[SN_ADDR_MAX], a[NID_HEX_LEN + 1];
    peer_parse(json_object_get(route, "origin"), &jid, jaddr, sizeof(jaddr));
    if (m && m->kind == MSG_RES && s->state == SN_MEMBER) {
        route_step(s, route, &jid);
    } else {
        s->c.joins_refused++;
        log_warn("ring", "join of %s at %s refused: the address does not answer as that node (%s)",
                 hex8(&jid, a), jaddr, failure ? failure : "refused");
    }
    json_decref(route);
}

/*
 * A join is admitted only from the joining node itself (docs/ring.md 8): the
 * route came on a link whose certificate carries the origin's Node-ID, or we
 * have just reached the claimed address and found that certificate there.
 * Otherwise a check starts (a ping over a link to the claimed address) and
 * the join is routed again when it succeeds; false meanwhile.
 */
static bool join_from_joiner(struct sn *s, json_t *route, const nid_t *from, const nid_t *jid,
                             const char *jaddr)
{
    if (from && nid_eq(from, jid))
        return true;
    char a[NID_HEX_LEN + 1];
    struct peer *j = peer_find(s, jid);
    if (!j && unverified_dial_possible(s))
        j = peer_get(s, jid, NULL, PEER_HEARSAY);
    else if (!j)
        unverified_dial_refused(s, jid, jaddr);
    struct link *l = NULL;
    if (j && j->verified && !strcmp(j->addr, jaddr))
        l = link_to(s, jid);
    if (j && !l)
        l = link_dial_verify(s, j, jaddr);
    json_t *copy = json_deep_copy(route);
    if (!l || !copy || !link_request(s, l, j, "ping", NULL, 5.0, join_verified, copy)) {
        json_decref(copy);
        s->c.joins_refused++;
        log_warn("ring",
                 "join of %s at %s, routed through others, refused: cannot check "
                 "that address now",
                 hex8(jid, a), jaddr);
        return false;
    }
    log_info("ring", "join of %s at %s came through others: checking that address first",
             hex8(jid, a), jaddr);
    return false;
}

static void op_join(struct sn *s, json_t *route, const nid_t *from)
{
    nid_t jid;
    char jaddr[SN_ADDR_MAX];
    peer_parse(json_object_get(route, "origin"), &jid, jaddr, sizeof(jaddr));
    if (nid_eq(&jid, &s->id)) {
        send_reply(s, route, false, NULL, "conflict",
                   "a node with this Node-ID is already in the ring");
        return;
    }
    if (!join_from_joiner(s, route, from, &jid, jaddr))
        return;
    struct peer *j = peer_get(s, &jid, jaddr, PEER_OWN);
    if (!j) {
        send_reply(s, route, false, NULL, "overloaded", "cannot record another super node now");
        return;
    }
    j->dead_at = 0;
    /*
     * Already our predecessor: we admitted it and our answer was lost or
     * late. Admit it again; its own predecessor it learns by stabilisation.
     */
    bool again = s->pred == j;
    struct peer *old = again ? NULL : s->pred;
    bool alone = s->n_succ == 0;
    json_t *res = json_object();
    json_object_set_new(res, "pred",
                        old                 ? peer_json(old)
                        : (alone && !again) ? self_json(s)
                                            : json_null());
    json_object_set_new(res, "succ", succ_json(s, true));
    char a[NID_HEX_LEN + 1];
    log_info("ring", "admitting %s at %s%s", hex8(&jid, a), jaddr, again ? " again" : "");
    if (!again && (!old || nid_in_open(&jid, &old->id, &s->id)))
        set_pred(s, j);
    if (alone)
        set_succ_list(s, j, NULL);
    send_reply(s, route, true, res, NULL, NULL);
    json_decref(res);
}

static int rec_by_owner(const void *a, const void *b)
{
    return strcmp((*(const struct record *const *)a)->owner,
                  (*(const struct record *const *)b)->owner);
}

/*
 * The live records of a key, by owner, as many as fit one frame (docs/protocol.md
 * 4.3): a key may hold quota_per_key records of max_record_bytes each, more than
 * a frame carries. The answer then says "more" and the owner to continue
 * "after"; the reader asks again with it.
 */
static void op_get(struct sn *s, json_t *route)
{
    nid_t key;
    json_t *args = json_object_get(route, "args");
    const char *hex = json_string_value(json_object_get(args, "key"));
    const char *after = json_string_value(json_object_get(args, "after"));
    if (!hex || nid_from_hex(&key, hex) != 0) {
        send_reply(s, route, false, NULL, "invalid-request", "get needs a key");
        return;
    }
    double now = sn_now(s);
    size_t total = store_get(s->store, &key, now, NULL, 0);
    const struct record **recs = malloc((total ? total : 1) * sizeof(*recs));
    if (!recs) {
        send_reply(s, route, false, NULL, "internal", "out of memory");
        return;
    }
    size_t n = store_get(s->store, &key, now, recs, total);
    if (n > total)
        n = total;
    qsort(recs, n, sizeof(*recs), rec_by_owner);
    /* The answer crosses a super node link and then the client's, whose frame limit is the
     * default unless the overlay document raised everyone's: keep within both. */
    size_t frame = s->max_frame < MSG_MAX_FRAME_DEF ? s->max_frame : MSG_MAX_FRAME_DEF;
    size_t budget = frame > 8192 ? frame - 4096 : frame / 2, used = 0;
    json_t *arr = json_array();
    const char *last = NULL;
    bool more = false;
    for (size_t i = 0; i < n; i++) {
        if (after && strcmp(recs[i]->owner, after) <= 0)
            continue;
        size_t cost = recs[i]->size + 16; /* its compact encoding, and a separator */
        if (json_array_size(arr) > 0 && used + cost > budget) {
            more = true;
            break;
        }
        json_array_append(arr, recs[i]->envelope);
        used += cost;
        last = recs[i]->owner;
    }
    json_t *res = json_pack("{s:o}", "records", arr);
    if (more) {
        json_object_set_new(res, "more", json_true());
        json_object_set_new(res, "after", json_string(last));
    }
    free(recs);
    send_reply(s, route, true, res, NULL, NULL);
    json_decref(res);
}

/*
 * Answers to store requests, by request id and origin, for a minute: when an
 * origin retries (its timeout, a slow first attempt), the retry gets the first
 * attempt's answer instead of "stale" for its own write. A client that sends
 * the same record twice still gets "stale": that is a replay.
 */
static struct store_answer *answered_store(struct sn *s, const char *rid, const nid_t *origin,
                                           bool create)
{
    size_t h = strtoul(rid + 8, NULL, 16) % SN_STORE_ANSWERS;
    struct store_answer *a = &s->store_answers[h];
    bool same = !strcmp(a->rid, rid) && nid_eq(&a->origin, origin) && sn_now(s) - a->at < 60.0;
    if (same || !create)
        return same ? a : NULL;
    memset(a, 0, sizeof(*a));
    snprintf(a->rid, sizeof(a->rid), "%s", rid);
    a->origin = *origin;
    a->at = sn_now(s);
    return a;
}

static void op_store(struct sn *s, json_t *route)
{
    const char *rid = json_string_value(json_object_get(route, "rid"));
    nid_t origin;
    char oaddr[SN_ADDR_MAX];
    peer_parse(json_object_get(route, "origin"), &origin, oaddr, sizeof(oaddr));
    struct store_answer *seen = answered_store(s, rid, &origin, false);
    if (seen) {
        send_reply(s, route, seen->ok, NULL, seen->code, seen->reason);
        return;
    }
    struct store_answer *memo = answered_store(s, rid, &origin, true);
    json_t *args = json_object_get(route, "args");
    bool ok;
    enum store_mode mode =
        store_mode_from_str(json_string_value(json_object_get(args, "mode")), &ok);
    json_t *env = json_object_get(args, "record");
    if (!ok || mode == STORE_REPLICA || !env) {
        send_reply(s, route, false, NULL, "invalid-request", "store needs mode and record");
        return;
    }
    char err[512];
    const char *code = NULL;
    if (repl_apply(s, env, mode, err, sizeof(err), &code) != 0) {
        s->c.refused++;
        snprintf(memo->code, sizeof(memo->code), "%.31s", code);
        snprintf(memo->reason, sizeof(memo->reason), "%.159s", err);
        send_reply(s, route, false, NULL, code, err);
        return;
    }
    memo->ok = true;
    repl_after_store(s, env);
    send_reply(s, route, true, NULL, NULL, NULL);
}

static void handle_op(struct sn *s, json_t *route, const nid_t *from)
{
    const char *op = json_string_value(json_object_get(route, "op"));
    if (!strcmp(op, "find")) {
        json_t *res = json_pack("{s:o}", "succ", succ_json(s, true));
        send_reply(s, route, true, res, NULL, NULL);
        json_decref(res);
    } else if (!strcmp(op, "join"))
        op_join(s, route, from);
    else if (!strcmp(op, "get"))
        op_get(s, route);
    else if (!strcmp(op, "store"))
        op_store(s, route);
    else if (!strcmp(op, "deliver")) {
        const char *code;
        char err[256] = "";
        const char *ohex =
            json_string_value(json_object_get(json_object_get(route, "origin"), "id"));
        onsvc_deliver_here(s, json_object_get(route, "args"), ohex ? ohex : "", &code, err,
                           sizeof(err));
        send_reply(s, route, !code, NULL, code, err);
    } else if (!strcmp(op, "offer")) {
        const char *code;
        char err[512] = "";
        repl_on_offer(s, json_object_get(route, "args"), &code, err, sizeof(err));
        send_reply(s, route, !code, NULL, code, err);
    } else
        send_reply(s, route, false, NULL, "unknown-type", "unknown routed operation");
}

/* The successor-list member responsible for t, when t lies within the list's span. */
static struct peer *succ_for(const struct sn *s, const nid_t *t)
{
    const nid_t *prev = &s->id;
    for (unsigned k = 0; k < s->n_succ; k++) {
        if (s->succ[k]->dead_at > 0)
            return NULL;
        if (nid_in_open_closed(t, prev, &s->succ[k]->id))
            return s->succ[k];
        prev = &s->succ[k]->id;
    }
    return NULL;
}

/*
 * The first node at or after t among the super nodes we heard from lately (a
 * location cache on top of Chord: in a ring that fits in it, most requests
 * take one hop). Sent "final": if a node we do not know sits in between, the
 * receiver passes it back to its predecessor (route_step), so a stale cache
 * costs a hop, never a wrong answer.
 */
static struct peer *known_successor(const struct sn *s, const nid_t *t)
{
    double now = ev_now(s->loop), fresh = 6 * s->p.stabilize_s;
    struct peer *best = NULL;
    nid_t bestd, d;
    nid_distance(&bestd, t, &s->id); /* we are a candidate too: then the cache has nothing better */
    for (struct peer *p = s->peers; p; p = p->next) {
        if (p->anon || !p->addr[0] || p->dead_at > 0 || now - p->heard_at > fresh)
            continue;
        nid_distance(&d, t, &p->id);
        if (nid_cmp(&d, &bestd) < 0) {
            best = p;
            bestd = d;
        }
    }
    return best;
}

/*
 * One routing step for `route` (owned by the caller), here. `from`: the Node-ID
 * of the certificate of the link it came on (NULL when it starts here).
 */
static void route_step(struct sn *s, json_t *route, const nid_t *from)
{
    nid_t t;
    nid_from_hex(&t, json_string_value(json_object_get(route, "target")));
    bool final = json_is_true(json_object_get(route, "final"));
    int hops = (int)json_integer_value(json_object_get(route, "hops"));
    if (s->state == SN_JOINING || s->state == SN_IDLE || s->state == SN_LEFT) {
        send_reply(s, route, false, NULL, "not-ready", "this super node is not in the ring yet");
        return;
    }
    struct peer *next = NULL;
    if (s->state == SN_LEAVING) {
        next = succ0(s); /* it takes over everything we had */
        final = true;
    } else if (responsible(s, &t, final) ||
               (!strcmp(json_string_value(json_object_get(route, "op")), "join") && s->pred &&
                nid_eq(&t, &s->pred->id))) {
        handle_op(s, route, from); /* (a join by our own predecessor: see op_join) */
        return;
    } else if (final && s->pred && !nid_in_open_closed(&t, &s->pred->id, &s->id)) {
        next = s->pred; /* the sender's view is stale: our predecessor is closer */
    } else if ((next = succ_for(s, &t)) != NULL) {
        final = true; /* within our successor list's span: straight to the responsible node */
    } else if (!final && (next = known_successor(s, &t)) != NULL) {
        final = true;
    } else {
        next = closest_preceding(s, &t);
        final = false;
        if (!next)
            next = succ0(s);
    }
    if (!next) {
        handle_op(s, route, from);
        return;
    }
    if (hops >= SN_HOP_LIMIT) {
        send_reply(s, route, false, NULL, "hop-limit", "the request travelled 32 links");
        return;
    }
    json_object_set_new(route, "hops", json_integer(hops + 1));
    json_object_set_new(route, "final", json_boolean(final));
    if (peer_send(s, next, "route", MSG_IND, NULL, route) != 0) {
        /* Try the successor instead; the origin's timeout covers the rest. */
        struct peer *alt = succ0(s);
        if (alt == next || !alt || peer_send(s, alt, "route", MSG_IND, NULL, route) != 0)
            peer_send_failed(s, next, "cannot send to it");
    }
    s->c.forwarded++;
}

static void on_route(struct sn *s, struct link *l, const struct msg *m)
{
    json_t *b = m->body;
    nid_t t, oid;
    char oaddr[SN_ADDR_MAX];
    const char *rid = json_string_value(json_object_get(b, "rid"));
    const char *target = json_string_value(json_object_get(b, "target"));
    const char *op = json_string_value(json_object_get(b, "op"));
    json_t *hops = json_object_get(b, "hops");
    if (!rid || !msg_tid_valid(rid) || !target || nid_from_hex(&t, target) != 0 || !op ||
        !json_is_integer(hops) || json_integer_value(hops) < 0 ||
        peer_parse(json_object_get(b, "origin"), &oid, oaddr, sizeof(oaddr)) != 0) {
        log_warn("route", "%s: malformed route message dropped", conn_peer_addr(l->conn));
        return;
    }
    /* The origin speaking for itself on its own link states its own address. */
    if (nid_eq(&oid, &l->id))
        peer_get(s, &oid, oaddr, PEER_OWN);
    /* The message is ours until this returns: route it as it is (hops and final change). */
    route_step(s, b, &l->id);
}

/*
 * Could the route of r have ended at node n (docs/ring.md 8)? n must be the
 * target's successor as far as we know: no live node we heard from lately
 * (its link still up: a closed link forgets that) lies in [target, n), nor do
 * we (we would be closer, unless it is our own join). `closer` gets the node
 * that disproves it.
 */
static bool reply_plausible(const struct sn *s, const struct rreq *r, const nid_t *n, nid_t *closer)
{
    const nid_t *t = &r->target;
    if (nid_eq(n, t))
        return true; /* a node is its own Node-ID's successor ([t, n) is empty) */
    if (strcmp(r->op, "join") != 0 && !nid_eq(n, &s->id) &&
        (nid_eq(&s->id, t) || nid_in_open(&s->id, t, n))) {
        *closer = s->id;
        return false;
    }
    double now = ev_now(s->loop), fresh = 3 * s->p.stabilize_s;
    for (const struct peer *p = s->peers; p; p = p->next) {
        if (p->anon || p->dead_at > 0 || p->heard_at <= 0 || now - p->heard_at > fresh ||
            nid_eq(&p->id, n))
            continue;
        if (nid_eq(&p->id, t) || nid_in_open(&p->id, t, n)) {
            *closer = p->id;
            return false;
        }
    }
    return true;
}

static bool live_add(nid_t *seen, size_t *n, const nid_t *id, const struct sn *s, const nid_t *from,
                     const nid_t *to)
{
    if (nid_eq(id, &s->id) || !(nid_eq(id, from) || nid_in_open(id, from, to)))
        return false;
    for (size_t i = 0; i < *n; i++)
        if (nid_eq(&seen[i], id))
            return false;
    seen[(*n)++] = *id;
    return true;
}

/*
 * Peers we heard from lately, and the super node links that carried ring traffic lately (a
 * node that syncs its range with us may not be in our peer table: its link still names it by
 * its certificate).
 */
bool ring_live_at_least(const struct sn *s, const nid_t *from, const nid_t *to, size_t need)
{
    nid_t seen[64];
    size_t n = 0;
    if (need > 64)
        need = 64;
    double now = ev_now(s->loop), fresh = 3 * s->p.stabilize_s;
    for (const struct peer *p = s->peers; p && n < need; p = p->next) {
        if (p->anon || p->dead_at > 0 || p->heard_at <= 0 || now - p->heard_at > fresh)
            continue;
        live_add(seen, &n, &p->id, s, from, to);
    }
    for (const struct link *l = s->links.next; l != &s->links && n < need; l = l->next) {
        if (!l->open || l->closing || !l->has_id || !l->ring || !link_is_sn(l) ||
            now - l->last_used > fresh)
            continue;
        live_add(seen, &n, &l->id, s, from, to);
    }
    return n >= need;
}

static void on_reply(struct sn *s, struct link *l, const struct msg *m)
{
    const char *rid = json_string_value(json_object_get(m->body, "rid"));
    if (!rid || !msg_tid_valid(rid))
        return;
    struct rreq *r = rreq_find(s, rid, false);
    if (!r) {
        log_debug("route", "reply for unknown request %s ignored", rid);
        return;
    }
    /*
     * Only the node the route could have ended at answers (docs/ring.md 8): the
     * reply names its sender, on the sender's own link, and that node is the
     * target's successor as far as we know. Anything else is ignored; the
     * request stays pending for the real answer.
     */
    nid_t nid, closer;
    char naddr[SN_ADDR_MAX], a[NID_HEX_LEN + 1], b[NID_HEX_LEN + 1], c[NID_HEX_LEN + 1];
    const char *bad = NULL;
    if (peer_parse(json_object_get(m->body, "node"), &nid, naddr, sizeof(naddr)) != 0)
        bad = "it names no node";
    else if (!nid_eq(&nid, &l->id))
        bad = "it names a node other than its sender";
    else if (!reply_plausible(s, r, &nid, &closer)) {
        s->c.replies_refused++;
        log_warn("route", "%s: reply for %s (%s %s) from %s refused: %s is closer to the target",
                 conn_peer_addr(l->conn), rid, r->op, hex8(&r->target, a), hex8(&nid, b),
                 hex8(&closer, c));
        return;
    }
    if (bad) {
        s->c.replies_refused++;
        log_warn("route", "%s: reply for %s refused: %s", conn_peer_addr(l->conn), rid, bad);
        return;
    }
    rreq_find(s, rid, true);
    s->c.replies++;
    s->route_failures = 0;
    s->last_reply_at = sn_now(s);
    /* The responder is a live super node: remember it for routing (known_successor). */
    struct peer *p = peer_get(s, &nid, naddr, PEER_OWN);
    if (p) {
        p->heard_at = sn_now(s);
        p->dead_at = 0;
    }
    bool ok = json_is_true(json_object_get(m->body, "ok"));
    rreq_finish(s, r, ok, json_object_get(m->body, "result"),
                json_string_value(json_object_get(m->body, "code")),
                json_string_value(json_object_get(m->body, "reason")),
                (int)json_integer_value(json_object_get(m->body, "hops")),
                json_object_get(m->body, "node"));
}

static void rreq_timeout(struct ev_loop *loop, ev_timer *w, int revents);

static double rreq_timeout_s(const struct sn *s)
{
    double worst = 0;
    for (unsigned i = 0; i < s->n_succ; i++)
        if (s->succ[i]->has_rtt && peer_rto(s->succ[i]) > worst)
            worst = peer_rto(s->succ[i]);
    double t = 1.0 + 8 * worst;
    return t > 10.0 ? 10.0 : t;
}

void rreq_launch(struct sn *s, struct rreq *r)
{
    char tgt[NID_HEX_LEN + 1];
    json_t *route = json_pack("{s:s,s:s,s:o,s:i,s:b,s:s,s:O}", "rid", r->rid, "target",
                              nid_to_hex(&r->target, tgt), "origin", self_json(s), "hops", 0,
                              "final", false, "op", r->op, "args", r->args);
    r->attempts++;
    ev_timer_set(&r->timer, rreq_timeout_s(s), 0.);
    ev_timer_start(s->loop, &r->timer);
    route_step(s, route, NULL);
    json_decref(route);
}

/* Starts a routed request. The callback runs exactly once (possibly before this returns). */
struct rreq *rreq_start(struct sn *s, const nid_t *target, const char *op, json_t *args, rreq_cb cb)
{
    struct rreq *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->sn = s;
    msg_new_tid(r->rid);
    r->target = *target;
    snprintf(r->op, sizeof(r->op), "%s", op);
    r->args = args ? json_incref(args) : json_object();
    r->cb = cb;
    r->started = sn_now(s);
    ev_timer_init(&r->timer, rreq_timeout, 1.0, 0.);
    r->timer.data = r;
    size_t b = strtoul(r->rid + 8, NULL, 16) % SN_TABLE_SIZE;
    r->next = s->rreqs[b];
    s->rreqs[b] = r;
    s->n_rreqs++;
    s->c.originated++;
    return r;
}

static void rreq_finish(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                        const char *reason, int hops, json_t *node)
{
    ev_timer_stop(s->loop, &r->timer);
    if (ok)
        s->c.hops_sum += hops > 0 ? (uint64_t)hops : 0;
    r->cb(s, r, ok, result, code ? code : "error", reason ? reason : "", hops, node);
    json_decref(r->args);
    free(r);
}

static void rreq_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct rreq *r = w->data;
    struct sn *s = r->sn;
    if (r->attempts < 2 && s->state == SN_MEMBER) {
        rreq_launch(s, r); /* once more: the ring may have repaired meanwhile */
        return;
    }
    rreq_find(s, r->rid, true);
    s->c.timeouts++;
    s->route_failures++;
    rreq_finish(s, r, false, NULL, "timeout", "no reply from the responsible super node in time", 0,
                NULL);
}

/* ---- record requests from clients (protocol.md 4.5) ---- */

static const char *const req_types[SN_REQ_TYPES] = {"get", "store", "find", "deliver"};
static const double lat_le[SN_LAT_BUCKETS] = {0.0005, 0.001, 0.002, 0.005, 0.01,
                                              0.05,   0.1,   0.5,   1.0,   5.0};

static void count_request(struct sn *s, const char *type, bool ok, double seconds)
{
    for (int t = 0; t < SN_REQ_TYPES; t++) {
        if (strcmp(type, req_types[t]) != 0)
            continue;
        if (ok)
            s->c.req_ok[t]++;
        else
            s->c.req_err[t]++;
        s->c.req_seconds[t] += seconds;
        for (int b = 0; b < SN_LAT_BUCKETS; b++)
            if (seconds <= lat_le[b])
                s->c.req_le[t][b]++;
        return;
    }
}

static void client_done(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                        const char *reason, int hops, json_t *node)
{
    count_request(s, r->client_type, ok, sn_now(s) - r->started);
    struct link *l = link_by_serial(s, r->client, r->client_serial);
    if (!l)
        return;
    onsvc_request_done(s, l);
    if (!ok) {
        link_send_error(l, r->client_tid, code, reason);
        return;
    }
    json_t *b = json_is_object(result) ? json_deep_copy(result) : json_object();
    json_object_set_new(b, "hops", json_integer(hops));
    if (node)
        json_object_set(b, "node", node);
    if (!strcmp(r->client_type, "find")) {
        json_t *succ = json_object_get(b, "succ");
        if (json_array_size(succ))
            json_object_set(b, "node", json_array_get(succ, 0));
    }
    link_send(l, r->client_type, MSG_RES, r->client_tid, b);
    json_decref(b);
}

static void on_client(struct sn *s, struct link *l, const struct msg *m)
{
    nid_t target;
    json_t *args = NULL;
    const char *op = m->type;
    if (!(l->roles & (ROLE_NODE | ROLE_SUPERNODE))) {
        link_send_error(l, m->tid, "forbidden", "records need the node or super node role");
        return;
    }
    if (s->state != SN_MEMBER) {
        link_send_error(l, m->tid, "not-ready", "this super node is not a member of a ring");
        return;
    }
    if (s->n_rreqs >= SN_MAX_PENDING) {
        link_send_error(l, m->tid, "overloaded", "too many requests in progress; try again");
        return;
    }
    if (!strcmp(op, "deliver")) {
        const char *to = json_string_value(json_object_get(m->body, "to"));
        const char *sn = json_string_value(json_object_get(m->body, "sn"));
        nid_t tmp;
        if (!to || !sn || nid_from_hex(&tmp, to) != 0 || nid_from_hex(&target, sn) != 0 ||
            !json_object_get(m->body, "payload")) {
            link_send_error(l, m->tid, "invalid-request",
                            "deliver needs to and sn (40 hex digits each) and payload");
            return;
        }
        char from[NID_HEX_LEN + 1] = "";
        if (l->has_id)
            nid_to_hex(&l->id, from);
        args = json_pack("{s:s,s:s,s:O}", "to", to, "from", from, "payload",
                         json_object_get(m->body, "payload"));
    } else if (!strcmp(op, "get") || !strcmp(op, "find")) {
        const char *hex =
            json_string_value(json_object_get(m->body, !strcmp(op, "get") ? "key" : "target"));
        if (!hex || nid_from_hex(&target, hex) != 0) {
            link_send_error(l, m->tid, "invalid-request",
                            !strcmp(op, "get") ? "get needs key: 40 hex digits"
                                               : "find needs target: 40 hex digits");
            return;
        }
        args = !strcmp(op, "get") ? json_pack("{s:s}", "key", hex) : json_object();
        const char *after = json_string_value(json_object_get(m->body, "after"));
        if (!strcmp(op, "get") && after && strlen(after) <= REC_OWNER_MAX)
            json_object_set_new(args, "after", json_string(after)); /* paging (op_get) */
    } else {                                                        /* store */
        bool ok;
        const char *mode = json_string_value(json_object_get(m->body, "mode"));
        enum store_mode md = store_mode_from_str(mode, &ok);
        json_t *env = json_object_get(m->body, "record");
        if (!ok || md == STORE_REPLICA || !json_is_object(env)) {
            link_send_error(l, m->tid, "invalid-request",
                            "store needs mode (add, update or remove) and record");
            return;
        }
        /* Parse here to find the key and refuse garbage before it travels. */
        struct record rec;
        char err[512];
        int rc = rec_parse(env, s->p.max_record_bytes, &rec, err, sizeof(err));
        if (rc != REC_OK) {
            s->c.refused++;
            log_info("records", "%s: store refused: %s", conn_peer_addr(l->conn), err);
            link_send_error(l, m->tid, rec_strcode(rc), err);
            return;
        }
        target = rec.key;
        rec_free(&rec);
        args = json_pack("{s:s,s:O}", "mode", mode, "record", env);
    }
    if (!onsvc_admit_request(s, l, m)) {
        json_decref(args);
        return;
    }
    struct rreq *r = rreq_start(s, &target, op, args, client_done);
    json_decref(args);
    if (!r) {
        onsvc_request_done(s, l);
        link_send_error(l, m->tid, "internal", "out of memory");
        return;
    }
    r->client = l;
    r->client_serial = l->serial;
    snprintf(r->client_tid, sizeof(r->client_tid), "%s", m->tid);
    snprintf(r->client_type, sizeof(r->client_type), "%s", op);
    rreq_launch(s, r);
}

/* ---- dispatch ---- */

void ring_message(struct sn *s, struct link *l, const struct msg *m)
{
    const char *t = m->type;
    if (m->kind == MSG_REQ && !strcmp(t, "ping")) {
        json_t *b = json_pack("{s:s}", "node_id", s->id_hex);
        link_send(l, "ping", MSG_RES, m->tid, b);
        json_decref(b);
        return;
    }
    if (onsvc_message(s, l, m))
        return;
    if (m->kind == MSG_REQ &&
        (!strcmp(t, "get") || !strcmp(t, "store") || !strcmp(t, "find") || !strcmp(t, "deliver"))) {
        on_client(s, l, m);
        return;
    }
    bool sn_msg = !strcmp(t, "stabilize") || !strcmp(t, "leave") || !strcmp(t, "route") ||
                  !strcmp(t, "reply") || !strcmp(t, "replicate") || !strcmp(t, "sync");
    if (sn_msg && !require_sn(l, m))
        return;
    if (sn_msg)
        link_ring_traffic(s, l);
    if (m->kind == MSG_REQ && !strcmp(t, "stabilize"))
        on_stabilize(s, l, m);
    else if (m->kind == MSG_IND && !strcmp(t, "leave"))
        on_leave(s, l, m);
    else if (m->kind == MSG_IND && !strcmp(t, "route"))
        on_route(s, l, m);
    else if (m->kind == MSG_IND && !strcmp(t, "reply"))
        on_reply(s, l, m);
    else if (m->kind == MSG_REQ && !strcmp(t, "replicate"))
        repl_on_replicate(s, l, m);
    else if (m->kind == MSG_REQ && !strcmp(t, "sync"))
        repl_on_sync(s, l, m);
    else if (m->kind == MSG_REQ)
        link_send_error(l, m->tid, "unknown-type", "request type not served");
}

/* ---- failures ---- */

static void lost_check_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    if (!m || m->kind != MSG_RES)
        peer_dead(s, r->peer, failure ? failure : "refused ping");
}

void ring_peer_lost(struct sn *s, struct peer *p, const char *why)
{
    if (s->state != SN_MEMBER)
        return;
    /* A closed link is not yet a dead node: ask it once over a new link. */
    if (!peer_request(s, p, "ping", NULL, 0, lost_check_done, NULL))
        peer_send_failed(s, p, why);
}

/* ---- fingers ---- */

static void finger_done(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                        const char *reason, int hops, json_t *node)
{
    if (!ok || s->state != SN_MEMBER)
        return;
    nid_t id;
    char addr[SN_ADDR_MAX];
    json_t *first = json_array_get(json_object_get(result, "succ"), 0);
    if (peer_parse(first, &id, addr, sizeof(addr)) != 0 || nid_eq(&id, &s->id))
        return;
    struct peer *p = peer_get(s, &id, addr, PEER_HEARSAY);
    if (p && !(p->dead_at > 0 && sn_now(s) - p->dead_at < 3 * s->p.stabilize_s))
        s->finger[r->arg] = p;
}

/* Looks up a few fingers beyond the successor list's span per period. */
static void fix_fingers(struct sn *s)
{
    if (s->n_succ == 0)
        return;
    const struct peer *last = s->succ[s->n_succ - 1];
    int lookups = 0;
    for (unsigned n = 0; n < SN_FINGERS && lookups < 4; n++) {
        unsigned i = s->next_finger = (s->next_finger + SN_FINGERS - 1) % SN_FINGERS;
        nid_t start;
        nid_add_pow2(&start, &s->id, i);
        if (nid_in_open_closed(&start, &s->id, &last->id))
            continue; /* ring_changed() fills these from the list */
        struct rreq *r = rreq_start(s, &start, "find", NULL, finger_done);
        if (!r)
            return;
        r->arg = i;
        rreq_launch(s, r);
        lookups++;
    }
}

/*
 * Alone after having had successors: we may be the survivor of a partition,
 * or the others may have declared us dead under overload. Chord never merges
 * two rings by itself, so every few periods we ask a node we knew (the last
 * successors, the join addresses) to admit us; if that ring is alive it takes
 * us back, and anti-entropy merges the records both ways.
 */
static void maybe_rejoin(struct sn *s)
{
    double now = sn_now(s);
    if (s->n_succ > 0 || s->pred || s->rejoining || now < s->next_rejoin)
        return;
    size_t n = s->n_remembered + s->n_join;
    if (n == 0)
        return;
    size_t i = (size_t)rand() % n;
    const char *addr = i < s->n_remembered ? s->remembered[i] : s->join_addrs[i - s->n_remembered];
    s->next_rejoin = now + s->p.stabilize_s * (5 + rand() % 5);
    s->rejoining = true;
    log_debug("ring", "alone: asking %s to take us back into its ring", addr);
    join_send(s, addr);
}

/* ---- timers ---- */

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sn *s = w->data;
    double jitter = s->p.stabilize_s * (0.8 + 0.4 * (rand() / (double)RAND_MAX));
    w->repeat = jitter;
    ev_timer_again(loop, w);
    onsvc_tick(s);
    if (s->state != SN_MEMBER)
        return;
    maybe_rejoin(s);
    stabilize(s);
    /* A silent predecessor is asked whether it still lives. */
    if (s->pred && sn_now(s) - s->pred->last_used > 3 * s->p.stabilize_s)
        ring_peer_lost(s, s->pred, "silent");
    fix_fingers(s);
    links_gc(s);
}

static void sync_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sn *s = w->data;
    repl_round(s);
}

static void sync_soon_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sn *s = w->data;
    repl_round(s);
}

/* ---- joining ---- */

static void join_done(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                      const char *reason, int hops, json_t *node);

static void join_send(struct sn *s, const char *addr);

static void join_try(struct sn *s)
{
    if (s->state != SN_JOINING || s->n_join == 0)
        return;
    const char *addr = s->join_addrs[s->join_next++ % s->n_join];
    log_info("ring", "joining through %s", addr);
    join_send(s, addr);
}

static void join_send(struct sn *s, const char *addr)
{
    /* We do not know its Node-ID: an anonymous peer keyed by a throw-away ID. */
    struct rreq *r = rreq_start(s, &s->id, "join", NULL, join_done);
    if (!r)
        return;
    r->attempts = 2; /* no automatic retry: join_timer_cb retries elsewhere */
    ev_timer_set(&r->timer, 10.0, 0.);
    ev_timer_start(s->loop, &r->timer);
    char tgt[NID_HEX_LEN + 1];
    json_t *route = json_pack("{s:s,s:s,s:o,s:i,s:b,s:s,s:o}", "rid", r->rid, "target",
                              nid_to_hex(&s->id, tgt), "origin", self_json(s), "hops", 0, "final",
                              false, "op", "join", "args", json_object());
    /* The first hop is a link to the given address; its identity is learnt on open. */
    nid_t anon;
    nid_random(&anon);
    struct peer *via = peer_get(s, &anon, addr, PEER_HEARSAY);
    if (via) {
        via->anon = true;
        if (peer_send(s, via, "route", MSG_IND, NULL, route) != 0)
            log_warn("ring", "cannot send a join request to %s", addr);
    }
    json_decref(route);
}

static void join_done(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                      const char *reason, int hops, json_t *node)
{
    bool rejoin = s->rejoining;
    s->rejoining = false;
    if (rejoin) {
        /* Alone, we asked a node we knew to take us back (see tick_cb). */
        if (!ok) {
            log_debug("ring", "rejoining failed: %s: %s", code, reason);
            return;
        }
        if (s->state != SN_MEMBER || s->n_succ > 0)
            return; /* the ring found us meanwhile */
    } else if (s->state != SN_JOINING) {
        return;
    }
    if (!ok) {
        log_warn("ring", "join refused or unanswered: %s: %s (retrying in %.0f s)", code, reason,
                 s->join_backoff);
        ev_timer_set(&s->join_timer, s->join_backoff, 0.);
        ev_timer_start(s->loop, &s->join_timer);
        s->join_backoff = s->join_backoff * 2 > 30 ? 30 : s->join_backoff * 2;
        return;
    }
    nid_t id;
    char addr[SN_ADDR_MAX];
    json_t *pj = json_object_get(result, "pred");
    json_t *succ = json_object_get(result, "succ");
    if (!json_array_size(succ) ||
        peer_parse(json_array_get(succ, 0), &id, addr, sizeof(addr)) != 0) {
        log_warn("ring", "malformed join answer; retrying");
        ev_timer_set(&s->join_timer, 1.0, 0.);
        ev_timer_start(s->loop, &s->join_timer);
        return;
    }
    set_succ_list(s, NULL, succ);
    if (json_is_object(pj) && peer_parse(pj, &id, addr, sizeof(addr)) == 0 && !nid_eq(&id, &s->id))
        set_pred(s, peer_get(s, &id, addr, PEER_HEARSAY));
    char a[NID_HEX_LEN + 1];
    log_info("ring", "admitted by %s after %d hops", s->n_succ ? hex8(&s->succ[0]->id, a) : "?",
             hops);
    become_member(s, rejoin ? "rejoined the ring" : "joined the ring");
}

static void join_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    join_try(w->data);
}

/* ---- life ---- */

struct sn *sn_new(struct ev_loop *loop, const struct sn_params *p, char *err, size_t errlen)
{
    struct sn *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->magic = SN_MAGIC;
    s->loop = loop;
    /* The loop's clock may be stale before it first runs (a slow start): timers need it fresh. */
    ev_now_update(loop);
    s->p = *p;
    s->links.next = s->links.prev = &s->links;
    onsvc_init(s);
    s->overlay = strdup(p->overlay);
    s->advertise = strdup(p->advertise ? p->advertise : p->listen);
    s->p.overlay = s->overlay;
    s->p.advertise = s->advertise;
    s->max_frame = p->tls.max_frame ? p->tls.max_frame : MSG_MAX_FRAME_DEF;
    if (s->p.succ_list < 1)
        s->p.succ_list = 1;
    if (s->p.succ_list > SN_MAX_SUCC)
        s->p.succ_list = SN_MAX_SUCC;
    if (s->p.replication < 1)
        s->p.replication = 1;
    if (s->p.stabilize_s <= 0)
        s->p.stabilize_s = 5;
    if (s->p.peer_idle_s <= 0)
        s->p.peer_idle_s = 60;
    if (s->p.max_attached == 0)
        s->p.max_attached = 1000;
    if (s->p.on_rate <= 0)
        s->p.on_rate = 50;
    if (s->p.on_inflight == 0)
        s->p.on_inflight = 32;
    if (s->p.keepalive_s <= 0)
        s->p.keepalive_s = 15;
    if (s->p.sn_msg_rate <= 0)
        s->p.sn_msg_rate = 20000;
    if (s->p.dial_rate <= 0)
        s->p.dial_rate = 10;
    s->dial_tokens = 2 * s->p.dial_rate + 8;
    s->stun_addr = p->stun ? strdup(p->stun) : NULL;
    s->p.stun = s->stun_addr;
    s->started_at = ev_now(loop);
    s->tls = tls_ctx_new(&p->tls, err, errlen);
    if (!s->tls)
        goto fail;
    s->self_id = tls_ctx_identity(s->tls);
    if (!s->self_id->has_node_id || !(s->self_id->roles & ROLE_SUPERNODE)) {
        snprintf(err, errlen, "certificate %s %s: a super node needs both", p->tls.cert_file,
                 !s->self_id->has_node_id ? "has no Node-ID" : "lacks the super node role");
        goto fail;
    }
    s->id = s->self_id->node_id;
    nid_to_hex(&s->id, s->id_hex);
    if (cred_cert_load(&s->ca, p->tls.ca_file) != 0) {
        snprintf(err, errlen, "cannot read CA certificate %s", p->tls.ca_file);
        goto fail;
    }
    s->verifier = rec_verifier_new(s->ca, s->overlay, 4096);
    s->store = store_new(&p->quotas);
    const char *px_uris[256];
    size_t n_px = 0;
    for (size_t i = 0; i < p->n_sip_proxies && n_px < 256; i++)
        px_uris[n_px++] = p->sip_proxies[i].uri;
    if (!s->verifier || !s->store ||
        rec_verifier_set_proxies(s->verifier, p->sip_proxies, p->n_sip_proxies) != 0 ||
        store_set_proxies(s->store, px_uris, n_px) != 0) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* Rollback marks last the overlay's longest record lifetime past an expiry (store.h). */
    store_set_max_lifetime(s->store, p->max_lifetime_s);
    if (sn_listen(s, err, errlen) != 0)
        goto fail;
    ev_timer_init(&s->tick, tick_cb, 0., s->p.stabilize_s);
    s->tick.data = s;
    ev_timer_init(&s->sync_tick, sync_tick_cb, 2 * s->p.stabilize_s, 2 * s->p.stabilize_s);
    s->sync_tick.data = s;
    ev_timer_init(&s->sync_soon, sync_soon_cb, 0.3, 0.);
    s->sync_soon.data = s;
    ev_timer_init(&s->join_timer, join_timer_cb, 1.0, 0.);
    s->join_timer.data = s;
    return s;
fail:
    sn_free(s);
    return NULL;
}

void sn_start_seed(struct sn *s)
{
    ev_timer_again(s->loop, &s->tick);
    ev_timer_start(s->loop, &s->sync_tick);
    become_member(s, "started a new ring");
}

void sn_start_join(struct sn *s, const char *const *addrs)
{
    size_t n = 0;
    while (addrs[n])
        n++;
    s->join_addrs = calloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        s->join_addrs[i] = strdup(addrs[i]);
    s->n_join = n;
    s->join_next = (size_t)rand() % (n ? n : 1);
    s->join_backoff = 1.0;
    s->state = SN_JOINING;
    ev_timer_again(s->loop, &s->tick);
    ev_timer_start(s->loop, &s->sync_tick);
    join_try(s);
}

const struct peer_identity *sn_identity(const struct sn *s)
{
    return s->self_id;
}

bool sn_is_member(const struct sn *s)
{
    return s->state == SN_MEMBER;
}

static void leave_finish(struct sn *s)
{
    if (s->state == SN_LEFT)
        return;
    if (s->state == SN_LEAVING) {
        json_t *b = json_object();
        json_object_set_new(b, "pred", s->pred ? peer_json(s->pred) : json_null());
        json_object_set_new(b, "succ", succ_json(s, false));
        if (s->pred)
            peer_send(s, s->pred, "leave", MSG_IND, NULL, b);
        if (succ0(s) && succ0(s) != s->pred)
            peer_send(s, succ0(s), "leave", MSG_IND, NULL, b);
        json_decref(b);
        log_info("ring", "left the ring");
    }
    s->state = SN_LEFT;
    ev_timer_stop(s->loop, &s->tick);
    ev_timer_stop(s->loop, &s->sync_tick);
    ev_timer_stop(s->loop, &s->sync_soon);
    ev_timer_stop(s->loop, &s->join_timer);
    ev_timer_stop(s->loop, &s->leave_timer);
    preq_cancel_all(s);
    for (size_t b = 0; b < SN_TABLE_SIZE; b++)
        while (s->rreqs[b]) {
            struct rreq *r = s->rreqs[b];
            s->rreqs[b] = r->next;
            s->n_rreqs--;
            ev_timer_stop(s->loop, &r->timer);
            r->cb(s, r, false, NULL, "not-ready", "this super node is leaving", 0, NULL);
            json_decref(r->args);
            free(r);
        }
    for (struct link *l = s->links.next; l != &s->links; l = l->next)
        if (!l->closing) {
            l->closing = true;
            conn_close(l->conn);
        }
    if (s->leave_done)
        s->leave_done(s->leave_ud);
}

static void leave_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sn *s = w->data;
    log_warn("ring", "hand-off not confirmed in time; leaving anyway");
    leave_finish(s);
}

void sn_leave_handoff_done(struct sn *s)
{
    if (s->state == SN_LEAVING && s->leave_pending == 0)
        leave_finish(s);
}

void sn_leave(struct sn *s, void (*done)(void *ud), void *ud)
{
    s->leave_done = done;
    s->leave_ud = ud;
    if (s->state == SN_MEMBER && s->p.on_membership)
        s->p.on_membership(s->p.ud, false);
    listener_free(s->listener);
    s->listener = NULL;
    if (s->state != SN_MEMBER || !succ0(s)) {
        s->state = s->state == SN_MEMBER ? SN_LEAVING : s->state;
        leave_finish(s);
        return;
    }
    s->state = SN_LEAVING;
    ev_timer_init(&s->leave_timer, leave_timeout, 5.0, 0.);
    s->leave_timer.data = s;
    ev_timer_start(s->loop, &s->leave_timer);
    log_info("ring", "leaving: handing records to %s", succ0(s)->addr);
    repl_handoff(s, succ0(s));
    sn_leave_handoff_done(s);
}

bool sn_params_from_doc(struct sn_params *p, const struct overlay_doc *doc)
{
    p->replication = (unsigned)doc->replication_factor;
    p->succ_list = (unsigned)doc->successor_list;
    p->stabilize_s = (double)doc->stabilize_s;
    p->max_record_bytes = (size_t)doc->max_record_bytes;
    p->max_lifetime_s = doc->max_record_lifetime_s;
    p->keepalive_s = (double)doc->keepalive_s;
    p->sn_target_load = doc->promotion.sn_target_load;
    p->sip_proxies = doc->sip_proxies;
    p->n_sip_proxies = doc->n_sip_proxies;
    size_t need = (size_t)doc->max_record_bytes * 2 + 4096; /* a record in an envelope */
    size_t have = p->tls.max_frame ? p->tls.max_frame : MSG_MAX_FRAME_DEF;
    if (have >= need)
        return false;
    p->tls.max_frame = need;
    return true;
}

void sn_free(struct sn *s)
{
    if (!s)
        return;
    if (s->loop) {
        ev_timer_stop(s->loop, &s->tick);
        ev_timer_stop(s->loop, &s->sync_tick);
        ev_timer_stop(s->loop, &s->sync_soon);
        ev_timer_stop(s->loop, &s->join_timer);
        ev_timer_stop(s->loop, &s->leave_timer);
    }
    for (size_t b = 0; b < SN_TABLE_SIZE; b++) {
        while (s->preqs[b]) {
            struct preq *r = s->preqs[b];
            s->preqs[b] = r->next;
            ev_timer_stop(s->loop, &r->timer);
            free(r);
        }
        while (s->rreqs[b]) {
            struct rreq *r = s->rreqs[b];
            s->rreqs[b] = r->next;
            ev_timer_stop(s->loop, &r->timer);
            json_decref(r->args);
            free(r);
        }
    }
    listener_free(s->listener);
    onsvc_free(s);
    while (s->links.next && s->links.next != &s->links) {
        struct link *l = s->links.next;
        s->links.next = l->next;
        while (l->q_head) {
            struct qframe *q = l->q_head;
            l->q_head = q->next;
            free(q->buf);
            free(q);
        }
        conn_abort(l->conn); /* the loop has ended: no callback will come */
        free(l);
    }
    while (s->talkers) { /* the links' shared budgets: on_close never came for those */
        struct talker *t = s->talkers;
        s->talkers = t->next;
        free(t);
    }
    while (s->peers) {
        struct peer *p = s->peers;
        s->peers = p->next;
        free(p);
    }
    for (size_t i = 0; i < s->n_join; i++)
        free(s->join_addrs[i]);
    free(s->join_addrs);
    store_free(s->store);
    rec_verifier_free(s->verifier);
    if (s->ca)
        gnutls_x509_crt_deinit(s->ca);
    tls_ctx_free(s->tls);
    free(s->overlay);
    free(s->advertise);
    free(s->stun_addr);
    free(s);
}

/* ---- status ---- */

static const char *state_str(enum sn_state st)
{
    static const char *const names[] = {"idle", "joining", "member", "leaving", "left"};
    return names[st];
}

json_t *sn_status(struct sn *s)
{
    json_t *fingers = json_array();
    struct peer *seen[SN_FINGERS];
    size_t n_seen = 0;
    for (int i = 0; i < SN_FINGERS; i++) {
        struct peer *p = s->finger[i];
        bool dup = false;
        for (size_t k = 0; k < n_seen && p; k++)
            dup |= seen[k] == p;
        if (!p || dup)
            continue;
        seen[n_seen++] = p;
        json_t *f = peer_json(p);
        json_object_set_new(f, "bit", json_integer(i));
        json_array_append_new(fingers, f);
    }
    struct store_stats st;
    double now = sn_now(s);
    store_stats(s->store, now, &st);
    json_t *recs = sn_records(s);
    size_t primary = 0, replica = 0;
    size_t i;
    json_t *e;
    json_array_foreach(recs, i, e)
    {
        const char *role = json_string_value(json_array_get(e, 3));
        if (!strcmp(role, "primary"))
            primary++;
        else if (!strcmp(role, "replica"))
            replica++;
    }
    json_decref(recs);
    size_t open = 0;
    for (struct link *l = s->links.next; l != &s->links; l = l->next)
        open += l->open && !l->closing;
    size_t vc_entries;
    uint64_t vc_hits, vc_misses;
    rec_verifier_stats(s->verifier, &vc_entries, &vc_hits, &vc_misses);
    json_t *st_doc = json_pack(
        "{s:b,s:{s:s,s:s},s:s,s:s,s:f,s:o,s:o,s:o,s:i,s:i,s:{s:i,s:i,s:i,s:i,s:i},"
        "s:{s:i,s:i},s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I},s:{s:I,s:I,s:I},s:{s:i,s:I,s:I}}",
        "ok", 1, "node", "id", s->id_hex, "addr", s->advertise, "overlay", s->overlay, "state",
        state_str(s->state), "uptime_s", now - s->started_at, "pred",
        s->pred ? peer_json(s->pred) : json_null(), "succ", succ_json(s, false), "fingers", fingers,
        "replication", (int)s->p.replication, "successor_list", (int)s->p.succ_list, "store",
        "primary", (int)primary, "replica", (int)replica, "tombstones", (int)st.tombstones, "keys",
        (int)st.keys, "bytes", (int)st.bytes, "links", "open", (int)open, "pending",
        (int)(s->n_preqs + s->n_rreqs), "requests", "originated", (json_int_t)s->c.originated,
        "forwarded", (json_int_t)s->c.forwarded, "answered", (json_int_t)s->c.answered, "hops_sum",
        (json_int_t)s->c.hops_sum, "replies", (json_int_t)s->c.replies, "timeouts",
        (json_int_t)s->c.timeouts, "refused", (json_int_t)s->c.refused, "replication_stats", "in",
        (json_int_t)s->c.replicated_in, "out", (json_int_t)s->c.replicated_out, "dropped",
        (json_int_t)s->c.dropped_replicas, "verifier", "cached", (int)vc_entries, "hits",
        (json_int_t)vc_hits, "misses", (json_int_t)vc_misses);
    if (st_doc) {
        /* rollback marks (store.h): how many, their bytes, and how many went early for room */
        json_t *sto = json_object_get(st_doc, "store");
        json_object_set_new(sto, "marks", json_integer((json_int_t)st.marks));
        json_object_set_new(sto, "mark_bytes", json_integer((json_int_t)st.mark_bytes));
        json_object_set_new(sto, "marks_evicted", json_integer((json_int_t)st.marks_evicted));
        json_object_set_new(st_doc, "healthy", json_boolean(s->healthy));
        json_object_set_new(st_doc, "attached", json_integer((json_int_t)s->n_attached));
        json_object_set_new(st_doc, "max_attached", json_integer((json_int_t)s->p.max_attached));
        json_object_set_new(
            st_doc, "ordinary_nodes",
            json_pack("{s:I,s:I,s:I,s:I,s:I}", "attaches", (json_int_t)s->c.attaches, "redirected",
                      (json_int_t)s->c.redirects, "rate_limited", (json_int_t)s->c.rate_limited,
                      "delivered", (json_int_t)s->c.delivered, "told_to_move",
                      (json_int_t)s->c.moved));
        /* what the checks of docs/ring.md 8 refused */
        json_object_set_new(
            st_doc, "refused",
            json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "replies", (json_int_t)s->c.replies_refused,
                      "joins", (json_int_t)s->c.joins_refused, "dials",
                      (json_int_t)s->c.dials_refused, "links_cut", (json_int_t)s->c.links_cut,
                      "syncs", (json_int_t)s->c.syncs_refused, "peers", (json_int_t)s->n_peers,
                      "peers_max", (json_int_t)SN_MAX_PEERS));
    }
    return st_doc;
}

struct rec_walk {
    struct sn *s;
    json_t *arr;
    double now;
};

static bool rec_walk_fn(const struct store_entry *e, void *ud)
{
    struct rec_walk *w = ud;
    char hex[NID_HEX_LEN + 1], seq[24];
    const struct record *r = e->rec;
    if (!r->removal && r->expires <= w->now)
        return true;
    snprintf(seq, sizeof(seq), "%llu", (unsigned long long)r->seq);
    const char *role = r->removal                       ? "tombstone"
                       : ring_is_primary(w->s, &r->key) ? "primary"
                                                        : "replica";
    json_array_append_new(w->arr,
                          json_pack("[s,s,s,s]", nid_to_hex(&r->key, hex), r->owner, seq, role));
    return true;
}

json_t *sn_records(struct sn *s)
{
    struct rec_walk w = {s, json_array(), sn_now(s)};
    store_foreach_range(s->store, &s->id, &s->id, rec_walk_fn, &w);
    return w.arr;
}

/* ---- metrics ---- */

struct mbuf {
    char *p;
    size_t n, cap;
};

static void mprintf(struct mbuf *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void mprintf(struct mbuf *m, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = m->p ? vsnprintf(m->p + m->n, m->cap - m->n, fmt, ap) : -1;
        va_end(ap);
        if (k >= 0 && (size_t)k < m->cap - m->n) {
            m->n += (size_t)k;
            return;
        }
        size_t cap = m->cap ? m->cap * 2 : 8192;
        char *np = realloc(m->p, cap);
        if (!np)
            return;
        m->p = np;
        m->cap = cap;
    }
}

/* Ring size from the successor list's span: n successors cover span/2^160 of the ring. */
static double ring_size_estimate(const struct sn *s)
{
    if (s->n_succ == 0)
        return 1;
    /* A list shorter than it may be, or holding our predecessor, is the whole ring. */
    if (s->n_succ < s->p.succ_list || (s->pred && s->succ[s->n_succ - 1] == s->pred))
        return s->n_succ + 1;
    nid_t d;
    nid_distance(&d, &s->id, &s->succ[s->n_succ - 1]->id);
    double frac = 0;
    for (int i = 0; i < 8; i++)
        frac = frac * 256 + d.b[i];
    frac /= 18446744073709551616.0; /* 2^64: the top 64 bits as a fraction of the ring */
    return frac > 0 ? s->n_succ / frac : s->n_succ + 1;
}

char *sn_metrics(struct sn *s)
{
    struct mbuf m = {0};
    struct store_stats st;
    store_stats(s->store, sn_now(s), &st);
    json_t *recs = sn_records(s);
    size_t primary = 0, replica = 0, i;
    json_t *e;
    json_array_foreach(recs, i, e)
    {
        const char *role = json_string_value(json_array_get(e, 3));
        primary += !strcmp(role, "primary");
        replica += !strcmp(role, "replica");
    }
    json_decref(recs);
    size_t open = 0;
    for (struct link *l = s->links.next; l != &s->links; l = l->next)
        open += l->open && !l->closing;
#define GAUGE(name, help, fmt, v)                                                                  \
    mprintf(&m,                                                                                    \
            "# HELP p2p_sn_" name " " help "\n# TYPE p2p_sn_" name " gauge\np2p_sn_" name " " fmt  \
            "\n",                                                                                  \
            v)
    GAUGE("member", "1 when a member of a ring", "%d", s->state == SN_MEMBER);
    GAUGE("healthy", "1 when serving ordinary nodes (protocol.md 5.6)", "%d", s->healthy);
    GAUGE("ring_size_estimate", "ring size seen from the successor list's span", "%.1f",
          ring_size_estimate(s));
    GAUGE("successors", "entries in the successor list", "%u", s->n_succ);
    GAUGE("keys", "distinct keys stored", "%zu", st.keys);
    GAUGE("store_bytes", "bytes of stored records and tombstones", "%zu", st.bytes);
    GAUGE("tombstones", "removal statements kept", "%zu", st.tombstones);
    GAUGE("attached", "ordinary nodes attached", "%zu", s->n_attached);
    GAUGE("max_attached", "most ordinary nodes accepted", "%zu", s->p.max_attached);
    GAUGE("links_open", "open node-to-node links", "%zu", open);
    GAUGE("requests_in_progress", "routed requests originated here, not answered yet", "%zu",
          s->n_rreqs);
#undef GAUGE
    mprintf(&m,
            "# HELP p2p_sn_records live records held, by role\n# TYPE p2p_sn_records gauge\n"
            "p2p_sn_records{role=\"primary\"} %zu\np2p_sn_records{role=\"replica\"} %zu\n",
            primary, replica);
    mprintf(&m, "# HELP p2p_sn_routing_total routed requests by what this node did with them\n"
                "# TYPE p2p_sn_routing_total counter\n");
    const struct {
        const char *k;
        uint64_t v;
    } rt[] = {{"originated", s->c.originated},
              {"forwarded", s->c.forwarded},
              {"answered", s->c.answered},
              {"timed_out", s->c.timeouts},
              {"refused", s->c.refused},
              {"replicated_in", s->c.replicated_in},
              {"replicated_out", s->c.replicated_out}};
    for (size_t k = 0; k < sizeof(rt) / sizeof(rt[0]); k++)
        mprintf(&m, "p2p_sn_routing_total{event=\"%s\"} %llu\n", rt[k].k,
                (unsigned long long)rt[k].v);
    mprintf(&m,
            "# HELP p2p_sn_ordinary_total ordinary node events\n"
            "# TYPE p2p_sn_ordinary_total counter\n"
            "p2p_sn_ordinary_total{event=\"attached\"} %llu\n"
            "p2p_sn_ordinary_total{event=\"redirected\"} %llu\n"
            "p2p_sn_ordinary_total{event=\"rate_limited\"} %llu\n"
            "p2p_sn_ordinary_total{event=\"delivered\"} %llu\n"
            "p2p_sn_ordinary_total{event=\"told_to_move\"} %llu\n",
            (unsigned long long)s->c.attaches, (unsigned long long)s->c.redirects,
            (unsigned long long)s->c.rate_limited, (unsigned long long)s->c.delivered,
            (unsigned long long)s->c.moved);
    mprintf(&m, "# HELP p2p_sn_requests_total client requests by type and result\n"
                "# TYPE p2p_sn_requests_total counter\n");
    for (int t = 0; t < SN_REQ_TYPES; t++)
        mprintf(&m,
                "p2p_sn_requests_total{type=\"%s\",result=\"ok\"} %llu\n"
                "p2p_sn_requests_total{type=\"%s\",result=\"error\"} %llu\n",
                req_types[t], (unsigned long long)s->c.req_ok[t], req_types[t],
                (unsigned long long)s->c.req_err[t]);
    mprintf(&m, "# HELP p2p_sn_request_seconds client request latency, from arrival to answer\n"
                "# TYPE p2p_sn_request_seconds histogram\n");
    for (int t = 0; t < SN_REQ_TYPES; t++) {
        for (int b = 0; b < SN_LAT_BUCKETS; b++)
            mprintf(&m, "p2p_sn_request_seconds_bucket{type=\"%s\",le=\"%g\"} %llu\n", req_types[t],
                    lat_le[b], (unsigned long long)s->c.req_le[t][b]);
        uint64_t count = s->c.req_ok[t] + s->c.req_err[t];
        mprintf(&m,
                "p2p_sn_request_seconds_bucket{type=\"%s\",le=\"+Inf\"} %llu\n"
                "p2p_sn_request_seconds_sum{type=\"%s\"} %.6f\n"
                "p2p_sn_request_seconds_count{type=\"%s\"} %llu\n",
                req_types[t], (unsigned long long)count, req_types[t], s->c.req_seconds[t],
                req_types[t], (unsigned long long)count);
    }
    return m.p;
}
