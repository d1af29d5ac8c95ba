#!/usr/bin/env python3
"""Rollback marks travel (issue 15, item 13; docs/protocol.md 4.4, docs/ring.md 5 and 8).

A super node that saw a record expire remembers it (a "mark": the expired
record itself, signed by its owner) so that an older record of the same owner,
signed earlier with a longer lifetime, cannot be replayed into its place. The
memory used to stay on that node: when the key moved to another node, the
replay was accepted there. Here, in a ring of four with replication_factor 1
(so that the node taking the key over never held the record itself):

1. alice signs an "old" record with a lifetime of 10 minutes and keeps it;
   she then stores a newer one living 3 s. It expires at the responsible node
   X, which keeps a mark, and refuses the replay of the old record (stale).
2. X leaves gracefully: it hands its records and its marks to its successor
   Y. The replay of the old record, now routed to Y, is refused as stale
   (before: stored, and every reader got the old value back).
3. Honest users are unaffected: alice's next write is stored and read back,
   and bob's record under a key of X's range survived the hand-off.
4. (RingMarksSync) the same through anti-entropy: in a ring of three with
   replication_factor 2, the replica Y restarts (marks are in memory) and
   gets the mark back from X's sync; X is then killed (no hand-off) and Y,
   responsible now, refuses the replay.

Run: python3 tests/integration/test_ring_marks.py --bindir <build dir>
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "marks.p2psip"
SNS = ("sn1", "sn2", "sn3", "sn4")
USERS = ("alice", "bob")
WAIT = 30
wait_until = harness.wait_until


def note(fmt, *args):
    print("  [ring-marks] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def key_of(rtype, name):
    return hashlib.sha1((rtype + "|" + name).encode()).hexdigest()


class MarksBase(harness.OverlayScenario):
    """What both scenarios share: helpers, daemon settings, clean-up."""

    @classmethod
    def node_conf(cls, u, conf):
        if u.startswith("sn"):
            conf["log_level"] = "debug" if os.environ.get("RING_MARKS_DEBUG") else "info"

    @classmethod
    def tearDownClass(cls):
        cls.stop_checked("test_ring_marks")

    @classmethod
    def ring_ok(cls, names):
        ids = sorted(cls.node_id[u] for u in names)
        for u in names:
            st = cls.sn_status(u)
            i = ids.index(cls.node_id[u])
            if st.get("state") != "member" or (st.get("pred") or {}).get("id") != ids[i - 1]:
                return False
            if [s["id"] for s in st.get("succ", [])][:1] != [ids[(i + 1) % len(ids)]]:
                return False
        return True

    @classmethod
    def dht(cls, user, sn, *args, stdin=None):
        """`dhtctl --json` as `user` through super node `sn`: the last JSON line."""
        argv = [os.path.join(harness.BINDIR, "supernode", "dhtctl"), "--state", cls.dirs[user],
                "--sn", cls.addr[sn], "--json"]
        p = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60,
                           input=stdin if stdin is not None else "")
        lines = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
        return lines[-1] if lines else {"ok": False, "stderr": p.stderr[-500:]}

    @classmethod
    def sign(cls, user, rtype, name, value, lifetime):
        argv = [os.path.join(harness.BINDIR, "supernode", "dhtctl"), "--state", cls.dirs[user],
                "sign", "--type", rtype, "--name", name, "--value", json.dumps(value),
                "--lifetime", str(lifetime)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        return p.stdout.strip()

    @classmethod
    def responsible(cls, key, names):
        """The member whose range (pred, self] holds `key`."""
        ids = sorted(cls.node_id[u] for u in names)
        k = int(key, 16)
        owner = next((i for i in ids if int(i, 16) >= k), ids[0])
        return next(u for u in names if cls.node_id[u] == owner)


class RingMarks(MarksBase, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-marks-")
        cls.daemons = []
        try:
            cls.build_overlay(OVERLAY, SNS, USERS, wait=WAIT,
                              ls_extra={"replication_factor": 1})
            cls.dirs = {u: os.path.join(cls.tmp, u) for u in SNS + USERS}
            wait_until("a ring of four", lambda: cls.ring_ok(SNS), WAIT)
        except BaseException:
            cls.tearDownClass()
            raise

    def test_marks_follow_hand_off(self):
        # A key of a node X that is not sn1 (requests go through sn1), and X's successor Y.
        ids = sorted(self.node_id[u] for u in SNS)
        for n in range(1000):
            name = "rollback-%d" % n
            x = self.responsible(key_of("note", name), SNS)
            if x != "sn1":
                break
        y = next(u for u in SNS
                 if self.node_id[u] == ids[(ids.index(self.node_id[x]) + 1) % len(ids)])
        note("key of note|%s at %s; its successor %s takes it over", name, x, y)
        # Bob's record in the same range, to see that honest records survive the hand-off.
        for n in range(1000):
            bname = "bob-%d" % n
            if self.responsible(key_of("note", bname), SNS) == x:
                break
        r = self.dht("bob", "sn1", "put", "--type", "note", "--name", bname,
                     "--value", json.dumps({"bob": 1}), "--mode", "update")
        self.assertTrue(r.get("ok"), r)

        old = self.sign("alice", "note", name, {"v": "old"}, 600)
        time.sleep(0.01)  # the next record's seq (microseconds) is higher
        r = self.dht("alice", "sn1", "put", "--type", "note", "--name", name,
                     "--value", json.dumps({"v": "new"}), "--lifetime", "3", "--mode", "update")
        self.assertTrue(r.get("ok"), r)
        wait_until("the record expired into a mark at %s" % x,
                   lambda: self.sn_status(x).get("store", {}).get("marks", 0) >= 1, 15)
        st_y = self.sn_status(y).get("store", {})
        note("%s: marks %s; %s (never held it): marks %s", x,
             self.sn_status(x)["store"]["marks"], y, st_y.get("marks"))
        # The replay at X: refused (the mark of issue 15).
        r = self.dht("alice", "sn1", "send", "--mode", "update", stdin=old + "\n")
        note("replay at %s: %r", x, r)
        self.assertEqual((r.get("ok"), r.get("code")), (False, "stale"), r)

        # X leaves gracefully: records and marks go to Y.
        self.assertEqual(self.sn[x].stop(), 0)
        line = self.sn[x].wait_for("rollback marks to", timeout=5)
        note("%s: %s", x, line[line.find("handing"):])
        rest = tuple(u for u in SNS if u != x)
        wait_until("a ring of three", lambda: self.ring_ok(rest), WAIT)
        st_y = self.sn_status(y).get("store", {})
        note("%s after the hand-off: marks %s", y, st_y.get("marks"))

        # The replay at Y, the new responsible node: refused too.
        r = self.dht("alice", "sn1", "send", "--mode", "update", stdin=old + "\n")
        note("replay at %s: %r", y, r)
        self.assertEqual((r.get("ok"), r.get("code")), (False, "stale"), r)
        self.assertIn("1 rollback marks", line)
        self.assertGreaterEqual(st_y.get("marks", 0), 1)
        r = self.dht("bob", "sn1", "get", "--type", "note", "--name", name)
        self.assertTrue(r.get("ok"), r)
        self.assertEqual(r.get("records"), [], "the old record came back: %r" % r)
        self.assertEqual(r["node"]["id"], self.node_id[y])

        # Honest users: alice's next write, and bob's record that X handed over.
        r = self.dht("alice", "sn1", "put", "--type", "note", "--name", name,
                     "--value", json.dumps({"v": "newer"}), "--mode", "update")
        self.assertTrue(r.get("ok"), r)
        r = self.dht("bob", "sn2" if x != "sn2" else "sn3", "get", "--type", "note",
                     "--name", name)
        recs = r.get("records", [])
        self.assertTrue(len(recs) == 1 and recs[0].get("verified")
                        and recs[0].get("value") == {"v": "newer"}, r)
        r = self.dht("alice", "sn1", "get", "--type", "note", "--name", bname)
        recs = r.get("records", [])
        self.assertTrue(len(recs) == 1 and recs[0].get("value") == {"bob": 1}, r)


class RingMarksSync(MarksBase, unittest.TestCase):
    """Marks travel with anti-entropy: in a ring of three with replication_factor 2, the
    record expires at its responsible node X and its replica Y, which both keep a mark. Y
    restarts (its store is in memory: the mark is gone) and gets the mark back from X's sync
    (the marks digest differs, X pushes its marks of the range). Then X is killed: Y takes the
    key over and refuses the replay (before: the restarted Y stored it)."""

    SNS = ("sn1", "sn2", "sn3")

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-marks2-")
        cls.daemons = []
        try:
            cls.build_overlay(OVERLAY, cls.SNS, USERS, wait=WAIT,
                              ls_extra={"replication_factor": 2})
            cls.dirs = {u: os.path.join(cls.tmp, u) for u in cls.SNS + USERS}
            wait_until("a ring of three", lambda: cls.ring_ok(cls.SNS), WAIT)
        except BaseException:
            cls.tearDownClass()
            raise

    def kill(self, u):
        d = self.sn.pop(u)
        d.stop(signal.SIGKILL)
        self.daemons.remove(d)  # killed on purpose: not a crash at the end

    def test_marks_follow_sync(self):
        sns = self.SNS
        ids = sorted(self.node_id[u] for u in sns)
        # Neither X nor Y is sn1, the seed (restarted, it would start a ring of its own).
        def succ_of(u):
            return next(v for v in sns
                        if self.node_id[v] == ids[(ids.index(self.node_id[u]) + 1) % len(ids)])
        for n in range(1000):
            name = "sync-%d" % n
            x = self.responsible(key_of("note", name), sns)
            y = succ_of(x)
            if "sn1" not in (x, y):
                break
        via = "sn1"
        note("key of note|%s at %s, replica %s; requests through %s", name, x, y, via)
        old = self.sign("alice", "note", name, {"v": "old"}, 600)
        time.sleep(0.01)
        r = self.dht("alice", via, "put", "--type", "note", "--name", name,
                     "--value", json.dumps({"v": "new"}), "--lifetime", "3", "--mode", "update")
        self.assertTrue(r.get("ok"), r)
        for u in (x, y):
            wait_until("the record expired into a mark at %s" % u,
                       lambda: self.sn_status(u).get("store", {}).get("marks", 0) >= 1, 15)

        # Y restarts with an empty store, and gets the mark back from X's sync.
        self.kill(y)
        self.sn[y] = self.start([self.bin("supernode"), "-d", "-c", self.cfg[y]])
        self.sn[y].wait_for("joined the ring", timeout=WAIT)
        wait_until("a ring of three again", lambda: self.ring_ok(sns), WAIT)
        t0 = time.monotonic()
        try:
            wait_until("the mark back at %s" % y,
                       lambda: self.sn_status(y).get("store", {}).get("marks", 0) >= 1, 15)
        finally:
            note("%s after its restart: marks %s (%.1f s after the ring was whole)", y,
                 self.sn_status(y).get("store", {}).get("marks"), time.monotonic() - t0)

        # X dies (no hand-off): Y is responsible now, and refuses the replay.
        self.kill(x)
        rest = tuple(u for u in sns if u != x)
        wait_until("a ring of two", lambda: self.ring_ok(rest), WAIT)
        # A super node that saw the ring shrink may call itself unhealthy for a moment after
        # the others agree on the new ring ("not part of a working ring"): ask until it serves.
        got = []
        wait_until("%s serving again" % via, lambda: got.append(self.dht(
            "alice", via, "send", "--mode", "update", stdin=old + "\n")) or
            "not part of a working ring" not in got[-1].get("stderr", ""), WAIT)
        r = got[-1]
        note("replay at %s: %r", y, r)
        self.assertEqual((r.get("ok"), r.get("code")), (False, "stale"), r)
        r = self.dht("bob", via, "get", "--type", "note", "--name", name)
        self.assertTrue(r.get("ok") and r.get("records") == [], r)
        self.assertEqual(r["node"]["id"], self.node_id[y])
        # Honest: alice's next write is stored and read back.
        r = self.dht("alice", via, "put", "--type", "note", "--name", name,
                     "--value", json.dumps({"v": "newer"}), "--mode", "update")
        self.assertTrue(r.get("ok"), r)
        r = self.dht("bob", y, "get", "--type", "note", "--name", name)
        recs = r.get("records", [])
        self.assertTrue(len(recs) == 1 and recs[0].get("value") == {"v": "newer"}, r)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
