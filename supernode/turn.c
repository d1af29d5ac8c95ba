/*
 * The TURN server (turn.h): RFC 8656 over UDP, IPv4 relayed addresses, on the
 * STUN server's socket and the caller's libev loop.
 *
 * Allocations are keyed by the client's transport address (the 5-tuple: the
 * server side and the protocol are always the STUN socket's), in a hash
 * table. Each has its own relay socket, bound to relay_ip and a port of the
 * range. One timer a second expires allocations (lifetime), permissions
 * (300 s) and channel bindings (600 s).
 *
 * Authentication uses libnice's agent in short-term mode with our own
 * validater, which returns the long-term key MD5(username:realm:password)
 * itself: that works the same with every libnice version (newer ones hash a
 * password themselves only in LONG_TERM mode). The validater refuses a
 * malformed or expired username. A request without USERNAME passes libnice
 * and is challenged here (401 + REALM + NONCE). Nonces are stateless:
 * "<expiry hex>" + HMAC(secret, expiry | client address), valid NONCE_TTL_S;
 * an expired or forged one gets 438 and a fresh one.
 *
 * Credentials may be renewed for a running allocation: a request of the same
 * allocation must carry a username of the same node-id (441 otherwise), not
 * the very same username, because the ordinary node's credentials are
 * short-lived and an allocation may outlive them.
 *
 * Unauthenticated requests get at most one error answer each, from a global
 * budget (UNAUTH_RATE a second) so that a 401's modest growth over the
 * request (REALM and NONCE) cannot be turned into a flood at a third party.
 */
#include "turn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stun/stunagent.h>
#include <stun/stunmessage.h>

#include "conn.h"
#include "errbuf.h"
#include "log.h"
#include "stun.h"

#define LOGM            "turn"
#define TURN_BUCKETS    1024
#define TURN_BUF        2048 /* a relayed datagram + our headers; larger ones are dropped */
#define TURN_BATCH      64   /* datagrams per wakeup and relay socket */
#define NONCE_TTL_S     600
#define NONCE_LEN       32     /* 8 hex of expiry + 24 hex of HMAC */
#define UNAUTH_RATE     2000.0 /* error answers a second to unauthenticated requests */
#define LOG_RATE        20.0   /* refusal log lines a second */
#define PORT_TRIES      64
#define MAX_USERNAME    128
#define NODE_HEX        40
#define UDP_PROTO       17
#define CHAN_MIN        0x4000
#define CHAN_MAX        0x7FFF /* RFC 5766's range: coturn's clients use it; 8656 says 0x4FFF */
#define ATTR_REQ_FAMILY 0x0017

static const uint16_t known_attributes[] = {STUN_ATTRIBUTE_USERNAME,
                                            STUN_ATTRIBUTE_MESSAGE_INTEGRITY,
                                            STUN_ATTRIBUTE_FINGERPRINT,
                                            STUN_ATTRIBUTE_SOFTWARE,
                                            STUN_ATTRIBUTE_REALM,
                                            STUN_ATTRIBUTE_NONCE,
                                            STUN_ATTRIBUTE_CHANNEL_NUMBER,
                                            STUN_ATTRIBUTE_LIFETIME,
                                            STUN_ATTRIBUTE_XOR_PEER_ADDRESS,
                                            STUN_ATTRIBUTE_DATA,
                                            STUN_ATTRIBUTE_REQUESTED_TRANSPORT,
                                            STUN_ATTRIBUTE_EVEN_PORT,
                                            ATTR_REQ_FAMILY,
                                            0};

struct cidr {
    uint32_t net, mask; /* host order */
};

static const struct cidr deny_list[] = {
    {0x00000000, 0xFF000000}, /* 0.0.0.0/8 */
    {0x0A000000, 0xFF000000}, /* 10/8 */
    {0x64400000, 0xFFC00000}, /* 100.64/10 */
    {0x7F000000, 0xFF000000}, /* 127/8 */
    {0xA9FE0000, 0xFFFF0000}, /* 169.254/16 */
    {0xAC100000, 0xFFF00000}, /* 172.16/12 */
    {0xC0A80000, 0xFFFF0000}, /* 192.168/16 */
    {0xE0000000, 0xF0000000}, /* 224/4 */
    {0xF0000000, 0xF0000000}, /* 240/4 (and the broadcast address) */
};

struct perm {
    uint32_t ip; /* network order */
    double expires;
};

struct chan {
    uint16_t num;
    struct sockaddr_in peer;
    double expires;
};

struct alloc {
    struct turn_server *t;
    struct alloc *next;                /* hash chain */
    struct alloc *all_next, *all_prev; /* every allocation */
    struct sockaddr_storage client;    /* as received (a v4-mapped v6 address stays so) */
    socklen_t clientlen;
    struct sockaddr_in relay;
    int fd;
    ev_io io;
    double expires;
    char node[NODE_HEX + 1];
    StunTransactionId txid; /* the Allocate that made it: a retransmission gets the same answer */
    struct sockaddr_in mapped;
    struct perm *perms;
    unsigned nperm;
    struct chan *chans;
    unsigned nchan;
    double tokens, refilled; /* bytes */
};

struct turn_server {
    struct ev_loop *loop;
    struct stun_server *stun;
    int sfd;
    char realm[128];
    struct in_addr relay_ip;
    unsigned port_min, port_max;
    unsigned max_alloc, per_node, max_perm, max_chan, default_life, max_life;
    double perm_life, chan_life;
    double bytes_per_s;
    struct cidr *allow;
    size_t n_allow;
    uint32_t *own; /* this host's IPv4 addresses (network order) */
    size_t n_own;
    uint8_t secret[32];
    StunAgent agent_fp, agent_plain;
    struct alloc *hash[TURN_BUCKETS];
    struct alloc all;
    size_t n_alloc;
    ev_timer sweep;
    double unauth_tokens, unauth_at, log_tokens, log_at;
    struct turn_stats st;
    /* the request being handled */
    uint8_t key[16];
    char auth_why[96];
    char auth_node[NODE_HEX + 1];
    uint8_t buf[TURN_BUF + 64];
};

/* ---- small helpers ------------------------------------------------------------------------ */

static double now_s(struct turn_server *t)
{
    return ev_now(t->loop);
}

static bool budget(double *tokens, double *at, double rate, double now)
{
    *tokens += (now - *at) * rate;
    if (*tokens > rate)
        *tokens = rate;
    *at = now;
    if (*tokens < 1.0)
        return false;
    *tokens -= 1.0;
    return true;
}

