#!/usr/bin/env python3
"""Channels between ordinary nodes (docs/nat.md) on loopback, with real daemons and sipp:

1. a call between two nodes travels on a channel (ICE, then DTLS with both nodes' overlay
   certificates), not through the super nodes, and the next call reuses it;
2. an enrolled adversary (mallory, attached to a super node with its real certificate) delivers
   malformed channel signalling to alice's node: each is dropped and counted, and alice's calls
   go on working;
3. mallory's offer names candidates at a UDP port it listens on: alice's node checks them (ICE
   connectivity checks, bounded and paced), nothing opens, the channel fails within its set-up
   time, and the datagrams the target received stay few;
4. a node that cannot gather candidates (its ICE address is not on this host) makes the caller
   give the channel up at once: the call completes through the overlay, the last resort;
5. a channel idle longer than channel_idle_s is closed, and the next call opens a new one;
   `ordinarynode close-channels` closes them by hand, and their TURN allocations go back;
6. the node's /metrics (metrics_listen) counts all of it;
7. two nodes that open channels to each other at the same moment end with one channel;
8. a SIP message of 9 KB crosses a channel in chunks and arrives whole."""

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import overlaypeer  # noqa: E402

BINDIR = None
OVERLAY = "chan-test.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20

free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [channels] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class Channels(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-chan-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        cls.build_overlay(OVERLAY, ("sn1", "sn2"), ("alice", "bob", "dave", "mallory"), wait=WAIT)
        cls.users = ("alice", "bob", "dave")
        for u in cls.users:
            cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
        for u in cls.users:
            cls.on[u].wait_for("published user location", timeout=WAIT)
        cls.port = {u: free_port() for u in cls.users}
        for u in cls.users:
            p = cls.start_sipp(cls, "register_200", cls.port[u], target=cls.sip[u],
                               keys=(("user", u), ("domain", OVERLAY), ("expires", 600)))
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out[-3000:]

    @classmethod
    def node_conf(cls, u, conf):
        if u in ("alice", "bob"):
            conf["supernodes"] = [cls.addr["sn1"]]
        if u == "alice":
            cls.metrics_port = free_port()
            conf["metrics_listen"] = "127.0.0.1:%d" % cls.metrics_port
        if u == "bob":  # bob's side closes idle channels soon
            conf["channel_idle_s"] = 5
        if u == "dave":  # dave's channels gather on an address this host does not have
            conf.update({"supernodes": [cls.addr["sn2"]], "ice_addresses": ["203.0.113.9"]})

    @classmethod
    def tearDownClass(cls):
        if cls.mlink_:
            cls.mlink_.close()
        cls.save_logs("test_channels")
        problems = cls.stop_all()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def call(self, caller, callee):
        uas = self.start_sipp("uas_answer", self.port[callee])
        time.sleep(0.3)
        uac = self.start_sipp("uac_call", self.port[caller], target=self.sip[caller],
                              keys=(("callee", callee), ("domain", OVERLAY)), service=caller)
        self.finish_sipp(uac, "%s's phone calling %s" % (caller, callee))
        self.finish_sipp(uas, "%s's phone answering" % callee)

    def channel(self, u, peer):
        st = self.status(u)
        found = [c for c in st.get("channels", []) if c["peer"] == self.node_id[peer]]
        return (found[0] if found else None), st

    def test_01_calls_travel_on_one_channel(self):
        delivered0 = self.sn_delivered()
        self.call("alice", "bob")
        c, st = self.channel("alice", "bob")
        say("alice -> bob: %s", c)
        self.assertIsNotNone(c, st.get("channels"))
        self.assertEqual((c["state"], c["path"], c["role"]), ("open", "direct", "caller"))
        opened = st["channel_counters"]["opened"]
        self.call("alice", "bob")
        c2, st2 = self.channel("alice", "bob")
        self.assertEqual(st2["channel_counters"]["opened"], opened, "the channel was not reused")
        self.assertGreaterEqual(c2["messages_out"], 6)
        self.assertEqual(st2["sip"]["proxy"]["through_overlay"], 0)
        b, _ = self.channel("bob", "alice")
        self.assertEqual((b["state"], b["role"]), ("open", "callee"))
        # the offer and the answer are all the super nodes carried
        self.assertLessEqual(self.sn_delivered() - delivered0, 2)
        # the super node's STUN server answered the node's query (on its loop, not blocking it)
        wait_until("alice's STUN answer", lambda: self.status("alice").get("stun_mapped"), 10)
        # what a person reads: candidates with priorities, the channel and its path
        rc, out, err = self.cli("alice", "status")
        self.assertEqual(rc, 0, err)
        say("alice's status:\n%s", out)
        self.assertIn("candidate    host  127.0.0.1:", out)
        self.assertRegex(out, r"channel      %s open \(caller\), direct" % self.node_id["bob"][:8])

    mlink_ = None

    def mlink(self):
        """mallory's own client, attached to sn1 with mallory's certificate; attached again
        when sn1 dropped it (mallory sends no keepalives: a slow run under valgrind loses it)."""
        cls = type(self)
        if cls.mlink_ is None or cls.mlink_.closed_reason is not None:
            link = overlaypeer.Link(self.addr["sn1"], self.state_dir("mallory"), OVERLAY)
            r = link.request("attach", {})
            self.assertEqual(r["kind"], "res", r)
            cls.mlink_ = link
        return cls.mlink_

    def deliver(self, to, payload):
        """payload delivered from mallory to node `to` at the super node it is attached to now
        (a slow run may have sent it elsewhere than its configured one)."""
        sn = self.status(to)["supernode"]["id"]
        body = {"to": self.node_id[to], "sn": sn, "payload": payload}
        try:
            return self.mlink().request("deliver", body)
        except overlaypeer.Closed:
            return self.mlink().request("deliver", body)

    def test_02_malformed_signalling_is_dropped(self):
        sn = self.node_id["sn1"]
        bad = [
            {"ice": "offer"},
            {"ice": {}},
            {"ice": {"op": "offer"}},
            {"ice": {"op": "offer", "id": "zz", "sn": sn}},
            {"ice": {"op": "offer", "id": "0123456789abcdef", "sn": "nothex"}},
            {"ice": {"op": 7, "id": "0123456789abcdef", "sn": sn}},
            {"ice": {"op": "dance", "id": "0123456789abcdef", "sn": sn}},
        ]
        before = self.status("alice")["channel_counters"]["bad_signals"]
        for p in bad:
            r = self.deliver("alice", p)
            self.assertEqual(r["kind"], "res", r)
        # an offer without usable credentials or candidates, and oversized ones
        for p in ({"ice": {"op": "offer", "id": "00000000000000a1", "sn": sn, "ufrag": "u",
                           "pwd": "p", "cands": []}},
                  {"ice": {"op": "offer", "id": "00000000000000a2", "sn": sn, "ufrag": "u" * 5000,
                           "pwd": "p" * 5000, "cands": ["x" * 5000] * 100}}):
            self.deliver("alice", p)
            time.sleep(1.1)  # one offer a second from one peer
        # an answer and a close for channels that do not exist
        self.deliver("alice", {"ice": {"op": "answer", "id": "00000000000000b1", "sn": sn,
                                             "ufrag": "u", "pwd": "p", "cands": ["c"]}})
        self.deliver("alice", {"ice": {"op": "close", "id": "00000000000000b2", "sn": sn}})
        wait_until("alice counted the malformed signals",
                   lambda: self.status("alice")["channel_counters"]["bad_signals"] - before >= 5,
                   WAIT)
        st = self.status("alice")
        say("after %d malformed signals: alice's counters %s", len(bad), st["channel_counters"])
        self.on["alice"].wait_for("channel signal from node", timeout=5)
        self.call("alice", "bob")  # alice serves on

    def test_03_an_offer_naming_a_victim_gets_bounded_checks(self):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(0.2)
        port = sink.getsockname()[1]
        got = []
        stop = threading.Event()

        def count():
            while not stop.is_set():
                try:
                    got.append(sink.recv(2048))
                except socket.timeout:
                    pass
        t = threading.Thread(target=count, daemon=True)
        t.start()
        mallory = self.node_id["mallory"]
        cands = ["a=candidate:%d 1 UDP %d 127.0.0.1 %d typ host" % (i, 2130706431 - i, port)
                 for i in range(1, 40)]
        t0 = time.monotonic()
        self.deliver("alice", {"ice": {"op": "offer", "id": "00000000000000c1",
                                             "sn": self.node_id["sn1"], "ufrag": "mall",
                                             "pwd": "malloryspasswordislong", "cands": cands}})
        ans = None
        end = time.monotonic() + WAIT
        while time.monotonic() < end and ans is None:
            m = self.mlink().recv(timeout=1.0, match=lambda m: m["type"] == "deliver" and
                          m["kind"] == "ind")
            if m and "ice" in m["body"]["payload"]:
                ans = m["body"]["payload"]["ice"]
        self.assertIsNotNone(ans, "alice's node sent no answer")
        self.assertEqual(ans["op"], "answer")
        say("alice answered mallory's offer with %d candidates: %s", len(ans["cands"]),
            ans["cands"])
        # mallory never answers the checks: the channel fails within the set-up time
        wait_until("alice gave the channel to mallory up",
                   lambda: any(c["peer"] == mallory and c["state"] == "failed"
                               for c in self.status("alice").get("channels", [])),
                   15 if not SLOW else 40)
        took = time.monotonic() - t0
        stop.set()
        t.join()
        sink.close()
        say("the victim port got %d datagrams in %.1f s (39 candidates named, 16 taken)",
            len(got), took)
        # one address:port, checked with RFC 8445 pacing and retransmissions: a handful
        self.assertLess(len(got), 40)

    def test_04_a_channel_that_cannot_open_falls_back_to_the_overlay(self):
        t0 = time.monotonic()
        self.call("alice", "dave")
        took = time.monotonic() - t0
        c, st = self.channel("alice", "dave")
        say("alice -> dave (dave cannot gather): %s; call took %.1f s; counters %s", c, took,
            st["channel_counters"])
        self.assertIsNotNone(c)
        self.assertEqual(c["state"], "failed")
        self.assertGreaterEqual(st["channel_counters"]["via_overlay"], 3)  # INVITE, ACK, BYE
        self.on["dave"].wait_for("cannot gather", timeout=5)

    def test_05_an_idle_channel_is_closed_and_opened_again(self):
        self.call("alice", "bob")
        opened = self.status("alice")["channel_counters"]["opened"]
        wait_until("bob closed the idle channel",
                   lambda: all(c["peer"] != self.node_id["alice"] or c["state"] != "open"
                               for c in self.status("bob").get("channels", [])),
                   20 if not SLOW else 60)
        wait_until("alice saw it closed",
                   lambda: (self.channel("alice", "bob")[0] or {}).get("state") != "open", 10)
        self.call("alice", "bob")
        c, st = self.channel("alice", "bob")
        self.assertEqual(c["state"], "open")
        self.assertEqual(st["channel_counters"]["opened"], opened + 1)
        # and an operator closes them by hand
        rc, out, err = self.cli("alice", "close-channels", self.node_id["bob"])
        self.assertEqual((rc, out.strip()), (0, "1 channels closed"), err)
        self.assertIsNone(self.channel("alice", "bob")[0])
        rc, out, err = self.cli("alice", "close-channels", "nothex")
        self.assertEqual(rc, 2, out)
        # a closed channel gives its TURN allocation back (RFC 8656 Refresh, lifetime 0)
        wait_until("sn1 holds no allocation of alice's or bob's",
                   lambda: self.sn_status("sn1")["turn"]["allocations"] == 0, 10)

    def test_06_metrics(self):
        """alice's /metrics (metrics_listen) counts what the tests above did."""
        import urllib.request
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                      timeout=10).read().decode()
        m = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                m[k] = float(v)
        say("alice's metrics: %s", {k: v for k, v in m.items() if "channel" in k or "ice" in k})
        self.assertEqual(m["p2p_attached"], 1)
        self.assertGreaterEqual(m["p2p_channels_opened_total"], 1)
        self.assertGreaterEqual(m["p2p_channel_failures_total"], 2)  # mallory's and dave's
        self.assertGreaterEqual(m['p2p_channel_malformed_total{what="signal"}'], 5)
        self.assertGreaterEqual(m['p2p_channel_overlay_messages_total'], 3)
        self.assertGreaterEqual(m['p2p_channel_messages_total{dir="out"}'], 6)  # closed ones too
        self.assertEqual(m['p2p_ice_candidates{type="host"}'], 1)
        self.assertIn('p2p_nat_mapping{kind="unknown"}', m)

    def test_07_both_nodes_open_at_once(self):
        """alice's and bob's nodes open a channel to each other at the same moment
        (`ordinarynode open-channel`): both offers cross, the one of the lower Node-ID stands,
        and each side ends with the one channel, caller on one side and callee on the other."""
        import subprocess
        for u in ("alice", "bob"):
            self.cli(u, "close-channels")
        procs = [subprocess.Popen(harness.WRAPPER + [self.bin("ordinarynode"), "-c", self.cfg[a],
                                                     "open-channel", "%s@%s" % (b, OVERLAY)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for a, b in (("alice", "bob"), ("bob", "alice"))]
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0, err)
            self.assertIn("channel open or opening", out)
        wait_until("both ends open",
                   lambda: (self.channel("alice", "bob")[0] or {}).get("state") == "open" and
                   (self.channel("bob", "alice")[0] or {}).get("state") == "open", WAIT)
        a, b = self.channel("alice", "bob")[0], self.channel("bob", "alice")[0]
        say("alice's end: %s; bob's end: %s", a["role"], b["role"])
        self.assertEqual(sorted((a["role"], b["role"])), ["callee", "caller"])
        self.call("alice", "bob")  # and it carries the next call
        self.assertEqual(self.channel("alice", "bob")[0]["state"], "open")
        rc, out, err = self.cli("alice", "open-channel", "nobody@" + OVERLAY)
        self.assertNotEqual(rc, 0)

    def test_08_a_large_message_travels_in_chunks(self):
        """A SIP MESSAGE of about 9 KB from alice's phone to bob's: it crosses the channel as
        ten DTLS records of at most 1000 bytes of it and reaches bob's phone whole; the 200
        comes back the same way."""
        body = "".join("line %04d of a long message to see chunking at work\r\n" % i
                       for i in range(170))
        call_id = "big-%d@127.0.0.1" % os.getpid()
        node = self.sip["alice"]
        host, port = node.rsplit(":", 1)
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        a.bind(("127.0.0.1", self.port["alice"]))  # the phones' registered addresses
        b.bind(("127.0.0.1", self.port["bob"]))
        a.settimeout(10)
        b.settimeout(10)
        c0, _ = self.channel("alice", "bob")
        sent0 = c0["bytes_out"] if c0 and c0["state"] == "open" else 0
        try:
            msg = ("MESSAGE sip:bob@%s SIP/2.0\r\n"
                   "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-big-1;rport\r\n"
                   "Max-Forwards: 70\r\nFrom: <sip:alice@%s>;tag=big1\r\n"
                   "To: <sip:bob@%s>\r\nCall-ID: %s\r\nCSeq: 1 MESSAGE\r\n"
                   "Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                   % (OVERLAY, self.port["alice"], OVERLAY, OVERLAY, call_id, len(body), body))
            self.assertGreater(len(msg), 9000)
            a.sendto(msg.encode(), (host, int(port)))
            got = b''
            while b"MESSAGE sip:" not in got:
                got, src = b.recvfrom(65535)
            text = got.decode()
            self.assertIn(body, text)  # whole, in order
            head = text.split("\r\n\r\n", 1)[0]
            vias = [l for l in head.split("\r\n") if l.lower().startswith("via:")]
            resp = ("SIP/2.0 200 OK\r\n%s\r\n" % "\r\n".join(vias) +
                    "\r\n".join(l for l in head.split("\r\n")[1:]
                                 if l.split(":")[0].lower() in ("from", "to", "call-id", "cseq")) +
                    "\r\nContent-Length: 0\r\n\r\n")
            resp = resp.replace("To: <sip:bob@%s>" % OVERLAY, "To: <sip:bob@%s>;tag=b1" % OVERLAY)
            b.sendto(resp.encode(), src)
            while True:
                r = a.recv(65535).decode()
                if r.startswith("SIP/2.0 200"):
                    break
            c, _ = self.channel("alice", "bob")
            say("a %d-byte MESSAGE crossed the channel (%s) and was answered 200", len(msg),
                c and c["state"])
            self.assertEqual(c["state"], "open")
            self.assertGreater(c["bytes_out"] - sent0, 9000)  # on the channel, not the overlay
        finally:
            a.close()
            b.close()

    # ---- helpers ----

    def state_dir(self, u):
        return os.path.join(self.tmp, u)

    def sn_delivered(self):
        return sum(self.sn_status(u)["ordinary_nodes"]["delivered"] for u in ("sn1", "sn2"))


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
