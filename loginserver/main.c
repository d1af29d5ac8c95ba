/*
 * loginserver: the overlay's certificate authority and enrollment service
 * (seed 004 sections 3, 5.4, 11.2).
 *
 *   loginserver -c ls.json init            new CA, server certificate, user store, document
 *   loginserver -c ls.json user add alice  accounts (password from a file, stdin or a prompt)
 *   loginserver -c ls.json issue --service bootstrap1.example.org,192.0.2.10
 *   loginserver -c ls.json publish         sign a new document version from the settings
 *   loginserver -c ls.json -d              serve HTTPS (docs/protocol.md section 2)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ca.h"
#include "daemon.h"
#include "fsutil.h"
#include "log.h"
#include "login_client.h"
#include "overlay_doc.h"
#include "server.h"
#include "userstore.h"

struct ls_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *listen;
    char *state_dir;
    struct cfg_strlist server_names;
    struct cfg_strlist login_urls;
    struct cfg_strlist bootstrap_urls;
    long long cert_validity_days;
    long long max_body_bytes;
    long long pbkdf2_iterations;
    long long max_failures;
    long long max_failures_per_addr;
    long long failure_window_s;
    long long user_slowdown_s;
    long long max_devices;
    long long max_certs_per_user;
    long long cert_window_s;
    long long crl_next_update_s;
    long long max_connections;
    long long pbkdf2_threads;
    long long pbkdf2_queue;
    long long pbkdf2_per_address;
    long long replication_factor;
    long long max_record_bytes;
    long long max_record_lifetime_s;
    long long keepalive_s;
    long long stabilize_s;
    long long successor_list;
    long long promotion_min_uptime_s;
    long long promotion_min_cpus;
    long long promotion_min_free_mem_mb;
    long long promotion_min_bandwidth_kbps;
    long long promotion_sn_target_load;
    char *lan_discovery;
    struct cfg_strlist sip_proxies;
};

#define F(key, type, member, lo, hi, def, help)                                                    \
    {                                                                                              \
        key, type, offsetof(struct ls_config, member), lo, hi, NULL, def, help                     \
    }

static const struct cfg_field ls_fields[] = {
    DAEMON_BASE_FIELDS(struct ls_config),
    F("overlay", CFG_STR, overlay, 0, 0, "p2psip.local",
      "overlay name (the domain of users' URIs)"),
    F("listen", CFG_HOSTPORT, listen, 0, 0, "0.0.0.0:8440", "HTTPS address and port"),
    F("state_dir", CFG_PATH, state_dir, 0, 0, "/var/lib/p2psip/loginserver",
      "CA key, server certificate, user store and configuration document"),
    F("server_names", CFG_STRLIST, server_names, 0, 0, NULL,
      "init: host names/addresses in the server certificate (default: the listen address, "
      "localhost, 127.0.0.1, ::1)"),
    F("login_urls", CFG_STRLIST, login_urls, 0, 0, NULL,
      "document: https:// URLs of this server (default: from listen)"),
    F("bootstrap_urls", CFG_STRLIST, bootstrap_urls, 0, 0, NULL,
      "document: https:// URLs of the bootstrap servers"),
    F("cert_validity_days", CFG_INT, cert_validity_days, 1, 3650, "365",
      "validity of node certificates"),
    F("max_body_bytes", CFG_INT, max_body_bytes, 1024, 1048576, "16384",
      "largest request body; larger ones get 413"),
    F("pbkdf2_iterations", CFG_INT, pbkdf2_iterations, 1000, 10000000, "100000",
      "PBKDF2-SHA256 iterations for new passwords (about 1 ms per 1000 here)"),
    F("max_failures", CFG_INT, max_failures, 1, 100000, "10",
      "failed logins for one user from one client address before that address gets 429"),
    F("max_failures_per_addr", CFG_INT, max_failures_per_addr, 1, 1000000, "50",
      "failed logins from one client address, for any users, before it gets 429"),
    F("failure_window_s", CFG_INT, failure_window_s, 1, 86400, "60",
      "the window those failures are counted in"),
    F("user_slowdown_s", CFG_INT, user_slowdown_s, 1, 3600, "2",
      "a user with max_failures failures in the window, from all addresses together, gets at "
      "most one login attempt per this many seconds: later ones are answered that much later "
      "(a slow-down, never a lockout; 429 only when the wait would pass 10 s)"),
    F("pbkdf2_threads", CFG_INT, pbkdf2_threads, 1, 64, "2",
      "worker threads that check passwords (PBKDF2), so that checks never stall the server"),
    F("pbkdf2_queue", CFG_INT, pbkdf2_queue, 1, 100000, "64",
      "password checks waiting for a worker; an enrollment beyond them gets 503"),
    F("pbkdf2_per_address", CFG_INT, pbkdf2_per_address, 1, 100000, "16",
      "enrollments one client address may have in progress at once; more get 503"),
    F("max_devices", CFG_INT, max_devices, 1, 10000, "5",
      "devices (Node-IDs) per account; enrolling a further device gets 403"),
    F("max_certs_per_user", CFG_INT, max_certs_per_user, 1, 1000000, "10",
      "enrollments and renewals per account within cert_window_s; more get 429"),
    F("cert_window_s", CFG_INT, cert_window_s, 1, 31536000, "3600",
      "the window max_certs_per_user is counted in"),
    F("crl_next_update_s", CFG_INT, crl_next_update_s, 60, 2592000, "3600",
      "nextUpdate of the revocation list served at /v1/crl (nodes fetch it again before)"),
    F("max_connections", CFG_INT, max_connections, 1, 100000, "1024",
      "simultaneous HTTPS connections"),
    F("replication_factor", CFG_INT, replication_factor, 1, 16, "3",
      "document: copies of a record"),
    F("max_record_bytes", CFG_INT, max_record_bytes, 256, 1048576, "4096",
      "document: largest record"),
    F("max_record_lifetime_s", CFG_INT, max_record_lifetime_s, 60, 31536000, "86400",
      "document: longest record lifetime"),
    F("keepalive_s", CFG_INT, keepalive_s, 1, 3600, "15", "document: ON-SN keepalive interval"),
    F("stabilize_s", CFG_INT, stabilize_s, 1, 3600, "5", "document: Chord stabilisation interval"),
    F("successor_list", CFG_INT, successor_list, 1, 64, "8", "document: successor list length"),
    F("promotion_min_uptime_s", CFG_INT, promotion_min_uptime_s, 0, 31536000, "3600",
      "document: promotion needs this much attached uptime"),
    F("promotion_min_cpus", CFG_INT, promotion_min_cpus, 1, 1024, "2",
      "document: promotion needs this many CPU cores"),
    F("promotion_min_free_mem_mb", CFG_INT, promotion_min_free_mem_mb, 0, 1048576, "512",
      "document: promotion needs this much free memory"),
    F("promotion_min_bandwidth_kbps", CFG_INT, promotion_min_bandwidth_kbps, 0, 100000000, "2000",
      "document: promotion needs this measured bandwidth"),
    F("promotion_sn_target_load", CFG_INT, promotion_sn_target_load, 1, 1000000, "500",
      "document: attached ONs per SN above which more SNs are wanted"),
    F("lan_discovery", CFG_HOSTPORT, lan_discovery, 0, 0, "239.255.42.99:7077",
      "document: multicast group for LAN service discovery"),
    F("sip_proxies", CFG_STRLIST, sip_proxies, 0, 0, NULL,
      "document: \"domain=NAME\" items: the super node account NAME (or a sip: URI) is a P2P "
      "registrar/proxy of SIP domain `domain` (docs/sip.md)"),
};
#undef F

static int ls_validate(const void *p, char *err, size_t len)
{
    const struct ls_config *c = p;
    const struct cfg_strlist *lists[] = {&c->login_urls, &c->bootstrap_urls};
    const char *names[] = {"login_urls", "bootstrap_urls"};
    for (size_t k = 0; k < 2; k++)
        for (size_t i = 0; i < lists[k]->n; i++)
            if (strncmp(lists[k]->items[i], "https://", 8) != 0) {
                snprintf(err, len, "key \"%s\": item %zu \"%.80s\" must be an https:// URL",
                         names[k], i, lists[k]->items[i]);
                return -1;
            }
    for (size_t i = 0; i < c->sip_proxies.n; i++) {
        const char *it = c->sip_proxies.items[i], *eq = strchr(it, '=');
        const char *bad = strpbrk(it, " \t@");
        if (!eq || eq == it || !eq[1] || (bad && bad < eq) || strchr(eq + 1, ' ')) {
            snprintf(err, len,
                     "key \"sip_proxies\": item %zu \"%.80s\" must be domain=NAME (or "
                     "domain=sip:NAME@overlay)",
                     i, it);
            return -1;
        }
    }
    return 0;
}

static const struct cfg_schema ls_schema = {ls_fields, sizeof(ls_fields) / sizeof(ls_fields[0]),
                                            ls_validate};

static const struct cli_option user_opts[] = {
    {"password-file", "FILE", "user add/passwd: read the password from FILE (first line)"},
    {"no-supernode", NULL, "user add: the account may not act as a super node"},
    {NULL, NULL, NULL},
};
static const struct cli_option issue_opts[] = {
    {"service", "NAMES", "host names/addresses of the service, comma-separated (first = CN)"},
    {"node", "NAMES",
     "node credentials for these users, comma-separated, without an enrollment "
     "(provisioning, test fleets)"},
    {"count", "N", "with --node NAME: NAME1 ... NAMEN"},
    {"no-supernode", NULL, "with --node: certificates without the super node role"},
    {"out", "DIR",
     "where to write (default: <state_dir>/services, or <state_dir>/nodes for --node): one "
     "state directory per node, as `enroll` makes"},
    {NULL, NULL, NULL},
};

static const struct cli_command ls_commands[] = {
    {"run", "serve enrollment and the configuration document over HTTPS", NULL},
    {"init", "create the state directory: CA, server certificate, user store, document", NULL},
    {"user",
     "user add|del|passwd NAME, user list, user supernode NAME yes|no, user devices NAME, "
     "user forget NAME DEVICE",
     user_opts},
    {"issue",
     "issue --service NAMES: a certificate for a service host (bootstrap server); issue --node "
     "NAMES [--count N]: node state directories without enrollment",
     issue_opts},
    {"publish", "sign and serve a new version of the document from the current settings", NULL},
    {NULL, NULL, NULL},
};

static const struct cli_prog ls_prog = {
    .name = "loginserver",
    .summary = "Login server of the p2psip overlay: its certificate authority and enrollment "
               "service.",
    .commands = ls_commands,
    .schema = &ls_schema,
    .epilog = "Passwords: --password-file FILE, else one line from standard input, else (on a\n"
              "terminal) a prompt. They are stored only as salted PBKDF2-SHA256 hashes.\n",
};

/* ---- The document ------------------------------------------------------------------------ */

