/*
 * The user store: accounts, password checks (one answer and similar timing
 * for unknown users and wrong passwords), hash format, persistence, file
 * mode, concurrent writers in separate processes, the certificate register,
 * and refusals that leave the store as it was. Each test works in its own
 * directory under /tmp and removes it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "userstore.h"

#define IT           1000 /* PBKDF2 iterations: tests stay fast */
#define PW           "correct horse"
#define NODE_A       "00112233445566778899AABBCCDDEEFF00112233"
#define NODE_B       "ffeeddccbbaa99887766554433221100ffeeddcc"
#define NODE_A_LOWER "00112233445566778899aabbccddeeff00112233"
#define NODE_B_LOWER NODE_B

struct fixture {
    char dir[64];
    char path[128];
    struct userstore *us;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_userstore.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof(f->path), "%s/users.db", f->dir);
    char err[256] = "";
    int rc = userstore_open(f->path, &f->us, err, sizeof(err));
    if (rc != US_OK)
        fail_msg("open: %s", err);
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    userstore_close(f->us);
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void reopen(struct fixture *f)
{
    char err[256] = "";
    userstore_close(f->us);
    f->us = NULL;
    int rc = userstore_open(f->path, &f->us, err, sizeof(err));
    if (rc != US_OK)
        fail_msg("reopen: %s", err);
}

/* Runs one query on the file with a separate connection; returns its first column as text. */
static char *query_text(const char *path, const char *sql, const char *param)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    char *out = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
    if (param)
        sqlite3_bind_text(s, 1, param, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW && sqlite3_column_text(s, 0))
        out = strdup((const char *)sqlite3_column_text(s, 0));
    else
        assert_true(rc == SQLITE_ROW || rc == SQLITE_DONE);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return out;
}

struct names {
    char buf[8192];
    int n;
};

static void collect(const struct user_info *u, void *ud)
{
    struct names *n = ud;
    size_t len = strlen(n->buf);
    snprintf(n->buf + len, sizeof(n->buf) - len, "%s%s", len ? "," : "", u->name);
    n->n++;
}

static int count_users(struct userstore *us)
{
    struct names n = {.buf = "", .n = 0};
    assert_int_equal(userstore_list(us, collect, &n), US_OK);
    return n.n;
}

/* ---- opening ---- */

