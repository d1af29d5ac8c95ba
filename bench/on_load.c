/*
 * on_load: many ordinary nodes (ONs) simulated from one process, one libev
 * loop and one thread, against real super nodes (docs/protocol.md sections 1,
 * 4.5 and 5). Each simulated ON opens its own TLS 1.3 link (common/conn.h)
 * with a node certificate, sends `attach`, keeps the attachment alive with
 * `keepalive` at the period the super node answered, stores one signed record
 * of its own and then sends a configurable mix of `get`, `store` (mode
 * update) and `find` requests at a fixed rate for a fixed time. It reports
 * what happened to the connections and the requests, latencies per request
 * type, and its own resident memory once every node is attached. Tests and
 * benchmarks use it; --hold keeps the links open afterwards so that the super
 * nodes' memory per attached ON can be measured from outside.
 *
 * A super node keeps one attachment per Node-ID (5.1: attaching again over a
 * new link replaces the old one), so every simulated ON needs an identity of
 * its own: identities come from enrolled state directories (--state,
 * --creds-dir) and are dealt out round-robin.
 *
 * Memory stays bounded: per ON a small struct, its connection (conn.c: about
 * 12 KiB, mostly the GnuTLS session) and at most --window requests in
 * flight; latencies go into fixed-size histograms, not lists.
 *
 * Phases: load identities; connect (at most --connect-rate new connections
 * per second, redirects followed on request) until every ON is attached with
 * its record stored, or refused, or failed; the timed request phase; drain
 * (answers still due); report; optionally hold; close everything.
 *
 * Exit status: 0 all nodes attached (and stayed so) and no request failed
 * except with allowed codes; 1 otherwise; 2 usage error.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "conn.h"
#include "cred.h"
#include "log.h"
#include "login_client.h"
#include "msg.h"
#include "nodeid.h"
#include "record.h"

#define PROG             "on_load"
#define RECORD_TYPE      "load"
#define DEF_CONNECT_RATE 500.0
#define DEF_DURATION_S   10.0
#define DEF_RATE         0.2
#define DEF_WINDOW       8
#define DEF_TIMEOUT_MS   10000
#define DEF_LIFETIME_S   3600
#define DEF_KEEPALIVE_S  15.0
#define MIN_KEEPALIVE_S  0.1
#define MAX_REDIRECTS    8
#define MAX_NODES        1000000
#define ADDR_MAX         64
#define CONNECT_TICK_S   0.01
#define SWEEP_S          0.1
#define PROGRESS_S       5.0
#define WQUEUE_BYTES     (256 * 1024)
#define SPARE_FDS        64
#define HIST_SUB_BITS    6
#define HIST_SUB         (1u << HIST_SUB_BITS)
#define HIST_MAX_EXP     36 /* 2^37 us, about 38 hours: everything above lands in the top bucket */
#define HIST_BUCKETS     ((HIST_MAX_EXP - HIST_SUB_BITS + 2) * HIST_SUB)
#define CODE_MAX         48
#define CERT_CACHE       1024 /* parsed certificates kept for signing (about 20 kB each) */

/* ---- Small helpers ------------------------------------------------------------------------ */

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void usage_error(const char *fmt, ...)
{
    va_list ap;
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static void errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void errorf(const char *fmt, ...)
{
    va_list ap;
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double round3(double x)
{
    double s = x * 1000.0;
    long long r = (long long)(s < 0 ? s - 0.5 : s + 0.5);
    return (double)r / 1000.0;
}

static const char *jstr(const json_t *o, const char *member, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, member));
    return s ? s : dflt;
}

/* Adds one to {"code": n}. */
static void count_code(json_t *obj, const char *code)
{
    json_t *v = json_object_get(obj, code);
    json_object_set_new(obj, code, json_integer(v ? json_integer_value(v) + 1 : 1));
}

/* Keeps the first detail seen for a code: {"code": "detail"}. */
static void keep_example(json_t *obj, const char *code, const char *detail)
{
    if (!json_object_get(obj, code))
        json_object_set_new(obj, code, json_string(detail && *detail ? detail : code));
}

static json_int_t json_sum(const json_t *obj)
{
    json_int_t n = 0;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v) n += json_integer_value(v);
    return n;
}

/* "code 2, other 1" (or "none") into buf. */
static const char *codes_words(const json_t *obj, char *buf, size_t len)
{
    size_t used = 0;
    const char *k;
    json_t *v;
    buf[0] = '\0';
    json_object_foreach((json_t *)obj, k, v)
    {
        int w = snprintf(buf + used, len - used, "%s%s %lld", used ? ", " : "", k,
                         (long long)json_integer_value(v));
        if (w < 0 || (size_t)w >= len - used)
            break;
        used += (size_t)w;
    }
    if (!used)
        snprintf(buf, len, "none");
    return buf;
}

/* kB from a "Name:   1234 kB" line of /proc/self/status; -1 when unknown. */
static long proc_status_kb(const char *name)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long kb = -1;
    size_t nl = strlen(name);
    while (fgets(line, sizeof(line), f)) {
        if (!strncmp(line, name, nl) && line[nl] == ':') {
            kb = strtol(line + nl + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb;
}

/* xorshift64*: request mix choices and timer phases (not security relevant). */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) / 9007199254740992.0; /* [0, 1) */
}

/* ---- Latency histograms: fixed memory, about 1.6 % resolution --------------------------- */

struct hist {
    uint64_t n;
    uint64_t max_us;
    uint32_t b[HIST_BUCKETS];
};

static unsigned hist_bucket(uint64_t us)
{
    if (us < HIST_SUB)
        return (unsigned)us;
    unsigned e = 63u - (unsigned)__builtin_clzll(us); /* floor(log2(us)) >= HIST_SUB_BITS */
    if (e > HIST_MAX_EXP) {
        e = HIST_MAX_EXP;
        us = (UINT64_C(1) << (HIST_MAX_EXP + 1)) - 1;
    }
    unsigned sub = (unsigned)((us >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1));
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

/* The middle of bucket b, in microseconds. */
static double hist_value(unsigned b)
{
    if (b < HIST_SUB)
        return (double)b;
    unsigned e = b / HIST_SUB + HIST_SUB_BITS - 1, sub = b % HIST_SUB;
    double width = (double)(UINT64_C(1) << (e - HIST_SUB_BITS));
    return (double)(HIST_SUB + sub) * width + (width - 1) / 2.0;
}

static void hist_add(struct hist *h, double seconds)
{
    uint64_t us = seconds <= 0 ? 0 : (uint64_t)(seconds * 1e6 + 0.5);
    h->b[hist_bucket(us)]++;
    h->n++;
    if (us > h->max_us)
        h->max_us = us;
}

/* Nearest-rank percentile (p in 0..100) in milliseconds; 0 when empty. */
static double hist_pct_ms(const struct hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)h->n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > h->n)
        rank = h->n;
    uint64_t cum = 0;
    for (unsigned b = 0; b < HIST_BUCKETS; b++) {
        cum += h->b[b];
        if (cum >= rank) {
            double v = hist_value(b);
            if (v > (double)h->max_us)
                v = (double)h->max_us;
            return v / 1000.0;
        }
    }
    return (double)h->max_us / 1000.0;
}

static json_t *hist_json(const struct hist *h)
{
    return json_pack("{s:f, s:f, s:f}", "median", round3(hist_pct_ms(h, 50)), "p99",
                     round3(hist_pct_ms(h, 99)), "max", round3((double)h->max_us / 1000.0));
}

/* ---- Command line ------------------------------------------------------------------------- */

enum op { OP_GET = 0, OP_UPDATE, OP_FIND, OP_SEED, OP_ATTACH, OP_KEEPALIVE, OP_N };
#define MIX_OPS 3 /* OP_GET, OP_UPDATE, OP_FIND: what --mix chooses from */

static const char *const op_name[OP_N] = {"get", "update", "find", "seed", "attach", "keepalive"};
static const char *const op_wire[OP_N] = {"get", "store", "find", "store", "attach", "keepalive"};

struct strlist {
    char **v;
    size_t n;
};

struct opts {
    struct strlist state_dirs, creds_dirs, sn, allow_errors;
    size_t nodes; /* 0: one per identity */
    bool allow_shared, follow, json, hold;
    double connect_rate, duration_s, rate;
    unsigned mix[MIX_OPS];
    unsigned mix_total;
    unsigned window;
    unsigned timeout_ms;
    int verbose;
};

