/*
 * TURN server tests on loopback (turn.h): what the integration scenario
 * (tests/integration/test_turn.py) cannot wait for. Lifetimes shortened
 * through turn_params show allocations, permissions and channel bindings
 * expiring; bad parameters are refused at start; credentials have the
 * documented shape; the figures (status, metrics) follow.
 *
 * The client is built here by hand (message, MESSAGE-INTEGRITY with the
 * long-term key), the server runs on the test's own libev loop, stepped
 * until the answer has arrived.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "log.h"
#include "stun.h"
#include "turn.h"

#define MAGIC   0x2112A442u
#define NODE    "0123456789abcdef0123456789abcdef01234567"
#define TIMEOUT 3.0

struct env {
    struct ev_loop *loop;
    struct stun_server *stun;
    struct turn_server *turn;
    struct sockaddr_in srv;
    int fd; /* the client's socket */
    char user[160], pass[64], realm[160];
    uint8_t nonce[64];
    size_t nonce_len;
    uint8_t key[16];
};

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Steps the loop for s seconds. */
static void run_for(struct env *e, double s)
{
    double end = mono() + s;
    while (mono() < end) {
        ev_run(e->loop, EVRUN_NOWAIT);
        usleep(2000);
    }
}

static void env_start(struct env *e, const struct turn_params *tp)
{
    memset(e, 0, sizeof(*e));
    e->loop = ev_loop_new(EVFLAG_AUTO);
    char err[256];
    e->stun = stun_server_start(e->loop, "127.0.0.1:0", err, sizeof(err));
    assert_non_null(e->stun);
    e->turn = turn_server_start(e->loop, e->stun, tp, err, sizeof(err));
    assert_non_null(e->turn);
    e->srv.sin_family = AF_INET;
    e->srv.sin_port = htons((uint16_t)stun_server_port(e->stun));
    e->srv.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    e->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    assert_true(e->fd >= 0);
    struct sockaddr_in me = {.sin_family = AF_INET};
    me.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(e->fd, (struct sockaddr *)&me, sizeof(me)), 0);
    assert_int_equal(turn_issue(e->turn, NODE, 600, e->user, sizeof(e->user), e->pass,
                                sizeof(e->pass), e->realm, sizeof(e->realm)),
                     0);
}

static void env_stop(struct env *e)
{
    close(e->fd);
    turn_server_stop(e->turn);
    stun_server_stop(e->stun);
    ev_loop_destroy(e->loop);
}

/* ---- messages ----------------------------------------------------------------------------- */

struct msgbuf {
    uint8_t b[1024];
    size_t n;
};

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, v & 0xFFFF);
}

static void msg_init(struct msgbuf *m, unsigned type)
{
    memset(m, 0, sizeof(*m));
    put16(m->b, type);
    put32(m->b + 4, MAGIC);
    for (int i = 8; i < 20; i++)
        m->b[i] = (uint8_t)rand();
    m->n = 20;
}

static void msg_attr(struct msgbuf *m, unsigned type, const void *v, size_t len)
{
    put16(m->b + m->n, type);
    put16(m->b + m->n + 2, (unsigned)len);
    memcpy(m->b + m->n + 4, v, len);
    m->n += 4 + ((len + 3) & ~(size_t)3);
    put16(m->b + 2, (unsigned)(m->n - 20));
}

static void msg_peer(struct msgbuf *m, unsigned type, const char *ip, unsigned port)
{
    uint8_t v[8] = {0, 1};
    struct in_addr a;
    inet_pton(AF_INET, ip, &a);
    uint32_t x = ntohl(a.s_addr) ^ MAGIC;
    put16(v + 2, port ^ (MAGIC >> 16));
    put32(v + 4, x);
    msg_attr(m, type, v, sizeof(v));
}

/* USERNAME, REALM, NONCE and MESSAGE-INTEGRITY with the long-term key. */
static void msg_auth(struct env *e, struct msgbuf *m)
{
    msg_attr(m, 0x0006, e->user, strlen(e->user));
    msg_attr(m, 0x0014, e->realm, strlen(e->realm));
    msg_attr(m, 0x0015, e->nonce, e->nonce_len);
    put16(m->b + 2, (unsigned)(m->n - 20 + 24));
    uint8_t mac[20];
    assert_int_equal(gnutls_hmac_fast(GNUTLS_MAC_SHA1, e->key, 16, m->b, m->n, mac), 0);
    put16(m->b + m->n, 0x0008);
    put16(m->b + m->n + 2, 20);
    memcpy(m->b + m->n + 4, mac, 20);
    m->n += 24;
}

/* Finds an attribute of an answer; its length in *len. */
static const uint8_t *find(const uint8_t *b, size_t n, unsigned type, size_t *len)
{
    for (size_t off = 20; off + 4 <= n;) {
        unsigned t = (unsigned)b[off] << 8 | b[off + 1];
        size_t l = (size_t)b[off + 2] << 8 | b[off + 3];
        if (t == type) {
            *len = l;
            return b + off + 4;
        }
        off += 4 + ((l + 3) & ~(size_t)3);
    }
    return NULL;
}

