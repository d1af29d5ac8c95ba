/*
 * The login server's HTTPS front (docs/protocol.md section 2): the signed
 * overlay document, enrollment and renewal. Runs on the caller's loop, with
 * a few worker threads of its own for password checks (server.c says how).
 */
#ifndef P2P_LS_SERVER_H
#define P2P_LS_SERVER_H

#include <ev.h>
#include <stddef.h>

#include "ca.h"
#include "userstore.h"

struct ls_server_config {
    const char *listen;
    size_t max_body;
    unsigned max_failures;          /* failed logins per (user, client address) per window */
    unsigned max_failures_per_addr; /* failed logins per client address, any users, per window */
    double failure_window_s;
    /* Once a user has max_failures failures in the window from all addresses together, its
     * login attempts are spaced this far apart (a slow-down for everyone, never a lockout). */
    double user_slowdown_s;
    unsigned max_devices;        /* devices (Node-IDs) per account */
    unsigned max_certs_per_user; /* enrollments and renewals per account per cert_window_s */
    double cert_window_s;
    long long crl_next_update_s; /* nextUpdate - thisUpdate of the served CRL */
    long long validity_days;     /* of node certificates */
    unsigned pbkdf2_iterations;  /* hashes weaker than this are upgraded at the next login */
    unsigned max_connections;
    unsigned pbkdf2_threads;     /* worker threads for password checks; 0 = 2 */
    unsigned pbkdf2_queue;       /* checks waiting for a worker before 503; 0 = 64 */
    unsigned pbkdf2_per_address; /* enrollments one address may have in progress; 0 = 16 */
};

struct ls_server;

/* The server uses `ca` and `users` (not owned; they must outlive it). NULL + err on failure. */
struct ls_server *ls_server_start(struct ev_loop *loop, struct ls_ca *ca, struct userstore *users,
                                  const struct ls_server_config *cfg, char *err, size_t errlen);
int ls_server_port(const struct ls_server *s);
void ls_server_stop(struct ls_server *s);

#endif
