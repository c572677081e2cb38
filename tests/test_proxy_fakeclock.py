"""The proxy's timeouts, retries, pipelining, backpressure and exchange accounting, on a fake clock.

A real Balancer runs on a hand-turned loop (tests/proxyrig.py); every balrs deadline fires because the
test moved the fake clock (``rig.advance_to``), never because real time passed: each timeout is checked
just before its deadline (nothing happens) and at it (the exact answer). Real time is spent only on
sockets delivering bytes, bounded by deadlines of a few seconds.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import socket
import struct
import time
from typing import Iterator, List

import pytest

from balrs.proxy import UPSTREAM_RECV_SIZE
from balrs.proxy.client import C_BODY, C_CLOSED, C_HEAD, C_IDLE, C_LINGER, C_QUEUED, C_WAIT, LINGER_TIMEOUT
from balrs.proxy.upstream import POOL_IDLE_TIMEOUT, U_BODY, U_CLOSED, U_CONNECTING, U_HEAD, U_IDLE
from balrs.settings import CLIENT_RECV_SIZE
import balrs.transport as transport_mod
from balrs.transport import HIGH_WATER, SPLICE, Transport

from proxyrig import CLOSE, RESET, Gate, Request, Rig, RigFactory, get, ok, send_buffer_max

# A hang here is a bug: dump the stacks and stop rather than wait forever.
TEST_LIMIT = 30.0
# "Just before a deadline": the timer wheel has 1 ms ticks and must never fire early.
JUST_BEFORE = 0.001


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_LIMIT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def make() -> Iterator[RigFactory]:
    f = RigFactory()
    yield f
    f.close_all()


def echo(req: Request) -> List[bytes]:
    """Answer with the path (and the request body, if any)."""
    return [ok(req.path.encode() + (b" " + req.body if req.body else b""))]


def counters(rig: Rig, i: int = 0) -> tuple:
    b = rig.backends[i]
    return b.active, b.requests, b.failures


# ==== timeouts ==========================================================================================
def test_header_timeout_runs_from_the_first_byte_and_answers_408(make):
    be = make.backend(echo)
    rig = make.rig(be, header_timeout=5.0, client_timeout=60.0)
    c = rig.connect()
    rig.advance(3.0)  # idle time before the first byte does not count
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    rig.turn_until(lambda: c.conn.state == C_HEAD)
    t0 = rig.clock.now
    assert c.conn.head_start == t0
    rig.advance_to(t0 + 2.0)
    c.send(b"X-More: 1\r\n")   # more of the head does not move the deadline (slowloris)
    rig.settle()
    rig.advance_to(t0 + 5.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert c.conn.state == C_HEAD and c.conn in rig.bal.clients
    rig.advance_to(t0 + 5.0)
    r = rig.read_response(c)
    assert r.status == 408 and r.closes
    assert rig.read_until_closed(c) == b""   # our FIN: the answer is complete
    assert rig.responses() == {408: 1}
    assert be.requests == [] and counters(rig) == (0, 0, 0)
    # Half-closed, balrs lingers (discarding what still comes) for LINGER_TIMEOUT, then closes.
    assert c.conn.state == C_LINGER
    t1 = c.conn.linger_start
    rig.advance_to(t1 + LINGER_TIMEOUT - JUST_BEFORE)
    assert c.conn.state == C_LINGER
    rig.advance_to(t1 + LINGER_TIMEOUT)
    assert c.conn.state == C_CLOSED and c.conn not in rig.bal.clients


def test_client_timeout_closes_an_idle_keepalive_connection_silently(make):
    be = make.backend(echo)
    rig = make.rig(be, client_timeout=10.0, header_timeout=5.0)
    c = rig.connect()
    c.send(get("/1"))
    assert rig.read_response(c).body == b"/1"
    assert c.conn.state == C_IDLE
    t1 = c.conn.idle_since
    # Activity half-way restarts the idle clock: the timer armed for t1 + 10 re-arms lazily.
    rig.advance_to(t1 + 6.0)
    c.send(get("/2"))
    assert rig.read_response(c).body == b"/2"
    t2 = c.conn.idle_since
    assert t2 == t1 + 6.0
    rig.advance_to(t1 + 10.0)
    rig.assert_quiet(c)
    rig.advance_to(t2 + 10.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert c.conn.state == C_IDLE
    rig.advance_to(t2 + 10.0)
    assert rig.read_until_closed(c) == b""     # closed, and nothing said (RFC 9112 §9.3)
    assert not c.reset
    assert c.conn.state == C_CLOSED and c.conn not in rig.bal.clients
    assert rig.responses() == {200: 2}
    assert counters(rig) == (0, 2, 0)


def test_client_timeout_on_a_connection_that_never_sent_anything(make):
    rig = make.rig(make.backend(echo), client_timeout=10.0)
    c = rig.connect()
    t0 = c.conn.idle_since
    rig.advance_to(t0 + 10.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    rig.advance_to(t0 + 10.0)
    assert rig.read_until_closed(c) == b""
    assert rig.responses() == {}


def test_backend_timeout_before_the_response_head_is_504_and_frees_the_slot(make):
    gate = Gate()
    be = make.backend(lambda req: [gate, ok(b"late")] if req.path == "/slow" else echo(req))
    rig = make.rig(be, backend_timeout=10.0, connect_timeout=2.0)
    c = rig.connect()
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    up = rig.upstream_of(c)
    assert up is not None and up.state == U_HEAD
    assert counters(rig) == (1, 1, 0)
    t0 = up.last_active
    rig.advance_to(t0 + 10.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert counters(rig) == (1, 1, 0) and c.conn.state == C_WAIT
    rig.advance_to(t0 + 10.0)
    r = rig.read_response(c)
    assert r.status == 504 and not r.closes   # the whole request was read: keep-alive goes on
    assert counters(rig) == (0, 1, 1)         # a failure counted, the slot released
    assert rig.responses() == {504: 1}
    assert rig.bal.snapshot()["backends"][0]["active"] == 0
    # The client connection is still good, on a new upstream connection.
    c.send(get("/next"))
    assert rig.read_response(c).body == b"/next"
    assert counters(rig) == (0, 2, 1)
    assert rig.responses() == {504: 1, 200: 1}
    assert be.conns == 2
    gate.set()


def test_backend_timeout_after_the_head_truncates_and_closes(make):
    gate = Gate()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    be = make.backend(lambda req: [head + b"x" * 10, gate, b"y" * 90])
    rig = make.rig(be, backend_timeout=10.0)
    c = rig.connect()
    c.send(get("/part"))
    rig.read_at_least(c, len(head) + 10)
    up = rig.upstream_of(c)
    assert up is not None and up.state == U_BODY
    t0 = up.last_active
    rig.advance_to(t0 + 10.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert bytes(c.buf) == head + b"x" * 10
    rig.advance_to(t0 + 10.0)
    # Closed with nothing more: visibly 90 bytes short of its Content-Length.
    assert rig.read_until_closed(c) == head + b"x" * 10
    assert c.conn.state == C_CLOSED
    assert counters(rig) == (0, 1, 1)
    assert rig.responses() == {200: 1}          # the status that went out, counted once
    assert rig.bal.snapshot()["backends"][0]["responses"] == [0, 1, 0, 0, 0]
    gate.set()


def test_backend_timeout_on_a_reused_pooled_connection(make):
    """The pooled connection's own idle timer (POOL_IDLE_TIMEOUT) fires first, in the middle of the
    request: it must re-arm for backend_timeout, not close the connection or answer early."""
    gate = Gate()
    be = make.backend(lambda req: [gate, ok(b"late")] if req.path == "/slow" else echo(req))
    rig = make.rig(be, backend_timeout=10.0, client_timeout=100.0)
    c = rig.connect()
    c.send(get("/1"))
    assert rig.read_response(c).body == b"/1"
    (pooled,) = rig.idle_upstreams()
    t_idle = pooled.idle_since
    rig.advance_to(t_idle + POOL_IDLE_TIMEOUT - 5.0)
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/1", "/slow"])
    assert rig.upstream_of(c) is pooled and pooled.state == U_HEAD
    t0 = pooled.last_active
    rig.advance_to(t_idle + POOL_IDLE_TIMEOUT)   # the pool timer's time: nothing happens
    rig.assert_quiet(c)
    assert pooled.state == U_HEAD
    rig.advance_to(t0 + 10.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    rig.advance_to(t0 + 10.0)
    assert rig.read_response(c).status == 504
    assert counters(rig) == (0, 2, 1)
    assert be.conns == 1
    gate.set()


def test_send_timeout_closes_a_client_that_stops_reading_and_the_backend_is_not_blamed(make):
    size = max(8 << 20, 2 * send_buffer_max())
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    be = make.backend(lambda req: [head, b"z" * size])
    # backend_timeout is shorter than send_timeout: while the upstream is paused for the slow client,
    # the backend's silence is not the backend's fault.
    rig = make.rig(be, send_timeout=20.0, backend_timeout=5.0)
    c = rig.connect(rcvbuf=65536)
    c.send(get("/big"))
    rig.turn_until(lambda: rig.upstream_of(c) is not None and not rig.upstream_of(c).tr.reading,
                   what="the upstream paused")
    up = rig.upstream_of(c)
    rig.settle()
    t0 = c.conn.tr.last_write
    rig.advance_to(t0 + 5.0)
    rig.advance_to(t0 + 20.0 - JUST_BEFORE)
    assert c.conn.state == C_WAIT and up.state == U_BODY
    assert counters(rig) == (1, 1, 0)
    rig.advance_to(t0 + 20.0)
    assert c.conn.state == C_CLOSED and c.conn not in rig.bal.clients
    assert counters(rig) == (0, 1, 0)   # the slot released, no failure
    got = rig.read_until_closed(c, real_timeout=10.0)
    assert got.startswith(head) and len(got) < len(head) + size
    assert rig.responses() == {200: 1}


def _slow_and_fast(gate: Gate):
    def script(req: Request) -> List[object]:
        if req.path == "/slow":
            return [gate, ok(b"slow")]
        return echo(req)
    return script


def test_queue_timeout_answers_503_when_the_backend_stays_full(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, backend_max_connections=1, queue_timeout=3.0)
    a = rig.connect()
    a.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    b = rig.connect()
    b.send(get("/fast"))
    rig.turn_until(lambda: b.conn.state == C_QUEUED)
    assert rig.bal.pool.queued == 1 and rig.bal.snapshot()["queue_length"] == 1
    t0 = b.conn.queued_at
    rig.advance_to(t0 + 3.0 - JUST_BEFORE)
    rig.assert_quiet(b)
    assert b.conn.state == C_QUEUED
    rig.advance_to(t0 + 3.0)
    r = rig.read_response(b)
    assert r.status == 503 and not r.closes
    assert rig.bal.pool.queued == 0 and b.conn.state == C_IDLE
    assert counters(rig) == (1, 1, 0)   # the queued request never took a slot
    gate.set()
    assert rig.read_response(a).body == b"slow"
    assert counters(rig) == (0, 1, 0)
    assert rig.responses() == {503: 1, 200: 1}
    assert be.paths == ["/slow"]
    # After the 503 (answered from the queue's timer) the idle connection still has its client_timeout.
    t1 = b.conn.idle_since
    rig.advance_to(t1 + rig.settings.client_timeout - JUST_BEFORE)
    rig.assert_quiet(b)
    rig.advance_to(t1 + rig.settings.client_timeout)
    assert rig.read_until_closed(b) == b"" and b.conn.state == C_CLOSED


def test_queued_request_is_served_when_a_slot_frees_before_the_deadline(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, backend_max_connections=1, queue_timeout=3.0)
    a = rig.connect()
    a.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    b = rig.connect()
    b.send(get("/fast"))
    rig.turn_until(lambda: b.conn.state == C_QUEUED)
    t0 = b.conn.queued_at
    rig.advance_to(t0 + 2.0)
    gate.set()
    assert rig.read_response(a).body == b"slow"
    assert rig.read_response(b).body == b"/fast"
    assert rig.bal.pool.queued == 0
    rig.advance_to(t0 + 3.0 + 1.0)   # past the old queue deadline: no late 503
    rig.assert_quiet(b)
    assert counters(rig) == (0, 2, 0)
    assert rig.responses() == {200: 2}
    assert be.paths == ["/slow", "/fast"]
    assert be.conns == 1   # the freed connection went to the queued request


def test_queued_requests_are_served_in_order(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, backend_max_connections=1, queue_timeout=3.0)
    a = rig.connect()
    a.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    queued = []
    for name in ("/q1", "/q2", "/q3"):
        q = rig.connect()
        q.send(get(name))
        rig.turn_until(lambda: q.conn.state == C_QUEUED)
        queued.append(q)
    assert rig.bal.pool.queued == 3
    gate.set()
    for q, name in zip(queued, ("/q1", "/q2", "/q3")):
        assert rig.read_response(q).body == name.encode()
    assert rig.read_response(a).body == b"slow"
    assert be.paths == ["/slow", "/q1", "/q2", "/q3"]
    assert counters(rig) == (0, 4, 0) and rig.bal.pool.queued == 0


def test_a_queued_client_that_resets_leaves_the_queue(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, backend_max_connections=1, queue_timeout=3.0)
    a = rig.connect()
    a.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    b = rig.connect()
    b.send(get("/gone"))
    rig.turn_until(lambda: b.conn.state == C_QUEUED)
    d = rig.connect()
    d.send(get("/stays"))
    rig.turn_until(lambda: d.conn.state == C_QUEUED)
    assert rig.bal.pool.queued == 2
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.sock.close()
    # A queued connection is not read (its fd is not even registered), so the reset is seen only when
    # its request leaves the queue: it still goes to the backend, then the exchange dies there.
    rig.settle()
    assert b.conn.state == C_QUEUED and rig.bal.pool.queued == 2
    gate.set()
    assert rig.read_response(a).body == b"slow"
    assert rig.read_response(d).body == b"/stays"
    rig.turn_until(lambda: b.conn.state == C_CLOSED)
    rig.turn_until(lambda: len(be.requests) == 3)
    assert rig.bal.pool.queued == 0 and b.conn not in rig.bal.clients
    assert sorted(be.paths) == ["/gone", "/slow", "/stays"]
    assert counters(rig) == (0, 3, 0)


def test_body_timeout_answers_408_and_releases_the_backend(make):
    be = make.backend(echo)
    rig = make.rig(be, body_timeout=4.0, backend_timeout=30.0)
    c = rig.connect()
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    rig.turn_until(lambda: rig.upstream_of(c) is not None and rig.upstream_of(c).state == U_HEAD)
    assert c.conn.state == C_BODY and counters(rig) == (1, 1, 0)
    t0 = c.conn.last_read
    # Body bytes restart the body clock (it is a silence timeout, like nginx client_body_timeout).
    rig.advance_to(t0 + 3.0)
    c.send(b"def")
    rig.turn_until(lambda: c.conn.last_read == t0 + 3.0)
    rig.advance_to(t0 + 4.0)
    rig.assert_quiet(c)
    rig.advance_to(t0 + 3.0 + 4.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert c.conn.state == C_BODY
    rig.advance_to(t0 + 3.0 + 4.0)
    r = rig.read_response(c)
    assert r.status == 408 and r.closes
    assert rig.read_until_closed(c) == b""
    assert counters(rig) == (0, 1, 0)   # the client's fault: no backend failure
    assert rig.responses() == {408: 1}
    assert be.requests == []             # the backend never got a whole request


def _hanging_connect(rig: Rig, c) -> object:
    """The upstream connection of ``c``'s request, whose connect must hang (a BlackholePort)."""
    rig.turn_until(lambda: rig.upstream_of(c) is not None)
    up = rig.upstream_of(c)
    rig.settle()
    if up.state != U_CONNECTING:
        pytest.skip("this kernel completed a handshake to a listener with a full accept queue")
    return up


