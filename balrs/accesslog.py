"""The access log: one line per finished exchange, written without ever blocking the event loop.

- :func:`make_formatter` turns a finished exchange (any object with the attributes listed in
  :data:`RECORD_FIELDS`) into one line, ``common`` (NCSA), ``combined`` (nginx) or ``json``. Sans-IO: it
  reads no clock and touches no file. Bytes from the client are escaped so that no client can forge a
  line: nothing it sends can put a raw newline, quote or control character in the output.
- :class:`LogSink` is a destination (stderr, stdout or a file). ``write`` appends to a bounded
  in-memory buffer and returns; a writer thread empties it in batches. A destination that cannot keep
  up makes the buffer fill, and then lines are dropped and counted (``dropped``), never waited for.
- :class:`RateLimitFilter` keeps a repeated event-log message from flooding stderr.
- :func:`valid_request_id` and :class:`RequestIds` check a client's request id and make new ones.

Nothing here runs at import; the writer thread starts on a sink's first write, so a sink made in a
worker after ``os.fork()`` gets its own thread (and one inherited across a fork is reset in the child).

Cost, on the loop thread (callgrind, CPython 3.11): a json line ~18 500 instructions for wrk's request
and ~25 000 for a browser-like one, combined ~11 000, common ~9 000, ``LogSink.write`` ~2 000 (the
writer thread's work is per batch, not per line). In CPython every field costs a few hundred
instructions and a float conversion about a thousand, so the formatters check all client octets with
one ``bytes.translate``, cache what repeats (time strings per second, client addresses, the outcome
part), and avoid Python-level calls per field.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import logging
import math
import os
import select
import stat
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

__all__ = [
    "FORMATS",
    "EXCHANGE_FIELDS",
    "RECORD_FIELDS",
    "LogSink",
    "RateLimitFilter",
    "RequestIds",
    "make_formatter",
    "valid_request_id",
]

log = logging.getLogger("balrs")

# ---------------------------------------------------------------------------------------------- limits
# Bytes of lines a sink holds while its destination is slow. nginx's `access_log ... buffer=64k` blocks
# the worker when its destination stalls; we drop instead, and 4 MiB (~8 000 json or ~20 000 combined
# lines, about a second at 10 000 requests/s) rides out a slow disk or a busy log shipper.
MAX_BUFFER_BYTES = 4 * 1024 * 1024
# One os.write per batch to a regular file (nginx's `buffer=64k` example; O_APPEND writes of this size
# land whole). To a pipe or a terminal, batches stay within PIPE_BUF so that no line of ours can be
# interleaved with another writer's (the event log shares stderr): POSIX makes such writes atomic.
WRITE_BATCH_BYTES = 64 * 1024
PIPE_BATCH_BYTES = getattr(select, "PIPE_BUF", 512)
# The writer sleeps on an Event that write() sets only when the writer is idle; this is the longest
# it sleeps without one (a safety net, not a poll: an idle sink wakes once a second).
# How long the writer waits for more lines after a batch before it goes idle (and needs waking).
WRITER_GATHER = 0.02
WRITER_IDLE_WAIT = 1.0
# A destination that refuses writes without blocking (a non-blocking pipe) is waited for this long.
WRITE_READY_WAIT = 1.0
# close() waits this long for buffered lines by default (a graceful stop; a reload passes 0).
CLOSE_TIMEOUT = 1.0
# Formatting caches: seconds whose time strings are kept (requests finish out of order, so a few
# recent seconds are hit), and client addresses and (pool, backend, route, retries, end) outcomes whose
# encoded form is kept (a cache that fills is emptied: a miss only costs the encoding).
TIME_CACHE_SECONDS = 16
NAME_CACHE_SIZE = 4096
# RateLimitFilter: distinct messages tracked (least recently seen forgotten first).
RATE_LIMIT_KEYS = 1024
# A request id kept from a client: 1-128 of these characters (the contract's rule; it is safe to log
# and to send on as a field value unchanged).
REQUEST_ID_MAX = 128
_REQUEST_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
# Maps those characters to themselves and every other octet to '.', so a value is made of them only if
# translating leaves it unchanged (one C loop; a regular expression costs four times as much).
_REQUEST_ID_TABLE = bytes(c if c in _REQUEST_ID_CHARS else 0x2E for c in range(256))
# Hex digits of the random per-process prefix of generated request ids: 64 bits, so that ids from
# many processes and restarts do not collide.
REQUEST_ID_PREFIX_BYTES = 8

FORMATS = ("common", "combined", "json")

# What make_formatter reads from a finished exchange.
# A record may also be an exchange (``proxy.exchange.Exchange``): then its ``req`` is the parsed request
# head or None (a refused request), and when it is not None the formatters read the request line,
# Host, User-Agent and Referer from it and the outcome from ``be``, ``pool_ref``, ``route_ref`` and
# ``failed`` (objects with ``name``/``pool``, ``name``, ``name`` and ``retries``), instead of calling the
# properties of RECORD_FIELDS that give the same values: those calls were half the cost of a line.
EXCHANGE_FIELDS = ("req", "be", "pool_ref", "route_ref", "failed")

RECORD_FIELDS = (
    "client", "method", "target", "minor", "host", "user_agent", "referer", "status", "bytes_in",
    "bytes_out", "t_start", "t_connected", "t_response", "t_done", "wall_start", "pool", "backend",
    "route", "retries", "request_id", "end",
)

# ---------------------------------------------------------------------------------------------- escaping
# Octets that appear in a line as they are: printable ASCII without '"' and '\'. _CLEAN maps them to
# themselves and every other octet to '?' (itself plain), so ``v.translate(_CLEAN) is v`` holds exactly
# for a clean value: one C loop, and no copy (translate returns its argument when nothing changed).
_PLAIN = frozenset(c for c in range(0x20, 0x7F) if c not in b'"\\')
_CLEAN = bytes(c if c in _PLAIN else 0x3F for c in range(256))
# nginx's escaping of variables in log lines (ngx_http_log_escape): '"', '\', control characters and
# octets >= 0x7F become \xHH.
_NGINX_ESCAPE = [bytes([c]) if c in _PLAIN else b"\\x%02X" % c for c in range(256)]
# Stands for a time that did not happen: "%.3f" makes it nan, then replaced by null.
_NAN = float("nan")
# math.floor is several times cheaper than int() on a float (a type call).
_floor = math.floor
# Decimal strings of small numbers, so that common values cost an index instead of a conversion (an
# int conversion is the dearest step of a line, ~500 instructions each).
_DEC = [b"%d" % i for i in range(1000)]
_FRAC3 = [b"%03d" % i for i in range(1000)]


def _nginx_escape(value: bytes) -> bytes:
    return b"".join([_NGINX_ESCAPE[c] for c in value])


def _nginx_client(value: Optional[str]) -> bytes:
    """The client address, which must stay one word."""
    if not value:
        return b"-"
    raw = value.encode("utf-8", "backslashreplace")
    if raw.translate(_CLEAN) is not raw or raw.find(b" ") >= 0:
        raw = b"".join([b"\\x20" if c == 0x20 else _NGINX_ESCAPE[c] for c in raw])
    return raw


def _json_inner(value: Optional[bytes]) -> Optional[bytes]:
    """Octets from the wire as the inside of a JSON string: UTF-8 where valid, other octets as the text
    \\xHH, everything else JSON-escaped (ASCII only: no raw U+2028 or NEL either)."""
    if value is None:
        return None
    return json.dumps(value.decode("utf-8", "backslashreplace")).encode("ascii")[1:-1]


def _json_text(value: Optional[str]) -> bytes:
    """A whole JSON value (quoted, or null) for a text field."""
    if value is None:
        return b"null"
    return json.dumps(value).encode("ascii")


def _as_bytes(value: Any) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "backslashreplace")


def _agent_referer(req: Any) -> Tuple[Optional[bytes], Optional[bytes]]:
    """User-Agent and Referer of a parsed request head (the first of each; None when absent), found by
    substring search of its lowercased copy (as RequestHead.find_field does, without its calls). A field
    name only ever follows a LF there: the parser takes no bare LF, and no value holds one. (find, not
    ``in``: bytes.__contains__ first tries its argument as an int, and that failure costs more.)"""
    low = req.low
    i = low.find(b"\nuser-agent:")
    agent = None if i < 0 else req.raw[i + 12:low.index(b"\r", i + 12)].strip(b" \t")
    i = low.find(b"\nreferer:")
    referer = None if i < 0 else req.raw[i + 9:low.index(b"\r", i + 9)].strip(b" \t")
    return agent, referer


def _bounded(cache: Dict[Any, Any]) -> Dict[Any, Any]:
    """``cache`` made ready for one more entry: cleared when it holds NAME_CACHE_SIZE."""
    if len(cache) >= NAME_CACHE_SIZE:
        cache.clear()
    return cache


# ---------------------------------------------------------------------------------------------- time
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _offset(tm: time.struct_time) -> Tuple[str, int, int]:
    gmtoff = tm.tm_gmtoff or 0
    sign = "-" if gmtoff < 0 else "+"
    minutes = abs(gmtoff) // 60
    return sign, minutes // 60, minutes % 60


def _clf_time(sec: int) -> bytes:
    """nginx's $time_local (and NCSA %t): ``03/Dec/2026:13:05:01 +0000``, local time, English months."""
    tm = time.localtime(sec)
    sign, hh, mm = _offset(tm)
    return ("%02d/%s/%04d:%02d:%02d:%02d %s%02d%02d" % (
        tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec, sign, hh, mm,
    )).encode("ascii")


