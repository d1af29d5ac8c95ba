#!/usr/bin/env python3
"""SIP load on our overlay and on Kamailio, with the same sipp scenarios (bench/sip/).

Targets (all three by default):
  --overlay   a real overlay on 127.0.0.1 (login server, bootstrap server, super nodes with
              replication 3, ordinary nodes with their SIP front ends), set up with
              tests/integration/harness.py in a temporary directory;
  --frontend  the same overlay, REGISTERs only: many distinct users (classical phones) at
              the public SIP front end of super node sn1 (P2P registrar of pbx.bench.p2psip),
              each with HTTP Digest (REGISTER, 401, REGISTER with credentials, 200) and each
              registration a location record signed by sn1 and stored with 3 replicas;
  --kamailio  Kamailio as a central registrar (usrloc in memory, no database, no
              authentication) and stateful proxy (tm, record_route, lookup("location")),
              installed with apt-get if missing (its packaged service is never started: the
              install runs under a policy-rc.d that denies it, and the unit is disabled), run in
              the foreground with a configuration written from bench/sip/kamailio.cfg.in.

Loads, all sipp over UDP on 127.0.0.1, bounded in count and time:
  REGISTER  open loop, stepped target rates (--reg-rates, --step-s each), split over the
            REGISTER streams: for Kamailio --kam-streams sipp instances, each registering its
            own range of distinct users (sequential -inf CSV); for the overlay one sipp per
            ordinary node (--reg-ons), refreshing that node's own user (an ordinary node
            registers only its own user: each refresh is a signed location record stored with
            3 replicas; REGISTERs that come while one is being stored are stored together
            right after it); for the front end --fe-streams sipps of --fe-users distinct users
            each. A step counts if no REGISTER failed and sipp achieved >= 90 % of the
            target; the ramp stops at the first step with failures. 500 (the node's
            "Registration In Progress", Retry-After) and 503 answers are counted as failures
            and reported apart. Then one closed-loop step (--reg-closed-s): each sipp keeps
            --reg-window-on (overlay, 1), --reg-window-fe (front end, 20) or --reg-window-kam
            (Kamailio, 50) REGISTERs
            outstanding at most, as fast as answers come.
  calls     --call-pairs caller/callee pairs; per pair a sipp UAS registered as the callee
            (through its own ordinary node, or at Kamailio), a sipp UAC calling
            sip:<callee>@<domain> through the caller's node / Kamailio: INVITE, 100, 180, 200,
            ACK, 200 ms (a retransmitted 200 is ACKed again), BYE, 200. Stepped call rates (--call-rates), --step-s each; a step
            counts with zero failed calls and >= 90 % of the target achieved; the ramp stops at
            the first step with failures.
  latency   --lat-rate calls/s for --lat-calls calls, one pair, the caller's messages traced
            by sipp (-trace_msg, microsecond timestamps): median INVITE->200 from those.
            (sipp's own response times have a millisecond clock; they are printed for the rate
            steps only as a coarse figure.) The time includes sipp's handling at the callee.

The super nodes' on_rate (50 requests/s per node by default) is lifted (--sn-on-rate), and so
is the daemons' sip_rate (200 SIP messages/s per source address by default, --sip-rate): on
127.0.0.1 every phone and node is one source, which would bound each call pair to about 33
calls/s.

Prints a table per target and the ratios ours / Kamailio; --json-out writes every step.
Every process started (daemons, kamailio, sipp) is stopped by its pid at the end, also on
failure or Ctrl-C, and the temporary directory is removed (--keep DIR keeps logs there).
"""

import argparse
import atexit
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCEN = os.path.join(HERE, "sip")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402

DOMAIN = "bench.p2psip"
PBX = "pbx.bench.p2psip"  # the domain of sn1's public front end (classical phones)

# ---- process bookkeeping: everything we start is stopped by its pid -------------------------

_procs = []  # (Popen, own process group?)
_tmpdirs = []


def track(p, group=False):
    _procs.append((p, group))
    return p


