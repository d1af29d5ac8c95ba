/*
 * transport_bench: what our TLS transport (common/conn.c) costs on this
 * machine, over 127.0.0.1, with both ends in this one process and thread.
 *
 *  - connection setups per second: TCP connect, TLS 1.3 handshake with mutual
 *    certificate authentication, the hello exchange both ways, clean close;
 *  - optionally (--baseline) the same with plain GnuTLS calls and no event
 *    loop, framing or hello, to see what our layer adds;
 *  - memory per idle connection: N connections held open, growth of the
 *    resident set and of the malloc heap divided by N.
 *
 * It makes its own throw-away CA in a temporary directory (Ed25519 keys, like
 * the overlay's) and removes it at the end. docs/benchmarks.md has figures.
 */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "conn.h"
#include "cred.h"
#include "log.h"

#define OVERLAY  "bench.example"
#define PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3"

struct files {
    char dir[128];
    char ca[192], srv_crt[192], srv_key[192], cli_crt[192], cli_key[192];
};

static void die(const char *what)
{
    fprintf(stderr, "transport_bench: %s\n", what);
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---- Throw-away CA ------------------------------------------------------------------------ */

static void issue_leaf(gnutls_x509_privkey_t ca_key, gnutls_x509_crt_t ca_crt, const char *name,
                       const char *crt_path, const char *key_path)
{
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    if (cred_keygen(&key) < 0)
        die("keygen failed");
    gnutls_pubkey_t pub;
    if (cred_pubkey(key, &pub) < 0)
        die("cannot derive a public key");
    char uri[64];
    nid_t id;
    snprintf(uri, sizeof(uri), "sip:%s@" OVERLAY, name);
    if (nid_random(&id) < 0)
        die("no randomness");
    time_t now = time(NULL);
    struct cred_issue_params p = {.cn = name,
                                  .uri = uri,
                                  .node_id = &id,
                                  .roles = ROLE_NODE | ROLE_SUPERNODE,
                                  .server_auth = true,
                                  .client_auth = true,
                                  .not_before = now - 60,
                                  .not_after = now + 86400};
    if (cred_issue(pub, ca_key, ca_crt, &p, &crt) < 0 || cred_cert_save(crt, crt_path) < 0 ||
        cred_key_save(key, key_path) < 0)
        die("cannot issue a certificate");
    gnutls_x509_crt_deinit(crt);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_privkey_deinit(key);
}

static void make_ca(struct files *f)
{
    snprintf(f->dir, sizeof(f->dir), "/tmp/p2pbench.XXXXXX");
    if (!mkdtemp(f->dir))
        die("cannot create a temporary directory");
    snprintf(f->ca, sizeof(f->ca), "%s/ca.pem", f->dir);
    snprintf(f->srv_crt, sizeof(f->srv_crt), "%s/srv.crt", f->dir);
    snprintf(f->srv_key, sizeof(f->srv_key), "%s/srv.key", f->dir);
    snprintf(f->cli_crt, sizeof(f->cli_crt), "%s/cli.crt", f->dir);
    snprintf(f->cli_key, sizeof(f->cli_key), "%s/cli.key", f->dir);

    gnutls_x509_privkey_t ca_key = NULL;
    gnutls_x509_crt_t ca_crt = NULL;
    if (cred_keygen(&ca_key) < 0)
        die("keygen failed");
    gnutls_pubkey_t pub;
    if (cred_pubkey(ca_key, &pub) < 0)
        die("cannot derive a public key");
    time_t now = time(NULL);
    struct cred_issue_params p = {
        .cn = "bench CA", .is_ca = true, .not_before = now - 60, .not_after = now + 86400};
    if (cred_issue(pub, ca_key, NULL, &p, &ca_crt) < 0 || cred_cert_save(ca_crt, f->ca) < 0)
        die("cannot make the CA");
    issue_leaf(ca_key, ca_crt, "server", f->srv_crt, f->srv_key);
    issue_leaf(ca_key, ca_crt, "client", f->cli_crt, f->cli_key);
    gnutls_pubkey_deinit(pub);
    gnutls_x509_crt_deinit(ca_crt);
    gnutls_x509_privkey_deinit(ca_key);
}

static void remove_ca(const struct files *f)
{
    unlink(f->ca);
    unlink(f->srv_crt);
    unlink(f->srv_key);
    unlink(f->cli_crt);
    unlink(f->cli_key);
    rmdir(f->dir);
}

static struct tls_ctx *make_ctx(const struct files *f, bool server)
{
    struct tls_config cfg = {.ca_file = f->ca,
                             .cert_file = server ? f->srv_crt : f->cli_crt,
                             .key_file = server ? f->srv_key : f->cli_key,
                             .overlay = OVERLAY,
                             .handshake_timeout_ms = 30000,
                             /* One client address and one certificate open thousands of
                              * links here: lift the listener's per-source bounds. */
                             .max_handshaking = 1000000,
                             .max_handshaking_per_addr = 1000000,
                             .max_links_per_identity = 1000000};
    char err[256];
    struct tls_ctx *ctx = tls_ctx_new(&cfg, err, sizeof(err));
    if (!ctx)
        die(err);
    return ctx;
}

/* ---- Our transport ------------------------------------------------------------------------ */

struct run {
    struct ev_loop *loop;
    struct tls_ctx *sctx, *cctx;
    struct listener *l;
    char addr[64];
    /* handshake phase */
    double deadline;
    int parallel, in_flight;
    long opened, failed;
    bool close_on_open;
    /* memory phase */
    int target, started, open_pairs, srv_open;
    struct conn **held;
};

static void start_one(struct run *r);

static void cli_open(struct conn *c, void *ud)
{
    struct run *r = ud;
    r->opened++;
    if (r->close_on_open)
        conn_close(c);
    else
        r->held[r->open_pairs++] = c;
}

static void cli_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
    struct run *r = ud;
    r->in_flight--;
    if (why != CONN_CLOSED_LOCAL) {
        r->failed++;
        if (r->failed <= 3)
            fprintf(stderr, "transport_bench: connection failed: %s\n", detail);
    }
    if (r->close_on_open && now_s() < r->deadline)
        start_one(r);
}

