#!/usr/bin/env python3
"""The super node's STUN server fixes and its TURN relay (RFC 8656, UDP, IPv4), tried with
clients nobody here wrote (Debian's `stun`, coturn's turnutils_stunclient, turnutils_uclient and
turnutils_peer) and with raw datagrams from Python.

An overlay of three real super nodes (login server, bootstrap server, enrollment):
  sn1  TURN with turn_allow_peers ["127.0.0.0/8"], /metrics;
  sn2  TURN with the default peer policy (loopback refused), 2 allocations per node, 3 in all;
  sn3  "turn": false.
Ordinary nodes alice, bob and carol are played by Python links (overlaypeer.py, real
certificates) for the `turn` request.

1. STUN: `stun` (RFC 3489 client) and turnutils_stunclient report a mapping; a CHANGE-REQUEST
   for another address or port and an unknown comprehension-required attribute get 420 with
   UNKNOWN-ATTRIBUTES, never much larger than the request; a classic RFC 3489 request is
   answered with MAPPED-ADDRESS, but not when it asks for another address or port; responses,
   indications and garbage get nothing.
2. turnutils_uclient relays to turnutils_peer through sn1 with credentials from
   `supernode turn-credentials` (ChannelData and Send/Data indications); the peer's echoes come
   back, the counters move, /metrics shows them.
3. sn2 refuses CreatePermission and ChannelBind to 127.0.0.1 (403), and counts it.
4. no credentials (401 + REALM + NONCE), a wrong password, an expired username, another super
   node's credentials, a forged nonce (438): refused, counted, logged.
5. quotas: a third allocation of one node gets 486, the fourth in all 508; Refresh with
   lifetime 0 frees them; a second Allocate on the same 5-tuple gets 437.
6. the `turn` request over a real attach link: credentials for the link's own Node-ID (a name
   in the body is ignored), usable at once; `unavailable` on sn3; not before attaching.
7. bad settings (turn_ports, turn_allow_peers, turn_relay_ip) stop the daemon with a clear
   error; `turn-credentials` refuses a malformed Node-ID; malformed TURN datagrams are dropped
   unanswered and the relay keeps serving.

Run: python3 tests/integration/test_turn.py --bindir <build dir>
"""

import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import overlaypeer  # noqa: E402

BINDIR = None
OVERLAY = "turn.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
SNS = ("sn1", "sn2", "sn3")
ONS = ("alice", "bob", "carol")

MAGIC = 0x2112A442
BINDING, ALLOCATE, REFRESH, CREATE_PERM, CHANNEL_BIND = 0x001, 0x003, 0x004, 0x008, 0x009
A_MAPPED, A_CHANGE, A_USERNAME, A_MI, A_ERROR, A_UNKNOWN = 0x01, 0x03, 0x06, 0x08, 0x09, 0x0A
A_CHANNEL, A_LIFETIME, A_PEER, A_DATA, A_REALM, A_NONCE = 0x0C, 0x0D, 0x12, 0x13, 0x14, 0x15
A_RELAYED, A_TRANSPORT, A_XMAPPED, A_FINGERPRINT = 0x16, 0x19, 0x20, 0x8028

wait_until = harness.wait_until


def msg_type(method, cls):
    """cls: 0 request, 1 indication, 2 success, 3 error."""
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0xF) | \
        ((cls & 2) << 7) | ((cls & 1) << 4)


def attr(t, v):
    return struct.pack(">HH", t, len(v)) + v + b"\0" * ((4 - len(v) % 4) % 4)


def xaddr(ip, port):
    x = socket.inet_aton(ip)
    xp = port ^ (MAGIC >> 16)
    xi = bytes(a ^ b for a, b in zip(x, struct.pack(">I", MAGIC)))
    return struct.pack(">BBH", 0, 1, xp) + xi


