"""The admin endpoint: /metrics (Prometheus text), /status (JSON), and how it serves them.

Three layers: the renderers in ``balrs.metrics`` on balancer-like objects (no sockets); the
``AdminServer`` in process on a reactor with a fake clock (timeouts without waiting); and real
``python -m balrs`` processes with an ``[admin]`` section, checked against what the test backends saw.
Every /metrics body goes through ``parse_prometheus``, a strict parser of the text format 0.0.4.
"""

from __future__ import annotations

import collections
import json
import math
import re
import select
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from support import (
    HOST,
    BalrsProcess,
    Client,
    DeadPort,
    TestBackend,
    build,
    free_port,
    lb_ini,
    request,
    run_balrs,
    start_balrs,
    wait_for,
)

from balrs import __version__
from balrs.admin import (
    ADMIN_CACHE_TTL,
    ADMIN_KEEPALIVE_TIMEOUT,
    ADMIN_HEAD_LIMIT,
    ADMIN_LINGER,
    ADMIN_MAX_CONNECTIONS,
    ADMIN_REQUEST_TIMEOUT,
    request_path,
)
from balrs.config import Address, BackendConfig, parse_text
from balrs.metrics import escape_label_value, format_value, render_metrics, status_document
from balrs.pool import LATENCY_BUCKETS, Backend
from balrs.reactor import Reactor
from balrs.server import Balancer

# =========================================================================================================
# A strict parser of the Prometheus text exposition format 0.0.4
# =========================================================================================================
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class PromError(AssertionError):
    pass


class Family:
    def __init__(self, name: str) -> None:
        self.name = name
        self.type = "untyped"
        self.help: str | None = None
        self.samples: List[Tuple[str, Dict[str, str], float]] = []


def _parse_labels(text: str, pos: int, line: str) -> Tuple[Dict[str, str], int]:
    """Labels from just after ``{``; returns (labels, index after ``}``)."""
    labels: Dict[str, str] = {}
    while True:
        if text[pos] == "}":
            return labels, pos + 1
        m = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"").match(text, pos)
        if not m:
            raise PromError("bad label at column %d: %r" % (pos, line))
        name = m.group(1)
        pos = m.end()
        value = []
        while True:
            if pos >= len(text):
                raise PromError("unterminated label value: %r" % line)
            c = text[pos]
            if c == "\\":
                nxt = text[pos + 1 : pos + 2]
                if nxt not in ("\\", '"', "n"):
                    raise PromError("bad escape \\%s in %r" % (nxt, line))
                value.append("\n" if nxt == "n" else nxt)
                pos += 2
            elif c == '"':
                pos += 1
                break
            elif c == "\n":
                raise PromError("raw newline in label value: %r" % line)
            else:
                value.append(c)
                pos += 1
        if name in labels:
            raise PromError("duplicate label %s: %r" % (name, line))
        labels[name] = "".join(value)
        if text[pos] == ",":
            pos += 1
        elif text[pos] != "}":
            raise PromError("expected , or } at column %d: %r" % (pos, line))


