/*
 * The SIP transport's keyed per-source state (sip.h): source-address keys (IPv4 address, IPv6
 * /64, ports ignored) and the token-bucket table sip_limiter, whose slots are picked by a secret
 * SipHash in sets with least-recently-used eviction. The point of the last test: a sender that
 * exhausted its bucket cannot have it reset by traffic from other addresses (the direct-mapped,
 * unkeyed table this replaced gave a colliding address a fresh bucket in the same slot).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "sip.h"

static void test_addr_keys(void **state)
{
    (void)state;
    unsigned char a[SIP_ADDR_KEY_LEN], b[SIP_ADDR_KEY_LEN];
    assert_int_equal(sip_addr_key("192.0.2.7:5060", a), 0);
    assert_int_equal(sip_addr_key("192.0.2.7:40000", b), 0);
    assert_memory_equal(a, b, sizeof(a)); /* ports do not count */
    assert_int_equal(sip_addr_key("192.0.2.8:5060", b), 0);
    assert_memory_not_equal(a, b, sizeof(a));
    /* An IPv4 peer on a dual-stack socket is the same source. */
    assert_int_equal(sip_addr_key("[::ffff:192.0.2.7]:9", b), 0);
    assert_memory_equal(a, b, sizeof(a));
    /* IPv6: one /64 is one source; another /64 another. */
    assert_int_equal(sip_addr_key("[2001:db8:1:2::1]:5060", a), 0);
    assert_int_equal(sip_addr_key("[2001:db8:1:2:ffff:ffff:ffff:fffe]:1", b), 0);
    assert_memory_equal(a, b, sizeof(a));
    assert_int_equal(sip_addr_key("[2001:db8:1:3::1]:5060", b), 0);
    assert_memory_not_equal(a, b, sizeof(a));
    assert_int_equal(sip_addr_key("node 0123abcd (overlay)", a), -1);
    assert_int_equal(sip_addr_key("example.org:5060", a), -1);
}

static void test_bucket(void **state)
{
    (void)state;
    struct sip_limiter *l = sip_limiter_new(64, 1.0, 10.0);
    assert_non_null(l);
    double now = 1000.0;
    for (int i = 0; i < 10; i++)
        assert_true(sip_limiter_take(l, "carol", 5, now, 1.0));
    assert_false(sip_limiter_take(l, "carol", 5, now, 1.0));
    assert_true(sip_limiter_wait(l, "carol", 5, now, 1.0) > 0.99);
    assert_true(sip_limiter_take(l, "dave", 4, now, 1.0)); /* another key: its own bucket */
    now += 1.0;
    assert_true(sip_limiter_wait(l, "carol", 5, now, 1.0) == 0.0);
    assert_true(sip_limiter_take(l, "carol", 5, now, 1.0));
    assert_false(sip_limiter_take(l, "carol", 5, now, 1.0));
    sip_limiter_free(l);
    sip_limiter_free(NULL);
}

/* 200,000 other addresses, one message each, while the flooder keeps sending: its bucket is
 * never found full again. It stays among the most recently used of its set (8 ways), and only
 * the least recently used entry of a set is ever taken over. */
static void test_no_reset_by_others(void **state)
{
    (void)state;
    struct sip_limiter *l = sip_limiter_new(4096, 0.001, 5.0);
    assert_non_null(l);
    unsigned char flooder[SIP_ADDR_KEY_LEN], other[SIP_ADDR_KEY_LEN];
    assert_int_equal(sip_addr_key("198.51.100.1:5060", flooder), 0);
    double now = 50.0;
    while (sip_limiter_take(l, flooder, sizeof(flooder), now, 1.0))
        ;
    unsigned resets = 0;
    for (unsigned i = 0; i < 200000; i++) {
        char addr[64];
        snprintf(addr, sizeof(addr), "10.%u.%u.%u:5060", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        assert_int_equal(sip_addr_key(addr, other), 0);
        assert_true(sip_limiter_take(l, other, sizeof(other), now, 1.0)); /* new: full */
        if (i % 4 == 3 && sip_limiter_take(l, flooder, sizeof(flooder), now, 1.0))
            resets++;
    }
    assert_int_equal(resets, 0);
    sip_limiter_free(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_addr_keys),
        cmocka_unit_test(test_bucket),
        cmocka_unit_test(test_no_reset_by_others),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
