/*
 * Promotion and demotion (docs/promotion.md). One timer watches the criteria:
 *
 *   ordinary --(all criteria hold)--> joining --(member of the ring)--> super node
 *       ^            |  (join fails in time: hold-down)                     |
 *       |            v                                                      |
 *       +------- leaving <--(probes fail / resources lost: hand-off)--------+
 *
 * Reachability is only ever what a super node saw when it connected back to
 * our advertised overlay address: while ordinary, our super node probes us
 * (protocol.md 5.5); while promoted, a ring neighbour does. Promotion needs
 * reachability verified without a failure for min_uptime_s; demotion needs
 * DEMOTE_STREAK failures in a row; after a demotion the node is held back
 * for a while that doubles with every demotion. That asymmetry is the
 * hysteresis: a port that comes and goes never stays verified long enough.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "announce.h"
#include "config.h"
#include "http_client.h"
#include "log.h"
#include "nodeid.h"
#include "promo.h"
#include "sn.h"
#include "stun.h"
#include "turn.h"

#define LOGM             "promotion"
#define DEMOTE_STREAK    3       /* failed probes (or low resource checks) in a row */
#define MEM_HYSTERESIS   0.8     /* promoted: demoted below this share of min_free_mem_mb */
#define BW_HYSTERESIS    0.5     /* ... and below this share of min_bandwidth_kbps */
#define NEED_VALID_S     900.0   /* an invitation counts this long (SNs repeat them every 300 s) */
#define HOLD_MIN_S       60.0    /* hold-down after a demotion or failed join: at least this */
#define HOLD_MAX_S       86400.0 /* and at most this, however often it happened */
#define JOIN_TIMEOUT_MIN 30.0
#define HANDSHAKE_MS     10000 /* the role's TLS handshake timeout */
#define ZOMBIE_S         (HANDSHAKE_MS / 1000.0 + 1.0)

enum pstate { P_OFF = 0, P_ORDINARY, P_JOINING, P_SN, P_LEAVING, P_STOPPED };
static const char *const pstate_names[] = {"off",        "ordinary", "joining",
                                           "super node", "leaving",  "stopped"};

struct promo {
    struct ev_loop *loop;
    struct promo_params p;
    const struct overlay_promotion *th;
    enum pstate state;
    char blocked[300]; /* the first criterion that does not hold ("" when none) */
    char off_reason[200];
    double started_at, tick_s, probe_s;

    /* criteria */
    double reach_since; /* first of an unbroken run of successful probes (0 = none) */
    unsigned reach_ok;  /* successful probes in that run */
    double kbps;        /* the last probe's bandwidth figure */
    double last_probe_at;
    bool probe_pending;
    char probe_detail[300];
    double invited_at;
    char invite_reason[32];
    double hold_until;

    /* while promoted */
    struct sn *sn;
    struct sn *zombie; /* a role that left, freed ZOMBIE_S later (zombie_timer) */
    ev_timer zombie_timer;
    struct stun_server *stun;
    struct turn_server *turn; /* on the STUN port, with the super node daemon's defaults */
    char stun_addr[160];
    struct http_client *http;
    struct announcer *ann;
    double joined_at, join_deadline;
    unsigned fail_streak, low_mem_streak, low_bw_streak;
    unsigned promotions, demotions;
    char last_demotion[300];

    ev_timer tick;
    ev_timer reap; /* frees the left super node role outside its own callbacks */
    void (*stop_done)(void *ud);
    void *stop_ud;
};

static double now(const struct promo *pr)
{
    return ev_now(pr->loop);
}

static double clampd(double v, double lo, double hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static const char *advertised(const struct promo *pr)
{
    return pr->p.advertise ? pr->p.advertise : pr->p.listen;
}

/* MemAvailable of /proc/meminfo in MiB, or -1 when unknown. */
static long long free_mem_mb(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb / 1024;
}

static long cpu_cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? n : 1;
}

