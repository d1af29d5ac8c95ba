/*
 * The frame codec against every kind of bad frame: each must give its own
 * error, never a crash, and a good frame must survive a round trip.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "msg.h"

#define OV  "test.overlay"
#define MAX 4096

/* Builds a frame around `payload` with its true length. */
static size_t frame(uint8_t *out, const void *payload, size_t n)
{
    out[0] = (uint8_t)(n >> 24), out[1] = (uint8_t)(n >> 16), out[2] = (uint8_t)(n >> 8);
    out[3] = (uint8_t)n;
    memcpy(out + 4, payload, n);
    return n + 4;
}

static int decode_text(const char *json, struct msg_error *e)
{
    uint8_t buf[MAX + 8];
    size_t n = frame(buf, json, strlen(json));
    struct msg m;
    int rc = msg_decode_frame(buf, n, MAX, OV, &m, e);
    msg_clear(&m);
    return rc;
}

#define GOOD_HDR                                                                                   \
    "\"v\":1,\"overlay\":\"" OV "\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":"                   \
    "\"0123456789abcdef\""

static void test_round_trip(void **state)
{
    json_t *body = json_pack("{s:s, s:i}", "key", "h\xc3\xa9llo", "n", 42);
    struct msg_hdr h = {OV, "store.get", MSG_REQ, "00ff00ff00ff00ff"};
    uint8_t *buf;
    size_t len;
    assert_int_equal(msg_encode(&h, body, MAX, &buf, &len), MSG_OK);
    json_decref(body);

    size_t flen = 0;
    assert_int_equal(msg_frame_peek(buf, len - 1, MAX, &flen), MSG_E_INCOMPLETE);
    assert_int_equal(msg_frame_peek(buf, 3, MAX, &flen), MSG_E_INCOMPLETE);
    assert_int_equal(msg_frame_peek(buf, len, MAX, &flen), MSG_OK);
    assert_int_equal(flen, len);

    struct msg m;
    struct msg_error e;
    assert_int_equal(msg_decode_frame(buf, len, MAX, OV, &m, &e), MSG_OK);
    assert_int_equal(m.version, 1);
    assert_string_equal(m.overlay, OV);
    assert_string_equal(m.type, "store.get");
    assert_int_equal(m.kind, MSG_REQ);
    assert_string_equal(m.tid, "00ff00ff00ff00ff");
    assert_string_equal(json_string_value(json_object_get(m.body, "key")), "h\xc3\xa9llo");
    assert_int_equal(json_integer_value(json_object_get(m.body, "n")), 42);
    msg_clear(&m);
    free(buf);
}

static void test_no_body_gives_empty_object(void **state)
{
    struct msg_hdr h = {OV, "ping", MSG_IND, "0000000000000001"};
    uint8_t *buf;
    size_t len;
    assert_int_equal(msg_encode(&h, NULL, MAX, &buf, &len), MSG_OK);
    struct msg m;
    assert_int_equal(msg_decode_frame(buf, len, MAX, NULL, &m, NULL), MSG_OK);
    assert_true(json_is_object(m.body));
    assert_int_equal(json_object_size(m.body), 0);
    msg_clear(&m);
    free(buf);
    /* A frame without "body" decodes the same way. */
    assert_int_equal(decode_text("{" GOOD_HDR "}", NULL), MSG_OK);
}

static void test_unknown_fields_ignored(void **state)
{
    assert_int_equal(decode_text("{" GOOD_HDR ",\"future\":[1,2]}", NULL), MSG_OK);
}

