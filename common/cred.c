/*
 * Credentials on top of GnuTLS: Ed25519 node keys kept as PKCS#8 PEM,
 * certificate requests, the CA's issuing function, reading back the identity
 * a certificate states (URI SAN, Node-ID and roles extensions), and raw
 * signatures with node keys. Nothing here verifies a chain: conn.c lets
 * GnuTLS do that during the handshake and only then asks cred_identity()
 * what the peer's certificate says.
 */
#include "cred.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "log.h"

#define EXT_OCTET_STRING 0x04

const char *cred_roles_str(unsigned roles, char *buf, size_t len)
{
    static const struct {
        unsigned bit;
        const char *name;
    } names[] = {{ROLE_NODE, "node"}, {ROLE_SUPERNODE, "supernode"}, {ROLE_SERVICE, "service"}};
    size_t used = 0;
    if (len == 0)
        return buf;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (!(roles & names[i].bit))
            continue;
        int n = snprintf(buf + used, len - used, "%s%s", used ? "," : "", names[i].name);
        if (n < 0 || (size_t)n >= len - used)
            break;
        used += (size_t)n;
    }
    unsigned unknown = roles & ~(unsigned)(ROLE_NODE | ROLE_SUPERNODE | ROLE_SERVICE);
    if (unknown && used < len)
        snprintf(buf + used, len - used, "%s0x%x", used ? "," : "", unknown);
    else if (used == 0)
        snprintf(buf, len, "none");
    return buf;
}

const char *cred_identity_str(const struct peer_identity *id, char *buf, size_t len)
{
    char hex[NID_HEX_LEN + 1], roles[64];
    const char *who = id->uri[0]   ? id->uri
                      : id->dns[0] ? id->dns
                      : id->cn[0]  ? id->cn
                                   : "(unnamed)";
    snprintf(buf, len, "%s (node-id %s, roles %s)", who,
             id->has_node_id ? nid_to_hex(&id->node_id, hex) : "none",
             cred_roles_str(id->roles, roles, sizeof(roles)));
    return buf;
}

/* Files */

static int read_file(const char *path, gnutls_datum_t *out)
{
    int r = gnutls_load_file(path, out);
    if (r < 0) {
        log_error("cred", "cannot read %s: %s", path, strerror(errno ? errno : EIO));
        return GNUTLS_E_FILE_ERROR;
    }
    return 0;
}

/*
 * Writes through a temporary file and rename() (fsutil.h: an unpredictable name, created
 * exclusively without following symlinks) so that a crash never leaves a half-written key or
 * certificate where a daemon would load it, and nothing planted in the directory redirects it.
 */
static int write_file_atomic(const char *path, const gnutls_datum_t *data, mode_t mode)
{
    int rc = fs_write_atomic(path, data->data, data->size, mode);
    if (rc < 0) {
        log_error("cred", "cannot write %s: %s", path, strerror(-rc));
        return GNUTLS_E_FILE_ERROR;
    }
    return 0;
}

/* Key pairs */

/* Ed25519, or ECDSA on P-256 where a browser must accept the key (see cred.h). */
static int keygen(gnutls_x509_privkey_t *key, gnutls_pk_algorithm_t pk, unsigned bits)
{
    gnutls_x509_privkey_t k = NULL;
    int r = gnutls_x509_privkey_init(&k);
    if (r < 0)
        return r;
    r = gnutls_x509_privkey_generate(k, pk, bits, 0);
    if (r < 0) {
        gnutls_x509_privkey_deinit(k);
        return r;
    }
    *key = k;
    return 0;
}

int cred_keygen(gnutls_x509_privkey_t *key)
{
    return keygen(key, GNUTLS_PK_EDDSA_ED25519, 0);
}

int cred_keygen_p256(gnutls_x509_privkey_t *key)
{
    return keygen(key, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1));
}

int cred_key_save(gnutls_x509_privkey_t key, const char *path)
{
    gnutls_datum_t pem = {NULL, 0};
    /* PKCS#8: GnuTLS cannot read back its own legacy PEM form of Ed25519 keys. */
    int r =
        gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN, &pem);
    if (r < 0)
        return r;
    r = write_file_atomic(path, &pem, 0600);
    gnutls_memset(pem.data, 0, pem.size);
    gnutls_free(pem.data);
    return r;
}