def build(method, cls, attrs=(), key=None, txid=None, cookie=MAGIC, fingerprint=False):
    txid = txid or os.urandom(12)
    body = b"".join(attrs)
    if key is not None:
        hdr = struct.pack(">HHI", msg_type(method, cls), len(body) + 24, cookie) + txid
        body += attr(A_MI, hmac.new(key, hdr + body, hashlib.sha1).digest())
    if fingerprint:
        hdr = struct.pack(">HHI", msg_type(method, cls), len(body) + 8, cookie) + txid
        crc = (zlib.crc32(hdr + body) ^ 0x5354554E) & 0xFFFFFFFF
        body += attr(A_FINGERPRINT, struct.pack(">I", crc))
    return struct.pack(">HHI", msg_type(method, cls), len(body), cookie) + txid + body


def parse(data):
    """(type, txid, [(attr type, value)]) of a STUN message, or None."""
    if len(data) < 20:
        return None
    t, n, _ = struct.unpack(">HHI", data[:8])
    out, off = [], 20
    while off + 4 <= 20 + n:
        at, al = struct.unpack(">HH", data[off:off + 4])
        out.append((at, data[off + 4:off + 4 + al]))
        off += 4 + al + ((4 - al % 4) % 4)
    return t, data[8:20], out


def get(attrs, t):
    for at, v in attrs:
        if at == t:
            return v
    return None


def error_code(attrs):
    v = get(attrs, A_ERROR)
    return None if v is None else (v[2] & 7) * 100 + v[3]


def unxor(v):
    port = struct.unpack(">H", v[2:4])[0] ^ (MAGIC >> 16)
    ip = bytes(a ^ b for a, b in zip(v[4:8], struct.pack(">I", MAGIC)))
    return socket.inet_ntoa(ip), port


class TurnClient:
    """A TURN client over one UDP socket: the 401 dance, then authenticated requests."""

    def __init__(self, server, user=None, password=None):
        self.server = server
        self.user, self.password = user, password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(2.0)
        self.realm = self.nonce = None
        self.key = None

    def close(self):
        self.sock.close()

    def exchange(self, data, timeout=2.0):
        """Sends data, returns the parsed answer with the same transaction id, or None."""
        txid = data[8:20]
        for _ in range(3):
            self.sock.sendto(data, self.server)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    self.sock.settimeout(max(0.01, end - time.monotonic()))
                    got, _ = self.sock.recvfrom(4096)
                except socket.timeout:
                    break
                p = parse(got)
                if p and p[1] == txid:
                    return p
        return None

    def request(self, method, attrs=(), auth=True):
        """(error code or 0, attrs); the 401/438 dance is done once when auth."""
        for _ in range(3):
            a = list(attrs)
            key = None
            if auth and self.realm:
                a += [attr(A_USERNAME, self.user.encode()), attr(A_REALM, self.realm),
                      attr(A_NONCE, self.nonce)]
                key = hashlib.md5(b"%s:%s:%s" % (self.user.encode(), self.realm,
                                                 self.password.encode())).digest()
            ans = self.exchange(build(method, 0, a, key=key))
            if ans is None:
                return None, []
            code = error_code(ans[2]) or 0
            if code in (401, 438) and auth and get(ans[2], A_NONCE) and \
                    (not self.realm or code == 438):
                self.realm, self.nonce = get(ans[2], A_REALM), get(ans[2], A_NONCE)
                continue
            return code, ans[2]
        return code, ans[2]

    def allocate(self, lifetime=None):
        a = [attr(A_TRANSPORT, bytes([17, 0, 0, 0]))]
        if lifetime is not None:
            a.append(attr(A_LIFETIME, struct.pack(">I", lifetime)))
        return self.request(ALLOCATE, a)

    def refresh(self, lifetime):
        return self.request(REFRESH, [attr(A_LIFETIME, struct.pack(">I", lifetime))])

    def permission(self, ip):
        return self.request(CREATE_PERM, [attr(A_PEER, xaddr(ip, 0))])

    def channel(self, num, ip, port):
        return self.request(CHANNEL_BIND, [attr(A_CHANNEL, struct.pack(">HH", num, 0)),
                                           attr(A_PEER, xaddr(ip, port))])


