/*
 * 160-bit identifiers: Node-IDs (assigned by the login server, carried in the
 * node's certificate) and resource keys (SHA-1 of "<type>|<name>", seed 004
 * section 8). Both live on the same Chord ring, so the ring arithmetic here
 * serves both. Identifiers are big-endian byte strings; on the wire and in
 * logs they are 40 lowercase hex digits.
 */
#ifndef P2P_NODEID_H
#define P2P_NODEID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NID_LEN     20
#define NID_BITS    160
#define NID_HEX_LEN 40

typedef struct nid {
    uint8_t b[NID_LEN];
} nid_t;

/* Parses exactly 40 hex digits (either case). Returns 0, or -1 on any other input. */
int nid_from_hex(nid_t *out, const char *hex);
/* Writes 40 lowercase hex digits and a NUL. Returns `out`. */
char *nid_to_hex(const nid_t *id, char out[NID_HEX_LEN + 1]);

int nid_cmp(const nid_t *a, const nid_t *b);
bool nid_eq(const nid_t *a, const nid_t *b);
bool nid_is_zero(const nid_t *a);

/*
 * Ring intervals, walking clockwise (increasing, wrapping at 2^160) from `a`.
 * nid_in_open:        x in (a, b);  when a == b this is every x except a.
 * nid_in_open_closed: x in (a, b];  when a == b this is the whole ring.
 * These are the two tests Chord needs: "is x strictly between me and my
 * successor" and "is key k mine, given my predecessor".
 */
bool nid_in_open(const nid_t *x, const nid_t *a, const nid_t *b);
bool nid_in_open_closed(const nid_t *x, const nid_t *a, const nid_t *b);

/* out = (a + 2^k) mod 2^160, for 0 <= k < 160 (finger table starts). */
void nid_add_pow2(nid_t *out, const nid_t *a, unsigned k);
/* out = (b - a) mod 2^160: the clockwise distance from a to b. */
void nid_distance(nid_t *out, const nid_t *a, const nid_t *b);

/* Resource key: SHA-1("<type>|<name>"), e.g. ("user location", "alice@example.org"). */
int nid_key(nid_t *out, const char *type, const char *name);
/* A uniformly random identifier from the system's CSPRNG. Returns 0 or -1. */
int nid_random(nid_t *out);

#endif
