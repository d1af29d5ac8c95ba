/*
 * Node enrollment and renewal commands (see enroll.h). Each runs its own
 * short-lived libev loop: fetch and authenticate the overlay document with
 * the pin, then enroll (or renew) over a connection verified against the CA
 * in that document, then store the credentials.
 */
#include "enroll.h"

#include <ev.h>
#include <gnutls/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fsutil.h"
#include "http_client.h"
#include "log.h"
#include "login_client.h"

const struct cli_option enroll_options[] = {
    {"login", "URL", "enroll: the login server, https://host:port"},
    {"pin", "PIN", "enroll: the overlay CA pin the operator published (sha256:...)"},
    {"user", "NAME", "enroll: your user name"},
    {"password-file", "FILE", "enroll: read the password from FILE (else stdin or a prompt)"},
    {"device", "NAME",
     "enroll: this device's name in the account (default: the one in the state directory, "
     "else a new random one); enrolling again as the same device keeps its Node-ID"},
    {NULL, NULL, NULL},
};

const struct cli_option renew_options[] = {
    {"login", "URL", "renew: the login server (default: the first in the overlay document)"},
    {NULL, NULL, NULL},
};

struct job {
    const struct cli_prog *prog;
    struct http_client *http;
    const char *state_dir, *base, *pin, *user, *password;
    char device[80];
    char ca_file[4096];
    gnutls_x509_privkey_t key;
    struct overlay_doc doc;
    char *envelope;
    int status; /* exit status once decided; -1 while running */
};

static void fail(struct job *j, const char *what)
{
    fprintf(stderr, "%s: %s\n", j->prog->name, what);
    j->status = 1;
}

static void print_identity(const char *verb, const struct login_cert_result *res,
                           const char *state_dir)
{
    char who[512], when[32];
    struct tm tm;
    gmtime_r(&res->id.not_after, &tm);
    strftime(when, sizeof(when), "%Y-%m-%d %H:%M UTC", &tm);
    printf("%s %s\n  valid until %s\n  credentials in %s\n", verb,
           cred_identity_str(&res->id, who, sizeof(who)), when, state_dir);
}

static void on_enrolled(const struct login_cert_result *res, void *ud)
{
    struct job *j = ud;
    char err[512];
    if (res->error) {
        fail(j, res->error);
        return;
    }
    if (node_creds_save(j->state_dir, j->key, res->cert_pem, res->ca_pem, j->envelope, j->pin, err,
                        sizeof(err)) != 0) {
        fail(j, err);
        return;
    }
    print_identity("enrolled:", res, j->state_dir);
    j->status = 0;
}

static void on_overlay(struct login_overlay_result *res, void *ud)
{
    struct job *j = ud;
    char err[512];
    if (res->error) {
        fail(j, res->error);
        return;
    }
    j->doc = *res->doc; /* keep it: the callback's copy is freed on return */
    memset(res->doc, 0, sizeof(*res->doc));
    j->envelope = strndup(res->envelope, res->envelope_len);
    int r = fs_mkdir(j->state_dir, 0700);
    if (r == 0)
        r = fs_join(j->ca_file, sizeof(j->ca_file), j->state_dir, NODE_CREDS_CA);
    if (r == 0)
        r = fs_write_atomic(j->ca_file, j->doc.ca_cert_pem, strlen(j->doc.ca_cert_pem), 0600);
    if (r != 0 || !j->envelope) {
        snprintf(err, sizeof(err), "cannot write into %s: %s", j->state_dir, strerror(-r));
        fail(j, err);
        return;
    }
    if (cred_keygen(&j->key) < 0) {
        fail(j, "cannot make a key pair");
        return;
    }
    if (login_enroll(j->http, j->base, j->ca_file, j->doc.overlay, j->user, j->password, j->device,
                     j->key, on_enrolled, j, err, sizeof(err)) != 0)
        fail(j, err);
}

/* Runs the loop until the job is decided. */
static void run(struct ev_loop *loop, struct job *j)
{
    while (j->status < 0 && ev_run(loop, EVRUN_ONCE))
        ;
    if (j->status < 0)
        fail(j, "no answer");
}

/* The form the login server accepts for device names (as for user names, protocol.md 2.3). */
static bool device_name_valid(const char *name)
{
    size_t n = 0;
    for (; name[n]; n++) {
        char c = name[n];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (n >= 64 || !(alnum || (n > 0 && (c == '.' || c == '_' || c == '-'))))
            return false;
    }
    return n > 0;
}

/*
 * The device name: --device, else <state_dir>/device from an earlier
 * enrollment, else a new random "dev-<16 hex>". It is kept in the state
 * directory, so enrolling again from here is the same device to the login
 * server (the same Node-ID, no new device slot).
 */
static int pick_device(struct job *j, const char *given)
{
    char path[4096], *old = NULL;
    if (fs_join(path, sizeof(path), j->state_dir, ENROLL_DEVICE_FILE) != 0)
        return -1;
    if (given) {
        if (!device_name_valid(given)) {
            cli_error(j->prog,
                      "--device \"%s\": 1-64 characters of a-z 0-9 . _ -, starting with a "
                      "letter or digit",
                      given);
            return -2;
        }
        snprintf(j->device, sizeof(j->device), "%s", given);
    } else if (fs_read_file(path, 100, &old, NULL) == 0) {
        old[strcspn(old, " \t\r\n")] = '\0';
        snprintf(j->device, sizeof(j->device), "%s", old);
        free(old);
        return j->device[0] ? 0 : -1;
    } else {
        unsigned char rnd[8];
        if (gnutls_rnd(GNUTLS_RND_NONCE, rnd, sizeof(rnd)) < 0)
            return -1;
        int n = snprintf(j->device, sizeof(j->device), "dev-");
        for (size_t i = 0; i < sizeof(rnd); i++, n += 2)
            snprintf(j->device + n, sizeof(j->device) - (size_t)n, "%02x", rnd[i]);
    }
    char line[100];
    snprintf(line, sizeof(line), "%s\n", j->device);
    int r = fs_mkdir(j->state_dir, 0700);
    return r == 0 ? fs_write_atomic(path, line, strlen(line), 0600) : r;
}

