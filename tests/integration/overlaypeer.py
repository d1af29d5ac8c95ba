"""A rogue super node for tests: node-to-node links of docs/protocol.md section 1 spoken from
Python with a real enrolled certificate (an account of `OverlayScenario.build_overlay` holds the
super node role unless created with --no-supernode), so that a test can send a real super node
any message an enrolled adversary could: forged joins, replies, routes, floods.

- `Link(addr, state_dir, overlay)`: a TLS 1.3 client link with the state directory's
  certificate (cert.pem, key.pem, ca.pem), hello done. `send()` writes any message,
  `request()` waits for its answer, `recv()` returns the next frame; a reader thread keeps
  every frame received.
- `Listener(state_dir, overlay)`: a TLS 1.3 server with that certificate that counts the
  connections it receives, speaks hello, answers `ping` and keeps every frame; `tls=False`
  makes it a plain TCP listener that only counts connections (a victim service).

Only the standard library (ssl, socket, threading). OVERLAYPEER_DEBUG=1 in the environment
prints the listeners' accepts and every link's close, with times."""

import json
import os
import random
import socket
import ssl
import struct
import threading
import time


def new_tid():
    return "%016x" % random.getrandbits(64)


def encode(overlay, type_, kind, body=None, tid=None):
    """One frame (length prefix + JSON payload) of protocol.md 1.2-1.3."""
    m = {"v": 1, "overlay": overlay, "type": type_, "kind": kind, "tid": tid or new_tid()}
    if body is not None:
        m["body"] = body
    payload = json.dumps(m, separators=(",", ":")).encode()
    return struct.pack(">I", len(payload)) + payload


