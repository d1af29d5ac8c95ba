/*
 * The node's side of enrollment (see login_client.h): the three login server
 * requests on http_client, the checks a returned certificate must pass before
 * a node uses it, and the state directory that keeps the result. Every
 * request carries a small context (struct login_op) with what the answer is
 * checked against, decided when the request starts: the pin and minimum
 * sequence, the CA, the URI, our public key's id and, on renewal, the
 * Node-ID to keep.
 */
#include "login_client.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errbuf.h"
#include "fsutil.h"
#include "log.h"

#define MAX_FILE_BYTES (1024 * 1024)

struct login_op {
    const char *what; /* "overlay fetch", "enroll", "renew": the start of every message */
    char *url;
    login_overlay_cb ocb;
    login_cert_cb ccb;
    void *ud;
    char pin[OVERLAY_PIN_LEN];
    int64_t min_sequence;
    char *ca_pem;       /* contents of ca_file */
    char *expected_uri; /* sip:<user>@<overlay> */
    unsigned char keyid[64];
    size_t keyid_len;
    bool check_node_id; /* renewal keeps the Node-ID */
    nid_t node_id;
    char code[64]; /* the server's error code, for the result */
};

static void op_free(struct login_op *op)
{
    if (!op)
        return;
    free(op->url);
    free(op->ca_pem);
    free(op->expected_uri);
    free(op);
}

static char *join_url(const char *base, const char *path)
{
    size_t n = strlen(base);
    while (n > 0 && base[n - 1] == '/')
        n--;
    size_t plen = strlen(path);
    char *u = malloc(n + plen + 1);
    if (u) {
        memcpy(u, base, n);
        memcpy(u + n, path, plen + 1);
    }
    return u;
}

/* Copies server text into a message, replacing control characters, bounded. */
static void clean_copy(char *dst, size_t dstlen, const char *src)
{
    size_t i = 0;
    for (; src && src[i] && i + 1 < dstlen && i < 200; i++)
        dst[i] = ((unsigned char)src[i] < 0x20 || src[i] == 0x7f) ? '?' : src[i];
    if (dstlen)
        dst[i] = '\0';
}

/* "401 unauthorized: <reason>", from the error body of protocol.md 2.5. */
static void status_error(struct login_op *op, const struct http_response *resp, char *msg,
                         size_t msglen)
{
    char reason[256] = "";
    json_t *j = json_loadb(resp->body, resp->body_len, JSON_REJECT_DUPLICATES, NULL);
    const char *code = json_string_value(json_object_get(j, "error"));
    const char *why = json_string_value(json_object_get(j, "reason"));
    if (code) {
        clean_copy(op->code, sizeof(op->code), code);
        clean_copy(reason, sizeof(reason), why ? why : "(no reason given)");
        snprintf(msg, msglen, "%s %s: %ld %s: %s", op->what, op->url, resp->status, op->code,
                 reason);
    } else {
        snprintf(msg, msglen, "%s %s: HTTP status %ld (no error description in the response)",
                 op->what, op->url, resp->status);
    }
    json_decref(j);
    if (resp->retry_after_s > 0) {
        size_t used = strlen(msg);
        snprintf(msg + used, msglen - used, " (retry after %.0f s)", resp->retry_after_s);
    }
}

/* Overlay document */

static void overlay_done(const struct http_response *resp, void *ud)
{
    struct login_op *op = ud;
    struct login_overlay_result res;
    struct overlay_doc doc;
    char msg[1024], verr[512];

    memset(&res, 0, sizeof(res));
    memset(&doc, 0, sizeof(doc));
    res.http_status = resp->status;
    res.envelope = resp->body;
    res.envelope_len = resp->body_len;
    if (resp->error) {
        snprintf(msg, sizeof(msg), "%s %s: %s", op->what, op->url, resp->error);
        res.error = msg;
    } else if (resp->status != 200) {
        status_error(op, resp, msg, sizeof(msg));
        res.error = msg;
    } else if (overlay_doc_verify(resp->body, resp->body_len, op->pin, op->min_sequence, &doc, verr,
                                  sizeof(verr)) < 0) {
        snprintf(msg, sizeof(msg), "%s %s: %s", op->what, op->url, verr);
        res.error = msg;
        /* A document that fails authentication is an attack or a misconfiguration: say so. */
        log_warn("login", "%s", msg);
    } else {
        res.doc = &doc;
    }
    if (res.error) {
        res.envelope = NULL;
        res.envelope_len = 0;
    }
    op->ocb(&res, op->ud);
    overlay_doc_free(&doc);
    op_free(op);
}

