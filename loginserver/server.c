/*
 * Login server request handling (see server.h, docs/protocol.md section 2).
 *
 * Order of checks on enroll: shape of the request, user and device names,
 * failure limits, certificate request, and only then the password. Everything
 * before the password is cheap, so garbage never costs a PBKDF2 run; the
 * password check itself costs the same whether or not the user exists, and
 * both failures give the same answer. What depends on the account (its
 * issuing rate, its devices) is looked at only after the password, so that it
 * tells nothing about unknown users. No refused request writes anything (a
 * device is claimed, and an old password hash upgraded, only on the way to a
 * certificate).
 *
 * Failed logins are counted three ways (ratelimit.h), none of which locks an
 * account: per (user, address) and per address, which refuse that address
 * for the rest of the window (429), and per user over all addresses, which
 * only spaces the user's next attempts user_slowdown_s apart, so that many
 * addresses together cannot guess fast while the owner, from anywhere else,
 * still gets in.
 */
#include "server.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "httpd.h"
#include "log.h"
#include "ratelimit.h"

#define RATE_KEYS 65536
#define USER_KEYS 16384 /* users being failed at (and their spacing): eviction only forgets */
/* A served CRL is made again when older than this, or when another process (the CLI
 * removing a device or an account) changed the store since. */
#define CRL_REFRESH_S 60.0

struct ls_server {
    struct ev_loop *loop;
    struct ls_ca *ca;
    struct userstore *users;
    struct ls_server_config cfg;
    struct httpd *http;
    struct ratelimit *limits;   /* "ua:<user>|<addr>" (max_failures), refusing */
    struct ratelimit *addrs;    /* "addr:<addr>" (max_failures_per_addr), refusing */
    struct ratelimit *users_rl; /* "<user>": over max_failures means under attack */
    struct ratelimit *spacing;  /* "<user>": one attempt per user_slowdown_s when under attack */
    char *crl_pem;              /* the CRL served, made at crl_made (ev_now) */
    double crl_made;
    int64_t crl_version; /* userstore_data_version() then */
};

static const char UNAUTHORIZED[] = "unknown user or wrong password";

/* Parses the body as a JSON object; answers 400 and returns NULL when it is not one. */
static json_t *body_object(struct httpd_req *r)
{
    json_error_t je;
    json_t *o = json_loadb(httpd_req_body(r), httpd_req_body_len(r), JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        char why[200];
        snprintf(why, sizeof(why), "body is not a JSON object: %s",
                 o ? "other JSON type" : je.text);
        json_decref(o);
        httpd_respond_error(r, 400, "bad-json", why);
        return NULL;
    }
    return o;
}

/* A required string member, or NULL after answering 400. */
static const char *member(struct httpd_req *r, json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) {
        char why[120];
        snprintf(why, sizeof(why), "member \"%s\" %s", key, v ? "must be a string" : "is missing");
        httpd_respond_error(r, 400, "bad-json", why);
        return NULL;
    }
    return json_string_value(v);
}

static void respond_429(struct httpd_req *r, double wait, const char *reason)
{
    char secs[32];
    snprintf(secs, sizeof(secs), "%.0f", wait < 1 ? 1 : wait + 0.5);
    httpd_add_header(r, "Retry-After", secs);
    httpd_respond_error(r, 429, "rate-limited", reason);
}

/*
 * Answers 429 when this address has failed too often, for this user or in all,
 * or when the user is under attack and its last attempt is too recent; else
 * notes the attempt for the spacing and returns false.
 */
static bool rate_limited(struct ls_server *s, struct httpd_req *r, const char *user,
                         const char *ua_key, const char *addr_key)
{
    double now = ev_now(s->loop), wait_ua = 0, wait_addr = 0, wait = 0;
    bool bu = ratelimit_blocked(s->limits, ua_key, now, &wait_ua);
    bool ba = ratelimit_blocked(s->addrs, addr_key, now, &wait_addr);
    if (bu || ba) {
        log_info("login", "%s: refused for %s: too many failed attempts from this address",
                 httpd_req_client_addr(r), user);
        respond_429(r, wait_ua > wait_addr ? wait_ua : wait_addr,
                    "too many failed attempts from this address; try again later");
        return true;
    }
    if (!ratelimit_blocked(s->users_rl, user, now, NULL))
        return false;
    if (ratelimit_blocked(s->spacing, user, now, &wait)) {
        respond_429(r, wait,
                    "too many failed attempts for this user: attempts are slowed down; "
                    "try again in a moment");
        return true;
    }
    ratelimit_failure(s->spacing, user, now);
    return false;
}

