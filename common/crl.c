/*
 * The process's revocation list (see crl.h). The list is kept as a sorted array of serial
 * numbers, so "is this certificate revoked" is a binary search under a mutex, cheap enough for
 * every handshake and every record whose certificate cache entry is older than the list.
 * Serials are compared without leading zero bytes: DER adds one before a serial whose first
 * byte has the high bit set, and the CRL and the certificate need not agree on it.
 */
#include "crl.h"

#include <gnutls/crypto.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "errbuf.h"
#include "log.h"

struct serial {
    unsigned char len;
    unsigned char b[CRL_SERIAL_MAX];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t generation = 1;
static struct {
    gnutls_x509_crt_t ca; /* the trust anchor; NULL until crl_set_ca() */
    gnutls_datum_t ca_der;
    bool present; /* a list is held */
    gnutls_datum_t der;
    unsigned char issuer[32]; /* SHA-256 of the list's raw issuer name */
    struct serial *v;         /* sorted by (len, bytes) */
    size_t n;
    bool has_number;
    unsigned char number[20];
    size_t number_len;
    time_t this_update, next_update;
} st;

static void strip_zeros(const unsigned char **p, size_t *n)
{
    while (*n > 1 && (*p)[0] == 0) {
        (*p)++;
        (*n)--;
    }
}

static int serial_cmp(const void *a, const void *b)
{
    const struct serial *x = a, *y = b;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return memcmp(x->b, y->b, x->len);
}

/* Big-endian unsigned numbers of any length (leading zeros already stripped). */
static int number_cmp(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)
{
    if (alen != blen)
        return alen < blen ? -1 : 1;
    return memcmp(a, b, alen);
}

static void drop_list(void)
{
    gnutls_free(st.der.data);
    st.der.data = NULL;
    st.der.size = 0;
    free(st.v);
    st.v = NULL;
    st.n = 0;
    st.present = false;
    st.has_number = false;
    st.number_len = 0;
}

static void bump(void)
{
    atomic_fetch_add(&generation, 1);
}

uint64_t crl_generation(void)
{
    return atomic_load(&generation);
}

int crl_set_ca(const char *ca_pem, size_t len, char *err, size_t errlen)
{
    gnutls_x509_crt_t crt = NULL;
    gnutls_datum_t in = {(unsigned char *)ca_pem, (unsigned)len}, der = {NULL, 0};
    int r;
    if ((r = gnutls_x509_crt_init(&crt)) < 0 ||
        (r = gnutls_x509_crt_import(crt, &in, GNUTLS_X509_FMT_PEM)) < 0 ||
        (r = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_DER, &der)) < 0) {
        gnutls_x509_crt_deinit(crt);
        return errbuf_set(err, errlen, CRL_E_PARSE, "the CA certificate does not parse: %s",
                          gnutls_strerror(r));
    }
    pthread_mutex_lock(&lock);
    if (st.ca && st.ca_der.size == der.size && !memcmp(st.ca_der.data, der.data, der.size)) {
        pthread_mutex_unlock(&lock); /* the same CA: the list stays */
        gnutls_x509_crt_deinit(crt);
        gnutls_free(der.data);
        return 0;
    }
    bool had = st.present;
    if (st.ca)
        gnutls_x509_crt_deinit(st.ca);
    gnutls_free(st.ca_der.data);
    st.ca = crt;
    st.ca_der = der;
    drop_list();
    pthread_mutex_unlock(&lock);
    if (had)
        bump();
    return 0;
}

void crl_reset(void)
{
    pthread_mutex_lock(&lock);
    if (st.ca)
        gnutls_x509_crt_deinit(st.ca);
    st.ca = NULL;
    gnutls_free(st.ca_der.data);
    st.ca_der.data = NULL;
    st.ca_der.size = 0;
    drop_list();
    pthread_mutex_unlock(&lock);
    bump();
}

static int raw_dn_hash(int (*get)(void *, gnutls_datum_t *), void *obj, unsigned char out[32])
{
    gnutls_datum_t dn = {NULL, 0};
    int r = get(obj, &dn);
    if (r < 0)
        return r;
    r = gnutls_hash_fast(GNUTLS_DIG_SHA256, dn.data, dn.size, out);
    gnutls_free(dn.data);
    return r;
}

static int crl_issuer_dn(void *obj, gnutls_datum_t *dn)
{
    return gnutls_x509_crl_get_raw_issuer_dn(obj, dn);
}

static int crt_issuer_dn(void *obj, gnutls_datum_t *dn)
{
    return gnutls_x509_crt_get_raw_issuer_dn(obj, dn);
}

/* The serials of `crl`, sorted. Too long ones are left out: no certificate we can match has
 * them (crl_ref: serial_len 0). */
