/*
 * STUN server and client tests on loopback (stun.h). The blocking client,
 * stun_binding_query(), runs in a forked child while the parent runs the
 * server's libev loop; the malformed-input tests send raw datagrams from a
 * socket of the test itself and step the loop until the server has seen them,
 * so every check is exact (no sleeps deciding an outcome). A fake server (a
 * plain socket answering by hand) drives the client's error paths.
 *
 * `test_stun --bench [N]` measures Binding answers per second instead.
 * P2P_TEST_DEBUG=1 shows the server's debug log on stderr.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <stun/stunagent.h>
#include <stun/stunmessage.h>
#include <stun/usages/bind.h>

#include "log.h"
#include "stun.h"

#define SAFETY 10.0 /* seconds: no wait in a test may last longer */

static const uint16_t known_attrs[] = {STUN_ATTRIBUTE_XOR_MAPPED_ADDRESS, STUN_ATTRIBUTE_SOFTWARE,
                                       STUN_ATTRIBUTE_FINGERPRINT, STUN_ATTRIBUTE_ERROR_CODE, 0};

/* ---- Loop --------------------------------------------------------------------------------- */

struct env {
    struct ev_loop *loop;
    struct stun_server *s;
    char srv[64]; /* "127.0.0.1:port" / "[::1]:port" */
    ev_timer safety;
    bool timed_out;
};

static void on_safety(struct ev_loop *loop, ev_timer *w, int revents)
{
    ((struct env *)w->data)->timed_out = true;
}

/* Runs the loop until pred(arg) holds; fails after SAFETY seconds. */
static void run_until(struct env *e, bool (*pred)(void *), void *arg)
{
    ev_timer_init(&e->safety, on_safety, SAFETY, 0.);
    e->safety.data = e;
    e->timed_out = false;
    ev_timer_start(e->loop, &e->safety);
    while (!pred(arg) && !e->timed_out)
        ev_run(e->loop, EVRUN_ONCE);
    ev_timer_stop(e->loop, &e->safety);
    assert_false(e->timed_out);
}

static void env_init(struct env *e)
{
    memset(e, 0, sizeof(*e));
    e->loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(e->loop);
}

static void env_start(struct env *e, const char *hostport)
{
    char err[256] = "";
    e->s = stun_server_start(e->loop, hostport, err, sizeof(err));
    if (!e->s)
        print_error("stun_server_start(%s): %s\n", hostport, err);
    assert_non_null(e->s);
    assert_true(stun_server_port(e->s) > 0);
    bool v6 = hostport[0] == '[';
    snprintf(e->srv, sizeof(e->srv), v6 ? "[::1]:%d" : "127.0.0.1:%d", stun_server_port(e->s));
}

static void env_done(struct env *e)
{
    stun_server_stop(e->s);
    ev_loop_destroy(e->loop);
}

static struct stun_stats stats(struct env *e)
{
    struct stun_stats st;
    stun_server_stats(e->s, &st);
    return st;
}

struct want {
    struct env *e;
    uint64_t answered, dropped;
};

static bool stats_reached(void *arg)
{
    struct want *w = arg;
    struct stun_stats st = stats(w->e);
    return st.answered >= w->answered && st.dropped >= w->dropped;
}

/* Steps the loop until the server has answered / dropped at least that many in all. */
static void wait_stats(struct env *e, uint64_t answered, uint64_t dropped)
{
    struct want w = {e, answered, dropped};
    run_until(e, stats_reached, &w);
}

/* ---- Sockets ------------------------------------------------------------------------------ */

static socklen_t make_addr(int family, int port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        a->sin6_port = htons((uint16_t)port);
        return sizeof(*a);
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = htons((uint16_t)port);
    return sizeof(*a);
}

/* A non-blocking UDP socket on the loopback address of `family`, port out; -1 if none. */
static int udp_socket(int family, int *port)
{
    int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_storage ss;
    socklen_t len = make_addr(family, 0, &ss);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                     : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

/* A port that was free a moment ago (bound, read, released). */
static int free_port(int family)
{
    int port = 0;
    int fd = udp_socket(family, &port);
    assert_true(fd >= 0);
    close(fd);
    return port;
}

static bool have_ipv6(void)
{
    int port;
    int fd = udp_socket(AF_INET6, &port);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

static void send_to(int fd, int family, int port, const void *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = make_addr(family, port, &ss);
    assert_int_equal(sendto(fd, buf, len, 0, (struct sockaddr *)&ss, sl), (ssize_t)len);
}

/* Whether a datagram is waiting on fd (after waiting up to ms). */
static bool readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) > 0;
}

