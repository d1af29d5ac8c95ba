#!/usr/bin/env python3
"""The ordinary node's SIP proxy is no open relay (issue 15, item 2): the
trials an attacker would make, against real daemons, with raw sockets.

- One unauthenticated UDP MESSAGE, OPTIONS or INVITE to alice's node whose
  Request-URI or Route names a TCP listener (or a UDP sink) of the test on
  127.0.0.x: refused with 403 and a reason, logged; the listener sees no
  connection, the sink no datagram.
- A `p2p-node` Route naming carol's node (reached only through the
  overlay): refused at alice's node; nothing is delivered to carol's node.
- A request delivered to carol's node through the overlay (by a client of
  our own holding mallory's certificate, attached to a super node) for
  somebody else, or for a literal address: refused by carol's node.
- Amplification: a forged request makes the node send one datagram back to
  its source, none to a third party; a forged response, none; a REGISTER
  whose Contact names a third party is refused.
- Honest users are unaffected: sipp phones call each other directly and
  through the overlay, and a call nobody answers is retransmitted 7 times
  (Timer A doubling without a cap) and answered 408 after 32 s.
"""

import json
import os
import random
import shutil
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
OVERLAY = "relay-test.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20

free_port = harness.free_port
wait_until = harness.wait_until

ATTACKER = "127.0.0.66"  # the attacker's source: never a phone of anybody's
LISTENER = "127.0.0.77"  # a TCP service the attacker wants reached (think 127.0.0.1:6379)
SINK = "127.0.0.78"      # a third party that should get no traffic


def say(fmt, *args):
    print("  [sip-relay] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def sip_request(method, ruri, src, extra=(), to_tag=None, call_id=None, to=None):
    """One SIP request as bytes, sent from src ("ip:port")."""
    branch = "z9hG4bK%016x" % random.getrandbits(64)
    lines = ["%s %s SIP/2.0" % (method, ruri),
             "Via: SIP/2.0/UDP %s;branch=%s;rport" % (src, branch),
             "From: <sip:mallory@%s>;tag=%x" % (OVERLAY, random.getrandbits(32)),
             "To: <%s>%s" % (to or ruri, ";tag=" + to_tag if to_tag else ""),
             "Call-ID: %x@%s" % (random.getrandbits(64), src.split(":")[0])
             if call_id is None else "Call-ID: " + call_id,
             "CSeq: 1 %s" % method, "Max-Forwards: 70"] + list(extra)
    body = "hello" if method == "MESSAGE" else ""
    if body:
        lines.append("Content-Type: text/plain")
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def status_line(data):
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def recv_all(sock, window):
    """Every datagram sock receives within `window` seconds."""
    got, end = [], time.monotonic() + window
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return got
        sock.settimeout(left)
        try:
            got.append(sock.recvfrom(65535)[0])
        except socket.timeout:
            return got


class OverlayClient:
    """A client of the overlay protocol (docs/protocol.md 1, 5) holding a user's certificate:
    what an enrolled attacker's own software does. Attaches to a super node and sends
    `deliver` requests; collects the `deliver` indications that come back."""

    def __init__(self, state_dir, addr):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(os.path.join(state_dir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(state_dir, "cert.pem"), os.path.join(state_dir, "key.pem"))
        host, port = addr.rsplit(":", 1)
        self.s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=WAIT))
        self.buf = b""
        self.delivered = []
        self.send("hello", "ind", {"agent": "relay-test"})
        self.expect(lambda m: m["type"] == "hello")

    def send(self, typ, kind, body, tid=None):
        tid = tid or "%016x" % random.getrandbits(64)
        m = json.dumps({"v": 1, "overlay": OVERLAY, "type": typ, "kind": kind, "tid": tid,
                        "body": body}).encode()
        self.s.sendall(struct.pack(">I", len(m)) + m)
        return tid

    def read(self):
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            data = self.s.recv(65536)
            if not data:
                raise ConnectionError("the super node closed the link")
            self.buf += data
        n = struct.unpack(">I", self.buf[:4])[0]
        m, self.buf = json.loads(self.buf[4:4 + n]), self.buf[4 + n:]
        if m["type"] == "deliver" and m["kind"] == "ind":
            self.delivered.append(m["body"])
        return m

    def expect(self, pred):
        while True:
            m = self.read()
            if pred(m):
                return m

    def request(self, typ, body):
        tid = self.send(typ, "req", body)
        return self.expect(lambda m: m.get("tid") == tid and m["kind"] in ("res", "err"))

    def wait_delivered(self, pred, timeout):
        end = time.monotonic() + timeout
        while True:
            for b in self.delivered:
                if pred(b):
                    return b
            self.s.settimeout(max(0.1, end - time.monotonic()))
            if time.monotonic() > end:
                return None
            try:
                self.read()
            except (socket.timeout, ssl.SSLError):
                pass

    def close(self):
        self.s.close()


