/*
 * The failure limiter (see ratelimit.h). Entries live in one dense array
 * allocated up front; an open-addressing index (linear probing, at most half
 * full, backward-shift deletion so no tombstones pile up) finds them by key,
 * and a doubly linked list orders them by window start. With `now` never
 * going back, a window that restarts moves its entry to the tail, so the
 * head is always the oldest window: expired entries are dropped from the
 * head and a full table evicts the head, each in O(1).
 *
 * The hash is unkeyed FNV-1a. Keys hold attacker-chosen user names, so
 * colliding keys could make probes long; they are bounded by max_keys and
 * cost microseconds, next to the PBKDF2 every attempt costs anyway.
 */
#include "ratelimit.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NIL      UINT32_MAX
#define MAX_KEYS ((size_t)1 << 24)

struct rl_entry {
    uint64_t hash;
    double start; /* when the current window opened */
    unsigned count;
    uint32_t prev, next; /* age list */
    uint32_t slot;       /* where the index points at this entry */
    char key[RATELIMIT_KEY_MAX + 1];
};

struct ratelimit {
    unsigned max_failures;
    double window;
    size_t max_keys;
    struct rl_entry *e;
    size_t n;
    uint32_t *slots; /* 0 = empty, else entry index + 1 */
    size_t mask;
    uint32_t head, tail; /* oldest and newest window start */
};

struct ratelimit *ratelimit_new(unsigned max_failures, double window_s, size_t max_keys)
{
    if (max_failures == 0 || !(window_s > 0) || !isfinite(window_s) || max_keys == 0 ||
        max_keys > MAX_KEYS)
        return NULL;
    struct ratelimit *rl = calloc(1, sizeof(*rl));
    if (!rl)
        goto fail;
    size_t size = 1;
    while (size < 2 * max_keys)
        size <<= 1;
    rl->max_failures = max_failures;
    rl->window = window_s;
    rl->max_keys = max_keys;
    rl->mask = size - 1;
    rl->head = rl->tail = NIL;
    rl->e = calloc(max_keys, sizeof(*rl->e));
    rl->slots = calloc(size, sizeof(*rl->slots));
    if (!rl->e || !rl->slots)
        goto fail;
    return rl;
fail:
    ratelimit_free(rl);
    return NULL;
}

void ratelimit_free(struct ratelimit *rl)
{
    if (!rl)
        return;
    free(rl->e);
    free(rl->slots);
    free(rl);
}

size_t ratelimit_size(const struct ratelimit *rl)
{
    return rl->n;
}

static uint64_t hash_key(const char *key, size_t len)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 0x100000001b3u;
    }
    /* FNV's low bits are weak and the index uses exactly those: mix (splitmix64's finaliser). */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9u;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebu;
    return h ^ (h >> 31);
}

static uint32_t find(const struct ratelimit *rl, const char *key, size_t len, uint64_t h)
{
    for (size_t i = h & rl->mask;; i = (i + 1) & rl->mask) {
        uint32_t v = rl->slots[i];
        if (v == 0)
            return NIL;
        const struct rl_entry *x = &rl->e[v - 1];
        if (x->hash == h && memcmp(x->key, key, len) == 0 && x->key[len] == '\0')
            return v - 1;
    }
}

static void list_unlink(struct ratelimit *rl, uint32_t i)
{
    struct rl_entry *x = &rl->e[i];
    if (x->prev != NIL)
        rl->e[x->prev].next = x->next;
    else
        rl->head = x->next;
    if (x->next != NIL)
        rl->e[x->next].prev = x->prev;
    else
        rl->tail = x->prev;
    x->prev = x->next = NIL;
}

static void list_append(struct ratelimit *rl, uint32_t i)
{
    struct rl_entry *x = &rl->e[i];
    x->prev = rl->tail;
    x->next = NIL;
    if (rl->tail != NIL)
        rl->e[rl->tail].next = i;
    else
        rl->head = i;
    rl->tail = i;
}

/* Empties slot i and pulls later members of its probe run back, so lookups need no tombstones. */
static void slot_delete(struct ratelimit *rl, size_t i)
{
    for (;;) {
        rl->slots[i] = 0;
        size_t j = i;
        for (;;) {
            j = (j + 1) & rl->mask;
            uint32_t v = rl->slots[j];
            if (v == 0)
                return;
            size_t home = rl->e[v - 1].hash & rl->mask;
            /* An entry whose home lies cyclically in (i, j] is still reachable: leave it. */
            bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
            if (!stays) {
                rl->slots[i] = v;
                rl->e[v - 1].slot = (uint32_t)i;
                i = j;
                break;
            }
        }
    }
}

