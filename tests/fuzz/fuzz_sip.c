/*
 * Fuzz target for the SIP front end's parsing (common/sip.c): whatever the
 * bytes, sip_parse() returns a status without crashing, leaking or reading
 * out of bounds; a message it accepts gets a response built for it, and
 * both serialise to text that parses again. A REGISTER is then applied to
 * a registrar's bindings twice (common/sip_bindings.c: contacts, expiry,
 * wildcard, CSeq order), which must keep its bounds and answer with one of
 * the statuses it documents. The bytes, and the body of a message that
 * parsed, are also read as SDP (common/sdp.c, what media anchoring edits):
 * an SDP it accepts is rewritten both ways a node does, and what comes out
 * must read again with the same streams and the marker asked for.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sdp.h"
#include "sip.h"
#include "sip_bindings.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void round_trip(osip_message_t *m)
{
    char *text = NULL;
    size_t len = 0;
    if (osip_message_to_str(m, &text, &len) != 0 || !text)
        return;
    osip_message_t *again = NULL;
    char err[256];
    struct sip_limits lim = {.max_message = 1 << 20, .max_headers = 1000};
    if (sip_parse(text, len, &lim, &again, err, sizeof(err)) == 0)
        osip_message_free(again);
    osip_free(text);
}

static void registrar(const osip_message_t *m)
{
    struct sip_bindings bs;
    memset(&bs, 0, sizeof(bs));
    uint64_t order = 0;
    for (int round = 0; round < 2; round++) {
        const char *why = NULL;
        int rc = sip_bindings_apply(&bs, m, 1800000000 + round, 3600, &order, &why);
        if (bs.n > SIPB_MAX)
            abort();
        if (rc != 0 && rc != 1 && rc != 423 && !((rc == 400 || rc == 403 || rc == 500) && why))
            abort();
        for (size_t i = 0; i < bs.n; i++)
            if (!memchr(bs.b[i].contact, 0, sizeof(bs.b[i].contact)) ||
                bs.b[i].expires > 1800000000 + round + 3600)
                abort();
    }
    json_decref(sip_bindings_json(&bs));
    sip_bindings_latest(&bs);
    sip_bindings_expire(&bs, 1800000000 + 3601);
    if (bs.n != 0)
        abort();
}

static void sdp(const char *body, size_t len)
{
    struct sdp_info in, again;
    char err[200];
    if (sdp_scan(body, len, &in, err, sizeof(err)) != 0) {
        if (!err[0])
            abort();
        return;
    }
    if (in.n_media > SDP_MAX_MEDIA || (in.mark && in.mark > 65535))
        abort();
    struct sdp_edit to_phone = {
        .addr = "127.0.0.1", .drop_rtcp = true, .drop_ice = true, .drop_mark = true};
    struct sdp_edit to_node = {.drop_mark = true, .mark = 4242};
    for (size_t i = 0; i < SDP_MAX_MEDIA; i++)
        to_phone.port[i] = 20000 + 2 * (unsigned)i;
    const struct sdp_edit *edits[2] = {&to_phone, &to_node};
    for (int e = 0; e < 2; e++) {
        size_t n = 0;
        char *out = sdp_rewrite(body, len, edits[e], &n);
        if (!out)
            abort();
        if (strlen(out) != n || sdp_scan(out, n, &again, err, sizeof(err)) != 0 ||
            again.n_media != in.n_media || again.mark != edits[e]->mark)
            abort();
        for (size_t i = 0; i < in.n_media; i++)
            if (again.m[i].port != (edits[e]->port[i] ? edits[e]->port[i] : in.m[i].port))
                abort();
        free(out);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sdp((const char *)data, size);
    struct sip_limits lim = {.max_message = 8192, .max_headers = 64};
    osip_message_t *m = NULL;
    char err[256];
    if (sip_parse((const char *)data, size, &lim, &m, err, sizeof(err)) != 0) {
        if (m || !err[0])
            abort(); /* a refusal says why and returns nothing */
        return 0;
    }
    round_trip(m);
    osip_body_t *b = NULL;
    if (osip_message_get_body(m, 0, &b) >= 0 && b && b->body)
        sdp(b->body, b->length);
    if (MSG_IS_REQUEST(m)) {
        osip_message_t *r = sip_response_for(m, 200, NULL);
        if (!r)
            abort();
        round_trip(r);
        osip_message_free(r);
        if (MSG_IS_REGISTER(m))
            registrar(m);
    }
    osip_message_free(m);
    return 0;
}
