/*
 * ordinarynode: what a person runs on their own device (seed 004 sections
 * 4-7): it finds a super node, stays attached, publishes the user's location
 * and keeps it fresh, runs the SIP front end for the user's phone
 * (registrar.c, proxy.c), and may be promoted to a super node (promo.c);
 * `status`, `get`, `add`, `update` and `remove` talk to the running daemon
 * over its control socket. The core is on.c.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chan.h"
#include "media.h"
#include "ctlsock.h"
#include "daemon.h"
#include "enroll.h"
#include "fsutil.h"
#include "httpd.h"
#include "log.h"
#include "login_client.h"
#include "nodeid.h"
#include "on.h"
#include "promo.h"
#include "dns.h"
#include "registrar.h"
#include "record.h"
#include "renewer.h"

struct on_config {
    struct daemon_base base; /* must come first */
    char *overlay;
    char *state_dir;
    char *sip_listen;
    char *control_socket;
    struct cfg_strlist supernodes;
    struct cfg_strlist bootstrap_urls;
    long long cert_renew_margin_s;
    long long cert_check_interval_s;
    char *listen;
    long long keepalive_ms;
    long long sn_timeout_ms;
    long long attach_timeout_ms;
    long long request_timeout_ms;
    long long backoff_base_ms;
    long long backoff_max_ms;
    long long record_lifetime_s;
    bool register_user;
    bool stun;
    char *lan_discovery_if;
    long long lan_discovery_ms;
    char *advertise;
    bool sip;
    bool sip_via_overlay;
    long long sip_rate;
    bool sip_dns;
    char *sip_dns_server;
    struct cfg_strlist sip_register_from;
    bool never_promote;
    long long sn_max_attached;
    bool channels;
    char *metrics_listen;
    long long channel_setup_ms;
    long long channel_idle_s;
    struct cfg_strlist ice_addresses;
    bool channel_force_relay;
    struct media_settings media;
};

