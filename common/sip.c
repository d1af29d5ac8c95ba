/*
 * SIP transport (sip.h): UDP datagrams and Content-Length-framed TCP
 * streams, parsed with libosip2 after our own bounds checks.
 */
#include "sip.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <sodium.h>

#include "config.h"
#include "errbuf.h"
#include "log.h"

#define LOGM       "sip"
#define UDP_BATCH  64
#define UDP_RCVBUF (4 * 1024 * 1024)
#define SRC_WAYS   8   /* the per-source table: sets of this many slots */
#define SRC_SETS   512 /* 4096 source addresses remembered at once */
/* A transaction never answered is forgotten after this (its owner answers every one far
 * sooner: 32 s, or 180 s of ringing); an answered one is remembered TXN_LINGER_S, so that its
 * retransmissions are not new transactions. */
#define TXN_LIFE_S      300.0
#define TXN_LINGER_S    32.0
#define TXN_BUCKETS_MIN 1024 /* the table doubles while it holds more transactions than buckets */
#define TCP_OUT_MAX     (1u << 20) /* queued bytes to one TCP peer before it is dropped */
#define LOG_BURST       10         /* bad-input lines logged per LOG_WINDOW_S, then counted */
#define LOG_WINDOW_S    10.0

/* One key's state in a keyed table (struct ktab). */
struct kslot {
    uint64_t tag; /* the key's SipHash, never 0; 0: free */
    double tokens, at;
    uint64_t used; /* the table's access count when last used: recency without clock ties */
    uint32_t open; /* server transactions open (the endpoint's table only) */
    uint32_t gen;  /* bumped when the slot changes hands, so old references are told apart */
};

struct ktab {
    unsigned char key[crypto_shorthash_KEYBYTES];
    size_t sets;
    double rate, burst;
    uint64_t accesses;
    struct kslot *s; /* sets * SRC_WAYS */
};

struct sip_limiter {
    struct ktab t;
};

/* A server transaction seen: open until a final response goes back to its source. */
struct stxn {
    struct stxn *hnext;       /* hash chain */
    struct stxn *prev, *next; /* the open list or the answered list, oldest first */
    uint64_t key;
    uint32_t slot, gen; /* its source's slot in e->src */
    double at;          /* when it came, or was answered */
    bool done;
};

struct txn_list {
    struct stxn *head, *tail;
    size_t n;
};

struct tcp_conn {
    struct tcp_conn *next;
    struct sip_endpoint *e;
    int fd;
    ev_io rio, wio;
    ev_timer idle;
    uint64_t serial;
    char addr[64];
    unsigned char akey[SIP_ADDR_KEY_LEN]; /* its source address (accepted ones) */
    bool accepted;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_cap;
    bool closing;    /* close once out is flushed */
    bool connecting; /* ours, the connect not finished yet */
};

struct sip_endpoint {
    struct ev_loop *loop;
    struct sip_limits lim;
    sip_message_fn fn;
    void *ud;
    int udp_fd, tcp_fd;
    ev_io udp_io, tcp_io;
    char addr[80];
    char *rbuf; /* one datagram */
    struct tcp_conn *conns;
    size_t n_conns;
    uint64_t next_serial;
    struct ktab src; /* per source address: message rate, open transactions */
    unsigned char txn_key[crypto_shorthash_KEYBYTES];
    struct stxn **txns; /* hash table of open and answered transactions by key */
    size_t txn_buckets; /* a power of two */
    struct txn_list open, answered;
    ev_timer sweep;
    struct sip_counters c;
    double log_window;
    unsigned logged;
};

/* ---- helpers --------------------------------------------------------------------------------- */

static pthread_once_t parser_once = PTHREAD_ONCE_INIT;

static void quiet_trace(const char *fi, int li, osip_trace_level_t level, const char *chfr,
                        va_list ap)
{
    (void)fi;
    (void)li;
    (void)level;
    (void)chfr;
    (void)ap; /* libosip2's own traces are noise next to our log lines */
}

static void parser_setup(void)
{
    parser_init();
    osip_trace_initialize_func(OSIP_FATAL, quiet_trace);
}

static void addr_str(const struct sockaddr_storage *ss, char *out, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
        snprintf(out, len, "%s:%u", host, port);
    } else {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
        snprintf(out, len, "[%s]:%u", host, port);
    }
}

static int resolve(const char *hostport, struct sockaddr_storage *ss, socklen_t *sl)
{
    char host[256];
    unsigned port;
    if (cfg_parse_hostport(hostport, host, sizeof(host), &port) != 0)
        return -1;
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        *sl = sizeof(*a4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        *sl = sizeof(*a6);
        return 0;
    }
    return -1;
}

