/* Channels between ordinary nodes: ICE (libnice) + DTLS (GnuTLS) + SIP (chan.h). */
#include "chan.h"

#include <agent.h>
#include <errno.h>
#include <stdarg.h>
#include <gnutls/dtls.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "conn.h"
#include "glibev.h"
#include "log.h"
#include "nodeid.h"

#define LOGM "chan"

#define DEF_SETUP_MS   10000u
#define DEF_IDLE_S     300u
#define DEF_MAX        64u
#define DEF_RETRY_S    60u
#define DTLS_MTU       1400u /* a media frame of CHAN_MEDIA_MAX and DTLS's 37 bytes fit */
#define MAX_WAITING    32u   /* SIP messages waiting for a channel to open */
#define MAX_WAIT_BYTES (256u * 1024u)
#define MAX_RX         32u /* datagrams waiting for GnuTLS */
#define MAX_PARTIAL    4u  /* messages being put together per channel */
#define MAX_CANDS      16u /* remote candidates taken from one offer or answer */
#define MAX_CAND_LEN   256u
#define MAX_CRED_LEN   256u
#define OFFER_GAP_S    1.0 /* a new offer from a peer at most this often */

enum ch_state { CH_GATHERING, CH_OFFERED, CH_CHECKING, CH_DTLS, CH_OPEN, CH_FAILED };
static const char *const state_names[] = {"gathering", "offered", "checking",
                                          "dtls",      "open",    "failed"};

struct outmsg {
    struct outmsg *next;
    size_t len;
    char text[];
};

struct rxdgram {
    size_t len;
    uint8_t *data;
};

struct partial {
    bool used;
    uint16_t msgno;
    uint8_t count;
    uint64_t have; /* bit per chunk */
    size_t len;    /* known once the last chunk came */
    double started;
    char *buf;
};

struct chan {
    struct chan *next;
    struct chans *cs;
    char peer[NID_HEX_LEN + 1], peer_sn[NID_HEX_LEN + 1];
    char id[17]; /* this ICE session, in the signalling */
    bool controlling;
    enum ch_state state;
    char why[200]; /* of a failure */
    NiceAgent *agent;
    guint stream;
    bool gathered, remote_set, connected;
    bool peer_gave_up; /* its `close` came: no `close` back */
    json_t *remote;    /* the peer's offer (the callee keeps it until it gathered) */
    gnutls_session_t tls;
    ev_timer setup_timer, dtls_timer;
    struct outmsg *wq, **wq_tail;
    size_t wq_n, wq_bytes;
    struct rxdgram rx[MAX_RX];
    size_t rx_head, rx_n;
    struct partial parts[MAX_PARTIAL];
    uint16_t next_msgno;
    /* what status shows */
    bool relayed;
    char relay_sn[NID_HEX_LEN + 1]; /* whose TURN relays it (ours or the peer's super node) */
    unsigned my_relay_kbps, peer_relay_kbps; /* what our / its relay allocation may carry */
    bool relay_is_mine, relay_is_peers;
    char local[96], remote_addr[96];
    double created, opened_at, last_used, retry_at;
    uint64_t msgs_out, msgs_in, bytes_out, bytes_in;
    uint64_t frames_out, frames_in;
};

struct chans {
    struct ev_loop *loop;
    struct chan_params p;
    char **addrs;
    size_t n_addrs;
    struct glibev *glib;
    struct chan *list;
    ev_timer sweep;
    ev_idle reap;
    struct dead_agent {
        NiceAgent *agent;
        guint stream;
    } * dead;      /* agents to free outside their callbacks */
    bool sweeping; /* the sweep timer runs (unref'd) */
    size_t n_dead, cap_dead;
    uint64_t opened, failed, via_overlay, refused, bad_chunks, bad_signals, oversize;
    uint64_t msgs_out, msgs_in, bytes_out, bytes_in; /* of every channel, closed ones too */
    uint64_t frames_out, frames_in, frames_dropped;  /* media */
    /* What the last gathering found (status), and what the channels told of our NAT's mapping:
     * a peer that sees us at our reflexive address (endpoint-independent), or at another one
     * (address-dependent: a symmetric NAT). */
    json_t *cands;
    double cands_at;
    unsigned eim_seen, sym_seen;
};

static double now_s(const struct chans *cs)
{
    return ev_now(cs->loop);
}

static void random_hex(char *out, size_t nbytes)
{
    uint8_t r[16];
    if (nbytes > sizeof(r))
        nbytes = sizeof(r);
    if (getrandom(r, nbytes, 0) != (ssize_t)nbytes)
        for (size_t i = 0; i < nbytes; i++)
            r[i] = (uint8_t)rand();
    for (size_t i = 0; i < nbytes; i++)
        sprintf(out + 2 * i, "%02x", r[i]);
}

/* ---- freeing agents outside their own callbacks --------------------------------------------- */

static void reap_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
    (void)revents;
    struct chans *cs = w->data;
    ev_idle_stop(loop, w);
    for (size_t i = 0; i < cs->n_dead; i++) {
        /* Releases its TURN allocation (a Refresh with lifetime 0) on the way out; the task
         * holds the agent until then. */
        if (cs->dead[i].stream)
            nice_agent_remove_stream(cs->dead[i].agent, cs->dead[i].stream);
        nice_agent_close_async(cs->dead[i].agent, NULL, NULL);
        g_object_unref(cs->dead[i].agent);
    }
    cs->n_dead = 0;
}

static void agent_drop(struct chan *ch)
{
    struct chans *cs = ch->cs;
    if (!ch->agent)
        return;
    /* No more callbacks for this channel; the agent itself may be inside one of them now, so
     * its stream and the agent go later, from the loop. */
    g_signal_handlers_disconnect_by_data(ch->agent, ch);
    if (ch->stream)
        nice_agent_attach_recv(ch->agent, ch->stream, 1, glibev_context(cs->glib), NULL, NULL);
    if (cs->n_dead == cs->cap_dead) {
        size_t cap = cs->cap_dead ? 2 * cs->cap_dead : 8;
        struct dead_agent *d = realloc(cs->dead, cap * sizeof(*d));
        if (!d) {
            log_warn(LOGM, "out of memory: an ICE agent is leaked");
            ch->agent = NULL;
            return;
        }
        cs->dead = d;
        cs->cap_dead = cap;
    }
    cs->dead[cs->n_dead].agent = ch->agent;
    cs->dead[cs->n_dead++].stream = ch->stream;
    ch->agent = NULL;
    ev_idle_start(cs->loop, &cs->reap);
}

/* ---- the channel's parts -------------------------------------------------------------------- */

/* The oldest waiting message, taken off the queue (the caller frees it). */
static struct outmsg *wq_pop(struct chan *ch)
{
    struct outmsg *m = ch->wq;
    ch->wq = m->next;
    if (!ch->wq)
        ch->wq_tail = &ch->wq;
    ch->wq_n--;
    ch->wq_bytes -= m->len;
    return m;
}