def _context(state_dir, server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False  # nodes are known by their certificates, not by DNS
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(os.path.join(state_dir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(state_dir, "cert.pem"), os.path.join(state_dir, "key.pem"))
    return ctx


class Closed(Exception):
    pass


class _Framed:
    """Frames in and out of one TLS socket; a thread reads, the caller writes."""

    def __init__(self, sock, overlay, answer_pings=False, close_after=None, on_frame=None):
        self.on_frame = on_frame  # called as on_frame(link, frame) from the reader thread
        self.sock = sock
        self.overlay = overlay
        self.answer_pings = answer_pings
        self.close_after = close_after  # close the link after this many frames past the hello
        self.frames = []          # every frame received, in order
        self.closed_reason = None
        self._cv = threading.Condition()
        self._wlock = threading.Lock()
        self._next = 0            # recv() cursor into frames
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        buf = b""
        self.sock.settimeout(0.2)
        while not self._stop:
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
            buf += data
            while len(buf) >= 4:
                n = struct.unpack(">I", buf[:4])[0]
                if len(buf) < 4 + n:
                    break
                payload, buf = buf[4:4 + n], buf[4 + n:]
                try:
                    f = json.loads(payload)
                except ValueError:
                    f = {"_not_json": payload[:200].decode(errors="replace")}
                if (self.answer_pings and f.get("type") == "ping" and f.get("kind") == "req"):
                    try:
                        self.send_raw(encode(self.overlay, "ping", "res", {}, f.get("tid")))
                    except Closed:
                        pass
                with self._cv:
                    self.frames.append(f)
                    self._cv.notify_all()
                if self.on_frame:
                    try:
                        self.on_frame(self, f)
                    except Closed:
                        pass
                    except Exception:  # a test's handler failed: say so, keep the link
                        import traceback
                        traceback.print_exc()
                if self.close_after is not None and len(self.frames) > self.close_after:
                    self._closed("closed by us after %d frames" % self.close_after)
                    try:
                        self.sock.close()
                    except OSError:
                        pass
                    return

    def _closed(self, why):
        if os.environ.get("OVERLAYPEER_DEBUG"):
            print("overlaypeer %.3f: link closed: %s" % (time.time(), why), flush=True)
        with self._cv:
            if self.closed_reason is None:
                self.closed_reason = why
            self._cv.notify_all()

    def send_raw(self, data):
        with self._wlock:
            try:
                self.sock.settimeout(10)
                self.sock.sendall(data)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise Closed("send: %r" % e)

    def send(self, type_, kind, body=None, tid=None):
        tid = tid or new_tid()
        self.send_raw(encode(self.overlay, type_, kind, body, tid))
        return tid

    def recv(self, timeout=10.0, match=None):
        """The next frame not returned before that `match`es (any when None); None after
        `timeout` s or when the link closed without one."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                while self._next < len(self.frames):
                    f = self.frames[self._next]
                    self._next += 1
                    if match is None or match(f):
                        return f
                left = deadline - time.monotonic()
                if left <= 0 or self.closed_reason is not None:
                    return None
                self._cv.wait(min(left, 0.1))

    def request(self, type_, body=None, timeout=10.0):
        """Sends a request and returns its answer frame (res or err), or None."""
        tid = self.send(type_, "req", body)
        return self.recv(timeout, lambda f: f.get("tid") == tid and f.get("kind") in ("res", "err"))

    def wait_closed(self, timeout):
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.closed_reason is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self):
        self._stop = True
        try:  # at once, even while the reader thread is inside recv()
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Link(_Framed):
    """A link to the node at `addr` with the certificate of `state_dir`, hello exchanged.
    `read=False` starts no reader thread (a peer that never reads what it is sent)."""

    def __init__(self, addr, state_dir, overlay, timeout=10.0, read=True, answer_pings=True,
                 on_frame=None):
        host, port = addr.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        try:
            sock = _context(state_dir, False).wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        super().__init__(sock, overlay, answer_pings, on_frame=on_frame)
        self.send("hello", "ind", {"agent": "overlaypeer"})
        if read:
            self._thread.start()
            first = self.recv(timeout)
            if not first or first.get("type") != "hello":
                self.close()
                raise Closed("no hello from %s: %r (%s)" % (addr, first, self.closed_reason))


class Listener:
    """Counts the connections made to it. With tls (the default) it is a super node's port
    for `state_dir`'s certificate: it completes handshakes, says hello, answers ping and keeps
    each link (`links`); without, a plain TCP service that accepts and closes.
    `close_after`: each link is closed by us after that many frames past the hello."""

    def __init__(self, state_dir=None, overlay=None, tls=True, close_after=None, on_frame=None):
        self.on_frame = on_frame
        self.ctx = _context(state_dir, True) if tls else None
        self.overlay = overlay
        self.close_after = close_after
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.connections = 0      # TCP connections accepted
        self.links = []           # open TLS links (_Framed), hello received
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if not self.ctx:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        try:
            s = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        link = _Framed(s, self.overlay, answer_pings=True, close_after=self.close_after,
                       on_frame=self.on_frame)
        try:
            link.send("hello", "ind", {"agent": "overlaypeer-listener"})
        except Closed:
            s.close()
            return
        with self._lock:
            if self._stop:  # closed meanwhile: a closed listener keeps no link alive
                link.close()
                return
            self.links.append(link)
        if os.environ.get("OVERLAYPEER_DEBUG"):
            print("overlaypeer %.3f: %s accepted link from %s (%d links)" % (
                time.time(), self.addr, s.getpeername(), len(self.links)), flush=True)
        link._thread.start()

    def drop_links(self):
        """Closes every link accepted so far (the listener keeps accepting)."""
        with self._lock:
            links, self.links = self.links, []
        for l in links:
            l.close()

    def frames(self):
        """Every frame received on every link so far, hellos included."""
        with self._lock:
            links = list(self.links)
        out = []
        for l in links:
            with l._cv:
                out += list(l.frames)
        return out

    def close(self):
        with self._lock:
            self._stop = True
        try:
            self.lsock.close()
        except OSError:
            pass
        self._thread.join(timeout=2)
        with self._lock:
            links, self.links = self.links, []
        for l in links:
            l.close()