/* Not inlined: GCC would otherwise see an IPv6 branch taken on a sockaddr_in (array-bounds). */
__attribute__((noinline)) static const char *addr_str(const struct sockaddr *sa, char *out,
                                                      size_t outlen)
{
    char host[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        snprintf(out, outlen, "%s:%u", host, ntohs(s4->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
        snprintf(out, outlen, "[%s]:%u", host, ntohs(s6->sin6_port));
    } else {
        snprintf(out, outlen, "?");
    }
    return out;
}

/* A refusal worth a log line (rate-limited: a flood must not fill the disk). */
static void refusal(struct turn_server *t, const struct sockaddr_storage *from, const char *fmt,
                    ...) __attribute__((format(printf, 3, 4)));
static void refusal(struct turn_server *t, const struct sockaddr_storage *from, const char *fmt,
                    ...)
{
    if (!budget(&t->log_tokens, &t->log_at, LOG_RATE, now_s(t)))
        return;
    char what[256], a[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    log_info(LOGM, "%s: %s", addr_str((const struct sockaddr *)from, a, sizeof(a)), what);
}

/* The IPv4 address of a client (a v4-mapped IPv6 one too); false for real IPv6. */
static bool client_v4(const struct sockaddr_storage *ss, struct sockaddr_in *out)
{
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    if (ss->ss_family == AF_INET) {
        *out = *(const struct sockaddr_in *)ss;
        return true;
    }
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
    if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
        return false;
    out->sin_port = s6->sin6_port;
    memcpy(&out->sin_addr, &s6->sin6_addr.s6_addr[12], 4);
    return true;
}

static size_t client_hash(const struct sockaddr_storage *ss)
{
    uint32_t h = 2166136261u;
    const uint8_t *p;
    size_t n;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        p = (const uint8_t *)&s4->sin_addr;
        n = 4;
        h = (h ^ s4->sin_port) * 16777619u;
    } else {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        p = (const uint8_t *)&s6->sin6_addr;
        n = 16;
        h = (h ^ s6->sin6_port) * 16777619u;
    }
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h % TURN_BUCKETS;
}

static struct alloc *alloc_find(struct turn_server *t, const struct sockaddr_storage *from)
{
    for (struct alloc *a = t->hash[client_hash(from)]; a; a = a->next)
        if (conn_addr_equal(&a->client, from))
            return a;
    return NULL;
}

static int parse_cidr(const char *s, struct cidr *out)
{
    char ip[64];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    if (n == 0 || n >= sizeof(ip))
        return -1;
    memcpy(ip, s, n);
    ip[n] = '\0';
    struct in_addr a;
    if (inet_pton(AF_INET, ip, &a) != 1)
        return -1;
    long bits = 32;
    if (slash) {
        char *end;
        bits = strtol(slash + 1, &end, 10);
        if (!slash[1] || *end || bits < 0 || bits > 32)
            return -1;
    }
    out->mask = bits == 0 ? 0 : 0xFFFFFFFFu << (32 - bits);
    out->net = ntohl(a.s_addr) & out->mask;
    return 0;
}

static bool in_cidrs(const struct cidr *c, size_t n, uint32_t ip_host)
{
    for (size_t i = 0; i < n; i++)
        if ((ip_host & c[i].mask) == c[i].net)
            return true;
    return false;
}

static bool is_own(const struct turn_server *t, uint32_t ip)
{
    if (ip == t->relay_ip.s_addr)
        return true;
    for (size_t i = 0; i < t->n_own; i++)
        if (t->own[i] == ip)
            return true;
    return false;
}

/*
 * The peer policy. port 0: only the address is checked (CreatePermission).
 * NULL when allowed, or why not.
 */
static const char *peer_refused(const struct turn_server *t, const struct sockaddr_in *peer,
                                bool check_port)
{
    uint32_t h = ntohl(peer->sin_addr.s_addr);
    if (in_cidrs(t->allow, t->n_allow, h))
        return NULL;
    if (in_cidrs(deny_list, sizeof(deny_list) / sizeof(deny_list[0]), h))
        return "a private, loopback, link-local, multicast or reserved address";
    if (check_port && is_own(t, peer->sin_addr.s_addr)) {
        unsigned port = ntohs(peer->sin_port);
        bool relay_port = t->port_min == 0 && t->port_max == 0
                              ? port >= 1024
                              : port >= t->port_min && port <= t->port_max;
        if (!relay_port)
            return "this server's own address outside the relay port range";
    }
    return NULL;
}

/* ---- credentials -------------------------------------------------------------------------- */

/* password = base64(HMAC-SHA1(secret, username)); out >= 29 bytes. */
static int password_for(const struct turn_server *t, const char *user, size_t ulen, char *out)
{
    uint8_t mac[20];
    if (gnutls_hmac_fast(GNUTLS_MAC_SHA1, t->secret, sizeof(t->secret), user, ulen, mac) != 0)
        return -1;
    gnutls_datum_t in = {mac, sizeof(mac)}, b64 = {NULL, 0};
    if (gnutls_base64_encode2(&in, &b64) != 0 || b64.size != 28) {
        gnutls_free(b64.data);
        return -1;
    }
    memcpy(out, b64.data, 28);
    out[28] = '\0';
    gnutls_free(b64.data);
    return 0;
}

/* key = MD5(username:realm:password) into t->key. */
static int long_term_key(struct turn_server *t, const char *user, size_t ulen)
{
    char pass[32], buf[MAX_USERNAME + 128 + 40];
    if (password_for(t, user, ulen, pass) != 0)
        return -1;
    int n = snprintf(buf, sizeof(buf), "%.*s:%s:%s", (int)ulen, user, t->realm, pass);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -1;
    return gnutls_hash_fast(GNUTLS_DIG_MD5, buf, (size_t)n, t->key) == 0 ? 0 : -1;
}

static bool valid_node_hex(const char *s, size_t n)
{
    if (n != NODE_HEX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

unsigned turn_bandwidth_kbps(const struct turn_server *t)
{
    return t->bytes_per_s > 0 ? (unsigned)(t->bytes_per_s * 8 / 1000 + 0.5) : 0;
}

int turn_issue(struct turn_server *t, const char *node_id_hex, unsigned ttl_s, char *user,
               size_t ulen, char *pass, size_t plen, char *realm, size_t rlen)
{
    if (!t || !node_id_hex || !valid_node_hex(node_id_hex, strlen(node_id_hex)) || ttl_s == 0)
        return -1;
    long long exp = (long long)time(NULL) + ttl_s;
    int n = snprintf(user, ulen, "%lld:%s", exp, node_id_hex);
    if (n < 0 || (size_t)n >= ulen || plen < 29)
        return -1;
    if (password_for(t, user, (size_t)n, pass) != 0)
        return -1;
    if ((size_t)snprintf(realm, rlen, "%s", t->realm) >= rlen)
        return -1;
    return 0;
}

/* libnice's validater: the key of a well-formed, unexpired username of ours. */
static bool validater(StunAgent *agent, StunMessage *msg, uint8_t *username, uint16_t ulen,
                      uint8_t **password, size_t *plen, void *ud)
{
    (void)agent;
    (void)msg;
    struct turn_server *t = ud;
    const char *u = (const char *)username;
    const char *colon = memchr(u, ':', ulen);
    t->auth_node[0] = '\0';
    if (ulen >= MAX_USERNAME || !colon || colon == u || colon - u > 12 ||
        !valid_node_hex(colon + 1, (size_t)(ulen - (colon + 1 - u)))) {
        snprintf(t->auth_why, sizeof(t->auth_why), "malformed username");
        return false;
    }
    long long exp = 0;
    for (const char *p = u; p < colon; p++) {
        if (*p < '0' || *p > '9') {
            snprintf(t->auth_why, sizeof(t->auth_why), "malformed username");
            return false;
        }
        exp = exp * 10 + (*p - '0');
    }
    if (exp < (long long)time(NULL)) {
        snprintf(t->auth_why, sizeof(t->auth_why), "expired username (%lld s ago)",
                 (long long)time(NULL) - exp);
        return false;
    }
    if (long_term_key(t, u, ulen) != 0) {
        snprintf(t->auth_why, sizeof(t->auth_why), "cannot compute the key");
        return false;
    }
    memcpy(t->auth_node, colon + 1, NODE_HEX);
    t->auth_node[NODE_HEX] = '\0';
    snprintf(t->auth_why, sizeof(t->auth_why), "wrong password (MESSAGE-INTEGRITY)");
    *password = t->key;
    *plen = sizeof(t->key);
    return true;
}

static void make_nonce(struct turn_server *t, const struct sockaddr_storage *from, uint32_t exp,
                       char out[NONCE_LEN + 1])
{
    uint8_t in[4 + 18], mac[20];
    memcpy(in, &exp, 4);
    memset(in + 4, 0, 18);
    if (from->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const void *)from;
        memcpy(in + 4, &s4->sin_addr, 4);
        memcpy(in + 20, &s4->sin_port, 2);
    } else {
        const struct sockaddr_in6 *s6 = (const void *)from;
        memcpy(in + 4, &s6->sin6_addr, 16);
        memcpy(in + 20, &s6->sin6_port, 2);
    }
    gnutls_hmac_fast(GNUTLS_MAC_SHA1, t->secret, sizeof(t->secret), in, sizeof(in), mac);
    snprintf(out, NONCE_LEN + 1, "%08x", exp);
    for (int i = 0; i < 12; i++)
        snprintf(out + 8 + 2 * i, 3, "%02x", mac[i]);
}

static bool nonce_ok(struct turn_server *t, const StunMessage *req,
                     const struct sockaddr_storage *from)
{
    uint16_t n;
    const char *v = stun_message_find(req, STUN_ATTRIBUTE_NONCE, &n);
    if (!v || n != NONCE_LEN)
        return false;
    char hex[9], want[NONCE_LEN + 1];
    memcpy(hex, v, 8);
    hex[8] = '\0';
    char *end;
    unsigned long exp = strtoul(hex, &end, 16);
    if (*end || exp < (unsigned long)time(NULL))
        return false;
    make_nonce(t, from, (uint32_t)exp, want);
    return memcmp(want, v, NONCE_LEN) == 0;
}

/* ---- answers ------------------------------------------------------------------------------ */

static void send_to_client(struct turn_server *t, const uint8_t *b, size_t n,
                           const struct sockaddr_storage *to, socklen_t tolen)
{
    if (sendto(t->sfd, b, n, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)to, tolen) < 0)
        log_debug(LOGM, "sendto client: %s", strerror(errno));
}

/* Finishes and sends resp; with_key: MESSAGE-INTEGRITY with the request's key. */
static void finish_send(struct turn_server *t, StunAgent *agent, StunMessage *resp, bool with_key,
                        const struct sockaddr_storage *to, socklen_t tolen)
{
    size_t n = stun_agent_finish_message(agent, resp, with_key ? t->key : NULL,
                                         with_key ? sizeof(t->key) : 0);
    if (n > 0)
        send_to_client(t, resp->buffer, n, to, tolen);
}

/*
 * An error answer. challenge: with REALM and a fresh NONCE (401, 438).
 * with_key: the request was authenticated (MESSAGE-INTEGRITY on the answer).
 */
static void send_error(struct turn_server *t, StunAgent *agent, const StunMessage *req, int code,
                       bool challenge, bool with_key, const struct sockaddr_storage *from,
                       socklen_t fromlen)
{
    if (!with_key && !budget(&t->unauth_tokens, &t->unauth_at, UNAUTH_RATE, now_s(t)))
        return;
    uint8_t out[512];
    StunMessage resp;
    if (!stun_agent_init_error(agent, &resp, out, sizeof(out), req, (StunError)code))
        return;
    if (challenge) {
        char nonce[NONCE_LEN + 1];
        make_nonce(t, from, (uint32_t)(time(NULL) + NONCE_TTL_S), nonce);
        if (stun_message_append_string(&resp, STUN_ATTRIBUTE_REALM, t->realm) !=
                STUN_MESSAGE_RETURN_SUCCESS ||
            stun_message_append_string(&resp, STUN_ATTRIBUTE_NONCE, nonce) !=
                STUN_MESSAGE_RETURN_SUCCESS)
            return;
    }
    finish_send(t, agent, &resp, with_key, from, fromlen);
}

/* ---- allocations -------------------------------------------------------------------------- */

static void relay_readable(struct ev_loop *loop, ev_io *w, int revents);

static unsigned active_perms(const struct alloc *a)
{
    return a->nperm;
}

static void alloc_free(struct turn_server *t, struct alloc *a, const char *why)
{
    for (struct alloc **pp = &t->hash[client_hash(&a->client)]; *pp; pp = &(*pp)->next)
        if (*pp == a) {
            *pp = a->next;
            break;
        }
    a->all_prev->all_next = a->all_next;
    a->all_next->all_prev = a->all_prev;
    t->n_alloc--;
    t->st.permissions -= active_perms(a);
    t->st.channels -= a->nchan;
    ev_io_stop(t->loop, &a->io);
    close(a->fd);
    char c[64], r[64];
    log_info(LOGM, "allocation %s for %s (node %.8s) ended: %s",
             addr_str((const struct sockaddr *)&a->relay, r, sizeof(r)),
             addr_str((const struct sockaddr *)&a->client, c, sizeof(c)), a->node, why);
    free(a->perms);
    free(a->chans);
    free(a);
}

/*
 * A UDP socket on relay_ip and a port of the range (an even one when even: EVEN-PORT);
 * -1 with errno.
 */
static int bind_relay(struct turn_server *t, bool even, struct sockaddr_in *out)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr = t->relay_ip;
    bool any = t->port_min == 0 && t->port_max == 0;
    unsigned span = any ? 0 : t->port_max - t->port_min + 1;
    int e = EADDRINUSE;
    /* Tries spread over the range from a random start (a stride prime to most spans): a run
     * of ports taken by others, on a host shared with other relays, is stepped over. */
    uint32_t r = 0;
    if (!any)
        gnutls_rnd(GNUTLS_RND_NONCE, &r, sizeof(r));
    for (unsigned i = 0; i < PORT_TRIES && (any || i < span); i++) {
        if (!any) {
            unsigned port = t->port_min + (unsigned)((r + (uint64_t)i * 4099u) % span);
            if (even && port % 2) {
                if (span == 1)
                    break;
                continue;
            }
            sa.sin_port = htons((uint16_t)port);
        }
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
            return -1;
        socklen_t len = sizeof(*out);
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
            getsockname(fd, (struct sockaddr *)out, &len) == 0) {
            if (!even || ntohs(out->sin_port) % 2 == 0)
                return fd;
            close(fd); /* the kernel's pick was odd: another */
            continue;
        }
        e = errno;
        close(fd);
        if (e != EADDRINUSE)
            break;
    }
    errno = e;
    return -1;
}

