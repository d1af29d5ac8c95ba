/*
 * The super node's P2P registrar and proxy for classical phones (sipfront.h).
 */
#include "sipfront.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <gnutls/crypto.h>
#include <sodium.h>

#include "config.h"
#include "log.h"
#include "proxy.h"
#include "record.h"
#include "sip.h"
#include "sip_bindings.h"

#define LOGM         "sip"
#define NONCE_TTL_S  300 /* a challenge's nonce is good this long, then "stale" */
#define BUCKETS      4096
#define MAX_USERS    1000000
#define RECORD_SLACK 30 /* a registration's record outlives its last binding by this much */
#define USER_MAX     64
#define NONCE_LEN    64    /* hex: time, serial, HMAC */
#define NC_SLOTS     65536 /* nonces whose highest nonce count is remembered */
#define NC_BUCKETS   16384
#define RETRANS_S    32. /* a request repeated byte for byte this soon is its retransmission */
#define TRUSTED_MAX  4   /* addresses a user authenticated from lately */
/* Failed authentications: a source address, or a user name, may fail this many times in a row,
 * then once every AUTH_FAIL_EVERY_S. */
#define SRC_FAIL_BURST    10.
#define USER_FAIL_BURST   20.
#define AUTH_FAIL_EVERY_S 6.
#define FAIL_SLOTS        4096
#define DIALOG_SLOTS      16384 /* dialogs let through, for their in-dialog requests */
#define DIALOG_WAYS       8
#define DIALOG_LIFE_S     (4 * 3600.)
#define LOG_BURST         10 /* refusals logged per LOG_WINDOW_S, then counted */
#define LOG_WINDOW_S      10.

struct user {
    struct user *next;
    char name[USER_MAX];
    char ha1[33];
    unsigned char trusted[TRUSTED_MAX][SIP_ADDR_KEY_LEN]; /* sources it authenticated from */
    double trusted_at[TRUSTED_MAX];
};

struct nc_ent {
    uint64_t serial; /* the nonce's */
    uint64_t fp;     /* keyed hash of the request that used the highest count */
    double at;       /* when that request came first */
    uint32_t nc;     /* the highest nonce count seen with it */
    int32_t next;    /* hash chain (index), -1 at the end */
};

/* A registered phone's contact address ("host:port"), for telling requests to it apart. */
struct addr_ent {
    struct addr_ent *next;
    unsigned refs; /* bindings with this address */
    char addr[80];
};

/* Lines of one kind logged per LOG_WINDOW_S; the rest is counted, then summarised. */
struct log_budget {
    double window;
    unsigned logged;
};

struct dialog {
    uint64_t tag; /* keyed hash of the Call-ID; 0: free */
    double at;
    unsigned char phone[2][SIP_ADDR_KEY_LEN]; /* the source addresses of its phones here */
};

struct reg;

struct aor {
    struct aor *next;         /* hash chain */
    struct aor *all_next;     /* every address-of-record, for expiry */
    char aor[USER_MAX + 260]; /* user@domain */
    struct sip_bindings bs;
    struct reg *pending; /* a store in flight */
};

/* A REGISTER waiting for the overlay's answer. */
struct reg {
    struct sipfront *f; /* NULL once the front end stopped */
    struct aor *a;
    struct sip_reg_wait w;
    json_t *value; /* the record's value; NULL: a removal */
    int64_t lifetime_s;
    unsigned tries; /* stores that found the record busy (the node refreshing it) */
    ev_timer retry;
};

struct sipfront {
    struct ev_loop *loop;
    struct onode *on;
    struct sip_endpoint *ep;
    struct proxy *px;
    char domain[256], overlay[256], registrar[256], node_id[64], advertise[80];
    int64_t max_expires;
    bool channels;
    struct user *users[BUCKETS];
    size_t n_users;
    struct aor *aors[BUCKETS];
    struct aor *all;
    size_t n_aors;
    uint64_t order;
    unsigned char secret[32]; /* keys the nonces: no state per challenge */
    uint64_t nonce_serial;
    struct nc_ent *nc; /* NC_SLOTS, a ring in the order first used */
    int32_t nc_head[NC_BUCKETS];
    size_t nc_first, nc_n;
    uint64_t nc_forgotten; /* the highest serial evicted from the ring */
    struct sip_limiter *src_fail, *user_fail;
    unsigned char dialog_key[crypto_shorthash_KEYBYTES];
    struct dialog *dialogs;          /* DIALOG_SLOTS */
    struct addr_ent *addrs[BUCKETS]; /* the contact addresses of every binding */
    struct log_budget refusals, throttles;
    ev_timer expiry;
    uint64_t registers, challenged, auth_failed, registered, forbidden, store_failed, throttled,
        replayed, relay_refused;
};

#define BUSY_RETRY_S 0.05
#define BUSY_TRIES   40

static void channel_fields(const struct sipfront *f, json_t *v);

static void stored(void *ud, const struct on_result *res);

static void send_store(struct sipfront *f, struct reg *g)
{
    if (g->value)
        onode_publish(f->on, "update", REC_TYPE_USER_LOCATION, g->a->aor, g->value, g->lifetime_s,
                      false, stored, g);
    else
        onode_publish(f->on, "remove", REC_TYPE_USER_LOCATION, g->a->aor, NULL, 0, false, stored,
                      g);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct reg *g = w->data;
    send_store(g->f, g);
}

static void reg_free(struct reg *g)
{
    json_decref(g->value);
    free(g);
}

/* ---- small helpers --------------------------------------------------------------------------- */

static size_t hash_of(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)tolower((unsigned char)*s)) * 16777619u;
    return h % BUCKETS;
}