int login_fetch_overlay(struct http_client *client, const char *base_url, const char *pin,
                        int64_t min_sequence, login_overlay_cb cb, void *ud, char *err,
                        size_t errlen)
{
    struct login_op *op = NULL;
    char norm[OVERLAY_PIN_LEN];
    int r;

    if (!client || !base_url || !cb)
        return errbuf_set(err, errlen, -EINVAL, "overlay fetch: missing argument");
    /* The pin's form is checked by overlay_doc_verify(); checking here fails before any I/O. */
    if (!pin || strlen(pin) != OVERLAY_PIN_LEN - 1 || strncmp(pin, "sha256:", 7) != 0 ||
        strspn(pin + 7, "0123456789abcdefABCDEF") != OVERLAY_PIN_LEN - 8)
        return errbuf_set(err, errlen, -EINVAL,
                          "overlay fetch: the CA pin must be sha256:<64 hex digits>");
    memcpy(norm, pin, OVERLAY_PIN_LEN);
    if (!(op = calloc(1, sizeof(*op))))
        return errbuf_set(err, errlen, -ENOMEM, "overlay fetch: out of memory");
    op->what = "overlay fetch";
    op->ocb = cb;
    op->ud = ud;
    op->min_sequence = min_sequence;
    memcpy(op->pin, norm, sizeof(norm));
    if (!(op->url = join_url(base_url, "/v1/overlay"))) {
        r = errbuf_set(err, errlen, -ENOMEM, "overlay fetch: out of memory");
        goto fail;
    }
    /* No CA yet: the document authenticates itself by signature and pin (protocol.md 2.1). */
    struct http_request req = {
        .method = "GET",
        .url = op->url,
        .insecure = true,
        .timeout_ms = LOGIN_TIMEOUT_MS,
        .max_response = LOGIN_MAX_RESPONSE,
    };
    if ((r = http_request_start(client, &req, overlay_done, op)) < 0) {
        errbuf_set(err, errlen, r, "overlay fetch %s: cannot start the request: %s", op->url,
                   strerror(-r));
        goto fail;
    }
    return 0;
fail:
    op_free(op);
    return r;
}

/* Certificates */

static int load_ca_list(const char *pem, gnutls_x509_crt_t **list, unsigned *n)
{
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)pem, (unsigned)strlen(pem)};
    return gnutls_x509_crt_list_import2(list, n, &d, GNUTLS_X509_FMT_PEM, 0);
}

static void free_ca_list(gnutls_x509_crt_t *list, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        gnutls_x509_crt_deinit(list[i]);
    gnutls_free(list);
}

/* The verification status bits as a short phrase: "expired", "not issued by our CA", ... */
static void status_str(unsigned status, const char *purpose, char *out, size_t len)
{
    static const struct {
        unsigned bit;
        const char *text;
    } bits[] = {
        {GNUTLS_CERT_SIGNER_NOT_FOUND, "not issued by our CA"},
        {GNUTLS_CERT_SIGNER_NOT_CA, "its issuer is not a CA"},
        {GNUTLS_CERT_SIGNATURE_FAILURE, "its signature does not verify"},
        {GNUTLS_CERT_EXPIRED, "expired"},
        {GNUTLS_CERT_NOT_ACTIVATED, "not valid yet"},
        {GNUTLS_CERT_REVOKED, "revoked"},
        {GNUTLS_CERT_INSECURE_ALGORITHM, "signed with an insecure algorithm"},
        {GNUTLS_CERT_SIGNER_CONSTRAINTS_FAILURE, "its issuer's constraints forbid it"},
    };
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
        if (!(status & bits[i].bit))
            continue;
        snprintf(out + used, len - used, "%s%s", used ? ", " : "", bits[i].text);
        used = strlen(out);
    }
    if (status & GNUTLS_CERT_PURPOSE_MISMATCH) {
        snprintf(out + used, len - used, "%sit does not allow %s", used ? ", " : "",
                 !strcmp(purpose, GNUTLS_KP_TLS_WWW_CLIENT) ? "TLS client authentication"
                                                            : "TLS server authentication");
        used = strlen(out);
    }
    if (used == 0) {
        gnutls_datum_t txt = {NULL, 0};
        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &txt, 0) >= 0)
            snprintf(out, len, "%s", (const char *)txt.data);
        else
            snprintf(out, len, "verification status 0x%x", status);
        gnutls_free(txt.data);
    }
}

