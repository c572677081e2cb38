"""Strategy unit tests: distribution, smoothness, load and latency preference, hashing properties,
with real Backend objects (no I/O), seeded randomness and a fake clock."""

from __future__ import annotations

import collections
import heapq
import math
import random
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

from balrs.config import Address, BackendConfig
from balrs.http.heads import RequestHead, parse_request_head
from balrs.pool import Backend, Pool
from balrs.strategies import (
    DECAY_HALF_LIFE,
    MAX_RING_POINTS,
    STRATEGY_CLASSES,
    ConsistentHash,
    IpHash,
    LeastConnections,
    LeastResponseTime,
    PowerOfTwo,
    Random,
    RoundRobin,
    Strategy,
    WeightedLeastConnections,
    WeightedLeastResponseTime,
    cookie_value,
    make_strategy,
    smooth_weighted_sequence,
)

REQ = parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
ALL = sorted(STRATEGY_CLASSES)


def backends(*weights: int, names: Optional[Sequence[str]] = None) -> List[Backend]:
    names = names or ["b%d" % (i + 1) for i in range(len(weights))]
    return [Backend(BackendConfig(name, Address("127.0.0.1", 9000 + i), w))
            for i, (name, w) in enumerate(zip(names, weights))]


def picks(strategy: Strategy, n: int, req: RequestHead = REQ, ip: str = "127.0.0.1") -> List[str]:
    out = []
    for _ in range(n):
        b = strategy.choose(req, ip)
        assert b is not None
        out.append(b.name)
    return out


def request(target: str = "/", headers: Iterable[Tuple[str, str]] = ()) -> RequestHead:
    lines = "".join("%s: %s\r\n" % h for h in headers)
    return parse_request_head(("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (target, lines)).encode("latin-1"))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_nginx_smooth_sequence_5_1_1() -> None:
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    assert smooth_weighted_sequence([5, 1, 1]) == [0, 0, 1, 0, 2, 0, 0]


def test_equal_weights_cycle_exactly() -> None:
    rr = RoundRobin(backends(1, 1, 1))
    assert picks(rr, 9) == ["b1", "b2", "b3"] * 3


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2), (1, 2, 3, 4), (256, 1), (7, 7, 14), (10, 5, 1, 1)])
def test_weighted_counts_and_smoothness(weights: tuple) -> None:
    bs = backends(*weights)
    rr = RoundRobin(bs)
    total = sum(weights)
    seq = picks(rr, total * 10)
    counts = collections.Counter(seq)
    for b, w in zip(bs, weights):
        assert counts[b.name] == 10 * w
    # Smooth: in any window of `total` picks no backend exceeds its weight by more than one.
    for i in range(len(seq) - total):
        window = collections.Counter(seq[i:i + total])
        for b, w in zip(bs, weights):
            assert window[b.name] <= w + 1


def test_never_five_in_a_row() -> None:
    seq = picks(RoundRobin(backends(5, 1, 1)), 700)
    run = best = 0
    for name in seq:
        run = run + 1 if name == "b1" else 0
        best = max(best, run)
    assert best <= 4  # the cycle a a b a c a a wraps into four in a row, never five


def test_walk_mode_matches_schedule() -> None:
    # Past MAX_SCHEDULE the strategy walks nginx's algorithm per pick; it must give the same sequence.
    bs = backends(5, 1, 1)
    a = RoundRobin(bs)
    b = RoundRobin(bs)
    b._seq = []
    b._current = [0] * len(bs)
    assert picks(a, 70) == picks(b, 70)


def test_choose_excluding_skips_tried() -> None:
    bs = backends(1, 1, 1)
    rr = RoundRobin(bs)
    assert rr.choose_excluding(REQ, "x", [bs[0], bs[1]]) is bs[2]
    assert rr.choose_excluding(REQ, "x", bs) is None


def test_update_keeps_position_and_empty_pool() -> None:
    bs = backends(1, 1, 1)
    rr = RoundRobin(bs)
    picks(rr, 2)
    rr.update(bs[:2])
    assert set(picks(rr, 4)) == {"b1", "b2"}
    rr.update([])
    assert rr.choose(REQ, "x") is None


def test_pool_skips_down_backends() -> None:
    pool = Pool([BackendConfig("a", Address("127.0.0.1", 1)), BackendConfig("b", Address("127.0.0.1", 2))],
                "round_robin", make_strategy=make_strategy)
    pool.backends[0].up = False
    pool.refresh()
    assert {pool.choose(REQ, "x").name for _ in range(4)} == {"b"}  # type: ignore[union-attr]


def test_unknown_strategy_name() -> None:
    with pytest.raises(ValueError):
        make_strategy("fastest_first", [])



