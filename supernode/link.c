/*
 * Links and peers of a super node: the connection pool (one link per peer in
 * use, opened on demand, frames queued while it opens, idle links closed,
 * a cap on their number), the peers' round-trip times, and requests that
 * wait for an answer on a link. Also what bounds an adversary holding a valid
 * super node certificate here (docs/ring.md section 8): a peer's address is
 * authenticated or it is dialled only within a budget, the peer table has a
 * hard bound, each certificate's super node links share a message budget,
 * and a peer that sends requests without reading the answers is cut off.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "sn_int.h"

double sn_now(struct sn *s)
{
    return ev_now(s->loop);
}

struct peer *peer_find(struct sn *s, const nid_t *id)
{
    for (struct peer *p = s->peers; p; p = p->next)
        if (nid_eq(&p->id, id))
            return p;
    return NULL;
}

/* One line about our own trouble (descriptors, bounds) at most every 5 s: a flood must not
 * turn into a flood of log lines. */
static bool local_warn_due(struct sn *s)
{
    double now = sn_now(s);
    if (now - s->last_local_warn < 5.0)
        return false;
    s->last_local_warn = now;
    return true;
}

struct peer *peer_get(struct sn *s, const nid_t *id, const char *addr, enum peer_src src)
{
    struct peer *p = peer_find(s, id);
    if (!p) {
        if (s->n_peers >= SN_MAX_PEERS) {
            /* Peers are freed only by the tick (links_gc), where nothing holds one. */
            if (local_warn_due(s))
                log_warn("link", "peer table full (%d): a new super node is not recorded",
                         SN_MAX_PEERS);
            return NULL;
        }
        p = calloc(1, sizeof(*p));
        if (!p)
            return NULL;
        p->id = *id;
        p->last_used = sn_now(s);
        p->attached = p->capacity = -1;
        p->next = s->peers;
        s->peers = p;
        s->n_peers++;
    }
    if (!addr || !*addr)
        return p;
    if (src == PEER_OWN) {
        if (strcmp(p->addr, addr) != 0)
            snprintf(p->addr, sizeof(p->addr), "%s", addr);
        p->verified = true;
    } else if (!p->addr[0]) {
        /* Hearsay fills an unknown address, never replaces one: a third party's message
         * must not redirect our links to a known node elsewhere. */
        snprintf(p->addr, sizeof(p->addr), "%s", addr);
    }
    return p;
}

json_t *peer_json(const struct peer *p)
{
    char hex[NID_HEX_LEN + 1];
    return json_pack("{s:s,s:s}", "id", nid_to_hex(&p->id, hex), "addr", p->addr);
}

json_t *self_json(struct sn *s)
{
    return json_pack("{s:s,s:s}", "id", s->id_hex, "addr", s->advertise);
}

int peer_parse(json_t *j, nid_t *id, char *addr, size_t addrlen)
{
    const char *hex = json_string_value(json_object_get(j, "id"));
    const char *a = json_string_value(json_object_get(j, "addr"));
    if (!json_is_object(j) || !hex || !a || nid_from_hex(id, hex) != 0 || strlen(a) >= addrlen ||
        cfg_parse_hostport(a, NULL, 0, NULL) != 0)
        return -1;
    snprintf(addr, addrlen, "%s", a);
    return 0;
}

bool link_is_sn(const struct link *l)
{
    return l->open && (l->roles & ROLE_SUPERNODE) && l->has_id;
}

/* Links by serial number: answers find their link without walking all of them. */
static size_t serial_bucket(uint64_t serial)
{
    return (size_t)(serial % SN_LINK_BUCKETS);
}

struct link *link_by_serial(struct sn *s, struct link *l, uint64_t serial)
{
    (void)l;
    for (struct link *x = s->link_hash[serial_bucket(serial)]; x; x = x->hnext)
        if (x->serial == serial)
            return x;
    return NULL;
}

static void link_hash_remove(struct sn *s, struct link *l)
{
    for (struct link **pp = &s->link_hash[serial_bucket(l->serial)]; *pp; pp = &(*pp)->hnext)
        if (*pp == l) {
            *pp = l->hnext;
            return;
        }
}

