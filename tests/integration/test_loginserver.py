#!/usr/bin/env python3
"""The login server as operators and nodes meet it (docs/protocol.md section 2):
init, accounts, enrollment and renewal over real HTTPS, checked with GnuTLS's
certtool; and every kind of bad request, none of which may change what is
stored."""

import http.client
import json
import os
import re
import shutil
import signal
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
OVERLAY = "it.p2psip"
# The failure window of the rate limit: short, but long enough for five slow attempts
# when the server runs under valgrind.
WINDOW = 30 if harness.WRAPPER else 3
OID_NODE_ID = "1.3.6.1.4.1.32473.2026.1"


def tamper(pem):
    """Changes one base64 character inside the PEM body (certtool puts a text dump before it)."""
    start = pem.index("-----BEGIN")
    lines = pem[start:].splitlines()
    mid = lines[2]
    lines[2] = ("B" if mid[10] != "B" else "C").join([mid[:10], mid[11:]])
    return pem[:start] + "\n".join(lines) + "\n"


def certtool(*args, stdin=None):
    p = subprocess.run(["certtool"] + list(args), input=stdin, capture_output=True, text=True,
                       timeout=30)
    return p.returncode, p.stdout + p.stderr


class LoginServer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-ls-")
        cls.state = os.path.join(cls.tmp, "state")
        cls.cfg = os.path.join(cls.tmp, "ls.json")
        # A fixed port (free now), so that the document's login URL is one nodes can use.
        cls.fixed_port = harness.free_port()
        with open(cls.cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % cls.fixed_port,
                       "state_dir": cls.state,
                       # Under valgrind every hash costs ~50x: fewer rounds, same code paths.
                       "pbkdf2_iterations": 2000 if harness.WRAPPER else 20000,
                       "max_failures": 5, "failure_window_s": WINDOW,
                       # Many tests enroll the same accounts here: room for all of them (the
                       # bounds themselves are test_identity.py's).
                       "max_devices": 100, "max_certs_per_user": 1000,
                       "bootstrap_urls": ["https://127.0.0.1:8443"]}, f)
        rc, out, err = cls.ls("init")
        assert rc == 0, err
        cls.pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        for user, extra in (("alice", []), ("bob", ["--no-supernode"]), ("carol", [])):
            rc, _, err = cls.ls("user", "add", user, *extra, stdin=user + "-password\n")
            assert rc == 0, err
        cls.daemon = None
        cls.start()

    @classmethod
    def tearDownClass(cls):
        if cls.daemon:
            cls.daemon.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def ls(cls, *args, stdin=None):
        p = subprocess.run(harness.WRAPPER + [os.path.join(BINDIR, "loginserver", "loginserver"),
                                              "-c", cls.cfg] + list(args),
                           input=stdin, capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    @classmethod
    def start(cls):
        cls.daemon = harness.Daemon([os.path.join(BINDIR, "loginserver", "loginserver"), "-d",
                                     "-c", cls.cfg])
        line = cls.daemon.wait_for("serving on")
        cls.port = int(re.search(r"port (\d+)", line).group(1))

    # ---- helpers -----------------------------------------------------------------------

    def ctx(self, cert=None, key=None, verify=True):
        c = ssl.create_default_context(cafile=os.path.join(self.state, "ca.pem"))
        if not verify:
            c = ssl._create_unverified_context()
        if cert:
            c.load_cert_chain(cert, key)
        return c

    # The client's source address: tests that spend failed logins use one of their own
    # (127.0.0.x), so that the server's per-address failure window does not reach other tests.
    src = None

    def request(self, method, path, body=None, ctx=None, raw=None, headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx or self.ctx(),
                                           timeout=30,
                                           source_address=(self.src, 0) if self.src else None)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            js = json.loads(text)
        except ValueError:
            js = None
        return resp.status, js, resp

    def csr(self, name, template="cn = \"x\"\n"):
        key = os.path.join(self.tmp, name + ".key")
        if not os.path.exists(key):
            rc, out = certtool("--generate-privkey", "--key-type", "ed25519", "--outfile", key)
            self.assertEqual(rc, 0, out)
        tmpl = os.path.join(self.tmp, name + ".tmpl")
        with open(tmpl, "w") as f:
            f.write(template)
        csr = os.path.join(self.tmp, name + ".csr")
        rc, out = certtool("--generate-request", "--load-privkey", key, "--template", tmpl,
                           "--outfile", csr)
        self.assertEqual(rc, 0, out)
        with open(csr) as f:
            return f.read(), key

    def enroll(self, user, password, name):
        csr, key = self.csr(name)
        st, js, resp = self.request("POST", "/v1/enroll", {"user": user, "password": password,
                                                           "csr": csr})
        return st, js, key, resp

    def save(self, name, pem):
        path = os.path.join(self.tmp, name + ".pem")
        with open(path, "w") as f:
            f.write(pem)
        return path

    def cert_info(self, path):
        rc, out = certtool("-i", "--infile", path)
        self.assertEqual(rc, 0, out)
        return out

    def stored_state(self):
        rc, out, err = self.ls("user", "list")
        self.assertEqual(rc, 0, err)
        return out

    # ---- the good paths ------------------------------------------------------------------

    def test_overlay_document(self):
        st, js, resp = self.request("GET", "/v1/overlay", ctx=self.ctx(verify=False))
        self.assertEqual(st, 200)
        doc = json.loads(js["document"])
        self.assertEqual(doc["overlay"], OVERLAY)
        self.assertEqual(doc["sequence"], 1)
        self.assertEqual(doc["bootstrap_urls"], ["https://127.0.0.1:8443"])
        self.assertEqual(doc["replication_factor"], 3)
        # The pin printed by init is the SHA-256 of the CA certificate in the document.
        ca = self.save("doc-ca", doc["ca_cert"])
        rc, out = certtool("--fingerprint", "--hash", "sha256", "--infile", ca)
        self.assertEqual(rc, 0, out)
        self.assertEqual("sha256:" + out.strip().splitlines()[-1].strip().lower(), self.pin)

    def test_enroll_and_check_certificate(self):
        st, js, _, _ = self.enroll("alice", "alice-password", "alice1")
        self.assertEqual(st, 200, js)
        self.assertEqual(js["uri"], "sip:alice@" + OVERLAY)
        self.assertRegex(js["node_id"], r"^[0-9a-f]{40}$")
        self.assertEqual(js["roles"], ["node", "supernode"])
        path = self.save("alice1", js["certificate"])
        rc, out = certtool("--verify", "--load-ca-certificate",
                           os.path.join(self.state, "ca.pem"), "--infile", path)
        self.assertEqual(rc, 0, out)
        self.assertIn("Verified", out)
        info = self.cert_info(path)
        self.assertIn("URI: sip:alice@" + OVERLAY, info)
        # The subject is the URI, never a bare user name a TLS client could take for a host.
        self.assertIn("Subject: CN=sip:alice@" + OVERLAY, info)
        self.assertNotIn("DNSname", info)
        self.assertRegex(js["device"], r"^key-[0-9a-f]{32}$")  # no "device" sent: by its key
        self.assertIn("TLS WWW Server", info)
        self.assertIn("TLS WWW Client", info)
        self.assertIn(OID_NODE_ID, info)
        self.assertIn(js["node_id"], info.replace(":", ""))  # the extension's hex dump
        nb = re.search(r"Not Before: (.*)", info).group(1)
        na = re.search(r"Not After: (.*)", info).group(1)
        t_nb = time.mktime(time.strptime(nb.strip(), "%a %b %d %H:%M:%S UTC %Y"))
        t_na = time.mktime(time.strptime(na.strip(), "%a %b %d %H:%M:%S UTC %Y"))
        self.assertAlmostEqual((t_na - t_nb) / 86400, 365, delta=1)

    def test_two_enrollments_two_node_ids(self):
        st1, js1, _, _ = self.enroll("carol", "carol-password", "carol1")
        st2, js2, _, _ = self.enroll("carol", "carol-password", "carol2")
        self.assertEqual((st1, st2), (200, 200))
        self.assertNotEqual(js1["node_id"], js2["node_id"])

    def test_node_only_account(self):
        st, js, _, _ = self.enroll("bob", "bob-password", "bob1")
        self.assertEqual(st, 200, js)
        self.assertEqual(js["roles"], ["node"])

    def test_renewal_keeps_node_id(self):
        st, js, key, _ = self.enroll("alice", "alice-password", "alice-renew")
        self.assertEqual(st, 200)
        cert = self.save("alice-renew", js["certificate"])
        csr, _ = self.csr("alice-renew-new")
        st2, js2, _ = self.request("POST", "/v1/renew", {"csr": csr}, ctx=self.ctx(cert, key))
        self.assertEqual(st2, 200, js2)
        self.assertEqual(js2["node_id"], js["node_id"])
        self.assertEqual(js2["uri"], js["uri"])
        self.assertNotEqual(js2["certificate"], js["certificate"])

    # ---- refusals ------------------------------------------------------------------------

    def test_csr_claiming_another_user(self):
        csr, _ = self.csr("mallory", 'cn = "admin"\nuri = "sip:alice@%s"\ndns_name = "x.example"\n'
                          'ca\n' % OVERLAY)
        st, js, _ = self.request("POST", "/v1/enroll",
                                 {"user": "bob", "password": "bob-password", "csr": csr})
        self.assertEqual(st, 200, js)
        self.assertEqual(js["uri"], "sip:bob@" + OVERLAY)
        info = self.cert_info(self.save("mallory", js["certificate"]))
        self.assertIn("URI: sip:bob@" + OVERLAY, info)
        self.assertNotIn("sip:alice", info)
        self.assertNotIn("x.example", info)
        self.assertNotIn("CN=admin", info)
        self.assertIn("Certificate Authority (CA): FALSE", info)

    def test_bad_csrs(self):
        before = self.stored_state()
        good, _ = self.csr("trunc")
        cases = {
            "truncated": good[: len(good) // 2],
            "garbage": "-----BEGIN CERTIFICATE REQUEST-----\nAAAAAAAA\n"
                       "-----END CERTIFICATE REQUEST-----\n",
            "not pem": "hello",
            "tampered": tamper(good),
        }
        for what, csr in cases.items():
            st, js, _ = self.request("POST", "/v1/enroll",
                                     {"user": "alice", "password": "alice-password", "csr": csr})
            self.assertEqual(st, 400, what)
            self.assertEqual(js["error"], "bad-csr", what)
            self.assertTrue(js["reason"], what)
        self.assertEqual(self.stored_state(), before)

    def test_malformed_json(self):
        before = self.stored_state()
        for raw in ("not json", "[1,2]", '{"user":"alice"}', '{"user":5,"password":"x","csr":"y"}',
                    '{"user":"alice","user":"bob","password":"x","csr":"y"}', "\xff\xfe"):
            st, js, _ = self.request("POST", "/v1/enroll", raw=raw.encode("latin-1"))
            self.assertEqual(st, 400, raw)
            self.assertEqual(js["error"], "bad-json", raw)
        st, js, _ = self.request("POST", "/v1/enroll",
                                 {"user": "../etc", "password": "x", "csr": "y"})
        self.assertEqual((st, js["error"]), (400, "bad-user"))
        self.assertEqual(self.stored_state(), before)

    def test_oversize_body(self):
        before = self.stored_state()
        # Several MiB with a Content-Length: the server answers 413 without reading them and
        # closes; like curl, the client reads the answer even though its upload was cut off.
        st, js = harness.post_oversize(self.port, self.ctx(), "/v1/enroll", 4 * 1024 * 1024)
        self.assertEqual((st, js["error"]), (413, "too-large"))
        # Without a length (chunked), the connection is closed as soon as the limit is passed.
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx(),
                                           timeout=30)
        t0 = time.monotonic()
        with self.assertRaises((ConnectionError, ssl.SSLError, http.client.HTTPException)):
            conn.request("POST", "/v1/enroll", body=(b" " * 8192 for _ in range(512)),
                         encode_chunked=True)
            conn.getresponse()
        self.assertLess(time.monotonic() - t0, 10)
        conn.close()
        self.assertEqual(self.stored_state(), before)
        st, _, _ = self.request("GET", "/v1/overlay")  # still serving
        self.assertEqual(st, 200)

    def test_methods_and_paths(self):
        st, js, resp = self.request("POST", "/v1/overlay")
        self.assertEqual((st, js["error"], resp.getheader("Allow")),
                         (405, "method-not-allowed", "GET"))
        st, js, _ = self.request("GET", "/v1/enroll")
        self.assertEqual(st, 405)
        st, js, _ = self.request("GET", "/admin")
        self.assertEqual((st, js["error"]), (404, "not-found"))

    def test_no_user_enumeration(self):
        self.src = "127.0.0.2"  # its four failures stay with this address
        csr, _ = self.csr("enum")

        def attempt(user):
            t0 = time.monotonic()
            st, js, _ = self.request("POST", "/v1/enroll",
                                     {"user": user, "password": "wrong-password", "csr": csr})
            return st, js, time.monotonic() - t0
        # Two of each: four failures stay under this address's limit of five. Interleaved,
        # and compared by their fastest, so that load from other tests on a shared machine
        # (a TLS handshake per request) does not pass for a difference in the server's work.
        unknown, wrong = [], []
        for i in range(2):
            unknown.append(attempt("nosuchuser%d" % i))
            wrong.append(attempt("carol"))
        for st, js, _ in unknown + wrong:
            self.assertEqual(st, 401)
            self.assertEqual(js, {"error": "unauthorized",
                                  "reason": "unknown user or wrong password"})
        fastest = lambda xs: min(x[2] for x in xs)  # noqa: E731
        ratio = fastest(unknown) / fastest(wrong)
        self.assertTrue(0.5 < ratio < 2.0, "timing differs: unknown %.3fs, wrong %.3fs"
                        % (fastest(unknown), fastest(wrong)))

    def test_rate_limit(self):
        self.src = "127.0.0.3"  # an address of its own: a fresh window, and others unaffected
        csr, _ = self.csr("rl")
        statuses = []
        for _ in range(20):
            st, js, resp = self.request("POST", "/v1/enroll",
                                        {"user": "alice", "password": "wrong-password",
                                         "csr": csr})
            statuses.append(st)
            if st == 429:
                self.assertEqual(js["error"], "rate-limited")
                self.assertGreaterEqual(int(resp.getheader("Retry-After")), 1)
        self.assertEqual(statuses[:5], [401] * 5)
        self.assertEqual(statuses[5:], [429] * 15)
        # The right password is refused too while locked out...
        st, _, _ = self.request("POST", "/v1/enroll",
                                {"user": "alice", "password": "alice-password", "csr": csr})
        self.assertEqual(st, 429)
        time.sleep(WINDOW + 0.2)
        # ...and works after the window.
        st, js, _ = self.request("POST", "/v1/enroll",
                                 {"user": "alice", "password": "alice-password", "csr": csr})
        self.assertEqual(st, 200, js)

    def test_renew_refusals(self):
        csr, _ = self.csr("renew-bad")
        st, js, _ = self.request("POST", "/v1/renew", {"csr": csr})
        self.assertEqual((st, js["error"]), (401, "no-client-certificate"))
        # A certificate from another CA.
        rk = os.path.join(self.tmp, "rogue.key")
        certtool("--generate-privkey", "--key-type", "ed25519", "--outfile", rk)
        rt = os.path.join(self.tmp, "rogue.tmpl")
        with open(rt, "w") as f:
            f.write('cn = "alice"\nuri = "sip:alice@%s"\ntls_www_client\nsigning_key\n'
                    'expiration_days = 2\n' % OVERLAY)
        rc_ = os.path.join(self.tmp, "rogue.pem")
        rc, out = certtool("--generate-self-signed", "--load-privkey", rk, "--template", rt,
                           "--outfile", rc_)
        self.assertEqual(rc, 0, out)
        try:
            st, js, _ = self.request("POST", "/v1/renew", {"csr": csr}, ctx=self.ctx(rc_, rk))
            self.assertEqual((st, js["error"]), (401, "no-client-certificate"))
        except (ssl.SSLError, ConnectionError):
            pass  # refusing at the TLS layer is as good
        # A deleted account cannot renew.
        rc, _, err = self.ls("user", "add", "erin", stdin="erin-password\n")
        self.assertEqual(rc, 0, err)
        st, js, key, _ = self.enroll("erin", "erin-password", "erin1")
        self.assertEqual(st, 200)
        cert = self.save("erin1", js["certificate"])
        rc, _, err = self.ls("user", "del", "erin")
        self.assertEqual(rc, 0, err)
        st, js, _ = self.request("POST", "/v1/renew", {"csr": csr}, ctx=self.ctx(cert, key))
        self.assertEqual((st, js["error"]), (403, "account-gone"))

    def test_concurrent_enrollments(self):
        # Twelve at once from one device (one key): each gets a certificate, and all agree on
        # the device's one Node-ID (claiming a device is one transaction).
        csr, _ = self.csr("conc")
        results = []
        lock = threading.Lock()

        def one():
            st, js, _ = self.request("POST", "/v1/enroll",
                                     {"user": "carol", "password": "carol-password", "csr": csr})
            with lock:
                results.append((st, js.get("node_id") if js else None))
        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual([r[0] for r in results], [200] * 12)
        self.assertEqual(len({r[1] for r in results}), 1)
        self.assertRegex(self.stored_state(), r"carol +supernode +certificates \d+")

    def node(self, *args, password=None, state=None):
        argv = harness.WRAPPER + [os.path.join(BINDIR, "ordinarynode", "ordinarynode"),
                                  "-o", "state_dir=" + state] + list(args)
        p = subprocess.run(argv, input=password, capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    def test_our_client_enroll_and_renew(self):
        state = os.path.join(self.tmp, "node-carol")
        url = "https://127.0.0.1:%d" % self.port
        rc, out, err = self.node("enroll", "--login", url, "--pin", self.pin, "--user", "carol",
                                 password="carol-password\n", state=state)
        self.assertEqual(rc, 0, err)
        m = re.search(r"enrolled: sip:carol@%s \(node-id ([0-9a-f]{40}), roles node,supernode\)"
                      % re.escape(OVERLAY), out)
        self.assertIsNotNone(m, out)
        node_id = m.group(1)
        for f in ("key.pem", "cert.pem", "ca.pem", "overlay.json", "pin"):
            self.assertEqual(os.stat(os.path.join(state, f)).st_mode & 0o777, 0o600, f)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        rc, out_v = certtool("--verify", "--load-ca-certificate",
                             os.path.join(self.state, "ca.pem"), "--infile",
                             os.path.join(state, "cert.pem"))
        self.assertEqual(rc, 0, out_v)
        with open(os.path.join(state, "pin")) as f:
            self.assertEqual(f.read().strip(), self.pin)
        rc, out, err = self.node("renew", state=state)  # the login URL from the document
        self.assertEqual(rc, 0, err)
        self.assertIn("renewed: sip:carol@%s (node-id %s" % (OVERLAY, node_id), out)
        # Wrong password, wrong pin: clear one-line errors, nothing stored.
        other = os.path.join(self.tmp, "node-x")
        rc, _, err = self.node("enroll", "--login", url, "--pin", self.pin, "--user", "carol",
                               password="not-the-password\n", state=other)
        self.assertEqual(rc, 1)
        self.assertIn("401 unauthorized", err)
        self.assertFalse(os.path.exists(os.path.join(other, "cert.pem")))
        rc, _, err = self.node("enroll", "--login", url, "--pin", "sha256:" + "0" * 64,
                               "--user", "carol", password="carol-password\n", state=other)
        self.assertEqual(rc, 1)
        self.assertIn("does not match the pin", err)
        rc, _, err = self.node("enroll", "--login", url, "--user", "carol", state=other)
        self.assertEqual(rc, 2)
        self.assertIn("--pin", err)

    def test_running_node_renews_before_expiry(self):
        state = os.path.join(self.tmp, "node-renewer")
        url = "https://127.0.0.1:%d" % self.port
        rc, out, err = self.node("enroll", "--login", url, "--pin", self.pin, "--user", "alice",
                                 password="alice-password\n", state=state)
        self.assertEqual(rc, 0, err)
        node_id = re.search(r"node-id ([0-9a-f]{40})", out).group(1)
        with open(os.path.join(state, "cert.pem")) as f:
            old_cert = f.read()
        # A margin longer than the validity: the certificate is due at once.
        dm = harness.Daemon([os.path.join(BINDIR, "ordinarynode", "ordinarynode"), "-d",
                             "-o", "state_dir=" + state, "-o", "cert_renew_margin_s=40000000",
                             "-o", "sip_listen=127.0.0.1:0"])
        line = dm.wait_for("certificate renewed", timeout=30)
        self.assertIn("sip:alice@%s (node-id %s" % (OVERLAY, node_id), line)
        self.assertEqual(dm.stop(), 0)
        with open(os.path.join(state, "cert.pem")) as f:
            self.assertNotEqual(f.read(), old_cert)
        rc, out_v = certtool("--verify", "--load-ca-certificate",
                             os.path.join(self.state, "ca.pem"), "--infile",
                             os.path.join(state, "cert.pem"))
        self.assertEqual(rc, 0, out_v)
        # With the default margin nothing is due: no renewal, no error.
        dm = harness.Daemon([os.path.join(BINDIR, "ordinarynode", "ordinarynode"), "-d", "-v",
                             "-o", "state_dir=" + state, "-o", "sip_listen=127.0.0.1:0"])
        dm.wait_for("certificate good for", timeout=30)
        self.assertEqual(dm.stop(), 0)
        self.assertNotIn("renewed", dm.log())

    def test_issue_node_state_directories(self):
        """Offline provisioning: node state directories minted by the CA, usable as enrolled."""
        with harness.tempdir() as tmp:
            out = os.path.join(tmp, "nodes")
            rc, stdout, err = self.ls("issue", "--node", "fleet", "--count", "3",
                                      "--no-supernode", "--out", out)
            self.assertEqual(rc, 0, err)
            self.assertIn("3 node state directories", stdout)
            for i in (1, 2, 3):
                d = os.path.join(out, "fleet%d" % i)
                self.assertEqual(sorted(os.listdir(d)),
                                 ["ca.pem", "cert.pem", "key.pem", "overlay.json", "pin"])
                self.assertEqual(os.stat(os.path.join(d, "key.pem")).st_mode & 0o777, 0o600)
                rc, info = certtool("--certificate-info", "--infile", os.path.join(d, "cert.pem"))
                self.assertEqual(rc, 0)
                self.assertIn("sip:fleet%d@%s" % (i, OVERLAY), info)
                rc, info = certtool("--verify", "--load-ca-certificate", os.path.join(self.state, "ca.pem"),
                                    "--infile", os.path.join(d, "cert.pem"))
                self.assertEqual(rc, 0, info)
            # Our own node code accepts the directory as it accepts an enrolled one.
            rc, stdout, err = harness.run([os.path.join(BINDIR, "supernode", "dhtctl"), "--state",
                                           os.path.join(out, "fleet1"), "sign", "--type", "t",
                                           "--name", "n", "--value", "1"])
            self.assertEqual(rc, 0, err)
            self.assertIn('"sig"', stdout)
            # Existing credentials are never replaced; bad counts are usage errors.
            rc, _, err = self.ls("issue", "--node", "fleet1", "--out", out)
            self.assertEqual(rc, 1)
            self.assertIn("already holds credentials", err)
            rc, _, err = self.ls("issue", "--node", "a,b", "--count", "2", "--out", out)
            self.assertEqual(rc, 2)
            self.assertEqual(len(err.splitlines()), 1)

    def test_zy_stop_with_answers_held(self):
        # Named to run next to last: it restarts the shared server. bob has max_failures
        # failures: his attempts are spaced user_slowdown_s (2 s) apart by holding answers.
        # A stop while one is held (and another may be with the PBKDF2 workers) ends cleanly:
        # the held client sees the connection close, nothing leaks (valgrind_loginserver).
        self.src = "127.0.0.20"
        csr, _ = self.csr("held")
        wrong = {"user": "bob", "password": "wrong-password", "csr": csr}
        for _ in range(5):
            st, _, _ = self.request("POST", "/v1/enroll", wrong)
            self.assertEqual(st, 401)
        outcome = []

        def attempt(src):
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx(),
                                                   timeout=60, source_address=(src, 0))
                conn.request("POST", "/v1/enroll", body=json.dumps(wrong))
                outcome.append(conn.getresponse().status)
            except (OSError, http.client.HTTPException) as e:
                outcome.append(type(e).__name__)
        threads = [threading.Thread(target=attempt, args=("127.0.0.%d" % i,))
                   for i in (21, 22, 23)]
        for t in threads:
            t.start()
        self.daemon.wait_for("attempt for bob held", timeout=60)
        self.assertEqual(self.daemon.stop(signal.SIGTERM), 0)
        for t in threads:
            t.join(60)
        # The first was answered at once; the held ones got no answer.
        self.assertEqual(len(outcome), 3)
        self.assertTrue(any(o != 401 for o in outcome), outcome)
        self.start()

    def test_zz_restart_keeps_accounts_and_ca(self):
        # Named to run last in this class: it restarts the shared server.
        before = self.stored_state()
        with open(os.path.join(self.state, "ca.pem")) as f:
            ca_before = f.read()
        self.assertEqual(self.daemon.stop(signal.SIGTERM), 0)
        self.start()
        with open(os.path.join(self.state, "ca.pem")) as f:
            self.assertEqual(f.read(), ca_before)
        self.assertEqual(self.stored_state(), before)
        st, js, _ = self.request("GET", "/v1/overlay")
        self.assertEqual(json.loads(js["document"])["ca_cert"], ca_before)
        st, js, _, _ = self.enroll("alice", "alice-password", "alice-after")
        self.assertEqual(st, 200, js)


class Commands(unittest.TestCase):
    def test_user_commands_and_errors(self):
        with harness.tempdir() as tmp:
            cfg = os.path.join(tmp, "ls.json")
            with open(cfg, "w") as f:
                json.dump({"overlay": OVERLAY, "state_dir": os.path.join(tmp, "s"),
                           "pbkdf2_iterations": 1000}, f)
            ls = [os.path.join(BINDIR, "loginserver", "loginserver"), "-c", cfg]

            def run(*args, stdin=None):
                p = subprocess.run(harness.WRAPPER + ls + list(args), input=stdin,
                                   capture_output=True, text=True, timeout=60)
                return p.returncode, p.stdout, p.stderr
            rc, _, err = run("user", "list")
            self.assertEqual(rc, 1)
            self.assertIn("run 'loginserver init' first", err)
            self.assertEqual(run("init")[0], 0)
            rc, _, err = run("init")
            self.assertEqual(rc, 1)
            self.assertIn("refusing to replace", err)
            self.assertEqual(run("user", "add", "zed", stdin="zed-password\n")[0], 0)
            rc, _, err = run("user", "add", "zed", stdin="zed-password\n")
            self.assertEqual(rc, 1)
            self.assertIn("zed", err)
            rc, _, err = run("user", "add", "Bad/Name", stdin="x\n")
            self.assertEqual(rc, 2)
            self.assertEqual(len(err.splitlines()), 1)
            rc, _, err = run("user", "add", "shorty", stdin="short\n")
            self.assertEqual(rc, 1)
            rc, _, err = run("user", "frob")
            self.assertEqual(rc, 2)
            rc, out, _ = run("user", "supernode", "zed", "no")
            self.assertEqual(rc, 0)
            rc, out, _ = run("user", "list")
            self.assertRegex(out, r"zed +node-only")
            self.assertEqual(run("user", "del", "zed")[0], 0)
            rc, _, err = run("user", "del", "zed")
            self.assertEqual(rc, 1)
            rc, out, err = run("issue", "--service", "bootstrap1.example,127.0.0.1", "--out",
                               os.path.join(tmp, "svc"))
            self.assertEqual(rc, 0, err)
            pem = os.path.join(tmp, "svc", "bootstrap1.example.pem")
            rc, info = certtool("-i", "--infile", pem)
            self.assertIn("DNSname: bootstrap1.example", info)
            self.assertIn("IPAddress: 127.0.0.1", info)
            self.assertEqual(os.stat(os.path.join(tmp, "svc", "bootstrap1.example.key")).st_mode
                             & 0o777, 0o600)
            rc, _, err = run("issue")
            self.assertEqual(rc, 2)
            rc, out, err = run("publish")
            self.assertEqual(rc, 0, err)
            self.assertIn("sequence 2", out)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
