"""Python strategies: ``strategy = package.module:Name`` loads a class of the user's.

The interface is small and duck-typed (nothing to import from balrs, see docs/python-strategies.md):

- ``Name()`` is made once per pool that uses it (again when a reload changes the pool's strategy);
- ``update(backends)`` is told the eligible backends (a list of :class:`BackendView`, in configuration
  order) at start and whenever that set, or a weight, changes; never on the request path;
- ``pick(request, client_ip)`` gets a :class:`RequestView` and the client's address (a str) and returns
  one of the backends it was last told of, or None to let round robin choose.

This module loads the class (:func:`load_class`, :func:`check_strategies`) and holds the two views;
``strategies.PythonStrategy`` wraps the instance so that an exception, or an answer that is not an
eligible backend, costs that request a round-robin pick and one log line a second at most.

Where the module is found: ``sys.path`` first, then the directory of the configuration file, which is
appended to ``sys.path`` only while the module is imported (so a module next to lb.ini works under
``python -I`` and from a zipapp, without balrs changing ``sys.path`` for good). A module is imported once
per process: a reload that names another class loads it; a changed file needs a restart.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING, Iterable, List, Optional, Tuple

from .config import Config, ConfigError
from .http.heads import cookie_value

if TYPE_CHECKING:
    from .http.heads import RequestHead
    from .pool import Backend

__all__ = ["is_python_strategy", "load_class", "check_strategies", "RequestView", "BackendView", "describe_error"]

# The methods a strategy class must have.
REQUIRED_METHODS = ("update", "pick")


def is_python_strategy(name: str) -> bool:
    """``package.module:Name`` (config.py has checked the spelling) rather than a built-in name."""
    return ":" in name


def describe_error(exc: BaseException) -> str:
    """An exception as the last line of its traceback (``ZeroDivisionError: division by zero``), with
    where it was raised (``strategies.py:12 in pick``) when known."""
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if frames:
        f = frames[-1]
        return "%s (at %s:%s in %s)" % (last, os.path.basename(f.filename), f.lineno, f.name)
    return last


def load_class(spec: str, directory: Optional[str] = None) -> type:
    """The class ``spec`` (``package.module:Name``, ``Name`` may be dotted) names. The module is imported
    from sys.path, then from ``directory`` (appended to sys.path during the import only). Raises
    ValueError ``cannot load SPEC: why``."""
    module_name, _, attr = spec.partition(":")
    added = directory is not None and directory not in sys.path
    if added:
        sys.path.append(directory)  # type: ignore[arg-type]
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # whatever the module's top level raises is its load error
        raise ValueError("cannot load %s: %s" % (spec, _error_line(exc))) from None
    finally:
        if added:
            try:
                sys.path.remove(directory)  # type: ignore[arg-type]
            except ValueError:
                pass
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError("cannot load %s: module %r has no attribute %r" % (spec, module_name, attr)) from None
        except Exception as exc:  # a module __getattr__ of the user's
            raise ValueError("cannot load %s: %s" % (spec, _error_line(exc))) from None
    if not isinstance(obj, type):
        raise ValueError("cannot load %s: %s is not a class (it is %s)" % (spec, attr, _kind(obj)))
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise ValueError("cannot load %s: class %s has no %s method (a strategy has update(backends) and "
                         "pick(request, client_ip))" % (spec, attr, " or ".join(missing)))
    return obj


def _error_line(exc: BaseException) -> str:
    """One line for an import error: the exception's last traceback line (a SyntaxError names its file)."""
    if isinstance(exc, SyntaxError):
        return "%s: %s (%s, line %s)" % (type(exc).__name__, exc.msg, os.path.basename(exc.filename or "?"),
                                         exc.lineno)
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _kind(obj: object) -> str:
    if callable(obj):
        return "a function" if type(obj).__name__ == "function" else "a callable %s" % type(obj).__name__
    kind = type(obj).__name__
    return "%s %s" % ("an" if kind[:1] in "aeiou" else "a", kind)


def config_directory(config: Config) -> Optional[str]:
    """The directory of the configuration file (None for text without a file: sys.path only)."""
    return os.path.dirname(os.path.abspath(config.path)) if os.path.isfile(config.path) else None


