#!/usr/bin/env python3
"""TURN relay benchmark: the super node's relay (supernode/turn.c) against coturn's
`turnserver`, same scenario, same run, alternating.

Both servers run on 127.0.0.1 with the same kind of credentials (the "TURN REST API" scheme),
loopback peers allowed, no bandwidth limit and no per-user quota, coturn with one relay thread
(--relay-threads 1) so that both relay on one core.

1. Throughput: a Python sender pushes ChannelData (4 allocations, one channel each, to one
   Python peer socket that counts what arrives) for --seconds, once as fast as it can ("max")
   and once paced to --paced packets/s. Figures: packets/s relayed to the peer (wall clock),
   packets per CPU-second of the server process (utime+stime from /proc, until the peer has
   been idle: sender, counter and server share the machine's 2 cores, so this is the fairer
   figure), and the server's CPU share at the paced rate (same offered load for both).
2. Memory: RSS growth of the server process over N allocations made by a Python client (one
   UDP socket each), per allocation. Kernel socket buffers are not in RSS (same for both).

Run: python3 bench/turn_bench.py --bindir build [--rounds 3] [--allocs 1000]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
import harness  # noqa: E402
import test_turn  # noqa: E402  (its Python TURN client)

OVERLAY = "bench.turn"
SECRET = "bench-secret-" + os.urandom(8).hex()
NODE = "ab" * 20


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Ours(harness.OverlayScenario):
    daemons = []
    name = "ours (supernode)"

    @classmethod
    def node_conf(cls, u, conf):
        conf.update({"stun_listen": "127.0.0.1:%d" % cls.port, "turn_bandwidth_kbps": 0,
                     "turn_allocations_per_node": 10000, "turn_max_allocations": 100000,
                     "turn_allow_peers": ["127.0.0.0/8"]})

    def start_server(self, tmp):
        type(self).tmp = tmp
        type(self).port = harness.free_udp_port()
        self.build_overlay(OVERLAY, ("sn1",), (), wait=30)
        self.pid = self.sn["sn1"].proc.pid

    def creds(self):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn1"], "turn-credentials",
                            NODE], capture_output=True, text=True, timeout=30, check=True)
        c = json.loads(p.stdout)
        return c["username"], c["password"]

    def stop(self):
        self.stop_all()


class Coturn:
    name = "coturn (turnserver)"

    def start_server(self, tmp):
        self.port = harness.free_udp_port()
        self.dir = os.path.join(tmp, "coturn")
        os.makedirs(self.dir, exist_ok=True)
        argv = ["turnserver", "-n", "--listening-ip", "127.0.0.1", "--listening-port",
                str(self.port), "--relay-ip", "127.0.0.1", "--relay-threads", "1",
                "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", OVERLAY,
                "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli",
                "--min-port", "49152", "--max-port", "65535",
                "--log-file", os.path.join(self.dir, "turn.log"), "--simple-log",
                "--pidfile", os.path.join(self.dir, "turn.pid"),
                "--userdb", os.path.join(self.dir, "turndb"), "--no-stdout-log"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # answers a Binding request once up
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.2)
            try:
                s.sendto(test_turn.build(test_turn.BINDING, 0), ("127.0.0.1", self.port))
                s.recvfrom(2048)
                return
            except OSError:
                time.sleep(0.2)
            finally:
                s.close()
        raise RuntimeError("turnserver did not start (see %s)" % self.dir)

    def creds(self):
        user = "%d:%s" % (time.time() + 3600, NODE)
        pw = base64.b64encode(hmac.new(SECRET.encode(), user.encode(), hashlib.sha1).digest())
        return user, pw.decode()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


COUNTER = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.settimeout(1.5)
n = nbytes = 0
try:
    while True:
        d = s.recv(4096)
        n += 1
        nbytes += len(d)
except socket.timeout:
    pass
print(n, nbytes)
"""


