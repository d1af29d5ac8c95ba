#!/usr/bin/env python3
"""Revocation (issue 15, item 6): a removed device or a deleted account is refused by every
node within a bounded time, performed against real daemons.

An overlay of a login server, a bootstrap server and three super nodes; ordinary nodes of
alice and bob (honest) and mallory (the adversary, with the super node role like any default
account), and eve's enrolled credentials. Every node fetches the CA's revocation list
(docs/protocol.md 2.6) at least every 2 s here (cert_check_interval_s=2). Before the operator
acts, mallory's node is attached, her record reads as verified, and she holds a link of her
own (a rogue super node built with overlaypeer.py) to every super node. Then the operator
removes mallory's device (`loginserver user forget`) and deletes eve's account
(`loginserver user del`), and the test asserts that within the bound:

- every super node closes mallory's open link ("certificate-revoked" error frame, a log
  line naming her and saying revoked), her own node loses its super node;
- a new link with her certificate, or eve's, is refused at every super node (TLS alert
  certificate_revoked, log line naming the peer and "revoked");
- a record mallory signed earlier no longer verifies for alice (bad-certificate, revoked);
- a node that dials a listener presenting mallory's certificate refuses it (the other
  direction of the handshake), also right after a restart (the list kept in crl.pem);
- a bootstrap server that fetches the list (login_urls) stops listing mallory's rogue super
  node: her announces are refused;
- alice and bob keep attaching, storing and looking up.

Run: python3 tests/integration/test_revocation.py --bindir <build dir>
When a test fails, every daemon's log is written to <bindir>/test_revocation-logs/.
"""

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import overlaypeer  # noqa: E402

BINDIR = None
OVERLAY = "rev.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
FETCH_S = 2        # every node's longest interval between two fetches of the list
BOUND_S = 15       # what the test allows from the operator's command to every refusal
SNS = ("sn1", "sn2", "sn3")

wait_until = harness.wait_until


