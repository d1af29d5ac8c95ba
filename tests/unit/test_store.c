/*
 * Unit tests for store.c against the semantics in store.h: the four write
 * modes, freshness (stale writes, replays blocked by tombstones, and by the
 * marks expired entries leave: the rollback of issue 15), no_update,
 * the three quotas, expiry, lookups in owner order, range iteration in ring
 * order with wrap-around, and a 100,000-record run that must stay fast. The
 * store does not verify signatures, so records are built by hand.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "store.h"

#define NOW 1000000.0

/* A key whose first bytes are `hi` (big-endian) and the rest `lo` repeated. */
static nid_t key_n(uint32_t hi)
{
    nid_t k;
    memset(&k, 0, sizeof(k));
    k.b[0] = (uint8_t)(hi >> 24);
    k.b[1] = (uint8_t)(hi >> 16);
    k.b[2] = (uint8_t)(hi >> 8);
    k.b[3] = (uint8_t)hi;
    return k;
}

struct spec {
    nid_t key;
    const char *owner;
    uint64_t seq;
    double expires; /* relative to NOW */
    bool removal, no_update;
    size_t size;
};

/* A spec with key, owner and seq, then any designated members (.expires = 5, ...). */
#define SP(k, o, q, ...) ((struct spec){.key = (k), .owner = (o), .seq = (q), __VA_ARGS__})

static struct record mk(const struct spec *sp)
{
    struct record r;
    memset(&r, 0, sizeof(r));
    r.key = sp->key;
    snprintf(r.type, sizeof(r.type), "test");
    snprintf(r.name, sizeof(r.name), "n");
    snprintf(r.owner, sizeof(r.owner), "%s", sp->owner);
    r.seq = sp->seq;
    r.expires = (int64_t)(NOW + (sp->expires ? sp->expires : 3600));
    r.removal = sp->removal;
    r.no_update = sp->no_update;
    r.envelope = json_pack("{s:s, s:s, s:s}", "signed", "{}", "cert", "AAAA", "sig", "AAAA");
    r.size = sp->size ? sp->size : 100;
    if (!r.removal) {
        r.signed_obj = json_pack("{s:s}", "value", sp->owner);
        r.value = json_object_get(r.signed_obj, "value");
    }
    return r;
}

/* Puts a record built from `sp`; frees it when the store refused it. */
static int put(struct store *s, enum store_mode mode, double now, struct spec sp)
{
    struct record r = mk(&sp);
    char err[256] = "";
    int rc = store_put(s, &r, mode, now, err, sizeof(err));
    if (rc == STORE_OK) {
        assert_null(r.envelope); /* moved in, caller's copy zeroed */
        assert_int_equal(r.seq, 0);
    } else {
        assert_non_null(r.envelope); /* untouched */
        assert_true(err[0] != '\0');
        assert_null(strchr(err, '\n'));
    }
    rec_free(&r);
    return rc;
}

static const nid_t K1 = {{0x10}}, K2 = {{0x20}}, K3 = {{0x30}};

static const char *A = "sip:alice@test.example", *B = "sip:bob@test.example",
                  *C = "sip:carol@test.example";

static uint64_t seq_of(struct store *s, nid_t k, const char *owner)
{
    const struct store_entry *e = store_find(s, &k, owner);
    assert_non_null(e);
    return e->rec->seq;
}

static size_t live(struct store *s, nid_t k, double now)
{
    const struct record *out[8];
    return store_get(s, &k, now, out, 8);
}

