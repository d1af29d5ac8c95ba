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
 *
 * Rollback marks (store.h) travel too, as the expired records themselves, signed by their
 * owners: a bare "(key, owner, seq) expired" would be a rogue peer's word, able to lock an
 * owner out of a key for a day, while a signed record only proves what its owner wrote. A
 * sync compares a second digest over the marks of the range (and entries expired but not
 * yet purged, which become marks); when it differs, each side pushes the other its marks of
 * the range in `replicate` ("marks"), at most SN_SYNC_MAX_PUSH per round, and a node that
 * leaves hands its marks over with its records. A receiver keeps a mark only after checking
 * its signature as of its own lifetime (repl_apply_mark).
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

/*
 * Verifies and keeps one rollback mark from another node (store_put_mark): an expired record,
 * checked as of its own lifetime (signature, certificate chain, owner, policy). What the
 * store knows already costs no verification. 0, or a negative code with *code and err.
 */
static int repl_apply_mark(struct sn *s, json_t *env, char *err, size_t errlen, const char **code)
{
    struct record r;
    double now = sn_now(s);
    int rc = rec_parse(env, s->p.max_record_bytes, &r, err, errlen);
    if (rc != REC_OK) {
        *code = rec_strcode(rc);
        return STORE_E_MODE;
    }
    if ((double)r.expires > now) {
        rec_free(&r);
        *code = "invalid-request";
        snprintf(err, errlen, "a mark must be an expired record");
        return STORE_E_MODE;
    }
    if (store_knows(s->store, &r.key, r.owner, r.seq)) {
        rec_free(&r);
        *code = "stale";
        snprintf(err, errlen, "known");
        return STORE_E_STALE;
    }
    /* Checked as of its last live second: it proves what its owner wrote then. */
    rc = rec_verify(s->verifier, &r, (time_t)(r.expires - 1), s->p.max_lifetime_s, err, errlen);
    if (rc != REC_OK) {
        *code = rec_strcode(rc);
        rec_free(&r);
        return STORE_E_MODE; /* refused: not evidence */
    }
    rc = store_put_mark(s->store, &r, now, err, errlen);
    if (rc != STORE_OK)
        *code = store_strcode(rc);
    rec_free(&r);
    return rc;
}

/* ---- pushing records ---- */

struct batch {
    json_t *arr;   /* records */
    json_t *marks; /* expired records: rollback marks */
    size_t bytes;
};

static void batch_flush(struct sn *s, struct peer *to, struct link *via, struct batch *b,
                        preq_cb cb)
{
    if ((!b->arr || json_array_size(b->arr) == 0) &&
        (!b->marks || json_array_size(b->marks) == 0)) {
        json_decref(b->arr);
        json_decref(b->marks);
        b->arr = b->marks = NULL;
        return;
    }
    json_t *body = json_pack("{s:o}", "records", b->arr ? b->arr : json_array());
    if (b->marks)
        json_object_set_new(body, "marks", b->marks);
    s->c.replicated_out += json_array_size(json_object_get(body, "records"));
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
    b->marks = NULL;
    b->bytes = 0;
}

static void batch_add_env(struct sn *s, struct peer *to, struct link *via, struct batch *b,
                          json_t *env, size_t size, bool mark, preq_cb cb)
{
    if ((b->arr || b->marks) &&
        (b->bytes + size + 64 > s->max_frame / 2 ||
         (mark && b->marks && json_array_size(b->marks) >= SN_MAX_MARKS_IN)))
        batch_flush(s, to, via, b, cb);
    json_t **a = mark ? &b->marks : &b->arr;
    if (!*a)
        *a = json_array();
    json_array_append(*a, env);
    b->bytes += size + 1;
}

