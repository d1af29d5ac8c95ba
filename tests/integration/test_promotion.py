#!/usr/bin/env python3
"""Automatic promotion (issue 7, docs/promotion.md), with real daemons: an
ordinary node whose overlay port super nodes can reach, that has been up long
enough, has the resources and is invited, becomes a super node in its own
process: it joins the ring, is listed by the bootstrap server, serves new
ordinary nodes, and its user keeps working. A node whose connect-back probe
fails never promotes; a promoted node that becomes unreachable hands its
records off and is an ordinary node again with nothing lost; a node whose
reachability comes and goes every few seconds does not flap.

Reachability is switched on and off with a TCP relay the test controls: each
candidate advertises the relay's port, which forwards to its real overlay
port; switching the relay off refuses new connections and cuts the open ones,
as a firewall or a lost port forward would."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "promo-test.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 90 if SLOW else 30
MIN_UPTIME = 4  # promotion_min_uptime_s of the test overlay


free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [promotion] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class Relay:
    """127.0.0.1:port -> target, switchable. Off: the port refuses connections and the
    relayed ones are cut."""

    def __init__(self, target_port):
        self.port = free_port()
        self.target = target_port
        self.lock = threading.Lock()
        self.pairs = []
        self.lsock = None
        self.stopped = False
        self.on()

    def on(self):
        with self.lock:
            if self.lsock:
                return
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self.lsock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def off(self):
        with self.lock:
            s, self.lsock = self.lsock, None
            pairs, self.pairs = self.pairs, []
        if s:
            s.close()
        for a, b in pairs:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                x.close()

    def close(self):
        self.stopped = True
        self.off()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                t = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                if self.lsock is not s:
                    c.close()
                    t.close()
                    return
                self.pairs.append((c, t))
            threading.Thread(target=self._pump, args=(c, t), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        socks = [a, b]
        try:
            while True:
                r, _, _ = select.select(socks, [], [], 1.0)
                for x in r:
                    data = x.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if x is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        for x in socks:
            try:
                x.close()
            except OSError:
                pass


class Promotion(harness.OverlayScenario, unittest.TestCase):
    daemons = []
    daemons_all = []  # also those a test stopped, for the logs
    relays = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-promo-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        cls.relay, cls.listen = {}, {}
        plain = ("alice", "bob", "carol")        # accounts that may not host a super node
        cands = ("pat", "quinn", "flo", "nora", "vic")  # accounts that may
        cls.build_overlay(OVERLAY, ("sn1", "sn2", "sn3"), plain + cands, no_supernode=plain,
                          ls_extra={"promotion_min_uptime_s": MIN_UPTIME,
                                    "promotion_min_cpus": 1, "promotion_min_free_mem_mb": 1,
                                    "promotion_min_bandwidth_kbps": 100,
                                    "promotion_sn_target_load": 1}, wait=WAIT)
        for u in ("alice", "bob"):
            cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
        for u in ("alice", "bob"):
            cls.on[u].wait_for("attached to super node", timeout=WAIT)

    @classmethod
    def node_conf(cls, u, conf):
        if u.startswith("sn"):
            return
        conf["log_level"] = "debug"
        # Every ordinary node starts on sn1, so that sn1 carries more than
        # promotion_sn_target_load (1) and invites the reachable ones.
        conf["supernodes"] = [cls.addr["sn1"]]
        if u in ("alice", "bob", "carol"):
            return
        lport = free_port()
        cls.listen[u] = lport
        if u == "quinn":  # nothing ever answers at the advertised port
            adv = free_port()
        else:
            cls.relay[u] = Relay(lport)
            cls.relays.append(cls.relay[u])
            adv = cls.relay[u].port
        cls.addr[u] = "127.0.0.1:%d" % adv
        conf.update({"listen": "127.0.0.1:%d" % lport, "advertise": cls.addr[u]})

    @classmethod
    def tearDownClass(cls):
        problems = cls.stop_all()
        for r in cls.relays:
            r.close()
        if BINDIR:  # for reading after a failure (CI keeps the build directory's files)
            out = os.path.join(BINDIR, "test_promotion-logs")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out, exist_ok=True)
            for i, d in enumerate(cls.daemons_all):
                name = next((os.path.basename(a)[:-5] for a in d.argv if a.endswith(".json")), "x")
                with open(os.path.join(out, "%02d-%s.log" % (i, name)), "w") as f:
                    f.write(d.log() + "\n")
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    @classmethod
    def start(cls, argv):
        d = super().start(argv)
        cls.daemons_all.append(d)
        return d

    def sn_status(self, u):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg[u], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def ring_ids(self):
        """Node-IDs on sn1's successor list and its predecessor."""
        st = self.sn_status("sn1") or {}
        ids = {s["id"] for s in st.get("succ", [])}
        if st.get("pred"):
            ids.add(st["pred"]["id"])
        return ids

    def lookup(self, u, type_, name):
        rc, out, err = self.cli(u, "get", type_, name, "--json")
        return json.loads(out) if rc == 0 else None

    def verified(self, u, type_, name):
        res = self.lookup(u, type_, name)
        return bool(res) and any(r.get("verified") for r in res["records"])

    def promotion(self, u):
        st = self.status(u)
        return st["promotion"] if st else None

    # ---- the tests ----

    def test_1_reachable_node_is_promoted(self):
        """Low thresholds: the reachable, invited node becomes a super node, is listed by the
        bootstrap server, sits in the ring, serves a new ordinary node, and its user's records
        and CLI keep working."""
        t0 = time.monotonic()
        pat = self.start_on("pat")
        pat.wait_for("invites us to become a super node", timeout=WAIT)
        pat.wait_for("promoted: now a super node", timeout=WAIT)
        took = time.monotonic() - t0
        say("pat promoted %.1f s after start (min_uptime_s %d)", took, MIN_UPTIME)
        self.assertGreaterEqual(took, MIN_UPTIME, "promoted before min_uptime_s")
        # In the ring and on the bootstrap list, under its advertised address.
        wait_until("pat in sn1's ring view", lambda: self.node_id["pat"] in self.ring_ids(), WAIT)
        wait_until("pat listed", lambda: self.addr["pat"] in self.listed(), WAIT)
        pr = self.promotion("pat")
        self.assertEqual(pr["state"], "super node")
        self.assertEqual(pr["promotions"], 1)
        self.assertIn("supernode", pr)
        # Its own user goes through its own role now.
        wait_until("pat attached to itself",
                   lambda: (self.status("pat") or {}).get("supernode", {}).get("id")
                   == self.node_id["pat"], WAIT)
        # A new ordinary node attaches to it (configured with its address only).
        carol = self.start_on("carol", "supernodes=" + self.addr["pat"])
        carol.wait_for("attached to super node %s" % self.node_id["pat"][:8], timeout=WAIT)
        # Records: carol's and pat's locations are found and verified from elsewhere; pat's CLI
        # finds alice.
        for who, name in (("alice", "carol"), ("alice", "pat"), ("pat", "alice"),
                          ("carol", "bob")):
            wait_until("%s finds %s" % (who, name),
                       lambda: self.verified(who, "user location", "%s@%s" % (name, OVERLAY)),
                       WAIT)
        rc, out, err = self.cli("pat", "status")
        self.assertEqual(rc, 0, err)
        self.assertIn("promotion    super node", out)

    def test_2_unreachable_node_never_promotes(self):
        """quinn advertises a port nothing answers at: its probes fail, it is never invited and
        never promotes; accounts without the super node role are off from the start."""
        quinn = self.start_on("quinn")
        quinn.wait_for("not reachable at %s" % self.addr["quinn"], timeout=WAIT)
        time.sleep(3 * MIN_UPTIME)
        pr = self.promotion("quinn")
        self.assertEqual(pr["state"], "ordinary")
        self.assertEqual(pr["promotions"], 0)
        self.assertIn("not verified", pr["blocked"])
        self.assertFalse(pr["criteria"]["reachable"])
        self.assertNotIn("promoting: every criterion", quinn.log())
        self.assertNotIn(self.addr["quinn"], self.listed())
        pa = self.promotion("alice")
        self.assertEqual(pa["state"], "off")
        self.assertIn("super node role", pa["blocked"])

    def test_3_reachability_that_comes_and_goes_does_not_flap(self):
        """flo's relay is on 3 s, off 3 s, for 8 cycles: it is never reachable long enough."""
        flo = self.start_on("flo")
        relay = self.relay["flo"]
        flo.wait_for("attached to super node", timeout=WAIT)
        end = time.monotonic() + 48
        cycles = 0
        while time.monotonic() < end:
            relay.on()
            time.sleep(3)
            relay.off()
            time.sleep(3)
            cycles += 1
        log = flo.log()
        reach = log.count("reachable at %s (verified" % self.addr["flo"])
        lost = log.count("not reachable at %s" % self.addr["flo"])
        say("flo: %d on/off cycles, reachable %d times, lost it %d times, promoted %d times",
            cycles, reach, lost, log.count("promoted: now"))
        self.assertGreaterEqual(reach, 3, "the relay's on periods were never seen")
        self.assertGreaterEqual(lost, 3)
        self.assertNotIn("promoting: every criterion", log)
        self.assertEqual(self.promotion("flo")["promotions"], 0)
        relay.on()

    def test_4_demotion_hands_off_and_loses_nothing(self):
        """pat (promoted in test 1) becomes unreachable: it leaves the ring after handing its
        records off, attaches as an ordinary node again, and every record is still found;
        switched back on, it is held back instead of promoting again at once."""
        if "pat" not in self.on:
            self.skipTest("pat was not started (test 1 failed)")
        pat = self.on["pat"]
        if "promoted: now" not in pat.log():
            self.skipTest("pat was not promoted (test 1 failed)")
        names = ["n%d" % i for i in range(24)]
        for n in names:
            rc, out, err = self.cli("bob", "add", "note", n, json.dumps({"n": n}))
            self.assertEqual(rc, 0, err)
        keys_on_pat = self.promotion("pat")["supernode"]["store"]["keys"]
        say("pat holds %d keys before it loses reachability", keys_on_pat)
        self.assertGreater(keys_on_pat, 0)
        self.relay["pat"].off()
        pat.wait_for("demoting: not reachable", timeout=WAIT)
        pat.wait_for("demoted: an ordinary node again", timeout=WAIT)
        wait_until("pat attached elsewhere",
                   lambda: (self.status("pat") or {}).get("supernode", {}).get("id")
                   in {self.node_id[s] for s in ("sn1", "sn2", "sn3")}, WAIT)
        wait_until("pat out of sn1's ring view",
                   lambda: self.node_id["pat"] not in self.ring_ids(), WAIT)
        wait_until("pat off the bootstrap list", lambda: self.addr["pat"] not in self.listed(),
                   WAIT)
        t0 = time.monotonic()
        missing = list(names)
        while missing and time.monotonic() - t0 < WAIT:
            missing = [n for n in missing if not self.verified("alice", "note", n)]
            if missing:
                time.sleep(0.5)
        say("every record found %.1f s after pat left the ring view", time.monotonic() - t0)
        self.assertEqual(missing, [], "records lost in the hand-off")
        for who, name in (("alice", "pat"), ("pat", "bob"), ("bob", "carol")):
            wait_until("%s finds %s" % (who, name),
                       lambda: self.verified(who, "user location", "%s@%s" % (name, OVERLAY)),
                       WAIT)
        # Back on: reachable again, but held back (hysteresis), not promoted within the window.
        self.relay["pat"].on()
        time.sleep(2 * MIN_UPTIME)
        pr = self.promotion("pat")
        self.assertEqual(pr["state"], "ordinary")
        self.assertEqual((pr["promotions"], pr["demotions"]), (1, 1))
        self.assertGreater(pr["criteria"].get("held_for_s", 0), 0)
        self.assertEqual(pat.log().count("promoted: now"), 1)

    def test_5_promoted_node_stops_cleanly(self):
        """nora is promoted, then stopped with SIGTERM: its user's location is removed, it hands
        off and leaves, and the ring is exact again without it."""
        nora = self.start_on("nora")
        nora.wait_for("promoted: now a super node", timeout=WAIT)
        wait_until("nora in the ring", lambda: self.node_id["nora"] in self.ring_ids(), WAIT)
        wait_until("nora attached to itself",
                   lambda: (self.status("nora") or {}).get("supernode", {}).get("id")
                   == self.node_id["nora"], WAIT)
        wait_until("nora's location found",
                   lambda: self.verified("alice", "user location", "nora@" + OVERLAY), WAIT)
        self.assertEqual(nora.stop(signal.SIGTERM), 0)
        self.daemons.remove(nora)
        del self.on["nora"]
        log = nora.log()
        self.assertIn("handing our records to the ring and leaving it", log)
        self.assertIn("left the ring", log)
        wait_until("nora out of the ring", lambda: self.node_id["nora"] not in self.ring_ids(),
                   WAIT)
        wait_until("nora's location removed",
                   lambda: self.lookup("alice", "user location", "nora@" + OVERLAY) is None or
                   not self.lookup("alice", "user location", "nora@" + OVERLAY)["records"], WAIT)

    def test_6_never_promote(self):
        """vic qualifies in every way but its user set never_promote: it stays ordinary and is
        not even probed."""
        vic = self.start_on("vic", "never_promote=true")
        vic.wait_for("will not become a super node: never_promote is set", timeout=WAIT)
        vic.wait_for("published user location", timeout=WAIT)
        time.sleep(2 * MIN_UPTIME)
        pr = self.promotion("vic")
        self.assertEqual((pr["state"], pr["promotions"]), ("off", 0))
        self.assertEqual(pr["blocked"], "never_promote is set")
        self.assertNotIn("reachable at", vic.log())


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
