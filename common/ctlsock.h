/*
 * The local control socket of a running daemon (`supernode status`,
 * `ordinarynode get ...`): a UNIX stream socket, mode 0600, in the daemon's
 * state directory. One request per connection: the client writes one JSON
 * object and a newline; the daemon answers with one JSON object and a newline
 * and closes. Requests are {"cmd": "<name>", ...}; answers are
 * {"ok": true, ...} or {"ok": false, "error": "<one line>"}.
 *
 * The server runs on the daemon's libev loop and never blocks: a handler may
 * answer at once or later (after an overlay lookup) through ctl_reply().
 */
#ifndef P2P_CTLSOCK_H
#define P2P_CTLSOCK_H

#include <ev.h>
#include <jansson.h>
#include <stddef.h>

#define CTL_MAX_REQUEST (64 * 1024) /* bytes of one request line */
#define CTL_MAX_CLIENTS 64          /* connections served at once; more wait in the backlog */
#define CTL_TIMEOUT_S   10.0        /* a client must send its request within this */

struct ctl_server;
struct ctl_req;

/*
 * Called once per well-formed request (a JSON object with a string "cmd").
 * `request` is borrowed for the call. The handler must eventually call
 * ctl_reply(r, ...) exactly once, now or later; if the client went away
 * meanwhile the answer is dropped silently. Malformed requests (not JSON, no
 * "cmd", too long, not finished in time) are answered by the server itself
 * with {"ok":false,"error":...} and logged; the handler never sees them.
 */
typedef void (*ctl_handler)(struct ctl_req *r, json_t *request, void *ud);

/*
 * Listens on `path`. A stale socket file (nothing accepting on it) is
 * replaced; a live one is an error ("another process is serving <path>"),
 * as is a path too long for sun_path. The socket is created with mode 0600.
 * NULL + one line in err on failure.
 */
struct ctl_server *ctl_server_start(struct ev_loop *loop, const char *path, ctl_handler handler,
                                    void *ud, char *err, size_t errlen);
/*
 * Stops listening, removes the socket file and drops the connections still
 * open. Requests the handler has not answered yet stay valid: a later
 * ctl_reply() on them just frees them. NULL is fine.
 */
void ctl_server_stop(struct ctl_server *s);

/* Answers a request: `response` (reference taken: json_decref'd by the server). */
void ctl_reply(struct ctl_req *r, json_t *response);
/* Shorthand for {"ok":false,"error":<printf>}. */
void ctl_reply_error(struct ctl_req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Client side (blocking, for CLI commands): connects to `path`, sends
 * `request`, waits up to timeout_ms for the answer. 0 and *response (the
 * caller json_decref's it), or -1 and one line in err: "cannot connect to
 * <path>: No such file or directory (is the daemon running?)", "no answer
 * from <path> within 5000 ms", "malformed answer from <path>".
 */
int ctl_call(const char *path, json_t *request, int timeout_ms, json_t **response, char *err,
             size_t errlen);

/* The control socket's path: `configured` when set, else <state_dir>/control.sock (malloc'd;
 * NULL when it does not fit). */
char *ctl_default_path(const char *configured, const char *state_dir);

#endif
