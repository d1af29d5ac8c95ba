/*
 * Unit tests for overlay_doc.c: a document built and signed the way the
 * login server does it verifies, and every way a document can be wrong (pin,
 * signature, tampering, rollback, envelope shape, members, CA certificate) is
 * refused with its own code and a message that says which.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cred.h"
#include "overlay_doc.h"
#include "testca.h"

struct fx {
    struct testca ca, other;
    char *ca_pem;
    char pin[OVERLAY_PIN_LEN];
    char *login_urls[2];
    char *bootstrap_urls[1];
    struct overlay_doc doc; /* input for overlay_doc_build (strings not owned) */
};

static char *pem_of(gnutls_x509_crt_t crt)
{
    gnutls_datum_t pem = {NULL, 0};
    assert_int_equal(cred_cert_export_pem(crt, &pem), 0);
    char *s = strndup((const char *)pem.data, pem.size);
    gnutls_free(pem.data);
    assert_non_null(s);
    return s;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f || testca_init(&f->ca) < 0 || testca_init(&f->other) < 0)
        return -1;
    f->ca_pem = pem_of(f->ca.crt);
    if (overlay_doc_pin(f->ca.crt, f->pin) < 0)
        return -1;
    f->login_urls[0] = "https://login.test.example:8443";
    f->login_urls[1] = "https://127.0.0.1:8443";
    f->bootstrap_urls[0] = "https://boot.test.example";
    overlay_doc_defaults(&f->doc);
    f->doc.overlay = "test.example";
    f->doc.sequence = 5;
    f->doc.issued_at = "2026-11-21T20:40:00Z";
    f->doc.ca_cert_pem = f->ca_pem;
    f->doc.login_urls = f->login_urls;
    f->doc.n_login_urls = 2;
    f->doc.bootstrap_urls = f->bootstrap_urls;
    f->doc.n_bootstrap_urls = 1;
    f->doc.lan_discovery = "239.255.42.99:7077";
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    testca_cleanup(&f->ca);
    testca_cleanup(&f->other);
    free(f->ca_pem);
    free(f);
    return 0;
}

/*
 * Signs `text` with `key` into an envelope (caller frees). Not inlined: GCC
 * 12 then takes the envelope for a pointer to the local whose address
 * overlay_doc_sign() got, and warns about a dangling pointer (it is not).
 */
__attribute__((noinline)) static char *sign(gnutls_x509_privkey_t key, const char *text)
{
    char *env = NULL;
    assert_int_equal(overlay_doc_sign(key, text, &env), 0);
    assert_non_null(env);
    return env;
}

static char *good_envelope(struct fx *f)
{
    char *text = overlay_doc_build(&f->doc);
    assert_non_null(text);
    char *env = sign(f->ca.key, text);
    free(text);
    return env;
}

/* Verifies and expects failure with `code` and `needle` in the message. */
static void expect_refused(const char *env, size_t len, const char *pin, int64_t min_seq, int code,
                           const char *needle)
{
    struct overlay_doc out;
    char err[512] = "";
    int r = overlay_doc_verify(env, len, pin, min_seq, &out, err, sizeof(err));
    if (r != code || !strstr(err, needle))
        print_error("got %d \"%s\", expected %d with \"%s\"\n", r, err, code, needle);
    assert_int_equal(r, code);
    assert_non_null(strstr(err, needle));
    assert_null(out.overlay); /* zeroed on failure */
    assert_null(out.ca_crt);
    overlay_doc_free(&out);
}

/* Parses the built document, lets `edit` change it, re-serialises and signs with the CA. */
static char *edited_envelope(struct fx *f, void (*edit)(json_t *doc, const void *arg),
                             const void *arg)
{
    char *text = overlay_doc_build(&f->doc);
    json_t *d = json_loads(text, 0, NULL);
    assert_non_null(d);
    free(text);
    edit(d, arg);
    text = json_dumps(d, JSON_COMPACT);
    json_decref(d);
    char *env = sign(f->ca.key, text);
    free(text);
    return env;
}