double peer_rto(const struct peer *p)
{
    double rto = p->has_rtt ? p->srtt + 4 * p->rttvar : 1.0;
    if (rto < 0.25)
        rto = 0.25;
    if (rto > 5.0)
        rto = 5.0;
    return rto;
}

static void peer_rtt_sample(struct peer *p, double rtt)
{
    /* RFC 6298 smoothing. */
    if (!p->has_rtt) {
        p->srtt = rtt;
        p->rttvar = rtt / 2;
        p->has_rtt = true;
    } else {
        double d = p->srtt - rtt;
        p->rttvar = 0.75 * p->rttvar + 0.25 * (d < 0 ? -d : d);
        p->srtt = 0.875 * p->srtt + 0.125 * rtt;
    }
}

/* ---- frames ---- */

static void link_flush_queue(struct link *l)
{
    while (l->q_head) {
        struct qframe *q = l->q_head;
        l->q_head = q->next;
        conn_send_frame(l->conn, q->buf, q->len);
        free(q->buf);
        free(q);
    }
    l->q_tail = NULL;
    l->q_n = 0;
}

static void link_drop_queue(struct link *l)
{
    while (l->q_head) {
        struct qframe *q = l->q_head;
        l->q_head = q->next;
        free(q->buf);
        free(q);
    }
    l->q_tail = NULL;
    l->q_n = 0;
}

int link_send(struct link *l, const char *type, enum msg_kind kind, const char *tid, json_t *body)
{
    if (!l || l->closing)
        return -1;
    l->last_used = sn_now(l->sn);
    if (l->open) {
        int rc = conn_send(l->conn, type, kind, tid, body);
        if (rc != 0)
            log_debug("link", "%s: cannot send %s: %s", conn_peer_addr(l->conn), type,
                      rc == CONN_ERR_QUEUE_FULL ? "queue full" : "not open");
        return rc == 0 ? 0 : -1;
    }
    if (l->q_n >= SN_MAX_QUEUED)
        return -1;
    char tbuf[MSG_TID_LEN + 1];
    if (!tid) {
        msg_new_tid(tbuf);
        tid = tbuf;
    }
    struct msg_hdr h = {.overlay = l->sn->overlay, .type = type, .kind = kind, .tid = tid};
    struct qframe *q = calloc(1, sizeof(*q));
    if (!q || msg_encode(&h, body, l->sn->max_frame, &q->buf, &q->len) != MSG_OK) {
        free(q);
        return -1;
    }
    if (l->q_tail)
        l->q_tail->next = q;
    else
        l->q_head = q;
    l->q_tail = q;
    l->q_n++;
    return 0;
}

void link_send_error(struct link *l, const char *tid, const char *code, const char *reason)
{
    json_t *b = json_pack("{s:s,s:s}", "code", code, "reason", reason ? reason : "");
    link_send(l, "error", MSG_ERR, tid, b);
    json_decref(b);
}

/* ---- links ---- */

static void on_open(struct conn *c, void *ud);
static void on_message(struct conn *c, const struct msg *m, void *ud);
static void on_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud);
static const struct conn_cbs link_cbs = {
    .on_open = on_open, .on_message = on_message, .on_close = on_close};

static struct link *link_new(struct sn *s, struct conn *c, bool outgoing)
{
    struct link *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->magic = LINK_MAGIC;
    l->sn = s;
    l->conn = c;
    l->outgoing = outgoing;
    l->ring = outgoing;
    l->serial = ++s->next_serial;
    l->hnext = s->link_hash[serial_bucket(l->serial)];
    s->link_hash[serial_bucket(l->serial)] = l;
    l->last_used = sn_now(s);
    l->next = s->links.next;
    l->prev = &s->links;
    s->links.next->prev = l;
    s->links.next = l;
    s->n_links++;
    return l;
}

static void link_close(struct link *l)
{
    if (l->closing)
        return;
    l->closing = true;
    conn_close(l->conn);
}

struct link *link_to(struct sn *s, const nid_t *id)
{
    for (struct link *l = s->links.next; l != &s->links; l = l->next)
        if (!l->closing && l->open && l->ring && !l->on && l->has_id && nid_eq(&l->id, id))
            return l;
    return NULL;
}

