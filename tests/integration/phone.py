#!/usr/bin/env python3
"""A phone nobody here wrote, for media tests: Debian's baresip 1.0.0, driven from Python.

One Phone is one baresip process with a configuration folder of its own (`baresip -f DIR`),
optionally inside a network namespace (`ip netns exec NS`), no sound hardware:

  * the audio source is a WAV file of one sine tone (8 kHz mono 16 bit, written here with
    Python's `wave`; baresip's `aufile` module plays it into the call, from its start, each
    call; the file lasts `tone_s` seconds);
  * what the phone receives is decoded and written to WAV files by baresip's `sndfile` audio
    filter (`snd_path` is DIR/rec): one `dump-<date-time>-dec.wav` per call (and the `-enc`
    twin, what it sent). There is no audio player at all: baresip then decodes what arrives
    and runs its filters, and plays nothing;
  * codec PCMU only (`g711`, `audio_codecs=pcmu`), 20 ms packets;
  * it is driven over its `ctrl_tcp` control port (netstring-framed JSON: commands `dial`,
    `hangup`, `hold`, `resume`, `audio_debug`, ...; it sends events such as REGISTER_OK,
    CALL_ESTABLISHED and CALL_CLOSED). The control port listens on 127.0.0.1 inside the
    phone's namespace: this module connects from a thread that has entered that namespace
    (setns), so the test process itself stays where it is;
  * one account: `sip:<user>@<domain>`, registered through `registrar` (the outbound proxy,
    e.g. the site's ordinary node; UDP; no password there, `password` for a registrar that
    challenges) every `regint` s, or not registered at all (registrar None: calls by IP);
    incoming calls are answered at once (`answermode=auto`).

baresip 1.0.0's sndfile filter stops recording received audio at the first re-INVITE that is
not sendrecv (a hold): the decoder reset flushes the receive filter chain, and the chain is
built again only when the send chain is empty too, which it is not. So a recording holds what
arrived up to the hold; what arrives after a resume is not in it (tests check that part from
a packet capture instead, see `rtp_from_pcap`).

Audio analysis is pure Python (no numpy): `tone_seconds()` counts the 100 ms windows of a
recording in which the Goertzel power at the expected frequency holds most of the window's
energy, the window is loud enough, and another given frequency (the listener's own tone:
an echo, or the wrong stream) is far weaker.

Pcap reading (`read_pcap`, `rtp_from_pcap`) is pure Python too: classic libpcap files from
`tcpdump -w` on `lo` (DLT_NULL or Ethernet framing) with IPv4/UDP/RTP inside.

Run as a script, it proves itself on loopback: two phones call each other by IP, each hears
the other's tone, hold and resume work (see selftest())."""

import array
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import wave

RATE = 8000  # PCMU
AMPLITUDE = 8000  # of the tones written here (of 32767)
WINDOW_S = 0.1  # analysis window: 800 samples, 10 Hz bins (tones on multiples of 10 Hz)
MODULES = "/usr/lib/baresip/modules"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


# ---- tones and their analysis ---------------------------------------------------------------

def write_tone(path, freq, seconds, rate=RATE, amplitude=AMPLITUDE):
    """A WAV file (16 bit mono) of one sine tone."""
    n = int(seconds * rate)
    period = array.array("h", (int(round(amplitude * math.sin(2 * math.pi * freq * i / rate)))
                               for i in range(rate)))  # one second: a whole number of periods
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        whole, rest = divmod(n, rate)
        data = period.tobytes()
        for _ in range(whole):
            w.writeframes(data)
        w.writeframes(period[:rest].tobytes())