static void test_roundtrip(void **state)
{
    struct fx *f = *state;
    char *text = overlay_doc_build(&f->doc);
    char *again = overlay_doc_build(&f->doc);
    assert_string_equal(text, again); /* deterministic */
    assert_true(!strncmp(text, "{\"format\":1,\"overlay\":\"test.example\",\"sequence\":5,", 50));
    free(again);

    char *env = sign(f->ca.key, text);
    struct overlay_doc out;
    char err[512] = "";
    assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 0, &out, err, sizeof(err)), 0);
    assert_string_equal(err, "");
    assert_string_equal(out.document_text, text);
    assert_string_equal(out.pin, f->pin);
    assert_non_null(out.ca_crt);
    assert_int_equal(out.format, 1);
    assert_string_equal(out.overlay, "test.example");
    assert_int_equal(out.sequence, 5);
    assert_string_equal(out.issued_at, "2026-11-21T20:40:00Z");
    assert_string_equal(out.ca_cert_pem, f->ca_pem);
    assert_int_equal(out.n_login_urls, 2);
    assert_string_equal(out.login_urls[0], f->login_urls[0]);
    assert_string_equal(out.login_urls[1], f->login_urls[1]);
    assert_int_equal(out.n_bootstrap_urls, 1);
    assert_string_equal(out.bootstrap_urls[0], f->bootstrap_urls[0]);
    assert_int_equal(out.replication_factor, f->doc.replication_factor);
    assert_int_equal(out.max_record_bytes, f->doc.max_record_bytes);
    assert_int_equal(out.max_record_lifetime_s, f->doc.max_record_lifetime_s);
    assert_int_equal(out.keepalive_s, f->doc.keepalive_s);
    assert_int_equal(out.stabilize_s, f->doc.stabilize_s);
    assert_int_equal(out.successor_list, f->doc.successor_list);
    assert_memory_equal(&out.promotion, &f->doc.promotion, sizeof(out.promotion));
    assert_string_equal(out.lan_discovery, "239.255.42.99:7077");
    assert_int_equal(out.cert_validity_days, f->doc.cert_validity_days);

    /* The document a verified envelope carries rebuilds to the same bytes. */
    char *rebuilt = overlay_doc_build(&out);
    assert_string_equal(rebuilt, text);
    free(rebuilt);
    overlay_doc_free(&out);
    assert_null(out.overlay);
    overlay_doc_free(NULL);

    /* The pin's hex may come in capitals (certtool prints them so). */
    char upper[OVERLAY_PIN_LEN];
    memcpy(upper, f->pin, sizeof(upper));
    for (char *p = upper + 7; *p; p++)
        if (*p >= 'a' && *p <= 'f')
            *p = (char)(*p - 'a' + 'A');
    assert_int_equal(overlay_doc_verify(env, strlen(env), upper, 5, &out, err, sizeof(err)), 0);
    assert_string_equal(out.pin, f->pin);
    overlay_doc_free(&out);

    /* Empty bootstrap list is allowed. */
    f->doc.n_bootstrap_urls = 0;
    free(env);
    env = good_envelope(f);
    assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 0, &out, err, sizeof(err)), 0);
    assert_int_equal(out.n_bootstrap_urls, 0);
    overlay_doc_free(&out);
    f->doc.n_bootstrap_urls = 1;
    free(env);
    free(text);
}

static void test_pin(void **state)
{
    struct fx *f = *state;
    char *env = good_envelope(f);
    char other_pin[OVERLAY_PIN_LEN];
    assert_int_equal(overlay_doc_pin(f->other.crt, other_pin), 0);
    assert_string_not_equal(other_pin, f->pin);
    assert_int_equal(strlen(f->pin), OVERLAY_PIN_LEN - 1);
    assert_true(!strncmp(f->pin, "sha256:", 7));

    expect_refused(env, strlen(env), other_pin, 0, OVERLAY_DOC_ERR_PIN,
                   "CA certificate does not match the pin");
    expect_refused(env, strlen(env), "sha256:1234", 0, OVERLAY_DOC_ERR_PIN,
                   "not of the form sha256:<64 hex digits>");
    expect_refused(env, strlen(env), NULL, 0, OVERLAY_DOC_ERR_PIN, "not of the form");
    char bad[OVERLAY_PIN_LEN];
    memcpy(bad, f->pin, sizeof(bad));
    bad[10] = 'g';
    expect_refused(env, strlen(env), bad, 0, OVERLAY_DOC_ERR_PIN, "not of the form");
    free(env);
}

