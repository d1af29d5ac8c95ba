/*
 * bootstrap: the HTTPS server that lists live, verified super nodes for new
 * nodes (seed 004 section 5.1). Super nodes announce themselves to it.
 *
 * It serves docs/protocol.md section 3 with a service certificate from the
 * overlay CA (loginserver issue --service NAME).
 */
#include <stdio.h>
#include <stdlib.h>

#include "daemon.h"
#include "fsutil.h"
#include "log.h"
#include "renewer.h"
#include "server.h"

struct bs_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *listen;
    char *state_dir;
    char *ca_file;
    char *cert_file;
    char *key_file;
    long long announce_period_s;
    bool public_only;
    long long max_capacity;
    long long max_supernodes;
    long long reverify_periods;
    long long max_announces;
    long long check_timeout_ms;
    long long max_body_bytes;
    long long max_connections;
    long long max_connections_per_address;
    struct cfg_strlist login_urls;
    long long crl_check_interval_s;
};

/* What runs: the server, and the fetcher of the overlay's revocation list (may be NULL). */
struct bs_state {
    struct bs_server *server;
    struct renewer_crl *crl;
};

static const struct cfg_field bs_fields[] = {
    DAEMON_BASE_FIELDS(struct bs_config),
    {"overlay", CFG_STR, offsetof(struct bs_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name"},
    {"listen", CFG_HOSTPORT, offsetof(struct bs_config, listen), 0, 0, NULL, "0.0.0.0:8443",
     "HTTPS address and port"},
    {"state_dir", CFG_PATH, offsetof(struct bs_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/bootstrap", "where the service certificate is kept"},
    {"ca_file", CFG_PATH, offsetof(struct bs_config, ca_file), 0, 0, NULL, NULL,
     "overlay CA certificate (PEM)"},
    {"cert_file", CFG_PATH, offsetof(struct bs_config, cert_file), 0, 0, NULL, NULL,
     "service certificate (PEM)"},
    {"key_file", CFG_PATH, offsetof(struct bs_config, key_file), 0, 0, NULL, NULL,
     "service private key (PKCS#8 PEM)"},
    {"announce_period_s", CFG_INT, offsetof(struct bs_config, announce_period_s), 1, 3600, NULL,
     "30", "how often super nodes announce; 3 missed announces drop one"},
    {"max_supernodes", CFG_INT, offsetof(struct bs_config, max_supernodes), 1, 1000000, NULL,
     "10000", "most super nodes tracked at once"},
    {"reverify_periods", CFG_INT, offsetof(struct bs_config, reverify_periods), 1, 100000, NULL,
     "10", "re-check a listed super node's address after this many periods"},
    {"max_announces", CFG_INT, offsetof(struct bs_config, max_announces), 1, 100000000, NULL, "10",
     "announces per super node per period before 429"},
    {"check_timeout_ms", CFG_INT, offsetof(struct bs_config, check_timeout_ms), 100, 60000, NULL,
     "5000", "time allowed for the TLS check of an announced address"},
    {"max_body_bytes", CFG_INT, offsetof(struct bs_config, max_body_bytes), 256, 1048576, NULL,
     "4096", "largest announce body; larger ones get 413"},
    {"max_connections", CFG_INT, offsetof(struct bs_config, max_connections), 1, 100000, NULL,
     "1024", "simultaneous HTTPS connections"},
    {"max_connections_per_address", CFG_INT,
     offsetof(struct bs_config, max_connections_per_address), 1, 100000, NULL, "64",
     "simultaneous HTTPS connections from one IPv4 address or IPv6 /64"},
    {"public_only", CFG_BOOL, offsetof(struct bs_config, public_only), 0, 0, NULL, "true",
     "refuse announces of addresses that are not public (loopback ones pass when listen is "
     "loopback); false for a LAN overlay"},
    {"max_capacity", CFG_INT, offsetof(struct bs_config, max_capacity), 1, 10000000, NULL, "10000",
     "announced capacities count up to this in the weighted list"},
    {"login_urls", CFG_STRLIST, offsetof(struct bs_config, login_urls), 0, 0, NULL, NULL,
     "login servers (https://host:port) whose revocation list is fetched: revoked super nodes "
     "are then refused (default: none, and no list)"},
    {"crl_check_interval_s", CFG_INT, offsetof(struct bs_config, crl_check_interval_s), 1, 86400,
     NULL, "3600", "longest time between two fetches of the revocation list"},
};

static const struct cfg_schema bs_schema = {bs_fields, sizeof(bs_fields) / sizeof(bs_fields[0]),
                                            NULL};

static const struct cli_command bs_commands[] = {
    {"run", "run the bootstrap server", NULL},
    {NULL, NULL, NULL},
};

static const struct cli_prog bs_prog = {
    .name = "bootstrap",
    .summary = "Bootstrap server of the p2psip overlay: lists live, verified super nodes.",
    .commands = bs_commands,
    .schema = &bs_schema,
};

static int bs_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct bs_config *cfg = p;
    *state = NULL;
    if (!cfg->ca_file || !cfg->cert_file || !cfg->key_file) {
        log_error("main", "set ca_file, cert_file and key_file: the overlay CA and this server's "
                          "service certificate (loginserver issue --service NAME)");
        return -1;
    }
    struct bs_server_config sc = {
        .listen = cfg->listen,
        .overlay = cfg->overlay,
        .ca_file = cfg->ca_file,
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .period_s = (double)cfg->announce_period_s,
        .reverify_periods = (unsigned)cfg->reverify_periods,
        .max_supernodes = (size_t)cfg->max_supernodes,
        .max_announces = (unsigned)cfg->max_announces,
        .public_only = cfg->public_only,
        .max_capacity = (unsigned long)cfg->max_capacity,
        .check_timeout_ms = (unsigned)cfg->check_timeout_ms,
        .max_body = (size_t)cfg->max_body_bytes,
        .max_connections = (unsigned)cfg->max_connections,
        .max_per_address = (unsigned)cfg->max_connections_per_address,
    };
    char err[512];
    struct bs_state *st = calloc(1, sizeof(*st));
    if (!st) {
        log_error("main", "out of memory");
        return -1;
    }
    /* The list first: a revoked super node must not pass an announce made right at start. */
    if (cfg->login_urls.n > 0) {
        char crl_path[4096];
        struct renewer_crl_config rc = {
            .login_urls = (const char *const *)cfg->login_urls.items,
            .n_login_urls = cfg->login_urls.n,
            .ca_file = cfg->ca_file,
            .crl_path = fs_join(crl_path, sizeof(crl_path), cfg->state_dir, "crl.pem") == 0
                            ? crl_path
                            : NULL,
            .max_interval_s = (double)cfg->crl_check_interval_s,
        };
        st->crl = renewer_crl_start(loop, &rc);
        if (!st->crl) {
            free(st);
            return -1;
        }
    }
    st->server = bs_server_start(loop, &sc, err, sizeof(err));
    if (!st->server) {
        log_error("main", "%s", err);
        renewer_crl_stop(st->crl);
        free(st);
        return -1;
    }
    *state = st;
    log_info("main", "overlay %s: serving on %s port %d (announce period %llds%s)", cfg->overlay,
             cfg->listen, bs_server_port(st->server), cfg->announce_period_s,
             cfg->public_only ? ", public addresses only" : "");
    return 0;
}

static void bs_stop(struct ev_loop *loop, void *state)
{
    struct bs_state *st = state;
    renewer_crl_stop(st->crl);
    st->crl = NULL;
    bs_server_stop(st->server);
}

static void bs_cleanup(void *state)
{
    struct bs_state *st = state;
    if (!st)
        return;
    renewer_crl_stop(st->crl);
    bs_server_free(st->server);
    free(st);
}

static const struct daemon_spec bs_spec = {
    .prog = &bs_prog,
    .schema = &bs_schema,
    .cfg_size = sizeof(struct bs_config),
    .start = bs_start,
    .stop = bs_stop,
    .cleanup = bs_cleanup,
};

int main(int argc, char **argv)
{
    return daemon_main(&bs_spec, argc, argv);
}
