/*
 * Configuration: a flat JSON object read once at start-up and checked
 * against a schema before anything runs. Every error names the key and what
 * is wrong with it: unknown key (with a suggestion), wrong type, value out of
 * range or malformed. Command-line overrides ("-o key=value") go through the
 * same checks. The schema fills a plain struct the daemon owns; after start-up
 * the struct is read-only.
 */
#ifndef P2P_CONFIG_H
#define P2P_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum cfg_type {
    CFG_STR,      /* char *, any non-empty string */
    CFG_PATH,     /* char *, a file system path (non-empty, no NUL) */
    CFG_INT,      /* long long within [min, max] */
    CFG_BOOL,     /* bool */
    CFG_HOSTPORT, /* char *, numeric "a.b.c.d:port" or "[v6]:port" */
    CFG_ENUM,     /* char *, one of `choices` */
    CFG_STRLIST,  /* struct cfg_strlist; an override gives comma-separated items */
};

struct cfg_strlist {
    char **items;
    size_t n;
};

struct cfg_field {
    const char *key;
    enum cfg_type type;
    size_t offset;              /* offsetof(the config struct, member) */
    long long min, max;         /* CFG_INT */
    const char *const *choices; /* CFG_ENUM, NULL-terminated */
    const char *def;            /* default as override text; NULL = unset */
    const char *help;           /* one line, shown by --help */
};

struct cfg_schema {
    const struct cfg_field *fields;
    size_t n_fields;
    /* Cross-field checks after everything is loaded; writes a one-line reason. */
    int (*validate)(const void *cfg, char *err, size_t errlen);
};

/* Fills defaults. Returns 0 (a bad default is a programming error: -1 with err). */
int cfg_init(const struct cfg_schema *s, void *cfg, char *err, size_t errlen);
/* Reads a JSON file over the defaults. Errors start with the path. */
int cfg_load_file(const struct cfg_schema *s, void *cfg, const char *path, char *err,
                  size_t errlen);
/* Same, from a string (tests). `origin` names it in errors. */
int cfg_load_string(const struct cfg_schema *s, void *cfg, const char *json, const char *origin,
                    char *err, size_t errlen);
/* Applies one "key=value" override. */
int cfg_set(const struct cfg_schema *s, void *cfg, const char *assignment, char *err,
            size_t errlen);
/* Runs the schema's cross-field check. */
int cfg_validate(const struct cfg_schema *s, const void *cfg, char *err, size_t errlen);
/* Prints the effective settings as JSON. */
void cfg_dump(const struct cfg_schema *s, const void *cfg, FILE *out);
/* Writes the key list with types, defaults and help for --help. Returns a malloc'd string. */
char *cfg_help(const struct cfg_schema *s);
/* Frees the strings the schema allocated. */
void cfg_free(const struct cfg_schema *s, void *cfg);

/* Parses numeric "host:port" / "[v6]:port"; host and port out (host without brackets). */
int cfg_parse_hostport(const char *s, char *host, size_t hostlen, unsigned *port);

#endif