static void wq_clear(struct chan *ch)
{
    while (ch->wq) {
        struct outmsg *m = ch->wq;
        ch->wq = m->next;
        free(m);
    }
    ch->wq_tail = &ch->wq;
    ch->wq_n = ch->wq_bytes = 0;
}

static void rx_clear(struct chan *ch)
{
    for (size_t i = 0; i < ch->rx_n; i++)
        free(ch->rx[(ch->rx_head + i) % MAX_RX].data);
    ch->rx_head = ch->rx_n = 0;
}

static void parts_clear(struct chan *ch)
{
    for (size_t i = 0; i < MAX_PARTIAL; i++) {
        free(ch->parts[i].buf);
        memset(&ch->parts[i], 0, sizeof(ch->parts[i]));
    }
}

static void tls_drop(struct chan *ch, bool notify)
{
    struct chans *cs = ch->cs;
    ev_timer_stop(cs->loop, &ch->dtls_timer);
    if (!ch->tls)
        return;
    if (notify && ch->state == CH_OPEN)
        gnutls_bye(ch->tls, GNUTLS_SHUT_WR); /* close_notify, one datagram, not waited for */
    gnutls_deinit(ch->tls);
    ch->tls = NULL;
}

/* Everything but the entry itself (kept while failed, so the peer is not tried again at once). */
static void chan_release(struct chan *ch, bool notify)
{
    ev_timer_stop(ch->cs->loop, &ch->setup_timer);
    tls_drop(ch, notify);
    agent_drop(ch);
    rx_clear(ch);
    parts_clear(ch);
    json_decref(ch->remote);
    ch->remote = NULL;
}

static void chan_free(struct chan *ch)
{
    chan_release(ch, false);
    wq_clear(ch);
    free(ch);
}

static void chan_unlink(struct chan *ch)
{
    for (struct chan **pp = &ch->cs->list; *pp; pp = &(*pp)->next)
        if (*pp == ch) {
            *pp = ch->next;
            return;
        }
}

static struct chan *chan_find(struct chans *cs, const char *peer)
{
    for (struct chan *ch = cs->list; ch; ch = ch->next)
        if (!strcmp(ch->peer, peer))
            return ch;
    return NULL;
}

static void signal_peer(struct chan *ch, const char *op, json_t *extra)
{
    struct chans *cs = ch->cs;
    const char *my_sn = onode_sn_id(cs->p.on);
    json_t *ice = extra ? extra : json_object();
    json_object_set_new(ice, "op", json_string(op));
    json_object_set_new(ice, "id", json_string(ch->id));
    json_object_set_new(ice, "sn", json_string(my_sn ? my_sn : ""));
    json_t *payload = json_pack("{s:o}", "ice", ice);
    onode_deliver(cs->p.on, ch->peer, ch->peer_sn, payload);
    json_decref(payload);
}

/* Sends what waited through the overlay, as before channels. */
static void deliver_text(struct chans *cs, const char *peer, const char *sn, const char *text,
                         size_t len)
{
    const char *my_sn = onode_sn_id(cs->p.on);
    json_t *payload = json_pack("{s:s%,s:s}", "sip", text, len, "sn", my_sn ? my_sn : "");
    if (!payload) {
        log_info(LOGM, "a SIP message for node %.8s is no valid string: dropped", peer);
        return;
    }
    onode_deliver(cs->p.on, peer, sn, payload);
    json_decref(payload);
    cs->via_overlay++;
}

static void wq_to_overlay(struct chan *ch)
{
    while (ch->wq) {
        struct outmsg *m = ch->wq;
        ch->wq = m->next;
        deliver_text(ch->cs, ch->peer, ch->peer_sn, m->text, m->len);
        free(m);
    }
    wq_clear(ch);
}

static void chan_fail(struct chan *ch, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void chan_fail(struct chan *ch, const char *fmt, ...)
{
    struct chans *cs = ch->cs;
    if (ch->state == CH_FAILED)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ch->why, sizeof(ch->why), fmt, ap);
    va_end(ap);
    bool was_open = ch->state == CH_OPEN;
    log_info(LOGM, "channel %s node %.8s %s: %s%s", ch->controlling ? "to" : "from", ch->peer,
             was_open ? "closed" : "failed", ch->why,
             ch->wq_n ? "; what waited goes through the overlay" : "");
    if (!was_open) {
        cs->failed++;
        ch->retry_at = now_s(cs) + cs->p.retry_s;
        if (!ch->peer_gave_up)
            signal_peer(ch, "close", json_pack("{s:s}", "reason", ch->why));
    } else {
        ch->retry_at = 0; /* a channel that worked may be opened again at once */
    }
    ch->state = CH_FAILED;
    chan_release(ch, was_open);
    wq_to_overlay(ch);
}

/* ---- DTLS over the ICE component ------------------------------------------------------------ */

static ssize_t tls_push(gnutls_transport_ptr_t p, const void *data, size_t len)
{
    struct chan *ch = p;
    if (!ch->agent)
        return (ssize_t)len;
    gint r = nice_agent_send(ch->agent, ch->stream, 1, (guint)len, data);
    (void)r; /* a datagram lost here is one lost on the way: DTLS and SIP retransmit */
    return (ssize_t)len;
}

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *data, size_t len)
{
    struct chan *ch = p;
    if (!ch->rx_n) {
        gnutls_transport_set_errno(ch->tls, EAGAIN);
        return -1;
    }
    struct rxdgram *d = &ch->rx[ch->rx_head];
    size_t n = d->len < len ? d->len : len;
    memcpy(data, d->data, n);
    free(d->data);
    d->data = NULL;
    ch->rx_head = (ch->rx_head + 1) % MAX_RX;
    ch->rx_n--;
    return (ssize_t)n;
}

static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
    (void)ms;
    struct chan *ch = p;
    return ch->rx_n ? 1 : 0;
}

static void flush_waiting(struct chan *ch);
static void read_records(struct chan *ch);

static void handshake_step(struct chan *ch)
{
    struct chans *cs = ch->cs;
    int r = gnutls_handshake(ch->tls);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
        ev_timer_stop(cs->loop, &ch->dtls_timer);
        ev_timer_set(&ch->dtls_timer, gnutls_dtls_get_timeout(ch->tls) / 1000.0 + 0.001, 0.);
        ev_timer_start(cs->loop, &ch->dtls_timer);
        return;
    }
    ev_timer_stop(cs->loop, &ch->dtls_timer);
    if (r < 0) {
        chan_fail(ch, "DTLS handshake: %s", gnutls_strerror(r));
        return;
    }
    struct peer_identity id;
    char err[300];
    if (tls_session_peer(ch->tls, &id, err, sizeof(err)) != 0) {
        chan_fail(ch, "peer certificate refused: %s", err);
        return;
    }
    char hex[NID_HEX_LEN + 1];
    if (!id.has_node_id || strcmp(nid_to_hex(&id.node_id, hex), ch->peer) != 0) {
        chan_fail(ch, "the peer's certificate (%s, Node-ID %.8s) is not node %.8s's", id.uri,
                  id.has_node_id ? hex : "none", ch->peer);
        return;
    }
    ev_timer_stop(cs->loop, &ch->setup_timer);
    ch->state = CH_OPEN;
    ch->opened_at = ch->last_used = now_s(cs);
    cs->opened++;
    log_info(LOGM, "channel %s %s (node %.8s) open in %.0f ms: %s, %s <-> %s",
             ch->controlling ? "to" : "from", id.uri, ch->peer,
             (ch->opened_at - ch->created) * 1000.0, ch->relayed ? "relayed" : "direct", ch->local,
             ch->remote_addr);
    flush_waiting(ch);
    read_records(ch);
}

