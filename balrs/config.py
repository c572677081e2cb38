"""lb.ini -> frozen, validated configuration objects.

The file is configparser-style INI, but read by our own small reader so that every error can name the file,
the line, the section and the key: ``PATH:LINE: [section] key: message``.  Reading happens in two passes:

1. ``_read`` splits the text into sections and ``key = value`` entries (syntax errors: stray lines, duplicate
   sections and keys, unknown sections);
2. ``_build`` checks every entry against the per-section key tables (``_BALANCER_KEYS`` ...) and builds the
   objects.

Both passes collect errors instead of stopping at the first, so that the error finally raised is the one
nearest the top of the file.  Errors that only follow from other ones ("no [backend NAME] section" when a
backend header was misspelt) are raised only when nothing else is wrong.

Nothing here resolves names, opens sockets or starts anything.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "STRATEGIES",
    "Address",
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "LogConfig",
    "load",
    "parse_address",
    "parse_duration",
    "parse_size",
    "parse_text",
]

# ---------------------------------------------------------------------------------------------- defaults
# [balancer]
DEFAULT_STRATEGY = "round_robin"  # nginx and HAProxy both default to (weighted) round robin
DEFAULT_HASH_KEY = "client_ip"  # like nginx `ip_hash`
DEFAULT_CONNECT_TIMEOUT = 2.0  # HAProxy `timeout connect` (5s in its examples); short, since a retry follows
DEFAULT_HEADER_TIMEOUT = 10.0  # HAProxy `timeout http-request` (10s in its sample config); slowloris guard
DEFAULT_CLIENT_TIMEOUT = 60.0  # nginx `keepalive_timeout` 75s; HAProxy `timeout http-keep-alive`
DEFAULT_BACKEND_TIMEOUT = 30.0  # HAProxy `timeout server` (30s in its examples); nginx proxy_read_timeout 60s
DEFAULT_RETRIES = 1  # HAProxy `retries` (3 there); only connect failures are retried
DEFAULT_MAX_CONNECTIONS = 10000  # HAProxy global `maxconn`; nginx `worker_connections`
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # Tornado `max_header_size` 64k; nginx allows 4 x 8k header buffers
DEFAULT_MAX_BODY_BYTES = 0  # 0 = unlimited, like nginx `client_max_body_size 0`
DEFAULT_DRAIN_TIMEOUT = 30.0  # Kubernetes terminationGracePeriodSeconds 30s; HAProxy `hard-stop-after`
DEFAULT_QUEUE_TIMEOUT = 5.0  # HAProxy `timeout queue` (defaults to `timeout connect` there)
DEFAULT_WORKERS = 1  # nginx `worker_processes 1`
DEFAULT_RESOLVE_INTERVAL = 30.0  # nginx `resolver ... valid=30s` in its docs; HAProxy `hold valid` 10s
DEFAULT_TUNNEL_TIMEOUT = 3600.0  # HAProxy `timeout tunnel 1h` (its WebSocket example)
DEFAULT_BODY_TIMEOUT = 60.0  # nginx `client_body_timeout 60s`: a client stalls mid-request-body
DEFAULT_SEND_TIMEOUT = 60.0  # nginx `send_timeout 60s`: a client stops reading its response
DEFAULT_SLOW_START = 0.0  # off, like HAProxy `slowstart` and nginx Plus `slow_start` (both unset by default)
DEFAULT_EJECT_AFTER = 5  # Envoy outlier detection `consecutive_gateway_failure` 5
DEFAULT_EJECT_COOLDOWN = 10.0  # nginx `fail_timeout 10s`; Envoy `base_ejection_time` 30s

# [health]: HAProxy server check defaults
DEFAULT_HEALTH_PATH = "/health"
DEFAULT_HEALTH_INTERVAL = 2.0  # HAProxy `inter 2s`
DEFAULT_HEALTH_TIMEOUT = 1.0  # HAProxy `timeout check`; a probe must be quicker than the interval
DEFAULT_HEALTH_RISE = 2  # HAProxy `rise 2`
DEFAULT_HEALTH_FALL = 3  # HAProxy `fall 3`
DEFAULT_HEALTH_EXPECT = (200, 399)  # HAProxy `option httpchk`: 2xx and 3xx pass

# [backend NAME]
DEFAULT_WEIGHT = 1  # HAProxy server `weight 1`, nginx `weight=1`
DEFAULT_BACKEND_MAX_CONNECTIONS = 0  # 0 = unlimited, like HAProxy server `maxconn 0` and nginx `max_conns=0`

# [log]: no access log and no request ids unless asked for, so a file without [log] behaves as before it
DEFAULT_LOG_ACCESS = "off"  # nginx `access_log` is on by default; a balancer at 10k req/s should opt in
DEFAULT_LOG_FORMAT = "combined"  # nginx's predefined `combined` format
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_REQUEST_ID = ""  # off; the contract's example names X-Request-ID (nginx $request_id)
LOG_FORMATS = ("common", "combined", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_STREAMS = ("off", "stderr", "stdout")  # every other value of `access` is a file path

# ---------------------------------------------------------------------------------------------- limits
MAX_WEIGHT = 256  # HAProxy server weights are 0..256
MAX_RETRIES = 100
MAX_WORKERS = 256
MIN_HEADER_BYTES = 1024  # a request line plus Host must fit
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DURATION = 365 * 24 * 3600.0  # far beyond any sane timeout; keeps timer arithmetic finite
_MAX_INT = 2**63 - 1  # integers and sizes; also bounds the work of int() on long digit strings
_MAX_DIGITS = len(str(_MAX_INT))

# ---------------------------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Address:
    host: str  # IPv6 literals without brackets
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendConfig:
    name: str
    address: Address
    weight: int = DEFAULT_WEIGHT
    max_connections: int = DEFAULT_BACKEND_MAX_CONNECTIONS
    line: int = 0  # line of the [backend NAME] header


@dataclass(frozen=True)
class HealthConfig:
    path: str = DEFAULT_HEALTH_PATH  # or "tcp": connect-only probe
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    rise: int = DEFAULT_HEALTH_RISE
    fall: int = DEFAULT_HEALTH_FALL
    expect: tuple[int, int] = DEFAULT_HEALTH_EXPECT  # inclusive status range


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[Address, ...]


@dataclass(frozen=True)
class LogConfig:
    """[log]: the access log (off | stderr | stdout | PATH) and its format, the event log's level, and
    the request-id field ("" = no request ids)."""

    access: str = DEFAULT_LOG_ACCESS  # off | stderr | stdout | a file path (as written)
    format: str = DEFAULT_LOG_FORMAT  # common | combined | json
    level: str = DEFAULT_LOG_LEVEL  # the event log's: debug | info | warning | error
    request_id: str = DEFAULT_LOG_REQUEST_ID  # a field name, sent in this spelling; "" = no request ids


@dataclass(frozen=True)
class Config:
    path: str
    listen: tuple[Address, ...]
    strategy: str = DEFAULT_STRATEGY
    hash_key: str = DEFAULT_HASH_KEY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    backend_timeout: float = DEFAULT_BACKEND_TIMEOUT
    retries: int = DEFAULT_RETRIES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    workers: int = DEFAULT_WORKERS
    resolve_interval: float = DEFAULT_RESOLVE_INTERVAL
    tunnel_timeout: float = DEFAULT_TUNNEL_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    slow_start: float = DEFAULT_SLOW_START
    eject_after: int = DEFAULT_EJECT_AFTER
    eject_cooldown: float = DEFAULT_EJECT_COOLDOWN
    health: HealthConfig | None = None
    backends: tuple[BackendConfig, ...] = ()
    admin: AdminConfig | None = None
    log: LogConfig = LogConfig()


class ConfigError(ValueError):
    """One configuration error; ``str()`` is the single line ``PATH:LINE: [section] key: message``."""

    def __init__(
        self, path: str, line: int, message: str, section: str | None = None, key: str | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.section = section  # "balancer", "backend b1", ... (no brackets)
        self.key = key
        self.message = message
        super().__init__(_format_error(path, line, section, key, message))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through .args, which holds the formatted line, not our constructor's arguments.
        return (ConfigError, (self.path, self.line, self.message, self.section, self.key))


def _format_error(path: str, line: int, section: str | None, key: str | None, message: str) -> str:
    # section and key come straight from the file: escape control characters so the error stays one line
    section = None if section is None else _printable(section)
    key = None if key is None else _printable(key)
    if section is None:
        return f"{path}:{line}: {message}"
    if key is None:
        return f"{path}:{line}: [{section}]: {message}"
    return f"{path}:{line}: [{section}] {key}: {message}"


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


class _PartError(ValueError):
    """A value error in one line of a multi-line value; ``part`` is the 0-based line within the value."""

    def __init__(self, message: str, part: int) -> None:
        super().__init__(message)
        self.part = part


# ---------------------------------------------------------------------------------------------- values

STRATEGIES: dict[str, str] = {
    "round_robin": "round_robin",
    "rr": "round_robin",
    "weighted_round_robin": "weighted_round_robin",
    "wrr": "weighted_round_robin",
    "least_connections": "least_connections",
    "lc": "least_connections",
    "weighted_least_connections": "weighted_least_connections",
    "wlc": "weighted_least_connections",
    "least_response_time": "least_response_time",
    "lrt": "least_response_time",
    "weighted_least_response_time": "weighted_least_response_time",
    "wlrt": "weighted_least_response_time",
    "power_of_two": "power_of_two",
    "random": "random",
    "ip_hash": "ip_hash",
    "consistent_hash": "consistent_hash",
}

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|s|m|h)?")
_DURATION_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" divides instead (see parse_duration)
_SIZE_RE = re.compile(r"([0-9]+)([kKmM]?)")
_SIZE_UNIT = {"": 1, "k": 1024, "m": 1024 * 1024}
_DIGITS_RE = re.compile(r"[0-9]+")
# RFC 9110 §5.6.2 token; header names and (RFC 6265 §4.1.1) cookie names are tokens
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Host names: letters, digits, '-', '_' (common in service names), dot-separated labels of 1..63 characters.
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
_BACKEND_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_EXPECT_RE = re.compile(r"([0-9]{3})(?:\s*-\s*([0-9]{3}))?")


def parse_duration(text: str) -> float:
    """``500ms``, ``2s``, ``1.5m``, ``1h`` or a bare number of seconds -> float seconds (0 allowed)."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration (expected e.g. 2s or 500ms)")
    m = _DURATION_RE.fullmatch(s)
    if m is None:
        if s.startswith("-"):
            raise ValueError(f"negative duration {s!r}")
        raise ValueError(f"invalid duration {s!r} (expected a number with ms, s, m or h, e.g. 2s or 500ms)")
    number, unit = m.group(1), m.group(2) or "s"
    if unit == "ms":
        seconds = float(number) / 1000.0  # division keeps 1500ms == 1.5 exactly
    else:
        seconds = float(number) * _DURATION_UNIT[unit]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"duration {s!r} is too long (at most 365 days)")
    return seconds


