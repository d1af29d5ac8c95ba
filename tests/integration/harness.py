"""Shared helpers for integration scenarios: start real daemons, watch their
logs, and make sure every process a test started is gone when it ends, even
when the test fails."""

import argparse
import atexit
import os
import random
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time
import unittest

_started = []

# P2P_TEST_WRAPPER (e.g. "valgrind --error-exitcode=99 ...") prefixes every
# command a test runs, so the same scenarios check memory errors too.
WRAPPER = os.environ.get("P2P_TEST_WRAPPER", "").split()


def _reap_all():
    for p in _started:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_reap_all)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, lambda s, f: (_reap_all(), os._exit(128 + s)))


class Daemon:
    """A daemon started in the foreground (-d) whose stderr is collected."""

    def __init__(self, argv, env=None, wrap=True):
        """wrap=False: not under P2P_TEST_WRAPPER (a scenario that checks one daemon under
        valgrind runs the others it needs plainly)."""
        self.argv = argv
        self.proc = subprocess.Popen((WRAPPER if wrap else []) + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, text=True)
        _started.append(self.proc)
        self.lines = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, text, timeout=10.0):
        """Waits until a log line contains `text`; returns that line."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("%s: no log line with %r within %.1fs; log:\n%s"
                                         % (self.argv[0], text, timeout, self.log()))
                self._cv.wait(min(left, 0.2))

    def log(self):
        with self._cv:
            return "\n".join(self.lines)

    def wait_exit(self, timeout=10.0):
        """Waits for the daemon to end by itself and returns its exit status."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("%s did not exit by itself within %.1fs; log:\n%s"
                                 % (self.argv[0], timeout, self.log()))
        self._reader.join(timeout=5)
        return rc

    def stop(self, sig=signal.SIGTERM, timeout=None):
        """Sends `sig` and returns the exit status; fails if it does not end in time (10 s, 20 s
        under a wrapper such as valgrind, which slows everything many times over)."""
        if timeout is None:
            timeout = 20.0 if WRAPPER else 10.0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._reader.join(timeout=5)
            raise AssertionError("%s did not exit within %.1fs of signal %d; its last lines:\n%s"
                                 % (self.argv[0], timeout, sig,
                                    "\n".join(self.log().splitlines()[-8:])))
        self._reader.join(timeout=5)
        if rc == 99 and WRAPPER:
            raise AssertionError("%s: memory errors reported under %s (see its --log-file)"
                                 % (self.argv[0], WRAPPER[0]))
        return rc


