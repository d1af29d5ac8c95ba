#!/usr/bin/env python3
"""The four daemons as a user meets them: --help, --version, bad flags and bad
configuration (one line naming the problem, exit status 2), --check-config,
running in the foreground and detached, and a clean stop on SIGINT/SIGTERM."""

import json
import os
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DAEMONS = ["supernode", "ordinarynode", "bootstrap", "loginserver"]
BINDIR = None


def binary(name):
    return os.path.join(BINDIR, name, name)


class CommandLine(unittest.TestCase):
    def test_help(self):
        for d in DAEMONS:
            rc, out, err = harness.run([binary(d), "--help"])
            self.assertEqual(rc, 0, d)
            self.assertIn("Usage: %s" % d, out)
            for flag in ("--help", "--version", "--config", "--verbose", "--check-config",
                         "--foreground"):
                self.assertIn(flag, out, "%s --help lacks %s" % (d, flag))
            self.assertIn("Configuration keys", out)
            self.assertEqual(err, "")
            rc2, out2, _ = harness.run([binary(d), "-h"])
            self.assertEqual((rc2, out2), (0, out))

    def test_version(self):
        for d in DAEMONS:
            for flag in ("--version", "-V"):
                rc, out, err = harness.run([binary(d), flag])
                self.assertEqual(rc, 0)
                self.assertRegex(out, r"^%s \d+\.\d+\.\d+ \(p2psip, protocol version 1\)\n$" % d)

    def assert_usage_error(self, argv, *needles):
        rc, out, err = harness.run(argv)
        self.assertEqual(rc, 2, "%s: status %d, stderr %r" % (argv, rc, err))
        self.assertEqual(out, "")
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, "%s: expected one line, got %r" % (argv, err))
        for n in needles:
            self.assertIn(n, lines[0])
        return lines[0]

    def test_bad_flags(self):
        for d in DAEMONS:
            b = binary(d)
            self.assert_usage_error([b, "--bogus"], "--bogus", d + ":")
            self.assert_usage_error([b, "-q"], "-q")
            self.assert_usage_error([b, "-c"], "-c", "argument")
            self.assert_usage_error([b, "--set", "nonsense"], "--set", "KEY=VALUE")
            self.assert_usage_error([b, "dance"], "dance", "unknown command")
            self.assert_usage_error([b, "run", "extra"], "extra")
            self.assert_usage_error([b, "--version=2"], "--version", "takes no value")

    def test_bad_config(self):
        with harness.tempdir() as tmp:
            def cfg(name, text):
                path = os.path.join(tmp, name)
                with open(path, "w") as f:
                    f.write(text)
                return path

            unknown = cfg("unknown.json", '{"log_levle": "debug"}')
            wrong_type = cfg("type.json", '{"shutdown_timeout_ms": "soon"}')
            out_of_range = cfg("range.json", '{"shutdown_timeout_ms": 0}')
            bad_addr = cfg("addr.json", '{"overlay": ""}')
            bad_json = cfg("syntax.json", '{"log_level": "info",,}')
            not_object = cfg("array.json", '["log_level"]')
            for d in DAEMONS:
                b = binary(d)
                self.assert_usage_error([b, "-n", "-c", unknown], "unknown key \"log_levle\"",
                                        "did you mean \"log_level\"")
                self.assert_usage_error([b, "-n", "-c", wrong_type], "\"shutdown_timeout_ms\"",
                                        "expected an integer")
                self.assert_usage_error([b, "-n", "-c", out_of_range], "\"shutdown_timeout_ms\"",
                                        "out of range")
                self.assert_usage_error([b, "-n", "-c", bad_addr], "\"overlay\"")
                self.assert_usage_error([b, "-n", "-c", bad_json], "syntax.json:1:")
                self.assert_usage_error([b, "-n", "-c", not_object], "JSON object")
                self.assert_usage_error([b, "-n", "-c", os.path.join(tmp, "missing.json")],
                                        "cannot read config", "missing.json")
                self.assert_usage_error([b, "-n", "-o", "log_level=loud"], "\"log_level\"",
                                        "loud")
                self.assert_usage_error([b, "-d", "-o", "no_such_key=1"], "no_such_key")
            self.assert_usage_error([binary("supernode"), "-n", "-o", "listen=localhost:7000"],
                                    "\"listen\"", "numeric address")
            self.assert_usage_error([binary("supernode"), "-n", "-o", "cert_file=/x.pem"],
                                    "set all three or none")
            self.assert_usage_error([binary("ordinarynode"), "-n", "-o",
                                     "bootstrap_urls=http://x"], "\"bootstrap_urls\"", "https")

    def test_check_config_ok(self):
        with harness.tempdir() as tmp:
            path = os.path.join(tmp, "sn.json")
            with open(path, "w") as f:
                json.dump({"overlay": "it.example", "listen": "[::1]:7001",
                           "log_level": "debug"}, f)
            rc, out, err = harness.run([binary("supernode"), "-n", "-c", path])
            self.assertEqual((rc, err), (0, ""))
            self.assertEqual(out, "supernode: configuration OK\n")
            rc, out, err = harness.run([binary("supernode"), "-n", "-v", "-c", path, "-o",
                                        "max_frame=2048"])
            self.assertEqual(rc, 0)
            effective = json.loads(out[:out.rindex("}") + 1])
            self.assertEqual(effective["listen"], "[::1]:7001")
            self.assertEqual(effective["max_frame"], 2048)
            self.assertEqual(effective["overlay"], "it.example")