static void print_help(void)
{
    printf("usage: on_load (--state DIR[,DIR...] | --creds-dir DIR)... --sn ADDR[,ADDR...]\n"
           "               [--nodes N] [--allow-shared] [--connect-rate R] [--duration S]\n"
           "               [--rate R] [--mix OP:W[,OP:W...]] [--window W] [--timeout MS]\n"
           "               [--follow-redirects] [--allow-errors CODE[,CODE...]] [--json]\n"
           "               [--hold] [-v]\n"
           "Simulates many ordinary nodes from one process (one thread, one event loop):\n"
           "each opens its own TLS link to a super node, attaches (docs/protocol.md 5.1),\n"
           "keeps the attachment alive, stores one signed record and then sends a request\n"
           "mix for a while; then it reports connections, requests, latencies and memory.\n"
           "\n"
           "Identities:\n"
           "  --state DIR[,DIR...]  enrolled node state directories (key.pem, cert.pem, ca.pem,\n"
           "                        overlay.json, pin, as \"supernode enroll\" writes them);\n"
           "                        repeatable\n"
           "  --creds-dir DIR       every subdirectory of DIR that holds a cert.pem is a state\n"
           "                        directory (taken in natural name order: on2 before on10);\n"
           "                        repeatable, and combines with --state\n"
           "  Simulated node i uses identity i mod K, K being the number of distinct Node-IDs\n"
           "  loaded (directories repeating a Node-ID are skipped). A super node keeps ONE\n"
           "  attachment per Node-ID and replaces it when the same node attaches over a new\n"
           "  link, so N simulated nodes need N distinct certificates. With --nodes N and no\n"
           "  --allow-shared, loading stops once N distinct identities are found.\n"
           "  --allow-shared        allow N above the number of identities: node i+K reuses\n"
           "                        node i's identity and replaces its attachment, so only K\n"
           "                        links stay attached; those replacements are expected\n"
           "                        (not failures), and requests lost with them count under\n"
           "                        the code \"replaced\", which is then allowed\n"
           "  All identities must belong to the same overlay and CA pin.\n"
           "\n"
           "Connections:\n"
           "  --sn ADDR[,ADDR...]   numeric host:port of the super nodes; node i connects to\n"
           "                        address i mod (count) (required). The peer must present a\n"
           "                        certificate with the super node role\n"
           "  --nodes N             simulated nodes (default: one per identity; at most %d)\n"
           "  --connect-rate R      at most R new connections per second, redirects included\n"
           "                        (default %g), to avoid a handshake storm\n"
           "  --follow-redirects    when attach is refused with \"redirect\" or \"unavailable\",\n"
           "                        or a \"move\" indication comes, connect to the first of the\n"
           "                        alternates in its body (checking that the node there has\n"
           "                        the Node-ID it was announced with); at most %d times per\n"
           "                        node. Without it such a node counts as refused (move: just\n"
           "                        counted)\n"
           "  --timeout MS          TCP + TLS + hello, and every request (default %d)\n"
           "  Attached links send keepalive at the keepalive_s the super node answered.\n"
           "  The file descriptor limit (RLIMIT_NOFILE) is raised to N + %d; when the hard\n"
           "  limit is lower and cannot be raised, on_load says so and exits 1.\n"
           "\n"
           "Requests:\n"
           "  Record of node i: type \"" RECORD_TYPE
           "\", name \"<its URI without sip:>-<i>\", key\n"
           "  SHA-1(type|name), value {\"node\":i,\"write\":n}, signed with its identity's key,\n"
           "  seq = microseconds since 1970 (strictly increasing per node), lifetime %d s\n"
           "  (or the overlay's maximum when lower). Once attached, each node first stores\n"
           "  it (store, mode update: the \"seed\" line of the report, not timed). When every\n"
           "  node is settled (attached with its record stored, refused or failed) the timed\n"
           "  phase starts, unless no node is attached:\n"
           "  --duration S          length of the timed phase in seconds (default %g; 0: none)\n"
           "  --rate R              requests per second per attached node (default %g), evenly\n"
           "                        spaced with a random phase per node; 0: only keepalives\n"
           "  --mix OP:W[,OP:W...]  weights of the request types (default get:80,update:20):\n"
           "                        get     get of the node's own record (an answer without\n"
           "                                records counts as error \"empty\")\n"
           "                        update  store of a freshly signed version, mode update\n"
           "                        find    find of the record's key\n"
           "  --window W            most requests in flight per node (default %d); a request\n"
           "                        falling due while W are in flight is skipped and counted\n"
           "                        (\"skipped\"), not delayed. Sends missed because this\n"
           "                        process fell behind (its loop late) are not made up\n"
           "                        either: sent below target x duration shows that\n"
           "  After the phase on_load waits for outstanding answers (up to --timeout).\n"
           "\n"
           "Report (stdout; --json: one JSON object on one line):\n"
           "  connections: attempted (connect calls, redirects included), attached (nodes\n"
           "  whose attach succeeded), redirected (redirects and moves followed), refused by\n"
           "  code, failed by reason, lost after attaching by reason, still attached at the\n"
           "  end, attached per super node address, handshake time (TCP + TLS + hello);\n"
           "  requests of the timed phase: sent, ok, errors by code, skipped, ok per second\n"
           "  achieved (ok answers / duration) against the target (nodes attached when the\n"
           "  phase began x rate), and per type sent/ok/errors and latency median/p99/max\n"
           "  in ms (successful requests only; percentiles to within 2 %%); the same for\n"
           "  seed, keepalive and attach;\n"
           "  memory: VmRSS of this process at start, with the identities loaded (kB per\n"
           "  identity: mostly its GnuTLS credentials, about 36 kB; parsed certificates for\n"
           "  signing are cached for %d identities, others parsed again when signing; fixed\n"
           "  start-up costs included, so meaningful with many identities) and\n"
           "  once all nodes are settled (kB per attached link), and VmHWM.\n"
           "  Local error codes: timeout (no answer in time), connection-closed, replaced\n"
           "  (the link was replaced), moved (in flight when the node left to follow a\n"
           "  move), queue-full, not-open, sign-failed, empty; the others come from the\n"
           "  super node.\n"
           "  --json                machine output; \"ok\" and \"verdict\" (\"pass\", or why not)\n"
           "                        give the outcome\n"
           "  --hold                after the report keep the links open (with keepalives)\n"
           "                        until SIGINT or SIGTERM, then close them and exit with\n"
           "                        the report's status; links lost meanwhile go to stderr\n"
           "  -v, --verbose         log the transport on stderr: -v info, -vv debug, -vvv\n"
           "                        trace (default: errors only)\n"
           "  -h, --help            this text\n"
           "  Progress goes to stderr every %g s. SIGINT/SIGTERM before the report ends the\n"
           "  run early: the report says \"interrupted\" and the exit status is 1.\n"
           "\n"
           "Exit status: 0 when every node attached and is still attached (nodes replaced\n"
           "under --allow-shared excepted) and no request (seed, timed mix, keepalive) failed\n"
           "except with a code given in --allow-errors CODE[,CODE...]; 1 otherwise; 2 usage\n"
           "error.\n"
           "\n"
           "Example:\n"
           "  on_load --creds-dir /tmp/ids --sn 127.0.0.1:7001,127.0.0.1:7002 --nodes 1000 \\\n"
           "      --rate 1 --duration 30 --mix get:50,update:50 --follow-redirects --json\n",
           MAX_NODES, DEF_CONNECT_RATE, MAX_REDIRECTS, DEF_TIMEOUT_MS, SPARE_FDS, DEF_LIFETIME_S,
           DEF_DURATION_S, DEF_RATE, DEF_WINDOW, CERT_CACHE, PROGRESS_S);
}

static void list_add(struct strlist *l, const char *s)
{
    char **nv = realloc(l->v, (l->n + 1) * sizeof(*nv));
    char *copy = strdup(s);
    if (!nv || !copy) {
        errorf("out of memory");
        exit(1);
    }
    l->v = nv;
    l->v[l->n++] = copy;
}

/* Appends the non-empty comma-separated items of s. */
static void list_split(struct strlist *l, const char *opt, const char *s)
{
    const char *p = s;
    size_t before = l->n;
    while (*p) {
        size_t len = strcspn(p, ",");
        if (len) {
            char item[4096];
            if (len >= sizeof(item))
                usage_error("--%s: item too long", opt);
            memcpy(item, p, len);
            item[len] = '\0';
            list_add(l, item);
        }
        p += len;
        if (*p == ',')
            p++;
    }
    if (l->n == before)
        usage_error("--%s: empty list", opt);
}

static void list_free(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static long long parse_ll(const char *opt, const char *s, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        usage_error("--%s: expected an integer from %lld to %lld, not \"%s\"", opt, lo, hi, s);
    return v;
}

static double parse_num(const char *opt, const char *s, double lo, double hi, bool lo_open)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !(v >= lo) || !(v <= hi) || (lo_open && v <= lo))
        usage_error("--%s: expected a number %s %g and at most %g, not \"%s\"", opt,
                    lo_open ? "above" : "from", lo, hi, s);
    return v;
}

static void parse_mix(struct opts *o, const char *s)
{
    bool seen[MIX_OPS] = {false};
    memset(o->mix, 0, sizeof(o->mix));
    struct strlist items = {0};
    list_split(&items, "mix", s);
    for (size_t i = 0; i < items.n; i++) {
        char *it = items.v[i], *colon = strchr(it, ':');
        if (!colon)
            usage_error("--mix: \"%s\" is not OP:WEIGHT (e.g. get:80)", it);
        *colon = '\0';
        int op = -1;
        for (int k = 0; k < MIX_OPS; k++)
            if (!strcmp(it, op_name[k]))
                op = k;
        if (op < 0)
            usage_error("--mix: unknown request type \"%s\": get, update or find", it);
        if (seen[op])
            usage_error("--mix: %s given twice", it);
        seen[op] = true;
        o->mix[op] = (unsigned)parse_ll("mix", colon + 1, 0, 1000000);
    }
    list_free(&items);
}

enum {
    O_STATE = 256,
    O_CREDS_DIR,
    O_SN,
    O_NODES,
    O_ALLOW_SHARED,
    O_CONNECT_RATE,
    O_DURATION,
    O_RATE,
    O_MIX,
    O_WINDOW,
    O_TIMEOUT,
    O_FOLLOW,
    O_ALLOW_ERRORS,
    O_JSON,
    O_HOLD,
};