static void dtls_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    struct chan *ch = w->data;
    if (ch->tls && ch->state == CH_DTLS)
        handshake_step(ch);
}

static void tls_start(struct chan *ch)
{
    if (ch->tls || ch->state == CH_FAILED)
        return;
    int r = tls_ctx_dtls_session(onode_tls(ch->cs->p.on), ch->controlling, &ch->tls);
    if (r < 0) {
        chan_fail(ch, "cannot start DTLS: %s", gnutls_strerror(r));
        return;
    }
    gnutls_transport_set_ptr(ch->tls, ch);
    gnutls_transport_set_push_function(ch->tls, tls_push);
    gnutls_transport_set_pull_function(ch->tls, tls_pull);
    gnutls_transport_set_pull_timeout_function(ch->tls, tls_pull_timeout);
    gnutls_dtls_set_mtu(ch->tls, DTLS_MTU);
    gnutls_dtls_set_timeouts(ch->tls, 500, ch->cs->p.setup_ms);
    ch->state = CH_DTLS;
    handshake_step(ch);
}

/* One record: [msgno:2][index:1][count:1][bytes of the message]. */
static void chunk_in(struct chan *ch, const uint8_t *p, size_t n)
{
    struct chans *cs = ch->cs;
    if (n > 4 && p[3] == 0) { /* a media frame (media.h) */
        ch->frames_in++, cs->frames_in++;
        ch->last_used = now_s(cs); /* a call keeps its channel open */
        if (cs->p.on_media)
            cs->p.on_media(cs->p.ud, ch->peer, p, n);
        return;
    }
    if (n < 5) {
        cs->bad_chunks++;
        return;
    }
    uint16_t msgno = (uint16_t)(p[0] << 8 | p[1]);
    uint8_t idx = p[2], count = p[3];
    const uint8_t *data = p + 4;
    size_t dlen = n - 4;
    if (count == 0 || count > CHAN_MAX_CHUNKS || idx >= count || dlen > CHAN_CHUNK ||
        (idx + 1 < count && dlen != CHAN_CHUNK)) {
        cs->bad_chunks++;
        log_info(LOGM, "channel from node %.8s: malformed chunk (%u of %u, %zu bytes): dropped",
                 ch->peer, idx, count, dlen);
        return;
    }
    ch->last_used = now_s(cs);
    if (count == 1) {
        ch->msgs_in++, cs->msgs_in++;
        ch->bytes_in += dlen, cs->bytes_in += dlen;
        cs->p.on_sip(cs->p.ud, ch->peer, ch->peer_sn, (const char *)data, dlen);
        return;
    }
    struct partial *pt = NULL, *oldest = &ch->parts[0];
    for (size_t i = 0; i < MAX_PARTIAL; i++) {
        struct partial *q = &ch->parts[i];
        if (q->used && q->msgno == msgno && q->count == count)
            pt = q;
        if (!q->used || (oldest->used && q->started < oldest->started))
            oldest = q;
    }
    if (!pt) {
        pt = oldest; /* a free slot, or the oldest unfinished message makes room */
        free(pt->buf);
        memset(pt, 0, sizeof(*pt));
        if (!(pt->buf = malloc((size_t)count * CHAN_CHUNK)))
            return;
        pt->used = true;
        pt->msgno = msgno;
        pt->count = count;
        pt->started = now_s(cs);
    }
    memcpy(pt->buf + (size_t)idx * CHAN_CHUNK, data, dlen);
    pt->have |= 1ull << idx;
    if (idx + 1 == count)
        pt->len = (size_t)idx * CHAN_CHUNK + dlen;
    uint64_t all = count == 64 ? ~0ull : (1ull << count) - 1;
    if (pt->have != all)
        return;
    ch->msgs_in++, cs->msgs_in++;
    ch->bytes_in += pt->len, cs->bytes_in += pt->len;
    char *buf = pt->buf;
    size_t len = pt->len;
    memset(pt, 0, sizeof(*pt));
    cs->p.on_sip(cs->p.ud, ch->peer, ch->peer_sn, buf, len);
    free(buf);
}

static void read_records(struct chan *ch)
{
    uint8_t buf[DTLS_MTU + 64];
    while (ch->tls && ch->state == CH_OPEN) {
        ssize_t r = gnutls_record_recv(ch->tls, buf, sizeof(buf));
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
            return;
        if (r == 0) {
            chan_fail(ch, "the peer closed it");
            return;
        }
        if (r < 0) {
            if (!gnutls_error_is_fatal((int)r))
                continue; /* a damaged or replayed record: DTLS drops it */
            chan_fail(ch, "DTLS: %s", gnutls_strerror((int)r));
            return;
        }
        chunk_in(ch, buf, (size_t)r);
    }
}

static int send_now(struct chan *ch, const char *text, size_t len)
{
    size_t count = (len + CHAN_CHUNK - 1) / CHAN_CHUNK;
    if (count == 0)
        count = 1;
    uint16_t msgno = ch->next_msgno++;
    uint8_t rec[4 + CHAN_CHUNK];
    for (size_t i = 0; i < count; i++) {
        size_t off = i * CHAN_CHUNK, n = len - off < CHAN_CHUNK ? len - off : CHAN_CHUNK;
        rec[0] = (uint8_t)(msgno >> 8);
        rec[1] = (uint8_t)msgno;
        rec[2] = (uint8_t)i;
        rec[3] = (uint8_t)count;
        memcpy(rec + 4, text + off, n);
        ssize_t r;
        do
            r = gnutls_record_send(ch->tls, rec, 4 + n);
        while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
        if (r < 0)
            return (int)r;
    }
    ch->msgs_out++, ch->cs->msgs_out++;
    ch->bytes_out += len, ch->cs->bytes_out += len;
    ch->last_used = now_s(ch->cs);
    return 0;
}

static void flush_waiting(struct chan *ch)
{
    while (ch->wq && ch->state == CH_OPEN) {
        int r = send_now(ch, ch->wq->text, ch->wq->len);
        if (r < 0) {
            chan_fail(ch, "DTLS: %s", gnutls_strerror(r));
            return;
        }
        free(wq_pop(ch));
    }
}

/* ---- ICE ------------------------------------------------------------------------------------ */

