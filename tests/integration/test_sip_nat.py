#!/usr/bin/env python3
"""A callee behind a real NAT (issue 8): three network namespaces the test
creates and removes,

    pub (10.77.1.1)  <->  nat (10.77.1.2 | 10.77.2.1, nftables masquerade)  <->  home (10.77.2.2)

with a super node, alice's ordinary node and alice's sipp phone in pub, and
bob's ordinary node and bob's sipp phone in home. pub has no route to home:
bob's node is reachable only through the connection it opened to its super
node. Bob's node finds out it is behind NAT (the super node sees another
address than its own) and says so in its location record; alice's call then
travels on a channel between the two nodes (ICE through bob's NAT, DTLS; issue
16) and completes, and bob can call alice back, out through the NAT."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BINDIR = None
OVERLAY = "nat-test.p2psip"
SLOW = bool(harness.WRAPPER)
WAIT = 60 if SLOW else 20
PUB, NAT_WAN, NAT_LAN, HOME = "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"


def say(fmt, *args):
    print("  [sip-nat] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def sh(*argv):
    subprocess.run(list(argv), check=True, capture_output=True, text=True)


class NatCall(harness.OverlayScenario, unittest.TestCase):
    daemons = []
    namespaces = []

    @classmethod
    def setUpClass(cls):
        harness.require(os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"),
                        "needs root, iproute2 and nftables for network namespaces")
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-nat-")
        try:
            cls._set_up()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _netns(cls):
        tag = "%d" % (os.getpid() % 100000)
        cls.ns = {k: "p2p-%s-%s" % (k, tag) for k in ("pub", "nat", "home")}
        for n in cls.ns.values():
            sh("ip", "netns", "add", n)
            cls.namespaces.append(n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        pub, nat, home = cls.ns["pub"], cls.ns["nat"], cls.ns["home"]
        # pub <-> nat (wan), nat (lan) <-> home
        sh("ip", "link", "add", "p2pw" + tag, "netns", pub, "type", "veth", "peer", "name",
           "p2pwn" + tag, "netns", nat)
        sh("ip", "link", "add", "p2pl" + tag, "netns", home, "type", "veth", "peer", "name",
           "p2pln" + tag, "netns", nat)
        for n, dev, addr in ((pub, "p2pw" + tag, PUB), (nat, "p2pwn" + tag, NAT_WAN),
                             (nat, "p2pln" + tag, NAT_LAN), (home, "p2pl" + tag, HOME)):
            sh("ip", "-n", n, "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", home, "route", "add", "default", "via", NAT_LAN)
        sh("ip", "netns", "exec", nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Masquerade out of the wan side; nothing new may come in from there (a real NAT).
        rules = ("table ip nat {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
                 "  oifname \"p2pwn%s\" masquerade\n }\n}\n"
                 "table ip filter {\n chain fw {\n  type filter hook forward priority filter;\n"
                 "  iifname \"p2pwn%s\" ct state new drop\n }\n}\n") % (tag, tag)
        subprocess.run(["ip", "netns", "exec", nat, "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True)

    @classmethod
    def in_ns(cls, where, argv):
        return ["ip", "netns", "exec", cls.ns[where]] + argv

    @classmethod
    def _set_up(cls):
        cls._netns()
        # Accounts and credentials in the root namespace; only the nodes run in the namespaces.
        cls.build_overlay(OVERLAY, ("sn1",), ("alice", "bob"), start_sns=(), wait=WAIT)
        cls.sn["sn1"] = cls.start(cls.in_ns("pub", [cls.bin("supernode"), "-d", "-c",
                                                    cls.cfg["sn1"]]))
        cls.sn["sn1"].wait_for("started a new ring", timeout=WAIT)
        for u, where in (("alice", "pub"), ("bob", "home")):
            cls.on[u] = cls.start(cls.in_ns(where, [cls.bin("ordinarynode"), "-d", "-c",
                                                    cls.cfg[u]]))
        for u in ("alice", "bob"):
            cls.on[u].wait_for("published user location", timeout=WAIT)

    @classmethod
    def node_conf(cls, u, conf):
        if u == "sn1":
            conf.update({"listen": PUB + ":7000", "stun_listen": PUB + ":3478"})
            cls.addr["sn1"] = PUB + ":7000"
        else:
            host = PUB if u == "alice" else HOME
            cls.sip[u] = host + ":5060"
            conf.update({"sip_listen": cls.sip[u], "supernodes": [PUB + ":7000"],
                         "bootstrap_urls": []})

    @classmethod
    def start(cls, argv):
        if argv[0] != "ip":
            return super().start(argv)
        # ip netns exec replaces itself with the daemon: its pid is the daemon's.
        d = harness.Daemon(argv, wrap=False)
        cls.daemons.append(d)
        return d

    @classmethod
    def tearDownClass(cls):
        problems = cls.stop_all() if cls.daemons else []
        for n in cls.namespaces:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        cls.namespaces = []
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    def register(self, who, where, ip, port):
        self.run_sipp("register_200", port, ip=ip, ns=self.ns[where], target=self.sip[who],
                      keys=(("user", who), ("domain", OVERLAY), ("expires", 600)))

    def test_1_nat_is_detected(self):
        bob, alice = self.status("bob"), self.status("alice")
        self.assertTrue(bob["nat"], bob)
        self.assertTrue(bob["local"].startswith(HOME + ":"), bob)
        self.assertTrue(bob["reflexive"].startswith(NAT_WAN + ":"), bob)
        self.assertFalse(alice["nat"], alice)
        self.on["bob"].wait_for("behind NAT: our address %s:" % HOME)
        say("bob's node: %s, seen by its super node as %s", bob["local"], bob["reflexive"])

    def test_2_call_to_the_callee_behind_nat(self):
        self.register("alice", "pub", PUB, 5071)
        self.register("bob", "home", HOME, 5072)
        rc, out, err = self.cli("alice", "get", "user location", "bob@" + OVERLAY, "--json")
        self.assertEqual(rc, 0, err)
        value = json.loads(out)["records"][0]["value"]
        self.assertTrue(value.get("sip_via_overlay"), value)
        uas = self.start_sipp("uas_answer", 5072, ip=HOME, ns=self.ns["home"])
        time.sleep(0.3)
        t0 = time.monotonic()
        self.run_sipp("uac_call", 5071, ip=PUB, ns=self.ns["pub"], target=self.sip["alice"],
                      keys=(("callee", "bob"), ("domain", OVERLAY)), service="alice")
        self.finish_sipp(uas, "uas_answer")
        st = self.status("alice")
        px = st["sip"]["proxy"]
        ch = [c for c in st.get("channels", []) if c["peer"] == self.node_id["bob"]]
        say("alice -> bob behind NAT: call completed in %.2f s on %s, %d messages from alice's "
            "node through the overlay", time.monotonic() - t0, ch, px["through_overlay"])
        self.assertEqual(len(ch), 1, st.get("channels"))
        # bob's NAT lets the checks of a node that bob's node checked too: a direct path
        self.assertEqual((ch[0]["state"], ch[0]["path"]), ("open", "direct"))
        self.assertEqual(px["through_overlay"], 0)

    def test_3_call_from_behind_nat(self):
        """bob calls alice: out through the NAT, directly to alice's node."""
        self.register("alice", "pub", PUB, 5073)
        self.register("bob", "home", HOME, 5074)
        uas = self.start_sipp("uas_answer", 5073, ip=PUB, ns=self.ns["pub"])
        time.sleep(0.3)
        self.run_sipp("uac_call", 5074, ip=HOME, ns=self.ns["home"], target=self.sip["bob"],
                      keys=(("callee", "alice"), ("domain", OVERLAY)), service="bob")
        self.finish_sipp(uas, "uas_answer")


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