static const struct option longopts[] = {
    {"state", required_argument, NULL, O_STATE},
    {"creds-dir", required_argument, NULL, O_CREDS_DIR},
    {"sn", required_argument, NULL, O_SN},
    {"nodes", required_argument, NULL, O_NODES},
    {"allow-shared", no_argument, NULL, O_ALLOW_SHARED},
    {"connect-rate", required_argument, NULL, O_CONNECT_RATE},
    {"duration", required_argument, NULL, O_DURATION},
    {"rate", required_argument, NULL, O_RATE},
    {"mix", required_argument, NULL, O_MIX},
    {"window", required_argument, NULL, O_WINDOW},
    {"timeout", required_argument, NULL, O_TIMEOUT},
    {"follow-redirects", no_argument, NULL, O_FOLLOW},
    {"allow-errors", required_argument, NULL, O_ALLOW_ERRORS},
    {"json", no_argument, NULL, O_JSON},
    {"hold", no_argument, NULL, O_HOLD},
    {"verbose", no_argument, NULL, 'v'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

static const char *longopt_name(int val)
{
    for (const struct option *p = longopts; p->name; p++)
        if (p->val == val)
            return p->name;
    return "?";
}

static void parse_args(int argc, char **argv, struct opts *o)
{
    bool given[O_HOLD + 1] = {false};
    memset(o, 0, sizeof(*o));
    o->connect_rate = DEF_CONNECT_RATE;
    o->duration_s = DEF_DURATION_S;
    o->rate = DEF_RATE;
    o->mix[OP_GET] = 80;
    o->mix[OP_UPDATE] = 20;
    o->window = DEF_WINDOW;
    o->timeout_ms = DEF_TIMEOUT_MS;

    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":hv", longopts, NULL)) != -1) {
        if (c >= O_STATE && c <= O_HOLD) {
            bool repeatable = c == O_STATE || c == O_CREDS_DIR;
            if (given[c] && !repeatable)
                usage_error("--%s given twice", longopt_name(c));
            given[c] = true;
        }
        switch (c) {
        case 'h':
            print_help();
            exit(0);
        case 'v':
            o->verbose++;
            break;
        case O_STATE:
            list_split(&o->state_dirs, "state", optarg);
            break;
        case O_CREDS_DIR:
            if (!*optarg)
                usage_error("--creds-dir: empty directory name");
            list_add(&o->creds_dirs, optarg);
            break;
        case O_SN:
            list_split(&o->sn, "sn", optarg);
            break;
        case O_NODES:
            o->nodes = (size_t)parse_ll("nodes", optarg, 1, MAX_NODES);
            break;
        case O_ALLOW_SHARED:
            o->allow_shared = true;
            break;
        case O_CONNECT_RATE:
            o->connect_rate = parse_num("connect-rate", optarg, 0, 1e6, true);
            break;
        case O_DURATION:
            o->duration_s = parse_num("duration", optarg, 0, 1e7, false);
            break;
        case O_RATE:
            o->rate = parse_num("rate", optarg, 0, 1e6, false);
            break;
        case O_MIX:
            parse_mix(o, optarg);
            break;
        case O_WINDOW:
            o->window = (unsigned)parse_ll("window", optarg, 1, 65535);
            break;
        case O_TIMEOUT:
            o->timeout_ms = (unsigned)parse_ll("timeout", optarg, 1, 3600000);
            break;
        case O_FOLLOW:
            o->follow = true;
            break;
        case O_ALLOW_ERRORS:
            list_split(&o->allow_errors, "allow-errors", optarg);
            break;
        case O_JSON:
            o->json = true;
            break;
        case O_HOLD:
            o->hold = true;
            break;
        case ':':
            if (optopt >= O_STATE)
                usage_error("--%s needs a value", longopt_name(optopt));
            usage_error("%s needs a value", argv[optind - 1]);
        default:
            if (optopt && optopt < 256)
                usage_error("unknown option -%c (see on_load --help)", optopt);
            usage_error("unknown option %s (see on_load --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        usage_error("unexpected argument \"%s\" (see on_load --help)", argv[optind]);
    if (!o->state_dirs.n && !o->creds_dirs.n)
        usage_error("identities needed: --state DIR[,DIR...] or --creds-dir DIR");
    if (!o->sn.n)
        usage_error("--sn ADDR[,ADDR...] is required");
    for (size_t i = 0; i < o->sn.n; i++)
        if (strlen(o->sn.v[i]) >= ADDR_MAX || cfg_parse_hostport(o->sn.v[i], NULL, 0, NULL) != 0)
            usage_error("--sn: \"%s\" is not a numeric address like 192.0.2.7:7000 or [::1]:7000",
                        o->sn.v[i]);
    for (size_t i = 0; i < o->allow_errors.n; i++) {
        const char *e = o->allow_errors.v[i];
        if (strlen(e) >= CODE_MAX ||
            strspn(e, "abcdefghijklmnopqrstuvwxyz0123456789-_.") != strlen(e))
            usage_error("--allow-errors: \"%s\" is not an error code like rate-limited", e);
    }
    for (int k = 0; k < MIX_OPS; k++)
        o->mix_total += o->mix[k];
    if (o->mix_total == 0 && o->rate > 0 && o->duration_s > 0)
        usage_error("--mix: every weight is 0 (use --rate 0 for keepalives only)");
}

/* ---- Identities --------------------------------------------------------------------------- */

struct ident {
    char *dir;
    char *uri;
    nid_t node_id;
    gnutls_x509_privkey_t key; /* parsed: about 0.6 kB, and slow to parse again */
    gnutls_x509_crt_t cert;    /* parsed (about 20 kB) while in the certificate cache, else NULL */
    gnutls_datum_t cert_der;   /* always */
    struct tls_ctx *tls;       /* the GnuTLS credentials of this identity's links */
};

/* Open-addressing set of Node-IDs (indices into ids[]), for skipping duplicates. */
struct idset {
    uint32_t *slot; /* index + 1; 0 = empty */
    size_t mask;
};

static uint64_t nid_hash(const nid_t *id)
{
    uint64_t h;
    memcpy(&h, id->b, sizeof(h));
    return h * 0x9E3779B97F4A7C15ULL;
}

static int idset_grow(struct idset *s, const struct ident *ids, size_t n)
{
    size_t cap = s->slot ? (s->mask + 1) * 2 : 1024;
    uint32_t *ns = calloc(cap, sizeof(*ns));
    if (!ns)
        return -1;
    free(s->slot);
    s->slot = ns;
    s->mask = cap - 1;
    for (size_t i = 0; i < n; i++) {
        size_t p = (size_t)nid_hash(&ids[i].node_id) & s->mask;
        while (s->slot[p])
            p = (p + 1) & s->mask;
        s->slot[p] = (uint32_t)i + 1;
    }
    return 0;
}

/* True when id is present; else false (the caller adds it with idset_put). */
static bool idset_has(const struct idset *s, const struct ident *ids, const nid_t *id)
{
    for (size_t p = (size_t)nid_hash(id) & s->mask; s->slot[p]; p = (p + 1) & s->mask)
        if (nid_eq(&ids[s->slot[p] - 1].node_id, id))
            return true;
    return false;
}

static void idset_put(struct idset *s, const struct ident *ids, size_t i)
{
    size_t p = (size_t)nid_hash(&ids[i].node_id) & s->mask;
    while (s->slot[p])
        p = (p + 1) & s->mask;
    s->slot[p] = (uint32_t)i + 1;
}

static int cmp_vers(const void *a, const void *b)
{
    return strverscmp(*(char *const *)a, *(char *const *)b);
}

/* The state directories under a --creds-dir, in natural order, appended to out. */
static int scan_creds_dir(const char *dir, struct strlist *out, size_t *skipped)
{
    DIR *d = opendir(dir);
    if (!d) {
        errorf("--creds-dir %s: %s", dir, strerror(errno));
        return -1;
    }
    struct strlist names = {0};
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[4096];
        struct stat st;
        int w = snprintf(path, sizeof(path), "%s/%s/" NODE_CREDS_CERT, dir, e->d_name);
        if (w < 0 || (size_t)w >= sizeof(path))
            continue;
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode))
            list_add(&names, e->d_name);
        else
            (*skipped)++;
    }
    closedir(d);
    qsort(names.v, names.n, sizeof(char *), cmp_vers);
    for (size_t i = 0; i < names.n; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, names.v[i]);
        list_add(out, path);
    }
    list_free(&names);
    return 0;
}

struct idload {
    struct ident *ids;
    size_t n, cap;
    /* Parsed certificates, for signing: at most CERT_CACHE, oldest out first. */
    uint32_t cached[CERT_CACHE];
    size_t n_cached, cache_pos;
    uint64_t cert_parses;
    size_t dirs_read, dup_dirs, skipped_subdirs, dirs_total;
    char *overlay;
    char pin[OVERLAY_PIN_LEN];
    int64_t max_lifetime_s;
    double keepalive_s;
};

static void ident_free(struct ident *id)
{
    tls_ctx_free(id->tls);
    if (id->key)
        gnutls_x509_privkey_deinit(id->key);
    if (id->cert)
        gnutls_x509_crt_deinit(id->cert);
    gnutls_free(id->cert_der.data);
    free(id->dir);
    free(id->uri);
}

/* Enters ids[i] (whose cert is parsed) into the certificate cache, evicting the oldest. */
static void cert_cache_put(struct idload *il, size_t i)
{
    if (il->n_cached < CERT_CACHE) {
        il->cached[il->n_cached++] = (uint32_t)i;
        return;
    }
    struct ident *old = &il->ids[il->cached[il->cache_pos]];
    gnutls_x509_crt_deinit(old->cert);
    old->cert = NULL;
    il->cached[il->cache_pos] = (uint32_t)i;
    il->cache_pos = (il->cache_pos + 1) % CERT_CACHE;
}

/* The identity's parsed certificate (parsed again from DER when it left the cache). */
static gnutls_x509_crt_t ident_cert(struct idload *il, struct ident *id)
{
    if (id->cert)
        return id->cert;
    gnutls_x509_crt_t c;
    if (gnutls_x509_crt_init(&c) < 0)
        return NULL;
    if (gnutls_x509_crt_import(c, &id->cert_der, GNUTLS_X509_FMT_DER) < 0) {
        gnutls_x509_crt_deinit(c);
        return NULL;
    }
    il->cert_parses++;
    id->cert = c;
    cert_cache_put(il, (size_t)(id - il->ids));
    return c;
}

/*
 * Loads state directories in order until `want` distinct identities are
 * there (SIZE_MAX: all). 0 or -1 (after printing why).
 */
