"""Unit tests for balrs.health: probes, rise/fall, passive ejection, slow start, reload.

The balancer runs on a fake clock (``FakeClock``) that only moves when a test says so; probes talk to
real sockets on 127.0.0.1 (``Responder``, a tiny threaded server whose answer the test sets), and the
loop is turned by hand: ``io()`` dispatches socket events without moving the clock, ``advance()``
moves the clock and fires due timers. So a probe timeout fires exactly when the fake clock passes it,
however slow the machine is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from support import Blackhole

from balrs.config import Address, BackendConfig, Config, HealthConfig
from balrs.health import (
    MAX_EJECT_COOLDOWN,
    MAX_PROBE_HEAD,
    PROBE_JITTER,
    SLOW_START_STEP,
    Health,
    _Probe,
    probe_request,
    slow_start_weight,
)
from balrs.pool import Backend
from balrs.reactor import Reactor
from balrs.server import Balancer

HOST = "127.0.0.1"


# ---- a fake clock and a hand-turned loop -------------------------------------------------------------------
class FakeClock:
    __slots__ = ("now",)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """A Balancer on a fake clock, turned by hand."""

    def __init__(self, config: Config, seed: int = 1) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(self.clock)
        self.bal = Balancer(config, reactor=self.reactor)
        self.health: Health = self.bal.health
        self.health.rng = random.Random(seed)
        self.refreshes = 0
        self.pumps = 0
        pool = self.bal.pool
        real_refresh = pool.refresh

        def counting_refresh() -> None:
            self.refreshes += 1
            real_refresh()

        pool.refresh = counting_refresh  # type: ignore[method-assign]
        real_wake = pool.wake

        def counting_wake() -> None:
            self.pumps += 1
            real_wake()

        pool.wake = counting_wake  # type: ignore[method-assign]

    @property
    def now(self) -> float:
        return self.clock.now

    def b(self, name: str) -> Backend:
        b = self.bal.pool.by_name(name)
        assert b is not None
        return b

    def probe(self, name: str) -> _Probe:
        return self.health.probes[self.b(name)]

    def eligible(self) -> list[str]:
        return [b.name for b in self.bal.pool.strategy.backends]

    def _soon(self) -> None:
        soon = self.reactor._soon
        while soon:
            batch = soon[:]
            del soon[:]
            for cb in batch:
                cb()

    def turn(self, select_timeout: float = 0.0) -> int:
        """One loop turn at the current fake time: ready sockets, deferred calls, due timers."""
        events = self.reactor.selector.select(select_timeout)
        for key, mask in events:
            key.data(mask)
        self._soon()
        self.reactor.now = self.clock.now
        self.reactor.wheel.run(self.clock.now)
        self.reactor.uncork()  # the end of the turn, as Reactor.run ends it
        return len(events)

    def io(self, until: Callable[[], Any], real_timeout: float = 5.0) -> None:
        """Dispatch socket events (fake time stands still) until ``until()`` is true."""
        end = time.monotonic() + real_timeout
        while not until():
            assert time.monotonic() < end, "condition not reached within %gs of real time" % real_timeout
            self.turn(0.01)

    def settle(self, real: float = 0.15) -> None:
        """Dispatch whatever socket events come within ``real`` seconds of real time."""
        end = time.monotonic() + real
        while time.monotonic() < end:
            self.turn(0.01)

    def advance(self, dt: float) -> None:
        """Move the fake clock by ``dt``, stopping wherever the wheel wants to run, so timers fire in
        order at their own times (as in the reactor's loop)."""
        target = self.clock.now + dt
        wheel = self.reactor.wheel
        for _ in range(100000):
            t = wheel.next_timeout(self.clock.now)
            if t is None or self.clock.now + t > target:
                break
            self.clock.now += t
            self.turn()
            self.quiesce()
        else:
            raise AssertionError("the wheel keeps asking to be woken")
        self.clock.now = target
        self.turn()
        self.quiesce()

    def quiesce(self, quiet: float = 0.15, real_timeout: float = 3.0) -> None:
        """Let probes in flight finish their real I/O before fake time moves on: until every probe is
        idle or parked at a hanging Responder (which will never answer), or no socket event came for
        ``quiet`` seconds (a backend that hangs otherwise, e.g. a black hole)."""
        end = time.monotonic() + real_timeout
        while time.monotonic() < end:
            if all(p.state == 0 or _parked(p) for p in self.health.probes.values()):
                return
            if not self.turn(quiet):
                return

    def run_probe(self, name: str, real_timeout: float = 5.0) -> None:
        """Jump to the backend's next probe, then let it finish on real sockets (fake time frozen)."""
        probe = self.probe(name)
        assert probe.timer is not None and probe.state == 0, "probe not idle"
        before = self.b(name).last_check
        self.advance(probe.timer.when - self.now)
        if probe.state != 0 or self.b(name).last_check == before:
            self.io(lambda: probe.state == 0 and probe.timer is not None, real_timeout)

    def close(self) -> None:
        self.health.stop()
        for sock, _addr in self.bal.listeners:  # bound by Balancer.reload (port 0: any free port)
            sock.close()
        self.reactor.close()


def make_config(
    addrs: list[tuple[str, str, int]],
    health: Optional[HealthConfig] = None,
    **keys: Any,
) -> Config:
    backends = []
    for name, address, weight in addrs:
        host, port = address.rsplit(":", 1)
        backends.append(BackendConfig(name, Address(host, int(port)), weight))
    return Config(path="test.ini", listen=(Address(HOST, 0),), backends=tuple(backends), health=health,
                  **keys)


@pytest.fixture
def rigs() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(addrs: list[tuple[str, str, int]], health: Optional[HealthConfig] = None, start: bool = True,
             **keys: Any) -> Rig:
        rig = Rig(make_config(addrs, health, **keys))
        made.append(rig)
        if start:
            rig.health.start()
        return rig

    yield make
    for rig in made:
        rig.close()


# ---- a backend the test controls ---------------------------------------------------------------------------
_responders: dict[str, Responder] = {}  # by address, while running


def _parked(probe: _Probe) -> bool:
    """Is this probe's connection parked at a hanging Responder: its request head read in full, no
    answer ever coming?"""
    try:
        name = probe.sock.getsockname() if probe.sock is not None else None
    except OSError:
        return False
    return name is not None and any(name in r.parked for r in list(_responders.values()))


class Responder:
    """A threaded server on 127.0.0.1. ``mode``: an int status, ``"hang"`` (read, never answer),
    ``"close"`` (close without a byte), ``"garbage"``, ``"interim"`` (100 Continue, then 200),
    ``"big"`` (a head over MAX_PROBE_HEAD). Records every request head and every accepted connection."""

    def __init__(self, mode: Any = 200) -> None:
        self.mode = mode
        self.lock = threading.Lock()
        self.heads: list[bytes] = []
        self.conns = 0
        self.bytes_seen: list[int] = []  # bytes received per finished connection
        self.parked: set[tuple[str, int]] = set()  # peers of the "hang" connections with their head read
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.address = "%s:%d" % (HOST, self.port)
        _responders[self.address] = self
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.conns += 1
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.1)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        data = b""
        mode = self.mode
        try:
            end = time.monotonic() + 10
            while b"\r\n\r\n" not in data and time.monotonic() < end and not self._stop.is_set():
                try:
                    chunk = sock.recv(4096)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                data += chunk
            if b"\r\n\r\n" in data:
                with self.lock:
                    self.heads.append(data)
                mode = self.mode
                if mode == "hang":
                    with self.lock:
                        self.parked.add(peer)
                    try:
                        while not self._stop.is_set():
                            try:
                                if not sock.recv(4096):
                                    break
                            except socket.timeout:
                                continue
                    finally:
                        with self.lock:
                            self.parked.discard(peer)
                elif mode == "close":
                    pass
                elif mode == "garbage":
                    sock.sendall(b"NOT HTTP\r\n\r\n")
                elif mode == "interim":
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif mode == "big":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (MAX_PROBE_HEAD + 10) + b"\r\n\r\n")
                else:
                    body = b"status %d\n" % mode
                    sock.sendall(b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (mode, len(body), body))
        except OSError:
            pass
        finally:
            with self.lock:
                self.bytes_seen.append(len(data))
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        _responders.pop(self.address, None)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept at once (close alone does not)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(2)