static char *build_document(const struct ls_config *c, const struct ls_ca *ca, long long seq)
{
    struct overlay_doc d;
    memset(&d, 0, sizeof(d));
    overlay_doc_defaults(&d);
    char stamp[32], url[300];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &tm);
    char *default_url[1] = {url};
    if (c->login_urls.n == 0) {
        char host[64];
        unsigned port;
        cfg_parse_hostport(c->listen, host, sizeof(host), &port);
        bool any = !strcmp(host, "0.0.0.0") || !strcmp(host, "::");
        snprintf(url, sizeof(url), strchr(host, ':') ? "https://[%s]:%u" : "https://%s:%u",
                 any ? "127.0.0.1" : host, port);
        if (any || port == 0)
            log_warn("main",
                     "login_urls not set: the document names %s; nodes elsewhere cannot "
                     "use; set login_urls to the address nodes reach this server at",
                     url);
    }
    d.overlay = ca->overlay;
    d.sequence = seq;
    d.issued_at = stamp;
    d.ca_cert_pem = ca->ca_pem;
    d.login_urls = c->login_urls.n ? c->login_urls.items : default_url;
    d.n_login_urls = c->login_urls.n ? c->login_urls.n : 1;
    d.bootstrap_urls = c->bootstrap_urls.items;
    d.n_bootstrap_urls = c->bootstrap_urls.n;
    d.replication_factor = c->replication_factor;
    d.max_record_bytes = c->max_record_bytes;
    d.max_record_lifetime_s = c->max_record_lifetime_s;
    d.keepalive_s = c->keepalive_s;
    d.stabilize_s = c->stabilize_s;
    d.successor_list = c->successor_list;
    d.promotion.min_uptime_s = c->promotion_min_uptime_s;
    d.promotion.min_cpus = c->promotion_min_cpus;
    d.promotion.min_free_mem_mb = c->promotion_min_free_mem_mb;
    d.promotion.min_bandwidth_kbps = c->promotion_min_bandwidth_kbps;
    d.promotion.sn_target_load = c->promotion_sn_target_load;
    d.lan_discovery = c->lan_discovery;
    d.cert_validity_days = c->cert_validity_days;
    /* "domain=NAME" or "domain=sip:NAME@overlay": split into the document's pairs. */
    static struct overlay_sip_proxy px[256];
    static char buf[256][2][300];
    for (size_t i = 0; i < c->sip_proxies.n && i < 256; i++) {
        const char *it = c->sip_proxies.items[i], *eq = strchr(it, '=');
        snprintf(buf[i][0], sizeof(buf[i][0]), "%.*s", (int)(eq - it), it);
        if (!strncmp(eq + 1, "sip:", 4))
            snprintf(buf[i][1], sizeof(buf[i][1]), "%s", eq + 1);
        else
            snprintf(buf[i][1], sizeof(buf[i][1]), "sip:%.120s@%.160s", eq + 1, ca->overlay);
        px[i].domain = buf[i][0];
        px[i].uri = buf[i][1];
    }
    d.sip_proxies = px;
    d.n_sip_proxies = c->sip_proxies.n < 256 ? c->sip_proxies.n : 256;
    return overlay_doc_build(&d); /* d borrows everything: nothing to free */
}

