/*
 * Automatic promotion of an ordinary node to a super node, and demotion back
 * (seed 004 section 7; docs/promotion.md has the state machine and the
 * thresholds). The super node role runs in this process, on the ordinary
 * node's loop, through the supernode library; the node's own user functions
 * stay on the ordinary node core, which attaches to its own super node role
 * while promoted.
 */
#ifndef P2P_PROMO_H
#define P2P_PROMO_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "login_client.h"
#include "on.h"

struct promo_params {
    struct onode *on;
    const struct node_creds *creds;    /* thresholds from creds->doc.promotion */
    const char *listen;                /* the overlay port the role takes over (NULL: never) */
    const char *advertise;             /* where others reach it (NULL = listen) */
    bool never;                        /* the user's opt-out (never_promote) */
    const char *const *bootstrap_urls; /* where the promoted node announces itself */
    size_t n_bootstrap_urls;
    /* The super node role's limits (the supernode daemon's defaults when 0). */
    size_t max_attached;
    size_t max_connections;
};

struct promo;

/* Starts watching the criteria (at once; the first probe after the first attachment). */
struct promo *promo_start(struct ev_loop *loop, const struct promo_params *p);
/* The super node asked us to become one (the "need" criterion). */
void promo_invited(struct promo *pr, const char *reason);
/*
 * Graceful stop: a promoted node leaves the ring (hand-off first) and
 * withdraws from the bootstrap servers, then done(ud) is called; at once
 * when not promoted.
 */
void promo_stop(struct promo *pr, void (*done)(void *ud), void *ud);
void promo_free(struct promo *pr);
/* {"state", "blocked", "criteria": {...}, "promotions", "demotions", "supernode": {...}}. */
json_t *promo_status(struct promo *pr);

#endif
