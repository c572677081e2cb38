"""lb.ini parsing: the contract's example, every value form, and one exact line number per kind of error."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pickle
import random
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

from balrs import config as C
from balrs.config import Address, ConfigError, parse_address, parse_duration, parse_size, parse_text

CONFORMANCE = Path("/work/shared/conformance")

# A copy of the ```ini block of CONTRACT.md, so the test still runs where the conformance tree is absent.
CONTRACT_EXAMPLE = """\
[balancer]
listen = 127.0.0.1:8080          ; one or more comma-separated host:port ([::1]:8080 for IPv6)
strategy = round_robin           ; round_robin (rr) | weighted_round_robin (wrr) | least_connections (lc) |
                                 ; weighted_least_connections (wlc) | least_response_time (lrt) |
                                 ; weighted_least_response_time (wlrt) | power_of_two | random | ip_hash | consistent_hash
hash_key = client_ip             ; for consistent_hash: client_ip | path | header:NAME | cookie:NAME
connect_timeout = 2s             ; TCP connect to a backend
header_timeout = 10s             ; a client must deliver a complete request head within this (slowloris)
client_timeout = 60s             ; idle keep-alive time between client requests
backend_timeout = 30s            ; backend silent this long while a response is due -> 504
retries = 1                      ; other backends tried when connect fails / is refused (never after bytes were sent upstream for non-idempotent requests)
max_connections = 10000          ; client connections; above it new ones wait in the accept backlog
max_header_bytes = 64k           ; request line + headers; above it -> 431 (414 acceptable for an over-long URI)
max_body_bytes = 0               ; 0 = unlimited; above it -> 413
drain_timeout = 30s
queue_timeout = 5s               ; how long a request may wait for a backend slot (max_connections)
workers = 1                      ; processes sharing the port with SO_REUSEPORT
resolve_interval = 30s           ; backend host names are re-resolved this often (off the event loop)

[health]                         ; optional section; absent = no active probes
path = /health                   ; HTTP GET probe path; `tcp` = TCP connect probe only
interval = 2s
timeout = 1s
rise = 2                         ; consecutive successes to mark a backend up
fall = 3                         ; consecutive failures to mark it down
expect = 200-399

[backend NAME]                   ; one section per backend
address = 127.0.0.1:9001         ; host:port; a host name is re-resolved every `resolve_interval`
weight = 1                        ; 1..256, used by the weighted strategies
max_connections = 0               ; 0 = unlimited; when every eligible backend is full, requests queue up to queue_timeout, then 503

[admin]                          ; optional
listen = 127.0.0.1:9100          ; GET /metrics (Prometheus text format), GET /status (JSON: backends with name, address, state up/down, active connections, requests)
"""

MINIMAL = """\
[balancer]
listen = 127.0.0.1:8080

