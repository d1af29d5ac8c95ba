/*
 * The bootstrap registry against docs/protocol.md section 3: nothing is
 * listed before its address checks out, a changed address is checked again,
 * silent nodes go after 3 periods, floods change nothing, withdrawal is
 * immediate, and picks favour spare capacity, but no more than the capacity clamp allows
 * (issue 15 item 7: one announce of capacity 9e18 took every first place). The address classes
 * behind public_only are checked here too.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "registry.h"

#define PERIOD 30.0

static nid_t id_n(unsigned n)
{
    nid_t id;
    memset(&id, 0, sizeof(id));
    id.b[0] = (uint8_t)(n >> 8);
    id.b[1] = (uint8_t)n;
    return id;
}

static enum bs_announce_result ann(struct bs_registry *r, unsigned n, const char *addr,
                                   unsigned long attached, unsigned long cap, double now)
{
    struct bs_announce a = {id_n(n), addr, attached, cap, 100};
    return bs_registry_announce(r, &a, now);
}

static uint64_t xorshift(void *ud)
{
    uint64_t *s = ud;
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void test_listed_only_after_check(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    nid_t a = id_n(1);
    assert_int_equal(ann(r, 1, "192.0.2.1:7000", 0, 100, 0), BS_ANN_CHECK);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_PENDING);
    const struct bs_entry *out[4];
    uint64_t seed = 1;
    assert_int_equal(bs_registry_pick(r, 4, xorshift, &seed, out), 0);
    bs_registry_checked(r, &a, "192.0.2.1:7000", true, NULL, 1);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_LISTED);
    assert_int_equal(bs_registry_pick(r, 4, xorshift, &seed, out), 1);
    /* Announcing on: no new check until the re-verification interval. */
    assert_int_equal(ann(r, 1, "192.0.2.1:7000", 5, 100, PERIOD), BS_ANN_OK);
    assert_int_equal(bs_registry_get(r, &a)->attached, 5);
    assert_int_equal(ann(r, 1, "192.0.2.1:7000", 5, 100, 10 * PERIOD + 1), BS_ANN_CHECK);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_LISTED); /* listed while re-checked */
    bs_registry_free(r);
}

static void test_rejected_with_reason_and_retried(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    nid_t a = id_n(2);
    ann(r, 2, "192.0.2.2:7000", 0, 10, 0);
    bs_registry_checked(r, &a, "192.0.2.2:7000", false, "TLS handshake failed: refused", 1);
    const struct bs_entry *e = bs_registry_get(r, &a);
    assert_int_equal(e->state, BS_REJECTED);
    assert_string_equal(e->reason, "TLS handshake failed: refused");
    assert_int_equal(ann(r, 2, "192.0.2.2:7000", 0, 10, 10), BS_ANN_OK); /* not yet */
    assert_int_equal(ann(r, 2, "192.0.2.2:7000", 0, 10, PERIOD + 2), BS_ANN_CHECK);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_PENDING);
    bs_registry_free(r);
}

static void test_address_change_rechecks(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    nid_t a = id_n(3);
    ann(r, 3, "192.0.2.3:7000", 0, 10, 0);
    bs_registry_checked(r, &a, "192.0.2.3:7000", true, NULL, 1);
    assert_int_equal(ann(r, 3, "192.0.2.33:7000", 0, 10, 5), BS_ANN_CHECK);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_PENDING); /* unlisted until checked */
    /* A late answer about the old address changes nothing. */
    bs_registry_checked(r, &a, "192.0.2.3:7000", true, NULL, 6);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_PENDING);
    bs_registry_checked(r, &a, "192.0.2.33:7000", true, NULL, 7);
    assert_int_equal(bs_registry_get(r, &a)->state, BS_LISTED);
    bs_registry_free(r);
}

static void test_expiry_after_three_periods(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    nid_t a = id_n(4), b = id_n(5);
    ann(r, 4, "192.0.2.4:7000", 0, 10, 0);
    ann(r, 5, "192.0.2.5:7000", 0, 10, 0);
    ann(r, 5, "192.0.2.5:7000", 0, 10, 2 * PERIOD);
    assert_int_equal(bs_registry_expire(r, 3 * PERIOD - 1), 0);
    assert_int_equal(bs_registry_expire(r, 3 * PERIOD + 1), 1);
    assert_null(bs_registry_get(r, &a));
    assert_non_null(bs_registry_get(r, &b));
    bs_registry_free(r);
}

