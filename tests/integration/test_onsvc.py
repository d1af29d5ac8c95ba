#!/usr/bin/env python3
"""Ordinary nodes and their super node (docs/protocol.md sections 1, 4.5 and 5),
as an ordinary node sees them: real super nodes in a ring of three, enrolled
at a real login server, and ordinary nodes played by Python over TLS 1.3
with their own node certificates.

1. attach: the answer names the super node, the keepalive period, the
   reflexive address and alternates; the super node counts the node.
2. nothing but attach before attaching (not-attached); a read afterwards.
3. a record stored through one attach link is read through another node.
4. a full super node (max_attached) redirects to others, which accept.
5. an ordinary node flooding its super node is rate-limited at once while
   another node of the same super node keeps its latency.
6. deliver: a message reaches a node attached to another super node.
7. probe: the super node connects back to the node's own port, and tells a
   node's own certificate from another one's and from a closed port.
8. keepalive: a silent node is dropped after 3 periods, a talking one stays.
9. garbage from an attached node closes its link and nothing else.
10. health: a super node that lost its ring tells its nodes to move and
    refuses new ones (this one kills two super nodes: it runs last).

Run: python3 tests/integration/test_onsvc.py --bindir <build dir>
Environment: P2P_TEST_WRAPPER (e.g. valgrind: longer time limits, x5),
P2P_TEST_LOG_LEVEL (the super nodes' log level, default info). When a test
fails, every daemon's log is written to <bindir>/test_onsvc-logs/.
"""

import collections
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
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
OVERLAY = "onsvc.p2psip"

SLOW = bool(harness.WRAPPER)
SCALE = 5 if SLOW else 1
START_S = 15 * SCALE         # a daemon starts / joins within this
RING_S = 30 * SCALE          # three super nodes form the exact ring within this
REQ_S = 10 * SCALE           # one request answered within this
CLOSE_S = 5 * SCALE          # a link the super node closes is closed within this
POLL_S = 0.01                # the link thread's read poll

# The overlay document.
STABILIZE_S = 1
KEEPALIVE_S = 1
# The super nodes' limits.
SN1_MAX_ATTACHED = 2
ON_RATE = 5
ON_INFLIGHT = 4

SN_USERS = ("sn1", "sn2", "sn3")
ON_USERS = ("on1", "on2", "on3", "on4", "on5", "on6", "on7")
# Ordinary nodes whose accounts keep the default super node role (any node may be promoted):
# attached, they are ordinary nodes all the same.
PROMOTABLE_ONS = ("on7",)
LOG_LEVEL = os.environ.get("P2P_TEST_LOG_LEVEL", "info")
ZERO_TID = "0000000000000000"


def note(fmt, *args):
    """Measured figures and progress, for people reading the test's output."""
    print("  [onsvc] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


free_port = harness.free_port


def record_key(rtype, name):
    return hashlib.sha1((rtype + "|" + name).encode()).hexdigest()


def new_tid():
    return "%016x" % random.getrandbits(64)


def frame(type_, kind, body=None, tid=None):
    m = {"v": 1, "overlay": OVERLAY, "type": type_, "kind": kind, "tid": tid or new_tid()}
    if body is not None:
        m["body"] = body
    return m


def encode(msg):
    payload = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(payload)) + payload


def short(hex_id):
    return hex_id[:8] if hex_id else "-"


class Node:
    """One enrolled identity (super node or ordinary node)."""

    def __init__(self, name):
        self.name = name
        self.dir = None
        self.id = None
        self.uri = None
        self.addr = None      # super nodes: overlay address
        self.cfg = None       # super nodes: configuration file
        self.daemon = None    # super nodes: the running process

    def pem(self, what):
        return os.path.join(self.dir, what + ".pem")

    def tail(self, n=30):
        if not self.daemon:
            return "    (%s not started)" % self.name
        return "\n".join("    %s| %s" % (self.name, l)
                         for l in self.daemon.log().splitlines()[-n:])

    def __repr__(self):
        return "%s[%s]" % (self.name, short(self.id))


# ---- an ordinary node's link to a super node, from Python (protocol.md 1.1-1.5, 5) ------------

class LinkClosed(Exception):
    pass


Answer = collections.namedtuple("Answer", "kind body frame latency")


