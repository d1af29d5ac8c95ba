/*
 * The super node's record store (store.h). Two hash tables: keys (each with
 * its entries in an array sorted by owner, so lookups are a binary search and
 * answers come out in owner order) and owners (record count and bytes, for
 * the quotas). Both hash with a random per-store seed, since keys and owner
 * names are chosen by peers and must not be able to pile into one bucket.
 * Range iteration collects the keys in the interval and sorts them by their
 * distance from the start, which is O(n log n) and needs no ordered index on
 * the write path.
 *
 * A third table holds the marks (store.h, "Rollback"): the expired record of
 * an (key, owner) -- its envelope, which proves its seq to other nodes --
 * kept for the longest lifetime a record may have. Marks sit on two FIFO
 * lists, the store's and their owner's, which is what bounds them (in number
 * and bytes): the oldest go first, and an owner's own marks go before
 * anyone else's once it holds as many (or as many bytes) as its record quota.
 */
#include "store.h"

#include <gnutls/crypto.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errbuf.h"

/* Hash tables: intrusive chains, power-of-two buckets, grown at load factor 1. */

struct hnode {
    struct hnode *next;
    uint64_t hash;
};

struct htab {
    struct hnode **b;
    size_t nb, count;
};

static int htab_init(struct htab *t)
{
    t->nb = 64;
    t->count = 0;
    t->b = calloc(t->nb, sizeof(*t->b));
    return t->b ? 0 : -1;
}

/* Grows when full; a failed allocation only leaves the chains longer. */
static void htab_insert(struct htab *t, struct hnode *n)
{
    if (t->count >= t->nb) {
        size_t nb = t->nb * 2;
        struct hnode **b = calloc(nb, sizeof(*b));
        if (b) {
            for (size_t i = 0; i < t->nb; i++) {
                for (struct hnode *x = t->b[i], *next; x; x = next) {
                    next = x->next;
                    x->next = b[x->hash & (nb - 1)];
                    b[x->hash & (nb - 1)] = x;
                }
            }
            free(t->b);
            t->b = b;
            t->nb = nb;
        }
    }
    struct hnode **head = &t->b[n->hash & (t->nb - 1)];
    n->next = *head;
    *head = n;
    t->count++;
}

static void htab_remove(struct htab *t, struct hnode *n)
{
    struct hnode **pp = &t->b[n->hash & (t->nb - 1)];
    while (*pp && *pp != n)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = n->next;
        t->count--;
    }
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static uint64_t hash_bytes(uint64_t seed, const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t h = mix64(seed ^ (len * 0x9e3779b97f4a7c15ull));
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix64(h ^ w) + 0x9e3779b97f4a7c15ull;
        p += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    return mix64(h ^ w ^ seed);
}

/* The store */

struct sentry {
    struct store_entry pub; /* pub.rec points at rec */
    struct record rec;
};

struct keyslot {
    struct hnode hn; /* first: a keyslot is its hash node */
    nid_t key;
    struct sentry **e; /* sorted by owner (byte order) */
    size_t n, cap;
};

struct mark;

struct ownerslot {
    struct hnode hn;
    size_t count, bytes;
    size_t marks;               /* this owner's marks; the slot lives while count or marks */
    size_t mark_bytes;          /* the sizes of their envelopes */
    struct mark *mhead, *mtail; /* its marks, oldest first */
    char owner[];               /* NUL-terminated */
};

/* What is left of an expired (key, owner): its seq and signed envelope, until keep_until. */
struct mark {
    struct hnode hn; /* first: a mark is its hash node */
    nid_t key;
    uint64_t seq;
    double keep_until;
    json_t *env; /* the expired record's envelope (a reference) */
    size_t size; /* its compact size */
    struct ownerslot *o;
    struct mark *prev, *next;   /* the store's list, oldest first */
    struct mark *oprev, *onext; /* the owner's list, oldest first */
};

