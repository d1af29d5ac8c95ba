/*
 * Bootstrap server (see server.h). The registry (registry.h) decides; this
 * file speaks HTTPS, checks addresses and keeps the counters.
 *
 * A check is a client connection over the overlay transport (conn.h) with
 * this server's service certificate: TLS 1.3, mutual authentication, hello.
 * It succeeds when the peer's verified certificate states the announced
 * Node-ID and the super-node role. The announcer learns the outcome in the
 * answer to its next announce, so no HTTP request waits on a check.
 */
#include "server.h"

#include <arpa/inet.h>
#include <gnutls/crypto.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "conn.h"
#include "fsutil.h"
#include "httpd.h"
#include "log.h"
#include "registry.h"

#define MAX_COUNT 50
#define DEF_COUNT 5
#define N_REASONS 8

static const char *const reasons[N_REASONS] = {"no-client-certificate",
                                               "not-a-supernode",
                                               "node-id-mismatch",
                                               "bad-json",
                                               "bad-address",
                                               "rate-limited",
                                               "full",
                                               "check-failed"};

struct check {
    struct check *next, *prev;
    struct bs_server *srv;
    struct conn *conn;
    nid_t id;
    char address[BS_ADDR_MAX];
    bool decided;
};

struct bs_server {
    struct ev_loop *loop;
    struct bs_server_config cfg;
    struct bs_registry *reg;
    struct httpd *http;
    struct tls_ctx *tls;
    ev_timer expire;
    struct check checks; /* list head */
    uint64_t rng;
    bool loopback_only; /* we listen on a loopback address */
    double started;
    unsigned long long announces, listings, withdrawals, rejected[N_REASONS];
};

static void count_reject(struct bs_server *s, const char *code)
{
    for (int i = 0; i < N_REASONS; i++)
        if (strcmp(reasons[i], code) == 0)
            s->rejected[i]++;
}

static void refuse(struct bs_server *s, struct httpd_req *r, unsigned status, const char *code,
                   const char *reason)
{
    count_reject(s, code);
    httpd_respond_error(r, status, code, reason);
}

static uint64_t next_random(void *ud)
{
    uint64_t *x = ud; /* xorshift64*, seeded from the system's generator */
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545f4914f6cdd1dull;
}

/* ---- Address checks ------------------------------------------------------------------------ */

static void check_decide(struct check *c, bool ok, const char *reason)
{
    if (c->decided)
        return;
    c->decided = true;
    struct bs_server *s = c->srv;
    bs_registry_checked(s->reg, &c->id, c->address, ok, reason, ev_now(s->loop));
    char hex[NID_HEX_LEN + 1];
    if (ok) {
        log_info("bootstrap", "listed %s at %s", nid_to_hex(&c->id, hex), c->address);
    } else {
        s->rejected[7]++;
        log_warn("bootstrap", "not listing %s: %s", nid_to_hex(&c->id, hex), reason);
    }
}

static void check_open(struct conn *conn, void *ud)
{
    struct check *c = ud;
    const struct peer_identity *id = conn_peer(conn);
    char why[BS_REASON_MAX], hex[NID_HEX_LEN + 1];
    if (!id->has_node_id || !nid_eq(&id->node_id, &c->id)) {
        snprintf(why, sizeof(why), "%s answers with Node-ID %s, not the announced one", c->address,
                 id->has_node_id ? nid_to_hex(&id->node_id, hex) : "(none)");
        check_decide(c, false, why);
    } else if (!(id->roles & ROLE_SUPERNODE)) {
        snprintf(why, sizeof(why), "%s presents a certificate without the super-node role",
                 c->address);
        check_decide(c, false, why);
    } else {
        check_decide(c, true, NULL);
    }
    conn_close(conn);
}

static void check_close(struct conn *conn, enum conn_close_reason r, const char *detail, void *ud)
{
    struct check *c = ud;
    if (!c->decided) {
        char why[BS_REASON_MAX];
        snprintf(why, sizeof(why), "%s: %s", c->address,
                 detail && *detail ? detail : conn_close_reason_str(r));
        check_decide(c, false, why);
    }
    c->prev->next = c->next;
    c->next->prev = c->prev;
    free(c);
}

static const struct conn_cbs check_cbs = {.on_open = check_open, .on_close = check_close};

