"""Tests for balrs.timerwheel: a fake clock, a heapq reference model, and the edge cases.

No test sleeps or times anything: the wheel runs on `FakeClock` (cf. trio's
``trio/testing/_fake_clock.py``), and cost is checked by counting the slots `run()` visits
(``TimerWheel._visits``), never with a stopwatch.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import sys
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balrs.timerwheel import LEVELS, SLOTS, Timer, TimerWheel, _nextafter_bits

SPAN_TICKS: int = SLOTS**LEVELS  # ticks covered by the wheel proper; beyond that: overflow
# math.nextafter is 3.9+; on 3.8 the tests use the wheel's own fallback (checked below against known values).
nextafter: Callable[[float, float], float] = getattr(math, "nextafter", _nextafter_bits)


class FakeClock:
    """A clock that only moves when the test says so."""

    __slots__ = ("now", "reads")

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def noop() -> None:
    pass


def tick_of(x: float, resolution: float) -> int:
    return math.floor(x * (1.0 / resolution))


def drive(wheel: TimerWheel, clock: FakeClock, max_wakeups: int = 1000) -> int:
    """The reactor pattern: sleep next_timeout, run; until no timer is left. Returns wake-ups."""
    wakeups = 0
    while len(wheel):
        timeout = wheel.next_timeout(clock.now)
        assert timeout is not None and timeout >= 0.0
        clock.now += timeout
        wheel.run(clock.now)
        wakeups += 1
        assert wakeups <= max_wakeups, "busy loop: the wheel keeps asking to be woken"
    return wakeups


# --------------------------------------------------------------------------------------
# The reference model
# --------------------------------------------------------------------------------------

Action = Callable[["Model"], None]


class Model:
    """Drives a TimerWheel and a heapq reference side by side; checks them after each run."""

    def __init__(self, rng: random.Random, resolution: float, start: float) -> None:
        self.rng = rng
        self.res = resolution
        self.span = SPAN_TICKS * resolution
        self.clock = FakeClock(start)
        self.wheel = TimerWheel(self.clock, resolution)
        self.timers: dict[int, Timer] = {}  # every timer ever made, by sequence number
        self.live: set[int] = set()  # the reference's idea of active timers
        self.heap: list[tuple[float, int]] = []  # (when, seq), lazily pruned
        self.seq = 0
        self.in_run = False
        self.fired: list[int] = []
        self.staged: set[int] = set()  # scheduled by callbacks during the current run
        self.cancelled_in_run: set[int] = set()
        self.total_fired = 0

    # -- operations ---------------------------------------------------------------------

    def schedule_at(self, when: float, action: Action | None = None) -> int:
        seq = self.seq
        self.seq += 1

        def callback() -> None:
            self.on_fire(seq, action)

        timer = self.wheel.call_at(when, callback)
        assert timer.when == when and timer.callback is callback and timer.active
        self.timers[seq] = timer
        self.live.add(seq)
        heapq.heappush(self.heap, (when, seq))
        if self.in_run:
            self.staged.add(seq)
        return seq

    def schedule_later(self, delay: float, action: Action | None = None) -> int:
        return self.schedule_at(self.clock.now + delay, action)

    def cancel(self, seq: int) -> None:
        timer = self.timers[seq]
        was_live = seq in self.live
        assert timer.active == was_live
        if self.rng.random() < 0.5:
            timer.cancel()
        else:
            self.wheel.cancel(timer)
        assert not timer.active
        if was_live:
            self.live.discard(seq)
            if self.in_run:
                self.cancelled_in_run.add(seq)

    def cancel_random(self) -> None:
        if self.timers:
            if self.live and self.rng.random() < 0.8:
                self.cancel(self.rng.choice(sorted(self.live)))
            else:
                self.cancel(self.rng.randrange(self.seq))  # maybe fired or cancelled: a no-op

    def on_fire(self, seq: int, action: Action | None) -> None:
        timer = self.timers[seq]
        assert self.in_run, "fired outside run()"
        assert seq in self.live, "fired twice, or fired after cancel"
        assert seq not in self.staged, "a timer scheduled during this run fired in it"
        assert not timer.active
        assert timer.when <= self.clock.now, "fired early"
        self.live.discard(seq)
        self.fired.append(seq)
        if action is not None:
            action(self)

    def run(self, now: float) -> None:
        if now < self.wheel.wake_at and self.rng.random() < 0.5:
            # The reactor's fast path: before wake_at it calls neither run() nor next_timeout(),
            # so the wheel's cursor lags; nothing may be due meanwhile.
            earliest = self.earliest()
            assert earliest is None or earliest > now, "a timer was due before wake_at"
            self.clock.now = now
            self.check()
            return
        self.clock.now = now
        due = set()
        while self.heap and self.heap[0][0] <= now:
            _, seq = heapq.heappop(self.heap)
            if seq in self.live:
                due.add(seq)
        self.fired = []
        self.staged = set()
        self.cancelled_in_run = set()
        self.in_run = True
        try:
            count = self.wheel.run(now)
        finally:
            self.in_run = False
        assert count == len(self.fired)
        self.total_fired += count
        # Exactly the reference's due timers fired, minus those a callback cancelled first.
        assert len(set(self.fired)) == len(self.fired)
        assert set(self.fired) == due - self.cancelled_in_run
        whens = [self.timers[s].when for s in self.fired]
        assert whens == sorted(whens), "fired out of order"
        ticks = [tick_of(w, self.res) for w in whens]
        assert ticks == sorted(ticks)
        # Re-push staged timers that were due and so got popped above... they were pushed
        # after the pops, so the heap still holds them; nothing to do.
        self.check(after_run=True)

    # -- invariants -----------------------------------------------------------------------

    def earliest(self) -> float | None:
        while self.heap and self.heap[0][1] not in self.live:
            heapq.heappop(self.heap)
        return self.heap[0][0] if self.heap else None

    def check(self, after_run: bool = False) -> None:
        now = self.clock.now
        wheel = self.wheel
        assert len(wheel) == len(self.live)
        for seq in self.live:
            assert self.timers[seq].active
            if after_run and seq not in self.staged:
                assert self.timers[seq].when > now, "a due timer survived run()"
        earliest = self.earliest()
        timeout = wheel.next_timeout(now)
        if earliest is None:
            assert timeout is None and wheel.wake_at == math.inf
            return
        # wake_at, once next_timeout has set it, is never later than the earliest timer.
        if timeout > 0.0:
            assert now < wheel.wake_at <= earliest
        assert timeout is not None and timeout >= 0.0
        if earliest <= now:
            assert timeout == 0.0
        else:
            assert timeout <= earliest - now, "next_timeout would sleep past a timer"
            if after_run:
                # Right after run(now) nothing is pending at `now`: no busy wake-up.
                assert timeout > 0.0
        # The same question at a later instant, without running the wheel in between.
        later = now + self.rng.choice([0.0, self.res / 3, 1.0, 100.0])
        timeout = wheel.next_timeout(later)
        assert timeout is not None and timeout >= 0.0
        assert timeout <= max(0.0, earliest - later)


def random_delay(rng: random.Random, res: float, span: float) -> float:
    kind = rng.randrange(12)
    if kind == 0:
        return 0.0
    if kind == 1:
        return -rng.uniform(0.0, 100.0)  # in the past
    if kind == 2:
        return rng.uniform(0.0, 3 * res)
    if kind == 3:
        return rng.randrange(0, 300) * res
    if kind == 4:
        return rng.uniform(0.0, 0.2)
    if kind == 5:
        return rng.uniform(0.0, 30.0)
    if kind == 6:
        return rng.uniform(0.0, 3600.0)
    if kind == 7:
        return rng.uniform(0.0, 6 * 3600.0)
    if kind == 8:
        return rng.uniform(0.0, 10 * 86400.0)
    if kind == 9:
        return span * rng.uniform(0.5, 3.0)  # around and beyond the top level
    if kind == 10:
        return rng.expovariate(1 / 5.0)
    return rng.uniform(0.0, 64 * 64 * res)


def random_when(model: Model) -> float:
    """Mostly now + delay; sometimes exactly on, or an ulp beside, a tick boundary."""
    rng, res, now = model.rng, model.res, model.clock.now
    if rng.random() < 0.2:
        when = (tick_of(now, res) + rng.randrange(-2, 5000)) * res
        direction = rng.choice([0, -1, 1])
        if direction:
            when = nextafter(when, direction * math.inf)
        return when
    return now + random_delay(rng, res, model.span)


def random_action(model: Model) -> Action | None:
    kind = model.rng.randrange(6)
    if kind == 0:

        def schedule_child(m: Model) -> None:
            for _ in range(m.rng.randrange(1, 3)):
                m.schedule_at(random_when(m), random_action(m) if m.rng.random() < 0.2 else None)

        return schedule_child
    if kind == 1:
        return Model.cancel_random
    if kind == 2:

        def rearm_now(m: Model) -> None:
            m.schedule_later(m.rng.choice([0.0, -1.0, m.res / 2]))

        return rearm_now
    return None


def random_advance(model: Model) -> float:
    rng, res, now = model.rng, model.res, model.clock.now
    kind = rng.randrange(11)
    if kind == 0:
        return now
    if kind == 1:
        return now + rng.uniform(0.0, res)
    if kind == 2:
        return now + res
    if kind == 3:
        return now + rng.uniform(0.0, 0.3)
    if kind == 4:
        return now + rng.uniform(0.0, 60.0)
    if kind == 5:
        return now + rng.uniform(0.0, 3 * 3600.0)
    if kind == 6:
        return now + rng.uniform(0.0, 20 * 86400.0)
    if kind == 7:
        return now + model.span * rng.uniform(0.3, 3.0)  # beyond the whole wheel
    earliest = model.earliest()
    if kind == 8 and earliest is not None:
        # Exactly at, or an ulp before, the earliest expiry.
        return max(now, earliest if rng.random() < 0.5 else nextafter(earliest, -math.inf))
    timeout = model.wheel.next_timeout(now)  # the reactor's own pattern
    return now + (timeout if timeout is not None else 1.0)


RESOLUTIONS = [0.001, 1e-6, 0.1, 0.25, 0.0007]
STARTS = [0.0, 1_000_000.123, -50.0, 12.345]


@pytest.mark.parametrize("seed", range(24))
def test_matches_heapq_reference(seed: int) -> None:
    rng = random.Random(seed)
    model = Model(rng, RESOLUTIONS[seed % len(RESOLUTIONS)], STARTS[seed % len(STARTS)])
    model.check()
    for _ in range(250):
        for _ in range(rng.randrange(0, 8)):
            model.schedule_at(random_when(model), random_action(model))
        cancels = rng.randrange(0, 4) + (len(model.live) > 300) * 20
        for _ in range(cancels):
            model.cancel_random()
        model.check()
        model.run(random_advance(model))
    assert model.total_fired > 0
    # Drain everything that is left (callbacks may keep scheduling for a while).
    while model.live:
        model.run(model.clock.now + 4 * model.span)
    assert len(model.wheel) == 0 and model.wheel.next_timeout() is None


delays = st.one_of(
    st.sampled_from([0.0, -1.0, 0.001, 0.0015, 0.064, 4.096, 3600.0, 86400.0 * 800, 1e9]),
    st.floats(min_value=-10.0, max_value=1e5, allow_nan=False),
    st.floats(min_value=0.0, max_value=0.2),
)
advances = st.one_of(
    st.sampled_from([0.0, 0.0005, 0.001, 0.063, 0.064, 4.096, 3600.0, 86400.0 * 800, 1e10]),
    st.floats(min_value=0.0, max_value=1e5),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("at"), delays, st.integers(0, 5)),
        st.tuples(st.just("cancel"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("advance"), advances, st.just(0)),
        st.tuples(st.just("follow"), st.just(0.0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    resolution=st.sampled_from([0.001, 1e-6, 0.1]),
    start=st.sampled_from([0.0, 1e6 + 0.5]),
    seed=st.integers(0, 2**32),
)
def test_matches_heapq_reference_hypothesis(
    ops: list[tuple[str, float, int]], resolution: float, start: float, seed: int
) -> None:
    model = Model(random.Random(seed), resolution, start)
    for op, value, kind in ops:
        if op == "at":
            action = random_action(model) if kind == 0 else None
            model.schedule_later(value, action)
            model.check()
        elif op == "cancel":
            if model.seq:
                model.cancel(value % model.seq)  # type: ignore[arg-type]
            model.check()
        elif op == "advance":
            model.run(model.clock.now + value)
        else:
            timeout = model.wheel.next_timeout(model.clock.now)
            model.run(model.clock.now + (timeout if timeout is not None else 0.0))
    model.run(model.clock.now + 1e12)


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------


def make(now: float = 0.0, resolution: float = 0.001) -> tuple[TimerWheel, FakeClock]:
    clock = FakeClock(now)
    return TimerWheel(clock, resolution), clock


def test_empty_wheel() -> None:
    wheel, clock = make()
    assert len(wheel) == 0 and not wheel
    assert wheel.next_timeout() is None
    assert wheel.run() == 0
    assert wheel.run(1e9) == 0
    assert wheel.next_timeout(1e9) is None
    assert wheel.clock is clock


def test_cancel_twice_and_after_fire() -> None:
    wheel, _ = make()
    fired: list[str] = []
    a = wheel.call_later(1.0, lambda: fired.append("a"))
    b = wheel.call_later(1.0, lambda: fired.append("b"))
    assert a.active and b.active and len(wheel) == 2
    a.cancel()
    a.cancel()
    wheel.cancel(a)
    assert not a.active and len(wheel) == 1
    assert wheel.run(1.0) == 1
    assert fired == ["b"] and not b.active and len(wheel) == 0
    b.cancel()
    wheel.cancel(b)
    assert len(wheel) == 0 and wheel.next_timeout(1.0) is None
    assert wheel.run(100.0) == 0


def test_cancel_inside_another_callback() -> None:
    wheel, _ = make()
    fired: list[str] = []
    same_tick = wheel.call_at(1.0004, lambda: fired.append("same tick"))
    later = wheel.call_at(2.0, lambda: fired.append("later"))
    far = wheel.call_at(5000.0, lambda: fired.append("far"))

    def first() -> None:
        fired.append("first")
        same_tick.cancel()
        later.cancel()
        far.cancel()
        first_timer.cancel()  # itself, already fired: a no-op

    first_timer = wheel.call_at(1.0, first)
    assert wheel.run(10_000.0) == 1
    assert fired == ["first"]
    assert len(wheel) == 0 and wheel.next_timeout(10_000.0) is None


def test_schedule_in_the_past_and_exactly_now() -> None:
    wheel, _ = make(100.0)
    fired: list[str] = []
    wheel.call_at(50.0, lambda: fired.append("past"))
    wheel.call_later(-3.0, lambda: fired.append("negative delay"))
    wheel.call_at(100.0, lambda: fired.append("now"))
    wheel.call_later(0.0, lambda: fired.append("zero delay"))
    assert wheel.next_timeout() == 0.0
    assert wheel.run() == 4
    assert fired[:2] == ["past", "negative delay"]  # by when; equal whens in any order
    assert sorted(fired[2:]) == ["now", "zero delay"]
    assert wheel.next_timeout() is None


def test_past_timer_after_the_wheel_moved_on() -> None:
    wheel, _ = make()
    wheel.run(500.0)
    fired: list[float] = []
    wheel.call_at(1.0, lambda: fired.append(1.0))
    wheel.call_at(499.9999, lambda: fired.append(499.9999))
    assert wheel.next_timeout(500.0) == 0.0
    assert wheel.run(500.0) == 2
    assert fired == [1.0, 499.9999]


def test_clock_stepping_back_never_fires_early() -> None:
    wheel, _ = make()
    wheel.run(10.0)
    fired: list[float] = []
    wheel.call_at(5.0, lambda: fired.append(5.0))  # in the wheel's past, but not in ours
    assert wheel.run(3.0) == 0  # the clock went back: 5.0 is not due at 3.0
    assert wheel.next_timeout(3.0) == pytest.approx(2.0)
    assert wheel.run(5.0) == 1 and fired == [5.0]


def test_within_one_tick_compares_floats() -> None:
    wheel, _ = make(0.0, resolution=0.001)
    fired: list[float] = []
    for when in (1.0001, 1.0005, 1.0009):
        wheel.call_at(when, lambda when=when: fired.append(when))  # type: ignore[misc]
    assert wheel.run(1.0000) == 0
    assert wheel.next_timeout(1.0) == pytest.approx(0.0001)
    assert wheel.run(1.0004) == 1 and fired == [1.0001]
    assert wheel.next_timeout(1.0004) == pytest.approx(0.0001)
    assert wheel.run(1.0004) == 0
    assert wheel.run(1.0009) == 2 and fired == [1.0001, 1.0005, 1.0009]


@pytest.mark.parametrize("resolution", [0.1, 0.001, 1e-6, 0.3, 0.0007])
@pytest.mark.parametrize("start", [0.0, 1e6 + 0.7])
def test_tick_boundaries_and_float_rounding_never_early(resolution: float, start: float) -> None:
    """Expiries on tick boundaries (k * resolution as floats, which are rounded) and an ulp
    either side: the wheel must not fire at the previous float, and must fire at `when`."""
    rng = random.Random(7)
    wheel, _ = make(start, resolution)
    base = tick_of(start, resolution)
    whens = set()
    for k in range(1, 400):
        boundary = (base + k) * resolution
        whens.update({boundary, nextafter(boundary, math.inf), nextafter(boundary, -math.inf)})
        whens.add(start + k * resolution)  # the same boundary reached by addition
        whens.add(start + rng.uniform(0, 400 * resolution))
    whens_sorted = sorted(w for w in whens if w > start)
    fired: list[float] = []
    timers = {}
    for when in whens_sorted:
        timers[when] = wheel.call_at(when, lambda when=when: fired.append(when))  # type: ignore[misc]
    for i, when in enumerate(whens_sorted):
        before = nextafter(when, -math.inf)
        wheel.run(before)
        assert timers[when].active, f"fired early: when={when!r} now={before!r}"
        assert len(fired) == i
        timeout = wheel.next_timeout(before)
        assert timeout is not None and timeout <= when - before
        wheel.run(when)
        assert not timers[when].active
        assert fired[-1] == when and len(fired) == i + 1
    assert fired == whens_sorted


@pytest.mark.parametrize("resolution", [0.1, 0.001, 0.0007])
def test_reactor_loop_never_early_on_awkward_floats(resolution: float) -> None:
    rng = random.Random(3)
    wheel, clock = make(1e5 + 0.1, resolution)
    fired: list[tuple[float, float]] = []
    for _ in range(300):
        when = clock.now + rng.choice([0.1, 0.3, 0.7, 1.1]) * rng.randrange(1, 5000) * resolution
        wheel.call_at(when, lambda when=when: fired.append((when, clock.now)))  # type: ignore[misc]
    drive(wheel, clock, max_wakeups=2000)
    assert len(fired) == 300
    assert all(when <= now for when, now in fired)
    assert [w for w, _ in fired] == sorted(w for w, _ in fired)


def test_beyond_the_top_level_overflow() -> None:
    resolution = 0.001
    span = SPAN_TICKS * resolution  # 2.2 years
    wheel, clock = make(0.0, resolution)
    fired: list[float] = []
    whens = [span * 1.5, span * 3.25 + 0.0005, span * 10, span - 1.0, span + 1.0, 1.0]
    for when in whens:
        wheel.call_at(when, lambda when=when: fired.append(when))  # type: ignore[misc]
    cancelled = wheel.call_at(span * 2.5, lambda: fired.append(-1.0))
    cancelled.cancel()  # the overflow's lower bound is now stale: must stay harmless
    timeout = wheel.next_timeout(0.0)
    assert timeout is not None and 0.0 < timeout <= 1.0
    assert wheel.run(1.0) == 1
    timeout = wheel.next_timeout(1.0)
    assert timeout is not None and timeout > 3600.0  # no waking up for a far-away timer
    # One huge jump fires the in-span ones and keeps the rest, never early.
    assert wheel.run(span * 2) == 3 and fired == [1.0, span - 1.0, span + 1.0, span * 1.5]
    assert len(wheel) == 2
    wakeups = drive(wheel, clock)
    assert fired == sorted(whens)
    assert wakeups <= 3 * (LEVELS + 3)


def test_overflow_timer_fires_when_driven_step_by_step() -> None:
    wheel, clock = make(0.0, resolution=1e-6)  # span 19 hours: days are overflow
    span = SPAN_TICKS * 1e-6
    fired: list[float] = []
    when = 3 * 86400.0 + 0.25
    wheel.call_at(when, lambda: fired.append(clock.now))
    wakeups = drive(wheel, clock)
    assert fired == [when]
    assert wakeups <= (when / span) + LEVELS + 3  # one overflow window check per span, at most


def test_huge_jump_fires_thousands_in_order() -> None:
    rng = random.Random(11)
    wheel, _ = make(1e6, 0.001)
    fired: list[float] = []
    whens = [1e6 + rng.uniform(-5.0, 10 * 86400.0) for _ in range(5000)]
    whens += [1e6 + rng.randrange(0, 100) * 0.001 for _ in range(500)]  # many per tick
    whens += [1e6 + SPAN_TICKS * 0.001 * rng.uniform(1, 3) for _ in range(50)]  # overflow
    for when in whens:
        wheel.call_at(when, lambda when=when: fired.append(when))  # type: ignore[misc]
    later = 1e6 + SPAN_TICKS * 0.001 * 4
    assert wheel.run(later) == len(whens)
    assert fired == sorted(whens)
    assert len(wheel) == 0 and wheel.next_timeout(later) is None
    # Cost follows timers x levels, not the 2.7e11 elapsed ticks.
    assert wheel._visits <= len(whens) * (LEVELS + 1) + 10


def test_raising_callback_is_logged_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    wheel, _ = make()
    fired: list[str] = []

    def bad() -> None:
        fired.append("bad")
        raise ValueError("boom")

    wheel.call_at(1.0, lambda: fired.append("before"))
    bad_timer = wheel.call_at(1.5, bad)
    wheel.call_at(1.5, lambda: fired.append("same tick"))
    wheel.call_at(2.0, lambda: fired.append("after"))
    with caplog.at_level(logging.ERROR, logger="balrs.timerwheel"):
        assert wheel.run(3.0) == 4
    assert sorted(fired) == ["after", "bad", "before", "same tick"]
    assert fired[0] == "before" and fired[-1] == "after"
    assert not bad_timer.active and len(wheel) == 0
    records = [r for r in caplog.records if r.name == "balrs.timerwheel"]
    assert len(records) == 1 and records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ValueError)


def test_base_exception_propagates_with_the_wheel_consistent() -> None:
    class Stop(BaseException):
        pass

    wheel, _ = make()
    fired: list[str] = []

    def stop() -> None:
        fired.append("stop")
        wheel.call_at(0.0, lambda: fired.append("staged"))  # scheduled during the run
        raise Stop

    wheel.call_at(1.0, lambda: fired.append("a"))
    stop_timer = wheel.call_at(2.0, stop)
    c = wheel.call_at(3.0, lambda: fired.append("c"))
    wheel.call_at(4.0, lambda: fired.append("d"))
    with pytest.raises(Stop):
        wheel.run(5.0)
    assert fired == ["a", "stop"]
    assert not stop_timer.active and c.active and len(wheel) == 3
    assert wheel.next_timeout(5.0) == 0.0
    assert wheel.run(5.0) == 3
    assert sorted(fired[2:]) == ["c", "d", "staged"]
    assert len(wheel) == 0


def test_run_is_not_reentrant() -> None:
    wheel, _ = make()
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            wheel.run(1.0)
        except RuntimeError as exc:
            errors.append(exc)

    wheel.call_at(1.0, nested)
    assert wheel.run(1.0) == 1
    assert len(errors) == 1


def test_timers_scheduled_by_callbacks_fire_next_run() -> None:
    wheel, clock = make()
    count = 0

    def rearm() -> None:
        nonlocal count
        count += 1
        wheel.call_later(0.0, rearm, now=clock.now)  # due at once: must not livelock run()

    wheel.call_at(1.0, rearm)
    clock.now = 1.0
    assert wheel.run() == 1
    assert len(wheel) == 1 and wheel.next_timeout() == 0.0
    assert wheel.run() == 1 and wheel.run() == 1 and count == 3

    future: list[str] = []
    wheel2, _ = make()
    wheel2.call_at(1.0, lambda: wheel2.call_at(1.5, lambda: future.append("child")))
    assert wheel2.run(2.0) == 1 and future == []  # staged, even though 1.5 <= 2.0
    assert wheel2.next_timeout(2.0) == 0.0
    assert wheel2.run(2.0) == 1 and future == ["child"]


def test_next_timeout_from_inside_a_callback() -> None:
    wheel, _ = make()
    seen: list[float | None] = []

    def cb() -> None:
        wheel.call_later(10.0, noop, now=1.0)
        seen.append(wheel.next_timeout(1.0))

    wheel.call_at(1.0, cb)
    wheel.run(1.0)
    assert seen == [0.0]  # conservative while the new timer is staged
    timeout = wheel.next_timeout(1.0)  # now in the wheel: a slot boundary, at most 10 s away
    assert timeout is not None and 5.0 < timeout <= 10.0


@pytest.mark.parametrize(
    "distance", [0.0005, 0.010, 0.5, 30.0, 3600.0, 86400.0, 30 * 86400.0, SPAN_TICKS * 0.001 * 0.9]
)
@pytest.mark.parametrize("start", [0.0, 1e6 + 0.0371, 4.0959])
def test_no_work_while_idle(distance: float, start: float) -> None:
    wheel, clock = make(start)
    fired: list[float] = []
    when = start + distance
    wheel.call_at(when, lambda: fired.append(clock.now))
    timeout = wheel.next_timeout()
    assert timeout is not None and timeout <= when - start
    if distance >= 3600.0:
        # Woken at worst one top-level slot early, never every tick.
        assert timeout >= distance / 2
    wakeups = drive(wheel, clock)
    assert len(fired) == 1 and fired[0] >= when
    assert fired[0] - when < 0.002  # on time, give or take float noise around the tick
    assert wakeups <= LEVELS + 3


def test_hour_away_timer_first_timeout_is_large() -> None:
    wheel, _ = make()
    wheel.call_later(3600.0, noop)
    timeout = wheel.next_timeout()
    assert timeout is not None and timeout > 3000.0
    # Asking again without time passing (a spurious wake-up) changes nothing.
    assert wheel.run(0.0) == 0 and wheel.next_timeout(0.0) == timeout


def test_jump_of_ten_million_ticks_is_cheap() -> None:
    wheel, _ = make(0.0, 0.001)
    fired: list[float] = []
    rng = random.Random(5)
    whens = [rng.uniform(0.0, 10_000.0) for _ in range(5)]
    for when in whens:
        wheel.call_at(when, lambda when=when: fired.append(when))  # type: ignore[misc]
    assert wheel.run(10_000.0) == 5  # 10**7 ticks
    assert fired == sorted(whens)
    assert wheel._visits <= 5 * LEVELS + 1  # each timer: at most one visit per level
    # An idle jump costs nothing; a jump of 10**15 ticks with a few timers stays cheap.
    visits = wheel._visits
    wheel.run(20_000.0)
    assert wheel._visits == visits
    wheel.call_at(1e12 - 1.0, noop)
    wheel.call_at(3e9, noop)
    wheel.run(1e12)
    assert len(wheel) == 0
    assert wheel._visits - visits <= 2 * (LEVELS + 1)


def test_schedule_and_cancel_leave_nothing_behind() -> None:
    """True removal: schedule/cancel churn keeps no garbage in slots or overflow."""
    wheel, _ = make()
    rng = random.Random(1)
    for i in range(20_000):
        timer = wheel.call_later(rng.choice([0.0, 0.05, 5.0, 300.0, 1e9]), noop)
        timer.cancel()
    assert len(wheel) == 0 and wheel.next_timeout() is None
    assert all(not slot for level in wheel._slots for slot in level)
    assert wheel._occupied == [0] * LEVELS and not wheel._overflow


def test_injected_clock_is_read_only_when_now_is_none() -> None:
    clock = FakeClock(42.0)
    wheel = TimerWheel(clock, 0.001)
    assert clock.reads == 1  # construction: the wheel's cursor starts at the clock's time
    timer = wheel.call_at(50.0, noop)
    wheel.call_later(1.0, noop, now=43.0)
    wheel.next_timeout(44.0)
    wheel.run(44.0)
    timer.cancel()
    assert clock.reads == 1
    wheel.call_later(1.0, noop)
    wheel.next_timeout()
    wheel.run()
    assert clock.reads == 4
    clock.now = 43.0
    assert wheel.run() == 1 and len(wheel) == 0


def test_default_clock_and_resolution() -> None:
    wheel = TimerWheel()
    assert wheel.clock is not None
    timer = wheel.call_later(3600.0, noop)
    timeout = wheel.next_timeout()
    assert timeout is not None and 3000.0 < timeout <= 3600.0
    assert wheel.run() == 0 and timer.active


def test_invalid_arguments() -> None:
    for resolution in (0.0, -0.001, math.inf, math.nan):
        with pytest.raises(ValueError):
            TimerWheel(FakeClock(), resolution)
    wheel, _ = make()
    for when in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError):
            wheel.call_at(when, noop)
    assert len(wheel) == 0


def test_handles_have_slots_and_readable_attributes() -> None:
    wheel, _ = make()
    timer = wheel.call_at(2.5, noop)
    assert timer.when == 2.5 and timer.callback is noop and timer.active
    assert "active" in repr(timer)
    with pytest.raises(AttributeError):
        timer.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        wheel.extra = 1  # type: ignore[attr-defined]


def test_cached_next_timeout_follows_cancel_then_earlier_schedule() -> None:
    """next_timeout and run cache the next slot between turns: cancelling the earliest timer, asking,
    then scheduling one between it and the next must still wake for the new one, and fire it."""
    wheel, clock = make()
    fired: list[str] = []
    a = wheel.call_at(1.0, lambda: fired.append("a"))
    wheel.call_at(100.0, lambda: fired.append("c"))
    assert wheel.next_timeout(0.0) == pytest.approx(1.0, abs=0.07)
    a.cancel()
    first = wheel.next_timeout(0.0)
    assert first is not None
    wheel.call_at(5.0, lambda: fired.append("b"))
    second = wheel.next_timeout(0.0)
    assert second is not None and second <= 5.0
    # Turn the loop as the reactor does: sleep what next_timeout says, then run.
    now = 0.0
    while "b" not in fired:
        t = wheel.next_timeout(now)
        assert t is not None
        now += t
        assert now <= 5.0 + 1e-9, "woke after the timer"
        wheel.run(now)
    assert fired == ["b"]


def test_run_between_timers_only_advances() -> None:
    """Most loop turns have nothing due: run() advances the cursor without visiting slots."""
    wheel, clock = make()
    wheel.call_at(30.0, lambda: None)
    wheel.run(0.5)
    visits = wheel._visits
    for i in range(1, 1000):
        assert wheel.run(0.5 + i * 0.001) == 0
    assert wheel._visits == visits
    assert wheel.run(30.0) == 1


# ---- the Python 3.8 nextafter fallback -------------------------------------------------------------

NEXTAFTER_CASES = [
    (1.0, math.inf, 1.0 + 2.0**-52),
    (1.0, -math.inf, 1.0 - 2.0**-53),
    (-1.0, math.inf, -1.0 + 2.0**-53),
    (-1.0, -math.inf, -1.0 - 2.0**-52),
    (0.0, math.inf, 5e-324),
    (0.0, -math.inf, -5e-324),
    (-0.0, math.inf, 5e-324),
    (5e-324, -math.inf, 0.0),
    (-5e-324, math.inf, -0.0),
    (sys.float_info.max, math.inf, math.inf),
    (math.inf, -math.inf, sys.float_info.max),
    (-math.inf, math.inf, -sys.float_info.max),
    (2.0, 2.0, 2.0),
    (1e9, 0.0, 1e9 - 2.0**-23),
    (2.0**-1022, -math.inf, 2.0**-1022 - 5e-324),  # into the subnormals
]


@pytest.mark.parametrize("x,toward,expected", NEXTAFTER_CASES)
def test_nextafter_fallback_known_values(x: float, toward: float, expected: float) -> None:
    got = _nextafter_bits(x, toward)
    assert got == expected and math.copysign(1.0, got) == math.copysign(1.0, expected)
    assert math.isnan(_nextafter_bits(math.nan, 1.0)) and math.isnan(_nextafter_bits(1.0, math.nan))


@pytest.mark.skipif(not hasattr(math, "nextafter"), reason="math.nextafter is Python 3.9+")
@given(st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf, 0.0, 1.0, -1.0]))
def test_nextafter_fallback_matches_math(x: float, toward: float) -> None:
    want = math.nextafter(x, toward)
    got = _nextafter_bits(x, toward)
    assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