def parse_size(text: str) -> int:
    """A bare number of bytes, or a whole number with ``k`` (1024) or ``m`` (1024**2) -> int bytes."""
    s = text.strip()
    if not s:
        raise ValueError("empty size (expected e.g. 64k, 1m or 512)")
    m = _SIZE_RE.fullmatch(s)
    if m is None:
        if s.startswith("-"):
            raise ValueError(f"negative size {s!r}")
        raise ValueError(f"invalid size {s!r} (expected a whole number of bytes, or with k or m, e.g. 64k)")
    digits = m.group(1)
    if len(digits) > _MAX_DIGITS:
        raise ValueError(f"size {s!r} is too large")
    value = int(digits) * _SIZE_UNIT[m.group(2).lower()]
    if value > _MAX_INT:
        raise ValueError(f"size {s!r} is too large")
    return value


def _parse_int(text: str) -> int:
    s = text.strip()
    if not _DIGITS_RE.fullmatch(s):
        if s.startswith("-") and _DIGITS_RE.fullmatch(s[1:]):
            raise ValueError(f"must not be negative (got {s})")
        raise ValueError(f"{s!r} is not a whole number")
    if len(s) > _MAX_DIGITS or int(s) > _MAX_INT:
        raise ValueError(f"{s} is too large")
    return int(s)