/* Bad input is logged, but a flood of it is counted rather than written out line by line. */
static void bad_input(struct sip_endpoint *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void bad_input(struct sip_endpoint *e, const char *fmt, ...)
{
    double now = ev_now(e->loop);
    if (now - e->log_window > LOG_WINDOW_S) {
        if (e->logged > LOG_BURST)
            log_warn(LOGM, "%u more malformed or refused messages in the last %.0f s",
                     e->logged - LOG_BURST, now - e->log_window);
        e->log_window = now;
        e->logged = 0;
    }
    if (e->logged++ >= LOG_BURST)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    log_warn(LOGM, "%s", line);
}

/* ---- keyed per-source state ------------------------------------------------------------------ */

int sip_addr_key(const char *addr, unsigned char out[SIP_ADDR_KEY_LEN])
{
    char host[64];
    const char *colon = strrchr(addr, ':');
    size_t n = colon ? (size_t)(colon - addr) : strlen(addr);
    if (n >= 2 && addr[0] == '[' && addr[n - 1] == ']') {
        addr++;
        n -= 2;
    }
    if (n >= sizeof(host))
        return -1;
    memcpy(host, addr, n);
    host[n] = '\0';
    memset(out, 0, SIP_ADDR_KEY_LEN);
    unsigned char a[16];
    if (inet_pton(AF_INET, host, a) == 1) {
        out[0] = 4;
        memcpy(out + 1, a, 4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, a) == 1) {
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!memcmp(a, mapped, 12)) { /* an IPv4 peer on a dual-stack socket is that address */
            out[0] = 4;
            memcpy(out + 1, a + 12, 4);
        } else {
            out[0] = 6;
            memcpy(out + 1, a, 8); /* a /64: what one host or site gets */
        }
        return 0;
    }
    return -1;
}

static int ktab_init(struct ktab *t, size_t slots, double rate, double burst)
{
    t->sets = slots / SRC_WAYS ? slots / SRC_WAYS : 1;
    t->rate = rate;
    t->burst = burst;
    if (sodium_init() < 0)
        return -1;
    crypto_shorthash_keygen(t->key);
    t->s = calloc(t->sets * SRC_WAYS, sizeof(*t->s));
    return t->s ? 0 : -1;
}

/*
 * The slot of a key: its own, or one taken over in its set: a free one, else the least recently
 * used without open transactions, else the least recently used. A new owner starts with a full
 * bucket. Which keys share a set depends on the secret: an outsider cannot aim at a victim's.
 */
static struct kslot *ktab_get(struct ktab *t, const void *k, size_t len, double now)
{
    uint64_t h;
    crypto_shorthash((unsigned char *)&h, k, len, t->key);
    h |= 1;
    struct kslot *set = t->s + (h % t->sets) * SRC_WAYS, *victim = NULL;
    t->accesses++;
    for (size_t i = 0; i < SRC_WAYS; i++)
        if (set[i].tag == h) {
            set[i].used = t->accesses;
            return &set[i];
        }
    for (size_t i = 0; i < SRC_WAYS; i++) {
        struct kslot *c = &set[i];
        if (!c->tag) {
            victim = c;
            break;
        }
        if (!victim || (c->open == 0 && victim->open > 0) ||
            ((c->open == 0) == (victim->open == 0) && c->used < victim->used))
            victim = c;
    }
    victim->tag = h;
    victim->tokens = t->burst;
    victim->at = now;
    victim->used = t->accesses;
    victim->open = 0;
    victim->gen++;
    return victim;
}

static void ktab_refill(const struct ktab *t, struct kslot *b, double now)
{
    b->tokens += (now - b->at) * t->rate;
    if (b->tokens > t->burst)
        b->tokens = t->burst;
    b->at = now;
}

struct sip_limiter *sip_limiter_new(size_t slots, double rate, double burst)
{
    struct sip_limiter *l = calloc(1, sizeof(*l));
    if (l && ktab_init(&l->t, slots, rate, burst) != 0) {
        free(l);
        l = NULL;
    }
    return l;
}

bool sip_limiter_take(struct sip_limiter *l, const void *key, size_t len, double now, double cost)
{
    struct kslot *b = ktab_get(&l->t, key, len, now);
    ktab_refill(&l->t, b, now);
    if (b->tokens < cost)
        return false;
    b->tokens -= cost;
    return true;
}

double sip_limiter_wait(struct sip_limiter *l, const void *key, size_t len, double now, double cost)
{
    struct kslot *b = ktab_get(&l->t, key, len, now);
    ktab_refill(&l->t, b, now);
    return b->tokens >= cost ? 0. : (cost - b->tokens) / l->t.rate;
}

void sip_limiter_free(struct sip_limiter *l)
{
    if (!l)
        return;
    free(l->t.s);
    free(l);
}

/* The slot of a message's source, NULL when the address is not numeric (never, from a socket). */
static struct kslot *src_slot(struct sip_endpoint *e, const char *addr)
{
    unsigned char k[SIP_ADDR_KEY_LEN];
    if (sip_addr_key(addr, k) != 0)
        return NULL;
    return ktab_get(&e->src, k, sizeof(k), ev_now(e->loop));
}

/* Token bucket per source address. */
static bool rate_ok(struct sip_endpoint *e, const char *addr)
{
    struct kslot *b = src_slot(e, addr);
    if (!b)
        return false;
    ktab_refill(&e->src, b, ev_now(e->loop));
    if (b->tokens < 1.0)
        return false;
    b->tokens -= 1.0;
    return true;
}

/* ---- server transactions per source ------------------------------------------------------- */

static void txn_list_remove(struct txn_list *l, struct stxn *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        l->head = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else
        l->tail = t->prev;
    t->prev = t->next = NULL;
    l->n--;
}