[backend b1]
address = 127.0.0.1:9001
"""


def parse(text: str, path: str = "lb.ini") -> C.Config:
    return parse_text(text, path)


def parse_error(text: str, path: str = "lb.ini") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_text(text, path)
    return info.value


def with_balancer(*lines: str) -> str:
    """MINIMAL with extra lines at the end of [balancer] (they start on line 3)."""
    head, tail = MINIMAL.split("\n\n", 1)
    return head + "\n" + "".join(line + "\n" for line in lines) + "\n" + tail


# ---------------------------------------------------------------------------------------------- the contract


def check_contract_example(cfg: C.Config) -> None:
    assert cfg.path == "lb.ini"
    assert cfg.listen == (Address("127.0.0.1", 8080),)
    assert cfg.strategy == "round_robin"
    assert cfg.hash_key == "client_ip"
    assert (cfg.connect_timeout, cfg.header_timeout, cfg.client_timeout, cfg.backend_timeout) == (
        2.0,
        10.0,
        60.0,
        30.0,
    )
    assert cfg.retries == 1
    assert cfg.max_connections == 10000
    assert cfg.max_header_bytes == 65536
    assert cfg.max_body_bytes == 0
    assert cfg.drain_timeout == 30.0
    assert cfg.queue_timeout == 5.0
    assert cfg.workers == 1
    assert cfg.resolve_interval == 30.0
    assert cfg.tunnel_timeout == 3600.0
    assert cfg.health == C.HealthConfig("/health", 2.0, 1.0, 2, 3, (200, 399))
    assert cfg.backends == (C.BackendConfig("NAME", Address("127.0.0.1", 9001), 1, 0, line=28),)
    assert cfg.admin == C.AdminConfig((Address("127.0.0.1", 9100),))


def test_contract_example_inline_copy() -> None:
    check_contract_example(parse(CONTRACT_EXAMPLE))


def test_contract_example_from_contract_md() -> None:
    contract = CONFORMANCE / "CONTRACT.md"
    if not contract.is_file():
        pytest.skip("CONTRACT.md not present")
    m = re.search(r"```ini\n(.*?)```", contract.read_text(encoding="utf-8"), re.DOTALL)
    assert m, "no ```ini block in CONTRACT.md"
    check_contract_example(parse(m.group(1)))


def test_minimal_config_gets_every_default() -> None:
    cfg = parse(MINIMAL)
    assert cfg == C.Config(
        path="lb.ini",
        listen=(Address("127.0.0.1", 8080),),
        backends=(C.BackendConfig("b1", Address("127.0.0.1", 9001), line=4),),
        pools=(C.PoolConfig("default"),),
    )
    assert cfg.health is None and cfg.admin is None


def test_objects_are_frozen() -> None:
    cfg = parse(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.retries = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backends[0].weight = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "table, cls, skip",
    [
        (C._BALANCER_KEYS, C.Config, {"path", "health", "backends", "admin", "log", "pools", "healths", "routes", "tls",
                                      "key_lines"}),
        (C._HEALTH_KEYS, C.HealthConfig, set()),
        (C._BACKEND_KEYS, C.BackendConfig, {"name", "line"}),
        (C._ADMIN_KEYS, C.AdminConfig, {"token"}),  # token: read from token_file
        (C._LOG_KEYS, C.LogConfig, set()),
    ],
)
def test_key_tables_match_dataclasses(table: dict[str, Any], cls: type, skip: set[str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    assert set(table) == set(fields)
    for key, (_, default) in table.items():
        if default is C._REQUIRED:
            assert fields[key].default is dataclasses.MISSING
        else:
            assert fields[key].default == default, key


# ---------------------------------------------------------------------------------------------- syntax


def test_colon_separator_case_insensitive_keys_and_comments() -> None:
    cfg = parse(
        "# leading comment\n"
        "; another\n"
        "[balancer]\n"
        "LISTEN: 127.0.0.1:8080   # inline\n"
        "Strategy =  WRR ; inline\n"
        "    ; indented comment under a key\n"
        "retries=3\n"
        "\n"
        "[backend b1]   ; comment after header\n"
        "address: localhost:9001\n"
    )
    assert cfg.listen == (Address("127.0.0.1", 8080),)
    assert cfg.strategy == "weighted_round_robin"
    assert cfg.retries == 3
    assert cfg.backends[0].address == Address("localhost", 9001)


def test_crlf_and_bom() -> None:
    text = "\ufeff" + MINIMAL.replace("\n", "\r\n")
    assert parse(text).backends[0].line == 4
    err = parse_error(text.replace("127.0.0.1:9001", "127.0.0.1:x"))
    assert err.line == 5


def test_uniformly_indented_keys_are_not_continuations() -> None:
    # configparser's rule: only a line indented deeper than its key line continues the value
    cfg = parse("[balancer]\n  listen = 127.0.0.1:8080\n  workers = 4\n[backend b1]\n  address = h:1\n")
    assert cfg.workers == 4


# ---------------------------------------------------------------------------------------------- values

ALL_STRATEGY_NAMES = [
    ("round_robin", "round_robin"),
    ("rr", "round_robin"),
    ("weighted_round_robin", "weighted_round_robin"),
    ("wrr", "weighted_round_robin"),
    ("least_connections", "least_connections"),
    ("lc", "least_connections"),
    ("weighted_least_connections", "weighted_least_connections"),
    ("wlc", "weighted_least_connections"),
    ("least_response_time", "least_response_time"),
    ("lrt", "least_response_time"),
    ("weighted_least_response_time", "weighted_least_response_time"),
    ("wlrt", "weighted_least_response_time"),
    ("power_of_two", "power_of_two"),
    ("random", "random"),
    ("ip_hash", "ip_hash"),
    ("consistent_hash", "consistent_hash"),
]


@pytest.mark.parametrize("name, canonical", ALL_STRATEGY_NAMES)
def test_every_strategy_name_and_alias(name: str, canonical: str) -> None:
    assert parse(with_balancer("strategy = " + name)).strategy == canonical
    assert parse(with_balancer("strategy = " + name.upper())).strategy == canonical
    assert C.STRATEGIES[name] == canonical


def test_strategies_table_is_exactly_the_contract() -> None:
    assert sorted(C.STRATEGIES) == sorted(n for n, _ in ALL_STRATEGY_NAMES)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("1500ms", 1.5),
        ("1.5s", 1.5),
        ("0.25", 0.25),
        ("10", 10.0),
        (".5s", 0.5),
        ("2m", 120.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 3s ", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "  ", "-1s", "-5", "inf", "nan", "1e3", "s", "1x", "1 s", "1,5s", "1.s", "5d", "1S", "9" * 400],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, size",
    [("0", 0), ("512", 512), ("64k", 65536), ("64K", 65536), ("1m", 1048576), ("16M", 16777216), ("007", 7)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5k", "-1", "k", "1g", "1kb", "1 k", "0x10", "9" * 30])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "text, host, port, shown",
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        ("[fe80::1:2]:1", "fe80::1:2", 1, "[fe80::1:2]:1"),
        ("localhost:9001", "localhost", 9001, "localhost:9001"),
        ("backend.internal:80", "backend.internal", 80, "backend.internal:80"),
        ("my_service-2.svc.:65535", "my_service-2.svc.", 65535, "my_service-2.svc.:65535"),
        ("0.0.0.0:80", "0.0.0.0", 80, "0.0.0.0:80"),
    ],
)
def test_parse_address(text: str, host: str, port: int, shown: str) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port is missing"),
        ("127.0.0.1:notaport", "port 'notaport' is not a number"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:70000", "out of range"),
        ("127.0.0.1:99999999999999999999", "out of range"),
        ("127.0.0.1:-1", "not a number"),
        ("::1:8080", "brackets"),
        ("[::1]", "needs :port"),
        ("[::1:80", "missing ']'"),
        ("[]:80", "empty host"),
        ("[1.2.3.4]:80", "not an IPv6"),
        ("[nothost]:80", "not an IPv6"),
        (":80", "empty host"),
        ("bad host:80", "invalid host name"),
        ("a..b:80", "invalid host name"),
        ("h/x:80", "invalid host name"),
        ("999.1.1.1:80", "not a valid IPv4"),
        ("http://x:80", "invalid address"),
        ("fe80::1", "needs brackets and a port"),
    ],
)
def test_parse_address_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_address(text)


def test_listen_ipv6_and_multiple() -> None:
    cfg = parse(
        MINIMAL.replace("listen = 127.0.0.1:8080", "listen = 127.0.0.1:8080, [::1]:8080,localhost:81")
    )
    assert cfg.listen == (Address("127.0.0.1", 8080), Address("::1", 8080), Address("localhost", 81))


def test_listen_continued_on_indented_lines() -> None:
    text = MINIMAL.replace(
        "listen = 127.0.0.1:8080",
        "listen =\n    127.0.0.1:8080\n    ; a comment inside the value\n\n    [::1]:8080, 127.0.0.1:8081",
    )
    assert parse(text).listen == (
        Address("127.0.0.1", 8080),
        Address("::1", 8080),
        Address("127.0.0.1", 8081),
    )


def test_listen_error_on_continuation_line_names_that_line() -> None:
    text = MINIMAL.replace("listen = 127.0.0.1:8080", "listen = 127.0.0.1:8080\n    127.0.0.1:nope\n")
    err = parse_error(text)
    assert (err.line, err.section, err.key) == (3, "balancer", "listen")
    text = MINIMAL.replace("listen = 127.0.0.1:8080", "listen = 127.0.0.1:8080,\n  [::1]:1\n  127.0.0.1:8080")
    err = parse_error(text)
    assert err.line == 4 and "listed twice" in err.message


def test_key_indented_under_listen_is_explained() -> None:
    err = parse_error(MINIMAL.replace("listen = 127.0.0.1:8080", "listen = 127.0.0.1:8080\n  workers = 2"))
    assert err.line == 3 and "indented line continues" in err.message


def test_admin_listen() -> None:
    cfg = parse(MINIMAL + "\n[admin]\nlisten = 127.0.0.1:9100, [::1]:9100\n")
    assert cfg.admin == C.AdminConfig((Address("127.0.0.1", 9100), Address("::1", 9100)))


@pytest.mark.parametrize(
    "text, stored",
    [
        ("client_ip", "client_ip"),
        ("CLIENT_IP", "client_ip"),
        ("path", "path"),
        ("header:X-User", "header:X-User"),
        ("Header:X-User", "header:X-User"),
        ("cookie:session_id", "cookie:session_id"),
    ],
)
def test_hash_key(text: str, stored: str) -> None:
    assert parse(with_balancer("strategy = consistent_hash", "hash_key = " + text)).hash_key == stored


def test_health_values() -> None:
    cfg = parse(
        MINIMAL
        + "[health]\npath = tcp\ninterval = 200ms\ntimeout = 500ms\nrise = 1\nfall = 1\nexpect = 204\n"
    )
    assert cfg.health == C.HealthConfig("tcp", 0.2, 0.5, 1, 1, (204, 204))
    cfg = parse(MINIMAL + "[health]\npath = /hc/ping?full=1\n")
    assert cfg.health == C.HealthConfig(path="/hc/ping?full=1")


def test_zero_allowed_only_where_documented() -> None:
    cfg = parse(
        with_balancer("drain_timeout = 0", "queue_timeout = 0ms", "retries = 0", "max_body_bytes = 0")
    )
    assert (cfg.drain_timeout, cfg.queue_timeout, cfg.retries, cfg.max_body_bytes) == (0.0, 0.0, 0, 0)
    for key in (
        "connect_timeout",
        "header_timeout",
        "client_timeout",
        "backend_timeout",
        "resolve_interval",
        "tunnel_timeout",
    ):
        err = parse_error(with_balancer(key + " = 0s"))
        assert (err.line, err.key) == (3, key)


def test_same_address_for_two_backends_is_allowed() -> None:
    cfg = parse(MINIMAL + "[backend b2]\naddress = 127.0.0.1:9001\nweight = 256\nmax_connections = 5\n")
    assert [b.name for b in cfg.backends] == ["b1", "b2"]
    assert cfg.backends[1] == C.BackendConfig("b2", Address("127.0.0.1", 9001), 256, 5, line=6)


# ---------------------------------------------------------------------------------------------- errors

BAL = "[balancer]\nlisten = 127.0.0.1:8080\n"
B1 = "[backend b1]\naddress = 127.0.0.1:9001\n"

# (name, text, line, section, key, fragment of the message)
INVALID: list[tuple[str, str, int, str | None, str | None, str]] = [
    ("unknown key", BAL + "frobnicate = yes\n" + B1, 3, "balancer", "frobnicate", "unknown key"),
    ("typo key", BAL + "retires = 2\n" + B1, 3, "balancer", "retires", "did you mean 'retries'"),
    ("backend key in balancer", BAL + "weight = 2\n" + B1, 3, "balancer", "weight", "unknown key"),
    ("unknown section", BAL + B1 + "[frontend web]\nbind = 1\n", 5, "frontend web", None, "unknown section"),
    ("DEFAULT section", "[DEFAULT]\nx = 1\n" + BAL + B1, 1, "DEFAULT", None, "unknown section"),
    ("misspelt backend", BAL + "[backnd b1]\naddress = h:1\n", 3, "backnd b1", None, "unknown section"),
    ("section case matters", "[Balancer]\n" + B1, 1, "Balancer", None, "unknown section"),
    ("bad strategy", BAL + "strategy = fastest_first\n" + B1, 3, "balancer", "strategy", "fastest_first"),
    (
        "bad port",
        BAL + "[backend b1]\naddress = 127.0.0.1:notaport\n",
        4,
        "backend b1",
        "address",
        "port 'notaport' is not a number",
    ),
    ("port 0", BAL + "[backend b1]\naddress = 127.0.0.1:0\n", 4, "backend b1", "address", "out of range"),
    ("port 70000", BAL + "[backend b1]\naddress = 127.0.0.1:70000\n", 4, "backend b1", "address", "1..65535"),
    ("listen port", "[balancer]\nlisten = 127.0.0.1:x\n" + B1, 2, "balancer", "listen", "not a number"),
    ("unbracketed ipv6", "[balancer]\nlisten = ::1:8080\n" + B1, 2, "balancer", "listen", "brackets"),
    (
        "duplicate listen",
        "[balancer]\nlisten = 127.0.0.1:1, 127.0.0.1:1\n" + B1,
        2,
        "balancer",
        "listen",
        "twice",
    ),
    ("empty listen", "[balancer]\nlisten =\n" + B1, 2, "balancer", "listen", "at least one"),
    ("weight 0", BAL + B1 + "weight = 0\n", 5, "backend b1", "weight", "1..256"),
    ("weight 257", BAL + B1 + "weight = 257\n", 5, "backend b1", "weight", "1..256"),
    ("weight text", BAL + B1 + "weight = heavy\n", 5, "backend b1", "weight", "not a whole number"),
    (
        "negative max_connections",
        BAL + B1 + "max_connections = -1\n",
        5,
        "backend b1",
        "max_connections",
        "negative",
    ),
    ("negative duration", BAL + "connect_timeout = -1s\n" + B1, 3, "balancer", "connect_timeout", "negative"),
    (
        "garbage duration",
        BAL + "client_timeout = soon\n" + B1,
        3,
        "balancer",
        "client_timeout",
        "invalid duration",
    ),
    ("fractional size", BAL + "max_body_bytes = 1.5k\n" + B1, 3, "balancer", "max_body_bytes", "1.5k"),
    (
        "header bytes too small",
        BAL + "max_header_bytes = 512\n" + B1,
        3,
        "balancer",
        "max_header_bytes",
        "1k",
    ),
    (
        "header bytes too large",
        BAL + "max_header_bytes = 17m\n" + B1,
        3,
        "balancer",
        "max_header_bytes",
        "16m",
    ),
    ("retries 101", BAL + "retries = 101\n" + B1, 3, "balancer", "retries", "0..100"),
    ("workers 0", BAL + "workers = 0\n" + B1, 3, "balancer", "workers", "1..256"),
    ("max_connections 0", BAL + "max_connections = 0\n" + B1, 3, "balancer", "max_connections", "at least 1"),
    ("duplicate key", BAL + "retries = 1\nretries = 2\n" + B1, 4, "balancer", "retries", "duplicate key"),
    (
        "duplicate section",
        BAL + B1 + "[backend b1]\naddress = h:2\n",
        5,
        "backend b1",
        None,
        "duplicate section",
    ),
    ("duplicate balancer", BAL + B1 + BAL, 5, "balancer", None, "duplicate section"),
    ("missing address", BAL + "[backend b1]\nweight = 2\n", 3, "backend b1", "address", "missing"),
    ("missing listen", "[balancer]\nworkers = 2\n" + B1, 1, "balancer", "listen", "missing"),
    ("missing admin listen", BAL + B1 + "[admin]\n", 5, "admin", "listen", "missing"),
    (
        "admin on balancer port",
        BAL + B1 + "[admin]\nlisten = 127.0.0.1:8080\n",
        6,
        "admin",
        "listen",
        "also a [balancer] listen",
    ),
    ("no backends", "\n\n" + BAL, 3, "balancer", None, "no [backend NAME] section"),
    ("missing balancer", B1, 1, None, None, "missing [balancer] section"),
    ("empty file", "", 1, None, None, "missing [balancer] section"),
    (
        "garbage at end",
        BAL + B1 + "\nthis line is not valid configuration\n",
        6,
        None,
        None,
        "this line is not valid configuration",
    ),
    ("key before any section", "listen = 127.0.0.1:1\n" + BAL + B1, 1, None, None, "before any section"),
    ("multi-line strategy", BAL + "strategy = rr\n  lc\n" + B1, 3, "balancer", "strategy", "only listen"),
    (
        "multi-line address",
        BAL + "[backend b1]\naddress =\n  127.0.0.1:1\n",
        4,
        "backend b1",
        "address",
        "only listen",
    ),
    ("expect text", BAL + B1 + "[health]\nexpect = ok\n", 6, "health", "expect", "NNN-NNN"),
    ("expect reversed", BAL + B1 + "[health]\nexpect = 399-200\n", 6, "health", "expect", "reversed"),
    ("expect out of range", BAL + B1 + "[health]\nexpect = 200-600\n", 6, "health", "expect", "100..599"),
    ("health path relative", BAL + B1 + "[health]\npath = health\n", 6, "health", "path", "start with '/'"),
    ("health path space", BAL + B1 + "[health]\npath = /a b\n", 6, "health", "path", "spaces"),
    ("health rise 0", BAL + B1 + "[health]\nrise = 0\n", 6, "health", "rise", "at least 1"),
    ("health fall 0", BAL + B1 + "[health]\nfall = 0\n", 6, "health", "fall", "at least 1"),
    ("health interval 0", BAL + B1 + "[health]\ninterval = 0\n", 6, "health", "interval", "greater than 0"),
    ("hash_key unknown", BAL + "hash_key = url\n" + B1, 3, "balancer", "hash_key", "client_ip, path"),
    ("hash_key no name", BAL + "hash_key = header:\n" + B1, 3, "balancer", "hash_key", "needs a name"),
    (
        "hash_key bad token",
        BAL + "hash_key = cookie:a b\n" + B1,
        3,
        "balancer",
        "hash_key",
        "not a valid HTTP token",
    ),
    ("backend without name", BAL + "[backend]\naddress = h:1\n", 3, "backend", None, "needs a name"),
    (
        "bad backend name",
        BAL + "[backend b/1]\naddress = h:1\n",
        3,
        "backend b/1",
        None,
        "invalid backend name",
    ),
    ("unclosed header", BAL + "[backend b1\naddress = h:1\n", 3, None, None, "missing ']'"),
    ("text after header", BAL + "[backend b1] x\naddress = h:1\n", 3, None, None, "after section header"),
    ("missing key name", BAL + "= 5\n" + B1, 3, None, None, "missing key name"),
]


@pytest.mark.parametrize(
    "text, line, section, key, fragment", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_config(text: str, line: int, section: str | None, key: str | None, fragment: str) -> None:
    err = parse_error(text)
    assert (err.line, err.section, err.key) == (line, section, key), str(err)
    assert fragment in err.message
    shown = str(err)
    assert shown.startswith(f"lb.ini:{line}: ")
    assert "\n" not in shown
    if section is not None:
        assert f"[{section}]" in shown
    if key is not None:
        assert f"] {key}: " in shown


def test_error_format_exactly() -> None:
    err = parse_error(BAL + "strategy = fastest_first\n" + B1, path="conf/lb.ini")
    assert str(err).startswith(
        "conf/lb.ini:3: [balancer] strategy: unknown strategy 'fastest_first' (expected "
    )
    err = parse_error(BAL + "[backend b1]\naddress = 127.0.0.1:notaport\n")
    assert str(err) == "lb.ini:4: [backend b1] address: port 'notaport' is not a number"
    err = parse_error(BAL + "frobnicate = 1\n" + B1)
    assert str(err) == "lb.ini:3: [balancer] frobnicate: unknown key"
    assert str(ConfigError("p", 7, "msg", "health")) == "p:7: [health]: msg"
    assert str(ConfigError("p", 7, "msg")) == "p:7: msg"
    assert str(ConfigError("./x.ini", 0, "m", "backend a", "weight")) == "./x.ini:0: [backend a] weight: m"
    assert isinstance(err, ValueError)


def test_control_characters_in_names_are_escaped() -> None:
    err = parse_error(BAL + "bad\x00key\x1bx = 1\n" + B1)
    assert str(err) == "lb.ini:3: [balancer] bad\\x00key\\x1bx: unknown key"
    err = parse_error(BAL + B1 + "[odd\rname]\n")
    assert str(err).startswith("lb.ini:5: [odd\\rname]: unknown section")


def test_config_error_pickles() -> None:
    err = ConfigError("lb.ini", 3, "bad", "balancer", "retries")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.line, copy.section, copy.key, copy.message) == (
        "lb.ini",
        3,
        "balancer",
        "retries",
        "bad",
    )
    assert str(copy) == str(err)


def test_first_error_in_the_file_wins() -> None:
    text = BAL + "strategy = nope\nworkers = 0\n" + B1 + "\ngarbage\n"
    assert parse_error(text).line == 3
    # an error blamed on a header (missing key) comes before later key errors in the same section
    assert parse_error(BAL + "[backend b1]\nweight = 0\n").line == 3
    # a misspelt backend header is reported, not the "no backend" that follows from it
    err = parse_error(BAL + "retries = 1\n[backends b1]\naddress = h:1\n")
    assert err.line == 4 and "unknown section" in err.message


def test_keys_of_unknown_sections_are_not_reported() -> None:
    err = parse_error(BAL + B1 + "[frontend]\nbind = x\nmore = y\n")
    assert err.line == 5


# ---------------------------------------------------------------------------------------------- load()


def test_load_reads_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lb.ini"
    path.write_text(MINIMAL + "; é comment\n", encoding="utf-8")
    assert parse(MINIMAL, str(path)) == C.load(str(path))


def test_load_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        C.load(missing)
    assert info.value.line == 0
    assert str(info.value).startswith(missing + ":0: cannot read file: ")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        C.load(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}:0: cannot read file: ")


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lb.ini"
    path.write_bytes(MINIMAL.encode() + b"; caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        C.load(str(path))
    assert info.value.line == 6
    assert "UTF-8" in info.value.message


def test_load_keeps_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lb.ini").write_text(BAL + "bogus = 1\n" + B1, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        C.load("lb.ini")
    assert str(info.value) == "lb.ini:3: [balancer] bogus: unknown key"


# ---------------------------------------------------------------------------------------------- bsuite renders
# What the black-box suite writes (bsuite/targets.py `Balrs.render`), reproduced so this runs without it.


def _dur(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _size(n: int) -> str:
    if n and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    if n and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _hostport(h: str, p: int) -> str:
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


def render_like_bsuite(cfg: dict[str, Any]) -> str:
    lines = [
        "[balancer]",
        "listen = {}".format(", ".join(_hostport(h, p) for h, p in cfg["listen"])),
        "strategy = {}".format(cfg["strategy"]),
    ]
    if cfg.get("hash_key"):
        lines.append("hash_key = {}".format(cfg["hash_key"]))
    lines += [
        "connect_timeout = {}".format(_dur(cfg["connect_timeout"])),
        "header_timeout = {}".format(_dur(cfg["header_timeout"])),
        "client_timeout = {}".format(_dur(cfg["client_timeout"])),
        "backend_timeout = {}".format(_dur(cfg["backend_timeout"])),
        f"retries = {cfg['retries']}",
        f"max_connections = {cfg['max_connections']}",
        "max_header_bytes = {}".format(_size(cfg["max_header_bytes"])),
        "max_body_bytes = {}".format(_size(cfg["max_body_bytes"])),
        "drain_timeout = {}".format(_dur(cfg["drain_timeout"])),
    ]
    if cfg.get("queue_timeout") is not None:
        lines.append("queue_timeout = {}".format(_dur(cfg["queue_timeout"])))
    lines += [f"workers = {cfg['workers']}", ""]
    h = cfg.get("health")
    if h:
        lines += [
            "[health]",
            "path = {}".format(h["path"]),
            "interval = {}".format(_dur(h["interval"])),
            "timeout = {}".format(_dur(h["timeout"])),
            f"rise = {h['rise']}",
            f"fall = {h['fall']}",
            "expect = {}".format(h.get("expect", "200-399")),
            "",
        ]
    for b in cfg["backends"]:
        lines += [
            "[backend {}]".format(b["name"]),
            "address = {}".format(b["address"]),
            f"weight = {b['weight']}",
        ]
        if b.get("max_connections") is not None:
            lines.append(f"max_connections = {b['max_connections']}")
        lines.append("")
    if cfg.get("admin"):
        lines += ["[admin]", "listen = {}".format(_hostport(*cfg["admin"])), ""]
    return "\n".join(lines)


def bsuite_cfg(**over: Any) -> dict[str, Any]:
    """The suite's defaults (bsuite/runner.py DEFAULTS, durations in ms) with three backends."""
    cfg: dict[str, Any] = {
        "strategy": "round_robin",
        "hash_key": None,
        "connect_timeout": 1000,
        "header_timeout": 5000,
        "client_timeout": 10000,
        "backend_timeout": 5000,
        "retries": 1,
        "max_connections": 10000,
        "max_header_bytes": 65536,
        "max_body_bytes": 0,
        "drain_timeout": 5000,
        "queue_timeout": None,
        "workers": 1,
        "health": None,
        "admin": None,
        "listen": [("127.0.0.1", 40001)],
        "backends": [
            {"name": f"b{i}", "address": f"127.0.0.1:{41000 + i}", "weight": 1, "max_connections": None}
            for i in (1, 2, 3)
        ],
    }
    cfg.update(over)
    return cfg


