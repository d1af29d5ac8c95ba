/* Just enough SDP for anchoring media (sdp.h). */
#include "sdp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errbuf.h"

/* The next line of [*p, end): its start and length without CR/LF; false at the end. */
static bool next_line(const char **p, const char *end, const char **line, size_t *n)
{
    if (*p >= end)
        return false;
    const char *s = *p, *nl = memchr(s, '\n', (size_t)(end - s));
    const char *e = nl ? nl : end;
    *p = nl ? nl + 1 : end;
    *line = s;
    *n = (size_t)(e - s);
    if (*n && s[*n - 1] == '\r')
        (*n)--;
    return true;
}

static bool starts(const char *line, size_t n, const char *prefix)
{
    size_t k = strlen(prefix);
    return n >= k && !memcmp(line, prefix, k);
}

/* "c=IN IP4 addr[/ttl]": the address (into addr), whether IPv6; -1 when malformed. */
static int parse_c(const char *line, size_t n, char *addr, size_t alen, bool *v6)
{
    char buf[160], net[8], type[8], a[96];
    if (n >= sizeof(buf))
        return -1;
    memcpy(buf, line, n);
    buf[n] = 0;
    if (sscanf(buf, "c=%7s %7s %95s", net, type, a) != 3 || strcmp(net, "IN") != 0 ||
        (strcmp(type, "IP4") != 0 && strcmp(type, "IP6") != 0))
        return -1;
    char *slash = strchr(a, '/');
    if (slash)
        *slash = 0;
    if (!a[0] || strlen(a) >= alen)
        return -1;
    snprintf(addr, alen, "%s", a);
    if (v6)
        *v6 = type[2] == '6';
    return 0;
}

/* "m=type port[/n] proto fmt...": type and port; -1 when malformed. */
static int parse_m(const char *line, size_t n, char *type, size_t tlen, unsigned *port)
{
    char buf[64];
    size_t k = n < sizeof(buf) - 1 ? n : sizeof(buf) - 1;
    memcpy(buf, line, k);
    buf[k] = 0;
    /* the type: printable, no blank, right after "m=" */
    size_t t = 2;
    while (buf[t] > ' ' && buf[t] < 0x7f)
        t++;
    if (t == 2 || t - 2 >= tlen || buf[t] != ' ')
        return -1;
    char *ps = buf + t + 1, *end;
    if (*ps < '0' || *ps > '9')
        return -1;
    unsigned long p = strtoul(ps, &end, 10);
    if (p > 65535)
        return -1;
    if (*end == '/') { /* a number of ports */
        char *count = end + 1;
        if (*count < '0' || *count > '9')
            return -1;
        strtoul(count, &end, 10);
    }
    if (*end != ' ')
        return -1; /* the transport follows */
    memcpy(type, buf + 2, t - 2);
    type[t - 2] = 0;
    *port = (unsigned)p;
    return 0;
}

static int parse_mark(const char *line, size_t n, unsigned *mark)
{
    size_t k = strlen("a=" SDP_MARK ":");
    unsigned long v = 0;
    if (n <= k || n - k > 5)
        return -1;
    for (size_t i = k; i < n; i++) {
        if (line[i] < '0' || line[i] > '9')
            return -1;
        v = v * 10 + (unsigned long)(line[i] - '0');
    }
    if (v == 0 || v > 65535)
        return -1;
    *mark = (unsigned)v;
    return 0;
}

