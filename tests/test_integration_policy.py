"""Integration: the traffic policy (CONTRACT.md "Traffic policy": retry_on, retries, retry_budget, passive
ejection of retried failures, panic_threshold, sticky cookies, client_rate, client_connections, and their
[pool NAME] overrides) against the real ``python -m balrs lb.ini``.

``PolicyBackend`` is the suite's ``TestBackend`` with a switchable failure mode (a status with a body and
headers of its own, close without a byte, never answer) and a health endpoint whose status the test sets.
It always answers ``Connection: close``, so balrs never reuses a backend connection here and every
backend request seen is one attempt (no stale-connection resends blur the counts).

Per-client tests bind the client socket to 127.0.0.2 / 127.0.0.3 (all of 127/8 is loopback on Linux).
Every wait is on an event (a response, a log line, a socket state, /status or /metrics); processes are
stopped by PID in teardown.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from support import (
    HOST,
    BalrsProcess,
    Client,
    BALANCER_DEFAULTS,
    Response,
    start_config,
    TestBackend,
    build,
    chunk_encode,
    request,
    sha,
    wait_for,
)

from balrs.sticky import Sticky, sticky_key

FAIL_REASON = "Policy Failure"
FAST_HEALTH = {"path": "/health", "interval": "200ms", "timeout": "500ms", "rise": "2", "fall": "2"}

# ---------------------------------------------------------------------------------------------------- rig


class PolicyBackend(TestBackend):
    """``mode``: ``ok`` (the TestBackend's answers), ``status`` (``fail_status`` with a body and an X-Leak
    header only this backend sends, reason ``Policy Failure``), ``close`` (read the request, close without
    a byte), ``hang`` (read the request, never answer). /health answers ``health_status``; those requests
    go to ``health_records``. Every answer carries ``Connection: close``."""

    __test__ = False

    def __init__(self, name: str) -> None:
        self.mode = "ok"
        self.fail_status = 503
        self.health_status = 200
        self.health_records: List[Dict[str, Any]] = []
        super().__init__(name)

    def leak_body(self) -> bytes:
        return ("%s-SECRET-FAILURE-BODY" % self.name).encode()

    def set(self, mode: str = "ok", status: int = 503) -> None:
        self.mode, self.fail_status = mode, status

    def reset(self) -> None:
        with self.lock:
            self.records = []
            self.health_records = []

    def _dispatch(self, sock: Any, rd: Any, rec: Dict[str, Any], path: str, method: str, version: str,
                  headers: List[Tuple[str, str]], keep_alive: bool, state: Dict[str, bool]) -> bool:
        if path.startswith("/health"):
            with self.lock:
                self.records = [r for r in self.records if r is not rec]
                self.health_records.append(rec)
            body = b"health\n"
            self._send(sock, self.health_status, [("Content-Length", str(len(body))), ("Connection", "close")],
                       body, method == "HEAD")
            return False
        mode = self.mode
        if mode == "status":
            body = self.leak_body()
            self._send(sock, self.fail_status, [("Content-Length", str(len(body))), ("X-Leak", self.name),
                                                ("Connection", "close")], body, method == "HEAD", reason=FAIL_REASON)
            return False
        if mode == "close":
            return False
        if mode == "hang":
            self._hang(sock)
            return False
        return super()._dispatch(sock, rd, rec, path, method, version, headers, False, state)


class SourceClient(Client):
    """``support.Client`` from a given source address (bound before connect)."""

    def __init__(self, addr: Tuple[str, int], source: str, timeout: float = 5.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.settimeout(3.0)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.reset = False


BASE_KEYS: Dict[str, object] = dict(BALANCER_DEFAULTS, drain_timeout="1s")


def make_ini(port: int, admin_port: Optional[int], keys: Dict[str, object],
             backends: Sequence[Tuple[TestBackend, Optional[str]]], extra: str = "",
             health: Optional[Dict[str, str]] = None) -> str:
    merged = dict(BASE_KEYS)
    merged.update(keys)
    lines = ["[balancer]", "listen = 127.0.0.1:%d" % port]
    lines += ["%s = %s" % (k, v) for k, v in merged.items() if v is not None]
    for b, pool in backends:
        lines += ["", "[backend %s]" % b.name, "address = %s" % b.address]
        if pool:
            lines.append("pool = %s" % pool)
    if health is not None:
        lines += ["", "[health]"] + ["%s = %s" % kv for kv in health.items()]
    if admin_port is not None:
        lines += ["", "[admin]", "listen = 127.0.0.1:%d" % admin_port]
    return "\n".join(lines) + "\n" + extra


def launch(workdir: Path, name: str, backends: Sequence[Tuple[TestBackend, Optional[str]]], admin: bool = False,
           extra: str = "", health: Optional[Dict[str, str]] = None, **keys: object) -> BalrsProcess:
    """A balrs process on free ports (new ones if a port was taken meanwhile), listening when returned."""
    return start_config(workdir, lambda port, admin_port: make_ini(port, admin_port, keys, backends, extra, health),
                        name=name, admin=admin)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., BalrsProcess]]:
    made: List[BalrsProcess] = []

    def make(backends: Sequence[Any], **kw: Any) -> BalrsProcess:
        specs = [b if isinstance(b, tuple) else (b, None) for b in backends]
        lb = launch(tmp_path, "lb%d" % (len(made) + 1), specs, **kw)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


@pytest.fixture
def pbackends() -> Iterator[Callable[..., List[PolicyBackend]]]:
    made: List[PolicyBackend] = []

    def make(*names: str) -> List[PolicyBackend]:
        bs = [PolicyBackend(n) for n in names]
        made.extend(bs)
        return bs

    yield make
    for b in made:
        b.stop()


def get(lb: BalrsProcess, target: str = "/echo", headers: Sequence[Tuple[str, str]] = (), method: str = "GET",
        body: Optional[bytes] = None) -> Response:
    return request(lb.addr, method, target, list(headers), body)


def served(r: Response) -> Optional[str]:
    return r.header("x-backend")


def total(bs: Sequence[TestBackend]) -> int:
    return sum(len(b.reqs()) for b in bs)


def metrics(lb: BalrsProcess) -> Dict[str, float]:
    assert lb.admin_addr is not None
    r = request(lb.admin_addr, "GET", "/metrics")
    assert r.status == 200, r
    out: Dict[str, float] = {}
    for line in r.body.decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def status_doc(lb: BalrsProcess) -> Dict[str, Any]:
    assert lb.admin_addr is not None
    r = request(lb.admin_addr, "GET", "/status")
    assert r.status == 200, r
    doc: Dict[str, Any] = json.loads(r.body)
    return doc


def backend_status(lb: BalrsProcess, name: str) -> Dict[str, Any]:
    for b in status_doc(lb)["backends"]:
        if b["name"] == name:
            return dict(b)
    raise AssertionError("no backend %s in /status" % name)


def assert_clean_answer_from(r: Response, want: str, failing: Sequence[PolicyBackend]) -> None:
    """``r`` is ``want``'s answer and carries nothing of the failed attempts' responses."""
    assert r.status == 200, (r, r.body[:200])
    assert r.header_all("x-backend") == [want], r.headers
    assert r.header("x-leak") is None, r.headers
    assert FAIL_REASON.encode() not in r.raw_head
    for f in failing:
        assert f.leak_body() not in r.body
    assert json.loads(r.body)["backend"] == want


# --------------------------------------------------------------- retry_on, retries: one shared balancer with four pools
#
#   pool retry: retry_on = 502, 503, empty-response, timeout r1 r2    /retry/...
#   pool plain: [balancer]'s retry_on (connect-failure)     p1 p2     /plain/...
#   pool tri:   retry_on = 503, retries = 1                 t1 t2 t3  /tri/...
#   pool tri2:  retry_on = 503, retries = 2                 u1 u2 u3  /tri2/...
#
# backend_timeout = 300ms; eject_after = 0 (no ejection carries over between tests); retry_budget = 100%
# (with at most one retry per request in the retry pool the budget never refuses one).

RIG_POOLS = {"retry": ("r1", "r2"), "plain": ("p1", "p2"), "tri": ("t1", "t2", "t3"), "tri2": ("u1", "u2", "u3")}
RIG_EXTRA = """
[pool retry]
retry_on = 502, 503, empty-response, timeout

