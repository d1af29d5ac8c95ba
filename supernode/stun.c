/*
 * The super node's STUN server and the blocking Binding client (stun.h), on
 * libnice's STUN message API (no GLib loop; see dependency-notes "libnice").
 *
 * FINGERPRINT is optional, as RFC 5389 makes it: a request that carries one
 * is checked (a wrong CRC drops it) and answered with one; a request without
 * one is answered without one. libnice's agent with USE_FINGERPRINT refuses
 * every message lacking the attribute (STUN_VALIDATION_BAD_REQUEST), so the
 * server holds two agents and validates a FINGERPRINT-less datagram again
 * with the one that does not ask for it. Both agents ignore credentials: a
 * request with USERNAME/MESSAGE-INTEGRITY (an ICE check) is answered without
 * MESSAGE-INTEGRITY. A third agent, in RFC 3489 mode, takes requests without
 * the magic cookie and answers with MAPPED-ADDRESS (RFC 5389 12.2).
 *
 * CHANGE-REQUEST (RFC 5780 / RFC 3489 tests II and III): this server has one
 * address and sends no OTHER-ADDRESS, so an RFC 5780 client never asks it to
 * change; one that does anyway (an RFC 5389 request with the magic cookie)
 * gets 420 with UNKNOWN-ATTRIBUTES naming CHANGE-REQUEST, as RFC 5780 6.1 says
 * for a server without an alternate address. A classic RFC 3489 request
 * asking for another IP or port is dropped instead: RFC 3489 clients (Debian's
 * `stun`, tried) take any answer to tests II and III, the 420 included, as
 * "the change was honoured", and would report every NAT as full cone and every
 * firewall as open; silence makes them conclude port-dependent filtering,
 * which is what Linux masquerading and most NATs do. Answering from the same
 * address would mislead them the same way as the 420. Test I (both flags
 * clear) is answered normally, so they report the mapping either way.
 * RESPONSE-ADDRESS (send the answer elsewhere) is never honoured: it is
 * unknown here, hence 420.
 *
 * An IPv4 client reaching a dual-stack IPv6 socket is seen as ::ffff:a.b.c.d;
 * its XOR-MAPPED-ADDRESS is sent as the IPv4 address it really has.
 */
#include "stun.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <stun/stunagent.h>
#include <stun/stunmessage.h>
#include <stun/usages/bind.h>

#include "errbuf.h"
#include "log.h"

#define STUN_BATCH       64   /* datagrams per wakeup, so that a flood cannot starve the loop */
#define STUN_RECV_BUF    2048 /* larger than any Ethernet-sized datagram; bigger ones are dropped */
#define STUN_SEND_BUF    256  /* an answer is at most 20 + 24 + 8 bytes, a 420 a little more */
#define STUN_FIRST_RTO   100  /* ms, doubled at each retransmission (RFC 5389 7.2.1) */
#define STUN_MAX_RTO     3200 /* ms */
#define STUN_HEADER_SIZE 20

/* What a request may carry and still be answered (credentials are ignored). CHANGE-REQUEST is
 * looked at after validation: both flags clear is fine, a change is refused (420). */
static const uint16_t server_known_attributes[] = {
    STUN_ATTRIBUTE_USERNAME,       STUN_ATTRIBUTE_MESSAGE_INTEGRITY,
    STUN_ATTRIBUTE_PRIORITY,       STUN_ATTRIBUTE_USE_CANDIDATE,
    STUN_ATTRIBUTE_SOFTWARE,       STUN_ATTRIBUTE_FINGERPRINT,
    STUN_ATTRIBUTE_ICE_CONTROLLED, STUN_ATTRIBUTE_ICE_CONTROLLING,
    STUN_ATTRIBUTE_CHANGE_REQUEST, 0};

#define STUN_CHANGE_IP   0x4
#define STUN_CHANGE_PORT 0x2
#define STUN_MAX_GROWTH  36 /* bytes an answer may exceed its request by */

