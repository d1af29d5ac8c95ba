#!/usr/bin/env python3
"""The super node ring against an enrolled adversary (issue 15, items 1, 3, 4, 5, 9, 14):
real super nodes in a ring of three, and a rogue super node played by Python
(tests/integration/overlaypeer.py) with valid certificates of its own. Each
test performs one attack against the running daemons and asserts that it
fails -- a log line, the ring's state in `supernode status`, no connection
to a listener the test owns -- and that honest users are unaffected: their
stores and lookups through every super node still work and their records
are intact.

0. the use-after-free of links_gc/peer_link (item 5): a lone super node with
   max_connections 1 made to dial a peer it is about to forget; under ASan
   the old code aborted with heap-use-after-free in peer_link.
1. a forged join naming a phantom node between two members, and one naming
   a member's predecessor at another address (item 3): nobody adopts either.
2. routes whose origin names a known node's Node-ID at a listener of ours,
   and unknown Node-IDs there (item 5): no connection for the known ones,
   at most the budget of unverified dials for the others.
3. `sync` with lo == hi, from == to or another node's range (item 9):
   refused, nothing pushed. 3b: forged rollback marks in `replicate` (a bare
   seq, a tampered or live record) are not kept; alice can still write.
4. a `get` for a key with eight 14 KB records (item 14): the answer fits the
   frame limit, and paging (`after`) returns the rest; `dhtctl get` and an
   ordinary node's `get` follow the pages and return all eight, verified.
5. a ping flood from a peer that never reads (item 9): cut off and logged;
   5b. the same well under the rate budget: cut once it leaves our write
   queue unread. 5c. a rogue, responsible for a range, never syncs it and
   confirms every `offer`: the replicas that are holders keep their copies,
   the node that is none drops its copy.
6. the rogue joins for real; a second rogue identity answers a read routed
   to it (item 1): the origin refuses the reply. Then the predecessor runs
   out of descriptors while the rogue drops its link (item 4): it does not
   declare the rogue dead, and links again once descriptors are back.

Run: python3 tests/integration/test_ring_attack.py --bindir <build dir>
Environment: RING_ATTACK_DEBUG=1 (every super node logs at debug level; sn9 always does),
OVERLAYPEER_DEBUG=1 (the rogue's listeners print what they accept and when links close).
When a test fails, every daemon's log is written to <bindir>/test_ring_attack-logs/.
"""

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import overlaypeer  # noqa: E402

BINDIR = None
OVERLAY = "attack.p2psip"
SNS = ("sn1", "sn2", "sn3", "sn9")     # sn9: a lone super node for tests 0 and 0b, started there
RING = ("sn1", "sn2", "sn3")
USERS = ("rogue", "rogue2", "alice", "bob")  # every account may run a super node
WAIT = 30
free_port = harness.free_port
wait_until = harness.wait_until


