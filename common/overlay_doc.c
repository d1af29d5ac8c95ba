/*
 * The signed overlay configuration document (see overlay_doc.h). Checking
 * happens in a fixed order so that nothing unauthenticated is believed:
 * envelope shape, then the CA certificate against the pin, then the
 * signature with that certificate, and only then the document's content.
 * Each refusal gets its own message, because an operator reading a node's
 * log must be able to tell a wrong pin from a rollback or a broken server.
 */
#include "overlay_doc.h"

#include <gnutls/crypto.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cred.h"

#define MAX_URLS     64
#define MAX_URL_LEN  2048
#define MAX_NAME_LEN 255

/* Base64 (RFC 4648, standard alphabet, padded). */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *overlay_b64_encode(const unsigned char *data, size_t len)
{
    size_t outlen = (len + 2) / 3 * 4;
    char *out = malloc(outlen + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)data[i + 1] << 8;
        if (i + 2 < len)
            v |= data[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < len ? b64_alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < len ? b64_alphabet[v & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static int b64_value(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= 'a' && ch <= 'z')
        return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9')
        return ch - '0' + 52;
    if (ch == '+')
        return 62;
    if (ch == '/')
        return 63;
    return -1;
}

/* Strict base64 (padding required, no stray bits under it) into `out`, or only checked when
 * `out` is NULL. Returns the decoded length, or -1 when `s` is not strict base64. */
static long b64_decode(const char *s, size_t slen, unsigned char *out)
{
    if (slen == 0 || slen % 4 != 0)
        return -1;
    size_t pad = 0;
    if (s[slen - 1] == '=')
        pad = s[slen - 2] == '=' ? 2 : 1;
    size_t o = 0;
    for (size_t i = 0; i < slen; i += 4) {
        bool last = i + 4 == slen;
        int v[4];
        for (size_t k = 0; k < 4; k++) {
            if (last && k >= 4 - pad) {
                v[k] = 0;
                continue;
            }
            v[k] = b64_value((unsigned char)s[i + k]);
            if (v[k] < 0)
                return -1;
        }
        uint32_t w =
            (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        /* Non-zero bits under the padding would let two strings decode alike. */
        if (last && ((pad == 1 && (w & 0xff)) || (pad == 2 && (w & 0xffff))))
            return -1;
        size_t n = last ? 3 - pad : 3;
        if (out) {
            out[o] = (unsigned char)(w >> 16);
            if (n > 1)
                out[o + 1] = (unsigned char)(w >> 8);
            if (n > 2)
                out[o + 2] = (unsigned char)w;
        }
        o += n;
    }
    return (long)o;
}

unsigned char *overlay_b64_decode(const char *s, size_t slen, size_t *outlen)
{
    if (slen == 0 || slen % 4 != 0)
        return NULL;
    unsigned char *out = malloc(slen / 4 * 3);
    if (!out)
        return NULL;
    long n = b64_decode(s, slen, out);
    if (n < 0) {
        free(out);
        return NULL;
    }
    *outlen = (size_t)n;
    return out;
}

size_t overlay_b64_valid(const char *s, size_t slen)
{
    long n = b64_decode(s, slen, NULL);
    return n < 0 ? 0 : (size_t)n;
}

/* Pin */

int overlay_doc_pin(gnutls_x509_crt_t ca, char out[OVERLAY_PIN_LEN])
{
    gnutls_datum_t der = {NULL, 0};
    unsigned char hash[32];
    int r = gnutls_x509_crt_export2(ca, GNUTLS_X509_FMT_DER, &der);
    if (r < 0)
        return r;
    r = gnutls_hash_fast(GNUTLS_DIG_SHA256, der.data, der.size, hash);
    gnutls_free(der.data);
    if (r < 0)
        return r;
    memcpy(out, "sha256:", 7);
    for (size_t i = 0; i < sizeof(hash); i++)
        snprintf(out + 7 + 2 * i, 3, "%02x", hash[i]);
    return 0;
}

/* Accepts "sha256:" + 64 hex digits of either case; writes the lowercase form. */
static bool normalize_pin(const char *pin, char out[OVERLAY_PIN_LEN])
{
    if (!pin || strncmp(pin, "sha256:", 7) != 0 || strlen(pin) != OVERLAY_PIN_LEN - 1)
        return false;
    memcpy(out, "sha256:", 7);
    for (size_t i = 7; i < OVERLAY_PIN_LEN - 1; i++) {
        char ch = pin[i];
        if (ch >= 'A' && ch <= 'F')
            ch = (char)(ch - 'A' + 'a');
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
            return false;
        out[i] = ch;
    }
    out[OVERLAY_PIN_LEN - 1] = '\0';
    return true;
}

/* Building and signing */

void overlay_doc_defaults(struct overlay_doc *d)
{
    d->format = OVERLAY_DOC_FORMAT;
    d->replication_factor = 3;
    d->max_record_bytes = 4096;
    d->max_record_lifetime_s = 86400;
    d->keepalive_s = 15;
    d->stabilize_s = 5;
    d->successor_list = 8;
    d->promotion.min_uptime_s = 3600;
    d->promotion.min_cpus = 2;
    d->promotion.min_free_mem_mb = 512;
    d->promotion.min_bandwidth_kbps = 2000;
    d->promotion.sn_target_load = 500;
    d->cert_validity_days = 365;
}

static int set_new(json_t *obj, const char *key, json_t *val)
{
    /* json_object_set_new takes `val` even when it fails, and NULL makes it fail. */
    return json_object_set_new(obj, key, val);
}

static json_t *str_array(char *const *v, size_t n)
{
    json_t *a = json_array();
    if (!a)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (!v[i] || json_array_append_new(a, json_string(v[i])) < 0) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

char *overlay_doc_build(const struct overlay_doc *in)
{
    char *text = NULL;
    json_t *o = NULL, *p = NULL;
    if (!in || !in->overlay || !in->issued_at || !in->ca_cert_pem || !in->lan_discovery ||
        (in->n_login_urls && !in->login_urls) || (in->n_bootstrap_urls && !in->bootstrap_urls))
        return NULL;
    if (!(o = json_object()))
        return NULL;
    if (set_new(o, "format", json_integer(in->format)) < 0 ||
        set_new(o, "overlay", json_string(in->overlay)) < 0 ||
        set_new(o, "sequence", json_integer(in->sequence)) < 0 ||
        set_new(o, "issued_at", json_string(in->issued_at)) < 0 ||
        set_new(o, "ca_cert", json_string(in->ca_cert_pem)) < 0 ||
        set_new(o, "login_urls", str_array(in->login_urls, in->n_login_urls)) < 0 ||
        set_new(o, "bootstrap_urls", str_array(in->bootstrap_urls, in->n_bootstrap_urls)) < 0 ||
        set_new(o, "replication_factor", json_integer(in->replication_factor)) < 0 ||
        set_new(o, "max_record_bytes", json_integer(in->max_record_bytes)) < 0 ||
        set_new(o, "max_record_lifetime_s", json_integer(in->max_record_lifetime_s)) < 0 ||
        set_new(o, "keepalive_s", json_integer(in->keepalive_s)) < 0 ||
        set_new(o, "stabilize_s", json_integer(in->stabilize_s)) < 0 ||
        set_new(o, "successor_list", json_integer(in->successor_list)) < 0)
        goto out;
    if (!(p = json_object()))
        goto out;
    if (set_new(p, "min_uptime_s", json_integer(in->promotion.min_uptime_s)) < 0 ||
        set_new(p, "min_cpus", json_integer(in->promotion.min_cpus)) < 0 ||
        set_new(p, "min_free_mem_mb", json_integer(in->promotion.min_free_mem_mb)) < 0 ||
        set_new(p, "min_bandwidth_kbps", json_integer(in->promotion.min_bandwidth_kbps)) < 0 ||
        set_new(p, "sn_target_load", json_integer(in->promotion.sn_target_load)) < 0)
        goto out;
    int r = json_object_set_new(o, "promotion", p);
    p = NULL;
    if (r < 0)
        goto out;
    if (set_new(o, "lan_discovery", json_string(in->lan_discovery)) < 0 ||
        set_new(o, "cert_validity_days", json_integer(in->cert_validity_days)) < 0)
        goto out;
    if (in->n_sip_proxies > 0) { /* optional: absent when no domain has a P2P proxy */
        json_t *a = json_array();
        if (set_new(o, "sip_proxies", a) < 0)
            goto out;
        for (size_t i = 0; i < in->n_sip_proxies; i++)
            if (!in->sip_proxies[i].domain || !in->sip_proxies[i].uri ||
                json_array_append_new(a, json_pack("{s:s,s:s}", "domain", in->sip_proxies[i].domain,
                                                   "uri", in->sip_proxies[i].uri)) < 0)
                goto out;
    }
    /* jansson keeps insertion order, so the output is the table's order. */
    text = json_dumps(o, JSON_COMPACT);
out:
    json_decref(p);
    json_decref(o);
    return text;
}

int overlay_doc_sign(gnutls_x509_privkey_t ca_key, const char *document_text, char **envelope_out)
{
    gnutls_datum_t sig = {NULL, 0};
    char *b64 = NULL;
    json_t *env = NULL;
    int r;

    *envelope_out = NULL;
    if (!ca_key || !document_text)
        return GNUTLS_E_INVALID_REQUEST;
    size_t len = strlen(document_text);
    if ((r = cred_sign(ca_key, document_text, len, &sig)) < 0)
        return r;
    r = GNUTLS_E_MEMORY_ERROR;
    if (!(b64 = overlay_b64_encode(sig.data, sig.size)))
        goto out;
    if (!(env = json_object()))
        goto out;
    json_t *doc = json_stringn(document_text, len);
    if (!doc) {
        r = GNUTLS_E_INVALID_REQUEST; /* not UTF-8 */
        goto out;
    }
    if (json_object_set_new(env, "document", doc) < 0 ||
        json_object_set_new(env, "signature", json_string(b64)) < 0)
        goto out;
    if (!(*envelope_out = json_dumps(env, JSON_COMPACT)))
        goto out;
    r = 0;
out:
    json_decref(env);
    free(b64);
    gnutls_free(sig.data);
    return r;
}

/* Verification */

static int fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        int n = snprintf(err, errlen, "overlay document: ");
        if (n >= 0 && (size_t)n < errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return code;
}

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* Member readers: each returns 0 or an OVERLAY_DOC_ERR_* code with `err` filled. */

static int get_int(json_t *obj, const char *prefix, const char *key, int64_t min, int64_t max,
                   int64_t *out, char *err, size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s%s\" is missing", prefix,
                    key);
    if (!json_is_integer(v))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s%s\" is not an integer",
                    prefix, key);
    int64_t x = json_integer_value(v);
    if (x < min || x > max)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"%s%s\" is %" PRId64 ", outside %" PRId64 "..%" PRId64, prefix, key, x,
                    min, max);
    *out = x;
    return 0;
}

static bool has_space_or_control(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 0x20 || ch == 0x7f)
            return true;
    }
    return false;
}

