/*
 * Transport tests over real TLS on 127.0.0.1 and [::1], with certificates
 * from a throw-away CA (testca.c): mutual authentication, every way a
 * certificate can be refused (and that both sides say why), back-pressure
 * against a peer that stops reading, malformed frames, timeouts, clean
 * closes, and the listener's bounds (handshakes in total and per source
 * address, links per certificate identity). Each test runs its own libev loop, bounded by a safety
 * timer, so a bug shows as a failure rather than a hang.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define UNDER_VALGRIND() RUNNING_ON_VALGRIND
#endif
#endif
#ifndef UNDER_VALGRIND
#define UNDER_VALGRIND() 0
#endif

#include <gnutls/dtls.h>

#include "conn.h"
#include "log.h"
#include "msg.h"
#include "testca.h"

#define OVERLAY "test.example"
#define SAFETY  10.0 /* seconds: no test may run longer */

struct fixture {
    struct testca ca, other;
    struct testca_cert srv, cli, alien_cli, alien_srv, expired, noclient, noserver, noroles;
};

struct env;

struct side {
    struct env *env;
    struct conn *c;
    int opens, closes, msgs, drains;
    enum conn_close_reason reason;
    char detail[256];
    struct peer_identity peer;
    ev_tstamp open_at, close_at;
    void (*open_hook)(struct side *s);
    void (*msg_hook)(struct side *s, const struct msg *m);
    void (*drain_hook)(struct side *s);
    int next_seq; /* in-order delivery check */
    bool out_of_order;
    int errs; /* err messages received */
    char err_code[64];
};

struct env {
    struct fixture *fx;
    struct ev_loop *loop;
    struct tls_ctx *sctx, *cctx;
    struct listener *l;
    struct side srv, cli;
    ev_timer safety;
    bool timed_out;
    char addr[64];
    /* back-pressure test */
    ev_timer pump, stop_pump;
    bool pumping;
    int queue_full;
    size_t max_seen, accepted, queued_at_stop;
};

/* ---- Harness ------------------------------------------------------------------------------ */

static void cb_open(struct conn *c, void *ud)
{
    struct side *s = ud;
    s->c = c;
    s->opens++;
    s->open_at = ev_now(s->env->loop);
    const struct peer_identity *p = conn_peer(c);
    assert_non_null(p);
    s->peer = *p;
    if (s->open_hook)
        s->open_hook(s);
}

static void cb_message(struct conn *c, const struct msg *m, void *ud)
{
    struct side *s = ud;
    s->msgs++;
    if (m->kind == MSG_ERR) {
        s->errs++;
        const char *code = json_string_value(json_object_get(m->body, "code"));
        snprintf(s->err_code, sizeof(s->err_code), "%s", code ? code : "");
    }
    json_t *seq = json_object_get(m->body, "seq");
    if (seq) {
        if (json_integer_value(seq) != s->next_seq)
            s->out_of_order = true;
        s->next_seq++;
    }
    if (s->msg_hook)
        s->msg_hook(s, m);
}

static void cb_drain(struct conn *c, void *ud)
{
    struct side *s = ud;
    s->drains++;
    if (s->drain_hook)
        s->drain_hook(s);
}

static void cb_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct side *s = ud;
    s->closes++;
    s->reason = r;
    snprintf(s->detail, sizeof(s->detail), "%s", detail ? detail : "");
    s->close_at = ev_now(s->env->loop);
    s->c = NULL;
    /* Closing again from on_close must be harmless. */
    conn_close(c);
    assert_int_equal(conn_send(c, "late", MSG_IND, NULL, NULL), CONN_ERR_NOT_OPEN);
}

static const struct conn_cbs cbs = {cb_open, cb_message, cb_drain, cb_close};

static void on_safety(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct env *e = w->data;
    e->timed_out = true;
}

static bool both_closed(struct env *e)
{
    return e->srv.closes && e->cli.closes;
}

static bool both_open(struct env *e)
{
    return e->srv.opens && e->cli.opens;
}

/* Runs the loop until pred holds or the safety timer fires. */
static void run_until(struct env *e, bool (*pred)(struct env *), double limit)
{
    ev_timer_init(&e->safety, on_safety, limit, 0.);
    e->safety.data = e;
    e->timed_out = false;
    ev_timer_start(e->loop, &e->safety);
    while (!pred(e) && !e->timed_out)
        ev_run(e->loop, EVRUN_ONCE);
    ev_timer_stop(e->loop, &e->safety);
    assert_false(e->timed_out);
}

static struct tls_ctx *make_ctx(const char *ca_file, const struct testca_cert *cert, unsigned hs_ms,
                                unsigned idle_ms, size_t max_wqueue)
{
    struct tls_config cfg = {
        .ca_file = ca_file,
        .cert_file = cert->cert_file,
        .key_file = cert->key_file,
        .overlay = OVERLAY,
        .handshake_timeout_ms = hs_ms,
        .idle_timeout_ms = idle_ms,
        .max_wqueue = max_wqueue,
    };
    char err[256] = "";
    struct tls_ctx *ctx = tls_ctx_new(&cfg, err, sizeof(err));
    if (!ctx)
        print_error("tls_ctx_new: %s\n", err);
    assert_non_null(ctx);
    return ctx;
}

static void env_init(struct env *e, struct fixture *fx)
{
    memset(e, 0, sizeof(*e));
    e->fx = fx;
    e->loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(e->loop);
    e->srv.env = e->cli.env = e;
}

/* Listens on host ("127.0.0.1" or "[::1]") with sctx and connects with cctx. */
static void env_start(struct env *e, const char *host)
{
    char err[256] = "", hp[80];
    snprintf(hp, sizeof(hp), "%s:0", host);
    e->l = conn_listen(e->loop, e->sctx, hp, &cbs, &e->srv, err, sizeof(err));
    if (!e->l)
        print_error("conn_listen: %s\n", err);
    assert_non_null(e->l);
    assert_true(listener_port(e->l) > 0);
    snprintf(e->addr, sizeof(e->addr), "%s:%d", host, listener_port(e->l));
    e->cli.c = conn_connect(e->loop, e->cctx, e->addr, &cbs, &e->cli, err, sizeof(err));
    if (!e->cli.c)
        print_error("conn_connect: %s\n", err);
    assert_non_null(e->cli.c);
    assert_true(conn_is_outgoing(e->cli.c));
    assert_string_equal(conn_peer_addr(e->cli.c), e->addr);
}

static void env_free(struct env *e)
{
    listener_free(e->l);
    tls_ctx_free(e->sctx);
    tls_ctx_free(e->cctx);
    ev_loop_destroy(e->loop);
}

static void pair(struct env *e, const char *host, const struct testca_cert *srv, const char *srv_ca,
                 const struct testca_cert *cli, const char *cli_ca)
{
    e->sctx = make_ctx(srv_ca, srv, 0, 0, 0); /* default handshake timeout: valgrind is slow */
    e->cctx = make_ctx(cli_ca, cli, 0, 0, 0);
    env_start(e, host);
}