static void txn_list_append(struct txn_list *l, struct stxn *t)
{
    t->next = NULL;
    t->prev = l->tail;
    if (l->tail)
        l->tail->next = t;
    else
        l->head = t;
    l->tail = t;
    l->n++;
}

/* The transaction key of a message going to or coming from addr: source, branch, CSeq method. */
static int txn_key(const struct sip_endpoint *e, const osip_message_t *m, const char *addr,
                   uint64_t *out)
{
    osip_via_t *v = osip_list_get(&m->vias, 0);
    osip_generic_param_t *b = NULL;
    if (!v || osip_via_param_get_byname(v, "branch", &b) != 0 || !b || !b->gvalue || !m->cseq ||
        !m->cseq->method)
        return -1;
    unsigned char buf[SIP_ADDR_KEY_LEN + 300];
    if (sip_addr_key(addr, buf) != 0)
        return -1;
    size_t n = SIP_ADDR_KEY_LEN;
    n += (size_t)snprintf((char *)buf + n, sizeof(buf) - n, "%.200s", b->gvalue) + 1;
    n += (size_t)snprintf((char *)buf + n, sizeof(buf) - n, "%.40s", m->cseq->method);
    if (n > sizeof(buf))
        n = sizeof(buf);
    crypto_shorthash((unsigned char *)out, buf, n, e->txn_key);
    return 0;
}

/*
 * Doubles the hash table: at a few thousand REGISTERs a second, 32 s of answered transactions
 * are a hundred thousand, and chains in a fixed table of 4096 made every lookup a walk (10 %
 * of a front end's CPU). Keys are keyed hashes, so chains stay short. If the larger table
 * cannot be had, the old one serves on (longer chains, no error).
 */
static void txn_grow(struct sip_endpoint *e)
{
    size_t nb = e->txn_buckets * 2;
    struct stxn **t = calloc(nb, sizeof(*t));
    if (!t)
        return;
    for (size_t i = 0; i < e->txn_buckets; i++)
        for (struct stxn *x = e->txns[i], *next; x; x = next) {
            next = x->hnext;
            x->hnext = t[x->key & (nb - 1)];
            t[x->key & (nb - 1)] = x;
        }
    free(e->txns);
    e->txns = t;
    e->txn_buckets = nb;
}

static struct stxn *txn_find(struct sip_endpoint *e, uint64_t key)
{
    for (struct stxn *t = e->txns[key & (e->txn_buckets - 1)]; t; t = t->hnext)
        if (t->key == key)
            return t;
    return NULL;
}

/* An open transaction's source slot gives it back (unless the slot changed hands since). */
static void txn_release(struct sip_endpoint *e, struct stxn *t)
{
    struct kslot *b = &e->src.s[t->slot];
    if (!t->done && b->gen == t->gen && b->open > 0)
        b->open--;
}

static void txn_free(struct sip_endpoint *e, struct stxn *t)
{
    txn_release(e, t);
    txn_list_remove(t->done ? &e->answered : &e->open, t);
    for (struct stxn **pp = &e->txns[t->key & (e->txn_buckets - 1)]; *pp; pp = &(*pp)->hnext)
        if (*pp == t) {
            *pp = t->hnext;
            break;
        }
    free(t);
}

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sip_endpoint *e = w->data;
    double now = ev_now(loop);
    while (e->open.head && now - e->open.head->at > TXN_LIFE_S)
        txn_free(e, e->open.head);
    while (e->answered.head && now - e->answered.head->at > TXN_LINGER_S)
        txn_free(e, e->answered.head);
}

/*
 * A request from the network: a new server transaction unless its key is known (a
 * retransmission). False when its source, or everyone, has too many open: answered 503.
 */
static bool txn_admit(struct sip_endpoint *e, const osip_message_t *m, const struct sip_source *src)
{
    uint64_t key;
    if (!MSG_IS_REQUEST(m) || MSG_IS_ACK(m) || txn_key(e, m, src->addr, &key) != 0 ||
        txn_find(e, key))
        return true; /* no transaction (the owner refuses a request without a branch) */
    struct kslot *b = src_slot(e, src->addr);
    if (!b)
        return true;
    char why[80] = "";
    if (b->open >= e->lim.max_txn_per_source)
        snprintf(why, sizeof(why), "%u transactions open from this source", b->open);
    else if (e->open.n >= e->lim.max_txn)
        snprintf(why, sizeof(why), "%zu transactions open in all", e->open.n);
    struct stxn *t = why[0] ? NULL : calloc(1, sizeof(*t));
    if (!t) {
        e->c.txn_refused++;
        bad_input(e, "%s %s: %s %.80s: %s: answered 503", src->tcp ? "TCP" : "UDP", src->addr,
                  m->sip_method, m->call_id->number, why[0] ? why : "out of memory");
        osip_message_t *r = sip_response_for(m, 503, "Too Many Transactions");
        if (r) {
            char err[200];
            osip_message_set_header(r, "Retry-After", "5");
            sip_send(e, r, src, err, sizeof(err));
            osip_message_free(r);
        }
        return false;
    }
    if (e->answered.n >= e->lim.max_txn) /* the oldest answered one is forgotten first */
        txn_free(e, e->answered.head);
    t->key = key;
    t->slot = (uint32_t)(b - e->src.s);
    t->gen = b->gen;
    t->at = ev_now(e->loop);
    b->open++;
    txn_list_append(&e->open, t);
    if (e->open.n + e->answered.n > e->txn_buckets)
        txn_grow(e);
    t->hnext = e->txns[key & (e->txn_buckets - 1)];
    e->txns[key & (e->txn_buckets - 1)] = t;
    return true;
}