struct store {
    struct store_limits lim;
    uint64_t seed;
    struct htab keys, owners, marks;
    struct mark *mhead, *mtail;
    size_t max_marks, max_mark_bytes, mark_bytes;
    double max_lifetime;  /* store_set_max_lifetime(), or STORE_MARK_LIFETIME_DEF */
    double lifetime_seen; /* the longest expires - now of a record accepted */
    uint64_t marks_evicted;
    char **proxies;
    size_t n_proxies;
};

static void free_proxies(struct store *s)
{
    for (size_t i = 0; i < s->n_proxies; i++)
        free(s->proxies[i]);
    free(s->proxies);
    s->proxies = NULL;
    s->n_proxies = 0;
}

int store_set_proxies(struct store *s, const char *const *uris, size_t n)
{
    free_proxies(s);
    if (n == 0)
        return 0;
    if (!(s->proxies = calloc(n, sizeof(char *))))
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!(s->proxies[i] = strdup(uris[i]))) {
            free_proxies(s);
            return -1;
        }
        s->n_proxies = i + 1;
    }
    return 0;
}

static bool is_proxy(const struct store *s, const char *owner)
{
    for (size_t i = 0; i < s->n_proxies; i++)
        if (!strcmp(s->proxies[i], owner))
            return true;
    return false;
}

const char *store_strcode(int status)
{
    switch (status) {
    case STORE_OK:
        return "ok";
    case STORE_E_EXISTS:
        return "exists";
    case STORE_E_NOT_OWNER:
        return "not-owner";
    case STORE_E_NOT_FOUND:
        return "not-found";
    case STORE_E_STALE:
        return "stale";
    case STORE_E_NO_UPDATE:
        return "no-update";
    case STORE_E_EXPIRED:
        return "expired";
    case STORE_E_MODE:
        return "bad-mode";
    case STORE_E_QUOTA_KEY:
        return "quota-key";
    case STORE_E_QUOTA_OWNER:
        return "quota-owner";
    default:
        return "internal";
    }
}

enum store_mode store_mode_from_str(const char *s, bool *ok)
{
    bool found = true;
    enum store_mode m = STORE_ADD;
    if (s && !strcmp(s, "add"))
        m = STORE_ADD;
    else if (s && !strcmp(s, "update"))
        m = STORE_UPDATE;
    else if (s && !strcmp(s, "remove"))
        m = STORE_REMOVE;
    else
        found = false;
    if (ok)
        *ok = found;
    return m;
}

const char *store_mode_str(enum store_mode m)
{
    switch (m) {
    case STORE_ADD:
        return "add";
    case STORE_UPDATE:
        return "update";
    case STORE_REMOVE:
        return "remove";
    case STORE_REPLICA:
        return "replica";
    }
    return "unknown";
}

struct store *store_new(const struct store_limits *lim)
{
    struct store *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    if (lim)
        s->lim = *lim;
    s->max_marks = s->lim.marks ? s->lim.marks : STORE_MARKS_DEF;
    s->max_mark_bytes = s->lim.marks_bytes ? s->lim.marks_bytes : STORE_MARKS_BYTES_DEF;
    s->max_lifetime = STORE_MARK_LIFETIME_DEF;
    if (gnutls_rnd(GNUTLS_RND_NONCE, &s->seed, sizeof(s->seed)) < 0)
        s->seed = 0x243f6a8885a308d3ull ^ (uint64_t)(uintptr_t)s;
    if (htab_init(&s->keys) < 0 || htab_init(&s->owners) < 0 || htab_init(&s->marks) < 0) {
        free(s->keys.b);
        free(s->owners.b);
        free(s->marks.b);
        free(s);
        return NULL;
    }
    return s;
}

void store_set_max_lifetime(struct store *s, int64_t seconds)
{
    s->max_lifetime = seconds > 0 ? (double)seconds : STORE_MARK_LIFETIME_DEF;
}