/* ---- (1) Mutual authentication, a round trip, clean close ---------------------------------- */

static void srv_echo(struct side *s, const struct msg *m)
{
    if (m->kind == MSG_REQ)
        assert_int_equal(conn_send(s->c, m->type, MSG_RES, m->tid, m->body), 0);
}

static char ping_tid[MSG_TID_LEN + 1];

static void cli_ping(struct side *s)
{
    json_t *body = json_pack("{s:s}", "text", "héllo");
    msg_new_tid(ping_tid);
    assert_int_equal(conn_send(s->c, "ping", MSG_REQ, ping_tid, body), 0);
    json_decref(body);
}

static void cli_pong(struct side *s, const struct msg *m)
{
    assert_int_equal(m->kind, MSG_RES);
    assert_string_equal(m->type, "ping");
    assert_string_equal(m->tid, ping_tid);
    assert_string_equal(json_string_value(json_object_get(m->body, "text")), "héllo");
    conn_close(s->c);
    /* After conn_close nothing more may be sent, and on_close has not run yet. */
    assert_int_equal(s->closes, 0);
}

static void mutual_auth(struct fixture *fx, const char *host)
{
    struct env e;
    env_init(&e, fx);
    pair(&e, host, &fx->srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file);
    assert_int_equal(conn_get_state(e.cli.c), CONN_CONNECTING);
    assert_null(conn_peer(e.cli.c));
    assert_int_equal(conn_send(e.cli.c, "ping", MSG_REQ, NULL, NULL), CONN_ERR_NOT_OPEN);
    assert_string_equal(tls_ctx_identity(e.cctx)->uri, fx->cli.uri);

    e.srv.msg_hook = srv_echo;
    e.cli.open_hook = cli_ping;
    e.cli.msg_hook = cli_pong;
    run_until(&e, both_closed, SAFETY);
    if (e.srv.opens != 1 || e.cli.opens != 1) {
        print_error("server: %s: %s\n", conn_close_reason_str(e.srv.reason), e.srv.detail);
        print_error("client: %s: %s\n", conn_close_reason_str(e.cli.reason), e.cli.detail);
    }
    assert_int_equal(e.srv.opens, 1);
    assert_int_equal(e.cli.opens, 1);
    /* Each side sees the other's certificate identity. */
    assert_string_equal(e.srv.peer.uri, fx->cli.uri);
    assert_true(e.srv.peer.has_node_id);
    assert_memory_equal(e.srv.peer.node_id.b, fx->cli.node_id.b, NID_LEN);
    assert_int_equal(e.srv.peer.roles, fx->cli.roles);
    assert_string_equal(e.cli.peer.uri, fx->srv.uri);
    assert_memory_equal(e.cli.peer.node_id.b, fx->srv.node_id.b, NID_LEN);
    assert_int_equal(e.cli.peer.roles, ROLE_NODE | ROLE_SUPERNODE);
    /* The hello is not passed up: one message each way. */
    assert_int_equal(e.srv.msgs, 1);
    assert_int_equal(e.cli.msgs, 1);
    assert_int_equal(e.cli.closes, 1);
    assert_int_equal(e.srv.closes, 1);
    assert_int_equal(e.cli.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.srv.reason, CONN_CLOSED_REMOTE);
    env_free(&e);
}

static void test_mutual_auth_ipv4(void **state)
{
    mutual_auth(*state, "127.0.0.1");
}

/* ---- (1b) A link within the process (tls_config.local_links) -------------------------------- */

static void srv_echo_burst(struct side *s, const struct msg *m)
{
    if (m->kind == MSG_REQ)
        assert_int_equal(conn_send(s->c, m->type, MSG_RES, m->tid, m->body), 0);
}

static void cli_burst(struct side *s)
{
    /* 100 numbered indications, then the ping: all arrive, in order, before its answer. */
    for (int i = 0; i < 100; i++) {
        json_t *b = json_pack("{s:i}", "seq", i);
        assert_int_equal(conn_send(s->c, "note", MSG_IND, NULL, b), 0);
        json_decref(b);
    }
    cli_ping(s);
}

static void local_ctxs(struct env *e)
{
    struct fixture *fx = e->fx;
    e->sctx = make_ctx(fx->ca.ca_file, &fx->srv, 0, 0, 0);
    struct tls_config cfg = {.ca_file = fx->ca.ca_file,
                             .cert_file = fx->cli.cert_file,
                             .key_file = fx->cli.key_file,
                             .overlay = OVERLAY,
                             .local_links = true};
    char err[256] = "";
    e->cctx = tls_ctx_new(&cfg, err, sizeof(err));
    assert_non_null(e->cctx);
}

static void local_link(struct fixture *fx, const char *host)
{
    struct env e;
    env_init(&e, fx);
    local_ctxs(&e);
    env_start(&e, host);
    /* Not open before the loop runs, as a socket would not be. */
    assert_null(conn_peer(e.cli.c));
    assert_int_equal(conn_send(e.cli.c, "ping", MSG_REQ, NULL, NULL), CONN_ERR_NOT_OPEN);

    e.srv.msg_hook = srv_echo_burst;
    e.cli.open_hook = cli_burst;
    e.cli.msg_hook = cli_pong;
    run_until(&e, both_closed, SAFETY);
    assert_int_equal(e.srv.opens, 1);
    assert_int_equal(e.cli.opens, 1);
    assert_string_equal(e.srv.peer.uri, fx->cli.uri);
    assert_memory_equal(e.srv.peer.node_id.b, fx->cli.node_id.b, NID_LEN);
    assert_int_equal(e.srv.peer.roles, fx->cli.roles);
    assert_string_equal(e.cli.peer.uri, fx->srv.uri);
    assert_int_equal(e.srv.msgs, 101);
    assert_false(e.srv.out_of_order);
    assert_int_equal(e.srv.next_seq, 100);
    assert_int_equal(e.cli.msgs, 1);
    assert_int_equal(e.cli.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.srv.reason, CONN_CLOSED_REMOTE);
    env_free(&e);
}

static void test_local_link(void **state)
{
    local_link(*state, "127.0.0.1");
}

static void srv_refuse_open(struct side *s)
{
    conn_close_with_error(s->c, NULL, "go-away", "not today");
}

/* The listener's end closes with an error at once: the client opens, gets it, and is closed. */
static void test_local_link_error(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    local_ctxs(&e);
    e.srv.open_hook = srv_refuse_open;
    env_start(&e, "[::1]");
    run_until(&e, both_closed, SAFETY);
    assert_int_equal(e.srv.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.cli.reason, CONN_ERR_PEER_ERROR);
    assert_non_null(strstr(e.cli.detail, "go-away: not today"));
    env_free(&e);
}

static void test_mutual_auth_ipv6(void **state)
{
    mutual_auth(*state, "[::1]");
}

/* ---- (2)-(4) Refused certificates ---------------------------------------------------------- */

