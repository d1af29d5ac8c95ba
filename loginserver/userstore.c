/*
 * The user store on SQLite (see userstore.h for the contract). Statements
 * are fixed texts with bound parameters, prepared once per store and reset
 * right after each use: a statement left un-reset would keep a WAL read
 * snapshot open and stall the other process's checkpoints. Writes take the
 * write lock up front (BEGIN IMMEDIATE), so a second process waits in the
 * busy handler instead of failing when a reader upgrades to a writer.
 */
#include "userstore.h"

#include <errno.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "utf8.h"

#define BUSY_TIMEOUT_MS 5000
#define SALT_LEN        16
#define SALT_MIN        8
#define SALT_MAX        64
#define HASH_LEN        32
#define HASH_PREFIX     "pbkdf2-sha256$"
/* Prefix + 8 digits + salt and hash in base64 + separators, with room to spare. */
#define HASH_STR_MAX USERSTORE_HASH_STR_MAX
/* Never matched: an unknown user's password is hashed against it all the same. */
#define DUMMY_SALT_B64  "AAAAAAAAAAAAAAAAAAAAAA=="
#define DUMMY_HASH_B64  "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
#define META_ITERATIONS "pw_iterations"

enum stmt_id {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_GET_META,
    ST_SET_META,
    ST_INSERT_USER,
    ST_DELETE_USER,
    ST_SET_PW,
    ST_SET_SN,
    ST_GET_USER,
    ST_LIST,
    ST_CHECK,
    ST_INSERT_CERT,
    ST_GET_CERT,
    ST_DELETE_DEVICES,
    ST_GET_DEVICE,
    ST_COUNT_DEVICES,
    ST_INSERT_DEVICE,
    ST_TOUCH_DEVICE,
    ST_DEVICE_BY_NODE,
    ST_DELETE_DEVICE,
    ST_LIST_DEVICES,
    ST_CERTS_SINCE,
    ST_REVOKED,
    ST_COUNT
};

#define DEVICE_COLUMNS "user, device, node_id, created_at, last_at"

/* Columns of user rows, shared by get, list and check (check has one in front). */
#define USER_COLUMNS                                                                               \
    "name, pw, may_supernode, created_at, updated_at, "                                            \
    "(SELECT count(*) FROM certs WHERE certs.user = name)"

static const char *const stmt_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_GET_META] = "SELECT value FROM meta WHERE key = ?1",
    [ST_SET_META] = "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
    [ST_INSERT_USER] = "INSERT INTO users(name, pw, may_supernode, created_at, updated_at) "
                       "VALUES (?1, ?2, ?3, ?4, ?4)",
    [ST_DELETE_USER] = "DELETE FROM users WHERE name = ?1",
    [ST_SET_PW] = "UPDATE users SET pw = ?2, updated_at = ?3 WHERE name = ?1",
    [ST_SET_SN] = "UPDATE users SET may_supernode = ?2, updated_at = ?3 WHERE name = ?1",
    [ST_GET_USER] = "SELECT " USER_COLUMNS " FROM users WHERE name = ?1",
    [ST_LIST] = "SELECT " USER_COLUMNS " FROM users ORDER BY name",
    /* One row whether or not the user exists, so both cases run the same query. */
    [ST_CHECK] = "SELECT (SELECT value FROM meta WHERE key = '" META_ITERATIONS "'), u.name, u.pw, "
                 "u.may_supernode, u.created_at, u.updated_at, "
                 "(SELECT count(*) FROM certs WHERE certs.user = ?1) "
                 "FROM (SELECT 1) LEFT JOIN users AS u ON u.name = ?1",
    [ST_INSERT_CERT] = "INSERT INTO certs(serial, user, node_id, kind, issued_at, not_after) "
                       "VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_GET_CERT] = "SELECT serial, user, node_id, kind, issued_at, not_after "
                    "FROM certs WHERE serial = ?1",
    [ST_DELETE_DEVICES] = "DELETE FROM devices WHERE user = ?1",
    [ST_GET_DEVICE] = "SELECT " DEVICE_COLUMNS " FROM devices WHERE user = ?1 AND device = ?2",
    [ST_COUNT_DEVICES] = "SELECT count(*) FROM devices WHERE user = ?1",
    [ST_INSERT_DEVICE] = "INSERT INTO devices(user, device, node_id, created_at, last_at) "
                         "VALUES (?1, ?2, ?3, ?4, ?4)",
    [ST_TOUCH_DEVICE] = "UPDATE devices SET last_at = ?3 WHERE user = ?1 AND device = ?2",
    [ST_DEVICE_BY_NODE] = "SELECT " DEVICE_COLUMNS " FROM devices WHERE user = ?1 AND node_id = ?2 "
                          "ORDER BY created_at LIMIT 1",
    [ST_DELETE_DEVICE] = "DELETE FROM devices WHERE user = ?1 AND device = ?2",
    [ST_LIST_DEVICES] = "SELECT " DEVICE_COLUMNS " FROM devices WHERE user = ?1 ORDER BY device",
    [ST_CERTS_SINCE] = "SELECT count(*), min(issued_at) FROM certs "
                       "WHERE user = ?1 AND issued_at >= ?2 AND kind IN ('enroll', 'renew')",
    /* Revoked: a node certificate, still within its validity, whose device is gone (removed,
     * or deleted with its account). */
    [ST_REVOKED] = "SELECT serial FROM certs AS c WHERE c.kind IN ('enroll', 'renew') "
                   "AND c.not_after > ?1 AND NOT EXISTS (SELECT 1 FROM devices AS d "
                   "WHERE d.user = c.user AND d.node_id = c.node_id) ORDER BY serial",
};