/* Chain to our CA, valid now, with the key purpose the transport will require of it. */
static int verify_chain(gnutls_x509_trust_list_t tl, gnutls_x509_crt_t cert, const char *purpose,
                        char *why, size_t whylen)
{
    gnutls_typed_vdata_st vd = {
        .type = GNUTLS_DT_KEY_PURPOSE_OID,
        .data = (unsigned char *)(uintptr_t)purpose,
        .size = 0,
    };
    unsigned status = 0;
    int r = gnutls_x509_trust_list_verify_crt2(tl, &cert, 1, &vd, 1, 0, &status, NULL);
    if (r < 0) {
        snprintf(why, whylen, "%s", gnutls_strerror(r));
        return -1;
    }
    if (status) {
        status_str(status, purpose, why, whylen);
        return -1;
    }
    return 0;
}

/*
 * Checks a 200 answer to enroll or renew. On success fills res (pointing into
 * *json_out and *cert_out, which the caller frees after the callback).
 */
static int check_cert_response(struct login_op *op, const struct http_response *resp,
                               struct login_cert_result *res, json_t **json_out,
                               gnutls_x509_crt_t *cert_out, char *why, size_t whylen)
{
    gnutls_x509_crt_t cert = NULL, rca = NULL, *cas = NULL;
    gnutls_x509_trust_list_t tl = NULL;
    unsigned n_cas = 0;
    int ret = -1, r;

    json_t *j = json_loadb(resp->body, resp->body_len, JSON_REJECT_DUPLICATES, NULL);
    *json_out = j;
    if (!json_is_object(j)) {
        snprintf(why, whylen, "the response is not a JSON object");
        goto out;
    }
    json_t *jc = json_object_get(j, "certificate");
    if (!json_is_string(jc)) {
        snprintf(why, whylen, "the response has no \"certificate\" string");
        goto out;
    }
    const char *cert_pem = json_string_value(jc);
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)cert_pem, (unsigned)json_string_length(jc)};
    if ((r = gnutls_x509_crt_init(&cert)) < 0 ||
        (r = gnutls_x509_crt_import(cert, &d, GNUTLS_X509_FMT_PEM)) < 0) {
        snprintf(why, whylen, "certificate refused: not a PEM certificate: %s", gnutls_strerror(r));
        goto out;
    }

    if ((r = load_ca_list(op->ca_pem, &cas, &n_cas)) < 0 || n_cas == 0) {
        snprintf(why, whylen, "cannot parse our CA file: %s", gnutls_strerror(r));
        goto out;
    }
    /* The response names its CA; it must be ours (else the server is misconfigured). */
    json_t *jca = json_object_get(j, "ca_certificate");
    if (jca) {
        char have[OVERLAY_PIN_LEN], want[OVERLAY_PIN_LEN];
        gnutls_datum_t cd = {(unsigned char *)(uintptr_t)json_string_value(jca),
                             (unsigned)json_string_length(jca)};
        bool match = false;
        if (!json_is_string(jca) || gnutls_x509_crt_init(&rca) < 0 ||
            gnutls_x509_crt_import(rca, &cd, GNUTLS_X509_FMT_PEM) < 0 ||
            overlay_doc_pin(rca, have) < 0) {
            snprintf(why, whylen, "the response's \"ca_certificate\" is not a PEM certificate");
            goto out;
        }
        for (unsigned i = 0; i < n_cas && !match; i++)
            match = overlay_doc_pin(cas[i], want) == 0 && !strcmp(have, want);
        if (!match) {
            snprintf(why, whylen, "the response's \"ca_certificate\" is not our CA (%s)", have);
            goto out;
        }
    }

    if ((r = gnutls_x509_trust_list_init(&tl, 0)) < 0) {
        snprintf(why, whylen, "cannot set up CA trust: %s", gnutls_strerror(r));
        goto out;
    }
    /* The trust list owns the certificates from here on; only the array is ours. */
    r = gnutls_x509_trust_list_add_cas(tl, cas, n_cas, 0);
    gnutls_free(cas);
    cas = NULL;
    n_cas = 0;
    if (r < 0) {
        snprintf(why, whylen, "cannot set up CA trust: %s", gnutls_strerror(r));
        goto out;
    }
    char vwhy[256];
    if (verify_chain(tl, cert, GNUTLS_KP_TLS_WWW_CLIENT, vwhy, sizeof(vwhy)) < 0 ||
        verify_chain(tl, cert, GNUTLS_KP_TLS_WWW_SERVER, vwhy, sizeof(vwhy)) < 0) {
        snprintf(why, whylen, "certificate refused: it does not verify against our CA: %s", vwhy);
        goto out;
    }

    unsigned char kid[64];
    size_t kid_len = sizeof(kid);
    if (gnutls_x509_crt_get_key_id(cert, GNUTLS_KEYID_USE_SHA256, kid, &kid_len) < 0 ||
        kid_len != op->keyid_len || memcmp(kid, op->keyid, kid_len) != 0) {
        snprintf(why, whylen, "certificate refused: its public key is not ours");
        goto out;
    }

    if ((r = cred_identity(cert, &res->id)) < 0) {
        snprintf(why, whylen, "certificate refused: unreadable identity: %s", gnutls_strerror(r));
        goto out;
    }
    if (strcmp(res->id.uri, op->expected_uri) != 0) {
        snprintf(why, whylen, "certificate refused: it states the URI \"%s\", expected \"%s\"",
                 res->id.uri[0] ? res->id.uri : "(none)", op->expected_uri);
        goto out;
    }
    if (!res->id.has_node_id) {
        snprintf(why, whylen, "certificate refused: it carries no Node-ID");
        goto out;
    }
    char hex[NID_HEX_LEN + 1], oldhex[NID_HEX_LEN + 1];
    nid_to_hex(&res->id.node_id, hex);
    if (op->check_node_id && !nid_eq(&res->id.node_id, &op->node_id)) {
        snprintf(why, whylen, "certificate refused: Node-ID %s differs from the current %s", hex,
                 nid_to_hex(&op->node_id, oldhex));
        goto out;
    }
    /* The response's own summary must agree with the certificate it comes with. */
    json_t *ju = json_object_get(j, "uri"), *jn = json_object_get(j, "node_id");
    if (ju && (!json_is_string(ju) || strcmp(json_string_value(ju), res->id.uri) != 0)) {
        snprintf(why, whylen, "the response's \"uri\" does not match its certificate");
        goto out;
    }
    if (jn && (!json_is_string(jn) || strcasecmp(json_string_value(jn), hex) != 0)) {
        snprintf(why, whylen, "the response's \"node_id\" does not match its certificate");
        goto out;
    }

    res->cert_pem = cert_pem;
    res->ca_pem = op->ca_pem;
    res->cert = cert;
    *cert_out = cert;
    cert = NULL;
    ret = 0;
