"""lb.ini v2: [pool NAME], [health NAME], `pool =` on backends and [route NAME]; one exact line per error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balrs import config as C
from balrs.config import Address, ConfigError, HealthConfig, PoolConfig, RouteConfig, parse_text

BASE = """\
[balancer]
listen = 127.0.0.1:8080

[backend d1]
address = 127.0.0.1:9001

"""  # 6 lines: what follows starts at line 7


def parse(text: str) -> C.Config:
    return parse_text(text, "lb.ini")


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "lb.ini")
    return info.value


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the ``nth`` line of ``text`` that starts with ``needle`` (after indentation)."""
    hits = [i for i, line in enumerate(text.split("\n"), 1) if line.strip().startswith(needle)]
    return hits[nth - 1]


def route(body: str, name: str = "r") -> RouteConfig:
    cfg = parse(BASE + f"[route {name}]\n" + body)
    assert len(cfg.routes) == 1
    return cfg.routes[0]


# ---------------------------------------------------------------------------------------------- v1 unchanged


def test_v1_file_gets_the_implicit_default_pool_only() -> None:
    cfg = parse(BASE)
    assert cfg.pools == (PoolConfig("default"),)
    assert cfg.routes == () and cfg.healths == ()
    assert cfg.backends == (C.BackendConfig("d1", Address("127.0.0.1", 9001), line=4, pool="default"),)
    assert cfg.health is None


def test_v1_health_section_unchanged_and_none_still_rejected_there() -> None:
    cfg = parse(BASE + "[health]\npath = tcp\nrise = 4\n")
    assert cfg.health == HealthConfig(path="tcp", rise=4) and cfg.healths == ()
    err = parse_error(BASE + "[health]\npath = none\n")
    assert (err.line, err.section, err.key) == (8, "health", "path")


def test_v1_multiline_message_unchanged() -> None:
    err = parse_error(BASE + "[log]\nformat = json\n  common\n")
    assert str(err).startswith("lb.ini:8: [log] format: value continues on indented line 9;")
    assert "only listen may span several lines" in err.message


# ---------------------------------------------------------------------------------------------- pools


FULL_POOLS = BASE + """\
[pool api]
strategy = lc
hash_key = header:X-User
retries = 3
queue_timeout = 250ms
backup = fb
health = api

[health api]
path = /ready

[pool empty]

[backend a1]
address = 127.0.0.1:9101
pool = api

[backend f1]
address = 127.0.0.1:9201
pool = fb

[backend a2]
address = 127.0.0.1:9102
pool = api
"""


def test_pools_declared_then_implicit_in_order_of_first_appearance() -> None:
    cfg = parse(FULL_POOLS)
    assert [p.name for p in cfg.pools] == ["api", "empty", "default", "fb"]
    assert cfg.pools[0] == PoolConfig(
        "api", strategy="least_connections", hash_key="header:X-User", retries=3, queue_timeout=0.25,
        backup="fb", health="api", line=7,
    )
    assert cfg.pools[1] == PoolConfig("empty", line=18)  # a declared pool may have no backend
    assert cfg.pools[2] == PoolConfig("default") and cfg.pools[3] == PoolConfig("fb")
    assert [(b.name, b.pool) for b in cfg.backends] == [("d1", "default"), ("a1", "api"), ("f1", "fb"),
                                                         ("a2", "api")]


def test_declared_default_pool_keeps_its_place_and_no_default_without_backends() -> None:
    text = """\
[balancer]
listen = 127.0.0.1:8080
[pool x]
[backend a]
address = 127.0.0.1:1
pool = y
[pool default]
strategy = random
"""
    cfg = parse(text)
    assert [(p.name, p.line) for p in cfg.pools] == [("x", 3), ("default", 7), ("y", 0)]
    assert cfg.pools[1].strategy == "random"
    cfg = parse(text.replace("[pool default]\nstrategy = random\n", ""))
    assert [p.name for p in cfg.pools] == ["x", "y"]  # no backend in "default": no such pool


