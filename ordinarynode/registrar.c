/*
 * The ordinary node's registrar (registrar.h, RFC 3261 section 10.3).
 *
 * It also tells the proxy who is asking (docs/sip.md, "Who may use the
 * proxy"): a request from the address a current binding was registered from
 * (the same UDP address and port, or the same TCP connection) is the user's
 * own phone; anything else, and everything that came through the overlay,
 * is from outside and reaches only the user's phones.
 */
#include "registrar.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "nodeid.h"
#include "proxy.h"
#include "record.h"
#include "sip_bindings.h"

#define LOGM         "sip"
#define BUSY_RETRY_S 0.05 /* a store found the record being stored: again this much later */
#define BUSY_TRIES   40
#define REG_BATCH    64 /* REGISTERs answered by one store (those that came while one was out) */

struct pending; /* a REGISTER waiting for the overlay's answer */

#define MAX_NETS 32

/* A network phones may register from. */
struct net {
    int family; /* AF_INET or AF_INET6 */
    uint8_t addr[16];
    unsigned bits;
};

/* Where the REGISTER that made (or last refreshed) a binding came from. */
struct phone {
    char contact[256];
    struct sip_source src;
};

struct registrar {
    struct ev_loop *loop;
    struct onode *on;
    char uri[256];
    char aor[256]; /* user@host of our user */
    int64_t max_expires;
    struct sip_endpoint *ep;
    struct proxy *px;
    struct sip_bindings bs;
    struct phone phones[SIPB_MAX]; /* by contact; only those still in bs count */
    size_t n_phones;
    struct net nets[MAX_NETS]; /* REGISTERs come from these */
    size_t n_nets;
    bool any_net;
    struct pending *pending; /* the store in flight */
    struct pending *next;    /* the REGISTERs that came meanwhile: stored together after it */
    uint64_t registrations;
    ev_timer expiry;
    ev_timer retry; /* the pending store again, after a "busy" */
    uint64_t registers, ok, forbidden, failed;
};

struct pending {
    struct registrar *r; /* NULL once the registrar stopped */
    unsigned tries;      /* stores found the record busy */
    struct sip_reg_wait w[REG_BATCH];
    size_t nw;
};

static void stored(void *ud, const struct on_result *res);

static void store(struct registrar *r, struct pending *p)
{
    r->pending = p;
    onode_set_sip_bindings(r->on, sip_bindings_json(&r->bs));
    onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored, p);
}

/* Answers a batch, last first: a failure leaves the bindings as they were before the first. */
static bool answer_batch(struct registrar *r, struct pending *p, bool ok, const char *code,
                         const char *reason)
{
    bool failed = false;
    for (size_t i = p->nw; i-- > 0;) {
        int rc = sip_reg_wait_done(&p->w[i], r ? r->ep : NULL, r ? &r->bs : NULL, r ? r->aor : "",
                                   ok, code, reason);
        if (r && rc > 0)
            r->ok++;
        failed |= rc < 0;
    }
    if (r && !ok)
        r->failed++;
    return failed;
}

static void stored(void *ud, const struct on_result *res)
{
    struct pending *p = ud;
    struct registrar *r = p->r;
    if (r && !res->ok && !strcmp(res->code, "busy") && p->tries++ < BUSY_TRIES) {
        /* The node is refreshing the same record right now: store ours right after it. */
        ev_timer_set(&r->retry, BUSY_RETRY_S, 0.);
        ev_timer_start(r->loop, &r->retry);
        return;
    }
    struct pending *next = r ? r->next : NULL;
    if (r)
        r->pending = r->next = NULL;
    if (!res->ok && next) { /* what came after it was applied on top: undone first */
        answer_batch(r, next, false, res->code, res->reason);
        free(next);
        next = NULL;
    }
    answer_batch(r, p, res->ok, res->code, res->reason);
    if (r && !res->ok)
        onode_set_sip_bindings(r->on, sip_bindings_json(&r->bs));
    free(p);
    if (next)
        store(r, next);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct registrar *r = w->data;
    if (r->pending)
        onode_publish(r->on, "update", REC_TYPE_USER_LOCATION, r->aor, NULL, 0, false, stored,
                      r->pending);
}

