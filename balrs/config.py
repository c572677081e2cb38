"""lb.ini -> frozen, validated configuration objects.

The file is configparser-style INI, but read by our own small reader so that every error can name the file,
the line, the section and the key: ``PATH:LINE: [section] key: message``.  Reading happens in two passes:

1. ``_read`` splits the text into sections and ``key = value`` entries (syntax errors: stray lines, duplicate
   sections and keys, unknown sections).  The sections are ``[balancer]``, ``[health]``, ``[admin]``,
   ``[log]``, ``[tls]`` and the named ones ``[backend NAME]``, ``[pool NAME]``, ``[health NAME]``, ``[route NAME]``;
2. ``_build`` checks every entry against the per-section key tables (``_BALANCER_KEYS`` ...) and builds the
   objects, then checks what one section says about another: a route's ``pool`` and a pool's ``backup``
   must name a pool that exists (a ``[pool NAME]`` section, or one a backend's ``pool =`` names), a backup
   chain must not loop, a pool's ``health`` must name a ``[health NAME]`` section, and a route has exactly
   one action (``pool``, ``redirect`` or ``return``), with modifiers only beside ``pool``; a ``tls`` listen
   address needs ``[tls]``, a ``proxy`` one needs ``trusted_proxies``, and a backend's ``tls_*`` keys need
   ``tls = yes``.

Both passes collect errors instead of stopping at the first, so that the error finally raised is the one
nearest the top of the file.  Errors that only follow from other ones ("no [backend NAME] section" when a
backend header was misspelt) are raised only when nothing else is wrong.

Nothing here resolves names, opens sockets, reads certificates or starts anything (``tls.py`` loads the
certificates, and reports a file it cannot load at the line of its key).
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
    "describe_changes",
    "LogConfig",
    "PoolConfig",
    "RouteConfig",
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
# Traffic policy ([balancer], overridable per [pool] except the per-client limits and the secret)
DEFAULT_RETRY_ON = ("connect-failure",)  # HAProxy `retry-on conn-failure` (its default); nginx `error`
DEFAULT_RETRY_BUDGET = 0.2  # Envoy retry_budget budget_percent 20%
DEFAULT_PANIC_THRESHOLD = 0.0  # off (Envoy healthy_panic_threshold defaults to 50%; opt-in here)
DEFAULT_STICKY = ""  # off; "NAME" = cookie insertion with that cookie name
RETRY_CONDITIONS = ("connect-failure", "empty-response", "timeout", "502", "503", "504")

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

# Pools: a backend without `pool =` belongs to this one (the contract's implicit pool).
DEFAULT_POOL = "default"
DEFAULT_ADMIN_WRITE_FROM = ("127.0.0.0/8", "::1/128")  # the admin API's writes: loopback clients only
DEFAULT_REDIRECT_CODE = 302  # nginx `return 302`, HAProxy `redirect location` (302 there too)
REDIRECT_CODES = (301, 302, 303, 307, 308)

# [log]: no access log and no request ids unless asked for, so a file without [log] behaves as before it
DEFAULT_LOG_ACCESS = "off"  # nginx `access_log` is on by default; a balancer at 10k req/s should opt in
DEFAULT_LOG_FORMAT = "combined"  # nginx's predefined `combined` format
DEFAULT_LOG_LEVEL = "info"
DEFAULT_TLS_MIN_VERSION = "1.2"  # Mozilla's "intermediate" profile; HAProxy ssl-min-ver TLSv1.2 in its examples
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0  # HAProxy `timeout client-hs` (defaults to `timeout client`); Envoy 10s
DEFAULT_SEND_PROXY = "off"
TLS_VERSIONS = ("1.2", "1.3")
SEND_PROXY_VERSIONS = ("off", "v1", "v2")
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
    # Flags of a [balancer] listen address: TLS termination, a PROXY protocol header first. They are not
    # part of the address's identity: a reload that changes them keeps the bound socket.
    tls: bool = field(default=False, compare=False)
    proxy: bool = field(default=False, compare=False)

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
    pool: str = DEFAULT_POOL  # the [pool NAME] it belongs to
    tls: bool = False  # TLS to this backend (its health probes too)
    tls_verify: bool = True  # verify the chain and the name
    tls_ca: str = ""  # CA bundle file ("" = the system's)
    tls_sni: str | None = None  # None = the host part of address when it is a name (none for an IP)
    tls_cert: str = ""  # client certificate for mutual TLS (with tls_key, or the key inside it)
    tls_key: str = ""
    send_proxy: str = DEFAULT_SEND_PROXY  # off | v1 | v2: a PROXY protocol header on every new connection


@dataclass(frozen=True)
class HealthConfig:
    path: str = DEFAULT_HEALTH_PATH  # or "tcp": connect-only probe
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    rise: int = DEFAULT_HEALTH_RISE
    fall: int = DEFAULT_HEALTH_FALL
    expect: tuple[int, int] = DEFAULT_HEALTH_EXPECT  # inclusive status range


@dataclass(frozen=True)
class PoolConfig:
    """[pool NAME] (or the implicit ``default`` pool). Policy keys left unset (None) come from
    [balancer]; ``health`` names a [health NAME] section ("" = the plain [health] section)."""

    name: str
    strategy: str | None = None  # a name of STRATEGIES' values, or a Python strategy "package.module:Name"
    hash_key: str | None = None
    retries: int | None = None
    queue_timeout: float | None = None
    backup: str | None = None  # the pool used while no backend of this one is eligible
    health: str = ""
    line: int = 0  # line of the [pool NAME] header (0: implicit)
    # Traffic policy (None: [balancer]'s): retry conditions, retry budget (share of requests), panic
    # threshold (share of backends up), sticky cookie name ("" = off).
    retry_on: tuple[str, ...] | None = None
    retry_budget: float | None = None
    panic_threshold: float | None = None
    sticky: str | None = None


@dataclass(frozen=True)
class RouteConfig:
    """[route NAME]: match keys (every given one must match), exactly one action, modifiers.

    Values are parsed and normalised: hosts lowercased (``*.example.com`` for a wildcard), methods
    uppercased, header names lowercased (``value`` None = presence), CIDRs as ip_network strings."""

    name: str
    line: int = 0
    # match keys
    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    path: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str | None], ...] = ()
    client_ip: tuple[str, ...] = ()
    scheme: str | None = None  # "http" | "https"
    # actions (exactly one of pools / redirect / return_status)
    pools: tuple[tuple[str, int], ...] = ()  # (pool name, weight); one entry = no split
    redirect: str | None = None
    redirect_code: int = DEFAULT_REDIRECT_CODE
    return_status: int | None = None
    return_body: str | None = None  # `return = 200 ok`: "ok" as a text/plain body
    # modifiers (with `pool`)
    strip_prefix: str | None = None
    add_prefix: str | None = None
    set_request_headers: tuple[tuple[str, str], ...] = ()  # (name as written, value)
    remove_request_headers: tuple[str, ...] = ()  # lowercased names
    set_response_headers: tuple[tuple[str, str], ...] = ()
    remove_response_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """[tls]: the certificates of the TLS listen addresses (the first is the default; SNI picks among
    them), the lowest protocol version, the TLS 1.2 cipher string, and the handshake deadline. Paths are
    kept as written (relative to the directory balrs starts in); the files are read by ``tls.py``."""

    certs: tuple[str, ...]
    keys: tuple[str, ...] = ()  # same order as certs; () = every key is inside its cert file
    min_version: str = DEFAULT_TLS_MIN_VERSION
    ciphers: str = ""  # "" = Python's default
    handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    line: int = 0  # line of the cert key (a certificate that cannot be loaded is reported there)


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[Address, ...]
    token_file: str = ""  # the write API's bearer token is in this file ("" = writes answer 403)
    # Networks whose admin clients may write (with the token); others get 403. Loopback by default.
    write_from: tuple[str, ...] = DEFAULT_ADMIN_WRITE_FROM
    # The token read from token_file (at load and at every reload), never printed.
    token: str = field(default="", repr=False, compare=False)


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
    strategy: str = DEFAULT_STRATEGY  # a name of STRATEGIES' values, or a Python strategy "package.module:Name"
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
    # [pool NAME] sections, in file order, plus "default" (implicit, or declared) whenever a backend
    # is in it; every pool a backend, route or backup names is here.
    pools: tuple[PoolConfig, ...] = ()
    # [health NAME] sections, resolved (missing keys from [health], then the defaults); a value of
    # None is `path = none` (no active probes for the pools that use it).
    healths: tuple[tuple[str, HealthConfig | None], ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    # The edge: peers whose PROXY header and X-Forwarded-For are believed (ip_network strings), RFC 7239
    # Forwarded on or off, and [tls] (required when a listen address has the tls flag).
    trusted_proxies: tuple[str, ...] = ()
    forwarded: bool = False
    tls: TLSConfig | None = None
    # Traffic policy: [pool] sections may override the first four (PoolConfig); the per-client limits
    # and the sticky secret are balancer-wide.
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    retry_budget: float = DEFAULT_RETRY_BUDGET
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD
    sticky: str = DEFAULT_STICKY
    sticky_secret: str = ""
    client_rate: float = 0.0
    client_burst: int = 0
    client_connections: int = 0
    # (section, key, line) of every key in the file, for errors found after parsing (a listen address
    # that cannot be bound): see line_of. Not compared: moving a key is no change of configuration.
    key_lines: tuple[tuple[str, str, int], ...] = field(default=(), compare=False, repr=False)

    def line_of(self, section: str, key: str) -> int:
        """The line of ``key`` in ``[section]`` ("balancer", "admin", "backend b1"); 0 if not in the file."""
        for s, k, line in self.key_lines:
            if s == section and k == key:
                return line
        return 0

    def error(self, section: str, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key`` of ``[section]``, at its line (``lb.ini:9: [admin] listen: ...``)."""
        return ConfigError(self.path, self.line_of(section, key), message, section, key)


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