static void start_check(struct bs_server *s, const nid_t *id, const char *address)
{
    struct check *c = calloc(1, sizeof(*c));
    char err[256];
    if (!c)
        return; /* the registry asks again after a period */
    c->srv = s;
    c->id = *id;
    snprintf(c->address, sizeof(c->address), "%s", address);
    c->conn = conn_connect(s->loop, s->tls, address, &check_cbs, c, err, sizeof(err));
    if (!c->conn) {
        char why[BS_REASON_MAX];
        snprintf(why, sizeof(why), "%.60s: %.90s", address, err); /* reasons are bounded */
        check_decide(c, false, why);
        free(c);
        return;
    }
    c->next = s->checks.next;
    c->prev = &s->checks;
    s->checks.next->prev = c;
    s->checks.next = c;
}

/* ---- Announce ------------------------------------------------------------------------------ */

/*
 * Whether an announced host may be listed: with public_only, public addresses only; a server
 * that itself listens on loopback is reachable from its own host alone, so its announcers are
 * on that host too and their loopback addresses are what they can be reached at.
 */
static bool address_allowed(const struct bs_server *s, const char *host)
{
    if (!s->cfg.public_only || bs_addr_public(host))
        return true;
    return s->loopback_only && bs_addr_loopback(host);
}

/* Verifies the client is a super node; answers and returns false when not. */
static bool announcer(struct bs_server *s, struct httpd_req *r, struct peer_identity *id)
{
    char err[256];
    if (httpd_req_client_identity(r, id, err, sizeof(err)) != 0) {
        refuse(s, r, 401, "no-client-certificate", err);
        return false;
    }
    if (!(id->roles & ROLE_SUPERNODE) || !id->has_node_id) {
        refuse(s, r, 403, "not-a-supernode", "the client certificate lacks the super-node role");
        return false;
    }
    return true;
}

static bool get_int(json_t *o, const char *key, long long min, long long *out)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) < min)
        return false;
    *out = json_integer_value(v);
    return true;
}

static void handle_announce(struct bs_server *s, struct httpd_req *r)
{
    struct peer_identity id;
    if (!announcer(s, r, &id))
        return;
    json_error_t je;
    json_t *o = json_loadb(httpd_req_body(r), httpd_req_body_len(r), JSON_REJECT_DUPLICATES, &je);
    const char *hex = json_string_value(json_object_get(o, "node_id"));
    const char *address = json_string_value(json_object_get(o, "address"));
    long long attached, capacity, uptime;
    nid_t nid;
    char host[64], why[200];
    unsigned port;
    if (!json_is_object(o) || !hex || !address || !get_int(o, "attached", 0, &attached) ||
        !get_int(o, "capacity", 1, &capacity) || !get_int(o, "uptime_s", 0, &uptime) ||
        nid_from_hex(&nid, hex) != 0) {
        snprintf(why, sizeof(why), "%s",
                 o ? "need node_id (40 hex), address, attached >= 0, "
                     "capacity >= 1, uptime_s >= 0"
                   : je.text);
        refuse(s, r, 400, "bad-json", why);
        goto out;
    }
    if (!nid_eq(&nid, &id.node_id)) {
        refuse(s, r, 403, "node-id-mismatch", "node_id is not the certificate's Node-ID");
        goto out;
    }
    if (cfg_parse_hostport(address, host, sizeof(host), &port) != 0 || port == 0 ||
        strlen(address) >= BS_ADDR_MAX) {
        refuse(s, r, 400, "bad-address", "address must be a numeric host:port");
        goto out;
    }
    if (!address_allowed(s, host)) {
        snprintf(why, sizeof(why), "%s is not a public address", host);
        refuse(s, r, 400, "bad-address", why);
        goto out;
    }
    s->announces++;
    struct bs_announce a = {nid, address, (unsigned long)attached, (unsigned long)capacity, uptime};
    switch (bs_registry_announce(s->reg, &a, ev_now(s->loop))) {
    case BS_ANN_FLOOD:
        httpd_add_header(r, "Retry-After", "1");
        refuse(s, r, 429, "rate-limited", "too many announces this period");
        goto out;
    case BS_ANN_FULL:
        refuse(s, r, 503, "full", "the list is full");
        goto out;
    case BS_ANN_CHECK:
        start_check(s, &nid, address);
        break;
    case BS_ANN_OK:
        break;
    }
    const struct bs_entry *e = bs_registry_get(s->reg, &nid);
    static const char *const names[] = {"pending", "listed", "rejected"};
    json_t *ans = json_pack("{s:s, s:I}", "state", e ? names[e->state] : "pending", "period_s",
                            (json_int_t)s->cfg.period_s);
    if (e && e->state != BS_LISTED)
        json_object_set_new(ans, "reason", json_string(e->reason));
    httpd_respond_json(r, 200, ans);
    json_decref(ans);
out:
    json_decref(o);
}

