"""Integration: pools and routes (the contract's "Pools and routes") against the real ``python -m balrs``.

Real backends on 127.0.0.1 (``support.TestBackend`` echoes what it received as JSON, its name in
``backend``), the real balancer process with hand-written lb.ini files. Every wait is on an event (a
log line, a response); nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from support import HOST, BalrsProcess, Client, TestBackend, build, free_port, request, wait_for


def _ini(port: int, body: str, balancer: str = "", admin: Optional[int] = None) -> str:
    text = ("[balancer]\nlisten = 127.0.0.1:%d\nconnect_timeout = 1s\nbackend_timeout = 5s\n%s\n%s\n"
            % (port, balancer, body))
    if admin is not None:
        text += "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin
    return text


def _backend(b: TestBackend, pool: Optional[str] = None) -> str:
    return "[backend %s]\naddress = %s\n%s\n" % (b.name, b.address, "pool = %s\n" % pool if pool else "")


@pytest.fixture
def backends() -> Iterator[Dict[str, TestBackend]]:
    bs = {name: TestBackend(name) for name in ("d1", "d2", "a1", "a2", "f1")}
    yield bs
    for b in bs.values():
        b.stop()


def _start(tmp_path: Path, body: str, balancer: str = "", admin: bool = False,
           args: Sequence[str] = ()) -> BalrsProcess:
    port = free_port()
    admin_port = free_port() if admin else None
    lb = BalrsProcess(tmp_path, _ini(port, body, balancer, admin_port), port, args)
    if admin_port is not None:
        lb.admin_addr = (HOST, admin_port)
    lb.start(wait_addr=lb.admin_addr)
    if admin_port is not None:
        lb.wait_listening(5.0)
    return lb


def _get(lb: BalrsProcess, target: str, host: str = "lb.test", headers: Sequence[Tuple[str, str]] = (),
         method: str = "GET") -> Any:
    return request(lb.addr, method, target, [("Host", host), *headers])


def _served(r: Any) -> Optional[str]:
    if r.status != 200:
        return None
    try:
        return str(json.loads(r.body)["backend"])
    except (ValueError, KeyError):
        return None


def _status(lb: BalrsProcess) -> Dict[str, Any]:
    assert lb.admin_addr is not None
    r = request(lb.admin_addr, "GET", "/status")
    assert r.status == 200
    doc: Dict[str, Any] = json.loads(r.body)
    return doc


TWO_POOLS_BODY = """
{d1}{d2}{a1}{a2}
[route api]
host = api.test, *.api.test
path_prefix = /api/
strip_prefix = /api
set_request_header = X-Env: prod
remove_request_header = Cookie
set_response_header = X-Routed: api
remove_response_header = X-Drop
pool = api
"""


def _two_pools(bs: Dict[str, TestBackend]) -> str:
    return TWO_POOLS_BODY.format(d1=_backend(bs["d1"]), d2=_backend(bs["d2"]), a1=_backend(bs["a1"], "api"),
                                 a2=_backend(bs["a2"], "api"))


def test_host_and_path_route_with_modifiers(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    lb = _start(tmp_path, _two_pools(backends))
    try:
        for host in ("api.test", "API.test:8080", "x.api.test", "a.b.api.test."):
            r = _get(lb, "/api/users?x=1", host=host, headers=[("Cookie", "s=1"), ("X-Env", "dev")])
            assert _served(r) in ("a1", "a2"), (host, r.status, r.body[:200])
            info = json.loads(r.body)
            assert info["target"] == "/users?x=1"
            names = [n.lower() for n, _v in info["headers"]]
            assert "cookie" not in names
            assert [v for n, v in info["headers"] if n.lower() == "x-env"] == ["prod"]
            assert r.header("x-routed") == "api"
        # Other hosts, other paths: the default pool, untouched.
        for host, target in (("api.test.evil", "/api/x"), ("xapi.test", "/api/x"), ("api.test", "/apix"),
                             ("api.test", "/other/api/x")):
            r = _get(lb, target, host=host, headers=[("Cookie", "s=1")])
            assert _served(r) in ("d1", "d2"), (host, target)
            info = json.loads(r.body)
            assert info["target"] == target
            assert [v for n, v in info["headers"] if n.lower() == "cookie"] == ["s=1"]
            assert r.header("x-routed") is None
        # The route's request fields on a keep-alive connection with a body.
        with Client(lb.addr) as c:
            for i in range(3):
                c.send(build("POST", "/api/p%d" % i, [("Host", "api.test")], b"x" * 100))
                r = c.read_response("POST")
                info = json.loads(r.body)
                assert info["target"] == "/p%d" % i and info["body_len"] == 100
    finally:
        lb.stop()


def test_startup_log_lists_routes_and_pools(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    lb = _start(tmp_path, _two_pools(backends))
    try:
        lb.wait_log("route api -> pool api")
        lb.wait_log("pool api: a1, a2")
        lb.wait_log("no route matches -> pool default")
    finally:
        lb.stop()


def test_redirect_return_and_no_default_pool(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    body = _backend(backends["a1"], "api") + """
[route secure]
host = old.test
redirect = https://{host}:{port}{path}{query}
redirect_code = 301