/* Failures that are ours, not the peer's: out of descriptors, buffers, memory or ports. */
static bool local_failure(int err, const char *detail)
{
    static const int codes[] = {EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        if (err == codes[i] || (detail && strstr(detail, strerror(codes[i]))))
            return true;
    return false;
}

/*
 * Makes room for one more link when at max_connections: closes idle links the
 * ring does not need and, if none, the least recently used one that is neither
 * an attached ordinary node's nor a ring neighbour's nor waited on. Frees no
 * peer (callers hold peer pointers). false when nothing could be closed.
 */
static bool links_make_room(struct sn *s)
{
    double now = sn_now(s);
    struct link *lru = NULL;
    size_t n_open = 0;
    for (struct link *l = s->links.next; l != &s->links; l = l->next) {
        if (l->closing)
            continue;
        n_open++;
        if (l->on || l->n_preqs || (l->peer && peer_in_ring(s, l->peer)))
            continue;
        if (now - l->last_used > s->p.peer_idle_s) {
            log_debug("link", "%s: idle, closing", l->conn ? conn_peer_addr(l->conn) : "?");
            if (l->peer && l->peer->link == l)
                l->peer->link = NULL;
            link_close(l);
            n_open--;
            continue;
        }
        if (!lru || l->last_used < lru->last_used)
            lru = l;
    }
    if (n_open < s->p.max_connections)
        return true;
    if (!lru)
        return false;
    log_debug("link", "%s: least recently used, closing to make room",
              lru->conn ? conn_peer_addr(lru->conn) : "?");
    if (lru->peer && lru->peer->link == lru)
        lru->peer->link = NULL;
    link_close(lru);
    return true;
}

bool unverified_dial_possible(struct sn *s)
{
    double now = sn_now(s), rate = s->p.dial_rate, burst = 2 * rate + 8;
    s->dial_tokens += (now - s->dial_refilled) * rate;
    s->dial_refilled = now;
    if (s->dial_tokens > burst)
        s->dial_tokens = burst;
    return s->n_unverified_dials < SN_MAX_UNVERIFIED_DIALS && s->dial_tokens >= 1;
}

void unverified_dial_refused(struct sn *s, const nid_t *id, const char *addr)
{
    char hex[NID_HEX_LEN + 1];
    s->c.dials_refused++;
    if (local_warn_due(s))
        log_warn("link",
                 "not dialling %.8s at %s: address not authenticated and the budget of such "
                 "dials (%d at once, %.0f/s) is spent",
                 nid_to_hex(id, hex), addr, SN_MAX_UNVERIFIED_DIALS, s->p.dial_rate);
}

/* May we dial an address not yet authenticated now? A bounded number at once, and a rate. */
static bool unverified_dial_allowed(struct sn *s)
{
    if (!unverified_dial_possible(s))
        return false;
    s->dial_tokens -= 1;
    return true;
}

static void link_unlink(struct sn *s, struct link *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    s->n_links--;
    link_hash_remove(s, l);
    if (l->unverified_dial) {
        l->unverified_dial = false;
        s->n_unverified_dials--;
    }
}

/*
 * The link to use for a peer: an open or opening one, or a new outgoing one.
 * NULL with s->dial_local set when the reason is ours (bounds, descriptors).
 */
static struct link *peer_link(struct sn *s, struct peer *p)
{
    s->dial_local = false;
    if (p->link && !p->link->closing)
        return p->link;
    p->link = NULL;
    struct link *l = link_to(s, &p->id);
    if (l) {
        p->link = l;
        l->peer = p;
        return l;
    }
    if (!p->addr[0] || nid_eq(&p->id, &s->id))
        return NULL;
    if (s->n_links >= s->p.max_connections && !links_make_room(s)) {
        s->dial_local = true;
        if (local_warn_due(s))
            log_warn("link",
                     "cannot connect to %s: max_connections (%zu) reached by links that "
                     "may not be closed",
                     p->addr, s->p.max_connections);
        return NULL;
    }
    bool unverified = !p->verified && !p->anon;
    if (unverified && !unverified_dial_allowed(s)) {
        s->dial_local = true;
        unverified_dial_refused(s, &p->id, p->addr);
        return NULL;
    }
    char err[256];
    l = link_new(s, NULL, true);
    if (!l)
        return NULL;
    l->peer = p;
    l->id = p->id;
    snprintf(l->dialled, sizeof(l->dialled), "%s", p->addr);
    errno = 0;
    struct conn *c = conn_connect(s->loop, s->tls, p->addr, &link_cbs, l, err, sizeof(err));
    if (!c) {
        s->dial_local = local_failure(errno, err);
        if (!s->dial_local)
            log_warn("link", "cannot connect to %s: %s", p->addr, err);
        else if (local_warn_due(s))
            log_warn("link",
                     "cannot connect to %s: %s (our own shortage: nobody is declared "
                     "dead for it)",
                     p->addr, err);
        link_unlink(s, l);
        free(l);
        return NULL;
    }
    l->conn = c;
    if (unverified) {
        l->unverified_dial = true;
        s->n_unverified_dials++;
    }
    p->link = l;
    log_debug("link", "connecting to %s%s", p->addr,
              unverified ? " (address not yet verified)" : "");
    return l;
}

int peer_send_frame(struct sn *s, struct peer *p, const uint8_t *frame, size_t len)
{
    struct link *l = peer_link(s, p);
    if (!l || l->closing)
        return -1;
    p->last_used = l->last_used = sn_now(s);
    if (l->open)
        return conn_send_frame(l->conn, frame, len) == 0 ? 0 : -1;
    if (l->q_n >= SN_MAX_QUEUED)
        return -1;
    struct qframe *q = calloc(1, sizeof(*q));
    if (!q || !(q->buf = malloc(len))) {
        free(q);
        return -1;
    }
    memcpy(q->buf, frame, len);
    q->len = len;
    if (l->q_tail)
        l->q_tail->next = q;
    else
        l->q_head = q;
    l->q_tail = q;
    l->q_n++;
    return 0;
}

int peer_send(struct sn *s, struct peer *p, const char *type, enum msg_kind kind, const char *tid,
              json_t *body)
{
    struct link *l = peer_link(s, p);
    if (!l)
        return -1;
    p->last_used = sn_now(s);
    return link_send(l, type, kind, tid, body);
}

static void on_open(struct conn *c, void *ud)
{
    struct link *l = ud;
    struct sn *s = l->sn;
    const struct peer_identity *id = conn_peer(c);
    l->conn = c;
    l->roles = id->roles;
    l->has_id = id->has_node_id;
    if (id->has_node_id)
        l->id = id->node_id;
    if (l->unverified_dial) {
        l->unverified_dial = false;
        s->n_unverified_dials--;
    }
    if (l->outgoing && l->peer->anon && id->has_node_id && (id->roles & ROLE_SUPERNODE)) {
        /* A join address: whoever is there is fine; from now on it is known by its ID, and
         * the address is its own (we dialled it and it presented its certificate). */
        struct peer *anon = l->peer, *real = peer_get(s, &id->node_id, anon->addr, PEER_OWN);
        anon->link = NULL;
        if (!real) {
            conn_close(c);
            l->closing = true;
            return;
        }
        l->peer = real;
        l->id = real->id;
        if (!real->link || real->link->closing)
            real->link = l;
        l->open = true;
        link_flush_queue(l);
        return;
    }
    if (l->outgoing) {
        /* We dialled a super node: it must be the one we meant. */
        char want[NID_HEX_LEN + 1], got[NID_HEX_LEN + 1] = "none";
        if (!id->has_node_id || !nid_eq(&id->node_id, &l->peer->id) ||
            !(id->roles & ROLE_SUPERNODE)) {
            if (id->has_node_id)
                nid_to_hex(&id->node_id, got);
            log_warn("link", "%s: expected super node %s, found %s%s: dropping the link",
                     l->dialled, nid_to_hex(&l->peer->id, want), got,
                     (id->roles & ROLE_SUPERNODE) ? "" : " without the super node role");
            link_drop_queue(l);
            conn_close_with_error(c, NULL, "forbidden", "not the node this address was given for");
            l->closing = true;
            /*
             * The node is not where we know it: that counts as its failure (its ring
             * neighbours repair around it). An address we only had from hearsay is
             * forgotten, so that the node's own word or a later report can replace it.
             */
            struct peer *p = l->peer;
            if (p->link == l)
                p->link = NULL;
            if (strcmp(p->addr, l->dialled) != 0)
                return; /* a claim we were checking was false: nothing to do with the node */
            if (!p->verified)
                p->addr[0] = '\0';
            peer_dead(s, p, "wrong certificate at its address");
            return;
        }
        if (!strcmp(l->peer->addr, l->dialled) || l->verify) {
            /* Its certificate vouches for the address. */
            snprintf(l->peer->addr, sizeof(l->peer->addr), "%s", l->dialled);
            l->peer->verified = true;
            if (l->verify && (!l->peer->link || l->peer->link->closing))
                l->peer->link = l;
        }
        l->open = true;
        link_flush_queue(l);
        return;
    }
    if (s->n_links > s->p.max_connections) {
        conn_close_with_error(c, NULL, "overloaded", "too many connections");
        l->closing = true;
        return;
    }
    l->open = true; /* a peer's link only once ring messages come on it (link_ring_traffic) */
}

void link_ring_traffic(struct sn *s, struct link *l)
{
    if (l->ring || l->on || !link_is_sn(l))
        return;
    l->ring = true;
    struct peer *p = peer_find(s, &l->id);
    if (p && (!p->link || p->link->closing))
        p->link = l;
    if (p)
        l->peer = p;
}

/* The budget shared by the links of one certificate (NULL without a Node-ID). */
static struct talker *talker_get(struct sn *s, struct link *l)
{
    if (!l->has_id)
        return NULL;
    for (struct talker *t = s->talkers; t; t = t->next)
        if (nid_eq(&t->id, &l->id)) {
            t->links++;
            return t;
        }
    struct talker *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->id = l->id;
    t->links = 1;
    t->tokens = 2 * s->p.sn_msg_rate;
    t->refilled = sn_now(s);
    t->next = s->talkers;
    s->talkers = t;
    return t;
}

static void talker_put(struct sn *s, struct talker *t)
{
    if (!t || --t->links > 0)
        return;
    for (struct talker **pp = &s->talkers; *pp; pp = &(*pp)->next)
        if (*pp == t) {
            *pp = t->next;
            free(t);
            return;
        }
}

static void link_cut(struct sn *s, struct link *l, const char *code, const char *why)
{
    char hex[NID_HEX_LEN + 1] = "-";
    if (l->has_id)
        nid_to_hex(&l->id, hex);
    s->c.links_cut++;
    log_warn("link", "%s: %.8s %s: closing its link", conn_peer_addr(l->conn), hex, why);
    link_drop_queue(l);
    l->closing = l->cut = true;
    conn_close_with_error(l->conn, NULL, code, why);
}

/*
 * Bounds what one certificate's super node links (not attached ordinary nodes: onsvc.c
 * limits those) may make us do: sn_msg_rate messages per second over all its links,
 * with a burst of two seconds' worth; and requests only while it reads our answers.
 * false when the link was cut.
 */
static bool link_admit(struct sn *s, struct link *l, const struct msg *m)
{
    if (l->on || !l->open || (l->has_id && nid_eq(&l->id, &s->id)))
        return true; /* attached nodes: onsvc.c; our own ordinary side: trusted */
    if (!l->talker)
        l->talker = talker_get(s, l);
    struct talker *t = l->talker;
    if (t) {
        double now = sn_now(s), burst = 2 * s->p.sn_msg_rate;
        t->tokens += (now - t->refilled) * s->p.sn_msg_rate;
        t->refilled = now;
        if (t->tokens > burst)
            t->tokens = burst;
        if (t->tokens < 1) {
            char why[128];
            snprintf(why, sizeof(why), "exceeds %.0f messages/s on super node links",
                     s->p.sn_msg_rate);
            link_cut(s, l, "rate-limited", why);
            return false;
        }
        t->tokens -= 1;
    }
    /*
     * Requests while more than half our write queue has waited for it for SN_UNREAD_S: it
     * does not read what we send. (A burst of replication may fill the queue for a moment;
     * a peer that reads drains it.)
     */
    size_t cap = s->p.tls.max_wqueue ? s->p.tls.max_wqueue : (size_t)1 << 20;
    if (conn_queued_bytes(l->conn) <= cap / 2) {
        l->backlog_since = 0;
    } else if (l->backlog_since <= 0) {
        l->backlog_since = sn_now(s);
    } else if (m->kind == MSG_REQ && sn_now(s) - l->backlog_since > SN_UNREAD_S) {
        link_cut(s, l, "overloaded", "sends requests without reading the answers");
        return false;
    }
    return true;
}

static void on_message(struct conn *c, const struct msg *m, void *ud)
{
    struct link *l = ud;
    struct sn *s = l->sn;
    if (l->cut)
        return; /* nothing more from it is handled */
    if (!link_admit(s, l, m))
        return;
    l->last_used = sn_now(s);
    if (l->peer) {
        l->peer->last_used = l->peer->heard_at = l->last_used;
        l->peer->strikes = 0;
    }
    if (l->on) /* any message shows an attached node alive, not only keepalives */
        l->on->last_seen = l->last_used;
    if (m->kind == MSG_RES || m->kind == MSG_ERR) {
        size_t b = strtoul(m->tid + 8, NULL, 16) % SN_TABLE_SIZE;
        for (struct preq **pp = &s->preqs[b]; *pp; pp = &(*pp)->next) {
            struct preq *r = *pp;
            if (strcmp(r->tid, m->tid) == 0 && r->link_serial == l->serial) {
                *pp = r->next;
                s->n_preqs--;
                if (l->n_preqs)
                    l->n_preqs--;
                if (r->peer && r->peer->n_preqs)
                    r->peer->n_preqs--;
                ev_timer_stop(s->loop, &r->timer);
                if (r->peer && m->kind == MSG_RES)
                    peer_rtt_sample(r->peer, sn_now(s) - r->sent_at);
                r->cb(s, r, m, NULL);
                free(r);
                return;
            }
        }
        return; /* an answer nobody waits for any more (fire-and-forget requests) */
    }
    ring_message(s, l, m);
}

/* A request leaves the table: its link and peer count one fewer. */
static void preq_unaccount(struct sn *s, struct preq *r)
{
    for (struct link *l = s->links.next; l != &s->links; l = l->next)
        if (l->serial == r->link_serial) {
            if (l->n_preqs)
                l->n_preqs--;
            break;
        }
    if (r->peer && r->peer->n_preqs)
        r->peer->n_preqs--;
}

static void preq_fail(struct sn *s, struct preq *r, const char *why)
{
    size_t b = strtoul(r->tid + 8, NULL, 16) % SN_TABLE_SIZE;
    for (struct preq **pp = &s->preqs[b]; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            s->n_preqs--;
            break;
        }
    preq_unaccount(s, r);
    ev_timer_stop(s->loop, &r->timer);
    r->cb(s, r, NULL, why);
    free(r);
}

static void on_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct link *l = ud;
    struct sn *s = l->sn;
    link_unlink(s, l);
    talker_put(s, l->talker);
    l->talker = NULL;
    link_drop_queue(l);
    onsvc_link_closed(s, l);
    /*
     * Requests waiting on this link fail now rather than at their timeout.
     * A callback may start or end other requests: search again after each.
     */
    while (l->n_preqs > 0) {
        struct preq *found = NULL;
        for (size_t b = 0; b < SN_TABLE_SIZE && !found; b++)
            for (struct preq *q = s->preqs[b]; q; q = q->next)
                if (q->link_serial == l->serial) {
                    found = q;
                    break;
                }
        if (!found)
            break;
        l->n_preqs--;
        preq_fail(s, found, "link closed");
    }
    struct peer *p = l->peer;
    if (p && p->link == l) {
        p->link = NULL;
        for (struct link *x = s->links.next; x != &s->links; x = x->next)
            if (!x->closing && x->open && x->ring && !x->on && x->has_id &&
                nid_eq(&x->id, &p->id)) {
                p->link = x;
                x->peer = p;
                break;
            }
    }
    if (p && !p->link && !l->closing && s->state != SN_LEFT) {
        const char *why = detail && *detail ? detail : conn_close_reason_str(r);
        /* Not to be used for routing (known_successor) until we hear from it again. */
        p->heard_at = 0;
        if (l->verify && strcmp(p->addr, l->dialled) != 0) {
            /* a claimed address we could not reach: nothing to do with the node */
        } else if (l->outgoing && !l->open && local_failure(0, detail)) {
            if (local_warn_due(s))
                log_warn("link", "cannot reach %s: %s (our own shortage: %s is not declared dead)",
                         l->dialled, why, l->dialled);
        } else if (l->outgoing && !l->open) {
            /* We could not even reach it; an address we only had from hearsay is forgotten. */
            if (!p->verified && !strcmp(p->addr, l->dialled))
                p->addr[0] = '\0';
            peer_dead(s, p, why);
        } else if (peer_in_ring(s, p))
            ring_peer_lost(s, p, why);
    }
    free(l);
}