@pytest.fixture
def responders() -> Iterator[Callable[..., Responder]]:
    made: list[Responder] = []

    def make(mode: Any = 200) -> Responder:
        r = Responder(mode)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


Rigs = Callable[..., Rig]
Responders = Callable[..., Responder]


def dead_address() -> str:
    """A port nothing listens on: connects are refused."""
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return "%s:%d" % (HOST, port)


def hc(**over: Any) -> HealthConfig:
    base = dict(path="/health", interval=1.0, timeout=0.5, rise=2, fall=3, expect=(200, 399))
    base.update(over)
    return HealthConfig(**base)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- pure helpers ------------------------------------------------------------------------------------------
def test_probe_request_is_a_plain_get() -> None:
    assert probe_request("/hc/ping?x=1", b"10.0.0.1:8080") == (
        b"GET /hc/ping?x=1 HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nConnection: close\r\n"
        b"User-Agent: balrs-health\r\n\r\n"
    )


@pytest.mark.parametrize(
    "weight, elapsed, slow_start, expected",
    [
        (20, 0.0, 10.0, 2),       # starts at a tenth
        (20, 5.0, 10.0, 11),      # halfway: 2 + 18 * 0.5
        (20, 9.99, 10.0, 19.9375),  # 19.982 rounded down to sixteenths
        (20, 10.0, 10.0, 20),     # done
        (20, 60.0, 10.0, 20),
        (100, 2.5, 10.0, 32.5),   # 10 + 90 * 0.25
        (5, 0.0, 10.0, 0.5),      # fractional: light backends ramp too
        (5, 5.0, 10.0, 2.75),
        (1, 0.0, 10.0, 0.0625),   # weight 1 starts at a sixteenth (0.1 rounded down)
        (1, 5.0, 10.0, 0.5),      # 0.1 + 0.9 * 0.5 = 0.55 -> 0.5
        (20, -1.0, 10.0, 2),      # clock before up_since: the floor
        (20, 0.0, 0.0, 20),       # slow start off
    ],
)
def test_slow_start_weight(weight: int, elapsed: float, slow_start: float, expected: float) -> None:
    assert slow_start_weight(weight, elapsed, slow_start) == expected


