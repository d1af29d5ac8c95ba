/*
 * Unit tests for crl.c, the process's revocation list (issue 15, item 6): only a list signed by
 * the overlay CA is taken, never an older one than held (rollback), revoked and not revoked
 * answers by serial and issuer, and the generation that tells caches to ask again. The lists
 * are made here with GnuTLS and the throw-away CAs of testca.c, as the login server makes its
 * own (loginserver/ca.c). Then the transport (conn.c) with a list: a revoked client and a
 * revoked server are refused at the handshake, each side saying why, and an open link whose
 * peer a new list revokes is closed by conn_close_revoked(). Records: record.c's tests.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conn.h"
#include "crl.h"
#include "fsutil.h"
#include "testca.h"

#define OVERLAY "test.example"

struct fx {
    struct testca ca, other;
    char *ca_pem, *other_pem;
    gnutls_x509_crt_t x, y; /* two node certificates of `ca` */
};

static gnutls_x509_crt_t issue(struct testca *ca, const char *name)
{
    struct testca_cert c;
    gnutls_x509_crt_t crt = NULL;
    if (testca_issue(ca, name, TESTCA_GOOD, &c) != 0 || cred_cert_load(&crt, c.cert_file) < 0)
        return NULL;
    return crt;
}

static char *read_all(const char *path)
{
    char *s = NULL;
    size_t n = 0;
    return fs_read_file(path, 1 << 20, &s, &n) == 0 ? s : NULL;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (!f || testca_init(&f->ca) != 0 || testca_init(&f->other) != 0)
        return -1;
    f->ca_pem = read_all(f->ca.ca_file);
    f->other_pem = read_all(f->other.ca_file);
    f->x = issue(&f->ca, "x");
    f->y = issue(&f->ca, "y");
    if (!f->ca_pem || !f->other_pem || !f->x || !f->y)
        return -1;
    crl_reset();
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    crl_reset();
    gnutls_x509_crt_deinit(f->x);
    gnutls_x509_crt_deinit(f->y);
    free(f->ca_pem);
    free(f->other_pem);
    testca_cleanup(&f->ca);
    testca_cleanup(&f->other);
    free(f);
    return 0;
}

/* A CRL signed by `ca` listing `revoked` (NULL-terminated); number < 0: without a number. */
static char *make_crl(struct testca *ca, gnutls_x509_crt_t *revoked, long long number,
                      time_t this_update, time_t next_update)
{
    gnutls_x509_crl_t crl = NULL;
    gnutls_privkey_t signer = NULL;
    gnutls_datum_t out = {NULL, 0};
    char *pem = NULL;
    assert_int_equal(gnutls_x509_crl_init(&crl), 0);
    assert_int_equal(gnutls_x509_crl_set_version(crl, 2), 0);
    assert_int_equal(gnutls_x509_crl_set_this_update(crl, this_update), 0);
    assert_int_equal(gnutls_x509_crl_set_next_update(crl, next_update), 0);
    for (size_t i = 0; revoked && revoked[i]; i++)
        assert_int_equal(gnutls_x509_crl_set_crt(crl, revoked[i], this_update), 0);
    if (number >= 0) {
        unsigned char num[8];
        for (int k = 0; k < 8; k++)
            num[k] = (unsigned char)((unsigned long long)number >> (56 - 8 * k));
        assert_int_equal(gnutls_x509_crl_set_number(crl, num, sizeof(num)), 0);
    }
    assert_int_equal(gnutls_privkey_init(&signer), 0);
    assert_int_equal(gnutls_privkey_import_x509(signer, ca->key, 0), 0);
    assert_int_equal(gnutls_x509_crl_privkey_sign(crl, ca->crt, signer, 0, 0), 0);
    assert_int_equal(gnutls_x509_crl_export2(crl, GNUTLS_X509_FMT_PEM, &out), 0);
    pem = strndup((const char *)out.data, out.size);
    gnutls_free(out.data);
    gnutls_privkey_deinit(signer);
    gnutls_x509_crl_deinit(crl);
    assert_non_null(pem);
    return pem;
}

static int offer(const char *pem)
{
    char err[256];
    int r = crl_update(pem, strlen(pem), time(NULL), err, sizeof(err));
    if (r < 0)
        printf("    refused: %s\n", err);
    return r;
}