/*
 * Accepted connections get their link when they open: before that their
 * userdata is the sn (a close then has nothing of ours to free), after it the
 * link.
 */
static void on_accept_open(struct conn *c, void *ud)
{
    struct sn *s = ud;
    if (s->state == SN_LEFT) {
        /* Accepted before the listener closed, handshake done after we left: nothing here
         * would ever close it, and an open link keeps the loop (and the process) alive. */
        conn_close_with_error(c, NULL, "unavailable", "this super node has left the ring");
        return;
    }
    struct link *l = link_new(s, c, false);
    if (!l) {
        conn_close(c);
        return;
    }
    conn_set_userdata(c, l);
    on_open(c, l);
}

static void on_accept_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    if (*(const uint32_t *)ud == SN_MAGIC)
        return; /* closed before it opened: nothing of ours to free */
    on_close(c, r, detail, ud);
}

static const struct conn_cbs accept_cbs = {
    .on_open = on_accept_open, .on_message = on_message, .on_close = on_accept_close};

int sn_listen(struct sn *s, char *err, size_t errlen)
{
    s->listener = conn_listen(s->loop, s->tls, s->p.listen, &accept_cbs, s, err, errlen);
    return s->listener ? 0 : -1;
}

/* ---- requests on links ---- */

static void preq_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct preq *r = w->data;
    if (r->peer)
        r->peer->strikes++;
    preq_fail(r->sn, r, "timeout");
}