out:
    gnutls_x509_trust_list_deinit(tl, 1);
    free_ca_list(cas, n_cas);
    gnutls_x509_crt_deinit(rca);
    gnutls_x509_crt_deinit(cert);
    return ret;
}

static void cert_done(const struct http_response *resp, void *ud)
{
    struct login_op *op = ud;
    struct login_cert_result res;
    char msg[1024], why[512];
    json_t *j = NULL;
    gnutls_x509_crt_t cert = NULL;

    memset(&res, 0, sizeof(res));
    res.http_status = resp->status;
    res.retry_after_s = resp->retry_after_s;
    if (resp->error) {
        snprintf(msg, sizeof(msg), "%s %s: %s", op->what, op->url, resp->error);
        res.error = msg;
    } else if (resp->status != 200) {
        status_error(op, resp, msg, sizeof(msg));
        res.error = msg;
        res.code = op->code[0] ? op->code : NULL;
    } else if (check_cert_response(op, resp, &res, &j, &cert, why, sizeof(why)) < 0) {
        snprintf(msg, sizeof(msg), "%s %s: %s", op->what, op->url, why);
        res.error = msg;
        /* A server handing out certificates we refuse is misbehaving: worth a line of its own. */
        log_warn("login", "%s", msg);
    }
    if (res.error) {
        /* Nothing of a refused answer is handed on. */
        res.cert_pem = res.ca_pem = NULL;
        res.cert = NULL;
        memset(&res.id, 0, sizeof(res.id));
    }
    op->ccb(&res, op->ud);
    gnutls_x509_crt_deinit(cert);
    json_decref(j);
    op_free(op);
}