static int load_identities(const struct opts *o, struct idload *il, size_t want)
{
    struct strlist dirs = {0};
    struct idset set = {0};
    int ret = -1;
    for (size_t i = 0; i < o->state_dirs.n; i++)
        list_add(&dirs, o->state_dirs.v[i]);
    for (size_t i = 0; i < o->creds_dirs.n; i++) {
        size_t before = dirs.n;
        if (scan_creds_dir(o->creds_dirs.v[i], &dirs, &il->skipped_subdirs) < 0)
            goto out;
        if (dirs.n == before) {
            errorf("--creds-dir %s: no subdirectory with a " NODE_CREDS_CERT, o->creds_dirs.v[i]);
            goto out;
        }
    }
    il->dirs_total = dirs.n;
    if (idset_grow(&set, il->ids, 0) < 0)
        goto nomem;
    for (size_t i = 0; i < dirs.n && il->n < want; i++) {
        struct node_creds cr;
        char err[768];
        const char *dir = dirs.v[i];
        if (node_creds_load(dir, &cr, err, sizeof(err)) < 0) {
            errorf("%s", err);
            goto out;
        }
        il->dirs_read++;
        if (!il->overlay) {
            il->overlay = strdup(cr.doc.overlay);
            memcpy(il->pin, cr.pin, sizeof(il->pin));
            il->max_lifetime_s = cr.doc.max_record_lifetime_s;
            il->keepalive_s = (double)cr.doc.keepalive_s;
            if (!il->overlay) {
                node_creds_free(&cr);
                goto nomem;
            }
        } else if (strcmp(il->overlay, cr.doc.overlay) != 0 || strcmp(il->pin, cr.pin) != 0) {
            errorf("%s: overlay %s (CA %s) differs from the first identity's: overlay %s (CA "
                   "%s); all identities must be of one overlay",
                   dir, cr.doc.overlay, cr.pin, il->overlay, il->pin);
            node_creds_free(&cr);
            goto out;
        }
        if (!cr.id.has_node_id || !(cr.id.roles & (ROLE_NODE | ROLE_SUPERNODE)) || !cr.id.uri[0]) {
            errorf("%s: the certificate lacks a Node-ID, a URI or the node role: it cannot attach",
                   dir);
            node_creds_free(&cr);
            goto out;
        }
        if (strlen(rec_uri_aor(cr.id.uri)) + 1 + 7 > REC_NAME_MAX) {
            errorf("%s: URI %s too long for a record name", dir, cr.id.uri);
            node_creds_free(&cr);
            goto out;
        }
        if (idset_has(&set, il->ids, &cr.id.node_id)) {
            il->dup_dirs++;
            node_creds_free(&cr);
            continue;
        }
        if (il->n == il->cap) {
            size_t ncap = il->cap ? il->cap * 2 : 64;
            struct ident *nv = realloc(il->ids, ncap * sizeof(*nv));
            if (!nv) {
                node_creds_free(&cr);
                goto nomem;
            }
            il->ids = nv;
            il->cap = ncap;
        }
        struct ident *id = &il->ids[il->n];
        memset(id, 0, sizeof(*id));
        struct tls_config tc = {.ca_file = cr.ca_file,
                                .cert_file = cr.cert_file,
                                .key_file = cr.key_file,
                                .overlay = il->overlay,
                                .handshake_timeout_ms = o->timeout_ms,
                                .idle_timeout_ms = 0,
                                .max_frame = MSG_MAX_FRAME_DEF,
                                .max_wqueue = WQUEUE_BYTES};
        id->tls = tls_ctx_new(&tc, err, sizeof(err));
        id->dir = strdup(dir);
        id->uri = strdup(cr.id.uri);
        id->node_id = cr.id.node_id;
        /*
         * Keep the key, the certificate's DER and (while the cache has room)
         * the parsed certificate for signing; the rest goes.
         */
        int gr = gnutls_x509_crt_export2(cr.cert, GNUTLS_X509_FMT_DER, &id->cert_der);
        id->key = cr.key;
        cr.key = NULL;
        if (il->n_cached < CERT_CACHE) {
            id->cert = cr.cert;
            cr.cert = NULL;
        }
        node_creds_free(&cr);
        if (!id->tls) {
            errorf("%s: %s", dir, err);
            ident_free(id);
            goto out;
        }
        if (!id->dir || !id->uri || gr < 0) {
            ident_free(id);
            goto nomem;
        }
        if (id->cert)
            cert_cache_put(il, il->n);
        il->n++;
        idset_put(&set, il->ids, il->n - 1);
        if (il->n * 2 > set.mask + 1 && idset_grow(&set, il->ids, il->n) < 0)
            goto nomem;
    }
    ret = 0;
    goto out;
nomem:
    errorf("out of memory loading identities");
out:
    free(set.slot);
    list_free(&dirs);
    return ret;
}

/* ---- The simulated nodes ------------------------------------------------------------------ */

enum phase { P_CONNECT = 0, P_TIMED, P_DRAIN, P_HOLD, P_SHUTDOWN };

enum on_state {
    S_QUEUED = 0,  /* waiting for a connection slot (--connect-rate) */
    S_CONNECTING,  /* TCP, TLS, hello */
    S_ATTACHING,   /* attach sent */
    S_ATTACHED,    /* attached: keepalives, requests */
    S_REDIRECTING, /* closing, to connect to an alternate when on_close comes */
    S_REFUSED,     /* attach refused (final) */
    S_FAILED,      /* could not connect or attach (final) */
    S_LOST,        /* was attached, the link went down (final) */
};

struct load;
struct req;

struct on {
    struct load *L;
    struct ident *id;
    struct conn *conn;
    struct on *qnext;
    struct req *reqs; /* pending on this link */
    ev_timer mix_timer, ka_timer;
    double started;     /* when the current connect began (monotonic) */
    uint64_t last_seq;  /* of our last signed record */
    uint64_t writes;    /* records signed */
    uint32_t idx;       /* simulated node number */
    uint16_t inflight;  /* seed + mix requests pending */
    uint8_t redirects;  /* followed so far */
    uint8_t state;      /* enum on_state */
    bool settled;       /* counted out of the connect phase */
    bool ever_attached; /* a re-attach after a move is not a new attachment */
    bool replaced;      /* lost because the same Node-ID attached elsewhere */
    bool have_expect;   /* connecting to an alternate with a known Node-ID */
    nid_t key;          /* of our record */
    nid_t expect;
    char addr[ADDR_MAX];
};

struct req {
    struct req *on_next;     /* the node's pending list */
    struct req *prev, *next; /* all pending, oldest first (timeouts) */
    struct on *on;
    double sent;
    uint8_t op;
    char tid[MSG_TID_LEN + 1];
};

struct opstat {
    uint64_t sent, ok;
    json_t *errors;   /* {"code": n} */
    json_t *examples; /* {"code": "first reason"} */
    struct hist lat;  /* successful requests */
};

struct load {
    struct ev_loop *loop;
    struct opts *o;
    struct idload il;
    struct on *ons;
    size_t n;
    int64_t lifetime_s;
    enum phase phase;
    bool interrupted;
    uint64_t rng;
    /* connecting */
    struct on *qhead, *qtail;
    double tokens, tick_last;
    ev_timer connect_tick;
    /* requests */
    struct req *rhead, *rtail;
    double timeout_s;
    ev_timer sweep;
    ev_timer phase_timer, progress;
    ev_signal sigint, sigterm;
    size_t unsettled, live, mix_inflight;
    /* connection outcome */
    uint64_t attempted, attached, redirected, moves_followed, redirect_limit, late;
    uint64_t skipped;
    size_t timed_nodes; /* attached when the timed phase began */
    json_t *refused, *failed, *lost, *hold_lost, *examples, *inds;
    struct hist handshake;
    struct opstat st[OP_N];
    long rss_start_kb, rss_before_kb, rss_settled_kb;
    double t_connect0, t_connect1, t_timed0, t_timed1;
};

static void check_progress(struct load *L);
static void on_enqueue(struct on *on);
static void settle(struct on *on);

static void count_err(struct load *L, enum op op, const char *code, const char *detail)
{
    count_code(L->st[op].errors, code);
    keep_example(L->st[op].examples, code, detail);
}

/* ---- Requests ----------------------------------------------------------------------------- */

static void req_unlink(struct load *L, struct req *r)
{
    for (struct req **pp = &r->on->reqs; *pp; pp = &(*pp)->on_next)
        if (*pp == r) {
            *pp = r->on_next;
            break;
        }
    if (r->prev)
        r->prev->next = r->next;
    else
        L->rhead = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        L->rtail = r->prev;
}

/* Sends a request on the node's link. 0, or -1 (counted as an error of op). */
static int req_send(struct on *on, enum op op, json_t *body)
{
    struct load *L = on->L;
    L->st[op].sent++;
    if (!on->conn) {
        count_err(L, op, "not-open", "no connection");
        return -1;
    }
    struct req *r = calloc(1, sizeof(*r));
    if (!r) {
        count_err(L, op, "internal", "out of memory");
        return -1;
    }
    msg_new_tid(r->tid);
    int rc = conn_send(on->conn, op_wire[op], MSG_REQ, r->tid, body);
    if (rc != 0) {
        free(r);
        if (rc == CONN_ERR_QUEUE_FULL)
            count_err(L, op, "queue-full", "the connection's write queue is full");
        else if (rc == CONN_ERR_NOT_OPEN)
            count_err(L, op, "not-open", "the connection is not open");
        else
            count_err(L, op, "encode-failed", "the request could not be encoded");
        return -1;
    }
    r->on = on;
    r->op = (uint8_t)op;
    r->sent = mono_s();
    r->on_next = on->reqs;
    on->reqs = r;
    r->prev = L->rtail;
    if (L->rtail)
        L->rtail->next = r;
    else
        L->rhead = r;
    L->rtail = r;
    if (op <= OP_SEED)
        on->inflight++;
    if (op < MIX_OPS)
        L->mix_inflight++;
    return 0;
}

