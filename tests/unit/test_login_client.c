/*
 * Tests for login_client.c and http_client.c against a real HTTPS server: a
 * small libmicrohttpd server started inside the test (its own thread, which
 * is fine for a test; daemons never do that) on 127.0.0.1 with certificates
 * from a throw-away CA. It serves a signed overlay document and canned
 * enroll/renew answers, good and bad, so that every check the client makes
 * on the server's answer is exercised. Also: the state directory (files,
 * permissions, re-verification), renewal timing, timeouts, response size
 * limits and cancellation. Each test runs its own libev loop bounded by a
 * safety timer, so a bug shows as a failure rather than a hang.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cred.h"
#include "http_client.h"
#include "login_client.h"
#include "overlay_doc.h"
#include "testca.h"

#define OVERLAY "test.example"
#define SAFETY  10.0 /* seconds: no test may run longer */
#define BIG     (100 * 1024)

/* ---- The test server ---------------------------------------------------------------------- */

enum enroll_mode {
    EM_OK = 0,
    EM_WRONG_KEY,      /* a certificate for another public key */
    EM_WRONG_URI,      /* sip:mallory@... */
    EM_NO_NODE_ID,     /* no Node-ID extension */
    EM_OTHER_CA,       /* issued by another CA, which "ca_certificate" names */
    EM_OTHER_CA_QUIET, /* issued by another CA, while "ca_certificate" names ours */
    EM_EXPIRED,        /* expired an hour ago */
    EM_CA_MISMATCH,    /* right certificate, but "ca_certificate" names another CA */
    EM_NOT_JSON,       /* 200 with a body that is not JSON */
    EM_401,
    EM_429,
    EM_NEW_NODE_ID, /* renew: a different Node-ID */
};

struct srv {
    struct MHD_Daemon *d;
    int port;
    char base[64];
    struct testca *ca;    /* issues the certificates it hands out */
    struct testca *other; /* for EM_OTHER_CA / EM_CA_MISMATCH */
    char *key_pem, *cert_pem, *trust_pem;
    const char *overlay_env;
    _Atomic int mode;
    atomic_int overlay_hits, enroll_hits, renew_hits;
    pthread_mutex_t lock;
    char user[128], password[128];
    bool renew_had_client_cert;
};

struct reqbody {
    char *data;
    size_t len;
    bool too_big;
};

static char *crt_pem(gnutls_x509_crt_t crt)
{
    gnutls_datum_t pem = {NULL, 0};
    if (cred_cert_export_pem(crt, &pem) < 0)
        return NULL;
    char *s = strndup((const char *)pem.data, pem.size);
    gnutls_free(pem.data);
    return s;
}

/* A certificate as the login server would issue it (server thread: no cmocka asserts here). */
static char *issue(struct testca *ca, gnutls_pubkey_t pub, const char *cn, const char *uri,
                   const nid_t *nid, bool expired)
{
    time_t now = time(NULL) - (expired ? 7200 : 0);
    struct cred_issue_params p = {
        .cn = cn,
        .uri = uri,
        .node_id = nid,
        .roles = ROLE_NODE | ROLE_SUPERNODE,
        .server_auth = true,
        .client_auth = true,
        .not_before = now - 60,
        .not_after = now + 3600,
    };
    gnutls_x509_crt_t crt = NULL;
    if (cred_issue(pub, ca->key, ca->crt, &p, &crt) < 0)
        return NULL;
    char *pem = crt_pem(crt);
    gnutls_x509_crt_deinit(crt);
    return pem;
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *body,
                             const char *retry_after)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), (void *)(uintptr_t)body,
                                                             MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (retry_after)
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, retry_after);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_error(struct MHD_Connection *conn, unsigned status, const char *code,
                                   const char *reason, const char *retry_after)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"error\":\"%s\",\"reason\":\"%s\"}", code, reason);
    return reply(conn, status, body, retry_after);
}

/* Public key of a PEM CSR whose signature verifies. */
static int csr_pubkey(const char *pem, gnutls_pubkey_t *pub)
{
    gnutls_x509_crq_t crq = NULL;
    gnutls_datum_t d = {(unsigned char *)(uintptr_t)pem, (unsigned)strlen(pem)};
    int r = gnutls_x509_crq_init(&crq);
    if (r >= 0)
        r = gnutls_x509_crq_import(crq, &d, GNUTLS_X509_FMT_PEM);
    if (r >= 0)
        r = gnutls_x509_crq_verify(crq, 0);
    if (r >= 0)
        r = gnutls_pubkey_init(pub);
    if (r >= 0)
        r = gnutls_pubkey_import_x509_crq(*pub, crq, 0);
    gnutls_x509_crq_deinit(crq);
    return r;
}

/* The answer to enroll and renew, shaped by the server's mode. */
static enum MHD_Result answer_cert(struct srv *s, struct MHD_Connection *conn, const char *user,
                                   const char *csr, const nid_t *keep_nid)
{
    int mode = atomic_load(&s->mode);
    if (mode == EM_401)
        return reply_error(conn, 401, "unauthorized", "unknown user or wrong password", NULL);
    if (mode == EM_429)
        return reply_error(conn, 429, "rate-limited", "too many failed attempts", "30");
    if (mode == EM_NOT_JSON)
        return reply(conn, 200, "hello", NULL);

    gnutls_pubkey_t pub = NULL;
    gnutls_x509_privkey_t k = NULL;
    if (csr_pubkey(csr, &pub) < 0) {
        gnutls_pubkey_deinit(pub);
        return reply_error(conn, 400, "bad-csr", "the CSR does not verify", NULL);
    }
    if (mode == EM_WRONG_KEY) {
        gnutls_pubkey_deinit(pub);
        pub = NULL;
        if (cred_keygen(&k) < 0 || cred_pubkey(k, &pub) < 0) {
            gnutls_x509_privkey_deinit(k);
            return reply_error(conn, 500, "internal", "keygen", NULL);
        }
        gnutls_x509_privkey_deinit(k);
    }
    char uri[256];
    snprintf(uri, sizeof(uri), "sip:%s@%s", mode == EM_WRONG_URI ? "mallory" : user, OVERLAY);
    nid_t nid;
    if (keep_nid && mode != EM_NEW_NODE_ID)
        nid = *keep_nid;
    else
        nid_random(&nid);
    struct testca *ca = mode == EM_OTHER_CA || mode == EM_OTHER_CA_QUIET ? s->other : s->ca;
    char *pem = issue(ca, pub, user, uri, mode == EM_NO_NODE_ID ? NULL : &nid, mode == EM_EXPIRED);
    gnutls_pubkey_deinit(pub);
    if (!pem)
        return reply_error(conn, 500, "internal", "issue", NULL);
    char *ca_pem =
        crt_pem(mode == EM_CA_MISMATCH || mode == EM_OTHER_CA ? s->other->crt : s->ca->crt);
    char hex[NID_HEX_LEN + 1];
    json_t *j =
        json_pack("{s:s, s:s, s:s, s:s, s:[s,s], s:s}", "certificate", pem, "ca_certificate",
                  ca_pem ? ca_pem : "", "uri", uri, "node_id", nid_to_hex(&nid, hex), "roles",
                  "node", "supernode", "not_after", "2030-01-01T00:00:00Z");
    if (mode == EM_NO_NODE_ID)
        json_object_del(j, "node_id");
    char *text = json_dumps(j, JSON_COMPACT);
    enum MHD_Result ret = reply(conn, 200, text, NULL);
    free(text);
    json_decref(j);
    free(ca_pem);
    free(pem);
    return ret;
}