struct preq *peer_request(struct sn *s, struct peer *p, const char *type, json_t *body,
                          double timeout_s, preq_cb cb, void *ud)
{
    struct link *l = peer_link(s, p);
    if (!l)
        return NULL;
    return link_request(s, l, p, type, body, timeout_s, cb, ud);
}

struct link *link_dial_verify(struct sn *s, struct peer *p, const char *addr)
{
    s->dial_local = true; /* a refusal here is never the peer's failure */
    if (nid_eq(&p->id, &s->id))
        return NULL;
    if ((s->n_links >= s->p.max_connections && !links_make_room(s)) ||
        !unverified_dial_allowed(s)) {
        s->c.dials_refused++;
        if (local_warn_due(s))
            log_warn("link", "not dialling %s to verify a claim: over the bound of such dials",
                     addr);
        return NULL;
    }
    char err[256];
    struct link *l = link_new(s, NULL, true);
    if (!l)
        return NULL;
    l->peer = p;
    l->id = p->id;
    l->verify = true;
    snprintf(l->dialled, sizeof(l->dialled), "%s", addr);
    struct conn *c = conn_connect(s->loop, s->tls, addr, &link_cbs, l, err, sizeof(err));
    if (!c) {
        log_info("link", "cannot connect to %s: %s", addr, err);
        link_unlink(s, l);
        free(l);
        return NULL;
    }
    l->conn = c;
    l->unverified_dial = true;
    s->n_unverified_dials++;
    char hex[NID_HEX_LEN + 1];
    log_debug("link", "connecting to %s to verify that it is %.8s", addr, nid_to_hex(&p->id, hex));
    return l;
}