static void set_blocked(struct promo *pr, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void set_blocked(struct promo *pr, const char *fmt, ...)
{
    char b[sizeof(pr->blocked)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof(b), fmt, ap);
    va_end(ap);
    /* Logged when the reason changes kind, not every tick (the figures in it move). */
    size_t k = strcspn(b, "0123456789");
    if (strncmp(b, pr->blocked, k) != 0 || pr->blocked[0] == '\0')
        log_info(LOGM, "not promoting: %s", b);
    snprintf(pr->blocked, sizeof(pr->blocked), "%s", b);
}

static void hold_back(struct promo *pr, const char *why)
{
    double hold = fmax(HOLD_MIN_S, 10.0 * (double)pr->th->min_uptime_s);
    unsigned k = pr->demotions > 0 ? pr->demotions - 1 : 0;
    hold = fmin(HOLD_MAX_S, hold * pow(2.0, k < 16 ? k : 16));
    pr->hold_until = now(pr) + hold;
    pr->reach_since = 0;
    pr->reach_ok = 0;
    pr->invited_at = 0;
    log_info(LOGM, "%s; no promotion for the next %.0f s", why, hold);
}

/* ---- probes ---------------------------------------------------------------------------------- */

static void probe_verdict(struct promo *pr, int verdict, const char *detail, double kbps)
{
    double t = now(pr);
    if (verdict < 0) {
        snprintf(pr->probe_detail, sizeof(pr->probe_detail), "no verdict: %s", detail);
        return;
    }
    if (verdict == 1) {
        if (pr->reach_since == 0) {
            pr->reach_since = t;
            pr->reach_ok = 0;
            log_info(LOGM, "reachable at %s (verified by a super node's connect-back)",
                     advertised(pr));
        }
        pr->reach_ok++;
        pr->kbps = kbps;
        pr->probe_detail[0] = '\0';
        return;
    }
    if (pr->reach_since != 0 || !pr->probe_detail[0])
        log_info(LOGM, "not reachable at %s: %s", advertised(pr), detail);
    pr->reach_since = 0;
    pr->reach_ok = 0;
    snprintf(pr->probe_detail, sizeof(pr->probe_detail), "%s", detail);
}

/* While ordinary: our super node connects back. */
static void on_probe_answer(void *ud, const struct on_result *r)
{
    struct promo *pr = ud;
    pr->probe_pending = false;
    if (pr->state != P_ORDINARY)
        return;
    if (!r->ok) {
        char d[200];
        snprintf(d, sizeof(d), "%s: %s", r->code, r->reason);
        probe_verdict(pr, -1, d, 0);
        return;
    }
    bool ok = json_is_true(json_object_get(r->body, "reachable"));
    probe_verdict(pr, ok ? 1 : 0,
                  json_string_value(json_object_get(r->body, "reason")) ?: "not reachable",
                  (double)json_integer_value(json_object_get(r->body, "kbps")));
}

static void demote(struct promo *pr, const char *why);

/* While promoted: a ring neighbour connects back. */
static void on_self_probe(void *ud, int verdict, const char *detail, double kbps)
{
    struct promo *pr = ud;
    pr->probe_pending = false;
    if (pr->state != P_SN)
        return;
    if (verdict < 0) {
        snprintf(pr->probe_detail, sizeof(pr->probe_detail), "no verdict: %s", detail);
        return;
    }
    if (verdict == 1) {
        pr->fail_streak = 0;
        pr->kbps = kbps;
        pr->probe_detail[0] = '\0';
        if (pr->th->min_bandwidth_kbps > 0 &&
            kbps < BW_HYSTERESIS * (double)pr->th->min_bandwidth_kbps)
            pr->low_bw_streak++;
        else
            pr->low_bw_streak = 0;
        if (pr->low_bw_streak >= DEMOTE_STREAK) {
            char w[200];
            snprintf(w, sizeof(w), "bandwidth about %.0f kbit/s, below %.0f", kbps,
                     BW_HYSTERESIS * (double)pr->th->min_bandwidth_kbps);
            demote(pr, w);
        }
        return;
    }
    pr->fail_streak++;
    snprintf(pr->probe_detail, sizeof(pr->probe_detail), "%s", detail);
    log_warn(LOGM, "a ring neighbour cannot reach us at %s (%u in a row): %s", advertised(pr),
             pr->fail_streak, detail);
    if (pr->fail_streak >= DEMOTE_STREAK) {
        char w[300];
        snprintf(w, sizeof(w), "not reachable at %s any more: %s", advertised(pr), detail);
        demote(pr, w);
    }
}

static void probe_if_due(struct promo *pr)
{
    double t = now(pr);
    if (pr->probe_pending || t - pr->last_probe_at < pr->probe_s)
        return;
    if (pr->state == P_ORDINARY) {
        if (onode_attached_for(pr->p.on) < 0)
            return;
        pr->last_probe_at = t;
        pr->probe_pending = true;
        json_t *b = json_pack("{s:s}", "listen", advertised(pr));
        onode_request(pr->p.on, "probe", b, on_probe_answer, pr);
        json_decref(b);
    } else if (pr->state == P_SN) {
        pr->last_probe_at = t;
        if (sn_probe_self(pr->sn, on_self_probe, pr, NULL, 0) == 0)
            pr->probe_pending = true;
    }
}

/* ---- promotion ------------------------------------------------------------------------------- */

static void on_membership(void *ud, bool member);

static bool announce_wanted(void *ud, struct announce_load *load)
{
    struct promo *pr = ud;
    if (!pr->sn || pr->state != P_SN)
        return false;
    load->attached = sn_attached(pr->sn);
    load->capacity = pr->p.max_attached;
    load->uptime_s = now(pr) - pr->joined_at;
    return sn_is_healthy(pr->sn);
}

static void on_health(void *ud, bool healthy)
{
    struct promo *pr = ud;
    if (pr->ann)
        announcer_poke(pr->ann);
}

static void promote(struct promo *pr)
{
    const struct node_creds *cr = pr->p.creds;
    const struct overlay_doc *doc = &cr->doc;
    char err[512];
    onode_set_listening(pr->p.on, false, NULL, 0);
    struct tls_config tc = {.ca_file = cr->ca_file,
                            .cert_file = cr->cert_file,
                            .key_file = cr->key_file,
                            .overlay = doc->overlay,
                            .handshake_timeout_ms = HANDSHAKE_MS,
                            .idle_timeout_ms = 120000};
    /* STUN for the ordinary nodes we will serve: UDP, the overlay port's number. */
    pr->stun = stun_server_start(pr->loop, pr->p.listen, err, sizeof(err));
    pr->stun_addr[0] = '\0';
    if (pr->stun)
        snprintf(pr->stun_addr, sizeof(pr->stun_addr), "%s", advertised(pr));
    else
        log_info(LOGM, "no STUN server (%s)", err);
    /* TURN (turn.h) on the same port, relaying from the advertised IPv4 address, with the
     * supernode daemon's default quotas; none when that address is IPv6. */
    char relay[160];
    unsigned rport;
    pr->turn = NULL;
    if (pr->stun && cfg_parse_hostport(advertised(pr), relay, sizeof(relay), &rport) == 0 &&
        !strchr(relay, ':')) {
        struct turn_params tp = {.realm = doc->overlay,
                                 .relay_ip = relay,
                                 .port_min = 49152,
                                 .port_max = 65535,
                                 .bandwidth_kbps = 2000};
        pr->turn = turn_server_start(pr->loop, pr->stun, &tp, err, sizeof(err));
        if (!pr->turn)
            log_info(LOGM, "no TURN server (%s)", err);
    }
    struct sn_params sp = {
        .overlay = doc->overlay,
        .listen = pr->p.listen,
        .advertise = advertised(pr),
        .tls = tc,
        .quotas = {32, 10000, 16u << 20, 1000000, (size_t)2 << 30},
        .max_connections = pr->p.max_connections,
        .peer_idle_s = 60,
        .max_attached = pr->p.max_attached,
        .on_rate = 50,
        .on_inflight = 32,
        .stun = pr->stun_addr[0] ? pr->stun_addr : NULL,
        .turn = pr->turn,
        .on_membership = on_membership,
        .on_health = on_health,
        .ud = pr,
    };
    sn_params_from_doc(&sp, doc);
    pr->sn = sn_new(pr->loop, &sp, err, sizeof(err));
    if (!pr->sn) {
        log_warn(LOGM, "cannot start the super node role: %s", err);
        turn_server_stop(pr->turn);
        pr->turn = NULL;
        stun_server_stop(pr->stun);
        pr->stun = NULL;
        char e2[512];
        if (onode_set_listening(pr->p.on, true, e2, sizeof(e2)) != 0)
            log_warn(LOGM, "%s", e2);
        pr->demotions++;
        hold_back(pr, "promotion failed");
        return;
    }
    const char *addrs[17];
    size_t n = onode_known_supernodes(pr->p.on, addrs, 16);
    addrs[n] = NULL;
    pr->state = P_JOINING;
    pr->blocked[0] = '\0';
    pr->join_deadline = now(pr) + fmax(JOIN_TIMEOUT_MIN, 10.0 * (double)doc->stabilize_s);
    log_info(LOGM,
             "promoting: every criterion holds (invited: %s; reachable at %s for %.0f s, about "
             "%.0f kbit/s); joining the ring through %zu known super nodes",
             pr->invite_reason, advertised(pr), now(pr) - pr->reach_since, pr->kbps, n);
    sn_start_join(pr->sn, addrs);
}

static void on_membership(void *ud, bool member)
{
    struct promo *pr = ud;
    if (member && pr->state == P_JOINING) {
        pr->state = P_SN;
        pr->promotions++;
        pr->joined_at = now(pr);
        pr->fail_streak = pr->low_mem_streak = pr->low_bw_streak = 0;
        pr->last_probe_at = now(pr); /* the first self-probe one period from now */
        pr->probe_pending = false;
        char hex[NID_HEX_LEN + 1];
        log_info(LOGM, "promoted: now a super node of the ring as %s at %s",
                 nid_to_hex(&sn_identity(pr->sn)->node_id, hex), advertised(pr));
        if (pr->p.n_bootstrap_urls > 0) {
            if (!pr->http)
                pr->http = http_client_new(pr->loop);
            if (pr->http) {
                struct announce_config ac = {
                    .urls = pr->p.bootstrap_urls,
                    .n_urls = pr->p.n_bootstrap_urls,
                    .ca_file = pr->p.creds->ca_file,
                    .cert_file = pr->p.creds->cert_file,
                    .key_file = pr->p.creds->key_file,
                    .node_id = hex,
                    .address = advertised(pr),
                    .wanted = announce_wanted,
                    .ud = pr,
                };
                pr->ann = announcer_start(pr->loop, pr->http, &ac);
            }
        }
        /* Our own user functions now go through our own super node role. */
        onode_attach_self(pr->p.on, advertised(pr));
    } else if (!member && pr->state == P_SN) {
        demote(pr, "no longer a member of the ring");
    }
}

/* ---- demotion -------------------------------------------------------------------------------- */

static void zombie_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct promo *pr = w->data;
    sn_free(pr->zombie);
    pr->zombie = NULL;
}

