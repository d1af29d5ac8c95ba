/*
 * Process-wide logger. One line per message: human text
 * "2026-11-21T20:40:01.123Z supernode[1234] info  tls: ..." or, with JSON
 * output on, {"ts":..,"proc":..,"pid":..,"level":..,"comp":..,"msg":..}.
 * The logger is not thread-safe: every daemon is one thread on one loop.
 */
#include "log.h"

#include <errno.h>
#include <stdint.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "utf8.h"

static struct {
    const char *ident;
    enum log_level level;
    bool json;
    enum log_sink sink;
    FILE *file;
} L = {"p2psip", LL_INFO, false, LOG_SINK_STDERR, NULL};

static const char *const level_names[] = {"error", "warn", "info", "debug", "trace"};

void log_init(const char *ident, enum log_level level, bool json)
{
    L.ident = ident ? ident : "p2psip";
    L.level = level;
    L.json = json;
}

void log_set_level(enum log_level level)
{
    L.level = level;
}

enum log_level log_get_level(void)
{
    return L.level;
}

void log_set_json(bool json)
{
    L.json = json;
}

int log_use_file(const char *path)
{
    FILE *f = fopen(path, "ae");
    if (!f)
        return -errno;
    setvbuf(f, NULL, _IOLBF, 0);
    log_close();
    L.file = f;
    L.sink = LOG_SINK_FILE;
    return 0;
}

void log_use_syslog(void)
{
    log_close();
    openlog(L.ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
    L.sink = LOG_SINK_SYSLOG;
}

void log_close(void)
{
    if (L.sink == LOG_SINK_FILE && L.file)
        fclose(L.file);
    else if (L.sink == LOG_SINK_SYSLOG)
        closelog();
    L.file = NULL;
    L.sink = LOG_SINK_STDERR;
}

int log_level_parse(const char *name)
{
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
        if (name && strcmp(name, level_names[i]) == 0)
            return (int)i;
    return -1;
}

const char *log_level_name(enum log_level level)
{
    if ((unsigned)level < sizeof(level_names) / sizeof(level_names[0]))
        return level_names[level];
    return "?";
}

bool log_enabled(enum log_level level)
{
    return level <= L.level;
}

/*
 * Messages often quote what a peer sent. A control character could forge a
 * log line (a newline) or a terminal sequence, and invalid UTF-8 breaks JSON
 * output: each such byte is written as "\xNN" instead, so the line stays one
 * line of valid text and still shows what arrived.
 */
static void sanitize(char *out, size_t cap, const char *in)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *s = (const uint8_t *)in;
    size_t len = strlen(in), o = 0;
    for (size_t i = 0; i < len && o + 1 < cap;) {
        size_t n = utf8_sequence_len(s + i, len - i);
        bool control = n == 1 && (s[i] < 0x20 || s[i] == 0x7f) && s[i] != '\t';
        if (n == 0 || control) {
            if (o + 5 > cap)
                break;
            out[o++] = '\\', out[o++] = 'x', out[o++] = hex[s[i] >> 4], out[o++] = hex[s[i] & 15];
            i++;
            continue;
        }
        if (o + n + 1 > cap)
            break;
        memcpy(out + o, s + i, n);
        o += n, i += n;
    }
    out[o] = '\0';
}

static void timestamp(char *buf, size_t len)
{
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, len - n, ".%03ldZ", (long)(tv.tv_usec / 1000));
}

void log_vmsg(enum log_level level, const char *component, const char *fmt, va_list ap)
{
    if (!log_enabled(level))
        return;
    int saved_errno = errno; /* callers often log before reading errno again */
    char raw[2048], text[2048];
    vsnprintf(raw, sizeof(raw), fmt, ap);
    sanitize(text, sizeof(text), raw);
    if (!component)
        component = "main";

    if (L.sink == LOG_SINK_SYSLOG) {
        static const int prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG, LOG_DEBUG};
        syslog(prio[level], "%s: %s", component, text);
        errno = saved_errno;
        return;
    }

    FILE *out = (L.sink == LOG_SINK_FILE && L.file) ? L.file : stderr;
    char ts[40];
    timestamp(ts, sizeof(ts));
    if (L.json) {
        json_t *o = json_pack("{s:s, s:s, s:i, s:s, s:s, s:s}", "ts", ts, "proc", L.ident, "pid",
                              (int)getpid(), "level", log_level_name(level), "comp", component,
                              "msg", text);
        char *line = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
        if (line) {
            fprintf(out, "%s\n", line);
            free(line);
        } else {
            fprintf(out, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"(unprintable)\"}\n", ts,
                    log_level_name(level));
        }
        json_decref(o);
    } else {
        fprintf(out, "%s %s[%d] %-5s %s: %s\n", ts, L.ident, (int)getpid(), log_level_name(level),
                component, text);
    }
    errno = saved_errno;
}

void log_msg(enum log_level level, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, component, fmt, ap);
    va_end(ap);
}