/* Schema steps: migrations[v] takes a database from version v to v + 1. */
static const char *const migrations[USERSTORE_SCHEMA_VERSION] = {
    "CREATE TABLE users ("
    " name TEXT PRIMARY KEY,"
    " pw TEXT NOT NULL,"
    " may_supernode INTEGER NOT NULL,"
    " created_at INTEGER NOT NULL,"
    " updated_at INTEGER NOT NULL);"
    /* certs.user is deliberately no foreign key: deleting an account keeps the record of
     * what was issued to it. */
    "CREATE TABLE certs ("
    " serial TEXT PRIMARY KEY,"
    " user TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " kind TEXT NOT NULL,"
    " issued_at INTEGER NOT NULL,"
    " not_after INTEGER NOT NULL);"
    "CREATE INDEX certs_by_user ON certs(user);",
    /* 2: devices, the bounded set of Node-IDs an account holds (protocol.md 2.3). A store
     * from version 1 counts each Node-ID it already issued as a device of its own, so that
     * those nodes keep renewing. */
    "CREATE TABLE devices ("
    " user TEXT NOT NULL,"
    " device TEXT NOT NULL,"
    " node_id TEXT NOT NULL,"
    " created_at INTEGER NOT NULL,"
    " last_at INTEGER NOT NULL,"
    " PRIMARY KEY (user, device));"
    "CREATE INDEX devices_by_node ON devices(user, node_id);"
    "CREATE INDEX certs_by_user_time ON certs(user, issued_at);"
    "INSERT INTO devices(user, device, node_id, created_at, last_at)"
    " SELECT user, 'node-' || node_id, node_id, min(issued_at), max(issued_at) FROM certs"
    " WHERE kind IN ('enroll', 'renew') GROUP BY user, node_id;",
};

struct userstore {
    sqlite3 *db;
    sqlite3_stmt *st[ST_COUNT];
    char err[512];
};

/* ---- errors ---- */

static int set_err(struct userstore *us, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int set_err(struct userstore *us, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(us->err, sizeof(us->err), fmt, ap);
    va_end(ap);
    return code;
}

/* Call right after the failing SQLite call, before anything resets the message. */
static int db_err(struct userstore *us, const char *what)
{
    return set_err(us, US_DB, "%s: %s", what, sqlite3_errmsg(us->db));
}

const char *userstore_errmsg(const struct userstore *us)
{
    return us ? us->err : "";
}

const char *userstore_strerror(int code)
{
    switch (code) {
    case US_OK:
        return "success";
    case US_NOT_FOUND:
        return "not found";
    case US_EXISTS:
        return "already exists";
    case US_BAD_CREDENTIALS:
        return "unknown user or wrong password";
    case US_BAD_NAME:
        return "invalid user name";
    case US_BAD_PASSWORD:
        return "password refused";
    case US_BAD_ARG:
        return "invalid argument";
    case US_DB:
        return "database error";
    case US_INTERNAL:
        return "internal error";
    case US_LIMIT:
        return "limit reached";
    default:
        return "unknown error";
    }
}

/* ---- statements and transactions ---- */

/* The prepared statement, reset and unbound; NULL (with the error set) on failure. */
static sqlite3_stmt *stmt(struct userstore *us, enum stmt_id id)
{
    if (!us->st[id] && sqlite3_prepare_v3(us->db, stmt_sql[id], -1, SQLITE_PREPARE_PERSISTENT,
                                          &us->st[id], NULL) != SQLITE_OK) {
        db_err(us, "preparing a statement");
        us->st[id] = NULL;
    }
    return us->st[id];
}

static void stmt_done(sqlite3_stmt *s)
{
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
}

/* Runs a statement that returns no rows. SQLITE_DONE or the failing code. */
static int step_done(sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    return rc == SQLITE_ROW ? SQLITE_MISUSE : rc;
}

static int tx_simple(struct userstore *us, enum stmt_id id, const char *what)
{
    sqlite3_stmt *s = stmt(us, id);
    if (!s)
        return US_DB;
    int rc = step_done(s);
    int ret = rc == SQLITE_DONE ? US_OK : db_err(us, what);
    stmt_done(s);
    return ret;
}

static int tx_begin(struct userstore *us)
{
    return tx_simple(us, ST_BEGIN, "starting a transaction");
}

/* Undoes the open transaction, if any; keeps the error already recorded. */
static void tx_rollback(struct userstore *us)
{
    if (sqlite3_get_autocommit(us->db))
        return;
    char saved[sizeof(us->err)];
    memcpy(saved, us->err, sizeof(saved));
    tx_simple(us, ST_ROLLBACK, "rolling back");
    memcpy(us->err, saved, sizeof(saved));
}

static int tx_commit(struct userstore *us)
{
    int ret = tx_simple(us, ST_COMMIT, "committing");
    if (ret != US_OK)
        tx_rollback(us);
    return ret;
}

static int64_t now_s(void)
{
    return (int64_t)time(NULL);
}

/* ---- base64 (RFC 4648, padded, canonical) ---- */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Writes 4 * ceil(n / 3) characters and a NUL. */
static void b64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = b64_alphabet[v >> 18 & 63];
        out[o++] = b64_alphabet[v >> 12 & 63];
        out[o++] = i + 1 < n ? b64_alphabet[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? b64_alphabet[v & 63] : '=';
    }
    out[o] = '\0';
}

static int b64_value(char c)
{
    const char *p = c ? strchr(b64_alphabet, c) : NULL;
    return p ? (int)(p - b64_alphabet) : -1;
}

/*
 * Decodes exactly `len` characters. Returns the byte count, or -1 unless the
 * text is the canonical encoding of at most `max` bytes: a stored hash has
 * one spelling only.
 */
static long b64_decode(const char *in, size_t len, uint8_t *out, size_t max)
{
    if (len == 0 || len % 4 != 0)
        return -1;
    size_t pad = in[len - 1] == '=' ? (in[len - 2] == '=' ? 2 : 1) : 0;
    size_t n = len / 4 * 3 - pad;
    if (n > max)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            bool padding = i + 4 == len && k >= 4 - (int)pad;
            v[k] = padding ? 0 : b64_value(in[i + k]);
            if (v[k] < 0)
                return -1;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | v[3];
        uint8_t bytes[3] = {(uint8_t)(w >> 16), (uint8_t)(w >> 8), (uint8_t)w};
        for (int k = 0; k < 3; k++) {
            if (o < n)
                out[o++] = bytes[k];
            else if (bytes[k] != 0) /* non-zero unused bits: not canonical */
                return -1;
        }
    }
    return (long)n;
}

/* ---- password hashes ---- */

bool userstore_password_valid(const char *password)
{
    if (!password)
        return false;
    size_t n = strnlen(password, USERSTORE_PASSWORD_MAX + 1);
    return n >= USERSTORE_PASSWORD_MIN && n <= USERSTORE_PASSWORD_MAX &&
           utf8_valid_prefix((const uint8_t *)password, n) == n;
}

