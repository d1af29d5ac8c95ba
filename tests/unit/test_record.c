/*
 * Unit tests for record.c: a signed record survives the wire and verifies;
 * every way a record can be wrong (forged, tampered, foreign or expired
 * certificate, wrong owner, key, overlay, lifetime, size, access policy, and
 * every malformed envelope) gets its own code; and the certificate cache
 * checks each certificate once.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cred.h"
#include "overlay_doc.h"
#include "record.h"
#include "testca.h"

#define OVERLAY "test.example"
#define DAY     86400

struct node {
    gnutls_x509_privkey_t key;
    gnutls_x509_crt_t crt;
    char uri[128];
};

struct fixture {
    struct testca ca, other;
    struct node alice, bob, carol_expired, future, mallory_foreign, dave_p256;
    time_t now;
};

static int load_node(struct testca *ca, const char *name, enum testca_kind kind, struct node *n)
{
    struct testca_cert tc;
    if (testca_issue(ca, name, kind, &tc) < 0)
        return -1;
    snprintf(n->uri, sizeof(n->uri), "%s", tc.uri);
    if (cred_key_load(&n->key, tc.key_file) < 0 || cred_cert_load(&n->crt, tc.cert_file) < 0)
        return -1;
    return 0;
}

/* An ECDSA P-256 node, as a service host would have: the other signature algorithm. */
static int p256_node(struct testca *ca, const char *uri, struct node *n)
{
    gnutls_pubkey_t pub = NULL;
    time_t now = time(NULL);
    struct cred_issue_params p = {
        .cn = "dave",
        .uri = uri,
        .roles = ROLE_NODE,
        .client_auth = true,
        .not_before = now - 60,
        .not_after = now + 3600,
    };
    snprintf(n->uri, sizeof(n->uri), "%s", uri);
    int r = cred_keygen_p256(&n->key) < 0 || cred_pubkey(n->key, &pub) < 0 ||
                    cred_issue(pub, ca->key, ca->crt, &p, &n->crt) < 0
                ? -1
                : 0;
    gnutls_pubkey_deinit(pub);
    return r;
}

static void node_free(struct node *n)
{
    if (n->crt)
        gnutls_x509_crt_deinit(n->crt);
    if (n->key)
        gnutls_x509_privkey_deinit(n->key);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    if (!f)
        return 0;
    node_free(&f->alice);
    node_free(&f->bob);
    node_free(&f->carol_expired);
    node_free(&f->future);
    node_free(&f->mallory_foreign);
    node_free(&f->dave_p256);
    testca_cleanup(&f->ca);
    testca_cleanup(&f->other);
    free(f);
    return 0;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    *state = f;
    if (!f)
        return -1;
    f->now = time(NULL);
    if (testca_init(&f->ca) < 0 || testca_init(&f->other) < 0 ||
        load_node(&f->ca, "alice", TESTCA_GOOD, &f->alice) < 0 ||
        load_node(&f->ca, "bob", TESTCA_GOOD, &f->bob) < 0 ||
        load_node(&f->ca, "carol", TESTCA_EXPIRED, &f->carol_expired) < 0 ||
        load_node(&f->ca, "future", TESTCA_NOT_YET_VALID, &f->future) < 0 ||
        load_node(&f->other, "mallory", TESTCA_GOOD, &f->mallory_foreign) < 0 ||
        p256_node(&f->ca, "sip:dave@test.example", &f->dave_p256) < 0) {
        teardown(state);
        *state = NULL;
        return -1;
    }
    return 0;
}

/* Helpers */

static void sign_ok(struct fixture *f, struct node *n, const char *type, const char *name,
                    uint64_t seq, int64_t expires, bool removal, struct record *out)
{
    json_t *value = json_pack("{s:s, s:i}", "contact", "sip:x@192.0.2.7:5060", "q", 1);
    struct rec_params p = {
        .overlay = OVERLAY,
        .type = type,
        .name = name,
        .seq = seq,
        .expires = expires,
        .removal = removal,
        .value = value,
    };
    char err[256] = "";
    int r = rec_sign(&p, n->key, n->crt, out, err, sizeof(err));
    if (r != REC_OK)
        fprintf(stderr, "rec_sign: %s\n", err);
    assert_int_equal(r, REC_OK);
    /* The size rec_parse counts is the compact encoding's, byte for byte. */
    assert_int_equal(out->size, json_dumpb(out->envelope, NULL, 0, JSON_COMPACT));
    json_decref(value);
}

static char *b64(const void *data, size_t len)
{
    char *s = overlay_b64_encode(data, len);
    assert_non_null(s);
    return s;
}

static char *cert_b64(gnutls_x509_crt_t crt)
{
    gnutls_datum_t der = {NULL, 0};
    assert_int_equal(gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_DER, &der), 0);
    char *s = b64(der.data, der.size);
    gnutls_free(der.data);
    return s;
}

/* An envelope around any signed text, signed by `n` (its key and certificate). */
static json_t *envelope_signed_by(struct node *n, const char *text)
{
    gnutls_datum_t sig = {NULL, 0};
    assert_int_equal(cred_sign(n->key, text, strlen(text), &sig), 0);
    char *s = b64(sig.data, sig.size), *c = cert_b64(n->crt);
    json_t *env = json_pack("{s:s, s:s, s:s}", "signed", text, "cert", c, "sig", s);
    assert_non_null(env);
    gnutls_free(sig.data);
    free(s);
    free(c);
    return env;
}

static char *key_hex(const char *type, const char *name, char out[NID_HEX_LEN + 1])
{
    nid_t k;
    assert_int_equal(nid_key(&k, type, name), 0);
    return nid_to_hex(&k, out);
}

/* A good signed object for alice (to mutate), as a new JSON object. */
static json_t *good_signed(struct fixture *f)
{
    char k[NID_HEX_LEN + 1];
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:b, s:{s:s}}", "overlay", OVERLAY, "key",
                     key_hex("user location", "alice@test.example", k), "type", "user location",
                     "name", "alice@test.example", "owner", "sip:alice@test.example", "seq", "7",
                     "expires", (json_int_t)(f->now + 600), "no_update", 0, "value", "contact",
                     "sip:alice@192.0.2.1");
}

static json_t *envelope_of_obj(struct node *n, json_t *so)
{
    char *text = json_dumps(so, JSON_COMPACT);
    assert_non_null(text);
    json_t *env = envelope_signed_by(n, text);
    free(text);
    json_decref(so);
    return env;
}

static int parse_env(json_t *env, size_t max, struct record *r, char *err, size_t errlen)
{
    int rc = rec_parse(env, max, r, err, errlen);
    json_decref(env);
    return rc;
}

static void assert_one_line(const char *err)
{
    assert_true(err[0] != '\0');
    assert_null(strchr(err, '\n'));
}

/* Tests */

