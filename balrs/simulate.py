"""``python -m balrs simulate lb.ini TRACE``: replay a trace through the real pools and strategies on a
virtual clock, against a model of the backends, and compare strategies.

What runs is balrs' own code: ``pool.Pools`` (``resolve=False``: no DNS), the strategies of
``strategies.py``, the route table of ``routing.py``, ``Backend.take_slot`` / ``release_slot`` /
``observe``, the pool's FIFO wait queue and its wake-up, the sticky cookie. What is modelled: the
arrivals (a json access log written by balrs, or a synthetic spec with Poisson arrivals), each
backend's service time (a latency distribution), its concurrency (``capacity``: requests beyond it
wait inside the backend, FIFO), slow-down and failure windows, and the active health check that
notices a failure. There are no sockets, threads or real time: events are taken in time order from
one heap of completions, so a million requests take seconds.

Each request carries one standard normal draw ``z`` (from the model's seed), turned into a service
time by the distribution of the backend it lands on: the same request is as slow, relatively, on
whichever backend serves it, so two strategies differ by their choices and not by luck (common random
numbers, the usual variance reduction for comparing policies in a simulation).

Left out (each noted where it would go): retries, passive outlier detection, slow start, request
bodies, per-client rate limits and connection limits, and the time balrs itself takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import random
import sys
import time
from bisect import bisect_right
from collections import deque
from heapq import heapify, heappop, heappush, heapreplace
from itertools import accumulate, repeat
from typing import (IO, Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple,
                    Type, Union)

from .config import STRATEGIES, Config, ConfigError, load
from .http.errors import ProtocolError
from .http.heads import RequestHead, cookie_value, parse_request_head
from .http.paths import needs_normalising, normalise_target
from .pool import ADMIN_MAINT, Backend, Pool, Pools, StrategyFactory, Ticket
from .pystrategy import check_strategies, config_directory, is_python_strategy, load_class
from .routing import ACT_POOL, RouteTable
from .strategies import STRATEGY_CLASSES, PythonStrategy, Strategy, field_value, make_strategy

__all__ = ["main", "Trace", "Model", "BackendModel", "Result", "BackendResult", "KeyMoves", "load_trace",
           "synthetic_trace", "parse_model", "load_model", "simulate", "render_table", "render_svg",
           "result_json", "SimulateError", "HASHING_STRATEGIES", "default_removed", "with_strategy"]

# ---- the model's defaults ----------------------------------------------------------------------------
# Without a model every backend answers in 10 ms median, lognormal with sigma 0.5 (p99 about 32 ms: the
# shape of a typical small web backend), and serves this many requests at once when it has no
# max_connections (a threaded server's pool of workers; gunicorn's gthread and Tomcat defaults are in
# this range).
DEFAULT_LATENCY = "lognormal:10,0.5"
DEFAULT_CAPACITY = 64
DEFAULT_MODEL_SEED = 1
# A backend inside a failure window answers 503 this fast (it is up, but its application refuses the
# request: the answer costs almost nothing).
FAIL_ANSWER_SECONDS = 0.001
# In-flight and request counts are sampled this many times over the run, for the plot (and scripts).
SAMPLES = 400
# Key movement is computed over at most this many distinct keys (each costs two picks).
MAX_KEYS = 200_000
# A synthetic spec or a backend model is a small file: read at most this much of it.
MAX_SPEC_BYTES = 1 << 20
# Strategies whose choice is a function of the request (their keys can move when a backend goes).
HASHING_STRATEGIES = ("consistent_hash", "ip_hash")

_SQRT2 = math.sqrt(2.0)


class SimulateError(ValueError):
    """A problem with the command line, the trace or the model: one line, naming the file (and line)."""


# ---- traces ------------------------------------------------------------------------------------------
class Trace:
    """Requests in arrival order as parallel lists (no object per request): ``times`` (seconds from the
    first arrival), ``head_index`` into ``heads`` (each distinct head parsed once), ``client_index``
    into ``clients`` (addresses as str)."""

    __slots__ = ("source", "kind", "times", "head_index", "client_index", "heads", "raw_heads", "clients",
                 "skipped", "seed")

    def __init__(self, source: str, kind: str) -> None:
        self.source = source
        self.kind = kind                 # "access log" or "synthetic"
        self.times: List[float] = []
        self.head_index: List[int] = []
        self.client_index: List[int] = []
        self.heads: List[RequestHead] = []
        self.raw_heads: List[bytes] = []
        self.clients: List[str] = []
        self.skipped = 0                 # access log lines without a request (balrs could not parse one)
        self.seed: Optional[int] = None  # a synthetic trace's seed

    def __len__(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        return self.times[-1] if self.times else 0.0

    def describe(self) -> str:
        n = len(self.times)
        rate = n / self.duration if self.duration > 0 else 0.0
        extra = ", %d lines without a request skipped" % self.skipped if self.skipped else ""
        seed = ", seed %d" % self.seed if self.seed is not None else ""
        return ("%s (%s%s): %d requests over %.1f s (%.0f req/s), %d clients, %d distinct request heads%s"
                % (self.source, self.kind, seed, n, self.duration, rate, len(self.clients), len(self.heads), extra))


def _head_bytes(method: str, target: str, host: Optional[str], minor: int,
                headers: Sequence[Tuple[str, str]]) -> bytes:
    lines = ["%s %s HTTP/1.%d\r\n" % (method, target, minor)]
    if host is not None:
        lines.append("Host: %s\r\n" % host)
    for name, value in headers:
        lines.append("%s: %s\r\n" % (name, value))
    lines.append("\r\n")
    text = "".join(lines)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


class _TraceBuilder:
    """Interns heads and clients while a trace is read."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.head_ids: Dict[bytes, int] = {}
        self.client_ids: Dict[str, int] = {}

    def head(self, raw: bytes) -> int:
        i = self.head_ids.get(raw)
        if i is None:
            head = parse_request_head(raw)  # ProtocolError: the caller names the line
            i = self.head_ids[raw] = len(self.trace.heads)
            self.trace.heads.append(head)
            self.trace.raw_heads.append(raw)
        return i

    def client(self, address: str) -> int:
        i = self.client_ids.get(address)
        if i is None:
            i = self.client_ids[address] = len(self.trace.clients)
            self.trace.clients.append(address)
        return i


def _iso_seconds(text: str) -> float:
    # 3.8's fromisoformat reads what balrs writes (2026-12-03T13:05:01.250+00:00).
    return datetime.datetime.fromisoformat(text).timestamp()


def _access_log_request(d: Mapping[str, Any]) -> Optional[Tuple[float, str, bytes]]:
    """(arrival, client, raw head) of one json access log line, or None for a line without a request.
    Raises ValueError naming the problem."""
    if d.get("protocol", "HTTP/1.1") is None:
        return None  # balrs could not parse a request (it answered 400): nothing to replay
    ts = d.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        arrival = float(ts)
    elif isinstance(d.get("time"), str):
        try:
            arrival = _iso_seconds(d["time"])
        except ValueError:
            raise ValueError("time %r is not an ISO 8601 time" % d["time"]) from None
    else:
        raise ValueError('no "ts" or "time"')
    fields = {}
    for key in ("client", "method", "path"):
        value = d.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError('no "%s"' % key if value is None else '"%s" is not a non-empty string' % key)
        fields[key] = value
    host = d.get("host")
    if host is not None and not isinstance(host, str):
        raise ValueError('"host" is not a string')
    protocol = d.get("protocol", "HTTP/1.1")
    minor = 0 if protocol == "HTTP/1.0" else 1
    if host is None and minor == 1:
        minor = 0  # HTTP/1.1 requires a Host field (RFC 9112 §3.2): an HTTP/1.0 request had none
    headers: List[Tuple[str, str]] = []
    for key, name in (("user_agent", "User-Agent"), ("referer", "Referer")):
        value = d.get(key)
        if isinstance(value, str) and value:
            headers.append((name, value))
    extra = d.get("headers")
    if extra is not None:
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise ValueError('"headers" is not an object of strings')
        headers.extend((str(k), v) for k, v in extra.items())
    return arrival, fields["client"], _head_bytes(fields["method"], fields["path"], host, minor, headers)


