/*
 * Signed resource records (record.h): parsing the envelope and the signed
 * text, signing with a node key, and checking a record against the overlay
 * CA with a bounded cache of certificates already checked. The cache is what
 * makes a busy super node cheap: once an owner's certificate is known (by the
 * exact base64 text records carry), a record costs a short keyed hash of that
 * text and one signature verification (libsodium for Ed25519). Pure code:
 * no I/O, no clock (the caller passes `now`). The one outside state it reads
 * is the process's revocation list (crl.h): each cached certificate remembers
 * the list generation it was last checked against and is checked again when
 * the list changed, so a certificate revoked after it was cached stops
 * verifying at once.
 */
#include "record.h"

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <sodium.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <strings.h>

#include "errbuf.h"
#include "cred.h"
#include "crl.h"
#include "overlay_doc.h"

const char *rec_strcode(int status)
{
    switch (status) {
    case REC_OK:
        return "ok";
    case REC_E_MALFORMED:
        return "malformed-record";
    case REC_E_TOO_LARGE:
        return "too-large";
    case REC_E_CERT:
        return "bad-certificate";
    case REC_E_SIGNATURE:
        return "bad-signature";
    case REC_E_OWNER:
        return "bad-owner";
    case REC_E_KEY:
        return "bad-key";
    case REC_E_FORBIDDEN:
        return "forbidden";
    case REC_E_OVERLAY:
        return "wrong-overlay";
    case REC_E_EXPIRED:
        return "expired";
    case REC_E_LIFETIME:
        return "lifetime-too-long";
    case REC_E_MISMATCH:
        return "not-asked";
    default:
        return "internal";
    }
}

/*
 * Peer-supplied text goes into error lines that end up in logs and on the
 * wire: quote it with anything but printable ASCII escaped, and cut it short.
 */
static const char *quote(const char *s, size_t n, char *buf, size_t len)
{
    size_t o = 0;
    if (len < 8)
        return "\"...\"";
    buf[o++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (o + 6 >= len) {
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (ch >= 0x20 && ch < 0x7f && ch != '"' && ch != '\\') {
            buf[o++] = (char)ch;
        } else {
            if (o + 4 + 6 >= len) {
                memcpy(buf + o, "...", 3);
                o += 3;
                break;
            }
            o += (size_t)snprintf(buf + o, len - o, "\\x%02x", ch);
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

/* Parsing */

/* Text members: 1..max bytes, no C0/C1 control characters nor DEL (jansson checked UTF-8). */
static bool text_ok(const char *s, size_t n, size_t max)
{
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7f)
            return false;
        if (ch == 0xc2 && i + 1 < n && (unsigned char)s[i + 1] >= 0x80 &&
            (unsigned char)s[i + 1] <= 0x9f)
            return false;
    }
    return true;
}

/* "0", or a decimal number without leading zeros that fits 64 bits. */
static bool parse_seq(const char *s, size_t n, uint64_t *out)
{
    if (n == 0 || n > 20 || (n > 1 && s[0] == '0'))
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

static bool lower_hex40(const char *s, size_t n)
{
    if (n != NID_HEX_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

static bool b64_ok(json_t *s)
{
    return overlay_b64_valid(json_string_value(s), json_string_length(s)) > 0;
}

/* A text member of the signed object into a fixed buffer. */
static int get_text(json_t *obj, const char *member, size_t max, char *out, char *err,
                    size_t errlen)
{
    json_t *v = json_object_get(obj, member);
    if (!v)
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed member \"%s\" is missing",
                          member);
    if (!json_is_string(v))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: signed member \"%s\" is not a string", member);
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (!text_ok(s, n, max))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: signed member \"%s\" must be 1..%zu bytes without control "
                          "characters (has %zu)",
                          member, max, n);
    if (out) {
        memcpy(out, s, n);
        out[n] = '\0';
    }
    return REC_OK;
}

static const char *const signed_members[] = {"overlay", "key",     "type",      "name",  "owner",
                                             "seq",     "expires", "no_update", "value", "remove"};

static int parse_signed(json_t *so, struct record *out, char *err, size_t errlen)
{
    if (!json_is_object(so))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed text is not a JSON object");

    const char *member;
    json_t *v;
    json_object_foreach(so, member, v)
    {
        bool known = false;
        for (size_t i = 0; i < sizeof(signed_members) / sizeof(signed_members[0]); i++)
            if (!strcmp(member, signed_members[i]))
                known = true;
        if (!known) {
            char q[64];
            return errbuf_set(err, errlen, REC_E_MALFORMED, "record: unknown signed member %s",
                              quote(member, strlen(member), q, sizeof(q)));
        }
    }

    int r;
    if ((r = get_text(so, "overlay", 255, NULL, err, errlen)) < 0 ||
        (r = get_text(so, "type", REC_TYPE_MAX, out->type, err, errlen)) < 0 ||
        (r = get_text(so, "name", REC_NAME_MAX, out->name, err, errlen)) < 0 ||
        (r = get_text(so, "owner", REC_OWNER_MAX, out->owner, err, errlen)) < 0)
        return r;
    if (strchr(out->type, '|'))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: a type may not contain '|'");

    v = json_object_get(so, "key");
    if (!v || !json_is_string(v))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed member \"key\" is %s",
                          v ? "not a string" : "missing");
    if (!lower_hex40(json_string_value(v), json_string_length(v)) ||
        nid_from_hex(&out->key, json_string_value(v)) < 0)
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: signed member \"key\" is not 40 lowercase hex digits");

    v = json_object_get(so, "seq");
    if (!v || !json_is_string(v))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: signed member \"seq\" is %s (a decimal string)",
                          v ? "not a string" : "missing");
    if (!parse_seq(json_string_value(v), json_string_length(v), &out->seq)) {
        char q[48];
        return errbuf_set(
            err, errlen, REC_E_MALFORMED,
            "record: \"seq\" %s is not an unsigned 64-bit decimal without leading zeros",
            quote(json_string_value(v), json_string_length(v), q, sizeof(q)));
    }

    v = json_object_get(so, "expires");
    if (!v || !json_is_integer(v))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed member \"expires\" is %s",
                          v ? "not an integer" : "missing");
    out->expires = (int64_t)json_integer_value(v);

    json_t *rm = json_object_get(so, "remove");
    json_t *nu = json_object_get(so, "no_update");
    json_t *val = json_object_get(so, "value");
    if (rm) {
        if (!json_is_true(rm))
            return errbuf_set(err, errlen, REC_E_MALFORMED,
                              "record: signed member \"remove\" must be true when present");
        if (nu || val)
            return errbuf_set(err, errlen, REC_E_MALFORMED,
                              "record: a removal statement carries no \"%s\"",
                              val ? "value" : "no_update");
        out->removal = true;
        out->no_update = false;
        out->value = NULL;
    } else {
        if (!nu || !json_is_boolean(nu))
            return errbuf_set(err, errlen, REC_E_MALFORMED,
                              "record: signed member \"no_update\" is %s",
                              nu ? "not a boolean" : "missing");
        if (!val || json_is_null(val))
            return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed member \"value\" is %s",
                              val ? "null" : "missing");
        out->removal = false;
        out->no_update = json_is_true(nu);
        out->value = val;
    }

    return REC_OK;
}