static int check_password(struct userstore *us, const char *password)
{
    if (userstore_password_valid(password))
        return US_OK;
    size_t n = password ? strnlen(password, USERSTORE_PASSWORD_MAX + 1) : 0;
    if (n < USERSTORE_PASSWORD_MIN || n > USERSTORE_PASSWORD_MAX)
        return set_err(us, US_BAD_PASSWORD, "a password must be %d to %d bytes long",
                       USERSTORE_PASSWORD_MIN, USERSTORE_PASSWORD_MAX);
    return set_err(us, US_BAD_PASSWORD, "a password must be valid UTF-8");
}

static int check_iterations(struct userstore *us, unsigned *iterations)
{
    if (*iterations == 0)
        *iterations = USERSTORE_DEFAULT_ITERATIONS;
    if (*iterations < USERSTORE_MIN_ITERATIONS || *iterations > USERSTORE_MAX_ITERATIONS)
        return set_err(us, US_BAD_ARG, "PBKDF2 iterations must lie within %u..%u",
                       USERSTORE_MIN_ITERATIONS, USERSTORE_MAX_ITERATIONS);
    return US_OK;
}

/* Parses decimal digits only (no sign, no spaces) within the allowed range. */
static bool parse_iterations(const char *s, size_t len, unsigned *out)
{
    if (len == 0 || len > 8 || s[0] == '0')
        return false;
    unsigned v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v < USERSTORE_MIN_ITERATIONS || v > USERSTORE_MAX_ITERATIONS)
        return false;
    *out = v;
    return true;
}

struct pw_hash {
    unsigned iterations;
    uint8_t salt[SALT_MAX];
    size_t salt_len;
    uint8_t hash[HASH_LEN];
};

static bool parse_hash(const char *s, struct pw_hash *h)
{
    size_t plen = strlen(HASH_PREFIX);
    if (strncmp(s, HASH_PREFIX, plen) != 0)
        return false;
    const char *it = s + plen;
    const char *d1 = strchr(it, '$');
    const char *d2 = d1 ? strchr(d1 + 1, '$') : NULL;
    if (!d2 || !parse_iterations(it, (size_t)(d1 - it), &h->iterations))
        return false;
    long sl = b64_decode(d1 + 1, (size_t)(d2 - d1 - 1), h->salt, sizeof(h->salt));
    long hl = b64_decode(d2 + 1, strlen(d2 + 1), h->hash, sizeof(h->hash));
    if (sl < SALT_MIN || hl != HASH_LEN)
        return false;
    h->salt_len = (size_t)sl;
    return true;
}

static int pbkdf2(const char *password, const uint8_t *salt, size_t salt_len, unsigned iterations,
                  uint8_t out[HASH_LEN])
{
    gnutls_datum_t key = {(unsigned char *)password, (unsigned)strlen(password)};
    gnutls_datum_t s = {(unsigned char *)salt, (unsigned)salt_len};
    return gnutls_pbkdf2(GNUTLS_MAC_SHA256, &key, &s, iterations, out, HASH_LEN) == 0 ? 0 : -1;
}

/*
 * Writes a fresh hash string for `password` (already checked) to out[HASH_STR_MAX].
 * Touches no store: userstore_check_verify runs it on worker threads. -1 names the
 * failing part in *what.
 */
static int make_hash(const char *password, unsigned iterations, char *out, const char **what)
{
    uint8_t salt[SALT_LEN], hash[HASH_LEN];
    char salt64[4 * ((SALT_LEN + 2) / 3) + 1], hash64[4 * ((HASH_LEN + 2) / 3) + 1];
    int ret = 0;
    if (gnutls_rnd(GNUTLS_RND_RANDOM, salt, sizeof(salt)) != 0) {
        *what = "the random generator failed";
        return -1;
    }
    if (pbkdf2(password, salt, sizeof(salt), iterations, hash) != 0) {
        *what = "PBKDF2 failed";
        ret = -1;
        goto out;
    }
    b64_encode(salt, sizeof(salt), salt64);
    b64_encode(hash, sizeof(hash), hash64);
    snprintf(out, HASH_STR_MAX, HASH_PREFIX "%u$%s$%s", iterations, salt64, hash64);
out:
    gnutls_memset(hash, 0, sizeof(hash));
    return ret;
}

static int hash_password(struct userstore *us, const char *password, unsigned iterations, char *out)
{
    const char *what = "";
    if (make_hash(password, iterations, out, &what) != 0)
        return set_err(us, US_INTERNAL, "%s", what);
    return US_OK;
}

