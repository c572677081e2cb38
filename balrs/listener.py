"""Listening sockets on the reactor: binding, rebinding on reload, and accepting.

Used by the balancer (client connections) and the admin endpoint. Accepting is bounded per readiness
event so a connection storm cannot starve the connections already open (CPython's asyncio
``_accept_connection`` accepts at most ``backlog`` per event), and backs off after EMFILE/ENFILE instead
of spinning on a listener it cannot serve (STYLE habit 9). Above a connection cap the listener stops
being watched, so new connections wait in the kernel's accept backlog.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import Address
from .reactor import EVENT_READ, Reactor
from .timerwheel import Timer

__all__ = ["Listener", "ListenError", "bind_listener", "LISTEN_BACKLOG"]

log = logging.getLogger("balrs")

# Listen backlog (the kernel caps it at net.core.somaxconn): connections above a cap wait here.
LISTEN_BACKLOG = 4096
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# on_accept(sock, peer_address, listen_address) -> whether to keep accepting (False: the connection cap
# is reached). The listen address carries its flags (tls, proxy).
AcceptCallback = Callable[[socket.socket, Any, Address], bool]


class ListenError(OSError):
    """A listen address that cannot be bound: ``strerror`` is ``cannot listen on ADDR: why``, and
    ``address`` the Address, so that the command line can name the key it came from."""

    def __init__(self, errno_: int, message: str, address: Address) -> None:
        super().__init__(errno_, message)
        self.address = address


def bind_listener(addr: Address, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A non-blocking listening socket for ``addr`` (only bound if not ``listen``). Raises ListenError
    (an OSError) naming the address."""
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                   socket.AI_PASSIVE)
    except OSError as exc:  # a host name that does not resolve
        raise ListenError(exc.errno or 0, "cannot listen on %s: %s" % (addr, exc.strerror or exc), addr) from None
    family, _type, _proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Each listen address is its own socket; do not also grab the IPv4 port.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno or 0, "cannot listen on %s: %s" % (addr, exc.strerror or exc), addr) from None
    return sock


class Listener:
    """The listening sockets of one service (``name`` labels its log lines)."""

    def __init__(self, reactor: Reactor, name: str, on_accept: AcceptCallback, batch: int, backoff: float,
                 reuse_port: bool = False, can_accept: Callable[[], bool] = lambda: True) -> None:
        self.reactor = reactor
        self.name = name
        self.on_accept = on_accept
        self.batch = batch
        self.backoff = backoff
        self.reuse_port = reuse_port
        self.can_accept = can_accept
        self.sockets: List[Tuple[socket.socket, Address]] = []
        self.accepting = False
        self._timer: Optional[Timer] = None

    @property
    def addresses(self) -> List[Address]:
        return [a for _s, a in self.sockets]

    def bound(self) -> List[str]:
        """The addresses as bound (``host:port``): for a port 0, the port the kernel chose."""
        out = []
        for sock, addr in self.sockets:
            try:
                port = int(sock.getsockname()[1])
            except OSError:  # closed
                port = addr.port
            out.append(str(Address(addr.host, port)))
        return out

    def bind(self, addrs: Sequence[Address]) -> None:
        """Listen on exactly ``addrs`` from now on. Addresses already bound keep their sockets; new ones
        are bound first, so an OSError (naming the address) changes nothing; removed ones close."""
        current = {a: s for s, a in self.sockets}
        fresh: Dict[Address, socket.socket] = {}
        try:
            for addr in addrs:
                if addr not in current and addr not in fresh:
                    fresh[addr] = bind_listener(addr, self.reuse_port)
        except OSError:
            for sock in fresh.values():
                sock.close()
            raise
        was_accepting = self.accepting
        self.pause()
        for sock, addr in self.sockets:
            if addr not in addrs:
                sock.close()
        self.sockets = [(current[a] if a in current else fresh[a], a) for a in dict.fromkeys(addrs)]
        if was_accepting:
            self.resume()

    def resume(self) -> None:
        """Watch the sockets again (unless backing off after EMFILE or at the connection cap)."""
        if self.accepting or self._timer is not None or not self.can_accept():
            return
        for sock, addr in self.sockets:
            self.reactor.register(sock.fileno(), EVENT_READ, self._make_handler(sock, addr))
        self.accepting = True

    def pause(self) -> None:
        if not self.accepting:
            return
        for sock, _addr in self.sockets:
            try:
                self.reactor.unregister(sock.fileno())
            except (KeyError, ValueError):
                pass
        self.accepting = False

    def close(self) -> None:
        """Stop accepting and close every socket (idempotent)."""
        self.pause()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock, _addr in self.sockets:
            sock.close()
        self.sockets = []

    def _make_handler(self, lsock: socket.socket, addr: Address) -> Callable[[int], None]:
        def on_readable(mask: int) -> None:
            self._accept(lsock, addr)
        return on_readable

    def _accept(self, lsock: socket.socket, addr: Address) -> None:
        for _ in range(self.batch):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.error("%s: %s; pausing accepts for %gs", self.name, exc.strerror, self.backoff)
                    self.pause()
                    self._timer = self.reactor.call_later(self.backoff, self._end_backoff)
                else:
                    log.error("%s: %s", self.name, exc)
                return
            try:
                sock.setblocking(False)
                keep_going = self.on_accept(sock, peer, addr)
            except OSError as exc:
                log.warning("%s: accepted connection failed: %s", self.name, exc)
                sock.close()
                continue
            if not keep_going:
                self.pause()
                return

    def _end_backoff(self) -> None:
        self._timer = None
        self.resume()
