#!/usr/bin/env python3
"""The CPU an ordinary node spends per call on media anchoring (ordinarynode/media.c): each
node takes its phones' RTP and carries it to the other node over their DTLS channel.

A small overlay on 127.0.0.1 (login server, bootstrap server, one super node, ordinary nodes
alice and bob, set up by tests/integration/harness.py in a temporary directory). One phone
per node, played here: a minimal SIP user agent over UDP (REGISTER at its node; alice's calls
bob@<overlay> N times at once, bob's answers each INVITE with 200 and its own SDP; ACK, BYE
along the Record-Route), one RTP socket per call and side. Once the N calls are up,
bench/media_load (pairs mode) plays RTP on them, 172-byte packets (PCMU, 20 ms) at 50
packets/s each way, to the address each side's SDP answer/offer named (the phone's own node
when it anchors media), and measures loss and one-way latency of every packet; then the same
number of calls straight between two sockets (the direct baseline) for the latency the two
nodes add.

Per step (--calls, e.g. 10,50,100): each node's CPU (utime+stime from /proc) over the RTP
run, less what it spent over as long a time with the same calls up and no RTP (keepalives,
timers); divided by call-seconds and by the packets it forwarded (every packet of a call
passes both nodes once: phone -> its node -> channel -> the other node -> phone).

    python3 bench/node_media_bench.py --bindir build-release [--calls 10,50,100] [--seconds 10]
    python3 bench/media_bench.py --bindir build-release --node-cpu [same options]
"""

import argparse
import json
import os
import random
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))
sys.path.insert(0, HERE)
import harness  # noqa: E402

OVERLAY = "media.bench.p2psip"
COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding"}


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- a minimal SIP user agent (UDP) ---------------------------------------------------------

class Msg:
    """A parsed SIP message: start line, headers (lower-case names, in order), body."""

    def __init__(self, data):
        text = data.decode("utf-8", "replace")
        head, _, self.body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        self.start = lines[0]
        self.headers = []
        for ln in lines[1:]:
            if ln[:1] in (" ", "\t") and self.headers:  # folded
                k, v = self.headers[-1]
                self.headers[-1] = (k, v + " " + ln.strip())
                continue
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            self.headers.append((COMPACT.get(k, k), v.strip()))
        p = self.start.split(" ", 2)
        self.is_response = p[0].startswith("SIP/")
        self.code = int(p[1]) if self.is_response else 0
        self.method = None if self.is_response else p[0]
        self.uri = None if self.is_response else p[1]

    def get(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name):
        """Every value of a header, comma-separated lists split (Via, Record-Route)."""
        out = []
        for k, v in self.headers:
            if k == name:
                out += [x.strip() for x in split_commas(v)]
        return out

    def cseq(self):
        n, m = self.get("cseq").split()
        return int(n), m

    def tag(self, name):
        m = re.search(r";\s*tag=([^;>\s]+)", self.get(name) or "")
        return m.group(1) if m else None


def split_commas(v):
    """Splits a header value at commas outside <> and quotes."""
    out, cur, depth, quote = [], "", 0, False
    for ch in v:
        if ch == '"':
            quote = not quote
        elif ch == "<" and not quote:
            depth += 1
        elif ch == ">" and not quote:
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def uri_of(v):
    m = re.search(r"<([^>]+)>", v)
    return m.group(1) if m else v.split(";")[0].strip()


def sdp(port, sess):
    return ("v=0\r\no=bench %d 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio %d RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n" % (sess, port))


def sdp_dest(body):
    """(ip, port) of the first audio stream of an SDP body, or None."""
    ip = None
    port = None
    for ln in body.replace("\r\n", "\n").split("\n"):
        if ln.startswith("c=IN IP4 ") and ip is None:
            ip = ln.split()[2]
        elif ln.startswith("m=audio "):
            port = int(ln.split()[1])
            break
        elif ln.startswith("c=IN IP4 ") and port is not None:
            ip = ln.split()[2]
    return (ip, port) if ip and port else None


