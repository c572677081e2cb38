"""Strategy unit tests: distribution and smoothness, with real Backend objects (no I/O)."""

from __future__ import annotations

import collections
from typing import List

import pytest

from balrs.config import Address, BackendConfig
from balrs.http.heads import parse_request_head
from balrs.pool import Backend, Pool
from balrs.strategies import RoundRobin, make_strategy, smooth_weighted_sequence

REQ = parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def backends(*weights: int) -> List[Backend]:
    return [Backend(BackendConfig("b%d" % (i + 1), Address("127.0.0.1", 9000 + i), w))
            for i, w in enumerate(weights)]


def picks(strategy: RoundRobin, n: int) -> List[str]:
    out = []
    for _ in range(n):
        b = strategy.choose(REQ, "127.0.0.1")
        assert b is not None
        out.append(b.name)
    return out


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
                "round_robin")
    pool.backends[0].up = False
    pool.refresh()
    assert {pool.choose(REQ, "x").name for _ in range(4)} == {"b"}  # type: ignore[union-attr]


def test_unknown_strategy_name() -> None:
    with pytest.raises(ValueError):
        make_strategy("fastest_first", [])