def _json_time(sec: int) -> Tuple[bytes, bytes, int]:
    """The start of a json line around the milliseconds of ``time`` (which ``ts`` repeats, like nginx's
    $msec): ``{"time":"2026-12-03T13:05:01.`` and ``+00:00","ts":1796303101.`` (ISO 8601, local time),
    and the second in milliseconds (so that a line finds its milliseconds with one subtraction)."""
    tm = time.localtime(sec)
    sign, hh, mm = _offset(tm)
    return (
        ('{"time":"%04d-%02d-%02dT%02d:%02d:%02d.' % (
            tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)).encode("ascii"),
        ('%s%02d:%02d","ts":%d.' % (sign, hh, mm, sec)).encode("ascii"),
        sec * 1000,
    )


def _per_second(make: Callable[[int], Any]) -> Tuple[Dict[int, Any], Callable[[int], Any]]:
    """A cache of ``make(second)`` (time formatting is the dearest part of a line) and its filler: look
    the second up in the dict, and call the filler on a miss. A few recent seconds are kept, since
    lines come in the order requests finish, not the order they arrived."""
    cache: Dict[int, Any] = {}

    def fill(sec: int) -> Any:
        if len(cache) >= TIME_CACHE_SECONDS:
            cache.clear()
        out = cache[sec] = make(sec)
        return out

    return cache, fill