static int check_key(const struct record *out, char *err, size_t errlen)
{
    nid_t want;
    if (nid_key(&want, out->type, out->name) < 0)
        return errbuf_set(err, errlen, REC_E_NOMEM, "record: cannot hash the key");
    if (!nid_eq(&want, &out->key)) {
        char hk[NID_HEX_LEN + 1], hw[NID_HEX_LEN + 1], qt[80], qn[80];
        return errbuf_set(err, errlen, REC_E_KEY,
                          "record: key %s is not SHA-1(type|name) = %s for type %s, name %s",
                          nid_to_hex(&out->key, hk), nid_to_hex(&want, hw),
                          quote(out->type, strlen(out->type), qt, sizeof(qt)),
                          quote(out->name, strlen(out->name), qn, sizeof(qn)));
    }
    return REC_OK;
}

/* How many bytes jansson's compact encoding of string `s` takes: the quotes, and escapes for
 * '"', '\\' and control characters (\b \f \n \r \t in two bytes, the others as \u00XX). */
static size_t json_string_encoded_len(const json_t *s)
{
    const unsigned char *p = (const unsigned char *)json_string_value(s);
    size_t len = json_string_length(s), n = len + 2;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = p[i];
        if (ch == '"' || ch == '\\' || ch == '\b' || ch == '\f' || ch == '\n' || ch == '\r' ||
            ch == '\t')
            n += 1;
        else if (ch < 0x20)
            n += 5;
    }
    return n;
}

/* The compact encoding of an envelope whose members are m[0..2] ("signed", "cert", "sig"):
 * {"signed":S,"cert":C,"sig":G}. */
static size_t envelope_size(json_t *const m[3])
{
    return sizeof("{\"signed\":,\"cert\":,\"sig\":}") - 1 + json_string_encoded_len(m[0]) +
           json_string_encoded_len(m[1]) + json_string_encoded_len(m[2]);
}

static int adopt_signed(json_t *envelope, json_t *const m[3], json_t *so, size_t max_bytes,
                        struct record *out, char *err, size_t errlen);

int rec_parse(json_t *envelope, size_t max_bytes, struct record *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (err && errlen)
        err[0] = '\0';
    if (!json_is_object(envelope))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: the envelope is not a JSON object");

    static const char *const members[] = {"signed", "cert", "sig"};
    json_t *m[3];
    for (size_t i = 0; i < 3; i++) {
        m[i] = json_object_get(envelope, members[i]);
        if (!m[i])
            return errbuf_set(err, errlen, REC_E_MALFORMED,
                              "record: envelope member \"%s\" is missing", members[i]);
        if (!json_is_string(m[i]))
            return errbuf_set(err, errlen, REC_E_MALFORMED,
                              "record: envelope member \"%s\" is not a string", members[i]);
    }
    if (json_object_size(envelope) != 3) {
        const char *k;
        json_t *v;
        json_object_foreach(envelope, k, v)
        {
            if (strcmp(k, "signed") && strcmp(k, "cert") && strcmp(k, "sig")) {
                char q[64];
                return errbuf_set(err, errlen, REC_E_MALFORMED,
                                  "record: unknown envelope member %s",
                                  quote(k, strlen(k), q, sizeof(q)));
            }
        }
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: the envelope has extra members");
    }

    /* The order of the checks is docs/protocol.md 4.4's: malformed, too large, bad key. */
    if (!b64_ok(m[1]))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: envelope member \"cert\" is not strict base64");
    if (!b64_ok(m[2]))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: envelope member \"sig\" is not strict base64");

    json_error_t je;
    json_t *so =
        json_loadb(json_string_value(m[0]), json_string_length(m[0]), JSON_REJECT_DUPLICATES, &je);
    if (!so) {
        char q[120];
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: signed text is not JSON: %s",
                          quote(je.text, strlen(je.text), q, sizeof(q)));
    }
    return adopt_signed(envelope, m, so, max_bytes, out, err, errlen);
}

/* The checks of rec_parse on the signed object `so` (whose reference it takes) of `envelope`
 * (members m). */