static int publish(const struct ls_config *c, struct ls_ca *ca, long long seq)
{
    char err[256];
    char *text = build_document(c, ca, seq);
    if (!text || ls_ca_publish(ca, text, seq, err, sizeof(err)) != 0) {
        fprintf(stderr, "loginserver: %s\n", text ? err : "cannot build the document");
        free(text);
        return 1;
    }
    free(text);
    return 0;
}

static int users_path(const struct ls_config *c, char *buf, size_t len)
{
    return fs_join(buf, len, c->state_dir, "users.db");
}

static int cmd_init(const struct ls_config *c)
{
    char err[512], host[64];
    unsigned port;
    cfg_parse_hostport(c->listen, host, sizeof(host), &port);
    const char *defaults[5] = {"localhost", "127.0.0.1", "::1", NULL, NULL};
    if (strcmp(host, "0.0.0.0") && strcmp(host, "::") && strcmp(host, "127.0.0.1") &&
        strcmp(host, "::1"))
        defaults[3] = host;
    const char *const *hosts =
        c->server_names.n ? (const char *const *)c->server_names.items : defaults;
    struct ls_ca *ca;
    if (ls_ca_create(c->state_dir, c->overlay, hosts, &ca, err, sizeof(err)) != 0) {
        fprintf(stderr, "loginserver: %s\n", err);
        return 1;
    }
    int rc = publish(c, ca, 1);
    struct userstore *us = NULL;
    char db[4096];
    if (rc == 0 &&
        (users_path(c, db, sizeof(db)) || userstore_open(db, &us, err, sizeof(err)) != US_OK)) {
        fprintf(stderr, "loginserver: cannot create the user store: %s\n", err);
        rc = 1;
    }
    if (rc == 0)
        printf("overlay %s initialised in %s\nCA pin: %s\n"
               "Give nodes the login URL and this pin; add users with 'loginserver user add'.\n",
               c->overlay, c->state_dir, ca->pin);
    userstore_close(us);
    ls_ca_free(ca);
    return rc;
}

