"""explain.py on real pools and route tables (no sockets): every reason a backend is out of rotation,
every route key that can fail, the pool's backup and panic, the strategy's view, the pick made on a copy,
and what the backend receives. The live states are set through the backends' own methods, as health
checks, the admin API and reloads set them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from balrs.config import parse_text
from balrs.explain import Question, explain, explain_config, question_from_query, render
from balrs.http.heads import parse_request_head
from balrs.pool import ADMIN_DRAIN, ADMIN_MAINT, Pools
from balrs.routing import RouteTable, match_host
from balrs.settings import Settings
from balrs.strategies import make_strategy

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[balancer]
listen = 127.0.0.1:8080
strategy = {strategy}
{balancer}

[health]
path = /health
interval = 2s
fall = 3
rise = 2

{extra}
[backend a]
address = 127.0.0.1:9001
{a}
[backend b]
address = 127.0.0.1:9002

[backend c]
address = 127.0.0.1:9003
"""


class Live:
    """A config's pools and routes as a running balancer holds them, on a clock the test sets."""

    def __init__(self, text: str) -> None:
        self.config = parse_text(text, "lb.ini")
        self.now = 100.0
        self.pools = Pools(self.config, clock=lambda: self.now, make_strategy=make_strategy, resolve=False)
        self.router = RouteTable(self.config.routes, None, self.pools.named) if self.config.routes else None
        self.settings = Settings.from_config(self.config)

    def backend(self, name: str) -> Any:
        b = self.pools.by_name(name)
        assert b is not None
        return b

    def ask(self, target: str = "/", **kw: Any) -> Dict[str, Any]:
        method = kw.pop("method", "GET")
        doc = explain(Question(method, target, **kw), self.config, self.pools, self.router, self.settings,
                      self.now, True)
        render(doc)  # the text form renders every answer
        json.dumps(doc)  # and so does the JSON form
        return doc


def conf(strategy: str = "round_robin", balancer: str = "", extra: str = "", a: str = "") -> str:
    return BASE.format(strategy=strategy, balancer=balancer, extra=extra, a=a)


def entries(doc: Dict[str, Any], pool: int = 0) -> Dict[str, Dict[str, Any]]:
    return {b["name"]: b for b in doc["pools"][pool]["backends"]}


# ---- backends: every exclusion reason ----------------------------------------------------------------
def test_every_exclusion_reason_is_named() -> None:
    lb = Live(conf(a="max_connections = 2\n", extra="""
[backend d]
address = 127.0.0.1:9004

[backend e]
address = 127.0.0.1:9005

[backend f]
address = 127.0.0.1:9006
"""))
    a, b, c = lb.backend("a"), lb.backend("b"), lb.backend("c")
    d, e, f = lb.backend("d"), lb.backend("e"), lb.backend("f")
    # a: at max_connections; b: down by health; c: ejected; d: admin drain; e: maint; f: slow start
    a.take_slot()
    a.take_slot()
    for _ in range(3):
        b.probe_failed(lb.now - 1.5, "connect: Connection refused")
    b.mark_down()
    c.eject(lb.now + 12.0)
    c.live_failure()
    d.set_admin_state(ADMIN_DRAIN)
    e.set_admin_state(ADMIN_MAINT)
    f.set_effective_weight(0.25)
    lb.pools.refresh()
    doc = lb.ask("/")
    got = entries(doc)
    assert got["a"]["eligible"] is False and "at max_connections (2 in flight of 2)" in got["a"]["reason"]
    assert got["b"]["state"] == "down" and "down by health checks: 3 consecutive probe failure(s)" in got["b"]["reason"]
    assert "fall 3, rise 2" in got["b"]["reason"] and "last probe 1.5s ago failed: connect: Connection refused" \
        in got["b"]["reason"]
    assert "ejected by passive health checks for another 12.0s" in got["c"]["reason"]
    assert "draining (set by the admin API)" in got["d"]["reason"] and got["d"]["state"] == "drain"
    assert "maint (set by the admin API)" in got["e"]["reason"] and got["e"]["state"] == "maint"
    assert got["f"]["eligible"] is True and "slow start: weight 0.25 of 1" in got["f"]["reason"]
    assert doc["pick"] == "f" and "sent to f" in doc["outcome"]["why"]
    text = render(doc)
    for reason in ("at max_connections", "down by health", "ejected", "draining", "maint", "slow start"):
        assert reason in text