/* After the hand-off (from the loop, outside the role's own callbacks). */
static void reap_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct promo *pr = w->data;
    sn_set_turn(pr->sn, NULL);
    turn_server_stop(pr->turn);
    pr->turn = NULL;
    stun_server_stop(pr->stun);
    pr->stun = NULL;
    announcer_free(pr->ann);
    pr->ann = NULL;
    if (pr->state == P_STOPPED) {
        /* The role is freed with the rest once the loop has ended (promo_free). */
        if (pr->http) {
            http_client_free(pr->http);
            pr->http = NULL;
        }
        log_info(LOGM, "left the ring");
        if (pr->stop_done)
            pr->stop_done(pr->stop_ud);
        return;
    }
    /*
     * The role has left, but connections accepted just before its listener
     * closed may still be in their TLS handshake and refer to it: it is freed
     * once those are surely over.
     */
    if (pr->zombie) {
        ev_timer_stop(pr->loop, &pr->zombie_timer);
        sn_free(pr->zombie);
    }
    pr->zombie = pr->sn;
    pr->sn = NULL;
    ev_timer_set(&pr->zombie_timer, ZOMBIE_S, 0.);
    ev_timer_start(pr->loop, &pr->zombie_timer);
    pr->state = P_ORDINARY;
    char err[512];
    if (onode_set_listening(pr->p.on, true, err, sizeof(err)) != 0)
        log_warn(LOGM, "%s", err);
    log_info(LOGM, "demoted: an ordinary node again (hand-off done)");
}

