/*
 * Credentials: key pairs, certificate requests, certificates and signatures
 * (GnuTLS). Node keys are Ed25519, saved as PKCS#8 PEM. A node's certificate
 * carries who it is: its SIP URI (URI subjectAltName), its Node-ID and its
 * roles (two non-critical extensions of ours, see docs/protocol.md). The
 * issuing half (cred_issue) is the CA's: the login server uses it, and tests
 * use it to make throw-away CAs.
 *
 * Every function returns 0 or a negative GnuTLS error code (gnutls_strerror()
 * explains it); file problems are GNUTLS_E_FILE_ERROR and are logged with the
 * path and errno.
 */
#ifndef P2P_CRED_H
#define P2P_CRED_H

#include <gnutls/gnutls.h>
#include <gnutls/abstract.h>
#include <gnutls/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "nodeid.h"

/*
 * Our OID arc for the Node-ID and roles extensions. Provisional: it sits
 * under IANA's enterprise number 32473, which RFC 5612 reserves and assigns
 * to no real enterprise, so it cannot collide with anyone's extensions. It
 * will move to a registered enterprise arc (with a protocol version bump).
 * The registration-free 2.25.<UUID> arc was tried and rejected: its 128-bit
 * arc does not fit libtasn1's 64-bit arcs and GnuTLS silently writes a
 * different OID (docs/protocol.md, section 1.6).
 */
#define P2P_OID_ARC     "1.3.6.1.4.1.32473.2026"
#define P2P_OID_NODE_ID P2P_OID_ARC ".1" /* OCTET STRING, 20 bytes */
#define P2P_OID_ROLES   P2P_OID_ARC ".2" /* OCTET STRING, 1 byte: ROLE_* bits */

/* Roles a certificate grants. */
#define ROLE_NODE      0x01u /* may attach to the overlay as an ordinary node */
#define ROLE_SUPERNODE 0x02u /* may join the ring as a super node */
#define ROLE_SERVICE   0x04u /* a service host (bootstrap server, login server) */

/* The identity a verified certificate states. */
struct peer_identity {
    char uri[256]; /* URI subjectAltName, e.g. "sip:alice@example.org"; "" if none */
    char dns[256]; /* first DNS subjectAltName (service hosts); "" if none */
    char cn[128];  /* subject common name; "" if none */
    bool has_node_id;
    nid_t node_id;
    unsigned roles; /* ROLE_* bits; 0 when the extension is absent */
    time_t not_before, not_after;
};

/* Renders roles as "node,supernode" (or "none") into buf; returns buf. */
const char *cred_roles_str(unsigned roles, char *buf, size_t len);
/*
 * Renders an identity for logs and people:
 * "sip:alice@example.org (node-id 3f2a..., roles node,supernode)"; returns buf.
 */
const char *cred_identity_str(const struct peer_identity *id, char *buf, size_t len);

/* Key pairs */
int cred_keygen(gnutls_x509_privkey_t *key); /* Ed25519: node keys */
/*
 * ECDSA P-256: the CA and service hosts (login, bootstrap). Browsers accept
 * neither Ed25519 server keys nor Ed25519 certificate signatures, and the
 * bootstrap status page is for people.
 */
int cred_keygen_p256(gnutls_x509_privkey_t *key);
int cred_key_save(gnutls_x509_privkey_t key, const char *path); /* PKCS#8 PEM, mode 0600 */
int cred_key_load(gnutls_x509_privkey_t *key, const char *path);
/* The public half of `key`, in a new *pub the caller frees (gnutls_pubkey_deinit). */
int cred_pubkey(gnutls_x509_privkey_t key, gnutls_pubkey_t *pub);

/* Certificate signing request (PEM) for `key`, with the given common name. */
int cred_csr_make(gnutls_x509_privkey_t key, const char *common_name, gnutls_datum_t *pem);

/* Certificates (PEM). cred_cert_load reads the first certificate of the file. */
int cred_cert_load(gnutls_x509_crt_t *crt, const char *path);
int cred_cert_save(gnutls_x509_crt_t crt, const char *path);
int cred_cert_export_pem(gnutls_x509_crt_t crt, gnutls_datum_t *pem);

/* Extracts the identity stated by a certificate (does not verify it). */
int cred_identity(gnutls_x509_crt_t crt, struct peer_identity *out);

/* Signatures over bytes with a node key; verification with its certificate. */
int cred_sign(gnutls_x509_privkey_t key, const void *data, size_t len, gnutls_datum_t *sig);
int cred_verify(gnutls_x509_crt_t crt, const void *data, size_t len, const gnutls_datum_t *sig);
/* 0 when `crt` certifies the public half of `key`; GNUTLS_E_CERTIFICATE_KEY_MISMATCH when not. */
int cred_key_matches(gnutls_x509_privkey_t key, gnutls_x509_crt_t crt);

/* What a CA puts into a certificate it issues: only these, nothing else. */
struct cred_issue_params {
    const char *cn;  /* subject common name, required */
    const char *uri; /* URI subjectAltName, or NULL */
    const char *dns; /* DNS subjectAltName, or NULL */
    /* More subjectAltNames, NULL-terminated: IP addresses become iPAddress
     * entries, anything else a dNSName. NULL for none. */
    const char *const *hosts;
    const nid_t *node_id; /* Node-ID extension, or NULL */
    unsigned roles;       /* roles extension; omitted when 0 */
    bool server_auth;     /* EKU id-kp-serverAuth */
    bool client_auth;     /* EKU id-kp-clientAuth */
    bool is_ca;           /* basicConstraints CA:TRUE, keyCertSign */
    time_t not_before;
    time_t not_after;
};

/*
 * Issues a certificate for `subject` (a public key) signed by ca_key/ca_crt;
 * with ca_crt == NULL it is self-signed by ca_key (then `subject` must be
 * ca_key's public key). The serial number is random.
 */
int cred_issue(gnutls_pubkey_t subject, gnutls_x509_privkey_t ca_key, gnutls_x509_crt_t ca_crt,
               const struct cred_issue_params *params, gnutls_x509_crt_t *out);

#endif
