/*
 * The super node's P2P registrar and proxy for classical phones (sipfront.h).
 */
#include "sipfront.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <gnutls/crypto.h>

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

struct user {
    struct user *next;
    char name[USER_MAX];
    char ha1[33];
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
    struct user *users[BUCKETS];
    size_t n_users;
    struct aor *aors[BUCKETS];
    struct aor *all;
    size_t n_aors;
    uint64_t order;
    unsigned char secret[32]; /* keys the nonces: no state per challenge */
    ev_timer expiry;
    uint64_t registers, challenged, auth_failed, registered, forbidden, store_failed;
};

#define BUSY_RETRY_S 0.05
#define BUSY_TRIES   40

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
 */

/* nonce = 16 hex digits of the time it was made + 32 of an HMAC over them. */
static void make_nonce(const struct sipfront *f, char out[64])
{
    char ts[17];
    snprintf(ts, sizeof(ts), "%016" PRIx64, (uint64_t)time(NULL));
    unsigned char mac[32];
    gnutls_hmac_fast(GNUTLS_MAC_SHA256, f->secret, sizeof(f->secret), ts, 16, mac);
    char h[33];
    hex_of(mac, 16, h);
    snprintf(out, 64, "%s%s", ts, h);
}

/* 0: ours and fresh; 1: ours but stale; -1: not ours. */
static int check_nonce(const struct sipfront *f, const char *nonce)
{
    if (strlen(nonce) != 48)
        return -1;
    unsigned char mac[32];
    gnutls_hmac_fast(GNUTLS_MAC_SHA256, f->secret, sizeof(f->secret), nonce, 16, mac);
    char h[33];
    hex_of(mac, 16, h);
    if (!equal_ct(h, nonce + 16, 32))
        return -1;
    char ts[17];
    memcpy(ts, nonce, 16);
    ts[16] = '\0';
    uint64_t t = strtoull(ts, NULL, 16), now = (uint64_t)time(NULL);
    return t <= now && now - t <= NONCE_TTL_S ? 0 : 1;
}

static void challenge(struct sipfront *f, const osip_message_t *m, const struct sip_source *from,
                      bool stale)
{
    f->challenged++;
    osip_message_t *r = sip_response_for(m, 401, NULL);
    if (!r)
        return;
    char nonce[64], h[400], err[200];
    make_nonce(f, nonce);
    snprintf(h, sizeof(h), "Digest realm=\"%s\", nonce=\"%s\", algorithm=MD5, qop=\"auth\"%s",
             f->domain, nonce, stale ? ", stale=true" : "");
    osip_message_set_header(r, "WWW-Authenticate", h);
    if (sip_send(f->ep, r, from, err, sizeof(err)) != 0)
        log_info(LOGM, "401 to %s not sent: %s", from->addr, err);
    osip_message_free(r);
}

/*
 * 0: the request carries good credentials of `user`; 1: it was challenged
 * (no or stale credentials); -1: refused with 403 (logged).
 */