static void left_cb(void *ud)
{
    struct promo *pr = ud;
    ev_timer_set(&pr->reap, 0., 0.);
    ev_timer_start(pr->loop, &pr->reap);
}

static void leave_ring(struct promo *pr)
{
    announcer_withdraw(pr->ann, NULL, NULL);
    if (pr->sn)
        sn_leave(pr->sn, left_cb, pr);
    else
        left_cb(pr);
}

static void demote(struct promo *pr, const char *why)
{
    if (pr->state != P_SN && pr->state != P_JOINING)
        return;
    bool was_sn = pr->state == P_SN;
    pr->state = P_LEAVING;
    pr->demotions++;
    snprintf(pr->last_demotion, sizeof(pr->last_demotion), "%s", why);
    log_warn(LOGM, "%s: %s; handing our records to the ring and leaving it",
             was_sn ? "demoting" : "promotion abandoned", why);
    hold_back(pr, was_sn ? "demoting" : "promotion abandoned");
    onode_attach_self(pr->p.on, NULL); /* the user's functions move to another super node */
    leave_ring(pr);
}

/* ---- the criteria ---------------------------------------------------------------------------- */

static void evaluate(struct promo *pr)
{
    const struct overlay_promotion *th = pr->th;
    double t = now(pr);
    long cores = cpu_cores();
    long long mem = free_mem_mb();
    if (cores < th->min_cpus) {
        set_blocked(pr, "%ld CPU cores, %lld needed", cores, (long long)th->min_cpus);
        return;
    }
    if (mem >= 0 && mem < th->min_free_mem_mb) {
        set_blocked(pr, "%lld MiB of memory free, %lld needed", mem,
                    (long long)th->min_free_mem_mb);
        return;
    }
    double att = onode_attached_for(pr->p.on);
    if (att < 0) {
        set_blocked(pr, "not attached to a super node");
        return;
    }
    probe_if_due(pr);
    if (att < (double)th->min_uptime_s) {
        set_blocked(pr, "attached for %.0f s, %lld s needed", att, (long long)th->min_uptime_s);
        return;
    }
    if (pr->reach_since == 0) {
        set_blocked(pr, "reachability at %s not verified%s%s", advertised(pr),
                    pr->probe_detail[0] ? ": " : " yet", pr->probe_detail);
        return;
    }
    if (t - pr->reach_since < (double)th->min_uptime_s || pr->reach_ok < 2) {
        set_blocked(pr, "reachable for %.0f s (%u probes), %lld s needed", t - pr->reach_since,
                    pr->reach_ok, (long long)th->min_uptime_s);
        return;
    }
    if (pr->kbps < (double)th->min_bandwidth_kbps) {
        set_blocked(pr, "bandwidth about %.0f kbit/s, %lld needed", pr->kbps,
                    (long long)th->min_bandwidth_kbps);
        return;
    }
    if (t < pr->hold_until) {
        set_blocked(pr, "held back %.0f s more after a demotion", pr->hold_until - t);
        return;
    }
    if (pr->invited_at == 0 || t - pr->invited_at > NEED_VALID_S) {
        set_blocked(pr, "no super node has asked for more super nodes");
        return;
    }
    promote(pr);
}