static int get_str(json_t *obj, const char *key, size_t maxlen, json_t **out, char *err,
                   size_t errlen)
{
    json_t *v = json_object_get(obj, key);
    if (!v)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s\" is missing", key);
    if (!json_is_string(v))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s\" is not a string", key);
    if (json_string_length(v) == 0 || json_string_length(v) > maxlen)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"%s\" must be 1-%zu bytes long", key, maxlen);
    *out = v;
    return 0;
}

static bool is_https_url(const char *s, size_t n)
{
    return n > 8 && strncmp(s, "https://", 8) == 0 && !has_space_or_control(s, n);
}

static int get_urls(json_t *obj, const char *key, char ***out, size_t *nout, char *err,
                    size_t errlen)
{
    json_t *a = json_object_get(obj, key);
    if (!a)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s\" is missing", key);
    if (!json_is_array(a))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s\" is not an array", key);
    size_t n = json_array_size(a);
    if (n > MAX_URLS)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"%s\" has more than %d URLs",
                    key, MAX_URLS);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_string(v))
            return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "%s[%zu] is not a string", key, i);
        if (json_string_length(v) > MAX_URL_LEN ||
            !is_https_url(json_string_value(v), json_string_length(v)))
            return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "%s[%zu] is not an https:// URL",
                        key, i);
    }
    char **v = calloc(n ? n : 1, sizeof(*v));
    if (!v)
        return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
    *out = v;
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_array_get(a, i);
        if (!(v[i] = dup_n(json_string_value(s), json_string_length(s))))
            return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
        *nout = i + 1;
    }
    return 0;
}

