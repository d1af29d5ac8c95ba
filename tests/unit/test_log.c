/*
 * The logger: levels, text and JSON lines, and what it does with hostile
 * text quoted from peers (it must stay one line of valid UTF-8).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "utf8.h"

static char path[64];

/* Logs through a fresh file and returns its whole content (caller frees). */
static char *capture(bool json, enum log_level level, void (*emit)(void))
{
    strcpy(path, "/tmp/p2p-log-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    log_init("testlog", level, json);
    assert_int_equal(log_use_file(path), 0);
    emit();
    log_close();
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char *buf = calloc(1, 8192);
    size_t n = fread(buf, 1, 8191, f);
    buf[n] = '\0';
    fclose(f);
    unlink(path);
    return buf;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void emit_levels(void)
{
    log_error("t", "e1");
    log_warn("t", "w1");
    log_info("t", "i1");
    log_debug("t", "d1");
    log_trace("t", "t1");
}

static void test_levels(void **state)
{
    char *out = capture(false, LL_INFO, emit_levels);
    assert_int_equal(count_lines(out), 3);
    assert_non_null(strstr(out, "testlog["));
    assert_non_null(strstr(out, "error t: e1"));
    assert_non_null(strstr(out, "info  t: i1"));
    assert_null(strstr(out, "d1"));
    free(out);
    out = capture(false, LL_TRACE, emit_levels);
    assert_int_equal(count_lines(out), 5);
    free(out);
    assert_int_equal(log_level_parse("debug"), LL_DEBUG);
    assert_int_equal(log_level_parse("loud"), -1);
}

static void emit_hostile(void)
{
    /* What a peer might put in an error reason: a forged line, a terminal escape, bad UTF-8. */
    log_warn("tls", "error from peer: %s",
             "x\n2026-01-01T00:00:00Z forged line\x1b[2J\xff\xc0\xaf ok \xc3\xa9");
}

static void test_hostile_text_stays_one_line(void **state)
{
    char *out = capture(false, LL_INFO, emit_hostile);
    assert_int_equal(count_lines(out), 1);
    assert_non_null(
        strstr(out, "x\\x0a2026-01-01T00:00:00Z forged line\\x1b[2J\\xff\\xc0\\xaf ok \xc3\xa9"));
    assert_int_equal(utf8_valid_prefix((const uint8_t *)out, strlen(out)), strlen(out));
    free(out);
}

static void test_json_lines(void **state)
{
    char *out = capture(true, LL_INFO, emit_hostile);
    assert_int_equal(count_lines(out), 1);
    json_error_t je;
    json_t *o = json_loads(out, 0, &je);
    assert_non_null(o);
    assert_string_equal(json_string_value(json_object_get(o, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(o, "comp")), "tls");
    assert_string_equal(json_string_value(json_object_get(o, "proc")), "testlog");
    assert_non_null(strstr(json_string_value(json_object_get(o, "msg")), "forged line"));
    json_decref(o);
    free(out);
}

static void test_utf8(void **state)
{
    const uint8_t ok[] = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
    assert_int_equal(utf8_valid_prefix(ok, sizeof(ok) - 1), sizeof(ok) - 1);
    const uint8_t bad[] = "ab\xed\xa0\x80";
    assert_int_equal(utf8_valid_prefix(bad, sizeof(bad) - 1), 2);
    assert_int_equal(utf8_sequence_len((const uint8_t *)"\xe2\x82", 2), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_hostile_text_stays_one_line),
        cmocka_unit_test(test_json_lines),
        cmocka_unit_test(test_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