int cred_key_load(gnutls_x509_privkey_t *key, const char *path)
{
    gnutls_datum_t pem = {NULL, 0};
    gnutls_x509_privkey_t k = NULL;
    int r = read_file(path, &pem);
    if (r < 0)
        return r;
    r = gnutls_x509_privkey_init(&k);
    if (r < 0)
        goto fail;
    r = gnutls_x509_privkey_import2(k, &pem, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN);
    if (r < 0) {
        log_error("cred", "cannot load key %s: %s", path, gnutls_strerror(r));
        goto fail;
    }
    gnutls_memset(pem.data, 0, pem.size);
    gnutls_free(pem.data);
    *key = k;
    return 0;
fail:
    gnutls_x509_privkey_deinit(k);
    gnutls_memset(pem.data, 0, pem.size);
    gnutls_free(pem.data);
    return r;
}

int cred_pubkey(gnutls_x509_privkey_t key, gnutls_pubkey_t *pub)
{
    gnutls_privkey_t pk = NULL;
    int r;
    *pub = NULL;
    if ((r = gnutls_pubkey_init(pub)) < 0)
        return r;
    if ((r = gnutls_privkey_init(&pk)) < 0 || (r = gnutls_privkey_import_x509(pk, key, 0)) < 0 ||
        (r = gnutls_pubkey_import_privkey(*pub, pk, 0, 0)) < 0) {
        gnutls_pubkey_deinit(*pub);
        *pub = NULL;
    }
    gnutls_privkey_deinit(pk);
    return r < 0 ? r : 0;
}

/* Ed25519 signs the message itself; other key types sign a SHA-256 digest. */
static gnutls_digest_algorithm_t digest_for(gnutls_pk_algorithm_t pk)
{
    switch (pk) {
    case GNUTLS_PK_EDDSA_ED25519:
        return GNUTLS_DIG_SHA512;
    case GNUTLS_PK_EDDSA_ED448:
        return GNUTLS_DIG_SHAKE_256;
    default:
        return GNUTLS_DIG_SHA256;
    }
}

int cred_csr_make(gnutls_x509_privkey_t key, const char *common_name, gnutls_datum_t *pem)
{
    gnutls_x509_crq_t crq = NULL;
    int r = gnutls_x509_crq_init(&crq);
    if (r < 0)
        return r;
    if ((r = gnutls_x509_crq_set_version(crq, 1)) < 0)
        goto out;
    if ((r = gnutls_x509_crq_set_dn_by_oid(crq, GNUTLS_OID_X520_COMMON_NAME, 0, common_name,
                                           (unsigned)strlen(common_name))) < 0)
        goto out;
    if ((r = gnutls_x509_crq_set_key(crq, key)) < 0)
        goto out;
    int pk = gnutls_x509_privkey_get_pk_algorithm(key);
    if ((r = gnutls_x509_crq_sign2(crq, key, digest_for((gnutls_pk_algorithm_t)pk), 0)) < 0)
        goto out;
    r = gnutls_x509_crq_export2(crq, GNUTLS_X509_FMT_PEM, pem);
out:
    gnutls_x509_crq_deinit(crq);
    return r;
}

/* Certificates */

int cred_cert_load(gnutls_x509_crt_t *crt, const char *path)
{
    gnutls_datum_t pem = {NULL, 0};
    gnutls_x509_crt_t c = NULL;
    int r = read_file(path, &pem);
    if (r < 0)
        return r;
    if ((r = gnutls_x509_crt_init(&c)) < 0)
        goto fail;
    /* import() takes the first certificate of a PEM chain. */
    if ((r = gnutls_x509_crt_import(c, &pem, GNUTLS_X509_FMT_PEM)) < 0) {
        log_error("cred", "cannot load certificate %s: %s", path, gnutls_strerror(r));
        goto fail;
    }
    gnutls_free(pem.data);
    *crt = c;
    return 0;
fail:
    gnutls_x509_crt_deinit(c);
    gnutls_free(pem.data);
    return r;
}

int cred_cert_export_pem(gnutls_x509_crt_t crt, gnutls_datum_t *pem)
{
    return gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, pem);
}

int cred_cert_save(gnutls_x509_crt_t crt, const char *path)
{
    gnutls_datum_t pem = {NULL, 0};
    int r = cred_cert_export_pem(crt, &pem);
    if (r < 0)
        return r;
    r = write_file_atomic(path, &pem, 0644);
    gnutls_free(pem.data);
    return r;
}

/* Identity */

/*
 * Reads one of our OCTET STRING extensions. Returns 1 with the content in
 * out[0..want) when present and exactly `want` bytes long, 0 when absent, and
 * GNUTLS_E_ASN1_DER_ERROR when present but malformed: a certificate that
 * carries the extension with a wrong shape must not count as one without it.
 */