static int adopt_signed(json_t *envelope, json_t *const m[3], json_t *so, size_t max_bytes,
                        struct record *out, char *err, size_t errlen)
{
    int r = parse_signed(so, out, err, errlen);
    if (r == REC_OK) {
        /* The size of the compact encoding, counted without making it. */
        size_t size = envelope_size(m);
        if (max_bytes && size > max_bytes)
            r = errbuf_set(err, errlen, REC_E_TOO_LARGE,
                           "record: %zu bytes, above the limit of %zu", size, max_bytes);
        else
            out->size = size;
    }
    if (r == REC_OK)
        r = check_key(out, err, errlen);
    if (r < 0) {
        json_decref(so);
        memset(out, 0, sizeof(*out));
        return r;
    }
    out->signed_obj = so;
    out->envelope = json_incref(envelope);
    return REC_OK;
}

void rec_free(struct record *r)
{
    if (!r)
        return;
    json_decref(r->envelope);
    json_decref(r->signed_obj);
    memset(r, 0, sizeof(*r));
}

int rec_copy(const struct record *in, struct record *out)
{
    *out = *in;
    out->envelope = NULL;
    out->signed_obj = NULL;
    out->value = NULL;
    if (in->envelope && !(out->envelope = json_deep_copy(in->envelope)))
        goto fail;
    if (in->signed_obj) {
        if (!(out->signed_obj = json_deep_copy(in->signed_obj)))
            goto fail;
        if (in->value && !(out->value = json_object_get(out->signed_obj, "value")))
            goto fail;
    }
    return REC_OK;
fail:
    rec_free(out);
    return REC_E_NOMEM;
}

/* Signing */

/*
 * What signing with one (key, certificate) pair needs and costs the same
 * every time: the certificate's identity and base64 text, the check that
 * the key is the certificate's, and for Ed25519 libsodium's expanded secret
 * key (deriving it is a scalar multiplication). Kept for the pair used last
 * (a node signs with one pair), recognised by the key and the certificate's
 * DER; the daemons are single-threaded.
 */
static struct {
    gnutls_x509_privkey_t key;
    unsigned char *der;
    size_t der_len;
    struct peer_identity id;
    char *cert_b64;
    bool ed25519;
    unsigned char sk[crypto_sign_SECRETKEYBYTES];
    unsigned char pk[crypto_sign_PUBLICKEYBYTES];
} signer;

/*
 * The Ed25519 signatures made here lately, with a hash of the text each one signs. A super node
 * that stores a record it signed itself (the SIP front end's registrations, when it is one of
 * the key's replicas) need not check that signature with a scalar multiplication: it is right
 * by construction. Found by the signature and the text's hash together, so a signature of ours
 * under another text is verified as usual. Direct-mapped: a newer signature takes an older
 * one's slot, and the older is then simply verified.
 */
#define OWN_SIGS 4096 /* a power of two */
struct own_sig {
    unsigned char sig[crypto_sign_BYTES];
    unsigned char th[16];
    uint32_t gen; /* the signer's generation: entries of an earlier key do not count */
};
static struct own_sig *own_sigs;
static uint32_t own_gen = 1; /* bumped when the signer changes (a tool signing for many
                              * identities changes it at every record: no table wipe) */

static size_t own_sig_slot(const unsigned char *sig)
{
    return ((size_t)sig[0] | (size_t)sig[1] << 8 | (size_t)sig[2] << 16) & (OWN_SIGS - 1);
}

static void own_sig_note(const unsigned char *sig, const char *text, size_t len)
{
    if (!own_sigs && !(own_sigs = calloc(OWN_SIGS, sizeof(*own_sigs))))
        return;
    struct own_sig *o = &own_sigs[own_sig_slot(sig)];
    memcpy(o->sig, sig, crypto_sign_BYTES);
    crypto_generichash(o->th, sizeof(o->th), (const unsigned char *)text, len, NULL, 0);
    o->gen = own_gen;
}

static bool own_sig_known(const unsigned char *pub, const unsigned char *sig, size_t sig_len,
                          const char *text, size_t len)
{
    if (!own_sigs || !signer.ed25519 || sig_len != crypto_sign_BYTES ||
        sodium_memcmp(pub, signer.pk, crypto_sign_PUBLICKEYBYTES) != 0)
        return false;
    const struct own_sig *o = &own_sigs[own_sig_slot(sig)];
    unsigned char th[16];
    crypto_generichash(th, sizeof(th), (const unsigned char *)text, len, NULL, 0);
    return o->gen == own_gen && sodium_memcmp(o->sig, sig, crypto_sign_BYTES) == 0 &&
           sodium_memcmp(o->th, th, sizeof(th)) == 0;
}

static void signer_clear(void)
{
    free(signer.der);
    free(signer.cert_b64);
    sodium_memzero(signer.sk, sizeof(signer.sk));
    memset(&signer, 0, sizeof(signer));
    if (++own_gen == 0) { /* they were another key's; after 2^32 keys, start clean */
        own_gen = 1;
        if (own_sigs)
            memset(own_sigs, 0, OWN_SIGS * sizeof(*own_sigs));
    }
}