static int cmd_publish(const struct ls_config *c)
{
    char err[512];
    struct ls_ca *ca;
    if (ls_ca_open(c->state_dir, &ca, err, sizeof(err)) != 0) {
        fprintf(stderr, "loginserver: %s\n", err);
        return 1;
    }
    int rc = publish(c, ca, ca->sequence + 1);
    if (rc == 0)
        printf("document sequence %lld published (a running server serves it after a restart)\n",
               ca->sequence);
    ls_ca_free(ca);
    return rc;
}

/* ---- Users ------------------------------------------------------------------------------- */

static void print_user(const struct user_info *u, void *ud)
{
    char when[32];
    time_t t = (time_t)u->created_at;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    printf("%-24s %-10s certificates %-4llu created %s\n", u->name,
           u->may_supernode ? "supernode" : "node-only", (unsigned long long)u->certs, when);
}

static void print_device(const struct device_info *d, void *ud)
{
    char made[32], last[32];
    time_t t = (time_t)d->created_at, u = (time_t)d->last_at;
    struct tm tm;
    (void)ud;
    gmtime_r(&t, &tm);
    strftime(made, sizeof(made), "%Y-%m-%dT%H:%M:%SZ", &tm);
    gmtime_r(&u, &tm);
    strftime(last, sizeof(last), "%Y-%m-%dT%H:%M:%SZ", &tm);
    printf("%-40s node %s first %s last %s\n", d->device, d->node_id, made, last);
}

