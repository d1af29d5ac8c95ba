/*
 * Fuzz target for the frame decoder: the bytes are read as a stream of
 * frames, the way a connection reads them. Whatever comes in, the decoder must
 * return a status (never crash, leak or read out of bounds), and a frame it
 * accepts must encode again to a frame it accepts.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const size_t max = 4096;
    size_t off = 0;
    while (off < size) {
        size_t flen = 0;
        int rc = msg_frame_peek(data + off, size - off, max, &flen);
        if (rc != MSG_OK)
            break;
        struct msg m;
        struct msg_error e;
        rc = msg_decode_payload(data + off + MSG_LEN_PREFIX, flen - MSG_LEN_PREFIX,
                                (off & 1) ? "fuzz.overlay" : NULL, &m, &e);
        if (rc == MSG_OK) {
            struct msg_hdr h = {m.overlay, m.type, m.kind, m.tid};
            uint8_t *out;
            size_t out_len;
            /* Re-encoding may only fail for size: the header was validated. */
            int erc = msg_encode(&h, m.body, max * 2, &out, &out_len);
            if (erc != MSG_OK && erc != MSG_E_OVERSIZE)
                abort();
            if (erc == MSG_OK) {
                struct msg again;
                if (msg_decode_frame(out, out_len, max * 2, NULL, &again, NULL) != MSG_OK)
                    abort();
                msg_clear(&again);
                free(out);
            }
            msg_clear(&m);
        } else if (msg_status_code(rc)[0] == '\0') {
            abort();
        }
        off += flen;
    }
    /* The whole input as a single payload too (no length prefix). */
    struct msg m;
    if (msg_decode_payload(data, size, NULL, &m, NULL) == MSG_OK)
        msg_clear(&m);
    return 0;
}