/* Bookkeeping common to every end of a request (already unlinked). */
static void req_end(struct load *L, struct req *r)
{
    struct on *on = r->on;
    if (r->op <= OP_SEED && on->inflight)
        on->inflight--;
    if (r->op < MIX_OPS && L->mix_inflight)
        L->mix_inflight--;
    if (r->op == OP_SEED)
        settle(on);
}

/* A request failed without an answer (timeout, link down). */
static void req_fail(struct load *L, struct req *r, const char *code, const char *detail)
{
    if (r->op != OP_ATTACH && L->phase != P_SHUTDOWN)
        count_err(L, (enum op)r->op, code, detail);
    req_end(L, r);
    free(r);
}

static struct req *req_take(struct on *on, const char *tid)
{
    for (struct req *r = on->reqs; r; r = r->on_next)
        if (!strcmp(r->tid, tid)) {
            req_unlink(on->L, r);
            return r;
        }
    return NULL;
}

/* Fails everything pending on the node's link (it went down). */
static void fail_pending(struct on *on, const char *code, const char *detail)
{
    struct load *L = on->L;
    while (on->reqs) {
        struct req *r = on->reqs;
        req_unlink(L, r);
        req_fail(L, r, code, detail);
    }
}

static int send_store(struct on *on, enum op op)
{
    struct load *L = on->L;
    struct ident *id = on->id;
    char name[REC_NAME_MAX + 1], err[512];
    uint64_t seq = rec_seq_now();
    if (seq <= on->last_seq)
        seq = on->last_seq + 1;
    snprintf(name, sizeof(name), "%s-%" PRIu32, rec_uri_aor(id->uri), on->idx);
    json_t *value =
        json_pack("{s:I, s:I}", "node", (json_int_t)on->idx, "write", (json_int_t)(on->writes + 1));
    struct rec_params p = {.overlay = L->il.overlay,
                           .type = RECORD_TYPE,
                           .name = name,
                           .seq = seq,
                           .expires = (int64_t)time(NULL) + L->lifetime_s,
                           .value = value};
    struct record rec;
    gnutls_x509_crt_t cert = ident_cert(&L->il, id);
    int rc = REC_E_NOMEM;
    if (value && cert)
        rc = rec_sign(&p, id->key, cert, &rec, err, sizeof(err));
    json_decref(value);
    if (rc != REC_OK) {
        L->st[op].sent++;
        count_err(L, op, "sign-failed", rc == REC_E_NOMEM ? "out of memory" : err);
        return -1;
    }
    on->last_seq = seq;
    on->writes++;
    json_t *body = json_pack("{s:s, s:O}", "mode", "update", "record", rec.envelope);
    rec_free(&rec);
    if (!body) {
        L->st[op].sent++;
        count_err(L, op, "internal", "out of memory");
        return -1;
    }
    int r = req_send(on, op, body);
    json_decref(body);
    return r;
}

static void send_mix(struct on *on, enum op op)
{
    char khex[NID_HEX_LEN + 1];
    if (op == OP_UPDATE) {
        send_store(on, op);
        return;
    }
    json_t *body = json_pack("{s:s}", op == OP_GET ? "key" : "target", nid_to_hex(&on->key, khex));
    req_send(on, op, body);
    json_decref(body);
}

static enum op pick_op(struct load *L)
{
    unsigned x = (unsigned)(rng_next(&L->rng) % L->o->mix_total);
    for (int k = 0; k < MIX_OPS; k++) {
        if (x < L->o->mix[k])
            return (enum op)k;
        x -= L->o->mix[k];
    }
    return OP_GET;
}

/* ---- Node life ---------------------------------------------------------------------------- */

static void settle(struct on *on)
{
    if (on->settled)
        return;
    on->settled = true;
    on->L->unsettled--;
    check_progress(on->L);
}

static void stop_timers(struct on *on)
{
    ev_timer_stop(on->L->loop, &on->mix_timer);
    ev_timer_stop(on->L->loop, &on->ka_timer);
}

/* The node's connection or attachment ended for good; `key` names why. */
static void on_gone(struct on *on, enum on_state final, json_t *bucket, const char *key,
                    const char *detail)
{
    struct load *L = on->L;
    if (on->ever_attached) { /* after a move: it was attached, now it is not */
        final = S_LOST;
        bucket = L->phase == P_HOLD ? L->hold_lost : L->lost;
    }
    count_code(bucket, key);
    keep_example(L->examples, key, detail);
    on->state = (uint8_t) final;
    stop_timers(on);
    settle(on);
}

static void mix_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct on *on = w->data;
    struct load *L = on->L;
    if (L->phase != P_TIMED || on->state != S_ATTACHED) {
        ev_timer_stop(loop, w);
        return;
    }
    if (on->inflight >= L->o->window) {
        L->skipped++;
        return;
    }
    send_mix(on, pick_op(L));
}

static void ka_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct on *on = w->data;
    if (on->state != S_ATTACHED || !on->conn || on->L->phase == P_SHUTDOWN) {
        ev_timer_stop(loop, w);
        return;
    }
    req_send(on, OP_KEEPALIVE, NULL);
}

static void start_mix(struct on *on)
{
    struct load *L = on->L;
    if (L->phase != P_TIMED || L->o->rate <= 0 || L->o->mix_total == 0)
        return;
    double period = 1.0 / L->o->rate;
    ev_timer_set(&on->mix_timer, period * rng_unit(&L->rng), period);
    ev_timer_start(L->loop, &on->mix_timer);
}

/* Takes the first alternate of an err/move body as the node's next target. */
static bool take_alternate(struct on *on, const json_t *body)
{
    const json_t *first = json_array_get(json_object_get(body, "alternates"), 0);
    const char *addr = jstr(first, "addr", NULL), *idhex = jstr(first, "id", NULL);
    nid_t id;
    if (!addr || !idhex || strlen(addr) >= sizeof(on->addr) ||
        cfg_parse_hostport(addr, NULL, 0, NULL) != 0 || nid_from_hex(&id, idhex) != 0)
        return false;
    snprintf(on->addr, sizeof(on->addr), "%s", addr);
    on->expect = id;
    on->have_expect = true;
    return true;
}

static void attach_answer(struct on *on, const struct msg *m, double seconds)
{
    struct load *L = on->L;
    if (on->state != S_ATTACHING)
        return;
    if (m->kind == MSG_RES) {
        L->st[OP_ATTACH].ok++;
        hist_add(&L->st[OP_ATTACH].lat, seconds);
        on->state = S_ATTACHED;
        double ka = json_number_value(json_object_get(m->body, "keepalive_s"));
        if (!(ka > 0))
            ka = L->il.keepalive_s > 0 ? L->il.keepalive_s : DEF_KEEPALIVE_S;
        if (ka < MIN_KEEPALIVE_S)
            ka = MIN_KEEPALIVE_S;
        ev_timer_set(&on->ka_timer, ka, ka);
        ev_timer_start(L->loop, &on->ka_timer);
        if (on->ever_attached) { /* back after a move */
            start_mix(on);
            return;
        }
        on->ever_attached = true;
        L->attached++;
        if (send_store(on, OP_SEED) < 0)
            settle(on);
        return;
    }
    const char *code = jstr(m->body, "code", "error");
    const char *reason = jstr(m->body, "reason", "");
    char detail[512];
    snprintf(detail, sizeof(detail), "%s: %s: %s", on->addr, code, reason);
    count_err(L, OP_ATTACH, code, detail);
    if ((!strcmp(code, "redirect") || !strcmp(code, "unavailable")) && L->o->follow &&
        L->phase != P_SHUTDOWN) {
        if (on->redirects >= MAX_REDIRECTS) {
            L->redirect_limit++;
        } else if (take_alternate(on, m->body)) {
            L->redirected++;
            on->redirects++;
            on->state = S_REDIRECTING;
            conn_close(on->conn);
            return;
        } else {
            snprintf(detail, sizeof(detail), "%s: %s: %s (and no usable alternate)", on->addr, code,
                     reason);
        }
    }
    on_gone(on, S_REFUSED, L->refused, code, detail);
    conn_close(on->conn);
}

static void handle_ind(struct on *on, const struct msg *m)
{
    struct load *L = on->L;
    count_code(L->inds, m->type);
    if (strcmp(m->type, "move") != 0 || !L->o->follow || on->state != S_ATTACHED ||
        L->phase == P_SHUTDOWN)
        return;
    if (on->redirects >= MAX_REDIRECTS || !take_alternate(on, m->body))
        return; /* stay: the super node closes the link when it must */
    L->redirected++;
    L->moves_followed++;
    on->redirects++;
    on->state = S_REDIRECTING;
    stop_timers(on);
    conn_close(on->conn);
}

static void link_open(struct conn *c, void *ud)
{
    struct on *on = ud;
    struct load *L = on->L;
    hist_add(&L->handshake, mono_s() - on->started);
    const struct peer_identity *p = conn_peer(c);
    char who[600], detail[800];
    if (!p || !(p->roles & ROLE_SUPERNODE) ||
        (on->have_expect && (!p->has_node_id || !nid_eq(&p->node_id, &on->expect)))) {
        if (p)
            cred_identity_str(p, who, sizeof(who));
        else
            snprintf(who, sizeof(who), "unknown identity");
        bool role = p && (p->roles & ROLE_SUPERNODE);
        snprintf(detail, sizeof(detail), "%s: %s: %s", on->addr,
                 role ? "not the Node-ID it was announced with" : "not a super node", who);
        on_gone(on, S_FAILED, L->failed, role ? "wrong-node-id" : "not-a-supernode", detail);
        conn_close(c);
        return;
    }
    on->state = S_ATTACHING;
    if (req_send(on, OP_ATTACH, NULL) < 0) {
        snprintf(detail, sizeof(detail), "%s: cannot send attach", on->addr);
        on_gone(on, S_FAILED, L->failed, "attach-not-sent", detail);
        conn_close(c);
    }
}

