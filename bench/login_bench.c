/*
 * login_bench: throughput of the login server (docs/benchmarks.md).
 *
 * It sets up a real loginserver in a temporary directory (init, one account,
 * started with -d), then keeps N requests in flight from one process (our
 * http_client: libcurl multi on libev) for S seconds, twice: configuration
 * document fetches (each on a fresh TLS connection, as a newcomer's), then
 * enrollments (password check + certificate issuing). It prints requests per
 * second and latency percentiles, stops the server and removes its files.
 */
#include <errno.h>
#include <fcntl.h>
#include <ev.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cred.h"
#include "fsutil.h"
#include "http_client.h"
#include "load.h"

static int run_cmd(const char *const argv[], const char *input)
{
    int p[2];
    if (pipe(p) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[0], 0);
        close(p[1]);
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(p[0]);
    if (input && write(p[1], input, strlen(input)) < 0)
        perror("write");
    close(p[1]);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: login_bench --loginserver PATH [options]\n"
               "Measures the login server: document fetches/s and enrollments/s.\n"
               "  -l, --loginserver PATH  the loginserver binary to run (required)\n"
               "  -c, --clients N         requests in flight at once (16)\n"
               "  -s, --seconds S         seconds per phase (5)\n"
               "  -i, --iterations N      PBKDF2 iterations of the account (100000, the default)\n"
               "  -h, --help              this text\n");
}

int main(int argc, char **argv)
{
    const char *ls = NULL;
    int clients = 16;
    double seconds = 5;
    long iterations = 100000;
    static const struct option opts[] = {
        {"loginserver", 1, NULL, 'l'}, {"clients", 1, NULL, 'c'}, {"seconds", 1, NULL, 's'},
        {"iterations", 1, NULL, 'i'},  {"help", 0, NULL, 'h'},    {NULL, 0, NULL, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "l:c:s:i:h", opts, NULL)) != -1) {
        switch (o) {
        case 'l':
            ls = optarg;
            break;
        case 'c':
            clients = atoi(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'i':
            iterations = atol(optarg);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!ls || clients < 1 || seconds <= 0 || iterations < 1000) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    char dir[] = "/tmp/login-bench-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    char cfg[512], logf[512], ca[512], cmd[1024];
    snprintf(cfg, sizeof(cfg), "%s/ls.json", dir);
    snprintf(logf, sizeof(logf), "%s/ls.log", dir);
    snprintf(ca, sizeof(ca), "%s/state/ca.pem", dir);
    char text[1024];
    /* Every enrollment of a run is one account and one device from one address: the
     * per-account and per-address bounds are lifted, so that the run measures the server
     * rather than its limits (tests/integration/test_identity.py and test_login_load.py
     * cover those). */
    snprintf(text, sizeof(text),
             "{\"overlay\":\"bench.p2psip\",\"listen\":\"127.0.0.1:0\",\"state_dir\":\"%s/state\","
             "\"pbkdf2_iterations\":%ld,\"log_level\":\"warn\",\"max_connections\":4096,"
             "\"max_certs_per_user\":1000000,\"pbkdf2_per_address\":100000,"
             "\"pbkdf2_queue\":100000}",
             dir, iterations);
    fs_write_atomic(cfg, text, strlen(text), 0600);
    const char *init[] = {ls, "-c", cfg, "init", NULL};
    const char *add[] = {ls, "-c", cfg, "user", "add", "bench", NULL};
    int rc = 1;
    pid_t server = -1;
    if (run_cmd(init, NULL) != 0 || run_cmd(add, "bench-password\n") != 0) {
        fprintf(stderr, "login_bench: cannot set up the login server\n");
        goto out;
    }
    /* Started with -v (info) only for its "serving on ... port N" line, then quiet. */
    server = fork();
    if (server == 0) {
        int fd = open(logf, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fd, 2);
        execl(ls, ls, "-d", "-v", "-c", cfg, "-o", "log_level=warn", (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 200 && !port; i++) {
        usleep(25000);
        char *log = NULL;
        if (fs_read_file(logf, 1 << 20, &log, NULL) == 0) {
            char *p = strstr(log, " port ");
            if (p)
                port = atoi(p + 6);
        }
        free(log);
    }
    if (!port) {
        fprintf(stderr, "login_bench: the login server did not start (see %s)\n", logf);
        goto out;
    }

    /* One CSR, reused: the server's work per enrollment is the same. */
    gnutls_x509_privkey_t key;
    gnutls_datum_t csr = {NULL, 0};
    cred_keygen(&key);
    cred_csr_make(key, "bench", &csr);
    char *body = malloc(csr.size * 2 + 256), *q;
    q = body + sprintf(body, "{\"user\":\"bench\",\"password\":\"bench-password\",\"csr\":\"");
    for (unsigned i = 0; i < csr.size; i++) {
        if (csr.data[i] == '\n')
            q += sprintf(q, "\\n");
        else
            *q++ = (char)csr.data[i];
    }
    strcpy(q, "\"}");
    char url_doc[128], url_enroll[128];
    snprintf(url_doc, sizeof(url_doc), "https://127.0.0.1:%d/v1/overlay", port);
    snprintf(url_enroll, sizeof(url_enroll), "https://127.0.0.1:%d/v1/enroll", port);

    struct ev_loop *loop = ev_default_loop(0);
    printf("login_bench: loginserver on 127.0.0.1:%d, PBKDF2 %ld iterations, %d clients, %.0f s "
           "per phase\n",
           port, iterations, clients, seconds);
    phase_header();
    struct phase fetch = {.name = "document fetch (new TLS)", .loop = loop};
    fetch.http = http_client_new(loop);
    fetch.req = (struct http_request){.method = "GET", .url = url_doc, .insecure = true};
    run_phase(&fetch, clients, seconds);
    http_client_free(fetch.http);
    struct phase enroll = {.name = "enrollment", .loop = loop};
    enroll.http = http_client_new(loop);
    enroll.req = (struct http_request){.method = "POST",
                                       .url = url_enroll,
                                       .body = body,
                                       .body_len = strlen(body),
                                       .content_type = "application/json",
                                       .ca_file = ca};
    run_phase(&enroll, clients, seconds);
    http_client_free(enroll.http);
    free(body);
    gnutls_free(csr.data);
    gnutls_x509_privkey_deinit(key);
    rc = 0;
out:
    if (server > 0) {
        kill(server, SIGTERM);
        waitpid(server, NULL, 0);
    }
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "login_bench: could not remove %s\n", dir);
    return rc;
}
