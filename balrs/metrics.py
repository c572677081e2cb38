"""What the admin endpoint reports: Prometheus text (``/metrics``) and a JSON status (``/status``).

Two steps, both pure functions (no I/O, no clock: the caller passes what needs one):

- ``snapshot(pool, config, counters)`` copies a balancer's counters and state into plain data (dicts, lists, numbers,
  strings: JSON as it is, so a worker can send it to the supervisor over its control channel);
  ``merge(snapshots, ...)`` combines the snapshots of several workers into one of the same shape;
- ``metrics_text(snap)`` and ``status_of(snap)`` render one snapshot, whether of one process or merged.

Everything is O(backends + distinct status codes), run only when the admin endpoint is asked, never on
the proxy's path. ``snapshot`` reads attributes only, so it works on any objects that have them (tests).

The text follows the Prometheus exposition format 0.0.4: every family has ``# HELP`` and ``# TYPE``,
its samples are contiguous, label values escape backslash, double quote and newline, and histogram
buckets are cumulative with a final ``le="+Inf"`` equal to ``_count``.
"""

from __future__ import annotations

import json
import math
import os
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

from . import __version__
from .pool import LATENCY_BUCKETS, Pool, Pools

if TYPE_CHECKING:
    from .config import Config
    from .pool import Backend
    from .routing import RouteTable

__all__ = [
    "CONTENT_TYPE", "STATUS_CONTENT_TYPE", "Snapshot", "escape_label_value", "format_value", "merge",
    "metrics_text", "render_metrics", "snapshot", "json_body", "status_document", "status_json", "status_of",
]

# The Prometheus text format version this module writes (the Content-Type scrapers negotiate on).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_CONTENT_TYPE = "application/json"

# Status classes of balrs_backend_responses_total (Backend.responses 1..5; 6..9 are counted as 5xx).
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_STATES = ("up", "down", "drain", "maint")

# A snapshot: plain data, see snapshot() and merge() for its keys.
Snapshot = Dict[str, Any]
Labels = Sequence[Tuple[str, str]]
Sample = Tuple[str, Labels, float]


def escape_label_value(value: str) -> str:
    """A label value as it goes between double quotes (exposition format: ``\\``, ``\"`` and newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    """HELP text escapes only backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, then Go-style ``+Inf``/``-Inf``/``NaN``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _bound(le: float) -> str:
    """A histogram bucket bound as Prometheus clients write it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(le) else repr(float(le))


class _Writer:
    """Collects metric families; each family's samples are written together."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        lines = self.lines
        lines.append("# HELP %s %s" % (name, _escape_help(help_text)))
        lines.append("# TYPE %s %s" % (name, kind))
        for sample_name, labels, value in samples:
            if labels:
                body = ",".join('%s="%s"' % (k, escape_label_value(v)) for k, v in labels)
                lines.append("%s{%s} %s" % (sample_name, body, format_value(value)))
            else:
                lines.append("%s %s" % (sample_name, format_value(value)))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# ---- snapshots -------------------------------------------------------------------------------------
class Counters(Protocol):
    """The process-wide counters a snapshot reports (the proxy's context and the server keep them)."""

    @property
    def draining(self) -> bool: ...

    @property
    def accepted(self) -> int: ...

    @property
    def client_connections(self) -> int: ...

    @property
    def log_dropped(self) -> int: ...

    @property
    def client_limited(self) -> List[int]: ...

    def responses(self) -> Dict[int, int]: ...