HEALTH = {"path": "/health", "interval": 200, "timeout": 500, "rise": 2, "fall": 2, "expect": "200-399"}

BSUITE_CFGS = {
    "defaults": bsuite_cfg(),
    "health_admin_ipv6": bsuite_cfg(
        health=HEALTH, admin=("127.0.0.1", 40002), listen=[("127.0.0.1", 40001), ("::1", 40003)]
    ),
    "health_tcp": bsuite_cfg(health=dict(HEALTH, path="tcp")),
    "health_path": bsuite_cfg(health=dict(HEALTH, path="/hc/ping")),
    "hash_header": bsuite_cfg(strategy="consistent_hash", hash_key="header:X-User"),
    "limits": bsuite_cfg(
        max_header_bytes=8192,
        max_body_bytes=1000,
        header_timeout=2000,
        client_timeout=1000,
        backend_timeout=1000,
        queue_timeout=3000,
        retries=0,
        workers=2,
    ),
    "weighted_maxconn": bsuite_cfg(
        strategy="wrr",
        backends=[
            {"name": "b1", "address": "127.0.0.1:41001", "weight": 5, "max_connections": 1},
            {"name": "d2", "address": "localhost:41002", "weight": 1, "max_connections": None},
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(BSUITE_CFGS))
def test_bsuite_style_render_parses(name: str) -> None:
    cfg = BSUITE_CFGS[name]
    parsed = parse(render_like_bsuite(cfg))
    assert [b.name for b in parsed.backends] == [b["name"] for b in cfg["backends"]]
    assert parsed.listen == tuple(Address(h, p) for h, p in cfg["listen"])
    assert parsed.header_timeout == cfg["header_timeout"] / 1000
    assert parsed.max_header_bytes == cfg["max_header_bytes"]
    if cfg["health"]:
        assert parsed.health is not None and parsed.health.interval == cfg["health"]["interval"] / 1000


@pytest.mark.parametrize("strategy", [n for n, _ in ALL_STRATEGY_NAMES])
def test_bsuite_every_strategy(strategy: str) -> None:
    cfg = bsuite_cfg(strategy=strategy, hash_key="header:X-User" if strategy == "consistent_hash" else None)
    assert parse(render_like_bsuite(cfg)).strategy == C.STRATEGIES[strategy]


def _insert_after(lines: list[str], prefix: str, new: str) -> tuple[list[str], int]:
    i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines.insert(i + 1, new)
    return lines, i + 2


def _replace(lines: list[str], prefix: str, new: str) -> tuple[list[str], int]:
    i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines[i] = new
    return lines, i + 1


def _append_section(lines: list[str]) -> tuple[list[str], int]:
    lines = lines + ["[frontend web]", "bind = 1"]
    return lines, len(lines) - 1


BSUITE_MUTATIONS: dict[str, Callable[[list[str]], tuple[list[str], int]]] = {
    "unknown_key": lambda lines: _insert_after(lines, "retries", "frobnicate = yes"),
    "unknown_strategy": lambda lines: _replace(lines, "strategy", "strategy = fastest_first"),
    "unknown_section": _append_section,
    "bad_port": lambda lines: _replace(lines, "address", "address = 127.0.0.1:notaport"),
}


@pytest.mark.parametrize("cfg_name", ["defaults", "health_admin_ipv6"])
@pytest.mark.parametrize("mutation", sorted(BSUITE_MUTATIONS))
def test_bsuite_check_cases_blame_the_right_line(mutation: str, cfg_name: str) -> None:
    lines, lineno = BSUITE_MUTATIONS[mutation](render_like_bsuite(BSUITE_CFGS[cfg_name]).split("\n"))
    err = parse_error("\n".join(lines))
    assert err.line == lineno, str(err)
    # the suite's own pattern for the line number
    m = re.search(r"(?:^|[\s/])lb\.ini:(\d+):\s*\S", str(err))
    assert m and int(m.group(1)) == lineno


def test_bsuite_reload_with_garbage_line() -> None:
    text = render_like_bsuite(bsuite_cfg()) + "\nthis line is not valid configuration\n"
    err = parse_error(text)
    assert err.line == text.split("\n").index("this line is not valid configuration") + 1


def _import_bsuite_targets() -> ModuleType:
    init = CONFORMANCE / "bsuite" / "__init__.py"
    if not (CONFORMANCE / "bsuite" / "targets.py").is_file():
        pytest.skip("bsuite not present")
    name = "_balrs_test_bsuite"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(name + ".targets")


@pytest.mark.parametrize("name", sorted(BSUITE_CFGS))
def test_real_bsuite_render_parses_and_matches_the_copy(name: str) -> None:
    targets = _import_bsuite_targets()
    text = targets.Balrs(str(Path(__file__).resolve().parent.parent)).render(BSUITE_CFGS[name])
    assert text == render_like_bsuite(BSUITE_CFGS[name])
    parse(text)


def test_fuzzed_files_raise_only_config_error() -> None:
    # Habit 12: whatever the bytes, nothing but our own error escapes, and it is one line naming a real line.
    rng = random.Random(1234)
    alphabet = "[]=:;# \t\n,-.0123456789abkmsx:\\\x00\u00e9\ufeff"
    for _ in range(3000):
        text = list(CONTRACT_EXAMPLE)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text) + 1)
            op = rng.random()
            if op < 0.4:
                text.insert(i, rng.choice(alphabet))
            elif op < 0.8 and i < len(text):
                del text[i]
            else:
                j = rng.randrange(len(text) + 1)
                text[i:i] = text[j : j + rng.randint(1, 40)]
        source = "".join(text)
        try:
            parse(source)
        except ConfigError as err:
            assert "\n" not in str(err)
            assert 1 <= err.line <= source.count("\n") + 1


