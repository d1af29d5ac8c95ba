/*
 * Announcing to the bootstrap servers (announce.h). One round = one POST
 * /v1/announce per server; what each server answers ("listed", "pending",
 * "rejected" with a reason) is logged when it changes, so an operator sees
 * why a node is not listed without the log filling up every period.
 */
#include "announce.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define WITHDRAW_TIMEOUT_S 3.0

struct server {
    char *url;
    char state[64]; /* what it said last ("" before any answer) */
};

struct announcer {
    struct ev_loop *loop;
    struct http_client *http;
    struct announce_config cfg;
    char node_id[41], address[64]; /* copies: cfg's strings need not outlive the call */
    struct server *servers;
    size_t n;
    ev_timer timer;
    double period_s;
    bool listed_wanted; /* the last round announced (rather than withdrew) */
    size_t inflight;
    bool freed;
    /* withdrawal */
    void (*done)(void *);
    void *done_ud;
    size_t withdraw_pending;
    ev_timer withdraw_timer;
    bool withdrawing;
};

struct call {
    struct announcer *a;
    struct server *srv;
    bool withdraw;
};

static void maybe_free(struct announcer *a)
{
    if (!a->freed || a->inflight)
        return;
    for (size_t i = 0; i < a->n; i++)
        free(a->servers[i].url);
    free(a->servers);
    free(a);
}

static void withdraw_finish(struct announcer *a)
{
    if (!a->withdrawing)
        return;
    a->withdrawing = false;
    ev_timer_stop(a->loop, &a->withdraw_timer);
    void (*done)(void *) = a->done;
    a->done = NULL;
    if (done)
        done(a->done_ud);
}

static void set_state(struct server *srv, const char *state, const char *reason)
{
    char now[64];
    snprintf(now, sizeof(now), "%s", state);
    if (!strcmp(now, srv->state))
        return;
    snprintf(srv->state, sizeof(srv->state), "%s", now);
    if (!strcmp(state, "listed") || !strcmp(state, "withdrawn") || !strcmp(state, "pending"))
        log_info("announce", "%s: %s", srv->url, state);
    else
        log_warn("announce", "%s: %s%s%s", srv->url, state, reason && *reason ? ": " : "",
                 reason ? reason : "");
}

static void on_answer(const struct http_response *resp, void *ud)
{
    struct call *c = ud;
    struct announcer *a = c->a;
    struct server *srv = c->srv;
    bool withdraw = c->withdraw;
    free(c);
    a->inflight--;
    if (a->freed || resp->kind == HTTP_ERR_CANCELLED) {
        maybe_free(a);
        return;
    }
    if (resp->kind != HTTP_OK) {
        set_state(srv, "unreachable", resp->error);
    } else {
        json_t *j = json_loads(resp->body, 0, NULL);
        const char *state = json_string_value(json_object_get(j, "state"));
        const char *reason = json_string_value(json_object_get(j, "reason"));
        json_t *period = json_object_get(j, "period_s");
        if (resp->status == 200 && state) {
            set_state(srv, state, reason);
            double p = json_is_number(period) ? json_number_value(period) : 0;
            if (p >= 1 && p <= 3600 && p != a->period_s) {
                /* The server's period rules; the next round comes at the new pace. */
                a->period_s = p;
                if (ev_is_active(&a->timer)) {
                    a->timer.repeat = p;
                    ev_timer_again(a->loop, &a->timer);
                }
            }
        } else {
            const char *code = json_string_value(json_object_get(j, "error"));
            char why[160];
            snprintf(why, sizeof(why), "HTTP %ld %s%s%s", resp->status, code ? code : "",
                     reason ? ": " : "", reason ? reason : "");
            set_state(srv, "refused", why);
        }
        json_decref(j);
    }
    if (withdraw && a->withdraw_pending && --a->withdraw_pending == 0)
        withdraw_finish(a);
}