# ---------------------------------------------------------------------------------------------- formats
def make_formatter(fmt: str) -> Callable[[Any], bytes]:
    """The line maker of one format: ``common``, ``combined`` or ``json``.

    The returned function takes one finished exchange (the attributes of :data:`RECORD_FIELDS`) and
    returns one line ending with b"\\n". The time shown is when the request arrived (``wall_start``;
    NCSA's %t, where nginx's $time_local is when the line was written).
    """
    if fmt == "json":
        return _json_formatter()
    if fmt == "combined":
        return _clf_formatter(combined=True)
    if fmt == "common":
        return _clf_formatter(combined=False)
    raise ValueError("unknown access log format %r (expected one of %s)" % (fmt, ", ".join(FORMATS)))


# nginx: $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer"
# "$http_user_agent"; NCSA common: host ident authuser [date] "request" status bytes ('-' for none).
# The byte count is the record's bytes_out: what went to the client, head included.
_COMBINED = b'%s - - [%s] "%s %s HTTP/1.%d" %03d %d "%s" "%s"\n'
_COMMON = b'%s - - [%s] "%s %s HTTP/1.%d" %03d %s\n'


def _clf_formatter(combined: bool) -> Callable[[Any], bytes]:
    times, new_time = _per_second(_clf_time)
    clients: Dict[Any, bytes] = {}
    # No request line was parsed: "-" stands for it (nginx logs what it got; we have nothing clean).
    unparsed = (_COMBINED if combined else _COMMON).replace(b"%s %s HTTP/1.%d", b"-%.0s%.0s%.0s")

    def new_client(client: Any) -> bytes:
        _bounded(clients)[client] = part = _nginx_client(client)
        return part

    # Written out inline, without helpers: a Python call costs as much as formatting two fields.
    def line(r: Any) -> bytes:
        client = clients.get(r.client) or new_client(r.client)
        sec = _floor(r.wall_start)
        when = times.get(sec) or new_time(sec)
        req = r.req
        if req is not None:
            # An exchange with its parsed head (see EXCHANGE_FIELDS).
            method = req.method
            target = req.target
            minor = req.minor
            if combined:
                agent, referer = _agent_referer(req)
                agent = agent or b"-"
                referer = referer or b"-"
            else:
                agent = referer = b"-"
        else:
            method = r.method
            target = r.target
            minor = r.minor
            referer = r.referer or b"-"
            agent = r.user_agent or b"-"
        wire = method + target + referer + agent if combined else method + target
        if wire.translate(_CLEAN) is not wire:
            method, target, referer, agent = (
                _nginx_escape(method), _nginx_escape(target), _nginx_escape(referer), _nginx_escape(agent))
        if minor < 0:
            return unparsed % ((client, when, b"", b"", b"", r.status) + (
                (r.bytes_out, referer, agent) if combined else (b"%d" % r.bytes_out if r.bytes_out else b"-",)))
        if combined:
            return _COMBINED % (client, when, method, target, minor, r.status, r.bytes_out, referer, agent)
        sent = r.bytes_out
        return _COMMON % (client, when, method, target, minor, r.status, b"%d" % sent if sent else b"-")

    return line