static void srv_open(struct conn *c, void *ud)
{
    struct run *r = ud;
    r->srv_open++;
}

static void srv_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
    struct run *r = ud;
    r->srv_open -= conn_peer(c) ? 1 : 0;
}

static const struct conn_cbs cli_cbs = {.on_open = cli_open, .on_close = cli_close};
static const struct conn_cbs srv_cbs = {.on_open = srv_open, .on_close = srv_close};

static void start_one(struct run *r)
{
    char err[256];
    struct conn *c = conn_connect(r->loop, r->cctx, r->addr, &cli_cbs, r, err, sizeof(err));
    if (!c)
        die(err);
    r->in_flight++;
    r->started++;
}

static void run_init(struct run *r, const struct files *f)
{
    memset(r, 0, sizeof(*r));
    r->loop = ev_loop_new(EVFLAG_AUTO);
    r->sctx = make_ctx(f, true);
    r->cctx = make_ctx(f, false);
    char err[256];
    r->l = conn_listen(r->loop, r->sctx, "127.0.0.1:0", &srv_cbs, r, err, sizeof(err));
    if (!r->l)
        die(err);
    snprintf(r->addr, sizeof(r->addr), "127.0.0.1:%d", listener_port(r->l));
}

static void run_free(struct run *r)
{
    /* Let closing connections finish before the loop goes. */
    double until = now_s() + 5;
    while ((r->in_flight > 0 || r->srv_open > 0) && now_s() < until)
        ev_run(r->loop, EVRUN_ONCE);
    listener_free(r->l);
    tls_ctx_free(r->sctx);
    tls_ctx_free(r->cctx);
    ev_loop_destroy(r->loop);
    free(r->held);
}

struct rate {
    long n;
    double wall, cpu;
};

static struct rate bench_ours(const struct files *f, double seconds, int parallel)
{
    struct run r;
    run_init(&r, f);
    r.close_on_open = true;
    r.parallel = parallel;
    /* Warm-up: the first handshakes pay for lazy initialisation. */
    r.deadline = now_s() + 0.3;
    for (int i = 0; i < parallel; i++)
        start_one(&r);
    while (r.in_flight > 0)
        ev_run(r.loop, EVRUN_ONCE);

    r.opened = 0;
    double t0 = now_s(), c0 = cpu_s();
    r.deadline = t0 + seconds;
    for (int i = 0; i < parallel; i++)
        start_one(&r);
    while (r.in_flight > 0)
        ev_run(r.loop, EVRUN_ONCE);
    struct rate out = {r.opened, now_s() - t0, cpu_s() - c0};
    if (r.failed)
        fprintf(stderr, "transport_bench: %ld connections failed\n", r.failed);
    run_free(&r);
    return out;
}