static void handle_withdraw(struct bs_server *s, struct httpd_req *r)
{
    struct peer_identity id;
    if (!announcer(s, r, &id))
        return;
    if (bs_registry_withdraw(s->reg, &id.node_id)) {
        char hex[NID_HEX_LEN + 1];
        s->withdrawals++;
        log_info("bootstrap", "%s withdrew", nid_to_hex(&id.node_id, hex));
    }
    static const char body[] = "{\"state\":\"withdrawn\"}";
    httpd_respond(r, 200, "application/json", body, sizeof(body) - 1);
}

/* ---- Reading ------------------------------------------------------------------------------- */

static void expire_now(struct bs_server *s);

static void handle_list(struct bs_server *s, struct httpd_req *r)
{
    const char *q = httpd_req_query(r, "count");
    long count = DEF_COUNT;
    if (q) {
        char *end;
        count = strtol(q, &end, 10);
        if (*end || count < 1 || count > MAX_COUNT) {
            httpd_respond_error(r, 400, "bad-count", "count must be 1-50");
            return;
        }
    }
    const struct bs_entry *out[MAX_COUNT];
    expire_now(s);
    size_t n = bs_registry_pick(s->reg, (size_t)count, next_random, &s->rng, out);
    json_t *list = json_array();
    for (size_t i = 0; i < n; i++) {
        char hex[NID_HEX_LEN + 1];
        json_array_append_new(list,
                              json_pack("{s:s, s:s}", "node_id", nid_to_hex(&out[i]->node_id, hex),
                                        "address", out[i]->address));
    }
    json_t *o = json_pack("{s:o}", "supernodes", list);
    s->listings++;
    httpd_respond_json(r, 200, o);
    json_decref(o);
}

struct page {
    char *buf;
    size_t len, cap;
    double now;
};

static void put(struct page *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct page *p, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(p->buf + p->len, p->cap - p->len, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < p->cap - p->len) {
            p->len += (size_t)n;
            return;
        }
        size_t cap = (p->cap + (size_t)n) * 2;
        char *grown = realloc(p->buf, cap);
        if (!grown)
            return;
        p->buf = grown;
        p->cap = cap;
    }
}

/* Angle of a Node-ID on the ring, from its top 32 bits. */
static double ring_angle(const nid_t *id)
{
    uint32_t top =
        (uint32_t)id->b[0] << 24 | (uint32_t)id->b[1] << 16 | (uint32_t)id->b[2] << 8 | id->b[3];
    return (double)top / 4294967296.0 * 2.0 * M_PI;
}

static void page_row(const struct bs_entry *e, void *ud)
{
    struct page *p = ud;
    static const char *const names[] = {"pending", "listed", "rejected"};
    char hex[NID_HEX_LEN + 1];
    /* Addresses and reasons are checked or ours; Node-IDs are hex: nothing to escape. */
    put(p,
        "<tr><td><code>%s</code></td><td>%s</td><td>%s</td><td>%lu / %lu</td>"
        "<td>%lld s</td></tr>\n",
        nid_to_hex(&e->node_id, hex), e->address, names[e->state], e->attached, e->capacity,
        (long long)e->uptime_s);
}

static void page_dot(const struct bs_entry *e, void *ud)
{
    struct page *p = ud;
    double a = ring_angle(&e->node_id);
    char hex[NID_HEX_LEN + 1];
    put(p, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"6\" fill=\"%s\"><title>%s %s</title></circle>\n",
        150 + 120 * sin(a), 150 - 120 * cos(a), e->state == BS_LISTED ? "#2a7" : "#c93",
        nid_to_hex(&e->node_id, hex), e->address);
}