def test_connect_timeout_is_504_without_retry(make):
    hole = make.blackhole()
    rig = make.rig(hole, connect_timeout=2.0, retries=0)
    c = rig.connect()
    c.send(get("/"))
    up = _hanging_connect(rig, c)
    t0 = up.connect_start
    rig.advance_to(t0 + 2.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert up.state == U_CONNECTING and counters(rig) == (1, 1, 0)
    rig.advance_to(t0 + 2.0)
    r = rig.read_response(c)
    assert r.status == 504 and not r.closes
    assert counters(rig) == (0, 1, 1)
    assert rig.responses() == {504: 1}


def test_connect_timeout_is_retried_on_the_next_backend(make):
    hole = make.blackhole()
    be = make.backend(echo)
    rig = make.rig(hole, be, connect_timeout=2.0, retries=1)
    c = rig.connect()
    c.send(get("/x"))
    # Round robin with equal weights starts at b1: the black hole.
    up = _hanging_connect(rig, c)
    assert up.backend is rig.backends[0]
    rig.advance_to(up.connect_start + 2.0)
    assert rig.read_response(c).body == b"/x"
    assert counters(rig, 0) == (0, 1, 1)
    assert counters(rig, 1) == (0, 1, 0)
    assert rig.responses() == {200: 1}


def test_every_try_timed_out_is_504_and_a_mix_with_refused_is_502(make):
    holes = [make.blackhole(), make.blackhole()]
    rig = make.rig(*holes, connect_timeout=2.0, retries=1)
    c = rig.connect()
    c.send(get("/"))
    first = _hanging_connect(rig, c)
    rig.advance_to(first.connect_start + 2.0)          # b1 times out, the retry connects to b2
    second = rig.upstream_of(c)
    assert second is not None and second is not first and second.state == U_CONNECTING
    rig.assert_quiet(c)
    rig.advance_to(second.connect_start + 2.0)
    r = rig.read_response(c)
    assert r.status == 504   # RFC 9110 §15.6.5: every try timed out
    assert counters(rig, 0) == (0, 1, 1) and counters(rig, 1) == (0, 1, 1)

    rig2 = make.rig(make.blackhole(), make.refused(), connect_timeout=2.0, retries=1)
    c2 = rig2.connect()
    c2.send(get("/"))
    up = _hanging_connect(rig2, c2)
    rig2.advance_to(up.connect_start + 2.0)
    assert rig2.read_response(c2).status == 502      # the refused try is not a timeout
    assert counters(rig2, 0) == (0, 1, 1) and counters(rig2, 1) == (0, 1, 1)


def test_drain_lets_a_request_in_flight_finish_with_connection_close(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, drain_timeout=30.0)
    busy, idle = rig.connect(), rig.connect()
    busy.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    rig.bal.drain()
    assert rig.read_until_closed(idle) == b""   # an idle connection closes at once
    rig.advance(10.0)
    rig.assert_quiet(busy)
    gate.set()
    r = rig.read_response(busy)
    assert r.body == b"slow" and r.closes       # its head was not out yet: it says close
    assert rig.read_until_closed(busy) == b""
    assert rig.bal.stopped and not rig.bal.clients   # the last connection ended the drain
    assert counters(rig) == (0, 1, 0) and rig.responses() == {200: 1}


def test_drain_timeout_stops_what_is_still_in_flight(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, drain_timeout=30.0, backend_timeout=100.0)
    c = rig.connect()
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    t0 = rig.clock.now
    rig.bal.drain()
    rig.advance_to(t0 + 30.0 - JUST_BEFORE)
    rig.assert_quiet(c)
    assert not rig.bal.stopped and counters(rig) == (1, 1, 0)
    rig.advance_to(t0 + 30.0)
    assert rig.bal.stopped
    assert rig.read_until_closed(c) == b""
    assert counters(rig) == (0, 1, 0)   # stopping is not the backend's failure
    assert rig.responses() == {}
    gate.set()


def test_a_reload_does_not_change_the_deadline_of_a_request_in_flight(make):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be, backend_timeout=10.0)
    c = rig.connect()
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    t0 = rig.upstream_of(c).last_active
    rig.bal.reload(dataclasses.replace(rig.config, backend_timeout=100.0))
    assert rig.bal.settings.backend_timeout == 100.0   # the reload itself worked
    try:
        rig.advance_to(t0 + 10.0)
        rig.settle()
        c.pull()
        assert c.buf.startswith(b"HTTP/1.1 504 "), "no 504 at the old deadline; got %r" % bytes(c.buf[:40])
    finally:
        gate.set()