/* Compares all n bytes whatever they hold: no early exit to time. */
static bool equal_ct(const uint8_t *a, const uint8_t *b, size_t n)
{
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

/* 0 with *match set, or -1 when the hash string is malformed or PBKDF2 fails. */
static int verify_hash(const char *password, const char *stored, bool *match)
{
    struct pw_hash h;
    uint8_t got[HASH_LEN];
    *match = false;
    if (!parse_hash(stored, &h) || pbkdf2(password, h.salt, h.salt_len, h.iterations, got) != 0)
        return -1;
    *match = equal_ct(got, h.hash, HASH_LEN);
    gnutls_memset(got, 0, sizeof(got));
    return 0;
}

/* ---- names and identifiers ---- */

bool userstore_name_valid(const char *name)
{
    if (!name)
        return false;
    size_t n = 0;
    for (; name[n]; n++) {
        char c = name[n];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (n >= USERSTORE_NAME_MAX || !(alnum || (n > 0 && (c == '.' || c == '_' || c == '-'))))
            return false;
    }
    return n > 0;
}

bool userstore_name_hostlike(const char *name)
{
    if (!name)
        return false;
    if (strcmp(name, "localhost") == 0)
        return true;
    /* Labels of letters, digits and '-' (valid names hold nothing else but '.' and '_'),
     * none empty or starting or ending with '-', and at least two of them. */
    size_t labels = 0, len = 0;
    for (const char *p = name;; p++) {
        if (*p == '_')
            return false;
        if (*p == '.' || *p == '\0') {
            if (len == 0 || p[-1] == '-' || *(p - len) == '-')
                return false;
            labels++;
            len = 0;
            if (*p == '\0')
                break;
        } else {
            len++;
        }
    }
    return labels >= 2;
}

static int check_new_name(struct userstore *us, const char *name)
{
    if (!userstore_name_valid(name) || !userstore_name_hostlike(name))
        return US_OK;
    return set_err(us, US_BAD_NAME,
                   "user name \"%s\" looks like a host name or an IP address: refused, so that "
                   "no user's certificate can pass for a server's (use '_' or no '.')",
                   name);
}

static int check_name(struct userstore *us, const char *name)
{
    if (userstore_name_valid(name))
        return US_OK;
    return set_err(us, US_BAD_NAME,
                   "a user name must be 1 to %d characters of a-z 0-9 . _ -, starting with a "
                   "letter or a digit",
                   USERSTORE_NAME_MAX);
}

/* Copies min..max hex digits to out in lowercase; false on anything else. */
static bool hex_lower(const char *in, size_t min, size_t max, char *out)
{
    if (!in)
        return false;
    size_t n = strnlen(in, max + 1);
    if (n < min || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        if (c >= 'A' && c <= 'F')
            c = (char)(c - 'A' + 'a');
        else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        out[i] = c;
    }
    out[n] = '\0';
    return true;
}

static bool printable_ascii(const char *s, size_t max)
{
    size_t n = strnlen(s, max + 1);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

static void copy_text(char *dst, size_t size, const unsigned char *src)
{
    snprintf(dst, size, "%s", src ? (const char *)src : "");
}

/* ---- opening ---- */

/*
 * A new store is built in a private file and published with link(), which
 * never replaces: processes racing to create the same store (server and CLI
 * on first start) each see either no file or a complete one, never an empty
 * file that another is switching to WAL (SQLite answers that race with
 * "database is locked" or "disk I/O error", whatever the busy timeout).
 * Building it ourselves also sets the mode: SQLite would use the umask's, and
 * it gives its -wal and -shm files the database file's mode.
 */
static int db_open(struct userstore *us, const char *path);
static void db_close(struct userstore *us);

/* The new name must survive a crash as well as the accounts written under it. */
static void sync_dir(const char *path)
{
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, sizeof(dir), ".");
    else
        snprintf(dir, sizeof(dir), "%.*s", slash == path ? 1 : (int)(slash - path), path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static int create_file(struct userstore *us, const char *path)
{
    char tmp[4096], side[4096 + 8];
    if ((size_t)snprintf(tmp, sizeof(tmp), "%s.new-XXXXXX", path) >= sizeof(tmp))
        return set_err(us, US_BAD_ARG, "%s: path too long", path);
    int fd = mkostemp(tmp, O_CLOEXEC); /* mode 0600 */
    if (fd < 0)
        return set_err(us, US_DB, "%s: cannot create: %s", path, strerror(errno));
    close(fd);
    int ret = db_open(us, tmp);
    db_close(us);
    if (ret == US_OK && link(tmp, path) != 0 && errno != EEXIST) /* EEXIST: another won */
        ret = set_err(us, US_DB, "%s: cannot create: %s", path, strerror(errno));
    unlink(tmp);
    if (ret == US_OK)
        sync_dir(path);
    const char *suffixes[] = {"-wal", "-shm", "-journal"};
    for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
        snprintf(side, sizeof(side), "%s%s", tmp, suffixes[i]);
        unlink(side);
    }
    return ret;
}

/*
 * Makes sure `path` is a regular file, creating the store if absent. *loose
 * tells whether it is open to others: it is tightened only once it has proved
 * to be our store. The descriptor is closed before SQLite opens the file,
 * since closing any descriptor of a file drops the process's POSIX locks on it.
 */
static int prepare_file(struct userstore *us, const char *path, bool *loose)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        int ret = create_file(us, path);
        if (ret != US_OK)
            return ret;
        fd = open(path, O_RDWR | O_CLOEXEC);
    }
    if (fd < 0)
        return set_err(us, US_DB, "%s: %s", path, strerror(errno));
    struct stat st;
    int ret = US_OK;
    if (fstat(fd, &st) != 0)
        ret = set_err(us, US_DB, "%s: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        ret = set_err(us, US_DB, "%s: not a regular file", path);
    *loose = ret == US_OK && (st.st_mode & 077) != 0;
    close(fd);
    return ret;
}

static void tighten_mode(const char *path)
{
    if (chmod(path, 0600) == 0)
        log_warn("userstore", "%s was open to other users: mode set to 0600", path);
    else
        log_warn("userstore", "%s is open to other users and its mode cannot be changed: %s", path,
                 strerror(errno));
}

static int exec_const(struct userstore *us, const char *sql, const char *what)
{
    if (sqlite3_exec(us->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return db_err(us, what);
    return US_OK;
}

static int set_wal(struct userstore *us)
{
    sqlite3_stmt *s = NULL;
    int ret = US_OK;
    if (sqlite3_prepare_v2(us->db, "PRAGMA journal_mode = WAL", -1, &s, NULL) != SQLITE_OK)
        return db_err(us, "setting the journal mode");
    if (sqlite3_step(s) != SQLITE_ROW)
        ret = db_err(us, "setting the journal mode");
    else {
        const char *mode = (const char *)sqlite3_column_text(s, 0);
        if (!mode || sqlite3_stricmp(mode, "wal") != 0)
            ret = set_err(us, US_DB, "the database cannot use write-ahead logging (mode %s)",
                          mode ? mode : "unknown");
    }
    sqlite3_finalize(s);
    return ret;
}

static int meta_set(struct userstore *us, const char *key, const char *value)
{
    sqlite3_stmt *s = stmt(us, ST_SET_META);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, value, -1, SQLITE_STATIC);
    int ret = step_done(s) == SQLITE_DONE ? US_OK : db_err(us, "writing metadata");
    stmt_done(s);
    return ret;
}

/* Reads a meta value; *out set to -1 when absent or not a plain number. */
static int meta_get_int(struct userstore *us, const char *key, long long *out)
{
    sqlite3_stmt *s = stmt(us, ST_GET_META);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s), ret = US_OK;
    *out = -1;
    if (rc == SQLITE_ROW) {
        const char *v = (const char *)sqlite3_column_text(s, 0);
        char *end;
        errno = 0;
        long long n = v ? strtoll(v, &end, 10) : -1;
        if (v && *v && !*end && errno == 0 && n >= 0)
            *out = n;
    } else if (rc != SQLITE_DONE) {
        ret = db_err(us, "reading metadata");
    }
    stmt_done(s);
    return ret;
}

static int ensure_schema(struct userstore *us)
{
    int ret = tx_begin(us);
    if (ret != US_OK)
        return ret;
    long long version;
    ret = exec_const(us, "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
                     "creating the schema");
    if (ret == US_OK)
        ret = meta_get_int(us, "schema_version", &version);
    if (ret != US_OK)
        goto fail;
    if (version < 0)
        version = 0;
    if (version > USERSTORE_SCHEMA_VERSION) {
        ret =
            set_err(us, US_DB, "the database has schema version %lld; this program knows up to %d",
                    version, USERSTORE_SCHEMA_VERSION);
        goto fail;
    }
    if (version == USERSTORE_SCHEMA_VERSION) {
        tx_rollback(us); /* nothing written: no need to commit */
        return US_OK;
    }
    for (long long v = version; v < USERSTORE_SCHEMA_VERSION; v++) {
        ret = exec_const(us, migrations[v], "migrating the schema");
        if (ret != US_OK)
            goto fail;
    }
    char text[16];
    snprintf(text, sizeof(text), "%d", USERSTORE_SCHEMA_VERSION);
    ret = meta_set(us, "schema_version", text);
    if (ret != US_OK)
        goto fail;
    return tx_commit(us);
fail:
    tx_rollback(us);
    return ret;
}

/* Opens path with SQLite (the file must exist) and brings it to the current schema. */
static int db_open(struct userstore *us, const char *path)
{
    /* No SQLITE_OPEN_CREATE: SQLite would create the file with the umask's mode. */
    if (sqlite3_open_v2(path, &us->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) !=
        SQLITE_OK)
        return us->db ? db_err(us, path) : set_err(us, US_INTERNAL, "%s: out of memory", path);
    sqlite3_extended_result_codes(us->db, 1);
    sqlite3_busy_timeout(us->db, BUSY_TIMEOUT_MS);
    /* synchronous=FULL: a commit is on disk before we answer (accounts survive a crash).
     * secure_delete: a deleted account's hash does not linger in free pages. */
    int ret = exec_const(us,
                         "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL; "
                         "PRAGMA secure_delete = ON",
                         path);
    if (ret == US_OK)
        ret = set_wal(us);
    if (ret == US_OK)
        ret = ensure_schema(us);
    return ret;
}

static void db_close(struct userstore *us)
{
    for (int i = 0; i < ST_COUNT; i++) {
        sqlite3_finalize(us->st[i]);
        us->st[i] = NULL;
    }
    /* sqlite3_close (not _v2): every statement is finalized above, so it cannot stay busy. */
    if (us->db && sqlite3_close(us->db) != SQLITE_OK)
        log_error("userstore", "closing the database: %s", sqlite3_errmsg(us->db));
    us->db = NULL;
}

int userstore_open(const char *path, struct userstore **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!path || !*path) {
        snprintf(err, errlen, "no user store path");
        return US_BAD_ARG;
    }
    struct userstore *us = calloc(1, sizeof(*us));
    if (!us) {
        snprintf(err, errlen, "out of memory");
        return US_INTERNAL;
    }
    bool loose = false;
    int ret = prepare_file(us, path, &loose);
    if (ret == US_OK)
        ret = db_open(us, path);
    if (ret != US_OK)
        goto fail;
    if (loose)
        tighten_mode(path);
    *out = us;
    return US_OK;
fail:
    snprintf(err, errlen, "%s", us->err);
    userstore_close(us);
    return ret;
}