def stop_proc(p, group=False, sig=signal.SIGTERM, wait=5.0):
    """Stops p (and, for a process started in its own session, the group it leads: kamailio's
    children) by pid; SIGKILL if it does not end within `wait`."""
    if p.poll() is None:
        try:
            (os.killpg if group else os.kill)(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            try:
                (os.killpg if group else os.kill)(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    if group:  # children left behind by a leader that died first
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def cleanup():
    while _procs:
        p, group = _procs.pop()
        try:
            stop_proc(p, group)
        except Exception as e:  # keep stopping the others
            print("cleanup: %s" % e, file=sys.stderr)
    harness._reap_all()
    while _tmpdirs:
        shutil.rmtree(_tmpdirs.pop(), ignore_errors=True)


atexit.register(cleanup)


def _on_signal(sig, frame):
    cleanup()
    os._exit(128 + sig)


for _s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_s, _on_signal)


def say(fmt, *a):
    print("[sip_bench] " + (fmt % a if a else fmt), file=sys.stderr, flush=True)


# ---- sipp --------------------------------------------------------------------------------------


def users_csv(path, users, passwords=None):
    """sipp's -inf file, one line per call in order: "user;" or, with passwords,
    "user;[authentication username=user password=...];" (sipp expands a keyword that comes
    from a field, not one with a field inside it)."""
    with open(path, "w") as f:
        f.write("SEQUENTIAL\n")
        for u in users:
            f.write("%s;%s\n" % (u, "[authentication username=%s password=%s];" % (
                u, passwords[u]) if passwords else ""))
    return path


def elapsed_s(text):
    """sipp's "HH:MM:SS:usec" (counts file) or "HH:MM:SS" (stat file)."""
    parts = [int(x) for x in text.split(":")]
    h, m, s = parts[:3]
    return h * 3600 + m * 60 + s + (parts[3] / 1e6 if len(parts) > 3 else 0.0)


class Sipp:
    """One sipp process over UDP from 127.0.0.1:port, in its own directory (its stat, counts,
    rtt and message files go there)."""

    def __init__(self, wdir, name, scenario, port, target=None, rate=None, count=None,
                 limit=None, keys=(), inf=None, service=None, trace_msg=False, timeout=60,
                 timeout_error=True, auth_uri=None):
        self.dir = os.path.join(wdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        argv = ["sipp", "-sf", os.path.join(SCEN, scenario), "-i", "127.0.0.1", "-p", str(port),
                "-t", "u1", "-nostdin", "-timeout", "%ds" % timeout, "-trace_stat", "-stf",
                os.path.join(self.dir, "stat.csv"), "-fd", "3600", "-trace_counts",
                "-trace_rtt", "-rtt_freq", "1", "-buff_size", "4194304",
                "-max_recv_loops", "10000", "-max_sched_loops", "10000"]
        if timeout_error:
            argv.append("-timeout_error")
        if rate is not None:
            argv += ["-r", "%g" % rate, "-rp", "1000"]
        if count is not None:
            argv += ["-m", str(count)]
        if limit is not None:
            argv += ["-l", str(limit)]
        for k, v in keys:
            argv += ["-key", k, str(v)]
        if inf:
            argv += ["-inf", inf]
        if service:
            argv += ["-s", service]
        if auth_uri:  # the digest uri must be the Request-URI (sipp's default is its target)
            argv += ["-auth_uri", auth_uri]
        if trace_msg:
            argv += ["-trace_msg", "-message_file", os.path.join(self.dir, "messages.log")]
        if target:
            argv.append(target)
        self.argv = argv
        self.out = open(os.path.join(self.dir, "stdout.txt"), "w")
        self.t0 = time.monotonic()
        self.p = track(subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                        stdout=self.out, stderr=subprocess.STDOUT))

    def wait(self, timeout):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_proc(self.p, sig=signal.SIGUSR1)  # sipp: stop and dump its statistics
        self.wall = time.monotonic() - self.t0
        self.out.close()
        return self.result()

    def stop(self):
        stop_proc(self.p, sig=signal.SIGUSR1)
        self.out.close()
        return self.result()

    def result(self):
        r = {"name": self.name, "rc": self.p.returncode}
        rows = []
        try:
            with open(os.path.join(self.dir, "stat.csv")) as f:
                rows = list(csv.reader(f, delimiter=";"))
        except OSError:
            pass
        if len(rows) >= 2:
            st = dict(zip(rows[0], rows[-1]))
            r["created"] = int(st.get("TotalCallCreated", 0) or 0)
            r["successful"] = int(st.get("SuccessfulCall(C)", 0) or 0)
            r["failed"] = int(st.get("FailedCall(C)", 0) or 0)
            r["retrans"] = int(st.get("Retransmissions(C)", 0) or 0)
            r["elapsed"] = elapsed_s(st["ElapsedTime(C)"])  # whole seconds: see the counts
        else:
            r.update(created=0, successful=0, failed=0, retrans=0,
                     elapsed=getattr(self, "wall", 0.0))
        # per-message counts: answers 500/503 taken on their own branch
        r["r500"] = r["r503"] = 0
        for path in glob.glob(os.path.join(self.dir, "*_counts.csv")):
            with open(path) as f:
                crows = list(csv.reader(f, delimiter=";"))
            if len(crows) >= 2:
                c = dict(zip(crows[0], crows[-1]))
                if c.get("ElapsedTime"):
                    r["elapsed"] = elapsed_s(c["ElapsedTime"])
                for k, v in c.items():
                    m = re.match(r"\d+_(500|503)_Recv$", k)
                    if m and v:
                        r["r" + m.group(1)] += int(v)
        rtt = []
        for path in glob.glob(os.path.join(self.dir, "*_rtt.csv")):
            with open(path) as f:
                for row in csv.reader(f, delimiter=";"):
                    try:
                        rtt.append(float(row[1]))
                    except (ValueError, IndexError):
                        pass
        r["rtt_ms_coarse"] = statistics.median(rtt) if rtt else None
        r["ok"] = r["successful"] - r["r500"] - r["r503"]
        # not ok: failed calls, refused ones, and calls still running when sipp stopped
        r["not_ok"] = r["created"] - r["ok"]
        return r


def invite_200_times(message_file):
    """INVITE->200 per call (ms) from a sipp -trace_msg file: the INVITE sent first and the first
    200 to it received, matched by Call-ID, with sipp's microsecond timestamps."""
    sent, got = {}, {}
    with open(message_file, errors="replace") as f:
        text = f.read()
    for block in text.split("\n-----------------------------------------------")[0:]:
        m = re.match(r"-*\s*(\d{4}-\d\d-\d\d) (\d\d):(\d\d):(\d\d\.\d+)\n(.*)", block.lstrip("-"),
                     re.S) or re.match(r"\s*(\d{4}-\d\d-\d\d) (\d\d):(\d\d):(\d\d\.\d+)\n(.*)",
                                       block, re.S)
        if not m:
            continue
        t = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
        body = m.group(5)
        cid = re.search(r"^Call-ID:\s*(\S+)", body, re.M | re.I)
        if not cid:
            continue
        cid = cid.group(1)
        if "message sent" in body and re.search(r"^INVITE ", body, re.M):
            sent.setdefault(cid, t)
        elif "message received" in body and re.search(r"^SIP/2.0 200", body, re.M) and \
                re.search(r"^CSeq:\s*1 INVITE", body, re.M | re.I):
            got.setdefault(cid, t)
    return [(got[c] - sent[c]) * 1000.0 for c in sent if c in got and got[c] >= sent[c]]


def aggregate(results):
    a = {k: sum(r[k] for r in results) for k in ("created", "successful", "failed", "ok",
                                                  "not_ok", "r500", "r503", "retrans")}
    a["elapsed"] = max((r["elapsed"] for r in results), default=0.0)
    rtts = [r["rtt_ms_coarse"] for r in results if r["rtt_ms_coarse"] is not None]
    a["rtt_ms_coarse"] = statistics.median(rtts) if rtts else None
    a["rate"] = a["ok"] / a["elapsed"] if a["elapsed"] > 0 else 0.0
    return a


# ---- targets ----------------------------------------------------------------------------------


class Target:
    """What the loads need from a system under test. A REGISTER stream is (name, host:port,
    users CSV, users' count); a call pair is (caller, callee, caller's proxy host:port,
    callee's registrar host:port). Adding another REGISTER target (e.g. a super node's public
    front end taking many users) is a new reg_streams() (and credentials in the scenario)."""
    name = "?"
    reg_scenario = "register.xml"
    reg_domain = None  # DOMAIN

    def reg_streams(self, wdir):
        raise NotImplementedError

    def call_pairs(self, n):
        raise NotImplementedError

    def notes(self):
        return {}

    def close(self):
        pass


class Kamailio(Target):
    name = "kamailio"

    def __init__(self, tmp, args):
        self.args = args
        ensure_kamailio()
        self.port = harness.free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.dir = os.path.join(tmp, "kamailio")
        os.makedirs(self.dir)
        with open(os.path.join(SCEN, "kamailio.cfg.in")) as f:
            cfg = f.read()
        mods = next((d for d in ("/usr/lib/x86_64-linux-gnu/kamailio/modules",
                                 "/usr/lib/kamailio/modules") if os.path.isdir(d)),
                    "/usr/lib/x86_64-linux-gnu/kamailio/modules")
        for k, v in {"PORT": self.port, "DOMAIN": DOMAIN, "CHILDREN": args.kam_children,
                     "LOG_LEVEL": 0, "MODULES": mods + "/"}.items():
            cfg = cfg.replace("@%s@" % k, str(v))
        self.cfg = os.path.join(self.dir, "kamailio.cfg")
        with open(self.cfg, "w") as f:
            f.write(cfg)
        chk = subprocess.run(["kamailio", "-c", "-f", self.cfg], capture_output=True, text=True)
        if chk.returncode != 0:
            raise RuntimeError("kamailio -c: %s" % (chk.stdout + chk.stderr)[-2000:])
        self.log = open(os.path.join(self.dir, "kamailio.log"), "w")
        # -DD: no daemonising (children still forked), -E: log to stderr. Own session: its
        # children are stopped with it.
        self.p = track(subprocess.Popen(
            ["kamailio", "-f", self.cfg, "-DD", "-E", "-m", str(args.kam_shm_mb), "-M", "16",
             "-Y", self.dir, "-P", os.path.join(self.dir, "kamailio.pid")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True), group=True)
        harness.wait_until("kamailio answering on %s" % self.addr, self.answers, 20, 0.2)
        say("kamailio (pid %d, %d children) on %s", self.p.pid, args.kam_children, self.addr)

    def answers(self):
        """True once Kamailio answers an OPTIONS (any answer: it is routing)."""
        import socket
        if self.p.poll() is not None:
            raise RuntimeError("kamailio exited with %s; see %s" % (self.p.returncode,
                                                                    self.log.name))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.3)
            me = s.getsockname()[1]
            s.sendto(b"OPTIONS sip:127.0.0.1:%d SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;"
                     b"branch=z9hG4bKprobe%d;rport\r\nFrom: <sip:probe@x>;tag=1\r\n"
                     b"To: <sip:probe@x>\r\nCall-ID: probe%d\r\nCSeq: 1 OPTIONS\r\n"
                     b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                     % (self.port, me, me, me), ("127.0.0.1", self.port))
            try:
                return s.recv(4096).startswith(b"SIP/2.0 ")
            except OSError:
                return False

    def reg_streams(self, wdir):
        out = []
        n = self.args.kam_users
        for i in range(self.args.kam_streams):
            users = ["u%d_%d" % (i, k) for k in range(n)]
            out.append(("kam%d" % i, self.addr,
                        users_csv(os.path.join(wdir, "kam%d_users.csv" % i), users), n))
        return out

    def call_pairs(self, n):
        return [("caller%d" % i, "callee%d" % i, self.addr, self.addr) for i in range(n)]

    def close(self):
        stop_proc(self.p, group=True, sig=signal.SIGTERM, wait=10)
        self.log.close()


def ensure_kamailio():
    if shutil.which("kamailio"):
        return
    say("installing kamailio with apt-get (its service is not started)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    policy = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(policy)
    if ours:  # deny service starts during the install (Debian's invoke-rc.d policy hook)
        subprocess.run(sudo + ["sh", "-c", "printf '#!/bin/sh\\nexit 101\\n' > %s && chmod 755 %s"
                               % (policy, policy)], check=True)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(sudo + ["apt-get", "install", "-y", "--no-install-recommends",
                                  "kamailio"], env=env).returncode != 0:
            subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
            subprocess.run(sudo + ["apt-get", "install", "-y", "--no-install-recommends",
                                   "kamailio"], env=env, check=True)
    finally:
        if ours:
            subprocess.run(sudo + ["rm", "-f", policy])
    # never started at boot either; and if something started it anyway, stop that one
    subprocess.run(sudo + ["systemctl", "disable", "kamailio"], capture_output=True)
    subprocess.run(sudo + ["systemctl", "stop", "kamailio"], capture_output=True)
    pids = subprocess.run(["pgrep", "-x", "kamailio"], capture_output=True, text=True).stdout
    if pids.strip():
        say("WARNING: kamailio processes running that this bench did not start: %s; "
            "stop them (systemctl stop kamailio) before measuring", pids.split())


class Overlay(Target):
    name = "overlay"

    def __init__(self, tmp, args):
        self.args = args
        harness.BINDIR = os.path.abspath(args.bindir)
        sns = tuple("sn%d" % (i + 1) for i in range(args.sns))
        self.reg_users = tuple("reg%d" % (i + 1) for i in range(args.reg_ons))
        self.pairs = [("alice%d" % i, "bob%d" % i) for i in range(args.call_pairs)]
        ons = self.reg_users + tuple(u for p in self.pairs for u in p)

        class Scenario(harness.OverlayScenario):
            daemons = []

            @classmethod
            def node_conf(cls, u, conf):
                conf["log_level"] = args.log_level
                conf["sip_rate"] = args.sip_rate
                if u in sns:
                    conf["on_rate"] = args.sn_on_rate
                    conf["on_inflight"] = args.sn_on_inflight
                    if u == sns[0]:  # the public front end of PBX (the frontend target)
                        cls.fe_sip = "127.0.0.1:%d" % harness.free_port()
                        conf.update({"sip_listen": cls.fe_sip, "sip_domain": PBX,
                                     "sip_users": users_file})
                else:  # spread the ordinary nodes over the super nodes
                    conf["supernodes"] = [cls.addr[sns[ons.index(u) % len(sns)]]]

        Scenario.tmp = os.path.join(tmp, self.name)
        os.makedirs(Scenario.tmp)
        # The front end's accounts: fe<stream>_<k>, password "pw-<user>".
        self.fe_users = [["fe%d_%d" % (i, k) for k in range(args.fe_users)]
                         for i in range(args.fe_streams)]
        self.fe_passwords = {u: "pw-" + u for us in self.fe_users for u in us}
        users_file = os.path.join(Scenario.tmp, "pbx-users")
        with open(users_file, "w") as f:
            for u, pw in self.fe_passwords.items():
                f.write("%s:%s\n" % (u, hashlib.md5(("%s:%s:%s" % (u, PBX, pw)).encode())
                                     .hexdigest()))
        self.sc = Scenario
        t0 = time.monotonic()
        Scenario.build_overlay(DOMAIN, sns, ons, wait=60,
                               ls_extra={"replication_factor": 3, "stabilize_s": 1,
                                         "sip_proxies": [PBX + "=" + sns[0]]})
        for u in ons:
            Scenario.on[u] = Scenario.start([Scenario.bin("ordinarynode"), "-d", "-c",
                                             Scenario.cfg[u]])
        for u in ons:
            Scenario.on[u].wait_for("published user location", timeout=60)
        say("overlay up in %.1f s: %d super nodes (replication 3), %d ordinary nodes",
            time.monotonic() - t0, len(sns), len(ons))

    def reg_streams(self, wdir):
        return [(u, self.sc.sip[u], users_csv(os.path.join(wdir, u + "_users.csv"), [u]), 1)
                for u in self.reg_users]


    def call_pairs(self, n):
        return [(a, b, self.sc.sip[a], self.sc.sip[b]) for a, b in self.pairs[:n]]

    def status(self, u):
        p = subprocess.run([self.sc.bin("ordinarynode"), "-c", self.sc.cfg[u], "status",
                            "--json"], capture_output=True, text=True, timeout=30)
        try:
            return json.loads(p.stdout).get("sip", {})
        except ValueError:
            return {}

    def counters(self, users):
        tot = {}
        for u in users:
            st = self.status(u)
            for k, v in st.get("counters", {}).items():
                tot[k] = tot.get(k, 0) + v
            for k, v in st.get("proxy", {}).items():
                if isinstance(v, int):
                    tot["proxy_" + k] = tot.get("proxy_" + k, 0) + v
        return tot

    def save_logs(self, dest):
        os.makedirs(dest, exist_ok=True)
        for i, d in enumerate(self.sc.daemons):
            name = os.path.basename(d.argv[0])
            cfg = d.argv[d.argv.index("-c") + 1] if "-c" in d.argv else ""
            tag = os.path.splitext(os.path.basename(cfg))[0] if cfg else name
            with open(os.path.join(dest, "%02d-%s-%s.log" % (i, name, tag)), "w") as f:
                f.write(" ".join(d.argv) + "\n" + d.log() + "\n")

    def log_evidence(self):
        """Lines of interest in the daemons' logs, counted by kind."""
        pats = {"store failed": "not stored in the overlay", "busy": "busy",
                "rate-limited (SIP, per source)": "messages per second: dropped",
                "rate-limited (super node, per node)": "requests per second",
                "lookup failed": "looking up", "too busy (transactions)": "Too Busy",
                "no answer": "no answer within"}
        out = {}
        for d in self.sc.daemons:
            for line in d.lines:
                for k, p in pats.items():
                    if p in line:
                        out[k] = out.get(k, 0) + 1
        return out

    def close(self):
        problems = self.sc.stop_all()
        if problems:
            say("stopping the overlay: %s", "; ".join(problems))


class Frontend(Overlay):
    """The same overlay; REGISTERs of many distinct users (classical phones, Digest
    authentication) at sn1's public front end, each a record signed by sn1 with 3 replicas."""
    name = "frontend"
    reg_scenario = "register_auth.xml"
    reg_domain = None  # set in __init__ (PBX)
    reg_auth_uri = None  # the REGISTERs' Request-URI, sip:PBX

    def __init__(self, tmp, args):
        super().__init__(tmp, args)
        self.reg_domain = PBX
        self.reg_auth_uri = PBX
        self.sc.sn["sn1"].wait_for("P2P registrar and proxy of %s" % PBX, timeout=30)

    def reg_streams(self, wdir):
        return [("fe%d" % i, self.sc.fe_sip,
                 users_csv(os.path.join(wdir, "fe%d_users.csv" % i), us, self.fe_passwords),
                 len(us)) for i, us in enumerate(self.fe_users)]

    def counters(self, users):
        p = subprocess.run([self.sc.bin("supernode"), "-c", self.sc.cfg["sn1"], "status",
                            "--json"], capture_output=True, text=True, timeout=30)
        try:
            st = json.loads(p.stdout).get("sip", {})
        except ValueError:
            return {}
        return dict(st.get("counters", {}), registered_users=st.get("registered", 0))


# ---- loads -------------------------------------------------------------------------------------


def register_step(tgt, wdir, rate, seconds, window=None, tag=""):
    """All REGISTER streams at once, `rate` in total (open loop), or (window) each with at most
    `window` outstanding and no rate bound, for `seconds`."""
    streams = tgt.reg_streams(wdir)
    procs = []
    for name, addr, inf, _ in streams:
        port = harness.free_port()
        if window:
            procs.append(Sipp(wdir, "%sreg-closed-%s" % (tag, name), tgt.reg_scenario, port, addr,
                              rate=100000, count=None, limit=window, inf=inf,
                              keys=(("domain", tgt.reg_domain or DOMAIN), ("expires", 3600)),
                              timeout=int(seconds), timeout_error=False,
                              auth_uri=getattr(tgt, "reg_auth_uri", None)))
        else:
            per = rate / len(streams)
            procs.append(Sipp(wdir, "%sreg-%g-%s" % (tag, rate, name), tgt.reg_scenario, port,
                              addr, rate=per, count=max(1, int(round(per * seconds))), inf=inf,
                              keys=(("domain", tgt.reg_domain or DOMAIN), ("expires", 3600)),
                              timeout=int(seconds * 3 + 30),
                              auth_uri=getattr(tgt, "reg_auth_uri", None)))
    res = [p.wait(seconds * 3 + 60) for p in procs]
    a = aggregate(res)
    a.update(target=rate, streams=len(streams), window=window)
    return a


def register_phase(tgt, wdir, args, rates):
    steps, best = [], None
    for rate in rates:
        s = register_step(tgt, wdir, rate, args.step_s)
        s["ok_step"] = s["not_ok"] == 0 and s["rate"] >= 0.9 * rate
        steps.append(s)
        say("%s REGISTER target %g/s: %d ok, %d failed (500: %d, 503: %d), %.0f/s achieved%s",
            tgt.name, rate, s["ok"], s["not_ok"], s["r500"], s["r503"], s["rate"],
            "" if s["ok_step"] else "  <- does not count")
        if s["ok_step"]:
            best = s
        if s["not_ok"] > 0:
            break
        time.sleep(1)
    closed = None
    if args.reg_closed_s > 0:
        w = (args.reg_window_fe if isinstance(tgt, Frontend) else
             args.reg_window_on if isinstance(tgt, Overlay) else args.reg_window_kam)
        closed = register_step(tgt, wdir, None, args.reg_closed_s, window=w)
        say("%s REGISTER closed loop (%d outstanding per sipp, %d sipps): %d ok in %.1f s = %.0f/s,"
            " %d not ok (500: %d, 503: %d)", tgt.name, w, closed["streams"], closed["ok"],
            closed["elapsed"], closed["rate"], closed["not_ok"], closed["r500"], closed["r503"])
    return {"steps": steps, "best": best, "closed": closed}


def register_phone(tgt, wdir, user, reg_addr):
    """One phone of `user` registers at reg_addr; returns the port it registered from, which
    its later sipp (UAS or UAC) must use: an ordinary node takes calls out only from its own
    phones, known by the address they registered from (docs/sip.md)."""
    port = harness.free_port()
    p = Sipp(wdir, "reg-%s-%d" % (user, port), "register.xml", port, reg_addr,
             rate=1, count=1, inf=users_csv(os.path.join(wdir, user + ".csv"), [user]),
             keys=(("domain", DOMAIN), ("expires", 3600)), timeout=20)
    r = p.wait(30)
    if r["ok"] != 1:
        raise RuntimeError("%s: %s could not register (%s); see %s" % (tgt.name, user, r, p.dir))
    return port


def register_phones(tgt, wdir, pairs):
    """Each callee's phone registers from the port its UAS will answer on, each caller's from
    the port its UAC will call from (at its proxy)."""
    callee_ports, caller_ports = [], []
    for caller, callee, proxy, reg_addr in pairs:
        callee_ports.append(register_phone(tgt, wdir, callee, reg_addr))
        caller_ports.append(register_phone(tgt, wdir, caller, proxy))
    return callee_ports, caller_ports


def call_step(tgt, wdir, pairs, ports, rate, count, trace=False, tag=""):
    ports, caller_ports = ports
    uas, uac = [], []
    per_rate, per_count = rate / len(pairs), max(1, count // len(pairs))
    for (caller, callee, proxy, _), port in zip(pairs, ports):
        uas.append(Sipp(wdir, "%suas-%g-%s" % (tag, rate, callee), "uas_answer.xml", port,
                        count=per_count, timeout=int(per_count / per_rate * 3 + 60)))
    time.sleep(0.5)  # the UASes listen
    for (caller, callee, proxy, _), cport in zip(pairs, caller_ports):
        inf = users_csv(os.path.join(wdir, "callee-%s.csv" % callee), [callee])
        uac.append(Sipp(wdir, "%suac-%g-%s" % (tag, rate, caller), "uac_call.xml",
                        cport, proxy, rate=per_rate, count=per_count, inf=inf,
                        service=caller, keys=(("domain", DOMAIN),), trace_msg=trace,
                        timeout=int(per_count / per_rate * 3 + 60)))
    res = [p.wait(per_count / per_rate * 3 + 90) for p in uac]
    for p in uas:  # the last BYEs are answered by now; the rest is the UAS's own timeout
        p.wait(5)
    a = aggregate(res)
    a.update(target=rate, pairs=len(pairs))
    if trace:
        times = []
        for p in uac:
            times += invite_200_times(os.path.join(p.dir, "messages.log"))
        a["invite_200_ms"] = sorted(times)
    return a


def call_phase(tgt, wdir, args):
    pairs = tgt.call_pairs(args.call_pairs)
    ports = register_phones(tgt, wdir, pairs)
    out = {"steps": [], "best": None}
    # latency first, on a quiet system, one pair
    lat = call_step(tgt, wdir, pairs[:1], (ports[0][:1], ports[1][:1]), args.lat_rate,
                    args.lat_calls, trace=True, tag="lat-")
    ts = lat.pop("invite_200_ms")
    lat["n_times"] = len(ts)
    if ts:
        q = statistics.quantiles(ts, n=100) if len(ts) > 2 else [ts[0]] * 99
        lat.update(median_ms=statistics.median(ts), p10_ms=q[9], p90_ms=q[89],
                   p99_ms=q[98], min_ms=ts[0], max_ms=ts[-1])
    out["latency"] = lat
    say("%s INVITE->200 at %g calls/s: median %s ms (p90 %s), %d ok, %d failed", tgt.name,
        args.lat_rate, "%.3f" % lat["median_ms"] if ts else "?",
        "%.3f" % lat["p90_ms"] if ts else "?", lat["ok"], lat["not_ok"])
    time.sleep(1)
    for rate in args.call_rates:
        s = call_step(tgt, wdir, pairs, ports, rate, int(rate * args.step_s))
        s["ok_step"] = s["not_ok"] == 0 and s["rate"] >= 0.9 * rate
        out["steps"].append(s)
        say("%s calls target %g/s: %d ok, %d failed, %.0f/s achieved, INVITE->200 ~%s ms "
            "(sipp's ms clock)%s", tgt.name, rate, s["ok"], s["not_ok"], s["rate"],
            s["rtt_ms_coarse"], "" if s["ok_step"] else "  <- does not count")
        if s["ok_step"]:
            out["best"] = s
        if s["not_ok"] > 0:
            break
        time.sleep(1)
    return out


def run_target(cls, args, tmp):
    wdir = os.path.join(tmp, cls.name + "-sipp")
    os.makedirs(wdir, exist_ok=True)
    tgt = None
    res = {"target": cls.name}
    try:
        tgt = cls(tmp, args)
        if not args.no_register:
            if isinstance(tgt, Overlay):
                c0 = tgt.counters(tgt.reg_users)
            res["register"] = register_phase(
                tgt, wdir, args, args.reg_rates_fe if isinstance(tgt, Frontend) else
                args.reg_rates_on if isinstance(tgt, Overlay) else args.reg_rates_kam)
            if isinstance(tgt, Overlay):
                c1 = tgt.counters(tgt.reg_users)
                res["register"]["node_counters"] = {k: c1[k] - c0.get(k, 0) for k in c1}
        if not args.no_calls and not isinstance(tgt, Frontend):  # same calls as "overlay"
            res["calls"] = call_phase(tgt, wdir, args)
            if isinstance(tgt, Overlay):
                res["calls"]["node_counters"] = tgt.counters(
                    [u for p in tgt.pairs for u in p])
        if isinstance(tgt, Overlay):
            res["log_evidence"] = tgt.log_evidence()
    finally:
        if tgt:
            if args.keep and isinstance(tgt, Overlay):
                tgt.save_logs(os.path.join(args.keep, "overlay-logs"))
            tgt.close()
        if args.keep:
            shutil.copytree(wdir, os.path.join(args.keep, cls.name + "-sipp"), dirs_exist_ok=True)
            if isinstance(tgt, Kamailio):
                shutil.copy(os.path.join(tgt.dir, "kamailio.log"), args.keep)
    return res


# ---- report ------------------------------------------------------------------------------------


def summary(res):
    reg = res.get("register") or {}
    calls = res.get("calls") or {}
    best_reg = reg.get("best")
    closed = reg.get("closed")
    best_call = calls.get("best")
    lat = calls.get("latency") or {}
    return {"reg_open": best_reg["rate"] if best_reg else None,
            "reg_closed": closed["rate"] if closed and closed["not_ok"] == 0 else
            (closed["rate"] if closed else None),
            "reg_closed_not_ok": closed["not_ok"] if closed else None,
            "calls": best_call["rate"] if best_call else None,
            "inv200": lat.get("median_ms")}


def fmt(v, f="%.0f"):
    return "-" if v is None else f % v


def print_table(results):
    rows = [("target", "REGISTER/s (open loop, 0 fail)", "REGISTER/s (closed loop)",
             "calls/s (0 fail)", "median INVITE->200 ms")]
    sums = {}
    for r in results:
        s = summary(r)
        sums[r["target"]] = s
        closed = fmt(s["reg_closed"])
        if s["reg_closed_not_ok"]:
            closed += " (%d not ok)" % s["reg_closed_not_ok"]
        rows.append((r["target"], fmt(s["reg_open"]), closed, fmt(s["calls"]),
                     fmt(s["inv200"], "%.3f")))
    def ratio(a, b, f="%.2f"):
        return fmt(a / b if a is not None and b else None, f)
    for ours in ("overlay", "frontend"):
        if ours in sums and "kamailio" in sums:
            o, k = sums[ours], sums["kamailio"]
            rows.append(("%s / kamailio" % ours,
                         ratio(o["reg_open"], k["reg_open"]) + " (aim >= 0.25)",
                         ratio(o["reg_closed"], k["reg_closed"]) + " (aim >= 0.25)",
                         ratio(o["calls"], k["calls"]) + " (aim >= 0.5)",
                         ratio(o["inv200"], k["inv200"]) + " (aim <= 2)"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w[j]) for j, c in enumerate(r)))
        if i == 0:
            print("-+-".join("-" * x for x in w))
    for r in results:
        reg = r.get("register") or {}
        for s in reg.get("steps", []):
            print("  %s REGISTER target %6g/s: %7.0f/s ok, %d not ok (500: %d, 503: %d)%s"
                  % (r["target"], s["target"], s["rate"], s["not_ok"], s["r500"], s["r503"],
                     "" if s["ok_step"] else "  (does not count)"))
        for s in (r.get("calls") or {}).get("steps", []):
            print("  %s calls    target %6g/s: %7.0f/s ok, %d not ok, INVITE->200 ~%s ms "
                  "(sipp ms clock)%s" % (r["target"], s["target"], s["rate"], s["not_ok"],
                                         s["rtt_ms_coarse"], "" if s["ok_step"] else
                                         "  (does not count)"))
        lat = (r.get("calls") or {}).get("latency")
        if lat and lat.get("n_times"):
            print("  %s INVITE->200 at %g calls/s: median %.3f ms, p10 %.3f, p90 %.3f, p99 %.3f "
                  "(n=%d, %d not ok)" % (r["target"], lat["target"], lat["median_ms"],
                                         lat["p10_ms"], lat["p90_ms"], lat["p99_ms"],
                                         lat["n_times"], lat["not_ok"]))
        if r.get("register", {}).get("node_counters"):
            print("  %s REGISTER nodes' counters: %s" % (r["target"],
                                                       r["register"]["node_counters"]))
        if r.get("log_evidence"):
            print("  %s log lines: %s" % (r["target"], r["log_evidence"]))


def rates(text):
    return [float(x) for x in text.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overlay", action="store_true", help="measure our overlay")
    ap.add_argument("--kamailio", action="store_true", help="measure Kamailio (default: both)")
    ap.add_argument("--bindir", default=os.path.join(ROOT, "build-release"),
                    help="build directory with the daemons (default: build-release)")
    ap.add_argument("--step-s", type=float, default=5, help="seconds per rate step (5)")
    ap.add_argument("--reg-rates-on", type=rates, default=rates("200,400,800,1600,2400,3200,4800"),
                    help="overlay REGISTER/s steps, in total over --reg-ons nodes")
    ap.add_argument("--reg-rates-kam", type=rates,
                    default=rates("2000,5000,10000,15000,20000,25000"),
                    help="Kamailio REGISTER/s steps, in total")
    ap.add_argument("--reg-closed-s", type=float, default=5,
                    help="seconds of the closed-loop REGISTER step (0: none)")
    ap.add_argument("--reg-window-on", type=int, default=1,
                    help="REGISTERs outstanding per sipp in the closed-loop step, overlay (1: "
                         "as a phone does)")
    ap.add_argument("--frontend", action="store_true",
                    help="measure REGISTERs of many users at a super node's public front end")
    ap.add_argument("--reg-rates-fe", type=rates,
                    default=rates("200,400,800,1200,1600,2400,3200"),
                    help="front end REGISTER/s steps, in total")
    ap.add_argument("--reg-window-fe", type=int, default=20,
                    help="REGISTERs outstanding per sipp in the closed-loop step, front end (20)")
    ap.add_argument("--fe-streams", type=int, default=2,
                    help="sipp instances registering at the front end at once (2)")
    ap.add_argument("--fe-users", type=int, default=20000,
                    help="distinct users per front end REGISTER stream (20000)")
    ap.add_argument("--sip-rate", type=int, default=1000000,
                    help="the daemons' sip_rate, SIP messages/s per source address (bench "
                         "default 1000000, lifted: on 127.0.0.1 every phone and node is one "
                         "source; the daemons' default is 200)")
    ap.add_argument("--reg-window-kam", type=int, default=50,
                    help="the same for Kamailio (50)")
    ap.add_argument("--reg-ons", type=int, default=8,
                    help="ordinary nodes registering at once, one sipp each (8)")
    ap.add_argument("--kam-streams", type=int, default=2,
                    help="sipp instances registering at Kamailio at once (2)")
    ap.add_argument("--kam-users", type=int, default=50000,
                    help="distinct users per Kamailio REGISTER stream (50000)")
    ap.add_argument("--kam-children", type=int, default=4, help="Kamailio UDP workers (4)")
    ap.add_argument("--kam-shm-mb", type=int, default=512, help="Kamailio shared memory (512)")
    ap.add_argument("--call-rates", type=rates, default=rates("100,200,300,400,500,750,1000,1500,2000"),
                    help="calls/s steps, in total over the pairs")
    ap.add_argument("--call-pairs", type=int, default=8,
                    help="caller/callee pairs (one UAC and one UAS sipp each; overlay: two "
                         "ordinary nodes each) (8)")
    ap.add_argument("--lat-rate", type=float, default=20, help="calls/s of the latency step (20)")
    ap.add_argument("--lat-calls", type=int, default=200, help="calls of the latency step (200)")
    ap.add_argument("--sns", type=int, default=3, help="super nodes (3; replication is 3)")
    ap.add_argument("--sn-on-rate", type=int, default=1000000,
                    help="super nodes' on_rate, requests/s per attached node (bench default "
                         "1000000, lifted; the daemon's default is 50)")
    ap.add_argument("--sn-on-inflight", type=int, default=32,
                    help="super nodes' on_inflight (32, the daemon's default)")
    ap.add_argument("--log-level", default="info",
                    help="log_level of the super and ordinary nodes (info, their default; the "
                         "set-up waits for info lines, so nothing quieter works)")
    ap.add_argument("--no-register", action="store_true", help="skip the REGISTER loads")
    ap.add_argument("--no-calls", action="store_true", help="skip the call loads")
    ap.add_argument("--json-out", help="write every step's figures to this file")
    ap.add_argument("--keep", help="copy sipp's files, the daemons' and kamailio's logs here")
    args = ap.parse_args()
    if not shutil.which("sipp"):
        sys.exit("sipp not found: apt-get install sip-tester")
    targets = []
    every = not (args.overlay or args.kamailio or args.frontend)
    if args.overlay or every:
        targets.append(Overlay)
    if args.frontend or every:
        targets.append(Frontend)
    if args.kamailio or every:
        targets.append(Kamailio)
    if (Overlay in targets or Frontend in targets) and not os.path.exists(os.path.join(args.bindir, "ordinarynode",
                                                              "ordinarynode")):
        sys.exit("no daemons under %s: scripts/build.sh release first" % args.bindir)
    tmp = tempfile.mkdtemp(prefix="p2psip-sipbench-")
    _tmpdirs.append(tmp)
    results = []
    for cls in targets:
        say("---- %s ----", cls.name)
        results.append(run_target(cls, args, tmp))
        time.sleep(2)
    print_table(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