class Relay(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-relay-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        cls.build_overlay(OVERLAY, ("sn1", "sn2"), ("alice", "bob", "carol", "mallory"),
                          wait=WAIT)
        for u in ("alice", "bob", "carol"):
            cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
        for u in ("alice", "bob", "carol"):
            cls.on[u].wait_for("published user location", timeout=WAIT)
        cls.port = {u: free_port() for u in ("alice", "bob", "carol")}
        for u in ("alice", "bob", "carol"):
            cls.run_sipp_cls("register_200", cls.port[u], target=cls.sip[u],
                             keys=(("user", u), ("domain", OVERLAY), ("expires", 600)))

    @classmethod
    def run_sipp_cls(cls, scenario, port, **kw):
        p = cls.start_sipp(cls, scenario, port, **kw)
        out, _ = p.communicate(timeout=90)
        assert p.returncode == 0, out[-3000:]

    @classmethod
    def node_conf(cls, u, conf):
        if u in ("alice", "bob"):
            conf["supernodes"] = [cls.addr["sn1"]]
        if u == "bob":  # bob's phones are on 127.0.0.1 only
            conf["sip_register_from"] = ["127.0.0.1/32", "::1"]
        elif u == "carol":  # reached through the overlay only, on the other super node
            conf.update({"supernodes": [cls.addr["sn2"]], "sip_via_overlay": True})

    @classmethod
    def tearDownClass(cls):
        cls.save_logs("test_sip_relay")
        problems = cls.stop_all()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    # ---- the attacker's tools ----

    def setUp(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((LISTENER, 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.lport = self.listener.getsockname()[1]
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind((SINK, 0))
        self.sport = self.sink.getsockname()[1]
        self.atk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.atk.bind((ATTACKER, 0))
        self.atk_addr = "%s:%d" % self.atk.getsockname()

    def tearDown(self):
        for s in (self.listener, self.sink, self.atk):
            s.close()

    def node_addr(self, u):
        host, port = self.sip[u].rsplit(":", 1)
        return host, int(port)

    def attack(self, u, data, sock=None):
        """Sends one datagram to u's SIP port; returns the status lines of what came back
        within 1 s (3 s under a wrapper)."""
        sock = sock or self.atk
        sock.sendto(data, self.node_addr(u))
        return [status_line(d) for d in recv_all(sock, 3.0 if SLOW else 1.0)]

    def assert_listener_untouched(self, settle=1.5):
        time.sleep(settle * (3 if SLOW else 1))
        try:
            c, a = self.listener.accept()
            c.settimeout(1)
            data = c.recv(65535)
            c.close()
            self.fail("the node connected to the listener from %s:%d and wrote %r" % (
                a[0], a[1], data[:200]))
        except BlockingIOError:
            pass

    def sn_delivered(self):
        total = 0
        for u in ("sn1", "sn2"):
            p = subprocess.run([self.bin("supernode"), "-c", self.cfg[u], "status", "--json"],
                               capture_output=True, text=True, timeout=30)
            total += json.loads(p.stdout)["ordinary_nodes"]["delivered"]
        return total

    # ---- honest calls first and last: the policy costs users nothing ----

    def call(self, callee, uas_port):
        uas = self.start_sipp("uas_answer", uas_port)
        time.sleep(0.3)
        uac = self.start_sipp("uac_call", self.port["alice"], target=self.sip["alice"],
                              keys=(("callee", callee), ("domain", OVERLAY)), service="alice")
        self.finish_sipp(uac, "alice's phone calling %s" % callee)
        self.finish_sipp(uas, "%s's phone" % callee)

    def test_01_honest_calls(self):
        t0 = time.monotonic()
        self.call("bob", self.port["bob"])
        self.call("carol", self.port["carol"])
        say("honest calls alice -> bob (direct) and alice -> carol (through the overlay) "
            "completed in %.2f s", time.monotonic() - t0)
        for u in ("alice", "bob", "carol"):
            px = self.status(u)["sip"]["proxy"]
            self.assertEqual(px["refused"], 0, (u, px))

    # ---- item 2: literal destinations from outside ----

    def test_02_literal_destinations_are_refused(self):
        dest = "%s:%d" % (LISTENER, self.lport)
        trials = [
            ("MESSAGE to sip:x@%s;transport=tcp" % dest,
             sip_request("MESSAGE", "sip:x@%s;transport=tcp" % dest, self.atk_addr),
             "403 Literal Destination Refused"),
            ("OPTIONS to sip:x@%s;transport=tcp" % dest,
             sip_request("OPTIONS", "sip:x@%s;transport=tcp" % dest, self.atk_addr),
             "403 Literal Destination Refused"),
            ("INVITE to sip:x@%s;transport=tcp" % dest,
             sip_request("INVITE", "sip:x@%s;transport=tcp" % dest, self.atk_addr),
             "403 Literal Destination Refused"),
            ("MESSAGE to alice with Route <sip:%s;transport=tcp;lr>" % dest,
             sip_request("MESSAGE", "sip:alice@" + OVERLAY, self.atk_addr,
                         ["Route: <sip:%s;transport=tcp;lr>" % dest]),
             "403 Route Beyond This Node Refused"),
            ("OPTIONS to bob with Route <sip:%s;transport=tcp;lr>" % dest,
             sip_request("OPTIONS", "sip:bob@" + OVERLAY, self.atk_addr,
                         ["Route: <sip:%s;transport=tcp;lr>" % dest]),
             "403 Route Beyond This Node Refused"),
            ("MESSAGE to bob@%s (another user)" % OVERLAY,
             sip_request("MESSAGE", "sip:bob@" + OVERLAY, self.atk_addr),
             "403 Not A User Of This Node"),
            ("in-dialog MESSAGE (To-tag) to sip:%s;transport=tcp" % dest,
             sip_request("MESSAGE", "sip:%s;transport=tcp" % dest, self.atk_addr,
                         to_tag="forged"),
             "481 No Such Dialog Here"),
        ]
        before = self.status("alice")["sip"]["proxy"]["refused"]
        for what, data, want in trials:
            got = self.attack("alice", data)
            say("%s: answered %s", what, got)
            self.assertEqual(got, ["SIP/2.0 " + want], what)
        self.assert_listener_untouched()
        # An OPTIONS without a user is the node's own keepalive: answered, never forwarded.
        got = self.attack("alice", sip_request("OPTIONS", "sip:%s;transport=tcp" % dest,
                                               self.atk_addr,
                                               ["Route: <sip:%s;transport=tcp;lr>" % dest]))
        self.assertEqual(got, ["SIP/2.0 200 OK"])
        self.assert_listener_untouched(0.5)
        self.on["alice"].wait_for("%s: MESSAGE sip:x@%s;transport=tcp from outside refused: "
                                  "403 Literal Destination Refused" % (self.atk_addr, dest))
        px = self.status("alice")["sip"]["proxy"]
        self.assertEqual(px["refused"] - before, len(trials), px)
        say("listener %s: no connection, no byte; alice's node refused %d requests",
            dest, px["refused"] - before)

    def test_03_overlay_route_from_outside_is_refused(self):
        """A p2p-node Route naming carol's node (behind the overlay) would have made alice's node
        deliver the request to carol's, and carol's node forward it anywhere."""
        route = "<sip:127.0.0.1:9;lr;p2p-node=%s;p2p-sn=%s>" % (self.node_id["carol"],
                                                                self.node_id["sn2"])
        d0 = self.sn_delivered()
        for method, to_tag, want in (("MESSAGE", None, "403 Route Beyond This Node Refused"),
                                     ("INVITE", None, "403 Route Beyond This Node Refused"),
                                     ("BYE", "x", "481 No Such Dialog Here")):
            ruri = "sip:x@%s:%d;transport=tcp" % (LISTENER, self.lport)
            got = self.attack("alice", sip_request(method, ruri, self.atk_addr,
                                                   ["Route: " + route], to_tag=to_tag))
            say("%s with Route %s: answered %s", method, route[:60] + "...", got)
            self.assertEqual(got, ["SIP/2.0 " + want])
        self.assert_listener_untouched()
        self.assertEqual(self.sn_delivered(), d0, "something was delivered through the overlay")

    # ---- item 2: a request delivered through the overlay ----

    def test_04_delivered_requests_reach_only_the_nodes_own_user(self):
        """mallory (an enrolled user) attaches its own overlay client to sn1 and delivers SIP to
        carol's node: a MESSAGE for bob, one for a literal address, one with a Route beyond.
        carol's node refuses each (the 403 comes back through the overlay)."""
        c = OverlayClient(os.path.join(self.tmp, "mallory"), self.addr["sn1"])
        try:
            r = c.request("attach", {})
            self.assertEqual(r["kind"], "res", r)
            dest = "%s:%d" % (LISTENER, self.lport)
            src = "127.0.0.1:9"
            trials = [
                (sip_request("MESSAGE", "sip:bob@" + OVERLAY, src), "403 Not A User Of This Node"),
                (sip_request("MESSAGE", "sip:x@%s;transport=tcp" % dest, src),
                 "403 Literal Destination Refused"),
                (sip_request("MESSAGE", "sip:carol@" + OVERLAY, src,
                             ["Route: <sip:%s;transport=tcp;lr>" % dest]),
                 "403 Route Beyond This Node Refused"),
                (sip_request("OPTIONS", "sip:bob@" + OVERLAY, src,
                             ["Route: <sip:127.0.0.1:9;lr;p2p-node=%s;p2p-sn=%s>" % (
                                 self.node_id["alice"], self.node_id["sn1"])]),
                 "403 Route Beyond This Node Refused"),
            ]
            for data, want in trials:
                text = data.decode()
                cid = [ln for ln in text.split("\r\n") if ln.startswith("Call-ID:")][0]
                # (the deliver's own reply is the ring's business: only carol's answer counts)
                c.send("deliver", "req", {"to": self.node_id["carol"], "sn": self.node_id["sn2"],
                                          "payload": {"sip": text, "sn": self.node_id["sn1"]}})
                ans = c.wait_delivered(lambda b: cid in b["payload"].get("sip", ""),
                                       WAIT)
                self.assertIsNotNone(ans, "no answer from carol's node to " + text[:60])
                got = status_line(ans["payload"]["sip"].encode())
                say("delivered to carol's node: %s -> %s", text.split("\r\n")[0], got)
                self.assertEqual(got, "SIP/2.0 " + want)
        finally:
            c.close()
        self.assert_listener_untouched()
        self.on["carol"].wait_for("MESSAGE sip:bob@%s from outside refused: 403 Not A User Of "
                                  "This Node" % OVERLAY)

    # ---- item 2: amplification ----

    def test_05_no_amplification(self):
        sink = "%s:%d" % (SINK, self.sport)
        # (a) A forged request naming the sink: nothing reaches it (before: 11 retransmissions).
        self.atk.sendto(sip_request("MESSAGE", "sip:x@%s" % sink, self.atk_addr),
                        self.node_addr("alice"))
        self.atk.sendto(sip_request("INVITE", "sip:x@%s" % sink, self.atk_addr),
                        self.node_addr("alice"))
        got = recv_all(self.sink, 4.0)  # the old code had sent 3 retransmissions by then
        say("forged MESSAGE and INVITE for sip:x@%s: the sink got %d datagrams", sink, len(got))
        self.assertEqual(got, [])
        recv_all(self.atk, 0.5)  # the attacker's own two 403s
        # (b) The source forged as the sink's (sent from the sink itself): one answer each, no
        # 100 Trying before a refusal, no retransmission.
        for method in ("INVITE", "MESSAGE"):
            self.sink.sendto(sip_request(method, "sip:x@%s:%d" % (LISTENER, self.lport), sink),
                             self.node_addr("alice"))
            got = recv_all(self.sink, 2.5)
            say("forged %s from %s: %d datagram(s) back: %s", method, sink, len(got),
                [status_line(d) for d in got])
            self.assertEqual([status_line(d) for d in got],
                             ["SIP/2.0 403 Literal Destination Refused"])
        # (c) A forged 200 OK on the node's Via, whose next Via names the sink: dropped.
        host, port = self.sip["alice"].rsplit(":", 1)
        resp = ("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP %s;branch=z9hG4bKforged1\r\n"
                "Via: SIP/2.0/UDP %s;branch=z9hG4bKforged2\r\nFrom: <sip:a@x>;tag=1\r\n"
                "To: <sip:b@x>;tag=2\r\nCall-ID: forged@x\r\nCSeq: 1 INVITE\r\n"
                "Content-Length: 0\r\n\r\n" % (self.sip["alice"], sink)).encode()
        self.atk.sendto(resp, (host, int(port)))
        self.assertEqual(recv_all(self.sink, 2.0), [])
        # (d) A REGISTER whose Contact names the sink (a third party): refused, bindings intact.
        got = self.attack("alice", sip_request(
            "REGISTER", "sip:" + OVERLAY, self.atk_addr,
            ["Contact: <sip:alice@%s>" % sink, "Expires: 600"], to="sip:alice@" + OVERLAY))
        self.assertEqual(got, ["SIP/2.0 403 Contact Must Be The Phone's Own Address"])
        binds = [b["contact"] for b in self.status("alice")["sip"]["bindings"]]
        self.assertFalse([b for b in binds if SINK in b], binds)
        self.on["alice"].wait_for("REGISTER of alice@%s refused: its Contact names %s" % (
            OVERLAY, SINK))
        # (e) A REGISTER from outside the phones' networks (sip_register_from), even naming
        # its own address: refused, so nobody else becomes bob's phone.
        got = self.attack("bob", sip_request(
            "REGISTER", "sip:" + OVERLAY, self.atk_addr,
            ["Contact: <sip:bob@%s>" % self.atk_addr, "Expires: 600"], to="sip:bob@" + OVERLAY))
        self.assertEqual(got, ["SIP/2.0 403 Not From The Phones' Network"])
        self.on["bob"].wait_for("%s: REGISTER of bob@%s refused: not from a network phones "
                                "register from" % (self.atk_addr, OVERLAY))

    # ---- RFC 3261 17.1.1.2: Timer A, and a timeout answered 408 ----

    def test_06_unanswered_invite_timer_a_and_408(self):
        """bob's phone (a raw socket registered at bob's node) never answers: bob's node sends
        the INVITE 7 times in Timer B's 32 s (0.5 s doubling, no cap), then answers 408, which
        alice's node passes to alice's phone (also a raw socket, registered at alice's node)."""
        phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            phone.bind(("127.0.0.1", 0))
            caller.bind(("127.0.0.1", 0))
            pa, ca = "%s:%d" % phone.getsockname(), "%s:%d" % caller.getsockname()
            for sock, addr, u in ((phone, pa, "bob"), (caller, ca, "alice")):
                sock.sendto(sip_request("REGISTER", "sip:" + OVERLAY, addr,
                                        ["Contact: <sip:%s@%s>" % (u, addr), "Expires: 600"],
                                        to="sip:%s@%s" % (u, OVERLAY)), self.node_addr(u))
                got = [status_line(d) for d in recv_all(sock, 3.0)]
                self.assertIn("SIP/2.0 200 OK", got, (u, got))
            t0 = time.monotonic()
            caller.sendto(sip_request("INVITE", "sip:bob@" + OVERLAY, ca),
                          self.node_addr("alice"))
            sends, answers = [], []
            end = t0 + 40
            while time.monotonic() < end and not any(a.startswith("SIP/2.0 408") for a in answers):
                for s, into in ((phone, sends), (caller, answers)):
                    s.settimeout(0.05)
                    try:
                        d = s.recvfrom(65535)[0]
                        into.append(status_line(d) if into is answers else time.monotonic() - t0)
                    except socket.timeout:
                        pass
            took = time.monotonic() - t0
            say("unanswered INVITE: bob's node sent it %d times (at %s s); alice's phone got %s "
                "after %.1f s", len(sends), ", ".join("%.1f" % x for x in sends), answers, took)
            self.assertEqual(len(sends), 7, sends)
            self.assertIn("SIP/2.0 408 No Answer From The Callee", answers)
            self.assertGreater(took, 30)
        finally:
            phone.close()
            caller.close()
        # The honest sipp phones registered again (the raw ones replaced their bindings).
        for u in ("alice", "bob"):
            self.run_sipp("register_200", self.port[u], target=self.sip[u],
                          keys=(("user", u), ("domain", OVERLAY), ("expires", 600)))

    def test_07_honest_call_after_the_attacks(self):
        self.call("bob", self.port["bob"])
        self.call("carol", self.port["carol"])


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
