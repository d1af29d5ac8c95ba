/*
 * Schema-driven configuration loading. Values from the file, from defaults
 * and from "-o key=value" all become a JSON value first and then pass through
 * one setter, so every source gets the same checks and the same messages.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "errbuf.h"

#define CFG_FILE_MAX (1024 * 1024)

static void *field_ptr(void *cfg, const struct cfg_field *f)
{
    return (char *)cfg + f->offset;
}

static const struct cfg_field *find_field(const struct cfg_schema *s, const char *key)
{
    for (size_t i = 0; i < s->n_fields; i++)
        if (strcmp(s->fields[i].key, key) == 0)
            return &s->fields[i];
    return NULL;
}

/* Edit distance, for "did you mean" on unknown keys. Short keys only. */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return SIZE_MAX;
    size_t prev[64], cur[64];
    for (size_t j = 0; j <= lb; j++)
        prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
            size_t del = prev[j] + 1, ins = cur[j - 1] + 1;
            cur[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
        }
        memcpy(prev, cur, sizeof(size_t) * (lb + 1));
    }
    return prev[lb];
}

static int unknown_key(const struct cfg_schema *s, const char *origin, const char *key, char *err,
                       size_t errlen)
{
    const char *best = NULL;
    size_t best_d = 3; /* suggest only close matches */
    for (size_t i = 0; i < s->n_fields; i++) {
        size_t d = edit_distance(key, s->fields[i].key);
        if (d < best_d)
            best_d = d, best = s->fields[i].key;
    }
    if (best)
        return errbuf_set(err, errlen, -1, "%s: unknown key \"%s\" (did you mean \"%s\"?)", origin,
                          key, best);
    return errbuf_set(err, errlen, -1, "%s: unknown key \"%s\"", origin, key);
}

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

int cfg_parse_hostport(const char *s, char *host, size_t hostlen, unsigned *port)
{
    const char *colon;
    char h[INET6_ADDRSTRLEN + 1];
    size_t hl;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        hl = (size_t)(close - s - 1);
        if (hl == 0 || hl >= sizeof(h))
            return -1;
        memcpy(h, s + 1, hl);
        h[hl] = '\0';
        struct in6_addr a6;
        if (inet_pton(AF_INET6, h, &a6) != 1)
            return -1;
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon)
            return -1;
        hl = (size_t)(colon - s);
        if (hl == 0 || hl >= sizeof(h))
            return -1;
        memcpy(h, s, hl);
        h[hl] = '\0';
        struct in_addr a4;
        if (inet_pton(AF_INET, h, &a4) != 1)
            return -1;
    }
    const char *p = colon + 1;
    if (!*p || strlen(p) > 5)
        return -1;
    unsigned long v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (unsigned long)(*p - '0');
    }
    if (v > 65535)
        return -1;
    if (host) {
        if (hl >= hostlen)
            return -1;
        memcpy(host, h, hl + 1);
    }
    if (port)
        *port = (unsigned)v;
    return 0;
}

