#!/usr/bin/env python3
"""Resource exhaustion by unauthenticated peers and by one certificate (issue 15, items 4, 9
and 12), performed against a real overlay (login server, bootstrap server, two super nodes,
ordinary nodes) on loopback:

1. thousands of idle TCP connections from one address (127.0.0.2) to a super node's overlay
   port: the super node keeps a bounded number of descriptors, says in its log why it refuses
   the rest, and meanwhile an honest ordinary node attaches and looks up another user's record;
2. one certificate opening more links to one super node than allowed: the extra link is
   refused with a `too-many-links` error frame before any hello, the others keep working, and
   a link freed makes room again;
3. about 1,100 idle TCP connections from one address to the bootstrap server and to the login
   server: `GET /v1/supernodes` and `GET /v1/overlay` from another address still answer at
   once, and both servers log the refusals.

Run: python3 tests/integration/test_dos.py --bindir <build dir>
"""

import http.client
import json
import os
import random
import re
import resource
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "dos.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
ATTACKER = "127.0.0.2"   # the flooding address; honest nodes use 127.0.0.1
SN_FLOOD = 5000          # the trial against a super node
HTTPS_FLOOD = 1100       # the trial against the HTTPS servers
PER_SOURCE = 64          # conn.c / httpd.c default bound per source address
PER_IDENTITY = 4         # conn.c default bound of links per certificate per listener


def say(fmt, *args):
    print("  [dos] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft == resource.RLIM_INFINITY or soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Flood:
    """n idle TCP connections from ATTACKER to host:port, opened without waiting (non-blocking
    connects, as fast as the kernel takes them); they send nothing and stay open until
    close()."""

    def __init__(self, hostport, n):
        host, port = hostport.rsplit(":", 1)
        self.socks = []
        self.failed = 0
        t0 = time.monotonic()
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setblocking(False)
                s.bind((ATTACKER, 0))
                s.connect_ex((host, int(port)))
            except OSError:
                s.close()
                self.failed += 1
                continue
            self.socks.append(s)
        say("%d connections opened from %s to %s in %.2f s (%d could not be)", len(self.socks),
            ATTACKER, hostport, time.monotonic() - t0, self.failed)

    def closed_by_peer(self):
        """How many of them the server has closed (EOF or reset)."""
        n = 0
        for s in self.socks:
            try:
                if s.recv(1) == b"":
                    n += 1
            except BlockingIOError:
                pass
            except OSError:
                n += 1
        return n

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def encode(msg):
    payload = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(payload)) + payload


def frame(type_, kind, body=None, tid=None):
    return {"v": 1, "overlay": OVERLAY, "type": type_, "kind": kind,
            "tid": tid or "%016x" % random.getrandbits(64), "body": body or {}}