static int cmd_user(const struct cli_opts *o, const struct ls_config *c)
{
    const char *sub = o->argc > 0 ? o->argv[0] : NULL;
    const char *name = o->argc > 1 ? o->argv[1] : NULL;
    static const struct {
        const char *sub;
        int args;
    } forms[] = {{"add", 2},       {"del", 2},     {"passwd", 2}, {"list", 1},
                 {"supernode", 3}, {"devices", 2}, {"forget", 3}};
    int want = -1;
    for (size_t i = 0; sub && i < sizeof(forms) / sizeof(forms[0]); i++)
        if (!strcmp(sub, forms[i].sub))
            want = forms[i].args;
    if (want < 0 || o->argc != want) {
        cli_error(&ls_prog, "usage: user add|del|passwd NAME, user list, user supernode NAME "
                            "yes|no, user devices NAME, user forget NAME DEVICE");
        return 2;
    }
    if (name && !userstore_name_valid(name)) {
        cli_error(&ls_prog,
                  "user name \"%s\": 1-64 characters of a-z 0-9 . _ -, starting with "
                  "a letter or digit",
                  name);
        return 2;
    }
    if (!strcmp(sub, "add") && userstore_name_hostlike(name)) {
        cli_error(&ls_prog,
                  "user name \"%s\" looks like a host name or an IP address: refused, so that no "
                  "user's certificate can pass for a server's (use '_' or no '.')",
                  name);
        return 2;
    }
    char db[4096], err[512];
    struct userstore *us;
    if (users_path(c, db, sizeof(db)) || access(db, F_OK) != 0) {
        fprintf(stderr, "loginserver: no user store in %s (run 'loginserver init' first)\n",
                c->state_dir);
        return 1;
    }
    if (userstore_open(db, &us, err, sizeof(err)) != US_OK) {
        fprintf(stderr, "loginserver: %s\n", err);
        return 1;
    }
    int rc = US_OK;
    char password[2048];
    if (!strcmp(sub, "list")) {
        rc = userstore_list(us, print_user, NULL);
    } else if (!strcmp(sub, "devices")) {
        rc = userstore_device_list(us, name, print_device, NULL);
    } else if (!strcmp(sub, "forget")) {
        rc = userstore_device_del(us, name, o->argv[2]);
    } else if (!strcmp(sub, "del")) {
        rc = userstore_del(us, name);
    } else if (!strcmp(sub, "supernode")) {
        bool yes = !strcmp(o->argv[2], "yes");
        if (!yes && strcmp(o->argv[2], "no")) {
            cli_error(&ls_prog, "user supernode NAME yes|no");
            userstore_close(us);
            return 2;
        }
        rc = userstore_set_supernode(us, name, yes);
    } else {
        if (cli_read_secret(cli_opt(o, "password-file"), true, password, sizeof(password), err,
                            sizeof(err)) != 0) {
            fprintf(stderr, "loginserver: %s\n", err);
            userstore_close(us);
            return 1;
        }
        if (!strcmp(sub, "add"))
            rc = userstore_add(us, name, password, !cli_opt(o, "no-supernode"),
                               (unsigned)c->pbkdf2_iterations);
        else
            rc = userstore_passwd(us, name, password, (unsigned)c->pbkdf2_iterations);
        explicit_bzero(password, sizeof(password));
    }
    if (rc != US_OK)
        fprintf(stderr, "loginserver: user %s%s%s: %s\n", sub, name ? " " : "", name ? name : "",
                userstore_errmsg(us));
    else if (strcmp(sub, "list") && strcmp(sub, "devices"))
        printf("user %s: %s done\n", name, sub);
    userstore_close(us);
    return rc == US_OK ? 0 : 1;
}

