#!/usr/bin/env python3
"""The Internet in a box: network namespaces forming a small Internet with NATs, and the
p2psip overlay started in it (docs/nat.md, "The NAT lab").

    inet       a namespace holding one bridge: the Internet (203.0.113.0/24, TEST-NET-3)
    pub        the servers, each on an address of its own: login server, bootstrap server,
               super nodes sn1..sn3 (each with its STUN server on port 3478)
    home-eim   router (nftables `masquerade`: endpoint-independent, port-preserving) + 1 host
    home-sym1  router (`masquerade fully-random`: symmetric) + 1 host
    home-sym2  the same, a second one, so that symmetric to symmetric can be tried
    office     ONE router (endpoint-independent) with TWO hosts on its LAN: lan1 and lan2
    pubhost    a host with a public address directly on the Internet

Every router drops what arrives unsolicited on its WAN side (`ct state new drop` in its input
and forward hooks), as a home router does. Hosts have only a default route via their router.
The root namespace is not touched: every interface, bridge, route and nft rule lives inside a
namespace named `nl<tag>-<role>`, and deleting the namespaces removes all of it.

Used two ways:
  * by tests: `lab = Lab(); lab.create(); ov = Overlay(lab, bindir, tmp); ov.start()`,
    `lab.destroy()` (idempotent; also run at exit and on SIGINT/SIGTERM/SIGHUP);
    daemons are harness.Daemon objects (P2P_TEST_WRAPPER wraps the ordinary nodes, as the
    harness does);
  * by scripts/netlab.sh: `netlab.py up|down|status --state DIR --bindir BUILD`, daemons
    detached with pid files in DIR/pids, logs in DIR/logs.
Small network tools for the tests run inside namespaces: `netlab.py stun`, `udp-serve`,
`udp-probe` (see --help)."""

import argparse
import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

HERE = os.path.abspath(__file__)
OVERLAY = "lab.p2psip"
INET = "203.0.113"  # TEST-NET-3: public (not RFC 1918), never routed on the real Internet
SERVERS = {"login": INET + ".10", "bootstrap": INET + ".11",
           "sn1": INET + ".21", "sn2": INET + ".22", "sn3": INET + ".23"}
LS_PORT, BS_PORT, SN_PORT, STUN_PORT, SIP_PORT = 8440, 8443, 7000, 3478, 5060
FRONT_END_PORT = 5060  # sn1's public SIP front end, when the Overlay runs one
PHONE_PORT = 5070  # each site's phone (sipp) registers from 127.0.0.1:5070 on its host
# Each node's SIP front end is for the phones of its own host, on loopback (the ordinary node's
# default): nothing at a site, pubhost included, offers an unauthenticated SIP port to the lab's
# Internet; other nodes reach it on channels.
PHONE_IP = "127.0.0.1"

# Routers: namespace role, WAN address, LAN prefix, NAT kind.
ROUTERS = {
    "r-eim": {"wan": INET + ".101", "lan": "192.168.1", "nat": "eim"},
    "r-sym1": {"wan": INET + ".102", "lan": "192.168.2", "nat": "symmetric"},
    "r-sym2": {"wan": INET + ".103", "lan": "192.168.3", "nat": "symmetric"},
    "r-office": {"wan": INET + ".104", "lan": "10.20.0", "nat": "eim"},
}
# Host sites, in the order the calls test walks them: namespace role, address, router, user,
# and which super node its node tries first (spreads the nodes over the ring).
SITES = {
    "home-eim": {"ns": "h-eim", "ip": "192.168.1.10", "router": "r-eim", "user": "alice",
                 "sn": "sn1"},
    "home-sym1": {"ns": "h-sym1", "ip": "192.168.2.10", "router": "r-sym1", "user": "bob",
                  "sn": "sn2"},
    "home-sym2": {"ns": "h-sym2", "ip": "192.168.3.10", "router": "r-sym2", "user": "carol",
                  "sn": "sn3"},
    "lan1": {"ns": "lan1", "ip": "10.20.0.11", "router": "r-office", "user": "dave", "sn": "sn1"},
    "lan2": {"ns": "lan2", "ip": "10.20.0.12", "router": "r-office", "user": "erin", "sn": "sn2"},
    "pubhost": {"ns": "pubhost", "ip": INET + ".200", "router": None, "user": "frank",
                "sn": "sn3"},
}
SNS = ("sn1", "sn2", "sn3")
NAT_WORDS = {"eim": "an endpoint-independent NAT", "symmetric": "a symmetric NAT",
             None: "no NAT"}


def nat_kind(site):
    r = SITES[site]["router"]
    return ROUTERS[r]["nat"] if r else None


def where(site):
    """"behind a symmetric NAT", "on a public address", ..."""
    return "behind " + NAT_WORDS[nat_kind(site)] if nat_kind(site) else "on a public address"


def say(fmt, *args):
    print("  [netlab] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def _run(argv, input=None, check=True, timeout=30):
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), p.returncode,
                                                (p.stderr or p.stdout).strip()))
    return p


def ns_inode(name):
    try:
        return os.stat("/run/netns/" + name).st_ino
    except OSError:
        return None


