#!/usr/bin/env python3
"""Calls with audio across the NAT lab (issue 17's acceptance test), checked by content.

The lab of tests/integration/netlab.py with its overlay; at each of the six host sites
(home-eim, home-sym1, home-sym2, lan1, lan2, pubhost) one real phone nobody here wrote:
Debian's baresip 1.0.0 (tests/integration/phone.py), registered at the site's ordinary node
(127.0.0.1:5060 of the site's host, UDP, no password) from 127.0.0.1:5070, codec PCMU only,
no sound hardware: each site's phone sends a tone of its own frequency (TONES) and writes
what it receives, decoded, to a WAV file.

For every pair of sites (15; NETLAB_BOTH_WAYS=1: each pair both ways, 30) X's phone dials
sip:<Y's user>@lab.p2psip, Y's phone answers at once; the call stays up until each phone's
recording holds 3.5 s of the other's tone (at most AUDIO_WAIT), then X hangs up. Checked:

  * by content: X's recording holds Y's tone, and Y's recording X's, for >= 3 s each
    (100 ms windows: Goertzel power at the tone >= 60 % of the window's energy, loud enough,
    the listener's own tone 10 dB weaker or more: an echo or the wrong stream fails);
  * both nodes list the call in `ordinarynode status --json` ("media": {"calls": [{"call_id",
    "peer", "path": "direct"|"relayed", "via", "streams": [{"from_phone": {...},
    "to_phone": {"packets", "lost", "loss"}}]}]}), read while the call is up: path direct or
    relayed, packets both ways on both nodes, loss <= 1 % in each of the four counters;
  * from packet captures (tcpdump on `lo` of both hosts, where phone and node talk): the
    RTP packets X's phone sent (its SSRC, from its port) that Y's node delivered to Y's phone
    (same SSRC and sequence number), and the other way: loss <= 1 % once audio flows, and the
    one-way time through both nodes and the lab (the namespaces share one clock: Y's capture
    time minus X's, median over the packets).

For HOLD_PAIRS (symmetric NAT to symmetric NAT among them) X also puts the call on hold and
resumes it (re-INVITEs, sendonly then sendrecv): after the resume, each phone must again
receive the other's tone for >= 2 s (decoded from the RTP delivered to it, in the capture:
baresip 1.0.0's recorder stops at a hold, see phone.py) and baresip's own receive counters
must grow.

A classical baresip (gina, CLASSIC) on the host of home-sym2, behind its symmetric NAT, registers
with a password at sn1's public SIP front end (domain pbx.lab; its Contact and SDP name its
private address): overlay phones at home-sym1 (symmetric NAT too) and pubhost call it, and it
calls one; both sides must hear each other's tone for >= 3 s and sn1 must list the call's media
latched to where gina's packets come from.

Disjoint pairs are called at the same time (a round-robin schedule: 5 rounds of 3 calls, each
phone in one call at a time); NETLAB_MEDIA_SERIAL=1 makes one call at a time. A table is
printed: pair, NAT types, path (X's node; via which super node), set-up time (dial to
CALL_ESTABLISHED at X), one-way latency each way, loss each way (nodes' counters), seconds of
tone each phone heard. Phone logs are saved in <build dir>/test_netlab_media-logs/ with the
daemons' logs, and the captures and recordings too when the test fails (or with
NETLAB_MEDIA_KEEP=1)."""

import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import netlab  # noqa: E402
import phone  # noqa: E402

BINDIR = None
BOTH_WAYS = os.environ.get("NETLAB_BOTH_WAYS") == "1"
SERIAL = os.environ.get("NETLAB_MEDIA_SERIAL") == "1"
KEEP = os.environ.get("NETLAB_MEDIA_KEEP") == "1"  # recordings and captures kept, pass or fail
NAT_SHORT = {"eim": "EIM", "symmetric": "SYM", None: "public"}
# One tone per site: multiples of 10 Hz (whole Goertzel bins over 100 ms), 200 Hz apart, well
# inside PCMU's 4 kHz band; none a harmonic of another's that would matter (a pure sine has
# none).
TONES = {"home-eim": 400, "home-sym1": 600, "home-sym2": 800, "lan1": 1000, "lan2": 1200,
         "pubhost": 1400}
