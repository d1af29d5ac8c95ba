/*
 * https_load: N requests in flight against one HTTPS URL for S seconds; prints
 * requests per second and latency percentiles (load.h). The building block of
 * the shell benchmarks (bootstrap_bench.sh).
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "load.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: https_load --url URL (--ca FILE | --new-tls) [options]\n"
               "  -u, --url URL        the https:// URL\n"
               "  -m, --method M       GET (default), POST, DELETE\n"
               "  -b, --body TEXT      request body (JSON)\n"
               "  -a, --ca FILE        verify the server against this CA (connections reused)\n"
               "  -t, --new-tls        no verification, a new TLS connection per request\n"
               "  -C, --cert FILE      client certificate (with --key)\n"
               "  -K, --key FILE       client key\n"
               "  -c, --clients N      requests in flight (16)\n"
               "  -s, --seconds S      duration (5)\n"
               "  -n, --name TEXT      the row's label\n"
               "  -H, --header         print the table header first\n");
}

int main(int argc, char **argv)
{
    struct http_request req = {.method = "GET"};
    const char *name = "requests";
    int clients = 16, header = 0;
    double seconds = 5;
    static const struct option opts[] = {
        {"url", 1, NULL, 'u'},  {"method", 1, NULL, 'm'},  {"body", 1, NULL, 'b'},
        {"ca", 1, NULL, 'a'},   {"new-tls", 0, NULL, 't'}, {"cert", 1, NULL, 'C'},
        {"key", 1, NULL, 'K'},  {"clients", 1, NULL, 'c'}, {"seconds", 1, NULL, 's'},
        {"name", 1, NULL, 'n'}, {"header", 0, NULL, 'H'},  {"help", 0, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "u:m:b:a:tC:K:c:s:n:Hh", opts, NULL)) != -1) {
        switch (o) {
        case 'u':
            req.url = optarg;
            break;
        case 'm':
            req.method = optarg;
            break;
        case 'b':
            req.body = optarg;
            req.body_len = strlen(optarg);
            req.content_type = "application/json";
            break;
        case 'a':
            req.ca_file = optarg;
            break;
        case 't':
            req.insecure = true;
            break;
        case 'C':
            req.cert_file = optarg;
            break;
        case 'K':
            req.key_file = optarg;
            break;
        case 'c':
            clients = atoi(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'n':
            name = optarg;
            break;
        case 'H':
            header = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!req.url || (!req.ca_file == !req.insecure) || clients < 1 || seconds <= 0) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct ev_loop *loop = ev_default_loop(0);
    struct phase ph = {.name = name, .loop = loop, .req = req};
    ph.http = http_client_new(loop);
    if (!ph.http)
        return 1;
    if (header)
        phase_header();
    run_phase(&ph, clients, seconds);
    http_client_free(ph.http);
    return ph.done > 0 ? 0 : 1;
}
