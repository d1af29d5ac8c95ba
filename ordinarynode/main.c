/*
 * ordinarynode: what a person runs on their own device (seed 004 sections
 * 5-7). It will find a super node, stay attached, publish the user's
 * location and offer a local SIP registrar/proxy to softphones.
 *
 * This is the daemon's skeleton: command line, checked configuration, the
 * event loop and a clean stop. docs/architecture.md says what comes next.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "enroll.h"
#include "renewer.h"
#include "log.h"

struct on_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *state_dir;
    char *sip_listen;
    char *control_socket;
    struct cfg_strlist supernodes;
    struct cfg_strlist bootstrap_urls;
    long long cert_renew_margin_s;
    long long cert_check_interval_s;
};

static const struct cfg_field on_fields[] = {
    DAEMON_BASE_FIELDS(struct on_config),
    {"overlay", CFG_STR, offsetof(struct on_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name"},
    {"state_dir", CFG_PATH, offsetof(struct on_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/ordinarynode", "where credentials and the super node cache are kept"},
    {"sip_listen", CFG_HOSTPORT, offsetof(struct on_config, sip_listen), 0, 0, NULL,
     "127.0.0.1:5060", "local SIP registrar/proxy address for softphones"},
    {"control_socket", CFG_PATH, offsetof(struct on_config, control_socket), 0, 0, NULL, NULL,
     "UNIX socket for the command-line client (default: <state_dir>/control.sock)"},
    {"supernodes", CFG_STRLIST, offsetof(struct on_config, supernodes), 0, 0, NULL, NULL,
     "super node addresses (host:port) to try first"},
    {"cert_renew_margin_s", CFG_INT, offsetof(struct on_config, cert_renew_margin_s), 0, 315360000,
     NULL, "0",
     "renew the certificate once less than this remains (0 = a third of "
     "its validity)"},
    {"cert_check_interval_s", CFG_INT, offsetof(struct on_config, cert_check_interval_s), 1, 86400,
     NULL, "3600", "how often the certificate's expiry is checked"},
    {"bootstrap_urls", CFG_STRLIST, offsetof(struct on_config, bootstrap_urls), 0, 0, NULL, NULL,
     "bootstrap server URLs (https://...)"},
};

static int on_validate(const void *p, char *err, size_t len)
{
    const struct on_config *c = p;
    for (size_t i = 0; i < c->supernodes.n; i++)
        if (cfg_parse_hostport(c->supernodes.items[i], NULL, 0, NULL) != 0) {
            snprintf(err, len,
                     "key \"supernodes\": item %zu \"%.80s\" is not a numeric "
                     "host:port",
                     i, c->supernodes.items[i]);
            return -1;
        }
    for (size_t i = 0; i < c->bootstrap_urls.n; i++)
        if (strncmp(c->bootstrap_urls.items[i], "https://", 8) != 0) {
            snprintf(err, len,
                     "key \"bootstrap_urls\": item %zu \"%.80s\" must be an https:// "
                     "URL",
                     i, c->bootstrap_urls.items[i]);
            return -1;
        }
    return 0;
}

static const struct cfg_schema on_schema = {on_fields, sizeof(on_fields) / sizeof(on_fields[0]),
                                            on_validate};

static const struct cli_command on_commands[] = {
    {"run", "run the ordinary node", NULL},
    {"enroll", "get this node's certificate from the login server (once)", enroll_options},
    {"renew", "renew this node's certificate (same Node-ID, new key)", renew_options},
    {NULL, NULL, NULL},
};

static const struct cli_prog on_prog = {
    .name = "ordinarynode",
    .summary = "Ordinary node of the p2psip overlay: attaches to a super node and serves the "
               "local SIP phone.",
    .commands = on_commands,
    .schema = &on_schema,
};

static int on_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct on_config *cfg = p;
    log_info("main", "overlay %s: state in %s, SIP front end to be on %s", cfg->overlay,
             cfg->state_dir, cfg->sip_listen);
    struct renewer_config rc = {
        .state_dir = cfg->state_dir,
        .margin_s = (double)cfg->cert_renew_margin_s,
        .check_interval_s = (double)cfg->cert_check_interval_s,
    };
    *state = renewer_start(loop, &rc); /* NULL until the node is enrolled */
    return 0;
}

static void on_stop(struct ev_loop *loop, void *state)
{
    renewer_stop(state);
}

static int on_command(const struct cli_opts *o, void *p)
{
    const struct on_config *cfg = p;
    if (strcmp(o->command, "enroll") == 0)
        return enroll_command(&on_prog, o, cfg->state_dir);
    if (strcmp(o->command, "renew") == 0)
        return renew_command(&on_prog, o, cfg->state_dir);
    return 2;
}

static const struct daemon_spec on_spec = {
    .prog = &on_prog,
    .schema = &on_schema,
    .cfg_size = sizeof(struct on_config),
    .command = on_command,
    .start = on_start,
    .stop = on_stop,
};

int main(int argc, char **argv)
{
    return daemon_main(&on_spec, argc, argv);
}
