#!/usr/bin/env python3
"""Media anchoring (docs/sip.md "Media") on loopback, with real daemons and a small SIP phone
of the test's own (sipua.py) so that every SDP line and every RTP packet can be looked at:
1. alice's phone (at her node) calls bob's (at his): each phone is handed an SDP naming its own
   node (address and a port of that node's media_ports), with the other phone's codecs and
   SDES crypto line as they were, its ICE lines and the overlay's marker taken out; RTP goes both
   ways through the two nodes and their channel, whole; both nodes' status lists the call with
   its path and counters;
2. hold and resume (re-INVITEs) keep the same ports, and audio flows after the resume; when
   the channel closes under the call, the media opens a new one;
3. RTP to alice's node from an address that is not her phone is dropped and counted;
4. the BYE lets the media go (status: no call), and so does a call that fails (486) or is
   cancelled while it rings (487);
5. carol, a classical phone at sn1's public front end, registered with a Contact and an SDP
   that name addresses she cannot be reached at (as behind a NAT): she is called at the
   address she registered from, sn1 sends her media where her packets come from (latching),
   never to the address her SDP names nor to an address alice's SDP names (a node cannot make a
   super node send media elsewhere), and a stranger's RTP to sn1's port is dropped;
6. over the front end's media_max_calls, a call is refused with 503 (not set up silently
   without media);
7. early media: a 183 with SDP sets the media up before the 200;
8. two classical phones at the front end, each behind its own NAT, hear each other through
   sn1 (latching on both sides);
9. a node whose channels use only relayed candidates (channel_force_relay) is called through
   its super node's TURN relay, which carries only ciphertext (a capture of its ports holds none
   of the audio's bytes); a call the relay's announced budget has no room for gets 503;
10. /metrics counts the media; media settings a node cannot use stop it with a clear error."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import phone  # noqa: E402  (its pcap reader and tcpdump wrapper)
import sipua  # noqa: E402

BINDIR = None
OVERLAY = "media-test.p2psip"
PBX = "pbx.test"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
PORTS = {"alice": (42000, 42999), "bob": (43000, 43999), "sn1": (44000, 44999),
         "erin": (45000, 45999)}
CAROL_PW = "carol-secret"

free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [media] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class Media(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-media-")
        cls.phones = []
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        import hashlib
        cls.users_file = os.path.join(cls.tmp, "pbx-users")
        with open(cls.users_file, "w") as f:
            for u in ("carol", "dave"):
                f.write("%s:%s\n" % (u, hashlib.md5(("%s:%s:%s" % (u, PBX, CAROL_PW)).encode())
                                     .hexdigest()))
        cls.sn_sip = {}
        cls.build_overlay(OVERLAY, ("sn1", "sn2"), ("alice", "bob", "erin"), wait=WAIT,
                          ls_extra={"sip_proxies": [PBX + "=sn1"]})
        for u in ("alice", "bob", "erin"):
            cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
        for u in ("alice", "bob", "erin"):
            cls.on[u].wait_for("published user location", timeout=WAIT)
        cls.sn["sn1"].wait_for("P2P registrar and proxy of %s" % PBX, timeout=WAIT)
        cls.ua = {}
        for u in ("alice", "bob", "erin"):
            host, port = cls.sip[u].rsplit(":", 1)
            cls.ua[u] = sipua.UA(u, OVERLAY, (host, int(port)))
            cls.phones.append(cls.ua[u])
            cls.ua[u].register()

    @classmethod
    def node_conf(cls, u, conf):
        if u == "sn1":
            cls.sn_sip[u] = "127.0.0.1:%d" % free_port()
            conf.update({"sip_listen": cls.sn_sip[u], "sip_domain": PBX,
                         "sip_users": cls.users_file, "media_max_calls": 1,
                         "media_ports": "%d-%d" % PORTS[u]})
        elif u == "sn2":  # its relay: loopback peers (this test's), room for one call
            conf.update({"turn_allow_peers": ["127.0.0.0/8"], "turn_bandwidth_kbps": 300})
        elif u in ("alice", "bob", "erin"):
            conf["supernodes"] = [cls.addr["sn1"] if u == "alice" else cls.addr["sn2"]]
            conf["media_ports"] = "%d-%d" % PORTS[u]
            if u == "erin":  # erin's node hides its addresses: its channels go through sn2
                conf["channel_force_relay"] = True
            if u == "alice":
                cls.metrics_port = free_port()
                conf["metrics_listen"] = "127.0.0.1:%d" % cls.metrics_port

    @classmethod
    def tearDownClass(cls):
        for p in cls.phones:
            p.close()
        cls.save_logs("test_media")
        problems = cls.stop_all()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def media(self, u):
        return self.status(u).get("media", {})

    def sn_media(self):
        return self.sn_status("sn1").get("sip_media", {})

    def assert_flows(self, a, a_dest, b, b_dest, n=100, least=0.98):
        """a's RTP to a_dest reaches b, and b's to b_dest reaches a (>= least of n packets)."""
        a.send(a_dest, n)
        b.send(b_dest, n)
        wait_until("RTP both ways", lambda: len(b.received_from(a.ssrc)) >= n * least and
                   len(a.received_from(b.ssrc)) >= n * least, 10)
        return len(b.received_from(a.ssrc)), len(a.received_from(b.ssrc))

    def test_01_call_with_media_through_both_nodes(self):
        alice, bob = self.ua["alice"], self.ua["bob"]
        ra, rb = sipua.RtpPeer(), sipua.RtpPeer()
        self.addCleanup(ra.close)
        self.addCleanup(rb.close)
        crypto = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"
        offer = sipua.sdp_body("127.0.0.1", ra.addr[1], extra=(
            crypto, "a=candidate:1 1 UDP 2130706431 192.168.1.2 4000 typ host", "a=sendrecv"))
        import threading
        got = {}
        t = threading.Thread(target=lambda: got.update(
            inv=bob.answer(sipua.sdp_body("127.0.0.1", rb.addr[1]))))
        t.start()
        final = alice.invite("bob@" + OVERLAY, offer)
        t.join(30)
        self.assertEqual(final.code, 200, final.first)
        inv = got["inv"]
        addr, media, lines = sipua.sdp_media(inv.body)
        say("bob's phone got: %s", lines)
        self.assertEqual(addr, "127.0.0.1")
        self.assertTrue(PORTS["bob"][0] <= media[0][1] <= PORTS["bob"][1], media)
        self.assertIn(crypto, lines)
        self.assertIn("a=rtpmap:0 PCMU/8000", lines)
        self.assertIn("a=sendrecv", lines)
        self.assertFalse([x for x in lines if x.startswith(("a=candidate", "a=p2p-media"))], lines)
        a_addr, a_media, a_lines = sipua.sdp_media(final.body)
        self.assertTrue(PORTS["alice"][0] <= a_media[0][1] <= PORTS["alice"][1], a_media)
        self.assertFalse([x for x in a_lines if x.startswith("a=p2p-media")], a_lines)
        self.call = {"a_port": a_media[0][1], "b_port": media[0][1], "ra": ra, "rb": rb}
        got_b, got_a = self.assert_flows(ra, ("127.0.0.1", a_media[0][1]), rb,
                                         ("127.0.0.1", media[0][1]))
        say("RTP through the nodes: %d of 100 to bob, %d of 100 to alice", got_b, got_a)
        # what arrives is what was sent
        self.assertEqual(rb.received_from(ra.ssrc)[0][2], b"\xff" * 160)
        st = self.media("alice")
        say("alice's media status: %s", json.dumps(st)[:600])
        self.assertEqual(st["active"], 1)
        c = st["calls"][0]
        self.assertEqual((c["peer"], c["path"]), (self.node_id["bob"], "direct"))
        s0 = c["streams"][0]
        self.assertGreaterEqual(s0["from_phone"]["packets"], 100)
        self.assertGreaterEqual(s0["to_phone"]["packets"], 98)
        self.assertLessEqual(s0["to_phone"]["loss"], 0.02)
        rc, out, err = self.cli("alice", "status")
        self.assertEqual(rc, 0, err)
        say("alice's status, media lines:\n%s", "\n".join(
            x for x in out.splitlines() if x.startswith(("media", "call", "  audio"))))
        self.assertRegex(out, r"call +\S+ with %s: direct" % self.node_id["bob"][:8])
        self.assertRegex(out, r"audio +port %d, phone 127\.0\.0\.1:\d+: 1\d\d/\d+ packets"
                         % a_media[0][1])
        # 2. hold and resume: same ports, audio again after the resume
        t = threading.Thread(target=lambda: got.update(
            hold=bob.answer_in_dialog("INVITE", sipua.sdp_body("127.0.0.1", rb.addr[1],
                                                               extra=("a=recvonly",)))))
        t.start()
        r = alice.reinvite(sipua.sdp_body("127.0.0.1", ra.addr[1], extra=("a=sendonly",)))
        t.join(20)
        self.assertEqual(r.code, 200, r.first)
        _, hm, hl = sipua.sdp_media(got["hold"].body)
        self.assertEqual(hm[0][1], media[0][1], "hold moved bob's port")
        self.assertIn("a=sendonly", hl)
        self.assertEqual(sipua.sdp_media(r.body)[1][0][1], a_media[0][1])
        t = threading.Thread(target=lambda: got.update(
            resume=bob.answer_in_dialog("INVITE", sipua.sdp_body("127.0.0.1", rb.addr[1]))))
        t.start()
        r = alice.reinvite(sipua.sdp_body("127.0.0.1", ra.addr[1], extra=("a=sendrecv",)))
        t.join(20)
        self.assertEqual(r.code, 200, r.first)
        before_b, before_a = len(rb.received_from(ra.ssrc)), len(ra.received_from(rb.ssrc))
        ra.send(("127.0.0.1", a_media[0][1]), 50)
        rb.send(("127.0.0.1", media[0][1]), 50)
        wait_until("RTP after the resume",
                   lambda: len(rb.received_from(ra.ssrc)) - before_b >= 49 and
                   len(ra.received_from(rb.ssrc)) - before_a >= 49, 10)
        # the channel closes under the call (close-channels): the media opens a new one
        rc, out, err = self.cli("alice", "close-channels")
        self.assertEqual(rc, 0, err)
        before_b = len(rb.received_from(ra.ssrc))
        ra.send(("127.0.0.1", a_media[0][1]), 100)
        wait_until("alice's media on a new channel",
                   lambda: len(rb.received_from(ra.ssrc)) - before_b >= 50, 10)
        say("after close-channels: %d of 100 packets reached bob on the new channel",
            len(rb.received_from(ra.ssrc)) - before_b)
        # 3. a stranger's RTP to alice's node port: dropped
        dropped0 = st["dropped"]["not_the_phone"]
        stranger = sipua.RtpPeer(ip="127.0.0.9")
        self.addCleanup(stranger.close)
        stranger.send(("127.0.0.1", a_media[0][1]), 20, gap=0.005)
        time.sleep(0.5)
        self.assertEqual(rb.received_from(stranger.ssrc), [], "a stranger's RTP reached bob")
        dropped = self.media("alice")["dropped"]["not_the_phone"]
        self.assertGreaterEqual(dropped - dropped0, 20)
        say("a stranger's 20 packets: dropped (%d counted)", dropped - dropped0)
        # a packet too long for a channel's record: dropped and counted, the call goes on
        n_b = len(rb.received_from(ra.ssrc))
        ra.send(("127.0.0.1", a_media[0][1]), 3, payload=b"\x00" * 1400)
        ra.send(("127.0.0.1", a_media[0][1]), 5)
        wait_until("the call goes on", lambda: len(rb.received_from(ra.ssrc)) >= n_b + 5, 5)
        self.assertEqual(self.media("alice")["dropped"]["oversize"], 3)
        # 4. BYE: the media goes
        t = threading.Thread(target=lambda: bob.answer_in_dialog("BYE"))
        t.start()
        r = alice.bye()
        t.join(20)
        self.assertEqual(r.code, 200)
        wait_until("alice's node let the call go", lambda: self.media("alice")["active"] == 0, 5)
        wait_until("bob's node let the call go", lambda: self.media("bob")["active"] == 0, 5)
        n = len(rb.received_from(ra.ssrc))
        ra.send(("127.0.0.1", a_media[0][1]), 10)
        time.sleep(0.3)
        self.assertEqual(len(rb.received_from(ra.ssrc)), n, "media went on after the BYE")

    def test_02_failed_call_releases_media(self):
        alice, bob = self.ua["alice"], self.ua["bob"]
        import threading
        t = threading.Thread(target=lambda: bob.answer("", code=486))
        t.start()
        final = alice.invite("bob@" + OVERLAY, sipua.sdp_body("127.0.0.1", 40000))
        t.join(30)
        self.assertEqual(final.code, 486, final.first)
        wait_until("no call left at alice's node", lambda: self.media("alice")["active"] == 0, 5)
        wait_until("no call left at bob's node", lambda: self.media("bob")["active"] == 0, 5)
        self.assertGreaterEqual(self.media("alice")["calls_total"], 1)
        # CANCEL while it rings: 487, and the media goes at both nodes
        total = self.media("alice")["calls_total"]
        call_id, tag, branch = sipua._tag() + "@cancel", sipua._tag(), "z9hG4bK" + sipua._tag()
        uri = "sip:bob@" + OVERLAY
        alice.request("INVITE", uri, uri, call_id, tag, branch=branch, cseq=1,
                      body=sipua.sdp_body("127.0.0.1", 40004))
        inv = bob.recv(lambda m: m.is_request and m.method == "INVITE", 20)
        bob.reply(inv, 180, "Ringing", to_tag="ring")
        alice.recv(lambda m: not m.is_request and m.code == 180, 10)
        self.assertEqual(self.media("alice")["calls_total"], total + 1)
        self.assertEqual(self.media("bob")["active"], 1)
        alice.request("CANCEL", uri, uri, call_id, tag, branch=branch, cseq=1)
        cancel = bob.recv(lambda m: m.is_request and m.method == "CANCEL", 10)
        bob.reply(cancel, 200, "OK")
        bob.reply(inv, 487, "Request Terminated", to_tag="ring")
        r = alice.recv(lambda m: not m.is_request and m.method == "INVITE" and m.code >= 200, 10)
        self.assertEqual(r.code, 487)
        wait_until("the cancelled call's media gone at alice's node",
                   lambda: self.media("alice")["active"] == 0, 5)
        wait_until("the cancelled call's media gone at bob's node",
                   lambda: self.media("bob")["active"] == 0, 5)

    def test_03_classical_phone_behind_nat_at_the_front_end(self):
        host, port = self.sn_sip["sn1"].rsplit(":", 1)
        # carol's Contact and SDP name addresses she is not at, as a phone behind NAT writes
        dead_sip = sipua.RtpPeer(ip="127.0.0.66")
        dead_rtp = sipua.RtpPeer(ip="127.0.0.66")
        victim = sipua.RtpPeer(ip="127.0.0.77")
        for p in (dead_sip, dead_rtp, victim):
            self.addCleanup(p.close)
        carol = sipua.UA("carol", PBX, (host, int(port)),
                         contact="127.0.0.66:%d" % dead_sip.addr[1])
        self.phones.append(carol)
        carol.register(password=CAROL_PW)
        alice = self.ua["alice"]
        ra, rc = sipua.RtpPeer(), sipua.RtpPeer()
        self.addCleanup(ra.close)
        self.addCleanup(rc.close)
        import threading
        got = {}
        t = threading.Thread(target=lambda: got.update(inv=carol.answer(
            sipua.sdp_body("127.0.0.66", dead_rtp.addr[1]))))
        t.start()
        # alice's phone says its media goes to the victim: her node keeps that to itself
        final = alice.invite("carol@" + PBX, sipua.sdp_body("127.0.0.77", victim.addr[1]))
        t.join(30)
        self.assertEqual(final.code, 200, final.first)
        addr, media, lines = sipua.sdp_media(got["inv"].body)
        say("carol's phone got: %s", lines)
        self.assertEqual(addr, "127.0.0.1")
        self.assertTrue(PORTS["sn1"][0] <= media[0][1] <= PORTS["sn1"][1], media)
        a_port = sipua.sdp_media(final.body)[1][0][1]
        c_dest = ("127.0.0.1", media[0][1])
        # carol speaks first (her NAT opens), then both
        rc.send(c_dest, 5)
        got_c, got_a = self.assert_flows(ra, ("127.0.0.1", a_port), rc, c_dest)
        say("carol <-> alice through sn1: %d to carol, %d to alice", got_c, got_a)
        st = self.sn_media()
        say("sn1's media: %s", json.dumps(st)[:500])
        self.assertEqual(st["active"], 1)
        self.assertTrue(st["calls"][0]["streams"][0]["latched"])
        sn_ports = range(PORTS["sn1"][0], PORTS["sn1"][1] + 1)
        self.assertFalse([s for s in dead_rtp.sources if s[1] in sn_ports],
                         "sn1 sent media to the address carol's SDP named")
        self.assertFalse([s for s in victim.sources if s[1] in sn_ports],
                         "sn1 sent media to the address alice's SDP named")
        self.assertEqual(len(dead_sip.got) + len(dead_sip.sources), 0,
                         "SIP went to carol's Contact instead of where she registered from")
        # a stranger's RTP to sn1's port for carol: dropped
        stranger = sipua.RtpPeer(ip="127.0.0.9")
        self.addCleanup(stranger.close)
        stranger.send(c_dest, 20, gap=0.005)
        time.sleep(0.5)
        self.assertEqual(ra.received_from(stranger.ssrc), [])
        self.assertGreaterEqual(self.sn_media()["dropped"]["not_the_phone"], 20)
        # 6. sn1 takes one call with media at a time: bob's call to carol gets 503
        bob = self.ua["bob"]
        r = bob.invite("carol@" + PBX, sipua.sdp_body("127.0.0.1", 40002))
        say("a second call to carol: %s", r.first)
        self.assertEqual(r.code, 503, r.first)
        self.assertGreaterEqual(self.sn_media()["refused"], 1)
        t = threading.Thread(target=lambda: carol.answer_in_dialog("BYE"))
        t.start()
        self.assertEqual(alice.bye().code, 200)
        t.join(20)
        wait_until("sn1 let the call go", lambda: self.sn_media()["active"] == 0, 5)

    def test_04_early_media(self):
        """bob's phone answers 183 with SDP (a ring-back tone): his media reaches alice before
        the 200, through both nodes; the 200 keeps the ports."""
        alice, bob = self.ua["alice"], self.ua["bob"]
        ra, rb = sipua.RtpPeer(), sipua.RtpPeer()
        self.addCleanup(ra.close)
        self.addCleanup(rb.close)
        import threading
        got = {}

        def callee():
            inv = bob.recv(lambda m: m.is_request and m.method == "INVITE", 20)
            tag = sipua._tag()
            bob.reply(inv, 183, "Session Progress", body=sipua.sdp_body("127.0.0.1", rb.addr[1]),
                      to_tag=tag)
            got["inv"] = inv
            # the tone before the answer, to the port bob's node gave him
            _, m, _ = sipua.sdp_media(inv.body)
            rb.send(("127.0.0.1", m[0][1]), 50)
            got["early"] = len(ra.received_from(rb.ssrc))
            bob.accept(inv, tag, sipua.sdp_body("127.0.0.1", rb.addr[1]))

        t = threading.Thread(target=callee)
        t.start()
        final = alice.invite("bob@" + OVERLAY, sipua.sdp_body("127.0.0.1", ra.addr[1]))
        t.join(30)
        self.assertEqual(final.code, 200, final.first)
        say("early media: %d of 50 packets reached alice before the 200", got["early"])
        self.assertGreaterEqual(got["early"], 45)
        t = threading.Thread(target=lambda: bob.answer_in_dialog("BYE"))
        t.start()
        self.assertEqual(alice.bye().code, 200)
        t.join(20)
        wait_until("no call left", lambda: self.media("alice")["active"] == 0, 5)

    def test_05_two_classical_phones_behind_nats(self):
        """carol and dave, both at sn1's front end and both writing addresses they cannot be
        reached at (each behind its own NAT): sn1 relays their media between them, latched to
        where each one's packets come from."""
        host, port = self.sn_sip["sn1"].rsplit(":", 1)
        ua, rtp, dead = {}, {}, {}
        for i, u in enumerate(("carol", "dave")):
            dead[u] = sipua.RtpPeer(ip="127.0.0.%d" % (66 + i))
            self.addCleanup(dead[u].close)
            ua[u] = sipua.UA(u, PBX, (host, int(port)), ip="127.0.0.%d" % (21 + i),
                             contact="127.0.0.%d:%d" % (66 + i, dead[u].addr[1]))
            self.phones.append(ua[u])
            ua[u].register(password=CAROL_PW)
            rtp[u] = sipua.RtpPeer(ip="127.0.0.%d" % (21 + i))
            self.addCleanup(rtp[u].close)
        import threading
        got = {}
        t = threading.Thread(target=lambda: got.update(inv=ua["dave"].answer(
            sipua.sdp_body("127.0.0.67", dead["dave"].addr[1]))))
        t.start()
        final = ua["carol"].invite("dave@" + PBX, sipua.sdp_body("127.0.0.66",
                                                                 dead["carol"].addr[1]),
                                   password=CAROL_PW)
        t.join(30)
        self.assertEqual(final.code, 200, final.first)
        _, dm, _ = sipua.sdp_media(got["inv"].body)
        caddr, cm, _ = sipua.sdp_media(final.body)
        self.assertEqual(caddr, "127.0.0.1")
        d_dest, c_dest = ("127.0.0.1", dm[0][1]), ("127.0.0.1", cm[0][1])
        self.assertNotEqual(dm[0][1], cm[0][1])
        rtp["dave"].send(d_dest, 3)  # each phone's first packets open its NAT
        rtp["carol"].send(c_dest, 3)
        got_d, got_c = self.assert_flows(rtp["carol"], c_dest, rtp["dave"], d_dest)
        say("carol <-> dave through sn1: %d to dave, %d to carol", got_d, got_c)
        c = self.sn_media()["calls"][0]
        self.assertEqual((c["path"], c["peer"]), ("local", None))
        sn_ports = range(PORTS["sn1"][0], PORTS["sn1"][1] + 1)
        for u in ("carol", "dave"):
            self.assertFalse([x for x in dead[u].sources if x[1] in sn_ports],
                             "sn1 sent media to the address %s's SDP named" % u)
        t = threading.Thread(target=lambda: ua["dave"].answer_in_dialog("BYE"))
        t.start()
        self.assertEqual(ua["carol"].bye().code, 200)
        t.join(20)
        wait_until("sn1 let the call go", lambda: self.sn_media()["active"] == 0, 5)

    def test_06_relay_capacity(self):
        """erin's node uses only relayed candidates (channel_force_relay): alice's call to her
        goes through sn2's TURN relay (status: relayed via sn2), audio both ways. sn2 lets an
        allocation carry 300 kbit/s (turn_bandwidth_kbps) and says so; at 200 kbit/s a call
        (media_call_kbps), a second call at the same time over that channel is refused with
        503 by alice's node, not set up to lose its packets at the relay. The relay sees only
        ciphertext: a capture of sn2's TURN and relayed ports holds none of the audio's bytes."""
        alice, erin = self.ua["alice"], self.ua["erin"]
        ra, re_ = sipua.RtpPeer(), sipua.RtpPeer()
        self.addCleanup(ra.close)
        self.addCleanup(re_.close)
        import threading
        t = threading.Thread(target=lambda: erin.answer(sipua.sdp_body("127.0.0.1", re_.addr[1])))
        t.start()
        final = alice.invite("erin@" + OVERLAY, sipua.sdp_body("127.0.0.1", ra.addr[1]))
        t.join(30)
        self.assertEqual(final.code, 200, final.first)
        first = dict(alice.dialog)
        a_port = sipua.sdp_media(final.body)[1][0][1]
        e_port = [c for c in self.media("erin")["calls"]][0]["streams"][0]["port"]
        # what sn2's relay carries (its TURN port and its relayed ports), captured meanwhile
        m = re.search(r"TURN on the STUN port (\d+)", self.sn["sn2"].log())
        self.assertTrue(m, "sn2 runs no TURN")
        pcap = os.path.join(self.tmp, "relay.pcap")
        ch = [c for c in self.status("alice")["channels"] if c["peer"] == self.node_id["erin"]]
        relay = re.match(r"127\.0\.0\.1:(\d+) \(relay\)", ch[0]["remote"]) if ch else None
        self.assertTrue(relay, "alice's channel to erin: %s" % ch)
        cap = phone.Capture(pcap, "lo", "udp port %s or udp port %s" % (m.group(1),
                                                                         relay.group(1)))
        harness.require(shutil.which("tcpdump"), "needs tcpdump")
        cap.start()
        self.addCleanup(cap.stop)
        secret = b"CLEARTEXT-AUDIO!" * 10
        ra.send(("127.0.0.1", a_port), 50, payload=secret)
        re_.send(("127.0.0.1", e_port), 50, payload=secret)
        got_e, got_a = self.assert_flows(ra, ("127.0.0.1", a_port), re_, ("127.0.0.1", e_port))
        time.sleep(0.3)
        cap.stop()
        relayed = [ip for _, ip in phone.read_pcap(pcap)]
        say("sn2's relay carried %d datagrams in the capture; none holds the audio's bytes",
            len(relayed))
        self.assertGreaterEqual(len(relayed), 2 * 150 * 0.9)
        self.assertEqual([ip for ip in relayed if b"CLEARTEXT-AUDIO" in ip], [],
                         "the relay saw the media in clear")
        self.assertTrue(any(r[2] == secret for r in re_.received_from(ra.ssrc)),
                        "the audio did not arrive whole")
        c = [c for c in self.media("alice")["calls"] if c["peer"] == self.node_id["erin"]][0]
        say("alice -> erin: %s, %s; %d to erin, %d to alice", c["path"], c["via"], got_e, got_a)
        self.assertEqual((c["path"], c["via"]), ("relayed",
                                                  "super node %s" % self.node_id["sn2"][:8]))
        refused0 = self.media("alice")["relay_refused"]
        r = alice.invite("erin@" + OVERLAY, sipua.sdp_body("127.0.0.1", ra.addr[1]))
        say("a second call over the same relay: %s", r.first)
        self.assertEqual(r.code, 503, r.first)
        self.assertIn("Relay Capacity", r.first)
        self.assertEqual(self.media("alice")["relay_refused"], refused0 + 1)
        t = threading.Thread(target=lambda: erin.answer_in_dialog("BYE"))
        t.start()
        self.assertEqual(alice.bye(dialog=first).code, 200)
        t.join(20)
        wait_until("no call left", lambda: self.media("alice")["active"] == 0, 5)

    def test_08_bad_media_settings(self):
        """Media settings a node cannot use stop it at start with a clear error (a copy of
        alice's state and configuration, so that her running node is not in the way)."""
        d = os.path.join(self.tmp, "alice-copy")
        shutil.copytree(os.path.join(self.tmp, "alice"), d,
                        ignore=shutil.ignore_patterns("*.sock", "*.pid"))
        with open(self.cfg["alice"]) as f:
            conf = json.load(f)
        conf.update({"state_dir": d, "sip_listen": "127.0.0.1:%d" % free_port()})
        conf.pop("metrics_listen", None)
        cfg = os.path.join(self.tmp, "alice-copy.json")
        with open(cfg, "w") as f:
            json.dump(conf, f)
        for override, words in (("media_ports=abc", "media_ports"),
                                ("media_ports=30000-30001", "media_ports"),
                                ("media_ports=100-2000", "media_ports"),
                                ("media_address=not-an-address", "media address"),
                                ("media_max_calls=0", "media_max_calls")):
            with self.subTest(override):
                p = subprocess.run([self.bin("ordinarynode"), "-d", "-c", cfg, "-o", override],
                                   capture_output=True, text=True, timeout=30)
                self.assertNotEqual(p.returncode, 0, p.stdout + p.stderr)
                self.assertIn(words, p.stdout + p.stderr)

    def test_07_metrics(self):
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                      timeout=5).read().decode()
        for line in ("p2p_media_calls 0", "p2p_media_refused_total 1",
                     "p2p_media_relay_refused_total 1"):
            self.assertIn(line, text)
        m = re.search(r'p2p_media_packets_total\{dir="from_phone"\} (\d+)', text)
        self.assertTrue(m and int(m.group(1)) >= 100, text)
        self.assertRegex(text, r'p2p_media_dropped_total\{why="not_the_phone"\} [1-9]')
        self.assertRegex(text, r'p2p_channel_media_frames_total\{dir="in"\} [1-9]')


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