static unsigned lifetime_of(const struct turn_server *t, const StunMessage *req)
{
    uint32_t want;
    if (stun_message_find32(req, STUN_ATTRIBUTE_LIFETIME, &want) != STUN_MESSAGE_RETURN_SUCCESS)
        want = t->default_life;
    if (want > t->max_life)
        want = t->max_life;
    if (want < t->default_life && want != 0)
        want = t->default_life < t->max_life ? t->default_life : t->max_life;
    return want;
}

static struct perm *perm_find(struct alloc *a, uint32_t ip, double now)
{
    for (unsigned i = 0; i < a->nperm; i++)
        if (a->perms[i].ip == ip && a->perms[i].expires > now)
            return &a->perms[i];
    return NULL;
}

static struct chan *chan_by_num(struct alloc *a, uint16_t num)
{
    for (unsigned i = 0; i < a->nchan; i++)
        if (a->chans[i].num == num)
            return &a->chans[i];
    return NULL;
}

static struct chan *chan_by_peer(struct alloc *a, const struct sockaddr_in *p)
{
    for (unsigned i = 0; i < a->nchan; i++)
        if (a->chans[i].peer.sin_addr.s_addr == p->sin_addr.s_addr &&
            a->chans[i].peer.sin_port == p->sin_port)
            return &a->chans[i];
    return NULL;
}

