/*
 * Just enough SDP (RFC 4566) for anchoring media (docs/sip.md, "Media"): what a body says about
 * where its streams receive, and a rewrite that changes only that (connection addresses, media
 * ports, a=rtcp) and the overlay's own marker. Everything else, codecs, directions, SDES crypto
 * lines, stays byte for byte as the phone wrote it; lines are edited, never re-serialised.
 */
#ifndef P2P_SDP_H
#define P2P_SDP_H

#include <stdbool.h>
#include <stddef.h>

#define SDP_MAX_MEDIA 16          /* m-lines taken in one body */
#define SDP_MARK      "p2p-media" /* a=p2p-media:<id>: the frames of this call to me carry id */

struct sdp_media {
    char type[16];      /* "audio", "video", ... */
    unsigned port;      /* 0: a stream refused or disabled */
    char addr[64];      /* its connection address (media-level c=, else the session's), or "" */
    unsigned rtcp_port; /* from a=rtcp; 0: the RTP port + 1 (or the RTP port with rtcp-mux) */
    bool rtcp_mux;
};

struct sdp_info {
    size_t n_media;
    struct sdp_media m[SDP_MAX_MEDIA];
    unsigned mark; /* a=p2p-media:<1..65535>, 0 when absent */
};

/* Reads body (len bytes, CRLF or LF lines). 0, or -1 with err (no v= line first, a malformed
 * m= or c= line, more than SDP_MAX_MEDIA streams, a bad marker, a NUL byte). */
int sdp_scan(const char *body, size_t len, struct sdp_info *out, char *err, size_t errlen);

/* What sdp_rewrite changes. */
struct sdp_edit {
    const char *addr;             /* every c= names this address (IPv4 or IPv6 literal); NULL:
                                     unchanged; a c= of 0.0.0.0 or :: (hold) stays as it is */
    unsigned port[SDP_MAX_MEDIA]; /* per m-line: its new port; 0 keeps the port */
    bool drop_rtcp;               /* a=rtcp lines go (the RTCP port is then the RTP port + 1) */
    bool drop_ice;                /* a=candidate, a=ice-*, a=remote-candidates,
                                     a=end-of-candidates go */
    bool drop_mark;               /* a=p2p-media lines go */
    unsigned mark;                /* 1..65535: a=p2p-media:<mark> added before the first m= */
};

/* The body rewritten (malloc'd, NUL-terminated, *outlen bytes), lines ending in CRLF; NULL when
 * out of memory. Only bodies sdp_scan() accepted. */
char *sdp_rewrite(const char *body, size_t len, const struct sdp_edit *e, size_t *outlen);

#endif
