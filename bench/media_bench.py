#!/usr/bin/env python3
"""Relayed media capacity of one super node's TURN relay (supernode/turn.c) next to coturn's
`turnserver` relaying the same load in the same run, and the latency the relay adds.

A "call" is one TURN allocation (caller socket A) with a channel bound to a callee socket B;
RTP of 172 bytes (12-byte header + 160 bytes of PCMU, 20 ms) at 50 packets/s each way:
A -> server (ChannelData) -> relay -> B and B -> relayed address -> server -> A (ChannelData).
The load comes from bench/media_load (C, one process: sends on a schedule, stamps every packet
with its send time and sequence, takes the kernel's receive time stamp, counts loss per
direction). The allocations and channels are made here in Python (tests/integration/test_turn.py's
client) and their sockets handed to media_load.

Per round, for each server in turn (the order alternates round by round; both servers are
running all along), the number of concurrent calls ramps through --steps, --seconds per step;
each relayed step is followed by the same number of calls sent directly between two sockets
(no relay) with the same generator: the "latency the relay adds" is the relayed step's
latency minus that direct step's. A server's ramp ends at its first failing step (loss >=
0.1 % either way, or server CPU >= 100 % of one core), or when the generator itself runs out
of CPU (then no capacity is quoted for that ramp, only a lower bound).

Server set-up is bench/turn_bench.py's: both on 127.0.0.1 with the same kind of credentials,
loopback peers allowed, no bandwidth limit or quota, coturn with --relay-threads 1 (one relay
core). Server CPU = utime+stime of the whole server process from /proc, over the step
(including the drain), divided by the step's send time.

    python3 bench/media_bench.py --bindir build-release [--rounds 3] [--seconds 5]
    python3 bench/media_bench.py --bindir build-release --quick        (under a minute)
    python3 bench/media_bench.py --bindir build-release --node-cpu     (ordinary nodes' CPU)
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import test_turn  # noqa: E402  (its Python TURN client)
import turn_bench  # noqa: E402  (server start-up: Ours, Coturn; cpu_seconds)

LOSS_MAX = 0.001  # 0.1 %
CPU_MAX = 1.0  # one core
GEN_CPU_MAX = 0.90  # the generator is "saturated" above 90 % of a core ...
GEN_LATE_MAX = 0.01  # ... or when more than 1 % of its sends were > 5 ms behind schedule
CHANNEL = 0x4000  # one channel per allocation: the same number in each is fine


def udp_counters():
    """The kernel's UDP error counters (all sockets of the machine's namespace)."""
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], (int(x) for x in lines[1][1:])))


def socket_drops(pid):
    """Datagrams dropped at the receive queues of pid's UDP sockets (full buffer), so far."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    drops = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            x = line.split()
            if x[9] in inodes:
                drops += int(x[12])
    return drops


def thread_cpu(pid):
    """{thread id: CPU seconds} of pid's threads."""
    out = {}
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, t)) as f:
                x = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t] = (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")
    return out


def pin(pid, cpu):
    """Every thread of pid onto one CPU."""
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            os.sched_setaffinity(int(t), {cpu})
        except OSError:
            pass


def find_load(bindir, tmp):
    """bench/media_load from the build directory, or compiled here from the source."""
    built = os.path.join(bindir, "bench", "media_load")
    if os.access(built, os.X_OK):
        return built
    out = os.path.join(tmp, "media_load")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-o", out,
                    os.path.join(HERE, "media_load.c")], check=True)
    print("(media_load compiled here with %s -O2: not in %s)" % (cc, built), flush=True)
    return out


class Calls:
    """The allocations (one caller socket each, a channel to the one callee socket) of one
    server, grown on demand and released at the end of the ramp."""

    def __init__(self, srv):
        self.srv = srv
        self.user, self.pw = srv.creds()
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.pip, self.pport = self.peer.getsockname()
        self.clients = []  # (TurnClient, "relay-ip:port")

    def grow(self, n):
        t0 = time.monotonic()
        added = 0
        stale = []  # sockets whose 5-tuple the server still holds: kept open till the end
        while len(self.clients) < n:
            c = test_turn.TurnClient(("127.0.0.1", self.srv.port), self.user, self.pw)
            code, attrs = c.allocate()
            if code == 437 and len(stale) < 100:
                # Allocation Mismatch: an earlier ramp's allocation on this port whose release
                # was lost (an overloaded step); it expires on its own. Another port.
                stale.append(c)
                continue
            if code != 0:
                c.close()
                raise RuntimeError("%s: allocation %d refused: %s" % (
                    self.srv.name, len(self.clients) + 1, code))
            rip, rport = test_turn.unxor(test_turn.get(attrs, test_turn.A_RELAYED))
            code, _ = c.channel(CHANNEL, self.pip, self.pport)
            if code != 0:
                c.close()
                raise RuntimeError("%s: channel bind refused: %s" % (self.srv.name, code))
            self.clients.append((c, "%s:%d" % (rip, rport)))
            added += 1
        for c in stale:
            c.close()
        return added, time.monotonic() - t0

    def release(self):
        time.sleep(1.0)  # an overloaded server's backlog first
        for c, _ in self.clients:
            try:
                c.sock.settimeout(1.0)
                c.refresh(0)
            except OSError:
                pass
            c.close()
        self.clients = []
        self.peer.close()


