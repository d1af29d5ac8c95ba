/*
 * Fuzz target for the SIP front end's parsing (common/sip.c): whatever the
 * bytes, sip_parse() returns a status without crashing, leaking or reading
 * out of bounds; a message it accepts gets a response built for it, and
 * both serialise to text that parses again. A REGISTER is then applied to
 * a registrar's bindings twice (common/sip_bindings.c: contacts, expiry,
 * wildcard, CSeq order), which must keep its bounds and answer with one of
 * the statuses it documents.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sip_limits lim = {.max_message = 8192, .max_headers = 64};
    osip_message_t *m = NULL;
    char err[256];
    if (sip_parse((const char *)data, size, &lim, &m, err, sizeof(err)) != 0) {
        if (m || !err[0])
            abort(); /* a refusal says why and returns nothing */
        return 0;
    }
    round_trip(m);
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