/* What an answer may carry (includes the RFC 3489 ones older servers still send). */
static const uint16_t client_known_attributes[] = {STUN_ATTRIBUTE_MAPPED_ADDRESS,
                                                   STUN_ATTRIBUTE_SOURCE_ADDRESS,
                                                   STUN_ATTRIBUTE_CHANGED_ADDRESS,
                                                   STUN_ATTRIBUTE_USERNAME,
                                                   STUN_ATTRIBUTE_MESSAGE_INTEGRITY,
                                                   STUN_ATTRIBUTE_ERROR_CODE,
                                                   STUN_ATTRIBUTE_UNKNOWN_ATTRIBUTES,
                                                   STUN_ATTRIBUTE_REFLECTED_FROM,
                                                   STUN_ATTRIBUTE_REALM,
                                                   STUN_ATTRIBUTE_NONCE,
                                                   STUN_ATTRIBUTE_XOR_MAPPED_ADDRESS,
                                                   STUN_ATTRIBUTE_SOFTWARE,
                                                   STUN_ATTRIBUTE_ALTERNATE_SERVER,
                                                   STUN_ATTRIBUTE_FINGERPRINT,
                                                   0};

struct stun_server {
    struct ev_loop *loop;
    ev_io io;
    int fd;
    int port;
    StunAgent agent_fp;    /* requests with FINGERPRINT: checked, answered with one */
    StunAgent agent_plain; /* requests without: answered without */
    StunAgent agent_3489;  /* classic requests (no magic cookie) */
    struct stun_stats stats;
    stun_demux_fn demux; /* the TURN server, when one is attached */
    void *demux_ud;
    uint8_t rbuf[STUN_RECV_BUF];
};

/* ---- Addresses ---------------------------------------------------------------------------- */

/*
 * Resolves "host:port" / "[v6]:port" for UDP. numeric: the host must be an
 * address (no DNS). family: AF_UNSPEC or the one wanted.
 */
static int resolve(const char *hostport, bool numeric, int family, struct sockaddr_storage *ss,
                   socklen_t *sslen, char *err, size_t errlen)
{
    char host[NI_MAXHOST];
    const char *port;
    size_t hl;
    if (!hostport || !*hostport)
        return errbuf_set(err, errlen, -1, "empty address: expected host:port or [v6]:port");
    if (hostport[0] == '[') {
        const char *close = strchr(hostport, ']');
        if (!close || close[1] != ':')
            goto bad;
        hl = (size_t)(close - hostport - 1);
        memcpy(host, hostport + 1, hl < sizeof(host) ? hl : 0);
        port = close + 2;
    } else {
        const char *colon = strrchr(hostport, ':');
        if (!colon || memchr(hostport, ':', (size_t)(colon - hostport)))
            goto bad; /* none, or an IPv6 address without brackets */
        hl = (size_t)(colon - hostport);
        memcpy(host, hostport, hl < sizeof(host) ? hl : 0);
        port = colon + 1;
    }
    if (hl == 0 || hl >= sizeof(host) || !*port || strlen(port) > 5 ||
        strspn(port, "0123456789") != strlen(port) || atoi(port) > 65535)
        goto bad;
    host[hl] = '\0';

    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = family;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICSERV | (numeric ? AI_NUMERICHOST : 0);
    int r = getaddrinfo(host, port, &hints, &res);
    if (r != 0 || !res || res->ai_addrlen > sizeof(*ss)) {
        if (res)
            freeaddrinfo(res);
        if (numeric && r == EAI_NONAME)
            goto bad;
        return errbuf_set(err, errlen, -1, "cannot resolve %s: %s", hostport,
                          r ? gai_strerror(r) : "no address");
    }
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *sslen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
bad:
    return errbuf_set(err, errlen, -1,
                      "invalid address \"%.80s\": expected a numeric host:port or [v6]:port",
                      hostport);
}