/* The part enroll and renew share: read the CA, note our key, make the CSR. */
static struct login_op *cert_op_new(const char *what, const char *base_url, const char *path,
                                    const char *ca_file, gnutls_x509_privkey_t key, const char *cn,
                                    gnutls_datum_t *csr, login_cert_cb cb, void *ud, char *err,
                                    size_t errlen, int *rc)
{
    struct login_op *op = calloc(1, sizeof(*op));
    gnutls_x509_crt_t *cas = NULL;
    unsigned n_cas = 0;
    int r;

    if (!op) {
        *rc = errbuf_set(err, errlen, -ENOMEM, "%s: out of memory", what);
        return NULL;
    }
    op->what = what;
    op->ccb = cb;
    op->ud = ud;
    if (!(op->url = join_url(base_url, path))) {
        *rc = errbuf_set(err, errlen, -ENOMEM, "%s: out of memory", what);
        goto fail;
    }
    if ((r = fs_read_file(ca_file, MAX_FILE_BYTES, &op->ca_pem, NULL)) < 0) {
        *rc = errbuf_set(err, errlen, r, "%s: cannot read CA file %s: %s", what, ca_file,
                         strerror(-r));
        goto fail;
    }
    r = load_ca_list(op->ca_pem, &cas, &n_cas);
    free_ca_list(cas, r < 0 ? 0 : n_cas);
    if (r < 0 || n_cas == 0) {
        *rc = errbuf_set(err, errlen, -EINVAL, "%s: CA file %s holds no PEM certificate", what,
                         ca_file);
        goto fail;
    }
    op->keyid_len = sizeof(op->keyid);
    if ((r = gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, op->keyid,
                                            &op->keyid_len)) < 0) {
        *rc = errbuf_set(err, errlen, -EINVAL, "%s: unusable key: %s", what, gnutls_strerror(r));
        goto fail;
    }
    if ((r = cred_csr_make(key, cn, csr)) < 0) {
        *rc = errbuf_set(err, errlen, -EINVAL, "%s: cannot make a certificate request: %s", what,
                         gnutls_strerror(r));
        goto fail;
    }
    return op;
fail:
    op_free(op);
    return NULL;
}

/* Sends `body` (a JSON object, consumed) and wipes the serialised copy (it may hold a password). */
static int send_json(struct http_client *client, struct login_op *op, json_t *body,
                     const char *ca_file, const char *cert_file, const char *key_file, char *err,
                     size_t errlen)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text)
        return errbuf_set(err, errlen, -ENOMEM, "%s: out of memory", op->what);
    size_t len = strlen(text);
    struct http_request req = {
        .method = "POST",
        .url = op->url,
        .body = text,
        .body_len = len,
        .content_type = "application/json",
        .ca_file = ca_file,
        .cert_file = cert_file,
        .key_file = key_file,
        .timeout_ms = LOGIN_TIMEOUT_MS,
        .max_response = LOGIN_MAX_RESPONSE,
    };
    int r = http_request_start(client, &req, cert_done, op);
    explicit_bzero(text, len);
    free(text);
    if (r < 0)
        return errbuf_set(err, errlen, r, "%s %s: cannot start the request: %s", op->what, op->url,
                          strerror(-r));
    return 0;
}

int login_enroll(struct http_client *client, const char *base_url, const char *ca_file,
                 const char *overlay, const char *user, const char *password, const char *device,
                 gnutls_x509_privkey_t key, login_cert_cb cb, void *ud, char *err, size_t errlen)
{
    gnutls_datum_t csr = {NULL, 0};
    struct login_op *op = NULL;
    int r = 0;

    if (!client || !base_url || !ca_file || !overlay || !*overlay || !user || !*user || !password ||
        !key || !cb)
        return errbuf_set(err, errlen, -EINVAL, "enroll: missing argument");
    op = cert_op_new("enroll", base_url, "/v1/enroll", ca_file, key, user, &csr, cb, ud, err,
                     errlen, &r);
    if (!op)
        return r;
    size_t ulen = strlen(user) + strlen(overlay) + 6;
    if (!(op->expected_uri = malloc(ulen))) {
        r = errbuf_set(err, errlen, -ENOMEM, "enroll: out of memory");
        goto fail;
    }
    snprintf(op->expected_uri, ulen, "sip:%s@%s", user, overlay);

    json_t *body = json_object();
    if (body &&
        (json_object_set_new(body, "user", json_string(user)) < 0 ||
         json_object_set_new(body, "password", json_string(password)) < 0 ||
         json_object_set_new(body, "csr", json_stringn((const char *)csr.data, csr.size)) < 0 ||
         (device && json_object_set_new(body, "device", json_string(device)) < 0))) {
        json_decref(body);
        r = errbuf_set(err, errlen, -EINVAL,
                       "enroll: user name, password or device is not valid UTF-8");
        goto fail;
    }
    if ((r = send_json(client, op, body, ca_file, NULL, NULL, err, errlen)) < 0)
        goto fail;
    gnutls_free(csr.data);
    return 0;
fail:
    gnutls_free(csr.data);
    op_free(op);
    return r;
}