static void hex_of(const unsigned char *b, size_t n, char *out)
{
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = d[b[i] >> 4];
        out[2 * i + 1] = d[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static int md5_hex(const char *text, char out[33])
{
    unsigned char d[16];
    if (gnutls_hash_fast(GNUTLS_DIG_MD5, text, strlen(text), d) < 0)
        return -1;
    hex_of(d, sizeof(d), out);
    return 0;
}

int sipfront_ha1(const char *user, const char *domain, const char *password, char out[33])
{
    char buf[1024];
    if ((size_t)snprintf(buf, sizeof(buf), "%s:%s:%s", user, domain, password) >= sizeof(buf))
        return -1;
    return md5_hex(buf, out);
}

static bool equal_ct(const char *a, const char *b, size_t n)
{
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

/* A quoted-string's content (or a token as is) into out; false when it does not fit. */
static bool unquote(const char *s, char *out, size_t len)
{
    if (!s)
        return false;
    size_t n = strlen(s);
    if (n >= 2 && s[0] == '"' && s[n - 1] == '"') {
        s++;
        n -= 2;
    }
    if (n >= len)
        return false;
    memcpy(out, s, n);
    out[n] = '\0';
    return true;
}

/* ---- the users file -------------------------------------------------------------------------- */

static struct user *user_find(const struct sipfront *f, const char *name)
{
    for (struct user *u = f->users[hash_of(name)]; u; u = u->next)
        if (!strcmp(u->name, name))
            return u;
    return NULL;
}

static bool valid_user(const char *s, size_t n)
{
    if (n == 0 || n >= USER_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("-_.!~*'()&=+$,;?/", s[i]))
            return false;
    return true;
}

/* "user:HA1" or htdigest's "user:realm:HA1" (realm = the domain) per line; # comments. */
static int load_users(struct sipfront *f, const char *path, char *err, size_t errlen)
{
    FILE *fp = fopen(path, "r");
    if (!fp) {
        snprintf(err, errlen, "sip_users %s: %s", path, strerror(errno));
        return -1;
    }
    char line[512];
    unsigned lineno = 0;
    int rc = 0;
    while (fgets(line, sizeof(line), fp)) {
        lineno++;
        size_t n = strcspn(line, "\r\n");
        line[n] = '\0';
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        char *c1 = strchr(p, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL, *ha1;
        if (!c1) {
            snprintf(err, errlen, "sip_users %s line %u: not user:HA1", path, lineno);
            rc = -1;
            break;
        }
        if (c2) { /* user:realm:HA1 */
            if ((size_t)(c2 - c1 - 1) != strlen(f->domain) ||
                strncasecmp(c1 + 1, f->domain, (size_t)(c2 - c1 - 1)) != 0) {
                snprintf(err, errlen, "sip_users %s line %u: realm \"%.*s\" is not the domain %s",
                         path, lineno, (int)(c2 - c1 - 1) > 80 ? 80 : (int)(c2 - c1 - 1), c1 + 1,
                         f->domain);
                rc = -1;
                break;
            }
            ha1 = c2 + 1;
        } else {
            ha1 = c1 + 1;
        }
        bool hex = strlen(ha1) == 32;
        for (size_t i = 0; hex && i < 32; i++)
            hex = isxdigit((unsigned char)ha1[i]) != 0;
        if (!valid_user(p, (size_t)(c1 - p)) || !hex) {
            snprintf(err, errlen,
                     "sip_users %s line %u: needs a user name (letters, digits, -_.) and 32 hex "
                     "digits of MD5(user:%s:password)",
                     path, lineno, f->domain);
            rc = -1;
            break;
        }
        *c1 = '\0';
        if (user_find(f, p)) {
            snprintf(err, errlen, "sip_users %s line %u: user %s appears twice", path, lineno, p);
            rc = -1;
            break;
        }
        if (f->n_users >= MAX_USERS) {
            snprintf(err, errlen, "sip_users %s: more than %d users", path, MAX_USERS);
            rc = -1;
            break;
        }
        struct user *u = calloc(1, sizeof(*u));
        if (!u) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
            break;
        }
        memcpy(u->name, p, (size_t)(c1 - p) + 1); /* valid_user(): shorter than USER_MAX */
        for (size_t i = 0; i < 32; i++)
            u->ha1[i] = (char)tolower((unsigned char)ha1[i]);
        size_t b = hash_of(u->name);
        u->next = f->users[b];
        f->users[b] = u;
        f->n_users++;
    }
    fclose(fp);
    return rc;
}

/* ---- Digest authentication (RFC 2617 MD5, qop=auth) -------------------------------------------
 *
 * Challenges cost no state: a nonce is the time it was made, a serial number and an HMAC over
 * both. What an answer used is remembered: the highest nonce count (nc) seen per nonce, in a
 * table of the NC_SLOTS most recently used nonces; an answer whose nc is not higher than the
 * last one is a replay. A nonce forgotten to make room counts as used up (serials at or below
 * the highest forgotten one are stale), so eviction never reopens a replay.
 */

/* nonce = 16 hex digits of the time it was made, 16 of its serial, 32 of an HMAC over them. */
static void make_nonce(struct sipfront *f, char out[NONCE_LEN + 1])
{
    char head[33];
    snprintf(head, sizeof(head), "%016" PRIx64 "%016" PRIx64, (uint64_t)time(NULL),
             ++f->nonce_serial);
    unsigned char mac[32];
    gnutls_hmac_fast(GNUTLS_MAC_SHA256, f->secret, sizeof(f->secret), head, 32, mac);
    char h[33];
    hex_of(mac, 16, h);
    snprintf(out, NONCE_LEN + 1, "%s%s", head, h);
}

/* 0: ours and fresh; 1: ours but stale; -1: not ours. *serial: its serial. */
static int check_nonce(const struct sipfront *f, const char *nonce, uint64_t *serial)
{
    if (strlen(nonce) != NONCE_LEN)
        return -1;
    unsigned char mac[32];
    gnutls_hmac_fast(GNUTLS_MAC_SHA256, f->secret, sizeof(f->secret), nonce, 32, mac);
    char h[33];
    hex_of(mac, 16, h);
    if (!equal_ct(h, nonce + 32, 32))
        return -1;
    char ts[17];
    memcpy(ts, nonce, 16);
    ts[16] = '\0';
    uint64_t t = strtoull(ts, NULL, 16), now = (uint64_t)time(NULL);
    memcpy(ts, nonce + 16, 16);
    *serial = strtoull(ts, NULL, 16);
    return t <= now && now - t <= NONCE_TTL_S ? 0 : 1;
}

static struct nc_ent *nc_find(struct sipfront *f, uint64_t serial)
{
    for (int32_t i = f->nc_head[serial % NC_BUCKETS]; i >= 0; i = f->nc[i].next)
        if (f->nc[i].serial == serial)
            return &f->nc[i];
    return NULL;
}

/* A keyed hash of a request as it came (libosip2 keeps the text of a message not changed). */
static uint64_t fingerprint(const struct sipfront *f, const osip_message_t *m)
{
    char *text = NULL;
    size_t len = 0;
    uint64_t h = 0;
    if (osip_message_to_str((osip_message_t *)m, &text, &len) == 0 && text)
        crypto_shorthash((unsigned char *)&h, (const unsigned char *)text, len, f->dialog_key);
    osip_free(text);
    return h;
}

/*
 * Whether nc is the highest yet for the nonce `serial` (then it is remembered as such, with
 * the request's fingerprint), or the request is the very one that used it, repeated within
 * RETRANS_S: a retransmission (the phone did not hear the answer yet), which its transaction
 * absorbs. Anything else with a count already used is a replay.
 */
static bool nc_fresh(struct sipfront *f, uint64_t serial, uint32_t nc, uint64_t fp, double now)
{
    struct nc_ent *e = nc_find(f, serial);
    if (e) {
        if (nc == e->nc && fp == e->fp && now - e->at <= RETRANS_S)
            return true;
        if (nc <= e->nc)
            return false;
        e->nc = nc;
        e->fp = fp;
        e->at = now;
        return true;
    }
    if (serial <= f->nc_forgotten)
        return false; /* its count was forgotten: it may have been used */
    int32_t slot;
    if (f->nc_n < NC_SLOTS) {
        slot = (int32_t)((f->nc_first + f->nc_n++) % NC_SLOTS);
    } else { /* full: the oldest goes, and every nonce up to it is stale from now on */
        slot = (int32_t)f->nc_first;
        f->nc_first = (f->nc_first + 1) % NC_SLOTS;
        struct nc_ent *old = &f->nc[slot];
        for (int32_t *pp = &f->nc_head[old->serial % NC_BUCKETS]; *pp >= 0; pp = &f->nc[*pp].next)
            if (*pp == slot) {
                *pp = old->next;
                break;
            }
        if (old->serial > f->nc_forgotten)
            f->nc_forgotten = old->serial;
    }
    f->nc[slot].serial = serial;
    f->nc[slot].nc = nc;
    f->nc[slot].fp = fp;
    f->nc[slot].at = now;
    f->nc[slot].next = f->nc_head[serial % NC_BUCKETS];
    f->nc_head[serial % NC_BUCKETS] = slot;
    return true;
}

/* 401 (REGISTER, WWW-Authenticate) or 407 (anything else, Proxy-Authenticate). */
static void challenge(struct sipfront *f, const osip_message_t *m, const struct sip_source *from,
                      bool stale)
{
    bool proxy = !MSG_IS_REGISTER(m);
    f->challenged++;
    osip_message_t *r = sip_response_for(m, proxy ? 407 : 401, NULL);
    if (!r)
        return;
    char nonce[NONCE_LEN + 1], h[400], err[200];
    make_nonce(f, nonce);
    snprintf(h, sizeof(h), "Digest realm=\"%s\", nonce=\"%s\", algorithm=MD5, qop=\"auth\"%s",
             f->domain, nonce, stale ? ", stale=true" : "");
    osip_message_set_header(r, proxy ? "Proxy-Authenticate" : "WWW-Authenticate", h);
    if (sip_send(f->ep, r, from, err, sizeof(err)) != 0)
        log_info(LOGM, "%d to %s not sent: %s", proxy ? 407 : 401, from->addr, err);
    osip_message_free(r);
}

/* Logs a refusal, at most LOG_BURST lines of its kind per LOG_WINDOW_S (a cracker's flood is
 * counted rather than written out). */
static void refused_log(struct sipfront *f, struct log_budget *b, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void refused_log(struct sipfront *f, struct log_budget *b, const char *fmt, ...)
{
    double now = ev_now(f->loop);
    if (now - b->window > LOG_WINDOW_S) {
        if (b->logged > LOG_BURST)
            log_warn(LOGM,
                     "%u more %s in the last %.0f s (status counters auth_failed, throttled, "
                     "relay_refused)",
                     b->logged - LOG_BURST, b == &f->throttles ? "throttlings" : "refusals",
                     now - b->window);
        b->window = now;
        b->logged = 0;
    }
    if (b->logged++ >= LOG_BURST)
        return;
    char line[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    log_warn(LOGM, "%s", line);
}

/* A failed authentication: counted against the source and the user name, answered `code`. */
static void auth_failed(struct sipfront *f, const osip_message_t *m, const struct sip_source *from,
                        const unsigned char *src_key, const char *user, int code,
                        const char *reason, const char *why)
{
    double now = ev_now(f->loop);
    f->auth_failed++;
    refused_log(f, &f->refusals, "%s: %s for %.64s@%s refused: %s", from->addr, m->sip_method, user,
                f->domain, why);
    /* The failure that empties a bucket starts a throttling: said once, not per attempt. */
    if (sip_limiter_take(f->src_fail, src_key, SIP_ADDR_KEY_LEN, now, 1.) &&
        sip_limiter_wait(f->src_fail, src_key, SIP_ADDR_KEY_LEN, now, 1.) > 0)
        refused_log(f, &f->throttles,
                    "%s: %.0f failed authentications: throttled (too many failed authentications "
                    "from this address; one more try each %.0f s)",
                    from->addr, SRC_FAIL_BURST, AUTH_FAIL_EVERY_S);
    if (sip_limiter_take(f->user_fail, user, strlen(user), now, 1.) &&
        sip_limiter_wait(f->user_fail, user, strlen(user), now, 1.) > 0)
        refused_log(f, &f->throttles,
                    "%.64s@%s: %.0f failed authentications: throttled (too many failed "
                    "authentications for this user; one more try each %.0f s, except from "
                    "addresses it authenticated from lately)",
                    user, f->domain, USER_FAIL_BURST, AUTH_FAIL_EVERY_S);
    sip_reply(f->ep, m, from, code, reason);
}

static bool trusted_source(const struct user *u, const unsigned char *key)
{
    for (size_t i = 0; u && i < TRUSTED_MAX; i++)
        if (u->trusted_at[i] > 0 && !memcmp(u->trusted[i], key, SIP_ADDR_KEY_LEN))
            return true;
    return false;
}

static void trust_source(struct user *u, const unsigned char *key, double now)
{
    size_t pick = 0;
    for (size_t i = 0; i < TRUSTED_MAX; i++) {
        if (!memcmp(u->trusted[i], key, SIP_ADDR_KEY_LEN) || u->trusted_at[i] == 0) {
            pick = i;
            break;
        }
        if (u->trusted_at[i] < u->trusted_at[pick])
            pick = i;
    }
    memcpy(u->trusted[pick], key, SIP_ADDR_KEY_LEN);
    u->trusted_at[pick] = now;
}

/* Whether the digest-uri names the Request-URI (scheme, user, host, port; parameters aside). */
static bool uri_matches(const char *uri, const osip_uri_t *ru)
{
    osip_uri_t *u = NULL;
    if (osip_uri_init(&u) != 0)
        return false;
    bool ok =
        osip_uri_parse(u, uri) == 0 && u->scheme && ru->scheme &&
        !strcasecmp(u->scheme, ru->scheme) && u->host && ru->host &&
        !strcasecmp(u->host, ru->host) &&
        !strcmp(u->username ? u->username : "", ru->username ? ru->username : "") &&
        !strcmp(u->port && *u->port ? u->port : "5060", ru->port && *ru->port ? ru->port : "5060");
    osip_uri_free(u);
    return ok;
}

/* The request's credentials for our realm (Authorization for REGISTER, else
 * Proxy-Authorization), or NULL. */
static osip_authorization_t *credentials(const struct sipfront *f, const osip_message_t *m)
{
    const osip_list_t *l = MSG_IS_REGISTER(m) ? &m->authorizations : &m->proxy_authorizations;
    char realm[256];
    for (int i = 0; i < osip_list_size(l); i++) {
        osip_authorization_t *a = osip_list_get(l, i);
        if (a && unquote(a->realm, realm, sizeof(realm)) && !strcasecmp(realm, f->domain))
            return a;
    }
    return NULL;
}

/*
 * 0: the request carries good credentials of `user`; 1: it was challenged (no, stale or
 * replayed credentials); -1: refused (403, 400 or 503; logged). Failures are throttled per
 * source address and per user name: past SRC_FAIL_BURST (a source) or USER_FAIL_BURST (a name)
 * failures, one more try each AUTH_FAIL_EVERY_S; meanwhile credentials are not even checked
 * (503 with Retry-After), except a throttled name's from an address it authenticated from
 * before, so that an attack on a user does not lock out that user's own phone.
 */
static int authenticate(struct sipfront *f, const osip_message_t *m, const struct sip_source *from,
                        const char *user)
{
    osip_authorization_t *a = credentials(f, m);
    if (!a) {
        challenge(f, m, from, false);
        return 1;
    }
    unsigned char src_key[SIP_ADDR_KEY_LEN];
    if (sip_addr_key(from->addr, src_key) != 0)
        memset(src_key, 0, sizeof(src_key));
    struct user *u = user_find(f, user);
    double now = ev_now(f->loop);
    double wait = sip_limiter_wait(f->src_fail, src_key, sizeof(src_key), now, 1.);
    const char *whose = "this address";
    if (wait <= 0 && !trusted_source(u, src_key)) {
        wait = sip_limiter_wait(f->user_fail, user, strlen(user), now, 1.);
        whose = "this user";
    }
    if (wait > 0) {
        f->throttled++;
        refused_log(f, &f->throttles,
                    "%s: %s for %.64s@%s throttled: too many failed authentications %s %s "
                    "(retry after %.0f s)",
                    from->addr, m->sip_method, user, f->domain,
                    !strcmp(whose, "this user") ? "for" : "from", whose, wait + 0.5);
        osip_message_t *r = sip_response_for(m, 503, "Too Many Failed Authentications");
        if (r) {
            char ra[24], err[200];
            snprintf(ra, sizeof(ra), "%.0f", wait + 1);
            osip_message_set_header(r, "Retry-After", ra);
            if (sip_send(f->ep, r, from, err, sizeof(err)) != 0)
                log_info(LOGM, "503 to %s not sent: %s", from->addr, err);
            osip_message_free(r);
        }
        return -1;
    }
    char uname[USER_MAX], nonce[NONCE_LEN + 8], uri[512], resp[64], cnonce[128], qop[16], nc[16];
    const char *why = NULL;
    if (!a->auth_type || strcasecmp(a->auth_type, "Digest") != 0)
        why = "not Digest";
    else if (!unquote(a->username, uname, sizeof(uname)) ||
             !unquote(a->nonce, nonce, sizeof(nonce)) || !unquote(a->uri, uri, sizeof(uri)) ||
             !unquote(a->response, resp, sizeof(resp)))
        why = "incomplete credentials";
    else if (a->algorithm && strcasecmp(a->algorithm, "MD5") != 0 &&
             strcasecmp(a->algorithm, "\"MD5\"") != 0)
        why = "an algorithm other than MD5";
    else if (!a->message_qop)
        why = "an RFC 2069 answer (no qop)";
    else if (!unquote(a->message_qop, qop, sizeof(qop)) || strcmp(qop, "auth") != 0 ||
             !unquote(a->cnonce, cnonce, sizeof(cnonce)) || !cnonce[0] ||
             !unquote(a->nonce_count, nc, sizeof(nc)) || strlen(nc) != 8 ||
             strspn(nc, "0123456789abcdefABCDEF") != 8)
        why = "qop other than auth, or no cnonce/nc";
    else if (strcmp(uname, user) != 0)
        why = "credentials of another user";
    if (why) {
        auth_failed(f, m, from, src_key, user, 403, "Bad Credentials", why);
        return -1;
    }
    if (!uri_matches(uri, m->req_uri)) { /* RFC 2617 3.2.2.5: 400 */
        char why_uri[640], *ru = NULL;
        osip_uri_to_str(m->req_uri, &ru);
        snprintf(why_uri, sizeof(why_uri),
                 "the digest uri \"%.200s\" is not the Request-URI %.200s", uri, ru ? ru : "?");
        osip_free(ru);
        auth_failed(f, m, from, src_key, user, 400, "Digest URI Is Not The Request-URI", why_uri);
        return -1;
    }
    uint64_t serial = 0;
    int ns = check_nonce(f, nonce, &serial);
    if (ns != 0) { /* an old or foreign nonce: a fresh challenge, said to be stale if ours */
        challenge(f, m, from, ns == 1);
        return 1;
    }
    char ha2[33], want[33], buf[1200];
    snprintf(buf, sizeof(buf), "%s:%s", m->sip_method, uri);
    md5_hex(buf, ha2);
    snprintf(buf, sizeof(buf), "%s:%s:%s:%s:%s:%s", u ? u->ha1 : "-", nonce, nc, cnonce, qop, ha2);
    md5_hex(buf, want);
    for (char *p = resp; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    if (!u || strlen(resp) != 32 || !equal_ct(resp, want, 32)) {
        auth_failed(f, m, from, src_key, user, 403, "Bad Credentials",
                    u ? "wrong password" : "no such user");
        return -1;
    }
    /* Good credentials: a replay unless its nonce count is higher than any seen with it. */
    if (!nc_fresh(f, serial, (uint32_t)strtoul(nc, NULL, 16), fingerprint(f, m), now)) {
        f->replayed++;
        refused_log(f, &f->refusals,
                    "%s: %s for %s@%s: nonce count %s already used (a replay?): challenged",
                    from->addr, m->sip_method, user, f->domain, nc);
        challenge(f, m, from, true);
        return 1;
    }
    trust_source(u, src_key, now);
    return 0;
}

/* ---- registrations --------------------------------------------------------------------------- */

static struct aor *aor_find(const struct sipfront *f, const char *aor)
{
    for (struct aor *a = f->aors[hash_of(aor)]; a; a = a->next)
        if (!strcasecmp(a->aor, aor))
            return a;
    return NULL;
}

static struct aor *aor_get(struct sipfront *f, const char *user)
{
    char key[sizeof(((struct aor *)0)->aor)];
    snprintf(key, sizeof(key), "%s@%s", user, f->domain);
    struct aor *a = aor_find(f, key);
    if (a || !(a = calloc(1, sizeof(*a))))
        return a;
    snprintf(a->aor, sizeof(a->aor), "%s", key);
    size_t b = hash_of(a->aor);
    a->next = f->aors[b];
    f->aors[b] = a;
    a->all_next = f->all;
    f->all = a;
    f->n_aors++;
    return a;
}

/* "host:port" of a URI (5060 when it names none); -1 when its host is no literal address. */
static int uri_addr(const osip_uri_t *u, char *out, size_t len)
{
    if (!u || !u->host)
        return -1;
    char tmp[300];
    snprintf(tmp, sizeof(tmp), strchr(u->host, ':') && u->host[0] != '[' ? "[%s]:%s" : "%s:%s",
             u->host, u->port && *u->port ? u->port : "5060");
    if (cfg_parse_hostport(tmp, NULL, 0, NULL) != 0)
        return -1;
    snprintf(out, len, "%s", tmp);
    return 0;
}

static struct addr_ent **addr_slot(struct sipfront *f, const char *addr)
{
    struct addr_ent **pp = &f->addrs[hash_of(addr)];
    while (*pp && strcmp((*pp)->addr, addr) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* Counts a's binding addresses in (delta 1) or out (-1) of the index: around every change of
 * a->bs, so that looking a request's address up costs one hash, not a walk of every binding. */
static void addr_index(struct sipfront *f, const struct aor *a, int delta)
{
    for (size_t i = 0; i < a->bs.n; i++) {
        osip_uri_t *u = NULL;
        char hp[300];
        if (osip_uri_init(&u) != 0)
            continue;
        int rc = osip_uri_parse(u, a->bs.b[i].contact) == 0 ? uri_addr(u, hp, sizeof(hp)) : -1;
        osip_uri_free(u);
        if (a->bs.b[i].flow[0]) /* where its requests come from */
            rc = snprintf(hp, sizeof(hp), "%s", a->bs.b[i].flow) > 0 ? 0 : -1;
        if (rc != 0 || strlen(hp) >= sizeof(((struct addr_ent *)0)->addr))
            continue;
        struct addr_ent **pp = addr_slot(f, hp), *e = *pp;
        if (delta > 0 && !e && (e = calloc(1, sizeof(*e)))) {
            memcpy(e->addr, hp, strlen(hp) + 1); /* shorter than e->addr: checked above */
            *pp = e;
        }
        if (!e)
            continue;
        if (delta > 0) {
            e->refs++;
        } else if (--e->refs == 0) {
            *pp = e->next;
            free(e);
        }
    }
}

static void stored(void *ud, const struct on_result *res)
{
    struct reg *g = ud;
    struct sipfront *f = g->f;
    if (f && !res->ok && !strcmp(res->code, "busy") && g->tries++ < BUSY_TRIES) {
        ev_timer_start(f->loop, &g->retry); /* the node refreshes it right now: after that */
        return;
    }
    struct aor *a = f ? g->a : NULL;
    if (a)
        a->pending = NULL;
    /* A removal of a record never stored is no failure: the bindings are gone either way. */
    bool ok = res->ok || (a && a->bs.n == 0 && !strcmp(res->code, "not-found"));
    if (a)
        addr_index(f, a, -1);
    int rc = sip_reg_wait_done(&g->w, f ? f->ep : NULL, a ? &a->bs : NULL, a ? a->aor : "", ok,
                               res->code, res->reason);
    if (a)
        addr_index(f, a, 1);
    if (f && rc > 0)
        f->registered++;
    if (f && rc < 0)
        f->store_failed++;
    reg_free(g);
}

/* Stores a's bindings as they are now (or removes its record when none is left). */
static void publish(struct sipfront *f, struct aor *a, const osip_message_t *req,
                    const struct sip_source *from, const struct sip_bindings *old)
{
    struct reg *g = calloc(1, sizeof(*g));
    if (!g || sip_reg_wait_keep(&g->w, req, from, old) != 0) {
        free(g);
        if (req)
            sip_reply(f->ep, req, from, 500, "Out Of Memory");
        return;
    }
    g->f = f;
    g->a = a;
    ev_timer_init(&g->retry, retry_cb, BUSY_RETRY_S, 0.);
    g->retry.data = g;
    a->pending = g;
    if (a->bs.n > 0) {
        int64_t now = (int64_t)time(NULL), last = now;
        for (size_t i = 0; i < a->bs.n; i++)
            if (a->bs.b[i].expires > last)
                last = a->bs.b[i].expires;
        char uri[sizeof(a->aor) + 8];
        snprintf(uri, sizeof(uri), "sip:%s", a->aor);
        g->value = json_pack("{s:s,s:s,s:s,s:o,s:o}", "uri", uri, "registrar", f->registrar,
                             "node_id", f->node_id, "contacts", sip_contacts_json(f->advertise),
                             "bindings", sip_bindings_json(&a->bs));
        channel_fields(f, g->value);
        g->lifetime_s = last - now + RECORD_SLACK;
    }
    send_store(f, g);
}

/* A record of ours says that nodes reach this front end on a channel to its own client, attached
 * to this very super node (docs/protocol.md 5.9). */
static void channel_fields(const struct sipfront *f, json_t *v)
{
    if (!f->channels)
        return;
    const char *sn = onode_sn_id(f->on);
    json_object_set_new(v, "channels", json_true());
    json_object_set_new(v, "sn", json_pack("{s:s}", "id", sn ? sn : f->node_id));
}

static void on_register(struct sipfront *f, osip_message_t *m, const struct sip_source *from)
{
    f->registers++;
    const osip_uri_t *to = m->to ? m->to->url : NULL;
    if (!to || !to->username || !to->host) {
        sip_reply(f->ep, m, from, 400, "To Needs A User");
        return;
    }
    if (strcasecmp(to->host, f->domain) != 0 || !valid_user(to->username, strlen(to->username))) {
        f->forbidden++;
        log_warn(LOGM, "%s: REGISTER for %.64s@%.128s refused: this registrar serves %s",
                 from->addr, to->username, to->host, f->domain);
        char why[320];
        snprintf(why, sizeof(why), "This Registrar Serves %s Only", f->domain);
        sip_reply(f->ep, m, from, 403, why);
        return;
    }
    if (authenticate(f, m, from, to->username) != 0)
        return;
    struct aor *a = aor_get(f, to->username);
    if (!a) {
        sip_reply(f->ep, m, from, 500, "Out Of Memory");
        return;
    }
    if (a->pending) { /* its own retransmission waits for the answer; another is told to */
        if (!sip_reg_wait_same(&a->pending->w, m))
            sip_reply_busy(f->ep, m, from);
        return;
    }
    struct sip_bindings old = a->bs;
    const char *why = NULL;
    int64_t now = (int64_t)time(NULL);
    addr_index(f, a, -1);
    uint64_t since = f->order;
    int rc = sip_bindings_apply(&a->bs, m, now, f->max_expires, &f->order, &why);
    if (rc == 0) /* behind a NAT, the phone is reached where its REGISTER came from */
        sip_bindings_note_flow(&a->bs, since, from);
    addr_index(f, a, 1);
    if (rc == 1)
        sip_bindings_reply(f->ep, &a->bs, m, from, now);
    else if (rc != 0)
        sip_bindings_refuse(f->ep, m, from, rc, why);
    else
        publish(f, a, m, from, &old);
}

/* The proxy asks: is `aor` a phone registered here? Its Contact, and where it registered from. */
static const char *local_binding(void *ud, const char *aor, bool *local, const char **flow)
{
    struct sipfront *f = ud;
    const struct aor *a = aor_find(f, aor);
    const struct sip_binding *b = a ? sip_bindings_latest_binding(&a->bs) : NULL;
    *local = b != NULL;
    *flow = b && b->flow[0] ? b->flow : NULL;
    return b ? b->contact : NULL;
}

/* ---- what may pass: into the domain for anyone, out of it for its users ---------------------
 *
 * Anyone may call a phone registered here (the domain's inbound proxy). Whatever would leave
 * (another domain, the overlay, a literal address, a Route elsewhere), and whatever claims in
 * its From to come from a user of the domain, must carry that user's credentials (407); the
 * credentials are this hop's and are taken off. In-dialog requests of a dialog that was let
 * through (an authenticated call out, or a call into a phone here) pass when they come from the
 * address the dialog's local phone used: phones answer a BYE's 407 less often than an INVITE's.
 */

static uint64_t dialog_tag(const struct sipfront *f, const char *call_id)
{
    uint64_t h;
    crypto_shorthash((unsigned char *)&h, (const unsigned char *)call_id, strlen(call_id),
                     f->dialog_key);
    return h | 1;
}

/* Remembers a dialog (its Call-ID) whose local phone is at `phone` ("ip:port"). */
static void dialog_add(struct sipfront *f, const char *call_id, const char *phone)
{
    unsigned char k[SIP_ADDR_KEY_LEN];
    if (sip_addr_key(phone, k) != 0)
        return;
    uint64_t tag = dialog_tag(f, call_id);
    struct dialog *set = f->dialogs + (tag % (DIALOG_SLOTS / DIALOG_WAYS)) * DIALOG_WAYS,
                  *pick = set;
    double now = ev_now(f->loop);
    for (size_t i = 0; i < DIALOG_WAYS; i++) {
        if (set[i].tag == tag || !set[i].tag) {
            pick = &set[i];
            break;
        }
        if (set[i].at < pick->at)
            pick = &set[i];
    }
    if (pick->tag != tag) {
        memset(pick, 0, sizeof(*pick));
        pick->tag = tag;
    }
    pick->at = now;
    /* Both ends may be phones of ours (a call within the domain): the newer one second. */
    if (memcmp(pick->phone[0], k, sizeof(k)) != 0) {
        if (pick->phone[0][0])
            memcpy(pick->phone[1], k, sizeof(k));
        else
            memcpy(pick->phone[0], k, sizeof(k));
    }
}

static bool dialog_known(const struct sipfront *f, const char *call_id, const char *from)
{
    unsigned char k[SIP_ADDR_KEY_LEN];
    if (sip_addr_key(from, k) != 0)
        return false;
    uint64_t tag = dialog_tag(f, call_id);
    const struct dialog *set = f->dialogs + (tag % (DIALOG_SLOTS / DIALOG_WAYS)) * DIALOG_WAYS;
    double now = ev_now(f->loop);
    for (size_t i = 0; i < DIALOG_WAYS; i++)
        if (set[i].tag == tag && now - set[i].at < DIALOG_LIFE_S &&
            (!memcmp(set[i].phone[0], k, sizeof(k)) || !memcmp(set[i].phone[1], k, sizeof(k))))
            return true;
    return false;
}

static bool is_self(const struct sipfront *f, const osip_uri_t *u)
{
    char hp[300];
    return uri_addr(u, hp, sizeof(hp)) == 0 &&
           (!strcmp(hp, sip_endpoint_addr(f->ep)) || !strcmp(hp, f->advertise));
}

/* Whether a phone registered here has the contact address addr ("host:port"). */
static bool binding_at(struct sipfront *f, const char *addr)
{
    return *addr_slot(f, addr) != NULL;
}

/*
 * Where a request goes, as far as this front end is concerned: into the domain (a user of the
 * served domain, a phone registered here, this front end itself) or out of it. *phone: the
 * local phone's contact address when the request is for one ("" when unknown).
 */
static bool goes_in(struct sipfront *f, const osip_message_t *m, char *phone, size_t len)
{
    phone[0] = '\0';
    int routes = osip_list_size(&m->routes);
    osip_route_t *rt = osip_list_get(&m->routes, 0);
    if (rt && is_self(f, rt->url)) /* loose routing: ours; only what follows counts */
        routes--;
    if (routes > 0)
        return false;
    const osip_uri_t *ru = m->req_uri;
    char hp[300];
    if (ru->username && *ru->username && ru->host && !strcasecmp(ru->host, f->domain)) {
        char aor[USER_MAX + 260];
        snprintf(aor, sizeof(aor), "%s@%s", ru->username, f->domain);
        const struct aor *a = aor_find(f, aor);
        const struct sip_binding *lb = a ? sip_bindings_latest_binding(&a->bs) : NULL;
        const char *b = lb ? lb->contact : NULL;
        osip_uri_t *u = NULL;
        if (lb && lb->flow[0]) {
            snprintf(phone, len, "%s", lb->flow);
        } else if (b && osip_uri_init(&u) == 0) {
            if (osip_uri_parse(u, b) == 0)
                uri_addr(u, phone, len);
            osip_uri_free(u);
        }
        return true;
    }
    if (uri_addr(ru, hp, sizeof(hp)) != 0)
        return false;
    if (is_self(f, ru))
        return true;
    if (binding_at(f, hp)) {
        snprintf(phone, len, "%s", hp);
        return true;
    }
    return false;
}

/* Takes our realm's credentials off a request about to be forwarded (they are this hop's). */
static void strip_credentials(const struct sipfront *f, osip_message_t *m)
{
    osip_authorization_t *a;
    while ((a = credentials(f, m))) {
        int pos = osip_list_size(&m->proxy_authorizations);
        while (--pos >= 0 && osip_list_get(&m->proxy_authorizations, pos) != a)
            ;
        if (pos < 0)
            break;
        osip_list_remove(&m->proxy_authorizations, pos);
        osip_authorization_free(a);
    }
}

static void answer_options(struct sipfront *f, const osip_message_t *m,
                           const struct sip_source *from)
{
    osip_message_t *r = sip_response_for(m, 200, NULL);
    char err[200];
    if (!r)
        return;
    osip_message_set_header(r, "Allow",
                            "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, "
                            "INFO, UPDATE, REFER, NOTIFY, SUBSCRIBE, PRACK");
    if (sip_send(f->ep, r, from, err, sizeof(err)) != 0)
        log_info(LOGM, "200 to %s not sent: %s", from->addr, err);
    osip_message_free(r);
}

static void on_request(struct sipfront *f, osip_message_t *m, const struct sip_source *from)
{
    const osip_uri_t *ru = m->req_uri;
    const osip_uri_t *fu = m->from->url;
    bool local_from = fu && fu->host && !strcasecmp(fu->host, f->domain);
    osip_generic_param_t *tag = NULL;
    bool in_dialog = osip_to_get_tag(m->to, &tag) == 0 && tag && tag->gvalue;
    char phone[300];
    bool in = goes_in(f, m, phone, sizeof(phone));
    /* OPTIONS for this front end or any user of its domain: answered here, alike for users that
     * exist and those that do not (a user's phone is not probed for an anonymous asker). */
    if (MSG_IS_OPTIONS(m) && !in_dialog &&
        (!ru->username || !*ru->username || (in && ru->host && !strcasecmp(ru->host, f->domain)))) {
        answer_options(f, m, from);
        return;
    }
    if (MSG_IS_CANCEL(m)) { /* acts only on a transaction of the same source and branch */
        proxy_request(f->px, m, from);
        return;
    }
    if (in_dialog && dialog_known(f, m->call_id->number, from->addr)) {
        strip_credentials(f, m);
        proxy_request(f->px, m, from);
        return;
    }
    if (in && !local_from) { /* into the domain: anyone may call */
        if (MSG_IS_INVITE(m) && phone[0])
            dialog_add(f, m->call_id->number, phone);
        strip_credentials(f, m);
        proxy_request(f->px, m, from);
        return;
    }
    if (MSG_IS_ACK(m)) { /* cannot be challenged: the ACK of our 407, or of nothing we passed */
        log_debug(LOGM, "%s: ACK %s neither into the domain nor in a known dialog: absorbed",
                  from->addr, m->call_id->number);
        return;
    }
    if (!local_from) {
        f->relay_refused++;
        refused_log(f, &f->refusals,
                    "%s: %s from %.64s@%.128s to %.64s@%.128s refused: only users of %s may "
                    "send through this proxy",
                    from->addr, m->sip_method, fu && fu->username ? fu->username : "",
                    fu && fu->host ? fu->host : "", ru->username ? ru->username : "",
                    ru->host ? ru->host : "", f->domain);
        char why[320];
        snprintf(why, sizeof(why), "Only Users Of %s Send Through This Proxy", f->domain);
        sip_reply(f->ep, m, from, 403, why);
        return;
    }
    if (!fu->username || !valid_user(fu->username, strlen(fu->username))) {
        sip_reply(f->ep, m, from, 403, "From Needs A User");
        return;
    }
    if (authenticate(f, m, from, fu->username) != 0)
        return;
    strip_credentials(f, m);
    if (MSG_IS_INVITE(m))
        dialog_add(f, m->call_id->number, from->addr);
    proxy_request(f->px, m, from);
}

static void on_message(void *ud, osip_message_t *m, const struct sip_source *from)
{
    struct sipfront *f = ud;
    if (!MSG_IS_REQUEST(m))
        proxy_response(f->px, m, from);
    else if (MSG_IS_REGISTER(m))
        on_register(f, m, from);
    else
        on_request(f, m, from);
}

void sipfront_from_node(struct sipfront *f, const char *node, const char *sn, const char *text,
                        size_t len, bool chan)
{
    proxy_from_node(f->px, node, sn, text, len, chan);
}

void sipfront_use_channels(struct sipfront *f, struct chans *cs)
{
    proxy_use_channels(f->px, cs);
}

void sipfront_use_media(struct sipfront *f, struct media *md)
{
    proxy_use_media(f->px, md);
}

static void expiry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sipfront *f = w->data;
    int64_t now = (int64_t)time(NULL);
    for (struct aor *a = f->all; a; a = a->all_next) {
        if (a->pending || a->bs.n == 0)
            continue;
        addr_index(f, a, -1);
        size_t gone = sip_bindings_expire(&a->bs, now);
        addr_index(f, a, 1);
        if (gone) {
            log_info(LOGM, "%zu binding%s of %s expired", gone, gone == 1 ? "" : "s", a->aor);
            publish(f, a, NULL, NULL, NULL);
        }
    }
}

/* The first store's answer (the node keeps the record refreshed); it may come after the front
 * end stopped, so it is told nothing of it. */
static void proxy_published(void *ud, const struct on_result *r)
{
    (void)ud;
    if (!r->ok && !strcmp(r->code, "not-attached")) /* stored once attached; failures logged */
        return;
    if (!r->ok)
        log_warn(LOGM,
                 "the proxy location record was not stored: %s: %s (is this node named "
                 "for the domain in the overlay document's sip_proxies?)",
                 r->code, r->reason);
}

struct sipfront *sipfront_start(struct ev_loop *loop, struct onode *on,
                                const struct sipfront_params *p, char *err, size_t errlen)
{
    struct sipfront *f = calloc(1, sizeof(*f));
    if (!f) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    f->loop = loop;
    f->on = on;
    snprintf(f->domain, sizeof(f->domain), "%s", p->domain);
    snprintf(f->overlay, sizeof(f->overlay), "%s", p->overlay);
    snprintf(f->registrar, sizeof(f->registrar), "%s", p->registrar);
    snprintf(f->node_id, sizeof(f->node_id), "%s", p->node_id);
    f->max_expires = p->max_expires > SIPB_MIN_EXPIRES ? p->max_expires : SIPB_DEF_EXPIRES;
    f->channels = p->channels;
    gnutls_rnd(GNUTLS_RND_KEY, f->secret, sizeof(f->secret));
    gnutls_rnd(GNUTLS_RND_KEY, f->dialog_key, sizeof(f->dialog_key));
    for (size_t i = 0; i < NC_BUCKETS; i++)
        f->nc_head[i] = -1;
    f->refusals.window = f->throttles.window = ev_now(loop);
    if (!(f->nc = calloc(NC_SLOTS, sizeof(*f->nc))) ||
        !(f->dialogs = calloc(DIALOG_SLOTS, sizeof(*f->dialogs))) ||
        !(f->src_fail = sip_limiter_new(FAIL_SLOTS, 1. / AUTH_FAIL_EVERY_S, SRC_FAIL_BURST)) ||
        !(f->user_fail = sip_limiter_new(FAIL_SLOTS, 1. / AUTH_FAIL_EVERY_S, USER_FAIL_BURST))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (!strcasecmp(f->domain, f->overlay)) {
        snprintf(err, errlen,
                 "sip_domain %s is the overlay's own domain, whose users register on their own "
                 "nodes: a P2P registrar serves another domain",
                 f->domain);
        goto fail;
    }
    if (load_users(f, p->users_file, err, errlen) != 0)
        goto fail;
    struct sip_limits lim = {.rate = p->rate};
    if (!(f->ep = sip_endpoint_start(loop, p->listen, &lim, on_message, f, err, errlen)))
        goto fail;
    snprintf(f->advertise, sizeof(f->advertise), "%s",
             p->advertise ? p->advertise : sip_endpoint_addr(f->ep));
    if (!(f->px = proxy_new(loop, on, f->ep, f->overlay, local_binding, f))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    proxy_serve_domain(f->px, f->domain);
    proxy_use_dns(f->px, p->dns);
    ev_timer_init(&f->expiry, expiry_cb, 1., 1.);
    f->expiry.data = f;
    ev_timer_start(loop, &f->expiry);
    json_t *v = json_pack("{s:s,s:s,s:s,s:o}", "domain", f->domain, "registrar", f->registrar,
                          "node_id", f->node_id, "contacts", sip_contacts_json(f->advertise));
    channel_fields(f, v);
    onode_publish(on, "update", REC_TYPE_PROXY_LOCATION, f->domain, v, 0, false, proxy_published,
                  NULL);
    json_decref(v);
    log_info(LOGM, "P2P registrar and proxy of %s on %s (UDP and TCP) for %zu users", f->domain,
             sip_endpoint_addr(f->ep), f->n_users);
    return f;
fail:
    sipfront_stop(f);
    return NULL;
}

json_t *sipfront_status(struct sipfront *f)
{
    size_t registered = 0, bindings = 0;
    for (const struct aor *a = f->all; a; a = a->all_next) {
        registered += a->bs.n > 0;
        bindings += a->bs.n;
    }
    struct sip_counters c;
    sip_endpoint_counters(f->ep, &c);
    return json_pack(
        "{s:s,s:s,s:s,s:I,s:I,s:I,s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}",
        "listen", sip_endpoint_addr(f->ep), "advertise", f->advertise, "domain", f->domain, "users",
        (json_int_t)f->n_users, "registered", (json_int_t)registered, "bindings",
        (json_int_t)bindings, "proxy", proxy_status(f->px), "counters", "received",
        (json_int_t)c.received, "malformed", (json_int_t)c.dropped_garbage, "rate_limited",
        (json_int_t)c.dropped_rate, "registers", (json_int_t)f->registers, "challenged",
        (json_int_t)f->challenged, "auth_failed", (json_int_t)f->auth_failed, "registered",
        (json_int_t)f->registered, "forbidden", (json_int_t)f->forbidden, "store_failed",
        (json_int_t)f->store_failed, "throttled", (json_int_t)f->throttled, "replayed",
        (json_int_t)f->replayed, "relay_refused", (json_int_t)f->relay_refused, "txn_refused",
        (json_int_t)c.txn_refused, "tcp_refused", (json_int_t)c.tcp_refused);
}

void sipfront_stop(struct sipfront *f)
{
    if (!f)
        return;
    if (f->loop)
        ev_timer_stop(f->loop, &f->expiry);
    for (struct aor *a = f->all, *next; a; a = next) {
        next = a->all_next;
        if (a->pending && ev_is_active(&a->pending->retry)) { /* waiting: nothing else frees it */
            ev_timer_stop(f->loop, &a->pending->retry);
            sip_reg_wait_done(&a->pending->w, NULL, NULL, "", false, "", "");
            reg_free(a->pending);
        } else if (a->pending) {
            a->pending->f = NULL; /* its answer comes (the node fails it at the latest) */
        }
        free(a);
    }
    for (size_t b = 0; b < BUCKETS; b++) {
        for (struct user *u = f->users[b], *next; u; u = next) {
            next = u->next;
            free(u);
        }
        for (struct addr_ent *e = f->addrs[b], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    }
    proxy_free(f->px);
    sip_endpoint_stop(f->ep);
    sip_limiter_free(f->src_fail);
    sip_limiter_free(f->user_fail);
    free(f->nc);
    free(f->dialogs);
    free(f);
}