def parse_address(text: str, any_port: bool = False) -> Address:
    """``host:port``; IPv6 literals in brackets (``[::1]:8080``).  Names are checked, not resolved.
    ``any_port``: port 0 is allowed (a listen address: the kernel picks a free port)."""
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
    return Address(host, _parse_port(port_text, any_port))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, any_port: bool = False) -> int:
    if not _DIGITS_RE.fullmatch(text):
        if not text:
            raise ValueError("port is missing")
        raise ValueError(f"port {text!r} is not a number")
    low = 0 if any_port else 1
    if len(text) > 5 or not low <= int(text) <= 65535:
        raise ValueError(f"port {text} is out of range {low}..65535")
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


LISTEN_FLAGS = ("tls", "proxy")


def _parse_listen(text: str, flags_allowed: bool = True) -> tuple[Address, ...]:
    """One or more addresses separated by commas and/or newlines (continuation lines), each optionally
    followed by flags (``0.0.0.0:443 tls``, ``127.0.0.1:8081 tls proxy``). Port 0 is any free port
    (for tests and embedding: ``balrs.serve`` reports the bound one)."""
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
            words = item.split()
            try:
                address = parse_address(words[0], any_port=True)
            except ValueError as exc:
                raise _PartError(str(exc), part) from None
            flags = [w.lower() for w in words[1:]]
            if flags and not flags_allowed:
                raise _PartError(f"{address}: flags ({' '.join(words[1:])}) are for [balancer] listen only", part)
            for flag in flags:
                if flag not in LISTEN_FLAGS:
                    raise _PartError(f"{address}: unknown flag {flag!r} (expected tls and/or proxy)", part)
                if flags.count(flag) > 1:
                    raise _PartError(f"{address}: flag {flag} is given twice", part)
            if flags:
                address = Address(address.host, address.port, tls="tls" in flags, proxy="proxy" in flags)
            if address in found:
                raise _PartError(f"address {address} is listed twice", part)
            found.append(address)
    if not found:
        raise ValueError("needs at least one host:port address")
    return tuple(found)


def _parse_admin_listen(text: str) -> tuple[Address, ...]:
    return _parse_listen(text, flags_allowed=False)


def _parse_yes_no(text: str) -> bool:
    s = text.strip().lower()
    if s in ("yes", "on", "true", "1"):
        return True
    if s in ("no", "off", "false", "0"):
        return False
    raise ValueError(f"expected yes or no, not {text.strip()!r}")


def _parse_write_from(text: str) -> tuple[str, ...]:
    """[admin] write_from: addresses and CIDRs, or ``any``."""
    if text.strip().lower() == "any":
        return ("0.0.0.0/0", "::/0")
    if not text.strip():
        raise ValueError("empty (loopback is the default; `any` allows every address)")
    return _parse_client_ip(text)


def _parse_trusted_proxies(text: str) -> tuple[str, ...]:
    if not text.strip():
        return ()
    return _parse_client_ip(text)


def _parse_paths(text: str) -> tuple[str, ...]:
    """A comma list of file paths (kept as written)."""
    paths = [item.strip() for item in text.split(",")]
    if not any(paths):
        return ()
    for p in paths:
        if not p:
            raise ValueError("empty path in the list")
        if "\0" in p:
            raise ValueError("a path cannot contain NUL")
    return tuple(paths)


