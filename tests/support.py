"""Helpers for the integration tests: a scriptable raw-socket backend, a strict raw-socket client, and a
runner for the real ``python -m balrs lb.ini`` process. Standard library only; everything on 127.0.0.1;
every blocking call has a timeout or a deadline.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Tuple, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

# ---------------------------------------------------------------------------------------------------------
# ports


_port_lock = threading.Lock()
_ports_given: set = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(ipv6_too: bool = False) -> int:
    """A TCP port free on 127.0.0.1, never handed out twice by this process.

    Chosen below the kernel's ephemeral range so that the source port of some outgoing connection (ours,
    balrs's, or another process's) cannot take it between this check and its use."""
    hi = min(_ephemeral_low() - 1, 32000)
    with _port_lock:
        for _ in range(5000):
            port = random.randint(20000, hi)
            if port in _ports_given:
                continue
            if not all(
                _bindable(fam, host, port)
                for fam, host in [(socket.AF_INET, HOST)] + ([(socket.AF_INET6, "::1")] if ipv6_too else [])
            ):
                continue
            _ports_given.add(port)
            return port
    raise RuntimeError("no free port")


def _bindable(family: int, host: str, port: int) -> bool:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.01) -> Any:
    """Poll ``pred`` until it returns something true or ``timeout`` passes; returns its last value.

    Tests wait on the event itself (a log line, a counter, a socket state) with this instead of a fixed
    sleep: the poll is short, the deadline generous (a loaded machine only makes the wait longer)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(step)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# deterministic bodies

BLOCK = bytes(range(256)) * 256  # 64 KiB


def big_pieces(n: int) -> Iterator[bytes]:
    left = n
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        left -= len(piece)
        yield piece


_big_sha_cache: dict[int, str] = {}


def big_sha(n: int) -> str:
    if n not in _big_sha_cache:
        h = hashlib.sha256()
        for p in big_pieces(n):
            h.update(p)
        _big_sha_cache[n] = h.hexdigest()
    return _big_sha_cache[n]


def big_body(n: int) -> bytes:
    return b"".join(big_pieces(n))


CHUNKED_PIECES = [b"first;", b"x" * 1000, b"third", b"y" * 7000, b"last."]
CHUNKED_BODY = b"".join(CHUNKED_PIECES)
CLOSE_MID_HALF = b"m" * 500
NO_LENGTH_BODY = b"close-delimited:" + b"z" * 3000
HOP_RESP_BODY = b"hop-resp-body"
STALL_BODY_PART = b"s" * 100
SLOW_BODY = b"".join(bytes([65 + i]) * 100 for i in range(4))  # 4 pieces, one per 400 ms
WS_GREETING = b"srv-hello"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3's example


# Raw responses for /resp/NAME (misbehaving or unusual backends).
RESPONSES: dict[str, bytes] = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6\r\nhello!\r\n0\r\n\r\n",
    "cl-differing": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-bad": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "head-too-large": b"HTTP/1.1 200 OK\r\n"
    + b"X-Big: "
    + b"h" * 200000
    + b"\r\nContent-Length: 2\r\n\r\nok",
    "trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
    "early-hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "unsolicited-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\nraw-bytes",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "http10-close": b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nold-style-body",
    "304-with-cl": b'HTTP/1.1 304 Not Modified\r\nETag: "v2"\r\nContent-Length: 1234\r\n\r\n',
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n  b\r\nContent-Length: 2\r\n\r\nok",
}

# ---------------------------------------------------------------------------------------------------------
# the test backend


class _PeerClosed(Exception):
    pass


class _Malformed(Exception):
    pass


class _Reader:
    """Buffered reads from a blocking socket (the backend's side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def more(self) -> None:
        try:
            data = self.sock.recv(262144)
        except OSError:
            data = b""
        if not data:
            raise _PeerClosed()
        self.buf += data

    def head(self) -> bytes:
        while True:
            # RFC 9112 section 2.2: empty lines before a request line may be ignored.
            while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":
                self.buf = self.buf[2:] if self.buf[:2] == b"\r\n" else self.buf[1:]
            if self.buf:
                break
            self.more()
        while True:
            cands = [
                (i, n) for i, n in ((self.buf.find(b"\r\n\r\n"), 4), (self.buf.find(b"\n\n"), 2)) if i >= 0
            ]
            if cands:
                pos, n = min(cands)
                head, self.buf = self.buf[: pos + n], self.buf[pos + n :]
                return head
            if len(self.buf) > 1 << 20:
                raise _Malformed("head too large")
            self.more()

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 1], self.buf[i + 1 :]
                return line
            if len(self.buf) > 1 << 16:
                raise _Malformed("line too long")
            self.more()

    def some(self, n: int) -> bytes:
        if not self.buf:
            self.more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _parse_request_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3:
        raise _Malformed("bad request line")
    headers = []
    for ln in lines[1:]:
        if ln[:1] in (" ", "\t"):
            raise _Malformed("obs-fold")
        if ":" not in ln:
            raise _Malformed("bad header line")
        name, value = ln.split(":", 1)
        headers.append((name, value.strip(" \t")))
    return parts[0], parts[1], parts[2], headers


def hget(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The combined value of a header (RFC 9110 section 5.3), or None."""
    name = name.lower()
    vals = [v for n, v in headers if n.lower() == name]
    return ", ".join(vals) if vals else None


