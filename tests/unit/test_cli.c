/* The shared command line: every flag, and each kind of usage error (exit status 2). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "cli.h"

static const struct cli_option issue_opts[] = {
    {"service", "NAME", "the service"},
    {"force", NULL, "a flag"},
    {NULL, NULL, NULL},
};
static const struct cli_command cmds[] = {
    {"run", "run it", NULL},
    {"init", "set up", NULL},
    {"issue", "issue one", issue_opts},
    {NULL, NULL, NULL},
};
static const struct cli_prog prog = {.name = "testd", .summary = "a test daemon", .commands = cmds};

/*
 * cli_parse keeps pointers into argv, so the array must outlive the checks:
 * it is a static buffer that each PARSE() fills.
 */
static char *argv_buf[32];

static enum cli_result parse_list(struct cli_opts *o, const char *first, ...)
{
    va_list ap;
    int n = 0;
    argv_buf[n++] = "testd";
    va_start(ap, first);
    for (const char *a = first; a && n < 31; a = va_arg(ap, const char *))
        argv_buf[n++] = (char *)a;
    va_end(ap);
    argv_buf[n] = NULL;
    return cli_parse(&prog, n, argv_buf, o);
}

#define PARSE(o, ...) parse_list((o), __VA_ARGS__, (const char *)NULL)

static void test_defaults(void **state)
{
    struct cli_opts o;
    char *argv[] = {"testd", NULL};
    assert_int_equal(cli_parse(&prog, 1, argv, &o), CLI_CONTINUE);
    assert_string_equal(o.command, "run");
    assert_null(o.config_path);
    assert_false(o.foreground);
    assert_int_equal(o.argc, 0);
}

static void test_all_flags(void **state)
{
    struct cli_opts o;
    assert_int_equal(PARSE(&o, "-d", "-vv", "-n", "-c", "x.json", "-o", "a=1", "--set", "b=2",
                           "--log-json", "init", "extra"),
                     CLI_CONTINUE);
    assert_true(o.foreground);
    assert_int_equal(o.verbose, 2);
    assert_true(o.check_config);
    assert_string_equal(o.config_path, "x.json");
    assert_int_equal(o.n_overrides, 2);
    assert_string_equal(o.overrides[1], "b=2");
    assert_true(o.log_json);
    assert_string_equal(o.command, "init");
    assert_int_equal(o.argc, 1);
    assert_string_equal(o.argv[0], "extra");

    assert_int_equal(PARSE(&o, "--foreground", "--verbose", "--check-config", "--config=y.json"),
                     CLI_CONTINUE);
    assert_true(o.foreground && o.check_config);
    assert_string_equal(o.config_path, "y.json");
}

static void test_help_version(void **state)
{
    struct cli_opts o;
    assert_int_equal(PARSE(&o, "--help"), CLI_EXIT_OK);
    assert_int_equal(PARSE(&o, "-h"), CLI_EXIT_OK);
    assert_int_equal(PARSE(&o, "--version"), CLI_EXIT_OK);
    assert_int_equal(PARSE(&o, "-V"), CLI_EXIT_OK);
}

static void test_usage_errors(void **state)
{
    struct cli_opts o;
    assert_int_equal(PARSE(&o, "--bogus"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "-x"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "-c"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "--config"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "--config="), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "-o", "novalue"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "-o", "=x"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "frobnicate"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "--help=yes"), CLI_EXIT_USAGE);
}

static void test_command_options(void **state)
{
    struct cli_opts o;
    /* Command options may come before or after the command, mixed with global ones. */
    assert_int_equal(PARSE(&o, "-c", "x.json", "issue", "--service", "bs1", "-v", "--force"),
                     CLI_CONTINUE);
    assert_string_equal(o.command, "issue");
    assert_string_equal(cli_opt(&o, "service"), "bs1");
    assert_string_equal(cli_opt(&o, "force"), "");
    assert_null(cli_opt(&o, "out"));
    assert_int_equal(o.verbose, 1);
    assert_int_equal(PARSE(&o, "--service=bs2", "issue"), CLI_CONTINUE);
    assert_string_equal(cli_opt(&o, "service"), "bs2");
    /* Another command's options are unknown. */
    assert_int_equal(PARSE(&o, "init", "--service", "x"), CLI_EXIT_USAGE);
    assert_int_equal(PARSE(&o, "issue", "--service"), CLI_EXIT_USAGE);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),        cmocka_unit_test(test_all_flags),
        cmocka_unit_test(test_help_version),    cmocka_unit_test(test_usage_errors),
        cmocka_unit_test(test_command_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