/* A response on its way to `to`: a final one ends the transaction it answers. */
static void txn_answered(struct sip_endpoint *e, const osip_message_t *m, const char *to)
{
    uint64_t key;
    if (MSG_IS_REQUEST(m) || m->status_code < 200 || txn_key(e, m, to, &key) != 0)
        return;
    struct stxn *t = txn_find(e, key);
    if (!t || t->done)
        return;
    txn_release(e, t);
    txn_list_remove(&e->open, t);
    t->done = true;
    t->at = ev_now(e->loop);
    txn_list_append(&e->answered, t);
}

/* ---- parsing -----------------------------------------------------------------------------------
 */

int sip_parse(const char *buf, size_t len, const struct sip_limits *limits, osip_message_t **out,
              char *err, size_t errlen)
{
    pthread_once(&parser_once, parser_setup);
    size_t max = limits && limits->max_message ? limits->max_message : 16384;
    unsigned max_h = limits && limits->max_headers ? limits->max_headers : 64;
    *out = NULL;
    if (len == 0)
        return errbuf_set(err, errlen, -1, "empty message");
    if (len > max)
        return errbuf_set(err, errlen, -1, "message of %zu bytes (at most %zu)", len, max);
    if (memchr(buf, '\0', len))
        return errbuf_set(err, errlen, -1, "NUL byte in the message");
    unsigned lines = 0;
    const char *p = buf, *end = buf + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl)
            break;
        if (nl == p || (nl == p + 1 && *p == '\r'))
            break; /* the empty line: the body follows */
        lines++;
        p = nl + 1;
    }
    if (lines > max_h + 1)
        return errbuf_set(err, errlen, -1, "%u header lines (at most %u)", lines - 1, max_h);
    osip_message_t *m = NULL;
    if (osip_message_init(&m) != 0)
        return errbuf_set(err, errlen, -1, "out of memory");
    if (osip_message_parse(m, buf, len) != 0) {
        osip_message_free(m);
        return errbuf_set(err, errlen, -1, "not a SIP message libosip2 can parse");
    }
    const char *missing = NULL;
    if (MSG_IS_REQUEST(m)) {
        if (!m->sip_method || !m->req_uri || !m->req_uri->host)
            missing = "request line";
    } else if (m->status_code < 100 || m->status_code > 699) {
        missing = "status code 100-699";
    }
    if (!missing && osip_list_size(&m->vias) == 0)
        missing = "Via";
    if (!missing && (!m->from || !m->from->url))
        missing = "From";
    if (!missing && (!m->to || !m->to->url))
        missing = "To";
    if (!missing && (!m->call_id || !m->call_id->number))
        missing = "Call-ID";
    if (!missing && (!m->cseq || !m->cseq->method || !m->cseq->number))
        missing = "CSeq";
    if (missing) {
        osip_message_free(m);
        return errbuf_set(err, errlen, -1, "no valid %s", missing);
    }
    *out = m;
    return 0;
}

static void deliver(struct sip_endpoint *e, const char *buf, size_t len,
                    const struct sip_source *src)
{
    osip_message_t *m;
    char err[256];
    if (sip_parse(buf, len, &e->lim, &m, err, sizeof(err)) != 0) {
        e->c.dropped_garbage++;
        bad_input(e, "%s %s: %s: %s", src->tcp ? "TCP" : "UDP", src->addr,
                  src->tcp ? "answered 400" : "dropped", err);
        if (src->tcp) { /* framing held: answer and go on with the next message */
            static const char resp[] = "SIP/2.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
            for (struct tcp_conn *c = e->conns; c; c = c->next)
                if (c->serial == src->tcp_serial) {
                    size_t need = c->out_len + sizeof(resp) - 1;
                    if (need <= TCP_OUT_MAX) {
                        if (need > c->out_cap) {
                            char *n = realloc(c->out, need);
                            if (!n)
                                break;
                            c->out = n;
                            c->out_cap = need;
                        }
                        memcpy(c->out + c->out_len, resp, sizeof(resp) - 1);
                        c->out_len = need;
                        ev_io_start(e->loop, &c->wio);
                    }
                    break;
                }
        }
        return;
    }
    if (!txn_admit(e, m, src)) {
        osip_message_free(m);
        return;
    }
    e->c.received++;
    e->fn(e->ud, m, src);
    osip_message_free(m);
}

/* ---- UDP ------------------------------------------------------------------------------------- */

