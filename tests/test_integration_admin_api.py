"""Integration: the admin API's writes (drain, maint, ready, weight, add, delete) against the real balrs
process, alone and with ``workers = 2``: authentication, every answer code, what each write does to the
traffic and to /status, what a SIGHUP keeps, and that every change is logged with who made it."""

from __future__ import annotations

import collections
import json
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from support import BalrsProcess, TestBackend, lb_ini, request, start_config, wait_for

TOKEN = "t0ken-for-the-admin-api-1234"


def _served(lb: BalrsProcess, n: int, target: str = "/echo") -> "collections.Counter[str]":
    return collections.Counter(str(request(lb.addr, "GET", "%s?i=%d" % (target, i)).header("X-Backend"))
                               for i in range(n))


def api(lb: BalrsProcess, method: str, path: str, body: Optional[bytes] = None,
        token: Optional[str] = TOKEN, headers: Sequence[Tuple[str, str]] = ()) -> Any:
    assert lb.admin_addr is not None
    hs = list(headers)
    if token is not None:
        hs.append(("Authorization", "Bearer %s" % token))
    return request(lb.admin_addr, method, path, hs, body)


def status(lb: BalrsProcess) -> Dict[str, Any]:
    assert lb.admin_addr is not None
    return request(lb.admin_addr, "GET", "/status").json()


def state_of(lb: BalrsProcess, name: str) -> Optional[str]:
    for b in status(lb)["backends"]:
        if b["name"] == name:
            return str(b["state"])
    return None


def _read_to_close(s: Any) -> bytes:
    """Everything the peer sends until it closes; then close our socket too."""
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    finally:
        s.close()


class Launcher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: List[BalrsProcess] = []
        self.token_file = workdir / "admin.token"
        self.token_file.write_text(TOKEN + "\n")

    def __call__(self, backends: Sequence[Any], token: bool = True, extra: str = "", name: str = "lb",
                 **balancer: object) -> BalrsProcess:
        def text_for(port: int, admin_port: Optional[int]) -> str:
            text = lb_ini("127.0.0.1:%d" % port, backends, **balancer) + extra
            text += "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin_port
            if token:
                text += "token_file = %s\n" % self.token_file
            return text

        lb = start_config(self.workdir, text_for, name="%s%d" % (name, len(self.made)), admin=True)
        self.made.append(lb)
        return lb


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    for lb in launcher.made:
        lb.stop()


@pytest.fixture
def two(make_backend: Callable[..., TestBackend]) -> List[TestBackend]:
    return [make_backend("b1"), make_backend("b2")]


# ---- who may write -------------------------------------------------------------------------------------
def test_auth_and_every_error_answer(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two)
    r = api(lb, "POST", "/api/backends/b1/drain", token=None)
    assert r.status == 401 and r.header("WWW-Authenticate") == 'Bearer realm="balrs"'
    assert api(lb, "POST", "/api/backends/b1/drain", token="nope").status == 403
    assert api(lb, "POST", "/api/backends/b1/drain", headers=[("Authorization", "Basic Zm9vOmJhcg==")],
               token=None).status == 401
    assert _served(lb, 4) == {"b1": 2, "b2": 2}, "a refused write changed something"
    assert api(lb, "POST", "/api/backends/nosuch/drain").status == 404
    assert api(lb, "POST", "/api/nothing-here").status == 404
    r = api(lb, "GET", "/api/backends/b1/drain")
    assert r.status == 405 and r.header("Allow") == "POST"
    assert api(lb, "POST", "/api/backends/b1/weight", b"3").header("Allow") == "PUT"
    for bad in (b"0", b"257", b"heavy", b"", b"1.5", b"-1", b'{"weight": true}'):
        r = api(lb, "PUT", "/api/backends/b1/weight", bad)
        assert r.status == 400, (bad, r.status)
        assert "error" in r.json()
    for bad in (b"not json", b"[]", b'{"name": "x"}', b'{"name": "x y", "address": "127.0.0.1:1"}',
                b'{"name": "x", "address": "nohostport"}', b'{"name": "x", "address": "127.0.0.1:1", "weight": 0}',
                b'{"name": "x", "address": "127.0.0.1:1", "colour": "red"}'):
        assert api(lb, "POST", "/api/backends", bad).status == 400, bad
    assert api(lb, "POST", "/api/backends", b'{"name": "x", "address": "127.0.0.1:1", "pool": "nope"}').status == 400
    assert api(lb, "POST", "/api/backends", b'{"name": "b1", "address": "127.0.0.1:1"}').status == 409
    assert api(lb, "POST", "/api/backends", b"x" * 20000).status == 413
    assert lb.alive()