static void watch_promoted(struct promo *pr)
{
    const struct overlay_promotion *th = pr->th;
    long long mem = free_mem_mb();
    if (mem >= 0 && (double)mem < MEM_HYSTERESIS * (double)th->min_free_mem_mb)
        pr->low_mem_streak++;
    else
        pr->low_mem_streak = 0;
    if (pr->low_mem_streak >= DEMOTE_STREAK) {
        char w[200];
        snprintf(w, sizeof(w), "%lld MiB of memory free, below %.0f", mem,
                 MEM_HYSTERESIS * (double)th->min_free_mem_mb);
        demote(pr, w);
        return;
    }
    probe_if_due(pr);
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct promo *pr = w->data;
    switch (pr->state) {
    case P_ORDINARY:
        evaluate(pr);
        break;
    case P_JOINING:
        if (now(pr) > pr->join_deadline)
            demote(pr, "could not join the ring in time");
        break;
    case P_SN:
        watch_promoted(pr);
        break;
    default:
        break;
    }
}

/* ---- life ------------------------------------------------------------------------------------ */

struct promo *promo_start(struct ev_loop *loop, const struct promo_params *p)
{
    struct promo *pr = calloc(1, sizeof(*pr));
    if (!pr)
        return NULL;
    pr->loop = loop;
    pr->p = *p;
    if (!pr->p.max_attached)
        pr->p.max_attached = 1000;
    if (!pr->p.max_connections)
        pr->p.max_connections = 4096;
    pr->th = &p->creds->doc.promotion;
    pr->started_at = now(pr);
    double up = (double)pr->th->min_uptime_s;
    pr->tick_s = clampd(up / 8.0, 0.25, 5.0);
    pr->probe_s = clampd(up / 4.0, 1.0, 60.0);
    pr->state = P_ORDINARY;
    if (p->never)
        snprintf(pr->off_reason, sizeof(pr->off_reason), "never_promote is set");
    else if (!(p->creds->id.roles & ROLE_SUPERNODE))
        snprintf(pr->off_reason, sizeof(pr->off_reason),
                 "our certificate lacks the super node role (the account may not host one)");
    else if (!p->listen)
        snprintf(pr->off_reason, sizeof(pr->off_reason),
                 "no overlay port: set listen (and advertise) to be considered");
    if (pr->off_reason[0]) {
        pr->state = P_OFF;
        log_info(LOGM, "this node will not become a super node: %s", pr->off_reason);
    } else {
        log_info(LOGM,
                 "watching the criteria every %.2f s (probes every %.0f s): up %lld s, %lld "
                 "cores, %lld MiB free, %lld kbit/s, and an invitation",
                 pr->tick_s, pr->probe_s, (long long)pr->th->min_uptime_s,
                 (long long)pr->th->min_cpus, (long long)pr->th->min_free_mem_mb,
                 (long long)pr->th->min_bandwidth_kbps);
    }
    ev_timer_init(&pr->tick, tick_cb, pr->tick_s, pr->tick_s);
    pr->tick.data = pr;
    ev_timer_init(&pr->reap, reap_cb, 0., 0.);
    pr->reap.data = pr;
    ev_timer_init(&pr->zombie_timer, zombie_cb, ZOMBIE_S, 0.);
    pr->zombie_timer.data = pr;
    if (pr->state != P_OFF)
        ev_timer_start(loop, &pr->tick);
    return pr;
}