int sdp_scan(const char *body, size_t len, struct sdp_info *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (memchr(body, 0, len))
        return errbuf_set(err, errlen, -1, "a NUL byte in SDP");
    const char *p = body, *end = body + len, *line;
    size_t n;
    char session_addr[64] = "";
    bool first = true;
    struct sdp_media *cur = NULL;
    while (next_line(&p, end, &line, &n)) {
        if (!n)
            continue;
        if (first) {
            if (!starts(line, n, "v="))
                return errbuf_set(err, errlen, -1, "SDP does not start with v=");
            first = false;
            continue;
        }
        if (starts(line, n, "m=")) {
            if (out->n_media == SDP_MAX_MEDIA)
                return errbuf_set(err, errlen, -1, "more than %d media streams", SDP_MAX_MEDIA);
            cur = &out->m[out->n_media++];
            if (parse_m(line, n, cur->type, sizeof(cur->type), &cur->port) != 0)
                return errbuf_set(err, errlen, -1, "malformed m= line %.*s", (int)(n > 60 ? 60 : n),
                                  line);
            snprintf(cur->addr, sizeof(cur->addr), "%s", session_addr);
        } else if (starts(line, n, "c=")) {
            char a[64];
            if (parse_c(line, n, a, sizeof(a), NULL) != 0)
                return errbuf_set(err, errlen, -1, "malformed c= line %.*s", (int)(n > 60 ? 60 : n),
                                  line);
            snprintf(cur ? cur->addr : session_addr, 64, "%s", a);
        } else if (starts(line, n, "a=rtcp:") && cur) {
            unsigned long v = strtoul(line + 7, NULL, 10);
            if (v > 0 && v <= 65535)
                cur->rtcp_port = (unsigned)v;
        } else if (n == 10 && starts(line, n, "a=rtcp-mux")) {
            if (cur)
                cur->rtcp_mux = true;
        } else if (starts(line, n, "a=" SDP_MARK ":")) {
            if (parse_mark(line, n, &out->mark) != 0)
                return errbuf_set(err, errlen, -1, "malformed a=%s line", SDP_MARK);
        }
    }
    if (first)
        return errbuf_set(err, errlen, -1, "empty SDP");
    return 0;
}

static bool is_ice(const char *line, size_t n)
{
    return starts(line, n, "a=candidate:") || starts(line, n, "a=ice-") ||
           starts(line, n, "a=remote-candidates") || starts(line, n, "a=end-of-candidates");
}

struct obuf {
    char *b;
    size_t n, cap;
    bool oom;
};

static void put(struct obuf *o, const char *s, size_t n)
{
    if (o->oom)
        return;
    if (o->n + n + 3 > o->cap) {
        size_t cap = (o->n + n + 3) * 2;
        char *b = realloc(o->b, cap);
        if (!b) {
            o->oom = true;
            return;
        }
        o->b = b, o->cap = cap;
    }
    memcpy(o->b + o->n, s, n);
    o->n += n;
}

static void put_line(struct obuf *o, const char *s, size_t n)
{
    put(o, s, n);
    put(o, "\r\n", 2);
}

char *sdp_rewrite(const char *body, size_t len, const struct sdp_edit *e, size_t *outlen)
{
    struct obuf o = {0};
    const char *p = body, *end = body + len, *line;
    size_t n;
    int idx = -1;
    bool marked = !e->mark;
    char tmp[256];
    while (next_line(&p, end, &line, &n)) {
        if (!n)
            continue;
        if (starts(line, n, "m=")) {
            if (!marked) {
                int k = snprintf(tmp, sizeof(tmp), "a=%s:%u", SDP_MARK, e->mark);
                put_line(&o, tmp, (size_t)k);
                marked = true;
            }
            idx++;
            unsigned port = idx < SDP_MAX_MEDIA ? e->port[idx] : 0;
            if (port) {
                /* "m=audio 4000[/2] RTP/AVP 0": the port (and any count) replaced */
                const char *sp = memchr(line, ' ', n);
                const char *rest = sp ? memchr(sp + 1, ' ', (size_t)(line + n - sp - 1)) : NULL;
                if (sp && rest) {
                    put(&o, line, (size_t)(sp - line) + 1);
                    int k = snprintf(tmp, sizeof(tmp), "%u", port);
                    put(&o, tmp, (size_t)k);
                    put_line(&o, rest, (size_t)(line + n - rest));
                    continue;
                }
            }
        } else if (starts(line, n, "c=") && e->addr) {
            char a[64];
            bool v6;
            if (parse_c(line, n, a, sizeof(a), &v6) == 0 && strcmp(a, "0.0.0.0") != 0 &&
                strcmp(a, "::") != 0) {
                int k = snprintf(tmp, sizeof(tmp), "c=IN %s %s",
                                 strchr(e->addr, ':') ? "IP6" : "IP4", e->addr);
                put_line(&o, tmp, (size_t)k);
                continue;
            }
        } else if ((e->drop_rtcp && starts(line, n, "a=rtcp:")) ||
                   (e->drop_ice && is_ice(line, n)) ||
                   (e->drop_mark && starts(line, n, "a=" SDP_MARK))) {
            continue;
        }
        put_line(&o, line, n);
    }
    if (!marked) {
        int k = snprintf(tmp, sizeof(tmp), "a=%s:%u", SDP_MARK, e->mark);
        put_line(&o, tmp, (size_t)k);
    }
    if (o.oom || !o.b) {
        free(o.b);
        return NULL;
    }
    o.b[o.n] = 0;
    *outlen = o.n;
    return o.b;
}