/* "a.b.c.d:port" or "[v6]:port"; 0, or -1 when out is too small or sa unprintable. */
static int format_addr(const struct sockaddr *sa, socklen_t salen, char *out, size_t outlen)
{
    char host[NI_MAXHOST], serv[NI_MAXSERV];
    if (getnameinfo(sa, salen, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
        return -1;
    int n = snprintf(out, outlen, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
    return n < 0 || (size_t)n >= outlen ? -1 : 0;
}

/* ::ffff:a.b.c.d (an IPv4 peer of a dual-stack socket) becomes a.b.c.d. */
static void unmap_v4(struct sockaddr_storage *ss, socklen_t *len)
{
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
    if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
        return;
    struct sockaddr_in s4;
    memset(&s4, 0, sizeof(s4));
    s4.sin_family = AF_INET;
    s4.sin_port = s6->sin6_port;
    memcpy(&s4.sin_addr, &s6->sin6_addr.s6_addr[12], 4);
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, &s4, sizeof(s4));
    *len = sizeof(s4);
}

static const char *validation_reason(StunValidationStatus v)
{
    switch (v) {
    case STUN_VALIDATION_NOT_STUN:
        return "not STUN";
    case STUN_VALIDATION_INCOMPLETE_STUN:
        return "truncated STUN message";
    case STUN_VALIDATION_BAD_REQUEST:
        return "bad FINGERPRINT or no magic cookie";
    case STUN_VALIDATION_UNMATCHED_RESPONSE:
        return "a response";
    case STUN_VALIDATION_UNKNOWN_REQUEST_ATTRIBUTE:
    case STUN_VALIDATION_UNKNOWN_ATTRIBUTE:
        return "unknown comprehension-required attribute";
    default:
        return "refused by the STUN agent";
    }
}

/* ---- Server ------------------------------------------------------------------------------- */

static void drop(struct stun_server *s, size_t len, const struct sockaddr_storage *from,
                 socklen_t fromlen, const char *why)
{
    s->stats.dropped++;
    if (log_enabled(LL_DEBUG)) {
        char addr[INET6_ADDRSTRLEN + 16];
        if (format_addr((const struct sockaddr *)from, fromlen, addr, sizeof(addr)) != 0)
            snprintf(addr, sizeof(addr), "?");
        log_debug("stun", "dropped %zu bytes from %s: %s", len, addr, why);
    }
}

/* Sends an answer built in out (n bytes); false when it could not leave. */
static bool answer(struct stun_server *s, const uint8_t *out, size_t n,
                   const struct sockaddr_storage *from, socklen_t fromlen)
{
    if (sendto(s->fd, out, n, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)from, fromlen) <
        0) {
        /* A full send buffer or an unanswerable source (port 0): neither answered nor
         * dropped; a real client retransmits. */
        if (log_enabled(LL_DEBUG)) {
            int e = errno;
            char addr[INET6_ADDRSTRLEN + 16];
            if (format_addr((const struct sockaddr *)from, fromlen, addr, sizeof(addr)) != 0)
                snprintf(addr, sizeof(addr), "?");
            log_debug("stun", "cannot answer %s: %s", addr, strerror(e));
        }
        return false;
    }
    return true;
}

/*
 * 420 Unknown Attribute to req, naming the attributes in ids (network
 * order; n of them). NULL when sent, or why not.
 */
static const char *answer_420(struct stun_server *s, StunAgent *agent, const StunMessage *req,
                              size_t reqlen, uint16_t *ids, unsigned n,
                              const struct sockaddr_storage *from, socklen_t fromlen)
{
    uint8_t out[STUN_SEND_BUF];
    StunMessage resp;
    size_t len = 0;
    if (n & 1 && !stun_message_has_cookie(req))
        ids[n++] = ids[0]; /* RFC 3489: the list is padded to 32 bits with a repeat */
    if (stun_agent_init_error(agent, &resp, out, sizeof(out), req, STUN_ERROR_UNKNOWN_ATTRIBUTE) &&
        stun_message_append_bytes(&resp, STUN_ATTRIBUTE_UNKNOWN_ATTRIBUTES, ids, n * 2) ==
            STUN_MESSAGE_RETURN_SUCCESS)
        len = stun_agent_finish_message(agent, &resp, NULL, 0);
    if (len == 0)
        return "cannot build the 420 answer";
    if (len > reqlen + STUN_MAX_GROWTH)
        return "a 420 answer would be much larger than the request";
    if (answer(s, out, len, from, fromlen))
        s->stats.errors++;
    return NULL;
}

/* The method of a STUN message type (RFC 5389 6: bits M0-M11 around C0 and C1). */
static unsigned raw_method(const uint8_t *b)
{
    unsigned t = (unsigned)b[0] << 8 | b[1];
    return (t & 0x000F) | (t & 0x00E0) >> 1 | (t & 0x3E00) >> 2;
}

static bool has_cookie_raw(const uint8_t *b)
{
    return b[4] == 0x21 && b[5] == 0x12 && b[6] == 0xA4 && b[7] == 0x42;
}

/*
 * Checks one datagram (in s->rbuf) and answers it when it is a Binding
 * request. NULL when handled, or why it is dropped.
 */
static const char *handle_datagram(struct stun_server *s, size_t len,
                                   const struct sockaddr_storage *from, socklen_t fromlen)
{
    if (len > sizeof(s->rbuf))
        return "oversized";
    if (s->demux && len >= 4 && (s->rbuf[0] & 0xC0) == 0x40) {
        s->demux(s->demux_ud, s->rbuf, len, from, fromlen); /* ChannelData */
        return NULL;
    }
    if (len < STUN_HEADER_SIZE)
        return "shorter than a STUN header";
    if (s->demux && (s->rbuf[0] & 0xC0) == 0 && has_cookie_raw(s->rbuf) &&
        raw_method(s->rbuf) != STUN_BINDING) {
        s->demux(s->demux_ud, s->rbuf, len, from, fromlen); /* Allocate, Send, ... */
        return NULL;
    }

    StunMessage req;
    StunAgent *agent = &s->agent_fp;
    bool classic = !has_cookie_raw(s->rbuf);
    StunValidationStatus v;
    if (classic) {
        agent = &s->agent_3489;
        v = stun_agent_validate(agent, &req, s->rbuf, len, NULL, NULL);
    } else {
        v = stun_agent_validate(agent, &req, s->rbuf, len, NULL, NULL);
        if (v == STUN_VALIDATION_BAD_REQUEST) {
            if (stun_message_has_attribute(&req, STUN_ATTRIBUTE_FINGERPRINT))
                return "bad FINGERPRINT";
            agent = &s->agent_plain; /* no FINGERPRINT: fine, but then nothing to check */
            v = stun_agent_validate(agent, &req, s->rbuf, len, NULL, NULL);
        }
    }
    if (v == STUN_VALIDATION_UNKNOWN_REQUEST_ATTRIBUTE &&
        stun_message_get_method(&req) == STUN_BINDING) {
        /* RFC 5389 7.3.1: 420 + UNKNOWN-ATTRIBUTES. */
        uint8_t out[STUN_SEND_BUF];
        StunMessage resp;
        size_t n = stun_agent_build_unknown_attributes_error(agent, &resp, out, sizeof(out), &req);
        if (n == 0)
            return "cannot build the 420 answer";
        if (n > len + STUN_MAX_GROWTH)
            return "a 420 answer would be much larger than the request";
        if (answer(s, out, n, from, fromlen))
            s->stats.errors++;
        return NULL;
    }
    if (v != STUN_VALIDATION_SUCCESS)
        return validation_reason(v);
    if (stun_message_get_class(&req) != STUN_REQUEST)
        return "not a request";
    if (stun_message_get_method(&req) != STUN_BINDING)
        return "not a Binding request";
    uint32_t change = 0;
    if (stun_message_find32(&req, STUN_ATTRIBUTE_CHANGE_REQUEST, &change) ==
            STUN_MESSAGE_RETURN_SUCCESS &&
        (change & (STUN_CHANGE_IP | STUN_CHANGE_PORT))) {
        if (classic)
            return "RFC 3489 CHANGE-REQUEST for another address (not answered: see above)";
        uint16_t ids[2] = {htons(STUN_ATTRIBUTE_CHANGE_REQUEST)};
        return answer_420(s, agent, &req, len, ids, 1, from, fromlen);
    }

    struct sockaddr_storage mapped = *from;
    socklen_t mappedlen = fromlen;
    unmap_v4(&mapped, &mappedlen);
    uint8_t out[STUN_SEND_BUF];
    StunMessage resp;
    size_t n = 0;
    if (stun_agent_init_response(agent, &resp, out, sizeof(out), &req) &&
        (classic ? stun_message_append_addr(&resp, STUN_ATTRIBUTE_MAPPED_ADDRESS,
                                            (struct sockaddr *)&mapped, mappedlen)
                 : stun_message_append_xor_addr(&resp, STUN_ATTRIBUTE_XOR_MAPPED_ADDRESS, &mapped,
                                                mappedlen)) == STUN_MESSAGE_RETURN_SUCCESS)
        n = stun_agent_finish_message(agent, &resp, NULL, 0);
    if (n == 0)
        return "cannot build the answer";
    if (answer(s, out, n, from, fromlen)) {
        s->stats.answered++;
        if (classic)
            s->stats.classic++;
    }
    return NULL;
}

static void on_readable(struct ev_loop *loop, ev_io *w, int revents)
{
    struct stun_server *s = w->data;
    for (int i = 0; i < STUN_BATCH; i++) {
        struct sockaddr_storage from;
        socklen_t fromlen = sizeof(from);
        memset(&from, 0, sizeof(from));
        /* MSG_TRUNC: the real length, so that an oversized datagram is seen as such. */
        ssize_t n = recvfrom(s->fd, s->rbuf, sizeof(s->rbuf), MSG_TRUNC, (struct sockaddr *)&from,
                             &fromlen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                log_debug("stun", "recvfrom: %s", strerror(errno));
            return;
        }
        const char *why = handle_datagram(s, (size_t)n, &from, fromlen);
        if (why)
            drop(s, (size_t)n, &from, fromlen, why);
    }
}

struct stun_server *stun_server_start(struct ev_loop *loop, const char *hostport, char *err,
                                      size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (resolve(hostport, true, AF_UNSPEC, &ss, &sslen, err, errlen) != 0)
        return NULL;
    struct stun_server *s = calloc(1, sizeof(*s));
    if (!s) {
        errbuf_set(err, errlen, -1, "out of memory");
        return NULL;
    }
    s->loop = loop;
    s->fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s->fd < 0) {
        errbuf_set(err, errlen, -1, "cannot create a UDP socket for %s: %s", hostport,
                   strerror(errno));
        free(s);
        return NULL;
    }
    /* The TURN relay's clients send here too, every relayed call's packets to this one socket:
     * room for the bursts that come while the loop is busy elsewhere (the kernel's default,
     * about 200 KiB, is 5 ms of 1000 calls; capped by net.core.rmem_max / wmem_max). */
    int sockbuf = 4 << 20;
    if (setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &sockbuf, sizeof(sockbuf)) != 0 ||
        setsockopt(s->fd, SOL_SOCKET, SO_SNDBUF, &sockbuf, sizeof(sockbuf)) != 0)
        log_debug("stun", "socket buffers of %s: %s", hostport, strerror(errno));
    struct sockaddr_storage bound;
    socklen_t boundlen = sizeof(bound);
    if (bind(s->fd, (struct sockaddr *)&ss, sslen) != 0 ||
        getsockname(s->fd, (struct sockaddr *)&bound, &boundlen) != 0) {
        errbuf_set(err, errlen, -1, "cannot bind %s: %s", hostport, strerror(errno));
        close(s->fd);
        free(s);
        return NULL;
    }
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    stun_agent_init(&s->agent_fp, server_known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_USE_FINGERPRINT | STUN_AGENT_USAGE_IGNORE_CREDENTIALS);
    stun_agent_init(&s->agent_plain, server_known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_IGNORE_CREDENTIALS);
    stun_agent_init(&s->agent_3489, server_known_attributes, STUN_COMPATIBILITY_RFC3489,
                    STUN_AGENT_USAGE_IGNORE_CREDENTIALS);
    ev_io_init(&s->io, on_readable, s->fd, EV_READ);
    s->io.data = s;
    ev_io_start(loop, &s->io);
    char addr[INET6_ADDRSTRLEN + 16];
    if (format_addr((struct sockaddr *)&bound, boundlen, addr, sizeof(addr)) != 0)
        snprintf(addr, sizeof(addr), "%s", hostport);
    log_info("stun", "STUN server on udp %s", addr);
    return s;
}