def snapshot(pool: Union[Pool, Pools], config: Config, counters: Counters, start_time: Optional[float] = None,
             router: Optional[RouteTable] = None) -> Snapshot:
    """The counters and state of one balancer process as plain data. ``start_time`` (Unix seconds) is
    reported as ``balrs_start_time_seconds``, from which dashboards derive uptime."""
    srv = counters
    pools: Sequence[Pool] = pool.order if isinstance(pool, Pools) else [pool]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "start_time": start_time,
        "strategy": pool.strategy_name,
        "draining": bool(srv.draining),
        "listen": [str(a) for a in config.listen],
        "health_checks": config.health is not None,
        "client_connections": srv.client_connections,
        "accepted_connections": srv.accepted,
        "log_dropped": srv.log_dropped,
        "client_limited": {"rate": srv.client_limited[0], "connections": srv.client_limited[1]},
        "queue_length": pool.queued,
        # JSON object keys are strings.
        "responses": {str(code): n for code, n in sorted(srv.responses().items())},
        # Backends a reload removed are listed (state "drain") while they still have requests in flight.
        "backends": [_backend_snapshot(b) for b in pool.backends]
        + [_backend_snapshot(b) for b in pool.retired if b.active],
        "pools": [{"name": p.name, "strategy": p.strategy_name, "backends": [b.name for b in p.backends],
                   "backup": p.backup.name if p.backup is not None else None, "queue_length": p.queued,
                   "retries": p.retries_total, "retries_budget_exhausted": p.budget.exhausted,
                   "panic": p.panicking}
                  for p in pools],
        "routes": [{"name": r.name, "requests": r.requests} for r in router.routes] if router is not None else [],
    }


def _backend_snapshot(b: Backend) -> Dict[str, Any]:
    return {
        "name": b.name,
        "pool": b.pool,
        "address": b.address,
        "state": b.state,
        "weight": b.weight,
        "active": b.active,
        "requests": b.requests,
        "failures": b.failures,
        "effective_weight": b.eff_weight,
        "max_connections": b.max_connections,
        "response_time": b.ewma if b.ewma >= 0.0 else None,   # seconds, None until measured
        "responses": _classes(b.responses),                   # 1xx..5xx
        "latency": list(b.latency),                           # histogram counts per bucket, last = +Inf
        "latency_sum": b.latency_sum,
        "transitions": b.transitions,
        "idle_connections": len(b.idle),
        "ejected": 1 if b.ejected_until else 0,               # merged: in how many workers
        "consecutive_errors": b.consecutive_errors,
        "last_check_ok": bool(b.last_check_ok),
    }


def _classes(responses: Sequence[int]) -> List[int]:
    """1xx..5xx from Backend.responses: the invalid codes 600..999 count as 5xx (RFC 9110 §15)."""
    out = list(responses[1:6])
    out[4] += sum(responses[6:])
    return out


def merge(snapshots: Sequence[Snapshot], pid: int, start_time: Optional[float], workers: int,
          workers_configured: int) -> Snapshot:
    """One snapshot for the whole balancer from its workers' (at least one).

    Counters and gauges are summed: they count what each worker did or holds. Health is per worker
    (each probes on its own): a backend is ``drain`` if it drains in any worker, ``up`` if it is up in
    a majority of the workers that reported it, else ``down``; ``up_workers`` says in how many it is up
    and ``workers`` lists each worker's view. ``pid`` and ``start_time`` are the answering process's
    (the supervisor); ``workers`` is how many workers were asked, ``workers_configured`` the setting.
    """
    first = snapshots[0]
    responses: Dict[int, int] = {}
    for s in snapshots:
        for code, n in s["responses"].items():
            responses[int(code)] = responses.get(int(code), 0) + n
    # Backends by name, in the order the workers list them (a reload may be half applied: a backend
    # missing from one worker is merged over the workers that have it).
    parts: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
    for s in snapshots:
        for b in s["backends"]:
            parts.setdefault(b["name"], []).append((s["pid"], b))
    return {
        "version": __version__,
        "pid": pid,
        "start_time": start_time,
        "strategy": first["strategy"],
        "draining": any(s["draining"] for s in snapshots),
        "listen": first["listen"],
        "health_checks": first["health_checks"],
        "workers": workers,
        "workers_answered": len(snapshots),
        "workers_configured": workers_configured,
        "worker_pids": [s["pid"] for s in snapshots],
        "client_connections": sum(s["client_connections"] for s in snapshots),
        "accepted_connections": sum(s["accepted_connections"] for s in snapshots),
        "log_dropped": sum(s.get("log_dropped", 0) for s in snapshots),
        "client_limited": {k: sum(s.get("client_limited", {}).get(k, 0) for s in snapshots)
                           for k in ("rate", "connections")},
        "queue_length": sum(s["queue_length"] for s in snapshots),
        "responses": {str(code): n for code, n in sorted(responses.items())},
        "backends": [_merge_backend(views) for views in parts.values()],
        "pools": _merge_pools(snapshots),
        "routes": _merge_routes(snapshots),
    }


