"""Choosing a backend for a request.

A strategy is a small class: it is told the eligible backends (up, weighted) whenever that set
changes, and asked for one backend per request. It reads the backends' live counters (``active``,
``requests``) but never does I/O. Per-request work is O(1) where the algorithm allows it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Collection, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from .http.heads import RequestHead
    from .pool import Backend

__all__ = ["Strategy", "RoundRobin", "make_strategy", "smooth_weighted_sequence", "STRATEGY_CLASSES"]

# A precomputed smooth round-robin schedule is kept up to this many entries; past it (very large weights
# times many backends) the strategy falls back to nginx's O(n) per-pick walk.
MAX_SCHEDULE = 1 << 16


class Strategy:
    """Base class. Subclasses implement :meth:`choose`; :meth:`update` is called with the eligible
    backends (in configuration order) at start and whenever health, weights or membership change."""

    name = "base"

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends: List[Backend] = []
        self.update(backends)

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]:
        raise NotImplementedError

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        """A backend not in ``exclude`` (used for retries). The default asks :meth:`choose` a few times,
        then takes the first eligible backend not excluded."""
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
    it. Weights 5/1/1 give a a b a c a a: the heavy backend never gets five in a row.
    """
    n = len(weights)
    if n == 0:
        return []
    g = 0
    for w in weights:
        g = math.gcd(g, w)
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


class RoundRobin(Strategy):
    """Smooth weighted round robin (round_robin and weighted_round_robin). The cycle is precomputed
    when the eligible set changes, so a pick is one list index."""

    name = "round_robin"

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._seq: List[Backend] = []
        self._pos = 0
        self._current: List[int] = []
        super().__init__(backends)

    def update(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        weights = [b.weight for b in self.backends]
        if sum(weights) // max(1, _gcd_all(weights)) * max(1, len(weights)) <= MAX_SCHEDULE:
            self._seq = [self.backends[i] for i in smooth_weighted_sequence(weights)]
        else:
            self._seq = []
            self._current = [0] * len(self.backends)
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

    def _walk(self) -> Optional[Backend]:
        backends = self.backends
        if not backends:
            return None
        current = self._current
        total = 0
        best = 0
        for i, b in enumerate(backends):
            current[i] += b.weight
            total += b.weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return backends[best]

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]:
        # Walk on along the cycle, so a retry goes to the next backend in round-robin order.
        seq = self._seq
        if not seq:
            return super().choose_excluding(req, client_ip, exclude)
        for _ in range(len(seq)):
            b = self.choose(req, client_ip)
            if b is not None and b not in exclude:
                return b
        return None


def _gcd_all(values: Sequence[int]) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return g


STRATEGY_CLASSES: Dict[str, Callable[[Sequence[Backend]], Strategy]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": RoundRobin,
}


def make_strategy(name: str, backends: Sequence[Backend], hash_key: str = "client_ip") -> Strategy:
    """The strategy for a canonical name (config.STRATEGIES maps aliases to these)."""
    cls = STRATEGY_CLASSES.get(name)
    if cls is None:
        raise ValueError("strategy %r is not implemented" % name)
    return cls(backends)
