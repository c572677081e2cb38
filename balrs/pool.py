"""Backends, their state and live counters, and the choice among them. No I/O here: the proxy owns
the sockets; a backend only holds its idle pooled connections so the proxy can reuse them."""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, Collection, Dict, List, Optional, Sequence, Tuple

from .config import BackendConfig
from .strategies import Strategy, make_strategy

if TYPE_CHECKING:
    from .http.heads import RequestHead
    from .proxy import UpstreamConn

__all__ = ["Backend", "Pool", "resolve"]

log = logging.getLogger("balrs")

SockAddr = Tuple[Any, ...]


def resolve(host: str, port: int) -> Tuple[int, SockAddr]:
    """(family, sockaddr) for a backend address. Blocking: called at start-up and reload, never from
    the event loop's request path."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if not infos:
        raise OSError("no address for %s" % host)
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr


class Backend:
    """One backend server: its address, weight, state and counters."""

    __slots__ = (
        "name", "config", "family", "sockaddr", "host_header", "weight", "max_connections",
        "active", "requests", "failures", "up", "idle",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.name = config.name
        self.config = config
        self.up = True
        try:
            self.family, self.sockaddr = resolve(config.address.host, config.address.port)
        except OSError as exc:
            log.error("backend %s: cannot resolve %s: %s", config.name, config.address.host, exc)
            self.family, self.sockaddr = socket.AF_INET, ("0.0.0.0", 0)
            self.up = False
        # Host field for requests that come without one (HTTP/1.0 clients).
        self.host_header = str(config.address).encode("ascii", "replace")
        self.weight = config.weight
        self.max_connections = config.max_connections
        self.active = 0        # requests in flight on this backend
        self.requests = 0      # requests sent to it, ever
        self.failures = 0      # connect failures, broken or timed-out responses
        # Idle keep-alive connections, most recently used last (dicts keep insertion order, so
        # popitem() is LIFO and removing a connection the backend closed is O(1)).
        self.idle: Dict[UpstreamConn, None] = {}

    def __repr__(self) -> str:
        return "<Backend %s %s>" % (self.name, self.config.address)


class Pool:
    """The backends of a balancer and the strategy that picks among the eligible ones."""

    def __init__(self, configs: Sequence[BackendConfig], strategy: str) -> None:
        self.backends: List[Backend] = [Backend(c) for c in configs]
        self.strategy_name = strategy
        self.strategy: Strategy = make_strategy(strategy, self.eligible())

    def eligible(self) -> List[Backend]:
        return [b for b in self.backends if b.up]

    def refresh(self) -> None:
        """Tell the strategy that health, weights or membership changed."""
        self.strategy.update(self.eligible())

    def choose(self, req: RequestHead, client_ip: str,
               exclude: Optional[Collection[Backend]] = None) -> Optional[Backend]:
        if exclude:
            return self.strategy.choose_excluding(req, client_ip, exclude)
        return self.strategy.choose(req, client_ip)