def parse_address(text: str) -> Address:
    """``host:port``; IPv6 literals in brackets (``[::1]:8080``).  Names are checked, not resolved."""
    s = text.strip()
    if not s:
        raise ValueError("empty address (expected host:port, e.g. 127.0.0.1:8080)")
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise ValueError(f"address {s!r} is missing ']' after the IPv6 literal")
        host, rest = s[1:close], s[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"address {s!r} needs :port after ']' (e.g. [::1]:8080)")
        port_text = rest[1:]
        if not host:
            raise ValueError(f"address {s!r} has an empty host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, colon, port_text = s.rpartition(":")
        if not colon:
            raise ValueError(f"address {s!r} has no port (expected host:port, e.g. 127.0.0.1:8080)")
        if ":" in host:
            if _is_ipv6(host):
                raise ValueError(f"IPv6 address {s!r} needs brackets, e.g. [{host}]:{port_text}")
            if _is_ipv6(s):
                raise ValueError(f"IPv6 address {s!r} needs brackets and a port, e.g. [{s}]:8080")
            raise ValueError(f"invalid address {s!r} (expected host:port, IPv6 as [::1]:8080)")
        if not host:
            raise ValueError(f"address {s!r} has an empty host")
        _check_host_name(host)
    return Address(host, _parse_port(port_text))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str) -> int:
    if not _DIGITS_RE.fullmatch(text):
        if not text:
            raise ValueError("port is missing")
        raise ValueError(f"port {text!r} is not a number")
    if len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text} is out of range 1..65535")
    return int(text)


