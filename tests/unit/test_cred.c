/*
 * Unit tests for cred.c: keys survive a save/load round trip, requests are
 * well formed, an issued certificate states exactly the identity it was
 * given, and signatures verify only with the right key and unaltered bytes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cred.h"
#include "testca.h"

static int setup_ca(void **state)
{
    struct testca *ca = calloc(1, sizeof(*ca));
    if (!ca || testca_init(ca) < 0) {
        free(ca);
        return -1;
    }
    *state = ca;
    return 0;
}

static int teardown_ca(void **state)
{
    struct testca *ca = *state;
    testca_cleanup(ca);
    free(ca);
    return 0;
}

static gnutls_pubkey_t pubkey_of(gnutls_x509_privkey_t key)
{
    gnutls_pubkey_t pub = NULL;
    assert_int_equal(cred_pubkey(key, &pub), 0);
    return pub;
}

static void test_key_roundtrip(void **state)
{
    struct testca *ca = *state;
    char path[400];
    snprintf(path, sizeof(path), "%s/roundtrip.key", ca->dir);

    gnutls_x509_privkey_t key = NULL, back = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    assert_int_equal(gnutls_x509_privkey_get_pk_algorithm(key), GNUTLS_PK_EDDSA_ED25519);
    assert_int_equal(cred_key_save(key, path), 0);

    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);

    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[64] = "";
    assert_non_null(fgets(line, sizeof(line), f));
    fclose(f);
    assert_string_equal(line, "-----BEGIN PRIVATE KEY-----\n"); /* PKCS#8 */

    assert_int_equal(cred_key_load(&back, path), 0);
    unsigned char id1[64], id2[64];
    size_t l1 = sizeof(id1), l2 = sizeof(id2);
    assert_int_equal(gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, id1, &l1), 0);
    assert_int_equal(gnutls_x509_privkey_get_key_id(back, GNUTLS_KEYID_USE_SHA256, id2, &l2), 0);
    assert_int_equal(l1, l2);
    assert_memory_equal(id1, id2, l1);

    /* A missing file is a file error, not a crash. */
    gnutls_x509_privkey_t none = NULL;
    assert_int_equal(cred_key_load(&none, "/nonexistent/dir/key.pem"), GNUTLS_E_FILE_ERROR);
    assert_null(none);

    gnutls_x509_privkey_deinit(key);
    gnutls_x509_privkey_deinit(back);
}

static void test_csr(void **state)
{
    (void)state;
    gnutls_x509_privkey_t key = NULL;
    gnutls_datum_t pem = {NULL, 0};
    assert_int_equal(cred_keygen(&key), 0);
    assert_int_equal(cred_csr_make(key, "alice", &pem), 0);
    assert_non_null(strstr((const char *)pem.data, "BEGIN NEW CERTIFICATE REQUEST"));

    gnutls_x509_crq_t crq = NULL;
    assert_int_equal(gnutls_x509_crq_init(&crq), 0);
    assert_int_equal(gnutls_x509_crq_import(crq, &pem, GNUTLS_X509_FMT_PEM), 0);
    assert_int_equal(gnutls_x509_crq_verify(crq, 0), 0); /* self-signature holds */
    char cn[64];
    size_t cnlen = sizeof(cn);
    assert_int_equal(
        gnutls_x509_crq_get_dn_by_oid(crq, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &cnlen), 0);
    assert_string_equal(cn, "alice");
    assert_int_equal(gnutls_x509_crq_get_pk_algorithm(crq, NULL), GNUTLS_PK_EDDSA_ED25519);

    gnutls_x509_crq_deinit(crq);
    gnutls_free(pem.data);
    gnutls_x509_privkey_deinit(key);
}