def test_jitter_stays_within_bounds_and_spreads() -> None:
    rig = Rig(make_config([("b1", "127.0.0.1:1", 1)]))
    try:
        draws = [rig.health.jittered(2.0) for _ in range(2000)]
    finally:
        rig.close()
    assert all(2.0 * (1 - PROBE_JITTER) <= d <= 2.0 * (1 + PROBE_JITTER) for d in draws)
    assert max(draws) - min(draws) > 2.0 * PROBE_JITTER  # really spread, not a constant
    assert len({round(d, 6) for d in draws}) > 1000


# ---- active probes: rise and fall --------------------------------------------------------------------------
def test_first_probes_spread_over_the_first_interval(rigs: Rigs) -> None:
    addrs = [("b%d" % i, "127.0.0.1:%d" % (2000 + i), 1) for i in range(20)]
    rig = rigs(addrs, hc(interval=2.0))
    whens = [p.timer.when - rig.now for p in rig.health.probes.values() if p.timer is not None]
    assert len(whens) == 20
    assert all(0.0 <= w <= 2.0 for w in whens)
    assert max(whens) - min(whens) > 0.5


def test_fall_marks_down_after_fall_failures(
    rigs: Rigs, responders: Responders, caplog: pytest.LogCaptureFixture
) -> None:
    r1, r2 = responders(200), responders(500)
    rig = rigs([("b1", r1.address, 1), ("b2", r2.address, 1)], hc(fall=3))
    b2 = rig.b("b2")
    assert b2.up and rig.eligible() == ["b1", "b2"]
    caplog.set_level(logging.INFO, logger="balrs")
    for i in (1, 2):
        rig.run_probe("b2")
        assert b2.up, "down after %d failure(s) with fall = 3" % i
        assert b2.health_failures == i and not b2.last_check_ok and b2.last_check == rig.now
    rig.run_probe("b2")
    assert not b2.up
    assert b2.transitions == 1
    assert rig.eligible() == ["b1"]
    assert "backend b2 is DOWN: 3 consecutive probe failures (last: status 500)" in caplog.text
    # The probe went out as a GET for the configured path with our Host.
    assert r2.heads and all(h == probe_request("/health", b2.host_header) for h in r2.heads)
    # More failures change nothing.
    rig.run_probe("b2")
    assert not b2.up and b2.transitions == 1 and b2.health_failures == 4


def test_rise_brings_back_after_rise_passes(
    rigs: Rigs, responders: Responders, caplog: pytest.LogCaptureFixture
) -> None:
    r1 = responders(500)
    rig = rigs([("b1", r1.address, 1), ("b2", dead_address(), 1)], hc(fall=2, rise=3))
    b1 = rig.b("b1")
    rig.run_probe("b1")
    rig.run_probe("b1")
    assert not b1.up
    r1.mode = 200
    caplog.set_level(logging.INFO, logger="balrs")
    pumps = rig.pumps
    for i in (1, 2):
        rig.run_probe("b1")
        assert not b1.up, "up after %d pass(es) with rise = 3" % i
        assert b1.health_successes == i and b1.health_failures == 0 and b1.last_check_ok
    rig.run_probe("b1")
    assert b1.up and b1.transitions == 2
    assert b1.up_since == rig.now
    assert "b1" in rig.eligible()
    assert rig.pumps == pumps + 1
    assert "backend b1 is UP again: 3 consecutive probe passes" in caplog.text