struct preq *link_request(struct sn *s, struct link *l, struct peer *p, const char *type,
                          json_t *body, double timeout_s, preq_cb cb, void *ud)
{
    struct preq *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    msg_new_tid(r->tid);
    if (link_send(l, type, MSG_REQ, r->tid, body) != 0) {
        free(r);
        return NULL;
    }
    p->last_used = sn_now(s);
    r->sn = s;
    r->peer = p;
    r->link_serial = l->serial;
    r->cb = cb;
    r->ud = ud;
    r->sent_at = sn_now(s);
    if (timeout_s <= 0) {
        timeout_s = peer_rto(p);
        /* an opening link needs a connect and a handshake first */
        if (!l->open)
            timeout_s += 2.0;
    }
    ev_timer_init(&r->timer, preq_timeout, timeout_s, 0.);
    r->timer.data = r;
    ev_timer_start(s->loop, &r->timer);
    size_t b = strtoul(r->tid + 8, NULL, 16) % SN_TABLE_SIZE;
    r->next = s->preqs[b];
    s->preqs[b] = r;
    s->n_preqs++;
    l->n_preqs++;
    p->n_preqs++;
    return r;
}

void preq_cancel_all(struct sn *s)
{
    for (size_t b = 0; b < SN_TABLE_SIZE; b++)
        while (s->preqs[b])
            preq_fail(s, s->preqs[b], "cancelled");
}

