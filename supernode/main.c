/*
 * supernode: a member of the overlay's DHT core (seed 004 section 3). The
 * daemon around the super node library (sn.h): configuration, credentials
 * from the state directory, starting or joining the ring, the control socket
 * (`supernode status`), graceful leave on SIGTERM.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "announce.h"
#include "chan.h"
#include "media.h"
#include "config.h"
#include "conn.h"
#include "ctlsock.h"
#include "daemon.h"
#include "dns.h"
#include "enroll.h"
#include "fsutil.h"
#include "http_client.h"
#include "httpd.h"
#include "landisc.h"
#include "log.h"
#include "login_client.h"
#include "renewer.h"
#include "on.h"
#include "sip.h"
#include "sipfront.h"
#include "sn.h"
#include "stun.h"
#include "turn.h"

struct sn_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *listen;
    char *state_dir;
    char *ca_file;
    char *cert_file;
    char *key_file;
    long long max_connections;
    long long max_handshaking;
    long long max_handshaking_per_address;
    long long max_links_per_certificate;
    long long handshake_timeout_ms;
    long long idle_timeout_ms;
    long long max_frame;
    long long cert_renew_margin_s;
    long long cert_check_interval_s;
    char *advertise;
    struct cfg_strlist join;
    bool seed;
    char *control_socket;
    long long quota_per_key;
    long long quota_per_owner;
    long long quota_per_owner_bytes;
    long long quota_per_proxy;
    long long quota_per_proxy_bytes;
    long long peer_idle_s;
    long long sn_msg_rate;
    long long dial_rate;
    long long max_attached;
    long long on_rate;
    long long on_inflight;
    char *metrics_listen;
    char *stun_listen;
    bool turn;
    char *turn_relay_ip;
    char *turn_ports;
    long long turn_max_allocations;
    long long turn_allocations_per_node;
    long long turn_permissions_per_allocation;
    long long turn_channels_per_allocation;
    long long turn_bandwidth_kbps;
    long long turn_max_lifetime_s;
    long long turn_credential_ttl_s;
    struct cfg_strlist turn_allow_peers;
    char *lan_discovery_if;
    char *sip_listen;
    char *sip_advertise;
    char *sip_domain;
    char *sip_users;
    long long sip_max_expires;
    long long sip_rate;
    bool sip_dns;
    char *sip_dns_server;
    struct media_settings media;
};

/* The transport settings of this node, from its configuration. */
static struct tls_config sn_tls_config(const struct sn_config *cfg)
{
    return (struct tls_config){
        .ca_file = cfg->ca_file,
        .cert_file = cfg->cert_file,
        .key_file = cfg->key_file,
        .overlay = cfg->overlay,
        .handshake_timeout_ms = (unsigned)cfg->handshake_timeout_ms,
        .idle_timeout_ms = (unsigned)cfg->idle_timeout_ms,
        .max_frame = (size_t)cfg->max_frame,
        .max_handshaking = (unsigned)cfg->max_handshaking,
        .max_handshaking_per_addr = (unsigned)cfg->max_handshaking_per_address,
        .max_links_per_identity = (unsigned)cfg->max_links_per_certificate,
    };
}

static int sn_validate(const void *p, char *err, size_t len)
{
    const struct sn_config *c = p;
    int n = !!c->ca_file + !!c->cert_file + !!c->key_file;
    if (n != 0 && n != 3) {
        snprintf(err, len,
                 "keys \"ca_file\", \"cert_file\" and \"key_file\" go together: "
                 "set all three or none");
        return -1;
    }
    if (c->sip_listen && (!c->sip_domain || !c->sip_users)) {
        snprintf(err, len, "key \"sip_listen\" needs \"sip_domain\" and \"sip_users\"");
        return -1;
    }
    if (c->sip_listen && !c->sip_advertise &&
        (!strncmp(c->sip_listen, "0.0.0.0:", 8) || !strncmp(c->sip_listen, "[::]:", 5))) {
        snprintf(err, len,
                 "sip_listen is a wildcard: set \"sip_advertise\" to the address "
                 "phones and other nodes reach it at");
        return -1;
    }
    return 0;
}

