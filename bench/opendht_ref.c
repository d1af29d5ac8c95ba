/* opendht_ref: the OpenDHT side of the super node ring benchmark (docs/benchmarks.md).
 *
 * It runs two OpenDHT nodes in this process on 127.0.0.1, bootstrapped into a network of
 * `dhtnode` processes that bench/opendht_bench.py starts: a writer with a generated identity,
 * which stores the records with signed puts and measures them, and a reader that joins
 * afterwards (so it stores none of them) and measures gets, from the call to the first value;
 * the keys are read in turn (key i % K), so with as many gets as keys each is read once.
 * It prints one JSON object with the figures. Built by bench/opendht_bench.py against Debian's
 * libopendht-c; not part of the project's build.
 */
#define _GNU_SOURCE
#include <opendht/opendht_c.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One operation in flight: when it started, when its first value came, when it ended. */
struct op {
    double t0, first, done;
    bool ok, finished;
    bool repeat; /* a get of a key this node has read before */
    unsigned values;
};

static bool on_value(const dht_value *v, void *ud)
{
    (void)v;
    struct op *o = ud;
    double t = now_s();
    pthread_mutex_lock(&mu);
    if (!o->values++)
        o->first = t;
    pthread_mutex_unlock(&mu);
    return true;
}

static unsigned in_flight;

static void on_done(bool ok, void *ud)
{
    struct op *o = ud;
    double t = now_s();
    pthread_mutex_lock(&mu);
    o->done = t;
    o->ok = ok;
    o->finished = true;
    in_flight--;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void on_shutdown(void *ud)
{
    (void)ud;
    pthread_mutex_lock(&mu);
    in_flight--;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    if (!n)
        return -1;
    qsort(v, n, sizeof(*v), cmp_double);
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i];
}

static void usage(FILE *f)
{
    fprintf(f, "usage: opendht_ref --bootstrap HOST:PORT [--network N] [--keys K] [--puts N]\n"
               "                   [--gets N] [--window W] [--settle S] [--value-bytes B]\n"
               "Prints one JSON object: signed puts (window 1 and W) and gets from a node\n"
               "that stores none of the values (window 1), latencies in milliseconds.\n");
}

