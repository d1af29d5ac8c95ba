/*
 * A bounded limiter of failed attempts, keyed by strings (the login server
 * keeps several: "ua:alice|203.0.113.5", "addr:203.0.113.5", and per user
 * name; see server.c). A key that has failed
 * max_failures times within its window is blocked until the window ends.
 * The window opens at the key's first failure and lasts window_s; once it
 * has ended, the next failure opens a new one with a count of one.
 *
 * Successes are not reported: a right guess made during a lockout does not
 * lift it, and the caller refuses it like any other attempt while blocked.
 *
 * The limiter does no I/O and reads no clock: the caller passes `now` in
 * seconds (a monotonic clock, e.g. ev_now(); a clock that goes back only
 * makes eviction pick a slightly younger entry). Memory is bounded: at most
 * max_keys keys are tracked. When a new key arrives and the table is full,
 * an entry whose window has ended is dropped, else the one whose window
 * opened first. Eviction forgets the evicted key's failures, so it can only
 * make the limiter more lenient for that key; a key not in the table is
 * never blocked, so eviction can never lock out a fresh key.
 *
 * Keys are compared on their first RATELIMIT_KEY_MAX bytes (longer ones
 * share the count of their prefix). Not thread-safe: one thread per limiter.
 */
#ifndef P2P_RATELIMIT_H
#define P2P_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>

#define RATELIMIT_KEY_MAX 127

struct ratelimit;

/*
 * max_failures >= 1, window_s > 0, 1 <= max_keys <= 2^24. Returns a limiter
 * the caller owns (ratelimit_free), or NULL on bad arguments or no memory.
 * Its memory, about 176 bytes per key, is allocated here once.
 */
struct ratelimit *ratelimit_new(unsigned max_failures, double window_s, size_t max_keys);
/* Accepts NULL. */
void ratelimit_free(struct ratelimit *rl);

/*
 * True when `key` has failed max_failures times or more in its current
 * window; then *retry_after_s (may be NULL) is the time until the window
 * ends, > 0. Otherwise *retry_after_s is 0.
 */
bool ratelimit_blocked(struct ratelimit *rl, const char *key, double now, double *retry_after_s);
/* Counts one failure of `key` at `now`. */
void ratelimit_failure(struct ratelimit *rl, const char *key, double now);
/*
 * Books the earliest moment, at `now` or later, at which one more failure of
 * `key` fits (its window not yet full, or the next window), and counts it
 * there: with max_failures 1 and window w, successive calls space their
 * moments w apart, which is how the login server queues attempts for a user
 * under attack. True with *delay_s >= 0 (the wait until that moment) when the
 * wait is at most max_delay_s; otherwise false, nothing counted, and *delay_s
 * is the wait it would have been. A key booked into the future counts as
 * blocked (ratelimit_blocked) until its booked window ends.
 */
bool ratelimit_reserve(struct ratelimit *rl, const char *key, double now, double max_delay_s,
                       double *delay_s);
/* The number of keys tracked now (<= max_keys). */
size_t ratelimit_size(const struct ratelimit *rl);

#endif