def test_a_pass_resets_the_failure_count(rigs: Rigs, responders: Responders) -> None:
    r = responders(500)
    rig = rigs([("b1", r.address, 1)], hc(fall=2))
    b1 = rig.b("b1")
    rig.run_probe("b1")
    r.mode = 200
    rig.run_probe("b1")
    r.mode = 500
    rig.run_probe("b1")
    assert b1.up and b1.health_failures == 1


@pytest.mark.parametrize(
    "expect, status, passes",
    [
        ((200, 399), 200, True),
        ((200, 399), 302, True),
        ((200, 399), 399, True),
        ((200, 399), 400, False),
        ((200, 399), 503, False),
        ((200, 200), 204, False),
        ((204, 204), 204, True),
        ((500, 599), 503, True),
        ((200, 299), 199, False),
    ],
)
def test_expect_range(
    rigs: Rigs, responders: Responders,
    expect: tuple[int, int], status: int, passes: bool,
) -> None:
    r = responders(status)
    rig = rigs([("b1", r.address, 1)], hc(expect=expect, fall=1, rise=1))
    rig.run_probe("b1")
    assert rig.b("b1").last_check_ok is passes
    assert rig.b("b1").up is passes


@pytest.mark.parametrize("mode", ["close", "garbage", "big"])
def test_broken_answers_fail(rigs: Rigs, responders: Responders, mode: str) -> None:
    r = responders(mode)
    rig = rigs([("b1", r.address, 1)], hc(fall=1))
    rig.run_probe("b1")
    assert not rig.b("b1").last_check_ok and not rig.b("b1").up


def test_interim_response_is_skipped(rigs: Rigs, responders: Responders) -> None:
    r = responders("interim")
    rig = rigs([("b1", r.address, 1)], hc(fall=1, expect=(200, 200)))
    rig.run_probe("b1")
    assert rig.b("b1").last_check_ok and rig.b("b1").up


def test_refused_connect_fails(rigs: Rigs, caplog: pytest.LogCaptureFixture) -> None:
    rig = rigs([("b1", dead_address(), 1)], hc(fall=1))
    caplog.set_level(logging.INFO, logger="balrs")
    rig.run_probe("b1")
    assert not rig.b("b1").up
    assert ("backend b1 is DOWN: 1 consecutive probe failures (last: connect: Connection refused)"
            in caplog.text)


def test_timeout_fails_the_probe_and_closes_its_socket(
    rigs: Rigs, responders: Responders, caplog: pytest.LogCaptureFixture
) -> None:
    r = responders("hang")
    rig = rigs([("b1", r.address, 1)], hc(fall=1, timeout=0.5, interval=2.0))
    b1 = rig.b("b1")
    probe = rig.probe("b1")
    assert probe.timer is not None
    rig.advance(probe.timer.when - rig.now)
    started = rig.now
    rig.io(lambda: r.heads)  # the request reached the backend, which sits on it
    rig.settle(0.1)
    assert probe.state != 0 and b1.up and b1.last_check == 0.0
    caplog.set_level(logging.INFO, logger="balrs")
    rig.advance(0.49)
    assert probe.state != 0 and b1.up, "failed before its timeout"
    rig.advance(0.02)
    assert probe.state == 0 and probe.sock is None
    assert not b1.up and not b1.last_check_ok
    assert "(last: timed out after 0.5s)" in caplog.text
    # The backend sees the connection closed.
    deadline = time.monotonic() + 3
    while not r.bytes_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.bytes_seen
    # The next probe: an interval after this one started.
    assert probe.timer is not None
    assert started + 2.0 * (1 - PROBE_JITTER) <= probe.timer.when <= started + 2.0 * (1 + PROBE_JITTER)


def test_one_probe_in_flight_missed_turns_are_skipped(
    rigs: Rigs, responders: Responders
) -> None:
    # timeout (5s) much longer than interval (1s): a hanging backend must see one probe at a time.
    r = responders("hang")
    rig = rigs([("b1", r.address, 1)], hc(fall=5, timeout=5.0, interval=1.0))
    b1 = rig.b("b1")
    probe = rig.probe("b1")
    assert probe.timer is not None
    rig.advance(probe.timer.when - rig.now)
    rig.io(lambda: r.conns == 1)
    for _ in range(9):
        rig.advance(0.5)
        rig.settle(0.02)
    assert probe.state != 0
    assert r.conns == 1, "a second probe started while one was in flight"
    assert b1.health_failures == 0
    rig.advance(0.6)  # past the 5s deadline
    assert probe.state == 0
    assert b1.health_failures == 1, "missed turns must not be counted (no backlog)"
    assert probe.timer is not None
    # The skipped turns are gone: the next probe is one interval from now, not overdue.
    assert rig.now + 1.0 * (1 - PROBE_JITTER) <= probe.timer.when <= rig.now + 1.0 * (1 + PROBE_JITTER)


