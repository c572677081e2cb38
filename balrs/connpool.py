"""The idle connection pool of one backend: keep-alive connections waiting for their next request.

Most recently used first (LIFO: a warm connection is least likely to have been closed by the backend's
own keep-alive timeout), bounded, and O(1) for every operation: a dict keeps insertion order, so
``popitem()`` takes the newest and removing one the backend closed needs no search. Each entry keeps
the connection's no-wait poll object, so checking that a connection is still clean before reuse costs
one ``poll(2)`` and no method call.
"""

from __future__ import annotations

import logging
import select
from typing import Any, Dict, List

__all__ = ["IdlePool", "POOL_MAX_IDLE"]

log = logging.getLogger("balrs")

# Idle pooled connections kept per backend (nginx upstream keepalive 32; HAProxy keeps as many as it
# has had in flight); a connection finishing when the pool is full closes instead.
POOL_MAX_IDLE = 128


class IdlePool:
    """Idle connections to one backend. A connection is anything with ``close()``; it must take itself
    out with :meth:`remove` when it closes while pooled."""

    __slots__ = ("name", "_idle")

    def __init__(self, name: str) -> None:
        self.name = name
        self._idle: Dict[Any, select.poll] = {}

    def __len__(self) -> int:
        return len(self._idle)

    def __iter__(self) -> Any:
        return iter(list(self._idle))

    def put(self, conn: Any, peek: select.poll) -> bool:
        """Pool ``conn`` (``peek``: a poll object on its socket for POLLIN). False if the pool is full."""
        idle = self._idle
        if len(idle) >= POOL_MAX_IDLE:
            return False
        idle[conn] = peek
        return True

    def take(self) -> Any:
        """The newest idle connection that is safe to reuse, or None. One that holds unread bytes (a
        backend that sent more than its response said) or that the backend closed is closed instead:
        the next request on it would be answered with those bytes."""
        idle = self._idle
        while idle:
            conn, peek = idle.popitem()
            if not peek.poll(0):
                return conn
            log.debug("backend %s: idle connection not reused: unread bytes or closed by the backend", self.name)
            conn.close()
        return None

    def remove(self, conn: Any) -> None:
        self._idle.pop(conn, None)

    def close_all(self) -> None:
        conns: List[Any] = list(self._idle)
        self._idle.clear()
        for conn in conns:
            conn.close()
