/*
 * media_load: the load generator of bench/media_bench.py. It plays N concurrent "calls" of
 * RTP, 50 packets/s each way (20 ms of PCMU: a 12-byte RTP header and 160 bytes of payload),
 * either through a TURN relay or directly between two sockets of its own (the baseline the
 * relay's added latency is measured against), and measures loss and one-way latency of every
 * packet.
 *
 *  - relay mode: the caller side of each call is a socket the bench passed in (inherited file
 *    descriptor) with a TURN allocation and a channel bound to the callee socket (also passed
 *    in, one for all calls: the relay's work per packet is the same whatever the peer). The
 *    caller sends ChannelData to the TURN server; the callee sends plain UDP to the call's
 *    relayed address.
 *  - direct mode: the generator makes N caller sockets and one callee socket itself, and the
 *    packets go straight between them.
 *  - pairs mode (phones behind media-anchoring nodes, bench/node_media_bench.py): both sides
 *    of each call are sockets passed in, each with the address it sends to (what the SDP
 *    the other side's node sent named); one packet per send on both sides.
 *
 * Every packet carries the call, the direction, a sequence number and its send time
 * (CLOCK_REALTIME, read just before the send). Its arrival time is the kernel's receive
 * time stamp (SO_TIMESTAMPNS), so the time the generator takes to get round to reading a
 * socket is not counted as latency; how late the generator sent against the schedule is
 * reported separately (send lag). Callee-side sends and receives are batched (sendmmsg /
 * recvmmsg), so the generator costs less per packet than the relay does (one system call per
 * packet against the relay's two).
 *
 * Output: one JSON object on stdout.
 *
 *   media_load --mode relay --calls N --seconds S [--drain D] [--pps 50]
 *              --server IP:PORT --peer-fd FD --map FILE     (lines "fd channel relayip:port")
 *   media_load --mode direct --calls N --seconds S [--drain D] [--pps 50]
 *   media_load --mode pairs --calls N --seconds S [--drain D] [--pps 50]
 *              --map FILE                           (lines "fdA destA-ip:port fdB destB-ip:port")
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* recvmmsg, sendmmsg, epoll_pwait2 (the build defines it) */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define RTP_LEN  172 /* 12-byte RTP header + 160 bytes of PCMU (20 ms at 8 kHz) */
#define CD_HDR   4   /* ChannelData header */
#define MAGIC    0x4d4c4431u
#define BATCH    64    /* receive batch on the callee socket */
#define SBATCH   16    /* send batch of the callee (each send delivers synchronously on loopback) */
#define H_FINE   10000 /* 1 us buckets up to 10 ms */
#define H_COARSE 10000 /* then 100 us buckets up to ~1 s */
#define LAG_LATE 5000000LL /* a send more than 5 ms behind schedule counts as late */

struct call {
    int fd;                    /* caller socket */
    uint16_t chan;             /* relay mode */
    struct sockaddr_in dest;   /* where the callee sends this call's packets */
    int fd_b;                  /* pairs mode: the callee's socket of this call ... */
    struct sockaddr_in dest_a; /* ... and where the caller sends */
    uint8_t *seen[2];          /* bitmap of received sequence numbers, per direction */
};

struct dir_stats {
    uint64_t sent, recv, dup, bad;
    uint64_t hist[H_FINE + H_COARSE + 1];
    int64_t max_ns;
};

static struct call *calls;
static int ncalls;
static uint32_t npkts;         /* per call and direction */
static struct dir_stats st[2]; /* 0: caller -> callee, 1: callee -> caller */

