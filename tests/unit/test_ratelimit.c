/*
 * The failure limiter: blocking at the limit with the right retry time, the
 * window's end, no reset on success, key independence, bounded memory and
 * eviction that never locks out a fresh key, and a comparison with a naive
 * model over random operations (which exercises the hash table's deletions).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "ratelimit.h"

#define EPS 1e-9

static void test_bad_arguments(void **state)
{
    assert_null(ratelimit_new(0, 60, 10));
    assert_null(ratelimit_new(3, 0, 10));
    assert_null(ratelimit_new(3, -1, 10));
    assert_null(ratelimit_new(3, NAN, 10));
    assert_null(ratelimit_new(3, 60, 0));
    ratelimit_free(NULL);
}

static void test_under_limit(void **state)
{
    struct ratelimit *rl = ratelimit_new(3, 60, 10);
    assert_non_null(rl);
    double retry = -1;
    assert_false(ratelimit_blocked(rl, "user:alice", 100, &retry));
    assert_true(retry == 0);
    ratelimit_failure(rl, "user:alice", 100);
    ratelimit_failure(rl, "user:alice", 101);
    assert_false(ratelimit_blocked(rl, "user:alice", 102, &retry));
    assert_true(retry == 0);
    assert_int_equal(ratelimit_size(rl), 1);
    ratelimit_free(rl);
}

static void test_at_limit_and_retry_after(void **state)
{
    struct ratelimit *rl = ratelimit_new(3, 60, 10);
    double retry = 0;
    ratelimit_failure(rl, "user:alice", 100);
    ratelimit_failure(rl, "user:alice", 101);
    ratelimit_failure(rl, "user:alice", 102);
    assert_true(ratelimit_blocked(rl, "user:alice", 103, &retry));
    /* The window opened at the first failure (100) and ends at 160. */
    assert_true(retry > 57 - EPS && retry < 57 + EPS);
    assert_true(ratelimit_blocked(rl, "user:alice", 159.5, &retry));
    assert_true(retry > 0.5 - EPS && retry < 0.5 + EPS);
    assert_true(ratelimit_blocked(rl, "user:alice", 159.5, NULL));
    ratelimit_free(rl);
}

/* The login server's slow-down: turns booked one window apart, up to a longest wait. */
static void test_reserve_spaces_turns(void **state)
{
    struct ratelimit *rl = ratelimit_new(1, 2, 10);
    double d = -1;
    assert_true(ratelimit_reserve(rl, "alice", 100, 10, &d));
    assert_true(d == 0);
    /* Three more at once: 2, 4 and 6 s later. */
    assert_true(ratelimit_reserve(rl, "alice", 100.5, 10, &d));
    assert_true(d > 1.5 - EPS && d < 1.5 + EPS);
    assert_true(ratelimit_reserve(rl, "alice", 100.5, 10, &d));
    assert_true(d > 3.5 - EPS && d < 3.5 + EPS);
    assert_true(ratelimit_reserve(rl, "alice", 100.5, 10, &d));
    assert_true(d > 5.5 - EPS && d < 5.5 + EPS);
    /* A booked turn counts as blocked until its window ends (106 + 2). */
    assert_true(ratelimit_blocked(rl, "alice", 101, &d));
    assert_true(d > 7 - EPS && d < 7 + EPS);
    /* Beyond the longest wait: refused, nothing booked, the wait said. */
    assert_true(ratelimit_reserve(rl, "alice", 100.5, 7.5, &d));
    assert_true(d > 7.5 - EPS && d < 7.5 + EPS);
    assert_false(ratelimit_reserve(rl, "alice", 100.5, 7.5, &d));
    assert_true(d > 9.5 - EPS && d < 9.5 + EPS);
    assert_false(ratelimit_reserve(rl, "alice", 100.5, 7.5, &d));
    assert_true(d > 9.5 - EPS && d < 9.5 + EPS);
    /* Other keys are not affected; once every booking has passed, at once again. */
    assert_true(ratelimit_reserve(rl, "bob", 100.5, 10, &d));
    assert_true(d == 0);
    assert_true(ratelimit_reserve(rl, "alice", 110, 10, &d));
    assert_true(d == 0);
    assert_int_equal(ratelimit_size(rl), 1); /* bob's window ended and was purged */
    ratelimit_free(rl);
}