static void recv_cb(NiceAgent *agent, guint stream, guint comp, guint len, gchar *buf, gpointer ud)
{
    (void)agent, (void)stream, (void)comp;
    struct chan *ch = ud;
    if (ch->state == CH_FAILED || len == 0)
        return;
    if (ch->rx_n == MAX_RX) { /* GnuTLS is behind: the oldest goes, as on a full socket */
        free(ch->rx[ch->rx_head].data);
        ch->rx[ch->rx_head].data = NULL;
        ch->rx_head = (ch->rx_head + 1) % MAX_RX;
        ch->rx_n--;
    }
    size_t slot = (ch->rx_head + ch->rx_n) % MAX_RX;
    if (!(ch->rx[slot].data = malloc(len)))
        return;
    memcpy(ch->rx[slot].data, buf, len);
    ch->rx[slot].len = len;
    ch->rx_n++;
    if (!ch->tls && !ch->controlling && ch->state != CH_FAILED)
        tls_start(ch); /* the caller's handshake came before our CONNECTED */
    else if (ch->tls && ch->state == CH_DTLS)
        handshake_step(ch);
    else if (ch->tls && ch->state == CH_OPEN)
        read_records(ch);
}

static const char *cand_type(NiceCandidateType t)
{
    switch (t) {
    case NICE_CANDIDATE_TYPE_HOST:
        return "host";
    case NICE_CANDIDATE_TYPE_SERVER_REFLEXIVE:
        return "srflx";
    case NICE_CANDIDATE_TYPE_PEER_REFLEXIVE:
        return "prflx";
    case NICE_CANDIDATE_TYPE_RELAYED:
        return "relay";
    }
    return "?";
}

static void describe(char *out, size_t len, const NiceCandidate *c)
{
    gchar ip[NICE_ADDRESS_STRING_LEN];
    nice_address_to_string(&c->addr, ip);
    snprintf(out, len, "%s:%u (%s)", ip, nice_address_get_port(&c->addr), cand_type(c->type));
}

static void pair_cb(NiceAgent *agent, guint stream, guint comp, NiceCandidate *l, NiceCandidate *r,
                    gpointer ud)
{
    (void)stream, (void)comp;
    struct chan *ch = ud;
    /* Our NAT's mapping, as this peer saw it: our reflexive address (endpoint-independent), or
     * one learnt only from the peer's checks (a new mapping per destination: symmetric). */
    bool srflx = false, prflx_new = false;
    GSList *list = nice_agent_get_local_candidates(agent, ch->stream, 1);
    for (GSList *i = list; i; i = i->next) {
        NiceCandidate *c = i->data;
        if (c->type == NICE_CANDIDATE_TYPE_SERVER_REFLEXIVE)
            srflx = true;
    }
    for (GSList *i = list; i; i = i->next) {
        NiceCandidate *c = i->data;
        if (c->type != NICE_CANDIDATE_TYPE_PEER_REFLEXIVE)
            continue;
        bool known = false;
        for (GSList *j = list; j; j = j->next) {
            NiceCandidate *d = j->data;
            if (d->type == NICE_CANDIDATE_TYPE_SERVER_REFLEXIVE &&
                nice_address_equal(&c->addr, &d->addr))
                known = true;
        }
        prflx_new |= !known;
    }
    g_slist_free_full(list, (GDestroyNotify)nice_candidate_free);
    if (srflx && prflx_new)
        ch->cs->sym_seen++;
    else if (l->type == NICE_CANDIDATE_TYPE_SERVER_REFLEXIVE)
        ch->cs->eim_seen++;
    ch->relayed = l->type == NICE_CANDIDATE_TYPE_RELAYED || r->type == NICE_CANDIDATE_TYPE_RELAYED;
    const char *my_sn = onode_sn_id(ch->cs->p.on);
    ch->relay_is_mine = l->type == NICE_CANDIDATE_TYPE_RELAYED;
    ch->relay_is_peers = r->type == NICE_CANDIDATE_TYPE_RELAYED;
    snprintf(ch->relay_sn, sizeof(ch->relay_sn), "%s",
             l->type == NICE_CANDIDATE_TYPE_RELAYED   ? (my_sn ? my_sn : "")
             : r->type == NICE_CANDIDATE_TYPE_RELAYED ? ch->peer_sn
                                                      : "");
    describe(ch->local, sizeof(ch->local), l);
    describe(ch->remote_addr, sizeof(ch->remote_addr), r);
}

static void state_cb(NiceAgent *agent, guint stream, guint comp, guint state, gpointer ud)
{
    (void)agent, (void)stream, (void)comp;
    struct chan *ch = ud;
    if (state == NICE_COMPONENT_STATE_FAILED) {
        chan_fail(ch, ch->state == CH_OPEN ? "ICE: the path stopped working"
                                           : "ICE: no candidate pair works");
        return;
    }
    if ((state == NICE_COMPONENT_STATE_CONNECTED || state == NICE_COMPONENT_STATE_READY) &&
        !ch->connected) {
        ch->connected = true;
        if (ch->controlling) /* the caller speaks first; the callee waits for its hello */
            tls_start(ch);
    }
}

/* Our credentials and candidates, as the offer or answer carries them. */
static json_t *local_description(struct chan *ch)
{
    gchar *ufrag = NULL, *pwd = NULL;
    if (!nice_agent_get_local_credentials(ch->agent, ch->stream, &ufrag, &pwd))
        return NULL;
    json_t *cands = json_array(), *mine = json_array();
    GSList *list = nice_agent_get_local_candidates(ch->agent, ch->stream, 1);
    for (GSList *i = list; i; i = i->next) {
        NiceCandidate *c = i->data;
        gchar *sdp = nice_agent_generate_local_candidate_sdp(ch->agent, c);
        if (sdp)
            json_array_append_new(cands, json_string(sdp));
        g_free(sdp);
        gchar ip[NICE_ADDRESS_STRING_LEN];
        nice_address_to_string(&c->addr, ip);
        json_array_append_new(mine, json_pack("{s:s,s:s,s:i,s:I}", "type", cand_type(c->type), "ip",
                                              ip, "port", nice_address_get_port(&c->addr),
                                              "priority", (json_int_t)c->priority));
        nice_candidate_free(c);
    }
    g_slist_free(list);
    json_decref(ch->cs->cands);
    ch->cs->cands = mine;
    ch->cs->cands_at = now_s(ch->cs);
    json_t *d = json_pack("{s:s,s:s,s:o}", "ufrag", ufrag, "pwd", pwd, "cands", cands);
    if (ch->my_relay_kbps) /* what our relay allocation may carry: calls are counted against it */
        json_object_set_new(d, "relay_kbps", json_integer((json_int_t)ch->my_relay_kbps));
    g_free(ufrag);
    g_free(pwd);
    return d;
}