static int get_octet_ext(gnutls_x509_crt_t crt, const char *oid, uint8_t *out, size_t want)
{
    gnutls_datum_t v = {NULL, 0};
    unsigned critical = 0;
    int r = gnutls_x509_crt_get_extension_by_oid2(crt, oid, 0, &v, &critical);
    if (r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
        return 0;
    if (r < 0)
        return r;
    int ret = GNUTLS_E_ASN1_DER_ERROR;
    if (v.size == want + 2 && v.data[0] == EXT_OCTET_STRING && v.data[1] == want) {
        memcpy(out, v.data + 2, want);
        ret = 1;
    }
    gnutls_free(v.data);
    return ret;
}

static int set_octet_ext(gnutls_x509_crt_t crt, const char *oid, const uint8_t *val, size_t len)
{
    uint8_t der[2 + 64];
    if (len > 64)
        return GNUTLS_E_INVALID_REQUEST;
    der[0] = EXT_OCTET_STRING;
    der[1] = (uint8_t)len;
    memcpy(der + 2, val, len);
    return gnutls_x509_crt_set_extension_by_oid(crt, oid, der, 2 + len, 0);
}

int cred_identity(gnutls_x509_crt_t crt, struct peer_identity *out)
{
    memset(out, 0, sizeof(*out));

    size_t size = sizeof(out->cn);
    int r = gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, out->cn, &size);
    if (r < 0 && r != GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
        return r;
    if (r < 0)
        out->cn[0] = '\0';

    /* The first URI and the first DNS name count; longer ones than we hold are refused. */
    for (unsigned seq = 0;; seq++) {
        char buf[256];
        size = sizeof(buf) - 1;
        r = gnutls_x509_crt_get_subject_alt_name(crt, seq, buf, &size, NULL);
        if (r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
            break;
        if (r == GNUTLS_E_SHORT_MEMORY_BUFFER)
            return GNUTLS_E_X509_CERTIFICATE_ERROR;
        if (r < 0)
            return r;
        if (r != GNUTLS_SAN_URI && r != GNUTLS_SAN_DNSNAME)
            continue; /* e.g. an iPAddress: binary, and not part of an identity */
        buf[size] = '\0';
        if (strlen(buf) != size) /* an embedded NUL would let a name pose as another */
            return GNUTLS_E_X509_CERTIFICATE_ERROR;
        if (r == GNUTLS_SAN_URI && !out->uri[0])
            memcpy(out->uri, buf, size + 1);
        else if (r == GNUTLS_SAN_DNSNAME && !out->dns[0])
            memcpy(out->dns, buf, size + 1);
    }

    r = get_octet_ext(crt, P2P_OID_NODE_ID, out->node_id.b, NID_LEN);
    if (r < 0)
        return r;
    out->has_node_id = r == 1;

    uint8_t roles = 0;
    r = get_octet_ext(crt, P2P_OID_ROLES, &roles, 1);
    if (r < 0)
        return r;
    out->roles = roles;

    out->not_before = gnutls_x509_crt_get_activation_time(crt);
    out->not_after = gnutls_x509_crt_get_expiration_time(crt);
    return 0;
}

/* Signatures */

static gnutls_sign_algorithm_t sign_algo_for(gnutls_pk_algorithm_t pk)
{
    return gnutls_pk_to_sign(pk, digest_for(pk));
}

/*
 * Ed25519 signatures go through libsodium: they are deterministic (RFC 8032),
 * so it makes exactly the bytes GnuTLS would, in about a third of the time
 * here (docs/benchmarks.md). Returns 1 when done, 0 when `key` is not Ed25519,
 * a GnuTLS error code otherwise.
 */
static int sign_ed25519(gnutls_x509_privkey_t key, const void *data, size_t len,
                        gnutls_datum_t *sig)
{
    if (gnutls_x509_privkey_get_pk_algorithm(key) != GNUTLS_PK_EDDSA_ED25519)
        return 0;
    gnutls_ecc_curve_t curve;
    gnutls_datum_t x = {NULL, 0}, k = {NULL, 0};
    int r = gnutls_x509_privkey_export_ecc_raw(key, &curve, &x, NULL, &k);
    if (r < 0)
        return r;
    unsigned char pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
    r = GNUTLS_E_INTERNAL_ERROR;
    if (sodium_init() < 0 || k.size != crypto_sign_SEEDBYTES ||
        crypto_sign_seed_keypair(pk, sk, k.data) != 0)
        goto out;
    if (!(sig->data = gnutls_malloc(crypto_sign_BYTES))) {
        r = GNUTLS_E_MEMORY_ERROR;
        goto out;
    }
    crypto_sign_detached(sig->data, NULL, data, len, sk);
    sig->size = crypto_sign_BYTES;
    r = 1;
out:
    sodium_memzero(sk, sizeof(sk));
    if (k.data) {
        sodium_memzero(k.data, k.size);
        gnutls_free(k.data);
    }
    gnutls_free(x.data);
    return r;
}

int cred_sign(gnutls_x509_privkey_t key, const void *data, size_t len, gnutls_datum_t *sig)
{
    int r = sign_ed25519(key, data, len, sig);
    if (r != 0)
        return r < 0 ? r : 0;
    gnutls_privkey_t pk = NULL;
    if ((r = gnutls_privkey_init(&pk)) < 0)
        return r;
    if ((r = gnutls_privkey_import_x509(pk, key, 0)) < 0)
        goto out;
    int algo = gnutls_privkey_get_pk_algorithm(pk, NULL);
    if (algo < 0) {
        r = algo;
        goto out;
    }
    gnutls_sign_algorithm_t sa = sign_algo_for((gnutls_pk_algorithm_t)algo);
    if (sa == GNUTLS_SIGN_UNKNOWN) {
        r = GNUTLS_E_UNKNOWN_PK_ALGORITHM;
        goto out;
    }
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)data, (unsigned)len};
    r = gnutls_privkey_sign_data2(pk, sa, 0, &d, sig);
out:
    gnutls_privkey_deinit(pk);
    return r;
}