static void test_open_mode_and_schema(void **state)
{
    struct fixture *f = *state;
    struct stat st;
    assert_int_equal(stat(f->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    char wal[160];
    snprintf(wal, sizeof(wal), "%s-wal", f->path);
    assert_int_equal(stat(wal, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);

    char *v = query_text(f->path, "SELECT value FROM meta WHERE key = 'schema_version'", NULL);
    assert_non_null(v);
    assert_string_equal(v, "2");
    free(v);
    v = query_text(f->path, "PRAGMA journal_mode", NULL);
    assert_string_equal(v, "wal");
    free(v);
}

static void test_open_tightens_mode(void **state)
{
    struct fixture *f = *state;
    userstore_close(f->us);
    f->us = NULL;
    assert_int_equal(chmod(f->path, 0644), 0);
    reopen(f);
    struct stat st;
    assert_int_equal(stat(f->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
}

static void test_open_refuses_bad_files(void **state)
{
    struct fixture *f = *state;
    char path[160], err[256] = "";
    struct userstore *us = (struct userstore *)1;

    snprintf(path, sizeof(path), "%s/garbage.db", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    for (int i = 0; i < 200; i++)
        fputs("this is not a database. ", fp);
    fclose(fp);
    assert_int_equal(userstore_open(path, &us, err, sizeof(err)), US_DB);
    assert_null(us);
    assert_non_null(strstr(err, "not a database"));

    /* A directory, and an empty path. */
    assert_int_equal(userstore_open(f->dir, &us, err, sizeof(err)), US_DB);
    assert_null(us);
    assert_int_equal(userstore_open("", &us, err, sizeof(err)), US_BAD_ARG);

    /* A file from a newer version. */
    userstore_close(f->us);
    f->us = NULL;
    free(query_text(f->path, "UPDATE meta SET value = '3' WHERE key = 'schema_version'", NULL));
    assert_int_equal(userstore_open(f->path, &us, err, sizeof(err)), US_DB);
    assert_null(us);
    assert_non_null(strstr(err, "schema version 3"));
    userstore_close(NULL);
}

/* ---- accounts ---- */

static void test_add_get_list_del(void **state)
{
    struct fixture *f = *state;
    time_t t0 = time(NULL);
    assert_int_equal(userstore_add(f->us, "carol", PW, false, IT), US_OK);
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_add(f->us, "bob", PW, false, IT), US_OK);
    time_t t1 = time(NULL);

    struct user_info u;
    assert_int_equal(userstore_get(f->us, "alice", &u), US_OK);
    assert_string_equal(u.name, "alice");
    assert_true(u.may_supernode);
    assert_true(u.created_at >= t0 && u.created_at <= t1);
    assert_true(u.updated_at == u.created_at);
    assert_int_equal(u.certs, 0);
    assert_int_equal(u.pw_iterations, IT);
    assert_int_equal(userstore_get(f->us, "bob", &u), US_OK);
    assert_false(u.may_supernode);
    assert_int_equal(userstore_get(f->us, "dave", &u), US_NOT_FOUND);

    struct names n = {.buf = "", .n = 0};
    assert_int_equal(userstore_list(f->us, collect, &n), US_OK);
    assert_string_equal(n.buf, "alice,bob,carol");

    assert_int_equal(userstore_del(f->us, "bob"), US_OK);
    assert_int_equal(userstore_get(f->us, "bob", &u), US_NOT_FOUND);
    assert_int_equal(userstore_del(f->us, "bob"), US_NOT_FOUND);
    assert_int_equal(userstore_check(f->us, "bob", PW, NULL), US_BAD_CREDENTIALS);
    n.buf[0] = '\0';
    n.n = 0;
    assert_int_equal(userstore_list(f->us, collect, &n), US_OK);
    assert_string_equal(n.buf, "alice,carol");
}

static void test_passwd_and_supernode(void **state)
{
    struct fixture *f = *state;
    struct user_info u;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_passwd(f->us, "alice", "battery staple", 2 * IT), US_OK);
    assert_int_equal(userstore_check(f->us, "alice", "battery staple", &u), US_OK);
    assert_int_equal(u.pw_iterations, 2 * IT);
    assert_int_equal(userstore_check(f->us, "alice", PW, NULL), US_BAD_CREDENTIALS);
    assert_int_equal(userstore_passwd(f->us, "nobody", "battery staple", IT), US_NOT_FOUND);

    assert_int_equal(userstore_set_supernode(f->us, "alice", false), US_OK);
    assert_int_equal(userstore_get(f->us, "alice", &u), US_OK);
    assert_false(u.may_supernode);
    assert_true(u.updated_at >= u.created_at);
    assert_int_equal(userstore_set_supernode(f->us, "alice", true), US_OK);
    assert_int_equal(userstore_get(f->us, "alice", &u), US_OK);
    assert_true(u.may_supernode);
    assert_int_equal(userstore_set_supernode(f->us, "nobody", true), US_NOT_FOUND);
    assert_int_equal(userstore_set_supernode(f->us, "No body", true), US_BAD_NAME);
}

static void test_duplicate_add_changes_nothing(void **state)
{
    struct fixture *f = *state;
    struct user_info before, after;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_get(f->us, "alice", &before), US_OK);
    char *hash_before = query_text(f->path, "SELECT pw FROM users WHERE name = ?1", "alice");

    assert_int_equal(userstore_add(f->us, "alice", "another password", false, 2 * IT), US_EXISTS);
    assert_non_null(strstr(userstore_errmsg(f->us), "exists"));

    assert_int_equal(userstore_get(f->us, "alice", &after), US_OK);
    assert_memory_equal(&before, &after, sizeof(before));
    char *hash_after = query_text(f->path, "SELECT pw FROM users WHERE name = ?1", "alice");
    assert_string_equal(hash_before, hash_after);
    free(hash_before);
    free(hash_after);
    assert_int_equal(userstore_check(f->us, "alice", PW, NULL), US_OK);
    assert_int_equal(userstore_check(f->us, "alice", "another password", NULL), US_BAD_CREDENTIALS);
    assert_int_equal(count_users(f->us), 1);
    /* The store still takes writes: the failed one left no transaction open. */
    assert_int_equal(userstore_add(f->us, "bob", PW, false, IT), US_OK);
}

static void test_names(void **state)
{
    struct fixture *f = *state;
    char long64[65], long65[66];
    memset(long64, 'a', 64);
    long64[64] = '\0';
    memset(long65, 'a', 65);
    long65[65] = '\0';
    const char *good[] = {"a", "0day", "a.b_c-d", "alice", long64};
    const char *bad[] = {"",       long65,    "Alice",        ".alice",
                         "-alice", "_alice",  "al/ice",       "al ice",
                         "alice ", "al\tice", "\xc3\xa9mile", "alice@example.org",
                         "al:ice"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_true(userstore_name_valid(good[i]));
        assert_int_equal(userstore_add(f->us, good[i], PW, false, IT), US_OK);
    }
    assert_false(userstore_name_valid(NULL));
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_false(userstore_name_valid(bad[i]));
        assert_int_equal(userstore_add(f->us, bad[i], PW, false, IT), US_BAD_NAME);
        assert_non_null(strstr(userstore_errmsg(f->us), "user name"));
        assert_int_equal(userstore_check(f->us, bad[i], PW, NULL), US_BAD_NAME);
        assert_int_equal(userstore_del(f->us, bad[i]), US_BAD_NAME);
    }
    assert_int_equal(count_users(f->us), 5);
}

/* Issue 15, item 10: no account may be named like a host, so no user's certificate looks like
 * a server's. Existing names of that form still work for everything but creation. */
static void test_hostlike_names(void **state)
{
    struct fixture *f = *state;
    const char *hostlike[] = {"login.example.org", "127.0.0.1", "localhost", "a.b",
                              "alice.smith",       "x-1.y-2"};
    const char *fine[] = {"alice", "alice_smith", "a_b.c", "a.b_c-d", "1001", "a.-b", "a..b"};
    for (size_t i = 0; i < sizeof(hostlike) / sizeof(hostlike[0]); i++) {
        assert_true(userstore_name_valid(hostlike[i]));
        assert_true(userstore_name_hostlike(hostlike[i]));
        assert_int_equal(userstore_add(f->us, hostlike[i], PW, false, IT), US_BAD_NAME);
        assert_non_null(strstr(userstore_errmsg(f->us), "looks like a host name or an IP address"));
    }
    for (size_t i = 0; i < sizeof(fine) / sizeof(fine[0]); i++)
        assert_false(userstore_name_hostlike(fine[i]));
    assert_false(userstore_name_hostlike(NULL));
    assert_int_equal(count_users(f->us), 0);
}

struct devs {
    char buf[4096];
    int n;
};

static void collect_dev(const struct device_info *d, void *ud)
{
    struct devs *n = ud;
    size_t len = strlen(n->buf);
    snprintf(n->buf + len, sizeof(n->buf) - len, "%s%s=%s", len ? "," : "", d->device, d->node_id);
    n->n++;
}

/* Issue 15, item 6: a bounded set of devices per account, each keeping its Node-ID. */
static void test_devices(void **state)
{
    struct fixture *f = *state;
    struct device_info d;
    bool added = true;
    char nid[41];
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_device_claim(f->us, "alice", "phone", NODE_A, 2, &d, &added), US_OK);
    assert_true(added);
    assert_string_equal(d.node_id, "00112233445566778899aabbccddeeff00112233");
    /* The same device again: its Node-ID, whatever the new draw. */
    assert_int_equal(userstore_device_claim(f->us, "alice", "phone", NODE_B, 2, &d, &added), US_OK);
    assert_false(added);
    assert_string_equal(d.node_id, "00112233445566778899aabbccddeeff00112233");
    assert_int_equal(userstore_device_claim(f->us, "alice", "laptop", NODE_B, 2, &d, &added),
                     US_OK);
    assert_true(added);
    /* A third device is over the bound of 2: refused, nothing written. */
    snprintf(nid, sizeof(nid), "%040d", 7);
    assert_int_equal(userstore_device_claim(f->us, "alice", "tablet", nid, 2, &d, &added),
                     US_LIMIT);
    assert_false(added);
    assert_non_null(strstr(userstore_errmsg(f->us), "already has 2 devices"));
    struct devs n = {"", 0};
    assert_int_equal(userstore_device_list(f->us, "alice", collect_dev, &n), US_OK);
    assert_int_equal(n.n, 2);
    assert_string_equal(n.buf, "laptop=" NODE_B_LOWER ",phone=" NODE_A_LOWER);
    /* Renewal finds the device by its Node-ID (any case). */
    assert_int_equal(userstore_device_by_node(f->us, "alice", NODE_B, &d), US_OK);
    assert_string_equal(d.device, "laptop");
    assert_int_equal(userstore_device_by_node(f->us, "alice", nid, &d), US_NOT_FOUND);
    assert_int_equal(userstore_device_by_node(f->us, "bob", NODE_B, &d), US_NOT_FOUND);
    assert_int_equal(userstore_device_touch(f->us, "alice", "laptop"), US_OK);
    assert_int_equal(userstore_device_touch(f->us, "alice", "nosuch"), US_NOT_FOUND);
    /* Removing one frees its slot; its Node-ID can no longer be renewed. */
    assert_int_equal(userstore_device_del(f->us, "alice", "laptop"), US_OK);
    assert_int_equal(userstore_device_del(f->us, "alice", "laptop"), US_NOT_FOUND);
    assert_int_equal(userstore_device_by_node(f->us, "alice", NODE_B, &d), US_NOT_FOUND);
    assert_int_equal(userstore_device_claim(f->us, "alice", "tablet", nid, 2, &d, &added), US_OK);
    assert_true(added);
    /* Bad names and Node-IDs. */
    assert_int_equal(userstore_device_claim(f->us, "alice", "../x", nid, 2, &d, &added),
                     US_BAD_NAME);
    assert_int_equal(userstore_device_claim(f->us, "alice", "", nid, 2, &d, &added), US_BAD_NAME);
    assert_int_equal(userstore_device_claim(f->us, "alice", "ok", "12", 2, &d, &added), US_BAD_ARG);
    /* The devices go with the account. */
    assert_int_equal(userstore_del(f->us, "alice"), US_OK);
    n = (struct devs){"", 0};
    assert_int_equal(userstore_device_list(f->us, "alice", collect_dev, &n), US_OK);
    assert_int_equal(n.n, 0);
}

static void collect_serial(const char *serial, void *ud)
{
    struct devs *n = ud;
    size_t len = strlen(n->buf);
    snprintf(n->buf + len, sizeof(n->buf) - len, "%s%s", len ? "," : "", serial);
    n->n++;
}

/* The CRL's input: live certificates whose device or account is gone. */
static void test_revoked(void **state)
{
    struct fixture *f = *state;
    struct device_info d;
    bool added;
    int64_t v0, v1;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_add(f->us, "bob", PW, true, IT), US_OK);
    assert_int_equal(userstore_device_claim(f->us, "alice", "phone", NODE_A, 5, &d, &added), US_OK);
    assert_int_equal(userstore_device_claim(f->us, "alice", "laptop", NODE_B, 5, &d, &added),
                     US_OK);
    assert_int_equal(userstore_device_claim(f->us, "bob", "pc", NODE_A, 5, &d, &added), US_OK);
    assert_int_equal(userstore_record_cert(f->us, "0a", "alice", NODE_A, "enroll", 10, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "0b", "alice", NODE_B, "enroll", 10, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "0c", "alice", NODE_B, "renew", 10, 900), US_OK);
    assert_int_equal(userstore_record_cert(f->us, "0d", "bob", NODE_A, "enroll", 10, 5000), US_OK);
    struct devs n = {"", 0};
    assert_int_equal(userstore_revoked(f->us, 1000, collect_serial, &n), US_OK);
    assert_int_equal(n.n, 0);
    assert_int_equal(userstore_data_version(f->us, &v0), US_OK);
    assert_int_equal(userstore_device_del(f->us, "alice", "laptop"), US_OK);
    assert_int_equal(userstore_del(f->us, "bob"), US_OK);
    /* 0c expired already: nothing to list. */
    assert_int_equal(userstore_revoked(f->us, 1000, collect_serial, &n), US_OK);
    assert_string_equal(n.buf, "0b,0d");
    /* Our own writes leave the data version alone (it tracks other processes). */
    assert_int_equal(userstore_data_version(f->us, &v1), US_OK);
    assert_int_equal(v0, v1);
}

