/* Media anchoring between this node's phones and other nodes' (media.h). */
#include "media.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/crypto.h>

#include "chan.h"
#include "conn.h"
#include "config.h"
#include "log.h"
#include "nodeid.h"
#include "sdp.h"

#define LOGM          "media"
#define DEF_PORT_MIN  20000u
#define DEF_PORT_MAX  29999u
#define DEF_MAX_CALLS 64u
#define DEF_MAX_KBPS  2000u
#define DEF_IDLE_S    120u
#define DEF_CALL_KBPS 200u
#define BUCKETS       1024u
#define SWEEP_S       5.0
#define READ_BURST    32 /* datagrams read per wake-up of a socket */
#define PKT_MAX       1500u

/* One direction of one stream: counters and RTP loss (RFC 3550 A.1, A.3). */
struct flow {
    uint64_t packets, bytes, rtp;
    bool started;
    uint16_t max_seq;
    uint32_t cycles;
    uint32_t base;
};

/* A rate limit: bytes per second over a second. */
struct bucket {
    double tokens, at;
};

struct mstream {
    struct msession *s;
    unsigned idx;
    unsigned port; /* ours, RTP; RTCP is port + 1 */
    int fd[2];
    ev_io io[2];
    /* the phone: what its SDP says, and where its packets came from */
    struct sockaddr_storage sdp[2], latched[2];
    socklen_t sdp_len[2], latched_len[2];
    bool has_sdp, is_latched[2];
    char sdp_ip[64];
    struct flow from_phone, to_phone;
    char type[16];
    unsigned leg; /* 0, or 1: the second phone of a call between two phones of ours */
};

struct msession {
    struct msession *next, *id_next, *all_next, **all_pprev;
    struct media *md;
    char call_id[128];
    char peer[NID_HEX_LEN + 1], peer_sn[NID_HEX_LEN + 1];
    uint16_t my_id, peer_id; /* frames to us carry my_id; ours to the peer carry peer_id */
    char sig_ip[64];         /* the phone's signalling address */
    struct mstream *st[SDP_MAX_MEDIA];
    /* A call between two phones of ours (a front end's, both maybe behind NATs): relayed from
     * one's sockets to the other's; leg 0 is where the INVITE came from. */
    bool local;
    char leg_addr[2][64];
    char sig_ip_b[64];
    struct mstream *st_b[SDP_MAX_MEDIA];
    double created, last_pkt;
    struct bucket up, down;
};

struct media {
    struct ev_loop *loop;
    struct media_params p;
    char host[64];
    bool wildcard, loopback;
    struct msession *by_call[BUCKETS], *by_id[BUCKETS], *all;
    size_t n;
    uint16_t next_id;
    ev_timer sweep;
    uint64_t calls, refused, relay_refused, ended_idle, bad_sdp;
    uint64_t dropped_source, dropped_rate, dropped_unknown, dropped_nochannel, dropped_nowhere,
        dropped_oversize;
    uint64_t pkts_from_phone, pkts_to_phone, bytes_from_phone, bytes_to_phone, lost_to_phone;
};

/* ---- small helpers ----------------------------------------------------------------------- */

static size_t hash_str(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h % BUCKETS;
}

static void host_of(const char *hostport, char *out, size_t len)
{
    unsigned port;
    if (cfg_parse_hostport(hostport, out, len, &port) != 0)
        out[0] = 0;
}

static int make_addr(const char *ip, unsigned port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *len = sizeof(*a4);
        return 0;
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*a6);
        return 0;
    }
    return -1;
}

static void addr_ip(const struct sockaddr_storage *ss, char *out, size_t len)
{
    if (ss->ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, out, (socklen_t)len);
    else if (ss->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, out, (socklen_t)len);
    else
        snprintf(out, len, "?");
}

static unsigned addr_port(const struct sockaddr_storage *ss)
{
    return ss->ss_family == AF_INET ? ntohs(((const struct sockaddr_in *)ss)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

static bool is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
    return ss->ss_family == AF_INET6 &&
           IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)ss)->sin6_addr);
}

static bool take(struct bucket *b, double now, double rate, size_t n)
{
    b->tokens += (now - b->at) * rate;
    b->at = now;
    if (b->tokens > rate)
        b->tokens = rate; /* a second's worth at most */
    if (b->tokens < (double)n)
        return false;
    b->tokens -= (double)n;
    return true;
}

/* Counts packet p (len bytes) of stream component k into f; RTP sequence numbers for loss. */
static void count(struct flow *f, unsigned k, const uint8_t *p, size_t len)
{
    f->packets++;
    f->bytes += len;
    if (k != 0 || len < 12 || (p[0] >> 6) != 2 || ((p[1] & 0x7f) >= 72 && (p[1] & 0x7f) <= 76))
        return; /* RTCP (on its own port or muxed), or no RTP */
    uint16_t seq = (uint16_t)(p[2] << 8 | p[3]);
    f->rtp++;
    if (!f->started) {
        f->started = true;
        f->base = seq;
        f->max_seq = seq;
        return;
    }
    uint16_t delta = (uint16_t)(seq - f->max_seq);
    if (delta > 0 && delta < 0x8000) {
        if (seq < f->max_seq)
            f->cycles += 65536;
        f->max_seq = seq;
    }
}