/* Fills the cache for (key, cert) unless it holds them already. REC_OK or an error code. */
static int signer_for(gnutls_x509_privkey_t key, gnutls_x509_crt_t cert, char *err, size_t errlen)
{
    gnutls_datum_t der = {NULL, 0};
    int gr = gnutls_x509_crt_export2(cert, GNUTLS_X509_FMT_DER, &der);
    if (gr < 0)
        return errbuf_set(err, errlen, REC_E_CERT, "record: cannot export the certificate: %s",
                          gnutls_strerror(gr));
    if (signer.key == key && signer.der && signer.der_len == der.size &&
        !memcmp(signer.der, der.data, der.size)) {
        gnutls_free(der.data);
        return REC_OK;
    }
    signer_clear();
    int ret = REC_OK;
    if ((gr = cred_identity(cert, &signer.id)) < 0) {
        ret = errbuf_set(err, errlen, REC_E_CERT, "record: cannot read the certificate: %s",
                         gnutls_strerror(gr));
    } else if (!signer.id.uri[0]) {
        ret = errbuf_set(err, errlen, REC_E_CERT, "record: the certificate has no URI");
    } else if (strlen(signer.id.uri) > REC_OWNER_MAX) {
        ret = errbuf_set(err, errlen, REC_E_CERT, "record: the certificate's URI is too long");
    } else if (cred_key_matches(key, cert) < 0) {
        /* A key that does not match the certificate would make records nobody accepts. */
        ret = errbuf_set(err, errlen, REC_E_SIGNATURE,
                         "record: the signing key does not match the certificate of %s",
                         signer.id.uri);
    } else if (!(signer.cert_b64 = overlay_b64_encode(der.data, der.size)) ||
               !(signer.der = malloc(der.size))) {
        ret = errbuf_set(err, errlen, REC_E_NOMEM, "record: out of memory while signing");
    }
    if (ret == REC_OK && gnutls_x509_privkey_get_pk_algorithm(key) == GNUTLS_PK_EDDSA_ED25519) {
        gnutls_ecc_curve_t curve;
        gnutls_datum_t x = {NULL, 0}, k = {NULL, 0};
        if (gnutls_x509_privkey_export_ecc_raw(key, &curve, &x, NULL, &k) >= 0 &&
            k.size == crypto_sign_SEEDBYTES &&
            crypto_sign_seed_keypair(signer.pk, signer.sk, k.data) == 0)
            signer.ed25519 = true; /* else GnuTLS signs (cred_sign) */
        if (k.data) {
            sodium_memzero(k.data, k.size);
            gnutls_free(k.data);
        }
        gnutls_free(x.data);
    }
    if (ret == REC_OK) {
        memcpy(signer.der, der.data, der.size);
        signer.der_len = der.size;
        signer.key = key;
    } else {
        signer_clear();
    }
    gnutls_free(der.data);
    return ret;
}

int rec_sign(const struct rec_params *p, gnutls_x509_privkey_t key, gnutls_x509_crt_t cert,
             struct record *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (!p->overlay || !p->type || !p->name)
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: overlay, type and name are required");
    if (!text_ok(p->type, strlen(p->type), REC_TYPE_MAX))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: type must be 1..%d bytes without control characters",
                          REC_TYPE_MAX);
    if (!text_ok(p->name, strlen(p->name), REC_NAME_MAX))
        return errbuf_set(err, errlen, REC_E_MALFORMED,
                          "record: name must be 1..%d bytes without control characters",
                          REC_NAME_MAX);
    if (strchr(p->type, '|'))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: a type may not contain '|'");
    if (!p->removal && (!p->value || json_is_null(p->value)))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "record: a record needs a non-null value");

    int gr, sr = signer_for(key, cert, err, errlen);
    if (sr != REC_OK)
        return sr;
    const struct peer_identity *id = &signer.id;

    nid_t k;
    char khex[NID_HEX_LEN + 1], seq[24];
    if (nid_key(&k, p->type, p->name) < 0)
        return errbuf_set(err, errlen, REC_E_NOMEM, "record: cannot hash the key");
    nid_to_hex(&k, khex);
    snprintf(seq, sizeof(seq), "%" PRIu64, p->seq);

    int ret = REC_E_NOMEM;
    json_t *so = NULL, *env = NULL;
    char *text = NULL, *sig_b64 = NULL;
    gnutls_datum_t sig = {NULL, 0};
    unsigned char edsig[crypto_sign_BYTES];

    so = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:I}", "overlay", p->overlay, "key", khex,
                   "type", p->type, "name", p->name, "owner", id->uri, "seq", seq, "expires",
                   (json_int_t)p->expires);
    if (!so) {
        ret =
            errbuf_set(err, errlen, REC_E_MALFORMED, "record: overlay, type or name is not UTF-8");
        goto out;
    }
    if (p->removal) {
        if (json_object_set_new(so, "remove", json_true()) < 0)
            goto nomem;
    } else if (json_object_set_new(so, "no_update", json_boolean(p->no_update)) < 0 ||
               json_object_set_new(so, "value", json_deep_copy(p->value)) < 0) {
        goto nomem;
    }
    if (!(text = json_dumps(so, JSON_COMPACT)))
        goto nomem;

    size_t tlen = strlen(text);
    if (signer.ed25519) {
        crypto_sign_detached(edsig, NULL, (const unsigned char *)text, tlen, signer.sk);
        own_sig_note(edsig, text, tlen);
        sig_b64 = overlay_b64_encode(edsig, sizeof(edsig));
    } else if ((gr = cred_sign(key, text, tlen, &sig)) < 0) {
        ret = errbuf_set(err, errlen, REC_E_SIGNATURE, "record: cannot sign: %s",
                         gnutls_strerror(gr));
        goto out;
    } else {
        sig_b64 = overlay_b64_encode(sig.data, sig.size);
    }
    if (!sig_b64)
        goto nomem;
    env = json_pack("{s:s, s:s, s:s}", "signed", text, "cert", signer.cert_b64, "sig", sig_b64);
    if (!env)
        goto nomem;
    /* The record is what rec_parse would make of env, without parsing back the text just
     * written: `so` is that text's object, and it now belongs to the record. */
    json_t *m[3] = {json_object_get(env, "signed"), json_object_get(env, "cert"),
                    json_object_get(env, "sig")};
    ret = adopt_signed(env, m, so, 0, out, err, errlen);
    so = NULL;
    goto out;
