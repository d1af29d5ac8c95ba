/*
 * supernode: a member of the overlay's DHT core (seed 004 section 3).
 *
 * This is the daemon's skeleton: it loads and checks its configuration, and
 * when credentials are configured it listens for node-to-node TLS links and
 * answers "ping" requests. Ring membership, routing and storage build on it
 * (see docs/architecture.md for what exists and what comes next).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "daemon.h"
#include "enroll.h"
#include "renewer.h"
#include "log.h"

struct sn_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *listen;
    char *state_dir;
    char *ca_file;
    char *cert_file;
    char *key_file;
    long long max_connections;
    long long handshake_timeout_ms;
    long long idle_timeout_ms;
    long long max_frame;
    long long cert_renew_margin_s;
    long long cert_check_interval_s;
};

/* The transport settings of this node, from its configuration. */
static struct tls_config sn_tls_config(const struct sn_config *cfg)
{
    return (struct tls_config){
        .ca_file = cfg->ca_file,
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .overlay = cfg->overlay,
        .handshake_timeout_ms = (unsigned)cfg->handshake_timeout_ms,
        .idle_timeout_ms = (unsigned)cfg->idle_timeout_ms,
        .max_frame = (size_t)cfg->max_frame,
    };
}

static int sn_validate(const void *p, char *err, size_t len)
{
    const struct sn_config *c = p;
    int n = !!c->ca_file + !!c->cert_file + !!c->key_file;
    if (n != 0 && n != 3) {
        snprintf(err, len,
                 "keys \"ca_file\", \"cert_file\" and \"key_file\" go together: "
                 "set all three or none");
        return -1;
    }
    return 0;
}

