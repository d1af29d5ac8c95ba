/*
 * The host cache file (hostcache.h):
 *   {"version": 1, "last": {"id": "<40 hex>", "addr": "host:port"},
 *    "alternates": [{"id": ..., "addr": ...}, ...]}
 */
#include "hostcache.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "errbuf.h"
#include "fsutil.h"

bool hostcache_entry_valid(const char *id, const char *addr)
{
    if (!id || !addr || strlen(id) != 40 || strlen(addr) >= sizeof(((struct hc_entry *)0)->addr))
        return false;
    for (const char *p = id; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return false;
    return cfg_parse_hostport(addr, NULL, 0, NULL) == 0;
}

static bool entry_from_json(json_t *j, struct hc_entry *e)
{
    const char *id = json_string_value(json_object_get(j, "id"));
    const char *addr = json_string_value(json_object_get(j, "addr"));
    if (!json_is_object(j) || json_object_size(j) != 2 || !hostcache_entry_valid(id, addr))
        return false;
    snprintf(e->id, sizeof(e->id), "%s", id);
    snprintf(e->addr, sizeof(e->addr), "%s", addr);
    return true;
}

int hostcache_load(const char *state_dir, struct hostcache *hc, char *err, size_t errlen)
{
    memset(hc, 0, sizeof(*hc));
    char path[4096];
    if (fs_join(path, sizeof(path), state_dir, HOSTCACHE_FILE) != 0)
        return errbuf_set(err, errlen, -1, "host cache: state directory path too long");
    char *text = NULL;
    size_t len = 0;
    int r = fs_read_file(path, HOSTCACHE_BYTES, &text, &len);
    if (r == -ENOENT)
        return 0;
    if (r < 0)
        return errbuf_set(err, errlen, -1, "host cache %s: cannot read: %s", path, strerror(-r));
    json_error_t je;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!j)
        return errbuf_set(err, errlen, -1, "host cache %s: not JSON (line %d: %s)", path, je.line,
                          je.text);
    int ret = -1;
    json_t *ver = json_object_get(j, "version"), *last = json_object_get(j, "last"),
           *alt = json_object_get(j, "alternates");
    if (!json_is_integer(ver) || json_integer_value(ver) != 1) {
        errbuf_set(err, errlen, -1, "host cache %s: not version 1", path);
        goto out;
    }
    if (last && !json_is_null(last) && !entry_from_json(last, &hc->last)) {
        errbuf_set(err, errlen, -1, "host cache %s: \"last\" is not {\"id\", \"addr\"}", path);
        goto out;
    }
    if (!json_is_array(alt) || json_array_size(alt) > HOSTCACHE_MAX) {
        errbuf_set(err, errlen, -1, "host cache %s: \"alternates\" is not an array of at most %d",
                   path, HOSTCACHE_MAX);
        goto out;
    }
    size_t i;
    json_t *e;
    json_array_foreach(alt, i, e)
    {
        if (!entry_from_json(e, &hc->alt[hc->n_alt])) {
            errbuf_set(err, errlen, -1, "host cache %s: alternate %zu is not {\"id\", \"addr\"}",
                       path, i);
            goto out;
        }
        hc->n_alt++;
    }
    ret = 0;
out:
    json_decref(j);
    if (ret < 0)
        memset(hc, 0, sizeof(*hc));
    return ret;
}

static json_t *entry_json(const struct hc_entry *e)
{
    return json_pack("{s:s, s:s}", "id", e->id, "addr", e->addr);
}

int hostcache_save(const char *state_dir, const struct hostcache *hc, char *err, size_t errlen)
{
    char path[4096];
    if (fs_join(path, sizeof(path), state_dir, HOSTCACHE_FILE) != 0)
        return errbuf_set(err, errlen, -1, "host cache: state directory path too long");
    json_t *alt = json_array();
    for (size_t i = 0; alt && i < hc->n_alt; i++)
        json_array_append_new(alt, entry_json(&hc->alt[i]));
    json_t *j = json_pack("{s:i, s:o, s:o}", "version", 1, "last",
                          hc->last.addr[0] ? entry_json(&hc->last) : json_null(), "alternates",
                          alt ? alt : json_array());
    char *text = j ? json_dumps(j, JSON_INDENT(1)) : NULL;
    json_decref(j);
    if (!text)
        return errbuf_set(err, errlen, -1, "host cache %s: out of memory", path);
    int r = fs_write_atomic(path, text, strlen(text), 0600);
    free(text);
    if (r < 0)
        return errbuf_set(err, errlen, -1, "host cache %s: cannot write: %s", path, strerror(-r));
    return 0;
}

void hostcache_update(struct hostcache *hc, const struct hc_entry *last, const struct hc_entry *alt,
                      size_t n)
{
    hc->last = *last;
    hc->n_alt = 0;
    for (size_t i = 0; i < n && hc->n_alt < HOSTCACHE_MAX; i++) {
        if (!strcmp(alt[i].addr, last->addr))
            continue;
        bool dup = false;
        for (size_t k = 0; k < hc->n_alt && !dup; k++)
            dup = !strcmp(hc->alt[k].addr, alt[i].addr);
        if (!dup)
            hc->alt[hc->n_alt++] = alt[i];
    }
}
