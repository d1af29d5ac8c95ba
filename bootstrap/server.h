/*
 * The bootstrap server's HTTPS front (docs/protocol.md section 3): announces
 * from super nodes, the check of their addresses over the overlay transport,
 * the list for new nodes, a status page and metrics. Runs on the caller's loop.
 */
#ifndef P2P_BS_SERVER_H
#define P2P_BS_SERVER_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>

struct bs_server_config {
    const char *listen;
    const char *overlay;
    const char *ca_file;   /* the overlay CA: client certificates and checked nodes */
    const char *cert_file; /* this server's service certificate (HTTPS and checks) */
    const char *key_file;
    double period_s;
    unsigned reverify_periods;
    size_t max_supernodes;
    unsigned max_announces; /* per node per period */
    bool public_only;       /* only public addresses (loopback ones too when we listen on one) */
    unsigned long max_capacity; /* announced capacities count up to this; 0 = default */
    unsigned check_timeout_ms;
    size_t max_body;
    unsigned max_connections, max_per_address; /* HTTPS; 0 = httpd.h's defaults */
};

struct bs_server;

struct bs_server *bs_server_start(struct ev_loop *loop, const struct bs_server_config *cfg,
                                  char *err, size_t errlen);
int bs_server_port(const struct bs_server *s);
/* Stops serving and closes the checks in flight (they finish from the loop). */
void bs_server_stop(struct bs_server *s);
/* Frees everything; call after the loop has run the closing checks out. NULL is fine. */
void bs_server_free(struct bs_server *s);

#endif