/* ---- Plain GnuTLS baseline ---------------------------------------------------------------- */

static gnutls_session_t plain_session(gnutls_certificate_credentials_t xcred,
                                      gnutls_priority_t prio, bool server, int fd)
{
    static gnutls_typed_vdata_st want_server = {.type = GNUTLS_DT_KEY_PURPOSE_OID,
                                                .data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER};
    static gnutls_typed_vdata_st want_client = {.type = GNUTLS_DT_KEY_PURPOSE_OID,
                                                .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT};
    gnutls_session_t s;
    if (gnutls_init(&s, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK |
                            GNUTLS_NO_SIGNAL | GNUTLS_NO_TICKETS) < 0 ||
        gnutls_priority_set(s, prio) < 0 ||
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, xcred) < 0)
        die("gnutls_init failed");
    if (server)
        gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert2(s, server ? &want_client : &want_server, 1, 0);
    gnutls_transport_set_int(s, fd);
    return s;
}

static gnutls_certificate_credentials_t plain_cred(const struct files *f, bool server)
{
    gnutls_certificate_credentials_t x;
    if (gnutls_certificate_allocate_credentials(&x) < 0 ||
        gnutls_certificate_set_x509_trust_file(x, f->ca, GNUTLS_X509_FMT_PEM) <= 0 ||
        gnutls_certificate_set_x509_key_file2(x, server ? f->srv_crt : f->cli_crt,
                                              server ? f->srv_key : f->cli_key, GNUTLS_X509_FMT_PEM,
                                              NULL, GNUTLS_PKCS_PLAIN) < 0)
        die("cannot load credentials for the baseline");
    return x;
}

/* Moves one record of `len` bytes from a to b, driving both non-blocking sessions. */
static void plain_transfer(gnutls_session_t a, gnutls_session_t b, const char *msg, size_t len)
{
    char buf[256];
    ssize_t n;
    while ((n = gnutls_record_send(a, msg, len)) == GNUTLS_E_AGAIN)
        ;
    if (n != (ssize_t)len)
        die("baseline send failed");
    while ((n = gnutls_record_recv(b, buf, sizeof(buf))) == GNUTLS_E_AGAIN)
        ;
    if (n != (ssize_t)len)
        die("baseline receive failed");
}

/*
 * Sequential connections: TCP connect + accept, both handshakes driven in
 * turn, one small record each way (as our hello), close_notify, close.
 */
static struct rate bench_plain(const struct files *f, double seconds)
{
    gnutls_certificate_credentials_t sx = plain_cred(f, true), cx = plain_cred(f, false);
    gnutls_priority_t prio;
    if (gnutls_priority_init(&prio, PRIORITY, NULL) < 0)
        die("priority");
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    socklen_t sl = sizeof(sin);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) < 0 || listen(lfd, 64) < 0 ||
        getsockname(lfd, (struct sockaddr *)&sin, &sl) < 0)
        die("baseline listen failed");

    const char hello[] = "{\"v\":1,\"type\":\"hello\"}";
    struct rate out = {0, 0, 0};
    double t0 = 0, c0 = 0, warm_until = now_s() + 0.3, deadline = 0;
    bool warm = true;
    for (;;) {
        double t = now_s();
        if (warm && t >= warm_until) {
            warm = false;
            t0 = t;
            c0 = cpu_s();
            deadline = t0 + seconds;
        } else if (!warm && t >= deadline) {
            break;
        }
        int cfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(cfd, (struct sockaddr *)&sin, sizeof(sin)) < 0 && errno != EINPROGRESS)
            die("baseline connect failed");
        int afd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (afd < 0)
            die("baseline accept failed");
        setsockopt(afd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        gnutls_session_t cs = plain_session(cx, prio, false, cfd);
        gnutls_session_t ss = plain_session(sx, prio, true, afd);
        int rc = 1, rs = 1;
        while (rc != 0 || rs != 0) {
            if (rc != 0) {
                rc = gnutls_handshake(cs);
                if (rc < 0 && gnutls_error_is_fatal(rc))
                    die(gnutls_strerror(rc));
            }
            if (rs != 0) {
                rs = gnutls_handshake(ss);
                if (rs < 0 && gnutls_error_is_fatal(rs))
                    die(gnutls_strerror(rs));
            }
        }
        plain_transfer(cs, ss, hello, sizeof(hello) - 1);
        plain_transfer(ss, cs, hello, sizeof(hello) - 1);
        gnutls_bye(cs, GNUTLS_SHUT_WR);
        gnutls_bye(ss, GNUTLS_SHUT_WR);
        gnutls_deinit(cs);
        gnutls_deinit(ss);
        close(cfd);
        close(afd);
        if (!warm)
            out.n++;
    }
    out.wall = now_s() - t0;
    out.cpu = cpu_s() - c0;
    close(lfd);
    gnutls_priority_deinit(prio);
    gnutls_certificate_free_credentials(sx);
    gnutls_certificate_free_credentials(cx);
    return out;
}