/* One node's credentials, minted here: the key never leaves this machine's --out directory. */
static int issue_one_node(struct ls_ca *ca, const struct ls_config *c, const char *name,
                          unsigned roles, const char *dir, char *err, size_t errlen)
{
    gnutls_x509_privkey_t key = NULL;
    gnutls_datum_t csr = {NULL, 0};
    gnutls_x509_crq_t crq = NULL;
    struct ls_issued is;
    memset(&is, 0, sizeof(is));
    int rc = -1;
    if (cred_keygen(&key) < 0 || cred_csr_make(key, name, &csr) < 0) {
        snprintf(err, errlen, "%s: cannot make a key", name);
        goto out;
    }
    if (ls_ca_check_csr((const char *)csr.data, csr.size, &crq, err, errlen) != 0)
        goto out;
    if (ls_ca_issue_node(ca, crq, name, roles, NULL, c->cert_validity_days, &is, err, errlen) != 0)
        goto out;
    rc = node_creds_save(dir, key, is.cert_pem, ca->ca_pem, ca->envelope, ca->pin, err, errlen);
out:
    free(is.cert_pem);
    if (crq)
        gnutls_x509_crq_deinit(crq);
    gnutls_free(csr.data);
    if (key)
        gnutls_x509_privkey_deinit(key);
    return rc;
}