static void link_message(struct conn *c, const struct msg *m, void *ud)
{
    struct on *on = ud;
    struct load *L = on->L;
    if (m->kind == MSG_REQ) {
        json_t *b = json_pack("{s:s, s:s}", "code", "unknown-type", "reason",
                              "a simulated ordinary node serves no requests");
        conn_send(c, "error", MSG_ERR, m->tid, b);
        json_decref(b);
        return;
    }
    if (m->kind == MSG_IND) {
        handle_ind(on, m);
        return;
    }
    struct req *r = req_take(on, m->tid);
    if (!r) {
        L->late++;
        return;
    }
    double seconds = mono_s() - r->sent;
    enum op op = (enum op)r->op;
    if (op == OP_ATTACH) {
        free(r);
        attach_answer(on, m, seconds);
        return;
    }
    struct opstat *st = &L->st[op];
    if (m->kind == MSG_RES && op == OP_GET &&
        json_array_size(json_object_get(m->body, "records")) == 0) {
        char detail[128];
        snprintf(detail, sizeof(detail), "%s: get of node %" PRIu32 "'s record found nothing",
                 on->addr, on->idx);
        count_err(L, op, "empty", detail);
    } else if (m->kind == MSG_RES) {
        st->ok++;
        hist_add(&st->lat, seconds);
    } else {
        const char *code = jstr(m->body, "code", "error");
        char detail[512];
        snprintf(detail, sizeof(detail), "%s: %s", on->addr, jstr(m->body, "reason", ""));
        count_err(L, op, code, detail);
    }
    req_end(L, r);
    free(r);
    check_progress(L);
}

static void link_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
    struct on *on = ud;
    struct load *L = on->L;
    const char *d = detail && *detail ? detail : conn_close_reason_str(why);
    char key[CODE_MAX], full[768];
    if (why == CONN_ERR_PEER_ERROR) {
        size_t len = strcspn(d, ":");
        if (len >= sizeof(key))
            len = sizeof(key) - 1;
        memcpy(key, d, len);
        key[len] = '\0';
    } else {
        snprintf(key, sizeof(key), "%s", conn_close_reason_str(why));
    }
    snprintf(full, sizeof(full), "%s: %s", on->addr, d);
    on->conn = NULL;
    L->live--;
    stop_timers(on);
    bool replaced = why == CONN_ERR_PEER_ERROR && !strcmp(key, "replaced");
    bool moving = on->state == S_REDIRECTING && on->ever_attached;
    fail_pending(on, replaced ? "replaced" : moving ? "moved" : "connection-closed", full);
    switch ((enum on_state)on->state) {
    case S_REDIRECTING:
        if (L->phase != P_SHUTDOWN)
            on_enqueue(on);
        break;
    case S_CONNECTING:
    case S_ATTACHING:
        if (L->phase != P_SHUTDOWN)
            on_gone(on, S_FAILED, L->failed, key, full);
        break;
    case S_ATTACHED:
        if (L->phase != P_SHUTDOWN) {
            on->replaced = replaced;
            on_gone(on, S_LOST, L->phase == P_HOLD ? L->hold_lost : L->lost, key, full);
            if (L->phase == P_HOLD)
                errorf("holding: node %" PRIu32 " lost its link: %s", on->idx, full);
        }
        break;
    default:
        break;
    }
    check_progress(L);
}

static const struct conn_cbs link_cbs = {
    .on_open = link_open, .on_message = link_message, .on_close = link_close};

static void start_connect(struct on *on)
{
    struct load *L = on->L;
    char err[256], detail[400];
    L->attempted++;
    on->state = S_CONNECTING;
    on->started = mono_s();
    on->conn = conn_connect(L->loop, on->id->tls, on->addr, &link_cbs, on, err, sizeof(err));
    if (!on->conn) {
        snprintf(detail, sizeof(detail), "%s: %s", on->addr, err);
        on_gone(on, S_FAILED, L->failed, "cannot-connect", detail);
        return;
    }
    L->live++;
}

/* ---- Pacing, timeouts, phases -------------------------------------------------------------- */

static void connect_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct load *L = w->data;
    double now = ev_now(loop);
    double rate = L->o->connect_rate;
    double cap = rate * 5 * CONNECT_TICK_S;
    if (cap < 1.0)
        cap = 1.0;
    L->tokens += (now - L->tick_last) * rate;
    L->tick_last = now;
    if (L->tokens > cap)
        L->tokens = cap;
    while (L->tokens >= 1.0 && L->qhead && L->phase != P_SHUTDOWN) {
        struct on *on = L->qhead;
        L->qhead = on->qnext;
        if (!L->qhead)
            L->qtail = NULL;
        on->qnext = NULL;
        L->tokens -= 1.0;
        start_connect(on);
    }
    if (!L->qhead)
        ev_timer_stop(loop, w);
}

static void on_enqueue(struct on *on)
{
    struct load *L = on->L;
    on->state = S_QUEUED;
    on->qnext = NULL;
    if (L->qtail)
        L->qtail->qnext = on;
    else
        L->qhead = on;
    L->qtail = on;
    if (!ev_is_active(&L->connect_tick)) {
        ev_now_update(L->loop);
        L->tick_last = ev_now(L->loop);
        if (L->tokens < 1.0)
            L->tokens = 1.0;
        ev_timer_set(&L->connect_tick, 0., CONNECT_TICK_S);
        ev_timer_start(L->loop, &L->connect_tick);
    }
}

static void sweep_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct load *L = w->data;
    double now = mono_s();
    while (L->rhead && now - L->rhead->sent >= L->timeout_s) {
        struct req *r = L->rhead;
        struct on *on = r->on;
        char detail[256];
        snprintf(detail, sizeof(detail), "%s: no answer to %s within %u ms", on->addr,
                 op_wire[r->op], L->o->timeout_ms);
        req_unlink(L, r);
        bool attach = r->op == OP_ATTACH;
        req_fail(L, r, "timeout", detail);
        if (attach && on->state == S_ATTACHING && on->conn) {
            count_err(L, OP_ATTACH, "timeout", detail);
            on_gone(on, S_FAILED, L->failed, "attach-timeout", detail);
            conn_close(on->conn);
        }
    }
    check_progress(L);
}

static void check_progress(struct load *L)
{
    bool done = false;
    if (L->phase == P_CONNECT)
        done = L->unsettled == 0;
    else if (L->phase == P_DRAIN)
        done = L->mix_inflight == 0;
    else if (L->phase == P_SHUTDOWN)
        done = L->live == 0;
    if (done)
        ev_break(L->loop, EVBREAK_ALL);
}

static void phase_end_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct load *L = w->data;
    L->t_timed1 = mono_s();
    L->phase = P_DRAIN;
    for (size_t i = 0; i < L->n; i++)
        ev_timer_stop(loop, &L->ons[i].mix_timer);
    check_progress(L);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    struct load *L = w->data;
    if (L->phase != P_HOLD && L->phase != P_SHUTDOWN) {
        L->interrupted = true;
        errorf("interrupted (signal %d): reporting what happened so far", w->signum);
    }
    ev_break(loop, EVBREAK_ALL);
}

static size_t count_state(const struct load *L, enum on_state s)
{
    size_t n = 0;
    for (size_t i = 0; i < L->n; i++)
        n += L->ons[i].state == s;
    return n;
}

static void progress_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct load *L = w->data;
    char r[256], f[256];
    if (L->phase == P_CONNECT) {
        errorf("connecting: %" PRIu64 " of %zu attached, %lld refused (%s), %lld failed (%s), %zu "
               "waiting, %zu in progress",
               L->attached, L->n, (long long)json_sum(L->refused), codes_words(L->refused, r, 256),
               (long long)json_sum(L->failed), codes_words(L->failed, f, 256),
               count_state(L, S_QUEUED),
               count_state(L, S_CONNECTING) + count_state(L, S_ATTACHING) +
                   count_state(L, S_REDIRECTING));
    } else if (L->phase == P_TIMED || L->phase == P_DRAIN) {
        uint64_t sent = 0, ok = 0;
        for (int k = 0; k < MIX_OPS; k++) {
            sent += L->st[k].sent;
            ok += L->st[k].ok;
        }
        errorf("%.0f s: %" PRIu64 " requests sent, %" PRIu64 " ok, %zu in flight, %zu attached",
               mono_s() - L->t_timed0, sent, ok, L->mix_inflight, count_state(L, S_ATTACHED));
    }
}

/* ---- Report ------------------------------------------------------------------------------- */

static bool code_allowed(const struct load *L, const char *code)
{
    if (L->o->allow_shared && !strcmp(code, "replaced"))
        return true;
    for (size_t i = 0; i < L->o->allow_errors.n; i++)
        if (!strcmp(L->o->allow_errors.v[i], code))
            return true;
    return false;
}

static json_t *opstat_json(const struct opstat *st)
{
    return json_pack("{s:I, s:I, s:O, s:o}", "sent", (json_int_t)st->sent, "ok", (json_int_t)st->ok,
                     "errors", st->errors, "latency_ms", hist_json(&st->lat));
}

static void opstat_print(const char *label, const struct opstat *st)
{
    char e[512];
    printf("  %-10s %" PRIu64 " sent, %" PRIu64 " ok, %lld errors (%s); latency median %.3f ms, "
           "p99 %.3f ms, max %.3f ms\n",
           label, st->sent, st->ok, (long long)json_sum(st->errors),
           codes_words(st->errors, e, 512), hist_pct_ms(&st->lat, 50), hist_pct_ms(&st->lat, 99),
           (double)st->lat.max_us / 1000.0);
}