static void test_needs_ca(void **state)
{
    struct fx *f = *state;
    time_t now = time(NULL);
    gnutls_x509_crt_t list[] = {f->x, NULL};
    char *pem = make_crl(&f->ca, list, 1, now, now + 3600);
    assert_int_equal(offer(pem), CRL_E_NO_CA);
    assert_false(crl_crt_revoked(f->x));
    free(pem);
}

static void test_other_ca_refused(void **state)
{
    struct fx *f = *state;
    char err[256];
    time_t now = time(NULL);
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    uint64_t g = crl_generation();
    gnutls_x509_crt_t list[] = {f->x, NULL};
    char *pem = make_crl(&f->other, list, 1, now, now + 3600);
    assert_int_equal(offer(pem), CRL_E_SIGNATURE);
    assert_false(crl_crt_revoked(f->x));
    assert_int_equal(crl_generation(), g);
    struct crl_info info;
    crl_get_info(&info);
    assert_false(info.present);
    free(pem);
    /* Garbage, and a PEM CRL with a byte changed. */
    assert_int_equal(offer("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"),
                     CRL_E_PARSE);
    pem = make_crl(&f->ca, list, 1, now, now + 3600);
    char *mid = strstr(pem, "\n") + 40;
    *mid = *mid == 'A' ? 'B' : 'A';
    assert_true(offer(pem) < 0);
    assert_false(crl_crt_revoked(f->x));
    free(pem);
}