static void test_issue_identity(void **state)
{
    struct testca *ca = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    gnutls_pubkey_t pub = pubkey_of(key);

    nid_t id;
    for (int i = 0; i < NID_LEN; i++)
        id.b[i] = (uint8_t)(0xa0 + i);
    time_t now = time(NULL);
    struct cred_issue_params p = {
        .cn = "bob",
        .uri = "sip:bob@example.org",
        .dns = "sn1.example.org",
        .node_id = &id,
        .roles = ROLE_NODE | ROLE_SUPERNODE,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 10,
        .not_after = now + 1000,
    };
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(cred_issue(pub, ca->key, ca->crt, &p, &crt), 0);

    /* Save + load through a file, as the daemons will. */
    char path[400];
    snprintf(path, sizeof(path), "%s/bob.pem", ca->dir);
    assert_int_equal(cred_cert_save(crt, path), 0);
    gnutls_x509_crt_t back = NULL;
    assert_int_equal(cred_cert_load(&back, path), 0);

    struct peer_identity who;
    assert_int_equal(cred_identity(back, &who), 0);
    assert_string_equal(who.uri, "sip:bob@example.org");
    assert_string_equal(who.dns, "sn1.example.org");
    assert_string_equal(who.cn, "bob");
    assert_true(who.has_node_id);
    assert_memory_equal(who.node_id.b, id.b, NID_LEN);
    assert_int_equal(who.roles, ROLE_NODE | ROLE_SUPERNODE);
    assert_int_equal(who.not_before, now - 10);
    assert_int_equal(who.not_after, now + 1000);

    /* The extensions are non-critical (a critical unknown one breaks verification). */
    gnutls_datum_t v = {NULL, 0};
    unsigned critical = 1;
    assert_int_equal(gnutls_x509_crt_get_extension_by_oid2(back, P2P_OID_NODE_ID, 0, &v, &critical),
                     0);
    assert_int_equal(critical, 0);
    assert_int_equal(v.size, 22);
    assert_int_equal(v.data[0], 0x04);
    assert_int_equal(v.data[1], 20);
    gnutls_free(v.data);

    /*
     * The OIDs come back exactly as written: libtasn1 silently clamps arcs
     * above 2^63, which once turned our extensions into someone else's OID.
     */
    int found = 0;
    for (unsigned i = 0;; i++) {
        char oidbuf[128];
        size_t oidlen = sizeof(oidbuf);
        if (gnutls_x509_crt_get_extension_info(back, i, oidbuf, &oidlen, NULL) < 0)
            break;
        if (!strcmp(oidbuf, P2P_OID_NODE_ID) || !strcmp(oidbuf, P2P_OID_ROLES))
            found++;
    }
    assert_int_equal(found, 2);

    /* It chains to the CA, and the CA is a CA. */
    unsigned status = 0;
    assert_int_equal(gnutls_x509_crt_verify(back, &ca->crt, 1, 0, &status), 0);
    assert_int_equal(status, 0);
    unsigned is_ca = 0;
    assert_int_equal(gnutls_x509_crt_get_basic_constraints(ca->crt, NULL, &is_ca, NULL), 1);
    assert_int_equal(is_ca, 1);
    assert_int_equal(gnutls_x509_crt_get_basic_constraints(back, NULL, &is_ca, NULL), 0);

    /* Both key purposes are there. */
    char oid[128];
    size_t olen = sizeof(oid);
    int seen = 0;
    for (unsigned i = 0;; i++) {
        olen = sizeof(oid);
        if (gnutls_x509_crt_get_key_purpose_oid(back, i, oid, &olen, NULL) < 0)
            break;
        if (!strcmp(oid, GNUTLS_KP_TLS_WWW_SERVER))
            seen |= 1;
        if (!strcmp(oid, GNUTLS_KP_TLS_WWW_CLIENT))
            seen |= 2;
    }
    assert_int_equal(seen, 3);

    char roles[64];
    assert_string_equal(cred_roles_str(who.roles, roles, sizeof(roles)), "node,supernode");
    assert_string_equal(cred_roles_str(0, roles, sizeof(roles)), "none");

    gnutls_x509_crt_deinit(back);
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

static void test_identity_without_extensions(void **state)
{
    struct testca *ca = *state;
    struct testca_cert leaf;
    assert_int_equal(testca_issue(ca, "plain", TESTCA_NO_ROLES, &leaf), 0);
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(cred_cert_load(&crt, leaf.cert_file), 0);
    struct peer_identity who;
    assert_int_equal(cred_identity(crt, &who), 0);
    assert_false(who.has_node_id);
    assert_int_equal(who.roles, 0);
    assert_string_equal(who.uri, "sip:plain@test.example");
    assert_string_equal(who.dns, "");
    gnutls_x509_crt_deinit(crt);
}

/* A Node-ID extension of the wrong length must not be read as a Node-ID. */
static void test_identity_malformed_extension(void **state)
{
    struct testca *ca = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    gnutls_pubkey_t pub = pubkey_of(key);
    time_t now = time(NULL);
    struct cred_issue_params p = {.cn = "odd", .not_before = now, .not_after = now + 60};
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(cred_issue(pub, ca->key, ca->crt, &p, &crt), 0);
    const uint8_t short_id[] = {0x04, 0x03, 1, 2, 3};
    assert_int_equal(
        gnutls_x509_crt_set_extension_by_oid(crt, P2P_OID_NODE_ID, short_id, sizeof(short_id), 0),
        0);
    struct peer_identity who;
    assert_true(cred_identity(crt, &who) < 0);
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

static void test_sign_verify(void **state)
{
    struct testca *ca = *state;
    struct testca_cert a, b;
    assert_int_equal(testca_issue(ca, "signer", TESTCA_GOOD, &a), 0);
    assert_int_equal(testca_issue(ca, "other", TESTCA_GOOD, &b), 0);

    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL, other = NULL;
    assert_int_equal(cred_key_load(&key, a.key_file), 0);
    assert_int_equal(cred_cert_load(&crt, a.cert_file), 0);
    assert_int_equal(cred_cert_load(&other, b.cert_file), 0);

    const char data[] = "REGISTER sip:alice@example.org; node-id=0123";
    gnutls_datum_t sig = {NULL, 0};
    assert_int_equal(cred_sign(key, data, sizeof(data) - 1, &sig), 0);
    assert_int_equal(sig.size, 64); /* Ed25519 */
    assert_int_equal(cred_verify(crt, data, sizeof(data) - 1, &sig), 0);

    /* Altered data, altered signature, wrong key: all refused. */
    char altered[sizeof(data)];
    memcpy(altered, data, sizeof(data));
    altered[3] ^= 1;
    assert_true(cred_verify(crt, altered, sizeof(data) - 1, &sig) < 0);
    sig.data[10] ^= 0x40;
    assert_true(cred_verify(crt, data, sizeof(data) - 1, &sig) < 0);
    sig.data[10] ^= 0x40;
    assert_true(cred_verify(other, data, sizeof(data) - 1, &sig) < 0);
    gnutls_datum_t truncated = {sig.data, sig.size - 1};
    assert_true(cred_verify(crt, data, sizeof(data) - 1, &truncated) < 0);

    gnutls_free(sig.data);
    gnutls_x509_crt_deinit(other);
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
}

/* The signing code is not tied to Ed25519: an ECDSA P-256 key works too. */
static void test_sign_verify_ecdsa(void **state)
{
    struct testca *ca = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(gnutls_x509_privkey_init(&key), 0);
    assert_int_equal(gnutls_x509_privkey_generate(
                         key, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0),
                     0);
    gnutls_pubkey_t pub = pubkey_of(key);
    time_t now = time(NULL);
    struct cred_issue_params p = {.cn = "ec", .not_before = now, .not_after = now + 60};
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(cred_issue(pub, ca->key, ca->crt, &p, &crt), 0);

    gnutls_datum_t sig = {NULL, 0};
    assert_int_equal(cred_sign(key, "hello", 5, &sig), 0);
    assert_int_equal(cred_verify(crt, "hello", 5, &sig), 0);
    assert_true(cred_verify(crt, "hellp", 5, &sig) < 0);

    gnutls_free(sig.data);
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

static void test_service_certificate_names(void **state)
{
    /* IP-address names are binary (127.0.0.1 holds zero bytes): they must not trip the
     * embedded-NUL guard meant for text names, nor count as an identity. */
    struct testca *ca = *state;
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    gnutls_pubkey_t pub = pubkey_of(key);
    const char *hosts[] = {"127.0.0.1", "::1", "bootstrap1.example.org", NULL};
    time_t now = time(NULL);
    struct cred_issue_params p = {.cn = "127.0.0.1",
                                  .hosts = hosts,
                                  .roles = ROLE_SERVICE,
                                  .server_auth = true,
                                  .client_auth = true,
                                  .not_before = now - 60,
                                  .not_after = now + 3600};
    assert_int_equal(cred_issue(pub, ca->key, ca->crt, &p, &crt), 0);
    struct peer_identity id;
    assert_int_equal(cred_identity(crt, &id), 0);
    assert_string_equal(id.dns, "bootstrap1.example.org");
    assert_string_equal(id.uri, "");
    assert_int_equal(id.roles, ROLE_SERVICE);
    assert_false(id.has_node_id);
    char buf[512];
    assert_string_equal(cred_identity_str(&id, buf, sizeof(buf)),
                        "bootstrap1.example.org (node-id none, roles service)");
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

static void test_issue_refuses_bad_params(void **state)
{
    struct testca *ca = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    gnutls_pubkey_t pub = pubkey_of(key);
    struct cred_issue_params p = {.cn = NULL};
    gnutls_x509_crt_t crt = NULL;
    assert_true(cred_issue(pub, ca->key, ca->crt, &p, &crt) < 0);
    assert_null(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_roundtrip),
        cmocka_unit_test(test_csr),
        cmocka_unit_test(test_issue_identity),
        cmocka_unit_test(test_identity_without_extensions),
        cmocka_unit_test(test_identity_malformed_extension),
        cmocka_unit_test(test_sign_verify),
        cmocka_unit_test(test_sign_verify_ecdsa),
        cmocka_unit_test(test_service_certificate_names),
        cmocka_unit_test(test_issue_refuses_bad_params),
    };
    return cmocka_run_group_tests(tests, setup_ca, teardown_ca);
}
