/* File helpers for state directories (see fsutil.h). */
#include "fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

int fs_join(char *buf, size_t len, const char *dir, const char *name)
{
    int n = snprintf(buf, len, "%s/%s", dir, name);
    return (n < 0 || (size_t)n >= len) ? -ENAMETOOLONG : 0;
}

int fs_mkdir(const char *path, mode_t mode)
{
    if (mkdir(path, mode) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    struct stat st;
    if (stat(path, &st) != 0)
        return -errno;
    return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

/*
 * The temporary lives beside the target (rename is atomic only within one file system) under a
 * name nobody can guess, and is created with O_EXCL|O_NOFOLLOW: a symlink or file planted where
 * the temporary goes makes the open fail instead of redirecting the write (the state directory
 * may be shared or writable by others). The mode is given at creation, so the file is never
 * more open than asked, even for a moment.
 */
static int open_temporary(const char *path, mode_t mode, char *tmp, size_t len)
{
    for (int attempt = 0; attempt < 8; attempt++) {
        unsigned char rnd[12];
        if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
            return -EIO;
        char hex[2 * sizeof(rnd) + 1];
        for (size_t i = 0; i < sizeof(rnd); i++)
            snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
        if (snprintf(tmp, len, "%s.tmp.%s", path, hex) >= (int)len)
            return -ENAMETOOLONG;
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode & 0777);
        if (fd >= 0)
            return fd;
        if (errno != EEXIST && errno != EINTR)
            return -errno;
    }
    return -EEXIST;
}

int fs_write_atomic(const char *path, const void *data, size_t len, mode_t mode)
{
    char tmp[4096];
    int fd = open_temporary(path, mode, tmp, sizeof(tmp));
    if (fd < 0)
        return fd;
    const char *p = data;
    size_t left = len;
    while (left) {
        ssize_t n = write(fd, p, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto fail;
        p += n;
        left -= (size_t)n;
    }
    /* fchmod: the umask must not widen or narrow what the caller asked for. */
    if (fchmod(fd, mode) != 0 || fsync(fd) != 0)
        goto fail;
    if (close(fd) != 0) {
        fd = -1;
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return -e;
    }
    return 0;
fail:;
    int e = errno;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return -e;
}

int fs_read_file(const char *path, size_t max, char **out, size_t *len)
{
    *out = NULL;
    if (len)
        *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t cap = 4096, used = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    for (;;) {
        if (used == cap) {
            if (cap > max) {
                free(buf);
                close(fd);
                return -EFBIG;
            }
            cap *= 2;
            char *grown = realloc(buf, cap + 1);
            if (!grown) {
                free(buf);
                close(fd);
                return -ENOMEM;
            }
            buf = grown;
        }
        ssize_t n = read(fd, buf + used, cap - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return -e;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    close(fd);
    if (used > max) {
        free(buf);
        return -EFBIG;
    }
    buf[used] = '\0';
    *out = buf;
    if (len)
        *len = used;
    return 0;
}