static void udp_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct sip_endpoint *e = w->data;
    for (int i = 0; i < UDP_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        ssize_t n = recvfrom(e->udp_fd, e->rbuf, e->lim.max_message + 1, MSG_TRUNC,
                             (struct sockaddr *)&ss, &sl);
        if (n < 0)
            return; /* EAGAIN, or an ICMP error of an earlier send */
        struct sip_source src = {.tcp = false};
        addr_str(&ss, src.addr, sizeof(src.addr));
        if (!rate_ok(e, src.addr)) {
            e->c.dropped_rate++;
            bad_input(e, "UDP %s: over %.0f messages per second: dropped", src.addr, e->lim.rate);
            continue;
        }
        if ((size_t)n > e->lim.max_message) {
            e->c.dropped_size++;
            bad_input(e, "UDP %s: datagram of %zd bytes (at most %zu): dropped", src.addr, n,
                      e->lim.max_message);
            continue;
        }
        /* RFC 3261 7.5: a keepalive of CRLFs is no message. */
        size_t k = 0;
        while (k < (size_t)n && (e->rbuf[k] == '\r' || e->rbuf[k] == '\n'))
            k++;
        if (k == (size_t)n)
            continue;
        deliver(e, e->rbuf + k, (size_t)n - k, &src);
    }
}

/* ---- TCP ------------------------------------------------------------------------------------- */

static void tcp_free(struct tcp_conn *c)
{
    struct sip_endpoint *e = c->e;
    for (struct tcp_conn **pp = &e->conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    e->n_conns--;
    ev_io_stop(e->loop, &c->rio);
    ev_io_stop(e->loop, &c->wio);
    ev_timer_stop(e->loop, &c->idle);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void tcp_flush(struct tcp_conn *c)
{
    if (c->connecting) {
        ev_io_start(c->e->loop, &c->wio);
        return;
    }
    while (c->out_len > 0) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                ev_io_start(c->e->loop, &c->wio);
                return;
            }
            log_info(LOGM, "TCP %s: %s: closed", c->addr, strerror(errno));
            tcp_free(c);
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    ev_io_stop(c->e->loop, &c->wio);
    if (c->closing)
        tcp_free(c);
}

static void tcp_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct tcp_conn *c = w->data;
    if (c->connecting) {
        int e = 0;
        socklen_t el = sizeof(e);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e != 0) {
            log_info(LOGM, "TCP %s: cannot connect: %s (%zu bytes dropped)", c->addr, strerror(e),
                     c->out_len);
            tcp_free(c);
            return;
        }
        c->connecting = false;
        c->e->c.tcp_connected++;
        ev_io_start(loop, &c->rio);
        log_debug(LOGM, "TCP %s: connected", c->addr);
    }
    tcp_flush(c);
}

static int tcp_queue(struct tcp_conn *c, const char *buf, size_t len)
{
    if (c->out_len + len > TCP_OUT_MAX)
        return -1;
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len)
            cap *= 2;
        char *n = realloc(c->out, cap);
        if (!n)
            return -1;
        c->out = n;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, buf, len);
    c->out_len += len;
    tcp_flush(c); /* may free c: the caller must not touch it afterwards */
    return 0;
}

/* Content-Length of a header block (full or compact name), or -1 when absent or malformed. */
static long content_length(const char *hdr, size_t len)
{
    const char *p = hdr, *end = hdr + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *colon = memchr(p, ':', (size_t)(le - p));
        if (colon) {
            const char *ne = colon;
            while (ne > p && (ne[-1] == ' ' || ne[-1] == '\t'))
                ne--;
            size_t nlen = (size_t)(ne - p);
            if ((nlen == 14 && !strncasecmp(p, "Content-Length", 14)) ||
                (nlen == 1 && (*p == 'l' || *p == 'L'))) {
                const char *v = colon + 1;
                while (v < le && (*v == ' ' || *v == '\t'))
                    v++;
                if (v == le || !isdigit((unsigned char)*v))
                    return -1;
                long n = 0;
                while (v < le && isdigit((unsigned char)*v) && n < 100000000)
                    n = n * 10 + (*v++ - '0');
                return n;
            }
        }
        p = nl ? nl + 1 : end;
    }
    return -1;
}

static void tcp_fatal(struct tcp_conn *c, const char *why)
{
    struct sip_endpoint *e = c->e;
    e->c.dropped_garbage++;
    bad_input(e, "TCP %s: %s: answered 400 and closed", c->addr, why);
    char resp[256];
    int n = snprintf(resp, sizeof(resp), "SIP/2.0 400 %s\r\nContent-Length: 0\r\n\r\n",
                     strstr(why, "Content-Length") ? "Missing Content-Length" : "Bad Request");
    c->closing = true;
    c->in_len = 0;
    ev_io_stop(e->loop, &c->rio);
    tcp_queue(c, resp, (size_t)n);
}