static void test_revoked_and_generation(void **state)
{
    struct fx *f = *state;
    char err[256];
    time_t now = time(NULL);
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    uint64_t g0 = crl_generation();
    assert_true(g0 != 0);

    gnutls_x509_crt_t lx[] = {f->x, NULL};
    char *pem = make_crl(&f->ca, lx, 100, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    uint64_t g1 = crl_generation();
    assert_true(g1 > g0);
    assert_true(crl_crt_revoked(f->x));
    assert_false(crl_crt_revoked(f->y));
    struct crl_info info;
    crl_get_info(&info);
    assert_true(info.present);
    assert_int_equal(info.entries, 1);
    assert_string_equal(info.number, "64");

    /* The same list again changes nothing. */
    assert_int_equal(offer(pem), CRL_UNCHANGED);
    assert_int_equal(crl_generation(), g1);
    free(pem);

    /* Same serial, another issuer: not this list's business. */
    struct crl_ref ref;
    assert_int_equal(crl_ref_of(f->x, &ref), 0);
    assert_true(crl_ref_revoked(&ref));
    ref.issuer[0] ^= 1;
    assert_false(crl_ref_revoked(&ref));

    /* A newer list with the same entries is taken, but the answers did not change. */
    pem = make_crl(&f->ca, lx, 101, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    assert_int_equal(crl_generation(), g1);
    free(pem);

    /* A newer list that revokes y instead: both answers change, and the generation. */
    gnutls_x509_crt_t ly[] = {f->y, NULL};
    pem = make_crl(&f->ca, ly, 200, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    uint64_t g2 = crl_generation();
    assert_true(g2 > g1);
    assert_false(crl_crt_revoked(f->x));
    assert_true(crl_crt_revoked(f->y));
    free(pem);

    /* Another CA drops the list (it cannot speak for the new CA's certificates). */
    assert_int_equal(crl_set_ca(f->other_pem, strlen(f->other_pem), err, sizeof(err)), 0);
    assert_true(crl_generation() > g2);
    assert_false(crl_crt_revoked(f->y));
}

static void test_no_rollback(void **state)
{
    struct fx *f = *state;
    char err[256];
    time_t now = time(NULL);
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    gnutls_x509_crt_t both[] = {f->x, f->y, NULL};
    char *newer = make_crl(&f->ca, both, 50, now, now + 3600);
    char *older = make_crl(&f->ca, NULL, 40, now - 60, now + 3540);
    assert_int_equal(offer(newer), CRL_OK);
    uint64_t g = crl_generation();
    /* An older list (a replay of the one before the revocations) is refused: x stays revoked. */
    int r = crl_update(older, strlen(older), now, err, sizeof(err));
    assert_int_equal(r, CRL_E_OLDER);
    assert_non_null(strstr(err, "older"));
    assert_true(crl_crt_revoked(f->x));
    assert_true(crl_crt_revoked(f->y));
    assert_int_equal(crl_generation(), g);
    free(newer);
    free(older);

    /* Without CRL numbers, thisUpdate decides. */
    crl_reset();
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    newer = make_crl(&f->ca, both, -1, now, now + 3600);
    older = make_crl(&f->ca, NULL, -1, now - 60, now + 3540);
    assert_int_equal(offer(newer), CRL_OK);
    assert_int_equal(offer(older), CRL_E_OLDER);
    assert_true(crl_crt_revoked(f->x));
    free(newer);
    free(older);

    /* A list past its nextUpdate is still taken (the last good list beats none). */
    crl_reset();
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    char *stale = make_crl(&f->ca, both, 10, now - 3000, now - 60);
    assert_int_equal(offer(stale), CRL_OK);
    assert_true(crl_crt_revoked(f->y));
    free(stale);
}

/* ---- The transport with a list ------------------------------------------------------------ */

struct side {
    int opens, closes;
    enum conn_close_reason reason;
    char detail[256];
    struct conn *c;
};

struct link_env {
    struct ev_loop *loop;
    struct side srv, cli;
    ev_timer safety;
};

static void l_open(struct conn *c, void *ud)
{
    struct side *s = ud;
    s->opens++;
    s->c = c;
}

static void l_message(struct conn *c, const struct msg *m, void *ud)
{
}

static void l_close(struct conn *c, enum conn_close_reason r, const char *detail, void *ud)
{
    struct side *s = ud;
    s->closes++;
    s->reason = r;
    snprintf(s->detail, sizeof(s->detail), "%s", detail ? detail : "");
    s->c = NULL;
}

static void on_safety(struct ev_loop *loop, ev_timer *w, int revents)
{
    ev_break(loop, EVBREAK_ALL);
}

/* Runs the loop until `done` holds (or 10 s passed). */
static void run_until(struct link_env *e, bool (*done)(struct link_env *))
{
    ev_timer_set(&e->safety, 10., 0.);
    ev_timer_start(e->loop, &e->safety);
    while (!done(e) && ev_is_active(&e->safety))
        ev_run(e->loop, EVRUN_ONCE);
    ev_timer_stop(e->loop, &e->safety);
}

static bool both_closed(struct link_env *e)
{
    return e->srv.closes && e->cli.closes;
}

static bool both_open(struct link_env *e)
{
    return (e->srv.opens && e->cli.opens) || e->srv.closes || e->cli.closes;
}

/* A listener with `srv`'s certificate and a client with `cli`'s, under the list held now. */
static void link_once(struct fx *f, const struct testca_cert *srv, const struct testca_cert *cli,
                      struct link_env *e, bool (*done)(struct link_env *), bool revoke_later,
                      gnutls_x509_crt_t later)
{
    char err[256];
    struct tls_config sc = {.ca_file = f->ca.ca_file,
                            .cert_file = srv->cert_file,
                            .key_file = srv->key_file,
                            .overlay = OVERLAY};
    struct tls_config cc = sc;
    cc.cert_file = cli->cert_file;
    cc.key_file = cli->key_file;
    struct tls_ctx *sctx = tls_ctx_new(&sc, err, sizeof(err));
    struct tls_ctx *cctx = tls_ctx_new(&cc, err, sizeof(err));
    assert_non_null(sctx);
    assert_non_null(cctx);
    memset(e, 0, sizeof(*e));
    e->loop = ev_loop_new(EVFLAG_AUTO);
    ev_timer_init(&e->safety, on_safety, 10., 0.);
    struct conn_cbs scb = {l_open, l_message, NULL, l_close}, ccb = scb;
    struct listener *l = conn_listen(e->loop, sctx, "127.0.0.1:0", &scb, &e->srv, err, sizeof(err));
    assert_non_null(l);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", listener_port(l));
    assert_non_null(conn_connect(e->loop, cctx, addr, &ccb, &e->cli, err, sizeof(err)));
    run_until(e, done);
    if (revoke_later) {
        assert_int_equal(e->srv.opens, 1);
        assert_int_equal(e->cli.opens, 1);
        time_t now = time(NULL);
        gnutls_x509_crt_t list[] = {later, NULL};
        char *pem = make_crl(&f->ca, list, 2000, now, now + 3600);
        assert_int_equal(offer(pem), CRL_OK);
        free(pem);
        /* Both ends live on this thread: only the one whose peer is revoked closes. */
        assert_int_equal(conn_close_revoked(), 1);
        assert_int_equal(conn_close_revoked(), 0);
        run_until(e, both_closed);
    }
    if (e->cli.c) /* a link that opened: closed before the loop goes */
        conn_close(e->cli.c);
    run_until(e, both_closed);
    assert_true(both_closed(e));
    listener_free(l);
    ev_loop_destroy(e->loop);
    tls_ctx_free(sctx);
    tls_ctx_free(cctx);
}

static void test_transport_refuses_revoked(void **state)
{
    struct fx *f = *state;
    char err[256];
    struct testca_cert srv, cli;
    gnutls_x509_crt_t scrt = NULL, ccrt = NULL;
    assert_int_equal(testca_issue(&f->ca, "srv", TESTCA_GOOD, &srv), 0);
    assert_int_equal(testca_issue(&f->ca, "cli", TESTCA_GOOD, &cli), 0);
    assert_true(cred_cert_load(&scrt, srv.cert_file) >= 0);
    assert_true(cred_cert_load(&ccrt, cli.cert_file) >= 0);
    assert_int_equal(crl_set_ca(f->ca_pem, strlen(f->ca_pem), err, sizeof(err)), 0);
    time_t now = time(NULL);
    struct link_env e;

    /* No list: the link opens. */
    link_once(f, &srv, &cli, &e, both_open, false, NULL);
    assert_int_equal(e.srv.opens, 1);
    assert_int_equal(e.cli.opens, 1);
    assert_int_equal(e.cli.reason, CONN_CLOSED_LOCAL);

    /* The client revoked: the server refuses it at the handshake, with the alert. */
    gnutls_x509_crt_t lc[] = {ccrt, NULL};
    char *pem = make_crl(&f->ca, lc, 1000, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    free(pem);
    link_once(f, &srv, &cli, &e, both_closed, false, NULL);
    assert_int_equal(e.srv.opens + e.cli.opens, 0);
    assert_int_equal(e.srv.reason, CONN_ERR_PEER_CERT);
    assert_non_null(strstr(e.srv.detail, "sip:cli@test.example"));
    assert_non_null(strstr(e.srv.detail, "is revoked"));
    assert_int_equal(e.cli.reason, CONN_ERR_REJECTED);
    assert_non_null(strstr(e.cli.detail, "revoked"));
    printf("    server: %s\n    client: %s\n", e.srv.detail, e.cli.detail);

    /* The server revoked: the client refuses it (the other direction). */
    gnutls_x509_crt_t ls[] = {scrt, NULL};
    pem = make_crl(&f->ca, ls, 1001, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    free(pem);
    link_once(f, &srv, &cli, &e, both_closed, false, NULL);
    assert_int_equal(e.srv.opens + e.cli.opens, 0);
    assert_int_equal(e.cli.reason, CONN_ERR_PEER_CERT);
    assert_non_null(strstr(e.cli.detail, "sip:srv@test.example"));
    assert_non_null(strstr(e.cli.detail, "is revoked"));
    assert_int_equal(e.srv.reason, CONN_ERR_REJECTED);

    /* Nobody revoked, a link opens; then a list revoking the client closes it, with the code. */
    pem = make_crl(&f->ca, NULL, 1002, now, now + 3600);
    assert_int_equal(offer(pem), CRL_OK);
    free(pem);
    link_once(f, &srv, &cli, &e, both_open, true, ccrt);
    assert_int_equal(e.srv.reason, CONN_ERR_PEER_CERT);
    assert_non_null(strstr(e.srv.detail, "is revoked; link closed"));
    assert_int_equal(e.cli.reason, CONN_ERR_PEER_ERROR);
    assert_non_null(strstr(e.cli.detail, "certificate-revoked"));
    printf("    server: %s\n    client: %s\n", e.srv.detail, e.cli.detail);

    gnutls_x509_crt_deinit(scrt);
    gnutls_x509_crt_deinit(ccrt);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_needs_ca, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_ca_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_revoked_and_generation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_rollback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_refuses_revoked, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