static void test_add(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 2)), STORE_E_EXISTS);
    assert_int_equal(seq_of(s, K1, A), 1);
    /* Other owners under the same key are all kept (seed 11.8). */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1)), STORE_OK);
    assert_int_equal(live(s, K1, NOW), 2);
    /* After a removal, ADD works again (the tombstone is fine) with a newer seq. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 3, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 3)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 4)), STORE_OK);
    assert_false(store_find(s, &K1, A)->rec->removal);
    store_free(s);
}

static void test_update(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    /* Nothing under the key: UPDATE creates. */
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW + 1, SP(K1, A, 2)), STORE_OK);
    assert_int_equal(seq_of(s, K1, A), 2);
    assert_true(store_find(s, &K1, A)->touched == NOW + 1);
    /* Someone else's live record and none of ours: not ours to update. */
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, B, 5)), STORE_E_NOT_OWNER);
    assert_null(store_find(s, &K1, B));
    /* Our tombstone is replaced by an update. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K2, B, 2, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K2, B, 3)), STORE_OK);
    assert_int_equal(live(s, K2, NOW), 1);
    /* Only tombstones of others under the key: UPDATE creates. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K2, B, 4, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K2, C, 1)), STORE_OK);
    assert_int_equal(live(s, K2, NOW), 1);
    store_free(s);
}

static void test_remove(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    /* Nothing there. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 1, .removal = true)), STORE_E_NOT_FOUND);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    /* Bob has nothing under K1, Alice has. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, B, 9, .removal = true)), STORE_E_NOT_OWNER);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 2, .removal = true)), STORE_OK);
    const struct store_entry *e = store_find(s, &K1, A);
    assert_non_null(e);
    assert_true(e->rec->removal);          /* kept as a tombstone ... */
    assert_int_equal(live(s, K1, NOW), 0); /* ... never returned by get */
    /* Removing again: Alice has no live record, nobody else either. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 3, .removal = true)), STORE_E_NOT_FOUND);
    store_free(s);
}

static void test_modes_refused(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1, .removal = true)), STORE_E_MODE);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 1, .removal = true)), STORE_E_MODE);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 1)), STORE_E_MODE);
    assert_int_equal(put(s, (enum store_mode)42, NOW, SP(K1, A, 1)), STORE_E_MODE);
    /* Expired on arrival, in every mode. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1, .expires = -1)), STORE_E_EXPIRED);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 1, .expires = -5)), STORE_E_EXPIRED);
    struct store_stats st;
    store_stats(s, NOW, &st);
    assert_int_equal(st.keys, 0);
    store_free(s);
}

static void test_replica(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    /* A replica creates, whatever else is under the key. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 5)), STORE_OK);
    /* Equal or older: stale ("already have it"). */
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 5)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 4)), STORE_E_STALE);
    /* Newer tombstone wins over a live record, newer record over a tombstone. */
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 6, .removal = true)), STORE_OK);
    assert_true(store_find(s, &K1, A)->rec->removal);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 6)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 7)), STORE_OK);
    assert_false(store_find(s, &K1, A)->rec->removal);
    /* A replicated tombstone can arrive first. */
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K2, C, 3, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K2, C, 2)), STORE_E_STALE);
    store_free(s);
}

static void test_stale_and_replay(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 5)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 5)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 4)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 6)), STORE_OK);
    /* Removed at 7: replaying 6 (or 5) in any mode is refused by the tombstone. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 7, .removal = true)), STORE_OK);
    for (enum store_mode m = STORE_ADD; m <= STORE_REPLICA; m++) {
        if (m == STORE_REMOVE)
            continue;
        assert_int_equal(put(s, m, NOW, SP(K1, A, 6)), STORE_E_STALE);
    }
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 7, .removal = true)), STORE_E_STALE);
    assert_int_equal(live(s, K1, NOW), 0);
    /* The stale error names both numbers. */
    struct spec sp = SP(K1, A, 3);
    struct record r = mk(&sp);
    char err[256];
    assert_int_equal(store_put(s, &r, STORE_ADD, NOW, err, sizeof(err)), STORE_E_STALE);
    assert_non_null(strstr(err, "7"));
    assert_non_null(strstr(err, "3"));
    assert_non_null(strstr(err, A));
    rec_free(&r);
    /* Once the tombstone has expired, an older seq still does not come back (rollback, below);
     * a newer one is welcome. */
    assert_int_equal(put(s, STORE_ADD, NOW + 3600, SP(K1, A, 1, .expires = 7200)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW + 3600, SP(K1, A, 8, .expires = 7200)), STORE_OK);
    store_free(s);
}

/* The replay of issue 15 item 13: seq 5 with a long life, seq 6 with a short one; once 6 has
 * expired, 5 is still valid and must not take its place, in any mode (replication and
 * hand-offs come in as STORE_REPLICA), before or after the expired entry is purged. */
static void test_rollback_after_expiry(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 5, .expires = 3600)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 6, .expires = 2)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1, .expires = 3600)), STORE_OK);
    assert_int_equal(live(s, K1, NOW + 3), 1); /* 6 has expired: only bob's is left */

    for (enum store_mode m = STORE_ADD; m <= STORE_REPLICA; m++)
        if (m != STORE_REMOVE)
            assert_int_equal(put(s, m, NOW + 3, SP(K1, A, 5, .expires = 3600)), STORE_E_STALE);

    assert_int_equal(store_expire(s, NOW + 3), 1);
    assert_null(store_find(s, &K1, A));
    struct store_stats st;
    store_stats(s, NOW + 3, &st);
    assert_int_equal(st.marks, 1);
    for (enum store_mode m = STORE_ADD; m <= STORE_REPLICA; m++)
        if (m != STORE_REMOVE)
            assert_int_equal(put(s, m, NOW + 10, SP(K1, A, 5, .expires = 3600)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_REPLICA, NOW + 10, SP(K1, A, 6, .expires = 3600)), STORE_E_STALE);
    /* The refusal says why, with both numbers. */
    struct spec sp = SP(K1, A, 5, .expires = 3600);
    struct record r = mk(&sp);
    char err[256];
    assert_int_equal(store_put(s, &r, STORE_UPDATE, NOW + 10, err, sizeof(err)), STORE_E_STALE);
    assert_non_null(strstr(err, "expired with seq 6"));
    assert_non_null(strstr(err, "this one has 5"));
    rec_free(&r);
    assert_int_equal(live(s, K1, NOW + 10), 1);

    /* The owner's next record is welcome, and takes the mark's place. */
    assert_int_equal(put(s, STORE_ADD, NOW + 10, SP(K1, A, 7, .expires = 3600)), STORE_OK);
    store_stats(s, NOW + 10, &st);
    assert_int_equal(st.marks, 0);
    assert_int_equal(seq_of(s, K1, A), 7);
    store_free(s);
}

