/*
 * The login server's state directory and certificate authority.
 *
 *   <dir>/ca.key      overlay CA private key (0600)
 *   <dir>/ca.pem      overlay CA certificate: the trust anchor of the overlay
 *   <dir>/server.key  this server's TLS key (0600)
 *   <dir>/server.pem  this server's TLS certificate, issued by the CA
 *   <dir>/users.db    the user store (userstore.h)
 *   <dir>/overlay.json the signed configuration document, as served
 *
 * Issuing follows one rule: a certificate carries only what the CA checked or
 * decided itself (the authenticated user's URI, a Node-ID it drew, the roles
 * the account allows); nothing a request asks for is copied.
 */
#ifndef P2P_LS_CA_H
#define P2P_LS_CA_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "cred.h"
#include "nodeid.h"

struct ls_ca {
    char *dir;
    char *overlay;
    gnutls_x509_privkey_t key;
    gnutls_x509_crt_t crt;
    char *ca_pem;
    char *pin; /* "sha256:<hex>" of the CA certificate */
    char *server_cert_pem;
    char *server_key_pem;
    char *envelope;     /* overlay.json: the signed document */
    long long sequence; /* of the published document */
};

/* A certificate the CA issued. */
struct ls_issued {
    char *cert_pem; /* malloc'd */
    nid_t node_id;
    unsigned roles;
    time_t not_after;
    char serial[41]; /* hex */
    char uri[300];
};

/*
 * Creates the state directory with a new CA and a server certificate for
 * `hosts` (host names and IP addresses clients use to reach the server;
 * NULL-terminated). Refuses a directory that already holds a CA. On success
 * *out is the opened CA with no document yet: publish one (ls_ca_publish).
 */
int ls_ca_create(const char *dir, const char *overlay, const char *const *hosts, struct ls_ca **out,
                 char *err, size_t errlen);
/* Loads an initialised state directory. */
int ls_ca_open(const char *dir, struct ls_ca **out, char *err, size_t errlen);
void ls_ca_free(struct ls_ca *ca);

/*
 * Parses and checks a certificate request (PEM PKCS#10): its signature
 * verifies (the requester holds the key) and the key is Ed25519 or ECDSA.
 * Returns 0 and the request in *out (gnutls_x509_crq_deinit), or -1 with the
 * reason in err.
 */
int ls_ca_check_csr(const char *pem, size_t len, gnutls_x509_crq_t *out, char *err, size_t errlen);

/*
 * Issues a node certificate for the key of a checked request: URI
 * sip:<user>@<overlay>, as the only subjectAltName and as the CN (never a bare
 * user name a TLS client could take for a host name), the Node-ID `keep_id` (renewal) or a fresh
 * random one, `roles`, serverAuth+clientAuth, `validity_days`. Nothing else of the request is used.
 * Returns 0, or -1 with err. out->cert_pem is the caller's to free.
 */
int ls_ca_issue_node(struct ls_ca *ca, gnutls_x509_crq_t crq, const char *user, unsigned roles,
                     const nid_t *keep_id, long long validity_days, struct ls_issued *out,
                     char *err, size_t errlen);

/* A DNS host name (letters, digits, '-' in dot-separated labels) or an IP address. */
bool ls_ca_service_name_valid(const char *name);

/*
 * Issues a service certificate (role "service", serverAuth+clientAuth) for the
 * host names/addresses in `hosts` (the first is the CN) with a fresh key, and
 * writes <outdir>/<hosts[0]>.key (0600) and .pem. Every name must pass
 * ls_ca_service_name_valid (so the files stay in outdir).
 */
int ls_ca_issue_service(struct ls_ca *ca, const char *const *hosts, const char *outdir,
                        long long validity_days, char *key_path, char *cert_path, size_t pathlen,
                        char *err, size_t errlen);

/*
 * A CRL signed by the CA listing `n` certificate serials (hex), with
 * thisUpdate `now` (also each entry's revocation date: the store keeps no
 * other) and nextUpdate now + next_update_s. *pem is malloc'd PEM.
 */
int ls_ca_crl(struct ls_ca *ca, const char *const *serials_hex, size_t n, time_t now,
              long long next_update_s, char **pem, char *err, size_t errlen);

/* Signs `document_text` and makes it the served overlay.json (atomically). */
int ls_ca_publish(struct ls_ca *ca, const char *document_text, long long sequence, char *err,
                  size_t errlen);

#endif
