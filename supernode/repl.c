/*
 * Replication (docs/ring.md section 5): every record lives on the node
 * responsible for its key and on the next replication-1 nodes of its
 * successor list. Writes are pushed to the replicas at once; a periodic
 * anti-entropy round (`sync`) between each responsible node and its replicas
 * repairs whatever joins, leaves and failures disturbed, in both directions;
 * replicas that no responsible node confirms any more are dropped after a
 * lease. A node that leaves hands all it holds to its successor first.
 *
 * A sync asks for work in proportion to a key range, so what another node may
 * ask is bounded (docs/ring.md 8): a node syncs only its own range, and one
 * message compares at most SN_SYNC_MAX_SCAN entries and pushes at most
 * SN_SYNC_MAX_PUSH; the rest waits for the next round.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "log.h"
#include "sn_int.h"

/* Verifies and applies one record envelope. */
int repl_apply(struct sn *s, json_t *env, enum store_mode mode, char *err, size_t errlen,
               const char **code)
{
    struct record r;
    double now = sn_now(s);
    int rc = rec_parse(env, s->p.max_record_bytes, &r, err, errlen);
    if (rc == REC_OK)
        rc = rec_verify(s->verifier, &r, (time_t)now, s->p.max_lifetime_s, err, errlen);
    if (rc != REC_OK) {
        *code = rec_strcode(rc);
        if (rc != REC_E_EXPIRED || mode != STORE_REPLICA)
            log_info("records", "refused (%s): %s", *code, err);
        if (r.envelope)
            rec_free(&r);
        return rc;
    }
    rc = store_put(s->store, &r, mode, now, err, errlen);
    if (rc != STORE_OK) {
        *code = store_strcode(rc);
        if (mode != STORE_REPLICA)
            log_info("records", "refused (%s): %s", *code, err);
        rec_free(&r);
        return rc;
    }
    return 0;
}

/* ---- pushing records ---- */

struct batch {
    json_t *arr;
    size_t bytes;
};

static void batch_flush(struct sn *s, struct peer *to, struct link *via, struct batch *b,
                        preq_cb cb)
{
    if (!b->arr || json_array_size(b->arr) == 0)
        return;
    json_t *body = json_pack("{s:o}", "records", b->arr);
    s->c.replicated_out += json_array_size(b->arr);
    if (cb) {
        if (peer_request(s, to, "replicate", body, 10.0, cb, NULL))
            s->leave_pending++;
    } else if (via) {
        link_send(via, "replicate", MSG_REQ, NULL, body);
    } else {
        peer_send(s, to, "replicate", MSG_REQ, NULL, body);
    }
    json_decref(body);
    b->arr = NULL;
    b->bytes = 0;
}

static void batch_add(struct sn *s, struct peer *to, struct link *via, struct batch *b,
                      const struct record *r, preq_cb cb)
{
    if (b->arr && b->bytes + r->size + 64 > s->max_frame / 2)
        batch_flush(s, to, via, b, cb);
    if (!b->arr)
        b->arr = json_array();
    json_array_append(b->arr, r->envelope);
    b->bytes += r->size + 1;
}

void repl_after_store(struct sn *s, json_t *env)
{
    unsigned n = s->p.replication - 1;
    if (n > s->n_succ)
        n = s->n_succ;
    if (n == 0)
        return;
    /* Encoded once, sent to every replica (a fire-and-forget request: answers are ignored). */
    json_t *body = json_pack("{s:[O]}", "records", env);
    char tid[MSG_TID_LEN + 1];
    msg_new_tid(tid);
    struct msg_hdr h = {.overlay = s->overlay, .type = "replicate", .kind = MSG_REQ, .tid = tid};
    uint8_t *frame;
    size_t len;
    if (msg_encode(&h, body, s->max_frame, &frame, &len) == MSG_OK) {
        for (unsigned i = 0; i < n; i++)
            if (peer_send_frame(s, s->succ[i], frame, len) == 0)
                s->c.replicated_out++;
        free(frame);
    }
    json_decref(body);
}