def test_reload_retired_and_unresolved_backends() -> None:
    lb = Live(conf())
    a = lb.backend("a")
    a.take_slot()
    new = parse_text(conf().replace("[backend a]\naddress = 127.0.0.1:9001\n", ""), "lb.ini")
    lb.pools.reload(new, lambda _c: False)
    lb.config = new
    doc = lb.ask("/")
    got = entries(doc)
    assert "removed from the configuration by a reload, finishing 1 request(s)" in got["a"]["reason"]
    assert got["a"]["eligible"] is False
    # A backend whose host name is not resolved yet.
    text = conf().replace("address = 127.0.0.1:9003", "address = backend-c.invalid:9003")
    config = parse_text(text, "lb.ini")
    pools = Pools(config, clock=lambda: 0.0, make_strategy=make_strategy, resolve=False)
    c = pools.by_name("c")
    assert c is not None
    c.resolved = False  # as a backend whose name the resolver thread has not answered yet
    pools.refresh()
    doc = explain(Question("GET", "/"), config, pools, None, Settings.from_config(config), 0.0, True)
    assert "unresolved: no address for backend-c.invalid yet" in entries(doc)["c"]["reason"]


def test_no_backend_then_backup_pool_then_503() -> None:
    text = conf(extra="""
[pool default]
backup = spare

[backend s1]
address = 127.0.0.1:9101
pool = spare
""")
    lb = Live(text)
    for name in "abc":
        lb.backend(name).mark_down()
    lb.pools.refresh()
    doc = lb.ask("/")
    assert [p["name"] for p in doc["pools"]] == ["default", "spare"]
    assert "its backup pool spare serves" in doc["pools"][0]["note"]
    assert doc["pick"] == "s1"
    lb.backend("s1").set_admin_state(ADMIN_MAINT)
    lb.pools.refresh()
    doc = lb.ask("/")
    assert doc["outcome"]["status"] == 503 and "nor of its backup pools" in doc["outcome"]["why"]
    assert "pick" not in doc


def test_all_full_queues() -> None:
    text = conf(a="max_connections = 1\n")
    for name, port in (("b", 9002), ("c", 9003)):
        line = "[backend %s]\naddress = 127.0.0.1:%d\n" % (name, port)
        text = text.replace(line, line + "max_connections = 1\n")
    lb = Live(text)
    for name in "abc":
        lb.backend(name).take_slot()
    doc = lb.ask("/")
    assert doc["outcome"]["status"] is None and "waits in pool default's queue" in doc["outcome"]["why"]


def test_panic_mode_balances_over_down_backends() -> None:
    lb = Live(conf(balancer="panic_threshold = 50%"))
    lb.backend("a").mark_down()
    lb.backend("b").mark_down()
    lb.pools.refresh()
    doc = lb.ask("/")
    assert doc["pools"][0]["panic"] is True
    assert "in rotation anyway: the pool is in panic mode" in entries(doc)["a"]["reason"]
    assert "PANIC" in render(doc)


# ---- the strategy's view and the pick ------------------------------------------------------------------
def test_the_pick_moves_no_cursor() -> None:
    lb = Live(conf())
    strategy = lb.pools.named["default"].strategy
    picks = [lb.ask("/")["pick"] for _ in range(5)]
    assert picks == ["a"] * 5, "explain moved the round-robin cycle"
    assert strategy.choose(parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "1.2.3.4").name == "a"
    assert lb.ask("/")["pick"] == "b"  # the real pick moved it; explain follows
    assert lb.ask("/")["pools"][0]["view"]["next"][:3] == ["b", "c", "a"]


def test_least_connections_and_response_time_scores() -> None:
    lb = Live(conf(strategy="least_connections"))
    lb.backend("a").take_slot()
    lb.backend("b").take_slot()
    doc = lb.ask("/")
    assert doc["pools"][0]["view"]["scores"] == {"a": 1, "b": 1, "c": 0}
    assert doc["pick"] == "c"
    lb = Live(conf(strategy="least_response_time"))
    lb.backend("a").observe(0.050, lb.now)
    lb.backend("b").observe(0.010, lb.now)
    lb.backend("c").observe(0.200, lb.now)
    doc = lb.ask("/")
    scores = doc["pools"][0]["view"]["scores"]
    assert scores == {"a": 0.05, "b": 0.01, "c": 0.2}
    assert doc["pick"] == "b"
    assert entries(doc)["c"]["response_time_ms"] == 200.0