# ==== retries ===========================================================================================
def test_refused_connect_is_retried_on_the_other_backend(make):
    dead = make.refused()
    be = make.backend(echo)
    rig = make.rig(dead, be, retries=1)
    c = rig.connect()
    c.send(get("/r"))
    r = rig.read_response(c)
    assert r.status == 200 and r.body == b"/r"
    assert counters(rig, 0) == (0, 1, 1)   # round robin tried b1 first: refused, counted
    assert counters(rig, 1) == (0, 1, 0)
    assert rig.responses() == {200: 1}


def test_refused_connect_retries_a_post_with_its_body(make):
    dead = make.refused()
    be = make.backend(echo)
    rig = make.rig(dead, be, retries=1)
    c = rig.connect()
    c.send(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert rig.read_response(c).body == b"/p hello"
    assert [(q.method, q.body) for q in be.requests] == [("POST", b"hello")]
    assert counters(rig, 0) == (0, 1, 1) and counters(rig, 1) == (0, 1, 0)


def test_refused_connect_retry_carries_a_body_still_arriving(make):
    """Part of the body is queued on the refused connection; the retry takes it, and the rest of the
    body, still coming from the client, follows on the new connection."""
    dead = make.refused()
    be = make.backend(echo)
    rig = make.rig(dead, be, retries=1)
    c = rig.connect()
    c.send(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    rig.turn_until(lambda: rig.backends[0].failures == 1 and rig.upstream_of(c) is not None
                   and rig.upstream_of(c).backend is rig.backends[1])
    assert c.conn.state == C_BODY
    c.send(b"defghij")
    assert rig.read_response(c).body == b"/p abcdefghij"
    assert counters(rig, 0) == (0, 1, 1) and counters(rig, 1) == (0, 1, 0)


def test_no_retries_means_502_and_the_connection_goes_on(make):
    dead = make.refused()
    be = make.backend(echo)
    rig = make.rig(dead, be, retries=0)
    c = rig.connect()
    c.send(get("/a"))
    r = rig.read_response(c)
    assert r.status == 502 and not r.closes
    assert counters(rig, 0) == (0, 1, 1) and counters(rig, 1) == (0, 0, 0)
    c.send(get("/b"))   # round robin moves on to b2
    assert rig.read_response(c).body == b"/b"
    assert rig.responses() == {502: 1, 200: 1}


@pytest.mark.parametrize("retries", [1, 5])
def test_every_backend_refused_is_502_each_failure_counted_once(make, retries):
    rig = make.rig(make.refused(), make.refused(), retries=retries)
    c = rig.connect()
    c.send(get("/"))
    r = rig.read_response(c)
    assert r.status == 502
    assert counters(rig, 0) == (0, 1, 1) and counters(rig, 1) == (0, 1, 1)
    assert rig.responses() == {502: 1}
    snap = rig.bal.snapshot()
    assert [b["failures"] for b in snap["backends"]] == [1, 1]
    assert snap["responses"] == {"502": 1}


# ==== pipelining ========================================================================================
def test_three_pipelined_requests_answered_in_order_once_each(make):
    gate = Gate()
    be = make.backend(lambda req: ([gate] if req.path == "/1" else []) + echo(req))
    rig = make.rig(be)
    c = rig.connect()
    c.send(get("/1") + get("/2") + get("/3"))
    rig.turn_until(lambda: be.paths == ["/1"])
    rig.settle()
    assert be.paths == ["/1"]            # the others wait for the first answer
    gate.set()
    assert [rig.read_response(c).body for _ in range(3)] == [b"/1", b"/2", b"/3"]
    rig.assert_quiet(c)
    assert be.paths == ["/1", "/2", "/3"]
    assert counters(rig) == (0, 3, 0)
    assert rig.responses() == {200: 3}


@pytest.mark.parametrize("body", [
    b"Content-Length: 5\r\n\r\nhello",
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
])
def test_pipelined_request_after_a_request_with_a_body(make, body):
    be = make.backend(echo)
    rig = make.rig(be)
    c = rig.connect()
    c.send(b"POST /a HTTP/1.1\r\nHost: a\r\n" + body + get("/b"))
    assert rig.read_response(c).body == b"/a hello"
    assert rig.read_response(c).body == b"/b"
    rig.assert_quiet(c)
    assert [(q.path, q.body) for q in be.requests] == [("/a", b"hello"), ("/b", b"")]
    assert counters(rig) == (0, 2, 0)
    assert rig.responses() == {200: 2}


@pytest.mark.parametrize("kind", ["length", "chunked", "close-delimited", "head"])
def test_pipelined_request_after_each_kind_of_response_body(make, kind):
    """The first response's framing must end exactly where it ends, or the second one is misread."""
    def script(req: Request) -> List[object]:
        if req.path != "/first":
            return echo(req)
        if kind == "chunked":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1;x=y\r\nd\r\n0\r\n\r\n"]
        if kind == "close-delimited":
            return [b"HTTP/1.1 200 OK\r\n\r\nabcd", CLOSE]
        if kind == "head":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"]
        return [ok(b"abcd")]
    be = make.backend(script)
    rig = make.rig(be)
    c = rig.connect()
    method = b"HEAD" if kind == "head" else b"GET"
    c.send(method + b" /first HTTP/1.1\r\nHost: a\r\n\r\n" + get("/second"))
    first = rig.read_response(c, head_request=kind == "head")
    assert first.status == 200 and first.body == (b"" if kind == "head" else b"abcd")
    if kind == "close-delimited":
        # Re-framed for the HTTP/1.1 client, so its connection can stay open.
        assert first.headers.get("transfer-encoding") == "chunked" and not first.closes
    second = rig.read_response(c)
    assert second.body == b"/second"
    rig.assert_quiet(c)
    assert counters(rig) == (0, 2, 0) and rig.responses() == {200: 2}
    assert be.conns == (2 if kind == "close-delimited" else 1)


def test_pipelined_requests_then_half_close_are_all_answered(make):
    be = make.backend(echo)
    rig = make.rig(be)
    c = rig.connect()
    c.send(get("/1") + get("/2"))
    c.sock.shutdown(socket.SHUT_WR)   # `nc` style: send everything, then FIN
    assert rig.read_response(c).body == b"/1"
    assert rig.read_response(c).body == b"/2"
    assert rig.read_until_closed(c) == b""
    assert counters(rig) == (0, 2, 0) and rig.responses() == {200: 2}


def test_pipeline_over_the_limit_pauses_reading_and_resumes(make):
    gate = Gate()
    be = make.backend(lambda req: ([gate] if req.path == "/0" else []) + [ok(req.path.encode())])
    rig = make.rig(be, max_header_bytes=2048)
    limit = rig.settings.pipeline_limit
    assert limit == 2048 + CLIENT_RECV_SIZE
    pad = b"X-Pad: " + b"p" * 1800 + b"\r\n"
    n = 80
    data = b"".join(get("/%d" % i, pad) for i in range(n))
    assert len(data) > limit + CLIENT_RECV_SIZE
    c = rig.connect()
    rig.send(c, data)
    rig.turn_until(lambda: c.conn.paused_for_pipeline, what="reading paused for the pipeline")
    rig.settle()
    conn = c.conn
    assert not conn.tr.reading and conn.state == C_WAIT
    assert limit < len(conn.inbuf.buf) <= limit + CLIENT_RECV_SIZE
    assert be.paths == ["/0"]
    gate.set()
    got = [rig.read_response(c).body for _ in range(n)]
    assert got == [b"/%d" % i for i in range(n)]
    rig.assert_quiet(c)
    assert conn.tr.reading and not conn.paused_for_pipeline and conn.state == C_IDLE
    assert be.paths == ["/%d" % i for i in range(n)]
    assert counters(rig) == (0, n, 0)
    assert rig.responses() == {200: n}


# ==== backpressure ======================================================================================
@pytest.mark.parametrize("splice", [False, True], ids=["recv-send", "splice"])
def test_a_client_that_does_not_read_pauses_the_upstream_and_memory_stays_bounded(make, monkeypatch, splice):
    # More than the client-facing socket's send buffer can hold, so balrs must queue and pause. With
    # splice the body waits in the client transport's pipe (at most its size), never in Python.
    if splice and not SPLICE:
        pytest.skip("no os.splice here (Linux, Python 3.10+)")
    spliced = [0]
    if splice:
        real = transport_mod._splice

        def counting(*args, **kw):  # the real splice, counted
            n = real(*args, **kw)
            spliced[0] += n
            return n
        monkeypatch.setattr(transport_mod, "_splice", counting)
    else:
        monkeypatch.setattr(Transport, "can_splice", False)
    size = max(8 << 20, 2 * send_buffer_max()) // 256 * 256
    payload = bytes(range(256)) * (size // 256)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    be = make.backend(lambda req: [head, payload])
    rig = make.rig(be)
    # A small receive window on the client, so the kernel cannot absorb the response for it.
    c = rig.connect(rcvbuf=65536)
    c.send(get("/big"))
    rig.turn_until(lambda: rig.upstream_of(c) is not None and rig.upstream_of(c).state == U_BODY)
    up = rig.upstream_of(c)
    ctr = c.conn.tr
    bound = HIGH_WATER + UPSTREAM_RECV_SIZE   # the mark plus at most one read past it
    most = 0

    def sample() -> None:
        nonlocal most
        most = max(most, ctr.out_bytes)

    rig.turn_until(lambda: (sample(), not up.tr.reading)[1], what="the upstream paused")
    for _ in range(40):   # stays paused and bounded while the client does not read
        rig.turn(0.002)
        sample()
        assert not up.tr.reading
    if splice:
        assert ctr.pipe is not None and 0 < most <= ctr.pipe.size and up.splicing
        bound = ctr.pipe.size
    else:
        assert HIGH_WATER < most <= bound
    # Now the client reads: reading upstream resumes, every byte arrives, in order.
    resumed = False
    total = len(head) + size
    end = time.monotonic() + 10.0
    while len(c.buf) < total:
        assert time.monotonic() < end, "only %d of %d bytes" % (len(c.buf), total)
        rig.turn(0.001)
        sample()
        resumed = resumed or up.tr.reading
        while c.pull():
            pass
    assert resumed and most <= bound
    assert bytes(c.buf) == head + payload
    if splice:
        # Every body byte after the first read went through the pipe (in, then out: twice counted),
        # and the pipe is closed once the body is out.
        assert spliced[0] >= 2 * (size - UPSTREAM_RECV_SIZE) and ctr.pipe is None and not up.splicing
    rig.assert_quiet(c)
    assert counters(rig) == (0, 1, 0)
    assert rig.responses() == {200: 1}


@pytest.mark.parametrize("then", ["backend-reads", "backend-timeout"])
def test_a_backend_that_does_not_read_the_body_pauses_the_client(make, then):
    """Upload backpressure: the upstream's queue above HIGH_WATER stops reading the client; the body
    clock does not run meanwhile (the pause is ours, not the client's silence). Then either the backend
    reads it all, or backend_timeout (counted from the last byte it took) gives 504 and a close."""
    gate = Gate()
    # More than the upstream socket's send buffer can hold (plus the windows), so balrs must queue.
    size = max(6 << 20, send_buffer_max() + (2 << 20)) // 256 * 256
    body = bytes(range(256)) * (size // 256)
    be = make.backend(lambda req: [ok(b"%d" % len(req.body))], on_head=lambda req: [gate], rcvbuf=65536)
    rig = make.rig(be, body_timeout=5.0, backend_timeout=30.0)
    c = rig.connect(sndbuf=65536)
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
    rig.turn_until(lambda: len(be.heads) == 1)
    up = rig.upstream_of(c)
    most = 0

    def paused() -> bool:
        nonlocal most
        most = max(most, up.tr.out_bytes)
        return not c.conn.tr.reading

    rest = rig.push(c, memoryview(body), paused)
    bound = HIGH_WATER + CLIENT_RECV_SIZE   # the mark plus at most one client read past it
    for _ in range(40):
        rig.turn(0.002)
        assert paused()
    assert HIGH_WATER < most <= bound
    t0 = rig.clock.now
    assert up.tr.last_write <= t0
    rig.advance_to(t0 + 5.0 * 3)          # three body_timeouts: no 408 while we are not reading
    rig.assert_quiet(c)
    assert c.conn.state == C_BODY and counters(rig) == (1, 1, 0)
    if then == "backend-reads":
        gate.set()
        rig.send(c, bytes(rest), real_timeout=10.0)
        r = rig.read_response(c, real_timeout=10.0)
        assert r.status == 200 and r.body == b"%d" % size
        assert be.requests[0].body == body
        assert most <= bound
        assert counters(rig) == (0, 1, 0)
    else:
        rig.advance_to(up.tr.last_write + 30.0 - JUST_BEFORE)
        rig.assert_quiet(c)
        rig.advance_to(up.tr.last_write + 30.0)
        r = rig.read_response(c)
        assert r.status == 504 and r.closes   # the request was not complete: no keep-alive
        assert counters(rig) == (0, 1, 1)
        assert rig.responses() == {504: 1}
        gate.set()


# ==== the exchange: slots and counters ====================================================================
def test_each_completed_request_releases_its_slot_once_and_counts_once(make):
    be = make.backend(echo)
    rig = make.rig(be)
    c = rig.connect()
    for i in range(1, 6):
        c.send(get("/%d" % i))
        assert rig.read_response(c).body == b"/%d" % i
        assert counters(rig) == (0, i, 0)
        assert rig.responses() == {200: i}
        snap = rig.bal.snapshot()
        assert snap["responses"] == {"200": i}
        assert (snap["backends"][0]["active"], snap["backends"][0]["requests"]) == (0, i)
        assert snap["backends"][0]["responses"] == [0, i, 0, 0, 0]
    assert be.conns == 1   # one pooled upstream connection served them all
    assert rig.bal.snapshot()["backends"][0]["idle_connections"] == 1


def _request(client: int, i: int, kind: str) -> bytes:
    method = b"HEAD" if kind == "head" else b"GET"
    return b"%s /%d-%d/%s HTTP/1.1\r\nHost: a\r\n\r\n" % (method, client, i, kind.encode())


def test_mixed_pipelines_over_two_full_backends_all_answered_in_order(make):
    """Five clients pipeline ten requests each, in every response framing, over two backends of one
    slot each (so most requests queue): every client gets its answers in its order, each once, and
    every slot and counter adds up."""
    kinds = ["length", "chunked", "close-delimited", "head"]

    def script(req: Request) -> List[object]:
        kind = req.path.split("/")[2]
        body = req.path.encode()
        if kind == "head":   # a HEAD answer: the Content-Length of the body a GET would get, no body
            return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)]
        if kind == "chunked":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                    % (len(body), body)]
        if kind == "close-delimited":
            return [b"HTTP/1.1 200 OK\r\n\r\n" + body, CLOSE]
        return [ok(body)]

    b1, b2 = make.backend(script), make.backend(script)
    rig = make.rig(b1, b2, backend_max_connections=1, queue_timeout=60.0)
    clients = [rig.connect() for _ in range(5)]
    plan = {}
    for ci, c in enumerate(clients):
        reqs = [(ci, i, kinds[(ci + i) % len(kinds)]) for i in range(10)]
        plan[ci] = reqs
        c.send(b"".join(_request(n, i, k) for n, i, k in reqs))
    for ci, c in enumerate(clients):
        for _, i, k in plan[ci]:
            r = rig.read_response(c, head_request=k == "head")
            path = b"/%d-%d/%s" % (ci, i, k.encode())
            assert r.status == 200 and r.body == (b"" if k == "head" else path)
        rig.assert_quiet(c, turns=1)
    total = 5 * 10
    a1, n1, f1 = counters(rig, 0)
    a2, n2, f2 = counters(rig, 1)
    assert (a1, a2, f1, f2) == (0, 0, 0, 0) and n1 + n2 == total
    assert rig.responses() == {200: total} and rig.bal.pool.queued == 0
    assert sorted(b1.paths + b2.paths) == sorted("/%d-%d/%s" % r for reqs in plan.values() for r in reqs)


def test_clients_in_parallel_over_two_backends(make):
    b1, b2 = make.backend(echo), make.backend(echo)
    rig = make.rig(b1, b2)
    clients = [rig.connect() for _ in range(4)]
    for i, c in enumerate(clients):
        c.send(get("/%d" % i))
    for i, c in enumerate(clients):
        assert rig.read_response(c).body == b"/%d" % i
    assert counters(rig, 0) == (0, 2, 0) and counters(rig, 1) == (0, 2, 0)
    assert rig.responses() == {200: 4}


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_while_waiting_releases_the_slot_exactly_once(make, how):
    gate = Gate()
    be = make.backend(_slow_and_fast(gate))
    rig = make.rig(be)
    c = rig.connect()
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    assert counters(rig) == (1, 1, 0)
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()
    if how == "reset":
        # A reset ends the exchange at once: no response was sent, nothing counted.
        rig.turn_until(lambda: c.conn.state == C_CLOSED)
        assert counters(rig) == (0, 1, 0) and rig.responses() == {}
        gate.set()
        rig.settle()
    else:
        # A FIN after a complete request is a legal half-close: the answer is still due.
        rig.settle()
        assert c.conn.state == C_WAIT and counters(rig) == (1, 1, 0)
        gate.set()
        rig.turn_until(lambda: c.conn.state == C_CLOSED)
        assert rig.responses() == {200: 1}
    assert counters(rig) == (0, 1, 0)
    assert c.conn not in rig.bal.clients


def test_idle_pooled_connection_closes_after_pool_idle_timeout(make):
    be = make.backend(echo)
    rig = make.rig(be, client_timeout=1000.0)
    c = rig.connect()
    c.send(get("/1"))
    rig.read_response(c)
    (pooled,) = rig.idle_upstreams()
    assert pooled.state == U_IDLE
    t0 = pooled.idle_since
    rig.advance_to(t0 + POOL_IDLE_TIMEOUT - JUST_BEFORE)
    assert rig.idle_upstreams() == [pooled]
    rig.advance_to(t0 + POOL_IDLE_TIMEOUT)
    assert rig.idle_upstreams() == []
    c.send(get("/2"))
    assert rig.read_response(c).body == b"/2"
    assert be.conns == 2 and counters(rig) == (0, 2, 0)


def test_interim_100_continue_is_relayed_and_only_the_final_status_counted(make):
    be = make.backend(echo, on_head=lambda req: [b"HTTP/1.1 100 Continue\r\n\r\n"])
    rig = make.rig(be)
    c = rig.connect()
    c.send(b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = rig.read_response(c)
    assert interim.status == 100
    c.send(b"hello")
    assert rig.read_response(c).body == b"/e hello"
    assert rig.responses() == {200: 1}
    assert rig.bal.snapshot()["backends"][0]["responses"] == [0, 1, 0, 0, 0]
    assert counters(rig) == (0, 1, 0)


HEAD_100 = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"


@pytest.mark.parametrize("first, end, status", [
    (b"", CLOSE, 502),                                         # closed before any response byte
    (b"garbage\r\n\r\n", None, 502),                          # not a response head
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", RESET, 502),  # reset inside the head
    (HEAD_100 + b"x" * 10, CLOSE, None),                       # closed in the body: truncated
    (HEAD_100 + b"x" * 10, RESET, None),                       # reset in the body: truncated
])
def test_backend_failures_release_the_slot_once_and_count_one_failure(make, first, end, status):
    gate = Gate()   # the end comes only once balrs has taken the first bytes (no race with a reset)
    be = make.backend(lambda req: ([first] if first else []) + ([gate, end] if end is not None else []))
    rig = make.rig(be)
    c = rig.connect()
    c.send(get("/f"))
    if first and end is not None:
        rig.turn_until(lambda: rig.upstream_of(c) is not None and rig.upstream_of(c).got_bytes)
        if status is None:
            rig.read_at_least(c, len(first))
    gate.set()
    if status is not None:
        r = rig.read_response(c)
        assert r.status == status and not r.closes
        assert rig.responses() == {status: 1}
    else:
        assert rig.read_until_closed(c) == first   # visibly short of its Content-Length
        assert rig.responses() == {200: 1}
    rig.settle()
    assert counters(rig) == (0, 1, 1)


# ==== splice: large Content-Length bodies backend -> pipe -> client ========================================
needs_splice = pytest.mark.skipif(not SPLICE, reason="no os.splice here (Linux, Python 3.10+)")


def big(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256)


@needs_splice
def test_a_spliced_body_keeps_pipelined_responses_in_order_and_reuses_the_connection(make):
    size = 2 << 20
    bodies = {"/big": big(size), "/small": b"small one"}
    be = make.backend(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(bodies[req.path]), bodies[req.path])])
    rig = make.rig(be)
    c = rig.connect(rcvbuf=65536)
    # Pipelined: the small answer must wait for every byte of the big one (part of it in the pipe).
    c.send(get("/big") + get("/small") + get("/big"))
    first = rig.read_response(c)
    assert first.status == 200 and first.body == bodies["/big"]
    second = rig.read_response(c)
    assert second.body == b"small one"
    third = rig.read_response(c)
    assert third.body == bodies["/big"]
    rig.assert_quiet(c)
    assert be.paths == ["/big", "/small", "/big"]
    assert len(rig.idle_upstreams()) == 1, "the spliced connection went back to the pool"
    assert counters(rig) == (0, 3, 0) and rig.responses() == {200: 3}
    assert c.conn.tr.pipe is None, "the pipe outlived the body"
    up = rig.idle_upstreams()[0]
    assert not up.splicing and up.tr._reader == up.tr._on_read