/* Waits until at most `limit` operations are in flight. */
static void wait_in_flight(unsigned limit)
{
    pthread_mutex_lock(&mu);
    while (in_flight > limit)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static dht_runner *start_node(uint32_t network, const char *host, const char *port,
                              bool with_identity)
{
    dht_runner_config cfg;
    dht_runner_config_default(&cfg);
    cfg.dht_config.node_config.network = network;
    cfg.threaded = true;
    if (with_identity)
        cfg.dht_config.id = dht_identity_generate("opendht-ref", NULL);
    dht_runner *r = dht_runner_new();
    if (!r || dht_runner_run_config(r, 0, &cfg) != 0) {
        fprintf(stderr, "opendht_ref: cannot start an OpenDHT node\n");
        exit(1);
    }
    dht_runner_bootstrap(r, host, port);
    return r;
}

/* Signed puts of `n` values over `keys`, `window` at a time. Returns puts/s; latencies into lat. */
static double run_puts(dht_runner *w, dht_infohash *keys, unsigned nkeys, unsigned n,
                       unsigned window, size_t value_bytes, double *lat, unsigned *failed)
{
    struct op *ops = calloc(n, sizeof(*ops));
    char *text = malloc(value_bytes + 1);
    if (!ops || !text)
        exit(1);
    *failed = 0;
    double t0 = now_s();
    for (unsigned i = 0; i < n; i++) {
        wait_in_flight(window - 1);
        for (size_t j = 0; j < value_bytes; j++)
            text[j] = (char)('a' + (i + j) % 26);
        text[value_bytes] = '\0';
        dht_value *v = dht_value_new((const uint8_t *)text, value_bytes);
        pthread_mutex_lock(&mu);
        in_flight++;
        ops[i].t0 = now_s();
        pthread_mutex_unlock(&mu);
        dht_runner_put_signed(w, &keys[i % nkeys], v, on_done, &ops[i], false);
        dht_value_unref(v);
    }
    wait_in_flight(0);
    double el = now_s() - t0;
    for (unsigned i = 0; i < n; i++) {
        lat[i] = (ops[i].done - ops[i].t0) * 1000.0;
        if (!ops[i].ok)
            (*failed)++;
    }
    free(ops);
    free(text);
    return (double)n / el;
}

int main(int argc, char **argv)
{
    const char *boot = NULL;
    unsigned network = 7, nkeys = 200, nputs = 300, ngets = 3000, window = 32;
    double settle = 3.0;
    size_t value_bytes = 100;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!v) {
            fprintf(stderr, "opendht_ref: %s needs a value\n", a);
            usage(stderr);
            return 2;
        }
        i++;
        if (!strcmp(a, "--bootstrap"))
            boot = v;
        else if (!strcmp(a, "--network"))
            network = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--keys"))
            nkeys = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--puts"))
            nputs = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--gets"))
            ngets = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--window"))
            window = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--settle"))
            settle = strtod(v, NULL);
        else if (!strcmp(a, "--value-bytes"))
            value_bytes = strtoul(v, NULL, 10);
        else {
            fprintf(stderr, "opendht_ref: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
    }
    char host[256];
    const char *colon = boot ? strrchr(boot, ':') : NULL;
    if (!boot || !colon || colon == boot || (size_t)(colon - boot) >= sizeof(host) || !nkeys ||
        !nputs || !ngets || !window || value_bytes < 1 || value_bytes > 60000) {
        usage(stderr);
        return 2;
    }
    memcpy(host, boot, (size_t)(colon - boot));
    host[colon - boot] = '\0';
    const char *port = colon + 1;

    dht_infohash *keys = calloc(nkeys, sizeof(*keys));
    unsigned nlat = nputs > ngets ? nputs : ngets;
    double *lat = calloc(nlat, sizeof(*lat));
    if (!keys || !lat)
        return 1;
    for (unsigned i = 0; i < nkeys; i++)
        dht_infohash_random(&keys[i]);

    dht_runner *w = start_node(network, host, port, true);
    sleep((unsigned)settle);

    /* Every key read below gets its value. */
    unsigned failed;
    run_puts(w, keys, nkeys, nkeys, window, value_bytes, lat, &failed);
    if (failed == nkeys) {
        fprintf(stderr, "opendht_ref: no put succeeded; is the network up?\n");
        return 1;
    }
    /* The measured puts go to keys of their own, so that every key read below holds exactly
     * one value (a C API value has no id of ours, so a second put to a key adds a value). */
    unsigned f1, fw;
    dht_infohash *more = calloc(nputs, sizeof(*more));
    if (!more)
        return 1;
    for (unsigned i = 0; i < nputs; i++)
        dht_infohash_random(&more[i]);
    double rate1 = run_puts(w, more, nputs, nputs < 100 ? nputs : 100, 1, value_bytes, lat, &f1);
    double p50_1 = pct(lat, nputs < 100 ? nputs : 100, 0.5);
    for (unsigned i = 0; i < nputs; i++)
        dht_infohash_random(&more[i]);
    double ratew = run_puts(w, more, nputs, nputs, window, value_bytes, lat, &fw);
    double p50_w = pct(lat, nputs, 0.5);

    /* The writer stops (its values live on at the other nodes that store them, as a client's
     * records do) so that its searches do not share the CPU with the reader's gets. */
    pthread_mutex_lock(&mu);
    in_flight++;
    pthread_mutex_unlock(&mu);
    dht_runner_shutdown(w, on_shutdown, NULL);
    wait_in_flight(0);

    /* A reader that joins now stores none of the values. */
    dht_runner *r = start_node(network, host, port, false);
    sleep((unsigned)settle);
    struct op *ops = calloc(ngets, sizeof(*ops));
    bool *seen = calloc(nkeys, sizeof(*seen));
    if (!ops || !seen)
        return 1;
    unsigned got = 0, empty = 0;
    double t0 = now_s();
    for (unsigned i = 0; i < ngets; i++) {
        pthread_mutex_lock(&mu);
        in_flight++;
        ops[i].t0 = now_s();
        pthread_mutex_unlock(&mu);
        unsigned k = i % nkeys;
        ops[i].repeat = seen[k];
        seen[k] = true;
        dht_runner_get(r, &keys[k], on_value, on_done, &ops[i]);
        wait_in_flight(0);
    }
    double gel = now_s() - t0;
    unsigned n = 0, nfirst = 0, nrep = 0;
    double *done_lat = calloc(ngets, sizeof(*done_lat));
    double *first_lat = calloc(ngets, sizeof(*first_lat));
    double *rep_lat = calloc(ngets, sizeof(*rep_lat));
    if (!done_lat || !first_lat || !rep_lat)
        return 1;
    for (unsigned i = 0; i < ngets; i++) {
        done_lat[i] = (ops[i].done - ops[i].t0) * 1000.0;
        if (ops[i].values) {
            double ms = (ops[i].first - ops[i].t0) * 1000.0;
            lat[n++] = ms;
            if (ops[i].repeat)
                rep_lat[nrep++] = ms;
            else
                first_lat[nfirst++] = ms;
            got++;
        } else {
            empty++;
        }
    }
    printf(
        "{\"version\": \"%s\", \"keys\": %u, \"value_bytes\": %zu,\n"
        " \"put_signed_w1\": {\"n\": %u, \"per_s\": %.1f, \"median_ms\": %.3f, \"failed\": %u},\n"
        " \"put_signed_w%u\": {\"n\": %u, \"per_s\": %.1f, \"median_ms\": %.3f, \"failed\": "
        "%u},\n"
        " \"get_w1\": {\"n\": %u, \"per_s\": %.1f, \"first_value_median_ms\": %.3f, "
        "\"first_value_p99_ms\": %.3f, \"done_median_ms\": %.3f, \"without_value\": %u,\n"
        "   \"new_key\": {\"n\": %u, \"first_value_median_ms\": %.3f},\n"
        "   \"read_before\": {\"n\": %u, \"first_value_median_ms\": %.3f}}}\n",
        dht_version(), nkeys, value_bytes, nputs < 100 ? nputs : 100, rate1, p50_1, f1, window,
        nputs, ratew, p50_w, fw, ngets, (double)ngets / gel, pct(lat, n, 0.5), pct(lat, n, 0.99),
        pct(done_lat, ngets, 0.5), empty, nfirst, pct(first_lat, nfirst, 0.5), nrep,
        pct(rep_lat, nrep, 0.5));
    fflush(stdout);
    /* The runners' threads are stopped by the process's exit; a clean shutdown of OpenDHT
     * nodes waits for their searches and can take seconds. */
    _exit(got ? 0 : 1);
}