static enum MHD_Result on_enroll(struct srv *s, struct MHD_Connection *conn, struct reqbody *b)
{
    atomic_fetch_add(&s->enroll_hits, 1);
    json_t *j = json_loadb(b->data ? b->data : "", b->len, JSON_REJECT_DUPLICATES, NULL);
    const char *user = json_string_value(json_object_get(j, "user"));
    const char *pw = json_string_value(json_object_get(j, "password"));
    const char *csr = json_string_value(json_object_get(j, "csr"));
    enum MHD_Result ret;
    if (!user || !pw || !csr) {
        ret = reply_error(conn, 400, "bad-json", "missing member", NULL);
    } else {
        pthread_mutex_lock(&s->lock);
        snprintf(s->user, sizeof(s->user), "%s", user);
        snprintf(s->password, sizeof(s->password), "%s", pw);
        pthread_mutex_unlock(&s->lock);
        ret = answer_cert(s, conn, user, csr, NULL);
    }
    json_decref(j);
    return ret;
}

static enum MHD_Result on_renew(struct srv *s, struct MHD_Connection *conn, struct reqbody *b)
{
    atomic_fetch_add(&s->renew_hits, 1);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    gnutls_session_t ses = ci ? (gnutls_session_t)ci->tls_session : NULL;
    unsigned n = 0;
    const gnutls_datum_t *peers = ses ? gnutls_certificate_get_peers(ses, &n) : NULL;
    gnutls_x509_crt_t crt = NULL;
    unsigned status = 1;
    struct peer_identity id;
    /* MEM_TRUST only asks for the certificate: verify it here. */
    if (!peers || n == 0 || gnutls_x509_crt_init(&crt) < 0 ||
        gnutls_x509_crt_import(crt, &peers[0], GNUTLS_X509_FMT_DER) < 0 ||
        gnutls_x509_crt_verify(crt, &s->ca->crt, 1, 0, &status) < 0 || status ||
        cred_identity(crt, &id) < 0 || !id.has_node_id) {
        gnutls_x509_crt_deinit(crt);
        return reply_error(conn, 401, "no-client-certificate", "no valid client certificate", NULL);
    }
    gnutls_x509_crt_deinit(crt);
    pthread_mutex_lock(&s->lock);
    s->renew_had_client_cert = true;
    pthread_mutex_unlock(&s->lock);
    json_t *j = json_loadb(b->data ? b->data : "", b->len, JSON_REJECT_DUPLICATES, NULL);
    const char *csr = json_string_value(json_object_get(j, "csr"));
    enum MHD_Result ret;
    /* The user is the URI's user part: sip:<user>@overlay. */
    char user[128] = "";
    sscanf(id.uri, "sip:%127[^@]", user);
    if (!csr)
        ret = reply_error(conn, 400, "bad-json", "missing csr", NULL);
    else
        ret = answer_cert(s, conn, user, csr, &id.node_id);
    json_decref(j);
    return ret;
}

static ssize_t chunked_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)cls;
    if (pos >= BIG)
        return MHD_CONTENT_READER_END_OF_STREAM;
    size_t n = max < BIG - pos ? max : (size_t)(BIG - pos);
    memset(buf, 'x', n);
    return (ssize_t)n;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    struct srv *s = cls;
    struct reqbody *b = *con_cls;
    (void)version;
    if (!b) {
        b = calloc(1, sizeof(*b));
        *con_cls = b;
        return b ? MHD_YES : MHD_NO;
    }
    if (*upload_size) {
        if (b->len + *upload_size > 65536) {
            b->too_big = true;
        } else {
            char *nd = realloc(b->data, b->len + *upload_size + 1);
            if (!nd)
                return MHD_NO;
            b->data = nd;
            memcpy(b->data + b->len, upload, *upload_size);
            b->len += *upload_size;
            b->data[b->len] = '\0';
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (b->too_big)
        return reply_error(conn, 413, "too-large", "body too large", NULL);
    if (!strcmp(url, "/v1/overlay") && !strcmp(method, "GET")) {
        atomic_fetch_add(&s->overlay_hits, 1);
        return reply(conn, 200, s->overlay_env ? s->overlay_env : "{}", NULL);
    }
    if (!strcmp(url, "/v1/enroll") && !strcmp(method, "POST"))
        return on_enroll(s, conn, b);
    if (!strcmp(url, "/v1/renew") && !strcmp(method, "POST"))
        return on_renew(s, conn, b);
    if (!strcmp(url, "/big")) {
        char *big = malloc(BIG + 1);
        if (!big)
            return MHD_NO;
        memset(big, 'x', BIG);
        big[BIG] = '\0';
        enum MHD_Result r = reply(conn, 200, big, NULL);
        free(big);
        return r;
    }
    if (!strcmp(url, "/chunked")) {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, chunked_reader, NULL, NULL);
        enum MHD_Result ret = MHD_queue_response(conn, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (!strcmp(url, "/echo") && !strcmp(method, "PUT"))
        return reply(conn, 200, b->data ? b->data : "", NULL);
    return reply_error(conn, 404, "not-found", "no such resource", NULL);
}

static void request_done(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct reqbody *b = *con_cls;
    (void)cls;
    (void)conn;
    (void)toe;
    if (b) {
        free(b->data);
        free(b);
        *con_cls = NULL;
    }
}

/*
 * A server certificate as the login server's own: issued by `ca`, with the
 * address `ip` as an IP subjectAltName (curl checks the URL's host against
 * it) and the given roles (ROLE_SERVICE for a real server; a node's roles for
 * a node posing as one). Made by hand, to control every field.
 */
static int make_server_cert(struct testca *ca, const char *ip, unsigned roles, char **key_pem,
                            char **cert_pem)
{
    const unsigned char roles_der[3] = {0x04, 0x01, (unsigned char)roles};
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    gnutls_privkey_t signer = NULL;
    gnutls_datum_t kp = {NULL, 0}, cp = {NULL, 0};
    unsigned char serial[8] = {0x42, 1, 2, 3, 4, 5, 6, 7};
    struct in_addr lo;
    time_t now = time(NULL);
    int r;

    inet_pton(AF_INET, ip, &lo);
    if ((r = cred_keygen(&key)) < 0 || (r = gnutls_x509_crt_init(&crt)) < 0 ||
        (r = gnutls_x509_crt_set_version(crt, 3)) < 0 ||
        (r = gnutls_x509_crt_set_serial(crt, serial, sizeof(serial))) < 0 ||
        (r = gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, "127.0.0.1", 9)) <
            0 ||
        (r = gnutls_x509_crt_set_key(crt, key)) < 0 ||
        (r = gnutls_x509_crt_set_activation_time(crt, now - 60)) < 0 ||
        (r = gnutls_x509_crt_set_expiration_time(crt, now + 3600)) < 0 ||
        (r = gnutls_x509_crt_set_basic_constraints(crt, 0, -1)) < 0 ||
        (r = gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE)) < 0 ||
        (r = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0)) < 0 ||
        (r = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, &lo, 4,
                                                  GNUTLS_FSAN_SET)) < 0 ||
        (r = gnutls_x509_crt_set_extension_by_oid(crt, P2P_OID_ROLES, roles_der, sizeof(roles_der),
                                                  0)) < 0 ||
        (r = gnutls_privkey_init(&signer)) < 0 ||
        (r = gnutls_privkey_import_x509(signer, ca->key, 0)) < 0 ||
        (r = gnutls_x509_crt_privkey_sign(crt, ca->crt, signer, GNUTLS_DIG_SHA512, 0)) < 0 ||
        (r = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &cp)) < 0 ||
        (r = gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN,
                                               &kp)) < 0)
        goto out;
    *key_pem = strndup((const char *)kp.data, kp.size);
    *cert_pem = strndup((const char *)cp.data, cp.size);