static void sentry_free(struct sentry *e)
{
    if (e) {
        rec_free(&e->rec);
        free(e);
    }
}

void store_free(struct store *s)
{
    if (!s)
        return;
    free_proxies(s);
    for (struct mark *m = s->mhead, *next; m; m = next) {
        next = m->next;
        json_decref(m->env);
        free(m);
    }
    for (size_t i = 0; i < s->keys.nb; i++) {
        for (struct hnode *x = s->keys.b[i], *next; x; x = next) {
            next = x->next;
            struct keyslot *k = (struct keyslot *)x;
            for (size_t j = 0; j < k->n; j++)
                sentry_free(k->e[j]);
            free(k->e);
            free(k);
        }
    }
    for (size_t i = 0; i < s->owners.nb; i++) {
        for (struct hnode *x = s->owners.b[i], *next; x; x = next) {
            next = x->next;
            free(x);
        }
    }
    free(s->keys.b);
    free(s->owners.b);
    free(s->marks.b);
    free(s);
}

static struct keyslot *key_find(const struct store *s, const nid_t *key)
{
    uint64_t h = hash_bytes(s->seed, key->b, NID_LEN);
    for (struct hnode *x = s->keys.b[h & (s->keys.nb - 1)]; x; x = x->next) {
        struct keyslot *k = (struct keyslot *)x;
        if (x->hash == h && nid_eq(&k->key, key))
            return k;
    }
    return NULL;
}

static struct ownerslot *owner_find(const struct store *s, const char *owner)
{
    uint64_t h = hash_bytes(s->seed, owner, strlen(owner));
    for (struct hnode *x = s->owners.b[h & (s->owners.nb - 1)]; x; x = x->next) {
        struct ownerslot *o = (struct ownerslot *)x;
        if (x->hash == h && !strcmp(o->owner, owner))
            return o;
    }
    return NULL;
}

