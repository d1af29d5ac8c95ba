"""A small SIP user agent over UDP for the media tests: it registers (with HTTP Digest when
challenged), calls, answers, re-INVITEs, hangs up, and sends and counts RTP, so that a test can
look at every byte of the SDP a node hands its phone and send packets from where it likes.
Enough SIP for those scenarios (RFC 3261 dialogs through Record-Route), not a general phone."""

import hashlib
import os
import re
import socket
import struct
import threading
import time


def _tag():
    return os.urandom(4).hex()


class Msg:
    def __init__(self, raw):
        text = raw.decode("utf-8", "replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        self.first = lines[0]
        self.headers = []
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers.append((k.strip(), v.strip()))
        self.body = body
        self.is_request = not self.first.startswith("SIP/2.0")
        self.code = 0 if self.is_request else int(self.first.split()[1])
        self.method = self.first.split()[0] if self.is_request else self.cseq_method()

    def all(self, name):
        short = {"via": "v", "from": "f", "to": "t", "call-id": "i", "contact": "m",
                 "content-type": "c", "content-length": "l", "cseq": "cseq"}
        names = {name.lower(), short.get(name.lower(), name.lower())}
        out = []
        for k, v in self.headers:
            if k.lower() in names:
                out.extend([x.strip() for x in re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", v)]
                           if k.lower() in ("via", "v", "record-route", "route") else [v])
        return out

    def get(self, name):
        a = self.all(name)
        return a[0] if a else None

    def cseq_method(self):
        c = self.get("CSeq")
        return c.split()[1] if c else ""


def sdp_body(ip, port, extra=(), session_extra=()):
    lines = ["v=0", "o=- 1 1 IN IP4 %s" % ip, "s=-"] + list(session_extra) + [
        "c=IN IP4 %s" % ip, "t=0 0", "m=audio %d RTP/AVP 0 101" % port, "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000"] + list(extra)
    return "\r\n".join(lines) + "\r\n"


def sdp_media(body):
    """(connection address, [(media, port)], lines) of an SDP body."""
    addr, media = None, []
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.startswith("c=IN IP4 ") and addr is None:
            addr = line.split()[2]
        elif line.startswith("m="):
            parts = line[2:].split()
            media.append((parts[0], int(parts[1])))
    return addr, media, [x for x in body.replace("\r\n", "\n").split("\n") if x]


class UA:
    def __init__(self, user, domain, proxy, ip="127.0.0.1", contact=None):
        self.user, self.domain, self.proxy = user, domain, proxy  # proxy: (ip, port)
        self.fake_contact = contact  # "host:port" written in Contact instead of ours (a NAT)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.ip, self.port = self.sock.getsockname()
        self.inbox = []
        self.cseq = 1
        self.dialog = None

    def close(self):
        self.sock.close()

    def contact(self):
        if self.fake_contact:
            return "<sip:%s@%s>" % (self.user, self.fake_contact)
        return "<sip:%s@%s:%d>" % (self.user, self.ip, self.port)

    def send(self, text, to=None):
        self.sock.sendto(text.encode(), to or self.proxy)

    def recv(self, want, timeout=10.0):
        """The first message (kept or new) for which want(msg) holds."""
        end = time.time() + timeout
        while True:
            for m in self.inbox:
                if want(m):
                    self.inbox.remove(m)
                    return m
            left = end - time.time()
            if left <= 0:
                raise TimeoutError("%s: no message as wanted within %.0f s" % (self.user, timeout))
            self.sock.settimeout(left)
            try:
                data, src = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            m = Msg(data)
            m.src = src
            if m.is_request and m.method == "OPTIONS":
                self.reply(m, 200)
                continue
            self.inbox.append(m)

    def request(self, method, ruri, to, call_id, from_tag, to_tag=None, body="", routes=(),
                headers=(), cseq=None, branch=None):
        cseq = cseq or self.cseq
        self.cseq = cseq + 1
        lines = ["%s %s SIP/2.0" % (method, ruri),
                 "Via: SIP/2.0/UDP %s:%d;branch=%s;rport" % (
                     self.ip, self.port, branch or "z9hG4bK" + _tag()),
                 "Max-Forwards: 70",
                 "From: <sip:%s@%s>;tag=%s" % (self.user, self.domain, from_tag),
                 "To: <%s>%s" % (to, ";tag=" + to_tag if to_tag else ""),
                 "Call-ID: %s" % call_id, "CSeq: %d %s" % (cseq, method),
                 "Contact: %s" % self.contact()]
        lines += ["Route: %s" % r for r in routes]
        lines += list(headers)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append("Content-Length: %d" % len(body.encode()))
        self.send("\r\n".join(lines) + "\r\n\r\n" + body)
        return cseq

    def reply(self, req, code, reason="OK", body="", to_tag=None, extra=()):
        lines = ["SIP/2.0 %d %s" % (code, reason)]
        lines += ["Via: %s" % v for v in req.all("Via")]
        lines += ["Record-Route: %s" % r for r in req.all("Record-Route")]
        to = req.get("To")
        if to_tag and "tag=" not in to:
            to += ";tag=" + to_tag
        lines += ["From: %s" % req.get("From"), "To: %s" % to, "Call-ID: %s" % req.get("Call-ID"),
                  "CSeq: %s" % req.get("CSeq"), "Contact: %s" % self.contact()]
        lines += list(extra)
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append("Content-Length: %d" % len(body.encode()))
        self.send("\r\n".join(lines) + "\r\n\r\n" + body, req.src)

    # ---- registration ----------------------------------------------------------------------

    def digest(self, challenge, method, uri, password):
        """The Authorization value answering the 401/407 `challenge` (RFC 2617, MD5)."""
        ch = challenge.get("WWW-Authenticate") or challenge.get("Proxy-Authenticate")
        p = dict(re.findall(r'(\w+)="?([^",]*)"?', ch))
        ha1 = hashlib.md5(("%s:%s:%s" % (self.user, p["realm"], password)).encode()).hexdigest()
        ha2 = hashlib.md5(("%s:%s" % (method, uri)).encode()).hexdigest()
        if "qop" in p:
            cnonce, nc = _tag(), "00000001"
            resp = hashlib.md5(("%s:%s:%s:%s:auth:%s" % (ha1, p["nonce"], nc, cnonce, ha2))
                               .encode()).hexdigest()
            return ('Digest username="%s", realm="%s", nonce="%s", uri="%s", response="%s", '
                    'qop=auth, nc=%s, cnonce="%s", algorithm=MD5' % (
                        self.user, p["realm"], p["nonce"], uri, resp, nc, cnonce))
        resp = hashlib.md5(("%s:%s:%s" % (ha1, p["nonce"], ha2)).encode()).hexdigest()
        return ('Digest username="%s", realm="%s", nonce="%s", uri="%s", response="%s", '
                'algorithm=MD5' % (self.user, p["realm"], p["nonce"], uri, resp))

    def register(self, password=None, expires=600):
        call_id, tag = _tag() + "@reg", _tag()
        ruri = "sip:%s" % self.domain
        aor = "sip:%s@%s" % (self.user, self.domain)
        self.request("REGISTER", ruri, aor, call_id, tag, headers=("Expires: %d" % expires,))
        r = self.recv(lambda m: not m.is_request and m.get("Call-ID") == call_id and m.code >= 200)
        if r.code in (401, 407) and password:
            auth = self.digest(r, "REGISTER", ruri, password)
            hdr = "Authorization" if r.code == 401 else "Proxy-Authorization"
            self.request("REGISTER", ruri, aor, call_id, tag,
                         headers=("Expires: %d" % expires, "%s: %s" % (hdr, auth)))
            r = self.recv(lambda m: not m.is_request and m.get("Call-ID") == call_id and
                          m.code >= 200)
        if r.code != 200:
            raise AssertionError("%s: REGISTER answered %s" % (self.user, r.first))
        return r

    # ---- calls -------------------------------------------------------------------------------

    def invite(self, callee, body, timeout=20.0, password=None):
        """Calls callee ("user@domain"), with credentials when challenged; returns the final
        response (a 2xx is ACKed)."""
        call_id, tag = _tag() + "@call", _tag()
        uri = "sip:" + callee
        cseq = self.request("INVITE", uri, uri, call_id, tag, body=body)
        r = self.recv(lambda m: not m.is_request and m.get("Call-ID") == call_id and
                      m.method == "INVITE" and m.code >= 200, timeout)
        if r.code == 407 and password:
            self.request("ACK", uri, uri, call_id, tag,
                         re.search(r"tag=([^;>\s]+)", r.get("To")).group(1), cseq=cseq)
            auth = self.digest(r, "INVITE", uri, password)
            cseq = self.request("INVITE", uri, uri, call_id, tag, body=body,
                                headers=("Proxy-Authorization: " + auth,))
            r = self.recv(lambda m: not m.is_request and m.get("Call-ID") == call_id and
                          m.method == "INVITE" and m.code >= 200, timeout)
        self.dialog = {"call_id": call_id, "tag": tag, "to": uri, "role": "caller"}
        if r.code >= 300:
            return r
        to = r.get("To")
        self.dialog["remote_tag"] = re.search(r"tag=([^;>\s]+)", to).group(1)
        self.dialog["routes"] = list(reversed(r.all("Record-Route")))
        self.dialog["target"] = re.search(r"<([^>]+)>", r.get("Contact")).group(1)
        self.ack(cseq)
        return r

    def ack(self, cseq, body=""):
        d = self.dialog
        self.request("ACK", d["target"], d["to"], d["call_id"], d["tag"], d["remote_tag"],
                     routes=d["routes"], cseq=cseq, body=body)

    def reinvite(self, body, timeout=10.0):
        d = self.dialog
        cseq = self.request("INVITE", d["target"], d["to"], d["call_id"], d["tag"],
                            d["remote_tag"], body=body, routes=d["routes"])
        r = self.recv(lambda m: not m.is_request and m.get("Call-ID") == d["call_id"] and
                      m.method == "INVITE" and m.code >= 200, timeout)
        if r.code < 300:
            self.ack(cseq)
        return r

    def bye(self, timeout=10.0, dialog=None):
        d = dialog or self.dialog
        self.request("BYE", d["target"], d["to"], d["call_id"], d["tag"], d["remote_tag"],
                     routes=d["routes"])
        return self.recv(lambda m: not m.is_request and m.get("Call-ID") == d["call_id"] and
                         m.method == "BYE" and m.code >= 200, timeout)

    def answer(self, body, timeout=20.0, code=200):
        """Waits for an INVITE, rings, answers it with body; returns the INVITE."""
        inv = self.recv(lambda m: m.is_request and m.method == "INVITE", timeout)
        tag = _tag()
        self.reply(inv, 180, "Ringing", to_tag=tag)
        if code != 200:
            self.reply(inv, code, "Busy Here", to_tag=tag)
            return inv
        self.accept(inv, tag, body, timeout)
        return inv

    def accept(self, inv, tag, body, timeout=20.0):
        """Answers INVITE inv 200 with body (To-tag tag), as the callee of its dialog; waits for
        the ACK."""
        self.reply(inv, 200, "OK", body=body, to_tag=tag)
        frm = inv.get("From")
        self.dialog = {"call_id": inv.get("Call-ID"), "tag": tag, "role": "callee",
                       "to": re.search(r"<([^>]+)>", frm).group(1),
                       "remote_tag": re.search(r"tag=([^;>\s]+)", frm).group(1),
                       "routes": inv.all("Record-Route"),
                       "target": re.search(r"<([^>]+)>", inv.get("Contact")).group(1)}
        self.recv(lambda m: m.is_request and m.method == "ACK", timeout)

    def answer_in_dialog(self, method, body="", timeout=10.0):
        req = self.recv(lambda m: m.is_request and m.method == method, timeout)
        self.reply(req, 200, "OK", body=body)
        if method == "INVITE":
            self.recv(lambda m: m.is_request and m.method == "ACK", timeout)
        return req


class RtpPeer:
    """RTP from a socket of its own at 50 packets/s to a destination, and a count of what comes
    back (by SSRC and sequence number)."""

    def __init__(self, ip="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.addr = self.sock.getsockname()
        self.ssrc = struct.unpack("!I", os.urandom(4))[0]
        self.got, self.sources = [], set()
        self.stop_ev = threading.Event()
        self.dest = None
        self.sent = 0
        threading.Thread(target=self._rx, daemon=True).start()

    def _rx(self):
        self.sock.settimeout(0.2)
        while not self.stop_ev.is_set():
            try:
                data, src = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            self.sources.add(src)
            if len(data) >= 12:
                seq, _, ssrc = struct.unpack("!HII", data[2:12])
                self.got.append((ssrc, seq, data[12:]))

    def send(self, dest, n, payload=b"\xff" * 160, gap=0.02):
        for _ in range(n):
            hdr = struct.pack("!BBHII", 0x80, 0, self.sent & 0xFFFF, self.sent * 160, self.ssrc)
            self.sock.sendto(hdr + payload, dest)
            self.sent += 1
            time.sleep(gap)

    def received_from(self, ssrc):
        return [g for g in self.got if g[0] == ssrc]

    def close(self):
        self.stop_ev.set()
        self.sock.close()