static void die(const char *what)
{
    fprintf(stderr, "media_load: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* An RTP packet of call c, direction d, sequence seq, stamped now. */
static void fill_rtp(uint8_t *p, int c, int d, uint32_t seq)
{
    memset(p, 0xd5, RTP_LEN); /* PCMU silence */
    p[0] = 0x80;              /* V=2 */
    p[1] = 0;                 /* PT 0: PCMU */
    p[2] = seq >> 8;
    p[3] = seq;
    put32(p + 4, seq * 160);
    put32(p + 8, (uint32_t)c * 2 + d); /* SSRC */
    put32(p + 12, MAGIC);
    put32(p + 16, (uint32_t)c);
    put32(p + 20, seq);
    p[24] = (uint8_t)d;
}

static void stamp(uint8_t *p)
{
    int64_t t = now_ns(CLOCK_REALTIME);
    memcpy(p + 32, &t, sizeof t);
}

/* Sends the callee's batch, stamped now (so the batch's filling is not latency). */
static void flush_batch(int fd, struct mmsghdr *m, uint8_t (*bufs)[RTP_LEN], int *nb)
{
    if (!*nb)
        return;
    int64_t t = now_ns(CLOCK_REALTIME);
    for (int i = 0; i < *nb; i++)
        memcpy(bufs[i] + 32, &t, sizeof t);
    int s = sendmmsg(fd, m, (unsigned)*nb, 0);
    if (s < *nb)
        st[1].bad += (uint64_t)(*nb - (s < 0 ? 0 : s));
    *nb = 0;
}

static void account(const uint8_t *p, size_t n, const struct timespec *rx)
{
    if (n >= CD_HDR + RTP_LEN && p[0] >= 0x40 && p[0] <= 0x4f) { /* ChannelData */
        p += CD_HDR;
        n -= CD_HDR;
    }
    if (n != RTP_LEN || p[0] != 0x80 || get32(p + 12) != MAGIC || p[24] > 1) {
        st[0].bad++;
        return;
    }
    int d = p[24];
    uint32_t c = get32(p + 16), seq = get32(p + 20);
    if (c >= (uint32_t)ncalls || seq >= npkts) {
        st[d].bad++;
        return;
    }
    uint8_t *bm = calls[c].seen[d];
    if (bm[seq / 8] & (1u << (seq % 8))) {
        st[d].dup++;
        return;
    }
    bm[seq / 8] |= 1u << (seq % 8);
    st[d].recv++;
    int64_t sent;
    memcpy(&sent, p + 32, sizeof sent);
    int64_t arr = rx ? (int64_t)rx->tv_sec * 1000000000LL + rx->tv_nsec : now_ns(CLOCK_REALTIME);
    int64_t lat = arr - sent;
    if (lat < 0)
        lat = 0;
    if (lat > st[d].max_ns)
        st[d].max_ns = lat;
    int64_t us = lat / 1000;
    size_t b;
    if (us < H_FINE)
        b = (size_t)us;
    else if ((us - H_FINE) / 100 < H_COARSE)
        b = H_FINE + (size_t)((us - H_FINE) / 100);
    else
        b = H_FINE + H_COARSE;
    st[d].hist[b]++;
}

static const struct timespec *rx_stamp(struct msghdr *m)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS)
            return (const struct timespec *)CMSG_DATA(c);
    return NULL;
}

/* Percentile in microseconds (bucket's lower edge). */
static double pct_us(const struct dir_stats *s, double p)
{
    uint64_t n = 0;
    for (size_t i = 0; i <= H_FINE + H_COARSE; i++)
        n += s->hist[i];
    if (!n)
        return -1;
    uint64_t want = (uint64_t)(p / 100.0 * (double)(n - 1)), acc = 0;
    for (size_t i = 0; i <= H_FINE + H_COARSE; i++) {
        acc += s->hist[i];
        if (acc > want)
            return i < H_FINE ? (double)i : H_FINE + (double)(i - H_FINE) * 100.0;
    }
    return -1;
}

static void stamp_on(int fd)
{
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0)
        die("SO_TIMESTAMPNS");
}

static void big_rcvbuf(int fd, int bytes)
{
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

static int udp_socket(struct sockaddr_in *bound)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    socklen_t l = sizeof *bound;
    if (getsockname(fd, (struct sockaddr *)bound, &l) < 0)
        die("getsockname");
    return fd;
}