def _read_access_log(path: str, f: IO[bytes]) -> Trace:
    trace = Trace(path, "access log")
    build = _TraceBuilder(trace)
    times = trace.times
    heads = trace.head_index
    clients = trace.client_index
    loads = json.loads
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            d = loads(line)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            got = _access_log_request(d)
            if got is None:
                trace.skipped += 1
                continue
            arrival, client, raw = got
            h = build.head(raw)
        except ProtocolError as exc:
            raise SimulateError("%s:%d: not a request balrs accepts: %s" % (path, lineno, exc)) from None
        except ValueError as exc:  # json.JSONDecodeError is one
            raise SimulateError("%s:%d: not a balrs json access log line: %s" % (path, lineno, exc)) from None
        times.append(arrival)
        heads.append(h)
        clients.append(build.client(client))
    if not times:
        raise SimulateError("%s: no requests in the access log" % path)
    # Lines are written as requests finish: put them back in arrival order, from 0.
    if any(b < a for a, b in zip(times, times[1:])):
        order = sorted(range(len(times)), key=times.__getitem__)
        trace.times = times = [times[i] for i in order]
        trace.head_index = [heads[i] for i in order]
        trace.client_index = [clients[i] for i in order]
    t0 = times[0]
    trace.times = [t - t0 for t in times]
    return trace


SPEC_KEYS = ("rate", "duration", "count", "clients", "client_distribution", "paths", "path_distribution",
             "hosts", "method", "headers", "seed")


def _spec_number(spec: Mapping[str, Any], key: str, default: Optional[float], what: str,
                 integer: bool = False) -> float:
    value = spec.get(key, default)
    if value is None:
        raise ValueError("%s: missing (%s)" % (key, what))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or not math.isfinite(value):
        raise ValueError("%s: expected %s, got %r" % (key, what, value))
    if integer and value != int(value):
        raise ValueError("%s: expected %s, got %r" % (key, what, value))
    return float(value)


def _distribution(text: Any, key: str) -> float:
    """``uniform`` -> 0.0, ``zipf:S`` -> S (> 0)."""
    if text == "uniform":
        return 0.0
    if isinstance(text, str) and text.startswith("zipf:"):
        try:
            s = float(text[5:])
        except ValueError:
            s = -1.0
        if s > 0 and math.isfinite(s):
            return s
    raise ValueError("%s: expected uniform or zipf:S (S > 0, e.g. zipf:1.1), got %r" % (key, text))


def _draw(rng: random.Random, n: int, count: int, zipf: float) -> List[int]:
    """``n`` indexes in range(count): uniform, or Zipf-distributed (rank k with weight 1/k^s)."""
    if count == 1:
        return [0] * n
    if not zipf:
        r = rng.random
        return [int(r() * count) for _ in repeat(None, n)]
    cum = list(accumulate(1.0 / (k ** zipf) for k in range(1, count + 1)))
    return rng.choices(range(count), cum_weights=cum, k=n)


