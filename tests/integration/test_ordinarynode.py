#!/usr/bin/env python3
"""The ordinary node as a person runs it (issue 7, first part): enrolled, given
nothing but the overlay document (which names the bootstrap server), it finds
a super node, attaches, publishes the user's location; another node looks it
up and verifies it; the node fails over when its super node is killed, uses
its host cache after a restart, and copes with a corrupt cache, a bootstrap
server answering garbage, a "super node" that never answers and one without
the super node role."""

import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "on-test.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20


free_port = harness.free_port
wait_until = harness.wait_until


class GarbageHandler(http.server.BaseHTTPRequestHandler):
    """A bootstrap server gone wrong: 200 with a body that is not the list."""

    def do_GET(self):
        body = b"<html>this is not JSON</html>" if "garbage" in self.server.mode else \
            json.dumps({"supernodes": [{"address": "x" * 100}] * 5000}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the node hangs up on the huge answer: expected


class OrdinaryNode(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-on-")
        cls.servers = []
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        ons = ("alice", "bob", "carol")
        # sn4 runs alone in a network namespace (test_7).
        cls.build_overlay(OVERLAY, ("sn1", "sn2", "sn3", "sn4"), ons, no_supernode=ons,
                          start_sns=("sn1", "sn2", "sn3"), wait=WAIT)

    @classmethod
    def tearDownClass(cls):
        problems = []
        for d in reversed(cls.daemons):
            try:
                d.stop()
            except AssertionError as e:
                problems.append(str(e))
        for s in cls.servers:
            s.shutdown()
            s.server_close()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def stop_on(self, u):
        d = self.on.pop(u, None)
        if d is None:  # an earlier test failed before starting it again
            return harness.Daemon(["true"])
        self.assertEqual(d.stop(signal.SIGTERM), 0)
        self.daemons.remove(d)
        return d

    def attached_sn(self, u):
        st = self.status(u)
        return st and st["state"] == "attached" and st["supernode"]

    def lookup(self, u, type_, name):
        rc, out, err = self.cli(u, "get", type_, name, "--json")
        if rc != 0:
            return rc, out + err
        return rc, json.loads(out)

    def sn_user(self, node_id):
        return next(u for u, i in self.node_id.items() if i == node_id)

    def test_1_bootstrap_attach_register_and_lookup(self):
        a = self.start_on("alice")
        a.wait_for("found through: bootstrap", timeout=WAIT)
        a.wait_for("published user location|alice@" + OVERLAY, timeout=WAIT)
        sn = self.attached_sn("alice")
        self.assertIn(sn["addr"], self.addr.values())
        st = self.status("alice")  # NAT discovery: on loopback the super node sees our address
        self.assertIs(st["nat"], False, st)
        self.assertEqual(st["local"], st["reflexive"], st)
        self.start_on("bob").wait_for("published user location|bob@", timeout=WAIT)
        # bob looks alice up and verifies her signature.
        rc, ans = self.lookup("bob", "user location", "alice@" + OVERLAY)
        self.assertEqual(rc, 0, ans)
        [rec] = ans["records"]
        self.assertTrue(rec["verified"])
        self.assertEqual(rec["owner"], "sip:alice@" + OVERLAY)
        self.assertEqual(rec["value"]["node_id"], self.node_id["alice"])
        self.assertEqual(rec["value"]["sn"]["id"], sn["id"])
        self.assertEqual(rec["value"]["reflexive"].split(":")[0], "127.0.0.1")
        # The text form says the same for people.
        rc, out, err = self.cli("bob", "get", "user location", "alice@" + OVERLAY)
        self.assertEqual(rc, 0, err)
        self.assertIn("sip:alice@%s  seq" % OVERLAY, out)
        self.assertIn("verified", out)
        # The host cache now names the super node and alternates.
        with open(os.path.join(self.tmp, "alice", "supernodes.json")) as f:
            cache = json.load(f)
        self.assertEqual(cache["last"]["id"], sn["id"])
        self.assertGreaterEqual(len(cache["alternates"]), 1)

    def test_2_records_through_the_cli(self):
        rc, out, err = self.cli("alice", "add", "note", "greeting", '{"text": "hello"}',
                                "--lifetime", "600")
        self.assertEqual(rc, 0, err)
        self.assertIn("stored note|greeting", out)
        rc, ans = self.lookup("bob", "note", "greeting")
        self.assertEqual(rc, 0, ans)
        self.assertEqual([r["value"] for r in ans["records"]], [{"text": "hello"}])
        # A second add by the same owner is refused with the store's code.
        rc, out, err = self.cli("alice", "add", "note", "greeting", '"again"')
        self.assertEqual(rc, 1)
        self.assertIn("exists", err)
        rc, out, err = self.cli("alice", "update", "note", "greeting", '"changed"')
        self.assertEqual(rc, 0, err)
        rc, ans = self.lookup("bob", "note", "greeting")
        self.assertEqual([r["value"] for r in ans["records"]], ["changed"])
        rc, out, err = self.cli("alice", "remove", "note", "greeting")
        self.assertEqual(rc, 0, err)
        rc, out, err = self.cli("bob", "get", "note", "greeting")
        self.assertEqual(rc, 3, err)
        self.assertIn("no record", out)
        # Bad input on the command line: clear usage errors.
        rc, out, err = self.cli("alice", "add", "note", "x", "{not json")
        self.assertEqual(rc, 2)
        self.assertIn("not JSON", err)
        rc, out, err = self.cli("alice", "get", "note")
        self.assertEqual(rc, 2)
        # bob cannot write alice's location: the super node refuses it.
        rc, out, err = self.cli("bob", "update", "user location", "alice@" + OVERLAY, '"x"')
        self.assertEqual(rc, 1)
        self.assertIn("forbidden", err)

    def test_3_failover_when_the_super_node_is_killed(self):
        sn = self.attached_sn("alice")
        victim = self.sn_user(sn["id"])
        t0 = time.monotonic()
        self.sn[victim].proc.kill()
        new = wait_until("alice attached elsewhere",
                         lambda: (lambda s: s if s and s["id"] != sn["id"] else None)(
                             self.attached_sn("alice")), 10)
        took = time.monotonic() - t0
        print("\n    alice re-attached to %s in %.2f s" % (self.sn_user(new["id"]), took))
        self.assertLess(took, 10.0 if SLOW else 5.0)
        # Her record names the new super node and is still found (through bob, who may have
        # failed over too).
        def republished():
            rc, ans = self.lookup("bob", "user location", "alice@" + OVERLAY)
            return rc == 0 and ans["records"] and ans["records"][0]["value"]["sn"]["id"] == \
                new["id"] and ans["records"][0]["verified"]
        wait_until("alice's record naming the new super node", republished, WAIT)
        self.__class__.dead = victim

    def test_4_restart_uses_the_host_cache(self):
        d = self.stop_on("alice")
        self.assertIn("stopping: removing", d.log())
        self.assertIn("removed user location|alice@", d.log())
        # Removed on the clean exit. The ring lost a node in test 3 moments ago: while it
        # settles, the copies take up to an anti-entropy round to agree.
        try:
            wait_until("alice's record gone",
                       lambda: self.cli("bob", "get", "user location", "alice@" + OVERLAY)[0] == 3,
                       10)
        except AssertionError as e:
            raise AssertionError("%s\nalice's log:\n%s" % (e, d.log()))
        a = self.start_on("alice")
        line = a.wait_for("attached to super node", timeout=WAIT)
        self.assertRegex(line, r"found through: (cache|last)")
        self.assertNotIn("bootstrap server https", a.log())

    def test_5_corrupt_cache(self):
        self.stop_on("alice")
        with open(os.path.join(self.tmp, "alice", "supernodes.json"), "w") as f:
            f.write('{"version": 1, "last": {"id": "zz", "addr": 7}')
        a = self.start_on("alice")
        a.wait_for("not JSON", timeout=WAIT)
        line = a.wait_for("attached to super node", timeout=WAIT)
        self.assertIn("found through: bootstrap", line)

    def test_5b_unexpected_node_id(self):
        """The cache says another Node-ID lives at a super node's address: refused, next."""
        self.stop_on("alice")
        live = next(u for u in ("sn1", "sn2", "sn3") if self.sn[u].proc.poll() is None)
        with open(os.path.join(self.tmp, "alice", "supernodes.json"), "w") as f:
            json.dump({"version": 1, "last": {"id": "0" * 39 + "1", "addr": self.addr[live]},
                       "alternates": []}, f)
        a = self.start_on("alice")
        a.wait_for("its Node-ID is %s..., expected 00000000..." % self.node_id[live][:8],
                   timeout=WAIT)
        self.assertIn("found through: bootstrap", a.wait_for("attached to super node", WAIT))

    def serve(self, mode):
        srv = QuietServer(("127.0.0.1", 0), GarbageHandler)
        srv.mode = mode
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(self.svc, "127.0.0.1.pem"),
                            os.path.join(self.svc, "127.0.0.1.key"))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers.append(srv)
        return "https://127.0.0.1:%d" % srv.server_address[1]

    def test_6_bad_sources_are_skipped_with_a_reason(self):
        """A silent "super node", one without the role, a bootstrap server answering garbage
        and one answering a huge list: each logged, and the next source tried."""
        self.stop_on("alice")
        os.unlink(os.path.join(self.tmp, "alice", "supernodes.json"))
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        self.addCleanup(silent.close)
        # bob's own overlay port presents a certificate without the super node role.
        self.stop_on("bob")
        bob_port = free_port()
        self.start_on("bob", "listen=127.0.0.1:%d" % bob_port).wait_for("attached to", WAIT)
        garbage, huge = self.serve("garbage"), self.serve("huge")
        real = "https://127.0.0.1:%d" % self.bs_port
        a = self.start_on("alice", "supernodes=127.0.0.1:%d,127.0.0.1:%d" % (
            silent.getsockname()[1], bob_port), "attach_timeout_ms=1000",
            "bootstrap_urls=%s,%s,%s" % (garbage, huge, real))
        a.wait_for("no attachment within 1.0 s", timeout=WAIT)
        a.wait_for("lacks the super node role", timeout=WAIT)
        a.wait_for("bootstrap server %s/v1/supernodes?count=8: the answer is not" % garbage,
                   timeout=WAIT)
        a.wait_for("bootstrap server %s/v1/supernodes?count=8:" % huge, timeout=WAIT)
        line = a.wait_for("attached to super node", timeout=WAIT)
        self.assertIn("found through: bootstrap", line)
        log = a.log()
        huge_line = [l for l in log.splitlines() if huge in l][0]
        self.assertRegex(huge_line, r"larger|too large|exceed|malformed", huge_line)

    def test_7_lan_discovery_in_a_namespace(self):
        """A super node answering LAN multicast on the test's own network (a namespace with
        only a loopback interface, multicast enabled on it): an ordinary node with no cache
        and no reachable bootstrap server attaches through it."""
        harness.require(os.geteuid() == 0 and shutil.which("ip"),
                        "needs root and iproute2 for a network namespace")
        ns = "p2p-on-%d" % os.getpid()
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns])
        for cmd in (["link", "set", "lo", "up"], ["link", "set", "lo", "multicast", "on"],
                    ["route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "-n", ns] + cmd, check=True)
        inns = ["ip", "netns", "exec", ns]
        sn = self.start(inns + [self.bin("supernode"), "-d", "-c", self.cfg["sn4"], "-o",
                                "seed=true", "-o", "lan_discovery_if=127.0.0.1"])
        self.addCleanup(lambda: (sn.stop(), self.daemons.remove(sn)))
        sn.wait_for("answering LAN discovery queries on 239.255.42.99:7077", timeout=WAIT)
        sn.wait_for("started a new ring", timeout=WAIT)
        on = self.start(inns + [self.bin("ordinarynode"), "-d", "-c", self.cfg["carol"], "-o",
                                "lan_discovery_if=127.0.0.1"])
        self.addCleanup(lambda: (on.stop(), self.daemons.remove(on)))
        line = on.wait_for("attached to super node", timeout=WAIT)
        self.assertIn("found through: multicast", line)
        self.assertIn(self.node_id["sn4"][:8], line)
        on.wait_for("LAN discovery on 239.255.42.99:7077: 1 super nodes answered")
        on.wait_for("published user location|carol@", timeout=WAIT)
        # Garbage on the group is dropped and logged; the super node keeps answering.
        g = subprocess.run(inns + [sys.executable, "-c", (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton('127.0.0.1'))\n"
            "for p in (b'garbage', b'{\"v\":1,\"type\":\"discover\",\"overlay\":\"other\",'\n"
            "          b'\"tid\":\"0123456789abcdef\"}', b'x' * 1400):\n"
            "    s.sendto(p, ('239.255.42.99', 7077))\n")], capture_output=True, text=True)
        self.assertEqual(g.returncode, 0, g.stderr)
        sn.wait_for("oversize query dropped", timeout=WAIT)
        self.assertEqual(on.stop(), 0)
        on2 = self.start(inns + [self.bin("ordinarynode"), "-d", "-c", self.cfg["carol"], "-o",
                                 "lan_discovery_if=127.0.0.1"])
        self.addCleanup(lambda: (on2.stop(), self.daemons.remove(on2)))
        self.assertIn("found through: multicast", on2.wait_for("attached to super node", WAIT))


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