static void test_tampered_document(void **state)
{
    struct fx *f = *state;
    char *env = good_envelope(f);
    /* Still valid JSON with a valid CA: only the signature can tell. */
    const char *p = strstr(env, "\\\"sequence\\\":5");
    assert_non_null(p);
    env[(size_t)(p - env) + strlen("\\\"sequence\\\":")] = '9';
    expect_refused(env, strlen(env), f->pin, 0, OVERLAY_DOC_ERR_SIGNATURE,
                   "signature does not verify with the pinned CA");
    free(env);

    /* A change the JSON parser would not see (whitespace) breaks the signature too. */
    char *text = overlay_doc_build(&f->doc);
    env = sign(f->ca.key, text);
    json_t *e = json_loads(env, 0, NULL);
    size_t n = strlen(text);
    char *spaced = malloc(n + 2);
    memcpy(spaced, text, n - 1);
    spaced[n - 1] = ' ';
    spaced[n] = '}';
    spaced[n + 1] = '\0';
    json_object_set_new(e, "document", json_string(spaced));
    char *env2 = json_dumps(e, JSON_COMPACT);
    expect_refused(env2, strlen(env2), f->pin, 0, OVERLAY_DOC_ERR_SIGNATURE,
                   "signature does not verify");
    free(env2);
    free(spaced);
    json_decref(e);
    free(env);
    free(text);
}

static void test_tampered_signature(void **state)
{
    struct fx *f = *state;
    char *env = good_envelope(f);
    json_t *e = json_loads(env, 0, NULL);
    const char *b64 = json_string_value(json_object_get(e, "signature"));
    size_t len = 0;
    unsigned char *sig = overlay_b64_decode(b64, strlen(b64), &len);
    assert_non_null(sig);
    assert_int_equal(len, 64); /* Ed25519 */
    sig[17] ^= 0x01;
    char *bad = overlay_b64_encode(sig, len);
    json_object_set_new(e, "signature", json_string(bad));
    char *env2 = json_dumps(e, JSON_COMPACT);
    expect_refused(env2, strlen(env2), f->pin, 0, OVERLAY_DOC_ERR_SIGNATURE,
                   "signature does not verify");
    free(env2);

    /* Truncated signature. */
    char *shorter = overlay_b64_encode(sig, len - 1);
    json_object_set_new(e, "signature", json_string(shorter));
    env2 = json_dumps(e, JSON_COMPACT);
    expect_refused(env2, strlen(env2), f->pin, 0, OVERLAY_DOC_ERR_SIGNATURE,
                   "signature does not verify");
    free(env2);
    free(shorter);
    free(bad);
    free(sig);
    json_decref(e);
    free(env);
}

static void test_signed_by_other_key(void **state)
{
    struct fx *f = *state;
    /* Our CA's certificate inside (so the pin matches), but another CA's key signed it. */
    char *text = overlay_doc_build(&f->doc);
    char *env = sign(f->other.key, text);
    expect_refused(env, strlen(env), f->pin, 0, OVERLAY_DOC_ERR_SIGNATURE,
                   "signature does not verify with the pinned CA");
    free(env);

    /* And a document naming the other CA, properly signed by it, fails on the pin. */
    char *other_pem = pem_of(f->other.crt);
    f->doc.ca_cert_pem = other_pem;
    free(text);
    text = overlay_doc_build(&f->doc);
    env = sign(f->other.key, text);
    expect_refused(env, strlen(env), f->pin, 0, OVERLAY_DOC_ERR_PIN, "does not match the pin");
    f->doc.ca_cert_pem = f->ca_pem;
    free(other_pem);
    free(env);
    free(text);
}

