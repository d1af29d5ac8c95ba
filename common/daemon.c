/*
 * Shared daemon skeleton (see daemon.h). Detaching uses a pipe so that the
 * parent exits only once the child has started successfully: a daemon that
 * cannot bind its port still fails with status 1 in the shell that ran it.
 */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "log.h"
#include "version.h"

const char *const daemon_log_levels[] = {"error", "warn", "info", "debug", "trace", NULL};

struct runtime {
    const struct daemon_spec *spec;
    const struct daemon_base *base;
    void *state;
    bool stopping;
    ev_signal sigint, sigterm;
    ev_timer deadline;
};

static const struct cli_opts *run_opts;

const struct cli_opts *daemon_cli_opts(void)
{
    return run_opts;
}

int daemon_load_config(const struct daemon_spec *spec, const struct cli_opts *o, void *cfg)
{
    char err[512];
    if (cfg_init(spec->schema, cfg, err, sizeof(err)) != 0 ||
        (o->config_path && cfg_load_file(spec->schema, cfg, o->config_path, err, sizeof(err))))
        goto bad;
    for (size_t i = 0; i < o->n_overrides; i++)
        if (cfg_set(spec->schema, cfg, o->overrides[i], err, sizeof(err)) != 0)
            goto bad;
    if (cfg_validate(spec->schema, cfg, err, sizeof(err)) != 0)
        goto bad;
    return 0;
bad:
    cli_error(spec->prog, "%s", err);
    return 2;
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    log_warn("daemon", "graceful stop took too long; leaving the loop");
    ev_break(loop, EVBREAK_ALL);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    struct runtime *rt = w->data;
    const char *name = w->signum == SIGINT ? "SIGINT" : "SIGTERM";
    if (rt->stopping) {
        log_warn("daemon", "%s again: stopping now", name);
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    rt->stopping = true;
    log_info("daemon", "%s received: shutting down", name);
    /* Our own watchers must not keep the loop alive once the daemon's are gone. */
    ev_signal_stop(loop, &rt->sigint);
    ev_signal_stop(loop, &rt->sigterm);
    ev_timer_init(&rt->deadline, on_deadline, (double)rt->base->shutdown_timeout_ms / 1000.0, 0.);
    ev_timer_start(loop, &rt->deadline);
    ev_unref(loop); /* the deadline alone does not keep the loop running */
    if (rt->spec->stop)
        rt->spec->stop(loop, rt->state);
    /* A second signal should still be seen: re-arm, but without holding the loop. */
    ev_signal_start(loop, &rt->sigint);
    ev_unref(loop);
    ev_signal_start(loop, &rt->sigterm);
    ev_unref(loop);
}

/* Forks; the parent waits for the child's "started" byte and exits with its status. */
static int detach(int *notify_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0) {
        close(p[1]);
        char status = 1;
        ssize_t n;
        do
            n = read(p[0], &status, 1);
        while (n < 0 && errno == EINTR);
        _exit(n == 1 ? status : 1);
    }
    close(p[0]);
    if (setsid() < 0)
        return -1;
    pid = fork(); /* never reacquire a controlling terminal */
    if (pid < 0)
        return -1;
    if (pid > 0)
        _exit(0);
    umask(027);
    if (chdir("/") != 0)
        return -1;
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2)
            close(null);
    }
    *notify_fd = p[1];
    return 0;
}

static void notify_parent(int fd, char status)
{
    if (fd < 0)
        return;
    ssize_t n = write(fd, &status, 1);
    (void)n;
    close(fd);
}

/* Atomically, through a fresh temporary file: a symlink planted at the path is replaced, never
 * followed. */
static int write_pid_file(const char *path)
{
    char line[32];
    int n = snprintf(line, sizeof(line), "%ld\n", (long)getpid());
    return fs_write_atomic(path, line, (size_t)n, 0644);
}