def run(argv, timeout=30):
    """Runs a command to completion: (status, stdout, stderr)."""
    p = subprocess.run(WRAPPER + argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def wait_gone(pid, timeout):
    """True once process `pid` no longer exists (it is not our child: poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def kill_from_pid_file(path):
    """Stops a detached daemon we started, found by its pid file, whatever state the test is in."""
    try:
        with open(path) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tempdir(prefix="p2psip-test-"):
    return tempfile.TemporaryDirectory(prefix=prefix)


BINDIR = None  # the build directory, once main() has parsed it
SIPP_SCENARIOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sipp")


class OverlayScenario:
    """Helpers of scenarios that run a whole overlay (login server, bootstrap server, super
    and ordinary nodes) as a person would. The class sets: daemons (a list), ca and bs_port
    (the bootstrap server), cfg (configuration file by user) and on (running ordinary nodes by
    user)."""

    @staticmethod
    def bin(name):
        return os.path.join(BINDIR, name, name)

    @classmethod
    def node_conf(cls, u, conf):
        """Hook: amends user u's daemon configuration before it is written."""

    @classmethod
    def build_overlay(cls, overlay, sns, ons, no_supernode=(), ls_extra=None, start_sns=None,
                      wait=20):
        """In cls.tmp: a login server (started) with these accounts, every node enrolled, a
        configuration per node (cls.cfg; super nodes listen on cls.addr[u], sn1 seeds, the
        others join through the bootstrap server; ordinary nodes get a free sip_listen in
        cls.sip[u]; node_conf() may change any of it), the bootstrap server started, and the
        super nodes of start_sns (default: all) started and listed. Sets cls.ca, cls.bs_port,
        cls.ls_port, cls.svc, cls.node_id, cls.sn (running super nodes) and cls.on ({})."""
        import json
        import re
        cls.bs_port, ls_port = free_port(), free_port()
        cls.ls_port = ls_port
        state = os.path.join(cls.tmp, "ls")
        cls.ca = os.path.join(state, "ca.pem")
        cfg = os.path.join(cls.tmp, "ls.json")
        lsc = {"overlay": overlay, "listen": "127.0.0.1:%d" % ls_port, "state_dir": state,
               "pbkdf2_iterations": 1000, "stabilize_s": 1,
               "bootstrap_urls": ["https://127.0.0.1:%d" % cls.bs_port]}
        lsc.update(ls_extra or {})
        with open(cfg, "w") as f:
            json.dump(lsc, f)
        ls = [cls.bin("loginserver"), "-c", cfg]
        out = subprocess.run(ls + ["init"], capture_output=True, text=True, check=True).stdout
        pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        for u in tuple(sns) + tuple(ons):
            extra = ["--no-supernode"] if u in no_supernode else []
            subprocess.run(ls + ["user", "add", u] + extra, input=u + "-password\n", text=True,
                           capture_output=True, check=True)
        cls.svc = os.path.join(cls.tmp, "svc")
        subprocess.run(ls + ["issue", "--service", "127.0.0.1", "--out", cls.svc],
                       capture_output=True, text=True, check=True)
        cls.start(ls).wait_for("serving on")
        login = "https://127.0.0.1:%d" % ls_port
        cls.node_id, cls.addr, cls.cfg, cls.sip, cls.sn, cls.on = {}, {}, {}, {}, {}, {}
        for u in sns:  # the super nodes' addresses first: node_conf() may name them
            cls.addr[u] = "127.0.0.1:%d" % free_port()
        for u in tuple(sns) + tuple(ons):
            d = os.path.join(cls.tmp, u)
            prog = "supernode" if u in sns else "ordinarynode"
            p = subprocess.run([cls.bin(prog), "-o", "state_dir=" + d, "-o", "overlay=" + overlay,
                                "enroll", "--login", login, "--pin", pin, "--user", u],
                               input=u + "-password\n", capture_output=True, text=True,
                               timeout=60)
            assert p.returncode == 0, p.stderr
            cls.node_id[u] = re.search(r"node-id ([0-9a-f]{40})", p.stdout).group(1)
            conf = {"overlay": overlay, "state_dir": d}
            if u in sns:
                conf.update({"listen": cls.addr[u], "stun_listen": "127.0.0.1:0"})
                if u == sns[0]:
                    conf["seed"] = True
            else:
                cls.sip[u] = "127.0.0.1:%d" % free_port()
                conf["sip_listen"] = cls.sip[u]
            cls.node_conf(u, conf)
            cls.cfg[u] = os.path.join(cls.tmp, u + ".json")
            with open(cls.cfg[u], "w") as f:
                json.dump(conf, f)
        cls.start([cls.bin("bootstrap"), "-d", "-o", "overlay=" + overlay,
                   "-o", "listen=127.0.0.1:%d" % cls.bs_port,
                   "-o", "state_dir=" + os.path.join(cls.tmp, "bs"), "-o", "ca_file=" + cls.ca,
                   "-o", "cert_file=" + os.path.join(cls.svc, "127.0.0.1.pem"),
                   "-o", "key_file=" + os.path.join(cls.svc, "127.0.0.1.key"),
                   "-o", "announce_period_s=1"]).wait_for("serving on")
        start_sns = sns if start_sns is None else start_sns
        for u in start_sns:
            cls.sn[u] = cls.start([cls.bin("supernode"), "-d", "-c", cls.cfg[u]])
            cls.sn[u].wait_for("started a new ring" if u == sns[0] else "joined the ring",
                               timeout=wait)
        wait_until("%d super nodes listed" % len(start_sns),
                   lambda: len(cls.listed()) == len(start_sns), wait)

    @classmethod
    def save_logs(cls, name):
        """Every daemon's command line and log into <build dir>/<name>-logs/NN.log, for reading
        after a failure."""
        if not BINDIR or not cls.daemons:
            return
        out = os.path.join(BINDIR, name + "-logs")
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out, exist_ok=True)
        for i, d in enumerate(cls.daemons):
            with open(os.path.join(out, "%02d.log" % i), "w") as f:
                f.write(" ".join(d.argv) + "\n" + d.log() + "\n")

    @classmethod
    def stop_all(cls):
        """Stops every daemon still running; a failed or crashed stop is a failure."""
        problems = []
        for d in reversed(cls.daemons):
            try:
                rc = d.stop()
                if rc != 0:  # a crash on the way out (a signal is negative) too
                    problems.append("%s %s exited with status %s" % (d.argv[0], d.argv[3], rc))
            except AssertionError as e:
                problems.append(str(e))
        return problems

    @classmethod
    def stop_checked(cls, name):
        """The end of a scenario: every daemon's log saved to <build dir>/<name>-logs/, every
        daemon stopped, cls.tmp removed; a failed stop or a sanitizer's report in any log
        fails it."""
        import shutil
        cls.save_logs(name)
        problems = cls.stop_all()
        logs = "\n".join(d.log() for d in cls.daemons)
        if "AddressSanitizer" in logs or "runtime error" in logs:
            problems.append("a sanitizer reported an error (see %s-logs)" % name)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    @classmethod
    def sn_status(cls, u):
        """`supernode status --json` of super node u, as a dict ({} when it does not answer)."""
        import json
        p = subprocess.run([cls.bin("supernode"), "-c", cls.cfg[u], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout) if p.returncode == 0 else {}

    @classmethod
    def start(cls, argv):
        """A daemon in the foreground; under P2P_TEST_WRAPPER only ordinary nodes are wrapped."""
        d = Daemon(argv if argv[1] == "-d" else [argv[0], "-d"] + argv[1:],
                   wrap=argv[0].endswith("ordinarynode"))
        cls.daemons.append(d)
        return d

    @classmethod
    def listed(cls):
        """The addresses the bootstrap server lists now."""
        import http.client
        import json
        import ssl
        ctx = ssl.create_default_context(cafile=cls.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", cls.bs_port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/v1/supernodes?count=50")
            return {s["address"] for s in json.loads(conn.getresponse().read())["supernodes"]}
        finally:
            conn.close()

    def start_on(self, u, *overrides):
        argv = [self.bin("ordinarynode"), "-d", "-c", self.cfg[u]]
        for o in overrides:
            argv += ["-o", o]
        self.on[u] = self.start(argv)
        return self.on[u]

    def cli(self, u, *args):
        """`ordinarynode -c <u's config> args...`: (status, stdout, stderr)."""
        p = subprocess.run(WRAPPER + [self.bin("ordinarynode"), "-c", self.cfg[u]] + list(args),
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    def status(self, u):
        import json
        rc, out, _ = self.cli(u, "status", "--json")
        return json.loads(out) if rc == 0 else None

    # ---- sipp (Debian's sip-tester) as a phone ----

    def start_sipp(self, scenario, port, ip="127.0.0.1", target=None, keys=(), service=None,
                   transport="u1", timeout=30, ns=None, extra=()):
        """Starts one call of tests/sipp/<scenario>.xml from ip:port (in network namespace ns);
        keys are sipp's -key substitutions, extra more sipp options (e.g. -au/-ap). Returns
        the process for finish_sipp()."""
        argv = ["sipp", "-sf", os.path.join(SIPP_SCENARIOS, scenario + ".xml"), "-m", "1",
                "-i", ip, "-p", str(port), "-t", transport, "-timeout", str(timeout),
                "-timeout_error", "-nostdin"]
        for k, v in keys:
            argv += ["-key", k, str(v)]
        if service:
            argv += ["-s", service]
        argv += list(extra)
        if target:
            argv.append(target)
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self.tmp)

    def finish_sipp(self, p, what):
        """Waits for a sipp started by start_sipp(): it must exit 0 and its own counters must
        show one successful call and no failed one. Returns its output."""
        import re
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        self.assertEqual(p.returncode, 0, "sipp %s failed:\n%s" % (what, out[-3000:]))
        succ = re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out)
        failed = re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out)
        self.assertTrue(succ and failed, "no call counters in sipp's output:\n" + out[-3000:])
        self.assertEqual(int(succ.group(1)), 1, out[-3000:])
        self.assertEqual(int(failed.group(1)), 0, out[-3000:])
        return out

    def run_sipp(self, scenario, port, **kw):
        return self.finish_sipp(self.start_sipp(scenario, port, **kw), scenario)