int stun_server_port(const struct stun_server *s)
{
    return s ? s->port : 0;
}

void stun_server_stats(const struct stun_server *s, struct stun_stats *out)
{
    if (s)
        *out = s->stats;
    else
        memset(out, 0, sizeof(*out));
}

void stun_server_set_demux(struct stun_server *s, stun_demux_fn fn, void *ud)
{
    s->demux = fn;
    s->demux_ud = ud;
}

int stun_server_fd(const struct stun_server *s)
{
    return s->fd;
}

void stun_server_stop(struct stun_server *s)
{
    if (!s)
        return;
    ev_io_stop(s->loop, &s->io);
    close(s->fd);
    free(s);
}

/* ---- Client ------------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool same_transaction(const StunMessage *a, const StunMessage *b)
{
    StunTransactionId x, y;
    stun_message_id(a, x);
    stun_message_id(b, y);
    return memcmp(x, y, sizeof(x)) == 0;
}

/*
 * Looks at one datagram that arrived on the client socket. 1: the answer,
 * address in *addr; 0: not ours (stale, foreign, garbage), keep waiting;
 * -1: our transaction's answer but unusable, why in *why.
 */
static int check_answer(StunAgent *agent, StunAgent *plain, const StunMessage *req,
                        const uint8_t *buf, size_t len, struct sockaddr_storage *addr,
                        socklen_t *addrlen, const char **why)
{
    StunMessage msg;
    StunValidationStatus v = stun_agent_validate(agent, &msg, buf, len, NULL, NULL);
    if (v == STUN_VALIDATION_NOT_STUN || v == STUN_VALIDATION_INCOMPLETE_STUN)
        return 0;
    if (!same_transaction(&msg, req))
        return 0;
    if (v == STUN_VALIDATION_BAD_REQUEST &&
        !stun_message_has_attribute(&msg, STUN_ATTRIBUTE_FINGERPRINT)) {
        /* An answer without FINGERPRINT; the plain agent, which sent nothing, sees any
         * response as unmatched once cookie and length are right: the id was checked above. */
        if (stun_agent_validate(plain, &msg, buf, len, NULL, NULL) ==
            STUN_VALIDATION_UNMATCHED_RESPONSE)
            v = STUN_VALIDATION_SUCCESS;
    }
    if (v == STUN_VALIDATION_UNMATCHED_RESPONSE)
        return 0; /* a second answer, to a retransmission */
    if (v != STUN_VALIDATION_SUCCESS) {
        *why = validation_reason(v);
        return -1;
    }
    memset(addr, 0, sizeof(*addr));
    *addrlen = sizeof(*addr);
    switch (stun_usage_bind_process(&msg, (struct sockaddr *)addr, addrlen, NULL, NULL)) {
    case STUN_USAGE_BIND_RETURN_SUCCESS:
        return 1;
    case STUN_USAGE_BIND_RETURN_INVALID:
        return 0;
    default:
        *why =
            stun_message_get_class(&msg) == STUN_ERROR ? "an error response" : "no mapped address";
        return -1;
    }
}

