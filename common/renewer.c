/*
 * Periodic certificate renewal and revocation list fetches (see renewer.h).
 * One timer for each; at most one renewal and one fetch in flight; a failed
 * attempt is logged and retried, so a login server that is down for a while
 * costs nothing but a warning per interval.
 */
#include "renewer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conn.h"
#include "crl.h"
#include "fsutil.h"
#include "http_client.h"
#include "log.h"
#include "login_client.h"

#define DEF_INTERVAL_S 3600.0
#define CRL_FILE       "crl.pem"
#define CRL_MIN_S      60.0   /* fetches driven by nextUpdate: not more often than this */
#define CRL_MAX_S      3600.0 /* ...nor less often than this */
#define CRL_RETRY_S    30.0   /* after a failed fetch */
#define CRL_TIMEOUT_MS 30000L
#define CRL_MAX_BODY   (4u * 1024u * 1024u)

/* ---- Revocation list ------------------------------------------------------------------------ */

struct renewer_crl {
    struct ev_loop *loop;
    struct http_client *http;
    ev_timer timer;
    bool busy;
    double max_interval_s;
    char **login_urls; /* tried in turn after failures */
    size_t n_login_urls, url_at;
    char *ca_file;  /* the overlay CA, to verify the login server */
    char *crl_path; /* where the list is kept; NULL: nowhere */
};

static void crl_schedule(struct renewer_crl *f, double in)
{
    if (in > f->max_interval_s)
        in = f->max_interval_s;
    ev_timer_stop(f->loop, &f->timer);
    ev_timer_set(&f->timer, in, 0.);
    ev_timer_start(f->loop, &f->timer);
}

/* When to fetch again after a list was taken or confirmed: half of what is left until its
 * nextUpdate, within CRL_MIN_S .. CRL_MAX_S (crl_schedule() caps it further). */
static double crl_next_in(void)
{
    struct crl_info info;
    crl_get_info(&info);
    double in = CRL_MAX_S;
    if (info.present && info.next_update != (time_t)-1)
        in = (double)(info.next_update - time(NULL)) / 2.0;
    return in < CRL_MIN_S ? CRL_MIN_S : in > CRL_MAX_S ? CRL_MAX_S : in;
}

static void crl_fetched(const struct http_response *resp, void *ud)
{
    struct renewer_crl *f = ud;
    char err[512];
    const char *url = f->login_urls[f->url_at];
    f->busy = false;
    if (resp->kind == HTTP_ERR_CANCELLED) /* being stopped */
        return;
    if (resp->kind != HTTP_OK || resp->status != 200) {
        double retry = CRL_RETRY_S < f->max_interval_s ? CRL_RETRY_S : f->max_interval_s;
        if (resp->kind != HTTP_OK)
            log_warn("crl", "cannot fetch the revocation list from %s (next try in %.0f s): %s",
                     url, retry, resp->error ? resp->error : "failed");
        else
            log_warn("crl",
                     "cannot fetch the revocation list from %s (next try in %.0f s): "
                     "HTTP %ld",
                     url, retry, resp->status);
        f->url_at = (f->url_at + 1) % f->n_login_urls;
        crl_schedule(f, retry);
        return;
    }
    uint64_t gen = crl_generation();
    int st = crl_update(resp->body, resp->body_len, time(NULL), err, sizeof(err));
    if (st == CRL_OK) {
        int w = f->crl_path ? fs_write_atomic(f->crl_path, resp->body, resp->body_len, 0600) : 0;
        if (w < 0)
            log_warn("crl", "cannot keep the revocation list in %s: %s", f->crl_path, strerror(-w));
        struct crl_info info;
        crl_get_info(&info);
        if (crl_generation() != gen) {
            log_info("crl", "revocation list from %s taken: %zu revoked certificate%s (number %s)",
                     url, info.entries, info.entries == 1 ? "" : "s",
                     info.number[0] ? info.number : "none");
            int n = conn_close_revoked();
            if (n > 0)
                log_info("crl", "closed %d link%s whose peer is now revoked", n, n == 1 ? "" : "s");
        } else {
            log_debug("crl", "revocation list from %s renewed: same %zu entries (number %s)", url,
                      info.entries, info.number[0] ? info.number : "none");
        }
    } else if (st == CRL_UNCHANGED) {
        log_debug("crl", "revocation list from %s unchanged", url);
    } else {
        log_warn("crl", "%s (from %s; the list held stays)", err, url);
    }
    crl_schedule(f, crl_next_in());
}