out:
    gnutls_free(kp.data);
    gnutls_free(cp.data);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
    return r < 0 ? -1 : 0;
}

static int srv_start(struct srv *s, struct testca *cert_ca, const char *cert_ip, unsigned roles,
                     struct testca *ca, struct testca *other)
{
    memset(s, 0, sizeof(*s));
    pthread_mutex_init(&s->lock, NULL);
    s->ca = ca;
    s->other = other;
    if (make_server_cert(cert_ca, cert_ip, roles, &s->key_pem, &s->cert_pem) < 0 ||
        !(s->trust_pem = crt_pem(ca->crt)))
        return -1;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    s->d =
        MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_TLS, 0, NULL, NULL, handler, s,
                         MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa, MHD_OPTION_HTTPS_MEM_KEY,
                         s->key_pem, MHD_OPTION_HTTPS_MEM_CERT, s->cert_pem,
                         MHD_OPTION_HTTPS_MEM_TRUST, s->trust_pem, MHD_OPTION_NOTIFY_COMPLETED,
                         request_done, s, MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (!s->d)
        return -1;
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    if (!di || !di->port)
        return -1;
    s->port = di->port;
    snprintf(s->base, sizeof(s->base), "https://127.0.0.1:%d", s->port);
    return 0;
}

static void srv_stop(struct srv *s)
{
    if (s->d)
        MHD_stop_daemon(s->d);
    s->d = NULL;
    free(s->key_pem);
    free(s->cert_pem);
    free(s->trust_pem);
    pthread_mutex_destroy(&s->lock);
}

/* ---- Fixture ------------------------------------------------------------------------------ */

struct fixture {
    struct testca ca, other;
    struct srv good;
    struct srv alien;    /* server certificate from the other CA */
    struct srv misnamed; /* server certificate from our CA, but for 127.0.0.2 */
    struct srv imposter; /* a node certificate from our CA, for 127.0.0.1, posing as a server */
    char pin[OVERLAY_PIN_LEN];
    char *envelope;
    int silent_fd; /* listens, never accepts */
    int silent_port;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    *state = f;
    f->silent_fd = -1;
    signal(SIGPIPE, SIG_IGN);
    if (testca_init(&f->ca) < 0 || testca_init(&f->other) < 0)
        return -1;
    if (srv_start(&f->good, &f->ca, "127.0.0.1", ROLE_SERVICE, &f->ca, &f->other) < 0 ||
        srv_start(&f->alien, &f->other, "127.0.0.1", ROLE_SERVICE, &f->ca, &f->other) < 0 ||
        srv_start(&f->misnamed, &f->ca, "127.0.0.2", ROLE_SERVICE, &f->ca, &f->other) < 0 ||
        srv_start(&f->imposter, &f->ca, "127.0.0.1", ROLE_NODE | ROLE_SUPERNODE, &f->ca,
                  &f->other) < 0)
        return -1;
    if (overlay_doc_pin(f->ca.crt, f->pin) < 0)
        return -1;

    char *ca_pem = crt_pem(f->ca.crt);
    char *login[1] = {f->good.base};
    struct overlay_doc d;
    memset(&d, 0, sizeof(d));
    overlay_doc_defaults(&d);
    d.overlay = OVERLAY;
    d.sequence = 7;
    d.issued_at = "2026-11-21T20:40:00Z";
    d.ca_cert_pem = ca_pem;
    d.login_urls = login;
    d.n_login_urls = 1;
    d.lan_discovery = "239.255.42.99:7077";
    char *text = overlay_doc_build(&d);
    int r = text ? overlay_doc_sign(f->ca.key, text, &f->envelope) : -1;
    free(text);
    free(ca_pem);
    if (r < 0)
        return -1;
    f->good.overlay_env = f->envelope;
    f->alien.overlay_env = f->envelope;
    f->misnamed.overlay_env = f->envelope;
    f->imposter.overlay_env = f->envelope;