static const struct cfg_field sn_fields[] = {
    DAEMON_BASE_FIELDS(struct sn_config),
    {"overlay", CFG_STR, offsetof(struct sn_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name, carried in every message"},
    {"listen", CFG_HOSTPORT, offsetof(struct sn_config, listen), 0, 0, NULL, "0.0.0.0:7000",
     "address and port for node-to-node TLS"},
    {"state_dir", CFG_PATH, offsetof(struct sn_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/supernode", "where credentials and state are kept"},
    {"ca_file", CFG_PATH, offsetof(struct sn_config, ca_file), 0, 0, NULL, NULL,
     "overlay CA certificate (PEM)"},
    {"cert_file", CFG_PATH, offsetof(struct sn_config, cert_file), 0, 0, NULL, NULL,
     "this node's certificate (PEM)"},
    {"key_file", CFG_PATH, offsetof(struct sn_config, key_file), 0, 0, NULL, NULL,
     "this node's private key (PKCS#8 PEM)"},
    {"max_connections", CFG_INT, offsetof(struct sn_config, max_connections), 1, 1000000, NULL,
     "4096", "most simultaneous node-to-node connections"},
    {"max_handshaking", CFG_INT, offsetof(struct sn_config, max_handshaking), 1, 1000000, NULL,
     "512", "most accepted connections still in their TLS handshake or hello"},
    {"max_handshaking_per_address", CFG_INT,
     offsetof(struct sn_config, max_handshaking_per_address), 1, 1000000, NULL, "64",
     "most of those from one source address (an IPv4 address or an IPv6 /64)"},
    {"max_links_per_certificate", CFG_INT, offsetof(struct sn_config, max_links_per_certificate), 1,
     1000000, NULL, "4", "most links one certificate may hold to this node"},
    {"handshake_timeout_ms", CFG_INT, offsetof(struct sn_config, handshake_timeout_ms), 100, 600000,
     NULL, "10000", "time allowed for connect + TLS handshake + hello"},
    {"idle_timeout_ms", CFG_INT, offsetof(struct sn_config, idle_timeout_ms), 0, 86400000, NULL,
     "120000", "close a link after this long without traffic (0 = never)"},
    {"cert_renew_margin_s", CFG_INT, offsetof(struct sn_config, cert_renew_margin_s), 0, 315360000,
     NULL, "0", "renew the certificate once less than this remains (0 = a third of its validity)"},
    {"cert_check_interval_s", CFG_INT, offsetof(struct sn_config, cert_check_interval_s), 1, 86400,
     NULL, "3600",
     "how often the certificate's expiry is checked; also the longest time between two fetches "
     "of the overlay's revocation list"},
    {"max_frame", CFG_INT, offsetof(struct sn_config, max_frame), 1024, MSG_MAX_FRAME_LIMIT, NULL,
     "65536", "largest accepted message, in bytes"},
    {"advertise", CFG_HOSTPORT, offsetof(struct sn_config, advertise), 0, 0, NULL, NULL,
     "address other nodes reach us at (default: listen, which must then not be a wildcard)"},
    {"join", CFG_STRLIST, offsetof(struct sn_config, join), 0, 0, NULL, NULL,
     "super node addresses (host:port) to join the ring through"},
    {"seed", CFG_BOOL, offsetof(struct sn_config, seed), 0, 0, NULL, "false",
     "start a new ring instead of joining (same as run --seed)"},
    {"control_socket", CFG_PATH, offsetof(struct sn_config, control_socket), 0, 0, NULL, NULL,
     "UNIX socket for `supernode status` (default: <state_dir>/control.sock)"},
    {"quota_per_key", CFG_INT, offsetof(struct sn_config, quota_per_key), 1, 1000000, NULL, "32",
     "most owners with a record under one key"},
    {"quota_per_owner", CFG_INT, offsetof(struct sn_config, quota_per_owner), 1, 100000000, NULL,
     "10000", "most records (and tombstones) one owner may have on this node"},
    {"quota_per_owner_bytes", CFG_INT, offsetof(struct sn_config, quota_per_owner_bytes), 1024,
     1LL << 40, NULL, "16777216", "most bytes of records one owner may have on this node"},
    {"quota_per_proxy", CFG_INT, offsetof(struct sn_config, quota_per_proxy), 1, 1000000000, NULL,
     "1000000",
     "most records one P2P proxy of the overlay document (sip_proxies) may have on this node: "
     "it writes for every phone of its domain"},
    {"quota_per_proxy_bytes", CFG_INT, offsetof(struct sn_config, quota_per_proxy_bytes), 1024,
     1LL << 40, NULL, "2147483648", "most bytes of records one P2P proxy may have on this node"},
    {"max_attached", CFG_INT, offsetof(struct sn_config, max_attached), 1, 10000000, NULL, "1000",
     "most ordinary nodes attached at once (announced to the bootstrap servers as capacity)"},
    {"on_rate", CFG_INT, offsetof(struct sn_config, on_rate), 1, 1000000, NULL, "50",
     "requests per second one attached ordinary node may send (bursts of twice that)"},
    {"on_inflight", CFG_INT, offsetof(struct sn_config, on_inflight), 1, 100000, NULL, "32",
     "requests one attached ordinary node may have in progress"},
    {"stun_listen", CFG_HOSTPORT, offsetof(struct sn_config, stun_listen), 0, 0, NULL, NULL,
     "UDP address of the STUN server (default: the host of advertise/listen, port 3478)"},
    {"turn", CFG_BOOL, offsetof(struct sn_config, turn), 0, 0, NULL, "true",
     "run a TURN relay (RFC 8656, UDP, IPv4) on the STUN server's port; attached ordinary "
     "nodes get short-lived credentials with the `turn` request (docs/nat.md)"},
    {"turn_relay_ip", CFG_STR, offsetof(struct sn_config, turn_relay_ip), 0, 0, NULL, NULL,
     "IPv4 address relayed addresses are bound to and announced with (default: the STUN "
     "listen host if it is not a wildcard, else the host of advertise/listen)"},
    {"turn_ports", CFG_STR, offsetof(struct sn_config, turn_ports), 0, 0, NULL, "49152-65535",
     "UDP port range of relayed addresses, LOW-HIGH (0-0: any port); open it in the firewall"},
    {"turn_max_allocations", CFG_INT, offsetof(struct sn_config, turn_max_allocations), 1, 1000000,
     NULL, "1000", "most TURN allocations in all (past it: 508 Insufficient Capacity)"},
    {"turn_allocations_per_node", CFG_INT, offsetof(struct sn_config, turn_allocations_per_node), 1,
     10000, NULL, "8",
     "most TURN allocations one Node-ID may hold (past it: 486 Allocation Quota Reached); an "
     "ordinary node makes one per channel it opens or takes"},
    {"turn_permissions_per_allocation", CFG_INT,
     offsetof(struct sn_config, turn_permissions_per_allocation), 1, 10000, NULL, "32",
     "most peer addresses with a permission in one allocation"},
    {"turn_channels_per_allocation", CFG_INT,
     offsetof(struct sn_config, turn_channels_per_allocation), 1, 4096, NULL, "32",
     "most channel bindings in one allocation"},
    {"turn_bandwidth_kbps", CFG_INT, offsetof(struct sn_config, turn_bandwidth_kbps), 0, 10000000,
     NULL, "2000",
     "relayed kbit/s per allocation, both ways together (token bucket, one second of burst; "
     "excess is dropped and counted; 0 = unlimited)"},
    {"turn_max_lifetime_s", CFG_INT, offsetof(struct sn_config, turn_max_lifetime_s), 60, 86400,
     NULL, "3600", "longest lifetime a TURN allocation is granted per Allocate/Refresh"},
    {"turn_credential_ttl_s", CFG_INT, offsetof(struct sn_config, turn_credential_ttl_s), 60, 86400,
     NULL, "600", "validity of the TURN credentials handed out by the `turn` request"},
    {"turn_allow_peers", CFG_STRLIST, offsetof(struct sn_config, turn_allow_peers), 0, 0, NULL,
     NULL,
     "IPv4 CIDRs the relay may send to although the peer policy refuses them (private, "
     "loopback, ... ranges); for tests and labs, e.g. [\"127.0.0.0/8\"]"},
    {"lan_discovery_if", CFG_STR, offsetof(struct sn_config, lan_discovery_if), 0, 0, NULL, NULL,
     "IPv4 address of the interface on which to answer ordinary nodes' LAN discovery "
     "queries (the overlay document's group); default: off"},
    {"metrics_listen", CFG_HOSTPORT, offsetof(struct sn_config, metrics_listen), 0, 0, NULL, NULL,
     "plain-HTTP address for GET /metrics (Prometheus text); keep it local (default: off)"},
    {"sn_msg_rate", CFG_INT, offsetof(struct sn_config, sn_msg_rate), 1, 100000000, NULL, "20000",
     "messages per second one certificate may send over its super node links (burst: 2 s "
     "worth); past it the link is closed"},
    {"dial_rate", CFG_INT, offsetof(struct sn_config, dial_rate), 1, 100000, NULL, "10",
     "connections per second (burst: 2 s worth + 8; 16 at once) to super node addresses "
     "named by messages and not yet verified"},
    {"peer_idle_s", CFG_INT, offsetof(struct sn_config, peer_idle_s), 1, 86400, NULL, "60",
     "close super node links the ring does not need after this long unused"},
    {"sip_listen", CFG_HOSTPORT, offsetof(struct sn_config, sip_listen), 0, 0, NULL, NULL,
     "UDP+TCP address of the public SIP front end: P2P registrar and proxy of sip_domain for "
     "classical phones (docs/sip.md; default: off)"},
    {"sip_advertise", CFG_HOSTPORT, offsetof(struct sn_config, sip_advertise), 0, 0, NULL, NULL,
     "address the overlay's records give for the SIP front end (default: sip_listen)"},
    {"sip_domain", CFG_STR, offsetof(struct sn_config, sip_domain), 0, 0, NULL, NULL,
     "SIP domain the front end serves; the overlay document's sip_proxies must name this node "
     "for it"},
    {"sip_users", CFG_PATH, offsetof(struct sn_config, sip_users), 0, 0, NULL, NULL,
     "file of \"user:HA1\" lines for Digest authentication, HA1 = MD5(user:sip_domain:password) "
     "(`supernode sip-user NAME` prints one)"},
    {"sip_max_expires", CFG_INT, offsetof(struct sn_config, sip_max_expires), 60, 86400, NULL,
     "3600", "longest registration the front end grants, in seconds"},
    SIP_FRONT_FIELDS(struct sn_config),
    MEDIA_FIELDS(struct sn_config, "500"),
};

static const struct cfg_schema sn_schema = {sn_fields, sizeof(sn_fields) / sizeof(sn_fields[0]),
                                            sn_validate};

static const struct cli_option run_options[] = {
    {"seed", NULL, "start a new ring instead of joining one"},
    {NULL, NULL, NULL},
};

static const struct cli_option status_options[] = {
    {"json", NULL, "print the status document as JSON"},
    {NULL, NULL, NULL},
};

static const struct cli_command sn_commands[] = {
    {"run", "run the super node (--seed: start a new ring)", run_options},
    {"status",
     "status [--json]: ask the running super node for its ring neighbours, fingers, "
     "records and links",
     status_options},
    {"enroll", "get this node's certificate from the login server (once)", enroll_options},
    {"renew", "renew this node's certificate (same Node-ID, new key)", renew_options},
    {"sip-user",
     "sip-user NAME: read a password (one line on standard input) and print the sip_users line "
     "for NAME in sip_domain",
     NULL},
    {"turn-credentials",
     "turn-credentials NODE-ID: ask the running super node (control socket) for TURN "
     "credentials of that node, as JSON (operators and tests)",
     NULL},
    {"ping",
     "ping ADDR: connect to the node at host:port with this node's credentials, "
     "print its verified identity and the round-trip time",
     NULL},
    {NULL, NULL, NULL},
};

static const struct cli_prog sn_prog = {
    .name = "supernode",
    .summary = "Super node of the p2psip overlay: a member of the DHT that stores and routes "
               "records; with sip_listen, also the public SIP registrar and proxy of a domain for "
               "classical phones (docs/sip.md).",
    .commands = sn_commands,
    .schema = &sn_schema,
    .epilog = "Credentials and the overlay document come from state_dir (after `enroll`) unless\n"
              "ca_file, cert_file and key_file are set. With join addresses the node joins\n"
              "the ring through them; with --seed, or none, it starts a new ring.\n\n"
              "Examples:\n  supernode -c /etc/p2psip/supernode.json enroll --login "
              "https://login.example.org --pin sha256:... --user sn1\n"
              "  supernode -d -c /etc/p2psip/supernode.json run --seed\n"
              "  supernode -d -c /etc/p2psip/supernode.json -o join=192.0.2.7:7000\n"
              "  supernode -c /etc/p2psip/supernode.json status\n"
              "  supernode -c /etc/p2psip/supernode.json ping 192.0.2.7:7000\n",
};

struct sn_state {
    const struct sn_config *cfg;
    struct sn *sn;
    struct ctl_server *ctl;
    struct renewer *renewer;
    struct node_creds creds;
    bool have_creds;
    char *ctl_path;
    struct ev_loop *loop;
    /* Finding the ring through the bootstrap servers' lists. */
    const struct overlay_doc *doc;
    struct http_client *http;
    ev_timer bs_retry;
    size_t bs_pending;
    struct cfg_strlist found; /* addresses collected in this round */
    double bs_backoff;
    struct announcer *announcer;
    double started_at;
    struct httpd *metrics;
    struct stun_server *stun;
    struct turn_server *turn;
    char turn_addr[300]; /* what clients are told: the STUN server's address */
    struct landisc_responder *lan;
    char id_hex[NID_HEX_LEN + 1];
    /* The public SIP front end and its client of the overlay (sipfront.h). */
    struct onode *on;
    struct sipfront *sip;
    struct chans *chans; /* its channels to ordinary nodes (ordinarynode/chan.h) */
    struct media *media; /* the media of its phones' calls with nodes (ordinarynode/media.h) */
    char chan_host[64];  /* the address they gather on */
    struct dns_resolver *dns;
    const char *self_addr;
};

static void sn_renewed(void *ud)
{
    /* Links already open keep their session; the listener reads credentials at start. */
    log_info("main", "the renewed certificate is used for links after the next restart");
}

static char *control_path(const struct sn_config *cfg)
{
    return ctl_default_path(cfg->control_socket, cfg->state_dir);
}

static void on_control(struct ctl_req *r, json_t *req, void *ud)
{
    struct sn_state *st = ud;
    const char *cmd = json_string_value(json_object_get(req, "cmd"));
    if (!strcmp(cmd, "status")) {
        json_t *s = sn_status(st->sn);
        if (st->sip)
            json_object_set_new(s, "sip", sipfront_status(st->sip));
        if (st->chans)
            json_object_set_new(s, "sip_channels", chans_status(st->chans));
        if (st->media)
            json_object_set_new(s, "sip_media", media_status(st->media));
        if (st->stun) {
            struct stun_stats ss;
            stun_server_stats(st->stun, &ss);
            json_object_set_new(s, "stun",
                                json_pack("{s:I,s:I,s:I,s:I}", "answered", (json_int_t)ss.answered,
                                          "classic", (json_int_t)ss.classic, "errors",
                                          (json_int_t)ss.errors, "dropped",
                                          (json_int_t)ss.dropped));
        }
        if (st->turn)
            json_object_set_new(s, "turn", turn_server_status(st->turn));
        ctl_reply(r, s);
    } else if (!strcmp(cmd, "records")) {
        ctl_reply(r, json_pack("{s:b,s:o}", "ok", 1, "records", sn_records(st->sn)));
    } else if (!strcmp(cmd, "turn-credentials")) {
        /* Local operators and tests only: the control socket is not reachable from outside. */
        const char *id = json_string_value(json_object_get(req, "node_id"));
        json_int_t ttl = json_integer_value(json_object_get(req, "ttl_s"));
        char user[160], pass[64], realm[160];
        if (!st->turn)
            ctl_reply_error(r, "this super node runs no TURN server");
        else if (!id ||
                 turn_issue(st->turn, id,
                            ttl > 0 && ttl <= 86400 ? (unsigned)ttl
                                                    : (unsigned)st->cfg->turn_credential_ttl_s,
                            user, sizeof(user), pass, sizeof(pass), realm, sizeof(realm)) != 0)
            ctl_reply_error(r, "node_id must be 40 lowercase hex digits");
        else
            ctl_reply(r, json_pack("{s:b,s:s,s:s,s:s,s:s}", "ok", 1, "server", st->turn_addr,
                                   "username", user, "password", pass, "realm", realm));
    } else {
        ctl_reply_error(r, "unknown command \"%s\" (status, records, turn-credentials)", cmd);
    }
}

/* text + more in one new string; frees both (more may be NULL: text is kept as it is). NULL
 * when out of memory. */
static char *metrics_append(char *text, char *more)
{
    if (!text || !more) {
        free(more);
        return text;
    }
    char *both = malloc(strlen(text) + strlen(more) + 1);
    if (both) {
        strcpy(both, text);
        strcat(both, more);
    }
    free(text);
    free(more);
    return both;
}

static void on_metrics(struct httpd_req *r, void *ud)
{
    struct sn_state *st = ud;
    if (strcmp(httpd_req_path(r), "/metrics") != 0 || strcmp(httpd_req_method(r), "GET") != 0) {
        httpd_respond_unrouted(r, strcmp(httpd_req_path(r), "/metrics") ? NULL : "GET");
        return;
    }
    char *text = sn_metrics(st->sn);
    if (st->stun) {
        struct stun_stats ss;
        stun_server_stats(st->stun, &ss);
        char buf[512];
        snprintf(buf, sizeof(buf),
                 "# TYPE p2p_stun_answered_total counter\n"
                 "p2p_stun_answered_total{kind=\"rfc5389\"} %llu\n"
                 "p2p_stun_answered_total{kind=\"rfc3489\"} %llu\n"
                 "# TYPE p2p_stun_errors_total counter\np2p_stun_errors_total %llu\n"
                 "# TYPE p2p_stun_dropped_total counter\np2p_stun_dropped_total %llu\n",
                 (unsigned long long)(ss.answered - ss.classic), (unsigned long long)ss.classic,
                 (unsigned long long)ss.errors, (unsigned long long)ss.dropped);
        text = metrics_append(text, strdup(buf));
    }
    if (st->turn)
        text = metrics_append(text, turn_server_metrics(st->turn));
    if (st->chans) /* the front end's channels to ordinary nodes */
        text = metrics_append(text, chans_metrics(st->chans));
    if (st->media)
        text = metrics_append(text, media_metrics(st->media));
    if (!text) {
        httpd_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    httpd_respond(r, 200, "text/plain; version=0.0.4", text, strlen(text));
    free(text);
}

/* Every link is a descriptor: make room for max_connections (up to the hard limit). */
static void raise_fd_limit(long long want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= (rlim_t)want)
        return;
    rlim_t old = rl.rlim_cur;
    rl.rlim_cur =
        rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= (rlim_t)want ? (rlim_t)want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur >= (rlim_t)want) {
        log_info("main", "descriptor limit raised from %llu to %llu", (unsigned long long)old,
                 (unsigned long long)rl.rlim_cur);
        return;
    }
    log_warn("main",
             "max_connections needs %lld descriptors; the limit is %llu (raise the hard "
             "limit, e.g. LimitNOFILE= in a systemd unit)",
             want, (unsigned long long)rl.rlim_cur);
}

static bool is_wildcard(const char *hostport)
{
    return !strncmp(hostport, "0.0.0.0:", 8) || !strncmp(hostport, "[::]:", 5);
}

static bool announce_wanted(void *ud, struct announce_load *load)
{
    struct sn_state *st = ud;
    load->attached = sn_attached(st->sn);
    load->capacity = (unsigned long)st->cfg->max_attached;
    load->uptime_s = ev_now(st->loop) - st->started_at;
    return sn_is_healthy(st->sn); /* an unhealthy node withdraws until it is healthy again */
}

/* LAN discovery (docs/protocol.md 6): answered only while this node takes ordinary nodes. */
static int lan_self(void *ud, struct landisc_sn *out)
{
    struct sn_state *st = ud;
    if (!sn_is_healthy(st->sn) || sn_attached(st->sn) >= (size_t)st->cfg->max_attached)
        return -1;
    snprintf(out->id, sizeof(out->id), "%s", st->id_hex);
    snprintf(out->addr, sizeof(out->addr), "%s",
             st->cfg->advertise ? st->cfg->advertise : st->cfg->listen);
    return 0;
}

static void on_health(void *ud, bool healthy)
{
    struct sn_state *st = ud;
    /* Listed (or withdrawn) now rather than at the next period. */
    announcer_poke(st->announcer);
}

/* ---- joining through the bootstrap servers (docs/protocol.md 3.2) ---- */

static void bs_round(struct sn_state *st);

static void bs_add(struct sn_state *st, const char *addr)
{
    const char *self = st->cfg->advertise ? st->cfg->advertise : st->cfg->listen;
    if (!strcmp(addr, self) || cfg_parse_hostport(addr, NULL, 0, NULL) != 0)
        return;
    for (size_t i = 0; i < st->found.n; i++)
        if (!strcmp(st->found.items[i], addr))
            return;
    char **v = realloc(st->found.items, (st->found.n + 1) * sizeof(char *));
    if (!v)
        return;
    st->found.items = v;
    if ((v[st->found.n] = strdup(addr)) != NULL)
        st->found.n++;
}

static void bs_found_free(struct sn_state *st)
{
    for (size_t i = 0; i < st->found.n; i++)
        free(st->found.items[i]);
    free(st->found.items);
    st->found.items = NULL;
    st->found.n = 0;
}

static void bs_done(const struct http_response *resp, void *ud)
{
    struct sn_state *st = ud;
    st->bs_pending--;
    if (resp->kind == HTTP_ERR_CANCELLED)
        return;
    if (resp->kind != HTTP_OK || resp->status != 200) {
        log_warn("main", "bootstrap server: %s",
                 resp->error ? resp->error : "unexpected answer to GET /v1/supernodes");
    } else {
        json_t *j = json_loads(resp->body, JSON_REJECT_DUPLICATES, NULL);
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(j, "supernodes"), i, e)
        {
            const char *a = json_string_value(json_object_get(e, "address"));
            if (a)
                bs_add(st, a);
        }
        json_decref(j);
    }
    if (st->bs_pending > 0)
        return;
    if (st->found.n == 0) {
        log_warn("main",
                 "the bootstrap servers list no super node yet (the first super node of "
                 "an overlay starts with --seed); asking again in %.0f s",
                 st->bs_backoff);
        ev_timer_set(&st->bs_retry, st->bs_backoff, 0.);
        ev_timer_start(st->loop, &st->bs_retry);
        st->bs_backoff = st->bs_backoff * 2 > 60 ? 60 : st->bs_backoff * 2;
        return;
    }
    log_info("main", "the bootstrap servers list %zu super nodes: joining through them",
             st->found.n);
    const char **addrs = calloc(st->found.n + 1, sizeof(char *));
    if (addrs) {
        for (size_t i = 0; i < st->found.n; i++)
            addrs[i] = st->found.items[i];
        sn_start_join(st->sn, addrs);
        free(addrs);
    }
}

static void bs_round(struct sn_state *st)
{
    for (size_t i = 0; i < st->doc->n_bootstrap_urls; i++) {
        char url[1024];
        snprintf(url, sizeof(url), "%s/v1/supernodes?count=8", st->doc->bootstrap_urls[i]);
        struct http_request req = {.url = url, .ca_file = st->creds.ca_file, .timeout_ms = 10000};
        int rc = http_request_start(st->http, &req, bs_done, st);
        if (rc == 0)
            st->bs_pending++;
        else
            log_warn("main", "bootstrap server %s: cannot ask: %s", url, strerror(-rc));
    }
    if (st->bs_pending == 0) {
        ev_timer_set(&st->bs_retry, st->bs_backoff, 0.);
        ev_timer_start(st->loop, &st->bs_retry);
    }
}

static void bs_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct sn_state *st = w->data;
    bs_found_free(st);
    bs_round(st);
}

/* What the overlay delivers to the front end's client: channel signalling, or SIP of the calls
 * it sent to nodes that take no channels. */
static void sip_delivered(void *ud, const char *from, json_t *payload)
{
    struct sn_state *st = ud;
    const char *text = json_string_value(json_object_get(payload, "sip"));
    const char *sn = json_string_value(json_object_get(payload, "sn"));
    if (json_object_get(payload, "ice") && st->chans)
        chans_signal(st->chans, from, payload);
    else if (text && sn && st->sip && strlen(sn) == NID_HEX_LEN)
        sipfront_from_node(st->sip, from, sn, text,
                           json_string_length(json_object_get(payload, "sip")), false);
    else
        log_info("main", "message through the overlay from %.8s: not for the SIP front end", from);
}

static void sip_on_channel(void *ud, const char *node, const char *sn, const char *text, size_t len)
{
    struct sn_state *st = ud;
    if (st->sip)
        sipfront_from_node(st->sip, node, sn, text, len, true);
}

static void sip_media_frame(void *ud, const char *node, const uint8_t *frame, size_t len)
{
    struct sn_state *st = ud;
    media_frame(st->media, node, frame, len);
}

/* The public SIP front end (sipfront.h) and the overlay client it works through, attached to
 * this very node first. */
static int start_sip(struct sn_state *st, struct ev_loop *loop, const struct overlay_doc *doc,
                     const char *hex)
{
    const struct sn_config *cfg = st->cfg;
    char err[512];
    if (!st->have_creds) {
        log_error("main", "the SIP front end signs records as this node: it needs the enrolled "
                          "credentials of state_dir");
        return -1;
    }
    st->self_addr = cfg->advertise ? cfg->advertise : cfg->listen;
    struct on_params op = {
        .state_dir = cfg->state_dir,
        .creds = &st->creds,
        .supernodes = &st->self_addr,
        .n_supernodes = 1,
        .bootstrap_urls = (const char *const *)doc->bootstrap_urls,
        .n_bootstrap_urls = doc->n_bootstrap_urls,
        .sn_timeout_s = 3.0,
        .attach_timeout_s = 3.0,
        .request_timeout_s = 10.0,
        .backoff_base_s = 0.5,
        .backoff_max_s = 10.0,
        .record_lifetime_s = 3600,
        .on_deliver = sip_delivered,
        .channels = true, /* asks this node for TURN credentials, for its channels */
        .ud = st,
    };
    if (!(st->on = onode_new(loop, &op, err, sizeof(err)))) {
        log_error("main", "SIP front end: %s", err);
        return -1;
    }
    onode_start(st->on);
    struct sipfront_params fp = {
        .listen = cfg->sip_listen,
        .advertise = cfg->sip_advertise,
        .domain = cfg->sip_domain,
        .users_file = cfg->sip_users,
        .overlay = doc->overlay,
        .registrar = st->creds.id.uri,
        .node_id = hex,
        .max_expires = cfg->sip_max_expires,
        .rate = (double)cfg->sip_rate,
        .channels = true, /* start_sip() opens them below */
    };
    if (cfg->sip_dns &&
        !(fp.dns = st->dns = dns_new(loop, cfg->sip_dns_server, err, sizeof(err)))) {
        log_error("main", "sip_dns: %s", err);
        return -1;
    }
    if (!(st->sip = sipfront_start(loop, st->on, &fp, err, sizeof(err)))) {
        log_error("main", "SIP front end: %s", err);
        return -1;
    }
    /* Channels to the nodes of the overlay's users, gathering on the address this node is
     * known at (its link to itself may never touch a socket). */
    unsigned port;
    const char *ap = cfg->sip_advertise ? cfg->sip_advertise : st->self_addr;
    const char *hosts[1] = {st->chan_host};
    struct chan_params cp = {
        .on = st->on, .on_sip = sip_on_channel, .on_media = sip_media_frame, .ud = st};
    if (cfg_parse_hostport(ap, st->chan_host, sizeof(st->chan_host), &port) == 0 &&
        strcmp(st->chan_host, "0.0.0.0") != 0 && strcmp(st->chan_host, "::") != 0) {
        cp.addresses = hosts;
        cp.n_addresses = 1;
    }
    if (!(st->chans = chans_new(loop, &cp, err, sizeof(err)))) {
        log_error("main", "SIP front end: channels: %s", err);
        return -1;
    }
    sipfront_use_channels(st->sip, st->chans);
    /* Phones behind NATs: latched to where their packets come from; two of them in one call
     * relayed too. */
    if (cfg->media.on && !(st->media = media_start(loop, &cfg->media, cfg->sip_listen, st->chans,
                                                   false, true, err, sizeof(err)))) {
        log_error("main", "SIP front end: %s", err);
        return -1;
    }
    if (st->media)
        sipfront_use_media(st->sip, st->media);
    return 0;
}

/* The TURN relay on the STUN server's socket (turn.h); stun_addr is what clients are told. */
static int start_turn(struct sn_state *st, struct ev_loop *loop, const char *stun_addr,
                      const char *realm)
{
    const struct sn_config *cfg = st->cfg;
    char relay[256] = "", err[512];
    unsigned port;
    if (cfg->turn_relay_ip)
        snprintf(relay, sizeof(relay), "%s", cfg->turn_relay_ip);
    else if (cfg_parse_hostport(
                 cfg->stun_listen && !is_wildcard(cfg->stun_listen) ? cfg->stun_listen : stun_addr,
                 relay, sizeof(relay), &port) != 0)
        relay[0] = '\0';
    struct in_addr v4;
    if (!cfg->turn_relay_ip && inet_pton(AF_INET, relay, &v4) != 1) {
        log_warn("main",
                 "TURN: the relay is IPv4 only and %s is not an IPv4 address: running "
                 "without TURN (set turn_relay_ip)",
                 relay[0] ? relay : stun_addr);
        return 0;
    }
    unsigned lo = 0, hi = 0;
    char tail;
    if (sscanf(cfg->turn_ports, "%u-%u%c", &lo, &hi, &tail) != 2) {
        log_error("main", "TURN: turn_ports \"%s\": expected LOW-HIGH, e.g. 49152-65535 (0-0: any)",
                  cfg->turn_ports);
        return -1;
    }
    struct turn_params tp = {
        .realm = realm,
        .relay_ip = relay,
        .port_min = lo,
        .port_max = hi,
        .max_allocations = (unsigned)cfg->turn_max_allocations,
        .allocations_per_node = (unsigned)cfg->turn_allocations_per_node,
        .permissions_per_alloc = (unsigned)cfg->turn_permissions_per_allocation,
        .channels_per_alloc = (unsigned)cfg->turn_channels_per_allocation,
        .bandwidth_kbps = (unsigned)cfg->turn_bandwidth_kbps,
        .max_lifetime_s = (unsigned)cfg->turn_max_lifetime_s,
        .allow_peers = (const char *const *)cfg->turn_allow_peers.items,
        .n_allow_peers = cfg->turn_allow_peers.n,
    };
    if (tp.max_lifetime_s < 600)
        tp.default_lifetime_s = tp.max_lifetime_s;
    st->turn = turn_server_start(loop, st->stun, &tp, err, sizeof(err));
    if (!st->turn) {
        log_error("main", "TURN: %s (or set \"turn\": false)", err);
        return -1;
    }
    snprintf(st->turn_addr, sizeof(st->turn_addr), "%s", stun_addr);
    return 0;
}

static int sn_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct sn_config *cfg = p;
    struct sn_state *st = calloc(1, sizeof(*st));
    if (!st)
        return -1;
    st->cfg = cfg;
    *state = st;
    struct renewer_config rc = {
        .state_dir = cfg->state_dir,
        .margin_s = (double)cfg->cert_renew_margin_s,
        .check_interval_s = (double)cfg->cert_check_interval_s,
        .on_renewed = sn_renewed,
        .ud = st,
    };
    st->renewer = renewer_start(loop, &rc); /* NULL until enrolled into state_dir */
    char err[512];
    struct tls_config tc = sn_tls_config(cfg);
    struct overlay_doc defaults;
    memset(&defaults, 0, sizeof(defaults));
    overlay_doc_defaults(&defaults);
    const struct overlay_doc *doc = &defaults;
    if (!cfg->cert_file) {
        if (node_creds_load(cfg->state_dir, &st->creds, err, sizeof(err)) != 0) {
            log_warn("main",
                     "not enrolled (%s): run 'supernode enroll' or set ca_file, cert_file "
                     "and key_file; not joining any ring",
                     err);
            return 0;
        }
        st->have_creds = true;
        tc.ca_file = st->creds.ca_file;
        tc.cert_file = st->creds.cert_file;
        tc.key_file = st->creds.key_file;
        doc = &st->creds.doc;
        if (strcmp(doc->overlay, cfg->overlay) != 0) {
            log_error("main",
                      "state_dir %s was enrolled in overlay \"%s\", configured overlay is "
                      "\"%s\"",
                      cfg->state_dir, doc->overlay, cfg->overlay);
            return -1;
        }
    }
    if (!cfg->advertise && is_wildcard(cfg->listen)) {
        log_error("main",
                  "listen is %s: set \"advertise\" to the address other nodes reach "
                  "this one at",
                  cfg->listen);
        return -1;
    }
    /* STUN (seed 004 section 5.5): on by default; a taken default port is not fatal. */
    char stun_addr[300] = "";
    {
        const char *base = cfg->advertise ? cfg->advertise : cfg->listen;
        char host[256];
        unsigned port;
        if (cfg->stun_listen) {
            snprintf(stun_addr, sizeof(stun_addr), "%s", cfg->stun_listen);
        } else if (cfg_parse_hostport(cfg->listen, host, sizeof(host), &port) == 0) {
            snprintf(stun_addr, sizeof(stun_addr), strchr(host, ':') ? "[%s]:3478" : "%s:3478",
                     host);
        }
        if (stun_addr[0]) {
            st->stun = stun_server_start(loop, stun_addr, err, sizeof(err));
            if (!st->stun && cfg->stun_listen) {
                log_error("main", "STUN: %s", err);
                return -1;
            }
            if (!st->stun) {
                log_warn("main", "STUN: %s; running without a STUN server (set stun_listen)", err);
                stun_addr[0] = '\0';
            } else {
                /* What attaching nodes are told: our advertised host, the bound port. */
                char ahost[256];
                unsigned aport;
                if (cfg_parse_hostport(
                        cfg->stun_listen && !is_wildcard(cfg->stun_listen) ? stun_addr : base,
                        ahost, sizeof(ahost), &aport) == 0)
                    snprintf(stun_addr, sizeof(stun_addr), strchr(ahost, ':') ? "[%s]:%d" : "%s:%d",
                             ahost, stun_server_port(st->stun));
                log_info("main", "STUN server on UDP %s", stun_addr);
                if (cfg->turn && start_turn(st, loop, stun_addr, cfg->overlay) != 0)
                    return -1;
            }
        }
    }
    raise_fd_limit(cfg->max_connections + 64);
    struct sn_params sp = {
        .overlay = cfg->overlay,
        .listen = cfg->listen,
        .advertise = cfg->advertise,
        .tls = tc,
        .quotas = {(size_t)cfg->quota_per_key, (size_t)cfg->quota_per_owner,
                   (size_t)cfg->quota_per_owner_bytes, (size_t)cfg->quota_per_proxy,
                   (size_t)cfg->quota_per_proxy_bytes},
        .max_connections = (size_t)cfg->max_connections,
        .peer_idle_s = (double)cfg->peer_idle_s,
        .sn_msg_rate = (double)cfg->sn_msg_rate,
        .dial_rate = (double)cfg->dial_rate,
        .on_health = on_health,
        .max_attached = (size_t)cfg->max_attached,
        .on_rate = (double)cfg->on_rate,
        .on_inflight = (unsigned)cfg->on_inflight,
        .stun = stun_addr[0] ? stun_addr : NULL,
        .turn = st->turn,
        .turn_ttl_s = (unsigned)cfg->turn_credential_ttl_s,
        .ud = st,
    };
    if (sn_params_from_doc(&sp, doc))
        log_info("main", "max_frame raised to %zu bytes to carry records of %lld bytes",
                 sp.tls.max_frame, (long long)doc->max_record_bytes);
    st->sn = sn_new(loop, &sp, err, sizeof(err));
    if (!st->sn) {
        log_error("main", "%s", err);
        return -1;
    }
    st->ctl_path = control_path(cfg);
    st->ctl = ctl_server_start(loop, st->ctl_path, on_control, st, err, sizeof(err));
    if (!st->ctl) {
        log_error("main", "control socket: %s", err);
        return -1;
    }
    if (cfg->metrics_listen) {
        struct httpd_config hc = {.listen = cfg->metrics_listen, .max_connections = 16};
        st->metrics = httpd_start(loop, &hc, on_metrics, st, err, sizeof(err));
        if (!st->metrics) {
            log_error("main", "metrics: %s", err);
            return -1;
        }
        log_info("main", "metrics on http://%s/metrics", cfg->metrics_listen);
    }
    const struct peer_identity *self = sn_identity(st->sn);
    char hex[NID_HEX_LEN + 1];
    log_info("main",
             "overlay %s: listening on %s as node %s (replication %lld, successor list "
             "%lld, stabilize every %lld s)",
             cfg->overlay, cfg->listen, nid_to_hex(&self->node_id, hex),
             (long long)doc->replication_factor, (long long)doc->successor_list,
             (long long)doc->stabilize_s);
    snprintf(st->id_hex, sizeof(st->id_hex), "%s", hex);
    if (cfg->lan_discovery_if) {
        st->lan = landisc_responder_start(loop, doc->lan_discovery, cfg->lan_discovery_if,
                                          doc->overlay, lan_self, st, err, sizeof(err));
        if (!st->lan) {
            log_error("main", "%s", err);
            return -1;
        }
    }
    const struct cli_opts *o = daemon_cli_opts();
    bool seed = cfg->seed || (o && cli_opt(o, "seed"));
    st->loop = loop;
    st->doc = doc;
    st->started_at = ev_now(loop);
    if (st->have_creds && doc->n_bootstrap_urls > 0) {
        st->http = http_client_new(loop);
        if (!st->http) {
            log_error("main", "cannot start the HTTPS client");
            return -1;
        }
        struct announce_config ac = {
            .urls = (const char *const *)doc->bootstrap_urls,
            .n_urls = doc->n_bootstrap_urls,
            .ca_file = st->creds.ca_file,
            .cert_file = st->creds.cert_file,
            .key_file = st->creds.key_file,
            .node_id = hex,
            .address = cfg->advertise ? cfg->advertise : cfg->listen,
            .wanted = announce_wanted,
            .ud = st,
        };
        st->announcer = announcer_start(loop, st->http, &ac);
    }
    if (!seed && cfg->join.n == 0 && st->have_creds && doc->n_bootstrap_urls > 0) {
        /* Find the ring through the bootstrap servers of the overlay document. */
        ev_timer_init(&st->bs_retry, bs_retry_cb, 1.0, 0.);
        st->bs_retry.data = st;
        st->bs_backoff = 2.0;
        bs_round(st);
    } else if (seed || cfg->join.n == 0) {
        if (!seed)
            log_info("main", "no join addresses and no bootstrap servers: starting a new ring");
        sn_start_seed(st->sn);
    } else {
        const char **addrs = calloc(cfg->join.n + 1, sizeof(char *));
        if (!addrs)
            return -1;
        for (size_t i = 0; i < cfg->join.n; i++)
            addrs[i] = cfg->join.items[i];
        sn_start_join(st->sn, addrs);
        free(addrs);
    }
    return cfg->sip_listen ? start_sip(st, loop, doc, hex) : 0;
}