class OnLink:
    """A TLS 1.3 link from an ordinary node to a super node, with the node's certificate.

    One thread owns the TLS socket: it sends what the test queues (and keepalives, when
    `keepalive` is a period in seconds), reads frames, files answers by tid and keeps every
    other frame (indications, link errors) in `inds`, in order."""

    def __init__(self, on, sn, keepalive=None, timeout=REQ_S):
        self.on, self.sn = on, sn
        self.name = "%s->%s" % (on.name, sn.name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # nodes are known by their certificates, not by DNS
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(on.pem("ca"))
        ctx.load_cert_chain(on.pem("cert"), on.pem("key"))
        host, port = sn.addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        self.local_port = self.sock.getsockname()[1]
        self._cv = threading.Condition()
        self._out = []
        self._buf = b""
        self._waiting = {}    # tid -> time sent
        self._answers = {}    # tid -> (time received, frame)
        self._ka_tids = set()
        self.inds = []        # (time, frame): every frame that answers none of our requests
        self.frames = []      # (time, frame): everything received
        self.keepalive = keepalive
        self._next_ka = time.monotonic() + (keepalive or 0)
        self.last_ka_sent = None
        self.ka_sent = self.ka_answered = 0
        self.closed_at = None
        self.close_reason = None
        self.send_error = None
        self._stop = False
        self.sock.settimeout(POLL_S)
        self.send_raw(encode(frame("hello", "ind", {"agent": "test_onsvc"})))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        first = self.next_ind(timeout)
        if first is None:
            raise AssertionError("%s: no hello from the super node within %.0f s (closed: %s)"
                                 % (self.name, timeout, self.close_reason))
        if first.get("type") != "hello" or first.get("kind") != "ind":
            raise AssertionError("%s: the first frame is not a hello: %r" % (self.name, first))
        self.peer_hello = first

    # -- the I/O thread --

    def _run(self):
        while True:
            with self._cv:
                if self._stop:
                    return
                out, self._out = self._out, []
                now = time.monotonic()
                if self.keepalive and now >= self._next_ka and self.send_error is None:
                    f = frame("keepalive", "req", {})
                    self._ka_tids.add(f["tid"])
                    out.append(encode(f))
                    self.last_ka_sent = now
                    self.ka_sent += 1
                    self._next_ka = now + self.keepalive
            if out and self.send_error is None:
                try:
                    self.sock.settimeout(10)
                    self.sock.sendall(b"".join(out))
                except (OSError, ssl.SSLError) as e:
                    with self._cv:
                        self.send_error = repr(e)  # keep reading what the node sent before
                finally:
                    try:
                        self.sock.settimeout(POLL_S)
                    except OSError:
                        pass
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError, ValueError) as e:
                self._closed("recv: %r" % e)
                return
            if not data:
                self._closed("end of stream")
                return
            self._buf += data
            self._parse()

    def _closed(self, why):
        # Like a real node, close our side at once: the super node lingers until we do.
        try:
            self.sock.close()
        except OSError:
            pass
        with self._cv:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.close_reason = why
            self._cv.notify_all()

    def _parse(self):
        while len(self._buf) >= 4:
            n = struct.unpack(">I", self._buf[:4])[0]
            if len(self._buf) < 4 + n:
                return
            payload, self._buf = self._buf[4:4 + n], self._buf[4 + n:]
            try:
                f = json.loads(payload)
            except ValueError:
                f = {"_not_json": payload[:200].decode(errors="replace")}
            now = time.monotonic()
            with self._cv:
                self.frames.append((now, f))
                tid = f.get("tid") if isinstance(f, dict) else None
                if tid in self._waiting and f.get("kind") in ("res", "err"):
                    self._answers[tid] = (now, f)
                elif tid in self._ka_tids and f.get("kind") in ("res", "err"):
                    self._ka_tids.discard(tid)
                    if f.get("kind") == "res":
                        self.ka_answered += 1
                    else:
                        self.inds.append((now, f))  # a refused keepalive: the test wants to see it
                else:
                    self.inds.append((now, f))
                self._cv.notify_all()

    # -- for the test --

    def send_raw(self, data):
        with self._cv:
            self._out.append(data)

    def send_reqs(self, reqs):
        """Queues requests [(type, body)] to go out in one write; returns their tids."""
        tids = []
        with self._cv:
            now = time.monotonic()
            for type_, body in reqs:
                f = frame(type_, "req", body)
                self._waiting[f["tid"]] = now
                self._out.append(encode(f))
                tids.append(f["tid"])
        return tids

    def answer(self, tid, timeout=REQ_S):
        """The answer to request `tid`: Answer(kind, body, frame, latency in s)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while tid not in self._answers:
                left = deadline - time.monotonic()
                if self.closed_at is not None:
                    raise LinkClosed("%s: closed before answering (%s); last frames: %r"
                                     % (self.name, self.close_reason,
                                        [f for _, f in self.frames[-5:]]))
                if left <= 0:
                    raise AssertionError("%s: no answer to %s within %.1f s"
                                         % (self.name, tid, timeout))
                self._cv.wait(min(left, 0.1))
            t, f = self._answers.pop(tid)
            sent = self._waiting.pop(tid)
        body = f.get("body") or {}
        return Answer(f.get("kind"), body, f, t - sent)

    def request(self, type_, body, timeout=REQ_S):
        return self.answer(self.send_reqs([(type_, body)])[0], timeout)

    def next_ind(self, timeout, match=None):
        """Removes and returns the first kept frame that `match`es (any when None), waiting up
        to `timeout` s; None when there is none (also when the link closed without one)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, (_, f) in enumerate(self.inds):
                    if match is None or match(f):
                        del self.inds[i]
                        return f
                left = deadline - time.monotonic()
                if left <= 0 or self.closed_at is not None:
                    return None
                self._cv.wait(min(left, 0.1))

    def wait_closed(self, timeout):
        """True once the super node has closed the link (within `timeout` s)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.closed_at is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def set_keepalive(self, period):
        with self._cv:
            self.keepalive = period
            self._next_ka = time.monotonic()

    @property
    def is_open(self):
        return self.closed_at is None

    def close(self):
        with self._cv:
            self._stop = True
        self._thread.join(timeout=2)
        try:
            self.sock.close()
        except OSError:
            pass


# ---- an ordinary node's own listener, for probes (protocol.md 5.5) --------------------------

class ProbeListener:
    """A TLS 1.3 server on 127.0.0.1 with `node`'s certificate, requiring a client certificate
    from the overlay CA, that speaks just enough of the protocol: hello, and `ping` answered
    with `node_id` (the Node-ID it claims: `node.id`)."""

    def __init__(self, node):
        self.node = node
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(node.pem("ca"))
        ctx.load_cert_chain(node.pem("cert"), node.pem("key"))
        self.ctx = ctx
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.events = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _event(self, *e):
        with self._lock:
            self.events.append(e)

    def _run(self):
        while not self._stop:
            try:
                conn, peer = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_exact(s, n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise LinkClosed("end of stream")
            buf += chunk
        return buf

    def _serve(self, conn):
        conn.settimeout(10 * SCALE)
        try:
            s = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self._event("handshake-failed", repr(e))
            conn.close()
            return
        self._event("connected")
        try:
            first = True
            while True:
                n = struct.unpack(">I", self._read_exact(s, 4))[0]
                f = json.loads(self._read_exact(s, n))
                if first:
                    first = False
                    ok = f.get("type") == "hello" and f.get("kind") == "ind"
                    self._event("hello" if ok else "bad-first-frame", f)
                    s.sendall(encode(frame("hello", "ind", {"agent": "test_onsvc-probe"})))
                    continue
                if f.get("type") == "ping" and f.get("kind") == "req":
                    self._event("ping", f)
                    s.sendall(encode(frame("ping", "res", {"node_id": self.node.id}, f["tid"])))
                else:
                    self._event("other", f)
        except (LinkClosed, OSError, ssl.SSLError, ValueError) as e:
            self._event("closed", repr(e))
        finally:
            try:
                s.close()
            except OSError:
                pass

    def kinds(self):
        with self._lock:
            return [e[0] for e in self.events]

    def close(self):
        self._stop = True
        try:
            self.lsock.close()
        except OSError:
            pass
        self._thread.join(timeout=2)


# ---- the scenario ------------------------------------------------------------------------------

def _find_counts(obj, path=""):
    """Integer members whose name mentions `attach` anywhere in a status document."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = path + "." + k if path else k
            if "attach" in k and isinstance(v, int) and not isinstance(v, bool):
                found.append((p, v))
            found += _find_counts(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _find_counts(v, "%s[%d]" % (path, i))
    return found


class OrdinaryNodes(unittest.TestCase):
    failed = False
    reported = set()

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-onsvc-")
        cls.daemons = []
        cls.links = []
        cls.listeners = []
        cls.sn = {}
        cls.on = {}
        cls.att = {}      # ordinary node name -> its current attach link
        cls.t_class = time.monotonic()
        try:
            cls._set_up()
        except BaseException:
            cls.failed = True
            try:
                cls.tearDownClass()
            except AssertionError:
                pass  # the first failure is the one to report
            raise

    @classmethod
    def _set_up(cls):
        ls_port = free_port()
        cls.ls_cfg = os.path.join(cls.tmp, "ls.json")
        with open(cls.ls_cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % ls_port,
                       "state_dir": os.path.join(cls.tmp, "ls-state"), "pbkdf2_iterations": 1000,
                       "stabilize_s": STABILIZE_S, "keepalive_s": KEEPALIVE_S}, f)
        rc, out, err = cls.ls("init")
        assert rc == 0, "loginserver init: %s" % err
        pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        for user in SN_USERS + ON_USERS:
            extra = ["--no-supernode"] if user in ON_USERS and user not in PROMOTABLE_ONS else []
            rc, _, err = cls.ls("user", "add", user, *extra, stdin=user + "-password\n")
            assert rc == 0, "user add %s: %s" % (user, err)
        ls = harness.Daemon([cls.bin("loginserver"), "-d", "-c", cls.ls_cfg])
        cls.daemons.append(ls)
        ls.wait_for("serving on", START_S)
        url = "https://127.0.0.1:%d" % ls_port

        def enroll(user):
            n = Node(user)
            n.dir = os.path.join(cls.tmp, user)
            # Only the daemons run under the wrapper (the commands have scenarios of their own).
            p = subprocess.run([cls.bin("supernode"), "-o", "state_dir=" + n.dir,
                                                  "-o", "overlay=" + OVERLAY, "enroll",
                                                  "--login", url, "--pin", pin, "--user", user],
                               input=user + "-password\n", capture_output=True, text=True,
                               timeout=60 * SCALE)
            assert p.returncode == 0, "enroll %s: %s%s" % (user, p.stdout, p.stderr)
            m = re.search(r"enrolled: (\S+) \(node-id ([0-9a-f]{40}), roles ([a-z,]+)\)", p.stdout)
            assert m, "enroll %s: unexpected output %r" % (user, p.stdout)
            n.uri, n.id = m.group(1), m.group(2)
            want = ("node" if user in ON_USERS and user not in PROMOTABLE_ONS
                    else "supernode")
            assert (m.group(3) == "node") == (want == "node") and want in m.group(3), \
                "%s: roles %s" % (user, m.group(3))
            return n

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            nodes = list(pool.map(enroll, SN_USERS + ON_USERS))
        for n in nodes:
            (cls.on if n.name in ON_USERS else cls.sn)[n.name] = n
        assert len({n.id for n in nodes}) == len(nodes), "two nodes with one Node-ID"
        cls.by_id = {n.id: n for n in nodes}
        note("login server up, %d users enrolled in %.1f s", len(nodes), time.monotonic() - t0)

        # The ring: sn1 starts it (and takes at most 2 ordinary nodes), sn2 and sn3 join.
        t0 = time.monotonic()
        for name in SN_USERS:
            sn = cls.sn[name]
            sn.addr = "127.0.0.1:%d" % free_port()
            sn.cfg = os.path.join(cls.tmp, name + ".json")
            cfg = {"overlay": OVERLAY, "listen": sn.addr, "state_dir": sn.dir,
                   "log_level": LOG_LEVEL, "on_rate": ON_RATE, "on_inflight": ON_INFLIGHT}
            if name == "sn1":
                cfg["seed"] = True
                cfg["max_attached"] = SN1_MAX_ATTACHED
            else:
                cfg["join"] = [cls.sn["sn1"].addr]
            with open(sn.cfg, "w") as f:
                json.dump(cfg, f)
            sn.daemon = harness.Daemon([cls.bin("supernode"), "-d", "-c", sn.cfg])
            cls.daemons.append(sn.daemon)
            if name == "sn1":
                sn.daemon.wait_for("started a new ring", START_S)
        for name in ("sn2", "sn3"):
            cls.sn[name].daemon.wait_for("joined the ring", START_S)
        deadline = time.monotonic() + RING_S
        while not cls.ring_complete():
            if time.monotonic() > deadline:
                raise AssertionError("no complete ring of three within %d s: %r\n%s"
                                     % (RING_S, {n: cls.status(n) for n in SN_USERS},
                                        "\n".join(cls.sn[n].tail() for n in SN_USERS)))
            time.sleep(0.2)
        note("ring of three complete %.1f s after the first start (%s)", time.monotonic() - t0,
             ", ".join(repr(cls.sn[n]) for n in SN_USERS))

    @classmethod
    def tearDownClass(cls):
        problems = []
        for link in cls.links:
            link.close()
        for lst in cls.listeners:
            lst.close()
        for d in cls.daemons:
            if d.proc.poll() is None:
                try:
                    d.proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        for d in reversed(cls.daemons):
            if d.proc.poll() is not None and d.proc.returncode == -signal.SIGKILL:
                continue  # killed on purpose (test 10)
            try:
                rc = d.stop(timeout=15 * SCALE)
                if rc != 0:
                    note("%s %s exited with status %s at the end", d.argv[0], d.argv[-1], rc)
            except AssertionError as e:
                problems.append(str(e))
        if cls.failed and BINDIR:
            out = os.path.join(BINDIR, "test_onsvc-logs")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out, exist_ok=True)
            for sn in cls.sn.values():
                if sn.daemon:
                    with open(os.path.join(out, sn.name + ".log"), "w") as f:
                        f.write(sn.daemon.log() + "\n")
            if cls.daemons:
                with open(os.path.join(out, "loginserver.log"), "w") as f:
                    f.write(cls.daemons[0].log() + "\n")
            note("daemon logs written to %s", out)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        note("whole run: %.1f s", time.monotonic() - cls.t_class)
        if problems:
            raise AssertionError("; ".join(problems))

    def run(self, result=None):
        before = len(result.failures) + len(result.errors) if result else 0
        out = super().run(result)
        if result and len(result.failures) + len(result.errors) > before:
            type(self).failed = True
        return out

    # ---- processes -------------------------------------------------------------------------

    @staticmethod
    def bin(name):
        if name == "dhtctl":
            return os.path.join(BINDIR, "supernode", "dhtctl")
        return os.path.join(BINDIR, name, name)

    @classmethod
    def ls(cls, *args, stdin=None):
        argv = [cls.bin("loginserver"), "-c", cls.ls_cfg] + list(args)
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                           timeout=60 * SCALE)
        return p.returncode, p.stdout, p.stderr

    @classmethod
    def status(cls, name):
        """`supernode -c CFG status --json` of a super node: the document, or None."""
        p = subprocess.run([cls.bin("supernode"), "-c", cls.sn[name].cfg, "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            return None
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    @classmethod
    def ring_complete(cls):
        ids = sorted(cls.sn[n].id for n in SN_USERS)
        for name in SN_USERS:
            st = cls.status(name)
            if not st or st.get("state") != "member" or not st.get("succ") or not st.get("pred"):
                return False
            i = ids.index(cls.sn[name].id)
            if st["succ"][0]["id"] != ids[(i + 1) % 3] or st["pred"]["id"] != ids[i - 1]:
                return False
        return True

    def attached(self, name):
        """The number of ordinary nodes `status --json` says are attached to super node `name`:
        its top-level "attached"; failing that, another integer member about attachment
        (reported once)."""
        st = self.status(name)
        self.assertIsNotNone(st, "%s: status --json failed" % name)
        if isinstance(st.get("attached"), int) and not isinstance(st.get("attached"), bool):
            return st["attached"]
        found = _find_counts(st)
        key = ("attached", name)
        if key not in self.reported:
            self.reported.add(key)
            note("NOTE: %s status --json has no top-level \"attached\"; members about attachment: "
                 "%r; top-level keys: %s", name, found, sorted(st))
        if not found:
            self.fail("%s: status --json shows no count of attached ordinary nodes (no "
                      "\"attached\" at any level); keys: %s" % (name, sorted(st)))
        return found[0][1]

    def wait_attached(self, name, want, timeout):
        """Polls `attached` of super node `name` until it is `want` (for up to `timeout` s);
        returns the last value seen."""
        t0 = time.monotonic()
        while True:
            n = self.attached(name)
            if n == want or time.monotonic() - t0 > timeout:
                note("%s attached: %d, %.2f s after asking", name, n, time.monotonic() - t0)
                return n
            time.sleep(0.05)

    def healthy(self, name):
        """`healthy` from status --json; None when it is not there (reported once)."""
        st = self.status(name) or {}
        if "healthy" not in st:
            if ("healthy", name) not in self.reported:
                self.reported.add(("healthy", name))
                note("NOTE: %s status --json has no \"healthy\"; keys: %s", name, sorted(st))
            return None
        return st["healthy"]

    # ---- links -----------------------------------------------------------------------------

    def link(self, on, sn, keepalive=None):
        l = OnLink(self.on[on], self.sn[sn], keepalive=keepalive)
        type(self).links.append(l)
        return l

    def attach(self, on, sn, keepalive=KEEPALIVE_S / 2, body=None):
        """A new link from `on` to `sn` and an attach over it: (link, answer). A successful
        attach becomes `on`'s current link (att[on])."""
        l = self.link(on, sn, keepalive=None)
        a = l.request("attach", body if body is not None else {})
        if a.kind == "res":
            type(self).att[on] = l
            if keepalive:
                l.set_keepalive(keepalive)
        return l, a

    def need(self, *names):
        for on in names:
            l = type(self).att.get(on)
            if l is None or not l.is_open:
                self.skipTest("%s has no attach link (an earlier test failed)" % on)
        return [type(self).att[on] for on in names]

    def sn_of(self, peer):
        n = self.by_id.get((peer or {}).get("id"))
        return n.name if n else "?%s" % short((peer or {}).get("id"))

    def assert_err(self, a, code, what):
        self.assertEqual((a.kind, a.body.get("code")), ("err", code),
                         "%s: expected err %s, got %r" % (what, code, a.frame))
        self.assertTrue(a.body.get("reason"), "%s: err without a reason: %r" % (what, a.frame))

    def assert_res(self, a, what):
        self.assertEqual(a.kind, "res", "%s: expected res, got %r" % (what, a.frame))

    def assert_alternates(self, alts, exclude, what):
        self.assertIsInstance(alts, list, "%s: alternates is not a list: %r" % (what, alts))
        self.assertTrue(alts, "%s: no alternates" % what)
        for p in alts:
            n = self.by_id.get(p.get("id"))
            self.assertIsNotNone(n, "%s: alternate %r is no super node of ours" % (what, p))
            self.assertIn(n.name, SN_USERS, "%s: alternate %r is not a super node" % (what, p))
            self.assertNotEqual(n.name, exclude, "%s: the super node offers itself: %r"
                                % (what, alts))
            self.assertEqual(p.get("addr"), n.addr, "%s: alternate %s with address %r"
                             % (what, n.name, p.get("addr")))

    # ---- 1. attach -------------------------------------------------------------------------

    def test_1_attach(self):
        sn2 = self.sn["sn2"]
        l, a = self.attach("on1", "sn2")
        self.assert_res(a, "on1 attach to sn2")
        note("on1 attached to sn2: %s", json.dumps(a.body))
        self.assertEqual(a.body.get("node"), {"id": sn2.id, "addr": sn2.addr}, a.body)
        self.assertEqual(a.body.get("keepalive_s"), KEEPALIVE_S, a.body)
        self.assertEqual(a.body.get("reflexive"), "127.0.0.1:%d" % l.local_port, a.body)
        self.assert_alternates(a.body.get("alternates"), "sn2", "attach to sn2")
        note("alternates offered by sn2: %s",
             [self.sn_of(p) for p in a.body.get("alternates")])
        self.assertEqual(self.attached("sn2"), 1)
        self.assertIs(self.healthy("sn2"), True, "sn2 status --json: healthy")

    # ---- 2. nothing before attach ------------------------------------------------------------

    def test_2_not_attached(self):
        l = self.link("on2", "sn3")
        key = "%040x" % random.getrandbits(160)
        a = l.request("get", {"key": key})
        self.assert_err(a, "not-attached", "get before attach")
        self.assertTrue(l.is_open, "the link closed after not-attached")
        a = l.request("attach", {})
        self.assert_res(a, "on2 attach to sn3")
        type(self).att["on2"] = l
        l.set_keepalive(KEEPALIVE_S / 2)
        a = l.request("get", {"key": key})
        self.assert_res(a, "get after attach")
        self.assertEqual(a.body.get("records"), [], a.body)
        note("get of an empty key after attach: %s (%.1f ms)", json.dumps(a.body),
             a.latency * 1000)

    # ---- 3. records through the attach link ------------------------------------------------

    def test_3_records(self):
        l1, l2 = self.need("on1", "on2")
        on1 = self.on["on1"]
        rc, out, err = harness.run([self.bin("dhtctl"), "--state", on1.dir, "sign", "--type",
                                    "note", "--name", "n1", "--value", '{"x":1}'],
                                   timeout=60 * SCALE)
        self.assertEqual(rc, 0, "dhtctl sign: %s" % err)
        env = json.loads(out.strip().splitlines()[-1])
        a = l1.request("store", {"mode": "update", "record": env})
        self.assert_res(a, "on1 store through sn2")
        self.assertIsInstance(a.body.get("hops"), int, a.body)
        note("store n1 through on1's link: %s (%.1f ms)", json.dumps(a.body), a.latency * 1000)
        key = record_key("note", "n1")
        a = l2.request("get", {"key": key})
        self.assert_res(a, "on2 get through sn3")
        recs = a.body.get("records")
        self.assertIsInstance(recs, list, a.body)
        self.assertEqual(len(recs), 1, a.body)
        signed = json.loads(recs[0]["signed"])
        self.assertEqual(signed.get("owner"), "sip:on1@" + OVERLAY, signed)
        self.assertEqual(signed.get("owner"), on1.uri, signed)
        self.assertEqual((signed.get("key"), signed.get("value")), (key, {"x": 1}), signed)
        self.assertEqual(recs[0], env, "the record read is not the one stored")
        note("on2 read n1 (owner %s) in %d hops", signed["owner"], a.body.get("hops"))

    # ---- 4. a full super node redirects ------------------------------------------------------

    def test_4_redirect(self):
        for on in ("on3", "on4"):
            _, a = self.attach(on, "sn1")
            self.assert_res(a, "%s attach to sn1" % on)
        l5, a = self.attach("on5", "sn1")
        self.assert_err(a, "redirect", "on5 attach to sn1 (max_attached %d)" % SN1_MAX_ATTACHED)
        alts = a.body.get("alternates")
        self.assert_alternates(alts, "sn1", "redirect from sn1")
        note("sn1 full: redirect %r, alternates %s", a.body.get("reason"),
             [self.sn_of(p) for p in alts])
        l5.close()
        first = self.by_id[alts[0]["id"]].name
        _, a = self.attach("on5", first)
        self.assert_res(a, "on5 attach to the first alternate, %s" % first)
        self.assertEqual(a.body.get("node", {}).get("id"), self.sn[first].id, a.body)
        self.assertEqual(self.attached("sn1"), SN1_MAX_ATTACHED)

    # ---- 5. fairness -----------------------------------------------------------------------

    def test_5_rate_limit(self):
        (l2,) = self.need("on2")
        l6, a = self.attach("on6", "sn3")
        self.assert_res(a, "on6 attach to sn3")
        key = record_key("note", "n1")
        polite = []
        stop = threading.Event()
        problems = []

        def poller():
            # on2: one get every 200 ms for 2 s, each waited for.
            t_next = time.monotonic()
            for _ in range(10):
                try:
                    polite.append(l2.request("get", {"key": key}))
                except (AssertionError, LinkClosed) as e:
                    problems.append(repr(e))
                    return
                t_next += 0.2
                time.sleep(max(0.0, t_next - time.monotonic()))
            stop.set()

        th = threading.Thread(target=poller)
        th.start()
        time.sleep(0.1)
        # on6: 40 gets back-to-back in one write, without waiting, and again every 0.5 s
        # while on2 polls.
        bursts = []
        while True:
            tids = l6.send_reqs([("get", {"key": "%040x" % random.getrandbits(160)})
                                 for _ in range(40)])
            bursts.append([l6.answer(t, REQ_S) for t in tids])
            if stop.wait(0.5) or not th.is_alive():
                break
        th.join()
        self.assertEqual(problems, [], "on2's polling failed")

        figures = []
        for i, answers in enumerate(bursts):
            res = [x for x in answers if x.kind == "res"]
            limited = [x for x in answers
                       if x.kind == "err" and x.body.get("code") == "rate-limited"]
            other = [x.frame for x in answers if x not in res and x not in limited]
            self.assertEqual(other, [], "burst %d: answers neither res nor rate-limited" % i)
            for x in limited:
                self.assertRegex(x.body.get("reason", ""), "requests per second|in progress",
                                 x.frame)
            figures.append("%d res/%d rate-limited" % (len(res), len(limited)))
            if i == 0:
                self.assertTrue(res, "burst 0: no get answered res")
                self.assertTrue(limited, "burst 0: no get rate-limited (on_rate %d, on_inflight %d)"
                                % (ON_RATE, ON_INFLIGHT))
                reasons = collections.Counter(x.body.get("reason") for x in limited)
                note("on6 burst of 40 pipelined gets: %d res, %d rate-limited (%s)", len(res),
                     len(limited), dict(reasons))
        note("on6 bursts: %s", ", ".join(figures))
        lat = [x.latency for x in polite]
        kinds = [(x.kind, x.body.get("code")) for x in polite]
        note("on2 meanwhile: %d gets, latency max %.1f ms, median %.1f ms", len(lat),
             max(lat) * 1000, statistics.median(lat) * 1000)
        self.assertEqual(kinds, [("res", None)] * 10, "on2's gets were not all answered res")
        self.assertLess(max(lat), 0.25 * SCALE, "on2's latency: %s ms"
                        % ["%.0f" % (x * 1000) for x in lat])

        # A node whose certificate also has the super node role is limited the same way once
        # attached: the role says it may be promoted, not that it is part of the ring.
        l7, a = self.attach("on7", "sn3")
        self.assert_res(a, "on7 (super node role) attach to sn3")
        tids = l7.send_reqs([("get", {"key": "%040x" % random.getrandbits(160)})
                             for _ in range(3 * ON_RATE)])
        answers = [l7.answer(t, REQ_S) for t in tids]
        limited = [x for x in answers if x.kind == "err" and x.body.get("code") == "rate-limited"]
        note("on7 (roles node,supernode) burst of %d gets: %d rate-limited", len(answers),
             len(limited))
        self.assertTrue(limited, "an attached node with the super node role was not rate-limited")

    # ---- 6. deliver ------------------------------------------------------------------------

    def test_6_deliver(self):
        l1, l2 = self.need("on1", "on2")
        on1, on2, on4, sn3 = self.on["on1"], self.on["on2"], self.on["on4"], self.sn["sn3"]
        a = l1.request("deliver", {"to": on2.id, "sn": sn3.id, "payload": {"hello": "on2"}})
        self.assert_res(a, "deliver from on1 (sn2) to on2 (sn3)")
        if a.body != {}:
            note("NOTE: the deliver res body is %s, protocol.md 5.4 says {}", json.dumps(a.body))
        ind = l2.next_ind(REQ_S, lambda f: f.get("type") == "deliver")
        self.assertIsNotNone(ind, "on2 received no deliver indication; its frames: %r"
                             % [f for _, f in l2.frames[-5:]])
        self.assertEqual(ind.get("kind"), "ind", ind)
        self.assertEqual((ind.get("body") or {}).get("from"), on1.id, ind)
        self.assertEqual((ind.get("body") or {}).get("payload"), {"hello": "on2"}, ind)
        note("deliver on1 -> on2 answered in %.1f ms: %s", a.latency * 1000, json.dumps(ind))
        # on4 is attached to sn1, not sn3; and a Node-ID nobody has.
        for to, what in ((on4.id, "on4 (attached at sn1)"),
                         ("%040x" % random.getrandbits(160), "a Node-ID of nobody")):
            a = l1.request("deliver", {"to": to, "sn": sn3.id, "payload": {"hello": "x"}})
            self.assert_err(a, "not-attached", "deliver to %s via sn3" % what)
            note("deliver to %s via sn3: err %s (%s)", what, a.body.get("code"),
                 a.body.get("reason"))
        self.assertIsNone(l2.next_ind(0.2, lambda f: f.get("type") == "deliver"),
                          "on2 got a deliver that was not for it")

    # ---- 7. probe --------------------------------------------------------------------------

    def test_7_probe(self):
        (l3,) = self.need("on3")
        own = ProbeListener(self.on["on3"])
        other = ProbeListener(self.on["on4"])
        type(self).listeners += [own, other]
        a = l3.request("probe", {"listen": own.addr})
        self.assert_res(a, "probe of on3's own listener")
        note("probe of on3's listener %s: %s (%.1f ms); listener saw %s", own.addr,
             json.dumps(a.body), a.latency * 1000, own.kinds())
        self.assertEqual(a.body.get("reachable"), True, a.body)
        self.assertEqual(a.body.get("addr"), own.addr, a.body)
        self.assertIn("ping", own.kinds(), "the super node never pinged the listener")

        closed = "127.0.0.1:%d" % free_port()
        a = l3.request("probe", {"listen": closed})
        self.assert_res(a, "probe of a closed port")
        note("probe of a closed port %s: %s", closed, json.dumps(a.body))
        self.assertEqual(a.body.get("reachable"), False, a.body)
        self.assertTrue(a.body.get("reason"), a.body)

        a = l3.request("probe", {"listen": other.addr})
        self.assert_res(a, "probe of a listener with on4's certificate")
        note("probe of a listener with on4's certificate: %s; listener saw %s",
             json.dumps(a.body), other.kinds())
        self.assertEqual(a.body.get("reachable"), False, a.body)
        self.assertTrue(a.body.get("reason"), a.body)
        self.assertNotIn("ping", other.kinds(), "the super node pinged the wrong node")
        a = l3.request("probe", {"listen": own.addr})
        self.assertGreater(a.body.get("kbps", 0), 0, a.body)  # the padded ping's figure

        # Only back to where the request came from: never a third party's address.
        a = l3.request("probe", {"listen": "127.0.0.2:%d" % free_port()})
        self.assertEqual(a.kind, "err", a.body)
        self.assertEqual(a.body.get("code"), "forbidden", a.body)
        note("probe of another host: %s", json.dumps(a.body))

    # ---- 8. keepalives ---------------------------------------------------------------------

    def test_8_keepalive(self):
        l3, l4 = self.need("on3", "on4")
        before = self.attached("sn1")
        self.assertEqual(before, 2, "sn1 should have on3 and on4")
        # on4 falls silent; on3 goes on sending keepalives every 0.5 s.
        l4.set_keepalive(None)
        time.sleep(0.05)
        t_silent = l4.last_ka_sent or time.monotonic()
        if not l4.wait_closed(3 * KEEPALIVE_S + 1.5 + CLOSE_S):
            self.fail("on4 silent for %.1f s and still attached to sn1 (keepalive_s %d)"
                      % (time.monotonic() - t_silent, KEEPALIVE_S))
        after = l4.closed_at - t_silent
        frames = [f for t, f in l4.frames if t >= t_silent]
        note("on4 silent: sn1 closed its link %.2f s after its last keepalive (%s); frames: %s",
             after, l4.close_reason, json.dumps(frames))
        self.assertGreaterEqual(after, 3 * KEEPALIVE_S - 0.2, "dropped too early")
        for f in frames:
            if f.get("kind") == "err":
                self.assertEqual((f.get("body") or {}).get("code"), "timeout", f)
            else:
                self.assertEqual(f.get("type"), "keepalive", "unexpected frame: %r" % f)
        # on3 talked all along: still attached, and served.
        self.assertTrue(l3.is_open, "on3 sent keepalives and was dropped too (%s)"
                        % l3.close_reason)
        note("on3: %d keepalives sent, %d answered", l3.ka_sent, l3.ka_answered)
        self.assertGreater(l3.ka_answered, 0)
        a = l3.request("get", {"key": record_key("note", "n1")})
        self.assert_res(a, "on3's get after on4 was dropped")
        self.assertEqual(self.attached("sn1"), before - 1)

    # ---- 9. garbage from an attached node ----------------------------------------------------

    def test_9_garbage(self):
        l6, l2 = self.need("on6", "on2")
        before = self.attached("sn3")
        l6.set_keepalive(None)
        time.sleep(0.1)
        n_before = len(l6.frames)
        time.sleep(0.2)  # answers to the last keepalives
        l6.send_raw(struct.pack(">I", 9) + b"{not json")
        self.assertTrue(l6.wait_closed(CLOSE_S), "sn3 kept the link open after invalid JSON")
        frames = [f for _, f in l6.frames[n_before:] if f.get("type") != "keepalive"]
        note("invalid JSON from on6: %s, then the link closed (%s)", json.dumps(frames),
             l6.close_reason)
        self.assertEqual([(f.get("kind"), (f.get("body") or {}).get("code")) for f in frames],
                         [("err", "invalid-json")], frames)
        self.assertEqual(frames[0].get("tid"), ZERO_TID, frames[0])
        a = l2.request("get", {"key": record_key("note", "n1")})
        self.assert_res(a, "on2's get at sn3 after on6's garbage")
        self.assertEqual(len(a.body.get("records") or []), 1, a.body)
        self.assertIsNone(self.sn["sn3"].daemon.proc.poll(), "sn3 exited")
        self.assertEqual(self.wait_attached("sn3", before - 1, 1.0 * SCALE), before - 1,
                         "sn3 still counts on6 as attached after closing its link")

    # ---- 10. health: a super node without a ring ---------------------------------------------

    def test_10_health_and_move(self):
        (l3,) = self.need("on3")
        self.assertIs(self.healthy("sn1"), True, "sn1 not healthy before the test")
        t0 = time.monotonic()
        for name in ("sn2", "sn3"):
            self.sn[name].daemon.proc.kill()
        for name in ("sn2", "sn3"):
            self.sn[name].daemon.proc.wait(timeout=10)
        move = l3.next_ind(12 * SCALE, lambda f: f.get("type") == "move")
        dt = time.monotonic() - t0
        self.assertIsNotNone(move, "on3 (attached to sn1) got no move within %.0f s of killing "
                             "sn2 and sn3; link %s; sn1's log:\n%s"
                             % (dt, "open" if l3.is_open else "closed: %s" % l3.close_reason,
                                self.sn["sn1"].tail()))
        note("on3 told to move %.1f s after sn2 and sn3 died: %s", dt, json.dumps(move))
        self.assertEqual(move.get("kind"), "ind", move)
        self.assertTrue((move.get("body") or {}).get("reason"), move)
        self.assertIsInstance((move.get("body") or {}).get("alternates"), list, move)
        self.assertLess(dt, 10 * SCALE + 2, "move arrived late")
        self.assertIs(self.healthy("sn1"), False,
                      "sn1 status --json: healthy after losing its ring")
        _, a = self.attach("on4", "sn1")
        self.assert_err(a, "unavailable", "on4 attach to sn1 without a ring")
        self.assertIsInstance(a.body.get("alternates"), list, a.body)
        note("a new attach to sn1: err %s (%s), alternates %s", a.body.get("code"),
             a.body.get("reason"), a.body.get("alternates"))
        self.assertIsNone(self.sn["sn1"].daemon.proc.poll(), "sn1 exited")


def load_tests(loader, tests, pattern):
    """test_1 .. test_10 in numeric order (test_10 kills super nodes: it must be last)."""
    names = [n for n in dir(OrdinaryNodes) if n.startswith("test_")]
    names.sort(key=lambda n: int(n.split("_")[1]))
    return unittest.TestSuite(OrdinaryNodes(n) for n in names)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
