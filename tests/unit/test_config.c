/*
 * Configuration loading: defaults, file values, overrides, and each kind of
 * error (unknown key, wrong type, out of range, malformed value, bad JSON),
 * which must name the key.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

struct tcfg {
    char *name;
    long long port;
    bool flag;
    char *listen;
    char *level;
    struct cfg_strlist peers;
    char *path;
};

static const char *const levels[] = {"low", "high", NULL};

static int tvalidate(const void *p, char *err, size_t len)
{
    const struct tcfg *c = p;
    if (c->flag && c->peers.n == 0) {
        snprintf(err, len, "key \"flag\" needs at least one of \"peers\"");
        return -1;
    }
    return 0;
}

static const struct cfg_field fields[] = {
    {"name", CFG_STR, offsetof(struct tcfg, name), 0, 0, NULL, "node", "a name"},
    {"port", CFG_INT, offsetof(struct tcfg, port), 1, 65535, NULL, "7000", "a port"},
    {"flag", CFG_BOOL, offsetof(struct tcfg, flag), 0, 0, NULL, "false", "a flag"},
    {"listen", CFG_HOSTPORT, offsetof(struct tcfg, listen), 0, 0, NULL, "127.0.0.1:7000", ""},
    {"level", CFG_ENUM, offsetof(struct tcfg, level), 0, 0, levels, "low", ""},
    {"peers", CFG_STRLIST, offsetof(struct tcfg, peers), 0, 0, NULL, NULL, ""},
    {"path", CFG_PATH, offsetof(struct tcfg, path), 0, 0, NULL, NULL, ""},
};
static const struct cfg_schema schema = {fields, sizeof(fields) / sizeof(fields[0]), tvalidate};

static char err[512];

static int load(struct tcfg *c, const char *json)
{
    memset(c, 0, sizeof(*c));
    assert_int_equal(cfg_init(&schema, c, err, sizeof(err)), 0);
    err[0] = 0;
    return cfg_load_string(&schema, c, json, "t.json", err, sizeof(err));
}

static void test_defaults_and_values(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{}"), 0);
    assert_string_equal(c.name, "node");
    assert_int_equal(c.port, 7000);
    assert_false(c.flag);
    assert_string_equal(c.listen, "127.0.0.1:7000");
    assert_null(c.path);
    cfg_free(&schema, &c);

    assert_int_equal(load(&c, "{\"name\":\"sn1\",\"port\":7001,\"flag\":true,\"listen\":"
                              "\"[::1]:9\",\"level\":\"high\",\"peers\":[\"a\",\"b\"]}"),
                     0);
    assert_string_equal(c.name, "sn1");
    assert_int_equal(c.port, 7001);
    assert_true(c.flag);
    assert_string_equal(c.listen, "[::1]:9");
    assert_string_equal(c.level, "high");
    assert_int_equal(c.peers.n, 2);
    assert_string_equal(c.peers.items[1], "b");
    assert_int_equal(cfg_validate(&schema, &c, err, sizeof(err)), 0);
    cfg_free(&schema, &c);
}

static void test_unknown_key(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"prot\":7}"), -1);
    assert_string_equal(err, "t.json: unknown key \"prot\" (did you mean \"port\"?)");
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"zzzzzzzz\":7}"), -1);
    assert_string_equal(err, "t.json: unknown key \"zzzzzzzz\"");
    cfg_free(&schema, &c);
}

static void test_wrong_type(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"port\":\"7000\"}"), -1);
    assert_string_equal(err, "t.json: key \"port\": expected an integer, got a string");
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"port\":7.5}"), -1);
    assert_non_null(strstr(err, "key \"port\""));
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"flag\":1}"), -1);
    assert_string_equal(err, "t.json: key \"flag\": expected true or false, got an integer");
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"name\":null}"), -1);
    assert_non_null(strstr(err, "key \"name\": expected a string, got null"));
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"peers\":[\"a\",3]}"), -1);
    assert_non_null(strstr(err, "key \"peers\": item 1"));
    cfg_free(&schema, &c);
}

static void test_out_of_range(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"port\":0}"), -1);
    assert_string_equal(err, "t.json: key \"port\": 0 is out of range (1..65535)");
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"port\":65536}"), -1);
    assert_non_null(strstr(err, "65536 is out of range"));
    cfg_free(&schema, &c);
}

static void test_malformed_values(void **state)
{
    struct tcfg c;
    const char *bad_hostports[] = {"{\"listen\":\"localhost:80\"}",  "{\"listen\":\"1.2.3.4\"}",
                                   "{\"listen\":\"1.2.3.4:99999\"}", "{\"listen\":\"[::1]80\"}",
                                   "{\"listen\":\"1.2.3.4:\"}",      "{\"listen\":\"::1:80\"}"};
    for (size_t i = 0; i < sizeof(bad_hostports) / sizeof(bad_hostports[0]); i++) {
        assert_int_equal(load(&c, bad_hostports[i]), -1);
        assert_non_null(strstr(err, "key \"listen\": expected a numeric address and port"));
        cfg_free(&schema, &c);
    }
    assert_int_equal(load(&c, "{\"level\":\"medium\"}"), -1);
    assert_string_equal(err, "t.json: key \"level\": \"medium\" is not one of: low, high");
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"name\":\"\"}"), -1);
    assert_non_null(strstr(err, "key \"name\": must be a non-empty string"));
    cfg_free(&schema, &c);
}

static void test_bad_json(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"port\": 7000,}"), -1);
    assert_non_null(strstr(err, "t.json:1:"));
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "{\"port\":1,\"port\":2}"), -1);
    assert_non_null(strstr(err, "duplicate"));
    cfg_free(&schema, &c);
    assert_int_equal(load(&c, "[1]"), -1);
    assert_non_null(strstr(err, "must be a JSON object"));
    cfg_free(&schema, &c);
}

static void test_overrides(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"port\":7001}"), 0);
    assert_int_equal(cfg_set(&schema, &c, "port=7002", err, sizeof(err)), 0);
    assert_int_equal(c.port, 7002);
    assert_int_equal(cfg_set(&schema, &c, "flag=yes", err, sizeof(err)), 0);
    assert_true(c.flag);
    assert_int_equal(cfg_set(&schema, &c, "peers=1.2.3.4:5,[::1]:6", err, sizeof(err)), 0);
    assert_int_equal(c.peers.n, 2);
    assert_string_equal(c.peers.items[1], "[::1]:6");
    assert_int_equal(cfg_set(&schema, &c, "port=abc", err, sizeof(err)), -1);
    assert_string_equal(err, "--set: key \"port\": expected an integer, got a string");
    assert_int_equal(cfg_set(&schema, &c, "port=0", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "out of range"));
    assert_int_equal(cfg_set(&schema, &c, "nmae=x", err, sizeof(err)), -1);
    assert_string_equal(err, "--set: unknown key \"nmae\" (did you mean \"name\"?)");
    assert_int_equal(cfg_set(&schema, &c, "flag=maybe", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "key \"flag\""));
    assert_int_equal(c.port, 7002); /* failed overrides change nothing */
    cfg_free(&schema, &c);
}