static const struct cfg_field on_fields[] = {
    DAEMON_BASE_FIELDS(struct on_config),
    {"overlay", CFG_STR, offsetof(struct on_config, overlay), 0, 0, NULL, "p2psip.local",
     "overlay name"},
    {"state_dir", CFG_PATH, offsetof(struct on_config, state_dir), 0, 0, NULL,
     "/var/lib/p2psip/ordinarynode", "where credentials and the super node cache are kept"},
    {"sip_listen", CFG_HOSTPORT, offsetof(struct on_config, sip_listen), 0, 0, NULL,
     "127.0.0.1:5060", "local SIP registrar/proxy address for softphones"},
    {"control_socket", CFG_PATH, offsetof(struct on_config, control_socket), 0, 0, NULL, NULL,
     "UNIX socket for the command-line client (default: <state_dir>/control.sock)"},
    {"supernodes", CFG_STRLIST, offsetof(struct on_config, supernodes), 0, 0, NULL, NULL,
     "super node addresses (host:port) to try first"},
    {"cert_renew_margin_s", CFG_INT, offsetof(struct on_config, cert_renew_margin_s), 0, 315360000,
     NULL, "0",
     "renew the certificate once less than this remains (0 = a third of "
     "its validity)"},
    {"cert_check_interval_s", CFG_INT, offsetof(struct on_config, cert_check_interval_s), 1, 86400,
     NULL, "3600",
     "how often the certificate's expiry is checked; also the longest time between two fetches "
     "of the overlay's revocation list"},
    {"bootstrap_urls", CFG_STRLIST, offsetof(struct on_config, bootstrap_urls), 0, 0, NULL, NULL,
     "bootstrap server URLs (https://...); default: those of the overlay document"},
    {"listen", CFG_HOSTPORT, offsetof(struct on_config, listen), 0, 0, NULL, NULL,
     "own overlay port, for super nodes' reachability probes (promotion); default: none"},
    {"keepalive_ms", CFG_INT, offsetof(struct on_config, keepalive_ms), 0, 3600000, NULL, "0",
     "keepalive period (0 = the super node's, at most 5000)"},
    {"sn_timeout_ms", CFG_INT, offsetof(struct on_config, sn_timeout_ms), 100, 600000, NULL, "3000",
     "a keepalive unanswered this long means the super node is gone"},
    {"attach_timeout_ms", CFG_INT, offsetof(struct on_config, attach_timeout_ms), 100, 600000, NULL,
     "3000", "connect + TLS + attach answer, per super node tried"},
    {"request_timeout_ms", CFG_INT, offsetof(struct on_config, request_timeout_ms), 100, 600000,
     NULL, "10000", "record requests (also while re-attaching)"},
    {"backoff_base_ms", CFG_INT, offsetof(struct on_config, backoff_base_ms), 1, 600000, NULL,
     "1000", "re-attaching waits a random time below this, doubled after each failed round"},
    {"backoff_max_ms", CFG_INT, offsetof(struct on_config, backoff_max_ms), 1, 3600000, NULL,
     "30000", "cap of the doubled back-off"},
    {"record_lifetime_s", CFG_INT, offsetof(struct on_config, record_lifetime_s), 10, 31536000,
     NULL, "3600", "lifetime of published records (capped by the overlay document)"},
    {"register", CFG_BOOL, offsetof(struct on_config, register_user), 0, 0, NULL, "true",
     "publish the user's location record while running"},
    {"stun", CFG_BOOL, offsetof(struct on_config, stun), 0, 0, NULL, "true",
     "ask the super node's STUN server for the reflexive address"},
    {"lan_discovery_if", CFG_STR, offsetof(struct on_config, lan_discovery_if), 0, 0, NULL, NULL,
     "IPv4 address of the interface on which to look for super nodes by multicast first (the "
     "overlay document's group); default: off"},
    {"lan_discovery_ms", CFG_INT, offsetof(struct on_config, lan_discovery_ms), 10, 10000, NULL,
     "300", "how long LAN discovery answers are collected"},
    {"advertise", CFG_HOSTPORT, offsetof(struct on_config, advertise), 0, 0, NULL, NULL,
     "address other nodes reach our overlay port at (a port forward, say); default: listen"},
    {"sip", CFG_BOOL, offsetof(struct on_config, sip), 0, 0, NULL, "true",
     "run the SIP front end (registrar for this node's user, proxy for its calls) on "
     "sip_listen"},
    {"sip_via_overlay", CFG_BOOL, offsetof(struct on_config, sip_via_overlay), 0, 0, NULL, "false",
     "have calls reach this node through the overlay (its super node and the attach link) "
     "rather than directly: for nodes that others cannot reach (behind NAT or a firewall)"},
    SIP_FRONT_FIELDS(struct on_config),
    {"sip_register_from", CFG_STRLIST, offsetof(struct on_config, sip_register_from), 0, 0, NULL,
     NULL,
     "networks phones may register from (a.b.c.d/len, v6/len, or any); default: loopback and "
     "private networks"},
    {"never_promote", CFG_BOOL, offsetof(struct on_config, never_promote), 0, 0, NULL, "false",
     "never become a super node, whatever the criteria say (docs/promotion.md)"},
    {"sn_max_attached", CFG_INT, offsetof(struct on_config, sn_max_attached), 1, 10000000, NULL,
     "1000", "once promoted: most ordinary nodes attached at once"},
    {"channels", CFG_BOOL, offsetof(struct on_config, channels), 0, 0, NULL, "true",
     "carry SIP to and from other nodes on channels of their own (ICE with the super node's "
     "STUN and TURN, then DTLS with the overlay certificates; docs/nat.md), the overlay "
     "(deliver) only when none can be opened"},
    {"metrics_listen", CFG_HOSTPORT, offsetof(struct on_config, metrics_listen), 0, 0, NULL, NULL,
     "plain-HTTP address for GET /metrics (Prometheus text: channels, ICE candidates, NAT "
     "mapping); keep it local (default: off)"},
    {"channel_setup_ms", CFG_INT, offsetof(struct on_config, channel_setup_ms), 500, 120000, NULL,
     "10000",
     "a channel not open this long after its first message is given up: its SIP goes "
     "through the overlay, and the peer is tried again a minute later"},
    {"channel_idle_s", CFG_INT, offsetof(struct on_config, channel_idle_s), 5, 86400, NULL, "300",
     "a channel without SIP this long is closed"},
    {"ice_addresses", CFG_STRLIST, offsetof(struct on_config, ice_addresses), 0, 0, NULL, NULL,
     "IP addresses of this host that channels gather host candidates on; default: the address "
     "the link to the super node leaves from (never every interface)"},
    {"channel_force_relay", CFG_BOOL, offsetof(struct on_config, channel_force_relay), 0, 0, NULL,
     "false",
     "channels use only relayed candidates (the super node's TURN): the nodes this one talks to "
     "never learn its addresses, at the cost of a relay on every call"},
    MEDIA_FIELDS(struct on_config, "64"),
};

static int on_validate(const void *p, char *err, size_t len)
{
    const struct on_config *c = p;
    for (size_t i = 0; i < c->supernodes.n; i++)
        if (cfg_parse_hostport(c->supernodes.items[i], NULL, 0, NULL) != 0) {
            snprintf(err, len,
                     "key \"supernodes\": item %zu \"%.80s\" is not a numeric "
                     "host:port",
                     i, c->supernodes.items[i]);
            return -1;
        }
    if (c->advertise && !c->listen) {
        snprintf(err, len, "key \"advertise\" needs \"listen\" (the port it forwards to)");
        return -1;
    }
    if (c->listen && !c->advertise &&
        (!strncmp(c->listen, "0.0.0.0:", 8) || !strncmp(c->listen, "[::]:", 5))) {
        snprintf(err, len,
                 "key \"listen\" is a wildcard address: set \"advertise\" to the address super "
                 "nodes reach this node at");
        return -1;
    }
    for (size_t i = 0; i < c->bootstrap_urls.n; i++)
        if (strncmp(c->bootstrap_urls.items[i], "https://", 8) != 0) {
            snprintf(err, len,
                     "key \"bootstrap_urls\": item %zu \"%.80s\" must be an https:// "
                     "URL",
                     i, c->bootstrap_urls.items[i]);
            return -1;
        }
    return 0;
}

static const struct cfg_schema on_schema = {on_fields, sizeof(on_fields) / sizeof(on_fields[0]),
                                            on_validate};

static const struct cli_option json_options[] = {
    {"json", NULL, "print the answer as JSON"},
    {NULL, NULL, NULL},
};

static const struct cli_option get_options[] = {
    {"json", NULL, "print the answer as JSON"},
    {"key", "HEX", "look up this 40-hex key instead of TYPE NAME"},
    {NULL, NULL, NULL},
};

