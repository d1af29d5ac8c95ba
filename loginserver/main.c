/*
 * loginserver: the overlay's certificate authority and enrollment service
 * (seed 004 sections 3, 5.4, 11.2).
 *
 * This is the daemon's skeleton: command line, checked configuration, the
 * event loop and a clean stop. docs/architecture.md says what comes next.
 */
#include <stdio.h>
#include <stdlib.h>

#include "daemon.h"
#include "log.h"

struct ls_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *listen;
    char *state_dir;
    long long cert_validity_days;
    long long max_body_bytes;
};

static const struct cfg_field ls_fields[] = {
    DAEMON_BASE_FIELDS(struct ls_config),
    {"overlay", CFG_STR, offsetof(struct ls_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name"},
    {"listen", CFG_HOSTPORT, offsetof(struct ls_config, listen), 0, 0, NULL, "0.0.0.0:8440",
     "HTTPS address and port"},
    {"state_dir", CFG_PATH, offsetof(struct ls_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/loginserver", "CA key, user store and configuration document"},
    {"cert_validity_days", CFG_INT, offsetof(struct ls_config, cert_validity_days), 1, 3650, NULL,
     "365", "validity of the certificates issued to nodes"},
    {"max_body_bytes", CFG_INT, offsetof(struct ls_config, max_body_bytes), 1024, 1048576, NULL,
     "16384", "largest accepted request body"},
};

static const struct cfg_schema ls_schema = {ls_fields, sizeof(ls_fields) / sizeof(ls_fields[0]),
                                            NULL};

static const struct cli_command ls_commands[] = {
    {"run", "run the login server"},
    {NULL, NULL},
};

static const struct cli_prog ls_prog = {
    .name = "loginserver",
    .summary = "Login server of the p2psip overlay: its certificate authority and enrollment "
               "service.",
    .commands = ls_commands,
    .schema = &ls_schema,
};

static int ls_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct ls_config *cfg = p;
    log_info("main", "overlay %s: state in %s, HTTPS to be on %s", cfg->overlay, cfg->state_dir,
             cfg->listen);
    *state = NULL;
    return 0;
}

static const struct daemon_spec ls_spec = {
    .prog = &ls_prog,
    .schema = &ls_schema,
    .cfg_size = sizeof(struct ls_config),
    .start = ls_start,
};

int main(int argc, char **argv)
{
    return daemon_main(&ls_spec, argc, argv);
}
