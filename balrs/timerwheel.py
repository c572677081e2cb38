"""A hierarchical timer wheel: O(1) schedule and cancel, never early, no work while idle.

Every deadline in balrs (connect, header, idle, backend, health probe intervals, drain) is a
`Timer` on one `TimerWheel` per reactor. Each loop turn the reactor asks
``wheel.next_timeout(now)`` for its ``select()`` timeout, selects, then calls ``wheel.run(now)``;
while ``now < wheel.wake_at`` (the cached wake-up) it skips both calls, and the cursor lags until
the next ``run()``, which jumps over the gap like any other.

Design (after the hierarchical wheels of Varghese & Lauck, the classic cascading Linux wheel
described at the top of ``kernel/time/timer.c``, and Kafka's ``TimingWheel``):

* **Ticks.** Time is cut into integer ticks of ``resolution`` seconds (default 1 ms):
  ``tick(x) = floor(x / resolution)``, computed everywhere by the same monotone float
  expression, so ``a <= b`` implies ``tick(a) <= tick(b)``. The wheel keeps a cursor, the tick
  it has advanced to; it starts at the clock's time when the wheel is constructed. Internally
  ticks count from that start, so they are never negative (the bit tricks below need that).
* **Levels.** ``LEVELS`` (6) levels of ``SLOTS`` (64) slots. A slot on level ``L`` spans
  ``64**L`` ticks; at 1 ms the levels reach 64 ms, 4.1 s, 4.4 min, 4.7 h, 12.4 days and
  2.2 years. A timer goes on the lowest level whose aligned window it shares with the cursor,
  i.e. level = index of the highest base-64 digit in which its tick differs from the cursor's.
  Because the windows are aligned, every occupied slot lies at or after the cursor's slot on
  its level, so no rotation is needed: the next occupied slot is the lowest set bit of the
  level's occupancy mask, ``(mask & -mask).bit_length() - 1``, and the next slot needing
  attention anywhere is that of the lowest non-empty level. Finding it costs O(levels).
* **Slots** are dicts used as ordered sets of timers; a timer remembers its dict, so cancel
  is a ``del`` plus clearing the occupancy bit when the slot empties: true O(1) removal,
  nothing lingers.
* **Cascading.** When the cursor reaches the start of an occupied slot on level ``L >= 1``,
  that slot's timers are re-placed relative to the cursor and land on lower levels (as in the
  classic Linux wheel and Kafka's overflow wheels). The modern Linux wheel avoids cascading
  by letting higher-level timers expire up to one slot *late*; we cascade instead because a
  proxy's idle timeout should fire on time. Each timer cascades at most ``LEVELS - 1`` times.
* **Overflow.** Timers beyond the top level's aligned window (up to 2.2 years ahead at
  1 ms, nearer when the cursor is close to the window's end) sit in a plain dict with a
  lower bound on their earliest tick (Kafka grows an overflow wheel instead); when the
  cursor reaches that tick's window, the dict is re-examined and the timers that now fit
  move into the wheel. Insertion and removal stay O(1).
* **Jumps.** ``run()`` never steps tick by tick: it jumps straight to the next occupied slot
  (or overflow window), so a jump of days costs O(timers x levels), not O(elapsed ticks).
  Likewise ``next_timeout()`` returns the time until the next occupied slot becomes current,
  so an hour-away timer costs a handful of wake-ups (one per level it cascades through).

Guarantees:

* **Never early.** A timer fires only when ``now >= timer.when``, comparing the floats
  themselves: the slot of the current tick may hold timers later in that tick, which stay.
  ``next_timeout()`` never points past the earliest ``when``: for a level-0 slot it is the
  smallest ``when`` in the slot; for a cascade it is the first float instant of the slot's
  start tick (found with ``math.nextafter``, so float rounding cannot make it late).
* **All due timers fire.** After ``run(now)`` no active timer with ``when <= now`` remains,
  except timers scheduled *by callbacks during that run*: those are staged and enter the wheel
  when ``run()`` finishes, so they fire on the next ``run()`` at the earliest (as in asyncio,
  this bounds one run's work and makes a self re-arming callback unable to livelock the loop);
  if already due, ``next_timeout()`` then returns 0.
* **Order.** Within one ``run()``, callbacks fire in nondecreasing order of ``when`` (hence
  of expiry tick); timers with equal ``when`` fire in unspecified order. A timer scheduled in
  the past counts as expiring at the cursor's tick and fires on the next ``run()``.
* **Exceptions.** A callback that raises ``Exception`` is logged on the ``balrs.timerwheel``
  logger and the run continues, so one bad callback cannot stall every other timeout.
  ``BaseException`` (KeyboardInterrupt, SystemExit) propagates, with the wheel consistent:
  the raising timer is already removed and unfired timers stay scheduled.

Single-threaded, like the reactor that owns it. ``run()`` is not reentrant.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import time
from operator import attrgetter
from typing import Callable

__all__ = ["Timer", "TimerWheel"]

_log = logging.getLogger("balrs.timerwheel")

SLOT_BITS = 6
SLOTS = 1 << SLOT_BITS  # 64 per level, as in Linux (LVL_SIZE): one machine word of occupancy
LEVELS = 6  # 64**6 ticks = 2.2 years at 1 ms; further timers go to the overflow dict
_SLOT_MASK = SLOTS - 1
_TOP_SHIFT = SLOT_BITS * LEVELS  # cursor >> _TOP_SHIFT numbers the top level's window

_floor = math.floor
_INF = math.inf
_double = struct.Struct("<d")
_bits = struct.Struct("<Q")


def _nextafter_bits(x: float, toward: float) -> float:
    """``math.nextafter`` (3.9+) for Python 3.8: the float next to `x` in the direction of `toward`.

    IEEE 754 doubles of one sign are ordered like their bit patterns read as integers, so the
    neighbour is the pattern plus one (away from zero) or minus one (towards zero).
    """
    if x != x or toward != toward:
        return x + toward  # NaN
    if x == toward:
        return toward
    if x == 0.0:
        return math.copysign(5e-324, toward)  # the smallest subnormal, on the side of `toward`
    n = _bits.unpack(_double.pack(x))[0]
    n += 1 if (toward > x) == (x > 0.0) else -1
    result: float = _double.unpack(_bits.pack(n))[0]
    return result


if sys.version_info >= (3, 9):
    _nextafter = math.nextafter
else:
    _nextafter = _nextafter_bits
_by_when = attrgetter("when")

# Timer._pos for timers not in a wheel slot (overflow, staged): no occupancy bit to clear.
_NO_SLOT = -1
# TimerWheel._next_start when no timer is scheduled: later than any tick.
_NO_TIMER_TICK = 1 << 200


class Timer:
    """Handle for one scheduled callback, made only by `TimerWheel.call_at` / `call_later`.

    ``when`` and ``callback`` are for reading only. A timer cannot be re-armed: cancel it
    and schedule a new one (or re-arm lazily from the callback, see STYLE habit 10).
    """

    __slots__ = ("_bucket", "_pos", "_wheel", "callback", "when")

    when: float
    callback: Callable[[], object]

    def __init__(
        self,
        wheel: TimerWheel,
        when: float,
        callback: Callable[[], object],
        bucket: dict[Timer, None],
        pos: int,
    ) -> None:
        self.when = when
        self.callback = callback
        self._wheel = wheel
        # The dict (slot, overflow or staging area) holding this timer; None once fired or
        # cancelled. _pos = level * SLOTS + slot index, or _NO_SLOT.
        self._bucket: dict[Timer, None] | None = bucket
        self._pos = pos

    @property
    def active(self) -> bool:
        """True while scheduled: not yet fired, not cancelled."""
        return self._bucket is not None

    def cancel(self) -> None:
        """Unschedule in O(1). Idempotent; a no-op once the timer has fired."""
        bucket = self._bucket
        if bucket is None:
            return
        del bucket[self]
        self._bucket = None
        wheel = self._wheel
        wheel._count -= 1
        pos = self._pos
        if not bucket and pos >= 0:
            wheel._occupied[pos >> SLOT_BITS] &= ~(1 << (pos & _SLOT_MASK))

    def __repr__(self) -> str:
        state = "active" if self._bucket is not None else "inactive"
        return f"<Timer when={self.when!r} {state} callback={self.callback!r}>"


class TimerWheel:
    """Hierarchical timer wheel driven by an injected clock (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_count",
        "_inv",
        "_next_start",
        "_next_wake",
        "_occupied",
        "_origin",
        "_overflow",
        "_overflow_min",
        "_resolution",
        "_running",
        "_slots",
        "_staged",
        "_tick",
        "_visits",
        "wake_at",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic, resolution: float = 0.001) -> None:
        if not (0.0 < resolution < _INF):
            raise ValueError(f"resolution must be a positive finite number of seconds, got {resolution!r}")
        self._clock = clock
        self._resolution = float(resolution)
        # tick(x) = floor(x * _inv): a product is monotone in x, which the never-early
        # argument relies on (x // resolution would be too, but is slower).
        self._inv = 1.0 / self._resolution
        # Ticks are counted from the construction time: the cursor starts at 0, and as
        # earlier expiries are clamped to the cursor, every tick in the wheel is >= 0.
        self._origin = _floor(clock() * self._inv)
        self._tick = 0
        self._count = 0  # active timers, wherever they are
        self._slots: list[list[dict[Timer, None]]] = [[{} for _ in range(SLOTS)] for _ in range(LEVELS)]
        self._occupied: list[int] = [0] * LEVELS  # bit i set <=> slot i of that level non-empty
        self._overflow: dict[Timer, None] = {}
        self._overflow_min = 0  # lower bound on overflow ticks (stale after cancels: early is safe)
        self._staged: dict[Timer, None] = {}  # scheduled by callbacks during run()
        self._running = False
        self._visits = 0  # debug counter: slots (or overflow windows) visited by run()
        # What every loop turn asks, cached (the reactor calls next_timeout and run once per turn):
        # a lower bound on the first tick of the next slot (or overflow window) needing attention, and
        # the wake-up next_timeout reports (None: to compute). Adding a timer lowers them when it lands
        # earlier; cancelling leaves them as they are (too early is safe: never late); run() recomputes.
        self._next_start = _NO_TIMER_TICK
        self._next_wake: float | None = None
        # The same wake-up for a caller's own fast path: before ``wake_at`` (``now < wake_at``),
        # next_timeout(now) is ``wake_at - now`` and run(now) has nothing to do, so a loop may skip
        # both calls. 0.0 when unknown (ask next_timeout), +inf when no timer is active.
        self.wake_at = 0.0

    @property
    def clock(self) -> Callable[[], float]:
        """The injected clock, read only when a method is called with ``now=None``."""
        return self._clock

    def __len__(self) -> int:
        return self._count

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Call ``callback()`` once the clock reaches ``when`` (absolute, on this wheel's clock).

        A ``when`` in the past is allowed: the timer is due and fires on the next `run`.
        """
        try:
            e = _floor(when * self._inv) - self._origin
        except (OverflowError, ValueError):
            raise ValueError(f"timer expiry must be a finite number, got {when!r}") from None
        self._count += 1
        if self._running:
            # Enters the wheel when run() ends, so this run cannot chase its own tail.
            bucket = self._staged
            timer = Timer(self, when, callback, bucket, _NO_SLOT)
            bucket[timer] = None
            return timer
        # Same placement as _place(), inlined: this is the hot path.
        cur = self._tick
        if e < cur:  # noqa: PLR1730 - not max(): a builtin call costs more on this hot path
            e = cur  # in the past: due in the current slot
        diff = e ^ cur
        if diff < SLOTS:
            level = 0
            index = e & _SLOT_MASK
        else:
            level = (diff.bit_length() - 1) // SLOT_BITS
            if level >= LEVELS:
                timer = Timer(self, when, callback, self._overflow, _NO_SLOT)
                self._to_overflow(timer, e)
                return timer
            index = (e >> (level * SLOT_BITS)) & _SLOT_MASK
        bucket = self._slots[level][index]
        timer = Timer(self, when, callback, bucket, level * SLOTS + index)
        bucket[timer] = None
        self._occupied[level] |= 1 << index
        # _lower_next_start, inlined (the hot path): start is the first tick of the timer's slot.
        start = (e >> (level * SLOT_BITS)) << (level * SLOT_BITS)
        if start <= self._next_start:
            self._next_start = start
            self._next_wake = None
            self.wake_at = 0.0
        return timer

    def call_later(self, delay: float, callback: Callable[[], object], now: float | None = None) -> Timer:
        """Call ``callback()`` ``delay`` seconds after ``now`` (default: the clock's time)."""
        if now is None:
            now = self._clock()
        return self.call_at(now + delay, callback)

    def cancel(self, timer: Timer) -> None:
        """Same as ``timer.cancel()``: O(1), idempotent, a no-op after firing."""
        timer.cancel()

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds (>= 0.0) until the wheel next needs `run`, or None when no timer is active.

        This is when the next occupied slot becomes current: the earliest ``when`` for a
        level-0 slot, a slot boundary (a cascade) for higher levels. It is never later than
        the earliest timer's ``when``, and 0.0 when some timer is already due.
        """
        if not self._count:
            self.wake_at = _INF
            return None
        if now is None:
            now = self._clock()
        if self._staged:
            return 0.0  # asked from a callback during run(): staged timers may be due
        wake = self._next_wake
        if wake is None:
            # Both from the slots as they are now, so that a timer added later lowers them both when it
            # lands before (a stale, too early _next_start would let it land between and be missed).
            self._next_start = self._compute_next_start()
            wake = self._next_wake = self._compute_wake()
        self.wake_at = wake
        delay = wake - now
        return delay if delay > 0.0 else 0.0

    def _compute_wake(self) -> float:
        """When the next occupied slot becomes current (see next_timeout)."""
        level, index = self._next_slot()
        if level == 0:
            # One slot, one tick: at most a few timers, and the exact answer avoids waking before a
            # timer that is late in its tick.
            return min(self._slots[0][index], key=_by_when).when
        return self._tick_start(self._start_of(level, index))

    def run(self, now: float | None = None) -> int:
        """Fire every timer with ``when <= now``, in order of ``when``; return how many fired.

        Timers scheduled by the callbacks themselves fire on a later call (see module doc).
        """
        if self._running:
            raise RuntimeError("TimerWheel.run() is not reentrant")
        if now is None:
            now = self._clock()
        target = _floor(now * self._inv) - self._origin
        if target < self._tick:  # noqa: PLR1730 - the clock stepped back: never rewind the wheel
            target = self._tick
        if target < self._next_start:
            # Nothing needs attention before the next occupied slot (most loop turns): just advance.
            self._tick = target
            return 0
        if not self._count:
            self._tick = target
            self._next_start = _NO_TIMER_TICK
            return 0
        occupied = self._occupied
        slots = self._slots
        fired = 0
        self._running = True
        try:
            while True:
                level = 0
                while level < LEVELS and not occupied[level]:
                    level += 1
                if level == LEVELS:
                    if not self._overflow:
                        break
                    start = (self._overflow_min >> _TOP_SHIFT) << _TOP_SHIFT
                    if start > target:
                        break
                    self._tick = start
                    self._visits += 1
                    self._migrate_overflow()
                    continue
                bits = occupied[level]
                index = (bits & -bits).bit_length() - 1
                start = self._slot_start(level, index)
                if start > target:
                    break
                # Nothing lies between the cursor and `start`, so jump straight there.
                self._tick = start
                self._visits += 1
                bucket = slots[level][index]
                if level:
                    # Cascade: these timers now share this level's digit with the cursor,
                    # so each belongs on a lower level (never back in this slot).
                    occupied[level] = bits & ~(1 << index)
                    for timer in bucket:
                        self._place(timer)
                    bucket.clear()
                    continue
                # Level 0: one tick. Before the target tick everything is due (tick(when) <
                # tick(now) implies when < now); in it, compare the floats themselves.
                due = [timer for timer in bucket if timer.when <= now]
                due.sort(key=_by_when)
                for timer in due:
                    if timer._bucket is not bucket:
                        continue  # cancelled by an earlier callback of this batch
                    del bucket[timer]
                    timer._bucket = None
                    self._count -= 1
                    fired += 1
                    try:
                        timer.callback()
                    except Exception:  # noqa: BLE001 - policy: log and go on (module docstring)
                        _log.exception("timer callback %r raised", timer.callback)
                if bucket:
                    return fired  # not yet due, later in this very tick: the cursor stays here
                occupied[0] &= ~(1 << index)
            self._tick = target
            return fired
        finally:
            self._running = False
            staged = self._staged
            if staged:
                for timer in staged:
                    self._place(timer)
                staged.clear()
            self._next_start = self._compute_next_start()
            self._next_wake = None
            self.wake_at = 0.0

    def _next_slot(self) -> tuple[int, int]:
        """(level, index) of the next occupied slot: the lowest one of the lowest non-empty level;
        (LEVELS, 0) when only the overflow holds timers, or none does."""
        occupied = self._occupied
        for level in range(LEVELS):
            bits = occupied[level]
            if bits:
                return level, (bits & -bits).bit_length() - 1
        return LEVELS, 0

    def _compute_next_start(self) -> int:
        """The first tick of the next slot (or overflow window) that run() must visit."""
        return self._start_of(*self._next_slot())

    def _start_of(self, level: int, index: int) -> int:
        """The first tick of what _next_slot() found: a slot, the overflow's window, or none."""
        if level < LEVELS:
            return self._slot_start(level, index)
        if self._overflow:
            return (self._overflow_min >> _TOP_SHIFT) << _TOP_SHIFT
        return _NO_TIMER_TICK

    def _lower_next_start(self, start: int) -> None:
        """A timer went into the slot (or overflow window) starting at tick ``start``."""
        if start <= self._next_start:
            self._next_start = start
            self._next_wake = None
            self.wake_at = 0.0

    # -- internals ---------------------------------------------------------------------

    def _slot_start(self, level: int, index: int) -> int:
        """First tick of slot `index` on `level`, in the cursor's window on that level."""
        shift = level * SLOT_BITS
        window = shift + SLOT_BITS
        return ((self._tick >> window) << window) | (index << shift)

    def _tick_start(self, tick: int) -> float:
        """Smallest float x with tick(x) >= tick: the instant the cursor may reach `tick`.

        ``tick * resolution`` can be an ulp or two off either way; correct it with
        nextafter so a wake-up is neither after a timer of that tick nor before the tick.
        """
        inv = self._inv
        tick += self._origin
        x = tick * self._resolution
        if _floor(x * inv) >= tick:
            below = _nextafter(x, -_INF)
            while _floor(below * inv) >= tick:
                x = below
                below = _nextafter(x, -_INF)
            return x
        x = _nextafter(x, _INF)
        while _floor(x * inv) < tick:
            x = _nextafter(x, _INF)
        return x

    def _place(self, timer: Timer) -> None:
        """Put `timer` in its slot relative to the cursor (the same as call_at)."""
        e = _floor(timer.when * self._inv) - self._origin
        cur = self._tick
        if e < cur:  # noqa: PLR1730 - as in call_at
            e = cur
        diff = e ^ cur
        if diff < SLOTS:
            level = 0
            index = e & _SLOT_MASK
        else:
            level = (diff.bit_length() - 1) // SLOT_BITS
            if level >= LEVELS:
                self._to_overflow(timer, e)
                return
            index = (e >> (level * SLOT_BITS)) & _SLOT_MASK
        bucket = self._slots[level][index]
        bucket[timer] = None
        timer._bucket = bucket
        timer._pos = level * SLOTS + index
        self._occupied[level] |= 1 << index
        self._lower_next_start((e >> (level * SLOT_BITS)) << (level * SLOT_BITS))

    def _to_overflow(self, timer: Timer, e: int) -> None:
        overflow = self._overflow
        if not overflow or e < self._overflow_min:
            self._overflow_min = e
        overflow[timer] = None
        timer._bucket = overflow
        timer._pos = _NO_SLOT
        self._lower_next_start((e >> _TOP_SHIFT) << _TOP_SHIFT)

    def _migrate_overflow(self) -> None:
        """The cursor entered a new top-level window: move the timers that now fit.

        O(overflow size), once per top-level window that holds an overflow timer (or per
        stale lower bound); overflow timers are years away, so this is rare.
        """
        pending = list(self._overflow)
        self._overflow.clear()  # _to_overflow recomputes the lower bound as timers go back
        for timer in pending:
            self._place(timer)