static void expect_refused(struct fixture *fx, const struct testca_cert *srv, const char *srv_ca,
                           const struct testca_cert *cli, const char *cli_ca,
                           enum conn_close_reason srv_reason, const char *srv_text,
                           enum conn_close_reason cli_reason, const char *cli_text)
{
    struct env e;
    env_init(&e, fx);
    pair(&e, "127.0.0.1", srv, srv_ca, cli, cli_ca);
    run_until(&e, both_closed, SAFETY);
    print_message("    server: %s: %s\n", conn_close_reason_str(e.srv.reason), e.srv.detail);
    print_message("    client: %s: %s\n", conn_close_reason_str(e.cli.reason), e.cli.detail);
    assert_int_equal(e.srv.opens, 0);
    assert_int_equal(e.cli.opens, 0);
    assert_int_equal(e.srv.reason, srv_reason);
    assert_int_equal(e.cli.reason, cli_reason);
    assert_non_null(strstr(e.srv.detail, srv_text));
    assert_non_null(strstr(e.cli.detail, cli_text));
    env_free(&e);
}

static void test_client_cert_other_ca(void **state)
{
    struct fixture *fx = *state;
    /*
     * Depending on whether GnuTLS finds the server's CA list a reason to send
     * nothing, the server sees no certificate or one from an unknown CA;
     * either way it is refused by name.
     */
    expect_refused(fx, &fx->srv, fx->ca.ca_file, &fx->alien_cli, fx->ca.ca_file, CONN_ERR_PEER_CERT,
                   "peer certificate refused: ", CONN_ERR_REJECTED, "peer refused our certificate");
}

static void test_server_cert_other_ca(void **state)
{
    struct fixture *fx = *state;
    expect_refused(fx, &fx->alien_srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file, CONN_ERR_REJECTED,
                   "peer refused our certificate", CONN_ERR_PEER_CERT,
                   "not issued by the overlay CA");
}

static void test_client_cert_expired(void **state)
{
    struct fixture *fx = *state;
    expect_refused(fx, &fx->srv, fx->ca.ca_file, &fx->expired, fx->ca.ca_file, CONN_ERR_PEER_CERT,
                   "peer certificate refused: expired", CONN_ERR_REJECTED,
                   "peer refused our certificate");
}

static void test_server_cert_expired(void **state)
{
    struct fixture *fx = *state;
    expect_refused(fx, &fx->expired, fx->ca.ca_file, &fx->cli, fx->ca.ca_file, CONN_ERR_REJECTED,
                   "peer refused our certificate", CONN_ERR_PEER_CERT,
                   "peer certificate refused: expired");
}

static void test_client_cert_no_client_auth(void **state)
{
    struct fixture *fx = *state;
    expect_refused(fx, &fx->srv, fx->ca.ca_file, &fx->noclient, fx->ca.ca_file, CONN_ERR_PEER_CERT,
                   "key purpose clientAuth missing", CONN_ERR_REJECTED,
                   "peer refused our certificate");
}

static void test_server_cert_no_server_auth(void **state)
{
    struct fixture *fx = *state;
    expect_refused(fx, &fx->noserver, fx->ca.ca_file, &fx->cli, fx->ca.ca_file, CONN_ERR_REJECTED,
                   "peer refused our certificate", CONN_ERR_PEER_CERT,
                   "key purpose serverAuth missing");
}

/* Roles are the callers' policy: a certificate without them still connects. */
static void test_cert_without_roles_connects(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    pair(&e, "127.0.0.1", &fx->srv, fx->ca.ca_file, &fx->noroles, fx->ca.ca_file);
    run_until(&e, both_open, SAFETY);
    assert_int_equal(e.srv.peer.roles, 0);
    assert_false(e.srv.peer.has_node_id);
    assert_string_equal(e.srv.peer.uri, fx->noroles.uri);
    conn_close(e.srv.c);
    run_until(&e, both_closed, SAFETY);
    assert_int_equal(e.srv.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.cli.reason, CONN_CLOSED_REMOTE);
    env_free(&e);
}

/* ---- (5) Back-pressure against a peer that never reads ------------------------------------ */

/* A TLS client on its own thread: handshake, hello, then it never reads again. */
struct raw_client {
    pthread_t thread;
    int port;
    const struct fixture *fx;
    int stop_pipe[2];
    int result;             /* 0 when the handshake and first frame went out */
    const char *first_type; /* type of the first frame sent: "hello" normally */
    bool read_all;          /* read everything until the server closes, then stop */
    char received[4096];    /* what came back, when read_all */
    size_t received_len;
};

static void *raw_client_main(void *arg)
{
    struct raw_client *rc = arg;
    gnutls_certificate_credentials_t xcred = NULL;
    gnutls_session_t s = NULL;
    int fd = -1, r;
    rc->result = -1;

    fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)rc->port)};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
        goto out;
    struct timeval tv = {.tv_sec = (time_t)SAFETY}; /* never block past the test's bound */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (gnutls_certificate_allocate_credentials(&xcred) < 0 ||
        gnutls_certificate_set_x509_trust_file(xcred, rc->fx->ca.ca_file, GNUTLS_X509_FMT_PEM) <
            0 ||
        gnutls_certificate_set_x509_key_file(xcred, rc->fx->cli.cert_file, rc->fx->cli.key_file,
                                             GNUTLS_X509_FMT_PEM) < 0)
        goto out;
    if (gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL) < 0 ||
        gnutls_priority_set_direct(s, "NORMAL:-VERS-ALL:+VERS-TLS1.3", NULL) < 0 ||
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, xcred) < 0)
        goto out;
    gnutls_transport_set_int(s, fd);
    do {
        r = gnutls_handshake(s);
    } while (r < 0 && !gnutls_error_is_fatal(r));
    if (r < 0)
        goto out;
    char tid[MSG_TID_LEN + 1];
    msg_new_tid(tid);
    struct msg_hdr hdr = {.overlay = OVERLAY,
                          .type = rc->first_type ? rc->first_type : "hello",
                          .kind = MSG_IND,
                          .tid = tid};
    uint8_t *frame = NULL;
    size_t len = 0;
    if (msg_encode(&hdr, NULL, MSG_MAX_FRAME_DEF, &frame, &len) != MSG_OK)
        goto out;
    r = (int)gnutls_record_send(s, frame, len);
    free(frame);
    if (r != (int)len)
        goto out;
    rc->result = 0;
    while (rc->read_all && rc->received_len < sizeof(rc->received)) {
        ssize_t n = gnutls_record_recv(s, rc->received + rc->received_len,
                                       sizeof(rc->received) - rc->received_len);
        if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
            continue;
        if (n <= 0)
            goto out;
        rc->received_len += (size_t)n;
    }
    /* Now sit still: the server's frames pile up in our socket buffer. */
    struct pollfd pfd = {.fd = rc->stop_pipe[0], .events = POLLIN};
    poll(&pfd, 1, 20000);
out:
    if (s)
        gnutls_deinit(s);
    if (xcred)
        gnutls_certificate_free_credentials(xcred);
    if (fd >= 0)
        close(fd);
    return NULL;
}

#define BP_WQUEUE (256 * 1024)