/* Installs or refreshes the permission for ip; false when over the quota. */
static bool perm_add(struct turn_server *t, struct alloc *a, uint32_t ip, double now)
{
    for (unsigned i = 0; i < a->nperm; i++)
        if (a->perms[i].ip == ip) {
            a->perms[i].expires = now + t->perm_life;
            return true;
        }
    if (a->nperm >= t->max_perm)
        return false;
    if (!a->perms && !(a->perms = calloc(t->max_perm, sizeof(*a->perms))))
        return false;
    a->perms[a->nperm++] = (struct perm){ip, now + t->perm_life};
    t->st.permissions++;
    return true;
}

/* Bandwidth: spends n bytes of the allocation's budget; false when over it. */
static bool spend(struct turn_server *t, struct alloc *a, size_t n, double now)
{
    if (t->bytes_per_s <= 0)
        return true;
    a->tokens += (now - a->refilled) * t->bytes_per_s;
    if (a->tokens > t->bytes_per_s) /* a burst of one second's worth */
        a->tokens = t->bytes_per_s;
    a->refilled = now;
    if (a->tokens < (double)n) {
        t->st.dropped_bandwidth++;
        return false;
    }
    a->tokens -= (double)n;
    return true;
}

static unsigned node_allocations(const struct turn_server *t, const char *node)
{
    unsigned n = 0;
    for (const struct alloc *a = t->all.all_next; a != &t->all; a = a->all_next)
        if (!strcmp(a->node, node))
            n++;
    return n;
}

static bool xor_peer(const StunMessage *req, struct sockaddr_in *peer)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    if (stun_message_find_xor_addr(req, STUN_ATTRIBUTE_XOR_PEER_ADDRESS, &ss, &len) !=
            STUN_MESSAGE_RETURN_SUCCESS ||
        ss.ss_family != AF_INET)
        return false;
    memcpy(peer, &ss, sizeof(*peer));
    return true;
}

static void send_alloc_success(struct turn_server *t, StunAgent *agent, const StunMessage *req,
                               struct alloc *a, const struct sockaddr_storage *from,
                               socklen_t fromlen)
{
    uint8_t out[512];
    StunMessage resp;
    double left = a->expires - now_s(t);
    if (!stun_agent_init_response(agent, &resp, out, sizeof(out), req) ||
        stun_message_append_xor_addr(&resp, STUN_ATTRIBUTE_XOR_RELAYED_ADDRESS,
                                     (struct sockaddr_storage *)&a->relay, sizeof(a->relay)) ||
        stun_message_append32(&resp, STUN_ATTRIBUTE_LIFETIME, left > 0 ? (uint32_t)left : 0) ||
        stun_message_append_xor_addr(&resp, STUN_ATTRIBUTE_XOR_MAPPED_ADDRESS,
                                     (struct sockaddr_storage *)&a->mapped, sizeof(a->mapped)))
        return;
    finish_send(t, agent, &resp, true, from, fromlen);
}

static void on_allocate(struct turn_server *t, StunAgent *agent, const StunMessage *req,
                        struct alloc *a, const struct sockaddr_storage *from, socklen_t fromlen)
{
    StunTransactionId id;
    stun_message_id(req, id);
    if (a) {
        if (!memcmp(id, a->txid, sizeof(a->txid)))
            send_alloc_success(t, agent, req, a, from, fromlen); /* a retransmission */
        else {
            t->st.refused_other++;
            send_error(t, agent, req, STUN_ERROR_ALLOCATION_MISMATCH, false, true, from, fromlen);
        }
        return;
    }
    uint32_t transport;
    if (stun_message_find32(req, STUN_ATTRIBUTE_REQUESTED_TRANSPORT, &transport) !=
        STUN_MESSAGE_RETURN_SUCCESS) {
        t->st.refused_other++;
        refusal(t, from, "Allocate without REQUESTED-TRANSPORT: 400");
        send_error(t, agent, req, STUN_ERROR_BAD_REQUEST, false, true, from, fromlen);
        return;
    }
    if (transport >> 24 != UDP_PROTO) {
        t->st.refused_other++;
        refusal(t, from, "Allocate for transport %u: 442 (UDP only)", transport >> 24);
        send_error(t, agent, req, STUN_ERROR_UNSUPPORTED_TRANSPORT, false, true, from, fromlen);
        return;
    }
    uint32_t fam;
    if (stun_message_find32(req, ATTR_REQ_FAMILY, &fam) == STUN_MESSAGE_RETURN_SUCCESS &&
        fam >> 24 != 0x01) {
        t->st.refused_other++;
        send_error(t, agent, req, STUN_ERROR_UNSUPPORTED_FAMILY, false, true, from, fromlen);
        return;
    }
    struct sockaddr_in mapped;
    if (!client_v4(from, &mapped)) {
        t->st.refused_other++;
        send_error(t, agent, req, STUN_ERROR_UNSUPPORTED_FAMILY, false, true, from, fromlen);
        return;
    }
    if (t->n_alloc >= t->max_alloc) {
        t->st.refused_quota++;
        refusal(t, from, "node %.8s: %zu allocations in all: 508", t->auth_node, t->n_alloc);
        send_error(t, agent, req, STUN_ERROR_INSUFFICIENT_CAPACITY, false, true, from, fromlen);
        return;
    }
    unsigned mine = node_allocations(t, t->auth_node);
    if (mine >= t->per_node) {
        t->st.refused_quota++;
        refusal(t, from, "node %.8s has %u allocations: 486", t->auth_node, mine);
        send_error(t, agent, req, STUN_ERROR_ALLOCATION_QUOTA_REACHED, false, true, from, fromlen);
        return;
    }
    a = calloc(1, sizeof(*a));
    if (!a) {
        send_error(t, agent, req, STUN_ERROR_SERVER_ERROR, false, true, from, fromlen);
        return;
    }
    /* EVEN-PORT: the parity is honoured; the R bit's reservation of the next port is not
     * offered (no RESERVATION-TOKEN in the answer), which RFC 8656 7.2 lets a client see. */
    a->fd = bind_relay(t, stun_message_has_attribute(req, STUN_ATTRIBUTE_EVEN_PORT), &a->relay);
    if (a->fd < 0) {
        t->st.refused_quota++;
        refusal(t, from, "no relay port: %s: 508", strerror(errno));
        free(a);
        send_error(t, agent, req, STUN_ERROR_INSUFFICIENT_CAPACITY, false, true, from, fromlen);
        return;
    }
    a->t = t;
    a->client = *from;
    a->clientlen = fromlen;
    a->mapped = mapped;
    memcpy(a->txid, id, sizeof(a->txid));
    snprintf(a->node, sizeof(a->node), "%s", t->auth_node);
    double now = now_s(t);
    a->expires = now + lifetime_of(t, req);
    a->tokens = t->bytes_per_s;
    a->refilled = now;
    ev_io_init(&a->io, relay_readable, a->fd, EV_READ);
    a->io.data = a;
    ev_io_start(t->loop, &a->io);
    size_t b = client_hash(from);
    a->next = t->hash[b];
    t->hash[b] = a;
    a->all_next = t->all.all_next;
    a->all_prev = &t->all;
    t->all.all_next->all_prev = a;
    t->all.all_next = a;
    t->n_alloc++;
    t->st.created++;
    char c[64], r[64];
    log_info(LOGM, "allocation %s for %s (node %.8s), %.0f s",
             addr_str((const struct sockaddr *)&a->relay, r, sizeof(r)),
             addr_str((const struct sockaddr *)from, c, sizeof(c)), a->node, a->expires - now);
    send_alloc_success(t, agent, req, a, from, fromlen);
}