[route deny]
path_prefix = /admin/
return = 403

[route ping]
path = /ping
return = 200 pong

[route api]
path_prefix = /api/
pool = api
"""
    lb = _start(tmp_path, body, "[log]\nrequest_id = X-Request-ID\n")
    try:
        r = _get(lb, "/a/%62?q=1", host="old.test:99")
        assert r.status == 301
        assert r.header("location") == "https://old.test:%d/a/b?q=1" % lb.port
        r = _get(lb, "/admin/x")
        assert r.status == 403
        assert r.header("x-request-id")
        r = _get(lb, "/ping")
        assert r.status == 200 and r.body.strip() == b"pong"
        assert (r.header("content-type") or "").startswith("text/plain")
        r = _get(lb, "/ping", method="HEAD")
        assert r.status == 200 and r.body == b""
        # No route matches and there is no pool "default": 404.
        r = _get(lb, "/elsewhere")
        assert r.status == 404
        assert _served(_get(lb, "/api/x")) == "a1"
        assert [x["target"] for x in backends["a1"].reqs()] == ["/api/x"]
        # Answers on one keep-alive connection, in order.
        with Client(lb.addr) as c:
            c.send(build("GET", "/ping", [("Host", "a")]) + build("GET", "/api/k", [("Host", "a")])
                   + build("GET", "/admin/", [("Host", "a")]))
            assert c.read_response().status == 200
            assert _served(c.read_response()) == "a1"
            assert c.read_response().status == 403
    finally:
        lb.stop()


# Paths that must all land on the `return = 403` route for /admin/ (or be refused), never on a backend.
BYPASSES = [
    "/admin/", "/%61dmin/", "/%61%64%6D%69%6E/x", "/x/../admin/", "/./admin/", "/x/./../admin/",
    "//admin/", "/admin//", "///admin/x", "/x/%2e%2e/admin/", "/x/.%2E/admin/", "/x/..%2fadmin/",
    "/x/..%2Fadmin/", "/admin%2fx", "/x//..//admin/", "/x/..;/admin/", "/admin\\x", "/x/..\\admin/",
]


def test_normalisation_bypass_tricks(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    body = _backend(backends["d1"]) + "\n[route deny]\npath_prefix = /admin/\nreturn = 403\n"
    lb = _start(tmp_path, body)
    try:
        for target in BYPASSES:
            r = _get(lb, target)
            assert r.status in (403, 400), (target, r.status)
        # Also in absolute-form, and climbing above the root.
        r = _get(lb, "http://lb.test/%61dmin/")
        assert r.status == 403
        for target in ("/../admin/", "/a/../../admin/", "/%2e%2e/admin/"):
            assert _get(lb, target).status == 400, target
        assert not backends["d1"].reqs(), [x["target"] for x in backends["d1"].reqs()]
        # What is forwarded is the normalised path; the query is unchanged; %2F stays encoded.
        info = json.loads(_get(lb, "/x/./y/../%7Euser/a%2fb?p=/../%61").body)
        assert info["target"] == "/x/~user/a%2Fb?p=/../%61"
    finally:
        lb.stop()


def test_weighted_split_is_smooth(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    body = (_backend(backends["d1"], "stable") + _backend(backends["a1"], "canary")
            + "\n[route all]\npath_prefix = /\npool = stable 9, canary 1\n")
    lb = _start(tmp_path, body)
    try:
        seen: List[Optional[str]] = []
        with Client(lb.addr) as c:
            for i in range(100):
                c.send(build("GET", "/s?i=%d" % i, [("Host", "a")]))
                seen.append(_served(c.read_response()))
        assert seen.count("a1") == 10 and seen.count("d1") == 90
        # Smooth: never two canary requests within a window of ten.
        for i in range(90):
            assert seen[i:i + 10].count("a1") <= 1
    finally:
        lb.stop()


def test_backup_pool_and_reload_of_routes(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    bs = backends
    body = (_backend(bs["d1"]) + _backend(bs["a1"], "api") + _backend(bs["a2"], "api")
            + _backend(bs["f1"], "fb") + """