static void test_cross_field(void **state)
{
    struct tcfg c;
    assert_int_equal(load(&c, "{\"flag\":true}"), 0);
    assert_int_equal(cfg_validate(&schema, &c, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "key \"flag\""));
    cfg_free(&schema, &c);
}

static void test_file(void **state)
{
    char path[] = "/tmp/p2p-cfg-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "{\n  \"port\": 7100,\n  \"name\": \"from-file\"\n}\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    struct tcfg c;
    memset(&c, 0, sizeof(c));
    cfg_init(&schema, &c, err, sizeof(err));
    assert_int_equal(cfg_load_file(&schema, &c, path, err, sizeof(err)), 0);
    assert_int_equal(c.port, 7100);
    assert_string_equal(c.name, "from-file");
    cfg_free(&schema, &c);
    unlink(path);

    memset(&c, 0, sizeof(c));
    assert_int_equal(cfg_load_file(&schema, &c, "/nonexistent/p2p.json", err, sizeof(err)), -1);
    assert_string_equal(err, "cannot read config /nonexistent/p2p.json: No such file or directory");
}

static void test_hostport_parse(void **state)
{
    char host[64];
    unsigned port;
    assert_int_equal(cfg_parse_hostport("[2001:db8::1]:443", host, sizeof(host), &port), 0);
    assert_string_equal(host, "2001:db8::1");
    assert_int_equal(port, 443);
    assert_int_equal(cfg_parse_hostport("10.0.0.1:0", host, sizeof(host), &port), 0);
    assert_int_equal(port, 0);
    assert_int_equal(cfg_parse_hostport("10.0.0.1:-1", host, sizeof(host), &port), -1);
    assert_int_equal(cfg_parse_hostport("[10.0.0.1]:1", host, sizeof(host), &port), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_values),
        cmocka_unit_test(test_unknown_key),
        cmocka_unit_test(test_wrong_type),
        cmocka_unit_test(test_out_of_range),
        cmocka_unit_test(test_malformed_values),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_overrides),
        cmocka_unit_test(test_cross_field),
        cmocka_unit_test(test_file),
        cmocka_unit_test(test_hostport_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