def _parse_cert_paths(text: str) -> tuple[str, ...]:
    paths = _parse_paths(text)
    if not paths:
        raise ValueError("needs at least one certificate file (PEM)")
    return paths


def _parse_optional_path(text: str) -> str:
    s = text.strip()
    if "\0" in s:
        raise ValueError("a path cannot contain NUL")
    return s


def _parse_tls_version(text: str) -> str:
    s = text.strip().lower()
    if s.startswith("tlsv"):
        s = s[4:]
    if s not in TLS_VERSIONS:
        raise ValueError(f"unknown TLS version {text.strip()!r} (expected 1.2 or 1.3)")
    return s


def _parse_ciphers(text: str) -> str:
    s = text.strip()
    if s and not re.fullmatch(r"[A-Za-z0-9_:+!@=.,-]+", s):
        raise ValueError(f"invalid OpenSSL cipher string {_clip(s)!r}")
    return s


def _parse_sni(text: str) -> str:
    """A host name for TLS SNI; empty = send none."""
    s = text.strip().lower().rstrip(".")
    if not s:
        return ""
    try:
        ipaddress.ip_address(s)
    except ValueError:
        pass
    else:
        raise ValueError(f"{s!r} is an IP address; SNI carries host names only (leave tls_sni empty)")
    _check_host_name(s)
    return s


def _parse_send_proxy(text: str) -> str:
    s = text.strip().lower()
    if s in ("no", "none"):
        s = "off"
    if s not in SEND_PROXY_VERSIONS:
        raise ValueError(f"unknown PROXY protocol version {text.strip()!r} (expected off, v1 or v2)")
    return s


def _parse_retry_on(text: str) -> tuple[str, ...]:
    """A comma list of retry conditions (``none`` for no retries at all), in the canonical order."""
    words = [w.strip().lower() for w in text.split(",")]
    if words == ["none"] or words == ["off"]:
        return ()
    out = set()
    for w in words:
        if not w:
            raise ValueError("empty item in the list")
        if w not in RETRY_CONDITIONS:
            names = ", ".join(RETRY_CONDITIONS)
            raise ValueError(f"unknown retry condition {w!r} (expected a comma list of {names}, or none)")
        out.add(w)
    return tuple(c for c in RETRY_CONDITIONS if c in out)


def _parse_percent(text: str) -> float:
    """``20%`` (or ``20``) as the share 0.2; 0..100%."""
    s = text.strip()
    digits = s[:-1].strip() if s.endswith("%") else s
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,6})?", digits):
        raise ValueError(f"expected a percentage such as 20% (got {s!r})")
    value = float(digits)
    if value > 100:
        raise ValueError(f"must be 0%..100% (got {s})")
    return value / 100.0


def _parse_sticky(text: str) -> str:
    """``off`` ("") or ``cookie:NAME`` (NAME, a cookie name: an HTTP token)."""
    s = text.strip()
    if s.lower() in ("off", "no", "none"):
        return ""
    kind, colon, name = s.partition(":")
    if kind.strip().lower() != "cookie" or not colon:
        raise ValueError(f"expected off or cookie:NAME (got {s!r})")
    name = name.strip()
    if not name:
        raise ValueError("cookie needs a name, e.g. cookie:LBSID")
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"cookie name {name!r} is not a valid token (RFC 6265)")
    return name


def _parse_secret(text: str) -> str:
    s = text.strip()
    if len(s) < 16:
        raise ValueError("must be at least 16 characters (it keys the sticky cookie ids)")
    return s


def _parse_rate(text: str) -> float:
    s = text.strip()
    if not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,6})?", s):
        raise ValueError(f"expected requests per second, such as 20 or 0.5 (got {s!r})")
    return float(s)


# A Python strategy: ``package.module:Name`` (Name may be dotted: Outer.Inner). pystrategy.check_strategies
# loads it; nothing is imported here.
_PYTHON_STRATEGY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
                                 r":[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _parse_strategy(text: str) -> str:
    s = text.strip()
    if ":" in s:
        if not _PYTHON_STRATEGY_RE.fullmatch(s):
            raise ValueError(f"{s!r} is not a Python strategy (expected package.module:ClassName)")
        return s
    canonical = STRATEGIES.get(s.lower())
    if canonical is None:
        names = ", ".join(STRATEGIES)
        raise ValueError(f"unknown strategy {s!r} (expected one of {names}, or package.module:ClassName)")
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


# ---------------------------------------------------------------------------------------------- pools, routes
MAX_SPLIT_WEIGHT = 1000  # `pool = stable 90, canary 10`: Traefik's weighted services take any int; keep it small
REDIRECT_PLACEHOLDERS = ("scheme", "host", "port", "path", "query")
ROUTE_SCHEMES = ("http", "https")
# Fields balrs frames messages by: a route may neither set nor remove them.
_FRAMING_FIELDS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade",
})
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT_RE = re.compile(r"%(?:([0-9A-Fa-f]{2})|(.{0,2}))", re.DOTALL)
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_STATUS_RE = re.compile(r"[0-9]{3}")


def _name_parser(kind: str) -> Callable[[str], str]:
    """A pool (or health section) name, as in ``pool = api``: the charset of backend names."""

    def parse(text: str) -> str:
        s = text.strip()
        if not s:
            raise ValueError(f"empty value (expected a {kind} name)")
        if not _BACKEND_NAME_RE.fullmatch(s):
            raise ValueError(f"invalid {kind} name {s!r} (letters, digits, _ . : - only)")
        return s

    return parse


_parse_pool_name = _name_parser("pool")
_parse_health_name = _name_parser("health section")


def _parse_named_probe_path(text: str) -> str | None:
    """[health NAME] path: as in [health], or ``none`` (no active probes for the pools using it) -> None."""
    s = text.strip()
    if s.lower() == "none":
        return None
    if s.lower() != "tcp" and not s.startswith("/"):
        raise ValueError(
            f"probe path {s!r} must start with '/' (or be 'tcp' for a connect-only probe, 'none' for none)"
        )
    return _parse_probe_path(s)


def _items(text: str) -> list[tuple[str, int]]:
    """The non-empty items of a comma list that may also continue on lines: (item stripped, line part)."""
    return [
        (item.strip(), part)
        for part, line_text in enumerate(text.split("\n"))
        for item in line_text.split(",")
        if item.strip()
    ]