def run_load(load, tmp, mode, n, seconds, drain, calls=None, srv=None, gen_cpu=None):
    argv = [load, "--mode", mode, "--calls", str(n), "--seconds", str(seconds),
            "--drain", str(drain)]
    fds = ()
    if mode == "relay":
        mp = os.path.join(tmp, "map.txt")
        with open(mp, "w") as f:
            for c, rel in calls.clients[:n]:
                f.write("%d %d %s\n" % (c.sock.fileno(), CHANNEL, rel))
        fds = tuple(c.sock.fileno() for c, _ in calls.clients[:n]) + (calls.peer.fileno(),)
        argv += ["--server", "127.0.0.1:%d" % srv.port, "--peer-fd", str(calls.peer.fileno()),
                 "--map", mp]
    udp0 = udp_counters()
    cpu0 = turn_bench.cpu_seconds(srv.pid) if srv else 0.0
    drops0 = socket_drops(srv.pid) if srv else 0
    th0 = thread_cpu(srv.pid) if srv else {}
    pre = (lambda: os.sched_setaffinity(0, {gen_cpu})) if gen_cpu is not None else None
    p = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True,
                       timeout=seconds + drain + 120, preexec_fn=pre)
    if p.returncode != 0:
        raise RuntimeError("media_load failed (%d): %s" % (p.returncode, p.stderr.strip()))
    r = json.loads(p.stdout)
    udp1 = udp_counters()
    r["server_cpu_s"] = (turn_bench.cpu_seconds(srv.pid) - cpu0) if srv else 0.0
    r["server_socket_drops"] = (socket_drops(srv.pid) - drops0) if srv else 0
    th1 = thread_cpu(srv.pid) if srv else {}
    r["server_busiest_thread_cpu_s"] = max([th1[t] - th0.get(t, 0.0) for t in th1] or [0.0])
    r["server_threads"] = len(th1)
    r["udp_rcvbuf_errors"] = udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0)
    r["udp_sndbuf_errors"] = udp1.get("SndbufErrors", 0) - udp0.get("SndbufErrors", 0)
    ws = r["wall_send_s"] or seconds
    r["server_cpu"] = r["server_cpu_s"] / ws
    r["server_thread"] = r["server_busiest_thread_cpu_s"] / ws
    r["gen_cpu"] = r["gen_cpu_send_s"] / ws
    for d in ("ab", "ba"):
        s = r[d]
        s["loss"] = (s["sent"] - s["recv"]) / s["sent"] if s["sent"] else 1.0
    sent = r["ab"]["sent"] + r["ba"]["sent"]
    r["late_frac"] = r["late_sends"] / sent if sent else 0.0
    r["gen_saturated"] = r["gen_cpu"] >= GEN_CPU_MAX or r["late_frac"] > GEN_LATE_MAX
    r["pass"] = (max(r["ab"]["loss"], r["ba"]["loss"]) < LOSS_MAX and
                 r["server_cpu"] < CPU_MAX)
    return r


def fmt_step(name, n, r, d):
    added = "%5.0f %5.0f %6.0f %6.0f" % (
        r["ab"]["p50_us"] - d["ab"]["p50_us"], r["ba"]["p50_us"] - d["ba"]["p50_us"],
        r["ab"]["p99_us"] - d["ab"]["p99_us"], r["ba"]["p99_us"] - d["ba"]["p99_us"])
    return ("%-8s %6d %8.0f %8.3f %8.3f %s %6.1f %6.1f %7d %6.1f %6.1f %s%s" % (
        name, n, (r["ab"]["sent"] + r["ba"]["sent"]) / r["seconds"],
        100 * r["ab"]["loss"], 100 * r["ba"]["loss"], added, 100 * r["server_cpu"],
        100 * r["server_thread"], r["server_socket_drops"],
        100 * r["gen_cpu"], 100 * d["gen_cpu"],
        r.get("verdict") or ("pass" if r["pass"] else "FAIL"),
        " (generator short of CPU)" if r["gen_saturated"] or d["gen_saturated"] else ""))