nomem:
    ret = errbuf_set(err, errlen, REC_E_NOMEM, "record: out of memory while signing");
out:
    json_decref(env);
    json_decref(so);
    free(text);
    free(sig_b64);
    gnutls_free(sig.data);
    return ret;
}

/* The verifier and its certificate cache */

/*
 * One certificate that chained to the CA. The cache is a hash table of these
 * (chained through `hnext`) plus a doubly linked list in order of last use,
 * so lookup, insertion and eviction of the least recently used are O(1).
 */
struct vcert {
    uint64_t h; /* keyed hash of b64 */
    char *b64;  /* the certificate as records carry it: the cache is keyed by this text */
    size_t b64_len;
    gnutls_pubkey_t pub;
    gnutls_sign_algorithm_t sa;
    bool ed25519; /* then ed_pub is the raw key, and libsodium verifies */
    unsigned char ed_pub[crypto_sign_PUBLICKEYBYTES];
    char uri[256];
    unsigned roles;               /* ROLE_* of the certificate */
    time_t not_before, not_after; /* the leaf's window narrowed by the CA's */
    struct crl_ref crl_ref;       /* serial and issuer, for the revocation list */
    uint64_t crl_gen;             /* the list generation `revoked` was read at */
    bool revoked;
    struct vcert *hnext;
    struct vcert *lru_prev, *lru_next; /* lru_prev toward the most recent */
};

struct rec_verifier {
    gnutls_x509_crt_t ca;
    time_t ca_not_before, ca_not_after;
    char *overlay;
    size_t cache_size, entries;
    struct vcert **buckets;
    size_t nbuckets;                               /* a power of two */
    unsigned char hkey[crypto_shorthash_KEYBYTES]; /* random: bucket choice is not predictable */
    struct vcert *lru_head, *lru_tail;             /* head = most recently used */
    uint64_t hits, misses;
    struct overlay_sip_proxy *proxies; /* the overlay document's "sip_proxies", copied */
    size_t n_proxies;
};

static void free_proxies(struct rec_verifier *v)
{
    for (size_t i = 0; i < v->n_proxies; i++) {
        free(v->proxies[i].domain);
        free(v->proxies[i].uri);
    }
    free(v->proxies);
    v->proxies = NULL;
    v->n_proxies = 0;
}

int rec_verifier_set_proxies(struct rec_verifier *v, const struct overlay_sip_proxy *p, size_t n)
{
    free_proxies(v);
    if (n == 0)
        return 0;
    if (!(v->proxies = calloc(n, sizeof(*v->proxies))))
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (!(v->proxies[i].domain = strdup(p[i].domain)) ||
            !(v->proxies[i].uri = strdup(p[i].uri))) {
            free(v->proxies[i].domain);
            v->n_proxies = i;
            free_proxies(v);
            return -1;
        }
        v->n_proxies = i + 1;
    }
    return 0;
}

/* Whether the certificate `c` is a P2P proxy of `domain` (the document says so, and it has the
 * super node role). */
static bool is_domain_proxy(const struct rec_verifier *v, const struct vcert *c, const char *domain)
{
    if (!(c->roles & ROLE_SUPERNODE))
        return false;
    for (size_t i = 0; i < v->n_proxies; i++)
        if (!strcasecmp(v->proxies[i].domain, domain) && !strcmp(v->proxies[i].uri, c->uri))
            return true;
    return false;
}

static void vcert_free(struct vcert *c)
{
    if (c) {
        gnutls_pubkey_deinit(c->pub);
        free(c->b64);
        free(c);
    }
}

struct rec_verifier *rec_verifier_new(gnutls_x509_crt_t ca, const char *overlay, size_t cache_size)
{
    struct rec_verifier *v = calloc(1, sizeof(*v));
    gnutls_datum_t der = {NULL, 0};
    if (!v || !ca || !overlay)
        goto fail;
    if (!(v->overlay = strdup(overlay)))
        goto fail;
    if (sodium_init() < 0)
        goto fail;
    randombytes_buf(v->hkey, sizeof(v->hkey));
    if (gnutls_x509_crt_export2(ca, GNUTLS_X509_FMT_DER, &der) < 0 ||
        gnutls_x509_crt_init(&v->ca) < 0 ||
        gnutls_x509_crt_import(v->ca, &der, GNUTLS_X509_FMT_DER) < 0)
        goto fail;
    v->ca_not_before = gnutls_x509_crt_get_activation_time(v->ca);
    v->ca_not_after = gnutls_x509_crt_get_expiration_time(v->ca);
    v->cache_size = cache_size;
    /* About one entry per bucket when full; the table never grows. */
    v->nbuckets = 16;
    while (v->nbuckets < cache_size && v->nbuckets < ((size_t)1 << 20))
        v->nbuckets <<= 1;
    if (!(v->buckets = calloc(v->nbuckets, sizeof(*v->buckets))))
        goto fail;
    gnutls_free(der.data);
    return v;
fail:
    gnutls_free(der.data);
    rec_verifier_free(v);
    return NULL;
}

void rec_verifier_free(struct rec_verifier *v)
{
    if (!v)
        return;
    for (struct vcert *c = v->lru_head, *next; c; c = next) {
        next = c->lru_next;
        vcert_free(c);
    }
    free(v->buckets);
    free_proxies(v);
    if (v->ca)
        gnutls_x509_crt_deinit(v->ca);
    free(v->overlay);
    free(v);
}

void rec_verifier_stats(const struct rec_verifier *v, size_t *entries, uint64_t *hits,
                        uint64_t *misses)
{
    if (entries)
        *entries = v ? v->entries : 0;
    if (hits)
        *hits = v ? v->hits : 0;
    if (misses)
        *misses = v ? v->misses : 0;
}