/* ---- The client in a child process -------------------------------------------------------- */

struct query {
    pid_t pid;
    int fd;
    ev_io w;
    char buf[512];
    size_t len;
    bool done;
    int rc, status;
    char out[480]; /* mapped address, or the error */
    double secs;   /* how long the call took */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_query_data(struct ev_loop *loop, ev_io *w, int revents)
{
    struct query *q = w->data;
    ssize_t n = read(q->fd, q->buf + q->len, sizeof(q->buf) - 1 - q->len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n > 0 && q->len + (size_t)n < sizeof(q->buf) - 1) {
        q->len += (size_t)n;
        return;
    }
    ev_io_stop(loop, w);
    close(q->fd);
    q->buf[q->len] = '\0';
    while (waitpid(q->pid, &q->status, 0) < 0 && errno == EINTR)
        ;
    q->rc = 99;
    double secs = 0;
    int consumed = 0;
    if (sscanf(q->buf, "%d %lf\n%n", &q->rc, &secs, &consumed) == 2 && consumed > 0)
        snprintf(q->out, sizeof(q->out), "%s", q->buf + consumed);
    q->secs = secs;
    q->done = true;
}

static void query_start(struct env *e, struct query *q, const char *server, const char *local,
                        int timeout_ms)
{
    memset(q, 0, sizeof(*q));
    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    q->pid = fork();
    assert_true(q->pid >= 0);
    if (q->pid == 0) {
        close(fds[0]);
        char mapped[128] = "", err[256] = "";
        double t0 = now_s();
        int rc =
            stun_binding_query(server, local, timeout_ms, mapped, sizeof(mapped), err, sizeof(err));
        dprintf(fds[1], "%d %.3f\n%s", rc, now_s() - t0, rc == 0 ? mapped : err);
        close(fds[1]);
        _exit(0); /* no cmocka, no atexit handlers, no stdio flush in the child */
    }
    close(fds[1]);
    q->fd = fds[0];
    fcntl(q->fd, F_SETFL, O_NONBLOCK);
    ev_io_init(&q->w, on_query_data, q->fd, EV_READ);
    q->w.data = q;
    ev_io_start(e->loop, &q->w);
}

static bool query_done(void *arg)
{
    return ((struct query *)arg)->done;
}

static void query_wait(struct env *e, struct query *q)
{
    run_until(e, query_done, q);
    assert_true(WIFEXITED(q->status));
    assert_int_equal(WEXITSTATUS(q->status), 0);
}

/* A whole query from `local` to the env's server; returns rc, q->out holds the text. */
static int query(struct env *e, struct query *q, const char *local, int timeout_ms)
{
    query_start(e, q, e->srv, local, timeout_ms);
    query_wait(e, q);
    return q->rc;
}

/* ---- Messages built by hand --------------------------------------------------------------- */

/* A Binding request; fp: with FINGERPRINT; software: with a SOFTWARE attribute. */
static size_t make_request(StunAgent *agent, StunMessage *msg, uint8_t *buf, size_t len, bool fp,
                           bool software)
{
    stun_agent_init(agent, known_attrs, STUN_COMPATIBILITY_RFC5389,
                    (fp ? STUN_AGENT_USAGE_USE_FINGERPRINT : 0) |
                        (software ? STUN_AGENT_USAGE_ADD_SOFTWARE : 0));
    size_t n = stun_usage_bind_create(agent, msg, buf, len);
    assert_true(n >= 20);
    return n;
}

/* A bare 20-byte header: type, body length, cookie, transaction id 0x01 0x02 ... */
static void make_header(uint8_t *h, uint16_t type, uint16_t bodylen, uint32_t cookie)
{
    h[0] = (uint8_t)(type >> 8);
    h[1] = (uint8_t)type;
    h[2] = (uint8_t)(bodylen >> 8);
    h[3] = (uint8_t)bodylen;
    h[4] = (uint8_t)(cookie >> 24);
    h[5] = (uint8_t)(cookie >> 16);
    h[6] = (uint8_t)(cookie >> 8);
    h[7] = (uint8_t)cookie;
    for (int i = 8; i < 20; i++)
        h[i] = (uint8_t)(i - 7);
}

static uint32_t rng_state = 0x5eed1234u;

static uint32_t rng(void)
{
    /* xorshift32: the same bytes on every run */
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

/*
 * Sends one Binding request from fd and checks the answer: it comes, it is
 * ours, its XOR-MAPPED-ADDRESS is fd's own address, and it carries
 * FINGERPRINT exactly when the request did.
 */
static void check_real_request(struct env *e, int fd, int family, int own_port, bool fp)
{
    StunAgent agent;
    StunMessage req;
    uint8_t buf[256];
    size_t n = make_request(&agent, &req, buf, sizeof(buf), fp, false);
    struct stun_stats before = stats(e);
    send_to(fd, family, stun_server_port(e->s), buf, n);
    wait_stats(e, before.answered + 1, 0);
    assert_int_equal(stats(e).dropped, before.dropped);
    assert_true(readable(fd, 1000));

    uint8_t ans[2048];
    ssize_t got = recv(fd, ans, sizeof(ans), 0);
    assert_true(got >= 20);
    StunMessage msg; /* the agent that sent without FINGERPRINT does not ask for one either */
    assert_int_equal(stun_agent_validate(&agent, &msg, ans, (size_t)got, NULL, NULL),
                     STUN_VALIDATION_SUCCESS);
    assert_int_equal(stun_message_has_attribute(&msg, STUN_ATTRIBUTE_FINGERPRINT), fp);
    struct sockaddr_storage addr;
    socklen_t alen = sizeof(addr);
    memset(&addr, 0, sizeof(addr));
    assert_int_equal(stun_usage_bind_process(&msg, (struct sockaddr *)&addr, &alen, NULL, NULL),
                     STUN_USAGE_BIND_RETURN_SUCCESS);
    assert_int_equal(addr.ss_family, family);
    int port = ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *)&addr)->sin6_port
                                        : ((struct sockaddr_in *)&addr)->sin_port);
    assert_int_equal(port, own_port);
    assert_false(readable(fd, 0)); /* one answer per request */
}

