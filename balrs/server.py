"""The balancer: wiring and lifecycle of one balrs process. Nothing imports this module but the
command line, the supervisor and the Python API.

One ``Balancer`` runs on one reactor (one thread, one process). It builds the rooms and hands each the
narrow things it uses: the proxy's connections get a ``ProxyContext`` (reactor, settings, pool,
passive-health hooks, counters, access log), health checks and the resolver get the reactor, the pool
and a view of the running configuration, the admin endpoint a snapshot source. It owns the listeners,
the set of client connections, reloads, signals and the graceful stop.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

from .accesslog import LogSink, RequestIds, make_formatter
from .admin import AdminServer
from .adminapi import Action, apply_action
from .config import Address, AdminConfig, BackendConfig, Config, ConfigError, LogConfig, describe_changes, load
from .health import Health
from .limits import ClientBuckets, ClientConnections
from .listener import Listener
from .metrics import Snapshot, snapshot as metrics_snapshot
from .resolver import Resolver, is_ip_literal
from .pool import ADMIN_MAINT, Backend, Pools
from .routing import RouteTable
from .proxy import ClientConn, OverLimitClient, ProxyContext
from .reactor import Reactor
from .settings import Settings
from .strategies import make_strategy
from .timerwheel import Timer
from .edge import ProxyHeaderPhase, Trusted, make_peer
from .pystrategy import check_strategies
from .tls import EdgeTLS, load_tls
from .transport import Acceptor, Transport

__all__ = ["Balancer"]

log = logging.getLogger("balrs")

# Accepts per readiness event before the loop serves the connections it already has (CPython's
# asyncio accepts up to backlog per event; a bound keeps a connection storm from starving the rest).
ACCEPT_BATCH = 64
# After EMFILE/ENFILE, stop accepting this long instead of spinning on a listener we cannot serve
# (CPython's _accept_connection backs off 1s; shorter recovers faster once descriptors free up).
ACCEPT_BACKOFF = 0.1
# Exit status after a second SIGINT cut requests in flight off (a drain that ran its course exits 0, even
# one that drain_timeout ended: that is the configured way to stop).
EXIT_CUT_OFF = 1


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
        self.settings = Settings.from_config(config)
        # TLS contexts (listen certificates, backends'): raises ConfigError for a file it cannot load.
        self.tls: EdgeTLS = load_tls(config)
        check_strategies(config)  # ConfigError: a Python strategy that cannot be loaded
        reactor = self.reactor
        self.pool = Pools(config, reactor.clock, reactor.call_soon, make_strategy=make_strategy)
        self._apply_tls(self.tls)
        self.router: Optional[RouteTable] = RouteTable(config.routes, None, self.pool.named) if config.routes else None
        self.clients: Dict[ClientConn, None] = {}
        self.listener = Listener(reactor, "accept", self._new_client, ACCEPT_BATCH, ACCEPT_BACKOFF,
                                 reuse_port, lambda: len(self.clients) < self.settings.max_connections)
        self.stopped = False
        self.exit_code = 0
        self._drain_timer: Optional[Timer] = None
        self._budget_timer: Optional[Timer] = None  # feeds the retry budgets once a second
        self.accepted = 0
        self.health = Health(reactor, self.pool, lambda: self.config,
                             health_of=lambda b: self.pool.health_of(b, self.config))
        self.resolver = Resolver(reactor, self.pool, lambda: self.config.resolve_interval)
        self.ctx = ProxyContext(reactor, self.settings, self.pool, self.health, self.client_closed, self.router)
        self._apply_limits(config)
        self.access_log: Optional[LogSink] = None
        self._log_dropped = 0  # lines dropped by sinks a reload replaced
        self._apply_log(config.log, self._open_log(config.log))
        admin = self._admin_config(config)
        self.admin: Optional[AdminServer] = self._make_admin(admin) if admin is not None else None

    # ---- admin -----------------------------------------------------------------------------------
    def _admin_config(self, config: Config) -> Optional[AdminConfig]:
        return config.admin if self.serve_admin else None

    def _make_admin(self, admin: AdminConfig) -> AdminServer:
        return AdminServer(self.reactor, admin.listen, self._admin_source, self.reuse_port,
                           writer=self.admin_write, token=admin.token, write_from=admin.write_from,
                           explainer=self.admin_write)

    # ---- the admin API's writes (adminapi.Runtime) -----------------------------------------------------
    def admin_write(self, action: Action, deliver: Callable[[int, Dict[str, Any]], None]) -> None:
        """Apply an admin API action now and deliver its answer (also what a worker does for the
        supervisor, over the control channel)."""
        if action.get("op") == "explain":
            # Read-only: GET /api/explain (here, or for the supervisor over the control channel).
            # Imported on first use: the balancer's own modules stay what the data path needs.
            from .explain import explain, question_from_query
            try:
                question = question_from_query(str(action.get("query", "")))
            except ValueError as exc:
                deliver(400, {"error": str(exc)})
                return
            deliver(200, explain(question, self.config, self.pool, self.router, self.settings, self.reactor.now,
                                 True))
            return
        status, doc = apply_action(self, action)
        deliver(status, doc)

    def backend_named(self, name: str) -> Optional[Backend]:
        return self.pool.by_name(name)

    def pool_exists(self, name: str) -> bool:
        return name in self.pool.named

    def set_backend_state(self, backend: Backend, state: str) -> None:
        backend.set_admin_state(state)
        if state == ADMIN_MAINT:
            backend.idle.close_all()
        self.pool.refresh()
        self.pool.wake()

    def set_backend_weight(self, backend: Backend, weight: int) -> None:
        backend.set_weight(weight)
        self.pool.refresh()

    def add_backend(self, config: BackendConfig) -> None:
        """A backend added at runtime: applied like a reload of the running configuration plus it (so
        health checks, resolving and TLS treat it like any other); the next SIGHUP removes it again
        unless the file has it."""
        self.reload(dataclasses.replace(self.config, backends=self.config.backends + (config,)), self.tls)

    def remove_backend(self, backend: Backend) -> None:
        """Deleted at runtime: no new requests, those in flight finish, then it is gone (a reload of the
        running configuration without it)."""
        self.reload(dataclasses.replace(
            self.config, backends=tuple(b for b in self.config.backends if b.name != backend.name)), self.tls)

    def _admin_source(self, deliver: Callable[[Optional[Snapshot]], None]) -> None:
        deliver(self.snapshot())

    def snapshot(self) -> Snapshot:
        """This balancer's counters and state as plain data (``metrics.snapshot``); what the admin
        endpoint reports, and what a worker sends its supervisor."""
        snap = metrics_snapshot(self.pool, self.config, self,
                                self.admin.start_time if self.admin is not None else None, self.router)
        if any(a.port == 0 for a in self.config.listen):
            snap["listen"] = self.bound_addresses()  # the ports the kernel chose, not "0"
        return snap

    # ---- counters (metrics.Counters) ---------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.ctx.draining

    @property
    def client_connections(self) -> int:
        return len(self.clients)

    @property
    def log_dropped(self) -> int:
        return self._log_dropped + (self.access_log.dropped if self.access_log is not None else 0)

    @property
    def client_limited(self) -> List[int]:
        return self.ctx.limited

    @property
    def status_counts(self) -> List[int]:
        return self.ctx.status_counts

    def responses(self) -> Dict[int, int]:
        """Responses sent, by status code."""
        return self.ctx.responses()

    # ---- logs ------------------------------------------------------------------------------------
    def _open_log(self, lc: LogConfig) -> Optional[LogSink]:
        """The sink ``lc`` needs: the current one if its destination is unchanged, else a new one.
        Raises OSError (an unwritable file) before anything changes."""
        if lc.access == "off":
            return None
        old = self.access_log
        if old is not None and old.target == lc.access:
            return old
        return LogSink(lc.access)

    def _apply_log(self, lc: LogConfig, sink: Optional[LogSink]) -> None:
        """Switch to ``sink`` (from _open_log) and ``lc``'s format; turn request ids on or off."""
        ctx = self.ctx
        if (lc.request_id != "") != (ctx.request_ids is not None):
            ctx.request_ids = RequestIds().next if lc.request_id else None
        old = self.access_log
        self.access_log = sink
        ctx.log_line = sink.write if sink is not None else None
        ctx.log_format = make_formatter(lc.format) if sink is not None else None
        if old is not None and old is not sink:
            self._log_dropped += old.dropped
            old.close(0)  # on the loop: never wait for a slow destination (its writer finishes alone)

    def _on_usr1(self, signum: int) -> None:
        """logrotate: reopen the access log by its path."""
        if self.access_log is not None:
            log.info("SIGUSR1: reopening the access log")
            self.access_log.reopen()

    def log_routes(self) -> None:
        """The startup (and reload) log of routes -> pools, and of each pool's members."""
        pools = self.pool
        if len(pools.order) > 1 or self.router is not None:
            for pool in pools.order:
                log.info("pool %s: %s; strategy %s%s", pool.name,
                         ", ".join(b.name for b in pool.backends) or "no backends", pool.strategy_name,
                         "; backup %s" % pool.backup.name if pool.backup is not None else "")
        if self.router is not None:
            for route in self.router.routes:
                log.info("route %s -> %s", route.name, route.describe())
            log.info("no route matches -> %s", "pool default" if pools.default is not None else "404")

    # ---- listening -------------------------------------------------------------------------------
    @property
    def listeners(self) -> List[Tuple[socket.socket, Address]]:
        return self.listener.sockets

    def bound_addresses(self) -> List[str]:
        """The listen addresses as bound (``host:port``; a port 0 in the file shows the port chosen)."""
        return self.listener.bound()

    def listen(self) -> None:
        """Bind every ``listen`` address and start accepting. Raises OSError naming the address."""
        self.listener.bind(self.config.listen)
        self.listener.resume()

    def _new_client(self, sock: socket.socket, peer: Tuple[str, int], addr: Address) -> bool:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted += 1
        if addr.proxy:
            settings = self.settings
            if peer[0] not in settings.trusted:
                # Only a trusted proxy may say who the client is: anyone else is closed without a word.
                log.info("PROXY listener %s: %s is not in trusted_proxies; closed", addr, peer[0])
                sock.close()
                return True
            phase = ProxyHeaderPhase(self.reactor, sock, peer[0], settings.header_timeout,
                                     lambda s, ip, port, local: self._start_client(s, ip, port, local, addr),
                                     self.client_closed)
            self.clients[phase] = None  # type: ignore[index]
        else:
            self._start_client(sock, peer[0], peer[1], None, addr)
        # Above max_connections new connections wait in the kernel's accept backlog.
        return len(self.clients) < self.settings.max_connections

    def _start_client(self, sock: socket.socket, ip: str, port: int, local: Optional[Tuple[str, int]],
                      addr: Address) -> None:
        """A client connection on ``sock`` from ``ip`` (the socket's peer, or the PROXY header's)."""
        accept: Acceptor = Transport
        server_tls = self.tls.server
        if addr.tls and server_tls is not None:
            accept = server_tls.accept
        try:
            peer = make_peer(ip, port, b"https" if addr.tls else b"http", accept, self.settings.trusted, local, sock)
            conn_limit = self.ctx.conn_limit
            if conn_limit is None:
                conn: ClientConn = ClientConn(self.ctx, sock, ip, peer)
            elif conn_limit.open(ip):
                try:
                    conn = ClientConn(self.ctx, sock, ip, peer, conn_limit)
                except BaseException:
                    conn_limit.close(ip)
                    raise
            else:
                conn = OverLimitClient(self.ctx, sock, ip, peer)
        except (OSError, ValueError) as exc:
            log.warning("accepted connection from %s failed: %s", ip, exc)
            sock.close()
            return
        self.clients[conn] = None

    def _apply_tls(self, tls: EdgeTLS) -> None:
        """Give every backend its TLS connector (None: plain TCP); a changed one drops its pooled
        connections, made with the old one."""
        self.tls = tls
        for b in self.pool.backends:
            new = tls.backends.get(b.name)
            if b.tls is not new:
                if b.tls is not None:
                    b.idle.close_all()
                b.tls = new

    def _apply_limits(self, config: Config) -> None:
        """The per-client limits of ``config`` (limits.py). A reload keeps the buckets when rate and
        burst are unchanged, and the connection counts always (only the limit changes), so neither is
        a way around a limit."""
        ctx = self.ctx
        buckets = ctx.buckets
        if config.client_rate <= 0:
            ctx.buckets = None
        elif buckets is None or not buckets.same(config.client_rate, config.client_burst):
            ctx.buckets = ClientBuckets(config.client_rate, config.client_burst)
        if config.client_connections <= 0:
            ctx.conn_limit = None
        elif ctx.conn_limit is None:
            ctx.conn_limit = ClientConnections(config.client_connections)
        else:
            ctx.conn_limit.limit = config.client_connections

    def _arm_budgets(self) -> None:
        """While a pool's retry_on charges its retry budget, hand it the request counts once a second
        (from a timer, so the request path only adds one)."""
        if self._budget_timer is None and not self.stopped and self.pool.sync_budgets(self.reactor.now):
            self._budget_timer = self.reactor.call_later(1.0, self._budget_tick)

    def _budget_tick(self) -> None:
        self._budget_timer = None
        self._arm_budgets()

    def client_closed(self, conn: object) -> None:
        self.clients.pop(conn, None)  # type: ignore[call-overload]
        if self.ctx.draining:
            if not self.clients:
                self._finish_drain()
        elif not self.listener.accepting:
            self.listener.resume()


    # ---- lifecycle ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self.reactor.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        self.reactor.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        self.reactor.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.reactor.add_signal_handler(signal.SIGUSR1, self._on_usr1)

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
            tls = load_tls(config, self.tls)
            check_strategies(config)
        except (ConfigError, ValueError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        try:
            self.reload(config, tls)
        except OSError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc.strerror or exc)
            return False
        return True

    def reload(self, config: Config, tls: Optional[EdgeTLS] = None) -> None:
        """Apply a new configuration without dropping an established client connection (idle ones,
        tunnels and requests in flight included) or a request in flight: new listen addresses are
        bound first (an error changes nothing), removed ones stop accepting; backends are matched by
        name and address so health state and counters carry over."""
        old = self.config
        if tls is None:
            tls = load_tls(config, self.tls)  # ConfigError: a certificate that cannot be loaded
        check_strategies(config)  # ConfigError: a Python strategy that cannot be loaded (imported once)
        sink = self._open_log(config.log)  # an unwritable access log refuses the reload here
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
            if sink is not None and sink is not self.access_log:
                sink.close(0)
            raise

        self.config = config
        self.settings = self.ctx.settings = Settings.from_config(config)
        self._apply_log(config.log, sink)
        added, removed = self.pool.reload(config, lambda c: is_ip_literal(c.address.host))
        self.router = RouteTable(config.routes, self.router, self.pool.named) if config.routes else None
        self.ctx.router = self.router
        self.ctx.default_pool = self.pool.default
        self._apply_limits(config)
        for b in removed:
            b.idle.close_all()
        self._apply_tls(tls)
        self.health.reload()
        if any(not b.resolved for b in added):
            self.resolver.trigger()
        if self.admin is not None and new_admin is not None:
            self.admin.token = new_admin.token
            self.admin.write_from = Trusted(new_admin.write_from)
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
        self.pool.wake()
        self._arm_budgets()
        # e.g. "reloaded: 3 backend(s); added b3; removed b1; weight b2 1 -> 5; strategy round_robin"
        log.info("reloaded: %d backend(s)%s%s; %s", len(self.pool.backends),
                 "; added %s" % ", ".join(b.name for b in added) if added else "",
                 "; removed %s" % ", ".join(b.name for b in removed) if removed else "",
                 "; ".join(describe_changes(old, config)))
        self.log_routes()

    def _on_stop_signal(self, signum: int) -> None:
        if self.draining:
            if signum == signal.SIGINT:
                log.warning("second SIGINT: stopping now, cutting off %d connection(s) still open; exit status %d",
                            len(self.clients), EXIT_CUT_OFF)
                self.exit_code = EXIT_CUT_OFF
                self.stop()
            return
        log.info("%s: draining (up to %gs)", signal.Signals(signum).name, self.settings.drain_timeout)
        self.drain()

    def start(self) -> None:
        """Start what runs beside the proxy: health probes, the resolver thread, the admin endpoint."""
        self.log_routes()
        self.health.start()
        self.resolver.start()
        self._arm_budgets()
        if self.admin is not None:
            self.admin.start()

    def drain(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to drain_timeout)."""
        if self.draining:
            return
        self.listener.close()
        self.health.stop()
        self.resolver.stop()
        self.ctx.draining = True
        for backend in self.pool.backends:
            backend.idle.close_all()
        for conn in list(self.clients):
            conn.drain()
        if not self.clients:
            self._finish_drain()
            return
        self._drain_timer = self.reactor.call_later(self.settings.drain_timeout, self._drain_expired)

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
            backend.idle.close_all()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None
        if self.access_log is not None:
            self.access_log.close()
        self.reactor.stop()

    def run(self) -> int:
        self.reactor.run()
        return self.exit_code