static int collect_serials(gnutls_x509_crl_t crl, struct serial **out, size_t *n_out)
{
    int count = gnutls_x509_crl_get_crt_count(crl);
    if (count < 0)
        return count;
    struct serial *v = calloc((size_t)count + 1, sizeof(*v));
    if (!v)
        return GNUTLS_E_MEMORY_ERROR;
    size_t n = 0;
    gnutls_x509_crl_iter_t it = NULL;
    for (;;) {
        unsigned char buf[256];
        size_t len = sizeof(buf);
        time_t when;
        int r = gnutls_x509_crl_iter_crt_serial(crl, &it, buf, &len, &when);
        if (r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
            break;
        if (r < 0 || n >= (size_t)count) {
            gnutls_x509_crl_iter_deinit(it);
            free(v);
            return r < 0 ? r : GNUTLS_E_ASN1_DER_ERROR;
        }
        const unsigned char *p = buf;
        strip_zeros(&p, &len);
        if (len == 0 || len > CRL_SERIAL_MAX)
            continue;
        v[n].len = (unsigned char)len;
        memcpy(v[n].b, p, len);
        n++;
    }
    gnutls_x509_crl_iter_deinit(it);
    qsort(v, n, sizeof(*v), serial_cmp);
    *out = v;
    *n_out = n;
    return 0;
}

int crl_update(const void *data, size_t len, time_t now, char *err, size_t errlen)
{
    gnutls_x509_crl_t crl = NULL;
    gnutls_datum_t in = {(unsigned char *)data, (unsigned)len}, der = {NULL, 0};
    struct serial *v = NULL;
    size_t n = 0;
    unsigned char issuer[32], number[64];
    size_t number_len = sizeof(number);
    unsigned status = 0, crit = 0;
    int r, ret;

    if (!data || len == 0 || len > CRL_MAX_BYTES)
        return errbuf_set(err, errlen, CRL_E_PARSE, "revocation list: %zu bytes", len);
    bool pem = len >= 10 && memmem(data, len, "-----BEGIN", 10) != NULL;
    if ((r = gnutls_x509_crl_init(&crl)) < 0)
        return errbuf_set(err, errlen, CRL_E_NOMEM, "revocation list: %s", gnutls_strerror(r));
    if ((r = gnutls_x509_crl_import(crl, &in, pem ? GNUTLS_X509_FMT_PEM : GNUTLS_X509_FMT_DER)) <
            0 ||
        (r = gnutls_x509_crl_export2(crl, GNUTLS_X509_FMT_DER, &der)) < 0) {
        ret = errbuf_set(err, errlen, CRL_E_PARSE, "revocation list does not parse: %s",
                         gnutls_strerror(r));
        goto out;
    }
    time_t this_update = gnutls_x509_crl_get_this_update(crl);
    time_t next_update = gnutls_x509_crl_get_next_update(crl);
    bool has_number = gnutls_x509_crl_get_number(crl, number, &number_len, &crit) >= 0;
    const unsigned char *num = number;
    if (has_number)
        strip_zeros(&num, &number_len);
    if (has_number && number_len > 20) {
        ret = errbuf_set(err, errlen, CRL_E_PARSE, "revocation list: CRL number of %zu bytes",
                         number_len);
        goto out;
    }
    if ((r = raw_dn_hash(crl_issuer_dn, crl, issuer)) < 0 ||
        (r = collect_serials(crl, &v, &n)) < 0) {
        ret = errbuf_set(err, errlen, r == GNUTLS_E_MEMORY_ERROR ? CRL_E_NOMEM : CRL_E_PARSE,
                         "revocation list: %s", gnutls_strerror(r));
        goto out;
    }

    pthread_mutex_lock(&lock);
    if (!st.ca) {
        pthread_mutex_unlock(&lock);
        ret = errbuf_set(err, errlen, CRL_E_NO_CA, "revocation list: no overlay CA to check it");
        goto out;
    }
    /* Times are ours to judge (below): a list past its nextUpdate still counts. */
    r = gnutls_x509_crl_verify(crl, &st.ca, 1, GNUTLS_VERIFY_DISABLE_TIME_CHECKS, &status);
    /* GnuTLS judges the list's times in any case, and marks a stale one invalid too: only
     * the reason bits say whether something else was wrong. */
    const unsigned timing =
        GNUTLS_CERT_REVOCATION_DATA_SUPERSEDED | GNUTLS_CERT_REVOCATION_DATA_ISSUED_IN_FUTURE;
    if ((status & timing) && !(status & ~(timing | GNUTLS_CERT_INVALID)))
        status = 0;
    if (r < 0 || status != 0) {
        pthread_mutex_unlock(&lock);
        ret = errbuf_set(err, errlen, CRL_E_SIGNATURE,
                         "revocation list refused: not signed by the overlay CA (status 0x%x)%s%s",
                         status, r < 0 ? ": " : "", r < 0 ? gnutls_strerror(r) : "");
        goto out;
    }
    if (st.present && st.der.size == der.size && !memcmp(st.der.data, der.data, der.size)) {
        pthread_mutex_unlock(&lock);
        ret = CRL_UNCHANGED;
        goto out;
    }
    if (st.present) {
        int older = has_number && st.has_number
                        ? number_cmp(num, number_len, st.number, st.number_len) < 0
                        : this_update < st.this_update;
        if (older) {
            char a[41] = "", b[41] = "";
            for (size_t i = 0; has_number && st.has_number && i < number_len; i++)
                snprintf(a + 2 * i, 3, "%02x", num[i]);
            for (size_t i = 0; has_number && st.has_number && i < st.number_len; i++)
                snprintf(b + 2 * i, 3, "%02x", st.number[i]);
            pthread_mutex_unlock(&lock);
            if (a[0])
                ret = errbuf_set(err, errlen, CRL_E_OLDER,
                                 "revocation list refused: number %s is older than the list "
                                 "held (number %s)",
                                 a, b);
            else
                ret = errbuf_set(err, errlen, CRL_E_OLDER,
                                 "revocation list refused: issued at %lld, before the list held "
                                 "(%lld)",
                                 (long long)this_update, (long long)st.this_update);
            goto out;
        }
    }
    /* The answers change only when the revoked set or its issuer does. */
    bool changed = !st.present || st.n != n || memcmp(st.issuer, issuer, sizeof(issuer)) != 0 ||
                   (n && memcmp(st.v, v, n * sizeof(*v)) != 0);
    drop_list();
    st.present = true;
    st.der = der;
    der.data = NULL;
    memcpy(st.issuer, issuer, sizeof(issuer));
    st.v = v;
    v = NULL;
    st.n = n;
    st.has_number = has_number;
    if (has_number)
        memcpy(st.number, num, number_len);
    st.number_len = has_number ? number_len : 0;
    st.this_update = this_update;
    st.next_update = next_update;
    pthread_mutex_unlock(&lock);
    if (changed)
        bump();
    if (next_update != (time_t)-1 && next_update < now)
        log_warn("crl", "the revocation list taken is past its nextUpdate (%lld s ago)",
                 (long long)(now - next_update));
    ret = CRL_OK;
out:
    free(v);
    gnutls_free(der.data);
    gnutls_x509_crl_deinit(crl);
    return ret;
}

int crl_ref_of(gnutls_x509_crt_t crt, struct crl_ref *out)
{
    unsigned char buf[256];
    size_t len = sizeof(buf);
    memset(out, 0, sizeof(*out));
    int r = gnutls_x509_crt_get_serial(crt, buf, &len);
    if (r < 0)
        return r;
    const unsigned char *p = buf;
    strip_zeros(&p, &len);
    if (len > 0 && len <= CRL_SERIAL_MAX) {
        out->serial_len = (unsigned char)len;
        memcpy(out->serial, p, len);
    }
    return raw_dn_hash(crt_issuer_dn, crt, out->issuer);
}

bool crl_ref_revoked(const struct crl_ref *ref)
{
    if (!ref || ref->serial_len == 0)
        return false;
    struct serial key = {.len = ref->serial_len};
    memcpy(key.b, ref->serial, ref->serial_len);
    pthread_mutex_lock(&lock);
    bool hit = st.present && !memcmp(st.issuer, ref->issuer, sizeof(st.issuer)) && st.n > 0 &&
               bsearch(&key, st.v, st.n, sizeof(*st.v), serial_cmp) != NULL;
    pthread_mutex_unlock(&lock);
    return hit;
}

bool crl_crt_revoked(gnutls_x509_crt_t crt)
{
    struct crl_ref ref;
    return crl_ref_of(crt, &ref) == 0 && crl_ref_revoked(&ref);
}

const char *crl_ref_serial_hex(const struct crl_ref *ref, char *buf, size_t len)
{
    if (!len)
        return buf;
    if (!ref || ref->serial_len == 0 || len < 2) {
        snprintf(buf, len, "-");
        return buf;
    }
    buf[0] = '\0';
    for (size_t i = 0; i < ref->serial_len && 2 * i + 2 < len; i++)
        snprintf(buf + 2 * i, 3, "%02x", ref->serial[i]);
    return buf;
}

void crl_get_info(struct crl_info *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&lock);
    out->present = st.present;
    if (st.present) {
        out->entries = st.n;
        out->this_update = st.this_update;
        out->next_update = st.next_update;
        for (size_t i = 0; st.has_number && i < st.number_len; i++)
            snprintf(out->number + 2 * i, 3, "%02x", st.number[i]);
    }
    pthread_mutex_unlock(&lock);
}