# The json line: its time part ('{"time":...,"ts":...'), then the fields. Four
# values are often absent: a variant of the line per combination prints null for them and swallows the
# argument with %.0s, so that no present value needs quotes added.
_JSON_LINE = (
    b'%s,"client":"%s","method":"%s","protocol":%s,"host":"%s","user_agent":"%s","path":"%s",'
    b'"status":%s,"bytes_in":%d,"bytes_out":%d,"duration_ms":%.3f,"connect_ms":%.3f,"upstream_ms":%.3f,%s,'
    b'"request_id":"%s","referer":"%s"}\n'
)
_JSON_OPTIONAL = (b"host", b"user_agent", b"request_id", b"referer")  # bit 0, 1, 2, 3 of the variant


def _json_variant(absent: int) -> bytes:
    line = _JSON_LINE
    for bit, name in enumerate(_JSON_OPTIONAL):
        if absent & (1 << bit):
            line = line.replace(b'"%s":"%%s"' % name, b'"%s":null%%.0s' % name)
    return line


_JSON_LINES = tuple(_json_variant(absent) for absent in range(1 << len(_JSON_OPTIONAL)))
_PROTOCOLS = {0: b'"HTTP/1.0"', 1: b'"HTTP/1.1"', -1: b"null"}


def _json_client(client: Any) -> bytes:
    raw = _as_bytes(client) or b""
    return raw if raw.translate(_CLEAN) is raw else _json_inner(raw) or b""


def _json_outcome(key: Tuple[Any, ...]) -> bytes:
    pool, backend, route, retries, end = key
    return b'"pool":%s,"backend":%s,"route":%s,"retries":%d,"end":%s' % (
        _json_text(pool), _json_text(backend), _json_text(route), retries, _json_text(end))


_PROTOCOL_OF_MINOR = (b'"HTTP/1.0"', b'"HTTP/1.1"')


