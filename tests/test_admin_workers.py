"""The admin endpoint with ``workers = N``: the supervisor answers for every worker.

Layers, as in test_admin.py: the control channel's framing (sans-IO, fed whole, byte by byte, with
trailing bytes), ``metrics.merge`` on snapshots of balancer-like objects, the supervisor's
``SnapshotCollector`` and a waiting ``AdminServer`` in process on a reactor with a fake clock, and real
``python -m balrs`` processes with ``workers = 2`` checked against what the test backends saw.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

import pytest
from support import HOST, Client, TestBackend, build, can_connect, free_port, lb_ini, request, run_balrs, wait_for
from test_admin import (
    REQUIRED_METRICS,
    STATUS_BACKEND_KEYS,
    AdminLB,
    FakeClock,
    _backend,
    _fake_balancer,
    parse_prometheus,
    start_admin_lb,
    value_of,
)

from balrs.admin import ADMIN_SEND_TIMEOUT, AdminServer
from balrs.config import Address
from balrs.control import (
    COLLECT_TIMEOUT,
    CONTROL_MAX_FRAME,
    Channel,
    ControlError,
    FrameReader,
    SnapshotCollector,
    WorkerControl,
    encode_frame,
)
from balrs.metrics import Snapshot, merge, metrics_text, snapshot, status_of
from balrs.reactor import Reactor


# =========================================================================================================
# Framing
# =========================================================================================================
MESSAGES: List[Dict[str, Any]] = [
    {"id": 1, "op": "snapshot"},
    {},
    {"id": 2, "snapshot": {"backends": [{"name": "b\u00e9\n\"x"}], "n": 1.5, "none": None}},
    {"big": "x" * 100000},
]


class TestFraming:
    def test_whole(self) -> None:
        data = b"".join(encode_frame(m) for m in MESSAGES)
        r = FrameReader()
        assert r.feed(data) == MESSAGES
        assert len(r) == 0

    def test_byte_by_byte(self) -> None:
        data = b"".join(encode_frame(m) for m in MESSAGES)
        r = FrameReader()
        got: List[Dict[str, Any]] = []
        for i in range(len(data)):
            got += r.feed(data[i:i + 1])
        assert got == MESSAGES
        assert len(r) == 0

    def test_trailing_bytes_wait_for_the_rest(self) -> None:
        first, second = encode_frame(MESSAGES[0]), encode_frame(MESSAGES[2])
        r = FrameReader()
        assert r.feed(first + second[:3]) == [MESSAGES[0]]   # part of a length prefix
        assert r.feed(second[3:10]) == []                    # part of a body
        assert r.feed(second[10:] + first) == [MESSAGES[2], MESSAGES[0]]
        assert len(r) == 0

    @pytest.mark.parametrize("data", [
        (CONTROL_MAX_FRAME + 1).to_bytes(4, "big"),
        b"\x00\x00\x00\x03abc",
        b"\x00\x00\x00\x02[]",
        b"\x00\x00\x00\x02\xff\xfe",
    ])
    def test_bad_frames(self, data: bytes) -> None:
        with pytest.raises(ControlError):
            FrameReader().feed(data)

    def test_limit_is_checked_on_the_length_alone(self) -> None:
        r = FrameReader(max_frame=10)
        assert r.feed(encode_frame({"a": 1})) == [{"a": 1}]
        with pytest.raises(ControlError):
            r.feed(b"\x00\x00\x00\x0b")


# =========================================================================================================
# merge() and the renderers on merged snapshots
# =========================================================================================================
def _snap(pid: int, backends: List[Any], responses: Dict[int, int], **attrs: Any) -> Snapshot:
    """A worker's snapshot of a fake balancer, as it arrives over the channel (through JSON)."""
    srv = _fake_balancer(backends, responses)
    for k, v in attrs.items():
        setattr(srv, k, v)
    snap = json.loads(json.dumps(snapshot(srv.pool, srv.config, srv, start_time=1.0)))
    snap["pid"] = pid
    return snap


