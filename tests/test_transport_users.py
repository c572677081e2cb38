"""The transport (balrs.transport) on real sockets, and the streams converted to it: health probes, the
admin endpoint's connections and the control channel.

Everything runs on a ``Reactor`` with a fake clock, turned one loop turn at a time (``Loop.turn``): socket
events are real (socket pairs and 127.0.0.1), time moves only when a test says so, so every deadline
fires exactly when the test passes it. Each wait is bounded in real time (``REAL_TIMEOUT``) and every
blocking socket has a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import pytest

from balrs.admin import ADMIN_LINGER_MAX_BYTES, ADMIN_SEND_TIMEOUT, AdminServer
from balrs.config import Address
from balrs.control import Channel, encode_frame
from balrs.health import MAX_PROBE_HEAD, P_IDLE, P_READING, _Probe, probe_request
from balrs.reactor import EVENT_READ, EVENT_WRITE, Reactor
from balrs.transport import CORK_LIMIT, HIGH_WATER, LOW_WATER, Protocol, Transport, connect

HOST = "127.0.0.1"
# The longest any test waits for a real socket event.
REAL_TIMEOUT = 5.0


# ---- a fake clock and a hand-turned loop -------------------------------------------------------------------
class FakeClock:
    __slots__ = ("now",)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Loop:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(self.clock)

    @property
    def now(self) -> float:
        return self.clock.now

    def turn(self, times: int = 1) -> None:
        """Loop turns at the current fake time: ready sockets, deferred calls, due timers."""
        for _ in range(times):
            self.reactor.call_soon(self.reactor.stop)
            self.reactor.run()

    def spin(self, pred: Callable[[], Any], timeout: float = REAL_TIMEOUT) -> Any:
        """Turn the loop (fake time stands still) until ``pred()`` is true, at most ``timeout`` real seconds."""
        end = time.monotonic() + timeout
        while True:
            self.turn()
            v = pred()
            if v or time.monotonic() > end:
                return v
            time.sleep(0.002)

    def settle(self, real: float = 0.1) -> None:
        end = time.monotonic() + real
        while time.monotonic() < end:
            self.turn()
            time.sleep(0.002)

    def advance(self, dt: float) -> None:
        self.clock.now += dt
        self.turn()

    def registered(self, fd: int) -> int:
        """The selector mask ``fd`` is registered with (0: not registered)."""
        key = self.reactor.selector.get_map().get(fd)
        return key.events if key is not None else 0


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.reactor.close()


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """A Unix socket pair: ``ours`` (non-blocking, for a transport) and ``theirs`` (the test's peer)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(REAL_TIMEOUT)
    yield ours, theirs
    ours.close()
    theirs.close()


def closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    s = socket.socket()
    s.bind((HOST, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Rec(Protocol):
    """Records every callback; ``raise_in`` names callbacks that raise (a bug in a protocol)."""

    def __init__(self, raise_in: Tuple[str, ...] = ()) -> None:
        self.calls: List[str] = []
        self.data = bytearray()
        self.lost: List[Optional[BaseException]] = []
        self.failed: List[int] = []
        self.raise_in = raise_in

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.raise_in:
            raise RuntimeError("bug in " + name)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self._call("data")

    def eof_received(self, reset: bool) -> None:
        self._call("reset" if reset else "eof")

    def connection_made(self) -> None:
        self._call("made")

    def connect_failed(self, err: int) -> None:
        self.failed.append(err)
        self._call("connect_failed")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost.append(exc)
        self._call("lost")

    def write_queued(self) -> None:
        self._call("queued")

    def pause_writing(self) -> None:
        self._call("pause")

    def resume_writing(self) -> None:
        self._call("resume")

    def write_drained(self) -> None:
        self._call("drained")

    def timer_fired(self) -> None:
        self._call("timer")

    def internal_error(self) -> None:
        self.calls.append("internal_error")


def drain_into(sock: socket.socket, out: bytearray, limit: int = 1 << 30) -> int:
    """Read what ``sock`` has now without blocking (at most ``limit`` bytes); returns how many."""
    got = 0
    sock.setblocking(False)
    try:
        while got < limit:
            try:
                data = sock.recv(min(65536, limit - got))
            except BlockingIOError:
                break
            if not data:
                break
            out += data
            got += len(data)
    finally:
        sock.settimeout(REAL_TIMEOUT)
    return got


# ---- the transport -----------------------------------------------------------------------------------------
def test_partial_write_queues_pauses_above_high_water_and_resumes_when_the_peer_reads(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec, reading=False)
    assert loop.registered(tr.fd) == 0   # not reading, nothing queued: no registration at all
    payload = bytes(range(256)) * (4 * HIGH_WATER // 256)
    tr.write(payload)
    # The socket took part; the rest waits in the queue, above the high-water mark.
    assert 0 < tr.queued < len(payload) and tr.queued > HIGH_WATER
    assert rec.calls == ["queued", "pause"]
    assert loop.registered(tr.fd) == EVENT_WRITE
    tr.write(b"<tail>")   # behind the queue, never before it
    assert tr.queued > HIGH_WATER
    loop.settle()
    assert "resume" not in rec.calls and "drained" not in rec.calls, "resumed while the peer reads nothing"
    # pause_writing is said again by each write above the mark (protocols treat it as idempotent).
    assert set(rec.calls) == {"queued", "pause"} and rec.calls.count("queued") == 1
    got = bytearray()
    end = time.monotonic() + REAL_TIMEOUT
    while "drained" not in rec.calls:
        assert time.monotonic() < end, "the queue never drained"
        drain_into(theirs, got)
        loop.turn()
    drain_into(theirs, got)
    assert bytes(got) == payload + b"<tail>"
    assert tr.queued == 0 and loop.registered(tr.fd) == 0
    # Resumed once the queue fell below the low-water mark: resume_writing while bytes are still
    # queued, or write_drained (whose default is resume_writing) when the flush emptied it at once.
    assert rec.calls[-1] == "drained" and rec.calls.count("drained") == 1
    assert all(c == "resume" for c in rec.calls[rec.calls.index("pause"):-1] if c != "pause")
    assert LOW_WATER < HIGH_WATER
    tr.close()


def test_a_write_the_socket_takes_whole_queues_nothing(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    tr.write_parts([b"one ", memoryview(b"two "), b"three"])
    # Small: corked until the end of the turn, not registered for writing.
    assert tr.corked and tr.queued == 13 and rec.calls == [] and loop.registered(tr.fd) == EVENT_READ
    loop.reactor.uncork()
    assert not tr.corked and tr.queued == 0 and rec.calls == ["drained"] and loop.registered(tr.fd) == EVENT_READ
    assert theirs.recv(100) == b"one two three"
    tr.close()


class CountingSocket:
    """A real socket that counts the sends made on it (to see how many a turn's writes took)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: List[int] = []

    def send(self, data: Any) -> int:
        n = self.sock.send(data)
        self.sends.append(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def counted(tr: Transport) -> CountingSocket:
    spy = CountingSocket(tr.sock)
    tr.sock = cast(Any, spy)
    return spy


def test_the_small_writes_of_one_turn_go_out_in_one_send_at_its_end(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    spy = counted(tr)
    theirs.sendall(b"ping")
    # The protocol answers from data_received with three writes: one send, after the callback.
    rec.data_received = lambda data: (tr.write(b"HTTP/1.1 200 OK\r\n"), tr.write(b"a: b\r\n\r\n"),  # type: ignore[method-assign]
                                      tr.write(b"body"))
    loop.turn()
    assert spy.sends == [len(b"HTTP/1.1 200 OK\r\na: b\r\n\r\nbody")] and tr.queued == 0
    assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\na: b\r\n\r\nbody"
    assert loop.reactor.corked == [] and loop.registered(tr.fd) == EVENT_READ
    tr.close()


def test_a_large_write_goes_out_at_once_after_what_is_corked(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    spy = counted(tr)
    big = b"x" * CORK_LIMIT
    tr.write(big)   # not corked: sent now
    assert spy.sends == [CORK_LIMIT] and not tr.corked and tr.queued == 0
    tr.write(b"head\r\n")
    assert spy.sends == [CORK_LIMIT] and tr.corked
    tr.write(big)   # the corked bytes reach the limit: both go now, in order, in one send
    assert spy.sends == [CORK_LIMIT, CORK_LIMIT + 6] and not tr.corked and tr.queued == 0
    got = bytearray()
    while len(got) < 2 * CORK_LIMIT + 6:
        got += theirs.recv(65536)
    assert bytes(got) == big + b"head\r\n" + big
    loop.reactor.uncork()   # nothing left: no send, no callback
    assert spy.sends == [CORK_LIMIT, CORK_LIMIT + 6] and rec.calls == []
    tr.close()


def test_close_and_half_close_send_what_is_corked_first(loop: Loop) -> None:
    for how in ("close", "shutdown_write"):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(REAL_TIMEOUT)
        rec = Rec()
        tr = Transport(loop.reactor, ours, rec)
        tr.write(b"last words")
        assert tr.corked
        getattr(tr, how)()
        got = bytearray()
        while True:
            piece = theirs.recv(100)
            if not piece:
                break
            got += piece
        assert bytes(got) == b"last words", how
        assert not tr.corked
        loop.reactor.uncork()   # already sent: the list's entry does nothing
        assert rec.calls == [], how
        tr.close()
        ours.close()
        theirs.close()


def test_a_stop_from_the_end_of_the_turn_ends_the_loop_at_once(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    """The turn's writes go out before the loop polls again; a stop they cause (a drain whose last
    response went out) ends the loop there instead of after the next poll."""
    import threading
    ours, theirs = pair
    rec = Rec()
    reactor = loop.reactor
    tr = Transport(reactor, ours, rec)
    rec.data_received = lambda data: tr.write(b"bye")  # type: ignore[method-assign]
    rec.write_drained = reactor.stop  # type: ignore[method-assign]
    reactor.call_later(3600.0, lambda: None)  # the next poll would wait for this (fake) hour
    reactor.enable_threadsafe()
    backstop: List[int] = []
    ended = threading.Event()
    # Bounded: if the loop polled again, this wakes it up after REAL_TIMEOUT (and the test fails).
    threading.Thread(target=lambda: ended.wait(REAL_TIMEOUT) or reactor.call_soon_threadsafe(
        lambda: (backstop.append(1), reactor.stop())), daemon=True).start()
    theirs.sendall(b"last request")
    reactor.run()
    ended.set()
    assert backstop == [] and theirs.recv(100) == b"bye"
    tr.close()


def test_corked_bytes_the_peer_cannot_take_are_queued(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    filler = 0
    while True:   # fill the socket buffer behind the transport's back
        try:
            filler += ours.send(b"f" * 65536)
        except BlockingIOError:
            break
    tr.write(b"after the filler")
    loop.reactor.uncork()
    assert rec.calls == ["queued"] and tr.queued == 16 and loop.registered(tr.fd) == EVENT_READ | EVENT_WRITE
    tr.write(b", then this")   # behind the queue
    got = bytearray()
    end = time.monotonic() + REAL_TIMEOUT
    while "drained" not in rec.calls:
        assert time.monotonic() < end, "the queue never drained"
        drain_into(theirs, got)
        loop.turn()
    drain_into(theirs, got)
    assert bytes(got) == b"f" * filler + b"after the filler, then this"
    assert rec.calls == ["queued", "drained"] and loop.registered(tr.fd) == EVENT_READ
    tr.close()


def test_half_close_both_ways(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    tr.write(b"hello")
    tr.shutdown_write()
    tr.shutdown_write()   # once
    tr.write(b"dropped")  # after our FIN: nothing more goes out
    got = bytearray()
    while True:
        piece = theirs.recv(100)
        if not piece:
            break
        got += piece
    assert bytes(got) == b"hello"
    # Our read side is still open: the peer's answer arrives, then its FIN.
    theirs.sendall(b"reply")
    assert loop.spin(lambda: rec.data == b"reply")
    theirs.shutdown(socket.SHUT_WR)
    assert loop.spin(lambda: "eof" in rec.calls)
    assert rec.calls == ["data", "eof"]
    tr.close()


def test_peer_half_close_leaves_our_write_side_open(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    theirs.sendall(b"request")
    theirs.shutdown(socket.SHUT_WR)
    assert loop.spin(lambda: "eof" in rec.calls)
    assert bytes(rec.data) == b"request"
    tr.pause_reading()   # as a protocol does after EOF: no more read events
    assert loop.registered(tr.fd) == 0
    tr.write(b"answer")
    loop.turn()
    assert theirs.recv(100) == b"answer"
    tr.close()


def test_connection_lost_comes_from_the_loop_after_epipe(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    theirs.close()
    tr.write(b"to nobody")
    tr.write(b"more")
    assert tr.corked and rec.calls == []
    loop.reactor.uncork()   # the end of the turn: the send fails
    # Not inside the send: the code that runs next in the turn sees a connection that is still whole.
    assert rec.calls == [] and tr.broken and tr.wr_closed and not tr.closed
    assert loop.registered(tr.fd) == 0   # stopped reading and writing
    tr.write(b"again")   # dropped: no second failure
    loop.turn()
    assert rec.calls == ["lost"]
    exc = rec.lost[0]
    assert isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET)
    loop.turn(3)
    assert rec.calls == ["lost"]
    tr.close()


def test_connection_lost_is_not_delivered_after_close(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    theirs.close()
    tr.write(b"x")
    tr.close()
    loop.turn(3)
    assert rec.calls == []


def test_connect_failed_for_a_refused_port(loop: Loop) -> None:
    rec = Rec()
    tr = connect(loop.reactor, socket.AF_INET, (HOST, closed_port()), rec)
    assert rec.calls == [], "a failure reported inside connect()"
    assert loop.spin(lambda: rec.calls)
    loop.turn(3)
    assert rec.calls == ["connect_failed"] and rec.failed == [errno.ECONNREFUSED]
    tr.close()
    assert loop.registered(tr.fd) == 0


def test_connection_made_for_a_listener(loop: Loop) -> None:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    listener.settimeout(REAL_TIMEOUT)
    rec = Rec()
    tr = connect(loop.reactor, socket.AF_INET, listener.getsockname(), rec)
    tr.write(b"queued before the connect ends")   # waits for the connection
    assert tr.connecting and tr.queued
    assert loop.spin(lambda: rec.calls)
    assert rec.calls[0] == "made" and not tr.connecting and rec.failed == []
    peer, _ = listener.accept()
    peer.settimeout(REAL_TIMEOUT)
    assert peer.recv(100) == b"queued before the connect ends"
    peer.sendall(b"pong")
    assert loop.spin(lambda: rec.data == b"pong")
    tr.close()
    peer.close()
    listener.close()


def test_a_raising_callback_reaches_internal_error_and_the_loop_goes_on(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    bad = Rec(raise_in=("data",))
    tr = Transport(loop.reactor, ours, bad)
    other_ours, other_theirs = socket.socketpair()
    other_ours.setblocking(False)
    good = Rec()
    tr2 = Transport(loop.reactor, other_ours, good)
    theirs.sendall(b"boom")
    assert loop.spin(lambda: "internal_error" in bad.calls)
    assert bad.calls == ["data", "internal_error"]
    other_theirs.sendall(b"fine")
    assert loop.spin(lambda: good.data == b"fine")
    tr.close()
    tr2.close()
    other_theirs.close()


def test_a_raising_timer_callback_reaches_internal_error(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, _theirs = pair
    rec = Rec(raise_in=("timer",))
    tr = Transport(loop.reactor, ours, rec)
    tr.arm(loop.now + 1.0)
    loop.advance(1.0)
    assert rec.calls == ["timer", "internal_error"]
    tr.close()


def test_timer_arm_only_moves_earlier(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, _theirs = pair
    rec = Rec()
    tr = Transport(loop.reactor, ours, rec)
    t0 = loop.now
    assert tr.timer_when == float("inf")
    tr.arm(t0 + 10.0)
    assert tr.timer_when == t0 + 10.0
    tr.arm(t0 + 20.0)   # later: ignored (the protocol re-arms lazily when it fires)
    assert tr.timer_when == t0 + 10.0
    tr.arm(t0 + 5.0)    # earlier: moved
    assert tr.timer_when == t0 + 5.0
    loop.advance(4.99)
    assert rec.calls == [], "fired early"
    loop.advance(0.01)
    assert rec.calls == ["timer"] and tr.timer_when == float("inf") and tr.timer is None
    loop.advance(20.0)
    assert rec.calls == ["timer"], "the replaced timer fired too"
    # Re-armed after firing: fires again; disarmed: never.
    tr.arm(loop.now + 1.0)
    loop.advance(1.0)
    assert rec.calls == ["timer", "timer"]
    tr.arm(loop.now + 1.0)
    tr.disarm()
    assert tr.timer_when == float("inf")
    loop.advance(2.0)
    assert rec.calls == ["timer", "timer"]
    # A closed transport's timer never fires.
    tr.arm(loop.now + 1.0)
    tr.close()
    loop.advance(2.0)
    assert rec.calls == ["timer", "timer"]


# ---- health probes over the transport ----------------------------------------------------------------------
class StubHealth:
    """What a probe uses of ``Health``: reactor, hcfg, probes, now, jittered, _probe_result."""

    def __init__(self, reactor: Reactor, path: str = "/health", timeout: float = 5.0,
                 expect: Any = (200, 399)) -> None:
        self.reactor = reactor
        self.hcfg = SimpleNamespace(path=path, timeout=timeout, interval=1000.0, expect=expect, rise=1, fall=1)
        self.health_of = lambda backend: self.hcfg
        self.probes: Dict[Any, _Probe] = {}
        self.results: List[Tuple[bool, str]] = []

    @property
    def now(self) -> float:
        return self.reactor.now

    def jittered(self, interval: float) -> float:
        return interval

    def _probe_result(self, probe: _Probe, ok: bool, why: str) -> None:
        self.results.append((ok, why))


class StubBackend:
    """What a probe uses of ``Backend`` (hashable by identity, as backends are)."""

    def __init__(self, port: int) -> None:
        self.name = "b1"
        self.draining = False
        self.admin_state = ""  # not in maint
        self.resolved = True
        self.family = socket.AF_INET
        self.sockaddr: Tuple[str, int] = (HOST, port)
        self.host_header = b"%s:%d" % (HOST.encode(), port)
        self.tls = None
        self.send_proxy = "off"


def stub_backend(port: int) -> StubBackend:
    return StubBackend(port)


def start_probe(loop: Loop, port: int, **cfg: Any) -> Tuple[StubHealth, _Probe]:
    health = StubHealth(loop.reactor, **cfg)
    backend = stub_backend(port)
    probe = _Probe(cast(Any, health), cast(Any, backend))
    health.probes[backend] = probe
    probe.begin()
    return health, probe


def assert_idle(probe: _Probe) -> None:
    """Back to idle: no socket, the next probe scheduled (one interval on)."""
    assert probe.state == P_IDLE and probe.sock is None and probe.tr is None and probe.events == 0
    assert probe.timer is not None and probe.timer.when == probe.started_at + 1000.0


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def accept(loop: Loop, listener: socket.socket) -> socket.socket:
    got: List[socket.socket] = []

    def try_accept() -> bool:
        try:
            got.append(listener.accept()[0])
        except BlockingIOError:
            return False
        return True

    assert loop.spin(try_accept), "the probe never connected"
    got[0].settimeout(REAL_TIMEOUT)
    return got[0]


def read_head(loop: Loop, peer: socket.socket) -> bytes:
    got = bytearray()
    assert loop.spin(lambda: drain_into(peer, got) >= 0 and b"\r\n\r\n" in got), "no probe request"
    return bytes(got)


def test_probe_refused_reports_once_from_the_loop(loop: Loop) -> None:
    health, probe = start_probe(loop, closed_port())
    assert health.results == [], "reported inside begin()"
    assert loop.spin(lambda: health.results)
    loop.turn(3)
    assert health.results == [(False, "connect: " + os.strerror(errno.ECONNREFUSED))]
    assert_idle(probe)


def test_probe_closed_while_in_flight_reports_nothing_and_closes_its_socket(loop: Loop) -> None:
    health, probe = start_probe(loop, closed_port())
    tr = probe.tr
    assert tr is not None and probe.state != P_IDLE
    probe.close()   # what Health.stop / reload do
    assert tr.closed and tr.sock.fileno() == -1 and probe.timer is None
    loop.settle()
    assert health.results == []


def test_tcp_probe_passes_on_connect_without_sending(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1], path="tcp")
    assert loop.spin(lambda: health.results)
    assert health.results == [(True, "connected")]
    assert_idle(probe)
    peer = accept(loop, listener)
    assert peer.recv(100) == b"", "a tcp probe sent bytes"
    peer.close()


def test_probe_times_out_on_a_listener_that_never_answers(loop: Loop, listener: socket.socket) -> None:
    # The kernel completes the connection (backlog); nothing ever accepts or answers.
    health, probe = start_probe(loop, listener.getsockname()[1], timeout=3.0)
    assert loop.spin(lambda: probe.tr is not None and probe.tr.queued == 0 and probe.state == P_READING)
    loop.settle()
    loop.advance(2.9)
    assert health.results == [], "failed before its timeout"
    tr = probe.tr
    loop.advance(0.1)
    assert health.results == [(False, "timed out after 3s")]
    assert tr is not None and tr.closed
    assert_idle(probe)


def test_probe_to_an_unrouted_address_ends_once(loop: Loop) -> None:
    # 192.0.2.0/24 (TEST-NET-1, RFC 5737) is not routed: the connect hangs until the probe's timeout, or
    # fails at once where there is no route; either way exactly one failure, and the socket is closed.
    health = StubHealth(loop.reactor, timeout=2.0)
    backend = stub_backend(9)
    backend.sockaddr = ("192.0.2.1", 9)
    probe = _Probe(cast(Any, health), cast(Any, backend))
    health.probes[backend] = probe
    probe.begin()
    tr = probe.tr
    loop.settle()
    loop.advance(2.0)
    loop.turn(2)
    assert len(health.results) == 1 and not health.results[0][0]
    assert tr is None or tr.closed
    assert_idle(probe)


def test_probe_bad_status_fails(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1])
    peer = accept(loop, listener)
    port = listener.getsockname()[1]
    assert read_head(loop, peer) == probe_request("/health", b"%s:%d" % (HOST.encode(), port))
    peer.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert loop.spin(lambda: health.results)
    assert health.results == [(False, "status 503")]
    assert_idle(probe)
    assert peer.recv(100) == b""   # the probe closed its connection
    peer.close()


def test_probe_garbage_fails(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1])
    peer = accept(loop, listener)
    read_head(loop, peer)
    peer.sendall(b"NOT HTTP\r\n\r\n")
    assert loop.spin(lambda: health.results)
    assert len(health.results) == 1 and health.results[0][0] is False
    assert health.results[0][1].startswith("bad response")
    assert_idle(probe)
    peer.close()


def test_probe_head_in_pieces_after_an_interim_response(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1])
    peer = accept(loop, listener)
    read_head(loop, peer)
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
    for i in range(len(answer)):
        assert health.results == [], "finished after %d of %d bytes" % (i, len(answer))
        peer.sendall(answer[i:i + 1])
        before = len(probe.heads) if probe.heads is not None else -1
        loop.spin(lambda: probe.heads is None or len(probe.heads) != before, timeout=0.5)
    assert loop.spin(lambda: health.results)
    assert health.results == [(True, "status 204")]
    assert_idle(probe)
    peer.close()


def test_probe_peer_closes_before_a_head(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1])
    peer = accept(loop, listener)
    read_head(loop, peer)
    peer.sendall(b"HTTP/1.1 200 OK\r\n")   # part of a head, then FIN
    peer.close()
    assert loop.spin(lambda: health.results)
    loop.turn(3)
    assert len(health.results) == 1 and health.results[0][0] is False
    assert health.results[0][1] in ("closed before a response head", "reset before a response head")
    assert_idle(probe)


def test_probe_head_over_the_limit_fails(loop: Loop, listener: socket.socket) -> None:
    health, probe = start_probe(loop, listener.getsockname()[1])
    peer = accept(loop, listener)
    read_head(loop, peer)
    peer.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (MAX_PROBE_HEAD + 10) + b"\r\n\r\n")
    assert loop.spin(lambda: health.results)
    assert len(health.results) == 1 and health.results[0][0] is False
    assert_idle(probe)
    peer.close()


def test_a_bug_in_a_probe_callback_ends_the_probe_once(loop: Loop, listener: socket.socket) -> None:
    # expect=None makes reading the status raise (a stand-in for any bug on the probe's path).
    health, probe = start_probe(loop, listener.getsockname()[1], expect=None)
    peer = accept(loop, listener)
    read_head(loop, peer)
    tr = probe.tr
    peer.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert loop.spin(lambda: health.results)
    loop.turn(3)
    assert health.results == [(False, "internal error")]
    assert tr is not None and tr.closed
    assert_idle(probe)
    peer.close()


# ---- the admin endpoint's connections ----------------------------------------------------------------------
@pytest.fixture
def admin(loop: Loop) -> Iterator[AdminServer]:
    server = AdminServer(loop.reactor, [Address(HOST, 0)], lambda deliver: deliver(None))
    server.start()
    yield server
    server.stop()


def admin_client(loop: Loop, server: AdminServer, rcvbuf: int = 0) -> Tuple[socket.socket, Any]:
    """A client connected to ``server`` and the server's connection object for it."""
    c = socket.socket()
    if rcvbuf:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    c.settimeout(REAL_TIMEOUT)
    c.connect(server.listeners[0][0].getsockname())
    assert loop.spin(lambda: server.conns)
    return c, next(iter(server.conns))


def test_admin_big_response_to_a_slow_reader_then_linger(loop: Loop, admin: AdminServer) -> None:
    c, conn = admin_client(loop, admin, rcvbuf=4096)
    conn.tr.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = b"y" * (8 * HIGH_WATER)
    conn.respond(body)   # what AdminServer.handle does with a rendered answer
    assert conn.tr.queued, "the whole answer fit in the socket buffers"
    t0 = loop.now
    # The client reads a little now and then: each time it takes bytes the send timeout restarts.
    got = bytearray()
    for _ in range(3):
        loop.advance(ADMIN_SEND_TIMEOUT * 0.8)
        assert admin.conns, "closed although the client is reading"
        assert drain_into(c, got, 65536) > 0
        assert loop.spin(lambda: conn.tr.last_write == loop.now), "the transport did not write on"
    assert loop.now - t0 > ADMIN_SEND_TIMEOUT
    end = time.monotonic() + REAL_TIMEOUT
    while len(got) < len(body):
        assert time.monotonic() < end
        drain_into(c, got)
        loop.turn()
    assert bytes(got) == body
    # All sent: our FIN comes, and what the client sends now is read and dropped up to the bound.
    assert c.recv(10) == b""
    assert admin.conns and conn.tr.events == EVENT_READ
    c.sendall(b"z" * 1000)
    loop.settle()
    assert admin.conns and conn.discarded == 1000
    c.sendall(b"z" * ADMIN_LINGER_MAX_BYTES)
    assert loop.spin(lambda: not admin.conns)
    assert conn.tr.closed
    c.close()


def test_admin_send_timeout_counts_from_the_last_progress(loop: Loop, admin: AdminServer) -> None:
    c, conn = admin_client(loop, admin, rcvbuf=4096)
    conn.tr.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.respond(b"y" * (4 * HIGH_WATER))
    assert conn.tr.queued
    loop.advance(ADMIN_SEND_TIMEOUT - 0.01)
    assert admin.conns
    loop.advance(0.01)
    assert not admin.conns and conn.tr.closed
    c.close()


def test_admin_client_gone_before_the_answer(loop: Loop, admin: AdminServer) -> None:
    c, conn = admin_client(loop, admin)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()   # a reset
    loop.settle()
    conn.respond(b"x" * 100000)   # the snapshot arrives late: at most one failed send, then closed
    assert loop.spin(lambda: not admin.conns)
    assert conn.tr.closed


# ---- the control channel -------------------------------------------------------------------------------------
def test_channel_send_to_a_closed_peer_closes_once_from_the_loop(
        loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    closes: List[int] = []
    ch = Channel(loop.reactor, ours, lambda msg: None, lambda: closes.append(1))
    theirs.close()
    assert ch.send({"op": "snapshot"}) is True    # corked: sent at the end of the turn
    loop.reactor.uncork()
    assert ch.send({"op": "snapshot"}) is False   # broken: the close follows from the loop
    assert closes == []
    loop.turn()
    assert closes == [1] and ch.closed
    ch.close()
    assert ch.send({"op": "snapshot"}) is False
    loop.turn(2)
    assert closes == [1]


def test_channel_frames_in_pieces_and_eof(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    got: List[Dict[str, Any]] = []
    closes: List[int] = []
    Channel(loop.reactor, ours, got.append, lambda: closes.append(1))
    data = encode_frame({"id": 1}) + encode_frame({"id": 2, "x": "y" * 1000})
    for i in range(0, len(data), 7):
        theirs.sendall(data[i:i + 7])
        loop.turn()
    assert loop.spin(lambda: len(got) == 2)
    assert got == [{"id": 1}, {"id": 2, "x": "y" * 1000}]
    theirs.sendall(encode_frame({"id": 3})[:3])   # then the peer closes mid-message
    theirs.close()
    assert loop.spin(lambda: closes)
    loop.turn(2)
    assert closes == [1] and len(got) == 2


def test_channel_big_message_with_backpressure(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ch = Channel(loop.reactor, ours, lambda msg: None)
    big = {"blob": "b" * (3 * HIGH_WATER)}
    assert ch.send(big) and ch.tr.queued
    reader_got: List[Dict[str, Any]] = []
    other = Channel(loop.reactor, theirs, reader_got.append)
    assert loop.spin(lambda: reader_got)
    assert reader_got == [big] and ch.tr.queued == 0
    ch.close()
    other.close()


def test_channel_bug_in_on_message_closes_it_once(loop: Loop, pair: Tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    closes: List[int] = []

    def on_message(msg: Dict[str, Any]) -> None:
        raise RuntimeError("bug")

    ch = Channel(loop.reactor, ours, on_message, lambda: closes.append(1))
    theirs.sendall(encode_frame({"id": 1}))
    assert loop.spin(lambda: closes)
    assert closes == [1] and ch.closed and ch.tr.closed
    assert theirs.recv(10) == b""


def test_modify_with_the_same_mask_only_swaps_the_callback() -> None:
    """raw_reads() (and any modify that keeps the mask) changes what the loop calls, not the kernel's
    registration: no epoll_ctl for it."""
    import select
    reactor = Reactor()
    sel = reactor.selector
    if not hasattr(sel, "_epoll"):
        pytest.skip("no epoll here")
    a, b = socket.socketpair()
    calls: List[Tuple[int, int]] = []

    class Counting:
        def __init__(self, ep: Any) -> None:
            self.ep = ep

        def modify(self, fd: int, mask: int) -> None:
            calls.append((fd, mask))
            self.ep.modify(fd, mask)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ep, name)

    real = sel._epoll
    sel._epoll = Counting(real)
    try:
        got: List[str] = []
        reactor.register(a.fileno(), EVENT_READ, lambda mask: got.append("first"))
        reactor.modify(a.fileno(), EVENT_READ, lambda mask: got.append("second"))
        assert calls == []
        b.send(b"x")
        for fd, _ev in real.poll(1.0):
            sel.keys[fd][0](EVENT_READ)
        assert got == ["second"]
        reactor.modify(a.fileno(), EVENT_READ | EVENT_WRITE, lambda mask: None)
        assert calls == [(a.fileno(), select.EPOLLIN | select.EPOLLOUT)]
    finally:
        sel._epoll = real
        reactor.unregister(a.fileno())
        a.close()
        b.close()
        reactor.close()