/* Whether m is a retransmission of a REGISTER still waiting for its store (its answer comes). */
static bool waiting(const struct pending *p, const osip_message_t *m)
{
    for (size_t i = 0; p && i < p->nw; i++)
        if (sip_reg_wait_same(&p->w[i], m))
            return true;
    return false;
}

/*
 * The bindings as they are now go into the overlay: at once, or right after
 * the store in flight. req (if any) is answered when the overlay has; old:
 * the bindings before it. -1 when the batch is full or memory is short (the
 * caller answers).
 */
static int publish(struct registrar *r, const osip_message_t *req, const struct sip_source *from,
                   const struct sip_bindings *old)
{
    struct pending *p = r->pending ? r->next : NULL;
    bool fresh = !p;
    if (fresh && !(p = calloc(1, sizeof(*p))))
        return -1;
    p->r = r;
    if (req && (p->nw == REG_BATCH || sip_reg_wait_keep(&p->w[p->nw], req, from, old) != 0)) {
        if (fresh)
            free(p);
        return -1;
    }
    if (req)
        p->nw++;
    if (!r->pending)
        store(r, p);
    else
        r->next = p;
    return 0;
}

/* ---- the user's own phones ------------------------------------------------------------------ */

static bool bound(const struct registrar *r, const char *contact)
{
    for (size_t i = 0; i < r->bs.n; i++)
        if (!strcmp(r->bs.b[i].contact, contact))
            return true;
    return false;
}

/* After REGISTER m from `from` changed the bindings: the bindings it made or refreshed are
 * the phone's at `from`; the others keep theirs. */
static void note_phones(struct registrar *r, const osip_message_t *m, const struct sip_source *from)
{
    struct phone keep[SIPB_MAX];
    size_t n = 0;
    unsigned long cseq = strtoul(m->cseq->number, NULL, 10);
    for (size_t i = 0; i < r->bs.n && n < SIPB_MAX; i++) {
        const struct sip_binding *b = &r->bs.b[i];
        const struct phone *old = NULL;
        for (size_t k = 0; k < r->n_phones && !old; k++)
            if (!strcmp(r->phones[k].contact, b->contact))
                old = &r->phones[k];
        if (!strcmp(b->call_id, m->call_id->number) && b->cseq == cseq)
            keep[n].src = *from;
        else if (old)
            keep[n].src = old->src;
        else
            continue;
        snprintf(keep[n].contact, sizeof(keep[n].contact), "%s", b->contact);
        n++;
    }
    memcpy(r->phones, keep, n * sizeof(keep[0]));
    r->n_phones = n;
}

/* Whether `from` is a phone of our user: where a binding that still holds was registered from
 * (over UDP the same address and port; over TCP the same connection). */
static bool own_phone(const struct registrar *r, const struct sip_source *from)
{
    if (from->node[0])
        return false;
    for (size_t i = 0; i < r->n_phones; i++) {
        const struct sip_source *p = &r->phones[i].src;
        if (p->tcp == from->tcp && !strcmp(p->addr, from->addr) &&
            (!p->tcp || p->tcp_serial == from->tcp_serial) && bound(r, r->phones[i].contact))
            return true;
    }
    return false;
}

/* The IP address of "ip:port" or "[v6]:port" (or of a bare host), for comparison. */
static int parse_ip(const char *s, bool with_port, struct sockaddr_storage *ss)
{
    char host[80];
    const char *end = with_port ? strrchr(s, ':') : s + strlen(s);
    if (!end)
        return -1;
    if (*s == '[' && end > s + 1 && end[-1] == ']') {
        s++;
        end--;
    }
    if ((size_t)(end - s) >= sizeof(host))
        return -1;
    memcpy(host, s, (size_t)(end - s));
    host[end - s] = '\0';
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        return 0;
    }
    return -1;
}

static bool same_ip(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET)
        return !memcmp(&((const struct sockaddr_in *)a)->sin_addr,
                       &((const struct sockaddr_in *)b)->sin_addr, sizeof(struct in_addr));
    return !memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                   &((const struct sockaddr_in6 *)b)->sin6_addr, sizeof(struct in6_addr));
}

static bool loopback(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
    return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)a)->sin6_addr);
}

/* Whether ss is an address of this host: the kernel lets a socket bind to it. */
static bool this_host(const struct sockaddr_storage *ss)
{
    int fd = socket(ss->ss_family, SOCK_DGRAM, 0);
    if (fd < 0)
        return false;
    bool ok = bind(fd, (const struct sockaddr *)ss,
                   ss->ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                            : sizeof(struct sockaddr_in6)) == 0;
    close(fd);
    return ok;
}