static void crl_fetch(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct renewer_crl *f = w->data;
    if (f->busy)
        return;
    char url[2048];
    snprintf(url, sizeof(url), "%s/v1/crl", f->login_urls[f->url_at]);
    struct http_request req = {
        .method = "GET",
        .url = url,
        .ca_file = f->ca_file,
        .timeout_ms = CRL_TIMEOUT_MS,
        .max_response = CRL_MAX_BODY,
    };
    int e = http_request_start(f->http, &req, crl_fetched, f);
    if (e != 0) {
        log_warn("crl", "cannot start fetching the revocation list from %s: %s", url,
                 strerror(e < 0 ? -e : e));
        crl_schedule(f, CRL_RETRY_S);
        return;
    }
    f->busy = true;
}

/* The list kept by an earlier run. */
static void crl_load_kept(const char *path)
{
    char err[512], *pem = NULL;
    size_t len = 0;
    int e = fs_read_file(path, CRL_MAX_BODY, &pem, &len);
    if (e == -ENOENT)
        return;
    if (e < 0) {
        log_warn("crl", "cannot read %s: %s", path, strerror(-e));
        return;
    }
    int st = crl_update(pem, len, time(NULL), err, sizeof(err));
    free(pem);
    if (st == CRL_OK || st == CRL_UNCHANGED) {
        struct crl_info info;
        crl_get_info(&info);
        log_info("crl", "revocation list loaded from %s: %zu revoked certificate%s (number %s)",
                 path, info.entries, info.entries == 1 ? "" : "s",
                 info.number[0] ? info.number : "none");
    } else {
        log_warn("crl", "%s: %s", path, err);
    }
}

struct renewer_crl *renewer_crl_start(struct ev_loop *loop, const struct renewer_crl_config *cfg)
{
    char err[512], *ca_pem = NULL;
    size_t ca_len = 0;
    int e = fs_read_file(cfg->ca_file, CRL_MAX_BODY, &ca_pem, &ca_len);
    if (e < 0) {
        log_warn("crl", "no revocation checks: cannot read %s: %s", cfg->ca_file, strerror(-e));
        return NULL;
    }
    e = crl_set_ca(ca_pem, ca_len, err, sizeof(err));
    free(ca_pem);
    if (e != 0) {
        log_warn("crl", "no revocation checks: %s: %s", cfg->ca_file, err);
        return NULL;
    }
    if (cfg->crl_path)
        crl_load_kept(cfg->crl_path);
    if (cfg->n_login_urls == 0) {
        log_warn("crl", "no login server known: the revocation list is not updated");
        return NULL;
    }
    struct renewer_crl *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->loop = loop;
    f->max_interval_s = cfg->max_interval_s > 0 ? cfg->max_interval_s : CRL_MAX_S;
    f->http = http_client_new(loop);
    f->ca_file = strdup(cfg->ca_file);
    f->crl_path = cfg->crl_path ? strdup(cfg->crl_path) : NULL;
    f->login_urls = calloc(cfg->n_login_urls, sizeof(char *));
    bool ok = f->http && f->ca_file && (f->crl_path || !cfg->crl_path) && f->login_urls;
    for (size_t i = 0; ok && i < cfg->n_login_urls; i++, f->n_login_urls++)
        ok = (f->login_urls[i] = strdup(cfg->login_urls[i])) != NULL;
    ev_timer_init(&f->timer, crl_fetch, 0., 0.);
    f->timer.data = f;
    if (!ok) {
        renewer_crl_stop(f);
        return NULL;
    }
    ev_timer_start(loop, &f->timer);
    return f;
}

void renewer_crl_stop(struct renewer_crl *f)
{
    if (!f)
        return;
    ev_timer_stop(f->loop, &f->timer);
    http_client_free(f->http); /* a fetch in flight ends in crl_fetched() with "cancelled" */
    for (size_t i = 0; i < f->n_login_urls; i++)
        free(f->login_urls[i]);
    free(f->login_urls);
    free(f->ca_file);
    free(f->crl_path);
    free(f);
}

/* ---- Certificates -------------------------------------------------------------------------- */

struct renewer {
    struct ev_loop *loop;
    struct renewer_config cfg;
    char *state_dir;
    struct http_client *http;
    ev_timer timer;
    bool busy;
    gnutls_x509_privkey_t new_key;
    struct node_creds creds;
    struct renewer_crl *crl;
};

