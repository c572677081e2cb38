"""The admin endpoint: ``/metrics`` (Prometheus text) and ``/status`` (JSON), served by the same reactor.

It has sockets of its own and never touches a client or upstream connection, so it stays off the
proxy's path. What it reports comes from a *snapshot source*: ``metrics.snapshot`` of the balancer it
runs beside, or, under a supervisor with ``workers = N``, the merge of every worker's snapshot, which
arrives later (the connection waits for it without blocking the loop).

Each admin connection answers one request and closes (``Connection: close``): a scrape every few
seconds gains nothing from keep-alive, and one request per connection keeps the state machine to four
steps: read the head, wait for the snapshot, write the answer, linger. Memory is bounded (at most
``ADMIN_MAX_CONNECTIONS`` connections, each holding at most one head of ``ADMIN_HEAD_LIMIT`` bytes and
one response) and so is time (every step has a deadline), so a stuck or hostile admin client costs a
socket for a few seconds and nothing else.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .adminapi import ADMIN_BODY_LIMIT, Writer, check_auth, describe, is_api_path, parse_write
from .config import DEFAULT_ADMIN_WRITE_FROM
from .dashboard import DASHBOARD
from .edge import Trusted
from .listener import Listener
from .http.build import REASONS
from .http.errors import ProtocolError
from .http.heads import CHUNKED, LENGTH, HeadBuffer, RequestHead, parse_request_head
from .metrics import CONTENT_TYPE, STATUS_CONTENT_TYPE, Snapshot, json_body, metrics_text, status_of
from .reactor import Reactor
from .transport import Protocol, Transport

if TYPE_CHECKING:
    from .config import Address

__all__ = ["AdminServer", "SnapshotSource", "ADMIN_HEAD_LIMIT", "ADMIN_REQUEST_TIMEOUT", "ADMIN_MAX_CONNECTIONS"]

# source(deliver): calls deliver(snapshot) now or later on the same loop, once; deliver(None) means no
# data (no worker answered), answered 503.
SnapshotSource = Callable[[Callable[[Optional[Snapshot]], None]], None]

log = logging.getLogger("balrs")

# ---- limits (STYLE habit 4) -----------------------------------------------------------------------
# The largest request head accepted (nginx's large_client_header_buffers are 8 KiB each): admin requests
# are a request line and a few fields; past it the answer is 431 (414 for an over-long request line).
ADMIN_HEAD_LIMIT = 8192
# Bytes read per recv().
ADMIN_RECV_SIZE = 4096
# A complete request head must arrive within this of the accept (nginx client_header_timeout is 60s;
# a scraper sends its request at once, so a short bound only ever closes idle or slowloris sockets).
ADMIN_REQUEST_TIMEOUT = 5.0
# The client must take some of the response within this (nginx send_timeout, between two writes); the
# snapshot source must deliver within it too (the supervisor's gives up on its workers after 0.5 s),
# else the answer is 503.
ADMIN_SEND_TIMEOUT = 5.0
# After the response, what the client still sends is read and dropped for this long (at most
# ADMIN_LINGER_MAX_BYTES), so that closing does not reset the connection before the client read the
# answer (nginx lingering_close; lingering_timeout 5s there).
ADMIN_LINGER = 1.0
ADMIN_LINGER_MAX_BYTES = 65536
# Admin connections open at once; above it new ones wait in the listen backlog (Prometheus scrapes one
# connection at a time; dashboards keep one keep-alive connection each).
ADMIN_MAX_CONNECTIONS = 128
# Keep-alive: requests answered on one connection at most, and how long it may stay idle between them
# (a dashboard polls every second; nginx's keepalive_requests is 1000, keepalive_timeout 75 s).
ADMIN_MAX_REQUESTS = 1000
ADMIN_KEEPALIVE_TIMEOUT = 15.0
# How old a /status or /metrics answer may be when served again to a request on a kept-alive connection
# (a /status costs some 7 proxied requests to build; a dashboard polls every second).
ADMIN_CACHE_TTL = 0.1
# Accepts per readiness event (the balancer's loop bound, smaller: this is not the hot path).
ADMIN_ACCEPT_BATCH = 16
# After EMFILE/ENFILE, stop accepting admin connections this long (like the balancer's listeners).
ADMIN_ACCEPT_BACKOFF = 0.5

ALLOW = b"GET, HEAD"

# The first AdminServer's creation time in this process (filled on first use, not at import).
_FIRST_START: List[float] = []

# Connection states: read the request head, wait for the snapshot, write the response, drain what the
# client still sends.
_READ = 0
_WAIT = 1
_WRITE = 2
_LINGER = 3
_CLOSED = 4
_BODY = 5  # a write request's body (Content-Length, at most ADMIN_BODY_LIMIT)


def build_response(status: int, content_type: bytes, body: bytes, head_only: bool = False,
                   extra: bytes = b"") -> bytes:
    """A complete ``Connection: close`` response; ``extra`` is more header lines (each ending CRLF)."""
    reason = REASONS.get(status, b"Error")
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
            b"%sConnection: close\r\n\r\n" % (status, reason, content_type, len(body), extra))
    return head if head_only else head + body


def _error(status: int, head_only: bool = False, extra: bytes = b"") -> bytes:
    body = b"%d %s\n" % (status, REASONS.get(status, b"Error"))
    return build_response(status, b"text/plain; charset=utf-8", body, head_only, extra)


_DASHBOARD_RESPONSES: Dict[Tuple[bool, bool], bytes] = {}


def _dashboard(head_only: bool, keep: bool) -> bytes:
    """The dashboard's complete response (built once per variant: it is 12 KiB of static bytes)."""
    data = _DASHBOARD_RESPONSES.get((head_only, keep))
    if data is None:
        data = build_response(200, b"text/html; charset=utf-8", DASHBOARD, head_only,
                              b"Content-Security-Policy: default-src 'self'; style-src 'unsafe-inline'; "
                              b"script-src 'unsafe-inline'; img-src 'self' data:\r\n")
        if keep:
            data = _kept_alive(data)
        _DASHBOARD_RESPONSES[(head_only, keep)] = data
    return data