/* Prints the report; returns the exit status it stands for. */
static int report(struct load *L)
{
    const struct opts *o = L->o;
    char buf[1024], buf2[1024];
    size_t attached_now = count_state(L, S_ATTACHED), replaced = 0, not_attached = 0;
    for (size_t i = 0; i < L->n; i++) {
        const struct on *on = &L->ons[i];
        if (on->state == S_LOST && on->replaced)
            replaced++;
        if (on->state != S_ATTACHED && !(o->allow_shared && on->state == S_LOST && on->replaced))
            not_attached++;
    }
    json_t *by_sn = json_object();
    for (size_t i = 0; i < L->n; i++)
        if (L->ons[i].state == S_ATTACHED)
            count_code(by_sn, L->ons[i].addr);
    size_t queued = count_state(L, S_QUEUED);

    /* The timed mix, summed over types. */
    uint64_t sent = 0, ok = 0;
    json_t *errors = json_object();
    for (int k = 0; k < MIX_OPS; k++) {
        sent += L->st[k].sent;
        ok += L->st[k].ok;
        const char *c;
        json_t *v;
        json_object_foreach(L->st[k].errors, c, v)
        {
            json_t *have = json_object_get(errors, c);
            json_object_set_new(
                errors, c,
                json_integer((have ? json_integer_value(have) : 0) + json_integer_value(v)));
        }
    }
    double dur = L->t_timed1 > L->t_timed0 ? L->t_timed1 - L->t_timed0 : 0;
    double per_s = dur > 0 ? (double)ok / dur : 0;
    double target = (double)L->timed_nodes * o->rate;
    if (o->mix_total == 0 || L->t_timed0 == 0)
        target = 0;

    /* Verdict. */
    json_t *bad = json_object(); /* unallowed error codes over every request type */
    for (int k = 0; k < OP_N; k++) {
        if (k == OP_ATTACH)
            continue;
        const char *c;
        json_t *v;
        json_object_foreach(L->st[k].errors, c, v)
        {
            if (code_allowed(L, c))
                continue;
            json_t *have = json_object_get(bad, c);
            json_object_set_new(
                bad, c,
                json_integer((have ? json_integer_value(have) : 0) + json_integer_value(v)));
        }
    }
    bool pass = !L->interrupted && not_attached == 0 && json_object_size(bad) == 0;
    char why[1200] = "";
    if (L->interrupted)
        snprintf(why, sizeof(why), "interrupted");
    if (not_attached) {
        size_t u = strlen(why);
        snprintf(why + u, sizeof(why) - u, "%s%zu of %zu nodes not attached at the end",
                 u ? "; " : "", not_attached, L->n);
    }
    if (json_object_size(bad)) {
        size_t u = strlen(why);
        snprintf(why + u, sizeof(why) - u, "%serrors not allowed: %s", u ? "; " : "",
                 codes_words(bad, buf, sizeof(buf)));
    }
    long hwm = proc_status_kb("VmHWM");
    double per_link = L->attached && L->rss_settled_kb >= 0 && L->rss_before_kb >= 0
                          ? (double)(L->rss_settled_kb - L->rss_before_kb) / (double)L->attached
                          : 0;
    double per_id = L->il.n && L->rss_before_kb >= 0 && L->rss_start_kb >= 0
                        ? (double)(L->rss_before_kb - L->rss_start_kb) / (double)L->il.n
                        : 0;
    double cdur = L->t_connect1 - L->t_connect0;
    double cps = cdur > 0 ? (double)L->attempted / cdur : 0;

    if (o->json) {
        json_t *sns = json_array();
        for (size_t i = 0; i < o->sn.n; i++)
            json_array_append_new(sns, json_string(o->sn.v[i]));
        json_t *by_type = json_object();
        for (int k = 0; k < MIX_OPS; k++)
            if (o->mix[k] || L->st[k].sent)
                json_object_set_new(by_type, op_name[k], opstat_json(&L->st[k]));
        json_t *conns = json_pack(
            "{s:I, s:I, s:I, s:I, s:I, s:O, s:O, s:O, s:I, s:I, s:I, s:o, s:o, s:f, s:f}",
            "attempted", (json_int_t)L->attempted, "attached", (json_int_t)L->attached,
            "attached_at_end", (json_int_t)attached_now, "redirected", (json_int_t)L->redirected,
            "moves_followed", (json_int_t)L->moves_followed, "refused", L->refused, "failed",
            L->failed, "lost", L->lost, "replaced", (json_int_t)replaced, "redirect_limit",
            (json_int_t)L->redirect_limit, "not_started", (json_int_t)queued, "attached_by_sn",
            by_sn, "handshake_ms", hist_json(&L->handshake), "connect_seconds", round3(cdur),
            "connects_per_second", round3(cps));
        json_t *reqs = json_pack("{s:f, s:f, s:I, s:f, s:I, s:I, s:O, s:I, s:f, s:f, s:I, s:o}",
                                 "duration_s", round3(dur), "rate_per_node", o->rate, "nodes",
                                 (json_int_t)L->timed_nodes, "target_per_second", round3(target),
                                 "sent", (json_int_t)sent, "ok", (json_int_t)ok, "errors", errors,
                                 "skipped", (json_int_t)L->skipped, "per_second", round3(per_s),
                                 "sent_per_second", round3(dur > 0 ? (double)sent / dur : 0),
                                 "pending", (json_int_t)L->mix_inflight, "by_type", by_type);
        json_t *mem = json_pack(
            "{s:I, s:I, s:I, s:f, s:f, s:I, s:I}", "start", (json_int_t)L->rss_start_kb,
            "before_connect", (json_int_t)L->rss_before_kb, "after_attach",
            (json_int_t)L->rss_settled_kb, "per_identity", round3(per_id), "per_attached_link",
            round3(per_link), "hwm", (json_int_t)hwm, "cert_parses", (json_int_t)L->il.cert_parses);
        json_t *out = json_pack(
            "{s:b, s:b, s:s, s:I, s:I, s:I, s:b, s:o, s:o, s:o, s:o, s:o, s:o, s:O, s:I, s:o, "
            "s:O}",
            "ok", pass, "interrupted", L->interrupted, "verdict", pass ? "pass" : why, "nodes",
            (json_int_t)L->n, "identities", (json_int_t)L->il.n, "state_dirs",
            (json_int_t)L->il.dirs_read, "shared", L->n > L->il.n, "super_nodes", sns,
            "connections", conns, "requests", reqs, "seed", opstat_json(&L->st[OP_SEED]),
            "keepalive", opstat_json(&L->st[OP_KEEPALIVE]), "attach",
            opstat_json(&L->st[OP_ATTACH]), "indications", L->inds, "late_answers",
            (json_int_t)L->late, "memory_kb", mem, "examples", L->examples);
        json_decref(errors);
        json_decref(bad);
        char *s = out ? json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
        if (s)
            puts(s);
        else
            errorf("out of memory printing the report");
        free(s);
        json_decref(out);
        fflush(stdout);
        return pass ? 0 : 1;
    }

    printf("on_load: %zu nodes, %zu distinct identities (from %zu state directories)%s, %zu "
           "super node address%s\n",
           L->n, L->il.n, L->il.dirs_read, L->n > L->il.n ? ", shared" : "", o->sn.n,
           o->sn.n == 1 ? "" : "es");
    printf("connections: %" PRIu64 " attempted, %" PRIu64 " attached, %" PRIu64 " redirected "
           "(%" PRIu64 " of them moves), %lld refused (%s), %lld failed (%s)%s in %.3f s (%.1f "
           "connects per second)\n",
           L->attempted, L->attached, L->redirected, L->moves_followed,
           (long long)json_sum(L->refused), codes_words(L->refused, buf, sizeof(buf)),
           (long long)json_sum(L->failed), codes_words(L->failed, buf2, sizeof(buf2)),
           queued ? " (some never started)" : "", cdur, cps);
    if (queued)
        printf("  not started: %zu\n", queued);
    if (L->redirect_limit)
        printf("  gave up after %d redirects: %" PRIu64 "\n", MAX_REDIRECTS, L->redirect_limit);
    printf("  lost after attaching: %lld (%s)%s; attached at the end: %zu\n",
           (long long)json_sum(L->lost), codes_words(L->lost, buf, sizeof(buf)),
           replaced && o->allow_shared ? " (replacements expected: --allow-shared)" : "",
           attached_now);
    printf("  attached per super node: %s\n", codes_words(by_sn, buf, sizeof(buf)));
    printf("  handshake (TCP + TLS + hello): median %.3f ms, p99 %.3f ms, max %.3f ms\n",
           hist_pct_ms(&L->handshake, 50), hist_pct_ms(&L->handshake, 99),
           (double)L->handshake.max_us / 1000.0);
    printf("memory: VmRSS %ld kB at start, %ld kB with the identities loaded (%.1f kB per "
           "identity), %ld kB once all nodes were settled (%.1f kB per attached link); VmHWM %ld "
           "kB\n",
           L->rss_start_kb, L->rss_before_kb, per_id, L->rss_settled_kb, per_link, hwm);
    printf("requests: %.3f s at %g per node per second (target %.1f/s): %" PRIu64 " sent, "
           "%" PRIu64 " ok, %lld errors (%s), %" PRIu64 " skipped (window full), %zu unanswered; "
           "%.1f ok per second\n",
           dur, o->rate, target, sent, ok, (long long)json_sum(errors),
           codes_words(errors, buf, sizeof(buf)), L->skipped, L->mix_inflight, per_s);
    for (int k = 0; k < MIX_OPS; k++)
        if (o->mix[k] || L->st[k].sent)
            opstat_print(op_name[k], &L->st[k]);
    opstat_print("seed", &L->st[OP_SEED]);
    opstat_print("keepalive", &L->st[OP_KEEPALIVE]);
    opstat_print("attach", &L->st[OP_ATTACH]);
    if (json_object_size(L->inds))
        printf("indications from super nodes: %s\n", codes_words(L->inds, buf, sizeof(buf)));
    if (L->late)
        printf("answers after a timeout: %" PRIu64 "\n", L->late);
    const char *k;
    json_t *v;
    json_object_foreach(L->examples, k, v) printf("  first %s: %s\n", k, json_string_value(v));
    for (int op = 0; op < OP_N; op++)
        json_object_foreach(L->st[op].examples, k, v)
            printf("  first %s error %s: %s\n", op_name[op], k, json_string_value(v));
    printf("result: %s%s%s\n", pass ? "PASS" : "FAIL", pass ? "" : ": ", pass ? "" : why);
    json_decref(by_sn);
    json_decref(errors);
    json_decref(bad);
    fflush(stdout);
    return pass ? 0 : 1;
}