/* Sends m, steps the loop until the answer (same transaction) arrives: its error code or 0. */
static int exchange(struct env *e, struct msgbuf *m, uint8_t *ans, size_t *anslen)
{
    assert_true(sendto(e->fd, m->b, m->n, 0, (struct sockaddr *)&e->srv, sizeof(e->srv)) ==
                (ssize_t)m->n);
    double end = mono() + TIMEOUT;
    while (mono() < end) {
        ev_run(e->loop, EVRUN_NOWAIT);
        ssize_t n = recv(e->fd, ans, 1024, 0);
        if (n >= 20 && !memcmp(ans + 8, m->b + 8, 12)) {
            *anslen = (size_t)n;
            size_t l;
            const uint8_t *ec = find(ans, (size_t)n, 0x0009, &l);
            return ec ? (ec[2] & 7) * 100 + ec[3] : 0;
        }
        usleep(1000);
    }
    fail_msg("no answer");
    return -1;
}

/* An authenticated request of `type` (0 = success expected); does the 401 dance once. */
static int request(struct env *e, unsigned type, void (*add)(struct msgbuf *, void *), void *arg)
{
    uint8_t ans[1024];
    size_t n;
    for (int round = 0; round < 2; round++) {
        struct msgbuf m;
        msg_init(&m, type);
        if (add)
            add(&m, arg);
        if (e->nonce_len)
            msg_auth(e, &m);
        int code = exchange(e, &m, ans, &n);
        if ((code == 401 || code == 438) && round == 0) {
            size_t l = 0;
            const uint8_t *nonce = find(ans, n, 0x0015, &l);
            assert_non_null(nonce);
            assert_true(l < sizeof(e->nonce));
            memcpy(e->nonce, nonce, l);
            e->nonce_len = l;
            char buf[512];
            snprintf(buf, sizeof(buf), "%s:%s:%s", e->user, e->realm, e->pass);
            assert_int_equal(gnutls_hash_fast(GNUTLS_DIG_MD5, buf, strlen(buf), e->key), 0);
            continue;
        }
        return code;
    }
    return -1;
}

static void add_transport(struct msgbuf *m, void *arg)
{
    (void)arg;
    uint8_t v[4] = {17, 0, 0, 0};
    msg_attr(m, 0x0019, v, 4);
}

static void add_perm(struct msgbuf *m, void *arg)
{
    msg_peer(m, 0x0012, arg, 0);
}

static void add_chan(struct msgbuf *m, void *arg)
{
    uint8_t v[4] = {0x40, 0x01, 0, 0};
    msg_attr(m, 0x000C, v, 4);
    msg_peer(m, 0x0012, arg, 9999);
}

static void add_lifetime(struct msgbuf *m, void *arg)
{
    uint8_t v[4];
    put32(v, *(uint32_t *)arg);
    msg_attr(m, 0x000D, v, 4);
}

/* ---- tests -------------------------------------------------------------------------------- */

static const char *const loopback[] = {"127.0.0.0/8"};

static void test_expiry(void **state)
{
    (void)state;
    struct turn_params tp = {.relay_ip = "127.0.0.1",
                             .default_lifetime_s = 5,
                             .max_lifetime_s = 5,
                             .perm_lifetime_s = 1,
                             .chan_lifetime_s = 3,
                             .allow_peers = loopback,
                             .n_allow_peers = 1};
    struct env e;
    env_start(&e, &tp);
    assert_int_equal(request(&e, 0x0003, add_transport, NULL), 0);
    assert_int_equal(request(&e, 0x0008, add_perm, "127.0.0.2"), 0);
    assert_int_equal(request(&e, 0x0009, add_chan, "127.0.0.3"), 0);
    struct turn_stats st;
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.allocations, 1);
    assert_int_equal(st.permissions, 2); /* the ChannelBind's peer got one too */
    assert_int_equal(st.channels, 1);
    run_for(&e, 2.2); /* permissions (1 s) are gone, the channel (3 s) is not */
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.permissions, 0);
    assert_int_equal(st.channels, 1);
    assert_int_equal(st.allocations, 1);
    run_for(&e, 2.0); /* the channel too */
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.channels, 0);
    assert_int_equal(st.allocations, 1);
    run_for(&e, 2.0); /* and the allocation (5 s) */
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.allocations, 0);
    /* Refresh of a gone allocation: 437. */
    uint32_t life = 5;
    assert_int_equal(request(&e, 0x0004, add_lifetime, &life), 437);
    env_stop(&e);
}

static void test_refresh_keeps_alive(void **state)
{
    (void)state;
    struct turn_params tp = {.relay_ip = "127.0.0.1", .default_lifetime_s = 2, .max_lifetime_s = 2};
    struct env e;
    env_start(&e, &tp);
    assert_int_equal(request(&e, 0x0003, add_transport, NULL), 0);
    uint32_t life = 2;
    for (int i = 0; i < 3; i++) {
        run_for(&e, 1.0);
        assert_int_equal(request(&e, 0x0004, add_lifetime, &life), 0);
    }
    struct turn_stats st;
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.allocations, 1);
    life = 0; /* deletes */
    assert_int_equal(request(&e, 0x0004, add_lifetime, &life), 0);
    turn_server_stats(e.turn, &st);
    assert_int_equal(st.allocations, 0);
    env_stop(&e);
}