def hnames(headers: Sequence[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def _close_listener(sock: socket.socket) -> None:
    """Close a listener another thread may be blocked accepting on. On Linux shutdown() wakes that
    accept at once; close() alone leaves it waiting out its timeout (a fixed cost per backend stop)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TestBackend:
    """A threaded HTTP/1.1 backend on 127.0.0.1, scripted by request path.

    Every request head it parses is recorded (``records``), with the id of the connection it came on;
    ``conns_total`` counts accepted connections. Paths (query strings are ignored except ``readdelay``):

      (anything else)     200, JSON: method, target, version, headers, body_len, body_sha256, framing, conn
                          ``?readdelay=MS`` sleeps before reading the request body
      /delay/MS           sleep, then echo
      /status/NNN         that status; 204/304 without a body
      /chunked            chunked response in several pieces (close-delimited to HTTP/1.0)
      /big/N              N deterministic bytes with Content-Length (``?delay=MS`` first sleeps)
      /close-mid          Content-Length 1000, 500 bytes, close
      /close-mid-chunked  chunked head, two chunks, close without the last chunk
      /stall-body         Content-Length 1000, 100 bytes, then silence until the peer closes
      /slow-body          Content-Length 400, one 100-byte piece every 400 ms
      /resp/NAME          the raw bytes RESPONSES[NAME], then close
      /close-now          close without a byte
      /garbage            bytes that are not HTTP, then close
      /hang               never answer (until the peer closes)
      /no-length          200 without Content-Length or Transfer-Encoding, close-delimited body
      /hop-resp           a response carrying hop-by-hop headers
      /ws                 101 Switching Protocols to a websocket upgrade, greets, then echoes raw bytes
      /early-413          413 + Connection: close as soon as the head is read, body never read
      /close-after/MS     echo (keep-alive, no Connection: close), then close the connection MS later
      /drop-next          echo; the next request on this connection is read in full, then the
                          connection is closed without a response byte (a keep-alive close race)
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, name: str, port: int | None = None, rcvbuf: int | None = None, sndbuf: int | None = None
    ) -> None:
        self.name = name
        self.rcvbuf, self.sndbuf = rcvbuf, sndbuf
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.conns_total = 0
        self._conn_seq = 0
        self._open: dict[int, socket.socket] = {}
        self._stopped = threading.Event()
        self._listener = self._bind(port)
        self.port = self._listener.getsockname()[1]
        self.address = "%s:%d" % (HOST, self.port)
        self._thread = threading.Thread(target=self._accept_loop, name="backend-%s" % name, daemon=True)
        self._thread.start()

    def _bind(self, port: int | None) -> socket.socket:
        last: OSError | None = None
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if self.sndbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            try:
                s.bind((HOST, port if port is not None else free_port()))
            except OSError as exc:
                s.close()
                last = exc
                if port is not None:
                    time.sleep(0.05)
                continue
            s.listen(1024)
            s.settimeout(0.2)
            return s
        raise last or OSError("cannot bind")

    # ---- queries ------------------------------------------------------------------------------------
    def reqs(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)

    def reset(self) -> None:
        with self.lock:
            self.records = []

    def open_conns(self) -> int:
        with self.lock:
            return len(self._open)

    def stop(self) -> None:
        self._stopped.set()
        _close_listener(self._listener)
        with self.lock:
            socks = list(self._open.values())
        for c in socks:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2)

    # ---- serving ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self._conn_seq += 1
                cid = self._conn_seq
                self.conns_total += 1
                self._open[cid] = sock
            threading.Thread(target=self._serve, args=(sock, cid), daemon=True).start()

    def _serve(self, sock: socket.socket, cid: int) -> None:
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rd = _Reader(sock)
        state = {"drop_next": False}
        try:
            while not self._stopped.is_set():
                try:
                    head = rd.head()
                except _PeerClosed:
                    break
                if not self._one(sock, rd, cid, head, state):
                    break
        except (_PeerClosed, _Malformed, OSError):
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self.lock:  # after the close: open_conns() == 0 means the peer has our FIN (or RST)
                self._open.pop(cid, None)

    def _send(
        self,
        sock: socket.socket,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        head_only: bool = False,
        reason: str = "Whatever",
    ) -> None:
        lines = ["HTTP/1.1 %d %s" % (status, reason), "X-Backend: %s" % self.name]
        lines += ["%s: %s" % hv for hv in headers]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sock.sendall(data if head_only else data + body)

    def _bad(self, sock: socket.socket) -> bool:
        self._send(sock, 400, [("Content-Length", "0"), ("Connection", "close")])
        return False

    def _one(self, sock: socket.socket, rd: _Reader, cid: int, head: bytes, state: dict[str, bool]) -> bool:
        rec: dict[str, Any] = {
            "backend": self.name,
            "conn": cid,
            "raw_head": head,
            "t": time.monotonic(),
            "method": None,
            "target": None,
            "path": None,
            "version": None,
            "headers": [],
            "complete": False,
            "body_len": 0,
            "body_sha": sha(b""),
            "framing": "none",
            "dropped": False,
            "malformed": None,
            "trailers": [],
        }
        try:
            method, target, version, headers = _parse_request_head(head)
        except _Malformed as exc:
            rec["malformed"] = str(exc)
            with self.lock:
                self.records.append(rec)
            return self._bad(sock)
        path, _, query = target.partition("?")
        rec.update(method=method, target=target, path=path, version=version, headers=headers)
        with self.lock:
            self.records.append(rec)

        # RFC 9112 section 6.3: Transfer-Encoding wins over Content-Length (both: we read it as chunked).
        te = hget(headers, "transfer-encoding")
        cls = [v for n, v in headers if n.lower() == "content-length"]
        length = 0
        framing = "none"
        if te is not None:
            if te.split(",")[-1].strip().lower() != "chunked":
                return self._bad(sock)
            framing = "chunked"
        elif cls:
            vals = {v.strip() for c in cls for v in c.split(",")}
            if len(vals) != 1 or not next(iter(vals)).isdigit():
                return self._bad(sock)
            length = int(next(iter(vals)))
            framing = "cl" if length else "none"
        rec["framing"] = framing
        params = dict(p.split("=", 1) if "=" in p else (p, "") for p in query.split("&") if p)
        rec["params"] = params

        if path == "/early-413":
            # Answer before reading the body; leave it unread, then close.
            self._send(sock, 413, [("Content-Length", "9"), ("Connection", "close")], b"too large")
            rec["early"] = True
            time.sleep(0.5)
            return False

        if framing != "none":
            if (hget(headers, "expect") or "").lower() == "100-continue":
                rec["saw_expect"] = True
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "readdelay" in params:
                time.sleep(int(params["readdelay"]) / 1000.0)
            if not self._read_body(sock, rd, rec, framing, length):
                return False
        rec["complete"] = True

        if state["drop_next"]:
            # The keep-alive race: this server closed "at the same time" the request arrived.
            rec["dropped"] = True
            return False

        tokens = [t.strip().lower() for t in (hget(headers, "connection") or "").split(",")]
        keep_alive = ("keep-alive" in tokens) if version == "HTTP/1.0" else ("close" not in tokens)
        return self._dispatch(sock, rd, rec, path, method, version, headers, keep_alive, state)

    def _read_body(
        self, sock: socket.socket, rd: _Reader, rec: dict[str, Any], framing: str, length: int
    ) -> bool:
        h = hashlib.sha256()
        total = 0
        try:
            if framing == "cl":
                left = length
                while left:
                    data = rd.some(min(left, 262144))
                    left -= len(data)
                    total += len(data)
                    h.update(data)
            else:
                while True:
                    line = rd.line()
                    size = line.split(b";", 1)[0].strip()
                    if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                        rec["bad_chunk"] = line
                        return self._bad(sock)
                    n = int(size, 16)
                    if n == 0:
                        while True:
                            tl = rd.line()
                            if tl in (b"\r\n", b"\n"):
                                break
                            rec["trailers"].append(tl)
                        break
                    left = n
                    while left:
                        data = rd.some(min(left, 262144))
                        left -= len(data)
                        total += len(data)
                        h.update(data)
                    if rd.line() not in (b"\r\n", b"\n"):
                        rec["bad_chunk"] = b"no CRLF after chunk data"
                        return self._bad(sock)
        finally:
            rec["body_len"] = total
        rec["body_sha"] = h.hexdigest()
        return True

    def _dispatch(
        self,
        sock: socket.socket,
        rd: _Reader,
        rec: dict[str, Any],
        path: str,
        method: str,
        version: str,
        headers: list[tuple[str, str]],
        keep_alive: bool,
        state: dict[str, bool],
    ) -> bool:
        head_only = method == "HEAD"
        ch = [] if keep_alive else [("Connection", "close")]
        if path.startswith("/delay/"):
            time.sleep(int(path.split("/")[2]) / 1000.0)
            return self._echo(sock, rec, ch, head_only, keep_alive)
        if path.startswith("/status/"):
            st = int(path.split("/")[2])
            if st in (204, 304):
                self._send(sock, st, ([("ETag", '"v1"')] if st == 304 else []) + ch, head_only=True)
            else:
                body = ("status %d\n" % st).encode()
                self._send(sock, st, [("Content-Length", str(len(body)))] + ch, body, head_only)
            return keep_alive
        if path == "/chunked":
            if version == "HTTP/1.0":
                self._send(sock, 200, [("Connection", "close")], head_only=True)
                if not head_only:
                    for p in CHUNKED_PIECES:
                        sock.sendall(p)
                        time.sleep(0.01)
                return False
            self._send(sock, 200, [("Transfer-Encoding", "chunked")] + ch, head_only=True)
            if not head_only:
                for p in CHUNKED_PIECES:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(p), p))
                    time.sleep(0.01)
                sock.sendall(b"0\r\n\r\n")
            return keep_alive
        if path.startswith("/big/"):
            n = int(path.split("/")[2])
            if "delay" in rec["params"]:
                time.sleep(int(rec["params"]["delay"]) / 1000.0)
            self._send(sock, 200, [("Content-Length", str(n))] + ch, head_only=True)
            if not head_only:
                for p in big_pieces(n):
                    sock.sendall(p)
            return keep_alive
        if path == "/close-mid":
            self._send(sock, 200, [("Content-Length", "1000")], CLOSE_MID_HALF)
            time.sleep(0.05)
            return False
        if path == "/close-mid-chunked":
            self._send(sock, 200, [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n6\r\n world\r\n")
            time.sleep(0.05)
            return False
        if path == "/stall-body":
            self._send(sock, 200, [("Content-Length", "1000")], STALL_BODY_PART)
            self._hang(sock)
            return False
        if path == "/slow-body":
            self._send(sock, 200, [("Content-Length", str(len(SLOW_BODY)))] + ch, head_only=True)
            if not head_only:
                for i in range(0, len(SLOW_BODY), 100):
                    time.sleep(0.4)
                    sock.sendall(SLOW_BODY[i : i + 100])
            return keep_alive
        if path.startswith("/resp/"):
            # A canned raw response (RESPONSES[name]), then close.
            sock.sendall(RESPONSES[path.split("/")[2]])
            time.sleep(0.05)
            return False
        if path == "/close-now":
            return False
        if path == "/garbage":
            sock.sendall(b"THIS IS NOT HTTP AT ALL\r\n\x00\x01\x02\r\n\r\n")
            return False
        if path == "/hang":
            self._hang(sock)
            return False
        if path == "/no-length":
            self._send(sock, 200, [("Connection", "close")], head_only=True)
            if not head_only:
                sock.sendall(NO_LENGTH_BODY[:1000])
                time.sleep(0.02)
                sock.sendall(NO_LENGTH_BODY[1000:])
            return False
        if path == "/hop-resp":
            self._send(
                sock,
                200,
                [
                    ("Content-Length", str(len(HOP_RESP_BODY))),
                    ("Connection", "X-Resp-Hop" + ("" if keep_alive else ", close")),
                    ("X-Resp-Hop", "must-not-reach-client"),
                    ("Keep-Alive", "timeout=99, max=7"),
                    ("Proxy-Connection", "keep-alive"),
                    ("Trailer", "X-Nothing"),
                    ("X-End-To-End", "kept"),
                ],
                HOP_RESP_BODY,
                head_only,
            )
            return keep_alive
        if path == "/ws":
            if "websocket" not in (hget(headers, "upgrade") or "").lower():
                body = b"upgrade required"
                self._send(sock, 426, [("Content-Length", str(len(body)))] + ch, body, head_only)
                return keep_alive
            key = hget(headers, "sec-websocket-key") or ""
            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            self._send(
                sock,
                101,
                [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)],
                head_only=True,
            )
            rec["upgraded"] = True
            sock.sendall(WS_GREETING)
            if rd.buf:
                sock.sendall(rd.buf)
                rd.buf = b""
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                sock.sendall(data)
            return False
        if path.startswith("/close-after/"):
            ms = int(path.split("/")[2])
            self._echo(sock, rec, [], head_only, True)
            time.sleep(ms / 1000.0)
            return False
        if path == "/drop-next":
            state["drop_next"] = True
            return self._echo(sock, rec, ch, head_only, keep_alive)
        return self._echo(sock, rec, ch, head_only, keep_alive)

    def _hang(self, sock: socket.socket) -> None:
        end = time.monotonic() + 30
        sock.settimeout(0.2)
        while time.monotonic() < end and not self._stopped.is_set():
            try:
                if not sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    def _echo(
        self,
        sock: socket.socket,
        rec: dict[str, Any],
        ch: list[tuple[str, str]],
        head_only: bool,
        keep_alive: bool,
    ) -> bool:
        info = {
            "backend": self.name,
            "method": rec["method"],
            "target": rec["target"],
            "version": rec["version"],
            "headers": rec["headers"],
            "body_len": rec["body_len"],
            "body_sha256": rec["body_sha"],
            "framing": rec["framing"],
            "conn": rec["conn"],
        }
        body = json.dumps(info).encode()
        self._send(
            sock,
            200,
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + ch,
            body,
            head_only,
        )
        return keep_alive


class Blackhole:
    """A listener whose accept queue is full and never drained: connects to it time out (SYNs dropped)."""

    def __init__(self, name: str = "hole") -> None:
        self.name = name
        self.records: list[dict[str, Any]] = []
        self.conns_total = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((HOST, free_port()))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self.address = "%s:%d" % (HOST, self.port)
        self._fillers = []
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((HOST, self.port))
            except OSError:
                pass
            self._fillers.append(s)
        # The accept queue is full once the first filler's handshake completes (it becomes writable).
        select.select([], self._fillers[:1], [], 2.0)

    def reqs(self) -> list[dict[str, Any]]:
        return []

    def stop(self) -> None:
        for s in self._fillers:
            s.close()
        self._listener.close()


class DeadPort:
    """A port with nothing listening: connects are refused."""

    def __init__(self, name: str = "dead") -> None:
        self.name = name
        self.records: list[dict[str, Any]] = []
        self.conns_total = 0
        self.port = free_port()
        self.address = "%s:%d" % (HOST, self.port)

    def reqs(self) -> list[dict[str, Any]]:
        return []

    def stop(self) -> None:
        pass


AnyBackend = Union[TestBackend, Blackhole, DeadPort]


def all_reqs(backends: Sequence[AnyBackend]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in backends:
        out.extend(b.reqs())
    out.sort(key=lambda r: r["t"])
    return out


def saw_fragment(backends: Sequence[AnyBackend], fragment: bytes) -> bool:
    """Did any backend parse a request head (well-formed or not) containing ``fragment``?"""
    return any(fragment.lower() in r["raw_head"].lower() for r in all_reqs(backends))


# ---------------------------------------------------------------------------------------------------------
# the strict client


class Closed(Exception):
    """The peer closed (FIN or RST) before a complete response head."""

    def __init__(self, msg: str, data: bytes = b"", reset: bool = False) -> None:
        super().__init__(msg)
        self.data = data
        self.reset = reset


class Timeout(Exception):
    pass


class BadResponse(Exception):
    """balrs sent something that is not a well-formed HTTP/1.1 response."""


class Response:
    def __init__(self) -> None:
        self.version = ""
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.raw_head = b""
        self.body = b""
        self.body_len = 0
        self.body_sha = ""
        self.complete = False
        self.framing = ""  # none | cl | chunked | close
        self.interim: list[tuple[int, list[tuple[str, str]]]] = []
        self.trailers: list[bytes] = []

    def header(self, name: str) -> str | None:
        return hget(self.headers, name)

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def has_token(self, name: str, token: str) -> bool:
        return token.lower() in [t.strip().lower() for t in (self.header(name) or "").split(",")]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body.decode("utf-8"))  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return "<Response %s %s framing=%s len=%d complete=%s>" % (
            self.status,
            self.reason,
            self.framing,
            self.body_len,
            self.complete,
        )


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Client:
    """One client connection: sends exact bytes, parses responses strictly, every read has a deadline."""

    def __init__(self, addr: tuple[str, int], timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(_family(addr[0]), socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(min(timeout, 3.0))
        try:
            self.sock.connect(addr)
        except OSError:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.reset = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: Union[bytes, str]) -> None:
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    # ---- low level reads --------------------------------------------------------------------------------
    def _recv(self, deadline: float) -> bytes:
        if self.eof:
            return b""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("timed out (have %d buffered bytes: %r)" % (len(self.buf), self.buf[:80]))
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            raise Timeout("timed out (have %d buffered bytes: %r)" % (len(self.buf), self.buf[:80])) from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self.eof = self.reset = True
            return b""
        if not data:
            self.eof = True
        return data

    def _fill(self, deadline: float) -> bool:
        data = self._recv(deadline)
        self.buf += data
        return bool(data)

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < n:
            if not self._fill(deadline):
                break
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_available(self, wait: float) -> bytes:
        """Whatever arrives within ``wait`` seconds (stops early at EOF)."""
        deadline = time.monotonic() + wait
        out, self.buf = self.buf, b""
        while not self.eof:
            try:
                out += self._recv(deadline)
            except Timeout:
                break
        return out

    def wait_closed(self, timeout: float) -> tuple[bool, bytes, float]:
        """Wait for the peer to close. Returns (closed, bytes received meanwhile, seconds waited)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        data, self.buf = self.buf, b""
        while not self.eof:
            try:
                data += self._recv(deadline)
            except Timeout:
                return False, data, time.monotonic() - t0
        return True, data, time.monotonic() - t0

    def peer_closed(self) -> bool:
        """Non-blocking: has the peer closed? (Data that arrived is kept in the buffer.)"""
        if self.eof:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            self._fill(time.monotonic() + 0.5)
        return self.eof

    # ---- responses ----------------------------------------------------------------------------------------
    def _read_line(self, deadline: float, limit: int = 65536) -> bytes | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 1], self.buf[i + 1 :]
                if not line.endswith(b"\r\n"):
                    raise BadResponse("line not ended by CRLF: %r" % line[:80])
                return line[:-2]
            if len(self.buf) > limit:
                raise BadResponse("line too long")
            if not self._fill(deadline):
                return None

    def _read_head(self, deadline: float) -> tuple[bytes, list[bytes]]:
        lines: list[bytes] = []
        raw = b""
        while True:
            line = self._read_line(deadline)
            if line is None:
                raise Closed(
                    "connection %s before a complete response head (got %r)"
                    % ("reset" if self.reset else "closed", (raw + self.buf)[:120]),
                    raw + self.buf,
                    self.reset,
                )
            raw += line + b"\r\n"
            if not line:
                return raw, lines
            lines.append(line)

    def read_response(
        self,
        method: str = "GET",
        timeout: float | None = None,
        keep_body: bool = True,
        stop_at_interim: bool = False,
    ) -> Response:
        """Parse one response strictly; 1xx interim responses (not 101) go to ``.interim`` (or are returned
        on their own with ``stop_at_interim``). A body cut short by EOF gives ``complete = False``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        r = Response()
        while True:
            raw, lines = self._read_head(deadline)
            if not lines:
                raise BadResponse("empty response head")
            parts = lines[0].decode("latin-1").split(" ", 2)
            if (
                len(parts) < 2
                or parts[0] not in ("HTTP/1.1", "HTTP/1.0")
                or len(parts[1]) != 3
                or not parts[1].isdigit()
            ):
                raise BadResponse("bad status line %r" % lines[0][:80])
            headers = []
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or not name or any(c not in _TOKEN for c in name):
                    raise BadResponse("bad header line %r" % line[:80])
                if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
                    raise BadResponse("control character in header %r" % line[:80])
                headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                r.interim.append((status, headers))
                if stop_at_interim:
                    r.version, r.status, r.headers, r.raw_head = parts[0], status, headers, raw
                    r.reason = parts[2] if len(parts) > 2 else ""
                    r.framing, r.complete = "none", True
                    return r
                continue
            break
        r.version, r.status, r.reason = parts[0], status, (parts[2] if len(parts) > 2 else "")
        r.headers, r.raw_head = headers, raw
        h = hashlib.sha256()
        pieces: list[bytes] = []

        def take(data: bytes) -> None:
            r.body_len += len(data)
            h.update(data)
            if keep_body:
                pieces.append(data)

        te = r.header("transfer-encoding")
        cl = r.header_all("content-length")
        if te is not None and cl:
            raise BadResponse("response with both Transfer-Encoding and Content-Length")
        if method == "HEAD" or status in (101, 204, 304):
            r.framing, r.complete = "none", True
        elif te is not None:
            if te.lower() != "chunked":
                raise BadResponse("Transfer-Encoding %r" % te)
            r.framing = "chunked"
            r.complete = self._read_chunked(deadline, take, r)
        elif cl:
            if len(cl) != 1 or not cl[0].isdigit():
                raise BadResponse("Content-Length %r" % cl)
            r.framing = "cl"
            n = int(cl[0])
            while n > 0:
                if not self.buf and not self._fill(deadline):
                    break
                data, self.buf = self.buf[:n], self.buf[n:]
                n -= len(data)
                take(data)
            r.complete = n == 0
        else:
            r.framing = "close"
            while True:
                if self.buf:
                    take(self.buf)
                    self.buf = b""
                if not self._fill(deadline):
                    break
            r.complete = not self.reset
        r.body = b"".join(pieces)
        r.body_sha = h.hexdigest()
        return r

    def _read_chunked(self, deadline: float, take: Callable[[bytes], None], r: Response) -> bool:
        while True:
            line = self._read_line(deadline)
            if line is None:
                return False
            size = line.split(b";", 1)[0]
            if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                raise BadResponse("bad chunk size line %r" % line[:40])
            n = int(size, 16)
            if n == 0:
                while True:
                    t = self._read_line(deadline)
                    if t is None:
                        return False
                    if not t:
                        return True
                    r.trailers.append(t)
            while n > 0:
                if not self.buf and not self._fill(deadline):
                    return False
                data, self.buf = self.buf[:n], self.buf[n:]
                n -= len(data)
                take(data)
            end = self._read_line(deadline)
            if end is None:
                return False
            if end:
                raise BadResponse("chunk data not followed by CRLF")


def build(
    method: str = "GET",
    target: str = "/echo",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    version: str = "HTTP/1.1",
    host: str | None = "lb.test",
) -> bytes:
    """Exact request bytes. A Content-Length is added for ``body`` unless a framing header is given."""
    lines = ["%s %s %s" % (method, target, version)]
    if host is not None and not any(n.lower() == "host" for n, _ in headers):
        lines.append("Host: %s" % host)
    lines += ["%s: %s" % hv for hv in headers]
    if body is not None and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunk_encode(pieces: Sequence[bytes], ext: bytes = b"", trailer: bytes = b"") -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces)
    return out + b"0\r\n" + trailer + b"\r\n"


def request(
    addr: tuple[str, int],
    method: str = "GET",
    target: str = "/echo",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = 5.0,
    keep_body: bool = True,
) -> Response:
    """One request on a fresh connection (with ``Connection: close`` unless a Connection header is given)."""
    hs = list(headers)
    if not any(n.lower() == "connection" for n, _ in hs):
        hs.append(("Connection", "close"))
    with Client(addr, timeout=timeout) as c:
        c.send(build(method, target, hs, body))
        return c.read_response(method, keep_body=keep_body)


def listens(pid: int, port: int) -> bool:
    """Does process ``pid`` hold a TCP socket listening on ``port`` (IPv4, from /proc/net/tcp)?"""
    inodes = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add("socket:[%s]" % fields[9])
        fd_dir = "/proc/%d/fd" % pid
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink("%s/%s" % (fd_dir, fd)) in inodes:
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def can_connect(addr: tuple[str, int], timeout: float = 0.5) -> bool:
    s = socket.socket(_family(addr[0]), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------------
# the balrs process


def rss_kb(pid: int) -> int | None:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class RssSampler:
    """Peak VmRSS of a process, sampled in a thread while the ``with`` block runs."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period = pid, period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_kb(self.pid)
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def peak(self) -> int:
        return max(self.samples) if self.samples else 0


BALANCER_DEFAULTS: dict[str, str] = {
    "strategy": "round_robin",
    "connect_timeout": "1s",
    "header_timeout": "5s",
    "client_timeout": "10s",
    "backend_timeout": "5s",
    "retries": "1",
    "drain_timeout": "5s",
}


def lb_ini(
    listen: Union[str, Sequence[str]],
    backends: Sequence[Union[AnyBackend, tuple[AnyBackend, int]]],
    **balancer: object,
) -> str:
    """lb.ini text: ``listen`` plus BALANCER_DEFAULTS overridden by ``balancer`` (None drops a key);
    backends as objects with .name/.address or (object, weight)."""
    keys: dict[str, object] = dict(BALANCER_DEFAULTS)
    keys.update(balancer)
    listen_s = listen if isinstance(listen, str) else ", ".join(listen)
    lines = ["[balancer]", "listen = %s" % listen_s]
    lines += ["%s = %s" % (k, v) for k, v in keys.items() if v is not None]
    lines.append("")
    for spec in backends:
        b, w = spec if isinstance(spec, tuple) else (spec, 1)
        lines += ["[backend %s]" % b.name, "address = %s" % b.address, "weight = %d" % w, ""]
    return "\n".join(lines)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGKILL the child if the test process dies without its teardown."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return preexec


_PREEXEC = _pdeathsig()


def balrs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "balrs", *args]


def run_balrs(*args: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """Run a short-lived ``python -m balrs ...`` (--check, --version, a failing start); kill it on timeout."""
    p = subprocess.Popen(
        balrs_command(*args),
        cwd=str(REPO_ROOT),
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_PREEXEC,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("`balrs %s` still running after %gs" % (" ".join(args), timeout)) from None
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class StartError(Exception):
    pass


class BalrsProcess:
    """``python -m balrs lb.ini`` started from the repository root; stderr goes to a file."""

    def __init__(
        self, workdir: Path, config_text: str, port: int, args: Sequence[str] = (), name: str = "lb"
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.addr = (HOST, port)
        self.config_path = workdir / ("%s.ini" % name)
        self.config_path.write_text(config_text)
        self.log_path = workdir / ("%s.stderr" % name)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.admin_addr: tuple[str, int] | None = None  # [admin] listen, when start_balrs(admin=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(
        self, wait: bool = True, timeout: float = 10.0, wait_addr: tuple[str, int] | None = None
    ) -> BalrsProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                balrs_command(*self.args, str(self.config_path)),
                cwd=str(REPO_ROOT),
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_PREEXEC,
            )
        if wait:
            self.wait_listening(timeout, wait_addr)
        return self

    def wait_listening(self, timeout: float = 10.0, addr: tuple[str, int] | None = None) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise StartError(
                    "balrs exited with status %s before listening; stderr:\n%s"
                    % (self.returncode, self.log_tail())
                )
            if can_connect(addr or self.addr, 0.2):
                return
            time.sleep(0.02)
        raise StartError(
            "balrs did not listen on %s:%d within %gs; stderr:\n%s"
            % ((addr or self.addr) + (timeout, self.log_tail()))
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def log_mark(self) -> int:
        """Where the log ends now: pass it as ``wait_log(since=...)`` to wait for a line written later."""
        return len(self.log_text())

    def wait_log(self, text: str, timeout: float = 5.0, count: int = 1, since: int = 0) -> str:
        """Wait until ``text`` appears ``count`` times in the log (after offset ``since``); return the
        first line holding it. Fails with the log's tail, or at once if balrs exited meanwhile."""
        end = time.monotonic() + timeout
        while True:
            alive = self.alive()  # before reading: a process found dead has written its last line
            log = self.log_text()[since:]
            if log.count(text) >= count:
                return next(line for line in log.splitlines() if text in line)
            if not alive or time.monotonic() >= end:
                break
            time.sleep(0.01)
        raise AssertionError(
            "%r not in balrs' log %d time(s) within %gs (balrs %s); log:\n%s"
            % (text, count, timeout, "running" if self.alive() else "exited %s" % self.returncode,
               self.log_tail())
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL if still running after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()  # by PID (Popen.kill is os.kill(pid, SIGKILL))
            except OSError:
                pass
            self.proc.wait(5)

    def rss_kb(self) -> int:
        v = rss_kb(self.pid)
        assert v is not None, "cannot read VmRSS of balrs (pid %d)" % self.pid
        return v


BackendSpec = Union[AnyBackend, Tuple[AnyBackend, int]]


def start_balrs(
    workdir: Path,
    backends: Sequence[BackendSpec],
    args: Sequence[str] = (),
    name: str = "lb",
    wait_addr: tuple[str, int] | None = None,
    extra_listen: Sequence[str] = (),
    admin: bool = False,
    **balancer: object,
) -> BalrsProcess:
    """Write an lb.ini and start balrs on a free port (a new port if the chosen one was taken meanwhile);
    return once it accepts connections (on ``wait_addr`` if given, e.g. for ``--listen``).
    ``extra_listen``: more ``listen`` addresses after the first. ``admin``: also an ``[admin] listen``
    on a free port (``admin_addr``), waited for too."""
    def text_for(port: int, admin_port: int | None) -> str:
        text = lb_ini(["127.0.0.1:%d" % port, *extra_listen], backends, **balancer)
        if admin_port is not None:
            text += "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin_port
        return text

    return start_config(workdir, text_for, args, name, wait_addr, admin)


def start_config(
    workdir: Path,
    text_for: Callable[[int, int | None], str],
    args: Sequence[str] = (),
    name: str = "lb",
    wait_addr: tuple[str, int] | None = None,
    admin: bool = False,
) -> BalrsProcess:
    """Start balrs with the lb.ini ``text_for(port, admin_port)`` on free ports (``admin_port`` None
    unless ``admin``), trying new ones if a chosen port was taken meanwhile; return once it accepts
    connections (on ``wait_addr`` if given, and on the admin port, ``admin_addr``)."""
    last: Exception = StartError("not started")
    for attempt in range(3):
        port = free_port()
        admin_addr = (HOST, free_port()) if admin else None
        text = text_for(port, admin_addr[1] if admin_addr is not None else None)
        lb = BalrsProcess(workdir, text, port, args, name="%s-%d" % (name, attempt))
        lb.admin_addr = admin_addr
        try:
            lb.start(wait_addr=admin_addr or wait_addr)
            if admin_addr is not None:
                lb.wait_listening(5.0, wait_addr)
            return lb
        except StartError as exc:
            lb.kill()
            last = exc
            if "in use" not in str(exc).lower():
                break
    raise last