# ---------------------------------------------------------------------------------------------- [log]


def test_log_defaults_when_absent() -> None:
    # a v1 file behaves as before: no access log, no request ids
    cfg = parse(MINIMAL)
    assert cfg.log == C.LogConfig() == C.LogConfig("off", "combined", "info", "")
    assert parse(MINIMAL + "[log]\n").log == C.LogConfig()
    assert parse(MINIMAL + "[log]\nformat = json\n").log == C.LogConfig(format="json", request_id="")


def test_log_contract_example() -> None:
    # the ```ini block of CONTRACT.md's "Logs" section, after a minimal file
    example = (
        "[log]\n"
        "access = off                     ; off | stderr | stdout | PATH\n"
        "format = combined                ; common | combined | json\n"
        "level = info                     ; for the event log on stderr: debug | info | warning | error\n"
        "request_id = X-Request-ID        ; kept when the client sent a valid one (1-128 chars of A-Z a-z 0-9 . _ : -),\n"
        "                                 ; else generated; sent upstream and in the\n"
        "                                 ; response; empty = off\n"
    )
    expected = C.LogConfig("off", "combined", "info", "X-Request-ID")
    assert parse(MINIMAL + example).log == expected
    contract = CONFORMANCE / "CONTRACT.md"
    if contract.is_file():
        blocks = re.findall(r"```ini\n(.*?)```", contract.read_text(encoding="utf-8"), re.DOTALL)
        logs = [b for b in blocks if b.lstrip().startswith("[log]")]
        assert logs, "no [log] example in CONTRACT.md"
        assert parse(MINIMAL + logs[0]).log == expected