/* With room for more than one failure per window, turns fill a window before the next. */
static void test_reserve_fills_window(void **state)
{
    struct ratelimit *rl = ratelimit_new(2, 10, 4);
    double d = -1;
    assert_true(ratelimit_reserve(rl, "k", 0, 100, &d) && d == 0);
    assert_true(ratelimit_reserve(rl, "k", 1, 100, &d) && d == 0);
    assert_true(ratelimit_reserve(rl, "k", 2, 100, &d));
    assert_true(d > 8 - EPS && d < 8 + EPS);
    assert_true(ratelimit_reserve(rl, "k", 2, 100, &d));
    assert_true(d > 8 - EPS && d < 8 + EPS);
    assert_true(ratelimit_reserve(rl, "k", 2, 100, &d));
    assert_true(d > 18 - EPS && d < 18 + EPS);
    /* Booked entries are bounded like any other: a full table still takes new keys. */
    for (int i = 0; i < 10; i++) {
        char key[16];
        snprintf(key, sizeof(key), "x%d", i);
        assert_true(ratelimit_reserve(rl, key, 3, 100, &d) && d == 0);
        assert_true(ratelimit_size(rl) <= 4);
    }
    ratelimit_free(rl);
}

static void test_unblocked_after_window(void **state)
{
    struct ratelimit *rl = ratelimit_new(3, 60, 10);
    double retry = -1;
    for (int i = 0; i < 3; i++)
        ratelimit_failure(rl, "user:alice", 100 + i);
    assert_true(ratelimit_blocked(rl, "user:alice", 159.9, &retry));
    assert_false(ratelimit_blocked(rl, "user:alice", 160, &retry));
    assert_true(retry == 0);
    /* A new window: the count restarts at the next failure. */
    ratelimit_failure(rl, "user:alice", 170);
    ratelimit_failure(rl, "user:alice", 171);
    assert_false(ratelimit_blocked(rl, "user:alice", 172, &retry));
    ratelimit_failure(rl, "user:alice", 172);
    assert_true(ratelimit_blocked(rl, "user:alice", 173, &retry));
    assert_true(retry > 57 - EPS && retry < 57 + EPS); /* 170 + 60 - 173 */
    ratelimit_free(rl);
}

static void test_success_does_not_reset(void **state)
{
    /* There is no "success" call: a right guess during a lockout changes nothing, and more
     * failures during it neither lift it nor extend it past the window's end. */
    struct ratelimit *rl = ratelimit_new(2, 30, 10);
    double retry;
    ratelimit_failure(rl, "user:alice", 0);
    ratelimit_failure(rl, "user:alice", 1);
    for (int t = 2; t < 30; t++) {
        assert_true(ratelimit_blocked(rl, "user:alice", t, &retry));
        assert_true(retry > 30 - t - EPS && retry < 30 - t + EPS);
        ratelimit_failure(rl, "user:alice", t);
    }
    assert_false(ratelimit_blocked(rl, "user:alice", 30, &retry));
    ratelimit_free(rl);
}

static void test_keys_independent(void **state)
{
    struct ratelimit *rl = ratelimit_new(2, 60, 10);
    ratelimit_failure(rl, "user:alice", 0);
    ratelimit_failure(rl, "user:alice", 0);
    ratelimit_failure(rl, "addr:203.0.113.5", 0);
    assert_true(ratelimit_blocked(rl, "user:alice", 1, NULL));
    assert_false(ratelimit_blocked(rl, "user:bob", 1, NULL));
    assert_false(ratelimit_blocked(rl, "user:alic", 1, NULL));
    assert_false(ratelimit_blocked(rl, "user:alice2", 1, NULL));
    assert_false(ratelimit_blocked(rl, "addr:203.0.113.5", 1, NULL));
    assert_false(ratelimit_blocked(rl, "", 1, NULL));
    ratelimit_failure(rl, "addr:203.0.113.5", 2);
    assert_true(ratelimit_blocked(rl, "addr:203.0.113.5", 3, NULL));
    assert_int_equal(ratelimit_size(rl), 2);
    ratelimit_free(rl);
}

static void test_long_keys_share_prefix(void **state)
{
    char a[300], b[300];
    memset(a, 'x', sizeof(a) - 1);
    a[sizeof(a) - 1] = '\0';
    memcpy(b, a, sizeof(b));
    b[200] = 'y'; /* beyond RATELIMIT_KEY_MAX: the same key as far as the limiter goes */
    struct ratelimit *rl = ratelimit_new(2, 60, 10);
    ratelimit_failure(rl, a, 0);
    ratelimit_failure(rl, b, 0);
    assert_true(ratelimit_blocked(rl, a, 1, NULL));
    assert_int_equal(ratelimit_size(rl), 1);
    b[RATELIMIT_KEY_MAX - 1] = 'y'; /* within it: distinct */
    assert_false(ratelimit_blocked(rl, b, 1, NULL));
    ratelimit_free(rl);
}