def gone(pid, reap=False):
    """True when process pid has ended: no such process, or a zombie (reaped first with
    reap, when it is our child)."""
    if reap:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_gone(pid, timeout, reap=False):
    deadline = time.monotonic() + timeout
    while not gone(pid, reap):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pid_netns_inode(pid):
    try:
        return os.stat("/proc/%d/ns/net" % pid).st_ino
    except OSError:
        return None


# ---- the topology ---------------------------------------------------------------------------

_live_labs = []


def _destroy_live_labs():
    for lab in list(_live_labs):
        lab.destroy()


def _on_signal(signum, frame):
    _destroy_live_labs()
    harness._reap_all()
    os._exit(128 + signum)


atexit.register(_destroy_live_labs)  # runs before harness's own (atexit is last-in first-out)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


class TagInUse(RuntimeError):
    pass


class Lab:
    """The namespaces of one run; every name carries the run's tag."""

    def __init__(self, tag=None):
        self.tag = tag or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.tag):
            raise ValueError("tag: 1 to 8 lower-case letters or digits")
        roles = ["inet", "pub"] + list(ROUTERS) + [s["ns"] for s in SITES.values()]
        self.ns = {r: "nl%s-%s" % (self.tag, r) for r in roles}
        self.created = False

    # addresses
    @staticmethod
    def host_ip(site):
        return SITES[site]["ip"]

    @staticmethod
    def public_ip(site):
        """The address the Internet sees a site's host at (its router's WAN address)."""
        r = SITES[site]["router"]
        return ROUTERS[r]["wan"] if r else SITES[site]["ip"]

    def site_ns(self, site):
        return self.ns[SITES[site]["ns"]]

    def exec_argv(self, role, argv):
        """argv run inside namespace `role` (a role like "pub" or a site name)."""
        ns = self.site_ns(role) if role in SITES else self.ns[role]
        return ["ip", "netns", "exec", ns] + list(argv)

    def run(self, role, argv, timeout=30, check=False, input=None):
        return _run(self.exec_argv(role, argv), check=check, timeout=timeout, input=input)

    def daemon(self, role, argv, wrap=False):
        """A daemon (in the foreground, e.g. with -d) inside namespace `role`: a harness.Daemon
        whose log the test can wait on; wrap: under P2P_TEST_WRAPPER (valgrind). `ip netns
        exec` replaces itself with the command, so the process is the daemon's."""
        return harness.Daemon(self.exec_argv(role, (harness.WRAPPER if wrap else []) + argv),
                              wrap=False)

    def _ip(self, role, *args):
        _run(["ip", "-n", self.ns[role]] + list(args))

    def _veth(self, a, a_if, b, b_if):
        """A veth pair created inside namespace a with its peer moved straight into b."""
        self._ip(a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", self.ns[b])
        self._ip(a, "link", "set", a_if, "up")
        self._ip(b, "link", "set", b_if, "up")

    def _sysctl(self, role, kv):
        _run(["ip", "netns", "exec", self.ns[role], "sysctl", "-q", "-w", kv])

    def create(self):
        if os.geteuid() != 0:
            raise PermissionError("the NAT lab needs root (network namespaces)")
        for tool in ("ip", "nft"):
            if not shutil.which(tool):
                raise FileNotFoundError("%s not found (Debian: iproute2, nftables)" % tool)
        taken = self.existing()
        if taken:  # another run's: leave it alone
            raise TagInUse("tag %s in use: %s exist" % (self.tag, " ".join(taken)))
        _live_labs.append(self)
        self.created = True
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self):
        for role, name in self.ns.items():
            _run(["ip", "netns", "add", name])
            self._ip(role, "link", "set", "lo", "up")
            # No IPv6 in the lab: no router advertisements, no DAD delays, one address family.
            for kv in ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"):
                _run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", kv], check=False)
        self._ip("inet", "link", "add", "br0", "type", "bridge")
        self._ip("inet", "link", "set", "br0", "up")

        def attach(role, ifname, addrs):  # a namespace on the Internet's bridge
            port = ("v-" + role)[:15]
            self._veth("inet", port, role, ifname)
            self._ip("inet", "link", "set", port, "master", "br0")
            for a in addrs:
                self._ip(role, "addr", "add", a + "/24", "dev", ifname)

        attach("pub", "eth0", list(SERVERS.values()))
        attach("pubhost", "eth0", [SITES["pubhost"]["ip"]])
        for r, conf in ROUTERS.items():
            attach(r, "wan", [conf["wan"]])
            self._sysctl(r, "net.ipv4.ip_forward=1")
            hosts = [s for s in SITES.values() if s["router"] == r]
            if len(hosts) == 1:
                self._veth(r, "lan", hosts[0]["ns"], "eth0")
                lan_if = "lan"
            else:  # the office: a LAN switch (bridge) in the router
                lan_if = "brlan"
                self._ip(r, "link", "add", lan_if, "type", "bridge")
                self._ip(r, "link", "set", lan_if, "up")
                for h in hosts:
                    self._veth(r, "p-" + h["ns"], h["ns"], "eth0")
                    self._ip(r, "link", "set", "p-" + h["ns"], "master", lan_if)
            self._ip(r, "addr", "add", conf["lan"] + ".1/24", "dev", lan_if)
            for h in hosts:
                self._ip(h["ns"], "addr", "add", h["ip"] + "/24", "dev", "eth0")
                self._ip(h["ns"], "route", "add", "default", "via", conf["lan"] + ".1")
            self._nat(r, conf["nat"])

    def _nat(self, r, kind):
        rules = (
            "table ip nat {\n"
            " chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            "  oifname \"wan\" masquerade%s\n"
            " }\n"
            "}\n"
            "table inet filter {\n"
            " chain input {\n"
            "  type filter hook input priority filter; policy accept;\n"
            "  iifname \"wan\" ct state new,invalid drop\n"
            " }\n"
            " chain forward {\n"
            "  type filter hook forward priority filter; policy accept;\n"
            "  iifname \"wan\" ct state new,invalid drop\n"
            " }\n"
            "}\n") % (" fully-random" if kind == "symmetric" else "")
        _run(["ip", "netns", "exec", self.ns[r], "nft", "-f", "-"], input=rules)

    def nft_rules(self, r):
        return _run(["ip", "netns", "exec", self.ns[r], "nft", "list", "ruleset"]).stdout

    def existing(self):
        """Namespaces of this run that exist now."""
        out = _run(["ip", "netns", "list"], check=False).stdout
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        return [n for n in self.ns.values() if n in names]

    def pids(self):
        """Processes running in this run's namespaces (every one was started by this lab)."""
        found = []
        for n in self.existing():
            out = _run(["ip", "netns", "pids", n], check=False).stdout
            found += [int(x) for x in out.split() if x.isdigit()]
        return found

    def destroy(self):
        """Kills what still runs inside the namespaces, deletes them. Idempotent."""
        for _ in range(2):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in left:
                wait_gone(pid, 5)
        for n in self.existing():
            _run(["ip", "netns", "del", n], check=False)
        if self in _live_labs:
            _live_labs.remove(self)
        self.created = False