def read_wav(path):
    """(rate, samples as array('h')) of a 16-bit mono WAV file, also while baresip still writes
    it (its header's sizes are not final then: everything after the data chunk's start is
    taken). ([], rate) for a file too short to hold a header."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return RATE, array.array("h")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return RATE, array.array("h")
    pos, rate, channels, bits = 12, RATE, 1, 16
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 24 <= len(data):
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
        elif cid == b"data":
            body = data[pos + 8:]
            if 0 < size <= len(body):
                body = body[:size]
            if bits != 16 or channels != 1:
                raise ValueError("%s: %d channels of %d bits, expected mono 16 bit"
                                 % (path, channels, bits))
            samples = array.array("h")
            samples.frombytes(body[:len(body) // 2 * 2])
            if sys.byteorder != "little":
                samples.byteswap()
            return rate, samples
        pos += 8 + size + (size & 1)
    return rate, array.array("h")


def goertzel(samples, start, n, freq, rate=RATE):
    """Goertzel power at freq over samples[start:start + n]."""
    c = 2.0 * math.cos(2.0 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for i in range(start, start + n):
        s0 = samples[i] + c * s1 - s2
        s2 = s1
        s1 = s0
    return s1 * s1 + s2 * s2 - c * s1 * s2


def windows(samples, freq, others=(), rate=RATE, window_s=WINDOW_S, start=0):
    """Per analysis window from sample `start`: (share of the window's energy at freq, the
    largest share at any of `others`, RMS). A pure tone at freq gives a share of ~1.0."""
    n = int(rate * window_s)
    out = []
    for w0 in range(start, len(samples) - n + 1, n):
        energy = 0.0
        for i in range(w0, w0 + n):
            energy += samples[i] * samples[i]
        rms = math.sqrt(energy / n)
        if energy <= 0:
            out.append((0.0, 0.0, 0.0))
            continue
        share = 2.0 * goertzel(samples, w0, n, freq, rate) / (n * energy)
        other = max((2.0 * goertzel(samples, w0, n, f, rate) / (n * energy) for f in others),
                    default=0.0)
        out.append((share, other, rms))
    return out


def window_holds_tone(share, other, rms, min_rms=AMPLITUDE / 10):
    """The criteria of "clearly holds the tone": loud enough (-32 dB of the tone sent or
    more), at least 60 % of the window's energy at the tone's frequency, and any other tone
    named at least 10 dB weaker."""
    return rms >= min_rms and share >= 0.6 and other <= share / 10


def tone_seconds(samples, freq, others=(), rate=RATE, start=0):
    """Seconds of audio (from sample `start`) that clearly hold the tone at freq."""
    return sum(WINDOW_S for w in windows(samples, freq, others, rate, start=start)
               if window_holds_tone(*w))


def describe_audio(samples, freq, others=(), rate=RATE):
    """One line for a failure message: how long the recording is, how much holds freq, and
    how much holds each of `others` instead."""
    secs = len(samples) / float(rate)
    parts = ["%.1f s recorded" % secs, "%.1f s of %d Hz" % (tone_seconds(samples, freq, others,
                                                                         rate), freq)]
    for f in others:
        t = tone_seconds(samples, f, [freq], rate)
        if t:
            parts.append("%.1f s of %d Hz" % (t, f))
    loud = sum(1 for w in windows(samples, freq, (), rate) if w[2] >= AMPLITUDE / 10)
    parts.append("%.1f s loud" % (loud * WINDOW_S))
    return ", ".join(parts)


# ---- PCMU and pcap ---------------------------------------------------------------------------

def _ulaw_table():
    t = []
    for b in range(256):
        u = ~b & 0xFF
        sign, exp, mant = u & 0x80, (u >> 4) & 7, u & 0x0F
        v = (((mant << 3) + 0x84) << exp) - 0x84
        t.append(-v if sign else v)
    return t


ULAW = _ulaw_table()


def ulaw_decode(payload):
    return array.array("h", (ULAW[b] for b in payload))


def read_pcap(path):
    """Packets of a classic pcap file (tcpdump -w), also while tcpdump still writes it:
    [(time in s since the epoch, IPv4 packet bytes)]. A truncated last record is left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("%s: not a pcap file" % path)
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[pos:pos + 16])
        if pos + 16 + incl > len(data):
            break
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        t = sec + frac / (1e9 if nano else 1e6)
        if linktype == 0:  # DLT_NULL: 4-byte address family, host order
            ip = frame[4:]
        elif linktype == 1:  # Ethernet
            if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
        elif linktype == 113:  # Linux cooked
            if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                continue
            ip = frame[16:]
        elif linktype in (101, 12):  # raw IP
            ip = frame
        else:
            raise ValueError("%s: link type %d not understood" % (path, linktype))
        out.append((t, ip))
    return out