def test_pool_unset_keys_inherit() -> None:
    cfg = parse(BASE + "[pool p]\n")
    assert cfg.pools[0] == PoolConfig("p", line=7)
    assert cfg.pools[0].strategy is None and cfg.pools[0].health == ""


def test_backup_may_name_an_implicit_pool_and_chains_without_loop_are_fine() -> None:
    cfg = parse(BASE + "[pool a]\nbackup = b\n[pool b]\nbackup = default\n")
    assert [(p.name, p.backup) for p in cfg.pools] == [("a", "b"), ("b", "default"), ("default", None)]


POOL_INVALID: list[tuple[str, str, str, str, str]] = [
    # (name, text after BASE, line prefix blamed, key, message fragment)
    ("bad strategy", "[pool p]\nstrategy = fastest\n", "strategy", "strategy", "unknown strategy 'fastest'"),
    ("bad hash_key", "[pool p]\nhash_key = header:\n", "hash_key", "hash_key", "header needs a name"),
    ("retries range", "[pool p]\nretries = 101\n", "retries", "retries", "0..100"),
    ("queue_timeout", "[pool p]\nqueue_timeout = soon\n", "queue_timeout", "queue_timeout", "invalid duration"),
    ("unknown key", "[pool p]\nstrategie = rr\n", "strategie", "strategie", "did you mean 'strategy'?"),
    ("balancer-only key", "[pool p]\nlisten = 127.0.0.1:1\n", "listen = 127.0.0.1:1", "listen", "unknown key"),
    ("backup unknown", "[pool p]\nbackup = nowhere\n", "backup", "backup", "unknown pool 'nowhere'"),
    ("backup self", "[pool p]\nbackup = p\n", "backup", "backup", "its own backup"),
    ("backup bad name", "[pool p]\nbackup = a b\n", "backup", "backup", "invalid pool name 'a b'"),
    ("health unknown", "[pool p]\nhealth = nope\n", "health", "health", "unknown health section 'nope'"),
    ("health plain is not a name", "[health]\n[pool p]\nhealth = health\n", "health = health", "health",
     "unknown health section 'health'"),
    ("multi-line", "[pool p]\nstrategy = rr\n  lc\n", "strategy", "strategy", "only listen may span"),
]


@pytest.mark.parametrize("extra, blamed, key, fragment", [c[1:] for c in POOL_INVALID],
                         ids=[c[0] for c in POOL_INVALID])
def test_pool_invalid(extra: str, blamed: str, key: str, fragment: str) -> None:
    text = BASE + extra
    err = parse_error(text)
    line = line_of(text, blamed)
    assert (err.line, err.section, err.key) == (line, "pool p", key), str(err)
    assert fragment in err.message, err.message
    assert str(err).startswith(f"lb.ini:{line}: [pool p] {key}: ")


def test_backup_loop_is_blamed_on_the_topmost_pool_of_the_loop() -> None:
    text = BASE + "[pool c]\nbackup = a\n[pool a]\nbackup = b\n[pool b]\nbackup = a\n"
    err = parse_error(text)
    assert str(err) == "lb.ini:10: [pool a] backup: backup chain loops: a -> b -> a"
    err = parse_error(BASE + "[pool x]\nbackup = y\n[pool y]\nbackup = z\n[pool z]\nbackup = x\n")
    assert str(err) == "lb.ini:8: [pool x] backup: backup chain loops: x -> y -> z -> x"


def test_backend_pool_key() -> None:
    err = parse_error(BASE.replace("9001\n", "9001\npool = bad name\n"))
    assert (err.line, err.section, err.key) == (6, "backend d1", "pool")
    assert "invalid pool name 'bad name'" in err.message