/* Issuing limit input: certificates of one user since a time. */
static void test_certs_since(void **state)
{
    struct fixture *f = *state;
    uint64_t n = 99;
    int64_t oldest = 99;
    assert_int_equal(userstore_certs_since(f->us, "alice", 0, &n, &oldest), US_OK);
    assert_int_equal(n, 0);
    assert_int_equal(oldest, 0);
    assert_int_equal(userstore_record_cert(f->us, "01", "alice", NODE_A, "enroll", 1000, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "02", "alice", NODE_A, "renew", 2000, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "03", "alice", NODE_A, "enroll", 3000, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "04", "bob", NODE_A, "enroll", 3000, 5000),
                     US_OK);
    assert_int_equal(userstore_certs_since(f->us, "alice", 1500, &n, &oldest), US_OK);
    assert_int_equal(n, 2);
    assert_int_equal(oldest, 2000);
}

/* A store of schema version 1 (before devices): each Node-ID it issued becomes a device. */
static void test_migration_from_v1(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_record_cert(f->us, "01", "alice", NODE_A, "enroll", 1000, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "02", "alice", NODE_A, "renew", 2000, 5000),
                     US_OK);
    assert_int_equal(userstore_record_cert(f->us, "03", "alice", NODE_B, "enroll", 3000, 5000),
                     US_OK);
    userstore_close(f->us);
    f->us = NULL;
    free(query_text(f->path, "DROP INDEX certs_by_user_time", NULL));
    free(query_text(f->path, "DROP TABLE IF EXISTS devices", NULL));
    free(query_text(f->path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'", NULL));
    reopen(f);
    struct devs n = {"", 0};
    assert_int_equal(userstore_device_list(f->us, "alice", collect_dev, &n), US_OK);
    assert_int_equal(n.n, 2);
    struct device_info d;
    assert_int_equal(userstore_device_by_node(f->us, "alice", NODE_A, &d), US_OK);
    assert_string_equal(d.device, "node-" NODE_A_LOWER);
    assert_int_equal(d.created_at, 1000);
    assert_int_equal(d.last_at, 2000);
    char *v = query_text(f->path, "SELECT value FROM meta WHERE key = 'schema_version'", NULL);
    assert_string_equal(v, "2");
    free(v);
}

static void test_passwords(void **state)
{
    struct fixture *f = *state;
    char p1024[1025], p1025[1026];
    memset(p1024, 'p', 1024);
    p1024[1024] = '\0';
    memset(p1025, 'p', 1025);
    p1025[1025] = '\0';
    const char *good[] = {"12345678", "p\xc3\xa4sswo\xcc\x88rd", "\xf0\x9f\x94\x91 key key", p1024};
    const char *bad[] = {"",
                         "1234567",
                         p1025,
                         "\xff\xfe"
                         "abcdefgh",
                         "abcdefgh\xc0\xaf",     /* overlong '/' */
                         "abcdefgh\xed\xa0\x80", /* UTF-16 surrogate */
                         "abcdefgh\xc3"};        /* truncated sequence */
    char name[16];
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(name, sizeof(name), "user%zu", i);
        assert_true(userstore_password_valid(good[i]));
        assert_int_equal(userstore_add(f->us, name, good[i], false, IT), US_OK);
        assert_int_equal(userstore_check(f->us, name, good[i], NULL), US_OK);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_false(userstore_password_valid(bad[i]));
        assert_int_equal(userstore_add(f->us, "someone", bad[i], false, IT), US_BAD_PASSWORD);
        assert_true(strlen(userstore_errmsg(f->us)) > 0);
        assert_int_equal(userstore_passwd(f->us, "user0", bad[i], IT), US_BAD_PASSWORD);
        /* A password of the wrong form matches nothing: the usual refusal. */
        assert_int_equal(userstore_check(f->us, "user0", bad[i], NULL), US_BAD_CREDENTIALS);
    }
    assert_non_null(strstr((userstore_add(f->us, "x", "short", false, IT), userstore_errmsg(f->us)),
                           "8 to 1024 bytes"));
    assert_non_null(strstr(
        (userstore_add(f->us, "x", "abcdefgh\xff", false, IT), userstore_errmsg(f->us)), "UTF-8"));
    assert_false(userstore_password_valid(NULL));
    assert_int_equal(userstore_add(f->us, "someone", PW, false, 999), US_BAD_ARG);
    assert_int_equal(userstore_add(f->us, "someone", PW, false, USERSTORE_MAX_ITERATIONS + 1),
                     US_BAD_ARG);
    assert_int_equal(userstore_check(f->us, "user0", "12345678", NULL), US_OK);
    assert_int_equal(count_users(f->us), 4);
}

