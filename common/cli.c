/*
 * Shared command-line parsing. getopt_long does the work; we own the error
 * messages so that each names the flag and says what is wrong in one line.
 */
#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

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
    for (const struct cli_command *c = prog->commands; c && c->name; c++) {
        printf("  %-14s %s%s\n", c->name, c->help, c == prog->commands ? " (default)" : "");
        for (const struct cli_option *co = c->options; co && co->name; co++) {
            char spec[64];
            snprintf(spec, sizeof(spec), "--%s%s%s", co->name, co->arg ? " " : "",
                     co->arg ? co->arg : "");
            printf("      %-22s %s\n", spec, co->help);
        }
    }
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

const char *cli_opt(const struct cli_opts *o, const char *name)
{
    for (size_t i = 0; i < o->n_opts; i++)
        if (strcmp(o->opt_names[i], name) == 0)
            return o->opt_values[i];
    return NULL;
}

/*
 * The command word: the first operand, skipping the values of global options
 * that take one. Needed before parsing, because the command's own options
 * join the table getopt works from.
 */
static const struct cli_command *find_command(const struct cli_prog *prog, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            a = i + 1 < argc ? argv[i + 1] : NULL;
        else if (a[0] == '-') {
            if (!strcmp(a, "-c") || !strcmp(a, "-o") || !strcmp(a, "--config") ||
                !strcmp(a, "--set"))
                i++;
            continue;
        }
        for (const struct cli_command *c = prog->commands; a && c && c->name; c++)
            if (strcmp(c->name, a) == 0)
                return c;
        return NULL;
    }
    return NULL;
}

enum cli_result cli_parse(const struct cli_prog *prog, int argc, char **argv, struct cli_opts *o)
{
    memset(o, 0, sizeof(*o));
    opterr = 0; /* we print our own messages */
    optind = 1;

    /* Global options, then the command's own (getopt values 512 + index). */
    enum { N_GLOBAL = sizeof(long_opts) / sizeof(long_opts[0]) - 1 };
    struct option table[N_GLOBAL + CLI_MAX_CMD_OPTIONS + 1];
    memcpy(table, long_opts, sizeof(struct option) * N_GLOBAL);
    size_t n = N_GLOBAL;
    const struct cli_command *cmd = find_command(prog, argc, argv);
    for (const struct cli_option *co = cmd ? cmd->options : NULL;
         co && co->name && n < N_GLOBAL + CLI_MAX_CMD_OPTIONS; co++, n++)
        table[n] = (struct option){co->name, co->arg ? required_argument : no_argument, NULL,
                                   512 + (int)(co - cmd->options)};
    table[n] = (struct option){NULL, 0, NULL, 0};

    int c;
    while ((c = getopt_long(argc, argv, ":hVc:vndo:", table, NULL)) != -1) {
        if (c >= 512 && cmd) {
            if (o->n_opts == CLI_MAX_CMD_OPTIONS) {
                cli_error(prog, "too many command options");
                return CLI_EXIT_USAGE;
            }
            o->opt_names[o->n_opts] = cmd->options[c - 512].name;
            o->opt_values[o->n_opts++] = optarg ? optarg : "";
            continue;
        }
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
        for (const struct cli_command *k = prog->commands; k && k->name; k++)
            if (strcmp(k->name, want) == 0)
                found = k;
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

/* Reads one line into buf without its line end; false at end of input. */
static bool read_line(FILE *f, char *buf, size_t len)
{
    if (!fgets(buf, (int)len, f))
        return false;
    buf[strcspn(buf, "\r\n")] = '\0';
    return true;
}

static bool prompt_line(const char *prompt, char *buf, size_t len)
{
    struct termios old, quiet;
    fputs(prompt, stderr);
    bool echo_off = tcgetattr(STDIN_FILENO, &old) == 0;
    if (echo_off) {
        quiet = old;
        quiet.c_lflag &= ~(tcflag_t)ECHO;
        tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
    }
    bool ok = read_line(stdin, buf, len);
    if (echo_off)
        tcsetattr(STDIN_FILENO, TCSANOW, &old);
    fputc('\n', stderr);
    return ok;
}

int cli_read_secret(const char *file, bool confirm, char *buf, size_t len, char *err, size_t errlen)
{
    if (file) {
        FILE *f = fopen(file, "re");
        if (!f) {
            snprintf(err, errlen, "cannot read %s: %s", file, strerror(errno));
            return -1;
        }
        bool ok = read_line(f, buf, len);
        fclose(f);
        if (!ok)
            snprintf(err, errlen, "%s is empty", file);
        return ok ? 0 : -1;
    }
    if (!isatty(STDIN_FILENO)) {
        if (read_line(stdin, buf, len))
            return 0;
        snprintf(err, errlen, "no password on standard input");
        return -1;
    }
    if (!prompt_line("Password: ", buf, len)) {
        snprintf(err, errlen, "no password given");
        return -1;
    }
    if (confirm) {
        char again[1024];
        bool same = prompt_line("Again: ", again, sizeof(again)) && strcmp(again, buf) == 0;
        explicit_bzero(again, sizeof(again));
        if (!same) {
            snprintf(err, errlen, "the passwords differ");
            return -1;
        }
    }
    return 0;
}