static json_t *big_body(void)
{
    static char text[16001];
    memset(text, 'x', sizeof(text) - 1);
    return json_pack("{s:s}", "data", text);
}

static void pump_once(struct env *e)
{
    if (!e->pumping || !e->srv.c)
        return;
    json_t *body = big_body();
    for (;;) {
        int r = conn_send(e->srv.c, "bulk", MSG_IND, NULL, body);
        size_t q = conn_queued_bytes(e->srv.c);
        if (q > e->max_seen)
            e->max_seen = q;
        assert_true(q <= BP_WQUEUE);
        if (r == CONN_ERR_QUEUE_FULL) {
            e->queue_full++;
            break;
        }
        assert_int_equal(r, 0);
        e->accepted += 16000;
    }
    json_decref(body);
}

static void on_pump(struct ev_loop *loop, ev_timer *w, int revents)
{
    pump_once(w->data);
}

static void bp_drain(struct side *s)
{
    pump_once(s->env);
}

static void on_stop_pump(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct env *e = w->data;
    e->pumping = false;
    ev_timer_stop(loop, &e->pump);
    e->queued_at_stop = conn_queued_bytes(e->srv.c);
    conn_close(e->srv.c); /* cannot flush: bounded by the handshake timeout */
}

static void bp_open(struct side *s)
{
    struct env *e = s->env;
    e->pumping = true;
    ev_timer_init(&e->pump, on_pump, 0., 0.005);
    ev_timer_init(&e->stop_pump, on_stop_pump, 1.5, 0.);
    e->pump.data = e->stop_pump.data = e;
    ev_timer_start(e->loop, &e->pump);
    ev_timer_start(e->loop, &e->stop_pump);
}

static bool srv_closed(struct env *e)
{
    return e->srv.closes > 0;
}

static void test_backpressure_peer_not_reading(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    /* The handshake timeout also bounds the close that cannot flush. */
    e.sctx = make_ctx(fx->ca.ca_file, &fx->srv, 3000, 0, BP_WQUEUE);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &cbs, &e.srv, err, sizeof(err));
    assert_non_null(e.l);
    e.srv.open_hook = bp_open;
    e.srv.drain_hook = bp_drain;

    struct raw_client rc = {.port = listener_port(e.l), .fx = fx};
    assert_int_equal(pipe(rc.stop_pipe), 0);
    assert_int_equal(pthread_create(&rc.thread, NULL, raw_client_main, &rc), 0);

    run_until(&e, srv_closed, SAFETY);
    assert_int_equal(write(rc.stop_pipe[1], "x", 1), 1);
    pthread_join(rc.thread, NULL);
    close(rc.stop_pipe[0]);
    close(rc.stop_pipe[1]);
    ev_timer_stop(e.loop, &e.pump);
    ev_timer_stop(e.loop, &e.stop_pump);

    print_message("    accepted %zu bytes, queue max %zu, at stop %zu, refusals %d, drains %d\n",
                  e.accepted, e.max_seen, e.queued_at_stop, e.queue_full, e.srv.drains);
    assert_int_equal(rc.result, 0);
    assert_int_equal(e.srv.opens, 1);
    assert_true(e.queue_full > 0);
    assert_true(e.max_seen <= BP_WQUEUE);
    /* The peer reads nothing, so the queue must be stuck near full, not drained. */
    assert_true(e.queued_at_stop > BP_WQUEUE / 2);
    /* Kernel buffers absorb some megabytes at most; memory did not grow with the sending. */
    assert_true(e.accepted < 64u * 1024 * 1024);
    assert_int_equal(e.srv.reason, CONN_CLOSED_LOCAL);
    env_free(&e);
}

/* ---- (6) Malformed frames ----------------------------------------------------------------- */

static const uint8_t *bad_frame;
static size_t bad_len;

static void send_bad(struct side *s)
{
    assert_int_equal(conn_send_frame(s->c, bad_frame, bad_len), 0);
}

static void malformed(struct fixture *fx, const uint8_t *frame, size_t len, int status)
{
    struct env e;
    env_init(&e, fx);
    pair(&e, "127.0.0.1", &fx->srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file);
    bad_frame = frame;
    bad_len = len;
    e.cli.open_hook = send_bad;
    run_until(&e, both_closed, SAFETY);
    print_message("    server: %s: %s\n", conn_close_reason_str(e.srv.reason), e.srv.detail);
    print_message("    client: %s: %s\n", conn_close_reason_str(e.cli.reason), e.cli.detail);
    const char *code = msg_status_code(status);
    assert_int_equal(e.srv.reason, CONN_ERR_PROTOCOL);
    assert_non_null(strstr(e.srv.detail, code));
    assert_int_equal(e.cli.reason, CONN_ERR_PEER_ERROR);
    assert_int_equal(strncmp(e.cli.detail, code, strlen(code)), 0);
    assert_int_equal(e.srv.msgs, 0);
    assert_int_equal(e.cli.msgs, 0); /* the complaint is reported via on_close */
    env_free(&e);
}

static void test_frame_oversize(void **state)
{
    const uint8_t frame[] = {0x00, 0x10, 0x00, 0x00, '{', '}'}; /* declares 1 MiB */
    malformed(*state, frame, sizeof(frame), MSG_E_OVERSIZE);
}

static void test_frame_invalid_json(void **state)
{
    const uint8_t frame[] = {0, 0, 0, 9, '{', 'n', 'o', 't', ' ', 'j', 's', 'o', 'n'};
    malformed(*state, frame, sizeof(frame), MSG_E_JSON);
}

static void test_frame_wrong_overlay(void **state)
{
    char tid[MSG_TID_LEN + 1];
    msg_new_tid(tid);
    struct msg_hdr hdr = {
        .overlay = "elsewhere.example", .type = "ping", .kind = MSG_REQ, .tid = tid};
    uint8_t *frame = NULL;
    size_t len = 0;
    assert_int_equal(msg_encode(&hdr, NULL, MSG_MAX_FRAME_DEF, &frame, &len), MSG_OK);
    malformed(*state, frame, len, MSG_E_OVERLAY);
    free(frame);
}

/* The first frame must be a hello: anything else is answered with an error and a close. */
static void test_first_frame_not_hello(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    e.sctx = make_ctx(fx->ca.ca_file, &fx->srv, 0, 0, 0);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &cbs, &e.srv, err, sizeof(err));
    assert_non_null(e.l);
    struct raw_client rc = {
        .port = listener_port(e.l), .fx = fx, .first_type = "ping", .read_all = true};
    assert_int_equal(pipe(rc.stop_pipe), 0);
    assert_int_equal(pthread_create(&rc.thread, NULL, raw_client_main, &rc), 0);
    run_until(&e, srv_closed, SAFETY);
    pthread_join(rc.thread, NULL); /* it stops when the server has closed */
    close(rc.stop_pipe[0]);
    close(rc.stop_pipe[1]);
    print_message("    server: %s: %s\n", conn_close_reason_str(e.srv.reason), e.srv.detail);
    assert_int_equal(rc.result, 0);
    assert_int_equal(e.srv.opens, 0);
    assert_int_equal(e.srv.reason, CONN_ERR_PROTOCOL);
    assert_non_null(strstr(e.srv.detail, "expected a hello"));
    /* The client got the server's hello, then the error, then close_notify. */
    assert_non_null(memmem(rc.received, rc.received_len, "\"hello\"", 7));
    assert_non_null(memmem(rc.received, rc.received_len, "expected-hello", 14));
    env_free(&e);
}