@pytest.mark.parametrize("header, fragment", [
    ("[pool]", "pool section needs a name: [pool NAME]"),
    ("[route]", "route section needs a name: [route NAME]"),
    ("[pool a/b]", "invalid pool name 'a/b'"),
    ("[route a b]", "invalid route name 'a b'"),
    ("[health a!]", "invalid health name 'a!'"),
    ("[pools x]", "unknown section (expected [balancer], [health], [admin], [log], [tls], [backend NAME], [pool NAME],"
                  " [health NAME] or [route NAME])"),
])
def test_section_headers(header: str, fragment: str) -> None:
    err = parse_error(BASE + header + "\n")
    assert err.line == 7 and fragment in err.message, str(err)


def test_duplicate_named_sections_and_same_name_in_different_kinds() -> None:
    err = parse_error(BASE + "[pool p]\n[pool p]\n")
    assert (err.line, err.section) == (8, "pool p") and "duplicate section (first at line 7)" in err.message
    cfg = parse(BASE + "[pool p]\n[health p]\n[route p]\npool = p\n")
    assert cfg.pools[0].name == "p" and cfg.healths[0][0] == "p" and cfg.routes[0].name == "p"


# ---------------------------------------------------------------------------------------------- [health NAME]


def test_named_health_inherits_from_plain_health_then_defaults() -> None:
    text = BASE + """\
[health api]
interval = 5s

[health]
path = /h
rise = 4

[health off]
path = NONE
fall = 9

[health tcp]
path = tcp
"""
    cfg = parse(text)
    assert cfg.health == HealthConfig(path="/h", rise=4)
    assert cfg.healths == (
        ("api", HealthConfig(path="/h", interval=5.0, rise=4)),
        ("off", None),
        ("tcp", HealthConfig(path="tcp", rise=4)),
    )
    cfg = parse(BASE + "[health api]\ntimeout = 500ms\n")
    assert cfg.health is None and cfg.healths == (("api", HealthConfig(timeout=0.5)),)


@pytest.mark.parametrize("line, key, fragment", [
    ("path = ready", "path", "'none' for none"),
    ("expect = 700", "expect", "out of range"),
    ("rise = 0", "rise", "at least 1"),
    ("intervall = 2s", "intervall", "did you mean 'interval'?"),
])
def test_named_health_invalid(line: str, key: str, fragment: str) -> None:
    err = parse_error(BASE + "[health api]\n" + line + "\n")
    assert (err.line, err.section, err.key) == (8, "health api", key)
    assert fragment in err.message, err.message


def test_a_broken_health_section_still_exists_for_pools() -> None:
    # only the bad key is blamed, not the pool that names the section
    text = BASE + "[pool p]\nhealth = api\n[health api]\nrise = x\n"
    assert str(parse_error(text)).startswith("lb.ini:10: [health api] rise: ")


# ---------------------------------------------------------------------------------------------- routes: valid


ALL_KEYS = BASE + """\
[backend a1]
address = 127.0.0.1:9101
pool = api

[backend c1]
address = 127.0.0.1:9102
pool = canary

[route api]
host = API.Example.com, *.Example.COM, 10.0.0.1, [::1], 2001:DB8::1
path_prefix = /api/
path = /api/exact
path_regex = ^/api/v[0-9]+/
method = get, Head, PURGE
header = X-Canary: 1
    X-Beta
  Accept:   text/html, */*
client_ip = 10.1.2.3/8, ::1, 192.168.0.7
scheme = HTTPS
pool = api 90, canary 10
strip_prefix = /api
add_prefix = /v1
set_request_header = X-Env: prod
  X-Empty:
remove_request_header = Cookie, X-Debug
  Authorization
set_response_header = Strict-Transport-Security: max-age=31536000
remove_response_header = Server
"""


