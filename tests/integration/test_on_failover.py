#!/usr/bin/env python3
"""500 ordinary nodes (250 in a sanitizer build) (bench/on_swarm: the daemon's own core, 500 instances in one process)
attached to one super node of three; that super node is SIGKILLed. Every node must attach
elsewhere, the nodes must spread over both survivors, and the reconnections must be spread in
time (the jittered back-off of docs/operations.md), not one synchronized spike."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "swarm.p2psip"
# Under the sanitizers (scripts/test.sh sets ASAN_OPTIONS) every handshake costs several times
# more: fewer nodes, and only the spread is judged, not how fast 2 cores get through them.
SANITIZED = "ASAN_OPTIONS" in os.environ
NODES = 250 if SANITIZED else 500
WAIT = 120 if SANITIZED else 60


class Swarm:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True)
        self.events = []  # (time seen here, event)
        self.err = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            e = json.loads(line)
            with self.cv:
                self.events.append((time.monotonic(), e))
                self.cv.notify_all()

    def attached_now(self):
        """node -> its latest attachment event."""
        with self.cv:
            last = {}
            for t, e in self.events:
                last[e["node"]] = (t, e)
            return last

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
            raise AssertionError("on_swarm did not stop within 30 s")


class Failover(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="p2psip-swarm-")
        self.daemons = []
        self.swarm = None
        self.addCleanup(self.cleanup)

    def cleanup(self):
        if self.swarm:
            self.swarm.stop()
        for d in reversed(self.daemons):
            d.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def bin(self, name, sub=None):
        return os.path.join(BINDIR, sub or name, name)

    def test_500_nodes_spread_after_their_super_node_dies(self):
        ls_port = harness.free_port()
        cfg = os.path.join(self.tmp, "ls.json")
        with open(cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % ls_port,
                       "state_dir": os.path.join(self.tmp, "ls"), "pbkdf2_iterations": 1000,
                       "stabilize_s": 1}, f)
        ls = [self.bin("loginserver"), "-c", cfg]
        subprocess.run(ls + ["init"], capture_output=True, text=True, check=True)
        nodes_dir = os.path.join(self.tmp, "nodes")
        p = subprocess.run(ls + ["issue", "--node", "sn", "--count", "3", "--out",
                                 os.path.join(self.tmp, "sns")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        p = subprocess.run(ls + ["issue", "--node", "on", "--count", str(NODES), "--no-supernode",
                                 "--out", nodes_dir], capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        addr, sn, ids = {}, {}, {}
        for i in (1, 2, 3):
            u = "sn%d" % i
            addr[u] = "127.0.0.1:%d" % harness.free_port()
            argv = [self.bin("supernode"), "-d", "-o", "overlay=" + OVERLAY,
                    "-o", "state_dir=" + os.path.join(self.tmp, "sns", u),
                    "-o", "listen=" + addr[u], "-o", "stun_listen=127.0.0.1:0",
                    # the 500 nodes stand for 500 hosts but all connect from 127.0.0.1
                    "-o", "max_handshaking_per_address=%d" % (2 * NODES)]
            argv += ["-o", "seed=true"] if i == 1 else ["-o", "join=" + addr["sn1"]]
            sn[u] = harness.Daemon(argv)
            self.daemons.append(sn[u])
            line = sn[u].wait_for("as node ", timeout=WAIT)
            ids[re.search(r"as node ([0-9a-f]{40})", line).group(1)] = u
            sn[u].wait_for("started a new ring" if i == 1 else "joined the ring", timeout=WAIT)
        # The whole ring first: the alternates an attach answer gives are the ring neighbours
        # sn1 knows, and a CI run started the nodes while sn1 knew only one of the two others
        # (482 of 500 then moved to that one).
        def full_ring():
            for i in (1, 2, 3):
                p = subprocess.run([self.bin("supernode"), "-o", "overlay=" + OVERLAY,
                                    "-o", "state_dir=" + os.path.join(self.tmp, "sns", "sn%d" % i),
                                    "status", "--json"], capture_output=True, text=True,
                                   timeout=30)
                if p.returncode != 0 or len(json.loads(p.stdout).get("succ", [])) != 2:
                    return False
            return True
        harness.wait_until("a ring of three", full_ring, WAIT)
        # sn1 first in every node's list: all attach there.
        self.swarm = Swarm(harness.WRAPPER + [self.bin("on_swarm", "bench"), "--base", nodes_dir,
                                              "--prefix", "on", "--count", str(NODES),
                                              "--supernodes", ",".join(addr[u] for u in
                                                                       ("sn1", "sn2", "sn3"))])
        harness.wait_until("%d nodes attached" % NODES,
                           lambda: len(self.swarm.attached_now()) == NODES, WAIT)
        first = self.swarm.attached_now()
        count = {}
        for _, e in first.values():
            count[ids[e["sn"]]] = count.get(ids[e["sn"]], 0) + 1
        # sn1 is first in every list; nodes whose handshake queued past attach_timeout_ms (a
        # slow build) went on to the next: the victim is the node holding most of them.
        victim = max(count, key=count.get)
        moved = {n for n, (_, e) in first.items() if ids[e["sn"]] == victim}
        self.assertGreaterEqual(len(moved), NODES // 2, count)
        # The alternates reach the host caches with the attach answers; give the victim's
        # neighbours a stabilisation period to tell it their load first.
        time.sleep(1.5)

        t_kill = time.monotonic()
        sn[victim].proc.kill()
        harness.wait_until(
            "all %d nodes of %s re-attached" % (len(moved), victim),
            lambda: all(self.swarm.attached_now()[n][0] > t_kill for n in moved), WAIT)
        now = self.swarm.attached_now()
        delays = sorted(now[n][0] - t_kill for n in moved)
        per_sn = {}
        for n in moved:
            u = ids[now[n][1]["sn"]]
            per_sn[u] = per_sn.get(u, 0) + 1
        buckets = {}
        for d in delays:
            buckets[int(d * 10)] = buckets.get(int(d * 10), 0) + 1
        q = lambda f: delays[int(f * (len(delays) - 1))]  # noqa: E731
        print("\n    %d nodes of %s re-attached: %s; delay p10 %.2f s, median %.2f s, p90 %.2f s, "
              "max %.2f s; busiest 100 ms: %d nodes" % (len(moved), victim, per_sn, q(0.1),
                                                         q(0.5), q(0.9), delays[-1],
                                                         max(buckets.values())))
        self.assertNotIn(victim, per_sn)
        # Spread over both survivors...
        for u in set(("sn1", "sn2", "sn3")) - {victim}:
            self.assertGreaterEqual(per_sn.get(u, 0), len(moved) // 4, per_sn)
        # ... and over time: no synchronized spike (a uniform draw from [0, 1 s) puts about a
        # tenth in each 100 ms), the middle half spans a good part of the back-off window.
        # Under the sanitizers the survivors' TLS handshakes are several times slower and the
        # attach answers leave their queue in bursts (a CI run: 70 of 250 in the last 100 ms,
        # all after the 1 s back-off window): completion times are judged more loosely there.
        limit = len(moved) // 3 if SANITIZED else len(moved) // 4
        self.assertLessEqual(max(buckets.values()), limit, sorted(buckets.items()))
        self.assertGreaterEqual(q(0.75) - q(0.25), 0.2)
        if not SANITIZED:
            self.assertLess(q(0.5), 10.0)  # the handshakes of 500 nodes queue on 2 cores
        self.assertEqual(self.swarm.stop(), 0, "".join(self.swarm.err[-20:]))
        self.swarm = None


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
