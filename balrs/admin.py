"""The admin endpoint: /metrics (Prometheus text) and /status (JSON), served by the same reactor.

(Interface in place; the endpoint lands with the admin change.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Balancer

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, srv: Balancer) -> None:
        self.srv = srv

    def start(self) -> None:
        """Bind [admin] listen and serve."""

    def stop(self) -> None:
        """Close the listeners and any admin connections."""
