"""``workers = N``: a small supervisor process and N worker processes sharing each port.

Each worker is a whole balancer (its own reactor, pool, health checks and counters) and binds every
listen address itself with SO_REUSEPORT, so the kernel spreads new connections over the workers
(nginx's ``reuseport``). The supervisor serves no traffic; like gunicorn's arbiter it:

- forks the workers and restarts one that dies (with a growing delay if it keeps dying at once),
- forwards SIGTERM/SIGINT (graceful drain), SIGHUP (reload) and SIGUSR1 (reopen logs) to them,
- re-reads the file on SIGHUP first, so an invalid file is reported once and changes nothing, and
  starts or stops workers when ``workers`` changed,
- exits 0 once every worker has drained (killing stragglers after drain_timeout plus a grace period),

and it serves the admin endpoint for the whole balancer: each worker has a control channel to the
supervisor (a socket pair made before the fork), and an admin request asks every worker for a snapshot
of its counters and answers with their merge (``control.py``, ``metrics.merge``).

Signal handlers only record; the supervisor's own reactor acts on them (STYLE habit 11).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from typing import Callable, Dict, Optional, Sequence

from . import __version__
from .admin import AdminServer
from .config import Address, Config, ConfigError, load
from .pystrategy import check_strategies
from .tls import load_tls
from .control import SnapshotCollector, WorkerControl
from .edge import Trusted
from .reactor import Reactor
from .listener import bind_listener

__all__ = ["Supervisor", "run_worker"]

log = logging.getLogger("balrs")

# A worker that exits this soon after it started counts as failing at start; after this many such
# exits in a row the supervisor gives up (a bind error or a broken host would make it spin forever).
EARLY_EXIT = 2.0
MAX_EARLY_EXITS = 5
# Restart delay after an unexpected exit: doubles on each early exit, up to the maximum.
RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 10.0
# Time granted beyond drain_timeout before the supervisor kills workers that have not exited.
STOP_GRACE = 5.0
# Exit status of a worker that could not bind its listen addresses.
EXIT_BIND = 3
# Exit status after a second SIGINT cut requests in flight off (as a single process's, server.py).
EXIT_CUT_OFF = 1


def _exit_code(status: int) -> int:
    """A wait status as an exit code, negative for a signal (``os.waitstatus_to_exitcode``, 3.9+)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_worker(config: Config, overrides: Optional[Callable[[Config], Config]],
               control: Optional[socket.socket] = None) -> int:
    """Body of a worker process: a Balancer with SO_REUSEPORT listeners, without the admin endpoint
    (the supervisor serves it), answering the supervisor's questions on ``control``."""
    from .server import Balancer
    balancer = Balancer(config, overrides=overrides, reuse_port=True, serve_admin=False)
    balancer.install_signal_handlers()  # before the port opens: an early SIGTERM drains
    try:
        balancer.listen()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return EXIT_BIND
    try:
        balancer.start()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return EXIT_BIND
    worker_control = (WorkerControl(balancer.reactor, control, balancer.snapshot, balancer.admin_write)
                      if control is not None else None)
    try:
        return balancer.run()
    finally:
        if worker_control is not None:
            worker_control.close()
        balancer.reactor.close()


