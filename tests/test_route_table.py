"""Unit tests of the route table (balrs.routing) and path normalisation (balrs.http.paths), sans-IO:
a table of requests x routes fed to the compiled structure, the actions, and the normalisation cases."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest

from balrs.config import RouteConfig
from balrs.http.errors import ProtocolError
from balrs.http.heads import parse_request_head, parse_response_head
from balrs.http.paths import normalise_target
from balrs.routing import ACT_REDIRECT, ACT_RETURN, CANDIDATE_CACHE_SIZE, RouteTable, match_host


def R(name: str, **kw: Any) -> RouteConfig:
    kw.setdefault("pools", (("p", 1),))
    return RouteConfig(name, **kw)


def head(method: str = "GET", target: str = "/", host: Optional[str] = "lb.test",
         headers: Tuple[Tuple[str, str], ...] = ()) -> Any:
    lines = ["%s %s HTTP/1.1" % (method, target)]
    if host is not None:
        lines.append("Host: %s" % host)
    lines += ["%s: %s" % kv for kv in headers]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())


def match(table: RouteTable, method: str = "GET", target: str = "/", host: Optional[str] = "lb.test",
          headers: Tuple[Tuple[str, str], ...] = (), client: str = "127.0.0.1",
          scheme: bytes = b"http") -> Optional[str]:
    req = head(method, target, host, headers)
    path, mpath, _q = normalise_target(req.target)
    r = table.match(req, req.host, mpath, client, scheme)
    return r.name if r is not None else None


ROUTES = [
    R("exact-host", hosts=("api.test",)),
    R("wild", hosts=("*.wild.test",)),
    R("prefix", path_prefix="/static/"),
    R("exact", path="/ping"),
    R("regex", path_regex="^/v[0-9]+/"),
    R("writes", methods=("POST", "PUT")),
    R("canary", headers=(("x-canary", "1"),)),
    R("beta", headers=(("x-beta", None),)),
    R("inside", client_ip=("10.0.0.0/8", "::1/128")),
    R("secure", scheme="https"),
    R("both", hosts=("both.test",), path_prefix="/b/"),
]

CASES = [
    # (method, target, host, headers, client, scheme) -> route
    ("GET", "/x", "api.test", (), "127.0.0.1", b"http", "exact-host"),
    ("GET", "/x", "API.Test:8080", (), "127.0.0.1", b"http", "exact-host"),
    ("GET", "/x", "api.test.", (), "127.0.0.1", b"http", "exact-host"),
    ("GET", "/x", "sub.api.test", (), "127.0.0.1", b"http", None),
    ("GET", "/x", "a.wild.test", (), "127.0.0.1", b"http", "wild"),
    ("GET", "/x", "a.b.wild.test", (), "127.0.0.1", b"http", "wild"),
    ("GET", "/x", "wild.test", (), "127.0.0.1", b"http", None),
    ("GET", "/static/app.js", "lb.test", (), "127.0.0.1", b"http", "prefix"),
    ("GET", "/static", "lb.test", (), "127.0.0.1", b"http", None),
    ("GET", "/%73tatic/a", "lb.test", (), "127.0.0.1", b"http", "prefix"),
    ("GET", "/x/../static/a", "lb.test", (), "127.0.0.1", b"http", "prefix"),
    ("GET", "//static/a", "lb.test", (), "127.0.0.1", b"http", "prefix"),
    ("GET", "/ping", "lb.test", (), "127.0.0.1", b"http", "exact"),
    ("GET", "/ping?x=1", "lb.test", (), "127.0.0.1", b"http", "exact"),
    ("GET", "/ping/", "lb.test", (), "127.0.0.1", b"http", None),
    ("GET", "/v2/users", "lb.test", (), "127.0.0.1", b"http", "regex"),
    ("GET", "/vx/users", "lb.test", (), "127.0.0.1", b"http", None),
    ("POST", "/x", "lb.test", (), "127.0.0.1", b"http", "writes"),
    ("DELETE", "/x", "lb.test", (), "127.0.0.1", b"http", None),
    ("GET", "/x", "lb.test", (("X-Canary", "1"),), "127.0.0.1", b"http", "canary"),
    ("GET", "/x", "lb.test", (("X-Canary", "10"),), "127.0.0.1", b"http", None),
    ("GET", "/x", "lb.test", (("X-Canary", "2"), ("X-Canary", "1")), "127.0.0.1", b"http", "canary"),
    ("GET", "/x", "lb.test", (("X-Beta", ""),), "127.0.0.1", b"http", "beta"),
    ("GET", "/x", "lb.test", (("X-Beta", "y"), ("X-Canary", "1")), "127.0.0.1", b"http", "canary"),
    ("GET", "/x", "lb.test", (), "10.1.2.3", b"http", "inside"),
    ("GET", "/x", "lb.test", (), "::1", b"http", "inside"),
    ("GET", "/x", "lb.test", (), "11.1.2.3", b"http", None),
    ("GET", "/x", "lb.test", (), "127.0.0.1", b"https", "secure"),
    ("GET", "/b/x", "both.test", (), "127.0.0.1", b"http", "both"),
    ("GET", "/b/x", "other.test", (), "127.0.0.1", b"http", None),
    ("GET", "/c/x", "both.test", (), "127.0.0.1", b"http", None),
    # file order: the host route comes first even for a path another route would match
    ("GET", "/static/a", "api.test", (), "127.0.0.1", b"http", "exact-host"),
]


@pytest.mark.parametrize("method,target,host,headers,client,scheme,want", CASES)
def test_table_of_requests_and_routes(method: str, target: str, host: str, headers: Any, client: str,
                                      scheme: bytes, want: Optional[str]) -> None:
    table = RouteTable(ROUTES)
    assert match(table, method, target, host, headers, client, scheme) == want
    # The same again (now from the candidate cache).
    assert match(table, method, target, host, headers, client, scheme) == want


def test_match_host() -> None:
    assert match_host(b"API.test:80") == b"api.test"
    assert match_host(b"a.test.") == b"a.test"
    assert match_host(b"[::1]:8080") == b"[::1]"
    assert match_host(None) == b""


def test_regex_never_runs_for_a_host_that_cannot_match() -> None:
    class Boom:
        def search(self, path: bytes) -> None:
            raise AssertionError("regex evaluated")

    table = RouteTable([R("re", hosts=("only.test",), path_regex="x")])
    table.routes[0].regex = Boom()  # type: ignore[assignment]
    assert match(table, host="other.test", target="/x") is None


def test_candidate_cache_is_bounded() -> None:
    table = RouteTable([R("a", hosts=("a.test",)), R("s", path_prefix="/s/")])
    for i in range(CANDIDATE_CACHE_SIZE * 2 + 10):
        match(table, host="h%d.test" % i, target="/s/%d" % i)
    assert len(table._cache) <= CANDIDATE_CACHE_SIZE


def test_split_is_smooth_and_exact() -> None:
    route = RouteTable([R("s", pools=(("stable", 9), ("canary", 1)))]).routes[0]
    seq = [route.pool() for _ in range(100)]
    assert seq.count("canary") == 10
    assert all(seq[i:i + 10].count("canary") <= 1 for i in range(91))
    route3 = RouteTable([R("t", pools=(("a", 5), ("b", 3), ("c", 2)))]).routes[0]
    seq = [route3.pool() for _ in range(100)]
    assert (seq.count("a"), seq.count("b"), seq.count("c")) == (50, 30, 20)


@pytest.mark.parametrize("strip,add,path,want", [
    ("/api", None, b"/api/x", b"/x"), ("/api", None, b"/api", b"/"), ("/api", None, b"/api/", b"/"),
    ("/api", None, b"/apix", b"/apix"), (None, "/v1", b"/x", b"/v1/x"), (None, "/v1", b"/", b"/v1/"),
    ("/api", "/v2", b"/api/x", b"/v2/x"),
])
def test_forward_path(strip: Optional[str], add: Optional[str], path: bytes, want: bytes) -> None:
    route = RouteTable([R("r", strip_prefix=strip, add_prefix=add)]).routes[0]
    assert route.forward_path(path) == want
    assert route.modifies_request


def test_redirect_and_return_responses() -> None:
    red = RouteTable([RouteConfig("r", redirect="https://{host}:{port}{path}{query}", redirect_code=308)]).routes[0]
    assert red.kind == ACT_REDIRECT
    data = red.local_response(b"http", b"a.test", 8080, b"/p", b"?q=1", False, False)
    resp = parse_response_head(data)
    assert resp.status == 308 and resp.header(b"location") == b"https://a.test:8080/p?q=1"
    ret = RouteTable([RouteConfig("r", return_status=200, return_body="ok")]).routes[0]
    assert ret.kind == ACT_RETURN
    data = ret.local_response(b"http", b"a", 80, b"/", b"", True, False)
    resp = parse_response_head(data[:data.index(b"\r\n\r\n") + 4])
    assert resp.status == 200 and data.endswith(b"\r\n\r\nok\n") and resp.header(b"connection") == b"close"
    head_only = ret.local_response(b"http", b"a", 80, b"/", b"", False, True)
    assert head_only.endswith(b"\r\n\r\n")


def test_field_edits_and_counters_carry_over() -> None:
    cfg = [R("r", set_request_headers=(("X-Env", "prod"),), remove_request_headers=("cookie",),
             set_response_headers=(("X-A", "1"),), remove_response_headers=("server",))]
    t1 = RouteTable(cfg)
    r = t1.routes[0]
    assert r.request_extra == b"X-Env: prod\r\n" and r.request_remove == {b"cookie", b"x-env"}
    assert r.response_remove == {b"server", b"x-a"} and r.modifies_response
    r.requests = 7
    t2 = RouteTable(cfg + [R("new")], t1)
    assert [x.requests for x in t2.routes] == [7, 0]


# ---- normalisation ----
@pytest.mark.parametrize("target,path,mpath,query", [
    (b"/", b"/", b"/", b""),
    (b"/api/x?q=/../%61", b"/api/x", b"/api/x", b"?q=/../%61"),
    (b"/%61pi/x", b"/api/x", b"/api/x", b""),
    (b"/api/%7euser", b"/api/~user", b"/api/~user", b""),
    (b"/a%2fb", b"/a%2Fb", b"/a/b", b""),
    (b"/a/./b/../c", b"/a/c", b"/a/c", b""),
    (b"/a/b/..", b"/a/", b"/a/", b""),
    (b"/a/.", b"/a/", b"/a/", b""),
    (b"/x/%2e%2e/admin", b"/admin", b"/admin", b""),
    (b"/x/.%2E/admin", b"/admin", b"/admin", b""),
    (b"//admin/", b"//admin/", b"/admin/", b""),
    (b"/x//..//admin/", b"/x//admin/", b"/admin/", b""),
    (b"/x/..%2fadmin/", b"/x/..%2Fadmin/", b"/admin/", b""),
    (b"/x/..\\admin/", b"/x/..\\admin/", b"/admin/", b""),
    (b"/%252e", b"/%252e", b"/%252e", b""),
    (b"/a%3Fb", b"/a%3Fb", b"/a%3Fb", b""),
])
def test_normalise(target: bytes, path: bytes, mpath: bytes, query: bytes) -> None:
    assert normalise_target(target) == (path, mpath, query)
    again = normalise_target(path + query)
    assert again[0] == path  # idempotent


@pytest.mark.parametrize("target", [
    b"/../x", b"/a/../../x", b"/%2e%2e/x", b"/x/..;/admin", b"/x/.;/admin", b"/%zz", b"/%4", b"/a%",
    b"/a#b", b"//../x",
])
def test_normalise_refuses(target: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        normalise_target(target)
    assert exc.value.status == 400


def test_normalised_paths_hold_no_dot_segments_or_unreserved_escapes() -> None:
    import random
    rng = random.Random(7)
    alphabet = [b"/", b".", b"..", b"%2e", b"%2E", b"%41", b"%2f", b"a", b"b", b"//", b"%7E"]
    for _ in range(3000):
        target = b"/" + b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            path, mpath, _q = normalise_target(target)
        except ProtocolError:
            continue
        segs: List[bytes] = path.split(b"/")
        assert b"." not in segs and b".." not in segs, (target, path)
        assert b"%41" not in path and b"%2E" not in path.upper() and b"%7E" not in path.upper(), (target, path)
        assert b"//" not in mpath and b"%2F" not in mpath, (target, mpath)


# ---------------------------------------------------------------------------- decided hosts (fast path)
DECIDING_TABLES = [
    [R("all", path_prefix="/")],
    [R("api", hosts=("api.test",)), R("all")],
    [R("api", hosts=("api.test",), methods=("POST",)), R("all", path_prefix="/")],
    [R("static", path_prefix="/static/"), R("api", hosts=("api.test",)), R("all")],
    [R("api", hosts=("api.test",), set_request_headers=(("X-A", "1"),)), R("wild", hosts=("*.test",)), R("all")],
    [R("split", pools=(("p", 1), ("q", 1))), R("all")],
    [R("gone", pools=(("missing", 1),)), R("all")],
    [R("ping", path="/ping"), R("canary", headers=(("x-canary", "1"),)), R("inside", client_ip=("10.0.0.0/8",)),
     R("all", path_prefix="/")],
    [R("only-api", path_prefix="/api/"), R("root", path_prefix="/a")],
]
DECIDING_REQUESTS = [
    (m, t, h, hd, c)
    for m in ("GET", "POST")
    for t in ("/", "/static/x", "/ping", "/api/v", "/a", "/x?q=1", "/%61pi/v")
    for h in ("lb.test", "api.test", "API.test:80", "a.b.test", "")
    for hd in ((), (("X-Canary", "1"),))
    for c in ("127.0.0.1", "10.1.2.3")
]


@pytest.mark.parametrize("routes", DECIDING_TABLES, ids=lambda rs: ",".join(r.name for r in rs))
def test_a_decided_host_takes_the_route_matching_would(routes: List[RouteConfig]) -> None:
    """RouteTable.decided (the proxy's no-matching fast path for an origin-form target) names, for a
    Host, only a route that the full match gives for every request to that Host."""
    pools = {"p": object(), "q": object()}
    table = RouteTable(routes, None, pools)  # type: ignore[arg-type]
    for m, t, h, hd, c in DECIDING_REQUESTS:
        match(table, m, t, h, hd, c)  # fills the caches
    assert all(r is not None for r in table.decided)  # keyed by a Host that was received
    for m, t, h, hd, c in DECIDING_REQUESTS:
        req = head(m, t, h, hd)
        decided = table.decided.get(req.host)
        if decided is None:
            continue
        route, pool = decided
        assert match(table, m, t, h, hd, c) == route.name
        assert route.plain and pool is pools[route.config.pools[0][0]]


def test_what_is_decided() -> None:
    pools = {"p": object()}
    table = RouteTable([R("api", hosts=("api.test",), methods=("POST",)), R("edit", hosts=("e.test",),
                        set_response_headers=(("X-A", "1"),)), R("all", path_prefix="/")], None, pools)  # type: ignore[arg-type]
    for host in ("api.test", "e.test", "lb.test", "LB.test"):
        match(table, "GET", "/x", host)
    assert sorted(table.decided) == [b"LB.test", b"lb.test"]
    assert RouteTable([R("all")]).decided == {}  # no pools given: nothing is plain
    assert match(RouteTable([R("all")]), "GET", "/x") == "all"
