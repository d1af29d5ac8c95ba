/*
 * The process's certificate revocation list (docs/protocol.md 1.6 and 2.6): the overlay CA's
 * X.509 CRL that the login server serves at /v1/crl, which the renewer (renewer.h) fetches and
 * keeps in the state directory, and which every TLS handshake (conn.c) and every record
 * verification (record.c) consults.
 *
 * One list per process, not per context: an overlay has exactly one CA, a process serves one
 * overlay, and the consumers (the transport, the record verifier, later the HTTPS server's
 * client-certificate check) are independent modules that would otherwise all need the list
 * passed down to them. crl_reset() returns the module to its first state for tests.
 *
 * A list is taken only when its signature verifies with the overlay CA (crl_set_ca()) and it is
 * not older than the one held: its CRL number (else its thisUpdate) is at least the current
 * one's, so an old list replayed by anyone (a stale file, an attacker on the path to the login
 * server cannot forge one, but could replay) never brings a revoked certificate back. A list
 * past its nextUpdate is still used: when the login server cannot be reached, the last good list
 * is better than none.
 *
 * Every change (a new list with other contents, a new CA, a reset) bumps a generation counter,
 * so that holders of earlier answers (open links, the record verifier's certificate cache) can
 * tell, with one integer compare, that they must ask again. Functions may be called from any
 * thread (a mutex guards the state; the generation is atomic).
 */
#ifndef P2P_CRL_H
#define P2P_CRL_H

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define CRL_SERIAL_MAX 32 /* bytes of a serial number we can match (RFC 5280: at most 20) */
#define CRL_MAX_BYTES  (16u * 1024u * 1024u) /* larger lists are refused */

enum crl_status {
    CRL_OK = 0,           /* taken: the list changed (the generation was bumped) */
    CRL_UNCHANGED = 1,    /* the same list as held (same number and entries): nothing changed */
    CRL_E_PARSE = -1,     /* not a PEM (or DER) X.509 CRL */
    CRL_E_SIGNATURE = -2, /* not signed by the overlay CA */
    CRL_E_OLDER = -3,     /* older than the list held (rollback) */
    CRL_E_NO_CA = -4,     /* no CA set yet */
    CRL_E_NOMEM = -5,
};

/*
 * What identifies a certificate for revocation: its serial number (leading zero bytes dropped)
 * and the SHA-256 of its issuer's DER name. Small enough to keep with every link.
 */
struct crl_ref {
    unsigned char serial[CRL_SERIAL_MAX];
    unsigned char serial_len; /* 0: no serial we could match (too long); never revoked here */
    unsigned char issuer[32];
};

/*
 * Sets the trust anchor lists must verify with (PEM; the first certificate). Setting the same
 * CA again keeps the list; another CA drops it (and bumps the generation). 0 or a negative
 * code with `err`.
 */
int crl_set_ca(const char *ca_pem, size_t len, char *err, size_t errlen);
/*
 * Offers a list (PEM or DER). CRL_OK when taken, CRL_UNCHANGED when it is the list held, else a
 * negative code with `err` (one line, for logs). `now` is only used for the warning about a
 * list past its nextUpdate.
 */
int crl_update(const void *data, size_t len, time_t now, char *err, size_t errlen);
/* Forgets the CA and the list (tests; a process that changes overlays). Bumps the generation. */
void crl_reset(void);

/* Changes with every change of the list (starts at 1, never 0, never goes back). */
uint64_t crl_generation(void);

/* Fills `out` from a certificate. 0 or a negative GnuTLS code. */
int crl_ref_of(gnutls_x509_crt_t crt, struct crl_ref *out);
/* Whether the list held now revokes that certificate (false when there is no list). */
bool crl_ref_revoked(const struct crl_ref *ref);
/* The same for a certificate; false when it cannot be read. */
bool crl_crt_revoked(gnutls_x509_crt_t crt);
/* The serial as hex, for logs ("-" when none); returns buf. */
const char *crl_ref_serial_hex(const struct crl_ref *ref, char *buf, size_t len);

/* What the list held says about itself (for logs and status). */
struct crl_info {
    bool present;
    size_t entries;
    time_t this_update, next_update; /* next_update is -1 when the list has none */
    char number[2 * 20 + 1];         /* the CRL number in hex; "" when it has none */
};
void crl_get_info(struct crl_info *out);

#endif