/* ---- checking passwords ---- */

static void test_check_same_answer(void **state)
{
    struct fixture *f = *state;
    struct user_info u;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_check(f->us, "alice", PW, &u), US_OK);
    assert_string_equal(u.name, "alice");
    assert_true(u.may_supernode);

    assert_int_equal(userstore_check(f->us, "alice", "wrong password", &u), US_BAD_CREDENTIALS);
    assert_string_equal(u.name, ""); /* nothing leaks through *out either */
    char msg_wrong[256];
    snprintf(msg_wrong, sizeof(msg_wrong), "%s", userstore_errmsg(f->us));
    assert_int_equal(userstore_check(f->us, "nobody", "wrong password", &u), US_BAD_CREDENTIALS);
    assert_string_equal(u.name, "");
    assert_string_equal(userstore_errmsg(f->us), msg_wrong);
    assert_int_equal(userstore_check(f->us, "nobody", PW, NULL), US_BAD_CREDENTIALS);
    /* Case matters, prefixes do not match. */
    assert_int_equal(userstore_check(f->us, "alice", "Correct horse", NULL), US_BAD_CREDENTIALS);
    assert_int_equal(userstore_check(f->us, "alice", PW " ", NULL), US_BAD_CREDENTIALS);
    assert_string_not_equal(userstore_strerror(US_BAD_CREDENTIALS),
                            userstore_strerror(US_NOT_FOUND));
}