def test_log_valid_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def log(*lines: str) -> C.LogConfig:
        return parse(MINIMAL + "[log]\n" + "".join(line + "\n" for line in lines)).log

    for value, stored in (("off", "off"), ("stderr", "stderr"), ("STDOUT", "stdout"), (" Off ", "off")):
        assert log(f"access = {value}").access == stored
    path = tmp_path / "access.log"
    assert log(f"access = {path}").access == str(path)  # need not exist yet
    path.write_text("")
    assert log(f"access = {path}").access == str(path)
    monkeypatch.chdir(tmp_path)
    assert log("access = relative.log").access == "relative.log"  # relative to where balrs starts
    assert log("access = ./off").access == "./off"  # a file named off
    for fmt in ("common", "combined", "json", "JSON"):
        assert log(f"format = {fmt}").format == fmt.lower()
    for level in ("debug", "info", "warning", "ERROR"):
        assert log(f"level = {level}").level == level.lower()
    assert log("request_id = X-Request-ID").request_id == "X-Request-ID"  # spelling kept: it is sent so
    assert log("request_id = x-correlation-id").request_id == "x-correlation-id"
    assert log("request_id = Request_Id.v2~!").request_id == "Request_Id.v2~!"  # any RFC 9110 token
    assert log("request_id =").request_id == ""
    assert log("request_id = off").request_id == ""
    assert log("Access: stderr", "FORMAT = json  ; comment").access == "stderr"


