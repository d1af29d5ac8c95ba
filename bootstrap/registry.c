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

#include <arpa/inet.h>
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
    unsigned long max_capacity;
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
    r->max_capacity = BS_CAPACITY_MAX_DEF;
    return r;
}

void bs_registry_set_max_capacity(struct bs_registry *r, unsigned long max)
{
    r->max_capacity = max ? max : BS_CAPACITY_MAX_DEF;
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
    /* The weight in picks comes from these: one announce must not outweigh the whole list. */
    e->capacity = a->capacity < r->max_capacity ? a->capacity : r->max_capacity;
    e->attached = a->attached < r->max_capacity ? a->attached : r->max_capacity;
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
    uint64_t tie; /* random: equal keys come out in random order, not in Node-ID order */
    const struct bs_entry *e;
};

static int by_key_desc(const void *a, const void *b)
{
    const struct keyed *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? 1 : -1;
    return x->tie < y->tie ? 1 : x->tie > y->tie ? -1 : 0;
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
        k[m].tie = rnd(rnd_ud);
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

/* ---- Address classes ------------------------------------------------------------------------ */

static bool v4_public(const unsigned char *a)
{
    if (a[0] == 0 || a[0] == 10 || a[0] == 127 || a[0] >= 224) /* this net, private, loopback,
                                                                   multicast, reserved, broadcast */
        return false;
    if ((a[0] == 100 && (a[1] & 0xc0) == 64) || (a[0] == 169 && a[1] == 254) ||
        (a[0] == 172 && (a[1] & 0xf0) == 16) || (a[0] == 192 && a[1] == 168))
        return false; /* shared (CGNAT), link-local, private */
    if ((a[0] == 192 && a[1] == 0 && (a[2] == 0 || a[2] == 2)) ||
        (a[0] == 198 && (a[1] & 0xfe) == 18) || (a[0] == 198 && a[1] == 51 && a[2] == 100) ||
        (a[0] == 203 && a[1] == 0 && a[2] == 113))
        return false; /* protocol assignments, documentation, benchmarking */
    return true;
}

static bool all_zero(const unsigned char *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i])
            return false;
    return true;
}

bool bs_addr_public(const char *host)
{
    unsigned char a[16];
    if (!host)
        return false;
    if (inet_pton(AF_INET, host, a) == 1)
        return v4_public(a);
    if (inet_pton(AF_INET6, host, a) != 1)
        return false;
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const unsigned char nat64[12] = {0, 0x64, 0xff, 0x9b};
    /* Forms that carry an IPv4 address reach what that address reaches. */
    if (!memcmp(a, mapped, 12) || !memcmp(a, nat64, 12))
        return v4_public(a + 12);
    if (all_zero(a, 12)) /* unspecified, ::1, and the deprecated IPv4-compatible form */
        return false;
    if (a[0] == 0x20 && a[1] == 0x02) /* 6to4: the IPv4 address follows */
        return v4_public(a + 2);
    if ((a[0] & 0xe0) != 0x20) /* outside global unicast 2000::/3: ULA, link-local, multicast... */
        return false;
    if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0x0d && a[3] == 0xb8)
        return false; /* documentation */
    if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0x00 && a[3] == 0x02 && a[4] == 0 && a[5] == 0)
        return false; /* benchmarking 2001:2::/48 */
    return true;
}

bool bs_addr_loopback(const char *host)
{
    unsigned char a[16];
    if (!host)
        return false;
    if (inet_pton(AF_INET, host, a) == 1)
        return a[0] == 127;
    if (inet_pton(AF_INET6, host, a) != 1)
        return false;
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (!memcmp(a, mapped, 12))
        return a[12] == 127;
    return all_zero(a, 15) && a[15] == 1;
}
