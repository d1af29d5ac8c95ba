/*
 * Strict UTF-8 (RFC 3629) checking, shared by the frame decoder (which must
 * refuse bad text) and the logger (which must never print it).
 */
#ifndef P2P_UTF8_H
#define P2P_UTF8_H

#include <stddef.h>
#include <stdint.h>

/*
 * Returns the length of the longest valid prefix of s[0..len): len when the
 * whole text is valid. Overlong forms, UTF-16 surrogates and code points
 * above U+10FFFF are invalid.
 */
size_t utf8_valid_prefix(const uint8_t *s, size_t len);

/* Length in bytes of the valid sequence starting at s[0], or 0 if none starts there. */
size_t utf8_sequence_len(const uint8_t *s, size_t len);

#endif