LOG_INVALID: list[tuple[str, str, str, str]] = [
    # (name, [log] line, key, fragment of the message)
    ("format", "format = xml", "format", "unknown format 'xml' (expected common, combined, json)"),
    ("format empty", "format =", "format", "unknown format"),
    ("level", "level = verbose", "level", "unknown level 'verbose' (expected debug, info, warning, error)"),
    ("level warn", "level = warn", "level", "unknown level 'warn'"),
    ("request_id space", "request_id = X Request", "request_id", "not a valid header field name"),
    ("request_id colon", "request_id = X-Id:", "request_id", "not a valid header field name"),
    ("request_id non-ascii", "request_id = X-Id\u00e9", "request_id", "not a valid header field name"),
    ("request_id host", "request_id = Host", "request_id", "balrs itself sets or frames by"),
    ("request_id framing", "request_id = content-length", "request_id", "balrs itself"),
    ("request_id xff", "request_id = X-Forwarded-For", "request_id", "balrs itself"),
    ("access empty", "access =", "access", "expected off, stderr, stdout or a file path"),
    ("access no dir", "access = /nonexistent-balrs-dir/x/access.log", "access",
     "directory '/nonexistent-balrs-dir/x' does not exist"),
    ("access is a dir", "access = /", "access", "is a directory"),
    ("unknown key", "acess = stderr", "acess", "unknown key (did you mean 'access'?)"),
    ("multi-line", "format = json\n  common", "format", "only listen may span several lines"),
]