def _parse_route_hosts(text: str) -> tuple[str, ...]:
    """``api.example.com, *.example.com``: lowercased; ``*.`` + a name; IP literals (IPv6 as ``[::1]``)."""
    found: list[str] = []
    for item, _ in _items(text):
        host = item.lower()
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if "*" in name:
            raise ValueError(f"{item!r}: '*' is allowed only as a whole first label, as in *.example.com")
        if wildcard and (name.startswith("[") or _is_ipv6(name) or all(c.isdigit() or c == "." for c in name)):
            raise ValueError(f"{item!r}: a wildcard needs a host name, not an IP address")
        if name.startswith("["):
            close = name.find("]")
            if close < 0:
                raise ValueError(f"{item!r} is missing ']' after the IPv6 literal")
            if name[close + 1 :]:
                raise ValueError(f"{item!r}: no port here (Host is matched without its port)")
            if not _is_ipv6(name[1:close]):
                raise ValueError(f"{name[1:close]!r} in brackets is not an IPv6 address")
            name = "[" + str(ipaddress.IPv6Address(name[1:close])) + "]"
        elif _is_ipv6(name):
            name = "[" + str(ipaddress.IPv6Address(name)) + "]"
        elif ":" in name:
            raise ValueError(f"{item!r}: no port here (Host is matched without its port)")
        else:
            if not name or name.endswith("."):
                raise ValueError(f"invalid host name {item!r} (write it without a trailing '.')")
            _check_host_name(name)
        host = "*." + name if wildcard else name
        if host in found:
            raise ValueError(f"host {host} is listed twice")
        found.append(host)
    if not found:
        raise ValueError("needs at least one host name (e.g. api.example.com or *.example.com)")
    return tuple(found)


def _check_route_path(text: str, what: str, prefix: bool = False) -> str:
    """A path as requests are matched: ``/``-rooted visible ASCII, no query or fragment, and already in
    the normalised form (RFC 3986 §6.2.2: no percent-encoded unreserved characters, no dot-segments), since
    matching only ever sees that form.  A ``prefix`` may end in a partial segment (``/api/.`` matches
    ``/api/.well-known``)."""
    s = text.strip()
    if not s:
        raise ValueError(f"empty {what} (expected a path such as /api/)")
    if not s.startswith("/"):
        raise ValueError(f"{what} {s!r} must start with '/'")
    if any(c <= " " or c == "\x7f" for c in s):
        raise ValueError(f"{what} {s!r} must not contain spaces or control characters")
    if not s.isascii():
        raise ValueError(f"{what} {s!r} must be ASCII (percent-encode other characters)")
    for c in "?#":
        if c in s:
            raise ValueError(f"{what} {s!r} must not contain {c!r} (the path is matched without query or fragment)")
    for m in _PERCENT_RE.finditer(s):
        if m.group(1) is None:
            raise ValueError(f"{what} {s!r}: '%' must be followed by two hex digits")
        char = chr(int(m.group(1), 16))
        if char in _UNRESERVED:
            raise ValueError(
                f"{what} {s!r} would never match: paths are matched decoded, write {char!r} for {m.group(0)!r}"
            )
    segments = s.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in (".", "..") and not (prefix and i == len(segments) - 1):
            raise ValueError(f"{what} {s!r} would never match: paths are matched with dot-segments removed")
    return s


def _parse_path_prefix(text: str) -> str:
    return _check_route_path(text, "path prefix", prefix=True)


def _parse_exact_path(text: str) -> str:
    return _check_route_path(text, "path")


def _parse_path_regex(text: str) -> str:
    s = text.strip()
    if not s:
        raise ValueError("empty regular expression")
    try:
        re.compile(s)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {_clip(s)!r}: {exc}") from None
    return s


def _parse_methods(text: str) -> tuple[str, ...]:
    found: list[str] = []
    for item, _ in _items(text):
        if not _TOKEN_RE.fullmatch(item):
            raise ValueError(f"{item!r} is not a method (an HTTP token, e.g. GET)")
        method = item.upper()
        if method in found:
            raise ValueError(f"method {method} is listed twice")
        found.append(method)
    if not found:
        raise ValueError("needs at least one method (e.g. GET, HEAD)")
    return tuple(found)


def _check_field_value(value: str, part: int) -> str:
    # RFC 9110 §5.5 field-value, ASCII only: visible characters, spaces and tabs
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        raise _PartError(f"value {value!r} must not contain control characters", part)
    if not value.isascii():
        raise _PartError(f"value {value!r} must be ASCII", part)
    return value


def _field_lines(text: str) -> list[tuple[str, str, str | None, int]]:
    """One ``Name: value`` or ``Name`` per line -> (line, name, value or None, part); names are tokens."""
    out: list[tuple[str, str, str | None, int]] = []
    for part, line_text in enumerate(text.split("\n")):
        line = line_text.strip()
        if not line:
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not _TOKEN_RE.fullmatch(name):
            if "=" in name:
                raise _PartError(f"{line!r} is not a header; an indented line continues the value above", part)
            raise _PartError(f"{name!r} is not a valid header field name (expected 'Name: value')", part)
        out.append((line, name, _check_field_value(value.strip(), part) if colon else None, part))
    return out


def _parse_match_headers(text: str) -> tuple[tuple[str, str | None], ...]:
    """``X-Canary: 1`` (exact value) or ``X-Canary`` (present), one per line -> ((lowercased name, value))."""
    found: list[tuple[str, str | None]] = []
    for _, name, value, part in _field_lines(text):
        if any(name.lower() == seen for seen, _ in found):
            raise _PartError(f"header {name} is listed twice", part)
        found.append((name.lower(), value))
    if not found:
        raise ValueError("needs at least one header (Name: value, or Name for presence)")
    return tuple(found)


def _check_framing(name: str, verb: str, part: int) -> None:
    if name.lower() in _FRAMING_FIELDS:
        raise _PartError(f"{name} is a field balrs itself frames messages by; a route cannot {verb} it", part)


