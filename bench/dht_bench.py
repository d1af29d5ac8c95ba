#!/usr/bin/env python3
"""Record throughput, latency, hops and repair time of the super node ring
(docs/ring.md, docs/protocol.md section 4), measured on real daemons.

    scripts/build.sh release
    python3 bench/dht_bench.py --bindir build-release [--rounds 3] [--count 3000]
                               [--json-out FILE] [--quick]

It sets up, in a temporary directory on 127.0.0.1 (free ports): a login
server (overlay document: stabilize_s 1, successor_list 8,
replication_factor 3), enrolled super nodes and one record owner, and then
measures with `dhtctl bench update|get` (signed writes, mode update; and
reads of records that exist):

 1. one super node (a ring of one: nothing to replicate to), window 32 and
    window 1 (the latency figure);
 2. a ring of 16 super nodes, the load through one of them (most requests
    take 1-2 hops; each write is replicated to 2 successors, each verifying
    the signature) and spread over all 16; `dhtctl check` of the same records
    gives the average number of hops of a lookup;
 3. the time to repair after one of the 16 is SIGKILLed: from the kill until
    (a) every survivor's pred and successor list are exact (control socket
    `status`) and (b) every record has 3 copies again (control socket
    `records`: holders with role primary or replica, per (key, owner)),
    polled every 0.1 s; the killed node is restarted in between.

Every figure is measured --rounds times and the median is reported (with the
range). The configurations alternate within a round so that slow and fast
periods of a shared machine do not favour one of them. A summary table is
printed at the end; --json-out writes every raw figure. Everything it starts
is stopped (by PID) and the temporary directory removed, also on Ctrl-C.
Standalone: Python 3 standard library only.
"""

import argparse
import concurrent.futures
import ctypes
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

OVERLAY = "bench.p2psip"
STABILIZE_S = 1
SUCCESSOR_LIST = 8
REPLICATION = 3
N_RING = 16
BENCH_TYPE = "dht bench"
BENCH_PREFIX = "r"
LOG_LEVEL = "info"
POLL_S = 0.1
START_S = 30           # a daemon is listening / a member within this
RING_S = 120           # a ring is exact within this
COPIES_S = 120         # records back to 3 copies within this
DHTCTL_S = 900         # one dhtctl run
QUOTA_OWNER = 1000000  # records per owner per super node (default 10000)
QUOTA_OWNER_BYTES = 1 << 30

T_START = time.monotonic()


def say(fmt, *args):
    msg = fmt % args if args else fmt
    print("[%6.1f s] %s" % (time.monotonic() - T_START, msg), file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def free_port(taken):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine():
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count()
    return {"nproc": ncpu, "cpu_model": model, "kernel": os.uname().release,
            "python": sys.version.split()[0]}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _pdeathsig():
    """In the child before exec: die with us even if we are SIGKILLed (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class Daemon:
    """A daemon in the foreground (-d), its output in a log file, in its own session so that a
    Ctrl-C on the terminal reaches only us (we stop it ourselves, by PID)."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.logf = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_pdeathsig)
        self.pid = self.proc.pid

    def running(self):
        return self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, n=30):
        return "\n".join("    %s| %s" % (self.name, l) for l in self.log().splitlines()[-n:])

    def wait_for(self, text, timeout, after=0):
        """Waits until the log (from byte offset `after`) contains `text`."""
        deadline = time.monotonic() + timeout
        while True:
            if text in self.log()[after:]:
                return
            if not self.running():
                raise BenchError("%s exited (status %s) before logging %r:\n%s"
                                 % (self.name, self.proc.returncode, text, self.tail()))
            if time.monotonic() >= deadline:
                raise BenchError("%s: no %r in its log within %.0f s:\n%s"
                                 % (self.name, text, timeout, self.tail()))
            time.sleep(0.05)

    def log_size(self):
        try:
            return len(self.log())
        except OSError:
            return 0

    def cpu_s(self):
        """User + system CPU seconds used so far (None once gone)."""
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def kill(self, sig):
        if self.running():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self):
        try:
            self.logf.close()
        except OSError:
            pass


