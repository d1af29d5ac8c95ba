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

#define CLI_MAX_OVERRIDES 64

struct cli_command {
    const char *name;
    const char *help; /* one line for --help */
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
};

enum cli_result {
    CLI_CONTINUE = -1, /* go on: options parsed */
    CLI_EXIT_OK = 0,   /* --help or --version was printed */
    CLI_EXIT_USAGE = 2,
};

/* Parses argv into *o. Prints help/version to stdout, errors (one line) to stderr. */
enum cli_result cli_parse(const struct cli_prog *prog, int argc, char **argv, struct cli_opts *o);

/* Prints "<prog>: <message>" to stderr (for usage errors found after parsing). */
void cli_error(const struct cli_prog *prog, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