def _kept_alive(data: bytes) -> bytes:
    """A ``Connection: close`` response (what every builder here makes) without that field."""
    i = data.find(b"Connection: close\r\n", 0, data.find(b"\r\n\r\n") + 2)
    return data if i < 0 else data[:i] + data[i + 19:]


def _json(status: int, doc: Dict[str, Any], extra: bytes = b"") -> bytes:
    return build_response(status, b"application/json", json.dumps(doc, sort_keys=True).encode("utf-8") + b"\n",
                          False, extra)


def request_path(target: bytes) -> Optional[bytes]:
    """The path of a request target without its query (origin or absolute form), or None for the
    authority and asterisk forms (RFC 9112 §3.2), which name no resource here."""
    if not target.startswith(b"/"):
        scheme_end = target.find(b"://")
        if scheme_end <= 0:
            return None
        slash = target.find(b"/", scheme_end + 3)
        if slash < 0:
            return b"/"
        target = target[slash:]
    end = len(target)
    for sep in (b"?", b"#"):
        i = target.find(sep)
        if 0 <= i < end:
            end = i
    return target[:end]


class AdminServer:
    """Serves the admin endpoint on ``listen`` (the ``[admin] listen`` addresses) on ``reactor``,
    reporting the snapshots ``source`` delivers."""

    def __init__(self, reactor: Reactor, listen: Sequence[Address], source: SnapshotSource,
                 reuse_port: bool = False, writer: Optional[Writer] = None, token: str = "",
                 write_from: Sequence[str] = DEFAULT_ADMIN_WRITE_FROM, explainer: Optional[Writer] = None) -> None:
        self.reactor = reactor
        self.listen = tuple(listen)
        self.source = source
        # The write API (adminapi.py): how an action is applied, and the bearer token ("" = writes 403).
        self.writer = writer
        self.token = token
        self.write_from = Trusted(write_from)  # who may write at all ([admin] write_from)
        # GET /api/explain (read-only, like /status): {"op": "explain", "query": ...} -> its answer.
        self.explainer = explainer
        # path -> (when rendered, the complete 200 response) for pollers on kept-alive connections.
        self._cache: Dict[bytes, Tuple[float, bytes]] = {}
        self.conns: Dict[_AdminConn, None] = {}
        self.listener = Listener(reactor, "admin accept", self._new_conn, ADMIN_ACCEPT_BATCH,
                                 ADMIN_ACCEPT_BACKOFF, reuse_port,
                                 lambda: len(self.conns) < ADMIN_MAX_CONNECTIONS)
        self.started = False
        # When this process started serving (Unix time), reported as balrs_start_time_seconds; kept
        # across reloads, which make a new AdminServer when [admin] changes.
        if not _FIRST_START:
            _FIRST_START.append(time.time())
        self.start_time = _FIRST_START[0]

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def listeners(self) -> List[Tuple[socket.socket, Address]]:
        return self.listener.sockets

    @property
    def accepting(self) -> bool:
        return self.listener.accepting

    def start(self) -> None:
        """Bind the listen addresses and serve. Raises OSError naming the address if one cannot be bound."""
        if self.started:
            return
        self.listener.bind(self.listen)
        self.started = True
        self.listener.resume()
        log.info("admin endpoint on %s (/metrics, /status)", ", ".join(self.listener.bound()))

    def rebind(self, listen: Sequence[Address]) -> None:
        """Serve on ``listen`` from now on (a reload changed ``[admin] listen``). Addresses already
        served keep their sockets, new ones are bound first, so an OSError (naming the address) changes
        nothing; removed ones are closed. Admin connections in progress are not touched."""
        before = self.listener.addresses
        self.listener.bind(listen)
        self.listen = tuple(listen)
        self.started = True
        self.listener.resume()
        if self.listener.addresses != before:
            log.info("admin endpoint now on %s", ", ".join(str(a) for a in self.listener.addresses) or "nothing")

    def stop(self) -> None:
        """Close the listeners and any admin connections (idempotent)."""
        self.listener.close()
        for conn in list(self.conns):
            conn.close()
        self.started = False

    def close_inherited(self) -> None:
        """In a forked child: close our sockets without touching the reactor (the parent's)."""
        for sock, _addr in self.listener.sockets:
            sock.close()
        for conn in self.conns:
            conn.sock.close()

    def _new_conn(self, sock: socket.socket, peer: object, _addr: object) -> bool:
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        who = "%s:%s" % (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        conn = _AdminConn(self, sock, who, ip)
        self.conns[conn] = None
        return len(self.conns) < ADMIN_MAX_CONNECTIONS

    def conn_closed(self, conn: _AdminConn) -> None:
        self.conns.pop(conn, None)
        if self.started and not self.listener.accepting:
            self.listener.resume()

    # ---- answering ------------------------------------------------------------------------------
    def handle(self, conn: _AdminConn, req: RequestHead, body: bytes = b"") -> None:
        """Answer one request on ``conn`` (now, or when the snapshot source or the writer delivers)."""
        head_only = req.method == b"HEAD"
        path = request_path(req.target)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("admin: %s %s", req.method.decode("ascii", "replace"),
                      req.target[:200].decode("ascii", "replace"))
        if path == b"/api/explain":
            self._explain(conn, req)
        elif path is not None and is_api_path(path):
            self._write(conn, req, path, body)
        elif path not in (b"/", b"/metrics", b"/status"):
            conn.respond(_error(404, head_only))
        elif req.method not in (b"GET", b"HEAD"):
            conn.respond(_error(405, extra=b"Allow: %s\r\n" % ALLOW))
        elif path == b"/":
            conn.respond(_dashboard(head_only, conn.keep))
        else:
            if conn.served > 1 and not head_only:
                # A poller on a kept-alive connection (a dashboard, a scraper) may get an answer up to
                # ADMIN_CACHE_TTL old: fifty dashboards polling cost one snapshot per TTL, not fifty.
                # A request on a new connection, and every answer after a write, is fresh.
                hit = self._cache.get(path)
                if hit is not None and self.reactor.now - hit[0] < ADMIN_CACHE_TTL:
                    conn.respond(hit[1])
                    return
            try:
                self.source(lambda snap: conn.respond(self._rendered(path, snap, head_only)))
            except Exception as exc:  # a bug in a snapshot must cost one answer, not the loop or a traceback
                log.error("admin: cannot answer %s: %s: %s", path.decode("ascii", "replace"),
                          type(exc).__name__, exc)
                conn.respond(_error(500, head_only))

    def _explain(self, conn: _AdminConn, req: RequestHead) -> None:
        """``GET /api/explain?method=GET&target=/path&host=...``: explain.py inside the balancer."""
        if req.method != b"GET":
            conn.respond(_json(405, {"error": "GET /api/explain?target=/path&host=H"}, b"Allow: GET\r\n"))
            return
        explainer = self.explainer
        if explainer is None:
            conn.respond(_json(503, {"error": "explain is not available here"}))
            return
        q = req.target.find(b"?")
        query = req.target[q + 1:].decode("latin-1") if q >= 0 else ""
        try:
            explainer({"op": "explain", "query": query}, lambda status, doc: conn.respond(_json(status, doc)))
        except Exception as exc:  # a bug in explain must cost one answer, not the loop
            log.exception("admin: cannot explain %s", query[:200])
            conn.respond(_json(500, {"error": "%s: %s" % (type(exc).__name__, exc)}))

    def _write(self, conn: _AdminConn, req: RequestHead, path: bytes, body: bytes) -> None:
        """A write API request: authenticate, parse, apply (adminapi.py), answer JSON."""
        who = conn.peer
        if conn.peer_ip not in self.write_from:
            log.warning("admin: %s %s from %s refused: not in [admin] write_from",
                        req.method.decode("ascii", "replace"), path[:200].decode("ascii", "replace"), who)
            conn.respond(_json(403, {"error": "writes are not accepted from %s ([admin] write_from)" % conn.peer_ip}))
            return
        denied = check_auth(self.token, req.header(b"authorization"))
        if denied:
            log.warning("admin: %s %s from %s refused (%s)", req.method.decode("ascii", "replace"),
                        path[:200].decode("ascii", "replace"), who,
                        "no token configured" if not self.token else
                        "no bearer token" if denied == 401 else "wrong token")
            message = ("writes are disabled: set [admin] token_file" if not self.token else
                       "an Authorization: Bearer token is required" if denied == 401 else "wrong token")
            conn.respond(_json(denied, {"error": message},
                               b'WWW-Authenticate: Bearer realm="balrs"\r\n' if denied == 401 else b""))
            return
        parsed = parse_write(req.method, path, body)
        if isinstance(parsed, tuple):
            status, doc = parsed
            allow = doc.pop("allow", None)
            conn.respond(_json(status, doc, b"Allow: %s\r\n" % allow.encode("ascii") if allow else b""))
            return
        action = parsed
        writer = self.writer
        if writer is None:
            conn.respond(_json(503, {"error": "writes are not available here"}))
            return

        def done(status: int, doc: Dict[str, Any]) -> None:
            self._cache.clear()  # what a poller sees next includes the change
            if status < 300:
                log.warning("admin: %s by %s: %s", describe(action), who, json.dumps(doc, sort_keys=True))
            else:
                log.info("admin: %s by %s failed: %d %s", describe(action), who, status, doc.get("error", ""))
            conn.respond(_json(status, doc))

        try:
            writer(action, done)
        except Exception as exc:  # a bug in a write must cost one answer, not the loop
            log.exception("admin: cannot apply %s", describe(action))
            conn.respond(_json(500, {"error": "%s: %s" % (type(exc).__name__, exc)}))

    def _rendered(self, path: bytes, snap: Optional[Snapshot], head_only: bool) -> bytes:
        data = self.render(path, snap, head_only)
        if snap is not None and not head_only and data.startswith(b"HTTP/1.1 200 "):
            self._cache[path] = (self.reactor.now, data)
        return data

    def render(self, path: bytes, snap: Optional[Snapshot], head_only: bool = False) -> bytes:
        """The complete response for ``path`` (/metrics or /status) from ``snap``."""
        if snap is None:
            log.warning("admin: no snapshot to answer %s with", path.decode("ascii", "replace"))
            return _error(503, head_only)
        try:
            if path == b"/metrics":
                body = metrics_text(snap).encode("utf-8")
                ctype = CONTENT_TYPE.encode("ascii")
            else:
                body = json_body(status_of(snap))
                ctype = STATUS_CONTENT_TYPE.encode("ascii")
        except Exception as exc:  # a bug in rendering must cost one answer, not the loop or a traceback
            log.error("admin: cannot answer %s: %s: %s", path.decode("ascii", "replace"),
                      type(exc).__name__, exc)
            return _error(500, head_only)
        return build_response(200, ctype, body, head_only)


class _AdminConn(Protocol):
    """One admin connection, a protocol on its :class:`~balrs.transport.Transport`: read a request
    head, write one response, linger, close."""

    __slots__ = ("admin", "reactor", "tr", "state", "head", "deadline", "discarded", "peer", "req", "body",
                 "body_left", "keep", "served", "pending", "eof", "peer_ip")

    def __init__(self, admin: AdminServer, sock: socket.socket, peer: str = "?", peer_ip: str = "") -> None:
        self.admin = admin
        self.reactor = admin.reactor
        self.state = _READ
        self.head = HeadBuffer(ADMIN_HEAD_LIMIT)
        self.discarded = 0
        self.deadline = 0.0
        self.peer = peer  # who: the client's address, for the log of every write
        self.peer_ip = peer_ip
        self.req: Optional[RequestHead] = None
        self.body = bytearray()
        self.body_left = 0
        # Keep-alive (HTTP/1.1, RFC 9112 §9.3): whether the answer being written leaves the connection
        # open, how many were answered, and what arrived after the request (a pipelined next one).
        self.keep = False
        self.served = 0
        self.pending = b""
        self.eof = False  # the client half-closed while its answer was owed
        self.tr = Transport(self.reactor, sock, self, ADMIN_RECV_SIZE)
        self._set_deadline(self.reactor.now + ADMIN_REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return "<AdminConn fd=%d state=%d>" % (self.tr.fd, self.state)

    @property
    def sock(self) -> socket.socket:
        return self.tr.sock

    # ---- timer ----
    def _set_deadline(self, when: float) -> None:
        """Move the deadline; the transport's timer is only moved when it would fire too late (a later
        deadline is picked up when the earlier timer fires: lazy re-arm, STYLE habit 10)."""
        self.deadline = when
        if when < self.tr.timer_when:
            self.tr.arm(when)

    def timer_fired(self) -> None:
        state = self.state
        if state == _CLOSED:
            return
        deadline = self.deadline
        if state == _WRITE:
            # The client is reading: the send timeout counts from the last time it took bytes.
            deadline = max(deadline, self.tr.last_write + ADMIN_SEND_TIMEOUT)
        if self.reactor.now < deadline:
            self.tr.arm(deadline)
            return
        if state == _READ and len(self.head):
            # Part of a head arrived but not the rest (slowloris): say so, like the balancer does.
            self.respond(_error(408))
        elif state == _WAIT:
            log.warning("admin: the snapshot did not arrive within %gs", ADMIN_SEND_TIMEOUT)
            self.respond(_error(503))
        else:
            self.close()

    # ---- transport events ----
    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _READ:
            self._head_data(data)
        elif state == _BODY:
            self._body_data(data)
        elif state == _WAIT or state == _WRITE:
            # The next request (pipelined) while this one is answered: kept for when it is done. Past
            # a head's worth, reading stops until then (the rest waits in the kernel).
            self.pending += data
            if len(self.pending) > ADMIN_HEAD_LIMIT + ADMIN_BODY_LIMIT:
                self.tr.pause_reading()
        elif state == _LINGER:
            self.discarded += len(data)
            if self.discarded > ADMIN_LINGER_MAX_BYTES:
                self.close()

    def eof_received(self, reset: bool) -> None:
        if (self.state == _WAIT or self.state == _WRITE) and not reset:
            # The client finished sending (a half-close after its request): answer, then close.
            self.keep = False
            self.eof = True
            self.tr.pause_reading()
            return
        # Reading a head or a body, or lingering: either way, done.
        self.close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        log.debug("admin connection: %s", exc)
        self.close()

    def write_drained(self) -> None:
        if self.state == _WRITE:
            self._done()

    def internal_error(self) -> None:
        log.exception("admin: internal error on a connection")
        self.close()

    # ---- the request ----
    def _head_data(self, data: bytes) -> None:
        try:
            head = self.head.feed(data)
            if head is None:
                return
            req = parse_request_head(head)
        except ProtocolError as exc:
            log.debug("admin: bad request: %s", exc)
            self.respond(_error(exc.status))
            return
        # What followed the head (the start of its body, or the next request) moves out of the head
        # buffer, which is then empty and reused for the next request on this connection.
        buf = self.head.buf
        rest = bytes(buf)
        del buf[:]
        if req.framing == CHUNKED:
            self.respond(_error(411))  # a write body is small: Content-Length, please (RFC 9110 §15.5.12)
            return
        if req.framing == LENGTH and req.length:
            if req.length > ADMIN_BODY_LIMIT:
                self.respond(_error(413))
                return
            self.state = _BODY
            self.req = req
            self.body_left = req.length
            if rest:
                self._body_data(rest)
            return
        self.pending = rest
        self._ready(req, b"")

    def _body_data(self, data: bytes) -> None:
        take = data[:self.body_left]
        self.body += take
        self.body_left -= len(take)
        if self.body_left == 0 and self.req is not None:
            self.pending = data[len(take):]
            body = bytes(self.body)
            self.body.clear()
            self._ready(self.req, body)

    def _ready(self, req: RequestHead, body: bytes) -> None:
        self.served += 1
        self.keep = (req.keep_alive and self.served < ADMIN_MAX_REQUESTS and self.admin.started
                     and len(self.pending) <= ADMIN_HEAD_LIMIT)
        # Reading goes on (no epoll change per request): what arrives meanwhile waits in ``pending``.
        self.state = _WAIT
        self._set_deadline(self.reactor.now + ADMIN_SEND_TIMEOUT)
        self.admin.handle(self, req, body)

    def respond(self, data: bytes) -> None:
        """Send ``data`` (a ``Connection: close`` response), then close after lingering, or, when the
        request allows keep-alive, drop that field and wait for the next request. Ignored unless the
        answer is still owed (the connection may have closed while it waited for a snapshot)."""
        if self.state not in (_READ, _WAIT, _BODY):
            return
        if self.state != _WAIT:
            self.keep = False  # answered before a request was whole: its framing is unknown
        if self.keep:
            data = _kept_alive(data)
        self.state = _WRITE
        tr = self.tr
        if not self.keep:
            # Only the write side matters now; what the client sends meanwhile waits in the kernel.
            tr.pause_reading()
        self._set_deadline(self.reactor.now + ADMIN_SEND_TIMEOUT)
        tr.write(data)
        if tr.broken:
            return  # connection_lost follows from the loop
        if not tr.queued:
            self._done()
        # else write_drained() goes on once the client took the rest

    def _done(self) -> None:
        """The answer is out: the next request, or linger and close."""
        if self.eof:
            self.close()
            return
        if not self.keep or not self.admin.started:
            self._linger()
            return
        self.state = _READ
        self.req = None
        self._set_deadline(self.reactor.now + ADMIN_KEEPALIVE_TIMEOUT)
        self.tr.resume_reading()
        pending, self.pending = self.pending, b""
        if pending:
            self._head_data(pending)

    def _linger(self) -> None:
        """All sent: send our FIN and read (and drop) what still arrives until the client closes."""
        self.state = _LINGER
        tr = self.tr
        tr.shutdown_write()
        tr.resume_reading()
        self._set_deadline(self.reactor.now + ADMIN_LINGER)

    def close(self) -> None:
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        self.tr.close()
        self.admin.conn_closed(self)
