#!/usr/bin/env python3
"""Many ordinary nodes on real super nodes (bench/on_load: one TLS link and one
identity per simulated node, minted by the CA): they all attach and store and
read their own signed records; with a small maximum on one super node the
extra ones are redirected and all end up attached; a node with a certificate
from another CA, and garbage on the link, are refused while the rest keep
going."""

import json
import os
import re
import shutil
import socket
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
OVERLAY = "many.p2psip"
SLOW = bool(harness.WRAPPER)
N_ONS = 60 if SLOW else 400   # simulated ordinary nodes
SMALL_MAX = 20 if SLOW else 150  # max_attached of sn1 in the redirect test
WAIT = 120 if SLOW else 30


free_port = harness.free_port


def wait_until(what, fn, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError("timed out after %.0f s waiting for %s (last: %r)" % (timeout, what, last))


class ManyOrdinaryNodes(unittest.TestCase):
    daemons = []

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-many-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _set_up(cls):
        state = os.path.join(cls.tmp, "ls")
        cfg = os.path.join(cls.tmp, "ls.json")
        with open(cfg, "w") as f:
            json.dump({"overlay": OVERLAY, "listen": "127.0.0.1:%d" % free_port(),
                       "state_dir": state, "pbkdf2_iterations": 1000, "stabilize_s": 1,
                       "keepalive_s": 5}, f)
        ls = [cls.bin("loginserver"), "-c", cfg]
        subprocess.run(ls + ["init"], capture_output=True, text=True, check=True)
        # Identities minted by the CA: super nodes, and one per simulated ordinary node.
        cls.nodes = os.path.join(cls.tmp, "nodes")
        subprocess.run(ls + ["issue", "--node", "sn", "--count", "2", "--out", cls.nodes],
                       capture_output=True, text=True, check=True)
        cls.ons = os.path.join(cls.tmp, "ons")
        subprocess.run(ls + ["issue", "--node", "on", "--count", str(N_ONS), "--no-supernode",
                             "--out", cls.ons], capture_output=True, text=True, check=True)
        # Another overlay's CA and a node certificate from it.
        cfg2 = os.path.join(cls.tmp, "rogue.json")
        with open(cfg2, "w") as f:
            json.dump({"overlay": OVERLAY, "state_dir": os.path.join(cls.tmp, "rogue-ls"),
                       "pbkdf2_iterations": 1000}, f)
        rogue = [cls.bin("loginserver"), "-c", cfg2]
        subprocess.run(rogue + ["init"], capture_output=True, text=True, check=True)
        cls.rogue = os.path.join(cls.tmp, "rogue")
        subprocess.run(rogue + ["issue", "--node", "mallory", "--no-supernode", "--out",
                                cls.rogue], capture_output=True, text=True, check=True)
        cls.addr, cls.cfg = {}, {}
        for i, sn in enumerate(("sn1", "sn2")):
            cls.addr[sn] = "127.0.0.1:%d" % free_port()
            conf = {"overlay": OVERLAY, "listen": cls.addr[sn],
                    "state_dir": os.path.join(cls.nodes, sn), "stun_listen": "127.0.0.1:0",
                    "max_connections": 4 * N_ONS,
                    # every simulated node connects from 127.0.0.1: lift the per-address bound
                    # on connections still handshaking (64 by default, one address's share)
                    "max_handshaking_per_address": 4 * N_ONS}
            if i == 0:
                conf["seed"] = True
            else:
                conf["join"] = [cls.addr["sn1"]]
            cls.cfg[sn] = os.path.join(cls.tmp, sn + ".json")
            with open(cls.cfg[sn], "w") as f:
                json.dump(conf, f)
        cls.sn = {}
        cls.start_sn("sn1").wait_for("started a new ring", timeout=WAIT)
        cls.start_sn("sn2").wait_for("joined the ring", timeout=WAIT)

    @classmethod
    def tearDownClass(cls):
        problems = []
        for d in reversed(cls.daemons):
            try:
                d.stop()
            except AssertionError as e:
                problems.append(str(e))
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    @staticmethod
    def bin(name):
        sub = "bench" if name == "on_load" else "loginserver" if name == "loginserver" \
            else "supernode"
        return os.path.join(BINDIR, sub, name)

    @classmethod
    def start_sn(cls, sn, **over):
        if over:
            with open(cls.cfg[sn]) as f:
                conf = json.load(f)
            conf.update(over)
            with open(cls.cfg[sn], "w") as f:
                json.dump(conf, f)
        cls.sn[sn] = harness.Daemon([cls.bin("supernode"), "-d", "-c", cls.cfg[sn]])
        cls.daemons.append(cls.sn[sn])
        return cls.sn[sn]

    def status(self, sn):
        p = subprocess.run([self.bin("supernode"), "-c", self.cfg[sn], "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def on_load(self, *args, timeout=300):
        # Under valgrind a TLS handshake takes seconds: pace the connections, wait longer.
        slow = ["--timeout", "60000", "--connect-rate", "10"] if SLOW else []
        p = subprocess.run([self.bin("on_load"), "--creds-dir", self.ons, "--json"] + slow +
                           list(args),
                           capture_output=True, text=True, timeout=timeout)
        try:
            report = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail("on_load gave no JSON report (status %d): %s" % (p.returncode, p.stderr))
        return p.returncode, report, p.stderr

    def tls_link(self, state_dir):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(os.path.join(state_dir, "ca.pem"))
        ctx.load_cert_chain(os.path.join(state_dir, "cert.pem"),
                            os.path.join(state_dir, "key.pem"))
        host, port = self.addr["sn1"].rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=10)
        return ctx.wrap_socket(raw)

    def misbehave(self, results):
        """A node from another CA, and an attached node sending garbage, while the load runs."""
        # Another CA: the super node refuses the handshake (it trusts only the overlay CA;
        # our client trusts the rogue CA, so it fails on the server's refusal, not its own).
        try:
            s = self.tls_link(os.path.join(self.rogue, "mallory"))
            s.settimeout(5)
            with s:
                got = s.recv(4096)  # TLS 1.3: the refusal comes after the client's handshake
            results["rogue"] = "not refused: %r" % got[:80]
        except (ssl.SSLError, ConnectionError, OSError) as e:
            results["rogue"] = "refused: %s" % e
        # An attached node that sends garbage is told so and cut off.
        s = self.tls_link(os.path.join(self.ons, "on1"))
        s.settimeout(10)
        frame = lambda o: len(json.dumps(o).encode()).to_bytes(4, "big") + json.dumps(o).encode()
        s.sendall(frame({"v": 1, "overlay": OVERLAY, "type": "hello", "kind": "ind",
                         "tid": "00000000000000aa", "body": {"agent": "test"}}))
        s.sendall(b"\x00\x00\x00\x05{{{{{")
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        s.close()
        results["garbage"] = data.decode(errors="replace")

    def test_1_many_nodes_attach_and_use_their_records(self):
        results = {}
        t = threading.Timer(2.0, self.misbehave, args=(results,))
        t.start()
        rc, rep, err = self.on_load("--sn", self.addr["sn1"], "--nodes", str(N_ONS),
                                    "--duration", "6", "--rate", "1", "--mix", "get:50,update:50",
                                    "--window", "4")
        t.join()
        sys.stderr.write("  [many] %s\n" % json.dumps(rep)[:600])
        self.assertEqual(rc, 0, "on_load: %s\n%s" % (rep.get("verdict"), err[-2000:]))
        self.assertIn("refused", results.get("rogue", ""))
        self.assertIn("invalid-json", results.get("garbage", ""))
        # The misbehaving links are gone; the super node still serves and counted the load.
        st = self.status("sn1")
        self.assertTrue(st["healthy"])
        self.assertGreaterEqual(st["ordinary_nodes"]["attaches"], N_ONS)

    def test_2_over_the_limit_nodes_are_redirected(self):
        self.assertEqual(self.sn["sn1"].stop(), 0)
        self.start_sn("sn1", seed=False, join=[self.addr["sn2"]], max_attached=SMALL_MAX)
        self.sn["sn1"].wait_for("joined the ring", timeout=WAIT)
        wait_until("sn1 healthy", lambda: (self.status("sn1") or {}).get("healthy"), WAIT)
        wait_until("sn2 knows sn1's capacity",
                   lambda: (self.status("sn2") or {}).get("succ"), WAIT)
        # A few stabilisation rounds: the neighbours learn each other's load.
        time.sleep(10 if SLOW else 2.5)
        # Under valgrind a node that just joined may answer a get before its records
        # arrived (docs/ring.md 2): tolerated there, not in the normal run.
        slack = ["--allow-errors", "timeout,empty"] if SLOW else []
        rc, rep, err = self.on_load("--sn", self.addr["sn1"], "--nodes", str(N_ONS),
                                    "--follow-redirects", "--duration", "2", "--rate", "0.5",
                                    *slack)
        sys.stderr.write("  [many] %s\n" % json.dumps(rep)[:600])
        self.assertEqual(rc, 0, "on_load: %s\n%s" % (rep.get("verdict"), err[-2000:]))
        conns = rep["connections"]
        self.assertEqual(conns["attached"], N_ONS)
        self.assertGreaterEqual(conns["redirected"], N_ONS - SMALL_MAX)
        per = conns["attached_by_sn"]
        self.assertEqual(per.get(self.addr["sn1"]), SMALL_MAX)
        self.assertEqual(per.get(self.addr["sn2"]), N_ONS - SMALL_MAX)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
