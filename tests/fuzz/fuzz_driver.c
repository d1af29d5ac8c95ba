/*
 * Runs a libFuzzer target without libFuzzer, so the fuzz targets run as
 * ordinary tests in every build (gcc, ASan, valgrind): first every file of a
 * seed corpus, then a fixed number of deterministic mutations of them.
 *   fuzz_driver CORPUS_DIR [ITERATIONS]
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_SEEDS      256
#define FUZZ_MAX_INPUT 8192

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR [ITERATIONS]\n", argv[0]);
        return 2;
    }
    long iterations = argc > 2 ? atol(argv[2]) : 100000;
    static uint8_t seeds[MAX_SEEDS][FUZZ_MAX_INPUT];
    static size_t seed_len[MAX_SEEDS];
    size_t n = 0;
    DIR *d = opendir(argv[1]);
    if (!d) {
        perror(argv[1]);
        return 2;
    }
    struct dirent *de;
    while ((de = readdir(d)) && n < MAX_SEEDS) {
        if (de->d_name[0] == '.')
            continue;
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", argv[1], de->d_name);
        FILE *f = fopen(path, "rb");
        if (!f)
            continue;
        seed_len[n] = fread(seeds[n], 1, FUZZ_MAX_INPUT, f);
        fclose(f);
        LLVMFuzzerTestOneInput(seeds[n], seed_len[n]);
        n++;
    }
    closedir(d);
    if (n == 0) {
        fprintf(stderr, "%s: empty corpus\n", argv[1]);
        return 2;
    }
    static uint8_t buf[FUZZ_MAX_INPUT];
    for (long i = 0; i < iterations; i++) {
        size_t s = next() % n, len = seed_len[s];
        memcpy(buf, seeds[s], len);
        int edits = 1 + (int)(next() % 8);
        for (int k = 0; k < edits; k++) {
            switch (next() % 5) {
            case 0: /* flip a byte */
                if (len)
                    buf[next() % len] ^= (uint8_t)(1u << (next() % 8));
                break;
            case 1: /* set an interesting byte */
                if (len) {
                    static const uint8_t v[] = {0,   0x7f, 0x80, 0xff, '"',
                                                '{', '}',  '\\', 0xc0, 0xed};
                    buf[next() % len] = v[next() % sizeof(v)];
                }
                break;
            case 2: /* truncate */
                if (len)
                    len = next() % len;
                break;
            case 3: /* duplicate a slice */
                if (len && len < FUZZ_MAX_INPUT / 2) {
                    size_t a = next() % len, b = a + next() % (len - a);
                    memmove(buf + b + (b - a), buf + b, len - b);
                    len += b - a;
                }
                break;
            case 4: /* rewrite the length prefix */
                if (len >= 4) {
                    uint32_t v = (uint32_t)next();
                    if (next() & 1)
                        v = (uint32_t)(len - 4 + (next() % 3) - 1);
                    buf[0] = (uint8_t)(v >> 24), buf[1] = (uint8_t)(v >> 16);
                    buf[2] = (uint8_t)(v >> 8), buf[3] = (uint8_t)v;
                }
                break;
            }
        }
        LLVMFuzzerTestOneInput(buf, len);
    }
    printf("%zu seeds, %ld mutated inputs: no crash\n", n, iterations);
    return 0;
}