static const struct cfg_field sn_fields[] = {
    DAEMON_BASE_FIELDS(struct sn_config),
    {"overlay", CFG_STR, offsetof(struct sn_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name, carried in every message"},
    {"listen", CFG_HOSTPORT, offsetof(struct sn_config, listen), 0, 0, NULL, "0.0.0.0:7000",
     "address and port for node-to-node TLS"},
    {"state_dir", CFG_PATH, offsetof(struct sn_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/supernode", "where credentials and state are kept"},
    {"ca_file", CFG_PATH, offsetof(struct sn_config, ca_file), 0, 0, NULL, NULL,
     "overlay CA certificate (PEM)"},
    {"cert_file", CFG_PATH, offsetof(struct sn_config, cert_file), 0, 0, NULL, NULL,
     "this node's certificate (PEM)"},
    {"key_file", CFG_PATH, offsetof(struct sn_config, key_file), 0, 0, NULL, NULL,
     "this node's private key (PKCS#8 PEM)"},
    {"max_connections", CFG_INT, offsetof(struct sn_config, max_connections), 1, 1000000, NULL,
     "4096", "most simultaneous node-to-node connections"},
    {"handshake_timeout_ms", CFG_INT, offsetof(struct sn_config, handshake_timeout_ms), 100, 600000,
     NULL, "10000", "time allowed for connect + TLS handshake + hello"},
    {"idle_timeout_ms", CFG_INT, offsetof(struct sn_config, idle_timeout_ms), 0, 86400000, NULL,
     "120000", "close a link after this long without traffic (0 = never)"},
    {"cert_renew_margin_s", CFG_INT, offsetof(struct sn_config, cert_renew_margin_s), 0, 315360000,
     NULL, "0", "renew the certificate once less than this remains (0 = a third of its validity)"},
    {"cert_check_interval_s", CFG_INT, offsetof(struct sn_config, cert_check_interval_s), 1, 86400,
     NULL, "3600", "how often the certificate's expiry is checked"},
    {"max_frame", CFG_INT, offsetof(struct sn_config, max_frame), 1024, MSG_MAX_FRAME_LIMIT, NULL,
     "65536", "largest accepted message, in bytes"},
};

static const struct cfg_schema sn_schema = {sn_fields, sizeof(sn_fields) / sizeof(sn_fields[0]),
                                            sn_validate};

static const struct cli_command sn_commands[] = {
    {"run", "run the super node", NULL},
    {"enroll", "get this node's certificate from the login server (once)", enroll_options},
    {"renew", "renew this node's certificate (same Node-ID, new key)", renew_options},
    {"ping",
     "ping ADDR: connect to the node at host:port with this node's credentials, "
     "print its verified identity and the round-trip time",
     NULL},
    {NULL, NULL, NULL},
};

static const struct cli_prog sn_prog = {
    .name = "supernode",
    .summary = "Super node of the p2psip overlay: a member of the DHT that stores and routes "
               "records.",
    .commands = sn_commands,
    .schema = &sn_schema,
    .epilog = "Examples:\n  supernode -d -c /etc/p2psip/supernode.json\n"
              "  supernode -c /etc/p2psip/supernode.json ping 192.0.2.7:7000\n",
};

struct sn_link {
    struct sn_link *next, *prev;
    struct conn *conn;
};

struct sn_state {
    const struct sn_config *cfg;
    struct tls_ctx *tls;
    struct listener *listener;
    struct sn_link links; /* list head */
    size_t n_links;
    struct renewer *renewer;
};

/* The transport has logged who the peer is; here only admission is decided. */
static void on_open(struct conn *c, void *ud)
{
    struct sn_state *st = ud;
    if (st->n_links > (size_t)st->cfg->max_connections)
        conn_close_with_error(c, NULL, "overloaded", "too many connections");
}

static void on_message(struct conn *c, const struct msg *m, void *ud)
{
    struct sn_state *st = ud;
    if (m->kind == MSG_REQ && strcmp(m->type, "ping") == 0) {
        const struct peer_identity *self = tls_ctx_identity(st->tls);
        char hex[NID_HEX_LEN + 1] = "";
        if (self->has_node_id)
            nid_to_hex(&self->node_id, hex);
        json_t *body = json_pack("{s:s}", "node_id", hex);
        if (conn_send(c, "ping", MSG_RES, m->tid, body) != 0)
            log_warn("link", "%s: cannot answer ping", conn_peer_addr(c));
        json_decref(body);
        return;
    }
    if (m->kind == MSG_REQ) {
        /* Tell the peer plainly rather than leave its request hanging. */
        uint8_t *frame;
        size_t len;
        if (msg_encode_error(st->cfg->overlay, m->tid, "unknown-type", "request type not served",
                             (size_t)st->cfg->max_frame, &frame, &len) == MSG_OK) {
            conn_send_frame(c, frame, len);
            free(frame);
        }
    }
}

static void on_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct sn_state *st = ud;
    struct sn_link *l;
    for (l = st->links.next; l != &st->links; l = l->next)
        if (l->conn == c)
            break;
    if (l != &st->links) {
        l->prev->next = l->next;
        l->next->prev = l->prev;
        st->n_links--;
        free(l);
    }
}

static void on_accept_open(struct conn *c, void *ud)
{
    struct sn_state *st = ud;
    struct sn_link *l = calloc(1, sizeof(*l));
    if (!l) {
        conn_close(c);
        return;
    }
    l->conn = c;
    l->next = st->links.next;
    l->prev = &st->links;
    st->links.next->prev = l;
    st->links.next = l;
    st->n_links++;
    on_open(c, ud);
}

static const struct conn_cbs sn_cbs = {
    .on_open = on_accept_open,
    .on_message = on_message,
    .on_close = on_close,
};

static void sn_renewed(void *ud)
{
    /* Links already open keep their session; the listener reads credentials at start. */
    log_info("main", "the renewed certificate is used for links after the next restart");
}

static int sn_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct sn_config *cfg = p;
    struct sn_state *st = calloc(1, sizeof(*st));
    if (!st)
        return -1;
    st->cfg = cfg;
    st->links.next = st->links.prev = &st->links;
    *state = st;
    struct renewer_config rc = {
        .state_dir = cfg->state_dir,
        .margin_s = (double)cfg->cert_renew_margin_s,
        .check_interval_s = (double)cfg->cert_check_interval_s,
        .on_renewed = sn_renewed,
        .ud = st,
    };
    st->renewer = renewer_start(loop, &rc); /* NULL until enrolled into state_dir */
    if (!cfg->cert_file) {
        log_warn("main", "no credentials configured (ca_file, cert_file, key_file): "
                         "not listening for peers");
        return 0;
    }
    char err[256];
    struct tls_config tc = sn_tls_config(cfg);
    st->tls = tls_ctx_new(&tc, err, sizeof(err));
    if (!st->tls) {
        log_error("main", "%s", err);
        return -1;
    }
    st->listener = conn_listen(loop, st->tls, cfg->listen, &sn_cbs, st, err, sizeof(err));
    if (!st->listener) {
        log_error("main", "%s", err);
        return -1;
    }
    const struct peer_identity *self = tls_ctx_identity(st->tls);
    char hex[NID_HEX_LEN + 1] = "-";
    if (self->has_node_id)
        nid_to_hex(&self->node_id, hex);
    log_info("main", "overlay %s: listening on %s as node %s", cfg->overlay, cfg->listen, hex);
    return 0;
}

static void sn_stop(struct ev_loop *loop, void *p)
{
    struct sn_state *st = p;
    renewer_stop(st->renewer);
    st->renewer = NULL;
    listener_free(st->listener);
    st->listener = NULL;
    /* conn_close may call on_close (which unlinks) right away: walk from a saved next. */
    for (struct sn_link *l = st->links.next, *next; l != &st->links; l = next) {
        next = l->next;
        conn_close(l->conn);
    }
}

static void sn_cleanup(void *p)
{
    struct sn_state *st = p;
    if (!st)
        return;
    renewer_stop(st->renewer);
    listener_free(st->listener);
    while (st->links.next != &st->links) {
        struct sn_link *l = st->links.next;
        st->links.next = l->next;
        free(l);
    }
    tls_ctx_free(st->tls);
    free(st);
}

/* ---- "supernode ping ADDR": a one-shot client on its own loop ---- */

struct ping_state {
    const char *target;
    char tid[MSG_TID_LEN + 1];
    ev_tstamp sent_at;
    int status; /* exit status once known */
    bool done;
    ev_timer guard;
};

static void ping_open(struct conn *c, void *ud)
{
    struct ping_state *ps = ud;
    char who[512];
    printf("connected to %s: %s\n", ps->target, cred_identity_str(conn_peer(c), who, sizeof(who)));
    msg_new_tid(ps->tid);
    ps->sent_at = ev_time();
    if (conn_send(c, "ping", MSG_REQ, ps->tid, NULL) != 0) {
        fprintf(stderr, "supernode: ping %s: cannot send\n", ps->target);
        ps->status = 1;
        conn_close(c);
    }
}

static void ping_message(struct conn *c, const struct msg *m, void *ud)
{
    struct ping_state *ps = ud;
    if (strcmp(m->tid, ps->tid) != 0)
        return;
    if (m->kind == MSG_RES) {
        const char *nid = json_string_value(json_object_get(m->body, "node_id"));
        printf("reply from %s: node %s, time %.2f ms\n", ps->target, nid ? nid : "?",
               (ev_time() - ps->sent_at) * 1000.0);
        ps->status = 0;
    } else {
        const char *code = json_string_value(json_object_get(m->body, "code"));
        fprintf(stderr, "supernode: ping %s: refused: %s\n", ps->target, code ? code : "error");
        ps->status = 1;
    }
    conn_close(c);
}

static void ping_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct ping_state *ps = ud;
    if (r != CONN_CLOSED_LOCAL || ps->status < 0) {
        /* The detail says it all when there is one ("peer refused our certificate: ..."). */
        fprintf(stderr, "supernode: ping %s: %s\n", ps->target,
                detail && *detail ? detail : conn_close_reason_str(r));
        ps->status = 1;
    }
    ps->done = true;
}

static void ping_guard(struct ev_loop *loop, ev_timer *w, int revents)
{
    ev_break(loop, EVBREAK_ALL);
}

static int sn_ping(const struct cli_opts *o, const struct sn_config *cfg)
{
    if (o->argc != 1 || cfg_parse_hostport(o->argv[0], NULL, 0, NULL) != 0) {
        cli_error(&sn_prog, "ping needs one numeric address like 192.0.2.7:7000");
        return 2;
    }
    if (!cfg->cert_file) {
        cli_error(&sn_prog, "ping needs credentials: set ca_file, cert_file and key_file");
        return 2;
    }
    if (!o->verbose) /* the outcome is printed; the transport's own lines would repeat it */
        log_set_level(LL_ERROR);
    char err[256];
    struct tls_config tc = sn_tls_config(cfg);
    struct tls_ctx *tls = tls_ctx_new(&tc, err, sizeof(err));
    if (!tls) {
        fprintf(stderr, "supernode: %s\n", err);
        return 1;
    }
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct ping_state ps = {.target = o->argv[0], .status = -1};
    static const struct conn_cbs cbs = {
        .on_open = ping_open, .on_message = ping_message, .on_close = ping_close};
    struct conn *c = conn_connect(loop, tls, ps.target, &cbs, &ps, err, sizeof(err));
    if (!c) {
        fprintf(stderr, "supernode: ping %s: %s\n", ps.target, err);
        ps.status = 1;
    } else {
        /* The transport's own timeouts end the attempt; this only guards against a bug. */
        ev_timer_init(&ps.guard, ping_guard, (double)cfg->handshake_timeout_ms / 1000.0 + 5.0, 0.);
        ev_timer_start(loop, &ps.guard);
        ev_unref(loop);
        ev_run(loop, 0);
        ev_ref(loop);
        ev_timer_stop(loop, &ps.guard);
        if (!ps.done) {
            fprintf(stderr, "supernode: ping %s: no answer\n", ps.target);
            ps.status = 1;
        }
    }
    ev_loop_destroy(loop);
    tls_ctx_free(tls);
    return ps.status == 0 ? 0 : 1;
}

static int sn_command(const struct cli_opts *o, void *cfg)
{
    const struct sn_config *c = cfg;
    if (strcmp(o->command, "ping") == 0)
        return sn_ping(o, cfg);
    if (strcmp(o->command, "enroll") == 0)
        return enroll_command(&sn_prog, o, c->state_dir);
    if (strcmp(o->command, "renew") == 0)
        return renew_command(&sn_prog, o, c->state_dir);
    return 2;
}

static const struct daemon_spec sn_spec = {
    .prog = &sn_prog,
    .schema = &sn_schema,
    .cfg_size = sizeof(struct sn_config),
    .command = sn_command,
    .start = sn_start,
    .stop = sn_stop,
    .cleanup = sn_cleanup,
};

int main(int argc, char **argv)
{
    return daemon_main(&sn_spec, argc, argv);
}