class Turn(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def node_conf(cls, u, conf):
        if u in SNS:
            cls.stun_port[u] = harness.free_udp_port()
            conf["stun_listen"] = "127.0.0.1:%d" % cls.stun_port[u]
        if u == "sn1":
            conf.update({"turn_allow_peers": ["127.0.0.0/8"],
                         "metrics_listen": "127.0.0.1:%d" % cls.metrics_port})
        if u == "sn2":
            conf.update({"turn_allocations_per_node": 2, "turn_max_allocations": 3})
        if u == "sn3":
            conf["turn"] = False

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-turn-")
        cls.stun_port = {}
        cls.metrics_port = harness.free_port()
        cls.links = []
        try:
            cls.build_overlay(OVERLAY, SNS, ONS, wait=WAIT)
        except BaseException:
            cls.stop_all()
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        for l in cls.links:
            l.close()
        cls.stop_checked("test_turn")

    # ---- helpers ----

    def server(self, sn):
        return ("127.0.0.1", self.stun_port[sn])

    def creds(self, sn, node_id):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg[sn], "turn-credentials",
                            node_id], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def client(self, sn, u="alice"):
        c = self.creds(sn, self.node_id[u])
        tc = TurnClient(self.server(sn), c["username"], c["password"])
        self.addCleanup(tc.close)
        return tc

    def turn_status(self, sn):
        return self.sn_status(sn).get("turn", {})

    def udp(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(1.0)
        self.addCleanup(s.close)
        return s

    def no_answer(self, s, data, to):
        s.sendto(data, to)
        try:
            got = s.recvfrom(4096)
        except socket.timeout:
            return True
        self.fail("answered %r to %r" % (got, data))

    # ---- 1. STUN ----

    def test_1_stun_real_clients(self):
        port = self.stun_port["sn1"]
        p = subprocess.run(["stun", "127.0.0.1:%d" % port, "-v"], capture_output=True,
                           text=True, timeout=60)
        out = p.stdout + p.stderr
        print("\n  [stun -v]\n" + out, file=sys.stderr)
        self.assertNotIn("Blocked or could not reach", out, out)
        self.assertRegex(out, r"MappedAddress = 127\.0\.0\.1:\d+", out)
        p = subprocess.run(["turnutils_stunclient", "-p", str(port), "127.0.0.1"],
                           capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        self.assertEqual(p.returncode, 0, out)
        self.assertRegex(out, r"UDP reflexive addr: 127\.0\.0\.1:\d+", out)

    def test_1_stun_420_and_silence(self):
        s = self.udp()
        to = self.server("sn2")
        cases = [
            ("CHANGE-REQUEST change IP+port", MAGIC, [attr(A_CHANGE, struct.pack(">I", 6))],
             [A_CHANGE]),
            ("unknown comprehension-required 0x0030", MAGIC, [attr(0x0030, b"abcd")], [0x0030]),
            ("RESPONSE-ADDRESS (never honoured)", MAGIC, [attr(0x0002, xaddr("192.0.2.1", 9))],
             [0x0002]),
        ]
        for what, cookie, attrs, unknown in cases:
            with self.subTest(what):
                req = build(BINDING, 0, attrs, cookie=cookie)
                s.sendto(req, to)
                got, _ = s.recvfrom(4096)
                t, txid, a = parse(got)
                self.assertEqual(t, msg_type(BINDING, 3))
                self.assertEqual(txid, req[8:20])
                self.assertEqual(error_code(a), 420)
                ids = get(a, A_UNKNOWN)
                listed = {struct.unpack(">H", ids[i:i + 2])[0] for i in range(0, len(ids), 2)}
                self.assertEqual(listed, set(unknown))
                self.assertLessEqual(len(got), len(req) + 36)
        # Classic request without change flags: MAPPED-ADDRESS (no XOR).
        req = build(BINDING, 0, [attr(A_CHANGE, struct.pack(">I", 0))], cookie=0x01020304)
        s.sendto(req, to)
        t, _, a = parse(s.recvfrom(4096)[0])
        self.assertEqual(t, msg_type(BINDING, 2))
        v = get(a, A_MAPPED)
        self.assertEqual((socket.inet_ntoa(v[4:8]), struct.unpack(">H", v[2:4])[0]),
                         s.getsockname())
        self.assertIsNone(get(a, A_XMAPPED))
        # Nothing to responses, indications, garbage, and to a classic (RFC 3489) request
        # asking for another address or port (stun.c says why).
        for data in (build(BINDING, 0, [attr(A_CHANGE, struct.pack(">I", 2))], cookie=0x01020304),
                     build(BINDING, 0, [attr(A_CHANGE, struct.pack(">I", 6))], cookie=0x01020304),
                     build(BINDING, 2, [attr(A_XMAPPED, xaddr("192.0.2.1", 9))]),
                     build(BINDING, 1), b"\x00\x01\x00\x04garbage-garbage!",
                     build(BINDING, 3, [attr(A_ERROR, b"\0\0\x04\x20")]), os.urandom(3)):
            self.no_answer(s, data, to)
        st = self.sn_status("sn2").get("stun", {})
        self.assertGreaterEqual(st.get("errors", 0), 3, st)   # the 420s
        self.assertGreaterEqual(st.get("classic", 0), 1, st)  # the MAPPED-ADDRESS answer
        self.assertGreaterEqual(st.get("dropped", 0), 7, st)  # the silent cases

    # ---- 2. relaying with coturn's client ----

    def run_uclient(self, sn, peer_port, extra=()):
        c = self.creds(sn, self.node_id["bob"])
        p = subprocess.run(["turnutils_uclient", "-u", c["username"], "-w", c["password"],
                            "-p", str(self.stun_port[sn]), "-e", "127.0.0.1", "-r",
                            str(peer_port), "-n", "50", "-m", "1", "-l", "120", "-z", "5",
                            "-c"] + list(extra) + ["127.0.0.1"],
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr

    def test_2_uclient_relays_through_sn1(self):
        peer_port = harness.free_udp_port()
        peer = harness.Daemon(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                              wrap=False)
        self.addCleanup(peer.stop)
        time.sleep(0.3)
        before = self.turn_status("sn1")
        for extra in ((), ("-s",)):  # ChannelData, then Send/Data indications
            with self.subTest("uclient %s" % (" ".join(extra) or "channels")):
                rc, out = self.run_uclient("sn1", peer_port, extra)
                self.assertEqual(rc, 0, out)
                m = re.search(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", out)
                self.assertTrue(m, out)
                self.assertEqual(int(m.group(1)), 50, out)
                self.assertGreaterEqual(int(m.group(2)), 45, out)  # peer echoes came back
                self.assertIn("Total lost packets", out)
                self.assertNotRegex(out, r"error 4\d\d", out)
        after = self.turn_status("sn1")
        self.assertGreaterEqual(after["packets_to_peer"] - before["packets_to_peer"], 90, after)
        self.assertGreaterEqual(after["packets_to_client"] - before["packets_to_client"], 90,
                                after)
        self.assertGreater(after["created"], before["created"])
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                      timeout=10).read().decode()
        self.assertRegex(text, r'p2p_turn_relayed_packets_total\{dir="to_peer"\} [1-9]')
        self.assertIn("p2p_turn_allocations ", text)
        self.assertRegex(text, r'p2p_stun_answered_total\{kind="rfc3489"\} \d+')
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn1"], "status"],
                           capture_output=True, text=True, timeout=30)
        self.assertRegex(p.stdout, r"turn +\d+ allocations", p.stdout)

    def test_2_python_relay_both_ways(self):
        """ChannelData and Data indications, checked byte for byte, with a Python peer."""
        peer = self.udp()
        tc = self.client("sn1", "carol")
        code, a = tc.allocate()
        self.assertEqual(code, 0, a)
        rip, rport = unxor(get(a, A_RELAYED))
        self.assertEqual(unxor(get(a, A_XMAPPED)), tc.sock.getsockname())
        # 600 s (the default); a retransmitted Allocate is answered with what is left.
        self.assertIn(struct.unpack(">I", get(a, A_LIFETIME))[0], range(590, 601))
        pip, pport = peer.getsockname()
        # No permission yet: nothing reaches the client. The relay socket and the client's are
        # read by the same loop in either order: give the server time to take "too early"
        # before the permission exists (a CI run once had the permission first).
        peer.sendto(b"too early", (rip, rport))
        time.sleep(0.3)
        self.assertEqual(tc.permission(pip)[0], 0)
        # Send indication -> peer
        tc.sock.sendto(build(0x006, 1, [attr(A_PEER, xaddr(pip, pport)),
                                        attr(A_DATA, b"hello peer")]), tc.server)
        data, src = peer.recvfrom(4096)
        self.assertEqual((data, src), (b"hello peer", (rip, rport)))
        # peer -> Data indication
        peer.sendto(b"hello client", (rip, rport))
        tc.sock.settimeout(2)
        got, _ = tc.sock.recvfrom(4096)
        t, _, at = parse(got)
        self.assertEqual(t, msg_type(0x007, 1))
        self.assertEqual(get(at, A_DATA), b"hello client")
        self.assertEqual(unxor(get(at, A_PEER)), (pip, pport))
        # ChannelBind, ChannelData both ways
        self.assertEqual(tc.channel(0x4001, pip, pport)[0], 0)
        tc.sock.sendto(struct.pack(">HH", 0x4001, 5) + b"chan!", tc.server)
        self.assertEqual(peer.recvfrom(4096)[0], b"chan!")
        peer.sendto(b"back", (rip, rport))
        self.assertEqual(tc.sock.recvfrom(4096)[0], struct.pack(">HH", 0x4001, 4) + b"back")
        # Bandwidth (sn1: the default 2000 kbit/s, one second of burst = 250 kB): about
        # 1 MB in a second, in small bursts that the server's socket buffer holds, so part of
        # it is dropped and counted.
        before = self.turn_status("sn1")["dropped_bandwidth"]
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            for _ in range(8):
                tc.sock.sendto(struct.pack(">HH", 0x4001, 1200) + b"b" * 1200, tc.server)
            time.sleep(0.01)
        wait_until("bandwidth drops counted",
                   lambda: self.turn_status("sn1")["dropped_bandwidth"] - before >= 50, 10)
        # Bad channel numbers, the same number for another peer: 400
        self.assertEqual(tc.channel(0x3FFF, pip, pport)[0], 400)
        self.assertEqual(tc.channel(0x8000, pip, pport)[0], 400)
        self.assertEqual(tc.channel(0x4001, pip, pport + 1)[0], 400)
        # Unknown comprehension-required attribute: 420; TCP: 442; v6 family: 440
        self.assertEqual(tc.request(REFRESH, [attr(0x0031, b"xxxx")])[0], 420)
        self.assertEqual(tc.refresh(0)[0], 0)
        self.assertEqual(tc.refresh(600)[0], 437)  # gone
        code, _ = tc.request(ALLOCATE, [attr(A_TRANSPORT, bytes([6, 0, 0, 0]))])
        self.assertEqual(code, 442)
        code, _ = tc.request(ALLOCATE, [attr(A_TRANSPORT, bytes([17, 0, 0, 0])),
                                        attr(0x0017, bytes([2, 0, 0, 0]))])
        self.assertEqual(code, 440)

    # ---- 3. peer policy ----

    def test_3_loopback_refused_without_allow(self):
        before = self.turn_status("sn2")
        tc = self.client("sn2", "alice")
        code, a = tc.allocate()
        self.assertEqual(code, 0, a)
        self.assertEqual(tc.permission("127.0.0.1")[0], 403)
        self.assertEqual(tc.channel(0x4000, "127.0.0.1", 3480)[0], 403)
        for ip in ("10.1.2.3", "192.168.1.1", "172.16.0.1", "169.254.1.1", "100.64.0.1",
                   "224.0.0.1", "0.0.0.0", "240.0.0.1"):
            self.assertEqual(tc.permission(ip)[0], 403, ip)
        self.assertEqual(tc.permission("192.0.2.10")[0], 0)  # a public (documentation) address
        after = self.turn_status("sn2")
        self.assertGreaterEqual(after["refused_peer"] - before["refused_peer"], 10)
        self.sn["sn2"].wait_for("CreatePermission for 127.0.0.1 refused", timeout=5)
        self.assertEqual(tc.refresh(0)[0], 0)

    # ---- 4. authentication ----

    def test_4_refused_credentials(self):
        before = self.turn_status("sn1")
        good = self.creds("sn1", self.node_id["alice"])
        other = self.creds("sn2", self.node_id["alice"])  # another server's secret
        # No credentials: 401 with REALM and NONCE.
        tc = TurnClient(self.server("sn1"))
        self.addCleanup(tc.close)
        ans = tc.exchange(build(ALLOCATE, 0, [attr(A_TRANSPORT, bytes([17, 0, 0, 0]))]))
        self.assertEqual(error_code(ans[2]), 401)
        self.assertEqual(get(ans[2], A_REALM), OVERLAY.encode())
        self.assertTrue(get(ans[2], A_NONCE))
        expired = "%d:%s" % (time.time() - 60, self.node_id["alice"])
        cases = [("wrong password", good["username"], "x" + good["password"], 401),
                 ("another server's credentials", other["username"], other["password"], 401),
                 ("expired username", expired, good["password"], 401),
                 ("malformed username", "alice", "secret", 401)]
        for what, user, pw, want in cases:
            with self.subTest(what):
                tc = TurnClient(self.server("sn1"), user, pw)
                self.addCleanup(tc.close)
                self.assertEqual(tc.allocate()[0], want)
        # A forged nonce: 438, with a fresh nonce that then works.
        tc = TurnClient(self.server("sn1"), good["username"], good["password"])
        self.addCleanup(tc.close)
        tc.realm, tc.nonce = OVERLAY.encode(), b"f" * 32
        key = hashlib.md5(("%s:%s:%s" % (good["username"], OVERLAY, good["password"])).encode())
        ans = tc.exchange(build(ALLOCATE, 0, [attr(A_TRANSPORT, bytes([17, 0, 0, 0])),
                                              attr(A_USERNAME, good["username"].encode()),
                                              attr(A_REALM, tc.realm), attr(A_NONCE, tc.nonce)],
                                key=key.digest()))
        self.assertEqual(error_code(ans[2]), 438)
        tc.nonce = get(ans[2], A_NONCE)
        code, a = tc.allocate()
        self.assertEqual(code, 0, a)
        self.assertEqual(tc.refresh(0)[0], 0)
        after = self.turn_status("sn1")
        self.assertGreaterEqual(after["refused_auth"] - before["refused_auth"], 5, after)
        self.assertGreaterEqual(after["challenges"] - before["challenges"], 1, after)
        self.sn["sn1"].wait_for("expired username", timeout=5)
        self.sn["sn1"].wait_for("wrong password", timeout=5)

    # ---- 5. quotas ----

    def test_5_quotas(self):
        mine = [self.client("sn2", "alice") for _ in range(3)]
        self.assertEqual(mine[0].allocate()[0], 0)
        self.assertEqual(mine[0].allocate()[0], 437)  # same 5-tuple, a new transaction
        self.assertEqual(mine[1].allocate()[0], 0)
        self.assertEqual(mine[2].allocate()[0], 486)  # 2 per node
        other = [self.client("sn2", "bob") for _ in range(2)]
        self.assertEqual(other[0].allocate()[0], 0)
        self.assertEqual(other[1].allocate()[0], 508)  # 3 in all
        st = self.turn_status("sn2")
        self.assertEqual(st["allocations"], 3)
        self.assertGreaterEqual(st["refused_quota"], 2)
        for c in mine[:2] + other[:1]:
            self.assertEqual(c.refresh(0)[0], 0)
        self.assertEqual(self.turn_status("sn2")["allocations"], 0)
        self.assertEqual(other[1].allocate()[0], 0)
        self.assertEqual(other[1].refresh(0)[0], 0)

    # ---- 6. the `turn` request ----

    def attach(self, sn, u):
        l = overlaypeer.Link(self.addr[sn], os.path.join(self.tmp, u), OVERLAY, timeout=10)
        self.links.append(l)
        return l

    def test_6_turn_request(self):
        l = self.attach("sn1", "carol")
        ans = l.request("turn", {})
        self.assertEqual(ans and ans.get("kind"), "err", ans)
        self.assertEqual(ans["body"]["code"], "not-attached", ans)
        ans = l.request("attach", {})
        self.assertEqual(ans and ans.get("kind"), "res", ans)
        ans = l.request("turn", {"node_id": self.node_id["alice"]})  # ignored
        self.assertEqual(ans and ans.get("kind"), "res", ans)
        b = ans["body"]
        self.assertEqual(b["server"], "127.0.0.1:%d" % self.stun_port["sn1"])
        self.assertEqual(b["realm"], OVERLAY)
        self.assertTrue(b["username"].endswith(":" + self.node_id["carol"]), b)
        self.assertAlmostEqual(b["expires"], time.time() + 600, delta=30)
        tc = TurnClient(self.server("sn1"), b["username"], b["password"])
        self.addCleanup(tc.close)
        self.assertEqual(tc.allocate()[0], 0)
        self.assertEqual(tc.refresh(0)[0], 0)
        l3 = self.attach("sn3", "carol")
        self.assertEqual(l3.request("attach", {})["kind"], "res")
        ans = l3.request("turn", {})
        self.assertEqual(ans and ans.get("kind"), "err", ans)
        self.assertEqual(ans["body"]["code"], "unavailable", ans)

    # ---- 7. bad settings and requests ----

    def test_7_bad_settings(self):
        cases = [("turn_ports=abc", "turn_ports"), ("turn_ports=60000-50000", "turn_ports"),
                 ("turn_ports=0-100", "turn_ports"),
                 ("turn_allow_peers=10.0.0.0/33", "turn_allow_peers"),
                 ("turn_allow_peers=not-an-address", "turn_allow_peers"),
                 ("turn_relay_ip=::1", "turn_relay_ip"), ("turn_relay_ip=0.0.0.0", "turn_relay_ip")]
        for override, word in cases:
            with self.subTest(override):
                p = subprocess.run([self.bin("supernode"), "-d", "-c", self.cfg["sn3"], "-o",
                                    "stun_listen=127.0.0.1:0", "-o", "turn=true", "-o", override,
                                    "run"], capture_output=True, text=True, timeout=30)
                self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
                self.assertRegex(p.stdout + p.stderr, "TURN: .*%s" % word)
        for bad in ("xyz", "AB" * 20, "ab" * 19, "ab" * 21):
            p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn1"], "turn-credentials",
                                bad], capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn("40 lowercase hex digits", p.stderr)
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn3"], "turn-credentials",
                            self.node_id["alice"]], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no TURN server", p.stderr)
        # Malformed TURN traffic changes nothing and gets no answer; the server still serves.
        s = self.udp()
        to = self.server("sn1")
        for data in (b"\x40\x00\x00\x10abc",  # ChannelData shorter than its length
                     b"\x40\x00\x00\x00",  # ChannelData of an unknown channel / 5-tuple
                     build(ALLOCATE, 0, [attr(A_TRANSPORT, bytes([17, 0, 0, 0]))])[:-2],  # cut
                     build(ALLOCATE, 1),  # an Allocate "indication"
                     build(ALLOCATE, 2),  # a response
                     build(0x006, 1, [attr(A_DATA, b"x")]),  # Send without an allocation
                     build(0x00A, 0)):  # an unknown method
            self.no_answer(s, data, to)
        tc = self.client("sn1", "bob")
        self.assertEqual(tc.allocate()[0], 0)
        self.assertEqual(tc.refresh(0)[0], 0)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