/* The same with a removal statement that expires before the record it removed. */
static void test_rollback_after_tombstone(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, A, 5, .expires = 3600)), STORE_OK);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K2, A, 6, .expires = 2, .removal = true)),
                     STORE_OK);
    assert_int_equal(store_expire(s, NOW + 3), 1);
    assert_int_equal(put(s, STORE_ADD, NOW + 4, SP(K2, A, 5, .expires = 3600)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_REPLICA, NOW + 4, SP(K2, A, 5, .expires = 3600)), STORE_E_STALE);
    assert_int_equal(live(s, K2, NOW + 4), 0);
    store_free(s);
}

/* How long a mark lives: the expired entry's expires plus the longest lifetime, which is the
 * overlay's, or longer when a record accepted here showed a longer one. */
static void test_mark_lifetime(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    store_set_max_lifetime(s, 100);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 6, .expires = 2)), STORE_OK);
    assert_int_equal(store_expire(s, NOW + 2), 1);
    assert_int_equal(put(s, STORE_ADD, NOW + 101, SP(K1, A, 5, .expires = 150)), STORE_E_STALE);
    struct store_stats st;
    assert_int_equal(store_expire(s, NOW + 102), 0);
    store_stats(s, NOW + 102, &st);
    assert_int_equal(st.marks, 0); /* 2 + 100: every older record has expired by now */
    assert_int_equal(put(s, STORE_ADD, NOW + 102, SP(K1, A, 5, .expires = 150)), STORE_OK);

    /* A record accepted with 1000 s to live stretches the horizon to 1000 s. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 1, .expires = 1000)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, B, 9, .expires = 1)), STORE_OK);
    assert_int_equal(store_expire(s, NOW + 1), 1);
    assert_int_equal(put(s, STORE_ADD, NOW + 900, SP(K3, B, 8, .expires = 1000)), STORE_E_STALE);
    assert_int_equal(store_expire(s, NOW + 1002), 2); /* alice's 5 under K1, bob's K2 */
    store_stats(s, NOW + 1002, &st);
    assert_int_equal(st.marks, 2); /* K3's, kept until 1 + 1000, is gone; these two are new */
    assert_int_equal(put(s, STORE_ADD, NOW + 1002, SP(K3, B, 8, .expires = 1500)), STORE_OK);
    store_free(s);
}

/* Marks are bounded; an owner who expires many records loses its own marks, not others'. */
static void test_mark_bounds(void **state)
{
    (void)state;
    struct store *s = store_new(&(struct store_limits){.per_owner = 3, .marks = 5});
    /* Bob's two marks. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 6, .expires = 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 6, .expires = 1)), STORE_OK);
    assert_int_equal(store_expire(s, NOW + 1), 2);
    /* Alice expires records under 10 keys, three at a time (her record quota). */
    for (uint32_t round = 0; round < 4; round++) {
        for (uint32_t i = 0; i < 3; i++)
            assert_int_equal(put(s, STORE_ADD, NOW + 1 + round,
                                 SP(key_n(100 + 3 * round + i), A, 6, .expires = 2 + round)),
                             STORE_OK);
        assert_int_equal(store_expire(s, NOW + 2 + round), 3);
    }
    struct store_stats st;
    store_stats(s, NOW + 6, &st);
    assert_int_equal(st.marks, 5);
    assert_int_equal(st.marks_evicted, 9);
    /* Bob's are still there; alice's newest three too, her oldest are gone. */
    assert_int_equal(put(s, STORE_ADD, NOW + 6, SP(K1, B, 5)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW + 6, SP(K2, B, 5)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW + 6, SP(key_n(111), A, 5)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW + 6, SP(key_n(100), A, 5)), STORE_OK);

    /* The global bound: the oldest go first. */
    struct store *t = store_new(&(struct store_limits){.marks = 2});
    assert_int_equal(put(t, STORE_ADD, NOW, SP(K1, A, 6, .expires = 1)), STORE_OK);
    assert_int_equal(store_expire(t, NOW + 1), 1);
    assert_int_equal(put(t, STORE_ADD, NOW, SP(K2, B, 6, .expires = 2)), STORE_OK);
    assert_int_equal(put(t, STORE_ADD, NOW, SP(K3, C, 6, .expires = 2)), STORE_OK);
    assert_int_equal(store_expire(t, NOW + 2), 2);
    store_stats(t, NOW + 2, &st);
    assert_int_equal(st.marks, 2);
    assert_int_equal(st.marks_evicted, 1);
    assert_int_equal(put(t, STORE_ADD, NOW + 2, SP(K1, A, 5)), STORE_OK);
    assert_int_equal(put(t, STORE_ADD, NOW + 2, SP(K2, B, 5)), STORE_E_STALE);
    store_free(t);
    store_free(s);
}

