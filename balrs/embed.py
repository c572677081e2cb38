"""The Python API: ``with balrs.serve(config) as lb:`` runs a balancer on a background thread.

One :class:`Server` is one ``Balancer`` on its own reactor, on its own thread (``workers = 1``; a
process may run several). Everything that touches the balancer runs on that thread: the caller's
``status()``, ``reload()`` and ``close()`` hand a callback over with ``Reactor.call_soon_threadsafe``
and wait for its answer, so no balancer state is ever read or written from two threads.

What ``serve`` does not do, so that it can run inside any program (a test suite, an application):
it installs no signal handler (only the main thread may, and the program owns them; SIGHUP and
SIGTERM mean nothing to an embedded balancer: call ``reload`` and ``close``), configures no logging
(records go to the ``balrs`` logger, for the program to route), and changes no process-wide setting
(the descriptor limit is left alone).

Errors are raised in the caller's thread: a ConfigError (``FILE:LINE: [section] key: message``) for
a configuration that does not parse or load (certificates, Python strategies), an OSError naming the
address for one that cannot be bound, ValueError for ``workers`` above 1.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from .config import Config, load, parse_text
from .metrics import status_of
from .pystrategy import check_strategies
from .server import Balancer

__all__ = ["serve", "Server", "ConfigSource", "TEXT_LABEL"]

log = logging.getLogger("balrs")

# What serve() and reload() take: a path to an lb.ini, its text, or a parsed Config.
ConfigSource = Union[str, "os.PathLike[str]", Config]
# How errors in INI text given as a string name their "file" (``<balrs.serve>:3: [balancer] ...``).
TEXT_LABEL = "<balrs.serve>"
# How long status() and reload() wait for the loop thread's answer by default (it answers from memory
# at once; the bound only matters if the loop is stuck).
DEFAULT_CALL_TIMEOUT = 10.0
# After drain_timeout, how long close() still waits for the thread before it stops it outright.
CLOSE_GRACE = 5.0

T = TypeVar("T")
HostPort = Tuple[str, int]


def _load(config: ConfigSource) -> Config:
    """A Config from a path, INI text (a str holding a newline or starting with ``[``) or a Config."""
    if isinstance(config, Config):
        return config
    if isinstance(config, str) and ("\n" in config or config.lstrip().startswith("[")):
        return parse_text(config, TEXT_LABEL)
    return load(os.fspath(config))


def _check(config: Config) -> None:
    if config.workers > 1:
        raise ValueError("workers = %d: balrs.serve runs one balancer on a thread (use `python -m balrs` "
                         "for worker processes)" % config.workers)
    check_strategies(config)  # imports the user's modules here, in the caller's thread


def _bound(sockets: List[Tuple[socket.socket, Any]]) -> List[HostPort]:
    """The addresses ``sockets`` are bound to (the real port for a port 0), as (host, port)."""
    out = []
    for sock, _addr in sockets:
        try:
            name = sock.getsockname()
        except OSError:
            continue
        out.append((str(name[0]), int(name[1])))
    return out


class _Reply:
    """The answer of a callback run on the loop thread, waited for by the caller."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class Server:
    """A balancer running on a background thread (made by :func:`serve`).

    ``address``: the first listen address as (host, port), the real port when ``listen`` asks for
    port 0; ``addresses``: all of them; ``url``: ``http://host:port/`` of the first; ``admin_address``:
    the first ``[admin] listen`` address (None without [admin]). ``status()``, ``reload()`` and
    ``close()`` are safe from any thread; ``close()`` is idempotent, and leaving a ``with`` block
    calls it."""

    def __init__(self, balancer: Balancer, source: Optional[str]) -> None:
        self._balancer = balancer
        self._source = source  # the file to re-read on reload() without an argument
        self._lock = threading.Lock()
        self._closed = False
        self._error: Optional[BaseException] = None
        self._addresses = _bound(balancer.listeners)
        self._admin = _bound(balancer.admin.listeners) if balancer.admin is not None else []
        self._thread = threading.Thread(target=self._run, name="balrs-%s" % self._addresses[0][1]
                                        if self._addresses else "balrs", daemon=True)
        self._thread.start()

    # ---- the loop thread --------------------------------------------------------------------------
    def _run(self) -> None:
        balancer = self._balancer
        try:
            balancer.run()
        except BaseException as exc:  # a bug that escaped the loop's own backstops: keep it for the caller
            self._error = exc
            log.exception("balrs.serve: the balancer's loop stopped")
            try:
                balancer.stop()
            except Exception:
                pass
        finally:
            balancer.reactor.close()

    def _call(self, fn: Callable[[], T], timeout: Optional[float]) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its exception) here."""
        if self._closed:
            raise RuntimeError("this balrs server is closed")
        reply = _Reply()

        def run() -> None:
            try:
                reply.value = fn()
            except BaseException as exc:
                reply.error = exc
            reply.done.set()

        self._balancer.reactor.call_soon_threadsafe(run)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not reply.done.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError("the balancer's loop has stopped%s"
                                   % (": %r" % self._error if self._error is not None else ""))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the balancer's loop did not answer within %ss" % timeout)
        if reply.error is not None:
            raise reply.error
        return reply.value  # type: ignore[no-any-return]

    # ---- the API ----------------------------------------------------------------------------------
    @property
    def address(self) -> HostPort:
        return self._addresses[0]

    @property
    def addresses(self) -> List[HostPort]:
        return list(self._addresses)

    @property
    def url(self) -> str:
        host, port = self._addresses[0]
        return "http://%s:%d/" % ("[%s]" % host if ":" in host else host, port)

    @property
    def admin_address(self) -> Optional[HostPort]:
        return self._admin[0] if self._admin else None

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def status(self, timeout: Optional[float] = DEFAULT_CALL_TIMEOUT) -> Dict[str, Any]:
        """The /status document (what ``[admin]``'s /status answers) as a dict of plain data, taken on
        the loop thread (``listen`` shows the port bound for a port 0)."""
        balancer = self._balancer

        def take() -> str:
            # json: a copy that shares nothing with the balancer (and is exactly what /status would say)
            return json.dumps(status_of(balancer.snapshot()))

        return json.loads(self._call(take, timeout))  # type: ignore[no-any-return]

    def reload(self, config: Optional[ConfigSource] = None, timeout: Optional[float] = DEFAULT_CALL_TIMEOUT) -> None:
        """Apply a new configuration (a path, INI text or a Config; None: re-read the file serve() was
        given) as SIGHUP does: established connections and requests in flight are kept, backends
        matched by name and address keep their state. Raises (and changes nothing) for a configuration
        that does not load, or an address that cannot be bound."""
        if config is None:
            if self._source is None:
                raise ValueError("reload() needs a configuration: serve() was not given a file")
            config = self._source
        new = _load(config)
        _check(new)
        balancer = self._balancer

        def apply() -> List[List[HostPort]]:
            balancer.reload(new)
            return [_bound(balancer.listeners),
                    _bound(balancer.admin.listeners) if balancer.admin is not None else []]

        self._addresses, self._admin = self._call(apply, timeout)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop: with ``drain`` (the default) stop accepting, let requests in flight finish (up to
        ``drain_timeout``), then close; without, close every connection now. Joins the thread and
        closes the sockets. Idempotent; waits at most ``timeout`` seconds (default: drain_timeout +
        5 s) before stopping outright."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        balancer = self._balancer
        reactor = balancer.reactor
        if threading.current_thread() is self._thread:  # from the loop itself (a callback): no join
            balancer.drain() if drain else balancer.stop()
            return
        reactor.call_soon_threadsafe(balancer.drain if drain else balancer.stop)
        if timeout is None:
            timeout = balancer.settings.drain_timeout + CLOSE_GRACE
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("balrs.serve: not drained within %gs; stopping now", timeout)
            reactor.call_soon_threadsafe(balancer.stop)
            self._thread.join(CLOSE_GRACE)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<balrs.Server %s%s>" % (self.url, "" if self.running else " (stopped)")


def serve(config: ConfigSource) -> Server:
    """Start a balancer on a background thread and return once it accepts connections.

    ``config``: a path to an lb.ini, its text (a str holding a newline, or starting with ``[``), or a
    parsed :class:`~balrs.config.Config`. ``listen`` may ask for port 0 (any free port): ``address``
    tells the one bound. Use it as a context manager, or call ``close()``."""
    source: Optional[str] = None
    if not isinstance(config, Config) and not (isinstance(config, str) and (
            "\n" in config or config.lstrip().startswith("["))):
        source = os.fspath(config)
    cfg = _load(config)
    _check(cfg)
    balancer = Balancer(cfg)  # ConfigError (certificates), OSError (the access log file)
    try:
        balancer.listen()  # OSError naming the address
        balancer.reactor.enable_threadsafe()
        balancer.start()  # health probes, the resolver, [admin] (OSError naming its address)
    except BaseException:
        balancer.stop()
        balancer.reactor.close()
        raise
    server = Server(balancer, source if source is not None else (cfg.path if os.path.isfile(cfg.path) else None))
    log.info("balrs serving on %s (strategy %s; backends %s)", ", ".join("%s:%d" % a for a in server.addresses),
             cfg.strategy, ", ".join("%s=%s" % (b.name, b.address) for b in cfg.backends))
    return server