static void test_rollback(void **state)
{
    struct fx *f = *state;
    char *env = good_envelope(f);
    struct overlay_doc out;
    char err[512] = "";
    expect_refused(env, strlen(env), f->pin, 6, OVERLAY_DOC_ERR_ROLLBACK,
                   "rollback: document sequence 5 is older than 6 already seen");
    /* The same sequence again is not a rollback (a node re-reads what it stored). */
    assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 5, &out, err, sizeof(err)), 0);
    overlay_doc_free(&out);
    free(env);
}

static void test_malformed_envelope(void **state)
{
    struct fx *f = *state;
    char *env = good_envelope(f);
    json_t *e = json_loads(env, 0, NULL);
    const char *doc = json_string_value(json_object_get(e, "document"));
    const char *sig = json_string_value(json_object_get(e, "signature"));
    char buf[8192];

    expect_refused("not json", 8, f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope is not valid JSON");
    expect_refused("", 0, f->pin, 0, OVERLAY_DOC_ERR_MALFORMED, "envelope is not valid JSON");
    expect_refused("[1,2]", 5, f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope is not a JSON object");
    /* Only part of the buffer: len is honoured. */
    expect_refused(env, strlen(env) - 1, f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope is not valid JSON");

    /* Duplicate key: a second "signature" (or "document") must not be chosen silently. */
    json_t *jd = json_string(doc);
    char *doc_json = json_dumps(jd, JSON_ENCODE_ANY);
    json_decref(jd);
    snprintf(buf, sizeof(buf), "{\"document\":%s,\"signature\":\"%s\",\"signature\":\"%s\"}",
             doc_json, sig, sig);
    expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope is not valid JSON");

    snprintf(buf, sizeof(buf), "{\"document\":%s}", doc_json);
    expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope has no \"signature\" string");
    snprintf(buf, sizeof(buf), "{\"document\":%s,\"signature\":42}", doc_json);
    expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope has no \"signature\" string");
    snprintf(buf, sizeof(buf), "{\"signature\":\"%s\"}", sig);
    expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope has no \"document\" string");
    snprintf(buf, sizeof(buf), "{\"document\":{\"format\":1},\"signature\":\"%s\"}", sig);
    expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                   "envelope has no \"document\" string");

    static const char *const bad_b64[] = {
        "", "abc", "!!!!", "QUJD RA==", "QUJDRA=", "QUJDRA=x", "QUJDRB==", "QU=D", "QUJDRA==\\n",
    };
    for (size_t i = 0; i < sizeof(bad_b64) / sizeof(bad_b64[0]); i++) {
        snprintf(buf, sizeof(buf), "{\"document\":%s,\"signature\":\"%s\"}", doc_json, bad_b64[i]);
        expect_refused(buf, strlen(buf), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED,
                       "signature is not valid base64");
    }

    /* The document string itself is not JSON, or not an object, or repeats a key. */
    static const char *const bad_docs[] = {"not json", "[1]", "{\"a\":1,\"a\":2}"};
    static const char *const bad_doc_msgs[] = {"document is not valid JSON",
                                               "document is not a JSON object",
                                               "document is not valid JSON"};
    for (size_t i = 0; i < 3; i++) {
        char *benv = sign(f->ca.key, bad_docs[i]);
        expect_refused(benv, strlen(benv), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED, bad_doc_msgs[i]);
        free(benv);
    }
    free(doc_json);
    json_decref(e);
    free(env);
}

/* Member edits */

struct edit {
    const char *key;       /* member to change (a.b for promotion members) */
    json_t *(*make)(void); /* new value, NULL to delete */
    int code;
    const char *needle;
};