static bool count_marks(const struct store_mark *m, void *ud)
{
    (void)m;
    (*(size_t *)ud)++;
    return true;
}

/* Marks from other nodes (store_put_mark): the expired record itself, kept when it tells the
 * store something new, refusing replays from then on; a replay that got in is dropped; marks
 * are listed by range; their bytes are bounded. */
static void test_mark_evidence(void **state)
{
    (void)state;
    struct store *s = store_new(&(struct store_limits){.marks_bytes = 250});
    char err[256];
    /* Alice's seq 6 expired elsewhere; here nothing of hers is known. */
    struct spec sp6 = SP(K1, A, 6, .expires = 2);
    struct record r6 = mk(&sp6);
    assert_false(store_knows(s, &K1, A, 6));
    assert_int_equal(store_put_mark(s, &r6, NOW + 1, err, sizeof(err)), STORE_E_MODE); /* live */
    assert_int_equal(store_put_mark(s, &r6, NOW + 3, err, sizeof(err)), STORE_OK);
    assert_true(store_knows(s, &K1, A, 6));
    assert_int_equal(store_put_mark(s, &r6, NOW + 3, err, sizeof(err)), STORE_E_STALE);
    for (enum store_mode m = STORE_ADD; m <= STORE_REPLICA; m++)
        if (m != STORE_REMOVE)
            assert_int_equal(put(s, m, NOW + 4, SP(K1, A, 5, .expires = 3600)), STORE_E_STALE);
    assert_int_equal(put(s, STORE_ADD, NOW + 4, SP(K1, A, 7, .expires = 3600)), STORE_OK);
    assert_true(store_knows(s, &K1, A, 7));
    rec_free(&r6);

    /* A replay that got in before the evidence arrived is dropped by it. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 5, .expires = 3600)), STORE_OK);
    struct spec spb = SP(K2, B, 6, .expires = 2);
    struct record rb = mk(&spb);
    assert_int_equal(store_put_mark(s, &rb, NOW + 3, err, sizeof(err)), STORE_OK);
    assert_null(store_find(s, &K2, B));
    assert_int_equal(live(s, K2, NOW + 3), 0);
    rec_free(&rb);

    /* Too old to matter: expires + the longest lifetime is over. */
    struct spec spo = SP(K3, C, 9, .expires = 2);
    struct record ro = mk(&spo);
    assert_int_equal(
        store_put_mark(s, &ro, NOW + 2 + STORE_MARK_LIFETIME_DEF + 1, err, sizeof(err)),
        STORE_E_EXPIRED);
    rec_free(&ro);

    size_t n = 0;
    store_foreach_mark(s, &K1, &K1, NOW + 3, count_marks, &n);
    assert_int_equal(n, 1); /* bob's under K2 (alice's gave way to her new record) */
    n = 0;
    store_foreach_mark(s, &K2, &K3, NOW + 3, count_marks, &n);
    assert_int_equal(n, 0); /* (K2, K3] holds none */

    /* Bytes: 100 each, 250 at most; the oldest goes. */
    for (uint32_t i = 0; i < 3; i++) {
        struct spec x = SP(key_n(200 + i), C, 3, .expires = 1);
        struct record rx = mk(&x);
        assert_int_equal(store_put_mark(s, &rx, NOW + 3, err, sizeof(err)), STORE_OK);
        rec_free(&rx);
    }
    struct store_stats st;
    store_stats(s, NOW + 3, &st);
    assert_int_equal(st.marks, 2);
    assert_int_equal(st.mark_bytes, 200);
    assert_false(store_knows(s, &K2, B, 6));
    store_free(s);
}