static uint64_t flow_lost(const struct flow *f)
{
    if (!f->started)
        return 0;
    uint64_t expected = (uint64_t)f->cycles + f->max_seq - f->base + 1;
    return expected > f->rtp ? expected - f->rtp : 0;
}

static double flow_loss(const struct flow *f)
{
    if (!f->started)
        return 0;
    uint64_t expected = (uint64_t)f->cycles + f->max_seq - f->base + 1;
    return expected ? (double)flow_lost(f) / (double)expected : 0;
}

/* ---- sessions ------------------------------------------------------------------------------ */

static struct msession *find_call(struct media *md, const char *call_id)
{
    for (struct msession *s = md->by_call[hash_str(call_id)]; s; s = s->next)
        if (!strcmp(s->call_id, call_id))
            return s;
    return NULL;
}

static struct msession *find_id(struct media *md, uint16_t id)
{
    for (struct msession *s = md->by_id[id % BUCKETS]; s; s = s->id_next)
        if (s->my_id == id)
            return s;
    return NULL;
}

static void stream_free(struct media *md, struct mstream *st)
{
    for (int k = 0; k < 2; k++)
        if (st->fd[k] >= 0) {
            ev_io_stop(md->loop, &st->io[k]);
            close(st->fd[k]);
        }
    free(st);
}