static json_t *mk_str(void)
{
    return json_string("12");
}
static json_t *mk_int(void)
{
    return json_integer(12);
}
static json_t *mk_zero(void)
{
    return json_integer(0);
}
static json_t *mk_real(void)
{
    return json_real(3.0);
}
static json_t *mk_two(void)
{
    return json_integer(2);
}
static json_t *mk_neg(void)
{
    return json_integer(-1);
}
static json_t *mk_http_urls(void)
{
    return json_pack("[s]", "http://login.test.example");
}
static json_t *mk_int_urls(void)
{
    return json_pack("[i]", 7);
}
static json_t *mk_spacey(void)
{
    return json_string("test example");
}
static json_t *mk_empty(void)
{
    return json_string("");
}
static json_t *mk_bad_time(void)
{
    return json_string("21 Nov 2026 20:40");
}
static json_t *mk_frac_time(void)
{
    return json_string("2026-11-21T20:40:00.123Z");
}
static json_t *mk_not_pem(void)
{
    return json_string("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
}

static void apply_edit(json_t *doc, const void *arg)
{
    const struct edit *e = arg;
    json_t *obj = doc;
    const char *key = e->key;
    if (!strncmp(key, "promotion.", 10)) {
        obj = json_object_get(doc, "promotion");
        key += 10;
    }
    if (e->make)
        json_object_set_new(obj, key, e->make());
    else
        json_object_del(obj, key);
}

static void test_members(void **state)
{
    struct fx *f = *state;
    static const char *const required[] = {
        "format",
        "overlay",
        "sequence",
        "issued_at",
        "ca_cert",
        "login_urls",
        "bootstrap_urls",
        "replication_factor",
        "max_record_bytes",
        "max_record_lifetime_s",
        "keepalive_s",
        "stabilize_s",
        "successor_list",
        "promotion",
        "promotion.min_uptime_s",
        "promotion.min_cpus",
        "promotion.min_free_mem_mb",
        "promotion.min_bandwidth_kbps",
        "promotion.sn_target_load",
        "lan_discovery",
        "cert_validity_days",
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        struct edit e = {required[i], NULL, 0, NULL};
        char needle[128];
        snprintf(needle, sizeof(needle), "member \"%s\" is missing", required[i]);
        char *env = edited_envelope(f, apply_edit, &e);
        expect_refused(env, strlen(env), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED, needle);
        free(env);
    }

    const struct edit edits[] = {
        {"format", mk_str, OVERLAY_DOC_ERR_MALFORMED, "member \"format\" is not an integer"},
        {"format", mk_two, OVERLAY_DOC_ERR_FORMAT, "format 2 is not supported"},
        {"sequence", mk_str, OVERLAY_DOC_ERR_MALFORMED, "member \"sequence\" is not an integer"},
        {"sequence", mk_real, OVERLAY_DOC_ERR_MALFORMED, "member \"sequence\" is not an integer"},
        {"sequence", mk_neg, OVERLAY_DOC_ERR_MALFORMED, "member \"sequence\" is -1, outside"},
        {"overlay", mk_int, OVERLAY_DOC_ERR_MALFORMED, "member \"overlay\" is not a string"},
        {"overlay", mk_spacey, OVERLAY_DOC_ERR_MALFORMED, "contains spaces or control"},
        {"overlay", mk_empty, OVERLAY_DOC_ERR_MALFORMED, "member \"overlay\" must be 1-255"},
        {"issued_at", mk_int, OVERLAY_DOC_ERR_MALFORMED, "member \"issued_at\" is not a string"},
        {"issued_at", mk_bad_time, OVERLAY_DOC_ERR_MALFORMED, "not an RFC 3339 UTC time"},
        {"ca_cert", mk_int, OVERLAY_DOC_ERR_MALFORMED, "member \"ca_cert\" is not a string"},
        {"ca_cert", mk_not_pem, OVERLAY_DOC_ERR_MALFORMED, "ca_cert is not a PEM certificate"},
        {"login_urls", mk_str, OVERLAY_DOC_ERR_MALFORMED, "member \"login_urls\" is not an array"},
        {"login_urls", mk_http_urls, OVERLAY_DOC_ERR_MALFORMED,
         "login_urls[0] is not an https:// URL"},
        {"bootstrap_urls", mk_int_urls, OVERLAY_DOC_ERR_MALFORMED,
         "bootstrap_urls[0] is not a string"},
        {"replication_factor", mk_str, OVERLAY_DOC_ERR_MALFORMED,
         "member \"replication_factor\" is not an integer"},
        {"replication_factor", mk_zero, OVERLAY_DOC_ERR_MALFORMED,
         "member \"replication_factor\" is 0, outside 1..64"},
        {"max_record_bytes", mk_real, OVERLAY_DOC_ERR_MALFORMED, "is not an integer"},
        {"keepalive_s", mk_zero, OVERLAY_DOC_ERR_MALFORMED, "member \"keepalive_s\" is 0"},
        {"stabilize_s", mk_str, OVERLAY_DOC_ERR_MALFORMED, "member \"stabilize_s\" is not"},
        {"successor_list", mk_neg, OVERLAY_DOC_ERR_MALFORMED, "member \"successor_list\" is -1"},
        {"max_record_lifetime_s", mk_str, OVERLAY_DOC_ERR_MALFORMED, "max_record_lifetime_s"},
        {"promotion", mk_int, OVERLAY_DOC_ERR_MALFORMED, "member \"promotion\" is not an object"},
        {"promotion.min_cpus", mk_str, OVERLAY_DOC_ERR_MALFORMED,
         "member \"promotion.min_cpus\" is not an integer"},
        {"promotion.sn_target_load", mk_zero, OVERLAY_DOC_ERR_MALFORMED,
         "member \"promotion.sn_target_load\" is 0"},
        {"lan_discovery", mk_int, OVERLAY_DOC_ERR_MALFORMED,
         "member \"lan_discovery\" is not a string"},
        {"cert_validity_days", mk_str, OVERLAY_DOC_ERR_MALFORMED,
         "member \"cert_validity_days\" is not an integer"},
    };
    for (size_t i = 0; i < sizeof(edits) / sizeof(edits[0]); i++) {
        char *env = edited_envelope(f, apply_edit, &edits[i]);
        expect_refused(env, strlen(env), f->pin, 0, edits[i].code, edits[i].needle);
        free(env);
    }

    /* Unknown members are ignored; fractional seconds are fine. */
    const struct edit fine[] = {{"future_member", mk_int, 0, NULL},
                                {"issued_at", mk_frac_time, 0, NULL}};
    for (size_t i = 0; i < 2; i++) {
        char *env = edited_envelope(f, apply_edit, &fine[i]);
        struct overlay_doc out;
        char err[512];
        assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 0, &out, err, sizeof(err)),
                         0);
        overlay_doc_free(&out);
        free(env);
    }
}