void repl_on_replicate(struct sn *s, struct link *l, const struct msg *m)
{
    json_t *recs = json_object_get(m->body, "records");
    if (!json_is_array(recs)) {
        link_send_error(l, m->tid, "invalid-request", "replicate needs records: [...]");
        return;
    }
    size_t stored = 0, current = 0, i;
    json_t *refused = json_array(), *env;
    double now = sn_now(s);
    json_array_foreach(recs, i, env)
    {
        char err[512];
        const char *code = "";
        if (repl_apply(s, env, STORE_REPLICA, err, sizeof(err), &code) == 0) {
            stored++;
            continue;
        }
        if (!strcmp(code, "stale")) {
            /* We have it, or newer: the sender confirms our copy. */
            current++;
            struct record r;
            char e2[128];
            if (rec_parse(env, 0, &r, e2, sizeof(e2)) == REC_OK) {
                store_touch(s->store, &r.key, r.owner, now);
                rec_free(&r);
            }
            continue;
        }
        const char *key = "", *owner = "";
        json_t *so = json_loads(json_string_value(json_object_get(env, "signed")) ?: "{}", 0, NULL);
        if (so) {
            key = json_string_value(json_object_get(so, "key")) ?: "";
            owner = json_string_value(json_object_get(so, "owner")) ?: "";
        }
        json_array_append_new(refused, json_pack("{s:s,s:s,s:s,s:s}", "key", key, "owner", owner,
                                                 "code", code, "reason", err));
        json_decref(so);
    }
    s->c.replicated_in += stored;
    json_t *b = json_pack("{s:i,s:i,s:o}", "stored", (int)stored, "current", (int)current,
                          "refused", refused);
    link_send(l, "replicate", MSG_RES, m->tid, b);
    json_decref(b);
}

/* ---- anti-entropy ---- */

struct entry {
    nid_t key;
    const char *owner;
    uint64_t seq;
    const struct record *rec;
};

struct collect {
    struct entry *v;
    size_t n, cap;
    double now;
    size_t max;     /* stop after this many (0 = no bound) */
    bool truncated; /* stopped at max */
};

static bool collect_fn(const struct store_entry *e, void *ud)
{
    struct collect *c = ud;
    if (e->rec->expires <= c->now)
        return true;
    if (c->max && c->n == c->max) {
        c->truncated = true;
        return false;
    }
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 256;
        struct entry *v = realloc(c->v, cap * sizeof(*v));
        if (!v)
            return false;
        c->v = v;
        c->cap = cap;
    }
    c->v[c->n++] = (struct entry){e->rec->key, e->rec->owner, e->rec->seq, e->rec};
    return true;
}

/* The entries of (lo, hi] in ring order from lo: the first `max` of them (0: all). */
static void collect_range(struct sn *s, const nid_t *lo, const nid_t *hi, struct collect *c,
                          size_t max)
{
    memset(c, 0, sizeof(*c));
    c->now = sn_now(s);
    c->max = max;
    store_foreach_range(s->store, lo, hi, collect_fn, c);
}

static void digest(const struct collect *c, char out[NID_HEX_LEN + 1])
{
    nid_t acc;
    memset(&acc, 0, sizeof(acc));
    for (size_t i = 0; i < c->n; i++) {
        char buf[NID_HEX_LEN + 1 + REC_OWNER_MAX + 24], hex[NID_HEX_LEN + 1];
        int len = snprintf(buf, sizeof(buf), "%s|%s|%llu", nid_to_hex(&c->v[i].key, hex),
                           c->v[i].owner, (unsigned long long)c->v[i].seq);
        uint8_t h[20];
        gnutls_hash_fast(GNUTLS_DIG_SHA1, buf, (size_t)len, h);
        for (int k = 0; k < 20; k++)
            acc.b[k] ^= h[k];
    }
    nid_to_hex(&acc, out);
}

static json_t *entries_json(const struct collect *c, size_t from, size_t to)
{
    json_t *a = json_array();
    for (size_t i = from; i < to; i++) {
        char hex[NID_HEX_LEN + 1], seq[24];
        snprintf(seq, sizeof(seq), "%llu", (unsigned long long)c->v[i].seq);
        json_array_append_new(
            a, json_pack("[s,s,s]", nid_to_hex(&c->v[i].key, hex), c->v[i].owner, seq));
    }
    return a;
}

static void want_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    if (!m || m->kind != MSG_RES || s->state != SN_MEMBER)
        return;
    json_t *want = json_object_get(m->body, "want");
    struct batch b = {0};
    size_t i;
    json_t *w;
    json_array_foreach(want, i, w)
    {
        if (i >= SN_SYNC_MAX_PUSH)
            break;
        nid_t key;
        const char *hex = json_string_value(json_array_get(w, 0));
        const char *owner = json_string_value(json_array_get(w, 1));
        if (!hex || !owner || nid_from_hex(&key, hex) != 0)
            continue;
        const struct store_entry *e = store_find(s->store, &key, owner);
        if (e)
            batch_add(s, r->peer, NULL, &b, e->rec, NULL);
    }
    batch_flush(s, r->peer, NULL, &b, NULL);
}