static void entry_remove(struct ratelimit *rl, uint32_t i)
{
    list_unlink(rl, i);
    slot_delete(rl, rl->e[i].slot);
    uint32_t last = (uint32_t)(rl->n - 1);
    if (i != last) {
        /* Keep the array dense: the last entry takes the hole, and whoever points at it follows. */
        struct rl_entry *x = &rl->e[i];
        *x = rl->e[last];
        rl->slots[x->slot] = i + 1;
        if (x->prev != NIL)
            rl->e[x->prev].next = i;
        else
            rl->head = i;
        if (x->next != NIL)
            rl->e[x->next].prev = i;
        else
            rl->tail = i;
    }
    rl->n--;
}

static bool window_ended(const struct ratelimit *rl, const struct rl_entry *x, double now)
{
    return now >= x->start + rl->window;
}

static void purge(struct ratelimit *rl, double now)
{
    while (rl->head != NIL && window_ended(rl, &rl->e[rl->head], now))
        entry_remove(rl, rl->head);
}

bool ratelimit_blocked(struct ratelimit *rl, const char *key, double now, double *retry_after_s)
{
    if (retry_after_s)
        *retry_after_s = 0;
    purge(rl, now);
    size_t len = strnlen(key, RATELIMIT_KEY_MAX);
    uint32_t i = find(rl, key, len, hash_key(key, len));
    if (i == NIL)
        return false;
    const struct rl_entry *x = &rl->e[i];
    if (window_ended(rl, x, now) || x->count < rl->max_failures)
        return false;
    if (retry_after_s)
        *retry_after_s = x->start + rl->window - now;
    return true;
}

bool ratelimit_reserve(struct ratelimit *rl, const char *key, double now, double max_delay_s,
                       double *delay_s)
{
    purge(rl, now);
    size_t len = strnlen(key, RATELIMIT_KEY_MAX);
    uint32_t i = find(rl, key, len, hash_key(key, len));
    struct rl_entry *x = i == NIL ? NULL : &rl->e[i];
    if (!x || window_ended(rl, x, now)) {
        *delay_s = 0;
        ratelimit_failure(rl, key, now);
        return true;
    }
    /* The window (perhaps one booked ahead) has room, or the one right after it does. */
    double at = x->count < rl->max_failures ? x->start : x->start + rl->window;
    *delay_s = at > now ? at - now : 0;
    if (*delay_s > max_delay_s)
        return false;
    if (x->count < rl->max_failures) {
        x->count++;
    } else {
        /* To the tail, though a window booked ahead may open after ones appended later:
         * the age list is then only nearly in order, which can delay purging a little or
         * evict this booking early, never make any key stricter. */
        x->start = at;
        x->count = 1;
        list_unlink(rl, i);
        list_append(rl, i);
    }
    return true;
}

void ratelimit_failure(struct ratelimit *rl, const char *key, double now)
{
    purge(rl, now);
    size_t len = strnlen(key, RATELIMIT_KEY_MAX);
    uint64_t h = hash_key(key, len);
    uint32_t i = find(rl, key, len, h);
    if (i != NIL) {
        struct rl_entry *x = &rl->e[i];
        if (window_ended(rl, x, now)) {
            x->count = 1;
            x->start = now;
            list_unlink(rl, i);
            list_append(rl, i);
        } else if (x->count < UINT_MAX) {
            x->count++;
        }
        return;
    }
    if (rl->n == rl->max_keys)
        entry_remove(rl, rl->head); /* nothing expired is left: the oldest window goes */
    i = (uint32_t)rl->n++;
    struct rl_entry *x = &rl->e[i];
    x->hash = h;
    x->start = now;
    x->count = 1;
    memcpy(x->key, key, len);
    x->key[len] = '\0';
    size_t s = h & rl->mask;
    while (rl->slots[s] != 0)
        s = (s + 1) & rl->mask;
    rl->slots[s] = i + 1;
    x->slot = (uint32_t)s;
    list_append(rl, i);
}