static const struct cli_option store_options[] = {
    {"json", NULL, "print the answer as JSON"},
    {"lifetime", "SECONDS", "how long the record lives (refreshed while the node runs)"},
    {"no-update", NULL, "nobody may change or remove it before it expires (add only)"},
    {NULL, NULL, NULL},
};

static const struct cli_command on_commands[] = {
    {"run", "run the ordinary node", NULL},
    {"status", "status [--json]: the running node's super node, addresses and records",
     json_options},
    {"get",
     "get TYPE NAME | get --key HEX: look up records through the running node; their "
     "signatures are verified",
     get_options},
    {"add", "add TYPE NAME JSON: sign and store a record (kept fresh while the node runs)",
     store_options},
    {"update", "update TYPE NAME JSON: replace this user's record (or create it)", store_options},
    {"remove", "remove TYPE NAME: store a signed removal of this user's record", json_options},
    {"open-channel",
     "open-channel USER@DOMAIN: open a channel to the node of that user (its verified location "
     "record), as a call would; `status` then shows how it went",
     json_options},
    {"close-channels",
     "close-channels [NODE-ID]: close the running node's channels to other nodes (all, or the "
     "one to that node); the next SIP for a node opens a new one",
     json_options},
    {"enroll", "get this node's certificate from the login server (once)", enroll_options},
    {"renew", "renew this node's certificate (same Node-ID, new key)", renew_options},
    {NULL, NULL, NULL},
};

static const struct cli_prog on_prog = {
    .name = "ordinarynode",
    .summary = "Ordinary node of the p2psip overlay: attaches to a super node, publishes the "
               "user's location, serves the user's SIP phone as registrar and proxy, and becomes "
               "a super node itself when the overlay needs one and the host qualifies.",
    .commands = on_commands,
    .epilog = "Examples:\n"
              "  ordinarynode -c alice.json enroll --login https://ls:7443 --pin sha256:... "
              "--user alice\n"
              "  ordinarynode -c alice.json -d\n"
              "  ordinarynode -c alice.json get \"user location\" bob@p2psip.local\n"
              "  ordinarynode -c alice.json add note greeting '{\"text\":\"hi\"}' "
              "--lifetime 600\n",
    .schema = &on_schema,
};

/* ---- the daemon ---- */

struct on_state {
    const struct on_config *cfg;
    struct ev_loop *loop;
    struct renewer *renewer;
    struct node_creds creds;
    bool have_creds;
    struct onode *on;
    struct promo *promo;
    struct registrar *sip;
    struct chans *chans;
    struct media *media;
    struct httpd *metrics;
    struct dns_resolver *dns;
    struct ctl_server *ctl;
    const char **bs; /* bootstrap URLs in use */
};

static void on_deliver(void *ud, const char *from, json_t *payload)
{
    struct on_state *st = ud;
    if (json_object_get(payload, "ice")) {
        if (st->chans)
            chans_signal(st->chans, from, payload);
        else
            log_info("main", "channel signal from node %.8s: channels are off here: dropped", from);
    } else if (st->sip) {
        registrar_deliver(st->sip, from, payload);
    }
}

static void on_metrics(struct httpd_req *r, void *ud)
{
    struct on_state *st = ud;
    if (strcmp(httpd_req_path(r), "/metrics") != 0 || strcmp(httpd_req_method(r), "GET") != 0) {
        httpd_respond_unrouted(r, strcmp(httpd_req_path(r), "/metrics") ? NULL : "GET");
        return;
    }
    char *chans = st->chans ? chans_metrics(st->chans) : NULL;
    char *media = st->media ? media_metrics(st->media) : NULL;
    char *text = NULL;
    if (asprintf(&text, "# TYPE p2p_attached gauge\np2p_attached %d\n%s%s",
                 onode_sn_id(st->on) ? 1 : 0, chans ? chans : "", media ? media : "") < 0)
        text = NULL;
    free(chans);
    free(media);
    if (!text) {
        httpd_respond_error(r, 500, "internal", "out of memory");
        return;
    }
    httpd_respond(r, 200, "text/plain; version=0.0.4", text, strlen(text));
    free(text);
}

static void on_chan_sip(void *ud, const char *node, const char *sn, const char *text, size_t len)
{
    struct on_state *st = ud;
    if (st->sip)
        registrar_from_node(st->sip, node, sn, text, len);
}

static void on_chan_media(void *ud, const char *node, const uint8_t *frame, size_t len)
{
    struct on_state *st = ud;
    media_frame(st->media, node, frame, len);
}

static void on_invite(void *ud, const char *reason)
{
    struct on_state *st = ud;
    promo_invited(st->promo, reason);
}

static char *control_path(const struct on_config *cfg)
{
    return ctl_default_path(cfg->control_socket, cfg->state_dir);
}

static void ctl_answer(void *ud, const struct on_result *r)
{
    struct ctl_req *cr = ud;
    if (r->ok) {
        json_t *b = json_deep_copy(r->body);
        json_object_set_new(b, "ok", json_true());
        ctl_reply(cr, b);
    } else {
        ctl_reply(cr, json_pack("{s:b,s:s,s:s}", "ok", 0, "code", r->code, "error", r->reason));
    }
}

/* open-channel: the user's verified location record names the node and its super node. */
struct open_req {
    struct on_state *st;
    struct ctl_req *r;
    char user[REC_NAME_MAX + 1];
};

