/*
 * Super node registry of the bootstrap server (see registry.h). Entries live
 * in an array sorted by Node-ID: lookups are binary searches, the status page
 * walks the ring in order, and a few thousand super nodes cost a few hundred
 * kilobytes.
 *
 * When to check an address: on the first announce, when the address changes,
 * every `reverify_periods` periods for a listed node (its overlay port may
 * have died while its announcer lives on), and once a period for a rejected
 * one (it may have been fixed). A check that never reports back (a bug, or a
 * caller that lost it) is asked for again after a period.
 */
#include "registry.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MISSED_PERIODS 3

struct bs_registry {
    double period;
    unsigned reverify_periods;
    size_t max_entries;
    unsigned max_announces;
    struct bs_entry *v;
    size_t n;
};

struct bs_registry *bs_registry_new(double period_s, unsigned reverify_periods, size_t max_entries,
                                    unsigned max_announces)
{
    if (period_s <= 0 || max_entries == 0)
        return NULL;
    struct bs_registry *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->v = calloc(max_entries, sizeof(*r->v));
    if (!r->v) {
        free(r);
        return NULL;
    }
    r->period = period_s;
    r->reverify_periods = reverify_periods ? reverify_periods : 1;
    r->max_entries = max_entries;
    r->max_announces = max_announces ? max_announces : 1;
    return r;
}

void bs_registry_free(struct bs_registry *r)
{
    if (!r)
        return;
    free(r->v);
    free(r);
}

/* Index of id, or of where it would go (with *found false). */
static size_t find(const struct bs_registry *r, const nid_t *id, bool *found)
{
    size_t lo = 0, hi = r->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = nid_cmp(&r->v[mid].node_id, id);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

static void set_pending(struct bs_entry *e, double now)
{
    e->state = BS_PENDING;
    e->last_checked = now; /* the check starts now */
    snprintf(e->reason, sizeof(e->reason), "checking %s", e->address);
}

enum bs_announce_result bs_registry_announce(struct bs_registry *r, const struct bs_announce *a,
                                             double now)
{
    bool found;
    size_t i = find(r, &a->node_id, &found);
    struct bs_entry *e;
    if (!found) {
        if (r->n == r->max_entries)
            return BS_ANN_FULL;
        memmove(&r->v[i + 1], &r->v[i], (r->n - i) * sizeof(*r->v));
        r->n++;
        e = &r->v[i];
        memset(e, 0, sizeof(*e));
        e->node_id = a->node_id;
        e->first_seen = now;
        e->period_start = now;
        snprintf(e->address, sizeof(e->address), "%s", a->address);
    } else {
        e = &r->v[i];
        if (now - e->period_start >= r->period) {
            e->period_start = now;
            e->announces_in_period = 0;
        }
    }
    if (++e->announces_in_period > r->max_announces)
        return BS_ANN_FLOOD; /* nothing else changes: a flood cannot churn the list */
    e->attached = a->attached;
    e->capacity = a->capacity;
    e->uptime_s = a->uptime_s;
    e->last_announce = now;

    if (!found || strcmp(e->address, a->address) != 0) {
        /* A new address is unknown until checked: not listed meanwhile. */
        snprintf(e->address, sizeof(e->address), "%s", a->address);
        set_pending(e, now);
        return BS_ANN_CHECK;
    }
    double since = now - e->last_checked;
    if (e->state == BS_LISTED) {
        if (since < r->reverify_periods * r->period)
            return BS_ANN_OK;
        e->last_checked = now; /* it stays listed while it is checked again */
        return BS_ANN_CHECK;
    }
    if (since < r->period) /* pending (its answer may be lost) or rejected */
        return BS_ANN_OK;
    set_pending(e, now);
    return BS_ANN_CHECK;
}

void bs_registry_checked(struct bs_registry *r, const nid_t *id, const char *address, bool ok,
                         const char *reason, double now)
{
    bool found;
    size_t i = find(r, id, &found);
    if (!found || strcmp(r->v[i].address, address) != 0)
        return; /* gone, or moved: a newer check decides */
    struct bs_entry *e = &r->v[i];
    e->last_checked = now;
    if (ok) {
        e->state = BS_LISTED;
        e->reason[0] = '\0';
    } else {
        e->state = BS_REJECTED;
        snprintf(e->reason, sizeof(e->reason), "%s", reason ? reason : "check failed");
    }
}

bool bs_registry_withdraw(struct bs_registry *r, const nid_t *id)
{
    bool found;
    size_t i = find(r, id, &found);
    if (!found)
        return false;
    memmove(&r->v[i], &r->v[i + 1], (r->n - i - 1) * sizeof(*r->v));
    r->n--;
    return true;
}

size_t bs_registry_expire(struct bs_registry *r, double now)
{
    size_t kept = 0, dropped = 0;
    for (size_t i = 0; i < r->n; i++) {
        if (now - r->v[i].last_announce > MISSED_PERIODS * r->period) {
            dropped++;
            continue;
        }
        if (kept != i)
            r->v[kept] = r->v[i];
        kept++;
    }
    r->n = kept;
    return dropped;
}

const struct bs_entry *bs_registry_get(const struct bs_registry *r, const nid_t *id)
{
    bool found;
    size_t i = find(r, id, &found);
    return found ? &r->v[i] : NULL;
}

struct keyed {
    double key;
    const struct bs_entry *e;
};

static int by_key_desc(const void *a, const void *b)
{
    double x = ((const struct keyed *)a)->key, y = ((const struct keyed *)b)->key;
    return x < y ? 1 : x > y ? -1 : 0;
}

size_t bs_registry_pick(const struct bs_registry *r, size_t count, uint64_t (*rnd)(void *ud),
                        void *rnd_ud, const struct bs_entry **out)
{
    if (count == 0)
        return 0;
    struct keyed *k = malloc((r->n ? r->n : 1) * sizeof(*k));
    if (!k)
        return 0;
    size_t m = 0;
    /*
     * Weighted sampling without replacement (Efraimidis and Spirakis): each
     * candidate gets the key u^(1/w), u uniform in (0,1); the largest keys win.
     * In logarithms: log(u) / w.
     */
    for (size_t i = 0; i < r->n; i++) {
        const struct bs_entry *e = &r->v[i];
        if (e->state != BS_LISTED)
            continue;
        double spare = e->capacity > e->attached ? (double)(e->capacity - e->attached) : 0.0;
        double u = ((double)(rnd(rnd_ud) >> 11) + 0.5) / 9007199254740992.0; /* (0,1) */
        k[m].key = log(u) / (1.0 + spare);
        k[m].e = e;
        m++;
    }
    qsort(k, m, sizeof(*k), by_key_desc);
    size_t n = m < count ? m : count;
    for (size_t i = 0; i < n; i++)
        out[i] = k[i].e;
    free(k);
    return n;
}

void bs_registry_foreach(const struct bs_registry *r,
                         void (*cb)(const struct bs_entry *e, void *ud), void *ud)
{
    for (size_t i = 0; i < r->n; i++)
        cb(&r->v[i], ud);
}

size_t bs_registry_count(const struct bs_registry *r, enum bs_state state)
{
    size_t n = 0;
    for (size_t i = 0; i < r->n; i++)
        n += r->v[i].state == state;
    return n;
}