def main(module):
    """Entry point of a scenario file: takes --bindir (the build directory),
    stores it as the module's BINDIR, and runs the module's tests."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bindir", required=True)
    args, rest = ap.parse_known_args()
    module.BINDIR = os.path.abspath(args.bindir)
    global BINDIR
    BINDIR = module.BINDIR
    unittest.main(module=module, argv=[sys.argv[0]] + rest, verbosity=2)


def post_oversize(port, ctx, path, size, headers=None):
    """POSTs `size` bytes with a Content-Length. A server that refuses from the length answers
    before reading the body and closes; like curl, read that answer even though the upload
    was cut off. Returns (status, parsed JSON body or None)."""
    import http.client
    import json
    import ssl
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.putrequest("POST", path)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    try:
        for _ in range(size // 65536):
            conn.send(b" " * 65536)
    except (ssl.SSLError, ConnectionError):
        pass
    resp = conn.getresponse()
    text = resp.read().decode(errors="replace")
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, None


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_PORT_RNG = random.Random(os.getpid() ^ int(time.time() * 1000))


def _port_free(port, kind):
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


PORT_LOCKS = os.path.join(tempfile.gettempdir(), "p2psip-test-ports")
_my_ports = []


def _release_ports():
    for path in _my_ports:
        try:
            os.unlink(path)
        except OSError:
            pass


atexit.register(_release_ports)


def _reserve(port):
    """Claims port for this process among every test process of the machine: a file named
    after it holds the claimer's pid; a claim whose process is gone is taken over."""
    os.makedirs(PORT_LOCKS, exist_ok=True)
    path = os.path.join(PORT_LOCKS, str(port))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            with open(path) as f:
                pid = int(f.read().strip() or "0")
            os.kill(pid, 0)
            return False  # held by a live test process
        except (OSError, ValueError):
            pass  # stale: its process is gone
        try:
            os.unlink(path)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    _my_ports.append(path)
    return True


