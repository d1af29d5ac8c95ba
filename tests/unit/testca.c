/*
 * Throw-away CA for the unit tests (see testca.h). Uses cred.c's own issuing
 * function, so the certificates the tests see are shaped exactly like the
 * ones the login server hands out.
 */
#include "testca.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int testca_init(struct testca *ca)
{
    memset(ca, 0, sizeof(*ca));
    const char *tmp = getenv("TMPDIR");
    snprintf(ca->dir, sizeof(ca->dir), "%s/p2ptestca.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(ca->dir)) {
        ca->dir[0] = '\0';
        return -1;
    }
    snprintf(ca->ca_file, sizeof(ca->ca_file), "%s/ca.pem", ca->dir);

    gnutls_pubkey_t pub = NULL;
    if (cred_keygen(&ca->key) < 0 || cred_pubkey(ca->key, &pub) < 0)
        goto fail;
    time_t now = time(NULL);
    struct cred_issue_params p = {
        .cn = "p2psip test CA",
        .is_ca = true,
        .not_before = now - 3600,
        .not_after = now + 86400,
    };
    if (cred_issue(pub, ca->key, NULL, &p, &ca->crt) < 0)
        goto fail;
    if (cred_cert_save(ca->crt, ca->ca_file) < 0)
        goto fail;
    gnutls_pubkey_deinit(pub);
    return 0;
fail:
    gnutls_pubkey_deinit(pub);
    testca_cleanup(ca);
    return -1;
}

int testca_issue_params(struct testca *ca, const char *name, const struct cred_issue_params *p,
                        struct testca_cert *out)
{
    gnutls_x509_privkey_t key = NULL;
    gnutls_pubkey_t pub = NULL;
    gnutls_x509_crt_t crt = NULL;
    int ret = -1;

    memset(out, 0, sizeof(*out));
    snprintf(out->cert_file, sizeof(out->cert_file), "%s/%s.crt.pem", ca->dir, name);
    snprintf(out->key_file, sizeof(out->key_file), "%s/%s.key.pem", ca->dir, name);
    snprintf(out->uri, sizeof(out->uri), "%s", p->uri ? p->uri : "");
    if (p->node_id)
        out->node_id = *p->node_id;
    out->roles = p->roles;

    if (cred_keygen(&key) < 0 || cred_pubkey(key, &pub) < 0)
        goto out;
    if (cred_issue(pub, ca->key, ca->crt, p, &crt) < 0)
        goto out;
    if (cred_cert_save(crt, out->cert_file) < 0 || cred_key_save(key, out->key_file) < 0)
        goto out;
    ret = 0;
out:
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
    return ret;
}

int testca_issue(struct testca *ca, const char *name, enum testca_kind kind,
                 struct testca_cert *out)
{
    char uri[128];
    nid_t id;
    time_t now = time(NULL);
    snprintf(uri, sizeof(uri), "sip:%s@test.example", name);
    if (nid_random(&id) < 0)
        return -1;
    struct cred_issue_params p = {
        .cn = name,
        .uri = uri,
        .node_id = &id,
        .roles = ROLE_NODE | ROLE_SUPERNODE,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 60,
        .not_after = now + 3600,
    };
    switch (kind) {
    case TESTCA_GOOD:
        break;
    case TESTCA_EXPIRED:
        p.not_before = now - 7200;
        p.not_after = now - 3600;
        break;
    case TESTCA_NOT_YET_VALID:
        p.not_before = now + 86400;
        p.not_after = now + 2 * 86400;
        break;
    case TESTCA_NO_CLIENT_AUTH:
        p.client_auth = false;
        break;
    case TESTCA_NO_SERVER_AUTH:
        p.server_auth = false;
        break;
    case TESTCA_NO_ROLES:
        p.roles = 0;
        p.node_id = NULL;
        break;
    }
    return testca_issue_params(ca, name, &p, out);
}

void testca_cleanup(struct testca *ca)
{
    if (!ca)
        return;
    gnutls_x509_crt_deinit(ca->crt);
    gnutls_x509_privkey_deinit(ca->key);
    ca->crt = NULL;
    ca->key = NULL;
    if (ca->dir[0]) {
        DIR *d = opendir(ca->dir);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d))) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                    continue;
                char path[600];
                snprintf(path, sizeof(path), "%s/%s", ca->dir, e->d_name);
                unlink(path);
            }
            closedir(d);
        }
        rmdir(ca->dir);
        ca->dir[0] = '\0';
    }
}
