/*
 * Login server request handling (see server.h, docs/protocol.md section 2).
 *
 * Order of checks on enroll: shape of the request, user and device names,
 * failure limits, certificate request, and only then the password. Everything
 * before the password is cheap, so garbage never costs a PBKDF2 run; the
 * password check itself costs the same whether or not the user exists, and
 * both failures give the same answer. What depends on the account (its
 * issuing rate, its devices) is looked at only after the password, so that it
 * tells nothing about unknown users. No refused request writes anything (a
 * device is claimed, and an old password hash upgraded, only on the way to a
 * certificate).
 *
 * Failed logins are counted three ways (ratelimit.h), none of which locks an
 * account: per (user, address) and per address, which refuse that address
 * for the rest of the window (429), and per user over all addresses, which
 * only spaces the user's next attempts user_slowdown_s apart, so that many
 * addresses together cannot guess fast while the owner, from anywhere else,
 * still gets in. The spacing delays the answer (an ev_timer holds the
 * deferred request until the attempt's turn); only an attempt whose turn is
 * more than SLOWDOWN_MAX_WAIT_S away gets 429.
 *
 * Threads: everything here runs on the loop's thread except the PBKDF2 of a
 * password check, which runs on a few worker threads (pbkdf2_threads) so that
 * a stream of checks never stalls the loop (documents, refusals, other
 * enrollments). An enrollment reads the user's hash on the loop
 * (userstore_check_read), hands a job to the workers through a bounded,
 * mutex-protected queue, and gets it back through an ev_async; the workers
 * run userstore_check_verify on the job alone and touch nothing else. The
 * queue is fair between client addresses (ls_pool), so one client sending
 * many checks delays others by about one check each; a full queue, or an
 * address holding pbkdf2_per_address enrollments already, gets 503 with
 * Retry-After at once.
 */
#include "server.h"

#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "httpd.h"
#include "log.h"
#include "ratelimit.h"

#define RATE_KEYS 65536
#define USER_KEYS 16384 /* users being failed at (and their spacing): eviction only forgets */
/* A served CRL is made again when older than this, or when another process (the CLI
 * removing a device or an account) changed the store since. */
#define CRL_REFRESH_S 60.0
/* The longest an attempt is held for its user's slow-down; later turns get 429. Below
 * common client timeouts (ours: 30 s), since a waiting connection is not watched. */
#define SLOWDOWN_MAX_WAIT_S 10.0

/*
 * One enrollment from its password check to its answer. The loop owns it
 * throughout; while it is in the pool, a worker reads `password` and writes
 * `check`, `result` and `took` (and the loop reads them only once the job is
 * back on the done list: the pool's mutex orders the two).
 */
struct ls_job {
    struct ls_server *s;
    struct httpd_req *r; /* NULL once the request ended without its answer */
    struct ls_job *prev, *next;
    ev_timer delay;
    bool in_pool;
    uint64_t tag; /* its place in the fair queue (written by the loop, under the mutex) */
    uint8_t src[CONN_SRC_KEY_LEN];
    char user[USERSTORE_NAME_MAX + 1], device[USERSTORE_NAME_MAX + 1];
    char ua_key[160], addr_key[80];
    gnutls_x509_crq_t crq;
    /* For the worker: */
    struct ls_job *qnext;
    char *password;
    struct userstore_check check;
    int result;
    double took; /* seconds the check took */
};

/*
 * The PBKDF2 workers: two lists and a counter under one mutex, the only state
 * threads share. `todo` is kept in order of tags, fair queuing by source
 * address: a job's tag is one more than the later of the last tag taken by a
 * worker (`vtime`) and its address's last tag still queued, so that each
 * address waiting gets one check in turn, however many it sent.
 */
struct ls_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct ls_job *todo, *done;
    uint64_t vtime;
    bool stop;
    pthread_t *threads;
    unsigned n_threads;
    struct ev_loop *loop;
    ev_async wake; /* workers: a job is done */
};