static void test_truncated(void **state)
{
    struct msg_error e;
    const char *p = "{" GOOD_HDR "}";
    uint8_t buf[512];
    size_t n = frame(buf, p, strlen(p));
    struct msg m;
    assert_int_equal(msg_decode_frame(buf, n - 1, MAX, OV, &m, &e), MSG_E_TRUNCATED);
    assert_int_equal(msg_decode_frame(buf, 2, MAX, OV, &m, &e), MSG_E_TRUNCATED);
    assert_int_equal(msg_decode_frame(buf, 0, MAX, OV, &m, &e), MSG_E_TRUNCATED);
    assert_string_equal(msg_status_code(MSG_E_TRUNCATED), "truncated-frame");
    /* Bytes after a complete frame are not silently ignored. */
    buf[n] = 'x';
    assert_int_equal(msg_decode_frame(buf, n + 1, MAX, OV, &m, &e), MSG_E_VALUE);
}

static void test_oversize_and_empty(void **state)
{
    uint8_t big[4] = {0x7f, 0xff, 0xff, 0xff}; /* 2 GiB declared: refused from the prefix alone */
    size_t flen;
    assert_int_equal(msg_frame_peek(big, 4, MAX, &flen), MSG_E_OVERSIZE);
    uint8_t just_over[4] = {0, 0, (MAX + 1) >> 8, (MAX + 1) & 0xff};
    assert_int_equal(msg_frame_peek(just_over, 4, MAX, &flen), MSG_E_OVERSIZE);
    uint8_t zero[4] = {0, 0, 0, 0};
    assert_int_equal(msg_frame_peek(zero, 4, MAX, &flen), MSG_E_EMPTY);
    struct msg m;
    struct msg_error e;
    assert_int_equal(msg_decode_frame(big, 4, MAX, OV, &m, &e), MSG_E_OVERSIZE);
    assert_int_equal(msg_decode_frame(zero, 4, MAX, OV, &m, &e), MSG_E_EMPTY);
    assert_string_equal(msg_status_code(MSG_E_OVERSIZE), "frame-too-large");

    /* The encoder refuses to build what the decoder would refuse. */
    json_t *body = json_object();
    char *pad = malloc(MAX + 1);
    memset(pad, 'a', MAX);
    pad[MAX] = 0;
    json_object_set_new(body, "pad", json_string(pad));
    struct msg_hdr h = {OV, "ping", MSG_REQ, "0123456789abcdef"};
    uint8_t *buf;
    size_t len;
    assert_int_equal(msg_encode(&h, body, MAX, &buf, &len), MSG_E_OVERSIZE);
    json_decref(body);
    free(pad);
}

static void test_invalid_utf8(void **state)
{
    struct msg_error e;
    const char *cases[] = {
        "{\"v\":1,\"x\":\"\xff\"}",             /* never valid */
        "{\"v\":1,\"x\":\"\xc0\xaf\"}",         /* overlong '/' */
        "{\"v\":1,\"x\":\"\xed\xa0\x80\"}",     /* UTF-16 surrogate */
        "{\"v\":1,\"x\":\"\xf4\x90\x80\x80\"}", /* above U+10FFFF */
        "{\"v\":1,\"x\":\"\xe2\x82\"}",         /* cut short */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(decode_text(cases[i], &e), MSG_E_UTF8);
    }
    assert_string_equal(msg_status_code(MSG_E_UTF8), "invalid-utf8");
}

static void test_invalid_json(void **state)
{
    struct msg_error e;
    assert_int_equal(decode_text("{\"v\":1,", &e), MSG_E_JSON);
    assert_int_equal(decode_text("{" GOOD_HDR "} {}", &e), MSG_E_JSON); /* two texts */
    assert_int_equal(decode_text("{'v':1}", &e), MSG_E_JSON);
    assert_int_equal(decode_text("{\"a\":\"\\u0000\"}", &e), MSG_E_JSON); /* NUL escapes refused */
    uint8_t buf[16];
    size_t n = frame(buf, "{\"a\":\0}", 7); /* a raw NUL byte */
    struct msg m;
    assert_int_equal(msg_decode_frame(buf, n, MAX, OV, &m, &e), MSG_E_JSON);
}