def _merge_pools(snapshots: Sequence[Snapshot]) -> List[Dict[str, Any]]:
    """The first worker's pools with the counters summed over the workers (panic: in any of them)."""
    by_name: Dict[str, Dict[str, Any]] = {}
    for s in snapshots:
        for p in s.get("pools", []):
            have = by_name.get(p["name"])
            if have is None:
                by_name[p["name"]] = dict(p)
                continue
            for key in ("queue_length", "retries", "retries_budget_exhausted"):
                have[key] = have.get(key, 0) + p.get(key, 0)
            have["panic"] = bool(have.get("panic")) or bool(p.get("panic"))
    return list(by_name.values())


def _merge_routes(snapshots: Sequence[Snapshot]) -> List[Dict[str, Any]]:
    """Route request counts summed by name, in the first worker's order (then any others')."""
    counts: Dict[str, int] = {}
    for s in snapshots:
        for r in s.get("routes", []):
            counts[r["name"]] = counts.get(r["name"], 0) + r["requests"]
    return [{"name": name, "requests": n} for name, n in counts.items()]


def _merge_backend(views: List[Tuple[int, Dict[str, Any]]]) -> Dict[str, Any]:
    bs = [b for _pid, b in views]
    first = bs[0]
    n = len(bs)
    up = sum(1 for b in bs if b["state"] == "up")
    if any(b["state"] == "drain" for b in bs):
        state = "drain"
    elif any(b["state"] == "maint" for b in bs):
        state = "maint"
    else:
        state = "up" if 2 * up > n else "down"
    # The response-time average of the workers that measured one, weighed by their responses.
    measured = [(b["response_time"], sum(b["latency"])) for b in bs if b["response_time"] is not None]
    response_time: Optional[float] = None
    if measured:
        total = sum(w for _v, w in measured)
        response_time = (sum(v * w for v, w in measured) / total if total
                         else sum(v for v, _w in measured) / len(measured))
    return {
        "name": first["name"],
        "pool": first.get("pool", "default"),
        "address": first["address"],
        "state": state,
        "weight": first["weight"],
        "active": sum(b["active"] for b in bs),
        "requests": sum(b["requests"] for b in bs),
        "failures": sum(b["failures"] for b in bs),
        "effective_weight": sum(b["effective_weight"] for b in bs) / n,
        "max_connections": first["max_connections"],   # per worker
        "response_time": response_time,
        "responses": _sum_lists([b["responses"] for b in bs]),
        "latency": _sum_lists([b["latency"] for b in bs]),
        "latency_sum": sum(b["latency_sum"] for b in bs),
        "transitions": sum(b["transitions"] for b in bs),
        "idle_connections": sum(b["idle_connections"] for b in bs),
        "ejected": sum(b["ejected"] for b in bs),
        # A streak is per worker: the longest one.
        "consecutive_errors": max(b["consecutive_errors"] for b in bs),
        "last_check_ok": 2 * sum(1 for b in bs if b["last_check_ok"]) > n,
        "up_workers": up,
        "workers": [{"pid": pid, "state": b["state"], "active": b["active"], "requests": b["requests"]}
                    for pid, b in views],
    }


def _sum_lists(lists: Sequence[Sequence[int]]) -> List[int]:
    return [sum(column) for column in zip_longest(*lists, fillvalue=0)]


# ---- /metrics --------------------------------------------------------------------------------------
def _per_backend(name: str, backends: Sequence[Dict[str, Any]],
                 value: Callable[[Dict[str, Any]], float]) -> List[Sample]:
    return [(name, (("backend", b["name"]),), value(b)) for b in backends]