struct ls_server {
    struct ev_loop *loop;
    struct ls_ca *ca;
    struct userstore *users;
    struct ls_server_config cfg;
    struct httpd *http;
    struct ratelimit *limits;   /* "ua:<user>|<addr>" (max_failures), refusing */
    struct ratelimit *addrs;    /* "addr:<addr>" (max_failures_per_addr), refusing */
    struct ratelimit *users_rl; /* "<user>": over max_failures means under attack */
    struct ratelimit *spacing;  /* "<user>": one attempt per user_slowdown_s when under attack */
    char *crl_pem;              /* the CRL served, made at crl_made (ev_now) */
    double crl_made;
    int64_t crl_version; /* userstore_data_version() then */
    struct ls_pool pool;
    bool pool_started;
    struct ls_job *jobs; /* every enrollment between its handler and its answer */
    unsigned in_pool;    /* jobs queued or being checked */
    double check_s;      /* recent time of one check, for Retry-After */
};

static const char UNAUTHORIZED[] = "unknown user or wrong password";

/* Parses the body as a JSON object; answers 400 and returns NULL when it is not one. */
static json_t *body_object(struct httpd_req *r)
{
    json_error_t je;
    json_t *o = json_loadb(httpd_req_body(r), httpd_req_body_len(r), JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        char why[200];
        snprintf(why, sizeof(why), "body is not a JSON object: %s",
                 o ? "other JSON type" : je.text);
        json_decref(o);
        httpd_respond_error(r, 400, "bad-json", why);
        return NULL;
    }
    return o;
}

/* A required string member, or NULL after answering 400. */
static const char *member(struct httpd_req *r, json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) {
        char why[120];
        snprintf(why, sizeof(why), "member \"%s\" %s", key, v ? "must be a string" : "is missing");
        httpd_respond_error(r, 400, "bad-json", why);
        return NULL;
    }
    return json_string_value(v);
}

static void respond_429(struct httpd_req *r, double wait, const char *reason)
{
    char secs[32];
    snprintf(secs, sizeof(secs), "%.0f", wait < 1 ? 1 : wait + 0.5);
    httpd_add_header(r, "Retry-After", secs);
    httpd_respond_error(r, 429, "rate-limited", reason);
}

/* Answers 429 when this address has failed too often, for this user or in all. */
static bool addr_limited(struct ls_server *s, struct httpd_req *r, const char *user,
                         const char *ua_key, const char *addr_key)
{
    double now = ev_now(s->loop), wait_ua = 0, wait_addr = 0;
    bool bu = ratelimit_blocked(s->limits, ua_key, now, &wait_ua);
    bool ba = ratelimit_blocked(s->addrs, addr_key, now, &wait_addr);
    if (!bu && !ba)
        return false;
    log_info("login", "%s: refused for %s: too many failed attempts from this address",
             httpd_req_client_addr(r), user);
    respond_429(r, wait_ua > wait_addr ? wait_ua : wait_addr,
                "too many failed attempts from this address; try again later");
    return true;
}

/*
 * When the user is under attack (max_failures failures from all addresses in
 * the window), books this attempt's turn, user_slowdown_s after the previous
 * one: *delay is the wait. False after answering 429 when that turn is more
 * than SLOWDOWN_MAX_WAIT_S away.
 */
static bool slowdown_turn(struct ls_server *s, struct httpd_req *r, const char *user, double *delay)
{
    double now = ev_now(s->loop);
    *delay = 0;
    if (!ratelimit_blocked(s->users_rl, user, now, NULL))
        return true;
    if (ratelimit_reserve(s->spacing, user, now, SLOWDOWN_MAX_WAIT_S, delay))
        return true;
    log_info("login", "%s: refused for %s: its attempts are slowed down and %.0f s are booked",
             httpd_req_client_addr(r), user, *delay);
    respond_429(r, *delay,
                "too many failed attempts for this user: attempts are slowed down; "
                "try again in a moment");
    return false;
}

static void respond_issued(struct httpd_req *r, struct ls_server *s, const struct ls_issued *is,
                           const char *device)
{
    char hex[NID_HEX_LEN + 1], when[32];
    struct tm tm;
    gmtime_r(&is->not_after, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *roles = json_array();
    json_array_append_new(roles, json_string("node"));
    if (is->roles & ROLE_SUPERNODE)
        json_array_append_new(roles, json_string("supernode"));
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:o, s:s}", "certificate", is->cert_pem,
                          "ca_certificate", s->ca->ca_pem, "uri", is->uri, "node_id",
                          nid_to_hex(&is->node_id, hex), "roles", roles, "not_after", when);
    if (!o || json_object_set_new(o, "device", json_string(device)) < 0) {
        json_decref(o);
        httpd_respond_error(r, 500, "internal", "cannot encode the answer");
        return;
    }
    httpd_respond_json(r, 200, o);
    json_decref(o);
}