static void test_roundtrip(void **state)
{
    struct fixture *f = *state;
    struct record r;
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1763750000000000ull,
            f->now + 3600, false, &r);
    assert_string_equal(r.type, "user location");
    assert_string_equal(r.name, "alice@test.example");
    assert_string_equal(r.owner, "sip:alice@test.example");
    assert_true(r.seq == 1763750000000000ull);
    assert_int_equal(r.expires, f->now + 3600);
    assert_false(r.removal);
    assert_false(r.no_update);
    assert_non_null(r.value);
    assert_string_equal(json_string_value(json_object_get(r.value, "contact")),
                        "sip:x@192.0.2.7:5060");
    nid_t k;
    nid_key(&k, "user location", "alice@test.example");
    assert_true(nid_eq(&k, &r.key));
    assert_int_equal(json_object_size(r.envelope), 3);

    /* The signed text is compact JSON and size is the compact envelope's length. */
    const char *text = json_string_value(json_object_get(r.envelope, "signed"));
    assert_null(strstr(text, "\": "));
    assert_null(strstr(text, ", \""));
    assert_null(strchr(text, '\n'));
    char *again = json_dumps(r.signed_obj, JSON_COMPACT);
    assert_string_equal(again, text);
    free(again);
    char *wire = json_dumps(r.envelope, JSON_COMPACT);
    assert_int_equal(r.size, strlen(wire));

    /* Over the wire and back. */
    json_t *env = json_loads(wire, JSON_REJECT_DUPLICATES, NULL);
    free(wire);
    struct record back;
    char err[256] = "";
    assert_int_equal(rec_parse(env, 4096, &back, err, sizeof(err)), REC_OK);
    json_decref(env); /* rec_parse took its own reference */
    assert_int_equal(back.size, r.size);
    assert_true(back.seq == r.seq);

    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    assert_non_null(v);
    assert_int_equal(rec_verify(v, &back, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, 0, err, sizeof(err)), REC_OK);

    /* A deep copy outlives the original. */
    struct record c;
    assert_int_equal(rec_copy(&r, &c), REC_OK);
    assert_ptr_not_equal(c.envelope, r.envelope);
    assert_ptr_not_equal(c.signed_obj, r.signed_obj);
    assert_ptr_equal(c.value, json_object_get(c.signed_obj, "value"));
    rec_free(&r);
    rec_free(&r); /* twice is harmless */
    assert_int_equal(rec_verify(v, &c, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_string_equal(c.owner, "sip:alice@test.example");
    rec_free(&c);
    rec_free(&back);
    rec_free(NULL);
    rec_verifier_free(v);
    rec_verifier_free(NULL);
}

static void test_removal_and_no_update(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 9, f->now + 60, true, &r);
    assert_true(r.removal);
    assert_null(r.value);
    assert_false(r.no_update);
    json_t *so = r.signed_obj;
    assert_true(json_is_true(json_object_get(so, "remove")));
    assert_null(json_object_get(so, "value"));
    assert_null(json_object_get(so, "no_update"));
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    /* Removal statements follow the same expiry rule. */
    assert_int_equal(rec_verify(v, &r, f->now + 60, DAY, err, sizeof(err)), REC_E_EXPIRED);
    rec_free(&r);

    json_t *val = json_string("x");
    struct rec_params p = {.overlay = OVERLAY,
                           .type = "voicemail",
                           .name = "anything",
                           .seq = 0,
                           .expires = f->now + 10,
                           .no_update = true,
                           .value = val};
    assert_int_equal(rec_sign(&p, f->bob.key, f->bob.crt, &r, err, sizeof(err)), REC_OK);
    assert_true(r.no_update);
    assert_true(r.seq == 0);
    assert_true(json_is_true(json_object_get(r.signed_obj, "no_update")));
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);

    /* The maximum seq survives the round trip. */
    p.seq = UINT64_MAX;
    assert_int_equal(rec_sign(&p, f->bob.key, f->bob.crt, &r, err, sizeof(err)), REC_OK);
    assert_true(r.seq == UINT64_MAX);
    assert_string_equal(json_string_value(json_object_get(r.signed_obj, "seq")),
                        "18446744073709551615");
    rec_free(&r);
    json_decref(val);
    rec_verifier_free(v);
}

/* rec_parse counts the size without encoding: values with every kind of escape. */
static void test_size_counting(void **state)
{
    struct fixture *f = *state;
    static const char *values[] = {"plain",
                                   "quote \" backslash \\ slash /",
                                   "tab\t nl\n cr\r bs\b ff\f",
                                   "ctl \x01\x1f del \x7f",
                                   "utf-8 \xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80",
                                   ""};
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        json_t *val = json_pack("{s:s, s:[s,i]}", "v", values[i], "w", values[i], -1);
        struct rec_params p = {.overlay = OVERLAY,
                               .type = "t",
                               .name = "n",
                               .seq = 7,
                               .expires = f->now + 10,
                               .value = val};
        struct record r;
        char err[256];
        assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)), REC_OK);
        size_t want = json_dumpb(r.envelope, NULL, 0, JSON_COMPACT);
        assert_int_equal(r.size, want);
        /* ... and the size limit is applied to that count: one byte less is refused. */
        struct record r2;
        assert_int_equal(rec_parse(r.envelope, want, &r2, err, sizeof(err)), REC_OK);
        rec_free(&r2);
        assert_int_equal(rec_parse(r.envelope, want - 1, &r2, err, sizeof(err)), REC_E_TOO_LARGE);
        rec_free(&r);
        json_decref(val);
    }
}

static void test_sign_refusals(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    json_t *val = json_integer(1);
    struct rec_params p = {.overlay = OVERLAY, .type = "t", .name = "n", .expires = f->now + 10};
    /* A record without a value. */
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    assert_one_line(err);
    assert_null(r.envelope);
    p.value = json_null();
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    p.value = val;
    /* A key that is not the certificate's (Ed25519 and P-256 both ways): nobody would accept
     * what it signs, so nothing is signed. */
    assert_int_equal(rec_sign(&p, f->bob.key, f->alice.crt, &r, err, sizeof(err)), REC_E_SIGNATURE);
    assert_non_null(strstr(err, "does not match the certificate of sip:alice@"));
    assert_int_equal(rec_sign(&p, f->dave_p256.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_SIGNATURE);
    assert_int_equal(rec_sign(&p, f->alice.key, f->dave_p256.crt, &r, err, sizeof(err)),
                     REC_E_SIGNATURE);
    assert_null(r.envelope);
    /* Empty type, oversize name. */
    p.type = "";
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    p.type = "t";
    char longname[REC_NAME_MAX + 2];
    memset(longname, 'n', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    p.name = longname;
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    longname[REC_NAME_MAX] = '\0'; /* exactly the maximum is fine */
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)), REC_OK);
    rec_free(&r);
    p.name = "n";
    /* Bob's key with Alice's certificate: nobody could verify that. */
    assert_int_equal(rec_sign(&p, f->bob.key, f->alice.crt, &r, err, sizeof(err)), REC_E_SIGNATURE);
    assert_one_line(err);
    assert_non_null(strstr(err, "sip:alice@test.example"));
    /* A certificate without a URI cannot own records. */
    assert_int_equal(rec_sign(&p, f->ca.key, f->ca.crt, &r, err, sizeof(err)), REC_E_CERT);
    json_decref(val);
}