#define MAX_SIP_PROXIES 256

/* The optional "sip_proxies": [{"domain", "uri"}]. */
static int get_sip_proxies(json_t *d, struct overlay_doc *out, char *err, size_t errlen)
{
    json_t *a = json_object_get(d, "sip_proxies");
    if (!a)
        return 0;
    if (!json_is_array(a))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"sip_proxies\" is not an array");
    size_t n = json_array_size(a);
    if (n > MAX_SIP_PROXIES)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"sip_proxies\" has more than %d entries", MAX_SIP_PROXIES);
    if (n == 0)
        return 0;
    if (!(out->sip_proxies = calloc(n, sizeof(*out->sip_proxies))))
        return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(a, i), *dom, *uri;
        int r;
        if (!json_is_object(e))
            return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "sip_proxies[%zu] is not an object",
                        i);
        if ((r = get_str(e, "domain", MAX_NAME_LEN, &dom, err, errlen)) < 0 ||
            (r = get_str(e, "uri", MAX_NAME_LEN, &uri, err, errlen)) < 0)
            return r;
        if (has_space_or_control(json_string_value(dom), json_string_length(dom)) ||
            has_space_or_control(json_string_value(uri), json_string_length(uri)) ||
            strncmp(json_string_value(uri), "sip:", 4) != 0)
            return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                        "sip_proxies[%zu] needs a domain and a sip: URI without spaces", i);
        if (!(out->sip_proxies[i].domain =
                  dup_n(json_string_value(dom), json_string_length(dom))) ||
            !(out->sip_proxies[i].uri = dup_n(json_string_value(uri), json_string_length(uri))))
            return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
        out->n_sip_proxies = i + 1;
    }
    return 0;
}