@needs_splice
def test_a_backend_that_closes_in_the_middle_of_a_spliced_body(make):
    size = 4 << 20
    gate = Gate()
    payload = big(size)
    be = make.backend(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size,
                                   payload[:size // 2], gate, CLOSE])
    rig = make.rig(be)
    c = rig.connect()
    c.send(get("/big"))
    rig.turn_until(lambda: rig.upstream_of(c) is not None and rig.upstream_of(c).splicing, what="splicing")
    gate.set()
    data = rig.read_until_closed(c)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"200 OK" in head and body == payload[:size // 2], "a truncated body is cut, never padded"
    assert counters(rig) == (0, 1, 1), "the backend's failure is counted, its slot released"
    assert c.conn.tr.pipe is None


@needs_splice
def test_a_client_that_leaves_during_a_spliced_body(make):
    size = 8 << 20
    be = make.backend(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, big(size)])
    rig = make.rig(be)
    c = rig.connect(rcvbuf=65536)
    c.send(get("/big"))
    rig.turn_until(lambda: rig.upstream_of(c) is not None and rig.upstream_of(c).splicing, what="splicing")
    up = rig.upstream_of(c)
    c.close()
    rig.turn_until(lambda: up.state == U_CLOSED and c.conn.state == C_CLOSED, what="both sides closed")
    assert counters(rig) == (0, 1, 0)
    assert c.conn.tr.pipe is None and rig.idle_upstreams() == []


@needs_splice
def test_chunked_and_small_bodies_are_not_spliced(make, monkeypatch):
    from balrs.proxy.upstream import UpstreamConn
    started = []
    real = UpstreamConn._start_splicing

    def counting(self):  # the real method, counted
        started.append(self.ex.req.target if self.ex is not None and self.ex.req is not None else None)
        real(self)
    monkeypatch.setattr(UpstreamConn, "_start_splicing", counting)
    size = 1 << 20
    payload = big(size)
    chunked = b"".join(b"%x\r\n%s\r\n" % (65536, payload[i:i + 65536]) for i in range(0, size, 65536))
    responses = {
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n",
        "/small": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
        "/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, payload),
    }
    be = make.backend(lambda req: [responses[req.path]])
    rig = make.rig(be)
    c = rig.connect()
    for path in ("/chunked", "/small", "/big"):
        c.send(get(path))
        r = rig.read_response(c)
        assert r.status == 200 and len(r.body) == (100 if path == "/small" else size)
    assert started == [b"/big"], "only the large Content-Length body is spliced"
    from balrs.tls import TLSTransport
    assert TLSTransport.can_splice is False
