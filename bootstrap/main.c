/*
 * bootstrap: the HTTPS server that lists live, verified super nodes for new
 * nodes (seed 004 section 5.1). Super nodes announce themselves to it.
 *
 * This is the daemon's skeleton: command line, checked configuration, the
 * event loop and a clean stop. docs/architecture.md says what comes next.
 */
#include <stdio.h>
#include <stdlib.h>

#include "daemon.h"
#include "log.h"

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
    {"public_only", CFG_BOOL, offsetof(struct bs_config, public_only), 0, 0, NULL, "false",
     "refuse announces of private or unspecified addresses"},
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
    log_info("main", "overlay %s: announce period %llds, HTTPS to be on %s", cfg->overlay,
             cfg->announce_period_s, cfg->listen);
    *state = NULL;
    return 0;
}

static const struct daemon_spec bs_spec = {
    .prog = &bs_prog,
    .schema = &bs_schema,
    .cfg_size = sizeof(struct bs_config),
    .start = bs_start,
};

int main(int argc, char **argv)
{
    return daemon_main(&bs_spec, argc, argv);
}
