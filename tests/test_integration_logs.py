"""The access log through a real balancer process: json fields, the ``end`` reason of each way an
exchange ends, and SIGUSR1 reopening the file after a logrotate-style rename."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from support import HOST, BalrsProcess, DeadPort, TestBackend, free_port, lb_ini, request, wait_for


def _lines(path: Path) -> List[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _json_line(path: Path, marker: str, timeout: float = 5.0) -> Dict[str, Any]:
    found = wait_for(lambda: next((json.loads(x) for x in _lines(path) if marker in x), None), timeout)
    assert found, "no access log line with %r: %r" % (marker, _lines(path)[-3:])
    return found  # type: ignore[no-any-return]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    made: List[BalrsProcess] = []

    def make(backends: List[Any], log: str = "format = json\nrequest_id = X-Request-ID", **keys: object) -> Any:
        port = free_port()
        access = tmp_path / "access.log"
        text = lb_ini("127.0.0.1:%d" % port, backends, **keys)
        text += "\n[log]\naccess = %s\n%s\n" % (access, log)
        lb = BalrsProcess(tmp_path, text, port)
        lb.start()
        made.append(lb)
        return lb, access

    yield make
    for lb in made:
        lb.stop()


def test_json_line_fields_and_ok(start: Any) -> None:
    be = TestBackend("b1")
    try:
        lb, access = start([be])
        r = request(lb.addr, "GET", "/echo?mark=ok1")
        assert r.status == 200
        d = _json_line(access, "mark=ok1")
        for field in ("time", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms",
                      "pool", "backend", "route", "retries", "request_id", "end"):
            assert field in d, field
        assert (d["status"], d["method"], d["client"], d["backend"], d["pool"], d["end"], d["retries"]) == (
            200, "GET", "127.0.0.1", "b1", "default", "ok", 0)
        assert d["path"] == "/echo?mark=ok1" and d["route"] is None
        assert d["request_id"] == r.header("x-request-id")
        assert d["bytes_out"] >= len(r.body) > 0 and d["bytes_in"] > 0 and d["duration_ms"] >= 0
    finally:
        be.stop()


def test_end_reasons(start: Any) -> None:
    be = TestBackend("b1")
    try:
        lb, access = start([be], backend_timeout="300ms")
        # A backend that does not answer in time: 504.
        assert request(lb.addr, "GET", "/hang?mark=t1").status == 504
        d = _json_line(access, "mark=t1")
        assert (d["status"], d["end"]) == (504, "backend-timeout")
        # A request balrs refuses: 400, never forwarded.
        with socket.create_connection(lb.addr, timeout=5) as s:
            s.sendall(b"GET /x?mark=r1 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        d = _json_line(access, "mark=r1")
        assert (d["status"], d["end"], d["method"], d["path"], d["backend"]) == (
            400, "rejected", "GET", "/x?mark=r1", None)
        # The client goes away (a reset) before the answer. (A FIN alone is a legal half-close: balrs would
        # still answer, here with the backend's timeout.)
        with socket.create_connection(lb.addr, timeout=5) as s:
            s.sendall(b"GET /delay/1000?mark=a1 HTTP/1.1\r\nHost: a\r\n\r\n")
            wait_for(lambda: any("mark=a1" in str(rec.get("target", rec)) for rec in be.reqs()), 5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        d = _json_line(access, "mark=a1")
        assert d["end"] == "client-abort" and d["backend"] == "b1"
    finally:
        be.stop()


def test_502_and_retry_are_logged(start: Any) -> None:
    dead, be = DeadPort("dead"), TestBackend("b1")
    try:
        lb, access = start([dead], retries=0)
        r = request(lb.addr, "GET", "/echo?mark=e1")
        assert r.status == 502 and r.header("x-request-id")
        d = _json_line(access, "mark=e1")
        assert (d["status"], d["end"], d["backend"]) == (502, "backend-error", "dead")
        assert d["request_id"] == r.header("x-request-id")
        lb.stop()
        lb, access = start([dead, be], retries=1, strategy="round_robin")
        statuses = []
        for i in range(2):
            statuses.append(request(lb.addr, "GET", "/echo?mark=rt%d" % i).status)
        assert statuses == [200, 200]
        lines = [_json_line(access, "mark=rt%d" % i) for i in range(2)]
        # Round robin sends at least one of the two to the dead backend first: retried on b1.
        assert max(x["retries"] for x in lines) == 1 and all(x["retries"] in (0, 1) for x in lines)
        assert all(x["backend"] == "b1" and x["end"] == "ok" for x in lines)
    finally:
        be.stop()


def test_sigusr1_reopens_after_rename(start: Any) -> None:
    be = TestBackend("b1")
    try:
        lb, access = start([be], log="format = combined")
        assert request(lb.addr, "GET", "/echo?mark=before").status == 200
        wait_for(lambda: any("mark=before" in x for x in _lines(access)), 5)
        rotated = access.with_name("access.log.1")
        os.rename(access, rotated)
        mark = lb.log_mark()
        lb.signal(signal.SIGUSR1)
        lb.wait_log("reopening the access log", since=mark)
        assert request(lb.addr, "GET", "/echo?mark=after").status == 200
        assert wait_for(lambda: any("mark=after" in x for x in _lines(access)), 5)
        assert any("mark=before" in x for x in _lines(rotated))
        assert not any("mark=after" in x for x in _lines(rotated))
    finally:
        be.stop()


def test_request_ids_kept_replaced_and_off(start: Any) -> None:
    be = TestBackend("b1")
    try:
        lb, _access = start([be])
        r = request(lb.addr, "GET", "/echo", headers=[("X-Request-ID", "abc-123.x:y_z")])
        assert r.header("x-request-id") == "abc-123.x:y_z"
        sent = [v for n, v in be.reqs()[-1]["headers"] if n.lower() == "x-request-id"]
        assert sent == ["abc-123.x:y_z"]
        r = request(lb.addr, "GET", "/echo", headers=[("X-Request-ID", "bad id")])
        new = r.header("x-request-id")
        assert new and new != "bad id"
        sent = [v for n, v in be.reqs()[-1]["headers"] if n.lower() == "x-request-id"]
        assert sent == [new]
        lb.stop()
        lb, _access = start([be], log="format = common")
        r = request(lb.addr, "GET", "/echo")
        assert r.header("x-request-id") is None
        assert not [v for n, v in be.reqs()[-1]["headers"] if n.lower() == "x-request-id"]
    finally:
        be.stop()


def test_check_rejects_bad_log_keys(tmp_path: Path) -> None:
    from support import run_balrs
    for body, key in (("format = xml", "format"), ("access = /nonexistent/dir/x.log", "access")):
        path = tmp_path / "bad.ini"
        path.write_text("[balancer]\nlisten = %s:%d\n[backend a]\naddress = 127.0.0.1:1\n[log]\n%s\n"
                        % (HOST, free_port(), body))
        code, _out, err = run_balrs("--check", str(path))
        assert code == 2 and ("%s:6: [log] %s:" % (path, key)) in err, err