static size_t bucket_of(const struct rec_verifier *v, uint64_t h)
{
    return (size_t)(h & (v->nbuckets - 1));
}

static uint64_t text_hash(const struct rec_verifier *v, const char *s, size_t len)
{
    unsigned char out[crypto_shorthash_BYTES];
    uint64_t h;
    crypto_shorthash(out, (const unsigned char *)s, len, v->hkey);
    memcpy(&h, out, sizeof(h));
    return h;
}

static void lru_unlink(struct rec_verifier *v, struct vcert *c)
{
    if (c->lru_prev)
        c->lru_prev->lru_next = c->lru_next;
    else
        v->lru_head = c->lru_next;
    if (c->lru_next)
        c->lru_next->lru_prev = c->lru_prev;
    else
        v->lru_tail = c->lru_prev;
    c->lru_prev = c->lru_next = NULL;
}

static void lru_push_front(struct rec_verifier *v, struct vcert *c)
{
    c->lru_prev = NULL;
    c->lru_next = v->lru_head;
    if (v->lru_head)
        v->lru_head->lru_prev = c;
    v->lru_head = c;
    if (!v->lru_tail)
        v->lru_tail = c;
}

static struct vcert *cache_lookup(struct rec_verifier *v, uint64_t h, const char *b64, size_t len)
{
    for (struct vcert *c = v->buckets[bucket_of(v, h)]; c; c = c->hnext) {
        if (c->h == h && c->b64_len == len && !memcmp(c->b64, b64, len)) {
            if (v->lru_head != c) {
                lru_unlink(v, c);
                lru_push_front(v, c);
            }
            return c;
        }
    }
    return NULL;
}

static void cache_remove(struct rec_verifier *v, struct vcert *c)
{
    struct vcert **pp = &v->buckets[bucket_of(v, c->h)];
    while (*pp && *pp != c)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = c->hnext;
    lru_unlink(v, c);
    v->entries--;
}

/* Takes c into the cache, or frees it when there is no cache. */
static void cache_insert(struct rec_verifier *v, struct vcert *c)
{
    if (v->cache_size == 0) {
        vcert_free(c);
        return;
    }
    while (v->entries >= v->cache_size && v->lru_tail) {
        struct vcert *old = v->lru_tail;
        cache_remove(v, old);
        vcert_free(old);
    }
    size_t b = bucket_of(v, c->h);
    c->hnext = v->buckets[b];
    v->buckets[b] = c;
    lru_push_front(v, c);
    v->entries++;
}

static gnutls_sign_algorithm_t sign_algo_of(gnutls_pubkey_t pub)
{
    int pk = gnutls_pubkey_get_pk_algorithm(pub, NULL);
    if (pk < 0)
        return GNUTLS_SIGN_UNKNOWN;
    switch (pk) {
    case GNUTLS_PK_EDDSA_ED25519:
        return GNUTLS_SIGN_EDDSA_ED25519;
    case GNUTLS_PK_EDDSA_ED448:
        return GNUTLS_SIGN_EDDSA_ED448;
    default: /* what cred_sign() uses for everything else */
        return gnutls_pk_to_sign((gnutls_pk_algorithm_t)pk, GNUTLS_DIG_SHA256);
    }
}

/*
 * Parses and chain-checks a certificate (times excepted: the caller checks
 * them against its `now`). Returns a new entry, or NULL with `err` filled and
 * *code set.
 */
static struct vcert *check_cert(struct rec_verifier *v, const gnutls_datum_t *der, const char *what,
                                int *code, char *err, size_t errlen)
{
    gnutls_x509_crt_t crt = NULL;
    struct vcert *c = calloc(1, sizeof(*c));
    unsigned status = 0;
    int gr;
    *code = REC_E_CERT;
    if (!c) {
        *code = errbuf_set(err, errlen, REC_E_NOMEM, "%s: out of memory", what);
        goto fail;
    }
    if ((gr = gnutls_x509_crt_init(&crt)) < 0) {
        *code = errbuf_set(err, errlen, REC_E_NOMEM, "%s: %s", what, gnutls_strerror(gr));
        goto fail;
    }
    if ((gr = gnutls_x509_crt_import(crt, der, GNUTLS_X509_FMT_DER)) < 0) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate does not parse: %s", what,
                   gnutls_strerror(gr));
        goto fail;
    }
    gr = gnutls_x509_crt_verify(
        crt, &v->ca, 1,
        GNUTLS_VERIFY_DISABLE_TIME_CHECKS | GNUTLS_VERIFY_DISABLE_TRUSTED_TIME_CHECKS, &status);
    if (gr < 0 || status != 0) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate is not issued by the overlay CA",
                   what);
        goto fail;
    }
    struct peer_identity id;
    if ((gr = cred_identity(crt, &id)) < 0) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate's identity does not parse: %s",
                   what, gnutls_strerror(gr));
        goto fail;
    }
    if (!id.uri[0]) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate has no URI", what);
        goto fail;
    }
    memcpy(c->uri, id.uri, sizeof(c->uri));
    c->roles = id.roles;
    c->not_before = gnutls_x509_crt_get_activation_time(crt);
    c->not_after = gnutls_x509_crt_get_expiration_time(crt);
    if (c->not_before == (time_t)-1 || c->not_after == (time_t)-1) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate's validity does not parse", what);
        goto fail;
    }
    if ((gr = crl_ref_of(crt, &c->crl_ref)) < 0) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate's serial does not parse: %s", what,
                   gnutls_strerror(gr));
        goto fail;
    }
    c->crl_gen = crl_generation();
    c->revoked = crl_ref_revoked(&c->crl_ref);
    if (c->not_before < v->ca_not_before)
        c->not_before = v->ca_not_before;
    if (c->not_after > v->ca_not_after)
        c->not_after = v->ca_not_after;
    if ((gr = gnutls_pubkey_init(&c->pub)) < 0) {
        *code = errbuf_set(err, errlen, REC_E_NOMEM, "%s: %s", what, gnutls_strerror(gr));
        goto fail;
    }
    if ((gr = gnutls_pubkey_import_x509(c->pub, crt, 0)) < 0) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate's key does not parse: %s", what,
                   gnutls_strerror(gr));
        goto fail;
    }
    if ((c->sa = sign_algo_of(c->pub)) == GNUTLS_SIGN_UNKNOWN) {
        errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate's key type cannot sign records",
                   what);
        goto fail;
    }
    if (c->sa == GNUTLS_SIGN_EDDSA_ED25519) {
        gnutls_ecc_curve_t curve;
        gnutls_datum_t x = {NULL, 0};
        if (gnutls_pubkey_export_ecc_raw2(c->pub, &curve, &x, NULL, 0) >= 0 &&
            curve == GNUTLS_ECC_CURVE_ED25519 && x.size == sizeof(c->ed_pub)) {
            memcpy(c->ed_pub, x.data, sizeof(c->ed_pub));
            c->ed25519 = true;
        }
        gnutls_free(x.data);
    }
    gnutls_x509_crt_deinit(crt);
    return c;