static void test_forged_signature(void **state)
{
    struct fixture *f = *state;
    struct record r, forged;
    char err[256];
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);

    size_t n;
    const char *sig = json_string_value(json_object_get(r.envelope, "sig"));
    unsigned char *raw = overlay_b64_decode(sig, strlen(sig), &n);
    assert_non_null(raw);
    assert_int_equal(n, 64); /* Ed25519 */
    raw[10] ^= 0x01;
    char *bad = b64(raw, n);
    json_t *env = json_deep_copy(r.envelope);
    json_object_set_new(env, "sig", json_string(bad));
    assert_int_equal(parse_env(env, 0, &forged, err, sizeof(err)), REC_OK);

    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    assert_int_equal(rec_verify(v, &forged, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    assert_one_line(err);
    assert_non_null(strstr(err, "signature does not verify"));
    assert_non_null(strstr(err, "sip:alice@test.example"));
    assert_string_equal(rec_strcode(REC_E_SIGNATURE), "bad-signature");
    /* A truncated signature too. */
    char *shortsig = b64(raw, 48);
    env = json_deep_copy(r.envelope);
    json_object_set_new(env, "sig", json_string(shortsig));
    struct record trunc;
    assert_int_equal(parse_env(env, 0, &trunc, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &trunc, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    /* The genuine one still verifies. */
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);

    rec_free(&trunc);
    free(shortsig);
    free(raw);
    free(bad);
    rec_free(&forged);
    rec_free(&r);
    rec_verifier_free(v);
}

/* A signature this process made is not checked again (record.c, own_sig_known), but only for
 * the very text it signed: another text under it, even one we signed too, is refused. */
static void test_own_signatures(void **state)
{
    struct fixture *f = *state;
    struct record a, b, mixed, fresh;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &a);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 2, f->now + 60, false, &b);
    assert_int_equal(rec_verify(v, &a, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &b, f->now, DAY, err, sizeof(err)), REC_OK);

    /* b's text under a's signature: both ours, not a pair we made. */
    json_t *env = json_deep_copy(a.envelope);
    json_object_set(env, "signed", json_object_get(b.envelope, "signed"));
    assert_int_equal(parse_env(env, 0, &mixed, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &mixed, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    assert_non_null(strstr(err, "signature does not verify"));

    /* After another key signed here, a's signature is checked in full, and still holds. */
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "bob@test.example", 1, f->now + 60, false, &fresh);
    assert_int_equal(rec_verify(v, &a, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &fresh, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &mixed, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);

    rec_free(&a);
    rec_free(&b);
    rec_free(&mixed);
    rec_free(&fresh);
    rec_verifier_free(v);
}

static void test_tampered_text(void **state)
{
    struct fixture *f = *state;
    struct record r, t;
    char err[256];
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    /* Same key, different value: parses, but the signature no longer covers it. */
    json_t *so = json_deep_copy(r.signed_obj);
    json_object_set_new(so, "value", json_string("sip:mallory@203.0.113.66"));
    char *text = json_dumps(so, JSON_COMPACT);
    json_decref(so);
    json_t *env = json_deep_copy(r.envelope);
    json_object_set_new(env, "signed", json_string(text));
    free(text);
    assert_int_equal(parse_env(env, 0, &t, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &t, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    rec_free(&t);

    /* A later expiry, and even whitespace, break the signature: no canonicalisation. */
    const char *orig = json_string_value(json_object_get(r.envelope, "signed"));
    size_t len = strlen(orig);
    char *spaced = malloc(len + 2);
    memcpy(spaced, orig, len - 1);
    memcpy(spaced + len - 1, " }", 3);
    env = json_deep_copy(r.envelope);
    json_object_set_new(env, "signed", json_string(spaced));
    free(spaced);
    assert_int_equal(parse_env(env, 0, &t, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &t, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    rec_free(&t);

    so = json_deep_copy(r.signed_obj);
    json_object_set_new(so, "expires", json_integer(f->now + 3000));
    text = json_dumps(so, JSON_COMPACT);
    json_decref(so);
    env = json_deep_copy(r.envelope);
    json_object_set_new(env, "signed", json_string(text));
    free(text);
    assert_int_equal(parse_env(env, 0, &t, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &t, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    rec_free(&t);

    /* Bob's certificate swapped in under Alice's signature. */
    env = json_deep_copy(r.envelope);
    char *bc = cert_b64(f->bob.crt);
    json_object_set_new(env, "cert", json_string(bc));
    free(bc);
    assert_int_equal(parse_env(env, 0, &t, err, sizeof(err)), REC_OK);
    int rc = rec_verify(v, &t, f->now, DAY, err, sizeof(err));
    assert_int_equal(rc, REC_E_OWNER); /* the owner is Alice, the certificate Bob's */
    rec_free(&t);

    rec_free(&r);
    rec_verifier_free(v);
}

static void test_foreign_and_bad_certificates(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    size_t entries;
    uint64_t hits, misses;
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    /* Another CA's certificate: refused, and not cached. */
    sign_ok(f, &f->mallory_foreign, "voicemail", "mallory", 1, f->now + 60, false, &r);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
        assert_one_line(err);
        assert_non_null(strstr(err, "overlay CA"));
    }
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 0);
    assert_int_equal(hits, 0);
    assert_int_equal(misses, 2);
    /* The same record is fine for a verifier of the other overlay CA. */
    struct rec_verifier *v2 = rec_verifier_new(f->other.crt, OVERLAY, 16);
    assert_int_equal(rec_verify(v2, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_verifier_free(v2);
    rec_free(&r);

    /* A certificate that does not parse. */
    char k[NID_HEX_LEN + 1];
    char text[512];
    snprintf(text, sizeof(text),
             "{\"overlay\":\"%s\",\"key\":\"%s\",\"type\":\"t\",\"name\":\"n\",\"owner\":\"sip:"
             "alice@test.example\",\"seq\":\"1\",\"expires\":%" PRId64
             ",\"no_update\":false,\"value\":1}",
             OVERLAY, key_hex("t", "n", k), (int64_t)f->now + 60);
    json_t *env = envelope_signed_by(&f->alice, text);
    json_object_set_new(env, "cert", json_string("AAECAwQF"));
    assert_int_equal(parse_env(env, 0, &r, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
    assert_non_null(strstr(err, "does not parse"));
    rec_free(&r);

    /* The CA's own certificate (trusted, but without a URI). */
    env = envelope_signed_by(&f->alice, text);
    char *cac = cert_b64(f->ca.crt);
    json_object_set_new(env, "cert", json_string(cac));
    free(cac);
    assert_int_equal(parse_env(env, 0, &r, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
    assert_non_null(strstr(err, "no URI"));
    rec_free(&r);

    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 0);
    rec_verifier_free(v);
}

static void test_certificate_times(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    /* Expired an hour ago. */
    sign_ok(f, &f->carol_expired, REC_TYPE_USER_LOCATION, "carol@test.example", 1, f->now + 60,
            false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
    assert_one_line(err);
    assert_non_null(strstr(err, "not valid at"));
    /* Its own window (two hours ago) predates the CA's: never valid with this CA. */
    assert_int_equal(rec_verify(v, &r, f->now - 5400, DAY, err, sizeof(err)), REC_E_CERT);
    rec_free(&r);

    /* Not valid before tomorrow. */
    sign_ok(f, &f->future, "voicemail", "future", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
    rec_free(&r);

    /* A cached certificate is checked against `now` on every use. */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 7 * 3600, false,
            &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    uint64_t hits0, hits1;
    rec_verifier_stats(v, NULL, &hits0, NULL);
    assert_int_equal(rec_verify(v, &r, f->now + 2 * 3600, DAY, err, sizeof(err)), REC_E_CERT);
    rec_verifier_stats(v, NULL, &hits1, NULL);
    assert_int_equal(hits1, hits0 + 1);
    assert_int_equal(rec_verify(v, &r, f->now + 60, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);
    rec_verifier_free(v);
}

static void test_policy(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    /* Bob writes Alice's location. */
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    assert_one_line(err);
    assert_non_null(strstr(err, "sip:bob@test.example"));
    assert_string_equal(rec_strcode(REC_E_FORBIDDEN), "forbidden");
    rec_free(&r);
    /* ... and a removal statement for it. */
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "alice@test.example", 2, f->now + 60, true, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    /* With the scheme in the name it is another name. */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "sip:alice@test.example", 1, f->now + 60, false,
            &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);

    /* Proxy location: only a P2P proxy the overlay document names for the domain. */
    sign_ok(f, &f->alice, REC_TYPE_PROXY_LOCATION, "test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    assert_non_null(strstr(err, "overlay document"));
    rec_free(&r);
    struct overlay_sip_proxy px[] = {{"pbx.example", "sip:alice@test.example"},
                                     {"test.example", "sip:alice@test.example"},
                                     {"pbx.example", "sip:dave@test.example"}};
    assert_int_equal(rec_verifier_set_proxies(v, px, 3), 0);
    sign_ok(f, &f->alice, REC_TYPE_PROXY_LOCATION, "test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);
    sign_ok(f, &f->alice, REC_TYPE_PROXY_LOCATION, "PBX.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);
    sign_ok(f, &f->alice, REC_TYPE_PROXY_LOCATION, "other.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    sign_ok(f, &f->bob, REC_TYPE_PROXY_LOCATION, "pbx.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    /* A named proxy without the super node role is no proxy. */
    sign_ok(f, &f->dave_p256, REC_TYPE_PROXY_LOCATION, "pbx.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    /* The P2P registrar writes the locations of its domain's classical phones... */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "carol@pbx.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);
    /* ... but not those of another domain, nor of the overlay's own users, even when it is
     * named as the overlay domain's proxy. */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "carol@other.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "bob@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "carol@pbx.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "pbx.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);

    /* Any other type: anyone. */
    sign_ok(f, &f->bob, "presence", "alice@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);

    /* ECDSA P-256 owners sign and verify too. */
    sign_ok(f, &f->dave_p256, REC_TYPE_USER_LOCATION, "dave@test.example", 1, f->now + 60, false,
            &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);
    rec_verifier_free(v);
}

static void test_uri_aor(void **state)
{
    (void)state;
    assert_string_equal(rec_uri_aor("sip:alice@example.org"), "alice@example.org");
    assert_string_equal(rec_uri_aor("sips:alice@example.org"), "alice@example.org");
    assert_string_equal(rec_uri_aor("SIP:alice@example.org"), "alice@example.org");
    assert_string_equal(rec_uri_aor("alice@example.org"), "alice@example.org");
    assert_string_equal(rec_uri_aor("tel:+1555"), "tel:+1555");
    assert_string_equal(rec_uri_aor(""), "");
}

static void test_owner_mismatch(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    /* Alice signs a record claiming Bob as its owner. */
    json_t *so = good_signed(f);
    json_object_set_new(so, "owner", json_string("sip:bob@test.example"));
    assert_int_equal(parse_env(envelope_of_obj(&f->alice, so), 0, &r, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_OWNER);
    assert_one_line(err);
    assert_non_null(strstr(err, "sip:bob@test.example"));
    assert_non_null(strstr(err, "sip:alice@test.example"));
    assert_string_equal(rec_strcode(REC_E_OWNER), "bad-owner");
    rec_free(&r);
    rec_verifier_free(v);
}

static void test_key_mismatch(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    char k[NID_HEX_LEN + 1];
    json_t *so = good_signed(f);
    json_object_set_new(so, "key", json_string(key_hex("user location", "bob@test.example", k)));
    assert_int_equal(parse_env(envelope_of_obj(&f->alice, so), 0, &r, err, sizeof(err)), REC_E_KEY);
    assert_one_line(err);
    assert_non_null(strstr(err, k));
    assert_null(r.envelope);
    assert_string_equal(rec_strcode(REC_E_KEY), "bad-key");

    /* Same name, another type: another key. */
    so = good_signed(f);
    json_object_set_new(so, "type", json_string("proxy location"));
    assert_int_equal(parse_env(envelope_of_obj(&f->alice, so), 0, &r, err, sizeof(err)), REC_E_KEY);
}

/*
 * Whether a record answers a lookup (issue 15, call hijack): a validly signed record of the
 * wrong key, type or name is no answer. The attack is mallory's super node answering a lookup
 * of bob's location with its owner's own record.
 */
static void test_answers(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[512];
    nid_t bob_key, alice_key;
    assert_int_equal(nid_key(&bob_key, REC_TYPE_USER_LOCATION, "bob@test.example"), 0);
    assert_int_equal(nid_key(&alice_key, REC_TYPE_USER_LOCATION, "alice@test.example"), 0);
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);

    /* Alice's own location verifies (a signature says who wrote it) but answers only hers. */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_answers(&r, &bob_key, NULL, NULL, err, sizeof(err)), REC_E_MISMATCH);
    assert_one_line(err);
    char hb[NID_HEX_LEN + 1], ha[NID_HEX_LEN + 1];
    assert_non_null(strstr(err, nid_to_hex(&bob_key, hb)));   /* the key asked for */
    assert_non_null(strstr(err, nid_to_hex(&alice_key, ha))); /* and the key found */
    assert_non_null(strstr(err, "sip:alice@test.example"));
    assert_int_equal(
        rec_answers(&r, &bob_key, REC_TYPE_USER_LOCATION, "bob@test.example", err, sizeof(err)),
        REC_E_MISMATCH);
    assert_non_null(strstr(err, "user location|bob@test.example"));
    assert_int_equal(rec_answers(&r, &alice_key, NULL, NULL, err, sizeof(err)), REC_OK);
    assert_int_equal(
        rec_answers(&r, &alice_key, REC_TYPE_USER_LOCATION, "alice@test.example", err, sizeof(err)),
        REC_OK);
    /* The right key with a type or name that does not hash to it: the caller's mistake, no
     * answer either. */
    assert_int_equal(
        rec_answers(&r, &alice_key, REC_TYPE_USER_LOCATION, "bob@test.example", err, sizeof(err)),
        REC_E_MISMATCH);
    assert_int_equal(
        rec_answers(&r, &alice_key, "presence", "alice@test.example", err, sizeof(err)),
        REC_E_MISMATCH);
    rec_free(&r);

    /* Right name, wrong type: mallory's "presence" record named bob is anyone's to write. */
    sign_ok(f, &f->alice, "presence", "bob@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_answers(&r, &bob_key, NULL, NULL, err, sizeof(err)), REC_E_MISMATCH);
    assert_int_equal(
        rec_answers(&r, &bob_key, REC_TYPE_USER_LOCATION, "bob@test.example", err, sizeof(err)),
        REC_E_MISMATCH);
    rec_free(&r);

    /* Bob's own answers; a record under bob's key by anyone else cannot verify (policy). */
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "bob@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(
        rec_answers(&r, &bob_key, REC_TYPE_USER_LOCATION, "bob@test.example", err, sizeof(err)),
        REC_OK);
    rec_free(&r);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "bob@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_answers(&r, &bob_key, NULL, NULL, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    assert_string_equal(rec_strcode(REC_E_MISMATCH), "not-asked");
    rec_verifier_free(v);
}

/* A type holding '|' would make keys ambiguous: SHA-1("user location|a" "|" "b") is also the
 * key of type "user location", name "a|b". Refused when signing and when parsing. */
static void test_type_without_bar(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    json_t *value = json_string("x");
    struct rec_params p = {.overlay = OVERLAY,
                           .type = "user location|a",
                           .name = "b",
                           .seq = 1,
                           .expires = f->now + 60,
                           .value = value};
    assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    assert_non_null(strstr(err, "'|'"));
    json_decref(value);

    char k[NID_HEX_LEN + 1];
    json_t *so = good_signed(f);
    json_object_set_new(so, "type", json_string("user location|alice"));
    json_object_set_new(so, "name", json_string("test.example"));
    json_object_set_new(so, "key", json_string(key_hex("user location|alice", "test.example", k)));
    assert_int_equal(parse_env(envelope_of_obj(&f->alice, so), 0, &r, err, sizeof(err)),
                     REC_E_MALFORMED);
    assert_non_null(strstr(err, "'|'"));
    /* In a name it is fine: the type before it is what disambiguates. */
    sign_ok(f, &f->alice, "note", "a|b", 1, f->now + 60, false, &r);
    rec_free(&r);
}

static void test_too_large(void **state)
{
    struct fixture *f = *state;
    struct record r, p;
    char err[256];
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    assert_int_equal(rec_parse(r.envelope, r.size, &p, err, sizeof(err)), REC_OK);
    rec_free(&p);
    assert_int_equal(rec_parse(r.envelope, r.size - 1, &p, err, sizeof(err)), REC_E_TOO_LARGE);
    assert_one_line(err);
    assert_string_equal(rec_strcode(REC_E_TOO_LARGE), "too-large");
    /* The size is that of the compact encoding, escapes included. */
    json_t *big =
        json_pack("{s:s}", "note", "line\none \"quoted\" \\ \x01 caf\xc3\xa9 / \xe2\x82\xac");
    struct rec_params pp = {.overlay = OVERLAY,
                            .type = "note",
                            .name = "x",
                            .seq = 1,
                            .expires = f->now + 60,
                            .value = big};
    struct record q;
    assert_int_equal(rec_sign(&pp, f->alice.key, f->alice.crt, &q, err, sizeof(err)), REC_OK);
    char *wire = json_dumps(q.envelope, JSON_COMPACT);
    assert_int_equal(q.size, strlen(wire));
    free(wire);
    rec_free(&q);
    json_decref(big);
    rec_free(&r);
}

static void test_wrong_overlay(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, "other.example", 16);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_OVERLAY);
    assert_one_line(err);
    assert_non_null(strstr(err, "other.example"));
    assert_string_equal(rec_strcode(REC_E_OVERLAY), "wrong-overlay");
    rec_verifier_free(v);
    rec_free(&r);
}

static void test_expiry_and_lifetime(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now - 1, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_EXPIRED);
    assert_one_line(err);
    assert_string_equal(rec_strcode(REC_E_EXPIRED), "expired");
    rec_free(&r);
    /* expires == now is expired already. */
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_EXPIRED);
    assert_int_equal(rec_verify(v, &r, f->now - 1, DAY, err, sizeof(err)), REC_OK);
    rec_free(&r);

    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 1000, false,
            &r);
    assert_int_equal(rec_verify(v, &r, f->now, 999, err, sizeof(err)), REC_E_LIFETIME);
    assert_one_line(err);
    assert_string_equal(rec_strcode(REC_E_LIFETIME), "lifetime-too-long");
    assert_int_equal(rec_verify(v, &r, f->now, 1000, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, 0, err, sizeof(err)), REC_OK); /* no cap */
    rec_free(&r);

    /* Far future expiry: no overflow in the lifetime arithmetic. */
    sign_ok(f, &f->alice, "t", "n", 1, INT64_MAX, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_LIFETIME);
    assert_int_equal(rec_verify(v, &r, f->now, 0, err, sizeof(err)), REC_OK);
    rec_free(&r);
    rec_verifier_free(v);
}

/* Malformed envelopes and signed texts, each refused with a message. */

static void expect_malformed(json_t *env, const char *what)
{
    struct record r;
    char err[256] = "";
    int rc = rec_parse(env, 0, &r, err, sizeof(err));
    if (rc != REC_E_MALFORMED)
        fail_msg("%s: got %d (%s)", what, rc, err);
    assert_one_line(err);
    assert_null(r.envelope);
    assert_null(r.signed_obj);
    json_decref(env);
}

/* An envelope around `text` with a placeholder signature (parsing does not check it). */
static json_t *env_text(struct fixture *f, const char *text)
{
    char *c = cert_b64(f->alice.crt);
    json_t *env = json_pack("{s:s, s:s, s:s}", "signed", text, "cert", c, "sig", "AAAA");
    free(c);
    assert_non_null(env);
    return env;
}

static json_t *env_obj(struct fixture *f, json_t *so)
{
    char *text = json_dumps(so, JSON_COMPACT);
    json_decref(so);
    json_t *env = env_text(f, text);
    free(text);
    return env;
}

static void expect_signed_malformed(struct fixture *f, const char *member, json_t *value,
                                    const char *what)
{
    json_t *so = good_signed(f);
    if (value)
        json_object_set_new(so, member, value);
    else
        json_object_del(so, member);
    expect_malformed(env_obj(f, so), what);
}

static void test_malformed_envelope(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    /* The good one parses: the mutations below are what break it. */
    assert_int_equal(parse_env(env_obj(f, good_signed(f)), 0, &r, err, sizeof(err)), REC_OK);
    rec_free(&r);
    assert_int_equal(rec_strcode(REC_E_MALFORMED)[0], 'm');
    assert_string_equal(rec_strcode(REC_E_MALFORMED), "malformed-record");

    expect_malformed(json_array(), "not an object");
    expect_malformed(json_string("x"), "a string");
    static const char *const members[] = {"signed", "cert", "sig"};
    for (size_t i = 0; i < 3; i++) {
        json_t *env = env_obj(f, good_signed(f));
        json_object_del(env, members[i]);
        expect_malformed(env, "missing member");
        env = env_obj(f, good_signed(f));
        json_object_set_new(env, members[i], json_integer(1));
        expect_malformed(env, "member not a string");
        env = env_obj(f, good_signed(f));
        json_object_set_new(env, members[i], json_null());
        expect_malformed(env, "member null");
    }
    json_t *env = env_obj(f, good_signed(f));
    json_object_set_new(env, "extra", json_string("x"));
    expect_malformed(env, "extra member");
    env = env_obj(f, good_signed(f));
    json_object_del(env, "sig");
    json_object_set_new(env, "signature", json_string("AAAA"));
    expect_malformed(env, "renamed member");

    /* Base64: strict. */
    static const char *const bad_b64[] = {"", "AAA", "AA=A", "AAAA\n", "A A=", "AB==", "!!!!"};
    for (size_t i = 0; i < sizeof(bad_b64) / sizeof(bad_b64[0]); i++) {
        env = env_obj(f, good_signed(f));
        json_object_set_new(env, "sig", json_string(bad_b64[i]));
        expect_malformed(env, "bad base64 sig");
        env = env_obj(f, good_signed(f));
        json_object_set_new(env, "cert", json_string(bad_b64[i]));
        expect_malformed(env, "bad base64 cert");
    }

    /* The signed text itself. */
    expect_malformed(env_text(f, "not json"), "signed not JSON");
    expect_malformed(env_text(f, "[1,2]"), "signed not an object");
    expect_malformed(env_text(f, "\"x\""), "signed a string");
    expect_malformed(env_text(f, ""), "signed empty");
    {
        json_t *so = good_signed(f);
        char *text = json_dumps(so, JSON_COMPACT);
        json_decref(so);
        /* Trailing garbage after the object. */
        size_t n = strlen(text);
        char *t2 = malloc(n + 4);
        memcpy(t2, text, n);
        memcpy(t2 + n, " {}", 4);
        expect_malformed(env_text(f, t2), "trailing text");
        /* Duplicate member: a lax parser might keep either "seq". */
        char *dup = malloc(n + 32);
        snprintf(dup, n + 32, "{\"seq\":\"99\",%s", text + 1);
        expect_malformed(env_text(f, dup), "duplicate seq");
        free(dup);
        free(t2);
        free(text);
    }
}

static void test_malformed_signed_members(void **state)
{
    struct fixture *f = *state;
    static const char *const required[] = {"overlay", "key",     "type",      "name", "owner",
                                           "seq",     "expires", "no_update", "value"};
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++)
        expect_signed_malformed(f, required[i], NULL, required[i]);

    /* Wrong JSON types. */
    expect_signed_malformed(f, "overlay", json_integer(1), "overlay integer");
    expect_signed_malformed(f, "type", json_true(), "type bool");
    expect_signed_malformed(f, "name", json_array(), "name array");
    expect_signed_malformed(f, "owner", json_null(), "owner null");
    expect_signed_malformed(f, "seq", json_integer(7), "seq integer");
    expect_signed_malformed(f, "expires", json_string("100"), "expires string");
    expect_signed_malformed(f, "expires", json_real(100.5), "expires real");
    expect_signed_malformed(f, "no_update", json_string("false"), "no_update string");
    expect_signed_malformed(f, "no_update", json_integer(0), "no_update integer");
    expect_signed_malformed(f, "value", json_null(), "value null");
    expect_signed_malformed(f, "key", json_integer(0), "key integer");

    /* seq: unsigned 64-bit decimal, no leading zeros, no sign. */
    static const char *const bad_seq[] = {"01",
                                          "-1",
                                          "+1",
                                          "",
                                          "1a",
                                          " 1",
                                          "1.0",
                                          "1e3",
                                          "0x1",
                                          "18446744073709551616",
                                          "99999999999999999999",
                                          "184467440737095516150"};
    for (size_t i = 0; i < sizeof(bad_seq) / sizeof(bad_seq[0]); i++)
        expect_signed_malformed(f, "seq", json_string(bad_seq[i]), bad_seq[i]);
    static const char *const good_seq[] = {"0", "1", "10", "18446744073709551615"};
    for (size_t i = 0; i < sizeof(good_seq) / sizeof(good_seq[0]); i++) {
        json_t *so = good_signed(f);
        json_object_set_new(so, "seq", json_string(good_seq[i]));
        struct record r;
        char err[256];
        assert_int_equal(parse_env(env_obj(f, so), 0, &r, err, sizeof(err)), REC_OK);
        char buf[32];
        snprintf(buf, sizeof(buf), "%" PRIu64, r.seq);
        assert_string_equal(buf, good_seq[i]);
        rec_free(&r);
    }

    /* key: 40 lowercase hex digits (then it must match). */
    char k[NID_HEX_LEN + 1], up[NID_HEX_LEN + 1];
    key_hex("user location", "alice@test.example", k);
    for (size_t i = 0; i <= NID_HEX_LEN; i++)
        up[i] = (char)(k[i] >= 'a' && k[i] <= 'f' ? k[i] - 32 : k[i]);
    if (strcmp(up, k) != 0)
        expect_signed_malformed(f, "key", json_string(up), "key uppercase");
    char shortk[NID_HEX_LEN];
    memcpy(shortk, k, NID_HEX_LEN - 1);
    shortk[NID_HEX_LEN - 1] = '\0';
    expect_signed_malformed(f, "key", json_string(shortk), "key 39 digits");
    char longk[NID_HEX_LEN + 3];
    snprintf(longk, sizeof(longk), "%s00", k);
    expect_signed_malformed(f, "key", json_string(longk), "key 42 digits");
    char nonhex[NID_HEX_LEN + 1];
    memcpy(nonhex, k, sizeof(nonhex));
    nonhex[5] = 'g';
    expect_signed_malformed(f, "key", json_string(nonhex), "key not hex");

    /* Text members: length and control characters. */
    expect_signed_malformed(f, "type", json_string(""), "empty type");
    expect_signed_malformed(f, "name", json_string(""), "empty name");
    expect_signed_malformed(f, "owner", json_string(""), "empty owner");
    expect_signed_malformed(f, "overlay", json_string(""), "empty overlay");
    char longtype[REC_TYPE_MAX + 2];
    memset(longtype, 't', sizeof(longtype) - 1);
    longtype[sizeof(longtype) - 1] = '\0';
    expect_signed_malformed(f, "type", json_string(longtype), "type too long");
    char longname[REC_NAME_MAX + 2];
    memset(longname, 'n', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    expect_signed_malformed(f, "name", json_string(longname), "name too long");
    expect_signed_malformed(f, "owner", json_string(longname), "owner too long");
    expect_signed_malformed(f, "name", json_string("alice\n@test.example"), "name with newline");
    expect_signed_malformed(f, "name", json_stringn("al\0ice", 6), "name with NUL");
    expect_signed_malformed(f, "type", json_string("user\x7flocation"), "type with DEL");
    expect_signed_malformed(f, "name", json_string("a\xc2\x85z"), "name with C1 NEL");

    /* Record vs removal statement. */
    expect_signed_malformed(f, "remove", json_false(), "remove false");
    expect_signed_malformed(f, "remove", json_true(), "remove with value and no_update");
    json_t *so = good_signed(f);
    json_object_del(so, "value");
    json_object_set_new(so, "remove", json_true());
    expect_malformed(env_obj(f, so), "remove with no_update");
    so = good_signed(f);
    json_object_del(so, "no_update");
    json_object_set_new(so, "remove", json_true());
    expect_malformed(env_obj(f, so), "remove with value");
    so = good_signed(f);
    json_object_del(so, "no_update");
    json_object_del(so, "value");
    json_object_set_new(so, "remove", json_string("yes"));
    expect_malformed(env_obj(f, so), "remove not a boolean");
    expect_signed_malformed(f, "comment", json_string("hi"), "unknown signed member");

    /* A well-formed removal statement parses. */
    so = good_signed(f);
    json_object_del(so, "no_update");
    json_object_del(so, "value");
    json_object_set_new(so, "remove", json_true());
    struct record r;
    char err[256];
    assert_int_equal(parse_env(env_obj(f, so), 0, &r, err, sizeof(err)), REC_OK);
    assert_true(r.removal);
    rec_free(&r);

    /* Any JSON value but null is a value. */
    json_t *vals[] = {json_false(), json_integer(0), json_string(""),
                      json_array(), json_object(),   json_real(1.5)};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        so = good_signed(f);
        json_object_set_new(so, "value", vals[i]);
        assert_int_equal(parse_env(env_obj(f, so), 0, &r, err, sizeof(err)), REC_OK);
        assert_non_null(r.value);
        rec_free(&r);
    }
}

/* The checks run in docs/protocol.md 4.4's order, so a record wrong in two ways gets the first. */
static void test_check_order(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    char k[NID_HEX_LEN + 1];

    /* Parsing: malformed before too large, too large before a bad key. */
    json_t *so = good_signed(f);
    json_object_set_new(so, "seq", json_string("01"));
    json_t *env = env_obj(f, so);
    assert_int_equal(rec_parse(env, 10, &r, err, sizeof(err)), REC_E_MALFORMED);
    json_decref(env);
    so = good_signed(f);
    json_object_set_new(so, "key", json_string(key_hex("t", "other", k)));
    env = env_obj(f, so);
    assert_int_equal(rec_parse(env, 10, &r, err, sizeof(err)), REC_E_TOO_LARGE);
    assert_int_equal(rec_parse(env, 0, &r, err, sizeof(err)), REC_E_KEY);
    json_decref(env);

    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    struct rec_verifier *vo = rec_verifier_new(f->ca.crt, "other.example", 16);
    /* Wrong overlay before a foreign certificate; the certificate before expiry. */
    sign_ok(f, &f->mallory_foreign, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now - 5,
            false, &r);
    assert_int_equal(rec_verify(vo, &r, f->now, DAY, err, sizeof(err)), REC_E_OVERLAY);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_CERT);
    rec_free(&r);

    /* The owner before the signature: Alice's text under Bob's certificate and signature. */
    so = good_signed(f);
    json_object_set_new(so, "expires", json_integer(f->now - 5));
    assert_int_equal(parse_env(envelope_of_obj(&f->bob, so), 0, &r, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_OWNER);
    rec_free(&r);

    /* The signature before expiry and lifetime; those before the access policy. */
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now - 5, false, &r);
    json_t *forged = json_deep_copy(r.envelope);
    unsigned char zeros[64] = {0};
    char *zsig = b64(zeros, sizeof(zeros));
    json_object_set_new(forged, "sig", json_string(zsig));
    free(zsig);
    struct record rf;
    assert_int_equal(parse_env(forged, 0, &rf, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &rf, f->now, DAY, err, sizeof(err)), REC_E_SIGNATURE);
    rec_free(&rf);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_EXPIRED);
    rec_free(&r);
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 5000, false, &r);
    assert_int_equal(rec_verify(v, &r, f->now, 100, err, sizeof(err)), REC_E_LIFETIME);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_E_FORBIDDEN);
    rec_free(&r);
    rec_verifier_free(v);
    rec_verifier_free(vo);
}

static void test_cache(void **state)
{
    struct fixture *f = *state;
    struct record a1, a2, b1;
    char err[256];
    size_t entries;
    uint64_t hits, misses;
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &a1);
    sign_ok(f, &f->alice, "presence", "alice", 1, f->now + 60, false, &a2);
    sign_ok(f, &f->bob, REC_TYPE_USER_LOCATION, "bob@test.example", 1, f->now + 60, false, &b1);

    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    for (int i = 0; i < 3; i++)
        assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &a2, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 1);
    assert_int_equal(misses, 1);
    assert_int_equal(hits, 3);
    assert_int_equal(rec_verify(v, &b1, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 2);
    assert_int_equal(misses, 2);
    /* A refusal after a hit still counts the hit (the certificate was known). */
    struct record b2;
    sign_ok(f, &f->bob, "presence", "bob", 1, f->now + 5 * 3600, false, &b2);
    assert_int_equal(rec_verify(v, &b2, f->now + 4 * 3600, DAY, err, sizeof(err)), REC_E_CERT);
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(hits, 4);
    rec_verifier_free(v);

    /* One entry: the least recently used goes. */
    v = rec_verifier_new(f->ca.crt, OVERLAY, 1);
    assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &b1, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK);
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 1);
    assert_int_equal(misses, 3);
    assert_int_equal(hits, 0);
    rec_verifier_free(v);

    /* Two entries, three certificates: LRU keeps the one just used. */
    struct record d1;
    sign_ok(f, &f->dave_p256, "presence", "dave", 1, f->now + 60, false, &d1);
    v = rec_verifier_new(f->ca.crt, OVERLAY, 2);
    assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK); /* miss */
    assert_int_equal(rec_verify(v, &b1, f->now, DAY, err, sizeof(err)), REC_OK); /* miss */
    assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK); /* hit */
    assert_int_equal(rec_verify(v, &d1, f->now, DAY, err, sizeof(err)), REC_OK); /* miss, b out */
    assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK); /* hit */
    assert_int_equal(rec_verify(v, &b1, f->now, DAY, err, sizeof(err)), REC_OK); /* miss */
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 2);
    assert_int_equal(hits, 2);
    assert_int_equal(misses, 4);
    rec_verifier_free(v);

    /* No cache at all: every check is a miss, and still correct. */
    v = rec_verifier_new(f->ca.crt, OVERLAY, 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(rec_verify(v, &a1, f->now, DAY, err, sizeof(err)), REC_OK);
    assert_int_equal(rec_verify(v, &b2, f->now + 4 * 3600, DAY, err, sizeof(err)), REC_E_CERT);
    rec_verifier_stats(v, &entries, &hits, &misses);
    assert_int_equal(entries, 0);
    assert_int_equal(hits, 0);
    assert_int_equal(misses, 3);
    rec_verifier_free(v);

    rec_free(&a1);
    rec_free(&a2);
    rec_free(&b1);
    rec_free(&b2);
    rec_free(&d1);
}

