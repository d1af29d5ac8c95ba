/*
 * RFC 3263 server location over DNS (dns.h).
 */
#include "dns.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <netinet/in.h>
#include <resolv.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/crypto.h>

#include "config.h"
#include "log.h"

#define LOGM      "dns"
#define TRY_S     1.0
#define TRIES     3
#define MAX_QUERY 512

enum stage { S_SRV, S_TARGET_A, S_DOMAIN_A };

struct dns_query {
    struct dns_resolver *r;
    struct dns_query *next, **pprev;
    int fd;
    ev_io io;
    ev_timer timer;
    unsigned tries;
    uint16_t id;
    unsigned char pkt[MAX_QUERY];
    int pkt_len;
    enum stage stage;
    char name[NS_MAXDNAME]; /* what is asked now */
    char domain[256];
    unsigned port; /* the URI's, then the SRV record's */
    dns_sip_fn cb;
    void *ud;
};

struct dns_resolver {
    struct ev_loop *loop;
    struct sockaddr_in server;
    struct dns_query *queries;
};

static int resolv_conf_server(struct sockaddr_in *out)
{
    FILE *f = fopen("/etc/resolv.conf", "r");
    if (!f)
        return -1;
    char line[256];
    int rc = -1;
    while (rc != 0 && fgets(line, sizeof(line), f)) {
        char addr[64];
        if (sscanf(line, " nameserver %63s", addr) == 1 && inet_pton(AF_INET, addr, &out->sin_addr))
            rc = 0;
    }
    fclose(f);
    out->sin_family = AF_INET;
    out->sin_port = htons(53);
    return rc;
}

struct dns_resolver *dns_new(struct ev_loop *loop, const char *server, char *err, size_t errlen)
{
    struct dns_resolver *r = calloc(1, sizeof(*r));
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->loop = loop;
    if (server) {
        char host[64];
        unsigned port;
        if (cfg_parse_hostport(server, host, sizeof(host), &port) != 0 ||
            inet_pton(AF_INET, host, &r->server.sin_addr) != 1) {
            snprintf(err, errlen, "DNS server %s: not an IPv4 address and port", server);
            free(r);
            return NULL;
        }
        r->server.sin_family = AF_INET;
        r->server.sin_port = htons((uint16_t)port);
    } else if (resolv_conf_server(&r->server) != 0) {
        snprintf(err, errlen, "no IPv4 nameserver in /etc/resolv.conf: set the DNS server");
        free(r);
        return NULL;
    }
    return r;
}

static void query_end(struct dns_query *q, const char *hostport, const char *err)
{
    struct dns_resolver *r = q->r;
    ev_io_stop(r->loop, &q->io);
    ev_timer_stop(r->loop, &q->timer);
    if (q->fd >= 0)
        close(q->fd);
    *q->pprev = q->next;
    if (q->next)
        q->next->pprev = q->pprev;
    if (err)
        log_info(LOGM, "locating the SIP server of %s: %s", q->domain, err);
    q->cb(q->ud, hostport, err);
    free(q);
}

void dns_free(struct dns_resolver *r)
{
    if (!r)
        return;
    while (r->queries)
        query_end(r->queries, NULL, "resolver stopped");
    free(r);
}

static void send_query(struct dns_query *q)
{
    struct dns_resolver *r = q->r;
    ev_timer_stop(r->loop, &q->timer);
    ev_timer_set(&q->timer, TRY_S, 0.);
    ev_timer_start(r->loop, &q->timer);
    if (send(q->fd, q->pkt, (size_t)q->pkt_len, 0) < 0)
        log_debug(LOGM, "query for %s not sent: %s", q->name, strerror(errno));
}

/* Asks the server for (name, type) as the next step of q. */
static void ask(struct dns_query *q, enum stage stage, const char *name)
{
    q->stage = stage;
    snprintf(q->name, sizeof(q->name), "%s", name);
    q->pkt_len = res_mkquery(ns_o_query, q->name, ns_c_in, stage == S_SRV ? ns_t_srv : ns_t_a, NULL,
                             0, NULL, q->pkt, sizeof(q->pkt));
    if (q->pkt_len < NS_HFIXEDSZ) {
        query_end(q, NULL, "the name does not make a DNS query");
        return;
    }
    gnutls_rnd(GNUTLS_RND_NONCE, &q->id, sizeof(q->id));
    q->pkt[0] = (unsigned char)(q->id >> 8);
    q->pkt[1] = (unsigned char)(q->id & 0xff);
    q->tries = 1;
    send_query(q);
}

static void found(struct dns_query *q, const unsigned char *a4)
{
    char ip[INET_ADDRSTRLEN], hp[80];
    inet_ntop(AF_INET, a4, ip, sizeof(ip));
    snprintf(hp, sizeof(hp), "%s:%u", ip, q->port);
    log_info(LOGM, "the SIP server of %s is %s", q->domain, hp);
    query_end(q, hp, NULL);
}

/* An A record for `name` in section sec, or NULL. */
static const unsigned char *a_record(ns_msg *h, ns_sect sec, const char *name)
{
    for (int i = 0; i < ns_msg_count(*h, sec); i++) {
        ns_rr rr;
        if (ns_parserr(h, sec, i, &rr) == 0 && ns_rr_type(rr) == ns_t_a && ns_rr_rdlen(rr) == 4 &&
            !strcasecmp(ns_rr_name(rr), name))
            return ns_rr_rdata(rr);
    }
    return NULL;
}