/* Takes every complete message off the front of the input buffer. False when c is gone. */
static bool tcp_frames(struct tcp_conn *c)
{
    struct sip_endpoint *e = c->e;
    uint64_t serial = c->serial;
    for (;;) {
        size_t skip = 0;
        while (skip < c->in_len && (c->in[skip] == '\r' || c->in[skip] == '\n'))
            skip++;
        if (skip) {
            memmove(c->in, c->in + skip, c->in_len - skip);
            c->in_len -= skip;
        }
        if (c->in_len == 0)
            return true;
        const char *hend = NULL;
        for (size_t i = 0; i + 3 < c->in_len; i++)
            if (c->in[i] == '\r' && !memcmp(c->in + i, "\r\n\r\n", 4)) {
                hend = c->in + i + 4;
                break;
            }
        if (!hend) {
            if (c->in_len > e->lim.max_message) {
                tcp_fatal(c, "no end of headers within the size limit");
                return false;
            }
            return true;
        }
        size_t hlen = (size_t)(hend - c->in);
        long cl = content_length(c->in, hlen);
        if (cl < 0) {
            tcp_fatal(c, "no valid Content-Length (required over TCP)");
            return false;
        }
        if (hlen + (size_t)cl > e->lim.max_message) {
            e->c.dropped_size++;
            bad_input(e, "TCP %s: message of %zu bytes (at most %zu): answered 513 and closed",
                      c->addr, hlen + (size_t)cl, e->lim.max_message);
            static const char resp[] = "SIP/2.0 513 Message Too Large\r\nContent-Length: 0\r\n\r\n";
            c->closing = true;
            c->in_len = 0;
            ev_io_stop(e->loop, &c->rio);
            tcp_queue(c, resp, sizeof(resp) - 1);
            return false;
        }
        if (c->in_len < hlen + (size_t)cl)
            return true;
        size_t total = hlen + (size_t)cl;
        struct sip_source src = {.tcp = true, .tcp_serial = serial};
        snprintf(src.addr, sizeof(src.addr), "%s", c->addr);
        if (!rate_ok(e, c->addr)) {
            e->c.dropped_rate++;
            bad_input(e, "TCP %s: over %.0f messages per second: dropped", c->addr, e->lim.rate);
        } else {
            char *copy = malloc(total);
            if (copy) {
                memcpy(copy, c->in, total);
                deliver(e, copy, total, &src);
                free(copy);
            }
        }
        /* The callback may have sent on (and so freed) this connection. */
        struct tcp_conn *still = NULL;
        for (struct tcp_conn *x = e->conns; x; x = x->next)
            if (x->serial == serial)
                still = x;
        if (!still)
            return false;
        memmove(c->in, c->in + total, c->in_len - total);
        c->in_len -= total;
    }
}

static void tcp_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct tcp_conn *c = w->data;
    struct sip_endpoint *e = c->e;
    size_t cap = e->lim.max_message + 4096;
    if (!c->in && !(c->in = malloc(cap))) {
        tcp_free(c);
        return;
    }
    c->in_cap = cap;
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        log_debug(LOGM, "TCP %s: closed by the peer", c->addr);
        tcp_free(c);
        return;
    }
    if (n < 0)
        return;
    c->in_len += (size_t)n;
    ev_timer_again(loop, &c->idle);
    tcp_frames(c);
}

static void tcp_idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct tcp_conn *c = w->data;
    log_debug(LOGM, "TCP %s: idle for %.0f s: closed", c->addr, c->e->lim.tcp_idle_s);
    tcp_free(c);
}

static struct tcp_conn *tcp_new(struct sip_endpoint *e, int fd, const char *addr, bool connecting)
{
    struct tcp_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->e = e;
    c->fd = fd;
    c->serial = ++e->next_serial;
    c->connecting = connecting;
    snprintf(c->addr, sizeof(c->addr), "%s", addr);
    ev_io_init(&c->rio, tcp_read_cb, fd, EV_READ);
    c->rio.data = c;
    ev_io_init(&c->wio, tcp_write_cb, fd, EV_WRITE);
    c->wio.data = c;
    ev_init(&c->idle, tcp_idle_cb);
    c->idle.repeat = e->lim.tcp_idle_s;
    c->idle.data = c;
    if (connecting)
        ev_io_start(e->loop, &c->wio);
    else
        ev_io_start(e->loop, &c->rio);
    ev_timer_again(e->loop, &c->idle);
    c->next = e->conns;
    e->conns = c;
    e->n_conns++;
    return c;
}

/* A connection to addr: one open already (ours or the peer's), or a new one of ours. */
static struct tcp_conn *tcp_to(struct sip_endpoint *e, const char *addr, char *err, size_t errlen)
{
    for (struct tcp_conn *c = e->conns; c; c = c->next)
        if (!c->closing && !strcmp(c->addr, addr))
            return c;
    if (e->n_conns >= e->lim.max_tcp) {
        errbuf_set(err, errlen, -1, "%zu TCP connections open already", e->n_conns);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(addr, &ss, &sl) != 0) {
        errbuf_set(err, errlen, -1, "not a numeric address: %s", addr);
        return NULL;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        errbuf_set(err, errlen, -1, "socket: %s", strerror(errno));
        return NULL;
    }
    if (connect(fd, (struct sockaddr *)&ss, sl) != 0 && errno != EINPROGRESS) {
        errbuf_set(err, errlen, -1, "TCP to %s: %s", addr, strerror(errno));
        close(fd);
        return NULL;
    }
    struct tcp_conn *c = tcp_new(e, fd, addr, true);
    if (!c) {
        close(fd);
        errbuf_set(err, errlen, -1, "out of memory");
    }
    return c;
}

