/*
 * A super node's record store: the seed's API semantics (seed 004 section 9)
 * over verified records (record.h), in memory. Pure code: no I/O, no clock
 * (the caller passes `now`), no ring knowledge (the caller decides which
 * records are its own and which are replicas).
 *
 * Records live under their key, at most one per (key, owner): several owners'
 * records under one key are all kept (seed 11.8). Removal statements are kept
 * as tombstones, so that a replayed older record cannot come back; a
 * tombstone lives until its own "expires". Every write must carry a higher
 * freshness counter (seq) than what the store holds for that (key, owner),
 * tombstone included.
 *
 * Semantics of the write modes, for a record from owner O under key K:
 *   STORE_ADD     O has no live record under K (a tombstone is fine): stored.
 *                 O already has one: STORE_E_EXISTS.
 *   STORE_UPDATE  O has a record (live or tombstone) under K: replaced.
 *                 O has none and K holds no live record of anyone: created.
 *                 K holds other owners' live records and none of O's:
 *                 STORE_E_NOT_OWNER.
 *   STORE_REMOVE  (the record is a removal statement) O has a live record
 *                 under K: it becomes the tombstone. O has none: if others
 *                 have, STORE_E_NOT_OWNER; else STORE_E_NOT_FOUND.
 *   STORE_REPLICA replication from another super node: whatever is newer
 *                 (higher seq) for (K, O) wins, live record or tombstone;
 *                 equal or older is STORE_E_STALE (callers treat it as
 *                 "already have it").
 * In every mode: seq <= the stored seq for (K, O) (an expired entry's too, and
 * a mark's: see Rollback) -> STORE_E_STALE; the stored
 * record of (K, O) has no_update set and is live -> STORE_E_NO_UPDATE
 * (nothing, not even its owner, changes it before it expires); a record
 * whose expires <= now -> STORE_E_EXPIRED; a removal statement given to
 * ADD/UPDATE, or a non-removal to REMOVE -> STORE_E_MODE.
 *
 * Rollback (issue 15): an entry that expires is not forgotten at once. An
 * older record of the same owner may still be valid (signed earlier with a
 * longer lifetime) and would otherwise take the expired one's place, so
 * store_expire() leaves a mark of (K, O, seq) behind -- the expired record's
 * envelope, which other nodes can check (store_put_mark) -- kept until the expired
 * entry's "expires" plus the longest record lifetime (store_set_max_lifetime,
 * or longer when a record accepted here had a longer one): every older
 * record has expired by then, since it was signed before this one was stored.
 * While a mark is kept, any record of (K, O) with seq <= the mark's is
 * STORE_E_STALE, in every mode, replicas and hand-offs included. An expired
 * entry not yet purged counts the same way. Marks are bounded: at most
 * `marks` in all (default STORE_MARKS_DEF) and `marks_bytes` of envelopes
 * (default STORE_MARKS_BYTES_DEF), the oldest dropped first; and an
 * owner holding as many marks (or bytes) as its record quota (per_owner,
 * per_proxy and their bytes) loses its own oldest first, so nobody can push others' marks out by
 * writing short-lived records alone. A dropped mark reopens the replay for
 * its (K, O) only, and is counted (store_stats().marks_evicted).
 * store_drop() leaves no mark: the copy lives on at the responsible node.
 *
 * Quotas (0 = unlimited): per_key (distinct owners with a live record or
 * tombstone under one key), per_owner (records + tombstones of one owner in
 * the whole store), per_owner_bytes (sum of their sizes). A write that would
 * exceed one gets STORE_E_QUOTA_KEY / STORE_E_QUOTA_OWNER; replacing an
 * owner's own record counts only the difference.
 */
#ifndef P2P_STORE_H
#define P2P_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "record.h"

enum store_mode { STORE_ADD = 0, STORE_UPDATE, STORE_REMOVE, STORE_REPLICA };

enum store_status {
    STORE_OK = 0,
    STORE_E_EXISTS = -1,      /* "exists" */
    STORE_E_NOT_OWNER = -2,   /* "not-owner" */
    STORE_E_NOT_FOUND = -3,   /* "not-found" */
    STORE_E_STALE = -4,       /* "stale" */
    STORE_E_NO_UPDATE = -5,   /* "no-update" */
    STORE_E_EXPIRED = -6,     /* "expired" */
    STORE_E_MODE = -7,        /* "bad-mode" */
    STORE_E_QUOTA_KEY = -8,   /* "quota-key" */
    STORE_E_QUOTA_OWNER = -9, /* "quota-owner" */
    STORE_E_NOMEM = -10,      /* "internal" */
};
/* The wire code of docs/protocol.md 4.5 ("exists", "stale", ...). */
const char *store_strcode(int status);
enum store_mode store_mode_from_str(const char *s, bool *ok); /* "add" "update" "remove" */
const char *store_mode_str(enum store_mode m);

struct store_limits {
    size_t per_key;
    size_t per_owner;
    size_t per_owner_bytes;
    /* Owners named by store_set_proxies(): P2P proxies write for a whole SIP domain. */
    size_t per_proxy;
    size_t per_proxy_bytes;
    /* Marks of expired entries kept against rollback (0 = STORE_MARKS_DEF), and the bytes of
     * their envelopes (0 = STORE_MARKS_BYTES_DEF). About 100 bytes each besides the envelope. */
    size_t marks;
    size_t marks_bytes;
};