static bool under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "valgrind");
}

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A cached certificate leaves about one signature verification per record. */
/* Signing keeps what one (key, certificate) pair costs once; another pair is another owner. */
static void test_signer_pairs(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 16);
    struct node *order[] = {&f->alice, &f->bob, &f->alice, &f->dave_p256, &f->bob};
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
        sign_ok(f, order[i], "note", "x", 1, f->now + 60, false, &r);
        assert_string_equal(r.owner, order[i]->uri);
        assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
        rec_free(&r);
    }
    /* A key with another's certificate is refused, before and after that pair was used. */
    json_t *value = json_pack("{s:i}", "n", 1);
    struct rec_params p = {.overlay = OVERLAY,
                           .type = "note",
                           .name = "x",
                           .seq = 1,
                           .expires = f->now + 60,
                           .value = value};
    assert_int_equal(rec_sign(&p, f->alice.key, f->bob.crt, &r, err, sizeof(err)), REC_E_SIGNATURE);
    assert_non_null(strstr(err, "does not match"));
    assert_int_equal(rec_sign(&p, f->bob.key, f->bob.crt, &r, err, sizeof(err)), REC_OK);
    rec_free(&r);
    assert_int_equal(rec_sign(&p, f->alice.key, f->bob.crt, &r, err, sizeof(err)), REC_E_SIGNATURE);
    int n = under_valgrind() ? 20 : 2000;
    double t0 = mono();
    for (int i = 0; i < n; i++) {
        assert_int_equal(rec_sign(&p, f->alice.key, f->alice.crt, &r, err, sizeof(err)), REC_OK);
        rec_free(&r);
    }
    print_message("rec_sign (one pair): %.1f us\n", (mono() - t0) / n * 1e6);
    json_decref(value);
    rec_verifier_free(v);
}