fail:
    if (crt)
        gnutls_x509_crt_deinit(crt);
    vcert_free(c);
    return NULL;
}

const char *rec_uri_aor(const char *uri)
{
    if (!uri)
        return "";
    if (!strncasecmp(uri, "sip:", 4))
        return uri + 4;
    if (!strncasecmp(uri, "sips:", 5))
        return uri + 5;
    return uri;
}

/* The host of a SIP URI: after the '@' (or the whole address without one), without port or
 * parameters; IPv6 references keep their brackets. Returns false when it does not fit. */
static bool uri_domain(const char *uri, char *out, size_t len)
{
    const char *a = rec_uri_aor(uri);
    const char *at = strchr(a, '@');
    const char *h = at ? at + 1 : a;
    size_t n;
    if (*h == '[') {
        const char *rb = strchr(h, ']');
        if (!rb)
            return false;
        n = (size_t)(rb - h) + 1;
    } else {
        n = strcspn(h, ":;?>");
    }
    if (n == 0 || n >= len)
        return false;
    memcpy(out, h, n);
    out[n] = '\0';
    return true;
}

int rec_verify(struct rec_verifier *v, const struct record *r, time_t now, int64_t max_lifetime_s,
               char *err, size_t errlen)
{
    char khex[NID_HEX_LEN + 1], what[64], q[80];
    nid_to_hex(&r->key, khex);
    snprintf(what, sizeof(what), "record for key %.8s...", khex);
    if (err && errlen)
        err[0] = '\0';

    json_t *signed_str = r->envelope ? json_object_get(r->envelope, "signed") : NULL;
    json_t *cert_str = r->envelope ? json_object_get(r->envelope, "cert") : NULL;
    json_t *sig_str = r->envelope ? json_object_get(r->envelope, "sig") : NULL;
    json_t *ov = r->signed_obj ? json_object_get(r->signed_obj, "overlay") : NULL;
    if (!json_is_string(signed_str) || !json_is_string(cert_str) || !json_is_string(sig_str) ||
        !json_is_string(ov))
        return errbuf_set(err, errlen, REC_E_MALFORMED, "%s: not a parsed record", what);

    /* The order of the checks is docs/protocol.md 4.4's. */
    if (strcmp(json_string_value(ov), v->overlay) != 0 ||
        json_string_length(ov) != strlen(v->overlay))
        return errbuf_set(err, errlen, REC_E_OVERLAY, "%s: signed for overlay %s, this is %s", what,
                          quote(json_string_value(ov), json_string_length(ov), q, sizeof(q)),
                          v->overlay);

    /* The certificate: from the cache (keyed by its text, so a hit decodes nothing), or parsed
     * and chain-checked once. */
    size_t sig_len = 0;
    const char *cert_b64 = json_string_value(cert_str);
    size_t cert_len = json_string_length(cert_str);
    uint64_t h = text_hash(v, cert_b64, cert_len);
    struct vcert *c = cache_lookup(v, h, cert_b64, cert_len);
    struct vcert *owned = NULL; /* a checked certificate with no cache to keep it */
    if (c) {
        v->hits++;
    } else {
        v->misses++;
        size_t der_len = 0;
        unsigned char *der = overlay_b64_decode(cert_b64, cert_len, &der_len);
        if (!der)
            return errbuf_set(err, errlen, REC_E_MALFORMED, "%s: \"cert\" is not base64", what);
        int code;
        gnutls_datum_t d = {der, (unsigned)der_len};
        c = check_cert(v, &d, what, &code, err, errlen);
        free(der);
        if (!c)
            return code;
        c->h = h;
        if (!(c->b64 = malloc(cert_len + 1))) {
            vcert_free(c);
            return errbuf_set(err, errlen, REC_E_NOMEM, "%s: out of memory", what);
        }
        memcpy(c->b64, cert_b64, cert_len);
        c->b64[cert_len] = '\0';
        c->b64_len = cert_len;
        if (v->cache_size > 0)
            cache_insert(v, c);
        else
            owned = c;
    }

    int ret = REC_OK;
    unsigned char *sig = NULL;
    uint64_t gen = crl_generation();
    if (c->crl_gen != gen) { /* the list changed since this certificate was last looked up */
        c->crl_gen = gen;
        c->revoked = crl_ref_revoked(&c->crl_ref);
    }
    if (c->revoked) {
        char serial[2 * CRL_SERIAL_MAX + 1];
        ret =
            errbuf_set(err, errlen, REC_E_CERT, "%s: the certificate of %s (serial %s) is revoked",
                       what, c->uri, crl_ref_serial_hex(&c->crl_ref, serial, sizeof(serial)));
        goto out;
    }
    if (now < c->not_before || now > c->not_after) {
        ret = errbuf_set(err, errlen, REC_E_CERT,
                         "%s: the certificate of %s is not valid at %" PRId64 " (valid %" PRId64
                         "..%" PRId64 ")",
                         what, c->uri, (int64_t)now, (int64_t)c->not_before, (int64_t)c->not_after);
        goto out;
    }
    if (strcmp(r->owner, c->uri) != 0) {
        ret = errbuf_set(err, errlen, REC_E_OWNER, "%s: owner %s is not the certificate's URI %s",
                         what, quote(r->owner, strlen(r->owner), q, sizeof(q)), c->uri);
        goto out;
    }

    sig = overlay_b64_decode(json_string_value(sig_str), json_string_length(sig_str), &sig_len);
    if (!sig) {
        ret = errbuf_set(err, errlen, REC_E_MALFORMED, "%s: \"sig\" is not base64", what);
        goto out;
    }
    bool good;
    if (c->ed25519) {
        const char *text = json_string_value(signed_str);
        size_t tlen = json_string_length(signed_str);
        good =
            sig_len == crypto_sign_BYTES &&
            (own_sig_known(c->ed_pub, sig, sig_len, text, tlen) ||
             crypto_sign_verify_detached(sig, (const unsigned char *)text, tlen, c->ed_pub) == 0);
    } else {
        gnutls_datum_t data = {(unsigned char *)(uintptr_t)json_string_value(signed_str),
                               (unsigned)json_string_length(signed_str)};
        gnutls_datum_t sd = {sig, (unsigned)sig_len};
        good = gnutls_pubkey_verify_data2(c->pub, c->sa, 0, &data, &sd) >= 0;
    }
    if (!good) {
        ret = errbuf_set(err, errlen, REC_E_SIGNATURE,
                         "%s: signature does not verify with the certificate of %s", what, c->uri);
        goto out;
    }

    if (r->expires <= (int64_t)now) {
        ret = errbuf_set(err, errlen, REC_E_EXPIRED, "%s: expired at %" PRId64 " (now %" PRId64 ")",
                         what, r->expires, (int64_t)now);
        goto out;
    }
    /* expires > now here, so the difference is positive; unsigned arithmetic cannot overflow. */
    if (max_lifetime_s > 0 &&
        (uint64_t)r->expires - (uint64_t)(int64_t)now > (uint64_t)max_lifetime_s) {
        ret = errbuf_set(err, errlen, REC_E_LIFETIME,
                         "%s: expires in %" PRIu64 " s, above the maximum of %" PRId64 " s", what,
                         (uint64_t)r->expires - (uint64_t)(int64_t)now, max_lifetime_s);
        goto out;
    }

    if (!strcmp(r->type, REC_TYPE_USER_LOCATION)) {
        /* The user's own record; or, for a domain other than the overlay's own, one written by
         * a P2P registrar the document names for that domain (seed 004 section 4.3). */
        char dom[256];
        if (strcmp(r->name, rec_uri_aor(c->uri)) != 0 &&
            !(uri_domain(r->name, dom, sizeof(dom)) && strcasecmp(dom, v->overlay) != 0 &&
              strchr(r->name, '@') && is_domain_proxy(v, c, dom))) {
            ret = errbuf_set(err, errlen, REC_E_FORBIDDEN,
                             "%s: %s may not write the user location of %s", what, c->uri,
                             quote(r->name, strlen(r->name), q, sizeof(q)));
            goto out;
        }
    } else if (!strcmp(r->type, REC_TYPE_PROXY_LOCATION)) {
        if (!is_domain_proxy(v, c, r->name)) {
            ret = errbuf_set(err, errlen, REC_E_FORBIDDEN,
                             "%s: %s may not write the proxy location of %s (not its P2P proxy in "
                             "the overlay document)",
                             what, c->uri, quote(r->name, strlen(r->name), q, sizeof(q)));
            goto out;
        }
    }

out:
    free(sig);
    vcert_free(owned);
    return ret;
}