int login_renew(struct http_client *client, const char *base_url, const char *ca_file,
                const char *cert_file, const char *key_file, gnutls_x509_privkey_t new_key,
                login_cert_cb cb, void *ud, char *err, size_t errlen)
{
    gnutls_datum_t csr = {NULL, 0};
    gnutls_x509_crt_t old = NULL;
    struct peer_identity id;
    struct login_op *op = NULL;
    int r = 0;

    if (!client || !base_url || !ca_file || !cert_file || !key_file || !new_key || !cb)
        return errbuf_set(err, errlen, -EINVAL, "renew: missing argument");
    if ((r = cred_cert_load(&old, cert_file)) < 0)
        return errbuf_set(err, errlen, -EINVAL, "renew: cannot load current certificate %s: %s",
                          cert_file, gnutls_strerror(r));
    r = cred_identity(old, &id);
    gnutls_x509_crt_deinit(old);
    if (r < 0)
        return errbuf_set(err, errlen, -EINVAL, "renew: cannot read the identity of %s: %s",
                          cert_file, gnutls_strerror(r));
    if (!id.uri[0] || !id.has_node_id)
        return errbuf_set(err, errlen, -EINVAL, "renew: %s has no %s", cert_file,
                          id.uri[0] ? "Node-ID" : "URI");
    const char *cn = id.cn[0] ? id.cn : "node";
    op = cert_op_new("renew", base_url, "/v1/renew", ca_file, new_key, cn, &csr, cb, ud, err,
                     errlen, &r);
    if (!op)
        return r;
    op->check_node_id = true;
    op->node_id = id.node_id;
    if (!(op->expected_uri = strdup(id.uri))) {
        r = errbuf_set(err, errlen, -ENOMEM, "renew: out of memory");
        goto fail;
    }
    json_t *body = json_object();
    if (body &&
        json_object_set_new(body, "csr", json_stringn((const char *)csr.data, csr.size)) < 0) {
        json_decref(body);
        r = errbuf_set(err, errlen, -ENOMEM, "renew: out of memory");
        goto fail;
    }
    if ((r = send_json(client, op, body, ca_file, cert_file, key_file, err, errlen)) < 0)
        goto fail;
    gnutls_free(csr.data);
    return 0;
fail:
    gnutls_free(csr.data);
    op_free(op);
    return r;
}

bool login_renew_due(gnutls_x509_crt_t cert, time_t now)
{
    time_t nb = gnutls_x509_crt_get_activation_time(cert);
    time_t na = gnutls_x509_crt_get_expiration_time(cert);
    if (nb == (time_t)-1 || na == (time_t)-1 || na <= nb)
        return true; /* unreadable or empty validity: renew rather than guess */
    int64_t span = (int64_t)na - (int64_t)nb;
    int64_t due = (int64_t)nb + span - span / 3;
    return (int64_t)now >= due || now >= na;
}

/* State directory */

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* mkdir -p with mode 0700 for what it creates; existing directories are left as they are. */
static int make_dirs(const char *dir)
{
    if (!*dir)
        return -EINVAL;
    char *p = strdup(dir);
    int ret = 0;
    if (!p)
        return -ENOMEM;
    for (char *s = p + 1; ret == 0; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char saved = *s;
        *s = '\0';
        if (s[-1] != '/')
            ret = fs_mkdir(p, 0700);
        *s = saved;
        if (saved == '\0')
            break;
    }
    free(p);
    return ret;
}

static void fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static int import_pem_cert(gnutls_x509_crt_t *crt, const char *pem)
{
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)pem, (unsigned)strlen(pem)};
    int r = gnutls_x509_crt_init(crt);
    if (r >= 0)
        r = gnutls_x509_crt_import(*crt, &d, GNUTLS_X509_FMT_PEM);
    return r;
}

static bool key_matches_cert(gnutls_x509_privkey_t key, gnutls_x509_crt_t crt)
{
    unsigned char a[64], b[64];
    size_t al = sizeof(a), bl = sizeof(b);
    return gnutls_x509_privkey_get_key_id(key, GNUTLS_KEYID_USE_SHA256, a, &al) >= 0 &&
           gnutls_x509_crt_get_key_id(crt, GNUTLS_KEYID_USE_SHA256, b, &bl) >= 0 && al == bl &&
           memcmp(a, b, al) == 0;
}