static int parse_addr(const char *s, struct sockaddr_in *a)
{
    char ip[64];
    unsigned port;
    if (sscanf(s, "%63[0-9.]:%u", ip, &port) != 2 || port > 65535)
        return -1;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, ip, &a->sin_addr) == 1 ? 0 : -1;
}

static void usage(void)
{
    fprintf(stderr, "usage: media_load --mode relay|direct|pairs --calls N --seconds S "
                    "[--drain D] [--pps P] [--server IP:PORT --peer-fd FD] [--map FILE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *mode = NULL, *map = NULL, *server = NULL;
    double seconds = 0, drain = 1.0;
    int pps = 50, peer_fd = -1;
    static const struct option opts[] = {
        {"mode", 1, 0, 'm'},    {"calls", 1, 0, 'n'}, {"seconds", 1, 0, 's'},
        {"drain", 1, 0, 'd'},   {"pps", 1, 0, 'p'},   {"server", 1, 0, 'S'},
        {"peer-fd", 1, 0, 'P'}, {"map", 1, 0, 'M'},   {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'm':
            mode = optarg;
            break;
        case 'n':
            ncalls = atoi(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'd':
            drain = atof(optarg);
            break;
        case 'p':
            pps = atoi(optarg);
            break;
        case 'S':
            server = optarg;
            break;
        case 'P':
            peer_fd = atoi(optarg);
            break;
        case 'M':
            map = optarg;
            break;
        default:
            usage();
        }
    }
    if (!mode || ncalls <= 0 || seconds <= 0 || pps <= 0 || pps > 1000)
        usage();
    int relay = strcmp(mode, "relay") == 0, pairs = strcmp(mode, "pairs") == 0;
    if (!relay && !pairs && strcmp(mode, "direct") != 0)
        usage();
    struct sockaddr_in srv = {0}, peer_addr;
    npkts = (uint32_t)(seconds * pps);
    calls = calloc((size_t)ncalls, sizeof *calls);
    if (!calls)
        die("calloc");
    for (int i = 0; i < ncalls; i++)
        for (int d = 0; d < 2; d++)
            if (!(calls[i].seen[d] = calloc(npkts / 8 + 1, 1)))
                die("calloc");
    if (relay) {
        if (!server || peer_fd < 0 || !map || parse_addr(server, &srv) < 0)
            usage();
        FILE *f = fopen(map, "r");
        if (!f)
            die(map);
        for (int i = 0; i < ncalls; i++) {
            int fd, ch;
            char rel[80];
            if (fscanf(f, "%d %d %79s", &fd, &ch, rel) != 3 ||
                parse_addr(rel, &calls[i].dest) < 0) {
                fprintf(stderr, "media_load: %s: line %d: want \"fd channel ip:port\"\n", map,
                        i + 1);
                return 2;
            }
            calls[i].fd = fd;
            calls[i].chan = (uint16_t)ch;
        }
        fclose(f);
        socklen_t l = sizeof peer_addr;
        if (getsockname(peer_fd, (struct sockaddr *)&peer_addr, &l) < 0)
            die("peer-fd");
    } else if (pairs) {
        if (!map)
            usage();
        FILE *f = fopen(map, "r");
        if (!f)
            die(map);
        for (int i = 0; i < ncalls; i++) {
            char da[80], db[80];
            if (fscanf(f, "%d %79s %d %79s", &calls[i].fd, da, &calls[i].fd_b, db) != 4 ||
                parse_addr(da, &calls[i].dest_a) < 0 || parse_addr(db, &calls[i].dest) < 0) {
                fprintf(stderr, "media_load: %s: line %d: want \"fdA ip:port fdB ip:port\"\n", map,
                        i + 1);
                return 2;
            }
        }
        fclose(f);
        peer_fd = -1;
    } else {
        peer_fd = udp_socket(&peer_addr);
        for (int i = 0; i < ncalls; i++)
            calls[i].fd = udp_socket(&calls[i].dest);
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    if (peer_fd >= 0) {
        big_rcvbuf(peer_fd, 16 << 20);
        stamp_on(peer_fd);
        if (epoll_ctl(ep, EPOLL_CTL_ADD, peer_fd, &ev) < 0)
            die("epoll_ctl");
    }
    for (int i = 0; i < ncalls && pairs; i++) {
        /* Not connected: a node may answer from another port than the one it named. */
        stamp_on(calls[i].fd);
        stamp_on(calls[i].fd_b);
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, calls[i].fd, &ev) < 0)
            die("epoll_ctl");
        ev.data.u32 = (uint32_t)i | 0x80000000u;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, calls[i].fd_b, &ev) < 0)
            die("epoll_ctl");
    }
    for (int i = 0; i < ncalls && !pairs; i++) {
        /* Connected: no route look-up per send, and only the server's (or callee's) packets. */
        if (connect(calls[i].fd, relay ? (struct sockaddr *)&srv : (struct sockaddr *)&peer_addr,
                    sizeof srv) < 0)
            die("connect");
        stamp_on(calls[i].fd);
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, calls[i].fd, &ev) < 0)
            die("epoll_ctl");
    }

    /* Schedule: per 20 ms period (1/pps), 2N evenly spaced events; event r < N is call r's
     * caller->callee packet, r >= N call r-N's callee->caller packet (half a period later). */
    const int64_t period = 1000000000LL / pps;
    const uint64_t per_period = 2ull * (uint64_t)ncalls, total = per_period * npkts;
    uint8_t cd[CD_HDR + RTP_LEN];
    static uint8_t bbuf[SBATCH][RTP_LEN], rbuf[BATCH][CD_HDR + RTP_LEN + 64];
    static char rctl[BATCH][CMSG_SPACE(sizeof(struct timespec)) + 64];
    static struct mmsghdr bm[SBATCH], rm[BATCH];
    static struct iovec biov[SBATCH], riov[BATCH];
    int nb = 0;
    uint64_t late = 0, e = 0;
    int64_t max_lag = 0;
    struct epoll_event evs[256];
    double cpu0 = cpu_s();
    const int64_t t0 = now_ns(CLOCK_MONOTONIC) + 20000000LL; /* start in 20 ms */
    const int64_t t_end_send = t0 + (int64_t)npkts * period;
    const int64_t t_end = t_end_send + (int64_t)(drain * 1e9);
    double cpu_send = -1;
    int64_t wall_send = 0;
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        while (e < total) {
            uint64_t k = e / per_period, r = e % per_period;
            int64_t due = t0 + (int64_t)k * period + (int64_t)(r * (uint64_t)period / per_period);
            if (due > now)
                break;
            if (now - due > max_lag)
                max_lag = now - due;
            if (now - due > LAG_LATE)
                late++;
            if (r < (uint64_t)ncalls) {
                int c = (int)r;
                uint8_t *p = cd;
                size_t n = RTP_LEN;
                if (pairs) {
                    fill_rtp(cd, c, 0, (uint32_t)k);
                    stamp(cd);
                    if (sendto(calls[c].fd, cd, n, 0, (struct sockaddr *)&calls[c].dest_a,
                               sizeof calls[c].dest_a) < 0)
                        st[0].bad++;
                    st[0].sent++;
                    e++;
                    continue;
                }
                if (relay) {
                    cd[0] = calls[c].chan >> 8;
                    cd[1] = calls[c].chan & 0xff;
                    cd[2] = 0;
                    cd[3] = RTP_LEN;
                    n += CD_HDR;
                    fill_rtp(cd + CD_HDR, c, 0, (uint32_t)k);
                    stamp(cd + CD_HDR);
                } else {
                    fill_rtp(cd, c, 0, (uint32_t)k);
                    stamp(cd);
                }
                if (send(calls[c].fd, p, n, 0) < 0) /* connected to the server or callee */
                    st[0].bad++;
                st[0].sent++;
            } else {
                int c = (int)(r - (uint64_t)ncalls);
                if (pairs) {
                    fill_rtp(cd, c, 1, (uint32_t)k);
                    stamp(cd);
                    if (sendto(calls[c].fd_b, cd, RTP_LEN, 0, (struct sockaddr *)&calls[c].dest,
                               sizeof calls[c].dest) < 0)
                        st[1].bad++;
                    st[1].sent++;
                    e++;
                    continue;
                }
                fill_rtp(bbuf[nb], c, 1, (uint32_t)k);
                biov[nb] = (struct iovec){bbuf[nb], RTP_LEN};
                bm[nb].msg_hdr = (struct msghdr){.msg_name = &calls[c].dest,
                                                 .msg_namelen = sizeof calls[c].dest,
                                                 .msg_iov = &biov[nb],
                                                 .msg_iovlen = 1};
                nb++;
                st[1].sent++;
            }
            e++;
            if (nb == SBATCH)
                flush_batch(peer_fd, bm, bbuf, &nb);
        }
        flush_batch(peer_fd, bm, bbuf, &nb);
        if (e >= total && cpu_send < 0) {
            cpu_send = cpu_s() - cpu0;
            wall_send = now - t0;
        }
        if (now >= t_end)
            break;
        /* Sleep until the next send is due, at least 500 us (pacing slack, not latency). */
        int64_t wait = t_end - now;
        if (e < total) {
            uint64_t k = e / per_period, r = e % per_period;
            wait = t0 + (int64_t)k * period + (int64_t)(r * (uint64_t)period / per_period) - now;
            if (wait < 500000)
                wait = 500000;
        }
        struct timespec to = {wait / 1000000000LL, wait % 1000000000LL};
        int n = epoll_pwait2(ep, evs, 256, &to, NULL);
        if (n < 0 && errno != EINTR)
            die("epoll_pwait2");
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            int fd = id == UINT32_MAX              ? peer_fd
                     : (id & 0x80000000u) && pairs ? calls[id & 0x7fffffffu].fd_b
                                                   : calls[id].fd;
            for (int j = 0; j < BATCH; j++) {
                riov[j] = (struct iovec){rbuf[j], sizeof rbuf[j]};
                rm[j].msg_hdr = (struct msghdr){.msg_iov = &riov[j],
                                                .msg_iovlen = 1,
                                                .msg_control = rctl[j],
                                                .msg_controllen = sizeof rctl[j]};
            }
            /* The callee socket holds many calls' packets: batch; a caller socket gets one
             * packet per 20 ms, so one read (level-triggered epoll brings it back if more). */
            int got = recvmmsg(fd, rm, id == UINT32_MAX ? BATCH : 1, MSG_DONTWAIT, NULL);
            for (int j = 0; j < got; j++)
                account(rbuf[j], rm[j].msg_len, rx_stamp(&rm[j].msg_hdr));
        }
    }
    double cpu_all = cpu_s() - cpu0;
    if (cpu_send < 0)
        cpu_send = cpu_all;
    printf("{\"mode\": \"%s\", \"calls\": %d, \"seconds\": %.3f, \"pps_per_call_dir\": %d, "
           "\"wall_send_s\": %.3f, \"gen_cpu_send_s\": %.3f, \"gen_cpu_all_s\": %.3f, "
           "\"send_lag_max_ms\": %.3f, \"late_sends\": %llu",
           mode, ncalls, seconds, pps, wall_send / 1e9, cpu_send, cpu_all, max_lag / 1e6,
           (unsigned long long)late);
    static const char *names[2] = {"ab", "ba"};
    for (int d = 0; d < 2; d++)
        printf(", \"%s\": {\"sent\": %llu, \"recv\": %llu, \"dup\": %llu, \"bad\": %llu, "
               "\"p50_us\": %.0f, \"p90_us\": %.0f, \"p99_us\": %.0f, \"max_us\": %.0f}",
               names[d], (unsigned long long)st[d].sent, (unsigned long long)st[d].recv,
               (unsigned long long)st[d].dup, (unsigned long long)st[d].bad, pct_us(&st[d], 50),
               pct_us(&st[d], 90), pct_us(&st[d], 99), st[d].max_ns / 1e3);
    printf("}\n");
    return 0;
}