/*
 * False after answering 429 when the account was issued max_certs_per_user
 * certificates within cert_window_s: a stolen password or a looping client
 * gets no stream of certificates, and renewals cannot be spun.
 */
static bool issuing_allowed(struct ls_server *s, struct httpd_req *r, const char *user)
{
    int64_t now = (int64_t)time(NULL), oldest = 0;
    uint64_t n = 0;
    if (userstore_certs_since(s->users, user, now - (int64_t)s->cfg.cert_window_s, &n, &oldest) !=
        US_OK) {
        log_error("login", "user store: %s", userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        return false;
    }
    if (n < s->cfg.max_certs_per_user)
        return true;
    char why[200];
    snprintf(why, sizeof(why),
             "too many certificates for this account (%llu in the last %.0f s); try again later",
             (unsigned long long)n, s->cfg.cert_window_s);
    log_warn("login", "%s: refused a certificate for %s: %s", httpd_req_client_addr(r), user, why);
    respond_429(r, (double)(oldest + (int64_t)s->cfg.cert_window_s - now), why);
    return false;
}

/* Issues for `user` from a checked request and records it; answers either way. */
static void issue_and_answer(struct ls_server *s, struct httpd_req *r, const char *user,
                             const char *device, gnutls_x509_crq_t crq, bool may_supernode,
                             const nid_t *keep_id, const char *kind)
{
    struct ls_issued is;
    char err[256];
    unsigned roles = ROLE_NODE | (may_supernode ? ROLE_SUPERNODE : 0);
    if (ls_ca_issue_node(s->ca, crq, user, roles, keep_id, s->cfg.validity_days, &is, err,
                         sizeof(err)) != 0) {
        log_error("login", "cannot issue for %s: %s", user, err);
        httpd_respond_error(r, 500, "internal", "cannot issue a certificate");
        return;
    }
    char hex[NID_HEX_LEN + 1];
    int us = userstore_record_cert(s->users, is.serial, user, nid_to_hex(&is.node_id, hex), kind,
                                   (long long)time(NULL), (long long)is.not_after);
    if (us != US_OK) {
        /* An unrecorded certificate must not go out: the store is the audit trail. */
        log_error("login", "cannot record certificate %s for %s: %s", is.serial, user,
                  userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "cannot record the certificate");
        free(is.cert_pem);
        return;
    }
    log_info("login", "%s: %s certificate for %s, device %s, node %s, serial %s",
             httpd_req_client_addr(r), kind, is.uri, device, hex, is.serial);
    respond_issued(r, s, &is, device);
    free(is.cert_pem);
}

/* The device a request enrolls: its "device" member, else its public key ("key-<hex>"). */
static int device_of(struct httpd_req *r, json_t *o, gnutls_x509_crq_t crq, char *out, size_t len)
{
    json_t *v = json_object_get(o, "device");
    if (v) {
        if (!json_is_string(v) || !userstore_name_valid(json_string_value(v))) {
            httpd_respond_error(r, 400, "bad-device",
                                "device names are 1-64 characters of a-z 0-9 . _ -, starting with "
                                "a letter or digit");
            return -1;
        }
        snprintf(out, len, "%s", json_string_value(v));
        return 0;
    }
    unsigned char kid[32];
    size_t klen = sizeof(kid);
    if (gnutls_x509_crq_get_key_id(crq, GNUTLS_KEYID_USE_SHA256, kid, &klen) < 0 || klen < 16) {
        httpd_respond_error(r, 500, "internal", "cannot identify the request's key");
        return -1;
    }
    int n = snprintf(out, len, "key-");
    for (size_t i = 0; i < 16 && (size_t)n + 2 < len; i++, n += 2)
        snprintf(out + n, len - (size_t)n, "%02x", kid[i]);
    return 0;
}

/* ---- PBKDF2 workers ---------------------------------------------------------------------- */

static void *pool_worker(void *p)
{
    struct ls_pool *pool = p;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (!pool->stop && !pool->todo)
            pthread_cond_wait(&pool->cv, &pool->mu);
        if (pool->stop)
            break;
        struct ls_job *j = pool->todo;
        pool->todo = j->qnext;
        pool->vtime = j->tag;
        pthread_mutex_unlock(&pool->mu);

        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        j->result = userstore_check_verify(&j->check, j->password);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        j->took = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;

        pthread_mutex_lock(&pool->mu);
        j->qnext = pool->done;
        pool->done = j;
        ev_async_send(pool->loop, &pool->wake); /* thread-safe by libev's contract */
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

static void job_free(struct ls_job *j)
{
    struct ls_server *s = j->s;
    if (j->prev)
        j->prev->next = j->next;
    else
        s->jobs = j->next;
    if (j->next)
        j->next->prev = j->prev;
    ev_timer_stop(s->loop, &j->delay);
    gnutls_x509_crq_deinit(j->crq);
    if (j->password) {
        gnutls_memset(j->password, 0, strlen(j->password));
        free(j->password);
    }
    userstore_check_clear(&j->check);
    free(j);
}

/* The request ended unanswered (client gone, server stopping): the job goes, or is
 * orphaned until its worker is done with it. */
static void job_cancel(struct httpd_req *r, void *ud)
{
    struct ls_job *j = ud;
    j->r = NULL;
    if (j->in_pool) {
        /* Still waiting for a worker: no check for nobody. */
        bool taken_back = false;
        pthread_mutex_lock(&j->s->pool.mu);
        for (struct ls_job **p = &j->s->pool.todo; *p; p = &(*p)->qnext)
            if (*p == j) {
                *p = j->qnext;
                taken_back = true;
                break;
            }
        pthread_mutex_unlock(&j->s->pool.mu);
        if (!taken_back)
            return; /* a worker has it: freed when it comes back */
        j->in_pool = false;
        j->s->in_pool--;
    }
    job_free(j);
}

/* Everything after the password check, on the loop; answers and frees the job. */
static void enroll_finish(struct ls_job *j, int us)
{
    struct ls_server *s = j->s;
    struct httpd_req *r = j->r;
    const char *user = j->user, *device = j->device;
    if (us == US_BAD_CREDENTIALS) {
        double now = ev_now(s->loop);
        ratelimit_failure(s->limits, j->ua_key, now);
        ratelimit_failure(s->addrs, j->addr_key, now);
        ratelimit_failure(s->users_rl, user, now);
        log_info("login", "%s: wrong password or unknown user %s", httpd_req_client_addr(r), user);
        httpd_respond_error(r, 401, "unauthorized", UNAUTHORIZED);
        goto out;
    }
    if (us == US_INTERNAL) {
        log_error("login", "user store: the stored password hash of user %s is malformed", user);
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
    if (us != US_OK) {
        log_error("login", "user store: %s: %s", userstore_strerror(us),
                  userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
    if (!issuing_allowed(s, r, user))
        goto out;
    /* The Node-ID is the CA's draw, made once per device: enrolling again from the same
     * device gives the same one, and a new draw costs one of the account's few devices. */
    nid_t fresh, kept;
    char hex[NID_HEX_LEN + 1];
    struct device_info dev;
    bool added = false;
    if (nid_random(&fresh) != 0) {
        httpd_respond_error(r, 500, "internal", "no randomness for a Node-ID");
        goto out;
    }
    us = userstore_device_claim(s->users, user, device, nid_to_hex(&fresh, hex), s->cfg.max_devices,
                                &dev, &added);
    if (us == US_LIMIT) {
        char reason[300];
        snprintf(reason, sizeof(reason),
                 "account %s already has %u devices, the maximum: enroll again from one of them "
                 "(same \"device\"), or ask the operator to remove one",
                 user, s->cfg.max_devices);
        log_warn("login", "%s: refused device %s of %s: %s", httpd_req_client_addr(r), device, user,
                 userstore_errmsg(s->users));
        httpd_respond_error(r, 403, "too-many-devices", reason);
        goto out;
    }
    if (us != US_OK || nid_from_hex(&kept, dev.node_id) != 0) {
        log_error("login", "user store: %s", userstore_errmsg(s->users));
        httpd_respond_error(r, 500, "internal", "user store unavailable");
        goto out;
    }
    if (added)
        log_info("login", "%s: new device %s of %s, node %s", httpd_req_client_addr(r), device,
                 user, dev.node_id);
    /* A hash made with fewer iterations than configured now is cheaper to attack and
     * faster to check (which timing shows): the worker made a new one while it had the
     * password. */
    if (j->check.new_hash[0]) {
        us = userstore_set_hash(s->users, user, j->check.new_hash);
        if (us == US_OK)
            log_info("login", "password hash of %s upgraded to %u iterations", user,
                     j->check.rehash_iterations);
        else
            log_warn("login", "cannot upgrade the password hash of %s: %s", user,
                     userstore_errmsg(s->users));
    }
    issue_and_answer(s, r, user, device, j->crq, j->check.info.may_supernode, &kept, "enroll");
out:
    job_free(j);
}

static void respond_busy(struct ls_server *s, struct httpd_req *r, const char *why)
{
    double wait = s->check_s * (1.0 + (double)s->in_pool / (double)s->pool.n_threads);
    log_warn("login", "%s: enrollment refused: %s", httpd_req_client_addr(r), why);
    char secs[32];
    snprintf(secs, sizeof(secs), "%.0f", wait < 1 ? 1 : wait + 0.5);
    httpd_add_header(r, "Retry-After", secs);
    httpd_respond_error(r, 503, "busy", why);
}

/* The job's turn: read the hash and hand the check to the workers (or answer at once). */
static void enroll_check(struct ls_job *j)
{
    struct ls_server *s = j->s;
    int us = userstore_check_read(s->users, j->user, j->password, &j->check);
    if (us != US_OK) { /* a password of no allowed form, a database failure: no hashing */
        enroll_finish(j, us);
        return;
    }
    if (s->in_pool >= s->pool.n_threads + s->cfg.pbkdf2_queue) {
        char why[160];
        snprintf(why, sizeof(why), "%u password checks are waiting: try again later", s->in_pool);
        respond_busy(s, j->r, why);
        job_free(j);
        return;
    }
    if (j->check.known && j->check.info.pw_iterations < s->cfg.pbkdf2_iterations)
        j->check.rehash_iterations = s->cfg.pbkdf2_iterations;
    pthread_mutex_lock(&s->pool.mu);
    uint64_t tag = s->pool.vtime;
    for (struct ls_job *x = s->jobs; x; x = x->next)
        if (x->in_pool && x->tag > tag && memcmp(x->src, j->src, sizeof(j->src)) == 0)
            tag = x->tag;
    j->tag = tag + 1;
    struct ls_job **at = &s->pool.todo;
    while (*at && (*at)->tag <= j->tag)
        at = &(*at)->qnext;
    j->qnext = *at;
    *at = j;
    j->in_pool = true;
    s->in_pool++;
    pthread_cond_signal(&s->pool.cv);
    pthread_mutex_unlock(&s->pool.mu);
}

static void on_checked(struct ev_loop *loop, ev_async *w, int revents)
{
    struct ls_server *s = w->data;
    pthread_mutex_lock(&s->pool.mu);
    struct ls_job *done = s->pool.done;
    s->pool.done = NULL;
    pthread_mutex_unlock(&s->pool.mu);
    while (done) {
        struct ls_job *j = done;
        done = j->qnext;
        j->in_pool = false;
        s->in_pool--;
        s->check_s = s->check_s > 0 ? 0.8 * s->check_s + 0.2 * j->took : j->took;
        if (!j->r)
            job_free(j); /* its client went away meanwhile */
        else
            enroll_finish(j, j->result);
    }
}

static void on_turn(struct ev_loop *loop, ev_timer *w, int revents)
{
    enroll_check(w->data);
}

static int pool_start(struct ls_server *s, char *err, size_t errlen)
{
    struct ls_pool *p = &s->pool;
    p->loop = s->loop;
    ev_async_init(&p->wake, on_checked);
    p->wake.data = s;
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        snprintf(err, errlen, "cannot create a mutex");
        return -1;
    }
    if (pthread_cond_init(&p->cv, NULL) != 0) {
        pthread_mutex_destroy(&p->mu);
        snprintf(err, errlen, "cannot create a condition variable");
        return -1;
    }
    s->pool_started = true;
    ev_async_start(s->loop, &p->wake);
    p->threads = calloc(s->cfg.pbkdf2_threads, sizeof(*p->threads));
    if (!p->threads) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    /* Workers take no signals (they inherit this mask): the loop's thread handles them. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = 0;
    for (; p->n_threads < s->cfg.pbkdf2_threads; p->n_threads++)
        if ((e = pthread_create(&p->threads[p->n_threads], NULL, pool_worker, p)) != 0)
            break;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) {
        snprintf(err, errlen, "cannot start a PBKDF2 worker thread: %s", strerror(e));
        return -1;
    }
    return 0;
}

/* Ends the workers (each finishes its check first) and frees what they still held. */
static void pool_stop(struct ls_server *s)
{
    struct ls_pool *p = &s->pool;
    if (!s->pool_started)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    ev_async_stop(s->loop, &p->wake);
    /* Every request was cancelled by httpd_stop: what is left are orphans. */
    while (s->jobs)
        job_free(s->jobs);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    s->pool_started = false;
}

/* ---- Enrollment ------------------------------------------------------------------------- */

/* The source a request counts against (an IPv4 address or an IPv6 /64, as conn.h). */
static void src_of(struct httpd_req *r, uint8_t key[CONN_SRC_KEY_LEN])
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    const char *a = httpd_req_client_addr(r);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, a, &s4->sin_addr) == 1)
        s4->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, a, &s6->sin6_addr) == 1)
        s6->sin6_family = AF_INET6;
    conn_src_key((const struct sockaddr *)&ss, key);
}