static void renewed(const struct login_cert_result *res, void *ud)
{
    struct renewer *r = ud;
    char err[512], who[512];
    r->busy = false;
    if (res->error) {
        log_warn("renew", "certificate renewal failed (next try in %.0f s): %s",
                 r->cfg.check_interval_s, res->error);
    } else if (node_creds_save(r->state_dir, r->new_key, res->cert_pem, r->creds.ca_pem,
                               r->creds.overlay_envelope, r->creds.pin, err, sizeof(err)) != 0) {
        log_error("renew", "renewed, but cannot store the new certificate: %s", err);
    } else {
        log_info("renew", "certificate renewed: %s", cred_identity_str(&res->id, who, sizeof(who)));
        if (r->cfg.on_renewed)
            r->cfg.on_renewed(r->cfg.ud);
    }
    gnutls_x509_privkey_deinit(r->new_key);
    r->new_key = NULL;
    node_creds_free(&r->creds);
}

static void check(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct renewer *r = w->data;
    char err[512];
    if (r->busy)
        return;
    node_creds_free(&r->creds);
    if (node_creds_load(r->state_dir, &r->creds, err, sizeof(err)) != 0) {
        log_warn("renew", "cannot check the certificate: %s", err);
        return;
    }
    time_t now = time(NULL), nb = r->creds.id.not_before, na = r->creds.id.not_after;
    double margin = r->cfg.margin_s > 0 ? r->cfg.margin_s : (double)(na - nb) / 3.0;
    if ((double)(na - now) > margin) {
        log_debug("renew", "certificate good for %.1f more days", (double)(na - now) / 86400.0);
        node_creds_free(&r->creds);
        return;
    }
    const char *base = r->creds.doc.n_login_urls ? r->creds.doc.login_urls[0] : NULL;
    if (!base) {
        log_warn("renew", "certificate due for renewal, but the overlay document names no "
                          "login server");
        node_creds_free(&r->creds);
        return;
    }
    log_info("renew", "certificate expires in %.1f days: renewing with %s",
             (double)(na - now) / 86400.0, base);
    if (cred_keygen(&r->new_key) < 0 ||
        login_renew(r->http, base, r->creds.ca_file, r->creds.cert_file, r->creds.key_file,
                    r->new_key, renewed, r, err, sizeof(err)) != 0) {
        log_warn("renew", "cannot start the renewal: %s", err);
        gnutls_x509_privkey_deinit(r->new_key);
        r->new_key = NULL;
        node_creds_free(&r->creds);
        return;
    }
    r->busy = true;
}

struct renewer *renewer_start(struct ev_loop *loop, const struct renewer_config *cfg)
{
    struct node_creds probe;
    char err[512], crl_path[4096];
    if (node_creds_load(cfg->state_dir, &probe, err, sizeof(err)) != 0) {
        log_info("renew", "no credentials to renew (%s)", err);
        return NULL;
    }
    struct renewer *r = calloc(1, sizeof(*r));
    if (!r) {
        node_creds_free(&probe);
        return NULL;
    }
    r->loop = loop;
    r->cfg = *cfg;
    if (r->cfg.check_interval_s <= 0)
        r->cfg.check_interval_s = DEF_INTERVAL_S;
    if (r->cfg.crl_max_interval_s <= 0)
        r->cfg.crl_max_interval_s = r->cfg.check_interval_s;
    r->state_dir = strdup(cfg->state_dir);
    r->http = http_client_new(loop);
    if (!r->state_dir || !r->http ||
        fs_join(crl_path, sizeof(crl_path), cfg->state_dir, CRL_FILE) != 0) {
        node_creds_free(&probe);
        renewer_stop(r);
        return NULL;
    }
    r->cfg.state_dir = r->state_dir;
    ev_timer_init(&r->timer, check, 0., r->cfg.check_interval_s);
    r->timer.data = r;
    ev_timer_start(loop, &r->timer);
    struct renewer_crl_config cc = {
        .login_urls = (const char *const *)probe.doc.login_urls,
        .n_login_urls = probe.doc.n_login_urls,
        .ca_file = probe.ca_file,
        .crl_path = crl_path,
        .max_interval_s = r->cfg.crl_max_interval_s,
    };
    r->crl = renewer_crl_start(loop, &cc); /* NULL (logged): no updates, the kept list holds */
    node_creds_free(&probe);
    return r;
}

void renewer_stop(struct renewer *r)
{
    if (!r)
        return;
    ev_timer_stop(r->loop, &r->timer);
    renewer_crl_stop(r->crl);
    http_client_free(r->http); /* a renewal in flight ends in renewed() with "cancelled" */
    gnutls_x509_privkey_deinit(r->new_key);
    node_creds_free(&r->creds);
    free(r->state_dir);
    free(r);
}