static void test_flood_changes_nothing(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 3);
    nid_t a = id_n(6);
    for (int i = 0; i < 3; i++)
        assert_int_not_equal(ann(r, 6, "192.0.2.6:7000", 1, 10, i), BS_ANN_FLOOD);
    assert_int_equal(ann(r, 6, "192.0.2.66:9", 9, 10, 4), BS_ANN_FLOOD);
    const struct bs_entry *e = bs_registry_get(r, &a);
    assert_string_equal(e->address, "192.0.2.6:7000");
    assert_int_equal(e->attached, 1);
    /* The next period starts afresh. */
    assert_int_not_equal(ann(r, 6, "192.0.2.6:7000", 2, 10, PERIOD + 1), BS_ANN_FLOOD);
    bs_registry_free(r);
}

static void test_full_and_withdraw(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 2, 10);
    nid_t a = id_n(7);
    ann(r, 7, "192.0.2.7:7000", 0, 10, 0);
    ann(r, 8, "192.0.2.8:7000", 0, 10, 0);
    assert_int_equal(ann(r, 9, "192.0.2.9:7000", 0, 10, 0), BS_ANN_FULL);
    assert_true(bs_registry_withdraw(r, &a));
    assert_false(bs_registry_withdraw(r, &a));
    assert_null(bs_registry_get(r, &a));
    assert_int_equal(ann(r, 9, "192.0.2.9:7000", 0, 10, 0), BS_ANN_CHECK);
    bs_registry_free(r);
}

static void test_pick_distinct_and_weighted(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    /* Node 1: 901 spare (weight 902); nodes 2-10: full (weight 1 each). */
    for (unsigned n = 1; n <= 10; n++) {
        char addr[32];
        snprintf(addr, sizeof(addr), "192.0.2.%u:7000", n);
        ann(r, n, addr, n == 1 ? 99 : 500, n == 1 ? 1000 : 500, 0);
        nid_t id = id_n(n);
        bs_registry_checked(r, &id, addr, true, NULL, 0);
    }
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    const struct bs_entry *out[10];
    int first_is_spare = 0;
    for (int round = 0; round < 1000; round++) {
        size_t n = bs_registry_pick(r, 3, xorshift, &seed, out);
        assert_int_equal(n, 3);
        assert_true(out[0] != out[1] && out[1] != out[2] && out[0] != out[2]);
        first_is_spare += out[0]->node_id.b[1] == 1;
    }
    /* P(node 1 drawn first) = 902/911: about 990 of 1000. */
    assert_true(first_is_spare > 970);
    /* Asking for more than are listed gives all of them, once each. */
    assert_int_equal(bs_registry_pick(r, 50, xorshift, &seed, out), 10);
    assert_int_equal(bs_registry_count(r, BS_LISTED), 10);
    bs_registry_free(r);
}

/* The trial of issue 15: one node announces capacity 9e18 among three honest ones of 1000. */
static void test_capacity_clamped(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    for (unsigned n = 1; n <= 4; n++) {
        char addr[32];
        snprintf(addr, sizeof(addr), "192.0.2.%u:7000", n);
        ann(r, n, addr, 0, n == 1 ? 9000000000000000000ul : 1000, 0);
        nid_t id = id_n(n);
        bs_registry_checked(r, &id, addr, true, NULL, 0);
    }
    nid_t big = id_n(1);
    assert_int_equal(bs_registry_get(r, &big)->capacity, BS_CAPACITY_MAX_DEF);
    /* attached beyond the clamp is clamped too: the spare can never go negative-huge. */
    ann(r, 1, "192.0.2.1:7000", 9000000000000000000ul, 9000000000000000000ul, 1);
    assert_int_equal(bs_registry_get(r, &big)->attached, BS_CAPACITY_MAX_DEF);
    ann(r, 1, "192.0.2.1:7000", 0, 9000000000000000000ul, PERIOD + 2);

    /* A lower clamp set by the operator: weights 1001 each, so about a quarter of first places. */
    bs_registry_set_max_capacity(r, 1000);
    ann(r, 1, "192.0.2.1:7000", 0, 9000000000000000000ul, 2 * PERIOD + 3);
    assert_int_equal(bs_registry_get(r, &big)->capacity, 1000);
    uint64_t seed = 0x1234567ull;
    const struct bs_entry *out[1];
    int first = 0;
    for (int round = 0; round < 4000; round++) {
        assert_int_equal(bs_registry_pick(r, 1, xorshift, &seed, out), 1);
        first += out[0]->node_id.b[1] == 1;
    }
    assert_true(first > 850 && first < 1150);
    bs_registry_free(r);
}

/* Equal weights and equal keys alike: every node comes first about equally often. */
static void test_ties_shuffled(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    for (unsigned n = 1; n <= 5; n++) {
        char addr[32];
        snprintf(addr, sizeof(addr), "192.0.2.%u:7000", n);
        ann(r, n, addr, 7, 7, 0); /* full: weight 1 each */
        nid_t id = id_n(n);
        bs_registry_checked(r, &id, addr, true, NULL, 0);
    }
    uint64_t seed = 77;
    const struct bs_entry *out[5];
    int first[6] = {0};
    for (int round = 0; round < 5000; round++) {
        assert_int_equal(bs_registry_pick(r, 5, xorshift, &seed, out), 5);
        first[out[0]->node_id.b[1]]++;
    }
    for (int n = 1; n <= 5; n++)
        assert_true(first[n] > 850 && first[n] < 1150);
    bs_registry_free(r);
}

