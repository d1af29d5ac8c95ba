/*
 * The login server's CA and state directory (see ca.h).
 */
#include "ca.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errbuf.h"
#include "fsutil.h"
#include "log.h"
#include "overlay_doc.h"

#define CA_VALIDITY_DAYS     3650
#define SERVER_VALIDITY_DAYS 825
#define MAX_PEM              (64 * 1024)

static void random_serial_hex(gnutls_x509_crt_t crt, char out[41])
{
    unsigned char serial[20];
    size_t n = sizeof(serial);
    out[0] = '\0';
    if (gnutls_x509_crt_get_serial(crt, serial, &n) < 0)
        return;
    for (size_t i = 0; i < n && i < 20; i++)
        sprintf(out + 2 * i, "%02x", serial[i]);
}

/* Issues for `key` and writes <dir>/<base>.key and .pem. */
static int issue_with_new_key(gnutls_x509_privkey_t ca_key, gnutls_x509_crt_t ca_crt,
                              const struct cred_issue_params *p, const char *key_path,
                              const char *cert_path, gnutls_x509_crt_t *crt_out, char *err,
                              size_t errlen)
{
    gnutls_x509_privkey_t key = NULL;
    gnutls_pubkey_t pub = NULL;
    gnutls_x509_crt_t crt = NULL;
    int r;
    /* CA and service keys: ECDSA P-256, so that browsers can use the status pages. */
    if ((r = cred_keygen_p256(&key)) < 0 || (r = cred_pubkey(key, &pub)) < 0) {
        errbuf_set(err, errlen, -1, "cannot make a key: %s", gnutls_strerror(r));
        goto out;
    }
    if ((r = cred_issue(pub, ca_crt ? ca_key : key, ca_crt, p, &crt)) < 0) {
        errbuf_set(err, errlen, -1, "cannot issue certificate %s: %s", cert_path,
                   gnutls_strerror(r));
        goto out;
    }
    if ((r = cred_key_save(key, key_path)) < 0 || (r = cred_cert_save(crt, cert_path)) < 0) {
        errbuf_set(err, errlen, -1, "cannot write %s / %s: %s", key_path, cert_path,
                   gnutls_strerror(r));
        goto out;
    }
    if (crt_out) {
        *crt_out = crt;
        crt = NULL;
    }
out:
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
    return r < 0 ? -1 : 0;
}

static int load_ca(struct ls_ca *ca, bool need_document, char *err, size_t errlen);

int ls_ca_create(const char *dir, const char *overlay, const char *const *hosts, struct ls_ca **out,
                 char *err, size_t errlen)
{
    *out = NULL;
    char ca_key[4096], ca_pem[4096], srv_key[4096], srv_pem[4096];
    if (fs_join(ca_key, sizeof(ca_key), dir, "ca.key") ||
        fs_join(ca_pem, sizeof(ca_pem), dir, "ca.pem") ||
        fs_join(srv_key, sizeof(srv_key), dir, "server.key") ||
        fs_join(srv_pem, sizeof(srv_pem), dir, "server.pem"))
        return errbuf_set(err, errlen, -1, "state directory path too long");
    int r = fs_mkdir(dir, 0700);
    if (r < 0)
        return errbuf_set(err, errlen, -1, "cannot create %s: %s", dir, strerror(-r));
    if (access(ca_key, F_OK) == 0 || access(ca_pem, F_OK) == 0)
        return errbuf_set(err, errlen, -1, "%s already holds an overlay CA: refusing to replace it",
                          dir);

    time_t now = time(NULL);
    char cn[300];
    snprintf(cn, sizeof(cn), "p2psip overlay CA for %s", overlay);
    struct cred_issue_params cap = {
        .cn = cn,
        .is_ca = true,
        .not_before = now - 300,
        .not_after = now + (time_t)CA_VALIDITY_DAYS * 86400,
    };
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    int rc = -1;
    if (issue_with_new_key(NULL, NULL, &cap, ca_key, ca_pem, NULL, err, errlen) != 0)
        return -1;
    if (cred_key_load(&key, ca_key) < 0 || cred_cert_load(&crt, ca_pem) < 0) {
        errbuf_set(err, errlen, -1, "cannot read back the new CA from %s", dir);
        goto out;
    }
    struct cred_issue_params sp = {
        .cn = hosts && hosts[0] ? hosts[0] : "localhost",
        .hosts = hosts,
        .roles = ROLE_SERVICE,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 300,
        .not_after = now + (time_t)SERVER_VALIDITY_DAYS * 86400,
    };
    rc = issue_with_new_key(key, crt, &sp, srv_key, srv_pem, NULL, err, errlen);
    if (rc == 0) {
        struct ls_ca *ca = calloc(1, sizeof(*ca));
        if (!ca || !(ca->dir = strdup(dir)) || !(ca->overlay = strdup(overlay)) ||
            load_ca(ca, false, err, errlen) != 0) {
            ls_ca_free(ca);
            rc = -1;
        } else {
            *out = ca;
        }
    }
out:
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
    return rc;
}