/*
 * Sends `count` datagrams of one kind (kind(i, buf) fills buf, returns the
 * length) and checks that each was dropped, none answered, and that the
 * server still answers a real request afterwards.
 */
static void check_dropped(struct env *e, int fd, int own_port, const char *what, int count,
                          size_t (*kind)(int i, uint8_t *buf, size_t cap))
{
    struct stun_stats before = stats(e);
    uint8_t buf[4096];
    for (int i = 0; i < count; i++) {
        size_t n = kind(i, buf, sizeof(buf));
        send_to(fd, AF_INET, stun_server_port(e->s), buf, n);
        /* in small batches, so that the socket buffer never overflows */
        if (i % 16 == 15)
            wait_stats(e, 0, before.dropped + (uint64_t)i + 1);
    }
    wait_stats(e, 0, before.dropped + (uint64_t)count);
    struct stun_stats after = stats(e);
    if (after.dropped != before.dropped + (uint64_t)count || after.answered != before.answered)
        print_error("%s: dropped %llu -> %llu, answered %llu -> %llu\n", what,
                    (unsigned long long)before.dropped, (unsigned long long)after.dropped,
                    (unsigned long long)before.answered, (unsigned long long)after.answered);
    assert_int_equal(after.dropped, before.dropped + (uint64_t)count);
    assert_int_equal(after.answered, before.answered);
    /* The server answers within its callback: an answer would be queued already. */
    if (readable(fd, 20))
        print_error("%s: got an answer\n", what);
    assert_false(readable(fd, 0));
    check_real_request(e, fd, AF_INET, own_port, true);
    check_real_request(e, fd, AF_INET, own_port, false);
}

static size_t k_empty(int i, uint8_t *b, size_t cap)
{
    return 0;
}

static size_t k_one(int i, uint8_t *b, size_t cap)
{
    b[0] = 0x00;
    return 1;
}

static size_t k_nineteen(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, 0, STUN_MAGIC_COOKIE);
    return 19;
}

static size_t k_length_too_big(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, i == 0 ? 8 : 100, STUN_MAGIC_COOKIE);
    memset(b + 20, 0, 8);
    return i == 0 ? 20 : 28;
}

static size_t k_trailing(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, 0, STUN_MAGIC_COOKIE);
    memset(b + 20, 0, 4);
    return 24;
}

static size_t k_top_bits(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0xC001, 0, STUN_MAGIC_COOKIE);
    return 20;
}

