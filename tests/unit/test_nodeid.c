/* Node-IDs and resource keys: hex form, ordering, ring intervals, key derivation. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "nodeid.h"

static nid_t H(const char *hex)
{
    nid_t n;
    assert_int_equal(nid_from_hex(&n, hex), 0);
    return n;
}

#define ZERO "0000000000000000000000000000000000000000"
#define ONE  "0000000000000000000000000000000000000001"
#define TEN  "000000000000000000000000000000000000000a"
#define MID  "8000000000000000000000000000000000000000"
#define MAX  "ffffffffffffffffffffffffffffffffffffffff"

static void test_hex_round_trip(void **state)
{
    char out[NID_HEX_LEN + 1];
    nid_t n = H("0123456789ABCDEFabcdef0123456789abcdef01");
    assert_string_equal(nid_to_hex(&n, out), "0123456789abcdefabcdef0123456789abcdef01");
    nid_t z = H(ZERO);
    assert_true(nid_is_zero(&z));
}

static void test_hex_rejects(void **state)
{
    nid_t n;
    assert_int_equal(nid_from_hex(&n, ""), -1);
    assert_int_equal(nid_from_hex(&n, NULL), -1);
    assert_int_equal(nid_from_hex(&n, "000000000000000000000000000000000000000"), -1);   /* 39 */
    assert_int_equal(nid_from_hex(&n, "00000000000000000000000000000000000000000"), -1); /* 41 */
    assert_int_equal(nid_from_hex(&n, "g000000000000000000000000000000000000000"), -1);
    assert_int_equal(nid_from_hex(&n, " 000000000000000000000000000000000000000"), -1);
}

static void test_compare(void **state)
{
    nid_t a = H(ONE), b = H(TEN), m = H(MAX);
    assert_true(nid_cmp(&a, &b) < 0);
    assert_true(nid_cmp(&m, &b) > 0);
    assert_true(nid_eq(&a, &a));
    assert_false(nid_eq(&a, &b));
}

static void test_intervals_plain(void **state)
{
    nid_t one = H(ONE), ten = H(TEN), mid = H(MID),
          five = H("0000000000000000000000000000000000000005");
    assert_true(nid_in_open(&five, &one, &ten));
    assert_false(nid_in_open(&one, &one, &ten));
    assert_false(nid_in_open(&ten, &one, &ten));
    assert_false(nid_in_open(&mid, &one, &ten));
    assert_true(nid_in_open_closed(&ten, &one, &ten));
    assert_false(nid_in_open_closed(&one, &one, &ten));
}

static void test_intervals_wrap(void **state)
{
    /* (MID, TEN) wraps through zero. */
    nid_t mid = H(MID), ten = H(TEN), zero = H(ZERO), max = H(MAX), one = H(ONE);
    nid_t quarter = H("4000000000000000000000000000000000000000");
    assert_true(nid_in_open(&zero, &mid, &ten));
    assert_true(nid_in_open(&max, &mid, &ten));
    assert_true(nid_in_open(&one, &mid, &ten));
    assert_false(nid_in_open(&quarter, &mid, &ten));
    assert_false(nid_in_open(&mid, &mid, &ten));
    assert_true(nid_in_open_closed(&ten, &mid, &ten));
    assert_false(nid_in_open_closed(&mid, &mid, &ten));
}

static void test_intervals_degenerate(void **state)
{
    /* A ring of one node: (a, a) is everything but a; (a, a] is everything. */
    nid_t a = H(MID), x = H(ONE);
    assert_true(nid_in_open(&x, &a, &a));
    assert_false(nid_in_open(&a, &a, &a));
    assert_true(nid_in_open_closed(&a, &a, &a));
    assert_true(nid_in_open_closed(&x, &a, &a));
}

static void test_add_pow2(void **state)
{
    char out[NID_HEX_LEN + 1];
    nid_t r, zero = H(ZERO), max = H(MAX);
    nid_add_pow2(&r, &zero, 0);
    assert_string_equal(nid_to_hex(&r, out), ONE);
    nid_add_pow2(&r, &zero, 159);
    assert_string_equal(nid_to_hex(&r, out), MID);
    nid_add_pow2(&r, &max, 0); /* wraps to zero */
    assert_string_equal(nid_to_hex(&r, out), ZERO);
    nid_t x = H("00000000000000000000000000000000000000ff");
    nid_add_pow2(&r, &x, 0); /* carry across a byte */
    assert_string_equal(nid_to_hex(&r, out), "0000000000000000000000000000000000000100");
    nid_add_pow2(&r, &x, 9);
    assert_string_equal(nid_to_hex(&r, out), "00000000000000000000000000000000000002ff");
}

static void test_distance(void **state)
{
    char out[NID_HEX_LEN + 1];
    nid_t r, one = H(ONE), ten = H(TEN);
    nid_distance(&r, &one, &ten);
    assert_string_equal(nid_to_hex(&r, out), "0000000000000000000000000000000000000009");
    nid_distance(&r, &ten, &one); /* wraps */
    assert_string_equal(nid_to_hex(&r, out), "fffffffffffffffffffffffffffffffffffffff7");
}

static void test_key_derivation(void **state)
{
    /* SHA-1("user location|user@example.com") (seed 004 section 8), checked with sha1sum. */
    char out[NID_HEX_LEN + 1];
    nid_t k;
    assert_int_equal(nid_key(&k, "user location", "user@example.com"), 0);
    assert_string_equal(nid_to_hex(&k, out), "1e4e7869b5bbb07ae414b6eeb98f934ffeb9faf4");
    assert_int_equal(nid_key(&k, "proxy location", "example.com"), 0);
    assert_string_equal(nid_to_hex(&k, out), "f8ccdaba359a19d62e402b13772b192f2414f1a7");
}

static void test_random(void **state)
{
    nid_t a, b;
    assert_int_equal(nid_random(&a), 0);
    assert_int_equal(nid_random(&b), 0);
    assert_false(nid_eq(&a, &b));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hex_round_trip), cmocka_unit_test(test_hex_rejects),
        cmocka_unit_test(test_compare),        cmocka_unit_test(test_intervals_plain),
        cmocka_unit_test(test_intervals_wrap), cmocka_unit_test(test_intervals_degenerate),
        cmocka_unit_test(test_add_pow2),       cmocka_unit_test(test_distance),
        cmocka_unit_test(test_key_derivation), cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