def _worker_views() -> List[Snapshot]:
    a1, b1 = _backend("a"), _backend("b", 9002, weight=2)
    a1.requests, a1.active, a1.failures = 10, 1, 2
    a1.responses = [0, 0, 8, 1, 0, 1]
    for s in (0.001, 0.02, 3.0):
        a1.observe(s, 0.0)
    a1.ewma = 0.1
    a1.idle = {object(): None}  # type: ignore[dict-item]
    a1.consecutive_errors = 1
    b1.requests = 4
    b1.up = False  # down in worker 1 only
    a2, b2 = _backend("a"), _backend("b", 9002, weight=2)
    a2.requests, a2.active = 5, 2
    a2.responses = [0, 0, 5, 0, 0, 0]
    a2.observe(0.02, 0.0)
    a2.ewma = 0.4
    a2.ejected_until = 3.0
    a2.consecutive_errors = 4
    b2.requests = 6
    w1 = _snap(101, [a1, b1], {200: 13, 502: 1})
    w2 = _snap(102, [a2, b2], {200: 11, 404: 2})
    return [w1, w2]


class TestMerge:
    def test_counters_and_gauges_are_summed(self) -> None:
        w1, w2 = _worker_views()
        m = merge([w1, w2], pid=7, start_time=5.0, workers=2, workers_configured=2)
        json.dumps(m)
        assert (m["pid"], m["start_time"], m["workers"], m["workers_answered"], m["worker_pids"]) == (
            7, 5.0, 2, 2, [101, 102])
        assert m["responses"] == {"200": 24, "404": 2, "502": 1}
        assert m["client_connections"] == 6 and m["accepted_connections"] == 34 and m["queue_length"] == 4
        a, b = m["backends"]
        assert (a["name"], b["name"]) == ("a", "b")
        assert (a["requests"], a["active"], a["failures"]) == (15, 3, 2)
        assert a["responses"] == [0, 13, 1, 0, 1]
        assert a["latency"] == [x + y for x, y in zip(w1["backends"][0]["latency"], w2["backends"][0]["latency"])]
        assert sum(a["latency"]) == 4
        assert a["latency_sum"] == pytest.approx(0.001 + 0.02 + 3.0 + 0.02)
        assert a["idle_connections"] == 1
        assert a["ejected"] == 1                    # in one worker
        assert a["consecutive_errors"] == 4         # the longest streak
        # Response time: weighed by the responses each worker measured (3 and 1).
        assert a["response_time"] == pytest.approx((0.1 * 3 + 0.4 * 1) / 4)
        assert b["requests"] == 10 and b["weight"] == 2

    def test_state_by_majority_and_per_worker_detail(self) -> None:
        w1, w2 = _worker_views()
        m = merge([w1, w2], pid=7, start_time=None, workers=2, workers_configured=2)
        a, b = m["backends"]
        # a: up in 101, ejected (down) in 102 -> not a majority; b: down in 101, up in 102.
        assert a["state"] == "down" and a["up_workers"] == 1
        assert b["state"] == "down" and b["up_workers"] == 1
        assert a["workers"] == [{"pid": 101, "state": "up", "active": 1, "requests": 10},
                                {"pid": 102, "state": "down", "active": 2, "requests": 5}]
        w3 = _snap(103, [_backend("a"), _backend("b", 9002, weight=2)], {})
        m = merge([w1, w2, w3], pid=7, start_time=None, workers=3, workers_configured=3)
        assert [(x["state"], x["up_workers"]) for x in m["backends"]] == [("up", 2), ("up", 2)]
        w3["backends"][1]["state"] = "drain"
        m = merge([w1, w2, w3], pid=7, start_time=None, workers=3, workers_configured=3)
        assert m["backends"][1]["state"] == "drain"
        # One answer: its own view.
        m = merge([w2], pid=7, start_time=None, workers=2, workers_configured=2)
        assert [x["state"] for x in m["backends"]] == ["down", "up"] and m["workers_answered"] == 1

    def test_backend_in_some_workers_only(self) -> None:
        """A reload half applied: a backend one worker has and another not yet."""
        w1 = _snap(101, [_backend("a"), _backend("new", 9003)], {})
        w2 = _snap(102, [_backend("a")], {})
        w1["backends"][1]["requests"] = 3
        m = merge([w1, w2], pid=7, start_time=None, workers=2, workers_configured=2)
        assert [x["name"] for x in m["backends"]] == ["a", "new"]
        new = m["backends"][1]
        assert new["state"] == "up" and new["up_workers"] == 1 and new["requests"] == 3
        assert [w["pid"] for w in new["workers"]] == [101]

    def test_metrics_of_a_merged_snapshot(self) -> None:
        w1, w2 = _worker_views()
        m = merge([w1, w2], pid=7, start_time=5.0, workers=3, workers_configured=2)
        fams = parse_prometheus(metrics_text(m))
        for name in REQUIRED_METRICS:
            assert name in fams, name
        assert value_of(fams, "balrs_backend_requests_total", backend="a") == 15
        assert value_of(fams, "balrs_backend_active_requests", backend="a") == 3
        assert value_of(fams, "balrs_backend_up", backend="a") == 0
        assert value_of(fams, "balrs_backend_up_workers", backend="a") == 1
        assert value_of(fams, "balrs_backend_ejected", backend="a") == 1
        assert value_of(fams, "balrs_backend_response_seconds_count", backend="a") == 4
        assert value_of(fams, "balrs_backend_response_seconds_bucket", backend="a", le="+Inf") == 4
        assert value_of(fams, "balrs_responses_total", code="200") == 24
        assert value_of(fams, "balrs_client_connections") == 6
        assert value_of(fams, "balrs_workers") == 2
        assert value_of(fams, "balrs_workers_configured") == 2
        assert value_of(fams, "balrs_info", pid="7") == 1
        assert value_of(fams, "balrs_start_time_seconds") == 5.0
        # One process's snapshot has no worker families.
        single = parse_prometheus(metrics_text(w1))
        assert "balrs_workers" not in single and "balrs_backend_up_workers" not in single

    def test_status_of_a_merged_snapshot(self) -> None:
        w1, w2 = _worker_views()
        doc = status_of(merge([w1, w2], pid=7, start_time=5.0, workers=2, workers_configured=2))
        json.dumps(doc)
        assert (doc["pid"], doc["workers"], doc["workers_answered"], doc["worker_pids"]) == (7, 2, 2, [101, 102])
        a = doc["backends"][0]
        assert list(a)[:len(STATUS_BACKEND_KEYS)] == list(STATUS_BACKEND_KEYS)
        assert (a["requests"], a["active"], a["state"], a["ejected"], a["up_workers"]) == (15, 3, "down", True, 1)
        assert a["response_time_ms"] == pytest.approx(175.0)
        assert [w["pid"] for w in a["workers"]] == [101, 102]
        # One process's document has no worker keys.
        single = status_of(w1)
        assert "workers" not in single and "workers" not in single["backends"][0]


