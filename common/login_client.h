/*
 * A node's side of enrollment with the login server (docs/protocol.md 2):
 * fetch and authenticate the overlay document with the CA pin, enroll with a
 * user name and password for a first certificate, renew it later with TLS
 * client authentication, and keep the resulting credentials in the node's
 * state directory.
 *
 * A certificate the server returns is not taken on trust: before it is
 * handed to the caller it must chain to the overlay CA and allow both TLS
 * key purposes, carry our public key, state the expected SIP URI and carry a
 * Node-ID (on renewal: the same Node-ID as before). A server that gets any of
 * this wrong is refused with a message saying which check failed.
 *
 * Requests run on an http_client (the caller's loop). Each start function
 * either returns 0, and then calls its callback exactly once from the loop
 * (also with an error "cancelled" when the http_client is freed first), or
 * returns a negative errno-style code with a one-line reason in `err` and
 * never calls it.
 */
#ifndef P2P_LOGIN_CLIENT_H
#define P2P_LOGIN_CLIENT_H

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "cred.h"
#include "http_client.h"
#include "overlay_doc.h"

#define LOGIN_TIMEOUT_MS   30000L
#define LOGIN_MAX_RESPONSE (64u * 1024u)

struct login_overlay_result {
    const char *error; /* NULL on success; else one line */
    long http_status;  /* 0 when no HTTP response arrived */
    /*
     * The verified document on success, NULL otherwise. It is freed when the
     * callback returns; to keep it, move it out:
     *   mine = *res->doc; memset(res->doc, 0, sizeof(*res->doc));
     */
    struct overlay_doc *doc;
    const char *envelope; /* on success: the body as received (what overlay.json stores) */
    size_t envelope_len;
};
typedef void (*login_overlay_cb)(struct login_overlay_result *res, void *ud);

struct login_cert_result {
    /*
     * NULL on success. Else one line, e.g. "enroll https://h/v1/enroll: 401
     * unauthorized: wrong user name or password", "... 429 rate-limited: ...
     * (retry after 30 s)", "...: TLS: server certificate verify failed: ..."
     * or "...: certificate refused: its public key is not ours".
     */
    const char *error;
    long http_status;     /* 0 when no HTTP response arrived */
    const char *code;     /* the server's "error" code ("unauthorized", ...), or NULL */
    double retry_after_s; /* from Retry-After (429); 0 if none */
    /* On success only (NULL otherwise); valid during the callback: */
    const char *cert_pem;    /* the new certificate, PEM, as the server sent it */
    const char *ca_pem;      /* the overlay CA (the contents of ca_file) */
    gnutls_x509_crt_t cert;  /* cert_pem, parsed and checked */
    struct peer_identity id; /* what the certificate states (URI, Node-ID, roles, validity) */
};
typedef void (*login_cert_cb)(const struct login_cert_result *res, void *ud);

/*
 * GET <base_url>/v1/overlay without verifying the server (there is no CA
 * yet), then authenticates the document with overlay_doc_verify(pin,
 * min_sequence). The callback gets the verified document or the reason.
 */
int login_fetch_overlay(struct http_client *client, const char *base_url, const char *pin,
                        int64_t min_sequence, login_overlay_cb cb, void *ud, char *err,
                        size_t errlen);

/*
 * POST <base_url>/v1/enroll {"user","password","csr"[,"device"]} with a CSR
 * for `key` (used during this call only). `device` (may be NULL: the server
 * then goes by the key) names this device of the account: enrolling again
 * under the same name gives the same Node-ID (protocol.md 2.3). The server is
 * verified against ca_file (the CA of the verified overlay document) and must
 * hold the service role, never skipped, so the password only goes to the real
 * server. The certificate must state "sip:<user>@<overlay>".
 */
int login_enroll(struct http_client *client, const char *base_url, const char *ca_file,
                 const char *overlay, const char *user, const char *password, const char *device,
                 gnutls_x509_privkey_t key, login_cert_cb cb, void *ud, char *err, size_t errlen);

/*
 * POST <base_url>/v1/renew {"csr"} for `new_key` (used during this call only),
 * authenticating with the current cert_file/key_file. The new certificate
 * must keep the old one's URI and Node-ID.
 */
int login_renew(struct http_client *client, const char *base_url, const char *ca_file,
                const char *cert_file, const char *key_file, gnutls_x509_privkey_t new_key,
                login_cert_cb cb, void *ud, char *err, size_t errlen);

/* True once two thirds of the certificate's validity period have passed (or it expired). */
bool login_renew_due(gnutls_x509_crt_t cert, time_t now);

/* Credential storage in a node's state directory. */

#define NODE_CREDS_KEY     "key.pem"
#define NODE_CREDS_CERT    "cert.pem"
#define NODE_CREDS_CA      "ca.pem"
#define NODE_CREDS_OVERLAY "overlay.json"
#define NODE_CREDS_PIN     "pin"

/*
 * Writes key.pem, cert.pem, ca.pem, overlay.json (the envelope as received)
 * and pin into state_dir (created 0700, parents too, if missing). Each file is
 * mode 0600 and replaced atomically (temporary file, fsync, rename); cert.pem
 * is written last, so an interrupted save shows on load as a key/certificate
 * mismatch rather than as a silently wrong identity. The set is checked
 * first (the certificate matches the key, ca.pem and the envelope match the
 * pin) and nothing is written when it is inconsistent. 0 or negative, with
 * `err`.
 */
int node_creds_save(const char *state_dir, gnutls_x509_privkey_t key, const char *cert_pem,
                    const char *ca_pem, const char *overlay_envelope, const char *pin, char *err,
                    size_t errlen);

/* Credentials loaded back; everything owned by the struct (node_creds_free()). */
struct node_creds {
    gnutls_x509_privkey_t key;
    gnutls_x509_crt_t cert;
    struct peer_identity id; /* what cert states */
    char *cert_pem;
    char *ca_pem;
    char *overlay_envelope;
    char pin[OVERLAY_PIN_LEN];
    struct overlay_doc doc;               /* overlay.json, verified again with the pin */
    char *key_file, *cert_file, *ca_file; /* paths in state_dir, for tls_config and renewal */
};

/*
 * Reads the files node_creds_save() writes and checks them: overlay.json
 * verifies with the stored pin (min_sequence 0), ca.pem matches the pin, the
 * certificate matches the key and was issued by that CA. An expired
 * certificate still loads (login_renew_due() says it is due; the caller
 * decides). 0 or negative, with `err` naming the file.
 */
int node_creds_load(const char *state_dir, struct node_creds *out, char *err, size_t errlen);
/* Frees what *c owns and zeroes it. NULL is fine. */
void node_creds_free(struct node_creds *c);

#endif