[pool plain]
strategy = round_robin

[pool tri]
retry_on = 503
retries = 1

[pool tri2]
retry_on = 503
retries = 2

[route retry]
path_prefix = /retry/
pool = retry

[route plain]
path_prefix = /plain/
pool = plain

[route tri]
path_prefix = /tri/
pool = tri

[route tri2]
path_prefix = /tri2/
pool = tri2
"""


class Rig:
    def __init__(self, lb: BalrsProcess, backends: Dict[str, PolicyBackend]) -> None:
        self.lb = lb
        self.b = backends

    def pool(self, name: str) -> List[PolicyBackend]:
        return [self.b[n] for n in RIG_POOLS[name]]


@pytest.fixture(scope="module")
def _rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    bs: Dict[str, PolicyBackend] = {}
    specs: List[Tuple[TestBackend, Optional[str]]] = []
    try:
        for pool, names in RIG_POOLS.items():
            for n in names:
                bs[n] = PolicyBackend(n)
                specs.append((bs[n], pool))
        lb = launch(tmp_path_factory.mktemp("policy-rig"), "rig", specs, extra=RIG_EXTRA, backend_timeout="300ms",
                    eject_after="0", retry_budget="100%")
        try:
            yield Rig(lb, bs)
        finally:
            lb.stop()
    finally:
        for b in bs.values():
            b.stop()


def _fresh(backends: Dict[str, "PolicyBackend"]) -> None:
    """Every backend of a shared rig back to answering 200, with nothing recorded."""
    for b in backends.values():
        b.set("ok")
        b.reset()


@pytest.fixture
def rig(_rig: Rig) -> Iterator[Rig]:
    _fresh(_rig.b)
    yield _rig
    assert _rig.lb.alive(), "balrs exited during this test; stderr:\n%s" % _rig.lb.log_tail()


def test_retry_on_503_get_goes_to_the_other_backend_and_nothing_of_the_503_leaks(rig: Rig) -> None:
    r1, r2 = rig.pool("retry")
    r1.set("status", 503)
    for i in range(4):
        with Client(rig.lb.addr) as c:
            c.send(build("GET", "/retry/get?i=%d" % i, [("Connection", "close")]))
            r = c.read_response()
            assert_clean_answer_from(r, "r2", [r1])
            closed, after, _ = c.wait_closed(3.0)
            assert closed and after == b"", "bytes after the response: %r" % after[:200]
    # Round robin sends every other first attempt to r1; each of those was retried on r2.
    assert 1 <= len(r1.reqs()) <= 3
    assert len(r2.reqs()) == 4
    # Keep-alive: a retried response does not disturb the next one on the same connection.
    with Client(rig.lb.addr) as c:
        for i in range(3):
            c.send(build("GET", "/retry/ka?i=%d" % i))
            assert_clean_answer_from(c.read_response(), "r2", [r1])
        assert c.buf == b""


@pytest.mark.parametrize("status, retried", [(502, True), (504, False)])
def test_retry_on_only_the_listed_statuses(rig: Rig, status: int, retried: bool) -> None:
    r1, r2 = rig.pool("retry")
    r1.set("status", status)
    got = [get(rig.lb, "/retry/st?i=%d" % i) for i in range(4)]
    assert r1.reqs(), "no first attempt reached r1"
    if retried:
        for r in got:
            assert_clean_answer_from(r, "r2", [r1])
        assert len(r2.reqs()) == 4
    else:
        bad = [r for r in got if r.status == status]
        assert len(bad) == len(r1.reqs()) and all(r.body == r1.leak_body() for r in bad)
        assert total([r1, r2]) == 4


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_retry_on_503_never_retries_a_non_idempotent_request(rig: Rig, method: str) -> None:
    bs = rig.pool("retry")
    for b in bs:
        b.set("status", 503)
    for i in range(3):
        r = get(rig.lb, "/retry/order?i=%d" % i, method=method, body=b"order=%d" % i)
        assert r.status == 503
        assert served(r) in ("r1", "r2") and r.body == rig.b[str(served(r))].leak_body()  # forwarded as is
        assert total(bs) == i + 1, "a %s was sent to %d backends" % (method, total(bs) - i)


def _send_body(lb: BalrsProcess, method: str, target: str, body: bytes, framing: str) -> Response:
    if framing == "cl":
        data = build(method, target, [("Connection", "close")], body)
    else:
        pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        data = build(method, target, [("Connection", "close"), ("Transfer-Encoding", "chunked")],
                     chunk_encode(pieces))
    with Client(lb.addr, timeout=8.0) as c:
        c.send(data)
        return c.read_response(method)


@pytest.mark.parametrize("method, framing", [("PUT", "cl"), ("PUT", "chunked"), ("DELETE", "cl")])
def test_retry_on_503_replays_a_small_body_intact(rig: Rig, method: str, framing: str) -> None:
    r1, r2 = rig.pool("retry")
    r1.set("status", 503)
    body = os.urandom(10 * 1024)
    for i in range(3):
        r = _send_body(rig.lb, method, "/retry/put?i=%d" % i, body, framing)
        assert_clean_answer_from(r, "r2", [r1])
        info = r.json()
        assert (info["method"], info["body_len"], info["body_sha256"]) == (method, len(body), sha(body))
        assert info["framing"] == framing
    first = r1.reqs()
    assert first, "no first attempt reached r1: the replay was not exercised"
    for rec in first + r2.reqs():
        assert rec["complete"] and rec["body_len"] == len(body) and rec["body_sha"] == sha(body), rec["backend"]


@pytest.mark.parametrize("framing", ["cl", "chunked"])
def test_retry_on_503_not_for_a_body_over_64k(rig: Rig, framing: str) -> None:
    bs = rig.pool("retry")
    for b in bs:
        b.set("status", 503)
    small = os.urandom(10 * 1024)
    r = _send_body(rig.lb, "PUT", "/retry/small", small, framing)
    assert r.status == 503
    assert total(bs) == 2  # control: a small body is replayed on the other backend
    assert [rec["body_sha"] for rec in rig.b["r1"].reqs() + rig.b["r2"].reqs()] == [sha(small)] * 2
    for b in bs:
        b.reset()
    big = os.urandom(100 * 1024)
    r = _send_body(rig.lb, "PUT", "/retry/big", big, framing)
    assert r.status == 503 and r.body == rig.b[str(served(r))].leak_body()
    recs = rig.b["r1"].reqs() + rig.b["r2"].reqs()
    assert len(recs) == 1, "a %d-byte body was sent %d times" % (len(big), len(recs))
    assert recs[0]["body_sha"] == sha(big)


@pytest.mark.parametrize("framing", ["cl", "chunked"])
def test_retry_on_503_body_of_exactly_64k_is_replayed_and_one_byte_more_is_not(rig: Rig, framing: str) -> None:
    # For a chunked body the limit is on the decoded body, not on its framing.
    bs = rig.pool("retry")
    for b in bs:
        b.set("status", 503)
    for size, sends in ((65536, 2), (65537, 1)):
        for b in bs:
            b.reset()
        body = os.urandom(size)
        assert _send_body(rig.lb, "PUT", "/retry/edge", body, framing).status == 503
        assert total(bs) == sends, "%d-byte body: %d backend requests" % (size, total(bs))


def test_empty_response_retried_only_where_listed(rig: Rig) -> None:
    r1, r2 = rig.pool("retry")
    r1.set("close")
    for i in range(3):
        assert_clean_answer_from(get(rig.lb, "/retry/empty?i=%d" % i), "r2", [r1])
    assert r1.reqs() and len(r2.reqs()) == 3
    # The plain pool (default retry_on: connect-failure only): 502, one attempt each.
    p = rig.pool("plain")
    for b in p:
        b.set("close")
    for i in range(3):
        assert get(rig.lb, "/plain/empty?i=%d" % i).status == 502
        assert total(p) == i + 1


def test_empty_response_post_is_not_retried(rig: Rig) -> None:
    bs = rig.pool("retry")
    for b in bs:
        b.set("close")
    for i in range(2):
        assert get(rig.lb, "/retry/p?i=%d" % i, method="POST", body=b"a=%d" % i).status == 502
        assert total(bs) == i + 1


def test_timeout_retried_only_where_listed(rig: Rig) -> None:
    r1, r2 = rig.pool("retry")
    r1.set("hang")
    for i in range(3):
        t0 = time.monotonic()
        r = get(rig.lb, "/retry/slow?i=%d" % i)
        took = time.monotonic() - t0
        assert_clean_answer_from(r, "r2", [r1])
        assert took < 4.0
    assert r1.reqs(), "no first attempt reached r1"
    p = rig.pool("plain")
    for b in p:
        b.set("hang")
    for i in range(2):
        t0 = time.monotonic()
        assert get(rig.lb, "/plain/slow?i=%d" % i).status == 504
        assert 0.2 <= time.monotonic() - t0 < 4.0
        assert total(p) == i + 1


@pytest.mark.parametrize("pool, attempts", [("tri", 2), ("tri2", 3)])
def test_retries_bounds_every_retry_each_on_a_new_backend(rig: Rig, pool: str, attempts: int) -> None:
    bs = rig.pool(pool)
    for b in bs:
        b.set("status", 503)
    r = get(rig.lb, "/%s/x" % pool)
    assert r.status == 503
    seen = [rec["backend"] for rec in sorted((rec for b in bs for rec in b.reqs()), key=lambda rec: rec["t"])]
    assert len(seen) == attempts, seen
    assert len(set(seen)) == attempts, "a retry went back to a backend already tried: %s" % seen
    assert served(r) == seen[-1]  # the client gets the last attempt's answer


def test_pool_overrides_retry_on(rig: Rig) -> None:
    """[pool retry] sets retry_on = 503; [pool plain] keeps [balancer]'s (connect-failure)."""
    r1, r2 = rig.pool("retry")
    p1, p2 = rig.pool("plain")
    r1.set("status", 503)
    p1.set("status", 503)
    for i in range(4):
        assert_clean_answer_from(get(rig.lb, "/retry/o?i=%d" % i), "r2", [r1])
    got = [get(rig.lb, "/plain/o?i=%d" % i) for i in range(4)]
    assert [served(r) for r in got if r.status == 503] == ["p1"] * len(p1.reqs())
    assert len(p1.reqs()) >= 1 and total([p1, p2]) == 4