def rtp_from_pcap(path, since=0.0, until=None):
    """The RTP packets (version 2, over IPv4/UDP) of a pcap between times since and until:
    dicts with t, src, dst ("ip:port"), sport, dport, pt, seq, ts, ssrc, payload."""
    found = []
    for t, ip in read_pcap(path):
        if t < since or (until is not None and t > until):
            continue
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8 + 12:
            continue
        sport, dport = struct.unpack("!HH", udp[:4])
        rtp = udp[8:]
        if rtp[0] >> 6 != 2:
            continue
        pt = rtp[1] & 0x7F
        if 72 <= pt <= 79:  # RTCP (SR, RR, SDES, BYE, ...)
            continue
        seq, ts, ssrc = struct.unpack("!HII", rtp[2:12])
        hlen = 12 + 4 * (rtp[0] & 0x0F)
        if rtp[0] & 0x10 and len(rtp) >= hlen + 4:  # header extension
            hlen += 4 + 4 * struct.unpack("!H", rtp[hlen + 2:hlen + 4])[0]
        payload = rtp[hlen:]
        if rtp[0] & 0x20 and payload:  # padding
            payload = payload[:-payload[-1]]
        found.append({"t": t, "src": "%s:%d" % (socket.inet_ntoa(ip[12:16]), sport),
                      "dst": "%s:%d" % (socket.inet_ntoa(ip[16:20]), dport), "sport": sport,
                      "dport": dport, "pt": pt, "seq": seq, "ts": ts, "ssrc": ssrc,
                      "payload": payload})
    return found


def pcmu_samples(packets):
    """The PCMU payloads of packets (payload type 0), decoded and joined in arrival order."""
    out = array.array("h")
    for p in packets:
        if p["pt"] == 0:
            out.extend(ulaw_decode(p["payload"]))
    return out


class Capture:
    """tcpdump writing one interface's UDP packets to a pcap file, in a namespace (argv_prefix,
    e.g. ["ip", "netns", "exec", NS]); stop() kills it by its PID."""

    def __init__(self, path, iface="lo", bpf="udp", argv_prefix=()):
        self.path = path
        # --immediate-mode: each packet is handed over as it comes (else libpcap delivers in
        # blocks, up to a second late); -U: written out at once; -Z root: no privilege drop
        # (the file is in a root-only directory)
        self.argv = list(argv_prefix) + ["tcpdump", "-i", iface, "-n", "--immediate-mode",
                                         "-U", "-s", "512", "-Z", "root", "-w", path, bpf]
        self.errpath = path + ".log"
        self.proc = None

    def start(self, timeout=10):
        with open(self.errpath, "w") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "listening on" in self._log():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = self._log()
        self.stop()
        raise RuntimeError("tcpdump did not start: %s" % log.strip())

    def sync(self, t, timeout=3.0):
        """Waits until the file holds a packet captured at time t (time.time()) or later, so
        that everything before t is in it; False after timeout (nothing came since)."""
        deadline = time.monotonic() + timeout
        while True:
            pk = read_pcap(self.path)
            if pk and pk[-1][0] >= t:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def _log(self):
        try:
            with open(self.errpath) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        p, self.proc = self.proc, None
        if not p:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # tcpdump flushes and exits
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


# ---- baresip ---------------------------------------------------------------------------------