static void on_refresh(struct turn_server *t, StunAgent *agent, const StunMessage *req,
                       struct alloc *a, const struct sockaddr_storage *from, socklen_t fromlen)
{
    uint32_t life = lifetime_of(t, req);
    uint8_t out[256];
    StunMessage resp;
    if (!stun_agent_init_response(agent, &resp, out, sizeof(out), req) ||
        stun_message_append32(&resp, STUN_ATTRIBUTE_LIFETIME, life))
        return;
    finish_send(t, agent, &resp, true, from, fromlen);
    if (life == 0)
        alloc_free(t, a, "deleted by the client");
    else
        a->expires = now_s(t) + life;
}

static void on_create_permission(struct turn_server *t, StunAgent *agent, const StunMessage *req,
                                 struct alloc *a, const struct sockaddr_storage *from,
                                 socklen_t fromlen)
{
    /* Every XOR-PEER-ADDRESS: checked all first, installed only if all pass. */
    uint32_t ips[64];
    unsigned n = 0;
    uint16_t mlen = stun_message_length(req);
    size_t off = STUN_MESSAGE_ATTRIBUTES_POS;
    const uint8_t *b = req->buffer;
    while (off + 4 <= mlen && n < 64) {
        uint16_t type = (uint16_t)(b[off] << 8 | b[off + 1]);
        uint16_t alen = (uint16_t)(b[off + 2] << 8 | b[off + 3]);
        if (type == STUN_ATTRIBUTE_XOR_PEER_ADDRESS) {
            if (alen != 8 || b[off + 5] != 0x01) {
                t->st.refused_other++;
                send_error(t, agent, req, STUN_ERROR_UNSUPPORTED_FAMILY, false, true, from,
                           fromlen);
                return;
            }
            uint32_t ip;
            memcpy(&ip, b + off + 8, 4);
            ip ^= htonl(STUN_MAGIC_COOKIE);
            struct sockaddr_in p = {.sin_family = AF_INET};
            p.sin_addr.s_addr = ip;
            const char *why = peer_refused(t, &p, false);
            if (why) {
                char pa[64];
                t->st.refused_peer++;
                refusal(t, from, "node %.8s: CreatePermission for %s refused (%s): 403", a->node,
                        inet_ntop(AF_INET, &p.sin_addr, pa, sizeof(pa)) ? pa : "?", why);
                send_error(t, agent, req, STUN_ERROR_FORBIDDEN, false, true, from, fromlen);
                return;
            }
            ips[n++] = ip;
        }
        off += 4 + ((alen + 3u) & ~3u);
    }
    if (n == 0) {
        t->st.refused_other++;
        send_error(t, agent, req, STUN_ERROR_BAD_REQUEST, false, true, from, fromlen);
        return;
    }
    double now = now_s(t);
    unsigned fresh = 0;
    for (unsigned i = 0; i < n; i++)
        if (!perm_find(a, ips[i], -1.0))
            fresh++;
    if (a->nperm + fresh > t->max_perm) {
        t->st.refused_quota++;
        refusal(t, from, "node %.8s: more than %u permissions: 508", a->node, t->max_perm);
        send_error(t, agent, req, STUN_ERROR_INSUFFICIENT_CAPACITY, false, true, from, fromlen);
        return;
    }
    for (unsigned i = 0; i < n; i++)
        perm_add(t, a, ips[i], now);
    uint8_t out[256];
    StunMessage resp;
    if (stun_agent_init_response(agent, &resp, out, sizeof(out), req))
        finish_send(t, agent, &resp, true, from, fromlen);
}

static void on_channel_bind(struct turn_server *t, StunAgent *agent, const StunMessage *req,
                            struct alloc *a, const struct sockaddr_storage *from, socklen_t fromlen)
{
    uint32_t cn;
    struct sockaddr_in peer;
    if (stun_message_find32(req, STUN_ATTRIBUTE_CHANNEL_NUMBER, &cn) !=
            STUN_MESSAGE_RETURN_SUCCESS ||
        !xor_peer(req, &peer) || (cn >> 16) < CHAN_MIN || (cn >> 16) > CHAN_MAX) {
        t->st.refused_other++;
        refusal(t, from,
                "node %.8s: ChannelBind without a valid channel number (0x4000-0x7fff) "
                "or an IPv4 XOR-PEER-ADDRESS: 400",
                a->node);
        send_error(t, agent, req, STUN_ERROR_BAD_REQUEST, false, true, from, fromlen);
        return;
    }
    uint16_t num = (uint16_t)(cn >> 16);
    const char *why = peer_refused(t, &peer, true);
    if (why) {
        char pa[64];
        t->st.refused_peer++;
        refusal(t, from, "node %.8s: ChannelBind to %s refused (%s): 403", a->node,
                addr_str((struct sockaddr *)&peer, pa, sizeof(pa)), why);
        send_error(t, agent, req, STUN_ERROR_FORBIDDEN, false, true, from, fromlen);
        return;
    }
    struct chan *byn = chan_by_num(a, num), *byp = chan_by_peer(a, &peer);
    if (byn != byp) { /* the number bound to another peer, or the peer to another number */
        t->st.refused_other++;
        refusal(t, from, "node %.8s: channel 0x%04x or its peer already bound otherwise: 400",
                a->node, num);
        send_error(t, agent, req, STUN_ERROR_BAD_REQUEST, false, true, from, fromlen);
        return;
    }
    double now = now_s(t);
    if (!byn && (a->nchan >= t->max_chan ||
                 (!perm_find(a, peer.sin_addr.s_addr, -1.0) && a->nperm >= t->max_perm))) {
        t->st.refused_quota++;
        refusal(t, from, "node %.8s: channel or permission quota: 508", a->node);
        send_error(t, agent, req, STUN_ERROR_INSUFFICIENT_CAPACITY, false, true, from, fromlen);
        return;
    }
    if (!byn) {
        if (!a->chans && !(a->chans = calloc(t->max_chan, sizeof(*a->chans)))) {
            send_error(t, agent, req, STUN_ERROR_SERVER_ERROR, false, true, from, fromlen);
            return;
        }
        byn = &a->chans[a->nchan++];
        byn->num = num;
        byn->peer = peer;
        t->st.channels++;
    }
    byn->expires = now + t->chan_life;
    perm_add(t, a, peer.sin_addr.s_addr, now);
    uint8_t out[256];
    StunMessage resp;
    if (stun_agent_init_response(agent, &resp, out, sizeof(out), req))
        finish_send(t, agent, &resp, true, from, fromlen);
}

