"""Integration: edge cases of the HTTP layer against the real ``python -m balrs`` process.

Each test here pins a fix: heads that made the old regular expressions backtrack catastrophically (the
whole event loop stalled, every other connection with it); bytes that can never become a head, answered
at once instead of at ``header_timeout``; request targets in none of RFC 9112 §3.2's forms; absolute-form
targets and their Host; empty ``Expect``; status codes 600..999 from a backend; and a pooled upstream
connection reused while it still held bytes (response desync).

Timing assertions compare against bounds far below what the old behaviour took (tens of seconds, or a
configured timeout), so they stay robust on a slow machine; nothing synchronises by sleeping.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from support import (
    HOST,
    BalrsProcess,
    Client,
    Closed,
    TestBackend,
    Timeout,
    build,
    free_port,
    hget,
    start_balrs,
)

# ---------------------------------------------------------------------------------------------------------
# helpers: a balrs with an [admin] endpoint, a raw scripted backend, a small /metrics reader


class EdgeLB:
    """A running balrs: ``addr`` is the balancer, ``admin`` the [admin] endpoint (or None)."""

    def __init__(self, proc: BalrsProcess, admin: Optional[Tuple[str, int]]) -> None:
        self.proc = proc
        self.addr = proc.addr
        self.admin = admin


def start_edge_lb(
    workdir: Path, backends: Sequence[Any], name: str = "edge", admin: bool = True, **balancer: object
) -> EdgeLB:
    """A balrs (with ``[admin] listen`` when ``admin``), listening on both (support.start_balrs)."""
    proc = start_balrs(workdir, backends, name=name, admin=admin, **balancer)
    return EdgeLB(proc, proc.admin_addr)


@pytest.fixture
def make_edge_lb(tmp_path: Path) -> Iterator[Callable[..., EdgeLB]]:
    """``make_edge_lb(backends, admin=True, **balancer_keys)``: a balrs of this test's own, stopped by PID
    in teardown (SIGTERM, then SIGKILL); its stderr must hold no traceback."""
    made: List[EdgeLB] = []

    def make(backends: Sequence[Any], admin: bool = True, **balancer: object) -> EdgeLB:
        lb = start_edge_lb(tmp_path, backends, name="edge%d" % len(made), admin=admin, **balancer)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.proc.stop()
    for lb in made:
        assert "Traceback" not in lb.proc.log_text(), lb.proc.log_tail()


class RawBackend:
    """A threaded backend on 127.0.0.1 that answers each GET with whatever ``handler`` writes.

    ``handler(backend, sock, target)`` writes the response itself and returns whether to keep reading
    requests on the connection. Requests have no body here; each head is recorded as (connection id,
    target). Everything blocking has a timeout; ``stop`` shuts every connection down."""

    def __init__(self, name: str, handler: Callable[["RawBackend", socket.socket, str], bool]) -> None:
        self.name = name
        self.handler = handler
        self.lock = threading.Lock()
        self.records: List[Tuple[int, str]] = []
        self.sent = threading.Event()  # for handlers to signal "the scripted answer is written"
        self._open: List[socket.socket] = []
        self._stopped = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, free_port()))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.address = "%s:%d" % (HOST, self.port)
        self._seq = 0
        self._thread = threading.Thread(target=self._accept_loop, name="raw-%s" % name, daemon=True)
        self._thread.start()

    def reqs(self) -> List[Tuple[int, str]]:
        with self.lock:
            return list(self.records)

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self._open)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self._seq += 1
                cid = self._seq
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock, cid), daemon=True).start()

    def _serve(self, sock: socket.socket, cid: int) -> None:
        sock.settimeout(0.2)
        buf = b""
        end = time.monotonic() + 30
        try:
            while not self._stopped.is_set() and time.monotonic() < end:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    try:
                        data = sock.recv(65536)
                    except socket.timeout:
                        continue
                    if not data:
                        return
                    buf += data
                    continue
                head, buf = buf[: i + 4], buf[i + 4 :]
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                target = parts[1].decode("latin-1") if len(parts) == 3 else ""
                with self.lock:
                    self.records.append((cid, target))
                if not self.handler(self, sock, target):
                    return
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass


def good_response(target: str) -> bytes:
    body = ("GOOD %s" % target).encode("latin-1")
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str) -> List[Tuple[str, Dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m is not None, "unparsable /metrics line %r" % line
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric(samples: List[Tuple[str, Dict[str, str], float]], name: str, **labels: str) -> Optional[float]:
    """The value of the one sample of ``name`` whose labels include ``labels``; None if there is none."""
    found = [v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, "several samples of %s%s" % (name, labels)
    return found[0] if found else None


def get_metrics(admin: Tuple[str, int]) -> List[Tuple[str, Dict[str, str], float]]:
    with Client(admin, timeout=5) as c:
        c.send(build("GET", "/metrics", [("Connection", "close")]))
        r = c.read_response()
    assert r.status == 200, r
    return metric_samples(r.body.decode("utf-8"))


def read_within(c: Client, limit: float, what: str) -> Tuple[Any, float]:
    """(response, seconds) or a test failure naming ``what`` if none arrives within ``limit``."""
    t0 = time.monotonic()
    try:
        r = c.read_response(timeout=limit)
    except Timeout:
        pytest.fail("%s: no response within %.1fs" % (what, limit))
    except Closed as exc:
        pytest.fail("%s: connection closed without a response (%s)" % (what, exc))
    return r, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------------------
# a balancer shared by the tests that only need fresh backend records: header_timeout 10s, with [admin]

HEADER_TIMEOUT = {"header_timeout": "10s", "client_timeout": "20s"}


@pytest.fixture(scope="module")
def _edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[List[EdgeLB], List[TestBackend]]]:
    bs = [TestBackend("e%d" % i) for i in (1, 2)]
    holder = [start_edge_lb(tmp_path_factory.mktemp("edge"), bs, **HEADER_TIMEOUT)]
    yield holder, bs
    for lb in holder:
        lb.proc.stop()
    for b in bs:
        b.stop()
    for lb in holder:
        assert "Traceback" not in lb.proc.log_text(), lb.proc.log_tail()


@pytest.fixture
def edge(
    _edge: Tuple[List[EdgeLB], List[TestBackend]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tuple[EdgeLB, List[TestBackend]]]:
    """(balancer, backends): two TestBackends, header_timeout 10s, an admin endpoint; records cleared."""
    holder, bs = _edge
    if not holder[-1].proc.alive():
        holder.append(start_edge_lb(tmp_path_factory.mktemp("edge"), bs, **HEADER_TIMEOUT))
    for b in bs:
        b.reset()
    yield holder[-1], bs
    assert holder[-1].proc.alive(), "balrs exited during this test; stderr:\n%s" % holder[-1].proc.log_tail()


def backend_targets(bs: Sequence[TestBackend]) -> List[str]:
    return [str(r["target"]) for b in bs for r in b.reqs()]


# ---------------------------------------------------------------------------------------------------------
# 1. no catastrophic backtracking: one adversarial head must not stall the loop for everyone else

# Before the fix, the head patterns took ~20 s (Via), ~30 s (spaces) and minutes (Content-Length) to fail
# on these, in the one event loop.
REDOS_REQUESTS: Dict[str, bytes] = {
    "via_lines": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Via: a\r\n" * 24 + b"bad\r\n\r\n",
    "blank_run": b"GET / HTTP/1.1\r\nHost:" + b" " * 60000 + b"\x01\r\n\r\n",
    "content_length_lines": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Content-Length: 1\r\n" * 30 + b"bad\r\n\r\n",
}
# The admin endpoint's head limit is 8 KiB: only the short ones fit.
REDOS_ADMIN = ["via_lines", "content_length_lines"]
REDOS_RESPONSE = b"HTTP/1.1 200 OK\r\n" + b"Keep-Alive: a\r\n" * 24 + b"bad\r\n\r\n"
PROMPT = 1.0  # seconds: what "at once" may take on a loaded machine


def _other_client_unaffected(
    lb: EdgeLB, attacker_addr: Tuple[str, int], payload: bytes, bad_status: int
) -> None:
    with Client(lb.addr, timeout=5) as b:
        b.send(build("GET", "/echo?id=warm"))
        assert b.read_response().status == 200  # B is accepted and idle on a keep-alive connection
        with Client(attacker_addr, timeout=5) as a:
            a.send(payload)
            b.send(build("GET", "/echo?id=B"))
            rb, took_b = read_within(b, 5, "the other client")
            ra, took_a = read_within(a, 5, "the adversarial head")
            assert ra.status == bad_status, ra
            assert ra.has_token("connection", "close"), ra.headers
            assert a.wait_closed(2)[0], "connection left open after the %d" % ra.status
    assert rb.status == 200 and rb.json()["target"] == "/echo?id=B", rb
    assert took_b < PROMPT, "another client's request took %.2fs while a head was being parsed" % took_b
    assert took_a < PROMPT + 1, "the adversarial head was answered after %.2fs" % took_a


@pytest.mark.parametrize("name", list(REDOS_REQUESTS))
def test_adversarial_request_head_does_not_stall_others(
    make_backend: Callable[..., TestBackend], make_edge_lb: Callable[..., EdgeLB], name: str
) -> None:
    lb = make_edge_lb([make_backend("b1")], admin=False)
    _other_client_unaffected(lb, lb.addr, REDOS_REQUESTS[name], 400)


@pytest.mark.parametrize("name", REDOS_ADMIN)
def test_adversarial_admin_head_does_not_stall_proxying(
    make_backend: Callable[..., TestBackend], make_edge_lb: Callable[..., EdgeLB], name: str
) -> None:
    lb = make_edge_lb([make_backend("b1")])
    assert lb.admin is not None
    _other_client_unaffected(lb, lb.admin, REDOS_REQUESTS[name], 400)


def test_adversarial_response_head_502_and_does_not_stall_others(
    make_edge_lb: Callable[..., EdgeLB],
) -> None:
    def handler(be: RawBackend, sock: socket.socket, target: str) -> bool:
        if target == "/bad-head":
            sock.sendall(REDOS_RESPONSE)
            be.sent.set()
            return False
        sock.sendall(good_response(target))
        return True

    raw = RawBackend("raw", handler)
    try:
        lb = make_edge_lb([raw], admin=False, backend_timeout="10s")
        with Client(lb.addr, timeout=5) as b, Client(lb.addr, timeout=5) as a:
            b.send(build("GET", "/warm"))
            assert b.read_response().body == b"GOOD /warm"
            a.send(build("GET", "/bad-head"))
            assert raw.sent.wait(5), "the request never reached the backend"
            # balrs now has (or is about to read) the adversarial response head.
            b.send(build("GET", "/ok"))
            rb, took_b = read_within(b, 5, "the request next to the bad response")
            ra, took_a = read_within(a, 5, "the request answered with the adversarial head")
        assert rb.status == 200 and rb.body == b"GOOD /ok", rb
        assert took_b < PROMPT, "a request took %.2fs while a response head was being parsed" % took_b
        assert ra.status == 502, ra
        assert took_a < PROMPT + 1, "the 502 came after %.2fs" % took_a
    finally:
        raw.stop()


# ---------------------------------------------------------------------------------------------------------
# 2. early rejection: what can never become a valid head is answered 400 at once, not at header_timeout

EARLY: Dict[str, bytes] = {
    "bare_cr_ending_request_line": b"GET /x HTTP/1.0\r\r",
    "control_byte_in_unfinished_head": b"GET / HTTP/1.1\r\nHost: a\r\n\x01",
    "field_line_without_colon": b"GET / HTTP/1.1\r\nbad line\r\n",
    "bare_cr_before_request_line_unfinished": b"\rGET / HTTP/1.1\r\n",
    "bare_cr_before_request_line_complete": b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", list(EARLY))
def test_hopeless_head_rejected_at_once(edge: Tuple[EdgeLB, List[TestBackend]], name: str) -> None:
    lb, bs = edge
    with Client(lb.addr, timeout=5) as c:
        c.send(EARLY[name])
        r, took = read_within(c, 3, "%r (header_timeout is 10s)" % EARLY[name])
        assert r.status == 400, r
        assert r.has_token("connection", "close"), r.headers
        assert r.header("x-backend") is None
        closed, extra, _ = c.wait_closed(2)
    assert took < PROMPT, "400 after %.2fs" % took
    assert closed and extra == b"", "connection not closed after the 400 (then got %r)" % extra[:80]
    assert backend_targets(bs) == []


# ---------------------------------------------------------------------------------------------------------
# 3. request targets in none of RFC 9112 §3.2's forms

BAD_TARGETS: Dict[str, Tuple[str, str]] = {
    "fragment": ("GET", "/item/7#frag"),
    "relative": ("GET", "rel/path"),
    "asterisk_not_options": ("GET", "*"),
    "absolute_empty_authority": ("GET", "http:///x"),
    "absolute_userinfo": ("GET", "http://user@evil.example/x"),
    "absolute_other_scheme": ("GET", "ftp://example.com/x"),
}


@pytest.mark.parametrize("name", list(BAD_TARGETS))
def test_request_target_in_no_form_rejected(edge: Tuple[EdgeLB, List[TestBackend]], name: str) -> None:
    lb, bs = edge
    method, target = BAD_TARGETS[name]
    with Client(lb.addr, timeout=5) as c:
        c.send(build(method, target))
        r, _ = read_within(c, 3, "%s %s" % (method, target))
    assert r.status == 400, "%s %s answered %s" % (method, target, r.status)
    assert r.header("x-backend") is None
    assert backend_targets(bs) == [], "%s %s reached a backend" % (method, target)


def test_options_asterisk_reaches_a_backend(edge: Tuple[EdgeLB, List[TestBackend]]) -> None:
    lb, bs = edge
    with Client(lb.addr, timeout=5) as c:
        c.send(build("OPTIONS", "*"))
        r, _ = read_within(c, 3, "OPTIONS *")
    assert r.status == 200 and r.header("x-backend") is not None, r
    j = r.json()
    assert (j["method"], j["target"]) == ("OPTIONS", "*")
    assert backend_targets(bs) == ["*"]


# ---------------------------------------------------------------------------------------------------------
# 4. absolute-form: forwarded in origin-form with its authority as the one Host (RFC 9112 §3.2.2)


def test_absolute_form_authority_replaces_host(edge: Tuple[EdgeLB, List[TestBackend]]) -> None:
    lb, bs = edge
    with Client(lb.addr, timeout=5) as c:
        c.send(b"GET http://evil.example/admin?q=1 HTTP/1.1\r\nHost: good.example\r\n\r\n")
        r, _ = read_within(c, 3, "absolute-form request")
    assert r.status == 200, r
    j = r.json()
    assert (j["method"], j["target"], j["version"]) == ("GET", "/admin?q=1", "HTTP/1.1"), j
    hosts = [v for n, v in j["headers"] if n.lower() == "host"]
    assert hosts == ["evil.example"], "Host headers at the backend: %s" % hosts
    assert hget(j["headers"], "x-forwarded-host") == "evil.example", j["headers"]
    recs = [x for b in bs for x in b.reqs()]
    assert len(recs) == 1 and recs[0]["raw_head"].startswith(b"GET /admin?q=1 HTTP/1.1\r\n"), recs


def test_absolute_form_http10_without_host(edge: Tuple[EdgeLB, List[TestBackend]]) -> None:
    lb, _ = edge
    with Client(lb.addr, timeout=5) as c:
        c.send(b"GET http://example.com:80/abs?q HTTP/1.0\r\n\r\n")
        r, _ = read_within(c, 3, "HTTP/1.0 absolute-form request")
    assert r.status == 200, r
    j = r.json()
    assert (j["target"], j["version"]) == ("/abs?q", "HTTP/1.1"), j
    hosts = [v for n, v in j["headers"] if n.lower() == "host"]
    assert hosts == ["example.com:80"], "Host headers at the backend: %s" % hosts


# ---------------------------------------------------------------------------------------------------------
# 5. an empty Expect expects nothing (RFC 9110 §5.6.1: empty list elements are ignored)


@pytest.mark.parametrize("value", [b"", b" ", b", ,"])
def test_empty_expect_forwarded(edge: Tuple[EdgeLB, List[TestBackend]], value: bytes) -> None:
    lb, bs = edge
    body = b"hello expect"
    with Client(lb.addr, timeout=5) as c:
        c.send(b"PUT /echo?id=expect HTTP/1.1\r\nHost: lb.test\r\nExpect:%s\r\nContent-Length: %d\r\n\r\n%s"
               % (value, len(body), body))
        r, _ = read_within(c, 3, "PUT with Expect: %r" % value)
    assert r.status == 200, "Expect: %r answered %s" % (value, r.status)
    assert r.json()["body_len"] == len(body)
    assert backend_targets(bs) == ["/echo?id=expect"]


def test_unknown_expectation_still_417(edge: Tuple[EdgeLB, List[TestBackend]]) -> None:
    lb, bs = edge
    with Client(lb.addr, timeout=5) as c:
        c.send(build("PUT", "/echo?id=foo", [("Expect", "foo")], b"hello"))
        r, _ = read_within(c, 3, "PUT with Expect: foo")
    assert r.status == 417, r
    assert backend_targets(bs) == []


# ---------------------------------------------------------------------------------------------------------
# 6. status codes 600..999 are forwarded (counted as 5xx, not as a backend failure)


def test_status_600_and_999_forwarded_and_counted(
    make_backend: Callable[..., TestBackend], make_edge_lb: Callable[..., EdgeLB]
) -> None:
    b1 = make_backend("b1")
    lb = make_edge_lb([b1], backend_timeout="5s")
    assert lb.admin is not None
    for st in (600, 999):
        with Client(lb.addr, timeout=8) as c:
            c.send(build("GET", "/status/%d" % st))
            r, took = read_within(c, 7, "GET /status/%d" % st)
        assert r.status == st and r.header("x-backend") == "b1", r
        assert r.raw_head.startswith(b"HTTP/1.1 %d " % st), r.raw_head[:40]
        assert r.body == b"status %d\n" % st
        assert took < PROMPT, "status %d forwarded after %.2fs" % (st, took)
    samples = get_metrics(lb.admin)
    assert metric(samples, "balrs_responses_total", code="600") == 1
    assert metric(samples, "balrs_responses_total", code="999") == 1
    assert metric(samples, "balrs_backend_responses_total", backend="b1", **{"class": "5xx"}) == 2
    assert metric(samples, "balrs_backend_failures_total", backend="b1") == 0
    assert lb.proc.alive()


# ---------------------------------------------------------------------------------------------------------
# 7. response desync: a response that ends exactly on a full upstream read, with more bytes behind it

EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


def poison_response(total: int) -> bytes:
    """A 200 of exactly ``total`` bytes, head included."""
    n = total
    for _ in range(3):  # the digits of the length change the head's length; settle
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
        n = total - len(head)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
    assert len(head) + n == total
    return head + b"P" * n


@pytest.mark.parametrize("total", [131072, 65536])
def test_bytes_after_a_response_never_answer_the_next_request(
    make_edge_lb: Callable[..., EdgeLB], total: int
) -> None:
    poison = poison_response(total)

    def handler(be: RawBackend, sock: socket.socket, target: str) -> bool:
        if target == "/poison":
            sock.sendall(poison + EVIL)  # one write: a response, then a second one nobody asked for
        else:
            sock.sendall(good_response(target))
        return True

    raw = RawBackend("raw", handler)
    try:
        lb = make_edge_lb([raw], admin=False)
        for i in range(10):
            with Client(lb.addr, timeout=5) as c:
                c.send(build("GET", "/poison") + build("GET", "/2?i=%d" % i))
                r1, _ = read_within(c, 4, "try %d: GET /poison" % i)
                r2, _ = read_within(c, 4, "try %d: GET /2 after /poison" % i)
            assert r1.status == 200 and r1.complete and r1.body_len == len(poison) - poison.index(b"\r\n\r\n") - 4
            assert r2.body != b"EVIL", "try %d: the bytes after the /poison response answered GET /2" % i
            assert r2.status == 200 and r2.body == b"GOOD /2?i=%d" % i, "try %d: %r %r" % (i, r2, r2.body[:60])
    finally:
        raw.stop()