static void answer(struct dns_query *q, const unsigned char *msg, int len)
{
    ns_msg h;
    if (ns_initparse(msg, len, &h) != 0 || ns_msg_id(h) != q->id || !ns_msg_getflag(h, ns_f_qr))
        return; /* not the answer to this query: wait for it */
    int rcode = ns_msg_getflag(h, ns_f_rcode);
    if (rcode != ns_r_noerror && rcode != ns_r_nxdomain) {
        char why[NS_MAXDNAME + 60];
        snprintf(why, sizeof(why), "the DNS server answered error %d for %s", rcode, q->name);
        query_end(q, NULL, why);
        return;
    }
    if (q->stage == S_SRV) {
        int best_prio = 1 << 17, best_weight = -1;
        char target[NS_MAXDNAME] = "";
        unsigned port = 0;
        for (int i = 0; i < ns_msg_count(h, ns_s_an); i++) {
            ns_rr rr;
            if (ns_parserr(&h, ns_s_an, i, &rr) != 0 || ns_rr_type(rr) != ns_t_srv ||
                ns_rr_rdlen(rr) < 7)
                continue;
            const unsigned char *d = ns_rr_rdata(rr);
            int prio = d[0] << 8 | d[1], weight = d[2] << 8 | d[3];
            char t[NS_MAXDNAME];
            if (dn_expand(ns_msg_base(h), ns_msg_end(h), d + 6, t, sizeof(t)) < 0)
                continue;
            if (prio < best_prio || (prio == best_prio && weight > best_weight)) {
                best_prio = prio;
                best_weight = weight;
                snprintf(target, sizeof(target), "%s", t);
                port = (unsigned)(d[4] << 8 | d[5]);
            }
        }
        if (!target[0]) { /* no SRV records: the domain's own address, port 5060 (4.2) */
            q->port = 5060;
            ask(q, S_DOMAIN_A, q->domain);
            return;
        }
        if (!strcmp(target, ".") || !strcmp(target, "") || port == 0) {
            query_end(q, NULL, "the domain's SRV record says it offers no SIP service");
            return;
        }
        q->port = port;
        const unsigned char *a = a_record(&h, ns_s_ar, target);
        if (a)
            found(q, a);
        else
            ask(q, S_TARGET_A, target);
        return;
    }
    const unsigned char *a = a_record(&h, ns_s_an, q->name);
    if (!a) { /* CNAMEs: the first A answer whatever its owner name */
        for (int i = 0; i < ns_msg_count(h, ns_s_an) && !a; i++) {
            ns_rr rr;
            if (ns_parserr(&h, ns_s_an, i, &rr) == 0 && ns_rr_type(rr) == ns_t_a &&
                ns_rr_rdlen(rr) == 4)
                a = ns_rr_rdata(rr);
        }
    }
    if (a) {
        found(q, a);
        return;
    }
    char why[NS_MAXDNAME + 40];
    snprintf(why, sizeof(why), "no IPv4 address for %s", q->name);
    query_end(q, NULL, why);
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct dns_query *q = w->data;
    unsigned char buf[4096];
    ssize_t n = recv(q->fd, buf, sizeof(buf), 0);
    if (n > 0)
        answer(q, buf, (int)n);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct dns_query *q = w->data;
    if (q->fd < 0) {
        query_end(q, NULL, "cannot open a UDP socket for DNS");
        return;
    }
    if (q->pkt_len == 0) { /* the first step, from the loop */
        if (q->port)
            ask(q, S_DOMAIN_A, q->domain);
        else {
            char srv[NS_MAXDNAME];
            snprintf(srv, sizeof(srv), "_sip._udp.%s", q->domain);
            ask(q, S_SRV, srv);
        }
        return;
    }
    if (q->tries++ < TRIES) {
        send_query(q);
        return;
    }
    char why[NS_MAXDNAME + 60];
    snprintf(why, sizeof(why), "no answer from the DNS server for %s", q->name);
    query_end(q, NULL, why);
}

void dns_locate_sip(struct dns_resolver *r, const char *domain, unsigned port, dns_sip_fn cb,
                    void *ud)
{
    struct dns_query *q = calloc(1, sizeof(*q));
    if (!q) {
        cb(ud, NULL, "out of memory");
        return;
    }
    q->r = r;
    q->cb = cb;
    q->ud = ud;
    q->port = port;
    snprintf(q->domain, sizeof(q->domain), "%s", domain);
    q->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    ev_io_init(&q->io, io_cb, q->fd, EV_READ);
    q->io.data = q;
    ev_timer_init(&q->timer, timer_cb, 0., 0.);
    q->timer.data = q;
    q->next = r->queries;
    if (q->next)
        q->next->pprev = &q->next;
    q->pprev = &r->queries;
    r->queries = q;
    if (q->fd < 0 || connect(q->fd, (const struct sockaddr *)&r->server, sizeof(r->server)) != 0) {
        /* reported from the loop, like every other outcome */
        if (q->fd >= 0)
            close(q->fd);
        q->fd = -1;
        q->pkt_len = -1;
        ev_timer_start(r->loop, &q->timer);
        return;
    }
    ev_io_start(r->loop, &q->io);
    ev_timer_start(r->loop, &q->timer);
}
