#!/usr/bin/env python3
"""Node identity against an enrolled adversary (issue 15, items 6, 10, 12 and 14), performed
against a real login server with its default bounds:

- service impersonation: a user's node certificate served as a web server is refused by
  OpenSSL-based clients (curl, Python's ssl) for the user's name, and by our own client even
  when it names the right address; user names like host names are refused at creation;
- Sybil: eight enrollments of one account do not give eight Node-IDs (one device keeps its
  Node-ID, a sixth device is refused), renewals are throttled per account;
- password guessing: an address that keeps failing is throttled, the owner from another
  address still enrolls, many addresses together are slowed down (answers held, not
  refused);
- `issue --service ../x` and other names that would leave the output folder are refused.

Honest enrollment and renewal are checked along the way."""

import http.client
import http.server
import json
import os
import re
import shutil
import socketserver
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
OVERLAY = "id.p2psip"
OID_ROLES = "1.3.6.1.4.1.32473.2026.2"


def certtool(*args, stdin=None):
    p = subprocess.run(["certtool"] + list(args), input=stdin, capture_output=True, text=True,
                       timeout=30)
    return p.returncode, p.stdout + p.stderr


class TLSServer:
    """A small HTTPS server presenting a given certificate: what an adversary runs with its
    own node credentials. It answers GET /v1/overlay with `document` and records every
    request it gets (a POST reaching it would carry a password)."""

    def __init__(self, cert, key, document=b"{}"):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append((self.command, self.path, body))
                data = document if self.path == "/v1/overlay" else b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *a):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, addr = super().get_request()
                sock.settimeout(10)
                return sock, addr

            def handle_error(self, request, client_address):
                pass  # clients that refuse our certificate hang up mid-handshake

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                            do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Identity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-id-")
        cls.state = os.path.join(cls.tmp, "state")
        cls.ca = os.path.join(cls.state, "ca.pem")
        cls.cfg = os.path.join(cls.tmp, "ls.json")
        cls.fixed_port = harness.free_port()
        # Only what tests need changed: the bounds under test keep their defaults
        # (max_devices 5, max_certs_per_user 10 per hour, max_failures 10 per 60 s,
        # user_slowdown_s 2).
        with open(cls.cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % cls.fixed_port,
                       "state_dir": cls.state, "pbkdf2_iterations": 1000}, f)
        rc, out, err = cls.ls("init")
        assert rc == 0, err
        cls.pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        for user in ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "mallory"):
            rc, _, err = cls.ls("user", "add", user, stdin=user + "-password\n")
            assert rc == 0, err
        cls.daemon = harness.Daemon([os.path.join(BINDIR, "loginserver", "loginserver"), "-d",
                                     "-c", cls.cfg])
        cls.daemon.wait_for("serving on")
        cls.port = cls.fixed_port
        cls.url = "https://127.0.0.1:%d" % cls.port

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def ls(cls, *args, stdin=None):
        p = subprocess.run(harness.WRAPPER + [os.path.join(BINDIR, "loginserver", "loginserver"),
                                              "-c", cls.cfg] + list(args),
                           input=stdin, capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    def node(self, *args, password=None, state=None):
        argv = harness.WRAPPER + [os.path.join(BINDIR, "ordinarynode", "ordinarynode"),
                                  "-o", "state_dir=" + state, "-o", "overlay=" + OVERLAY]
        p = subprocess.run(argv + list(args), input=password, capture_output=True, text=True,
                           timeout=60)
        return p.returncode, p.stdout, p.stderr

    # ---- HTTP helpers -------------------------------------------------------------------

    def request(self, method, path, body=None, src=None, cert=None, key=None):
        ctx = ssl.create_default_context(cafile=self.ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30,
                                           source_address=(src, 0) if src else None)
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            js = json.loads(text)
        except ValueError:
            js = None
        return resp.status, js, resp

    def keypair(self, name):
        key = os.path.join(self.tmp, name + ".key")
        if not os.path.exists(key):
            rc, out = certtool("--generate-privkey", "--key-type", "ed25519", "--outfile", key)
            self.assertEqual(rc, 0, out)
        return key

    def csr(self, name):
        key = self.keypair(name)
        tmpl = os.path.join(self.tmp, name + ".tmpl")
        with open(tmpl, "w") as f:
            f.write('cn = "x"\n')
        out = os.path.join(self.tmp, name + ".csr")
        rc, txt = certtool("--generate-request", "--load-privkey", key, "--template", tmpl,
                           "--outfile", out)
        self.assertEqual(rc, 0, txt)
        with open(out) as f:
            return f.read(), key

    def enroll(self, user, keyname, device=None, password=None, src=None):
        csr, key = self.csr(keyname)
        body = {"user": user, "password": password or user + "-password", "csr": csr}
        if device:
            body["device"] = device
        st, js, resp = self.request("POST", "/v1/enroll", body, src=src)
        cert = None
        if st == 200:
            cert = os.path.join(self.tmp, keyname + ".pem")
            with open(cert, "w") as f:
                f.write(js["certificate"])
        return st, js, resp, cert, key

    def renew(self, cert, key, newkey):
        csr, _ = self.csr(newkey)
        return self.request("POST", "/v1/renew", {"csr": csr}, cert=cert, key=key)

    def curl(self, host, port, extra=()):
        """curl (Debian's, built on OpenSSL) trusting only the overlay CA."""
        p = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", self.ca,
                            "--resolve", "%s:%d:127.0.0.1" % (host, port), "-o", "/dev/null",
                            "-w", "%{http_code}", "https://%s:%d/" % (host, port)] + list(extra),
                           capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout + p.stderr

    def python_client(self, host, port):
        """Python's ssl (OpenSSL) with the overlay CA: None when it accepts the server, else
        the reason it refused."""
        ctx = ssl.create_default_context(cafile=self.ca)
        import socket
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                with ctx.wrap_socket(s, server_hostname=host):
                    return None
        except ssl.SSLCertVerificationError as e:
            return str(e)

    # ---- item 10: service impersonation --------------------------------------------------

    def test_host_like_user_names_refused(self):
        for name in ("login.example.org", "127.0.0.1", "localhost"):
            rc, _, err = self.ls("user", "add", name, stdin="some-password\n")
            self.assertEqual(rc, 2, err)
            self.assertIn("looks like a host name or an IP address", err)
            self.assertEqual(len(err.splitlines()), 1)
            rc, _, err = self.ls("issue", "--node", name, "--out", os.path.join(self.tmp, "n"))
            self.assertEqual(rc, 2, err)
            self.assertIn("not like a host name", err)
        rc, out, _ = self.ls("user", "list")
        self.assertNotIn("login.example.org", out)
        self.assertNotIn("127.0.0.1", out)
        # Names with a '_' are fine.
        rc, _, err = self.ls("user", "add", "alice_smith", stdin="alice-password\n")
        self.assertEqual(rc, 0, err)

    def test_node_certificate_is_no_web_server(self):
        st, js, _, cert, key = self.enroll("mallory", "mallory-web", device="web")
        self.assertEqual(st, 200, js)
        rc, info = certtool("-i", "--infile", cert)
        self.assertIn("Subject: CN=sip:mallory@" + OVERLAY, info)
        self.assertNotIn("DNSname", info)
        self.assertNotIn("IPAddress", info)
        srv = TLSServer(cert, key)
        try:
            # What an operator's tools would do: trust the overlay CA and ask for the host.
            for host in ("mallory", "127.0.0.1", "login.example.org"):
                rc, out = self.curl(host, srv.port)
                self.assertNotEqual(rc, 0, "curl accepted a node certificate for %s" % host)
                self.assertIn("(60)", out)  # SSL peer certificate was not OK
                why = self.python_client(host, srv.port)
                self.assertIsNotNone(why, host)
                print("\n  %s: %s; python ssl: %s" % (host, out.strip()[3:].splitlines()[0], why),
                      file=sys.stderr)
        finally:
            srv.close()

        # The same tools accept a real service certificate: the test can tell them apart.
        svc = os.path.join(self.tmp, "svc")
        rc, _, err = self.ls("issue", "--service", "login.example.org", "--out", svc)
        self.assertEqual(rc, 0, err)
        srv = TLSServer(os.path.join(svc, "login.example.org.pem"),
                        os.path.join(svc, "login.example.org.key"))
        try:
            rc, out = self.curl("login.example.org", srv.port)
            self.assertEqual((rc, out), (0, "200"))
            self.assertIsNone(self.python_client("login.example.org", srv.port))
        finally:
            srv.close()

    def test_old_style_node_certificate_was_a_web_server(self):
        """The attack as it stood: a node certificate of the former shape (CN=<user>, a
        user named like a host, serverAuth) made with the CA's key is taken by curl for
        that host. The CA no longer issues that shape (test above)."""
        key = self.keypair("oldstyle")
        tmpl = os.path.join(self.tmp, "oldstyle.tmpl")
        with open(tmpl, "w") as f:
            f.write('cn = "login.example.org"\nuri = "sip:login.example.org@%s"\n'
                    'tls_www_server\ntls_www_client\nsigning_key\nexpiration_days = 2\n'
                    % OVERLAY)
        cert = os.path.join(self.tmp, "oldstyle.pem")
        rc, out = certtool("--generate-certificate", "--load-privkey", key,
                           "--load-ca-certificate", self.ca, "--load-ca-privkey",
                           os.path.join(self.state, "ca.key"), "--template", tmpl,
                           "--outfile", cert)
        self.assertEqual(rc, 0, out)
        srv = TLSServer(cert, key)
        try:
            rc, out = self.curl("login.example.org", srv.port)
            self.assertEqual((rc, out), (0, "200"))
        finally:
            srv.close()

    def test_our_client_refuses_node_posing_as_login_server(self):
        # The envelope a real login server serves, so that the pin check passes.
        st, js, _ = self.request("GET", "/v1/overlay")
        self.assertEqual(st, 200)
        envelope = json.dumps(js).encode()
        # A node certificate that even names the right address (127.0.0.1): made with the CA
        # key, as a CA mistake or a stolen old certificate would be. It lacks the service role.
        key = self.keypair("poser")
        tmpl = os.path.join(self.tmp, "poser.tmpl")
        with open(tmpl, "w") as f:
            f.write('cn = "sip:mallory@%s"\nuri = "sip:mallory@%s"\nip_address = "127.0.0.1"\n'
                    'tls_www_server\ntls_www_client\nsigning_key\nexpiration_days = 2\n'
                    'add_extension = "%s 0x040103"\n' % (OVERLAY, OVERLAY, OID_ROLES))
        cert = os.path.join(self.tmp, "poser.pem")
        rc, out = certtool("--generate-certificate", "--load-privkey", key,
                           "--load-ca-certificate", self.ca, "--load-ca-privkey",
                           os.path.join(self.state, "ca.key"), "--template", tmpl,
                           "--outfile", cert)
        self.assertEqual(rc, 0, out)
        self.assertIn(OID_ROLES, certtool("-i", "--infile", cert)[1])
        for what, (pc, pk) in (("node certificate for 127.0.0.1", (cert, key)),
                               ("enrolled node certificate", (None, None))):
            if pc is None:
                st, js, _, pc, pk = self.enroll("mallory", "mallory-poser", device="poser")
                self.assertEqual(st, 200, js)
            srv = TLSServer(pc, pk, envelope)
            try:
                state = os.path.join(self.tmp, "victim-" + str(srv.port))
                rc, out, err = self.node("enroll", "--login", "https://127.0.0.1:%d" % srv.port,
                                         "--pin", self.pin, "--user", "alice",
                                         password="alice-password\n", state=state)
                self.assertEqual(rc, 1, what + ": " + out + err)
                self.assertIn("TLS: server certificate", err)
                if pc == cert:
                    self.assertIn("no service certificate of the overlay", err)
                    print("\n  our client: %s" % err.strip(), file=sys.stderr)
                # The document was fetched (unverified, pinned); the password never went out.
                self.assertEqual([r[0] for r in srv.requests], ["GET"], what)
                self.assertFalse(os.path.exists(os.path.join(state, "cert.pem")))
            finally:
                srv.close()
        # The honest server still enrolls the same user with the same client.
        state = os.path.join(self.tmp, "alice-honest")
        rc, out, err = self.node("enroll", "--login", self.url, "--pin", self.pin, "--user",
                                 "alice", password="alice-password\n", state=state)
        self.assertEqual(rc, 0, err)
        self.assertIn("enrolled: sip:alice@" + OVERLAY, out)

    # ---- item 6: Sybil -------------------------------------------------------------------

    def test_sybil_eight_enrollments(self):
        node_ids, statuses = [], []
        # One device, three enrollments (three fresh keys): one Node-ID.
        for i in range(3):
            st, js, _, cert, key = self.enroll("bob", "bob-phone%d" % i, device="phone")
            statuses.append(st)
            self.assertEqual(st, 200, js)
            self.assertEqual(js["device"], "phone")
            node_ids.append(js["node_id"])
        self.assertEqual(len(set(node_ids)), 1)
        # Four more devices: four more Node-IDs, the account's five.
        for d in range(2, 6):
            st, js, _, cert, key = self.enroll("bob", "bob-dev%d" % d, device="dev%d" % d)
            statuses.append(st)
            self.assertEqual(st, 200, js)
            node_ids.append(js["node_id"])
        # The eighth: a sixth device is refused, with the reason.
        st, js, _, _, _ = self.enroll("bob", "bob-dev6", device="dev6")
        statuses.append(st)
        self.assertEqual((st, js["error"]), (403, "too-many-devices"))
        self.assertIn("already has 5 devices", js["reason"])
        # Without a device name the key is the device: a new key is a new device, refused too.
        st, js, _, _, _ = self.enroll("bob", "bob-nodevice")
        self.assertEqual((st, js["error"]), (403, "too-many-devices"))
        print("\n  8 enrollments of bob: statuses %s, %d distinct Node-IDs"
              % (statuses, len(set(node_ids))), file=sys.stderr)
        self.assertEqual(statuses, [200] * 7 + [403])
        self.assertEqual(len(set(node_ids)), 5)
        self.daemon.wait_for("refused device dev6 of bob")
        rc, out, err = self.ls("user", "devices", "bob")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.splitlines()), 5)
        self.assertIn("phone", out)
        self.assertIn(node_ids[0], out)
        # The operator frees a slot: the new device enrolls; the removed one cannot renew.
        rc, _, err = self.ls("user", "forget", "bob", "dev5")
        self.assertEqual(rc, 0, err)
        st, js, _, _, _ = self.enroll("bob", "bob-dev6b", device="dev6")
        self.assertEqual(st, 200, js)
        self.assertNotIn(js["node_id"], node_ids)

    def test_same_device_keeps_node_id_with_our_client(self):
        state = os.path.join(self.tmp, "dave-node")
        ids = []
        for _ in range(2):  # enrolling again from the same state directory
            rc, out, err = self.node("enroll", "--login", self.url, "--pin", self.pin, "--user",
                                     "dave", password="dave-password\n", state=state)
            self.assertEqual(rc, 0, err)
            ids.append(re.search(r"node-id ([0-9a-f]{40})", out).group(1))
        self.assertEqual(ids[0], ids[1])
        with open(os.path.join(state, "device")) as f:
            self.assertRegex(f.read().strip(), r"^dev-[0-9a-f]{16}$")
        # Another state directory of the same account is another device: its own Node-ID.
        rc, out, err = self.node("enroll", "--login", self.url, "--pin", self.pin, "--user",
                                 "dave", "--device", "laptop", password="dave-password\n",
                                 state=os.path.join(self.tmp, "dave-laptop"))
        self.assertEqual(rc, 0, err)
        self.assertNotIn(ids[0], out)
        rc, _, err = self.node("enroll", "--login", self.url, "--pin", self.pin, "--user",
                               "dave", "--device", "My Laptop", password="dave-password\n",
                               state=os.path.join(self.tmp, "dave-bad"))
        self.assertEqual(rc, 2, err)
        self.assertIn("--device", err)
        # A renewal keeps it.
        rc, out, err = self.node("renew", state=state)
        self.assertEqual(rc, 0, err)
        self.assertIn("node-id %s" % ids[0], out)

    def test_rapid_renewals_throttled(self):
        st, js, _, cert, key = self.enroll("erin", "erin-0", device="phone")
        self.assertEqual(st, 200, js)
        node_id = js["node_id"]
        statuses = [st]
        for i in range(1, 12):
            st, js, resp = self.renew(cert, key, "erin-%d" % i)
            statuses.append(st)
            if st == 200:
                self.assertEqual(js["node_id"], node_id)
                cert, key = os.path.join(self.tmp, "erin-%d.pem" % i), \
                    os.path.join(self.tmp, "erin-%d.key" % i)
                with open(cert, "w") as f:
                    f.write(js["certificate"])
            else:
                self.assertEqual(js["error"], "rate-limited")
                self.assertIn("too many certificates for this account", js["reason"])
                self.assertGreater(int(resp.getheader("Retry-After")), 3000)
        print("\n  erin: enroll + 11 renewals within seconds: %s" % statuses, file=sys.stderr)
        self.assertEqual(statuses, [200] * 10 + [429] * 2)
        # The budget is the account's: an enrollment is refused too, after the password.
        st, js, _, _, _ = self.enroll("erin", "erin-x", device="phone")
        self.assertEqual((st, js["error"]), (429, "rate-limited"))
        # Others are unaffected.
        st, js, _, c2, k2 = self.enroll("frank", "frank-renew", device="tablet")
        self.assertEqual(st, 200, js)
        st, js2, _ = self.renew(c2, k2, "carol-renew2")
        self.assertEqual(st, 200, js2)
        self.assertEqual(js2["node_id"], js["node_id"])

    # ---- item 12: password guessing -------------------------------------------------------

    def test_guessing_throttles_the_guesser_not_the_owner(self):
        csr, _ = self.csr("guess")
        wrong = {"user": "carol", "password": "wrong-password", "csr": csr}
        statuses = []
        for _ in range(12):
            st, js, resp = self.request("POST", "/v1/enroll", wrong, src="127.0.0.2")
            statuses.append(st)
        print("\n  12 wrong passwords for carol from 127.0.0.2: %s" % statuses, file=sys.stderr)
        self.assertEqual(statuses, [401] * 10 + [429] * 2)
        self.daemon.wait_for("127.0.0.2: refused for carol: too many failed attempts")
        # The guesser stays throttled even with the right password...
        right = dict(wrong, password="carol-password")
        st, js, _ = self.request("POST", "/v1/enroll", right, src="127.0.0.2")
        self.assertEqual((st, js["error"]), (429, "rate-limited"))
        # ...the owner, from another address, gets in at once: nobody tried since.
        def timed(body, src):
            t0 = time.monotonic()
            st, js, resp = self.request("POST", "/v1/enroll", body, src=src)
            return st, js, time.monotonic() - t0
        st, js, _ = timed(dict(right, device="home"), "127.0.0.1")
        self.assertEqual(st, 200, js)
        # Many addresses together: while carol is under attack, her attempts are spaced 2 s
        # apart (user_slowdown_s) by holding each answer until its turn; none is refused.
        st1, _, t1 = timed(wrong, "127.0.0.5")
        st2, _, t2 = timed(wrong, "127.0.0.6")
        st3, js3, t3 = timed(dict(right, device="home"), "127.0.0.7")
        print("  carol under attack: guess %d after %.1f s, guess %d after %.1f s, owner %d "
              "after %.1f s" % (st1, t1, st2, t2, st3, t3), file=sys.stderr)
        self.assertEqual((st1, st2, st3), (401, 401, 200), js3)
        for t in (t1, t2, t3):
            self.assertGreater(t, 1.0)
            if not harness.WRAPPER:
                self.assertLess(t, 4.0)
        self.daemon.wait_for("attempt for carol held")
        # Other users are not slowed down at all.
        st, js, _, _, _ = self.enroll("dave", "dave-during", device="desk", src="127.0.0.8")
        self.assertEqual(st, 200, js)

    # ---- revocation ------------------------------------------------------------------------

    def crl(self):
        ctx = ssl.create_default_context(cafile=self.ca)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        conn.request("GET", "/v1/crl")
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        self.assertEqual(resp.status, 200, body)
        path = os.path.join(self.tmp, "crl-%f.pem" % time.monotonic())
        with open(path, "w") as f:
            f.write(body)
        rc, out = certtool("--verify-crl", "--load-ca-certificate", self.ca, "--infile", path)
        self.assertEqual(rc, 0, out)  # signed by the overlay CA
        return path

    def openssl_verify(self, cert, crl):
        p = subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", self.ca, "-CRLfile",
                            crl, cert], capture_output=True, text=True, timeout=30)
        return p.returncode, p.stdout + p.stderr

    def test_revocation_list(self):
        certs = {}
        for dev in ("g1", "g2"):
            st, js, _, certs[dev], _ = self.enroll("gina", "gina-" + dev, device=dev)
            self.assertEqual(st, 200, js)
        st, js, _, hank, _ = self.enroll("hank", "hank-1", device="h1")
        self.assertEqual(st, 200, js)
        crl = self.crl()
        for c in (certs["g1"], certs["g2"], hank):
            self.assertEqual(self.openssl_verify(c, crl)[0], 0)
        # The operator removes one of gina's devices: its certificate is listed at once.
        rc, _, err = self.ls("user", "forget", "gina", "g1")
        self.assertEqual(rc, 0, err)
        crl = self.crl()
        rc, out = self.openssl_verify(certs["g1"], crl)
        self.assertNotEqual(rc, 0)
        self.assertIn("certificate revoked", out)
        print("\n  openssl verify -crl_check after 'user forget gina g1': %s"
              % [x for x in out.splitlines() if "revoked" in x][0].strip(), file=sys.stderr)
        self.assertEqual(self.openssl_verify(certs["g2"], crl)[0], 0)
        # A deleted account: all its certificates; others stay good.
        rc, _, err = self.ls("user", "del", "hank")
        self.assertEqual(rc, 0, err)
        crl = self.crl()
        self.assertIn("certificate revoked", self.openssl_verify(hank, crl)[1])
        self.assertEqual(self.openssl_verify(certs["g2"], crl)[0], 0)
        rc, info = certtool("--crl-info", "--infile", crl)
        self.assertEqual(rc, 0, info)
        self.assertIn("Next at", info)
        self.assertIn("Revoked certificates (2)", info)

    # ---- item 14: issue --service names ----------------------------------------------------

    def test_issue_service_stays_in_out_dir(self):
        base = os.path.join(self.tmp, "issue")
        out = os.path.join(base, "out")
        os.makedirs(out)
        for bad in ("../x", "a/b", "..", "x..y", "/etc/x", "a\x01b", "-x", "ok,../x", "a b",
                    "x" * 64 + ".org"):
            rc, _, err = self.ls("issue", "--service", bad, "--out", out)
            self.assertEqual(rc, 1, bad)
            self.assertIn("neither a DNS host name nor an IP address", err, bad)
        self.assertEqual(os.listdir(base), ["out"])
        self.assertEqual(os.listdir(out), [])
        rc, _, err = self.ls("issue", "--node", "../x", "--out", out)
        self.assertEqual(rc, 2, err)
        self.assertEqual(os.listdir(base), ["out"])
        rc, _, err = self.ls("issue", "--service", "boot-1.example.org,192.0.2.1,::1", "--out",
                             out)
        self.assertEqual(rc, 0, err)
        self.assertEqual(sorted(os.listdir(out)),
                         ["boot-1.example.org.key", "boot-1.example.org.pem"])


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