static void open_looked_up(void *ud, const struct on_result *res)
{
    struct open_req *o = ud;
    if (!res->ok) {
        ctl_reply(o->r,
                  json_pack("{s:b,s:s,s:s}", "ok", 0, "code", res->code, "error", res->reason));
        free(o);
        return;
    }
    size_t i;
    json_t *rec;
    json_array_foreach(json_object_get(res->body, "records"), i, rec)
    {
        json_t *v = json_object_get(rec, "value");
        const char *node = json_string_value(json_object_get(v, "node_id"));
        const char *sn = json_string_value(json_object_get(json_object_get(v, "sn"), "id"));
        if (!json_is_true(json_object_get(rec, "verified")) || !node || !sn ||
            strlen(node) != NID_HEX_LEN || strlen(sn) != NID_HEX_LEN ||
            !json_is_true(json_object_get(v, "channels")) || !strcmp(node, onode_id(o->st->on)))
            continue;
        bool ok = o->st->chans && chans_open(o->st->chans, node, sn);
        ctl_reply(o->r, json_pack("{s:b,s:s,s:b}", "ok", 1, "peer", node, "opening", ok));
        free(o);
        return;
    }
    ctl_reply_error(o->r, "no node of %s takes channels", o->user);
    free(o);
}

static void on_control(struct ctl_req *r, json_t *req, void *ud)
{
    struct on_state *st = ud;
    const char *cmd = json_string_value(json_object_get(req, "cmd"));
    const char *type = json_string_value(json_object_get(req, "type"));
    const char *name = json_string_value(json_object_get(req, "name"));
    if (!strcmp(cmd, "status")) {
        json_t *s = onode_status(st->on);
        if (st->promo)
            json_object_set_new(s, "promotion", promo_status(st->promo));
        if (st->sip)
            json_object_set_new(s, "sip", registrar_status(st->sip));
        if (st->chans) {
            json_t *c = chans_status(st->chans);
            json_object_set(s, "channels", json_object_get(c, "channels"));
            json_object_del(c, "channels");
            if (json_object_get(c, "candidates"))
                json_object_set(s, "candidates", json_object_get(c, "candidates"));
            json_object_del(c, "candidates");
            json_object_set(s, "nat_mapping", json_object_get(c, "nat_mapping"));
            json_object_del(c, "nat_mapping");
            json_object_set_new(s, "channel_counters", c);
        }
        if (st->media)
            json_object_set_new(s, "media", media_status(st->media));
        json_object_set_new(s, "ok", json_true());
        ctl_reply(r, s);
        return;
    }
    if (!strcmp(cmd, "get")) {
        const char *key = json_string_value(json_object_get(req, "key"));
        nid_t k;
        char hex[NID_HEX_LEN + 1];
        if (key) {
            if (nid_from_hex(&k, key) != 0) {
                ctl_reply_error(r, "key must be 40 hex digits");
                return;
            }
        } else if (!type || !name || nid_key(&k, type, name) != 0) {
            ctl_reply_error(r, "get needs key, or type and name");
            return;
        }
        onode_lookup(st->on, nid_to_hex(&k, hex), ctl_answer, r);
        return;
    }
    if (!strcmp(cmd, "store")) {
        const char *mode = json_string_value(json_object_get(req, "mode"));
        json_t *value = json_object_get(req, "value");
        if (!mode || (strcmp(mode, "add") && strcmp(mode, "update") && strcmp(mode, "remove"))) {
            ctl_reply_error(r, "mode must be add, update or remove");
            return;
        }
        if (!type || !*type || strlen(type) > REC_TYPE_MAX || !name || !*name ||
            strlen(name) > REC_NAME_MAX) {
            ctl_reply_error(r, "type (1-%d bytes) and name (1-%d bytes) are required", REC_TYPE_MAX,
                            REC_NAME_MAX);
            return;
        }
        if (strcmp(mode, "remove") && (!value || json_is_null(value))) {
            ctl_reply_error(r, "%s needs a value (any JSON but null)", mode);
            return;
        }
        onode_publish(st->on, mode, type, name, value,
                      (int64_t)json_integer_value(json_object_get(req, "lifetime")),
                      json_is_true(json_object_get(req, "no_update")), ctl_answer, r);
        return;
    }
    if (!strcmp(cmd, "open_channel")) {
        const char *user = json_string_value(json_object_get(req, "user"));
        nid_t k;
        char hex[NID_HEX_LEN + 1];
        struct open_req *o;
        if (!st->chans) {
            ctl_reply_error(r, "channels are off on this node");
            return;
        }
        if (!user || !strchr(user, '@') || strlen(user) > REC_NAME_MAX ||
            nid_key(&k, REC_TYPE_USER_LOCATION, user) != 0) {
            ctl_reply_error(r, "open_channel needs a user as user@domain");
            return;
        }
        if (!(o = calloc(1, sizeof(*o)))) {
            ctl_reply_error(r, "out of memory");
            return;
        }
        o->st = st;
        o->r = r;
        snprintf(o->user, sizeof(o->user), "%s", user);
        onode_lookup(st->on, nid_to_hex(&k, hex), open_looked_up, o);
        return;
    }
    if (!strcmp(cmd, "close_channels")) {
        const char *peer = json_string_value(json_object_get(req, "peer"));
        if (!st->chans) {
            ctl_reply_error(r, "channels are off on this node");
            return;
        }
        size_t n = chans_close(st->chans, peer);
        ctl_reply(r, json_pack("{s:b,s:I}", "ok", 1, "closed", (json_int_t)n));
        return;
    }
    ctl_reply_error(r, "unknown command \"%s\" (status, get, store, open_channel, close_channels)",
                    cmd);
}