int stun_binding_query(const char *server, const char *local, int timeout_ms, char *mapped,
                       size_t mappedlen, char *err, size_t errlen)
{
    struct sockaddr_storage srv, loc;
    socklen_t srvlen, loclen = 0;
    int family = AF_UNSPEC;
    if (timeout_ms < 1)
        timeout_ms = 1;
    if (local && *local) {
        if (resolve(local, true, AF_UNSPEC, &loc, &loclen, err, errlen) != 0)
            return -1;
        family = loc.ss_family;
    }
    if (resolve(server, false, family, &srv, &srvlen, err, errlen) != 0)
        return -1;

    int fd = socket(srv.ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return errbuf_set(err, errlen, -1, "cannot create a UDP socket: %s", strerror(errno));
    if (loclen > 0 && bind(fd, (struct sockaddr *)&loc, loclen) != 0) {
        int e = errno;
        close(fd);
        return errbuf_set(err, errlen, -1, "cannot bind %s: %s", local, strerror(e));
    }

    StunAgent agent, plain;
    stun_agent_init(&agent, client_known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_USE_FINGERPRINT);
    stun_agent_init(&plain, client_known_attributes, STUN_COMPATIBILITY_RFC5389, 0);
    StunMessage req;
    uint8_t reqbuf[STUN_SEND_BUF];
    size_t reqlen = stun_usage_bind_create(&agent, &req, reqbuf, sizeof(reqbuf));
    if (reqlen == 0) {
        close(fd);
        return errbuf_set(err, errlen, -1, "cannot build a STUN Binding request");
    }

    int rc = -1;
    int64_t deadline = now_ms() + timeout_ms, next_send = now_ms();
    int rto = STUN_FIRST_RTO;
    uint8_t buf[STUN_RECV_BUF];
    for (;;) {
        int64_t now = now_ms();
        if (now >= deadline) {
            errbuf_set(err, errlen, -1, "no STUN answer from %s within %d ms", server, timeout_ms);
            break;
        }
        if (now >= next_send) {
            if (sendto(fd, reqbuf, reqlen, MSG_NOSIGNAL, (struct sockaddr *)&srv, srvlen) < 0 &&
                errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS && errno != EINTR &&
                errno != ECONNREFUSED) {
                errbuf_set(err, errlen, -1, "cannot send to %s: %s", server, strerror(errno));
                break;
            }
            next_send += rto;
            if (next_send < now)
                next_send = now + rto;
            rto = rto * 2 > STUN_MAX_RTO ? STUN_MAX_RTO : rto * 2;
        }
        int64_t until = next_send < deadline ? next_send : deadline;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int pr = poll(&pfd, 1, (int)(until - now));
        if (pr <= 0)
            continue; /* timeout or EINTR: the clock decides */
        int got = 0;
        struct sockaddr_storage addr;
        socklen_t addrlen = 0;
        const char *why = NULL;
        for (int i = 0; i < STUN_BATCH;
             i++) { /* bounded: garbage cannot hold us past the deadline */
            ssize_t n = recv(fd, buf, sizeof(buf), MSG_TRUNC);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                break; /* EAGAIN, or an ICMP error: retransmissions go on */
            if (n < STUN_HEADER_SIZE || (size_t)n > sizeof(buf))
                continue;
            got = check_answer(&agent, &plain, &req, buf, (size_t)n, &addr, &addrlen, &why);
            if (got != 0)
                break;
        }
        if (got < 0) {
            errbuf_set(err, errlen, -1, "malformed answer from %s: %s", server, why);
            break;
        }
        if (got > 0) {
            if (format_addr((struct sockaddr *)&addr, addrlen, mapped, mappedlen) != 0)
                errbuf_set(err, errlen, -1, "mapped address does not fit in %zu bytes", mappedlen);
            else
                rc = 0;
            break;
        }
    }
    close(fd);
    return rc;
}

/* ---- the same query on a loop (stun.h) ------------------------------------------------------ */

struct stun_query {
    struct ev_loop *loop;
    int fd;
    ev_io io;
    ev_timer retrans, deadline;
    StunAgent agent, plain;
    StunMessage req;
    uint8_t reqbuf[STUN_SEND_BUF];
    size_t reqlen;
    struct sockaddr_storage srv;
    socklen_t srvlen;
    int rto;
    char server[128];
    stun_query_fn done;
    void *ud;
};

static void query_end(struct stun_query *q, const char *mapped, const char *err)
{
    stun_query_fn done = q->done;
    void *ud = q->ud;
    stun_query_cancel(q);
    done(ud, mapped, err);
}

static void query_send(struct stun_query *q)
{
    if (sendto(q->fd, q->reqbuf, q->reqlen, MSG_NOSIGNAL, (struct sockaddr *)&q->srv, q->srvlen) <
            0 &&
        errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS && errno != EINTR &&
        errno != ECONNREFUSED) {
        char err[200];
        snprintf(err, sizeof(err), "cannot send to %s: %s", q->server, strerror(errno));
        query_end(q, NULL, err);
        return;
    }
    ev_timer_set(&q->retrans, q->rto / 1000.0, 0.);
    ev_timer_start(q->loop, &q->retrans);
    q->rto = q->rto * 2 > STUN_MAX_RTO ? STUN_MAX_RTO : q->rto * 2;
}

static void query_retrans_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    query_send(w->data);
}