def build(start, headers, body=""):
    h = "".join("%s: %s\r\n" % kv for kv in headers)
    if body:
        h += "Content-Type: application/sdp\r\n"
    return ("%s\r\n%sContent-Length: %d\r\n\r\n%s" % (start, h, len(body.encode()), body)).encode()


class Phone:
    """One phone (a UDP SIP socket) of `user`, registered at its node `node` ("ip:port")."""

    def __init__(self, user, node):
        self.user = user
        host, port = node.rsplit(":", 1)
        self.node = (host, int(port))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.contact = "<sip:%s@127.0.0.1:%d>" % (user, self.port)
        self.calls = {}  # Call-ID -> Call

    def via(self):
        return "SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s;rport" % (
            self.port, os.urandom(8).hex())

    def send(self, data):
        self.sock.sendto(data, self.node)

    def recv_all(self):
        out = []
        while True:
            try:
                data, _ = self.sock.recvfrom(65535)
            except BlockingIOError:
                return out
            if data.strip():
                out.append(Msg(data))

    def register(self, timeout=20):
        cid = "reg-%s-%s" % (self.user, os.urandom(6).hex())
        for cseq in range(1, 6):
            self.send(build("REGISTER sip:%s SIP/2.0" % OVERLAY, [
                ("Via", self.via()), ("Max-Forwards", "70"),
                ("From", "<sip:%s@%s>;tag=%s" % (self.user, OVERLAY, os.urandom(4).hex())),
                ("To", "<sip:%s@%s>" % (self.user, OVERLAY)), ("Call-ID", cid),
                ("CSeq", "%d REGISTER" % cseq), ("Contact", self.contact),
                ("Expires", "3600")]))
            end = time.monotonic() + timeout / 5
            while time.monotonic() < end:
                for m in self.recv_all():
                    if m.is_response and m.get("call-id") == cid and m.code >= 200:
                        if m.code == 200:
                            return
                        if m.code not in (500, 503):
                            raise RuntimeError("%s: REGISTER answered %s" % (self.user, m.start))
                        end = 0
                time.sleep(0.02)
        raise RuntimeError("%s: REGISTER not answered 200" % self.user)


class Call:
    def __init__(self, cid, rtp):
        self.cid = cid
        self.rtp = rtp  # this side's RTP socket
        self.dest = None  # where this side sends RTP (the other side's SDP)
        self.state = "new"
        self.last = None  # the message to retransmit
        self.last_t = 0.0
        self.tries = 0
        self.routes = []
        self.remote = None  # remote target (Contact)
        self.from_hdr = self.to_hdr = None
        self.answer = None  # callee: the 200
        self.code = None


def rtp_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