/* A self-signed certificate for `key`, CA or not, with the given validity. */
static gnutls_x509_crt_t issue_self(gnutls_x509_privkey_t key, bool is_ca, time_t nb, time_t na)
{
    gnutls_privkey_t pk = NULL;
    gnutls_pubkey_t pub = NULL;
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(gnutls_privkey_init(&pk), 0);
    assert_int_equal(gnutls_privkey_import_x509(pk, key, 0), 0);
    assert_int_equal(gnutls_pubkey_init(&pub), 0);
    assert_int_equal(gnutls_pubkey_import_privkey(pub, pk, 0, 0), 0);
    struct cred_issue_params p = {
        .cn = "some CA",
        .is_ca = is_ca,
        .not_before = nb,
        .not_after = na,
    };
    assert_int_equal(cred_issue(pub, key, NULL, &p, &crt), 0);
    gnutls_pubkey_deinit(pub);
    gnutls_privkey_deinit(pk);
    return crt;
}

static void check_with_ca(struct fx *f, gnutls_x509_privkey_t key, gnutls_x509_crt_t crt, int code,
                          const char *needle)
{
    char pin[OVERLAY_PIN_LEN];
    char *pem = pem_of(crt);
    assert_int_equal(overlay_doc_pin(crt, pin), 0);
    f->doc.ca_cert_pem = pem;
    char *text = overlay_doc_build(&f->doc);
    char *env = sign(key, text);
    expect_refused(env, strlen(env), pin, 0, code, needle);
    f->doc.ca_cert_pem = f->ca_pem;
    free(env);
    free(text);
    free(pem);
}

static void set_member(json_t *doc, const void *arg)
{
    json_object_set_new(doc, "sip_proxies", json_loads((const char *)arg, 0, NULL));
}