def _parse_value(text: str, line: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise PromError("bad value %r in %r" % (text, line))
    return float(text)


def _family_of(sample: str, families: Dict[str, Family]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix):
            base = sample[: -len(suffix)]
            if base in families and families[base].type in ("histogram", "summary"):
                return base
    return sample


def parse_prometheus(text: str) -> Dict[str, Family]:
    """Parse and check ``text``; raise PromError on anything a strict scraper would reject or a
    reader would call wrong. Returns the families by name."""
    if not text.endswith("\n"):
        raise PromError("the exposition does not end with a newline")
    families: Dict[str, Family] = collections.OrderedDict()
    done: set = set()  # families whose samples have ended (another family started)
    current: str | None = None
    series: set = set()
    for line in text.split("\n")[:-1]:
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _NAME.match(name):
                    raise PromError("bad metric name in %r" % line)
                fam = families.setdefault(name, Family(name))
                if name in done or (current is not None and current != name and fam.samples):
                    raise PromError("%s: metadata after its samples: %r" % (name, line))
                if parts[1] == "TYPE":
                    if len(parts) != 4 or parts[3] not in _TYPES:
                        raise PromError("bad TYPE line %r" % line)
                    if fam.samples or getattr(fam, "_typed", False):
                        raise PromError("second or late TYPE for %s" % name)
                    fam.type = parts[3]
                    fam._typed = True  # type: ignore[attr-defined]
                else:
                    if fam.help is not None:
                        raise PromError("second HELP for %s" % name)
                    fam.help = parts[3] if len(parts) == 4 else ""
                if current is not None and current != name:
                    done.add(current)
                current = name
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
        if not m:
            raise PromError("bad sample line %r" % line)
        sample = m.group(1)
        pos = m.end()
        labels: Dict[str, str] = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = _parse_labels(line, pos + 1, line)
        rest = line[pos:]
        if not rest.startswith(" "):
            raise PromError("no space before the value: %r" % line)
        fields = rest.split()
        if len(fields) not in (1, 2):
            raise PromError("bad sample line %r" % line)
        value = _parse_value(fields[0], line)
        if len(fields) == 2 and not re.fullmatch(r"-?\d+", fields[1]):
            raise PromError("bad timestamp in %r" % line)
        fname = _family_of(sample, families)
        fam = families.setdefault(fname, Family(fname))
        if fname in done:
            raise PromError("samples of %s are not contiguous: %r" % (fname, line))
        if current is not None and current != fname:
            done.add(current)
        current = fname
        key = (sample, tuple(sorted(labels.items())))
        if key in series:
            raise PromError("duplicate series %r" % line)
        series.add(key)
        if fam.type == "counter" and (value < 0 or math.isnan(value)):
            raise PromError("negative counter %r" % line)
        fam.samples.append((sample, labels, value))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    groups: Dict[Tuple[Tuple[str, str], ...], Dict[str, Any]] = collections.defaultdict(
        lambda: {"buckets": [], "sum": None, "count": None}
    )
    for sample, labels, value in fam.samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups[rest]
        if sample == fam.name + "_bucket":
            if "le" not in labels:
                raise PromError("%s bucket without le" % fam.name)
            g["buckets"].append((_parse_value(labels["le"], labels["le"]), value))
        elif sample == fam.name + "_sum":
            g["sum"] = value
        elif sample == fam.name + "_count":
            g["count"] = value
        else:
            raise PromError("%s: stray sample %s in a histogram" % (fam.name, sample))
    for rest, g in groups.items():
        buckets = g["buckets"]
        les = [le for le, _ in buckets]
        if les != sorted(les) or len(set(les)) != len(les):
            raise PromError("%s%r: le bounds not increasing: %r" % (fam.name, rest, les))
        if not les or les[-1] != math.inf:
            raise PromError("%s%r: no +Inf bucket" % (fam.name, rest))
        counts = [v for _, v in buckets]
        if counts != sorted(counts):
            raise PromError("%s%r: buckets not cumulative: %r" % (fam.name, rest, counts))
        if g["count"] is None or g["sum"] is None:
            raise PromError("%s%r: _count or _sum missing" % (fam.name, rest))
        if counts[-1] != g["count"]:
            raise PromError("%s%r: +Inf bucket %r != _count %r" % (fam.name, rest, counts[-1], g["count"]))


def value_of(fams: Dict[str, Family], name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    fname = _family_of(name, fams)
    assert fname in fams, "no metric %s in %s" % (name, sorted(fams))
    hits = [v for s, ls, v in fams[fname].samples
            if s == name and all(ls.get(k) == want for k, want in labels.items())]
    assert len(hits) == 1, "%s%r: %d samples" % (name, labels, len(hits))
    return hits[0]


class TestPromParser:
    """The parser itself must bite, or the tests built on it prove nothing."""

    GOOD = (
        "# HELP a_total Help with \\\\ and \\n.\n# TYPE a_total counter\n"
        'a_total{x="q\\"uo\\\\te\\n"} 3\na_total{x="b"} 4 1700000000000\n'
        "# TYPE h histogram\n"
        'h_bucket{le="0.1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0.3\nh_count 2\n'
    )

    def test_accepts_good(self) -> None:
        fams = parse_prometheus(self.GOOD)
        assert value_of(fams, "a_total", x='q"uo\\te\n') == 3
        assert value_of(fams, "h_count") == 2

    @pytest.mark.parametrize(
        "bad",
        [
            "a 1",  # no final newline
            'a{x="1} 1\n',  # unterminated
            'a{x="\\t"} 1\n',  # bad escape
            "a one\n",
            "a 1\nb 2\na 3\n",  # not contiguous
            "a 1\na 2\n",  # duplicate series
            "# TYPE a counter\na -1\n",
            "# TYPE a bogus\na 1\n",
            "a 1\n# TYPE a gauge\n",  # TYPE after samples
            '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
            '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',
            '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',
            '1a{x="1"} 1\n',
            'a{x="1"}1\n',
        ],
    )
    def test_rejects_bad(self, bad: str) -> None:
        with pytest.raises(PromError):
            parse_prometheus(bad)


# =========================================================================================================
# Renderers on balancer-like objects
# =========================================================================================================
REQUIRED_METRICS = (
    "balrs_backend_requests_total",
    "balrs_backend_up",
    "balrs_backend_active_requests",
    "balrs_responses_total",
    "balrs_client_connections",
)
STATUS_BACKEND_KEYS = ("name", "address", "state", "weight", "active", "requests", "failures")


def _fake_balancer(backends: Sequence[Backend], responses: Dict[int, int], health: bool = False) -> Any:
    return SimpleNamespace(
        pool=SimpleNamespace(backends=list(backends), strategy_name="round_robin", queued=2, retired=[],
                             name="default", backup=None, retries_total=5,
                             budget=SimpleNamespace(exhausted=2), panicking=True),
        client_connections=3,
        client_limited=[4, 1],
        log_dropped=0,
        accepted=17,
        draining=False,
        responses=lambda: dict(responses),
        config=SimpleNamespace(health=object() if health else None, listen=(Address("127.0.0.1", 8080),)),
    )


def _render(srv: Any, start_time: Optional[float] = None) -> str:
    return render_metrics(srv.pool, srv.config, srv, start_time)


def _status(srv: Any) -> Dict[str, Any]:
    return status_document(srv.pool, srv.config, srv)


def _backend(name: str, port: int = 9001, weight: int = 1) -> Backend:
    b = Backend(BackendConfig(name, Address("127.0.0.1", port), weight=weight), resolve_now=False)
    b.resolved = True  # as if resolved (an unresolved backend is down)
    return b


class TestRender:
    def test_label_escaping_and_values(self) -> None:
        assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
        assert format_value(3) == "3"
        assert format_value(2.0) == "2"
        assert format_value(0.25) == "0.25"
        assert format_value(math.inf) == "+Inf"
        assert format_value(-math.inf) == "-Inf"
        assert format_value(math.nan) == "NaN"
        assert format_value(True) == "1"

    def test_every_family_and_value(self) -> None:
        a, b = _backend("a"), _backend('we"ird\\name\n', 9002, weight=3)
        a.requests, a.active, a.failures = 10, 2, 1
        a.responses = [0, 0, 7, 1, 0, 2]
        for s in (0.001, 0.02, 0.02, 3.0, 99.0):
            a.observe(s, 0.0)
        a.idle.put(object(), select.poll())
        a.transitions = 4
        a.eff_weight = 1
        b.up = False
        b.ejected_until = 5.0
        srv = _fake_balancer([a, b], {200: 7, 404: 1, 502: 2})
        text = _render(srv, start_time=1700000000.5)
        fams = parse_prometheus(text)
        for name in REQUIRED_METRICS:
            assert name in fams and fams[name].help, name
        for fam in fams.values():
            assert fam.help and fam.type != "untyped", fam.name
            if fam.type == "counter":
                assert fam.name.endswith("_total"), fam.name
        weird = 'we"ird\\name\n'
        assert value_of(fams, "balrs_backend_requests_total", backend="a") == 10
        assert value_of(fams, "balrs_backend_active_requests", backend="a") == 2
        assert value_of(fams, "balrs_backend_failures_total", backend="a") == 1
        assert value_of(fams, "balrs_backend_up", backend="a") == 1
        assert value_of(fams, "balrs_backend_up", backend=weird) == 0
        assert value_of(fams, "balrs_backend_state", backend=weird, state="down") == 1
        assert value_of(fams, "balrs_backend_ejected", backend=weird) == 1
        assert value_of(fams, "balrs_backend_weight", backend=weird) == 3
        assert value_of(fams, "balrs_backend_idle_connections", backend="a") == 1
        assert value_of(fams, "balrs_backend_health_transitions_total", backend="a") == 4
        assert value_of(fams, "balrs_backend_responses_total", backend="a", **{"class": "2xx"}) == 7
        assert value_of(fams, "balrs_backend_responses_total", backend="a", **{"class": "5xx"}) == 2
        assert value_of(fams, "balrs_responses_total", code="200") == 7
        assert value_of(fams, "balrs_responses_total", code="502") == 2
        assert value_of(fams, "balrs_client_connections") == 3
        assert value_of(fams, "balrs_accepted_connections_total") == 17
        assert value_of(fams, "balrs_queue_length") == 2
        assert value_of(fams, "balrs_retries_total") == 5
        assert value_of(fams, "balrs_retries_budget_exhausted_total") == 2
        assert value_of(fams, "balrs_pool_retries_total", pool="default") == 5
        assert value_of(fams, "balrs_pool_panic", pool="default") == 1
        assert value_of(fams, "balrs_client_limited_total", limit="rate") == 4
        assert value_of(fams, "balrs_client_limited_total", limit="connections") == 1
        assert value_of(fams, "balrs_info", version=__version__) == 1
        assert value_of(fams, "balrs_start_time_seconds") == 1700000000.5
        assert value_of(fams, "balrs_backend_info", backend="a", address="127.0.0.1:9001") == 1
        # The histogram: cumulative over LATENCY_BUCKETS, +Inf = _count = 5 observations.
        h = "balrs_backend_response_seconds"
        assert fams[h].type == "histogram"
        assert value_of(fams, h + "_bucket", backend="a", le="0.005") == 1
        assert value_of(fams, h + "_bucket", backend="a", le="0.025") == 3
        assert value_of(fams, h + "_bucket", backend="a", le="5.0") == 4
        assert value_of(fams, h + "_bucket", backend="a", le="+Inf") == 5
        assert value_of(fams, h + "_count", backend="a") == 5
        assert value_of(fams, h + "_sum", backend="a") == pytest.approx(0.001 + 0.04 + 3.0 + 99.0)
        les = [ls["le"] for s, ls, _ in fams[h].samples if s == h + "_bucket" and ls["backend"] == "a"]
        assert len(les) == len(LATENCY_BUCKETS) + 1
        # An unmeasured backend has no response-time sample rather than a made-up one.
        assert value_of(fams, "balrs_backend_response_time_seconds", backend="a") > 0
        assert not [1 for s, ls, _ in fams["balrs_backend_response_time_seconds"].samples if ls["backend"] == weird]
        # Health-check metrics only when checks are configured.
        assert "balrs_backend_health_check_ok" not in fams
        fams = parse_prometheus(_render(_fake_balancer([a, b], {}, health=True)))
        assert value_of(fams, "balrs_backend_health_check_ok", backend="a") == 1
        assert fams["balrs_responses_total"].samples == []  # no responses yet: a family without samples

    def test_no_backends(self) -> None:
        fams = parse_prometheus(_render(_fake_balancer([], {})))
        assert "balrs_client_connections" in fams

    def test_status_document(self) -> None:
        a, b = _backend("a"), _backend("b", 9002, weight=2)
        a.requests, a.failures, a.active = 5, 1, 1
        a.observe(0.0125, 0.0)
        b.draining = True
        doc = _status(_fake_balancer([a, b], {200: 4}))
        json.dumps(doc)  # serialisable
        assert doc["strategy"] == "round_robin"
        assert doc["responses"] == {"200": 4}
        assert doc["client_connections"] == 3
        assert [d["name"] for d in doc["backends"]] == ["a", "b"]
        da, db = doc["backends"]
        assert list(da)[: len(STATUS_BACKEND_KEYS)] == list(STATUS_BACKEND_KEYS)
        assert (da["address"], da["state"], da["weight"], da["active"], da["requests"], da["failures"]) == (
            "127.0.0.1:9001", "up", 1, 1, 5, 1)
        assert da["response_time_ms"] == pytest.approx(12.5)
        assert db["state"] == "drain" and db["weight"] == 2 and db["response_time_ms"] is None
        assert da["last_check_ok"] is None and doc["health_checks"] is False  # no [health]
        doc = _status(_fake_balancer([a, b], {}, health=True))
        assert doc["backends"][0]["last_check_ok"] is True and doc["health_checks"] is True
        b.draining, b.up = False, False
        assert _status(_fake_balancer([a, b], {}))["backends"][1]["state"] == "down"

    def test_real_balancer_object(self) -> None:
        """The renderers read a real Balancer's attributes (catches renames in server.py/pool.py)."""
        cfg = parse_text(
            "[balancer]\nlisten = 127.0.0.1:1\n[backend x]\naddress = 127.0.0.1:2\n"
            "[admin]\nlisten = 127.0.0.1:3\n", "t.ini")
        srv = Balancer(cfg)
        try:
            srv.status_counts[200] = 3
            srv.pool.backends[0].requests = 3
            fams = parse_prometheus(_render(srv))
            assert value_of(fams, "balrs_responses_total", code="200") == 3
            assert value_of(fams, "balrs_backend_requests_total", backend="x") == 3
            doc = _status(srv)
            assert doc["backends"][0]["requests"] == 3 and doc["strategy"] == "round_robin"
        finally:
            srv.reactor.close()

    @pytest.mark.parametrize(
        "target,path",
        [(b"/metrics", b"/metrics"), (b"/metrics?x=1", b"/metrics"), (b"/status#f", b"/status"),
         (b"http://h:9/status?a", b"/status"), (b"http://h:9", b"/"), (b"*", None), (b"h:9", None),
         (b"/", b"/")],
    )
    def test_request_path(self, target: bytes, path: bytes | None) -> None:
        assert request_path(target) == path


# =========================================================================================================
# AdminServer in process, on a reactor with a fake clock
# =========================================================================================================
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def inproc() -> Iterator[Any]:
    clock = FakeClock()
    reactor = Reactor(clock)
    cfg = parse_text(
        "[balancer]\nlisten = 127.0.0.1:1\n[backend x]\naddress = 127.0.0.1:2\n"
        "[admin]\nlisten = 127.0.0.1:%d\n" % free_port(), "t.ini")
    srv = Balancer(cfg, reactor)
    assert srv.admin is not None
    srv.admin.start()
    port = srv.admin.listeners[0][0].getsockname()[1]

    def turn(times: int = 1) -> None:
        for _ in range(times):
            reactor.call_at(reactor.now, reactor.stop)
            reactor.run()

    def spin(pred: Callable[[], Any], timeout: float = 3.0) -> Any:
        end = time.monotonic() + timeout
        while True:
            turn()
            v = pred()
            if v or time.monotonic() > end:
                return v
            time.sleep(0.002)

    def connect() -> socket.socket:
        s = socket.create_connection((HOST, ns.port), timeout=2)
        s.setblocking(False)
        return s

    def read_all(s: socket.socket, timeout: float = 3.0) -> bytes:
        """Everything until the admin closes (turning the loop meanwhile)."""
        out = bytearray()
        eof = [False]

        def step() -> bool:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                return False
            if not data:
                eof[0] = True
                return True
            out.extend(data)
            return False

        assert spin(step, timeout), "admin did not close; got %r" % bytes(out[:200])
        return bytes(out)

    ns = SimpleNamespace(srv=srv, admin=srv.admin, clock=clock, reactor=reactor, port=port, turn=turn, spin=spin,
                         connect=connect, read_all=read_all)
    yield ns
    srv.admin.stop()
    reactor.close()


class TestAdminInProcess:
    def test_answers_and_closes(self, inproc: Any) -> None:
        s = inproc.connect()
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = inproc.read_all(s)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nConnection: close" in head
        assert json.loads(body)["backends"][0]["name"] == "x"
        s.close()
        assert inproc.spin(lambda: not inproc.admin.conns)

    def test_pollers_on_kept_alive_connections_share_a_recent_answer(self, inproc: Any) -> None:
        def answer(s: socket.socket, extra: bytes = b"") -> Dict[str, Any]:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra)
            buf = bytearray()

            def step() -> bool:
                try:
                    buf.extend(s.recv(65536))
                except BlockingIOError:
                    pass
                head, sep, body = bytes(buf).partition(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) if sep else -1
                return bool(sep) and len(body) >= length

            assert inproc.spin(step)
            return json.loads(bytes(buf).partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]

        backend = inproc.srv.pool.backends[0]
        poller = inproc.connect()
        first = answer(poller)  # the first request of a connection: fresh
        backend.requests += 5
        assert answer(poller)["backends"][0]["requests"] == first["backends"][0]["requests"], "not shared"
        other = inproc.connect()
        assert answer(other, b"Connection: close\r\n")["backends"][0]["requests"] == \
            first["backends"][0]["requests"] + 5, "a new connection got a cached answer"
        inproc.clock.t += ADMIN_CACHE_TTL
        inproc.turn(2)
        backend.requests += 1
        assert answer(poller)["backends"][0]["requests"] == first["backends"][0]["requests"] + 6, "stale past TTL"
        poller.close()
        other.close()

    def test_keep_alive_connection_closes_when_idle(self, inproc: Any) -> None:
        s = inproc.connect()
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert inproc.spin(lambda: inproc.admin.conns and next(iter(inproc.admin.conns)).served == 1)
        inproc.turn(3)
        assert inproc.admin.conns, "a keep-alive connection closed after its first answer"
        inproc.clock.t += ADMIN_KEEPALIVE_TIMEOUT - 0.5
        inproc.turn(3)
        assert inproc.admin.conns, "closed before its idle deadline"
        inproc.clock.t += 1.0
        assert inproc.spin(lambda: not inproc.admin.conns), "an idle keep-alive connection stayed open"
        s.close()

    def test_partial_head_times_out_with_408(self, inproc: Any) -> None:
        s = inproc.connect()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHo")
        inproc.spin(lambda: inproc.admin.conns and len(next(iter(inproc.admin.conns)).head))
        inproc.clock.t += ADMIN_REQUEST_TIMEOUT - 0.5
        inproc.turn(3)
        assert inproc.admin.conns, "closed before its deadline"
        inproc.clock.t += 1.0
        data = inproc.read_all(s)
        assert data.startswith(b"HTTP/1.1 408 ")
        # Lingering (reading what the client might still send) until the client closes ...
        inproc.turn(3)
        assert inproc.admin.conns
        s.close()
        assert inproc.spin(lambda: not inproc.admin.conns)

    def test_linger_is_bounded(self, inproc: Any) -> None:
        s = inproc.connect()
        s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        assert inproc.read_all(s).startswith(b"HTTP/1.1 200 ")
        assert inproc.admin.conns  # the client has not closed: lingering
        inproc.clock.t += ADMIN_LINGER + 0.01
        assert inproc.spin(lambda: not inproc.admin.conns)
        s.close()

    def test_idle_connection_closed_silently(self, inproc: Any) -> None:
        s = inproc.connect()
        inproc.spin(lambda: inproc.admin.conns)
        inproc.clock.t += ADMIN_REQUEST_TIMEOUT + 0.1
        assert inproc.read_all(s) == b""
        assert not inproc.admin.conns
        s.close()

    def test_connection_limit_then_resume(self, inproc: Any) -> None:
        socks = [inproc.connect() for _ in range(ADMIN_MAX_CONNECTIONS + 5)]
        inproc.spin(lambda: len(inproc.admin.conns) >= ADMIN_MAX_CONNECTIONS)
        inproc.turn(5)
        assert len(inproc.admin.conns) == ADMIN_MAX_CONNECTIONS
        assert not inproc.admin.accepting
        # The first ones time out; the waiting ones are accepted and served.
        inproc.clock.t += ADMIN_REQUEST_TIMEOUT + 0.1
        last = socks[-1]
        assert inproc.spin(lambda: inproc.admin.accepting and len(inproc.admin.conns) == 5)
        last.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert inproc.read_all(last).startswith(b"HTTP/1.1 200 ")
        for s in socks:
            s.close()

    def test_rebind(self, inproc: Any) -> None:
        old_port = inproc.port
        busy = inproc.connect()  # a connection in progress survives the rebind
        busy.sendall(b"GET /status HTTP/1.0\r\n")
        inproc.spin(lambda: inproc.admin.conns)
        taken = socket.socket()
        taken.bind((HOST, 0))
        taken.listen(1)
        new_port = free_port()
        try:
            with pytest.raises(OSError):
                inproc.admin.rebind([Address(HOST, new_port), Address(HOST, taken.getsockname()[1])])
        finally:
            taken.close()
        assert [a.port for _s, a in inproc.admin.listeners] == [old_port]  # nothing changed
        inproc.admin.rebind([Address(HOST, new_port)])
        assert [a.port for _s, a in inproc.admin.listeners] == [new_port]
        with pytest.raises(OSError):
            socket.create_connection((HOST, old_port), timeout=1).close()
        inproc.port = new_port
        s = inproc.connect()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert inproc.read_all(s).startswith(b"HTTP/1.1 200 ")
        s.close()
        busy.sendall(b"\r\n")
        assert inproc.read_all(busy).startswith(b"HTTP/1.1 200 ")
        busy.close()
        inproc.admin.rebind([Address(HOST, new_port)])  # unchanged: a no-op
        assert [a.port for _s, a in inproc.admin.listeners] == [new_port] and inproc.admin.accepting

    def test_stop_closes_everything(self, inproc: Any) -> None:
        s = inproc.connect()
        inproc.spin(lambda: inproc.admin.conns)
        inproc.admin.stop()
        assert not inproc.admin.conns and not inproc.admin.listeners
        inproc.admin.stop()  # idempotent
        s.setblocking(True)
        s.settimeout(2)
        assert s.recv(10) == b""
        with pytest.raises(OSError):
            socket.create_connection((HOST, inproc.port), timeout=1).close()
        s.close()


# =========================================================================================================
# Real balrs processes with an [admin] section
# =========================================================================================================
class AdminLB:
    def __init__(self, proc: BalrsProcess, admin: Tuple[str, int]) -> None:
        self.proc = proc
        self.addr = proc.addr
        self.admin = admin

    def get(self, path: str, method: str = "GET", headers: Sequence[Tuple[str, str]] = ()) -> Any:
        return request(self.admin, method, path, headers=headers, timeout=5)

    def metrics(self) -> Dict[str, Family]:
        r = self.get("/metrics")
        assert r.status == 200, r
        return parse_prometheus(r.body.decode("utf-8"))

    def status(self) -> Dict[str, Any]:
        r = self.get("/status")
        assert r.status == 200, r
        return r.json()


def start_admin_lb(workdir: Path, backends: Sequence[Any], name: str = "alb", **balancer: object) -> AdminLB:
    """A balrs with an [admin] section (support.start_balrs), listening on both addresses."""
    proc = start_balrs(workdir, backends, name=name, admin=True, **balancer)
    assert proc.admin_addr is not None
    return AdminLB(proc, proc.admin_addr)


@pytest.fixture
def admin_lb(tmp_path: Path) -> Iterator[Callable[..., AdminLB]]:
    made: List[AdminLB] = []
    backends: List[Any] = []

    def make(n: int = 3, dead: int = 0, **balancer: object) -> AdminLB:
        bs: List[Any] = [TestBackend("b%d" % i) for i in range(1, n + 1)]
        bs += [DeadPort("dead%d" % i) for i in range(1, dead + 1)]
        backends.extend(bs)
        lb = start_admin_lb(tmp_path, bs, name="alb%d" % len(made), **balancer)
        lb.backends = bs  # type: ignore[attr-defined]
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.proc.stop()
        assert "Traceback" not in lb.proc.log_text(), lb.proc.log_tail()
    for b in backends:
        b.stop()


class TestAdminProcess:
    def test_metrics_match_what_backends_saw(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(3)
        bs = lb.backends  # type: ignore[attr-defined]
        accepted0 = value_of(lb.metrics(), "balrs_accepted_connections_total")  # start-up probes count too
        for i in range(10):
            assert request(lb.addr, "GET", "/echo?i=%d" % i).status == 200
        assert request(lb.addr, "GET", "/status/404").status == 404
        with Client(lb.addr) as c:  # keep-alive: two requests, one connection
            for _ in range(2):
                c.send(build("GET", "/echo"))
                assert c.read_response().status == 200
        fams = lb.metrics()
        for name in REQUIRED_METRICS:
            assert name in fams, name
        seen = {b.name: len(b.reqs()) for b in bs}
        assert sum(seen.values()) == 13
        for b in bs:
            assert value_of(fams, "balrs_backend_requests_total", backend=b.name) == seen[b.name]
            assert value_of(fams, "balrs_backend_up", backend=b.name) == 1
            assert value_of(fams, "balrs_backend_active_requests", backend=b.name) == 0
            assert value_of(fams, "balrs_backend_failures_total", backend=b.name) == 0
            assert value_of(fams, "balrs_backend_response_seconds_count", backend=b.name) == seen[b.name]
            assert value_of(fams, "balrs_backend_info", backend=b.name, address=b.address) == 1
        assert value_of(fams, "balrs_responses_total", code="200") == 12
        assert value_of(fams, "balrs_responses_total", code="404") == 1
        assert sum(v for _s, _l, v in fams["balrs_backend_responses_total"].samples
                   if _l["class"] == "4xx") == 1
        assert value_of(fams, "balrs_accepted_connections_total") == accepted0 + 12
        assert value_of(fams, "balrs_queue_length") == 0
        # Every client connection is closed: the gauge comes back to 0.
        assert wait_for(lambda: value_of(lb.metrics(), "balrs_client_connections") == 0, 3.0)
        # The counters keep counting between scrapes.
        assert request(lb.addr, "GET", "/echo").status == 200
        fams2 = lb.metrics()
        assert sum(value_of(fams2, "balrs_backend_requests_total", backend=b.name) for b in bs) == 14
        assert value_of(fams2, "balrs_responses_total", code="200") == 13

    def test_open_client_connections_and_active_requests(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(1)
        b1: TestBackend = lb.backends[0]  # type: ignore[attr-defined]
        c1, c2 = Client(lb.addr), Client(lb.addr)
        try:
            c1.send(build("GET", "/delay/1000"))
            assert wait_for(b1.reqs, 3), "the request never reached b1"  # in flight from now for 1 s
            fams = lb.metrics()
            assert value_of(fams, "balrs_client_connections") == 2
            assert value_of(fams, "balrs_backend_active_requests", backend="b1") == 1
            doc = lb.status()
            assert doc["backends"][0]["active"] == 1
            assert c1.read_response().status == 200
        finally:
            c1.close()
            c2.close()

    def test_failures_counted(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(1, dead=1, retries=1)
        for _ in range(6):
            assert request(lb.addr, "GET", "/echo").status == 200
        fams = lb.metrics()
        assert value_of(fams, "balrs_backend_failures_total", backend="dead1") >= 1
        assert value_of(fams, "balrs_backend_active_requests", backend="dead1") == 0
        assert value_of(fams, "balrs_backend_requests_total", backend="b1") == len(lb.backends[0].reqs())  # type: ignore[attr-defined]
        doc = lb.status()
        dead = [d for d in doc["backends"] if d["name"] == "dead1"][0]
        assert dead["failures"] >= 1

    def test_status_json(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(2)
        bs = lb.backends  # type: ignore[attr-defined]
        for _ in range(5):
            assert request(lb.addr, "GET", "/echo").status == 200
        r = lb.get("/status")
        assert r.status == 200
        assert (r.header("Content-Type") or "").startswith("application/json")
        assert r.has_token("Connection", "close")
        doc = r.json()
        assert doc["strategy"] == "round_robin"
        assert [d["name"] for d in doc["backends"]] == [b.name for b in bs]
        for d, b in zip(doc["backends"], bs):
            for key in STATUS_BACKEND_KEYS:
                assert key in d, key
            assert d["address"] == b.address
            assert d["state"] == "up"
            assert d["weight"] == 1
            assert d["active"] == 0
            assert d["requests"] == len(b.reqs())
            assert d["failures"] == 0
            assert isinstance(d["response_time_ms"], float) and d["response_time_ms"] >= 0
            assert d["transitions"] == 0
        assert doc["responses"] == {"200": 5}

    def test_http_behaviour(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(1)
        r = lb.get("/metrics")
        assert r.status == 200
        assert (r.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
        assert r.has_token("Connection", "close")
        assert int(r.header("Content-Length") or -1) == len(r.body) > 0
        r = lb.get("/")
        assert r.status == 200 and b"/metrics" in r.body and b"/status" in r.body
        assert lb.get("/metrics?name[]=x").status == 200
        assert lb.get("http://admin.example/status").status == 200
        for path in ("/nope", "/metrics/extra", "/statusx"):
            r = lb.get(path)
            assert r.status == 404, path
            assert r.has_token("Connection", "close")
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            r = lb.get("/metrics", method=method)
            assert r.status == 405, method
            assert r.header("Allow") == "GET, HEAD"
        # HEAD: the GET's headers, no body (the strict client would see stray bytes otherwise).
        with Client(lb.admin) as c:
            c.send(build("HEAD", "/status", [("Connection", "close")]))
            r = c.read_response("HEAD")
            assert r.status == 200 and int(r.header("Content-Length") or 0) > 0
            closed, extra, _ = c.wait_closed(3)
            assert closed and extra == b""
        with Client(lb.admin) as c:
            c.send(build("HEAD", "/nope", [("Connection", "close")]))
            r = c.read_response("HEAD")
            assert r.status == 404
            assert c.wait_closed(3)[:2] == (True, b"")
        # Keep-alive by default in HTTP/1.1 (a dashboard polls on one connection); closed when asked.
        with Client(lb.admin) as c:
            c.send(build("GET", "/status"))
            r = c.read_response()
            assert r.status == 200 and not r.has_token("Connection", "close")
            c.send(build("GET", "/metrics", [("Connection", "close")]))
            r = c.read_response()
            assert r.status == 200 and r.has_token("Connection", "close")
            assert c.wait_closed(3)[0]
        # Malformed and oversized requests.
        with Client(lb.admin) as c:
            c.send(b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            assert c.read_response().status == 400
        with Client(lb.admin) as c:
            c.send(build("GET", "/status", [("X-Big", "a" * (ADMIN_HEAD_LIMIT + 10))]))
            assert c.read_response().status == 431

    def test_bad_admin_clients_do_not_hurt(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(2)
        # A connection closed at once, one reset after its request, idle ones, a partial head, one that
        # sends a request and never reads, and one that sends a request and closes without reading.
        s = socket.create_connection(lb.admin, timeout=2)
        s.close()
        s = socket.create_connection(lb.admin, timeout=2)
        s.sendall(build("GET", "/metrics"))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        idle = [socket.create_connection(lb.admin, timeout=2) for _ in range(10)]
        partial = socket.create_connection(lb.admin, timeout=2)
        partial.sendall(b"GET /metrics HTTP/1.1\r\nHost")
        noread = socket.create_connection(lb.admin, timeout=2)
        noread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        noread.sendall(build("GET", "/metrics") * 3)
        gone = socket.create_connection(lb.admin, timeout=2)
        gone.sendall(build("GET", "/status"))
        gone.close()
        try:
            t0 = time.monotonic()
            for _ in range(5):
                assert lb.get("/status").status == 200
                assert request(lb.addr, "GET", "/echo").status == 200
            assert time.monotonic() - t0 < 2.0
            # The partial head gets 408 once the admin request timeout passes; the idle ones are closed.
            partial.settimeout(ADMIN_REQUEST_TIMEOUT + 3)
            data = b""
            while True:
                piece = partial.recv(4096)
                if not piece:
                    break
                data += piece
            assert data.startswith(b"HTTP/1.1 408 "), data[:100]
            for s in idle:
                s.settimeout(3)
                assert s.recv(10) == b""
        finally:
            for s in idle + [partial, noread]:
                s.close()
        assert lb.proc.alive()
        assert lb.get("/metrics").status == 200

    def test_many_scrapes_in_parallel(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(2)
        clients = [Client(lb.admin) for _ in range(20)]
        try:
            for c in clients:
                c.send(build("GET", "/metrics", [("Connection", "close")]))
            for c in clients:
                r = c.read_response()
                assert r.status == 200
                parse_prometheus(r.body.decode("utf-8"))
        finally:
            for c in clients:
                c.close()

    def test_admin_port_taken_fails_cleanly(self, tmp_path: Path) -> None:
        b = DeadPort("b1")
        taken = socket.socket()
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            path = tmp_path / "lb.ini"
            path.write_text(lb_ini("127.0.0.1:%d" % free_port(), [b]) + "\n[admin]\nlisten = 127.0.0.1:%d\n" % port)
            rc, _out, err = run_balrs(str(path))
        finally:
            taken.close()
        assert rc == 2, err  # a start-up error like those in the file, with its line and key
        assert "Traceback" not in err
        assert "lb.ini:%d: [admin] listen: cannot listen on 127.0.0.1:%d" % (
            path.read_text().splitlines().index("listen = 127.0.0.1:%d" % port) + 1, port) in err
        assert len(err.strip().splitlines()) == 1, err

    def test_workers_answer_through_the_supervisor(self, admin_lb: Callable[..., AdminLB]) -> None:
        """workers = 2: the supervisor serves the admin port and answers for every worker (more in
        test_admin_workers.py)."""
        lb = admin_lb(1, workers=2)
        # Both workers started (one still starting is left out of an answer after 0.5 s).
        assert wait_for(lambda: lb.get("/status").status == 200 and lb.status()["workers_answered"] == 2, 10)
        for _ in range(5):
            doc = lb.status()
            assert doc["backends"][0]["name"] == "b1"
            assert doc["pid"] == lb.proc.pid
            assert doc["workers"] == 2 and doc["workers_answered"] == 2
            assert lb.proc.pid not in doc["worker_pids"] and len(set(doc["worker_pids"])) == 2
        fams = lb.metrics()
        assert value_of(fams, "balrs_info", version=__version__, pid=str(lb.proc.pid)) == 1
        assert value_of(fams, "balrs_workers") == 2

    def test_admin_stops_with_the_balancer(self, admin_lb: Callable[..., AdminLB]) -> None:
        lb = admin_lb(1)
        assert lb.get("/status").status == 200
        lb.proc.signal(15)
        assert lb.proc.wait_exit(5) == 0
        with pytest.raises(OSError):
            socket.create_connection(lb.admin, timeout=1).close()


def test_removed_backend_shows_drain_while_busy(tmp_path: Any) -> None:
    """A backend a reload removed stays in /status as "drain" while its requests finish, then goes."""
    import json
    import signal
    import threading

    from support import BalrsProcess, TestBackend, free_port, request, wait_for

    b1, b2 = TestBackend("b1"), TestBackend("b2")
    port, admin_port = free_port(), free_port()

    def ini(backends: list) -> str:
        text = "[balancer]\nlisten = 127.0.0.1:%d\n\n[admin]\nlisten = 127.0.0.1:%d\n" % (port, admin_port)
        return text + "".join("\n[backend %s]\naddress = %s\n" % (b.name, b.address) for b in backends)

    lb = BalrsProcess(tmp_path, ini([b1, b2]), port, name="drainstate").start()
    try:
        box: dict = {}
        slow = threading.Thread(target=lambda: box.setdefault("r", request(lb.addr, "GET", "/delay/1000", timeout=10)),
                                daemon=True)
        slow.start()
        assert wait_for(lambda: b1.reqs() or b2.reqs(), 3)
        busy = b1 if b1.reqs() else b2
        keep = b2 if busy is b1 else b1
        lb.config_path.write_text(ini([keep]))
        lb.signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in lb.log_text(), 3)

        def states() -> dict:
            doc = json.loads(request(("127.0.0.1", admin_port), "GET", "/status").body)
            return {b["name"]: b["state"] for b in doc["backends"]}
        assert states() == {keep.name: "up", busy.name: "drain"}
        slow.join(5)
        assert box["r"].status == 200
        assert wait_for(lambda: states() == {keep.name: "up"}, 3)
    finally:
        lb.stop()
        b1.stop()
        b2.stop()