static void test_duplicate_key(void **state)
{
    struct msg_error e;
    assert_int_equal(decode_text("{" GOOD_HDR ",\"v\":1}", &e), MSG_E_DUPKEY);
    /* Nested objects too: a body with two "key" members is ambiguous. */
    assert_int_equal(decode_text("{" GOOD_HDR ",\"body\":{\"k\":1,\"k\":2}}", &e), MSG_E_DUPKEY);
}

static void test_not_object(void **state)
{
    struct msg_error e;
    assert_int_equal(decode_text("[1,2]", &e), MSG_E_NOT_OBJECT);
    assert_int_equal(decode_text("\"ping\"", &e), MSG_E_NOT_OBJECT);
    assert_int_equal(decode_text("42", &e), MSG_E_NOT_OBJECT);
}

static void test_missing_fields(void **state)
{
    struct msg_error e;
    const char *missing[][2] = {
        {"{\"overlay\":\"" OV "\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
         "v"},
        {"{\"v\":1,\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}", "overlay"},
        {"{\"v\":1,\"overlay\":\"" OV "\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}", "type"},
        {"{\"v\":1,\"overlay\":\"" OV "\",\"type\":\"ping\",\"tid\":\"0123456789abcdef\"}", "kind"},
        {"{\"v\":1,\"overlay\":\"" OV "\",\"type\":\"ping\",\"kind\":\"req\"}", "tid"},
    };
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(decode_text(missing[i][0], &e), MSG_E_MISSING);
        assert_string_equal(e.field, missing[i][1]);
    }
}