static void sn_left(void *ud)
{
    (void)ud; /* the loop ends once the links have closed */
}

static void sn_stop_rest(struct sn_state *st);

/* The front end's records are removed through the ring before this node leaves it. */
static void sip_stopped(void *ud)
{
    sn_stop_rest(ud);
}

static void sn_stop(struct ev_loop *loop, void *p)
{
    struct sn_state *st = p;
    sipfront_stop(st->sip);
    st->sip = NULL;
    media_free(st->media);
    st->media = NULL;
    chans_free(st->chans);
    st->chans = NULL;
    dns_free(st->dns);
    st->dns = NULL;
    if (st->on) {
        onode_stop(st->on, sip_stopped, st);
        return;
    }
    sn_stop_rest(st);
}

static void sn_stop_rest(struct sn_state *st)
{
    struct ev_loop *loop = st->loop;
    renewer_stop(st->renewer);
    st->renewer = NULL;
    ctl_server_stop(st->ctl);
    st->ctl = NULL;
    httpd_stop(st->metrics);
    st->metrics = NULL;
    sn_set_turn(st->sn, NULL); /* attached nodes may still ask while the node leaves */
    turn_server_stop(st->turn);
    st->turn = NULL;
    stun_server_stop(st->stun);
    st->stun = NULL;
    landisc_responder_stop(st->lan);
    st->lan = NULL;
    if (st->http)
        ev_timer_stop(loop, &st->bs_retry);
    /* Off the bootstrap lists first, so that no newcomer is sent to a node that is leaving. */
    announcer_withdraw(st->announcer, NULL, NULL);
    if (st->sn)
        sn_leave(st->sn, sn_left, st);
}