/* ---- (7) Handshake timeout, connect failure ----------------------------------------------- */

static void test_handshake_timeout(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    e.sctx = make_ctx(fx->ca.ca_file, &fx->srv, 300, 0, 0);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &cbs, &e.srv, err, sizeof(err));
    assert_non_null(e.l);

    /* A plain TCP client that says nothing (the kernel completes the connect). */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_port = htons((uint16_t)listener_port(e.l))};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ev_tstamp start = ev_now(e.loop);

    run_until(&e, srv_closed, SAFETY);
    close(fd);
    print_message("    server: %s: %s\n", conn_close_reason_str(e.srv.reason), e.srv.detail);
    assert_int_equal(e.srv.reason, CONN_ERR_TIMEOUT);
    assert_int_equal(e.srv.opens, 0);
    assert_true(e.srv.close_at - start >= 0.25);
    assert_true(e.srv.close_at - start < 3.0);
    env_free(&e);
}

static bool cli_closed(struct env *e)
{
    return e->cli.closes > 0;
}

static void test_connect_refused(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    e.cctx = make_ctx(fx->ca.ca_file, &fx->cli, 0, 0, 0);

    /* A port nobody listens on: bind one, note it, close it. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
    close(fd);
    char addr[64], err[256];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(sin.sin_port));

    e.cli.c = conn_connect(e.loop, e.cctx, addr, &cbs, &e.cli, err, sizeof(err));
    assert_non_null(e.cli.c);
    assert_int_equal(e.cli.closes, 0); /* reported from the loop, not from conn_connect */
    run_until(&e, cli_closed, SAFETY);
    assert_int_equal(e.cli.reason, CONN_ERR_CONNECT);
    assert_non_null(strstr(e.cli.detail, "refused"));

    /* Bad addresses are refused up front with a reason. */
    assert_null(conn_connect(e.loop, e.cctx, "localhost:80", &cbs, &e.cli, err, sizeof(err)));
    assert_non_null(strstr(err, "numeric"));
    assert_null(conn_connect(e.loop, e.cctx, "127.0.0.1", &cbs, &e.cli, err, sizeof(err)));
    assert_null(conn_connect(e.loop, e.cctx, "[::1:80", &cbs, &e.cli, err, sizeof(err)));
    assert_null(conn_connect(e.loop, e.cctx, "127.0.0.1:99999", &cbs, &e.cli, err, sizeof(err)));
    env_free(&e);
}

/* ---- Out of file descriptors: the listener pauses, then serves again ---------------------- */

#define EMFILE_CLIENTS 3

static bool srv_all_closed(struct env *e)
{
    return e->srv.closes >= EMFILE_CLIENTS;
}

static void on_restore_limit(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct rlimit *saved = w->data;
    setrlimit(RLIMIT_NOFILE, saved);
}

static void test_accept_out_of_fds(void **state)
{
    struct fixture *fx = *state;
    /* valgrind closes a descriptor above its limit itself, so the connection is lost. */
    if (UNDER_VALGRIND())
        skip();
    struct env e;
    env_init(&e, fx);
    e.sctx = make_ctx(fx->ca.ca_file, &fx->srv, 300, 0, 0);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &cbs, &e.srv, err, sizeof(err));
    assert_non_null(e.l);

    int fds[EMFILE_CLIENTS];
    struct sockaddr_in sin = {.sin_family = AF_INET,
                              .sin_port = htons((uint16_t)listener_port(e.l))};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    for (int i = 0; i < EMFILE_CLIENTS; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        assert_int_equal(connect(fds[i], (struct sockaddr *)&sin, sizeof(sin)), 0);
    }
    /* No descriptor left below the limit: every accept() now fails with EMFILE. */
    struct rlimit saved, tight;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &saved), 0);
    int lowest = dup(0);
    assert_true(lowest >= 0);
    close(lowest);
    tight = saved;
    tight.rlim_cur = (rlim_t)lowest;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &tight), 0);
    ev_timer restore;
    ev_timer_init(&restore, on_restore_limit, 0.3, 0.);
    restore.data = &saved;
    ev_timer_start(e.loop, &restore);

    /* The connections wait in the backlog, are accepted once descriptors are back, and
     * (being plain TCP) time out in the handshake: the server kept serving. */
    run_until(&e, srv_all_closed, SAFETY);
    ev_timer_stop(e.loop, &restore);
    setrlimit(RLIMIT_NOFILE, &saved);
    for (int i = 0; i < EMFILE_CLIENTS; i++)
        close(fds[i]);
    assert_int_equal(e.srv.closes, EMFILE_CLIENTS);
    assert_int_equal(e.srv.reason, CONN_ERR_TIMEOUT);
    env_free(&e);
}

/* ---- Listener bounds (issue 15: fd exhaustion, links per certificate) --------------------- */

static int tcp_from(const char *src, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, src, &a.sin_addr);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
    return fd;
}

/* Whether the server closed a silent TCP connection (EOF), without waiting. */
static bool closed_by_server(int fd)
{
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
}

static void on_spin_done(struct ev_loop *loop, ev_timer *w, int revents)
{
    ev_break(loop, EVBREAK_ONE);
}

/* Runs the loop for `seconds`. */
static void spin(struct env *e, double seconds)
{
    ev_timer t;
    ev_timer_init(&t, on_spin_done, seconds, 0.);
    ev_timer_start(e->loop, &t);
    ev_run(e->loop, 0);
    ev_timer_stop(e->loop, &t);
}

static bool srv_closed_3(struct env *e)
{
    return e->srv.closes >= 3;
}

static struct tls_ctx *capped_ctx(const char *ca_file, const struct testca_cert *cert,
                                  unsigned hs_ms, unsigned total, unsigned per_src, unsigned per_id)
{
    struct tls_config cfg = {.ca_file = ca_file,
                             .cert_file = cert->cert_file,
                             .key_file = cert->key_file,
                             .overlay = OVERLAY,
                             .handshake_timeout_ms = hs_ms,
                             .max_handshaking = total,
                             .max_handshaking_per_addr = per_src,
                             .max_links_per_identity = per_id};
    char err[256] = "";
    struct tls_ctx *ctx = tls_ctx_new(&cfg, err, sizeof(err));
    assert_non_null(ctx);
    return ctx;
}

