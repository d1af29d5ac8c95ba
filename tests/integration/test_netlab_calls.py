#!/usr/bin/env python3
"""The acceptance test of the NAT lab: a call between every pair of the six host sites of
tests/integration/netlab.py (home-eim, home-sym1, home-sym2, lan1, lan2, pubhost: 15 pairs).
Each site's phone (sipp) registers at the site's ordinary node from 127.0.0.1:5070 on its host; for a pair
(X, Y) X's phone calls Y's user through X's node and Y's phone answers (tests/sipp/uac_call,
uas_answer). Both sipps must count one successful call and no failed one, and every message
of the call must have been seen (at least once): INVITE, 100, 180, 200, ACK, BYE, 200.

Then both nodes' `ordinarynode status --json` is read for the channel between them
("channels": [{"peer": <node id>, "state": "open", "path": "direct"|"relayed",
"opened_ms": ...}]) and a table is printed: pair, NAT types, direct/relayed, the caller's
candidate types, time to open the channel, call duration (INVITE to the BYE's answer, with
sipp's 200 ms pause). Until ordinary nodes open channels, calls go through the overlay
(`deliver`): the channel is asserted only with NETLAB_EXPECT_CHANNELS=1.
NETLAB_BOTH_WAYS=1 also calls each pair the other way round (30 calls)."""

import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import netlab  # noqa: E402

BINDIR = None
EXPECT_CHANNELS = os.environ.get("NETLAB_EXPECT_CHANNELS") == "1"
BOTH_WAYS = os.environ.get("NETLAB_BOTH_WAYS") == "1"
SLOW = bool(harness.WRAPPER)
CHANNEL_WAIT = 20 if SLOW else 5
NAT_SHORT = {"eim": "EIM", "symmetric": "SYM", None: "public"}

# The messages of a call as sipp's final screen lists them, arrows drawn from caller to callee
# whichever side sipp plays. The 100 comes from the caller's
# node, so the callee's phone sees none.
CALL = [("->", "INVITE"), ("<-", "100"), ("<-", "180"), ("<-", "200"), ("->", "ACK"),
        ("->", "BYE"), ("<-", "200")]
MESSAGES = {"uac_call": CALL, "uas_answer": [m for m in CALL if m[1] != "100"]}