static void session_free(struct msession *s)
{
    struct media *md = s->md;
    for (struct msession **pp = &md->by_call[hash_str(s->call_id)]; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    for (struct msession **pp = &md->by_id[s->my_id % BUCKETS]; *pp; pp = &(*pp)->id_next)
        if (*pp == s) {
            *pp = s->id_next;
            break;
        }
    *s->all_pprev = s->all_next;
    if (s->all_next)
        s->all_next->all_pprev = s->all_pprev;
    md->n--;
    for (size_t i = 0; i < SDP_MAX_MEDIA; i++)
        for (int l = 0; l < 2; l++) {
            struct mstream *st = l ? s->st_b[i] : s->st[i];
            if (st) {
                md->lost_to_phone += flow_lost(&st->to_phone);
                stream_free(md, st);
            }
        }
    free(s);
}

static void session_end(struct msession *s, const char *why)
{
    uint64_t in = 0, out = 0;
    for (size_t i = 0; i < SDP_MAX_MEDIA; i++)
        if (s->st[i])
            in += s->st[i]->to_phone.packets, out += s->st[i]->from_phone.packets;
    log_info(LOGM,
             "call %.40s with %.8s: media released (%s) after %.0f s, %llu packets "
             "from the phone, %llu to it",
             s->call_id, s->local ? "a phone" : s->peer, why, ev_now(s->md->loop) - s->created,
             (unsigned long long)out, (unsigned long long)in);
    session_free(s);
}

static struct msession *session_new(struct media *md, const char *call_id, const char *peer,
                                    const char *peer_sn, const char **reason)
{
    if (md->n >= md->p.max_calls) {
        md->refused++;
        log_warn(LOGM, "call %.40s refused: %zu calls have media here already (media_max_calls)",
                 call_id, md->n);
        *reason = "Media Capacity Exhausted";
        return NULL;
    }
    struct msession *s = calloc(1, sizeof(*s));
    if (!s) {
        *reason = "Out Of Memory";
        return NULL;
    }
    s->md = md;
    snprintf(s->call_id, sizeof(s->call_id), "%s", call_id);
    snprintf(s->peer, sizeof(s->peer), "%s", peer);
    snprintf(s->peer_sn, sizeof(s->peer_sn), "%s", peer_sn);
    do
        s->my_id = ++md->next_id ? md->next_id : ++md->next_id;
    while (find_id(md, s->my_id));
    s->created = s->last_pkt = ev_now(md->loop);
    s->up.at = s->down.at = s->created;
    size_t b = hash_str(call_id);
    s->next = md->by_call[b];
    md->by_call[b] = s;
    s->id_next = md->by_id[s->my_id % BUCKETS];
    md->by_id[s->my_id % BUCKETS] = s;
    s->all_next = md->all;
    if (md->all)
        md->all->all_pprev = &s->all_next;
    s->all_pprev = &md->all;
    md->all = s;
    md->n++;
    md->calls++;
    return s;
}

/* A new call with node `peer`: 0 when the relay its channel goes through (if any) has room for
 * one more call of call_kbps, else 503 with *reason. */
static int relay_room(struct media *md, const char *peer, const char *call_id, const char **reason)
{
    struct chan_path cp;
    if (!md->p.chans || !chans_path(md->p.chans, peer, &cp) || !cp.open || !cp.relayed ||
        !cp.relay_kbps)
        return 0;
    unsigned n = 0;
    for (const struct msession *s = md->all; s; s = s->all_next)
        n += !s->local && !strcmp(s->peer, peer);
    if ((uint64_t)(n + 1) * md->p.call_kbps <= cp.relay_kbps)
        return 0;
    md->refused++, md->relay_refused++;
    log_warn(LOGM,
             "call %.40s refused: the relay between us and node %.8s (super node %.8s, %u kbit/s) "
             "carries %u calls of %u kbit/s already",
             call_id, peer, cp.relay_sn, cp.relay_kbps, n, md->p.call_kbps);
    *reason = "Relay Capacity Exhausted";
    return 503;
}

/* ---- packets --------------------------------------------------------------------------------- */

static const char *leg_ip(const struct mstream *st)
{
    return st->leg ? st->s->sig_ip_b : st->s->sig_ip;
}

/* Where packets for st's phone go (component k): where its packets came from, else the address
 * its SDP names when we may trust it; NULL: nowhere yet. */
static const struct sockaddr_storage *phone_dest(const struct mstream *st, unsigned k,
                                                 socklen_t *len)
{
    if (st->is_latched[k]) {
        *len = st->latched_len[k];
        return &st->latched[k];
    }
    if (st->has_sdp && (st->s->md->p.trust_sdp || !strcmp(st->sdp_ip, leg_ip(st)))) {
        *len = st->sdp_len[k];
        return &st->sdp[k];
    }
    return NULL;
}

/* Whether a packet from `src` on component k of st is the phone's (and latches it). */
static bool from_phone_ok(struct mstream *st, unsigned k, const struct sockaddr_storage *src)
{
    struct msession *s = st->s;
    if (st->is_latched[k] && conn_addr_equal(&st->latched[k], src))
        return true;
    char ip[64];
    addr_ip(src, ip, sizeof(ip));
    bool ok = !strcmp(ip, leg_ip(st)) || (st->sdp_ip[0] && !strcmp(ip, st->sdp_ip)) ||
              (!st->is_latched[k] && s->md->loopback && is_loopback(src));
    if (!ok)
        return false;
    if (!st->is_latched[k] || !conn_addr_equal(&st->latched[k], src)) {
        memcpy(&st->latched[k], src, sizeof(*src));
        st->latched_len[k] =
            src->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
        st->is_latched[k] = true;
    }
    return true;
}

static void phone_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    struct mstream *st = w->data;
    struct msession *s = st->s;
    struct media *md = s->md;
    unsigned k = w == &st->io[1];
    uint8_t buf[4 + PKT_MAX];
    double rate = md->p.max_kbps * 125.0;
    for (int i = 0; i < READ_BURST; i++) {
        struct sockaddr_storage src;
        socklen_t sl = sizeof(src);
        ssize_t n =
            recvfrom(st->fd[k], buf + 4, PKT_MAX, MSG_DONTWAIT, (struct sockaddr *)&src, &sl);
        if (n < 0)
            return;
        if (!from_phone_ok(st, k, &src)) {
            if (md->dropped_source++ % 1000 == 0) {
                char ip[64];
                addr_ip(&src, ip, sizeof(ip));
                log_warn(LOGM,
                         "call %.40s: a packet to port %u from %s:%u, not the phone's: "
                         "dropped",
                         s->call_id, st->port + k, ip, addr_port(&src));
            }
            continue;
        }
        double now = ev_now(loop);
        if (!take(st->leg ? &s->down : &s->up, now, rate, (size_t)n)) {
            md->dropped_rate++;
            continue;
        }
        s->last_pkt = now;
        count(&st->from_phone, k, buf + 4, (size_t)n);
        md->pkts_from_phone++, md->bytes_from_phone += (uint64_t)n;
        if (s->local) { /* to the other phone, from its own socket */
            struct mstream *o = st->leg ? s->st[st->idx] : s->st_b[st->idx];
            socklen_t tl = 0;
            const struct sockaddr_storage *to = o && o->fd[k] >= 0 ? phone_dest(o, k, &tl) : NULL;
            if (!to) {
                md->dropped_nowhere++;
                continue;
            }
            count(&o->to_phone, k, buf + 4, (size_t)n);
            md->pkts_to_phone++, md->bytes_to_phone += (uint64_t)n;
            (void)sendto(o->fd[k], buf + 4, (size_t)n, MSG_DONTWAIT, (const struct sockaddr *)to,
                         tl);
            continue;
        }
        if (!s->peer_id) {
            md->dropped_nowhere++; /* the other node's answer has not come yet */
            continue;
        }
        if (4 + (size_t)n > CHAN_MEDIA_MAX) {
            md->dropped_oversize++; /* more than a channel's record carries */
            continue;
        }
        buf[0] = (uint8_t)(s->peer_id >> 8);
        buf[1] = (uint8_t)s->peer_id;
        buf[2] = (uint8_t)(st->idx << 1 | k);
        buf[3] = 0;
        if (chans_send_media(md->p.chans, s->peer, buf, 4 + (size_t)n) != 0) {
            md->dropped_nochannel++;
            struct chan_path cp;
            if (!chans_path(md->p.chans, s->peer, &cp)) /* it closed or failed: a new one */
                chans_open(md->p.chans, s->peer, s->peer_sn);
        }
    }
}