int daemon_main(const struct daemon_spec *spec, int argc, char **argv)
{
    static struct cli_opts o;
    enum cli_result r = cli_parse(spec->prog, argc, argv, &o);
    if (r != CLI_CONTINUE)
        return r;
    run_opts = &o;

    void *cfg = calloc(1, spec->cfg_size);
    if (!cfg) {
        cli_error(spec->prog, "out of memory");
        return 1;
    }
    int status = daemon_load_config(spec, &o, cfg);
    if (status != 0)
        goto out;
    const struct daemon_base *base = cfg; /* every config struct starts with one */

    int level = log_level_parse(base->log_level);
    level += o.verbose;
    if (level > LL_TRACE)
        level = LL_TRACE;
    log_init(spec->prog->name, (enum log_level)level, base->log_json || o.log_json);

    if (o.check_config) {
        if (o.verbose)
            cfg_dump(spec->schema, cfg, stdout);
        printf("%s: configuration OK\n", spec->prog->name);
        goto out;
    }
    if (strcmp(o.command, "run") != 0) {
        status = spec->command ? spec->command(&o, cfg) : 2;
        goto out;
    }
    if (o.argc > 0) {
        cli_error(spec->prog, "unexpected argument '%s' (try --help)", o.argv[0]);
        status = 2;
        goto out;
    }

    int notify_fd = -1;
    if (!o.foreground) {
        if (detach(&notify_fd) != 0) {
            log_error("daemon", "cannot detach: %s", strerror(errno));
            status = 1;
            goto out;
        }
        if (base->log_file) {
            int rc = log_use_file(base->log_file);
            if (rc != 0) {
                log_use_syslog();
                log_error("daemon", "cannot open log file %s: %s; using syslog", base->log_file,
                          strerror(-rc));
            }
        } else {
            log_use_syslog();
        }
    }
    /* Writes to a closed peer must be errors, not a process-killing signal. */
    signal(SIGPIPE, SIG_IGN);

    struct ev_loop *loop = ev_default_loop(EVFLAG_AUTO);
    if (!loop) {
        log_error("daemon", "cannot create the event loop");
        notify_parent(notify_fd, 1);
        status = 1;
        goto out;
    }
    struct runtime rt = {.spec = spec, .base = base};
    if (base->pid_file && write_pid_file(base->pid_file) != 0) {
        log_error("daemon", "cannot write pid file %s: %s", base->pid_file, strerror(errno));
        notify_parent(notify_fd, 1);
        status = 1;
        goto out_loop;
    }
    if (spec->start(loop, cfg, &rt.state) != 0) {
        /* start may have built part of its state before failing: cleanup takes it apart. */
        if (spec->cleanup)
            spec->cleanup(rt.state);
        notify_parent(notify_fd, 1);
        status = 1;
        goto out_pid;
    }
    ev_signal_init(&rt.sigint, on_signal, SIGINT);
    ev_signal_init(&rt.sigterm, on_signal, SIGTERM);
    rt.sigint.data = rt.sigterm.data = &rt;
    ev_signal_start(loop, &rt.sigint);
    ev_signal_start(loop, &rt.sigterm);
    log_info("daemon", "%s %s started (pid %ld)", spec->prog->name, P2P_VERSION, (long)getpid());
    notify_parent(notify_fd, 0);

    ev_run(loop, 0);

    /* Watchers left unref'd during a stop get their reference back before ev_*_stop. */
    if (ev_is_active(&rt.deadline)) {
        ev_ref(loop);
        ev_timer_stop(loop, &rt.deadline);
    }
    if (ev_is_active(&rt.sigint)) {
        if (rt.stopping)
            ev_ref(loop);
        ev_signal_stop(loop, &rt.sigint);
    }
    if (ev_is_active(&rt.sigterm)) {
        if (rt.stopping)
            ev_ref(loop);
        ev_signal_stop(loop, &rt.sigterm);
    }
    if (spec->cleanup)
        spec->cleanup(rt.state);
    log_info("daemon", "%s stopped", spec->prog->name);
out_pid:
    if (base->pid_file)
        unlink(base->pid_file);
out_loop:
    ev_loop_destroy(loop);
out:
    cfg_free(spec->schema, cfg);
    free(cfg);
    log_close();
    return status;
}