def test_probe_cadence_follows_the_interval(rigs: Rigs, responders: Responders) -> None:
    r = responders(200)
    rig = rigs([("b1", r.address, 1)], hc(interval=2.0))
    starts = []
    for _ in range(8):
        probe = rig.probe("b1")
        assert probe.timer is not None
        starts.append(probe.timer.when)
        rig.run_probe("b1")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(2.0 * (1 - PROBE_JITTER) - 1e-6 <= g <= 2.0 * (1 + PROBE_JITTER) + 1e-6 for g in gaps), gaps
    assert len(r.heads) == 8


# ---- TCP probes --------------------------------------------------------------------------------------------
def test_tcp_probe_connects_and_sends_nothing(rigs: Rigs, responders: Responders) -> None:
    r = responders(200)
    rig = rigs([("b1", r.address, 1), ("b2", dead_address(), 1)], hc(path="tcp", fall=1))
    rig.run_probe("b1")
    rig.run_probe("b2")
    assert rig.b("b1").up and rig.b("b1").last_check_ok
    assert not rig.b("b2").up
    deadline = time.monotonic() + 3
    while not r.bytes_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.conns >= 1 and r.bytes_seen == [0] and not r.heads


def test_tcp_probe_connect_timeout() -> None:
    hole = Blackhole("hole")
    try:
        rig = Rig(make_config([("b1", hole.address, 1)], hc(path="tcp", fall=1, timeout=0.3)))
        try:
            rig.health.start()
            probe = rig.probe("b1")
            assert probe.timer is not None
            rig.advance(probe.timer.when - rig.now)
            rig.settle(0.1)
            if probe.state == 0:
                pytest.skip("this kernel answered the connect to a full backlog")
            rig.advance(0.31)
            assert probe.state == 0 and probe.sock is None
            assert not rig.b("b1").up
        finally:
            rig.close()
    finally:
        hole.stop()


def test_no_socket_leaks(rigs: Rigs, responders: Responders) -> None:
    rs = [responders(m) for m in (200, 500, "close", "garbage", "hang")]
    addrs = [("b%d" % i, r.address, 1) for i, r in enumerate(rs)] + [("dead", dead_address(), 1)]
    rig = rigs(addrs, hc(timeout=0.3, interval=1.0))
    fds = open_fds()
    for _ in range(3):
        rig.advance(1.2)
        rig.settle(0.1)
    rig.advance(1.0)
    rig.settle(0.05)
    # At most one probe socket per backend is open at any time (the hanging one, maybe).
    assert open_fds() <= fds + len(addrs)
    rig.health.stop()
    deadline = time.monotonic() + 3  # (the responders run in this process and close their ends too)
    while open_fds() > fds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() <= fds
    assert len(rig.reactor.wheel) == 0
    assert not rig.reactor.selector.get_map()


# ---- stop and reload ---------------------------------------------------------------------------------------
def test_stop_cancels_every_timer_and_closes_probes(
    rigs: Rigs, responders: Responders
) -> None:
    r = responders("hang")
    rig = rigs([("b1", r.address, 1), ("b2", dead_address(), 1)], hc(), eject_after=1, slow_start=10.0)
    probe = rig.probe("b1")
    assert probe.timer is not None
    rig.advance(probe.timer.when - rig.now)
    rig.io(lambda: r.heads)
    assert probe.sock is not None
    rig.health.failure(rig.b("b2"), "connect")  # an ejection timer
    assert rig.b("b2").ejected_until
    rig.health.stop()
    assert probe.sock is None and probe.timer is None
    assert len(rig.reactor.wheel) == 0
    assert not rig.reactor.selector.get_map()
    # After stop nothing schedules again.
    rig.health.failure(rig.b("b1"), "connect")
    assert len(rig.reactor.wheel) == 0


def test_reload_probes_new_backends_and_stops_removed_ones(
    rigs: Rigs, responders: Responders
) -> None:
    r1, r2, r3 = responders("hang"), responders(200), responders(200)
    rig = rigs([("b1", r1.address, 1), ("b2", r2.address, 1)], hc(), slow_start=10.0)
    b1, b2 = rig.b("b1"), rig.b("b2")
    probe1 = rig.probe("b1")
    assert probe1.timer is not None
    rig.advance(probe1.timer.when - rig.now)
    rig.io(lambda: r1.heads)
    assert probe1.sock is not None
    # The reload (Balancer.reload -> Pool.reload -> Health.reload): b1 removed, b3 added, b2 kept.
    new = make_config([("b2", r2.address, 1), ("b3", r3.address, 20)], hc(), slow_start=10.0)
    rig.bal.reload(new)
    b3 = rig.b("b3")
    assert rig.b("b2") is b2 and b1.draining
    assert b1 not in rig.health.probes and probe1.sock is None and probe1.timer is None
    assert probe1.events == 0
    assert set(rig.health.probes) == {b2, b3}
    # A new backend ramps up from its creation; a kept one keeps its full weight.
    assert b3.eff_weight == 2 and b3 in rig.health.ramping
    assert b2.eff_weight == 1 and b2 not in rig.health.ramping
    rig.run_probe("b3")
    assert r3.heads and b3.up
    rig.advance(10.0)
    assert b3.eff_weight == 20 and not rig.health.ramping
    # The removed backend is never probed again.
    conns = r1.conns
    rig.advance(5.0)
    rig.settle(0.1)
    assert r1.conns == conns