def _parse_set_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``Name: value`` per line -> ((name as written, value)); replaces any field of that name."""
    found: list[tuple[str, str]] = []
    for line, name, value, part in _field_lines(text):
        if value is None:
            raise _PartError(f"{line!r} has no value (expected 'Name: value')", part)
        _check_framing(name, "set", part)
        if any(name.lower() == seen.lower() for seen, _ in found):
            raise _PartError(f"header {name} is set twice", part)
        found.append((name, value))
    if not found:
        raise ValueError("needs at least one 'Name: value'")
    return tuple(found)


def _parse_remove_headers(text: str) -> tuple[str, ...]:
    """Field names, comma-separated and/or one line each -> lowercased names."""
    found: list[str] = []
    for item, part in _items(text):
        if not _TOKEN_RE.fullmatch(item):
            if "=" in item:
                raise _PartError(f"{item!r} is not a header name; an indented line continues the value above", part)
            raise _PartError(f"{item!r} is not a valid header field name", part)
        _check_framing(item, "remove", part)
        if item.lower() in found:
            raise _PartError(f"header {item} is listed twice", part)
        found.append(item.lower())
    if not found:
        raise ValueError("needs at least one header name")
    return tuple(found)


def _parse_client_ip(text: str) -> tuple[str, ...]:
    """Addresses and CIDRs -> ip_network strings (``10.1.2.3/8`` -> ``10.0.0.0/8``, ``::1`` -> ``::1/128``)."""
    found: list[str] = []
    for item, _ in _items(text):
        if item.startswith("["):
            raise ValueError(f"{item!r}: write IPv6 addresses without brackets (e.g. ::1 or fd00::/8)")
        try:
            network = str(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"invalid address or CIDR {item!r} (expected e.g. 10.0.0.0/8, 127.0.0.1 or ::1)") from None
        if network in found:
            raise ValueError(f"{network} is listed twice")
        found.append(network)
    if not found:
        raise ValueError("needs at least one address or CIDR (e.g. 10.0.0.0/8)")
    return tuple(found)


def _parse_scheme(text: str) -> str:
    s = text.strip().lower()
    if s not in ROUTE_SCHEMES:
        raise ValueError(f"unknown scheme {text.strip()!r} (expected http or https)")
    return s


def _parse_route_pools(text: str) -> tuple[tuple[str, int], ...]:
    """``api`` -> (("api", 1),); ``stable 90, canary 10`` -> a weighted split (every pool needs a weight)."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError("empty value (expected a pool name, or a weighted split like 'stable 90, canary 10')")
    found: list[tuple[str, int | None]] = []
    for item in items:
        if not item:
            raise ValueError(f"empty item in {text.strip()!r} (expected 'pool weight, pool weight')")
        words = item.split()
        if len(words) > 2:
            raise ValueError(f"{item!r}: expected a pool name and an optional weight, e.g. 'canary 10'")
        name = _parse_pool_name(words[0])
        weight: int | None = None
        if len(words) == 2:
            try:
                weight = _int_range(1, MAX_SPLIT_WEIGHT)(words[1])
            except ValueError as exc:
                raise ValueError(f"weight of pool {name}: {exc}") from None
        if any(name == seen for seen, _ in found):
            raise ValueError(f"pool {name} is listed twice")
        found.append((name, weight))
    if len(found) > 1:
        missing = [name for name, weight in found if weight is None]
        if missing:
            raise ValueError(f"a weighted split needs a weight for every pool (none for {missing[0]})")
    return tuple((name, 1 if weight is None else weight) for name, weight in found)


def _parse_redirect(text: str) -> str:
    """A Location template: absolute (``https://...``, ``{scheme}://...``) or ``/``-rooted (``/x``, ``{path}``),
    visible ASCII, with only the placeholders {scheme} {host} {port} {path} {query}."""
    s = text.strip()
    if not s:
        raise ValueError("empty URL (expected e.g. https://{host}{path}{query})")
    if any(c < " " or c == "\x7f" for c in s):
        raise ValueError(f"URL {s!r} must not contain control characters")
    if any(c.isspace() for c in s):
        raise ValueError(f"URL {s!r} must not contain spaces (percent-encode them as %20)")
    if not s.isascii():
        raise ValueError(f"URL {s!r} must be ASCII (percent-encode other characters)")
    for m in _PLACEHOLDER_RE.finditer(s):
        if m.group(1) not in REDIRECT_PLACEHOLDERS:
            allowed = " ".join("{" + p + "}" for p in REDIRECT_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {m.group(0)!r} (expected {allowed})")
    rest = _PLACEHOLDER_RE.sub("", s)
    for c in "{}":
        if c in rest:
            raise ValueError(f"URL {s!r} has an unmatched {c!r} (braces only around placeholders)")
    if not (s.startswith(("/", "{path}", "{scheme}")) or _URL_SCHEME_RE.match(s)):
        raise ValueError(
            f"URL {s!r} must start with a scheme (https://...), {{scheme}}, '/' or {{path}}"
        )
    return s


def _parse_redirect_code(text: str) -> int:
    s = text.strip()
    if not _STATUS_RE.fullmatch(s) or int(s) not in REDIRECT_CODES:
        raise ValueError(f"invalid redirect code {s!r} (expected {', '.join(map(str, REDIRECT_CODES))})")
    return int(s)


def _parse_return(text: str) -> tuple[int, str | None]:
    """``403`` or ``200 ok``: a status 200..599, then an optional text/plain body."""
    words = text.strip().split(None, 1)
    if not words or not _STATUS_RE.fullmatch(words[0]):
        raise ValueError(f"invalid return {text.strip()!r} (expected a status, then an optional text, e.g. 403)")
    status = int(words[0])
    if not 200 <= status <= 599:
        raise ValueError(f"status {status} is out of range 200..599")
    body = words[1].strip() if len(words) > 1 else None
    if body is not None and status in (204, 304):
        raise ValueError(f"a {status} response has no body")
    return status, body


def _check_prefix_modifier(text: str, key: str) -> str:
    s = _check_route_path(text, key)
    if s == "/":
        raise ValueError(f"{key} '/' does nothing")
    if s.endswith("/"):
        raise ValueError(f"{key} {s!r} must not end with '/' (write {s.rstrip('/')!r})")
    return s


def _parse_strip_prefix(text: str) -> str:
    return _check_prefix_modifier(text, "strip_prefix")


def _parse_add_prefix(text: str) -> str:
    return _check_prefix_modifier(text, "add_prefix")


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
    "trusted_proxies": (_parse_trusted_proxies, ()),
    "forwarded": (_parse_yes_no, False),
    "retry_on": (_parse_retry_on, DEFAULT_RETRY_ON),
    "retry_budget": (_parse_percent, DEFAULT_RETRY_BUDGET),
    "panic_threshold": (_parse_percent, DEFAULT_PANIC_THRESHOLD),
    "sticky": (_parse_sticky, DEFAULT_STICKY),
    "sticky_secret": (_parse_secret, ""),  # extension: the key of the sticky cookie ids
    "client_rate": (_parse_rate, 0.0),
    "client_burst": (_int_range(0, 1_000_000_000), 0),
    "client_connections": (_int_range(0), 0),
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
    "pool": (_parse_pool_name, DEFAULT_POOL),
    "tls": (_parse_yes_no, False),
    "tls_verify": (_parse_yes_no, True),
    "tls_ca": (_parse_optional_path, ""),
    "tls_sni": (_parse_sni, None),
    "tls_cert": (_parse_optional_path, ""),
    "tls_key": (_parse_optional_path, ""),
    "send_proxy": (_parse_send_proxy, DEFAULT_SEND_PROXY),
}
# Backend keys that mean something only with tls = yes.
_BACKEND_TLS_KEYS = ("tls_verify", "tls_ca", "tls_sni", "tls_cert", "tls_key")

