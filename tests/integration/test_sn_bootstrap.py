#!/usr/bin/env python3
"""Super nodes and the bootstrap server together, as an operator runs them:
the overlay document names the bootstrap server; the first super node starts
the ring (--seed) and announces itself; later ones are given no address at
all and find the ring through the bootstrap server's list; a super node that
leaves is withdrawn from the list at once."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "bs-ring.p2psip"
SLOW = bool(harness.WRAPPER)
PERIOD = 2 if SLOW else 1  # bootstrap announce period
WAIT = 60 if SLOW else 20


free_port = harness.free_port


free_udp_port = harness.free_udp_port


def stun_binding(port, payload=None, timeout=1.0):
    """Sends a STUN Binding request (RFC 5389) or `payload`; returns (mapped "ip:port" or None,
    our own "ip:port")."""
    tid = os.urandom(12)
    req = payload if payload is not None else struct.pack("!HHI", 0x0001, 0, 0x2112A442) + tid
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        s.sendto(req, ("127.0.0.1", port))
        me = "%s:%d" % s.getsockname()
        try:
            data = s.recv(2048)
        except socket.timeout:
            return None, me
    mtype, mlen, cookie = struct.unpack("!HHI", data[:8])
    assert mtype == 0x0101 and cookie == 0x2112A442 and data[8:20] == tid, data
    i = 20
    while i + 4 <= 20 + mlen:
        atype, alen = struct.unpack("!HH", data[i:i + 4])
        if atype == 0x0020:  # XOR-MAPPED-ADDRESS, IPv4
            xport = struct.unpack("!H", data[i + 6:i + 8])[0] ^ 0x2112
            xaddr = struct.unpack("!I", data[i + 8:i + 12])[0] ^ 0x2112A442
            return "%s:%d" % (socket.inet_ntoa(struct.pack("!I", xaddr)), xport), me
        i += 4 + ((alen + 3) & ~3)
    return "no XOR-MAPPED-ADDRESS", me


def wait_until(what, fn, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError("timed out after %.0f s waiting for %s (last: %r)" % (timeout, what, last))


class SupernodesAndBootstrap(unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-snbs-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        cls.bs_port, ls_port = free_port(), free_port()
        state = os.path.join(cls.tmp, "ls")
        cls.ca = os.path.join(state, "ca.pem")
        cfg = os.path.join(cls.tmp, "ls.json")
        with open(cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % ls_port, "state_dir": state,
                       "pbkdf2_iterations": 1000, "stabilize_s": 1,
                       "bootstrap_urls": ["https://127.0.0.1:%d" % cls.bs_port]}, f)
        ls = [cls.bin("loginserver"), "-c", cfg]
        out = subprocess.run(ls + ["init"], capture_output=True, text=True, check=True).stdout
        pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        cls.users = ("sn1", "sn2", "sn3")
        for u in cls.users:
            subprocess.run(ls + ["user", "add", u], input=u + "-password\n", text=True,
                           capture_output=True, check=True)
        svc = os.path.join(cls.tmp, "svc")
        subprocess.run(ls + ["issue", "--service", "127.0.0.1", "--out", svc],
                       capture_output=True, text=True, check=True)
        cls.start(ls).wait_for("serving on")
        cls.node_id, cls.addr, cls.cfg = {}, {}, {}
        for u in cls.users:
            d = os.path.join(cls.tmp, u)
            p = subprocess.run([cls.bin("supernode"), "-o", "state_dir=" + d, "-o",
                                "overlay=" + OVERLAY, "enroll", "--login",
                                "https://127.0.0.1:%d" % ls_port, "--pin", pin, "--user", u],
                               input=u + "-password\n", capture_output=True, text=True,
                               timeout=60)
            assert p.returncode == 0, p.stderr
            cls.node_id[u] = re.search(r"node-id ([0-9a-f]{40})", p.stdout).group(1)
            cls.addr[u] = "127.0.0.1:%d" % free_port()
            conf = {"overlay": OVERLAY, "listen": cls.addr[u], "state_dir": d}
            if u == "sn1":
                conf["seed"] = True
                cls.metrics_port = free_port()
                conf["metrics_listen"] = "127.0.0.1:%d" % cls.metrics_port
                cls.stun_port = free_udp_port()
                conf["stun_listen"] = "127.0.0.1:%d" % cls.stun_port
            else:
                conf["stun_listen"] = "127.0.0.1:0"
            cls.cfg[u] = os.path.join(cls.tmp, u + ".json")
            with open(cls.cfg[u], "w") as f:
                json.dump(conf, f)
        cls.start([cls.bin("bootstrap"), "-d", "-o", "overlay=" + OVERLAY,
                   "-o", "listen=127.0.0.1:%d" % cls.bs_port,
                   "-o", "state_dir=" + os.path.join(cls.tmp, "bs"), "-o", "ca_file=" + cls.ca,
                   "-o", "cert_file=" + os.path.join(svc, "127.0.0.1.pem"),
                   "-o", "key_file=" + os.path.join(svc, "127.0.0.1.key"),
                   "-o", "announce_period_s=%d" % PERIOD]).wait_for("serving on")
        cls.sn = {}

    @classmethod
    def tearDownClass(cls):
        problems = []
        for d in reversed(cls.daemons):
            try:
                d.stop()
            except AssertionError as e:
                problems.append(str(e))
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    @staticmethod
    def bin(name):
        return os.path.join(BINDIR, name, name)

    @classmethod
    def start(cls, argv):
        d = harness.Daemon(argv if argv[1] == "-d" else [argv[0], "-d"] + argv[1:])
        cls.daemons.append(d)
        return d

    @classmethod
    def start_sn(cls, u):
        cls.sn[u] = cls.start([cls.bin("supernode"), "-d", "-c", cls.cfg[u]])
        return cls.sn[u]

    def listed(self):
        ctx = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", self.bs_port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/v1/supernodes?count=50")
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            return {(s["node_id"], s["address"])
                    for s in json.loads(resp.read())["supernodes"]}
        finally:
            conn.close()

    def status(self, u):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg[u], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def expect(self, *users):
        return {(self.node_id[u], self.addr[u]) for u in users}

    def ring_of(self, *users):
        ids = sorted(self.node_id[u] for u in users)
        for u in users:
            st = self.status(u)
            if not st or st["state"] != "member" or not st["pred"] or not st["succ"]:
                return False
            i = ids.index(self.node_id[u])
            if (st["pred"]["id"] != ids[i - 1] or st["succ"][0]["id"] != ids[(i + 1) % len(ids)]):
                return False
        return True

    def test_1_seed_is_listed(self):
        d = self.start_sn("sn1")
        d.wait_for("started a new ring", timeout=WAIT)
        wait_until("sn1 on the list", lambda: self.listed() == self.expect("sn1"), WAIT)
        d.wait_for("announce: https://127.0.0.1:%d: listed" % self.bs_port, timeout=WAIT)

    def test_2_newcomers_find_the_ring_through_the_list(self):
        for u in ("sn2", "sn3"):
            d = self.start_sn(u)
            d.wait_for("joining through them", timeout=WAIT)
            d.wait_for("joined the ring", timeout=WAIT)
        wait_until("one ring of three", lambda: self.ring_of("sn1", "sn2", "sn3"), WAIT)
        wait_until("all three listed",
                   lambda: self.listed() == self.expect("sn1", "sn2", "sn3"), WAIT)
        # The status page shows them with the load they announced (0 of 1000 attached).
        ctx = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", self.bs_port, context=ctx, timeout=10)
        conn.request("GET", "/")
        page = conn.getresponse().read().decode()
        conn.close()
        for u in ("sn1", "sn2", "sn3"):
            self.assertIn(self.addr[u], page)
        self.assertIn("1000", page)

    def test_3_leaving_node_is_withdrawn_at_once(self):
        t0 = time.monotonic()
        self.assertEqual(self.sn["sn3"].stop(signal.SIGTERM), 0)
        self.assertIn("withdrawn", self.sn["sn3"].log())
        # Gone from the list before a single announce period has passed, not after three.
        self.assertEqual(self.listed(), self.expect("sn1", "sn2"))
        self.assertLess(time.monotonic() - t0, 3 * PERIOD + (10 if SLOW else 1))
        wait_until("a ring of two", lambda: self.ring_of("sn1", "sn2"), WAIT)


    def test_4_metrics(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.getheader("Content-Type").startswith("text/plain"))
        sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eE]+$')
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            self.assertRegex(line, sample)
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        self.assertEqual(values["p2p_sn_member"], 1)
        self.assertEqual(values["p2p_sn_healthy"], 1)
        self.assertEqual(values["p2p_sn_attached"], 0)
        self.assertEqual(values["p2p_sn_successors"], 1)  # sn2 is left
        self.assertAlmostEqual(values["p2p_sn_ring_size_estimate"], 2, delta=1.5)
        for key in ('p2p_sn_records{role="primary"}', 'p2p_sn_requests_total{type="get",'
                    'result="ok"}', 'p2p_sn_request_seconds_count{type="store"}',
                    'p2p_sn_routing_total{event="forwarded"}'):
            self.assertIn(key, values)
        conn.request("POST", "/metrics", body="x")
        resp = conn.getresponse()
        resp.read()
        self.assertEqual(resp.status, 405)
        conn.request("GET", "/nothing")
        resp = conn.getresponse()
        resp.read()
        self.assertEqual(resp.status, 404)
        conn.close()


    def test_5_stun(self):
        # The super node tells a node behind NAT what its address looks like from outside.
        mapped, me = stun_binding(self.stun_port)
        self.assertEqual(mapped, me)
        # Garbage is dropped without an answer, and the server goes on serving.
        for junk in (b"", b"x", os.urandom(19), os.urandom(300),
                     struct.pack("!HHI", 0x0101, 0, 0x2112A442) + os.urandom(12),  # a response
                     struct.pack("!HHI", 0x0001, 8, 0x2112A442) + os.urandom(12)):  # short
            self.assertIsNone(stun_binding(self.stun_port, junk, timeout=0.3)[0])
        mapped, me = stun_binding(self.stun_port)
        self.assertEqual(mapped, me)

    def test_6_cut_off_node_withdraws_then_serves_alone(self):
        # sn1 loses its only peer: it is unhealthy, and leaves the bootstrap list at once ...
        self.sn["sn2"].proc.send_signal(signal.SIGKILL)
        self.sn["sn2"].wait_exit()
        self.sn["sn1"].wait_for("unhealthy (no live successor)", timeout=WAIT)
        wait_until("sn1 withdrawn", lambda: self.listed() == set(), WAIT)
        st = self.status("sn1")
        self.assertFalse(st["healthy"])
        # ... until, still alone after 12 periods, it is the whole ring and serves as one.
        self.sn["sn1"].wait_for("serving as a ring of one", timeout=WAIT + 12 * 1)
        wait_until("sn1 listed again", lambda: self.listed() == self.expect("sn1"), WAIT)
        self.assertTrue(self.status("sn1")["healthy"])


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