static void test_address_classes(void **state)
{
    static const char *const public_ones[] = {
        "8.8.8.8",      "1.1.1.1",        "100.63.255.255",   "100.128.0.0",
        "172.15.0.1",   "172.32.0.1",     "192.169.0.1",      "2606:4700::1111",
        "2a00:1450::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"};
    static const char *const private_ones[] = {"0.0.0.0",
                                               "0.1.2.3",
                                               "10.0.0.1",
                                               "100.64.0.1",
                                               "100.127.255.254",
                                               "127.0.0.1",
                                               "127.1.2.3",
                                               "169.254.1.1",
                                               "172.16.0.1",
                                               "172.31.255.255",
                                               "192.168.1.1",
                                               "192.0.0.8",
                                               "192.0.2.7",
                                               "198.18.0.1",
                                               "198.19.1.1",
                                               "198.51.100.1",
                                               "203.0.113.9",
                                               "224.0.0.1",
                                               "239.255.255.250",
                                               "240.0.0.1",
                                               "255.255.255.255",
                                               "::",
                                               "::1",
                                               "::ffff:10.0.0.1",
                                               "::ffff:127.0.0.1",
                                               "::ffff:192.168.0.1",
                                               "::ffff:0.0.0.0",
                                               "::ffff:169.254.0.1",
                                               "::ffff:100.64.0.1",
                                               "::ffff:224.0.0.1",
                                               "::10.0.0.1",
                                               "::8.8.8.8",
                                               "64:ff9b::a00:1",
                                               "2002:a00:1::1",
                                               "2002:7f00:1::",
                                               "fc00::1",
                                               "fd12:3456::1",
                                               "fe80::1",
                                               "febf::1",
                                               "fec0::1",
                                               "ff02::1",
                                               "ff0e::1",
                                               "2001:db8::1",
                                               "2001:2::1",
                                               "100::1",
                                               "1000::1",
                                               "4000::1",
                                               "",
                                               "example.org",
                                               "1.2.3",
                                               "1.2.3.4.5",
                                               "::ffff:1.2.3.4.5",
                                               "fe80::1%eth0"};
    for (size_t i = 0; i < sizeof(public_ones) / sizeof(public_ones[0]); i++) {
        if (!bs_addr_public(public_ones[i]))
            fail_msg("%s should be public", public_ones[i]);
    }
    for (size_t i = 0; i < sizeof(private_ones) / sizeof(private_ones[0]); i++) {
        if (bs_addr_public(private_ones[i]))
            fail_msg("%s should not be public", private_ones[i]);
    }
    assert_false(bs_addr_public(NULL));
    assert_true(bs_addr_loopback("127.0.0.1"));
    assert_true(bs_addr_loopback("127.255.0.9"));
    assert_true(bs_addr_loopback("::1"));
    assert_true(bs_addr_loopback("::ffff:127.0.0.2"));
    assert_false(bs_addr_loopback("::"));
    assert_false(bs_addr_loopback("0.0.0.0"));
    assert_false(bs_addr_loopback("10.0.0.1"));
    assert_false(bs_addr_loopback("::ffff:10.0.0.1"));
    assert_false(bs_addr_loopback("8.8.8.8"));
}

static void order_cb(const struct bs_entry *e, void *ud)
{
    int *last = ud;
    assert_true((int)e->node_id.b[1] > *last);
    *last = e->node_id.b[1];
}

static void test_foreach_in_ring_order(void **state)
{
    struct bs_registry *r = bs_registry_new(PERIOD, 10, 100, 10);
    unsigned order[] = {5, 2, 9, 1, 7};
    for (size_t i = 0; i < 5; i++)
        ann(r, order[i], "192.0.2.1:7000", 0, 1, 0);
    int last = 0;
    bs_registry_foreach(r, order_cb, &last);
    assert_int_equal(last, 9);
    bs_registry_free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_listed_only_after_check),
        cmocka_unit_test(test_rejected_with_reason_and_retried),
        cmocka_unit_test(test_address_change_rechecks),
        cmocka_unit_test(test_expiry_after_three_periods),
        cmocka_unit_test(test_flood_changes_nothing),
        cmocka_unit_test(test_full_and_withdraw),
        cmocka_unit_test(test_pick_distinct_and_weighted),
        cmocka_unit_test(test_foreach_in_ring_order),
        cmocka_unit_test(test_capacity_clamped),
        cmocka_unit_test(test_ties_shuffled),
        cmocka_unit_test(test_address_classes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