@pytest.mark.parametrize("line, key, fragment", [case[1:] for case in LOG_INVALID],
                         ids=[case[0] for case in LOG_INVALID])
def test_log_invalid(line: str, key: str, fragment: str) -> None:
    text = MINIMAL + "\n[log]\n; the line under test\n" + line + "\n"
    err = parse_error(text)
    lineno = text.split("\n").index(line.split("\n")[0]) + 1
    assert (err.line, err.section, err.key) == (lineno, "log", key), str(err)
    assert fragment in err.message, err.message
    assert str(err).startswith(f"lb.ini:{lineno}: [log] {key}: ")
    assert "\n" not in str(err)


def test_log_access_directory_is_checked(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    err = parse_error(MINIMAL + f"[log]\naccess = {missing}\n")
    assert str(err) == f"lb.ini:7: [log] access: directory '{missing.parent}' does not exist"
    err = parse_error(MINIMAL + f"[log]\naccess = {tmp_path}\n")
    assert (err.line, err.key) == (7, "access") and "is a directory" in err.message


def test_log_access_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, int]] = []

    def no_access(path: str, mode: int) -> bool:  # as for a user without write permission (root has it)
        asked.append((str(path), mode))
        return False

    monkeypatch.setattr(C.os, "access", no_access)
    err = parse_error(MINIMAL + f"[log]\naccess = {tmp_path / 'access.log'}\n")
    assert err.key == "access" and "not writable" in err.message
    assert asked == [(str(tmp_path), os.W_OK)]  # the directory, where the file would be created
    (tmp_path / "access.log").write_text("")
    asked.clear()
    parse_error(MINIMAL + f"[log]\naccess = {tmp_path / 'access.log'}\n")
    assert asked == [(str(tmp_path / "access.log"), os.W_OK)]  # an existing file: the file itself