#define STORE_MARKS_DEF         262144
#define STORE_MARKS_BYTES_DEF   (64u << 20)
#define STORE_MARK_LIFETIME_DEF 86400.0 /* the overlay document's default max_record_lifetime_s */

/* One stored entry, as iteration and lookups show it (read-only). */
struct store_entry {
    const struct record *rec; /* rec->removal tells a tombstone */
    double touched;           /* last store_put()/store_touch() time given for it */
};

struct store;
struct store *store_new(const struct store_limits *lim);
void store_free(struct store *s);
/* The owner URIs that get the per_proxy quotas instead of per_owner (the overlay document's
 * P2P proxies); copied. 0, or -1 when out of memory. */
int store_set_proxies(struct store *s, const char *const *uris, size_t n);
/* The overlay's max_record_lifetime_s, which marks outlive their entry by (<= 0: the default). */
void store_set_max_lifetime(struct store *s, int64_t seconds);

/*
 * Applies a verified record (the caller ran rec_verify). On STORE_OK the
 * store takes the record: *r is moved in and zeroed (the caller must not
 * rec_free it; doing so is harmless). Stored records keep their fields and
 * envelope but not the parsed signed text: their value and signed_obj are NULL. On error *r is
 * untouched and `err` gets one line ("alice's record under <key> has seq 7; this one has 5"). `now`
 * is unix time; it is also recorded as the entry's `touched` time.
 */
int store_put(struct store *s, struct record *r, enum store_mode mode, double now, char *err,
              size_t errlen);

/*
 * The live records under `key` (tombstones and records expired at `now`
 * left out), at most `max` into out[]; returns how many there are in all
 * (may be > max). Order: by owner (byte order), so answers are stable.
 */
size_t store_get(const struct store *s, const nid_t *key, double now, const struct record **out,
                 size_t max);

/* The entry of (key, owner), live, expired or tombstone; NULL if none. */
const struct store_entry *store_find(const struct store *s, const nid_t *key, const char *owner);

/* Sets the `touched` time of (key, owner) (replication leases). false if absent. */
bool store_touch(struct store *s, const nid_t *key, const char *owner, double now);

/* Drops (key, owner) without a tombstone (a replica this node no longer holds). */
bool store_drop(struct store *s, const nid_t *key, const char *owner);

/* Drops every entry whose expires <= now (records and tombstones), leaving their marks, and
 * the marks whose time is over. Returns how many entries. */
size_t store_expire(struct store *s, double now);

/*
 * Calls fn for every entry (tombstones included) whose key lies in the ring
 * interval (lo, hi] (nid_in_open_closed; lo == hi means the whole ring), in
 * increasing key order from lo, then owner order. fn may not modify the
 * store; it returns false to stop early.
 */
void store_foreach_range(const struct store *s, const nid_t *lo, const nid_t *hi,
                         bool (*fn)(const struct store_entry *e, void *ud), void *ud);

/*
 * Marks as evidence (docs/protocol.md 4.4): a mark is the expired record itself, signed by its
 * owner, so it proves to another node that the owner wrote that seq under that key and that
 * nothing older of it may come back. Other nodes' marks reach a store through
 * store_put_mark(): r must have been verified as of its own lifetime (rec_verify at
 * r->expires - 1) and have expired (expires <= now). STORE_OK: kept as a mark until
 * expires + the longest lifetime (an older entry of the owner under the key, a replay that got
 * in meanwhile, is dropped); STORE_E_STALE: the store knows that seq or a newer one of
 * (key, owner) already; STORE_E_EXPIRED: its time is over; STORE_E_MODE: not expired. The
 * bounds of the marks apply (in number and bytes, per owner and in all). r is not taken.
 */
int store_put_mark(struct store *s, const struct record *r, double now, char *err, size_t errlen);
/* true when an entry or mark of (key, owner) has seq >= `seq` (nothing to learn from it). */
bool store_knows(const struct store *s, const nid_t *key, const char *owner, uint64_t seq);

/* One mark, as store_foreach_mark() shows it (read-only, valid during the callback). */
struct store_mark {
    nid_t key;
    const char *owner;
    uint64_t seq;
    double keep_until;
    json_t *envelope; /* the expired record's, signed by its owner */
    size_t size;
};
/* Calls fn for every mark kept at `now` whose key lies in (lo, hi] (lo == hi: all), oldest
 * first; fn returns false to stop. */
void store_foreach_mark(const struct store *s, const nid_t *lo, const nid_t *hi, double now,
                        bool (*fn)(const struct store_mark *m, void *ud), void *ud);

struct store_stats {
    size_t keys;    /* distinct keys */
    size_t records; /* live records (not expired) */
    size_t tombstones;
    size_t bytes;           /* sum of record sizes, tombstones included */
    size_t marks;           /* expired entries remembered against rollback */
    size_t mark_bytes;      /* the sizes of their envelopes */
    uint64_t marks_evicted; /* marks dropped early for room (each reopens one replay) */
};
void store_stats(const struct store *s, double now, struct store_stats *out);

#endif