def connect_in_netns(netns, addr, timeout=2.0):
    """A TCP connection to addr made from inside network namespace netns (a name under
    /run/netns, or None for this one): a short-lived thread enters it (setns affects the
    calling thread only), connects, and ends; the socket stays in that namespace."""
    result = {}

    def run():
        try:
            if netns:
                fd = os.open(os.path.join("/run/netns", netns), os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, "setns(%s): %s" % (netns, os.strerror(e)))
                finally:
                    os.close(fd)
            result["sock"] = socket.create_connection(addr, timeout=timeout)
        except BaseException as e:  # handed to the caller
            result["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "err" in result:
        raise result["err"]
    return result["sock"]


class PhoneError(AssertionError):
    pass


class Phone:
    """One baresip. Everything it writes is under workdir: config, accounts, tone.wav, log,
    rec/ (recordings)."""

    def __init__(self, name, workdir, freq, user, domain, registrar=None,
                 listen="127.0.0.1:5070", ctrl_port=4444, rtp_ports=(10000, 10999),
                 netns=None, tone_s=180, regint=600, password=None, verbose=False):
        self.name, self.workdir, self.freq = name, os.path.abspath(workdir), freq
        self.user, self.domain, self.registrar = user, domain, registrar
        self.listen, self.ctrl_port, self.rtp_ports = listen, ctrl_port, rtp_ports
        self.netns, self.tone_s, self.regint, self.verbose = netns, tone_s, regint, verbose
        self.password = password  # HTTP Digest, e.g. at a super node's public front end
        self.rec_dir = os.path.join(self.workdir, "rec")
        self.log_path = os.path.join(self.workdir, "baresip.log")
        self.aor = "sip:%s@%s" % (user, domain)
        self.proc = None
        self.sock = None
        self.events = []  # every event, in order, with "_t": time.monotonic() of arrival
        self._responses = {}
        self._token = 0
        self._cv = threading.Condition()
        self._reader = None

    # configuration

    def write_config(self):
        os.makedirs(self.rec_dir, exist_ok=True)
        tone = os.path.join(self.workdir, "tone.wav")
        if not os.path.exists(tone):
            write_tone(tone, self.freq, self.tone_s)
        conf = [
            ("poll_method", "epoll"),
            ("sip_listen", self.listen),  # UDP and TCP on this port, TLS on the next one
            ("sip_trans_def", "udp"),
            ("call_local_timeout", "120"),
            ("call_max_calls", "4"),
            ("audio_source", "aufile," + tone),
            ("ausrc_format", "s16"),
            ("auplay_format", "s16"),
            ("auenc_format", "s16"),
            ("audec_format", "s16"),
            ("audio_buffer", "20-160"),
            ("rtp_tos", "0"),
            ("rtp_ports", "%d-%d" % self.rtp_ports),
            ("rtcp_mux", "no"),
            ("jitter_buffer_delay", "5-10"),
            ("rtp_stats", "yes"),
            ("module_path", MODULES),
            ("module", "g711.so"),
            ("module", "aufile.so"),
            ("module", "sndfile.so"),
            ("module_tmp", "account.so"),
            ("module_app", "menu.so"),
            ("module_app", "ctrl_tcp.so"),
            ("ctrl_tcp_listen", "127.0.0.1:%d" % self.ctrl_port),
            ("snd_path", self.rec_dir),
        ]
        with open(os.path.join(self.workdir, "config"), "w") as f:
            f.write("".join("%-20s %s\n" % kv for kv in conf))
        params = ["answermode=auto", "audio_codecs=pcmu", "ptime=20", "mwi=no",
                  "call_transfer=no"]
        if self.registrar:
            params += ['outbound="sip:%s;transport=udp"' % self.registrar,
                       "regint=%d" % self.regint]
        else:
            params.append("regint=0")
        if self.password:
            params += ["auth_user=%s" % self.user, "auth_pass=%s" % self.password]
        with open(os.path.join(self.workdir, "accounts"), "w") as f:
            f.write("<%s;transport=udp>;%s\n" % (self.aor, ";".join(params)))
        open(os.path.join(self.workdir, "contacts"), "w").close()

    # process

    def argv(self):
        argv = ["baresip", "-f", self.workdir]
        if self.verbose:
            argv.append("-v")
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        return argv

    def start(self, timeout=10.0):
        """Starts baresip and connects to its control port; with a registrar, waits for the
        registration's 200 (REGISTER_OK). Stops it again on any failure."""
        os.makedirs(self.workdir, exist_ok=True)
        self.write_config()
        try:
            with open(self.log_path, "w") as log:
                # `ip netns exec` replaces itself with baresip: the PID is baresip's
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise PhoneError("%s: baresip exited (%s):\n%s"
                                     % (self.name, self.proc.returncode, self.log()[-2000:]))
                try:
                    self.sock = connect_in_netns(self.netns, ("127.0.0.1", self.ctrl_port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise PhoneError("%s: baresip's control port 127.0.0.1:%d never "
                                         "answered:\n%s" % (self.name, self.ctrl_port,
                                                            self.log()[-2000:]))
                    time.sleep(0.1)
            self.sock.settimeout(None)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            if self.registrar:  # it may have registered before we connected: ask
                while not self.registered():
                    if time.monotonic() > deadline:
                        raise PhoneError("%s: not registered at %s within %.1f s: %s\n%s" % (
                            self.name, self.registrar, timeout, self.reginfo(),
                            self.log()[-1500:]))
                    time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Kills baresip by its PID (SIGTERM, then SIGKILL); safe to call twice."""
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        p = self.proc
        if p and p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read().replace("\r", "\n")
        except OSError:
            return ""

    # control port

    def _read(self):
        buf = b""
        sock = self.sock
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            while True:
                colon = buf.find(b":")
                if colon < 0 or not buf[:colon].isdigit():
                    break
                n = int(buf[:colon])
                if len(buf) < colon + 1 + n + 1:
                    break
                body = buf[colon + 1:colon + 1 + n]
                buf = buf[colon + 2 + n:]
                try:
                    msg = json.loads(body.decode(errors="replace"))
                except ValueError:
                    continue
                with self._cv:
                    if msg.get("response"):
                        self._responses[msg.get("token")] = msg
                    elif msg.get("event"):
                        msg["_t"] = time.monotonic()
                        self.events.append(msg)
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def command(self, command, params=None, timeout=10.0):
        """Runs a baresip command; returns its response's data (text). Fails when baresip does
        not answer, or answers not ok."""
        if not self.sock:
            raise PhoneError("%s: not running" % self.name)
        with self._cv:
            self._token += 1
            token = "t%d" % self._token
        msg = {"command": command, "token": token}
        if params is not None:
            msg["params"] = params
        body = json.dumps(msg).encode()
        self.sock.sendall(b"%d:%s," % (len(body), body))
        deadline = time.monotonic() + timeout
        with self._cv:
            while token not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise PhoneError("%s: no answer to %r within %.1f s" % (self.name, command,
                                                                          timeout))
                self._cv.wait(min(left, 0.2))
            resp = self._responses.pop(token)
        if not resp.get("ok"):
            raise PhoneError("%s: %s %s: %s" % (self.name, command, params or "",
                                                resp.get("data")))
        return resp.get("data") or ""

    def mark(self):
        """A position in the event list, for wait_event(since=...)."""
        with self._cv:
            return len(self.events)

    def wait_event(self, types, timeout=10.0, since=0, call_id=None, fail=("CALL_CLOSED",)):
        """The first event of one of `types` at or after position `since` (of call_id, when
        given). An event of `fail` first (e.g. the call closed) fails at once."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ev in self.events[since:]:
                    if call_id and ev.get("id") not in (None, call_id):
                        continue
                    if ev.get("type") in types:
                        return ev
                    if ev.get("type") in fail and ev.get("type") not in types:
                        raise PhoneError("%s: %s (%s) while waiting for %s" % (
                            self.name, ev.get("type"), ev.get("param"), "/".join(types)))
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    got = ", ".join("%s(%s)" % (e.get("type"), e.get("param"))
                                    for e in self.events[since:])
                    raise PhoneError("%s: no %s within %.1f s (events: %s)\n%s" % (
                        self.name, "/".join(types), timeout, got or "none",
                        self.log()[-1500:]))
                self._cv.wait(min(left, 0.2))

    def reginfo(self):
        """`reginfo`: the account's registration state, colour codes removed."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.command("reginfo")).strip()

    def registered(self):
        """True when the last REGISTER was answered 200."""
        return bool(re.search(r"\bOK\b", self.reginfo()))

    # calls

    def dial(self, uri):
        """Starts a call; returns the event position to wait from."""
        since = self.mark()
        self.command("dial", uri)
        return since

    def wait_established(self, timeout=15.0, since=0):
        """Waits for CALL_ESTABLISHED; returns (call id, time.monotonic() it arrived)."""
        ev = self.wait_event(("CALL_ESTABLISHED",), timeout, since)
        return ev.get("id"), ev["_t"]

    def wait_incoming_established(self, timeout=15.0, since=0):
        return self.wait_established(timeout, since)

    def hold(self):
        self.command("hold")

    def resume(self):
        self.command("resume")

    def hangup(self, timeout=10.0):
        """Hangs up the current call and waits for its CALL_CLOSED."""
        since = self.mark()
        self.command("hangup")
        self.wait_event(("CALL_CLOSED",), timeout, since, fail=())

    def wait_closed(self, timeout=10.0, since=0):
        return self.wait_event(("CALL_CLOSED",), timeout, since, fail=())

    def rtp_info(self):
        """From `audio_debug` of the current call: the phone's local RTP port, its SSRC, RTP
        packets sent, and received (summed over the remote sources RTCP knows)."""
        text = self.command("audio_debug")
        info = {"text": text}
        m = re.search(r"local:\s*[\d.]+:(\d+)", text)
        info["port"] = int(m.group(1)) if m else None
        m = re.search(r"ssrc=0x([0-9a-fA-F]+)", text)
        info["ssrc"] = int(m.group(1), 16) if m else None
        m = re.search(r"TX: packets=(\d+)", text)
        info["tx_packets"] = int(m.group(1)) if m else None
        info["rx_packets"] = sum(int(x) for x in re.findall(r"rcvd=(\d+)", text))
        return info

    # recordings

    def recordings(self):
        """Paths of the received-audio recordings (decoded) in rec/, oldest first."""
        try:
            names = sorted(n for n in os.listdir(self.rec_dir) if n.endswith("-dec.wav"))
        except OSError:
            return []
        return [os.path.join(self.rec_dir, n) for n in names]

    def archive_recordings(self):
        """Moves every recording in rec/ to rec/old/ (a new call's file may get the name of an
        older one: sndfile names them after the second the call's audio started)."""
        old = os.path.join(self.rec_dir, "old")
        os.makedirs(old, exist_ok=True)
        for n in sorted(os.listdir(self.rec_dir)):
            if n.endswith(".wav"):
                self._archived = getattr(self, "_archived", 0) + 1
                os.rename(os.path.join(self.rec_dir, n),
                          os.path.join(old, "%03d-%s" % (self._archived, n)))

    def received(self):
        """Samples of every recording in rec/ (since the last archive_recordings()), joined."""
        out = array.array("h")
        for p in self.recordings():
            out.extend(read_wav(p)[1])
        return out


# ---- self test on loopback -------------------------------------------------------------------

def check_analysis():
    """The tone detector on made-up audio: a tone is found for as long as it lasts; another
    tone, the tone mixed with the listener's own at the same level, a whisper of it, and
    noise are not. Raises AssertionError."""
    import random

    def sine(f, secs, amp=AMPLITUDE):
        return array.array("h", (int(amp * math.sin(2 * math.pi * f * i / RATE))
                                 for i in range(int(secs * RATE))))

    tone = sine(600, 2.0)
    got = tone_seconds(tone, 600, [400])
    assert abs(got - 2.0) < 0.01, got
    assert tone_seconds(tone, 400, [600]) == 0
    assert tone_seconds(tone, 610, [400]) == 0  # one bin off: not it (10 Hz bins)
    half = tone[:RATE] + array.array("h", [0] * RATE)  # 1 s of tone, 1 s of silence
    assert abs(tone_seconds(half, 600) - 1.0) < 0.01
    mixed = array.array("h", (a + b for a, b in zip(sine(600, 1, AMPLITUDE / 2),
                                                     sine(400, 1, AMPLITUDE / 2))))
    assert tone_seconds(mixed, 600, [400]) == 0  # the listener's own tone as loud: an echo
    assert tone_seconds(sine(600, 1, AMPLITUDE / 100), 600) == 0  # -40 dB: too quiet
    rng = random.Random(1)
    noise = array.array("h", (rng.randint(-AMPLITUDE, AMPLITUDE) for _ in range(RATE)))
    assert tone_seconds(noise, 600) == 0
    # PCMU as a phone decodes it: the tone survives the codec's 8-bit steps
    enc = bytes(min(range(256), key=lambda b: abs(ULAW[b] - v)) for v in tone[:1600])
    assert abs(tone_seconds(ulaw_decode(enc), 600, [400]) - 0.2) < 0.01


def selftest(keep=False):
    """Two phones on 127.0.0.1 call each other by IP (no registrar): each must hear the other's
    tone for >= 3 s (and not its own); hold, resume; hang up. Returns 0 on success."""
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    check_analysis()
    print("tone detector: ok on made-up audio")
    if not shutil.which("baresip"):
        print("baresip not installed (Debian: baresip-core)")
        return 1 if os.environ.get("P2P_TEST_STRICT") == "1" else 77
    tmp = tempfile.mkdtemp(prefix="p2psip-phone-")
    ports = [harness.free_port() for _ in range(4)]
    sip_a, sip_b = ports[0], ports[2]
    # baresip binds TLS on the SIP port + 1: keep it free too
    for p in (sip_a + 1, sip_b + 1):
        if not harness._port_free(p, socket.SOCK_STREAM):
            print("port %d busy, try again" % p)
            return 1
    a = Phone("a", os.path.join(tmp, "a"), 400, "alice", "127.0.0.1:%d" % sip_a,
              listen="127.0.0.1:%d" % sip_a, ctrl_port=ports[1], rtp_ports=(40000, 40099))
    b = Phone("b", os.path.join(tmp, "b"), 1000, "bob", "127.0.0.1:%d" % sip_b,
              listen="127.0.0.1:%d" % sip_b, ctrl_port=ports[3], rtp_ports=(40100, 40199))
    ok = True
    try:
        a.start()
        b.start()
        a.archive_recordings()
        b.archive_recordings()
        t0 = time.monotonic()
        since_b = b.mark()
        since = a.dial("sip:bob@127.0.0.1:%d" % sip_b)
        cid, t_est = a.wait_established(10, since)
        b.wait_established(10, since_b)
        print("established in %.3f s, call id %s" % (t_est - t0, cid))
        time.sleep(4)
        ia, ib = a.rtp_info(), b.rtp_info()
        print("a: port %s ssrc %08x tx %s rx %s" % (ia["port"], ia["ssrc"], ia["tx_packets"],
                                                    ia["rx_packets"]))
        print("b: port %s ssrc %08x tx %s rx %s" % (ib["port"], ib["ssrc"], ib["tx_packets"],
                                                    ib["rx_packets"]))
        for ph, want, own in ((a, 1000, 400), (b, 400, 1000)):
            s = ph.received()
            secs = tone_seconds(s, want, [own])
            print("%s heard: %s" % (ph.name, describe_audio(s, want, [own])))
            ok &= secs >= 3.0
        a.hold()
        time.sleep(1.5)
        held = (a.rtp_info()["rx_packets"], b.rtp_info()["rx_packets"])
        a.resume()
        time.sleep(2)
        after = (a.rtp_info()["rx_packets"], b.rtp_info()["rx_packets"])
        print("rx packets at resume %s, 2 s later %s" % (held, after))
        ok &= after[0] - held[0] >= 50 and after[1] - held[1] >= 50
        since_b = b.mark()
        a.hangup()
        b.wait_closed(5, since_b)
        print("recordings: a %s, b %s" % (a.recordings(), b.recordings()))
    finally:
        a.stop()
        b.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(selftest(keep="--keep" in sys.argv))