static void query_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    struct stun_query *q = w->data;
    char err[200];
    snprintf(err, sizeof(err), "no STUN answer from %s", q->server);
    query_end(q, NULL, err);
}

static void query_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop, (void)revents;
    struct stun_query *q = w->data;
    uint8_t buf[STUN_RECV_BUF];
    for (int i = 0; i < STUN_BATCH; i++) { /* bounded: garbage cannot hold the loop */
        ssize_t n = recv(q->fd, buf, sizeof(buf), MSG_TRUNC);
        if (n < 0)
            return; /* EAGAIN, or an ICMP error: retransmissions go on */
        if (n < STUN_HEADER_SIZE || (size_t)n > sizeof(buf))
            continue;
        struct sockaddr_storage addr;
        socklen_t addrlen = 0;
        const char *why = NULL;
        int got =
            check_answer(&q->agent, &q->plain, &q->req, buf, (size_t)n, &addr, &addrlen, &why);
        char mapped[INET6_ADDRSTRLEN + 10], err[300];
        if (got < 0) {
            snprintf(err, sizeof(err), "malformed answer from %s: %s", q->server, why);
            query_end(q, NULL, err);
            return;
        }
        if (got > 0) {
            if (format_addr((struct sockaddr *)&addr, addrlen, mapped, sizeof(mapped)) != 0)
                query_end(q, NULL, "the mapped address does not fit");
            else
                query_end(q, mapped, NULL);
            return;
        }
    }
}