def test_consistent_hash_names_the_ring_point_and_owner() -> None:
    lb = Live(conf(strategy="consistent_hash", balancer="hash_key = header:X-User"))
    doc = lb.ask("/", headers=[("X-User", "alice")])
    view = doc["pools"][0]["view"]
    assert view["key"] == "alice" and len(view["point"]) == 16 and view["owner"] == doc["pick"]
    assert view["under_load_bound"] is True
    # The same key again: the same owner (and the same as a real pick).
    req = parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-User: alice\r\n\r\n")
    assert lb.pools.named["default"].strategy.choose(req, "127.0.0.1").name == view["owner"]
    doc = lb.ask("/")
    assert doc["pools"][0]["view"]["key"] is None and "round robin" in doc["pools"][0]["view"]["note"]


def test_sticky_cookie_is_followed_and_reported() -> None:
    lb = Live(conf(balancer="sticky = cookie:SRV"))
    doc = lb.ask("/")
    assert "sets the SRV cookie for a" in doc["sticky_set"]
    pool = lb.pools.named["default"]
    assert pool.sticky is not None
    cookie = "SRV=%s" % pool.sticky.id_of("c").decode()
    doc = lb.ask("/", cookie=cookie)
    assert doc["pick"] == "c" and doc["pools"][0]["cookie"] == "names c" and "sticky_set" not in doc
    doc = lb.ask("/", cookie="SRV=0123456789abcdef0123456789abcdef")
    assert doc["pools"][0]["cookie"] == "not a valid id here" and doc["sticky_set"]
    lb.backend("c").mark_down()
    lb.pools.refresh()
    doc = lb.ask("/", cookie=cookie)
    assert doc["pick"] != "c" and "sticky_set" in doc


def test_ip_hash_view() -> None:
    lb = Live(conf(strategy="ip_hash"))
    doc = lb.ask("/", client_ip="10.1.2.3")
    view = doc["pools"][0]["view"]
    assert view["key"] == "10.1.2.3" and view["owner"] == doc["pick"]


# ---- routes -------------------------------------------------------------------------------------------
ROUTES = """
[pool api]
[pool web]
[pool canary]

[backend api1]
address = 127.0.0.1:9101
pool = api

[backend web1]
address = 127.0.0.1:9201
pool = web

[backend can1]
address = 127.0.0.1:9301
pool = canary

[route https_only]
scheme = https
path_prefix = /secure/
return = 403

[route by_method]
method = DELETE
pool = api

[route by_header]
header = X-Debug: 1
pool = api

[route from_office]
client_ip = 10.0.0.0/8
path = /office
pool = web

[route by_regex]
path_regex = ^/v[0-9]+/
pool = web

[route old]
path_prefix = /old/
redirect = https://{host}/new{path}
redirect_code = 301

[route api]
host = api.test, *.api.test
path_prefix = /api/
pool = api
strip_prefix = /api
set_request_header = X-Env: prod
remove_request_header = Cookie

[route split]
host = www.test
pool = web 3, canary 1
"""


def test_each_route_key_says_why_it_did_not_match() -> None:
    lb = Live(conf(extra=ROUTES))
    doc = lb.ask("/api/users?id=7", host="eu.api.test", headers=[("X-Debug", "0")], cookie="session=x")
    why = {t["name"]: t["mismatch"] for t in doc["routes"]}
    assert why["https_only"] == "path_prefix: /api/users does not start with /secure/"
    assert why["by_method"] == "methods: GET is not one of DELETE"
    assert why["by_header"] == "header x-debug: 0 is not 1"
    assert why["from_office"] == "path: /api/users is not /office"
    assert why["by_regex"] == "path_regex: /api/users does not match ^/v[0-9]+/"
    assert why["old"] == "path_prefix: /api/users does not start with /old/"
    assert why["api"] is None and doc["route"] == "api" and doc["routes"][-1]["matched"]
    assert doc["pool"] == "api" and doc["pick"] == "api1"
    fwd = doc["forwarded"]
    assert fwd[0] == "GET /users?id=7 HTTP/1.1"
    assert "X-Env: prod" in fwd and not any(line.lower().startswith("cookie:") for line in fwd)
    assert "X-Forwarded-For: 127.0.0.1" in fwd and "X-Forwarded-Host: eu.api.test" in fwd
    doc = lb.ask("/secure/x")
    assert doc["routes"][0]["mismatch"] == "scheme: http is not https"
    doc = lb.ask("/office", client_ip="192.168.1.1", host="x.test")
    assert {t["name"]: t["mismatch"] for t in doc["routes"]}["from_office"] == \
        "client_ip: 192.168.1.1 is not in 10.0.0.0/8"
    doc = lb.ask("/api/x", host="other.test")
    assert {t["name"]: t["mismatch"] for t in doc["routes"]}["api"] == "host: other.test is not api.test or *.api.test"
    doc = lb.ask("/z", host="x.test", headers=[("X-Other", "1")])
    assert {t["name"]: t["mismatch"] for t in doc["routes"]}["by_header"] == "header x-debug: absent"
    assert doc["route"] is None and doc["pool"] == "default" and "no route matched" in doc["pool_why"]