def free_port():
    """A port of 127.0.0.1 that nothing is bound to right now and that no other test process
    has claimed, chosen at random *below* the kernel's ephemeral range. A port from bind(0) lies
    inside that range, and between the pick and the daemon's listen() any outgoing connection
    may take it as its source port; a port picked at random can be picked by a test running
    beside this one (CI runs two at once) and bound first: both lost integration_ring a run.
    The claim lasts as long as this process. TCP and UDP must both be free."""
    lo = 20000 if _EPHEMERAL[0] > 24000 else 10000
    hi = _EPHEMERAL[0] - 1 if _EPHEMERAL[0] > lo + 1000 else 65535
    for _ in range(2000):
        port = _PORT_RNG.randint(lo, hi)
        if _EPHEMERAL[0] <= port <= _EPHEMERAL[1]:
            continue
        if not (_port_free(port, socket.SOCK_STREAM) and _port_free(port, socket.SOCK_DGRAM)):
            continue
        if _reserve(port):
            return port
    raise RuntimeError("no free port found in %d-%d" % (lo, hi))


def free_udp_port():
    return free_port()


def require(ok, why):
    """A test that needs what this machine lacks (root, a tool): skipped when a person runs it,
    a failure under scripts/test.sh (P2P_TEST_STRICT=1, which CI runs), where scripts/deps.sh
    installed everything and a skip would prove nothing."""
    if ok:
        return
    if os.environ.get("P2P_TEST_STRICT") == "1":
        raise AssertionError("cannot run: " + why + " (P2P_TEST_STRICT=1: no skipping)")
    raise unittest.SkipTest(why)


def wait_until(what, fn, timeout, poll=0.1):
    """Calls fn until it returns something true (returned) or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError("timed out after %.0f s waiting for %s (last: %r)" % (timeout, what, last))