/* "YYYY-MM-DDTHH:MM:SS[.fraction]Z" */
static bool is_rfc3339_utc(const char *s, size_t n)
{
    static const char shape[] = "dddd-dd-ddTdd:dd:dd";
    size_t k = sizeof(shape) - 1;
    if (n < k + 1 || s[n - 1] != 'Z')
        return false;
    for (size_t i = 0; i < k; i++) {
        if (shape[i] == 'd' ? !(s[i] >= '0' && s[i] <= '9') : s[i] != shape[i])
            return false;
    }
    if (n == k + 1)
        return true;
    if (s[k] != '.' || n < k + 3)
        return false;
    for (size_t i = k + 1; i < n - 1; i++)
        if (!(s[i] >= '0' && s[i] <= '9'))
            return false;
    return true;
}

static int check_ca(gnutls_x509_crt_t ca, char *err, size_t errlen)
{
    unsigned critical = 0, is_ca = 0;
    int pathlen = 0;
    int r = gnutls_x509_crt_get_basic_constraints(ca, &critical, &is_ca, &pathlen);
    if (r < 0 || !is_ca)
        return fail(err, errlen, OVERLAY_DOC_ERR_CA,
                    "ca_cert is not a CA certificate (no basicConstraints CA:TRUE)");
    time_t now = time(NULL);
    time_t nb = gnutls_x509_crt_get_activation_time(ca);
    time_t na = gnutls_x509_crt_get_expiration_time(ca);
    char when[32];
    struct tm tm;
    if (nb == (time_t)-1 || na == (time_t)-1)
        return fail(err, errlen, OVERLAY_DOC_ERR_CA, "ca_cert has no readable validity period");
    if (now < nb) {
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&nb, &tm));
        return fail(err, errlen, OVERLAY_DOC_ERR_CA, "ca_cert is not valid before %s", when);
    }
    if (now > na) {
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&na, &tm));
        return fail(err, errlen, OVERLAY_DOC_ERR_CA, "ca_cert expired at %s", when);
    }
    return 0;
}