def say(fmt, *args):
    print("  [netlab-calls] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def cand_type(addr):
    """"host" of "10.20.0.11:43673 (host)"."""
    m = re.search(r"\((\w+)\)\s*$", addr or "")
    return m.group(1) if m else "?"


def sipp_messages(out):
    """(message, direction, count) of every message line of sipp's final statistics screen."""
    screen = out[out.rfind("Messages  Retrans"):] if "Messages  Retrans" in out else out
    found = []
    # "INVITE ---------->  1" as the caller, "----------> INVITE  1" as the callee
    line = re.compile(r"^\s+(?:(?P<a1><-+|-+>)\s+(?P<m1>\w+)|(?P<m2>\w+)\s+(?P<a2><-+|-+>))"
                      r"\s+(?:E-RTD\d+\s+)?(?P<n>\d+)\s", re.M)
    for m in line.finditer(screen):
        arrow = m.group("a1") or m.group("a2")
        found.append(("->" if arrow.endswith(">") else "<-", m.group("m1") or m.group("m2"),
                      int(m.group("n"))))
    return found


class Calls(harness.OverlayScenario, unittest.TestCase):
    daemons = []
    lab = None
    ov = None
    sn_extra = on_extra = None
    logs_suffix = ""

    @classmethod
    def setUpClass(cls):
        harness.require(os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"),
                        "needs root, iproute2 and nftables for network namespaces")
        harness.require(shutil.which("sipp"), "needs sipp (Debian: sip-tester)")
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-netlab-calls-")
        cls.lab = netlab.Lab()
        try:
            t0 = time.monotonic()
            cls.lab.create()
            cls.ov = netlab.Overlay(cls.lab, BINDIR, os.path.join(cls.tmp, "ov"),
                                    sn_extra=cls.sn_extra, on_extra=cls.on_extra)
            cls.ov.start()
            cls.daemons = cls.ov.daemons  # for the harness's helpers
            say("lab %s and overlay up in %.1f s", cls.lab.tag, time.monotonic() - t0)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        problems = []
        if cls.ov:
            cls.ov.save_logs(os.path.join(BINDIR, "test_netlab_calls-logs" + cls.logs_suffix))
            problems = cls.ov.stop()
            logs = "\n".join(d.log() for d in cls.ov.daemons)
            if "AddressSanitizer" in logs or "runtime error" in logs:
                problems.append("a sanitizer reported an error (see test_netlab_calls-logs)")
        if cls.lab:
            cls.lab.destroy()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def phone(self, site):
        return netlab.PHONE_IP

    def register(self, site):
        u = self.ov.user[site]
        self.run_sipp("register_200", netlab.PHONE_PORT, ip=self.phone(site),
                      ns=self.lab.site_ns(site), target=self.ov.sip[site],
                      keys=(("user", u), ("domain", netlab.OVERLAY), ("expires", 600)),
                      timeout=15)

    def check_messages(self, scenario, out, what):
        got = sipp_messages(out)
        want = MESSAGES[scenario]
        self.assertEqual([(d, m) for d, m, _ in got], want,
                         "%s: sipp's message lines:\n%s" % (what, out[-3000:]))
        # at least once: a late answer may be retransmitted, the call still counts (below)
        self.assertTrue(all(n >= 1 for _, _, n in got),
                        "%s: a message of the call missing:\n%s" % (what, out[-3000:]))

    def channel(self, site, other):
        """The channel site's node reports to other's node: the entry, None (no such entry),
        or False (the node reports no channels at all)."""
        st = self.ov.status(site) or {}
        if "channels" not in st:
            return False
        peer = self.ov.node_id[self.ov.user[other]]
        for ch in st["channels"]:
            if ch.get("peer") == peer:
                return ch
        return None

    def channels(self, x, y):
        """Both ends' channel entries; with NETLAB_EXPECT_CHANNELS, waits up to CHANNEL_WAIT
        for both to be open (a channel may finish opening just after the call)."""
        deadline = time.monotonic() + (CHANNEL_WAIT if EXPECT_CHANNELS else 0)
        while True:
            chans = [self.channel(x, y), self.channel(y, x)]
            if all(c and c.get("state") == "open" for c in chans) or \
                    time.monotonic() >= deadline:
                return chans
            time.sleep(0.2)

    def call(self, x, y):
        """x's phone calls y's user; returns the call's duration in s (the caller's sipp, from
        INVITE to the BYE's answer)."""
        ux, uy = self.ov.user[x], self.ov.user[y]
        uas = self.start_sipp("uas_answer", netlab.PHONE_PORT, ip=self.phone(y),
                              ns=self.lab.site_ns(y), timeout=30 if not SLOW else 60)
        time.sleep(0.3)
        t0 = time.monotonic()
        out = self.run_sipp("uac_call", netlab.PHONE_PORT, ip=self.phone(x),
                            ns=self.lab.site_ns(x), target=self.ov.sip[x],
                            keys=(("callee", uy), ("domain", netlab.OVERLAY)), service=ux,
                            timeout=30 if not SLOW else 60)
        took = time.monotonic() - t0
        self.check_messages("uac_call", out, "%s -> %s, caller" % (x, y))
        self.check_messages("uas_answer", self.finish_sipp(uas, "uas_answer"),
                            "%s -> %s, callee" % (x, y))
        return took

    def test_calls_between_every_pair_of_sites(self):
        t_start = time.monotonic()
        for site in netlab.SITES:
            self.register(site)
        pairs = list(itertools.combinations(netlab.SITES, 2))
        if BOTH_WAYS:
            pairs += [(y, x) for x, y in pairs]
        rows, failures = [], []
        for x, y in pairs:
            row = {"pair": "%s -> %s" % (x, y),
                   "nat": "%s/%s" % (NAT_SHORT[netlab.nat_kind(x)], NAT_SHORT[netlab.nat_kind(y)])}
            with self.subTest(pair=row["pair"]):
                try:
                    row["call"] = "%.2f s" % self.call(x, y)
                except AssertionError:
                    row["call"] = "FAILED"
                    failures.append(row["pair"])
                    rows.append(row)
                    raise
                chans = self.channels(x, y)
                if chans[0] is False and chans[1] is False:
                    row.update(path="-", opened="no channels reported", cands="-")
                else:
                    ch = next((c for c in chans if c and c.get("state") == "open"), None)
                    row.update(path=ch.get("path", "?") if ch else "NONE",
                               opened="%s ms" % ch.get("opened_ms", "?") if ch else
                               "not open (%s)" % json.dumps(chans),
                               cands="%s->%s" % (cand_type(ch.get("local")),
                                                 cand_type(ch.get("remote"))) if ch else "-")
                rows.append(row)
                if EXPECT_CHANNELS:
                    for s, o, ch in ((x, y, chans[0]), (y, x, chans[1])):
                        self.assertIsNot(ch, False, "%s's node: no \"channels\" in its status"
                                         % s)
                        self.assertTrue(ch, "%s's node has no channel to %s's node" % (s, o))
                        self.assertEqual(ch.get("state"), "open", ch)
                        self.assertIn(ch.get("path"), ("direct", "relayed"), ch)
                        self.assertIsInstance(ch.get("opened_ms"), int, ch)
        fmt = "%-23s %-11s %-8s %-18s %-21s %s"
        say(fmt, "pair", "NAT", "path", "caller's candidates", "channel opened in", "call")
        for r in rows:
            say(fmt, r["pair"], r["nat"], r.get("path", "-"), r.get("cands", "-"),
                r.get("opened", "-"), r["call"])
        say("%d calls in %.1f s%s", len(rows), time.monotonic() - t_start,
            "" if EXPECT_CHANNELS else " (channels not asserted: NETLAB_EXPECT_CHANNELS=1 does)")
        for site in netlab.SITES:  # what carried the calls, from the nodes' own counters
            px = ((self.ov.status(site) or {}).get("sip") or {}).get("proxy") or {}
            if px:
                say("%-9s node: %s", site, ", ".join("%s %s" % kv for kv in sorted(px.items())
                                                     if isinstance(kv[1], int)))
        self.assertEqual(failures, [])


class CallsWithoutTurn(Calls):
    """The same lab with super nodes that run no TURN (`"turn": false`, STUN only): channels
    find server-reflexive candidates through the super nodes' STUN servers and go direct where
    the NATs allow it; where only a relay would do (a symmetric NAT towards a NAT), the channel
    fails and the call goes through the overlay instead, completing all the same."""
    sn_extra = {"turn": False}
    on_extra = {"channel_setup_ms": 4000}
    logs_suffix = "-noturn"
    PAIRS = [("home-eim", "lan1", "direct"), ("home-sym1", "pubhost", "direct"),
             ("lan1", "lan2", "direct"), ("home-sym1", "home-eim", None)]

    def test_calls_between_every_pair_of_sites(self):
        pass  # Calls does those, with TURN

    def test_calls_without_a_relay(self):
        for site in {s for p in self.PAIRS for s in p[:2]}:
            self.register(site)
        for x, y, path in self.PAIRS:
            with self.subTest(pair="%s -> %s" % (x, y)):
                before = self.ov.status(x)["channel_counters"]["via_overlay"]
                took = self.call(x, y)
                st = self.ov.status(x)
                ch = self.channel(x, y)
                say("no TURN: %s -> %s: call in %.2f s, channel %s, %d messages through the "
                    "overlay", x, y, took, ch and (ch.get("state"), ch.get("path"),
                                                  ch.get("local"), ch.get("remote")),
                    st["channel_counters"]["via_overlay"] - before)
                self.assertFalse(any(c["type"] == "relay" for c in st.get("candidates", [])))
                if path:
                    self.assertEqual((ch["state"], ch["path"]), ("open", path))
                else:  # no pair works without a relay: the overlay carried the call
                    self.assertEqual(ch["state"], "failed", ch)
                    self.assertGreaterEqual(st["channel_counters"]["via_overlay"] - before, 3)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
