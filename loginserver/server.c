/*
 * Login server request handling (see server.h, docs/protocol.md section 2).
 *
 * Order of checks on enroll: shape of the request, user name, rate limit,
 * certificate request, and only then the password. Everything before the
 * password is cheap, so garbage never costs a PBKDF2 run; the password check
 * itself costs the same whether or not the user exists, and both failures give
 * the same answer. No refused request writes anything.
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

struct ls_server {
    struct ev_loop *loop;
    struct ls_ca *ca;
    struct userstore *users;
    struct ls_server_config cfg;
    struct httpd *http;
    struct ratelimit *limits;
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

/* Answers 429 when the user or the client address is locked out. */
static bool rate_limited(struct ls_server *s, struct httpd_req *r, const char *user_key,
                         const char *addr_key)
{
    double now = ev_now(s->loop), wait_user = 0, wait_addr = 0;
    bool bu = ratelimit_blocked(s->limits, user_key, now, &wait_user);
    bool ba = ratelimit_blocked(s->limits, addr_key, now, &wait_addr);
    if (!bu && !ba)
        return false;
    double wait = wait_user > wait_addr ? wait_user : wait_addr;
    char secs[32];
    snprintf(secs, sizeof(secs), "%.0f", wait < 1 ? 1 : wait + 0.5);
    httpd_add_header(r, "Retry-After", secs);
    httpd_respond_error(r, 429, "rate-limited", "too many failed attempts; try again later");
    return true;
}

static void respond_issued(struct httpd_req *r, struct ls_server *s, const struct ls_issued *is)
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
    if (!o) {
        httpd_respond_error(r, 500, "internal", "cannot encode the answer");
        return;
    }
    httpd_respond_json(r, 200, o);
    json_decref(o);
}

/* Issues for `user` from a checked request and records it; answers either way. */
static void issue_and_answer(struct ls_server *s, struct httpd_req *r, const char *user,
                             gnutls_x509_crq_t crq, bool may_supernode, const nid_t *keep_id,
                             const char *kind)
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
    log_info("login", "%s: %s certificate for %s, node %s, serial %s", httpd_req_client_addr(r),
             kind, is.uri, hex, is.serial);
    respond_issued(r, s, &is);
    free(is.cert_pem);
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
    char user_key[96], addr_key[80];
    snprintf(user_key, sizeof(user_key), "user:%s", user);
    snprintf(addr_key, sizeof(addr_key), "addr:%s", httpd_req_client_addr(r));
    if (rate_limited(s, r, user_key, addr_key))
        goto out;

    /* The request must be sound before the (costly) password check. */
    char why[256];
    if (ls_ca_check_csr(csr, strlen(csr), &crq, why, sizeof(why)) != 0) {
        httpd_respond_error(r, 400, "bad-csr", why);
        goto out;
    }

    struct user_info info;
    int us = userstore_check(s->users, user, password, &info);
    if (us == US_BAD_CREDENTIALS) {
        double now = ev_now(s->loop);
        ratelimit_failure(s->limits, user_key, now);
        ratelimit_failure(s->limits, addr_key, now);
        httpd_respond_error(r, 401, "unauthorized", UNAUTHORIZED);
        goto out;
    }
    if (us != US_OK) {
        log_error("login", "user store: %s: %s", userstore_strerror(us),
                  userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
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
    issue_and_answer(s, r, user, crq, info.may_supernode, NULL, "enroll");
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
    int us;
    if (!csr)
        ;
    else if (ls_ca_check_csr(csr, strlen(csr), &crq, err, sizeof(err)) != 0)
        httpd_respond_error(r, 400, "bad-csr", err);
    else if ((us = userstore_get(s->users, user, &info)) == US_NOT_FOUND)
        httpd_respond_error(r, 403, "account-gone", "the account of this certificate was deleted");
    else if (us != US_OK)
        httpd_respond_error(r, 500, "internal", "user store unavailable");
    else
        issue_and_answer(s, r, user, crq, info.may_supernode, &id.node_id, "renew");
    gnutls_x509_crq_deinit(crq);
    json_decref(o);
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
    struct httpd_config hc = {
        .listen = cfg->listen,
        .cert_pem = ca->server_cert_pem,
        .key_pem = ca->server_key_pem,
        .client_ca_pem = ca->ca_pem, /* renewals authenticate with their certificate */
        .max_body = cfg->max_body,
        .max_connections = cfg->max_connections,
    };
    if (!s->limits || !(s->http = httpd_start(loop, &hc, handle, s, err, errlen))) {
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
    free(s);
}
