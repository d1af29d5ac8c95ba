#!/usr/bin/env python3
"""Ordinary node start-up and failover (issue 7's benchmark), on real daemons on 127.0.0.1.

Sets up a login server and three super nodes in a temporary directory, enrolls one ordinary
node, then:
  - start: N times, `ordinarynode -d` with its host cache (as after a first run), timed from
    the fork to the log line "published user location" (the record stored and replicated);
  - failover: N times, SIGKILL of the super node the node is attached to (restarted after),
    timed from the kill to the node's record naming another super node's attachment in its
    log ("attached to super node").
Prints medians and quartiles; --json-out writes every sample.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

OVERLAY = "bench.p2psip"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, argv):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True)
        self.lines = []  # (monotonic time seen, line)
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cv.notify_all()

    def wait_for(self, text, timeout=20, after=0):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, l in self.lines[after:]:
                    if text in l:
                        return t, l
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("no %r within %.0f s:\n%s" % (
                        text, timeout, "\n".join(l for _, l in self.lines[-20:])))
                self.cv.wait(min(left, 0.1))

    def stop(self, sig=signal.SIGTERM):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)


def quart(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return "median %.1f ms (quartiles %.1f - %.1f, min %.1f, max %.1f; n=%d)" % (
        q[1], q[0], q[2], xs[0], xs[-1], len(xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bindir", default="build-release")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    b = lambda n: os.path.join(os.path.abspath(a.bindir), n, n)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="p2psip-onstart-")
    procs = []
    try:
        ls_port = free_port()
        cfg = os.path.join(tmp, "ls.json")
        with open(cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % ls_port,
                       "state_dir": os.path.join(tmp, "ls"), "pbkdf2_iterations": 1000,
                       "stabilize_s": 1}, f)
        ls = [b("loginserver"), "-c", cfg]
        out = subprocess.run(ls + ["init"], capture_output=True, text=True, check=True).stdout
        pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        sns = ["sn1", "sn2", "sn3"]
        for u in sns + ["user"]:
            subprocess.run(ls + ["user", "add", u] + (["--no-supernode"] if u == "user" else []),
                           input="password-" + u + "\n", text=True, capture_output=True, check=True)
        p = Proc(ls + ["-d"])
        procs.append(p)
        p.wait_for("serving on")
        addr, cfgs = {}, {}
        for u in sns + ["user"]:
            d = os.path.join(tmp, u)
            prog = "ordinarynode" if u == "user" else "supernode"
            subprocess.run([b(prog), "-o", "state_dir=" + d, "-o", "overlay=" + OVERLAY,
                            "enroll", "--login", "https://127.0.0.1:%d" % ls_port, "--pin", pin,
                            "--user", u], input="password-" + u + "\n", text=True,
                           capture_output=True, check=True)
            conf = {"overlay": OVERLAY, "state_dir": d, "log_level": "info"}
            if u != "user":
                addr[u] = "127.0.0.1:%d" % free_port()
                conf.update({"listen": addr[u], "stun_listen": "127.0.0.1:0"})
                if u == "sn1":
                    conf["seed"] = True
                else:
                    conf["join"] = [addr["sn1"]]
            else:
                conf.update({"supernodes": [addr[s] for s in sns],
                             "sip_listen": "127.0.0.1:%d" % free_port()})
            cfgs[u] = os.path.join(tmp, u + ".json")
            with open(cfgs[u], "w") as f:
                json.dump(conf, f)
        sn = {}
        for u in sns:
            sn[u] = Proc([b("supernode"), "-d", "-c", cfgs[u]])
            procs.append(sn[u])
            sn[u].wait_for("started a new ring" if u == "sn1" else "joined the ring")
        time.sleep(3)  # ring settles
        on_argv = [b("ordinarynode"), "-d", "-c", cfgs["user"]]
        # First run fills the host cache; it is not counted.
        first = Proc(on_argv)
        first.wait_for("published user location")
        first.stop()
        start = []
        for _ in range(a.runs):
            p = Proc(on_argv)
            t, _line = p.wait_for("published user location")
            start.append((t - p.t0) * 1000)
            p.stop()
        print("start to record published: " + quart(start))
        failover = []
        on = Proc(on_argv)
        procs.append(on)
        on.wait_for("published user location")
        by_id = {}
        for u in sns:
            _, l = sn[u].wait_for("as node ")
            by_id[re.search(r"as node ([0-9a-f]{40})", l).group(1)[:8]] = u
        for _ in range(a.runs):
            with on.cv:
                l = [x for _, x in on.lines if "attached to super node" in x][-1]
            cur = by_id[re.search(r"attached to super node ([0-9a-f]{8})", l).group(1)]
            mark = len(on.lines)
            t0 = time.monotonic()
            sn[cur].stop(signal.SIGKILL)
            t, _ = on.wait_for("published user location", after=mark)
            failover.append((t - t0) * 1000)
            # Back to three super nodes before the next kill.
            sn[cur] = Proc([b("supernode"), "-d", "-c", cfgs[cur], "-o", "seed=false", "-o",
                            "join=" + ",".join(addr[s] for s in sns if s != cur)])
            procs.append(sn[cur])
            sn[cur].wait_for("joined the ring")
            time.sleep(2)
        print("SIGKILL of its super node to record published again: " + quart(failover))
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"start_ms": start, "failover_ms": failover}, f)
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
