"""The proxy in-process: a real Balancer on a hand-turned loop (fake clock), real sockets on 127.0.0.1, a
scripted raw backend. Used where a test must control the order in which the loop sees events (a pooled
connection taken before its readable event is dispatched), or must see the balancer's objects.

- A pooled upstream connection is never reused while it holds unread bytes or was closed by the backend
  (response desync: a response ending on a 64 KiB read boundary followed by surplus bytes).
- A response status of 600..999 is forwarded and counted as 5xx (RFC 9110 §15).
- An exception inside a connection's callback costs that exchange (500), never the loop or a hung client,
  and is not charged to the backend.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from balrs.config import Address, BackendConfig, Config
from balrs.pool import Backend
from balrs.proxy import UPSTREAM_RECV_SIZE, ClientConn, UpstreamConn
from balrs.proxy.upstream import readable_poll
from balrs.reactor import EVENT_READ, Reactor
from balrs.server import Balancer

from proxyrig import FakeClock, sized_response

HOST = "127.0.0.1"
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


# In a scripted answer: send what comes before it, wait 50 ms, send the rest.
LATER = b"<<later>>"


class RawBackend:
    """A blocking backend on a thread: reads request heads (and Content-Length bodies), answers each with
    ``script(path)``: (bytes to send, close afterwards). Records (connection number, path) per request."""

    def __init__(self, script: Callable[[str], Tuple[bytes, bool]]) -> None:
        self.script = script
        self.seen: List[Tuple[int, str]] = []
        self.conns = 0
        self.lsock = socket.socket()
        self.lsock.bind((HOST, 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.stopped = threading.Event()
        self.socks: List[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns += 1
            self.socks.append(s)
            threading.Thread(target=self._serve, args=(s, self.conns), daemon=True).start()

    def _serve(self, s: socket.socket, cid: int) -> None:
        s.settimeout(5)
        buf = b""
        try:
            while not self.stopped.is_set():
                while b"\r\n\r\n" not in buf:
                    data = s.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                path = lines[0].split(b" ")[1].decode()
                length = 0
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                while len(buf) < length:
                    data = s.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.seen.append((cid, path))
                out, close = self.script(path)
                for i, piece in enumerate(out.split(LATER)):
                    if i:
                        time.sleep(0.05)
                    s.sendall(piece)
                if close:
                    s.shutdown(socket.SHUT_WR)
                    return
        except OSError:
            return

    def stop(self) -> None:
        self.stopped.set()
        self.lsock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


class Rig:
    """A Balancer on a fake clock whose loop the test turns; clients are plain blocking sockets."""

    def __init__(self, backend_port: int, **keys: Any) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(self.clock)
        config = Config(path="test.ini", listen=(Address(HOST, 0),),
                        backends=(BackendConfig("b1", Address(HOST, backend_port), 1),), **keys)
        self.bal = Balancer(config, reactor=self.reactor)
        self.bal.listen()
        self.addr = self.bal.listeners[0][0].getsockname()
        self.clients: List[socket.socket] = []

    @property
    def backend(self) -> Backend:
        return self.bal.pool.backends[0]

    def connect(self) -> socket.socket:
        c = socket.create_connection(self.addr, timeout=5)
        self.clients.append(c)
        self.turn_until(lambda: len(self.bal.clients) >= len(self.clients))
        return c

    def conn_of(self, client: socket.socket) -> ClientConn:
        port = client.getsockname()[1]
        for conn in self.bal.clients:
            if conn.tr.sock.getpeername()[1] == port:
                return conn
        raise AssertionError("no ClientConn for that client")

    def turn(self, timeout: float = 0.01) -> int:
        events = self.reactor.selector.select(timeout)
        for key, mask in events:
            key.data(mask)
        soon = self.reactor._soon
        while soon:
            batch = soon[:]
            del soon[:]
            for cb in batch:
                cb()
        self.reactor.wheel.run(self.clock.now)
        self.reactor.uncork()  # the end of the turn, as Reactor.run ends it
        return len(events)

    def turn_until(self, cond: Callable[[], Any], real_timeout: float = 5.0) -> None:
        end = time.monotonic() + real_timeout
        while not cond():
            assert time.monotonic() < end, "condition not reached"
            self.turn()

    def read_response(self, client: socket.socket, real_timeout: float = 5.0) -> Tuple[bytes, bytes]:
        """Turn the loop until one whole Content-Length response arrived on ``client``: (head, body)."""
        client.settimeout(0.0)
        buf = b""
        end = time.monotonic() + real_timeout
        while True:
            assert time.monotonic() < end, "no complete response; got %r" % buf[:200]
            self.turn()
            try:
                data = client.recv(1 << 20)
            except BlockingIOError:
                continue
            assert data, "connection closed; got %r" % buf[:200]
            buf += data
            if b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.lower() == b"content-length":
                        length = int(v)
                if len(rest) >= length:
                    assert len(rest) == length, "bytes after the response: %r" % rest[length:][:80]
                    return head, rest

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.bal.stop()
        self.reactor.close()


@pytest.fixture
def rig_for() -> Iterator[Callable[..., Tuple[Rig, RawBackend]]]:
    made: List[Tuple[Rig, RawBackend]] = []

    def make(script: Callable[[str], Tuple[bytes, bool]], **keys: Any) -> Tuple[Rig, RawBackend]:
        backend = RawBackend(script)
        rig = Rig(backend.port, **keys)
        made.append((rig, backend))
        return rig, backend

    yield make
    for rig, backend in made:
        rig.close()
        backend.stop()


def good(path: str) -> bytes:
    body = b"GOOD " + path.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def poisoning(total: int) -> Callable[[str], Tuple[bytes, bool]]:
    """/poison: a response of exactly ``total`` bytes and a whole second response after it, in one write
    (a backend that sent more than it declared); anything else: a normal answer."""
    def script(path: str) -> Tuple[bytes, bool]:
        if path == "/poison":
            return sized_response(total) + EVIL, False
        return good(path), False
    return script


# ---- response desync on pooled connections -------------------------------------------------------------
@pytest.mark.parametrize("total", [UPSTREAM_RECV_SIZE, 2 * UPSTREAM_RECV_SIZE, 3 * UPSTREAM_RECV_SIZE - 1,
                                   1000])
def test_surplus_never_answers_the_same_clients_pipelined_request(rig_for, total):
    rig, backend = rig_for(poisoning(total))
    c = rig.connect()
    c.sendall(b"GET /poison HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    _head, body = rig.read_response(c)
    assert len(body) > 0 and set(body) == {ord("a")}
    _head, body = rig.read_response(c)
    assert body == b"GOOD /2"
    # The poisoned connection was not reused: /2 went on another one.
    assert backend.seen[0][0] != backend.seen[1][0]


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("total", [1000, UPSTREAM_RECV_SIZE, 2 * UPSTREAM_RECV_SIZE])
def test_surplus_never_answers_another_clients_request(rig_for, total, late):
    """The other way of reuse: client 2's request is handled before the loop has read what arrived on the
    idle connection (its readable event comes later in the batch). With ``late`` the surplus comes 50 ms
    after the response, when the connection is already pooled: only the check when it is taken sees it."""
    def script(path: str) -> Tuple[bytes, bool]:
        if path == "/poison":
            return sized_response(total) + (LATER if late else b"") + EVIL, False
        return good(path), False
    rig, backend = rig_for(script)
    c1 = rig.connect()
    c2 = rig.connect()
    conn2 = rig.conn_of(c2)
    c1.sendall(b"GET /poison HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.read_response(c1)
    c2.sendall(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
    deadline = time.monotonic() + 5
    while not _readable(conn2.tr.sock):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.15)  # the surplus is in balrs' receive buffer by now, unread
    conn2.tr._on_io(EVENT_READ)  # client 2 first, before any event of the idle upstream connection
    _head, body = rig.read_response(c2)
    assert body == b"GOOD /other"
    assert backend.seen[-1][0] != backend.seen[0][0]


def _readable(sock: socket.socket) -> bool:
    import select
    return bool(select.select([sock], [], [], 0)[0])


def test_connection_the_backend_closed_is_not_reused_for_a_post(rig_for):
    """A pooled connection whose FIN has arrived but not yet been read is not taken: a POST (not
    retried on a stale connection) still gets its answer instead of 502."""
    def script(path: str) -> Tuple[bytes, bool]:
        return good(path), path == "/bye"   # answer /bye, then close the connection
    rig, backend = rig_for(script)
    c1 = rig.connect()
    c2 = rig.connect()
    conn2 = rig.conn_of(c2)
    c1.sendall(b"GET /bye HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.read_response(c1)
    c2.sendall(b"POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    while not _readable(conn2.tr.sock):
        time.sleep(0.005)
    time.sleep(0.05)
    conn2.tr._on_io(EVENT_READ)
    head, body = rig.read_response(c2)
    assert head.startswith(b"HTTP/1.1 200") and body == b"GOOD /post"
    assert backend.conns == 2


def test_clean_idle_connections_are_reused(rig_for):
    rig, backend = rig_for(lambda path: (good(path), False))
    c = rig.connect()
    for i in range(5):
        c.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        assert rig.read_response(c)[1] == b"GOOD /%d" % i
    assert backend.conns == 1


# ---- status codes outside 100..599 -------------------------------------------------------------------------
@pytest.mark.parametrize("status", [600, 799, 999])
def test_status_600_to_999_is_forwarded_and_counted_as_5xx(rig_for, status):
    def script(path: str) -> Tuple[bytes, bool]:
        return b"HTTP/1.1 %d Odd\r\nContent-Length: 2\r\n\r\nok" % status, False
    rig, _backend = rig_for(script)
    c = rig.connect()
    for _ in range(2):
        c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head, body = rig.read_response(c)
        assert head.startswith(b"HTTP/1.1 %d Odd" % status) and body == b"ok"
    b = rig.backend
    assert b.failures == 0 and b.consecutive_errors == 0
    snap = rig.bal.snapshot()
    assert snap["backends"][0]["responses"] == [0, 0, 0, 0, 2]
    assert snap["responses"] == {str(status): 2}


def test_backend_observe_every_three_digit_status():
    b = Backend(BackendConfig("x", Address(HOST, 1), 1), resolve_now=False)
    for status in range(100, 1000):
        b.observe(0.001, 1.0, status)
    snap_classes = [sum(b.responses[1:2]), sum(b.responses[2:3]), sum(b.responses[3:4]), sum(b.responses[4:5]),
                    sum(b.responses[5:])]
    assert snap_classes == [100, 100, 100, 100, 500]


# ---- an exception inside a callback ---------------------------------------------------------------------
def test_internal_error_costs_one_exchange_not_the_backend(rig_for, monkeypatch, caplog):
    rig, _backend = rig_for(lambda path: (good(path), False))
    calls: Dict[str, int] = {"n": 0}
    real = Backend.observe

    def broken(self: Backend, seconds: float, now: float, status: int = 0) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise IndexError("a bug")
        real(self, seconds, now, status)

    monkeypatch.setattr(Backend, "observe", broken)
    c = rig.connect()
    c.sendall(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _body = rig.read_response(c)
    assert head.startswith(b"HTTP/1.1 500")
    assert rig.backend.failures == 0 and rig.backend.active == 0
    assert "internal error" in caplog.text
    # The loop goes on serving.
    c2 = rig.connect()
    c2.sendall(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rig.read_response(c2)[1] == b"GOOD /2"


def test_upstream_conn_clean_sees_bytes_and_eof():
    """UpstreamConn.clean() on its own: nothing pending, pending bytes, then the backend's FIN."""
    a, b = socket.socketpair()
    try:
        up = UpstreamConn.__new__(UpstreamConn)
        up.peek_poll = readable_poll(a.fileno())
        assert up.clean()
        b.sendall(b"x")
        assert not up.clean()
        a.recv(1)
        assert up.clean()
        b.shutdown(socket.SHUT_WR)
        assert not up.clean()
    finally:
        a.close()
        b.close()