static void test_handshake_bounds(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    /* Two handshakes per source, three in all; silent ones time out after 1.5 s. */
    e.sctx = capped_ctx(fx->ca.ca_file, &fx->srv, 1500, 3, 2, 0);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &cbs, &e.srv, err, sizeof(err));
    assert_non_null(e.l);
    int port = listener_port(e.l);

    int a[3], b, c;
    for (int i = 0; i < 3; i++)
        a[i] = tcp_from("127.0.0.2", port);
    spin(&e, 0.2);
    /* The third from 127.0.0.2 is closed at once; the first two wait for their deadline. */
    assert_false(closed_by_server(a[0]));
    assert_false(closed_by_server(a[1]));
    assert_true(closed_by_server(a[2]));
    b = tcp_from("127.0.0.3", port); /* another source: room in the total */
    spin(&e, 0.2);
    assert_false(closed_by_server(b));
    c = tcp_from("127.0.0.4", port); /* the total is reached */
    spin(&e, 0.2);
    assert_true(closed_by_server(c));
    /* Refused connections never reach the user; the held ones end at their deadline. */
    assert_int_equal(e.srv.closes, 0);
    run_until(&e, srv_closed_3, SAFETY);
    spin(&e, 0.1);
    assert_int_equal(e.srv.closes, 3);
    assert_int_equal(e.srv.reason, CONN_ERR_TIMEOUT);
    assert_true(closed_by_server(a[0]) && closed_by_server(b));

    /* With the slots free again, an honest node from the same address as the flood connects. */
    e.cctx = make_ctx(fx->ca.ca_file, &fx->cli, 0, 0, 0);
    e.srv.closes = 0;
    e.cli.c = NULL;
    snprintf(e.addr, sizeof(e.addr), "127.0.0.1:%d", port);
    e.cli.c = conn_connect(e.loop, e.cctx, e.addr, &cbs, &e.cli, err, sizeof(err));
    assert_non_null(e.cli.c);
    run_until(&e, both_open, SAFETY);
    conn_close(e.cli.c);
    run_until(&e, both_closed, SAFETY);
    for (int i = 0; i < 3; i++)
        close(a[i]);
    close(b);
    close(c);
    env_free(&e);
}

#define ID_CAP 2

struct many {
    struct env *env;
    struct conn *c[ID_CAP + 2];
    int opens, closes, peer_errors, srv_opens, srv_closes;
    char detail[256];
};
static struct many many;

static void many_open(struct conn *c, void *ud)
{
    if (ud == &many.srv_opens)
        many.srv_opens++;
    else
        many.opens++;
}

static void many_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    if (ud == &many.srv_opens) {
        many.srv_closes++;
        return;
    }
    many.closes++;
    for (int i = 0; i < ID_CAP + 2; i++)
        if (many.c[i] == c)
            many.c[i] = NULL; /* freed after this returns */
    if (r == CONN_ERR_PEER_ERROR) {
        many.peer_errors++;
        snprintf(many.detail, sizeof(many.detail), "%s", detail);
    }
}

static const struct conn_cbs many_cbs = {.on_open = many_open, .on_close = many_close};

static bool many_settled(struct env *e)
{
    return many.opens == ID_CAP && many.peer_errors == 1;
}

static bool many_reopened(struct env *e)
{
    return many.opens == ID_CAP + 1;
}

static bool many_all_closed(struct env *e)
{
    return many.closes == ID_CAP + 2 && many.srv_closes == ID_CAP + 2;
}

static void test_links_per_identity(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    memset(&many, 0, sizeof(many));
    e.sctx = capped_ctx(fx->ca.ca_file, &fx->srv, 0, 0, 0, ID_CAP);
    e.cctx = make_ctx(fx->ca.ca_file, &fx->cli, 0, 0, 0);
    char err[256];
    e.l = conn_listen(e.loop, e.sctx, "127.0.0.1:0", &many_cbs, &many.srv_opens, err, sizeof(err));
    assert_non_null(e.l);
    snprintf(e.addr, sizeof(e.addr), "127.0.0.1:%d", listener_port(e.l));
    /* One certificate, one link more than allowed. */
    for (int i = 0; i < ID_CAP + 1; i++) {
        many.c[i] = conn_connect(e.loop, e.cctx, e.addr, &many_cbs, &many, err, sizeof(err));
        assert_non_null(many.c[i]);
    }
    run_until(&e, many_settled, SAFETY);
    print_message("    the extra link: %s\n", many.detail);
    assert_non_null(strstr(many.detail, "too-many-links"));
    assert_int_equal(many.srv_opens, ID_CAP); /* the refused one never opened on either side */
    /* The open ones still work; closing one makes room for another. */
    for (int i = 0; i < ID_CAP + 1; i++)
        if (many.c[i] && conn_get_state(many.c[i]) == CONN_OPEN) {
            conn_close(many.c[i]);
            break;
        }
    spin(&e, 0.3);
    many.c[ID_CAP + 1] = conn_connect(e.loop, e.cctx, e.addr, &many_cbs, &many, err, sizeof(err));
    run_until(&e, many_reopened, SAFETY);
    assert_int_equal(many.peer_errors, 1);
    for (int i = 0; i < ID_CAP + 2; i++)
        if (many.c[i])
            conn_close(many.c[i]);
    run_until(&e, many_all_closed, SAFETY);
    env_free(&e);
}

/* ---- (8) Idle timeout --------------------------------------------------------------------- */

static ev_timer keepalive;
static int keepalive_left;

static void on_keepalive(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct side *s = w->data;
    if (--keepalive_left <= 0 || !s->c) {
        ev_timer_stop(loop, w);
        return;
    }
    assert_int_equal(conn_send(s->c, "keepalive", MSG_IND, NULL, NULL), 0);
}

static void start_keepalive(struct side *s)
{
    keepalive_left = 6;
    /* Intervals well inside the idle limit, so that a loaded machine (valgrind, parallel
     * tests) cannot stretch a gap past it. */
    ev_timer_init(&keepalive, on_keepalive, 0.25, 0.25);
    keepalive.data = s;
    ev_timer_start(s->env->loop, &keepalive);
}

static void test_idle_timeout(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    e.sctx = make_ctx(fx->ca.ca_file, &fx->srv, 0, 1000, 0);
    e.cctx = make_ctx(fx->ca.ca_file, &fx->cli, 0, 0, 0);
    e.cli.open_hook = start_keepalive; /* traffic for ~1.25 s keeps the server from closing */
    env_start(&e, "127.0.0.1");
    run_until(&e, both_closed, SAFETY);
    ev_timer_stop(e.loop, &keepalive);
    print_message("    server: %s: %s after %.2f s\n", conn_close_reason_str(e.srv.reason),
                  e.srv.detail, e.srv.close_at - e.srv.open_at);
    assert_int_equal(e.srv.reason, CONN_ERR_IDLE);
    assert_int_equal(e.cli.reason, CONN_CLOSED_REMOTE);
    assert_int_equal(e.srv.msgs, 5);
    /* Five keepalives (1.25 s) and then a full idle period (1 s) before the close. */
    assert_true(e.srv.close_at - e.srv.open_at >= 2.2);
    assert_true(e.srv.close_at - e.srv.open_at < 6.0);
    env_free(&e);
}

/* ---- (9) Clean close delivers everything queued ------------------------------------------- */

#define BURST 300