static void test_cached_verify_cost(void **state)
{
    struct fixture *f = *state;
    struct record r;
    char err[256];
    sign_ok(f, &f->alice, REC_TYPE_USER_LOCATION, "alice@test.example", 1, f->now + 60, false, &r);
    struct rec_verifier *v = rec_verifier_new(f->ca.crt, OVERLAY, 1024);
    assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    int n = under_valgrind() ? 20 : 2000;
    double t0 = mono();
    for (int i = 0; i < n; i++)
        assert_int_equal(rec_verify(v, &r, f->now, DAY, err, sizeof(err)), REC_OK);
    double per = (mono() - t0) / n;
    uint64_t hits;
    rec_verifier_stats(v, NULL, &hits, NULL);
    assert_int_equal(hits, (uint64_t)n);

    gnutls_datum_t sig = {NULL, 0};
    const char *text = json_string_value(json_object_get(r.envelope, "signed"));
    assert_int_equal(cred_sign(f->alice.key, text, strlen(text), &sig), 0);
    gnutls_pubkey_t pub = NULL;
    assert_int_equal(gnutls_pubkey_init(&pub), 0);
    assert_int_equal(gnutls_pubkey_import_x509(pub, f->alice.crt, 0), 0);
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)text, (unsigned)strlen(text)};
    t0 = mono();
    for (int i = 0; i < n; i++)
        assert_true(gnutls_pubkey_verify_data2(pub, GNUTLS_SIGN_EDDSA_ED25519, 0, &d, &sig) >= 0);
    double bare = (mono() - t0) / n;
    print_message("rec_verify (cached): %.1f us; bare Ed25519 verify: %.1f us\n", per * 1e6,
                  bare * 1e6);
    if (!under_valgrind())
        assert_true(per < 4 * bare + 50e-6);
    gnutls_pubkey_deinit(pub);
    gnutls_free(sig.data);
    rec_free(&r);
    rec_verifier_free(v);
}