/* ---- relaying ----------------------------------------------------------------------------- */

static void to_peer(struct turn_server *t, struct alloc *a, const struct sockaddr_in *peer,
                    const uint8_t *data, size_t n)
{
    double now = now_s(t);
    if (!perm_find(a, peer->sin_addr.s_addr, now) || peer_refused(t, peer, true)) {
        t->st.dropped_other++;
        return;
    }
    if (!spend(t, a, n, now))
        return;
    if (sendto(a->fd, data, n, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)peer,
               sizeof(*peer)) < 0) {
        t->st.dropped_other++;
        return;
    }
    t->st.pkts_to_peer++;
    t->st.bytes_to_peer += n;
}

static void on_send_indication(struct turn_server *t, const StunMessage *msg,
                               const struct sockaddr_storage *from)
{
    struct alloc *a = alloc_find(t, from);
    struct sockaddr_in peer;
    uint16_t n;
    const uint8_t *data = stun_message_find(msg, STUN_ATTRIBUTE_DATA, &n);
    if (!a || !data || !xor_peer(msg, &peer)) {
        t->st.dropped_other++;
        return;
    }
    to_peer(t, a, &peer, data, n);
}

static void on_channel_data(struct turn_server *t, const uint8_t *b, size_t len,
                            const struct sockaddr_storage *from)
{
    uint16_t num = (uint16_t)(b[0] << 8 | b[1]), n = (uint16_t)(b[2] << 8 | b[3]);
    struct alloc *a = alloc_find(t, from);
    struct chan *c = a ? chan_by_num(a, num) : NULL;
    if (!c || (size_t)n + 4 > len || c->expires <= now_s(t)) {
        t->st.dropped_other++;
        return;
    }
    to_peer(t, a, &c->peer, b + 4, n);
}

static void relay_readable(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    struct alloc *a = w->data;
    struct turn_server *t = a->t;
    /* 36 bytes of room in front: the Data indication's header and XOR-PEER-ADDRESS. */
    uint8_t *data = t->buf + 36;
    for (int i = 0; i < TURN_BATCH; i++) {
        struct sockaddr_in peer;
        socklen_t plen = sizeof(peer);
        ssize_t n =
            recvfrom(a->fd, data, TURN_BUF - 36, MSG_TRUNC, (struct sockaddr *)&peer, &plen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        double now = now_s(t);
        if ((size_t)n > TURN_BUF - 36 || peer.sin_family != AF_INET ||
            !perm_find(a, peer.sin_addr.s_addr, now)) {
            t->st.dropped_other++;
            continue;
        }
        if (!spend(t, a, (size_t)n, now))
            continue;
        struct chan *c = chan_by_peer(a, &peer);
        uint8_t *out;
        size_t outlen;
        if (c && c->expires > now) {
            out = data - 4; /* ChannelData; no padding over UDP (RFC 8656 12.5) */
            out[0] = (uint8_t)(c->num >> 8);
            out[1] = (uint8_t)c->num;
            out[2] = (uint8_t)(n >> 8);
            out[3] = (uint8_t)n;
            outlen = (size_t)n + 4;
        } else {
            /* Data indication: header, XOR-PEER-ADDRESS, DATA (padded). */
            size_t pad = (4 - (size_t)n % 4) % 4;
            out = data - 36;
            size_t body = 12 + 4 + (size_t)n + pad;
            out[0] = 0x00;
            out[1] = 0x17; /* indication, method Data */
            out[2] = (uint8_t)(body >> 8);
            out[3] = (uint8_t)body;
            uint32_t cookie = htonl(STUN_MAGIC_COOKIE);
            memcpy(out + 4, &cookie, 4);
            gnutls_rnd(GNUTLS_RND_NONCE, out + 8, 12);
            out[20] = 0x00;
            out[21] = 0x12;
            out[22] = 0x00;
            out[23] = 0x08;
            out[24] = 0x00;
            out[25] = 0x01;
            uint16_t xport = (uint16_t)(ntohs(peer.sin_port) ^ (STUN_MAGIC_COOKIE >> 16));
            out[26] = (uint8_t)(xport >> 8);
            out[27] = (uint8_t)xport;
            uint32_t xip = peer.sin_addr.s_addr ^ cookie;
            memcpy(out + 28, &xip, 4);
            out[32] = 0x00;
            out[33] = 0x13;
            out[34] = (uint8_t)(n >> 8);
            out[35] = (uint8_t)n;
            memset(data + n, 0, pad);
            outlen = 20 + body;
        }
        if (sendto(t->sfd, out, outlen, MSG_DONTWAIT | MSG_NOSIGNAL,
                   (const struct sockaddr *)&a->client, a->clientlen) < 0) {
            t->st.dropped_other++;
            continue;
        }
        t->st.pkts_to_client++;
        t->st.bytes_to_client += (uint64_t)n;
    }
}

/* ---- dispatch ----------------------------------------------------------------------------- */

static void demux(void *ud, const uint8_t *b, size_t len, const struct sockaddr_storage *from,
                  socklen_t fromlen)
{
    struct turn_server *t = ud;
    if ((b[0] & 0xC0) == 0x40) {
        on_channel_data(t, b, len, from);
        return;
    }
    StunMessage req;
    StunAgent *agent = &t->agent_fp;
    t->auth_why[0] = '\0';
    t->auth_node[0] = '\0';
    StunValidationStatus v = stun_agent_validate(agent, &req, b, len, validater, t);
    if (v == STUN_VALIDATION_BAD_REQUEST) {
        if (stun_message_has_attribute(&req, STUN_ATTRIBUTE_FINGERPRINT)) {
            t->st.dropped_other++;
            return;
        }
        agent = &t->agent_plain;
        v = stun_agent_validate(agent, &req, b, len, validater, t);
    }
    if (v == STUN_VALIDATION_NOT_STUN || v == STUN_VALIDATION_INCOMPLETE_STUN ||
        v == STUN_VALIDATION_BAD_REQUEST || v == STUN_VALIDATION_UNMATCHED_RESPONSE) {
        t->st.dropped_other++;
        return;
    }
    StunClass cls = stun_message_get_class(&req);
    StunMethod method = stun_message_get_method(&req);
    if (cls == STUN_INDICATION) {
        if (method == STUN_IND_SEND &&
            (v == STUN_VALIDATION_SUCCESS || v == STUN_VALIDATION_UNKNOWN_ATTRIBUTE))
            on_send_indication(t, &req, from);
        else
            t->st.dropped_other++;
        return;
    }
    if (cls != STUN_REQUEST || (method != STUN_ALLOCATE && method != STUN_REFRESH &&
                                method != STUN_CREATEPERMISSION && method != STUN_CHANNELBIND)) {
        t->st.dropped_other++; /* responses, other methods: never answered */
        return;
    }
    if (v == STUN_VALIDATION_UNAUTHORIZED || v == STUN_VALIDATION_UNAUTHORIZED_BAD_REQUEST) {
        t->st.refused_auth++;
        refusal(t, from, "refused credentials: %s: 401",
                t->auth_why[0] ? t->auth_why : "USERNAME without MESSAGE-INTEGRITY");
        send_error(t, agent, &req, STUN_ERROR_UNAUTHORIZED, true, false, from, fromlen);
        return;
    }
    if (v == STUN_VALIDATION_UNKNOWN_REQUEST_ATTRIBUTE) {
        t->st.refused_other++;
        if (!t->auth_node[0] && !budget(&t->unauth_tokens, &t->unauth_at, UNAUTH_RATE, now_s(t)))
            return;
        char list[64] = "";
        uint16_t mlen = stun_message_length(&req);
        for (size_t off = STUN_MESSAGE_ATTRIBUTES_POS, k = 0; off + 4 <= mlen && k < 6; k++) {
            uint16_t at = (uint16_t)(b[off] << 8 | b[off + 1]);
            uint16_t al = (uint16_t)(b[off + 2] << 8 | b[off + 3]);
            bool known = stun_optional(at);
            for (const uint16_t *kp = known_attributes; *kp && !known; kp++)
                known = *kp == at;
            if (!known && strlen(list) + 8 < sizeof(list))
                snprintf(list + strlen(list), sizeof(list) - strlen(list), " 0x%04x", at);
            off += 4 + ((al + 3u) & ~3u);
        }
        refusal(t, from, "request 0x%03x with unknown comprehension-required attribute(s)%s: 420",
                (unsigned)method, list);
        uint8_t out[512];
        StunMessage resp;
        size_t n = stun_agent_build_unknown_attributes_error(agent, &resp, out, sizeof(out), &req);
        if (n > 0)
            send_to_client(t, out, n, from, fromlen);
        return;
    }
    if (v != STUN_VALIDATION_SUCCESS) {
        t->st.dropped_other++;
        return;
    }
    if (!stun_message_has_attribute(&req, STUN_ATTRIBUTE_USERNAME) ||
        !stun_message_has_attribute(&req, STUN_ATTRIBUTE_MESSAGE_INTEGRITY)) {
        t->st.challenges++; /* the first request of every client */
        send_error(t, agent, &req, STUN_ERROR_UNAUTHORIZED, true, false, from, fromlen);
        return;
    }
    uint16_t rl;
    const char *realm = stun_message_find(&req, STUN_ATTRIBUTE_REALM, &rl);
    if (!realm || rl != strlen(t->realm) || memcmp(realm, t->realm, rl) != 0) {
        t->st.refused_auth++;
        refusal(t, from, "node %.8s: wrong or missing REALM: 401", t->auth_node);
        send_error(t, agent, &req, STUN_ERROR_UNAUTHORIZED, true, false, from, fromlen);
        return;
    }
    if (!nonce_ok(t, &req, from)) {
        t->st.refused_auth++;
        refusal(t, from, "node %.8s: stale or foreign NONCE: 438", t->auth_node);
        send_error(t, agent, &req, STUN_ERROR_STALE_NONCE, true, false, from, fromlen);
        return;
    }
    struct alloc *a = alloc_find(t, from);
    if (method == STUN_ALLOCATE) {
        on_allocate(t, agent, &req, a, from, fromlen);
        return;
    }
    if (!a) {
        t->st.refused_other++;
        send_error(t, agent, &req, STUN_ERROR_ALLOCATION_MISMATCH, false, true, from, fromlen);
        return;
    }
    if (strcmp(a->node, t->auth_node) != 0) {
        t->st.refused_auth++;
        refusal(t, from, "node %.8s uses the allocation of node %.8s: 441", t->auth_node, a->node);
        send_error(t, agent, &req, STUN_ERROR_WRONG_CREDENTIALS, false, true, from, fromlen);
        return;
    }
    if (method == STUN_REFRESH)
        on_refresh(t, agent, &req, a, from, fromlen);
    else if (method == STUN_CREATEPERMISSION)
        on_create_permission(t, agent, &req, a, from, fromlen);
    else
        on_channel_bind(t, agent, &req, a, from, fromlen);
}

/* ---- expiry ------------------------------------------------------------------------------- */

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct turn_server *t = w->data;
    double now = now_s(t);
    for (struct alloc *a = t->all.all_next, *nx; a != &t->all; a = nx) {
        nx = a->all_next;
        if (a->expires <= now) {
            alloc_free(t, a, "lifetime over");
            continue;
        }
        for (unsigned i = 0; i < a->nperm;)
            if (a->perms[i].expires <= now) {
                a->perms[i] = a->perms[--a->nperm];
                t->st.permissions--;
            } else {
                i++;
            }
        for (unsigned i = 0; i < a->nchan;)
            if (a->chans[i].expires <= now) {
                a->chans[i] = a->chans[--a->nchan];
                t->st.channels--;
            } else {
                i++;
            }
    }
}

