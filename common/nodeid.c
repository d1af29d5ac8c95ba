/*
 * 160-bit ring arithmetic on big-endian byte strings. Everything here is a
 * pure function, so the Chord code above it can be tested without sockets.
 */
#include "nodeid.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <string.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int nid_from_hex(nid_t *out, const char *hex)
{
    if (!hex || strlen(hex) != NID_HEX_LEN)
        return -1;
    nid_t tmp;
    for (size_t i = 0; i < NID_LEN; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        tmp.b[i] = (uint8_t)(hi << 4 | lo);
    }
    *out = tmp;
    return 0;
}

char *nid_to_hex(const nid_t *id, char out[NID_HEX_LEN + 1])
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < NID_LEN; i++) {
        out[2 * i] = digits[id->b[i] >> 4];
        out[2 * i + 1] = digits[id->b[i] & 15];
    }
    out[NID_HEX_LEN] = '\0';
    return out;
}

int nid_cmp(const nid_t *a, const nid_t *b)
{
    return memcmp(a->b, b->b, NID_LEN);
}

bool nid_eq(const nid_t *a, const nid_t *b)
{
    return memcmp(a->b, b->b, NID_LEN) == 0;
}

bool nid_is_zero(const nid_t *a)
{
    for (size_t i = 0; i < NID_LEN; i++)
        if (a->b[i])
            return false;
    return true;
}

bool nid_in_open(const nid_t *x, const nid_t *a, const nid_t *b)
{
    int ab = nid_cmp(a, b);
    if (ab < 0) /* no wrap: a < x < b */
        return nid_cmp(a, x) < 0 && nid_cmp(x, b) < 0;
    if (ab > 0) /* wraps past zero: x > a or x < b */
        return nid_cmp(x, a) > 0 || nid_cmp(x, b) < 0;
    return !nid_eq(x, a); /* (a, a): the whole ring but a itself */
}

bool nid_in_open_closed(const nid_t *x, const nid_t *a, const nid_t *b)
{
    return nid_eq(x, b) || nid_in_open(x, a, b) || nid_eq(a, b);
}

void nid_add_pow2(nid_t *out, const nid_t *a, unsigned k)
{
    nid_t r = *a;
    if (k < NID_BITS) {
        int byte = NID_LEN - 1 - (int)(k / 8);
        unsigned carry = 1u << (k % 8);
        for (int i = byte; i >= 0 && carry; i--) {
            unsigned s = r.b[i] + carry;
            r.b[i] = (uint8_t)s;
            carry = s >> 8;
        }
    }
    *out = r;
}

void nid_distance(nid_t *out, const nid_t *a, const nid_t *b)
{
    nid_t r;
    int borrow = 0;
    for (int i = NID_LEN - 1; i >= 0; i--) {
        int d = (int)b->b[i] - (int)a->b[i] - borrow;
        borrow = d < 0;
        r.b[i] = (uint8_t)(d + (borrow ? 256 : 0));
    }
    *out = r;
}

int nid_key(nid_t *out, const char *type, const char *name)
{
    gnutls_hash_hd_t h;
    if (!type || !name || gnutls_hash_init(&h, GNUTLS_DIG_SHA1) < 0)
        return -1;
    gnutls_hash(h, type, strlen(type));
    gnutls_hash(h, "|", 1);
    gnutls_hash(h, name, strlen(name));
    gnutls_hash_deinit(h, out->b);
    return 0;
}

int nid_random(nid_t *out)
{
    return gnutls_rnd(GNUTLS_RND_RANDOM, out->b, NID_LEN) == 0 ? 0 : -1;
}
