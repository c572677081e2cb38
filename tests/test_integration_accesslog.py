"""Integration: the contract's "Logs" section against the real ``python -m balrs`` process.

``[log] access = PATH``, ``format = common | combined | json``, ``request_id = X-Request-ID`` and
SIGUSR1 (logrotate), with real backends on 127.0.0.1. Lines are written by a writer thread after the
response, so every check polls the log file for the line it expects, with a deadline; nothing waits
by sleeping. "No extra line" is shown with a barrier: one more request, whose line must come next.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest
from support import (
    HOST,
    BalrsProcess,
    Client,
    StartError,
    TestBackend,
    build,
    chunk_encode,
    free_port,
    lb_ini,
    listens,
    request,
    run_balrs,
    wait_for,
)

# The deadline for one line to reach the file (the writer batches every 20 ms; a loaded machine is slow).
LINE_TIMEOUT = 5.0
JSON_FIELDS = (
    "time", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms", "pool",
    "backend", "route", "retries", "request_id", "end",
)
# A request id balrs makes: 64 random bits in hex, then a counter in hex (accesslog.RequestIds).
GENERATED_ID = re.compile(r"^[0-9a-f]{16}-[0-9a-f]+$")
COMBINED = re.compile(r'^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+|-) "([^"]*)" "([^"]*)"$')
COMMON = re.compile(r'^(\S+) - (\S+) \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+|-)$')
CLF_TIME = "%d/%b/%Y:%H:%M:%S %z"
RID = "X-Request-ID"


# ---------------------------------------------------------------------------------------------------------
# helpers: a balrs with a [log] section, and reading its access log


class LoggedLB:
    """A running balrs and its access log file."""

    def __init__(self, proc: BalrsProcess, access: Path) -> None:
        self.proc = proc
        self.addr = proc.addr
        self.access = access

    def raw_lines(self, path: Optional[Path] = None) -> List[bytes]:
        """The complete lines of the access log (or of ``path``) so far, without their b"\\n"."""
        try:
            data = (path or self.access).read_bytes()
        except FileNotFoundError:
            return []
        return data.split(b"\n")[:-1]  # a last piece without its newline is still being written

    def lines(self, path: Optional[Path] = None) -> List[str]:
        return [ln.decode("ascii") for ln in self.raw_lines(path)]  # every format writes ASCII only

    def wait_lines(self, n: int, path: Optional[Path] = None, timeout: float = LINE_TIMEOUT) -> List[str]:
        """Wait for at least ``n`` complete lines; fail with what is there (and balrs' stderr)."""
        got = wait_for(lambda: len(self.raw_lines(path)) >= n and self.raw_lines(path), timeout)
        assert got and len(got) >= n, "expected %d line(s) in %s, have:\n%s\nstderr:\n%s" % (
            n, path or self.access, "\n".join(self.lines(path)), self.proc.log_tail())
        return self.lines(path)

    def wait_json(self, n: int, path: Optional[Path] = None) -> List[Dict[str, Any]]:
        return [json.loads(ln) for ln in self.wait_lines(n, path)]

    def barrier(self, n_before: int, path: Optional[Path] = None) -> None:
        """Exactly ``n_before`` lines were written before now: one more request's line comes next."""
        r = request(self.addr, "GET", "/barrier")
        assert r.status == 200
        lines = self.wait_lines(n_before + 1, path)
        assert len(lines) == n_before + 1, "extra lines:\n%s" % "\n".join(lines)
        assert "/barrier" in lines[-1], lines


MakeBackend = Callable[..., TestBackend]
MakeLogged = Callable[..., LoggedLB]


def _log_section(access: Path, fmt: str, request_id: Optional[str]) -> str:
    text = "\n[log]\naccess = %s\nformat = %s\n" % (access, fmt)
    if request_id is not None:
        text += "request_id = %s\n" % request_id
    return text


@pytest.fixture
def make_logged(tmp_path: Path) -> Iterator[Callable[..., LoggedLB]]:
    """``make_logged(backends, fmt="json", request_id=RID, **balancer_keys)``: a balrs of this test's
    own writing its access log to a file in ``tmp_path``; stopped by PID in teardown (SIGTERM, then
    SIGKILL); its stderr must hold no traceback."""
    made: List[LoggedLB] = []

    def make(backends: Sequence[Any], fmt: str = "json", request_id: Optional[str] = RID,
             **balancer: object) -> LoggedLB:
        n = len(made)
        access = tmp_path / ("access%d.log" % n)
        last: Exception = StartError("not started")
        for attempt in range(3):  # a new port if the chosen one was taken meanwhile (as start_balrs)
            port = free_port()
            text = lb_ini("127.0.0.1:%d" % port, backends, **balancer) + _log_section(access, fmt, request_id)
            proc = BalrsProcess(tmp_path, text, port, name="log%d-%d" % (n, attempt))
            try:
                proc.start()
            except StartError as exc:
                proc.kill()
                last = exc
                if "in use" in str(exc).lower():
                    continue
                raise
            lb = LoggedLB(proc, access)
            made.append(lb)
            return lb
        raise last

    yield make
    for lb in made:
        lb.proc.stop()
    for lb in made:
        assert "Traceback" not in lb.proc.log_text(), lb.proc.log_tail()


def backend_rids(rec: Dict[str, Any]) -> List[str]:
    """Every X-Request-ID field line the backend received on one request."""
    return [v for n, v in rec["headers"] if n.lower() == RID.lower()]


def rst_close(c: Client) -> None:
    """Close with a TCP reset (SO_LINGER 0): an abort, not the half-close HTTP allows after a request."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                data = f.read()
        except OSError:
            continue
        if int(data.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


class IdEchoBackend:
    """A backend that answers every request with ``X-Request-ID: <the id it received>`` (as services
    that propagate request ids do), on connections it closes after one response."""

    def __init__(self, name: str = "echo-id") -> None:
        self.name = name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, free_port()))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.address = "%s:%d" % (HOST, self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with sock:
                sock.settimeout(5)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        data = sock.recv(65536)
                        if not data:
                            break
                        head += data
                    ids = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                           if ln.lower().startswith(RID.lower().encode() + b":")]
                    sock.sendall(b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: %s\r\n" % (RID.encode(), i) for i in ids)
                                 + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(2)


# ---------------------------------------------------------------------------------------------------------
# 1. json: every field, right for a plain 200


def test_json_line_has_every_field_right_for_a_plain_200(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    sent = build("GET", "/echo/x?a=1&b=two%20words",
                 [("User-Agent", "suite-ua/1.0"), ("Referer", "http://ref.test/p"), ("Connection", "close")])
    before = datetime.now(timezone.utc)
    with Client(lb.addr) as c:
        c.send(sent)
        r = c.read_response()
    assert r.status == 200 and r.complete

    (line,) = lb.wait_json(1)
    missing = [k for k in JSON_FIELDS if k not in line]
    assert not missing, (missing, line)
    when = datetime.fromisoformat(line["time"])
    assert when.tzinfo is not None and before - timedelta(seconds=2) <= when <= datetime.now(timezone.utc), line
    assert line["client"] == "127.0.0.1"
    assert (line["method"], line["path"], line["status"]) == ("GET", "/echo/x?a=1&b=two%20words", 200)
    assert line["bytes_in"] == len(sent)
    # What went to the client, head included (the strict client kept the head's exact bytes).
    assert line["bytes_out"] == len(r.raw_head) + len(r.body) >= len(r.body) > 0
    assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 5000
    assert (line["pool"], line["backend"], line["route"], line["retries"], line["end"]) == (
        "default", "b1", None, 0, "ok")
    assert line["request_id"] == r.header(RID) and GENERATED_ID.match(line["request_id"]), line
    assert (line["user_agent"], line["referer"], line["host"]) == ("suite-ua/1.0", "http://ref.test/p", "lb.test")


def test_json_counts_request_body_and_waits_for_a_slow_backend(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    body = b"q" * 5000
    sent = build("POST", "/delay/150", [("Connection", "close")], body)
    with Client(lb.addr) as c:
        c.send(sent)
        r = c.read_response()
    assert r.status == 200 and r.json()["body_len"] == len(body)
    chunked = build("POST", "/up", [("Transfer-Encoding", "chunked"), ("Connection", "close")]) + chunk_encode(
        [b"a" * 100, b"b" * 900])
    with Client(lb.addr) as c:
        c.send(chunked)
        r2 = c.read_response()
    assert r2.status == 200 and r2.json()["body_len"] == 1000

    first, second = lb.wait_json(2)
    assert first["bytes_in"] == len(sent) and first["method"] == "POST"
    assert 150 <= first["duration_ms"] < 5000, first  # the exchange lasted the backend's delay
    assert first["bytes_out"] == len(r.raw_head) + len(r.body)
    assert second["bytes_in"] == len(chunked), second  # head and the chunked framing as received


# ---------------------------------------------------------------------------------------------------------
# 2. how exchanges end


def test_end_client_abort(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], backend_timeout="10s")
    c = Client(lb.addr)
    c.send(build("GET", "/hang?who=aborter"))
    assert wait_for(lambda: b1.reqs(), 5), "the request never reached the backend"
    rst_close(c)
    (line,) = lb.wait_json(1)
    assert (line["end"], line["status"]) == ("client-abort", 0), line  # no response: status 0
    assert (line["path"], line["backend"]) == ("/hang?who=aborter", "b1")
    assert line["bytes_out"] == 0
    # The upstream connection went with the client (the backend's /hang sees its close).
    assert wait_for(lambda: b1.open_conns() == 0, 5)


def test_end_backend_timeout(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], backend_timeout="400ms", retries=0)
    r = request(lb.addr, "GET", "/hang?who=timeout", timeout=5)
    assert r.status == 504
    (line,) = lb.wait_json(1)
    assert (line["status"], line["end"], line["backend"]) == (504, "backend-timeout", "b1"), line
    assert line["duration_ms"] >= 400
    assert line["request_id"] == r.header(RID)


def test_end_backend_error_502(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    dead = make_backend("d1", kind="dead")
    lb = make_logged([dead], retries=0)
    r = request(lb.addr, "GET", "/nowhere?x=1")
    assert r.status == 502
    (line,) = lb.wait_json(1)
    assert (line["status"], line["end"], line["retries"]) == (502, "backend-error", 0), line
    assert line["backend"] == "d1" and line["path"] == "/nowhere?x=1"
    assert line["bytes_out"] == len(r.raw_head) + len(r.body)


REJECTED = [
    ("cl-and-te", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n  b\r\n\r\n"),
    ("bad-chunk-size", b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
]


def test_end_rejected(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    for i, (name, data) in enumerate(REJECTED):
        with Client(lb.addr) as c:
            c.send(data)
            r = c.read_response()
        assert r.status == 400, name
        line = lb.wait_json(i + 1)[i]
        assert (line["status"], line["end"]) == (400, "rejected"), (name, line)
        assert line["bytes_out"] == len(r.raw_head) + len(r.body), (name, line)
        assert line["bytes_in"] > 0, (name, line)
    lb.barrier(len(REJECTED))


def test_end_client_timeout(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], header_timeout="300ms")
    with Client(lb.addr) as c:
        c.send(b"GET /half HTTP/1.1\r\nHost: a\r\n")  # never finished
        r = c.read_response(timeout=5)
    assert r.status == 408
    (line,) = lb.wait_json(1)
    assert (line["status"], line["end"]) == (408, "client-timeout"), line


def test_retry_is_counted(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    dead, good = make_backend("d1", kind="dead"), make_backend("g1")
    lb = make_logged([dead, good], retries=1)
    # Round robin starts on d1 (the first backend): at least one of two requests is refused there first.
    for _ in range(2):
        assert request(lb.addr, "GET", "/retry").status == 200
    lines = lb.wait_json(2)
    assert all((ln["status"], ln["end"], ln["backend"]) == (200, "ok", "g1") for ln in lines), lines
    assert {ln["retries"] for ln in lines} <= {0, 1} and any(ln["retries"] == 1 for ln in lines), lines


# ---------------------------------------------------------------------------------------------------------
# 3. combined and common: nginx's lines, and hostile bytes escaped


def _check_clf_time(text: str) -> None:
    when = datetime.strptime(text, CLF_TIME)
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60, text


def test_combined_is_nginx_format(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], fmt="combined")
    r = request(lb.addr, "GET", "/echo?mark=c1", [("Referer", "http://ref.test/p"), ("User-Agent", "suite-ua/1.0")])
    assert r.status == 200
    r2 = request(lb.addr, "GET", "/plain")  # no Referer, no User-Agent
    assert r2.status == 200
    first, second = lb.wait_lines(2)
    m = COMBINED.match(first)
    assert m, first
    assert m.group(1, 2, 4, 5, 7, 8) == (
        "127.0.0.1", "-", "GET /echo?mark=c1 HTTP/1.1", "200", "http://ref.test/p", "suite-ua/1.0")
    _check_clf_time(m.group(3))
    assert int(m.group(6)) == len(r.raw_head) + len(r.body)
    m2 = COMBINED.match(second)
    assert m2 and m2.group(4, 7, 8) == ("GET /plain HTTP/1.1", "-", "-"), second


def test_common_format(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], fmt="common")
    r = request(lb.addr, "GET", "/echo?mark=n1", [("User-Agent", 'ev"il\\\xff')])
    assert r.status == 200
    r204 = request(lb.addr, "GET", "/status/204")
    assert r204.status == 204
    first, second = lb.wait_lines(2)
    m = COMMON.match(first)
    assert m, first
    assert m.group(1, 2, 4, 5) == ("127.0.0.1", "-", "GET /echo?mark=n1 HTTP/1.1", "200")
    _check_clf_time(m.group(3))
    assert int(m.group(6)) == len(r.raw_head) + len(r.body)
    assert "ev" not in first  # common has no User-Agent
    assert COMMON.match(second), second


HOSTILE_TARGETS = ['/q"uote', "/back\\slash", '/both"\\"?k="v"']
HOSTILE_UA = 'ua "quoted" \\back\\ \xff\xc3\xa9\ttab'
HOSTILE_UA_ESCAPED = r"ua \x22quoted\x22 \x5Cback\x5C \xFF\xC3\xA9\x09tab"


@pytest.mark.parametrize("fmt", ["combined", "common"])
def test_hostile_bytes_are_escaped(
    make_backend: MakeBackend, make_logged: MakeLogged, fmt: str
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], fmt=fmt)
    pattern = COMBINED if fmt == "combined" else COMMON
    sent = []
    for target in HOSTILE_TARGETS:
        with Client(lb.addr) as c:
            c.send(("GET %s HTTP/1.1\r\nHost: a\r\nUser-Agent: %s\r\nReferer: r\"\\\x80\r\n"
                    "Connection: close\r\n\r\n" % (target, HOSTILE_UA)).encode("latin-1"))
            sent.append(c.read_response().status)
    # A target byte >= 0x80 is refused (RFC 9112 §3.2): still one line, with the request line escaped
    # (or "-" when none was parsed).
    with Client(lb.addr) as c:
        c.send(b"GET /hi\xffgh HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\n\r\n")
        assert c.read_response().status == 400
    lines = lb.wait_lines(len(HOSTILE_TARGETS) + 1)
    for target, status, line in zip(HOSTILE_TARGETS, sent, lines):
        m = pattern.match(line)
        assert m, line
        assert status == 200 and m.group(5) == "200", line
        escaped = target.replace("\\", r"\x5C").replace('"', r"\x22")
        assert m.group(4) == "GET %s HTTP/1.1" % escaped, line
        if fmt == "combined":
            assert m.group(7) == r"r\x22\x5C\x80" and m.group(8) == HOSTILE_UA_ESCAPED, line
    m = pattern.match(lines[-1])
    assert m and m.group(4) in ("-", r"GET /hi\xFFgh HTTP/1.1") and m.group(5) == "400", lines[-1]
    lb.barrier(len(HOSTILE_TARGETS) + 1)


def test_json_escapes_hostile_bytes(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    with Client(lb.addr) as c:
        c.send(('GET /j"s\\on HTTP/1.1\r\nHost: a\r\nUser-Agent: %s\r\nConnection: close\r\n\r\n'
                % HOSTILE_UA).encode("latin-1"))
        assert c.read_response().status == 200
    raw = lb.wait_lines(1)
    assert len(raw) == 1 and raw[0].isascii()
    line = json.loads(raw[0])
    assert line["path"] == '/j"s\\on'
    # Valid UTF-8 stays as text; an octet that is not UTF-8 becomes the text \xHH.
    assert line["user_agent"] == 'ua "quoted" \\back\\ \\xffé\ttab', line["user_agent"]


# ---------------------------------------------------------------------------------------------------------
# 4. request ids


def test_generated_request_id_goes_upstream_back_and_into_the_log(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    r1 = request(lb.addr, "GET", "/gen/1")
    r2 = request(lb.addr, "GET", "/gen/2")
    ids = []
    for r in (r1, r2):
        assert r.status == 200
        (rid,) = r.header_all(RID)
        assert GENERATED_ID.match(rid), rid
        assert backend_rids(r.json()) == [rid]
        ids.append(rid)
    assert ids[0] != ids[1]
    assert [ln["request_id"] for ln in lb.wait_json(2)] == ids
    assert [backend_rids(rec) for rec in b1.reqs()] == [[i] for i in ids]


@pytest.mark.parametrize("client_id", ["abc-123.x:y_z", "A" * 128, "0"])
def test_valid_client_request_id_is_kept(
    make_backend: MakeBackend, make_logged: MakeLogged, client_id: str
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    r = request(lb.addr, "GET", "/keep", [(RID, client_id)])
    assert r.status == 200
    assert r.header_all(RID) == [client_id]
    (rec,) = b1.reqs()
    assert backend_rids(rec) == [client_id]
    (line,) = lb.wait_json(1)
    assert line["request_id"] == client_id


@pytest.mark.parametrize("client_id", ["has space", "B" * 129, "semi;colon", "slash/id"])
def test_invalid_client_request_id_is_replaced(
    make_backend: MakeBackend, make_logged: MakeLogged, client_id: str
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    # The field spelled in another case is the same field (RFC 9110 §5.1).
    r = request(lb.addr, "GET", "/replace", [("x-request-id", client_id)])
    assert r.status == 200
    (rid,) = r.header_all(RID)
    assert rid != client_id and GENERATED_ID.match(rid), rid
    (rec,) = b1.reqs()
    assert backend_rids(rec) == [rid], rec["headers"]
    (line,) = lb.wait_json(1)
    assert line["request_id"] == rid


def test_second_client_request_id_is_not_forwarded(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    r = request(lb.addr, "GET", "/two-ids", [(RID, "good-1"), (RID, "bad one")])
    assert r.status == 200 and r.header_all(RID) == ["good-1"]
    assert lb.wait_json(1)[0]["request_id"] == "good-1"
    (rec,) = b1.reqs()
    assert backend_rids(rec) == ["good-1"], rec["headers"]


def test_response_carries_one_request_id_when_the_backend_echoes_it(
    make_logged: MakeLogged
) -> None:
    echo = IdEchoBackend()
    try:
        lb = make_logged([echo])
        r = request(lb.addr, "GET", "/echo-id", [(RID, "mine-1")])
        assert r.status == 200 and r.body == b"ok"
        assert lb.wait_json(1)[0]["request_id"] == "mine-1"
        assert r.header_all(RID) == ["mine-1"], r.headers
    finally:
        echo.stop()


def test_request_id_off_adds_nothing(make_backend: MakeBackend, make_logged: MakeLogged) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], request_id=None)
    r = request(lb.addr, "GET", "/no-id")
    assert r.status == 200 and r.header(RID) is None
    (rec,) = b1.reqs()
    assert backend_rids(rec) == []
    # A client's own field is an ordinary end-to-end field then: passed on, not echoed.
    r2 = request(lb.addr, "GET", "/own-id", [(RID, "client-1")])
    assert r2.header(RID) is None and backend_rids(r2.json()) == ["client-1"]
    lines = lb.wait_json(2)
    assert [ln["request_id"] for ln in lines] == [None, None], lines


def test_request_id_on_error_responses_balrs_makes(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    dead = make_backend("d1", kind="dead")
    lb = make_logged([dead], retries=0)
    r = request(lb.addr, "GET", "/err/gen")
    assert r.status == 502
    (rid,) = r.header_all(RID)
    assert GENERATED_ID.match(rid), rid
    r2 = request(lb.addr, "GET", "/err/client", [(RID, "abc-123.x:y_z")])
    assert r2.status == 502 and r2.header_all(RID) == ["abc-123.x:y_z"]
    lines = lb.wait_json(2)
    assert [(ln["status"], ln["request_id"]) for ln in lines] == [(502, rid), (502, "abc-123.x:y_z")], lines


# ---------------------------------------------------------------------------------------------------------
# 5. SIGUSR1 reopens the file (logrotate)


def _rotate(lb: LoggedLB, wait_for_events: int) -> Path:
    old = Path(str(lb.access) + ".1")
    os.rename(lb.access, old)
    mark = lb.proc.log_mark()
    lb.proc.signal(signal.SIGUSR1)
    lb.proc.wait_log("reopening the access log", count=wait_for_events, since=mark)
    return old


def test_sigusr1_reopens_the_access_log(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    for i in range(2):
        assert request(lb.addr, "GET", "/before/%d" % i).status == 200
    before = lb.wait_lines(2)
    old = _rotate(lb, 1)
    for i in range(3):
        assert request(lb.addr, "GET", "/after/%d" % i).status == 200
    after = lb.wait_json(3)
    assert [ln["path"] for ln in after] == ["/after/0", "/after/1", "/after/2"]
    assert lb.lines(old) == before  # the rotated file keeps the earlier lines, and only them
    lb.barrier(3)
    assert lb.lines(old) == before
    assert lb.proc.alive()


def test_sigusr1_reopens_in_every_worker(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1], workers=2)
    # Each worker installs its handlers before it listens: until then SIGUSR1 is ignored.
    assert wait_for(lambda: len(children(lb.proc.pid)) == 2
                    and all(listens(p, lb.proc.port) for p in children(lb.proc.pid)), 5), lb.proc.log_tail()

    def serve_until_both_workers_wrote(path: Path, tag: str) -> List[Dict[str, Any]]:
        # A generated id starts with its process's random prefix: it tells the workers apart.
        for i in range(80):
            assert request(lb.addr, "GET", "/%s/%d" % (tag, i)).status == 200
            lines = lb.wait_json(i + 1, path)
            if len({ln["request_id"].split("-")[0] for ln in lines}) == 2:
                return lines
        raise AssertionError("80 new connections never reached both workers")

    before = serve_until_both_workers_wrote(lb.access, "before")
    old = _rotate(lb, 2)
    assert "supervisor: SIGUSR1" in lb.proc.log_text()
    after = serve_until_both_workers_wrote(lb.access, "after")
    assert all(ln["path"].startswith("/after/") for ln in after), after
    assert [json.loads(ln) for ln in lb.lines(old)] == before


# ---------------------------------------------------------------------------------------------------------
# 6. HTTP/1.0 and pipelined requests: one line per request, in order


def test_http10_requests_are_logged_with_their_ids(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    with Client(lb.addr) as c:  # no Host, no keep-alive: answered, then closed
        c.send(b"GET /ten/a?x=1 HTTP/1.0\r\n\r\n")
        r1 = c.read_response()
    with Client(lb.addr) as c:  # HTTP/1.0 keep-alive, two requests on one connection
        c.send(b"GET /ten/b HTTP/1.0\r\nConnection: keep-alive\r\nX-Request-ID: ten-b\r\n\r\n")
        r2 = c.read_response()
        c.send(b"GET /ten/c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r3 = c.read_response()
    ids = []
    for r in (r1, r2, r3):
        assert r.status == 200 and r.complete
        (rid,) = r.header_all(RID)
        assert backend_rids(r.json()) == [rid]
        ids.append(rid)
    assert ids[1] == "ten-b" and GENERATED_ID.match(ids[0]) and GENERATED_ID.match(ids[2])
    lines = lb.wait_json(3)
    assert [(ln["path"], ln["protocol"], ln["request_id"], ln["end"]) for ln in lines] == [
        ("/ten/a?x=1", "HTTP/1.0", ids[0], "ok"), ("/ten/b", "HTTP/1.0", "ten-b", "ok"),
        ("/ten/c", "HTTP/1.0", ids[2], "ok")]
    assert lines[0]["host"] is None
    lb.barrier(3)


def test_pipelined_requests_one_line_each_in_order(
    make_backend: MakeBackend, make_logged: MakeLogged
) -> None:
    b1 = make_backend("b1")
    lb = make_logged([b1])
    # The first is the slowest: answers (and lines) still come in request order.
    reqs = [
        build("GET", "/delay/200?n=1", [(RID, "pipe-1")]),
        build("GET", "/p?n=2"),
        build("POST", "/p?n=3", [(RID, "pipe-3")], b"body-3"),
        build("GET", "/p?n=4", [(RID, "not valid"), ("Connection", "close")]),
    ]
    with Client(lb.addr) as c:
        c.send(b"".join(reqs))
        resps = [c.read_response() for _ in reqs]
        assert c.wait_closed(5)[0]
    got_ids = []
    for r, n in zip(resps, range(1, 5)):
        assert r.status == 200 and r.json()["target"].endswith("n=%d" % n)
        (rid,) = r.header_all(RID)
        assert backend_rids(r.json()) == [rid]
        got_ids.append(rid)
    assert got_ids[0] == "pipe-1" and got_ids[2] == "pipe-3"
    assert GENERATED_ID.match(got_ids[1]) and GENERATED_ID.match(got_ids[3])
    lines = lb.wait_json(4)
    assert [ln["path"] for ln in lines] == ["/delay/200?n=1", "/p?n=2", "/p?n=3", "/p?n=4"]
    assert [ln["request_id"] for ln in lines] == got_ids
    assert [ln["bytes_in"] for ln in lines] == [len(q) for q in reqs]
    assert all(ln["end"] == "ok" and ln["status"] == 200 for ln in lines), lines
    lb.barrier(4)


# ---------------------------------------------------------------------------------------------------------
# 7. --check


@pytest.mark.parametrize("line, key, message", [
    ("format = xml", "format", "unknown format 'xml' (expected common, combined, json)"),
    ("access = /nonexistent/dir/x.log", "access", "directory '/nonexistent/dir' does not exist"),
])
def test_check_rejects_bad_log_keys(tmp_path: Path, line: str, key: str, message: str) -> None:
    text = "[balancer]\nlisten = 127.0.0.1:%d\n\n[backend b1]\naddress = 127.0.0.1:9\n\n[log]\n%s\n" % (
        free_port(), line)
    path = tmp_path / "lb.ini"
    path.write_text(text)
    lineno = text.split("\n").index(line) + 1
    rc, out, err = run_balrs("--check", str(path))
    assert rc == 2, (rc, out, err)
    assert err.strip() == "%s:%d: [log] %s: %s" % (path, lineno, key, message), err


def test_check_accepts_a_log_section(tmp_path: Path) -> None:
    path = tmp_path / "lb.ini"
    path.write_text("[balancer]\nlisten = 127.0.0.1:%d\n\n[backend b1]\naddress = 127.0.0.1:9\n%s"
                    % (free_port(), _log_section(tmp_path / "a.log", "json", RID)))
    rc, out, err = run_balrs("--check", str(path))
    assert rc == 0 and "configuration OK" in out, (rc, out, err)