static void free_strlist(struct cfg_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

/* Checks `v` against the field and stores it. `origin` prefixes errors. */
static int set_field(const struct cfg_field *f, void *cfg, const json_t *v, const char *origin,
                     char *err, size_t errlen)
{
    void *p = field_ptr(cfg, f);
    switch (f->type) {
    case CFG_INT: {
        if (!json_is_integer(v))
            return errbuf_set(err, errlen, -1, "%s: key \"%s\": expected an integer, got %s",
                              origin, f->key, json_type_name(v));
        long long x = json_integer_value(v);
        if (x < f->min || x > f->max)
            return errbuf_set(err, errlen, -1, "%s: key \"%s\": %lld is out of range (%lld..%lld)",
                              origin, f->key, x, f->min, f->max);
        *(long long *)p = x;
        return 0;
    }
    case CFG_BOOL:
        if (!json_is_boolean(v))
            return errbuf_set(err, errlen, -1, "%s: key \"%s\": expected true or false, got %s",
                              origin, f->key, json_type_name(v));
        *(bool *)p = json_is_true(v);
        return 0;
    case CFG_STRLIST: {
        if (!json_is_array(v))
            return errbuf_set(err, errlen, -1,
                              "%s: key \"%s\": expected an array of strings, got %s", origin,
                              f->key, json_type_name(v));
        struct cfg_strlist nl = {calloc(json_array_size(v) + 1, sizeof(char *)), 0};
        if (!nl.items)
            return errbuf_set(err, errlen, -1, "out of memory");
        size_t i;
        json_t *item;
        json_array_foreach(v, i, item)
        {
            if (!json_is_string(item) || json_string_length(item) == 0) {
                free_strlist(&nl);
                return errbuf_set(err, errlen, -1,
                                  "%s: key \"%s\": item %zu must be a non-empty string", origin,
                                  f->key, i);
            }
            nl.items[nl.n++] = strdup(json_string_value(item));
        }
        free_strlist((struct cfg_strlist *)p);
        *(struct cfg_strlist *)p = nl;
        return 0;
    }
    case CFG_STR:
    case CFG_PATH:
    case CFG_HOSTPORT:
    case CFG_ENUM: {
        if (!json_is_string(v))
            return errbuf_set(err, errlen, -1, "%s: key \"%s\": expected a string, got %s", origin,
                              f->key, json_type_name(v));
        const char *s = json_string_value(v);
        if (json_string_length(v) == 0 || strlen(s) != json_string_length(v))
            return errbuf_set(err, errlen, -1,
                              "%s: key \"%s\": must be a non-empty string without NUL", origin,
                              f->key);
        if (f->type == CFG_HOSTPORT && cfg_parse_hostport(s, NULL, 0, NULL) != 0)
            return errbuf_set(err, errlen, -1,
                              "%s: key \"%s\": expected a numeric address and port like "
                              "127.0.0.1:7000 or [::1]:7000, got \"%.80s\"",
                              origin, f->key, s);
        if (f->type == CFG_ENUM) {
            bool ok = false;
            for (const char *const *c = f->choices; c && *c; c++)
                ok = ok || strcmp(*c, s) == 0;
            if (!ok) {
                char list[256] = "";
                for (const char *const *c = f->choices; c && *c; c++)
                    snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s",
                             c == f->choices ? "" : ", ", *c);
                return errbuf_set(err, errlen, -1, "%s: key \"%s\": \"%.80s\" is not one of: %s",
                                  origin, f->key, s, list);
            }
        }
        char *copy;
        if (f->type == CFG_PATH && s[0] != '/') {
            /* Daemons chdir("/") when they detach: anchor relative paths now. */
            char cwd[4096];
            if (!getcwd(cwd, sizeof(cwd)))
                return errbuf_set(err, errlen, -1,
                                  "%s: key \"%s\": cannot resolve relative path: %s", origin,
                                  f->key, strerror(errno));
            copy = malloc(strlen(cwd) + strlen(s) + 2);
            if (copy)
                sprintf(copy, "%s/%s", cwd, s);
        } else {
            copy = strdup(s);
        }
        if (!copy)
            return errbuf_set(err, errlen, -1, "out of memory");
        free(*(char **)p);
        *(char **)p = copy;
        return 0;
    }
    }
    return errbuf_set(err, errlen, -1, "%s: key \"%s\": unsupported type", origin, f->key);
}

/* Turns override text into the JSON value its field expects (or a string, to get the error). */
static json_t *text_to_json(const struct cfg_field *f, const char *text)
{
    switch (f->type) {
    case CFG_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(text, &end, 10);
        if (*text && !*end && errno == 0)
            return json_integer(x);
        return json_string(text);
    }
    case CFG_BOOL:
        if (!strcmp(text, "true") || !strcmp(text, "yes") || !strcmp(text, "on") ||
            !strcmp(text, "1"))
            return json_true();
        if (!strcmp(text, "false") || !strcmp(text, "no") || !strcmp(text, "off") ||
            !strcmp(text, "0"))
            return json_false();
        return json_string(text);
    case CFG_STRLIST: {
        json_t *a = json_array();
        const char *p = text;
        while (a && *p) {
            const char *comma = strchr(p, ',');
            size_t n = comma ? (size_t)(comma - p) : strlen(p);
            json_array_append_new(a, json_stringn(p, n));
            p += n + (comma ? 1 : 0);
        }
        return a;
    }
    default:
        return json_string(text);
    }
}

static int set_text(const struct cfg_field *f, void *cfg, const char *text, const char *origin,
                    char *err, size_t errlen)
{
    json_t *v = text_to_json(f, text);
    if (!v) /* invalid UTF-8 in an override */
        return errbuf_set(err, errlen, -1, "%s: key \"%s\": value is not valid UTF-8", origin,
                          f->key);
    int rc = set_field(f, cfg, v, origin, err, errlen);
    json_decref(v);
    return rc;
}

int cfg_init(const struct cfg_schema *s, void *cfg, char *err, size_t errlen)
{
    for (size_t i = 0; i < s->n_fields; i++)
        if (s->fields[i].def &&
            set_text(&s->fields[i], cfg, s->fields[i].def, "default", err, errlen) != 0)
            return -1;
    return 0;
}

static int load_json(const struct cfg_schema *s, void *cfg, json_t *root, const char *origin,
                     char *err, size_t errlen)
{
    if (!json_is_object(root))
        return errbuf_set(err, errlen, -1, "%s: the configuration must be a JSON object, got %s",
                          origin, json_type_name(root));
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        const struct cfg_field *f = find_field(s, key);
        if (!f)
            return unknown_key(s, origin, key, err, errlen);
        if (set_field(f, cfg, v, origin, err, errlen) != 0)
            return -1;
    }
    return 0;
}

int cfg_load_string(const struct cfg_schema *s, void *cfg, const char *text, const char *origin,
                    char *err, size_t errlen)
{
    json_error_t je;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!root)
        return errbuf_set(err, errlen, -1, "%s:%d:%d: %s", origin, je.line, je.column, je.text);
    int rc = load_json(s, cfg, root, origin, err, errlen);
    json_decref(root);
    return rc;
}

