"""The client side: one client connection, as a protocol on a :class:`~balrs.transport.Transport`.

It reads and parses requests (``http.heads``), makes an :class:`~balrs.proxy.exchange.Exchange` for
each, asks the pool for a backend, and hands the upstream head and body to an ``UpstreamConn`` (reused
from the backend's idle pool, or newly connecting); the upstream side writes the response back through
the :class:`~balrs.proxy.exchange.Downstream` methods below. Responses go out in request order: a
pipelined request waits in the input buffer until the one before it is answered.

One state variable, changed only through ``_to`` and the ``_CLIENT_NEXT`` table. One timer (the
transport's), re-armed lazily: the state machine only stores timestamps (``idle_since``,
``head_start``, ``last_read``, ``queued_at``) and the timer, when it fires, works out whether the
deadline of the current state has really passed (Netty's IdleStateHandler).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Deque, FrozenSet, List, Optional, Tuple, Union

from ..accesslog import valid_request_id
from ..edge import Peer, forwarded_element, proxy_header, real_client
from ..http.build import (
    XF_APPEND, XF_KEEP, XF_REPLACE, client_response_head, edit_head, error_response, forwarded_suffix,
    upstream_request_head,
)
from ..http.chunked import ChunkedDecoder
from ..http.errors import ProtocolError
from ..http.framing import BodyRelay, client_framing
from ..http.heads import CHUNKED, LENGTH, NO_BODY, HeadBuffer, RequestHead, ResponseHead, parse_request_head
from ..http.paths import needs_normalising, normalise_target
from ..limits import RETRY_CONNECT, RETRY_EMPTY, RETRY_TIMEOUT, ClientConnections
from ..routing import ACT_POOL, ACT_REDIRECT, Route, match_host
from ..settings import CLIENT_RECV_SIZE, Settings
from ..transport import Chunk, Protocol
from .exchange import (
    END_BACKEND_ERROR, END_BACKEND_TIMEOUT, END_CLIENT_ABORT, END_CLIENT_TIMEOUT, END_INTERNAL, END_LIMITED,
    END_NO_BACKEND, END_NO_ROUTE, END_OK, END_QUEUE_TIMEOUT, END_REJECTED, END_SHUTDOWN, END_TUNNEL, F_CONNECT_REFUSED,
    F_CONNECT_TIMEOUT, F_EMPTY, F_INTERNAL, F_STALE, F_TIMEOUT, REPLAY_MAX, Attempts, Exchange, HeadEdit, ProxyContext,
)
from .upstream import UpstreamConn

if TYPE_CHECKING:
    import socket

    from ..pool import Backend, Pool, Ticket
    from ..sticky import Sticky

__all__ = ["ClientConn", "OverLimitClient", "upstream_head"]

log = logging.getLogger("balrs")

# How long a connection that balrs closed after an error keeps reading (and discarding) what the client
# still sends, so the kernel does not reset the connection before the client read the answer
# (nginx lingering_timeout 5s, lingering_time 30s), and how much it discards at most.
LINGER_TIMEOUT = 2.0
LINGER_MAX_BYTES = 1 << 20

# ---- states --------------------------------------------------------------------------------------
C_IDLE = 0      # no request in progress (new, or between keep-alive requests): client_timeout
C_HEAD = 1      # part of a request head has arrived: header_timeout from its first byte
C_QUEUED = 2    # request head complete, waiting for a backend slot (every one full): queue_timeout
C_BODY = 3      # request head sent upstream, its body still streaming from the client
C_WAIT = 4      # request complete, response outstanding (or streaming)
C_TUNNEL = 5    # after a 101: raw bytes both ways
C_FLUSH = 6     # deliver what is queued, then close (an abort that keeps a truncation visible)
C_LINGER = 7    # final bytes written (or being written); half-closed, discarding what still arrives
C_CLOSED = 8

_CLIENT_NEXT = {
    C_IDLE: frozenset([C_HEAD, C_QUEUED, C_BODY, C_WAIT, C_FLUSH, C_LINGER, C_CLOSED]),
    C_HEAD: frozenset([C_QUEUED, C_BODY, C_WAIT, C_FLUSH, C_LINGER, C_CLOSED]),
    C_QUEUED: frozenset([C_IDLE, C_BODY, C_WAIT, C_FLUSH, C_LINGER, C_CLOSED]),
    C_BODY: frozenset([C_QUEUED, C_WAIT, C_FLUSH, C_LINGER, C_CLOSED]),
    C_WAIT: frozenset([C_IDLE, C_QUEUED, C_TUNNEL, C_FLUSH, C_LINGER, C_CLOSED]),
    C_TUNNEL: frozenset([C_FLUSH, C_CLOSED]),
    C_FLUSH: frozenset([C_CLOSED]),
    C_LINGER: frozenset([C_FLUSH, C_CLOSED]),
    C_CLOSED: frozenset(),
}

# Transitions the hot path makes by assignment, from a source state it has just tested: each is
# checked against the table here, once, instead of on every request.
_HOT_TRANSITIONS = ((C_IDLE, C_WAIT), (C_HEAD, C_WAIT), (C_WAIT, C_IDLE))
for _a, _b in _HOT_TRANSITIONS:
    if _b not in _CLIENT_NEXT[_a]:
        raise AssertionError("client connection: no transition %d -> %d" % (_a, _b))


def upstream_head(settings: Settings, ex: Exchange, req: RequestHead, host_header: bytes, xf: int,
                  client_ip_b: bytes, suffix: bytes, proto: bytes) -> bytes:
    """The upstream head of a request with something to add or remove: a request id, a route's path
    rewrite or field edits, the edge's X-Forwarded-* policy or an RFC 7239 Forwarded element."""
    extra = b""
    remove: Optional[FrozenSet[bytes]] = None
    target: Optional[bytes] = None
    route = ex.route_ref
    routed = route is not None and (ex.fwd_target is not None or ex.edit is not None)
    if routed:
        assert route is not None
        extra = route.request_extra
        remove = route.request_remove or None
        target = ex.fwd_target
    rid = ex.request_id
    if rid is not None:
        sent = req.find_field(settings.request_id)
        if routed or sent != rid or req.low.count(b"\r\n%s:" % settings.request_id) != 1:
            # Ours is added (or the client's valid one again); every one the client sent is removed,
            # so the backend sees exactly one. (The client's valid id alone goes on as it came.)
            extra += b"%s: %s\r\n" % (settings.request_id_field, rid)
            if sent is not None or routed:
                remove = (remove or frozenset()).union((settings.request_id,))
    if xf == XF_REPLACE or settings.forwarded:
        incoming = req.header(b"forwarded") if b"\r\nforwarded:" in req.low else None
        if incoming is not None:
            remove = (remove or frozenset()).union((b"forwarded",))
        if settings.forwarded:
            ours = forwarded_element(client_ip_b, proto, req.host)
            extra += b"Forwarded: %s\r\n" % (
                ours if incoming is None or xf == XF_REPLACE else incoming + b", " + ours)
    return upstream_request_head(req, client_ip_b, suffix, host_header, extra, remove,
                                 target, xf, proto)