def throughput(srv, seconds, size, rate, allocs=4):
    """ChannelData from `allocs` allocations to one peer socket for `seconds`, as fast as
    Python sends (rate None) or paced to `rate` packets/s; packets the peer got, the server's
    CPU seconds (until the peer has been idle 1.5 s, so a backlog is paid for too)."""
    import struct
    user, pw = srv.creds()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): count it all
    pip, pport = peer.getsockname()
    counter = subprocess.Popen([sys.executable, "-c", COUNTER, str(peer.fileno())],
                               pass_fds=[peer.fileno()], stdout=subprocess.PIPE, text=True)
    clients, frames = [], []
    for i in range(allocs):
        c = test_turn.TurnClient(("127.0.0.1", srv.port), user, pw)
        assert c.allocate()[0] == 0
        assert c.channel(0x4000 + i, pip, pport)[0] == 0
        c.sock.setblocking(True)
        clients.append(c)
        frames.append((c.sock, struct.pack(">HH", 0x4000 + i, size) + b"p" * size))
    dest = ("127.0.0.1", srv.port)
    cpu0 = cpu_seconds(srv.pid)
    t0 = time.monotonic()
    sent = 0
    end = t0 + seconds
    batch = 64
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if rate and sent >= (now - t0) * rate:
            time.sleep(0.0005)
            continue
        for sock, f in frames:
            for _ in range(batch // len(frames)):
                sock.sendto(f, dest)
        sent += batch // len(frames) * len(frames)
    wall = time.monotonic() - t0
    got, _ = counter.communicate(timeout=60)
    cpu = cpu_seconds(srv.pid) - cpu0
    peer.close()
    for c in clients:
        c.sock.settimeout(2.0)
        c.refresh(0)
        c.close()
    recv = int(got.split()[0])
    return {"sent": sent, "relayed": recv, "wall_s": wall, "cpu_s": cpu,
            "offered_pps": sent / wall, "relayed_pps": recv / wall}


def memory(srv, n):
    user, pw = srv.creds()
    clients = []
    warm = test_turn.TurnClient(("127.0.0.1", srv.port), user, pw)
    assert warm.allocate()[0] == 0
    clients.append(warm)
    time.sleep(0.5)
    before = rss_kib(srv.pid)
    for i in range(n):
        c = test_turn.TurnClient(("127.0.0.1", srv.port), user, pw)
        code, a = c.allocate()
        if code != 0:
            raise RuntimeError("%s: allocation %d: %s %r" % (srv.name, i, code, a))
        clients.append(c)
    time.sleep(0.5)
    after = rss_kib(srv.pid)
    for c in clients:
        c.refresh(0)
        c.close()
    return {"rss_before_kib": before, "rss_after_kib": after,
            "per_alloc_bytes": (after - before) * 1024.0 / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bindir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=160, help="payload bytes (160: 20 ms of G.711)")
    ap.add_argument("--paced", type=int, default=20000, help="packets/s of the paced run")
    ap.add_argument("--allocs", type=int, default=1000)
    args = ap.parse_args()
    harness.BINDIR = os.path.abspath(args.bindir)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.allocs + 256)), hard))
    tmp = tempfile.mkdtemp(prefix="p2psip-turnbench-")
    servers = [Ours(), Coturn()]
    results = {s.name: {"tp": [], "mem": []} for s in servers}
    try:
        for s in servers:
            s.start_server(tmp)
        time.sleep(0.5)
        for r in range(args.rounds):
            for s in servers:  # alternating, same round
                for mode, rate in (("max", None), ("paced", args.paced)):
                    tp = throughput(s, args.seconds, args.size, rate)
                    tp["mode"] = mode
                    results[s.name]["tp"].append(tp)
                    print("round %d %-20s %-6s offered %7.0f pkt/s, relayed %7.0f pkt/s "
                          "(%d of %d), server %5.2f CPU-s" % (
                              r + 1, s.name, mode, tp["offered_pps"], tp["relayed_pps"],
                              tp["relayed"], tp["sent"], tp["cpu_s"]), flush=True)
        for s in servers:
            m = memory(s, args.allocs)
            results[s.name]["mem"].append(m)
            print("memory %-22s RSS %d -> %d KiB over %d allocations" % (
                s.name, m["rss_before_kib"], m["rss_after_kib"], args.allocs), flush=True)
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001  (report, keep stopping the others)
                print("stopping %s: %s" % (s.name, e), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("TURN relay, ChannelData of %d bytes from 4 allocations to one peer, %d s per run, "
          "median of %d rounds (alternating); memory: RSS growth over %d allocations" % (
              args.size, args.seconds, args.rounds, args.allocs))
    print("%-20s %14s %14s %16s %16s %16s" % (
        "server", "max pkt/s", "max pkt/CPU-s", "paced pkt/s", "paced CPU %", "bytes/alloc"))
    for name, r in results.items():
        mx = [t for t in r["tp"] if t["mode"] == "max"]
        pc = [t for t in r["tp"] if t["mode"] == "paced"]
        print("%-20s %14.0f %14.0f %16.0f %16.1f %16.0f" % (
            name, statistics.median(t["relayed_pps"] for t in mx),
            statistics.median(t["relayed"] / t["cpu_s"] if t["cpu_s"] > 0 else 0 for t in mx),
            statistics.median(t["relayed_pps"] for t in pc),
            statistics.median(100.0 * t["cpu_s"] / t["wall_s"] for t in pc),
            statistics.median(m["per_alloc_bytes"] for m in r["mem"])))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