# ---------------------------------------------------------------------------------------------------- retry budget


def test_retry_budget_caps_retries_and_counts_them(spawn: Callable[..., BalrsProcess],
                                                   pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("k1", "k2")
    for b in bs:
        b.set("status", 503)
    lb = spawn(bs, admin=True, retry_on="503", retry_budget="0%", retries="1", eject_after="0")
    before = metrics(lb)
    statuses = []
    t0 = time.monotonic()
    with Client(lb.addr) as c:
        for i in range(30):
            c.send(build("GET", "/budget?i=%d" % i))
            statuses.append(c.read_response().status)
    t1 = time.monotonic()
    seconds = int(t1) - int(t0) + 1  # balrs's slots are whole seconds of CLOCK_MONOTONIC, like ours
    retries = total(bs) - 30
    assert statuses == [503] * 30
    assert 3 <= retries <= 3 * (seconds + 1), "%d retries over %d second(s) with retry_budget 0%%" % (retries, seconds)
    m = metrics(lb)
    assert m["balrs_retries_total"] - before.get("balrs_retries_total", 0) == retries
    assert m['balrs_pool_retries_total{pool="default"}'] == retries
    exhausted = m["balrs_retries_budget_exhausted_total"] - before.get("balrs_retries_budget_exhausted_total", 0)
    assert exhausted > 0
    assert exhausted == 30 - retries  # every request had one retry to make: allowed or refused
    lb.wait_log("retry budget exhausted")


def test_retry_budget_is_a_share_of_first_attempts(spawn: Callable[..., BalrsProcess],
                                                   pbackends: Callable[..., List[PolicyBackend]]) -> None:
    k1, k2 = pbackends("k1", "k2")
    k1.set("status", 503)
    lb = spawn([k1, k2], admin=True, retry_on="503", retry_budget="20%", retries="1", eject_after="0")
    t0 = time.monotonic()
    with Client(lb.addr) as c:
        statuses = []
        for i in range(40):
            c.send(build("GET", "/share?i=%d" % i))
            statuses.append(c.read_response().status)
    seconds = int(time.monotonic()) - int(t0) + 1
    retries = total([k1, k2]) - 40
    first_on_k1 = len(k1.reqs())
    assert first_on_k1 == 20  # round robin; a retry does not move the cycle on
    assert statuses.count(503) == first_on_k1 - retries
    # 20% of 40 first attempts, plus at most the floor of 3 in each further second.
    assert 6 <= retries <= 0.2 * 40 + 3 * (seconds - 1) + 1, (retries, seconds)
    assert metrics(lb)["balrs_retries_total"] == retries


def test_connect_failure_retries_are_not_charged_to_the_budget(
        spawn: Callable[..., BalrsProcess], make_backend: Callable[..., Any]) -> None:
    dead = make_backend("dead", "dead")
    live = make_backend("live")
    lb = spawn([dead, live], admin=True, retry_budget="0%", retries="1", eject_after="0")
    with Client(lb.addr) as c:
        for i in range(30):
            c.send(build("GET", "/conn?i=%d" % i))
            r = c.read_response()
            assert r.status == 200 and served(r) == "live", (i, r)
    m = metrics(lb)
    assert m["balrs_retries_total"] == 15  # every other first attempt went to the refused port
    assert m["balrs_retries_budget_exhausted_total"] == 0


# ---------------------------------------------------------------------------------------------------- passive ejection


def test_retried_503s_eject_the_backend(spawn: Callable[..., BalrsProcess],
                                        pbackends: Callable[..., List[PolicyBackend]]) -> None:
    e1, e2 = pbackends("e1", "e2")
    e1.set("status", 503)
    lb = spawn([e1, e2], admin=True, retry_on="503", eject_after="2", eject_cooldown="30s")
    answers: List[Response] = []

    def one_then_ejected() -> bool:
        answers.append(get(lb, "/eject?i=%d" % len(answers)))
        return bool(backend_status(lb, "e1")["ejected"])

    assert wait_for(one_then_ejected, 10.0, 0.0), "e1 not ejected after %d requests; /status: %s" % (
        len(answers), backend_status(lb, "e1"))
    assert all(r.status == 200 and served(r) == "e2" for r in answers)
    assert len(e1.reqs()) == 2  # eject_after = 2 consecutive failures
    lb.wait_log("backend e1 ejected")
    n1 = len(e1.reqs())
    for i in range(10):
        r = get(lb, "/after?i=%d" % i)
        assert r.status == 200 and served(r) == "e2"
    assert len(e1.reqs()) == n1, "an ejected backend still got requests"
    st = backend_status(lb, "e1")
    assert st["ejected"] is True and st["state"] == "down" and st["consecutive_errors"] >= 2, st
    st2 = backend_status(lb, "e2")
    assert st2["ejected"] is False and st2["state"] == "up", st2


# ---------------------------------------------------------------------------------------------------- panic_threshold


def _spread(lb: BalrsProcess, bs: Sequence[PolicyBackend], n: int) -> Dict[str, int]:
    before = {b.name: len(b.reqs()) for b in bs}
    for i in range(n):
        r = get(lb, "/spread?i=%d" % i)
        assert r.status == 200, r
    return {b.name: len(b.reqs()) - before[b.name] for b in bs}


def test_panic_threshold_balances_over_all_and_logs_once_each_way(
        spawn: Callable[..., BalrsProcess], pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("h1", "h2", "h3", "h4")
    lb = spawn(bs, admin=True, health=FAST_HEALTH, panic_threshold="50%")
    assert wait_for(lambda: all(b.health_records for b in bs), 5.0), "not every backend was probed"
    for b in bs[:3]:
        b.health_status = 500
    lb.wait_log("is DOWN", count=3, timeout=8.0)
    entered = lb.wait_log("below panic_threshold", timeout=3.0)
    assert "1 of 4" in entered
    assert metrics(lb)['balrs_pool_panic{pool="default"}'] == 1
    got = _spread(lb, bs, 40)
    assert all(v >= 5 for v in got.values()), "1 of 4 up, panic_threshold 50%%: traffic %s" % got
    for b in bs[:3]:
        b.health_status = 200
    left = lb.wait_log("out of panic", timeout=8.0)
    assert "2 of 4" in left
    lb.wait_log("is UP again", count=3, timeout=8.0)
    log = lb.log_text()
    assert log.count("below panic_threshold") == 1 and log.count("out of panic") == 1, log
    assert metrics(lb)['balrs_pool_panic{pool="default"}'] == 0
    got = _spread(lb, bs, 20)
    assert all(v >= 3 for v in got.values()), got


def test_reload_turning_panic_off_ends_the_panic(spawn: Callable[..., BalrsProcess],
                                                 pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("q1", "q2", "q3", "q4")
    lb = spawn(bs, admin=True, health=FAST_HEALTH, panic_threshold="50%")
    for b in bs[:3]:
        b.health_status = 500
    lb.wait_log("below panic_threshold", timeout=8.0)
    lb.config_path.write_text(lb.config_path.read_text().replace("panic_threshold = 50%", "panic_threshold = 0%"))
    mark = lb.log_mark()
    lb.signal(signal.SIGHUP)
    lb.wait_log("reloaded:", since=mark, timeout=5.0)
    assert _spread(lb, bs, 8) == {"q1": 0, "q2": 0, "q3": 0, "q4": 8}
    assert [p["panic"] for p in status_doc(lb)["pools"]] == [False]
    assert metrics(lb)['balrs_pool_panic{pool="default"}'] == 0


def test_no_panic_threshold_uses_only_the_healthy_backend(
        spawn: Callable[..., BalrsProcess], pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("g1", "g2", "g3", "g4")
    lb = spawn(bs, health=FAST_HEALTH)
    for b in bs[:3]:
        b.health_status = 500
    lb.wait_log("is DOWN", count=3, timeout=8.0)
    got = _spread(lb, bs, 20)
    assert got == {"g1": 0, "g2": 0, "g3": 0, "g4": 20}, got
    assert "panic" not in lb.log_text()


# ---------------------------------------------------------------------------------------------------- sticky cookies

SECRET_A = "first-secret-0123456789"
SECRET_B = "second-secret-0123456789"
STICKY_NAMES = ("s1", "s2", "s3")


def cookie_of(r: Response, name: str = "SRV") -> Optional[str]:
    """The value of the Set-Cookie for ``name`` (asserting there is at most one), or None."""
    mine = [v for v in r.header_all("set-cookie") if v.split("=", 1)[0].strip() == name]
    assert len(mine) <= 1, r.header_all("set-cookie")
    if not mine:
        return None
    return mine[0].split(";", 1)[0].split("=", 1)[1]


def learn_ids(lb: BalrsProcess, names: Sequence[str] = STICKY_NAMES) -> Dict[str, str]:
    """Send requests without a cookie until each backend has answered one: its id from the Set-Cookie."""
    ids: Dict[str, str] = {}
    for i in range(4 * len(names)):
        r = get(lb, "/learn?i=%d" % i)
        assert r.status == 200
        value = cookie_of(r)
        assert value, "no Set-Cookie on a request without the cookie: %s" % r.headers
        b = served(r)
        assert b is not None
        assert ids.setdefault(b, value) == value, "two ids for %s" % b
        if len(ids) == len(names):
            return ids
    raise AssertionError("did not see every backend: %s" % ids)


def expected_id(name: str, secret: str = "", names: Sequence[str] = STICKY_NAMES) -> str:
    return Sticky("SRV", sticky_key(secret, names)).id_of(name).decode()


class StickyRigs:
    def __init__(self, bs: Dict[str, PolicyBackend], lbs: Dict[str, BalrsProcess]) -> None:
        self.b = bs
        self.lb = lbs


@pytest.fixture(scope="module")
def _sticky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StickyRigs]:
    bs = {n: PolicyBackend(n) for n in STICKY_NAMES}
    lbs: Dict[str, BalrsProcess] = {}
    workdir = tmp_path_factory.mktemp("sticky")
    specs: List[Tuple[TestBackend, Optional[str]]] = [(b, None) for b in bs.values()]
    try:
        lbs["rr"] = launch(workdir, "rr", specs, sticky="cookie:SRV")
        lbs["lc"] = launch(workdir, "lc", specs, sticky="cookie:SRV", strategy="least_connections")
        lbs["secA"] = launch(workdir, "secA", specs, sticky="cookie:SRV", sticky_secret=SECRET_A)
        lbs["secB"] = launch(workdir, "secB", specs, sticky="cookie:SRV", sticky_secret=SECRET_B)
        yield StickyRigs(bs, lbs)
    finally:
        for lb in lbs.values():
            lb.stop()
        for b in bs.values():
            b.stop()


@pytest.fixture
def sticky(_sticky: StickyRigs) -> Iterator[StickyRigs]:
    _fresh(_sticky.b)
    yield _sticky
    for name, lb in _sticky.lb.items():
        assert lb.alive(), "balrs %s exited during this test; stderr:\n%s" % (name, lb.log_tail())


def _decodings(v: str) -> List[bytes]:
    out = [v.encode()]
    for decode in (binascii.unhexlify, lambda s: base64.b64decode(s + "=" * (-len(s) % 4)),
                   lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))):
        try:
            out.append(decode(v))
        except (binascii.Error, ValueError):
            pass
    return out


def test_sticky_first_response_sets_an_opaque_cookie(sticky: StickyRigs) -> None:
    lb = sticky.lb["rr"]
    r = get(lb, "/first")
    sc = r.header_all("set-cookie")
    assert len(sc) == 1, sc
    value = cookie_of(r)
    assert sc[0] == "SRV=%s; Path=/; HttpOnly; SameSite=Lax" % value
    ids = learn_ids(lb)
    assert len(set(ids.values())) == 3
    for name, value in ids.items():
        b = sticky.b[name]
        for form in _decodings(value):
            for secret in (name, HOST, str(b.port), b.address):
                assert secret.encode() not in form, "id %r of %s reveals %r" % (value, name, secret)
        assert value == expected_id(name)  # HMAC of the name, key from the sorted names


@pytest.mark.parametrize("which", ["rr", "lc"])
def test_sticky_cookie_sticks_without_resetting_it(sticky: StickyRigs, which: str) -> None:
    lb = sticky.lb[which]
    ids = learn_ids(lb)
    for name, value in ids.items():
        for i in range(10):
            r = get(lb, "/stick?i=%d" % i, [("Cookie", "a=1; SRV=%s; b=2" % value)])
            assert r.status == 200 and served(r) == name, (which, name, i, served(r))
            assert r.header_all("set-cookie") == [], r.header_all("set-cookie")
    # A quoted cookie-value sticks too.
    name, value = sorted(ids.items())[0]
    r = get(lb, "/quoted", [("Cookie", 'SRV="%s"' % value)])
    assert served(r) == name and r.header_all("set-cookie") == []


def test_sticky_holds_against_least_connections_load(sticky: StickyRigs) -> None:
    """With least_connections and a slow request in flight on s1, requests carrying s1's cookie still go to
    s1 (the strategy alone would avoid it)."""
    lb = sticky.lb["lc"]
    ids = learn_ids(lb)
    result: Dict[str, Response] = {}

    def slow() -> None:
        result["slow"] = get(lb, "/delay/1500", [("Cookie", "SRV=%s" % ids["s1"])])

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: any(rec["path"] == "/delay/1500" for rec in sticky.b["s1"].reqs()), 3.0)
        for i in range(5):
            r = get(lb, "/busy?i=%d" % i, [("Cookie", "SRV=%s" % ids["s1"])])
            assert served(r) == "s1" and r.header_all("set-cookie") == []
        # Without the cookie least_connections avoids the busy backend.
        plain = [served(get(lb, "/plain?i=%d" % i)) for i in range(4)]
        assert "s1" not in plain, plain
    finally:
        t.join(5.0)
    assert result["slow"].status == 200 and served(result["slow"]) == "s1"