# [tls]: cert and key fill TLSConfig.certs and .keys.
_TLS_KEYS: dict[str, tuple[_Parser, object]] = {
    "cert": (_parse_cert_paths, _REQUIRED),
    "key": (_parse_paths, ()),
    "min_version": (_parse_tls_version, DEFAULT_TLS_MIN_VERSION),
    "ciphers": (_parse_ciphers, ""),
    "handshake_timeout": (_duration(), DEFAULT_TLS_HANDSHAKE_TIMEOUT),
}

# [health NAME]: the keys of [health]; a key it does not set comes from [health] (see _build).
_NAMED_HEALTH_KEYS: dict[str, tuple[_Parser, object]] = dict(
    _HEALTH_KEYS, path=(_parse_named_probe_path, DEFAULT_HEALTH_PATH)
)

# Keys of [pool NAME] are the PoolConfig fields of the same name; None = inherit [balancer]'s.
_POOL_KEYS: dict[str, tuple[_Parser, object]] = {
    "strategy": (_parse_strategy, None),
    "hash_key": (_parse_hash_key, None),
    "retries": (_int_range(0, MAX_RETRIES), None),
    "queue_timeout": (_duration(allow_zero=True), None),
    "backup": (_parse_pool_name, None),
    "health": (_parse_health_name, ""),
    "retry_on": (_parse_retry_on, None),
    "retry_budget": (_parse_percent, None),
    "panic_threshold": (_parse_percent, None),
    "sticky": (_parse_sticky, None),
}

# [route NAME]: every key defaults to "unset" (the RouteConfig field keeps its default).
_ROUTE_KEYS: dict[str, tuple[_Parser, object]] = {
    # match keys
    "host": (_parse_route_hosts, None),
    "path_prefix": (_parse_path_prefix, None),
    "path": (_parse_exact_path, None),
    "path_regex": (_parse_path_regex, None),
    "method": (_parse_methods, None),
    "header": (_parse_match_headers, None),
    "client_ip": (_parse_client_ip, None),
    "scheme": (_parse_scheme, None),
    # actions (exactly one)
    "pool": (_parse_route_pools, None),
    "redirect": (_parse_redirect, None),
    "redirect_code": (_parse_redirect_code, None),
    "return": (_parse_return, None),
    # modifiers (with `pool`)
    "strip_prefix": (_parse_strip_prefix, None),
    "add_prefix": (_parse_add_prefix, None),
    "set_request_header": (_parse_set_headers, None),
    "remove_request_header": (_parse_remove_headers, None),
    "set_response_header": (_parse_set_headers, None),
    "remove_response_header": (_parse_remove_headers, None),
}
# the RouteConfig field of each [route] key; `return` fills return_status and return_body
_ROUTE_FIELDS = {
    "host": "hosts",
    "path_prefix": "path_prefix",
    "path": "path",
    "path_regex": "path_regex",
    "method": "methods",
    "header": "headers",
    "client_ip": "client_ip",
    "scheme": "scheme",
    "pool": "pools",
    "redirect": "redirect",
    "redirect_code": "redirect_code",
    "return": "return_status",
    "strip_prefix": "strip_prefix",
    "add_prefix": "add_prefix",
    "set_request_header": "set_request_headers",
    "remove_request_header": "remove_request_headers",
    "set_response_header": "set_response_headers",
    "remove_response_header": "remove_response_headers",
}
_ROUTE_ACTIONS = ("pool", "redirect", "return")
_ROUTE_MODIFIERS = (
    "strip_prefix", "add_prefix", "set_request_header", "remove_request_header", "set_response_header",
    "remove_response_header",
)

_ADMIN_KEYS: dict[str, tuple[_Parser, object]] = {
    "listen": (_parse_admin_listen, _REQUIRED),
    "token_file": (_parse_optional_path, ""),
    "write_from": (_parse_write_from, DEFAULT_ADMIN_WRITE_FROM),
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
    "pool": _POOL_KEYS,
    "route": _ROUTE_KEYS,
    "tls": _TLS_KEYS,
}

# Per section kind, the values that may continue on indented lines (one value per line for [route]).
_MULTILINE_KEYS: dict[str, frozenset[str]] = {
    "balancer": frozenset({"listen"}),
    "admin": frozenset({"listen"}),
    "route": frozenset({
        "header", "set_request_header", "remove_request_header", "set_response_header", "remove_response_header",
    }),
}


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class _Entry:
    key: str
    line: int
    parts: list[str]  # text on the key line, then on each continuation line
    part_lines: list[int]


@dataclass
class _Section:
    kind: str  # balancer | health | admin | log | backend | pool | route ("" = thrown away)
    name: str  # as shown in errors: "balancer", "backend b1", "health api"
    line: int
    label: str = ""  # NAME of [backend NAME], [pool NAME], [health NAME], [route NAME]; "" for [health]
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
    if title in ("balancer", "health", "admin", "log", "tls"):
        return _Section(kind=title, name=title, line=lineno)
    words = title.split(None, 1)
    if words and words[0] in _NAMED_SECTIONS:
        kind = words[0]
        if len(words) == 1:
            errors.append(ConfigError(path, lineno, f"{kind} section needs a name: [{kind} NAME]", title))
            return None
        name = words[1].strip()
        if not _BACKEND_NAME_RE.fullmatch(name):
            errors.append(
                ConfigError(
                    path, lineno, f"invalid {kind} name {name!r} (letters, digits, _ . : - only)", title
                )
            )
            return None
        return _Section(kind=kind, name=f"{kind} {name}", line=lineno, label=name)
    errors.append(
        ConfigError(
            path,
            lineno,
            "unknown section (expected [balancer], [health], [admin], [log], [tls], [backend NAME], [pool NAME],"
            " [health NAME] or [route NAME])",
            title or None,
        )
    )
    return None


_NAMED_SECTIONS = ("backend", "pool", "health", "route")


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- builder