    /* A listener nobody accepts on: TCP connects (backlog), TLS never answers. */
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    f->silent_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (f->silent_fd < 0 || bind(f->silent_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        listen(f->silent_fd, 8) < 0 || getsockname(f->silent_fd, (struct sockaddr *)&sa, &sl) < 0)
        return -1;
    f->silent_port = ntohs(sa.sin_port);
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    if (!f)
        return 0;
    srv_stop(&f->good);
    srv_stop(&f->alien);
    srv_stop(&f->misnamed);
    srv_stop(&f->imposter);
    if (f->silent_fd >= 0)
        close(f->silent_fd);
    free(f->envelope);
    testca_cleanup(&f->ca);
    testca_cleanup(&f->other);
    free(f);
    http_global_cleanup();
    return 0;
}

/* ---- Loop harness ------------------------------------------------------------------------- */

struct run {
    struct ev_loop *loop;
    struct http_client *client;
    ev_timer safety;
    bool timed_out;
    int want, done;
    /* http results (last one) */
    enum http_error kind;
    long status;
    char error[1024];
    char *body;
    size_t body_len;
    double retry_after;
    int cancelled;
    /* login results */
    bool ok;
    char code[64];
    char *cert_pem;
    struct peer_identity id;
    struct overlay_doc doc;
    char *envelope;
};

static void on_safety(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct run *r = w->data;
    (void)revents;
    r->timed_out = true;
    ev_break(loop, EVBREAK_ALL);
}

static void run_init(struct run *r)
{
    memset(r, 0, sizeof(*r));
    r->loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(r->loop);
    r->client = http_client_new(r->loop);
    assert_non_null(r->client);
    ev_timer_init(&r->safety, on_safety, SAFETY, 0.0);
    r->safety.data = r;
}

/* Runs the loop until `want` callbacks have come (or the safety timer fires: a failure). */
static void run_wait(struct run *r, int want)
{
    r->want = want;
    if (r->done < want) {
        ev_timer_start(r->loop, &r->safety);
        ev_run(r->loop, 0);
        ev_timer_stop(r->loop, &r->safety);
    }
    assert_false(r->timed_out);
    assert_int_equal(r->done, want);
}

static void run_free(struct run *r)
{
    http_client_free(r->client);
    ev_loop_destroy(r->loop);
    free(r->body);
    free(r->cert_pem);
    free(r->envelope);
    overlay_doc_free(&r->doc);
}

static void note_done(struct run *r)
{
    r->done++;
    if (r->done >= r->want)
        ev_break(r->loop, EVBREAK_ALL);
}

static void http_cb(const struct http_response *resp, void *ud)
{
    struct run *r = ud;
    r->kind = resp->kind;
    r->status = resp->status;
    snprintf(r->error, sizeof(r->error), "%s", resp->error ? resp->error : "");
    free(r->body);
    r->body = malloc(resp->body_len + 1);
    memcpy(r->body, resp->body, resp->body_len + 1); /* NUL included: it must be there */
    r->body_len = resp->body_len;
    r->retry_after = resp->retry_after_s;
    if (resp->kind == HTTP_ERR_CANCELLED)
        r->cancelled++;
    note_done(r);
}

static void overlay_cb(struct login_overlay_result *res, void *ud)
{
    struct run *r = ud;
    r->ok = res->error == NULL;
    r->status = res->http_status;
    snprintf(r->error, sizeof(r->error), "%s", res->error ? res->error : "");
    if (res->doc) {
        r->doc = *res->doc; /* move it out */
        memset(res->doc, 0, sizeof(*res->doc));
        r->envelope = strndup(res->envelope, res->envelope_len);
    }
    note_done(r);
}

static void cert_cb(const struct login_cert_result *res, void *ud)
{
    struct run *r = ud;
    r->ok = res->error == NULL;
    r->status = res->http_status;
    r->retry_after = res->retry_after_s;
    snprintf(r->error, sizeof(r->error), "%s", res->error ? res->error : "");
    snprintf(r->code, sizeof(r->code), "%s", res->code ? res->code : "");
    if (res->error) {
        assert_null(res->cert_pem);
        assert_null(res->cert);
    } else {
        assert_non_null(res->cert);
        assert_non_null(res->ca_pem);
        r->cert_pem = strdup(res->cert_pem);
        r->id = res->id;
    }
    note_done(r);
}

static void expect_error(const struct run *r, const char *needle)
{
    if (!strstr(r->error, needle))
        print_error("error \"%s\" lacks \"%s\"\n", r->error, needle);
    assert_non_null(strstr(r->error, needle));
}

/* ---- Overlay document --------------------------------------------------------------------- */

static void test_fetch_overlay(void **state)
{
    struct fixture *f = *state;
    struct run r;
    char err[256] = "";
    run_init(&r);
    assert_int_equal(
        login_fetch_overlay(r.client, f->good.base, f->pin, 0, overlay_cb, &r, err, sizeof(err)),
        0);
    assert_int_equal(r.done, 0); /* never from inside the start call */
    run_wait(&r, 1);
    assert_true(r.ok);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.doc.overlay, OVERLAY);
    assert_int_equal(r.doc.sequence, 7);
    assert_string_equal(r.doc.pin, f->pin);
    assert_string_equal(r.doc.login_urls[0], f->good.base);
    assert_string_equal(r.envelope, f->envelope); /* as received, for overlay.json */

    /* A trailing slash on the base URL is fine. */
    char base[80];
    snprintf(base, sizeof(base), "%s/", f->good.base);
    overlay_doc_free(&r.doc);
    free(r.envelope);
    r.envelope = NULL;
    assert_int_equal(
        login_fetch_overlay(r.client, base, f->pin, 7, overlay_cb, &r, err, sizeof(err)), 0);
    run_wait(&r, 2);
    assert_true(r.ok);
    run_free(&r);
}

