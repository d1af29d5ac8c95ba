/*
 * Unit tests for fsutil.c's atomic writes against a hostile state directory
 * (issue 15, item 14): a symlink or a file planted at the name the temporary
 * used to have ("<path>.tmp.<pid>") must neither redirect nor clobber the
 * write, the file gets exactly the mode asked for whatever the umask, and
 * no temporary is left behind. Also the bounded read.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"

struct dir {
    char path[256];
};

static int dir_setup(void **state)
{
    struct dir *d = calloc(1, sizeof(*d));
    snprintf(d->path, sizeof(d->path), "/tmp/p2p_test_fsutil.XXXXXX");
    if (!mkdtemp(d->path)) {
        free(d);
        return -1;
    }
    *state = d;
    return 0;
}

static int dir_teardown(void **state)
{
    struct dir *d = *state;
    DIR *dh = opendir(d->path);
    if (dh) {
        struct dirent *e;
        while ((e = readdir(dh))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char p[600];
            snprintf(p, sizeof(p), "%s/%s", d->path, e->d_name);
            unlink(p);
        }
        closedir(dh);
    }
    rmdir(d->path);
    free(d);
    return 0;
}

static void write_plain(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static char *slurp(const char *path)
{
    char *buf = NULL;
    size_t len = 0;
    assert_int_equal(fs_read_file(path, 1 << 20, &buf, &len), 0);
    return buf;
}

/* Entries in the directory whose name contains ".tmp.". */
static int temporaries(const char *dirpath)
{
    int n = 0;
    DIR *dh = opendir(dirpath);
    assert_non_null(dh);
    struct dirent *e;
    while ((e = readdir(dh)))
        if (strstr(e->d_name, ".tmp."))
            n++;
    closedir(dh);
    return n;
}

/* The attack: a symlink at the old predictable temporary name, pointing at a file the attacker
 * wants overwritten (a victim file the daemon's user can write). */
static void test_planted_symlink(void **state)
{
    struct dir *d = *state;
    char target[512], victim[512], planted[600];
    snprintf(target, sizeof(target), "%s/node.json", d->path);
    snprintf(victim, sizeof(victim), "%s/victim", d->path);
    snprintf(planted, sizeof(planted), "%s.tmp.%ld", target, (long)getpid());
    write_plain(victim, "precious\n");
    assert_int_equal(symlink(victim, planted), 0);

    assert_int_equal(fs_write_atomic(target, "{\"a\":1}\n", 8, 0600), 0);

    char *v = slurp(victim);
    assert_string_equal(v, "precious\n"); /* the symlink's target is untouched */
    free(v);
    char *t = slurp(target);
    assert_string_equal(t, "{\"a\":1}\n"); /* and the write still succeeded */
    free(t);
    struct stat st;
    assert_int_equal(lstat(target, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    /* The planted link is still there (not followed, not reused): the only ".tmp." entry. */
    assert_int_equal(lstat(planted, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(temporaries(d->path), 1);
    unlink(planted);
}

/* A dangling symlink at the old name must not make the write create a file elsewhere. */
static void test_planted_dangling_symlink(void **state)
{
    struct dir *d = *state;
    char target[512], elsewhere[512], planted[600];
    snprintf(target, sizeof(target), "%s/creds.pem", d->path);
    snprintf(elsewhere, sizeof(elsewhere), "%s/created-by-redirect", d->path);
    snprintf(planted, sizeof(planted), "%s.tmp.%ld", target, (long)getpid());
    assert_int_equal(symlink(elsewhere, planted), 0);

    assert_int_equal(fs_write_atomic(target, "secret", 6, 0600), 0);
    assert_int_equal(access(elsewhere, F_OK), -1);
    assert_int_equal(errno, ENOENT);
    char *t = slurp(target);
    assert_string_equal(t, "secret");
    free(t);
    unlink(planted);
}

/* A regular file at the old name keeps its content. */
static void test_planted_file(void **state)
{
    struct dir *d = *state;
    char target[512], planted[600];
    snprintf(target, sizeof(target), "%s/hostcache.json", d->path);
    snprintf(planted, sizeof(planted), "%s.tmp.%ld", target, (long)getpid());
    write_plain(planted, "not yours\n");
    assert_int_equal(fs_write_atomic(target, "[]", 2, 0644), 0);
    char *p = slurp(planted);
    assert_string_equal(p, "not yours\n");
    free(p);
    char *t = slurp(target);
    assert_string_equal(t, "[]");
    free(t);
    unlink(planted);
}

/* Mode: exactly the one asked for, whatever the umask; an existing file is replaced. */
static void test_mode_and_replace(void **state)
{
    struct dir *d = *state;
    char target[512];
    snprintf(target, sizeof(target), "%s/key.pem", d->path);
    mode_t old = umask(0);
    assert_int_equal(fs_write_atomic(target, "one", 3, 0600), 0);
    umask(077);
    assert_int_equal(fs_write_atomic(target, "two!", 4, 0640), 0);
    umask(old);
    struct stat st;
    assert_int_equal(stat(target, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    char *t = slurp(target);
    assert_string_equal(t, "two!");
    free(t);
    assert_int_equal(temporaries(d->path), 0);
}

/* A failing rename (a non-empty directory at the target) removes the temporary. */
static void test_failure_leaves_nothing(void **state)
{
    struct dir *d = *state;
    char target[512], inside[600];
    snprintf(target, sizeof(target), "%s/dir", d->path);
    assert_int_equal(mkdir(target, 0700), 0);
    snprintf(inside, sizeof(inside), "%s/x", target);
    write_plain(inside, "x");
    assert_true(fs_write_atomic(target, "data", 4, 0600) < 0);
    assert_int_equal(temporaries(d->path), 0);
    unlink(inside);
    rmdir(target);
}

static void test_read_bounded(void **state)
{
    struct dir *d = *state;
    char target[512];
    snprintf(target, sizeof(target), "%s/big", d->path);
    char buf[10000];
    memset(buf, 'a', sizeof(buf));
    assert_int_equal(fs_write_atomic(target, buf, sizeof(buf), 0600), 0);
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(fs_read_file(target, 9999, &out, &len), -EFBIG);
    assert_null(out);
    assert_int_equal(fs_read_file(target, 10000, &out, &len), 0);
    assert_int_equal(len, 10000);
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_planted_symlink, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_planted_dangling_symlink, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_planted_file, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_mode_and_replace, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_failure_leaves_nothing, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_read_bounded, dir_setup, dir_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
