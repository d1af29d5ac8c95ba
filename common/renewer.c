/*
 * Periodic certificate renewal (see renewer.h). One timer; at most one
 * renewal in flight; a failed attempt is logged and retried at the next
 * check, so a login server that is down for a while costs nothing but a
 * warning per interval.
 */
#include "renewer.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http_client.h"
#include "log.h"
#include "login_client.h"

#define DEF_INTERVAL_S 3600.0

struct renewer {
    struct ev_loop *loop;
    struct renewer_config cfg;
    char *state_dir;
    struct http_client *http;
    ev_timer timer;
    bool busy;
    gnutls_x509_privkey_t new_key;
    struct node_creds creds;
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
    char err[512];
    if (node_creds_load(cfg->state_dir, &probe, err, sizeof(err)) != 0) {
        log_info("renew", "no credentials to renew (%s)", err);
        return NULL;
    }
    node_creds_free(&probe);
    struct renewer *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->loop = loop;
    r->cfg = *cfg;
    if (r->cfg.check_interval_s <= 0)
        r->cfg.check_interval_s = DEF_INTERVAL_S;
    r->state_dir = strdup(cfg->state_dir);
    r->http = http_client_new(loop);
    if (!r->state_dir || !r->http) {
        renewer_stop(r);
        return NULL;
    }
    r->cfg.state_dir = r->state_dir;
    ev_timer_init(&r->timer, check, 0., r->cfg.check_interval_s);
    r->timer.data = r;
    ev_timer_start(loop, &r->timer);
    return r;
}

void renewer_stop(struct renewer *r)
{
    if (!r)
        return;
    ev_timer_stop(r->loop, &r->timer);
    http_client_free(r->http); /* a renewal in flight ends in renewed() with "cancelled" */
    gnutls_x509_privkey_deinit(r->new_key);
    node_creds_free(&r->creds);
    free(r->state_dir);
    free(r);
}
