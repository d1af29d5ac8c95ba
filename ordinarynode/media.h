/*
 * Media anchoring (docs/sip.md "Media", docs/nat.md): RTP and RTCP of the calls between this
 * node's phones and other nodes go through this node, and between the two nodes on their
 * channel (chan.h), so that the phones need no route to each other, whatever NATs are between.
 *
 * The proxy hands every SIP message it forwards between a phone of ours and a node to
 * media_sip(). Towards the node, the phone's SDP goes as the phone wrote it plus a marker,
 * a=p2p-media:<id>, the id that the frames of this call to us carry; from the node, an SDP with
 * the other node's marker reaches the phone with our address and ports in its c= and m= lines
 * (one RTP/RTCP socket pair per stream, on the address the phones reach us at), its a=rtcp and
 * ICE lines and the marker taken out: codecs, directions and SDES keys stay as they are. What
 * the phone sends to those ports goes to the other node as a frame
 *     [id the other node chose : 2][m-line index << 1 | rtcp : 1][0 : 1][the packet]
 * inside the channel's DTLS (so a TURN relay sees ciphertext), and what comes in such frames
 * goes to the phone.
 *
 * Sources: a phone's packets are taken from its signalling address or the address in its SDP
 * (on a loopback socket, from any local process until the first one latches it), then from
 * where they came (symmetric RTP, the only way to a phone behind a NAT); frames only from the
 * node the call is with. Nothing is ever sent to an address only an SDP from another node named.
 */
#ifndef P2P_MEDIA_H
#define P2P_MEDIA_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "sip.h"

struct chans;

struct media_params {
    struct chans *chans; /* the channels to other nodes */
    const char *host;    /* the phones reach us here: sockets are bound to it ("0.0.0.0" or "::":
                            any address; SDP then names the one that routes to the phone) */
    unsigned port_min, port_max; /* RTP on even ports, RTCP on the next; 0: 20000-29999 */
    unsigned max_calls;          /* calls anchored at once; 0: 64 */
    unsigned max_kbps;           /* per call and direction, over a second; 0: 2000 */
    unsigned idle_s;             /* a call without packets either way this long is let go; 0: 120 */
    unsigned call_kbps;          /* counted against a relayed channel's budget per call; 0: 200 */
    bool trust_sdp; /* the phones are ours (an ordinary node's): before their first packet, send
                       to the address their SDP names; else (a public front end: phones behind
                       NATs) only where their packets come from, or to their SDP's address when it
                       is their signalling address */
    bool local;     /* calls between two phones of ours are relayed too (a front end's phones,
                       each maybe behind its own NAT); else their SDP is left alone */
};

/* The settings of media anchoring, shared by the ordinary node and the super node's front end:
 * a member `media` of the daemon's configuration, MEDIA_FIELDS(its type) in its schema. */
struct media_settings {
    bool on;
    char *address; /* NULL: the SIP front end's address */
    char *ports;   /* "min-max" */
    long long max_calls, max_kbps, idle_s, call_kbps;
};

#define MEDIA_FIELDS(T, DEF_CALLS)                                                                 \
    {"media",                                                                                      \
     CFG_BOOL,                                                                                     \
     offsetof(T, media.on),                                                                        \
     0,                                                                                            \
     0,                                                                                            \
     NULL,                                                                                         \
     "true",                                                                                       \
     "anchor the media of calls between this front end's phones and other nodes (docs/sip.md, "    \
     "Media): RTP goes through this node and, between nodes, through their channel"},              \
        {"media_address",                                                                          \
         CFG_STR,                                                                                  \
         offsetof(T, media.address),                                                               \
         0,                                                                                        \
         0,                                                                                        \
         NULL,                                                                                     \
         NULL,                                                                                     \
         "IP address phones send their RTP to (default: the SIP front end's; 0.0.0.0: any, SDP "   \
         "naming the one that routes to the phone)"},                                              \
        {"media_ports",                                                                            \
         CFG_STR,                                                                                  \
         offsetof(T, media.ports),                                                                 \
         0,                                                                                        \
         0,                                                                                        \
         NULL,                                                                                     \
         "20000-29999",                                                                            \
         "UDP ports for phones' RTP (even) and RTCP (the next one), as min-max"},                  \
        {"media_max_calls",                                                                        \
         CFG_INT,                                                                                  \
         offsetof(T, media.max_calls),                                                             \
         1,                                                                                        \
         100000,                                                                                   \
         NULL,                                                                                     \
         DEF_CALLS,                                                                                \
         "calls with media through here at once; one more is refused with 503"},                   \
        {"media_max_kbps",                                                                         \
         CFG_INT,                                                                                  \
         offsetof(T, media.max_kbps),                                                              \
         16,                                                                                       \
         1000000,                                                                                  \
         NULL,                                                                                     \
         "2000",                                                                                   \
         "kbit/s of one call in each direction; what is beyond is dropped"},                       \
        {"media_idle_s",                                                                           \
         CFG_INT,                                                                                  \
         offsetof(T, media.idle_s),                                                                \
         5,                                                                                        \
         86400,                                                                                    \
         NULL,                                                                                     \
         "120",                                                                                    \
         "a call without media either way this long is let go (its ports closed)"},                \
    {                                                                                              \
        "media_call_kbps", CFG_INT, offsetof(T, media.call_kbps), 8, 1000000, NULL, "200",         \
            "what one call needs of a TURN relay, kbit/s both ways: over a relayed channel, a "    \
            "call the relay's budget (its super node says) has no room for gets 503"               \
    }

/* media_params from settings; default_host: where phones reach the SIP front end. 0, or -1 with
 * err (ports not "min-max"). */
int media_settings_params(const struct media_settings *ms, const char *default_host,
                          struct media_params *out, char *err, size_t errlen);

struct media;

struct media *media_new(struct ev_loop *loop, const struct media_params *p, char *err,
                        size_t errlen);
/* media_new() from a daemon's settings (media_settings_params(), the host of sip_listen as the
 * default address), logged; NULL with err. */
struct media *media_start(struct ev_loop *loop, const struct media_settings *ms,
                          const char *sip_listen, struct chans *cs, bool trust_sdp, bool local,
                          char *err, size_t errlen);
/*
 * A SIP message the proxy forwards from `from` to `to` (a phone of ours and a node on a channel,
 * either way round; anything else is left alone): its SDP body is rewritten in place. 0, or a
 * SIP status to refuse it with (488: unreadable SDP; 503: no room for another call or no ports)
 * and *reason.
 */
int media_sip(struct media *md, osip_message_t *m, const struct sip_source *from,
              const struct sip_source *to, const char **reason);
/* The call (Call-ID) is over: its sockets are closed. */
void media_end(struct media *md, const char *call_id);
/* A media frame that came on the channel from node `node` (chan_media_fn). */
void media_frame(struct media *md, const char *node, const uint8_t *frame, size_t len);
/* {"active", "max_calls", "refused", ..., "calls": [...]} (docs/sip.md), new reference. */
json_t *media_status(struct media *md);
/* Prometheus text (p2p_media_*), malloc'd; NULL when out of memory. */
char *media_metrics(struct media *md);
void media_free(struct media *md);

#endif