static void test_mistyped_fields(void **state)
{
    struct msg_error e;
    assert_int_equal(decode_text("{\"v\":\"1\",\"overlay\":\"" OV "\"}", &e), MSG_E_TYPE);
    assert_string_equal(e.field, "v");
    assert_int_equal(decode_text("{\"v\":1.0,\"overlay\":\"" OV "\"}", &e), MSG_E_TYPE);
    assert_int_equal(decode_text("{\"v\":1,\"overlay\":7,\"type\":\"ping\",\"kind\":\"req\","
                                 "\"tid\":\"0123456789abcdef\"}",
                                 &e),
                     MSG_E_TYPE);
    assert_string_equal(e.field, "overlay");
    assert_int_equal(decode_text("{\"v\":1,\"overlay\":\"" OV
                                 "\",\"type\":[],\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                                 &e),
                     MSG_E_TYPE);
    assert_string_equal(e.field, "type");
    assert_int_equal(decode_text("{" GOOD_HDR ",\"body\":[]}", &e), MSG_E_TYPE);
    assert_string_equal(e.field, "body");
}

static void test_bad_values(void **state)
{
    struct msg_error e;
    /* tid: wrong length, upper case, non-hex */
    assert_int_equal(decode_text("{\"v\":1,\"overlay\":\"" OV
                                 "\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123\"}",
                                 &e),
                     MSG_E_VALUE);
    assert_string_equal(e.field, "tid");
    assert_int_equal(
        decode_text("{\"v\":1,\"overlay\":\"" OV
                    "\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123456789ABCDEF\"}",
                    &e),
        MSG_E_VALUE);
    /* kind outside the four */
    assert_int_equal(
        decode_text("{\"v\":1,\"overlay\":\"" OV
                    "\",\"type\":\"ping\",\"kind\":\"request\",\"tid\":\"0123456789abcdef\"}",
                    &e),
        MSG_E_VALUE);
    assert_string_equal(e.field, "kind");
    /* type with characters outside the set, and empty */
    assert_int_equal(
        decode_text("{\"v\":1,\"overlay\":\"" OV
                    "\",\"type\":\"Ping!\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                    &e),
        MSG_E_VALUE);
    assert_int_equal(decode_text("{\"v\":1,\"overlay\":\"" OV
                                 "\",\"type\":\"\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                                 &e),
                     MSG_E_VALUE);
    /* overlay with a space */
    assert_int_equal(
        decode_text("{\"v\":1,\"overlay\":\"a "
                    "b\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                    &e),
        MSG_E_VALUE);
}

static void test_version_and_overlay(void **state)
{
    struct msg_error e;
    assert_int_equal(
        decode_text("{\"v\":2,\"overlay\":\"" OV
                    "\",\"type\":\"ping\",\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                    &e),
        MSG_E_VERSION);
    assert_int_equal(decode_text("{\"v\":1,\"overlay\":\"other.overlay\",\"type\":\"ping\","
                                 "\"kind\":\"req\",\"tid\":\"0123456789abcdef\"}",
                                 &e),
                     MSG_E_OVERLAY);
    assert_string_equal(msg_status_code(MSG_E_OVERLAY), "wrong-overlay");
}

static void test_codes_distinct(void **state)
{
    /* Every status has its own wire code. */
    int all[] = {MSG_E_TRUNCATED, MSG_E_OVERSIZE, MSG_E_EMPTY,      MSG_E_UTF8,
                 MSG_E_JSON,      MSG_E_DUPKEY,   MSG_E_NOT_OBJECT, MSG_E_MISSING,
                 MSG_E_TYPE,      MSG_E_VALUE,    MSG_E_VERSION,    MSG_E_OVERLAY};
    size_t n = sizeof(all) / sizeof(all[0]);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            assert_string_not_equal(msg_status_code(all[i]), msg_status_code(all[j]));
}

static void test_error_frame(void **state)
{
    uint8_t *buf;
    size_t len;
    assert_int_equal(
        msg_encode_error(OV, NULL, "frame-too-large", "declared 9999999 bytes", MAX, &buf, &len),
        MSG_OK);
    struct msg m;
    assert_int_equal(msg_decode_frame(buf, len, MAX, OV, &m, NULL), MSG_OK);
    assert_int_equal(m.kind, MSG_ERR);
    assert_string_equal(m.tid, "0000000000000000");
    assert_string_equal(json_string_value(json_object_get(m.body, "code")), "frame-too-large");
    msg_clear(&m);
    free(buf);
    /* A reason quoting invalid bytes still gives a valid frame. */
    assert_int_equal(msg_encode_error(OV, "0123456789abcdef", "x", "\xff\xfe", MAX, &buf, &len),
                     MSG_OK);
    assert_int_equal(msg_decode_frame(buf, len, MAX, OV, &m, NULL), MSG_OK);
    msg_clear(&m);
    free(buf);
}

static void test_tid(void **state)
{
    char a[MSG_TID_LEN + 1], b[MSG_TID_LEN + 1];
    msg_new_tid(a);
    msg_new_tid(b);
    assert_true(msg_tid_valid(a));
    assert_string_not_equal(a, b);
}

static void test_encoder_refuses_bad_header(void **state)
{
    uint8_t *buf;
    size_t len;
    struct msg_hdr h = {OV, "Bad Type", MSG_REQ, "0123456789abcdef"};
    assert_int_equal(msg_encode(&h, NULL, MAX, &buf, &len), MSG_E_VALUE);
    struct msg_hdr h2 = {OV, "ping", MSG_REQ, "nothex"};
    assert_int_equal(msg_encode(&h2, NULL, MAX, &buf, &len), MSG_E_VALUE);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_no_body_gives_empty_object),
        cmocka_unit_test(test_unknown_fields_ignored),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_oversize_and_empty),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_invalid_json),
        cmocka_unit_test(test_duplicate_key),
        cmocka_unit_test(test_not_object),
        cmocka_unit_test(test_missing_fields),
        cmocka_unit_test(test_mistyped_fields),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_version_and_overlay),
        cmocka_unit_test(test_codes_distinct),
        cmocka_unit_test(test_error_frame),
        cmocka_unit_test(test_tid),
        cmocka_unit_test(test_encoder_refuses_bad_header),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