class Pair:
    """alice's phone calls bob's phone N times at once through their nodes."""

    def __init__(self, caller, callee):
        self.a, self.b = caller, callee
        self.sel = selectors.DefaultSelector()
        self.sel.register(caller.sock, selectors.EVENT_READ, caller)
        self.sel.register(callee.sock, selectors.EVENT_READ, callee)

    def pump(self, until, timeout):
        end = time.monotonic() + timeout
        while not until() and time.monotonic() < end:
            for key, _ in self.sel.select(0.05):
                ph = key.data
                for m in ph.recv_all():
                    (self.on_caller if ph is self.a else self.on_callee)(m)
            self.retransmit()
        return until()

    def retransmit(self):
        now = time.monotonic()
        for ph in (self.a, self.b):
            for c in ph.calls.values():
                if c.last and c.state in ("inviting", "answered", "byeing") and \
                        now - c.last_t > 0.5 * (2 ** min(c.tries, 3)):
                    ph.send(c.last)
                    c.last_t = now
                    c.tries += 1

    # caller side
    def invite(self, i):
        a = self.a
        cid = "call-%d-%s" % (i, os.urandom(6).hex())
        c = Call(cid, rtp_socket())
        c.from_hdr = "<sip:%s@%s>;tag=%s" % (a.user, OVERLAY, os.urandom(4).hex())
        c.to_hdr = "<sip:%s@%s>" % (self.b.user, OVERLAY)
        body = sdp(c.rtp.getsockname()[1], i + 1)
        c.last = build("INVITE sip:%s@%s SIP/2.0" % (self.b.user, OVERLAY), [
            ("Via", a.via()), ("Max-Forwards", "70"), ("From", c.from_hdr), ("To", c.to_hdr),
            ("Call-ID", cid), ("CSeq", "1 INVITE"), ("Contact", a.contact)], body)
        c.state, c.last_t = "inviting", time.monotonic()
        a.calls[cid] = c
        a.send(c.last)

    def in_dialog(self, c, method, cseq):
        hdrs = [("Via", self.a.via()), ("Max-Forwards", "70")]
        hdrs += [("Route", r) for r in c.routes]
        hdrs += [("From", c.from_hdr), ("To", c.to_hdr), ("Call-ID", c.cid),
                 ("CSeq", "%d %s" % (cseq, method)), ("Contact", self.a.contact)]
        return build("%s %s SIP/2.0" % (method, c.remote), hdrs)

    def on_caller(self, m):
        c = self.a.calls.get(m.get("call-id"))
        if not c or not m.is_response:
            return
        n, meth = m.cseq()
        if meth == "INVITE":
            if m.code < 200:
                c.tries = max(c.tries, 3)  # provisional: the node retransmits for us now
                c.last_t = time.monotonic() + 4
                return
            if m.code >= 300:
                c.state, c.code, c.last = "failed", m.code, None
                # ACK of a failure: same branch as the INVITE (hop by hop)
                return
            if c.state == "inviting":
                c.to_hdr = m.get("to")
                c.remote = uri_of(m.get("contact"))
                c.routes = list(reversed(m.all("record-route")))
                c.dest = sdp_dest(m.body)
                c.code = 200
                c.state, c.last = "up", None
            self.a.send(self.in_dialog(c, "ACK", 1))  # also for a retransmitted 200
        elif meth == "BYE" and m.code >= 200:
            c.state, c.last = "done", None

    def bye(self, c):
        c.last = self.in_dialog(c, "BYE", 2)
        c.state, c.last_t, c.tries = "byeing", time.monotonic(), 0
        self.a.send(c.last)

    # callee side
    def on_callee(self, m):
        b = self.b
        if m.is_response:
            return
        cid = m.get("call-id")
        c = b.calls.get(cid)
        if m.method == "INVITE" and not m.tag("to"):
            if c:  # retransmission
                if c.answer:
                    b.send(c.answer)
                return
            c = Call(cid, rtp_socket())
            c.dest = sdp_dest(m.body)
            b.calls[cid] = c
            hdrs = [("Via", v) for v in m.all("via")]
            hdrs += [("Record-Route", r) for r in m.all("record-route")]
            hdrs += [("From", m.get("from")),
                     ("To", "%s;tag=%s" % (m.get("to"), os.urandom(4).hex())),
                     ("Call-ID", cid), ("CSeq", m.get("cseq")), ("Contact", b.contact)]
            c.answer = build("SIP/2.0 200 OK", hdrs, sdp(c.rtp.getsockname()[1], 7))
            c.last, c.state, c.last_t = c.answer, "answered", time.monotonic()
            b.send(c.answer)
        elif m.method == "ACK":
            if c and c.state == "answered":
                c.state, c.last = "up", None
        elif m.method in ("BYE", "CANCEL", "INVITE", "UPDATE", "OPTIONS"):
            hdrs = [("Via", v) for v in m.all("via")]
            hdrs += [("From", m.get("from")), ("To", m.get("to")), ("Call-ID", cid),
                     ("CSeq", m.get("cseq"))]
            b.send(build("SIP/2.0 200 OK", hdrs))
            if c and m.method == "BYE":
                c.state = "done"