static void test_fetch_overlay_refused(void **state)
{
    struct fixture *f = *state;
    struct run r;
    char err[256] = "", other_pin[OVERLAY_PIN_LEN];
    run_init(&r);
    assert_int_equal(overlay_doc_pin(f->other.crt, other_pin), 0);

    /* Wrong pin: the document is fetched but refused. */
    assert_int_equal(
        login_fetch_overlay(r.client, f->good.base, other_pin, 0, overlay_cb, &r, err, sizeof(err)),
        0);
    run_wait(&r, 1);
    assert_false(r.ok);
    assert_null(r.doc.overlay);
    expect_error(&r, "overlay fetch https://127.0.0.1:");
    expect_error(&r, "CA certificate does not match the pin");

    /* Rollback. */
    assert_int_equal(
        login_fetch_overlay(r.client, f->good.base, f->pin, 8, overlay_cb, &r, err, sizeof(err)),
        0);
    run_wait(&r, 2);
    assert_false(r.ok);
    expect_error(&r, "rollback: document sequence 7 is older than 8 already seen");

    /* A 404 with the protocol's error body. */
    char base[80];
    snprintf(base, sizeof(base), "%s/nothing", f->good.base);
    assert_int_equal(
        login_fetch_overlay(r.client, base, f->pin, 0, overlay_cb, &r, err, sizeof(err)), 0);
    run_wait(&r, 3);
    assert_false(r.ok);
    assert_int_equal(r.status, 404);
    expect_error(&r, "404 not-found: no such resource");

    /* Bad arguments fail at once, with a reason and no callback. */
    assert_int_equal(login_fetch_overlay(r.client, f->good.base, "sha256:abc", 0, overlay_cb, &r,
                                         err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "pin"));
    assert_int_equal(login_fetch_overlay(r.client, "http://127.0.0.1:1", f->pin, 0, overlay_cb, &r,
                                         err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(r.done, 3);
    run_free(&r);
}

/* ---- Enroll ------------------------------------------------------------------------------- */

static void enroll(struct fixture *f, struct run *r, struct srv *s, int mode,
                   gnutls_x509_privkey_t key, int n)
{
    char err[256] = "";
    atomic_store(&s->mode, mode);
    assert_int_equal(login_enroll(r->client, s->base, f->ca.ca_file, OVERLAY, "alice",
                                  "correct horse", NULL, key, cert_cb, r, err, sizeof(err)),
                     0);
    run_wait(r, n);
}

static void test_enroll_ok(void **state)
{
    struct fixture *f = *state;
    struct run r;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    run_init(&r);
    int hits = atomic_load(&f->good.enroll_hits);
    enroll(f, &r, &f->good, EM_OK, key, 1);
    if (!r.ok)
        print_error("%s\n", r.error);
    assert_true(r.ok);
    assert_int_equal(r.status, 200);
    assert_int_equal(atomic_load(&f->good.enroll_hits), hits + 1);
    pthread_mutex_lock(&f->good.lock);
    assert_string_equal(f->good.user, "alice");
    assert_string_equal(f->good.password, "correct horse");
    pthread_mutex_unlock(&f->good.lock);
    assert_string_equal(r.id.uri, "sip:alice@" OVERLAY);
    assert_true(r.id.has_node_id);
    assert_int_equal(r.id.roles, ROLE_NODE | ROLE_SUPERNODE);
    assert_non_null(strstr(r.cert_pem, "BEGIN CERTIFICATE"));

    /* What a node does next: keep it all in its state directory, and read it back. */
    char dir[400], err[512] = "";
    snprintf(dir, sizeof(dir), "%s/enrolled-state", f->ca.dir);
    char *ca_pem = crt_pem(f->ca.crt);
    assert_int_equal(
        node_creds_save(dir, key, r.cert_pem, ca_pem, f->envelope, f->pin, err, sizeof(err)), 0);
    struct node_creds c;
    assert_int_equal(node_creds_load(dir, &c, err, sizeof(err)), 0);
    assert_string_equal(c.id.uri, "sip:alice@" OVERLAY);
    assert_true(nid_eq(&c.id.node_id, &r.id.node_id));
    node_creds_free(&c);
    static const char *const names[] = {NODE_CREDS_KEY, NODE_CREDS_CERT, NODE_CREDS_CA,
                                        NODE_CREDS_OVERLAY, NODE_CREDS_PIN};
    for (size_t i = 0; i < 5; i++) {
        char p[600];
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
    free(ca_pem);
    run_free(&r);
    gnutls_x509_privkey_deinit(key);
}

static void test_enroll_bad_certificate(void **state)
{
    struct fixture *f = *state;
    static const struct {
        int mode;
        const char *needle;
    } cases[] = {
        {EM_WRONG_KEY, "certificate refused: its public key is not ours"},
        {EM_WRONG_URI,
         "certificate refused: it states the URI \"sip:mallory@test.example\", expected "
         "\"sip:alice@test.example\""},
        {EM_NO_NODE_ID, "certificate refused: it carries no Node-ID"},
        {EM_OTHER_CA, "the response's \"ca_certificate\" is not our CA"},
        {EM_OTHER_CA_QUIET,
         "certificate refused: it does not verify against our CA: not issued by our CA"},
        {EM_EXPIRED, "certificate refused: it does not verify against our CA: expired"},
        {EM_CA_MISMATCH, "the response's \"ca_certificate\" is not our CA"},
        {EM_NOT_JSON, "the response is not a JSON object"},
    };
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    struct run r;
    run_init(&r);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        enroll(f, &r, &f->good, cases[i].mode, key, (int)i + 1);
        assert_false(r.ok);
        assert_int_equal(r.status, 200);
        expect_error(&r, "enroll https://127.0.0.1:");
        expect_error(&r, cases[i].needle);
    }
    run_free(&r);
    gnutls_x509_privkey_deinit(key);
}

static void test_enroll_http_errors(void **state)
{
    struct fixture *f = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    struct run r;
    run_init(&r);

    enroll(f, &r, &f->good, EM_401, key, 1);
    assert_false(r.ok);
    assert_int_equal(r.status, 401);
    assert_string_equal(r.code, "unauthorized");
    expect_error(&r, "401 unauthorized: unknown user or wrong password");

    enroll(f, &r, &f->good, EM_429, key, 2);
    assert_false(r.ok);
    assert_int_equal(r.status, 429);
    assert_string_equal(r.code, "rate-limited");
    assert_true(r.retry_after > 29.9 && r.retry_after < 30.1);
    expect_error(&r, "429 rate-limited: too many failed attempts (retry after 30 s)");
    run_free(&r);
    gnutls_x509_privkey_deinit(key);
}

/*
 * Item 10 of issue 15: a node of the overlay (its certificate from our CA,
 * even with the right address in it) poses as the login server. The handshake
 * verifies, but the certificate lacks the service role: the client stops
 * before sending anything, so the password never reaches it.
 */
static void test_enroll_node_posing_as_server(void **state)
{
    struct fixture *f = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    struct run r;
    run_init(&r);
    int before = atomic_load(&f->imposter.enroll_hits);
    enroll(f, &r, &f->imposter, EM_OK, key, 1);
    assert_false(r.ok);
    assert_int_equal(r.status, 0);
    expect_error(&r,
                 "TLS: server certificate refused: it is no service certificate of the overlay");
    assert_int_equal(atomic_load(&f->imposter.enroll_hits), before);
    pthread_mutex_lock(&f->imposter.lock);
    assert_string_equal(f->imposter.password, "");
    pthread_mutex_unlock(&f->imposter.lock);

    /* Any verified request (a bootstrap list, too) is refused the same way. */
    char url[128];
    snprintf(url, sizeof(url), "%s/v1/overlay", f->imposter.base);
    struct http_request q = {.url = url, .ca_file = f->ca.ca_file};
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    run_wait(&r, 2);
    assert_int_equal(r.kind, HTTP_ERR_TLS);
    assert_non_null(strstr(r.error, "no service certificate"));
    assert_int_equal(atomic_load(&f->imposter.overlay_hits), 0);
    run_free(&r);
    gnutls_x509_privkey_deinit(key);
}

static void test_enroll_server_from_other_ca(void **state)
{
    struct fixture *f = *state;
    gnutls_x509_privkey_t key = NULL;
    assert_int_equal(cred_keygen(&key), 0);
    struct run r;
    run_init(&r);
    int before = atomic_load(&f->alien.enroll_hits);
    enroll(f, &r, &f->alien, EM_OK, key, 1);
    assert_false(r.ok);
    assert_int_equal(r.status, 0);
    expect_error(&r, "TLS: server certificate verify failed");
    /* The handshake failed, so no request (and no password) ever reached that server. */
    assert_int_equal(atomic_load(&f->alien.enroll_hits), before);
    pthread_mutex_lock(&f->alien.lock);
    assert_string_equal(f->alien.password, "");
    pthread_mutex_unlock(&f->alien.lock);

    /* The same server is fine for the unverified overlay fetch (the pin authenticates). */
    char err[256];
    assert_int_equal(
        login_fetch_overlay(r.client, f->alien.base, f->pin, 0, overlay_cb, &r, err, sizeof(err)),
        0);
    run_wait(&r, 2);
    assert_true(r.ok);

    /* And after that insecure fetch, enroll to it still fails: nothing unverified is reused. */
    enroll(f, &r, &f->alien, EM_OK, key, 3);
    assert_false(r.ok);
    expect_error(&r, "TLS: server certificate verify failed");
    assert_int_equal(atomic_load(&f->alien.enroll_hits), before);

    /* A CA file that does not exist fails at once. */
    assert_true(login_enroll(r.client, f->good.base, "/nonexistent/ca.pem", OVERLAY, "alice", "pw",
                             NULL, key, cert_cb, &r, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "cannot read CA file /nonexistent/ca.pem"));
    run_free(&r);
    gnutls_x509_privkey_deinit(key);
}

/* ---- Renew -------------------------------------------------------------------------------- */

static void test_renew(void **state)
{
    struct fixture *f = *state;
    struct testca_cert old;
    assert_int_equal(testca_issue(&f->ca, "alice", TESTCA_GOOD, &old), 0);
    gnutls_x509_privkey_t fresh = NULL;
    assert_int_equal(cred_keygen(&fresh), 0);
    struct run r;
    char err[256] = "";
    run_init(&r);

    atomic_store(&f->good.mode, EM_OK);
    assert_int_equal(login_renew(r.client, f->good.base, f->ca.ca_file, old.cert_file, old.key_file,
                                 fresh, cert_cb, &r, err, sizeof(err)),
                     0);
    run_wait(&r, 1);
    if (!r.ok)
        print_error("%s\n", r.error);
    assert_true(r.ok);
    pthread_mutex_lock(&f->good.lock);
    assert_true(f->good.renew_had_client_cert);
    pthread_mutex_unlock(&f->good.lock);
    assert_string_equal(r.id.uri, old.uri);
    assert_true(nid_eq(&r.id.node_id, &old.node_id));

    /* A server that hands out another Node-ID on renewal is refused. */
    atomic_store(&f->good.mode, EM_NEW_NODE_ID);
    assert_int_equal(login_renew(r.client, f->good.base, f->ca.ca_file, old.cert_file, old.key_file,
                                 fresh, cert_cb, &r, err, sizeof(err)),
                     0);
    run_wait(&r, 2);
    assert_false(r.ok);
    expect_error(&r, "renew https://127.0.0.1:");
    expect_error(&r, "differs from the current");

    /* The new certificate must be for the new key, not the old one. */
    gnutls_x509_privkey_t oldkey = NULL;
    assert_int_equal(cred_key_load(&oldkey, old.key_file), 0);
    atomic_store(&f->good.mode, EM_WRONG_KEY);
    assert_int_equal(login_renew(r.client, f->good.base, f->ca.ca_file, old.cert_file, old.key_file,
                                 fresh, cert_cb, &r, err, sizeof(err)),
                     0);
    run_wait(&r, 3);
    assert_false(r.ok);
    expect_error(&r, "its public key is not ours");

    /* A certificate without a Node-ID cannot be renewed. */
    struct testca_cert noid;
    assert_int_equal(testca_issue(&f->ca, "noid", TESTCA_NO_ROLES, &noid), 0);
    assert_int_equal(login_renew(r.client, f->good.base, f->ca.ca_file, noid.cert_file,
                                 noid.key_file, fresh, cert_cb, &r, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "has no Node-ID"));
    gnutls_x509_privkey_deinit(oldkey);
    gnutls_x509_privkey_deinit(fresh);
    run_free(&r);
}

static void test_renew_due(void **state)
{
    struct fixture *f = *state;
    time_t t0 = time(NULL) - 1000;
    struct cred_issue_params p = {
        .cn = "due",
        .uri = "sip:due@" OVERLAY,
        .server_auth = true,
        .client_auth = true,
        .not_before = t0,
        .not_after = t0 + 3000,
    };
    struct testca_cert tc;
    gnutls_x509_crt_t crt = NULL;
    assert_int_equal(testca_issue_params(&f->ca, "due", &p, &tc), 0);
    assert_int_equal(cred_cert_load(&crt, tc.cert_file), 0);
    assert_false(login_renew_due(crt, t0 - 10));
    assert_false(login_renew_due(crt, t0));
    assert_false(login_renew_due(crt, t0 + 1000));
    assert_false(login_renew_due(crt, t0 + 1999));
    assert_true(login_renew_due(crt, t0 + 2000)); /* two thirds */
    assert_true(login_renew_due(crt, t0 + 2999));
    assert_true(login_renew_due(crt, t0 + 3000));
    assert_true(login_renew_due(crt, t0 + 100000)); /* expired */
    gnutls_x509_crt_deinit(crt);
}

/* ---- State directory ---------------------------------------------------------------------- */

static void check_mode(const char *path, mode_t want)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    if ((st.st_mode & 0777) != want)
        print_error("%s has mode %03o, expected %03o\n", path, st.st_mode & 0777, want);
    assert_int_equal(st.st_mode & 0777, want);
}

static char *slurp(const char *path)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char *buf = calloc(1, 65536);
    size_t n = fread(buf, 1, 65535, fp);
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

static void spit(const char *path, const char *text)
{
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

static void test_creds_roundtrip(void **state)
{
    struct fixture *f = *state;
    struct testca_cert tc, tc2;
    gnutls_x509_privkey_t key = NULL, key2 = NULL;
    assert_int_equal(testca_issue(&f->ca, "bob", TESTCA_GOOD, &tc), 0);
    assert_int_equal(testca_issue(&f->ca, "carol", TESTCA_GOOD, &tc2), 0);
    assert_int_equal(cred_key_load(&key, tc.key_file), 0);
    assert_int_equal(cred_key_load(&key2, tc2.key_file), 0);
    char *cert_pem = slurp(tc.cert_file);
    char *cert2_pem = slurp(tc2.cert_file);
    char *ca_pem = crt_pem(f->ca.crt);
    char *other_pem = crt_pem(f->other.crt);

    char parent[400], dir[420], err[512] = "", p[600];
    snprintf(parent, sizeof(parent), "%s/state", f->ca.dir);
    snprintf(dir, sizeof(dir), "%s/node", parent);
    mode_t old_umask = umask(0); /* the modes must not depend on the umask */
    int r = node_creds_save(dir, key, cert_pem, ca_pem, f->envelope, f->pin, err, sizeof(err));
    umask(old_umask);
    if (r < 0)
        print_error("%s\n", err);
    assert_int_equal(r, 0);
    check_mode(parent, 0700);
    check_mode(dir, 0700);
    static const char *const names[] = {NODE_CREDS_KEY, NODE_CREDS_CERT, NODE_CREDS_CA,
                                        NODE_CREDS_OVERLAY, NODE_CREDS_PIN};
    for (size_t i = 0; i < 5; i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        check_mode(p, 0600);
    }
    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_OVERLAY);
    char *stored = slurp(p);
    assert_string_equal(stored, f->envelope); /* as received, byte for byte */
    free(stored);

    struct node_creds c;
    assert_int_equal(node_creds_load(dir, &c, err, sizeof(err)), 0);
    assert_string_equal(c.pin, f->pin);
    assert_string_equal(c.cert_pem, cert_pem);
    assert_string_equal(c.ca_pem, ca_pem);
    assert_string_equal(c.overlay_envelope, f->envelope);
    assert_string_equal(c.doc.overlay, OVERLAY);
    assert_string_equal(c.id.uri, tc.uri);
    assert_true(nid_eq(&c.id.node_id, &tc.node_id));
    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_KEY);
    assert_string_equal(c.key_file, p);
    node_creds_free(&c);
    node_creds_free(&c); /* zeroed: twice is fine */
    node_creds_free(NULL);

    /* Saving again (renewal) replaces the files in place. */
    assert_int_equal(
        node_creds_save(dir, key2, cert2_pem, ca_pem, f->envelope, f->pin, err, sizeof(err)), 0);
    assert_int_equal(node_creds_load(dir, &c, err, sizeof(err)), 0);
    assert_string_equal(c.id.uri, tc2.uri);
    node_creds_free(&c);

    /* Inconsistent sets are refused before anything is written. */
    assert_true(
        node_creds_save(dir, key, cert2_pem, ca_pem, f->envelope, f->pin, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "does not match the key"));
    assert_true(node_creds_save(dir, key2, cert2_pem, other_pem, f->envelope, f->pin, err,
                                sizeof(err)) < 0);
    assert_non_null(strstr(err, "CA certificate does not match the pin"));
    char other_pin[OVERLAY_PIN_LEN];
    assert_int_equal(overlay_doc_pin(f->other.crt, other_pin), 0);
    assert_true(node_creds_save(dir, key2, cert2_pem, ca_pem, f->envelope, other_pin, err,
                                sizeof(err)) < 0);
    assert_non_null(strstr(err, "does not match the pin"));
    assert_int_equal(node_creds_load(dir, &c, err, sizeof(err)), 0); /* untouched */
    assert_string_equal(c.id.uri, tc2.uri);
    node_creds_free(&c);

    /* Damage on disk is found on load, naming the file. */
    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_CERT);
    spit(p, cert_pem); /* bob's certificate next to carol's key: an interrupted save */
    assert_true(node_creds_load(dir, &c, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "does not match"));
    assert_non_null(strstr(err, NODE_CREDS_CERT));
    assert_null(c.key);
    spit(p, cert2_pem);

    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_OVERLAY);
    char *tampered = strdup(f->envelope);
    char *seq = strstr(tampered, "\\\"sequence\\\":7");
    assert_non_null(seq);
    seq[strlen("\\\"sequence\\\":")] = '9';
    spit(p, tampered);
    assert_true(node_creds_load(dir, &c, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, NODE_CREDS_OVERLAY));
    assert_non_null(strstr(err, "signature does not verify"));
    spit(p, f->envelope);
    free(tampered);

    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_CA);
    spit(p, other_pem);
    assert_true(node_creds_load(dir, &c, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "does not hold the pinned CA certificate"));
    spit(p, ca_pem);

    snprintf(p, sizeof(p), "%s/%s", dir, NODE_CREDS_PIN);
    unlink(p);
    assert_true(node_creds_load(dir, &c, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "cannot read"));
    assert_non_null(strstr(err, NODE_CREDS_PIN));

    for (size_t i = 0; i < 5; i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
    rmdir(parent);
    free(cert_pem);
    free(cert2_pem);
    free(ca_pem);
    free(other_pem);
    gnutls_x509_privkey_deinit(key);
    gnutls_x509_privkey_deinit(key2);
}