static void test_bad_params(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256];
    struct stun_server *s = stun_server_start(loop, "127.0.0.1:0", err, sizeof(err));
    assert_non_null(s);
    static const char *const bad_cidr[] = {"10.0.0.0/33"};
    static const char *const bad_cidr2[] = {"nonsense"};
    struct turn_params cases[] = {
        {.relay_ip = NULL},
        {.relay_ip = "::1"},
        {.relay_ip = "0.0.0.0"},
        {.relay_ip = "example.org"},
        {.relay_ip = "127.0.0.1", .port_min = 60000, .port_max = 50000},
        {.relay_ip = "127.0.0.1", .port_min = 0, .port_max = 100},
        {.relay_ip = "127.0.0.1", .port_min = 1, .port_max = 70000},
        {.relay_ip = "127.0.0.1", .allow_peers = bad_cidr, .n_allow_peers = 1},
        {.relay_ip = "127.0.0.1", .allow_peers = bad_cidr2, .n_allow_peers = 1},
        {.relay_ip = "127.0.0.1", .realm = "has:colon"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        err[0] = '\0';
        assert_null(turn_server_start(loop, s, &cases[i], err, sizeof(err)));
        assert_true(err[0] != '\0');
    }
    struct turn_params ok = {.relay_ip = "127.0.0.1"};
    assert_null(turn_server_start(loop, NULL, &ok, err, sizeof(err)));
    struct turn_server *t = turn_server_start(loop, s, &ok, err, sizeof(err));
    assert_non_null(t);
    turn_server_stop(t);
    turn_server_stop(NULL);
    stun_server_stop(s);
    ev_loop_destroy(loop);
}

static void test_issue_and_figures(void **state)
{
    (void)state;
    struct turn_params tp = {.relay_ip = "127.0.0.1", .realm = "lab.example"};
    struct env e;
    env_start(&e, &tp);
    char u[160], p[64], r[160];
    /* The shape: "<expiry>:<node>", 28 base64 characters, the realm. */
    long long now = (long long)time(NULL);
    assert_int_equal(turn_issue(e.turn, NODE, 100, u, sizeof(u), p, sizeof(p), r, sizeof(r)), 0);
    char *colon = strchr(u, ':');
    assert_non_null(colon);
    long long exp = strtoll(u, NULL, 10);
    assert_true(exp >= now + 99 && exp <= now + 101);
    assert_string_equal(colon + 1, NODE);
    assert_int_equal(strlen(p), 28);
    assert_string_equal(r, "lab.example");
    /* Refused: malformed ids, zero TTL, buffers too small. */
    const char *bad[] = {"", "0123", NODE "0", "0123456789ABCDEF0123456789abcdef01234567",
                         "0123456789abcdef0123456789abcdef0123456g"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(turn_issue(e.turn, bad[i], 100, u, sizeof(u), p, sizeof(p), r, sizeof(r)),
                         -1);
    assert_int_equal(turn_issue(e.turn, NODE, 0, u, sizeof(u), p, sizeof(p), r, sizeof(r)), -1);
    assert_int_equal(turn_issue(e.turn, NODE, 100, u, 20, p, sizeof(p), r, sizeof(r)), -1);
    assert_int_equal(turn_issue(e.turn, NODE, 100, u, sizeof(u), p, 10, r, sizeof(r)), -1);
    assert_int_equal(turn_issue(NULL, NODE, 100, u, sizeof(u), p, sizeof(p), r, sizeof(r)), -1);
    /* Figures after one allocation and one refusal of the peer policy. */
    assert_int_equal(request(&e, 0x0003, add_transport, NULL), 0);
    assert_int_equal(request(&e, 0x0008, add_perm, "192.168.1.1"), 403);
    json_t *j = turn_server_status(e.turn);
    assert_int_equal(json_integer_value(json_object_get(j, "allocations")), 1);
    assert_int_equal(json_integer_value(json_object_get(j, "refused_peer")), 1);
    assert_int_equal(json_integer_value(json_object_get(j, "challenges")), 1);
    assert_string_equal(json_string_value(json_object_get(j, "realm")), "lab.example");
    json_decref(j);
    char *text = turn_server_metrics(e.turn);
    assert_non_null(text);
    assert_non_null(strstr(text, "p2p_turn_allocations 1\n"));
    assert_non_null(strstr(text, "p2p_turn_refused_total{reason=\"peer\"} 1\n"));
    free(text);
    env_stop(&e);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const char *dbg = getenv("P2P_TEST_DEBUG");
    log_init("test_turn", LL_DEBUG, false);
    if (!(dbg && *dbg) && log_use_file("/dev/null") < 0)
        return 1;
    srand((unsigned)time(NULL));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_params),
        cmocka_unit_test(test_issue_and_figures),
        cmocka_unit_test(test_refresh_keeps_alive),
        cmocka_unit_test(test_expiry),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    log_close();
    return rc;
}
