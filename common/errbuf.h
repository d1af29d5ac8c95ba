/*
 * The one-line error convention of this code base: a function that can fail
 * writes a human reason into a caller's buffer (err, errlen) and returns a
 * code. errbuf_set() does both, so that a failure is one statement:
 *
 *     return errbuf_set(err, errlen, -1, "cannot read %s: %s", path, strerror(e));
 */
#ifndef P2P_ERRBUF_H
#define P2P_ERRBUF_H

#include <stddef.h>

/* Formats into err (when err is not NULL and errlen > 0) and returns code. */
int errbuf_set(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