static int cmd_issue_nodes(const struct cli_opts *o, const struct ls_config *c)
{
    const char *names = cli_opt(o, "node"), *count_s = cli_opt(o, "count");
    long count = 0;
    if (count_s) {
        char *end;
        count = strtol(count_s, &end, 10);
        if (*end || count < 1 || count > 1000000 || strchr(names, ',')) {
            cli_error(&ls_prog, "--count takes 1 to 1000000, with one --node NAME");
            return 2;
        }
    }
    char out_dir[4096], err[512], dir[4096], name[300];
    const char *out = cli_opt(o, "out");
    if (!out) {
        fs_join(out_dir, sizeof(out_dir), c->state_dir, "nodes");
        out = out_dir;
    }
    unsigned roles = ROLE_NODE | (cli_opt(o, "no-supernode") ? 0 : ROLE_SUPERNODE);
    struct ls_ca *ca;
    if (ls_ca_open(c->state_dir, &ca, err, sizeof(err)) != 0) {
        fprintf(stderr, "loginserver: %s\n", err);
        return 1;
    }
    if (!ca->envelope) {
        fprintf(stderr, "loginserver: no overlay document published yet\n");
        ls_ca_free(ca);
        return 1;
    }
    char *copy = strdup(names), *save = NULL;
    long made = 0;
    int rc = 0;
    for (char *t = strtok_r(copy, ",", &save); t && rc == 0; t = strtok_r(NULL, ",", &save)) {
        for (long i = count ? 1 : 0; i <= count && rc == 0; i++) {
            if (count)
                snprintf(name, sizeof(name), "%s%ld", t, i);
            else
                snprintf(name, sizeof(name), "%s", t);
            /* The name becomes a directory under --out and a certificate's URI: the same
             * rules as an account's name ("../x" would leave --out). */
            if (!userstore_name_valid(name) || userstore_name_hostlike(name)) {
                fprintf(stderr,
                        "loginserver: issue --node \"%s\": not a user name (1-64 characters "
                        "of a-z 0-9 . _ -, starting with a letter or digit, and not like a host "
                        "name or an IP address)\n",
                        name);
                rc = 2;
                break;
            }
            char probe[4200];
            if (fs_join(dir, sizeof(dir), out, name) == 0 &&
                fs_join(probe, sizeof(probe), dir, "cert.pem") == 0 && access(probe, F_OK) == 0) {
                fprintf(stderr,
                        "loginserver: issue --node %s: %s already holds credentials; "
                        "remove it first\n",
                        name, dir);
                rc = 1;
                break;
            }
            if (fs_join(dir, sizeof(dir), out, name) != 0 ||
                issue_one_node(ca, c, name, roles, dir, err, sizeof(err)) != 0) {
                fprintf(stderr, "loginserver: issue --node %s: %s\n", name, err);
                rc = 1;
                break;
            }
            made++;
        }
    }
    if (made)
        printf("%ld node state director%s in %s (roles %s)\n", made, made == 1 ? "y" : "ies", out,
               roles & ROLE_SUPERNODE ? "node,supernode" : "node");
    free(copy);
    ls_ca_free(ca);
    return rc;
}

static int cmd_issue(const struct cli_opts *o, const struct ls_config *c)
{
    if (cli_opt(o, "node") && !cli_opt(o, "service") && !o->argc)
        return cmd_issue_nodes(o, c);
    const char *names = cli_opt(o, "service");
    if (!names || !*names || o->argc) {
        cli_error(&ls_prog, "usage: issue --service NAME[,NAME...] [--out DIR], or issue --node "
                            "NAME[,NAME...] [--count N] [--no-supernode] [--out DIR]");
        return 2;
    }
    char *copy = strdup(names), *save = NULL;
    const char *hosts[17] = {0};
    size_t n = 0;
    for (char *t = strtok_r(copy, ",", &save); t && n < 16; t = strtok_r(NULL, ",", &save))
        hosts[n++] = t;
    char out_dir[4096], key[4096], crt[4096], err[512];
    const char *out = cli_opt(o, "out");
    if (!out) {
        fs_join(out_dir, sizeof(out_dir), c->state_dir, "services");
        out = out_dir;
    }
    struct ls_ca *ca;
    int rc = 1;
    if (ls_ca_open(c->state_dir, &ca, err, sizeof(err)) != 0) {
        fprintf(stderr, "loginserver: %s\n", err);
    } else if (ls_ca_issue_service(ca, hosts, out, 825, key, crt, sizeof(key), err, sizeof(err)) !=
               0) {
        fprintf(stderr, "loginserver: %s\n", err);
        ls_ca_free(ca);
    } else {
        printf("service certificate for %s:\n  key:         %s\n  certificate: %s\n"
               "  CA:          %s/ca.pem\n",
               hosts[0], key, crt, c->state_dir);
        ls_ca_free(ca);
        rc = 0;
    }
    free(copy);
    return rc;
}

