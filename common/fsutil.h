/*
 * Small file helpers for state directories: nothing half-written ever
 * replaces a good file (write to a temporary, fsync, rename), and reads are
 * bounded so a corrupt or hostile file cannot exhaust memory.
 */
#ifndef P2P_FSUTIL_H
#define P2P_FSUTIL_H

#include <stddef.h>
#include <sys/types.h>

/*
 * Writes data to path atomically with the given mode. The temporary is "<path>.tmp.<24 random
 * hex digits>", created exclusively without following symlinks, so nothing planted in the
 * directory can redirect or clobber the write. 0 or -errno.
 */
int fs_write_atomic(const char *path, const void *data, size_t len, mode_t mode);
/* Reads a whole file (at most max bytes) into a NUL-terminated malloc'd buffer. 0 or -errno
 * (-EFBIG when larger than max). */
int fs_read_file(const char *path, size_t max, char **out, size_t *len);
/* Creates a directory with the mode if missing; an existing one is left as is. 0 or -errno. */
int fs_mkdir(const char *path, mode_t mode);
/* snprintf into buf of "dir/name"; -ENAMETOOLONG when it does not fit. */
int fs_join(char *buf, size_t len, const char *dir, const char *name);

#endif
