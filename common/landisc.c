/*
 * LAN service location (landisc.h, docs/protocol.md section 6). One UDP
 * socket per side; datagrams are single JSON objects:
 *   query  {"v":1, "type":"discover", "overlay":"<name>", "tid":"<16 hex>"}
 *   answer {"v":1, "type":"here", "overlay":"<name>", "tid":"<the query's>",
 *           "sn":{"id":"<40 hex>", "addr":"host:port"}}
 */
#include "landisc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "errbuf.h"
#include "log.h"
#include "msg.h"

#define LOGM "lan"

/* "a.b.c.d:port" into a sockaddr; the address must be IPv4. */
static int parse_v4(const char *hostport, struct sockaddr_in *sa)
{
    char host[64];
    unsigned port = 0;
    if (cfg_parse_hostport(hostport, host, sizeof(host), &port) != 0)
        return -1;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

static bool hex_ok(const char *s, size_t n)
{
    if (!s || strlen(s) != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

/* Parses a datagram of `type` for `overlay`; NULL when it is anything else. */
static json_t *parse_dgram(const char *buf, size_t len, const char *type, const char *overlay)
{
    json_t *j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *v = json_object_get(j, "v");
    const char *t = json_string_value(json_object_get(j, "type"));
    const char *ov = json_string_value(json_object_get(j, "overlay"));
    const char *tid = json_string_value(json_object_get(j, "tid"));
    if (!json_is_integer(v) || json_integer_value(v) != 1 || !t || strcmp(t, type) != 0 || !ov ||
        strcmp(ov, overlay) != 0 || !hex_ok(tid, MSG_TID_LEN)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

/* ---- responder ---------------------------------------------------------------------------- */

struct landisc_responder {
    struct ev_loop *loop;
    int fd;
    ev_io io;
    char *overlay;
    landisc_self_fn self;
    void *ud;
    double tokens, last;
    unsigned long long seen, answered, dropped;
};

static void responder_read(struct ev_loop *loop, ev_io *w, int revents)
{
    struct landisc_responder *r = w->data;
    for (int burst = 0; burst < 64; burst++) {
        char buf[LANDISC_MAX_DGRAM + 1];
        struct sockaddr_in from;
        socklen_t flen = sizeof(from);
        ssize_t n = recvfrom(r->fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
        if (n < 0)
            return; /* EAGAIN, or an error the next datagram will show again */
        r->seen++;
        char who[64];
        inet_ntop(AF_INET, &from.sin_addr, who, sizeof(who));
        if (n > LANDISC_MAX_DGRAM) {
            r->dropped++;
            log_info(LOGM, "%s:%u: oversize query dropped", who, ntohs(from.sin_port));
            continue;
        }
        json_t *q = parse_dgram(buf, (size_t)n, "discover", r->overlay);
        if (!q) {
            r->dropped++;
            log_debug(LOGM, "%s:%u: not a discover query of overlay %s: dropped", who,
                      ntohs(from.sin_port), r->overlay);
            continue;
        }
        /* A token bucket: the responder cannot be turned into a flood (answers go to whatever
         * source address the query claims). */
        double now = ev_now(loop);
        r->tokens += (now - r->last) * LANDISC_RATE;
        if (r->tokens > LANDISC_RATE)
            r->tokens = LANDISC_RATE;
        r->last = now;
        struct landisc_sn me;
        if (r->tokens < 1.0 || r->self(r->ud, &me) != 0) {
            if (r->tokens < 1.0)
                r->dropped++;
            json_decref(q);
            continue;
        }
        r->tokens -= 1.0;
        json_t *a = json_pack("{s:i,s:s,s:s,s:O,s:{s:s,s:s}}", "v", 1, "type", "here", "overlay",
                              r->overlay, "tid", json_object_get(q, "tid"), "sn", "id", me.id,
                              "addr", me.addr);
        char *text = a ? json_dumps(a, JSON_COMPACT) : NULL;
        if (text && sendto(r->fd, text, strlen(text), 0, (struct sockaddr *)&from, flen) >= 0) {
            r->answered++;
            log_debug(LOGM, "answered a discover query from %s:%u", who, ntohs(from.sin_port));
        }
        free(text);
        json_decref(a);
        json_decref(q);
    }
}

struct landisc_responder *landisc_responder_start(struct ev_loop *loop, const char *group,
                                                  const char *iface, const char *overlay,
                                                  landisc_self_fn self, void *ud, char *err,
                                                  size_t errlen)
{
    struct sockaddr_in ga, ia;
    if (parse_v4(group, &ga) != 0 || !IN_MULTICAST(ntohl(ga.sin_addr.s_addr))) {
        errbuf_set(err, errlen, -1, "LAN discovery group %s is not an IPv4 multicast host:port",
                   group);
        return NULL;
    }
    if (inet_pton(AF_INET, iface, &ia.sin_addr) != 1) {
        errbuf_set(err, errlen, -1, "LAN discovery interface %s is not an IPv4 address", iface);
        return NULL;
    }
    struct landisc_responder *r = calloc(1, sizeof(*r));
    if (!r || !(r->overlay = strdup(overlay))) {
        free(r);
        errbuf_set(err, errlen, -1, "out of memory");
        return NULL;
    }
    r->loop = loop;
    r->self = self;
    r->ud = ud;
    r->tokens = LANDISC_RATE;
    r->last = ev_now(loop);
    int one = 1;
    struct ip_mreq mr = {.imr_multiaddr = ga.sin_addr, .imr_interface = ia.sin_addr};
    r->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (r->fd < 0 || setsockopt(r->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(r->fd, (struct sockaddr *)&ga, sizeof(ga)) != 0 ||
        setsockopt(r->fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof(mr)) != 0) {
        errbuf_set(err, errlen, -1, "LAN discovery on %s via %s: %s", group, iface,
                   strerror(errno));
        landisc_responder_stop(r);
        return NULL;
    }
    ev_io_init(&r->io, responder_read, r->fd, EV_READ);
    r->io.data = r;
    ev_io_start(loop, &r->io);
    log_info(LOGM, "answering LAN discovery queries on %s via %s", group, iface);
    return r;
}

void landisc_responder_stats(const struct landisc_responder *r, unsigned long long *seen,
                             unsigned long long *answered, unsigned long long *dropped)
{
    *seen = r ? r->seen : 0;
    *answered = r ? r->answered : 0;
    *dropped = r ? r->dropped : 0;
}

void landisc_responder_stop(struct landisc_responder *r)
{
    if (!r)
        return;
    if (r->fd >= 0) {
        ev_io_stop(r->loop, &r->io);
        close(r->fd);
    }
    free(r->overlay);
    free(r);
}

/* ---- query -------------------------------------------------------------------------------- */

struct landisc_query {
    struct ev_loop *loop;
    int fd;
    ev_io io;
    ev_timer timer;
    char overlay[256];
    char tid[MSG_TID_LEN + 1];
    struct landisc_sn found[LANDISC_MAX_ANSWERS];
    size_t n;
    char err[256];
    landisc_done_fn done;
    void *ud;
};

static void query_free(struct landisc_query *q)
{
    if (q->fd >= 0) {
        ev_io_stop(q->loop, &q->io);
        close(q->fd);
    }
    ev_timer_stop(q->loop, &q->timer);
    free(q);
}

static void query_read(struct ev_loop *loop, ev_io *w, int revents)
{
    struct landisc_query *q = w->data;
    for (int burst = 0; burst < 64; burst++) {
        char buf[LANDISC_MAX_DGRAM + 1];
        struct sockaddr_in from;
        socklen_t flen = sizeof(from);
        ssize_t n = recvfrom(q->fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
        if (n < 0)
            return;
        char who[64];
        inet_ntop(AF_INET, &from.sin_addr, who, sizeof(who));
        json_t *a = n <= LANDISC_MAX_DGRAM ? parse_dgram(buf, (size_t)n, "here", q->overlay) : NULL;
        const char *tid = json_string_value(json_object_get(a, "tid"));
        json_t *sn = json_object_get(a, "sn");
        const char *id = json_string_value(json_object_get(sn, "id"));
        const char *addr = json_string_value(json_object_get(sn, "addr"));
        if (!a || strcmp(tid, q->tid) != 0 || !hex_ok(id, 40) || !addr ||
            strlen(addr) >= sizeof(q->found[0].addr) ||
            cfg_parse_hostport(addr, NULL, 0, NULL) != 0) {
            log_info(LOGM, "%s:%u: malformed or unrelated answer to our discover query: ignored",
                     who, ntohs(from.sin_port));
            json_decref(a);
            continue;
        }
        bool dup = false;
        for (size_t i = 0; i < q->n && !dup; i++)
            dup = !strcmp(q->found[i].addr, addr);
        if (!dup && q->n < LANDISC_MAX_ANSWERS) {
            snprintf(q->found[q->n].id, sizeof(q->found[0].id), "%s", id);
            snprintf(q->found[q->n].addr, sizeof(q->found[0].addr), "%s", addr);
            q->n++;
        }
        json_decref(a);
    }
}

static void query_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct landisc_query *q = w->data;
    landisc_done_fn done = q->done;
    void *ud = q->ud;
    struct landisc_sn found[LANDISC_MAX_ANSWERS];
    size_t n = q->n;
    char err[256];
    memcpy(found, q->found, sizeof(found));
    memcpy(err, q->err, sizeof(err));
    query_free(q);
    done(ud, found, n, err);
}

struct landisc_query *landisc_query_start(struct ev_loop *loop, const char *group,
                                          const char *iface, const char *overlay,
                                          unsigned timeout_ms, landisc_done_fn done, void *ud)
{
    struct landisc_query *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->loop = loop;
    q->fd = -1;
    q->done = done;
    q->ud = ud;
    snprintf(q->overlay, sizeof(q->overlay), "%s", overlay);
    msg_new_tid(q->tid);
    ev_timer_init(&q->timer, query_timeout, (double)timeout_ms / 1000.0, 0.);
    q->timer.data = q;
    ev_timer_start(loop, &q->timer);

    struct sockaddr_in ga, ia;
    memset(&ia, 0, sizeof(ia));
    ia.sin_family = AF_INET;
    unsigned char ttl = 1, loopback = 1;
    json_t *j = json_pack("{s:i,s:s,s:s,s:s}", "v", 1, "type", "discover", "overlay", overlay,
                          "tid", q->tid);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (parse_v4(group, &ga) != 0 || !IN_MULTICAST(ntohl(ga.sin_addr.s_addr))) {
        snprintf(q->err, sizeof(q->err), "group %s is not an IPv4 multicast host:port", group);
    } else if (inet_pton(AF_INET, iface, &ia.sin_addr) != 1) {
        snprintf(q->err, sizeof(q->err), "interface %s is not an IPv4 address", iface);
    } else if (!text) {
        snprintf(q->err, sizeof(q->err), "out of memory");
    } else if ((q->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0 ||
               bind(q->fd, (struct sockaddr *)&ia, sizeof(ia)) != 0 ||
               setsockopt(q->fd, IPPROTO_IP, IP_MULTICAST_IF, &ia.sin_addr, sizeof(ia.sin_addr)) !=
                   0 ||
               setsockopt(q->fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof(ttl)) != 0 ||
               setsockopt(q->fd, IPPROTO_IP, IP_MULTICAST_LOOP, &loopback, sizeof(loopback)) != 0 ||
               sendto(q->fd, text, strlen(text), 0, (struct sockaddr *)&ga, sizeof(ga)) < 0) {
        snprintf(q->err, sizeof(q->err), "cannot send to %s via %s: %s", group, iface,
                 strerror(errno));
    } else {
        ev_io_init(&q->io, query_read, q->fd, EV_READ);
        q->io.data = q;
        ev_io_start(loop, &q->io);
    }
    free(text);
    if (q->err[0]) {
        if (q->fd >= 0) {
            close(q->fd);
            q->fd = -1;
        }
        ev_timer_stop(loop, &q->timer);
        ev_timer_set(&q->timer, 0., 0.);
        ev_timer_start(loop, &q->timer);
    }
    return q;
}

void landisc_query_cancel(struct landisc_query *q)
{
    if (q)
        query_free(q);
}
