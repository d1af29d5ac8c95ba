/* A GLib main context on a libev loop (glibev.h). */
#include "glibev.h"

#include <stdbool.h>
#include <stdlib.h>

struct glibev {
    struct ev_loop *loop;
    GMainContext *ctx;
    ev_prepare prepare;
    ev_check check;
    ev_timer timer;
    GPollFD *fds;
    ev_io *ios;
    int nfds, cap;
    gint max_prio;
    bool armed;         /* the watchers of a round are started */
    bool timer_started; /* ...and the timer among them */
};

static void nop_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    /* The check watcher collects the events with ev_clear_pending before this could run. */
    (void)loop, (void)w, (void)revents;
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)w, (void)revents; /* it only wakes the loop */
}

static bool grow(struct glibev *g, int n)
{
    if (n <= g->cap)
        return true;
    int cap = n + 8;
    GPollFD *fds = realloc(g->fds, (size_t)cap * sizeof(*fds));
    if (!fds)
        return false;
    g->fds = fds;
    ev_io *ios = realloc(g->ios, (size_t)cap * sizeof(*ios));
    if (!ios)
        return false;
    g->ios = ios;
    g->cap = cap;
    return true;
}

/* The watchers of one round do not keep the loop alive (the context always has its wake-up
 * descriptor): unref'd after start, ref'd again before stop. */
static void disarm(struct glibev *g)
{
    for (int i = 0; i < g->nfds; i++) {
        ev_ref(g->loop);
        ev_io_stop(g->loop, &g->ios[i]);
    }
    /* libev stops an expired one-shot timer itself (and an io watcher whose descriptor went
     * bad), taking its reference then: so give back one for every watcher started, active or
     * not, and stop (a no-op on a stopped watcher). */
    if (g->timer_started) {
        ev_ref(g->loop);
        ev_timer_stop(g->loop, &g->timer);
        g->timer_started = false;
    }
    g->nfds = 0;
    g->armed = false;
}

static void prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)revents;
    struct glibev *g = w->data;
    if (g->armed)
        disarm(g);
    gboolean ready = g_main_context_prepare(g->ctx, &g->max_prio);
    gint timeout = -1;
    int n;
    while ((n = g_main_context_query(g->ctx, g->max_prio, &timeout, g->fds, g->cap)) > g->cap)
        if (!grow(g, n)) {
            n = g->cap; /* out of memory: watch what fits, the rest waits for the next round */
            break;
        }
    g->nfds = n;
    for (int i = 0; i < n; i++) {
        int ev = 0;
        if (g->fds[i].events & (G_IO_IN | G_IO_PRI | G_IO_HUP | G_IO_ERR))
            ev |= EV_READ;
        if (g->fds[i].events & G_IO_OUT)
            ev |= EV_WRITE;
        g->fds[i].revents = 0;
        ev_io_init(&g->ios[i], nop_cb, g->fds[i].fd, ev ? ev : EV_READ);
        ev_io_start(loop, &g->ios[i]);
        ev_unref(loop);
    }
    if (ready)
        timeout = 0;
    if (timeout >= 0) {
        ev_timer_set(&g->timer, timeout / 1000.0, 0.0);
        ev_timer_start(loop, &g->timer);
        ev_unref(loop);
        g->timer_started = true;
    }
    g->armed = true;
}

static void check_cb(struct ev_loop *loop, ev_check *w, int revents)
{
    (void)revents;
    struct glibev *g = w->data;
    if (!g->armed)
        return;
    int n = g->nfds;
    for (int i = 0; i < n; i++) {
        int got = ev_clear_pending(loop, &g->ios[i]);
        if (got & EV_READ)
            g->fds[i].revents |= g->fds[i].events & (G_IO_IN | G_IO_PRI | G_IO_HUP | G_IO_ERR);
        if (got & EV_WRITE)
            g->fds[i].revents |= g->fds[i].events & G_IO_OUT;
    }
    ev_clear_pending(loop, &g->timer);
    disarm(g);
    if (g_main_context_check(g->ctx, g->max_prio, g->fds, n))
        g_main_context_dispatch(g->ctx);
}

struct glibev *glibev_new(struct ev_loop *loop)
{
    struct glibev *g = calloc(1, sizeof(*g));
    if (!g || !grow(g, 8)) {
        if (g)
            free(g->fds);
        free(g);
        return NULL;
    }
    g->loop = loop;
    g->ctx = g_main_context_new();
    g_main_context_acquire(g->ctx);
    ev_prepare_init(&g->prepare, prepare_cb);
    g->prepare.data = g;
    ev_set_priority(&g->prepare, EV_MINPRI);
    ev_prepare_start(loop, &g->prepare);
    ev_check_init(&g->check, check_cb);
    g->check.data = g;
    ev_set_priority(&g->check, EV_MAXPRI);
    ev_check_start(loop, &g->check);
    ev_init(&g->timer, timer_cb);
    g->timer.data = g;
    /* The context alone must not keep the daemon's loop alive. */
    ev_unref(loop);
    ev_unref(loop);
    return g;
}

GMainContext *glibev_context(struct glibev *g)
{
    return g->ctx;
}

void glibev_free(struct glibev *g)
{
    if (!g)
        return;
    if (g->armed)
        disarm(g);
    ev_ref(g->loop);
    ev_ref(g->loop);
    ev_prepare_stop(g->loop, &g->prepare);
    ev_check_stop(g->loop, &g->check);
    g_main_context_release(g->ctx);
    g_main_context_unref(g->ctx);
    free(g->fds);
    free(g->ios);
    free(g);
}