def test_without_token_file_every_write_is_403(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two, token=False)
    r = api(lb, "POST", "/api/backends/b1/drain")
    assert r.status == 403 and "token_file" in r.json()["error"]
    assert state_of(lb, "b1") == "up"


def test_token_file_errors_name_the_key(tmp_path: Path) -> None:
    from balrs.config import ConfigError, load
    ini = tmp_path / "lb.ini"
    ini.write_text("[balancer]\nlisten = 127.0.0.1:1\n[backend a]\naddress = 127.0.0.1:2\n"
                   "[admin]\nlisten = 127.0.0.1:3\ntoken_file = %s\n" % (tmp_path / "missing"))
    with pytest.raises(ConfigError) as e:
        load(str(ini))
    assert str(e.value).startswith("%s:7: [admin] token_file: cannot read" % ini)
    (tmp_path / "empty").write_text("\n")
    ini.write_text(ini.read_text().replace(str(tmp_path / "missing"), str(tmp_path / "empty")))
    with pytest.raises(ConfigError) as e:
        load(str(ini))
    assert "[admin] token_file" in str(e.value) and "one token" in str(e.value)


# ---- what the writes do ---------------------------------------------------------------------------------
def test_drain_finishes_in_flight_and_takes_no_new_requests(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two)
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=request(lb.addr, "GET", "/delay/1200", timeout=8)))
    t.start()
    assert wait_for(lambda: any(r["target"] == "/delay/1200" for b in two for r in b.reqs()), 5)
    busy = next(b for b in two if any(r["target"] == "/delay/1200" for r in b.reqs()))
    other = next(b for b in two if b is not busy)
    r = api(lb, "POST", "/api/backends/%s/drain" % busy.name)
    assert r.status == 200 and r.json()["state"] == "drain" and r.json()["was"] == "up"
    before = len(busy.reqs())
    assert _served(lb, 6) == {other.name: 6}
    assert len(busy.reqs()) == before
    assert state_of(lb, busy.name) == "drain"
    t.join(8)
    assert box["r"].status == 200 and box["r"].complete, "the request in flight on the drained backend was lost"
    assert api(lb, "POST", "/api/backends/%s/ready" % busy.name).json()["state"] == "up"
    assert set(_served(lb, 4)) == {"b1", "b2"}
    # Every change is logged with who made it and what changed.
    lb.wait_log("admin: drain %s by 127.0.0.1:" % busy.name)
    lb.wait_log("admin: ready %s by 127.0.0.1:" % busy.name)


def test_maint_stops_traffic_and_probes_then_ready(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two, extra="\n[health]\npath = /health\ninterval = 100ms\ntimeout = 500ms\nrise = 1\nfall = 1\n")
    b1 = two[0]

    def probes() -> int:
        return sum(1 for r in b1.reqs() if r["target"] == "/health")

    assert wait_for(lambda: probes() >= 2, 5), "no health probes to begin with"
    assert api(lb, "POST", "/api/backends/b1/maint").json()["state"] == "maint"
    assert state_of(lb, "b1") == "maint"
    assert _served(lb, 6) == {"b2": 6}
    seen = probes()
    # Four probe intervals with no probe of b1 (a probe already under way may still land: allow one).
    lb.wait_log("admin: maint b1 by")
    assert not wait_for(lambda: probes() > seen + 1, 0.5)
    assert api(lb, "POST", "/api/backends/b1/ready").status == 200
    assert wait_for(lambda: probes() > seen + 1, 5), "probes did not resume after ready"
    assert wait_for(lambda: _served(lb, 4)["b1"] > 0, 5)
    assert state_of(lb, "b1") == "up"


def test_weight_changes_the_split(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two, strategy="weighted_round_robin")
    assert _served(lb, 8) == {"b1": 4, "b2": 4}
    r = api(lb, "PUT", "/api/backends/b1/weight", b"3")
    assert r.status == 200 and r.json() == {"backend": "b1", "weight": 3, "was": 1}
    assert _served(lb, 8) == {"b1": 6, "b2": 2}
    assert api(lb, "PUT", "/api/backends/b2/weight", b'{"weight": 3}').status == 200
    assert {b["name"]: b["weight"] for b in status(lb)["backends"]} == {"b1": 3, "b2": 3}


