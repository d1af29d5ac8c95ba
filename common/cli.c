/*
 * Shared command-line parsing. getopt_long does the work; we own the error
 * messages so that each names the flag and says what is wrong in one line.
 */
#include "cli.h"

#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "version.h"

enum { OPT_LOG_JSON = 256 };

static const struct option long_opts[] = {
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {"config", required_argument, NULL, 'c'},
    {"verbose", no_argument, NULL, 'v'},
    {"check-config", no_argument, NULL, 'n'},
    {"foreground", no_argument, NULL, 'd'},
    {"set", required_argument, NULL, 'o'},
    {"log-json", no_argument, NULL, OPT_LOG_JSON},
    {NULL, 0, NULL, 0},
};

void cli_error(const struct cli_prog *prog, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog->name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void print_help(const struct cli_prog *prog)
{
    printf("Usage: %s [OPTIONS] [COMMAND]\n%s\n\nCommands:\n", prog->name, prog->summary);
    for (const struct cli_command *c = prog->commands; c && c->name; c++)
        printf("  %-14s %s%s\n", c->name, c->help, c == prog->commands ? " (default)" : "");
    printf("\nOptions:\n"
           "  -c, --config FILE    read settings from FILE (JSON); default: built-in defaults\n"
           "  -o, --set KEY=VALUE  override one setting after the file (repeatable)\n"
           "  -n, --check-config   validate the settings, print them with -v, and exit\n"
           "  -d, --foreground     stay in the foreground and log to stderr (default: detach,\n"
           "                       log to log_file or syslog)\n"
           "  -v, --verbose        more logging: -v debug, -vv trace\n"
           "      --log-json       log one JSON object per line\n"
           "  -V, --version        print the version and exit\n"
           "  -h, --help           print this help and exit\n");
    if (prog->schema) {
        char *keys = cfg_help(prog->schema);
        if (keys)
            printf("\n%s", keys);
        free(keys);
    }
    if (prog->epilog)
        printf("\n%s", prog->epilog);
    printf("\nExit status: 0 on success, 1 on a runtime failure, 2 on a usage or configuration "
           "error.\n");
}

/* The option as the user typed it, for error messages. */
static const char *typed_opt(char **argv, int optind_now)
{
    const char *s = argv[optind_now - 1];
    return s ? s : "?";
}

enum cli_result cli_parse(const struct cli_prog *prog, int argc, char **argv, struct cli_opts *o)
{
    memset(o, 0, sizeof(*o));
    opterr = 0; /* we print our own messages */
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, ":hVc:vndo:", long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            print_help(prog);
            return CLI_EXIT_OK;
        case 'V':
            printf("%s %s (p2psip, protocol version %d)\n", prog->name, P2P_VERSION,
                   P2P_PROTOCOL_VERSION);
            return CLI_EXIT_OK;
        case 'c':
            if (!*optarg) {
                cli_error(prog, "option '--config' needs a file name");
                return CLI_EXIT_USAGE;
            }
            o->config_path = optarg;
            break;
        case 'v':
            o->verbose++;
            break;
        case 'n':
            o->check_config = true;
            break;
        case 'd':
            o->foreground = true;
            break;
        case 'o':
            if (!strchr(optarg, '=') || optarg[0] == '=') {
                cli_error(prog, "option '--set' needs KEY=VALUE, got '%s'", optarg);
                return CLI_EXIT_USAGE;
            }
            if (o->n_overrides == CLI_MAX_OVERRIDES) {
                cli_error(prog, "option '--set' given more than %d times", CLI_MAX_OVERRIDES);
                return CLI_EXIT_USAGE;
            }
            o->overrides[o->n_overrides++] = optarg;
            break;
        case OPT_LOG_JSON:
            o->log_json = true;
            break;
        case ':':
            cli_error(prog, "option '%s' needs an argument (try --help)", typed_opt(argv, optind));
            return CLI_EXIT_USAGE;
        default: {
            const char *typed = typed_opt(argv, optind);
            const char *eq = strchr(typed, '=');
            if (typed[0] == '-' && typed[1] == '-' && eq) {
                /* getopt reports "--help=x" like an unknown option: say what is wrong. */
                cli_error(prog, "option '%.*s' takes no value (try --help)", (int)(eq - typed),
                          typed);
                return CLI_EXIT_USAGE;
            }
            if (optopt)
                cli_error(prog, "unknown option '-%c' (try --help)", optopt);
            else
                cli_error(prog, "unknown option '%s' (try --help)", typed_opt(argv, optind));
            return CLI_EXIT_USAGE;
        }
        }
    }

    o->command = prog->commands ? prog->commands[0].name : "run";
    if (optind < argc) {
        const char *want = argv[optind];
        const struct cli_command *found = NULL;
        for (const struct cli_command *cmd = prog->commands; cmd && cmd->name; cmd++)
            if (strcmp(cmd->name, want) == 0)
                found = cmd;
        if (!found) {
            cli_error(prog, "unknown command '%s' (try --help)", want);
            return CLI_EXIT_USAGE;
        }
        o->command = found->name;
        optind++;
    }
    o->argc = argc - optind;
    o->argv = argv + optind;
    return CLI_CONTINUE;
}