def test_local_answers_and_no_default_pool() -> None:
    lb = Live(conf(extra=ROUTES))
    doc = lb.ask("/old/page?q=1", host="www.test:8080")
    assert doc["outcome"] == {"status": 301, "why": "route old redirects",
                              "location": "https://www.test/new/old/page"}
    doc = lb.ask("/secure/x", scheme="https")
    assert doc["outcome"]["status"] == 403 and "answers itself" in doc["outcome"]["why"]
    text = """
[balancer]
listen = 127.0.0.1:8080

[pool api]

[backend api1]
address = 127.0.0.1:9101
pool = api

[route api]
path_prefix = /api/
pool = api
"""
    doc = explain_config(Question("GET", "/else"), parse_text(text, "lb.ini"))
    assert doc["outcome"]["status"] == 404 and "no default pool" in doc["outcome"]["why"]


def test_a_split_reports_its_turn_without_taking_it() -> None:
    lb = Live(conf(extra=ROUTES))
    seen = [lb.ask("/", host="www.test")["pool"] for _ in range(4)]
    assert seen == ["web"] * 4, "explain moved the split"
    route = [r for r in lb.router.routes if r.name == "split"][0]  # type: ignore[union-attr]
    assert [route.pool() for _ in range(4)] == ["web", "web", "canary", "web"]
    assert "splits web 3, canary 1" in lb.ask("/", host="www.test")["pool_why"]