def test_reload_reweights_a_ramping_backend(rigs: Rigs) -> None:
    rig = rigs([("b1", "127.0.0.1:1", 10)], slow_start=10.0)
    rig.bal.reload(make_config([("b1", "127.0.0.1:1", 10), ("b2", "127.0.0.1:2", 50)], slow_start=10.0))
    b2 = rig.b("b2")
    assert b2.eff_weight == 5
    rig.advance(5.0)
    assert 27.0 <= b2.eff_weight <= 27.5  # 5 + 45 / 2 = 27.5 (a step may land an ulp early)
    # Re-weighted in the middle of its ramp: the pool resets eff_weight, the ramp's share stays.
    rig.bal.reload(make_config([("b1", "127.0.0.1:1", 10), ("b2", "127.0.0.1:2", 100)], slow_start=10.0))
    assert b2.weight == 100 and b2.eff_weight == 55
    rig.advance(5.1)
    assert b2.eff_weight == 100 and not rig.health.ramping
    # Slow start turned off by a reload: every weight in full at once.
    rig.bal.reload(make_config([("b1", "127.0.0.1:1", 10), ("b2", "127.0.0.1:2", 100),
                                ("b3", "127.0.0.1:3", 30)]))
    assert rig.b("b3").eff_weight == 30 and not rig.health.ramping


def test_reload_applies_a_changed_health_section(
    rigs: Rigs, responders: Responders
) -> None:
    r = responders(500)
    rig = rigs([("b1", r.address, 1), ("b2", r.address, 1)], hc(fall=1, interval=1.0))
    rig.run_probe("b1")
    assert not rig.b("b1").up
    # A new interval: every probe rescheduled within it; state is kept.
    rig.bal.config = dataclasses.replace(rig.bal.config, health=hc(fall=1, interval=30.0))
    rig.health.reload()
    assert not rig.b("b1").up
    for p in rig.health.probes.values():
        assert p.timer is not None and p.timer.when <= rig.now + 30.0
    rig.run_probe("b2")
    p2 = rig.probe("b2")
    assert p2.timer is not None and p2.timer.when - rig.now >= 30.0 * (1 - PROBE_JITTER)
    # [health] removed: no probes, and nothing stays down for a check that no longer runs.
    rig.bal.config = dataclasses.replace(rig.bal.config, health=None)
    rig.health.reload()
    assert not rig.health.probes
    assert rig.b("b1").up and rig.b("b2").up
    assert rig.eligible() == ["b1", "b2"]
    rig.settle(0.05)
    assert len(rig.reactor.wheel) == 0


def test_reload_reweights_at_once_without_slow_start(rigs: Rigs) -> None:
    rig = rigs([("b1", "127.0.0.1:1", 5), ("b2", "127.0.0.1:2", 5)])
    rig.bal.reload(make_config([("b1", "127.0.0.1:1", 9), ("b2", "127.0.0.1:2", 5)]))
    assert rig.b("b1").eff_weight == 9


def test_no_probes_without_health_section(rigs: Rigs) -> None:
    rig = rigs([("b1", "127.0.0.1:1", 1)])
    assert not rig.health.probes
    assert len(rig.reactor.wheel) == 0


# ---- passive outlier detection -----------------------------------------------------------------------------
def four(rigs: Rigs, **keys: Any) -> Rig:
    return rigs([("b%d" % i, "127.0.0.1:%d" % (3000 + i), 1) for i in (1, 2, 3, 4)], **keys)