static int on_start(struct ev_loop *loop, const void *p, void **state)
{
    const struct on_config *cfg = p;
    struct on_state *st = calloc(1, sizeof(*st));
    if (!st)
        return -1;
    *state = st;
    st->cfg = cfg;
    st->loop = loop;
    struct renewer_config rc = {
        .state_dir = cfg->state_dir,
        .margin_s = (double)cfg->cert_renew_margin_s,
        .check_interval_s = (double)cfg->cert_check_interval_s,
    };
    st->renewer = renewer_start(loop, &rc); /* NULL until the node is enrolled */
    char err[512];
    if (node_creds_load(cfg->state_dir, &st->creds, err, sizeof(err)) != 0) {
        log_warn("main", "not enrolled (%s): run 'ordinarynode enroll'; not attaching", err);
        return 0;
    }
    st->have_creds = true;
    if (strcmp(st->creds.doc.overlay, cfg->overlay) != 0)
        log_info("main", "overlay %s (from the enrolled overlay document; the overlay key says %s)",
                 st->creds.doc.overlay, cfg->overlay);
    size_t nbs = cfg->bootstrap_urls.n ? cfg->bootstrap_urls.n : st->creds.doc.n_bootstrap_urls;
    st->bs = calloc(nbs + 1, sizeof(char *));
    if (!st->bs)
        return -1;
    for (size_t i = 0; i < nbs; i++)
        st->bs[i] =
            cfg->bootstrap_urls.n ? cfg->bootstrap_urls.items[i] : st->creds.doc.bootstrap_urls[i];
    struct on_params op = {
        .state_dir = cfg->state_dir,
        .creds = &st->creds,
        .listen = cfg->listen,
        .advertise = cfg->advertise,
        .supernodes = (const char *const *)cfg->supernodes.items,
        .n_supernodes = cfg->supernodes.n,
        .bootstrap_urls = st->bs,
        .n_bootstrap_urls = nbs,
        .sip_contact = cfg->sip_listen,
        .register_user = cfg->register_user,
        .keepalive_s = (double)cfg->keepalive_ms / 1000.0,
        .sn_timeout_s = (double)cfg->sn_timeout_ms / 1000.0,
        .attach_timeout_s = (double)cfg->attach_timeout_ms / 1000.0,
        .request_timeout_s = (double)cfg->request_timeout_ms / 1000.0,
        .backoff_base_s = (double)cfg->backoff_base_ms / 1000.0,
        .backoff_max_s = (double)cfg->backoff_max_ms / 1000.0,
        .record_lifetime_s = cfg->record_lifetime_s,
        .stun = cfg->stun,
        .lan_group = st->creds.doc.lan_discovery,
        .lan_iface = cfg->lan_discovery_if,
        .lan_timeout_s = (double)cfg->lan_discovery_ms / 1000.0,
        .on_invite = on_invite,
        .on_deliver = on_deliver,
        .sip_via_overlay = cfg->sip && cfg->sip_via_overlay,
        .channels = cfg->sip && cfg->channels,
        .ud = st,
    };
    if (!(st->on = onode_new(loop, &op, err, sizeof(err)))) {
        log_error("main", "%s", err);
        return -1;
    }
    struct promo_params pp = {
        .on = st->on,
        .creds = &st->creds,
        .listen = cfg->listen,
        .advertise = cfg->advertise,
        .never = cfg->never_promote,
        .bootstrap_urls = st->bs,
        .n_bootstrap_urls = nbs,
        .max_attached = (size_t)cfg->sn_max_attached,
    };
    if (!(st->promo = promo_start(loop, &pp))) {
        log_error("main", "out of memory");
        return -1;
    }
    struct sip_limits sl = {.rate = (double)cfg->sip_rate};
    if (cfg->sip &&
        !(st->sip = registrar_start(loop, st->on, st->creds.id.uri, cfg->sip_listen, &sl,
                                    st->creds.doc.max_record_lifetime_s, err, sizeof(err)))) {
        log_error("main", "%s (set sip_listen, or sip: false)", err);
        return -1;
    }
    if (st->sip &&
        registrar_phone_networks(st->sip, &cfg->sip_register_from, err, sizeof(err)) != 0) {
        log_error("main", "sip_register_from: %s", err);
        return -1;
    }
    if (st->sip && cfg->channels) {
        struct chan_params cp = {
            .on = st->on,
            .on_sip = on_chan_sip,
            .on_media = on_chan_media,
            .ud = st,
            .setup_ms = (unsigned)cfg->channel_setup_ms,
            .idle_s = (unsigned)cfg->channel_idle_s,
            .addresses = (const char *const *)cfg->ice_addresses.items,
            .n_addresses = cfg->ice_addresses.n,
            .force_relay = cfg->channel_force_relay,
        };
        if (!(st->chans = chans_new(loop, &cp, err, sizeof(err)))) {
            log_error("main", "ice_addresses: %s", err);
            return -1;
        }
        registrar_use_channels(st->sip, st->chans);
        /* the phones registered here are this node's user's: their SDP is trusted */
        if (cfg->media.on && !(st->media = media_start(loop, &cfg->media, cfg->sip_listen,
                                                       st->chans, true, false, err, sizeof(err)))) {
            log_error("main", "%s", err);
            return -1;
        }
        if (st->media)
            registrar_use_media(st->sip, st->media);
    }
    if (cfg->metrics_listen) {
        struct httpd_config hc = {.listen = cfg->metrics_listen, .max_connections = 16};
        if (!(st->metrics = httpd_start(loop, &hc, on_metrics, st, err, sizeof(err)))) {
            log_error("main", "metrics: %s", err);
            return -1;
        }
        log_info("main", "metrics on http://%s/metrics", cfg->metrics_listen);
    }
    if (st->sip && cfg->sip_dns) {
        if (!(st->dns = dns_new(loop, cfg->sip_dns_server, err, sizeof(err)))) {
            log_error("main", "sip_dns: %s", err);
            return -1;
        }
        registrar_use_dns(st->sip, st->dns);
    }
    char *path = control_path(cfg);
    st->ctl = path ? ctl_server_start(loop, path, on_control, st, err, sizeof(err)) : NULL;
    if (!st->ctl) {
        log_error("main", "control socket: %s", path ? err : "path too long");
        free(path);
        return -1;
    }
    log_info("main", "%s (node-id %.8s...) in overlay %s; control socket %s", st->creds.id.uri,
             nid_to_hex(&st->creds.id.node_id, (char[NID_HEX_LEN + 1]){0}), st->creds.doc.overlay,
             path);
    free(path);
    onode_start(st->on);
    return 0;
}

