"""The balancer: listeners, accepting, the upstream connection pool, counters, graceful stop.

One ``Balancer`` runs on one reactor (one thread, one process). It owns the sockets' lifecycle but not
the protocol: accepted sockets become ``ClientConn``s, and backend connections ``UpstreamConn``s.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
from typing import Callable, Dict, List, Optional, Tuple

from .admin import AdminServer
from .config import Address, Config, ConfigError, load
from .health import Health
from .resolver import Resolver, is_ip_literal
from .pool import Pool
from .proxy import ClientConn
from .reactor import EVENT_READ, Reactor
from .timerwheel import Timer

__all__ = ["Balancer", "bind_listener"]

log = logging.getLogger("balrs")

# Accepts per readiness event before the loop serves the connections it already has (CPython's
# asyncio accepts up to backlog per event; a bound keeps a connection storm from starving the rest).
ACCEPT_BATCH = 64
# Listen backlog (the kernel caps it at net.core.somaxconn): connections above max_connections wait here.
LISTEN_BACKLOG = 4096
# After EMFILE/ENFILE, stop accepting this long instead of spinning on a listener we cannot serve
# (CPython's _accept_connection backs off 1s; shorter recovers faster once descriptors free up).
ACCEPT_BACKOFF = 0.1
# The largest response head balrs accepts from a backend (HAProxy bufsize is 16 KiB; nginx
# proxy_buffer_size 4-8 KiB); past it the answer is 502.
MAX_RESPONSE_HEAD = 65536


def bind_listener(addr: Address, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A non-blocking listening socket for ``addr`` (only bound if not ``listen``). Raises OSError
    naming the address."""
    infos = socket.getaddrinfo(addr.host, addr.port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP,
                               socket.AI_PASSIVE)
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
        raise OSError(exc.errno, "cannot listen on %s: %s" % (addr, exc.strerror or exc)) from None
    return sock


