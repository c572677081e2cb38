"""Integration: active health checks, passive ejection and slow start, against the real balrs process.

``conftest.make_lb`` writes only [balancer] keys, so this module writes its own lb.ini with a [health]
section (``start_with_health``) and starts it with ``support.start_config``; processes are stopped by
PID in teardown. ``HealthBackend`` is the suite's ``TestBackend`` with a health endpoint whose answer
the test sets (a status, or hang), its probes recorded apart from the traffic.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from support import (
    BalrsProcess,
    start_config,
    TestBackend,
    hget,
    lb_ini,
    request,
    wait_for,
)

# Fast probes, as the conformance suite runs them.
FAST = {"path": "/health", "interval": "200ms", "timeout": "500ms", "rise": "2", "fall": "2",
        "expect": "200-399"}


class HealthBackend(TestBackend):
    """A TestBackend whose /health and /hc/... answer ``health_status`` (or hang when ``health_hang``);
    those requests go to ``health_records``, not ``records``."""

    __test__ = False

    def __init__(self, name: str) -> None:
        self.health_status = 200
        self.health_hang = False
        self.health_records: list[dict[str, Any]] = []
        super().__init__(name)

    def _dispatch(self, sock: Any, rd: Any, rec: dict[str, Any], path: str, method: str, version: str,
                  headers: list[tuple[str, str]], keep_alive: bool, state: dict[str, bool]) -> bool:
        if not (path.startswith("/health") or path.startswith("/hc/")):
            return super()._dispatch(sock, rd, rec, path, method, version, headers, keep_alive, state)
        with self.lock:
            self.records = [r for r in self.records if r is not rec]
            self.health_records.append(rec)
        if self.health_hang:
            self._hang(sock)
            return False
        st = self.health_status
        body = b"healthy\n" if st < 400 else b"unhealthy\n"
        ch = [] if keep_alive else [("Connection", "close")]
        self._send(sock, st, [("Content-Length", str(len(body)))] + ch, body)
        return keep_alive

    def probes(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.health_records)

    def reset(self) -> None:
        with self.lock:
            self.records = []
            self.health_records = []


def start_with_health(workdir: Path, backends: Sequence[Any], health: Optional[dict[str, str]],
                      name: str = "lb", **balancer: object) -> BalrsProcess:
    """lb.ini = support.lb_ini(...) plus a [health] section; started on a free port."""
    def text_for(port: int, _admin_port: Optional[int]) -> str:
        text = lb_ini("127.0.0.1:%d" % port, backends, **balancer)
        if health is not None:
            text += "\n[health]\n" + "".join("%s = %s\n" % kv for kv in health.items())
        return text

    return start_config(workdir, text_for, name=name)


@pytest.fixture
def hb() -> Iterator[Callable[[str], HealthBackend]]:
    made: list[HealthBackend] = []

    def make(name: str) -> HealthBackend:
        b = HealthBackend(name)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def lbh(tmp_path: Path) -> Iterator[Callable[..., BalrsProcess]]:
    """``lbh(backends, health=FAST|None, **balancer_keys)``: a balrs process stopped by PID in teardown."""
    made: list[BalrsProcess] = []

    def make(backends: Sequence[Any], health: Optional[dict[str, str]] = None,
             **balancer: object) -> BalrsProcess:
        lb = start_with_health(tmp_path, backends, health, "lb%d" % (len(made) + 1), **balancer)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


HBs = Callable[[str], HealthBackend]
LBs = Callable[..., BalrsProcess]


def spread(lb: BalrsProcess, n: int = 30) -> tuple[collections.Counter[str], list[int]]:
    """``n`` requests: who served them, and the statuses that were not 200."""
    served: collections.Counter[str] = collections.Counter()
    bad = []
    for i in range(n):
        r = request(lb.addr, "GET", "/echo?i=%d" % i, timeout=5)
        if r.status != 200:
            bad.append(r.status)
        served[hget(r.headers, "x-backend") or "?"] += 1
    return served, bad


def wait_log(lb: BalrsProcess, text: str, timeout: float = 5.0, count: int = 1) -> None:
    lb.wait_log(text, timeout, count)


# ---- active checks -----------------------------------------------------------------------------------------
def test_backend_failing_probes_gets_no_traffic_and_probes_are_get_path(
    hb: HBs, lbh: LBs
) -> None:
    bs = [hb("b1"), hb("b2"), hb("b3")]
    lb = lbh(bs, dict(FAST, path="/hc/ping"))
    assert wait_for(lambda: len(bs[0].probes()) >= 2, 3), "no probes reached b1"
    bs[1].health_status = 500
    wait_log(lb, "backend b2 is DOWN: 2 consecutive probe failures (last: status 500)")
    served, bad = spread(lb)
    assert not bad
    assert served["b2"] == 0 and served["b1"] == 15 and served["b3"] == 15
    # Every probe: GET <path> HTTP/1.1 with the backend's address as Host, Connection: close.
    for b in bs:
        for rec in b.probes():
            assert (rec["method"], rec["target"], rec["version"]) == ("GET", "/hc/ping", "HTTP/1.1")
            assert hget(rec["headers"], "host") == b.address
            assert hget(rec["headers"], "connection") == "close"
            assert hget(rec["headers"], "user-agent") == "balrs-health"
    # Probes keep coming at about the interval (200 ms +-10%): a couple of seconds give several.
    n0 = len(bs[0].probes())
    time.sleep(1.0)
    assert 3 <= len(bs[0].probes()) - n0 <= 7


def test_backend_returns_after_rise_passes(
    hb: HBs, lbh: LBs
) -> None:
    bs = [hb("b1"), hb("b2"), hb("b3")]
    lb = lbh(bs, FAST)
    bs[1].health_status = 503
    wait_log(lb, "backend b2 is DOWN")
    served, _ = spread(lb, 12)
    assert served["b2"] == 0
    bs[1].health_status = 200
    wait_log(lb, "backend b2 is UP again: 2 consecutive probe passes")
    served, bad = spread(lb)
    assert not bad
    assert served["b2"] == 10


def test_hanging_health_endpoint_times_out(
    hb: HBs, lbh: LBs
) -> None:
    bs = [hb("b1"), hb("b2")]
    lb = lbh(bs, dict(FAST, timeout="250ms"))
    bs[0].health_hang = True
    wait_log(lb, "backend b1 is DOWN: 2 consecutive probe failures (last: timed out after 0.25s)")
    served, bad = spread(lb, 10)
    assert not bad and served["b2"] == 10


def test_all_backends_down_503_quickly(hb: HBs, lbh: LBs) -> None:
    bs = [hb("b1"), hb("b2"), hb("b3")]
    lb = lbh(bs, FAST)
    for b in bs:
        b.health_status = 500
    for b in bs:
        wait_log(lb, "backend %s is DOWN" % b.name)
    for b in bs:
        b.reset()
    t = time.monotonic()
    r = request(lb.addr, "GET", "/echo", timeout=5)
    elapsed = time.monotonic() - t
    assert r.status == 503
    assert elapsed < 1.0
    assert not any(b.reqs() for b in bs), "a request went to a backend that is down"
    # And back: one backend recovers, traffic flows again.
    bs[2].health_status = 200
    wait_log(lb, "backend b3 is UP again")
    served, bad = spread(lb, 6)
    assert not bad and served["b3"] == 6


def test_tcp_probe_sends_no_http_and_catches_a_closed_port(
    hb: HBs, lbh: LBs
) -> None:
    bs = [hb("b1"), hb("b2"), hb("b3")]
    lb = lbh(bs, dict(FAST, path="tcp"), retries=0)
    assert wait_for(lambda: bs[2].conns_total >= 3, 3), "TCP probes did not connect"
    assert not bs[2].probes() and not bs[2].reqs(), "TCP probe mode sent HTTP"
    bs[2].stop()
    wait_log(lb, "backend b3 is DOWN: 2 consecutive probe failures (last: connect: Connection refused)")
    served, bad = spread(lb)
    assert not bad, "with retries = 0 a refused backend must be out by now: %s" % bad
    assert served["b3"] == 0


# ---- passive outlier detection -----------------------------------------------------------------------------
def test_passive_ejection_without_health_section(
    make_backend: Callable[..., Any], lbh: LBs
) -> None:
    bs = [make_backend("b1"), make_backend("d2", "dead"), make_backend("b3")]
    lb = lbh(bs, None, retries=0, eject_after=3, eject_cooldown="30s")
    statuses = [request(lb.addr, "GET", "/echo?i=%d" % i, timeout=5).status for i in range(30)]
    errors = [s for s in statuses if s != 200]
    assert len(errors) == 3, statuses
    assert all(s == 502 for s in errors)
    assert statuses[-15:] == [200] * 15, "the refusing backend was not taken out"
    wait_log(lb, "backend d2 ejected for 30s: 3 consecutive failures (last: connect)")


def test_passive_ejection_keeps_half_the_backends(
    make_backend: Callable[..., Any], lbh: LBs
) -> None:
    # Two backends, both refusing: one may be ejected, never both (the last one keeps answering 502,
    # not 503: the problem is likely not the backends).
    bs = [make_backend("d1", "dead"), make_backend("d2", "dead")]
    lb = lbh(bs, None, retries=0, eject_after=2, eject_cooldown="30s")
    statuses = [request(lb.addr, "GET", "/echo", timeout=5).status for _ in range(12)]
    assert 503 not in statuses and set(statuses) == {502}
    wait_log(lb, "ejected for 30s")
    wait_log(lb, "but not ejected")


# ---- slow start --------------------------------------------------------------------------------------------
def _strategy_reads_eff_weight() -> bool:
    """Does the round-robin strategy weigh backends by ``eff_weight`` (what slow start lowers)?"""
    from balrs.config import Address, BackendConfig
    from balrs.pool import Backend
    from balrs.strategies import make_strategy

    a = Backend(BackendConfig("a", Address("127.0.0.1", 1), 10))
    b = Backend(BackendConfig("b", Address("127.0.0.1", 2), 10))
    b.eff_weight = 1
    s = make_strategy("round_robin", [a, b])
    picks = collections.Counter(s.choose(None, "127.0.0.1").name for _ in range(22))  # type: ignore[arg-type, union-attr]
    return picks["b"] < picks["a"]


def test_slow_start_gives_a_recovered_backend_a_reduced_share(
    hb: HBs, lbh: LBs
) -> None:
    if not _strategy_reads_eff_weight():
        pytest.skip("the round-robin strategy weighs by `weight`, not `eff_weight`: slow start has no effect")
    bs = [hb("b1"), hb("b2")]
    slow_start = 3.0
    lb = lbh([(bs[0], 10), (bs[1], 10)], dict(FAST, rise="1", fall="1"), slow_start="%gs" % slow_start)
    served, _ = spread(lb, 20)
    assert served["b2"] == 10, "backends present at start-up take their full weight"
    bs[1].health_status = 500
    wait_log(lb, "backend b2 is DOWN")
    bs[1].health_status = 200
    wait_log(lb, "backend b2 is UP again")
    up_seen = time.monotonic()  # the ramp began before this (when the line was written)
    served, bad = spread(lb, 40)
    assert not bad
    assert 1 <= served["b2"] <= 14, "b2 got %d of 40 right after recovering (slow start %gs)" % (
        served["b2"], slow_start)
    # Scenario time: the ramp ends slow_start after it began (ramp steps are 250 ms apart).
    time.sleep(max(0.0, up_seen + slow_start + 0.5 - time.monotonic()))
    served, bad = spread(lb, 40)
    assert not bad and served["b2"] == 20


# ---- reload ------------------------------------------------------------------------------------------------
def test_reload_probes_added_backends_stops_removed_ones_and_applies_health_changes(
    hb: HBs, lbh: LBs
) -> None:
    import signal

    b1, b2, b3 = hb("b1"), hb("b2"), hb("b3")
    lb = lbh([b1, b2], FAST)
    assert wait_for(lambda: len(b2.probes()) >= 2, 3)
    b1.health_status = 500
    wait_log(lb, "backend b1 is DOWN")
    text = lb_ini("127.0.0.1:%d" % lb.port, [b1, b3])
    text += "\n[health]\n" + "".join("%s = %s\n" % kv for kv in dict(FAST, path="/hc/v2").items())
    lb.config_path.write_text(text)
    lb.signal(signal.SIGHUP)
    wait_log(lb, "reloaded")
    assert wait_for(lambda: any(r["target"] == "/hc/v2" for r in b3.probes()), 3), "b3 is not probed"
    assert wait_for(lambda: any(r["target"] == "/hc/v2" for r in b1.probes()), 3), "new path not applied"
    n2 = len(b2.probes())
    time.sleep(0.8)
    assert len(b2.probes()) <= n2 + 1, "a removed backend is still probed"
    # b1 kept its state across the reload (still down): only b3 serves.
    served, bad = spread(lb, 6)
    assert not bad and served["b3"] == 6