/* Takes the peer's credentials and candidates; -1 (with why) when they are unusable. */
static int set_remote(struct chan *ch, json_t *d, char *why, size_t whylen)
{
    const char *ufrag = json_string_value(json_object_get(d, "ufrag"));
    const char *pwd = json_string_value(json_object_get(d, "pwd"));
    json_t *cands = json_object_get(d, "cands");
    if (!ufrag || !pwd || !*ufrag || !*pwd || strlen(ufrag) > MAX_CRED_LEN ||
        strlen(pwd) > MAX_CRED_LEN || !json_is_array(cands) || json_array_size(cands) == 0) {
        snprintf(why, whylen, "no usable credentials or candidates");
        return -1;
    }
    if (!nice_agent_set_remote_credentials(ch->agent, ch->stream, ufrag, pwd)) {
        snprintf(why, whylen, "credentials refused by the ICE agent");
        return -1;
    }
    GSList *list = NULL;
    size_t i, n = 0;
    json_t *c;
    json_array_foreach(cands, i, c)
    {
        const char *sdp = json_string_value(c);
        if (!sdp || strlen(sdp) > MAX_CAND_LEN || n == MAX_CANDS)
            continue;
        NiceCandidate *nc = nice_agent_parse_remote_candidate_sdp(ch->agent, ch->stream, sdp);
        if (nc && nc->component_id == 1) {
            list = g_slist_append(list, nc);
            n++;
        } else if (nc) {
            nice_candidate_free(nc);
        }
    }
    int added = n ? nice_agent_set_remote_candidates(ch->agent, ch->stream, 1, list) : 0;
    g_slist_free_full(list, (GDestroyNotify)nice_candidate_free);
    if (added <= 0) {
        snprintf(why, whylen, "none of the %zu candidates is usable", json_array_size(cands));
        return -1;
    }
    json_int_t kbps = json_integer_value(json_object_get(d, "relay_kbps"));
    ch->peer_relay_kbps = kbps > 0 && kbps < 100000000 ? (unsigned)kbps : 0;
    ch->remote_set = true;
    return 0;
}

static void gathered_cb(NiceAgent *agent, guint stream, gpointer ud)
{
    (void)agent, (void)stream;
    struct chan *ch = ud;
    if (ch->gathered || ch->state == CH_FAILED)
        return;
    ch->gathered = true;
    json_t *d = local_description(ch);
    if (!d) {
        chan_fail(ch, "no ICE credentials");
        return;
    }
    if (ch->controlling) {
        ch->state = CH_OFFERED;
        signal_peer(ch, "offer", d);
        return;
    }
    char why[200];
    if (set_remote(ch, ch->remote, why, sizeof(why)) != 0) {
        json_decref(d);
        chan_fail(ch, "the offer: %s", why);
        return;
    }
    json_decref(ch->remote);
    ch->remote = NULL;
    ch->state = CH_CHECKING;
    signal_peer(ch, "answer", d);
}

static void setup_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    struct chan *ch = w->data;
    if (ch->state != CH_OPEN)
        chan_fail(ch, "not open after %u ms (%s)", ch->cs->p.setup_ms, state_names[ch->state]);
}

static int split_hostport(const char *hp, char *host, size_t hlen, unsigned *port)
{
    const char *colon = strrchr(hp, ':');
    if (!colon || colon == hp)
        return -1;
    const char *h = hp;
    size_t n = (size_t)(colon - hp);
    if (*h == '[' && n >= 2 && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n == 0 || n >= hlen)
        return -1;
    memcpy(host, h, n);
    host[n] = '\0';
    char *end;
    unsigned long p = strtoul(colon + 1, &end, 10);
    if (*end || p == 0 || p > 65535)
        return -1;
    *port = (unsigned)p;
    return 0;
}

static struct chan *chan_new(struct chans *cs, const char *peer, const char *sn, bool controlling,
                             const char *id)
{
    struct chan *ch = calloc(1, sizeof(*ch));
    if (!ch)
        return NULL;
    ch->cs = cs;
    snprintf(ch->peer, sizeof(ch->peer), "%s", peer);
    snprintf(ch->peer_sn, sizeof(ch->peer_sn), "%s", sn);
    if (id)
        snprintf(ch->id, sizeof(ch->id), "%s", id);
    else
        random_hex(ch->id, 8);
    ch->controlling = controlling;
    ch->wq_tail = &ch->wq;
    ch->created = ch->last_used = now_s(cs);
    ev_timer_init(&ch->setup_timer, setup_timeout_cb, cs->p.setup_ms / 1000.0, 0.);
    ch->setup_timer.data = ch;
    ev_init(&ch->dtls_timer, dtls_timer_cb);
    ch->dtls_timer.data = ch;
    ch->next = cs->list;
    cs->list = ch;
    ev_timer_start(cs->loop, &ch->setup_timer);

    GMainContext *ctx = glibev_context(cs->glib);
    ch->agent = nice_agent_new(ctx, NICE_COMPATIBILITY_RFC5245);
    if (!ch->agent) {
        chan_fail(ch, "cannot make an ICE agent");
        return ch;
    }
    g_object_set(G_OBJECT(ch->agent), "controlling-mode", controlling, "upnp", FALSE, "ice-tcp",
                 FALSE, "keepalive-conncheck", TRUE, NULL);
    char host[64];
    unsigned port;
    /* The super node's TURN server answers Allocate with our reflexive address too, so with a
     * relay there is no separate STUN query (libnice also mistakes a Binding answer from its
     * TURN server's address for a TURN message and waits out the query). */
    struct on_turn t;
    bool relay = onode_turn(cs->p.on, &t);
    ch->my_relay_kbps = relay ? t.bandwidth_kbps : 0;
    if (cs->p.force_relay) /* our addresses stay ours: only relayed candidates are used */
        g_object_set(G_OBJECT(ch->agent), "force-relay", TRUE, NULL);
    const char *stun = onode_stun_addr(cs->p.on);
    if (!relay && stun[0] && split_hostport(stun, host, sizeof(host), &port) == 0)
        g_object_set(G_OBJECT(ch->agent), "stun-server", host, "stun-server-port", port, NULL);
    /* Host candidates: the configured addresses, or the one our link to the overlay leaves from
     * (never every interface of the machine). */
    size_t added = 0;
    for (size_t i = 0; i < cs->n_addrs; i++) {
        NiceAddress a;
        nice_address_init(&a);
        if (nice_address_set_from_string(&a, cs->addrs[i]) &&
            nice_agent_add_local_address(ch->agent, &a))
            added++;
    }
    if (!added && split_hostport(onode_local_addr(cs->p.on), host, sizeof(host), &port) == 0) {
        NiceAddress a;
        nice_address_init(&a);
        if (nice_address_set_from_string(&a, host) && nice_agent_add_local_address(ch->agent, &a))
            added++;
    }
    if (!added) {
        chan_fail(ch, "no local address to gather candidates on (not attached?)");
        return ch;
    }
    ch->stream = nice_agent_add_stream(ch->agent, 1);
    if (!ch->stream) {
        chan_fail(ch, "cannot add an ICE stream");
        return ch;
    }
    if (relay && split_hostport(t.server, host, sizeof(host), &port) == 0)
        nice_agent_set_relay_info(ch->agent, ch->stream, 1, host, port, t.username, t.password,
                                  NICE_RELAY_TYPE_TURN_UDP);
    g_signal_connect(ch->agent, "candidate-gathering-done", G_CALLBACK(gathered_cb), ch);
    g_signal_connect(ch->agent, "component-state-changed", G_CALLBACK(state_cb), ch);
    g_signal_connect(ch->agent, "new-selected-pair-full", G_CALLBACK(pair_cb), ch);
    nice_agent_attach_recv(ch->agent, ch->stream, 1, ctx, recv_cb, ch);
    if (!nice_agent_gather_candidates(ch->agent, ch->stream))
        chan_fail(ch, "cannot gather ICE candidates");
    return ch;
}