void ls_ca_free(struct ls_ca *ca)
{
    if (!ca)
        return;
    gnutls_x509_privkey_deinit(ca->key);
    gnutls_x509_crt_deinit(ca->crt);
    free(ca->dir);
    free(ca->overlay);
    free(ca->ca_pem);
    free(ca->pin);
    free(ca->server_cert_pem);
    free(ca->server_key_pem);
    free(ca->envelope);
    free(ca);
}

/* Reads "overlay" and "sequence" out of a signed envelope we wrote ourselves. */
static int envelope_facts(const char *envelope, char **overlay, long long *sequence)
{
    json_t *env = json_loads(envelope, 0, NULL);
    json_t *doc =
        env ? json_loads(json_string_value(json_object_get(env, "document")) ?: "", 0, NULL) : NULL;
    int rc = -1;
    const char *ov = json_string_value(json_object_get(doc, "overlay"));
    json_t *seq = json_object_get(doc, "sequence");
    if (ov && json_is_integer(seq)) {
        *overlay = strdup(ov);
        *sequence = json_integer_value(seq);
        rc = *overlay ? 0 : -1;
    }
    json_decref(doc);
    json_decref(env);
    return rc;
}

/* Loads keys, certificates and (when asked) the document of an opened ca->dir. */
static int load_ca(struct ls_ca *ca, bool need_document, char *err, size_t errlen)
{
    char path[4096];
    int r = 0;
    if (fs_join(path, sizeof(path), ca->dir, "ca.key") || cred_key_load(&ca->key, path) < 0)
        return errbuf_set(err, errlen, -1,
                          "cannot load the CA key %s (run 'loginserver init' first?)", path);
    if (fs_join(path, sizeof(path), ca->dir, "ca.pem") || cred_cert_load(&ca->crt, path) < 0 ||
        fs_read_file(path, MAX_PEM, &ca->ca_pem, NULL) < 0)
        return errbuf_set(err, errlen, -1, "cannot load the CA certificate %s", path);
    char pin[80];
    if (overlay_doc_pin(ca->crt, pin) != 0 || !(ca->pin = strdup(pin)))
        return errbuf_set(err, errlen, -1, "cannot compute the CA pin");
    if (fs_join(path, sizeof(path), ca->dir, "server.pem") ||
        (r = fs_read_file(path, MAX_PEM, &ca->server_cert_pem, NULL)) < 0 ||
        fs_join(path, sizeof(path), ca->dir, "server.key") ||
        (r = fs_read_file(path, MAX_PEM, &ca->server_key_pem, NULL)) < 0)
        return errbuf_set(err, errlen, -1, "cannot read %s: %s", path, strerror(-r));
    if (!need_document)
        return 0;
    if (fs_join(path, sizeof(path), ca->dir, "overlay.json") ||
        (r = fs_read_file(path, 1024 * 1024, &ca->envelope, NULL)) < 0)
        return errbuf_set(err, errlen, -1, "cannot read %s: %s", path, strerror(-r));
    free(ca->overlay);
    ca->overlay = NULL;
    if (envelope_facts(ca->envelope, &ca->overlay, &ca->sequence) != 0)
        return errbuf_set(err, errlen, -1, "%s: not a signed configuration document", path);
    return 0;
}

int ls_ca_open(const char *dir, struct ls_ca **out, char *err, size_t errlen)
{
    *out = NULL;
    struct ls_ca *ca = calloc(1, sizeof(*ca));
    if (!ca || !(ca->dir = strdup(dir))) {
        ls_ca_free(ca);
        return errbuf_set(err, errlen, -1, "out of memory");
    }
    if (load_ca(ca, true, err, errlen) != 0) {
        ls_ca_free(ca);
        return -1;
    }
    *out = ca;
    return 0;
}

int ls_ca_publish(struct ls_ca *ca, const char *document_text, long long sequence, char *err,
                  size_t errlen)
{
    char *envelope = NULL;
    if (overlay_doc_sign(ca->key, document_text, &envelope) != 0)
        return errbuf_set(err, errlen, -1, "cannot sign the configuration document");
    char path[4096];
    int r = fs_join(path, sizeof(path), ca->dir, "overlay.json");
    if (r == 0)
        r = fs_write_atomic(path, envelope, strlen(envelope), 0644);
    if (r < 0) {
        free(envelope);
        return errbuf_set(err, errlen, -1, "cannot write %s: %s", path, strerror(-r));
    }
    free(ca->envelope);
    ca->envelope = envelope;
    ca->sequence = sequence;
    return 0;
}

