/*
 * dhtctl: the command-line client for records (docs/protocol.md 4.5). It
 * signs records locally with a node's credentials and talks to super nodes
 * over the node-to-node transport (conn.h): `get`, `store` and `find`
 * requests, one at a time or many in flight (fill, check, bench). Users,
 * tests and benchmarks use it; every command has a --json form that prints
 * one JSON object per line.
 *
 * Structure: option parsing; credentials; a small request engine (links to
 * one or more super nodes, pending requests by tid with a timeout each); a
 * job driver that keeps at most `window` requests in flight and produces the
 * next request only when there is room, so memory stays bounded; then one
 * function per command.
 *
 * Exit status: 0 success, 1 runtime failure, 2 usage error.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "config.h"
#include "conn.h"
#include "cred.h"
#include "log.h"
#include "login_client.h"
#include "msg.h"
#include "nodeid.h"
#include "record.h"
#include "version.h"

#define PROG              "dhtctl"
#define DEF_TIMEOUT_MS    10000
#define DEF_MAX_FRAME     (1024 * 1024)
#define DEF_WINDOW        32
#define DEF_LIFETIME_S    3600
#define DEF_MAX_LIFETIME  86400
#define DEF_BENCH_TYPE    "dhtctl bench"
#define DEF_BENCH_PREFIX  "r"
#define REPORT_NAMES      20 /* names listed in check's missing/bad lists */
#define VERIFY_CACHE_SIZE 1024

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

/* Microseconds since 1970: the default freshness counter (protocol.md 4.4). */
/* Rounds to 3 decimals (for JSON output without binary noise). */
static double round3(double x)
{
    double s = x * 1000.0;
    long long r = (long long)(s < 0 ? s - 0.5 : s + 0.5);
    return (double)r / 1000.0;
}

/* Prints one JSON object as one line on stdout and releases it. */
static void print_json(json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
        free(s);
    } else {
        errorf("out of memory printing a result");
    }
    fflush(stdout);
    json_decref(o);
}

/* Compact JSON of any value into a malloc'd string ("?" copies on failure). */
static char *dump_any(const json_t *v)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    return s ? s : strdup("?");
}

static const char *jstr(const json_t *o, const char *member, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, member));
    return s ? s : dflt;
}

static long long jint(const json_t *o, const char *member, long long dflt)
{
    const json_t *v = json_object_get(o, member);
    return json_is_integer(v) ? (long long)json_integer_value(v) : dflt;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Latencies of answered requests (milliseconds); capacity fixed up front. */
struct lat {
    double *v;
    size_t n, cap;
};

static void lat_add(struct lat *l, double ms)
{
    if (l->n < l->cap)
        l->v[l->n++] = ms;
}

/* Nearest-rank percentile of the sorted values (p in 0..100); 0 when empty. */
static double lat_pct(const struct lat *l, double p)
{
    if (l->n == 0)
        return 0;
    size_t rank = (size_t)((p / 100.0) * (double)l->n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > l->n)
        rank = l->n;
    return l->v[rank - 1];
}

static json_t *lat_json(struct lat *l, bool with_max)
{
    qsort(l->v, l->n, sizeof(double), cmp_double);
    json_t *o =
        json_pack("{s:f, s:f}", "median", round3(lat_pct(l, 50)), "p99", round3(lat_pct(l, 99)));
    if (o && with_max)
        json_object_set_new(o, "max", json_real(round3(l->n ? l->v[l->n - 1] : 0)));
    return o;
}

/* Counts an error code in an object {"code": n}. */
static void count_error(json_t *errors, const char *code)
{
    json_t *v = json_object_get(errors, code);
    json_object_set_new(errors, code, json_integer(v ? json_integer_value(v) + 1 : 1));
}

/* "stale 2, timeout 1" (or "none") into a malloc'd string. */
static char *errors_words(const json_t *errors)
{
    size_t cap = 64, len = 0;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    s[0] = '\0';
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)errors, k, v)
    {
        size_t need = len + strlen(k) + 32;
        if (need > cap) {
            cap = need * 2;
            char *ns = realloc(s, cap);
            if (!ns) {
                free(s);
                return NULL;
            }
            s = ns;
        }
        len += (size_t)snprintf(s + len, cap - len, "%s%s %lld", len ? ", " : "", k,
                                (long long)json_integer_value(v));
    }
    if (!len) {
        free(s);
        return strdup("none");
    }
    return s;
}

/* ---- Command line ------------------------------------------------------------------------- */

enum cmd {
    CMD_NONE = 0,
    CMD_SIGN,
    CMD_PUT,
    CMD_SEND,
    CMD_GET,
    CMD_FIND,
    CMD_FILL,
    CMD_CHECK,
    CMD_BENCH,
};

static const char *const cmd_names[] = {
    [CMD_NONE] = "",     [CMD_SIGN] = "sign",   [CMD_PUT] = "put",
    [CMD_SEND] = "send", [CMD_GET] = "get",     [CMD_FIND] = "find",
    [CMD_FILL] = "fill", [CMD_CHECK] = "check", [CMD_BENCH] = "bench",
};

#define C(x) (1u << (x))

enum optid {
    /* global */
    OPT_STATE = 0,
    OPT_CERT,
    OPT_KEYFILE,
    OPT_CA,
    OPT_OVERLAY,
    OPT_SN,
    OPT_TIMEOUT,
    OPT_MAXFRAME,
    OPT_JSON,
    OPT_VERBOSE,
    OPT_HELP,
    OPT_VERSION,
    /* per command */
    OPT_TYPE,
    OPT_NAME,
    OPT_VALUE,
    OPT_REMOVE,
    OPT_SEQ,
    OPT_LIFETIME,
    OPT_NOUPDATE,
    OPT_MODE,
    OPT_KEYHEX,
    OPT_NOVERIFY,
    OPT_TARGET,
    OPT_COUNT,
    OPT_PREFIX,
    OPT_WINDOW,
    OPT_NAMES,
    OPT_N,
};

struct optdef {
    const char *name;
    bool arg;
    unsigned cmds; /* 0: a global option */
};

static const struct optdef optdefs[OPT_N] = {
    [OPT_STATE] = {"state", true, 0},
    [OPT_CERT] = {"cert", true, 0},
    [OPT_KEYFILE] = {"key", true, 0},
    [OPT_CA] = {"ca", true, 0},
    [OPT_OVERLAY] = {"overlay", true, 0},
    [OPT_SN] = {"sn", true, 0},
    [OPT_TIMEOUT] = {"timeout", true, 0},
    [OPT_MAXFRAME] = {"max-frame", true, 0},
    [OPT_JSON] = {"json", false, 0},
    [OPT_VERBOSE] = {"verbose", false, 0},
    [OPT_HELP] = {"help", false, 0},
    [OPT_VERSION] = {"version", false, 0},
    [OPT_TYPE] = {"type", true,
                  C(CMD_SIGN) | C(CMD_PUT) | C(CMD_GET) | C(CMD_FILL) | C(CMD_CHECK) |
                      C(CMD_BENCH)},
    [OPT_NAME] = {"name", true, C(CMD_SIGN) | C(CMD_PUT) | C(CMD_GET)},
    [OPT_VALUE] = {"value", true, C(CMD_SIGN) | C(CMD_PUT)},
    [OPT_REMOVE] = {"remove", false, C(CMD_SIGN) | C(CMD_PUT)},
    [OPT_SEQ] = {"seq", true, C(CMD_SIGN) | C(CMD_PUT)},
    [OPT_LIFETIME] = {"lifetime", true, C(CMD_SIGN) | C(CMD_PUT) | C(CMD_FILL) | C(CMD_BENCH)},
    [OPT_NOUPDATE] = {"no-update", false, C(CMD_SIGN) | C(CMD_PUT)},
    [OPT_MODE] = {"mode", true, C(CMD_PUT) | C(CMD_SEND) | C(CMD_FILL)},
    [OPT_KEYHEX] = {"key", true, C(CMD_GET)},
    [OPT_NOVERIFY] = {"no-verify", false, C(CMD_GET)},
    [OPT_TARGET] = {"target", true, C(CMD_FIND)},
    [OPT_COUNT] = {"count", true, C(CMD_FILL) | C(CMD_CHECK) | C(CMD_BENCH)},
    [OPT_PREFIX] = {"prefix", true, C(CMD_FILL) | C(CMD_CHECK) | C(CMD_BENCH)},
    [OPT_WINDOW] = {"window", true, C(CMD_FILL) | C(CMD_CHECK) | C(CMD_BENCH)},
    [OPT_NAMES] = {"names", true, C(CMD_BENCH)},
};

struct opts {
    enum cmd cmd;
    const char *bench_op; /* "get" or "update" */
    const char *val[OPT_N];
    bool given[OPT_N];
    int verbose;
    bool json;
    /* validated values */
    unsigned timeout_ms;
    size_t max_frame;
    char **sn; /* split --sn */
    size_t n_sn;
    char *sn_buf;
};