/* Room for one more channel: the longest idle open or failed one goes. */
static bool make_room(struct chans *cs)
{
    size_t n = 0;
    struct chan *victim = NULL;
    for (struct chan *ch = cs->list; ch; ch = ch->next) {
        if (ch->state == CH_FAILED) {
            if (!victim || victim->state != CH_FAILED || ch->last_used < victim->last_used)
                victim = ch;
            continue;
        }
        n++;
        if (ch->state == CH_OPEN &&
            (!victim || (victim->state != CH_FAILED && ch->last_used < victim->last_used)))
            victim = ch;
    }
    if (n < cs->p.max_channels)
        return true;
    if (!victim)
        return false;
    chan_unlink(victim);
    if (victim->state == CH_OPEN)
        log_info(LOGM, "channel to node %.8s closed to make room", victim->peer);
    chan_release(victim, true);
    chan_free(victim);
    return true;
}

/* ---- the API -------------------------------------------------------------------------------- */

/* The channel to node (opening one when there is none), or NULL when none can be had now (a
 * failed one waits for its retry time, or no room). */
static struct chan *chan_get(struct chans *cs, const char *node, const char *sn)
{
    struct chan *ch = chan_find(cs, node);
    if (ch && ch->state == CH_FAILED && now_s(cs) >= ch->retry_at) {
        chan_unlink(ch);
        chan_free(ch);
        ch = NULL;
    }
    if (ch)
        return ch->state == CH_FAILED ? NULL : ch;
    if (!make_room(cs)) {
        cs->refused++;
        return NULL;
    }
    if (!(ch = chan_new(cs, node, sn, true, NULL)))
        return NULL;
    log_info(LOGM, "opening a channel to node %.8s", node);
    return ch->state == CH_FAILED ? NULL : ch;
}

int chans_send_media(struct chans *cs, const char *node, const void *frame, size_t len)
{
    struct chan *ch = chan_find(cs, node);
    if (!ch || ch->state != CH_OPEN || !ch->tls || len > CHAN_MEDIA_MAX) {
        cs->frames_dropped++;
        return -1;
    }
    ssize_t r;
    do
        r = gnutls_record_send(ch->tls, frame, len);
    while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
    if (r < 0) {
        cs->frames_dropped++;
        return -1;
    }
    ch->frames_out++, cs->frames_out++;
    ch->last_used = ev_now(cs->loop);
    return 0;
}

bool chans_path(struct chans *cs, const char *node, struct chan_path *p)
{
    struct chan *ch = chan_find(cs, node);
    memset(p, 0, sizeof(*p));
    if (!ch)
        return false;
    p->open = ch->state == CH_OPEN;
    p->relayed = ch->relayed;
    snprintf(p->relay_sn, sizeof(p->relay_sn), "%s", ch->relayed ? ch->relay_sn : "");
    /* the tighter of the relays on the path (both, when both sides relay) */
    unsigned a = ch->relay_is_mine ? ch->my_relay_kbps : 0;
    unsigned b = ch->relay_is_peers ? ch->peer_relay_kbps : 0;
    p->relay_kbps = a && b ? (a < b ? a : b) : a ? a : b;
    snprintf(p->local, sizeof(p->local), "%s", ch->local);
    snprintf(p->remote, sizeof(p->remote), "%s", ch->remote_addr);
    return true;
}

bool chans_open(struct chans *cs, const char *node, const char *sn)
{
    return chan_get(cs, node, sn) != NULL;
}

void chans_send(struct chans *cs, const char *node, const char *sn, const char *text, size_t len)
{
    if (len > (size_t)CHAN_CHUNK * CHAN_MAX_CHUNKS) {
        cs->oversize++;
        log_info(LOGM, "a SIP message of %zu bytes for node %.8s is too large for a channel", len,
                 node);
        deliver_text(cs, node, sn, text, len);
        return;
    }
    struct chan *ch = chan_get(cs, node, sn);
    if (!ch) {
        deliver_text(cs, node, sn, text, len);
        return;
    }
    if (ch->state == CH_OPEN) {
        int r = send_now(ch, text, len);
        if (r < 0) {
            chan_fail(ch, "DTLS: %s", gnutls_strerror(r));
            deliver_text(cs, node, sn, text, len);
        }
        return;
    }
    /* Opening: it waits, bounded (the oldest goes; SIP retransmits). */
    while (ch->wq && (ch->wq_n >= MAX_WAITING || ch->wq_bytes + len > MAX_WAIT_BYTES))
        free(wq_pop(ch));
    struct outmsg *m = malloc(sizeof(*m) + len);
    if (!m)
        return;
    m->next = NULL;
    m->len = len;
    memcpy(m->text, text, len);
    *ch->wq_tail = m;
    ch->wq_tail = &m->next;
    ch->wq_n++;
    ch->wq_bytes += len;
}