static void sn_cleanup(void *p)
{
    struct sn_state *st = p;
    if (!st)
        return;
    renewer_stop(st->renewer);
    ctl_server_stop(st->ctl);
    if (st->http) {
        ev_timer_stop(st->loop, &st->bs_retry);
        http_client_free(st->http);
    }
    announcer_free(st->announcer);
    httpd_stop(st->metrics);
    sn_set_turn(st->sn, NULL);
    turn_server_stop(st->turn);
    stun_server_stop(st->stun);
    landisc_responder_stop(st->lan);
    bs_found_free(st);
    sipfront_stop(st->sip);
    media_free(st->media);
    chans_free(st->chans);
    dns_free(st->dns);
    onode_free(st->on);
    sn_free(st->sn);
    if (st->have_creds)
        node_creds_free(&st->creds);
    free(st->ctl_path);
    free(st);
}

/* ---- "supernode status" ---- */

static void print_peer(const char *label, json_t *p)
{
    if (!json_is_object(p)) {
        printf("%-12s none\n", label);
        return;
    }
    printf("%-12s %s at %s\n", label, json_string_value(json_object_get(p, "id")),
           json_string_value(json_object_get(p, "addr")));
}

static int sn_status_cmd(const struct cli_opts *o, const struct sn_config *cfg)
{
    char *path = control_path(cfg);
    char err[512];
    json_t *req = json_pack("{s:s}", "cmd", "status"), *res = NULL;
    int rc = ctl_call(path, req, 5000, &res, err, sizeof(err));
    json_decref(req);
    free(path);
    if (rc != 0) {
        fprintf(stderr, "supernode: status: %s\n", err);
        return 1;
    }
    if (!json_is_true(json_object_get(res, "ok"))) {
        fprintf(stderr, "supernode: status: %s\n",
                json_string_value(json_object_get(res, "error")) ?: "refused");
        json_decref(res);
        return 1;
    }
    if (cli_opt(o, "json")) {
        char *txt = json_dumps(res, JSON_COMPACT);
        printf("%s\n", txt);
        free(txt);
        json_decref(res);
        return 0;
    }
    json_t *node = json_object_get(res, "node"), *store = json_object_get(res, "store");
    json_t *rq = json_object_get(res, "requests");
    printf("node         %s at %s\n", json_string_value(json_object_get(node, "id")),
           json_string_value(json_object_get(node, "addr")));
    printf("state        %s in overlay %s, up %.0f s\n",
           json_string_value(json_object_get(res, "state")),
           json_string_value(json_object_get(res, "overlay")),
           json_real_value(json_object_get(res, "uptime_s")));
    print_peer("predecessor", json_object_get(res, "pred"));
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(res, "succ"), i, e)
    {
        char label[40];
        snprintf(label, sizeof(label), "successor %u", (unsigned)(i + 1));
        print_peer(label, e);
    }
    printf("fingers      %zu distinct\n", json_array_size(json_object_get(res, "fingers")));
    printf("records      %lld primary, %lld replicas, %lld tombstones (%lld keys, %lld bytes; "
           "%lld copies of each)\n",
           json_integer_value(json_object_get(store, "primary")),
           json_integer_value(json_object_get(store, "replica")),
           json_integer_value(json_object_get(store, "tombstones")),
           json_integer_value(json_object_get(store, "keys")),
           json_integer_value(json_object_get(store, "bytes")),
           json_integer_value(json_object_get(res, "replication")));
    long long answered = json_integer_value(json_object_get(rq, "replies")) +
                         json_integer_value(json_object_get(rq, "answered"));
    (void)answered;
    printf("ordinary     %lld attached (at most %lld); %s\n",
           json_integer_value(json_object_get(res, "attached")),
           json_integer_value(json_object_get(res, "max_attached")),
           json_is_true(json_object_get(res, "healthy")) ? "healthy"
                                                         : "unhealthy: not accepting any");
    printf("links        %lld open\n",
           json_integer_value(json_object_get(json_object_get(res, "links"), "open")));
    json_t *turn = json_object_get(res, "turn");
    if (turn)
        printf("turn         %lld allocations (at most %lld), %lld permissions, %lld channels; "
               "%lld created; refused %lld auth, %lld quota, %lld peer; relayed %lld/%lld "
               "packets to peers/clients, %lld dropped over bandwidth\n",
               json_integer_value(json_object_get(turn, "allocations")),
               json_integer_value(json_object_get(turn, "max_allocations")),
               json_integer_value(json_object_get(turn, "permissions")),
               json_integer_value(json_object_get(turn, "channels")),
               json_integer_value(json_object_get(turn, "created")),
               json_integer_value(json_object_get(turn, "refused_auth")),
               json_integer_value(json_object_get(turn, "refused_quota")),
               json_integer_value(json_object_get(turn, "refused_peer")),
               json_integer_value(json_object_get(turn, "packets_to_peer")),
               json_integer_value(json_object_get(turn, "packets_to_client")),
               json_integer_value(json_object_get(turn, "dropped_bandwidth")));
    printf("requests     %lld originated, %lld forwarded, %lld answered, %lld timed out\n",
           json_integer_value(json_object_get(rq, "originated")),
           json_integer_value(json_object_get(rq, "forwarded")),
           json_integer_value(json_object_get(rq, "answered")),
           json_integer_value(json_object_get(rq, "timeouts")));
    json_decref(res);
    return 0;
}