def metrics_text(snap: Snapshot) -> str:
    """The Prometheus text exposition (format 0.0.4) of a snapshot (one process's or merged)."""
    w = _Writer()
    backends: List[Dict[str, Any]] = snap["backends"]
    merged = "workers" in snap

    # ---- the process ----
    w.family("balrs_info", "gauge", "balrs version, strategy and the process answering (always 1).",
             [("balrs_info", (("version", __version__), ("strategy", snap["strategy"]),
                              ("pid", str(snap["pid"]))), 1)])
    if snap.get("start_time") is not None:
        w.family("balrs_start_time_seconds", "gauge", "When this balrs process started, in Unix seconds.",
                 [("balrs_start_time_seconds", (), snap["start_time"])])
    if merged:
        w.family("balrs_workers", "gauge", "Worker processes whose counters this answer includes.",
                 [("balrs_workers", (), snap["workers_answered"])])
        w.family("balrs_workers_configured", "gauge", "Worker processes configured (workers = N).",
                 [("balrs_workers_configured", (), snap["workers_configured"])])
    w.family("balrs_draining", "gauge", "1 while balrs drains for a graceful stop, else 0.",
             [("balrs_draining", (), 1 if snap["draining"] else 0)])
    w.family("balrs_client_connections", "gauge", "Client connections open now.",
             [("balrs_client_connections", (), snap["client_connections"])])
    w.family("balrs_accepted_connections_total", "counter", "Client connections accepted.",
             [("balrs_accepted_connections_total", (), snap["accepted_connections"])])
    w.family("balrs_log_dropped_total", "counter",
             "Access log lines dropped because the log destination could not keep up.",
             [("balrs_log_dropped_total", (), snap.get("log_dropped", 0))])
    pool_list: List[Dict[str, Any]] = snap.get("pools", [])
    w.family("balrs_retries_total", "counter",
             "Requests sent again to another backend (retry_on), every pool.",
             [("balrs_retries_total", (), sum(p.get("retries", 0) for p in pool_list))])
    w.family("balrs_retries_budget_exhausted_total", "counter",
             "Retries refused by the retry budget (the failure went to the client), every pool.",
             [("balrs_retries_budget_exhausted_total", (),
               sum(p.get("retries_budget_exhausted", 0) for p in pool_list))])
    w.family("balrs_pool_retries_total", "counter", "Retries by pool.",
             [("balrs_pool_retries_total", (("pool", p["name"]),), p.get("retries", 0)) for p in pool_list])
    w.family("balrs_pool_panic", "gauge",
             "1 while a pool balances over all its backends (fewer up than panic_threshold).",
             [("balrs_pool_panic", (("pool", p["name"]),), 1 if p.get("panic") else 0) for p in pool_list])
    limited = snap.get("client_limited", {})
    w.family("balrs_client_limited_total", "counter",
             "Requests answered 429 by a per-client limit (client_rate, client_connections).",
             [("balrs_client_limited_total", (("limit", k),), limited.get(k, 0)) for k in ("rate", "connections")])
    w.family("balrs_responses_total", "counter", "Responses sent to clients, by status code.",
             [("balrs_responses_total", (("code", code),), n)
              for code, n in sorted(snap["responses"].items(), key=lambda kv: int(kv[0]))])
    w.family("balrs_queue_length", "gauge",
             "Requests waiting for a backend slot (every eligible backend at max_connections).",
             [("balrs_queue_length", (), snap["queue_length"])])
    w.family("balrs_backends", "gauge", "Configured backends, by state.",
             [("balrs_backends", (("state", s),), sum(1 for b in backends if b["state"] == s)) for s in _STATES])

    # ---- per backend ----
    w.family("balrs_backend_info", "gauge", "A backend's address (always 1).",
             [("balrs_backend_info", (("backend", b["name"]), ("pool", b.get("pool", "default")),
                                      ("address", b["address"])), 1) for b in backends])
    w.family("balrs_route_requests_total", "counter", "Requests a route matched.",
             [("balrs_route_requests_total", (("route", r["name"]),), r["requests"])
              for r in snap.get("routes", [])])
    w.family("balrs_backend_up", "gauge",
             "1 if the backend is in rotation (healthy, not ejected, not draining), else 0"
             + ("; with workers, in a majority of them." if merged else "."),
             _per_backend("balrs_backend_up", backends, lambda b: 1 if b["state"] == "up" else 0))
    if merged:
        w.family("balrs_backend_up_workers", "gauge", "Workers in which the backend is in rotation.",
                 _per_backend("balrs_backend_up_workers", backends, lambda b: b["up_workers"]))
    w.family("balrs_backend_state", "gauge", "The backend's state: 1 for the current one of up, down, drain.",
             [("balrs_backend_state", (("backend", b["name"]), ("state", s)), 1 if b["state"] == s else 0)
              for b in backends for s in _STATES])
    w.family("balrs_backend_active_requests", "gauge", "Requests in flight on the backend.",
             _per_backend("balrs_backend_active_requests", backends, lambda b: b["active"]))
    w.family("balrs_backend_requests_total", "counter", "Requests sent to the backend (retries included).",
             _per_backend("balrs_backend_requests_total", backends, lambda b: b["requests"]))
    w.family("balrs_backend_failures_total", "counter",
             "Connect failures and broken or timed-out responses on the backend.",
             _per_backend("balrs_backend_failures_total", backends, lambda b: b["failures"]))
    w.family("balrs_backend_responses_total", "counter", "Response heads received from the backend, by class.",
             [("balrs_backend_responses_total", (("backend", b["name"]), ("class", c)), b["responses"][i])
              for b in backends for i, c in enumerate(_CLASSES)])
    w.family("balrs_backend_response_seconds", "histogram",
             "Time from sending a request to the backend to receiving its response head.",
             _histogram("balrs_backend_response_seconds", backends))
    w.family("balrs_backend_response_time_seconds", "gauge",
             "Moving average (EWMA) of the backend's time to response head; absent until measured.",
             [("balrs_backend_response_time_seconds", (("backend", b["name"]),), b["response_time"])
              for b in backends if b["response_time"] is not None])
    w.family("balrs_backend_weight", "gauge", "Effective weight (the configured one, lower during slow start).",
             _per_backend("balrs_backend_weight", backends, lambda b: b["effective_weight"]))
    w.family("balrs_backend_configured_weight", "gauge", "Weight from the configuration.",
             _per_backend("balrs_backend_configured_weight", backends, lambda b: b["weight"]))
    w.family("balrs_backend_max_connections", "gauge",
             "Concurrent request limit (0 = unlimited)" + ("; per worker." if merged else "."),
             _per_backend("balrs_backend_max_connections", backends, lambda b: b["max_connections"]))
    w.family("balrs_backend_idle_connections", "gauge", "Idle keep-alive connections pooled for the backend.",
             _per_backend("balrs_backend_idle_connections", backends, lambda b: b["idle_connections"]))
    w.family("balrs_backend_health_transitions_total", "counter", "Changes between up and down.",
             _per_backend("balrs_backend_health_transitions_total", backends, lambda b: b["transitions"]))
    w.family("balrs_backend_ejected", "gauge",
             "1 while passive outlier detection keeps the backend out of rotation, else 0"
             + ("; with workers, in how many of them." if merged else "."),
             _per_backend("balrs_backend_ejected", backends, lambda b: b["ejected"]))
    w.family("balrs_backend_consecutive_errors", "gauge", "Live-traffic failures in a row.",
             _per_backend("balrs_backend_consecutive_errors", backends, lambda b: b["consecutive_errors"]))
    if snap["health_checks"]:
        w.family("balrs_backend_health_check_ok", "gauge", "1 if the backend's last health probe passed, else 0.",
                 _per_backend("balrs_backend_health_check_ok", backends, lambda b: 1 if b["last_check_ok"] else 0))
    return w.text()