static void print_help(void)
{
    printf(
        "usage: dhtctl [--state DIR | --cert F --key F --ca F --overlay NAME] [--sn "
        "ADDR[,ADDR...]]\n"
        "              [--timeout MS] [--json] [-v] COMMAND [OPTIONS]\n"
        "Signs, stores and looks up records of a p2psip overlay through super nodes\n"
        "(docs/protocol.md 4.5). Records are signed here with the node's own key.\n"
        "\n"
        "Credentials (one of the two forms):\n"
        "  --state DIR          a node's state directory as \"supernode enroll\" writes it\n"
        "                       (key.pem, cert.pem, ca.pem, overlay.json, pin); the overlay\n"
        "                       name and the maximum record lifetime come from its document\n"
        "  --cert F --key F --ca F --overlay NAME\n"
        "                       explicit PEM files and overlay name; the maximum record\n"
        "                       lifetime is then 86400 s (sign needs no --ca)\n"
        "Global options (before the command, or after it; after \"get\", --key is the\n"
        "record key, so the key file must then come before the command):\n"
        "  --sn ADDR[,ADDR...]  numeric host:port of the super node(s) to talk to; required\n"
        "                       by every command but sign. put, send, get and find use the\n"
        "                       first address that connects; fill, check and bench connect\n"
        "                       to all of them (one connection each) and spread requests\n"
        "                       round-robin\n"
        "  --timeout MS         per request, and for connecting (default 10000)\n"
        "  --max-frame BYTES    largest frame sent or accepted (default 1048576; super\n"
        "                       nodes accept 65536 unless configured otherwise)\n"
        "  --json               machine output: one JSON object per line on stdout\n"
        "  -v, --verbose        log the transport and each request on stderr (repeatable)\n"
        "  -h, --help           this text\n"
        "  -V, --version        print the version\n"
        "\n"
        "Commands:\n"
        "  sign --type T --name N (--value JSON | --remove) [--seq S] [--lifetime SEC]\n"
        "       [--no-update]\n"
        "      Print the signed record envelope (one line of compact JSON); nothing is\n"
        "      sent. --seq defaults to microseconds since 1970; --lifetime to 3600 (or\n"
        "      the overlay's maximum when lower); expires = now + lifetime (0 or negative\n"
        "      makes an already expired record). --remove makes a removal statement.\n"
        "  put --type T --name N (--value JSON | --remove) [--mode add|update|remove]\n"
        "      [--seq S] [--lifetime SEC] [--no-update]\n"
        "      Sign and store. --mode defaults to update (remove with --remove).\n"
        "      Prints \"stored T|N (key K) at node ID in H hops\";\n"
        "      --json: {\"ok\":true,\"key\":K,\"node\":{\"id\",\"addr\"},\"hops\":H}.\n"
        "      Failure: \"dhtctl: put T|N: CODE: REASON\" on stderr, exit 1 (--json also\n"
        "      prints {\"ok\":false,\"code\":..,\"reason\":..} on stdout).\n"
        "  send [--mode add|update|remove]\n"
        "      Read record envelopes from stdin, one JSON object per line, and store each\n"
        "      in turn as is (mode default update); print one JSON line per input line:\n"
        "      {\"ok\":true,\"hops\":H,\"node\":{..}} or {\"ok\":false,\"code\":..,\"reason\":..}\n"
        "      (code invalid-input for a line that is not a JSON object: not sent).\n"
        "      Blank lines are skipped. Exit 0 once every line was answered, even with\n"
        "      errors; 1 when the connection cannot be opened or a request got no\n"
        "      answer (connection-closed, timeout, queue-full).\n"
        "  get (--key HEX | --type T --name N) [--no-verify]\n"
        "      Look up a key and verify each record against the overlay CA. Prints one\n"
        "      line per record \"OWNER SEQ EXPIRES VALUE\" (a record failing the check\n"
        "      starts with \"UNVERIFIED (CODE: REASON)\", and makes the exit status 1),\n"
        "      then \"K records from node ID in H hops\". --json: {\"ok\":true,\"key\":..,\n"
        "      "
        "\"node\":{..},\"hops\":H,\"records\":[{\"owner\",\"seq\",\"expires\",\"type\",\"name\",\n"
        "      \"value\",\"verified\",\"envelope\"}..]} (unverified ones add "
        "\"code\",\"reason\").\n"
        "  find --target HEX\n"
        "      Print the target's successor: \"successor of T: ID at ADDR (H hops)\";\n"
        "      --json: {\"ok\":true,\"node\":{..},\"succ\":[..],\"hops\":H}.\n"
        "  fill --count N --type T --prefix P [--window W] [--mode add|update]\n"
        "       [--lifetime SEC]\n"
        "      Store records named P0..P(N-1) with value {\"n\": i}, at most W (default 32)\n"
        "      requests in flight. Prints {\"count\",\"ok\",\"failed\",\"errors\":{CODE:n},\n"
        "      \"seconds\",\"per_second\" (stored per "
        "second),\"latency_ms\":{\"median\",\"p99\"}}\n"
        "      (or the same in words). Exit 1 if any failed. Records are signed as they\n"
        "      go, so latencies include waiting for the signer (bench update does not).\n"
        "  check --count N --type T --prefix P [--window W]\n"
        "      Get P0..P(N-1) and check that each holds exactly one record, verified,\n"
        "      owned by this node's URI, with value {\"n\": i}. Prints {\"count\",\"found\",\n"
        "      "
        "\"missing\":[..],\"bad\":[..],\"bad_detail\":[{\"name\",\"why\"}..],\"failed\":[..],\n"
        "      "
        "\"errors\":{..},\"hops_avg\",\"hops_max\",\"seconds\",\"per_second\",\"latency_ms\"}\n"
        "      (lists hold the lowest 20 names; failed: the get itself got an error;\n"
        "      per_second: answered gets per second).\n"
        "      Exit 1 if anything is missing, bad or failed.\n"
        "  bench get|update --count N [--window W] [--type T --prefix P] [--names M]\n"
        "        [--lifetime SEC]\n"
        "      update: sign N records P0..P(N-1) first (not timed), then time storing\n"
        "      them (mode update). get: time N gets of P(i mod M) (M defaults to N).\n"
        "      Type defaults to \"" DEF_BENCH_TYPE "\", prefix to \"" DEF_BENCH_PREFIX
        "\". Prints {\"op\",\"count\",\"ok\",\n"
        "      \"failed\",\"errors\",\"seconds\",\"per_second\" (successful requests per\n"
        "      second),\"latency_ms\":{\"median\",\"p99\",\"max\"}} (get adds \"empty\": answers\n"
        "      without records). Exit 1 if any failed.\n"
        "\n"
        "A request failing locally has code timeout (no answer within --timeout),\n"
        "connection-closed (the link went down with the request pending), queue-full or\n"
        "frame-too-large; other codes come from the super node (protocol.md 4.4, 4.5).\n"
        "When put, get or find cannot connect, --json prints {\"ok\":false} with code\n"
        "connect-failed, or not-a-supernode when the peer's certificate lacks the super\n"
        "node role (such a peer is never used).\n"
        "Exit status: 0 success, 1 failure, 2 usage error.\n"
        "\n"
        "Examples:\n"
        "  dhtctl --state /var/lib/p2psip/node --sn 192.0.2.7:7000 put \\\n"
        "      --type 'user location' --name alice@example.org --value '{\"contact\":\"...\"}'\n"
        "  dhtctl --state DIR --sn 192.0.2.7:7000 get --type 'user location' --name "
        "alice@example.org\n"
        "  dhtctl --state DIR sign --type t --name n --value 1 | dhtctl --state DIR --sn ADDR "
        "send\n");
}

static int find_opt(const char *name, size_t len, enum cmd cmd)
{
    /* The command's own options first: after "get", --key is the record key. */
    if (cmd != CMD_NONE)
        for (int i = 0; i < OPT_N; i++)
            if (optdefs[i].cmds & C(cmd) && strlen(optdefs[i].name) == len &&
                !strncmp(optdefs[i].name, name, len))
                return i;
    for (int i = 0; i < OPT_N; i++)
        if (optdefs[i].cmds == 0 && strlen(optdefs[i].name) == len &&
            !strncmp(optdefs[i].name, name, len))
            return i;
    return -1;
}

static bool is_command_option(const char *name, size_t len)
{
    for (int i = 0; i < OPT_N; i++)
        if (optdefs[i].cmds && strlen(optdefs[i].name) == len &&
            !strncmp(optdefs[i].name, name, len))
            return true;
    return false;
}

static void set_opt(struct opts *o, int id, const char *value)
{
    if (id == OPT_VERBOSE) {
        o->verbose++;
        return;
    }
    if (id == OPT_HELP) {
        print_help();
        exit(0);
    }
    if (id == OPT_VERSION) {
        printf("dhtctl (p2psip) %s, protocol version %d\n", P2P_VERSION, P2P_PROTOCOL_VERSION);
        exit(0);
    }
    if (o->given[id])
        usage_error("--%s given twice", optdefs[id].name);
    o->given[id] = true;
    o->val[id] = value ? value : "";
}

static void parse_args(int argc, char **argv, struct opts *o)
{
    bool operands_only = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!operands_only && !strcmp(a, "--")) {
            operands_only = true;
            continue;
        }
        if (!operands_only && a[0] == '-' && a[1] == '-') {
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            int id = find_opt(name, len, o->cmd);
            if (id < 0) {
                if (o->cmd == CMD_NONE && is_command_option(name, len))
                    usage_error("--%.*s goes after the command (see dhtctl --help)", (int)len,
                                name);
                if (o->cmd != CMD_NONE && is_command_option(name, len))
                    usage_error("--%.*s does not apply to %s", (int)len, name, cmd_names[o->cmd]);
                usage_error("unknown option --%.*s (see dhtctl --help)", (int)len, name);
            }
            const char *value = NULL;
            if (optdefs[id].arg) {
                if (eq)
                    value = eq + 1;
                else if (i + 1 < argc)
                    value = argv[++i];
                else
                    usage_error("--%s needs a value", optdefs[id].name);
            } else if (eq) {
                usage_error("--%s takes no value", optdefs[id].name);
            }
            set_opt(o, id, value);
            continue;
        }
        if (!operands_only && a[0] == '-' && a[1] != '\0') {
            for (const char *p = a + 1; *p; p++) {
                if (*p == 'v')
                    set_opt(o, OPT_VERBOSE, NULL);
                else if (*p == 'h')
                    set_opt(o, OPT_HELP, NULL);
                else if (*p == 'V')
                    set_opt(o, OPT_VERSION, NULL);
                else
                    usage_error("unknown option -%c (see dhtctl --help)", *p);
            }
            continue;
        }
        /* An operand: the command, or bench's operation. */
        if (o->cmd == CMD_NONE) {
            for (int c = CMD_SIGN; c <= CMD_BENCH; c++)
                if (!strcmp(a, cmd_names[c]))
                    o->cmd = (enum cmd)c;
            if (o->cmd == CMD_NONE)
                usage_error("unknown command \"%s\" (see dhtctl --help)", a);
        } else if (o->cmd == CMD_BENCH && !o->bench_op) {
            if (strcmp(a, "get") != 0 && strcmp(a, "update") != 0)
                usage_error("bench: unknown operation \"%s\": get or update", a);
            o->bench_op = a;
        } else {
            usage_error("%s: unexpected operand \"%s\"", cmd_names[o->cmd], a);
        }
    }
    o->json = o->given[OPT_JSON];
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

static uint64_t parse_u64(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9')
        usage_error("--%s: expected a decimal unsigned 64-bit number, not \"%s\"", opt, s);
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno)
        usage_error("--%s: expected a decimal unsigned 64-bit number, not \"%s\"", opt, s);
    return (uint64_t)v;
}