def _check_host_name(host: str) -> None:
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"invalid host name {host!r} (letters, digits, '-', '_' and '.' only)")
    if all(label.isdigit() for label in labels):
        # looks like dotted-quad IPv4: insist on a real one rather than let the resolver guess
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None


def _parse_listen(text: str) -> tuple[Address, ...]:
    """One or more addresses separated by commas and/or newlines (continuation lines)."""
    found: list[Address] = []
    for part, line_text in enumerate(text.split("\n")):
        for item in line_text.split(","):
            if not item.strip():
                continue
            if "=" in item:
                # most likely a key indented under listen, which makes it a continuation line
                raise _PartError(
                    f"{item!r} is not an address; an indented line continues the value above", part
                )
            try:
                address = parse_address(item)
            except ValueError as exc:
                raise _PartError(str(exc), part) from None
            if address in found:
                raise _PartError(f"address {address} is listed twice", part)
            found.append(address)
    if not found:
        raise ValueError("needs at least one host:port address")
    return tuple(found)


def _parse_strategy(text: str) -> str:
    canonical = STRATEGIES.get(text.strip().lower())
    if canonical is None:
        names = ", ".join(STRATEGIES)
        raise ValueError(f"unknown strategy {text.strip()!r} (expected one of {names})")
    return canonical


def _parse_hash_key(text: str) -> str:
    kind, colon, name = text.strip().partition(":")
    kind = kind.strip().lower()
    if not colon and kind in ("client_ip", "path"):
        return kind
    if kind in ("header", "cookie"):
        name = name.strip()
        if not name:
            raise ValueError(f"{kind} needs a name, e.g. {kind}:X-User")
        if not _TOKEN_RE.fullmatch(name):
            raise ValueError(f"{kind} name {name!r} is not a valid HTTP token")
        return f"{kind}:{name}"
    raise ValueError(
        f"unknown hash key {text.strip()!r} (expected client_ip, path, header:NAME or cookie:NAME)"
    )


