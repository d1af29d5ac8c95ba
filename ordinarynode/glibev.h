/*
 * A GLib main context driven from a libev loop, on the loop's thread (no second
 * thread): libnice's ICE agent (chan.c) lives on a GMainContext, the daemon on
 * libev. Before the loop blocks, an ev_prepare asks the context what it waits
 * for (g_main_context_prepare/query) and arms one ev_io per descriptor and an
 * ev_timer for its timeout; after the loop woke, an ev_check hands back what
 * happened (g_main_context_check) and runs the sources that are ready
 * (g_main_context_dispatch). This is "Method 1" of embedding another event
 * loop in libev's manual (ev_prepare and ev_check).
 *
 * The context is acquired for its whole life by the loop's thread: nothing
 * else may iterate it.
 */
#ifndef P2P_GLIBEV_H
#define P2P_GLIBEV_H

#include <ev.h>
#include <glib.h>

struct glibev;

/* A new context, driven from loop. NULL when out of memory. */
struct glibev *glibev_new(struct ev_loop *loop);
GMainContext *glibev_context(struct glibev *g);
/* Stops the watchers and unrefs the context (sources still attached die with it). NULL is fine. */
void glibev_free(struct glibev *g);

#endif