int cred_key_matches(gnutls_x509_privkey_t key, gnutls_x509_crt_t crt)
{
    unsigned char a[64], b[64];
    size_t alen = sizeof(a), blen = sizeof(b);
    int r = gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, a, &alen);
    if (r < 0)
        return r;
    if ((r = gnutls_x509_crt_get_key_id(crt, GNUTLS_KEYID_USE_SHA256, b, &blen)) < 0)
        return r;
    return alen == blen && !memcmp(a, b, alen) ? 0 : GNUTLS_E_CERTIFICATE_KEY_MISMATCH;
}

int cred_verify(gnutls_x509_crt_t crt, const void *data, size_t len, const gnutls_datum_t *sig)
{
    gnutls_pubkey_t pub = NULL;
    int r = gnutls_pubkey_init(&pub);
    if (r < 0)
        return r;
    if ((r = gnutls_pubkey_import_x509(pub, crt, 0)) < 0)
        goto out;
    int algo = gnutls_pubkey_get_pk_algorithm(pub, NULL);
    if (algo < 0) {
        r = algo;
        goto out;
    }
    gnutls_sign_algorithm_t sa = sign_algo_for((gnutls_pk_algorithm_t)algo);
    if (sa == GNUTLS_SIGN_UNKNOWN) {
        r = GNUTLS_E_UNKNOWN_PK_ALGORITHM;
        goto out;
    }
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)data, (unsigned)len};
    r = gnutls_pubkey_verify_data2(pub, sa, 0, &d, sig);
    if (r > 0)
        r = 0;
out:
    gnutls_pubkey_deinit(pub);
    return r;
}

/* Issuing */

static int random_serial(uint8_t serial[16])
{
    int r = gnutls_rnd(GNUTLS_RND_NONCE, serial, 16);
    if (r < 0)
        return r;
    /* Positive (top bit clear) and exactly 16 bytes long (no leading zero byte). */
    serial[0] = (uint8_t)((serial[0] & 0x7f) | 0x40);
    return 0;
}