def _parse_probe_path(text: str) -> str:
    s = text.strip()
    if s.lower() == "tcp":
        return "tcp"
    if not s.startswith("/"):
        raise ValueError(f"probe path {s!r} must start with '/' (or be 'tcp' for a connect-only probe)")
    # RFC 9112 §3.2: the request-target is visible ASCII, no fragment
    if any(c <= " " or c == "\x7f" for c in s):
        raise ValueError(f"probe path {s!r} must not contain spaces or control characters")
    if not s.isascii():
        raise ValueError(f"probe path {s!r} must be ASCII (percent-encode other characters)")
    if "#" in s:
        raise ValueError(f"probe path {s!r} must not contain a '#' fragment")
    return s


def _parse_expect(text: str) -> tuple[int, int]:
    s = text.strip()
    m = _EXPECT_RE.fullmatch(s)
    if m is None:
        raise ValueError(f"invalid status range {s!r} (expected NNN or NNN-NNN, e.g. 200-399)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    for code in (lo, hi):
        if not 100 <= code <= 599:
            raise ValueError(f"status {code} is out of range 100..599")
    if lo > hi:
        raise ValueError(f"status range {s!r} is reversed (low-high)")
    return (lo, hi)


# Fields balrs writes or frames messages by: a request id under one of these names would corrupt requests.
_BALRS_FIELDS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "expect", "via", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
})


def _parse_log_access(text: str) -> str:
    """off, stderr, stdout, or a file path (kept as written; relative to the directory balrs starts in)."""
    s = text.strip()
    if not s:
        raise ValueError("empty value (expected off, stderr, stdout or a file path)")
    if s.lower() in LOG_STREAMS:
        return s.lower()
    if any(c < " " or c == "\x7f" for c in s):
        raise ValueError(f"file path {s!r} must not contain control characters")
    if os.path.isdir(s):
        raise ValueError(f"{s!r} is a directory (expected the path of the log file)")
    directory = os.path.dirname(s) or "."
    if not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} does not exist")
    if not os.access(s if os.path.exists(s) else directory, os.W_OK):
        raise ValueError(f"{s!r} is not writable")
    return s


def _parse_log_format(text: str) -> str:
    s = text.strip().lower()
    if s not in LOG_FORMATS:
        raise ValueError(f"unknown format {text.strip()!r} (expected {', '.join(LOG_FORMATS)})")
    return s


def _parse_log_level(text: str) -> str:
    s = text.strip().lower()
    if s not in LOG_LEVELS:
        raise ValueError(f"unknown level {text.strip()!r} (expected {', '.join(LOG_LEVELS)})")
    return s


def _parse_request_id(text: str) -> str:
    """The request-id field name as written (it is sent in that spelling); empty or ``off``: none."""
    s = text.strip()
    if not s or s.lower() == "off":
        return ""
    if not _TOKEN_RE.fullmatch(s):
        raise ValueError(f"{s!r} is not a valid header field name (RFC 9110 token characters only)")
    if s.lower() in _BALRS_FIELDS:
        raise ValueError(f"{s} is a field balrs itself sets or frames by (use e.g. X-Request-ID)")
    return s


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _parse_int(text)
        if hi is None and value < lo:
            raise ValueError(f"must be at least {lo} (got {value})")
        if hi is not None and not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi} (got {value})")
        return value

    return parse


def _size_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_size(text)
        if hi is None and value < lo:
            raise ValueError(f"must be at least {_show_size(lo)} (got {text.strip()})")
        if hi is not None and not lo <= value <= hi:
            raise ValueError(f"must be between {_show_size(lo)} and {_show_size(hi)} (got {text.strip()})")
        return value

    return parse