def _json_formatter() -> Callable[[Any], bytes]:
    seconds, new_second = _per_second(_json_time)
    # The time part of the last line's millisecond: under load many lines in a row share it, and one
    # compare finds it (a dict of milliseconds cost a dict insert per new one, which at low rates or
    # under valgrind is every line).
    last_msec = -1
    last_stamp = b""
    clients: Dict[Any, bytes] = {}
    # (pool, backend, route, retries, end) takes few values: that part of the line is made once each.
    outcomes: Dict[Tuple[Any, ...], bytes] = {}

    def new_client(client: Any) -> bytes:
        _bounded(clients)[client] = part = _json_client(client)
        return part

    def new_outcome(key: Tuple[Any, ...]) -> bytes:
        _bounded(outcomes)[key] = part = _json_outcome(key)
        return part

    def new_exchange_outcome(key: Tuple[Any, ...]) -> bytes:
        be, pool, route, retries, end = key
        names = (be.pool if be is not None else pool.name if pool is not None else None,
                 be.name if be is not None else None, route.name if route is not None else None, retries, end)
        _bounded(outcomes)[key] = part = outcomes.get(names) or new_outcome(names)
        return part

    def record_line(r: Any, stamp: bytes) -> bytes:
        """The line of any record (RECORD_FIELDS), a refused request or an exchange off the fast path,
        with its time part (from line())."""
        client = clients.get(r.client) or new_client(r.client)
        key = (r.pool, r.backend, r.route, r.retries, r.end)
        outcome = outcomes.get(key) or new_outcome(key)
        method = r.method
        target = r.target
        host = r.host
        minor = r.minor
        agent = r.user_agent
        referer = r.referer
        rid = r.request_id
        if rid is not None and rid.__class__ is not bytes:
            rid = _as_bytes(rid)
        # One check for every octet the client chose; escaping only if one is not plain.
        wire = b"".join((method, target, host or b"", agent or b"", referer or b"", rid or b""))
        if wire.translate(_CLEAN) is not wire:
            method, target = _json_inner(method) or b"", _json_inner(target) or b""
            host, agent, referer, rid = _json_inner(host), _json_inner(agent), _json_inner(referer), _json_inner(rid)
        t_start = r.t_start
        t_done = r.t_done
        t_connected = r.t_connected
        t_response = r.t_response
        absent = (host is None) + 2 * (agent is None) + 4 * (rid is None) + 8 * (referer is None)
        out = _JSON_LINES[absent] % (
            stamp, client, method, _PROTOCOLS.get(minor) or b'"HTTP/1.%d"' % minor,
            host or b"", agent or b"", target, _DEC[r.status], r.bytes_in, r.bytes_out,
            (t_done - t_start) * 1000.0 if t_done > t_start else 0.0,
            (t_connected - t_start) * 1000.0 if t_connected else _NAN,
            (t_response - t_connected) * 1000.0 if t_response and t_connected else _NAN,
            outcome, rid or b"", referer or b"",
        )
        if not (t_connected and t_response):
            # Every '"' inside a value is escaped, so only our own fields can match.
            out = out.replace(b'"connect_ms":nan', b'"connect_ms":null').replace(
                b'"upstream_ms":nan', b'"upstream_ms":null')
        return out

    def line(r: Any) -> bytes:
        """An exchange with its parsed head (EXCHANGE_FIELDS), answered by a backend: its fields read
        directly, without a property call each (those were half the cost of a line); anything else
        takes record_line."""
        nonlocal last_msec, last_stamp
        msec = _floor(r.wall_start * 1000.0)
        if msec != last_msec:
            sec = msec // 1000
            head = seconds.get(sec) or new_second(sec)
            ms = _FRAC3[msec - head[2]]
            last_stamp = head[0] + ms + head[1] + ms
            last_msec = msec
        stamp = last_stamp
        req = r.req
        t_connected = r.t_connected
        t_response = r.t_response
        if req is None or not t_response or not t_connected:
            return record_line(r, stamp)
        host = req.host
        if host is None:
            return record_line(r, stamp)
        target = req.target
        agent, referer = _agent_referer(req)
        # The method is a token and a request id valid or made here: plain; the rest is checked.
        wire = target + host if agent is None and referer is None else b"".join(
            (target, host, agent or b"", referer or b""))
        if wire.translate(_CLEAN) is not wire:
            return record_line(r, stamp)
        client = clients.get(r.client) or new_client(r.client)
        failed = r.failed
        key = (r.be, r.pool_ref, r.route_ref, failed.retries if failed is not None else 0, r.end)
        rid = r.request_id
        t_start = r.t_start
        t_done = r.t_done
        return _JSON_LINES[2 * (agent is None) + 4 * (rid is None) + 8 * (referer is None)] % (
            stamp, client, req.method, _PROTOCOL_OF_MINOR[req.minor], host, agent or b"", target,
            _DEC[r.status], r.bytes_in, r.bytes_out,
            (t_done - t_start) * 1000.0 if t_done > t_start else 0.0,
            (t_connected - t_start) * 1000.0, (t_response - t_connected) * 1000.0,
            outcomes.get(key) or new_exchange_outcome(key), rid or b"", referer or b"",
        )

    return line