# ---- daemons --------------------------------------------------------------------------------


class DetachedDaemon:
    """A daemon that outlives this process (netlab.sh up): its own session, log in a file,
    pid in a pid file. Offers the parts of harness.Daemon's interface the overlay uses."""

    def __init__(self, argv, log_path, pid_path):
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "w") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        with open(pid_path, "w") as f:
            f.write("%d\n" % self.proc.pid)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_for(self, text, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("%s: no log line with %r within %.1fs; log:\n%s"
                                     % (self.argv[4], text, timeout, self.log()[-3000:]))
            time.sleep(0.1)


class Overlay:
    """The whole overlay in a lab, as a person would run it: the login server (accounts for
    sn1..sn3 and one user per site), the bootstrap server, the super nodes in pub, one
    ordinary node per site host. Credentials and configurations are in `tmp`.

    detached=None: daemons are harness.Daemon objects (tests); else a state directory for
    DetachedDaemon pid files and logs (netlab.sh)."""

    def __init__(self, lab, bindir, tmp, detached=None, stabilize_s=1, sn_extra=None,
                 on_extra=None, front_end=None):
        """sn_extra, on_extra: settings added to every super node's / ordinary node's
        configuration (e.g. {"turn": False}). front_end: {"domain": D, "users": {name:
        password}}: sn1 also runs the public SIP front end of domain D (docs/sip.md, "Classical
        phones at a super node") on FRONT_END_PORT of its public address, for those users."""
        self.front_end = front_end
        self.lab, self.bindir, self.tmp, self.detached = lab, bindir, tmp, detached
        self.sn_extra, self.on_extra = dict(sn_extra or {}), dict(on_extra or {})
        self.stabilize_s = stabilize_s
        self.daemons = []  # in start order
        self.by_name = {}
        self.cfg = {}
        self.node_id = {}
        self.sip = {}  # site -> its node's SIP address
        self.user = {site: s["user"] for site, s in SITES.items()}
        self.ca = os.path.join(tmp, "ls", "ca.pem")

    def bin(self, name):
        return os.path.join(self.bindir, name, name)

    def _start(self, name, role, argv, wrap=False):
        if self.detached:
            for d in ("pids", "logs"):
                os.makedirs(os.path.join(self.detached, d), exist_ok=True)
            full = self.lab.exec_argv(role, (harness.WRAPPER if wrap else []) + argv)
            d = DetachedDaemon(full, os.path.join(self.detached, "logs", name + ".log"),
                               os.path.join(self.detached, "pids", name + ".pid"))
        else:
            d = self.lab.daemon(role, argv, wrap)
        d.name = name
        self.daemons.append(d)
        self.by_name[name] = d
        return d

    def _write(self, name, conf):
        self.cfg[name] = os.path.join(self.tmp, name + ".json")
        with open(self.cfg[name], "w") as f:
            json.dump(conf, f, indent=1)

    def start(self, narrate=False, wait=None):
        wait = wait or (60 if harness.WRAPPER else 30)
        t0 = time.monotonic()
        tell = say if narrate else (lambda *a: None)
        os.makedirs(self.tmp, exist_ok=True)
        login_ip, bs_ip = SERVERS["login"], SERVERS["bootstrap"]
        ls_state = os.path.join(self.tmp, "ls")
        lsc = {"overlay": OVERLAY, "listen": "%s:%d" % (login_ip, LS_PORT), "state_dir": ls_state,
               "pbkdf2_iterations": 1000, "stabilize_s": self.stabilize_s,
               "bootstrap_urls": ["https://%s:%d" % (bs_ip, BS_PORT)]}
        if self.front_end:
            lsc["sip_proxies"] = [self.front_end["domain"] + "=sn1"]
        self._write("loginserver", lsc)
        ls = [self.bin("loginserver"), "-c", self.cfg["loginserver"]]
        out = _run(ls + ["init"]).stdout
        self.pin = re.search(r"CA pin: (sha256:[0-9a-f]{64})", out).group(1)
        users = list(SNS) + [s["user"] for s in SITES.values()]
        for u in users:
            extra = [] if u in SNS else ["--no-supernode"]
            _run(ls + ["user", "add", u] + extra, input=u + "-password\n")
        svc = os.path.join(self.tmp, "svc")
        _run(ls + ["issue", "--service", bs_ip, "--out", svc])
        self._start("loginserver", "pub", [ls[0], "-d"] + ls[1:]).wait_for("serving on", wait)
        tell("pub: login server at https://%s:%d (CA %s), accounts %s", login_ip, LS_PORT,
             self.pin[:19] + "...", " ".join(users))
        login = "https://%s:%d" % (login_ip, LS_PORT)
        self._write("bootstrap", {
            "overlay": OVERLAY, "listen": "%s:%d" % (bs_ip, BS_PORT),
            "state_dir": os.path.join(self.tmp, "bs"), "ca_file": self.ca,
            "cert_file": os.path.join(svc, bs_ip + ".pem"),
            "key_file": os.path.join(svc, bs_ip + ".key"), "announce_period_s": 1})
        self._start("bootstrap", "pub", [self.bin("bootstrap"), "-d", "-c",
                                         self.cfg["bootstrap"]]).wait_for("serving on", wait)
        tell("pub: bootstrap server at https://%s:%d", bs_ip, BS_PORT)

        def enroll(name, role, prog):
            p = self.lab.run(role, [self.bin(prog), "-o", "state_dir=" + os.path.join(
                self.tmp, name), "-o", "overlay=" + OVERLAY, "enroll", "--login", login,
                "--pin", self.pin, "--user", name], input=name + "-password\n", timeout=60)
            if p.returncode != 0:
                raise RuntimeError("enrolling %s in %s: %s" % (name, role, p.stderr.strip()))
            self.node_id[name] = re.search(r"node-id ([0-9a-f]{40})", p.stdout).group(1)

        for sn in SNS:
            enroll(sn, "pub", "supernode")
            conf = {"overlay": OVERLAY, "state_dir": os.path.join(self.tmp, sn),
                    "listen": "%s:%d" % (SERVERS[sn], SN_PORT),
                    "stun_listen": "%s:%d" % (SERVERS[sn], STUN_PORT)}
            if sn == "sn1":
                conf["seed"] = True
                if self.front_end:
                    conf.update(self._front_end_conf())
            else:
                conf["join"] = ["%s:%d" % (SERVERS["sn1"], SN_PORT)]
            conf.update(self.sn_extra)
            self._write(sn, conf)
        for sn in SNS:
            d = self._start(sn, "pub", [self.bin("supernode"), "-d", "-c", self.cfg[sn]])
            d.wait_for("started a new ring" if sn == "sn1" else "joined the ring", wait)
            tell("pub: super node %s at %s:%d, STUN %s:%d, node-id %s...", sn, SERVERS[sn],
                 SN_PORT, SERVERS[sn], STUN_PORT, self.node_id[sn][:8])
        for site, s in SITES.items():
            u = s["user"]
            enroll(u, site, "ordinarynode")  # through the site's NAT, as a user would
            first = s["sn"]
            order = [first] + [x for x in SNS if x != first]
            self.sip[site] = "%s:%d" % (PHONE_IP, SIP_PORT)
            conf = {"overlay": OVERLAY, "state_dir": os.path.join(self.tmp, u),
                    "sip_listen": self.sip[site],
                    "supernodes": ["%s:%d" % (SERVERS[x], SN_PORT) for x in order]}
            if not s["router"]:  # a phone on a public address may register
                conf["sip_register_from"] = ["any"]
            conf.update(self.on_extra)
            self._write(u, conf)
        for site, s in SITES.items():
            self._start(s["user"], site, [self.bin("ordinarynode"), "-d", "-c",
                                          self.cfg[s["user"]]], wrap=True)
        for site, s in SITES.items():
            self.by_name[s["user"]].wait_for("published user location", wait)
        if narrate:
            for site in SITES:
                tell("%s", self.describe(site))
        tell("overlay up in %.1f s", time.monotonic() - t0)

    def _front_end_conf(self):
        import hashlib
        fe = self.front_end
        users = os.path.join(self.tmp, "front-end-users")
        with open(users, "w") as f:
            for u, pw in fe["users"].items():
                f.write("%s:%s\n" % (u, hashlib.md5(("%s:%s:%s" % (u, fe["domain"], pw))
                                                    .encode()).hexdigest()))
        self.front_end_addr = "%s:%d" % (SERVERS["sn1"], FRONT_END_PORT)
        return {"sip_listen": self.front_end_addr, "sip_domain": fe["domain"],
                "sip_users": users}

    # ---- the sites' phones: sipp (Debian's sip-tester) at <host>:PHONE_PORT ----

    def sipp_argv(self, site, scenario, target=None, keys=(), service=None, timeout=30):
        """sipp running tests/sipp/<scenario>.xml once from site's phone address, inside the
        site's namespace (the argv harness.OverlayScenario.start_sipp builds with ns=)."""
        argv = ["sipp", "-sf", os.path.join(harness.SIPP_SCENARIOS, scenario + ".xml"), "-m",
                "1", "-i", PHONE_IP, "-p", str(PHONE_PORT), "-t", "u1", "-timeout",
                str(timeout), "-timeout_error", "-nostdin"]
        for k, v in keys:
            argv += ["-key", k, str(v)]
        if service:
            argv += ["-s", service]
        if target:
            argv.append(target)
        return self.lab.exec_argv(site, argv)

    def register_phone(self, site, expires=3600):
        """site's phone REGISTERs as the site's user at the site's node: (ok, sipp output)."""
        p = subprocess.run(self.sipp_argv(site, "register_200", self.sip[site], (
            ("user", self.user[site]), ("domain", OVERLAY), ("expires", expires)), timeout=15),
            capture_output=True, text=True, timeout=60, cwd=self.tmp)
        return p.returncode == 0, p.stdout

    def call(self, caller, callee):
        """caller's phone calls callee's user, callee's phone answers: (ok, seconds, caller's
        sipp output, callee's sipp output)."""
        uas = subprocess.Popen(self.sipp_argv(callee, "uas_answer"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=self.tmp)
        time.sleep(0.3)
        t0 = time.monotonic()
        uac = subprocess.run(self.sipp_argv(caller, "uac_call", self.sip[caller], (
            ("callee", self.user[callee]), ("domain", OVERLAY)), self.user[caller]),
            capture_output=True, text=True, timeout=90, cwd=self.tmp)
        took = time.monotonic() - t0
        try:
            out, _ = uas.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            uas.kill()
            out, _ = uas.communicate()
        return uac.returncode == 0 and uas.returncode == 0, took, uac.stdout, out

    def cli(self, u, *args, timeout=60):
        """`ordinarynode -c <u's config> args...` (the control socket is a file: any namespace)."""
        p = subprocess.run(harness.WRAPPER + [self.bin("ordinarynode"), "-c", self.cfg[u]] +
                           list(args), capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    def status(self, site_or_user):
        u = self.user.get(site_or_user, site_or_user)
        rc, out, _ = self.cli(u, "status", "--json")
        return json.loads(out) if rc == 0 else None

    def sn_name(self, node_id):
        return self.peer_name(node_id)

    def describe(self, site):
        """One line from the node's `ordinarynode status --json`."""
        st = self.status(site) or {}
        sn = st.get("supernode") or {}
        attached = (self.sn_name(sn.get("id", "")) if sn else
                    "nothing (%s)" % st.get("state", "not answering"))
        line = ("%s: %s's node at %s, %s, attached to %s, reflexive %s, STUN %s, nat %s"
                % (site, self.user[site], self.sip[site], where(site), attached,
                   st.get("reflexive"), st.get("stun_mapped"), st.get("nat")))
        if isinstance(st.get("channels"), list):
            line += ", channels %s" % (", ".join(
                "%s %s %s" % (self.peer_name(c.get("peer", "")), c.get("state"), c.get("path"))
                for c in st["channels"]) or "none")
        return line

    def peer_name(self, node_id):
        for u, nid in self.node_id.items():
            if nid == node_id:
                return u
        return node_id[:8] + "..."

    def stop(self):
        """Stops every daemon (ordinary nodes first); returns a list of problems."""
        problems = []
        for d in reversed(self.daemons):
            if isinstance(d, harness.Daemon):
                try:
                    rc = d.stop()
                    if rc != 0:
                        problems.append("%s exited with status %s" % (d.name, rc))
                except AssertionError as e:
                    problems.append(str(e))
            else:
                stop_pid(d.proc.pid, None)
        return problems

    def save_logs(self, outdir):
        os.makedirs(outdir, exist_ok=True)
        for d in self.daemons:
            with open(os.path.join(outdir, d.name + ".log"), "w") as f:
                f.write(" ".join(d.argv) + "\n" + d.log() + "\n")


def stop_pid(pid, ns_ino, timeout=10):
    """SIGTERM, then SIGKILL, to a daemon of ours; with ns_ino, only if it still runs in that
    namespace (a recycled pid is someone else's)."""
    if ns_ino is not None and pid_netns_inode(pid) != ns_ino:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(pid, timeout, reap=True):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_gone(pid, 5, reap=True)


# ---- small network tools, run inside namespaces ---------------------------------------------

STUN_MAGIC = 0x2112A442


def stun_binding(sock, server, timeout=2.0):
    """One RFC 5389 Binding request from sock to server (ip, port): the mapped (ip, port), or
    None without an answer."""
    txid = secrets.token_bytes(12)
    req = struct.pack("!HHI", 0x0001, 0, STUN_MAGIC) + txid
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            sock.sendto(req, server)
            next_send = time.monotonic() + 0.5
        sock.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if len(data) < 20 or data[8:20] != txid:
            continue
        mtype, mlen = struct.unpack("!HH", data[:4])
        if mtype != 0x0101:
            continue
        pos = 20
        mapped = None
        while pos + 4 <= min(len(data), 20 + mlen):
            atype, alen = struct.unpack("!HH", data[pos:pos + 4])
            val = data[pos + 4:pos + 4 + alen]
            if atype in (0x0020, 0x0001) and len(val) >= 8 and val[1] == 1:
                port, = struct.unpack("!H", val[2:4])
                ip = val[4:8]
                if atype == 0x0020:
                    port ^= STUN_MAGIC >> 16
                    ip = bytes(a ^ b for a, b in zip(ip, struct.pack("!I", STUN_MAGIC)))
                    return socket.inet_ntoa(ip), port
                mapped = (socket.inet_ntoa(ip), port)
            pos += 4 + ((alen + 3) & ~3)
        if mapped:
            return mapped
    return None


def cmd_stun(args):
    """From one local socket, a Binding request to each server: prints their mapped addresses
    as JSON ([ip, port] or null each)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host, port = args.bind.rsplit(":", 1)
    s.bind((host, int(port)))
    out = []
    for srv in args.servers:
        h, p = srv.rsplit(":", 1)
        m = stun_binding(s, (h, int(p)), args.timeout)
        out.append(list(m) if m else None)
    print(json.dumps({"local": "%s:%d" % s.getsockname(), "mapped": out}))


def cmd_udp_serve(args):
    """Waits for one datagram on --bind, then answers its source from --bind ("reply") and
    sends it one datagram from each --also address ("from <addr>"), which a NAT must drop."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    h, p = args.bind.rsplit(":", 1)
    s.bind((h, int(p)))
    print("ready", flush=True)
    s.settimeout(args.timeout)
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        print(json.dumps({"error": "nothing received"}), flush=True)
        return 1
    s.sendto(b"reply", src)
    for a in args.also:
        o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ah, ap = a.rsplit(":", 1)
        o.bind((ah, int(ap)))
        o.sendto(("from " + a).encode(), src)
        o.close()
    print(json.dumps({"source": "%s:%d" % src}), flush=True)
    return 0


def cmd_udp_probe(args):
    """Sends one datagram to --to and prints (JSON) every datagram received within --wait s."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    h, p = args.to.rsplit(":", 1)
    s.sendto(b"hello", (h, int(p)))
    got = []
    deadline = time.monotonic() + args.wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            break
        got.append([data.decode(errors="replace"), "%s:%d" % src])
    print(json.dumps({"local": "%s:%d" % s.getsockname(), "received": got}))


def cmd_tcp_probe(args):
    """Exit 0 when a TCP connection to --to is accepted within --wait s."""
    h, p = args.to.rsplit(":", 1)
    try:
        socket.create_connection((h, int(p)), timeout=args.wait).close()
        return 0
    except OSError as e:
        print(str(e), file=sys.stderr)
        return 1


def cmd_tcp_listen(args):
    """Accepts connections on --bind for --wait s; prints each peer."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    h, p = args.bind.rsplit(":", 1)
    s.bind((h, int(p)))
    s.listen(8)
    print("ready", flush=True)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            c, peer = s.accept()
        except socket.timeout:
            break
        print("%s:%d" % peer, flush=True)
        c.close()
    return 0


# ---- netlab.sh's commands -------------------------------------------------------------------

def _state_file(state):
    return os.path.join(state, "lab.json")


def cmd_up(args):
    state = os.path.abspath(args.state)
    if os.path.exists(_state_file(state)):
        print("netlab: a lab is already up (state %s); run 'down' first" % state, file=sys.stderr)
        return 1
    for b in ("loginserver", "bootstrap", "supernode", "ordinarynode"):
        if args.overlay and not os.access(os.path.join(args.bindir, b, b), os.X_OK):
            print("netlab: %s/%s/%s not built" % (args.bindir, b, b), file=sys.stderr)
            return 1
    os.makedirs(state, exist_ok=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # unwind through _down() below
        signal.signal(sig, interrupted)
    lab = Lab(args.tag)
    info = {"tag": lab.tag, "ns": lab.ns, "bindir": os.path.abspath(args.bindir),
            "overlay": bool(args.overlay)}
    with open(_state_file(state), "w") as f:
        json.dump(info, f, indent=1)
    say("tag %s, state %s", lab.tag, state)
    # The lab belongs to the state directory: a failure or ^C takes down what was built.
    try:
        lab.create()
        say("inet (%s): the Internet, a bridge; public addresses %s.0/24", lab.ns["inet"], INET)
        say("pub (%s): %s", lab.ns["pub"], ", ".join("%s %s" % kv for kv in SERVERS.items()))
        for site, s in SITES.items():
            r = s["router"]
            if r:
                say("%s (%s): host %s behind router %s (%s), %s, WAN %s", site, lab.site_ns(site),
                    s["ip"], r, lab.ns[r], NAT_WORDS[nat_kind(site)], ROUTERS[r]["wan"])
            else:
                say("%s (%s): host %s directly on the Internet", site, lab.site_ns(site), s["ip"])
        if args.overlay:
            ov = Overlay(lab, info["bindir"], os.path.join(state, "overlay"), detached=state)
            ov.start(narrate=True)
            info["cfg"] = ov.cfg
            info["node_id"] = ov.node_id
            info["sip"] = ov.sip
            with open(_state_file(state), "w") as f:
                json.dump(info, f, indent=1)
            for site in SITES:
                ok, out = ov.register_phone(site)
                if not ok:
                    raise RuntimeError("%s's phone could not register:\n%s" % (site, out[-2000:]))
                say("%s: %s's phone (sipp at %s:%d) registered at %s's node", site,
                    ov.user[site], PHONE_IP, PHONE_PORT, ov.user[site])
            say("a call: scripts/netlab.sh call home-sym1 pubhost")
        _live_labs.remove(lab)  # stays up after we exit
    except TagInUse as e:  # nothing of ours to take down; the namespaces are another run's
        print("netlab: %s" % e, file=sys.stderr)
        os.unlink(_state_file(state))
        return 1
    except BaseException as e:
        by_signal = isinstance(e, KeyboardInterrupt)
        say("%s: taking the lab down again", "interrupted" if by_signal else "failed: %s" % e)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # not twice
            signal.signal(sig, signal.SIG_IGN)
        _down(state, keep=True)
        if not by_signal and not isinstance(e, (RuntimeError, AssertionError, OSError)):
            raise
        return 130 if by_signal else 1
    say("up. 'scripts/netlab.sh status' shows it, 'scripts/netlab.sh down' removes it; "
        "a shell in a namespace: ip netns exec %s bash", lab.site_ns("home-eim"))
    return 0


def _down(state, keep=False):
    try:
        with open(_state_file(state)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        print("netlab: no lab in %s" % state, file=sys.stderr)
        return 1
    lab = Lab(info["tag"])
    piddir = os.path.join(state, "pids")
    names = sorted(os.listdir(piddir)) if os.path.isdir(piddir) else []
    # ordinary nodes first, then super nodes, bootstrap and login server (reverse start order)
    order = [s["user"] for s in SITES.values()] + list(reversed(SNS)) + ["bootstrap",
                                                                         "loginserver"]
    names.sort(key=lambda n: order.index(n[:-4]) if n[:-4] in order else -1)
    inodes = {ns_inode(n) for n in lab.existing()}
    for n in names:
        try:
            with open(os.path.join(piddir, n)) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            continue
        ino = pid_netns_inode(pid)
        if ino is not None and ino in inodes:  # still ours: in one of the lab's namespaces
            stop_pid(pid, ino)
            say("stopped %s (pid %d)", n[:-4], pid)
        os.unlink(os.path.join(piddir, n))
    lab.destroy()
    say("namespaces nl%s-* deleted", lab.tag)
    if not keep:
        shutil.rmtree(state, ignore_errors=True)
    else:
        os.unlink(_state_file(state))
    return 0


def cmd_down(args):
    return _down(os.path.abspath(args.state), keep=args.keep)


def _load_overlay(state):
    with open(_state_file(state)) as f:
        info = json.load(f)
    lab = Lab(info["tag"])
    if not info.get("cfg"):
        return lab, None
    ov = Overlay(lab, info["bindir"], os.path.join(state, "overlay"))
    ov.cfg, ov.node_id, ov.sip = info["cfg"], info["node_id"], info["sip"]
    return lab, ov


def cmd_call(args):
    state = os.path.abspath(args.state)
    try:
        lab, ov = _load_overlay(state)
    except (OSError, ValueError):
        print("netlab: no lab in %s" % state, file=sys.stderr)
        return 1
    if not ov:
        print("netlab: the lab runs no overlay (up --no-overlay)", file=sys.stderr)
        return 1
    for site in (args.caller, args.callee):
        if site not in SITES:
            print("netlab: unknown site %r (sites: %s)" % (site, " ".join(SITES)),
                  file=sys.stderr)
            return 2
    if args.caller == args.callee:
        print("netlab: a site calling itself", file=sys.stderr)
        return 2
    for site in (args.caller, args.callee):
        ok, out = ov.register_phone(site)
        if not ok:
            print(out[-3000:])
            print("netlab: %s's phone could not register" % site, file=sys.stderr)
            return 1
    u1, u2 = ov.user[args.caller], ov.user[args.callee]
    say("%s's phone (%s, %s) calls sip:%s@%s (%s, %s)", u1, args.caller, where(args.caller),
        u2, OVERLAY, args.callee, where(args.callee))
    ok, took, out1, out2 = ov.call(args.caller, args.callee)
    if args.verbose or not ok:
        print(out1[-3000:] + "\n" + out2[-3000:])
    counts = []
    for out in (out1, out2):
        m = re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out)
        f = re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out)
        counts.append("%s successful, %s failed" % (m.group(1) if m else "?",
                                                     f.group(1) if f else "?"))
    say("caller: %s; callee: %s; %.2f s from INVITE to the BYE's answer", counts[0],
        counts[1], took)
    for site, other in ((args.caller, args.callee), (args.callee, args.caller)):
        st = ov.status(site) or {}
        chans = st.get("channels")
        if chans is None:
            say("%s's node: no channels reported (this build has none)", site)
            continue
        ch = [c for c in chans if c.get("peer") == ov.node_id.get(ov.user[other])]
        if not ch:
            say("%s's node: no channel to %s's node", site, ov.user[other])
        for c in ch:
            say("%s's node: channel to %s %s, %s, %s -> %s, opened in %s ms", site,
                ov.user[other], c.get("state"), c.get("path"), c.get("local"), c.get("remote"),
                c.get("opened_ms"))
    return 0 if ok else 1


def cmd_status(args):
    state = os.path.abspath(args.state)
    try:
        with open(_state_file(state)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        print("netlab: no lab in %s" % state)
        return 1
    lab = Lab(info["tag"])
    present = set(lab.existing())
    print("lab %s (state %s)" % (lab.tag, state))
    for role, name in lab.ns.items():
        if name not in present:
            print("  %-10s %-18s MISSING" % (role, name))
            continue
        out = _run(["ip", "-n", name, "-br", "-4", "addr"], check=False).stdout
        addrs = " ".join(a for line in out.splitlines() for a in line.split()[2:]
                         if not a.startswith("127."))
        kind = ""
        if role in ROUTERS:
            kind = "NAT: " + NAT_WORDS[ROUTERS[role]["nat"]]
        print("  %-10s %-18s %s %s" % (role, name, addrs, kind))
    piddir = os.path.join(state, "pids")
    if os.path.isdir(piddir):
        print("daemons:")
        for n in sorted(os.listdir(piddir)):
            with open(os.path.join(piddir, n)) as f:
                pid = int(f.read())
            alive = pid_netns_inode(pid) in {ns_inode(x) for x in present}
            print("  %-12s pid %-7d %s" % (n[:-4], pid, "running" if alive else "GONE"))
    _, ov = _load_overlay(state)
    if ov:
        print("ordinary nodes:")
        for site in SITES:
            print("  " + ov.describe(site))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="netlab.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_state = os.environ.get("NETLAB_STATE", "/tmp/p2psip-netlab")
    p = sub.add_parser("up", help="build the topology (and start the overlay)")
    p.add_argument("--state", default=default_state)
    p.add_argument("--bindir", default=os.path.join(os.path.dirname(HERE), "..", "..", "build"))
    p.add_argument("--tag")
    p.add_argument("--no-overlay", dest="overlay", action="store_false")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("down", help="stop the daemons, delete the namespaces")
    p.add_argument("--state", default=default_state)
    p.add_argument("--keep", action="store_true", help="keep the state directory (logs)")
    p.set_defaults(fn=cmd_down)
    p = sub.add_parser("status", help="namespaces, addresses, NAT types, daemons, nodes")
    p.add_argument("--state", default=default_state)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("call", help="a call from one site's phone to another's")
    p.add_argument("--state", default=default_state)
    p.add_argument("-v", "--verbose", action="store_true", help="show sipp's screens")
    p.add_argument("caller", help="site: " + ", ".join(SITES))
    p.add_argument("callee")
    p.set_defaults(fn=cmd_call)
    p = sub.add_parser("stun", help="RFC 5389 Binding requests from one socket")
    p.add_argument("--bind", default="0.0.0.0:0")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("servers", nargs="+")
    p.set_defaults(fn=cmd_stun)
    p = sub.add_parser("udp-serve", help="answer one datagram, plus unsolicited ones")
    p.add_argument("--bind", required=True)
    p.add_argument("--also", action="append", default=[])
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(fn=cmd_udp_serve)
    p = sub.add_parser("udp-probe", help="send one datagram, print what comes back")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--wait", type=float, default=1.5)
    p.set_defaults(fn=cmd_udp_probe)
    p = sub.add_parser("tcp-probe", help="exit 0 if a TCP connection is accepted")
    p.add_argument("--to", required=True)
    p.add_argument("--wait", type=float, default=1.0)
    p.set_defaults(fn=cmd_tcp_probe)
    p = sub.add_parser("tcp-listen", help="accept TCP connections for a while")
    p.add_argument("--bind", required=True)
    p.add_argument("--wait", type=float, default=5.0)
    p.set_defaults(fn=cmd_tcp_listen)
    args = ap.parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
