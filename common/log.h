/*
 * Logging shared by every process: leveled messages to stderr (human text or
 * one JSON object per line), or to a file or syslog when running detached.
 * Each message names the component it comes from ("tls", "config", ...), so a
 * log of a busy super node can be filtered by subsystem.
 */
#ifndef P2P_LOG_H
#define P2P_LOG_H

#include <stdarg.h>
#include <stdbool.h>

enum log_level {
    LL_ERROR = 0,
    LL_WARN = 1,
    LL_INFO = 2,
    LL_DEBUG = 3,
    LL_TRACE = 4,
};

enum log_sink {
    LOG_SINK_STDERR = 0,
    LOG_SINK_FILE,
    LOG_SINK_SYSLOG,
};

/* Sets the process name shown in every line; `ident` must outlive the logger. */
void log_init(const char *ident, enum log_level level, bool json);
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
void log_set_json(bool json);
/* Redirect to a file (appending) or to syslog; returns 0 or -errno. */
int log_use_file(const char *path);
void log_use_syslog(void);
void log_close(void);

/* Parses "error", "warn", "info", "debug", "trace"; returns -1 when unknown. */
int log_level_parse(const char *name);
const char *log_level_name(enum log_level level);

bool log_enabled(enum log_level level);
void log_msg(enum log_level level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void log_vmsg(enum log_level level, const char *component, const char *fmt, va_list ap);

#define log_error(comp, ...) log_msg(LL_ERROR, comp, __VA_ARGS__)
#define log_warn(comp, ...)  log_msg(LL_WARN, comp, __VA_ARGS__)
#define log_info(comp, ...)  log_msg(LL_INFO, comp, __VA_ARGS__)
#define log_debug(comp, ...)                                                                       \
    do {                                                                                           \
        if (log_enabled(LL_DEBUG))                                                                 \
            log_msg(LL_DEBUG, comp, __VA_ARGS__);                                                  \
    } while (0)
#define log_trace(comp, ...)                                                                       \
    do {                                                                                           \
        if (log_enabled(LL_TRACE))                                                                 \
            log_msg(LL_TRACE, comp, __VA_ARGS__);                                                  \
    } while (0)

#endif
