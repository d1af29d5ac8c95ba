/*
 * The wire codec every node-to-node link uses (SN-SN and ON-SN): a frame is a
 * 4-byte big-endian length N followed by N bytes holding exactly one UTF-8
 * JSON object:
 *
 *   {"v":1,"overlay":"example.org","type":"ping","kind":"req",
 *    "tid":"9f1c0a2b3c4d5e6f","body":{...}}
 *
 * Decoding trusts nothing: every way a frame can be wrong has its own error
 * code, so that the peer gets a precise error reply and tests can tell the
 * cases apart. docs/protocol.md is the contract; keep the two in step.
 */
#ifndef P2P_MSG_H
#define P2P_MSG_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define MSG_LEN_PREFIX      4
#define MSG_MAX_FRAME_DEF   (64 * 1024) /* payload bytes, not counting the prefix */
#define MSG_MAX_FRAME_LIMIT (16 * 1024 * 1024)
#define MSG_TID_LEN         16 /* lowercase hex digits */
#define MSG_TYPE_MAX        32
#define MSG_OVERLAY_MAX     255

enum msg_kind {
    MSG_REQ = 0, /* "req": expects a "res" or an "err" with the same tid */
    MSG_RES,     /* "res": successful answer */
    MSG_ERR,     /* "err": failed answer, or a complaint about a frame */
    MSG_IND,     /* "ind": one-way indication, never answered */
};

enum msg_status {
    MSG_OK = 0,
    MSG_E_INCOMPLETE = -1, /* streaming only: not a whole frame yet (not an error) */
    MSG_E_TRUNCATED = -2,  /* the input ended inside a frame */
    MSG_E_OVERSIZE = -3,   /* declared length above the maximum */
    MSG_E_EMPTY = -4,      /* declared length zero */
    MSG_E_UTF8 = -5,       /* payload is not valid UTF-8 */
    MSG_E_JSON = -6,       /* payload is not one well-formed JSON text */
    MSG_E_DUPKEY = -7,     /* an object repeats a key */
    MSG_E_NOT_OBJECT = -8, /* top level is not an object */
    MSG_E_MISSING = -9,    /* a required header field is absent */
    MSG_E_TYPE = -10,      /* a header field has the wrong JSON type */
    MSG_E_VALUE = -11,     /* a header field has a malformed value */
    MSG_E_VERSION = -12,   /* protocol version we do not speak */
    MSG_E_OVERLAY = -13,   /* the frame names another overlay */
    MSG_E_NOMEM = -14,
};

/* Short stable name for the wire ("frame-too-large", ...). */
const char *msg_status_code(int status);
/* One-line human description. */
const char *msg_strerror(int status);
const char *msg_kind_name(enum msg_kind kind);

/* A decoded message. Strings point into `root`; msg_clear() releases all. */
struct msg {
    json_t *root;
    int version;
    const char *overlay;
    const char *type;
    const char *tid;
    enum msg_kind kind;
    json_t *body; /* always an object (an empty one when the frame had none) */
};

/* Details of a decoding failure: the field concerned and a human reason. */
struct msg_error {
    int status;
    char field[24];
    char detail[160];
};

/*
 * Looks at the start of a byte stream. Returns MSG_OK and the whole frame's
 * size (prefix included) in *frame_len when a complete frame is there,
 * MSG_E_INCOMPLETE when more bytes are needed, MSG_E_OVERSIZE or MSG_E_EMPTY
 * as soon as the prefix alone shows the frame is bad.
 */
int msg_frame_peek(const uint8_t *buf, size_t len, size_t max_frame, size_t *frame_len);

/*
 * Decodes one payload (the bytes after the length prefix). When
 * `expect_overlay` is not NULL the frame must name that overlay. On success
 * fills *out (release with msg_clear). On failure *out is cleared and *err
 * (if not NULL) says why; the return value is the status.
 */
int msg_decode_payload(const uint8_t *payload, size_t len, const char *expect_overlay,
                       struct msg *out, struct msg_error *err);

/*
 * Decodes exactly one complete frame held in buf[0..len): the prefix must
 * match len. Truncated input gives MSG_E_TRUNCATED, trailing bytes MSG_E_VALUE.
 */
int msg_decode_frame(const uint8_t *buf, size_t len, size_t max_frame, const char *expect_overlay,
                     struct msg *out, struct msg_error *err);

void msg_clear(struct msg *m);

/* What to put in a frame's header. */
struct msg_hdr {
    const char *overlay;
    const char *type;
    enum msg_kind kind;
    const char *tid; /* MSG_TID_LEN hex digits */
};

/*
 * Encodes a frame. `body` may be NULL (an empty object is sent); its
 * reference is not taken. On success *out is a malloc'd buffer of *out_len
 * bytes, prefix included, that the caller frees. Returns MSG_OK,
 * MSG_E_OVERSIZE when the encoding exceeds max_frame, MSG_E_VALUE for a bad
 * header, or MSG_E_NOMEM.
 */
int msg_encode(const struct msg_hdr *hdr, json_t *body, size_t max_frame, uint8_t **out,
               size_t *out_len);

/*
 * Encodes an "err" frame answering `tid` (NULL when the offending frame had
 * no usable tid: "0000000000000000" is used). Body: {"code":..,"reason":..}.
 */
int msg_encode_error(const char *overlay, const char *tid, const char *code, const char *reason,
                     size_t max_frame, uint8_t **out, size_t *out_len);

/* A fresh random transaction id (MSG_TID_LEN hex digits + NUL). */
void msg_new_tid(char out[MSG_TID_LEN + 1]);

/* True when s is exactly MSG_TID_LEN lowercase hex digits. */
int msg_tid_valid(const char *s);

#endif