static size_t k_attr_overrun(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, 8, STUN_MAGIC_COOKIE);
    b[20] = 0x80, b[21] = 0x22, b[22] = 0x00, b[23] = 100; /* SOFTWARE, 100 bytes: 4 there */
    memset(b + 24, 'x', 4);
    return 28;
}

static size_t k_response(int i, uint8_t *b, size_t cap)
{
    static const uint16_t types[] = {0x0101, 0x0111}; /* Binding success, Binding error */
    make_header(b, types[i % 2], 0, STUN_MAGIC_COOKIE);
    return 20;
}

static size_t k_indication(int i, uint8_t *b, size_t cap)
{
    if (i == 0) {
        make_header(b, 0x0011, 0, STUN_MAGIC_COOKIE);
        return 20;
    }
    StunAgent a; /* libnice's own keep-alive, with FINGERPRINT */
    StunMessage m;
    stun_agent_init(&a, known_attrs, STUN_COMPATIBILITY_RFC5389, STUN_AGENT_USAGE_USE_FINGERPRINT);
    size_t n = stun_usage_bind_keepalive(&a, &m, b, cap);
    assert_true(n >= 20);
    return n;
}

static size_t k_other_method(int i, uint8_t *b, size_t cap)
{
    make_header(b, i == 0 ? 0x0009 : 0x0003, 0, STUN_MAGIC_COOKIE); /* 0x0003: TURN Allocate */
    return 20;
}

static size_t k_bad_fingerprint(int i, uint8_t *b, size_t cap)
{
    StunAgent a;
    StunMessage m;
    size_t n = make_request(&a, &m, b, cap, true, i == 1);
    if (i == 0)
        b[n - 1] ^= 0x01; /* the CRC itself */
    else
        b[n - 12] ^= 0x01; /* a byte of the SOFTWARE text, which the CRC covers */
    return n;
}

/* RFC 3489 test II / III: a classic request asking for another address or port (stun.c: not
 * answered, since a classic client takes any answer for a changed address). */
static size_t k_classic_change(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, 8, 0xdeadbeef);
    b[20] = 0x00, b[21] = 0x03, b[22] = 0x00, b[23] = 4; /* CHANGE-REQUEST */
    memset(b + 24, 0, 4);
    b[27] = i == 0 ? 0x06 : 0x02; /* change IP and port / port only */
    return 28;
}

static size_t k_oversized(int i, uint8_t *b, size_t cap)
{
    make_header(b, 0x0001, 0, STUN_MAGIC_COOKIE);
    memset(b + 20, 0, 3000 - 20);
    return 3000;
}

static size_t k_random(int i, uint8_t *b, size_t cap)
{
    size_t n = rng() % 600;
    for (size_t j = 0; j < n; j++)
        b[j] = (uint8_t)rng();
    if (i % 3 == 0 && n >= 20) { /* a third look like STUN to the first checks */
        b[0] &= 0x3f;
        b[4] = 0x21, b[5] = 0x12, b[6] = 0xa4, b[7] = 0x42;
        b[2] = (uint8_t)((n - 20) >> 8), b[3] = (uint8_t)(n - 20);
    }
    return n;
}

/* ---- Tests -------------------------------------------------------------------------------- */

static void check_query(int family)
{
    struct env e;
    env_init(&e);
    env_start(&e, family == AF_INET6 ? "[::1]:0" : "127.0.0.1:0");
    int lport = free_port(family);
    char local[64], want[64];
    snprintf(local, sizeof(local), family == AF_INET6 ? "[::1]:%d" : "127.0.0.1:%d", lport);
    snprintf(want, sizeof(want), "%s", local);
    struct query q;
    int rc = query(&e, &q, local, 3000);
    if (rc != 0)
        print_error("query: %s\n", q.out);
    assert_int_equal(rc, 0);
    assert_string_equal(q.out, want);
    struct stun_stats st = stats(&e);
    assert_true(st.answered >= 1); /* more if the child retransmitted before the loop ran */
    assert_int_equal(st.dropped, 0);

    /* Port 0: any local port, still a loopback address. */
    rc = query(&e, &q, family == AF_INET6 ? "[::1]:0" : "127.0.0.1:0", 3000);
    assert_int_equal(rc, 0);
    assert_true(strncmp(q.out, family == AF_INET6 ? "[::1]:" : "127.0.0.1:",
                        family == AF_INET6 ? 6 : 10) == 0);
    assert_true(stats(&e).answered >= st.answered + 1);
    env_done(&e);
}