def test_ejection_after_n_consecutive_failures(rigs: Rigs, caplog: pytest.LogCaptureFixture) -> None:
    rig = four(rigs, eject_after=3, eject_cooldown=10.0)
    b1 = rig.b("b1")
    caplog.set_level(logging.INFO, logger="balrs")
    rig.health.failure(b1, "connect")
    rig.health.failure(b1, "reset")
    assert not b1.ejected_until and b1.consecutive_errors == 2
    rig.health.failure(b1, "timeout")
    assert b1.ejected_until == rig.now + 10.0
    assert b1.ejections == 1
    assert rig.eligible() == ["b2", "b3", "b4"]
    assert b1.state == "down"
    assert "backend b1 ejected for 10s: 3 consecutive failures (last: timeout)" in caplog.text
    # It returns when the cooldown is over, not before.
    rig.advance(9.99)
    assert b1.ejected_until and "b1" not in rig.eligible()
    pumps = rig.pumps
    rig.advance(0.02)
    assert b1.ejected_until == 0.0
    assert b1.up_since == pytest.approx(rig.now, abs=0.02)
    assert rig.eligible() == ["b1", "b2", "b3", "b4"]
    assert rig.pumps == pumps + 1
    assert "backend b1 is back from ejection" in caplog.text


def test_success_resets_the_failure_count(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=3)
    b1 = rig.b("b1")
    rig.health.failure(b1, "connect")
    rig.health.failure(b1, "connect")
    rig.health.success(b1)
    rig.health.failure(b1, "connect")
    rig.health.failure(b1, "connect")
    assert not b1.ejected_until and b1.consecutive_errors == 2


def test_cooldown_doubles_and_is_capped_and_resets_after_a_success(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=2, eject_cooldown=10.0)
    b1 = rig.b("b1")
    seen = []
    for _ in range(8):
        while not b1.ejected_until:
            rig.health.failure(b1, "connect")
        seen.append(round(b1.ejected_until - rig.now, 6))
        rig.advance(b1.ejected_until - rig.now + 0.01)
        assert not b1.ejected_until
    assert seen == [10.0, 20.0, 40.0, 80.0, 160.0, MAX_EJECT_COOLDOWN, MAX_EJECT_COOLDOWN, MAX_EJECT_COOLDOWN]
    # Back on probation: one more failure ejects it again (for the capped time) ...
    rig.health.failure(b1, "connect")
    assert b1.ejected_until == rig.now + MAX_EJECT_COOLDOWN
    rig.advance(MAX_EJECT_COOLDOWN + 0.01)
    # ... while a request served after its return resets the count (the proxy calls success() since
    # consecutive_errors > 0 after a return).
    assert b1.consecutive_errors > 0
    rig.health.success(b1)
    assert b1.ejections == 0 and b1.consecutive_errors == 0
    rig.health.failure(b1, "connect")
    assert not b1.ejected_until
    rig.health.failure(b1, "connect")
    assert b1.ejected_until == rig.now + 10.0


def test_success_during_an_ejection_keeps_the_ejection_count(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=1, eject_cooldown=10.0)
    b1 = rig.b("b1")
    rig.health.failure(b1, "connect")
    assert b1.ejections == 1
    rig.health.success(b1)  # a request that was in flight when it was ejected
    assert b1.ejections == 1 and b1.ejected_until


@pytest.mark.parametrize("n, max_out", [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3)])
def test_never_eject_below_half(rigs: Rigs, n: int, max_out: int,
                                caplog: pytest.LogCaptureFixture) -> None:
    rig = rigs([("b%d" % i, "127.0.0.1:%d" % (3000 + i), 1) for i in range(n)], eject_after=2)
    caplog.set_level(logging.INFO, logger="balrs")
    for b in rig.bal.pool.backends:
        for _ in range(5):
            rig.health.failure(b, "connect")
    out = [b for b in rig.bal.pool.backends if b.ejected_until]
    assert len(out) == max_out
    assert len(rig.eligible()) == n - max_out >= 1
    assert "not ejected" in caplog.text
    # One "not ejected" line per backend held back, not one per failure.
    assert caplog.text.count("not ejected") == n - max_out


def test_health_down_backends_count_against_the_ejection_cap(
    rigs: Rigs, responders: Responders
) -> None:
    bad, good = responders(500), responders(200)
    rig = rigs([("b1", bad.address, 1)] + [("b%d" % i, good.address, 1) for i in (2, 3, 4)],
               hc(fall=1, interval=1000.0), eject_after=1)
    rig.run_probe("b1")
    assert not rig.b("b1").up
    rig.health.failure(rig.b("b2"), "connect")
    assert rig.b("b2").ejected_until  # 2 of 4 eligible left
    rig.health.failure(rig.b("b3"), "connect")
    assert not rig.b("b3").ejected_until  # would leave 1 of 4
    # Ejecting a backend that is already down by health checks takes nothing away.
    rig.health.failure(rig.b("b1"), "connect")
    assert rig.b("b1").ejected_until


def test_eject_after_zero_turns_ejection_off(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=0)
    b1 = rig.b("b1")
    for _ in range(100):
        rig.health.failure(b1, "connect")
    assert not b1.ejected_until and b1.consecutive_errors == 100
    assert len(rig.reactor.wheel) == 0