int ls_ca_check_csr(const char *pem, size_t len, gnutls_x509_crq_t *out, char *err, size_t errlen)
{
    gnutls_x509_crq_t crq = NULL;
    gnutls_datum_t in = {(unsigned char *)(uintptr_t)pem, (unsigned)len};
    int r;
    *out = NULL;
    if ((r = gnutls_x509_crq_init(&crq)) < 0)
        return errbuf_set(err, errlen, -1, "out of memory");
    if ((r = gnutls_x509_crq_import(crq, &in, GNUTLS_X509_FMT_PEM)) < 0) {
        errbuf_set(err, errlen, -1, "not a PEM PKCS#10 request: %s", gnutls_strerror(r));
        goto fail;
    }
    /* Proof of possession: the request is signed by the key it carries. */
    if ((r = gnutls_x509_crq_verify(crq, 0)) < 0) {
        errbuf_set(err, errlen, -1, "request signature does not verify: %s", gnutls_strerror(r));
        goto fail;
    }
    int pk = gnutls_x509_crq_get_pk_algorithm(crq, NULL);
    if (pk != GNUTLS_PK_EDDSA_ED25519 && pk != GNUTLS_PK_ECDSA) {
        errbuf_set(err, errlen, -1, "key type %s not allowed (Ed25519 or ECDSA P-256)",
                   pk > 0 ? gnutls_pk_algorithm_get_name((gnutls_pk_algorithm_t)pk) : "unknown");
        goto fail;
    }
    *out = crq;
    return 0;
fail:
    gnutls_x509_crq_deinit(crq);
    return -1;
}

int ls_ca_issue_node(struct ls_ca *ca, gnutls_x509_crq_t crq, const char *user, unsigned roles,
                     const nid_t *keep_id, long long validity_days, struct ls_issued *out,
                     char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    gnutls_pubkey_t pub = NULL;
    gnutls_x509_crt_t crt = NULL;
    int rc = -1, r;
    if (gnutls_pubkey_init(&pub) < 0 || gnutls_pubkey_import_x509_crq(pub, crq, 0) < 0) {
        errbuf_set(err, errlen, -1, "request's public key unusable");
        goto out;
    }
    if (keep_id)
        out->node_id = *keep_id;
    else if (nid_random(&out->node_id) != 0) {
        errbuf_set(err, errlen, -1, "no randomness for a Node-ID");
        goto out;
    }
    snprintf(out->uri, sizeof(out->uri), "sip:%s@%s", user, ca->overlay);
    time_t now = time(NULL);
    /* The subject names the URI, never the bare user: a CN like "login.example.org" would
     * let a generic TLS client (curl, a browser) take this node for that web server, since
     * host name checks fall back to the CN when a certificate has no DNS name. */
    struct cred_issue_params p = {
        .cn = out->uri,
        .uri = out->uri,
        .node_id = &out->node_id,
        .roles = roles,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 300, /* tolerate clocks a little behind ours */
        .not_after = now + (time_t)validity_days * 86400,
    };
    if ((r = cred_issue(pub, ca->key, ca->crt, &p, &crt)) < 0) {
        errbuf_set(err, errlen, -1, "cannot issue: %s", gnutls_strerror(r));
        goto out;
    }
    gnutls_datum_t pem = {NULL, 0};
    if ((r = cred_cert_export_pem(crt, &pem)) < 0) {
        errbuf_set(err, errlen, -1, "cannot export: %s", gnutls_strerror(r));
        goto out;
    }
    out->cert_pem = strndup((const char *)pem.data, pem.size);
    gnutls_free(pem.data);
    if (!out->cert_pem) {
        errbuf_set(err, errlen, -1, "out of memory");
        goto out;
    }
    out->roles = roles;
    out->not_after = p.not_after;
    random_serial_hex(crt, out->serial);
    rc = 0;
out:
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    return rc;
}

bool ls_ca_service_name_valid(const char *name)
{
    unsigned char ip[16];
    if (!name || !*name)
        return false;
    if (inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1)
        return true;
    /* A DNS name: labels of letters, digits and '-', 1-63 each, 253 in all. Nothing else
     * (no '/', "..", control character) can reach the file names made from it. */
    size_t len = 0, total = strlen(name);
    if (total > 253)
        return false;
    for (const char *p = name;; p++) {
        if (*p == '.' || *p == '\0') {
            if (len == 0 || len > 63 || p[-1] == '-' || *(p - len) == '-')
                return false;
            len = 0;
            if (*p == '\0')
                return true;
        } else if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                   (*p >= '0' && *p <= '9') || *p == '-') {
            len++;
        } else {
            return false;
        }
    }
}