/* CPU time of this thread: the check is pure computation, and a busy machine that preempts us
 * must not look like a timing difference (it did, in CI under ASan). */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void test_check_timing(void **state)
{
    struct fixture *f = *state;
    enum { N = 7 };
    double wrong[N], unknown[N];
    assert_int_equal(userstore_add(f->us, "alice", PW, false, 20000), US_OK);
    for (int i = 0; i < N; i++) {
        double t = cpu_now();
        assert_int_equal(userstore_check(f->us, "alice", "wrong password", NULL),
                         US_BAD_CREDENTIALS);
        wrong[i] = cpu_now() - t;
        t = cpu_now();
        assert_int_equal(userstore_check(f->us, "mallory", "wrong password", NULL),
                         US_BAD_CREDENTIALS);
        unknown[i] = cpu_now() - t;
    }
    qsort(wrong, N, sizeof(double), cmp_double);
    qsort(unknown, N, sizeof(double), cmp_double);
    double ratio = wrong[N / 2] / unknown[N / 2];
    print_message("median CPU time: wrong password %.2f ms, unknown user %.2f ms, ratio %.2f\n",
                  wrong[N / 2] * 1e3, unknown[N / 2] * 1e3, ratio);
    assert_true(ratio > 0.5 && ratio < 2.0);
}

