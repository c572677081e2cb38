"""What the admin endpoint reports: Prometheus text (``/metrics``) and a JSON status (``/status``).

Pure functions of a balancer's state: no I/O, no clock (the caller passes what needs one), so they can
be tested on any object with the same attributes. Rendering is O(backends + distinct status codes), run
only when the admin endpoint is asked, never on the proxy's path.

The text follows the Prometheus exposition format 0.0.4: every family has ``# HELP`` and ``# TYPE``,
its samples are contiguous, label values escape backslash, double quote and newline, and histogram
buckets are cumulative with a final ``le="+Inf"`` equal to ``_count``.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import __version__
from .pool import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .pool import Backend
    from .server import Balancer

__all__ = [
    "CONTENT_TYPE", "STATUS_CONTENT_TYPE", "escape_label_value", "format_value", "render_metrics",
    "status_document", "status_json",
]

# The Prometheus text format version this module writes (the Content-Type scrapers negotiate on).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_CONTENT_TYPE = "application/json"

# Status classes of balrs_backend_responses_total, indexed like Backend.responses (1..5).
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_STATES = ("up", "down", "drain")

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


def _per_backend(name: str, backends: Sequence[Backend], value: Callable[[Backend], float]) -> List[Sample]:
    return [(name, (("backend", b.name),), value(b)) for b in backends]


def render_metrics(srv: Balancer, start_time: Optional[float] = None) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``srv``'s counters and gauges.

    ``start_time`` (Unix seconds) adds ``balrs_start_time_seconds``, from which dashboards derive uptime.
    """
    w = _Writer()
    pool = srv.pool
    backends: List[Backend] = list(pool.backends)

    # ---- the process ----
    w.family("balrs_info", "gauge", "balrs version, strategy and the process answering (always 1).",
             [("balrs_info", (("version", __version__), ("strategy", pool.strategy_name),
                              ("pid", str(os.getpid()))), 1)])
    if start_time is not None:
        w.family("balrs_start_time_seconds", "gauge", "When this balrs process started, in Unix seconds.",
                 [("balrs_start_time_seconds", (), start_time)])
    w.family("balrs_draining", "gauge", "1 while balrs drains for a graceful stop, else 0.",
             [("balrs_draining", (), 1 if srv.draining else 0)])
    w.family("balrs_client_connections", "gauge", "Client connections open now.",
             [("balrs_client_connections", (), len(srv.clients))])
    w.family("balrs_accepted_connections_total", "counter", "Client connections accepted.",
             [("balrs_accepted_connections_total", (), srv.accepted)])
    w.family("balrs_responses_total", "counter", "Responses sent to clients, by status code.",
             [("balrs_responses_total", (("code", str(code)),), n)
              for code, n in sorted(srv.responses().items())])
    w.family("balrs_queue_length", "gauge",
             "Requests waiting for a backend slot (every eligible backend at max_connections).",
             [("balrs_queue_length", (), len(pool.queue))])
    w.family("balrs_backends", "gauge", "Configured backends, by state.",
             [("balrs_backends", (("state", s),), sum(1 for b in backends if b.state == s)) for s in _STATES])

    # ---- per backend ----
    w.family("balrs_backend_info", "gauge", "A backend's address (always 1).",
             [("balrs_backend_info", (("backend", b.name), ("address", b.address)), 1) for b in backends])
    w.family("balrs_backend_up", "gauge",
             "1 if the backend is in rotation (healthy, not ejected, not draining), else 0.",
             _per_backend("balrs_backend_up", backends, lambda b: 1 if b.state == "up" else 0))
    w.family("balrs_backend_state", "gauge", "The backend's state: 1 for the current one of up, down, drain.",
             [("balrs_backend_state", (("backend", b.name), ("state", s)), 1 if b.state == s else 0)
              for b in backends for s in _STATES])
    w.family("balrs_backend_active_requests", "gauge", "Requests in flight on the backend.",
             _per_backend("balrs_backend_active_requests", backends, lambda b: b.active))
    w.family("balrs_backend_requests_total", "counter", "Requests sent to the backend (retries included).",
             _per_backend("balrs_backend_requests_total", backends, lambda b: b.requests))
    w.family("balrs_backend_failures_total", "counter",
             "Connect failures and broken or timed-out responses on the backend.",
             _per_backend("balrs_backend_failures_total", backends, lambda b: b.failures))
    w.family("balrs_backend_responses_total", "counter", "Response heads received from the backend, by class.",
             [("balrs_backend_responses_total", (("backend", b.name), ("class", c)), b.responses[i + 1])
              for b in backends for i, c in enumerate(_CLASSES)])
    w.family("balrs_backend_response_seconds", "histogram",
             "Time from sending a request to the backend to receiving its response head.",
             _histogram("balrs_backend_response_seconds", backends))
    w.family("balrs_backend_response_time_seconds", "gauge",
             "Moving average (EWMA) of the backend's time to response head; absent until measured.",
             [("balrs_backend_response_time_seconds", (("backend", b.name),), b.ewma)
              for b in backends if b.ewma >= 0.0])
    w.family("balrs_backend_weight", "gauge", "Effective weight (the configured one, lower during slow start).",
             _per_backend("balrs_backend_weight", backends, lambda b: b.eff_weight))
    w.family("balrs_backend_configured_weight", "gauge", "Weight from the configuration.",
             _per_backend("balrs_backend_configured_weight", backends, lambda b: b.weight))
    w.family("balrs_backend_max_connections", "gauge", "Concurrent request limit (0 = unlimited).",
             _per_backend("balrs_backend_max_connections", backends, lambda b: b.max_connections))
    w.family("balrs_backend_idle_connections", "gauge", "Idle keep-alive connections pooled for the backend.",
             _per_backend("balrs_backend_idle_connections", backends, lambda b: len(b.idle)))
    w.family("balrs_backend_health_transitions_total", "counter", "Changes between up and down.",
             _per_backend("balrs_backend_health_transitions_total", backends, lambda b: b.transitions))
    w.family("balrs_backend_ejected", "gauge",
             "1 while passive outlier detection keeps the backend out of rotation, else 0.",
             _per_backend("balrs_backend_ejected", backends, lambda b: 1 if b.ejected_until else 0))
    w.family("balrs_backend_consecutive_errors", "gauge", "Live-traffic failures in a row.",
             _per_backend("balrs_backend_consecutive_errors", backends, lambda b: b.consecutive_errors))
    if srv.config.health is not None:
        w.family("balrs_backend_health_check_ok", "gauge", "1 if the backend's last health probe passed, else 0.",
                 _per_backend("balrs_backend_health_check_ok", backends, lambda b: 1 if b.last_check_ok else 0))
    return w.text()


