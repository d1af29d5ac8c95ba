/*
 * A super node's side of the bootstrap servers (docs/protocol.md section 3):
 * announce itself with its load to every bootstrap server of the overlay
 * document, every period (the period the server answers with), while the
 * owner says it should be listed; withdraw at once when it should not (a
 * graceful leave, or an unhealthy node).
 */
#ifndef P2P_ANNOUNCE_H
#define P2P_ANNOUNCE_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

#include "http_client.h"

struct announce_load {
    unsigned long attached; /* ordinary nodes attached now */
    unsigned long capacity; /* the most this node accepts */
    double uptime_s;
};

struct announce_config {
    const char *const *urls; /* bootstrap base URLs (https://...) */
    size_t n_urls;
    /* These three must outlive the announcer; the other strings are copied. */
    const char *ca_file;              /* the overlay CA: servers are verified against it only */
    const char *cert_file, *key_file; /* our node certificate (client authentication) */
    const char *node_id;              /* 40 hex */
    const char *address;              /* our overlay address, host:port */
    double period_s;                  /* until a server says otherwise; 0 = 30 */
    /* Whether we should be listed now (a member of a healthy ring), and our load. */
    bool (*wanted)(void *ud, struct announce_load *load);
    void *ud;
};

struct announcer;

/* Starts announcing (the first round at once). The client and the loop must outlive it. */
struct announcer *announcer_start(struct ev_loop *loop, struct http_client *http,
                                  const struct announce_config *cfg);

/* Runs a round now (e.g. right after joining the ring) instead of at the next period. */
void announcer_poke(struct announcer *a);

/*
 * Withdraws from every server (DELETE /v1/announce), stops announcing and
 * calls done(ud) when every server answered or after 3 s. NULL is fine (done
 * is then called at once).
 */
void announcer_withdraw(struct announcer *a, void (*done)(void *ud), void *ud);

/* Stops and frees (requests in flight are left to the http client). NULL is fine. */
void announcer_free(struct announcer *a);

#endif