def test_sticky_invalid_or_forged_ids_are_ignored(sticky: StickyRigs) -> None:
    lb = sticky.lb["rr"]
    ids = learn_ids(lb)
    s1 = sticky.b["s1"]
    bad = [
        "SRV=%s" % os.urandom(16).hex(),
        "SRV=%s" % ids["s1"].upper(),
        "SRV=%s" % ids["s1"][:-1],
        "SRV=s1",
        "SRV=%s" % s1.address,
        "SRV=%s" % b"s1".hex(),
        "SRV=%s" % expected_id("s1", secret="guessed-secret-value"),
        "SRV=",
        "XSRV=%s" % ids["s1"],
        "srv=%s" % ids["s1"],
    ]
    for cookie in bad:
        for i in range(2):  # two requests: round robin lands them on different backends
            r = get(lb, "/forged?i=%d" % i, [("Cookie", cookie)])
            assert r.status == 200
            value = cookie_of(r)
            assert value is not None, "no fresh Set-Cookie for Cookie: %s" % cookie
            assert value == ids[str(served(r))], (cookie, value, served(r))


def test_sticky_ids_agree_across_processes_and_change_with_the_secret(sticky: StickyRigs) -> None:
    plain_rr = learn_ids(sticky.lb["rr"])
    plain_lc = learn_ids(sticky.lb["lc"])
    sec_a = learn_ids(sticky.lb["secA"])
    sec_b = learn_ids(sticky.lb["secB"])
    assert plain_rr == plain_lc, "same backend names, no sticky_secret: the ids differ"
    assert sec_a == {n: expected_id(n, SECRET_A) for n in STICKY_NAMES}
    assert sec_b == {n: expected_id(n, SECRET_B) for n in STICKY_NAMES}
    for n in STICKY_NAMES:
        assert len({plain_rr[n], sec_a[n], sec_b[n]}) == 3, n
    # The cookie of one process works on the other; a cookie keyed by another secret does not.
    r = get(sticky.lb["lc"], "/x", [("Cookie", "SRV=%s" % plain_rr["s2"])])
    assert served(r) == "s2" and cookie_of(r) is None
    for i in range(2):
        r = get(sticky.lb["secB"], "/y?i=%d" % i, [("Cookie", "SRV=%s" % sec_a["s2"])])
        assert cookie_of(r) == sec_b[str(served(r))]