static void handle_enroll(struct ls_server *s, struct httpd_req *r)
{
    gnutls_x509_crq_t crq = NULL;
    json_t *o = body_object(r);
    if (!o)
        return;
    const char *user, *password, *csr;
    if (!(user = member(r, o, "user")) || !(password = member(r, o, "password")) ||
        !(csr = member(r, o, "csr")))
        goto out;
    if (!userstore_name_valid(user)) {
        httpd_respond_error(r, 400, "bad-user",
                            "user names are 1-64 characters of a-z 0-9 . _ -, starting with a "
                            "letter or digit");
        goto out;
    }
    char ua_key[160], addr_key[80];
    snprintf(ua_key, sizeof(ua_key), "ua:%s|%s", user, httpd_req_client_addr(r));
    snprintf(addr_key, sizeof(addr_key), "addr:%s", httpd_req_client_addr(r));
    if (addr_limited(s, r, user, ua_key, addr_key))
        goto out;

    /* The request must be sound before the (costly) password check. */
    char why[256], device[USERSTORE_NAME_MAX + 1];
    if (ls_ca_check_csr(csr, strlen(csr), &crq, why, sizeof(why)) != 0) {
        httpd_respond_error(r, 400, "bad-csr", why);
        goto out;
    }
    if (device_of(r, o, crq, device, sizeof(device)) != 0)
        goto out;
    /* One address holds a share of the queue at most, never all of it. */
    uint8_t src[CONN_SRC_KEY_LEN];
    unsigned held = 0;
    src_of(r, src);
    for (struct ls_job *x = s->jobs; x; x = x->next)
        held += memcmp(x->src, src, sizeof(src)) == 0;
    if (held >= s->cfg.pbkdf2_per_address) {
        snprintf(why, sizeof(why),
                 "%u enrollments from this address are being processed: try again later", held);
        respond_busy(s, r, why);
        goto out;
    }
    double delay;
    if (!slowdown_turn(s, r, user, &delay))
        goto out;

    struct ls_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->password = strdup(password))) {
        free(j);
        httpd_respond_error(r, 500, "internal", "out of memory");
        goto out;
    }
    j->s = s;
    j->r = r;
    memcpy(j->src, src, sizeof(src));
    snprintf(j->user, sizeof(j->user), "%s", user);
    snprintf(j->device, sizeof(j->device), "%s", device);
    snprintf(j->ua_key, sizeof(j->ua_key), "%s", ua_key);
    snprintf(j->addr_key, sizeof(j->addr_key), "%s", addr_key);
    j->crq = crq;
    crq = NULL;
    ev_timer_init(&j->delay, on_turn, delay, 0.);
    j->delay.data = j;
    j->next = s->jobs;
    if (j->next)
        j->next->prev = j;
    s->jobs = j;
    httpd_req_defer(r, job_cancel, j);
    if (delay > 0) {
        log_info("login", "%s: attempt for %s held %.1f s: its attempts are slowed down",
                 httpd_req_client_addr(r), user, delay);
        ev_timer_start(s->loop, &j->delay);
    } else {
        enroll_check(j);
    }