# ---- every strategy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_every_strategy_empty_pool_and_update(name: str) -> None:
    s = make_strategy(name, [])
    assert s.choose(REQ, "10.0.0.1") is None
    assert s.choose_excluding(REQ, "10.0.0.1", []) is None
    bs = backends(1, 1, 1)
    s.update(bs)
    assert s.backends == bs
    assert {s.choose(REQ, "10.0.0.%d" % i).name for i in range(300)} <= {"b1", "b2", "b3"}  # type: ignore[union-attr]
    s.update(bs[1:])
    assert {s.choose(REQ, "10.0.0.%d" % i).name for i in range(300)} <= {"b2", "b3"}  # type: ignore[union-attr]
    s.update([])
    assert s.choose(REQ, "10.0.0.1") is None


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_choose_excluding(name: str) -> None:
    bs = backends(1, 2, 1)
    s = make_strategy(name, bs)
    for i in range(200):
        ip = "10.1.%d.%d" % (i // 250, i % 250)
        req = request("/p%d" % i)
        got = s.choose_excluding(req, ip, [bs[0]])
        assert got is not None and got is not bs[0]
        assert s.choose_excluding(req, ip, [bs[0], bs[2]]) is bs[1]
        assert s.choose_excluding(req, ip, bs) is None
    # Excluding nothing still picks.
    assert s.choose_excluding(REQ, "10.0.0.1", []) in bs


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_uses_every_backend(name: str) -> None:
    bs = backends(1, 1, 1)
    s = make_strategy(name, bs)
    if isinstance(s, (Random, PowerOfTwo)):
        s.rng.seed(7)
        s.update(bs)
    used = {s.choose(request("/k%d" % i), "10.0.%d.%d" % (i // 200, i % 200)).name  # type: ignore[union-attr]
            for i in range(600)}
    assert used == {"b1", "b2", "b3"}


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_in_a_pool(name: str) -> None:
    pool = Pool([BackendConfig("a", Address("127.0.0.1", 1)), BackendConfig("b", Address("127.0.0.1", 2))], name,
                make_strategy=make_strategy)
    pool.backends[0].up = False
    pool.refresh()
    assert {pool.choose(REQ, "10.0.0.%d" % i).name for i in range(20)} == {"b"}  # type: ignore[union-attr]


def test_make_strategy_passes_clock_and_hash_key() -> None:
    clock = FakeClock(5.0)
    s = make_strategy("least_response_time", backends(1), clock=clock)
    assert s.clock is clock
    ch = make_strategy("consistent_hash", backends(1), "cookie:sid")
    assert isinstance(ch, ConsistentHash) and ch.hash_key == "cookie:sid"
    with pytest.raises(ValueError):
        make_strategy("consistent_hash", backends(1), "query:x")


# ---- round robin uses the effective weight -----------------------------------------------------------

def test_round_robin_follows_eff_weight() -> None:
    bs = backends(1, 1, 1)
    rr = RoundRobin(bs)
    bs[0].eff_weight = 3  # the pool calls update() whenever an effective weight changes
    rr.update(bs)
    counts = collections.Counter(picks(rr, 500))
    assert counts == {"b1": 300, "b2": 100, "b3": 100}


def test_round_robin_fractional_eff_weight() -> None:
    # A slow-start ramp may give non-integral weights: quantised to 1/16, proportions kept.
    bs = backends(2, 2)
    bs[1].eff_weight = 0.5  # type: ignore[assignment]
    rr = RoundRobin(bs)
    counts = collections.Counter(picks(rr, 500))
    assert counts == {"b1": 400, "b2": 100}


def test_round_robin_walk_mode_uses_eff_weight() -> None:
    bs = backends(256, 255, 254, 253, 252, 251, 250, 249, 248, 247, 246, 245, 244, 243, 242, 241, 240, 239)
    rr = RoundRobin(bs)
    assert rr._seq == []  # past MAX_SCHEDULE
    counts = collections.Counter(picks(rr, sum(b.eff_weight for b in bs)))
    assert all(counts[b.name] == b.eff_weight for b in bs)


# ---- least connections -------------------------------------------------------------------------------

def test_least_connections_prefers_fewest_active_ignoring_weights() -> None:
    bs = backends(10, 1, 1)
    lc = LeastConnections(bs)
    bs[0].active, bs[1].active, bs[2].active = 2, 1, 3
    assert picks(lc, 5) == ["b2"] * 5
    bs[1].active = 5
    assert lc.choose(REQ, "x") is bs[0]


def test_least_connections_idle_ties_rotate() -> None:
    lc = LeastConnections(backends(1, 1, 1))
    assert picks(lc, 9) == ["b1", "b2", "b3"] * 3


def test_least_connections_partial_ties_rotate_evenly() -> None:
    bs = backends(1, 1, 1, 1)
    lc = LeastConnections(bs)
    bs[1].active = 1
    seq = picks(lc, 30)
    assert collections.Counter(seq) == {"b1": 10, "b3": 10, "b4": 10}
    assert all(seq[i] != seq[i + 1] for i in range(len(seq) - 1))


def test_least_connections_spreads_concurrent_load() -> None:
    bs = backends(1, 1, 1)
    lc = LeastConnections(bs)
    for _ in range(30):  # 30 requests arrive, none completes
        b = lc.choose(REQ, "x")
        assert b is not None
        b.active += 1
    assert [b.active for b in bs] == [10, 10, 10]


def test_least_connections_choose_excluding_takes_next_best() -> None:
    bs = backends(1, 1, 1)
    lc = LeastConnections(bs)
    bs[0].active, bs[1].active, bs[2].active = 0, 3, 1
    assert lc.choose_excluding(REQ, "x", [bs[0]]) is bs[2]
    assert lc.choose_excluding(REQ, "x", [bs[0], bs[2]]) is bs[1]


# ---- weighted least connections ----------------------------------------------------------------------

def test_weighted_least_connections_compares_active_over_weight() -> None:
    bs = backends(3, 1)
    wlc = WeightedLeastConnections(bs)
    bs[0].active, bs[1].active = 2, 1     # 2/3 < 1/1
    assert wlc.choose(REQ, "x") is bs[0]
    bs[0].active = 4                      # 4/3 > 1/1
    assert wlc.choose(REQ, "x") is bs[1]


def test_weighted_least_connections_concurrent_load_follows_weights() -> None:
    bs = backends(3, 1, 2)
    wlc = WeightedLeastConnections(bs)
    for _ in range(60):
        b = wlc.choose(REQ, "x")
        assert b is not None
        b.active += 1
    assert [b.active for b in bs] == [30, 10, 20]


def test_weighted_least_connections_idle_ties_follow_weights_smoothly() -> None:
    # nginx least_conn breaks ties by weighted round robin: sequential requests still follow weights.
    wlc = WeightedLeastConnections(backends(5, 1, 1))
    seq = picks(wlc, 700)
    assert collections.Counter(seq) == {"b1": 500, "b2": 100, "b3": 100}
    assert seq[:7] == ["b1", "b1", "b2", "b1", "b3", "b1", "b1"]


def test_weighted_least_connections_partial_ties_alternate() -> None:
    bs = backends(1, 1, 1)
    wlc = WeightedLeastConnections(bs)
    bs[0].active = 1
    seq = picks(wlc, 20)
    assert collections.Counter(seq) == {"b2": 10, "b3": 10}
    assert all(seq[i] != seq[i + 1] for i in range(len(seq) - 1))
    # Loaded ties (2/2 == 1/1) among a subset, weighted 2:1 by nginx's smooth step.
    bs = backends(2, 1, 1)
    wlc = WeightedLeastConnections(bs)
    bs[0].active, bs[1].active, bs[2].active = 2, 1, 5
    assert collections.Counter(picks(wlc, 30)) == {"b1": 20, "b2": 10}


def test_weighted_least_connections_choose_excluding() -> None:
    bs = backends(3, 1, 1)
    wlc = WeightedLeastConnections(bs)
    bs[0].active, bs[1].active, bs[2].active = 1, 1, 2
    assert wlc.choose_excluding(REQ, "x", [bs[0]]) is bs[1]
    assert collections.Counter(wlc.choose_excluding(REQ, "x", [bs[1]]).name  # type: ignore[union-attr]
                               for _ in range(10)) == {"b1": 10}


# ---- least response time -----------------------------------------------------------------------------

def lrt_backends(*ewmas: float, at: float = 1000.0) -> List[Backend]:
    bs = backends(*([1] * len(ewmas)))
    for b, e in zip(bs, ewmas):
        b.ewma = e
        b.ewma_at = at
    return bs


def test_least_response_time_picks_lowest_average() -> None:
    bs = lrt_backends(0.05, 0.01, 0.2)
    lrt = LeastResponseTime(bs, clock=FakeClock())
    assert picks(lrt, 5) == ["b2"] * 5


def test_least_response_time_untried_first_in_turn() -> None:
    bs = lrt_backends(0.01, -1.0, -1.0, -1.0)
    lrt = LeastResponseTime(bs, clock=FakeClock())
    assert picks(lrt, 6) == ["b2", "b3", "b4", "b2", "b3", "b4"]
    # One being measured (a request in flight, no sample yet) waits behind the measured ones.
    bs[1].active = 1
    bs[2].ewma = bs[3].ewma = 0.5
    assert picks(lrt, 3) == ["b1"] * 3
    # ... unless nothing is measured.
    lrt.update(bs[1:2])
    assert picks(lrt, 2) == ["b2"] * 2


def test_least_response_time_weighs_requests_in_flight() -> None:
    bs = lrt_backends(0.01, 0.03)
    lrt = LeastResponseTime(bs, clock=FakeClock())
    bs[0].active = 3   # 0.01 * 4 > 0.03 * 1
    assert lrt.choose(REQ, "x") is bs[1]
    bs[0].active = 1   # 0.01 * 2 < 0.03
    assert lrt.choose(REQ, "x") is bs[0]


def test_least_response_time_equal_scores_rotate() -> None:
    lrt = LeastResponseTime(lrt_backends(0.01, 0.01, 0.01), clock=FakeClock())
    assert picks(lrt, 6) == ["b1", "b2", "b3"] * 2


def test_least_response_time_old_samples_decay() -> None:
    clock = FakeClock(1000.0)
    bs = lrt_backends(0.2, 0.005, 0.005)  # b1 was slow, then avoided: never re-measured
    lrt = LeastResponseTime(bs, clock=clock)

    def traffic(until: float) -> List[str]:
        out = []
        while clock.now < until:
            clock.now += 0.5
            b = lrt.choose(REQ, "x")
            assert b is not None
            out.append(b.name)
            b.observe(0.2 if b is bs[0] else 0.005, clock.now)
        return out

    # 0.2 * 2^(-t/10) < 0.005 once t > 10 * log2(40) = 53.2 s.
    assert "b1" not in traffic(1000.0 + 0.95 * DECAY_HALF_LIFE * math.log2(40))
    later = traffic(1000.0 + 1.05 * DECAY_HALF_LIFE * math.log2(40))
    assert "b1" in later
    # Re-measured as slow, it is avoided again (for another while).
    assert later.count("b1") == 1
    assert "b1" not in traffic(clock.now + 30.0)


def test_least_response_time_slow_backend_keeps_being_retried() -> None:
    # b1 was very slow once and is fast now: it is not starved but retried periodically, each
    # sample pulling its average down (by EWMA_ALPHA: the average itself is the pool's), until it is
    # back in rotation.
    clock = FakeClock(0.0)
    bs = lrt_backends(2.0, 0.01, 0.01, at=0.0)
    lrt = LeastResponseTime(bs, clock=clock)
    averages = []
    for _ in range(40000):
        clock.now += 0.1
        b = lrt.choose(REQ, "x")
        assert b is not None
        if b is bs[0]:
            averages.append(b.ewma)
        b.observe(0.01, clock.now)  # every backend is fast now
    assert len(averages) >= 3
    assert averages == sorted(averages, reverse=True)
    # Back in rotation: its average is the others' again, and with ordinary jitter in the response
    # times it takes its share.
    assert bs[0].ewma < 0.0102
    rng = random.Random(7)
    tail: collections.Counter = collections.Counter()  # type: ignore[type-arg]
    for _ in range(3000):
        clock.now += 0.1
        b = lrt.choose(REQ, "x")
        assert b is not None
        tail[b.name] += 1
        b.observe(0.01 * rng.uniform(0.95, 1.05), clock.now)
    assert tail["b1"] >= 600, tail


def test_weighted_least_response_time_divides_by_weight() -> None:
    bs = lrt_backends(0.02, 0.01)
    bs[0].eff_weight = 4    # 0.02 / 4 < 0.01 / 1
    wlrt = WeightedLeastResponseTime(bs, clock=FakeClock())
    assert wlrt.choose(REQ, "x") is bs[0]
    assert LeastResponseTime(bs, clock=FakeClock()).choose(REQ, "x") is bs[1]
    bs[0].active = 2        # 0.02 * 3 / 4 > 0.01
    assert wlrt.choose(REQ, "x") is bs[1]


def test_least_response_time_choose_excluding() -> None:
    bs = lrt_backends(0.01, 0.02, 0.03)
    lrt = LeastResponseTime(bs, clock=FakeClock())
    assert lrt.choose_excluding(REQ, "x", [bs[0]]) is bs[1]
    assert lrt.choose_excluding(REQ, "x", [bs[0], bs[1]]) is bs[2]
    assert lrt.choose_excluding(REQ, "x", bs) is None


def simulate(strategy: Strategy, bs: List[Backend], clock: FakeClock, clients: int, per_client: int,
             service: Dict[str, float]) -> collections.Counter:  # type: ignore[type-arg]
    """Keep-alive clients sending requests back to back; each backend answers after its service
    time; the balancer observes the time to response head (as the proxy does)."""
    counts: collections.Counter = collections.Counter()  # type: ignore[type-arg]
    events: List[Tuple[float, int, int, Backend, float]] = []
    left = [per_client] * clients
    order = 0

    def send(c: int) -> None:
        nonlocal order
        b = strategy.choose(REQ, "127.0.0.1")
        assert b is not None
        b.active += 1
        counts[b.name] += 1
        heapq.heappush(events, (clock.now + service[b.name], order, c, b, clock.now))
        order += 1
        left[c] -= 1

    for c in range(clients):
        send(c)
    while events:
        t, _, c, b, sent = heapq.heappop(events)
        clock.now = t
        b.active -= 1
        b.observe(t - sent, t)
        clock.now += 0.0002
        if left[c]:
            send(c)
    return counts


@pytest.mark.parametrize("name", ["least_response_time", "weighted_least_response_time"])
def test_response_time_avoids_slow_backend_sequential(name: str) -> None:
    # The black-box case: b1 200 ms slower; 15 warm-up requests, then <= 20% of 60 sequential ones.
    clock = FakeClock(0.0)
    bs = backends(1, 1, 1)
    s = make_strategy(name, bs, clock=clock)
    service = {"b1": 0.201, "b2": 0.001, "b3": 0.0012}
    simulate(s, bs, clock, 1, 15, service)
    counts = simulate(s, bs, clock, 1, 60, service)
    assert counts["b1"] <= 0.2 * 60


@pytest.mark.parametrize("name", ["least_response_time", "weighted_least_response_time", "least_connections",
                                  "weighted_least_connections", "power_of_two"])
def test_avoids_slow_backend_concurrent(name: str) -> None:
    # The black-box case: six keep-alive clients, 20 requests each, b1 300 ms slower: b1 < 20%.
    clock = FakeClock(0.0)
    bs = backends(1, 1, 1)
    s = make_strategy(name, bs, clock=clock)
    s.rng.seed(3)
    counts = simulate(s, bs, clock, 6, 20, {"b1": 0.301, "b2": 0.001, "b3": 0.0015})
    assert sum(counts.values()) == 120
    assert counts["b1"] < 0.2 * 120


# ---- power of two choices ----------------------------------------------------------------------------

def test_power_of_two_spreads_sequential_requests() -> None:
    for seed in range(20):
        p2c = PowerOfTwo(backends(1, 1, 1), rng=random.Random(seed))
        counts = collections.Counter(picks(p2c, 300))
        assert all(45 <= counts[b] <= 150 for b in ("b1", "b2", "b3")), counts


def test_power_of_two_prefers_fewer_active_and_draws_distinct() -> None:
    bs = backends(1, 1, 1)
    p2c = PowerOfTwo(bs, rng=random.Random(1))
    bs[0].active = 10
    counts = collections.Counter(picks(p2c, 3000))
    assert counts["b1"] == 0  # b1 always loses: the second draw is never the first one again
    # Two backends: the idle one always wins.
    bs = backends(1, 1)
    p2c = PowerOfTwo(bs, rng=random.Random(1))
    bs[1].active = 1
    assert set(picks(p2c, 200)) == {"b1"}


def test_power_of_two_weighted_draws() -> None:
    # b1 idle, the others loaded: b1 wins exactly when it is one of the two draws. With weights
    # w, P(b1 drawn) = w1/W + sum_j wj/W * w1/(W - wj).
    weights = (1, 2, 3, 4)
    bs = backends(*weights)
    for b in bs[1:]:
        b.active = 1
    p2c = PowerOfTwo(bs, rng=random.Random(5))
    n = 40000
    got = picks(p2c, n).count("b1") / n
    total = sum(weights)
    expected = weights[0] / total + sum(w / total * weights[0] / (total - w) for w in weights[1:])
    assert abs(got - expected) < 0.01, (got, expected)
    # All idle: the first draw wins, so counts follow the weights.
    for b in bs:
        b.active = 0
    counts = collections.Counter(picks(p2c, n))
    for b, w in zip(bs, weights):
        assert abs(counts[b.name] / n - w / total) < 0.01


def test_power_of_two_single_backend() -> None:
    bs = backends(1)
    assert picks(PowerOfTwo(bs), 3) == ["b1"] * 3


# ---- random ------------------------------------------------------------------------------------------

def test_random_weighted_distribution_chi_square() -> None:
    weights = (1, 2, 3, 4)
    r = Random(backends(*weights), rng=random.Random(12345))
    n = 100000
    counts = collections.Counter(picks(r, n))
    total = sum(weights)
    chi2 = sum((counts["b%d" % (i + 1)] - n * w / total) ** 2 / (n * w / total) for i, w in enumerate(weights))
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_random_follows_eff_weight_updates() -> None:
    bs = backends(1, 1)
    r = Random(bs, rng=random.Random(2))
    bs[1].eff_weight = 3
    r.update(bs)
    counts = collections.Counter(picks(r, 20000))
    assert abs(counts["b2"] / 20000 - 0.75) < 0.02


def test_random_choose_excluding_is_weighted() -> None:
    bs = backends(1, 1, 3)
    r = Random(bs, rng=random.Random(9))
    counts = collections.Counter(r.choose_excluding(REQ, "x", [bs[0]]).name  # type: ignore[union-attr]
                                 for _ in range(20000))
    assert set(counts) == {"b2", "b3"}
    assert abs(counts["b3"] / 20000 - 0.75) < 0.02


# ---- ip hash -----------------------------------------------------------------------------------------

def ips(n: int) -> List[str]:
    return ["10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255) for i in range(n)]


def test_ip_hash_sticky_and_spread() -> None:
    bs = backends(1, 1, 1)
    h = IpHash(bs)
    for ip in ("127.0.0.1", "::1", "2001:db8::7", "192.168.1.20"):
        assert len(set(picks(h, 20, ip=ip))) == 1
    counts = collections.Counter(h.choose(REQ, ip).name for ip in ips(3000))  # type: ignore[union-attr]
    assert all(850 <= counts[b.name] <= 1150 for b in bs), counts
    # Independent instances agree (no per-process salt).
    h2 = IpHash(backends(1, 1, 1))
    assert all(h.choose(REQ, ip).name == h2.choose(REQ, ip).name for ip in ips(500))  # type: ignore[union-attr]


def test_ip_hash_respects_weights() -> None:
    h = IpHash(backends(2, 1, 1))
    counts = collections.Counter(h.choose(REQ, ip).name for ip in ips(4000))  # type: ignore[union-attr]
    assert 1800 <= counts["b1"] <= 2200 and 850 <= counts["b2"] <= 1150, counts


def test_ip_hash_golden_mapping() -> None:
    # Pinned: a change of hash function would move every client of every deployment.
    h = IpHash(backends(1, 1, 1, 1))
    assert "".join(h.choose(REQ, "10.0.0.%d" % i).name[-1] for i in range(40)) == (  # type: ignore[union-attr]
        "2424212414414432111222332243223114413131")


def test_ip_hash_choose_excluding_is_deterministic() -> None:
    bs = backends(1, 1, 1)
    h = IpHash(bs)
    for ip in ips(200):
        first = h.choose(REQ, ip)
        assert first is not None
        retry = h.choose_excluding(REQ, ip, [first])
        assert retry is not None and retry is not first
        assert h.choose_excluding(REQ, ip, [first]) is retry


# ---- consistent hash ---------------------------------------------------------------------------------

def user(key: str) -> RequestHead:
    return request("/", [("X-User", key)])


def mapping(s: Strategy, keys: Sequence[str]) -> Dict[str, str]:
    out = {}
    for k in keys:
        b = s.choose(user(k), "127.0.0.1")
        assert b is not None
        out[k] = b.name
    return out


KEYS = ["u%05d" % i for i in range(3000)]


def test_consistent_hash_same_names_same_mapping() -> None:
    a = ConsistentHash(backends(1, 1, 1, 1), hash_key="header:X-User")
    # Other Backend objects, other addresses and order: only the names matter.
    bs = backends(1, 1, 1, 1, names=["b3", "b1", "b4", "b2"])
    b = ConsistentHash(bs, hash_key="header:X-User")
    assert mapping(a, KEYS) == mapping(b, KEYS)
    assert mapping(a, KEYS) == mapping(a, KEYS)  # and the same key always goes to the same backend


def test_consistent_hash_golden_mapping() -> None:
    # Pinned: every balrs instance (any Python version) must map keys the same way.
    ch = ConsistentHash(backends(1, 1, 1, 1), hash_key="header:X-User")
    assert "".join(mapping(ch, ["u%03d" % i for i in range(40)]).values()).replace("b", "") == (
        "3213312223323433114234334311413122442323")


def test_consistent_hash_spread() -> None:
    bs = backends(*([1] * 10))
    ch = ConsistentHash(bs, hash_key="header:X-User")
    counts = collections.Counter(mapping(ch, KEYS).values())
    assert all(0.65 * 300 <= counts[b.name] <= 1.35 * 300 for b in bs), counts


def test_consistent_hash_weights() -> None:
    ch = ConsistentHash(backends(2, 1, 1), hash_key="header:X-User")
    counts = collections.Counter(mapping(ch, KEYS).values())
    assert 0.4 <= counts["b1"] / len(KEYS) <= 0.6, counts


def test_consistent_hash_removal_remaps_only_its_keys() -> None:
    bs = backends(1, 1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    before = mapping(ch, KEYS)
    ch.update(bs[:3])
    after = mapping(ch, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == "b4" for k in moved)
    assert len(moved) == sum(1 for k in KEYS if before[k] == "b4")
    assert len(moved) <= (1 / 4 + 0.06) * len(KEYS)
    # Putting it back restores the original mapping exactly.
    ch.update(bs)
    assert mapping(ch, KEYS) == before


def test_consistent_hash_addition_takes_about_1_over_n_plus_1() -> None:
    bs = backends(1, 1, 1, 1, 1)
    ch = ConsistentHash(bs[:4], hash_key="header:X-User")
    before = mapping(ch, KEYS)
    ch.update(bs)
    after = mapping(ch, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "b5" for k in moved)
    assert (1 / 5 - 0.06) * len(KEYS) <= len(moved) <= (1 / 5 + 0.06) * len(KEYS)


def test_consistent_hash_weight_change_moves_keys_only_to_that_backend() -> None:
    bs = backends(1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    before = mapping(ch, KEYS)
    bs[0].eff_weight = 2
    ch.update(bs)
    after = mapping(ch, KEYS)
    assert all(after[k] == "b1" for k in KEYS if before[k] != after[k])


def test_consistent_hash_caches_rings() -> None:
    bs = backends(1, 1, 1)
    ch = ConsistentHash(bs, hash_key="client_ip")
    ring = ch._ring
    ch.update(bs[:2])
    ch.update(bs)
    assert ch._ring is ring
    assert ConsistentHash(backends(1, 1, 1), hash_key="path")._ring is ring


def test_consistent_hash_bounded_load_hot_key() -> None:
    bs = backends(1, 1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    req = user("hot")
    home = mapping(ch, ["hot"])["hot"]
    for i in range(1, 201):  # one key, 200 requests in flight at once
        b = ch.choose(req, "x")
        assert b is not None
        b.active += 1
        assert all(x.active <= math.ceil(1.25 * i / 4) for x in bs), [x.active for x in bs]
    assert [b.active for b in bs] != [200, 0, 0, 0]
    # Load gone: the key maps to its own backend again.
    for b in bs:
        b.active = 0
    assert mapping(ch, ["hot"])["hot"] == home


def test_consistent_hash_bounded_load_skewed_keys() -> None:
    bs = backends(1, 1, 1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    rnd = random.Random(4)
    keys = ["k%d" % rnd.randrange(5) for _ in range(500)]  # five keys: very uneven
    for i, k in enumerate(keys, 1):
        b = ch.choose(user(k), "x")
        assert b is not None
        b.active += 1
        assert max(x.active for x in bs) <= math.ceil(1.25 * i / 5)


def test_consistent_hash_bounded_load_is_weighted() -> None:
    bs = backends(3, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    for i in range(1, 101):
        b = ch.choose(user("hot"), "x")
        assert b is not None
        b.active += 1
        assert bs[0].active <= math.ceil(1.25 * i * 3 / 4) and bs[1].active <= math.ceil(1.25 * i / 4)


def test_consistent_hash_missing_key_round_robin() -> None:
    bs = backends(1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    assert picks(ch, 6) == ["b1", "b2", "b3"] * 2
    empty = request("/", [("X-User", "")])
    assert picks(ch, 3, req=empty) == ["b1", "b2", "b3"]
    ck = ConsistentHash(bs, hash_key="cookie:sid")
    assert picks(ck, 3, req=request("/", [("Cookie", "other=1")])) == ["b1", "b2", "b3"]
    assert ch.choose_excluding(REQ, "x", [bs[0], bs[1]]) is bs[2]


def test_consistent_hash_header_name_case_insensitive() -> None:
    upper = ConsistentHash(backends(1, 1, 1), hash_key="header:X-User")
    lower = ConsistentHash(backends(1, 1, 1), hash_key="header:x-user")
    for k in KEYS[:300]:
        names = {s.choose(request("/", [(field, k)]), "x").name  # type: ignore[union-attr]
                 for s in (upper, lower) for field in ("X-User", "x-user", "X-USER")}
        assert len(names) == 1


def test_consistent_hash_header_combined_value() -> None:
    ch = ConsistentHash(backends(1, 1, 1), hash_key="header:X-User")
    two = request("/", [("X-User", "a"), ("Accept", "*/*"), ("X-User", "b")])
    one = request("/", [("X-User", "a, b")])
    for _ in range(3):
        assert ch.choose(two, "x") is ch.choose(one, "x")


def test_consistent_hash_path_ignores_query() -> None:
    ch = ConsistentHash(backends(1, 1, 1, 1), hash_key="path")
    for i in range(200):
        path = "/item/%d" % i
        forms = [path, path + "?a=1", path + "?b=2&c=3", "http://example.com" + path + "?x",
                 "HTTP://Example.com:8080" + path]
        assert len({ch.choose(request(t), "x").name for t in forms}) == 1  # type: ignore[union-attr]
    assert ch.choose(request("http://example.com"), "x") is ch.choose(request("/?q"), "x")
    counts = collections.Counter(ch.choose(request("/item/%d" % i), "x").name  # type: ignore[union-attr]
                                 for i in range(2000))
    assert len(counts) == 4


def test_consistent_hash_client_ip() -> None:
    ch = ConsistentHash(backends(1, 1, 1), hash_key="client_ip")
    assert len(set(picks(ch, 20, ip="127.0.0.1"))) == 1
    counts = collections.Counter(ch.choose(REQ, ip).name for ip in ips(3000))  # type: ignore[union-attr]
    assert all(700 <= c <= 1300 for c in counts.values()) and len(counts) == 3


@pytest.mark.parametrize("cookies, name, value", [
    (["a=1; b=2"], "b", "2"),
    (["a=1; b=2"], "a", "1"),
    (["b=2;a=1"], "a", "1"),
    (["ab=1; a=2"], "a", "2"),
    (["ba=1; a=2"], "a", "2"),
    (["b=a=1"], "a", None),
    (["x=a=b"], "x", "a=b"),
    (["  a = 3 ; b=4"], "a", "3"),
    (["a=1; a=2"], "a", "1"),
    (["A=1"], "a", None),
    (["a"], "a", None),
    (["a=; b=2"], "a", ""),
    (['sid="q v"'], "sid", '"q v"'),
    (["x=1", "a=5"], "a", "5"),
    (["a=1", "a=2"], "a", "1"),
    ([], "a", None),
    (["; ;a=9;"], "a", "9"),
])
def test_cookie_parsing(cookies: List[str], name: str, value: Optional[str]) -> None:
    req = request("/", [("Cookie", c) for c in cookies] + [("X-Other", "a=7")])
    got = cookie_value(req, name.encode())
    assert got == (None if value is None else value.encode())


def test_consistent_hash_cookie_key() -> None:
    ch = ConsistentHash(backends(1, 1, 1, 1), hash_key="cookie:sid")
    by_header = ConsistentHash(backends(1, 1, 1, 1), hash_key="header:X-User")
    for k in KEYS[:300]:
        a = ch.choose(request("/", [("Cookie", "theme=dark; sid=%s; x=1" % k)]), "x")
        b = ch.choose(request("/", [("Cookie", "sid=%s" % k)]), "x")
        c = by_header.choose(user(k), "x")  # the same key hashes the same, whatever its source
        assert a is not None and b is not None and c is not None
        assert a.name == b.name == c.name
    # An empty cookie value counts as missing: round robin.
    assert len(set(picks(ch, 4, req=request("/", [("Cookie", "sid=")])))) == 4


def test_consistent_hash_choose_excluding_is_the_next_on_the_ring() -> None:
    # Excluding a key's backend gives what removing that backend would: the next one clockwise.
    bs = backends(1, 1, 1, 1)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    before = mapping(ch, KEYS[:500])
    by_name = {b.name: b for b in bs}
    for removed in bs:
        rest = ConsistentHash([b for b in bs if b is not removed], hash_key="header:X-User")
        for k in KEYS[:500]:
            if before[k] == removed.name:
                got = ch.choose_excluding(user(k), "x", [removed])
                assert got is not None and got.name == rest.choose(user(k), "x").name  # type: ignore[union-attr]
    k = KEYS[0]
    assert ch.choose_excluding(user(k), "x", bs) is None
    assert ch.choose_excluding(user(k), "x", [b for b in bs if b.name != "b2"]) is by_name["b2"]


def test_consistent_hash_many_backends_and_heavy_weights() -> None:
    bs = backends(*([256] * 50))
    ch = ConsistentHash(bs, hash_key="header:X-User")
    assert MAX_RING_POINTS // 2 <= len(ch._ring) <= MAX_RING_POINTS
    counts = collections.Counter(mapping(ch, KEYS).values())
    assert len(counts) == 50
    # Heavy weights: fewer points per unit, but a slow-start step of one backend still moves only
    # keys to or from it.
    bs = backends(256, 256, 256)
    ch = ConsistentHash(bs, hash_key="header:X-User")
    before = mapping(ch, KEYS)
    assert all(abs(c - 1000) < 150 for c in collections.Counter(before.values()).values())
    bs[0].eff_weight = 200
    ch.update(bs)
    after = mapping(ch, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == "b1" for k in moved)


def test_consistent_hash_unknown_key() -> None:
    with pytest.raises(ValueError):
        ConsistentHash(backends(1), hash_key="header:")
