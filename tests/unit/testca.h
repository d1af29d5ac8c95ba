/*
 * Test support: a throw-away certificate authority in a temporary directory.
 * It issues node certificates good and bad (another CA, expired, missing a
 * key purpose, without roles) as PEM files that tls_config can point at, so
 * the transport tests run real TLS with real verification. testca_cleanup()
 * removes the directory and everything in it.
 */
#ifndef P2P_TESTCA_H
#define P2P_TESTCA_H

#include <stdbool.h>
#include <time.h>

#include "cred.h"
#include "nodeid.h"

struct testca {
    char dir[256];     /* the temporary directory (owned: removed by cleanup) */
    char ca_file[320]; /* <dir>/ca.pem: the CA certificate, the trust anchor */
    gnutls_x509_privkey_t key;
    gnutls_x509_crt_t crt;
};

/* What kind of leaf certificate to issue. */
enum testca_kind {
    TESTCA_GOOD = 0,       /* node + supernode roles, serverAuth + clientAuth, valid now */
    TESTCA_EXPIRED,        /* like GOOD but expired an hour ago */
    TESTCA_NOT_YET_VALID,  /* like GOOD but valid only from tomorrow */
    TESTCA_NO_CLIENT_AUTH, /* EKU serverAuth only */
    TESTCA_NO_SERVER_AUTH, /* EKU clientAuth only */
    TESTCA_NO_ROLES,       /* no roles extension and no Node-ID */
};

struct testca_cert {
    char cert_file[320];
    char key_file[320];
    char uri[128];
    nid_t node_id;
    unsigned roles;
};

/* Creates a temporary directory and a self-signed CA in it. 0 or -1. */
int testca_init(struct testca *ca);
/*
 * Issues a leaf certificate for a fresh Ed25519 key and writes
 * <dir>/<name>.crt.pem and <dir>/<name>.key.pem. The URI is "sip:<name>@test.example"
 * and the Node-ID is random. 0 or -1.
 */
int testca_issue(struct testca *ca, const char *name, enum testca_kind kind,
                 struct testca_cert *out);
/* Issues with explicit parameters (not_before/not_after as given). 0 or -1. */
int testca_issue_params(struct testca *ca, const char *name, const struct cred_issue_params *p,
                        struct testca_cert *out);
/* Frees the CA and removes its directory. Safe on a zeroed or failed struct. */
void testca_cleanup(struct testca *ca);

#endif