HEADER = ("%-8s %6s %8s %8s %8s %5s %5s %6s %6s %6s %6s %7s %6s %6s" % (
    "server", "calls", "pkt/s", "loss ab%", "loss ba%", "+p50", "+p50", "+p99", "+p99",
    "srvCPU", "thread", "drops", "genCPU", "gen(d)") + "\n" +
    "%-8s %6s %8s %8s %8s %5s %5s %6s %6s %6s %6s %7s %6s %6s" % (
        "", "", "offered", "", "", "ab us", "ba us", "ab us", "ba us", "%", "%", "srv", "%",
        "%"))


def ramp(srv, short, load, tmp, steps, seconds, drain, log, gen_cpu=None):
    """One server's ramp: [(calls, relayed result, direct result)], verdict."""
    calls = Calls(srv)
    out = []
    verdict = {"capacity": None, "bound": "none", "first_fail": None}
    try:
        for n in steps:
            added, took = calls.grow(n)
            if added:
                log("(%s: %d allocations + channels made in %.1f s)" % (short, added, took))
            time.sleep(0.3)
            r = run_load(load, tmp, "relay", n, seconds, drain, calls=calls, srv=srv,
                         gen_cpu=gen_cpu)
            d = run_load(load, tmp, "direct", n, min(seconds, 3.0), drain, gen_cpu=gen_cpu)
            out.append((n, r, d))
            log(fmt_step(short, n, r, d))
            if r["gen_saturated"] or d["gen_saturated"]:
                verdict["bound"] = "generator"
                verdict["gen_step"] = n
                if r["pass"]:
                    verdict["capacity"] = n  # a lower bound only
                else:
                    verdict["first_fail"] = n
                break
            if not r["pass"]:
                verdict["bound"] = "server"
                verdict["first_fail"] = n
                break
            verdict["capacity"] = n
        else:
            verdict["bound"] = "steps"  # every step passed: a lower bound
    finally:
        calls.release()
    return out, verdict


