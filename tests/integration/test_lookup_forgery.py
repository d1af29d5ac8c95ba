#!/usr/bin/env python3
"""Call hijack by a rogue super node (issue 15, item 1), from the ordinary node's side.

mallory holds a valid account with the super node role and runs a super node of its own:
here a Python TLS 1.3 server speaking the overlay framing (docs/protocol.md 1) and the
ordinary-node messages (5: attach, keepalive, store, get) with mallory's real certificate.
alice's ordinary node attaches to it. Asked for bob's user location, it answers with
validly signed records that are not bob's:

1. mallory's own user location (right type, another name, another key): its contact is a
   UDP sink of this test;
2. a record of another type named bob@ (any owner may write it; another key);
3. a "user location" record named bob@ signed by mallory (right key: the access policy
   refuses it);
4. mallory's own record with its signed "key" rewritten to bob's, signed again (the key does
   not hash from its type and name).

Each time `ordinarynode get` (the records CLI) shows no record of bob's from mallory (nothing
at all for 1 and 2, only refused entries for 3 and 4), and alice's node logs the mismatch
with the key asked and the key found. A call from alice's phone (sipp) to bob is answered
404 and the UDP sink receives nothing. Then alice's node attaches to an honest super node:
the lookup finds bob's record and the call reaches bob's phone.

The same overlay then serves the rollback of item 13: bob stores a record with seq 5 and an
hour to live, then seq 6 with 3 s to live. Once 6 has expired, the signed seq 5 (still valid)
is replayed to the responsible super node with `dhtctl send`, and straight into every super
node's store as replication (`replicate`, over a link with mallory's super node
certificate): refused as stale each time, and a read finds nothing; bob's next record (a
higher seq) is stored as usual.

Run: python3 tests/integration/test_lookup_forgery.py --bindir <build dir>
"""

import base64
import hashlib
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
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "forgery.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20

free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [forgery] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def record_key(rtype, name):
    return hashlib.sha1((rtype + "|" + name).encode()).hexdigest()


def encode(msg):
    payload = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(payload)) + payload


class RogueSuperNode:
    """mallory's super node: accepts ordinary nodes (TLS 1.3, client certificates from the
    overlay CA), attaches them, accepts their stores, and answers every `get` for a key in
    `forged` with those envelopes instead of anything true."""

    def __init__(self, port, state_dir, node_id):
        self.addr = "127.0.0.1:%d" % port
        self.node_id = node_id
        self.forged = {}    # key hex -> [envelope]
        self.gets = []      # keys asked for, in order
        self.stores = 0
        self._lock = threading.Lock()
        self._stop = False
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(os.path.join(state_dir, "ca.pem"))
        self.ctx.load_cert_chain(os.path.join(state_dir, "cert.pem"),
                                 os.path.join(state_dir, "key.pem"))
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.lsock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while not self._stop:
            try:
                raw, peer = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw, peer), daemon=True).start()

    def _serve(self, raw, peer):
        try:
            raw.settimeout(10)
            s = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.conns.append(s)
        s.settimeout(0.2)
        buf = b""
        try:
            s.sendall(encode(self._frame("hello", "ind", "%016x" % random.getrandbits(64),
                                         {"agent": "rogue/0"})))
            while not self._stop:
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack(">I", buf[:4])[0]
                    if len(buf) < 4 + n:
                        break
                    m, buf = json.loads(buf[4:4 + n]), buf[4 + n:]
                    out = self._handle(m, peer)
                    if out is not None:
                        s.sendall(encode(out))
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    def _frame(self, type_, kind, tid, body):
        return {"v": 1, "overlay": OVERLAY, "type": type_, "kind": kind, "tid": tid, "body": body}

    def _handle(self, m, peer):
        if m.get("kind") != "req":
            return None
        t, tid, body = m.get("type"), m.get("tid"), m.get("body") or {}
        me = {"id": self.node_id, "addr": self.addr}
        if t == "attach":
            return self._frame(t, "res", tid, {"node": me, "keepalive_s": 15,
                                               "reflexive": "%s:%d" % peer, "alternates": []})
        if t == "keepalive":
            return self._frame(t, "res", tid, {})
        if t == "ping":
            return self._frame(t, "res", tid, {"node_id": self.node_id})
        if t == "store":
            with self._lock:
                self.stores += 1
            return self._frame(t, "res", tid, {"hops": 0, "node": me})
        if t == "get":
            key = body.get("key")
            with self._lock:
                self.gets.append(key)
                recs = list(self.forged.get(key, []))
            return self._frame(t, "res", tid, {"records": recs, "hops": 1, "node": me})
        return self._frame("error", "err", tid, {"code": "unknown-type", "reason": "rogue"})