/* ---- Memory per idle connection ----------------------------------------------------------- */

static long rss_kib(void)
{
    FILE *fp = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (fp && fgets(line, sizeof(line), fp))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    if (fp)
        fclose(fp);
    return kib;
}

static size_t heap_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

static int raise_fd_limit(int want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return 1024;
    if (rl.rlim_cur < (rlim_t)want) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)want ? rl.rlim_max : (rlim_t)want;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    return (int)rl.rlim_cur;
}

struct mem {
    int n;
    long rss_kib;
    size_t heap;
    double setup_s;
};

static struct mem bench_memory(const struct files *f, int n, int parallel)
{
    struct run r;
    run_init(&r, f);
    r.held = calloc((size_t)n, sizeof(*r.held));
    if (!r.held)
        die("out of memory");
    /* Warm up so that one-time allocations do not count as per-connection. */
    r.close_on_open = true;
    r.deadline = 0;
    for (int i = 0; i < 8; i++)
        start_one(&r);
    while (r.in_flight > 0 || r.srv_open > 0)
        ev_run(r.loop, EVRUN_ONCE);
    r.close_on_open = false;
    r.started = 0;
    malloc_trim(0);
    long rss0 = rss_kib();
    size_t heap0 = heap_bytes();
    double t0 = now_s();

    while (r.open_pairs < n || r.srv_open < n) {
        while (r.started < n && r.started - r.open_pairs < parallel)
            start_one(&r);
        ev_run(r.loop, EVRUN_ONCE);
        if (r.failed)
            die("a connection failed while opening the idle set");
    }
    struct mem out = {n, rss_kib() - rss0, heap_bytes() - heap0, now_s() - t0};
    for (int i = 0; i < r.open_pairs; i++)
        conn_close(r.held[i]);
    run_free(&r);
    return out;
}