/* ---- http_client itself ------------------------------------------------------------------- */

static void test_http_bad_requests(void **state)
{
    struct fixture *f = *state;
    struct run r;
    run_init(&r);
    char url[128];
    snprintf(url, sizeof(url), "%s/v1/overlay", f->good.base);
    struct http_request q = {.url = url};
    /* Neither a CA nor insecure: refused rather than trusting the system CAs. */
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), -EINVAL);
    q.ca_file = f->ca.ca_file;
    q.insecure = true;
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), -EINVAL);
    q.insecure = false;
    q.url = "http://127.0.0.1:1/";
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), -EINVAL);
    q.url = NULL;
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), -EINVAL);
    assert_int_equal(http_client_pending(r.client), 0);

    /* A verified GET and a PUT with a body, with the CA. */
    q.url = url;
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    assert_int_equal(http_client_pending(r.client), 1);
    run_wait(&r, 1);
    assert_int_equal(r.kind, HTTP_OK);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, f->envelope);

    char echo[128];
    snprintf(echo, sizeof(echo), "%s/echo", f->good.base);
    struct http_request put = {.method = "PUT",
                               .url = echo,
                               .body = "{\"a\":1}",
                               .body_len = 7,
                               .content_type = "application/json",
                               .ca_file = f->ca.ca_file};
    assert_int_equal(http_request_start(r.client, &put, http_cb, &r), 0);
    run_wait(&r, 2);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "{\"a\":1}");

    /* The host name is checked: a certificate from our CA, but for 127.0.0.2, is refused. */
    char misnamed[128];
    snprintf(misnamed, sizeof(misnamed), "%s/v1/overlay", f->misnamed.base);
    q.url = misnamed;
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    run_wait(&r, 3);
    assert_int_equal(r.kind, HTTP_ERR_TLS);
    assert_non_null(strstr(r.error, "TLS: server certificate verify failed"));
    assert_int_equal(r.status, 0);
    run_free(&r);
}