void userstore_close(struct userstore *us)
{
    if (!us)
        return;
    db_close(us);
    free(us);
}

/* ---- accounts ---- */

/* Records the iteration count of the latest hash: the dummy check of unknown users follows it. */
static int note_iterations(struct userstore *us, unsigned iterations)
{
    char text[16];
    snprintf(text, sizeof(text), "%u", iterations);
    return meta_set(us, META_ITERATIONS, text);
}

/* The checks a new password passes, then its hash: shared by add and passwd. */
static int checked_hash(struct userstore *us, const char *name, const char *password,
                        unsigned *iterations, char pw[HASH_STR_MAX])
{
    int ret = check_name(us, name);
    if (ret == US_OK)
        ret = check_password(us, password);
    if (ret == US_OK)
        ret = check_iterations(us, iterations);
    if (ret == US_OK)
        ret = hash_password(us, password, *iterations, pw);
    return ret;
}

int userstore_add(struct userstore *us, const char *name, const char *password, bool may_supernode,
                  unsigned iterations)
{
    char pw[HASH_STR_MAX];
    int ret = check_new_name(us, name);
    if (ret == US_OK)
        ret = checked_hash(us, name, password, &iterations, pw);
    if (ret != US_OK)
        return ret;
    ret = tx_begin(us);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_INSERT_USER);
    if (!s) {
        ret = US_DB;
        goto fail;
    }
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, pw, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 3, may_supernode);
    sqlite3_bind_int64(s, 4, now_s());
    int rc = step_done(s);
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY)
        ret = set_err(us, US_EXISTS, "user %s already exists", name);
    else if (rc != SQLITE_DONE)
        ret = db_err(us, "adding a user");
    stmt_done(s);
    if (ret == US_OK)
        ret = note_iterations(us, iterations);
    if (ret != US_OK)
        goto fail;
    return tx_commit(us);
fail:
    tx_rollback(us);
    return ret;
}

/* Runs one UPDATE/DELETE on a user inside a transaction; US_NOT_FOUND when no row matched. */
static int change_user(struct userstore *us, sqlite3_stmt *s, const char *name, const char *what,
                       unsigned iterations)
{
    int ret = tx_begin(us);
    if (ret != US_OK)
        goto out;
    int rc = step_done(s);
    if (rc != SQLITE_DONE)
        ret = db_err(us, what);
    else if (sqlite3_changes(us->db) == 0)
        ret = set_err(us, US_NOT_FOUND, "no user %s", name);
    stmt_done(s);
    if (ret == US_OK && iterations)
        ret = note_iterations(us, iterations);
    if (ret == US_OK)
        return tx_commit(us);
    tx_rollback(us);
out:
    stmt_done(s);
    return ret;
}