static void test_query_ipv4(void **state)
{
    check_query(AF_INET);
}

static void test_query_ipv6(void **state)
{
    if (!have_ipv6())
        skip();
    check_query(AF_INET6);
}

/* An IPv4 client of a dual-stack socket is told its IPv4 address, not ::ffff:127.0.0.1. */
static void test_dual_stack(void **state)
{
    if (!have_ipv6())
        skip();
    int v6only = 1;
    FILE *f = fopen("/proc/sys/net/ipv6/bindv6only", "r");
    if (f) {
        if (fscanf(f, "%d", &v6only) != 1)
            v6only = 1;
        fclose(f);
    }
    if (v6only)
        skip();
    struct env e;
    env_init(&e);
    env_start(&e, "[::]:0");
    snprintf(e.srv, sizeof(e.srv), "127.0.0.1:%d", stun_server_port(e.s));
    int lport = free_port(AF_INET);
    char local[64];
    snprintf(local, sizeof(local), "127.0.0.1:%d", lport);
    struct query q;
    assert_int_equal(query(&e, &q, local, 3000), 0);
    assert_string_equal(q.out, local);
    env_done(&e);
}

static void test_malformed(void **state)
{
    struct env e;
    env_init(&e);
    env_start(&e, "127.0.0.1:0");
    int port = 0;
    int fd = udp_socket(AF_INET, &port);
    assert_true(fd >= 0);

    check_real_request(&e, fd, AF_INET, port, true);
    check_real_request(&e, fd, AF_INET, port, false);
    assert_int_equal(stats(&e).answered, 2);

    check_dropped(&e, fd, port, "empty", 1, k_empty);
    check_dropped(&e, fd, port, "1 byte", 1, k_one);
    check_dropped(&e, fd, port, "19 bytes", 1, k_nineteen);
    check_dropped(&e, fd, port, "length beyond datagram", 2, k_length_too_big);
    check_dropped(&e, fd, port, "trailing bytes", 1, k_trailing);
    check_dropped(&e, fd, port, "top bits", 1, k_top_bits);
    check_dropped(&e, fd, port, "attribute overrun", 1, k_attr_overrun);
    check_dropped(&e, fd, port, "responses", 2, k_response);
    check_dropped(&e, fd, port, "indications", 2, k_indication);
    check_dropped(&e, fd, port, "other methods", 2, k_other_method);
    check_dropped(&e, fd, port, "bad FINGERPRINT", 2, k_bad_fingerprint);
    check_dropped(&e, fd, port, "RFC 3489 change request", 2, k_classic_change);
    check_dropped(&e, fd, port, "oversized", 1, k_oversized);
    rng_state = 0x5eed1234u;
    check_dropped(&e, fd, port, "random", 400, k_random);

    /* And the real client still gets its answer. */
    int lport = free_port(AF_INET);
    char local[64];
    snprintf(local, sizeof(local), "127.0.0.1:%d", lport);
    struct query q;
    assert_int_equal(query(&e, &q, local, 3000), 0);
    assert_string_equal(q.out, local);

    close(fd);
    env_done(&e);
}

/* A flood is read 64 datagrams per wakeup, so that other watchers get their turn. */
static void test_batch(void **state)
{
    struct env e;
    env_init(&e);
    env_start(&e, "127.0.0.1:0");
    int port = 0;
    int fd = udp_socket(AF_INET, &port);
    assert_true(fd >= 0);
    uint8_t b = 0;
    for (int i = 0; i < 100; i++)
        send_to(fd, AF_INET, stun_server_port(e.s), &b, 1);
    ev_run(e.loop, EVRUN_NOWAIT);
    assert_int_equal(stats(&e).dropped, 64);
    wait_stats(&e, 0, 100);
    assert_int_equal(stats(&e).dropped, 100);
    check_real_request(&e, fd, AF_INET, port, true);
    close(fd);
    env_done(&e);
}

static void test_port_in_use(void **state)
{
    int port = 0;
    int fd = udp_socket(AF_INET, &port);
    assert_true(fd >= 0);
    char addr[64], err[256] = "";
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);

    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    assert_null(stun_server_start(loop, addr, err, sizeof(err)));
    assert_non_null(strstr(err, addr));
    assert_non_null(strstr(err, "cannot bind"));
    assert_null(strchr(err, '\n'));

    char mapped[64] = "";
    err[0] = '\0';
    assert_int_equal(
        stun_binding_query("127.0.0.1:9", addr, 500, mapped, sizeof(mapped), err, sizeof(err)), -1);
    char want[128];
    snprintf(want, sizeof(want), "cannot bind %s: ", addr);
    assert_true(strncmp(err, want, strlen(want)) == 0);
    ev_loop_destroy(loop);
    close(fd);
}

