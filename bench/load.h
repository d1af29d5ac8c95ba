/*
 * Closed-loop HTTPS load for the bench tools: N requests kept in flight on
 * our http_client (libcurl multi on libev) for S seconds; reports requests
 * per second and latency percentiles as one table row.
 */
#ifndef P2P_BENCH_LOAD_H
#define P2P_BENCH_LOAD_H

#include <ev.h>

#include "http_client.h"

struct phase {
    const char *name;
    struct ev_loop *loop;
    struct http_client *http;
    struct http_request req;
    /* filled by run_phase: */
    double start, end;
    long done, failed;
    double *lat;
    size_t nlat, cap;
    int inflight;
};

/* Prints the header line of the table run_phase() rows go under. */
void phase_header(void);
/* Runs the phase (ph->loop, ph->http and ph->req set by the caller) and prints its row. */
void run_phase(struct phase *ph, int clients, double seconds);

#endif