int userstore_del(struct userstore *us, const char *name)
{
    int ret = check_name(us, name);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_DELETE_USER), *d = stmt(us, ST_DELETE_DEVICES);
    if (!s || !d)
        return US_DB;
    if ((ret = tx_begin(us)) != US_OK)
        return ret;
    /* The devices go with the account: a new account of the same name starts afresh. */
    sqlite3_bind_text(d, 1, name, -1, SQLITE_STATIC);
    int rc = step_done(d);
    stmt_done(d);
    if (rc != SQLITE_DONE) {
        ret = db_err(us, "deleting a user's devices");
        tx_rollback(us);
        return ret;
    }
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    rc = step_done(s);
    if (rc != SQLITE_DONE)
        ret = db_err(us, "deleting a user");
    else if (sqlite3_changes(us->db) == 0)
        ret = set_err(us, US_NOT_FOUND, "no user %s", name);
    stmt_done(s);
    if (ret != US_OK) {
        tx_rollback(us);
        return ret;
    }
    return tx_commit(us);
}

int userstore_passwd(struct userstore *us, const char *name, const char *password,
                     unsigned iterations)
{
    char pw[HASH_STR_MAX];
    int ret = checked_hash(us, name, password, &iterations, pw);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_SET_PW);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, pw, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 3, now_s());
    return change_user(us, s, name, "changing a password", iterations);
}

int userstore_set_supernode(struct userstore *us, const char *name, bool may_supernode)
{
    int ret = check_name(us, name);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_SET_SN);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, may_supernode);
    sqlite3_bind_int64(s, 3, now_s());
    return change_user(us, s, name, "changing a user's role", 0);
}

/* Fills info from the USER_COLUMNS starting at column `c`. */
static void row_to_info(sqlite3_stmt *s, int c, struct user_info *info)
{
    struct pw_hash h;
    const char *pw = (const char *)sqlite3_column_text(s, c + 1);
    memset(info, 0, sizeof(*info));
    copy_text(info->name, sizeof(info->name), sqlite3_column_text(s, c));
    info->pw_iterations = pw && parse_hash(pw, &h) ? h.iterations : 0;
    info->may_supernode = sqlite3_column_int(s, c + 2) != 0;
    info->created_at = sqlite3_column_int64(s, c + 3);
    info->updated_at = sqlite3_column_int64(s, c + 4);
    info->certs = (uint64_t)sqlite3_column_int64(s, c + 5);
}

int userstore_get(struct userstore *us, const char *name, struct user_info *out)
{
    memset(out, 0, sizeof(*out));
    int ret = check_name(us, name);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_GET_USER);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        row_to_info(s, 0, out);
    else if (rc == SQLITE_DONE)
        ret = set_err(us, US_NOT_FOUND, "no user %s", name);
    else
        ret = db_err(us, "reading a user");
    stmt_done(s);
    return ret;
}

int userstore_list(struct userstore *us, void (*cb)(const struct user_info *, void *), void *ud)
{
    sqlite3_stmt *s = stmt(us, ST_LIST);
    if (!s)
        return US_DB;
    int rc, ret = US_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        struct user_info info;
        row_to_info(s, 0, &info);
        cb(&info, ud);
    }
    if (rc != SQLITE_DONE)
        ret = db_err(us, "listing users");
    stmt_done(s);
    return ret;
}

int userstore_check_read(struct userstore *us, const char *name, const char *password,
                         struct userstore_check *c)
{
    char dummy[HASH_STR_MAX];
    memset(c, 0, sizeof(*c));
    int ret = check_name(us, name);
    if (ret != US_OK)
        return ret;
    if (!userstore_password_valid(password))
        return set_err(us, US_BAD_CREDENTIALS, "unknown user or wrong password");

    sqlite3_stmt *s = stmt(us, ST_CHECK);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) {
        ret = db_err(us, "reading a user");
        stmt_done(s);
        return ret;
    }
    /* The dummy follows the latest hash's cost, so that unknown users take as long as most. */
    const char *latest = (const char *)sqlite3_column_text(s, 0);
    unsigned dummy_iterations;
    if (!latest || !parse_iterations(latest, strlen(latest), &dummy_iterations))
        dummy_iterations = USERSTORE_DEFAULT_ITERATIONS;
    snprintf(dummy, sizeof(dummy), HASH_PREFIX "%u$" DUMMY_SALT_B64 "$" DUMMY_HASH_B64,
             dummy_iterations);
    snprintf(c->dummy, sizeof(c->dummy), "%s", dummy);
    const char *pw = (const char *)sqlite3_column_text(s, 2);
    c->known = pw != NULL;
    snprintf(c->stored, sizeof(c->stored), "%s", c->known ? pw : dummy);
    if (c->known)
        row_to_info(s, 1, &c->info);
    stmt_done(s);
    us->err[0] = '\0';
    return US_OK;
}

int userstore_check_verify(struct userstore_check *c, const char *password)
{
    bool match = false;
    c->new_hash[0] = '\0';
    if (verify_hash(password, c->stored, &match) != 0) {
        bool ignored;
        verify_hash(password, c->dummy, &ignored); /* the same work as any other refusal */
        userstore_check_clear(c);
        return US_INTERNAL;
    }
    int ret = c->known && match ? US_OK : US_BAD_CREDENTIALS;
    if (ret == US_OK && c->rehash_iterations >= USERSTORE_MIN_ITERATIONS &&
        c->rehash_iterations <= USERSTORE_MAX_ITERATIONS) {
        const char *what;
        if (make_hash(password, c->rehash_iterations, c->new_hash, &what) != 0)
            c->new_hash[0] = '\0'; /* no upgrade this time: the check itself stands */
    }
    gnutls_memset(c->stored, 0, sizeof(c->stored));
    return ret;
}

void userstore_check_clear(struct userstore_check *c)
{
    gnutls_memset(c->stored, 0, sizeof(c->stored));
    gnutls_memset(c->new_hash, 0, sizeof(c->new_hash));
}