HOLD_PAIRS = [("home-sym1", "home-sym2"), ("home-eim", "pubhost")]
NEED_S = 3.0  # seconds of the other's tone each recording must hold
AIM_S = 3.5  # the call stays up until both hold this much (or AUDIO_WAIT passes)
AFTER_RESUME_S = 2.0  # seconds of tone each phone must receive after a resume
MAX_LOSS = 0.01
CTRL_PORT = 4444  # baresip's control port, on 127.0.0.1 of each site's host
RTP_PORTS = (16000, 16999)  # the phones' RTP ports (each host has its own)
# A classical phone (no overlay node of its own) at sn1's public SIP front end, on the host of a
# symmetric-NAT site, registered with a password: its Contact and SDP name its private address.
FRONT_DOMAIN = "pbx.lab"
CLASSIC = {"site": "home-sym2", "user": "gina", "password": "gina-secret", "freq": 1600,
           "port": 5072, "ctrl": 4445, "rtp": (17000, 17999)}
CLASSIC_CALLERS = ("home-sym1", "pubhost")  # overlay phones that call it


def say(fmt, *args):
    print("  [netlab-media] " + (fmt % args if args else fmt), file=sys.stderr, flush=True)


def slow_factor():
    """1 in a normal build, 2 in a sanitizer build (P2P_SANITIZE), 4 under P2P_TEST_WRAPPER
    (valgrind)."""
    if harness.WRAPPER:
        return 4
    try:
        with open(os.path.join(BINDIR, "CMakeCache.txt")) as f:
            if "P2P_SANITIZE:BOOL=ON" in f.read():
                return 2
    except OSError:
        pass
    return 2 if os.environ.get("ASAN_OPTIONS") else 1