int node_creds_save(const char *state_dir, gnutls_x509_privkey_t key, const char *cert_pem,
                    const char *ca_pem, const char *overlay_envelope, const char *pin, char *err,
                    size_t errlen)
{
    gnutls_x509_crt_t cert = NULL, ca = NULL;
    struct overlay_doc doc;
    char ca_pin[OVERLAY_PIN_LEN], verr[512];
    char *path = NULL;
    int ret = -EINVAL, r;

    memset(&doc, 0, sizeof(doc));
    if (!state_dir || !key || !cert_pem || !ca_pem || !overlay_envelope || !pin)
        return errbuf_set(err, errlen, -EINVAL, "save credentials: missing argument");

    /* Refuse an inconsistent set: a node could not use it after a restart. */
    if (import_pem_cert(&cert, cert_pem) < 0) {
        errbuf_set(err, errlen, ret, "save credentials: the certificate is not PEM");
        goto out;
    }
    if (!key_matches_cert(key, cert)) {
        errbuf_set(err, errlen, ret, "save credentials: the certificate does not match the key");
        goto out;
    }
    if (import_pem_cert(&ca, ca_pem) < 0 || overlay_doc_pin(ca, ca_pin) < 0) {
        errbuf_set(err, errlen, ret, "save credentials: the CA certificate is not PEM");
        goto out;
    }
    if (overlay_doc_verify(overlay_envelope, strlen(overlay_envelope), pin, 0, &doc, verr,
                           sizeof(verr)) < 0) {
        errbuf_set(err, errlen, ret, "save credentials: %s", verr);
        goto out;
    }
    if (strcmp(ca_pin, doc.pin) != 0) {
        errbuf_set(err, errlen, ret, "save credentials: the CA certificate does not match the pin");
        goto out;
    }

    if ((r = make_dirs(state_dir)) < 0) {
        ret = errbuf_set(err, errlen, r, "save credentials: cannot create %s: %s", state_dir,
                         strerror(-r));
        goto out;
    }
    static const char *const names[] = {NODE_CREDS_OVERLAY, NODE_CREDS_PIN, NODE_CREDS_CA,
                                        NODE_CREDS_KEY, NODE_CREDS_CERT};
    char pinline[OVERLAY_PIN_LEN + 1];
    snprintf(pinline, sizeof(pinline), "%s\n", doc.pin);
    const char *data[] = {overlay_envelope, pinline, ca_pem, NULL, cert_pem};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        free(path);
        if (!(path = path_join(state_dir, names[i]))) {
            ret = errbuf_set(err, errlen, -ENOMEM, "save credentials: out of memory");
            goto out;
        }
        if (!data[i]) {
            /* cred_key_save writes PKCS#8 the same atomic way, mode 0600. */
            if ((r = cred_key_save(key, path)) < 0) {
                ret = errbuf_set(err, errlen, -EIO, "save credentials: cannot write %s: %s", path,
                                 gnutls_strerror(r));
                goto out;
            }
        } else if ((r = fs_write_atomic(path, data[i], strlen(data[i]), 0600)) < 0) {
            ret = errbuf_set(err, errlen, r, "save credentials: cannot write %s: %s", path,
                             strerror(-r));
            goto out;
        }
    }
    fsync_dir(state_dir);
    ret = 0;
out:
    free(path);
    overlay_doc_free(&doc);
    gnutls_x509_crt_deinit(ca);
    gnutls_x509_crt_deinit(cert);
    return ret;
}

void node_creds_free(struct node_creds *c)
{
    if (!c)
        return;
    gnutls_x509_privkey_deinit(c->key);
    gnutls_x509_crt_deinit(c->cert);
    free(c->cert_pem);
    free(c->ca_pem);
    free(c->overlay_envelope);
    overlay_doc_free(&c->doc);
    free(c->key_file);
    free(c->cert_file);
    free(c->ca_file);
    memset(c, 0, sizeof(*c));
}

/* Reads state_dir/name into *out; with `err` naming the file on failure. */
static int load_file(const char *state_dir, const char *name, char **path_out, char **out,
                     size_t *len, char *err, size_t errlen)
{
    char *path = path_join(state_dir, name);
    if (!path)
        return errbuf_set(err, errlen, -ENOMEM, "load credentials: out of memory");
    int r = fs_read_file(path, MAX_FILE_BYTES, out, len);
    if (r < 0) {
        errbuf_set(err, errlen, r, "load credentials: cannot read %s: %s", path, strerror(-r));
        free(path);
        return r;
    }
    if (path_out)
        *path_out = path;
    else
        free(path);
    return 0;
}

