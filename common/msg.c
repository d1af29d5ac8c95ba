/*
 * Frame codec (see msg.h and docs/protocol.md). The decoder is written for
 * hostile input: lengths are checked before anything is buffered, UTF-8 is
 * validated by hand before JSON parsing (so the error can say which), and
 * the header is checked field by field. Unknown top-level fields are ignored
 * so that later protocol revisions can add some.
 */
#include "msg.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "utf8.h"
#include "version.h"

static const char *const kind_names[] = {"req", "res", "err", "ind"};

static const struct {
    int status;
    const char *code;
    const char *text;
} status_table[] = {
    {MSG_OK, "ok", "no error"},
    {MSG_E_INCOMPLETE, "incomplete", "frame not complete yet"},
    {MSG_E_TRUNCATED, "truncated-frame", "input ended inside a frame"},
    {MSG_E_OVERSIZE, "frame-too-large", "frame length above the maximum"},
    {MSG_E_EMPTY, "empty-frame", "frame length is zero"},
    {MSG_E_UTF8, "invalid-utf8", "payload is not valid UTF-8"},
    {MSG_E_JSON, "invalid-json", "payload is not well-formed JSON"},
    {MSG_E_DUPKEY, "duplicate-key", "JSON object repeats a key"},
    {MSG_E_NOT_OBJECT, "not-an-object", "payload is not a JSON object"},
    {MSG_E_MISSING, "missing-field", "required header field missing"},
    {MSG_E_TYPE, "wrong-type", "header field has the wrong type"},
    {MSG_E_VALUE, "invalid-value", "header field has an invalid value"},
    {MSG_E_VERSION, "unsupported-version", "protocol version not supported"},
    {MSG_E_OVERLAY, "wrong-overlay", "frame is for another overlay"},
    {MSG_E_NOMEM, "internal-error", "out of memory"},
};

static size_t status_index(int status)
{
    for (size_t i = 0; i < sizeof(status_table) / sizeof(status_table[0]); i++)
        if (status_table[i].status == status)
            return i;
    return 0;
}

const char *msg_status_code(int status)
{
    size_t i = status_index(status);
    return (i == 0 && status != MSG_OK) ? "internal-error" : status_table[i].code;
}

const char *msg_strerror(int status)
{
    size_t i = status_index(status);
    return (i == 0 && status != MSG_OK) ? "unknown error" : status_table[i].text;
}

const char *msg_kind_name(enum msg_kind kind)
{
    return (unsigned)kind < 4 ? kind_names[kind] : "?";
}

static int fail(struct msg_error *err, int status, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(struct msg_error *err, int status, const char *field, const char *fmt, ...)
{
    if (err) {
        err->status = status;
        snprintf(err->field, sizeof(err->field), "%s", field ? field : "");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->detail, sizeof(err->detail), fmt, ap);
        va_end(ap);
    }
    return status;
}

static uint32_t read_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

int msg_frame_peek(const uint8_t *buf, size_t len, size_t max_frame, size_t *frame_len)
{
    if (len < MSG_LEN_PREFIX)
        return MSG_E_INCOMPLETE;
    uint32_t n = read_be32(buf);
    if (n == 0)
        return MSG_E_EMPTY;
    if (n > max_frame)
        return MSG_E_OVERSIZE;
    if (len < MSG_LEN_PREFIX + (size_t)n)
        return MSG_E_INCOMPLETE;
    *frame_len = MSG_LEN_PREFIX + (size_t)n;
    return MSG_OK;
}

static bool type_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MSG_TYPE_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_'))
            return false;
    }
    return true;
}

static bool overlay_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MSG_OVERLAY_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || s[i] == 0x7f) /* no controls, no spaces */
            return false;
    return true;
}

int msg_tid_valid(const char *s)
{
    if (!s || strlen(s) != MSG_TID_LEN)
        return 0;
    for (size_t i = 0; i < MSG_TID_LEN; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int kind_parse(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, kind_names[i]) == 0)
            return i;
    return -1;
}

/* Fetches a required string field; reports missing/mistyped. */
static int get_string(json_t *root, const char *key, const char **out, struct msg_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v)
        return fail(err, MSG_E_MISSING, key, "field \"%s\" is missing", key);
    if (!json_is_string(v))
        return fail(err, MSG_E_TYPE, key, "field \"%s\" must be a string", key);
    *out = json_string_value(v);
    return MSG_OK;
}

void msg_clear(struct msg *m)
{
    if (!m)
        return;
    json_decref(m->root);
    memset(m, 0, sizeof(*m));
}