static bool hex_ok(const char *s, size_t len)
{
    if (!s || strlen(s) != len)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

void chans_signal(struct chans *cs, const char *from, json_t *payload)
{
    json_t *ice = json_object_get(payload, "ice");
    const char *op = json_string_value(json_object_get(ice, "op"));
    const char *id = json_string_value(json_object_get(ice, "id"));
    const char *sn = json_string_value(json_object_get(ice, "sn"));
    if (!op || !hex_ok(id, 16) || !hex_ok(sn, NID_HEX_LEN) || !hex_ok(from, NID_HEX_LEN)) {
        cs->bad_signals++;
        log_info(LOGM, "channel signal from node %.8s: malformed: dropped", from ? from : "?");
        return;
    }
    struct chan *ch = chan_find(cs, from);
    if (!strcmp(op, "offer")) {
        if (ch && ch->state != CH_FAILED) {
            if (!strcmp(ch->id, id))
                return;                                          /* the same offer again */
            bool both = ch->controlling && ch->state != CH_OPEN; /* we offered too */
            if (both && strcmp(onode_id(cs->p.on), from) < 0)
                return; /* both offered at once: the lower Node-ID's offer stands */
            if (!both && ch->state != CH_OPEN && now_s(cs) - ch->created < OFFER_GAP_S) {
                cs->bad_signals++; /* a new offer from a peer at most once a second */
                return;
            }
        }
        struct outmsg *waiting = NULL;
        size_t wn = 0, wb = 0;
        if (ch) { /* the peer's offer replaces what we had (it restarted, or won the tie) */
            waiting = ch->wq;
            wn = ch->wq_n;
            wb = ch->wq_bytes;
            ch->wq = NULL;
            ch->wq_tail = &ch->wq;
            ch->wq_n = ch->wq_bytes = 0;
            chan_unlink(ch);
            chan_release(ch, ch->state == CH_OPEN);
            chan_free(ch);
        }
        if (!make_room(cs)) {
            cs->refused++;
            log_info(LOGM, "channel offer from node %.8s refused: %u channels", from,
                     cs->p.max_channels);
            struct chan tmp = {.cs = cs};
            snprintf(tmp.peer, sizeof(tmp.peer), "%s", from);
            snprintf(tmp.peer_sn, sizeof(tmp.peer_sn), "%s", sn);
            snprintf(tmp.id, sizeof(tmp.id), "%s", id);
            signal_peer(&tmp, "close", json_pack("{s:s}", "reason", "too many channels"));
            while (waiting) {
                struct outmsg *m = waiting;
                waiting = m->next;
                deliver_text(cs, from, sn, m->text, m->len);
                free(m);
            }
            return;
        }
        ch = chan_new(cs, from, sn, false, id);
        if (!ch)
            return;
        log_info(LOGM, "channel offer from node %.8s", from);
        ch->remote = json_incref(ice);
        if (waiting) {
            ch->wq = waiting;
            ch->wq_n = wn;
            ch->wq_bytes = wb;
            struct outmsg *m = waiting;
            while (m->next)
                m = m->next;
            ch->wq_tail = &m->next;
            if (ch->state == CH_FAILED) /* could not even start: through the overlay */
                wq_to_overlay(ch);
        }
        return;
    }
    if (!ch || strcmp(ch->id, id) != 0) {
        log_debug(LOGM, "channel %s from node %.8s for no channel of ours: ignored", op, from);
        return;
    }
    if (!strcmp(op, "answer")) {
        if (!ch->controlling || ch->state != CH_OFFERED)
            return;
        snprintf(ch->peer_sn, sizeof(ch->peer_sn), "%s", sn);
        char why[200];
        if (set_remote(ch, ice, why, sizeof(why)) != 0) {
            chan_fail(ch, "the answer: %s", why);
            return;
        }
        ch->state = CH_CHECKING;
    } else if (!strcmp(op, "close")) {
        const char *reason = json_string_value(json_object_get(ice, "reason"));
        ch->peer_gave_up = true;
        if (ch->state != CH_FAILED)
            chan_fail(ch, "the peer gave up: %.100s", reason ? reason : "no reason");
    } else {
        cs->bad_signals++;
    }
}

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    struct chans *cs = w->data;
    double now = now_s(cs);
    struct chan **pp = &cs->list;
    while (*pp) {
        struct chan *ch = *pp;
        if (ch->state == CH_OPEN && now - ch->last_used > cs->p.idle_s) {
            log_info(LOGM, "channel %s node %.8s closed after %u s without SIP",
                     ch->controlling ? "to" : "from", ch->peer, cs->p.idle_s);
            *pp = ch->next;
            chan_release(ch, true);
            chan_free(ch);
            continue;
        }
        if (ch->state == CH_FAILED && now >= ch->retry_at + cs->p.retry_s) {
            *pp = ch->next;
            chan_free(ch);
            continue;
        }
        for (size_t i = 0; i < MAX_PARTIAL; i++) /* a message not complete in 10 s never is */
            if (ch->parts[i].used && now - ch->parts[i].started > 10.0) {
                free(ch->parts[i].buf);
                memset(&ch->parts[i], 0, sizeof(ch->parts[i]));
                cs->bad_chunks++;
            }
        pp = &ch->next;
    }
}

static void quiet_glib(const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer ud)
{
    (void)ud;
    if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING))
        log_warn(LOGM, "%s: %s", domain ? domain : "glib", message);
    else
        log_debug(LOGM, "%s: %s", domain ? domain : "glib", message);
}

struct chans *chans_new(struct ev_loop *loop, const struct chan_params *p, char *err, size_t errlen)
{
    struct chans *cs = calloc(1, sizeof(*cs));
    if (!cs) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    cs->loop = loop;
    cs->p = *p;
    if (!cs->p.setup_ms)
        cs->p.setup_ms = DEF_SETUP_MS;
    if (!cs->p.idle_s)
        cs->p.idle_s = DEF_IDLE_S;
    if (!cs->p.max_channels)
        cs->p.max_channels = DEF_MAX;
    if (!cs->p.retry_s)
        cs->p.retry_s = DEF_RETRY_S;
    cs->p.addresses = NULL;
    if (p->n_addresses) {
        cs->addrs = calloc(p->n_addresses, sizeof(char *));
        for (size_t i = 0; cs->addrs && i < p->n_addresses; i++) {
            NiceAddress a;
            if (!nice_address_set_from_string(&a, p->addresses[i])) {
                snprintf(err, errlen, "\"%s\" is no IP address", p->addresses[i]);
                chans_free(cs);
                return NULL;
            }
            cs->addrs[cs->n_addrs++] = strdup(p->addresses[i]);
        }
    }
    if (!(cs->glib = glibev_new(loop))) {
        snprintf(err, errlen, "out of memory");
        chans_free(cs);
        return NULL;
    }
    g_log_set_handler("libnice", G_LOG_LEVEL_MASK, quiet_glib, NULL);
    ev_timer_init(&cs->sweep, sweep_cb, 5.0, 5.0);
    cs->sweep.data = cs;
    ev_timer_start(loop, &cs->sweep);
    ev_unref(loop);
    cs->sweeping = true;
    ev_idle_init(&cs->reap, reap_cb);
    cs->reap.data = cs;
    return cs;
}