/* "a.b.c.d/len" or "v6/len" (a bare address: the host alone). 0, or -1. */
static int net_parse(const char *s, struct net *n)
{
    char tmp[80];
    snprintf(tmp, sizeof(tmp), "%s", s);
    char *slash = strchr(tmp, '/');
    if (slash)
        *slash = '\0';
    memset(n, 0, sizeof(*n));
    if (inet_pton(AF_INET, tmp, n->addr) == 1)
        n->family = AF_INET;
    else if (inet_pton(AF_INET6, tmp, n->addr) == 1)
        n->family = AF_INET6;
    else
        return -1;
    unsigned max = n->family == AF_INET ? 32 : 128;
    n->bits = max;
    if (slash) {
        char *end = NULL;
        unsigned long b = strtoul(slash + 1, &end, 10);
        if (!slash[1] || *end || b > max)
            return -1;
        n->bits = (unsigned)b;
    }
    return 0;
}

static bool net_has(const struct net *n, const struct sockaddr_storage *ss)
{
    const uint8_t *a;
    uint8_t v4[4];
    if (ss->ss_family == AF_INET6 &&
        IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)ss)->sin6_addr)) {
        memcpy(v4, ((const struct sockaddr_in6 *)ss)->sin6_addr.s6_addr + 12, 4);
        if (n->family != AF_INET)
            return false;
        a = v4;
    } else if (ss->ss_family != n->family) {
        return false;
    } else {
        a = ss->ss_family == AF_INET ? (const uint8_t *)&((const struct sockaddr_in *)ss)->sin_addr
                                     : ((const struct sockaddr_in6 *)ss)->sin6_addr.s6_addr;
    }
    unsigned full = n->bits / 8, rest = n->bits % 8;
    if (memcmp(a, n->addr, full) != 0)
        return false;
    return !rest || ((a[full] ^ n->addr[full]) & (0xffu << (8 - rest)) & 0xffu) == 0;
}

/* Whether a REGISTER from `from` comes from where phones are (sip_register_from). */
static bool phone_network(const struct registrar *r, const struct sip_source *from)
{
    struct sockaddr_storage ss;
    if (r->any_net)
        return true;
    if (parse_ip(from->addr, true, &ss) != 0)
        return false;
    for (size_t i = 0; i < r->n_nets; i++)
        if (net_has(&r->nets[i], &ss))
            return true;
    return false;
}

/*
 * A phone binds its own address: a Contact names the host the REGISTER came from (or, for a
 * phone on this host that sent from loopback, another address of this host). Else anyone who
 * reaches the port could make the node send its user's calls, and their retransmissions, to a third
 * party. NULL when every Contact qualifies, else the one that does not.
 */
static const char *foreign_contact(const osip_message_t *m, const struct sip_source *from)
{
    struct sockaddr_storage src, c;
    if (parse_ip(from->addr, true, &src) != 0)
        return "?";
    osip_contact_t *ct = NULL;
    for (int i = 0; osip_message_get_contact(m, i, &ct) >= 0 && ct; i++) {
        if (!ct->url) /* "Contact: *" */
            continue;
        const char *host = ct->url->host ? ct->url->host : "";
        if (parse_ip(host, false, &c) != 0)
            return host;
        if (!same_ip(&c, &src) && !(loopback(&src) && !loopback(&c) && this_host(&c)))
            return host;
    }
    return NULL;
}