def media_relay(args, bindir):
    tmp = tempfile.mkdtemp(prefix="p2psip-mediabench-")
    load = find_load(bindir, tmp)
    servers = [("ours", turn_bench.Ours()), ("coturn", turn_bench.Coturn())]
    results = {k: [] for k, _ in servers}
    log = lambda s: print(s, flush=True)  # noqa: E731
    machine = "%d CPUs, load average %s" % (os.cpu_count(), open("/proc/loadavg").read().split()[0])
    try:
        for _, s in servers:
            s.start_server(tmp)
            if args.pin:
                pin(s.pid, 0)
        time.sleep(0.5)
        log("media relay bench: steps %s calls, %g s each (direct: %g s), drain %g s, %d "
            "round(s); %s" % (",".join(map(str, args.steps)), args.seconds,
                              min(args.seconds, 3.0), args.drain, args.rounds, machine))
        log("+p50/+p99: latency through the relay minus the same on the direct path (same "
            "number of calls, right after); srvCPU: the server process (all threads), "
            "thread: its busiest thread, in % of one core over the send time; drops: datagrams "
            "dropped at the server's full socket buffers; gen(d): generator CPU on the direct run")
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for short, s in order:
                log("-- round %d, %s" % (rnd + 1, s.name))
                log(HEADER)
                steps, verdict = ramp(s, short, load, tmp, args.steps, args.seconds,
                                      args.drain, log, gen_cpu=1 if args.pin else None)
                results[short].append({"steps": steps, "verdict": verdict})
                log("   capacity %s (%s)" % (verdict["capacity"], {
                    "server": "first failing step %s" % verdict["first_fail"],
                    "generator": "the generator ran short of CPU (>= 90 %% of a core, or > 1 %% "
                                 "of its sends > 5 ms late) at step %s: a lower bound, not a "
                                 "capacity" % verdict.get("gen_step"),
                    "steps": "every step passed: a lower bound",
                    "none": "no step passed"}[verdict["bound"]]))
    finally:
        for _, s in servers:
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001  (report, keep stopping the others)
                print("stopping %s: %s" % (s.name, e), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    summary(args, results)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(args, results):
    print()
    print("Summary: medians over %d round(s) of each step's figures (steps every round "
          "reached; pass k/n: the step passed in k of the n rounds)" % args.rounds)
    print(HEADER)
    per_call = {}
    for short, rounds in results.items():
        byn = {}
        for rd in rounds:
            for n, r, d in rd["steps"]:
                byn.setdefault(n, []).append((r, d))
        for n in sorted(byn):
            rs = byn[n]
            if len(rs) < len(rounds):
                continue
            npass = sum(1 for r, _ in rs if r["pass"])
            m = {"seconds": rs[0][0]["seconds"], "pass": npass == len(rs),
                 "verdict": ("pass %d/%d" if npass == len(rs) else "FAIL (passed %d/%d)") % (
                     npass, len(rs)),
                 "gen_saturated": any(r["gen_saturated"] for r, _ in rs)}
            dm = {"gen_saturated": any(d["gen_saturated"] for _, d in rs),
                  "gen_cpu": med(d["gen_cpu"] for _, d in rs)}
            for k in ("server_cpu", "server_thread", "server_socket_drops", "gen_cpu"):
                m[k] = med(r[k] for r, _ in rs)
            for dirn in ("ab", "ba"):
                m[dirn] = {"sent": med(r[dirn]["sent"] for r, _ in rs),
                           "loss": med(r[dirn]["loss"] for r, _ in rs)}
                dm[dirn] = {}
                for q in ("p50_us", "p99_us"):
                    # median of the per-round differences, shown as relay - direct
                    m[dirn][q] = med(r[dirn][q] - d[dirn][q] for r, d in rs)
                    dm[dirn][q] = 0
            print(fmt_step(short, n, m, dm))
            if m["pass"]:
                per_call.setdefault(short, {})[n] = m["server_cpu"] / n
    print()
    caps = {}
    for short, rounds in results.items():
        vs = [rd["verdict"] for rd in rounds]
        capn = [v["capacity"] for v in vs if v["bound"] == "server"]
        lower = [v["capacity"] or 0 for v in vs if v["bound"] != "server"]
        if capn:
            caps[short] = med(capn)
            print("%-8s capacity (largest step with loss < 0.1 %% both ways and CPU < 1 core, "
                  "median of %d ramp(s) that the server ended): %g calls" % (
                      short, len(capn), caps[short]))
        if lower:
            print("%-8s %d ramp(s) not ended by the server (generator short of CPU, or every "
                  "step passed): capacity >= %s calls" % (short, len(lower), max(lower)))
        if short in per_call:
            n = max(per_call[short])
            c = per_call[short][n]
            print("%-8s server CPU per call: %.0f us per call-second at %d calls, its largest "
                  "step passed in every round (-> %.0f calls per core if it scaled linearly)" % (
                      short, c * 1e6, n, 1.0 / c if c > 0 else float("inf")))
    if caps.get("ours") and caps.get("coturn"):
        print("capacity ratio ours / coturn: %.2f" % (caps["ours"] / caps["coturn"]))
    common = sorted(set(per_call.get("ours", {})) & set(per_call.get("coturn", {})))
    for n in common:
        o, c = per_call["ours"][n], per_call["coturn"][n]
        print("server CPU per call at %d calls (both passed): ours %.0f us/call-s, coturn %.0f "
              "us/call-s, ratio ours / coturn %.2f" % (n, o * 1e6, c * 1e6, o / c if c else 0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
        print("raw results: %s" % args.json)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bindir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per relayed step (default 5)")
    ap.add_argument("--drain", type=float, default=1.0,
                    help="seconds to wait for late packets after a step's last send")
    ap.add_argument("--steps", default="250,500,1000,1500,2000,2500,3000,4000",
                    help="concurrent calls per step, comma separated")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, steps 100,400,1600, 3 s each (under a minute)")
    ap.add_argument("--json", help="write the raw per-step results there")
    ap.add_argument("--pin", action="store_true",
                    help="pin each server (all its threads) to CPU 0 and the generator to CPU 1")
    ap.add_argument("--node-cpu", action="store_true",
                    help="measure ordinary nodes' CPU per call instead (bench/node_media_bench.py)")
    args, rest = ap.parse_known_args()
    bindir = os.path.abspath(args.bindir)
    harness.BINDIR = bindir
    if args.node_cpu:
        import node_media_bench
        return node_media_bench.main(["--bindir", bindir] + rest)
    if rest:
        ap.error("unrecognised arguments: %s" % " ".join(rest))
    if args.quick:
        args.rounds, args.seconds, args.steps = 1, 3.0, "100,400,1600"
    args.steps = [int(x) for x in args.steps.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.steps) + 512
    if hard < need:
        sys.exit("RLIMIT_NOFILE hard limit %d < %d: lower --steps" % (hard, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    media_relay(args, bindir)


if __name__ == "__main__":
    main()