def _show_size(n: int) -> str:
    for suffix, unit in (("m", 1024 * 1024), ("k", 1024)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _duration(allow_zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = parse_duration(text)
        if value == 0 and not allow_zero:
            raise ValueError("must be greater than 0")
        return value

    return parse


# ---------------------------------------------------------------------------------------------- key tables
_Parser = Callable[[str], Any]
_REQUIRED: object = object()  # default of a key that must be given

# Keys of [balancer] are the Config fields of the same name.
_BALANCER_KEYS: dict[str, tuple[_Parser, object]] = {
    "listen": (_parse_listen, _REQUIRED),
    "strategy": (_parse_strategy, DEFAULT_STRATEGY),
    "hash_key": (_parse_hash_key, DEFAULT_HASH_KEY),
    "connect_timeout": (_duration(), DEFAULT_CONNECT_TIMEOUT),
    "header_timeout": (_duration(), DEFAULT_HEADER_TIMEOUT),
    "client_timeout": (_duration(), DEFAULT_CLIENT_TIMEOUT),
    "backend_timeout": (_duration(), DEFAULT_BACKEND_TIMEOUT),
    "retries": (_int_range(0, MAX_RETRIES), DEFAULT_RETRIES),
    "max_connections": (_int_range(1), DEFAULT_MAX_CONNECTIONS),
    "max_header_bytes": (_size_range(MIN_HEADER_BYTES, MAX_HEADER_BYTES), DEFAULT_MAX_HEADER_BYTES),
    "max_body_bytes": (_size_range(0), DEFAULT_MAX_BODY_BYTES),
    "drain_timeout": (_duration(allow_zero=True), DEFAULT_DRAIN_TIMEOUT),
    "queue_timeout": (_duration(allow_zero=True), DEFAULT_QUEUE_TIMEOUT),
    "workers": (_int_range(1, MAX_WORKERS), DEFAULT_WORKERS),
    "resolve_interval": (_duration(), DEFAULT_RESOLVE_INTERVAL),
    "tunnel_timeout": (_duration(), DEFAULT_TUNNEL_TIMEOUT),  # extension: idle Upgrade/WebSocket tunnel
    "body_timeout": (_duration(), DEFAULT_BODY_TIMEOUT),  # extension: client silent mid-request-body -> 408
    "send_timeout": (_duration(), DEFAULT_SEND_TIMEOUT),  # extension: client not reading its response
    "slow_start": (_duration(allow_zero=True), DEFAULT_SLOW_START),  # extension: weight ramp after recovery
    "eject_after": (_int_range(0, MAX_RETRIES), DEFAULT_EJECT_AFTER),  # extension: passive outlier detection
    "eject_cooldown": (_duration(), DEFAULT_EJECT_COOLDOWN),  # extension: first ejection time (doubles)
}

_HEALTH_KEYS: dict[str, tuple[_Parser, object]] = {
    "path": (_parse_probe_path, DEFAULT_HEALTH_PATH),
    "interval": (_duration(), DEFAULT_HEALTH_INTERVAL),
    "timeout": (_duration(), DEFAULT_HEALTH_TIMEOUT),
    "rise": (_int_range(1), DEFAULT_HEALTH_RISE),
    "fall": (_int_range(1), DEFAULT_HEALTH_FALL),
    "expect": (_parse_expect, DEFAULT_HEALTH_EXPECT),
}

_BACKEND_KEYS: dict[str, tuple[_Parser, object]] = {
    "address": (parse_address, _REQUIRED),
    "weight": (_int_range(1, MAX_WEIGHT), DEFAULT_WEIGHT),
    "max_connections": (_int_range(0), DEFAULT_BACKEND_MAX_CONNECTIONS),
}

_ADMIN_KEYS: dict[str, tuple[_Parser, object]] = {
    "listen": (_parse_listen, _REQUIRED),
}

# Keys of [log] are the LogConfig fields of the same name.
_LOG_KEYS: dict[str, tuple[_Parser, object]] = {
    "access": (_parse_log_access, DEFAULT_LOG_ACCESS),
    "format": (_parse_log_format, DEFAULT_LOG_FORMAT),
    "level": (_parse_log_level, DEFAULT_LOG_LEVEL),
    "request_id": (_parse_request_id, DEFAULT_LOG_REQUEST_ID),
}

_SECTION_KEYS: dict[str, dict[str, tuple[_Parser, object]]] = {
    "balancer": _BALANCER_KEYS,
    "health": _HEALTH_KEYS,
    "backend": _BACKEND_KEYS,
    "admin": _ADMIN_KEYS,
    "log": _LOG_KEYS,
}

_MULTILINE_KEYS = frozenset({"listen"})  # the only values that may continue on indented lines


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class _Entry:
    key: str
    line: int
    parts: list[str]  # text on the key line, then on each continuation line
    part_lines: list[int]


@dataclass
class _Section:
    kind: str  # balancer | health | admin | log | backend
    name: str  # as shown in errors: "balancer", "backend b1"
    line: int
    backend_name: str = ""
    entries: dict[str, _Entry] = field(default_factory=dict)


_INLINE_COMMENT_RE = re.compile(r"\s[;#]")


def _read(text: str, path: str, errors: list[ConfigError]) -> list[_Section]:
    """Split text into sections and entries; syntax errors go to ``errors`` and reading continues."""
    sections: list[_Section] = []
    first_line: dict[str, int] = {}
    current: _Section | None = None  # None before the first header
    entry: _Entry | None = None  # the key that an indented line would continue
    entry_indent = 0

    def error(line: int, message: str, section: str | None = None, key: str | None = None) -> None:
        errors.append(ConfigError(path, line, message, section, key))

    for lineno, raw in enumerate(text.split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped[0] in ";#":
            continue  # blank and comment lines do not end a multi-line value (as in configparser)
        m = _INLINE_COMMENT_RE.search(raw)
        content = (raw[: m.start()] if m else raw).rstrip()
        indent = len(content) - len(content.lstrip())
        body = content.strip()
        # configparser's rule: a line indented deeper than its key line continues that key's value
        if entry is not None and indent > entry_indent:
            entry.parts.append(body)
            entry.part_lines.append(lineno)
            continue
        entry = None

        if body.startswith("["):
            current = _read_header(body, lineno, path, errors)
            if current is not None:
                if current.name in first_line:
                    error(
                        lineno,
                        f"duplicate section (first at line {first_line[current.name]})",
                        current.name,
                    )
                else:
                    first_line[current.name] = lineno
                    sections.append(current)
                    continue
            # unknown, invalid or duplicate section: read on, but into a section that is thrown away
            current = _Section(kind="", name="", line=lineno)
            continue

        seps = [i for i in (body.find("="), body.find(":")) if i >= 0]
        if not seps:
            error(lineno, f"expected 'key = value', a [section] header or a comment, got {_clip(body)!r}")
            continue
        sep = min(seps)
        key = body[:sep].strip().lower()
        entry = _Entry(key, lineno, [body[sep + 1 :].strip()], [lineno])
        entry_indent = indent
        if not key:
            error(lineno, f"missing key name before {body[sep]!r}")
        elif current is None:
            error(lineno, f"key {key!r} comes before any section (put it under [balancer])")
        elif current.kind and key in current.entries:
            first = current.entries[key].line
            error(lineno, f"duplicate key (first at line {first})", current.name, key)
        elif current.kind:
            current.entries[key] = entry
    return sections


def _read_header(body: str, lineno: int, path: str, errors: list[ConfigError]) -> _Section | None:
    close = body.find("]")
    if close < 0:
        errors.append(ConfigError(path, lineno, f"section header {_clip(body)!r} is missing ']'"))
        return None
    title = body[1:close].strip()
    if body[close + 1 :].strip():
        errors.append(
            ConfigError(path, lineno, f"unexpected text after section header {_clip(body[: close + 1])!r}")
        )
        return None
    if title in ("balancer", "health", "admin", "log"):
        return _Section(kind=title, name=title, line=lineno)
    words = title.split(None, 1)
    if words and words[0] == "backend":
        if len(words) == 1:
            errors.append(ConfigError(path, lineno, "backend section needs a name: [backend NAME]", title))
            return None
        name = words[1].strip()
        if not _BACKEND_NAME_RE.fullmatch(name):
            errors.append(
                ConfigError(
                    path, lineno, f"invalid backend name {name!r} (letters, digits, _ . : - only)", title
                )
            )
            return None
        return _Section(kind="backend", name="backend " + name, line=lineno, backend_name=name)
    errors.append(
        ConfigError(
            path,
            lineno,
            "unknown section (expected [balancer], [health], [admin], [log] or [backend NAME])",
            title or None,
        )
    )
    return None


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- builder


def _section_values(section: _Section, path: str, errors: list[ConfigError]) -> dict[str, Any] | None:
    """Parse every entry of a section through its key table; None if anything was wrong."""
    table = _SECTION_KEYS[section.kind]
    values: dict[str, Any] = {}
    before = len(errors)
    for key, entry in section.entries.items():
        spec = table.get(key)
        if spec is None:
            hint = difflib.get_close_matches(key, list(table), n=1)
            message = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            errors.append(ConfigError(path, entry.line, message, section.name, key))
            continue
        if len(entry.parts) > 1 and key not in _MULTILINE_KEYS:
            errors.append(
                ConfigError(
                    path,
                    entry.line,
                    f"value continues on indented line {entry.part_lines[1]};"
                    " only listen may span several lines",
                    section.name,
                    key,
                )
            )
            continue
        parse = spec[0]
        try:
            values[key] = parse("\n".join(entry.parts))
        except ValueError as exc:
            part = getattr(exc, "part", 0)
            line = entry.part_lines[part] if 0 <= part < len(entry.part_lines) else entry.line
            errors.append(ConfigError(path, line, str(exc), section.name, key))
    for key, (_, default) in table.items():
        if key in section.entries:
            continue
        if default is _REQUIRED:
            errors.append(ConfigError(path, section.line, "required key is missing", section.name, key))
        else:
            values[key] = default
    return values if len(errors) == before else None


def _build(sections: list[_Section], path: str, errors: list[ConfigError]) -> Config | None:
    balancer: dict[str, Any] | None = None
    balancer_section: _Section | None = None
    health: HealthConfig | None = None
    admin: AdminConfig | None = None
    admin_section: _Section | None = None
    log_config = LogConfig()
    backends: list[BackendConfig] = []
    for section in sections:
        values = _section_values(section, path, errors)
        if section.kind == "balancer":
            balancer_section = section
            balancer = values
        elif values is None:
            continue
        elif section.kind == "health":
            health = HealthConfig(**values)
        elif section.kind == "admin":
            admin = AdminConfig(**values)
            admin_section = section
        elif section.kind == "log":
            log_config = LogConfig(**values)
        else:
            backends.append(BackendConfig(name=section.backend_name, line=section.line, **values))

    if balancer is not None and admin is not None and admin_section is not None:
        shared = [a for a in admin.listen if a in balancer["listen"]]
        if shared:
            line = admin_section.entries["listen"].line
            errors.append(
                ConfigError(path, line, f"{shared[0]} is also a [balancer] listen address", "admin", "listen")
            )
    if errors:
        return None
    # Only now the errors that may merely follow from another one (a misspelt header).
    if balancer_section is None:
        errors.append(ConfigError(path, 1, "missing [balancer] section"))
        return None
    if not backends:
        errors.append(
            ConfigError(
                path,
                balancer_section.line,
                "no [backend NAME] section (at least one backend is required)",
                "balancer",
            )
        )
        return None
    assert balancer is not None  # no errors, so [balancer] parsed
    return Config(path=path, health=health, backends=tuple(backends), admin=admin, log=log_config, **balancer)


# ---------------------------------------------------------------------------------------------- entry points


def parse_text(text: str, path: str) -> Config:
    """Parse lb.ini text; ``path`` only labels errors.  Raises ConfigError for the error nearest the top."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark some editors write
    errors: list[ConfigError] = []
    sections = _read(text, path, errors)
    config = _build(sections, path, errors)
    if errors:
        raise min(errors, key=lambda e: e.line)  # min() keeps the first of equal lines
    assert config is not None
    return config


def load(path: str) -> Config:
    """Read and parse ``path`` (UTF-8).  Unreadable files raise ConfigError at line 0."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    return parse_text(text, path)