static void promo_stopped(void *ud)
{
    (void)ud; /* the loop ends once the last watcher is gone */
}

/* The user's records are removed through our own super node role (if promoted) first; then
 * the role hands its records over and leaves the ring. */
static void on_stopped(void *ud)
{
    struct on_state *st = ud;
    if (st->promo)
        promo_stop(st->promo, promo_stopped, st);
}

static void on_stop(struct ev_loop *loop, void *p)
{
    struct on_state *st = p;
    renewer_stop(st->renewer);
    st->renewer = NULL;
    ctl_server_stop(st->ctl);
    st->ctl = NULL;
    registrar_stop(st->sip);
    st->sip = NULL;
    media_free(st->media);
    st->media = NULL;
    chans_free(st->chans);
    st->chans = NULL;
    httpd_stop(st->metrics);
    st->metrics = NULL;
    dns_free(st->dns);
    st->dns = NULL;
    if (st->on)
        onode_stop(st->on, on_stopped, st);
}

static void on_cleanup(void *p)
{
    struct on_state *st = p;
    if (!st)
        return;
    renewer_stop(st->renewer);
    ctl_server_stop(st->ctl);
    registrar_stop(st->sip);
    media_free(st->media);
    chans_free(st->chans);
    httpd_stop(st->metrics);
    dns_free(st->dns);
    onode_free(st->on);
    promo_free(st->promo);
    if (st->have_creds)
        node_creds_free(&st->creds);
    free(st->bs);
    free(st);
}

/* ---- the CLI commands: one request to the running daemon ---- */

static int call_daemon(const struct on_config *cfg, const char *what, json_t *req, json_t **res)
{
    char *path = control_path(cfg);
    char err[600];
    int rc = path ? ctl_call(path, req, 20000, res, err, sizeof(err)) : -1;
    free(path);
    json_decref(req);
    if (rc != 0) {
        fprintf(stderr, "ordinarynode: %s: %s\n", what,
                path ? err : "control socket path too long");
        return 1;
    }
    if (!json_is_true(json_object_get(*res, "ok"))) {
        const char *code = json_string_value(json_object_get(*res, "code"));
        fprintf(stderr, "ordinarynode: %s: %s%s%s\n", what, code ? code : "", code ? ": " : "",
                json_string_value(json_object_get(*res, "error")) ?: "refused");
        return 1;
    }
    return 0;
}

static void print_json(json_t *j)
{
    char *t = json_dumps(j, JSON_COMPACT);
    printf("%s\n", t ? t : "{}");
    free(t);
}

