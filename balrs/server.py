"""The balancer: listeners, accepting, the upstream connection pool, counters, graceful stop.

One ``Balancer`` runs on one reactor (one thread, one process). It owns the sockets' lifecycle but not
the protocol: accepted sockets become ``ClientConn``s, and backend connections ``UpstreamConn``s.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Callable, Dict, List, Optional, Tuple

from .admin import AdminServer
from .config import Address, AdminConfig, Config, ConfigError, load
from .health import Health
from .listener import Listener
from .metrics import Snapshot, snapshot as metrics_snapshot
from .resolver import Resolver, is_ip_literal
from .pool import Pool
from .proxy import CLIENT_RECV_SIZE, ClientConn
from .reactor import Reactor
from .timerwheel import Timer

__all__ = ["Balancer"]

log = logging.getLogger("balrs")

# Accepts per readiness event before the loop serves the connections it already has (CPython's
# asyncio accepts up to backlog per event; a bound keeps a connection storm from starving the rest).
ACCEPT_BATCH = 64
# After EMFILE/ENFILE, stop accepting this long instead of spinning on a listener we cannot serve
# (CPython's _accept_connection backs off 1s; shorter recovers faster once descriptors free up).
ACCEPT_BACKOFF = 0.1
# The largest response head balrs accepts from a backend (HAProxy bufsize is 16 KiB; nginx
# proxy_buffer_size 4-8 KiB); past it the answer is 502.
MAX_RESPONSE_HEAD = 65536


class Balancer:
    """Everything one balrs process serves with."""

    def __init__(self, config: Config, reactor: Optional[Reactor] = None,
                 overrides: Optional[Callable[[Config], Config]] = None, reuse_port: bool = False,
                 serve_admin: bool = True) -> None:
        self.reactor = reactor if reactor is not None else Reactor()
        self.selector = self.reactor.selector
        self.config = config
        # Command-line overrides, applied again to every reloaded file.
        self.overrides = overrides
        self.reuse_port = reuse_port
        # A worker under a supervisor leaves [admin] to the supervisor, which asks every worker for a
        # snapshot (control.py) and answers for all of them.
        self.serve_admin = serve_admin
        self.pool = Pool(config.backends, _active_strategy(config.strategy), config.hash_key, self.reactor.clock)
        self.clients: Dict[ClientConn, None] = {}
        self.listener = Listener(self.reactor, "accept", self._new_client, ACCEPT_BATCH, ACCEPT_BACKOFF,
                                 reuse_port, lambda: len(self.clients) < self.max_connections)
        self.draining = False
        self.stopped = False
        self.exit_code = 0
        self._drain_timer: Optional[Timer] = None
        # Counters (the admin endpoint reports them): responses by status code, indexed directly.
        self.status_counts: List[int] = [0] * 1000
        self.accepted = 0
        self._pump_scheduled = False
        self._apply_settings(config)
        self.health = Health(self)
        self.resolver = Resolver(self)
        admin = self._admin_config(config)
        self.admin: Optional[AdminServer] = self._make_admin(admin) if admin is not None else None

    # ---- admin -----------------------------------------------------------------------------------
    def _admin_config(self, config: Config) -> Optional[AdminConfig]:
        return config.admin if self.serve_admin else None

    def _make_admin(self, admin: AdminConfig) -> AdminServer:
        return AdminServer(self.reactor, admin.listen, self._admin_source, self.reuse_port)

    def _admin_source(self, deliver: Callable[[Optional[Snapshot]], None]) -> None:
        deliver(self.snapshot())

    def snapshot(self) -> Snapshot:
        """This balancer's counters and state as plain data (``metrics.snapshot``); what the admin
        endpoint reports, and what a worker sends its supervisor."""
        return metrics_snapshot(self, self.admin.start_time if self.admin is not None else None)

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
        self.pipeline_limit = c.max_header_bytes + CLIENT_RECV_SIZE
        # How often a connection in a state with no deadline of its own looks at its state again (every
        # transition into a state with a deadline arms the timer for it; this is the safety net).
        self.check_interval = max(0.05, min(c.client_timeout, c.header_timeout, c.backend_timeout,
                                            c.body_timeout, c.send_timeout))

    # ---- listening -------------------------------------------------------------------------------
    @property
    def listeners(self) -> List[Tuple[socket.socket, Address]]:
        return self.listener.sockets

    def listen(self) -> None:
        """Bind every ``listen`` address and start accepting. Raises OSError naming the address."""
        self.listener.bind(self.config.listen)
        self.listener.resume()

    def _new_client(self, sock: socket.socket, peer: Tuple[str, int]) -> bool:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ClientConn(self, sock, peer[0])
        self.clients[conn] = None
        self.accepted += 1
        # Above max_connections new connections wait in the kernel's accept backlog.
        return len(self.clients) < self.max_connections

    def client_closed(self, conn: ClientConn) -> None:
        self.clients.pop(conn, None)
        if self.draining:
            if not self.clients:
                self._finish_drain()
        elif not self.listener.accepting:
            self.listener.resume()

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
        new_admin, old_admin = self._admin_config(config), self._admin_config(old)
        admin_moved = new_admin is not None and self.admin is not None and new_admin != old_admin
        if admin_moved and self.admin is not None and new_admin is not None:
            # New addresses are bound before anything changes: an error leaves the old config running.
            self.admin.rebind(new_admin.listen)
        try:
            self.listener.bind(config.listen)
        except OSError:
            if admin_moved and self.admin is not None and old_admin is not None:
                self.admin.rebind(old_admin.listen)
            raise

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
        if new_admin is None and self.admin is not None:
            self.admin.stop()
            self.admin = None
        elif new_admin is not None and self.admin is None:
            self.admin = self._make_admin(new_admin)
            try:
                self.admin.start()
            except OSError as exc:
                log.error("admin endpoint: %s", exc.strerror or exc)
                self.admin = None
        self.listener.resume()
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
        self.listener.close()
        self.health.stop()
        self.resolver.stop()
        self.draining = True
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
        self.listener.close()
        self.health.stop()
        self.resolver.stop()
        if self.admin is not None:
            self.admin.stop()
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