class Lifecycle(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The login server serves an initialised state directory only.
        cls.tmp = harness.tempdir()
        cls.ls_state = os.path.join(cls.tmp.name, "ls")
        rc, out, err = harness.run([binary("loginserver"), "-o", "state_dir=" + cls.ls_state,
                                    "-o", "listen=127.0.0.1:0", "init"])
        assert rc == 0, err
        # ...and the bootstrap server needs a service certificate from that CA.
        cls.svc = os.path.join(cls.tmp.name, "svc")
        rc, out, err = harness.run([binary("loginserver"), "-o", "state_dir=" + cls.ls_state,
                                    "issue", "--service", "127.0.0.1", "--out", cls.svc])
        assert rc == 0, err

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def argv(self, d):
        if d == "loginserver":
            return [binary(d), "-d", "-o", "listen=127.0.0.1:0", "-o", "state_dir=" + self.ls_state]
        if d == "bootstrap":
            return [binary(d), "-d", "-o", "listen=127.0.0.1:0",
                    "-o", "ca_file=" + os.path.join(self.ls_state, "ca.pem"),
                    "-o", "cert_file=" + os.path.join(self.svc, "127.0.0.1.pem"),
                    "-o", "key_file=" + os.path.join(self.svc, "127.0.0.1.key")]
        if d == "supernode":
            return [binary(d), "-d", "-o", "listen=127.0.0.1:0"]
        return [binary(d), "-d"]

    def test_foreground_stop_on_signals(self):
        for d in DAEMONS:
            for sig in (signal.SIGTERM, signal.SIGINT):
                dm = harness.Daemon(self.argv(d))
                dm.wait_for("started")
                t0 = time.monotonic()
                rc = dm.stop(sig)
                self.assertEqual(rc, 0, "%s exit status on signal %d; log:\n%s"
                                 % (d, sig, dm.log()))
                self.assertLess(time.monotonic() - t0, 3.0)
                name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
                self.assertIn("%s received: shutting down" % name, dm.log())
                self.assertIn("%s stopped" % d, dm.log())

    def test_json_logs(self):
        dm = harness.Daemon([binary("ordinarynode"), "-d", "--log-json"])
        line = dm.wait_for("started")
        rec = json.loads(line)
        self.assertEqual(rec["proc"], "ordinarynode")
        self.assertEqual(rec["level"], "info")
        self.assertIn("started", rec["msg"])
        self.assertEqual(dm.stop(), 0)

    def test_detached_with_pid_file(self):
        with harness.tempdir() as tmp:
            pid_file = os.path.join(tmp, "ls.pid")
            log_file = os.path.join(tmp, "ls.log")
            try:
                rc, out, err = harness.run([binary("loginserver"), "-o", "pid_file=" + pid_file,
                                            "-o", "log_file=" + log_file, "-o",
                                            "listen=127.0.0.1:0", "-o",
                                            "state_dir=" + self.ls_state])
                self.assertEqual((rc, out, err), (0, "", ""))
                with open(pid_file) as f:
                    pid = int(f.read())
                os.kill(pid, 0)  # alive after the parent returned
                os.kill(pid, signal.SIGTERM)
                self.assertTrue(harness.wait_gone(pid, 10), "detached loginserver did not stop")
                self.assertFalse(os.path.exists(pid_file), "pid file left behind")
                with open(log_file) as f:
                    self.assertIn("loginserver stopped", f.read())
            finally:
                harness.kill_from_pid_file(pid_file)

    def test_bootstrap_without_credentials_refuses_to_start(self):
        dm = harness.Daemon([binary("bootstrap"), "-d", "-o", "listen=127.0.0.1:0"])
        self.assertEqual(dm.wait_exit(), 1)
        self.assertIn("loginserver issue --service", dm.log())

    def test_uninitialised_loginserver_refuses_to_start(self):
        with harness.tempdir() as tmp:
            dm = harness.Daemon([binary("loginserver"), "-d", "-o",
                                 "state_dir=" + os.path.join(tmp, "none")])
            self.assertEqual(dm.wait_exit(), 1)
            self.assertIn("run 'loginserver init' first", dm.log())

    def test_detached_start_failure_reported(self):
        # The parent must exit non-zero when the detached child cannot start.
        with harness.tempdir() as tmp:
            rc, out, err = harness.run([binary("bootstrap"), "-o",
                                        "pid_file=" + os.path.join(tmp, "no", "such", "dir.pid"),
                                        "-o", "log_file=" + os.path.join(tmp, "bs.log")])
            self.assertEqual(rc, 1)
            with open(os.path.join(tmp, "bs.log")) as f:
                self.assertIn("cannot write pid file", f.read())


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
