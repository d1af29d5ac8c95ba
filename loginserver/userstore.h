/*
 * The login server's user store: the accounts that may enroll (name,
 * password hash, whether the operator allows the super node role) and the
 * register of every certificate the CA issued, kept in one SQLite file.
 *
 * The server and the administration CLI ("loginserver user add" while the
 * server runs) open the same file at once: SQLite's locking, a busy timeout
 * and one transaction per write keep them consistent, and a failed write
 * changes nothing. Passwords are kept as salted PBKDF2-HMAC-SHA256 strings
 * "pbkdf2-sha256$<iterations>$<salt base64>$<hash base64>"; the iteration
 * count travels with each hash, so raising the default keeps old accounts
 * working. userstore_check() answers alike, in code and in time, for an
 * unknown user and a wrong password, so user names cannot be probed.
 *
 * Contracts: one thread per store (SQLite is opened without its mutexes;
 * userstore_check_verify alone touches no store and may run on any thread);
 * a process that forks must not use its store in the child (open a new one).
 * Every string argument is NUL-terminated and must not be NULL unless said
 * otherwise. Nothing here logs a password.
 */
#ifndef P2P_USERSTORE_H
#define P2P_USERSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Return codes: 0 or negative, as everywhere in the project. */
enum userstore_status {
    US_OK = 0,
    US_NOT_FOUND = -1,       /* no such user / certificate */
    US_EXISTS = -2,          /* the user / serial is already there */
    US_BAD_CREDENTIALS = -3, /* unknown user or wrong password: deliberately one code */
    US_BAD_NAME = -4,        /* user name not of the allowed form (protocol.md 2.3) */
    US_BAD_PASSWORD = -5,    /* new password refused: length or encoding */
    US_BAD_ARG = -6,         /* another argument out of range (iterations, serial, kind...) */
    US_DB = -7,              /* SQLite failed; userstore_errmsg() has its message */
    US_INTERNAL = -8,        /* out of memory, random generator or PBKDF2 failure */
    US_LIMIT = -9,           /* a bound reached: the account holds its maximum of devices */
};

#define USERSTORE_NAME_MAX     64
#define USERSTORE_PASSWORD_MIN 8    /* bytes */
#define USERSTORE_PASSWORD_MAX 1024 /* bytes */
/*
 * PBKDF2 iterations for new hashes when the caller passes 0 (OWASP's 2023
 * figure for PBKDF2-HMAC-SHA256). Measured here: ~0.4-0.6 s of one core per
 * hash or check, during which a one-thread server serves nothing else.
 */
#define USERSTORE_DEFAULT_ITERATIONS 600000u
#define USERSTORE_MIN_ITERATIONS     1000u
#define USERSTORE_MAX_ITERATIONS     10000000u
#define USERSTORE_SCHEMA_VERSION     2
/* A stored password hash string, NUL included, is at most this long. */
#define USERSTORE_HASH_STR_MAX 192
/* Certificate serials: 1 to 20 octets (RFC 5280), as hex. */
#define USERSTORE_SERIAL_HEX_MAX 40
#define USERSTORE_CERT_USER_MAX  255

struct userstore;

struct user_info {
    char name[USERSTORE_NAME_MAX + 1];
    bool may_supernode;
    int64_t created_at; /* Unix time, seconds */
    int64_t updated_at; /* last change of password or role */
    uint64_t certs;     /* certificates recorded for this user name */
    /* Iterations of the stored hash: below the current default, the server may
     * re-hash the password (userstore_passwd) after a successful check. */
    unsigned pw_iterations;
};

/* A device of an account: the name it enrolls under and the Node-ID the CA gave it. */
struct device_info {
    char user[USERSTORE_NAME_MAX + 1];
    char device[USERSTORE_NAME_MAX + 1];
    char node_id[40 + 1]; /* lowercase hex */
    int64_t created_at;   /* first enrollment */
    int64_t last_at;      /* latest enrollment or renewal */
};