/* ---- stored form and persistence ---- */

static void test_hash_format(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(userstore_add(f->us, "alice", PW, false, IT), US_OK);
    assert_int_equal(userstore_add(f->us, "bob", PW, false, IT), US_OK);
    char *a = query_text(f->path, "SELECT pw FROM users WHERE name = ?1", "alice");
    char *b = query_text(f->path, "SELECT pw FROM users WHERE name = ?1", "bob");
    assert_non_null(a);
    assert_non_null(b);
    const char *prefix = "pbkdf2-sha256$1000$";
    assert_memory_equal(a, prefix, strlen(prefix));
    assert_memory_equal(b, prefix, strlen(prefix));
    /* $<16-byte salt: 24 base64 characters>$<32-byte hash: 44>. */
    const char *salt_a = a + strlen(prefix), *salt_b = b + strlen(prefix);
    assert_int_equal(strlen(salt_a), 24 + 1 + 44);
    assert_int_equal(salt_a[24], '$');
    assert_memory_equal(salt_a + 22, "==", 2);
    assert_int_equal(salt_a[24 + 44], '=');
    for (size_t i = 0; i < 24 + 1 + 44; i++)
        assert_non_null(strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=$",
                               salt_a[i]));
    /* Same password, different salts, different hashes. */
    assert_memory_not_equal(salt_a, salt_b, 22);
    assert_memory_not_equal(salt_a + 25, salt_b + 25, 43);
    assert_null(strstr(a, PW));
    free(a);
    free(b);
}

static void test_malformed_stored_hash(void **state)
{
    struct fixture *f = *state;
    assert_int_equal(userstore_add(f->us, "alice", PW, false, IT), US_OK);
    free(query_text(f->path, "UPDATE users SET pw = 'plain:' || ?1", PW));
    assert_int_equal(userstore_check(f->us, "alice", PW, NULL), US_INTERNAL);
    assert_non_null(strstr(userstore_errmsg(f->us), "malformed"));
}

/* The two halves the login server runs on its loop and on a worker thread. */
static void *verify_thread(void *p)
{
    struct userstore_check *c = p;
    c->info.certs = (uint64_t)(userstore_check_verify(c, PW) + 100); /* result, carried back */
    return NULL;
}

static void test_check_split(void **state)
{
    struct fixture *f = *state;
    struct userstore_check c;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    /* Right password, verified on another thread with the store untouched. */
    assert_int_equal(userstore_check_read(f->us, "alice", PW, &c), US_OK);
    assert_true(c.known);
    assert_int_equal(c.info.pw_iterations, IT);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, verify_thread, &c), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal((int)c.info.certs - 100, US_OK);
    assert_string_equal(c.info.name, "alice");
    assert_true(c.info.may_supernode);
    assert_string_equal(c.new_hash, ""); /* no upgrade asked for */
    /* Wrong password; unknown user (its dummy has the latest cost): both refused. */
    assert_int_equal(userstore_check_read(f->us, "alice", PW, &c), US_OK);
    assert_int_equal(userstore_check_verify(&c, "wrong password"), US_BAD_CREDENTIALS);
    assert_int_equal(userstore_check_read(f->us, "nobody", PW, &c), US_OK);
    assert_false(c.known);
    assert_non_null(strstr(c.stored, "$1000$"));
    assert_int_equal(userstore_check_verify(&c, PW), US_BAD_CREDENTIALS);
    /* Refused at once, before any hashing: bad names and passwords of no allowed form. */
    assert_int_equal(userstore_check_read(f->us, "Bad Name", PW, &c), US_BAD_NAME);
    assert_int_equal(userstore_check_read(f->us, "alice", "short", &c), US_BAD_CREDENTIALS);
    /* An upgrade made while the password is at hand, stored afterwards. */
    assert_int_equal(userstore_check_read(f->us, "alice", PW, &c), US_OK);
    c.rehash_iterations = 2 * IT;
    assert_int_equal(userstore_check_verify(&c, PW), US_OK);
    assert_non_null(strstr(c.new_hash, "pbkdf2-sha256$2000$"));
    assert_int_equal(userstore_set_hash(f->us, "alice", c.new_hash), US_OK);
    struct user_info u;
    assert_int_equal(userstore_check(f->us, "alice", PW, &u), US_OK);
    assert_int_equal(u.pw_iterations, 2 * IT);
    /* No upgrade for a wrong password; set_hash takes only hashes of the store's form. */
    assert_int_equal(userstore_check_read(f->us, "alice", PW, &c), US_OK);
    c.rehash_iterations = 3 * IT;
    assert_int_equal(userstore_check_verify(&c, "wrong password"), US_BAD_CREDENTIALS);
    assert_string_equal(c.new_hash, "");
    assert_int_equal(userstore_set_hash(f->us, "alice", "plain:" PW), US_BAD_ARG);
    assert_int_equal(userstore_set_hash(f->us, "nobody", c.dummy), US_NOT_FOUND);
    assert_int_equal(userstore_check(f->us, "alice", PW, NULL), US_OK);
    userstore_check_clear(&c);
}