/* ---- the ring's view of peers ---- */

bool peer_in_ring(const struct sn *s, const struct peer *p)
{
    if (s->pred == p)
        return true;
    for (unsigned i = 0; i < s->n_succ; i++)
        if (s->succ[i] == p)
            return true;
    for (unsigned i = 0; i < SN_FINGERS; i++)
        if (s->finger[i] == p)
            return true;
    return false;
}

void peer_dead(struct sn *s, struct peer *p, const char *why)
{
    char hex[NID_HEX_LEN + 1];
    bool was = peer_in_ring(s, p);
    p->dead_at = sn_now(s);
    p->strikes = 0;
    if (!was)
        return;
    log_info("ring", "peer %.8s at %s is gone (%s): repairing", nid_to_hex(&p->id, hex), p->addr,
             why);
    if (s->pred == p)
        s->pred = NULL;
    unsigned j = 0;
    for (unsigned i = 0; i < s->n_succ; i++)
        if (s->succ[i] != p)
            s->succ[j++] = s->succ[i];
    s->n_succ = j;
    for (unsigned i = 0; i < SN_FINGERS; i++)
        if (s->finger[i] == p)
            s->finger[i] = NULL;
    if (p->link)
        link_close(p->link);
    ring_changed(s);
}

/*
 * From the tick only: closes links the ring does not need that were idle for
 * peer_idle_s (and, over the cap, the least recently used of them), and frees
 * peers nothing refers to. Peers are freed nowhere else: every other caller
 * may hold peer pointers across a dial (peer_link once freed the very peer it
 * was dialling here).
 */