static int ls_command(const struct cli_opts *o, void *p)
{
    const struct ls_config *c = p;
    if (!strcmp(o->command, "init") || !strcmp(o->command, "publish")) {
        if (o->argc) {
            cli_error(&ls_prog, "unexpected argument '%s' (try --help)", o->argv[0]);
            return 2;
        }
        return !strcmp(o->command, "init") ? cmd_init(c) : cmd_publish(c);
    }
    if (!strcmp(o->command, "user"))
        return cmd_user(o, c);
    if (!strcmp(o->command, "issue"))
        return cmd_issue(o, c);
    return 2;
}

/* ---- Daemon ------------------------------------------------------------------------------ */

struct ls_state {
    struct ls_ca *ca;
    struct userstore *users;
    struct ls_server *server;
};

static void ls_cleanup(void *p)
{
    struct ls_state *st = p;
    if (!st)
        return;
    ls_server_stop(st->server);
    userstore_close(st->users);
    ls_ca_free(st->ca);
    free(st);
}

static int ls_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct ls_config *c = p;
    struct ls_state *st = calloc(1, sizeof(*st));
    char err[512], db[4096];
    *state = st;
    if (!st)
        return -1;
    if (ls_ca_open(c->state_dir, &st->ca, err, sizeof(err)) != 0) {
        log_error("main", "%s", err);
        return -1;
    }
    if (strcmp(st->ca->overlay, c->overlay) != 0)
        log_warn("main",
                 "setting overlay=%s differs from the published document's %s: serving "
                 "%s",
                 c->overlay, st->ca->overlay, st->ca->overlay);
    if (users_path(c, db, sizeof(db)) || userstore_open(db, &st->users, err, sizeof(err)) != 0) {
        log_error("main", "user store %s: %s", db, err);
        return -1;
    }
    struct ls_server_config sc = {
        .listen = c->listen,
        .max_body = (size_t)c->max_body_bytes,
        .max_failures = (unsigned)c->max_failures,
        .max_failures_per_addr = (unsigned)c->max_failures_per_addr,
        .failure_window_s = (double)c->failure_window_s,
        .user_slowdown_s = (double)c->user_slowdown_s,
        .max_devices = (unsigned)c->max_devices,
        .max_certs_per_user = (unsigned)c->max_certs_per_user,
        .cert_window_s = (double)c->cert_window_s,
        .crl_next_update_s = c->crl_next_update_s,
        .validity_days = c->cert_validity_days,
        .max_connections = (unsigned)c->max_connections,
        .pbkdf2_iterations = (unsigned)c->pbkdf2_iterations,
        .pbkdf2_threads = (unsigned)c->pbkdf2_threads,
        .pbkdf2_queue = (unsigned)c->pbkdf2_queue,
        .pbkdf2_per_address = (unsigned)c->pbkdf2_per_address,
    };
    st->server = ls_server_start(loop, st->ca, st->users, &sc, err, sizeof(err));
    if (!st->server) {
        log_error("main", "%s", err);
        return -1;
    }
    log_info("main", "overlay %s: serving on %s port %d (document sequence %lld, CA pin %s)",
             st->ca->overlay, c->listen, ls_server_port(st->server), st->ca->sequence, st->ca->pin);
    return 0;
}

static void ls_stop(struct ev_loop *loop, void *p)
{
    struct ls_state *st = p;
    /* Enrollments in progress are dropped unanswered (their clients see the connection
     * close); workers finish their current check first. */
    ls_server_stop(st->server);
    st->server = NULL;
}

static const struct daemon_spec ls_spec = {
    .prog = &ls_prog,
    .schema = &ls_schema,
    .cfg_size = sizeof(struct ls_config),
    .command = ls_command,
    .start = ls_start,
    .stop = ls_stop,
    .cleanup = ls_cleanup,
};

int main(int argc, char **argv)
{
    return daemon_main(&ls_spec, argc, argv);
}