static void test_http_too_large(void **state)
{
    struct fixture *f = *state;
    struct run r;
    run_init(&r);
    static const char *const paths[] = {"/big", "/chunked"}; /* with and without Content-Length */
    for (int i = 0; i < 2; i++) {
        char url[128];
        snprintf(url, sizeof(url), "%s%s", f->good.base, paths[i]);
        struct http_request q = {.url = url, .ca_file = f->ca.ca_file, .max_response = 1000};
        assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
        run_wait(&r, 2 * i + 1);
        assert_int_equal(r.kind, HTTP_ERR_TOO_LARGE);
        assert_string_equal(r.error, "response larger than 1000 bytes refused");
        assert_int_equal(r.body_len, 0);

        /* Exactly the limit is fine. */
        q.max_response = BIG;
        assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
        run_wait(&r, 2 * i + 2);
        assert_int_equal(r.kind, HTTP_OK);
        assert_int_equal(r.body_len, BIG);
    }
    run_free(&r);
}

static void test_http_timeout(void **state)
{
    struct fixture *f = *state;
    struct run r;
    run_init(&r);
    char url[128];
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/v1/overlay", f->silent_port);
    struct http_request q = {.url = url, .insecure = true, .timeout_ms = 500};
    ev_tstamp t0 = ev_time();
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    run_wait(&r, 1);
    ev_tstamp took = ev_time() - t0;
    assert_int_equal(r.kind, HTTP_ERR_TIMEOUT);
    assert_string_equal(r.error, "timed out after 500 ms");
    assert_true(took >= 0.45);
    assert_true(took < 3.0);

    /* Nothing listening at all: a connect error, at once. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd); /* the port is now (very likely) closed */
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/", ntohs(sa.sin_port));
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    run_wait(&r, 2);
    assert_int_equal(r.kind, HTTP_ERR_CONNECT);
    assert_non_null(strstr(r.error, "cannot connect"));
    run_free(&r);
}