class SN:
    def __init__(self, name, state_dir):
        self.name = name
        self.dir = state_dir
        self.id = None
        self.port = None
        self.addr = None
        self.cfg = None
        self.daemon = None

    @property
    def num(self):
        return int(self.id, 16)

    @property
    def alive(self):
        return self.daemon is not None and self.daemon.running()


class Bench:
    def __init__(self, args):
        self.a = args
        self.bindir = os.path.abspath(args.bindir)
        self.bins = {
            "supernode": os.path.join(self.bindir, "supernode", "supernode"),
            "dhtctl": os.path.join(self.bindir, "supernode", "dhtctl"),
            "loginserver": os.path.join(self.bindir, "loginserver", "loginserver"),
        }
        for b in self.bins.values():
            if not os.access(b, os.X_OK):
                raise BenchError("no executable %s (build first: scripts/build.sh release)" % b)
        self.tmp = tempfile.mkdtemp(prefix="p2psip-dht-bench-")
        self.daemons = []
        self.ports = set()
        self.rng = random.Random(args.seed)
        self.raw = {"bench": [], "check": [], "repair": [], "setup": {}}

    # ---- processes -----------------------------------------------------------------------

    def start(self, name, argv):
        d = Daemon(name, argv, os.path.join(self.tmp, name + ".log"))
        self.daemons.append(d)
        return d

    def cleanup(self):
        live = [d for d in self.daemons if d.running()]
        for d in live:
            d.kill(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for d in live:
            try:
                d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                d.kill(signal.SIGKILL)
                try:
                    d.proc.wait(5)
                except subprocess.TimeoutExpired:
                    say("warning: %s (pid %d) did not exit", d.name, d.pid)
        for d in self.daemons:
            d.close()
        if self.a.keep_logs:
            os.makedirs(self.a.keep_logs, exist_ok=True)
            for f in os.listdir(self.tmp):
                if f.endswith(".log"):
                    shutil.copy(os.path.join(self.tmp, f), self.a.keep_logs)
            say("daemon logs copied to %s", self.a.keep_logs)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, argv, stdin=None, timeout=60):
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                           stdin=None if stdin is not None else subprocess.DEVNULL)
        return p.returncode, p.stdout, p.stderr

    # ---- setup ---------------------------------------------------------------------------

    def setup_login(self):
        self.ls_port = free_port(self.ports)
        self.ls_cfg = os.path.join(self.tmp, "ls.json")
        with open(self.ls_cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % self.ls_port,
                       "state_dir": os.path.join(self.tmp, "ls-state"),
                       "pbkdf2_iterations": 1000, "cert_validity_days": 30,
                       "stabilize_s": STABILIZE_S, "successor_list": SUCCESSOR_LIST,
                       "replication_factor": REPLICATION, "log_level": LOG_LEVEL}, f)
        ls = [self.bins["loginserver"], "-c", self.ls_cfg]
        rc, out, err = self.run(ls + ["init"])
        if rc != 0:
            raise BenchError("loginserver init: %s%s" % (out, err))
        m = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out)
        if not m:
            raise BenchError("loginserver init: no CA pin in %r" % out)
        self.pin = m.group(1)
        self.sn_users = ["solo"] + ["sn%d" % i for i in range(1, N_RING + 1)]
        for user in self.sn_users + ["loader"]:
            extra = ["--no-supernode"] if user == "loader" else []
            rc, out, err = self.run(ls + ["user", "add", user] + extra, stdin=user + "-password\n")
            if rc != 0:
                raise BenchError("user add %s: %s%s" % (user, out, err))
        d = self.start("loginserver", ls + ["-d"])
        d.wait_for("serving on", START_S)

    def enroll_all(self):
        url = "https://127.0.0.1:%d" % self.ls_port

        def enroll(user):
            sd = os.path.join(self.tmp, user)
            rc, out, err = self.run([self.bins["supernode"], "-o", "state_dir=" + sd, "enroll",
                                     "--login", url, "--pin", self.pin, "--user", user],
                                    stdin=user + "-password\n", timeout=60)
            return user, sd, rc, out, err

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a few at a time
            results = list(pool.map(enroll, self.sn_users + ["loader"]))
        self.sns = {}
        for user, sd, rc, out, err in results:
            if rc != 0:
                raise BenchError("enroll %s: %s%s" % (user, out, err))
            m = re.search(r"enrolled: (\S+) \(node-id ([0-9a-f]{40}), roles ([a-z,]+)\)", out)
            if not m:
                raise BenchError("enroll %s: unexpected output %r" % (user, out))
            if user == "loader":
                self.loader_dir = sd
                self.loader_uri = m.group(1)
                continue
            sn = SN(user, sd)
            sn.id = m.group(2)
            sn.port = free_port(self.ports)
            sn.addr = "127.0.0.1:%d" % sn.port
            sn.cfg = os.path.join(self.tmp, user + ".json")
            self.sns[user] = sn
        self.ring = [self.sns["sn%d" % i] for i in range(1, N_RING + 1)]
        self.by_id = {s.id: s for s in self.sns.values()}

    def start_sn(self, sn, join=None):
        cfg = {"overlay": OVERLAY, "listen": sn.addr, "state_dir": sn.dir,
               "log_level": LOG_LEVEL, "quota_per_owner": QUOTA_OWNER,
               "quota_per_owner_bytes": QUOTA_OWNER_BYTES,
               # dhtctl is one ordinary node doing the work of thousands: no per-node limits
               "on_rate": 1000000, "on_inflight": 100000,
               # each its own STUN port: 16 nodes on one host cannot all have the default
               "stun_listen": "127.0.0.1:0"}
        if join:
            cfg["join"] = [j.addr for j in join]
        else:
            cfg["seed"] = True
        with open(sn.cfg, "w") as f:
            json.dump(cfg, f)
        sn.daemon = self.start(sn.name, [self.bins["supernode"], "-d", "-c", sn.cfg])
        return sn.daemon.log_size()

    def wait_member(self, sn, seed=False, after=0):
        sn.daemon.wait_for("listening on", START_S, after)
        sn.daemon.wait_for("started a new ring" if seed else "joined the ring", START_S, after)

    # ---- control socket ------------------------------------------------------------------

    @staticmethod
    def ctl(sn, request, timeout=5.0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.path.join(sn.dir, "control.sock"))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def status(self, sn):
        try:
            st = self.ctl(sn, {"cmd": "status"})
        except (OSError, ValueError) as e:
            return {"error": repr(e)}
        return st if st.get("ok", True) else {"error": repr(st)}

    def ring_problems(self, sns):
        """[] when every node of `sns` has the exact pred and successor list (docs/ring.md 3)."""
        ring = sorted(sns, key=lambda s: s.num)
        n = len(ring)
        want = min(SUCCESSOR_LIST, n - 1)
        problems = []
        for i, sn in enumerate(ring):
            st = self.status(sn)
            if "error" in st:
                problems.append("%s: %s" % (sn.name, st["error"]))
                continue
            if st.get("state") != "member":
                problems.append("%s: state %r" % (sn.name, st.get("state")))
            pred = st.get("pred") or {}
            if n > 1 and (pred.get("id"), pred.get("addr")) != (ring[i - 1].id, ring[i - 1].addr):
                problems.append("%s: pred %s" % (sn.name, (pred.get("id") or "null")[:8]))
            exp = [(ring[(i + k) % n].id, ring[(i + k) % n].addr) for k in range(1, want + 1)]
            got = [(p.get("id"), p.get("addr")) for p in st.get("succ") or []]
            if got != exp:
                problems.append("%s: succ %s" % (sn.name, " ".join(g[0][:8] for g in got)))
        return problems

    def wait_ring(self, sns, timeout, what):
        t0 = time.monotonic()
        while True:
            for sn in sns:
                if not sn.alive:
                    raise BenchError("%s exited:\n%s" % (sn.name, sn.daemon.tail()))
            problems = self.ring_problems(sns)
            if not problems:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchError("%s: ring of %d not exact within %.0f s:\n  %s"
                                 % (what, len(sns), timeout, "\n  ".join(problems)))
            time.sleep(POLL_S)

    def copies(self, sns):
        """{(key, owner): number of nodes holding it as primary or replica}, or None when a
        node did not answer."""
        count = {}
        for sn in sns:
            try:
                ans = self.ctl(sn, {"cmd": "records"}, timeout=10.0)
            except (OSError, ValueError):
                return None
            if not ans.get("ok", True):
                return None
            for entry in ans.get("records", []):
                key, owner, _seq, role = entry[:4]
                if role in ("primary", "replica"):
                    count[(key, owner)] = count.get((key, owner), 0) + 1
        return count

    def wait_settled(self, sns, timeout, what):
        """Waits until every record is on exactly REPLICATION nodes. Returns (seconds, the set
        of (key, owner) pairs)."""
        t0 = time.monotonic()
        last = None
        while True:
            c = self.copies(sns)
            if c is not None:
                bad = {k: v for k, v in c.items() if v != REPLICATION}
                if not bad:
                    return time.monotonic() - t0, set(c)
                last = "%d of %d records not on exactly %d nodes (e.g. %s)" % (
                    len(bad), len(c), REPLICATION,
                    ", ".join("%s:%d" % (k[0][:8], v) for k, v in list(bad.items())[:5]))
            if time.monotonic() - t0 > timeout:
                raise BenchError("%s: records not settled within %.0f s: %s"
                                 % (what, timeout, last))
            time.sleep(0.25)

    # ---- dhtctl --------------------------------------------------------------------------

    def dhtctl(self, sns, *args):
        argv = [self.bins["dhtctl"], "--state", self.loader_dir,
                "--sn", ",".join(s.addr for s in sns), "--json"] + [str(a) for a in args]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc, out, err = self.run(argv, timeout=DHTCTL_S)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [l for l in out.splitlines() if l.strip()]
        try:
            r = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise BenchError("dhtctl %s: status %d, no JSON output: %r %s"
                             % (" ".join(map(str, args)), rc, out[-500:], err[-1500:]))
        r["_rc"] = rc
        r["_client_cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if err.strip():
            r["_stderr"] = err.strip()[-1000:]
        return r

    def bench(self, config, sns, all_sns, op, window, rnd):
        """One `dhtctl bench` run; records the raw result."""
        load0 = loadavg()
        cpu0 = [s.daemon.cpu_s() for s in all_sns]
        r = self.dhtctl(sns, "bench", op, "--count", self.a.count, "--window", window,
                        "--type", BENCH_TYPE, "--prefix", BENCH_PREFIX)
        cpu1 = [s.daemon.cpu_s() for s in all_sns]
        sn_cpu = sum(b - a for a, b in zip(cpu0, cpu1) if a is not None and b is not None)
        lat = r.get("latency_ms") or {}
        row = {"config": config, "op": op, "window": window, "round": rnd,
               "count": r.get("count"), "ok": r.get("ok"), "failed": r.get("failed"),
               "errors": r.get("errors"), "empty": r.get("empty"),
               "seconds": r.get("seconds"), "per_second": r.get("per_second"),
               "median_ms": lat.get("median"), "p99_ms": lat.get("p99"), "max_ms": lat.get("max"),
               # user + system CPU seconds of all super nodes, and of dhtctl
               "sn_cpu_s": round(sn_cpu, 3), "client_cpu_s": round(r["_client_cpu_s"], 3),
               "loadavg_before": load0, "exit": r["_rc"]}
        if "_stderr" in r:
            row["stderr"] = r["_stderr"]
        self.raw["bench"].append(row)
        odd = []
        if r.get("failed") or r["_rc"] != 0:
            odd.append("failed %s errors %s" % (r.get("failed"), r.get("errors")))
        if op == "get" and r.get("empty"):
            odd.append("%s gets found no record" % r.get("empty"))
        say("  %-10s %-6s w%-2d: %7.0f/s  median %.3f ms  p99 %.3f ms  max %.1f ms  "
            "(SN cpu %.2f s, client cpu %.2f s)%s", config, op, window, r.get("per_second") or 0,
            lat.get("median") or 0, lat.get("p99") or 0, lat.get("max") or 0, sn_cpu,
            r["_client_cpu_s"], ("  ODD: " + "; ".join(odd)) if odd else "")
        return row

    def check(self, config, sns, rnd):
        r = self.dhtctl(sns, "check", "--count", self.a.count, "--type", BENCH_TYPE,
                        "--prefix", BENCH_PREFIX)
        lat = r.get("latency_ms") or {}
        row = {"config": config, "round": rnd, "count": r.get("count"), "found": r.get("found"),
               "missing": len(r.get("missing") or []), "bad": len(r.get("bad") or []),
               "failed": len(r.get("failed") or []), "hops_avg": r.get("hops_avg"),
               "hops_max": r.get("hops_max"), "per_second": r.get("per_second"),
               "median_ms": lat.get("median"), "p99_ms": lat.get("p99"), "exit": r["_rc"]}
        self.raw["check"].append(row)
        say("  %-10s check    : found %s/%s, hops avg %.2f max %s, %.0f/s%s", config,
            r.get("found"), r.get("count"), r.get("hops_avg") or 0, r.get("hops_max"),
            r.get("per_second") or 0, "" if r["_rc"] == 0 else "  ODD: exit %d %s" % (
                r["_rc"], r.get("bad_detail") or r.get("missing") or r.get("failed")))
        return row

    def idle_cpu(self, sns, what, seconds=5.0):
        """CPU seconds per second the idle super nodes use (stabilisation, anti-entropy)."""
        c0 = [s.daemon.cpu_s() for s in sns]
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = [s.daemon.cpu_s() for s in sns]
        rate = sum(b - a for a, b in zip(c0, c1) if a is not None and b is not None) / (
            time.monotonic() - t0)
        self.raw["setup"]["idle_cpu_" + what] = round(rate, 4)
        say("  idle %s: %.1f %% of one CPU", what, 100 * rate)
        return rate

    def bench_set(self, config, sns, all_sns, rnd):
        # Updates first: the gets then read names that exist (same type, prefix, count).
        for op in ("update", "get"):
            for window in (32, 1):
                self.bench(config, sns, all_sns, op, window, rnd)

    # ---- the phases ----------------------------------------------------------------------

    def phase_solo(self):
        solo = self.sns["solo"]
        say("phase 1: one super node (%s)", solo.name)
        self.start_sn(solo)
        self.wait_member(solo, seed=True)
        self.idle_cpu([solo], "1 SN")
        for rnd in range(self.a.rounds):
            self.bench_set("1 SN", [solo], [solo], rnd)
        st = self.status(solo)
        self.raw["setup"]["solo_status_end"] = {"store": st.get("store"),
                                                "requests": st.get("requests"),
                                                "verifier": st.get("verifier")}
        solo.daemon.kill(signal.SIGTERM)
        try:
            solo.daemon.proc.wait(15)
        except subprocess.TimeoutExpired:
            solo.daemon.kill(signal.SIGKILL)
            solo.daemon.proc.wait(5)

    def start_ring(self):
        say("phase 2: starting a ring of %d", N_RING)
        t0 = time.monotonic()
        first = self.ring[0]
        self.start_sn(first)
        self.wait_member(first, seed=True)
        members = [first]
        rest = self.ring[1:]
        self.rng.shuffle(rest)
        while rest:
            batch, rest = rest[:5], rest[5:]
            for sn in batch:
                self.start_sn(sn, join=self.rng.sample(members, min(2, len(members))))
            for sn in batch:
                self.wait_member(sn)
            members += batch
        t_joined = time.monotonic() - t0
        self.wait_ring(self.ring, RING_S, "start")
        t_exact = time.monotonic() - t0
        self.raw["setup"]["ring_start"] = {"all_joined_s": round(t_joined, 2),
                                           "exact_s": round(t_exact, 2)}
        say("ring of %d exact %.1f s after the first start", N_RING, t_exact)

    def phase_ring(self):
        # The single entry point: a random node (it is responsible for ~1/16 of the keys).
        entry = self.rng.choice(self.ring)
        self.raw["setup"]["entry_sn"] = entry.name
        self.idle_cpu(self.ring, "16 SN")
        for rnd in range(self.a.rounds):
            say("round %d of %d", rnd + 1, self.a.rounds)
            self.bench_set("16, one SN", [entry], self.ring, rnd)
            self.check("16, one SN", [entry], rnd)
            self.bench_set("16, all SN", self.ring, self.ring, rnd)
            self.check("16, all SN", self.ring, rnd)
        st = [self.status(s) for s in self.ring]
        self.raw["setup"]["ring_status_end"] = {
            s.name: {"store": x.get("store"), "requests": x.get("requests"),
                     "replication_stats": x.get("replication_stats"),
                     "verifier": x.get("verifier"), "links": x.get("links")}
            for s, x in zip(self.ring, st)}

    def phase_repair(self):
        say("phase 3: repair after SIGKILL of one super node (%d times)", self.a.rounds)
        dt, pairs = self.wait_settled(self.ring, COPIES_S, "before the kills")
        say("all %d records on exactly %d nodes (waited %.1f s)", len(pairs), REPLICATION, dt)
        victims = self.rng.sample(self.ring, self.a.rounds)
        for rnd, victim in enumerate(victims):
            survivors = [s for s in self.ring if s is not victim]
            held = self.ctl(victim, {"cmd": "records"}, timeout=10.0)
            n_held = sum(1 for e in held.get("records", []) if e[3] in ("primary", "replica"))
            load0 = loadavg()
            t0 = time.monotonic()
            victim.daemon.kill(signal.SIGKILL)
            victim.daemon.proc.wait(10)
            t_ring = t_copies = t_exact3 = None
            polls = 0
            last_ring = last_copies = None
            while time.monotonic() - t0 < max(RING_S, COPIES_S):
                it0 = time.monotonic()
                polls += 1
                if t_ring is None:
                    last_ring = self.ring_problems(survivors)
                    if not last_ring:
                        t_ring = time.monotonic() - t0
                if t_exact3 is None:
                    c = self.copies(survivors)
                    if c is not None:
                        low = sum(1 for p in pairs if c.get(p, 0) < REPLICATION)
                        off = sum(1 for p in pairs if c.get(p, 0) != REPLICATION) + sum(
                            1 for p in c if p not in pairs)
                        last_copies = "%d records below %d copies, %d not exactly %d" % (
                            low, REPLICATION, off, REPLICATION)
                        if t_copies is None and low == 0:
                            t_copies = time.monotonic() - t0
                        if off == 0:
                            t_exact3 = time.monotonic() - t0
                if t_ring is not None and t_exact3 is not None:
                    break
                time.sleep(max(0.0, POLL_S - (time.monotonic() - it0)))
            row = {"round": rnd, "victim": victim.name, "victim_copies": n_held,
                   "ring_exact_s": t_ring, "copies_3_s": t_copies, "exactly_3_s": t_exact3,
                   "polls": polls, "loadavg_before": load0}
            self.raw["repair"].append(row)
            say("  kill %s (held %d copies): ring exact after %s s, every record back to %d "
                "copies after %s s (exactly %d everywhere after %s s; %d polls)", victim.name,
                n_held, _f(t_ring), REPLICATION, _f(t_copies), REPLICATION, _f(t_exact3), polls)
            if t_ring is None or t_copies is None:
                raise BenchError("repair after killing %s not complete in time: ring %s; "
                                 "copies %s" % (victim.name, last_ring, last_copies))
            # Restart it and wait until everything is as before.
            t1 = time.monotonic()
            after = self.start_sn(victim, join=self.rng.sample(survivors, 2))
            self.wait_member(victim, after=after)
            self.wait_ring(self.ring, RING_S, "after restarting %s" % victim.name)
            t_rj = time.monotonic() - t1
            dt, pairs2 = self.wait_settled(self.ring, COPIES_S, "after restarting %s"
                                           % victim.name)
            row["restart_ring_exact_s"] = round(t_rj, 2)
            row["restart_settled_s"] = round(time.monotonic() - t1, 2)
            if pairs2 != pairs:
                say("  warning: %d records before, %d after the restart", len(pairs), len(pairs2))
                pairs = pairs2
            say("  restarted %s: ring exact after %.1f s, all records on exactly %d nodes "
                "after %.1f s", victim.name, t_rj, REPLICATION, row["restart_settled_s"])

    # ---- report --------------------------------------------------------------------------

    def summary(self):
        out = []
        m = self.raw["machine"]
        out.append("")
        out.append("dht_bench summary: %d requests per bench run, median of %d rounds "
                   "(range min - max in brackets)" % (self.a.count, self.a.rounds))
        out.append("machine: nproc %s, %s; loadavg at start %s, at end %s"
                   % (m["nproc"], m["cpu_model"], self.raw["loadavg_start"],
                      self.raw.get("loadavg_end")))
        out.append("overlay document: stabilize_s %d, successor_list %d, replication_factor %d;"
                   " daemons at log level %s" % (STABILIZE_S, SUCCESSOR_LIST, REPLICATION,
                                                 LOG_LEVEL))
        out.append("")
        hdr = "%-12s %-6s %3s | %-22s | %9s %9s %9s | %8s %8s | %5s" % (
            "setup", "op", "win", "requests/s", "median ms", "p99 ms", "max ms",
            "SN cpu", "cli cpu", "load")
        out.append(hdr)
        out.append("%-12s %-6s %3s | %-22s | %9s %9s %9s | %8s %8s | %5s" % (
            "", "", "", "", "", "", "", "us/req", "us/req", "1 min"))
        out.append("-" * len(hdr))
        configs = []
        for r in self.raw["bench"]:
            k = (r["config"], r["op"], r["window"])
            if k not in configs:
                configs.append(k)
        for k in configs:
            rows = [r for r in self.raw["bench"] if (r["config"], r["op"], r["window"]) == k]
            ps = [r["per_second"] for r in rows if r["per_second"] is not None]
            snc = med([1e6 * r["sn_cpu_s"] / r["ok"] for r in rows if r["ok"]])
            clc = med([1e6 * r["client_cpu_s"] / r["ok"] for r in rows if r["ok"]])
            rng = "%.0f (%.0f - %.0f)" % (med(ps), min(ps), max(ps)) if ps else "-"
            flag = ""
            if any(r["failed"] for r in rows) or any(r["exit"] for r in rows):
                flag += " FAILED %d" % sum(r["failed"] or 0 for r in rows)
            if k[1] == "get" and any(r["empty"] for r in rows):
                flag += " EMPTY %d" % sum(r["empty"] or 0 for r in rows)
            ld = med([r["loadavg_before"][0] for r in rows if r["loadavg_before"]])
            out.append("%-12s %-6s %3d | %-22s | %9.3f %9.3f %9.1f | %8.0f %8.0f | %5.2f%s" % (
                k[0], k[1], k[2], rng, med([r["median_ms"] for r in rows]),
                med([r["p99_ms"] for r in rows]), med([r["max_ms"] for r in rows]),
                snc or 0, clc or 0, ld or 0, flag))
        out.append("(SN cpu: CPU time of all super node processes per successful request; "
                   "cli cpu: dhtctl's, whole process: for update it includes signing the "
                   "records before the clock starts; load: median 1-minute load average "
                   "before the runs)")
        idle = [(k[9:], v) for k, v in sorted(self.raw["setup"].items())
                if k.startswith("idle_cpu_")]
        if idle:
            out.append("idle super nodes (included in SN cpu): %s" % ", ".join(
                "%s %.1f %% of one CPU" % (k, 100 * v) for k, v in idle))
        if self.raw["check"]:
            out.append("")
            out.append("dhtctl check of the bench records in the 16-SN ring (client verifies "
                       "every record):")
            for cfg in ("16, one SN", "16, all SN"):
                rows = [r for r in self.raw["check"] if r["config"] == cfg]
                if not rows:
                    continue
                out.append("  %-12s hops avg %.2f (%.2f - %.2f), max %s; found %s of %s; "
                           "%.0f gets/s, median %.3f ms" % (
                               cfg, med([r["hops_avg"] for r in rows]),
                               min(r["hops_avg"] for r in rows), max(r["hops_avg"] for r in rows),
                               max(r["hops_max"] for r in rows),
                               min(r["found"] or 0 for r in rows), rows[0]["count"],
                               med([r["per_second"] for r in rows]),
                               med([r["median_ms"] for r in rows])))
        if self.raw["repair"]:
            rows = self.raw["repair"]
            out.append("")
            out.append("repair after SIGKILL of one of %d SNs (polled every %.1f s; %d kills):"
                       % (N_RING, POLL_S, len(rows)))
            for label, key in (("ring exact again", "ring_exact_s"),
                               ("every record back to 3 copies", "copies_3_s"),
                               ("every record on exactly 3 nodes", "exactly_3_s")):
                xs = [r[key] for r in rows if r[key] is not None]
                if xs:
                    out.append("  %-32s median %.2f s (%s)" % (
                        label, med(xs), ", ".join("%.2f" % x for x in xs)))
            out.append("  victims: %s" % ", ".join("%s (%d copies)" % (r["victim"],
                                                                        r["victim_copies"])
                                                    for r in rows))
            xs = [r.get("restart_ring_exact_s") for r in rows if r.get("restart_ring_exact_s")]
            if xs:
                out.append("  restarted node back in an exact ring: median %.1f s" % med(xs))
        setup = self.raw["setup"].get("ring_start")
        if setup:
            out.append("")
            out.append("ring of %d: all joined %.1f s, exact %.1f s after the first start"
                       % (N_RING, setup["all_joined_s"], setup["exact_s"]))
        return "\n".join(out)

    def main(self):
        self.raw["machine"] = machine()
        self.raw["loadavg_start"] = loadavg()
        self.raw["options"] = {"count": self.a.count, "rounds": self.a.rounds,
                               "seed": self.a.seed, "bindir": self.bindir,
                               "stabilize_s": STABILIZE_S, "successor_list": SUCCESSOR_LIST,
                               "replication_factor": REPLICATION, "ring": N_RING,
                               "log_level": LOG_LEVEL}
        say("dht_bench: %d requests per run, %d rounds, seed %d, temp dir %s; nproc %s, "
            "loadavg %s", self.a.count, self.a.rounds, self.a.seed, self.tmp,
            self.raw["machine"]["nproc"], self.raw["loadavg_start"])
        self.setup_login()
        self.enroll_all()
        say("login server up, %d users enrolled", len(self.sns) + 1)
        if not self.a.skip_solo:
            self.phase_solo()
        self.start_ring()
        self.phase_ring()
        if not self.a.skip_repair:
            self.phase_repair()
        self.raw["loadavg_end"] = loadavg()
        for name in self.sns:
            p = os.path.join(self.tmp, name + ".log")
            if os.path.exists(p):
                self.raw.setdefault("log_bytes", {})[name] = os.path.getsize(p)
                with open(p, errors="replace") as f:
                    warns = [l for l in f if re.search(r"\] (warn|error) ", l)]
                if warns:
                    self.raw.setdefault("log_warnings", {})[name] = warns[-20:]
        text = self.summary()
        print(text, flush=True)
        if self.raw.get("log_warnings"):
            n = sum(len(v) for v in self.raw["log_warnings"].values())
            print("\n(%d warning/error lines in the super nodes' logs; see the JSON output)"
                  % n)
        if self.a.json_out:
            with open(self.a.json_out, "w") as f:
                json.dump(self.raw, f, indent=1, sort_keys=True)
            say("raw figures written to %s", self.a.json_out)


def _f(x):
    return "-" if x is None else "%.2f" % x


def _on_term(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bindir", default="build-release",
                    help="build directory (default build-release)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="repetitions of every measurement (default 3; --quick: 2)")
    ap.add_argument("--count", type=int, default=None,
                    help="requests per bench run (default 3000; --quick: 200)")
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--json-out", help="write every raw figure to this file")
    ap.add_argument("--seed", type=int, default=None, help="random choices (default: random)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the daemons' logs here at the end")
    ap.add_argument("--skip-solo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-repair", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds is None:
        a.rounds = 2 if a.quick else 3
    if a.count is None:
        a.count = 200 if a.quick else 3000
    if a.seed is None:
        a.seed = random.randrange(1 << 31)
    if a.rounds < 1 or a.count < 1 or a.rounds > N_RING:
        ap.error("--rounds must be 1..%d and --count at least 1" % N_RING)
    signal.signal(signal.SIGINT, _on_term)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    b = None
    try:
        b = Bench(a)
        b.main()
        return 0
    except BenchError as e:
        print("dht_bench: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dht_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if b is not None:
            b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