def test_log_section_errors() -> None:
    err = parse_error(MINIMAL + "[log]\nformat = json\n[log]\nformat = common\n")
    assert (err.line, err.section, err.key) == (8, "log", None) and "duplicate section" in err.message
    err = parse_error(MINIMAL + "[log]\nformat = json\nformat = common\n")
    assert (err.line, err.key) == (8, "format") and "duplicate key" in err.message
    err = parse_error(MINIMAL + "[logs]\n")
    assert "unknown section" in err.message and "[log]" in err.message
    err = parse_error(MINIMAL + "[Log]\n")  # section names are case-sensitive, as in configparser
    assert "unknown section" in err.message


def test_log_errors_do_not_hide_earlier_ones() -> None:
    err = parse_error(BAL + "retries = x\n" + B1 + "[log]\nformat = xml\n")
    assert err.line == 3 and err.key == "retries"
    err = parse_error("[log]\nformat = xml\n" + BAL + B1)
    assert (err.line, err.section, err.key) == (2, "log", "format")


def test_log_key_table_matches_dataclass() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(C.LogConfig)}
    assert {key: default for key, (_, default) in C._LOG_KEYS.items()} == fields
    assert fields["request_id"] == ""  # off unless asked for


def test_log_config_is_frozen() -> None:
    cfg = parse(MINIMAL + "[log]\naccess = stderr\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log.access = "off"  # type: ignore[misc]


def test_bsuite_log_render_parses(tmp_path: Path) -> None:
    targets = _import_bsuite_targets()
    access = str(tmp_path / "access.log")
    for log in ({"access": access, "format": "json", "request_id": "X-Request-ID"},
                {"access": access, "format": "combined"}, {"request_id": "X-Request-ID"}):
        text = targets.Balrs(str(Path(__file__).resolve().parent.parent)).render(bsuite_cfg(log=log))
        parsed = parse(text).log
        assert parsed == C.LogConfig(access=log.get("access", "off"), format=log.get("format", "combined"),
                                     request_id=log.get("request_id", ""))