void media_frame(struct media *md, const char *node, const uint8_t *frame, size_t len)
{
    if (!md || len <= 4)
        return;
    uint16_t id = (uint16_t)(frame[0] << 8 | frame[1]);
    unsigned idx = frame[2] >> 1, k = frame[2] & 1;
    struct msession *s = find_id(md, id);
    struct mstream *st = s && idx < SDP_MAX_MEDIA ? s->st[idx] : NULL;
    if (!s || s->local || strcmp(s->peer, node) != 0 || !st || st->fd[k] < 0) {
        if (md->dropped_unknown++ % 1000 == 0)
            log_info(LOGM,
                     "a media frame from node %.8s for call %u stream %u that it is not in: "
                     "dropped",
                     node, id, idx);
        return;
    }
    socklen_t tl = 0;
    const struct sockaddr_storage *to = phone_dest(st, k, &tl);
    if (!to) {
        md->dropped_nowhere++; /* a phone behind NAT that has not sent yet */
        return;
    }
    double now = ev_now(md->loop);
    if (!take(&s->down, now, md->p.max_kbps * 125.0, len - 4)) {
        md->dropped_rate++;
        return;
    }
    s->last_pkt = now;
    count(&st->to_phone, k, frame + 4, len - 4);
    md->pkts_to_phone++, md->bytes_to_phone += len - 4;
    (void)sendto(st->fd[k], frame + 4, len - 4, MSG_DONTWAIT, (const struct sockaddr *)to, tl);
}

/* ---- sockets ------------------------------------------------------------------------------- */

static int bind_udp(const char *host, unsigned port)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    if (make_addr(host, port, &ss, &sl) != 0)
        return -1;
    int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&ss, sl) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The stream's RTP/RTCP pair on an even port of the range. */
static int stream_bind(struct media *md, struct mstream *st)
{
    unsigned lo = md->p.port_min + (md->p.port_min & 1), hi = md->p.port_max;
    unsigned pairs = hi > lo ? (hi - lo) / 2 : 0;
    if (!pairs)
        return -1;
    uint32_t r;
    gnutls_rnd(GNUTLS_RND_NONCE, &r, sizeof(r));
    for (unsigned i = 0; i < 64 && i < pairs; i++) {
        unsigned port = lo + 2 * ((r + i * 7919u) % pairs);
        int a = bind_udp(md->host, port);
        if (a < 0)
            continue;
        int b = bind_udp(md->host, port + 1);
        if (b < 0) {
            close(a);
            continue;
        }
        st->fd[0] = a, st->fd[1] = b;
        st->port = port;
        for (int k = 0; k < 2; k++) {
            ev_io_init(&st->io[k], phone_cb, st->fd[k], EV_READ);
            st->io[k].data = st;
            ev_io_start(md->loop, &st->io[k]);
        }
        return 0;
    }
    return -1;
}

static struct mstream *stream_get(struct msession *s, unsigned leg, unsigned idx, const char *type)
{
    struct mstream **slot = leg ? &s->st_b[idx] : &s->st[idx];
    if (!*slot) {
        struct mstream *st = calloc(1, sizeof(*st));
        if (!st)
            return NULL;
        st->s = s;
        st->idx = idx;
        st->leg = leg;
        st->fd[0] = st->fd[1] = -1;
        *slot = st;
    }
    snprintf((*slot)->type, sizeof((*slot)->type), "%s", type);
    return *slot;
}

/* The address the phone at phone_ip reaches us at: ours, or with a wildcard socket the local
 * address the route to the phone uses. */
static void advertised(struct media *md, const char *phone_ip, char *out, size_t len)
{
    snprintf(out, len, "%s", md->host);
    if (!md->wildcard)
        return;
    struct sockaddr_storage ss, me;
    socklen_t sl, ml = sizeof(me);
    if (make_addr(phone_ip, 9, &ss, &sl) != 0)
        return;
    int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    if (connect(fd, (struct sockaddr *)&ss, sl) == 0 &&
        getsockname(fd, (struct sockaddr *)&me, &ml) == 0)
        addr_ip(&me, out, len);
    close(fd);
}

/* ---- SDP through the proxy ----------------------------------------------------------------- */

static int replace_body(osip_message_t *m, osip_body_t *b, char *text, size_t n)
{
    char *copy = osip_malloc(n + 1);
    if (!copy)
        return -1;
    memcpy(copy, text, n + 1);
    osip_free(b->body);
    b->body = copy;
    b->length = n;
    if (m->content_length) {
        osip_content_length_free(m->content_length);
        m->content_length = NULL;
    }
    char cl[24];
    snprintf(cl, sizeof(cl), "%zu", n);
    osip_message_set_content_length(m, cl);
    osip_message_force_update(m);
    return 0;
}