static void tcp_accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct sip_endpoint *e = w->data;
    for (int i = 0; i < 16; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(e->tcp_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        char addr[64];
        addr_str(&ss, addr, sizeof(addr));
        unsigned char k[SIP_ADDR_KEY_LEN];
        unsigned same = 0;
        if (sip_addr_key(addr, k) == 0)
            for (struct tcp_conn *c = e->conns; c; c = c->next)
                same += c->accepted && !memcmp(c->akey, k, sizeof(k));
        if (e->n_conns >= e->lim.max_tcp || same >= e->lim.max_tcp_per_source) {
            e->c.tcp_refused++;
            if (e->n_conns >= e->lim.max_tcp)
                bad_input(e, "TCP %s: %zu connections open already: refused", addr, e->n_conns);
            else
                bad_input(e, "TCP %s: %u connections from this address already: refused", addr,
                          same);
            close(fd);
            continue;
        }
        struct tcp_conn *c = tcp_new(e, fd, addr, false);
        if (!c) {
            close(fd);
            continue;
        }
        c->accepted = true;
        memcpy(c->akey, k, sizeof(k));
        e->c.tcp_accepted++;
        log_debug(LOGM, "TCP %s: accepted", addr);
    }
}

/* ---- sending --------------------------------------------------------------------------------- */

int sip_send(struct sip_endpoint *e, osip_message_t *msg, const struct sip_source *to, char *err,
             size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    osip_message_force_update(msg);
    if (osip_message_to_str(msg, &text, &len) != 0 || !text)
        return errbuf_set(err, errlen, -1, "cannot serialise the message");
    int rc = 0;
    if (to->node[0]) {
        rc = errbuf_set(err, errlen, -1, "%s is reached through the overlay, not by sip_send",
                        to->addr);
    } else if (to->tcp && to->tcp_serial) {
        struct tcp_conn *c = e->conns;
        while (c && c->serial != to->tcp_serial)
            c = c->next;
        if (!c || c->closing)
            rc = errbuf_set(err, errlen, -1, "TCP connection to %s is gone", to->addr);
        else if (tcp_queue(c, text, len) != 0)
            rc = errbuf_set(err, errlen, -1, "TCP %s: too much queued", to->addr);
    } else if (to->tcp) {
        struct tcp_conn *c = tcp_to(e, to->addr, err, errlen);
        if (!c)
            rc = -1;
        else if (tcp_queue(c, text, len) != 0)
            rc = errbuf_set(err, errlen, -1, "TCP %s: too much queued", to->addr);
    } else {
        struct sockaddr_storage ss;
        socklen_t sl;
        if (resolve(to->addr, &ss, &sl) != 0)
            rc = errbuf_set(err, errlen, -1, "not a numeric address: %s", to->addr);
        else if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)
            rc = -1;
        else if (sendto(e->udp_fd, text, len, 0, (struct sockaddr *)&ss, sl) < 0)
            rc = errbuf_set(err, errlen, -1, "UDP to %s: %s", to->addr, strerror(errno));
    }
    osip_free(text);
    if (rc == 0)
        e->c.sent++;
    if (!to->node[0]) /* even undelivered (its connection gone), a final answer ends it */
        txn_answered(e, msg, to->addr);
    return rc;
}

osip_message_t *sip_response_for(const osip_message_t *req, int code, const char *reason)
{
    osip_message_t *r = NULL;
    if (osip_message_init(&r) != 0)
        return NULL;
    osip_message_set_version(r, osip_strdup("SIP/2.0"));
    osip_message_set_status_code(r, code);
    const char *phrase = reason ? reason : osip_message_get_reason(code);
    osip_message_set_reason_phrase(r, osip_strdup(phrase ? phrase : "Unknown"));
    if (osip_list_clone(&req->vias, &r->vias, (int (*)(void *, void **))osip_via_clone) != 0 ||
        osip_from_clone(req->from, &r->from) != 0 || osip_to_clone(req->to, &r->to) != 0 ||
        osip_call_id_clone(req->call_id, &r->call_id) != 0 ||
        osip_cseq_clone(req->cseq, &r->cseq) != 0) {
        osip_message_free(r);
        return NULL;
    }
    osip_generic_param_t *tag = NULL;
    if (code > 100 && osip_to_get_tag(r->to, &tag) != 0) {
        uint8_t rnd[6];
        char t[20];
        gnutls_rnd(GNUTLS_RND_NONCE, rnd, sizeof(rnd));
        snprintf(t, sizeof(t), "%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2], rnd[3], rnd[4],
                 rnd[5]);
        osip_to_set_tag(r->to, osip_strdup(t));
    }
    osip_message_set_content_length(r, "0");
    return r;
}

void sip_reply(struct sip_endpoint *e, const osip_message_t *req, const struct sip_source *from,
               int code, const char *reason)
{
    osip_message_t *r = sip_response_for(req, code, reason);
    char err[256];
    if (!r) {
        log_warn(LOGM, "%s: out of memory for a %d response", from->addr, code);
        return;
    }
    if (sip_send(e, r, from, err, sizeof(err)) != 0)
        log_info(LOGM, "%d response to %s not sent: %s", code, from->addr, err);
    osip_message_free(r);
}

/* ---- life ------------------------------------------------------------------------------------ */