def test_passing_probe_ends_an_ejection_early(
    rigs: Rigs, responders: Responders, caplog: pytest.LogCaptureFixture
) -> None:
    r = responders(200)
    addrs = [("b%d" % i, r.address, 1) for i in (1, 2, 3)]
    rig = rigs(addrs, hc(interval=2.0), eject_after=2, eject_cooldown=60.0)
    b1 = rig.b("b1")
    rig.health.failure(b1, "reset")
    rig.health.failure(b1, "reset")
    assert b1.ejected_until
    caplog.set_level(logging.INFO, logger="balrs")
    rig.run_probe("b1")
    assert not b1.ejected_until
    assert "b1" in rig.eligible()
    assert "back from ejection: a health probe passed" in caplog.text
    assert not rig.health._eject_timers


def test_probe_begun_before_the_ejection_does_not_end_it(
    rigs: Rigs, responders: Responders
) -> None:
    r = responders("hang")
    rig = rigs([("b%d" % i, r.address, 1) for i in (1, 2, 3)], hc(interval=2.0, timeout=5.0),
               eject_after=1, eject_cooldown=60.0)
    b1 = rig.b("b1")
    probe = rig.probe("b1")
    assert probe.timer is not None
    rig.advance(probe.timer.when - rig.now)
    rig.io(lambda: r.heads)
    rig.advance(0.1)
    rig.health.failure(b1, "reset")
    assert b1.ejected_until
    # The probe that was already in flight passes (simulated): the ejection stands.
    probe.finish(True, "status 200")
    assert b1.ejected_until


# ---- slow start --------------------------------------------------------------------------------------------
def test_slow_start_after_recovery(rigs: Rigs, responders: Responders) -> None:
    r, good = responders(500), responders(200)
    rig = rigs([("b1", r.address, 20), ("b2", good.address, 20)], hc(fall=1, rise=1, interval=1000.0),
               slow_start=10.0)
    b1 = rig.b("b1")
    assert b1.eff_weight == 20, "backends present at start-up take their full weight"
    assert not rig.health.ramping and len(rig.reactor.wheel) == 2  # the two probes only
    rig.run_probe("b1")
    assert not b1.up
    r.mode = 200
    rig.run_probe("b1")
    assert b1.up
    t0 = b1.up_since
    assert b1.eff_weight == 2
    refreshes = rig.refreshes
    values = {}
    for _ in range(44):
        rig.advance(SLOW_START_STEP)
        values[round(rig.now - t0, 2)] = b1.eff_weight
    # (A ramp step may land a float ulp before the exact instant: then it shows the weight just below.)
    assert 6.0 <= values[2.5] <= 6.5 and slow_start_weight(20, 2.5, 10.0) == 6.5
    assert 10.5 <= values[5.0] <= 11 and slow_start_weight(20, 5.0, 10.0) == 11
    assert 15.0 <= values[7.5] <= 15.5
    assert values[10.25] == 20 and values[11.0] == 20
    assert sorted(values.values()) == list(values.values()), "weights only go up"
    assert rig.refreshes - refreshes == len(set(values.values()) | {2.0}) - 1, "refresh only on a change"
    assert not rig.health.ramping
    assert rig.health._ramp_timer is None
    assert len(rig.reactor.wheel) == 2  # the ramp timer is gone


def test_slow_start_after_ejection(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=1, eject_cooldown=5.0, slow_start=4.0)
    for b in rig.bal.pool.backends:
        b.weight = b.eff_weight = 10
    b1 = rig.b("b1")
    rig.health.failure(b1, "connect")
    rig.advance(5.01)
    assert not b1.ejected_until
    assert b1.eff_weight == 1
    rig.advance(2.0)
    assert 1 < b1.eff_weight < 10
    rig.advance(2.1)
    assert b1.eff_weight == 10


def test_no_slow_start_keeps_full_weight(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=1, eject_cooldown=5.0)
    for b in rig.bal.pool.backends:
        b.weight = b.eff_weight = 10
    b1 = rig.b("b1")
    rig.health.failure(b1, "connect")
    rig.advance(5.01)
    assert b1.eff_weight == 10 and not rig.health.ramping


def test_going_down_stops_the_ramp(rigs: Rigs) -> None:
    rig = four(rigs, eject_after=1, eject_cooldown=5.0, slow_start=10.0)
    for b in rig.bal.pool.backends:
        b.weight = b.eff_weight = 10
    b1 = rig.b("b1")
    rig.health.failure(b1, "connect")
    rig.advance(5.01)
    assert b1 in rig.health.ramping
    rig.health.failure(b1, "connect")  # on probation: out again
    assert b1.ejected_until and b1 not in rig.health.ramping
