/*
 * The life of every daemon, in one place: parse the shared command line,
 * load and check the configuration, set up logging, detach (unless -d), run
 * the libev loop that main() owns, and stop cleanly on SIGINT/SIGTERM.
 *
 * A daemon describes itself with a struct daemon_spec and calls daemon_main()
 * from main(). Its configuration struct must begin with a struct daemon_base
 * (DAEMON_BASE_FIELDS adds the matching keys to its schema).
 */
#ifndef P2P_DAEMON_H
#define P2P_DAEMON_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "cli.h"
#include "config.h"

/* Settings every daemon has. */
struct daemon_base {
    char *log_level;
    bool log_json;
    char *log_file;
    char *pid_file;
    long long shutdown_timeout_ms;
};

extern const char *const daemon_log_levels[];

#define DAEMON_BASE_FIELDS(type)                                                                   \
    {"log_level",                                                                                  \
     CFG_ENUM,                                                                                     \
     offsetof(type, base.log_level),                                                               \
     0,                                                                                            \
     0,                                                                                            \
     daemon_log_levels,                                                                            \
     "info",                                                                                       \
     "error, warn, info, debug or trace (-v raises it)"},                                          \
        {"log_json", CFG_BOOL, offsetof(type, base.log_json), 0, 0,                                \
         NULL,       "false",  "log one JSON object per line"},                                    \
        {"log_file",                                                                               \
         CFG_PATH,                                                                                 \
         offsetof(type, base.log_file),                                                            \
         0,                                                                                        \
         0,                                                                                        \
         NULL,                                                                                     \
         NULL,                                                                                     \
         "when detached, log to this file instead of syslog"},                                     \
        {"pid_file",                                                                               \
         CFG_PATH,                                                                                 \
         offsetof(type, base.pid_file),                                                            \
         0,                                                                                        \
         0,                                                                                        \
         NULL,                                                                                     \
         NULL,                                                                                     \
         "write the process id here while running"},                                               \
    {                                                                                              \
        "shutdown_timeout_ms", CFG_INT, offsetof(type, base.shutdown_timeout_ms), 100, 600000,     \
            NULL, "10000", "how long a graceful stop may take before the loop is left"             \
    }

struct daemon_spec {
    const struct cli_prog *prog;
    const struct cfg_schema *schema;
    size_t cfg_size; /* sizeof the daemon's config struct */
    /*
     * Runs a command other than "run" (e.g. "init" later); NULL when there
     * are none. Returns the exit status.
     */
    int (*command)(const struct cli_opts *o, void *cfg);
    /*
     * Starts the daemon's watchers on `loop`. Returns 0, or -1 after logging
     * why (exit status 1). *state is handed to stop and cleanup.
     */
    int (*start)(struct ev_loop *loop, const void *cfg, void **state);
    /*
     * Begins a graceful stop (first SIGINT/SIGTERM). The daemon stops its
     * watchers; the loop ends when none is left, or after shutdown_timeout_ms.
     */
    void (*stop)(struct ev_loop *loop, void *state);
    /* Frees everything after the loop has ended, or after start failed (whatever start
     * had set in *state: it must cope with a partly built state). */
    void (*cleanup)(void *state);
};

/* The command line daemon_main() parsed (for a start callback's command options), or NULL. */
const struct cli_opts *daemon_cli_opts(void);

/* Returns the process exit status: 0, 1 (runtime failure) or 2 (usage/config). */
int daemon_main(const struct daemon_spec *spec, int argc, char **argv);

/*
 * Loads the configuration the way daemon_main does (defaults, file,
 * overrides, validation) into cfg. For commands and tests. Returns 0, or 2
 * after printing the one-line error.
 */
int daemon_load_config(const struct daemon_spec *spec, const struct cli_opts *o, void *cfg);

#endif