/* ---- main --------------------------------------------------------------------------------- */

static int raise_nofile(size_t need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        errorf("getrlimit(RLIMIT_NOFILE): %s", strerror(errno));
        return -1;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
        return 0;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
        struct rlimit up = {need, need};
        if (setrlimit(RLIMIT_NOFILE, &up) == 0)
            return 0;
        errorf("%zu connections need %zu file descriptors, but the hard limit (RLIMIT_NOFILE, "
               "ulimit -Hn) is %llu and cannot be raised here (%s): raise it or lower --nodes",
               need - SPARE_FDS, need, (unsigned long long)rl.rlim_max, strerror(errno));
        return -1;
    }
    rl.rlim_cur = need;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        errorf("cannot raise the file descriptor limit to %zu: %s", need, strerror(errno));
        return -1;
    }
    return 0;
}

static void free_all(struct load *L)
{
    for (int k = 0; k < OP_N; k++) {
        json_decref(L->st[k].errors);
        json_decref(L->st[k].examples);
    }
    json_decref(L->refused);
    json_decref(L->failed);
    json_decref(L->lost);
    json_decref(L->hold_lost);
    json_decref(L->examples);
    json_decref(L->inds);
    free(L->ons);
    for (size_t i = 0; i < L->il.n; i++)
        ident_free(&L->il.ids[i]);
    free(L->il.ids);
    free(L->il.overlay);
}

int main(int argc, char **argv)
{
    struct opts o;
    parse_args(argc, argv, &o);
    signal(SIGPIPE, SIG_IGN);
    log_init(PROG,
             o.verbose >= 3   ? LL_TRACE
             : o.verbose == 2 ? LL_DEBUG
             : o.verbose == 1 ? LL_INFO
                              : LL_ERROR,
             false);

    static struct load load;
    struct load *L = &load;
    L->o = &o;
    L->timeout_s = o.timeout_ms / 1000.0;
    L->rng = rec_seq_now() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
    L->refused = json_object();
    L->failed = json_object();
    L->lost = json_object();
    L->hold_lost = json_object();
    L->examples = json_object();
    L->inds = json_object();
    for (int k = 0; k < OP_N; k++) {
        L->st[k].errors = json_object();
        L->st[k].examples = json_object();
    }
    int ret = 1;

    /* Identities. */
    L->rss_start_kb = proc_status_kb("VmRSS");
    size_t want = o.nodes && !o.allow_shared ? o.nodes : SIZE_MAX;
    if (load_identities(&o, &L->il, want) < 0)
        goto out;
    if (L->il.n == 0) {
        errorf("no identity loaded");
        goto out;
    }
    L->n = o.nodes ? o.nodes : L->il.n;
    if (L->n > L->il.n && !o.allow_shared)
        usage_error("--nodes %zu but only %zu distinct identities (Node-IDs) in %zu state "
                    "directories: a super node keeps one attachment per Node-ID, so each "
                    "simulated node needs its own certificate (or give --allow-shared)",
                    L->n, L->il.n, L->il.dirs_read);
    {
        char extra[256] = "";
        if (L->il.dup_dirs || L->il.skipped_subdirs)
            snprintf(extra, sizeof(extra),
                     " (%zu skipped for repeating a Node-ID; %zu entries of --creds-dir "
                     "without " NODE_CREDS_CERT " ignored)",
                     L->il.dup_dirs, L->il.skipped_subdirs);
        errorf("%zu distinct identities (Node-IDs) loaded from %zu of %zu state "
               "directories%s; %zu simulated nodes over %zu super node address%s",
               L->il.n, L->il.dirs_read, L->il.dirs_total, extra, L->n, o.sn.n,
               o.sn.n == 1 ? "" : "es");
        if (L->n > L->il.n)
            errorf("--allow-shared: %zu nodes share %zu identities; the last link of each "
                   "identity replaces the earlier ones (protocol.md 5.1), so expect %zu "
                   "replaced and %zu attached at the end",
                   L->n, L->il.n, L->n - L->il.n, L->il.n);
    }
    L->lifetime_s = DEF_LIFETIME_S;
    if (L->il.max_lifetime_s > 0 && L->il.max_lifetime_s < L->lifetime_s)
        L->lifetime_s = L->il.max_lifetime_s;
    if (raise_nofile(L->n + SPARE_FDS) < 0)
        goto out;

    /* The nodes. */
    L->ons = calloc(L->n, sizeof(*L->ons));
    if (!L->ons) {
        errorf("out of memory for %zu nodes", L->n);
        goto out;
    }
    L->loop = EV_DEFAULT;
    for (size_t i = 0; i < L->n; i++) {
        struct on *on = &L->ons[i];
        on->L = L;
        on->idx = (uint32_t)i;
        on->id = &L->il.ids[i % L->il.n];
        snprintf(on->addr, sizeof(on->addr), "%s", o.sn.v[i % o.sn.n]);
        char name[REC_NAME_MAX + 1];
        snprintf(name, sizeof(name), "%s-%zu", rec_uri_aor(on->id->uri), i);
        nid_key(&on->key, RECORD_TYPE, name);
        ev_timer_init(&on->mix_timer, mix_cb, 1., 1.);
        on->mix_timer.data = on;
        ev_timer_init(&on->ka_timer, ka_cb, 1., 1.);
        on->ka_timer.data = on;
    }
    ev_timer_init(&L->connect_tick, connect_tick_cb, 0., CONNECT_TICK_S);
    L->connect_tick.data = L;
    ev_timer_init(&L->sweep, sweep_cb, SWEEP_S, SWEEP_S);
    L->sweep.data = L;
    ev_timer_init(&L->progress, progress_cb, PROGRESS_S, PROGRESS_S);
    L->progress.data = L;
    ev_timer_init(&L->phase_timer, phase_end_cb, 1., 0.);
    L->phase_timer.data = L;
    ev_signal_init(&L->sigint, signal_cb, SIGINT);
    L->sigint.data = L;
    ev_signal_init(&L->sigterm, signal_cb, SIGTERM);
    L->sigterm.data = L;
    ev_signal_start(L->loop, &L->sigint);
    ev_signal_start(L->loop, &L->sigterm);
    ev_timer_start(L->loop, &L->sweep);
    ev_timer_start(L->loop, &L->progress);

    /* Connect phase. */
    L->rss_before_kb = proc_status_kb("VmRSS");
    L->phase = P_CONNECT;
    L->unsettled = L->n;
    L->t_connect0 = mono_s();
    for (size_t i = 0; i < L->n; i++)
        on_enqueue(&L->ons[i]);
    ev_run(L->loop, 0);
    L->t_connect1 = mono_s();
    L->rss_settled_kb = proc_status_kb("VmRSS");

    /* Timed phase, then drain. */
    if (!L->interrupted && o.duration_s > 0 && count_state(L, S_ATTACHED) > 0) {
        L->phase = P_TIMED;
        L->t_timed0 = mono_s();
        for (size_t i = 0; i < L->n; i++)
            if (L->ons[i].state == S_ATTACHED) {
                L->timed_nodes++;
                start_mix(&L->ons[i]);
            }
        ev_timer_set(&L->phase_timer, o.duration_s, 0.);
        ev_timer_start(L->loop, &L->phase_timer);
        ev_run(L->loop, 0);
        if (L->phase == P_TIMED) { /* interrupted before the end */
            L->t_timed1 = mono_s();
            ev_timer_stop(L->loop, &L->phase_timer);
        }
    }
    ev_timer_stop(L->loop, &L->progress);
    ret = report(L);

    if (o.hold && !L->interrupted) {
        L->phase = P_HOLD;
        errorf("holding %zu links open with keepalives; SIGINT or SIGTERM ends", L->live);
        double t0 = mono_s();
        ev_run(L->loop, 0);
        char buf[512];
        errorf("held for %.1f s; links lost meanwhile: %lld (%s)", mono_s() - t0,
               (long long)json_sum(L->hold_lost), codes_words(L->hold_lost, buf, sizeof(buf)));
    }

    /* Close everything and let the closes finish. */
    L->phase = P_SHUTDOWN;
    ev_timer_stop(L->loop, &L->connect_tick);
    ev_timer_stop(L->loop, &L->phase_timer);
    for (size_t i = 0; i < L->n; i++) {
        struct on *on = &L->ons[i];
        stop_timers(on);
        if (on->conn && conn_get_state(on->conn) != CONN_CLOSING &&
            conn_get_state(on->conn) != CONN_CLOSED)
            conn_close(on->conn);
    }
    if (L->live)
        ev_run(L->loop, 0);
    ev_timer_stop(L->loop, &L->sweep);
    ev_signal_stop(L->loop, &L->sigint);
    ev_signal_stop(L->loop, &L->sigterm);
    while (L->rhead) {
        struct req *r = L->rhead;
        req_unlink(L, r);
        free(r);
    }
    if (L->live)
        errorf("%zu connections did not close in time", L->live);
out:
    free_all(L);
    list_free(&o.state_dirs);
    list_free(&o.creds_dirs);
    list_free(&o.sn);
    list_free(&o.allow_errors);
    return ret;
}