static void digest_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    if (!m || m->kind != MSG_RES || s->state != SN_MEMBER)
        return;
    if (json_is_true(json_object_get(m->body, "equal")))
        return;
    /* Send the range's entries in chunks; each chunk covers (from, to]. */
    const char *lo_hex = json_string_value(json_object_get(r->ud, "lo"));
    const char *hi_hex = json_string_value(json_object_get(r->ud, "hi"));
    nid_t lo, hi;
    nid_from_hex(&lo, lo_hex);
    nid_from_hex(&hi, hi_hex);
    struct collect c;
    collect_range(s, &lo, &hi, &c, 0);
    size_t start = 0;
    char from[NID_HEX_LEN + 1], to[NID_HEX_LEN + 1];
    snprintf(from, sizeof(from), "%s", lo_hex);
    do {
        size_t end = start + SN_SYNC_CHUNK;
        if (end >= c.n)
            end = c.n;
        else
            while (end < c.n && nid_eq(&c.v[end].key, &c.v[end - 1].key))
                end++; /* one key's owners stay together */
        if (end >= c.n)
            snprintf(to, sizeof(to), "%s", hi_hex);
        else
            nid_to_hex(&c.v[end - 1].key, to);
        json_t *body = json_pack("{s:s,s:s,s:s,s:s,s:o}", "lo", lo_hex, "hi", hi_hex, "from", from,
                                 "to", to, "entries", entries_json(&c, start, end));
        peer_request(s, r->peer, "sync", body, 10.0, want_done, NULL);
        json_decref(body);
        snprintf(from, sizeof(from), "%s", to);
        start = end;
    } while (start < c.n);
    free(c.v);
}

static void digest_req_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    digest_done(s, r, m, failure);
    json_decref(r->ud);
}

static void sync_with(struct sn *s, struct peer *p, const nid_t *lo, const nid_t *hi)
{
    struct collect c;
    collect_range(s, lo, hi, &c, 0);
    char d[NID_HEX_LEN + 1], lh[NID_HEX_LEN + 1], hh[NID_HEX_LEN + 1];
    digest(&c, d);
    free(c.v);
    json_t *body =
        json_pack("{s:s,s:s,s:s}", "lo", nid_to_hex(lo, lh), "hi", nid_to_hex(hi, hh), "digest", d);
    json_t *ctx = json_pack("{s:s,s:s}", "lo", lh, "hi", hh);
    if (!peer_request(s, p, "sync", body, 10.0, digest_req_done, ctx))
        json_decref(ctx);
    json_decref(body);
}

static int entry_sort(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    int c = nid_cmp(&x->key, &y->key);
    return c ? c : strcmp(x->owner, y->owner);
}

static void sync_refuse(struct sn *s, struct link *l, const struct msg *m, const char *why)
{
    s->c.syncs_refused++;
    log_warn("repl", "%s: sync refused: %s", conn_peer_addr(l->conn), why);
    link_send_error(l, m->tid, "invalid-request", why);
}