def _strategies_of(config: Config) -> Iterable[Tuple[str, str, int]]:
    """(strategy, section, line) of every Python strategy ``config`` names: [balancer]'s (whether or
    not a pool inherits it), then each [pool NAME]'s own."""
    if is_python_strategy(config.strategy):
        yield config.strategy, "balancer", config.line_of("balancer", "strategy")
    for pool in config.pools:
        if pool.strategy is not None and is_python_strategy(pool.strategy):
            section = "pool %s" % pool.name
            yield pool.strategy, section, config.line_of(section, "strategy") or pool.line


def check_strategies(config: Config) -> None:
    """Load every Python strategy ``config`` names. Raises ConfigError ``FILE:LINE: [balancer] strategy:
    cannot load package.module:Name: why`` for the first one that cannot be loaded."""
    directory = config_directory(config)
    for spec, section, line in _strategies_of(config):
        try:
            load_class(spec, directory)
        except ValueError as exc:
            raise ConfigError(config.path, line, str(exc), section, "strategy") from None


# ---- what the user's class sees ---------------------------------------------------------------------------


class BackendView:
    """A backend as a Python strategy sees it: read-only, live (the counters are read when asked).

    ``name`` (str), ``address`` (``host:port`` as configured), ``weight`` (the effective weight: the
    configured one, lower during slow start), ``in_flight`` (requests in flight now), ``response_time``
    (moving average of the time to the response head in seconds; None until one was measured),
    ``requests`` (sent to it so far), ``max_connections`` (0 = no limit) and ``full`` (at that limit).
    The same backend keeps the same view while it stays eligible; compare by ``name`` across updates."""

    __slots__ = ("_backend",)

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def name(self) -> str:
        return self._backend.name

    @property
    def address(self) -> str:
        return self._backend.address

    @property
    def weight(self) -> float:
        return self._backend.eff_weight

    @property
    def in_flight(self) -> int:
        return self._backend.active

    @property
    def response_time(self) -> Optional[float]:
        ewma = self._backend.ewma
        return ewma if ewma >= 0 else None

    @property
    def requests(self) -> int:
        return self._backend.requests

    @property
    def max_connections(self) -> int:
        return self._backend.max_connections

    @property
    def full(self) -> bool:
        return self._backend.full

    def __repr__(self) -> str:
        return "<backend %s %s>" % (self._backend.name, self._backend.address)


class RequestView:
    """A request as a Python strategy sees it (str values, decoded as Latin-1, so every byte survives):
    ``method`` (``GET``), ``target`` (as received, with its query; origin-form), ``path`` (the target
    without its query), ``query`` (after ``?``, "" if none), ``host`` (the Host field or an absolute
    target's authority, None if neither), ``version`` (``HTTP/1.1``), ``header(name)`` (the combined value
    of a field, by case-insensitive name, or None), ``headers`` (every field as (name, value) in order)
    and ``cookie(name)`` (a cookie's value, or None). Valid during the ``pick`` call only."""

    __slots__ = ("_head",)

    def __init__(self, head: RequestHead) -> None:
        self._head = head

    @property
    def method(self) -> str:
        return self._head.method.decode("latin-1")

    @property
    def target(self) -> str:
        return self._head.target.decode("latin-1")

    @property
    def path(self) -> str:
        return self._head.target.partition(b"?")[0].decode("latin-1")

    @property
    def query(self) -> str:
        return self._head.target.partition(b"?")[2].decode("latin-1")

    @property
    def host(self) -> Optional[str]:
        host = self._head.host
        return host.decode("latin-1") if host is not None else None

    @property
    def version(self) -> str:
        return "HTTP/1.%d" % self._head.minor

    def header(self, name: str) -> Optional[str]:
        value = self._head.header(name.lower().encode("latin-1"))
        return value.decode("latin-1") if value is not None else None

    @property
    def headers(self) -> List[Tuple[str, str]]:
        head = self._head
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in zip(head.names, head.values)]

    def cookie(self, name: str) -> Optional[str]:
        value = cookie_value(self._head, name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else None

    def __repr__(self) -> str:
        return "<request %s %s>" % (self.method, self.target[:60])