def test_route_every_key() -> None:
    cfg = parse(ALL_KEYS)
    assert [p.name for p in cfg.pools] == ["default", "api", "canary"]
    assert cfg.routes == (RouteConfig(
        name="api",
        line=15,
        hosts=("api.example.com", "*.example.com", "10.0.0.1", "[::1]", "[2001:db8::1]"),
        path_prefix="/api/",
        path="/api/exact",
        path_regex="^/api/v[0-9]+/",
        methods=("GET", "HEAD", "PURGE"),
        headers=(("x-canary", "1"), ("x-beta", None), ("accept", "text/html, */*")),
        client_ip=("10.0.0.0/8", "::1/128", "192.168.0.7/32"),
        scheme="https",
        pools=(("api", 90), ("canary", 10)),
        strip_prefix="/api",
        add_prefix="/v1",
        set_request_headers=(("X-Env", "prod"), ("X-Empty", "")),
        remove_request_headers=("cookie", "x-debug", "authorization"),
        set_response_headers=(("Strict-Transport-Security", "max-age=31536000"),),
        remove_response_headers=("server",),
    ),)


def test_routes_in_file_order_and_catch_all_route() -> None:
    cfg = parse(BASE + "[route z]\npath = /z\npool = default\n[route a]\npool = default\n")
    assert [(r.name, r.line) for r in cfg.routes] == [("z", 7), ("a", 10)]
    assert cfg.routes[1] == RouteConfig("a", line=10, pools=(("default", 1),))


def test_route_actions() -> None:
    assert route("pool = default\n").pools == (("default", 1),)
    assert route("pool = default 7\n").pools == (("default", 7),)
    r = route("redirect = https://{host}{path}{query}\n")
    assert (r.redirect, r.redirect_code, r.pools) == ("https://{host}{path}{query}", 302, ())
    r = route("redirect = {scheme}://new.test:{port}{path}\nredirect_code = 308\n")
    assert (r.redirect, r.redirect_code) == ("{scheme}://new.test:{port}{path}", 308)
    assert route("redirect = /moved\n").redirect == "/moved"
    assert route("redirect = {path}/\n").redirect == "{path}/"
    r = route("return = 403\n")
    assert (r.return_status, r.return_body) == (403, None)
    r = route("return = 200   ok, all fine  \n")
    assert (r.return_status, r.return_body) == (200, "ok, all fine")
    assert route("return = 204\n").return_status == 204


def test_route_value_forms() -> None:
    assert route("path_prefix = /api/.\npool = default\n").path_prefix == "/api/."  # matches /api/.well-known
    assert route("path_prefix = /a%2Fb\npool = default\n").path_prefix == "/a%2Fb"  # reserved: stays encoded
    assert route("path = /\npool = default\n").path == "/"
    assert route("header =\n  X-A: 1\npool = default\n").headers == (("x-a", "1"),)
    assert route("remove_response_header = Server, X-Powered-By\npool = default\n").remove_response_headers == (
        "server", "x-powered-by")
    assert route("scheme = http\npool = default\n").scheme == "http"
    assert route("client_ip = fd00::/8\npool = default\n").client_ip == ("fd00::/8",)
    assert route("strip_prefix = /a/b\npool = default\n").strip_prefix == "/a/b"


def test_route_pool_may_be_a_declared_pool_without_backends() -> None:
    cfg = parse(BASE + "[route r]\npool = later\n[pool later]\n")
    assert cfg.routes[0].pools == (("later", 1),)


# ---------------------------------------------------------------------------------------------- routes: errors