static void test_bad_addresses(void **state)
{
    static const char *bad[] = {"",          "127.0.0.1", "::1:3478",       "[::1]3478",
                                "[::1:3478", "1.2.3.4:",  "1.2.3.4:65536",  "1.2.3.4:12a",
                                ":3478",     "[]:3478",   "localhost:3478", "1.2.3.4:123456"};
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char err[256] = "";
        assert_null(stun_server_start(loop, bad[i], err, sizeof(err)));
        if (strncmp(err, "invalid address", 15) != 0 && strncmp(err, "empty address", 13) != 0)
            print_error("\"%s\": %s\n", bad[i], err);
        assert_true(strncmp(err, "invalid address", 15) == 0 ||
                    strncmp(err, "empty address", 13) == 0);
        char mapped[64];
        err[0] = '\0';
        if (strcmp(bad[i], "localhost:3478") != 0) { /* the client may look names up */
            assert_int_equal(
                stun_binding_query(bad[i], NULL, 100, mapped, sizeof(mapped), err, sizeof(err)),
                -1);
            assert_true(err[0] != '\0');
        }
        err[0] = '\0';
        assert_int_equal(stun_binding_query("127.0.0.1:9", bad[i][0] ? bad[i] : "x", 100, mapped,
                                            sizeof(mapped), err, sizeof(err)),
                         -1);
        assert_true(err[0] != '\0');
    }
    ev_loop_destroy(loop);
    stun_server_stop(NULL);
    struct stun_stats st = {.answered = 1, .dropped = 1};
    stun_server_stats(NULL, &st);
    assert_int_equal(st.answered + st.dropped, 0);
}

/* ---- A fake server for the client's side -------------------------------------------------- */

enum fake_mode {
    FAKE_SILENT,
    FAKE_NOISE_THEN_GOOD, /* garbage, a foreign transaction, then a good answer */
    FAKE_ERROR,           /* a Binding error response (400) */
    FAKE_NO_ADDRESS,      /* a success without any mapped address */
    FAKE_BAD_FINGERPRINT, /* a success whose FINGERPRINT is wrong */
};

struct fake {
    enum fake_mode mode;
    int fd, port;
    ev_io w;
    int requests;
};

static void fake_send(struct fake *f, const uint8_t *buf, size_t len,
                      const struct sockaddr_storage *to, socklen_t tolen)
{
    assert_int_equal(sendto(f->fd, buf, len, 0, (const struct sockaddr *)to, tolen), (ssize_t)len);
}

static void on_fake(struct ev_loop *loop, ev_io *w, int revents)
{
    struct fake *f = w->data;
    uint8_t in[2048], out[512];
    struct sockaddr_storage from;
    socklen_t fromlen = sizeof(from);
    ssize_t n = recvfrom(f->fd, in, sizeof(in), 0, (struct sockaddr *)&from, &fromlen);
    if (n < 0)
        return;
    f->requests++;
    if (f->mode == FAKE_SILENT)
        return;

    StunAgent a;
    StunMessage req, resp;
    bool fp = f->mode == FAKE_BAD_FINGERPRINT;
    stun_agent_init(&a, known_attrs, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_IGNORE_CREDENTIALS |
                        (fp ? STUN_AGENT_USAGE_USE_FINGERPRINT : 0));
    assert_int_equal(stun_agent_validate(&a, &req, in, (size_t)n, NULL, NULL),
                     STUN_VALIDATION_SUCCESS);
    struct sockaddr_in fake_addr; /* what the good answer claims: 192.0.2.7:4242 */
    memset(&fake_addr, 0, sizeof(fake_addr));
    fake_addr.sin_family = AF_INET;
    fake_addr.sin_port = htons(4242);
    inet_pton(AF_INET, "192.0.2.7", &fake_addr.sin_addr);
    struct sockaddr_storage mapped;
    memset(&mapped, 0, sizeof(mapped));
    memcpy(&mapped, &fake_addr, sizeof(fake_addr));

    if (f->mode == FAKE_ERROR) {
        assert_true(
            stun_agent_init_error(&a, &resp, out, sizeof(out), &req, STUN_ERROR_BAD_REQUEST));
    } else {
        assert_true(stun_agent_init_response(&a, &resp, out, sizeof(out), &req));
        if (f->mode != FAKE_NO_ADDRESS)
            assert_int_equal(stun_message_append_xor_addr(&resp, STUN_ATTRIBUTE_XOR_MAPPED_ADDRESS,
                                                          &mapped, sizeof(fake_addr)),
                             STUN_MESSAGE_RETURN_SUCCESS);
    }
    size_t len = stun_agent_finish_message(&a, &resp, NULL, 0);
    assert_true(len >= 20);
    if (f->mode == FAKE_BAD_FINGERPRINT)
        out[len - 1] ^= 0x01;
    if (f->mode == FAKE_NOISE_THEN_GOOD) {
        uint8_t noise[64];
        for (size_t i = 0; i < sizeof(noise); i++)
            noise[i] = (uint8_t)rng();
        fake_send(f, noise, sizeof(noise), &from, fromlen);
        fake_send(f, noise, 0, &from, fromlen);
        uint8_t other[512];
        memcpy(other, out, len);
        other[19] ^= 0xff; /* another transaction */
        fake_send(f, other, len, &from, fromlen);
    }
    fake_send(f, out, len, &from, fromlen);
}