/* The optional "sip_proxies": round trip, absent, and refused when malformed. */
static void test_sip_proxies(void **state)
{
    struct fx *f = *state;
    struct overlay_sip_proxy px[] = {{"pbx.example", "sip:sn1@test.example"},
                                     {"pbx.example", "sip:sn2@test.example"}};
    f->doc.sip_proxies = px;
    f->doc.n_sip_proxies = 2;
    char *env = good_envelope(f);
    f->doc.sip_proxies = NULL;
    f->doc.n_sip_proxies = 0;
    struct overlay_doc out;
    char err[512];
    assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 0, &out, err, sizeof(err)), 0);
    assert_int_equal(out.n_sip_proxies, 2);
    assert_string_equal(out.sip_proxies[1].domain, "pbx.example");
    assert_string_equal(out.sip_proxies[1].uri, "sip:sn2@test.example");
    overlay_doc_free(&out);
    free(env);
    /* Absent: none (documents of before the member verify as they did). */
    env = good_envelope(f);
    assert_non_null(env);
    assert_null(strstr(env, "sip_proxies"));
    assert_int_equal(overlay_doc_verify(env, strlen(env), f->pin, 0, &out, err, sizeof(err)), 0);
    assert_int_equal(out.n_sip_proxies, 0);
    overlay_doc_free(&out);
    free(env);
    static const char *const bad[][2] = {
        {"{}", "member \"sip_proxies\" is not an array"},
        {"[1]", "sip_proxies[0] is not an object"},
        {"[{\"domain\": \"pbx.example\"}]", "member \"uri\" is missing"},
        {"[{\"domain\": \"pbx.example\", \"uri\": 7}]", "member \"uri\" is not a string"},
        {"[{\"domain\": \"pbx example\", \"uri\": \"sip:a@b\"}]", "without spaces"},
        {"[{\"domain\": \"pbx.example\", \"uri\": \"tel:+1\"}]", "a sip: URI"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        env = edited_envelope(f, set_member, bad[i][0]);
        expect_refused(env, strlen(env), f->pin, 0, OVERLAY_DOC_ERR_MALFORMED, bad[i][1]);
        free(env);
    }
}

static void test_ca_cert_checks(void **state)
{
    struct fx *f = *state;
    time_t now = time(NULL);

    /* A leaf (node) certificate, self-consistent with its pin and signature, is no CA. */
    struct testca_cert leaf;
    gnutls_x509_privkey_t leaf_key = NULL;
    gnutls_x509_crt_t leaf_crt = NULL;
    assert_int_equal(testca_issue(&f->ca, "leaf", TESTCA_GOOD, &leaf), 0);
    assert_int_equal(cred_key_load(&leaf_key, leaf.key_file), 0);
    assert_int_equal(cred_cert_load(&leaf_crt, leaf.cert_file), 0);
    check_with_ca(f, leaf_key, leaf_crt, OVERLAY_DOC_ERR_CA, "ca_cert is not a CA certificate");
    gnutls_x509_crt_deinit(leaf_crt);

    /* Self-signed but CA:FALSE. */
    gnutls_x509_crt_t notca = issue_self(leaf_key, false, now - 60, now + 3600);
    check_with_ca(f, leaf_key, notca, OVERLAY_DOC_ERR_CA, "is not a CA certificate");
    gnutls_x509_crt_deinit(notca);

    /* A CA that expired, and one not valid yet. */
    gnutls_x509_crt_t old = issue_self(leaf_key, true, now - 7200, now - 3600);
    check_with_ca(f, leaf_key, old, OVERLAY_DOC_ERR_CA, "ca_cert expired at");
    gnutls_x509_crt_deinit(old);
    gnutls_x509_crt_t future = issue_self(leaf_key, true, now + 3600, now + 7200);
    check_with_ca(f, leaf_key, future, OVERLAY_DOC_ERR_CA, "ca_cert is not valid before");
    gnutls_x509_crt_deinit(future);

    /* And a fresh self-signed CA of our own making passes. */
    gnutls_x509_crt_t fresh = issue_self(leaf_key, true, now - 60, now + 3600);
    char pin[OVERLAY_PIN_LEN];
    char *pem = pem_of(fresh);
    assert_int_equal(overlay_doc_pin(fresh, pin), 0);
    f->doc.ca_cert_pem = pem;
    char *text = overlay_doc_build(&f->doc);
    char *env = sign(leaf_key, text);
    struct overlay_doc out;
    char err[512];
    assert_int_equal(overlay_doc_verify(env, strlen(env), pin, 0, &out, err, sizeof(err)), 0);
    overlay_doc_free(&out);
    f->doc.ca_cert_pem = f->ca_pem;
    free(env);
    free(text);
    free(pem);
    gnutls_x509_crt_deinit(fresh);
    gnutls_x509_privkey_deinit(leaf_key);
}