static int bind_socket(int type, const struct sockaddr_storage *ss, socklen_t sl, char *err,
                       size_t errlen)
{
    int fd = socket(ss->ss_family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errbuf_set(err, errlen, -1, "socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ss->ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)ss, sl) != 0 ||
        (type == SOCK_STREAM && listen(fd, 128) != 0)) {
        int e = errno;
        close(fd);
        return errbuf_set(err, errlen, -1, "%s: %s", type == SOCK_STREAM ? "TCP" : "UDP",
                          strerror(e));
    }
    return fd;
}

struct sip_endpoint *sip_endpoint_start(struct ev_loop *loop, const char *hostport,
                                        const struct sip_limits *limits, sip_message_fn fn,
                                        void *ud, char *err, size_t errlen)
{
    pthread_once(&parser_once, parser_setup);
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(hostport, &ss, &sl) != 0) {
        errbuf_set(err, errlen, -1, "%s is not a numeric host:port", hostport);
        return NULL;
    }
    struct sip_endpoint *e = calloc(1, sizeof(*e));
    if (!e) {
        errbuf_set(err, errlen, -1, "out of memory");
        return NULL;
    }
    e->loop = loop;
    e->fn = fn;
    e->ud = ud;
    e->udp_fd = e->tcp_fd = -1;
    if (limits)
        e->lim = *limits;
    if (!e->lim.max_message)
        e->lim.max_message = 16384;
    if (!e->lim.max_headers)
        e->lim.max_headers = 64;
    if (e->lim.rate <= 0)
        e->lim.rate = 200;
    if (!e->lim.max_tcp)
        e->lim.max_tcp = 256;
    if (!e->lim.max_tcp_per_source)
        e->lim.max_tcp_per_source = 32;
    if (!e->lim.max_txn)
        e->lim.max_txn = 65536;
    if (!e->lim.max_txn_per_source)
        e->lim.max_txn_per_source = e->lim.rate * 2 > 16 ? (unsigned)(e->lim.rate * 2) : 16;
    if (e->lim.tcp_idle_s <= 0)
        e->lim.tcp_idle_s = 300;
    e->log_window = ev_now(loop);
    crypto_shorthash_keygen(e->txn_key);
    e->txn_buckets = TXN_BUCKETS_MIN;
    e->txns = calloc(e->txn_buckets, sizeof(*e->txns));
    ev_timer_init(&e->sweep, sweep_cb, 1., 1.);
    e->sweep.data = e;
    if (ktab_init(&e->src, SRC_SETS * SRC_WAYS, e->lim.rate, 2 * e->lim.rate) != 0 || !e->txns ||
        !(e->rbuf = malloc(e->lim.max_message + 1))) {
        errbuf_set(err, errlen, -1, "out of memory");
        goto fail;
    }
    char e1[200];
    /* Port 0: the TCP port picked by the kernel is taken for UDP as well. */
    if ((e->tcp_fd = bind_socket(SOCK_STREAM, &ss, sl, e1, sizeof(e1))) < 0) {
        errbuf_set(err, errlen, -1, "SIP on %s: %s", hostport, e1);
        goto fail;
    }
    struct sockaddr_storage bound;
    socklen_t bl = sizeof(bound);
    getsockname(e->tcp_fd, (struct sockaddr *)&bound, &bl);
    if ((e->udp_fd = bind_socket(SOCK_DGRAM, &bound, bl, e1, sizeof(e1))) < 0) {
        errbuf_set(err, errlen, -1, "SIP on %s: %s", hostport, e1);
        goto fail;
    }
    /* The default receive buffer (about 200 KiB: some 90 loopback datagrams, by their kernel
     * size) overflows in a few milliseconds of a busy loop at thousands of messages a second, and
     * every datagram lost costs a phone a 500 ms retransmission. The kernel caps the request at
     * net.core.rmem_max. */
    int want = UDP_RCVBUF;
    if (setsockopt(e->udp_fd, SOL_SOCKET, SO_RCVBUF, &want, sizeof(want)) != 0)
        log_debug(LOGM, "SIP on %s: SO_RCVBUF %d: %s", hostport, want, strerror(errno));
    addr_str(&bound, e->addr, sizeof(e->addr));
    ev_io_init(&e->udp_io, udp_cb, e->udp_fd, EV_READ);
    e->udp_io.data = e;
    ev_io_start(loop, &e->udp_io);
    ev_io_init(&e->tcp_io, tcp_accept_cb, e->tcp_fd, EV_READ);
    e->tcp_io.data = e;
    ev_io_start(loop, &e->tcp_io);
    ev_timer_start(loop, &e->sweep);
    log_info(LOGM, "SIP front end on UDP and TCP %s", e->addr);
    return e;
fail:
    sip_endpoint_stop(e);
    return NULL;
}

const char *sip_endpoint_addr(const struct sip_endpoint *e)
{
    return e->addr;
}

void sip_endpoint_counters(const struct sip_endpoint *e, struct sip_counters *out)
{
    *out = e->c;
}

void sip_endpoint_stop(struct sip_endpoint *e)
{
    if (!e)
        return;
    while (e->conns)
        tcp_free(e->conns);
    ev_timer_stop(e->loop, &e->sweep);
    while (e->open.head)
        txn_free(e, e->open.head);
    while (e->answered.head)
        txn_free(e, e->answered.head);
    free(e->txns);
    free(e->src.s);
    if (e->udp_fd >= 0) {
        ev_io_stop(e->loop, &e->udp_io);
        close(e->udp_fd);
    }
    if (e->tcp_fd >= 0) {
        ev_io_stop(e->loop, &e->tcp_io);
        close(e->tcp_fd);
    }
    free(e->rbuf);
    free(e);
}