static void fake_start(struct env *e, struct fake *f, enum fake_mode mode)
{
    memset(f, 0, sizeof(*f));
    f->mode = mode;
    f->fd = udp_socket(AF_INET, &f->port);
    assert_true(f->fd >= 0);
    ev_io_init(&f->w, on_fake, f->fd, EV_READ);
    f->w.data = f;
    ev_io_start(e->loop, &f->w);
    snprintf(e->srv, sizeof(e->srv), "127.0.0.1:%d", f->port);
}

static void fake_stop(struct env *e, struct fake *f)
{
    ev_io_stop(e->loop, &f->w);
    close(f->fd);
}

static void test_timeout(void **state)
{
    struct env e;
    env_init(&e);
    struct fake f;
    fake_start(&e, &f, FAKE_SILENT);
    struct query q;
    assert_int_equal(query(&e, &q, "127.0.0.1:0", 400), -1);
    char want[128];
    snprintf(want, sizeof(want), "no STUN answer from %s within 400 ms", e.srv);
    assert_string_equal(q.out, want);
    assert_true(q.secs >= 0.39 && q.secs < 2.0);
    /* Sent at 0, 100, 300 ms: a request and at least one retransmission arrived. */
    assert_true(f.requests >= 2 && f.requests <= 3);
    fake_stop(&e, &f);
    ev_loop_destroy(e.loop);
}

/* stun_query_start: the same question on the loop, against a server on the same loop (a
 * blocking query could not be answered there), and a server that never answers. */
struct aq {
    bool done;
    char mapped[128], err[256];
};

static void aq_done(void *ud, const char *mapped, const char *err)
{
    struct aq *a = ud;
    a->done = true;
    snprintf(a->mapped, sizeof(a->mapped), "%s", mapped ? mapped : "");
    snprintf(a->err, sizeof(a->err), "%s", err ? err : "");
}

static bool aq_finished(void *arg)
{
    return ((struct aq *)arg)->done;
}

static void test_query_on_the_loop(void **state)
{
    (void)state;
    struct env e;
    env_init(&e);
    env_start(&e, "127.0.0.1:0");
    struct aq a = {0};
    char err[256];
    struct stun_query *q = stun_query_start(e.loop, e.srv, 2000, aq_done, &a, err, sizeof(err));
    assert_non_null(q);
    run_until(&e, aq_finished, &a);
    assert_string_equal(a.err, "");
    assert_true(strncmp(a.mapped, "127.0.0.1:", 10) == 0);
    /* silence: the deadline says so; a cancelled query calls nothing */
    struct fake f;
    fake_start(&e, &f, FAKE_SILENT);
    struct aq b = {0}, c = {0};
    assert_non_null(stun_query_start(e.loop, e.srv, 300, aq_done, &b, err, sizeof(err)));
    stun_query_cancel(stun_query_start(e.loop, e.srv, 300, aq_done, &c, err, sizeof(err)));
    run_until(&e, aq_finished, &b);
    assert_true(strstr(b.err, "no STUN answer from") != NULL);
    assert_false(c.done);
    assert_null(stun_query_start(e.loop, "not an address", 300, aq_done, &c, err, sizeof(err)));
    fake_stop(&e, &f);
    env_done(&e);
}