int userstore_check(struct userstore *us, const char *name, const char *password,
                    struct user_info *out)
{
    struct userstore_check c;
    if (out)
        memset(out, 0, sizeof(*out));
    int ret = userstore_check_read(us, name, password, &c);
    if (ret != US_OK)
        return ret;
    ret = userstore_check_verify(&c, password);
    if (ret == US_INTERNAL)
        set_err(us, US_INTERNAL, "the stored password hash of user %s is malformed", name);
    else if (ret == US_BAD_CREDENTIALS)
        set_err(us, US_BAD_CREDENTIALS, "unknown user or wrong password");
    else if (out)
        *out = c.info;
    userstore_check_clear(&c);
    return ret;
}

int userstore_set_hash(struct userstore *us, const char *name, const char *hash)
{
    struct pw_hash h;
    int ret = check_name(us, name);
    if (ret != US_OK)
        return ret;
    if (!hash || strlen(hash) >= HASH_STR_MAX || !parse_hash(hash, &h))
        return set_err(us, US_BAD_ARG, "not a password hash of this store's form");
    sqlite3_stmt *s = stmt(us, ST_SET_PW);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, hash, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 3, now_s());
    return change_user(us, s, name, "changing a password", h.iterations);
}

/* ---- certificates ---- */

static bool kind_valid(const char *kind)
{
    return kind && (strcmp(kind, "enroll") == 0 || strcmp(kind, "renew") == 0 ||
                    strcmp(kind, "service") == 0);
}

int userstore_record_cert(struct userstore *us, const char *serial_hex, const char *user,
                          const char *node_id_hex, const char *kind, int64_t issued_at,
                          int64_t not_after)
{
    char serial[USERSTORE_SERIAL_HEX_MAX + 1], node_id[40 + 1];
    if (!hex_lower(serial_hex, 1, USERSTORE_SERIAL_HEX_MAX, serial))
        return set_err(us, US_BAD_ARG, "a certificate serial must be 1 to %d hex digits",
                       USERSTORE_SERIAL_HEX_MAX);
    if (!hex_lower(node_id_hex, 40, 40, node_id))
        return set_err(us, US_BAD_ARG, "a Node-ID must be 40 hex digits");
    if (!kind_valid(kind))
        return set_err(us, US_BAD_ARG, "a certificate kind must be enroll, renew or service");
    if (!user || (strcmp(kind, "service") == 0 ? !printable_ascii(user, USERSTORE_CERT_USER_MAX)
                                               : !userstore_name_valid(user)))
        return set_err(us, US_BAD_NAME, "invalid user name for a %s certificate", kind);
    if (not_after < issued_at)
        return set_err(us, US_BAD_ARG, "a certificate cannot expire before it is issued");

    int ret = tx_begin(us);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_INSERT_CERT);
    if (!s) {
        ret = US_DB;
        goto fail;
    }
    sqlite3_bind_text(s, 1, serial, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, user, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, node_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 4, kind, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 5, issued_at);
    sqlite3_bind_int64(s, 6, not_after);
    int rc = step_done(s);
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY)
        ret = set_err(us, US_EXISTS, "certificate serial %s is already recorded", serial);
    else if (rc != SQLITE_DONE)
        ret = db_err(us, "recording a certificate");
    stmt_done(s);
    if (ret != US_OK)
        goto fail;
    return tx_commit(us);
fail:
    tx_rollback(us);
    return ret;
}

int userstore_cert_lookup(struct userstore *us, const char *serial_hex, struct cert_info *out)
{
    char serial[USERSTORE_SERIAL_HEX_MAX + 1];
    memset(out, 0, sizeof(*out));
    if (!hex_lower(serial_hex, 1, USERSTORE_SERIAL_HEX_MAX, serial))
        return set_err(us, US_BAD_ARG, "a certificate serial must be 1 to %d hex digits",
                       USERSTORE_SERIAL_HEX_MAX);
    sqlite3_stmt *s = stmt(us, ST_GET_CERT);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, serial, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s), ret = US_OK;
    if (rc == SQLITE_ROW) {
        copy_text(out->serial, sizeof(out->serial), sqlite3_column_text(s, 0));
        copy_text(out->user, sizeof(out->user), sqlite3_column_text(s, 1));
        copy_text(out->node_id, sizeof(out->node_id), sqlite3_column_text(s, 2));
        copy_text(out->kind, sizeof(out->kind), sqlite3_column_text(s, 3));
        out->issued_at = sqlite3_column_int64(s, 4);
        out->not_after = sqlite3_column_int64(s, 5);
    } else if (rc == SQLITE_DONE) {
        ret = set_err(us, US_NOT_FOUND, "no certificate with serial %s", serial);
    } else {
        ret = db_err(us, "reading a certificate");
    }
    stmt_done(s);
    return ret;
}

int userstore_certs_since(struct userstore *us, const char *user, int64_t since, uint64_t *count,
                          int64_t *oldest)
{
    *count = 0;
    *oldest = 0;
    sqlite3_stmt *s = stmt(us, ST_CERTS_SINCE);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, since);
    int ret = US_OK;
    if (sqlite3_step(s) == SQLITE_ROW) {
        *count = (uint64_t)sqlite3_column_int64(s, 0);
        *oldest = sqlite3_column_int64(s, 1);
    } else {
        ret = db_err(us, "counting certificates");
    }
    stmt_done(s);
    return ret;
}

/* ---- devices ---- */

static void row_to_device(sqlite3_stmt *s, struct device_info *d)
{
    memset(d, 0, sizeof(*d));
    copy_text(d->user, sizeof(d->user), sqlite3_column_text(s, 0));
    copy_text(d->device, sizeof(d->device), sqlite3_column_text(s, 1));
    copy_text(d->node_id, sizeof(d->node_id), sqlite3_column_text(s, 2));
    d->created_at = sqlite3_column_int64(s, 3);
    d->last_at = sqlite3_column_int64(s, 4);
}

/* One row of (user, key) from a device query into *out: US_OK, US_NOT_FOUND or US_DB. */
static int device_row(struct userstore *us, enum stmt_id id, const char *user, const char *key,
                      struct device_info *out)
{
    sqlite3_stmt *s = stmt(us, id);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s), ret = US_OK;
    if (rc == SQLITE_ROW)
        row_to_device(s, out);
    else if (rc == SQLITE_DONE)
        ret = set_err(us, US_NOT_FOUND, "user %s has no device %s", user, key);
    else
        ret = db_err(us, "reading a device");
    stmt_done(s);
    return ret;
}