def _histogram(name: str, backends: Sequence[Dict[str, Any]]) -> List[Sample]:
    samples: List[Sample] = []
    bounds = list(LATENCY_BUCKETS) + [math.inf]
    for b in backends:
        labels = (("backend", b["name"]),)
        cumulative = 0
        for le, n in zip(bounds, b["latency"]):
            cumulative += n
            samples.append((name + "_bucket", (("backend", b["name"]), ("le", _bound(le))), cumulative))
        samples.append((name + "_sum", labels, b["latency_sum"]))
        samples.append((name + "_count", labels, cumulative))
    return samples


def render_metrics(pool: Pool, config: Config, counters: Counters, start_time: Optional[float] = None) -> str:
    """The Prometheus text of one balancer's state (``metrics_text(snapshot(...))``)."""
    return metrics_text(snapshot(pool, config, counters, start_time))


# ---- /status ---------------------------------------------------------------------------------------
def status_of(snap: Snapshot) -> Dict[str, Any]:
    """The /status document of a snapshot: ``{"strategy": ..., "backends": [...], ...}``, the
    contract's keys first; a merged snapshot adds the workers' part (``workers_answered`` of
    ``workers``, and each backend's ``up_workers`` and per-worker ``workers``)."""
    health = bool(snap["health_checks"])
    doc: Dict[str, Any] = {
        "version": snap["version"],
        "pid": snap["pid"],
        "strategy": snap["strategy"],
        "draining": bool(snap["draining"]),
        "listen": list(snap["listen"]),
        "health_checks": health,
    }
    if "workers" in snap:
        for key in ("workers", "workers_answered", "workers_configured", "worker_pids"):
            doc[key] = snap[key]
    doc.update({
        "client_connections": snap["client_connections"],
        "accepted_connections": snap["accepted_connections"],
        "queue_length": snap["queue_length"],
        "client_limited": dict(snap.get("client_limited", {})),
        "responses": dict(snap["responses"]),
        "backends": [_backend_status(b, health) for b in snap["backends"]],
        "pools": [dict(p) for p in snap.get("pools", [])],
        "routes": [dict(r) for r in snap.get("routes", [])],
    })
    return doc


