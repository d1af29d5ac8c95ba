/*
 * SDP for media anchoring (common/sdp.h): what a body says (addresses per stream, RTCP port,
 * rtcp-mux, the overlay's marker), malformed bodies refused with a reason, and a rewrite that
 * changes addresses, ports and the listed lines only, keeping every other line byte for byte
 * (codecs, directions, SDES keys) and a hold's 0.0.0.0.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sdp.h"

static const char OFFER[] =
    "v=0\r\n"
    "o=alice 2890844526 2890844526 IN IP4 192.168.1.10\r\n"
    "s=-\r\n"
    "c=IN IP4 192.168.1.10\r\n"
    "t=0 0\r\n"
    "m=audio 49170 RTP/AVP 0 8 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtcp:49171 IN IP4 192.168.1.10\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR\r\n"
    "a=candidate:1 1 UDP 2130706431 192.168.1.10 49170 typ host\r\n"
    "a=ice-ufrag:abcd\r\n"
    "a=sendrecv\r\n"
    "m=video 0 RTP/AVP 96\r\n"
    "m=video 51372/2 RTP/AVP 97\r\n"
    "c=IN IP4 10.0.0.5/127\r\n"
    "a=rtcp-mux\r\n";

static void test_scan(void **state)
{
    (void)state;
    struct sdp_info in;
    char err[200];
    assert_int_equal(sdp_scan(OFFER, strlen(OFFER), &in, err, sizeof(err)), 0);
    assert_int_equal(in.n_media, 3);
    assert_string_equal(in.m[0].type, "audio");
    assert_int_equal(in.m[0].port, 49170);
    assert_string_equal(in.m[0].addr, "192.168.1.10");
    assert_int_equal(in.m[0].rtcp_port, 49171);
    assert_int_equal(in.m[1].port, 0);
    assert_int_equal(in.m[2].port, 51372);
    assert_string_equal(in.m[2].addr, "10.0.0.5"); /* its own c=, TTL off */
    assert_true(in.m[2].rtcp_mux);
    assert_int_equal(in.mark, 0);
    /* LF-only lines and the marker */
    const char *lf = "v=0\nc=IN IP6 ::1\na=p2p-media:513\nm=audio 4000 RTP/AVP 0\n";
    assert_int_equal(sdp_scan(lf, strlen(lf), &in, err, sizeof(err)), 0);
    assert_int_equal(in.mark, 513);
    assert_string_equal(in.m[0].addr, "::1");
}

static void test_malformed(void **state)
{
    (void)state;
    struct sdp_info in;
    char err[200];
    const char *bad[] = {
        "",
        "o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n",
        "v=0\r\nm=audio 70000 RTP/AVP 0\r\n",
        "v=0\r\nm=audio RTP/AVP 0\r\n",
        "v=0\r\nm=audio 4000x RTP/AVP 0\r\n",
        "v=0\r\nm=audio 4000/2RTP/AVP 0\r\n",
        "v=0\r\nm=audio 4000/ RTP/AVP 0\r\n",
        "v=0\r\nm=audio 4000\r\n",
        "v=0\r\nm=\r 0 RTP/AVP 0\r\n",
        "v=0\r\nm= audio 4000 RTP/AVP 0\r\n",
        "v=0\r\nm=audio  4000 RTP/AVP 0\r\n",
        "v=0\r\nm=audio -1 RTP/AVP 0\r\n",
        "v=0\r\nc=IN IP4\r\n",
        "v=0\r\nc=XX IP4 1.2.3.4\r\n",
        "v=0\r\nc=IN IP5 1.2.3.4\r\n",
        "v=0\r\na=p2p-media:0\r\n",
        "v=0\r\na=p2p-media:65536\r\n",
        "v=0\r\na=p2p-media:12a\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = 0;
        assert_int_equal(sdp_scan(bad[i], strlen(bad[i]), &in, err, sizeof(err)), -1);
        assert_true(err[0] != 0);
    }
    const char nul[] = "v=0\r\ns=a\0b\r\n";
    assert_int_equal(sdp_scan(nul, sizeof(nul) - 1, &in, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "NUL"));
    /* more streams than SDP_MAX_MEDIA */
    char big[4096] = "v=0\r\n";
    for (int i = 0; i <= SDP_MAX_MEDIA; i++)
        strcat(big, "m=audio 4000 RTP/AVP 0\r\n");
    assert_int_equal(sdp_scan(big, strlen(big), &in, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "media streams"));
}

static void test_rewrite_for_the_phone(void **state)
{
    (void)state;
    struct sdp_edit e = {
        .addr = "127.0.0.1", .drop_rtcp = true, .drop_ice = true, .drop_mark = true};
    e.port[0] = 20000;
    e.port[2] = 20002;
    size_t n;
    char *out = sdp_rewrite(OFFER, strlen(OFFER), &e, &n);
    assert_non_null(out);
    assert_int_equal(strlen(out), n);
    const char *want = "v=0\r\n"
                       "o=alice 2890844526 2890844526 IN IP4 192.168.1.10\r\n"
                       "s=-\r\n"
                       "c=IN IP4 127.0.0.1\r\n"
                       "t=0 0\r\n"
                       "m=audio 20000 RTP/AVP 0 8 101\r\n"
                       "a=rtpmap:0 PCMU/8000\r\n"
                       "a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
                       "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR\r\n"
                       "a=sendrecv\r\n"
                       "m=video 0 RTP/AVP 96\r\n"
                       "m=video 20002 RTP/AVP 97\r\n"
                       "c=IN IP4 127.0.0.1\r\n"
                       "a=rtcp-mux\r\n";
    assert_string_equal(out, want);
    free(out);
}

static void test_rewrite_for_the_node(void **state)
{
    (void)state;
    const char *hold = "v=0\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\na=p2p-media:7\r\n"
                       "m=audio 4000 RTP/AVP 0\r\na=sendonly\r\n";
    struct sdp_edit e = {.drop_mark = true, .mark = 4242, .addr = "::1"};
    size_t n;
    char *out = sdp_rewrite(hold, strlen(hold), &e, &n);
    assert_non_null(out);
    /* the hold's 0.0.0.0 stays, a phone's own marker goes, ours comes before the first m= */
    assert_string_equal(out, "v=0\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\na=p2p-media:4242\r\n"
                             "m=audio 4000 RTP/AVP 0\r\na=sendonly\r\n");
    free(out);
    /* no m= line: the marker at the end */
    const char *none = "v=0\r\ns=-\r\n";
    struct sdp_edit e2 = {.mark = 1};
    out = sdp_rewrite(none, strlen(none), &e2, &n);
    assert_string_equal(out, "v=0\r\ns=-\r\na=p2p-media:1\r\n");
    free(out);
    /* IPv6 address written as IP6 */
    const char *v4 = "v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP 0\r\n";
    struct sdp_edit e3 = {.addr = "2001:db8::1"};
    out = sdp_rewrite(v4, strlen(v4), &e3, &n);
    assert_non_null(strstr(out, "c=IN IP6 2001:db8::1\r\n"));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scan),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_rewrite_for_the_phone),
        cmocka_unit_test(test_rewrite_for_the_node),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