# ---------------------------------------------------------------------------------------------- fork
# Sinks and id generators inherited across os.fork() are reset in the child: the writer thread did not
# survive the fork, locks it held may be stuck, the parent's buffered lines are the parent's to write,
# and the child must not repeat the parent's request ids. One hook for all, installed on first use.
_FORK_AWARE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_fork_hook_installed = False


def _after_fork_in_child() -> None:
    for obj in list(_FORK_AWARE):
        obj._after_fork()


def _track_fork(obj: Any) -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True
    _FORK_AWARE.add(obj)


# ---------------------------------------------------------------------------------------------- the sink
class LogSink:
    """One access log destination: ``"stderr"``, ``"stdout"`` or a file path (opened for appending).

    The loop thread calls :meth:`write`, :meth:`reopen`, :meth:`flush` and :meth:`close`; one writer
    thread does every os.write. Lines are appended to one bytearray, which only the loop thread
    appends to and only the writer takes from (a copy of its front, then ``del`` of that front: each one
    C call under the GIL, so a line appended meanwhile stays behind, whole). ``write`` therefore takes
    no lock and costs an append; the writer's work is per batch, never per line. A lock orders the
    writer's takes with flush() and reopen(), which need a position in the stream.
    """

    __slots__ = ("target", "max_buffer", "path", "_fd", "_batch_limit", "_limit", "_closed", "_failing",
                 "_buf", "_lock", "_taken", "_done", "_inflight", "_reopens", "_dropped_full", "_dropped_io",
                 "_thread", "_idle", "_wake", "_drained", "_flushing", "__weakref__")

    def __init__(self, target: str, max_buffer: int = MAX_BUFFER_BYTES) -> None:
        self.target = target
        self.max_buffer = max_buffer
        self._limit = max_buffer  # -1 once closed: every write is then dropped
        self.path: Optional[str] = None  # the file, for reopen(); None for stderr/stdout
        if target == "stderr":
            self._fd = 2
        elif target == "stdout":
            self._fd = 1
        else:
            self.path = target
            self._fd = self._open()  # at start-up (or reload), so that an unwritable file is an error then
        self._batch_limit = self._batch_size(self._fd)
        self._closed = False
        self._failing: Optional[str] = None  # the error of a streak of failed writes (logged once)
        self._reset()
        _track_fork(self)

    def _reset(self) -> None:
        self._buf = bytearray()  # lines not yet taken by the writer
        self._lock = threading.Lock()
        # Positions in the stream of bytes ever written to the buffer (under _lock): taken by the writer,
        # and done (written, or dropped on an error); reopen() marks where the file changes.
        self._taken = 0
        self._done = 0
        self._inflight = 0  # bytes of the batch being written (the writer's)
        self._reopens: Deque[int] = collections.deque()
        self._dropped_full = 0  # the loop thread's
        self._dropped_io = 0    # the writer's
        self._thread: Optional[threading.Thread] = None
        self._idle = True     # the writer waits (or is not started): write() must wake it
        self._wake = threading.Event()
        self._drained = threading.Event()
        self._flushing = False  # flush() waits: the writer sets _drained when it has nothing left

    def _after_fork(self) -> None:
        self._reset()

    @property
    def dropped(self) -> int:
        """Lines lost: the buffer was full, or the destination failed (``balrs_log_dropped_total``)."""
        return self._dropped_full + self._dropped_io

    @property
    def buffered(self) -> int:
        """Bytes waiting to be written (the batch being written included)."""
        return len(self._buf) + self._inflight

    def write(self, line: bytes) -> None:
        """Queue one line (with its b"\\n"); drop it when the buffer is full. Never blocks."""
        buf = self._buf
        if len(buf) + len(line) + self._inflight > self._limit:  # max_buffer holds the batch being written too
            self._dropped_full += 1
            return
        buf += line
        if self._idle:
            self._idle = False
            self._kick()

    def reopen(self) -> None:
        """Open the file again by its path (SIGUSR1 after logrotate renamed it). The writer does it when
        it reaches this point of the buffer: lines queued before go to the old file, later ones to the new."""
        if self.path is None or self._closed:
            return
        with self._lock:
            self._reopens.append(self._taken + len(self._buf))
        if self._idle:
            self._idle = False
            self._kick()

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` seconds until every line queued so far is written (or dropped).
        Returns whether that happened."""
        with self._lock:
            target = self._taken + len(self._buf)
        deadline = time.monotonic() + timeout
        try:
            while self._done < target:
                remaining = deadline - time.monotonic()
                thread = self._thread
                if remaining <= 0 or thread is None or not thread.is_alive():
                    return self._done >= target
                self._drained.clear()
                self._flushing = True
                if self._done >= target:
                    break
                self._kick()
                self._drained.wait(min(remaining, WRITER_GATHER))
        finally:
            self._flushing = False
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Take no more lines; the writer writes what is buffered, closes the file and ends. Waits up
        to ``timeout`` seconds for that (0: not at all, for a reload on the loop thread)."""
        if self._closed:
            return
        self._closed = True
        self._limit = -1
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._close_fd()
            return
        self._kick()
        if timeout > 0:
            thread.join(timeout)

    # ---- loop side ----
    def _kick(self) -> None:
        if self._thread is not None:
            self._wake.set()
            return
        thread = threading.Thread(target=self._run, name="balrs-accesslog", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had (a process limit): try again on a later line
            self._idle = True
            log.error("access log %s: cannot start its writer thread: %s", self.target, exc)
            return
        self._thread = thread

    # ---- writer thread ----
    def _run(self) -> None:
        buf = self._buf
        reopens = self._reopens
        wake = self._wake
        while True:
            if buf or reopens:
                self._write_batch()
                continue
            if self._flushing:
                self._drained.set()
            if self._closed:
                break
            # Let lines gather before going idle: under traffic the writer then takes one batch per
            # WRITER_GATHER and the loop never has to wake it (an Event.set per line would cost more
            # than formatting the line).
            time.sleep(WRITER_GATHER)
            if buf or reopens:
                continue
            wake.clear()
            self._idle = True
            # write() may have appended after the check above and seen the writer busy: look again.
            if buf or reopens or self._closed or self._flushing:
                self._idle = False
                continue
            wake.wait(WRITER_IDLE_WAIT)
            self._idle = False
        self._close_fd()

    def _take(self) -> bytes:
        """The next batch from the front of the buffer: whole lines, at most _batch_limit bytes (a longer
        line alone), and never past a reopen; a reopen that is due is done first (outside the lock:
        closing the old file may take a while, and the loop thread's reopen() and flush() take it)."""
        buf = self._buf
        while True:
            with self._lock:
                reopens = self._reopens
                due = bool(reopens) and reopens[0] <= self._taken
                if due:
                    reopens.popleft()
                else:
                    end = len(buf)
                    if reopens:
                        end = min(end, reopens[0] - self._taken)
                    limit = self._batch_limit
                    if end > limit:
                        cut = buf.rfind(b"\n", 0, limit) + 1
                        end = cut or buf.find(b"\n", 0, end) + 1 or end
                    data = bytes(buf[:end])  # a copy, then the front goes: no view of buf is ever held
                    del buf[:end]
                    self._taken += end
                    self._inflight = end
                    return data
            self._do_reopen()

    def _write_batch(self) -> None:
        data = self._take()
        size = len(data)
        done = 0
        try:
            while done < size:
                try:
                    n = os.write(self._fd, data[done:] if done else data)
                except BlockingIOError:
                    # a non-blocking pipe or terminal: wait for room (off the loop), then give up
                    if not _writable(self._fd, WRITE_READY_WAIT):
                        raise OSError(errno.EAGAIN, "not writable for %gs" % WRITE_READY_WAIT) from None
                    continue
                except InterruptedError:
                    continue
                if n <= 0:
                    raise OSError(errno.EIO, "write returned %d" % n)
                done += n
        except (OSError, ValueError) as exc:
            # ENOSPC, EBADF, EPIPE, EIO...: the lines not wholly written are lost, and counted.
            self._dropped_io += _lines_not_written(data, done)
            if self._failing is None:
                self._failing = getattr(exc, "strerror", None) or str(exc)
                log.warning("access log %s: %s; dropping lines until it works again", self.target, self._failing)
        else:
            if self._failing is not None:
                self._failing = None
                log.info("access log %s: writing again (%d lines dropped so far)", self.target, self.dropped)
        self._inflight = 0
        self._done += size

    def _do_reopen(self) -> None:
        try:
            fd = self._open()
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s; still writing to the old file", self.path,
                      exc.strerror or exc)
            return
        old, self._fd = self._fd, fd
        self._batch_limit = self._batch_size(fd)
        os.close(old)

    def _open(self) -> int:
        assert self.path is not None
        # O_NONBLOCK for the open only: a FIFO nobody reads fails at once (ENXIO) instead of hanging
        # the loop; writes then block as usual, on the writer thread.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        os.set_blocking(fd, True)
        return fd

    def _close_fd(self) -> None:
        if self.path is not None and self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass

    @staticmethod
    def _batch_size(fd: int) -> int:
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        return WRITE_BATCH_BYTES if regular else PIPE_BATCH_BYTES


def _writable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` takes more bytes (poll(2): unlike select, any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000.0))