def _histogram(name: str, backends: Sequence[Backend]) -> List[Sample]:
    samples: List[Sample] = []
    bounds = list(LATENCY_BUCKETS) + [math.inf]
    for b in backends:
        cumulative = 0
        for le, n in zip(bounds, b.latency):
            cumulative += n
            samples.append((name + "_bucket", (("backend", b.name), ("le", _bound(le))), cumulative))
        samples.append((name + "_sum", (("backend", b.name),), b.latency_sum))
        samples.append((name + "_count", (("backend", b.name),), cumulative))
    return samples


# ---- /status ---------------------------------------------------------------------------------------
def backend_status(b: Backend, health_checks: bool = True) -> Dict[str, Any]:
    """One backend as /status reports it; the contract's keys first, then the rest.
    ``last_check_ok`` is None without active health checks."""
    return {
        "name": b.name,
        "address": b.address,
        "state": b.state,
        "weight": b.weight,
        "active": b.active,
        "requests": b.requests,
        "failures": b.failures,
        "effective_weight": b.eff_weight,
        "max_connections": b.max_connections,
        "response_time_ms": round(b.ewma * 1000.0, 3) if b.ewma >= 0.0 else None,
        "responses": {c: b.responses[i + 1] for i, c in enumerate(_CLASSES)},
        "transitions": b.transitions,
        "idle_connections": len(b.idle),
        "ejected": bool(b.ejected_until),
        "consecutive_errors": b.consecutive_errors,
        "last_check_ok": b.last_check_ok if health_checks else None,
    }


def status_document(srv: Balancer) -> Dict[str, Any]:
    """The /status document: ``{"strategy": ..., "backends": [...], ...}``."""
    pool = srv.pool
    config = srv.config
    return {
        "version": __version__,
        "pid": os.getpid(),
        "strategy": pool.strategy_name,
        "draining": bool(srv.draining),
        "listen": [str(a) for a in config.listen],
        "health_checks": config.health is not None,
        "client_connections": len(srv.clients),
        "accepted_connections": srv.accepted,
        "queue_length": len(pool.queue),
        "responses": {str(code): n for code, n in sorted(srv.responses().items())},
        "backends": [backend_status(b, config.health is not None) for b in pool.backends],
    }


def status_json(srv: Balancer) -> bytes:
    """The /status document as UTF-8 JSON (with a final newline, for curl users)."""
    return (json.dumps(status_document(srv), indent=2) + "\n").encode("utf-8")
