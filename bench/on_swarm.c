/*
 * on_swarm: many complete ordinary nodes (ordinarynode/on.c, the daemon's own
 * core) in one process and one loop, for failover tests and benchmarks. Each
 * node has its own state directory (as `loginserver issue --node PREFIX
 * --count N` mints them) and host cache. Every attachment is printed as one
 * JSON line on stdout:
 *   {"event":"attached","node":7,"sn":"<40 hex>","addr":"...","source":"cache","t":12.345}
 * (t: seconds since the swarm started). Runs until SIGINT/SIGTERM or --seconds.
 */
#include <errno.h>
#include <ev.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "log.h"
#include "login_client.h"
#include "on.h"

struct node {
    int idx;
    struct node_creds creds;
    struct onode *on;
    char dir[4096];
};

static double t0;
static struct ev_loop *loop;
static unsigned stopped_count, n_nodes;

static void attached(void *ud, const char *sn_id, const char *sn_addr, const char *source)
{
    struct node *n = ud;
    printf("{\"event\":\"attached\",\"node\":%d,\"sn\":\"%s\",\"addr\":\"%s\",\"source\":\"%s\","
           "\"t\":%.4f}\n",
           n->idx, sn_id, sn_addr, source, ev_time() - t0);
    fflush(stdout);
}

static void node_stopped(void *ud)
{
    (void)ud;
    if (++stopped_count == n_nodes)
        ev_break(loop, EVBREAK_ALL);
}

static struct node *nodes;

static void stop_all(void)
{
    for (unsigned i = 0; i < n_nodes; i++)
        onode_stop(nodes[i].on, node_stopped, &nodes[i]);
}

static void on_signal(struct ev_loop *l, ev_signal *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    stop_all();
}

static void on_deadline(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
    stop_all();
}

static void usage(void)
{
    fprintf(stderr,
            "usage: on_swarm --base DIR --prefix NAME --count N --supernodes ADDR[,ADDR...]\n"
            "                [--seconds S] [--no-register] [-v]\n"
            "Runs N ordinary nodes from the state directories DIR/NAME1 .. DIR/NAMEN.\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *base = NULL, *prefix = NULL, *sns = NULL;
    long count = 0;
    double seconds = 0;
    bool reg = true;
    int verbose = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--base") && v)
            base = argv[++i];
        else if (!strcmp(a, "--prefix") && v)
            prefix = argv[++i];
        else if (!strcmp(a, "--count") && v)
            count = strtol(argv[++i], NULL, 10);
        else if (!strcmp(a, "--supernodes") && v)
            sns = argv[++i];
        else if (!strcmp(a, "--seconds") && v)
            seconds = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--no-register"))
            reg = false;
        else if (!strcmp(a, "-v"))
            verbose++;
        else
            usage();
    }
    if (!base || !prefix || !sns || count < 1 || count > 100000)
        usage();
    log_set_level(verbose ? LL_INFO : LL_WARN);

    /* Each node holds a TLS link and a control-free state: raise the descriptor limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)count * 2 + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)count * 2 + 64 ? rl.rlim_max : (rlim_t)count * 2 + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    char *list = strdup(sns);
    const char *addrs[64];
    size_t n_addrs = 0;
    for (char *tok = strtok(list, ","); tok && n_addrs < 64; tok = strtok(NULL, ","))
        addrs[n_addrs++] = tok;

    loop = ev_default_loop(0);
    t0 = ev_time();
    n_nodes = (unsigned)count;
    nodes = calloc((size_t)count, sizeof(*nodes));
    if (!nodes)
        return 1;
    for (long i = 0; i < count; i++) {
        struct node *n = &nodes[i];
        char err[512];
        n->idx = (int)i + 1;
        snprintf(n->dir, sizeof(n->dir), "%s/%s%ld", base, prefix, i + 1);
        if (node_creds_load(n->dir, &n->creds, err, sizeof(err)) != 0) {
            fprintf(stderr, "on_swarm: %s\n", err);
            return 1;
        }
        struct on_params p = {.state_dir = n->dir,
                              .creds = &n->creds,
                              .supernodes = addrs,
                              .n_supernodes = n_addrs,
                              .register_user = reg,
                              .on_attached = attached,
                              .ud = n};
        if (!(n->on = onode_new(loop, &p, err, sizeof(err)))) {
            fprintf(stderr, "on_swarm: node %ld: %s\n", i + 1, err);
            return 1;
        }
    }
    for (long i = 0; i < count; i++)
        onode_start(nodes[i].on);
    ev_signal sint, sterm;
    ev_signal_init(&sint, on_signal, SIGINT);
    ev_signal_init(&sterm, on_signal, SIGTERM);
    ev_signal_start(loop, &sint);
    ev_signal_start(loop, &sterm);
    ev_timer deadline;
    if (seconds > 0) {
        ev_timer_init(&deadline, on_deadline, seconds, 0.);
        ev_timer_start(loop, &deadline);
    }
    /* Ends by ev_break once every node has stopped. */
    ev_run(loop, 0);
    for (long i = 0; i < count; i++) {
        onode_free(nodes[i].on);
        node_creds_free(&nodes[i].creds);
    }
    free(nodes);
    free(list);
    return 0;
}