static bool is_sdp(const osip_message_t *m)
{
    const osip_content_type_t *ct = m->content_type;
    return ct && ct->type && ct->subtype && !strcasecmp(ct->type, "application") &&
           !strcasecmp(ct->subtype, "sdp");
}

/* Where st's phone receives, as its SDP says (m: its m-line). */
static void note_sdp(struct mstream *st, const struct sdp_media *m)
{
    st->has_sdp = false;
    if (!m->port || !m->addr[0] || !strcmp(m->addr, "0.0.0.0") || !strcmp(m->addr, "::"))
        return; /* refused, or on hold the old way: nothing to send to */
    unsigned rtcp = m->rtcp_port ? m->rtcp_port : m->rtcp_mux ? m->port : m->port + 1;
    if (make_addr(m->addr, m->port, &st->sdp[0], &st->sdp_len[0]) == 0 &&
        make_addr(m->addr, rtcp, &st->sdp[1], &st->sdp_len[1]) == 0) {
        st->has_sdp = true;
        snprintf(st->sdp_ip, sizeof(st->sdp_ip), "%s", m->addr);
    }
}

/* Body b of m replaced by the rewrite e of it: 0, or 503 with *reason. */
static int rewrite(osip_message_t *m, osip_body_t *b, const struct sdp_edit *e, const char **reason)
{
    size_t n;
    char *text = sdp_rewrite(b->body, b->length, e, &n);
    int rc = text ? replace_body(m, b, text, n) : -1;
    free(text);
    if (rc != 0) {
        *reason = "Out Of Memory";
        return 503;
    }
    return 0;
}

/* Whether `from` is the party at `addr` (a phone sends from the port it registered from over
 * UDP; over TCP from any port of its host). */
static bool same_phone(const char *addr, const struct sip_source *from)
{
    if (!from->tcp)
        return !strcmp(addr, from->addr);
    char a[64], b[64];
    host_of(addr, a, sizeof(a));
    host_of(from->addr, b, sizeof(b));
    return a[0] && !strcmp(a, b);
}

/* An SDP between two phones of ours (a front end's): each is handed the other's media on a port
 * of the side facing it, and what it sends there goes to the other from the other's side. */
static int between_phones(struct media *md, osip_message_t *m, osip_body_t *b,
                          const struct sdp_info *in, const struct sip_source *from,
                          const struct sip_source *to, const char **reason)
{
    const char *cid = m->call_id->number;
    struct msession *s = find_call(md, cid);
    if (s && !s->local)
        return 0; /* a call with a node that uses this Call-ID too: not ours to relay */
    if (!s) {
        if (!(s = session_new(md, cid, "", "", reason)))
            return 503;
        s->local = true;
        snprintf(s->leg_addr[0], sizeof(s->leg_addr[0]), "%s", from->addr);
        snprintf(s->leg_addr[1], sizeof(s->leg_addr[1]), "%s", to->addr);
        host_of(from->addr, s->sig_ip, sizeof(s->sig_ip));
        host_of(to->addr, s->sig_ip_b, sizeof(s->sig_ip_b));
    }
    unsigned x = same_phone(s->leg_addr[0], from) ? 0 : same_phone(s->leg_addr[1], from) ? 1 : 2;
    if (x == 2)
        return 0; /* neither of the call's phones: its SDP passes as it is */
    struct sdp_edit e = {.drop_rtcp = true, .drop_ice = true, .drop_mark = true};
    for (size_t i = 0; i < in->n_media; i++) {
        struct mstream *sx = stream_get(s, x, (unsigned)i, in->m[i].type);
        struct mstream *sy = stream_get(s, 1 - x, (unsigned)i, in->m[i].type);
        if (!sx || !sy) {
            *reason = "Out Of Memory";
            return 503;
        }
        note_sdp(sx, &in->m[i]);
        if (!in->m[i].port)
            continue;
        if (sy->fd[0] < 0 && stream_bind(md, sy) != 0) {
            *reason = "No Media Ports";
            md->refused++;
            return 503;
        }
        e.port[i] = sy->port;
    }
    char addr[64];
    advertised(md, x ? s->sig_ip : s->sig_ip_b, addr, sizeof(addr));
    e.addr = addr;
    return rewrite(m, b, &e, reason);
}