/* ---- Main --------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: transport_bench [options]\n"
            "Measures the TLS transport on 127.0.0.1, both ends in this process.\n"
            "  -n, --connections N  idle connections held for the memory figure (2000)\n"
            "  -s, --seconds S      seconds per handshake measurement (5)\n"
            "  -p, --parallel P     connection setups in flight at once (1)\n"
            "  -b, --baseline       also measure plain GnuTLS handshakes (same certificates)\n"
            "  -r, --rounds R       repeat the handshake measurements R times, print medians (1)\n"
            "  -h, --help           this text\n");
}

static void print_rate(const char *label, const struct rate *r)
{
    printf("%-44s %10ld %10.2f %12.1f %12.1f\n", label, r->n, r->wall, r->n / r->wall,
           r->cpu > 0 ? r->n / r->cpu : 0);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void cpu_model(char *buf, size_t len)
{
    FILE *fp = fopen("/proc/cpuinfo", "r");
    char line[256];
    snprintf(buf, len, "unknown CPU");
    while (fp && fgets(line, sizeof(line), fp)) {
        char *colon = strchr(line, ':');
        if (!strncmp(line, "model name", 10) && colon) {
            snprintf(buf, len, "%s", colon + 2);
            buf[strcspn(buf, "\n")] = '\0';
            break;
        }
    }
    if (fp)
        fclose(fp);
}

int main(int argc, char **argv)
{
    int n = 2000, parallel = 1, rounds = 1;
    double seconds = 5;
    bool baseline = false;
    static const struct option opts[] = {{"connections", required_argument, NULL, 'n'},
                                         {"seconds", required_argument, NULL, 's'},
                                         {"parallel", required_argument, NULL, 'p'},
                                         {"baseline", no_argument, NULL, 'b'},
                                         {"rounds", required_argument, NULL, 'r'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "n:s:p:br:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'n':
            n = atoi(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'p':
            parallel = atoi(optarg);
            break;
        case 'b':
            baseline = true;
            break;
        case 'r':
            rounds = atoi(optarg);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (n < 0 || parallel < 1 || seconds <= 0 || rounds < 1) {
        fprintf(stderr, "transport_bench: --connections >= 0, --parallel >= 1, --seconds > 0, "
                        "--rounds >= 1\n");
        return 2;
    }
    log_init("transport_bench", LL_ERROR, false);

    int limit = raise_fd_limit(2 * n + 64);
    if (2 * n + 64 > limit) {
        int fit = (limit - 64) / 2;
        fprintf(stderr, "transport_bench: file descriptor limit %d allows %d connections, not %d\n",
                limit, fit, n);
        n = fit > 0 ? fit : 0;
    }

    struct files f;
    make_ca(&f);
    char cpu[128];
    cpu_model(cpu, sizeof(cpu));
    printf("transport_bench: TLS 1.3 (%s), Ed25519 certificates, mutual authentication\n",
           PRIORITY);
    printf("machine: %ld online CPUs, %s; GnuTLS %s\n", sysconf(_SC_NPROCESSORS_ONLN), cpu,
           gnutls_check_version(NULL));
    printf("both ends run in this one thread: a rate counts client and server work together\n\n");

    printf("%-44s %10s %10s %12s %12s\n", "connection setups", "count", "wall s", "per wall s",
           "per CPU s");
    char label[64];
    snprintf(label, sizeof(label), "ours: connect+TLS+hello+close, parallel %d", parallel);
    double *r_ours = calloc((size_t)rounds, sizeof(double));
    double *r_plain = calloc((size_t)rounds, sizeof(double));
    double *r_ratio = calloc((size_t)rounds, sizeof(double));
    if (!r_ours || !r_plain || !r_ratio)
        die("out of memory");
    /* Rounds alternate ours and plain so that a noisy neighbour hits both alike. */
    for (int i = 0; i < rounds; i++) {
        if (rounds > 1)
            printf("round %d\n", i + 1);
        struct rate ours = bench_ours(&f, seconds, parallel);
        r_ours[i] = ours.n / ours.wall;
        print_rate(label, &ours);
        if (baseline) {
            struct rate plain = bench_plain(&f, seconds);
            r_plain[i] = plain.n / plain.wall;
            r_ratio[i] = r_ours[i] / r_plain[i];
            print_rate("plain GnuTLS: connect+TLS+1 record each way", &plain);
            printf("%-44s %10s %10s %12.2f\n", "ratio ours / plain", "", "", r_ratio[i]);
        }
    }
    if (rounds > 1) {
        printf("%-44s %10s %10s %12s\n", "medians over rounds", "", "", "per wall s");
        printf("%-44s %10s %10s %12.1f\n", label, "", "", median(r_ours, rounds));
        if (baseline) {
            printf("%-44s %10s %10s %12.1f\n", "plain GnuTLS", "", "", median(r_plain, rounds));
            printf("%-44s %10s %10s %12.2f\n", "ratio ours / plain (median of rounds)", "", "",
                   median(r_ratio, rounds));
        }
    }
    free(r_ours);
    free(r_plain);
    free(r_ratio);

    if (n > 0) {
        struct mem m = bench_memory(&f, n, parallel < 64 ? 64 : parallel);
        printf("\n%-44s %10s %12s %12s\n", "idle connections (both ends in process)", "count",
               "KiB total", "KiB each");
        printf("%-44s %10d %12ld %12.1f\n", "RSS growth per connection pair", m.n, m.rss_kib,
               (double)m.rss_kib / m.n);
        printf("%-44s %10d %12ld %12.1f\n", "  estimate per side (half a pair)", m.n, m.rss_kib,
               (double)m.rss_kib / m.n / 2);
        printf("%-44s %10d %12zu %12.1f\n", "heap in use (mallinfo2) per pair", m.n, m.heap / 1024,
               (double)m.heap / 1024 / m.n);
        printf("%-44s %10d %12zu %12.1f\n", "  estimate per side (half a pair)", m.n, m.heap / 1024,
               (double)m.heap / 1024 / m.n / 2);
        printf("(opening the %d pairs took %.2f s; kernel socket buffers are not included)\n", m.n,
               m.setup_s);
    }
    remove_ca(&f);
    return 0;
}
