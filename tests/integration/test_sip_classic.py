#!/usr/bin/env python3
"""Classical phones at a super node's public SIP front end (issue 8, scenario (b) of seed 004's
Table 1): sn1 is the P2P registrar and proxy of the SIP domain pbx.test, as the overlay
document's sip_proxies says. A classical sipp phone registers there with HTTP Digest
authentication; the registration becomes carol@pbx.test's user location record, signed by sn1;
a phone at an ordinary node calls it, and it calls a user of the overlay. Wrong passwords,
unknown users, other domains and a super node the document does not name are refused."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import struct
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "classic-test.p2psip"
PBX = "pbx.test"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
PASSWORDS = {"carol": "carol-secret", "dave": "dave-secret"}

free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [sip-classic] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class TinyDNS:
    """A DNS server on 127.0.0.1 for the RFC 3263 test, answering from `srv` ({name: (port,
    target)}) and `a` ({name: "a.b.c.d"}); everything else NXDOMAIN."""

    def __init__(self):
        self.srv, self.a, self.asked = {}, {}, []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", harness.free_udp_port()))
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _name(data, off):
        labels = []
        while data[off]:
            n = data[off]
            labels.append(data[off + 1:off + 1 + n].decode())
            off += 1 + n
        return ".".join(labels), off + 1

    @staticmethod
    def _enc(name):
        return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return
            qid = data[:2]
            name, off = self._name(data, 12)
            qtype = struct.unpack("!H", data[off:off + 2])[0]
            question = data[12:off + 4]
            self.asked.append((name, qtype))
            ans, add = [], []
            if qtype == 33 and name in self.srv:  # SRV, with the target's A as additional
                port, target = self.srv[name]
                rd = struct.pack("!HHH", 10, 5, port) + self._enc(target)
                ans.append(self._enc(name) + struct.pack("!HHIH", 33, 1, 60, len(rd)) + rd)
                if target in self.a:
                    add.append(self._enc(target) + struct.pack("!HHIH", 1, 1, 60, 4) +
                               socket.inet_aton(self.a[target]))
            elif qtype == 1 and name in self.a:
                ans.append(self._enc(name) + struct.pack("!HHIH", 1, 1, 60, 4) +
                           socket.inet_aton(self.a[name]))
            rcode = 0 if ans or name in self.a else 3
            hdr = qid + struct.pack("!HHHHH", 0x8180 | rcode, 1, len(ans), 0, len(add))
            self.sock.sendto(hdr + question + b"".join(ans) + b"".join(add), peer)

    def close(self):
        self.sock.close()


class ClassicalPhones(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-sipc-")
        try:
            cls.users_file = os.path.join(cls.tmp, "pbx-users")
            with open(cls.users_file, "w") as f:
                f.write("# user:HA1 (MD5 of user:%s:password)\n" % PBX)
                for u, pw in PASSWORDS.items():
                    f.write("%s:%s\n" % (u, hashlib.md5(("%s:%s:%s" % (u, PBX, pw)).encode())
                                         .hexdigest()))
            cls.sn_sip = {}
            cls.dns = TinyDNS()
            cls.build_overlay(OVERLAY, ("sn1", "sn2"), ("alice", "bob"), wait=WAIT,
                              ls_extra={"sip_proxies": [PBX + "=sn1"]})
            for u in ("alice", "bob"):
                cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
            for u in ("alice", "bob"):
                cls.on[u].wait_for("published user location", timeout=WAIT)
            cls.sn["sn1"].wait_for("P2P registrar and proxy of %s" % PBX, timeout=WAIT)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def node_conf(cls, u, conf):
        if u in ("sn1", "sn2"):  # sn2 runs a front end for the domain too, unnamed in the document
            cls.sn_sip[u] = "127.0.0.1:%d" % free_port()
            conf.update({"sip_listen": cls.sn_sip[u], "sip_domain": PBX,
                         "sip_users": cls.users_file})
        else:
            conf["supernodes"] = [cls.addr["sn1"] if u == "alice" else cls.addr["sn2"]]
            if u == "alice":  # other domains through DNS (RFC 3263)
                conf.update({"sip_dns": True, "sip_dns_server": cls.dns.addr})

    @classmethod
    def tearDownClass(cls):
        cls.save_logs("test_sip_classic")
        problems = cls.stop_all()
        if getattr(cls, "dns", None):
            cls.dns.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    # ---- helpers ----

    def sn_status(self, u):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg[u], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def classic_register(self, user, port, password=None, sn="sn1", expect=200, expires=600):
        return self.run_sipp("register_auth_%d" % expect, port, target=self.sn_sip[sn],
                             keys=(("user", user), ("domain", PBX), ("expires", expires)),
                             extra=("-au", user, "-ap", password or PASSWORDS.get(user, "x"),
                                    # the digest uri is the Request-URI (sipp's default is the
                                    # address it sends to, which the front end refuses)
                                    "-auth_uri", PBX))

    def call(self, caller, caller_port, via, callee, domain, uas_port=None, uac="uac_call",
             uas="uas_answer", keys=(), extra=()):
        if caller in ("alice", "bob") and uac in ("uac_call", "uac_404"):
            # From the caller's own domain: a From in the served domain claims one of its users,
            # and the front end asks for that user's credentials.
            uac += "_from"
            keys = (("from_domain", OVERLAY),) + tuple(keys)
        uas_p = self.start_sipp(uas, uas_port) if uas else None
        time.sleep(0.3)  # the UAS is listening
        uac_p = self.start_sipp(uac, caller_port, target=via,
                                keys=(("callee", callee), ("domain", domain)) + tuple(keys),
                                service=caller, extra=extra)
        out = self.finish_sipp(uac_p, "the caller (%s)" % uac)
        if uas_p:
            self.finish_sipp(uas_p, "the callee (%s)" % uas)
        return out

    @classmethod
    def ports(cls):
        if not hasattr(cls, "carol_port"):
            cls.carol_port, cls.alice_port, cls.bob_port = free_port(), free_port(), free_port()

    # ---- the scenarios ----

    def test_01_sip_user_prints_the_users_file_line(self):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn1"], "sip-user", "carol"],
                           input=PASSWORDS["carol"] + "\n", capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(self.users_file) as f:
            self.assertIn(p.stdout.strip(), f.read().split("\n"))

    def test_02_classical_phone_registers_with_digest(self):
        """REGISTER, 401 with a challenge, REGISTER with credentials, 200; the binding is
        carol@pbx.test's user location record, signed by sn1, which alice's node finds and
        verifies."""
        self.ports()
        self.classic_register("carol", self.carol_port)
        st = self.sn_status("sn1")["sip"]
        say("sn1's front end: %d registered, counters %s", st["registered"], st["counters"])
        self.assertEqual(st["registered"], 1)
        self.assertGreaterEqual(st["counters"]["challenged"], 1)
        rc, out, err = self.cli("alice", "get", "--json", "user location", "carol@" + PBX)
        self.assertEqual(rc, 0, err)
        recs = json.loads(out)["records"]
        self.assertTrue(recs and recs[0]["verified"], out)
        self.assertEqual(recs[0]["owner"], "sip:sn1@" + OVERLAY)
        binding = recs[0]["value"]["bindings"][0]["contact"]
        self.assertIn(":%d" % self.carol_port, binding)
        say("carol@%s's location, signed by %s, names the phone %s and the front end %s", PBX,
            recs[0]["owner"], binding, self.sn_sip["sn1"])

    def test_03_bad_credentials_get_403(self):
        port = free_port()
        self.classic_register("carol", port, password="wrong", expect=403)
        self.sn["sn1"].wait_for("REGISTER for carol@%s refused: wrong password" % PBX)
        self.classic_register("mallory", port, password="guess", expect=403)
        self.sn["sn1"].wait_for("REGISTER for mallory@%s refused: no such user" % PBX)
        # Another domain: refused before any challenge.
        self.run_sipp("register_403", port, target=self.sn_sip["sn1"],
                      keys=(("user", "carol"), ("domain", "elsewhere.test"), ("expires", 600)))
        # dave's password for carol: credentials of another user.
        self.classic_register("carol", port, password=PASSWORDS["dave"], expect=403)
        st = self.sn_status("sn1")["sip"]["counters"]
        self.assertGreaterEqual(st["auth_failed"], 3)
        self.assertEqual(self.sn_status("sn1")["sip"]["registered"], 1)  # carol's stays

    def test_04_on_phone_calls_classical_phone(self):
        """alice's phone, at her ordinary node, calls sip:carol@pbx.test: her node finds
        carol's record and sends the call to sn1's front end, which rings carol's phone. The
        record says the front end takes channels (issue 17): the call goes on one, to the
        front end's own client (sn1's Node-ID)."""
        self.ports()
        self.classic_register("carol", self.carol_port)
        self.run_sipp("register_200", self.alice_port, target=self.sip["alice"],
                      keys=(("user", "alice"), ("domain", OVERLAY), ("expires", 600)))
        t0 = time.monotonic()
        self.call("alice", self.alice_port, self.sip["alice"], "carol", PBX,
                  uas_port=self.carol_port)
        say("call alice (ordinary node) -> carol (classical phone at sn1) in %.2f s",
            time.monotonic() - t0)
        self.on["alice"].wait_for("INVITE for carol@%s: found in the overlay, forwarded to its "
                                  "node at node %s (channel)" % (PBX, self.node_id["sn1"][:8]))
        self.assertGreaterEqual(self.sn_status("sn1")["sip"]["proxy"]["forwarded"], 3)

    def test_05_classical_phone_calls_overlay_user(self):
        """carol's phone calls sip:bob@<overlay> through sn1, its outbound proxy: the call
        leaves the domain, so sn1 asks for carol's credentials (407) first; the ACK and the BYE
        of the dialog pass without. sn1's front end reaches bob's node on a channel (issue
        16): bob's SIP port is on loopback, for his phones only."""
        self.ports()
        self.classic_register("carol", self.carol_port)
        self.run_sipp("register_200", self.bob_port, target=self.sip["bob"],
                      keys=(("user", "bob"), ("domain", OVERLAY), ("expires", 600)))
        self.call("carol", self.carol_port, self.sn_sip["sn1"], "bob", OVERLAY,
                  uas_port=self.bob_port, uac="uac_call_auth", keys=(("from_domain", PBX),),
                  extra=("-au", "carol", "-ap", PASSWORDS["carol"],
                         "-auth_uri", "bob@" + OVERLAY))
        self.sn["sn1"].wait_for("INVITE for bob@%s: found in the overlay" % OVERLAY)
        chans = self.sn_status("sn1")["sip_channels"]["channels"]
        say("sn1's front end: channels %s", chans)
        self.assertIn((self.node_id["bob"], "open"), [(c["peer"], c["state"]) for c in chans])

    def test_06_unregistered_classical_user_404(self):
        """dave has an account but no phone registered: alice's call is looked up, sent to the
        domain's proxy (its proxy location record), which answers 404."""
        self.ports()
        self.call("alice", self.alice_port, self.sip["alice"], "dave", PBX, uac="uac_404",
                  uas=None)
        self.on["alice"].wait_for("forwarded to the domain's proxy at node %s (channel)"
                                  % self.node_id["sn1"][:8])
        # A domain with no proxy at all: 404 at alice's node.
        self.call("alice", self.alice_port, self.sip["alice"], "x", "nowhere.test",
                  uac="uac_404", uas=None)

    def test_06b_other_domain_through_dns(self):
        """far.test is unknown to the overlay (no user, no proxy location): alice's node asks
        DNS (RFC 3263): the SRV record _sip._udp.far.test names a server, where a phone
        answers; near.test has no SRV record: its A record and the URI's port."""
        self.ports()
        uas = free_port()
        self.dns.srv["_sip._udp.far.test"] = (uas, "sip1.far.test")
        self.dns.a["sip1.far.test"] = "127.0.0.1"
        self.call("alice", self.alice_port, self.sip["alice"], "dan", "far.test", uas_port=uas)
        self.on["alice"].wait_for("INVITE for dan@far.test: not in the overlay; DNS names "
                                  "127.0.0.1:%d" % uas)
        self.assertIn(("_sip._udp.far.test", 33), self.dns.asked)
        # near.test: no SRV record asked for, since the URI has a port: the A record.
        uas2 = free_port()
        self.dns.a["near.test"] = "127.0.0.1"
        self.call("alice", self.alice_port, self.sip["alice"], "erin", "near.test:%d" % uas2,
                  uas_port=uas2)
        self.assertIn(("near.test", 1), self.dns.asked)
        self.assertNotIn(("_sip._udp.near.test", 33), self.dns.asked)
        # A domain DNS does not know: 404.
        self.call("alice", self.alice_port, self.sip["alice"], "x", "nowhere.test",
                  uac="uac_404", uas=None)
        self.assertIn(("nowhere.test", 1), self.dns.asked)  # SRV, then A, both NXDOMAIN

    def test_07_unnamed_super_node_cannot_register(self):
        """sn2 runs a front end for pbx.test too, but the document does not name it: the ring
        refuses its records, so the phone hears 503 and nothing is stored."""
        self.classic_register("dave", free_port(), sn="sn2", expect=503)
        self.sn["sn2"].wait_for("storing proxy location|%s failed: forbidden" % PBX)
        self.sn["sn2"].wait_for("registration of dave@%s not stored in the overlay: forbidden"
                                % PBX)
        # An ordinary user cannot write a classical user's location either.
        rc, out, err = self.cli("alice", "update", "user location", "dave@" + PBX,
                                '{"contacts": []}')
        self.assertNotEqual(rc, 0)
        self.assertIn("forbidden", out + err)
        rc, out, _ = self.cli("bob", "get", "--json", "user location", "dave@" + PBX)
        self.assertEqual(json.loads(out)["records"], [])

    def test_08_garbage_then_still_serving(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host, port = self.sn_sip["sn1"].rsplit(":", 1)
        for junk in (b"\x00\xff garbage", b"REGISTER sip:x SIP/2.0\r\n\r\n", b"A" * 70000):
            try:
                s.sendto(junk, (host, int(port)))
            except OSError:
                pass  # the oversize datagram may be refused by the kernel itself
        s.close()
        self.ports()
        self.classic_register("carol", self.carol_port)

    def test_09_unregister_then_404(self):
        self.ports()
        self.classic_register("carol", self.carol_port)
        self.classic_register("carol", self.carol_port, expires=0)
        wait_until("carol's record removed", lambda: json.loads(
            self.cli("alice", "get", "--json", "user location", "carol@" + PBX)[1])["records"]
            == [], WAIT)
        self.call("alice", self.alice_port, self.sip["alice"], "carol", PBX, uac="uac_404",
                  uas=None)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