static void test_build_and_sign_inputs(void **state)
{
    struct fx *f = *state;
    struct overlay_doc d = f->doc;
    d.overlay = NULL;
    assert_null(overlay_doc_build(&d));
    assert_null(overlay_doc_build(NULL));
    d = f->doc;
    d.login_urls = NULL; /* n_login_urls says 2 */
    assert_null(overlay_doc_build(&d));
    char *env = (char *)1;
    assert_true(overlay_doc_sign(f->ca.key, "\xff\xfe not utf-8", &env) < 0);
    assert_null(env);
    assert_true(overlay_doc_sign(NULL, "{}", &env) < 0);
}

static void test_base64(void **state)
{
    (void)state;
    static const char *const vec[][2] = {
        {"", ""},
        {"f", "Zg=="},
        {"fo", "Zm8="},
        {"foo", "Zm9v"},
        {"foob", "Zm9vYg=="},
        {"fooba", "Zm9vYmE="},
        {"foobar", "Zm9vYmFy"},
    };
    for (size_t i = 0; i < sizeof(vec) / sizeof(vec[0]); i++) {
        char *e = overlay_b64_encode((const unsigned char *)vec[i][0], strlen(vec[i][0]));
        assert_string_equal(e, vec[i][1]);
        free(e);
        if (!vec[i][1][0])
            continue;
        size_t n = 0;
        unsigned char *d = overlay_b64_decode(vec[i][1], strlen(vec[i][1]), &n);
        assert_non_null(d);
        assert_int_equal(n, strlen(vec[i][0]));
        assert_memory_equal(d, vec[i][0], n);
        free(d);
    }
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    char *e = overlay_b64_encode(all, sizeof(all));
    size_t n = 0;
    unsigned char *d = overlay_b64_decode(e, strlen(e), &n);
    assert_int_equal(n, 256);
    assert_memory_equal(d, all, 256);
    free(d);
    free(e);
    size_t dummy;
    assert_null(overlay_b64_decode("Zg=", 3, &dummy));
    assert_null(overlay_b64_decode("Zh==", 4, &dummy)); /* non-zero bits under padding */
    assert_null(overlay_b64_decode("Z===", 4, &dummy));
    assert_null(overlay_b64_decode("Zg==Zg==", 8, &dummy)); /* padding in the middle */
    assert_null(overlay_b64_decode("Zm9-", 4, &dummy));     /* base64url is not accepted */
    /* The check-only variant agrees with the decoder. */
    assert_int_equal(overlay_b64_valid("Zm9vYmE=", 8), 5);
    assert_int_equal(overlay_b64_valid("Zm9vYg==", 8), 4);
    assert_int_equal(overlay_b64_valid("Zm9v", 4), 3);
    static const char *const bad[] = {"", "Zg=", "Zh==", "Z===", "Zg==Zg==", "Zm9-", "Zm9v\n"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(overlay_b64_valid(bad[i], strlen(bad[i])), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_pin),
        cmocka_unit_test(test_tampered_document),
        cmocka_unit_test(test_tampered_signature),
        cmocka_unit_test(test_signed_by_other_key),
        cmocka_unit_test(test_rollback),
        cmocka_unit_test(test_malformed_envelope),
        cmocka_unit_test(test_members),
        cmocka_unit_test(test_sip_proxies),
        cmocka_unit_test(test_ca_cert_checks),
        cmocka_unit_test(test_build_and_sign_inputs),
        cmocka_unit_test(test_base64),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
