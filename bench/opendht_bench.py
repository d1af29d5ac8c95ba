#!/usr/bin/env python3
"""The OpenDHT reference for the super node ring benchmark (docs/benchmarks.md).

Issue 5 compares our ring with OpenDHT 2.4 on this machine: 16 nodes on loopback, a get from
a node that stores none of the values (time to the first value) and signed puts per second.
This script measures that reference in the same session as bench/dht_bench.py, so that the
ratios are taken on one CPU:

  - installs Debian's `dhtnode` and `libopendht-c-dev` when they are missing (apt-get);
  - compiles bench/opendht_ref.c against libopendht-c into a temporary directory;
  - starts NODES-2 `dhtnode -s` processes on 127.0.0.1 (one network id, all bootstrapped
    through the first), then runs opendht_ref, which adds the last two nodes: a writer with a
    generated identity (signed puts, window 1 and W) and a reader that joins after the writes
    (gets of the stored keys in turn, window 1);
  - repeats that for --rounds rounds and prints the medians (and ranges) of the rounds.

Only processes this script started are stopped, by PID, also when it fails.

  python3 bench/opendht_bench.py [--nodes 16] [--rounds 3] [--gets 3000] [--json-out F]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def need_packages():
    missing = [p for p, probe in (("dhtnode", lambda: shutil.which("dhtnode")),
                                  ("libopendht-c-dev",
                                   lambda: os.path.exists("/usr/include/opendht/opendht_c.h")))
               if not probe()]
    if not missing:
        return
    print("installing %s (apt-get)" % " ".join(missing), flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q"] + missing, check=True, env=env,
                   stdout=subprocess.DEVNULL)


def build_ref(tmp):
    exe = os.path.join(tmp, "opendht_ref")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "opendht-c"], check=True,
                           capture_output=True, text=True).stdout.split()
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", exe,
                    os.path.join(HERE, "opendht_ref.c")] + flags + ["-lpthread"], check=True)
    return exe


def free_udp_ports(n):
    """n UDP ports that are free now, below the ephemeral range."""
    ports = []
    base = 20000 + (os.getpid() % 500) * 20
    p = base
    while len(ports) < n and p < 32000:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", p))
            ports.append(p)
        except OSError:
            pass
        finally:
            s.close()
        p += 1
    if len(ports) < n:
        sys.exit("opendht_bench: not enough free UDP ports")
    return ports


def one_round(args, exe, tmp, rnd):
    network = 4000 + rnd + (os.getpid() % 1000) * 10
    ports = free_udp_ports(args.nodes - 2)
    procs = []
    try:
        for i, p in enumerate(ports):
            cmd = ["dhtnode", "-s", "-n", str(network), "-p", str(p)]
            if i:
                cmd += ["-b", "127.0.0.1:%d" % ports[0]]
            log = open(os.path.join(tmp, "dhtnode-%d-%d.log" % (rnd, i)), "w")
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
        time.sleep(args.settle)
        for p in procs:
            if p.poll() is not None:
                sys.exit("opendht_bench: dhtnode exited with %s (logs in %s)" % (p.returncode,
                                                                                  tmp))
        out = subprocess.run([exe, "--bootstrap", "127.0.0.1:%d" % ports[0], "--network",
                              str(network), "--keys", str(args.keys), "--puts", str(args.puts),
                              "--gets", str(args.gets), "--window", str(args.window),
                              "--settle", str(args.settle), "--value-bytes",
                              str(args.value_bytes)],
                             capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            sys.exit("opendht_bench: opendht_ref failed (%d): %s" % (out.returncode, out.stderr))
        return json.loads(out.stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16, help="OpenDHT nodes in all (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (3)")
    ap.add_argument("--keys", type=int, default=3000,
                    help="keys written and then read in turn (3000: each read once, as "
                    "dht_bench.py reads each of its 3000 records once)")
    ap.add_argument("--puts", type=int, default=300, help="signed puts measured at window W")
    ap.add_argument("--gets", type=int, default=3000, help="gets measured, window 1 (3000)")
    ap.add_argument("--window", type=int, default=32, help="puts in flight (32)")
    ap.add_argument("--value-bytes", type=int, default=100, help="bytes of each value (100)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds for the network to form before measuring (3)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per round (600)")
    ap.add_argument("--json-out", help="also write the rounds and medians here")
    args = ap.parse_args()
    if args.nodes < 4:
        ap.error("--nodes must be at least 4")
    need_packages()
    tmp = tempfile.mkdtemp(prefix="opendht-bench-")
    exe = build_ref(tmp)
    rounds = []
    for rnd in range(args.rounds):
        r = one_round(args, exe, tmp, rnd)
        rounds.append(r)
        g = r["get_w1"]
        print("round %d: get first value median %.3f ms (p99 %.3f; key new to the reader %.3f, "
              "read before %.3f), signed puts %.0f/s (w1) %.0f/s (w%d)"
              % (rnd + 1, g["first_value_median_ms"], g["first_value_p99_ms"],
                 g["new_key"]["first_value_median_ms"], g["read_before"]["first_value_median_ms"],
                 r["put_signed_w1"]["per_s"], r["put_signed_w%d" % args.window]["per_s"],
                 args.window), flush=True)

    def summary(get):
        xs = [get(r) for r in rounds]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    res = {
        "opendht": rounds[0]["version"], "nodes": args.nodes, "rounds": rounds,
        "get_first_value_median_ms": summary(lambda r: r["get_w1"]["first_value_median_ms"]),
        "get_first_value_p99_ms": summary(lambda r: r["get_w1"]["first_value_p99_ms"]),
        "get_new_key_median_ms":
            summary(lambda r: r["get_w1"]["new_key"]["first_value_median_ms"]),
        "get_read_before_median_ms":
            summary(lambda r: r["get_w1"]["read_before"]["first_value_median_ms"]),
        "put_signed_w1_per_s": summary(lambda r: r["put_signed_w1"]["per_s"]),
        "put_signed_w%d_per_s" % args.window:
            summary(lambda r: r["put_signed_w%d" % args.window]["per_s"]),
    }
    print("OpenDHT %s, %d nodes on 127.0.0.1, %d rounds (median [min-max]):" % (
        res["opendht"], args.nodes, args.rounds))
    for k in ("get_first_value_median_ms", "get_first_value_p99_ms", "get_new_key_median_ms",
              "get_read_before_median_ms", "put_signed_w1_per_s",
              "put_signed_w%d_per_s" % args.window):
        if res[k]["max"] < 0:
            continue  # no get of that kind (every key was read once)
        print("  %-28s %10.3f  [%.3f-%.3f]" % (k, res[k]["median"], res[k]["min"], res[k]["max"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