struct cert_info {
    char serial[USERSTORE_SERIAL_HEX_MAX + 1]; /* lowercase hex */
    char user[USERSTORE_CERT_USER_MAX + 1];
    char node_id[40 + 1]; /* lowercase hex */
    char kind[8];         /* "enroll", "renew" or "service" */
    int64_t issued_at;
    int64_t not_after;
};

/*
 * Opens the store at `path`, creating the file (mode 0600; an existing file
 * readable by others is tightened to 0600) and its schema when absent, and
 * migrating an older schema. Refuses a file written by a newer version.
 * On success *out is a new store the caller owns (userstore_close). On
 * failure returns US_BAD_ARG or US_DB and writes a one-line reason to err.
 */
int userstore_open(const char *path, struct userstore **out, char *err, size_t errlen);
/* Closes the database and frees the store. Accepts NULL. */
void userstore_close(struct userstore *us);

/* The message of the last US_DB / US_INTERNAL / refusal on this store ("" if none). */
const char *userstore_errmsg(const struct userstore *us);
/* A fixed English text for a return code. */
const char *userstore_strerror(int code);

/* 1-64 characters of a-z 0-9 . _ -, the first a letter or a digit. */
bool userstore_name_valid(const char *name);
/*
 * True for a name a TLS client could take for a host: "localhost", an IPv4
 * address, or dot-separated labels of letters, digits and '-' (e.g.
 * "login.example.org", "alice.smith"). New accounts may not have such names
 * (userstore_add refuses them with US_BAD_NAME): no user's certificate must
 * look like a server's. A '_' anywhere ("alice_smith", "a_b.c") makes a name
 * no host name.
 */
bool userstore_name_hostlike(const char *name);
/* USERSTORE_PASSWORD_MIN..MAX bytes of valid UTF-8. */
bool userstore_password_valid(const char *password);

/*
 * Account management. New names must be valid and not host-like
 * (userstore_name_hostlike). `iterations` 0 means USERSTORE_DEFAULT_ITERATIONS;
 * otherwise it must lie within USERSTORE_MIN/MAX_ITERATIONS. The hash is
 * computed before the write transaction starts, so a slow hash does not
 * hold the database lock.
 */
int userstore_add(struct userstore *us, const char *name, const char *password, bool may_supernode,
                  unsigned iterations);
/* Deletes the account and its devices; the certificates issued to it stay on record. */
int userstore_del(struct userstore *us, const char *name);
int userstore_passwd(struct userstore *us, const char *name, const char *password,
                     unsigned iterations);
int userstore_set_supernode(struct userstore *us, const char *name, bool may_supernode);
int userstore_get(struct userstore *us, const char *name, struct user_info *out);
/*
 * Calls cb once per user in name order. The callback must not call into the
 * same store. Returns US_OK or US_DB (some users may have been reported).
 */
int userstore_list(struct userstore *us, void (*cb)(const struct user_info *, void *), void *ud);

/*
 * Verifies a password. US_OK fills *out (may be NULL). An unknown user and a
 * wrong password both give US_BAD_CREDENTIALS after the same work: an unknown
 * user's password is run through PBKDF2 against a fixed dummy hash, with the
 * iteration count of the most recently written hash. A password not of the
 * allowed form gives US_BAD_CREDENTIALS at once (it matches no account), a
 * name not of the allowed form US_BAD_NAME (its form is public anyway).
 * Accounts hashed with fewer iterations than the latest answer faster: re-hash
 * them on login (see user_info.pw_iterations).
 */
int userstore_check(struct userstore *us, const char *name, const char *password,
                    struct user_info *out);

/*
 * userstore_check in two steps, so that the costly one can run on another
 * thread (the login server's PBKDF2 workers) while the store stays on its
 * own: userstore_check_read reads what the check needs (the stored hash, or
 * the dummy one for an unknown user) and gives US_OK, or what
 * userstore_check gives for a bad name or password form (at once) or a
 * database failure. userstore_check_verify then runs PBKDF2 on `c` alone
 * (no store, no log, no shared state: any thread) and gives US_OK (c->info is
 * the account), US_BAD_CREDENTIALS after the same work as a known user, or
 * US_INTERNAL for a malformed stored hash. When the caller set
 * c->rehash_iterations (within USERSTORE_MIN/MAX_ITERATIONS) and the password
 * is right, c->new_hash is then a fresh hash with that many iterations (""
 * if making it failed), for userstore_set_hash. Both wipe what they no
 * longer need; userstore_check_clear wipes the rest.
 */