def test_mismatch_agrees_with_the_route_table() -> None:
    """For random requests, the first route with no mismatch is the one RouteTable.match picks."""
    lb = Live(conf(extra=ROUTES))
    rng = random.Random(7)
    router = lb.router
    assert router is not None
    hosts = ["api.test", "eu.api.test", "www.test", "x.test", "API.TEST:80", "", "10.0.0.1"]
    paths = ["/", "/api/", "/api/x", "/office", "/v2/x", "/old/a", "/secure/x", "/apix"]
    for _ in range(600):
        method = rng.choice(["GET", "DELETE", "POST"])
        host = rng.choice(hosts)
        path = rng.choice(paths)
        fields = "".join(rng.sample(["X-Debug: 1\r\n", "X-Debug: 0\r\n", "X-A: b\r\n"], rng.randint(0, 2)))
        ip = rng.choice(["10.1.1.1", "192.168.0.1", "::1"])
        scheme = rng.choice([b"http", b"https"])
        req = parse_request_head(("%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, path, host, fields)).encode())
        real = router.match(req, req.host, path.encode(), ip, scheme)
        mine = next((r for r in router.routes
                     if r.mismatch(req, match_host(req.host), path.encode(), ip, scheme) is None), None)
        assert mine is real, (method, host, path, fields, ip, scheme)


# ---- requests ------------------------------------------------------------------------------------------
def test_refused_requests_and_normalised_paths() -> None:
    lb = Live(conf())
    doc = lb.ask("/", headers=[("Bad Name", "x")])
    assert doc["outcome"]["status"] == 400 and "refused" in doc["outcome"]["why"] and "pools" not in doc
    doc = lb.ask("/", method="CONNECT")
    assert doc["outcome"]["status"] in (400, 501)
    doc = lb.ask("/a/./b/../%63?x=1")
    assert doc["path"] == "/a/c" and doc["query"] == "?x=1"
    assert doc["forwarded"][0] == "GET /a/c?x=1 HTTP/1.1"


def test_request_id_and_trusted_proxies() -> None:
    text = conf(balancer="trusted_proxies = 10.0.0.0/8\n").replace(
        "[health]", "[log]\nrequest_id = X-Request-ID\n\n[health]")
    lb = Live(text)
    doc = lb.ask("/", headers=[("X-Request-ID", "abc-1")])
    assert doc["request_id"] == "kept: abc-1" and "X-Request-ID: abc-1" in doc["forwarded"]
    doc = lb.ask("/", headers=[("X-Request-ID", "bad id!")])
    assert doc["request_id"].startswith("generated")
    doc = lb.ask("/", client_ip="10.0.0.5", headers=[("X-Forwarded-For", "203.0.113.9")])
    assert doc["client"].startswith("203.0.113.9 (from X-Forwarded-For")
    assert "X-Forwarded-For: 203.0.113.9, 10.0.0.5" in doc["forwarded"]
    doc = lb.ask("/", client_ip="192.0.2.1", headers=[("X-Forwarded-For", "203.0.113.9")])
    assert "client" not in doc and "X-Forwarded-For: 192.0.2.1" in doc["forwarded"]


def test_question_from_query_round_trips() -> None:
    q = Question("DELETE", "/a?b=c", "h.test", [("X-A", "1:2"), ("X-B", "")], "10.0.0.1", "S=1", "https")
    back = question_from_query(q.query())
    assert (back.method, back.target, back.host, back.headers, back.client_ip, back.cookie, back.scheme) == (
        "DELETE", "/a?b=c", "h.test", [("X-A", "1:2"), ("X-B", "")], "10.0.0.1", "S=1", "https")
    assert question_from_query("request=POST%20/x").method == "POST"
    with pytest.raises(ValueError):
        question_from_query("header=nocolon")


# ---- the command line on the examples ------------------------------------------------------------------
def run(*args: str) -> Tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "balrs", "explain"] + list(args), cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("config,request_line,host,expect", [
    ("examples/lb.ini", "GET /", None, ["pool default", "app1", "pick      app3"]),
    ("examples/routed.ini", "GET /api/users", "api.example.com", ["route     api", "GET /users HTTP/1.1"]),
    ("examples/python-strategy.ini", "GET /", None, ['strategy view: {"class": "strategies:FastestTwo"}']),
])
def test_cli_on_the_examples(config: str, request_line: str, host: Optional[str], expect: List[str]) -> None:
    args = [config, request_line] + (["--host", host] if host else [])
    rc, out, err = run(*args)
    assert rc == 0, err
    for e in expect:
        assert e in out, (e, out)
    rc, out, err = run(*(args + ["--json"]))
    assert rc == 0 and json.loads(out)["pick"]


def test_cli_on_a_tls_config(tmp_path: Path) -> None:
    from pki import PKI, have_openssl  # tests/pki.py: a CA and server certificates
    if not have_openssl():
        pytest.skip("no openssl to make a certificate")
    pki = PKI(tmp_path / "pki")
    ini = tmp_path / "tls.ini"
    ini.write_text("[balancer]\nlisten = 127.0.0.1:8443 tls\n\n[tls]\ncert = %s\nkey = %s\n\n"
                   "[route secure]\nscheme = https\npool = default\nset_request_header = X-TLS: yes\n\n"
                   "[backend a]\naddress = 127.0.0.1:9001\n" % (pki.crt("a.test"), pki.key("a.test")))
    rc, out, err = run(str(ini), "GET /x", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["request"]["scheme"] == "https" and doc["route"] == "secure"
    assert "X-Forwarded-Proto: https" in doc["forwarded"] and "X-TLS: yes" in doc["forwarded"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    rc, out, err = run("examples/lb.ini", "GET")
    assert rc == 0  # "GET" alone is GET /
    rc, out, err = run("examples/lb.ini", "GET /a b")
    assert rc == 2 and err.startswith("balrs explain:") and "Traceback" not in err
    rc, out, err = run("examples/lb.ini", "GET /", "--header", "nocolon")
    assert rc == 2 and "--header" in err
    bad = tmp_path / "bad.ini"
    bad.write_text("[balancer]\nlisten = 127.0.0.1:1\nstratgy = round_robin\n[backend a]\naddress = 127.0.0.1:2\n")
    rc, out, err = run(str(bad), "GET /")
    assert rc == 2 and err.startswith("%s:3:" % bad) and "Traceback" not in err
    rc, out, err = run("examples/lb.ini", "GET /", "--admin", "127.0.0.1:1")
    assert rc == 1 and err.startswith("balrs explain: --admin 127.0.0.1:1:") and "Traceback" not in err