int ls_ca_issue_service(struct ls_ca *ca, const char *const *hosts, const char *outdir,
                        long long validity_days, char *key_path, char *cert_path, size_t pathlen,
                        char *err, size_t errlen)
{
    char base[300];
    if (!hosts || !hosts[0])
        return errbuf_set(err, errlen, -1, "no service name");
    for (const char *const *h = hosts; *h; h++)
        if (!ls_ca_service_name_valid(*h))
            return errbuf_set(err, errlen, -1,
                              "service name \"%.80s\" is neither a DNS host name nor an IP "
                              "address",
                              *h);
    int r = fs_mkdir(outdir, 0700);
    if (r < 0)
        return errbuf_set(err, errlen, -1, "cannot create %s: %s", outdir, strerror(-r));
    snprintf(base, sizeof(base), "%s.key", hosts[0]);
    if (fs_join(key_path, pathlen, outdir, base))
        return errbuf_set(err, errlen, -1, "path too long");
    snprintf(base, sizeof(base), "%s.pem", hosts[0]);
    if (fs_join(cert_path, pathlen, outdir, base))
        return errbuf_set(err, errlen, -1, "path too long");
    time_t now = time(NULL);
    struct cred_issue_params p = {
        .cn = hosts[0],
        .hosts = hosts,
        .roles = ROLE_SERVICE,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 300,
        .not_after = now + (time_t)validity_days * 86400,
    };
    return issue_with_new_key(ca->key, ca->crt, &p, key_path, cert_path, NULL, err, errlen);
}

static int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

int ls_ca_crl(struct ls_ca *ca, const char *const *serials_hex, size_t n, time_t now,
              long long next_update_s, char **pem, char *err, size_t errlen)
{
    gnutls_x509_crl_t crl = NULL;
    gnutls_privkey_t signer = NULL;
    gnutls_datum_t out = {NULL, 0};
    unsigned char keyid[64];
    size_t keyid_len = sizeof(keyid);
    unsigned crit = 0;
    int r;
    *pem = NULL;
    if ((r = gnutls_x509_crl_init(&crl)) < 0 || (r = gnutls_x509_crl_set_version(crl, 2)) < 0 ||
        (r = gnutls_x509_crl_set_this_update(crl, now)) < 0 ||
        (r = gnutls_x509_crl_set_next_update(crl, now + (time_t)next_update_s)) < 0)
        goto fail;
    for (size_t i = 0; i < n; i++) {
        unsigned char serial[20];
        size_t len = strlen(serials_hex[i]);
        if (len == 0 || len > 40 || len % 2)
            continue; /* not one of ours (they are 32 digits): nothing to list */
        bool ok = true;
        for (size_t k = 0; k < len / 2; k++) {
            int hi = hex_digit(serials_hex[i][2 * k]), lo = hex_digit(serials_hex[i][2 * k + 1]);
            ok = ok && hi >= 0 && lo >= 0;
            serial[k] = (unsigned char)(hi << 4 | (lo & 15));
        }
        if (ok && (r = gnutls_x509_crl_set_crt_serial(crl, serial, len / 2, now)) < 0)
            goto fail;
    }
    /* The CRL number grows with time: a node can tell a newer list from an older one. */
    unsigned char number[8];
    for (int k = 0; k < 8; k++)
        number[k] = (unsigned char)((unsigned long long)now >> (56 - 8 * k));
    if ((r = gnutls_x509_crl_set_number(crl, number, sizeof(number))) < 0)
        goto fail;
    if (gnutls_x509_crt_get_subject_key_id(ca->crt, keyid, &keyid_len, &crit) >= 0 &&
        (r = gnutls_x509_crl_set_authority_key_id(crl, keyid, keyid_len)) < 0)
        goto fail;
    if ((r = gnutls_privkey_init(&signer)) < 0 ||
        (r = gnutls_privkey_import_x509(signer, ca->key, 0)) < 0 ||
        (r = gnutls_x509_crl_privkey_sign(crl, ca->crt, signer, GNUTLS_DIG_SHA256, 0)) < 0 ||
        (r = gnutls_x509_crl_export2(crl, GNUTLS_X509_FMT_PEM, &out)) < 0)
        goto fail;
    *pem = strndup((const char *)out.data, out.size);
    gnutls_free(out.data);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crl_deinit(crl);
    return *pem ? 0 : errbuf_set(err, errlen, -1, "out of memory");
fail:
    gnutls_free(out.data);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crl_deinit(crl);
    return errbuf_set(err, errlen, -1, "cannot make the revocation list: %s", gnutls_strerror(r));
}