def test_add_and_delete_backends(launch: Launcher, two: List[TestBackend],
                                 make_backend: Callable[..., TestBackend]) -> None:
    lb = launch(two)
    b3 = make_backend("b3")
    r = api(lb, "POST", "/api/backends", json.dumps({"name": "b3", "address": b3.address, "weight": 1}).encode())
    assert r.status == 201 and r.json()["added"] is True
    assert _served(lb, 6) == {"b1": 2, "b2": 2, "b3": 2}
    assert [b["name"] for b in status(lb)["backends"]] == ["b1", "b2", "b3"]
    # Delete one with a request in flight: 202, the request finishes, then it is gone.
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=request(lb.addr, "GET", "/delay/1000", timeout=8)))
    t.start()
    assert wait_for(lambda: any(r["target"] == "/delay/1000" for b in (*two, b3) for r in b.reqs()), 5)
    busy = next(b for b in (*two, b3) if any(r["target"] == "/delay/1000" for r in b.reqs()))
    r = api(lb, "DELETE", "/api/backends/%s" % busy.name)
    assert r.status == 202
    others = {b.name for b in (*two, b3)} - {busy.name}
    assert set(_served(lb, 6)) == others
    t.join(8)
    assert box["r"].status == 200 and box["r"].complete
    assert wait_for(lambda: busy.name not in [b["name"] for b in status(lb)["backends"]], 5)
    assert api(lb, "POST", "/api/backends/%s/drain" % busy.name).status == 404


def test_sighup_makes_the_file_the_truth_but_keeps_drain_and_maint(
        launch: Launcher, make_backend: Callable[..., TestBackend]) -> None:
    bs = [make_backend("b1"), make_backend("b2"), make_backend("b3")]
    lb = launch(bs, strategy="weighted_round_robin")
    b4 = make_backend("b4")
    assert api(lb, "POST", "/api/backends/b1/drain").status == 200
    assert api(lb, "POST", "/api/backends/b2/maint").status == 200
    assert api(lb, "PUT", "/api/backends/b3/weight", b"7").status == 200
    assert api(lb, "POST", "/api/backends", json.dumps({"name": "b4", "address": b4.address}).encode()).status == 201
    mark = len(lb.log_text())
    lb.signal(signal.SIGHUP)
    lb.wait_log("reloaded", since=mark)
    doc = {b["name"]: b for b in status(lb)["backends"]}
    assert sorted(doc) == ["b1", "b2", "b3"], "a backend added at runtime survived the reload"
    assert doc["b1"]["state"] == "drain" and doc["b2"]["state"] == "maint"
    assert doc["b3"]["weight"] == 1, "a runtime weight survived the reload"
    assert _served(lb, 4) == {"b3": 4}


def test_token_change_applies_on_reload(launch: Launcher, two: List[TestBackend]) -> None:
    lb = launch(two)
    launch.token_file.write_text("a-new-token-5678\n")
    mark = len(lb.log_text())
    lb.signal(signal.SIGHUP)
    lb.wait_log("reloaded", since=mark)
    assert api(lb, "POST", "/api/backends/b1/drain").status == 403
    assert api(lb, "POST", "/api/backends/b1/drain", token="a-new-token-5678").status == 200


# ---- workers = 2: every worker applies the change -----------------------------------------------------------
def test_workers_apply_every_change(launch: Launcher, make_backend: Callable[..., TestBackend]) -> None:
    bs = [make_backend("b1"), make_backend("b2")]
    lb = launch(bs, workers="2")
    assert wait_for(lambda: status(lb).get("workers_answered") == 2, 10)
    r = api(lb, "POST", "/api/backends/b1/drain")
    assert r.status == 200 and r.json()["workers"] == 2
    doc = {b["name"]: b for b in status(lb)["backends"]}
    assert doc["b1"]["state"] == "drain"
    assert [w["state"] for w in doc["b1"]["workers"]] == ["drain", "drain"]
    # New connections land on either worker (SO_REUSEPORT): none of them reaches b1.
    assert _served(lb, 16) == {"b2": 16}
    b3 = make_backend("b3")
    r = api(lb, "POST", "/api/backends", json.dumps({"name": "b3", "address": b3.address}).encode())
    assert r.status == 201 and r.json()["workers"] == 2
    assert wait_for(lambda: _served(lb, 8)["b3"] >= 3, 5)
    doc = {b["name"]: b for b in status(lb)["backends"]}
    assert len(doc["b3"]["workers"]) == 2