static void test_eviction_oldest_window(void **state)
{
    struct ratelimit *rl = ratelimit_new(2, 100, 4);
    const char *keys[] = {"k:a", "k:b", "k:c", "k:d"};
    for (int i = 0; i < 4; i++) {
        ratelimit_failure(rl, keys[i], i);
        ratelimit_failure(rl, keys[i], i);
    }
    for (int i = 0; i < 4; i++)
        assert_true(ratelimit_blocked(rl, keys[i], 10, NULL));
    assert_int_equal(ratelimit_size(rl), 4);
    /* Full, nothing expired: the oldest window (k:a) goes, and only it. */
    ratelimit_failure(rl, "k:e", 10);
    assert_int_equal(ratelimit_size(rl), 4);
    assert_false(ratelimit_blocked(rl, "k:a", 11, NULL)); /* more lenient for the evicted */
    assert_false(ratelimit_blocked(rl, "k:e", 11, NULL)); /* a fresh key is never blocked */
    for (int i = 1; i < 4; i++)
        assert_true(ratelimit_blocked(rl, keys[i], 11, NULL));
    /* The next newcomer evicts the next oldest window, k:b. */
    ratelimit_failure(rl, "k:f", 12);
    assert_int_equal(ratelimit_size(rl), 4);
    assert_false(ratelimit_blocked(rl, "k:b", 12, NULL));
    assert_true(ratelimit_blocked(rl, "k:c", 12, NULL));
    assert_true(ratelimit_blocked(rl, "k:d", 12, NULL));
    ratelimit_free(rl);
}

static void test_eviction_expired_first(void **state)
{
    struct ratelimit *rl = ratelimit_new(2, 10, 4);
    const char *keys[] = {"k:a", "k:b", "k:c", "k:d"};
    for (int i = 0; i < 4; i++) {
        double t = i < 2 ? 0 : 8;
        ratelimit_failure(rl, keys[i], t);
        ratelimit_failure(rl, keys[i], t);
    }
    /* At 11, k:a and k:b have ended (and are dropped); k:c and k:d, still blocked, stay. */
    ratelimit_failure(rl, "k:e", 11);
    assert_int_equal(ratelimit_size(rl), 3);
    assert_true(ratelimit_blocked(rl, "k:c", 11, NULL));
    assert_true(ratelimit_blocked(rl, "k:d", 11, NULL));
    assert_false(ratelimit_blocked(rl, "k:e", 11, NULL));
    ratelimit_free(rl);
}