static void test_persistence(void **state)
{
    struct fixture *f = *state;
    struct user_info u;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(userstore_add(f->us, "bob", "battery staple", false, 2 * IT), US_OK);
    assert_int_equal(userstore_record_cert(f->us, "01", "alice",
                                           "00112233445566778899aabbccddeeff00112233", "enroll",
                                           1000, 2000),
                     US_OK);
    reopen(f);
    assert_int_equal(count_users(f->us), 2);
    assert_int_equal(userstore_check(f->us, "alice", PW, &u), US_OK);
    assert_true(u.may_supernode);
    assert_int_equal(u.certs, 1);
    assert_int_equal(userstore_check(f->us, "bob", "battery staple", &u), US_OK);
    assert_false(u.may_supernode);
    assert_int_equal(userstore_check(f->us, "bob", PW, NULL), US_BAD_CREDENTIALS);
    struct cert_info c;
    assert_int_equal(userstore_cert_lookup(f->us, "01", &c), US_OK);
}

/* ---- concurrent writers ---- */

enum { WRITERS = 4, PER_WRITER = 25 };

/* In the child: no cmocka (its jumps belong to the parent); the exit status says what failed. */
static void writer(const char *path, int go_fd, int id)
{
    char c, err[256], name[32];
    struct userstore *us = NULL;
    if (read(go_fd, &c, 1) < 0)
        _exit(10);
    if (userstore_open(path, &us, err, sizeof(err)) != US_OK) {
        fprintf(stderr, "writer %d: open: %s\n", id, err);
        _exit(11);
    }
    for (int i = 0; i < PER_WRITER; i++) {
        snprintf(name, sizeof(name), "w%d-%02d", id, i);
        int rc = userstore_add(us, name, PW, i % 2 == 0, IT);
        if (rc != US_OK) {
            fprintf(stderr, "writer %d: add %s: %s\n", id, name, userstore_errmsg(us));
            _exit(12);
        }
    }
    userstore_close(us);
    _exit(0);
}

static void run_writers(const char *path)
{
    int go[2];
    pid_t pids[WRITERS];
    assert_int_equal(pipe(go), 0);
    for (int i = 0; i < WRITERS; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            close(go[1]);
            writer(path, go[0], i);
        }
    }
    close(go[0]);
    close(go[1]); /* every writer starts now */
    for (int i = 0; i < WRITERS; i++) {
        int status;
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
    }
}

static void check_after_writers(struct fixture *f)
{
    assert_int_equal(count_users(f->us), WRITERS * PER_WRITER);
    assert_int_equal(userstore_check(f->us, "w3-24", PW, NULL), US_OK);
    char *ok = query_text(f->path, "PRAGMA integrity_check", NULL);
    assert_string_equal(ok, "ok");
    free(ok);
}

static void test_concurrent_writers(void **state)
{
    struct fixture *f = *state;
    run_writers(f->path); /* while this process keeps the store open too */
    check_after_writers(f);
}

