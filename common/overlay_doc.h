/*
 * The overlay configuration document (docs/protocol.md 2.1, 2.2): what a
 * newcomer learns from the login server before it trusts anything, signed by
 * the overlay CA and authenticated by the CA pin the operator publishes.
 * Pure functions, no I/O: the login server builds and signs documents with
 * overlay_doc_build() + overlay_doc_sign(), nodes check them with
 * overlay_doc_verify(), and tests make them the same way the server does.
 *
 * The envelope is {"document": "<JSON text>", "signature": "<base64>"}; the
 * signature covers the exact UTF-8 bytes of the document string, so no JSON
 * canonicalisation is involved.
 */
#ifndef P2P_OVERLAY_DOC_H
#define P2P_OVERLAY_DOC_H

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stddef.h>
#include <stdint.h>

/* "sha256:" + 64 lowercase hex digits + NUL */
#define OVERLAY_PIN_LEN 72

#define OVERLAY_DOC_FORMAT 1

/* overlay_doc_verify() results besides 0; `err` always says more. */
#define OVERLAY_DOC_ERR_MALFORMED (-1) /* envelope or document not as specified */
#define OVERLAY_DOC_ERR_PIN       (-2) /* the CA certificate does not match the pin (or bad pin) */
#define OVERLAY_DOC_ERR_SIGNATURE (-3) /* the signature does not verify with that CA */
#define OVERLAY_DOC_ERR_CA        (-4) /* the CA certificate is not a CA, or not valid now */
#define OVERLAY_DOC_ERR_ROLLBACK  (-5) /* sequence older than one already seen */
#define OVERLAY_DOC_ERR_FORMAT    (-6) /* a document format this code does not speak */
#define OVERLAY_DOC_ERR_NOMEM     (-7)

struct overlay_promotion {
    int64_t min_uptime_s;
    int64_t min_cpus;
    int64_t min_free_mem_mb;
    int64_t min_bandwidth_kbps;
    int64_t sn_target_load; /* attached ONs per SN above which more SNs are wanted */
};

/* A super node certificate that serves a SIP domain as its P2P registrar and proxy (seed 004
 * sections 4.2, 4.3; docs/sip.md): it may write that domain's "proxy location" record and, when
 * the domain is not the overlay's own, the "user location" records of the domain's users. */
struct overlay_sip_proxy {
    char *domain; /* "pbx.example.org" */
    char *uri;    /* the certificate's URI, "sip:sn1@example.org" */
};

/*
 * One document. Strings and arrays are malloc'd and owned by the struct
 * (overlay_doc_free() releases them).
 */
struct overlay_doc {
    int64_t format;    /* OVERLAY_DOC_FORMAT */
    char *overlay;     /* overlay name: 1-255 bytes, no spaces or control characters */
    int64_t sequence;  /* >= 0, increases with every change */
    char *issued_at;   /* RFC 3339 UTC, "2026-11-21T20:40:00Z" */
    char *ca_cert_pem; /* the overlay CA certificate, PEM */
    char **login_urls; /* https:// URLs */
    size_t n_login_urls;
    char **bootstrap_urls; /* https:// URLs */
    size_t n_bootstrap_urls;
    int64_t replication_factor;
    int64_t max_record_bytes;
    int64_t max_record_lifetime_s;
    int64_t keepalive_s;
    int64_t stabilize_s;
    int64_t successor_list;
    struct overlay_promotion promotion;
    char *lan_discovery; /* "239.255.42.99:7077" */
    int64_t cert_validity_days;
    struct overlay_sip_proxy *sip_proxies; /* optional member "sip_proxies" */
    size_t n_sip_proxies;

    /* Filled by overlay_doc_verify() only (ignored by overlay_doc_build()): */
    char *document_text;       /* the exact signed document bytes, NUL-terminated */
    gnutls_x509_crt_t ca_crt;  /* ca_cert_pem, parsed */
    char pin[OVERLAY_PIN_LEN]; /* the pin it matched */
};

/*
 * Fills the tunable members with the defaults the login server uses (format
 * 1, replication 3, ...). Leaves the strings and arrays alone.
 */
void overlay_doc_defaults(struct overlay_doc *d);

/*
 * The document JSON text for `in`: compact, members in the order of the table
 * in protocol.md 2.2, so equal input gives equal bytes. Returns a malloc'd
 * string (free()), or NULL when a required string is missing or on allocation
 * failure. Does not validate values: overlay_doc_verify() does.
 */
char *overlay_doc_build(const struct overlay_doc *in);

/*
 * Signs `document_text` with the CA key and writes the envelope
 * {"document":...,"signature":...} (compact JSON, malloc'd, free()) to
 * *envelope_out. Returns 0 or a negative GnuTLS code (GNUTLS_E_INVALID_REQUEST
 * when the text is not UTF-8).
 */
int overlay_doc_sign(gnutls_x509_privkey_t ca_key, const char *document_text, char **envelope_out);

/*
 * Authenticates and parses an envelope of `len` bytes: the document's CA
 * certificate must match `pin` ("sha256:<64 hex>", hex in either case), the
 * signature must verify with that certificate, the certificate must be a CA
 * (basicConstraints CA:TRUE) valid now, format must be 1, sequence must be
 * >= min_sequence, and every member must be present with its type and a sane
 * value (unknown members are ignored). On success fills *out (free it with
 * overlay_doc_free()) and returns 0. On failure *out is zeroed, `err` gets one
 * line ("overlay document: ...") and an OVERLAY_DOC_ERR_* code is returned.
 */
int overlay_doc_verify(const char *envelope, size_t len, const char *pin, int64_t min_sequence,
                       struct overlay_doc *out, char *err, size_t errlen);

/* The pin of a CA certificate: "sha256:" + hex of SHA-256 over its DER. 0 or GnuTLS code. */
int overlay_doc_pin(gnutls_x509_crt_t ca, char out[OVERLAY_PIN_LEN]);

/* Frees what the members own and zeroes *d (the struct itself is the caller's). NULL is fine. */
void overlay_doc_free(struct overlay_doc *d);

/* Strict standard base64 (padding required, no whitespace), shared with the tests. */
char *overlay_b64_encode(const unsigned char *data, size_t len);
/* Returns a malloc'd buffer and its length, or NULL when `s` is not strict base64. */
unsigned char *overlay_b64_decode(const char *s, size_t slen, size_t *outlen);
/* The length `s` decodes to when it is strict base64 (as overlay_b64_decode() accepts), else 0. */
size_t overlay_b64_valid(const char *s, size_t slen);

#endif
