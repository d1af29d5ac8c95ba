/*
 * The command line every daemon shares (OpenBSD-daemon style):
 *   -h/--help  -V/--version  -c/--config FILE  -v/--verbose (repeatable)
 *   -n/--check-config  -d/--foreground  -o/--set KEY=VALUE  --log-json
 * followed by an optional command ("run" by default). A bad flag or value is
 * one line on stderr naming it, and exit status 2.
 */
#ifndef P2P_CLI_H
#define P2P_CLI_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"

#define CLI_MAX_OVERRIDES   64
#define CLI_MAX_CMD_OPTIONS 16

/* An option of one command only (e.g. "issue --service NAME"). */
struct cli_option {
    const char *name; /* long name without dashes */
    const char *arg;  /* argument name for --help ("NAME"), or NULL for a flag */
    const char *help;
};

struct cli_command {
    const char *name;
    const char *help;                 /* one line for --help */
    const struct cli_option *options; /* NULL-terminated by name, or NULL */
};

struct cli_prog {
    const char *name;                   /* "supernode" */
    const char *summary;                /* one line: what the program is */
    const struct cli_command *commands; /* first is the default; NULL-terminated by name */
    const char *epilog;                 /* extra --help text (examples), may be NULL */
    const struct cfg_schema *schema;    /* its keys are listed by --help; may be NULL */
};

struct cli_opts {
    const char *config_path;
    int verbose;
    bool check_config;
    bool foreground;
    bool log_json;
    const char *overrides[CLI_MAX_OVERRIDES]; /* "key=value", applied after the file */
    size_t n_overrides;
    const char *command;
    int argc; /* operands after the command */
    char **argv;
    /* The command's own options that were given: name and value ("" for flags). */
    const char *opt_names[CLI_MAX_CMD_OPTIONS];
    const char *opt_values[CLI_MAX_CMD_OPTIONS];
    size_t n_opts;
};

/* The value of a command option ("" for a flag given), or NULL when absent. */
const char *cli_opt(const struct cli_opts *o, const char *name);

enum cli_result {
    CLI_CONTINUE = -1, /* go on: options parsed */
    CLI_EXIT_OK = 0,   /* --help or --version was printed */
    CLI_EXIT_USAGE = 2,
};

/* Parses argv into *o. Prints help/version to stdout, errors (one line) to stderr. */
enum cli_result cli_parse(const struct cli_prog *prog, int argc, char **argv, struct cli_opts *o);

/*
 * Reads a secret (a password): the first line of `file` when given, else one
 * line of standard input, else, on a terminal, a prompt without echo (asked
 * twice when `confirm`). Returns 0, or -1 with a one-line reason in err.
 */
int cli_read_secret(const char *file, bool confirm, char *buf, size_t len, char *err,
                    size_t errlen);

/* Prints "<prog>: <message>" to stderr (for usage errors found after parsing). */
void cli_error(const struct cli_prog *prog, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