/* The overlay name is the operator's, but a page must not trust text it did not build. */
static void html_escape(char *out, size_t len, const char *in)
{
    size_t o = 0;
    for (; *in && o + 7 < len; in++) {
        const char *rep = *in == '<'   ? "&lt;"
                          : *in == '>' ? "&gt;"
                          : *in == '&' ? "&amp;"
                          : *in == '"' ? "&quot;"
                                       : NULL;
        if (rep) {
            memcpy(out + o, rep, strlen(rep));
            o += strlen(rep);
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
}

static void handle_status(struct bs_server *s, struct httpd_req *r)
{
    struct page p = {NULL, 0, 0, ev_now(s->loop)};
    char overlay[6 * 256];
    html_escape(overlay, sizeof(overlay), s->cfg.overlay);
    put(&p,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>p2psip bootstrap: %s"
        "</title></head><body>\n<h1>Overlay %s</h1>\n<p>%zu super nodes listed, %zu "
        "pending, %zu rejected.</p>\n",
        overlay, overlay, bs_registry_count(s->reg, BS_LISTED),
        bs_registry_count(s->reg, BS_PENDING), bs_registry_count(s->reg, BS_REJECTED));
    put(&p, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"300\" height=\"300\" "
            "viewBox=\"0 0 300 300\"><circle cx=\"150\" cy=\"150\" r=\"120\" fill=\"none\" "
            "stroke=\"#888\"/>\n");
    bs_registry_foreach(s->reg, page_dot, &p);
    put(&p, "</svg>\n<table border=\"1\"><tr><th>Node-ID</th><th>address</th><th>state</th>"
            "<th>load</th><th>uptime</th></tr>\n");
    bs_registry_foreach(s->reg, page_row, &p);
    put(&p, "</table></body></html>\n");
    httpd_respond(r, 200, "text/html; charset=utf-8", p.buf ? p.buf : "", p.len);
    free(p.buf);
}

static void handle_metrics(struct bs_server *s, struct httpd_req *r)
{
    struct page p = {0};
    put(&p,
        "# HELP p2psip_bootstrap_announces_total Announces accepted.\n"
        "# TYPE p2psip_bootstrap_announces_total counter\n"
        "p2psip_bootstrap_announces_total %llu\n"
        "# HELP p2psip_bootstrap_listings_total Lists of super nodes served.\n"
        "# TYPE p2psip_bootstrap_listings_total counter\n"
        "p2psip_bootstrap_listings_total %llu\n"
        "# HELP p2psip_bootstrap_withdrawals_total Graceful withdrawals.\n"
        "# TYPE p2psip_bootstrap_withdrawals_total counter\n"
        "p2psip_bootstrap_withdrawals_total %llu\n"
        "# HELP p2psip_bootstrap_rejected_total Refused announces and failed checks, by "
        "reason.\n# TYPE p2psip_bootstrap_rejected_total counter\n",
        s->announces, s->listings, s->withdrawals);
    for (int i = 0; i < N_REASONS; i++)
        put(&p, "p2psip_bootstrap_rejected_total{reason=\"%s\"} %llu\n", reasons[i],
            s->rejected[i]);
    put(&p,
        "# HELP p2psip_bootstrap_supernodes Super nodes known, by state.\n"
        "# TYPE p2psip_bootstrap_supernodes gauge\n"
        "p2psip_bootstrap_supernodes{state=\"listed\"} %zu\n"
        "p2psip_bootstrap_supernodes{state=\"pending\"} %zu\n"
        "p2psip_bootstrap_supernodes{state=\"rejected\"} %zu\n",
        bs_registry_count(s->reg, BS_LISTED), bs_registry_count(s->reg, BS_PENDING),
        bs_registry_count(s->reg, BS_REJECTED));
    httpd_respond(r, 200, "text/plain; version=0.0.4", p.buf ? p.buf : "", p.len);
    free(p.buf);
}

static void handle(struct httpd_req *r, void *ud)
{
    struct bs_server *s = ud;
    const char *path = httpd_req_path(r), *m = httpd_req_method(r);
    const char *allow = NULL;
    if (!strcmp(path, "/v1/announce")) {
        if (!strcmp(m, "POST"))
            return handle_announce(s, r);
        if (!strcmp(m, "DELETE"))
            return handle_withdraw(s, r);
        allow = "POST, DELETE";
    } else if (!strcmp(path, "/v1/supernodes") || !strcmp(path, "/") || !strcmp(path, "/metrics")) {
        if (!strcmp(m, "GET")) {
            if (path[1] == 'v')
                return handle_list(s, r);
            return path[1] ? handle_metrics(s, r) : handle_status(s, r);
        }
        allow = "GET";
    }
    httpd_respond_unrouted(r, allow);
}

/* Drops the super nodes silent for 3 periods: from the timer, and before every list, so that
 * nobody is handed a node that stopped announcing up to a period ago. */
static void expire_now(struct bs_server *s)
{
    size_t n = bs_registry_expire(s->reg, ev_now(s->loop));
    if (n)
        log_info("bootstrap", "%zu super node%s dropped after 3 silent periods", n,
                 n == 1 ? "" : "s");
}

static void on_expire(struct ev_loop *loop, ev_timer *w, int revents)
{
    expire_now(w->data);
}

struct bs_server *bs_server_start(struct ev_loop *loop, const struct bs_server_config *cfg,
                                  char *err, size_t errlen)
{
    struct bs_server *s = calloc(1, sizeof(*s));
    char *ca = NULL, *cert = NULL, *key = NULL;
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->loop = loop;
    s->cfg = *cfg;
    s->checks.next = s->checks.prev = &s->checks;
    if (gnutls_rnd(GNUTLS_RND_NONCE, &s->rng, sizeof(s->rng)) != 0 || s->rng == 0)
        s->rng = 0x9e3779b97f4a7c15ull;
    s->reg = bs_registry_new(cfg->period_s, cfg->reverify_periods, cfg->max_supernodes,
                             cfg->max_announces);
    if (s->reg)
        bs_registry_set_max_capacity(s->reg, cfg->max_capacity);
    char lhost[64];
    s->loopback_only =
        cfg_parse_hostport(cfg->listen, lhost, sizeof(lhost), NULL) == 0 && bs_addr_loopback(lhost);
    int r;
    if ((r = fs_read_file(cfg->ca_file, 1 << 20, &ca, NULL)) < 0 ||
        (r = fs_read_file(cfg->cert_file, 1 << 20, &cert, NULL)) < 0 ||
        (r = fs_read_file(cfg->key_file, 1 << 20, &key, NULL)) < 0) {
        snprintf(err, errlen, "cannot read the CA, certificate or key: %s", strerror(-r));
        goto fail;
    }
    struct tls_config tc = {.ca_file = cfg->ca_file,
                            .cert_file = cfg->cert_file,
                            .key_file = cfg->key_file,
                            .overlay = cfg->overlay,
                            .handshake_timeout_ms = cfg->check_timeout_ms};
    if (!s->reg || !(s->tls = tls_ctx_new(&tc, err, errlen)))
        goto fail;
    struct httpd_config hc = {.listen = cfg->listen,
                              .cert_pem = cert,
                              .key_pem = key,
                              .client_ca_pem = ca,
                              .max_body = cfg->max_body,
                              .max_connections = cfg->max_connections,
                              .max_per_ip = cfg->max_per_address};
    if (!(s->http = httpd_start(loop, &hc, handle, s, err, errlen)))
        goto fail;
    ev_timer_init(&s->expire, on_expire, cfg->period_s, cfg->period_s);
    s->expire.data = s;
    ev_timer_start(loop, &s->expire);
    free(ca);
    free(cert);
    free(key);
    return s;
fail:
    free(ca);
    free(cert);
    free(key);
    bs_server_free(s);
    return NULL;
}

int bs_server_port(const struct bs_server *s)
{
    return httpd_port(s->http);
}

void bs_server_stop(struct bs_server *s)
{
    if (!s)
        return;
    ev_timer_stop(s->loop, &s->expire);
    httpd_stop(s->http);
    s->http = NULL;
    /* Checks close from the loop and then free themselves (check_close). */
    for (struct check *c = s->checks.next; c != &s->checks; c = c->next) {
        c->decided = true;
        conn_close(c->conn);
    }
}

void bs_server_free(struct bs_server *s)
{
    if (!s)
        return;
    bs_server_stop(s);
    bs_registry_free(s->reg);
    /* Every check connection has closed by now (the loop ran until they did). */
    tls_ctx_free(s->tls);
    free(s);
}