void promo_invited(struct promo *pr, const char *reason)
{
    if (!pr || pr->state == P_OFF)
        return;
    pr->invited_at = now(pr);
    snprintf(pr->invite_reason, sizeof(pr->invite_reason), "%s", reason);
}

void promo_stop(struct promo *pr, void (*done)(void *ud), void *ud)
{
    ev_timer_stop(pr->loop, &pr->tick);
    ev_timer_stop(pr->loop, &pr->zombie_timer); /* freed after the loop (promo_free) */
    enum pstate was = pr->state;
    pr->stop_done = done;
    pr->stop_ud = ud;
    pr->state = P_STOPPED;
    if (was == P_SN || was == P_JOINING) {
        log_info(LOGM, "stopping: handing our records to the ring and leaving it");
        leave_ring(pr);
        return;
    }
    if (was == P_LEAVING)
        return; /* reap_cb finishes (state is P_STOPPED now) */
    if (pr->http) {
        http_client_free(pr->http);
        pr->http = NULL;
    }
    if (done)
        done(ud);
}

void promo_free(struct promo *pr)
{
    if (!pr)
        return;
    ev_timer_stop(pr->loop, &pr->tick);
    ev_timer_stop(pr->loop, &pr->reap);
    ev_timer_stop(pr->loop, &pr->zombie_timer);
    sn_free(pr->sn);
    sn_free(pr->zombie);
    turn_server_stop(pr->turn);
    stun_server_stop(pr->stun);
    announcer_free(pr->ann);
    if (pr->http)
        http_client_free(pr->http);
    free(pr);
}