static void respond_issued(struct httpd_req *r, struct ls_server *s, const struct ls_issued *is,
                           const char *device)
{
    char hex[NID_HEX_LEN + 1], when[32];
    struct tm tm;
    gmtime_r(&is->not_after, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *roles = json_array();
    json_array_append_new(roles, json_string("node"));
    if (is->roles & ROLE_SUPERNODE)
        json_array_append_new(roles, json_string("supernode"));
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:o, s:s}", "certificate", is->cert_pem,
                          "ca_certificate", s->ca->ca_pem, "uri", is->uri, "node_id",
                          nid_to_hex(&is->node_id, hex), "roles", roles, "not_after", when);
    if (!o || json_object_set_new(o, "device", json_string(device)) < 0) {
        json_decref(o);
        httpd_respond_error(r, 500, "internal", "cannot encode the answer");
        return;
    }
    httpd_respond_json(r, 200, o);
    json_decref(o);
}

/*
 * False after answering 429 when the account was issued max_certs_per_user
 * certificates within cert_window_s: a stolen password or a looping client
 * gets no stream of certificates, and renewals cannot be spun.
 */
static bool issuing_allowed(struct ls_server *s, struct httpd_req *r, const char *user)
{
    int64_t now = (int64_t)time(NULL), oldest = 0;
    uint64_t n = 0;
    if (userstore_certs_since(s->users, user, now - (int64_t)s->cfg.cert_window_s, &n, &oldest) !=
        US_OK) {
        log_error("login", "user store: %s", userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        return false;
    }
    if (n < s->cfg.max_certs_per_user)
        return true;
    char why[200];
    snprintf(why, sizeof(why),
             "too many certificates for this account (%llu in the last %.0f s); try again later",
             (unsigned long long)n, s->cfg.cert_window_s);
    log_warn("login", "%s: refused a certificate for %s: %s", httpd_req_client_addr(r), user, why);
    respond_429(r, (double)(oldest + (int64_t)s->cfg.cert_window_s - now), why);
    return false;
}

/* Issues for `user` from a checked request and records it; answers either way. */
static void issue_and_answer(struct ls_server *s, struct httpd_req *r, const char *user,
                             const char *device, gnutls_x509_crq_t crq, bool may_supernode,
                             const nid_t *keep_id, const char *kind)
{
    struct ls_issued is;
    char err[256];
    unsigned roles = ROLE_NODE | (may_supernode ? ROLE_SUPERNODE : 0);
    if (ls_ca_issue_node(s->ca, crq, user, roles, keep_id, s->cfg.validity_days, &is, err,
                         sizeof(err)) != 0) {
        log_error("login", "cannot issue for %s: %s", user, err);
        httpd_respond_error(r, 500, "internal", "cannot issue a certificate");
        return;
    }
    char hex[NID_HEX_LEN + 1];
    int us = userstore_record_cert(s->users, is.serial, user, nid_to_hex(&is.node_id, hex), kind,
                                   (long long)time(NULL), (long long)is.not_after);
    if (us != US_OK) {
        /* An unrecorded certificate must not go out: the store is the audit trail. */
        log_error("login", "cannot record certificate %s for %s: %s", is.serial, user,
                  userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "cannot record the certificate");
        free(is.cert_pem);
        return;
    }
    log_info("login", "%s: %s certificate for %s, device %s, node %s, serial %s",
             httpd_req_client_addr(r), kind, is.uri, device, hex, is.serial);
    respond_issued(r, s, &is, device);
    free(is.cert_pem);
}

/* The device a request enrolls: its "device" member, else its public key ("key-<hex>"). */
static int device_of(struct httpd_req *r, json_t *o, gnutls_x509_crq_t crq, char *out, size_t len)
{
    json_t *v = json_object_get(o, "device");
    if (v) {
        if (!json_is_string(v) || !userstore_name_valid(json_string_value(v))) {
            httpd_respond_error(r, 400, "bad-device",
                                "device names are 1-64 characters of a-z 0-9 . _ -, starting with "
                                "a letter or digit");
            return -1;
        }
        snprintf(out, len, "%s", json_string_value(v));
        return 0;
    }
    unsigned char kid[32];
    size_t klen = sizeof(kid);
    if (gnutls_x509_crq_get_key_id(crq, GNUTLS_KEYID_USE_SHA256, kid, &klen) < 0 || klen < 16) {
        httpd_respond_error(r, 500, "internal", "cannot identify the request's key");
        return -1;
    }
    int n = snprintf(out, len, "key-");
    for (size_t i = 0; i < 16 && (size_t)n + 2 < len; i++, n += 2)
        snprintf(out + n, len - (size_t)n, "%02x", kid[i]);
    return 0;
}

static void handle_enroll(struct ls_server *s, struct httpd_req *r)
{
    gnutls_x509_crq_t crq = NULL;
    json_t *o = body_object(r);
    if (!o)
        return;
    const char *user, *password, *csr;
    if (!(user = member(r, o, "user")) || !(password = member(r, o, "password")) ||
        !(csr = member(r, o, "csr")))
        goto out;
    if (!userstore_name_valid(user)) {
        httpd_respond_error(r, 400, "bad-user",
                            "user names are 1-64 characters of a-z 0-9 . _ -, starting with a "
                            "letter or digit");
        goto out;
    }
    char ua_key[160], addr_key[80];
    snprintf(ua_key, sizeof(ua_key), "ua:%s|%s", user, httpd_req_client_addr(r));
    snprintf(addr_key, sizeof(addr_key), "addr:%s", httpd_req_client_addr(r));
    if (rate_limited(s, r, user, ua_key, addr_key))
        goto out;

    /* The request must be sound before the (costly) password check. */
    char why[256], device[USERSTORE_NAME_MAX + 1];
    if (ls_ca_check_csr(csr, strlen(csr), &crq, why, sizeof(why)) != 0) {
        httpd_respond_error(r, 400, "bad-csr", why);
        goto out;
    }
    if (device_of(r, o, crq, device, sizeof(device)) != 0)
        goto out;

    struct user_info info;
    int us = userstore_check(s->users, user, password, &info);
    if (us == US_BAD_CREDENTIALS) {
        double now = ev_now(s->loop);
        ratelimit_failure(s->limits, ua_key, now);
        ratelimit_failure(s->addrs, addr_key, now);
        ratelimit_failure(s->users_rl, user, now);
        log_info("login", "%s: wrong password or unknown user %s", httpd_req_client_addr(r), user);
        httpd_respond_error(r, 401, "unauthorized", UNAUTHORIZED);
        goto out;
    }
    if (us != US_OK) {
        log_error("login", "user store: %s: %s", userstore_strerror(us),
                  userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
    if (!issuing_allowed(s, r, user))
        goto out;
    /* The Node-ID is the CA's draw, made once per device: enrolling again from the same
     * device gives the same one, and a new draw costs one of the account's few devices. */
    nid_t fresh, kept;
    char hex[NID_HEX_LEN + 1];
    struct device_info dev;
    bool added = false;
    if (nid_random(&fresh) != 0) {
        httpd_respond_error(r, 500, "internal", "no randomness for a Node-ID");
        goto out;
    }
    us = userstore_device_claim(s->users, user, device, nid_to_hex(&fresh, hex), s->cfg.max_devices,
                                &dev, &added);
    if (us == US_LIMIT) {
        char reason[300];
        snprintf(reason, sizeof(reason),
                 "account %s already has %u devices, the maximum: enroll again from one of them "
                 "(same \"device\"), or ask the operator to remove one",
                 user, s->cfg.max_devices);
        log_warn("login", "%s: refused device %s of %s: %s", httpd_req_client_addr(r), device, user,
                 userstore_errmsg(s->users));
        httpd_respond_error(r, 403, "too-many-devices", reason);
        goto out;
    }
    if (us != US_OK || nid_from_hex(&kept, dev.node_id) != 0) {
        log_error("login", "user store: %s", userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
    if (added)
        log_info("login", "%s: new device %s of %s, node %s", httpd_req_client_addr(r), device,
                 user, dev.node_id);
    /* A hash made with fewer iterations than configured now is cheaper to attack and
     * faster to check (which timing shows): redo it while the password is at hand. */
    if (info.pw_iterations < s->cfg.pbkdf2_iterations) {
        us = userstore_passwd(s->users, user, password, s->cfg.pbkdf2_iterations);
        if (us == US_OK)
            log_info("login", "password hash of %s upgraded to %u iterations", user,
                     s->cfg.pbkdf2_iterations);
        else
            log_warn("login", "cannot upgrade the password hash of %s: %s", user,
                     userstore_errmsg(s->users));
    }
    issue_and_answer(s, r, user, device, crq, info.may_supernode, &kept, "enroll");
out:
    gnutls_x509_crq_deinit(crq);
    json_decref(o);
}

/* "sip:<user>@<overlay>" -> user, when the overlay is ours. */
static bool user_from_uri(const char *uri, const char *overlay, char *user, size_t len)
{
    size_t ol = strlen(overlay), ul = strlen(uri);
    if (strncmp(uri, "sip:", 4) != 0 || ul < 4 + 2 + ol || strcmp(uri + ul - ol, overlay) != 0 ||
        uri[ul - ol - 1] != '@')
        return false;
    size_t n = ul - ol - 1 - 4;
    if (n == 0 || n >= len)
        return false;
    memcpy(user, uri + 4, n);
    user[n] = '\0';
    return userstore_name_valid(user);
}

static void handle_renew(struct ls_server *s, struct httpd_req *r)
{
    struct peer_identity id;
    char err[256], user[80];
    if (httpd_req_client_identity(r, &id, err, sizeof(err)) != 0) {
        httpd_respond_error(r, 401, "no-client-certificate", err);
        return;
    }
    if (!id.has_node_id || !user_from_uri(id.uri, s->ca->overlay, user, sizeof(user))) {
        httpd_respond_error(r, 401, "no-client-certificate",
                            "client certificate is not a node certificate of this overlay");
        return;
    }
    json_t *o = body_object(r);
    if (!o)
        return;
    const char *csr = member(r, o, "csr");
    gnutls_x509_crq_t crq = NULL;
    struct user_info info;
    struct device_info dev;
    char hex[NID_HEX_LEN + 1];
    int us = US_OK;
    if (!csr)
        ;
    else if (ls_ca_check_csr(csr, strlen(csr), &crq, err, sizeof(err)) != 0)
        httpd_respond_error(r, 400, "bad-csr", err);
    else if ((us = userstore_get(s->users, user, &info)) == US_NOT_FOUND)
        httpd_respond_error(r, 403, "account-gone", "the account of this certificate was deleted");
    else if (us != US_OK || ((us = userstore_device_by_node(
                                  s->users, user, nid_to_hex(&id.node_id, hex), &dev)) != US_OK &&
                             us != US_NOT_FOUND))
        httpd_respond_error(r, 500, "internal", "user store unavailable");
    else if (us == US_NOT_FOUND)
        httpd_respond_error(r, 403, "device-gone",
                            "the device of this certificate was removed from its account");
    else if (issuing_allowed(s, r, user)) {
        if (userstore_device_touch(s->users, user, dev.device) != US_OK)
            log_warn("login", "cannot note the renewal of device %s of %s: %s", dev.device, user,
                     userstore_errmsg(s->users));
        issue_and_answer(s, r, user, dev.device, crq, info.may_supernode, &id.node_id, "renew");
    }
    gnutls_x509_crq_deinit(crq);
    json_decref(o);
}

struct serials {
    char **v;
    size_t n, cap;
    bool oom;
};

static void add_serial(const char *serial, void *ud)
{
    struct serials *l = ud;
    if (l->oom)
        return;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        char **v = realloc(l->v, cap * sizeof(*v));
        if (!v) {
            l->oom = true;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(serial)))
        l->oom = true;
    else
        l->n++;
}

/*
 * GET /v1/crl: the CA's list of revoked node certificates. Only the
 * administration CLI revokes (another process), so the list is made again
 * when the store's data version moved, or once a minute for freshness.
 */
static void handle_crl(struct ls_server *s, struct httpd_req *r)
{
    double now = ev_now(s->loop);
    int64_t version = 0;
    if (userstore_data_version(s->users, &version) != US_OK)
        version = s->crl_version + 1; /* cannot tell: make it again */
    if (!s->crl_pem || now - s->crl_made >= CRL_REFRESH_S || version != s->crl_version) {
        struct serials l = {NULL, 0, 0, false};
        char err[256], *pem = NULL;
        int us = userstore_revoked(s->users, (int64_t)time(NULL), add_serial, &l);
        if (us != US_OK || l.oom)
            log_error("login", "cannot list revoked certificates: %s",
                      l.oom ? "out of memory" : userstore_errmsg(s->users));
        else if (ls_ca_crl(s->ca, (const char *const *)l.v, l.n, time(NULL),
                           s->cfg.crl_next_update_s, &pem, err, sizeof(err)) != 0)
            log_error("login", "%s", err);
        else {
            free(s->crl_pem);
            s->crl_pem = pem;
            s->crl_made = now;
            s->crl_version = version;
            log_debug("login", "revocation list made: %zu certificates", l.n);
        }
        for (size_t i = 0; i < l.n; i++)
            free(l.v[i]);
        free(l.v);
    }
    if (!s->crl_pem) {
        httpd_respond_error(r, 500, "internal", "no revocation list");
        return;
    }
    httpd_respond(r, 200, "application/x-pem-file", s->crl_pem, strlen(s->crl_pem));
}

static void handle(struct httpd_req *r, void *ud)
{
    struct ls_server *s = ud;
    const char *path = httpd_req_path(r), *method = httpd_req_method(r);
    const char *allow = NULL;
    if (strcmp(path, "/v1/overlay") == 0) {
        if (strcmp(method, "GET") == 0) {
            httpd_respond(r, 200, "application/json", s->ca->envelope, strlen(s->ca->envelope));
            return;
        }
        allow = "GET";
    } else if (strcmp(path, "/v1/crl") == 0) {
        if (strcmp(method, "GET") == 0) {
            handle_crl(s, r);
            return;
        }
        allow = "GET";
    } else if (strcmp(path, "/v1/enroll") == 0 || strcmp(path, "/v1/renew") == 0) {
        if (strcmp(method, "POST") == 0) {
            if (path[4] == 'e')
                handle_enroll(s, r);
            else
                handle_renew(s, r);
            return;
        }
        allow = "POST";
    }
    httpd_respond_unrouted(r, allow);
}

struct ls_server *ls_server_start(struct ev_loop *loop, struct ls_ca *ca, struct userstore *users,
                                  const struct ls_server_config *cfg, char *err, size_t errlen)
{
    struct ls_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->loop = loop;
    s->ca = ca;
    s->users = users;
    s->cfg = *cfg;
    s->limits = ratelimit_new(cfg->max_failures, cfg->failure_window_s, RATE_KEYS);
    s->addrs = ratelimit_new(cfg->max_failures_per_addr, cfg->failure_window_s, RATE_KEYS);
    s->users_rl = ratelimit_new(cfg->max_failures, cfg->failure_window_s, USER_KEYS);
    s->spacing = ratelimit_new(1, cfg->user_slowdown_s > 0 ? cfg->user_slowdown_s : 1, USER_KEYS);
    struct httpd_config hc = {
        .listen = cfg->listen,
        .cert_pem = ca->server_cert_pem,
        .key_pem = ca->server_key_pem,
        .client_ca_pem = ca->ca_pem, /* renewals authenticate with their certificate */
        .max_body = cfg->max_body,
        .max_connections = cfg->max_connections,
    };
    if (!s->limits || !s->addrs || !s->users_rl || !s->spacing ||
        !(s->http = httpd_start(loop, &hc, handle, s, err, errlen))) {
        ls_server_stop(s);
        return NULL;
    }
    return s;
}

int ls_server_port(const struct ls_server *s)
{
    return httpd_port(s->http);
}

void ls_server_stop(struct ls_server *s)
{
    if (!s)
        return;
    httpd_stop(s->http);
    ratelimit_free(s->limits);
    ratelimit_free(s->addrs);
    ratelimit_free(s->users_rl);
    ratelimit_free(s->spacing);
    free(s->crl_pem);
    free(s);
}