def _lines_not_written(data: bytes, done: int) -> int:
    """How many lines of the batch ``data`` did not get out whole when ``done`` bytes were written (a
    line ends with its b"\\n"; an unterminated tail counts as one)."""
    rest = data[data.rfind(b"\n", 0, done) + 1:]
    return rest.count(b"\n") + (1 if rest and not rest.endswith(b"\n") else 0)


# ---------------------------------------------------------------------------------------------- event log
class RateLimitFilter(logging.Filter):
    """Lets each message through at most ``per_second`` times a second after a ``burst``; the first
    one let through after some were held back says how many (`` (N similar messages suppressed)``).

    A message is its template (``record.msg``, before the arguments are put in) and its level, so
    "backend %s refused" is one message whatever the backend. Token bucket per message; the
    ``max_keys`` most recently seen messages are tracked (a message forgotten starts a new burst).
    """

    def __init__(self, per_second: float = 1.0, burst: int = 10, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = RATE_LIMIT_KEYS) -> None:
        super().__init__()
        if per_second < 0 or burst < 1 or max_keys < 1:
            raise ValueError("RateLimitFilter needs per_second >= 0, burst >= 1 and max_keys >= 1")
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        # key -> [tokens, last refill time, suppressed since the last one let through]
        self._buckets: "collections.OrderedDict[Tuple[str, int], List[float]]" = collections.OrderedDict()
        self._lock = threading.Lock()  # the resolver and access-log threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        key = (msg if isinstance(msg, str) else repr(msg), record.levelno)
        now = self.clock()
        with self._lock:
            buckets = self._buckets
            bucket = buckets.get(key)
            if bucket is None:
                if len(buckets) >= self.max_keys:
                    buckets.popitem(last=False)
                bucket = buckets[key] = [float(self.burst), now, 0]
            else:
                buckets.move_to_end(key)
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.per_second)
                bucket[1] = now
            if bucket[0] < 1.0:
                bucket[2] += 1
                return False
            bucket[0] -= 1.0
            suppressed = int(bucket[2])
            bucket[2] = 0
        if suppressed:
            # A new template: % in the suffix is literal text (no % in it), and the args still apply.
            record.msg = "%s (%d similar messages suppressed)" % (msg, suppressed)
        return True


# ---------------------------------------------------------------------------------------------- request ids
def valid_request_id(value: bytes) -> bool:
    """A request id a client may choose: 1-128 of ``A-Z a-z 0-9 . _ : -``."""
    return 0 < len(value) <= REQUEST_ID_MAX and value.translate(_REQUEST_ID_TABLE) == value


class RequestIds:
    """New request ids, unique per process: a random 64-bit prefix (hex) made at construction, and
    after a fork in the child, then ``-`` and a counter in hex: ``3f9a1c2e7b0d4e51-1a``."""

    def __init__(self) -> None:
        self._seed()
        _track_fork(self)

    def _seed(self) -> None:
        self._prefix = os.urandom(REQUEST_ID_PREFIX_BYTES).hex().encode("ascii") + b"-"
        self._count = itertools.count(1)

    def _after_fork(self) -> None:
        self._seed()

    def next(self) -> bytes:
        return b"%s%x" % (self._prefix, next(self._count))