void repl_on_sync(struct sn *s, struct link *l, const struct msg *m)
{
    json_t *b = m->body;
    nid_t lo, hi, from, to;
    const char *lo_hex = json_string_value(json_object_get(b, "lo"));
    const char *hi_hex = json_string_value(json_object_get(b, "hi"));
    if (!lo_hex || !hi_hex || nid_from_hex(&lo, lo_hex) || nid_from_hex(&hi, hi_hex)) {
        link_send_error(l, m->tid, "invalid-request", "sync needs lo and hi");
        return;
    }
    /* A node compares the range it is responsible for: (its predecessor, itself]. */
    if (!nid_eq(&hi, &l->id)) {
        sync_refuse(s, l, m, "hi must be the Node-ID of the sender's certificate");
        return;
    }
    if (nid_eq(&lo, &hi)) {
        sync_refuse(s, l, m, "lo equals hi: a range cannot be the whole ring");
        return;
    }
    const char *dg = json_string_value(json_object_get(b, "digest"));
    json_t *entries = json_object_get(b, "entries");
    if (dg) {
        struct collect c;
        collect_range(s, &lo, &hi, &c, SN_SYNC_MAX_SCAN);
        char mine[NID_HEX_LEN + 1];
        digest(&c, mine);
        /* Past the bound we cannot tell: "different" makes the sender send its entries. */
        bool equal = !c.truncated && strcmp(mine, dg) == 0;
        if (equal) { /* the responsible node confirms every copy we hold of its range */
            for (size_t i = 0; i < c.n; i++)
                store_touch(s->store, &c.v[i].key, c.v[i].owner, sn_now(s));
        }
        free(c.v);
        json_t *res = json_pack("{s:b}", "equal", equal);
        link_send(l, "sync", MSG_RES, m->tid, res);
        json_decref(res);
        s->c.sync_rounds++;
        return;
    }
    const char *fh = json_string_value(json_object_get(b, "from"));
    const char *th = json_string_value(json_object_get(b, "to"));
    if (!fh || !th || nid_from_hex(&from, fh) || nid_from_hex(&to, th) || !json_is_array(entries) ||
        json_array_size(entries) > 4 * SN_SYNC_CHUNK) {
        link_send_error(l, m->tid, "invalid-request", "sync needs from, to and entries");
        return;
    }
    /* (from, to] is a part of (lo, hi], never empty nor the whole ring. */
    if (nid_eq(&from, &to) || !nid_in_open_closed(&to, &lo, &hi) ||
        !(nid_eq(&from, &lo) || nid_in_open(&from, &lo, &hi)) ||
        !(nid_eq(&from, &lo) || nid_in_open(&from, &lo, &to))) {
        sync_refuse(s, l, m, "from and to must delimit a part of (lo, hi]");
        return;
    }
    /* Theirs, parsed and sorted like ours (ring order from `from`, then owner). */
    size_t n = json_array_size(entries), i;
    struct entry *theirs = calloc(n ? n : 1, sizeof(*theirs));
    size_t nt = 0;
    json_t *e;
    json_array_foreach(entries, i, e)
    {
        const char *kh = json_string_value(json_array_get(e, 0));
        const char *ow = json_string_value(json_array_get(e, 1));
        const char *sq = json_string_value(json_array_get(e, 2));
        if (!kh || !ow || !sq || nid_from_hex(&theirs[nt].key, kh) != 0)
            continue;
        theirs[nt].owner = ow;
        theirs[nt].seq = strtoull(sq, NULL, 10);
        nt++;
    }
    struct collect c;
    collect_range(s, &from, &to, &c, SN_SYNC_MAX_SCAN);
    qsort(theirs, nt, sizeof(*theirs), entry_sort);
    json_t *want = json_array();
    struct batch push = {0};
    struct peer *peer = l->peer;
    double now = sn_now(s);
    /* Both lists are in (from, to]; compare by (key, owner) with a lookup per entry. */
    for (size_t k = 0; k < nt; k++) {
        const struct store_entry *mine = store_find(s->store, &theirs[k].key, theirs[k].owner);
        if (!mine || mine->rec->seq < theirs[k].seq || mine->rec->expires <= now) {
            char hex[NID_HEX_LEN + 1];
            json_array_append_new(
                want, json_pack("[s,s]", nid_to_hex(&theirs[k].key, hex), theirs[k].owner));
        } else {
            store_touch(s->store, &theirs[k].key, theirs[k].owner, now);
        }
    }
    size_t pushed = 0;
    for (size_t k = 0; k < c.n && pushed < SN_SYNC_MAX_PUSH; k++) {
        const struct entry *t = bsearch(&c.v[k], theirs, nt, sizeof(*theirs), entry_sort);
        if (t && t->seq >= c.v[k].seq)
            continue;
        batch_add(s, peer, l, &push, c.v[k].rec, NULL);
        pushed++;
    }
    batch_flush(s, peer, l, &push, NULL);
    free(c.v);
    free(theirs);
    json_t *res = json_pack("{s:o}", "want", want);
    link_send(l, "sync", MSG_RES, m->tid, res);
    json_decref(res);
}

/* ---- the periodic round ---- */

/*
 * Copies no responsible node has confirmed for a lease are not ours to keep
 * (a node joined before us, or the range moved) -- but they are dropped only
 * once the key's responsible node confirms it has the record (an `offer`
 * routed to it), so a copy is never the last one to go.
 */
struct stale {
    nid_t key;
    char owner[REC_OWNER_MAX + 1];
    uint64_t seq;
    json_t *env;
};

struct prune {
    struct sn *s;
    double cutoff;
    struct stale *v;
    size_t n, cap, max;
};

static bool prune_fn(const struct store_entry *e, void *ud)
{
    struct prune *p = ud;
    if (ring_is_primary(p->s, &e->rec->key) || e->touched >= p->cutoff)
        return true;
    if (p->n == p->max)
        return false;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        struct stale *v = realloc(p->v, cap * sizeof(*v));
        if (!v)
            return false;
        p->v = v;
        p->cap = cap;
    }
    struct stale *x = &p->v[p->n++];
    x->key = e->rec->key;
    snprintf(x->owner, sizeof(x->owner), "%s", e->rec->owner);
    x->seq = e->rec->seq;
    x->env = json_incref(e->rec->envelope);
    return true;
}