static void test_no_update(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1, .expires = 100, .no_update = true)),
                     STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 2)), STORE_E_NO_UPDATE);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 2, .removal = true)), STORE_E_NO_UPDATE);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 2)), STORE_E_NO_UPDATE);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 2, .removal = true)), STORE_E_NO_UPDATE);
    /* Stale comes first: a replica of the same record is "already have it". */
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, A, 1)), STORE_E_STALE);
    assert_int_equal(seq_of(s, K1, A), 1);
    /* Other owners are not affected. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1)), STORE_OK);
    /* Once it has expired it no longer holds anything: Alice has no record under K1 any more
     * (so UPDATE is not hers to use while Bob's is live, but ADD is). */
    assert_int_equal(put(s, STORE_UPDATE, NOW + 100, SP(K1, A, 2)), STORE_E_NOT_OWNER);
    assert_int_equal(put(s, STORE_ADD, NOW + 100, SP(K1, A, 2)), STORE_OK);
    assert_false(store_find(s, &K1, A)->rec->no_update);
    store_free(s);
}

static void test_quota_key(void **state)
{
    (void)state;
    struct store_limits lim = {.per_key = 2};
    struct store *s = store_new(&lim);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, C, 1)), STORE_E_QUOTA_KEY);
    assert_int_equal(put(s, STORE_REPLICA, NOW, SP(K1, C, 1)), STORE_E_QUOTA_KEY);
    /* Replacing one's own counts nothing more. */
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 2)), STORE_OK);
    /* A tombstone still counts. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, B, 2, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, C, 1)), STORE_E_QUOTA_KEY);
    /* Other keys are separate. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, C, 1)), STORE_OK);
    /* A dropped entry frees its place. */
    assert_true(store_drop(s, &K1, B));
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, C, 1)), STORE_OK);
    store_free(s);
}

static void test_quota_owner(void **state)
{
    (void)state;
    struct store_limits lim = {.per_owner = 2};
    struct store *s = store_new(&lim);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, A, 1)), STORE_E_QUOTA_OWNER);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 2)), STORE_OK);
    /* Tombstones count toward the owner's quota too. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, A, 3, .removal = true)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, A, 1)), STORE_E_QUOTA_OWNER);
    /* Until they go. */
    assert_int_equal(store_expire(s, NOW + 3600), 3);
    assert_int_equal(put(s, STORE_ADD, NOW + 3600, SP(K3, A, 1, .expires = 7200)), STORE_OK);
    store_free(s);
}

/* A P2P proxy the overlay document names writes for a whole domain: its own, larger quota. */
static void test_quota_proxy(void **state)
{
    (void)state;
    struct store_limits lim = {.per_owner = 1, .per_proxy = 2};
    struct store *s = store_new(&lim);
    const char *px[] = {B};
    assert_int_equal(store_set_proxies(s, px, 1), 0);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, A, 1)), STORE_E_QUOTA_OWNER);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 1)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, B, 1)), STORE_E_QUOTA_OWNER);
    store_free(s);
}

static void test_quota_bytes(void **state)
{
    (void)state;
    struct store_limits lim = {.per_owner_bytes = 1000};
    struct store *s = store_new(&lim);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1, .size = 400)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, A, 1, .size = 400)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, A, 1, .size = 300)), STORE_E_QUOTA_OWNER);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K3, A, 1, .size = 200)), STORE_OK);
    /* Replacing counts only the difference: 400 -> 400 fits, 400 -> 401 does not. */
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 2, .size = 400)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 3, .size = 401)), STORE_E_QUOTA_OWNER);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K1, A, 3, .size = 100)), STORE_OK);
    assert_int_equal(put(s, STORE_UPDATE, NOW, SP(K2, A, 2, .size = 700)), STORE_OK);
    /* Bob has his own budget. */
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1, .size = 1000)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 1, .size = 1)), STORE_E_QUOTA_OWNER);
    struct store_stats st;
    store_stats(s, NOW, &st);
    assert_int_equal(st.bytes, 100 + 700 + 200 + 1000);
    /* Dropping frees the budget. */
    assert_true(store_drop(s, &K1, B));
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, B, 1, .size = 1)), STORE_OK);
    store_free(s);
}