json_t *promo_status(struct promo *pr)
{
    double t = now(pr);
    const struct overlay_promotion *th = pr->th;
    json_t *st = json_pack("{s:s,s:I,s:I}", "state", pstate_names[pr->state], "promotions",
                           (json_int_t)pr->promotions, "demotions", (json_int_t)pr->demotions);
    if (pr->state == P_OFF)
        json_object_set_new(st, "blocked", json_string(pr->off_reason));
    else if (pr->state == P_ORDINARY && pr->blocked[0])
        json_object_set_new(st, "blocked", json_string(pr->blocked));
    json_t *c =
        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:b,s:f,s:f}", "cores", (json_int_t)cpu_cores(),
                  "min_cpus", (json_int_t)th->min_cpus, "free_mem_mb", (json_int_t)free_mem_mb(),
                  "min_free_mem_mb", (json_int_t)th->min_free_mem_mb, "min_bandwidth_kbps",
                  (json_int_t)th->min_bandwidth_kbps, "min_uptime_s", (json_int_t)th->min_uptime_s,
                  "reachable", pr->state == P_SN ? pr->fail_streak == 0 : pr->reach_since != 0,
                  "reachable_for_s", pr->reach_since ? t - pr->reach_since : 0.0, "kbps", pr->kbps);
    if (pr->probe_detail[0])
        json_object_set_new(c, "probe", json_string(pr->probe_detail));
    if (pr->invited_at)
        json_object_set_new(
            c, "invited",
            json_pack("{s:s,s:f}", "reason", pr->invite_reason, "ago_s", t - pr->invited_at));
    if (pr->hold_until > t)
        json_object_set_new(c, "held_for_s", json_real(pr->hold_until - t));
    json_object_set_new(st, "criteria", c);
    if (pr->last_demotion[0])
        json_object_set_new(st, "last_demotion", json_string(pr->last_demotion));
    if (pr->sn && (pr->state == P_SN || pr->state == P_JOINING)) {
        json_t *sn = sn_status(pr->sn);
        if (pr->turn)
            json_object_set_new(sn, "turn", turn_server_status(pr->turn));
        json_object_set_new(st, "supernode", sn);
    }
    return st;
}