out:
    gnutls_x509_crq_deinit(crq);
    json_decref(o);
}

/* "sip:<user>@<overlay>" -> user, when the overlay is ours. */
static bool user_from_uri(const char *uri, const char *overlay, char *user, size_t len)
{
    size_t ol = strlen(overlay), ul = strlen(uri);
    if (strncmp(uri, "sip:", 4) != 0 || ul < 4 + 2 + ol || strcmp(uri + ul - ol, overlay) != 0 ||
        uri[ul - ol - 1] != '@')
        return false;
    size_t n = ul - ol - 1 - 4;
    if (n == 0 || n >= len)
        return false;
    memcpy(user, uri + 4, n);
    user[n] = '\0';
    return userstore_name_valid(user);
}

static void handle_renew(struct ls_server *s, struct httpd_req *r)
{
    struct peer_identity id;
    char err[256], user[80];
    if (httpd_req_client_identity(r, &id, err, sizeof(err)) != 0) {
        httpd_respond_error(r, 401, "no-client-certificate", err);
        return;
    }
    if (!id.has_node_id || !user_from_uri(id.uri, s->ca->overlay, user, sizeof(user))) {
        httpd_respond_error(r, 401, "no-client-certificate",
                            "client certificate is not a node certificate of this overlay");
        return;
    }
    json_t *o = body_object(r);
    if (!o)
        return;
    const char *csr = member(r, o, "csr");
    gnutls_x509_crq_t crq = NULL;
    struct user_info info;
    struct device_info dev;
    char hex[NID_HEX_LEN + 1];
    int us = US_OK;
    if (!csr)
        ;
    else if (ls_ca_check_csr(csr, strlen(csr), &crq, err, sizeof(err)) != 0)
        httpd_respond_error(r, 400, "bad-csr", err);
    else if ((us = userstore_get(s->users, user, &info)) == US_NOT_FOUND)
        httpd_respond_error(r, 403, "account-gone", "the account of this certificate was deleted");
    else if (us != US_OK || ((us = userstore_device_by_node(
                                  s->users, user, nid_to_hex(&id.node_id, hex), &dev)) != US_OK &&
                             us != US_NOT_FOUND))
        httpd_respond_error(r, 500, "internal", "user store unavailable");
    else if (us == US_NOT_FOUND)
        httpd_respond_error(r, 403, "device-gone",
                            "the device of this certificate was removed from its account");
    else if (issuing_allowed(s, r, user)) {
        if (userstore_device_touch(s->users, user, dev.device) != US_OK)
            log_warn("login", "cannot note the renewal of device %s of %s: %s", dev.device, user,
                     userstore_errmsg(s->users));
        issue_and_answer(s, r, user, dev.device, crq, info.may_supernode, &id.node_id, "renew");
    }
    gnutls_x509_crq_deinit(crq);
    json_decref(o);
}