static void test_expire_and_stats(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1, .expires = 10, .size = 10)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 1, .expires = 20, .size = 20)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K2, A, 1, .expires = 30, .size = 30)), STORE_OK);
    assert_int_equal(
        put(s, STORE_REMOVE, NOW, SP(K2, A, 2, .expires = 15, .removal = true, .size = 5)),
        STORE_OK);
    struct store_stats st;
    store_stats(s, NOW, &st);
    assert_int_equal(st.keys, 2);
    assert_int_equal(st.records, 2);
    assert_int_equal(st.tombstones, 1);
    assert_int_equal(st.bytes, 10 + 20 + 5);
    /* Expired but not yet dropped: left out of get and of the live count. */
    store_stats(s, NOW + 10, &st);
    assert_int_equal(st.records, 1);
    assert_int_equal(live(s, K1, NOW + 10), 1);
    assert_non_null(store_find(s, &K1, A));

    assert_int_equal(store_expire(s, NOW + 9), 0);
    assert_int_equal(store_expire(s, NOW + 15), 2); /* alice's K1 record, the K2 tombstone */
    assert_null(store_find(s, &K1, A));
    assert_null(store_find(s, &K2, A));
    store_stats(s, NOW + 15, &st);
    assert_int_equal(st.keys, 1);
    assert_int_equal(st.records, 1);
    assert_int_equal(st.tombstones, 0);
    assert_int_equal(st.bytes, 20);
    assert_int_equal(store_expire(s, NOW + 20), 1);
    store_stats(s, NOW + 20, &st);
    assert_int_equal(st.keys, 0);
    assert_int_equal(st.bytes, 0);
    store_free(s);
}

static void test_get_order(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    const char *owners[] = {"sip:zoe@x", "sip:carol@x", "sip:Bob@x", "sip:alice@x", "sip:bob@x"};
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, owners[i], 1)), STORE_OK);
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(K1, "sip:carol@x", 2, .removal = true)),
                     STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, "sip:dave@x", 1, .expires = 5)), STORE_OK);
    const struct record *out[8];
    assert_int_equal(store_get(s, &K1, NOW, out, 8), 5);
    const char *want[] = {"sip:Bob@x", "sip:alice@x", "sip:bob@x", "sip:dave@x", "sip:zoe@x"};
    for (size_t i = 0; i < 5; i++)
        assert_string_equal(out[i]->owner, want[i]);
    /* dave's has expired at NOW + 5; max bounds what is written, not the count. */
    assert_int_equal(store_get(s, &K1, NOW + 5, out, 2), 4);
    assert_string_equal(out[0]->owner, "sip:Bob@x");
    assert_string_equal(out[1]->owner, "sip:alice@x");
    assert_int_equal(store_get(s, &K1, NOW, NULL, 0), 5);
    assert_int_equal(store_get(s, &K2, NOW, out, 8), 0);
    /* Stored records keep their envelope, not the parsed signed text (store.h). */
    assert_null(out[0]->value);
    assert_null(out[0]->signed_obj);
    assert_non_null(out[0]->envelope);
    store_free(s);
}

struct visit {
    nid_t keys[64];
    char owners[64][REC_OWNER_MAX + 1];
    size_t n, stop_after;
};

static bool visit_fn(const struct store_entry *e, void *ud)
{
    struct visit *v = ud;
    assert_true(v->n < 64);
    v->keys[v->n] = e->rec->key;
    snprintf(v->owners[v->n], sizeof(v->owners[0]), "%s", e->rec->owner);
    v->n++;
    return v->stop_after == 0 || v->n < v->stop_after;
}