int cred_issue(gnutls_pubkey_t subject, gnutls_x509_privkey_t ca_key, gnutls_x509_crt_t ca_crt,
               const struct cred_issue_params *p, gnutls_x509_crt_t *out)
{
    gnutls_x509_crt_t crt = NULL, fresh = NULL;
    gnutls_privkey_t signer = NULL;
    gnutls_datum_t der = {NULL, 0};
    uint8_t serial[16];
    unsigned char keyid[64];
    size_t keyid_len;
    int r;

    if (!p || !p->cn || !p->cn[0] || !subject || !ca_key)
        return GNUTLS_E_INVALID_REQUEST;
    if ((r = gnutls_x509_crt_init(&crt)) < 0)
        return r;
    if ((r = gnutls_x509_crt_set_version(crt, 3)) < 0)
        goto fail;
    if ((r = random_serial(serial)) < 0 ||
        (r = gnutls_x509_crt_set_serial(crt, serial, sizeof(serial))) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, p->cn,
                                           (unsigned)strlen(p->cn))) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_set_pubkey(crt, subject)) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_set_activation_time(crt, p->not_before)) < 0 ||
        (r = gnutls_x509_crt_set_expiration_time(crt, p->not_after)) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_set_basic_constraints(crt, p->is_ca ? 1 : 0, -1)) < 0)
        goto fail;
    unsigned usage =
        p->is_ca ? (GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN) : GNUTLS_KEY_DIGITAL_SIGNATURE;
    if ((r = gnutls_x509_crt_set_key_usage(crt, usage)) < 0)
        goto fail;
    if (p->server_auth &&
        (r = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0)) < 0)
        goto fail;
    if (p->client_auth &&
        (r = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_CLIENT, 0)) < 0)
        goto fail;
    if (p->uri &&
        (r = gnutls_x509_crt_set_subject_alt_name(
             crt, GNUTLS_SAN_URI, p->uri, (unsigned)strlen(p->uri), GNUTLS_FSAN_APPEND)) < 0)
        goto fail;
    if (p->dns &&
        (r = gnutls_x509_crt_set_subject_alt_name(
             crt, GNUTLS_SAN_DNSNAME, p->dns, (unsigned)strlen(p->dns), GNUTLS_FSAN_APPEND)) < 0)
        goto fail;
    for (const char *const *h = p->hosts; h && *h; h++) {
        unsigned char ip[16];
        if (inet_pton(AF_INET, *h, ip) == 1)
            r = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, ip, 4,
                                                     GNUTLS_FSAN_APPEND);
        else if (inet_pton(AF_INET6, *h, ip) == 1)
            r = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, ip, 16,
                                                     GNUTLS_FSAN_APPEND);
        else
            r = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME, *h,
                                                     (unsigned)strlen(*h), GNUTLS_FSAN_APPEND);
        if (r < 0)
            goto fail;
    }
    if (p->node_id && (r = set_octet_ext(crt, P2P_OID_NODE_ID, p->node_id->b, NID_LEN)) < 0)
        goto fail;
    if (p->roles) {
        if (p->roles > 0xff) {
            r = GNUTLS_E_INVALID_REQUEST;
            goto fail;
        }
        uint8_t roles = (uint8_t)p->roles;
        if ((r = set_octet_ext(crt, P2P_OID_ROLES, &roles, 1)) < 0)
            goto fail;
    }

    keyid_len = sizeof(keyid);
    if ((r = gnutls_pubkey_get_key_id(subject, GNUTLS_KEYID_USE_SHA1, keyid, &keyid_len)) < 0 ||
        (r = gnutls_x509_crt_set_subject_key_id(crt, keyid, keyid_len)) < 0)
        goto fail;
    if (ca_crt) {
        keyid_len = sizeof(keyid);
        unsigned crit = 0;
        r = gnutls_x509_crt_get_subject_key_id(ca_crt, keyid, &keyid_len, &crit);
        if (r >= 0 && (r = gnutls_x509_crt_set_authority_key_id(crt, keyid, keyid_len)) < 0)
            goto fail;
    }

    if ((r = gnutls_privkey_init(&signer)) < 0 ||
        (r = gnutls_privkey_import_x509(signer, ca_key, 0)) < 0)
        goto fail;
    int algo = gnutls_privkey_get_pk_algorithm(signer, NULL);
    if (algo < 0) {
        r = algo;
        goto fail;
    }
    /* Self-signed: the certificate is its own issuer (its DN is already set). */
    r = gnutls_x509_crt_privkey_sign(crt, ca_crt ? ca_crt : crt, signer,
                                     digest_for((gnutls_pk_algorithm_t)algo), 0);
    if (r < 0)
        goto fail;
    /*
     * A freshly signed gnutls_x509_crt_t keeps stale cached fields (its raw
     * DNs among them), so chain verification against it fails. Hand out a
     * re-imported copy that behaves exactly like a certificate read from disk.
     */
    if ((r = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_DER, &der)) < 0)
        goto fail;
    if ((r = gnutls_x509_crt_init(&fresh)) < 0 ||
        (r = gnutls_x509_crt_import(fresh, &der, GNUTLS_X509_FMT_DER)) < 0)
        goto fail;
    gnutls_free(der.data);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crt_deinit(crt);
    *out = fresh;
    return 0;
fail:
    gnutls_free(der.data);
    gnutls_x509_crt_deinit(fresh);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crt_deinit(crt);
    return r;
}