def _backend_status(b: Dict[str, Any], health_checks: bool) -> Dict[str, Any]:
    """One backend as /status reports it; the contract's keys first, then the rest.
    ``last_check_ok`` is None without active health checks."""
    rt = b["response_time"]
    doc = {
        "name": b["name"],
        "address": b["address"],
        "state": b["state"],
        "weight": b["weight"],
        "active": b["active"],
        "requests": b["requests"],
        "failures": b["failures"],
        "pool": b.get("pool", "default"),
        "effective_weight": b["effective_weight"],
        "max_connections": b["max_connections"],
        "response_time_ms": round(rt * 1000.0, 3) if rt is not None else None,
        "responses": {c: b["responses"][i] for i, c in enumerate(_CLASSES)},
        "transitions": b["transitions"],
        "idle_connections": b["idle_connections"],
        "ejected": bool(b["ejected"]),
        "consecutive_errors": b["consecutive_errors"],
        "last_check_ok": bool(b["last_check_ok"]) if health_checks else None,
    }
    if "workers" in b:
        doc["up_workers"] = b["up_workers"]
        doc["workers"] = b["workers"]
    return doc


def status_document(pool: Pool, config: Config, counters: Counters) -> Dict[str, Any]:
    """The /status document of one balancer (``status_of(snapshot(...))``)."""
    return status_of(snapshot(pool, config, counters))


def json_body(doc: Dict[str, Any]) -> bytes:
    """A document as UTF-8 JSON on one line, with a final newline (``| python -m json.tool`` or ``jq``
    indents it). Not indented: the indenting encoder is pure Python, six times slower than the C one,
    and a dashboard polls this every second."""
    return (json.dumps(doc) + "\n").encode("utf-8")


def status_json(pool: Pool, config: Config, counters: Counters) -> bytes:
    """The /status document of one balancer as UTF-8 JSON."""
    return json_body(status_document(pool, config, counters))
