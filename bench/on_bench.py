#!/usr/bin/env python3
"""Many ordinary nodes on one super node: memory per attached node and requests
per second with them all attached (docs/benchmarks.md, "ordinary nodes").

Sets up a login server, mints one identity per simulated node (loginserver
issue --node, into /dev/shm), starts one super node (a ring of one, so every
request is served by it) and runs bench/on_load against it with --hold: the
report comes once every node is attached and the timed request mix is done,
and while the links are still held this script reads the super node's
resident memory. Cleans up everything it started.

  python3 bench/on_bench.py --bindir build-release --nodes 10000 --rate 0.5 --duration 20
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

OVERLAY = "onbench.p2psip"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bindir", default="build-release")
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=0.5, help="requests/s per node")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--mix", default="get:80,update:20")
    args = ap.parse_args()
    b = os.path.abspath(args.bindir)
    tmp = tempfile.mkdtemp(prefix="p2psip-onbench-")
    shm = tempfile.mkdtemp(prefix="p2psip-onbench-", dir="/dev/shm")
    procs = []
    try:
        cfg = os.path.join(tmp, "ls.json")
        with open(cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "state_dir": os.path.join(tmp, "ls"),
                       "pbkdf2_iterations": 1000, "keepalive_s": 30}, f)
        ls = [os.path.join(b, "loginserver", "loginserver"), "-c", cfg]
        subprocess.run(ls + ["init"], check=True, capture_output=True)
        t0 = time.monotonic()
        subprocess.run(ls + ["issue", "--node", "sn", "--out", tmp], check=True,
                       capture_output=True)
        subprocess.run(ls + ["issue", "--node", "on", "--count", str(args.nodes),
                             "--no-supernode", "--out", shm], check=True, capture_output=True)
        print("minted %d identities in %.1f s" % (args.nodes, time.monotonic() - t0))
        addr = "127.0.0.1:%d" % free_port()
        sncfg = os.path.join(tmp, "sn.json")
        with open(sncfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": addr, "state_dir": os.path.join(tmp, "sn"),
                       "seed": True, "log_level": "warn", "stun_listen": "127.0.0.1:0",
                       "max_attached": args.nodes + 100,
                       "max_connections": args.nodes + 200,
                       # all simulated nodes share 127.0.0.1 (per-address bound: 64)
                       "max_handshaking": args.nodes + 200,
                       "max_handshaking_per_address": args.nodes + 200}, f)
        sn = subprocess.Popen([os.path.join(b, "supernode", "supernode"), "-d", "-c", sncfg],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(sn)
        time.sleep(1.0)
        before = rss_kb(sn.pid)
        load = subprocess.Popen([os.path.join(b, "bench", "on_load"), "--creds-dir", shm,
                                 "--sn", addr, "--nodes", str(args.nodes), "--duration",
                                 str(args.duration), "--rate", str(args.rate), "--mix", args.mix,
                                 "--json", "--hold"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(load)
        report = json.loads(load.stdout.readline())
        time.sleep(1.0)
        held = rss_kb(sn.pid)
        load.send_signal(signal.SIGTERM)
        load.wait(timeout=120)
        conns, reqs = report["connections"], report["requests"]
        attached = conns["attached_at_end"]
        print("nodes attached: %d of %d (verdict: %s)" % (attached, args.nodes,
                                                           report.get("verdict")))
        print("super node memory: %d kB before, %d kB with them attached: %.1f KiB per node"
              % (before, held, (held - before) / max(attached, 1)))
        print("timed phase: %s" % json.dumps(reqs, sort_keys=True))
        print("connect: %s" % json.dumps({k: conns[k] for k in ("handshake_ms",
                                                                  "connects_per_second")}))
        mem = report.get("memory")
        if mem:
            print("on_load memory: %s" % json.dumps(mem))
        return 0 if report.get("ok") else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