struct stun_query *stun_query_start(struct ev_loop *loop, const char *server, int timeout_ms,
                                    stun_query_fn done, void *ud, char *err, size_t errlen)
{
    struct stun_query *q = calloc(1, sizeof(*q));
    if (!q) {
        errbuf_set(err, errlen, -1, "out of memory");
        return NULL;
    }
    q->fd = -1;
    if (resolve(server, false, AF_UNSPEC, &q->srv, &q->srvlen, err, errlen) != 0) {
        free(q);
        return NULL;
    }
    if ((q->fd = socket(q->srv.ss_family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0) {
        errbuf_set(err, errlen, -1, "cannot create a UDP socket: %s", strerror(errno));
        free(q);
        return NULL;
    }
    stun_agent_init(&q->agent, client_known_attributes, STUN_COMPATIBILITY_RFC5389,
                    STUN_AGENT_USAGE_USE_FINGERPRINT);
    stun_agent_init(&q->plain, client_known_attributes, STUN_COMPATIBILITY_RFC5389, 0);
    if (!(q->reqlen = stun_usage_bind_create(&q->agent, &q->req, q->reqbuf, sizeof(q->reqbuf)))) {
        close(q->fd);
        free(q);
        errbuf_set(err, errlen, -1, "cannot build a STUN Binding request");
        return NULL;
    }
    q->loop = loop;
    q->done = done;
    q->ud = ud;
    q->rto = STUN_FIRST_RTO;
    snprintf(q->server, sizeof(q->server), "%s", server);
    ev_io_init(&q->io, query_read_cb, q->fd, EV_READ);
    q->io.data = q;
    ev_io_start(loop, &q->io);
    ev_init(&q->retrans, query_retrans_cb);
    q->retrans.data = q;
    ev_timer_init(&q->deadline, query_deadline_cb, (timeout_ms > 0 ? timeout_ms : 1) / 1000.0, 0.);
    q->deadline.data = q;
    ev_timer_start(loop, &q->deadline);
    query_send(q);
    return q;
}

void stun_query_cancel(struct stun_query *q)
{
    if (!q)
        return;
    ev_io_stop(q->loop, &q->io);
    ev_timer_stop(q->loop, &q->retrans);
    ev_timer_stop(q->loop, &q->deadline);
    if (q->fd >= 0)
        close(q->fd);
    free(q);
}