/* Binary search for `owner` under k: its index, or where it would go (*found false). */
static size_t slot_search(const struct keyslot *k, const char *owner, bool *found)
{
    size_t lo = 0, hi = k->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(k->e[mid]->rec.owner, owner);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static struct sentry *entry_find(const struct store *s, const nid_t *key, const char *owner,
                                 struct keyslot **kout, size_t *idx)
{
    struct keyslot *k = key_find(s, key);
    if (kout)
        *kout = k;
    if (!k)
        return NULL;
    bool found;
    size_t i = slot_search(k, owner, &found);
    if (idx)
        *idx = i;
    return found ? k->e[i] : NULL;
}

static bool is_live(const struct record *r, double now)
{
    return !r->removal && (double)r->expires > now;
}

static bool is_expired(const struct record *r, double now)
{
    return (double)r->expires <= now;
}

/* Frees an owner's slot once nothing of it is left: no entry, no mark. */
static void owner_release(struct store *s, struct ownerslot *o)
{
    if (o && o->count == 0 && o->marks == 0) {
        htab_remove(&s->owners, &o->hn);
        free(o);
    }
}

/* Marks */

static uint64_t mark_hash(const struct store *s, const nid_t *key, const struct ownerslot *o)
{
    return mix64(hash_bytes(s->seed, key->b, NID_LEN) ^ o->hn.hash);
}

static struct mark *mark_find(const struct store *s, const nid_t *key, const char *owner)
{
    struct ownerslot *o = owner_find(s, owner);
    if (!o || o->marks == 0)
        return NULL;
    uint64_t h = mark_hash(s, key, o);
    for (struct hnode *x = s->marks.b[h & (s->marks.nb - 1)]; x; x = x->next) {
        struct mark *m = (struct mark *)x;
        if (x->hash == h && m->o == o && nid_eq(&m->key, key))
            return m;
    }
    return NULL;
}

/* Unlinks and frees m (and its owner's slot when that was all that was left of it). */
static void mark_remove(struct store *s, struct mark *m)
{
    htab_remove(&s->marks, &m->hn);
    *(m->prev ? &m->prev->next : &s->mhead) = m->next;
    *(m->next ? &m->next->prev : &s->mtail) = m->prev;
    struct ownerslot *o = m->o;
    *(m->oprev ? &m->oprev->onext : &o->mhead) = m->onext;
    *(m->onext ? &m->onext->oprev : &o->mtail) = m->oprev;
    o->marks--;
    o->mark_bytes -= m->size < o->mark_bytes ? m->size : o->mark_bytes;
    s->mark_bytes -= m->size < s->mark_bytes ? m->size : s->mark_bytes;
    json_decref(m->env);
    free(m);
    owner_release(s, o);
}

/* The longest a record may live: what the overlay allows, or longer if a record showed it. */
static double mark_lifetime(const struct store *s)
{
    return s->lifetime_seen > s->max_lifetime ? s->lifetime_seen : s->max_lifetime;
}

/*
 * Remembers the seq of an entry about to be dropped at expiry (its owner slot o is still
 * alive). Any older record of that owner was signed before this one was first stored here,
 * which was before it expired, so it expires at most one lifetime after this one's "expires":
 * until then the seq must stay known.
 */
static void mark_add(struct store *s, const struct record *r, struct ownerslot *o, double now)
{
    double keep_until = (double)r->expires + mark_lifetime(s);
    if (keep_until <= now || !o)
        return;
    struct mark *m = calloc(1, sizeof(*m));
    if (!m) {
        s->marks_evicted++; /* the same loss as an eviction, and counted as one */
        return;
    }
    m->key = r->key;
    m->seq = r->seq;
    m->keep_until = keep_until;
    m->env = json_incref(r->envelope);
    m->size = r->size;
    m->o = o;
    m->hn.hash = mark_hash(s, &r->key, o);
    htab_insert(&s->marks, &m->hn);
    m->prev = s->mtail;
    *(s->mtail ? &s->mtail->next : &s->mhead) = m;
    s->mtail = m;
    m->oprev = o->mtail;
    *(o->mtail ? &o->mtail->onext : &o->mhead) = m;
    o->mtail = m;
    o->marks++;
    o->mark_bytes += m->size;
    s->mark_bytes += m->size;
    /* An owner filling the table pushes out its own marks first, then the oldest go. */
    bool px = s->n_proxies && is_proxy(s, o->owner);
    size_t per_owner = px ? s->lim.per_proxy : s->lim.per_owner;
    size_t per_owner_bytes = px ? s->lim.per_proxy_bytes : s->lim.per_owner_bytes;
    while (((per_owner && o->marks > per_owner) ||
            (per_owner_bytes && o->mark_bytes > per_owner_bytes)) &&
           o->mhead != m) {
        mark_remove(s, o->mhead);
        s->marks_evicted++;
    }
    while ((s->marks.count > s->max_marks || s->mark_bytes > s->max_mark_bytes) && s->mhead != m) {
        mark_remove(s, s->mhead);
        s->marks_evicted++;
    }
}

/* Takes the entry at k->e[i] out of the store and frees it (and k, once empty). */
static void entry_unlink(struct store *s, struct keyslot *k, size_t i)
{
    struct sentry *e = k->e[i];
    struct ownerslot *o = owner_find(s, e->rec.owner);
    if (o) {
        o->count--;
        o->bytes -= e->rec.size < o->bytes ? e->rec.size : o->bytes;
        owner_release(s, o);
    }
    memmove(&k->e[i], &k->e[i + 1], (k->n - i - 1) * sizeof(k->e[0]));
    k->n--;
    sentry_free(e);
    if (k->n == 0) {
        htab_remove(&s->keys, &k->hn);
        free(k->e);
        free(k);
    }
}

/* Owners with a live record or tombstone (not expired) under k, leaving out `skip`. */
static size_t owners_under(const struct keyslot *k, const struct sentry *skip, double now)
{
    size_t n = 0;
    for (size_t i = 0; k && i < k->n; i++)
        if (k->e[i] != skip && !is_expired(&k->e[i]->rec, now))
            n++;
    return n;
}

static bool others_live(const struct keyslot *k, const struct sentry *mine, double now)
{
    for (size_t i = 0; k && i < k->n; i++)
        if (k->e[i] != mine && is_live(&k->e[i]->rec, now))
            return true;
    return false;
}

int store_put(struct store *s, struct record *r, enum store_mode mode, double now, char *err,
              size_t errlen)
{
    char khex[NID_HEX_LEN + 1];
    nid_to_hex(&r->key, khex);
    if (err && errlen)
        err[0] = '\0';

    if (is_expired(r, now))
        return errbuf_set(err, errlen, STORE_E_EXPIRED, "%s's record under %s expired at %" PRId64,
                          r->owner, khex, r->expires);
    if (mode == STORE_REMOVE ? !r->removal
                             : (mode == STORE_ADD || mode == STORE_UPDATE) && r->removal)
        return errbuf_set(err, errlen, STORE_E_MODE, "%s: mode %s does not take a %s", khex,
                          store_mode_str(mode), r->removal ? "removal statement" : "record");
    if (mode != STORE_ADD && mode != STORE_UPDATE && mode != STORE_REMOVE && mode != STORE_REPLICA)
        return errbuf_set(err, errlen, STORE_E_MODE, "%s: unknown mode %d", khex, (int)mode);

    struct keyslot *k = NULL;
    size_t idx = 0;
    struct sentry *cur = entry_find(s, &r->key, r->owner, &k, &idx);
    /* For the modes, an expired entry not yet purged counts as absent, as if store_expire() had
     * run; for freshness it counts, as its mark would (rollback, store.h). */
    struct sentry *have = cur && !is_expired(&cur->rec, now) ? cur : NULL;
    bool have_live = have && !have->rec.removal;

    if (cur && r->seq <= cur->rec.seq)
        return errbuf_set(err, errlen, STORE_E_STALE,
                          "%s's %s%s under %s has seq %" PRIu64 "; this one has %" PRIu64, r->owner,
                          have ? "" : "expired ", cur->rec.removal ? "tombstone" : "record", khex,
                          cur->rec.seq, r->seq);
    struct mark *mk = cur ? NULL : mark_find(s, &r->key, r->owner);
    if (mk && mk->keep_until <= now) {
        mark_remove(s, mk); /* its time is over: whatever it guarded has expired too */
        mk = NULL;
    }
    if (mk && r->seq <= mk->seq)
        return errbuf_set(err, errlen, STORE_E_STALE,
                          "%s's record under %s expired with seq %" PRIu64
                          " (remembered until %.0f); this one has %" PRIu64,
                          r->owner, khex, mk->seq, mk->keep_until, r->seq);
    if (have_live && have->rec.no_update)
        return errbuf_set(err, errlen, STORE_E_NO_UPDATE,
                          "%s's record under %s is no_update until %" PRId64, r->owner, khex,
                          have->rec.expires);

    switch (mode) {
    case STORE_ADD:
        if (have_live)
            return errbuf_set(err, errlen, STORE_E_EXISTS, "%s already has a record under %s",
                              r->owner, khex);
        break;
    case STORE_UPDATE:
        if (!have && others_live(k, cur, now))
            return errbuf_set(err, errlen, STORE_E_NOT_OWNER,
                              "%s has no record under %s, which holds other owners' records",
                              r->owner, khex);
        break;
    case STORE_REMOVE:
        if (!have_live) {
            if (others_live(k, cur, now))
                return errbuf_set(err, errlen, STORE_E_NOT_OWNER,
                                  "%s has no record under %s to remove; other owners have",
                                  r->owner, khex);
            return errbuf_set(err, errlen, STORE_E_NOT_FOUND, "%s has no record under %s to remove",
                              r->owner, khex);
        }
        break;
    case STORE_REPLICA:
        break;
    }

    /* Quotas: replacing one's own entry (even an expired one) only counts the difference. */
    if (s->lim.per_key && !cur && owners_under(k, NULL, now) + 1 > s->lim.per_key)
        return errbuf_set(err, errlen, STORE_E_QUOTA_KEY,
                          "%s already holds records of %zu owners, the most allowed", khex,
                          s->lim.per_key);
    struct ownerslot *o = owner_find(s, r->owner);
    size_t ocount = o ? o->count : 0, obytes = o ? o->bytes : 0;
    size_t old_size = cur ? cur->rec.size : 0;
    bool px = s->n_proxies && is_proxy(s, r->owner);
    size_t max_n = px ? s->lim.per_proxy : s->lim.per_owner;
    size_t max_b = px ? s->lim.per_proxy_bytes : s->lim.per_owner_bytes;
    if (max_n && !cur && ocount + 1 > max_n)
        return errbuf_set(err, errlen, STORE_E_QUOTA_OWNER,
                          "%s already has %zu records here, the most allowed", r->owner, ocount);
    if (max_b && obytes - old_size + r->size > max_b)
        return errbuf_set(err, errlen, STORE_E_QUOTA_OWNER,
                          "%s's records would take %zu bytes here, above the limit of %zu",
                          r->owner, obytes - old_size + r->size, max_b);

    /* Every allocation before any change, so that a failure leaves the store as it was. */
    struct sentry *ne = NULL;
    struct keyslot *nk = NULL;
    struct ownerslot *no = NULL;
    if (!cur) {
        if (!(ne = calloc(1, sizeof(*ne))))
            goto nomem;
        if (!k) {
            if (!(nk = calloc(1, sizeof(*nk))) || !(nk->e = malloc(sizeof(*nk->e))))
                goto nomem;
            nk->cap = 1;
            nk->key = r->key;
            nk->hn.hash = hash_bytes(s->seed, r->key.b, NID_LEN);
        } else if (k->n == k->cap) {
            size_t cap = k->cap * 2;
            struct sentry **e = realloc(k->e, cap * sizeof(*e));
            if (!e)
                goto nomem;
            k->e = e;
            k->cap = cap;
        }
        if (!o) {
            size_t len = strlen(r->owner);
            if (!(no = calloc(1, sizeof(*no) + len + 1)))
                goto nomem;
            memcpy(no->owner, r->owner, len + 1);
            no->hn.hash = hash_bytes(s->seed, r->owner, len);
        }
    }

    if (cur) {
        rec_free(&cur->rec);
        cur->rec = *r;
        cur->pub.rec = &cur->rec;
        cur->pub.touched = now;
        o->bytes = o->bytes - old_size + r->size;
    } else {
        if (nk) {
            htab_insert(&s->keys, &nk->hn);
            k = nk;
            idx = 0;
        }
        if (no) {
            htab_insert(&s->owners, &no->hn);
            o = no;
        }
        ne->rec = *r;
        ne->pub.rec = &ne->rec;
        ne->pub.touched = now;
        memmove(&k->e[idx + 1], &k->e[idx], (k->n - idx) * sizeof(k->e[0]));
        k->e[idx] = ne;
        k->n++;
        o->count++;
        o->bytes += r->size;
    }
    /*
     * The parsed signed text is not kept: everything the store and its readers use
     * is in the record's fields and envelope, and a busy node holds many records.
     */
    struct record *kept = cur ? &cur->rec : &ne->rec;
    if (mk)
        mark_remove(s, mk); /* the entry carries the seq from now on; o->count keeps o */
    if ((double)kept->expires - now > s->lifetime_seen)
        s->lifetime_seen = (double)kept->expires - now;
    json_decref(kept->signed_obj);
    kept->signed_obj = NULL;
    kept->value = NULL;
    memset(r, 0, sizeof(*r));
    return STORE_OK;

nomem:
    free(ne);
    if (nk)
        free(nk->e);
    free(nk);
    free(no);
    return errbuf_set(err, errlen, STORE_E_NOMEM, "%s: out of memory", khex);
}

size_t store_get(const struct store *s, const nid_t *key, double now, const struct record **out,
                 size_t max)
{
    const struct keyslot *k = key_find(s, key);
    size_t n = 0;
    for (size_t i = 0; k && i < k->n; i++) {
        const struct record *r = &k->e[i]->rec;
        if (!is_live(r, now))
            continue;
        if (n < max)
            out[n] = r;
        n++;
    }
    return n;
}

const struct store_entry *store_find(const struct store *s, const nid_t *key, const char *owner)
{
    struct sentry *e = entry_find(s, key, owner, NULL, NULL);
    return e ? &e->pub : NULL;
}

bool store_touch(struct store *s, const nid_t *key, const char *owner, double now)
{
    struct sentry *e = entry_find(s, key, owner, NULL, NULL);
    if (!e)
        return false;
    e->pub.touched = now;
    return true;
}

bool store_drop(struct store *s, const nid_t *key, const char *owner)
{
    struct keyslot *k;
    size_t idx;
    if (!entry_find(s, key, owner, &k, &idx))
        return false;
    entry_unlink(s, k, idx);
    return true;
}

size_t store_expire(struct store *s, double now)
{
    size_t dropped = 0;
    for (size_t b = 0; b < s->keys.nb; b++) {
        struct hnode *x = s->keys.b[b];
        while (x) {
            /* entry_unlink() may free the slot: keep its successor first. */
            struct hnode *next = x->next;
            struct keyslot *k = (struct keyslot *)x;
            for (size_t i = k->n; i-- > 0;) {
                if (is_expired(&k->e[i]->rec, now)) {
                    bool last = k->n == 1;
                    mark_add(s, &k->e[i]->rec, owner_find(s, k->e[i]->rec.owner), now);
                    entry_unlink(s, k, i);
                    dropped++;
                    if (last)
                        break;
                }
            }
            x = next;
        }
    }
    for (struct mark *m = s->mhead, *next; m; m = next) {
        next = m->next;
        if (m->keep_until <= now)
            mark_remove(s, m);
    }
    return dropped;
}

bool store_knows(const struct store *s, const nid_t *key, const char *owner, uint64_t seq)
{
    struct sentry *e = entry_find(s, key, owner, NULL, NULL);
    if (e)
        return e->rec.seq >= seq;
    struct mark *m = mark_find(s, key, owner);
    return m && m->seq >= seq;
}

int store_put_mark(struct store *s, const struct record *r, double now, char *err, size_t errlen)
{
    char khex[NID_HEX_LEN + 1];
    nid_to_hex(&r->key, khex);
    if (err && errlen)
        err[0] = '\0';
    if (!is_expired(r, now))
        return errbuf_set(err, errlen, STORE_E_MODE,
                          "%s's record under %s has not expired: it is no mark", r->owner, khex);
    if ((double)r->expires + mark_lifetime(s) <= now)
        return errbuf_set(err, errlen, STORE_E_EXPIRED,
                          "%s's record under %s expired too long ago to matter", r->owner, khex);
    if (store_knows(s, &r->key, r->owner, r->seq))
        return errbuf_set(err, errlen, STORE_E_STALE,
                          "%s's seq %" PRIu64 " under %s is known here already", r->owner, r->seq,
                          khex);
    struct ownerslot *o = owner_find(s, r->owner);
    if (!o) {
        size_t len = strlen(r->owner);
        if (!(o = calloc(1, sizeof(*o) + len + 1)))
            return errbuf_set(err, errlen, STORE_E_NOMEM, "%s: out of memory", khex);
        memcpy(o->owner, r->owner, len + 1);
        o->hn.hash = hash_bytes(s->seed, r->owner, len);
        htab_insert(&s->owners, &o->hn);
    }
    o->marks++; /* holds the slot while the older entry or mark goes */
    struct keyslot *k;
    size_t idx;
    if (entry_find(s, &r->key, r->owner, &k, &idx))
        entry_unlink(s, k, idx); /* older than a record its owner wrote since: a replay */
    struct mark *old = mark_find(s, &r->key, r->owner);
    if (old)
        mark_remove(s, old);
    o->marks--;
    mark_add(s, r, o, now); /* never evicts the new mark itself */
    if (!mark_find(s, &r->key, r->owner)) {
        owner_release(s, o);
        return errbuf_set(err, errlen, STORE_E_NOMEM, "%s: out of memory", khex);
    }
    return STORE_OK;
}

void store_foreach_mark(const struct store *s, const nid_t *lo, const nid_t *hi, double now,
                        bool (*fn)(const struct store_mark *m, void *ud), void *ud)
{
    for (const struct mark *m = s->mhead; m; m = m->next) {
        if (m->keep_until <= now || !nid_in_open_closed(&m->key, lo, hi))
            continue;
        struct store_mark pub = {m->key, m->o->owner, m->seq, m->keep_until, m->env, m->size};
        if (!fn(&pub, ud))
            return;
    }
}

struct ranged {
    uint64_t top; /* the first 8 bytes of dist, big-endian: most comparisons end here */
    nid_t dist;   /* clockwise distance from lo + 1: lo itself comes last */
    const struct keyslot *k;
};

static int ranged_cmp(const void *a, const void *b)
{
    const struct ranged *x = a, *y = b;
    if (x->top != y->top)
        return x->top < y->top ? -1 : 1;
    return nid_cmp(&x->dist, &y->dist);
}

void store_foreach_range(const struct store *s, const nid_t *lo, const nid_t *hi,
                         bool (*fn)(const struct store_entry *e, void *ud), void *ud)
{
    if (s->keys.count == 0)
        return;
    struct ranged *v = malloc(s->keys.count * sizeof(*v));
    if (!v)
        return;
    nid_t start;
    nid_add_pow2(&start, lo, 0);
    size_t n = 0;
    for (size_t b = 0; b < s->keys.nb; b++) {
        for (struct hnode *x = s->keys.b[b]; x; x = x->next) {
            const struct keyslot *k = (const struct keyslot *)x;
            if (!nid_in_open_closed(&k->key, lo, hi))
                continue;
            nid_distance(&v[n].dist, &start, &k->key);
            uint64_t top = 0;
            for (size_t i = 0; i < 8; i++)
                top = top << 8 | v[n].dist.b[i];
            v[n].top = top;
            v[n].k = k;
            n++;
        }
    }
    qsort(v, n, sizeof(*v), ranged_cmp);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < v[i].k->n; j++)
            if (!fn(&v[i].k->e[j]->pub, ud))
                goto out;
out:
    free(v);
}

void store_stats(const struct store *s, double now, struct store_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->keys = s->keys.count;
    out->marks = s->marks.count;
    out->mark_bytes = s->mark_bytes;
    out->marks_evicted = s->marks_evicted;
    for (size_t b = 0; b < s->keys.nb; b++) {
        for (struct hnode *x = s->keys.b[b]; x; x = x->next) {
            const struct keyslot *k = (const struct keyslot *)x;
            for (size_t i = 0; i < k->n; i++) {
                const struct record *r = &k->e[i]->rec;
                out->bytes += r->size;
                if (is_expired(r, now))
                    continue;
                if (r->removal)
                    out->tombstones++;
                else
                    out->records++;
            }
        }
    }
}