# (name, route body after "[route r]" at line 7, line prefix blamed or None for the header, key, fragment)
ROUTE_INVALID: list[tuple[str, str, str | None, str | None, str]] = [
    # actions
    ("unknown pool", "path_prefix = /api/\npool = x\n", "pool", "pool", "unknown pool 'x'"),
    ("unknown pool in split", "pool = default 90, x 10\n", "pool", "pool", "unknown pool 'x'"),
    ("no action", "path_prefix = /api/\n", None, None, "no action"),
    ("two actions", "pool = default\nreturn = 403\n", "return", "return",
     "exactly one action, and this one already has pool (line 8)"),
    ("three actions", "return = 403\nredirect = /x\npool = default\n", "redirect", "redirect", "already has return"),
    ("split weight missing", "pool = default 90, default2\n", "pool", "pool", "weight for every pool"),
    ("split weight 0", "pool = default 0\n", "pool", "pool", "1..1000"),
    ("split weight 1001", "pool = default 1001\n", "pool", "pool", "1..1000"),
    ("split weight text", "pool = default lots\n", "pool", "pool", "not a whole number"),
    ("split duplicate", "pool = default 1, default 2\n", "pool", "pool", "listed twice"),
    ("split empty item", "pool = default 1,, x 2\n", "pool", "pool", "empty item"),
    ("split three words", "pool = default 1 2\n", "pool", "pool", "optional weight"),
    ("empty pool", "pool =\n", "pool", "pool", "empty value"),
    ("redirect placeholder", "redirect = https://{hostname}{path}\n", "redirect", "redirect",
     "unknown placeholder '{hostname}'"),
    ("redirect empty placeholder", "redirect = /{}\n", "redirect", "redirect", "unknown placeholder '{}'"),
    ("redirect unmatched brace", "redirect = /x{path\n", "redirect", "redirect", "unmatched '{'"),
    ("redirect stray close", "redirect = /x}\n", "redirect", "redirect", "unmatched '}'"),
    ("redirect control", "redirect = /a\x01b\n", "redirect", "redirect", "control characters"),
    ("redirect space", "redirect = /a b\n", "redirect", "redirect", "spaces"),
    ("redirect relative", "redirect = {host}{path}\n", "redirect", "redirect", "must start with a scheme"),
    ("redirect empty", "redirect =\n", "redirect", "redirect", "empty URL"),
    ("redirect code", "redirect = /x\nredirect_code = 300\n", "redirect_code", "redirect_code",
     "expected 301, 302, 303, 307, 308"),
    ("redirect_code without redirect", "pool = default\nredirect_code = 301\n", "redirect_code", "redirect_code",
     "only with redirect"),
    ("return 1xx", "return = 101\n", "return", "return", "200..599"),
    ("return 600", "return = 600\n", "return", "return", "200..599"),
    ("return text", "return = forbidden\n", "return", "return", "expected a status"),
    ("return 304 body", "return = 304 x\n", "return", "return", "has no body"),
    # modifiers
    ("modifier with return", "return = 403\nstrip_prefix = /api\n", "strip_prefix", "strip_prefix",
     "only with pool (this route's action is return)"),
    ("modifier with redirect", "redirect = /x\nset_response_header = X-A: 1\n", "set_response_header",
     "set_response_header", "only with pool"),
    ("strip_prefix slash", "pool = default\nstrip_prefix = /\n", "strip_prefix", "strip_prefix", "does nothing"),
    ("strip_prefix trailing", "pool = default\nstrip_prefix = /api/\n", "strip_prefix", "strip_prefix",
     "must not end with '/' (write '/api')"),
    ("add_prefix slash", "pool = default\nadd_prefix = /\n", "add_prefix", "add_prefix", "does nothing"),
    ("add_prefix trailing", "pool = default\nadd_prefix = /v1/\n", "add_prefix", "add_prefix", "must not end"),
    ("add_prefix relative", "pool = default\nadd_prefix = v1\n", "add_prefix", "add_prefix", "start with '/'"),
    ("set framing", "pool = default\nset_request_header = Content-Length: 5\n", "set_request_header",
     "set_request_header", "frames messages by"),
    ("set no value", "pool = default\nset_request_header = X-A\n", "set_request_header", "set_request_header",
     "has no value"),
    ("set twice", "pool = default\nset_response_header = X-A: 1\n  x-a: 2\n", "x-a: 2", "set_response_header",
     "set twice"),
    ("set bad name", "pool = default\nset_request_header = X A: 1\n", "set_request_header", "set_request_header",
     "not a valid header field name"),
    ("set control value", "pool = default\nset_request_header = X-A: a\x7fb\n", "set_request_header",
     "set_request_header", "control characters"),
    ("remove framing", "pool = default\nremove_request_header = Cookie, Transfer-Encoding\n",
     "remove_request_header", "remove_request_header", "cannot remove it"),
    ("remove framing response", "pool = default\nremove_response_header = Server\n  Connection\n", "Connection",
     "remove_response_header", "frames messages by"),
    ("remove twice", "pool = default\nremove_request_header = cookie, Cookie\n", "remove_request_header",
     "remove_request_header", "listed twice"),
    ("set and remove", "pool = default\nset_request_header = X-A: 1\nremove_request_header = x-a\n",
     "remove_request_header", "remove_request_header", "X-A is both set and removed"),
    # match keys
    ("host port", "host = a.test:8080\npool = default\n", "host", "host", "no port here"),
    ("host ipv6 port", "host = [::1]:80\npool = default\n", "host", "host", "no port here"),
    ("host bad", "host = a_b!.test\npool = default\n", "host", "host", "invalid host name"),
    ("host star inside", "host = a.*.test\npool = default\n", "host", "host", "whole first label"),
    ("host star alone", "host = *\npool = default\n", "host", "host", "whole first label"),
    ("host wildcard ip", "host = *.0.0.1\npool = default\n", "host", "host", "not an IP address"),
    ("host bad ipv4", "host = 10.0.0.300\npool = default\n", "host", "host", "not a valid IPv4 address"),
    ("host trailing dot", "host = a.test.\npool = default\n", "host", "host", "trailing '.'"),
    ("host twice", "host = A.test, a.test\npool = default\n", "host", "host", "listed twice"),
    ("host empty", "host =\npool = default\n", "host", "host", "at least one"),
    ("path relative", "path = api\npool = default\n", "path", "path", "must start with '/'"),
    ("path query", "path = /a?b=1\npool = default\n", "path", "path", "'?'"),
    ("path fragment", "path_prefix = /a#b\npool = default\n", "path_prefix", "path_prefix", "'#'"),
    ("path space", "path = /a\tb\npool = default\n", "path", "path", "spaces or control"),
    ("path non-ascii", "path = /\u00e9\npool = default\n", "path", "path", "ASCII"),
    ("path encoded unreserved", "path_prefix = /%61pi/\npool = default\n", "path_prefix", "path_prefix",
     "write 'a' for '%61'"),
    ("path bad percent", "path = /a%zz\npool = default\n", "path", "path", "two hex digits"),
    ("path dot segment", "path = /a/../b\npool = default\n", "path", "path", "dot-segments"),
    ("path prefix dot segment", "path_prefix = /a/./\npool = default\n", "path_prefix", "path_prefix",
     "dot-segments"),
    ("bad regex", "path_regex = ^/(v[0-9]+\npool = default\n", "path_regex", "path_regex",
     "invalid regular expression '^/(v[0-9]+': missing ), unterminated subpattern at position 2"),
    ("bad method", "method = GET, G(T\npool = default\n", "method", "method", "'G(T' is not a method"),
    ("method twice", "method = get, GET\npool = default\n", "method", "method", "listed twice"),
    ("bad header name", "header = X Canary: 1\npool = default\n", "header", "header",
     "'X Canary' is not a valid header field name"),
    ("header control value", "header = X-A: a\x01\npool = default\n", "header", "header", "control characters"),
    ("header twice", "header = X-A: 1\n  x-a\npool = default\n", "x-a", "header", "listed twice"),
    ("header continuation has a key", "return = 403\nheader = X-A: 1\n  pool = default\n", "pool = default", "header",
     "an indented line continues the value above"),
    ("bad cidr", "client_ip = 10.0.0.0/33\npool = default\n", "client_ip", "client_ip",
     "invalid address or CIDR '10.0.0.0/33'"),
    ("bad address", "client_ip = 10.0.0.0/8, localhost\npool = default\n", "client_ip", "client_ip",
     "invalid address or CIDR 'localhost'"),
    ("bracketed ipv6", "client_ip = [::1]\npool = default\n", "client_ip", "client_ip", "without brackets"),
    ("cidr twice", "client_ip = 10.0.0.1/8, 10.0.0.0/8\npool = default\n", "client_ip", "client_ip",
     "10.0.0.0/8 is listed twice"),
    ("bad scheme", "scheme = ftp\npool = default\n", "scheme", "scheme", "expected http or https"),
    # syntax
    ("unknown key", "pool = default\npath_prefx = /a\n", "path_prefx", "path_prefx", "did you mean 'path_prefix'?"),
    ("pool key in route", "pool = default\nstrategy = rr\n", "strategy", "strategy", "unknown key"),
    ("continuation of a single-valued key", "host = a.test\n  b.test\npool = default\n", "host", "host",
     "value continues on indented line 9; only header, remove_request_header"),
    ("duplicate key", "pool = default\npool = default\n", "pool", "pool", "duplicate key (first at line 8)"),
]