[health]
path = /health
interval = 100ms
timeout = 500ms
rise = 1
fall = 1

[health broken]
path = /status/503

[pool api]
backup = fb
health = broken
strategy = least_connections

[route api]
path_prefix = /api/
pool = api
""")
    lb = _start(tmp_path, body, admin=True)
    try:
        lb.wait_log("backend a1 is DOWN")
        lb.wait_log("backend a2 is DOWN")
        assert wait_for(lambda: _served(_get(lb, "/api/x")) == "f1", 5.0)
        assert _served(_get(lb, "/other")) == "d1"
        doc = _status(lb)
        pools = {p["name"]: p for p in doc["pools"]}
        assert sorted(pools) == ["api", "default", "fb"]
        assert pools["api"]["backends"] == ["a1", "a2"] and pools["api"]["strategy"] == "least_connections"
        assert {b["name"]: b["pool"] for b in doc["backends"]} == {"d1": "default", "a1": "api", "a2": "api",
                                                                  "f1": "fb"}
        routes = {r["name"]: r["requests"] for r in doc["routes"]}
        assert routes["api"] >= 1
        # Reload: the api pool's health passes now; a new route; the old route's count carries over.
        before = routes["api"]
        text = lb.config_path.read_text().replace("path = /status/503", "path = /health")
        text += "\n[route ping]\npath = /ping\nreturn = 200 ok\n"
        lb.config_path.write_text(text)
        mark = lb.log_mark()
        lb.signal(signal.SIGHUP)
        lb.wait_log("reloaded", since=mark)
        lb.wait_log("backend a1 is UP", since=mark)
        assert wait_for(lambda: _served(_get(lb, "/api/y")) in ("a1", "a2"), 5.0)
        assert _get(lb, "/ping").status == 200
        routes = {r["name"]: r["requests"] for r in _status(lb)["routes"]}
        assert routes["api"] > before and routes["ping"] == 1
        r = request(lb.admin_addr, "GET", "/metrics")  # type: ignore[arg-type]
        text = r.body.decode()
        assert 'balrs_route_requests_total{route="ping"} 1' in text
        assert 'balrs_backend_info{backend="a1",pool="api",address="%s"} 1' % bs["a1"].address in text
    finally:
        lb.stop()


def test_strategy_flag_sets_the_default_pool_only(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    body = (_backend(backends["d1"]) + _backend(backends["d2"]) + _backend(backends["a1"], "api")
            + "\n[pool api]\nstrategy = least_connections\n\n[route api]\npath_prefix = /api/\npool = api\n")
    lb = _start(tmp_path, body, args=["--strategy", "random"], admin=True)
    try:
        pools = {p["name"]: p["strategy"] for p in _status(lb)["pools"]}
        assert pools == {"api": "least_connections", "default": "random"}
    finally:
        lb.stop()


def test_v1_config_still_one_default_pool(tmp_path: Path, backends: Dict[str, TestBackend]) -> None:
    lb = _start(tmp_path, _backend(backends["d1"]) + _backend(backends["d2"]), admin=True)
    try:
        seen = {_served(_get(lb, "/v1?i=%d" % i)) for i in range(4)}
        assert seen == {"d1", "d2"}
        doc = _status(lb)
        assert [p["name"] for p in doc["pools"]] == ["default"] and doc["routes"] == []
        assert doc["strategy"] == "round_robin"
        # Normalisation applies without routes too.
        assert json.loads(_get(lb, "/a/../%62").body)["target"] == "/b"
    finally:
        lb.stop()