/* The phone's SDP, on its way to the node: where the phone receives; our marker added. */
static int to_node(struct media *md, osip_message_t *m, osip_body_t *b, const struct sdp_info *in,
                   const struct sip_source *from, const struct sip_source *to, const char **reason)
{
    const char *cid = m->call_id->number;
    struct msession *s = find_call(md, cid);
    if (s && strcmp(s->peer, to->node) != 0) {
        session_end(s, "the call went to another node");
        s = NULL;
    }
    int rc;
    if (!s && (rc = relay_room(md, to->node, cid, reason)) != 0)
        return rc;
    if (!s && !(s = session_new(md, cid, to->node, to->sn, reason)))
        return 503;
    host_of(from->addr, s->sig_ip, sizeof(s->sig_ip));
    for (size_t i = 0; i < in->n_media; i++) {
        struct mstream *st = stream_get(s, 0, (unsigned)i, in->m[i].type);
        if (!st) {
            *reason = "Out Of Memory";
            return 503;
        }
        note_sdp(st, &in->m[i]);
        /* Bound now, so that the other phone's first packets, which may overtake the answer
         * that names these ports to ours, reach it already. */
        if (in->m[i].port && st->fd[0] < 0 && stream_bind(md, st) != 0) {
            log_warn(LOGM, "call %.40s: no free pair of media ports in %u-%u on %s", cid,
                     md->p.port_min, md->p.port_max, md->host);
            *reason = "No Media Ports";
            md->refused++;
            return 503;
        }
    }
    struct sdp_edit e = {.drop_mark = true, .mark = s->my_id};
    return rewrite(m, b, &e, reason);
}

/* The other node's SDP, on its way to our phone: our address and ports instead of its. */
static int to_phone(struct media *md, osip_message_t *m, osip_body_t *b, const struct sdp_info *in,
                    const struct sip_source *from, const struct sip_source *to, const char **reason)
{
    const char *cid = m->call_id->number;
    struct msession *s = find_call(md, cid);
    if (s && strcmp(s->peer, from->node) != 0) {
        session_end(s, "the call came from another node");
        s = NULL;
    }
    int rc;
    if (!s && (rc = relay_room(md, from->node, cid, reason)) != 0)
        return rc;
    if (!s && !(s = session_new(md, cid, from->node, from->sn, reason)))
        return 503;
    s->peer_id = (uint16_t)in->mark;
    host_of(to->addr, s->sig_ip, sizeof(s->sig_ip));
    struct sdp_edit e = {.drop_rtcp = true, .drop_ice = true, .drop_mark = true};
    for (size_t i = 0; i < in->n_media; i++) {
        struct mstream *st = stream_get(s, 0, (unsigned)i, in->m[i].type);
        if (!st) {
            *reason = "Out Of Memory";
            return 503;
        }
        if (!in->m[i].port)
            continue;
        if (st->fd[0] < 0 && stream_bind(md, st) != 0) {
            log_warn(LOGM, "call %.40s: no free pair of media ports in %u-%u on %s", cid,
                     md->p.port_min, md->p.port_max, md->host);
            *reason = "No Media Ports";
            md->refused++;
            return 503;
        }
        e.port[i] = st->port;
    }
    char addr[64];
    advertised(md, s->sig_ip, addr, sizeof(addr));
    e.addr = addr;
    rc = rewrite(m, b, &e, reason);
    if (rc != 0)
        return rc;
    if (md->p.chans && !chans_path(md->p.chans, s->peer, &(struct chan_path){0}))
        chans_open(md->p.chans, s->peer, s->peer_sn); /* its SIP came through the overlay */
    return 0;
}

int media_sip(struct media *md, osip_message_t *m, const struct sip_source *from,
              const struct sip_source *to, const char **reason)
{
    if (!md || !m->call_id || !m->call_id->number)
        return 0;
    /* Towards a node: one on a channel, or one whose offer came with its marker. */
    bool up = !from->node[0] && to->node[0] && (to->chan || find_call(md, m->call_id->number));
    bool down = from->node[0] && !to->node[0];
    bool local = md->p.local && !from->node[0] && !to->node[0];
    if (!up && !down && !local)
        return 0;
    osip_body_t *b = NULL;
    if (!is_sdp(m) || osip_message_get_body(m, 0, &b) < 0 || !b || !b->body)
        return 0;
    struct sdp_info in;
    char err[200];
    if (sdp_scan(b->body, b->length, &in, err, sizeof(err)) != 0) {
        md->bad_sdp++;
        log_info(LOGM, "call %.40s: SDP from %s: %s", m->call_id->number, from->addr, err);
        *reason = "Unreadable SDP";
        return 488;
    }
    if (local)
        return between_phones(md, m, b, &in, from, to, reason);
    if (up)
        return to_node(md, m, b, &in, from, to, reason);
    if (!in.mark)
        return 0; /* the other node does not anchor: the phones' own addresses */
    return to_phone(md, m, b, &in, from, to, reason);
}

void media_end(struct media *md, const char *call_id)
{
    struct msession *s = md && call_id ? find_call(md, call_id) : NULL;
    if (s)
        session_end(s, "the call ended");
}

/* ---- life and status ------------------------------------------------------------------------ */

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct media *md = w->data;
    double now = ev_now(loop);
    for (struct msession *s = md->all, *next; s; s = next) {
        next = s->all_next;
        if (now - s->last_pkt > md->p.idle_s) {
            md->ended_idle++;
            session_end(s, "no packets either way");
        }
    }
}