static int authenticate(struct sipfront *f, const osip_message_t *m, const struct sip_source *from,
                        const char *user)
{
    osip_authorization_t *a = NULL;
    if (osip_message_get_authorization((osip_message_t *)m, 0, &a) < 0 || !a) {
        challenge(f, m, from, false);
        return 1;
    }
    char uname[USER_MAX], realm[256], nonce[64], uri[512], resp[64], cnonce[128], qop[16], nc[16];
    const char *why = NULL;
    if (!a->auth_type || strcasecmp(a->auth_type, "Digest") != 0)
        why = "not Digest";
    else if (!unquote(a->username, uname, sizeof(uname)) ||
             !unquote(a->realm, realm, sizeof(realm)) || !unquote(a->nonce, nonce, sizeof(nonce)) ||
             !unquote(a->uri, uri, sizeof(uri)) || !unquote(a->response, resp, sizeof(resp)))
        why = "incomplete Authorization";
    else if (a->algorithm && strcasecmp(a->algorithm, "MD5") != 0 &&
             strcasecmp(a->algorithm, "\"MD5\"") != 0)
        why = "an algorithm other than MD5";
    else if (strcmp(uname, user) != 0)
        why = "credentials of another user";
    else if (strcasecmp(realm, f->domain) != 0)
        why = "another realm";
    if (why) {
        f->auth_failed++;
        log_warn(LOGM, "%s: REGISTER for %s@%s refused: %s", from->addr, user, f->domain, why);
        sip_reply(f->ep, m, from, 403, "Bad Credentials");
        return -1;
    }
    int ns = check_nonce(f, nonce);
    if (ns != 0) { /* an old or foreign nonce: a fresh challenge, said to be stale if ours */
        challenge(f, m, from, ns == 1);
        return 1;
    }
    bool has_qop = a->message_qop != NULL;
    if (has_qop &&
        (!unquote(a->message_qop, qop, sizeof(qop)) || strcmp(qop, "auth") != 0 ||
         !unquote(a->cnonce, cnonce, sizeof(cnonce)) || !unquote(a->nonce_count, nc, sizeof(nc)))) {
        f->auth_failed++;
        log_warn(LOGM, "%s: REGISTER for %s@%s refused: qop other than auth, or no cnonce/nc",
                 from->addr, user, f->domain);
        sip_reply(f->ep, m, from, 403, "Bad Credentials");
        return -1;
    }
    const struct user *u = user_find(f, user);
    char ha2[33], want[33], buf[1200];
    snprintf(buf, sizeof(buf), "%s:%s", m->sip_method, uri);
    md5_hex(buf, ha2);
    if (has_qop)
        snprintf(buf, sizeof(buf), "%s:%s:%s:%s:%s:%s", u ? u->ha1 : "-", nonce, nc, cnonce, qop,
                 ha2);
    else
        snprintf(buf, sizeof(buf), "%s:%s:%s", u ? u->ha1 : "-", nonce, ha2);
    md5_hex(buf, want);
    for (char *p = resp; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    if (!u || strlen(resp) != 32 || !equal_ct(resp, want, 32)) {
        f->auth_failed++;
        log_warn(LOGM, "%s: REGISTER for %s@%s refused: %s", from->addr, user, f->domain,
                 u ? "wrong password" : "no such user");
        sip_reply(f->ep, m, from, 403, "Bad Credentials");
        return -1;
    }
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
    int rc = sip_reg_wait_done(&g->w, f ? f->ep : NULL, a ? &a->bs : NULL, a ? a->aor : "", ok,
                               res->code, res->reason);
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
        g->lifetime_s = last - now + RECORD_SLACK;
    }
    send_store(f, g);
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
    int rc = sip_bindings_apply(&a->bs, m, now, f->max_expires, &f->order, &why);
    if (rc == 1)
        sip_bindings_reply(f->ep, &a->bs, m, from, now);
    else if (rc != 0)
        sip_bindings_refuse(f->ep, m, from, rc, why);
    else
        publish(f, a, m, from, &old);
}

/* The proxy asks: is `aor` a phone registered here? */
static const char *local_binding(void *ud, const char *aor, bool *local)
{
    struct sipfront *f = ud;
    const struct aor *a = aor_find(f, aor);
    *local = a && a->bs.n > 0;
    return *local ? sip_bindings_latest(&a->bs) : NULL;
}

static void on_message(void *ud, osip_message_t *m, const struct sip_source *from)
{
    struct sipfront *f = ud;
    if (!MSG_IS_REQUEST(m))
        proxy_response(f->px, m, from);
    else if (MSG_IS_REGISTER(m))
        on_register(f, m, from);
    else if (MSG_IS_OPTIONS(m) && !m->req_uri->username) /* a phone's keepalive to us */
        sip_reply(f->ep, m, from, 200, NULL);
    else
        proxy_request(f->px, m, from);
}

static void expiry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sipfront *f = w->data;
    int64_t now = (int64_t)time(NULL);
    for (struct aor *a = f->all; a; a = a->all_next) {
        if (a->pending || a->bs.n == 0)
            continue;
        size_t gone = sip_bindings_expire(&a->bs, now);
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
    gnutls_rnd(GNUTLS_RND_KEY, f->secret, sizeof(f->secret));
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
        "{s:s,s:s,s:s,s:I,s:I,s:I,s:o,s:{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}", "listen",
        sip_endpoint_addr(f->ep), "advertise", f->advertise, "domain", f->domain, "users",
        (json_int_t)f->n_users, "registered", (json_int_t)registered, "bindings",
        (json_int_t)bindings, "proxy", proxy_status(f->px), "counters", "received",
        (json_int_t)c.received, "malformed", (json_int_t)c.dropped_garbage, "rate_limited",
        (json_int_t)c.dropped_rate, "registers", (json_int_t)f->registers, "challenged",
        (json_int_t)f->challenged, "auth_failed", (json_int_t)f->auth_failed, "registered",
        (json_int_t)f->registered, "forbidden", (json_int_t)f->forbidden, "store_failed",
        (json_int_t)f->store_failed);
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
    for (size_t b = 0; b < BUCKETS; b++)
        for (struct user *u = f->users[b], *next; u; u = next) {
            next = u->next;
            free(u);
        }
    proxy_free(f->px);
    sip_endpoint_stop(f->ep);
    free(f);
}
