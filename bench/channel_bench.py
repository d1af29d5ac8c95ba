#!/usr/bin/env python3
"""Channel set-up time between ordinary nodes (docs/nat.md), in the NAT lab
(tests/integration/netlab.py): for each pair of sites, N times: both nodes close their
channels (`ordinarynode close-channels`), the first site's phone calls the second's, and the
caller's node reports how long its new channel took to open (from the first SIP message for
the peer to DTLS done: gathering with the super node's TURN server, the offer and answer
through the overlay, ICE checks, the DTLS handshake). Prints median and p90 per pair, direct
and relayed. Needs root (network namespaces) and a build directory.

    sudo python3 bench/channel_bench.py --bindir build [-n 50] [--pairs lan1:lan2,...]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tests", "integration"))
import harness  # noqa: E402
import netlab  # noqa: E402

DEFAULT_PAIRS = "lan1:lan2,home-eim:pubhost,home-sym1:pubhost,home-eim:home-sym1,home-sym1:home-sym2"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bindir", required=True)
    ap.add_argument("-n", type=int, default=50, help="set-ups per pair (default 50)")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS,
                    help="caller:callee site pairs, comma separated (default: %s)" % DEFAULT_PAIRS)
    a = ap.parse_args()
    bindir = os.path.abspath(a.bindir)
    harness.BINDIR = bindir
    pairs = [tuple(p.split(":")) for p in a.pairs.split(",")]
    tmp = tempfile.mkdtemp(prefix="p2psip-chanbench-")
    lab = netlab.Lab()
    ov = None
    try:
        lab.create()
        ov = netlab.Overlay(lab, bindir, os.path.join(tmp, "ov"))
        ov.start()
        for site in sorted({s for p in pairs for s in p}):
            ok, out = ov.register_phone(site)
            if not ok:
                raise SystemExit("%s's phone could not register:\n%s" % (site, out[-2000:]))
        print("%-24s %-8s %5s %10s %10s %10s" % ("pair", "path", "n", "median ms", "p90 ms",
                                                 "max ms"))
        for x, y in pairs:
            times, paths = [], set()
            peer = ov.node_id[ov.user[y]]
            for _ in range(a.n):
                for s in (x, y):
                    ov.cli(ov.user[s], "close-channels")
                ok, took, out, _ = ov.call(x, y)
                if not ok:
                    raise SystemExit("call %s -> %s failed:\n%s" % (x, y, out[-2000:]))
                st = ov.status(x) or {}
                ch = [c for c in st.get("channels", []) if c.get("peer") == peer]
                if not ch or ch[0].get("state") != "open":
                    raise SystemExit("%s has no open channel to %s: %s" % (x, y, ch))
                times.append(ch[0]["opened_ms"])
                paths.add(ch[0]["path"])
            print("%-24s %-8s %5d %10.0f %10.0f %10.0f" % (
                "%s -> %s" % (x, y), "/".join(sorted(paths)), len(times),
                statistics.median(times), pct(times, 90), max(times)), flush=True)
    finally:
        if ov:
            ov.stop()
        lab.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