def synthetic_trace(spec: Mapping[str, Any], source: str = "<spec>") -> Trace:
    """The trace a synthetic spec describes (see docs/explain-and-simulate.md): Poisson arrivals at
    ``rate`` for ``duration`` seconds (or ``count`` requests), clients and paths drawn uniformly or by
    Zipf's law, all from ``seed``. Raises ValueError naming the key."""
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError("unknown key %r (a spec has %s)" % (unknown[0], ", ".join(SPEC_KEYS)))
    rate = _spec_number(spec, "rate", None, "requests per second, a positive number")
    if ("count" in spec) == ("duration" in spec):
        raise ValueError("give exactly one of duration (seconds) and count (requests)")
    n_clients = int(_spec_number(spec, "clients", 100, "a positive integer", integer=True))
    client_zipf = _distribution(spec.get("client_distribution", "uniform"), "client_distribution")
    paths_spec = spec.get("paths", 1)
    if isinstance(paths_spec, list) and paths_spec and all(isinstance(p, str) and p.startswith("/")
                                                            for p in paths_spec):
        paths: List[str] = list(paths_spec)
    elif isinstance(paths_spec, int) and not isinstance(paths_spec, bool) and 0 < paths_spec <= 10_000_000:
        paths = ["/"] if paths_spec == 1 else ["/item/%d" % k for k in range(paths_spec)]
    else:
        raise ValueError("paths: expected a count (1 = just /) or a list of paths starting with /, got %r"
                         % (paths_spec,))
    path_zipf = _distribution(spec.get("path_distribution", "uniform"), "path_distribution")
    hosts_spec = spec.get("hosts", "example.test")
    hosts = [hosts_spec] if isinstance(hosts_spec, str) else hosts_spec
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError("hosts: expected a host name or a list of them, got %r" % (hosts_spec,))
    method = spec.get("method", "GET")
    if not isinstance(method, str) or not method:
        raise ValueError("method: expected a method such as GET, got %r" % (method,))
    headers_spec = spec.get("headers", {})
    if not isinstance(headers_spec, dict) or not all(isinstance(v, str) for v in headers_spec.values()):
        raise ValueError("headers: expected an object of field names and string values")
    seed = spec.get("seed", 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError("seed: expected an integer, got %r" % (seed,))
    if n_clients > 1 << 24:
        raise ValueError("clients: at most %d" % (1 << 24))

    rng = random.Random(seed)
    expo = rng.expovariate
    if "count" in spec:
        n = int(_spec_number(spec, "count", None, "a positive integer", integer=True))
        times = list(accumulate([expo(rate) for _ in repeat(None, n)]))
    else:
        duration = _spec_number(spec, "duration", None, "seconds, a positive number")
        # Poisson: about rate x duration arrivals; draw a few standard deviations more, cut at the end.
        mean = rate * duration
        times = list(accumulate([expo(rate) for _ in repeat(None, int(mean + 6 * math.sqrt(mean) + 10))]))
        while times[-1] < duration:
            more = list(accumulate([expo(rate) for _ in repeat(None, 1000)], initial=times[-1]))
            times.extend(more[1:])
        del times[bisect_right(times, duration):]
        n = len(times)
        if not n:
            raise ValueError("duration: no request arrives in %g s at %g req/s" % (duration, rate))
    trace = Trace(source, "synthetic")
    trace.seed = seed
    t0 = times[0]
    trace.times = [t - t0 for t in times]
    trace.clients = ["10.%d.%d.%d" % ((k + 1) >> 16 & 255, (k + 1) >> 8 & 255, (k + 1) & 255)
                     for k in range(n_clients)]
    trace.client_index = _draw(rng, n, n_clients, client_zipf)
    build = _TraceBuilder(trace)
    headers = [(str(k), v) for k, v in headers_spec.items()]
    try:
        ids = [build.head(_head_bytes(method, p, h, 1, headers)) for p in paths for h in hosts]
    except ProtocolError as exc:
        raise ValueError("not a request balrs accepts (%s): check method, paths, hosts and headers" % exc) from None
    path_index = _draw(rng, n, len(paths), path_zipf)
    if len(hosts) == 1:
        trace.head_index = [ids[p] for p in path_index]
    else:
        nh = len(hosts)
        r = rng.random
        trace.head_index = [ids[p * nh + int(r() * nh)] for p in path_index]
    return trace


def _read_file(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SimulateError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    if len(data) > limit:
        raise SimulateError("%s: larger than %d bytes" % (path, limit))
    return data


def load_trace(path: str) -> Trace:
    """A json access log (one JSON object per line with method and path) or a synthetic spec (one JSON
    object with rate). Raises SimulateError naming the file (and line)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SimulateError("%s: cannot read: %s" % (path, exc.strerror or exc)) from None
    with f:
        first = b""
        for line in f:
            if line.strip():
                first = line
                break
        if not first:
            raise SimulateError("%s: empty trace" % path)
        try:
            d = json.loads(first)
        except ValueError:
            d = None
        if isinstance(d, dict) and "path" in d and "rate" not in d:
            f.seek(0)
            return _read_access_log(path, f)
        f.seek(0)
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SimulateError("%s: not a balrs json access log (line 1 is no JSON object with a path), and too "
                            "large for a synthetic spec" % path)
    try:
        spec = json.loads(data)
    except ValueError as exc:
        lineno = getattr(exc, "lineno", 1)
        raise SimulateError("%s:%d: neither a balrs json access log nor a synthetic spec: %s"
                            % (path, lineno, getattr(exc, "msg", exc))) from None
    if not isinstance(spec, dict) or "rate" not in spec:
        raise SimulateError("%s: neither a balrs json access log (a JSON object per line, with method and path) "
                            "nor a synthetic spec (a JSON object with rate)" % path)
    try:
        return synthetic_trace(spec, path)
    except ValueError as exc:
        raise SimulateError("%s: synthetic spec: %s" % (path, exc)) from None


# ---- the backend model ---------------------------------------------------------------------------------
def _latency(text: Any) -> Tuple[Callable[[float], float], str]:
    """A latency distribution (milliseconds in the text) -> (z -> seconds, the text). ``z`` is the
    request's standard normal draw; each distribution is its inverse CDF at Phi(z)."""
    if not isinstance(text, str):
        raise ValueError("latency: expected a string such as lognormal:10,0.5, got %r" % (text,))
    kind, _, args = text.partition(":")
    try:
        values = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        values = [-1.0]
    ok = all(math.isfinite(v) and v >= 0 for v in values)
    exp = math.exp
    erfc = math.erfc
    log = math.log
    if kind == "const" and ok and len(values) == 1:
        seconds = values[0] / 1000.0
        return (lambda z: seconds), text
    if kind == "lognormal" and ok and len(values) == 2 and values[0] > 0:
        median = values[0] / 1000.0
        sigma = values[1]
        return (lambda z: median * exp(sigma * z)), text
    if kind == "exp" and ok and len(values) == 1 and values[0] > 0:
        mean = values[0] / 1000.0
        # 1 - Phi(z) = erfc(z / sqrt 2) / 2; its -log is an exponential draw of mean 1.
        return (lambda z: -mean * log(0.5 * erfc(z / _SQRT2))), text
    if kind == "uniform" and ok and len(values) == 2 and values[0] <= values[1]:
        lo = values[0] / 1000.0
        span = values[1] / 1000.0 - lo
        return (lambda z: lo + span * 0.5 * erfc(-z / _SQRT2)), text
    raise ValueError("latency: expected const:MS, lognormal:MEDIAN_MS,SIGMA, exp:MEAN_MS or uniform:LO_MS,HI_MS, "
                     "got %r" % text)


def _windows(value: Any, key: str, size: int) -> List[Tuple[float, ...]]:
    """One window ``[start_s, end_s(, factor)]`` or a list of them."""
    if isinstance(value, list) and value and not isinstance(value[0], list):
        value = [value]
    out: List[Tuple[float, ...]] = []
    if isinstance(value, list):
        for w in value:
            if (isinstance(w, list) and len(w) == size
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in w)
                    and 0 <= w[0] < w[1] and (size == 2 or w[2] > 0)):
                out.append(tuple(float(x) for x in w))
            else:
                break
        else:
            return sorted(out)
    form = "[start_s, end_s, factor]" if size == 3 else "[start_s, end_s]"
    raise ValueError("%s: expected %s with start < end (or a list of them), got %r" % (key, form, value))


@dataclasses.dataclass
class BackendModel:
    """How one backend behaves: its service time (``service(z)`` seconds), how many requests it serves at
    once (``capacity``; more wait inside it, FIFO), windows where it is ``factor`` times slower
    (``slow``: (start, end, factor)) and windows where it answers 503 (``fail``: (start, end))."""

    latency: str = DEFAULT_LATENCY
    capacity: int = 0  # 0: the backend's max_connections, or DEFAULT_CAPACITY
    slow: List[Tuple[float, ...]] = dataclasses.field(default_factory=list)
    fail: List[Tuple[float, ...]] = dataclasses.field(default_factory=list)
    service: Callable[[float], float] = dataclasses.field(default_factory=lambda: _latency(DEFAULT_LATENCY)[0],
                                                          repr=False)

    def describe(self, capacity: int) -> str:
        parts = ["latency %s ms" % self.latency.replace(":", " ", 1), "capacity %d" % capacity]
        parts.extend("%gx slower %g-%g s" % (w[2], w[0], w[1]) for w in self.slow)
        parts.extend("503s %g-%g s" % (w[0], w[1]) for w in self.fail)
        return ", ".join(parts)


MODEL_KEYS = ("latency", "capacity", "slow", "fail")


@dataclasses.dataclass
class Model:
    """The backends' model: ``default`` for every backend not in ``backends`` (by name), and the seed of
    the requests' draws."""

    seed: int = DEFAULT_MODEL_SEED
    default: BackendModel = dataclasses.field(default_factory=BackendModel)
    backends: Dict[str, BackendModel] = dataclasses.field(default_factory=dict)
    source: str = ""

    def of(self, name: str) -> BackendModel:
        return self.backends.get(name, self.default)


def _backend_model(d: Any, what: str, base: Optional[BackendModel] = None) -> BackendModel:
    if not isinstance(d, dict):
        raise ValueError("%s: expected an object with %s" % (what, ", ".join(MODEL_KEYS)))
    unknown = [k for k in d if k not in MODEL_KEYS]
    if unknown:
        raise ValueError("%s: unknown key %r (a backend has %s)" % (what, unknown[0], ", ".join(MODEL_KEYS)))
    m = dataclasses.replace(base) if base is not None else BackendModel()
    m.slow = list(m.slow)
    m.fail = list(m.fail)
    try:
        if "latency" in d:
            m.service, m.latency = _latency(d["latency"])
        if "capacity" in d:
            c = d["capacity"]
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ValueError("capacity: expected a positive integer (requests served at once), got %r" % (c,))
            m.capacity = c
        if "slow" in d:
            m.slow = _windows(d["slow"], "slow", 3)
        if "fail" in d:
            m.fail = _windows(d["fail"], "fail", 2)
    except ValueError as exc:
        raise ValueError("%s: %s" % (what, exc)) from None
    return m


def parse_model(d: Any, source: str = "<model>") -> Model:
    """A backend model from its JSON: ``{"seed": 1, "default": {...}, "backends": {"app1": {...}}}``; a
    top-level key other than seed, default and backends is a backend name too. Raises ValueError."""
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    model = Model(source=source)
    seed = d.get("seed", DEFAULT_MODEL_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError("seed: expected an integer, got %r" % (seed,))
    model.seed = seed
    if "default" in d:
        model.default = _backend_model(d["default"], "default")
    named = dict(d.get("backends", {}))
    if not isinstance(d.get("backends", {}), dict):
        raise ValueError("backends: expected an object of backend names")
    for key, value in d.items():
        if key not in ("seed", "default", "backends"):
            named[key] = value
    for name, value in named.items():
        model.backends[name] = _backend_model(value, "backend %s" % name, model.default)
    return model


def load_model(path: str) -> Model:
    data = _read_file(path, MAX_SPEC_BYTES)
    try:
        d = json.loads(data)
    except ValueError as exc:
        raise SimulateError("%s:%d: not JSON: %s"
                            % (path, getattr(exc, "lineno", 1), getattr(exc, "msg", exc))) from None
    try:
        return parse_model(d, path)
    except ValueError as exc:
        raise SimulateError("%s: %s" % (path, exc)) from None


# ---- results -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BackendResult:
    name: str
    pool: str
    requests: int = 0
    share: float = 0.0            # of the requests sent to a backend
    in_flight_mean: float = 0.0   # time-averaged, as balrs counts them (Backend.active)
    in_flight_peak: int = 0
    waited: int = 0               # requests that waited inside the backend (beyond its capacity)
    wait_ms_mean: float = 0.0     # mean wait inside the backend, over all its requests
    errors: int = 0               # 503 answers (failure windows)
    model: str = ""


@dataclasses.dataclass
class KeyMoves:
    """What removing ``removed`` from pool ``pool`` does to the keys seen (hash keys, or sticky clients)."""

    removed: str
    pool: str
    kind: str                     # "hash" (the strategy's key) or "sticky" (clients holding a cookie)
    keys: int = 0
    moved: int = 0
    on_removed: int = 0           # keys that were on the removed backend (they must move)
    moved_elsewhere: int = 0      # keys that moved although their backend stayed

    @property
    def share(self) -> float:
        return self.moved / self.keys if self.keys else 0.0


@dataclasses.dataclass
class Result:
    strategy: str
    requests: int = 0             # in the trace
    to_backends: int = 0          # sent to a backend
    backends: List[BackendResult] = dataclasses.field(default_factory=list)
    queued: int = 0               # waited in a pool's queue (every eligible backend at max_connections)
    queue_ms_mean: float = 0.0    # over the requests that waited
    queue_ms_max: float = 0.0
    queue_timeouts: int = 0       # 503 after queue_timeout
    no_backend: int = 0           # 503: no backend eligible (and no backup)
    answered_by_route: int = 0    # a route's redirect or return
    no_route: int = 0             # 404: no route matched and no default pool
    latency_ms: Dict[str, float] = dataclasses.field(default_factory=dict)
    keys: Optional[KeyMoves] = None
    end_time: float = 0.0         # virtual seconds to the last answer
    wall_seconds: float = 0.0
    # Sampled every sample_interval virtual seconds: per backend, in flight and requests so far.
    sample_interval: float = 0.0
    in_flight_series: Dict[str, List[int]] = dataclasses.field(default_factory=dict, repr=False)
    requests_series: Dict[str, List[int]] = dataclasses.field(default_factory=dict, repr=False)


# ---- the simulation ----------------------------------------------------------------------------------
class _Clock:
    """The virtual clock the pools and strategies read."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Server:
    """A backend as modelled: ``free`` holds when each of its ``capacity`` workers is next free (a heap:
    FIFO service on c servers gives a request the earliest one), and the counters of the run."""

    __slots__ = ("backend", "model", "service", "free", "windows", "first_window", "busy", "wait", "waited",
                 "errors", "peak")

    def __init__(self, backend: Backend, model: BackendModel) -> None:
        self.backend = backend
        self.model = model
        self.service = model.service
        capacity = model.capacity or backend.max_connections or DEFAULT_CAPACITY
        self.free = [0.0] * capacity
        # (start, end, factor): factor 0 = a failure window (503), which wins over a slow one.
        self.windows = sorted([(w[0], w[1], 0.0) for w in model.fail] + [(w[0], w[1], w[2]) for w in model.slow],
                              key=lambda w: (w[0], w[2]))
        self.first_window = self.windows[0][0] if self.windows else math.inf
        self.busy = 0.0     # sum of (answer - dispatch): its time-integral of in-flight requests
        self.wait = 0.0
        self.waited = 0
        self.errors = 0
        self.peak = 0

    def adjust(self, now: float, seconds: float) -> Tuple[float, int]:
        """The service time and status of a request dispatched at ``now`` (inside a window or not)."""
        status = 200
        for start, end, factor in self.windows:
            if start <= now < end:
                if not factor:
                    return FAIL_ANSWER_SECONDS, 503
                seconds *= factor
                break
        return seconds, status


class _Queued:
    """A request waiting in a pool's queue: the pool's ``Waiter``."""

    __slots__ = ("sim", "pool", "index", "arrival", "req", "client", "ticket")

    def __init__(self, sim: _Run, pool: Pool, index: int, arrival: float, req: RequestHead, client: int) -> None:
        self.sim = sim
        self.pool = pool
        self.index = index
        self.arrival = arrival
        self.req = req
        self.client = client
        self.ticket: Optional[Ticket] = None

    def dequeue(self) -> bool:
        return self.sim.dequeue(self)


# A heap entry: (time, sequence, backend or None for a model event, seconds to answer, status).
_Event = Tuple[float, int, Optional[Backend], float, int]


def _python_label(cls: type) -> str:
    return "%s:%s" % (cls.__module__, cls.__qualname__)


def _factory(custom: Mapping[str, type], seed: int) -> StrategyFactory:
    """strategies.make_strategy, except that the random strategies get a seeded generator (runs repeat)
    and a class passed to :func:`simulate` is wrapped like a Python strategy from the file."""

    def make(name: str, backends: Sequence[Backend], hash_key: str, clock: Callable[[], float]) -> Strategy:
        cls = custom.get(name)
        if cls is not None:
            return PythonStrategy(cls, name, backends, hash_key=hash_key, clock=clock)
        builtin = STRATEGY_CLASSES.get(name)
        if builtin is not None:
            return builtin(backends, hash_key=hash_key, clock=clock, rng=random.Random(seed))
        return make_strategy(name, backends, hash_key, clock)

    return make


def with_strategy(config: Config, strategy: str) -> Config:
    """``config`` with every pool running ``strategy`` (a canonical name or package.module:Name)."""
    pools = tuple(dataclasses.replace(p, strategy=strategy) for p in config.pools)
    return dataclasses.replace(config, strategy=strategy, pools=pools)


def _hash_key_of(hash_key: str) -> Callable[[RequestHead, str], Optional[bytes]]:
    """The key consistent_hash hashes for ``hash_key`` (strategies.ConsistentHash: client_ip, path
    without the query, header:NAME, cookie:NAME; None = no key, the request goes round robin)."""
    kind, _, arg = hash_key.partition(":")
    kind = kind.strip().lower()
    if kind == "path":
        return lambda req, ip: req.target.partition(b"?")[0]
    if kind == "header":
        lname = arg.strip().lower().encode("latin-1")
        return lambda req, ip: field_value(req, lname) or None
    if kind == "cookie":
        name = arg.strip().encode("latin-1")
        return lambda req, ip: cookie_value(req, name) or None
    return lambda req, ip: ip.encode()


class _Run:
    """One strategy's run over a trace."""

    def __init__(self, config: Config, trace: Trace, model: Model, zs: Sequence[float], label: str,
                 custom: Mapping[str, type], remove: Optional[str]) -> None:
        self.trace = trace
        self.zs = zs
        self.clock = clock = _Clock()
        self.pools = pools = Pools(config, clock=clock, make_strategy=_factory(custom, model.seed), resolve=False)
        self.router = RouteTable(config.routes, pools=pools.named) if config.routes else None
        self.servers: Dict[Backend, _Server] = {b: _Server(b, model.of(b.name)) for b in pools.backends}
        self.heap: List[_Event] = []
        self.latencies: List[float] = []
        self.result = Result(label, requests=len(trace))
        self.queue_wait = 0.0
        self.waiting = 0                  # requests in some pool's queue now
        self.deadlines: Dict[Pool, Deque[Tuple[float, _Queued]]] = {}
        # Sticky cookies each client holds: client index -> {cookie name: id}, and the Cookie field.
        self.jar: Dict[int, Dict[bytes, bytes]] = {}
        self.cookie_field: Dict[int, bytes] = {}
        self.variants: Dict[Tuple[int, bytes], RequestHead] = {}
        self.sticky = any(p.sticky is not None for p in pools.order)
        # Key movement: the pool of the removed backend, if its choice depends on the request.
        self.removed: Optional[Backend] = None
        self.keyed_pool: Optional[Pool] = None
        self.key_pairs: Set[Tuple[int, int]] = set()
        if remove is not None:
            removed = pools.by_backend(remove)
            assert removed is not None, remove
            self.removed = removed
            pool = removed.owner
            if pool is not None and (pool.sticky is not None or pool.strategy_name in HASHING_STRATEGIES):
                self.keyed_pool = pool
        # Model events (health checks noticing a failure window, and its end), in the same heap.
        self.events: List[Tuple[Backend, bool]] = []
        n = len(trace)
        for b, server in self.servers.items():
            pool = b.owner
            health = pools.health_of(b) if pool is not None else None
            if health is None:
                continue  # no active checks: a failing backend stays in rotation
            for start, end in server.model.fail:
                # A probe is due every interval and `fall` failures in a row mark it down (HAProxy's
                # inter/fall); once the window ends, `rise` passes bring it back. Jitter is left out.
                down = start + health.interval * health.fall
                if down < end:
                    self.heap.append((down, n + len(self.events), None, 0.0, 0))
                    self.events.append((b, False))
                    self.heap.append((end + health.interval * health.rise, n + len(self.events), None, 0.0, 0))
                    self.events.append((b, True))
        heapify(self.heap)
        duration = max(trace.duration, 1e-3)
        self.sample_interval = duration / SAMPLES
        self.result.sample_interval = self.sample_interval
        self.series_active: List[List[int]] = [[] for _ in pools.backends]
        self.series_requests: List[List[int]] = [[] for _ in pools.backends]

    # ---- events ----------------------------------------------------------------------------------
    def advance(self, until: float) -> None:
        """Take every event at or before ``until``, in time order: answers release their backend slot
        (``observe`` first, as a response head comes before the end of the exchange) and wake the
        pool's queue; model events change a backend's health."""
        heap = self.heap
        n = len(self.trace)
        while heap and heap[0][0] <= until:
            end, seq, b, seconds, status = heappop(heap)
            if b is None:
                self._model_event(seq - n, end)
                continue
            b.observe(seconds, end, status)
            if b.release_slot():
                pool = b.owner
                if pool is not None and pool.queued:
                    self.clock.now = end
                    self.expire(end)
                    pool.wake()

    def _model_event(self, k: int, now: float) -> None:
        b, up = self.events[k]
        self.clock.now = now
        if up:
            if not b.up:
                b.mark_up(now)
        elif b.up:
            b.mark_down()
        pool = b.owner
        if pool is not None:
            pool.refresh()
            if up and pool.queued:
                self.expire(now)
                pool.wake()

    def sample(self) -> None:
        for k, b in enumerate(self.pools.backends):
            self.series_active[k].append(b.active)
            self.series_requests[k].append(b.requests)

    # ---- requests --------------------------------------------------------------------------------
    def dispatch(self, b: Backend, now: float, arrival: float, i: int) -> None:
        """Request ``i`` goes to ``b`` at ``now``: the model says when its answer comes."""
        server = self.servers[b]
        b.take_slot()
        a = b.active
        if a > server.peak:
            server.peak = a
        seconds = server.service(self.zs[i])
        status = 200
        if now >= server.first_window:
            seconds, status = server.adjust(now, seconds)
            if status != 200:
                server.errors += 1
        free = server.free
        start = free[0]
        if start > now:
            server.wait += start - now
            server.waited += 1
        else:
            start = now
        end = start + seconds
        heapreplace(free, end)
        server.busy += end - now
        self.latencies.append(end - arrival)
        heappush(self.heap, (end, i, b, end - now, status))

    def _choose(self, pool: Pool, req: RequestHead, client: int) -> Optional[Backend]:
        """The pool's choice when it has a slot limit or a sticky cookie (proxy/client.py ``_choose``); a
        new sticky cookie goes into the client's jar."""
        sticky = pool.sticky
        ip = self.trace.clients[client]
        if sticky is None:
            return pool.choose(req, ip)
        backend, reset = pool.choose_sticky(req, ip)
        if backend is not None and reset:
            jar = self.jar.setdefault(client, {})
            jar[sticky.name] = sticky.id_of(backend.name)
            self.cookie_field[client] = b"; ".join(b"%s=%s" % kv for kv in sorted(jar.items()))
        return backend

    def _with_cookies(self, h: int, client: int) -> RequestHead:
        """Head ``h`` as this client sends it: with the sticky cookies it was given."""
        cookies = self.cookie_field.get(client)
        if cookies is None:
            return self.trace.heads[h]
        head = self.variants.get((h, cookies))
        if head is None:
            raw = self.trace.raw_heads[h]
            head = self.variants[(h, cookies)] = parse_request_head(raw[:-2] + b"Cookie: " + cookies + b"\r\n\r\n")
        return head

    def _route(self, req: RequestHead, ip: str) -> Optional[Pool]:
        """The pool for a request (proxy/client.py ``_start_request`` and ``_route``), or None when no
        backend is involved (a route's own answer, or no route and no default pool: counted)."""
        router = self.router
        if router is None:
            pool = self.pools.default
            if pool is None:
                self.result.no_route += 1
            return pool
        target = req.target
        match_path = b""
        if target[:1] == b"/":
            decided = router.decided.get(req.host)
            if decided is not None:
                route, pool = decided
                route.requests += 1
                return pool
            if needs_normalising(target) is not None:
                try:
                    _path, match_path, _query = normalise_target(target)
                except ProtocolError:
                    self.result.no_route += 1  # balrs answers 400; nothing reaches a pool
                    return None
        path = target.partition(b"?")[0]
        found = router.match(req, req.host, match_path or path, ip, b"http")
        if found is None:
            pool = self.pools.default
            if pool is None:
                self.result.no_route += 1
            return pool
        found.requests += 1
        if found.kind != ACT_POOL:
            self.result.answered_by_route += 1
            return None
        return self.pools.named[found.pool()]

    def request(self, i: int, t: float) -> None:
        """Request ``i`` arrives at ``t`` (the general path: routes, sticky cookies, slot limits,
        queueing, backup pools)."""
        trace = self.trace
        client = trace.client_index[i]
        h = trace.head_index[i]
        req = self._with_cookies(h, client) if self.sticky else trace.heads[h]
        ip = trace.clients[client]
        pool = self._route(req, ip)
        if pool is None:
            return
        pool.requests += 1
        if pool is self.keyed_pool:
            self.key_pairs.add((h, client))
        backend = pool.strategy.choose(req, ip) if pool.direct else self._choose(pool, req, client)
        if backend is None:
            if pool.all_full():
                self._enqueue(pool, i, t, req, client)
                return
            backup = pool.backup
            while backup is not None and backend is None:
                # No backend of the pool is eligible: its backup pool serves meanwhile.
                backend = backup.choose(req, ip)
                if backend is None and backup.all_full():
                    self._enqueue(backup, i, t, req, client)
                    return
                backup = backup.backup if backup is not pool else None
            if backend is None:
                self.result.no_backend += 1
                return
        self.dispatch(backend, t, t, i)

    def _enqueue(self, pool: Pool, i: int, t: float, req: RequestHead, client: int) -> None:
        waiter = _Queued(self, pool, i, t, req, client)
        waiter.ticket = pool.enqueue(waiter)
        self.deadlines.setdefault(pool, deque()).append((t + pool.queue_timeout, waiter))
        self.waiting += 1
        self.result.queued += 1

    def dequeue(self, waiter: _Queued) -> bool:
        """The pool's queue asks a waiting request to try again (a slot freed, or a backend came back)."""
        backend = self._choose(waiter.pool, waiter.req, waiter.client)
        if backend is None:
            return False
        now = self.clock.now
        waited = now - waiter.arrival
        self.queue_wait += waited
        if waited > self.result.queue_ms_max:
            self.result.queue_ms_max = waited
        waiter.ticket = None
        self.waiting -= 1
        self.dispatch(backend, now, waiter.arrival, waiter.index)
        return True

    def expire(self, now: float) -> None:
        """Requests whose queue_timeout has passed by ``now`` leave their queue with a 503."""
        for pool, line in self.deadlines.items():
            while line and line[0][0] <= now:
                deadline, waiter = line.popleft()
                ticket = waiter.ticket
                if ticket is None:
                    continue  # it got a backend
                pool.leave_queue(ticket)
                waiter.ticket = None
                self.waiting -= 1
                self.result.queue_timeouts += 1
                self.latencies.append(deadline - waiter.arrival)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> Result:
        trace = self.trace
        times = trace.times
        heads = trace.heads
        head_index = trace.head_index
        client_index = trace.client_index
        clients = trace.clients
        heap = self.heap
        clock = self.clock
        advance = self.advance
        dispatch = self.dispatch
        interval = self.sample_interval
        next_sample = 0.0
        samples = 0
        pools = self.pools
        default = pools.default
        # The common case, inlined: no routes, no sticky cookie, no slot limit (the strategy's pick is
        # final, as on the proxy's own fast path) and no key movement to record.
        fast_pool = (default if self.router is None and default is not None and default.direct
                     and default.backup is None and not self.sticky and self.keyed_pool is None else None)
        choose = fast_pool.strategy.choose if fast_pool is not None else None
        request = self.request
        for i, t in enumerate(times):
            if heap and heap[0][0] <= t:
                if t >= next_sample:
                    while t >= next_sample:
                        advance(next_sample)
                        self.sample()
                        samples += 1
                        next_sample = samples * interval
                advance(t)
            elif t >= next_sample:
                while t >= next_sample:
                    self.sample()
                    samples += 1
                    next_sample = samples * interval
            if self.waiting:
                self.expire(t)
            clock.now = t
            if choose is not None:
                fast_pool.requests += 1  # type: ignore[union-attr]
                b = choose(heads[head_index[i]], clients[client_index[i]])
                if b is not None:
                    dispatch(b, t, t, i)
                else:
                    self.result.no_backend += 1
            else:
                request(i, t)
        # After the last arrival: the answers still to come (and queued requests timing out).
        while heap or self.waiting:
            when = heap[0][0] if heap else math.inf
            if self.waiting:
                first = min(line[0][0] for line in self.deadlines.values() if line)
                if first < when:
                    self.expire(first)
                    continue
            while next_sample <= when and samples <= 2 * SAMPLES:
                advance(next_sample)
                self.sample()
                samples += 1
                next_sample = samples * interval
            advance(when)
        self.sample()
        end = max(trace.duration, clock.now, max((max(s.free) for s in self.servers.values()), default=0.0))
        return self._result(end)

    def _result(self, end: float) -> Result:
        r = self.result
        r.end_time = end
        sent = sum(b.requests for b in self.pools.backends)
        r.to_backends = sent
        for k, b in enumerate(self.pools.backends):
            s = self.servers[b]
            capacity = len(s.free)
            r.backends.append(BackendResult(
                b.name, b.pool, b.requests, b.requests / sent if sent else 0.0,
                s.busy / end if end > 0 else 0.0, s.peak, s.waited,
                1000.0 * s.wait / b.requests if b.requests else 0.0, s.errors, s.model.describe(capacity)))
            r.in_flight_series[b.name] = self.series_active[k]
            r.requests_series[b.name] = self.series_requests[k]
        dispatched_from_queue = r.queued - r.queue_timeouts
        r.queue_ms_mean = 1000.0 * self.queue_wait / dispatched_from_queue if dispatched_from_queue > 0 else 0.0
        r.queue_ms_max *= 1000.0
        lat = self.latencies
        lat.sort()
        if lat:
            n = len(lat)
            for label, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
                # Nearest rank: the smallest value with at least q of the samples at or below it.
                r.latency_ms[label] = 1000.0 * lat[max(0, math.ceil(q * n) - 1)]
            r.latency_ms["mean"] = 1000.0 * math.fsum(lat) / n
            r.latency_ms["max"] = 1000.0 * lat[-1]
        if self.removed is not None and self.keyed_pool is not None:
            r.keys = self._key_moves(self.keyed_pool, self.removed)
        return r

    # ---- keys ------------------------------------------------------------------------------------
    def _key_moves(self, pool: Pool, removed: Backend) -> KeyMoves:
        """Each distinct key's backend with every backend in rotation, then with ``removed`` out of the
        eligible set (``pool.refresh()``); nothing is in flight by now, so a pick depends on the key
        alone (no bounded-load walk)."""
        trace = self.trace
        for b in pool.backends:
            if not b.up:
                b.mark_up(self.clock.now)
        pool.refresh()
        pick: Callable[[RequestHead, str], Optional[Backend]]
        if pool.sticky is not None:
            moves = KeyMoves(removed.name, pool.name, "sticky")
            sticky = pool.sticky
            reps: List[Tuple[RequestHead, str]] = []
            for client in sorted(self.cookie_field)[:MAX_KEYS]:
                if sticky.name in self.jar[client]:
                    head = self._with_cookies(trace.head_index[0], client)
                    reps.append((head, trace.clients[client]))

            def sticky_pick(req: RequestHead, ip: str) -> Optional[Backend]:
                return pool.choose_sticky(req, ip)[0]

            pick = sticky_pick
        else:
            moves = KeyMoves(removed.name, pool.name, "hash")
            key_of = _hash_key_of("client_ip" if pool.strategy_name == "ip_hash" else pool.hash_key)
            seen: Dict[bytes, Tuple[RequestHead, str]] = {}
            for h, client in sorted(self.key_pairs):
                req = self._with_cookies(h, client) if self.sticky else trace.heads[h]
                ip = trace.clients[client]
                key = key_of(req, ip)
                if key is not None and key not in seen:
                    seen[key] = (req, ip)
                    if len(seen) >= MAX_KEYS:
                        break
            reps = list(seen.values())
            pick = pool.strategy.choose
        before = [pick(req, ip) for req, ip in reps]
        state = removed.admin_state
        removed.set_admin_state(ADMIN_MAINT)
        pool.refresh()
        after = [pick(req, ip) for req, ip in reps]
        removed.set_admin_state(state)
        pool.refresh()
        moves.keys = len(reps)
        for was, now in zip(before, after):
            if was is removed:
                moves.on_removed += 1
            if was is not now:
                moves.moved += 1
                if was is not removed:
                    moves.moved_elsewhere += 1
        return moves


def _normals(seed: int, n: int) -> List[float]:
    """One standard normal draw per request (see the module docstring)."""
    gauss = random.Random(seed).gauss
    return [gauss(0.0, 1.0) for _ in repeat(None, n)]


StrategySpec = Union[str, Type[Any]]


def simulate(config: Config, trace: Trace, strategies: Sequence[StrategySpec] = (), model: Optional[Model] = None,
             remove: Optional[str] = None) -> List[Result]:
    """Replay ``trace`` once per strategy (a name as in lb.ini, ``package.module:Name``, or a strategy
    class with ``update``/``pick``; none: the configuration's own) and return a Result each. ``remove``
    names the backend whose removal the key-movement figure is about (default: the last backend of the
    default pool, or of the first pool). Raises ValueError for an unknown strategy or backend."""
    model = model if model is not None else Model()
    names = {b.name for b in config.backends}
    for name in model.backends:
        if name not in names:
            raise ValueError("%s: backend %s: not a backend of %s" % (model.source or "model", name, config.path))
    if remove is None:
        remove = default_removed(config)
    elif remove not in names:
        raise ValueError("--remove %s: not a backend of %s" % (remove, config.path))
    runs: List[Tuple[str, Config, Dict[str, type]]] = []
    if not strategies:
        own = {p.strategy if p.strategy is not None else config.strategy for p in config.pools} or {config.strategy}
        runs.append((own.pop() if len(own) == 1 else "config", config, {}))
    for s in strategies:
        if isinstance(s, str):
            runs.append((s, with_strategy(config, _canonical(s)), {}))
        else:
            label = _python_label(s)
            runs.append((s.__name__, with_strategy(config, label), {label: s}))
    zs = _normals(model.seed, len(trace))
    results = []
    for label, cfg, custom in runs:
        started = time.perf_counter()
        result = _Run(cfg, trace, model, zs, label, custom, remove).run()
        result.wall_seconds = time.perf_counter() - started
        results.append(result)
    return results


def default_removed(config: Config) -> Optional[str]:
    """The backend whose removal the key-movement figure is about by default: the last backend of the
    default pool (of the first pool when there is no default pool)."""
    pools = Pools(config, make_strategy=_factory({}, 0), resolve=False)
    pool = pools.default if pools.default is not None else (pools.order[0] if pools.order else None)
    return pool.backends[-1].name if pool is not None and pool.backends else None


def _canonical(name: str) -> str:
    if is_python_strategy(name):
        return name
    canonical = STRATEGIES.get(name.strip().lower())
    if canonical is None:
        raise ValueError("unknown strategy %r (expected one of %s, or package.module:ClassName)"
                         % (name, ", ".join(sorted(STRATEGIES))))
    return canonical


# ---- output ----------------------------------------------------------------------------------------------
def _pct(part: int, whole: int) -> str:
    return "%.1f%%" % (100.0 * part / whole) if whole else "-"


def _keys_cell(k: Optional[KeyMoves]) -> str:
    if k is None:
        return "n/a"
    what = "clients" if k.kind == "sticky" else "keys"
    return "%.1f%% of %d %s" % (100.0 * k.share, k.keys, what)


def render_table(results: Sequence[Result], trace: Trace, model: Model, config: Config,
                 remove: Optional[str]) -> str:
    """The comparison as text: one column per strategy."""
    names = [b.name for b in results[0].backends] if results else []
    rows: List[Tuple[str, List[str]]] = []

    def section(title: str) -> None:
        rows.append((title, [""] * len(results)))

    def row(label: str, cells: Iterable[str]) -> None:
        rows.append(("  " + label, list(cells)))

    section("requests per backend")
    for k, name in enumerate(names):
        row(name, ("%d  %s" % (r.backends[k].requests, _pct(r.backends[k].requests, r.to_backends)) for r in results))
    section("in flight, mean / peak")
    for k, name in enumerate(names):
        row(name, ("%.2f / %d" % (r.backends[k].in_flight_mean, r.backends[k].in_flight_peak) for r in results))
    section("wait inside the backend: mean ms (requests that waited)")
    for k, name in enumerate(names):
        row(name, ("%.2f  (%d)" % (r.backends[k].wait_ms_mean, r.backends[k].waited) for r in results))
    if any(b.errors for r in results for b in r.backends):
        section("503 answers (failure windows)")
        for k, name in enumerate(names):
            row(name, (str(r.backends[k].errors) for r in results))
    section("balrs queue (every backend at max_connections)")
    row("requests queued", (str(r.queued) for r in results))
    row("time queued, mean / max ms", ("%.1f / %.1f" % (r.queue_ms_mean, r.queue_ms_max) for r in results))
    row("503 after queue_timeout", (str(r.queue_timeouts) for r in results))
    row("503 no backend", (str(r.no_backend) for r in results))
    if any(r.answered_by_route or r.no_route for r in results):
        row("answered by a route", (str(r.answered_by_route) for r in results))
        row("404 no route", (str(r.no_route) for r in results))
    section("latency ms (queue + backend wait + service)")
    for label in ("p50", "p99", "p99.9", "mean", "max"):
        row(label, ("%.2f" % r.latency_ms[label] if label in r.latency_ms else "-" for r in results))
    moved = [r.keys for r in results]
    target = next((k for k in moved if k is not None), None)
    title = "keys moved when %s is removed" % remove if remove else "keys moved"
    if target is not None:
        title += " (pool %s)" % target.pool
    section(title)
    row("share moved", (_keys_cell(k) for k in moved))
    if target is not None:
        row("were on it / moved elsewhere", ("%d / %d" % (k.on_removed, k.moved_elsewhere) if k is not None else ""
                                             for k in moved))
    # Section titles run into the columns (their cells are empty); the labels under them set the width.
    width = max([len(label) for label, cells in rows if label.startswith("  ")] + [20]) + 2
    cols = [max([len(r.strategy)] + [len(cells[j]) for _, cells in rows]) + 3 for j, r in enumerate(results)]
    lines = ["config: %s" % config.path, "trace: %s" % trace.describe(),
             "model: %s (seed %d)" % (model.source or "default", model.seed)]
    for b in results[0].backends if results else []:
        lines.append("  %s (pool %s): %s" % (b.name, b.pool, b.model))
    lines.append("")
    lines.append(" " * width + "".join(r.strategy.rjust(c) for r, c in zip(results, cols)))
    for label, cells in rows:
        lines.append((label.ljust(width) + "".join(cell.rjust(c) for cell, c in zip(cells, cols))).rstrip())
    return "\n".join(lines) + "\n"


def result_json(results: Sequence[Result], trace: Trace, model: Model, config: Config,
                remove: Optional[str]) -> Dict[str, Any]:
    """The comparison as plain data (``--json``)."""

    def one(r: Result) -> Dict[str, Any]:
        d = dataclasses.asdict(r)
        for key in ("in_flight_series", "requests_series", "sample_interval"):
            d.pop(key)
        d["keys"] = None if r.keys is None else dict(dataclasses.asdict(r.keys), share=r.keys.share)
        return d

    return {
        "config": config.path,
        "trace": {"source": trace.source, "kind": trace.kind, "requests": len(trace), "duration_s": trace.duration,
                  "clients": len(trace.clients), "heads": len(trace.heads), "skipped": trace.skipped,
                  "seed": trace.seed},
        "model": {"source": model.source, "seed": model.seed},
        "remove": remove,
        "strategies": [one(r) for r in results],
    }


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f")


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _ticks(top: float, count: int = 5) -> List[float]:
    """Round tick values from 0 to at least ``top`` (steps of 1, 2 or 5 times a power of ten)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    n = int(math.ceil(top / step - 1e-9))
    return [k * step for k in range(n + 1)]


def render_svg(results: Sequence[Result]) -> str:
    """In-flight requests per backend over virtual time: one panel per strategy, one line per backend."""
    width, panel_h = 900, 240
    left, right, top, bottom = 60, 150, 34, 44
    plot_w = width - left - right
    plot_h = panel_h - top - bottom
    height = panel_h * max(1, len(results))
    peak = max([max(s) for r in results for s in r.in_flight_series.values() if s] + [1])
    yticks = _ticks(float(peak))
    ymax = yticks[-1]
    # The x axis ends with the last sample (the last answer); its ticks are the round values up to it.
    xmax = max([r.sample_interval * (max((len(s) for s in r.in_flight_series.values()), default=1) - 1)
                for r in results] + [1e-3])
    xticks = [v for v in _ticks(xmax, 8) if v <= xmax * (1 + 1e-9)]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="sans-serif" font-size="12">' % (width, height, width, height),
           '<rect width="100%" height="100%" fill="white"/>']
    for p, r in enumerate(results):
        y0 = p * panel_h + top
        out.append('<g class="panel" data-strategy="%s">' % _esc(r.strategy))
        out.append('<text x="%d" y="%d" font-size="14" font-weight="bold">%s</text>'
                   % (left, y0 - 12, _esc(r.strategy)))
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>'
                   % (left, y0, plot_w, plot_h))
        for v in yticks:
            y = y0 + plot_h - plot_h * v / ymax
            out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>' % (left, y, left + plot_w, y))
            out.append('<text x="%d" y="%.1f" text-anchor="end">%g</text>' % (left - 6, y + 4, v))
        for v in xticks:
            x = left + plot_w * v / xmax
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#444"/>'
                       % (x, y0 + plot_h, x, y0 + plot_h + 4))
            out.append('<text x="%.1f" y="%d" text-anchor="middle">%g</text>' % (x, y0 + plot_h + 17, v))
        out.append('<text x="%d" y="%d" text-anchor="middle">virtual time (s)</text>'
                   % (left + plot_w // 2, y0 + plot_h + 34))
        out.append('<text x="%d" y="%d" text-anchor="middle" transform="rotate(-90 %d %d)">in flight</text>'
                   % (16, y0 + plot_h // 2, 16, y0 + plot_h // 2))
        for k, (name, series) in enumerate(r.in_flight_series.items()):
            colour = _COLOURS[k % len(_COLOURS)]
            points = " ".join("%.1f,%.1f" % (left + plot_w * (j * r.sample_interval) / xmax,
                                             y0 + plot_h - plot_h * v / ymax) for j, v in enumerate(series))
            out.append('<polyline class="backend" data-backend="%s" fill="none" stroke="%s" stroke-width="1.2" '
                       'points="%s"/>' % (_esc(name), colour, points))
            ly = y0 + 14 + 18 * k
            out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>'
                       % (left + plot_w + 14, ly - 4, left + plot_w + 34, ly - 4, colour))
            out.append('<text x="%d" y="%d">%s</text>' % (left + plot_w + 40, ly, _esc(name)))
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balrs simulate",
        description="Replay a trace (a json access log, or a synthetic spec) through balrs' strategies on a "
                    "virtual clock against a model of the backends, and compare them.")
    p.add_argument("config", metavar="lb.ini", help="the configuration file")
    p.add_argument("trace", metavar="TRACE", help="a balrs json access log, or a synthetic spec (JSON)")
    p.add_argument("--strategy", metavar="A,B,...",
                   help="strategies to compare, each run with every pool set to it (default: the file's)")
    p.add_argument("--backends-model", metavar="FILE", help="the backends' latency, capacity and windows (JSON)")
    p.add_argument("--remove", metavar="NAME",
                   help="the backend whose removal the key-movement figure is about (default: the last one)")
    p.add_argument("--plot", metavar="OUT.svg", help="write in-flight requests per backend over time as SVG")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        strategies: List[StrategySpec] = []
        if args.strategy is not None:
            for name in (s.strip() for s in args.strategy.split(",")):
                if not name:
                    raise SimulateError("--strategy: an empty name in %r" % args.strategy)
                try:
                    canonical = _canonical(name)
                    if is_python_strategy(canonical):
                        load_class(canonical, config_directory(config))
                except ValueError as exc:
                    raise SimulateError("--strategy: %s" % exc) from None
                strategies.append(canonical)
        else:
            check_strategies(config)  # the file's Python strategies
        model = load_model(args.backends_model) if args.backends_model else Model()
        trace = load_trace(args.trace)
        try:
            results = simulate(config, trace, strategies, model, args.remove)
        except ValueError as exc:
            raise SimulateError(str(exc)) from None
        remove = args.remove if args.remove is not None else default_removed(config)
        if args.plot:
            try:
                with open(args.plot, "w", encoding="utf-8") as f:
                    f.write(render_svg(results))
            except OSError as exc:
                raise SimulateError("--plot %s: %s" % (args.plot, exc.strerror or exc)) from None
    except ConfigError as exc:
        sys.stderr.write("%s\n" % exc)
        return 2
    except SimulateError as exc:
        sys.stderr.write("balrs simulate: %s\n" % exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result_json(results, trace, model, config, remove), indent=2) + "\n")
    else:
        sys.stdout.write(render_table(results, trace, model, config, remove))
    sys.stderr.write("simulated %d request(s) x %d strateg%s in %.1f s\n"
                     % (len(trace), len(results), "y" if len(results) == 1 else "ies",
                        sum(r.wall_seconds for r in results)))
    return 0