/* Runs a (user, device, time) statement; US_NOT_FOUND when it changed nothing. */
static int device_write(struct userstore *us, enum stmt_id id, const char *user, const char *device,
                        int64_t t, const char *what)
{
    sqlite3_stmt *s = stmt(us, id);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, device, -1, SQLITE_STATIC);
    if (id == ST_TOUCH_DEVICE)
        sqlite3_bind_int64(s, 3, t);
    int ret = US_OK;
    if (step_done(s) != SQLITE_DONE)
        ret = db_err(us, what);
    else if (sqlite3_changes(us->db) == 0)
        ret = set_err(us, US_NOT_FOUND, "user %s has no device %s", user, device);
    stmt_done(s);
    return ret;
}

static int check_device_args(struct userstore *us, const char *user, const char *device)
{
    int ret = check_name(us, user);
    if (ret == US_OK && !userstore_name_valid(device))
        ret = set_err(us, US_BAD_NAME,
                      "a device name must be 1 to %d characters of a-z 0-9 . _ -, starting with "
                      "a letter or a digit",
                      USERSTORE_NAME_MAX);
    return ret;
}

int userstore_device_claim(struct userstore *us, const char *user, const char *device,
                           const char *new_node_id_hex, unsigned max_devices,
                           struct device_info *out, bool *added)
{
    char node_id[40 + 1];
    *added = false;
    memset(out, 0, sizeof(*out));
    int ret = check_device_args(us, user, device);
    if (ret != US_OK)
        return ret;
    if (!hex_lower(new_node_id_hex, 40, 40, node_id))
        return set_err(us, US_BAD_ARG, "a Node-ID must be 40 hex digits");
    if ((ret = tx_begin(us)) != US_OK)
        return ret;
    int64_t now = now_s();
    ret = device_row(us, ST_GET_DEVICE, user, device, out);
    if (ret == US_OK) {
        ret = device_write(us, ST_TOUCH_DEVICE, user, device, now, "updating a device");
        out->last_at = now;
    } else if (ret == US_NOT_FOUND) {
        sqlite3_stmt *s = stmt(us, ST_COUNT_DEVICES);
        int64_t n = 0;
        ret = s ? US_OK : US_DB;
        if (s) {
            sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
            if (sqlite3_step(s) == SQLITE_ROW)
                n = sqlite3_column_int64(s, 0);
            else
                ret = db_err(us, "counting devices");
            stmt_done(s);
        }
        if (ret == US_OK && n >= (int64_t)max_devices)
            ret = set_err(us, US_LIMIT, "user %s already has %lld devices (the maximum is %u)",
                          user, (long long)n, max_devices);
        if (ret == US_OK && (s = stmt(us, ST_INSERT_DEVICE)) == NULL)
            ret = US_DB;
        if (ret == US_OK) {
            sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
            sqlite3_bind_text(s, 2, device, -1, SQLITE_STATIC);
            sqlite3_bind_text(s, 3, node_id, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 4, now);
            if (step_done(s) != SQLITE_DONE)
                ret = db_err(us, "adding a device");
            stmt_done(s);
        }
        if (ret == US_OK) {
            snprintf(out->user, sizeof(out->user), "%s", user);
            snprintf(out->device, sizeof(out->device), "%s", device);
            memcpy(out->node_id, node_id, sizeof(node_id));
            out->created_at = out->last_at = now;
            *added = true;
        }
    }
    if (ret != US_OK) {
        tx_rollback(us);
        *added = false;
        return ret;
    }
    return tx_commit(us);
}

int userstore_device_by_node(struct userstore *us, const char *user, const char *node_id_hex,
                             struct device_info *out)
{
    char node_id[40 + 1];
    memset(out, 0, sizeof(*out));
    int ret = check_name(us, user);
    if (ret != US_OK)
        return ret;
    if (!hex_lower(node_id_hex, 40, 40, node_id))
        return set_err(us, US_BAD_ARG, "a Node-ID must be 40 hex digits");
    return device_row(us, ST_DEVICE_BY_NODE, user, node_id, out);
}

int userstore_device_touch(struct userstore *us, const char *user, const char *device)
{
    int ret = check_device_args(us, user, device);
    if (ret != US_OK)
        return ret;
    return device_write(us, ST_TOUCH_DEVICE, user, device, now_s(), "updating a device");
}

int userstore_device_del(struct userstore *us, const char *user, const char *device)
{
    int ret = check_device_args(us, user, device);
    if (ret != US_OK)
        return ret;
    return device_write(us, ST_DELETE_DEVICE, user, device, 0, "removing a device");
}

int userstore_device_list(struct userstore *us, const char *user,
                          void (*cb)(const struct device_info *, void *), void *ud)
{
    int ret = check_name(us, user);
    if (ret != US_OK)
        return ret;
    sqlite3_stmt *s = stmt(us, ST_LIST_DEVICES);
    if (!s)
        return US_DB;
    sqlite3_bind_text(s, 1, user, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        struct device_info d;
        row_to_device(s, &d);
        cb(&d, ud);
    }
    if (rc != SQLITE_DONE)
        ret = db_err(us, "listing devices");
    stmt_done(s);
    return ret;
}

int userstore_revoked(struct userstore *us, int64_t now, void (*cb)(const char *, void *), void *ud)
{
    sqlite3_stmt *s = stmt(us, ST_REVOKED);
    if (!s)
        return US_DB;
    sqlite3_bind_int64(s, 1, now);
    int rc, ret = US_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW)
        cb((const char *)sqlite3_column_text(s, 0), ud);
    if (rc != SQLITE_DONE)
        ret = db_err(us, "listing revoked certificates");
    stmt_done(s);
    return ret;
}

int userstore_data_version(struct userstore *us, int64_t *out)
{
    sqlite3_stmt *s = NULL;
    int ret = US_OK;
    *out = 0;
    if (sqlite3_prepare_v2(us->db, "PRAGMA data_version", -1, &s, NULL) != SQLITE_OK)
        return db_err(us, "reading the data version");
    if (sqlite3_step(s) == SQLITE_ROW)
        *out = sqlite3_column_int64(s, 0);
    else
        ret = db_err(us, "reading the data version");
    sqlite3_finalize(s);
    return ret;
}