# =========================================================================================================
# The collector and a waiting AdminServer, in process on a reactor with a fake clock
# =========================================================================================================
class Loop:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(self.clock)

    def turn(self, times: int = 1) -> None:
        for _ in range(times):
            self.reactor.call_at(self.reactor.now, self.reactor.stop)
            self.reactor.run()

    def spin(self, pred: Callable[[], Any], timeout: float = 3.0) -> Any:
        end = time.monotonic() + timeout
        while True:
            self.turn()
            v = pred()
            if v or time.monotonic() > end:
                return v
            time.sleep(0.002)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.reactor.close()


def _worker_snapshot(pid: int, requests: int) -> Callable[[], Snapshot]:
    def take() -> Snapshot:
        b = _backend("a")
        b.requests = requests
        return _snap(pid, [b], {200: requests})
    return take


class Silent:
    """The worker end of a channel that nobody serves: the test reads the questions and answers by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.reader = FrameReader()

    def questions(self) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += self.reader.feed(data)

    def answer(self, msg_id: Any, snap: Snapshot) -> None:
        self.sock.sendall(encode_frame({"id": msg_id, "snapshot": snap}))


class TestCollector:
    def _collector(self, loop: Loop, configured: int = 2) -> SnapshotCollector:
        return SnapshotCollector(loop.reactor, lambda: configured, lambda: 99.0)

    def _worker(self, loop: Loop, col: SnapshotCollector, pid: int, requests: int) -> WorkerControl:
        ours, theirs = socket.socketpair()
        col.add(pid, ours)
        return WorkerControl(loop.reactor, theirs, _worker_snapshot(pid, requests))

    def test_all_answer(self, loop: Loop) -> None:
        col = self._collector(loop)
        ws = [self._worker(loop, col, 101, 3), self._worker(loop, col, 102, 4)]
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        col.collect(got.append)   # joins the round
        assert loop.spin(lambda: got)
        assert len(got) == 2 and got[0] is got[1]
        m = got[0]
        assert m is not None
        assert (m["workers"], m["workers_answered"], m["workers_configured"], m["start_time"]) == (2, 2, 2, 99.0)
        assert m["pid"] == os.getpid() and m["backends"][0]["requests"] == 7
        assert col.round is None
        for w in ws:
            w.close()
        assert loop.spin(lambda: not col.workers)

    def test_deadline_answers_with_what_arrived(self, loop: Loop) -> None:
        col = self._collector(loop)
        w = self._worker(loop, col, 101, 3)
        ours, theirs = socket.socketpair()
        col.add(102, ours)
        silent = Silent(theirs)
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        loop.turn(5)
        assert not got, "answered before the deadline"
        assert [q["op"] for q in silent.questions()] == ["snapshot"]
        loop.clock.t += COLLECT_TIMEOUT + 0.01
        assert loop.spin(lambda: got)
        m = got[0]
        assert m is not None and (m["workers"], m["workers_answered"], m["worker_pids"]) == (2, 1, [101])
        # The silent worker still owes an answer: the next round does not ask it again ...
        got.clear()
        col.collect(got.append)
        loop.turn(3)
        assert silent.questions() == []
        # ... and its late answer to the old round is dropped and the current question asked instead.
        silent.answer(1, _worker_snapshot(102, 50)())
        loop.turn(3)
        assert not got
        (q,) = silent.questions()
        assert q["id"] == 2
        silent.answer(q["id"], _worker_snapshot(102, 5)())
        assert loop.spin(lambda: got)
        m = got[0]
        assert m is not None and m["workers_answered"] == 2 and m["backends"][0]["requests"] == 8
        w.close()
        theirs.close()

    def test_worker_gone_mid_round(self, loop: Loop) -> None:
        col = self._collector(loop)
        self._worker(loop, col, 101, 3)
        ours, theirs = socket.socketpair()
        col.add(102, ours)
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        theirs.close()   # the worker died: EOF on its channel ends its part of the round
        assert loop.spin(lambda: got)
        m = got[0]
        assert m is not None and (m["workers"], m["workers_answered"]) == (2, 1)
        assert sorted(col.workers) == [101]
        col.remove(101)   # as after SIGCHLD
        col.remove(101)
        assert not col.workers

    def test_no_workers_no_answer(self, loop: Loop) -> None:
        col = self._collector(loop)
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        assert got == [None] and col.round is None

    def test_garbage_from_a_worker_closes_its_channel(self, loop: Loop) -> None:
        col = self._collector(loop)
        ours, theirs = socket.socketpair()
        col.add(102, ours)
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        theirs.sendall(b"\xff\xff\xff\xffnonsense")
        assert loop.spin(lambda: got)
        assert got == [None] and not col.workers
        theirs.settimeout(2)
        data = b""
        while True:   # the question, then EOF: closed by the supervisor
            piece = theirs.recv(4096)
            if not piece:
                break
            data += piece
        assert FrameReader().feed(data)[0]["op"] == "snapshot"
        theirs.close()

    def test_worker_side_answers_errors_and_unknown_ops(self, loop: Loop) -> None:
        ours, theirs = socket.socketpair()

        def broken() -> Snapshot:
            raise RuntimeError("bug")

        WorkerControl(loop.reactor, theirs, broken)
        replies: List[Dict[str, Any]] = []
        ch = Channel(loop.reactor, ours, replies.append)
        ch.send({"id": 1, "op": "snapshot"})
        ch.send({"id": 2, "op": "reboot"})
        assert loop.spin(lambda: len(replies) == 2)
        assert replies[0]["id"] == 1 and "bug" in replies[0]["error"] and "snapshot" not in replies[0]
        assert replies[1]["id"] == 2 and "unknown op" in replies[1]["error"]
        ch.close()

    def test_large_snapshot_crosses_in_pieces(self, loop: Loop) -> None:
        """A snapshot far larger than the socket buffer: written with backpressure, read in pieces."""
        backends = [_backend("b%04d" % i, 9000 + i) for i in range(4000)]
        big = _snap(101, backends, {200: 1})
        assert len(encode_frame(big)) > 1 << 20
        col = self._collector(loop)
        ours, theirs = socket.socketpair()
        col.add(101, ours)
        WorkerControl(loop.reactor, theirs, lambda: big)
        got: List[Optional[Snapshot]] = []
        col.collect(got.append)
        assert loop.spin(lambda: got, timeout=10)
        m = got[0]
        assert m is not None and len(m["backends"]) == 4000


class TestWaitingAdmin:
    """An AdminServer whose snapshot source answers later (as the supervisor's does)."""

    @pytest.fixture
    def admin(self, loop: Loop) -> Iterator[Any]:
        pending: List[Callable[[Optional[Snapshot]], None]] = []
        server = AdminServer(loop.reactor, [Address(HOST, free_port())], pending.append)
        server.start()
        port = server.listeners[0][0].getsockname()[1]

        def ask(path: str) -> socket.socket:
            s = socket.create_connection((HOST, port), timeout=2)
            s.setblocking(False)
            s.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
            return s

        def read_all(s: socket.socket) -> bytes:
            out = bytearray()

            def step() -> bool:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    return False
                out.extend(data)
                return not data

            assert loop.spin(step), "no answer; got %r" % bytes(out[:200])
            return bytes(out)

        yield SimpleNamespace(server=server, pending=pending, ask=ask, read_all=read_all)
        server.stop()

    def test_waits_for_the_snapshot(self, loop: Loop, admin: Any) -> None:
        s = admin.ask("/status")
        assert loop.spin(lambda: admin.pending)
        loop.turn(3)
        with pytest.raises(BlockingIOError):
            s.recv(10)   # nothing yet
        w1, w2 = _worker_views()
        admin.pending.pop()(merge([w1, w2], pid=7, start_time=None, workers=2, workers_configured=2))
        data = admin.read_all(s)
        assert data.startswith(b"HTTP/1.1 200 ")
        doc = json.loads(data.partition(b"\r\n\r\n")[2])
        assert doc["workers_answered"] == 2 and doc["backends"][0]["requests"] == 15
        s.close()

    def test_no_snapshot_is_503(self, loop: Loop, admin: Any) -> None:
        s = admin.ask("/metrics")
        assert loop.spin(lambda: admin.pending)
        admin.pending.pop()(None)
        assert admin.read_all(s).startswith(b"HTTP/1.1 503 ")
        s.close()

    def test_source_that_never_delivers(self, loop: Loop, admin: Any) -> None:
        s = admin.ask("/metrics")
        assert loop.spin(lambda: admin.pending)
        loop.clock.t += ADMIN_SEND_TIMEOUT + 0.1
        assert admin.read_all(s).startswith(b"HTTP/1.1 503 ")
        s.close()
        # A delivery after the connection ended is ignored.
        admin.pending.pop()(None)
        assert loop.spin(lambda: not admin.server.conns)

    def test_client_gone_while_waiting(self, loop: Loop, admin: Any) -> None:
        s = admin.ask("/status")
        assert loop.spin(lambda: admin.pending)
        s.close()
        w1, _w2 = _worker_views()
        admin.pending.pop()(w1)   # the write fails or lingers; nothing breaks
        loop.clock.t += 2.0
        assert loop.spin(lambda: not admin.server.conns)
        assert admin.server.accepting


# =========================================================================================================
# Real balrs processes, workers = 2
# =========================================================================================================
@pytest.fixture
def workers_lb(tmp_path: Path) -> Iterator[Callable[..., AdminLB]]:
    made: List[AdminLB] = []
    backends: List[TestBackend] = []

    def make(n: int = 3, **balancer: object) -> AdminLB:
        bs = [TestBackend("b%d" % i) for i in range(1, n + 1)]
        backends.extend(bs)
        balancer.setdefault("workers", 2)
        lb = start_admin_lb(tmp_path, bs, name="wlb%d" % len(made), **balancer)
        lb.backends = bs  # type: ignore[attr-defined]
        made.append(lb)
        # Both workers up and answering (a 503 is possible before the first worker answers at all).
        assert wait_for(lambda: _answered(lb) == 2, 10), lb.proc.log_tail()
        return lb

    yield make
    for lb in made:
        lb.proc.stop(5)
        assert "Traceback" not in lb.proc.log_text(), lb.proc.log_tail()
    for b in backends:
        b.stop()


def _answered(lb: AdminLB) -> int:
    r = lb.get("/status")
    return int(r.json()["workers_answered"]) if r.status == 200 else 0


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _spread_over_workers(lb: AdminLB, n: int) -> None:
    """``n`` requests, each on a fresh connection (SO_REUSEPORT spreads connections, not requests)."""
    for i in range(n):
        assert request(lb.addr, "GET", "/echo?i=%d" % i).status == 200


class TestWorkersProcess:
    def test_counts_are_summed_over_workers(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(3)
        bs: List[TestBackend] = lb.backends  # type: ignore[attr-defined]
        accepted0 = value_of(lb.metrics(), "balrs_accepted_connections_total")
        n = 60
        _spread_over_workers(lb, n)
        with Client(lb.addr) as c:   # and keep-alive: two requests, one connection
            for _ in range(2):
                c.send(build("GET", "/echo"))
                assert c.read_response().status == 200
        assert request(lb.addr, "GET", "/status/404").status == 404
        seen = {b.name: len(b.reqs()) for b in bs}
        assert sum(seen.values()) == n + 3

        doc = lb.status()
        assert doc["pid"] == lb.proc.pid and doc["workers"] == 2 and doc["workers_answered"] == 2
        assert doc["workers_configured"] == 2
        pids = doc["worker_pids"]
        assert len(set(pids)) == 2 and lb.proc.pid not in pids
        assert doc["strategy"] == "round_robin"
        for d, b in zip(doc["backends"], bs):
            for key in STATUS_BACKEND_KEYS:
                assert key in d, key
            assert (d["name"], d["address"], d["state"], d["weight"], d["active"], d["failures"]) == (
                b.name, b.address, "up", 1, 0, 0)
            assert d["requests"] == seen[b.name]
            assert d["up_workers"] == 2
            assert sorted(w["pid"] for w in d["workers"]) == sorted(pids)
            assert all(w["state"] == "up" for w in d["workers"])
            assert sum(w["requests"] for w in d["workers"]) == seen[b.name]
        # Both workers took traffic (60 fresh connections over two SO_REUSEPORT sockets).
        per_worker = {pid: sum(w["requests"] for d in doc["backends"] for w in d["workers"] if w["pid"] == pid)
                      for pid in pids}
        assert all(v > 0 for v in per_worker.values()), per_worker
        assert doc["responses"] == {"200": n + 2, "404": 1}

        fams = lb.metrics()
        for name in REQUIRED_METRICS:
            assert name in fams, name
        for b in bs:
            assert value_of(fams, "balrs_backend_requests_total", backend=b.name) == seen[b.name]
            assert value_of(fams, "balrs_backend_response_seconds_count", backend=b.name) == seen[b.name]
            assert value_of(fams, "balrs_backend_up", backend=b.name) == 1
            assert value_of(fams, "balrs_backend_up_workers", backend=b.name) == 2
            assert value_of(fams, "balrs_backend_active_requests", backend=b.name) == 0
            assert value_of(fams, "balrs_backend_failures_total", backend=b.name) == 0
        assert value_of(fams, "balrs_workers") == 2
        assert value_of(fams, "balrs_responses_total", code="200") == n + 2
        assert value_of(fams, "balrs_responses_total", code="404") == 1
        assert value_of(fams, "balrs_accepted_connections_total") == accepted0 + n + 2
        assert value_of(fams, "balrs_info", pid=str(lb.proc.pid)) == 1
        assert wait_for(lambda: value_of(lb.metrics(), "balrs_client_connections") == 0, 3.0)

    def test_open_connections_summed(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        clients = [Client(lb.addr) for _ in range(8)]
        try:
            clients[0].send(build("GET", "/delay/1000"))
            assert wait_for(lambda: value_of(lb.metrics(), "balrs_client_connections") == 8, 3.0)
            fams = lb.metrics()
            assert value_of(fams, "balrs_backend_active_requests", backend="b1") == 1
            assert clients[0].read_response().status == 200
        finally:
            for c in clients:
                c.close()

    def test_killed_worker_is_replaced(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(2)
        _spread_over_workers(lb, 10)
        old = lb.status()["worker_pids"]
        victim = old[0]
        os.kill(victim, signal.SIGKILL)
        # The endpoint keeps answering throughout (with one worker while the other restarts).
        t_end = time.monotonic() + 10
        while True:
            doc = lb.status()
            assert doc["workers_answered"] >= 1
            if doc["workers_answered"] == 2 and victim not in doc["worker_pids"]:
                break
            assert time.monotonic() < t_end, "worker not replaced: %s\n%s" % (doc, lb.proc.log_tail())
            time.sleep(0.05)
        new = doc["worker_pids"]
        assert old[1] in new and len(set(new)) == 2
        _spread_over_workers(lb, 4)
        assert lb.get("/metrics").status == 200
        assert "restarting" in lb.proc.log_text()

    def test_stuck_worker_costs_the_deadline_only(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        pids = lb.status()["worker_pids"]
        os.kill(pids[0], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            doc = lb.status()
            took = time.monotonic() - t0
            assert (doc["workers"], doc["workers_answered"], doc["worker_pids"]) == (2, 1, [pids[1]])
            assert COLLECT_TIMEOUT - 0.05 <= took < COLLECT_TIMEOUT + 1.0, took
            fams = lb.metrics()
            assert value_of(fams, "balrs_workers") == 1 and value_of(fams, "balrs_workers_configured") == 2
        finally:
            os.kill(pids[0], signal.SIGCONT)
        assert wait_for(lambda: lb.status()["workers_answered"] == 2, 5)
        assert "no snapshot from worker(s) %d" % pids[0] in lb.proc.log_text()

    def test_parallel_scrapes(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(2)
        clients = [Client(lb.admin) for _ in range(20)]
        try:
            for i, c in enumerate(clients):
                c.send(build("GET", "/metrics" if i % 2 else "/status", [("Connection", "close")]))
            for i, c in enumerate(clients):
                r = c.read_response()
                assert r.status == 200
                if i % 2:
                    assert value_of(parse_prometheus(r.body.decode("utf-8")), "balrs_workers") == 2
                else:
                    assert r.json()["workers_answered"] == 2
        finally:
            for c in clients:
                c.close()

    def test_http_behaviour_unchanged(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        assert lb.get("/nope").status == 404
        r = lb.get("/metrics", method="POST")
        assert r.status == 405 and r.header("Allow") == "GET, HEAD"
        r = lb.get("/")
        assert r.status == 200 and b"/metrics" in r.body
        with Client(lb.admin) as c:
            c.send(build("HEAD", "/status", [("Connection", "close")]))
            r = c.read_response("HEAD")
            assert r.status == 200 and int(r.header("Content-Length") or 0) > 0
            assert c.wait_closed(3)[:2] == (True, b"")

    def test_status_command(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(2)
        bs: List[TestBackend] = lb.backends  # type: ignore[attr-defined]
        _spread_over_workers(lb, 8)
        rc, out, err = run_balrs("status", "%s:%d" % lb.admin)
        assert rc == 0, err
        assert "backends 2/2 up" in out and "strategy round_robin" in out
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("b")}
        for b in bs:
            assert rows[b.name][1] == b.address and rows[b.name][2] == "up"
            assert int(rows[b.name][5]) == len(b.reqs())
        rc, out, err = run_balrs("status", "--json", "%s:%d" % lb.admin)
        assert rc == 0, err
        assert json.loads(out)["workers_answered"] == 2

    def test_sigterm_exits_0_and_leaves_no_process(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        pids = lb.status()["worker_pids"]
        assert all(_alive(p) for p in pids)
        lb.proc.signal(signal.SIGTERM)
        assert lb.proc.wait_exit(10) == 0, lb.proc.log_tail()
        assert wait_for(lambda: not any(_alive(p) for p in pids), 5), [p for p in pids if _alive(p)]
        assert not can_connect(lb.admin) and not can_connect(lb.addr)

    def test_scrape_during_drain(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1, drain_timeout="5s")
        box: Dict[str, Any] = {}

        def slow() -> None:
            box["r"] = request(lb.addr, "GET", "/delay/1000", timeout=10)

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        assert wait_for(lambda: value_of(lb.metrics(), "balrs_backend_active_requests", backend="b1") == 1, 3)
        lb.proc.signal(signal.SIGTERM)
        # The worker with the request in flight drains and still answers the supervisor.
        assert wait_for(lambda: lb.status()["draining"], 3)
        doc = lb.status()
        assert doc["backends"][0]["active"] == 1
        t.join(10)
        assert box["r"].status == 200
        assert lb.proc.wait_exit(10) == 0

    def test_reload_moves_the_admin_endpoint(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        bs: List[TestBackend] = lb.backends  # type: ignore[attr-defined]

        def write(admin_port: int) -> None:
            text = lb_ini("127.0.0.1:%d" % lb.addr[1], bs, workers=2)
            lb.proc.config_path.write_text(text + "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin_port)

        # A port that is taken: the reload fails as a whole and the endpoint stays.
        taken = socket.socket()
        taken.bind((HOST, 0))
        taken.listen(1)
        try:
            write(taken.getsockname()[1])
            lb.proc.signal(signal.SIGHUP)
            assert wait_for(lambda: "reload failed" in lb.proc.log_text(), 5), lb.proc.log_tail()
        finally:
            taken.close()
        assert lb.status()["workers_answered"] == 2
        # A free port: the supervisor moves there; the old one is closed everywhere (no worker holds it).
        old = lb.admin
        new_port = free_port()
        write(new_port)
        lb.proc.signal(signal.SIGHUP)
        lb.admin = (HOST, new_port)
        assert wait_for(lambda: can_connect(lb.admin), 5), lb.proc.log_tail()
        assert not can_connect(old)
        assert lb.status()["workers_answered"] == 2
        # A worker forked after the move does not hold the new port either: kill one, then move back.
        victim = lb.status()["worker_pids"][0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: victim not in lb.status()["worker_pids"]
                        and lb.status()["workers_answered"] == 2, 10)
        write(old[1])
        lb.proc.signal(signal.SIGHUP)
        lb.admin = old
        assert wait_for(lambda: can_connect(old), 5), lb.proc.log_tail()
        assert not can_connect((HOST, new_port))
        assert lb.status()["workers_answered"] == 2

    def test_workers_do_not_hold_the_admin_socket(self, workers_lb: Callable[..., AdminLB]) -> None:
        lb = workers_lb(1)
        inodes = _listening_inodes(lb.admin[1])
        assert inodes
        assert inodes & _socket_inodes(lb.proc.pid)
        for pid in lb.status()["worker_pids"]:
            assert not inodes & _socket_inodes(pid), pid


def test_admin_port_taken_fails_cleanly(tmp_path: Path) -> None:
    """workers = 2: the supervisor binds [admin] listen before forking; a taken port is one error line."""
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        path = tmp_path / "lb.ini"
        path.write_text(lb_ini("127.0.0.1:%d" % free_port(), [], workers=2)
                        + "\n[backend b1]\naddress = 127.0.0.1:1\n\n[admin]\nlisten = 127.0.0.1:%d\n" % port)
        rc, _out, err = run_balrs(str(path))
    finally:
        taken.close()
    assert rc == 2, err
    assert "Traceback" not in err
    assert "[admin] listen: cannot listen on 127.0.0.1:%d" % port in err
    assert len(err.strip().splitlines()) == 1, err


def _listening_inodes(port: int) -> set:
    out = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                out.add(inode)
    return out


def _socket_inodes(pid: int) -> set:
    out = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out