void links_gc(struct sn *s)
{
    double now = sn_now(s);
    if (s->n_links >= s->p.max_connections)
        links_make_room(s);
    else
        for (struct link *l = s->links.next; l != &s->links; l = l->next)
            if (!l->closing && !l->on && !l->n_preqs && !(l->peer && peer_in_ring(s, l->peer)) &&
                now - l->last_used > s->p.peer_idle_s) {
                log_debug("link", "%s: idle, closing", l->conn ? conn_peer_addr(l->conn) : "?");
                if (l->peer && l->peer->link == l)
                    l->peer->link = NULL;
                link_close(l);
            }
    /* Peers: drop those nothing uses. */
    for (struct peer **pp = &s->peers; *pp;) {
        struct peer *p = *pp;
        bool used = p->link || peer_in_ring(s, p) || now - p->last_used < s->p.peer_idle_s;
        if (!used) {
            for (struct link *l = s->links.next; l != &s->links; l = l->next)
                if (l->peer == p) {
                    used = true;
                    break;
                }
        }
        used = used || p->n_preqs > 0;
        if (used) {
            pp = &p->next;
            continue;
        }
        *pp = p->next;
        s->n_peers--;
        free(p);
    }
}

void peer_send_failed(struct sn *s, struct peer *p, const char *why)
{
    if (!s->dial_local) {
        peer_dead(s, p, why);
        return;
    }
    char hex[NID_HEX_LEN + 1];
    log_debug("ring", "cannot send to %.8s at %s for a reason of ours: not declared dead",
              nid_to_hex(&p->id, hex), p->addr);
}