/* ---- "supernode ping ADDR": a one-shot client on its own loop ---- */

struct ping_state {
    const char *target;
    char tid[MSG_TID_LEN + 1];
    ev_tstamp sent_at;
    int status; /* exit status once known */
    bool done;
    ev_timer guard;
};

static void ping_open(struct conn *c, void *ud)
{
    struct ping_state *ps = ud;
    char who[512];
    printf("connected to %s: %s\n", ps->target, cred_identity_str(conn_peer(c), who, sizeof(who)));
    msg_new_tid(ps->tid);
    ps->sent_at = ev_time();
    if (conn_send(c, "ping", MSG_REQ, ps->tid, NULL) != 0) {
        fprintf(stderr, "supernode: ping %s: cannot send\n", ps->target);
        ps->status = 1;
        conn_close(c);
    }
}

static void ping_message(struct conn *c, const struct msg *m, void *ud)
{
    struct ping_state *ps = ud;
    if (strcmp(m->tid, ps->tid) != 0)
        return;
    if (m->kind == MSG_RES) {
        const char *nid = json_string_value(json_object_get(m->body, "node_id"));
        printf("reply from %s: node %s, time %.2f ms\n", ps->target, nid ? nid : "?",
               (ev_time() - ps->sent_at) * 1000.0);
        ps->status = 0;
    } else {
        const char *code = json_string_value(json_object_get(m->body, "code"));
        fprintf(stderr, "supernode: ping %s: refused: %s\n", ps->target, code ? code : "error");
        ps->status = 1;
    }
    conn_close(c);
}