# ---- the bench ------------------------------------------------------------------------------

def find_load(bindir, tmp):
    built = os.path.join(bindir, "bench", "media_load")
    if os.access(built, os.X_OK):
        return built
    out = os.path.join(tmp, "media_load")
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-std=c11", "-o", out,
                    os.path.join(HERE, "media_load.c")], check=True)
    return out


def run_load(load, tmp, mode, n, seconds, drain, calls=None):
    argv = [load, "--mode", mode, "--calls", str(n), "--seconds", str(seconds),
            "--drain", str(drain)]
    fds = ()
    if mode == "pairs":
        mp = os.path.join(tmp, "pairs.txt")
        with open(mp, "w") as f:
            for ca, cb in calls:
                f.write("%d %s:%d %d %s:%d\n" % (ca.rtp.fileno(), ca.dest[0], ca.dest[1],
                                                cb.rtp.fileno(), cb.dest[0], cb.dest[1]))
        fds = tuple(x for ca, cb in calls for x in (ca.rtp.fileno(), cb.rtp.fileno()))
        argv += ["--map", mp]
    p = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True,
                       timeout=seconds + drain + 120)
    if p.returncode != 0:
        raise RuntimeError("media_load failed (%d): %s" % (p.returncode, p.stderr.strip()))
    r = json.loads(p.stdout)
    for d in ("ab", "ba"):
        r[d]["loss"] = (r[d]["sent"] - r[d]["recv"]) / r[d]["sent"] if r[d]["sent"] else 1.0
    r["gen_cpu"] = r["gen_cpu_send_s"] / (r["wall_send_s"] or seconds)
    return r


class Scenario(harness.OverlayScenario):
    daemons = []
    has_media = True  # the ordinary node knows the media_* settings (set in main())

    @classmethod
    def node_conf(cls, u, conf):
        if u.startswith("sn"):
            conf["on_rate"] = 100000
            conf["on_inflight"] = 10000
            conf["turn_ports"] = "50000-50999"  # not the nodes' media ports below
            return
        conf["sip_rate"] = 1000000
        if not cls.has_media:
            return
        # media ports outside the harness's port picks (below the ephemeral range) and the
        # ephemeral range itself: 61000-64999 on this machine's default range
        base = {"alice": 61000, "bob": 63000}[u]
        conf["media_ports"] = "%d-%d" % (base, base + 1999)
        conf["media_max_calls"] = 1000
        conf["media_max_kbps"] = 1000


def node_pids(sc):
    return {u: sc.on[u].proc.pid for u in ("alice", "bob")} | {"sn1": sc.sn["sn1"].proc.pid}


