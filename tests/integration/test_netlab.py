#!/usr/bin/env python3
"""The NAT lab itself (tests/integration/netlab.py, scripts/netlab.sh), measured with real
clients: the NAT type of every site as a STUN client sees it (RFC 5389 Binding requests from
one socket to the STUN servers of two super nodes on two public addresses: the same mapped
port towards both is an endpoint-independent NAT, different ones a symmetric NAT; Debian's
turnutils_stunclient agrees on the public address), unsolicited inbound traffic dropped by
every NAT (from another port or another address than the one the host talked to, and new
TCP connections), the two office hosts reaching each other directly on their LAN, pubhost
reachable from anywhere, hosts with nothing but a default route, the root namespace left
alone, and after destroy (also after ^C in the middle of `netlab.sh up`) no namespace and
no process of the run left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import netlab  # noqa: E402

BINDIR = None
TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PY = sys.executable
NAT_SITES = [s for s in netlab.SITES if netlab.nat_kind(s)]


def say(fmt, *args):
    print("  [netlab] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def root_snapshot():
    """What the lab must not change in the root namespace."""
    out = []
    for argv in (["ip", "-br", "link"], ["ip", "-4", "-br", "addr"], ["ip", "route"],
                 ["ip", "-6", "route"], ["nft", "list", "ruleset"]):
        p = subprocess.run(argv, capture_output=True, text=True)
        out.append(p.stdout)
    return out


class Lab(unittest.TestCase):
    lab = None
    ov = None

    @classmethod
    def setUpClass(cls):
        harness.require(os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"),
                        "needs root, iproute2 and nftables for network namespaces")
        cls.root_before = root_snapshot()
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-netlab-")
        cls.lab = netlab.Lab()
        try:
            t0 = time.monotonic()
            cls.lab.create()
            say("lab %s: %d namespaces in %.2f s", cls.lab.tag, len(cls.lab.existing()),
                time.monotonic() - t0)
            # The super nodes' STUN servers on two public addresses are the measuring stick.
            cls.ov = netlab.Overlay(cls.lab, BINDIR, os.path.join(cls.tmp, "ov"))
            cls.ov.start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        problems = []
        if cls.ov:
            cls.ov.save_logs(os.path.join(BINDIR, "test_netlab-logs"))
            problems = cls.ov.stop()
        if cls.lab:
            cls.lab.destroy()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def tool(self, where, *args, timeout=30):
        """netlab.py's network tools inside a namespace: (status, stdout)."""
        p = self.lab.run(where, [PY, netlab.HERE] + list(args), timeout=timeout)
        return p.returncode, p.stdout

    def stun(self, site, port):
        rc, out = self.tool(site, "stun", "--bind", "0.0.0.0:%d" % port,
                            "%s:%d" % (netlab.SERVERS["sn1"], netlab.STUN_PORT),
                            "%s:%d" % (netlab.SERVERS["sn2"], netlab.STUN_PORT))
        self.assertEqual(rc, 0, out)
        return json.loads(out)["mapped"]

    def test_1_nat_types_as_stun_sees_them(self):
        for i, site in enumerate(netlab.SITES):
            with self.subTest(site=site):
                port = 41000 + i
                m1, m2 = self.stun(site, port)
                self.assertTrue(m1 and m2, "no STUN answer in %s: %r" % (site, (m1, m2)))
                kind = netlab.nat_kind(site)
                public = netlab.Lab.public_ip(site)
                self.assertEqual((m1[0], m2[0]), (public, public))
                if kind is None:
                    self.assertEqual((m1[1], m2[1]), (port, port), "pubhost is not translated")
                    seen = "not translated"
                elif kind == "eim":
                    self.assertEqual(m1[1], m2[1], "%s: endpoint-dependent mapping" % site)
                    seen = "endpoint-independent"
                else:
                    self.assertNotEqual(m1[1], m2[1], "%s: the same mapping to two servers"
                                        % site)
                    seen = "symmetric"
                say("%-9s local port %d -> sn1 sees %s:%d, sn2 sees %s:%d: %s", site, port,
                    m1[0], m1[1], m2[0], m2[1], seen)

    def test_2_turnutils_stunclient_agrees(self):
        harness.require(shutil.which("turnutils_stunclient"),
                        "turnutils_stunclient (Debian: coturn) not installed")
        for site in netlab.SITES:
            with self.subTest(site=site):
                p = self.lab.run(site, ["turnutils_stunclient", "-p", str(netlab.STUN_PORT),
                                        netlab.SERVERS["sn3"]], timeout=30)
                self.assertIn("UDP reflexive addr: %s:" % netlab.Lab.public_ip(site),
                              p.stdout + p.stderr)

    def test_3_unsolicited_inbound_dropped(self):
        """The host talks to pub's 203.0.113.10:40001 and gets the answer; datagrams to the
        same mapping from another port and from another address do not get through a NAT
        (pubhost gets all three)."""
        login, bs = netlab.SERVERS["login"], netlab.SERVERS["bootstrap"]
        for i, site in enumerate(netlab.SITES):
            with self.subTest(site=site):
                port = 42000 + i
                srv = subprocess.Popen(self.lab.exec_argv("pub", [
                    PY, netlab.HERE, "udp-serve", "--bind", "%s:%d" % (login, port),
                    "--also", "%s:%d" % (login, port + 100), "--also", "%s:%d" % (bs, port)]),
                    stdout=subprocess.PIPE, text=True)
                try:
                    self.assertEqual(srv.stdout.readline().strip(), "ready")
                    rc, out = self.tool(site, "udp-probe", "--to", "%s:%d" % (login, port),
                                        "--wait", "1.0")
                    self.assertEqual(rc, 0, out)
                    got = [g[0] for g in json.loads(out)["received"]]
                finally:
                    srv.wait(timeout=15)
                    srv.stdout.close()
                if netlab.nat_kind(site):
                    self.assertEqual(got, ["reply"], site)
                else:
                    self.assertEqual(sorted(got), sorted(["reply", "from %s:%d" % (login, port + 100),
                                                          "from %s:%d" % (bs, port)]), site)
                say("%-9s answer from the server it talked to: yes; from another port or "
                    "address: %s", site, "no (dropped)" if len(got) == 1 else "yes")

    def test_4_no_new_connection_into_a_nat(self):
        """New TCP connections from the Internet: refused at every router's WAN address (the
        SIP port of the node behind it, say) and nothing routes to the private addresses."""
        for r, conf in netlab.ROUTERS.items():
            with self.subTest(router=r):
                rc, _ = self.tool("pub", "tcp-probe", "--to", conf["wan"] + ":5060",
                                  "--wait", "1")
                self.assertNotEqual(rc, 0, "a connection into %s was accepted" % r)
        for site in NAT_SITES:
            with self.subTest(site=site):
                rc, _ = self.tool("pubhost", "tcp-probe", "--to",
                                  netlab.SITES[site]["ip"] + ":5060", "--wait", "1")
                self.assertNotEqual(rc, 0, "%s's private address reachable" % site)

    def _tcp_reach(self, server_site, bind, client_site):
        """A TCP listener in server_site; client_site connects: the peer address seen."""
        srv = subprocess.Popen(self.lab.exec_argv(server_site, [
            PY, netlab.HERE, "tcp-listen", "--bind", bind, "--wait", "3"]),
            stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(srv.stdout.readline().strip(), "ready")
            rc, _ = self.tool(client_site, "tcp-probe", "--to", bind, "--wait", "2")
            self.assertEqual(rc, 0, "%s cannot reach %s" % (client_site, bind))
            peer = srv.stdout.readline().strip()
        finally:
            srv.kill()
            srv.wait()
            srv.stdout.close()
        return peer.rsplit(":", 1)[0]

    def test_5_office_hosts_reach_each_other_on_the_lan(self):
        lan2 = netlab.SITES["lan2"]["ip"]
        peer = self._tcp_reach("lan2", lan2 + ":43000", "lan1")
        self.assertEqual(peer, netlab.SITES["lan1"]["ip"], "not directly over the LAN")
        rc, out = self.tool("lan1", "stun", "--bind", "0.0.0.0:43001",
                            "%s:%d" % (netlab.SERVERS["sn1"], netlab.STUN_PORT))
        self.assertEqual(json.loads(out)["mapped"][0][0], netlab.ROUTERS["r-office"]["wan"])
        say("lan1 -> lan2 (%s): seen from %s, directly on the office LAN; both go out as %s",
            lan2, peer, netlab.ROUTERS["r-office"]["wan"])

    def test_6_pubhost_reachable_from_everywhere(self):
        ip = netlab.SITES["pubhost"]["ip"]
        for i, site in enumerate(["pub"] + NAT_SITES):
            with self.subTest(source=site):
                peer = self._tcp_reach("pubhost", "%s:%d" % (ip, 44000 + i), site)
                want = netlab.SERVERS.values() if site == "pub" else [netlab.Lab.public_ip(site)]
                self.assertIn(peer, want)

    def test_7_hosts_have_only_a_default_route(self):
        for site, s in netlab.SITES.items():
            with self.subTest(site=site):
                out = self.lab.run(site, ["ip", "-4", "route"]).stdout.splitlines()
                gw = [x for x in out if x.startswith("default")]
                if not s["router"]:  # pubhost: on the Internet's segment, nothing else
                    self.assertEqual(len(out), 1, out)
                    self.assertIn("203.0.113.0/24 dev eth0", out[0])
                    continue
                self.assertEqual(len(gw), 1, out)
                self.assertEqual(len(out), 2, out)  # the default route and the own subnet
                self.assertIn("via " + netlab.ROUTERS[s["router"]]["lan"] + ".1", gw[0])

    def test_8_nodes_see_their_nat(self):
        """The ordinary nodes' own view (status): behind NAT or not, the reflexive address on
        the right public address."""
        for site in netlab.SITES:
            with self.subTest(site=site):
                st = self.ov.status(site)
                self.assertIsNotNone(st)
                self.assertEqual(st["state"], "attached", st)
                self.assertEqual(st["nat"], netlab.nat_kind(site) is not None, st)
                self.assertTrue(st["reflexive"].startswith(netlab.Lab.public_ip(site) + ":"), st)
                say("%s", self.ov.describe(site))

    def test_9_root_namespace_untouched(self):
        self.assertEqual(root_snapshot(), self.root_before)
        self.assertNotIn("nl%s-" % self.lab.tag, subprocess.run(
            ["ip", "-br", "link"], capture_output=True, text=True).stdout)


class Cleanup(unittest.TestCase):
    """destroy() and `netlab.sh down` leave nothing behind; so does ^C in the middle of up."""

    @classmethod
    def setUpClass(cls):
        harness.require(os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"),
                        "needs root, iproute2 and nftables for network namespaces")

    def assertGone(self, lab, pids):
        self.assertEqual(lab.existing(), [])
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        self.assertNotIn("nl%s-" % lab.tag, out)
        for pid in pids:
            self.assertTrue(netlab.wait_gone(pid, 5), "pid %d still running" % pid)

    def test_1_destroy_with_daemons_running(self):
        before = root_snapshot()
        lab = netlab.Lab()
        tmp = tempfile.mkdtemp(prefix="p2psip-netlab-")
        try:
            lab.create()
            ov = netlab.Overlay(lab, BINDIR, os.path.join(tmp, "ov"))
            ov.start()
            pids = [d.proc.pid for d in ov.daemons]
            self.assertEqual(len(pids), 5 + len(netlab.SITES))
            self.assertEqual(sorted(lab.pids()), sorted(pids))
            lab.destroy()  # without stopping the daemons first
            self.assertGone(lab, pids)
            lab.destroy()  # idempotent
        finally:
            lab.destroy()
            shutil.rmtree(tmp, ignore_errors=True)
        self.assertEqual(root_snapshot(), before)

    def script(self, *args, timeout=120):
        return subprocess.run([os.path.join(TOP, "scripts", "netlab.sh")] + list(args),
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, P2P_BUILD_DIR=BINDIR))

    def test_2_script_up_status_down(self):
        state = tempfile.mkdtemp(prefix="p2psip-netlab-sh-")
        tag = "t%d" % (os.getpid() % 100000)
        lab = netlab.Lab(tag)
        try:
            p = self.script("up", "--state", state, "--tag", tag)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertIn("home-sym1: bob's node at", p.stdout + p.stderr)
            self.assertIn("behind a symmetric NAT, attached to sn", p.stdout + p.stderr)
            pids = lab.pids()
            self.assertEqual(len(pids), 5 + len(netlab.SITES))
            p = self.script("status", "--state", state)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            for site in netlab.SITES:
                self.assertRegex(p.stdout, r"%s: \w+'s node at .* attached to sn\d" % site)
            self.assertNotIn("GONE", p.stdout)
            self.assertNotIn("MISSING", p.stdout)
            p = self.script("up", "--state", state, "--tag", tag)
            self.assertNotEqual(p.returncode, 0, "a second up over a running lab")
            other = tempfile.mkdtemp(prefix="p2psip-netlab-sh-")
            p = self.script("up", "--state", other, "--tag", tag)  # the same tag elsewhere
            shutil.rmtree(other, ignore_errors=True)
            self.assertNotEqual(p.returncode, 0, "a second lab with a tag in use")
            self.assertIn("in use", p.stderr)
            self.assertEqual(sorted(lab.pids()), sorted(pids), "the first lab was touched")
            p = self.script("down", "--state", state)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertGone(lab, pids)
            self.assertFalse(os.path.exists(state))
            p = self.script("down", "--state", state)
            self.assertNotEqual(p.returncode, 0)  # nothing to take down: says so
            self.assertIn("no lab", p.stdout + p.stderr)
        finally:
            lab.destroy()
            shutil.rmtree(state, ignore_errors=True)

    def test_3_interrupted_up_leaves_nothing(self):
        state = tempfile.mkdtemp(prefix="p2psip-netlab-sh-")
        tag = "i%d" % (os.getpid() % 100000)
        lab = netlab.Lab(tag)
        try:
            p = subprocess.Popen([os.path.join(TOP, "scripts", "netlab.sh"), "up", "--state",
                                  state, "--tag", tag], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=dict(os.environ, P2P_BUILD_DIR=BINDIR))
            lines = []
            for line in p.stdout:  # in the middle of starting the super nodes
                lines.append(line)
                if "super node sn1" in line:
                    break
            pids = lab.pids()
            self.assertTrue(pids, "".join(lines))
            os.kill(p.pid, signal.SIGINT)
            rest, _ = p.communicate(timeout=90)
            self.assertNotEqual(p.returncode, 0)
            self.assertGone(lab, pids)
            self.assertIn("taking the lab down", rest)
        finally:
            lab.destroy()
            shutil.rmtree(state, ignore_errors=True)

    def test_5_a_tag_in_use_is_refused(self):
        """A second lab with the same tag fails without touching the first one's namespaces."""
        first = netlab.Lab()
        try:
            first.create()
            with self.assertRaisesRegex(RuntimeError, "in use"):
                netlab.Lab(first.tag).create()
            self.assertEqual(len(first.existing()), len(first.ns))
        finally:
            first.destroy()
        self.assertEqual(first.existing(), [])
        with self.assertRaises(ValueError):
            netlab.Lab("Bad/Tag")

    def test_4_help_tells_the_truth(self):
        p = self.script("--help")
        self.assertEqual(p.returncode, 0)
        for word in ("up", "down", "status", "--no-overlay", "--state", "root"):
            self.assertIn(word, p.stdout)
        p = self.script("frobnicate")
        self.assertEqual(p.returncode, 2)
        self.assertIn("unknown", p.stderr)


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