struct media *media_new(struct ev_loop *loop, const struct media_params *p, char *err,
                        size_t errlen)
{
    struct media *md = calloc(1, sizeof(*md));
    if (!md) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    md->loop = loop;
    md->p = *p;
    if (!md->p.port_min && !md->p.port_max)
        md->p.port_min = DEF_PORT_MIN, md->p.port_max = DEF_PORT_MAX;
    if (!md->p.max_calls)
        md->p.max_calls = DEF_MAX_CALLS;
    if (!md->p.max_kbps)
        md->p.max_kbps = DEF_MAX_KBPS;
    if (!md->p.idle_s)
        md->p.idle_s = DEF_IDLE_S;
    if (!md->p.call_kbps)
        md->p.call_kbps = DEF_CALL_KBPS;
    snprintf(md->host, sizeof(md->host), "%s", p->host ? p->host : "0.0.0.0");
    struct sockaddr_storage ss;
    socklen_t sl;
    if (make_addr(md->host, 0, &ss, &sl) != 0) {
        snprintf(err, errlen, "media address %s is no IP address", md->host);
        free(md);
        return NULL;
    }
    if (md->p.port_max < md->p.port_min + 3 || md->p.port_max > 65535 || md->p.port_min < 1024) {
        snprintf(err, errlen, "media ports %u-%u: need at least two pairs within 1024-65535",
                 md->p.port_min, md->p.port_max);
        free(md);
        return NULL;
    }
    md->wildcard = !strcmp(md->host, "0.0.0.0") || !strcmp(md->host, "::");
    md->loopback = is_loopback(&ss);
    gnutls_rnd(GNUTLS_RND_NONCE, &md->next_id, sizeof(md->next_id));
    ev_timer_init(&md->sweep, sweep_cb, SWEEP_S, SWEEP_S);
    md->sweep.data = md;
    ev_timer_start(loop, &md->sweep);
    ev_unref(loop); /* calls keep nothing running at shutdown */
    return md;
}

static json_t *flow_json(const struct flow *f)
{
    return json_pack("{s:I,s:I,s:I,s:f}", "packets", (json_int_t)f->packets, "bytes",
                     (json_int_t)f->bytes, "lost", (json_int_t)flow_lost(f), "loss", flow_loss(f));
}

json_t *media_status(struct media *md)
{
    json_t *calls = json_array();
    double now = ev_now(md->loop);
    for (struct msession *s = md->all; s; s = s->all_next) {
        struct chan_path cp;
        bool have = !s->local && md->p.chans && chans_path(md->p.chans, s->peer, &cp);
        const char *path = s->local          ? "local"
                           : have && cp.open ? (cp.relayed ? "relayed" : "direct")
                                             : "none";
        char via[64];
        snprintf(via, sizeof(via), "super node %.8s", have ? cp.relay_sn : "");
        json_t *streams = json_array();
        for (size_t i = 0; i < 2 * SDP_MAX_MEDIA; i++) {
            struct mstream *st = i < SDP_MAX_MEDIA ? s->st[i] : s->st_b[i - SDP_MAX_MEDIA];
            if (!st)
                continue;
            char phone[80] = "";
            const struct sockaddr_storage *pa = st->is_latched[0] ? &st->latched[0]
                                                : st->has_sdp     ? &st->sdp[0]
                                                                  : NULL;
            if (pa) {
                char ip[64];
                addr_ip(pa, ip, sizeof(ip));
                snprintf(phone, sizeof(phone), strchr(ip, ':') ? "[%s]:%u" : "%s:%u", ip,
                         addr_port(pa));
            }
            json_array_append_new(streams, json_pack("{s:i,s:i,s:s,s:i,s:s,s:b,s:o,s:o}", "index",
                                                     (int)st->idx, "leg", (int)st->leg, "media",
                                                     st->type, "port", (int)st->port, "phone",
                                                     phone, "latched", st->is_latched[0],
                                                     "from_phone", flow_json(&st->from_phone),
                                                     "to_phone", flow_json(&st->to_phone)));
        }
        json_t *c = json_pack("{s:s,s:o,s:s,s:f,s:o}", "call_id", s->call_id, "peer",
                              s->local ? json_null() : json_string(s->peer), "path", path, "age_s",
                              now - s->created, "streams", streams);
        json_object_set_new(c, "via",
                            have && cp.open && cp.relayed && cp.relay_sn[0] ? json_string(via)
                                                                            : json_null());
        json_array_append_new(calls, c);
    }
    return json_pack(
        "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:s,s:i,s:i,s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I}}", "active",
        (json_int_t)md->n, "max_calls", (json_int_t)md->p.max_calls, "calls_total",
        (json_int_t)md->calls, "refused", (json_int_t)md->refused, "relay_refused",
        (json_int_t)md->relay_refused, "call_kbps", (json_int_t)md->p.call_kbps, "max_kbps",
        (json_int_t)md->p.max_kbps, "address", md->host, "port_min", (int)md->p.port_min,
        "port_max", (int)md->p.port_max, "calls", calls, "dropped", "not_the_phone",
        (json_int_t)md->dropped_source, "over_rate", (json_int_t)md->dropped_rate, "unknown_call",
        (json_int_t)md->dropped_unknown, "no_channel", (json_int_t)md->dropped_nochannel,
        "oversize", (json_int_t)md->dropped_oversize, "nowhere_yet",
        (json_int_t)md->dropped_nowhere);
}