static void test_foreach_range(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    uint32_t ks[] = {0xf0000000, 0x10000000, 0x80000000, 0x20000000, 0x00000000};
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(put(s, STORE_ADD, NOW, SP(key_n(ks[i]), B, 1)), STORE_OK);
        assert_int_equal(put(s, STORE_ADD, NOW, SP(key_n(ks[i]), A, 1)), STORE_OK);
    }
    /* A tombstone is visited too. */
    assert_int_equal(put(s, STORE_REMOVE, NOW, SP(key_n(0x10000000), A, 2, .removal = true)),
                     STORE_OK);

    /* (0x80.., 0x20..]: wraps past zero; 0x80 itself is left out, 0x20 is in. */
    struct visit v = {0};
    nid_t lo = key_n(0x80000000), hi = key_n(0x20000000);
    store_foreach_range(s, &lo, &hi, visit_fn, &v);
    uint32_t want1[] = {0xf0000000, 0x00000000, 0x10000000, 0x20000000};
    assert_int_equal(v.n, 8);
    for (size_t i = 0; i < 8; i++) {
        nid_t k = key_n(want1[i / 2]);
        assert_true(nid_eq(&v.keys[i], &k));
        assert_string_equal(v.owners[i], i % 2 ? B : A);
    }

    /* lo == hi: the whole ring, starting just after lo and ending with lo. */
    memset(&v, 0, sizeof(v));
    store_foreach_range(s, &hi, &hi, visit_fn, &v);
    uint32_t want2[] = {0x80000000, 0xf0000000, 0x00000000, 0x10000000, 0x20000000};
    assert_int_equal(v.n, 10);
    for (size_t i = 0; i < 10; i++) {
        nid_t k = key_n(want2[i / 2]);
        assert_true(nid_eq(&v.keys[i], &k));
    }

    /* No wrap: (0x10.., 0x80..]. */
    memset(&v, 0, sizeof(v));
    lo = key_n(0x10000000);
    hi = key_n(0x80000000);
    store_foreach_range(s, &lo, &hi, visit_fn, &v);
    assert_int_equal(v.n, 4);
    nid_t k20 = key_n(0x20000000), k80 = key_n(0x80000000);
    assert_true(nid_eq(&v.keys[0], &k20));
    assert_true(nid_eq(&v.keys[3], &k80));

    /* An empty interval between keys, and stopping early. */
    memset(&v, 0, sizeof(v));
    lo = key_n(0x20000000);
    hi = key_n(0x70000000);
    store_foreach_range(s, &lo, &hi, visit_fn, &v);
    assert_int_equal(v.n, 0);
    memset(&v, 0, sizeof(v));
    v.stop_after = 3;
    store_foreach_range(s, &k20, &k20, visit_fn, &v);
    assert_int_equal(v.n, 3);

    /* The top of the ring: (ff..ff, 0] holds only key 0. */
    memset(&v, 0, sizeof(v));
    memset(&lo, 0xff, sizeof(lo));
    hi = key_n(0);
    store_foreach_range(s, &lo, &hi, visit_fn, &v);
    assert_int_equal(v.n, 2);
    assert_true(nid_eq(&v.keys[0], &hi));

    struct store *empty = store_new(NULL);
    memset(&v, 0, sizeof(v));
    store_foreach_range(empty, &lo, &lo, visit_fn, &v);
    assert_int_equal(v.n, 0);
    store_free(empty);
    store_free(s);
}

static void test_drop_and_touch(void **state)
{
    (void)state;
    struct store *s = store_new(NULL);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 5)), STORE_OK);
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, B, 5)), STORE_OK);
    assert_true(store_find(s, &K1, A)->touched == NOW);
    assert_true(store_touch(s, &K1, A, NOW + 42.5));
    assert_true(store_find(s, &K1, A)->touched == NOW + 42.5);
    assert_true(store_find(s, &K1, B)->touched == NOW);
    assert_false(store_touch(s, &K1, C, NOW));
    assert_false(store_touch(s, &K2, A, NOW));

    /* Dropped without a tombstone: an older seq is welcome again. */
    assert_true(store_drop(s, &K1, A));
    assert_false(store_drop(s, &K1, A));
    assert_false(store_drop(s, &K2, A));
    assert_null(store_find(s, &K1, A));
    assert_int_equal(put(s, STORE_ADD, NOW, SP(K1, A, 1)), STORE_OK);
    assert_true(store_drop(s, &K1, A));
    assert_true(store_drop(s, &K1, B));
    struct store_stats st;
    store_stats(s, NOW, &st);
    assert_int_equal(st.keys, 0);
    assert_int_equal(st.records, 0);
    store_free(s);
    store_free(NULL);
}

static void test_codes(void **state)
{
    (void)state;
    static const struct {
        int code;
        const char *str;
    } codes[] = {
        {STORE_OK, "ok"},
        {STORE_E_EXISTS, "exists"},
        {STORE_E_NOT_OWNER, "not-owner"},
        {STORE_E_NOT_FOUND, "not-found"},
        {STORE_E_STALE, "stale"},
        {STORE_E_NO_UPDATE, "no-update"},
        {STORE_E_EXPIRED, "expired"},
        {STORE_E_MODE, "bad-mode"},
        {STORE_E_QUOTA_KEY, "quota-key"},
        {STORE_E_QUOTA_OWNER, "quota-owner"},
        {STORE_E_NOMEM, "internal"},
        {-77, "internal"},
    };
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        assert_string_equal(store_strcode(codes[i].code), codes[i].str);
    bool ok = false;
    assert_int_equal(store_mode_from_str("add", &ok), STORE_ADD);
    assert_true(ok);
    assert_int_equal(store_mode_from_str("update", &ok), STORE_UPDATE);
    assert_true(ok);
    assert_int_equal(store_mode_from_str("remove", &ok), STORE_REMOVE);
    assert_true(ok);
    store_mode_from_str("replica", &ok); /* not a wire mode */
    assert_false(ok);
    store_mode_from_str("ADD", &ok);
    assert_false(ok);
    store_mode_from_str(NULL, &ok);
    assert_false(ok);
    assert_string_equal(store_mode_str(STORE_ADD), "add");
    assert_string_equal(store_mode_str(STORE_UPDATE), "update");
    assert_string_equal(store_mode_str(STORE_REMOVE), "remove");
    assert_string_equal(store_mode_str(STORE_REPLICA), "replica");
}