/* ---- start, stop, figures ----------------------------------------------------------------- */

static void own_addresses(struct turn_server *t)
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) != 0)
        return;
    size_t n = 0;
    for (struct ifaddrs *i = ifa; i; i = i->ifa_next)
        if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
            n++;
    t->own = calloc(n ? n : 1, sizeof(*t->own));
    if (t->own)
        for (struct ifaddrs *i = ifa; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
                t->own[t->n_own++] = ((struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr;
    freeifaddrs(ifa);
}

struct turn_server *turn_server_start(struct ev_loop *loop, struct stun_server *stun,
                                      const struct turn_params *p, char *err, size_t errlen)
{
    if (!stun)
        return errbuf_set(err, errlen, -1, "TURN needs the STUN server's socket"), NULL;
    struct turn_server *t = calloc(1, sizeof(*t));
    if (!t)
        return errbuf_set(err, errlen, -1, "out of memory"), NULL;
    t->loop = loop;
    t->stun = stun;
    t->sfd = stun_server_fd(stun);
    t->all.all_next = t->all.all_prev = &t->all;
    const char *realm = p->realm && *p->realm ? p->realm : "p2psip";
    if (strlen(realm) >= sizeof(t->realm) || strpbrk(realm, ":\"\\")) {
        errbuf_set(err, errlen, -1, "unusable TURN realm \"%.60s\"", realm);
        goto fail;
    }
    snprintf(t->realm, sizeof(t->realm), "%s", realm);
    if (!p->relay_ip || inet_pton(AF_INET, p->relay_ip, &t->relay_ip) != 1 ||
        t->relay_ip.s_addr == htonl(INADDR_ANY)) {
        errbuf_set(err, errlen, -1,
                   "turn_relay_ip \"%.60s\" is not a usable IPv4 address (not a wildcard; "
                   "the TURN relay is IPv4 only)",
                   p->relay_ip ? p->relay_ip : "");
        goto fail;
    }
    if (p->port_min > p->port_max || p->port_max > 65535 ||
        (p->port_min == 0 && p->port_max != 0)) {
        errbuf_set(err, errlen, -1, "turn_ports %u-%u: expected LOW-HIGH within 1-65535, or 0-0",
                   p->port_min, p->port_max);
        goto fail;
    }
    t->port_min = p->port_min;
    t->port_max = p->port_max;
    t->max_alloc = p->max_allocations ? p->max_allocations : 1000;
    t->per_node = p->allocations_per_node ? p->allocations_per_node : 8;
    t->max_perm = p->permissions_per_alloc ? p->permissions_per_alloc : 32;
    t->max_chan = p->channels_per_alloc ? p->channels_per_alloc : 32;
    t->default_life = p->default_lifetime_s ? p->default_lifetime_s : 600;
    t->max_life = p->max_lifetime_s ? p->max_lifetime_s : 3600;
    t->perm_life = p->perm_lifetime_s ? p->perm_lifetime_s : 300;
    t->chan_life = p->chan_lifetime_s ? p->chan_lifetime_s : 600;
    t->bytes_per_s = p->bandwidth_kbps * 1000.0 / 8.0;
    if (p->n_allow_peers) {
        t->allow = calloc(p->n_allow_peers, sizeof(*t->allow));
        if (!t->allow) {
            errbuf_set(err, errlen, -1, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < p->n_allow_peers; i++) {
            if (parse_cidr(p->allow_peers[i], &t->allow[i]) != 0) {
                errbuf_set(err, errlen, -1,
                           "turn_allow_peers: \"%.60s\" is not an IPv4 CIDR like 127.0.0.0/8",
                           p->allow_peers[i]);
                goto fail;
            }
        }
        t->n_allow = p->n_allow_peers;
    }
    if (gnutls_rnd(GNUTLS_RND_KEY, t->secret, sizeof(t->secret)) != 0) {
        errbuf_set(err, errlen, -1, "no randomness for the TURN secret");
        goto fail;
    }
    own_addresses(t);
    stun_agent_init(&t->agent_fp, known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_USE_FINGERPRINT | STUN_AGENT_USAGE_NO_INDICATION_AUTH);
    stun_agent_init(&t->agent_plain, known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_NO_INDICATION_AUTH);
    double now = ev_now(loop);
    t->unauth_tokens = UNAUTH_RATE;
    t->unauth_at = now;
    t->log_tokens = LOG_RATE;
    t->log_at = now;
    ev_timer_init(&t->sweep, sweep_cb, 1.0, 1.0);
    t->sweep.data = t;
    ev_timer_start(loop, &t->sweep);
    stun_server_set_demux(stun, demux, t);
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &t->relay_ip, ip, sizeof(ip));
    log_info(LOGM,
             "TURN on the STUN port %d: realm %s, relayed addresses on %s ports %u-%u, at most "
             "%u allocations (%u per node), %u kbit/s each",
             stun_server_port(stun), t->realm, ip, t->port_min, t->port_max, t->max_alloc,
             t->per_node, p->bandwidth_kbps);
    return t;
fail:
    free(t->allow);
    free(t);
    return NULL;
}

void turn_server_stop(struct turn_server *t)
{
    if (!t)
        return;
    stun_server_set_demux(t->stun, NULL, NULL);
    ev_timer_stop(t->loop, &t->sweep);
    while (t->all.all_next != &t->all)
        alloc_free(t, t->all.all_next, "server stopped");
    free(t->allow);
    free(t->own);
    memset(t->secret, 0, sizeof(t->secret));
    free(t);
}

void turn_server_stats(const struct turn_server *t, struct turn_stats *out)
{
    if (!t) {
        memset(out, 0, sizeof(*out));
        return;
    }
    *out = t->st;
    out->allocations = t->n_alloc;
}

json_t *turn_server_status(const struct turn_server *t)
{
    struct turn_stats s;
    turn_server_stats(t, &s);
    char ip[INET_ADDRSTRLEN] = "";
    if (t)
        inet_ntop(AF_INET, &t->relay_ip, ip, sizeof(ip));
    json_t *j = json_object();
    json_object_set_new(j, "realm", json_string(t ? t->realm : ""));
    json_object_set_new(j, "relay_ip", json_string(ip));
#define NUM(k, v) json_object_set_new(j, k, json_integer((json_int_t)(v)))
    NUM("allocations", s.allocations);
    NUM("max_allocations", t ? t->max_alloc : 0);
    NUM("permissions", s.permissions);
    NUM("channels", s.channels);
    NUM("created", s.created);
    NUM("challenges", s.challenges);
    NUM("refused_auth", s.refused_auth);
    NUM("refused_quota", s.refused_quota);
    NUM("refused_peer", s.refused_peer);
    NUM("refused_other", s.refused_other);
    NUM("packets_to_peer", s.pkts_to_peer);
    NUM("bytes_to_peer", s.bytes_to_peer);
    NUM("packets_to_client", s.pkts_to_client);
    NUM("bytes_to_client", s.bytes_to_client);
    NUM("dropped_bandwidth", s.dropped_bandwidth);
    NUM("dropped_other", s.dropped_other);
#undef NUM
    return j;
}

char *turn_server_metrics(const struct turn_server *t)
{
    struct turn_stats s;
    turn_server_stats(t, &s);
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    if (!f)
        return NULL;
    fprintf(f,
            "# TYPE p2p_turn_allocations gauge\np2p_turn_allocations %llu\n"
            "# TYPE p2p_turn_permissions gauge\np2p_turn_permissions %llu\n"
            "# TYPE p2p_turn_channels gauge\np2p_turn_channels %llu\n"
            "# TYPE p2p_turn_allocations_created_total counter\n"
            "p2p_turn_allocations_created_total %llu\n"
            "# TYPE p2p_turn_challenges_total counter\np2p_turn_challenges_total %llu\n"
            "# TYPE p2p_turn_refused_total counter\n"
            "p2p_turn_refused_total{reason=\"auth\"} %llu\n"
            "p2p_turn_refused_total{reason=\"quota\"} %llu\n"
            "p2p_turn_refused_total{reason=\"peer\"} %llu\n"
            "p2p_turn_refused_total{reason=\"other\"} %llu\n"
            "# TYPE p2p_turn_relayed_packets_total counter\n"
            "p2p_turn_relayed_packets_total{dir=\"to_peer\"} %llu\n"
            "p2p_turn_relayed_packets_total{dir=\"to_client\"} %llu\n"
            "# TYPE p2p_turn_relayed_bytes_total counter\n"
            "p2p_turn_relayed_bytes_total{dir=\"to_peer\"} %llu\n"
            "p2p_turn_relayed_bytes_total{dir=\"to_client\"} %llu\n"
            "# TYPE p2p_turn_dropped_total counter\n"
            "p2p_turn_dropped_total{reason=\"bandwidth\"} %llu\n"
            "p2p_turn_dropped_total{reason=\"other\"} %llu\n",
            (unsigned long long)s.allocations, (unsigned long long)s.permissions,
            (unsigned long long)s.channels, (unsigned long long)s.created,
            (unsigned long long)s.challenges, (unsigned long long)s.refused_auth,
            (unsigned long long)s.refused_quota, (unsigned long long)s.refused_peer,
            (unsigned long long)s.refused_other, (unsigned long long)s.pkts_to_peer,
            (unsigned long long)s.pkts_to_client, (unsigned long long)s.bytes_to_peer,
            (unsigned long long)s.bytes_to_client, (unsigned long long)s.dropped_bandwidth,
            (unsigned long long)s.dropped_other);
    if (fclose(f) != 0) {
        free(out);
        return NULL;
    }
    return out;
}