int node_creds_load(const char *state_dir, struct node_creds *out, char *err, size_t errlen)
{
    char *pin_text = NULL, *key_text = NULL;
    gnutls_x509_crt_t ca = NULL;
    size_t len = 0;
    char verr[512], ca_pin[OVERLAY_PIN_LEN];
    int ret, r;

    memset(out, 0, sizeof(*out));
    if (!state_dir)
        return errbuf_set(err, errlen, -EINVAL, "load credentials: no state directory");
    if ((ret = load_file(state_dir, NODE_CREDS_PIN, NULL, &pin_text, NULL, err, errlen)) < 0 ||
        (ret = load_file(state_dir, NODE_CREDS_OVERLAY, NULL, &out->overlay_envelope, &len, err,
                         errlen)) < 0 ||
        (ret = load_file(state_dir, NODE_CREDS_CA, &out->ca_file, &out->ca_pem, NULL, err,
                         errlen)) < 0 ||
        (ret = load_file(state_dir, NODE_CREDS_CERT, &out->cert_file, &out->cert_pem, NULL, err,
                         errlen)) < 0 ||
        (ret = load_file(state_dir, NODE_CREDS_KEY, &out->key_file, &key_text, NULL, err, errlen)) <
            0)
        goto fail;
    ret = -EINVAL;

    pin_text[strcspn(pin_text, " \t\r\n")] = '\0';
    if (overlay_doc_verify(out->overlay_envelope, len, pin_text, 0, &out->doc, verr, sizeof(verr)) <
        0) {
        errbuf_set(err, errlen, ret, "load credentials: %s/%s: %s", state_dir, NODE_CREDS_OVERLAY,
                   verr);
        goto fail;
    }
    memcpy(out->pin, out->doc.pin, sizeof(out->pin));
    if (import_pem_cert(&ca, out->ca_pem) < 0 || overlay_doc_pin(ca, ca_pin) < 0 ||
        strcmp(ca_pin, out->pin) != 0) {
        errbuf_set(err, errlen, ret, "load credentials: %s does not hold the pinned CA certificate",
                   out->ca_file);
        goto fail;
    }

    gnutls_datum_t kd = {(unsigned char *)key_text, (unsigned)strlen(key_text)};
    if ((r = gnutls_x509_privkey_init(&out->key)) < 0 ||
        (r = gnutls_x509_privkey_import2(out->key, &kd, GNUTLS_X509_FMT_PEM, NULL,
                                         GNUTLS_PKCS_PLAIN)) < 0) {
        errbuf_set(err, errlen, ret, "load credentials: %s is not a usable key: %s", out->key_file,
                   gnutls_strerror(r));
        goto fail;
    }
    struct stat st;
    if (stat(out->key_file, &st) == 0 && (st.st_mode & 077))
        log_warn("login", "%s is readable by others (mode %03o); it should be 0600", out->key_file,
                 (unsigned)(st.st_mode & 0777));
    if ((r = import_pem_cert(&out->cert, out->cert_pem)) < 0) {
        errbuf_set(err, errlen, ret, "load credentials: %s is not a PEM certificate: %s",
                   out->cert_file, gnutls_strerror(r));
        goto fail;
    }
    if (!key_matches_cert(out->key, out->cert)) {
        errbuf_set(err, errlen, ret,
                   "load credentials: %s does not match %s (interrupted save or renewal?)",
                   out->cert_file, out->key_file);
        goto fail;
    }
    /* Expiry is the caller's business (renewal); the issuer is not. */
    unsigned status = 0;
    if ((r = gnutls_x509_crt_verify(out->cert, &ca, 1, GNUTLS_VERIFY_DISABLE_TIME_CHECKS,
                                    &status)) < 0 ||
        status) {
        errbuf_set(err, errlen, ret, "load credentials: %s was not issued by the CA in %s",
                   out->cert_file, out->ca_file);
        goto fail;
    }
    if ((r = cred_identity(out->cert, &out->id)) < 0) {
        errbuf_set(err, errlen, ret, "load credentials: %s: unreadable identity: %s",
                   out->cert_file, gnutls_strerror(r));
        goto fail;
    }
    ret = 0;
    goto done;
fail:
    node_creds_free(out);
done:
    gnutls_x509_crt_deinit(ca);
    free(pin_text);
    if (key_text) {
        explicit_bzero(key_text, strlen(key_text));
        free(key_text);
    }
    return ret;
}