static void send_one(struct announcer *a, struct server *srv, bool withdraw, const char *body)
{
    char url[1024];
    snprintf(url, sizeof(url), "%s/v1/announce", srv->url);
    struct http_request req = {
        .method = withdraw ? "DELETE" : "POST",
        .url = url,
        .body = body,
        .body_len = body ? strlen(body) : 0,
        .content_type = body ? "application/json" : NULL,
        .ca_file = a->cfg.ca_file,
        .cert_file = a->cfg.cert_file,
        .key_file = a->cfg.key_file,
        .timeout_ms = withdraw ? (long)(WITHDRAW_TIMEOUT_S * 1000) : 10000,
    };
    struct call *c = calloc(1, sizeof(*c));
    if (!c)
        return;
    *c = (struct call){a, srv, withdraw};
    int rc = http_request_start(a->http, &req, on_answer, c);
    if (rc != 0) {
        free(c);
        log_warn("announce", "%s: cannot send: %s", srv->url, strerror(-rc));
        return;
    }
    a->inflight++;
    if (withdraw)
        a->withdraw_pending++;
}

static void round_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct announcer *a = w->data;
    struct announce_load load = {0, 1, 0};
    bool wanted = a->cfg.wanted(a->cfg.ud, &load);
    if (!wanted) {
        if (a->listed_wanted) { /* we were listed: leave the list now, not in 3 periods */
            for (size_t i = 0; i < a->n; i++)
                send_one(a, &a->servers[i], true, NULL);
            a->listed_wanted = false;
        }
    } else {
        a->listed_wanted = true;
        json_t *b = json_pack("{s:s,s:s,s:I,s:I,s:I}", "node_id", a->cfg.node_id, "address",
                              a->cfg.address, "attached", (json_int_t)load.attached, "capacity",
                              (json_int_t)(load.capacity ? load.capacity : 1), "uptime_s",
                              (json_int_t)load.uptime_s);
        char *body = json_dumps(b, JSON_COMPACT);
        json_decref(b);
        for (size_t i = 0; i < a->n && body; i++)
            send_one(a, &a->servers[i], false, body);
        free(body);
    }
    w->repeat = a->period_s;
    ev_timer_again(loop, w);
}

struct announcer *announcer_start(struct ev_loop *loop, struct http_client *http,
                                  const struct announce_config *cfg)
{
    struct announcer *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->loop = loop;
    a->http = http;
    a->cfg = *cfg;
    snprintf(a->node_id, sizeof(a->node_id), "%s", cfg->node_id);
    snprintf(a->address, sizeof(a->address), "%s", cfg->address);
    a->cfg.node_id = a->node_id;
    a->cfg.address = a->address;
    a->cfg.urls = NULL;
    a->period_s = cfg->period_s > 0 ? cfg->period_s : 30.0;
    a->servers = calloc(cfg->n_urls ? cfg->n_urls : 1, sizeof(*a->servers));
    if (!a->servers) {
        free(a);
        return NULL;
    }
    for (size_t i = 0; i < cfg->n_urls; i++) {
        a->servers[i].url = strdup(cfg->urls[i]);
        if (a->servers[i].url)
            a->n++;
    }
    ev_timer_init(&a->timer, round_cb, 0., a->period_s);
    a->timer.data = a;
    ev_timer_start(loop, &a->timer);
    return a;
}

void announcer_poke(struct announcer *a)
{
    if (!a || a->withdrawing || a->freed)
        return;
    ev_timer_stop(a->loop, &a->timer);
    ev_timer_set(&a->timer, 0., a->period_s);
    ev_timer_start(a->loop, &a->timer);
}

static void withdraw_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct announcer *a = w->data;
    log_warn("announce", "withdrawal not confirmed by every bootstrap server in time");
    withdraw_finish(a);
}

void announcer_withdraw(struct announcer *a, void (*done)(void *ud), void *ud)
{
    if (!a) {
        if (done)
            done(ud);
        return;
    }
    ev_timer_stop(a->loop, &a->timer);
    a->done = done;
    a->done_ud = ud;
    a->withdrawing = true;
    for (size_t i = 0; i < a->n; i++)
        send_one(a, &a->servers[i], true, NULL);
    a->listed_wanted = false;
    if (a->withdraw_pending == 0) {
        withdraw_finish(a);
        return;
    }
    ev_timer_init(&a->withdraw_timer, withdraw_timeout, WITHDRAW_TIMEOUT_S + 0.5, 0.);
    a->withdraw_timer.data = a;
    ev_timer_start(a->loop, &a->withdraw_timer);
}

void announcer_free(struct announcer *a)
{
    if (!a)
        return;
    ev_timer_stop(a->loop, &a->timer);
    ev_timer_stop(a->loop, &a->withdraw_timer);
    a->withdrawing = false;
    a->freed = true;
    maybe_free(a);
}