int msg_decode_payload(const uint8_t *payload, size_t len, const char *expect_overlay,
                       struct msg *out, struct msg_error *err)
{
    memset(out, 0, sizeof(*out));
    if (len == 0)
        return fail(err, MSG_E_EMPTY, "", "frame length is zero");

    size_t bad = utf8_valid_prefix(payload, len);
    if (bad != len)
        return fail(err, MSG_E_UTF8, "", "invalid UTF-8 at byte %zu", bad);

    json_error_t jerr;
    json_t *root =
        json_loadb((const char *)payload, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            return fail(err, MSG_E_DUPKEY, "", "%s", jerr.text);
        if (json_error_code(&jerr) == json_error_out_of_memory)
            return fail(err, MSG_E_NOMEM, "", "out of memory");
        return fail(err, MSG_E_JSON, "", "%s at byte %d", jerr.text, jerr.position);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return fail(err, MSG_E_NOT_OBJECT, "", "top level is not an object");
    }

    int rc;
    json_t *v = json_object_get(root, "v");
    if (!v) {
        rc = fail(err, MSG_E_MISSING, "v", "field \"v\" (protocol version) is missing");
        goto fail;
    }
    if (!json_is_integer(v)) {
        rc = fail(err, MSG_E_TYPE, "v", "field \"v\" must be an integer");
        goto fail;
    }
    if (json_integer_value(v) != P2P_PROTOCOL_VERSION) {
        rc = fail(err, MSG_E_VERSION, "v", "protocol version %lld not supported (we speak %d)",
                  (long long)json_integer_value(v), P2P_PROTOCOL_VERSION);
        goto fail;
    }
    out->version = P2P_PROTOCOL_VERSION;

    const char *kind = NULL;
    if ((rc = get_string(root, "overlay", &out->overlay, err)) != MSG_OK ||
        (rc = get_string(root, "type", &out->type, err)) != MSG_OK ||
        (rc = get_string(root, "kind", &kind, err)) != MSG_OK ||
        (rc = get_string(root, "tid", &out->tid, err)) != MSG_OK)
        goto fail;

    if (!overlay_valid(out->overlay)) {
        rc = fail(err, MSG_E_VALUE, "overlay", "field \"overlay\" is not a valid overlay name");
        goto fail;
    }
    if (!type_valid(out->type)) {
        rc = fail(err, MSG_E_VALUE, "type",
                  "field \"type\" must be 1-%d characters of a-z 0-9 . - _", MSG_TYPE_MAX);
        goto fail;
    }
    int k = kind_parse(kind);
    if (k < 0) {
        rc = fail(err, MSG_E_VALUE, "kind", "field \"kind\" must be req, res, err or ind");
        goto fail;
    }
    out->kind = (enum msg_kind)k;
    if (!msg_tid_valid(out->tid)) {
        rc = fail(err, MSG_E_VALUE, "tid", "field \"tid\" must be %d lowercase hex digits",
                  MSG_TID_LEN);
        goto fail;
    }

    json_t *body = json_object_get(root, "body");
    if (body && !json_is_object(body)) {
        rc = fail(err, MSG_E_TYPE, "body", "field \"body\" must be an object");
        goto fail;
    }
    if (!body) {
        body = json_object();
        if (!body || json_object_set_new(root, "body", body) != 0) {
            rc = fail(err, MSG_E_NOMEM, "", "out of memory");
            goto fail;
        }
    }
    out->body = body;

    /* The overlay check comes last: a frame must first be well-formed to name one. */
    if (expect_overlay && strcmp(out->overlay, expect_overlay) != 0) {
        rc = fail(err, MSG_E_OVERLAY, "overlay", "frame is for overlay \"%.60s\", not \"%.60s\"",
                  out->overlay, expect_overlay);
        goto fail;
    }
    out->root = root;
    return MSG_OK;

fail:
    json_decref(root);
    memset(out, 0, sizeof(*out));
    return rc;
}

int msg_decode_frame(const uint8_t *buf, size_t len, size_t max_frame, const char *expect_overlay,
                     struct msg *out, struct msg_error *err)
{
    memset(out, 0, sizeof(*out));
    size_t frame_len = 0;
    int rc = msg_frame_peek(buf, len, max_frame, &frame_len);
    if (rc == MSG_E_INCOMPLETE) {
        if (len < MSG_LEN_PREFIX)
            return fail(err, MSG_E_TRUNCATED, "", "only %zu of 4 length bytes", len);
        return fail(err, MSG_E_TRUNCATED, "", "frame declares %u bytes, %zu present",
                    read_be32(buf), len - MSG_LEN_PREFIX);
    }
    if (rc == MSG_E_OVERSIZE)
        return fail(err, rc, "", "frame declares %u bytes, maximum is %zu", read_be32(buf),
                    max_frame);
    if (rc == MSG_E_EMPTY)
        return fail(err, rc, "", "frame length is zero");
    if (frame_len != len)
        return fail(err, MSG_E_VALUE, "", "%zu bytes after the frame", len - frame_len);
    return msg_decode_payload(buf + MSG_LEN_PREFIX, frame_len - MSG_LEN_PREFIX, expect_overlay, out,
                              err);
}