static void ping_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct ping_state *ps = ud;
    if (r != CONN_CLOSED_LOCAL || ps->status < 0) {
        /* The detail says it all when there is one ("peer refused our certificate: ..."). */
        fprintf(stderr, "supernode: ping %s: %s\n", ps->target,
                detail && *detail ? detail : conn_close_reason_str(r));
        ps->status = 1;
    }
    ps->done = true;
}

static void ping_guard(struct ev_loop *loop, ev_timer *w, int revents)
{
    ev_break(loop, EVBREAK_ALL);
}

static int sn_ping(const struct cli_opts *o, const struct sn_config *cfg)
{
    if (o->argc != 1 || cfg_parse_hostport(o->argv[0], NULL, 0, NULL) != 0) {
        cli_error(&sn_prog, "ping needs one numeric address like 192.0.2.7:7000");
        return 2;
    }
    char err[512];
    struct tls_config tc = sn_tls_config(cfg);
    struct node_creds creds;
    bool have_creds = false;
    if (!cfg->cert_file) {
        if (node_creds_load(cfg->state_dir, &creds, err, sizeof(err)) != 0) {
            cli_error(&sn_prog,
                      "ping needs credentials: enroll first or set ca_file, cert_file "
                      "and key_file (%s)",
                      err);
            return 2;
        }
        have_creds = true;
        tc.ca_file = creds.ca_file;
        tc.cert_file = creds.cert_file;
        tc.key_file = creds.key_file;
    }
    if (!o->verbose) /* the outcome is printed; the transport's own lines would repeat it */
        log_set_level(LL_ERROR);
    struct tls_ctx *tls = tls_ctx_new(&tc, err, sizeof(err));
    if (have_creds)
        node_creds_free(&creds);
    if (!tls) {
        fprintf(stderr, "supernode: %s\n", err);
        return 1;
    }
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct ping_state ps = {.target = o->argv[0], .status = -1};
    static const struct conn_cbs cbs = {
        .on_open = ping_open, .on_message = ping_message, .on_close = ping_close};
    struct conn *c = conn_connect(loop, tls, ps.target, &cbs, &ps, err, sizeof(err));
    if (!c) {
        fprintf(stderr, "supernode: ping %s: %s\n", ps.target, err);
        ps.status = 1;
    } else {
        /* The transport's own timeouts end the attempt; this only guards against a bug. */
        ev_timer_init(&ps.guard, ping_guard, (double)cfg->handshake_timeout_ms / 1000.0 + 5.0, 0.);
        ev_timer_start(loop, &ps.guard);
        ev_unref(loop);
        ev_run(loop, 0);
        ev_ref(loop);
        ev_timer_stop(loop, &ps.guard);
        if (!ps.done) {
            fprintf(stderr, "supernode: ping %s: no answer\n", ps.target);
            ps.status = 1;
        }
    }
    ev_loop_destroy(loop);
    tls_ctx_free(tls);
    return ps.status == 0 ? 0 : 1;
}