def _parse_section(section: _Section, path: str, errors: list[ConfigError]) -> dict[str, Any]:
    """Parse every entry of a section through its key table: the values of the entries that parsed, and
    the defaults of keys not given (a key whose value is wrong is absent); errors go to ``errors``."""
    table = _NAMED_HEALTH_KEYS if section.kind == "health" and section.label else _SECTION_KEYS[section.kind]
    multiline = _MULTILINE_KEYS.get(section.kind, frozenset())
    values: dict[str, Any] = {}
    suggested: set[str] = set()  # keys an unknown key's "did you mean" names
    for key, entry in section.entries.items():
        spec = table.get(key)
        if spec is None:
            hint = difflib.get_close_matches(key, list(table), n=1)
            suggested.update(hint)
            message = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            errors.append(ConfigError(path, entry.line, message, section.name, key))
            continue
        if len(entry.parts) > 1 and key not in multiline:
            allowed = ", ".join(sorted(multiline)) if section.kind == "route" else "listen"
            errors.append(
                ConfigError(
                    path,
                    entry.line,
                    f"value continues on indented line {entry.part_lines[1]};"
                    f" only {allowed} may span several lines",
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
            # A misspelt required key (`adress = ...`) is one mistake: its "unknown key (did you mean
            # 'address'?)" says it all, and reporting the header line's "missing" first would hide it.
            if key not in suggested:
                errors.append(ConfigError(path, section.line, "required key is missing", section.name, key))
        else:
            values[key] = default
    return values


def _build(sections: list[_Section], path: str, errors: list[ConfigError]) -> Config | None:
    balancer: dict[str, Any] | None = None
    balancer_section: _Section | None = None
    health: HealthConfig | None = None
    admin: AdminConfig | None = None
    admin_section: _Section | None = None
    log_config = LogConfig()
    tls_config: TLSConfig | None = None
    tls_section: _Section | None = None
    backends: list[BackendConfig] = []
    backend_pools: list[str] = []  # the pool of every backend section that names one validly
    named_healths: list[tuple[_Section, dict[str, Any]]] = []
    pool_sections: list[tuple[_Section, dict[str, Any]]] = []
    route_sections: list[tuple[_Section, dict[str, Any]]] = []
    for section in sections:
        before = len(errors)
        # pools and routes are checked against each other even when some of their keys are wrong
        partial = _parse_section(section, path, errors)
        values = partial if len(errors) == before else None
        if section.kind == "backend" and "pool" in partial:
            backend_pools.append(partial["pool"])
        if section.kind == "balancer":
            balancer_section = section
            balancer = values
        elif section.kind == "pool":
            pool_sections.append((section, partial))
        elif section.kind == "route":
            route_sections.append((section, partial))
        elif values is None:
            continue
        elif section.kind == "health" and section.label:
            named_healths.append((section, values))
        elif section.kind == "health":
            health = HealthConfig(**values)
        elif section.kind == "admin":
            admin = _admin_config(section, values, path, errors)
            admin_section = section
        elif section.kind == "log":
            log_config = LogConfig(**values)
        elif section.kind == "tls":
            tls_section = section
            tls_config = _tls_config(section, values, path, errors)
        else:
            backend = BackendConfig(name=section.label, line=section.line, **values)
            if _check_backend(section, backend, path, errors):
                backends.append(backend)

    if balancer is not None and admin is not None and admin_section is not None:
        shared = [a for a in admin.listen if a in balancer["listen"] and a.port]  # port 0: two free ports
        if shared:
            line = admin_section.entries["listen"].line
            errors.append(
                ConfigError(path, line, f"{shared[0]} is also a [balancer] listen address", "admin", "listen")
            )
    if balancer is not None and balancer_section is not None:
        _check_edge(balancer_section, balancer, tls_section, path, errors)
    # Every pool that exists: declared ones and those a backend names (a [health NAME] section counts
    # as existing even when some of its keys are wrong, so that only those keys are blamed).
    pool_names = {section.label for section, _ in pool_sections} | set(backend_pools)
    health_names = {section.label for section in sections if section.kind == "health" and section.label}
    _check_pools(pool_sections, pool_names, health_names, path, errors)
    routes = [_route(section, values, pool_names, path, errors) for section, values in route_sections]
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
    pools = [PoolConfig(name=section.label, line=section.line, **values) for section, values in pool_sections]
    declared = {pool.name for pool in pools}
    for backend in backends:  # implicit pools, in order of first appearance
        if backend.pool not in declared:
            declared.add(backend.pool)
            pools.append(PoolConfig(backend.pool))
    return Config(
        path=path,
        health=health,
        backends=tuple(backends),
        admin=admin,
        log=log_config,
        pools=tuple(pools),
        healths=tuple(_named_health(section, values, health) for section, values in named_healths),
        routes=tuple(route for route in routes if route is not None),
        tls=tls_config,
        key_lines=tuple((s.name, e.key, e.line) for s in sections if s.kind for e in s.entries.values()),
        **balancer,
    )


def _admin_config(section: _Section, values: dict[str, Any], path: str, errors: list[ConfigError]) -> AdminConfig:
    """[admin], with the write API's token read from ``token_file`` (an error names the key's line)."""
    token = ""
    token_file = values.get("token_file", "")
    if token_file:
        line = section.entries["token_file"].line
        try:
            with open(token_file, "rb") as f:
                raw = f.read(4097)
        except OSError as exc:
            errors.append(ConfigError(path, line, f"cannot read {token_file}: {exc.strerror or exc}", "admin",
                                      "token_file"))
            raw = b""
        else:
            text = raw.decode("utf-8", "replace").strip()
            if len(raw) > 4096 or not text or any(c.isspace() or not c.isprintable() for c in text):
                errors.append(ConfigError(path, line, f"{token_file} must hold one token: 1 to 4096 printable "
                                          "characters without spaces", "admin", "token_file"))
            else:
                token = text
    return AdminConfig(token=token, **values)


def _tls_config(section: _Section, values: dict[str, Any], path: str, errors: list[ConfigError]) -> TLSConfig | None:
    certs, keys = values["cert"], values["key"]
    if keys and len(keys) != len(certs):
        line = section.entries["key"].line
        message = (f"{len(keys)} key files for {len(certs)} certificates"
                   " (same order; or omit key when each key is in its cert file)")
        errors.append(ConfigError(path, line, message, section.name, "key"))
        return None
    return TLSConfig(certs=certs, keys=keys, min_version=values["min_version"], ciphers=values["ciphers"],
                     handshake_timeout=values["handshake_timeout"], line=section.entries["cert"].line)


def _check_backend(section: _Section, backend: BackendConfig, path: str, errors: list[ConfigError]) -> bool:
    """A backend's tls_* keys need tls = yes; tls_key needs tls_cert."""
    before = len(errors)
    if not backend.tls:
        for key in _BACKEND_TLS_KEYS:
            if key in section.entries:
                errors.append(ConfigError(path, section.entries[key].line, "only with tls = yes", section.name, key))
    if backend.tls_key and not backend.tls_cert:
        errors.append(ConfigError(path, section.entries["tls_key"].line, "needs tls_cert (the client certificate)",
                                  section.name, "tls_key"))
    return len(errors) == before


def _check_edge(balancer_section: _Section, balancer: dict[str, Any], tls_section: _Section | None, path: str,
                errors: list[ConfigError]) -> None:
    """A tls listen address needs [tls]; a proxy one needs trusted_proxies (whose PROXY headers to believe)."""
    listen: tuple[Address, ...] = balancer["listen"]
    line = balancer_section.entries["listen"].line
    tls = [a for a in listen if a.tls]
    if tls and tls_section is None:
        errors.append(ConfigError(path, line, f"{tls[0]} has the tls flag, but there is no [tls] section"
                                  " (cert = ..., key = ...)", "balancer", "listen"))
    proxy = [a for a in listen if a.proxy]
    if proxy and not balancer["trusted_proxies"]:
        errors.append(ConfigError(path, line, f"{proxy[0]} has the proxy flag, but trusted_proxies is not set"
                                  " (the peers whose PROXY header is believed)", "balancer", "listen"))
    any_port = [a for a in listen if a.port == 0]
    if any_port and balancer["workers"] > 1:
        # Every worker binds its own socket (SO_REUSEPORT): port 0 would give each one another port.
        errors.append(ConfigError(path, line, f"{any_port[0]}: port 0 (any free port) needs workers = 1",
                                  "balancer", "listen"))


def _named_health(
    section: _Section, values: dict[str, Any], health: HealthConfig | None
) -> tuple[str, HealthConfig | None]:
    """A [health NAME] section: the keys it does not give come from [health] when that exists."""
    merged = dict(values)
    if health is not None:
        for key in _HEALTH_KEYS:
            if key not in section.entries:
                merged[key] = getattr(health, key)
    if merged["path"] is None:  # path = none: no active probes
        return section.label, None
    return section.label, HealthConfig(**merged)


def _unknown_pool(name: str) -> str:
    return f"unknown pool {name!r} (no [pool {name}] section, and no backend has pool = {name})"


def _check_pools(
    pool_sections: list[tuple[_Section, dict[str, Any]]],
    pool_names: set[str],
    health_names: set[str],
    path: str,
    errors: list[ConfigError],
) -> None:
    """``backup`` names another pool that exists, without a loop; ``health`` names a [health NAME]."""
    backups: dict[str, str] = {}
    for section, values in pool_sections:
        backup = values.get("backup")
        if backup is not None:
            line = section.entries["backup"].line
            if backup == section.label:
                errors.append(ConfigError(path, line, "a pool cannot be its own backup", section.name, "backup"))
            elif backup not in pool_names:
                errors.append(ConfigError(path, line, _unknown_pool(backup), section.name, "backup"))
            else:
                backups[section.label] = backup
        health = values.get("health")
        if health and health not in health_names:
            line = section.entries["health"].line
            message = f"unknown health section {health!r} (no [health {health}] section)"
            errors.append(ConfigError(path, line, message, section.name, "health"))
    for section, _ in pool_sections:
        if section.label not in backups:
            continue
        chain = [section.label]
        name = backups[section.label]
        while name in backups and name not in chain:
            chain.append(name)
            name = backups[name]
        if name == section.label:  # every pool on the loop is blamed; the topmost error wins
            line = section.entries["backup"].line
            message = "backup chain loops: " + " -> ".join(chain + [name])
            errors.append(ConfigError(path, line, message, section.name, "backup"))


def _route(
    section: _Section, values: dict[str, Any], pool_names: set[str], path: str, errors: list[ConfigError]
) -> RouteConfig | None:
    """A [route NAME] from the values of its keys that parsed; None if something was wrong with it."""
    entries = section.entries
    before = len(errors)

    def error(key: str, message: str) -> None:
        errors.append(ConfigError(path, entries[key].line, message, section.name, key))

    actions = sorted((key for key in _ROUTE_ACTIONS if key in entries), key=lambda key: entries[key].line)
    if not actions:
        message = "no action (a route needs exactly one of pool, redirect, return)"
        errors.append(ConfigError(path, section.line, message, section.name))
    for key in actions[1:]:
        first = actions[0]
        error(key, f"a route has exactly one action, and this one already has {first} (line {entries[first].line})")
    if actions and actions[0] != "pool":
        for key in _ROUTE_MODIFIERS:
            if key in entries:
                error(key, f"only with pool (this route's action is {actions[0]})")
    if "redirect_code" in entries and "redirect" not in entries:
        error("redirect_code", "only with redirect")
    for name, _ in values.get("pool") or ():
        if name not in pool_names:
            error("pool", _unknown_pool(name))
    for direction in ("request", "response"):
        set_key, remove_key = f"set_{direction}_header", f"remove_{direction}_header"
        removed = values.get(remove_key) or ()
        both = [name for name, _ in values.get(set_key) or () if name.lower() in removed]
        if both:
            error(max(set_key, remove_key, key=lambda key: entries[key].line), f"{both[0]} is both set and removed")
    if len(errors) != before or any(key not in values for key in entries):
        return None
    fields: dict[str, Any] = {}
    for key in entries:
        if key == "return":
            fields["return_status"], fields["return_body"] = values[key]
        else:
            fields[_ROUTE_FIELDS[key]] = values[key]
    return RouteConfig(name=section.label, line=section.line, **fields)


# ---------------------------------------------------------------------------------------------- entry points


def parse_text(text: str, path: str) -> Config:
    """Parse lb.ini text; ``path`` only labels errors.  Raises ConfigError for the error nearest the top."""
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark some editors write
        text = text[1:]
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


def describe_changes(old: Config, new: Config) -> list[str]:
    """What a reload changes in how requests are balanced, for its log line: backend weights
    (``weight b2 1 -> 5``), [balancer] strategy (``strategy round_robin -> least_connections``, or
    just ``strategy round_robin`` when it stays) and the strategy of each pool that sets its own
    (``pool api strategy random -> ip_hash``). Backends added and removed are the pool's to say
    (it matches them by name and address)."""
    changes = []
    old_weights = {b.name: b.weight for b in old.backends}
    weights = [f"{b.name} {old_weights[b.name]} -> {b.weight}" for b in new.backends
               if b.name in old_weights and old_weights[b.name] != b.weight]
    if weights:
        changes.append(("weight " if len(weights) == 1 else "weights ") + ", ".join(weights))
    changes.append(f"strategy {old.strategy} -> {new.strategy}" if old.strategy != new.strategy
                   else f"strategy {new.strategy}")
    old_pools = {p.name: p for p in old.pools}
    for pool in new.pools:
        before = old_pools.get(pool.name)
        if before is None or (before.strategy is None and pool.strategy is None):
            continue  # a new pool, or one that follows [balancer] strategy (said above)
        was, now = before.strategy or old.strategy, pool.strategy or new.strategy
        if was != now:
            changes.append(f"pool {pool.name} strategy {was} -> {now}")
    return changes