class ClientConn(Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "ctx", "settings", "tr", "inbuf", "client_ip", "client_ip_b", "suffix", "peer", "xf", "proto", "ex",
        "req_bytes", "body", "upstream",
        "close_after", "eof", "idle_since", "head_start", "last_read", "processing", "linger_start",
        "linger_bytes", "paused_for_pipeline", "queued_at", "ticket", "state", "counted", "__weakref__",
    )

    def __init__(self, ctx: ProxyContext, sock: socket.socket, client_ip: str, peer: Optional[Peer] = None,
                 counted: Optional[ClientConnections] = None) -> None:
        self.ctx = ctx
        # The settings of the request in progress: taken from the context when a request starts, so a
        # reload applies from the next request on, never half-way through one.
        self.settings = ctx.settings
        now = ctx.reactor.now
        self.state = C_IDLE
        self.inbuf = HeadBuffer(ctx.settings.max_header_bytes)
        # The client as the edge saw it (the socket's peer, or the PROXY header's source): what
        # X-Forwarded-For gets, and the client address of every request (unless a trusted peer's
        # X-Forwarded-For names another: edge.real_client).
        if peer is None:
            peer = Peer(client_ip, 0, sock=sock)
        self.peer = peer
        self.xf = peer.xf
        self.proto = peer.scheme
        self.client_ip = client_ip
        self.client_ip_b = client_ip.encode("ascii", "replace")
        self.suffix = forwarded_suffix(self.client_ip_b, peer.scheme)
        self.ex: Optional[Exchange] = None
        self.req_bytes = b""
        self.body: Optional[BodyRelay] = None   # the request body in transit
        self.upstream: Optional[UpstreamConn] = None
        self.close_after = False
        self.eof = False
        self.idle_since = now
        self.head_start = now
        self.last_read = now
        self.processing = False
        self.linger_start = 0.0
        self.linger_bytes = 0
        self.paused_for_pipeline = False
        self.queued_at = 0.0
        self.ticket: Optional[Ticket] = None   # our place in the pool's queue while C_QUEUED
        # The client_connections table this connection is counted in (None: not counted).
        self.counted = counted
        self.tr = tr = peer.accept(ctx.reactor, sock, self, CLIENT_RECV_SIZE)
        tr.arm(now + ctx.settings.client_timeout)

    def __repr__(self) -> str:
        return "<ClientConn %s state=%d>" % (self.client_ip, self.state)

    def _to(self, state: int) -> None:
        if state not in _CLIENT_NEXT[self.state]:
            raise AssertionError("client connection: no transition %d -> %d" % (self.state, state))
        self.state = state

    @property
    def req(self) -> Optional[RequestHead]:
        ex = self.ex
        return ex.req if ex is not None else None

    # ---- events --------------------------------------------------------------------------------
    def internal_error(self) -> None:
        """A bug in balrs surfaced as an exception in this connection's callback: it must cost this
        exchange, never the loop or a hung client (asyncio's transports call _fatal_error the same way).
        Answer 500 if no response byte was sent yet, then close; otherwise close at once."""
        log.exception("internal error on the connection from %s", self.client_ip)
        try:
            up = self.upstream
            if up is not None:
                self.upstream = None
                up.close()
            ex = self.ex
            if (ex is not None and not ex.resp_started and C_QUEUED <= self.state <= C_WAIT
                    and not self.tr.broken):
                self._write_error(500, END_INTERNAL)
            else:
                self._end(END_INTERNAL)
                self.abort()
        except Exception:
            log.exception("internal error while closing the connection from %s", self.client_ip)
            self.state = C_CLOSED
            self.tr.close()
            self.ctx.client_closed(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state <= C_HEAD:
            try:
                head = self.inbuf.feed(data)
            except ProtocolError as exc:
                self._reject(exc)
                return
            if head is None:
                if state == C_IDLE:
                    self._head_started()
                return
            self._start_request(head)
            if self.state == C_IDLE:
                self._process_input()
        elif state == C_BODY:
            self.last_read = self.ctx.reactor.now
            self._body_data(data)
        elif state == C_WAIT:
            # Pipelined requests wait here until the response in progress is done (answers keep
            # request order); past the limit, stop reading.
            self.inbuf.buf += data
            if len(self.inbuf.buf) > self.settings.pipeline_limit:
                self.paused_for_pipeline = True
                self.tr.pause_reading()
        elif state == C_TUNNEL:
            self.last_read = self.ctx.reactor.now
            up = self.upstream
            if up is not None:
                up.write(data)
        elif state == C_LINGER or state == C_FLUSH:
            self.linger_bytes += len(data)
            if self.linger_bytes > LINGER_MAX_BYTES:
                self.close()

    def eof_received(self, reset: bool) -> None:
        if reset:
            self.abort()
            return
        state = self.state
        self.eof = True
        if state == C_IDLE or state == C_HEAD or state == C_LINGER or state == C_FLUSH:
            self.close()
        elif state == C_BODY:
            # The client went away in the middle of its request body: nothing can complete it.
            self.abort()
        elif state == C_WAIT or state == C_QUEUED:
            # A half-close after complete requests is legal (HTTP/1.0 style, or `nc` piping pipelined
            # requests): answer every complete request received before it, then close.
            self.tr.pause_reading()
        elif state == C_TUNNEL:
            self.tr.pause_reading()
            self.tunnel_progress()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        # EPIPE/ECONNRESET on a send: the client is gone; nothing more can be delivered.
        self.abort()

    def _head_started(self) -> None:
        self._to(C_HEAD)
        now = self.head_start = self.ctx.reactor.now
        self.tr.arm(now + self.settings.header_timeout)

    def _process_input(self) -> None:
        """Start requests from buffered (pipelined) input while the connection is ready for one."""
        if self.processing:
            return
        self.processing = True
        try:
            while self.state == C_IDLE:
                try:
                    head = self.inbuf.pop_head()
                except ProtocolError as exc:
                    self._reject(exc)
                    return
                if head is None:
                    if self.eof:
                        # The client has finished sending: a partial head can never complete.
                        self.close()
                    elif self.inbuf.buf:
                        self._head_started()
                    return
                self._start_request(head)
        finally:
            self.processing = False

    # ---- requests ------------------------------------------------------------------------------
    def _start_request(self, head: bytes) -> None:
        ctx = self.ctx
        self.settings = settings = ctx.settings
        now = ctx.reactor.now
        try:
            req = parse_request_head(head)
            if req.method == b"CONNECT":
                # A reverse proxy does not open tunnels to arbitrary hosts.
                raise ProtocolError(501, "CONNECT is not supported")
            if req.framing == LENGTH and settings.max_body_bytes and req.length > settings.max_body_bytes:
                raise ProtocolError(413, "Content-Length %d over max_body_bytes" % req.length)
            target = req.target
            match_path = b""
            if target[0] == 47 and needs_normalising(target) is not None:
                # Origin-form with a "%", "/.", "//", "\\" or "#": RFC 3986 §6.2.2 normalisation (rare).
                path, match_path, query = normalise_target(target)
                if path + query != target:
                    req.target = path + query
                    req.rewrite = True
        except ProtocolError as exc:
            self.ex = self._refused_exchange(head)
            self._reject(exc)
            return
        client_ip = self.client_ip
        if self.xf == XF_KEEP and req.rewrite:
            # A trusted peer (a front-end proxy) names the client in X-Forwarded-For.
            client_ip = real_client(req.header(b"x-forwarded-for"), client_ip, settings.trusted)
        self.ex = ex = Exchange(req, client_ip, now, time.time() if ctx.log_line else 0.0, len(head))
        self.close_after = not req.keep_alive or ctx.draining
        if settings.request_id:
            self._request_id(ex, req)
        if req.framing == NO_BODY or (req.framing == LENGTH and req.length == 0):
            ex.request_done = True
            self.state = C_WAIT  # C_IDLE/C_HEAD -> C_WAIT: in _HOT_TRANSITIONS
            self.body = None
        else:
            self._to(C_BODY)
            self.last_read = now
            when = now + settings.body_timeout
            if when < self.tr.timer_when:
                self.tr.arm(when)
            self.body = (BodyRelay(CHUNKED, CHUNKED, 0,
                                   ChunkedDecoder(settings.max_body_bytes, settings.max_header_bytes, 400))
                         if req.framing == CHUNKED else BodyRelay(LENGTH, LENGTH, req.length))
            if req.idempotent and (req.framing == CHUNKED or req.length <= REPLAY_MAX):
                # A small body of a request that may be retried is kept until the exchange ends.
                ex.kept = []
                ex.kept_bytes = 0
            else:
                ex.kept = None
        buckets = ctx.buckets
        if buckets is not None:
            wait = buckets.take(client_ip, now)
            if wait:
                self._limited(0, wait)
                return
        router = ctx.router
        if router is None:
            pool = ctx.default_pool
            if pool is None:
                # No [route] and no default pool (every backend is in a named pool).
                self._reply_error(404, END_NO_ROUTE)
                return
        else:
            # A Host whose every request takes one plain route (RouteTable.decided): no matching.
            decided = router.decided.get(req.host) if target[0] == 47 else None
            if decided is not None:
                route, pool = decided
                route.requests += 1
                ex.route_ref = route
            else:
                pool = self._route(ex, req, match_path)
                if pool is None:
                    return
        ex.pool_ref = pool
        pool.requests += 1  # the retry budget's count of requests (Pool.sync_budget)
        backend = pool.strategy.choose(req, client_ip) if pool.direct else self._choose(ex, pool, req, client_ip)
        if backend is None:
            if pool.all_full():
                self._enqueue()
                return
            backup = pool.backup
            while backup is not None and backend is None:
                # No backend of the pool is eligible: its backup pool serves meanwhile.
                ex.pool_ref = backup
                backend = backup.choose(req, client_ip)
                if backend is None and backup.all_full():
                    self._enqueue()
                    return
                backup = backup.backup if backup is not pool else None
            if backend is None:
                # No backend is up (health checks, ejections, or none configured).
                self._reply_error(503, END_NO_BACKEND)
                return
        self._dispatch(backend)

    def _choose(self, ex: Exchange, pool: Pool, req: RequestHead, client_ip: str) -> Optional[Backend]:
        """The pool's choice when it has a slot limit or a sticky cookie (else the strategy's alone)."""
        sticky = pool.sticky
        if sticky is None:
            return pool.choose(req, client_ip)
        backend, reset = pool.choose_sticky(req, client_ip)
        if backend is not None and reset:
            self._set_cookie(ex, sticky, backend)
        return backend

    def _set_cookie(self, ex: Exchange, sticky: Sticky[Backend], backend: Backend) -> None:
        """The response will make the client stick to ``backend`` (with the route's edits, if any)."""
        line = sticky.set_cookie.get(backend)
        if line is None:
            return
        route = ex.route_ref
        if route is not None and route.modifies_response:
            ex.edit = HeadEdit(route.response_remove, route.response_extra + line)
        else:
            ex.edit = HeadEdit(frozenset(), line)

    def _limited(self, which: int, wait: float) -> None:
        """Over a per-client limit: 429 with Retry-After (RFC 6585 §4). ``which``: 0 client_rate (the
        connection stays usable), 1 client_connections (closed after the answer)."""
        ex = self.ex
        assert ex is not None
        self.ctx.limited[which] += 1
        log.debug("client %s: over %s", ex.client, "client_rate" if which == 0 else "client_connections")
        if which or not ex.request_done:
            self.close_after = True
        data = self._error_bytes(429, self.close_after)
        i = data.index(b"\r\n") + 2
        data = b"%sRetry-After: %d\r\n%s" % (data[:i], max(1, math.ceil(wait)), data[i:])
        self.write(data)
        self._end(END_LIMITED)
        if which:
            self._finish(True)
        else:
            self._next_request()

    def _route(self, ex: Exchange, req: RequestHead, match_path: bytes) -> Optional[Pool]:
        """Match the routes: the pool the request goes to, or None when it is answered already (by the
        route itself, or 404 when no route matched and there is no default pool)."""
        target = req.target
        q = target.find(b"?")
        path, query = (target, b"") if q < 0 else (target[:q], target[q:])
        route = self.ctx.router.match(  # type: ignore[union-attr]
            req, req.host, match_path or path, ex.client, self.proto)
        if route is None:
            pool = self.ctx.default_pool
            if pool is None:
                self._reply_error(404, END_NO_ROUTE)
            return pool
        route.requests += 1
        ex.route_ref = route
        if route.kind != ACT_POOL:
            self._local_answer(route, path, query)
            return None
        if route.modifies_request:
            ex.fwd_target = route.forward_path(path) + query
        if route.modifies_response:
            ex.edit = route
        return self.ctx.pools.named[route.pool()]

    def _local_answer(self, route: Route, path: bytes, query: bytes) -> None:
        """A route answers itself (``redirect`` or ``return``): nothing goes to a backend."""
        ex = self.ex
        assert ex is not None and ex.req is not None
        req = ex.req
        if not ex.request_done:
            # Its body is not read: the connection cannot be reused (nginx closes too).
            self.close_after = True
        port = 0
        if route.kind == ACT_REDIRECT:
            try:
                port = self.tr.sock.getsockname()[1]
            except (OSError, IndexError):
                port = 0
        data = route.local_response(self.proto, match_host(req.host), port, path, query, self.close_after,
                                    req.method == b"HEAD")
        if ex.request_id is not None:
            data = self._with_request_id(data[:data.index(b"\r\n\r\n") + 4]) + data[data.index(b"\r\n\r\n") + 4:]
        ex.resp_started = True
        ex.status = route.status
        self.write(data)
        self.upstream = None
        self._end(END_OK)
        self._next_request()

    def _request_id(self, ex: Exchange, req: RequestHead) -> None:
        """Keep the client's request id if it is valid, else make one; it goes upstream and back."""
        settings = self.settings
        got = req.find_field(settings.request_id)
        if got is not None and valid_request_id(got):
            ex.request_id = got
            return
        make = self.ctx.request_ids
        assert make is not None
        ex.request_id = make()

    def _dispatch(self, backend: Backend) -> None:
        """Send the request to ``backend``: over an idle pooled connection if it has one."""
        ex = self.ex
        assert ex is not None
        req = ex.req
        assert req is not None
        # _head_for inlined (a call here costs 0.5% of a small request's instructions, callgrind).
        if (ex.request_id is None and not self.xf and not self.settings.forwarded
                and (ex.route_ref is None or (ex.fwd_target is None and ex.edit is None))):
            data = upstream_request_head(req, self.client_ip_b, self.suffix, backend.host_header, b"", None, None,
                                         XF_APPEND, self.proto)
        else:
            data = self._upstream_head(ex, req, backend)
        self.req_bytes = data
        up = backend.idle.take()
        if up is not None:
            self.upstream = up
            up.send_request(ex, self, data)
        else:
            self._send_to(backend, data, len(data), True)
        if self.state == C_BODY and self.inbuf.buf:
            self._body_data(self.inbuf.take())

    def _head_for(self, ex: Exchange, req: RequestHead, backend: Backend) -> bytes:
        """The request head as ``backend`` gets it."""
        if (ex.request_id is None and not self.xf and not self.settings.forwarded
                and (ex.route_ref is None or (ex.fwd_target is None and ex.edit is None))):
            return upstream_request_head(req, self.client_ip_b, self.suffix, backend.host_header, b"", None, None,
                                         XF_APPEND, self.proto)
        return self._upstream_head(ex, req, backend)

    def _upstream_head(self, ex: Exchange, req: RequestHead, backend: Backend) -> bytes:
        return upstream_head(self.settings, ex, req, backend.host_header, self.xf, self.client_ip_b, self.suffix,
                             self.proto)

    def _enqueue(self) -> None:
        """Every eligible backend is at max_connections: wait for a slot (FIFO), up to queue_timeout.
        Reading pauses meanwhile: a body stays in the kernel's buffers, not ours."""
        now = self.queued_at = self.ctx.reactor.now
        self._to(C_QUEUED)
        pool = self.ex.pool_ref if self.ex is not None else None
        assert pool is not None
        self.ticket = pool.enqueue(self)
        self.tr.pause_reading()
        self.tr.arm(now + pool.queue_timeout)

    def dequeue(self) -> bool:
        """Called by the pool when a backend slot may be free: take it if so. Returns False when this
        request must keep waiting."""
        ex = self.ex
        if self.state != C_QUEUED or ex is None or ex.req is None:
            return True
        pool = ex.pool_ref
        assert pool is not None
        backend = self._choose(ex, pool, ex.req, ex.client)
        if backend is None:
            return False
        self.queued_at = 0.0
        self.ticket = None
        body = self.body
        if body is not None and not body.done:
            self._to(C_BODY)
        else:
            self._to(C_WAIT)
        self._dispatch(backend)
        if self.state == C_BODY:
            self.resume_for_upstream()
        elif self.state == C_WAIT and not self.paused_for_pipeline:
            self.tr.resume_reading()
        return True

    def _leave_queue(self) -> None:
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            self.queued_at = 0.0
            ex = self.ex
            pool = ex.pool_ref if ex is not None else None
            if pool is not None:
                pool.leave_queue(ticket)

    def _send_to(self, backend: Backend, pending: Union[bytes, Deque[Chunk]], nbytes: int, fresh: bool) -> None:
        """Hand the request (its bytes so far) to a connection to ``backend``: a new one if ``fresh``,
        else an idle pooled one if there is one."""
        ex = self.ex
        assert ex is not None
        if not fresh:
            idle_up = backend.idle.take()
            if idle_up is not None:
                self.upstream = idle_up
                idle_up.send_request(ex, self, pending if isinstance(pending, bytes) else b"".join(pending))
                return
        try:
            up = UpstreamConn(self.ctx, backend, self.settings,
                              self._proxy_header(backend.send_proxy, ex) if backend.send_proxy != "off" else b"")
        except OSError as exc:
            # No socket for it (EMFILE...): nothing was sent; answer now.
            log.error("backend %s: cannot open a connection: %s", backend.name, exc)
            self._reply_error(502, END_BACKEND_ERROR)
            return
        self.upstream = up
        up.attach(ex, self, pending, nbytes)

    def _proxy_header(self, version: str, ex: Exchange) -> bytes:
        """The PROXY protocol header for a backend's new connection: this request's client, and the
        address it connected to."""
        peer = self.peer
        return proxy_header(version, (ex.client, peer.port if ex.client == peer.ip else 0), peer.destination())

    def _body_data(self, data: bytes) -> None:
        """Request body bytes from the client: frame them for upstream; keep what follows the body."""
        body = self.body
        ex = self.ex
        assert body is not None and ex is not None
        parts: List[Chunk] = []
        try:
            used = body.feed(data, parts)
        except ProtocolError as exc:
            self._request_body_error(exc)
            return
        ex.bytes_in += used
        up = self.upstream
        if up is not None and parts:
            out = parts[0] if len(parts) == 1 else b"".join(parts)
            kept = ex.kept
            if kept is not None:
                ex.kept_bytes += len(out)
                # The limit is on the body itself: for a chunked one, its decoded size (the framing
                # kept with it is not counted).
                decoder = body.decoder
                if (decoder.total if decoder is not None else ex.kept_bytes) <= REPLAY_MAX:
                    kept.append(bytes(out))
                else:
                    ex.kept = None  # too large to keep: this request is not retried once bytes left
            up.write_body(out)
            if self.state != C_BODY:
                return
        if not body.done:
            return
        # The request is complete: from now on a response is due (backend_timeout).
        if used < len(data):
            self.inbuf.buf += data[used:]
        self.body = None
        ex.request_done = True
        self._to(C_WAIT)
        if up is not None:
            up.request_sent()
        else:
            # The response already came and went (the backend answered early): no keep-alive.
            self.close_after = True
        if len(self.inbuf.buf) > self.settings.pipeline_limit:
            self.paused_for_pipeline = True
            self.tr.pause_reading()

    def _request_body_error(self, exc: ProtocolError) -> None:
        """The client's chunked body is malformed (or too large) mid-stream."""
        log.debug("client %s: bad request body: %s", self.client_ip, exc)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        ex = self.ex
        if ex is not None and ex.resp_started:
            self._end(END_REJECTED)
            self.abort()
        else:
            self._write_error(exc.status, END_REJECTED)

    # ---- Downstream: what the upstream side calls ----------------------------------------------------
    def write(self, data: Chunk) -> None:
        ex = self.ex
        if ex is not None:
            ex.bytes_out += len(data)
        self.tr.write(data)

    def write_parts(self, parts: List[Chunk]) -> None:
        if len(parts) == 1:
            self.write(parts[0])
        elif parts:
            self.write(b"".join(parts))

    def response_head(self, resp: ResponseHead) -> Tuple[bytes, int]:
        """The client-side head for a final response, and the framing of the body sent to the client."""
        ex = self.ex
        assert ex is not None and ex.req is not None
        minor = ex.req.minor
        framing, close = client_framing(resp.framing, minor)
        if close:
            self.close_after = True
        if not ex.request_done or self.ctx.draining:
            # A final answer before the whole request arrived: the connection cannot be reused.
            self.close_after = True
        ex.resp_started = True
        ex.status = resp.status
        head = client_response_head(resp, framing, self.close_after, minor)
        edit = ex.edit
        if edit is not None:
            head = edit_head(head, edit.response_remove, edit.response_extra)
        if ex.request_id is not None:
            head = self._with_request_id(head)
        return head, framing

    def _with_request_id(self, head: bytes) -> bytes:
        """``head`` with our request id as its only request-id field (a backend may echo one)."""
        ex = self.ex
        assert ex is not None and ex.request_id is not None
        settings = self.settings
        marker = b"\r\n%s:" % settings.request_id
        if marker in head.lower():
            lines = head[:-4].split(b"\r\n")
            prefix = marker[2:]
            head = b"\r\n".join([lines[0]] + [x for x in lines[1:] if not x.lower().startswith(prefix)]) + b"\r\n\r\n"
        return b"%s%s: %s\r\n\r\n" % (head[:-2], settings.request_id_field, ex.request_id)

    def interim_response(self, head: bytes) -> None:
        """A 1xx other than 101: RFC 9110 §15.2 has proxies forward it, except to HTTP/1.0 clients."""
        req = self.req
        if req is not None and req.minor == 1:
            self.write(head)

    def response_done(self) -> None:
        """The last byte of the response is in our queue (and the upstream let go of us)."""
        self.upstream = None
        ex = self.ex
        if ex is not None:
            self.ex = None
            self.ctx.finish(ex, END_OK)
        self._next_request()

    def _next_request(self) -> None:
        """The exchange is over: wait for the next request, or close."""
        state = self.state
        if state == C_WAIT:
            if self.close_after or (self.eof and not self.inbuf.buf):
                self._finish(False)
                return
            self.state = C_IDLE  # C_WAIT -> C_IDLE, the keep-alive case: in _HOT_TRANSITIONS
        elif state >= C_TUNNEL:
            return
        elif state == C_BODY or (state == C_QUEUED and self.body is not None and not self.body.done):
            # The request body is still coming: nothing can follow on this connection.
            self._finish(True)
            return
        elif self.close_after or (self.eof and not self.inbuf.buf):
            self._finish(False)
            return
        else:
            self._to(C_IDLE)
        self.body = None
        now = self.idle_since = self.ctx.reactor.now
        tr = self.tr
        when = now + self.settings.client_timeout
        if when < tr.timer_when:
            tr.arm(when)
        if self.paused_for_pipeline or not tr.reading:
            self.paused_for_pipeline = False
            if not self.eof:
                tr.resume_reading()
        if self.inbuf.buf:
            self._process_input()

    def start_tunnel(self, data: bytes) -> None:
        """The backend switched protocols: from now on bytes flow both ways untouched."""
        self._to(C_TUNNEL)
        now = self.last_read = self.ctx.reactor.now
        self.write(data)
        up = self.upstream
        if self.inbuf.buf and up is not None:
            up.write(self.inbuf.take())
        if self.paused_for_pipeline:
            self.paused_for_pipeline = False
            if not self.eof:
                self.tr.resume_reading()
        self.tr.arm(now + self.settings.tunnel_timeout)

    def upstream_failed(self, why: int, pending: Optional[Deque[Chunk]], nbytes: int) -> None:
        """The upstream connection failed (it has closed itself and released its backend slot)."""
        up = self.upstream
        self.upstream = None
        ex = self.ex
        if ex is None or ex.req is None or self.state >= C_TUNNEL:
            self.abort()
            return
        if ex.resp_started:
            # The head is out: the only honest signal left is to close without completing the body.
            self._end(END_BACKEND_TIMEOUT if why == F_TIMEOUT else END_BACKEND_ERROR)
            self.abort_after_flush()
            return
        req = ex.req
        backend = up.backend if up is not None else ex.be
        assert backend is not None
        if why == F_CONNECT_REFUSED or why == F_CONNECT_TIMEOUT:
            failed = ex.failed
            if failed is None:
                failed = ex.failed = Attempts()
            if pending is not None and failed.addr_retries < len(backend.addrs) - 1 and backend.next_address():
                # A host name with several addresses: the next one first (it does not count as a retry).
                failed.addr_retries += 1
                log.info("backend %s: trying its next address %s", backend.name, backend.sockaddr[0])
                self._send_to(backend, pending, nbytes, True)
                return
            if why == F_CONNECT_TIMEOUT:
                failed.timeouts += 1
            _tried(failed, backend)
            # Nothing reached a backend: the unsent bytes can go to another one.
            other = self.retry_target(RETRY_CONNECT) if pending is not None else None
            if other is not None and pending is not None:
                log.info("connect to %s failed, retrying on %s", backend.name, other.name)
                self._sticky_moved(ex, other)
                self._send_to(other, pending, nbytes, False)
                return
            # RFC 9110 §15.6.5: every try timed out -> 504; otherwise nothing could be connected -> 502.
            if failed.timeouts == len(failed.tried):
                self._reply_error(504, END_BACKEND_TIMEOUT)
            else:
                self._reply_error(502, END_BACKEND_ERROR)
            return
        if why == F_STALE and req.idempotent and req.framing == NO_BODY:
            # A pooled connection the backend had already closed: resend on a fresh one.
            self._send_to(backend, self.req_bytes, len(self.req_bytes), True)
            return
        if why == F_STALE or why == F_EMPTY or why == F_TIMEOUT:
            other = self.retry_target(RETRY_TIMEOUT if why == F_TIMEOUT else RETRY_EMPTY)
            if other is not None:
                log.debug("backend %s %s; retrying on %s", backend.name,
                          "timed out" if why == F_TIMEOUT else "closed without answering", other.name)
                self.resend(other)
                return
        if why == F_TIMEOUT:
            self._reply_error(504, END_BACKEND_TIMEOUT)
        elif why == F_INTERNAL:
            self._reply_error(500, END_INTERNAL)
        else:
            self._reply_error(502, END_BACKEND_ERROR)

    def retry_target(self, condition: int) -> Optional[Backend]:
        """After an attempt failed with ``condition`` (a retry_on bit) before anything of its response
        reached the client: the backend to try next, or None when the failure goes to the client. The
        pool's retry_on must list the condition; other than connect-failure the method must be
        idempotent and the body (if any) kept; ``retries`` bounds the retries of the exchange, each on
        a backend it has not tried yet; and the retry budget must allow it (connect failures are not
        charged to it: nothing reached the backend). A retry is counted here."""
        ex = self.ex
        if ex is None or ex.resp_started or self.state >= C_TUNNEL:
            return None
        req = ex.req
        pool = ex.pool_ref
        if req is None or pool is None or not pool.retry_on & condition:
            return None
        if condition != RETRY_CONNECT and not (req.idempotent and (not self._has_body(req) or ex.kept is not None)):
            return None
        failed = ex.failed
        if failed is None:
            failed = ex.failed = Attempts()
        if ex.be is not None:
            _tried(failed, ex.be)
        if failed.retries >= pool.retries:
            return None
        other = pool.choose(req, ex.client, failed.tried)
        if other is None:
            return None
        if condition != RETRY_CONNECT and not pool.try_retry(self.ctx.reactor.now):
            log.warning("pool %s: retry budget exhausted (retry_budget %g%% of requests over 10 s): the "
                        "failure goes to the client", pool.name, pool.budget.ratio * 100)
            return None
        failed.retries += 1
        pool.retries_total += 1
        return other

    @staticmethod
    def _has_body(req: RequestHead) -> bool:
        return not (req.framing == NO_BODY or (req.framing == LENGTH and req.length == 0))

    def resend(self, backend: Backend) -> None:
        """Send the request again, whole, to ``backend`` (retry_target chose it): its head as that backend
        gets it, and the body kept so far (what is still to come follows as it arrives)."""
        ex = self.ex
        assert ex is not None and ex.req is not None
        self._sticky_moved(ex, backend)
        self.req_bytes = data = self._head_for(ex, ex.req, backend)
        if self._has_body(ex.req):
            kept = ex.kept
            if kept:
                data = data + b"".join(kept)
        self._send_to(backend, data, len(data), False)

    def _sticky_moved(self, ex: Exchange, backend: Backend) -> None:
        """A retry moved the request to ``backend``: with a sticky cookie, the client follows it."""
        pool = ex.pool_ref
        if pool is not None and pool.sticky is not None:
            self._set_cookie(ex, pool.sticky, backend)

    # ---- answers balrs makes itself ---------------------------------------------------------------
    def _reject(self, exc: ProtocolError) -> None:
        """A request balrs refuses before it goes anywhere: answer and close (its framing is unknown)."""
        log.debug("client %s: %s", self.client_ip, exc)
        if self.ex is None:
            self.ex = self._refused_exchange(None)
        self._write_error(exc.status, END_REJECTED)

    def _refused_exchange(self, head: Optional[bytes]) -> Exchange:
        """The exchange of a request refused before its head parsed (``head``, if it was whole, or
        what arrived of it): counted and logged like any other."""
        ctx = self.ctx
        logging_on = ctx.log_line is not None
        ex = Exchange(None, self.client_ip, ctx.reactor.now, time.time() if logging_on else 0.0,
                      len(head) if head is not None else len(self.inbuf.buf))
        if head is not None and logging_on:
            ex.refused(head)
        return ex

    def _error_bytes(self, status: int, close: bool) -> bytes:
        ex = self.ex
        req = ex.req if ex is not None else None
        data = error_response(status, close, req is not None and req.method == b"HEAD")
        if ex is not None:
            ex.status = status
            ex.resp_started = True
            if ex.request_id is not None:
                i = data.index(b"\r\n") + 2
                data = b"%s%s: %s\r\n%s" % (data[:i], self.settings.request_id_field, ex.request_id, data[i:])
        return data

    def _write_error(self, status: int, end: str) -> None:
        """An error answer after which the connection closes (lingering)."""
        self.write(self._error_bytes(status, True))
        self._end(end)
        self._finish(True)

    def _reply_error(self, status: int, end: str) -> None:
        """An error answer to a parsed request (no backend, 502, 504). The connection stays usable when
        the whole request was read and the client wants keep-alive."""
        ex = self.ex
        if ex is not None and not ex.request_done:
            self.close_after = True
        self.write(self._error_bytes(status, self.close_after))
        self.upstream = None
        self._end(end)
        self._next_request()

    def _end(self, end: str) -> None:
        ex = self.ex
        if ex is not None:
            self.ex = None
            self.ctx.finish(ex, end)

    # ---- flow control --------------------------------------------------------------------------
    def write_queued(self) -> None:
        self.tr.arm(self.ctx.reactor.now + self.settings.send_timeout)

    def pause_for_upstream(self) -> None:
        """The upstream's queue is full: stop reading body (or tunnel) bytes from the client."""
        self.tr.pause_reading()

    def resume_for_upstream(self) -> None:
        state = self.state
        tr = self.tr
        if (state == C_BODY or state == C_TUNNEL) and not tr.reading and not self.eof:
            # Not reading was our choice, not the client's silence: its clock restarts now.
            now = self.last_read = self.ctx.reactor.now
            tr.resume_reading()
            if state == C_BODY:
                tr.arm(now + self.settings.body_timeout)

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None:
            up.resume_reading()

    def write_drained(self) -> None:
        state = self.state
        if state == C_LINGER:
            self._shutdown_write()
        elif state == C_FLUSH:
            self.close()
        elif state == C_TUNNEL:
            self.tunnel_progress()
        else:
            self.resume_writing()

    # ---- timers --------------------------------------------------------------------------------
    def timer_fired(self) -> None:
        settings = self.settings
        now = self.ctx.reactor.now
        state = self.state
        tr = self.tr
        if state == C_IDLE:
            deadline = self.idle_since + settings.client_timeout
            if now >= deadline:
                # RFC 9112 §9.3: an idle connection may be closed at any time; silently.
                self.close()
                return
        elif state == C_HEAD:
            deadline = self.head_start + settings.header_timeout
            if now >= deadline:
                if self.ex is None:
                    self.ex = self._refused_exchange(None)
                self._write_error(408, END_CLIENT_TIMEOUT)
                return
        elif state == C_QUEUED:
            qex = self.ex
            pool = qex.pool_ref if qex is not None else None
            deadline = self.queued_at + (pool.queue_timeout if pool is not None else settings.queue_timeout)
            if now >= deadline:
                # HAProxy answers 503 when `timeout queue` expires.
                self._leave_queue()
                self._reply_error(503, END_QUEUE_TIMEOUT)
                return
        elif state == C_BODY:
            if tr.reading:
                # The client went quiet in the middle of its request body (nginx client_body_timeout).
                deadline = self.last_read + settings.body_timeout
                if now >= deadline:
                    ex = self.ex
                    if ex is not None and ex.resp_started:
                        self._end(END_CLIENT_TIMEOUT)
                        self.abort()
                    else:
                        up = self.upstream
                        if up is not None:
                            self.upstream = None
                            up.close()
                        self._write_error(408, END_CLIENT_TIMEOUT)
                    return
            else:
                # Paused by backpressure: the upstream's timer watches the backend meanwhile.
                deadline = now + settings.check_interval
        elif state == C_WAIT:
            if tr.out_bytes:
                # The client stopped reading its response (nginx send_timeout).
                deadline = tr.last_write + settings.send_timeout
                if now >= deadline:
                    self._end(END_CLIENT_TIMEOUT)
                    self.abort()
                    return
            else:
                deadline = now + settings.check_interval
        elif state == C_TUNNEL:
            last = max(self.last_read, tr.last_write)
            up = self.upstream
            if up is not None:
                last = max(last, up.last_active)
            deadline = last + settings.tunnel_timeout
            if now >= deadline:
                self.abort()
                return
        elif state == C_LINGER or state == C_FLUSH:
            if tr.out_bytes:
                deadline = tr.last_write + settings.send_timeout
            elif state == C_LINGER:
                deadline = self.linger_start + LINGER_TIMEOUT
            else:
                deadline = now
            if now >= deadline:
                self.close()
                return
        else:
            return
        tr.arm(deadline)

    # ---- closing -------------------------------------------------------------------------------
    def _finish(self, linger: bool) -> None:
        """Close once the queued bytes are out. With ``linger``, half-close first and keep discarding
        what the client still sends for a while, so our answer is not lost to a reset."""
        if self.state == C_CLOSED:
            return
        self._leave_queue()
        self._to(C_LINGER if linger else C_FLUSH)
        self.linger_start = self.ctx.reactor.now
        self.paused_for_pipeline = False
        tr = self.tr
        if linger and not tr.reading and not self.eof:
            tr.resume_reading()
        if not tr.out_bytes:
            self._shutdown_write()
        else:
            tr.arm(self.linger_start + self.settings.send_timeout)

    def _shutdown_write(self) -> None:
        """The last byte is out: close, or half-close and linger."""
        if self.state != C_LINGER or self.eof:
            self.close()
            return
        self.tr.shutdown_write()
        self.linger_start = self.ctx.reactor.now
        self.tr.arm(self.linger_start + LINGER_TIMEOUT)

    def abort_after_flush(self) -> None:
        """Stop everything; deliver what is queued, then close (a truncated response stays visibly
        truncated: no more bytes, no final chunk)."""
        state = self.state
        if state == C_CLOSED:
            return
        self._end(END_TUNNEL if state == C_TUNNEL else END_BACKEND_ERROR)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        if state != C_FLUSH:
            self._leave_queue()
            self._to(C_FLUSH)
        self.linger_start = self.ctx.reactor.now
        tr = self.tr
        if not tr.out_bytes:
            self.close()
        else:
            tr.pause_reading()
            tr.arm(self.linger_start + self.settings.send_timeout)

    def tunnel_progress(self) -> None:
        """After an end-of-stream or a drained queue in a tunnel: pass each side's FIN on once what it
        sent is delivered (half-close), and close both when both are done."""
        up = self.upstream
        if up is None:
            self.abort_after_flush()
            return
        tr = self.tr
        if up.peer_eof and not tr.out_bytes:
            tr.shutdown_write()
        if self.eof and not up.queued:
            up.shutdown_write()
        if self.eof and up.peer_eof and not tr.out_bytes and not up.queued:
            self._end(END_TUNNEL)
            self.close()
        else:
            self.resume_writing()

    def drain(self) -> None:
        """Graceful stop: an idle connection closes now; one with a request in progress closes after
        its response (which says ``Connection: close`` if its head is not out yet)."""
        state = self.state
        if state == C_IDLE or state == C_HEAD:
            self.close()
        elif C_QUEUED <= state <= C_WAIT:
            self.close_after = True

    def abort(self) -> None:
        """Close both sides now (one fatal-error path: STYLE habit 9)."""
        self.close()

    def close(self) -> None:
        if self.state == C_CLOSED:
            return
        self._leave_queue()
        self._to(C_CLOSED)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        ex = self.ex
        if ex is not None:
            self.ex = None
            self.ctx.finish(ex, END_TUNNEL if ex.status == 101 else
                            END_SHUTDOWN if self.ctx.draining else END_CLIENT_ABORT)
        self.tr.close()
        counted = self.counted
        if counted is not None:
            self.counted = None
            counted.close(self.client_ip)
        self.ctx.client_closed(self)


def _tried(failed: Attempts, backend: Backend) -> None:
    """Record that the exchange tried ``backend`` (once for consecutive failures on it)."""
    tried = failed.tried
    if not tried or tried[-1] is not backend:
        tried.append(backend)


class OverLimitClient(ClientConn):
    """A connection from a client already at its ``client_connections`` limit: its first request is
    answered 429 with Retry-After and the connection closed (nginx's limit_conn answers at the request
    too, so the client learns why instead of seeing a reset). Not counted against the limit."""

    __slots__ = ()

    def __init__(self, ctx: ProxyContext, sock: socket.socket, client_ip: str, peer: Optional[Peer] = None) -> None:
        super().__init__(ctx, sock, client_ip, peer)
        # It gets no more patience while idle than a request head needs (the C_IDLE deadline is
        # idle_since + client_timeout).
        settings = ctx.settings
        wait = min(settings.header_timeout, settings.client_timeout)
        self.idle_since -= settings.client_timeout - wait
        self.tr.arm(ctx.reactor.now + wait)

    def _start_request(self, head: bytes) -> None:
        self.settings = self.ctx.settings
        self.ex = self._refused_exchange(head)
        self._limited(1, 1.0)
