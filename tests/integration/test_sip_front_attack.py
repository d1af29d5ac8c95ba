#!/usr/bin/env python3
"""Attacks on a super node's public SIP front end (issue 15, items 2, 8 and 11), performed
against real daemons: sn1 is the P2P registrar and proxy of pbx.test (users carol, dave, erin)
and alice an ordinary node of the overlay. Each test performs an attack from its own loopback
address (127.0.0.x: per-source limits must not mix the attacker with the honest phones) and
asserts that it fails while the honest phones keep registering and being called:

- a captured REGISTER replayed (other Contact, branch, CSeq, Call-ID): 401 stale, the record
  keeps the honest binding; a digest uri other than the Request-URI: 400; an RFC 2069 answer
  (no qop): 403;
- an anonymous INVITE whose From claims a user of the domain: 407, the phone does not ring; a
  MESSAGE or OPTIONS towards another domain, a literal address or a Route: refused, and the
  listener they name never sees a connection;
- svwar (OPTIONS, REGISTER, INVITE) cannot tell carol and dave from 28 missing names, and raw
  requests of every method get the same answer for existing and missing users;
- svcrack with 300 guesses is throttled (from one address, then from several), while a sipp
  phone keeps registering;
- many transactions, and many TCP connections, from one source: the excess is refused, another
  source is served."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

OVERLAY = "front-attack.p2psip"
PBX = "pbx.test"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
PASSWORDS = {"carol": "carol-secret", "dave": "dave-secret", "erin": "erin-secret"}
SIP_RATE = 50  # messages/s per source: 100 open transactions per source at most

# svcrack 0.3.3 ignores its -b (bind address): run it with its sockets bound to a given loopback
# address, as an attacker with several addresses would.
SV_FROM = """import socket, sys
ip = sys.argv.pop(1)
bind = socket.socket.bind
socket.socket.bind = lambda s, a: bind(s, (ip, a[1]) if a[0] in ("", "0.0.0.0") else a)
sys.argv[0] = "svcrack"
sys.path.insert(0, "/usr/share/sipvicious")  # where Debian installs it
from sipvicious import svcrack
svcrack.main()
"""

free_port = harness.free_port
wait_until = harness.wait_until


def say(fmt, *args):
    print("  [sip-attack] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def ha1(user, pw):
    return hashlib.md5(("%s:%s:%s" % (user, PBX, pw)).encode()).hexdigest()


def md5(s):
    return hashlib.md5(s.encode()).hexdigest()


def status_line(msg):
    return msg.split("\r\n", 1)[0]


def code_of(msg):
    return int(msg.split(" ", 2)[1])


def header(msg, name):
    for line in msg.split("\r\n")[1:]:
        if not line:
            break
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def challenge_params(h):
    return dict(re.findall(r'(\w+)="?([^",]*)"?', h))


def digest(user, pw, method, uri, nonce, nc="00000001", cnonce=None, qop="auth",
           proxy=False, realm=PBX):
    """An Authorization (or Proxy-Authorization) header line answering a challenge."""
    cnonce = cnonce or uuid.uuid4().hex[:16]
    ha2 = md5("%s:%s" % (method, uri))
    if qop:
        resp = md5("%s:%s:%s:%s:%s:%s" % (ha1(user, pw), nonce, nc, cnonce, qop, ha2))
        extra = ', qop=%s, nc=%s, cnonce="%s"' % (qop, nc, cnonce)
    else:  # RFC 2069
        resp = md5("%s:%s:%s" % (ha1(user, pw), nonce, ha2))
        extra = ""
    return '%s: Digest username="%s", realm="%s", nonce="%s", uri="%s", response="%s", ' \
           'algorithm=MD5%s' % ("Proxy-Authorization" if proxy else "Authorization", user,
                                realm, nonce, uri, resp, extra)


class Phone:
    """A SIP user agent on a UDP socket at ip (port picked), enough to send requests, read
    answers and answer requests."""

    def __init__(self, ip):
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.port = self.sock.getsockname()[1]
        self.addr = "%s:%d" % (ip, self.port)
        self.inbox = []  # requests received

    def close(self):
        self.sock.close()

    def request(self, method, ruri, frm, to, cseq=1, call_id=None, branch=None, extra=(),
                contact=None, body=""):
        call_id = call_id or uuid.uuid4().hex
        branch = branch or "z9hG4bK" + uuid.uuid4().hex[:16]
        lines = ["%s %s SIP/2.0" % (method, ruri),
                 "Via: SIP/2.0/UDP %s;branch=%s;rport" % (self.addr, branch),
                 "From: %s;tag=%s" % (frm, uuid.uuid4().hex[:8]),
                 "To: %s" % to, "Call-ID: %s" % call_id, "CSeq: %d %s" % (cseq, method),
                 "Contact: <%s>" % (contact or "sip:u@%s" % self.addr), "Max-Forwards: 70"]
        lines += list(extra)
        lines += ["Content-Length: %d" % len(body), "", body]
        return "\r\n".join(lines)

    def send(self, text, dest):
        host, port = dest.rsplit(":", 1)
        self.sock.sendto(text.encode(), (host, int(port)))

    def read(self, timeout):
        """The next message within timeout, or None; requests also go to self.inbox."""
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(65536)
        except (socket.timeout, OSError):
            return None
        msg = data.decode(errors="replace")
        if not msg.startswith("SIP/2.0"):
            self.inbox.append(msg)
        return msg

    def final(self, text, dest, timeout=5.0):
        """Sends a request and returns its final response (or None)."""
        branch = re.search(r"branch=([^;\r\n]+)", text).group(1)
        self.send(text, dest)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.read(max(0.01, end - time.monotonic()))
            if m and m.startswith("SIP/2.0") and branch in (header(m, "Via") or "") \
                    and code_of(m) >= 200:
                return m
        return None

    def answer(self, req, code, reason):
        """A response to a request received (its Vias, From, To with a tag, Call-ID, CSeq)."""
        out = ["SIP/2.0 %d %s" % (code, reason)]
        for line in req.split("\r\n")[1:]:
            if not line:
                break
            k = line.split(":", 1)[0].strip().lower()
            if k in ("via", "from", "call-id", "cseq"):
                out.append(line)
            elif k == "to":
                out.append(line + ";tag=" + uuid.uuid4().hex[:8])
        out += ["Content-Length: 0", "", ""]
        via = header(req, "Via")
        m = re.search(r"SIP/2.0/UDP ([0-9.]+):(\d+)", via)
        self.sock.sendto("\r\n".join(out).encode(), (m.group(1), int(m.group(2))))

    def requests_for(self, call_id):
        return [r for r in self.inbox if header(r, "Call-ID") == call_id]

    def drain(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.read(max(0.01, end - time.monotonic()))


class FrontEndAttacks(harness.OverlayScenario, unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-sipa-")
        try:
            cls.users_file = os.path.join(cls.tmp, "pbx-users")
            with open(cls.users_file, "w") as f:
                for u, pw in PASSWORDS.items():
                    f.write("%s:%s\n" % (u, ha1(u, pw)))
            cls.build_overlay(OVERLAY, ("sn1",), ("alice",), wait=WAIT,
                              ls_extra={"sip_proxies": [PBX + "=sn1"]})
            cls.on["alice"] = cls.start([cls.bin("ordinarynode"), "-d", "-c", cls.cfg["alice"]])
            cls.on["alice"].wait_for("published user location", timeout=WAIT)
            cls.sn["sn1"].wait_for("P2P registrar and proxy of %s" % PBX, timeout=WAIT)
            cls.fe = cls.front
            # carol's phone, registered from 127.0.0.2 before any attack
            cls.carol = Phone("127.0.0.2")
            cls.carol_reg = None
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def node_conf(cls, u, conf):
        if u == "sn1":
            cls.front = "127.0.0.1:%d" % free_port()
            conf.update({"sip_listen": cls.front, "sip_domain": PBX, "sip_users": cls.users_file,
                         "sip_rate": SIP_RATE})
        else:
            conf["supernodes"] = [cls.addr["sn1"]]

    @classmethod
    def tearDownClass(cls):
        cls.save_logs("test_sip_front_attack")
        problems = cls.stop_all()
        for p in ("carol",):
            if getattr(cls, p, None):
                getattr(cls, p).close()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    # ---- helpers ----

    def counters(self):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg["sn1"], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)["sip"]

    def register(self, phone, user, pw=None, expires=600, contact=None):
        """REGISTER, 401, REGISTER with credentials: (the authorised request, its answer)."""
        contact = contact or "sip:%s@%s" % (user, phone.addr)
        call_id = uuid.uuid4().hex
        aor = "<sip:%s@%s>" % (user, PBX)
        r1 = phone.final(phone.request("REGISTER", "sip:" + PBX, aor, aor, 1, call_id,
                                       contact=contact, extra=("Expires: %d" % expires,)),
                         self.fe)
        self.assertIsNotNone(r1, "no answer to REGISTER")
        self.assertEqual(code_of(r1), 401, r1)
        ch = challenge_params(header(r1, "WWW-Authenticate"))
        auth = digest(user, pw or PASSWORDS[user], "REGISTER", "sip:" + PBX, ch["nonce"])
        req = phone.request("REGISTER", "sip:" + PBX, aor, aor, 2, call_id, contact=contact,
                            extra=("Expires: %d" % expires, auth))
        return req, phone.final(req, self.fe, timeout=10)

    def record_contacts(self, user):
        rc, out, err = self.cli("alice", "get", "--json", "user location", "%s@%s" % (user, PBX))
        self.assertEqual(rc, 0, err)
        recs = json.loads(out)["records"]
        return [b["contact"] for r in recs for b in r["value"].get("bindings", [])]

    def carol_registered(self):
        if not type(self).carol_reg:
            req, resp = self.register(self.carol, "carol")
            self.assertEqual(code_of(resp), 200, resp)
            type(self).carol_reg = req
        return type(self).carol_reg

    def invite(self, phone, callee, frm, extra=()):
        return phone.request("INVITE", "sip:%s@%s" % (callee, PBX), frm,
                             "<sip:%s@%s>" % (callee, PBX), extra=extra)

    def rings(self, phone, call_id, seconds=2.0, answer=True):
        """Whether a request of call_id reaches phone within seconds (answered 486 if so)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            phone.read(max(0.01, end - time.monotonic()))
            got = [r for r in phone.requests_for(call_id) if r.startswith(("INVITE", "MESSAGE"))]
            if got:
                if answer:
                    phone.answer(got[0], 486 if got[0].startswith("INVITE") else 200,
                                 "Busy Here" if got[0].startswith("INVITE") else "OK")
                return True
        return False

    # ---- item 11: Digest ----

    def test_01_replayed_register_is_refused(self):
        """A REGISTER with good credentials, captured and replayed from another address with
        another Contact, branch, CSeq and Call-ID (and as it was): 401 stale=true each time,
        and carol's record keeps her own phone only. The honest phone, counting its nonce up,
        keeps registering."""
        req = self.carol_registered()
        wait_until("carol's binding in the overlay", lambda: self.record_contacts("carol"), WAIT)
        mallory = Phone("127.0.0.9")
        try:
            forged = req.replace(self.carol.addr, mallory.addr)  # Via and Contact
            forged = re.sub(r"branch=[^;\r\n]+", "branch=z9hG4bK" + uuid.uuid4().hex[:16], forged)
            forged = re.sub(r"CSeq: \d+", "CSeq: 7", forged)
            forged = re.sub(r"Call-ID: \S+", "Call-ID: " + uuid.uuid4().hex, forged)
            self.assertIn("sip:carol@" + mallory.addr, forged)
            for attempt in (forged, req.replace(self.carol.addr, mallory.addr)):
                r = mallory.final(attempt, self.fe)
                self.assertIsNotNone(r)
                self.assertEqual(code_of(r), 401, r)
                self.assertIn("stale=true", header(r, "WWW-Authenticate"))
            say("replayed REGISTER: %s, %s", status_line(r), header(r, "WWW-Authenticate"))
            # Byte for byte, it is a retransmission of the REGISTER answered already: no new
            # binding either (the same CSeq again).
            r = mallory.final(req, self.fe)
            self.assertIsNotNone(r)
            self.assertNotEqual(code_of(r), 200, r)
            say("the same REGISTER byte for byte: %s", status_line(r))
        finally:
            mallory.close()
        self.sn["sn1"].wait_for("nonce count 00000001 already used (a replay?)")
        contacts = self.record_contacts("carol")
        say("carol's record after the replays: %s", contacts)
        self.assertTrue(contacts and all(self.carol.addr in c for c in contacts), contacts)
        self.assertGreaterEqual(self.counters()["counters"]["replayed"], 2)
        # The honest phone may reuse its nonce with a higher count.
        nonce = re.search(r'nonce="([^"]+)"', req).group(1)
        aor = "<sip:carol@%s>" % PBX
        again = self.carol.request("REGISTER", "sip:" + PBX, aor, aor, 3,
                                   extra=("Expires: 600", digest("carol", PASSWORDS["carol"],
                                                                 "REGISTER", "sip:" + PBX,
                                                                 nonce, nc="00000002")),
                                   contact="sip:carol@" + self.carol.addr)
        r = self.carol.final(again, self.fe, timeout=10)
        self.assertEqual(code_of(r), 200, r)

    def test_02_digest_uri_must_be_the_request_uri(self):
        phone = Phone("127.0.0.10")
        try:
            aor = "<sip:dave@%s>" % PBX
            r1 = phone.final(phone.request("REGISTER", "sip:" + PBX, aor, aor), self.fe)
            nonce = challenge_params(header(r1, "WWW-Authenticate"))["nonce"]
            bad = phone.request("REGISTER", "sip:" + PBX, aor, aor, 2, extra=(
                digest("dave", PASSWORDS["dave"], "REGISTER", "sip:elsewhere.test", nonce),))
            r = phone.final(bad, self.fe)
            self.assertEqual(code_of(r), 400, r)
            say("credentials for another uri: %s", status_line(r))
            self.sn["sn1"].wait_for('the digest uri "sip:elsewhere.test" is not the Request-URI')
            # RFC 2069 (no qop, no nonce count): refused.
            old = phone.request("REGISTER", "sip:" + PBX, aor, aor, 3, extra=(
                digest("dave", PASSWORDS["dave"], "REGISTER", "sip:" + PBX, nonce, qop=None),))
            r = phone.final(old, self.fe)
            self.assertEqual(code_of(r), 403, r)
            say("an RFC 2069 answer: %s", status_line(r))
            self.sn["sn1"].wait_for("refused: an RFC 2069 answer (no qop)")
            _, ok = self.register(phone, "dave", expires=0)  # the right answer still works
            self.assertEqual(code_of(ok), 200, ok)
        finally:
            phone.close()

    # ---- item 2, the front end's half: what leaves is authenticated ----

    def test_03_anonymous_invite_with_a_local_from(self):
        """An INVITE to carol whose From claims dave of the same domain: 407, carol's phone
        does not ring. From a user of another domain, anyone may call her; with dave's
        credentials, dave may."""
        self.carol_registered()
        mallory = Phone("127.0.0.11")
        try:
            inv = self.invite(mallory, "carol", '"Dave (boss)" <sip:dave@%s>' % PBX)
            r = mallory.final(inv, self.fe)
            self.assertEqual(code_of(r), 407, r)
            self.assertFalse(self.rings(self.carol, header(inv, "Call-ID"), 1.5),
                             "carol's phone rang for a forged From")
            say("anonymous INVITE From dave@%s: %s, carol's phone silent", PBX, status_line(r))
            # A caller of another domain reaches her.
            inv = self.invite(mallory, "carol", "<sip:alice@%s>" % OVERLAY)
            mallory.send(inv, self.fe)
            self.assertTrue(self.rings(self.carol, header(inv, "Call-ID"), 5),
                            "a call into the domain did not reach carol")
            # dave, with his credentials.
            call_id = uuid.uuid4().hex
            frm = "<sip:dave@%s>" % PBX
            first = re.sub(r"Call-ID: \S+", "Call-ID: " + call_id,
                           self.invite(mallory, "carol", frm))
            r = mallory.final(first, self.fe)
            self.assertEqual(code_of(r), 407, r)
            nonce = challenge_params(header(r, "Proxy-Authenticate"))["nonce"]
            auth = digest("dave", PASSWORDS["dave"], "INVITE", "sip:carol@" + PBX, nonce,
                          proxy=True)
            second = re.sub(r"Call-ID: \S+", "Call-ID: " + call_id,
                            self.invite(mallory, "carol", frm, extra=(auth,)))
            mallory.send(second, self.fe)
            self.assertTrue(self.rings(self.carol, call_id, 5), "dave's call did not ring")
        finally:
            mallory.close()

    def test_04_no_relay_for_strangers(self):
        """Unauthenticated MESSAGE and OPTIONS naming a listener of ours (literal Request-URI,
        a Route, another domain, the overlay): refused, and the listener never sees a
        connection; a MESSAGE into the domain still reaches carol."""
        self.carol_registered()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)
        lp = listener.getsockname()[1]
        mallory = Phone("127.0.0.12")
        try:
            stranger = "<sip:mallory@evil.test>"
            target = "sip:x@127.0.0.1:%d;transport=tcp" % lp
            cases = [
                ("MESSAGE", target, stranger, (), 403),
                ("OPTIONS", target, stranger, (), 403),
                ("MESSAGE", "sip:alice@" + OVERLAY, stranger, (), 403),
                ("MESSAGE", "sip:carol@" + PBX, stranger,
                 ("Route: <sip:127.0.0.1:%d;transport=tcp;lr>" % lp,), 403),
                ("MESSAGE", target, "<sip:carol@%s>" % PBX, (), 407),
                ("OPTIONS", "sip:alice@" + OVERLAY, "<sip:carol@%s>" % PBX, (), 407),
            ]
            for method, ruri, frm, extra, want in cases:
                req = mallory.request(method, ruri, frm, "<%s>" % ruri.split(";")[0],
                                      extra=extra + ("Content-Type: text/plain",), body="hi")
                r = mallory.final(req, self.fe)
                self.assertIsNotNone(r, "no answer to %s %s" % (method, ruri))
                self.assertEqual(code_of(r), want, "%s %s From %s: %s" % (method, ruri, frm, r))
                say("%s %s From %s%s: %s", method, ruri, frm, " (Route to us)" if extra else "",
                    status_line(r))
            connections = 0
            end = time.monotonic() + 2
            while time.monotonic() < end:
                try:
                    c, _ = listener.accept()
                    connections += 1
                    c.close()
                except socket.timeout:
                    pass
            self.assertEqual(connections, 0, "the front end connected to the attacker's listener")
            self.sn["sn1"].wait_for("only users of %s may send through this proxy" % PBX)
            self.assertGreaterEqual(self.counters()["counters"]["relay_refused"], 4)
            msg = mallory.request("MESSAGE", "sip:carol@" + PBX, stranger,
                                  "<sip:carol@%s>" % PBX, extra=("Content-Type: text/plain",),
                                  body="hello")
            mallory.send(msg, self.fe)
            self.assertTrue(self.rings(self.carol, header(msg, "Call-ID"), 5))
        finally:
            mallory.close()
            listener.close()

    # ---- no user enumeration ----

    def test_05_existing_and_missing_users_answer_alike(self):
        """Raw requests of every method: dave (exists, no phone), erin (exists) and two names
        that do not exist get the same status line; OPTIONS for carol (registered) too."""
        self.carol_registered()
        prober = Phone("127.0.0.13")
        try:
            for method in ("OPTIONS", "REGISTER", "INVITE", "MESSAGE", "SUBSCRIBE", "INFO"):
                lines = {}
                users = ("dave", "erin", "nosuchuser", "zz9")
                if method == "OPTIONS":
                    users += ("carol",)
                for u in users:
                    uri = "sip:%s@%s" % (u, PBX)
                    ruri = "sip:" + PBX if method == "REGISTER" else uri
                    for frm in ("<sip:%s@%s>" % (u, PBX), "<sip:x@%s>" % OVERLAY):
                        if method == "REGISTER" and "x@" in frm:
                            continue
                        r = prober.final(prober.request(method, ruri, frm, "<%s>" % uri),
                                         self.fe, timeout=8)
                        self.assertIsNotNone(r, "%s %s: no answer" % (method, u))
                        lines.setdefault(frm.split("@")[1], {})[u] = status_line(r)
                for dom, by_user in lines.items():
                    say("%s, From @%s: %s", method, dom, sorted(set(by_user.values())))
                    self.assertEqual(len(set(by_user.values())), 1, (method, by_user))
            # Wrong passwords: the same answer whether the user exists or not.
            answers = set()
            for u in ("dave", "nosuchuser"):
                _, r = self.register(prober, u, pw="guess")
                answers.add(status_line(r))
            self.assertEqual(len(answers), 1, answers)
        finally:
            prober.close()

    def test_06_svwar_cannot_tell_users_apart(self):
        """svwar with a list of 30 names (carol, whose phone is registered, and dave among
        them), with OPTIONS, REGISTER and INVITE: it finds nobody, and carol's phone never
        rings (svwar's From names the user it probes: a user of the domain, so 407)."""
        names = os.path.join(self.tmp, "names")
        with open(names, "w") as f:
            f.write("\n".join(["carol", "dave"] + ["user%02d" % i for i in range(28)]) + "\n")
        host, port = self.fe.rsplit(":", 1)
        self.carol_registered()
        self.carol.drain(0.2)
        self.carol.inbox.clear()
        for i, method in enumerate(("OPTIONS", "REGISTER", "INVITE")):
            before = self.counters()["counters"]["received"]
            p = subprocess.run(["svwar", "-m", method, "-d", names, "--domain", PBX, "-p", port,
                                "-b", "127.0.0.%d" % (40 + i), "--force", "--maximumtime", "5",
                                "-t", "0.05", host],
                               capture_output=True, text=True, timeout=120)
            out = p.stdout + p.stderr
            say("svwar -m %s: %d requests received, then: %s", method,
                self.counters()["counters"]["received"] - before,
                " | ".join(l.strip() for l in out.splitlines() if l.strip())[-120:])
            for u in ("carol", "dave"):
                self.assertNotRegex(out, r"'%s' (exists|probably exists)|\|\s*%s\s*\|" % (u, u),
                                    "svwar -m %s found %s:\n%s" % (method, u, out))
            self.assertNotIn("exists", out, out)
        self.carol.drain(0.5)
        self.assertEqual(self.carol.inbox, [], "svwar reached carol's phone")

    def test_07_svcrack_is_throttled(self):
        """svcrack with 300 guesses (carol's password the 150th) from one address, then from
        two more: it never finds the password (10 failures and the address is throttled; 20
        and the user is, except from her phone's address); the front end logs the throttling;
        carol's sipp phone keeps registering meanwhile."""
        self.carol_registered()  # her phone's address is known good for her
        words = os.path.join(self.tmp, "words")
        with open(words, "w") as f:
            guesses = ["guess%03d" % i for i in range(300)]
            guesses[150] = PASSWORDS["carol"]
            f.write("\n".join(guesses) + "\n")
        host, port = self.fe.rsplit(":", 1)
        failed_before = self.counters()["counters"]["auth_failed"]
        stop = threading.Event()
        honest = []

        def phone():
            sp = free_port()
            while not stop.is_set():
                p = self.start_sipp("register_auth_200", sp, ip="127.0.0.2", target=self.fe,
                                    keys=(("user", "carol"), ("domain", PBX), ("expires", 600)),
                                    extra=("-au", "carol", "-ap", PASSWORDS["carol"],
                                           "-auth_uri", PBX))
                out, _ = p.communicate(timeout=60)
                honest.append(p.returncode)
                time.sleep(0.3)

        t = threading.Thread(target=phone, daemon=True)
        t.start()
        try:
            outs = []
            svcrack = shutil.which("svcrack")
            with open(svcrack) as f:  # the interpreter sipvicious is installed for
                python = f.readline()[2:].strip()
            t0 = time.monotonic()
            for ip in ("127.0.0.50", "127.0.0.51", "127.0.0.52"):
                p = subprocess.run([python, "-c", SV_FROM, ip,
                                    "-u", "carol", "-d", words, "--domain", PBX, "-p", port,
                                    "-t", "0.02", "--maximumtime", "2", host],
                                   capture_output=True, text=True, timeout=120)
                outs.append(p.stdout + p.stderr)
            took = time.monotonic() - t0
        finally:
            stop.set()
            t.join(timeout=90)
            type(self).carol_reg = None  # sipp's binding is now carol's latest: hers again
        out = "\n".join(outs)
        for o in outs:
            say("svcrack: %s", " | ".join(l.strip() for l in o.splitlines() if l.strip())[-200:])
        c = self.counters()["counters"]
        failed = c["auth_failed"] - failed_before
        say("svcrack x3 in %.1f s: %d failed authentications, %d throttled; honest REGISTERs "
            "meanwhile: %d, exit codes %s", took, failed, c["throttled"], len(honest),
            sorted(set(honest)))
        self.assertNotIn("The password for", out, out)
        self.assertNotIn(PASSWORDS["carol"], out)
        self.assertLessEqual(failed, 30)  # 10 per address, 20 per user (+1 each 6 s); not 300
        self.assertGreater(c["throttled"], 0)
        self.sn["sn1"].wait_for("throttled (too many failed authentications from this address")
        self.sn["sn1"].wait_for("carol@%s: 20 failed authentications: throttled (too many failed "
                                "authentications for this user" % PBX)
        self.assertTrue(honest and all(rc == 0 for rc in honest), honest)

    # ---- item 8: exhaustion ----

    def test_08_transactions_per_source_are_capped(self):
        """erin's phone takes INVITEs and never answers (each would hold a transaction for
        32 s). 130 INVITEs from one address at 40/s (under sip_rate): at most 100 (twice
        sip_rate) are let through, the rest get 503 Too Many Transactions; another address
        still reaches carol."""
        self.carol_registered()
        erin = Phone("127.0.0.3")
        mallory = Phone("127.0.0.14")
        honest = Phone("127.0.0.15")
        try:
            _, r = self.register(erin, "erin")
            self.assertEqual(code_of(r), 200, r)
            codes = {}
            for i in range(130):
                mallory.send(self.invite(mallory, "erin", "<sip:m%d@evil.test>" % i), self.fe)
                time.sleep(1 / 40)
                while True:
                    m = mallory.read(0.001)
                    if m is None:
                        break
                    if m.startswith("SIP/2.0"):
                        codes[code_of(m)] = codes.get(code_of(m), 0) + 1
            end = time.monotonic() + 2
            while time.monotonic() < end:
                m = mallory.read(0.1)
                if m and m.startswith("SIP/2.0"):
                    codes[code_of(m)] = codes.get(code_of(m), 0) + 1
            erin.drain(0.5)
            reached = {header(r, "Call-ID") for r in erin.inbox if r.startswith("INVITE")}
            st = self.counters()
            say("130 INVITEs from one address: answers %s; %d reached erin's phone; front end "
                "transactions %d, refused %d", codes, len(reached),
                st["proxy"]["transactions"], st["counters"]["txn_refused"])
            self.assertLessEqual(len(reached), 2 * SIP_RATE)
            self.assertGreaterEqual(codes.get(503, 0), 25)
            self.assertGreaterEqual(st["counters"]["txn_refused"], 25)
            self.sn["sn1"].wait_for("transactions open from this source: answered 503")
            inv = self.invite(honest, "carol", "<sip:alice@%s>" % OVERLAY)
            honest.send(inv, self.fe)
            self.assertTrue(self.rings(self.carol, header(inv, "Call-ID"), 5))
        finally:
            for p in (erin, mallory, honest):
                p.close()

    def test_09_tcp_connections_per_address_are_capped(self):
        host, port = self.fe.rsplit(":", 1)
        conns = []
        try:
            for i in range(40):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.16", 0))
                s.connect((host, int(port)))
                conns.append(s)
            time.sleep(1)
            alive = 0
            for s in conns:
                s.setblocking(False)
                try:
                    alive += s.recv(1) != b""
                except BlockingIOError:
                    alive += 1  # nothing to read, not closed: still open
                except OSError:
                    pass
            say("40 TCP connections from one address: %d kept open", alive)
            self.assertLessEqual(alive, 32)
            self.assertGreaterEqual(self.counters()["counters"]["tcp_refused"], 8)
            # Another address is served over TCP.
            s = socket.create_connection((host, int(port)), timeout=5,
                                         source_address=("127.0.0.17", 0))
            opts = ("OPTIONS sip:%s SIP/2.0\r\n"
                    "Via: SIP/2.0/TCP 127.0.0.17:5060;branch=z9hG4bKt1\r\n"
                    "From: <sip:x@%s>;tag=1\r\nTo: <sip:%s>\r\nCall-ID: tcp1\r\n"
                    "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n" % (PBX, OVERLAY, PBX))
            s.sendall(opts.encode())
            self.assertTrue(s.recv(4096).startswith(b"SIP/2.0 200"))
            s.close()
        finally:
            for s in conns:
                s.close()


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