json_t *chans_status(struct chans *cs)
{
    json_t *list = json_array();
    double now = now_s(cs);
    for (struct chan *ch = cs->list; ch; ch = ch->next) {
        json_t *c = json_pack("{s:s,s:s,s:s}", "peer", ch->peer, "state", state_names[ch->state],
                              "role", ch->controlling ? "caller" : "callee");
        if (ch->opened_at > 0) {
            json_object_set_new(c, "path", json_string(ch->relayed ? "relayed" : "direct"));
            json_object_set_new(c, "local", json_string(ch->local));
            json_object_set_new(c, "remote", json_string(ch->remote_addr));
            json_object_set_new(c, "opened_ms",
                                json_integer((json_int_t)((ch->opened_at - ch->created) * 1000)));
        }
        if (ch->state == CH_FAILED)
            json_object_set_new(c, "error", json_string(ch->why));
        json_object_set_new(c, "idle_s", json_integer((json_int_t)(now - ch->last_used)));
        json_object_set_new(c, "messages_out", json_integer((json_int_t)ch->msgs_out));
        json_object_set_new(c, "messages_in", json_integer((json_int_t)ch->msgs_in));
        json_object_set_new(c, "bytes_out", json_integer((json_int_t)ch->bytes_out));
        json_object_set_new(c, "bytes_in", json_integer((json_int_t)ch->bytes_in));
        json_object_set_new(c, "media_frames_out", json_integer((json_int_t)ch->frames_out));
        json_object_set_new(c, "media_frames_in", json_integer((json_int_t)ch->frames_in));
        if (ch->relayed && ch->relay_sn[0])
            json_object_set_new(c, "relay_sn", json_string(ch->relay_sn));
        json_array_append_new(list, c);
    }
    json_t *st =
        json_pack("{s:o,s:I,s:I,s:I,s:I,s:I,s:I}", "channels", list, "opened",
                  (json_int_t)cs->opened, "failed", (json_int_t)cs->failed, "via_overlay",
                  (json_int_t)cs->via_overlay, "refused", (json_int_t)cs->refused, "bad_chunks",
                  (json_int_t)cs->bad_chunks, "bad_signals", (json_int_t)cs->bad_signals);
    if (cs->cands) /* what the last gathering found, with ICE priorities (RFC 8445 5.1.2) */
        json_object_set(st, "candidates", cs->cands);
    json_object_set_new(st, "nat_mapping",
                        json_string(cs->sym_seen   ? "address-dependent (symmetric NAT)"
                                    : cs->eim_seen ? "endpoint-independent"
                                                   : "not measured yet"));
    return st;
}

char *chans_metrics(struct chans *cs)
{
    size_t open_direct = 0, open_relayed = 0, opening = 0, failed = 0;
    for (struct chan *ch = cs->list; ch; ch = ch->next) {
        if (ch->state == CH_OPEN)
            ch->relayed ? open_relayed++ : open_direct++;
        else if (ch->state == CH_FAILED)
            failed++;
        else
            opening++;
    }
    size_t host = 0, srflx = 0, relay = 0, i;
    json_t *c;
    json_array_foreach(cs->cands, i, c)
    {
        const char *t = json_string_value(json_object_get(c, "type"));
        host += !strcmp(t, "host"), srflx += !strcmp(t, "srflx"), relay += !strcmp(t, "relay");
    }
    const char *mapping = cs->sym_seen   ? "address-dependent"
                          : cs->eim_seen ? "endpoint-independent"
                                         : "unknown";
    char *out = NULL;
    if (asprintf(&out,
                 "# TYPE p2p_channels gauge\n"
                 "p2p_channels{state=\"open\",path=\"direct\"} %zu\n"
                 "p2p_channels{state=\"open\",path=\"relayed\"} %zu\n"
                 "p2p_channels{state=\"opening\"} %zu\n"
                 "p2p_channels{state=\"failed\"} %zu\n"
                 "# TYPE p2p_channels_opened_total counter\np2p_channels_opened_total %llu\n"
                 "# TYPE p2p_channel_failures_total counter\np2p_channel_failures_total %llu\n"
                 "# TYPE p2p_channel_overlay_messages_total counter\n"
                 "p2p_channel_overlay_messages_total %llu\n"
                 "# TYPE p2p_channel_refused_total counter\np2p_channel_refused_total %llu\n"
                 "# TYPE p2p_channel_malformed_total counter\n"
                 "p2p_channel_malformed_total{what=\"signal\"} %llu\n"
                 "p2p_channel_malformed_total{what=\"chunk\"} %llu\n"
                 "# TYPE p2p_channel_messages_total counter\n"
                 "p2p_channel_messages_total{dir=\"out\"} %llu\n"
                 "p2p_channel_messages_total{dir=\"in\"} %llu\n"
                 "# TYPE p2p_channel_bytes_total counter\n"
                 "p2p_channel_bytes_total{dir=\"out\"} %llu\n"
                 "p2p_channel_bytes_total{dir=\"in\"} %llu\n"
                 "# TYPE p2p_channel_media_frames_total counter\n"
                 "p2p_channel_media_frames_total{dir=\"out\"} %llu\n"
                 "p2p_channel_media_frames_total{dir=\"in\"} %llu\n"
                 "p2p_channel_media_frames_total{dir=\"dropped\"} %llu\n"
                 "# TYPE p2p_ice_candidates gauge\n"
                 "p2p_ice_candidates{type=\"host\"} %zu\n"
                 "p2p_ice_candidates{type=\"srflx\"} %zu\n"
                 "p2p_ice_candidates{type=\"relay\"} %zu\n"
                 "# TYPE p2p_nat_mapping gauge\np2p_nat_mapping{kind=\"%s\"} 1\n",
                 open_direct, open_relayed, opening, failed, (unsigned long long)cs->opened,
                 (unsigned long long)cs->failed, (unsigned long long)cs->via_overlay,
                 (unsigned long long)cs->refused, (unsigned long long)cs->bad_signals,
                 (unsigned long long)cs->bad_chunks, (unsigned long long)cs->msgs_out,
                 (unsigned long long)cs->msgs_in, (unsigned long long)cs->bytes_out,
                 (unsigned long long)cs->bytes_in, (unsigned long long)cs->frames_out,
                 (unsigned long long)cs->frames_in, (unsigned long long)cs->frames_dropped, host,
                 srflx, relay, mapping) < 0)
        return NULL;
    return out;
}

size_t chans_close(struct chans *cs, const char *peer)
{
    size_t n = 0;
    struct chan **pp = &cs->list;
    while (*pp) {
        struct chan *ch = *pp;
        if (peer && strcmp(ch->peer, peer) != 0) {
            pp = &ch->next;
            continue;
        }
        *pp = ch->next;
        if (ch->state != CH_FAILED) {
            n++;
            log_info(LOGM, "channel %s node %.8s closed on request",
                     ch->controlling ? "to" : "from", ch->peer);
            if (ch->state != CH_OPEN)
                signal_peer(ch, "close", json_pack("{s:s}", "reason", "closed on request"));
        }
        chan_release(ch, true);
        wq_to_overlay(ch);
        chan_free(ch);
    }
    return n;
}

void chans_free(struct chans *cs)
{
    if (!cs)
        return;
    while (cs->list) {
        struct chan *ch = cs->list;
        cs->list = ch->next;
        chan_release(ch, true);
        chan_free(ch);
    }
    if (cs->sweeping) {
        ev_ref(cs->loop);
        ev_timer_stop(cs->loop, &cs->sweep);
    }
    ev_idle_stop(cs->loop, &cs->reap);
    reap_cb(cs->loop, &cs->reap, 0);
    free(cs->dead);
    json_decref(cs->cands);
    for (size_t i = 0; i < cs->n_addrs; i++)
        free(cs->addrs[i]);
    free(cs->addrs);
    glibev_free(cs->glib);
    free(cs);
}