static void on_register(struct registrar *r, osip_message_t *m, const struct sip_source *from)
{
    r->registers++;
    const osip_uri_t *to = m->to->url;
    if (!to->username || !to->host) {
        sip_reply(r->ep, m, from, 400, "To Needs A User");
        return;
    }
    const char *at = strchr(r->aor, '@');
    if (strlen(to->username) != (size_t)(at - r->aor) ||
        strncmp(to->username, r->aor, (size_t)(at - r->aor)) != 0 || strcasecmp(to->host, at + 1)) {
        r->forbidden++;
        log_warn(LOGM, "%s: REGISTER for %s@%s refused: this node registers only %s", from->addr,
                 to->username, to->host, r->aor);
        char why[320];
        snprintf(why, sizeof(why), "Only %s Registers Here", r->aor);
        sip_reply(r->ep, m, from, 403, why);
        return;
    }
    if (waiting(r->pending, m) || waiting(r->next, m))
        return;
    if (!phone_network(r, from)) {
        r->forbidden++;
        log_warn(LOGM,
                 "%s: REGISTER of %s refused: not from a network phones register from "
                 "(sip_register_from)",
                 from->addr, r->aor);
        sip_reply(r->ep, m, from, 403, "Not From The Phones' Network");
        return;
    }
    const char *foreign = foreign_contact(m, from);
    if (foreign) {
        r->forbidden++;
        log_warn(LOGM,
                 "%s: REGISTER of %s refused: its Contact names %s, not the phone's own "
                 "address",
                 from->addr, r->aor, foreign);
        sip_reply(r->ep, m, from, 403, "Contact Must Be The Phone's Own Address");
        return;
    }
    struct sip_bindings old = r->bs;
    const char *why = NULL;
    int rc =
        sip_bindings_apply(&r->bs, m, (int64_t)time(NULL), r->max_expires, &r->registrations, &why);
    if (rc == 1) /* a query: what is bound now */
        sip_bindings_reply(r->ep, &r->bs, m, from, (int64_t)time(NULL));
    else if (rc != 0)
        sip_bindings_refuse(r->ep, m, from, rc, why);
    else if (publish(r, m, from, &old) != 0) {
        r->bs = old;
        sip_reply_busy(r->ep, m, from);
    } else {
        note_phones(r, m, from);
    }
}

/* The phone to ring for our user: the binding registered (or refreshed) last. */
static const char *current_binding(void *ud, const char *aor, bool *local, const char **flow)
{
    *flow = NULL; /* phones on this host or LAN: their Contact */
    struct registrar *r = ud;
    *local = !strcasecmp(aor, r->aor); /* user@host: the host is case-insensitive, the user */
    if (*local) {                      /* too here: the login server's names are lowercase */
        const char *at = strchr(aor, '@');
        *local = at && !strncmp(aor, r->aor, (size_t)(at - aor));
    }
    return *local ? sip_bindings_latest(&r->bs) : NULL;
}

static void on_message(void *ud, osip_message_t *m, const struct sip_source *from)
{
    struct registrar *r = ud;
    if (!MSG_IS_REQUEST(m)) {
        proxy_response(r->px, m, from);
        return;
    }
    if (MSG_IS_REGISTER(m))
        on_register(r, m, from);
    else if (MSG_IS_OPTIONS(m) && !m->req_uri->username) /* a phone's keepalive to us */
        sip_reply(r->ep, m, from, 200, NULL);
    else
        proxy_request_from(r->px, m, from, own_phone(r, from) ? PROXY_OWN : PROXY_OUTSIDE);
}

void registrar_from_node(struct registrar *r, const char *from, const char *sn, const char *text,
                         size_t len)
{
    proxy_from_node(r->px, from, sn, text, len, true);
}

void registrar_deliver(struct registrar *r, const char *from, json_t *payload)
{
    const char *text = json_string_value(json_object_get(payload, "sip"));
    const char *sn = json_string_value(json_object_get(payload, "sn"));
    if (!r || !text || !sn || strlen(from) != NID_HEX_LEN || strlen(sn) != NID_HEX_LEN) {
        log_info(LOGM, "message through the overlay from %.8s: not SIP for us: dropped", from);
        return;
    }
    proxy_from_node(r->px, from, sn, text, json_string_length(json_object_get(payload, "sip")),
                    false);
}

void registrar_use_channels(struct registrar *r, struct chans *cs)
{
    proxy_use_channels(r->px, cs);
}

void registrar_use_media(struct registrar *r, struct media *md)
{
    proxy_use_media(r->px, md);
}

static void expiry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct registrar *r = w->data;
    int64_t now = (int64_t)time(NULL);
    size_t gone = sip_bindings_expire(&r->bs, now);
    if (gone)
        log_info(LOGM, "%zu binding%s of %s expired", gone, gone == 1 ? "" : "s", r->aor);
    if (gone)
        publish(r, NULL, NULL, NULL);
}