class Supervisor:
    def __init__(self, config: Config, overrides: Optional[Callable[[Config], Config]] = None) -> None:
        self.config = config
        self.overrides = overrides
        self.reactor = Reactor()
        self.workers: Dict[int, float] = {}   # pid -> start time
        self.early_exits = 0
        self.stopping = False
        self.exit_code = 0
        self._restart_pending = 0
        # The workers' control channels, and the admin endpoint that reports what they answer.
        self.collector = SnapshotCollector(self.reactor, lambda: self.config.workers,
                                           lambda: self.admin.start_time if self.admin is not None else None)
        self.admin: Optional[AdminServer] = None

    # ---- start ---------------------------------------------------------------------------------
    def check_bind(self, addrs: Optional[Sequence[Address]] = None) -> None:
        """Fail, with the address in the message, when a listen address is taken by anything at all.

        Each worker binds for itself with SO_REUSEPORT, and the kernel lets any other socket of the same
        user that sets SO_REUSEPORT bind beside it and take a share of the connections, silently (a second
        balrs started by mistake). So the trial bind here is exclusive, without SO_REUSEPORT (and without
        listen(), so it takes no traffic): it fails exactly when a single balrs process would, and the
        workers bind the moment it is released. Only at start and for addresses a reload adds: the
        addresses already served are held by this supervisor's own workers. The admin addresses are
        bound for real by :meth:`start_admin`."""
        for addr in self.config.listen if addrs is None else addrs:
            sock = bind_listener(addr, reuse_port=False, listen=False)
            sock.close()

    def start_admin(self) -> None:
        """Serve [admin] listen (if configured) from the supervisor. Raises OSError naming the address."""
        admin = self.config.admin
        if admin is None or self.admin is not None:
            return
        server = AdminServer(self.reactor, admin.listen, self.collector.collect, writer=self.collector.write,
                             explainer=self.collector.ask,
                             token=admin.token, write_from=admin.write_from)
        server.start()
        self.admin = server

    def run(self) -> int:
        self.check_bind()
        r = self.reactor
        r.add_signal_handler(signal.SIGTERM, self._on_stop)
        r.add_signal_handler(signal.SIGINT, self._on_stop)
        r.add_signal_handler(signal.SIGHUP, self._on_hup)
        r.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        r.add_signal_handler(signal.SIGCHLD, self._on_child)
        try:
            self.start_admin()
            config = self.config
            log.info("balrs %s listening on %s with %d workers; strategy %s; backends %s", __version__,
                     ", ".join(str(a) for a in config.listen), config.workers, config.strategy,
                     ", ".join("%s=%s" % (b.name, b.address) for b in config.backends))
            for _ in range(self.config.workers):
                self._spawn()
            r.run()
        finally:
            if self.admin is not None:
                self.admin.stop()
            self.collector.close()
            r.close()
        return self.exit_code

    def _spawn(self) -> None:
        # The control channel: the supervisor keeps one end, the worker the other.
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = 1
            try:
                ours.close()
                self._become_worker()
                code = run_worker(self.config, self.overrides, theirs)
            except BaseException:  # noqa: B036 - a worker must never return into the supervisor's code
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        theirs.close()
        self.workers[pid] = self.reactor.clock()
        self.collector.add(pid, ours)
        log.info("supervisor: worker %d started", pid)

    def _become_worker(self) -> None:
        """In the child: drop the supervisor's loop, signal plumbing, admin sockets and the other
        workers' control channels before building our own."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # Until the worker's own handlers are installed, a reload or reopen signal must not kill it
        # (their default action is to terminate): it is ignored meanwhile.
        for held in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(held, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        # Closed without unregistering: the selector (the parent's registrations) goes with them.
        if self.admin is not None:
            self.admin.close_inherited()
        for sock in self.collector.sockets():
            sock.close()
        self.reactor.selector.close()

    # ---- signals -------------------------------------------------------------------------------
    def _on_stop(self, signum: int) -> None:
        if self.stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: the workers stop at once
                log.warning("supervisor: second SIGINT: workers stop now, cutting off requests in flight; "
                            "exit status %d", EXIT_CUT_OFF)
                self.exit_code = EXIT_CUT_OFF
                self._signal_all(signal.SIGINT)
            return
        self.stopping = True
        log.info("supervisor: %s, draining %d workers", signal.Signals(signum).name, len(self.workers))
        self._signal_all(signal.SIGTERM)
        self.reactor.call_later(self.config.drain_timeout + STOP_GRACE, self._kill_stragglers)
        if not self.workers:
            self.reactor.stop()

    def _on_usr1(self, signum: int) -> None:
        """logrotate: every worker reopens its access log."""
        log.info("supervisor: SIGUSR1, workers reopen their access logs")
        self._signal_all(signal.SIGUSR1)

    def _on_hup(self, signum: int) -> None:
        if self.stopping:
            return
        try:
            config = load(self.config.path)
            if self.overrides is not None:
                config = self.overrides(config)
            load_tls(config)  # a certificate that cannot be loaded refuses the reload here
            check_strategies(config)  # and so does a Python strategy
        except (ConfigError, ValueError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        old = self.config
        # Listen addresses the reload adds must be free, as for a single balancer (see check_bind).
        added = [a for a in config.listen if a not in old.listen]
        try:
            self.check_bind(added)
        except OSError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc.strerror or exc)
            return
        # [admin] is the supervisor's: new addresses are bound first, and if they cannot be, nothing
        # changes (like a single balancer's reload).
        if config.admin is not None and self.admin is not None and config.admin != old.admin:
            try:
                self.admin.rebind(config.admin.listen)
            except OSError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc.strerror or exc)
                return
        self.config = config
        if config.admin is not None and self.admin is not None:
            self.admin.token = config.admin.token
            self.admin.write_from = Trusted(config.admin.write_from)
        if config.admin is None and self.admin is not None:
            self.admin.stop()
            self.admin = None
            log.info("supervisor: admin endpoint stopped")
        elif config.admin is not None and self.admin is None:
            try:
                self.start_admin()
            except OSError as exc:
                log.error("admin endpoint: %s", exc.strerror or exc)
        log.info("supervisor: SIGHUP, reloading %d workers", len(self.workers))
        self.collector.reloaded()
        self._signal_all(signal.SIGHUP)
        # More or fewer workers: start the missing ones (they read the new file), drain the extra ones.
        extra = len(self.workers) - config.workers
        if extra > 0:
            for pid in sorted(self.workers, key=self.workers.__getitem__, reverse=True)[:extra]:
                self._kill(pid, signal.SIGTERM)
                self.workers[pid] = -1.0  # retiring: not restarted when it exits
        elif extra < 0:
            for _ in range(-extra):
                self._spawn()
        if config.workers != old.workers:
            log.info("supervisor: workers %d -> %d", old.workers, config.workers)

    def _on_child(self, signum: int) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            started = self.workers.pop(pid, None)
            if started is None:
                continue
            self.collector.remove(pid)
            code = _exit_code(status)
            if self.stopping or started < 0:
                log.info("supervisor: worker %d exited (%s)", pid, code)
                continue
            self._worker_died(pid, code, started)
        if self.stopping and not self.workers:
            log.info("supervisor: all workers exited")
            self.reactor.stop()

    def _worker_died(self, pid: int, code: int, started: float) -> None:
        now = self.reactor.clock()
        if now - started < EARLY_EXIT:
            self.early_exits += 1
        else:
            self.early_exits = 0
        if self.early_exits >= MAX_EARLY_EXITS or code == EXIT_BIND:
            log.error("supervisor: worker %d exited with %s right after starting; giving up", pid, code)
            self.exit_code = 1
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            if not self.workers:
                self.reactor.stop()
            return
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * (2 ** self.early_exits))
        log.warning("supervisor: worker %d exited unexpectedly (%s); restarting in %gs", pid, code, delay)
        self._restart_pending += 1
        self.reactor.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_pending -= 1
        if not self.stopping and len(self.workers) < self.config.workers:
            self._spawn()

    # ---- helpers -------------------------------------------------------------------------------
    def _signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            self._kill(pid, signum)

    def _kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def _kill_stragglers(self) -> None:
        if self.workers:
            log.warning("supervisor: %d workers still running after drain; killing them", len(self.workers))
            self._signal_all(signal.SIGKILL)