static int cmd_status(const struct cli_opts *o, const struct on_config *cfg)
{
    json_t *res = NULL;
    int rc = call_daemon(cfg, "status", json_pack("{s:s}", "cmd", "status"), &res);
    if (rc == 0 && cli_opt(o, "json")) {
        print_json(res);
    } else if (rc == 0) {
        json_t *sn = json_object_get(res, "supernode");
        printf("node         %s (node-id %s)\n", json_string_value(json_object_get(res, "uri")),
               json_string_value(json_object_get(res, "node_id")));
        printf("state        %s\n", json_string_value(json_object_get(res, "state")));
        if (sn)
            printf("super node   %s at %s (found through %s), attached %.0f s\n",
                   json_string_value(json_object_get(sn, "id")),
                   json_string_value(json_object_get(sn, "addr")),
                   json_string_value(json_object_get(sn, "source")),
                   json_real_value(json_object_get(res, "attached_s")));
        json_t *refl = json_object_get(res, "reflexive"),
               *mapped = json_object_get(res, "stun_mapped");
        if (json_is_string(refl))
            printf("reflexive    %s (as the super node sees us)%s%s\n", json_string_value(refl),
                   json_is_string(mapped) ? "; STUN: " : "",
                   json_is_string(mapped) ? json_string_value(mapped) : "");
        if (sn)
            printf("NAT          %s; mapping %s\n",
                   json_is_true(json_object_get(res, "nat")) ? "behind NAT"
                                                             : "none (the super node sees our own "
                                                               "address)",
                   json_string_value(json_object_get(res, "nat_mapping")) ?: "not measured");
        printf("host cache   %zu alternates\n",
               json_array_size(json_object_get(res, "host_cache")));
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(res, "candidates"), i, e)
        {
            printf("candidate    %-5s %s:%lld (priority %lld)\n",
                   json_string_value(json_object_get(e, "type")),
                   json_string_value(json_object_get(e, "ip")),
                   json_integer_value(json_object_get(e, "port")),
                   json_integer_value(json_object_get(e, "priority")));
        }
        json_array_foreach(json_object_get(res, "channels"), i, e)
        {
            const char *path = json_string_value(json_object_get(e, "path"));
            const char *error = json_string_value(json_object_get(e, "error"));
            printf("channel      %.8s %s (%s)%s%s%s%s, %lld/%lld messages out/in\n",
                   json_string_value(json_object_get(e, "peer")),
                   json_string_value(json_object_get(e, "state")),
                   json_string_value(json_object_get(e, "role")), path ? ", " : "",
                   path ? path : "", error ? ": " : "", error ? error : "",
                   json_integer_value(json_object_get(e, "messages_out")),
                   json_integer_value(json_object_get(e, "messages_in")));
        }
        json_t *md = json_object_get(res, "media");
        if (md)
            printf("media        %lld calls (at most %lld), %lld refused\n",
                   json_integer_value(json_object_get(md, "active")),
                   json_integer_value(json_object_get(md, "max_calls")),
                   json_integer_value(json_object_get(md, "refused")));
        json_array_foreach(json_object_get(md, "calls"), i, e)
        {
            const char *peer = json_string_value(json_object_get(e, "peer"));
            const char *via = json_string_value(json_object_get(e, "via"));
            printf("call         %.24s with %.8s: %s%s%s\n",
                   json_string_value(json_object_get(e, "call_id")), peer ? peer : "a phone",
                   json_string_value(json_object_get(e, "path")), via ? " via " : "",
                   via ? via : "");
            size_t k;
            json_t *st;
            json_array_foreach(json_object_get(e, "streams"), k, st)
            {
                json_t *fp = json_object_get(st, "from_phone"),
                       *tp = json_object_get(st, "to_phone");
                printf("  %-10s port %lld, phone %s: %lld/%lld packets from/to it, loss "
                       "%.1f%%/%.1f%%\n",
                       json_string_value(json_object_get(st, "media")),
                       json_integer_value(json_object_get(st, "port")),
                       json_string_value(json_object_get(st, "phone")),
                       json_integer_value(json_object_get(fp, "packets")),
                       json_integer_value(json_object_get(tp, "packets")),
                       100 * json_real_value(json_object_get(fp, "loss")),
                       100 * json_real_value(json_object_get(tp, "loss")));
            }
        }
        json_array_foreach(json_object_get(res, "published"), i, e)
        {
            printf("published    %s|%s, expires %lld\n",
                   json_string_value(json_object_get(e, "type")),
                   json_string_value(json_object_get(e, "name")),
                   json_integer_value(json_object_get(e, "expires")));
        }
        if (json_is_string(json_object_get(res, "last_error")))
            printf("last error   %s\n", json_string_value(json_object_get(res, "last_error")));
        json_t *pr = json_object_get(res, "promotion");
        if (pr) {
            const char *blocked = json_string_value(json_object_get(pr, "blocked"));
            printf("promotion    %s%s%s (%lld promotions, %lld demotions)\n",
                   json_string_value(json_object_get(pr, "state")), blocked ? ": " : "",
                   blocked ? blocked : "", json_integer_value(json_object_get(pr, "promotions")),
                   json_integer_value(json_object_get(pr, "demotions")));
            json_t *ps = json_object_get(pr, "supernode");
            if (ps)
                printf("as super node %zu ordinary nodes attached, %lld keys\n",
                       (size_t)json_integer_value(json_object_get(ps, "attached")),
                       json_integer_value(json_object_get(json_object_get(ps, "store"), "keys")));
        }
    }
    json_decref(res);
    return rc;
}

static int cmd_get(const struct cli_opts *o, const struct on_config *cfg)
{
    const char *key = cli_opt(o, "key");
    if ((key && o->argc != 0) || (!key && o->argc != 2)) {
        cli_error(&on_prog, "get takes TYPE NAME, or --key HEX");
        return 2;
    }
    json_t *req =
        key ? json_pack("{s:s,s:s}", "cmd", "get", "key", key)
            : json_pack("{s:s,s:s,s:s}", "cmd", "get", "type", o->argv[0], "name", o->argv[1]);
    json_t *res = NULL;
    int rc = call_daemon(cfg, "get", req, &res);
    if (rc != 0)
        return rc;
    json_t *recs = json_object_get(res, "records");
    if (cli_opt(o, "json")) {
        print_json(res);
    } else {
        size_t i;
        json_t *e;
        if (json_array_size(recs) == 0)
            printf("no record\n");
        json_array_foreach(recs, i, e)
        {
            if (!json_is_true(json_object_get(e, "verified"))) {
                printf("REFUSED  %s: %s\n", json_string_value(json_object_get(e, "code")),
                       json_string_value(json_object_get(e, "error")));
                continue;
            }
            char *v = json_dumps(json_object_get(e, "value"), JSON_COMPACT | JSON_ENCODE_ANY);
            printf("%s  seq %s  expires %lld  verified\n  %s\n",
                   json_string_value(json_object_get(e, "owner")),
                   json_string_value(json_object_get(e, "seq")),
                   json_integer_value(json_object_get(e, "expires")), v ? v : "");
            free(v);
        }
    }
    size_t found = json_array_size(recs);
    json_decref(res);
    /* 3: nothing found (scripts can tell it from a failure). */
    return found ? 0 : 3;
}