struct registrar *registrar_start(struct ev_loop *loop, struct onode *on, const char *uri,
                                  const char *listen, const struct sip_limits *limits,
                                  int64_t max_expires, char *err, size_t errlen)
{
    struct registrar *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->loop = loop;
    r->on = on;
    snprintf(r->uri, sizeof(r->uri), "%s", uri);
    snprintf(r->aor, sizeof(r->aor), "%s", rec_uri_aor(uri));
    r->max_expires = max_expires > SIPB_MIN_EXPIRES ? max_expires : SIPB_DEF_EXPIRES;
    if (!strchr(r->aor, '@')) {
        snprintf(err, errlen, "the certificate's URI %s names no user@host", uri);
        free(r);
        return NULL;
    }
    if (!(r->ep = sip_endpoint_start(loop, listen, limits, on_message, r, err, errlen))) {
        free(r);
        return NULL;
    }
    if (!(r->px = proxy_new(loop, on, r->ep, strchr(r->aor, '@') + 1, current_binding, r))) {
        snprintf(err, errlen, "out of memory");
        sip_endpoint_stop(r->ep);
        free(r);
        return NULL;
    }
    ev_timer_init(&r->retry, retry_cb, BUSY_RETRY_S, 0.);
    r->retry.data = r;
    registrar_phone_networks(r, NULL, err, errlen); /* the default: cannot fail */
    ev_timer_init(&r->expiry, expiry_cb, 1., 1.);
    r->expiry.data = r;
    ev_timer_start(loop, &r->expiry);
    return r;
}

void registrar_use_dns(struct registrar *r, struct dns_resolver *dns)
{
    proxy_use_dns(r->px, dns);
}

int registrar_phone_networks(struct registrar *r, const struct cfg_strlist *nets, char *err,
                             size_t errlen)
{
    static const char *const private_nets[] = {
        "127.0.0.0/8",    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
        "169.254.0.0/16", "::1/128",    "fc00::/7",      "fe80::/10",
    };
    size_t n = nets && nets->n ? nets->n : sizeof(private_nets) / sizeof(private_nets[0]);
    r->n_nets = 0;
    r->any_net = false;
    for (size_t i = 0; i < n; i++) {
        const char *s = nets && nets->n ? nets->items[i] : private_nets[i];
        if (!strcasecmp(s, "any")) {
            r->any_net = true;
            continue;
        }
        if (r->n_nets == MAX_NETS) {
            snprintf(err, errlen, "more than %d networks", MAX_NETS);
            return -1;
        }
        if (net_parse(s, &r->nets[r->n_nets]) != 0) {
            snprintf(err, errlen, "%s is no network (a.b.c.d/len, v6/len or any)", s);
            return -1;
        }
        r->n_nets++;
    }
    return 0;
}

json_t *registrar_status(struct registrar *r)
{
    int64_t now = (int64_t)time(NULL);
    json_t *b = sip_bindings_status(&r->bs, now);
    struct sip_counters c;
    sip_endpoint_counters(r->ep, &c);
    return json_pack("{s:s,s:s,s:o,s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}", "listen",
                     sip_endpoint_addr(r->ep), "aor", r->aor, "bindings", b, "proxy",
                     proxy_status(r->px), "counters", "received", (json_int_t)c.received,
                     "malformed", (json_int_t)c.dropped_garbage, "rate_limited",
                     (json_int_t)c.dropped_rate, "oversize", (json_int_t)c.dropped_size,
                     "tcp_connected", (json_int_t)c.tcp_connected, "registers",
                     (json_int_t)r->registers, "registered", (json_int_t)r->ok, "forbidden",
                     (json_int_t)r->forbidden, "store_failed", (json_int_t)r->failed);
}

void registrar_stop(struct registrar *r)
{
    if (!r)
        return;
    ev_timer_stop(r->loop, &r->expiry);
    if (r->next) { /* never sent: nothing else will free it */
        answer_batch(NULL, r->next, false, "", "");
        free(r->next);
    }
    if (r->pending && ev_is_active(&r->retry)) { /* waiting to retry: likewise */
        answer_batch(NULL, r->pending, false, "", "");
        free(r->pending);
    } else if (r->pending) {
        r->pending->r = NULL; /* its answer comes (the node fails it at the latest) and frees it */
    }
    ev_timer_stop(r->loop, &r->retry);
    proxy_free(r->px);
    sip_endpoint_stop(r->ep);
    free(r);
}