static void split_sn(struct opts *o)
{
    const char *list = o->val[OPT_SN];
    o->sn_buf = strdup(list);
    size_t n = 1;
    for (const char *p = list; *p; p++)
        n += *p == ',';
    o->sn = calloc(n, sizeof(char *));
    if (!o->sn_buf || !o->sn) {
        errorf("out of memory");
        exit(1);
    }
    char *save = NULL;
    for (char *t = strtok_r(o->sn_buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (cfg_parse_hostport(t, NULL, 0, NULL) != 0)
            usage_error("--sn: \"%s\" is not a numeric address like 192.0.2.7:7000 or [::1]:7000",
                        t);
        o->sn[o->n_sn++] = t;
    }
    if (o->n_sn == 0)
        usage_error("--sn: no address given");
}

static void check_type_name(const char *type, const char *name)
{
    size_t tl = strlen(type), nl = name ? strlen(name) : 1;
    if (tl < 1 || tl > REC_TYPE_MAX)
        usage_error("--type must be 1 to %d bytes", REC_TYPE_MAX);
    if (nl < 1 || nl > REC_NAME_MAX)
        usage_error("--name must be 1 to %d bytes", REC_NAME_MAX);
}

static bool mode_ok(const char *m, bool allow_remove)
{
    return !strcmp(m, "add") || !strcmp(m, "update") || (allow_remove && !strcmp(m, "remove"));
}

/* Checks what each command needs; everything here is a usage error. */
static void validate(struct opts *o)
{
    const char *const *v = o->val;
    if (o->cmd == CMD_NONE)
        usage_error("no command given (see dhtctl --help)");
    bool explicit_creds =
        o->given[OPT_CERT] || o->given[OPT_KEYFILE] || o->given[OPT_CA] || o->given[OPT_OVERLAY];
    if (o->given[OPT_STATE] && explicit_creds)
        usage_error("--state and --cert/--key/--ca/--overlay exclude each other");
    if (!o->given[OPT_STATE]) {
        if (!explicit_creds)
            usage_error("credentials needed: --state DIR, or --cert, --key, --ca and --overlay");
        if (!o->given[OPT_CERT] || !o->given[OPT_KEYFILE] || !o->given[OPT_OVERLAY])
            usage_error("--cert, --key and --overlay go together (or use --state DIR)");
        if (o->cmd != CMD_SIGN && !o->given[OPT_CA])
            usage_error("%s needs --ca with --cert/--key (or use --state DIR)", cmd_names[o->cmd]);
        size_t ol = strlen(v[OPT_OVERLAY]);
        if (ol < 1 || ol > MSG_OVERLAY_MAX)
            usage_error("--overlay must be 1 to %d bytes", MSG_OVERLAY_MAX);
    }
    o->timeout_ms = o->given[OPT_TIMEOUT]
                        ? (unsigned)parse_ll("timeout", v[OPT_TIMEOUT], 1, 3600000)
                        : DEF_TIMEOUT_MS;
    o->max_frame = o->given[OPT_MAXFRAME]
                       ? (size_t)parse_ll("max-frame", v[OPT_MAXFRAME], 1024, MSG_MAX_FRAME_LIMIT)
                       : DEF_MAX_FRAME;
    if (o->cmd == CMD_SIGN) {
        if (o->given[OPT_SN])
            usage_error("sign sends nothing: --sn does not apply");
    } else {
        if (!o->given[OPT_SN])
            usage_error("%s needs --sn ADDR[,ADDR...]", cmd_names[o->cmd]);
        split_sn(o);
    }

    switch (o->cmd) {
    case CMD_SIGN:
    case CMD_PUT:
        if (!o->given[OPT_TYPE] || !o->given[OPT_NAME])
            usage_error("%s needs --type and --name", cmd_names[o->cmd]);
        check_type_name(v[OPT_TYPE], v[OPT_NAME]);
        if (o->given[OPT_VALUE] && o->given[OPT_REMOVE])
            usage_error("--value and --remove exclude each other");
        if (!o->given[OPT_VALUE] && !o->given[OPT_REMOVE])
            usage_error("%s needs either --value JSON or --remove", cmd_names[o->cmd]);
        if (o->given[OPT_REMOVE] && o->given[OPT_NOUPDATE])
            usage_error("--no-update does not apply to a removal statement");
        if (o->given[OPT_VALUE]) {
            json_error_t jerr;
            json_t *value =
                json_loads(v[OPT_VALUE], JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
            if (!value)
                usage_error("--value is not JSON: %s", jerr.text);
            bool null = json_is_null(value);
            json_decref(value);
            if (null)
                usage_error("--value must not be null (use --remove for a removal statement)");
        }
        if (o->given[OPT_SEQ])
            parse_u64("seq", v[OPT_SEQ]);
        if (o->given[OPT_LIFETIME])
            parse_ll("lifetime", v[OPT_LIFETIME], -1000000000LL, 10000000000LL);
        if (o->given[OPT_MODE] && !mode_ok(v[OPT_MODE], true))
            usage_error("--mode: add, update or remove, not \"%s\"", v[OPT_MODE]);
        break;
    case CMD_SEND:
        if (o->given[OPT_MODE] && !mode_ok(v[OPT_MODE], true))
            usage_error("--mode: add, update or remove, not \"%s\"", v[OPT_MODE]);
        break;
    case CMD_GET:
        if (o->given[OPT_KEYHEX]) {
            if (o->given[OPT_TYPE] || o->given[OPT_NAME])
                usage_error("get takes --key HEX or --type and --name, not both");
            nid_t k;
            if (nid_from_hex(&k, v[OPT_KEYHEX]) != 0)
                usage_error("--key: expected 40 hex digits, not \"%s\"", v[OPT_KEYHEX]);
        } else {
            if (!o->given[OPT_TYPE] || !o->given[OPT_NAME])
                usage_error("get needs --key HEX, or --type and --name");
            check_type_name(v[OPT_TYPE], v[OPT_NAME]);
        }
        break;
    case CMD_FIND: {
        nid_t t;
        if (!o->given[OPT_TARGET])
            usage_error("find needs --target HEX");
        if (nid_from_hex(&t, v[OPT_TARGET]) != 0)
            usage_error("--target: expected 40 hex digits, not \"%s\"", v[OPT_TARGET]);
        break;
    }
    case CMD_FILL:
    case CMD_CHECK:
    case CMD_BENCH:
        if (o->cmd == CMD_BENCH && !o->bench_op)
            usage_error("bench needs an operation: get or update");
        if (!o->given[OPT_COUNT])
            usage_error("%s needs --count N", cmd_names[o->cmd]);
        parse_ll("count", v[OPT_COUNT], 1, 100000000);
        if (o->cmd != CMD_BENCH && (!o->given[OPT_TYPE] || !o->given[OPT_PREFIX]))
            usage_error("%s needs --type and --prefix", cmd_names[o->cmd]);
        if (o->given[OPT_TYPE])
            check_type_name(v[OPT_TYPE], NULL);
        if (o->given[OPT_PREFIX] && strlen(v[OPT_PREFIX]) > REC_NAME_MAX - 20)
            usage_error("--prefix must be at most %d bytes", REC_NAME_MAX - 20);
        if (o->given[OPT_WINDOW])
            parse_ll("window", v[OPT_WINDOW], 1, 65536);
        if (o->given[OPT_MODE] && !mode_ok(v[OPT_MODE], false))
            usage_error("--mode: add or update, not \"%s\"", v[OPT_MODE]);
        if (o->given[OPT_LIFETIME])
            parse_ll("lifetime", v[OPT_LIFETIME], 1, 10000000000LL);
        if (o->given[OPT_NAMES]) {
            if (strcmp(o->bench_op, "get") != 0)
                usage_error("--names applies to bench get only");
            parse_ll("names", v[OPT_NAMES], 1, 100000000);
        }
        if (o->given[OPT_LIFETIME] && o->cmd == CMD_BENCH && strcmp(o->bench_op, "update") != 0)
            usage_error("--lifetime applies to bench update only");
        break;
    default:
        break;
    }
}

/* ---- Credentials -------------------------------------------------------------------------- */

struct ctx {
    struct opts *o;
    struct node_creds creds; /* with --state */
    bool have_creds;
    gnutls_x509_privkey_t own_key; /* with explicit files */
    gnutls_x509_crt_t own_cert, own_ca;
    /* What the commands use (pointing into one of the above). */
    gnutls_x509_privkey_t key;
    gnutls_x509_crt_t cert, ca;
    const char *overlay;
    int64_t max_lifetime_s;
    const char *key_file, *cert_file, *ca_file;
    struct peer_identity self;
    struct rec_verifier *verifier;
};

static int load_creds(struct ctx *x)
{
    struct opts *o = x->o;
    char err[512];
    int r;
    if (o->given[OPT_STATE]) {
        if (node_creds_load(o->val[OPT_STATE], &x->creds, err, sizeof(err)) < 0) {
            errorf("%s", err);
            return -1;
        }
        x->have_creds = true;
        x->key = x->creds.key;
        x->cert = x->creds.cert;
        x->ca = x->creds.doc.ca_crt;
        x->overlay = x->creds.doc.overlay;
        x->max_lifetime_s = x->creds.doc.max_record_lifetime_s;
        x->key_file = x->creds.key_file;
        x->cert_file = x->creds.cert_file;
        x->ca_file = x->creds.ca_file;
        x->self = x->creds.id;
        return 0;
    }
    x->key_file = o->val[OPT_KEYFILE];
    x->cert_file = o->val[OPT_CERT];
    x->ca_file = o->given[OPT_CA] ? o->val[OPT_CA] : NULL;
    x->overlay = o->val[OPT_OVERLAY];
    x->max_lifetime_s = DEF_MAX_LIFETIME;
    if ((r = cred_key_load(&x->own_key, x->key_file)) < 0) {
        errorf("cannot read key %s: %s", x->key_file, gnutls_strerror(r));
        return -1;
    }
    if ((r = cred_cert_load(&x->own_cert, x->cert_file)) < 0) {
        errorf("cannot read certificate %s: %s", x->cert_file, gnutls_strerror(r));
        return -1;
    }
    if (x->ca_file && (r = cred_cert_load(&x->own_ca, x->ca_file)) < 0) {
        errorf("cannot read CA certificate %s: %s", x->ca_file, gnutls_strerror(r));
        return -1;
    }
    if ((r = cred_identity(x->own_cert, &x->self)) < 0) {
        errorf("cannot read the identity of %s: %s", x->cert_file, gnutls_strerror(r));
        return -1;
    }
    x->key = x->own_key;
    x->cert = x->own_cert;
    x->ca = x->own_ca;
    return 0;
}

static void free_creds(struct ctx *x)
{
    rec_verifier_free(x->verifier);
    if (x->have_creds)
        node_creds_free(&x->creds);
    if (x->own_key)
        gnutls_x509_privkey_deinit(x->own_key);
    if (x->own_cert)
        gnutls_x509_crt_deinit(x->own_cert);
    if (x->own_ca)
        gnutls_x509_crt_deinit(x->own_ca);
}

static struct rec_verifier *verifier(struct ctx *x)
{
    if (!x->verifier) {
        x->verifier = rec_verifier_new(x->ca, x->overlay, VERIFY_CACHE_SIZE);
        if (x->verifier && x->have_creds)
            rec_verifier_set_proxies(x->verifier, x->creds.doc.sip_proxies,
                                     x->creds.doc.n_sip_proxies);
    }
    return x->verifier;
}

static int64_t lifetime_of(const struct ctx *x)
{
    if (x->o->given[OPT_LIFETIME])
        return strtoll(x->o->val[OPT_LIFETIME], NULL, 10);
    return x->max_lifetime_s > 0 && x->max_lifetime_s < DEF_LIFETIME_S ? x->max_lifetime_s
                                                                       : DEF_LIFETIME_S;
}

/* Why the last sign_record() failed (for put --json). */
static const char *sign_code = "internal";
static char sign_reason[600];

/* Signs one record; prints the reason and returns -1 on failure. */
static int sign_record(struct ctx *x, const char *type, const char *name, json_t *value,
                       bool removal, bool no_update, uint64_t seq, int64_t lifetime,
                       struct record *out)
{
    char err[512];
    struct rec_params p = {.overlay = x->overlay,
                           .type = type,
                           .name = name,
                           .seq = seq,
                           .expires = (int64_t)time(NULL) + lifetime,
                           .no_update = no_update,
                           .removal = removal,
                           .value = value};
    int r = rec_sign(&p, x->key, x->cert, out, err, sizeof(err));
    if (r != REC_OK) {
        errorf("cannot sign %s|%s: %s: %s", type, name, rec_strcode(r), err);
        sign_code = rec_strcode(r);
        snprintf(sign_reason, sizeof(sign_reason), "cannot sign: %s", err);
        return -1;
    }
    return 0;
}

/* ---- Request engine ----------------------------------------------------------------------- */

/* How a request ended. */
struct answer {
    bool ok;          /* a "res" came */
    bool answered;    /* a "res" or an "err" came from the super node */
    json_t *body;     /* the "res" body (borrowed, valid during the callback) */
    const char *code; /* when !ok */
    const char *reason;
    double latency_ms; /* when answered */
};

typedef void (*req_done_fn)(void *ud, size_t idx, const struct answer *a);

struct client;

enum link_state { L_IDLE = 0, L_CONNECTING, L_OPEN, L_DOWN };

struct link {
    struct client *cl;
    const char *addr;
    struct conn *conn; /* NULL once on_close came */
    enum link_state state;
    char why[768];                    /* why it could not connect, or why it went down */
    char attach_tid[MSG_TID_LEN + 1]; /* our attach request, until it is answered */
};

struct req {
    struct req *hnext;
    struct client *cl;
    struct link *lk;
    char tid[MSG_TID_LEN + 1];
    double sent;
    ev_timer timer;
    req_done_fn done;
    void *ud;
    size_t idx;
};

struct client {
    struct ev_loop *loop;
    struct tls_ctx *tls;
    struct link *links;
    size_t n_links;
    size_t rr;
    double timeout_s;
    unsigned timeout_ms;
    size_t max_frame;
    struct req **buckets;
    size_t mask;
    size_t in_flight;
    size_t connecting; /* links in L_CONNECTING */
    size_t live;       /* connections whose on_close has not come yet */
    char last_down[768];
};

static size_t tid_hash(const char *tid)
{
    uint64_t h = 1469598103934665603ULL;
    for (const char *p = tid; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    return (size_t)h;
}

static void req_insert(struct client *cl, struct req *r)
{
    size_t b = tid_hash(r->tid) & cl->mask;
    r->hnext = cl->buckets[b];
    cl->buckets[b] = r;
    cl->in_flight++;
}

/* Unlinks and returns the pending request with this tid on this link, or NULL. */
static struct req *req_take(struct client *cl, const char *tid, const struct link *lk)
{
    for (struct req **pp = &cl->buckets[tid_hash(tid) & cl->mask]; *pp; pp = &(*pp)->hnext) {
        struct req *r = *pp;
        if (r->lk == lk && !strcmp(r->tid, tid)) {
            *pp = r->hnext;
            cl->in_flight--;
            ev_timer_stop(cl->loop, &r->timer);
            return r;
        }
    }
    return NULL;
}

static void req_finish(struct req *r, const struct answer *a)
{
    req_done_fn done = r->done;
    void *ud = r->ud;
    size_t idx = r->idx;
    free(r);
    done(ud, idx, a);
}

static void req_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct req *r = w->data;
    struct client *cl = r->cl;
    if (req_take(cl, r->tid, r->lk) != r)
        return; /* cannot happen: a finished request has no timer running */
    char reason[256];
    snprintf(reason, sizeof(reason), "no answer from %s within %u ms", r->lk->addr, cl->timeout_ms);
    log_debug(PROG, "request %s to %s timed out", r->tid, r->lk->addr);
    struct answer a = {.code = "timeout", .reason = reason};
    req_finish(r, &a);
}

/* Fails every request pending on `lk` (its connection went down). */
static void fail_pending(struct client *cl, struct link *lk, const char *reason)
{
    struct req *list = NULL;
    for (size_t b = 0; b <= cl->mask; b++) {
        for (struct req **pp = &cl->buckets[b]; *pp;) {
            struct req *r = *pp;
            if (r->lk == lk) {
                *pp = r->hnext;
                cl->in_flight--;
                ev_timer_stop(cl->loop, &r->timer);
                r->hnext = list;
                list = r;
            } else {
                pp = &r->hnext;
            }
        }
    }
    while (list) {
        struct req *r = list;
        list = r->hnext;
        struct answer a = {.code = "connection-closed", .reason = reason};
        req_finish(r, &a);
    }
}

static void link_open(struct conn *c, void *ud)
{
    struct link *lk = ud;
    struct client *cl = lk->cl;
    const struct peer_identity *id = conn_peer(c);
    if (!id || !(id->roles & ROLE_SUPERNODE)) {
        cl->connecting--;
        char who[600];
        if (id)
            cred_identity_str(id, who, sizeof(who));
        else
            snprintf(who, sizeof(who), "unknown identity");
        snprintf(lk->why, sizeof(lk->why), "%s is not a super node: %s", lk->addr, who);
        lk->state = L_DOWN;
        conn_close(c);
        return;
    }
    if (log_enabled(LL_INFO)) {
        char who[600];
        log_info(PROG, "connected to %s: %s", lk->addr, cred_identity_str(id, who, sizeof(who)));
    }
    /* An ordinary node attaches before it asks for anything (docs/protocol.md 5.1). */
    msg_new_tid(lk->attach_tid);
    if (conn_send(c, "attach", MSG_REQ, lk->attach_tid, NULL) != 0) {
        cl->connecting--;
        snprintf(lk->why, sizeof(lk->why), "%s: cannot send the attach request", lk->addr);
        lk->state = L_DOWN;
        conn_close(c);
    }
}

/* The answer to our attach: the link is usable, or refused (full, unhealthy: alternates). */
static void attach_answer(struct link *lk, const struct msg *m)
{
    struct client *cl = lk->cl;
    lk->attach_tid[0] = '\0';
    cl->connecting--;
    if (m->kind == MSG_RES) {
        lk->state = L_OPEN;
        return;
    }
    snprintf(lk->why, sizeof(lk->why), "%s refused to attach us: %s: %s", lk->addr,
             jstr(m->body, "code", "error"), jstr(m->body, "reason", ""));
    lk->state = L_DOWN;
    conn_close(lk->conn);
}

static void link_message(struct conn *c, const struct msg *m, void *ud)
{
    struct link *lk = ud;
    struct client *cl = lk->cl;
    if (m->kind != MSG_RES && m->kind != MSG_ERR)
        return;
    if (lk->attach_tid[0] && !strcmp(m->tid, lk->attach_tid)) {
        attach_answer(lk, m);
        return;
    }
    struct req *r = req_take(cl, m->tid, lk);
    if (!r) {
        log_debug(PROG, "%s: answer for unknown tid %s (late, after a timeout?)", lk->addr, m->tid);
        return;
    }
    struct answer a = {.answered = true, .latency_ms = (mono_s() - r->sent) * 1000.0};
    if (m->kind == MSG_RES) {
        a.ok = true;
        a.body = m->body;
    } else {
        a.code = jstr(m->body, "code", "error");
        a.reason = jstr(m->body, "reason", "");
    }
    log_debug(PROG, "%s: %s for %s after %.3f ms%s%s", lk->addr, a.ok ? "res" : "err", r->tid,
              a.latency_ms, a.ok ? "" : ": ", a.ok ? "" : a.code);
    req_finish(r, &a);
}

static void link_close(struct conn *c, enum conn_close_reason why, const char *detail, void *ud)
{
    struct link *lk = ud;
    struct client *cl = lk->cl;
    const char *d = detail && *detail ? detail : conn_close_reason_str(why);
    lk->conn = NULL;
    cl->live--;
    if (lk->state == L_CONNECTING) {
        cl->connecting--;
        lk->state = L_DOWN;
        if (!strncmp(d, "cannot connect to ", 18))
            snprintf(lk->why, sizeof(lk->why), "%s", d);
        else
            snprintf(lk->why, sizeof(lk->why), "cannot connect to %s: %s", lk->addr, d);
        return;
    }
    if (lk->state == L_OPEN) {
        lk->state = L_DOWN;
        snprintf(lk->why, sizeof(lk->why), "connection to %s closed: %s", lk->addr, d);
        if (why != CONN_CLOSED_LOCAL)
            log_info(PROG, "%s", lk->why);
        snprintf(cl->last_down, sizeof(cl->last_down), "%s", lk->why);
        fail_pending(cl, lk, lk->why);
    }
}

static const struct conn_cbs link_cbs = {
    .on_open = link_open, .on_message = link_message, .on_close = link_close};

static int client_init(struct client *cl, struct ctx *x, size_t window)
{
    struct opts *o = x->o;
    char err[512];
    memset(cl, 0, sizeof(*cl));
    struct tls_config tc = {.ca_file = x->ca_file,
                            .cert_file = x->cert_file,
                            .key_file = x->key_file,
                            .overlay = x->overlay,
                            .handshake_timeout_ms = o->timeout_ms,
                            .idle_timeout_ms = 0,
                            .max_frame = o->max_frame};
    cl->tls = tls_ctx_new(&tc, err, sizeof(err));
    if (!cl->tls) {
        errorf("%s", err);
        return -1;
    }
    cl->timeout_ms = o->timeout_ms;
    cl->timeout_s = (double)o->timeout_ms / 1000.0;
    cl->max_frame = o->max_frame;
    size_t nb = 64;
    while (nb < 2 * window)
        nb *= 2;
    cl->buckets = calloc(nb, sizeof(*cl->buckets));
    cl->mask = nb - 1;
    cl->n_links = o->n_sn;
    cl->links = calloc(cl->n_links, sizeof(*cl->links));
    cl->loop = ev_loop_new(EVFLAG_AUTO);
    if (!cl->buckets || !cl->links || !cl->loop) {
        errorf("out of memory");
        return -1;
    }
    for (size_t i = 0; i < cl->n_links; i++) {
        cl->links[i].cl = cl;
        cl->links[i].addr = o->sn[i];
    }
    snprintf(cl->last_down, sizeof(cl->last_down), "not connected");
    return 0;
}

static void link_start(struct client *cl, struct link *lk)
{
    char err[512];
    lk->conn = conn_connect(cl->loop, cl->tls, lk->addr, &link_cbs, lk, err, sizeof(err));
    if (!lk->conn) {
        lk->state = L_DOWN;
        snprintf(lk->why, sizeof(lk->why), "cannot connect to %s: %s", lk->addr, err);
        return;
    }
    lk->state = L_CONNECTING;
    cl->connecting++;
    cl->live++;
}

/*
 * Opens links. all: every address must connect (fill, check, bench); else the
 * addresses are tried in order until one connects. Prints why each attempt
 * failed; returns 0 when what was needed is open, else -1 with `why` holding
 * the last reason and `code` the matching code.
 */
static int client_connect(struct client *cl, bool all, const char **code, char *why, size_t whylen)
{
    size_t opened = 0;
    *code = "connect-failed";
    for (size_t i = 0; i < cl->n_links; i++) {
        if (all) {
            for (size_t k = 0; k < cl->n_links; k++)
                link_start(cl, &cl->links[k]);
        } else {
            link_start(cl, &cl->links[i]);
        }
        while (cl->connecting > 0)
            ev_run(cl->loop, EVRUN_ONCE);
        size_t first = all ? 0 : i, last = all ? cl->n_links : i + 1;
        for (size_t k = first; k < last; k++) {
            struct link *lk = &cl->links[k];
            if (lk->state == L_OPEN) {
                opened++;
                continue;
            }
            errorf("%s", lk->why);
            snprintf(why, whylen, "%s", lk->why);
            if (strstr(lk->why, "is not a super node"))
                *code = "not-a-supernode";
        }
        if (all)
            return opened == cl->n_links ? 0 : -1;
        if (opened)
            return 0;
    }
    return -1;
}

/* Closes every link and runs the loop until all are gone; frees everything. */
static void client_free(struct client *cl)
{
    if (cl->loop) {
        for (size_t i = 0; i < cl->n_links; i++)
            if (cl->links[i].conn)
                conn_close(cl->links[i].conn);
        while (cl->live > 0)
            ev_run(cl->loop, EVRUN_ONCE);
        /* Nothing can be pending now: on_close failed whatever was. */
        ev_loop_destroy(cl->loop);
    }
    free(cl->buckets);
    free(cl->links);
    tls_ctx_free(cl->tls);
    memset(cl, 0, sizeof(*cl));
}

/*
 * Sends a request on the next open link (round-robin): either `type` + `body`
 * (body reference not taken), or an already encoded `frame` whose tid is
 * `frame_tid`. Returns 0 when it is in flight (`done` comes later, from the
 * loop), or -1 with `code`/`reason` set when it could not be sent (`done` is
 * not called).
 */
static int client_send(struct client *cl, const char *type, json_t *body, const uint8_t *frame,
                       size_t flen, const char *frame_tid, req_done_fn done, void *ud, size_t idx,
                       const char **code, char *reason, size_t rlen)
{
    struct link *lk = NULL;
    for (size_t i = 0; i < cl->n_links; i++) {
        struct link *cand = &cl->links[(cl->rr + i) % cl->n_links];
        if (cand->state == L_OPEN) {
            lk = cand;
            cl->rr = (size_t)(cand - cl->links) + 1;
            break;
        }
    }
    if (!lk) {
        *code = "connection-closed";
        snprintf(reason, rlen, "no open connection to a super node (%s)", cl->last_down);
        return -1;
    }
    struct req *r = calloc(1, sizeof(*r));
    if (!r) {
        *code = "internal";
        snprintf(reason, rlen, "out of memory");
        return -1;
    }
    int rc;
    if (frame) {
        snprintf(r->tid, sizeof(r->tid), "%s", frame_tid);
        rc = conn_send_frame(lk->conn, frame, flen);
    } else {
        msg_new_tid(r->tid);
        rc = conn_send(lk->conn, type, MSG_REQ, r->tid, body);
    }
    if (rc != 0) {
        free(r);
        switch (rc) {
        case CONN_ERR_QUEUE_FULL:
            *code = "queue-full";
            snprintf(reason, rlen, "the write queue to %s is full", lk->addr);
            break;
        case CONN_ERR_ENCODE:
            *code = "frame-too-large";
            snprintf(reason, rlen, "the request does not fit in a frame of %zu bytes",
                     cl->max_frame);
            break;
        default:
            *code = "connection-closed";
            snprintf(reason, rlen, "connection to %s is not open", lk->addr);
            break;
        }
        return -1;
    }
    r->cl = cl;
    r->lk = lk;
    r->done = done;
    r->ud = ud;
    r->idx = idx;
    r->sent = mono_s();
    ev_now_update(cl->loop); /* the loop's clock is stale after a burst of signing */
    ev_timer_init(&r->timer, req_timeout, cl->timeout_s, 0.);
    r->timer.data = r;
    ev_timer_start(cl->loop, &r->timer);
    req_insert(cl, r);
    log_debug(PROG, "%s: sent %s %s", lk->addr, frame ? "frame" : type, r->tid);
    return 0;
}

/* ---- Jobs: many requests with a bounded window -------------------------------------------- */

/* What job->make produces for one request. */
struct job_item {
    const char *type;
    json_t *body;         /* owned by the item: released after sending */
    const uint8_t *frame; /* or an encoded frame (borrowed) with its tid */
    size_t flen;
    const char *tid;
    const char *code; /* MAKE_FAIL: why, e.g. "invalid-input" */
    char reason[1024];
};

enum { MAKE_OK = 0, MAKE_FAIL = -1, MAKE_EOF = 1 };

struct job {
    struct client *cl;
    size_t count; /* SIZE_MAX: until make() says MAKE_EOF */
    size_t window;
    size_t issued, completed;
    bool eof, pumping, repump;
    int (*make)(struct job *j, size_t idx, struct job_item *it);
    void (*finish)(struct job *j, size_t idx, const struct answer *a);
    void *ud;
};

static void job_pump(struct job *j);

static void job_done(void *ud, size_t idx, const struct answer *a)
{
    struct job *j = ud;
    j->finish(j, idx, a);
    j->completed++;
    job_pump(j);
}

static void job_pump(struct job *j)
{
    if (j->pumping) {
        j->repump = true;
        return;
    }
    j->pumping = true;
    do {
        j->repump = false;
        while (!j->eof && j->issued < j->count && j->issued - j->completed < j->window) {
            size_t idx = j->issued;
            struct job_item it = {.code = "internal"};
            int r = j->make(j, idx, &it);
            if (r == MAKE_EOF) {
                j->eof = true;
                break;
            }
            j->issued++;
            if (r == MAKE_OK) {
                int rc = client_send(j->cl, it.type, it.body, it.frame, it.flen, it.tid, job_done,
                                     j, idx, &it.code, it.reason, sizeof(it.reason));
                json_decref(it.body);
                if (rc == 0)
                    continue;
            }
            struct answer a = {.code = it.code, .reason = it.reason};
            j->finish(j, idx, &a);
            j->completed++;
        }
    } while (j->repump);
    j->pumping = false;
}

static bool job_finished(const struct job *j)
{
    return (j->eof || j->issued >= j->count) && j->completed == j->issued;
}

static void job_run(struct job *j)
{
    job_pump(j);
    while (!job_finished(j))
        ev_run(j->cl->loop, EVRUN_ONCE);
}

/* ---- Single requests (put, get, find) ----------------------------------------------------- */

struct single {
    const char *type;
    json_t *body;
    bool ok;
    json_t *res; /* the res body (reference owned) */
    char code[64];
    char reason[1024];
};

static int single_make(struct job *j, size_t idx, struct job_item *it)
{
    struct single *s = j->ud;
    it->type = s->type;
    it->body = json_incref(s->body);
    return MAKE_OK;
}

static void single_finish(struct job *j, size_t idx, const struct answer *a)
{
    struct single *s = j->ud;
    s->ok = a->ok;
    if (a->ok) {
        s->res = json_incref(a->body);
    } else {
        snprintf(s->code, sizeof(s->code), "%s", a->code ? a->code : "error");
        snprintf(s->reason, sizeof(s->reason), "%s", a->reason ? a->reason : "");
    }
}

/*
 * Connects (first address that works) and runs one request. Returns 0 when
 * it was answered or failed (s->ok, s->code), -1 when no connection opened
 * (s->code/reason say why; the reason was printed already).
 */
static int single_request(struct ctx *x, struct single *s)
{
    struct client cl;
    const char *code;
    int ret = -1;
    if (client_init(&cl, x, 1) == 0) {
        if (client_connect(&cl, false, &code, s->reason, sizeof(s->reason)) == 0) {
            struct job j = {.cl = &cl,
                            .count = 1,
                            .window = 1,
                            .make = single_make,
                            .finish = single_finish,
                            .ud = s};
            job_run(&j);
            ret = 0;
        } else {
            snprintf(s->code, sizeof(s->code), "%s", code);
        }
    } else {
        snprintf(s->code, sizeof(s->code), "internal");
        snprintf(s->reason, sizeof(s->reason), "cannot set up TLS");
    }
    client_free(&cl);
    return ret;
}

static void print_failure_json(const struct single *s)
{
    print_json(json_pack("{s:b, s:s, s:s}", "ok", 0, "code", s->code, "reason", s->reason));
}

/* ---- sign, put ---------------------------------------------------------------------------- */

/* Builds the record of sign/put from the options; -1 after printing why. */
static int record_from_opts(struct ctx *x, struct record *rec)
{
    struct opts *o = x->o;
    json_t *value = NULL;
    if (o->given[OPT_VALUE]) {
        /* validate() checked it parses and is not null */
        value = json_loads(o->val[OPT_VALUE], JSON_DECODE_ANY, NULL);
        if (!value) {
            errorf("out of memory");
            return -1;
        }
    }
    uint64_t seq = o->given[OPT_SEQ] ? parse_u64("seq", o->val[OPT_SEQ]) : rec_seq_now();
    int r = sign_record(x, o->val[OPT_TYPE], o->val[OPT_NAME], value, o->given[OPT_REMOVE],
                        o->given[OPT_NOUPDATE], seq, lifetime_of(x), rec);
    json_decref(value);
    return r;
}

static int cmd_sign(struct ctx *x)
{
    struct record rec;
    if (record_from_opts(x, &rec) < 0)
        return 1;
    char *s = json_dumps(rec.envelope, JSON_COMPACT);
    rec_free(&rec);
    if (!s) {
        errorf("out of memory");
        return 1;
    }
    puts(s);
    free(s);
    return 0;
}

static int cmd_put(struct ctx *x)
{
    struct opts *o = x->o;
    struct record rec;
    if (record_from_opts(x, &rec) < 0) {
        if (o->json)
            print_json(
                json_pack("{s:b, s:s, s:s}", "ok", 0, "code", sign_code, "reason", sign_reason));
        return 1;
    }
    const char *mode =
        o->given[OPT_MODE] ? o->val[OPT_MODE] : (o->given[OPT_REMOVE] ? "remove" : "update");
    char khex[NID_HEX_LEN + 1];
    nid_to_hex(&rec.key, khex);
    struct single s = {.type = "store",
                       .body = json_pack("{s:s, s:O}", "mode", mode, "record", rec.envelope)};
    rec_free(&rec);
    if (!s.body) {
        errorf("out of memory");
        return 1;
    }
    int ret = 1;
    if (single_request(x, &s) < 0) {
        if (o->json)
            print_failure_json(&s);
    } else if (!s.ok) {
        errorf("put %s|%s: %s: %s", o->val[OPT_TYPE], o->val[OPT_NAME], s.code, s.reason);
        if (o->json)
            print_failure_json(&s);
    } else {
        json_t *node = json_object_get(s.res, "node");
        long long hops = jint(s.res, "hops", -1);
        if (o->json)
            print_json(json_pack("{s:b, s:s, s:O?, s:I}", "ok", 1, "key", khex, "node", node,
                                 "hops", (json_int_t)hops));
        else
            printf("stored %s|%s (key %s) at node %s in %lld hops\n", o->val[OPT_TYPE],
                   o->val[OPT_NAME], khex, jstr(node, "id", "?"), hops);
        ret = 0;
    }
    json_decref(s.body);
    json_decref(s.res);
    return ret;
}

/* ---- send --------------------------------------------------------------------------------- */

struct send_state {
    const char *mode;
    char *line;
    size_t cap;
    size_t lineno;
    bool lost; /* a request got no answer: the link went down or it timed out */
};

static int send_make(struct job *j, size_t idx, struct job_item *it)
{
    struct send_state *ss = j->ud;
    for (;;) {
        ssize_t n = getline(&ss->line, &ss->cap, stdin);
        if (n < 0)
            return MAKE_EOF;
        ss->lineno++;
        while (n > 0 && (ss->line[n - 1] == '\n' || ss->line[n - 1] == '\r'))
            ss->line[--n] = '\0';
        if (strspn(ss->line, " \t") == (size_t)n)
            continue; /* blank line */
        json_error_t jerr;
        json_t *rec = json_loadb(ss->line, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
        if (!rec || !json_is_object(rec)) {
            it->code = "invalid-input";
            snprintf(it->reason, sizeof(it->reason), "line %zu: %s", ss->lineno,
                     rec ? "not a JSON object" : jerr.text);
            json_decref(rec);
            return MAKE_FAIL;
        }
        it->type = "store";
        it->body = json_pack("{s:s, s:o}", "mode", ss->mode, "record", rec);
        if (!it->body) {
            it->code = "internal";
            snprintf(it->reason, sizeof(it->reason), "out of memory");
            return MAKE_FAIL;
        }
        return MAKE_OK;
    }
}

static void send_finish(struct job *j, size_t idx, const struct answer *a)
{
    struct send_state *ss = j->ud;
    if (!a->answered && a->code &&
        (!strcmp(a->code, "connection-closed") || !strcmp(a->code, "timeout") ||
         !strcmp(a->code, "queue-full")))
        ss->lost = true;
    if (a->ok)
        print_json(json_pack("{s:b, s:I, s:O?}", "ok", 1, "hops",
                             (json_int_t)jint(a->body, "hops", -1), "node",
                             json_object_get(a->body, "node")));
    else
        print_json(json_pack("{s:b, s:s, s:s}", "ok", 0, "code", a->code ? a->code : "error",
                             "reason", a->reason ? a->reason : ""));
}

static int cmd_send(struct ctx *x)
{
    struct opts *o = x->o;
    struct send_state ss = {.mode = o->given[OPT_MODE] ? o->val[OPT_MODE] : "update"};
    struct client cl;
    const char *code;
    char why[768];
    int ret = 1;
    if (client_init(&cl, x, 1) == 0 && client_connect(&cl, false, &code, why, sizeof(why)) == 0) {
        struct job j = {.cl = &cl,
                        .count = SIZE_MAX,
                        .window = 1,
                        .make = send_make,
                        .finish = send_finish,
                        .ud = &ss};
        job_run(&j);
        ret = ss.lost ? 1 : 0;
    }
    client_free(&cl);
    free(ss.line);
    return ret;
}

/* ---- get ---------------------------------------------------------------------------------- */

/*
 * Parses and (unless no_verify) verifies one record of a get answer for
 * `key` (and `type` and `name` when not NULL: rec_answers). Returns REC_OK, or
 * a negative code with `err`; *parsed tells whether `r` holds a parsed record
 * (rec_free it).
 */
static int check_record(struct ctx *x, json_t *env, const nid_t *key, const char *type,
                        const char *name, bool no_verify, struct record *r, bool *parsed, char *err,
                        size_t errlen)
{
    *parsed = false;
    if (!json_is_object(env)) {
        snprintf(err, errlen, "the record is not a JSON object");
        return REC_E_MALFORMED;
    }
    int st = rec_parse(env, 0, r, err, errlen);
    if (st != REC_OK)
        return st;
    *parsed = true;
    st = rec_answers(r, key, type, name, err, errlen);
    if (st != REC_OK)
        return st;
    if (no_verify)
        return REC_OK;
    struct rec_verifier *v = verifier(x);
    if (!v) {
        snprintf(err, errlen, "out of memory");
        return REC_E_NOMEM;
    }
    return rec_verify(v, r, time(NULL), x->max_lifetime_s, err, errlen);
}

/*
 * A key whose records do not fit one answer comes in pages (docs/protocol.md
 * 4.5: "more", and "after" to ask on with). get reads them all on one
 * connection, at most GET_MAX_PAGES (about 2 MiB of records; the default key
 * quota of 32 owners of 4 KB fits in 3). A page that does not move on
 * ("after" not past the previous one, or no record), or the bound reached,
 * ends the reading with what was read, marked incomplete.
 */
#define GET_MAX_PAGES 32

struct pget {
    const char *khex;
    json_t *records; /* the envelopes of every page read */
    json_t *last;    /* the last page's answer (node, hops) */
    char after[REC_OWNER_MAX + 1];
    unsigned pages;
    bool next, ok, incomplete;
    char code[64];
    char reason[1024];
};

static int pget_make(struct job *j, size_t idx, struct job_item *it)
{
    struct pget *g = j->ud;
    if (idx > 0 && !g->next)
        return MAKE_EOF;
    g->next = false;
    it->type = "get";
    it->body = json_pack("{s:s}", "key", g->khex);
    if (it->body && g->after[0])
        json_object_set_new(it->body, "after", json_string(g->after));
    return it->body ? MAKE_OK : MAKE_FAIL;
}

static void pget_finish(struct job *j, size_t idx, const struct answer *a)
{
    struct pget *g = j->ud;
    json_t *recs = a->ok ? json_object_get(a->body, "records") : NULL;
    if (!a->ok || !json_is_array(recs)) {
        g->ok = false;
        snprintf(g->code, sizeof(g->code), "%s",
                 a->ok     ? "invalid-answer"
                 : a->code ? a->code
                           : "error");
        snprintf(g->reason, sizeof(g->reason), "%s%s",
                 a->ok       ? "the answer has no \"records\" array"
                 : a->reason ? a->reason
                             : "",
                 g->pages ? " (after a page)" : "");
        return;
    }
    g->ok = true;
    g->pages++;
    json_array_extend(g->records, recs);
    json_decref(g->last);
    g->last = json_incref(a->body);
    if (!json_is_true(json_object_get(a->body, "more")))
        return;
    const char *next = json_string_value(json_object_get(a->body, "after"));
    if (!next || !next[0] || strlen(next) > REC_OWNER_MAX || strcmp(next, g->after) <= 0 ||
        json_array_size(recs) == 0) {
        errorf("the super node paged without moving on (after \"%.64s\"); %u pages read",
               next ? next : "", g->pages);
        g->incomplete = true;
    } else if (g->pages >= GET_MAX_PAGES) {
        errorf("stopped after %u pages (%zu records): the key holds more", g->pages,
               json_array_size(g->records));
        g->incomplete = true;
    } else {
        snprintf(g->after, sizeof(g->after), "%s", next);
        g->next = true;
    }
}

/* Like single_request, for every page of a get; 0 when answered (g->ok), -1 without a link. */
static int paged_get(struct ctx *x, struct pget *g)
{
    struct client cl;
    const char *code;
    int ret = -1;
    if (client_init(&cl, x, 1) == 0) {
        if (client_connect(&cl, false, &code, g->reason, sizeof(g->reason)) == 0) {
            struct job j = {.cl = &cl,
                            .count = SIZE_MAX,
                            .window = 1,
                            .make = pget_make,
                            .finish = pget_finish,
                            .ud = g};
            job_run(&j);
            ret = 0;
        } else {
            snprintf(g->code, sizeof(g->code), "%s", code);
        }
    } else {
        snprintf(g->code, sizeof(g->code), "internal");
        snprintf(g->reason, sizeof(g->reason), "cannot set up TLS");
    }
    client_free(&cl);
    return ret;
}

static void print_pget_failure_json(const struct pget *g)
{
    print_json(json_pack("{s:b, s:s, s:s}", "ok", 0, "code", g->code, "reason", g->reason));
}

static int cmd_get(struct ctx *x)
{
    struct opts *o = x->o;
    bool no_verify = o->given[OPT_NOVERIFY];
    nid_t key;
    char khex[NID_HEX_LEN + 1], what[REC_TYPE_MAX + REC_NAME_MAX + 2];
    if (o->given[OPT_KEYHEX]) {
        nid_from_hex(&key, o->val[OPT_KEYHEX]);
        nid_to_hex(&key, khex);
        snprintf(what, sizeof(what), "%s", khex);
    } else {
        if (nid_key(&key, o->val[OPT_TYPE], o->val[OPT_NAME]) < 0) {
            errorf("cannot hash the key");
            return 1;
        }
        nid_to_hex(&key, khex);
        snprintf(what, sizeof(what), "%s|%s", o->val[OPT_TYPE], o->val[OPT_NAME]);
    }
    const char *type = o->given[OPT_KEYHEX] ? NULL : o->val[OPT_TYPE];
    const char *name = o->given[OPT_KEYHEX] ? NULL : o->val[OPT_NAME];
    struct pget g = {.khex = khex, .records = json_array()};
    if (!g.records) {
        errorf("out of memory");
        return 1;
    }
    int ret = 1;
    if (paged_get(x, &g) < 0) {
        if (o->json)
            print_pget_failure_json(&g);
        goto out;
    }
    if (!g.ok) {
        errorf("get %s: %s: %s", what, g.code, g.reason);
        if (o->json)
            print_pget_failure_json(&g);
        goto out;
    }
    json_t *records = g.records;
    json_t *node = json_object_get(g.last, "node");
    long long hops = jint(g.last, "hops", -1);
    json_t *out_records = json_array();
    bool all_good = true;
    size_t i;
    json_t *env;
    json_array_foreach(records, i, env)
    {
        struct record r;
        bool parsed;
        char err[512];
        int st = check_record(x, env, &key, type, name, no_verify, &r, &parsed, err, sizeof(err));
        if (st != REC_OK)
            all_good = false;
        char seq[24] = "?";
        if (parsed)
            snprintf(seq, sizeof(seq), "%" PRIu64, r.seq);
        if (o->json) {
            json_t *e = json_object();
            if (parsed) {
                json_object_set_new(e, "owner", json_string(r.owner));
                json_object_set_new(e, "seq", json_string(seq));
                json_object_set_new(e, "expires", json_integer((json_int_t)r.expires));
                json_object_set_new(e, "type", json_string(r.type));
                json_object_set_new(e, "name", json_string(r.name));
                if (r.removal)
                    json_object_set_new(e, "remove", json_true());
                else
                    json_object_set(e, "value", r.value);
                if (r.no_update)
                    json_object_set_new(e, "no_update", json_true());
            }
            json_object_set_new(e, "verified", json_boolean(st == REC_OK && !no_verify));
            if (st != REC_OK) {
                json_object_set_new(e, "code", json_string(rec_strcode(st)));
                json_object_set_new(e, "reason", json_string(err));
            }
            json_object_set(e, "envelope", env);
            json_array_append_new(out_records, e);
        } else {
            char *val = parsed && !r.removal ? dump_any(r.value) : strdup("(removal)");
            char prefix[600] = "";
            if (st != REC_OK)
                snprintf(prefix, sizeof(prefix), "UNVERIFIED (%s: %s) ", rec_strcode(st), err);
            if (parsed)
                printf("%s%s %s %lld %s\n", prefix, r.owner, seq, (long long)r.expires,
                       val ? val : "?");
            else
                printf("%s? ? ? ?\n", prefix);
            free(val);
        }
        if (parsed)
            rec_free(&r);
    }
    if (o->json)
        print_json(json_pack("{s:b, s:s, s:O?, s:I, s:I, s:b, s:o}", "ok", 1, "key", khex, "node",
                             node, "hops", (json_int_t)hops, "pages", (json_int_t)g.pages,
                             "incomplete", g.incomplete, "records", out_records));
    else {
        printf("%zu records from node %s in %lld hops (%u page%s%s)\n", json_array_size(records),
               jstr(node, "id", "?"), hops, g.pages, g.pages == 1 ? "" : "s",
               g.incomplete ? ", incomplete" : "");
        json_decref(out_records);
    }
    ret = all_good && !g.incomplete ? 0 : 1;
out:
    json_decref(g.records);
    json_decref(g.last);
    return ret;
}

/* ---- find --------------------------------------------------------------------------------- */

static int cmd_find(struct ctx *x)
{
    struct opts *o = x->o;
    nid_t t;
    char thex[NID_HEX_LEN + 1];
    nid_from_hex(&t, o->val[OPT_TARGET]);
    nid_to_hex(&t, thex);
    struct single s = {.type = "find", .body = json_pack("{s:s}", "target", thex)};
    if (!s.body) {
        errorf("out of memory");
        return 1;
    }
    int ret = 1;
    if (single_request(x, &s) < 0) {
        if (o->json)
            print_failure_json(&s);
    } else if (!s.ok) {
        errorf("find %s: %s: %s", thex, s.code, s.reason);
        if (o->json)
            print_failure_json(&s);
    } else {
        json_t *node = json_object_get(s.res, "node");
        json_t *succ = json_object_get(s.res, "succ");
        long long hops = jint(s.res, "hops", -1);
        if (o->json)
            print_json(json_pack("{s:b, s:O?, s:O?, s:I}", "ok", 1, "node", node, "succ", succ,
                                 "hops", (json_int_t)hops));
        else
            printf("successor of %s: %s at %s (%lld hops)\n", thex, jstr(node, "id", "?"),
                   jstr(node, "addr", "?"), hops);
        ret = 0;
    }
    json_decref(s.body);
    json_decref(s.res);
    return ret;
}

/* ---- fill, check, bench ------------------------------------------------------------------- */

/* The REPORT_NAMES lowest indices of a set of names (with a reason each), and its size. */
struct names {
    size_t n;
    size_t kept;
    size_t idx[REPORT_NAMES];
    char *why[REPORT_NAMES];
};

static void names_add(struct names *l, size_t idx, const char *why)
{
    l->n++;
    if (l->kept == REPORT_NAMES) {
        if (idx > l->idx[REPORT_NAMES - 1])
            return;
        free(l->why[--l->kept]); /* drop the highest */
    }
    size_t pos = l->kept;
    while (pos > 0 && l->idx[pos - 1] > idx) {
        l->idx[pos] = l->idx[pos - 1];
        l->why[pos] = l->why[pos - 1];
        pos--;
    }
    l->idx[pos] = idx;
    l->why[pos] = why ? strdup(why) : NULL;
    l->kept++;
}

static void names_free(struct names *l)
{
    for (size_t i = 0; i < l->kept; i++)
        free(l->why[i]);
}

struct bulk {
    struct ctx *x;
    const char *op; /* "fill", "check", "bench get", "bench update" */
    const char *type, *prefix, *mode;
    size_t count, names;
    int64_t lifetime;
    /* outcome */
    size_t ok, failed;
    json_t *errors; /* {"code": n} */
    struct lat lat;
    /* check */
    size_t found;
    struct names missing, bad, failed_names;
    long long hops_sum, hops_max;
    size_t hops_n;
    size_t empty; /* bench get: answers without records */
    /* bench update: pre-encoded frames */
    uint8_t **frames;
    size_t *flens;
    char (*tids)[MSG_TID_LEN + 1];
};

static void bulk_name(const struct bulk *b, size_t i, char *out, size_t len)
{
    snprintf(out, len, "%s%zu", b->prefix, i);
}

/* A signed store request body for record i (P<i>, value {"n": i}); NULL after printing why. */
static json_t *bulk_store_body(struct bulk *b, size_t i)
{
    char name[REC_NAME_MAX + 1];
    bulk_name(b, i, name, sizeof(name));
    json_t *value = json_pack("{s:I}", "n", (json_int_t)i);
    struct record rec;
    int r = value ? sign_record(b->x, b->type, name, value, false, false, rec_seq_now(),
                                b->lifetime, &rec)
                  : -1;
    json_decref(value);
    if (r < 0)
        return NULL;
    json_t *body = json_pack("{s:s, s:O}", "mode", b->mode, "record", rec.envelope);
    rec_free(&rec);
    return body;
}

static int fill_make(struct job *j, size_t idx, struct job_item *it)
{
    struct bulk *b = j->ud;
    it->type = "store";
    it->body = bulk_store_body(b, idx);
    if (!it->body) {
        it->code = "sign-failed";
        snprintf(it->reason, sizeof(it->reason), "cannot sign record %zu", idx);
        return MAKE_FAIL;
    }
    return MAKE_OK;
}

static void bulk_count(struct bulk *b, const struct answer *a)
{
    if (a->answered)
        lat_add(&b->lat, a->latency_ms);
    if (a->ok) {
        b->ok++;
    } else {
        b->failed++;
        count_error(b->errors, a->code ? a->code : "error");
        log_debug(PROG, "%s: request failed: %s: %s", b->op, a->code ? a->code : "error",
                  a->reason ? a->reason : "");
    }
}

static void fill_finish(struct job *j, size_t idx, const struct answer *a)
{
    bulk_count(j->ud, a);
}

static int get_make(struct job *j, size_t idx, struct job_item *it)
{
    struct bulk *b = j->ud;
    char name[REC_NAME_MAX + 1], khex[NID_HEX_LEN + 1];
    nid_t key;
    bulk_name(b, b->names ? idx % b->names : idx, name, sizeof(name));
    if (nid_key(&key, b->type, name) < 0)
        return MAKE_FAIL;
    it->type = "get";
    it->body = json_pack("{s:s}", "key", nid_to_hex(&key, khex));
    return it->body ? MAKE_OK : MAKE_FAIL;
}

static void bench_get_finish(struct job *j, size_t idx, const struct answer *a)
{
    struct bulk *b = j->ud;
    bulk_count(b, a);
    if (a->ok && json_array_size(json_object_get(a->body, "records")) == 0)
        b->empty++;
}

/* The kept names as a JSON array of names, or (detail) of {"name","why"}. */
static json_t *names_json(const struct bulk *b, const struct names *l, bool detail)
{
    json_t *a = json_array();
    char name[REC_NAME_MAX + 1];
    for (size_t i = 0; a && i < l->kept; i++) {
        bulk_name(b, l->idx[i], name, sizeof(name));
        json_array_append_new(
            a, detail ? json_pack("{s:s, s:s}", "name", name, "why", l->why[i] ? l->why[i] : "")
                      : json_string(name));
    }
    return a;
}

static void names_print(const struct bulk *b, const struct names *l, const char *label)
{
    char name[REC_NAME_MAX + 1];
    for (size_t i = 0; i < l->kept; i++) {
        bulk_name(b, l->idx[i], name, sizeof(name));
        printf("%s: %s%s%s\n", label, name, l->why[i] ? ": " : "", l->why[i] ? l->why[i] : "");
    }
    if (l->n > l->kept)
        printf("%s: ... %zu more\n", label, l->n - l->kept);
}

static void check_finish(struct job *j, size_t idx, const struct answer *a)
{
    struct bulk *b = j->ud;
    struct ctx *x = b->x;
    char name[REC_NAME_MAX + 1];
    bulk_name(b, idx, name, sizeof(name));
    bulk_count(b, a);
    if (!a->ok) {
        char why[1200];
        snprintf(why, sizeof(why), "%s: %s", a->code ? a->code : "error",
                 a->reason ? a->reason : "");
        names_add(&b->failed_names, idx, why);
        return;
    }
    long long hops = jint(a->body, "hops", -1);
    if (hops >= 0) {
        b->hops_sum += hops;
        b->hops_n++;
        if (hops > b->hops_max)
            b->hops_max = hops;
    }
    json_t *records = json_object_get(a->body, "records");
    size_t n = json_array_size(records);
    if (n == 0) {
        names_add(&b->missing, idx, NULL);
        return;
    }
    char why[600] = "";
    if (n > 1) {
        snprintf(why, sizeof(why), "%zu records, expected one", n);
    } else {
        nid_t key;
        struct record r;
        bool parsed;
        char err[512];
        nid_key(&key, b->type, name);
        int st = check_record(x, json_array_get(records, 0), &key, NULL, NULL, false, &r, &parsed,
                              err, sizeof(err));
        if (st != REC_OK) {
            snprintf(why, sizeof(why), "%s: %s", rec_strcode(st), err);
        } else if (strcmp(r.owner, x->self.uri) != 0) {
            snprintf(why, sizeof(why), "owner %s, expected %s", r.owner, x->self.uri);
        } else if (strcmp(r.type, b->type) != 0 || strcmp(r.name, name) != 0) {
            snprintf(why, sizeof(why), "record for %s|%s", r.type, r.name);
        } else {
            json_t *want = json_pack("{s:I}", "n", (json_int_t)idx);
            if (r.removal || !json_equal(r.value, want)) {
                char *got = r.removal ? strdup("(removal)") : dump_any(r.value);
                snprintf(why, sizeof(why), "value %s, expected {\"n\":%zu}", got ? got : "?", idx);
                free(got);
            }
            json_decref(want);
        }
        if (parsed)
            rec_free(&r);
    }
    if (why[0]) {
        names_add(&b->bad, idx, why);
        log_debug(PROG, "check: %s is bad: %s", name, why);
    } else {
        b->found++;
    }
}

static int bench_update_make(struct job *j, size_t idx, struct job_item *it)
{
    struct bulk *b = j->ud;
    it->frame = b->frames[idx];
    it->flen = b->flens[idx];
    it->tid = b->tids[idx];
    return MAKE_OK;
}

/* Signs and encodes every record of bench update before the clock starts. */
static int bench_prepare(struct bulk *b)
{
    b->frames = calloc(b->count, sizeof(*b->frames));
    b->flens = calloc(b->count, sizeof(*b->flens));
    b->tids = calloc(b->count, sizeof(*b->tids));
    if (!b->frames || !b->flens || !b->tids) {
        errorf("out of memory for %zu records", b->count);
        return -1;
    }
    for (size_t i = 0; i < b->count; i++) {
        json_t *body = bulk_store_body(b, i);
        if (!body)
            return -1;
        msg_new_tid(b->tids[i]);
        struct msg_hdr hdr = {
            .overlay = b->x->overlay, .type = "store", .kind = MSG_REQ, .tid = b->tids[i]};
        int st = msg_encode(&hdr, body, b->x->o->max_frame, &b->frames[i], &b->flens[i]);
        json_decref(body);
        if (st != MSG_OK) {
            errorf("cannot encode record %zu: %s", i, msg_strerror(st));
            return -1;
        }
    }
    return 0;
}

static void bulk_free(struct bulk *b)
{
    json_decref(b->errors);
    names_free(&b->missing);
    names_free(&b->bad);
    names_free(&b->failed_names);
    free(b->lat.v);
    if (b->frames)
        for (size_t i = 0; i < b->count; i++)
            free(b->frames[i]);
    free(b->frames);
    free(b->flens);
    free(b->tids);
}

static int cmd_bulk(struct ctx *x)
{
    struct opts *o = x->o;
    struct bulk b = {.x = x};
    bool bench = o->cmd == CMD_BENCH;
    bool update = bench && !strcmp(o->bench_op, "update");
    b.op = o->cmd == CMD_FILL    ? "fill"
           : o->cmd == CMD_CHECK ? "check"
           : update              ? "bench update"
                                 : "bench get";
    b.type = o->given[OPT_TYPE] ? o->val[OPT_TYPE] : DEF_BENCH_TYPE;
    b.prefix = o->given[OPT_PREFIX] ? o->val[OPT_PREFIX] : DEF_BENCH_PREFIX;
    b.mode = o->given[OPT_MODE] ? o->val[OPT_MODE] : "update";
    b.count = (size_t)strtoll(o->val[OPT_COUNT], NULL, 10);
    b.names = o->given[OPT_NAMES] ? (size_t)strtoll(o->val[OPT_NAMES], NULL, 10) : b.count;
    b.lifetime = lifetime_of(x);
    size_t window =
        o->given[OPT_WINDOW] ? (size_t)strtoll(o->val[OPT_WINDOW], NULL, 10) : DEF_WINDOW;
    b.errors = json_object();
    b.lat.v = malloc(b.count * sizeof(double));
    b.lat.cap = b.count;
    if (!b.errors || !b.lat.v) {
        errorf("out of memory");
        bulk_free(&b);
        return 1;
    }
    if (update && bench_prepare(&b) < 0) {
        bulk_free(&b);
        return 1;
    }

    struct client cl;
    const char *code;
    char why[768];
    if (client_init(&cl, x, window) < 0 || client_connect(&cl, true, &code, why, sizeof(why)) < 0) {
        client_free(&cl);
        bulk_free(&b);
        return 1;
    }
    struct job j = {.cl = &cl, .count = b.count, .window = window, .ud = &b};
    if (o->cmd == CMD_FILL) {
        j.make = fill_make;
        j.finish = fill_finish;
    } else if (o->cmd == CMD_CHECK) {
        j.make = get_make;
        j.finish = check_finish;
    } else if (update) {
        j.make = bench_update_make;
        j.finish = fill_finish;
    } else {
        j.make = get_make;
        j.finish = bench_get_finish;
    }
    double t0 = mono_s();
    job_run(&j);
    double secs = mono_s() - t0;
    client_free(&cl);
    if (secs <= 0)
        secs = 1e-9;
    double rate = (double)b.ok / secs;

    json_t *lat = lat_json(&b.lat, bench);
    int ret = 0;
    if (o->cmd == CMD_FILL) {
        ret = b.failed ? 1 : 0;
        if (o->json) {
            print_json(json_pack("{s:I, s:I, s:I, s:O, s:f, s:f, s:O}", "count",
                                 (json_int_t)b.count, "ok", (json_int_t)b.ok, "failed",
                                 (json_int_t)b.failed, "errors", b.errors, "seconds", round3(secs),
                                 "per_second", round3(rate), "latency_ms", lat));
        } else {
            char *ew = errors_words(b.errors);
            printf("fill: %zu of %zu records stored, %zu failed (errors: %s) in %.3f s, %.1f "
                   "stored per second; latency median %.3f ms, p99 %.3f ms\n",
                   b.ok, b.count, b.failed, ew ? ew : "?", secs, rate,
                   json_real_value(json_object_get(lat, "median")),
                   json_real_value(json_object_get(lat, "p99")));
            free(ew);
        }
    } else if (o->cmd == CMD_CHECK) {
        ret = (b.missing.n || b.bad.n || b.failed_names.n) ? 1 : 0;
        double hops_avg = b.hops_n ? (double)b.hops_sum / (double)b.hops_n : 0;
        if (o->json) {
            print_json(
                json_pack("{s:I, s:I, s:o, s:o, s:o, s:o, s:O, s:f, s:I, s:f, s:f, s:O}", "count",
                          (json_int_t)b.count, "found", (json_int_t)b.found, "missing",
                          names_json(&b, &b.missing, false), "bad", names_json(&b, &b.bad, false),
                          "bad_detail", names_json(&b, &b.bad, true), "failed",
                          names_json(&b, &b.failed_names, false), "errors", b.errors, "hops_avg",
                          round3(hops_avg), "hops_max", (json_int_t)b.hops_max, "seconds",
                          round3(secs), "per_second", round3(rate), "latency_ms", lat));
        } else {
            char *ew = errors_words(b.errors);
            printf("check: %zu of %zu found, %zu missing, %zu bad, %zu failed (errors: %s); "
                   "hops avg %.2f max %lld; %.3f s, %.1f gets per second; latency median %.3f "
                   "ms, p99 %.3f ms\n",
                   b.found, b.count, b.missing.n, b.bad.n, b.failed_names.n, ew ? ew : "?",
                   hops_avg, b.hops_max, secs, rate,
                   json_real_value(json_object_get(lat, "median")),
                   json_real_value(json_object_get(lat, "p99")));
            free(ew);
            names_print(&b, &b.missing, "missing");
            names_print(&b, &b.bad, "bad");
            names_print(&b, &b.failed_names, "failed");
        }
    } else {
        ret = b.failed ? 1 : 0;
        if (o->json) {
            json_t *out = json_pack("{s:s, s:I, s:I, s:I, s:O, s:f, s:f, s:O}", "op", o->bench_op,
                                    "count", (json_int_t)b.count, "ok", (json_int_t)b.ok, "failed",
                                    (json_int_t)b.failed, "errors", b.errors, "seconds",
                                    round3(secs), "per_second", round3(rate), "latency_ms", lat);
            if (out && !update)
                json_object_set_new(out, "empty", json_integer((json_int_t)b.empty));
            print_json(out);
        } else {
            char *ew = errors_words(b.errors);
            printf("bench %s: %zu requests, %zu ok, %zu failed (errors: %s)", o->bench_op, b.count,
                   b.ok, b.failed, ew ? ew : "?");
            if (!update)
                printf(", %zu without records", b.empty);
            printf(" in %.3f s, %.1f per second; latency median %.3f ms, p99 %.3f ms, max %.3f "
                   "ms\n",
                   secs, rate, json_real_value(json_object_get(lat, "median")),
                   json_real_value(json_object_get(lat, "p99")),
                   json_real_value(json_object_get(lat, "max")));
            free(ew);
        }
    }
    json_decref(lat);
    bulk_free(&b);
    return ret;
}

/* ---- main --------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    struct opts o = {0};
    parse_args(argc, argv, &o);
    validate(&o);
    signal(SIGPIPE, SIG_IGN);
    enum log_level level = o.verbose >= 3   ? LL_TRACE
                           : o.verbose == 2 ? LL_DEBUG
                           : o.verbose == 1 ? LL_INFO
                                            : LL_ERROR;
    log_init(PROG, level, false);

    struct ctx x = {.o = &o};
    int ret = 1;
    if (load_creds(&x) == 0) {
        switch (o.cmd) {
        case CMD_SIGN:
            ret = cmd_sign(&x);
            break;
        case CMD_PUT:
            ret = cmd_put(&x);
            break;
        case CMD_SEND:
            ret = cmd_send(&x);
            break;
        case CMD_GET:
            ret = cmd_get(&x);
            break;
        case CMD_FIND:
            ret = cmd_find(&x);
            break;
        case CMD_FILL:
        case CMD_CHECK:
        case CMD_BENCH:
            ret = cmd_bulk(&x);
            break;
        default:
            break;
        }
    }
    free_creds(&x);
    free(o.sn);
    free(o.sn_buf);
    fflush(stdout);
    return ret;
}