class UdpSink:
    """A UDP socket that records every datagram: mallory's phone."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.got = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, src = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.got.append((src, data[:200]))

    def close(self):
        self._stop = True
        self.thread.join(5)
        self.sock.close()


class LookupForgery(harness.OverlayScenario, unittest.TestCase):
    daemons = []
    rogue = sink = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-forgery-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def node_conf(cls, u, conf):
        # alice attaches to mallory's super node only; bob (and mallory's own node) to sn1.
        if u in ("alice", "bob", "mallory"):
            conf["supernodes"] = [cls.rogue_addr if u == "alice" else cls.addr["sn1"]]

    @classmethod
    def _set_up(cls):
        cls.rogue_port = free_port()
        cls.rogue_addr = "127.0.0.1:%d" % cls.rogue_port
        # mallory's account keeps the super node role (every account does unless vetoed).
        cls.build_overlay(OVERLAY, ("sn1", "sn2"), ("alice", "bob", "mallory"),
                          no_supernode=("alice", "bob"), wait=WAIT)
        cls.sink = UdpSink()
        mdir = os.path.join(cls.tmp, "mallory")
        cls.rogue = RogueSuperNode(cls.rogue_port, mdir, cls.node_id["mallory"])
        for u in ("alice", "bob"):
            cls.on[u] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg[u]])
        for u in ("alice", "bob"):
            cls.on[u].wait_for("published user location", timeout=WAIT)
        cls.bob_key = record_key("user location", "bob@" + OVERLAY)

    @classmethod
    def tearDownClass(cls):
        cls.save_logs("test_lookup_forgery")
        problems = cls.stop_all()
        for x in (cls.rogue, cls.sink):
            if x:
                x.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    # ---- mallory's records ----

    def sign(self, rtype, name, value):
        """An envelope signed with mallory's real key (dhtctl sign, nothing sent)."""
        p = subprocess.run([os.path.join(BINDIR, "supernode", "dhtctl"), "--state",
                            os.path.join(self.tmp, "mallory"), "--json", "sign", "--type", rtype,
                            "--name", name, "--value", json.dumps(value)],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def resign(self, env, **changes):
        """env with its signed text changed and signed again with mallory's key (Python's
        cryptography: dhtctl would refuse to make such a record)."""
        from cryptography.hazmat.primitives import serialization
        with open(os.path.join(self.tmp, "mallory", "key.pem"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        so = json.loads(env["signed"])
        so.update(changes)
        text = json.dumps(so, separators=(",", ":"))
        return {"signed": text, "cert": env["cert"],
                "sig": base64.b64encode(key.sign(text.encode())).decode()}

    def mallory_location(self):
        """mallory's user location, shaped like a real one, whose contact is the sink."""
        return {"uri": "sip:mallory@" + OVERLAY, "node_id": self.node_id["mallory"],
                "contacts": [{"transport": "udp", "host": "127.0.0.1", "port": self.sink.port}],
                "bindings": [{"contact": "sip:mallory@127.0.0.1:%d" % self.sink.port,
                              "expires": 3600}]}

    def variants(self):
        own = self.sign("user location", "mallory@" + OVERLAY, self.mallory_location())
        return [
            ("mallory's own user location", [own], "not-asked"),
            ("another type named bob@", [self.sign("presence", "bob@" + OVERLAY,
                                                   self.mallory_location())], "not-asked"),
            ("bob's key signed by mallory", [self.sign("user location", "bob@" + OVERLAY,
                                                       self.mallory_location())], "forbidden"),
            ("mallory's record relabelled with bob's key",
             [self.resign(own, key=self.bob_key)], "bad-key"),
        ]

    # ---- helpers ----

    def get_bob(self, node="alice"):
        rc, out, err = self.cli(node, "get", "user location", "bob@" + OVERLAY, "--json")
        self.assertIn(rc, (0, 3), err)
        return rc, json.loads(out)["records"]

    def register(self, node, user, port):
        self.run_sipp("register_200", port, target=self.sip[node],
                      keys=(("user", user), ("domain", OVERLAY), ("expires", 600)), timeout=15)

    # ---- the attack ----

    def test_1_forged_answers_are_dropped(self):
        for what, envs, code in self.variants():
            self.rogue.forged = {self.bob_key: envs}
            before = len(self.on["alice"].log())
            rc, recs = self.get_bob()
            self.assertEqual(self.rogue.gets[-1], self.bob_key, "the lookup went to mallory")
            self.assertFalse([r for r in recs if r.get("verified")],
                             "%s: accepted as bob's: %r" % (what, recs))
            if code == "not-asked":
                # Not even shown: it is no answer to the question.
                self.assertEqual(recs, [], what)
                self.assertEqual(rc, 3, what)
                # the answer may reach the CLI before the daemon's log line reaches us
                def logged():
                    return next((l for l in self.on["alice"].log()[before:].splitlines()
                                 if "not asked for" in l), None)
                end = time.monotonic() + 5
                while not logged() and time.monotonic() < end:
                    time.sleep(0.05)
                log = self.on["alice"].log()[before:]
                line = logged()
                self.assertIsNotNone(line, "%s: no log line in:\n%s" % (what, log[-2000:]))
                found = json.loads(envs[0]["signed"])["key"]
                self.assertIn(self.bob_key, line)
                self.assertIn(found, line)
                say("%s: dropped; alice's node logged: %s", what, line.split("] ", 1)[-1][:300])
            else:
                self.assertEqual([r.get("code") for r in recs], [code], "%s: %r" % (what, recs))
                say("%s: refused (%s)", what, code)
        st = self.status("alice")
        self.assertGreaterEqual(st.get("lookup_mismatches", 0), 2, st)

    def test_2_call_does_not_reach_mallory(self):
        own = self.sign("user location", "mallory@" + OVERLAY, self.mallory_location())
        self.rogue.forged = {self.bob_key: [own]}
        alice_port = free_port()
        self.register("alice", "alice", alice_port)
        n_gets = len(self.rogue.gets)
        caller = None
        try:
            self.run_sipp("uac_404", alice_port, target=self.sip["alice"],
                          keys=(("callee", "bob"), ("domain", OVERLAY)), service="alice")
        except AssertionError as e:
            caller = e
        self.assertIn(self.bob_key, self.rogue.gets[n_gets:], "the call's lookup went to mallory")
        time.sleep(1.0)  # a forwarded INVITE would have arrived by now
        self.assertEqual(self.sink.got, [], "mallory's phone received the call")
        if caller:
            raise caller
        say("alice -> bob through mallory's super node: 404, mallory's sink got %d datagrams",
            len(self.sink.got))

    def test_3_honest_super_node_lookup_and_call_work(self):
        """alice moves to an honest super node: bob's record and bob's phone are found."""
        self.on["alice"].stop()
        # mallory's super node goes away (alice's host cache would try it first again).
        type(self).rogue.close()
        type(self).rogue = None
        with open(self.cfg["alice"]) as f:
            conf = json.load(f)
        conf["supernodes"] = [self.addr["sn1"]]
        with open(self.cfg["alice"], "w") as f:
            json.dump(conf, f)
        self.start_on("alice").wait_for("published user location", timeout=WAIT)
        alice_port, bob_port = free_port(), free_port()
        self.register("alice", "alice", alice_port)
        self.register("bob", "bob", bob_port)
        wait_until("bob's record with a binding",
                   lambda: any(r.get("verified") and r["value"].get("bindings")
                               for r in self.get_bob()[1]), WAIT)
        rc, recs = self.get_bob()
        self.assertEqual(rc, 0)
        self.assertEqual([(r["owner"], r["verified"]) for r in recs],
                         [("sip:bob@" + OVERLAY, True)])
        uas = self.start_sipp("uas_answer", bob_port)
        time.sleep(0.3)
        self.run_sipp("uac_call", alice_port, target=self.sip["alice"],
                      keys=(("callee", "bob"), ("domain", OVERLAY)), service="alice")
        self.finish_sipp(uas, "bob's phone")
        self.assertEqual(self.sink.got, [])
        say("through sn1: bob's own record found, the call alice -> bob answered by bob's phone")

    # ---- rollback (item 13) ----

    def dhtctl(self, user, *args, stdin=None):
        """dhtctl as `user` through sn1: (status, [JSON lines], stderr)."""
        argv = [os.path.join(BINDIR, "supernode", "dhtctl"), "--state",
                os.path.join(self.tmp, user)]
        if args[0] != "sign":
            argv += ["--sn", self.addr["sn1"]]
        p = subprocess.run(argv + ["--json"] + list(args), input=stdin, capture_output=True,
                           text=True, timeout=60)
        return p.returncode, [json.loads(l) for l in p.stdout.splitlines() if l.strip()], p.stderr

    def replicate_into(self, sn, envelopes):
        """A `replicate` request to super node sn over a link with mallory's super node
        certificate, as a ring member would send it: the answer's body."""
        mdir = os.path.join(self.tmp, "mallory")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(os.path.join(mdir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(mdir, "cert.pem"), os.path.join(mdir, "key.pem"))
        host, port = self.addr[sn].rsplit(":", 1)
        with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10)) as s:
            tid = "%016x" % random.getrandbits(64)
            s.sendall(encode({"v": 1, "overlay": OVERLAY, "type": "hello", "kind": "ind",
                              "tid": "%016x" % random.getrandbits(64),
                              "body": {"agent": "mallory"}}) +
                      encode({"v": 1, "overlay": OVERLAY, "type": "replicate", "kind": "req",
                              "tid": tid, "body": {"records": envelopes}}))
            buf, deadline = b"", time.monotonic() + 10
            while time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    m, buf = json.loads(buf[4:4 + n]), buf[4 + n:]
                    if m.get("tid") == tid:
                        return m.get("kind"), m.get("body") or {}
        self.fail("%s: no answer to replicate" % sn)

    def test_4_rollback_after_expiry_is_refused(self):
        name = "rollback-%d" % random.getrandbits(32)
        rc, [env5], err = self.dhtctl("bob", "sign", "--type", "note", "--name", name,
                                      "--value", '{"v": 5}', "--seq", "5", "--lifetime", "3600")
        self.assertEqual(rc, 0, err)
        rc, [r], err = self.dhtctl("bob", "send", "--mode", "add", stdin=json.dumps(env5) + "\n")
        self.assertTrue(r.get("ok"), r)
        rc, [r], err = self.dhtctl("bob", "put", "--type", "note", "--name", name, "--value",
                                   '{"v": 6}', "--seq", "6", "--lifetime", "3")
        self.assertEqual(rc, 0, err)
        rc, [g], err = self.dhtctl("bob", "get", "--type", "note", "--name", name)
        self.assertEqual([x["seq"] for x in g["records"]], ["6"], g)
        time.sleep(4.5)  # 6 has expired (and the next replication round purged it)
        rc, [g], err = self.dhtctl("bob", "get", "--type", "note", "--name", name)
        self.assertEqual(g["records"], [], g)

        # The replay, as a client's store: stale.
        for mode in ("add", "update"):
            rc, [r], err = self.dhtctl("bob", "send", "--mode", mode,
                                       stdin=json.dumps(env5) + "\n")
            self.assertIs(r.get("ok"), False, "replayed seq 5 (%s) was stored: %r" % (mode, r))
            self.assertEqual(r.get("code"), "stale", r)
            say("replay of seq 5 (%s) after seq 6 expired: %s: %s", mode, r["code"],
                r.get("reason"))
        # ... and as replication, straight into every super node's store.
        for sn in ("sn1", "sn2"):
            kind, body = self.replicate_into(sn, [env5])
            self.assertFalse(kind == "res" and body.get("stored"),
                             "%s stored the replayed record: %r" % (sn, body))
            say("replicate of seq 5 into %s: %s %s", sn, kind, json.dumps(body)[:200])
        rc, [g], err = self.dhtctl("bob", "get", "--type", "note", "--name", name)
        self.assertEqual(g["records"], [], "the old record came back: %r" % g)

        # bob's next record is welcome.
        rc, [r], err = self.dhtctl("bob", "put", "--type", "note", "--name", name, "--value",
                                   '{"v": 7}', "--mode", "add")
        self.assertEqual(rc, 0, err)
        rc, [g], err = self.dhtctl("bob", "get", "--type", "note", "--name", name)
        self.assertEqual([(x["value"], x["verified"]) for x in g["records"]], [({"v": 7}, True)])


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