struct serials {
    char **v;
    size_t n, cap;
    bool oom;
};

static void add_serial(const char *serial, void *ud)
{
    struct serials *l = ud;
    if (l->oom)
        return;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        char **v = realloc(l->v, cap * sizeof(*v));
        if (!v) {
            l->oom = true;
            return;
        }
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(serial)))
        l->oom = true;
    else
        l->n++;
}

/*
 * GET /v1/crl: the CA's list of revoked node certificates. Only the
 * administration CLI revokes (another process), so the list is made again
 * when the store's data version moved, or once a minute for freshness.
 */
static void handle_crl(struct ls_server *s, struct httpd_req *r)
{
    double now = ev_now(s->loop);
    int64_t version = 0;
    if (userstore_data_version(s->users, &version) != US_OK)
        version = s->crl_version + 1; /* cannot tell: make it again */
    if (!s->crl_pem || now - s->crl_made >= CRL_REFRESH_S || version != s->crl_version) {
        struct serials l = {NULL, 0, 0, false};
        char err[256], *pem = NULL;
        int us = userstore_revoked(s->users, (int64_t)time(NULL), add_serial, &l);
        if (us != US_OK || l.oom)
            log_error("login", "cannot list revoked certificates: %s",
                      l.oom ? "out of memory" : userstore_errmsg(s->users));
        else if (ls_ca_crl(s->ca, (const char *const *)l.v, l.n, time(NULL),
                           s->cfg.crl_next_update_s, &pem, err, sizeof(err)) != 0)
            log_error("login", "%s", err);
        else {
            free(s->crl_pem);
            s->crl_pem = pem;
            s->crl_made = now;
            s->crl_version = version;
            log_debug("login", "revocation list made: %zu certificates", l.n);
        }
        for (size_t i = 0; i < l.n; i++)
            free(l.v[i]);
        free(l.v);
    }
    if (!s->crl_pem) {
        httpd_respond_error(r, 500, "internal", "no revocation list");
        return;
    }
    httpd_respond(r, 200, "application/x-pem-file", s->crl_pem, strlen(s->crl_pem));
}

