/* Closed-loop HTTPS load (see load.h). */
#include "load.h"

#include <stdio.h>
#include <stdlib.h>

void phase_header(void)
{
    printf("%-28s %6s %8s %8s %10s %9s %9s\n", "phase", "inflt", "ok", "failed", "per s", "p50 ms",
           "p90 ms");
}

struct slot {
    struct phase *ph;
    double sent;
};

static void launch(struct slot *s);

static void on_done(const struct http_response *resp, void *ud)
{
    struct slot *s = ud;
    struct phase *ph = s->ph;
    double now = ev_now(ph->loop);
    ph->inflight--;
    if (resp->kind == HTTP_OK && resp->status == 200) {
        ph->done++;
        if (ph->nlat == ph->cap) {
            ph->cap = ph->cap ? ph->cap * 2 : 1024;
            ph->lat = realloc(ph->lat, ph->cap * sizeof(double));
        }
        ph->lat[ph->nlat++] = now - s->sent;
    } else {
        if (ph->failed++ < 3)
            fprintf(stderr, "%s: %s (status %ld)\n", ph->name, resp->error ? resp->error : "",
                    resp->status);
    }
    if (now < ph->end)
        launch(s);
}

static void launch(struct slot *s)
{
    struct phase *ph = s->ph;
    s->sent = ev_now(ph->loop);
    if (http_request_start(ph->http, &ph->req, on_done, s) == 0)
        ph->inflight++;
    else
        ph->failed++;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void run_phase(struct phase *ph, int clients, double seconds)
{
    struct slot *slots = calloc((size_t)clients, sizeof(*slots));
    ev_now_update(ph->loop);
    ph->start = ev_now(ph->loop);
    ph->end = ph->start + seconds;
    for (int i = 0; i < clients; i++) {
        slots[i].ph = ph;
        launch(&slots[i]);
    }
    while (ph->inflight > 0)
        ev_run(ph->loop, EVRUN_ONCE);
    double took = ev_now(ph->loop) - ph->start;
    qsort(ph->lat, ph->nlat, sizeof(double), cmp_double);
    double p50 = ph->nlat ? ph->lat[ph->nlat / 2] : 0,
           p90 = ph->nlat ? ph->lat[ph->nlat * 9 / 10] : 0;
    printf("%-28s %6d %8ld %8ld %10.1f %9.1f %9.1f\n", ph->name, clients, ph->done, ph->failed,
           ph->done / took, p50 * 1000, p90 * 1000);
    free(slots);
    free(ph->lat);
}