static bool valid_args(const struct job *j)
{
    if (!j->base || strncmp(j->base, "https://", 8) != 0) {
        cli_error(j->prog, "enroll needs --login https://HOST:PORT");
        return false;
    }
    if (!j->pin || strncmp(j->pin, "sha256:", 7) != 0 || strlen(j->pin) != 71) {
        cli_error(j->prog, "enroll needs --pin sha256:<64 hex digits> (from the operator)");
        return false;
    }
    if (!j->user || !*j->user) {
        cli_error(j->prog, "enroll needs --user NAME");
        return false;
    }
    return true;
}

int enroll_command(const struct cli_prog *prog, const struct cli_opts *o, const char *state_dir)
{
    struct job j = {
        .prog = prog,
        .state_dir = state_dir,
        .base = cli_opt(o, "login"),
        .pin = cli_opt(o, "pin"),
        .user = cli_opt(o, "user"),
        .status = -1,
    };
    if (o->argc) {
        cli_error(prog, "unexpected argument '%s' (try --help)", o->argv[0]);
        return 2;
    }
    if (!valid_args(&j))
        return 2;
    if (!o->verbose)
        log_set_level(LL_ERROR); /* the outcome is printed */
    int pr = pick_device(&j, cli_opt(o, "device"));
    if (pr != 0) {
        if (pr == -2)
            return 2;
        fprintf(stderr, "%s: cannot keep the device name in %s\n", prog->name, state_dir);
        return 1;
    }
    char password[1024], err[512];
    if (cli_read_secret(cli_opt(o, "password-file"), false, password, sizeof(password), err,
                        sizeof(err)) != 0) {
        cli_error(prog, "%s", err);
        return 1;
    }
    j.password = password;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    j.http = loop ? http_client_new(loop) : NULL;
    if (!j.http)
        fail(&j, "cannot start the HTTP client");
    else if (login_fetch_overlay(j.http, j.base, j.pin, 0, on_overlay, &j, err, sizeof(err)) != 0)
        fail(&j, err);
    else
        run(loop, &j);
    explicit_bzero(password, sizeof(password));
    http_client_free(j.http);
    if (loop)
        ev_loop_destroy(loop);
    gnutls_x509_privkey_deinit(j.key);
    overlay_doc_free(&j.doc);
    free(j.envelope);
    return j.status;
}

/* ---- renew ---- */

struct renewal {
    const struct cli_prog *prog;
    const char *state_dir;
    struct node_creds creds;
    gnutls_x509_privkey_t key;
    int status;
};

static void on_renewed(const struct login_cert_result *res, void *ud)
{
    struct renewal *r = ud;
    char err[512];
    r->status = 1;
    if (res->error) {
        fprintf(stderr, "%s: %s\n", r->prog->name, res->error);
        return;
    }
    if (node_creds_save(r->state_dir, r->key, res->cert_pem, r->creds.ca_pem,
                        r->creds.overlay_envelope, r->creds.pin, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", r->prog->name, err);
        return;
    }
    print_identity("renewed:", res, r->state_dir);
    r->status = 0;
}

int renew_command(const struct cli_prog *prog, const struct cli_opts *o, const char *state_dir)
{
    if (o->argc) {
        cli_error(prog, "unexpected argument '%s' (try --help)", o->argv[0]);
        return 2;
    }
    if (!o->verbose)
        log_set_level(LL_ERROR);
    struct renewal r = {.prog = prog, .state_dir = state_dir, .status = -1};
    char err[512];
    if (node_creds_load(state_dir, &r.creds, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s (enroll first?)\n", prog->name, err);
        return 1;
    }
    const char *base = cli_opt(o, "login");
    if (!base)
        base = r.creds.doc.n_login_urls ? r.creds.doc.login_urls[0] : NULL;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct http_client *http = loop ? http_client_new(loop) : NULL;
    if (!base) {
        fprintf(stderr, "%s: no login server known: give --login\n", prog->name);
        r.status = 1;
    } else if (!http || cred_keygen(&r.key) < 0) {
        fprintf(stderr, "%s: cannot start\n", prog->name);
        r.status = 1;
    } else if (login_renew(http, base, r.creds.ca_file, r.creds.cert_file, r.creds.key_file, r.key,
                           on_renewed, &r, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", prog->name, err);
        r.status = 1;
    } else {
        while (r.status < 0 && ev_run(loop, EVRUN_ONCE))
            ;
        if (r.status < 0) {
            fprintf(stderr, "%s: no answer\n", prog->name);
            r.status = 1;
        }
    }
    http_client_free(http);
    if (loop)
        ev_loop_destroy(loop);
    gnutls_x509_privkey_deinit(r.key);
    node_creds_free(&r.creds);
    return r.status;
}
