#!/usr/bin/env python3
"""scripts/demo.sh as a newcomer runs it, on a terminal: it must end by itself
with status 0, or on Ctrl-C with status 130, and in both cases leave no
process and no state directory behind."""

import os
import pty
import re
import select
import signal
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINDIR = None


def run_on_pty(interrupt_after=None, timeout=120):
    """Runs the demo on a pseudo-terminal; optionally types ^C once `interrupt_after`
    appears in its output. Returns (exit status, output)."""
    env = dict(os.environ, P2P_BUILD_DIR=BINDIR)
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("bash", ["bash", os.path.join(TOP, "scripts", "demo.sh")], env)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                out += data
            if interrupt_after and not sent and interrupt_after.encode() in out:
                time.sleep(0.1)
                os.write(fd, b"\x03")
                sent = True
        else:
            os.killpg(pid, signal.SIGKILL)
            raise AssertionError("demo did not finish within %ds:\n%s" % (timeout, out.decode()))
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def started_pids(output):
    return [int(p) for p in re.findall(r"\(pid (\d+)\)", output)]


def state_dir(output):
    m = re.search(r"state directory: (\S+)", output)
    return m.group(1) if m else None


class Demo(unittest.TestCase):
    def assert_clean(self, output):
        pids = started_pids(output)
        for pid in pids:
            gone = harness.wait_gone(pid, 5)
            if not gone:
                os.kill(pid, signal.SIGKILL)
            self.assertTrue(gone, "demo left pid %d running" % pid)
        sd = state_dir(output)
        self.assertIsNotNone(sd)
        self.assertFalse(os.path.exists(sd), "demo left %s behind" % sd)

    def test_runs_to_the_end(self):
        rc, out = run_on_pty()
        self.assertEqual(rc, 0, out)
        self.assertEqual(len(started_pids(out)), 8, out)
        self.assertRegex(out, r"sn2 -> sn1: reply from 127\.0\.0\.1:7001: node [0-9a-f]{40}")
        self.assertRegex(out, r"sn2 -> sn3 \(IPv6\): reply from \[::1\]:7003")
        self.assertIn("unknown key \"lsiten\" (did you mean \"listen\"?)", out)
        self.assertRegex(out, r"CA pin sha256:[0-9a-f]{64}")
        for n in ("sn1", "sn2", "sn3", "alice", "bob"):
            self.assertRegex(out, n + r": enrolled: sip:" + n + r"@demo\.p2psip \(node-id [0-9a-f]{40}")
        self.assertIn("401 unauthorized: unknown user or wrong password", out)
        self.assertIn("does not match the pin", out)
        alice_id = re.search(r"alice: enrolled: \S+ \(node-id ([0-9a-f]{40})", out).group(1)
        self.assertIn("renewed: sip:alice@demo.p2psip (node-id %s" % alice_id, out)
        self.assertIn("peer refused our certificate", out)
        self.assertIn("peer sent no certificate acceptable for the overlay CA", out)
        # Ordinary nodes: registered, found and verified, re-attached after their SN's SIGKILL.
        self.assertRegex(out, r"alice: published user location\|alice@demo\.p2psip")
        self.assertRegex(out, r"sip:alice@demo\.p2psip  seq \d+  expires \d+  verified")
        self.assertRegex(out, r"re-attached: super node [0-9a-f]{8}\.\.\. at ")
        # Promotion: carol's node becomes a super node, is in the ring and listed, and leaves.
        self.assertIn("carol: promoted: now a super node of the ring", out)
        self.assertRegex(out, r"successor \d  [0-9a-f]{40} at 127\.0\.0\.1:7011")
        self.assertIn('"address":"127.0.0.1:7011"', out)
        self.assertRegex(out, r"promotion    super node \(1 promotions, 0 demotions\)")
        self.assertIn("carol: removed user location|carol@demo.p2psip", out)
        self.assertIn("carol: left the ring", out)
        # The SIP call: both sipp phones count one successful call.
        self.assertRegex(out, r"bob is bound at sip:bob@127\.0\.0\.1:5072;transport=UDP \(signature")
        self.assertIn("INVITE for bob@demo.p2psip: found in the overlay", out)
        self.assertIn("caller (sipp): 1 successful call, 0 failed", out)
        self.assertIn("callee (sipp): 1 successful call, 0 failed", out)
        self.assertEqual(out.count("stopped"), 7, out)  # the killed super node did not stop
        self.assertIn("Everything this demo started has exited", out)
        self.assert_clean(out)

    def test_ctrl_c(self):
        rc, out = run_on_pty(interrupt_after="5. Mutual TLS")
        self.assertEqual(rc, 130, out)
        self.assertIn("interrupted: stopping everything", out)
        self.assert_clean(out)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