def note(fmt, *args):
    print("  [revocation] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


class Revocation(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def node_conf(cls, u, conf):
        conf["cert_check_interval_s"] = FETCH_S

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-rev-")
        cls.links = []
        try:
            cls.build_overlay(OVERLAY, SNS, ("alice", "bob", "mallory", "eve"),
                              no_supernode=("alice", "bob"), wait=WAIT)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for l in cls.links:
            l.close()
        problems = cls.stop_all()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def run(self, result=None):
        r = super().run(result)
        if r and (r.failures or r.errors):
            self.save_logs("test_revocation")
        return r

    def ls(self, *args):
        p = subprocess.run([self.bin("loginserver"), "-c", os.path.join(self.tmp, "ls.json")] +
                           list(args), capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout, p.stderr

    def lookup(self, u, type_, name):
        rc, out, err = self.cli(u, "get", type_, name, "--json")
        self.assertEqual(rc, 0, out + err)
        return json.loads(out)["records"]

    def new_link(self, u, sn):
        return overlaypeer.Link(self.addr[sn], os.path.join(self.tmp, u), OVERLAY, timeout=10)

    def refused(self, u, sn):
        """Tries a new link to `sn` with u's certificate; the reason it failed, or None."""
        try:
            l = self.new_link(u, sn)
        except (overlaypeer.Closed, ssl.SSLError, OSError) as e:
            return repr(e)
        l.close()
        return None

    def announce(self, port, u, address):
        """POST /v1/announce to the bootstrap server at port with u's client certificate:
        (status, answer) or (None, why) when the TLS handshake itself refused us."""
        d = os.path.join(self.tmp, u)
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = False
        ctx.load_cert_chain(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        body = json.dumps({"node_id": self.node_id[u], "address": address, "attached": 0,
                           "capacity": 100, "uptime_s": 1})
        try:
            c.request("POST", "/v1/announce", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            text = r.read().decode()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text
        except (ssl.SSLError, OSError, http.client.HTTPException) as e:
            return None, repr(e)
        finally:
            c.close()

    def test_revoked_device_and_account(self):
        mallory_uri = "sip:mallory@" + OVERLAY
        for u in ("alice", "bob", "mallory"):
            self.start_on(u).wait_for("published user location|%s@" % u, timeout=WAIT)
        # Every super node and node took the login server's (empty) list.
        for d in list(self.sn.values()) + list(self.on.values()):
            d.wait_for("revocation list from https://127.0.0.1", timeout=WAIT)

        # Before: mallory's record verifies for alice, her links work everywhere.
        rc, out, err = self.cli("mallory", "add", "note", "mallory-note", '"hello"',
                                "--lifetime", "600")
        self.assertEqual(rc, 0, err)
        [rec] = self.lookup("alice", "note", "mallory-note")
        self.assertTrue(rec["verified"], rec)
        self.assertEqual(rec["owner"], mallory_uri)
        mlinks = {}
        for sn in SNS:
            l = self.new_link("mallory", sn)
            self.links.append(l)
            ans = l.request("ping", {})
            self.assertEqual(ans and ans.get("kind"), "res", ans)
            mlinks[sn] = l
        self.assertIsNone(self.refused("eve", SNS[0]))
        with open(os.path.join(self.tmp, "mallory", "device")) as f:
            device = f.read().strip()
        # A bootstrap server that fetches the list; mallory's rogue super node gets listed.
        bs2_port = harness.free_port()
        bs2 = self.start([self.bin("bootstrap"), "-d", "-o", "overlay=" + OVERLAY,
                          "-o", "listen=127.0.0.1:%d" % bs2_port,
                          "-o", "state_dir=" + os.path.join(self.tmp, "bs2"),
                          "-o", "ca_file=" + self.ca,
                          "-o", "cert_file=" + os.path.join(self.svc, "127.0.0.1.pem"),
                          "-o", "key_file=" + os.path.join(self.svc, "127.0.0.1.key"),
                          "-o", "announce_period_s=1",
                          "-o", "login_urls=https://127.0.0.1:%d" % self.ls_port,
                          "-o", "crl_check_interval_s=%d" % FETCH_S])
        bs2.wait_for("serving on")
        bs2.wait_for("revocation list from https://127.0.0.1", timeout=WAIT)
        mrogue = overlaypeer.Listener(os.path.join(self.tmp, "mallory"), OVERLAY)
        self.addCleanup(mrogue.close)

        def announced_state():
            st, js = self.announce(bs2_port, "mallory", mrogue.addr)
            return js.get("state") if st == 200 and isinstance(js, dict) else None
        wait_until("mallory's rogue super node listed", lambda: announced_state() == "listed",
                   WAIT)
        marks = {sn: len(self.sn[sn].lines) for sn in SNS}

        # The operator removes mallory's device and deletes eve's account.
        t0 = time.monotonic()
        rc, _, err = self.ls("user", "forget", "mallory", device)
        self.assertEqual(rc, 0, err)
        rc, _, err = self.ls("user", "del", "eve")
        self.assertEqual(rc, 0, err)

        # Her open links are closed by every super node, with the reason.
        for sn, l in mlinks.items():
            self.assertTrue(l.wait_closed(BOUND_S), "%s kept mallory's link open" % sn)
            errs = [f for f in l.frames if f.get("kind") == "err"]
            self.assertTrue(errs and errs[-1]["body"]["code"] == "certificate-revoked",
                            "%s: %r" % (sn, l.frames[-3:]))
        closed_s = time.monotonic() - t0
        for sn in SNS:
            line = self.sn[sn].wait_for("is revoked; link closed", timeout=5)
            self.assertIn(mallory_uri, line)
            taken = self.sn[sn].wait_for("2 revoked certificates", timeout=5)
        note("mallory's open links to %d super nodes closed %.1f s after 'user forget'",
             len(SNS), closed_s)
        note("%s: %s", SNS[0], line.split("] ", 1)[-1])
        note("%s: %s", SNS[0], taken.split("] ", 1)[-1])

        # New links with her certificate, or eve's, are refused at every handshake.
        for sn in SNS:
            for u in ("mallory", "eve"):
                why = self.refused(u, sn)
                self.assertIsNotNone(why, "%s accepted %s's certificate" % (sn, u))
                self.assertIn("REVOKED", why.upper(), why)

        def refusals(sn, u):
            # A refusal is logged when the connection is done with (the peer hung up).
            return [l for l in self.sn[sn].lines[marks[sn]:]
                    if "peer certificate refused: sip:%s@" % u in l and
                    l.endswith("is revoked")]
        for sn in SNS:
            for u in ("mallory", "eve"):
                wait_until("%s logs the refusal of %s" % (sn, u), lambda: refusals(sn, u), 5)
        note("a new link: %s", why)
        note("%s: %s", SNS[-1], refusals(SNS[-1], "eve")[-1].split("] ", 1)[-1])
        # Her own node lost its super node and cannot attach anywhere.
        self.on["mallory"].wait_for("revoked", timeout=BOUND_S)
        st = self.status("mallory")
        self.assertNotEqual(st and st.get("state"), "attached", st)

        # Her earlier record no longer verifies for readers.
        self.on["alice"].wait_for("2 revoked certificates", timeout=BOUND_S)
        [rec] = self.lookup("alice", "note", "mallory-note")
        self.assertFalse(rec["verified"], rec)
        self.assertEqual(rec["code"], "bad-certificate")
        self.assertIn("revoked", rec["error"])
        note("alice reading mallory's record: %s: %s", rec["code"], rec["error"])
        note("every refusal in place %.1f s after 'user forget' (bound %d s)",
             time.monotonic() - t0, BOUND_S)

        # The bootstrap server took the list too: mallory's announces are refused now (at
        # the HTTPS handshake or by the server's check of her certificate), and she drops out
        # of the list.
        bs2.wait_for("2 revoked certificates", timeout=BOUND_S)
        st, js = self.announce(bs2_port, "mallory", mrogue.addr)
        self.assertNotEqual(st, 200, js)
        note("mallory announcing to a bootstrap server with the list: %s %s", st, js)

        # Honest users: storing and looking up still work.
        rc, out, err = self.cli("alice", "add", "note", "alice-note", '{"text": "hi"}',
                                "--lifetime", "600")
        self.assertEqual(rc, 0, err)
        [rec] = self.lookup("bob", "note", "alice-note")
        self.assertTrue(rec["verified"], rec)
        self.assertEqual(rec["value"], {"text": "hi"})
        [rec] = self.lookup("bob", "user location", "alice@" + OVERLAY)
        self.assertTrue(rec["verified"], rec)

        # The other direction, after a restart: bob dials a listener with mallory's
        # certificate first; the list kept in his state directory refuses it at once, and he
        # attaches to a real super node.
        rogue = overlaypeer.Listener(os.path.join(self.tmp, "mallory"), OVERLAY)
        self.addCleanup(rogue.close)
        d = self.on.pop("bob")
        self.assertEqual(d.stop(signal.SIGTERM), 0)
        self.daemons.remove(d)
        os.unlink(os.path.join(self.tmp, "bob", "supernodes.json"))  # dial the configured one
        b = self.start_on("bob", "supernodes=" + rogue.addr)
        loaded = b.wait_for("revocation list loaded from", timeout=WAIT)
        self.assertIn("2 revoked certificates", loaded)
        line = b.wait_for("is revoked", timeout=WAIT)
        self.assertIn(mallory_uri, line)
        self.assertIn(rogue.addr, line)
        b.wait_for("attached to super node", timeout=WAIT)
        # The TLS handshake completed at mallory's end (TLS 1.3: the server is done before the
        # client judges its certificate), but bob said nothing: an alert instead of his hello.
        self.assertGreaterEqual(rogue.connections, 1)
        for l in rogue.links:
            self.assertTrue(l.wait_closed(5))
            self.assertEqual(l.frames, [])
            self.assertIn("CERTIFICATE_REVOKED", l.closed_reason)
        note("mallory's listener: %s", rogue.links and rogue.links[0].closed_reason)
        note("bob after a restart: %s", loaded.split("] ", 1)[-1])
        note("bob dialing mallory's listener: %s", line.split("] ", 1)[-1])
        b.wait_for("published user location|bob@", timeout=WAIT)
        [rec] = self.lookup("alice", "user location", "bob@" + OVERLAY)
        self.assertTrue(rec["verified"], rec)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