static int parse_members(json_t *d, struct overlay_doc *out, char *err, size_t errlen)
{
    json_t *s;
    int r;

    if ((r = get_str(d, "overlay", MAX_NAME_LEN, &s, err, errlen)) < 0)
        return r;
    if (has_space_or_control(json_string_value(s), json_string_length(s)))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"overlay\" contains spaces or control characters");
    if (!(out->overlay = dup_n(json_string_value(s), json_string_length(s))))
        return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");

    if ((r = get_str(d, "issued_at", 64, &s, err, errlen)) < 0)
        return r;
    if (!is_rfc3339_utc(json_string_value(s), json_string_length(s)))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"issued_at\" is not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)");
    if (!(out->issued_at = dup_n(json_string_value(s), json_string_length(s))))
        return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");

    if ((r = get_urls(d, "login_urls", &out->login_urls, &out->n_login_urls, err, errlen)) < 0 ||
        (r = get_urls(d, "bootstrap_urls", &out->bootstrap_urls, &out->n_bootstrap_urls, err,
                      errlen)) < 0)
        return r;

    static const struct {
        const char *key;
        size_t off;
        int64_t min, max;
    } ints[] = {
        {"replication_factor", offsetof(struct overlay_doc, replication_factor), 1, 64},
        {"max_record_bytes", offsetof(struct overlay_doc, max_record_bytes), 1, 16 << 20},
        {"max_record_lifetime_s", offsetof(struct overlay_doc, max_record_lifetime_s), 1,
         INT32_MAX},
        {"keepalive_s", offsetof(struct overlay_doc, keepalive_s), 1, 86400},
        {"stabilize_s", offsetof(struct overlay_doc, stabilize_s), 1, 86400},
        {"successor_list", offsetof(struct overlay_doc, successor_list), 1, 64},
        {"cert_validity_days", offsetof(struct overlay_doc, cert_validity_days), 1, 36500},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        int64_t *dst = (int64_t *)(void *)((char *)out + ints[i].off);
        if ((r = get_int(d, "", ints[i].key, ints[i].min, ints[i].max, dst, err, errlen)) < 0)
            return r;
    }

    json_t *p = json_object_get(d, "promotion");
    if (!p)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "member \"promotion\" is missing");
    if (!json_is_object(p))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"promotion\" is not an object");
    const char *pp = "promotion.";
    struct overlay_promotion *pr = &out->promotion;
    if ((r = get_int(p, pp, "min_uptime_s", 0, INT64_MAX, &pr->min_uptime_s, err, errlen)) < 0 ||
        (r = get_int(p, pp, "min_cpus", 0, INT64_MAX, &pr->min_cpus, err, errlen)) < 0 ||
        (r = get_int(p, pp, "min_free_mem_mb", 0, INT64_MAX, &pr->min_free_mem_mb, err, errlen)) <
            0 ||
        (r = get_int(p, pp, "min_bandwidth_kbps", 0, INT64_MAX, &pr->min_bandwidth_kbps, err,
                     errlen)) < 0 ||
        (r = get_int(p, pp, "sn_target_load", 1, INT64_MAX, &pr->sn_target_load, err, errlen)) < 0)
        return r;

    if ((r = get_str(d, "lan_discovery", MAX_NAME_LEN, &s, err, errlen)) < 0)
        return r;
    if (has_space_or_control(json_string_value(s), json_string_length(s)))
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                    "member \"lan_discovery\" contains spaces or control characters");
    if (!(out->lan_discovery = dup_n(json_string_value(s), json_string_length(s))))
        return fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
    return get_sip_proxies(d, out, err, errlen);
}

int overlay_doc_verify(const char *envelope, size_t len, const char *pin, int64_t min_sequence,
                       struct overlay_doc *out, char *err, size_t errlen)
{
    json_t *env = NULL, *doc = NULL;
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    json_error_t je;
    char want[OVERLAY_PIN_LEN], have[OVERLAY_PIN_LEN];
    int r;