static bool under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "valgrind");
}

static bool sanitized(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return true;
#else
    return false;
#endif
#else
    return false;
#endif
}

/* CPU time of this process: what the store costs, whatever else the machine runs. */
static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *st)
{
    *st ^= *st << 13;
    *st ^= *st >> 7;
    *st ^= *st << 17;
    return *st;
}

struct order_check {
    nid_t prev;
    size_t n;
    bool bad;
};

static bool order_fn(const struct store_entry *e, void *ud)
{
    struct order_check *c = ud;
    if (c->n > 0 && nid_cmp(&c->prev, &e->rec->key) >= 0)
        c->bad = true;
    c->prev = e->rec->key;
    c->n++;
    return true;
}

#define BIG 100000

static void test_scale(void **state)
{
    (void)state;
    struct store *s = store_new(&(struct store_limits){.per_owner = BIG});
    nid_t *keys = malloc(BIG * sizeof(*keys));
    assert_non_null(keys);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < BIG; i++)
        for (size_t j = 0; j < NID_LEN; j += 8) {
            uint64_t x = xorshift(&rng);
            memcpy(&keys[i].b[j], &x, NID_LEN - j < 8 ? NID_LEN - j : 8);
        }

    /* Records built up front, so the timing is the store's. */
    struct record *recs = malloc(BIG * sizeof(*recs));
    assert_non_null(recs);
    char owner[64];
    for (size_t i = 0; i < BIG; i++) {
        snprintf(owner, sizeof(owner), "sip:user%zu@test.example", i % 1000);
        memset(&recs[i], 0, sizeof(recs[i]));
        recs[i].key = keys[i];
        snprintf(recs[i].owner, sizeof(recs[i].owner), "%s", owner);
        recs[i].seq = 1;
        recs[i].expires = (int64_t)NOW + 3600;
        recs[i].size = 200;
    }

    double t0 = mono();
    char err[256];
    for (size_t i = 0; i < BIG; i++)
        assert_int_equal(store_put(s, &recs[i], STORE_ADD, NOW, err, sizeof(err)), STORE_OK);
    double t_put = mono() - t0;

    t0 = mono();
    const struct record *out[4];
    for (size_t i = 0; i < BIG; i++)
        assert_int_equal(store_get(s, &keys[i], NOW, out, 4), 1);
    double t_get = mono() - t0;

    t0 = mono();
    struct order_check c = {0};
    nid_t zero;
    memset(&zero, 0, sizeof(zero));
    store_foreach_range(s, &zero, &zero, order_fn, &c);
    double t_each = mono() - t0;
    assert_int_equal(c.n, BIG);
    assert_false(c.bad);

    struct store_stats st;
    store_stats(s, NOW, &st);
    assert_int_equal(st.keys, BIG);
    assert_int_equal(st.records, BIG);
    assert_int_equal(st.bytes, (size_t)BIG * 200);

    t0 = mono();
    assert_int_equal(store_expire(s, NOW + 3600), BIG);
    double t_exp = mono() - t0;
    print_message("%d records: put %.0f ms, get %.0f ms, foreach %.0f ms, expire %.0f ms\n", BIG,
                  t_put * 1e3, t_get * 1e3, t_each * 1e3, t_exp * 1e3);
    /* Well under a second in a normal build; sanitizers and valgrind are allowed their cost. */
    if (!under_valgrind())
        assert_true(t_put + t_get + t_each + t_exp < (sanitized() ? 4.0 : 1.0));
    store_stats(s, NOW, &st);
    assert_int_equal(st.keys, 0);
    free(recs);
    free(keys);
    store_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_update),
        cmocka_unit_test(test_remove),
        cmocka_unit_test(test_modes_refused),
        cmocka_unit_test(test_replica),
        cmocka_unit_test(test_stale_and_replay),
        cmocka_unit_test(test_rollback_after_expiry),
        cmocka_unit_test(test_rollback_after_tombstone),
        cmocka_unit_test(test_mark_lifetime),
        cmocka_unit_test(test_mark_bounds),
        cmocka_unit_test(test_no_update),
        cmocka_unit_test(test_quota_key),
        cmocka_unit_test(test_quota_owner),
        cmocka_unit_test(test_quota_bytes),
        cmocka_unit_test(test_quota_proxy),
        cmocka_unit_test(test_expire_and_stats),
        cmocka_unit_test(test_get_order),
        cmocka_unit_test(test_foreach_range),
        cmocka_unit_test(test_drop_and_touch),
        cmocka_unit_test(test_codes),
        cmocka_unit_test(test_mark_evidence),
        cmocka_unit_test(test_scale),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
