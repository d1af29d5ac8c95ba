/*
 * Signed resource records (docs/protocol.md section 4.3): what the overlay
 * stores under a 160-bit key. A record is signed by its owner's node key;
 * the owner's certificate travels inside it, so the responsible super node,
 * every replica and every reader can check it without asking anyone.
 *
 * The envelope (a JSON object, as it goes on the wire and into storage):
 *
 *   {"signed": "<JSON text>", "cert": "<base64 DER>", "sig": "<base64>"}
 *
 * The signature covers the exact UTF-8 bytes of the "signed" string, so no
 * JSON canonicalisation is involved. The signed text is an object:
 *
 *   {"overlay":"example.org","key":"<40 hex>","type":"user location",
 *    "name":"alice@example.org","owner":"sip:alice@example.org",
 *    "seq":"1763750000000000","expires":1763836400,"no_update":false,
 *    "value":{...}}
 *
 * or, for a removal statement (stored as a tombstone, never returned by get):
 *
 *   {..., "seq":"...","expires":...,"remove":true}   (no "value", no "no_update")
 *
 * Pure code: no I/O. Verification keeps a bounded cache of certificates it
 * already checked, so a busy node parses and chain-checks each owner's
 * certificate once, not once per record.
 */
#ifndef P2P_RECORD_H
#define P2P_RECORD_H

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "nodeid.h"
#include "overlay_doc.h"

#define REC_TYPE_MAX  64  /* bytes of a resource type */
#define REC_NAME_MAX  255 /* bytes of a resource name */
#define REC_OWNER_MAX 255 /* bytes of an owner URI */

/* Resource types with an access policy of their own (seed 004 section 8). */
#define REC_TYPE_USER_LOCATION  "user location"
#define REC_TYPE_PROXY_LOCATION "proxy location"

/* Error codes (negative); rec_strcode() gives the wire code of docs/protocol.md 4.5. */
enum rec_status {
    REC_OK = 0,
    REC_E_MALFORMED = -1, /* "malformed-record": envelope or signed text not as specified */
    REC_E_TOO_LARGE = -2, /* "too-large": encoded envelope above the maximum */
    REC_E_CERT = -3,      /* "bad-certificate": unparsable, not from the overlay CA, not valid
                             now, revoked (crl.h), or without a URI */
    REC_E_SIGNATURE = -4, /* "bad-signature": the signature does not verify */
    REC_E_OWNER = -5,     /* "bad-owner": "owner" differs from the certificate's URI */
    REC_E_KEY = -6,       /* "bad-key": key != SHA-1(type "|" name) */
    REC_E_FORBIDDEN = -7, /* "forbidden": the type's policy refuses this owner for this name */
    REC_E_OVERLAY = -8,   /* "wrong-overlay": signed for another overlay */
    REC_E_EXPIRED = -9,   /* "expired": expires <= now */
    REC_E_LIFETIME = -10, /* "lifetime-too-long": expires > now + max lifetime */
    REC_E_NOMEM = -11,    /* "internal" */
    REC_E_MISMATCH = -12, /* "not-asked": not the record a lookup asked for (rec_answers) */
};
const char *rec_strcode(int status);

/* A parsed record. Owned strings/objects are released by rec_free(). */
struct record {
    json_t *envelope; /* {"signed","cert","sig"}: the reference is owned */
    size_t size;      /* bytes of the envelope in compact JSON encoding */
    nid_t key;
    char type[REC_TYPE_MAX + 1];
    char name[REC_NAME_MAX + 1];
    char owner[REC_OWNER_MAX + 1]; /* the signed "owner" (== the certificate's URI once verified) */
    uint64_t seq;                  /* freshness counter: higher wins */
    int64_t expires;               /* unix seconds */
    bool no_update;
    bool removal;       /* a removal statement (tombstone) */
    json_t *value;      /* borrowed from the parsed signed text (NULL for removals) */
    json_t *signed_obj; /* the parsed signed text (owned) */
};

/*
 * Parses an envelope's structure (not its signature): every member present
 * with its type; key is 40 hex digits and equals SHA-1(type "|" name); seq a
 * decimal string of an unsigned 64-bit number; type 1..REC_TYPE_MAX bytes
 * without '|' (so that a key names exactly one (type, name): "a|b" + "|" +
 * "c" and "a" + "|" + "b|c" would hash alike), name 1..REC_NAME_MAX bytes,
 * UTF-8 without control characters. `max_bytes`
 * (0 = no limit) bounds the compact encoding of the envelope (REC_E_TOO_LARGE).
 * The envelope's reference is taken (json_incref) on success. On failure
 * `err` gets one line saying which member is wrong.
 */
