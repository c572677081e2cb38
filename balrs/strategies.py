"""Choosing a backend for a request.

A strategy is a small class: it is told the eligible backends (up, weighted) whenever that set
changes, and asked for one backend per request. It reads the backends' live counters (``active``,
``ewma``, ``eff_weight``) but never does I/O. Per-request work is O(1) or O(log n) where the algorithm
allows it (round robin, random, hashing); the least-* strategies are one pass over the eligible set,
like nginx's ``least_conn``. Tables (schedules, cumulative weights, hash rings) are built in
:meth:`Strategy.update`, never on the request path.

Weights are the backends' ``eff_weight``: the configured weight (1..256), ramped during slow start.
They are expected to be positive; the table-driven strategies also accept non-integral weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import struct
import time
import zlib
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from operator import attrgetter
from itertools import islice
from typing import TYPE_CHECKING, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type

from .http.heads import cookie_value
from .pystrategy import BackendView, RequestView, describe_error, is_python_strategy, load_class

if TYPE_CHECKING:
    from .http.heads import RequestHead
    from .pool import Backend

__all__ = [
    "Strategy", "RoundRobin", "LeastConnections", "WeightedLeastConnections", "LeastResponseTime",
    "WeightedLeastResponseTime", "PowerOfTwo", "Random", "IpHash", "ConsistentHash",
    "make_strategy", "smooth_weighted_sequence", "STRATEGY_CLASSES", "cookie_value",
    "DECAY_HALF_LIFE", "VNODES_PER_WEIGHT", "HASH_BALANCE_FACTOR", "PythonStrategy", "ERROR_LOG_INTERVAL",
]

# A precomputed smooth round-robin schedule is kept up to this many entries; past it (very large weights
# times many backends) the strategy falls back to nginx's O(n) per-pick walk.
MAX_SCHEDULE = 1 << 16
# Non-integral weights (a slow-start ramp may produce them) are quantised to 1/16 for the table-driven
# strategies, HAProxy's BE_WEIGHT_SCALE.
WEIGHT_SCALE = 16
# least_response_time: a backend's moving average counts for half as much for every DECAY_HALF_LIFE
# seconds without a new sample, so a backend that was slow once (and so stopped getting traffic) is
# tried again and re-measured after a while instead of being starved for good. 10 s: a 200 ms backend
# stays behind 5 ms ones for about a minute (log2(40) half-lives), which is long enough not to flap and
# short enough to notice a recovery (Envoy's outlier ejection base time is 30 s, nginx's fail_timeout 10 s).
DECAY_HALF_LIFE = 10.0
# consistent_hash: ring points per unit of weight (ketama uses 160 per server: 40 md5 digests x 4).
# A backend's share of the keys then varies by about 1/sqrt(160) = 8% (one standard deviation) around
# even; more points cost memory and build time for little gain.
VNODES_PER_WEIGHT = 160
# Above this many ring points the points per unit of weight halve (160, 80, 40, ... 1) until the ring
# fits: e.g. 3 backends of weight 256 get 20 per unit. Building a ring is a sort of all its points in
# the event loop, at every weight change (slow start ramps weights): 16384 points keep that to a few
# ms, and every backend still has enough points to get its share within a few percent. Halving (not
# scaling to fit exactly) keeps the points per unit the same over most weight changes, so a change of
# one backend's weight moves only keys to or from that backend.
MAX_RING_POINTS = 1 << 14
# Recently built rings kept for reuse: a backend that flaps (down, up) or a slow-start ramp revisits the
# same eligible sets, which then cost no rebuild.
RING_CACHE_SIZE = 8
# consistent_hash bounded load, HAProxy's `hash-balance-factor 125`: a backend takes a new request only
# while its in-flight requests stay below 125% of its weighted share of all in-flight requests (counting
# the new one); otherwise the ring is walked on (Mirrokni et al., "Consistent Hashing with Bounded Loads").
HASH_BALANCE_FACTOR = 125

_INF = float("inf")
# exp(age * _DECAY_RATE) halves every DECAY_HALF_LIFE seconds.
_DECAY_RATE = -math.log(2.0) / DECAY_HALF_LIFE
_TINY_WEIGHT = 1e-9  # stands in for a zero weight as a divisor
_exp = math.exp
# Request keys are hashed with zlib.crc32 (C, ~0.1 us) and spread over 64 bits by a Fibonacci multiply
# (Knuth 6.4): crc32 alone is linear over GF(2), so similar keys land on structured positions; the
# multiply breaks that and its high bits (which the ring compares first) are well mixed.
_GOLDEN64 = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_active = attrgetter("active")
_log = logging.getLogger("balrs")


class Strategy:
    """Base class. Subclasses implement :meth:`choose`; :meth:`update` is called with the eligible
    backends (in configuration order) at start and whenever health, weights or membership change.

    ``hash_key`` is used by the hashing strategies, ``clock`` (the pool's clock, seconds) by
    least_response_time, ``rng`` by the random ones (tests pass a seeded ``random.Random``).
    """

    name = "base"

    def __init__(self, backends: Sequence[Backend] = (), *, hash_key: str = "client_ip",
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        self.backends: List[Backend] = []
        self.hash_key = hash_key
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.update(backends)

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        raise NotImplementedError

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        """What this strategy weighs for the request, for ``explain`` (read-only: picks nothing)."""
        return {}

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        """A backend not in ``exclude`` (retries, and skipping backends at max_connections), or None
        when every eligible backend is excluded. The default asks :meth:`choose` a few times, then
        takes the first eligible backend not excluded."""
        for _ in range(len(self.backends)):
            b = self.choose(req, client_ip)
            if b is None:
                return None
            if b not in exclude:
                return b
        for b in self.backends:
            if b not in exclude:
                return b
        return None


def smooth_weighted_sequence(weights: Sequence[int]) -> List[int]:
    """nginx's smooth weighted round robin, unrolled into one full cycle of indexes.

    Each pick adds every weight to its current value, takes the largest, and subtracts the total from
    it. Weights 5/1/1 give a a b a c a a: the heavy backend never gets five in a row. A weight of 0 is
    never picked.
    """
    n = len(weights)
    if n == 0:
        return []
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    if g == 0:
        return []
    reduced = [w // g for w in weights]
    total = sum(reduced)
    current = [0] * n
    seq = []
    for _ in range(total):
        best = 0
        for i in range(n):
            current[i] += reduced[i]
            if current[i] > current[best]:
                best = i
        current[best] -= total
        seq.append(best)
    return seq


def _int_weights(backends: Sequence[Backend]) -> List[int]:
    """Integer weights for the table-driven strategies: ``eff_weight`` as is when every one is
    integral, otherwise all scaled by WEIGHT_SCALE. A non-positive weight becomes 0 (never picked),
    unless all are, then every backend counts 1."""
    values = [b.eff_weight for b in backends]
    if all(float(w).is_integer() for w in values):
        ints = [max(0, int(w)) for w in values]
    else:
        ints = [max(1, round(w * WEIGHT_SCALE)) if w > 0 else 0 for w in values]
    if not any(ints):
        return [1] * len(ints)
    return ints


def _interleaved(weights: Sequence[int]) -> List[int]:
    """A table of indexes, each appearing weight/gcd times, spread evenly: entry k of index i sits at
    (k + 1/2) / weight_i (stride scheduling). O(total log total), unlike the O(total x n) smooth cycle."""
    g = _gcd_all(weights)
    if not g:
        return []
    marks = [((k + 0.5) / (w // g), i) for i, w in enumerate(weights) if w for k in range(w // g)]
    marks.sort()
    return [i for _, i in marks]


def _cumulative(backends: Sequence[Backend]) -> Tuple[List[float], float]:
    """Running sums of ``eff_weight`` (non-positive ones count 0; all 1 if every one does) and their
    total, for weighted draws by bisection."""
    cum: List[float] = []
    total = 0.0
    for b in backends:
        w = b.eff_weight
        if w > 0:
            total += w
        cum.append(total)
    if not total and backends:
        cum = [float(i + 1) for i in range(len(backends))]
        total = float(len(backends))
    return cum, total


class RoundRobin(Strategy):
    """Smooth weighted round robin (round_robin and weighted_round_robin), nginx's algorithm over
    ``eff_weight``. The cycle is precomputed when the eligible set or a weight changes, so a pick is
    one list index; with 5/1/1 the heavy backend never gets five in a row."""

    name = "round_robin"
    _pos = 0

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        weights = _int_weights(self.backends)
        self._current: List[float] = [0.0] * len(self.backends)
        if sum(weights) // max(1, _gcd_all(weights)) * max(1, len(weights)) <= MAX_SCHEDULE:
            self._seq = [self.backends[i] for i in smooth_weighted_sequence(weights)]
        else:
            self._seq = []
        if self._seq:
            self._pos %= len(self._seq)
        else:
            self._pos = 0

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        seq = self._seq
        if seq:
            pos = self._pos
            self._pos = pos + 1 if pos + 1 < len(seq) else 0
            return seq[pos]
        return self._walk()

    def take_if_idle(self) -> Optional[Backend]:
        """The next backend of the cycle if it has nothing in flight (then the cycle moves on),
        else None. Lets weighted_least_connections break a tie among idle backends in O(1)."""
        seq = self._seq
        if seq:
            pos = self._pos
            b = seq[pos]
            if not b.active:
                self._pos = pos + 1 if pos + 1 < len(seq) else 0
                return b
        return None

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        seq = self._seq
        if seq:
            n = len(seq)
            return {"next": [seq[(self._pos + k) % n].name for k in range(min(n, 8))],
                    "cycle": n, "weights": {b.name: b.eff_weight for b in self.backends}}
        return {"weights": {b.name: b.eff_weight for b in self.backends},
                "current": {b.name: c for b, c in zip(self.backends, self._current)}}

    def _walk(self) -> Optional[Backend]:
        backends = self.backends
        if not backends:
            return None
        current = self._current
        total = 0.0
        best = 0
        for i, b in enumerate(backends):
            w = b.eff_weight
            current[i] += w
            total += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return backends[best]

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        # The next backend of the cycle not excluded, without moving the cycle on: a retry goes to
        # the backend next in round-robin order, and the requests after it keep their alternation
        # (a failing backend does not take every other backend's turn by being retried).
        seq = self._seq
        if not seq:
            return super().choose_excluding(req, client_ip, exclude)
        n = len(seq)
        pos = self._pos
        for k in range(n):
            b = seq[(pos + k) % n]
            if b not in exclude:
                return b
        return None


def _gcd_all(values: Sequence[int]) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return g


class _Rotating(Strategy):
    """Base of the scanning strategies: a scan starts just after the previous pick and takes the
    first best it meets, so backends that tie are taken in turn (HAProxy's leastconn: "round-robin is
    performed within groups of servers of the same load")."""

    _next = 0

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        # The list twice over: a scan from any start is one slice, with no index arithmetic per step.
        self._double = self.backends * 2
        self._index: Dict[Backend, int] = {b: i for i, b in enumerate(self.backends)}
        self._next = self._next % len(self.backends) if self.backends else 0

    def _picked(self, b: Backend) -> Backend:
        i = self._index[b] + 1
        self._next = i if i < len(self.backends) else 0
        return b

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        n = len(self.backends)
        return {"scan_from": self.backends[self._next].name if n else None,
                "scores": {b.name: self.score(b) for b in self.backends}}

    def score(self, b: Backend) -> object:
        """A backend's score as this strategy compares it (lower is better)."""
        return b.active


class LeastConnections(_Rotating):
    """Fewest requests in flight (``active``), ignoring weights; ties are taken in turn, so sequential
    requests to idle backends still go round robin. nginx ``least_conn``, HAProxy ``leastconn``."""

    name = "least_connections"

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        n = len(self.backends)
        if not n:
            return None
        start = self._next
        double = self._double
        best = double[start]
        best_active = best.active
        if best_active:
            for b in double[start + 1:start + n]:
                a = b.active
                if a < best_active:
                    best = b
                    best_active = a
                    if not a:
                        break  # nothing beats idle
        i = self._index[best] + 1
        self._next = i if i < n else 0
        return best

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        n = len(self.backends)
        best: Optional[Backend] = None
        best_active = 0
        for b in self._double[self._next:self._next + n]:
            if b in exclude:
                continue
            a = b.active
            if best is None or a < best_active:
                best = b
                best_active = a
        return None if best is None else self._picked(best)


class WeightedLeastConnections(Strategy):
    """Lowest ``active / eff_weight``, compared as ``active * other.eff_weight`` (exact, no floats).
    Ties are broken by smooth weighted round robin among the tied backends, as nginx ``least_conn``
    does, so sequential requests to idle backends still follow the weights; when every backend ties
    (all idle, or loaded exactly by weight) that is the precomputed round-robin cycle, O(1)."""

    name = "weighted_least_connections"

    def __init__(self, backends: Sequence[Backend] = (), *, hash_key: str = "client_ip",
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        self._rr = RoundRobin()
        super().__init__(backends, hash_key=hash_key, clock=clock, rng=rng)

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._current: List[float] = [0.0] * len(self.backends)  # nginx's current_weight, for partial ties
        self._rr.update(self.backends)

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        return {"scores": {b.name: round(b.active / (b.eff_weight or _TINY_WEIGHT), 6) for b in self.backends},
                "score": "in flight / weight"}

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        backends = self.backends
        if not backends:
            return None
        # Idle is the lowest ratio: an idle backend next in the weighted cycle wins the tie at once.
        best = self._rr.take_if_idle()
        if best is not None:
            return best
        best = backends[0]
        best_active = best.active
        best_weight = best.eff_weight
        tied = 1
        for b in backends[1:]:
            a = b.active
            w = b.eff_weight
            lhs = a * best_weight
            rhs = best_active * w
            if lhs < rhs:
                best = b
                best_active = a
                best_weight = w
                tied = 1
            elif lhs == rhs:
                tied += 1
        if tied == 1:
            return best
        if tied == len(backends):
            return self._rr.choose(req, client_ip)
        return self._smooth_among_tied(best_active, best_weight, ())

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        best: Optional[Backend] = None
        best_active = 0
        best_weight = 1.0
        tied = 0
        for b in self.backends:
            if b in exclude:
                continue
            a = b.active
            w = b.eff_weight
            if best is None or a * best_weight < best_active * w:
                best = b
                best_active = a
                best_weight = w
                tied = 1
            elif a * best_weight == best_active * w:
                tied += 1
        if tied <= 1:
            return best
        return self._smooth_among_tied(best_active, best_weight, exclude)

    def _smooth_among_tied(self, active: int, weight: float, exclude: Collection[Backend]) -> Backend:
        """nginx's smooth weighted round-robin step over the backends whose load ratio equals
        active/weight."""
        current = self._current
        total = 0.0
        pick = -1
        for i, b in enumerate(self.backends):
            w = b.eff_weight
            if b.active * weight != active * w or b in exclude:
                continue
            current[i] += w
            total += w
            if pick < 0 or current[i] > current[pick]:
                pick = i
        current[pick] -= total
        return self.backends[pick]


class LeastResponseTime(_Rotating):
    """Lowest expected wait: the moving average of time to response head (``ewma``) times the
    requests in flight plus this one, nginx Plus ``least_time header`` (which also weighs active
    connections) and Envoy's least-request idea. Backends never measured and idle come first, in turn,
    so each gets measured; one being measured right now (requests in flight, no sample yet) comes
    after the measured ones. A sample's weight halves every DECAY_HALF_LIFE seconds without a new
    one, so a backend avoided for being slow is retried after a while and can come back."""

    name = "least_response_time"
    weighted = False

    def score(self, b: Backend) -> object:
        """The expected wait ``_best`` compares, in seconds ("unmeasured" before a first sample): the
        same arithmetic, which ``_best`` keeps inline (a call per candidate would cost every pick)."""
        e = b.ewma
        if e < 0.0:
            return "unmeasured, %d in flight" % b.active
        age = self.clock() - b.ewma_at
        if age > 0.0:
            e *= _exp(age * _DECAY_RATE)
        e *= b.active + 1
        if self.weighted:
            e /= b.eff_weight or _TINY_WEIGHT
        return round(e, 6)

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        n = len(self.backends)
        if not n:
            return None
        # The rotation without copying it (islice skips in C; no list per pick).
        return self._best(islice(self._double, self._next, self._next + n))

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        n = len(self.backends)
        return self._best(b for b in islice(self._double, self._next, self._next + n) if b not in exclude)

    def _best(self, candidates: Iterable[Backend]) -> Optional[Backend]:
        """The best of ``candidates`` (in scan order: ties go to the first)."""
        now = self.clock()
        weighted = self.weighted
        exp = _exp
        rate = _DECAY_RATE
        best: Optional[Backend] = None
        best_score = _INF
        probing: Optional[Backend] = None  # never measured, a first request in flight
        probing_active = 0
        for b in candidates:
            e = b.ewma
            if e < 0.0:
                a = b.active
                if not a:
                    return self._picked(b)  # untried and idle: measure it
                if probing is None or a < probing_active:
                    probing = b
                    probing_active = a
                continue
            age = now - b.ewma_at
            if age > 0.0:
                e *= exp(age * rate)
            e *= b.active + 1
            if weighted:
                e /= b.eff_weight or _TINY_WEIGHT
            if e < best_score:
                best = b
                best_score = e
        if best is None:
            best = probing
            if best is None:
                return None
        return self._picked(best)


class WeightedLeastResponseTime(LeastResponseTime):
    """least_response_time with the score divided by ``eff_weight``: a backend twice as heavy may be
    twice as slow (or twice as loaded) before it is passed over."""

    name = "weighted_least_response_time"
    weighted = True


class _WeightedDraw(Strategy):
    """Base of the random strategies: cumulative ``eff_weight`` built on update, one bisection per
    draw."""

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._cum, self._total = _cumulative(self.backends)
        self._random = self.rng.random

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        total = self._total or 1.0
        return {"chance": {b.name: round(b.eff_weight / total, 4) for b in self.backends}}

    def _draw(self) -> int:
        i = bisect_right(self._cum, self._random() * self._total)
        n = len(self._cum)
        return i if i < n else n - 1  # random() * total may round up to total

    def _draw_among(self, candidates: List[Backend]) -> Backend:
        """A weighted draw among some of the backends (the retry path, O(n))."""
        cum, total = _cumulative(candidates)
        i = bisect_right(cum, self._random() * total)
        return candidates[i if i < len(candidates) else len(candidates) - 1]


class Random(_WeightedDraw):
    """Weighted random: each backend with probability ``eff_weight / total`` (HAProxy ``random(1)``,
    nginx ``random``)."""

    name = "random"

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        if not self.backends:
            return None
        return self.backends[self._draw()]

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        left = [b for b in self.backends if b not in exclude]
        return self._draw_among(left) if left else None


class PowerOfTwo(_WeightedDraw):
    """Power of two choices: draw two distinct backends (weighted), keep the one with fewer requests
    in flight; on a tie the first drawn. Nearly as balanced as least connections without a scan, and
    no herd onto one idle backend (Mitzenmacher; HAProxy ``random(2)``, nginx ``random two
    least_conn``, Envoy's least-request default)."""

    name = "power_of_two"

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        backends = self.backends
        n = len(backends)
        if n < 2:
            return backends[0] if n else None
        cum = self._cum
        total = self._total
        rand = self._random
        i = bisect_right(cum, rand() * total)
        if i >= n:
            i = n - 1
        # The second draw excludes the first: draw over the total minus its share, skipping its span.
        lo = cum[i - 1] if i else 0.0
        span = cum[i] - lo
        x = rand() * (total - span)
        if x >= lo:
            x += span
        j = bisect_right(cum, x)
        if j >= n or j == i:  # float rounding at a span's edge
            j = i + 1 if i + 1 < n else 0
        first = backends[i]
        second = backends[j]
        return second if second.active < first.active else first

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        left = [b for b in self.backends if b not in exclude]
        if len(left) < 2:
            return left[0] if left else None
        first = self._draw_among(left)
        left.remove(first)
        second = self._draw_among(left)
        return second if second.active < first.active else first


class IpHash(Strategy):
    """The same client address always goes to the same backend while the eligible set is unchanged
    (nginx ``ip_hash``, HAProxy ``balance source`` with map-based hashing). The whole address is
    hashed (crc32, mixed), then mapped onto a weighted table (each backend weight/gcd times) with
    the backends interleaved, so a retry (the next table entry) reaches another one quickly."""

    name = "ip_hash"

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._table = [self.backends[i] for i in _interleaved(_int_weights(self.backends))]

    def _slot(self, client_ip: str) -> int:
        # Multiply-shift range reduction of the 64-bit mixed hash: uses its high, well-mixed bits.
        return ((zlib.crc32(client_ip.encode()) * _GOLDEN64) & _MASK64) * len(self._table) >> 64

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        table = self._table
        if not table:
            return {"key": client_ip}
        slot = self._slot(client_ip)
        return {"key": client_ip, "slot": slot, "slots": len(table), "owner": table[slot].name}

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        table = self._table
        if not table:
            return None
        return table[((zlib.crc32(client_ip.encode()) * _GOLDEN64) & _MASK64) * len(table) >> 64]

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        table = self._table
        if not table:
            return None
        n = len(table)
        i = self._slot(client_ip)
        for _ in range(n):
            b = table[i]
            if b not in exclude:
                return b
            i = i + 1 if i + 1 < n else 0
        return None


# ---- consistent hashing ------------------------------------------------------------------------------

# Ring positions of each backend name, grown on demand: positions 8g..8g+7 are the eight big-endian
# 64-bit words of blake2b(name + "-" + g) (ketama takes four from each md5), so every instance with the
# same names builds the same ring. blake2b is always built in (md5 may be missing under FIPS).
_POINTS: Dict[str, List[int]] = {}
_MAX_POINT_NAMES = 4096
# ring key -> the ring (see _ring)
_RINGS: "OrderedDict[Tuple[Tuple[str, int], ...], List[int]]" = OrderedDict()
# A ring entry is position << _SLOT_BITS | slot: one sorted list of plain ints, searched for
# key_hash << _SLOT_BITS, gives both the clockwise successor and its backend.
_SLOT_BITS = 16
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_EIGHT_WORDS = struct.Struct(">8Q").unpack


def _name_points(name: str, count: int) -> List[int]:
    pts = _POINTS.get(name)
    if pts is None:
        if len(_POINTS) >= _MAX_POINT_NAMES:
            _POINTS.clear()
        pts = _POINTS[name] = []
    if len(pts) < count:
        prefix = name.encode() + b"-"
        blake2b = hashlib.blake2b
        for group in range(len(pts) // 8, (count + 7) // 8):
            pts.extend(_EIGHT_WORDS(blake2b(prefix + b"%d" % group).digest()))
    return pts[:count]


def _vnode_counts(backends: Sequence[Backend]) -> List[int]:
    """Ring points per backend: VNODES_PER_WEIGHT per unit of ``eff_weight``, halved until the ring
    fits MAX_RING_POINTS. A backend's points do not depend on the others' (at a given points per
    unit), so adding or removing one moves only the keys it takes or held."""
    if not backends:
        return []
    weights = [max(0.0, float(b.eff_weight)) for b in backends]
    total = sum(weights)
    if not total:
        weights = [1.0] * len(backends)
        total = float(len(backends))
    per_unit = VNODES_PER_WEIGHT
    while per_unit > 1 and total * per_unit > MAX_RING_POINTS:
        per_unit //= 2
    return [max(1, round(w * per_unit)) if w > 0 else 0 for w in weights]


def _ring(key: Tuple[Tuple[str, int], ...]) -> List[int]:
    """The ring for ((name, points), ...) sorted by name: ``position << _SLOT_BITS | slot`` ascending,
    where slot is the backend's index in ``key``; equal positions (2^-64 odds) order by name.
    O(points log points), cached."""
    ring = _RINGS.get(key)
    if ring is not None:
        _RINGS.move_to_end(key)
        return ring
    if len(key) > _SLOT_MASK + 1:
        raise ValueError("consistent_hash supports at most %d backends" % (_SLOT_MASK + 1))
    ring = []
    for slot, (name, count) in enumerate(key):
        ring.extend([p << _SLOT_BITS | slot for p in _name_points(name, count)])
    ring.sort()
    _RINGS[key] = ring
    if len(_RINGS) > RING_CACHE_SIZE:
        _RINGS.popitem(last=False)
    return ring


def _target_path(target: bytes) -> bytes:
    """The path of a request target, without the query (origin-form, or absolute-form: RFC 9112 §3.2)."""
    q = target.find(b"?")
    if q >= 0:
        target = target[:q]
    if target[:1] != b"/":
        scheme_end = target.find(b"://")
        if scheme_end >= 0:
            s = target.find(b"/", scheme_end + 3)
            target = target[s:] if s >= 0 else b"/"  # RFC 9110 §4.2.3: an empty path is "/"
    return target


def field_value(req: RequestHead, lname: bytes) -> Optional[bytes]:
    """``req.header(lname)`` (the combined value, RFC 9110 §5.3), with C-level list searches for
    the common single field."""
    lnames = req.lnames
    if lname not in lnames:
        return None
    if lnames.count(lname) == 1:
        return req.values[lnames.index(lname)]
    return b", ".join([v for n, v in zip(lnames, req.values) if n == lname])


class ConsistentHash(Strategy):
    """Consistent hashing on a ring of virtual nodes (ketama; HAProxy ``hash-type consistent``):
    VNODES_PER_WEIGHT points per unit of weight, positions from blake2b of ``name-i``, so instances
    with the same backend names agree on every key, and removing one of N backends remaps only the
    keys it held (about 1/N). The key is ``hash_key``: client_ip, path (without the query),
    header:NAME (its combined value) or cookie:NAME. A request without the key (no such field,
    or empty) goes round robin, as in HAProxy.

    Bounded load (HAProxy ``hash-balance-factor``): when the key's backend already has its share of
    in-flight requests times HASH_BALANCE_FACTOR %, the ring is walked clockwise to the next distinct
    backend under that bound. Per pick: one crc32 and one bisection; the total in-flight count (a
    sum over the backends) is taken only when the key's backend is busy enough for the bound to
    matter, and the walk only when it is exceeded."""

    name = "consistent_hash"

    def __init__(self, backends: Sequence[Backend] = (), *, hash_key: str = "client_ip",
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        self._rr = RoundRobin()
        kind, _, arg = hash_key.partition(":")
        kind = kind.strip().lower()
        self._field = b""
        if kind == "client_ip":
            self._key: Callable[[RequestHead, str], Optional[bytes]] = _client_ip_key
        elif kind == "path":
            self._key = _path_key
        elif kind == "header" and arg:
            self._field = arg.strip().lower().encode("latin-1")
            self._key = self._header_key
        elif kind == "cookie" and arg:
            self._field = arg.strip().encode("latin-1")
            self._key = self._cookie_key
        else:
            raise ValueError("unknown hash key %r (expected client_ip, path, header:NAME or cookie:NAME)"
                             % hash_key)
        super().__init__(backends, hash_key=hash_key, clock=clock, rng=rng)

    def _header_key(self, req: RequestHead, client_ip: str) -> Optional[bytes]:
        return field_value(req, self._field) or None

    def _cookie_key(self, req: RequestHead, client_ip: str) -> Optional[bytes]:
        return cookie_value(req, self._field) or None

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self._rr.update(self.backends)
        by_name = sorted(self.backends, key=attrgetter("name"))
        counts = _vnode_counts(by_name)
        self._ring = _ring(tuple((b.name, c) for b, c in zip(by_name, counts)))
        self._by_slot = by_name
        self._bound_scale = 100 * (sum(b.eff_weight for b in by_name if b.eff_weight > 0) or len(by_name))

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        key = self._key(req, client_ip)
        out: Dict[str, object] = {"hash_key": self.hash_key, "ring_points": len(self._ring)}
        if key is None:
            out["key"] = None
            out["note"] = "the request has no %s: round robin" % self.hash_key
            return out
        out["key"] = key.decode("latin-1")
        ring = self._ring
        if ring:
            point = ((zlib.crc32(key) * _GOLDEN64) & _MASK64) << _SLOT_BITS
            j = bisect_left(ring, point)
            if j == len(ring):
                j = 0
            owner = self._by_slot[ring[j] & _SLOT_MASK]
            in_flight = sum(map(_active, self.backends))
            out["point"] = "%016x" % (point >> _SLOT_BITS)
            out["owner"] = owner.name
            out["owner_in_flight"] = owner.active
            out["under_load_bound"] = self._under_bound(owner, in_flight)
        return out

    def _under_bound(self, b: Backend, in_flight: int) -> bool:
        """HAProxy's chash_server_is_eligible: active < ceil(factor% * (in_flight + 1) * w / W),
        in integers: 100 * W * active < factor * (in_flight + 1) * w."""
        return self._bound_scale * b.active < HASH_BALANCE_FACTOR * (in_flight + 1) * b.eff_weight

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        ring = self._ring
        if not ring:
            return None
        key = self._key(req, client_ip)
        if key is None:
            return self._rr.choose(req, client_ip)
        j = bisect_left(ring, ((zlib.crc32(key) * _GOLDEN64) & _MASK64) << _SLOT_BITS)
        if j == len(ring):
            j = 0
        b = self._by_slot[ring[j] & _SLOT_MASK]
        a = b.active
        if a:
            # Bounded load (see _under_bound). All in flight >= a, so a backend under the bound with
            # a as the total is under it: most picks need no sum over the backends.
            load = self._bound_scale * a
            w = HASH_BALANCE_FACTOR * b.eff_weight
            if load >= (a + 1) * w:
                in_flight = sum(map(_active, self.backends))
                if load >= (in_flight + 1) * w:
                    return self._walk(j, (), in_flight)
        return b

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        ring = self._ring
        if not ring:
            return None
        key = self._key(req, client_ip)
        if key is None:
            return self._rr.choose_excluding(req, client_ip, exclude)
        j = bisect_left(ring, ((zlib.crc32(key) * _GOLDEN64) & _MASK64) << _SLOT_BITS)
        return self._walk(j if j < len(ring) else 0, exclude, sum(map(_active, self.backends)))

    def _walk(self, j: int, exclude: Collection[Backend], in_flight: int) -> Optional[Backend]:
        """Clockwise from ring point j: the first distinct backend not excluded and under the load
        bound; failing that the first not excluded; None if all are."""
        ring = self._ring
        by_slot = self._by_slot
        n = len(by_slot)
        seen: Set[int] = set()
        fallback: Optional[Backend] = None
        m = len(ring)
        for _ in range(m):
            s = ring[j] & _SLOT_MASK
            j = j + 1 if j + 1 < m else 0
            if s in seen:
                continue
            seen.add(s)
            b = by_slot[s]
            if b not in exclude:
                if self._under_bound(b, in_flight):
                    return b
                if fallback is None:
                    fallback = b
            if len(seen) == n:
                break
        return fallback


def _client_ip_key(req: RequestHead, client_ip: str) -> Optional[bytes]:
    return client_ip.encode()


def _path_key(req: RequestHead, client_ip: str) -> Optional[bytes]:
    return _target_path(req.target)


STRATEGY_CLASSES: Dict[str, Type[Strategy]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "weighted_least_connections": WeightedLeastConnections,
    "least_response_time": LeastResponseTime,
    "weighted_least_response_time": WeightedLeastResponseTime,
    "power_of_two": PowerOfTwo,
    "random": Random,
    "ip_hash": IpHash,
    "consistent_hash": ConsistentHash,
}


class PythonStrategy(Strategy):
    """A user's strategy class (``strategy = package.module:Name``, pystrategy.py), behind the Strategy
    interface. It is told :class:`~balrs.pystrategy.BackendView` objects and asked with a
    :class:`~balrs.pystrategy.RequestView`. Whatever goes wrong in the user's code (an exception from
    the constructor, ``update`` or ``pick``, or a pick that is not one of the eligible backends) costs
    only that request, which round robin over the same backends serves, and one error line a second
    at most (with the count of those held back). After a failed ``update`` the user's picks are not
    asked until an ``update`` succeeds (its view of the backends may be stale). ``pick`` returning
    None means no preference: round robin chooses."""

    name = "python"

    def __init__(self, cls: type, spec: str, backends: Sequence[Backend] = (), *, hash_key: str = "client_ip",
                 clock: Callable[[], float] = time.monotonic, rng: Optional[random.Random] = None) -> None:
        self.spec = spec
        self.fallback = RoundRobin((), hash_key=hash_key, clock=clock)
        self.views: Dict[Backend, BackendView] = {}
        self.stale = False           # the last update raised: round robin until one succeeds
        self.errors = 0              # every failure of the user's code, ever
        self.held_back = 0           # failures not logged since the last line
        self.logged_at = -_INF
        self.clock = clock
        self.user: Optional[object] = None
        try:
            self.user = cls()
        except Exception as exc:
            self.failed("%s()" % cls.__name__, exc)
        super().__init__(backends, hash_key=hash_key, clock=clock, rng=rng)

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]:
        return {"class": self.spec}

    def failed(self, what: str, exc: Optional[BaseException], detail: str = "") -> None:
        """Count a failure of the user's code; log it unless one was logged less than a second ago."""
        self.errors += 1
        now = self.clock()
        if now - self.logged_at < ERROR_LOG_INTERVAL:
            self.held_back += 1
            return
        reason = describe_error(exc) if exc is not None else detail
        more = " (and %d more failures since the last report)" % self.held_back if self.held_back else ""
        _log.error("strategy %s: %s: %s; round robin instead%s", self.spec, what, reason, more)
        self.logged_at = now
        self.held_back = 0

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        self.fallback.update(backends)
        old = self.views
        self.views = {b: old.get(b) or BackendView(b) for b in backends}
        user = self.user
        if user is None:
            return
        try:
            user.update([self.views[b] for b in backends])  # type: ignore[attr-defined]
        except Exception as exc:
            self.stale = True
            self.failed("update", exc)
        else:
            self.stale = False

    def _ask(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        """The user's pick as a backend, or None (no preference, or a failure already counted)."""
        user = self.user
        if user is None or self.stale:
            return None
        try:
            view = user.pick(RequestView(req), client_ip)  # type: ignore[attr-defined]
        except Exception as exc:
            self.failed("pick", exc)
            return None
        if view is None:
            return None
        backend = view._backend if isinstance(view, BackendView) else None
        if backend is None or self.views.get(backend) is not view:
            self.failed("pick", None, "returned %r, which is not one of the eligible backends it was given"
                        % (view,))
            return None
        return backend

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        if not self.backends:
            return None
        b = self._ask(req, client_ip)
        return b if b is not None else self.fallback.choose(req, client_ip)

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        """The user's pick unless it is excluded (a retry, or at max_connections); then round robin
        among the others."""
        if not self.backends:
            return None
        b = self._ask(req, client_ip)
        if b is not None and b not in exclude:
            return b
        return self.fallback.choose_excluding(req, client_ip, exclude)


# A failing Python strategy logs one line per this many seconds at most (the rest are counted).
ERROR_LOG_INTERVAL = 1.0


def make_strategy(name: str, backends: Sequence[Backend], hash_key: str = "client_ip",
                  clock: Callable[[], float] = time.monotonic) -> Strategy:
    """The strategy for a canonical name (config.STRATEGIES maps aliases to these), or for a Python
    strategy ``package.module:Name`` (loaded already by pystrategy.check_strategies, which knows the
    configuration's directory). ``clock`` is the pool's clock (least_response_time compares it with
    ``Backend.ewma_at``)."""
    if is_python_strategy(name):
        return PythonStrategy(load_class(name), name, backends, hash_key=hash_key, clock=clock)
    cls = STRATEGY_CLASSES.get(name)
    if cls is None:
        raise ValueError("strategy %r is not implemented" % name)
    return cls(backends, hash_key=hash_key, clock=clock)