static void test_strcode(void **state)
{
    (void)state;
    assert_string_equal(rec_strcode(REC_OK), "ok");
    assert_string_equal(rec_strcode(REC_E_CERT), "bad-certificate");
    assert_string_equal(rec_strcode(REC_E_NOMEM), "internal");
    assert_string_equal(rec_strcode(-99), "internal");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_removal_and_no_update),
        cmocka_unit_test(test_sign_refusals),
        cmocka_unit_test(test_size_counting),
        cmocka_unit_test(test_forged_signature),
        cmocka_unit_test(test_own_signatures),
        cmocka_unit_test(test_tampered_text),
        cmocka_unit_test(test_foreign_and_bad_certificates),
        cmocka_unit_test(test_certificate_times),
        cmocka_unit_test(test_policy),
        cmocka_unit_test(test_uri_aor),
        cmocka_unit_test(test_owner_mismatch),
        cmocka_unit_test(test_key_mismatch),
        cmocka_unit_test(test_answers),
        cmocka_unit_test(test_type_without_bar),
        cmocka_unit_test(test_too_large),
        cmocka_unit_test(test_wrong_overlay),
        cmocka_unit_test(test_expiry_and_lifetime),
        cmocka_unit_test(test_malformed_envelope),
        cmocka_unit_test(test_malformed_signed_members),
        cmocka_unit_test(test_check_order),
        cmocka_unit_test(test_cache),
        cmocka_unit_test(test_cached_verify_cost),
        cmocka_unit_test(test_signer_pairs),
        cmocka_unit_test(test_strcode),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