def step(sc, pair, load, tmp, n, seconds, drain, log):
    """n calls up, idle CPU, RTP CPU, BYE: a dict of figures."""
    t0 = time.monotonic()
    a, b = pair.a, pair.b
    a.calls.clear()
    b.calls.clear()
    retried = []
    for attempt in range(3):
        for i in range(n - sum(c.state == "up" for c in a.calls.values())):
            pair.invite(i + attempt * n)
            if i % 20 == 19:  # a few at a time: the lookups go through the super node
                pair.pump(lambda: False, 0.05)
        up = pair.pump(lambda: all(c.state in ("up", "failed") for c in a.calls.values()) and
                       all(c.state in ("up", "done") for c in b.calls.values() if
                           c.cid in a.calls and a.calls[c.cid].state == "up"), 60)
        failed = [c for c in a.calls.values() if c.state != "up"]
        if up and not failed:
            break
        retried += [c.code for c in failed]
        for c in failed:  # set up again (a failed set-up is not what this bench measures)
            del a.calls[c.cid]
            c.rtp.close()
            cb = b.calls.pop(c.cid, None)
            if cb:
                cb.rtp.close()
    else:
        raise RuntimeError("%d of %d calls not set up after 3 attempts (answers %s)" % (
            len(failed), n, sorted(set(map(str, retried)))))
    if retried:
        log("      (%d call set-ups failed and were made again: answers %s)" % (
            len(retried), sorted(set(map(str, retried)))))
    setup_s = time.monotonic() - t0
    callee = {c.cid: c for c in b.calls.values()}
    calls = [(ca, callee[ca.cid]) for ca in a.calls.values()]
    anchored = sum(1 for ca, cb in calls if ca.dest[1] != cb.rtp.getsockname()[1])
    pids = node_pids(sc)
    # idle: the calls are up, no RTP
    c0 = {u: cpu_seconds(p) for u, p in pids.items()}
    pair.pump(lambda: False, seconds + drain)
    c1 = {u: cpu_seconds(p) for u, p in pids.items()}
    for u in pids:
        if c1[u] - c0[u] > 0.5 * (seconds + drain):
            log("      (%s used %.0f %% CPU with the calls up and no RTP: logs saved in "
                "<bindir>/node_media_bench-busy-logs)" % (
                    u, 100 * (c1[u] - c0[u]) / (seconds + drain)))
            sc.save_logs("node_media_bench-busy")
    r = run_load(load, tmp, "pairs", n, seconds, drain, calls)
    c2 = {u: cpu_seconds(p) for u, p in pids.items()}
    d = run_load(load, tmp, "direct", n, min(seconds, 3.0), drain)
    for c in a.calls.values():
        pair.bye(c)
    pair.pump(lambda: all(c.state == "done" for c in a.calls.values()), 30)
    for ca, cb in calls:
        ca.rtp.close()
        cb.rtp.close()
    pkts = r["ab"]["sent"] + r["ba"]["sent"]
    out = {"calls": n, "anchored": anchored, "setup_s": setup_s, "media": r, "direct": d,
           "nodes": {}}
    for u in pids:
        idle = c1[u] - c0[u]
        busy = c2[u] - c1[u]
        net = max(0.0, busy - idle)
        out["nodes"][u] = {"idle_cpu_s": idle, "rtp_cpu_s": busy, "net_cpu_s": net,
                           "cpu_share": busy / (seconds + drain),
                           "us_per_call_s": 1e6 * net / (n * seconds),
                           "us_per_pkt": 1e6 * net / pkts if pkts else None}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bindir", required=True)
    ap.add_argument("--calls", default="10,50,100,200", help="concurrent calls per step")
    ap.add_argument("--seconds", type=float, default=6.0, help="RTP seconds per step")
    ap.add_argument("--drain", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="steps 10,50 of 3 s")
    ap.add_argument("--keep", help="keep the overlay's directory (logs) here")
    ap.add_argument("--json", help="write the raw results there")
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.seconds, args.rounds = "10,50", 3.0, 1
    ns = [int(x) for x in args.calls.split(",")]
    bindir = os.path.abspath(args.bindir)
    harness.BINDIR = bindir
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(ns) + 512)), hard))
    tmp = args.keep or tempfile.mkdtemp(prefix="p2psip-nodemedia-")
    os.makedirs(tmp, exist_ok=True)
    Scenario.tmp = tmp
    with open(Scenario.bin("ordinarynode"), "rb") as f:
        Scenario.has_media = b"media_max_calls" in f.read()
    if not Scenario.has_media:
        print("(this ordinarynode has no media anchoring: RTP will go phone to phone)")
    load = find_load(bindir, tmp)
    results = []
    try:
        t0 = time.monotonic()
        Scenario.build_overlay(OVERLAY, ("sn1",), ("alice", "bob"), wait=60)
        for u in ("alice", "bob"):
            Scenario.start_on(Scenario, u)
        for u in ("alice", "bob"):
            Scenario.on[u].wait_for("published user location", timeout=60)
        a = Phone("alice", Scenario.sip["alice"])
        b = Phone("bob", Scenario.sip["bob"])
        a.register()
        b.register()
        pair = Pair(a, b)
        print("overlay up and phones registered in %.1f s (nodes: alice pid %d, bob pid %d, "
              "sn1 pid %d)" % ((time.monotonic() - t0,) + tuple(node_pids(Scenario).values())),
              flush=True)
        print("%-5s %6s %8s %7s %7s %7s %7s %9s %9s %9s %9s %7s" % (
            "round", "calls", "anchored", "loss ab", "loss ba", "+p50 ab", "+p50 ba",
            "alice %", "bob %", "alice us", "bob us", "gen %"))
        print("%-5s %6s %8s %7s %7s %7s %7s %9s %9s %9s %9s %7s" % (
            "", "", "", "%", "%", "us", "us", "CPU", "CPU", "/call-s", "/call-s", "CPU"))
        for rnd in range(args.rounds):
            for n in ns:
                s = step(Scenario, pair, load, tmp, n, args.seconds, args.drain, print)
                s["round"] = rnd + 1
                results.append(s)
                m, d, nd = s["media"], s["direct"], s["nodes"]
                print("%-5d %6d %8d %7.3f %7.3f %7.0f %7.0f %9.1f %9.1f %9.1f %9.1f %7.1f" % (
                    rnd + 1, n, s["anchored"], 100 * m["ab"]["loss"], 100 * m["ba"]["loss"],
                    m["ab"]["p50_us"] - d["ab"]["p50_us"], m["ba"]["p50_us"] - d["ba"]["p50_us"],
                    100 * nd["alice"]["cpu_share"], 100 * nd["bob"]["cpu_share"],
                    nd["alice"]["us_per_call_s"], nd["bob"]["us_per_call_s"],
                    100 * m["gen_cpu"]), flush=True)
                if s["anchored"] < n:
                    print("      (%d of %d calls' SDP came through unchanged: media not anchored "
                          "by the nodes, RTP went phone to phone)" % (n - s["anchored"], n))
    except BaseException:
        Scenario.save_logs("node_media_bench")
        print("daemons' logs: %s" % os.path.join(bindir, "node_media_bench-logs"),
              file=sys.stderr)
        raise
    finally:
        Scenario.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("Per node, medians over %d round(s): CPU per call-second and per packet forwarded "
          "(RTP run less the same time with the calls up and no RTP)" % args.rounds)
    for n in ns:
        rs = [r for r in results if r["calls"] == n]
        line = "%5d calls:" % n
        for u in ("alice", "bob", "sn1"):
            line += "  %s %.1f us/call-s, %.2f us/pkt, %.1f %% CPU;" % (
                u, statistics.median(r["nodes"][u]["us_per_call_s"] for r in rs),
                statistics.median(r["nodes"][u]["us_per_pkt"] or 0 for r in rs),
                100 * statistics.median(r["nodes"][u]["cpu_share"] for r in rs))
        print(line)
        print("%12s latency added by the two nodes (p50/p99, us): ab %.0f/%.0f, ba %.0f/%.0f; "
              "loss ab %.3f %%, ba %.3f %%" % (
                  "", statistics.median(r["media"]["ab"]["p50_us"] - r["direct"]["ab"]["p50_us"]
                                        for r in rs),
                  statistics.median(r["media"]["ab"]["p99_us"] - r["direct"]["ab"]["p99_us"]
                                    for r in rs),
                  statistics.median(r["media"]["ba"]["p50_us"] - r["direct"]["ba"]["p50_us"]
                                    for r in rs),
                  statistics.median(r["media"]["ba"]["p99_us"] - r["direct"]["ba"]["p99_us"]
                                    for r in rs),
                  100 * statistics.median(r["media"]["ab"]["loss"] for r in rs),
                  100 * statistics.median(r["media"]["ba"]["loss"] for r in rs)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