static void test_http_cancel_on_free(void **state)
{
    struct fixture *f = *state;
    struct run r;
    run_init(&r);
    char url[128];
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/", f->silent_port);
    struct http_request q = {.url = url, .insecure = true, .timeout_ms = 5000};
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    assert_int_equal(http_request_start(r.client, &q, http_cb, &r), 0);
    /* Let them get under way (connected, waiting for TLS), then free the client. */
    ev_timer t;
    ev_timer_init(&t, on_safety, 0.2, 0.0);
    t.data = &r;
    ev_timer_start(r.loop, &t);
    ev_run(r.loop, 0);
    r.timed_out = false;
    assert_int_equal(r.done, 0);
    r.want = 100;
    http_client_free(r.client);
    r.client = NULL;
    assert_int_equal(r.done, 2);
    assert_int_equal(r.cancelled, 2);
    assert_string_equal(r.error, "cancelled");
    /*
     * Nothing of the client is left on the loop: with the (unref'd) timer as
     * the only watcher, ev_run returns at once rather than when it fires.
     */
    ev_timer_stop(r.loop, &t);
    ev_timer_set(&t, 2.0, 0.0);
    ev_timer_start(r.loop, &t);
    ev_unref(r.loop);
    ev_tstamp t0 = ev_time();
    ev_run(r.loop, 0);
    assert_true(ev_time() - t0 < 1.0);
    ev_ref(r.loop);
    ev_timer_stop(r.loop, &t);
    run_free(&r);
}

/* Freeing the client from inside a done callback cancels the rest, safely. */
static struct run *free_run;
static void free_in_cb(const struct http_response *resp, void *ud)
{
    http_cb(resp, ud);
    if (free_run->client) {
        struct http_client *c = free_run->client;
        free_run->client = NULL;
        http_client_free(c);
        /* Starting new work on a client being freed is refused. */
        struct http_request q = {.url = "https://127.0.0.1:1/", .insecure = true};
        assert_int_equal(http_request_start(c, &q, http_cb, ud), -ESHUTDOWN);
    }
}

static void test_http_free_in_callback(void **state)
{
    struct fixture *f = *state;
    struct run r;
    run_init(&r);
    free_run = &r;
    char fast[128], slow[128];
    snprintf(fast, sizeof(fast), "%s/v1/overlay", f->good.base);
    snprintf(slow, sizeof(slow), "https://127.0.0.1:%d/", f->silent_port);
    struct http_request qf = {.url = fast, .ca_file = f->ca.ca_file};
    struct http_request qs = {.url = slow, .insecure = true, .timeout_ms = 5000};
    assert_int_equal(http_request_start(r.client, &qs, free_in_cb, &r), 0);
    assert_int_equal(http_request_start(r.client, &qf, free_in_cb, &r), 0);
    run_wait(&r, 2);
    assert_null(r.client);
    assert_int_equal(r.cancelled, 1);
    run_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fetch_overlay),
        cmocka_unit_test(test_fetch_overlay_refused),
        cmocka_unit_test(test_enroll_ok),
        cmocka_unit_test(test_enroll_bad_certificate),
        cmocka_unit_test(test_enroll_http_errors),
        cmocka_unit_test(test_enroll_server_from_other_ca),
        cmocka_unit_test(test_enroll_node_posing_as_server),
        cmocka_unit_test(test_renew),
        cmocka_unit_test(test_renew_due),
        cmocka_unit_test(test_creds_roundtrip),
        cmocka_unit_test(test_http_bad_requests),
        cmocka_unit_test(test_http_too_large),
        cmocka_unit_test(test_http_timeout),
        cmocka_unit_test(test_http_cancel_on_free),
        cmocka_unit_test(test_http_free_in_callback),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