int cfg_load_file(const struct cfg_schema *s, void *cfg, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return errbuf_set(err, errlen, -1, "cannot read config %s: %s", path, strerror(errno));
    char *buf = malloc(CFG_FILE_MAX + 1);
    size_t n = buf ? fread(buf, 1, CFG_FILE_MAX + 1, f) : 0;
    int rerr = ferror(f);
    fclose(f);
    if (!buf)
        return errbuf_set(err, errlen, -1, "out of memory");
    if (rerr) {
        free(buf);
        return errbuf_set(err, errlen, -1, "cannot read config %s: read error", path);
    }
    if (n > CFG_FILE_MAX) {
        free(buf);
        return errbuf_set(err, errlen, -1, "config %s: larger than %d bytes", path, CFG_FILE_MAX);
    }
    if (memchr(buf, '\0', n)) {
        free(buf);
        return errbuf_set(err, errlen, -1, "config %s: contains a NUL byte (not a JSON text file)",
                          path);
    }
    buf[n] = '\0';
    int rc = cfg_load_string(s, cfg, buf, path, err, errlen);
    free(buf);
    return rc;
}

int cfg_set(const struct cfg_schema *s, void *cfg, const char *assignment, char *err, size_t errlen)
{
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return errbuf_set(err, errlen, -1, "--set %s: expected KEY=VALUE", assignment);
    char key[64];
    size_t kl = (size_t)(eq - assignment);
    if (kl >= sizeof(key))
        return errbuf_set(err, errlen, -1, "--set: key too long");
    memcpy(key, assignment, kl);
    key[kl] = '\0';
    const struct cfg_field *f = find_field(s, key);
    if (!f)
        return unknown_key(s, "--set", key, err, errlen);
    return set_text(f, cfg, eq + 1, "--set", err, errlen);
}

int cfg_validate(const struct cfg_schema *s, const void *cfg, char *err, size_t errlen)
{
    return s->validate ? s->validate(cfg, err, errlen) : 0;
}

static json_t *field_json(const struct cfg_field *f, const void *cfg)
{
    const void *p = (const char *)cfg + f->offset;
    switch (f->type) {
    case CFG_INT:
        return json_integer(*(const long long *)p);
    case CFG_BOOL:
        return json_boolean(*(const bool *)p);
    case CFG_STRLIST: {
        const struct cfg_strlist *l = p;
        json_t *a = json_array();
        for (size_t i = 0; i < l->n; i++)
            json_array_append_new(a, json_string(l->items[i]));
        return a;
    }
    default:
        return *(char *const *)p ? json_string(*(char *const *)p) : json_null();
    }
}

void cfg_dump(const struct cfg_schema *s, const void *cfg, FILE *out)
{
    json_t *o = json_object();
    for (size_t i = 0; i < s->n_fields; i++)
        json_object_set_new(o, s->fields[i].key, field_json(&s->fields[i], cfg));
    json_dumpf(o, out, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    fputc('\n', out);
    json_decref(o);
}

static const char *type_label(enum cfg_type t)
{
    static const char *const names[] = {"string",    "path",   "integer", "boolean",
                                        "host:port", "choice", "list"};
    return (unsigned)t < sizeof(names) / sizeof(names[0]) ? names[t] : "?";
}

char *cfg_help(const struct cfg_schema *s)
{
    size_t cap = 4096, len = 0;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    len += (size_t)snprintf(out, cap, "Configuration keys (JSON file or --set KEY=VALUE):\n");
    for (size_t i = 0; i < s->n_fields; i++) {
        const struct cfg_field *f = &s->fields[i];
        char line[512], range[64] = "";
        if (f->type == CFG_INT)
            snprintf(range, sizeof(range), " %lld..%lld", f->min, f->max);
        int n = snprintf(line, sizeof(line), "  %-22s %s%s%s%s\n      %s\n", f->key,
                         type_label(f->type), range, f->def ? ", default " : "",
                         f->def ? f->def : "", f->help ? f->help : "");
        if (n < 0)
            continue;
        if (len + (size_t)n + 1 > cap) {
            cap = (cap + (size_t)n) * 2;
            char *grown = realloc(out, cap);
            if (!grown) {
                free(out);
                return NULL;
            }
            out = grown;
        }
        memcpy(out + len, line, (size_t)n + 1);
        len += (size_t)n;
    }
    return out;
}

void cfg_free(const struct cfg_schema *s, void *cfg)
{
    for (size_t i = 0; i < s->n_fields; i++) {
        const struct cfg_field *f = &s->fields[i];
        void *p = field_ptr(cfg, f);
        if (f->type == CFG_STRLIST)
            free_strlist(p);
        else if (f->type != CFG_INT && f->type != CFG_BOOL) {
            free(*(char **)p);
            *(char **)p = NULL;
        }
    }
}
