"""Backend health: active probes, passive outlier detection and slow start.

(Interface in place; the probes land with the health checks change.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import Backend
    from .server import Balancer

__all__ = ["Health"]

log = logging.getLogger("balrs")


class Health:
    """Owns every backend's up/down state. The proxy reports live-traffic outcomes to it."""

    def __init__(self, srv: Balancer) -> None:
        self.srv = srv

    def start(self) -> None:
        """Begin probing (if [health] is configured)."""

    def stop(self) -> None:
        """Stop probing and cancel every timer (drain, stop)."""

    def reload(self) -> None:
        """The pool's membership or the configuration changed: probe the new set."""

    def failure(self, backend: Backend, kind: str) -> None:
        """A live request failed on ``backend``: ``kind`` is connect, reset or timeout."""

    def success(self, backend: Backend) -> None:
        """A live request succeeded on ``backend`` after failures (consecutive_errors > 0)."""
        backend.consecutive_errors = 0