def rounds(sites):
    """Round-robin schedule (circle method): every pair of sites once, in rounds of disjoint
    pairs; each pair ordered as the sites are."""
    s = list(sites)
    if len(s) % 2:
        s.append(None)
    order = {x: i for i, x in enumerate(sites)}
    out = []
    for _ in range(len(s) - 1):
        r = []
        for i in range(len(s) // 2):
            a, b = s[i], s[-1 - i]
            if a is not None and b is not None:
                r.append((a, b) if order[a] < order[b] else (b, a))
        out.append(r)
        s = [s[0]] + [s[-1]] + s[1:-1]
    return out


class Listener:
    """What one phone heard during one call, analysed as its recording grows."""

    def __init__(self, ph, freq):
        self.ph, self.freq = ph, freq
        ph.archive_recordings()
        self.done = 0  # samples analysed
        self.seconds = 0.0

    def update(self):
        s = self.ph.received()
        n = int(phone.RATE * phone.WINDOW_S)
        usable = (len(s) - self.done) // n * n
        if usable > 0:
            self.seconds += phone.tone_seconds(s[:self.done + usable], self.freq,
                                               [self.ph.freq], start=self.done)
            self.done += usable
        return self.seconds

    def final(self):
        """(seconds of the tone, a description) over the whole recording, now closed."""
        s = self.ph.received()
        return (phone.tone_seconds(s, self.freq, [self.ph.freq]),
                phone.describe_audio(s, self.freq, [self.ph.freq]))


def stream_of(call):
    for s in (call or {}).get("streams") or []:
        if s.get("media") == "audio":
            return s
    return None


def loss_of(leg):
    """A direction's loss from its counters: "loss", else lost / (packets + lost)."""
    if not isinstance(leg, dict):
        return None
    if isinstance(leg.get("loss"), (int, float)):
        return float(leg["loss"])
    pk, lost = leg.get("packets"), leg.get("lost")
    if isinstance(pk, int) and isinstance(lost, int) and pk + lost > 0:
        return lost / float(pk + lost)
    return None


def fmt_loss(x):
    return "-" if x is None else "%.1f%%" % (100 * x)


class Media(unittest.TestCase):
    lab = None
    ov = None
    phones = {}
    captures = {}
    tmp = None
    failed = False

    @classmethod
    def setUpClass(cls):
        harness.require(os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft"),
                        "needs root, iproute2 and nftables for network namespaces")
        harness.require(shutil.which("baresip") and all(os.path.exists(os.path.join(
            phone.MODULES, m + ".so")) for m in ("g711", "aufile", "sndfile", "ctrl_tcp",
                                                 "menu", "account")),
                        "needs baresip with its g711, aufile, sndfile, ctrl_tcp modules "
                        "(Debian: baresip-core)")
        harness.require(shutil.which("tcpdump"), "needs tcpdump")
        cls.slow = slow_factor()
        cls.tmp = tempfile.mkdtemp(prefix="p2psip-netlab-media-")
        cls.on_signal()
        cls.phones, cls.captures = {}, {}
        cls.lab = netlab.Lab()
        try:
            t0 = time.monotonic()
            cls.lab.create()
            cls.ov = netlab.Overlay(cls.lab, BINDIR, os.path.join(cls.tmp, "ov"), front_end={
                "domain": FRONT_DOMAIN, "users": {CLASSIC["user"]: CLASSIC["password"]}})
            cls.ov.start()
            say("lab %s and overlay up in %.1f s", cls.lab.tag, time.monotonic() - t0)
            for site in netlab.SITES:
                ns = cls.lab.site_ns(site)
                cls.captures[site] = phone.Capture(
                    os.path.join(cls.tmp, site + ".pcap"), "lo", "udp",
                    ["ip", "netns", "exec", ns]).start()
                cls.phones[site] = phone.Phone(
                    site, os.path.join(cls.tmp, "phone-" + site), TONES[site],
                    cls.ov.user[site], netlab.OVERLAY, registrar=cls.ov.sip[site],
                    listen="%s:%d" % (netlab.PHONE_IP, netlab.PHONE_PORT), ctrl_port=CTRL_PORT,
                    rtp_ports=RTP_PORTS, netns=ns, tone_s=120 * cls.slow)
            cs = CLASSIC["site"]
            cls.classic = phone.Phone(
                "classic", os.path.join(cls.tmp, "phone-classic"), CLASSIC["freq"],
                CLASSIC["user"], FRONT_DOMAIN, registrar=cls.ov.front_end_addr,
                listen="%s:%d" % (netlab.Lab.host_ip(cs), CLASSIC["port"]),
                ctrl_port=CLASSIC["ctrl"], rtp_ports=CLASSIC["rtp"],
                netns=cls.lab.site_ns(cs), tone_s=120 * cls.slow, regint=60,
                password=CLASSIC["password"])
            cls.phones["classic"] = cls.classic
            for site, ph in cls.phones.items():
                ph.start(timeout=15 * cls.slow)
                say("%s: %s's phone (baresip, %d Hz) registered at %s", site, ph.user, ph.freq,
                    ph.registrar)
        except BaseException:
            cls.failed = True
            cls.tearDownClass()
            raise

    @classmethod
    def on_signal(cls):
        """On SIGTERM/SIGINT/SIGHUP: the phones and captures stopped and the temporary folder
        removed, then netlab's handler (the lab destroyed, exit)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            prev = signal.getsignal(sig)

            def handler(signum, frame, prev=prev):
                for ph in list(cls.phones.values()):
                    ph.stop()
                for cap in list(cls.captures.values()):
                    cap.stop()
                if cls.tmp:
                    shutil.rmtree(cls.tmp, ignore_errors=True)
                if callable(prev):
                    prev(signum, frame)
                os._exit(128 + signum)

            signal.signal(sig, handler)

    @classmethod
    def tearDownClass(cls):
        problems = []
        for ph in cls.phones.values():
            ph.stop()
        for cap in cls.captures.values():
            cap.stop()
        out = os.path.join(BINDIR, "test_netlab_media-logs") if BINDIR else None
        if out:
            shutil.rmtree(out, ignore_errors=True)
        if cls.ov:
            cls.ov.save_logs(out)
            problems = cls.ov.stop()
            logs = "\n".join(d.log() for d in cls.ov.daemons)
            if "AddressSanitizer" in logs or "runtime error" in logs:
                problems.append("a sanitizer reported an error (see test_netlab_media-logs)")
        if out and cls.tmp and os.path.isdir(cls.tmp):
            os.makedirs(out, exist_ok=True)
            for site, ph in cls.phones.items():
                if os.path.exists(ph.log_path):
                    shutil.copy(ph.log_path, os.path.join(out, "phone-%s.log" % site))
                if (cls.failed or KEEP) and os.path.isdir(ph.rec_dir):
                    shutil.copytree(ph.rec_dir, os.path.join(out, "rec-" + site),
                                    dirs_exist_ok=True)
            if cls.failed or KEEP:
                for site, cap in cls.captures.items():
                    if os.path.exists(cap.path):
                        shutil.copy(cap.path, os.path.join(out, site + ".pcap"))
        if cls.lab:
            cls.lab.destroy()
        if cls.tmp:
            shutil.rmtree(cls.tmp, ignore_errors=True)
        if problems:
            raise AssertionError("; ".join(problems))

    # ---- what the nodes say ----

    def media_call(self, site, other, call_id):
        """The entry of site's node's "media" calls with this SIP Call-ID (the phones' own:
        proxies keep it): (entry or None, a word on what was found)."""
        st = self.ov.status(site)
        if st is None:
            return None, "status did not answer"
        media = st.get("media")
        if not isinstance(media, dict):
            return None, "no \"media\" block in its status"
        calls = media.get("calls") or []
        for c in calls:
            if c.get("call_id") == call_id:
                return c, "ok"
        return None, "call %s with %s's node not listed (%d calls: %s)" % (
            call_id, other, len(calls), ", ".join("%s with %s" % (
                c.get("call_id"), self.ov.peer_name(str(c.get("peer")))) for c in calls))

    def check_node(self, site, other, entry, why, problems):
        """Asserts what site's node says of the call; returns (path text, from_phone loss,
        to_phone loss)."""
        if entry is None:
            problems.append("%s's node: %s" % (site, why))
            return "-", None, None
        path = entry.get("path")
        if path not in ("direct", "relayed"):
            problems.append("%s's node: media path %r (want direct or relayed): %s"
                            % (site, path, entry))
        s = stream_of(entry)
        if s is None:
            problems.append("%s's node: no audio stream listed: %s" % (site, entry))
            return str(path), None, None
        losses = []
        for leg in ("from_phone", "to_phone"):
            c = s.get(leg)
            if not isinstance(c, dict) or not c.get("packets"):
                problems.append("%s's node: no packets %s: %s" % (site, leg.replace("_", " "),
                                                                  s))
                losses.append(None)
                continue
            loss = loss_of(c)
            losses.append(loss)
            if loss is None or loss > MAX_LOSS:
                problems.append("%s's node: loss %s %s (max %s): %s" % (
                    site, leg.replace("_", " "), fmt_loss(loss), fmt_loss(MAX_LOSS), c))
        text = str(path)
        if entry.get("via"):
            text += " via " + self.node_name(str(entry["via"]))
        return text, losses[0], losses[1]

    def node_name(self, text):
        """"sn2" for "super node 1a2b3c4d" (a node id or a prefix of one), else the text."""
        words = text.split()
        key = words[-1].lower() if words else ""
        for u, nid in self.ov.node_id.items():
            if key and nid.startswith(key):
                return u
        return text

    # ---- what went over the phones' loopback ----

    def through_nodes(self, x, y, ix, iy, since, until):
        """RTP X's phone sent (on X's lo: from its port, its SSRC) matched with what Y's node
        delivered to Y's phone (on Y's lo: to its port, same SSRC and sequence number):
        (latencies in s, packets sent once audio flowed, of those delivered)."""
        sent = [p for p in phone.rtp_from_pcap(self.captures[x].path, since, until)
                if p["sport"] == ix["port"] and p["ssrc"] == ix["ssrc"]]
        got = {}
        for p in phone.rtp_from_pcap(self.captures[y].path, since, until + 2):
            if p["dport"] == iy["port"] and p["ssrc"] == ix["ssrc"]:
                got.setdefault(p["seq"], p["t"])
        if not sent or not got:
            return [], len(sent), 0
        # audio flows from the first packet that arrived on: losses before are the set-up's
        first = min(p["t"] for p in sent if p["seq"] in got)
        lat, n, delivered = [], 0, 0
        for p in sent:
            if p["t"] < first or p["t"] > until - 0.5:  # the last ones may still be on the way
                continue
            n += 1
            if p["seq"] in got:
                delivered += 1
                lat.append(got[p["seq"]] - p["t"])
        return lat, n, delivered

    def heard_after(self, site, info, since, until, freq, own):
        """Seconds of freq in the RTP delivered to site's phone (its port) in [since, until]."""
        pk = [p for p in phone.rtp_from_pcap(self.captures[site].path, since, until)
              if p["dport"] == info["port"]]
        return phone.tone_seconds(phone.pcmu_samples(pk), freq, [own]), len(pk)

    # ---- one call ----

    def call(self, x, y, hold=False):
        """x's phone calls y's user: a row for the table and a list of problems."""
        px, py = self.phones[x], self.phones[y]
        row = {"pair": "%s -> %s" % (x, y),
               "nat": "%s/%s" % (NAT_SHORT[netlab.nat_kind(x)], NAT_SHORT[netlab.nat_kind(y)])}
        problems = []
        hx, hy = Listener(px, py.freq), Listener(py, px.freq)  # x hears y's tone
        my = py.mark()
        wall0 = time.time()
        t0 = time.monotonic()
        cid = None
        try:
            since = px.dial("sip:%s@%s" % (py.user, netlab.OVERLAY))
            cid, t_est = px.wait_established(20 * self.slow, since)
            row["setup"] = "%.2f s" % (t_est - t0)
            py.wait_established(10 * self.slow, my)
            deadline = time.monotonic() + 12 * self.slow
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if hx.update() >= AIM_S and hy.update() >= AIM_S:
                    break
            ix, iy = px.rtp_info(), py.rtp_info()
            ex, wx = self.media_call(x, y, cid)
            ey, wy = self.media_call(y, x, cid)
            row["path"], lx_from, lx_to = self.check_node(x, y, ex, wx, problems)
            path_y, ly_from, ly_to = self.check_node(y, x, ey, wy, problems)
            if ex and ey and ex.get("path") != ey.get("path"):
                problems.append("the nodes disagree on the path: %s says %s, %s says %s"
                                % (x, ex.get("path"), y, ey.get("path")))
            row["loss"] = "%s / %s" % (fmt_loss(max((v for v in (lx_from, ly_to)
                                                     if v is not None), default=None)),
                                       fmt_loss(max((v for v in (ly_from, lx_to)
                                                     if v is not None), default=None)))
            if hold:
                row["hold"] = self.hold_resume(x, y, px, py, problems)
            t_end = time.time()
            my = py.mark()
            px.hangup(10 * self.slow)
            py.wait_closed(10 * self.slow, my)
        except AssertionError as e:
            problems.append(str(e).split("\n")[0])
            row.setdefault("setup", "FAILED")
            for ph in (px, py):
                try:
                    ph.command("hangup")
                except AssertionError:
                    pass
            return row, problems
        for who, other, li in ((x, y, hx), (y, x, hy)):
            secs, text = li.final()
            row["heard_" + ("x" if who == x else "y")] = "%.1f" % secs
            if secs < NEED_S:
                problems.append("%s's phone heard %s's %d Hz tone for %.1f s (want >= %.1f): %s"
                                % (who, other, li.freq, secs, NEED_S, text))
        for site in (x, y):  # the BYE and its 200 went over lo after t_end: wait for them
            self.captures[site].sync(t_end, 3 * self.slow)
        lats = []
        for a, b, ia, ib, key in ((x, y, ix, iy, "x"), (y, x, iy, ix, "y")):
            if not (ia.get("port") and ia.get("ssrc") is not None and ib.get("port")):
                lats.append("?")
                continue
            lat, n, delivered = self.through_nodes(a, b, ia, ib, wall0, t_end)
            if not lat:
                lats.append("-")
                if not n:
                    problems.append("capture: %s's phone sent no RTP to its node (on its host's "
                                    "loopback): its media was not anchored there" % a)
                else:
                    problems.append("capture: none of the %d RTP packets %s's phone sent its "
                                    "node (SSRC %08x) reached %s's phone" % (n, a, ia["ssrc"], b))
                continue
            lats.append("%.2f" % (1000 * statistics.median(lat)))
            if n and 1 - delivered / float(n) > MAX_LOSS:
                problems.append("capture: %d of %d RTP packets %s -> %s lost once audio flowed "
                                "(%.1f%%)" % (n - delivered, n, a, b,
                                              100 * (1 - delivered / float(n))))
        row["latency"] = " / ".join(lats)
        return row, problems

    def hold_resume(self, x, y, px, py, problems):
        """Hold (x sends sendonly), resume; then each phone must receive the other's tone."""
        px.hold()
        time.sleep(1.5 * self.slow)
        before = (px.rtp_info()["rx_packets"], py.rtp_info()["rx_packets"])
        px.resume()
        t_resume = time.time()
        time.sleep((AFTER_RESUME_S + 1.5) * self.slow)
        ix, iy = px.rtp_info(), py.rtp_info()
        t_end = time.time()
        for site in (x, y):
            self.captures[site].sync(t_end, 3 * self.slow)
        words = []
        for who, info, freq, own, b in ((x, ix, py.freq, px.freq, before[0]),
                                        (y, iy, px.freq, py.freq, before[1])):
            secs, n = self.heard_after(who, info, t_resume, t_end, freq, own)
            grown = info["rx_packets"] - b
            words.append("%.1f s" % secs)
            if secs < AFTER_RESUME_S:
                problems.append("after resume, %s's phone received %.1f s of the %d Hz tone "
                                "from its node (%d RTP packets to its port on lo; want >= "
                                "%.1f s)"
                                % (who, secs, freq, n, AFTER_RESUME_S))
            if grown < AFTER_RESUME_S * 50 * 0.9:
                problems.append("after resume, %s's phone counted %d RTP packets received "
                                "(want >= %d)" % (who, grown, AFTER_RESUME_S * 50 * 0.9))
        return "resumed: " + " / ".join(words)

    def sn1_media(self):
        p = self.lab.run("pub", [self.ov.bin("supernode"), "-c", self.ov.cfg["sn1"], "status",
                                 "--json"])
        import json
        return json.loads(p.stdout).get("sip_media", {}) if p.returncode == 0 else {}

    def test_classical_phone_behind_symmetric_nat(self):
        """gina's classical baresip, behind home-sym2's symmetric NAT, registered at sn1's
        public front end with her password (Contact and SDP: her private address) is called by
        overlay phones (home-sym1: symmetric NAT too; pubhost), and calls one herself: both
        sides hear each other, sn1 latched her media to her NAT's mapping."""
        g = self.classic
        problems = []
        calls = [(x, "in") for x in CLASSIC_CALLERS] + [(CLASSIC_CALLERS[0], "out")]
        for x, way in calls:
            px = self.phones[x]
            if way == "in":
                # The NAT forgets a UDP mapping that saw one request and its answer 30 s after
                # (Linux conntrack), and the front end sends no keepalives of its own: a phone
                # behind NAT keeps its flow open by registering again soon enough. The test's
                # phone registers again right before it is called (a restart: a new mapping).
                g.stop()
                g.start(timeout=15 * self.slow)
            caller, callee = (px, g) if way == "in" else (g, px)
            uri = ("sip:%s@%s" % (g.user, FRONT_DOMAIN) if way == "in"
                   else "sip:%s@%s" % (px.user, netlab.OVERLAY))
            hc, hg = Listener(px, g.freq), Listener(g, px.freq)
            mark = callee.mark()
            t0 = time.monotonic()
            try:
                since = caller.dial(uri)
                caller.wait_established(20 * self.slow, since)
                callee.wait_established(10 * self.slow, mark)
                setup = time.monotonic() - t0
                deadline = time.monotonic() + 12 * self.slow
                while time.monotonic() < deadline:
                    time.sleep(0.5)
                    if hc.update() >= AIM_S and hg.update() >= AIM_S:
                        break
                st = self.sn1_media()
                mark = callee.mark()
                caller.hangup(10 * self.slow)
                callee.wait_closed(10 * self.slow, mark)
            except AssertionError as e:
                problems.append("%s %s gina: %s" % (x, "calls" if way == "in" else "called by",
                                                    str(e).split("\n")[0]))
                for ph in (caller, callee):
                    try:
                        ph.command("hangup")
                    except AssertionError:
                        pass
                continue
            calls_st = st.get("calls", [])
            path = calls_st[0]["path"] if calls_st else "none"
            latched = bool(calls_st) and all(s.get("latched") for s in calls_st[0]["streams"])
            heard = {}
            for who, li, other in ((x, hc, "gina"), ("gina", hg, x)):
                secs, text = li.final()
                heard[who] = secs
                if secs < NEED_S:
                    problems.append("%s's phone heard %s's tone for %.1f s (want >= %.1f): %s"
                                    % (who, other, secs, NEED_S, text))
            say("%-9s %s gina (classical, behind home-sym2's symmetric NAT, at sn1's front "
                "end): set-up %.2f s, sn1's media path %s, latched %s, heard %.1f s / %.1f s",
                x, "->" if way == "in" else "<-", setup, path, latched, heard[x], heard["gina"])
            if not calls_st:
                problems.append("sn1 lists no call with media while %s and gina talked" % x)
            elif not latched:
                problems.append("sn1 did not latch gina's media: %s" % calls_st[0])
        if problems:
            type(self).failed = True
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    def test_audio_between_every_pair_of_sites(self):
        t_start = time.monotonic()
        schedule = rounds(list(netlab.SITES))
        if BOTH_WAYS:
            schedule += [[(y, x) for x, y in r] for r in schedule]
        if SERIAL:
            schedule = [[p] for r in schedule for p in r]
        results = {}

        def run(x, y):
            try:
                results[(x, y)] = self.call(x, y, hold=(x, y) in HOLD_PAIRS)
            except Exception:  # anything unexpected: a problem of this pair, the rest go on
                results[(x, y)] = ({"pair": "%s -> %s" % (x, y), "nat": "?", "setup": "ERROR"},
                                   [traceback.format_exc()])

        for r in schedule:
            threads = [threading.Thread(target=run, args=p) for p in r]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            say("round of %s: %s", ", ".join("%s->%s" % p for p in r),
                "; ".join("%s->%s %s" % (p + ("ok" if not results[p][1] else "FAILED",))
                          for p in r))
        order = [p for r in schedule for p in r]
        fmt = "%-23s %-11s %-26s %-8s %-15s %-13s %-9s %s"
        say(fmt, "pair", "NAT", "path (caller's node)", "set-up", "latency ms ->/<-",
            "loss ->/<-", "heard s", "hold/resume")
        for p in order:
            row = results[p][0]
            say(fmt, row["pair"], row.get("nat", "?"), row.get("path", "-"),
                row.get("setup", "-"), row.get("latency", "-"), row.get("loss", "-"),
                "%s/%s" % (row.get("heard_x", "-"), row.get("heard_y", "-")),
                row.get("hold", ""))
        say("%d calls in %.1f s (%s)", len(order), time.monotonic() - t_start,
            "one at a time" if SERIAL else "disjoint pairs at the same time")
        failures = ["%s -> %s: %s" % (p + ("\n      ".join(results[p][1]),))
                    for p in order if results[p][1]]
        if failures:
            type(self).failed = True
        self.assertEqual(failures, [], "\n" + "\n".join(failures))


if __name__ == "__main__":
    harness.main(sys.modules[__name__])
