/*
 * The ordinary node's host cache (seed 004 section 5.1, sources 2 and 3): the
 * super nodes it was last attached to and the alternates they gave it, kept in
 * <state_dir>/supernodes.json so that a restarted node finds the overlay
 * without the bootstrap server. Pure code apart from reading and writing that
 * one file.
 */
#ifndef P2P_HOSTCACHE_H
#define P2P_HOSTCACHE_H

#include <stdbool.h>
#include <stddef.h>

#define HOSTCACHE_FILE  "supernodes.json"
#define HOSTCACHE_MAX   32          /* entries kept (alternates) */
#define HOSTCACHE_BYTES (64 * 1024) /* a larger file is refused as corrupt */

struct hc_entry {
    char id[41];    /* Node-ID, 40 hex; "" when unknown */
    char addr[128]; /* host:port */
};

struct hostcache {
    struct hc_entry last; /* the super node of the last attachment; addr "" when none */
    struct hc_entry alt[HOSTCACHE_MAX];
    size_t n_alt;
};

/*
 * Reads the cache of `state_dir`. A missing file is an empty cache (0); a
 * file that does not parse, or has entries that are not Node-IDs and
 * numeric host:port addresses, is -1 with one line in err, and *hc empty
 * (the caller logs it and goes on without a cache: the next sources of
 * discovery still work).
 */
int hostcache_load(const char *state_dir, struct hostcache *hc, char *err, size_t errlen);

/* Writes the cache atomically (mode 0600). 0 or -1 with one line in err. */
int hostcache_save(const char *state_dir, const struct hostcache *hc, char *err, size_t errlen);

/* Sets `last` and replaces the alternates by `alt` (n entries, the last one's own entry and
 * duplicates skipped, at most HOSTCACHE_MAX). */
void hostcache_update(struct hostcache *hc, const struct hc_entry *last, const struct hc_entry *alt,
                      size_t n);

/* True when `id` is 40 lower-case hex digits and `addr` a numeric host:port. */
bool hostcache_entry_valid(const char *id, const char *addr);

#endif
