/*
 * Channels between ordinary nodes (docs/nat.md, docs/protocol.md 5.9): SIP from one node to
 * another travels on a channel of its own instead of through two super nodes. A channel is an
 * ICE session (RFC 8445, libnice's agent on the daemon's loop through glibev.h) whose
 * credentials and candidates the two nodes exchange through the overlay (`deliver`, payload
 * {"ice": ...}), and over the pair ICE selects, DTLS 1.2 with both nodes' overlay certificates:
 * the peer's Node-ID must be the node the channel was opened to (the one its signed location
 * record names, or the one whose offer the overlay delivered). Candidates: the address of the
 * node's link to its super node (host), the reflexive address that super node's STUN server
 * sees on the channel's own socket (server reflexive), and an allocation on its TURN relay
 * (relayed), whichever the NATs let through.
 *
 * One channel per peer node, reused by every call, closed after idle_s without SIP. Messages
 * sent while a channel opens wait (bounded); when it cannot open within setup_ms they go
 * through the overlay (`deliver`), which stays the last resort, and that peer is tried again
 * only after a pause. Each SIP message travels as one or more DTLS records of at most
 * CHAN_CHUNK bytes of it (a 4-byte header: message number, chunk index, chunk count), put back
 * together at the other end with a bound. A record whose fourth byte is 0 (a SIP chunk's count
 * never is) is a media frame instead (media.h): RTP or RTCP of a call the node anchors, handed
 * to on_media, never queued nor retransmitted.
 */
#ifndef P2P_CHAN_H
#define P2P_CHAN_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "on.h"

#define CHAN_CHUNK      1000u /* bytes of a SIP message per DTLS record */
#define CHAN_MAX_CHUNKS 64u   /* so a message is at most 64000 bytes */

/* A SIP message that arrived on a channel from node `node`, attached to super node `sn`. */
typedef void (*chan_sip_fn)(void *ud, const char *node, const char *sn, const char *text,
                            size_t len);

/* A media frame (chans_send_media) that arrived on the channel from node `node`. */
typedef void (*chan_media_fn)(void *ud, const char *node, const uint8_t *frame, size_t len);

struct chan_params {
    struct onode *on; /* signalling, credentials, the super node's STUN and TURN */
    chan_sip_fn on_sip;
    chan_media_fn on_media; /* NULL: media frames are dropped */
    void *ud;
    unsigned setup_ms;     /* from the first message to an open channel; 0 = 10000 */
    unsigned idle_s;       /* closed after this long without SIP; 0 = 300 */
    unsigned max_channels; /* open or opening at once; 0 = 64 */
    unsigned retry_s;      /* after a failure, the overlay for this long; 0 = 60 */
    bool force_relay;      /* only relayed candidates: peers never learn this node's addresses */
    const char *const *addresses; /* host candidates' IP addresses; none: our link's address */
    size_t n_addresses;
};

struct chans;

struct chans *chans_new(struct ev_loop *loop, const struct chan_params *p, char *err,
                        size_t errlen);
/* Sends one SIP message (text, len) to node `node` attached to super node `sn`: on its channel,
 * opening one when there is none, or through the overlay when no channel can be had. */
void chans_send(struct chans *cs, const char *node, const char *sn, const char *text, size_t len);
#define CHAN_MEDIA_MAX 1360u /* bytes of one media frame (its 4-byte header included) */
/* Sends one media frame (frame[3] == 0) to node `node` on its open channel: 0, or -1 when there
 * is none open (nothing queued: media late is media lost) or the frame is too long. */
int chans_send_media(struct chans *cs, const char *node, const void *frame, size_t len);
/* The path of the channel to node `node`, for status. */
struct chan_path {
    bool open, relayed;
    char relay_sn[41];   /* whose TURN relays it: our super node's or the peer's ("" direct) */
    unsigned relay_kbps; /* what that relay lets the channel carry, both ways (0: not said) */
    char local[96], remote[96];
};
/* Whether there is a channel to `node` (open or not); *p filled when there is. */
bool chans_path(struct chans *cs, const char *node, struct chan_path *p);
/* Opens a channel to node `node` attached to super node `sn`, unless there is one (open or
 * opening): false when none can be had now (it failed within the last retry_s, or no room). */
bool chans_open(struct chans *cs, const char *node, const char *sn);
/* An {"ice": ...} payload the overlay delivered from node `from`. */
void chans_signal(struct chans *cs, const char *from, json_t *payload);
/* {"channels": [...], "opened", "failed", "via_overlay", ...} (new reference). */
json_t *chans_status(struct chans *cs);
/* The same figures in Prometheus text (p2p_channels, p2p_channel_*_total, p2p_ice_candidates,
 * p2p_nat_mapping); malloc'd, NULL when out of memory. */
char *chans_metrics(struct chans *cs);
/* Closes the channel to node `peer` (40 hex), or every channel (peer NULL), with close_notify, as
 * if idle; failed peers may be tried again at once. How many it closed. */
size_t chans_close(struct chans *cs, const char *peer);
/* Closes every channel (close_notify) and frees. NULL is fine. */
void chans_free(struct chans *cs);

#endif