int rec_answers(const struct record *r, const nid_t *key, const char *type, const char *name,
                char *err, size_t errlen)
{
    char asked[NID_HEX_LEN + 1], found[NID_HEX_LEN + 1], qt[80], qn[80];
    if (err && errlen)
        err[0] = '\0';
    nid_t want = *key;
    /* A caller that knows the name must have asked for its key: one hash, no trust in it. */
    if (type && name && nid_key(&want, type, name) < 0)
        return errbuf_set(err, errlen, REC_E_NOMEM, "record: cannot hash the key");
    bool ok = nid_eq(&r->key, key) && nid_eq(&want, key) && (!type || !strcmp(r->type, type)) &&
              (!name || !strcmp(r->name, name));
    if (ok)
        return REC_OK;
    char what[REC_TYPE_MAX + REC_NAME_MAX + 8] = "", qo[80];
    if (type && name)
        snprintf(what, sizeof(what), " (%s|%s)", type, name);
    return errbuf_set(err, errlen, REC_E_MISMATCH,
                      "record: asked for key %s%s, found key %s (type %s, name %s, owner %s)",
                      nid_to_hex(key, asked), what, nid_to_hex(&r->key, found),
                      quote(r->type, strlen(r->type), qt, sizeof(qt)),
                      quote(r->name, strlen(r->name), qn, sizeof(qn)),
                      quote(r->owner, strlen(r->owner), qo, sizeof(qo)));
}

uint64_t rec_seq_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000000u + (uint64_t)tv.tv_usec;
}