/* A frame being written by json_dump_callback(): p holds MSG_LEN_PREFIX bytes of room for the
 * length, then `len` bytes of JSON. */
struct dump_buf {
    uint8_t *p;
    size_t len, cap, max;
    bool over;
};

static int dump_append(const char *buffer, size_t size, void *data)
{
    struct dump_buf *d = data;
    if (size > d->max - d->len) {
        d->over = true;
        return -1;
    }
    if (MSG_LEN_PREFIX + d->len + size > d->cap) {
        size_t cap = d->cap ? d->cap : 1024;
        while (cap < MSG_LEN_PREFIX + d->len + size)
            cap *= 2;
        uint8_t *np = realloc(d->p, cap);
        if (!np)
            return -1;
        d->p = np;
        d->cap = cap;
    }
    memcpy(d->p + MSG_LEN_PREFIX + d->len, buffer, size);
    d->len += size;
    return 0;
}

int msg_encode(const struct msg_hdr *hdr, json_t *body, size_t max_frame, uint8_t **out,
               size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    if (!hdr->overlay || !overlay_valid(hdr->overlay) || !hdr->type || !type_valid(hdr->type) ||
        (unsigned)hdr->kind > MSG_IND || !msg_tid_valid(hdr->tid) ||
        (body && !json_is_object(body)))
        return MSG_E_VALUE;

    /* "o" steals the reference we pass, on success and on failure alike. */
    json_t *b = body ? json_incref(body) : json_object();
    json_t *root = json_pack("{s:i, s:s, s:s, s:s, s:s, s:o}", "v", P2P_PROTOCOL_VERSION, "overlay",
                             hdr->overlay, "type", hdr->type, "kind", kind_names[hdr->kind], "tid",
                             hdr->tid, "body", b);
    if (!root)
        return MSG_E_NOMEM;

    /* One pass: jansson writes into a buffer that grows, the length prefix is filled in after. */
    struct dump_buf d = {.max = max_frame};
    int dr = json_dump_callback(root, dump_append, &d, JSON_COMPACT);
    json_decref(root);
    if (dr != 0 || d.len == 0) {
        free(d.p);
        return d.over ? MSG_E_OVERSIZE : MSG_E_NOMEM;
    }
    size_t n = d.len;
    uint8_t *buf = d.p;
    buf[0] = (uint8_t)(n >> 24);
    buf[1] = (uint8_t)(n >> 16);
    buf[2] = (uint8_t)(n >> 8);
    buf[3] = (uint8_t)n;
    *out = buf;
    *out_len = MSG_LEN_PREFIX + n;
    return MSG_OK;
}

int msg_encode_error(const char *overlay, const char *tid, const char *code, const char *reason,
                     size_t max_frame, uint8_t **out, size_t *out_len)
{
    json_t *body = json_object();
    if (!body)
        return MSG_E_NOMEM;
    json_object_set_new(body, "code", json_string(code ? code : "error"));
    /* A reason may quote peer bytes; json_string refuses invalid UTF-8, so fall back. */
    json_t *r = json_string(reason ? reason : "");
    json_object_set_new(body, "reason", r ? r : json_string("(unprintable)"));
    struct msg_hdr h = {
        .overlay = overlay,
        .type = "error",
        .kind = MSG_ERR,
        .tid = msg_tid_valid(tid) ? tid : "0000000000000000",
    };
    int rc = msg_encode(&h, body, max_frame, out, out_len);
    json_decref(body);
    return rc;
}

void msg_new_tid(char out[MSG_TID_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t r[MSG_TID_LEN / 2];
    if (gnutls_rnd(GNUTLS_RND_NONCE, r, sizeof(r)) != 0) {
        /* The nonce generator does not fail in practice; never hand out a fixed tid. */
        for (size_t i = 0; i < sizeof(r); i++)
            r[i] = (uint8_t)random();
    }
    for (size_t i = 0; i < sizeof(r); i++) {
        out[2 * i] = hex[r[i] >> 4];
        out[2 * i + 1] = hex[r[i] & 15];
    }
    out[MSG_TID_LEN] = '\0';
}