static int cmd_store(const struct cli_opts *o, const struct on_config *cfg)
{
    const char *mode = o->command;
    bool rm = !strcmp(mode, "remove");
    if (o->argc != (rm ? 2 : 3)) {
        cli_error(&on_prog, rm ? "remove takes TYPE NAME" : "%s takes TYPE NAME JSON", mode);
        return 2;
    }
    json_t *req = json_pack("{s:s,s:s,s:s,s:s}", "cmd", "store", "mode", mode, "type", o->argv[0],
                            "name", o->argv[1]);
    if (!rm) {
        json_error_t je;
        json_t *v = json_loads(o->argv[2], JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
        if (!v || json_is_null(v)) {
            cli_error(&on_prog, "the value is not JSON (%s); a string is written \"\\\"text\\\"\"",
                      v ? "null is not a value" : je.text);
            json_decref(v);
            json_decref(req);
            return 2;
        }
        json_object_set_new(req, "value", v);
        const char *lt = cli_opt(o, "lifetime");
        if (lt) {
            char *end;
            errno = 0;
            long long n = strtoll(lt, &end, 10);
            if (errno || *end || n < 1 || n > 31536000) {
                cli_error(&on_prog, "--lifetime must be 1-31536000 seconds");
                json_decref(req);
                return 2;
            }
            json_object_set_new(req, "lifetime", json_integer(n));
        }
        if (cli_opt(o, "no-update"))
            json_object_set_new(req, "no_update", json_true());
    }
    json_t *res = NULL;
    int rc = call_daemon(cfg, mode, req, &res);
    if (rc == 0) {
        if (cli_opt(o, "json"))
            print_json(res);
        else if (rm)
            printf("removed %s|%s\n", o->argv[0], o->argv[1]);
        else
            printf("stored %s|%s (expires %lld)\n", o->argv[0], o->argv[1],
                   json_integer_value(json_object_get(res, "expires")));
    }
    json_decref(res);
    return rc;
}

static int cmd_open_channel(const struct cli_opts *o, const struct on_config *cfg)
{
    if (o->argc != 1 || !strchr(o->argv[0], '@')) {
        cli_error(&on_prog, "open-channel takes one user as USER@DOMAIN");
        return 2;
    }
    json_t *res = NULL;
    int rc = call_daemon(cfg, "open-channel",
                         json_pack("{s:s,s:s}", "cmd", "open_channel", "user", o->argv[0]), &res);
    if (rc == 0 && cli_opt(o, "json"))
        print_json(res);
    else if (rc == 0)
        printf("%s to node %s\n",
               json_is_true(json_object_get(res, "opening")) ? "channel open or opening"
                                                             : "no channel now (failed lately, "
                                                               "or no room): see status",
               json_string_value(json_object_get(res, "peer")));
    json_decref(res);
    return rc;
}

static int cmd_close_channels(const struct cli_opts *o, const struct on_config *cfg)
{
    if (o->argc > 1 || (o->argc == 1 && strlen(o->argv[0]) != NID_HEX_LEN)) {
        cli_error(&on_prog, "close-channels takes at most one Node-ID (40 hex digits)");
        return 2;
    }
    json_t *req = json_pack("{s:s}", "cmd", "close_channels");
    if (o->argc == 1)
        json_object_set_new(req, "peer", json_string(o->argv[0]));
    json_t *res = NULL;
    int rc = call_daemon(cfg, "close-channels", req, &res);
    if (rc == 0 && cli_opt(o, "json"))
        print_json(res);
    else if (rc == 0)
        printf("%lld channels closed\n", json_integer_value(json_object_get(res, "closed")));
    json_decref(res);
    return rc;
}

static int on_command(const struct cli_opts *o, void *p)
{
    const struct on_config *cfg = p;
    if (strcmp(o->command, "enroll") == 0)
        return enroll_command(&on_prog, o, cfg->state_dir);
    if (strcmp(o->command, "renew") == 0)
        return renew_command(&on_prog, o, cfg->state_dir);
    if (strcmp(o->command, "status") == 0)
        return cmd_status(o, cfg);
    if (strcmp(o->command, "get") == 0)
        return cmd_get(o, cfg);
    if (strcmp(o->command, "close-channels") == 0)
        return cmd_close_channels(o, cfg);
    if (strcmp(o->command, "open-channel") == 0)
        return cmd_open_channel(o, cfg);
    if (!strcmp(o->command, "add") || !strcmp(o->command, "update") ||
        !strcmp(o->command, "remove"))
        return cmd_store(o, cfg);
    return 2;
}

static const struct daemon_spec on_spec = {
    .prog = &on_prog,
    .schema = &on_schema,
    .cfg_size = sizeof(struct on_config),
    .command = on_command,
    .start = on_start,
    .stop = on_stop,
    .cleanup = on_cleanup,
};

int main(int argc, char **argv)
{
    return daemon_main(&on_spec, argc, argv);
}