def note(fmt, *args):
    print("  [ring-attack] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def key_of(rtype, name):
    return hashlib.sha1((rtype + "|" + name).encode()).hexdigest()


def nid_between(a, b):
    """A Node-ID strictly between a and b clockwise (hex), nobody's."""
    x, y = int(a, 16), int(b, 16)
    d = (y - x) % (1 << 160)
    return "%040x" % ((x + d // 2) % (1 << 160))


class RingAttack(harness.OverlayScenario, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-ringatk-")
        cls.daemons = []
        try:
            cls.build_overlay(OVERLAY, SNS, USERS, start_sns=RING, wait=WAIT,
                              ls_extra={"max_record_bytes": 16384})
            cls.dirs = {u: os.path.join(cls.tmp, u) for u in SNS + USERS}
            wait_until("a ring of three", lambda: cls.ring_ok(RING), WAIT)
            r = cls.dht("alice", "sn1", "put", "--type", "note", "--name", "canary",
                        "--value", json.dumps({"alive": True}), "--mode", "update")
            assert r.get("ok"), r
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def node_conf(cls, u, conf):
        if u == "sn9":
            conf.update({"seed": True, "max_connections": 1, "peer_idle_s": 1})
        if u == "alice":  # her ordinary node (test 4) reads through the ring, not lone sn9
            conf["supernodes"] = [cls.addr[sn] for sn in RING]
        if u in SNS:
            debug = u == "sn9" or os.environ.get("RING_ATTACK_DEBUG")
            conf["log_level"] = "debug" if debug else "info"

    @classmethod
    def tearDownClass(cls):
        cls.stop_checked("test_ring_attack")

    # ---- helpers ----

    @classmethod
    def ring_ok(cls, names):
        ids = sorted(cls.node_id[u] for u in names)
        for u in names:
            st = cls.sn_status(u)
            me = cls.node_id[u]
            i = ids.index(me)
            if st.get("state") != "member":
                return False
            if (st.get("pred") or {}).get("id") != ids[i - 1]:
                return False
            succ = [s["id"] for s in st.get("succ", [])]
            if succ[:1] != [ids[(i + 1) % len(ids)]]:
                return False
        return True

    @classmethod
    def dht(cls, user, sn, *args):
        """`dhtctl --json` as `user` through super node `sn`: the last JSON line."""
        argv = [os.path.join(harness.BINDIR, "supernode", "dhtctl"), "--state", cls.dirs[user]]
        argv += (["--sn", cls.addr[sn]] if sn else []) + ["--json"]
        p = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        lines = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
        return lines[-1] if lines else {"ok": False, "stderr": p.stderr[-500:]}

    def assert_honest_ok(self, what):
        """Every member still serves reads of alice's canary and takes a new write."""
        for u in RING:
            self.assertTrue(self.sn[u].proc.poll() is None, "%s died (%s)" % (u, what))
        r = self.dht("bob", "sn2", "put", "--type", "note", "--name", "bob-" + what,
                     "--value", json.dumps({"t": time.time()}), "--mode", "update")
        self.assertTrue(r.get("ok"), "%s: bob's write failed: %r" % (what, r))
        for u in RING:
            r = self.dht("bob", u, "get", "--type", "note", "--name", "canary")
            recs = r.get("records", [])
            self.assertTrue(r.get("ok") and len(recs) == 1 and recs[0].get("verified")
                            and recs[0].get("value") == {"alive": True},
                            "%s: the canary through %s: %r" % (what, u, r))
        self.assertTrue(self.ring_ok(RING), "%s: the ring is no longer exact" % what)

    def link(self, sn, who="rogue", **kw):
        return overlaypeer.Link(self.addr[sn], self.dirs[who], OVERLAY, **kw)

    def log_of(self, u):
        return self.sn[u].log()

    # ---- 0: the use-after-free (runs first: it needs its node fresh) ----

    def test_0_links_gc_use_after_free(self):
        """sn9 alone, max_connections 1, peer_idle_s 1. rogue asks it (a route with op find,
        origin rogue2 at rogue2's own listener) to reply; the dial to rogue2 needs room, so
        links_gc runs inside peer_link. rogue2's listener drops the link; a second route a
        little more than peer_idle_s later finds rogue2's peer idle, unlinked and unused: the
        old links_gc freed it under peer_link's feet. The node must survive (ASan build:
        no report) and keep answering."""
        self.sn["sn9"] = self.start([self.bin("supernode"), "-d", "-c", self.cfg["sn9"]])
        self.sn["sn9"].wait_for("started a new ring", WAIT)
        lst = overlaypeer.Listener(self.dirs["rogue2"], OVERLAY, close_after=1)
        origin = {"id": self.node_id["rogue2"], "addr": lst.addr}
        try:
            for cycle in range(6):
                for delay in (0.0, 1.02):
                    time.sleep(delay)
                    with self.link("sn9") as l:
                        l.send("route", "ind", {
                            "rid": overlaypeer.new_tid(), "target": "00" * 20, "origin": origin,
                            "hops": 0, "final": False, "op": "find", "args": {}})
                        time.sleep(0.15)
                self.assertIsNone(self.sn["sn9"].proc.poll(),
                                  "sn9 died in cycle %d:\n%s" % (cycle, self.sn["sn9"].log()[-3000:]))
            note("sn9 dialled rogue2's listener %d times; alive", lst.connections)
            self.assertGreater(lst.connections, 0, "the path was not exercised")
            def pings():  # (its last dial may still hold the one link it allows)
                try:
                    with self.link("sn9") as l:
                        return (l.request("ping", {}, timeout=2) or {}).get("kind") == "res"
                except (OSError, overlaypeer.Closed):
                    return False
            wait_until("sn9 answers a ping", pings, 10)
        finally:
            lst.close()
        self.assertNotIn("AddressSanitizer", self.sn["sn9"].log())


    def test_0b_full_link_table_keeps_attached_nodes(self):
        """sn9 again with max_connections 2: bob attached (the older link), rogue connected.
        rogue makes sn9 dial (a route naming rogue2 at rogue2's listener): the room is made
        by closing rogue's link, never bob's. Before, the least recently used link went,
        bob's attachment included."""
        self.sn["sn9"].stop()
        self.sn["sn9"] = self.start([self.bin("supernode"), "-d", "-c", self.cfg["sn9"],
                                     "-o", "max_connections=2"])
        self.sn["sn9"].wait_for("started a new ring", WAIT)
        lst = overlaypeer.Listener(self.dirs["rogue2"], OVERLAY)
        bob = self.link("sn9", who="bob")
        try:
            a = bob.request("attach", {})
            self.assertEqual((a or {}).get("kind"), "res", a)
            time.sleep(0.5)  # bob's link is now the least recently used
            with self.link("sn9") as l:
                l.send("route", "ind", {
                    "rid": overlaypeer.new_tid(), "target": "00" * 20, "hops": 0,
                    "origin": {"id": self.node_id["rogue2"], "addr": lst.addr},
                    "final": False, "op": "find", "args": {}})
                wait_until("sn9 dials rogue2", lambda: lst.connections > 0, 10)
                self.assertTrue(l.wait_closed(5), "rogue's link was not the one closed")
            time.sleep(0.5)
            self.assertIsNone(bob.closed_reason, "bob's attachment was closed to make room")
            a = bob.request("find", {"target": "00" * 20})
            self.assertEqual((a or {}).get("kind"), "res", a)
            note("sn9 at max_connections 2 dialled rogue2 by closing rogue's link; bob stays "
                 "attached and served")
        finally:
            bob.close()
            lst.close()

    # ---- status helpers ----

    def refused(self, u):
        return self.sn_status(u).get("refused") or {}

    def sorted_ring(self):
        return sorted(RING, key=lambda u: self.node_id[u])

    # ---- 1: a forged join ----

    def test_1_forged_join(self):
        """rogue sends B (a member) a join whose origin is a phantom Node-ID between B's
        predecessor A and B, at a listener of ours; then one naming A itself at that listener
        (B readmits its own predecessor "again", and used to take the new address).
        Before: B adopted the phantom as predecessor at once, A took it as successor, and
        nothing ever counted its wrong certificate as a failure. Now a join routed by a
        third party is admitted only once the claimed address presents the claimed Node-ID."""
        a, b, c = self.sorted_ring()
        phantom = nid_between(self.node_id[a], self.node_id[b])
        lst = overlaypeer.Listener(self.dirs["rogue"], OVERLAY)
        try:
            with self.link(b) as l:
                for origin in ({"id": phantom, "addr": lst.addr},
                               {"id": self.node_id[a], "addr": lst.addr}):
                    l.send("route", "ind", {
                        "rid": overlaypeer.new_tid(), "target": origin["id"], "origin": origin,
                        "hops": 1, "final": True, "op": "join", "args": {}})
                    time.sleep(0.2)
                self.sn[b].wait_for("join of %s at %s refused" % (phantom[:8], lst.addr), 10)
                self.sn[b].wait_for("join of %s at %s refused" % (self.node_id[a][:8], lst.addr),
                                    10)
                for line in self.log_of(b).splitlines():
                    if "join of" in line and lst.addr in line:
                        note("%s: %s", b, line.split(" ring: ", 1)[-1])
            time.sleep(3)  # three stabilisation periods
            st_b, st_a = self.sn_status(b), self.sn_status(a)
            self.assertEqual((st_b.get("pred") or {}).get("id"), self.node_id[a], st_b.get("pred"))
            self.assertEqual(st_a["succ"][0]["id"], self.node_id[b], st_a.get("succ"))
            self.assertEqual(st_b["pred"]["addr"], self.addr[a],
                             "%s now knows %s elsewhere: %r" % (b, a, st_b["pred"]))
            self.assertGreaterEqual(self.refused(b).get("joins", 0), 2)
            note("%s kept predecessor %s; refused joins: %d; connections to our listener "
                 "(verification dials): %d", b, a, self.refused(b).get("joins", 0),
                 lst.connections)
        finally:
            lst.close()
        self.assert_honest_ok("forged-join")

    # ---- 2: forged origins ----

    def test_2_forged_origins(self):
        """Routes (op find) whose origin names each member's Node-ID at a TCP listener of ours:
        the replies go to the members' authenticated addresses, our listener gets no
        connection. Then 100 routes naming unknown Node-IDs there: at most the budget of
        unverified dials (16 at once, 10/s, bursts of 28) reaches it."""
        victim = overlaypeer.Listener(tls=False)
        try:
            with self.link("sn2") as l:
                for u in RING:
                    for target in RING:
                        l.send("route", "ind", {
                            "rid": overlaypeer.new_tid(), "target": self.node_id[target],
                            "origin": {"id": self.node_id[u], "addr": victim.addr},
                            "hops": 1, "final": False, "op": "find", "args": {}})
                time.sleep(2)
                self.assertEqual(victim.connections, 0,
                                 "a member dialled a forged origin address of a known node")
                note("9 routes with known Node-IDs at our listener: %d connections",
                     victim.connections)
                t0 = time.monotonic()
                for _ in range(100):
                    l.send("route", "ind", {
                        "rid": overlaypeer.new_tid(), "target": self.node_id["sn2"],
                        "origin": {"id": os.urandom(20).hex(), "addr": victim.addr},
                        "hops": 1, "final": True, "op": "find", "args": {}})
                time.sleep(2)
                dt = time.monotonic() - t0
            bound = 28 + 10 * dt + 1
            note("100 routes with unknown Node-IDs at our listener: %d connections in %.1f s "
                 "(bound %.0f)", victim.connections, dt, bound)
            self.assertLessEqual(victim.connections, bound)
            self.assertGreater(self.refused("sn2").get("dials", 0), 0)
            self.assertIn("budget of such dials", self.log_of("sn2"))
        finally:
            victim.close()
        self.assert_honest_ok("forged-origins")

    # ---- 3: sync of the whole ring ----

    def test_3_sync_whole_ring(self):
        """sync with lo == hi (and from == to), or for a range that is not the sender's:
        refused with invalid-request, nothing pushed. Before: the receiver compared and
        pushed its whole store to the sender."""
        me = self.node_id["rogue"]
        other = self.node_id["sn1"]
        with self.link("sn2") as l:
            answers = [
                l.request("sync", {"lo": me, "hi": me, "from": me, "to": me, "entries": []}),
                l.request("sync", {"lo": other, "hi": other, "digest": "00" * 20}),
                l.request("sync", {"lo": other, "hi": me, "from": me, "to": me, "entries": []}),
                l.request("sync", {"lo": me, "hi": other, "from": me, "to": other,
                                   "entries": []}),
            ]
            time.sleep(2)
            pushed = [f for f in l.frames if f.get("type") == "replicate"]
        for a in answers:
            self.assertEqual((a or {}).get("kind"), "err", a)
            self.assertEqual(a["body"].get("code"), "invalid-request", a)
        self.assertEqual(pushed, [], "records were pushed to the rogue")
        note("4 abusive syncs: %s; replicate pushes received: %d",
             [a["body"]["reason"] for a in answers], len(pushed))
        self.assertGreaterEqual(self.refused("sn2").get("syncs", 0), 4)
        self.assert_honest_ok("sync")

    # ---- 3b: forged rollback marks ----

    def test_3b_forged_marks(self):
        """Rollback marks travel in `replicate` (protocol.md 4.4). rogue tries to lock alice
        out of a key with marks that claim a huge seq: a bare [key, owner, seq], and alice's
        expired record with its seq raised (the signature no longer holds), and a live record
        passed off as a mark. sn2 keeps none of them and says why in one log line; alice's
        next write to that key is stored. A genuine expired record of hers is kept (it proves
        only what she wrote)."""
        huge = str((1 << 64) - 1)
        old = self.dht("alice", None, "sign", "--type", "note", "--name", "locked",
                       "--value", "1", "--lifetime", "-5")
        forged = dict(old)
        so = json.loads(forged["signed"])
        so["seq"] = huge
        forged["signed"] = json.dumps(so, separators=(",", ":"))
        live = self.dht("alice", None, "sign", "--type", "note", "--name", "locked",
                        "--value", "2")
        key = key_of("note", "locked")
        before = self.sn_status("sn2")["store"]["marks"]
        with self.link("sn2") as l:
            a = l.request("replicate", {"records": [], "marks": [
                [key, "sip:alice@" + OVERLAY, huge], forged, live]})
            self.assertEqual((a or {}).get("kind"), "res", a)
            self.assertEqual(a["body"].get("marks"), 0, a)
            line = self.sn["sn2"].wait_for("rollback marks refused", 5)
            note("sn2: %s", line.split(" repl: ", 1)[-1][:200])
            self.assertIn("3 rollback marks refused", line)
            self.assertEqual(self.sn_status("sn2")["store"]["marks"], before)
            a = l.request("replicate", {"records": [], "marks": [old]})
            self.assertEqual(a["body"].get("marks"), 1, a)  # signed evidence: kept
        r = self.dht("alice", "sn2", "put", "--type", "note", "--name", "locked",
                     "--value", "3", "--mode", "update")
        self.assertTrue(r.get("ok"), "alice was locked out of her key: %r" % r)
        self.assert_honest_ok("forged-marks")

    # ---- 4: a key with many large records ----

    def test_4_get_pages(self):
        """Eight owners each store a 14 KB record under one key (quota_per_key allows 32):
        more than one 64 KB frame. Before: the reply could not be encoded and the key was
        unreadable (timeout). Now the answer carries what fits, `more` and `after`, and the
        next page continues after that owner."""
        owners = ("rogue", "rogue2", "alice", "bob", "sn1", "sn2", "sn3", "sn9")
        big = "x" * 14000
        for u in owners:
            r = self.dht(u, "sn1", "put", "--type", "shared", "--name", "big",
                         "--value", json.dumps(big), "--mode", "add")
            self.assertTrue(r.get("ok"), "%s: %r" % (u, r))
        key = key_of("shared", "big")
        got, pages, after = [], 0, None
        with self.link("sn3", who="bob") as l:
            a = l.request("attach", {})  # as an ordinary node reads
            self.assertEqual((a or {}).get("kind"), "res", a)
            while True:
                body = {"key": key}
                if after:
                    body["after"] = after
                a = l.request("get", body)
                self.assertEqual((a or {}).get("kind"), "res", a)
                size = len(json.dumps(a, separators=(",", ":")))
                self.assertLess(size, 65536)
                pages += 1
                got += [json.loads(r["signed"])["owner"] for r in a["body"]["records"]]
                note("page %d: %d records, %d bytes, more=%s", pages,
                     len(a["body"]["records"]), size, a["body"].get("more"))
                if not a["body"].get("more"):
                    break
                after = a["body"]["after"]
                self.assertLess(pages, 10)
        self.assertGreater(pages, 1)
        want = sorted("sip:%s@%s" % (u, OVERLAY) for u in owners)
        self.assertEqual(sorted(got), want)
        # The readers follow the pages: dhtctl get through every member, and an ordinary
        # node's lookup (which checks key, type and name of every record on every page).
        for u in RING:
            r = self.dht("bob", u, "get", "--type", "shared", "--name", "big")
            recs = r.get("records", [])
            note("dhtctl get through %s: %d records in %s pages", u, len(recs), r.get("pages"))
            self.assertTrue(r.get("ok") and not r.get("incomplete"), r)
            self.assertGreater(r.get("pages", 0), 1)
            self.assertEqual(sorted(e.get("owner") for e in recs), want)
            self.assertTrue(all(e.get("verified") and e.get("value") == big for e in recs))
        on = self.start_on("alice")
        try:
            on.wait_for("published user location", timeout=WAIT)
            rc, out, err = self.cli("alice", "get", "shared", "big", "--json")
            self.assertEqual(rc, 0, err)
            res = json.loads(out)
            recs = res.get("records", [])
            note("ordinarynode get: %d records in %s pages", len(recs), res.get("pages"))
            self.assertGreater(res.get("pages", 0), 1)
            self.assertFalse(res.get("incomplete"))
            self.assertEqual(sorted(e.get("owner") for e in recs), want)
            self.assertTrue(all(e.get("verified") and e.get("value") == big for e in recs))
            self.assertNotIn("not asked for", on.log())
        finally:
            self.assertEqual(on.stop(), 0)
        self.assert_honest_ok("get-pages")

    # ---- 5: ping flood ----

    def test_5_ping_flood(self):
        """rogue floods sn2 with pings and never reads: sn2 cuts the link (rate or unread
        answers) and logs it; the ring and its users do not notice."""
        l = self.link("sn2", read=False)
        frame = overlaypeer.encode(OVERLAY, "ping", "req", {}, "0123456789abcdef")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 30:
                l.send_raw(frame * 2000)
        except overlaypeer.Closed as e:
            note("flood: the link failed %.1f s after the flood began (%s)",
                 time.monotonic() - t0, e)
        finally:
            l.close()
        line = self.sn["sn2"].wait_for("closing its link", 10)
        note("sn2: %s", line.split(" link: ", 1)[-1])
        self.assertGreaterEqual(self.refused("sn2").get("links_cut", 0), 1)
        self.assert_honest_ok("ping-flood")

    def test_5b_requests_without_reading(self):
        """rogue sends sn3 pings well under the rate budget (about 5 000/s) and never reads:
        once more than half of sn3's write queue has waited 5 s, sn3 cuts the link."""
        l = self.link("sn3", read=False)
        frame = overlaypeer.encode(OVERLAY, "ping", "req", {}, "0123456789abcdef")
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 60:
                l.send_raw(frame * 500)
                time.sleep(0.1)
        except overlaypeer.Closed:
            pass
        finally:
            l.close()
        line = self.sn["sn3"].wait_for("without reading the answers", 10)
        note("after %.1f s: %s", time.monotonic() - t0, line.split(" link: ", 1)[-1])
        self.assert_honest_ok("unread")

    # ---- 5c: a rogue responsible node confirms every offer ----

    def test_5c_offers_confirmed_by_rogue(self):
        """rogue2 joins for real as X between A and S (rogue2, since test 6 joins as rogue:
        one identity joining twice would meet the address the ring learnt the first time), never syncs its range and confirms every
        `offer` (the replica drop of docs/ring.md 8). A record of (A, X] was stored before:
        S, its successor T and A hold it. After the lease, the copies no responsible node
        confirms are offered to X, which says it holds them. Before: S kept its copy (X is its
        predecessor) but T dropped it, and every copy but one could be made to go. Now a node
        drops only when it knows `replication` live nodes in [key, itself): T knows X and S, 2
        of 3, and keeps its copy; A, which is no holder (X, S and T precede it), drops it."""
        x = self.node_id["rogue2"]
        ids = sorted(self.node_id[u] for u in RING)
        succ_id = next((i for i in ids if i > x), ids[0])
        pred_id = [i for i in ids if i < x][-1] if any(i < x for i in ids) else ids[-1]
        s_name = next(u for u in RING if self.node_id[u] == succ_id)
        a_name = next(u for u in RING if self.node_id[u] == pred_id)
        t_name = next(u for u in RING if u not in (s_name, a_name))
        width = (int(x, 16) - int(pred_id, 16)) % (1 << 160)
        name = next("offer-%d" % n for n in range(5000000)
                    if 0 < (int(key_of("note", "offer-%d" % n), 16) - int(pred_id, 16))
                    % (1 << 160) <= width)
        key = key_of("note", name)
        r = self.dht("alice", t_name, "put", "--type", "note", "--name", name,
                     "--value", json.dumps({"kept": True}), "--mode", "update")
        self.assertTrue(r.get("ok"), r)

        def holds(u):
            recs = self.ctl(u, {"cmd": "records"}).get("records", [])
            return any(e[0] == key for e in recs)
        wait_until("every member holds the record", lambda: all(holds(u) for u in RING), WAIT)
        state = {"offers": {}}

        def member(link, f):
            if f.get("type") == "stabilize" and f.get("kind") == "req":
                link.send("stabilize", "res", {
                    "pred": {"id": pred_id, "addr": self.addr[a_name]},
                    "succ": [{"id": succ_id, "addr": self.addr[s_name]}],
                    "load": {"attached": 0, "capacity": 10}}, f["tid"])
            elif f.get("type") == "route" and f.get("kind") == "ind":
                b = f["body"]
                if b.get("op") == "offer":
                    who = b.get("origin", {}).get("id")
                    state["offers"][who] = state["offers"].get(who, 0) + 1
                ok = b.get("op") != "join"
                link.send("reply", "ind", {
                    "rid": b["rid"], "hops": b.get("hops", 0), "ok": ok,
                    "result": {"records": []} if b.get("op") == "get" else {},
                    "node": {"id": x, "addr": lst.addr}} if ok else {
                    "rid": b["rid"], "hops": 0, "ok": False, "code": "not-ready",
                    "node": {"id": x, "addr": lst.addr}, "reason": "test"})

        lst = overlaypeer.Listener(self.dirs["rogue2"], OVERLAY, on_frame=member)
        join = self.link(s_name, who="rogue2", on_frame=member)
        try:
            join.send("route", "ind", {
                "rid": overlaypeer.new_tid(), "target": x, "origin": {"id": x, "addr": lst.addr},
                "hops": 0, "final": False, "op": "join", "args": {}})
            wait_until("%s adopts the rogue as its successor" % a_name,
                       lambda: self.sn_status(a_name)["succ"][0]["id"] == x, WAIT)
            t_id = self.node_id[t_name]
            wait_until("%s offers its copies to the rogue" % t_name,
                       lambda: state["offers"].get(t_id, 0) >= 1, 40)
            wait_until("%s drops its copy (no holder)" % a_name, lambda: not holds(a_name), 20)
            time.sleep(2)  # T's offer is answered by now
            note("offers confirmed by the rogue, by origin: %s",
                 {next(u for u in RING if self.node_id[u] == k): v
                  for k, v in state["offers"].items() if k in ids})
            kept = {u: holds(u) for u in RING}
            note("copies after the rogue's confirmations (S %s, T %s, A %s): %s", s_name,
                 t_name, a_name, kept)
            self.assertTrue(kept[s_name] and kept[t_name],
                            "a holder dropped its copy on the rogue's word: %s" % kept)
        finally:
            lst.close()
            join.close()
        wait_until("the ring without the rogue", lambda: self.ring_ok(RING), WAIT)
        r = self.dht("bob", s_name, "get", "--type", "note", "--name", name)
        recs = r.get("records", [])
        self.assertTrue(len(recs) == 1 and recs[0].get("value") == {"kept": True}, r)
        self.assert_honest_ok("offers")

    # ---- 6: a forged reply (the rogue joins the ring: runs last) ----

    def test_6_forged_reply(self):
        """rogue joins for real as X (its own certificate, its own link to its successor S)
        and plays a minimal member: it answers its predecessor A's stabilize. bob reads a key
        of X's range through A; A routes it to X. rogue2, connected to A, answers first with
        alice's canary record (another key: the call hijack of item 1). A refuses it: X,
        which it hears from, lies between the key and rogue2. Then X answers (no records):
        bob gets that. When X leaves, the ring repairs."""
        x = self.node_id["rogue"]
        r2 = self.node_id["rogue2"]
        ids = sorted(self.node_id[u] for u in RING)
        succ_id = next((i for i in ids if i > x), ids[0])
        pred_id = [i for i in ids if i < x][-1] if any(i < x for i in ids) else ids[-1]
        s_name = next(u for u in RING if self.node_id[u] == succ_id)
        a_name = next(u for u in RING if self.node_id[u] == pred_id)
        # a key in (A, X], and not in [rogue2, X] (there rogue2 would be the successor)
        lo = r2 if 0 < (int(x, 16) - int(r2, 16)) % (1 << 160) < \
            (int(x, 16) - int(pred_id, 16)) % (1 << 160) else pred_id
        width = (int(x, 16) - int(lo, 16)) % (1 << 160)
        name = next("probe-%d" % n for n in range(5000000)
                    if 0 < (int(key_of("note", "probe-%d" % n), 16) - int(lo, 16)) % (1 << 160)
                    <= width)
        # a validly signed record of alice under another key: what a hijacker answers with
        canary_env = self.dht("alice", None, "sign", "--type", "note", "--name", "canary",
                              "--value", json.dumps({"alive": True}))
        self.assertIn("signed", canary_env)
        state = {"routes": [], "forged": 0}
        r2link = self.link(a_name, who="rogue2")

        def member(link, f):
            if f.get("type") == "stabilize" and f.get("kind") == "req":
                link.send("stabilize", "res", {
                    "pred": {"id": pred_id, "addr": self.addr[a_name]},
                    "succ": [{"id": succ_id, "addr": self.addr[s_name]}],
                    "load": {"attached": 0, "capacity": 10}}, f["tid"])
            elif f.get("type") == "route" and f.get("kind") == "ind":
                b = f["body"]
                state["routes"].append(b)
                if b.get("op") == "get" and b["args"].get("key") == key_of("note", name):
                    forged = {"records": [canary_env]}
                    r2link.send("reply", "ind", {
                        "rid": b["rid"], "hops": 1, "ok": True, "result": forged,
                        "node": {"id": r2, "addr": self.addr[a_name]}})
                    state["forged"] += 1
                    time.sleep(0.3)
                ok = b.get("op") != "join"
                link.send("reply", "ind", {
                    "rid": b["rid"], "hops": b.get("hops", 0), "ok": ok,
                    "result": {"records": []} if b.get("op") == "get" else {
                        "succ": [{"id": x, "addr": lst.addr}]},
                    "node": {"id": x, "addr": lst.addr}} if ok else {
                    "rid": b["rid"], "hops": 0, "ok": False, "code": "not-ready",
                    "node": {"id": x, "addr": lst.addr}, "reason": "test"})

        lst = overlaypeer.Listener(self.dirs["rogue"], OVERLAY, on_frame=member)
        join = self.link(s_name, on_frame=member)
        try:
            join.send("route", "ind", {
                "rid": overlaypeer.new_tid(), "target": x, "origin": {"id": x, "addr": lst.addr},
                "hops": 0, "final": False, "op": "join", "args": {}})
            wait_until("%s adopts the rogue as its successor" % a_name,
                       lambda: self.sn_status(a_name)["succ"][0]["id"] == x, WAIT)
            r = self.dht("bob", a_name, "get", "--type", "note", "--name", name)
            note("bob's read of %s through %s: %s", name, a_name,
                 {k: r.get(k) for k in ("ok", "code", "records")})
            self.assertGreaterEqual(state["forged"], 1, "the route never reached the rogue")
            self.assertEqual(r.get("records", []), [], "the forged answer was taken: %r" % r)
            line = self.sn[a_name].wait_for("is closer to the target", 5)
            note("%s: %s", a_name, line.split(" route: ", 1)[-1])
            self.assertGreaterEqual(self.refused(a_name).get("replies", 0), 1)
            self.descriptors_run_out(a_name, x, lst)
        finally:
            lst.close()
            join.close()
            r2link.close()
        wait_until("the ring without the rogue", lambda: self.ring_ok(RING), WAIT)
        self.assert_honest_ok("forged-reply")

    def descriptors_run_out(self, a_name, x, lst):
        """Item 4: A's successor is the rogue X, alive. A's descriptor limit is lowered to what
        it has open and X drops A's link: A must dial X again and cannot (EMFILE). Before,
        that made A declare X dead and move on; now it logs its own shortage, keeps X, and
        links again once descriptors are back."""
        pid = self.sn[a_name].proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        gone = "%s at" % x[:8]
        before = len(self.log_of(a_name).splitlines())
        # A's descriptors, and which of them is its link to X (by the link's local port)
        inode_fd = {}
        for f in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, f))
            except OSError:
                continue
            if t.startswith("socket:["):
                inode_fd[t[8:-1]] = int(f)
        port_fd = {}
        with open("/proc/%d/net/tcp" % pid) as f:
            tcp = f.read().splitlines()[1:]
        for line in tcp:
            col = line.split()
            if col[9] in inode_fd:
                port_fd[int(col[1].split(":")[1], 16)] = inode_fd[col[9]]
        a_links = [l for l in lst.links if l.closed_reason is None and
                   l.sock.getpeername()[1] in port_fd]
        self.assertTrue(a_links, "no link from %s to X" % a_name)
        fds = {int(f) for f in os.listdir("/proc/%d/fd" % pid)}
        free = min(i for i in range(len(fds) + 1) if i not in fds)
        # below every descriptor the link frees: no new socket until the limit is back
        limit = min([free] + [port_fd[l.sock.getpeername()[1]] for l in a_links])
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        try:
            for link in a_links:
                link.close_after = 0  # closed by its reader at A's next message (stabilize)
            line = self.sn[a_name].wait_for("our own shortage", 10)
            note("%s limited to descriptors below %d: %s", a_name, limit, line.split(": ", 1)[-1][:160])
            time.sleep(3)  # three stabilisation periods without a link to X
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        gone_lines = [l for l in self.log_of(a_name).splitlines()[before:]
                      if gone in l and "is gone" in l]
        self.assertEqual(gone_lines, [], "%s declared X dead for its own shortage" % a_name)
        wait_until("%s links to X again" % a_name, lambda: len(lst.links) > 0, 10)
        self.assertEqual(self.sn_status(a_name)["succ"][0]["id"], x)
        note("%s kept X as its successor through the shortage and linked again", a_name)

    def ctl(self, u, request, timeout=10.0):
        """One request on u's control socket: the parsed answer."""
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(timeout)
            c.connect(os.path.join(self.dirs[u], "control.sock"))
            c.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = c.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