def test_sticky_moves_when_its_backend_refuses_connections(spawn: Callable[..., BalrsProcess],
                                                          pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("x1", "x2", "x3")
    lb = spawn(bs, sticky="cookie:SRV")
    ids = learn_ids(lb, ("x1", "x2", "x3"))
    bs[0].stop()  # connects to x1 are refused from now on
    moved: List[str] = []
    for i in range(3):
        r = get(lb, "/moved?i=%d" % i, [("Cookie", "SRV=%s" % ids["x1"])])
        assert r.status == 200 and served(r) in ("x2", "x3"), r
        assert cookie_of(r) == ids[str(served(r))], "the cookie was not reset to the backend that served"
        moved.append(str(served(r)))
    lb.wait_log("connect to x1 failed, retrying on")
    new = moved[-1]
    for i in range(5):
        r = get(lb, "/after?i=%d" % i, [("Cookie", "SRV=%s" % ids[new])])
        assert served(r) == new and r.header_all("set-cookie") == []


def test_sticky_moves_while_health_marks_its_backend_down(spawn: Callable[..., BalrsProcess],
                                                         pbackends: Callable[..., List[PolicyBackend]]) -> None:
    bs = pbackends("y1", "y2", "y3")
    lb = spawn(bs, sticky="cookie:SRV", health=FAST_HEALTH)
    ids = learn_ids(lb, ("y1", "y2", "y3"))
    bs[1].health_status = 500
    lb.wait_log("backend y2 is DOWN", timeout=8.0)
    for i in range(3):
        r = get(lb, "/down?i=%d" % i, [("Cookie", "SRV=%s" % ids["y2"])])
        assert r.status == 200 and served(r) in ("y1", "y3")
        assert cookie_of(r) == ids[str(served(r))]
    n = len(bs[1].reqs())
    bs[1].health_status = 200
    lb.wait_log("backend y2 is UP again", timeout=8.0)
    r = get(lb, "/back", [("Cookie", "SRV=%s" % ids["y2"])])
    assert served(r) == "y2" and cookie_of(r) is None
    assert len(bs[1].reqs()) == n + 1


# ---------------------------------------------------------------------------------------------------- per-client limits


def test_client_rate_answers_429_with_retry_after_and_keeps_the_connection(
        spawn: Callable[..., BalrsProcess], pbackends: Callable[..., List[PolicyBackend]]) -> None:
    (b,) = pbackends("l1")
    lb = spawn([b], admin=True, client_rate="5", client_burst="5")
    statuses: List[int] = []
    limited: List[Response] = []
    with SourceClient(lb.addr, "127.0.0.2") as c:
        t0 = time.monotonic()
        for i in range(12):
            c.send(build("GET", "/rate?i=%d" % i))
            r = c.read_response()
            statuses.append(r.status)
            if r.status == 429:
                limited.append(r)
                break
        elapsed = time.monotonic() - t0
        assert statuses[:5] == [200] * 5, statuses
        assert limited, "no 429 in %d requests within %.2fs at client_rate 5, burst 5" % (len(statuses), elapsed)
        assert len(statuses) - 1 <= 5 + 5 * elapsed + 1, (statuses, elapsed)
        if elapsed < 0.15:
            assert len(statuses) == 6, statuses  # the 6th quick request
        r429 = limited[0]
        ra = r429.header("retry-after")
        assert ra is not None and ra.isdigit() and int(ra) >= 1, r429.headers
        assert not r429.has_token("connection", "close")
        assert not c.peer_closed()
        # Another client address has a bucket of its own.
        with SourceClient(lb.addr, "127.0.0.3") as other:
            other.send(build("GET", "/rate-other"))
            assert other.read_response().status == 200
        # The same connection is served again once a token is back.
        again: List[int] = []

        def served_again() -> bool:
            c.send(build("GET", "/rate-again?n=%d" % len(again)))
            again.append(c.read_response().status)
            return again[-1] == 200

        assert wait_for(served_again, 3.0, 0.05), again
        assert set(again) <= {200, 429}
    oks = statuses.count(200) + again.count(200) + 1
    assert len(b.reqs()) == oks, "the 429s reached the backend"
    m = metrics(lb)
    assert m['balrs_client_limited_total{limit="rate"}'] == 1 + again.count(429)
    assert m['balrs_client_limited_total{limit="connections"}'] == 0


def test_client_connections_caps_per_address(spawn: Callable[..., BalrsProcess],
                                             pbackends: Callable[..., List[PolicyBackend]]) -> None:
    (b,) = pbackends("l2")
    lb = spawn([b], admin=True, client_connections="2", header_timeout="500ms")
    held: List[Client] = []
    try:
        for i in range(2):
            k = SourceClient(lb.addr, "127.0.0.2")
            held.append(k)
            k.send(build("GET", "/held?i=%d" % i))
            assert k.read_response().status == 200
        third = SourceClient(lb.addr, "127.0.0.2")
        held.append(third)
        third.send(build("GET", "/third"))
        r = third.read_response()
        assert r.status == 429, r
        assert r.has_token("connection", "close"), r.headers
        ra = r.header("retry-after")
        assert ra is not None and ra.isdigit() and int(ra) >= 1
        closed, after, _ = third.wait_closed(3.0)
        assert closed and after == b"", after[:100]
        assert not any(rec["path"] == "/third" for rec in b.reqs()), "the refused request reached the backend"
        # Another address is not limited; the two held connections still work.
        with SourceClient(lb.addr, "127.0.0.3") as other:
            other.send(build("GET", "/other"))
            assert other.read_response().status == 200
        held[0].send(build("GET", "/held-again"))
        assert held[0].read_response().status == 200
        # One of the two closes: a new connection from 127.0.0.2 is served (once balrs saw the close).
        held[0].close()
        fresh: List[int] = []

        def new_one_served() -> bool:
            k = SourceClient(lb.addr, "127.0.0.2")
            k.send(build("GET", "/fresh?n=%d" % len(fresh)))
            fresh.append(k.read_response().status)
            if fresh[-1] == 200:
                held.append(k)  # stays open: 127.0.0.2 is at its limit again
                return True
            k.close()
            return False

        assert wait_for(new_one_served, 5.0, 0.05), fresh
        # Over the limit and silent: closed by balrs at about header_timeout (500ms).
        silent = SourceClient(lb.addr, "127.0.0.2")
        held.append(silent)
        closed, data, waited = silent.wait_closed(4.0)
        assert closed, "a silent connection over client_connections was still open after %.1fs" % waited
        assert data == b"" or data.startswith(b"HTTP/1.1 "), data[:100]
        m = metrics(lb)
        assert m['balrs_client_limited_total{limit="connections"}'] >= 1 + fresh.count(429)
        assert m['balrs_client_limited_total{limit="rate"}'] == 0
    finally:
        for k in held:
            k.close()