class Link:
    """A node-to-node link from Python (docs/protocol.md 1.1-1.5) with a user's own
    certificate: TLS 1.3, our hello sent at once; frames read one at a time."""

    def __init__(self, state_dir, addr, timeout=WAIT):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # nodes are known by their certificates
        ctx.load_verify_locations(os.path.join(state_dir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(state_dir, "cert.pem"),
                            os.path.join(state_dir, "key.pem"))
        host, port = addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock = ctx.wrap_socket(raw)
        self.buf = b""
        self.send(frame("hello", "ind", {"agent": "test_dos"}))

    def send(self, f):
        self.sock.sendall(encode(f))
        return f["tid"]

    def recv(self, timeout=WAIT):
        """The next frame; None when the peer closed the link."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    f, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return json.loads(f)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no frame within %.0f s" % timeout)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not data:
                return None
            self.buf += data

    def answer(self, tid, timeout=WAIT):
        while True:
            f = self.recv(timeout)
            if f is None or f.get("tid") == tid:
                return f

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Dos(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-dos-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        cls.fd_limit = raise_fd_limit(SN_FLOOD + 512)
        users = ("alice", "bob", "mallory")
        cls.build_overlay(OVERLAY, ("sn1", "sn2"), users, no_supernode=users, wait=WAIT)
        cls.ls_daemon = next(d for d in cls.daemons if d.argv[0].endswith("loginserver"))
        cls.bs_daemon = next(d for d in cls.daemons if d.argv[0].endswith("bootstrap"))
        with open(os.path.join(cls.tmp, "ls.json")) as f:
            cls.ls_port = int(json.load(f)["listen"].rsplit(":", 1)[1])
        cls.on["alice"] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg["alice"]])
        cls.on["alice"].wait_for("published user location", timeout=WAIT)

    @classmethod
    def node_conf(cls, u, conf):
        if u in ("alice", "bob"):
            conf["supernodes"] = [cls.addr["sn1"]]

    @classmethod
    def tearDownClass(cls):
        cls.save_logs("test_dos")
        problems = cls.stop_all()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def user_dir(self, u):
        return os.path.join(self.tmp, u)

    # ---- 1. idle TCP connections against a super node --------------------------------------

    def test_1_handshake_flood_on_a_super_node(self):
        sn = self.sn["sn1"]
        pid = sn.proc.pid
        before = open_fds(pid)
        n = min(SN_FLOOD, self.fd_limit - 300)
        self.assertGreater(n, 1000, "cannot open enough descriptors for the trial")
        flood = Flood(self.addr["sn1"], n)
        try:
            # Meanwhile an honest node attaches to the flooded super node and looks up alice.
            t0 = time.monotonic()
            most = open_fds(pid)
            bob = self.start_on("bob")
            deadline = t0 + WAIT
            while not any("published user location" in l for l in bob.lines):
                self.assertLess(time.monotonic(), deadline,
                                "bob did not attach during the flood:\n" + bob.log()[-3000:])
                most = max(most, open_fds(pid))
                time.sleep(0.05)
            attached_s = time.monotonic() - t0
            rc, out, err = self.cli("bob", "get", "user location", "alice@" + OVERLAY, "--json")
            self.assertEqual(rc, 0, err)
            [rec] = json.loads(out)["records"]
            self.assertTrue(rec["verified"], rec)
            lookup_s = time.monotonic() - t0
            # The super node keeps at most PER_SOURCE of them, each until its handshake deadline.
            line = sn.wait_for("refused a connection from %s" % ATTACKER, timeout=WAIT)
            for _ in range(20):
                most = max(most, open_fds(pid))
                time.sleep(0.05)
            closed = flood.closed_by_peer()
            say("super node: %d descriptors before, at most %d during the flood; %d of %d "
                "connections closed at once; bob attached after %.2f s, looked alice up after "
                "%.2f s", before, most, closed, len(flood.socks), attached_s, lookup_s)
            say("its log: %s", line)
            self.assertLess(most, before + PER_SOURCE + 40)
            self.assertGreaterEqual(closed, len(flood.socks) - PER_SOURCE - 50)
            self.assertIn("handshakes in progress from that address (limit %d)" % PER_SOURCE,
                          line)
        finally:
            flood.close()
        self.assertNotIn("Too many open files", sn.log())
        # The refusals of the rest are summed up, not logged one by one.
        summary = sn.wait_for("more connections in the last", timeout=15)
        say("then: %s", summary)
        refusals = [l for l in sn.log().splitlines() if "refused" in l and ATTACKER in l]
        self.assertLess(len(refusals), 10, refusals[:12])
        self.assertTrue(self.status("bob")["supernode"], self.status("bob"))

    # ---- 2. links per certificate ----------------------------------------------------------

    def test_2_links_per_certificate(self):
        sn = self.sn["sn2"]
        me = self.user_dir("mallory")
        links = []
        try:
            for _ in range(PER_IDENTITY):
                l = Link(me, self.addr["sn2"])
                hello = l.recv()
                self.assertEqual((hello or {}).get("type"), "hello", hello)
                links.append(l)
            extra = Link(me, self.addr["sn2"])
            got = extra.recv()
            self.assertIsNotNone(got, "the extra link was closed without a reason")
            self.assertEqual(got.get("kind"), "err", got)
            self.assertEqual(got["body"].get("code"), "too-many-links", got)
            self.assertIsNone(extra.recv(), "the extra link stays open")
            extra.close()
            say("link %d of one certificate: %s", PER_IDENTITY + 1, got["body"])
            line = sn.wait_for("holds %d links (limit %d)" % (PER_IDENTITY, PER_IDENTITY))
            say("its log: %s", line)
            self.assertIn("sip:mallory@" + OVERLAY, line)
            # The others keep working: each one's request is answered on it.
            for l in links:
                tid = l.send(frame("keepalive", "req"))
                a = l.answer(tid)
                self.assertIsNotNone(a, "a link closed after the extra was refused")
                self.assertIn(a["kind"], ("res", "err"), a)
            # A link closed makes room for one.
            links.pop().close()
            time.sleep(0.5)
            again = Link(me, self.addr["sn2"])
            links.append(again)
            self.assertEqual((again.recv() or {}).get("type"), "hello")
        finally:
            for l in links:
                l.close()
        # An honest lookup through sn1 still works.
        rc, out, err = self.cli("alice", "get", "user location", "alice@" + OVERLAY, "--json")
        self.assertEqual(rc, 0, err)

    # ---- 3. HTTPS servers -------------------------------------------------------------------

    def https_get(self, port, path):
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = False
        t0 = time.monotonic()
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            return r.status, time.monotonic() - t0
        finally:
            c.close()

    def https_flood(self, name, daemon, port, path):
        flood = Flood("127.0.0.1:%d" % port, HTTPS_FLOOD)
        try:
            time.sleep(1)  # let the server take in what it will
            worst = 0
            for _ in range(5):
                st, took = self.https_get(port, path)
                self.assertEqual(st, 200, "%s %s during the flood" % (name, path))
                worst = max(worst, took)
            line = daemon.wait_for("refused a connection from %s" % ATTACKER, timeout=WAIT)
            closed = flood.closed_by_peer()
            say("%s: GET %s answered in %.3f s at worst during %d connections from %s, "
                "%d of which were closed at once; its log: %s", name, path, worst,
                len(flood.socks), ATTACKER, closed, line)
            self.assertLess(worst, 3.0)
            self.assertIn("connections open from that address (limit %d)" % PER_SOURCE, line)
            self.assertGreaterEqual(closed, len(flood.socks) - PER_SOURCE - 20)
        finally:
            flood.close()

    def test_3_https_flood_bootstrap(self):
        self.https_flood("bootstrap server", self.bs_daemon, self.bs_port, "/v1/supernodes?count=2")

    def test_4_https_flood_login(self):
        self.https_flood("login server", self.ls_daemon, self.ls_port, "/v1/overlay")


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
