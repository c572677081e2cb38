"""Backend host names, re-resolved every ``resolve_interval`` on a thread of their own.

``getaddrinfo`` blocks, so it never runs on the event loop: a daemon thread resolves, and hands each
result to the loop with ``call_soon_threadsafe``. Backends given as IP literals are never looked up
again. A failed lookup keeps the last good address (nginx ``resolver`` keeps serving the old one too);
a backend that has never resolved stays out of rotation until it does.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple, Union

from .pool import resolve

if TYPE_CHECKING:
    from .pool import Backend, Pool, Pools, SockAddr
    from .reactor import Reactor

__all__ = ["Resolver", "is_ip_literal"]

log = logging.getLogger("balrs")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    """The resolver thread of one balancer."""

    def __init__(self, reactor: Reactor, pool: Union[Pool, Pools], interval: Callable[[], float]) -> None:
        self.reactor = reactor
        self.pool = pool
        # resolve_interval of the running configuration (it changes on reload).
        self.interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def needed(self) -> bool:
        return any(not is_ip_literal(b.config.address.host) for b in self.pool.backends)

    def start(self) -> None:
        """Start the thread if any backend has a host name (and it is not running yet)."""
        if self._thread is not None or not self.needed():
            return
        self.reactor.enable_threadsafe()
        self._thread = threading.Thread(target=self._run, name="balrs-resolver", daemon=True)
        self._thread.start()

    def trigger(self) -> None:
        """Resolve now (after a reload added backends with host names)."""
        if self._thread is None:
            self.start()
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    # ---- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.interval())
            self._wake.clear()
            if self._stopped.is_set():
                return
            # Reading the list and the frozen configs from this thread is safe: the loop replaces the
            # list (never mutates it in place) on reload.
            for backend in list(self.pool.backends):
                host = backend.config.address.host
                if is_ip_literal(host):
                    continue
                port = backend.config.address.port
                try:
                    result: Tuple[Optional[List[Tuple[int, SockAddr]]], str] = (resolve(host, port), "")
                except OSError as exc:
                    result = (None, str(exc))
                self.reactor.call_soon_threadsafe(functools.partial(self._apply, backend, *result))

    # ---- back on the loop --------------------------------------------------------------------------
    def _apply(self, backend: Backend, found: Optional[List[Tuple[int, SockAddr]]], error: str) -> None:
        if backend not in self.pool.backends:
            return
        if found is None:
            if backend.resolved:
                log.warning("backend %s: cannot resolve %s (%s); keeping %s", backend.name,
                            backend.config.address.host, error, backend.sockaddr[0])
            return
        if not backend.set_addresses(found):
            return
        log.info("backend %s: %s resolves to %s", backend.name, backend.config.address.host,
                 ", ".join(str(a[1][0]) for a in found))
        # Idle pooled connections go to the old address: let them go.
        backend.idle.close_all()
        if backend.mark_resolved(self.reactor.now):
            self.pool.refresh()
            self.pool.wake()