char *media_metrics(struct media *md)
{
    uint64_t lost = md->lost_to_phone;
    for (struct msession *s = md->all; s; s = s->all_next)
        for (size_t i = 0; i < SDP_MAX_MEDIA; i++) {
            if (s->st[i])
                lost += flow_lost(&s->st[i]->to_phone);
            if (s->st_b[i])
                lost += flow_lost(&s->st_b[i]->to_phone);
        }
    char *out = NULL;
    if (asprintf(&out,
                 "# TYPE p2p_media_calls gauge\np2p_media_calls %zu\n"
                 "# TYPE p2p_media_calls_total counter\np2p_media_calls_total %llu\n"
                 "# TYPE p2p_media_refused_total counter\np2p_media_refused_total %llu\n"
                 "# TYPE p2p_media_relay_refused_total counter\n"
                 "p2p_media_relay_refused_total %llu\n"
                 "# TYPE p2p_media_packets_total counter\n"
                 "p2p_media_packets_total{dir=\"from_phone\"} %llu\n"
                 "p2p_media_packets_total{dir=\"to_phone\"} %llu\n"
                 "# TYPE p2p_media_bytes_total counter\n"
                 "p2p_media_bytes_total{dir=\"from_phone\"} %llu\n"
                 "p2p_media_bytes_total{dir=\"to_phone\"} %llu\n"
                 "# TYPE p2p_media_lost_total counter\np2p_media_lost_total{dir=\"to_phone\"} "
                 "%llu\n"
                 "# TYPE p2p_media_dropped_total counter\n"
                 "p2p_media_dropped_total{why=\"not_the_phone\"} %llu\n"
                 "p2p_media_dropped_total{why=\"over_rate\"} %llu\n"
                 "p2p_media_dropped_total{why=\"unknown_call\"} %llu\n"
                 "p2p_media_dropped_total{why=\"no_channel\"} %llu\n"
                 "p2p_media_dropped_total{why=\"nowhere_yet\"} %llu\n"
                 "p2p_media_dropped_total{why=\"oversize\"} %llu\n",
                 md->n, (unsigned long long)md->calls, (unsigned long long)md->refused,
                 (unsigned long long)md->relay_refused, (unsigned long long)md->pkts_from_phone,
                 (unsigned long long)md->pkts_to_phone, (unsigned long long)md->bytes_from_phone,
                 (unsigned long long)md->bytes_to_phone, (unsigned long long)lost,
                 (unsigned long long)md->dropped_source, (unsigned long long)md->dropped_rate,
                 (unsigned long long)md->dropped_unknown, (unsigned long long)md->dropped_nochannel,
                 (unsigned long long)md->dropped_nowhere,
                 (unsigned long long)md->dropped_oversize) < 0)
        return NULL;
    return out;
}

int media_settings_params(const struct media_settings *ms, const char *default_host,
                          struct media_params *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    unsigned lo, hi;
    char extra;
    if (!ms->ports || sscanf(ms->ports, "%u-%u%c", &lo, &hi, &extra) != 2 || lo < 1024 ||
        hi > 65535 || hi < lo + 3) {
        snprintf(err, errlen,
                 "media_ports \"%.40s\": want min-max within 1024-65535, room for two pairs",
                 ms->ports ? ms->ports : "");
        return -1;
    }
    out->host = ms->address ? ms->address : default_host;
    out->port_min = lo, out->port_max = hi;
    out->max_calls = (unsigned)ms->max_calls;
    out->max_kbps = (unsigned)ms->max_kbps;
    out->idle_s = (unsigned)ms->idle_s;
    out->call_kbps = (unsigned)ms->call_kbps;
    return 0;
}

struct media *media_start(struct ev_loop *loop, const struct media_settings *ms,
                          const char *sip_listen, struct chans *cs, bool trust_sdp, bool local,
                          char *err, size_t errlen)
{
    struct media_params mp;
    char host[64] = "0.0.0.0";
    unsigned port;
    if (sip_listen)
        cfg_parse_hostport(sip_listen, host, sizeof(host), &port);
    if (media_settings_params(ms, host, &mp, err, errlen) != 0)
        return NULL;
    mp.chans = cs;
    mp.trust_sdp = trust_sdp;
    mp.local = local;
    char why[256];
    struct media *md = media_new(loop, &mp, why, sizeof(why));
    if (!md) {
        snprintf(err, errlen, "media: %s", why);
        return NULL;
    }
    log_info(LOGM, "calls with other nodes%s have their media through %s, ports %u-%u, at most %u",
             local ? " and between two phones here" : "", mp.host, mp.port_min, mp.port_max,
             mp.max_calls);
    return md;
}

void media_free(struct media *md)
{
    if (!md)
        return;
    while (md->all)
        session_free(md->all);
    ev_ref(md->loop);
    ev_timer_stop(md->loop, &md->sweep);
    free(md);
}