/* "supernode sip-user NAME": the users-file line, from a password on standard input. */
static int sn_sip_user(const struct cli_opts *o, const struct sn_config *c)
{
    if (o->argc != 1) {
        fprintf(stderr, "supernode: sip-user NAME (the password comes on standard input)\n");
        return 2;
    }
    if (!c->sip_domain) {
        fprintf(stderr, "supernode: sip-user: set sip_domain first (the password is hashed with "
                        "it)\n");
        return 2;
    }
    char pw[512];
    if (!fgets(pw, sizeof(pw), stdin) || !(pw[strcspn(pw, "\r\n")] = '\0', pw[0])) {
        fprintf(stderr, "supernode: sip-user: no password on standard input\n");
        return 1;
    }
    char ha1[33];
    if (strchr(o->argv[0], ':') || sipfront_ha1(o->argv[0], c->sip_domain, pw, ha1) != 0) {
        fprintf(stderr, "supernode: sip-user: unusable name\n");
        return 1;
    }
    printf("%s:%s\n", o->argv[0], ha1);
    return 0;
}

/* "supernode turn-credentials NODE-ID": through the local control socket. */
static int sn_turn_credentials(const struct cli_opts *o, const struct sn_config *cfg)
{
    if (o->argc != 1) {
        cli_error(&sn_prog, "turn-credentials needs one Node-ID (40 hex digits)");
        return 2;
    }
    char *path = control_path(cfg);
    char err[512];
    json_t *req = json_pack("{s:s,s:s}", "cmd", "turn-credentials", "node_id", o->argv[0]);
    json_t *res = NULL;
    int rc = ctl_call(path, req, 5000, &res, err, sizeof(err));
    json_decref(req);
    free(path);
    if (rc != 0) {
        fprintf(stderr, "supernode: turn-credentials: %s\n", err);
        return 1;
    }
    if (!json_is_true(json_object_get(res, "ok"))) {
        fprintf(stderr, "supernode: turn-credentials: %s\n",
                json_string_value(json_object_get(res, "error")) ?: "refused");
        json_decref(res);
        return 1;
    }
    json_object_del(res, "ok");
    char *txt = json_dumps(res, JSON_COMPACT);
    printf("%s\n", txt ? txt : "{}");
    free(txt);
    json_decref(res);
    return 0;
}

static int sn_command(const struct cli_opts *o, void *cfg)
{
    const struct sn_config *c = cfg;
    if (strcmp(o->command, "ping") == 0)
        return sn_ping(o, cfg);
    if (strcmp(o->command, "enroll") == 0)
        return enroll_command(&sn_prog, o, c->state_dir);
    if (strcmp(o->command, "renew") == 0)
        return renew_command(&sn_prog, o, c->state_dir);
    if (strcmp(o->command, "status") == 0)
        return sn_status_cmd(o, c);
    if (strcmp(o->command, "sip-user") == 0)
        return sn_sip_user(o, c);
    if (strcmp(o->command, "turn-credentials") == 0)
        return sn_turn_credentials(o, c);
    return 2;
}

static const struct daemon_spec sn_spec = {
    .prog = &sn_prog,
    .schema = &sn_schema,
    .cfg_size = sizeof(struct sn_config),
    .command = sn_command,
    .start = sn_start,
    .stop = sn_stop,
    .cleanup = sn_cleanup,
};

int main(int argc, char **argv)
{
    return daemon_main(&sn_spec, argc, argv);
}