struct userstore_check {
    bool known;
    struct user_info info;
    unsigned rehash_iterations;
    char stored[USERSTORE_HASH_STR_MAX];
    char dummy[USERSTORE_HASH_STR_MAX];
    char new_hash[USERSTORE_HASH_STR_MAX];
};
int userstore_check_read(struct userstore *us, const char *name, const char *password,
                         struct userstore_check *c);
int userstore_check_verify(struct userstore_check *c, const char *password);
void userstore_check_clear(struct userstore_check *c);
/* Stores a hash string made by userstore_check_verify as the user's password. */
int userstore_set_hash(struct userstore *us, const char *name, const char *hash);

/*
 * The register of issued certificates, for audit and later revocation.
 * serial_hex: 1-40 hex digits; node_id_hex: 40 hex digits (both stored in
 * lowercase); kind: "enroll", "renew" or "service"; user: a valid user name,
 * or for "service" any 1-255 bytes of printable ASCII (a host name). The user
 * need not exist. A serial already recorded gives US_EXISTS.
 */
int userstore_record_cert(struct userstore *us, const char *serial_hex, const char *user,
                          const char *node_id_hex, const char *kind, int64_t issued_at,
                          int64_t not_after);
int userstore_cert_lookup(struct userstore *us, const char *serial_hex, struct cert_info *out);

/*
 * Certificates recorded for `user` of kind enroll or renew with issued_at >=
 * since: *count, and the oldest issued_at among them in *oldest (0 if none).
 * The login server's per-account issuing limit reads this.
 */
int userstore_certs_since(struct userstore *us, const char *user, int64_t since, uint64_t *count,
                          int64_t *oldest);

/*
 * Devices. A device name has the form of a user name. userstore_device_claim
 * finds (user, device); when it is there, *out is its row (with the Node-ID it
 * keeps) and its last_at becomes now. When it is not and the account holds
 * fewer than max_devices devices, it is added with `new_node_id_hex` (the CA's
 * fresh draw) and *added is set. Otherwise US_LIMIT, nothing written. One
 * transaction: two claims for a new device cannot both pass the bound.
 */
int userstore_device_claim(struct userstore *us, const char *user, const char *device,
                           const char *new_node_id_hex, unsigned max_devices,
                           struct device_info *out, bool *added);
/* The device of `user` holding `node_id_hex` (renewal), US_NOT_FOUND if it was removed. */
int userstore_device_by_node(struct userstore *us, const char *user, const char *node_id_hex,
                             struct device_info *out);
/* Marks a device used now (after a renewal). */
int userstore_device_touch(struct userstore *us, const char *user, const char *device);
/* Removes a device: its slot is free again, its Node-ID cannot be renewed. */
int userstore_device_del(struct userstore *us, const char *user, const char *device);
/*
 * Calls cb with the serial (lowercase hex) of every recorded node certificate
 * (enroll, renew) that has not expired at `now` and whose device is no longer
 * on record: removed with userstore_device_del, or deleted with its account.
 * These are the revoked ones (the login server's CRL).
 */
int userstore_revoked(struct userstore *us, int64_t now, void (*cb)(const char *, void *),
                      void *ud);
/*
 * SQLite's data version of this store: it changes when another process (the
 * administration CLI) commits a change, not for this store's own writes.
 */
int userstore_data_version(struct userstore *us, int64_t *out);
/* Calls cb once per device of `user`, in name order; as userstore_list. */
int userstore_device_list(struct userstore *us, const char *user,
                          void (*cb)(const struct device_info *, void *), void *ud);

#endif
