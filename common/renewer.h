/*
 * Automatic certificate renewal for a running node: checks the credentials in
 * its state directory at start and then periodically, and renews them with
 * the login server (login_client.h) before they expire. The new certificate
 * keeps the Node-ID; the files are replaced atomically, so a crash mid-way
 * leaves the old, still valid set.
 */
#ifndef P2P_RENEWER_H
#define P2P_RENEWER_H

#include <ev.h>

struct renewer;

struct renewer_config {
    const char *state_dir;
    /*
     * Renew once less than this remains of the certificate's validity;
     * 0 = a third of its validity period.
     */
    double margin_s;
    double check_interval_s; /* 0 = 3600 */
    /* Called after a successful renewal (e.g. to reload TLS credentials); may be NULL. */
    void (*on_renewed)(void *ud);
    void *ud;
};

/*
 * Starts checking. Returns NULL (and logs why) when the state directory holds
 * no credentials: the node is not enrolled yet. The first check runs from the
 * loop right away.
 */
struct renewer *renewer_start(struct ev_loop *loop, const struct renewer_config *cfg);
/* Stops; an attempt in flight is cancelled. NULL is fine. */
void renewer_stop(struct renewer *r);

#endif