int rec_parse(json_t *envelope, size_t max_bytes, struct record *out, char *err, size_t errlen);
void rec_free(struct record *r);
/* A deep copy (new references), for keeping a record beyond the caller's. 0 or REC_E_NOMEM. */
int rec_copy(const struct record *in, struct record *out);

/*
 * A fresh freshness counter: microseconds since 1970 (protocol.md 4.4), so a
 * node needs no saved counter across restarts.
 */
uint64_t rec_seq_now(void);

/* What to sign. */
struct rec_params {
    const char *overlay;
    const char *type;
    const char *name;
    uint64_t seq;
    int64_t expires;
    bool no_update;
    bool removal;
    json_t *value; /* reference not taken; ignored for removals; required otherwise */
};

/*
 * Builds and signs a record with the owner's key and certificate (the owner
 * is the certificate's URI). Returns REC_OK and a parsed record in *out, or a
 * negative code with `err`.
 */
int rec_sign(const struct rec_params *p, gnutls_x509_privkey_t key, gnutls_x509_crt_t cert,
             struct record *out, char *err, size_t errlen);

/*
 * Checks records against the overlay CA. The verifier caches certificates
 * already checked (keyed by a hash of their DER, at most `cache_size`
 * entries, each re-checked once it expires).
 */
struct rec_verifier;
/* `ca` is copied (the caller keeps its own). NULL on allocation failure. */
struct rec_verifier *rec_verifier_new(gnutls_x509_crt_t ca, const char *overlay, size_t cache_size);
void rec_verifier_free(struct rec_verifier *v);
/* The overlay document's "sip_proxies" (copied): which super node certificates serve which SIP
 * domain as P2P registrar and proxy (docs/sip.md). 0, or -1 when out of memory. */
int rec_verifier_set_proxies(struct rec_verifier *v, const struct overlay_sip_proxy *p, size_t n);

/*
 * Full check of a parsed record at time `now`: the overlay matches; the
 * certificate parses, chains to the overlay CA, is not revoked by the
 * process's revocation list (crl.h; read again whenever it changed, cached
 * certificate or not), is valid now and has a URI equal to "owner"; the
 * signature verifies over the signed text; expires > now (except for removal
 * statements, which may be checked at any time before their own expiry too:
 * same rule) and expires <= now + max_lifetime_s (0 = no cap); and the type's
 * policy holds:
 *   "user location":  name == the owner's URI without its "sip:"/"sips:"
 *                      scheme (key = SHA-1("user location|alice@example.org")
 *                      may be written only by sip:alice@example.org); or the
 *                      name's domain is not the overlay's and the owner is a
 *                      P2P proxy of that domain (rec_verifier_set_proxies);
 *   "proxy location": the owner is a P2P proxy of the domain `name`;
 *   any other type:    any owner.
 * REC_OK, or a negative code with `err` (one line, for logs and the wire).
 */
int rec_verify(struct rec_verifier *v, const struct record *r, time_t now, int64_t max_lifetime_s,
               char *err, size_t errlen);

/*
 * Whether a record answers a lookup: its key is `key`, the key asked for, and
 * its type and name are `type` and `name` (NULL for a lookup by key alone;
 * since types hold no '|', the key then names the type and name just as
 * well). Given both, `key` must also be their hash. Call it on every record
 * a lookup returns, besides rec_verify(): a valid signature says who wrote a
 * record, not that it is the one asked for, and a super node on the path
 * could answer a lookup for bob with its owner's own record. Together with
 * rec_verify()'s access policy, the answer to "user location|bob@ov" is then
 * a record of sip:bob@ov (or of a P2P proxy of bob's domain when that domain
 * is not the overlay's). REC_OK, or REC_E_MISMATCH with `err` naming the key
 * asked for and the key, owner, type and name found.
 */
int rec_answers(const struct record *r, const nid_t *key, const char *type, const char *name,
                char *err, size_t errlen);

/* Cache statistics, for status and tests. */
void rec_verifier_stats(const struct rec_verifier *v, size_t *entries, uint64_t *hits,
                        uint64_t *misses);

/* The owner name the "user location" policy compares with: "sip:alice@x" -> "alice@x". */
const char *rec_uri_aor(const char *uri);

#endif