static void cli_burst_then_close(struct side *s)
{
    json_t *body = json_object();
    char pad[1001];
    memset(pad, 'p', 1000);
    pad[1000] = '\0';
    json_object_set_new(body, "pad", json_string(pad));
    for (int i = 0; i < BURST; i++) {
        json_object_set_new(body, "seq", json_integer(i));
        assert_int_equal(conn_send(s->c, "data", MSG_IND, NULL, body), 0);
    }
    json_decref(body);
    assert_true(conn_queued_bytes(s->c) > BURST * 1000);
    conn_close(s->c);
    assert_int_equal(conn_get_state(s->c), CONN_CLOSING);
    assert_int_equal(conn_send(s->c, "data", MSG_IND, NULL, NULL), CONN_ERR_NOT_OPEN);
}

static void test_clean_close_delivers_all(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    pair(&e, "127.0.0.1", &fx->srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file);
    e.cli.open_hook = cli_burst_then_close;
    run_until(&e, both_closed, SAFETY);
    assert_int_equal(e.srv.msgs, BURST);
    assert_false(e.srv.out_of_order);
    assert_int_equal(e.srv.reason, CONN_CLOSED_REMOTE);
    assert_int_equal(e.cli.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.srv.closes, 1);
    assert_int_equal(e.cli.closes, 1);
    env_free(&e);
}

/* ---- Reentrancy and error replies --------------------------------------------------------- */

static void close_now(struct side *s)
{
    conn_close(s->c);
    conn_close(s->c); /* twice is harmless */
    assert_int_equal(s->closes, 0);
}

static void test_close_inside_on_open(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    pair(&e, "127.0.0.1", &fx->srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file);
    e.srv.open_hook = close_now;
    run_until(&e, both_closed, SAFETY);
    assert_int_equal(e.srv.closes, 1);
    assert_int_equal(e.cli.closes, 1);
    assert_int_equal(e.srv.reason, CONN_CLOSED_LOCAL);
    assert_int_equal(e.cli.reason, CONN_CLOSED_REMOTE);
    env_free(&e);
}

static void srv_refuse(struct side *s, const struct msg *m)
{
    conn_close_with_error(s->c, m->tid, "forbidden", "not on this node");
    assert_int_equal(conn_send(s->c, "x", MSG_IND, NULL, NULL), CONN_ERR_NOT_OPEN);
}

static void cli_send_req(struct side *s)
{
    assert_int_equal(conn_send(s->c, "store", MSG_REQ, NULL, NULL), 0);
}

static void test_close_with_error_reply(void **state)
{
    struct fixture *fx = *state;
    struct env e;
    env_init(&e, fx);
    pair(&e, "[::1]", &fx->srv, fx->ca.ca_file, &fx->cli, fx->ca.ca_file);
    e.cli.open_hook = cli_send_req;
    e.srv.msg_hook = srv_refuse;
    run_until(&e, both_closed, SAFETY);
    /* An error answering a real request is an ordinary message. */
    assert_int_equal(e.cli.errs, 1);
    assert_string_equal(e.cli.err_code, "forbidden");
    assert_int_equal(e.cli.reason, CONN_CLOSED_REMOTE);
    assert_int_equal(e.srv.reason, CONN_CLOSED_LOCAL);
    assert_non_null(strstr(e.srv.detail, "forbidden"));
    env_free(&e);
}

/* ---- Context errors ----------------------------------------------------------------------- */

/* ---- DTLS sessions for channels between nodes (tls_ctx_dtls_session) ------------------------ */

/* Datagrams between two sessions in memory: each side's queue holds what the other sent. */
struct dgq {
    uint8_t buf[16][2048];
    size_t len[16];
    int head, n;
    gnutls_session_t owner; /* reads from this queue */
};

static ssize_t dg_push(gnutls_transport_ptr_t p, const void *data, size_t len)
{
    struct dgq *to = p; /* the peer's queue */
    if (to->n == 16 || len > sizeof(to->buf[0]))
        return (ssize_t)len; /* lost, as on a network */
    int slot = (to->head + to->n) % 16;
    memcpy(to->buf[slot], data, len);
    to->len[slot] = len;
    to->n++;
    return (ssize_t)len;
}

static ssize_t dg_pull(gnutls_transport_ptr_t p, void *data, size_t len)
{
    struct dgq *q = p;
    if (!q->n) {
        gnutls_transport_set_errno(q->owner, EAGAIN);
        return -1;
    }
    size_t n = q->len[q->head] < len ? q->len[q->head] : len;
    memcpy(data, q->buf[q->head], n);
    q->head = (q->head + 1) % 16;
    q->n--;
    return (ssize_t)n;
}

static int dg_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
    (void)ms;
    return ((struct dgq *)p)->n ? 1 : 0;
}

/* A handshake between client and server credentials; rc of each side. */
static void dtls_pair(const struct testca_cert *cc, const char *cli_ca,
                      const struct testca_cert *sc, const char *srv_ca, int *rc_cli, int *rc_srv,
                      struct peer_identity *cli_sees, struct peer_identity *srv_sees)
{
    struct tls_ctx *cctx = make_ctx(cli_ca, cc, 0, 0, 0), *sctx = make_ctx(srv_ca, sc, 0, 0, 0);
    static struct dgq to_cli, to_srv;
    memset(&to_cli, 0, sizeof(to_cli));
    memset(&to_srv, 0, sizeof(to_srv));
    gnutls_session_t c, s;
    assert_int_equal(tls_ctx_dtls_session(cctx, true, &c), 0);
    assert_int_equal(tls_ctx_dtls_session(sctx, false, &s), 0);
    to_cli.owner = c;
    to_srv.owner = s;
    gnutls_transport_set_ptr2(c, &to_cli, &to_srv); /* recv from to_cli, send to to_srv */
    gnutls_transport_set_ptr2(s, &to_srv, &to_cli);
    gnutls_transport_set_push_function(c, dg_push);
    gnutls_transport_set_push_function(s, dg_push);
    gnutls_transport_set_pull_function(c, dg_pull);
    gnutls_transport_set_pull_function(s, dg_pull);
    gnutls_transport_set_pull_timeout_function(c, dg_pull_timeout);
    gnutls_transport_set_pull_timeout_function(s, dg_pull_timeout);
    gnutls_dtls_set_mtu(c, 1200);
    gnutls_dtls_set_mtu(s, 1200);
    *rc_cli = *rc_srv = GNUTLS_E_AGAIN;
    for (int i = 0; i < 40 && (*rc_cli || *rc_srv); i++) {
        if (*rc_cli == GNUTLS_E_AGAIN)
            *rc_cli = gnutls_handshake(c);
        if (*rc_srv == GNUTLS_E_AGAIN)
            *rc_srv = gnutls_handshake(s);
        if ((*rc_cli < 0 && *rc_cli != GNUTLS_E_AGAIN) ||
            (*rc_srv < 0 && *rc_srv != GNUTLS_E_AGAIN))
            break;
    }
    char err[300];
    if (*rc_cli == 0 && cli_sees)
        assert_int_equal(tls_session_peer(c, cli_sees, err, sizeof(err)), 0);
    if (*rc_srv == 0 && srv_sees)
        assert_int_equal(tls_session_peer(s, srv_sees, err, sizeof(err)), 0);
    if (*rc_cli == 0 && *rc_srv == 0) { /* one record each way */
        char buf[64];
        assert_int_equal(gnutls_record_send(c, "ping", 4), 4);
        assert_int_equal(gnutls_record_recv(s, buf, sizeof(buf)), 4);
        assert_int_equal(gnutls_record_send(s, "pong", 4), 4);
        assert_int_equal(gnutls_record_recv(c, buf, sizeof(buf)), 4);
        assert_memory_equal(buf, "pong", 4);
    }
    gnutls_deinit(c);
    gnutls_deinit(s);
    tls_ctx_free(cctx);
    tls_ctx_free(sctx);
}