@pytest.mark.parametrize("body, blamed, key, fragment", [c[1:] for c in ROUTE_INVALID],
                         ids=[c[0] for c in ROUTE_INVALID])
def test_route_invalid(body: str, blamed: str | None, key: str | None, fragment: str) -> None:
    text = BASE + "[route r]\n" + body
    err = parse_error(text)
    if blamed is None:
        line = 7
    else:
        line = line_of(text, blamed, nth=2 if key == "pool" and "duplicate" in fragment else 1)
    assert (err.line, err.section, err.key) == (line, "route r", key), str(err)
    assert fragment in err.message, err.message
    prefix = f"lb.ini:{line}: [route r]" + (f" {key}: " if key else ": ")
    assert str(err).startswith(prefix) and "\n" not in str(err)


def test_unknown_pool_is_blamed_at_the_pool_line_exactly() -> None:
    text = BASE + "[backend a1]\naddress = 127.0.0.1:9101\npool = api\n\n[route api]\npath_prefix = /api/\npool = x\n"
    err = parse_error(text)
    assert str(err) == (
        "lb.ini:13: [route api] pool: unknown pool 'x' (no [pool x] section, and no backend has pool = x)"
    )


def test_the_error_nearest_the_top_wins_across_route_and_other_sections() -> None:
    # the route's unknown pool (line 8) is above a bad key later in the same route and a bad backend
    text = BASE + "[route r]\npool = x\npath_regex = (\n[backend b2]\naddress = nowhere\n"
    assert parse_error(text).line == 8
    # a bad key above the route's pool line wins over it
    text = BASE + "[route r]\npath_regex = (\npool = x\n"
    assert (parse_error(text).line, parse_error(text).key) == (8, "path_regex")
    # a backend whose other keys are wrong still puts its pool into existence: only its bad key is blamed
    text = BASE + "[route r]\npool = api\n[backend a1]\naddress = 127.0.0.1:1\nweight = 0\npool = api\n"
    err = parse_error(text)
    assert (err.line, err.section, err.key) == (11, "backend a1", "weight")


def test_no_action_beats_modifier_errors_of_the_same_route() -> None:
    err = parse_error(BASE + "[route r]\nstrip_prefix = /api\n")
    assert (err.line, err.key) == (7, None) and "no action" in err.message


def test_check_names_the_pool_line(tmp_path: Path) -> None:
    # --check goes through the same parser: one line, the path as given, exit 2
    path = tmp_path / "lb.ini"
    path.write_text(BASE + "[route api]\npool = nosuchpool\n")
    message = (f"{path}:8: [route api] pool: unknown pool 'nosuchpool'"
               " (no [pool nosuchpool] section, and no backend has pool = nosuchpool)")
    with pytest.raises(ConfigError) as info:
        C.load(str(path))
    assert str(info.value) == message
    done = subprocess.run([sys.executable, "-m", "balrs", "--check", str(path)], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parent.parent), timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == message, done.stderr