static void test_clock_going_back(void **state)
{
    /* Not the intended use, but it must stay consistent: an ended window hidden behind a
     * younger head restarts on its next failure. */
    struct ratelimit *rl = ratelimit_new(2, 50, 4);
    ratelimit_failure(rl, "k:a", 100);
    ratelimit_failure(rl, "k:b", 0);
    ratelimit_failure(rl, "k:b", 0);
    assert_true(ratelimit_blocked(rl, "k:b", 10, NULL));
    assert_false(ratelimit_blocked(rl, "k:b", 55, NULL));
    ratelimit_failure(rl, "k:b", 55);
    assert_false(ratelimit_blocked(rl, "k:b", 56, NULL));
    ratelimit_failure(rl, "k:b", 56);
    double retry;
    assert_true(ratelimit_blocked(rl, "k:b", 60, &retry));
    assert_true(retry > 45 - EPS && retry < 45 + EPS);
    assert_int_equal(ratelimit_size(rl), 2);
    ratelimit_failure(rl, "k:c", 200); /* everything before has ended */
    assert_int_equal(ratelimit_size(rl), 1);
    ratelimit_free(rl);
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_many_keys_bounded_and_fast(void **state)
{
    struct ratelimit *rl = ratelimit_new(1, 3600, 1000);
    char key[64];
    double t0 = mono();
    for (int i = 0; i < 100000; i++) {
        snprintf(key, sizeof(key), "addr:10.%d.%d.%d", i >> 16 & 255, i >> 8 & 255, i & 255);
        double now = i * 0.001;
        assert_false(ratelimit_blocked(rl, key, now, NULL));
        ratelimit_failure(rl, key, now);
        assert_true(ratelimit_size(rl) <= 1000);
    }
    double elapsed = mono() - t0;
    assert_int_equal(ratelimit_size(rl), 1000);
    /* The newest 1000 keys are tracked (and blocked); older ones were evicted. */
    for (int i = 99000; i < 100000; i++) {
        snprintf(key, sizeof(key), "addr:10.%d.%d.%d", i >> 16 & 255, i >> 8 & 255, i & 255);
        assert_true(ratelimit_blocked(rl, key, 100, NULL));
    }
    assert_false(ratelimit_blocked(rl, "addr:10.0.0.0", 100, NULL));
    int evicted = 99000 - 1; /* the newest evicted key */
    snprintf(key, sizeof(key), "addr:10.%d.%d.%d", evicted >> 16 & 255, evicted >> 8 & 255,
             evicted & 255);
    assert_false(ratelimit_blocked(rl, key, 100, NULL));
    /* O(1) per operation: 300k operations take milliseconds; allow for valgrind. */
    assert_true(elapsed < 5.0);
    ratelimit_free(rl);
}

/* ---- a naive model: linear search, same rules ---- */

#define MODEL_KEYS 16

struct model_entry {
    char key[16];
    double start;
    unsigned count;
    unsigned long order; /* when the window opened, for ties in start */
    int used;
};

struct model {
    struct model_entry e[MODEL_KEYS];
    unsigned max_failures;
    double window;
    unsigned long clock;
};

static void model_purge(struct model *m, double now)
{
    for (int i = 0; i < MODEL_KEYS; i++)
        if (m->e[i].used && now >= m->e[i].start + m->window)
            m->e[i].used = 0;
}

static struct model_entry *model_find(struct model *m, const char *key)
{
    for (int i = 0; i < MODEL_KEYS; i++)
        if (m->e[i].used && strcmp(m->e[i].key, key) == 0)
            return &m->e[i];
    return NULL;
}

static bool model_blocked(struct model *m, const char *key, double now, double *retry)
{
    model_purge(m, now);
    struct model_entry *x = model_find(m, key);
    *retry = 0;
    if (!x || x->count < m->max_failures)
        return false;
    *retry = x->start + m->window - now;
    return true;
}

static void model_failure(struct model *m, const char *key, double now)
{
    model_purge(m, now);
    struct model_entry *x = model_find(m, key);
    if (x) {
        x->count++;
        return;
    }
    struct model_entry *slot = NULL, *oldest = NULL;
    for (int i = 0; i < MODEL_KEYS; i++) {
        if (!m->e[i].used && !slot)
            slot = &m->e[i];
        if (m->e[i].used && (!oldest || m->e[i].order < oldest->order))
            oldest = &m->e[i];
    }
    if (!slot) {
        slot = oldest;
    }
    snprintf(slot->key, sizeof(slot->key), "%s", key);
    slot->start = now;
    slot->count = 1;
    slot->order = m->clock++;
    slot->used = 1;
}

static void test_matches_model(void **state)
{
    struct ratelimit *rl = ratelimit_new(3, 5, MODEL_KEYS);
    struct model m = {.max_failures = 3, .window = 5};
    uint64_t seed = 0x9e3779b97f4a7c15u;
    double now = 0;
    char key[16];
    for (int step = 0; step < 200000; step++) {
        seed = seed * 6364136223846793005u + 1442695040888963407u;
        unsigned r = (unsigned)(seed >> 33);
        now += (r & 7) == 0 ? 0.25 * (r >> 3 & 7) : 0;
        snprintf(key, sizeof(key), "k%u", r >> 8 & 63); /* 64 keys for 16 places */
        if (r >> 14 & 1) {
            ratelimit_failure(rl, key, now);
            model_failure(&m, key, now);
        } else {
            double want, got;
            bool b_model = model_blocked(&m, key, now, &want);
            bool b = ratelimit_blocked(rl, key, now, &got);
            assert_int_equal(b, b_model);
            assert_true(got > want - EPS && got < want + EPS);
        }
        unsigned n = 0;
        for (int i = 0; i < MODEL_KEYS; i++)
            n += (unsigned)m.e[i].used;
        assert_int_equal(ratelimit_size(rl), n);
    }
    ratelimit_free(rl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_under_limit),
        cmocka_unit_test(test_at_limit_and_retry_after),
        cmocka_unit_test(test_reserve_spaces_turns),
        cmocka_unit_test(test_reserve_fills_window),
        cmocka_unit_test(test_unblocked_after_window),
        cmocka_unit_test(test_success_does_not_reset),
        cmocka_unit_test(test_keys_independent),
        cmocka_unit_test(test_long_keys_share_prefix),
        cmocka_unit_test(test_eviction_oldest_window),
        cmocka_unit_test(test_eviction_expired_first),
        cmocka_unit_test(test_clock_going_back),
        cmocka_unit_test(test_many_keys_bounded_and_fast),
        cmocka_unit_test(test_matches_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