/* Ed25519 node certificates both ways over DTLS 1.2 (the client hands its certificate over
 * although TLS 1.2's certificate types know no EdDSA), and each side reads the other's Node-ID. */
static void test_dtls_mutual_auth(void **state)
{
    struct fixture *fx = *state;
    int rc, rs;
    struct peer_identity cs, ss;
    dtls_pair(&fx->cli, fx->ca.ca_file, &fx->srv, fx->ca.ca_file, &rc, &rs, &cs, &ss);
    assert_int_equal(rc, 0);
    assert_int_equal(rs, 0);
    assert_true(cs.has_node_id && nid_cmp(&cs.node_id, &fx->srv.node_id) == 0);
    assert_true(ss.has_node_id && nid_cmp(&ss.node_id, &fx->cli.node_id) == 0);
    assert_string_equal(ss.uri, fx->cli.uri);
}

static void test_dtls_other_ca_refused(void **state)
{
    struct fixture *fx = *state;
    int rc, rs;
    dtls_pair(&fx->alien_cli, fx->ca.ca_file, &fx->srv, fx->ca.ca_file, &rc, &rs, NULL, NULL);
    assert_true(rs < 0 && rs != GNUTLS_E_AGAIN); /* the server refuses the client */
    dtls_pair(&fx->cli, fx->ca.ca_file, &fx->alien_srv, fx->ca.ca_file, &rc, &rs, NULL, NULL);
    assert_true(rc < 0 && rc != GNUTLS_E_AGAIN); /* the client refuses the server */
    dtls_pair(&fx->expired, fx->ca.ca_file, &fx->srv, fx->ca.ca_file, &rc, &rs, NULL, NULL);
    assert_true(rs < 0 && rs != GNUTLS_E_AGAIN);
}

static void test_ctx_errors(void **state)
{
    struct fixture *fx = *state;
    char err[256];
    struct tls_config cfg = {.ca_file = fx->ca.ca_file,
                             .cert_file = "/nonexistent/cert.pem",
                             .key_file = fx->cli.key_file,
                             .overlay = OVERLAY};
    assert_null(tls_ctx_new(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "/nonexistent/cert.pem"));
    assert_non_null(strstr(err, "No such file"));

    cfg.cert_file = fx->cli.cert_file;
    cfg.key_file = fx->srv.key_file; /* another key */
    assert_null(tls_ctx_new(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "does not match"));

    cfg.key_file = fx->cli.key_file;
    cfg.ca_file = fx->cli.key_file; /* not a certificate */
    assert_null(tls_ctx_new(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, fx->cli.key_file));

    cfg.ca_file = fx->ca.ca_file;
    cfg.key_file = fx->cli.cert_file; /* not a key */
    assert_null(tls_ctx_new(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "cannot load key"));

    cfg.key_file = fx->cli.key_file;
    struct tls_ctx *ctx = tls_ctx_new(&cfg, err, sizeof(err));
    assert_non_null(ctx);
    tls_ctx_free(ctx);
    tls_ctx_free(NULL);
    listener_free(NULL);
}

/* ---- Fixture ------------------------------------------------------------------------------ */

static int group_setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    if (!fx)
        return -1;
    const char *dbg = getenv("P2P_TEST_DEBUG");
    log_init("test_transport", dbg && *dbg ? LL_DEBUG : LL_ERROR, false);
    if (testca_init(&fx->ca) < 0 || testca_init(&fx->other) < 0)
        goto fail;
    if (testca_issue(&fx->ca, "srv", TESTCA_GOOD, &fx->srv) < 0 ||
        testca_issue(&fx->ca, "cli", TESTCA_GOOD, &fx->cli) < 0 ||
        testca_issue(&fx->other, "alien", TESTCA_GOOD, &fx->alien_cli) < 0 ||
        testca_issue(&fx->other, "aliensrv", TESTCA_GOOD, &fx->alien_srv) < 0 ||
        testca_issue(&fx->ca, "expired", TESTCA_EXPIRED, &fx->expired) < 0 ||
        testca_issue(&fx->ca, "noclient", TESTCA_NO_CLIENT_AUTH, &fx->noclient) < 0 ||
        testca_issue(&fx->ca, "noserver", TESTCA_NO_SERVER_AUTH, &fx->noserver) < 0 ||
        testca_issue(&fx->ca, "noroles", TESTCA_NO_ROLES, &fx->noroles) < 0)
        goto fail;
    *state = fx;
    return 0;
fail:
    testca_cleanup(&fx->ca);
    testca_cleanup(&fx->other);
    free(fx);
    return -1;
}

static int group_teardown(void **state)
{
    struct fixture *fx = *state;
    testca_cleanup(&fx->ca);
    testca_cleanup(&fx->other);
    free(fx);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mutual_auth_ipv4),
        cmocka_unit_test(test_mutual_auth_ipv6),
        cmocka_unit_test(test_local_link),
        cmocka_unit_test(test_local_link_error),
        cmocka_unit_test(test_client_cert_other_ca),
        cmocka_unit_test(test_server_cert_other_ca),
        cmocka_unit_test(test_client_cert_expired),
        cmocka_unit_test(test_server_cert_expired),
        cmocka_unit_test(test_client_cert_no_client_auth),
        cmocka_unit_test(test_server_cert_no_server_auth),
        cmocka_unit_test(test_cert_without_roles_connects),
        cmocka_unit_test(test_backpressure_peer_not_reading),
        cmocka_unit_test(test_frame_oversize),
        cmocka_unit_test(test_frame_invalid_json),
        cmocka_unit_test(test_frame_wrong_overlay),
        cmocka_unit_test(test_first_frame_not_hello),
        cmocka_unit_test(test_handshake_timeout),
        cmocka_unit_test(test_connect_refused),
        cmocka_unit_test(test_accept_out_of_fds),
        cmocka_unit_test(test_handshake_bounds),
        cmocka_unit_test(test_links_per_identity),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_clean_close_delivers_all),
        cmocka_unit_test(test_close_inside_on_open),
        cmocka_unit_test(test_close_with_error_reply),
        cmocka_unit_test(test_ctx_errors),
        cmocka_unit_test(test_dtls_mutual_auth),
        cmocka_unit_test(test_dtls_other_ca_refused),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