# ---- keep-alive on the admin endpoint (dashboards poll) ---------------------------------------------------
def test_admin_keep_alive_and_pipelining(launch: Launcher, two: List[TestBackend]) -> None:
    from support import Client, build
    lb = launch(two)
    assert lb.admin_addr is not None
    with Client(lb.admin_addr, timeout=5) as c:
        for path in ("/status", "/", "/metrics", "/status"):
            c.send(build("GET", path, [], None))
            r = c.read_response("GET")
            assert r.status == 200 and not r.has_token("Connection", "close"), (path, r.headers)
        # A write, then two pipelined reads in one segment, on the same connection.
        c.send(build("POST", "/api/backends/b1/drain", [("Authorization", "Bearer %s" % TOKEN)], None))
        assert c.read_response("POST").json()["state"] == "drain"
        c.send(build("GET", "/status", [], None) + build("GET", "/nope", [("Connection", "close")], None))
        assert c.read_response("GET").json()["backends"][0]["state"] == "drain"
        last = c.read_response("GET")
        assert last.status == 404 and last.has_token("Connection", "close")
        closed, extra, _t = c.wait_closed(3)
        assert closed and extra == b""
    # HTTP/1.0 without keep-alive: one answer, then the connection closes.
    with Client(lb.admin_addr, timeout=5) as c:
        c.send(b"GET /status HTTP/1.0\r\n\r\n")
        r = c.read_response("GET")
        assert r.status == 200 and r.has_token("Connection", "close")


def test_admin_answers_a_client_that_half_closes(launch: Launcher, two: List[TestBackend]) -> None:
    import socket as _socket
    lb = launch(two)
    assert lb.admin_addr is not None
    for workers_lb in (lb, launch(two, workers="2")):
        assert workers_lb.admin_addr is not None
        s = _socket.create_connection(workers_lb.admin_addr, timeout=5)
        s.sendall(b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n")
        s.shutdown(_socket.SHUT_WR)
        data = _read_to_close(s)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b'"backends"' in body, data[:200]


def test_write_from_limits_who_may_write(launch: Launcher, two: List[TestBackend]) -> None:
    # The default is loopback; here only 127.0.0.2 may write, so 127.0.0.1 (with the right token) may not.
    import socket
    from support import build
    lb = launch(two)
    assert lb.admin_addr is not None
    text = lb.config_path.read_text().replace("token_file =", "write_from = 127.0.0.2\ntoken_file =")
    lb.config_path.write_text(text)
    mark = len(lb.log_text())
    lb.signal(signal.SIGHUP)
    lb.wait_log("reloaded", since=mark)
    r = api(lb, "POST", "/api/backends/b1/drain")
    assert r.status == 403 and "write_from" in r.json()["error"]
    lb.wait_log("refused: not in [admin] write_from")
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.settimeout(5)
    s.connect(lb.admin_addr)
    s.sendall(build("POST", "/api/backends/b1/drain", [("Authorization", "Bearer %s" % TOKEN),
                                                      ("Connection", "close")], None))
    data = _read_to_close(s)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert state_of(lb, "b1") == "drain"


def test_write_from_config(tmp_path: Path) -> None:
    from balrs.config import ConfigError, load
    ini = tmp_path / "lb.ini"
    base = "[balancer]\nlisten = 127.0.0.1:1\n[backend a]\naddress = 127.0.0.1:2\n[admin]\nlisten = 127.0.0.1:3\n"
    ini.write_text(base)
    assert load(str(ini)).admin.write_from == ("127.0.0.0/8", "::1/128")  # type: ignore[union-attr]
    ini.write_text(base + "write_from = any\n")
    assert load(str(ini)).admin.write_from == ("0.0.0.0/0", "::/0")  # type: ignore[union-attr]
    ini.write_text(base + "write_from = 10.0.0.0/8, 192.168.1.7\n")
    assert load(str(ini)).admin.write_from == ("10.0.0.0/8", "192.168.1.7/32")  # type: ignore[union-attr]
    ini.write_text(base + "write_from = nowhere\n")
    with pytest.raises(ConfigError) as e:
        load(str(ini))
    assert str(e.value).startswith("%s:7: [admin] write_from:" % ini)