static void test_fake_answers(void **state)
{
    struct env e;
    env_init(&e);
    struct fake f;
    struct query q;

    fake_start(&e, &f, FAKE_NOISE_THEN_GOOD);
    int rc = query(&e, &q, "127.0.0.1:0", 3000);
    if (rc != 0)
        print_error("query: %s\n", q.out);
    assert_int_equal(rc, 0);
    assert_string_equal(q.out, "192.0.2.7:4242"); /* an answer without FINGERPRINT is fine */
    fake_stop(&e, &f);

    static const enum fake_mode bad[] = {FAKE_ERROR, FAKE_NO_ADDRESS, FAKE_BAD_FINGERPRINT};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        fake_start(&e, &f, bad[i]);
        assert_int_equal(query(&e, &q, "127.0.0.1:0", 3000), -1);
        char want[128];
        snprintf(want, sizeof(want), "malformed answer from %s", e.srv);
        if (strncmp(q.out, want, strlen(want)) != 0)
            print_error("mode %d: %s\n", (int)bad[i], q.out);
        assert_true(strncmp(q.out, want, strlen(want)) == 0);
        assert_null(strchr(q.out, '\n'));
        assert_true(q.secs < 1.0); /* at once, not at the timeout */
        fake_stop(&e, &f);
    }
    ev_loop_destroy(e.loop);
}

static void test_stats_answered(void **state)
{
    struct env e;
    env_init(&e);
    env_start(&e, "127.0.0.1:0");
    int port = 0;
    int fd = udp_socket(AF_INET, &port);
    assert_true(fd >= 0);
    for (int i = 0; i < 10; i++)
        check_real_request(&e, fd, AF_INET, port, i % 2 == 0);
    struct stun_stats st = stats(&e);
    assert_int_equal(st.answered, 10);
    assert_int_equal(st.dropped, 0);
    close(fd);
    env_done(&e);
}

/* ---- Throughput --------------------------------------------------------------------------- */

static int bench(long n)
{
    struct env e;
    memset(&e, 0, sizeof(e));
    e.loop = ev_loop_new(EVFLAG_AUTO);
    char err[256];
    e.s = stun_server_start(e.loop, "127.0.0.1:0", err, sizeof(err));
    int port = 0, fd = udp_socket(AF_INET, &port);
    if (!e.s || fd < 0) {
        fprintf(stderr, "bench: %s\n", e.s ? "no socket" : err);
        return 1;
    }
    StunAgent a;
    StunMessage m;
    uint8_t req[256], ans[2048];
    size_t len = make_request(&a, &m, req, sizeof(req), true, false);
    struct sockaddr_storage ss;
    socklen_t sl = make_addr(AF_INET, stun_server_port(e.s), &ss);
    double t0 = now_s();
    long sent = 0, got = 0;
    while (got < n) {
        for (int i = 0; i < 32 && sent < n; i++, sent++)
            (void)sendto(fd, req, len, 0, (struct sockaddr *)&ss, sl);
        ev_run(e.loop, EVRUN_NOWAIT);
        while (recv(fd, ans, sizeof(ans), 0) > 0)
            got++;
        if (got < sent && !readable(fd, 100)) /* a datagram lost in a full buffer */
            got = sent;
    }
    double dt = now_s() - t0;
    struct stun_stats st;
    stun_server_stats(e.s, &st);
    printf("%ld requests, %llu answered in %.3f s: %.0f answers/s\n", n,
           (unsigned long long)st.answered, dt, (double)st.answered / dt);
    close(fd);
    env_done(&e);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    const char *dbg = getenv("P2P_TEST_DEBUG");
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        log_init("test_stun", LL_WARN, false);
        return bench(argc > 2 ? atol(argv[2]) : 200000);
    }
    /* Debug level so that the drop path's logging runs too; to /dev/null unless asked. */
    log_init("test_stun", LL_DEBUG, false);
    if (!(dbg && *dbg) && log_use_file("/dev/null") < 0)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_query_ipv4),  cmocka_unit_test(test_query_ipv6),
        cmocka_unit_test(test_dual_stack),  cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_batch),       cmocka_unit_test(test_stats_answered),
        cmocka_unit_test(test_port_in_use), cmocka_unit_test(test_bad_addresses),
        cmocka_unit_test(test_timeout),     cmocka_unit_test(test_fake_answers),
        cmocka_unit_test(test_query_on_the_loop),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    log_close();
    return rc;
}
