/*
 * A running node's periodic business with the login server.
 *
 * Certificates: checks the credentials in its state directory at start and
 * then periodically, and renews them with the login server (login_client.h)
 * before they expire. The new certificate keeps the Node-ID; the files are
 * replaced atomically, so a crash mid-way leaves the old, still valid set.
 *
 * Revocation (docs/protocol.md 2.6): fetches the CA's revocation list from
 * <login url>/v1/crl at start and then at half of the time left to the list's
 * nextUpdate (within 60 s .. 1 h, and never longer than crl_max_interval_s), over
 * the same verified HTTPS as renewal. A list the process takes (crl.h: signed
 * by the overlay CA, not older than the one held) is kept as
 * <state_dir>/crl.pem, written atomically and loaded again at the next start,
 * so a restart does not forget a revocation; links whose peer it revokes are
 * closed at once (conn_close_revoked()). A failed fetch is logged and retried
 * (within 30 s, or crl_max_interval_s if shorter); the last good list stays.
 */
#ifndef P2P_RENEWER_H
#define P2P_RENEWER_H

#include <ev.h>
#include <stddef.h>

struct renewer;

struct renewer_config {
    const char *state_dir;
    /*
     * Renew once less than this remains of the certificate's validity;
     * 0 = a third of its validity period.
     */
    double margin_s;
    double check_interval_s; /* 0 = 3600 */
    /*
     * Longest time between two fetches of the revocation list, which bounds how long a
     * revoked certificate is still accepted here; 0 = check_interval_s. (Without it: half of
     * the list's nextUpdate, within 60 s .. 1 h.)
     */
    double crl_max_interval_s;
    /* Called after a successful renewal (e.g. to reload TLS credentials); may be NULL. */
    void (*on_renewed)(void *ud);
    void *ud;
};

/*
 * Starts checking. Returns NULL (and logs why) when the state directory holds
 * no credentials: the node is not enrolled yet. The revocation list kept in the
 * state directory is loaded during this call (so it applies to the first
 * handshake); the first check and the first fetch run from the loop right away.
 */
struct renewer *renewer_start(struct ev_loop *loop, const struct renewer_config *cfg);
/* Stops; an attempt in flight is cancelled. NULL is fine. */
void renewer_stop(struct renewer *r);

/*
 * The revocation list half alone, for a process without node credentials in a state
 * directory (the bootstrap server, say): sets the overlay CA (crl.h), loads the list kept at
 * crl_path if any, then fetches <login url>/v1/crl from the loop right away and again as
 * described above. renewer_start() runs one of these itself.
 */
struct renewer_crl;
struct renewer_crl_config {
    const char *const *login_urls; /* https:// base URLs, tried in turn; copied */
    size_t n_login_urls;
    const char *ca_file;   /* the overlay CA (PEM): verifies the login server and the lists */
    const char *crl_path;  /* where the list is kept across restarts; NULL: nowhere */
    double max_interval_s; /* longest time between two fetches; 0 = 3600 */
};
/* NULL (logged) when the CA cannot be read or no login server is given; a list kept at
 * crl_path is loaded (and applies) all the same when the CA could be read. */
struct renewer_crl *renewer_crl_start(struct ev_loop *loop, const struct renewer_crl_config *cfg);
/* Stops; a fetch in flight is cancelled. The list taken stays in force. NULL is fine. */
void renewer_crl_stop(struct renewer_crl *f);

#endif