static void test_concurrent_creation(void **state)
{
    /* The same, on a file nobody has created yet: the writers race to create the schema. */
    struct fixture *f = *state;
    userstore_close(f->us);
    f->us = NULL;
    snprintf(f->path, sizeof(f->path), "%s/fresh.db", f->dir);
    run_writers(f->path);
    reopen(f);
    check_after_writers(f);
    struct stat st;
    assert_int_equal(stat(f->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
}

/* ---- certificates ---- */

static void test_certs(void **state)
{
    struct fixture *f = *state;
    struct cert_info c;
    struct user_info u;
    assert_int_equal(userstore_add(f->us, "alice", PW, true, IT), US_OK);
    assert_int_equal(
        userstore_record_cert(f->us, "0A1B2C", "alice", NODE_A, "enroll", 1700000000, 1731536000),
        US_OK);
    assert_int_equal(
        userstore_record_cert(f->us, "0a1b2d", "alice", NODE_A, "renew", 1700000100, 1731536100),
        US_OK);
    assert_int_equal(userstore_record_cert(f->us, "77", "login.example.org", NODE_B, "service",
                                           1700000000, 1731536000),
                     US_OK);
    assert_int_equal(userstore_cert_lookup(f->us, "0a1b2c", &c), US_OK);
    assert_string_equal(c.serial, "0a1b2c");
    assert_string_equal(c.user, "alice");
    assert_string_equal(c.node_id, "00112233445566778899aabbccddeeff00112233");
    assert_string_equal(c.kind, "enroll");
    assert_int_equal(c.issued_at, 1700000000);
    assert_int_equal(c.not_after, 1731536000);
    assert_int_equal(userstore_cert_lookup(f->us, "0A1B2D", &c), US_OK);
    assert_string_equal(c.kind, "renew");
    assert_int_equal(userstore_cert_lookup(f->us, "77", &c), US_OK);
    assert_string_equal(c.user, "login.example.org");
    assert_int_equal(userstore_get(f->us, "alice", &u), US_OK);
    assert_int_equal(u.certs, 2);

    /* A duplicate serial changes nothing. */
    assert_int_equal(userstore_record_cert(f->us, "0a1b2c", "bob", NODE_B, "enroll", 1, 2),
                     US_EXISTS);
    assert_int_equal(userstore_cert_lookup(f->us, "0a1b2c", &c), US_OK);
    assert_string_equal(c.user, "alice");

    assert_int_equal(userstore_cert_lookup(f->us, "99", &c), US_NOT_FOUND);
    assert_int_equal(userstore_cert_lookup(f->us, "xyz", &c), US_BAD_ARG);
    assert_int_equal(userstore_record_cert(f->us, "", "alice", NODE_A, "enroll", 1, 2), US_BAD_ARG);
    assert_int_equal(userstore_record_cert(f->us, "00112233445566778899aabbccddeeff001122334",
                                           "alice", NODE_A, "enroll", 1, 2),
                     US_BAD_ARG); /* 41 digits */
    assert_int_equal(userstore_record_cert(f->us, "12", "alice", "0011", "enroll", 1, 2),
                     US_BAD_ARG);
    assert_int_equal(userstore_record_cert(f->us, "12", "alice", NODE_A, "other", 1, 2),
                     US_BAD_ARG);
    assert_int_equal(userstore_record_cert(f->us, "12", "alice", NODE_A, "enroll", 2, 1),
                     US_BAD_ARG);
    assert_int_equal(userstore_record_cert(f->us, "12", "Alice", NODE_A, "enroll", 1, 2),
                     US_BAD_NAME);
    assert_int_equal(userstore_record_cert(f->us, "12", "bad\nhost", NODE_A, "service", 1, 2),
                     US_BAD_NAME);
    assert_int_equal(userstore_cert_lookup(f->us, "12", &c), US_NOT_FOUND);

    /* Deleting the account keeps the record of what was issued to it. */
    assert_int_equal(userstore_del(f->us, "alice"), US_OK);
    assert_int_equal(userstore_cert_lookup(f->us, "0a1b2c", &c), US_OK);
    assert_string_equal(c.user, "alice");
}

static void test_strerror(void **state)
{
    const int codes[] = {US_OK,           US_NOT_FOUND, US_EXISTS, US_BAD_CREDENTIALS, US_BAD_NAME,
                         US_BAD_PASSWORD, US_BAD_ARG,   US_DB,     US_INTERNAL};
    size_t n = sizeof(codes) / sizeof(codes[0]);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            assert_string_not_equal(userstore_strerror(codes[i]), userstore_strerror(codes[j]));
    assert_string_equal(userstore_strerror(12345), "unknown error");
    assert_string_equal(userstore_errmsg(NULL), "");
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_open_mode_and_schema),
        T(test_hostlike_names),
        T(test_devices),
        T(test_certs_since),
        T(test_revoked),
        T(test_migration_from_v1),
        T(test_open_tightens_mode),
        T(test_open_refuses_bad_files),
        T(test_add_get_list_del),
        T(test_passwd_and_supernode),
        T(test_duplicate_add_changes_nothing),
        T(test_names),
        T(test_passwords),
        T(test_check_same_answer),
        T(test_check_timing),
        T(test_hash_format),
        T(test_malformed_stored_hash),
        T(test_check_split),
        T(test_persistence),
        T(test_concurrent_writers),
        T(test_concurrent_creation),
        T(test_certs),
        T(test_strerror),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
