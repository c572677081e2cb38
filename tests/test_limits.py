"""balrs.limits on a fake clock: the retry budget's share and floor over its sliding window, the
per-client token buckets (refill, Retry-After, bounded LRU evicting only full buckets), and the
per-client connection counts."""

from __future__ import annotations

import pytest

from balrs.limits import ClientBuckets, ClientConnections, RetryBudget


def test_budget_floor_allows_three_per_second_without_traffic() -> None:
    b = RetryBudget(0.2)
    t = 1000.0
    assert [b.try_retry(t) for _ in range(4)] == [True, True, True, False]
    assert b.try_retry(t + 1.0)  # a new second: the floor again
    assert (b.retries, b.exhausted) == (4, 1)


def test_budget_share_of_the_window() -> None:
    b = RetryBudget(0.2)
    t = 1000.0
    for i in range(100):
        b.request(t + i * 0.05)  # 100 requests over 5 s
    now = t + 5.0
    allowed = sum(b.try_retry(now) for _ in range(50))
    assert allowed == 20  # 20% of 100 (the floor is within it)
    assert b.exhausted == 30


def test_budget_window_slides() -> None:
    b = RetryBudget(0.5, window=10)
    t = 1000.0
    for _ in range(10):
        b.request(t)
    assert sum(b.try_retry(t) for _ in range(10)) == 5
    # 9 s later the requests still count, the retries too: no more budget beyond the floor.
    assert sum(b.try_retry(t + 9.0) for _ in range(10)) == 3
    # 10 s later the slot of those requests and retries has left the window.
    for _ in range(2):
        b.request(t + 10.5)
    assert sum(b.try_retry(t + 10.5) for _ in range(10)) == 3  # the floor: window has 2 req, 3 retries
    # Long silence: everything forgotten.
    assert sum(b.try_retry(t + 100.0) for _ in range(10)) == 3


def test_budget_zero_ratio_is_the_floor_only() -> None:
    b = RetryBudget(0.0)
    for i in range(1000):
        b.request(5.0 + i / 1000)
    assert sum(b.try_retry(5.9) for _ in range(10)) == 3


def test_bucket_burst_then_rate_and_retry_after() -> None:
    cb = ClientBuckets(rate=2.0, burst=4.0)
    t = 50.0
    assert [cb.take("a", t) for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    wait = cb.take("a", t)
    assert wait == pytest.approx(0.5)
    assert cb.take("b", t) == 0.0  # another client has its own bucket
    assert cb.take("a", t + 0.5) == 0.0  # one token back after 1/rate
    assert cb.take("a", t + 0.5) > 0.0
    assert cb.take("a", t + 100.0) == 0.0  # refills to the burst, not beyond
    assert [cb.take("a", t + 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert cb.take("a", t + 100.0) > 0.0


def test_bucket_default_burst_is_the_rate() -> None:
    cb = ClientBuckets(rate=3.0)
    assert sum(cb.take("a", 1.0) == 0.0 for _ in range(10)) == 3


def test_bucket_below_one_per_second_still_admits() -> None:
    cb = ClientBuckets(rate=0.5)  # burst defaults to the rate, but a bucket holds at least one token
    assert cb.take("a", 1.0) == 0.0
    assert cb.take("a", 1.0) == pytest.approx(2.0)
    assert cb.take("a", 3.0) == 0.0


def test_buckets_bounded_evict_only_full() -> None:
    cb = ClientBuckets(rate=1.0, burst=2.0, max_clients=3)
    t = 10.0
    for c in ("a", "b", "c"):
        cb.take(c, t)
    # All three are active (not refilled): a fourth client is admitted untracked, nobody is evicted.
    assert cb.take("d", t) == 0.0
    assert len(cb) == 3 and cb.untracked == 1
    # "a" is being limited; it keeps its state.
    cb.take("a", t)
    assert cb.take("a", t) > 0.0
    # Later, "b" (least recently used) has refilled: it makes room for "d".
    assert cb.take("d", t + 5.0) == 0.0
    assert len(cb) == 3 and cb.untracked == 1
    for _ in range(200):
        cb.take("x%d" % _, t + 5.0)
    assert len(cb) <= 3


def test_connections_limit_and_cleanup() -> None:
    cc = ClientConnections(2)
    assert cc.open("a") and cc.open("a")
    assert not cc.open("a")
    assert cc.open("b")
    assert cc.count("a") == 2
    cc.close("a")
    assert cc.open("a")
    for _ in range(3):
        cc.close("a")
    cc.close("b")
    assert len(cc) == 0  # nothing kept for clients without connections