static void offer_done(struct sn *s, struct rreq *r, bool ok, json_t *result, const char *code,
                       const char *reason, int hops, json_t *node)
{
    struct stale *x = (struct stale *)r->ud;
    nid_t nid;
    char addr[SN_ADDR_MAX];
    s->n_offers--;
    /* Transport trouble keeps the copy; so does an answer from ourselves. */
    bool confirmed = ok || (code && strcmp(code, "timeout") && strcmp(code, "not-ready") &&
                            strcmp(code, "hop-limit") && strcmp(code, "internal"));
    /*
     * The word of our own predecessor is not enough: when it is the key's responsible node we
     * are its first successor, one of the key's holders (replication >= 2), whatever it says.
     * (A rogue responsible node that never syncs would otherwise have its replicas drop
     * everything by confirming their offers.)
     */
    if (confirmed && s->p.replication >= 2 && s->pred &&
        peer_parse(node, &nid, addr, sizeof(addr)) == 0 && nid_eq(&nid, &s->pred->id))
        confirmed = false;
    if (confirmed && peer_parse(node, &nid, addr, sizeof(addr)) == 0 && !nid_eq(&nid, &s->id)) {
        const struct store_entry *e = store_find(s->store, &x->key, x->owner);
        if (e && e->rec->seq == x->seq && !ring_is_primary(s, &x->key) &&
            store_drop(s->store, &x->key, x->owner))
            s->c.dropped_replicas++;
    }
    json_decref(x->env);
    free(x);
}

static void prune_round(struct sn *s, double now)
{
    if (s->n_offers > 0)
        return; /* the last round's offers are still out */
    struct prune p = {s, now - 8 * s->p.stabilize_s - 2.0, NULL, 0, 0, 256};
    store_foreach_range(s->store, &s->id, &s->id, prune_fn, &p);
    for (size_t i = 0; i < p.n; i++) {
        struct stale *x = malloc(sizeof(*x));
        if (!x) {
            json_decref(p.v[i].env);
            continue;
        }
        *x = p.v[i];
        json_t *args = json_pack("{s:O}", "record", x->env);
        struct rreq *r = rreq_start(s, &x->key, "offer", args, offer_done);
        json_decref(args);
        if (!r) {
            json_decref(x->env);
            free(x);
            continue;
        }
        r->ud = x;
        s->n_offers++;
        rreq_launch(s, r);
    }
    if (p.n)
        log_debug("repl", "offering %zu unconfirmed copies to their responsible nodes", p.n);
    free(p.v);
}

void repl_on_offer(struct sn *s, json_t *args, const char **code, char *err, size_t errlen)
{
    json_t *env = json_object_get(args, "record");
    *code = NULL;
    if (!json_is_object(env)) {
        *code = "invalid-request";
        snprintf(err, errlen, "offer needs a record");
        return;
    }
    if (repl_apply(s, env, STORE_REPLICA, err, errlen, code) == 0) {
        s->c.replicated_in++;
        *code = NULL;
    } else if (*code && !strcmp(*code, "stale")) {
        *code = NULL; /* we have it already, or newer */
    }
}

void repl_round(struct sn *s)
{
    if (s->state != SN_MEMBER)
        return;
    double now = sn_now(s);
    store_expire(s->store, now);
    s->last_sync = now;
    if (!s->pred || s->n_succ == 0)
        return;
    unsigned n = s->p.replication - 1;
    if (n > s->n_succ)
        n = s->n_succ;
    for (unsigned i = 0; i < n; i++)
        sync_with(s, s->succ[i], &s->pred->id, &s->id);
    prune_round(s, now);
}

/* ---- hand-off when leaving ---- */

static void handoff_done(struct sn *s, struct preq *r, const struct msg *m, const char *failure)
{
    if (s->leave_pending)
        s->leave_pending--;
    if (!m)
        log_warn("repl", "hand-off batch to %s failed: %s", r->peer->addr, failure);
    sn_leave_handoff_done(s);
}

void repl_handoff(struct sn *s, struct peer *to)
{
    struct collect c;
    collect_range(s, &s->id, &s->id, &c, 0);
    struct batch b = {0};
    for (size_t i = 0; i < c.n; i++)
        batch_add(s, to, NULL, &b, c.v[i].rec, handoff_done);
    batch_flush(s, to, NULL, &b, handoff_done);
    log_info("repl", "handing %zu records to %s", c.n, to->addr);
    free(c.v);
}
