"""Example Python strategies for balrs (``strategy = strategies:FastestTwo`` in a file next to this one;
see examples/python-strategy.ini and docs/python-strategies.md).

A strategy is any class with ``update(backends)`` and ``pick(request, client_ip)``; it imports nothing
from balrs. Both run on the balancer's event loop: keep them quick and never block.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

__all__ = ["FastestTwo", "PreferHeader"]


class FastestTwo:
    """The least busy of the two fastest backends: of the two with the lowest response time (those not
    measured yet first, so that each gets measured), the one with fewer requests in flight.

    Looking only at the two fastest keeps a slow backend out of rotation; choosing between them by
    requests in flight keeps one fast backend from taking everything (like power_of_two, with latency
    choosing the pair instead of chance)."""

    def __init__(self) -> None:
        self.backends: List[Any] = []

    def update(self, backends: Sequence[Any]) -> None:
        self.backends = list(backends)

    def pick(self, request: Any, client_ip: str) -> Optional[Any]:
        backends = self.backends
        if len(backends) <= 2:
            pair = backends
        else:
            # None (never measured) sorts first: -1.0 is below any real response time.
            pair = sorted(backends, key=lambda b: -1.0 if b.response_time is None else b.response_time)[:2]
        return min(pair, key=lambda b: b.in_flight) if pair else None


class PreferHeader:
    """The backend a request names in its ``X-Backend`` field (by backend name) while it is eligible;
    otherwise no preference (None: balrs' round robin chooses). Handy to pin a test client, or a
    canary, to one backend."""

    field = "X-Backend"

    def __init__(self) -> None:
        self.by_name: Dict[str, Any] = {}

    def update(self, backends: Sequence[Any]) -> None:
        self.by_name = {b.name: b for b in backends}

    def pick(self, request: Any, client_ip: str) -> Optional[Any]:
        wanted = request.header(self.field)
        return self.by_name.get(wanted.strip()) if wanted else None