class Balancer:
    """Everything one balrs process serves with."""

    def __init__(self, config: Config, reactor: Optional[Reactor] = None,
                 overrides: Optional[Callable[[Config], Config]] = None, reuse_port: bool = False) -> None:
        self.reactor = reactor if reactor is not None else Reactor()
        self.selector = self.reactor.selector
        self.config = config
        # Command-line overrides, applied again to every reloaded file.
        self.overrides = overrides
        self.reuse_port = reuse_port
        self.pool = Pool(config.backends, _active_strategy(config.strategy), config.hash_key, self.reactor.clock)
        self.clients: Dict[ClientConn, None] = {}
        self.listeners: List[Tuple[socket.socket, Address]] = []
        self.listening = False
        self.draining = False
        self.stopped = False
        self.exit_code = 0
        self._drain_timer: Optional[Timer] = None
        self._accept_timer: Optional[Timer] = None
        # Counters (the admin endpoint reports them): responses by status code, indexed directly.
        self.status_counts: List[int] = [0] * 1000
        self.accepted = 0
        self._pump_scheduled = False
        self._apply_settings(config)
        self.health = Health(self)
        self.resolver = Resolver(self)
        self.admin: Optional[AdminServer] = AdminServer(self) if config.admin is not None else None

    def _apply_settings(self, c: Config) -> None:
        # Copied to plain attributes: connections read them on every request.
        self.connect_timeout = c.connect_timeout
        self.header_timeout = c.header_timeout
        self.client_timeout = c.client_timeout
        self.backend_timeout = c.backend_timeout
        self.tunnel_timeout = c.tunnel_timeout
        self.body_timeout = c.body_timeout
        self.send_timeout = c.send_timeout
        self.retries = c.retries
        self.max_connections = c.max_connections
        self.max_header_bytes = c.max_header_bytes
        self.max_body_bytes = c.max_body_bytes
        self.drain_timeout = c.drain_timeout
        self.queue_timeout = c.queue_timeout
        self.max_response_head = max(MAX_RESPONSE_HEAD, c.max_header_bytes)
        # Pipelined requests buffered while one is answered: one full head plus one read.
        self.pipeline_limit = c.max_header_bytes + 65536
        # How often a connection in a state with no deadline of its own looks at its state again (every
        # transition into a state with a deadline arms the timer for it; this is the safety net).
        self.check_interval = max(0.05, min(c.client_timeout, c.header_timeout, c.backend_timeout,
                                            c.body_timeout, c.send_timeout))

    # ---- listening -------------------------------------------------------------------------------
    def listen(self) -> None:
        """Bind every ``listen`` address and start accepting. Raises OSError naming the address."""
        self.listeners = self._bind(self.config.listen)
        self._start_accepting()

    def _bind(self, addrs: "tuple[Address, ...] | List[Address]") -> List[Tuple[socket.socket, Address]]:
        bound: List[Tuple[socket.socket, Address]] = []
        try:
            for addr in addrs:
                bound.append((bind_listener(addr, self.reuse_port), addr))
        except OSError:
            for s, _a in bound:
                s.close()
            raise
        return bound

    def _start_accepting(self) -> None:
        if self.listening or self.draining:
            return
        for sock, _addr in self.listeners:
            self.reactor.register(sock.fileno(), EVENT_READ, self._make_acceptor(sock))
        self.listening = True

    def _stop_accepting(self) -> None:
        if not self.listening:
            return
        for sock, _addr in self.listeners:
            try:
                self.reactor.unregister(sock.fileno())
            except (KeyError, ValueError):
                pass
        self.listening = False

    def _make_acceptor(self, lsock: socket.socket) -> Callable[[int], None]:
        def on_accept(mask: int) -> None:
            self._accept(lsock)
        return on_accept

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing accepts for %gs", exc.strerror, ACCEPT_BACKOFF)
                    self._stop_accepting()
                    self._accept_timer = self.reactor.call_later(ACCEPT_BACKOFF, self._resume_accepting)
                else:
                    log.error("accept: %s", exc)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = ClientConn(self, sock, addr[0])
            except OSError as exc:
                log.warning("accepted connection failed: %s", exc)
                sock.close()
                continue
            self.clients[conn] = None
            self.accepted += 1
            if len(self.clients) >= self.max_connections:
                # Above max_connections new connections wait in the kernel's accept backlog.
                self._stop_accepting()
                return

    def _resume_accepting(self) -> None:
        self._accept_timer = None
        if len(self.clients) < self.max_connections:
            self._start_accepting()

    def client_closed(self, conn: ClientConn) -> None:
        self.clients.pop(conn, None)
        if self.draining:
            if not self.clients:
                self._finish_drain()
        elif not self.listening and self._accept_timer is None and len(self.clients) < self.max_connections:
            self._start_accepting()

    # ---- backends ----------------------------------------------------------------------------------
    def pump_queue(self) -> None:
        """A backend slot may have freed up (or a backend came back): let waiting requests try again,
        in order, from the loop (not from inside the connection code that freed the slot)."""
        if not self._pump_scheduled and self.pool.queue:
            self._pump_scheduled = True
            self.reactor.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        queue = self.pool.queue
        while queue:
            client = queue.popleft()
            if not client.dequeue():
                queue.appendleft(client)
                break

    def responses(self) -> Dict[int, int]:
        """Responses sent, by status code."""
        return {code: n for code, n in enumerate(self.status_counts) if n}

    # ---- lifecycle ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self.reactor.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        self.reactor.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        self.reactor.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int) -> None:
        if self.draining:
            return
        log.info("SIGHUP: reloading %s", self.config.path)
        self.reload_file()

    def reload_file(self) -> bool:
        """Re-read the configuration file and apply it; on any error keep running the old one."""
        try:
            config = load(self.config.path)
            if self.overrides is not None:
                config = self.overrides(config)
        except (ConfigError, ValueError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        try:
            self.reload(config)
        except OSError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc.strerror or exc)
            return False
        return True

    def reload(self, config: Config) -> None:
        """Apply a new configuration without dropping an established client connection (idle ones,
        tunnels and requests in flight included) or a request in flight: new listen addresses are
        bound first (an error changes nothing), removed ones stop accepting; backends are matched by
        name and address so health state and counters carry over."""
        old = self.config
        keep = [(s, a) for s, a in self.listeners if a in config.listen]
        fresh = self._bind([a for a in config.listen if a not in {b for _s, b in self.listeners}])
        if config.admin is not None and self.admin is not None and config.admin != old.admin:
            try:
                self.admin.rebind(config.admin.listen)
            except OSError:
                for s, _a in fresh:
                    s.close()
                raise
        for s, a in self.listeners:
            if a not in config.listen:
                if self.listening:
                    try:
                        self.reactor.unregister(s.fileno())
                    except (KeyError, ValueError):
                        pass
                s.close()
        if self.listening:
            for s, _a in fresh:
                self.reactor.register(s.fileno(), EVENT_READ, self._make_acceptor(s))
        self.listeners = keep + fresh

        self.config = config
        self._apply_settings(config)
        added, removed = self.pool.reload(
            config.backends, _active_strategy(config.strategy), config.hash_key,
            lambda c: is_ip_literal(c.address.host))
        for b in removed:
            for up in list(b.idle):
                up.close()
        self.health.reload()
        if any(not b.resolved for b in added):
            self.resolver.trigger()
        if config.admin is None and self.admin is not None:
            self.admin.stop()
            self.admin = None
        elif config.admin is not None and self.admin is None:
            self.admin = AdminServer(self)
            try:
                self.admin.start()
            except OSError as exc:
                log.error("admin endpoint: %s", exc.strerror or exc)
                self.admin = None
        if not self.listening and len(self.clients) < self.max_connections and self._accept_timer is None:
            self._start_accepting()
        self.pump_queue()
        log.info("reloaded: %d backend(s)%s%s; strategy %s", len(self.pool.backends),
                 "; added %s" % ", ".join(b.name for b in added) if added else "",
                 "; removed %s" % ", ".join(b.name for b in removed) if removed else "", config.strategy)

    def _on_stop_signal(self, signum: int) -> None:
        if self.draining:
            if signum == signal.SIGINT:
                log.warning("second SIGINT: stopping now")
                self.stop()
            return
        log.info("%s: draining (up to %gs)", signal.Signals(signum).name, self.drain_timeout)
        self.drain()

    def start(self) -> None:
        """Start what runs beside the proxy: health probes, the resolver thread, the admin endpoint."""
        self.health.start()
        self.resolver.start()
        if self.admin is not None:
            self.admin.start()

    def drain(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to drain_timeout)."""
        if self.draining:
            return
        self._stop_accepting()
        self.health.stop()
        self.resolver.stop()
        self.draining = True
        for sock, _addr in self.listeners:
            sock.close()
        self.listeners = []
        for backend in self.pool.backends:
            for up in list(backend.idle):
                up.close()
        for conn in list(self.clients):
            conn.drain()
        if not self.clients:
            self._finish_drain()
            return
        self._drain_timer = self.reactor.call_later(self.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self._drain_timer = None
        log.warning("drain_timeout: closing %d connection(s) still open", len(self.clients))
        self.stop()

    def _finish_drain(self) -> None:
        log.info("drained; exiting")
        self.stop()

    def stop(self) -> None:
        """Close everything now and stop the loop."""
        if self.stopped:
            return
        self.stopped = True
        self._stop_accepting()
        self.health.stop()
        self.resolver.stop()
        if self.admin is not None:
            self.admin.stop()
        for sock, _addr in self.listeners:
            sock.close()
        self.listeners = []
        for conn in list(self.clients):
            conn.abort()
        for backend in self.pool.backends:
            for up in list(backend.idle):
                up.close()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self.reactor.stop()

    def run(self) -> int:
        self.reactor.run()
        return self.exit_code


def _active_strategy(name: str) -> str:
    """The strategy to run; those that land in a later release fall back to round robin (logged)."""
    from .strategies import STRATEGY_CLASSES
    if name in STRATEGY_CLASSES:
        return name
    log.warning("strategy %s is not implemented yet; using round_robin", name)
    return "round_robin"