    memset(out, 0, sizeof(*out));
    if (err && errlen)
        err[0] = '\0';
    if (!normalize_pin(pin, want))
        return fail(err, errlen, OVERLAY_DOC_ERR_PIN,
                    "the pin \"%.80s\" is not of the form sha256:<64 hex digits>",
                    pin ? pin : "(none)");
    if (!envelope)
        return fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED, "no envelope");

    /* Envelope */
    env = json_loadb(envelope, len, JSON_REJECT_DUPLICATES, &je);
    if (!env) {
        r = fail(err, errlen, OVERLAY_DOC_ERR_MALFORMED,
                 "envelope is not valid JSON (line %d, column %d: %s)", je.line, je.column,
                 je.text);
        goto out;
    }
    r = OVERLAY_DOC_ERR_MALFORMED;
    if (!json_is_object(env)) {
        fail(err, errlen, r, "envelope is not a JSON object");
        goto out;
    }
    json_t *jd = json_object_get(env, "document");
    json_t *js = json_object_get(env, "signature");
    if (!json_is_string(jd)) {
        fail(err, errlen, r, "envelope has no \"document\" string");
        goto out;
    }
    if (!json_is_string(js)) {
        fail(err, errlen, r, "envelope has no \"signature\" string");
        goto out;
    }
    const char *text = json_string_value(jd);
    size_t text_len = json_string_length(jd);
    sig = overlay_b64_decode(json_string_value(js), json_string_length(js), &sig_len);
    if (!sig) {
        fail(err, errlen, r, "signature is not valid base64");
        goto out;
    }

    /* The document's CA, authenticated by the pin before anything else is believed. */
    doc = json_loadb(text, text_len, JSON_REJECT_DUPLICATES, &je);
    if (!doc) {
        fail(err, errlen, r, "document is not valid JSON (line %d, column %d: %s)", je.line,
             je.column, je.text);
        goto out;
    }
    if (!json_is_object(doc)) {
        fail(err, errlen, r, "document is not a JSON object");
        goto out;
    }
    json_t *jca;
    if ((r = get_str(doc, "ca_cert", 65536, &jca, err, errlen)) < 0)
        goto out;
    r = OVERLAY_DOC_ERR_MALFORMED;
    if (!(out->ca_cert_pem = dup_n(json_string_value(jca), json_string_length(jca))))
        goto nomem;
    gnutls_datum_t pem = {(unsigned char *)out->ca_cert_pem, (unsigned)json_string_length(jca)};
    int gr;
    if ((gr = gnutls_x509_crt_init(&out->ca_crt)) < 0)
        goto nomem;
    if ((gr = gnutls_x509_crt_import(out->ca_crt, &pem, GNUTLS_X509_FMT_PEM)) < 0) {
        fail(err, errlen, r, "ca_cert is not a PEM certificate: %s", gnutls_strerror(gr));
        goto out;
    }
    if ((gr = overlay_doc_pin(out->ca_crt, have)) < 0) {
        fail(err, errlen, r, "cannot hash ca_cert: %s", gnutls_strerror(gr));
        goto out;
    }
    if (strcmp(have, want) != 0) {
        r = fail(err, errlen, OVERLAY_DOC_ERR_PIN,
                 "CA certificate does not match the pin (expected %s, the document's CA is %s)",
                 want, have);
        goto out;
    }
    gnutls_datum_t sd = {sig, (unsigned)sig_len};
    if ((gr = cred_verify(out->ca_crt, text, text_len, &sd)) < 0) {
        r = fail(err, errlen, OVERLAY_DOC_ERR_SIGNATURE,
                 "signature does not verify with the pinned CA: %s", gnutls_strerror(gr));
        goto out;
    }
    if ((r = check_ca(out->ca_crt, err, errlen)) < 0)
        goto out;

    /* Authenticated: now the content. */
    if ((r = get_int(doc, "", "format", INT64_MIN, INT64_MAX, &out->format, err, errlen)) < 0)
        goto out;
    if (out->format != OVERLAY_DOC_FORMAT) {
        r = fail(err, errlen, OVERLAY_DOC_ERR_FORMAT,
                 "format %" PRId64 " is not supported (this node speaks format %d)", out->format,
                 OVERLAY_DOC_FORMAT);
        goto out;
    }
    if ((r = get_int(doc, "", "sequence", 0, INT64_MAX, &out->sequence, err, errlen)) < 0)
        goto out;
    if (out->sequence < min_sequence) {
        r = fail(err, errlen, OVERLAY_DOC_ERR_ROLLBACK,
                 "rollback: document sequence %" PRId64 " is older than %" PRId64 " already seen",
                 out->sequence, min_sequence);
        goto out;
    }
    if ((r = parse_members(doc, out, err, errlen)) < 0)
        goto out;
    if (!(out->document_text = dup_n(text, text_len)))
        goto nomem;
    memcpy(out->pin, have, sizeof(have));
    r = 0;
    goto out;
nomem:
    r = fail(err, errlen, OVERLAY_DOC_ERR_NOMEM, "out of memory");
out:
    if (r < 0)
        overlay_doc_free(out);
    free(sig);
    json_decref(doc);
    json_decref(env);
    return r;
}

void overlay_doc_free(struct overlay_doc *d)
{
    if (!d)
        return;
    free(d->overlay);
    free(d->issued_at);
    free(d->ca_cert_pem);
    for (size_t i = 0; i < d->n_login_urls; i++)
        free(d->login_urls[i]);
    free(d->login_urls);
    for (size_t i = 0; i < d->n_bootstrap_urls; i++)
        free(d->bootstrap_urls[i]);
    free(d->bootstrap_urls);
    free(d->lan_discovery);
    for (size_t i = 0; i < d->n_sip_proxies; i++) {
        free(d->sip_proxies[i].domain);
        free(d->sip_proxies[i].uri);
    }
    free(d->sip_proxies);
    free(d->document_text);
    gnutls_x509_crt_deinit(d->ca_crt);
    memset(d, 0, sizeof(*d));
}