static void handle(struct httpd_req *r, void *ud)
{
    struct ls_server *s = ud;
    const char *path = httpd_req_path(r), *method = httpd_req_method(r);
    const char *allow = NULL;
    if (strcmp(path, "/v1/overlay") == 0) {
        if (strcmp(method, "GET") == 0) {
            httpd_respond(r, 200, "application/json", s->ca->envelope, strlen(s->ca->envelope));
            return;
        }
        allow = "GET";
    } else if (strcmp(path, "/v1/crl") == 0) {
        if (strcmp(method, "GET") == 0) {
            handle_crl(s, r);
            return;
        }
        allow = "GET";
    } else if (strcmp(path, "/v1/enroll") == 0 || strcmp(path, "/v1/renew") == 0) {
        if (strcmp(method, "POST") == 0) {
            if (path[4] == 'e')
                handle_enroll(s, r);
            else
                handle_renew(s, r);
            return;
        }
        allow = "POST";
    }
    httpd_respond_unrouted(r, allow);
}

struct ls_server *ls_server_start(struct ev_loop *loop, struct ls_ca *ca, struct userstore *users,
                                  const struct ls_server_config *cfg, char *err, size_t errlen)
{
    struct ls_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->loop = loop;
    s->ca = ca;
    s->users = users;
    s->cfg = *cfg;
    s->limits = ratelimit_new(cfg->max_failures, cfg->failure_window_s, RATE_KEYS);
    s->addrs = ratelimit_new(cfg->max_failures_per_addr, cfg->failure_window_s, RATE_KEYS);
    s->users_rl = ratelimit_new(cfg->max_failures, cfg->failure_window_s, USER_KEYS);
    s->spacing = ratelimit_new(1, cfg->user_slowdown_s > 0 ? cfg->user_slowdown_s : 1, USER_KEYS);
    if (s->cfg.pbkdf2_threads == 0)
        s->cfg.pbkdf2_threads = 2;
    if (s->cfg.pbkdf2_queue == 0)
        s->cfg.pbkdf2_queue = 64;
    if (s->cfg.pbkdf2_per_address == 0)
        s->cfg.pbkdf2_per_address = 16;
    if (pool_start(s, err, errlen) != 0) {
        ls_server_stop(s);
        return NULL;
    }
    struct httpd_config hc = {
        .listen = cfg->listen,
        .cert_pem = ca->server_cert_pem,
        .key_pem = ca->server_key_pem,
        .client_ca_pem = ca->ca_pem, /* renewals authenticate with their certificate */
        .max_body = cfg->max_body,
        .max_connections = cfg->max_connections,
    };
    if (!s->limits || !s->addrs || !s->users_rl || !s->spacing ||
        !(s->http = httpd_start(loop, &hc, handle, s, err, errlen))) {
        ls_server_stop(s);
        return NULL;
    }
    return s;
}

int ls_server_port(const struct ls_server *s)
{
    return httpd_port(s->http);
}

void ls_server_stop(struct ls_server *s)
{
    if (!s)
        return;
    httpd_stop(s->http); /* cancels the deferred enrollments */
    pool_stop(s);
    ratelimit_free(s->limits);
    ratelimit_free(s->addrs);
    ratelimit_free(s->users_rl);
    ratelimit_free(s->spacing);
    free(s->crl_pem);
    free(s);
}