static void batch_add(struct sn *s, struct peer *to, struct link *via, struct batch *b,
                      const struct record *r, preq_cb cb)
{
    batch_add_env(s, to, via, b, r->envelope, r->size, false, cb);
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
    /* Rollback marks: at most SN_MAX_MARKS_IN checked per message, the rest ignored. */
    size_t kept = 0, known = 0, bad = 0;
    char why[600] = "";
    json_array_foreach(json_object_get(m->body, "marks"), i, env)
    {
        if (i >= SN_MAX_MARKS_IN)
            break;
        char err[512];
        const char *code = "";
        int rc = repl_apply_mark(s, env, err, sizeof(err), &code);
        if (rc == 0)
            kept++;
        else if (rc == STORE_E_STALE || rc == STORE_E_EXPIRED)
            known++;
        else if (bad++ == 0)
            snprintf(why, sizeof(why), "%s: %s", code, err);
    }
    if (bad) /* one line per message, whatever a peer sends */
        log_info("repl", "%s: %zu rollback marks refused (first: %s)", conn_peer_addr(l->conn), bad,
                 why);
    if (kept)
        log_debug("repl", "%s: kept %zu rollback marks (%zu known)", conn_peer_addr(l->conn), kept,
                  known);
    json_t *b = json_pack("{s:i,s:i,s:o}", "stored", (int)stored, "current", (int)current,
                          "refused", refused);
    if (json_object_get(m->body, "marks"))
        json_object_set_new(b, "marks", json_integer((json_int_t)kept));
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

/* acc ^= SHA-1(key "|" owner "|" seq): one entry's part of a sync digest. */
static void digest_add(nid_t *acc, const nid_t *key, const char *owner, uint64_t seq)
{
    char buf[NID_HEX_LEN + 1 + REC_OWNER_MAX + 24], hex[NID_HEX_LEN + 1];
    int len = snprintf(buf, sizeof(buf), "%s|%s|%llu", nid_to_hex(key, hex), owner,
                       (unsigned long long)seq);
    uint8_t h[20];
    gnutls_hash_fast(GNUTLS_DIG_SHA1, buf, (size_t)len, h);
    for (int k = 0; k < 20; k++)
        acc->b[k] ^= h[k];
}

static void digest(const struct collect *c, char out[NID_HEX_LEN + 1])
{
    nid_t acc;
    memset(&acc, 0, sizeof(acc));
    for (size_t i = 0; i < c->n; i++)
        digest_add(&acc, &c->v[i].key, c->v[i].owner, c->v[i].seq);
    nid_to_hex(&acc, out);
}

/* ---- rollback marks: their digest and their push ---- */

struct mdigest {
    nid_t acc;
    size_t n;
    double now;
    bool truncated; /* more than SN_SYNC_MAX_SCAN: the digest cannot tell */
};

static bool mdigest_mark(const struct store_mark *m, void *ud)
{
    struct mdigest *d = ud;
    if (d->n++ == SN_SYNC_MAX_SCAN) {
        d->truncated = true;
        return false;
    }
    digest_add(&d->acc, &m->key, m->owner, m->seq);
    return true;
}

/* An entry expired but not purged yet is a mark about to be: it counts as one. */
static bool mdigest_entry(const struct store_entry *e, void *ud)
{
    struct mdigest *d = ud;
    if (e->rec->expires > d->now)
        return true;
    if (d->n++ == SN_SYNC_MAX_SCAN) {
        d->truncated = true;
        return false;
    }
    digest_add(&d->acc, &e->rec->key, e->rec->owner, e->rec->seq);
    return true;
}

/* The digest of the marks of (lo, hi]; false when there are too many to tell. */
static bool marks_digest(struct sn *s, const nid_t *lo, const nid_t *hi, char out[NID_HEX_LEN + 1])
{
    struct mdigest d = {.now = sn_now(s)};
    store_foreach_mark(s->store, lo, hi, d.now, mdigest_mark, &d);
    if (!d.truncated)
        store_foreach_range(s->store, lo, hi, mdigest_entry, &d);
    nid_to_hex(&d.acc, out);
    return !d.truncated;
}

struct mpush {
    struct sn *s;
    struct peer *to;
    struct link *via;
    preq_cb cb;
    struct batch b;
    size_t skip, seen, pushed, max;
};

static bool mpush_fn(const struct store_mark *m, void *ud)
{
    struct mpush *p = ud;
    if (p->seen++ < p->skip)
        return true;
    if (p->max && p->pushed == p->max)
        return false;
    batch_add_env(p->s, p->to, p->via, &p->b, m->envelope, m->size, true, p->cb);
    p->pushed++;
    return true;
}

/*
 * Sends `to` the marks of (lo, hi] (in replicate, "marks"), at most SN_SYNC_MAX_PUSH a round
 * from where the last round stopped, so that a range with more marks is covered over rounds.
 */
static void push_marks(struct sn *s, struct peer *to, struct link *via, const nid_t *lo,
                       const nid_t *hi)
{
    struct mpush p = {
        .s = s, .to = to, .via = via, .skip = s->marks_cursor, .max = SN_SYNC_MAX_PUSH};
    double now = sn_now(s);
    store_foreach_mark(s->store, lo, hi, now, mpush_fn, &p);
    if (p.pushed == 0 && p.skip > 0) { /* the cursor was past this range's end */
        p.skip = p.seen = 0;
        store_foreach_mark(s->store, lo, hi, now, mpush_fn, &p);
    }
    batch_flush(s, to, via, &p.b, NULL);
    s->marks_cursor = p.pushed == SN_SYNC_MAX_PUSH ? p.skip + p.pushed : 0;
    if (p.pushed)
        log_debug("repl", "pushed %zu rollback marks to %s", p.pushed, to ? to->addr : "?");
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
    const char *lo_hex = json_string_value(json_object_get(r->ud, "lo"));
    const char *hi_hex = json_string_value(json_object_get(r->ud, "hi"));
    nid_t lo, hi;
    nid_from_hex(&lo, lo_hex);
    nid_from_hex(&hi, hi_hex);
    /* The replica's marks of our range differ from ours: it gets ours (and sent us its own). */
    if (json_is_false(json_object_get(m->body, "marks_equal")))
        push_marks(s, r->peer, NULL, &lo, &hi);
    if (json_is_true(json_object_get(m->body, "equal")))
        return;
    /* Send the range's entries in chunks; each chunk covers (from, to]. */
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
    char d[NID_HEX_LEN + 1], md[NID_HEX_LEN + 1], lh[NID_HEX_LEN + 1], hh[NID_HEX_LEN + 1];
    digest(&c, d);
    free(c.v);
    json_t *body =
        json_pack("{s:s,s:s,s:s}", "lo", nid_to_hex(lo, lh), "hi", nid_to_hex(hi, hh), "digest", d);
    if (marks_digest(s, lo, hi, md))
        json_object_set_new(body, "marks", json_string(md));
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
        const char *theirs = json_string_value(json_object_get(b, "marks"));
        if (theirs) {
            char md[NID_HEX_LEN + 1];
            bool mequal = marks_digest(s, &lo, &hi, md) && !strcmp(md, theirs);
            json_object_set_new(res, "marks_equal", json_boolean(mequal));
            if (!mequal) /* the sender gets ours; it sends us its own on this answer */
                push_marks(s, l->peer, l, &lo, &hi);
        }
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
     * The responsible node's word is not enough: a rogue one that never syncs its range and
     * confirms every offer would have all its replicas drop their copies. We are one of the
     * key's holders unless `replication` nodes lie in [key, us) -- the responsible node and
     * the r - 1 after it -- so we drop only when we know that many: live nodes we heard from
     * lately, each on its own link (the responder among them). An honest ring gives a node
     * that is no holder this evidence: its r - 1 predecessors sync their ranges with it.
     * Without it the copy stays (an extra copy, until the evidence comes or it expires).
     */
    if (confirmed && !ring_live_at_least(s, &x->key, &s->id, s->p.replication)) {
        log_debug("repl",
                  "offer confirmed, but fewer than %u live nodes precede us from the "
                  "key: keeping the copy",
                  s->p.replication);
        confirmed = false;
    }
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
    /* The marks of the range `to` takes over go with it: else an older record of an owner
     * whose record expired here could be replayed there (rollback). */
    const nid_t *lo = s->pred ? &s->pred->id : &s->id;
    struct mpush p = {.s = s, .to = to, .cb = handoff_done};
    store_foreach_mark(s->store, lo, &s->id, sn_now(s), mpush_fn, &p);
    batch_flush(s, to, NULL, &p.b, handoff_done);
    log_info("repl", "handing %zu records and %zu rollback marks to %s", c.n, p.pushed, to->addr);
    free(c.v);
}
