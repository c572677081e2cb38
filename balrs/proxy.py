"""The client and upstream connection state machines.

A request flows one way through plain method calls on the reactor thread (STYLE "Architecture"):
``ClientConn`` reads and parses the request, asks the pool for a backend, and hands the upstream head
and body to an ``UpstreamConn`` (reused from the backend's idle pool, or newly connecting). The upstream
parses the response and writes the client-side bytes straight into the client's write path.

Each side has one state variable; the allowed transitions are tables (``_CLIENT_NEXT``,
``_UPSTREAM_NEXT``), checked on every transition. Each side has exactly one timer, re-armed lazily: the
state machines only store timestamps (``idle_since``, ``last_read``, ``last_active``) and the timer, when
it fires, works out whether the deadline of the current state has really passed (Netty's
IdleStateHandler). Writes try ``send`` first and only queue and register for EVENT_WRITE after a partial
send; a queue above ``HIGH_WATER`` stops reading from the other side until it drains below
``LOW_WATER``, so memory per connection is bounded by buffer sizes, never by message sizes.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Deque, List, Optional, Union

from .http.build import client_response_head, error_response, forwarded_suffix, upstream_request_head
from .http.chunked import CRLF, ChunkedDecoder, chunk_header
from .http.errors import ProtocolError
from .http.heads import (
    CHUNKED, CLOSE_DELIMITED, LENGTH, NO_BODY, RESPONSE, HeadBuffer, RequestHead, ResponseHead,
    parse_request_head, parse_response_head,
)
from .reactor import EVENT_READ, EVENT_WRITE, Reactor
from .timerwheel import Timer

if TYPE_CHECKING:
    from .pool import Backend
    from .server import Balancer

__all__ = ["ClientConn", "UpstreamConn"]

log = logging.getLogger("balrs")

# ---- limits (STYLE habit 4) -----------------------------------------------------------------------
# Bytes read per recv() from a client: nginx reads request bodies in 8-16 KiB buffers, HAProxy uses a
# 16 KiB bufsize; 64 KiB keeps uploads at few syscalls while bounding memory.
CLIENT_RECV_SIZE = 65536
# Bytes read per recv() from a backend. recv(n) allocates n bytes first; at 128 KiB and above glibc's
# malloc maps and unmaps fresh pages for every read (measured: ~30 us per recv instead of ~5), so reads
# stay below its mmap threshold.
UPSTREAM_RECV_SIZE = 65536
# Write queue above which the other side stops being read, and below which it resumes (asyncio's
# transports use 64 KiB / 16 KiB; larger marks keep big transfers at full speed).
HIGH_WATER = 262144
LOW_WATER = 65536
# How long a connection that balrs closed after an error keeps reading (and discarding) what the client
# still sends, so the kernel does not reset the connection before the client read the answer
# (nginx lingering_timeout 5s, lingering_time 30s), and how much it discards at most.
LINGER_TIMEOUT = 2.0
LINGER_MAX_BYTES = 1 << 20
# Idle pooled connections to a backend: at most this many per backend, closed after this long unused
# (nginx upstream keepalive 32 and keepalive_timeout 60s; HAProxy pool-purge-delay 5s).
POOL_MAX_IDLE = 128
POOL_IDLE_TIMEOUT = 30.0
# sendmsg() gathers at most this many queued buffers per call (IOV_MAX is 1024 on Linux).
MAX_IOV = 64

# ---- client connection states -------------------------------------------------------------------
C_IDLE = 0      # no request in progress (new, or between keep-alive requests): client_timeout
C_HEAD = 1      # part of a request head has arrived: header_timeout from its first byte
C_BODY = 2      # request head sent upstream, its body still streaming from the client
C_WAIT = 3      # request complete, response outstanding (or streaming)
C_TUNNEL = 4    # after a 101: raw bytes both ways
C_LINGER = 5    # final bytes written (or being written); half-closed, discarding what still arrives
C_CLOSED = 6

_CLIENT_NEXT = {
    C_IDLE: frozenset([C_HEAD, C_BODY, C_WAIT, C_LINGER, C_CLOSED]),
    C_HEAD: frozenset([C_BODY, C_WAIT, C_LINGER, C_CLOSED]),
    C_BODY: frozenset([C_WAIT, C_LINGER, C_CLOSED]),
    C_WAIT: frozenset([C_IDLE, C_TUNNEL, C_LINGER, C_CLOSED]),
    C_TUNNEL: frozenset([C_LINGER, C_CLOSED]),
    C_LINGER: frozenset([C_CLOSED]),
    C_CLOSED: frozenset(),
}

# ---- upstream connection states ------------------------------------------------------------------
U_CONNECTING = 0  # non-blocking connect in progress: connect_timeout
U_HEAD = 1        # request (being) sent, waiting for the response head: backend_timeout of silence
U_BODY = 2        # relaying the response body: backend_timeout of silence
U_IDLE = 3        # in its backend's idle pool
U_TUNNEL = 4      # after a 101
U_CLOSED = 5

_UPSTREAM_NEXT = {
    U_CONNECTING: frozenset([U_HEAD, U_CLOSED]),
    U_HEAD: frozenset([U_HEAD, U_BODY, U_IDLE, U_TUNNEL, U_CLOSED]),
    U_BODY: frozenset([U_IDLE, U_CLOSED]),
    U_IDLE: frozenset([U_HEAD, U_CLOSED]),
    U_TUNNEL: frozenset([U_CLOSED]),
    U_CLOSED: frozenset(),
}

# Why an upstream exchange failed (passed to ClientConn.upstream_failed).
F_CONNECT_REFUSED = 1   # connect refused or unreachable: retried on another backend
F_CONNECT_TIMEOUT = 2   # connect_timeout expired: retried on another backend
F_STALE = 3             # a reused pooled connection was closed before any response byte
F_BROKEN = 4            # the backend closed, reset or sent garbage before a complete head
F_TIMEOUT = 5           # backend_timeout expired
F_INTERNAL = 6          # a bug in balrs on this exchange (an exception in a callback): 500, not the backend's fault

Chunk = Union[bytes, memoryview]

# errno values for which a refused backend counts as unreachable rather than broken.
_CONNECT_ERRORS = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError)


class _Stream:
    """What both sides share: a non-blocking socket, one selector registration, a write queue with
    backpressure, and one lazily re-armed timer."""

    __slots__ = ("srv", "reactor", "sock", "fd", "events", "_io", "out", "out_bytes", "state", "timer",
                 "timer_when", "_timer_cb", "last_write", "wr_closed", "__weakref__")

    srv: Balancer
    reactor: Reactor
    sock: socket.socket
    fd: int
    events: int
    out: Deque[Chunk]
    out_bytes: int
    state: int
    timer: Optional[Timer]
    timer_when: float
    last_write: float

    def _init_stream(self, srv: Balancer, sock: socket.socket) -> None:
        self.srv = srv
        self.reactor = srv.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.events = 0
        self._io = self._on_io
        self._timer_cb = self._on_timer
        self.out = deque()
        self.out_bytes = 0
        self.timer = None
        self.timer_when = 0.0
        self.last_write = self.reactor.now
        self.wr_closed = False

    # ---- selector ----
    def _set_events(self, events: int) -> None:
        old = self.events
        if events == old:
            return
        sel = self.srv.selector
        if old == 0:
            sel.register(self.fd, events, self._io)
        elif events == 0:
            sel.unregister(self.fd)
        else:
            sel.modify(self.fd, events, self._io)
        self.events = events

    def _on_io(self, mask: int) -> None:
        raise NotImplementedError

    # ---- timer ----
    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than ``when`` (it may fire earlier and re-arm)."""
        t = self.timer
        if t is not None:
            if self.timer_when <= when:
                return
            t.cancel()
        self.timer = self.reactor.wheel.call_at(when, self._timer_cb)
        self.timer_when = when

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        raise NotImplementedError

    # ---- writing ----
    def write(self, data: Chunk) -> None:
        """Send now if nothing is queued; queue what the socket does not take."""
        if self.wr_closed:
            return
        if self.out_bytes:
            self.out.append(data)
            self.out_bytes += len(data)
        else:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._write_failed(exc)
                return
            left = len(data) - n
            if not left:
                return
            self.out.append(memoryview(data)[n:] if n else data)
            self.out_bytes = left
            self._set_events(self.events | EVENT_WRITE)
            self._queue_started()
        if self.out_bytes > HIGH_WATER:
            self._high_water()

    def write_parts(self, parts: List[Chunk]) -> None:
        if len(parts) == 1:
            self.write(parts[0])
        elif parts:
            self.write(b"".join(parts))

    def _flush(self) -> bool:
        """Send queued bytes. Returns False if the connection failed (its close then runs from the loop)."""
        out = self.out
        sock = self.sock
        while out:
            try:
                if len(out) == 1:
                    want = len(out[0])
                    n = sock.send(out[0])
                else:
                    bufs = list(islice(out, MAX_IOV))
                    want = sum(len(b) for b in bufs)
                    n = sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._write_failed(exc)
                return False
            self.out_bytes -= n
            self.last_write = self.reactor.now
            while n:
                first = out[0]
                size = len(first)
                if n >= size:
                    out.popleft()
                    n -= size
                else:
                    out[0] = memoryview(first)[n:]
                    n = 0
            if n < want and out:
                break
        if not out:
            self._set_events(self.events & ~EVENT_WRITE)
            self._drained()
        elif self.out_bytes < LOW_WATER:
            self._low_water()
        return True

    def _write_failed(self, exc: OSError) -> None:
        raise NotImplementedError

    def _queue_started(self) -> None:
        """Bytes are waiting for the peer to read: the stall clock starts now."""
        self.last_write = self.reactor.now

    def _high_water(self) -> None:
        """The write queue passed HIGH_WATER: stop reading the side that feeds it."""

    def _low_water(self) -> None:
        """The write queue fell below LOW_WATER: resume reading the side that feeds it."""

    def _drained(self) -> None:
        """The write queue is empty."""
        self._low_water()

    def _shutdown_wr(self) -> None:
        """Send our FIN (once)."""
        if not self.wr_closed:
            self.wr_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _close_socket(self) -> None:
        self._disarm()
        if self.events:
            try:
                self.srv.selector.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            self.events = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.out.clear()
        self.out_bytes = 0


class ClientConn(_Stream):
    """One client connection: reads requests, streams them upstream, writes responses back in order."""

    __slots__ = (
        "inbuf", "client_ip", "client_ip_b", "suffix", "req", "req_bytes", "body_left", "decoder",
        "upstream", "close_after", "eof", "resp_started", "tried", "timeouts",
        "idle_since", "head_start", "last_read", "reading", "processing", "linger_start", "linger_bytes",
        "paused_for_pipeline", "linger", "queued_at", "addr_retries", "broken",
    )

    def __init__(self, srv: Balancer, sock: socket.socket, client_ip: str) -> None:
        self._init_stream(srv, sock)
        now = self.reactor.now
        self.state = C_IDLE
        self.inbuf = HeadBuffer(srv.max_header_bytes)
        self.client_ip = client_ip
        self.client_ip_b = client_ip.encode("ascii", "replace")
        self.suffix = forwarded_suffix(self.client_ip_b)
        self.req: Optional[RequestHead] = None
        self.req_bytes = b""
        self.body_left = 0
        self.decoder: Optional[ChunkedDecoder] = None
        self.upstream: Optional[UpstreamConn] = None
        self.close_after = False
        self.eof = False
        self.resp_started = False
        self.tried: Optional[List[Backend]] = None
        self.timeouts = 0
        self.idle_since = now
        self.head_start = now
        self.last_read = now
        self.reading = True
        self.processing = False
        self.linger_start = 0.0
        self.linger_bytes = 0
        self.linger = False
        self.paused_for_pipeline = False
        self.queued_at = 0.0  # > 0 while waiting in the pool's queue for a backend slot
        self.addr_retries = 0  # other addresses of a backend's host name tried for this request
        self.broken = False    # a write failed: closing from the loop
        self._set_events(EVENT_READ)
        self._arm(now + srv.client_timeout)

    def __repr__(self) -> str:
        return "<ClientConn %s state=%d>" % (self.client_ip, self.state)

    def _to(self, state: int) -> None:
        if state not in _CLIENT_NEXT[self.state]:
            raise AssertionError("client connection: no transition %d -> %d" % (self.state, state))
        self.state = state

    # ---- events --------------------------------------------------------------------------------
    def _on_io(self, mask: int) -> None:
        try:
            if mask & EVENT_WRITE and self.out:
                if not self._flush():
                    return
            if mask & EVENT_READ and self.events & EVENT_READ:
                self._on_readable()
        except Exception:
            self.internal_error()

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
            if not self.resp_started and C_HEAD <= self.state <= C_WAIT and not self.broken:
                self._write_error(500)
            else:
                self.abort()
        except Exception:
            log.exception("internal error while closing the connection from %s", self.client_ip)
            self.state = C_CLOSED
            self._close_socket()
            self.srv.client_closed(self)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(CLIENT_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self._on_eof()
            return
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
            self.last_read = self.reactor.now
            self._body_data(data)
        elif state == C_WAIT:
            # Pipelined requests wait here until the response in progress is done (answers keep
            # request order); past the limit, stop reading.
            self.inbuf.buf += data
            if len(self.inbuf.buf) > self.srv.pipeline_limit:
                self.paused_for_pipeline = True
                self._pause_reading()
        elif state == C_TUNNEL:
            self.last_read = self.reactor.now
            up = self.upstream
            if up is not None:
                up.write(data)
        elif state == C_LINGER:
            self.linger_bytes += len(data)
            if self.linger_bytes > LINGER_MAX_BYTES:
                self.close()

    def _on_eof(self) -> None:
        state = self.state
        self.eof = True
        if state == C_IDLE or state == C_HEAD or state == C_LINGER:
            self.close()
        elif state == C_BODY:
            # The client went away in the middle of its request body: nothing can complete it.
            self.abort()
        elif state == C_WAIT:
            # A half-close after complete requests is legal (HTTP/1.0 style, or `nc` piping pipelined
            # requests): answer every complete request received before it, then close.
            self._pause_reading()
        elif state == C_TUNNEL:
            self._pause_reading()
            self.tunnel_progress()

    def _head_started(self) -> None:
        self._to(C_HEAD)
        now = self.reactor.now
        self.head_start = now
        self._arm(now + self.srv.header_timeout)

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
        srv = self.srv
        try:
            req = parse_request_head(head)
            if req.method == b"CONNECT":
                # A reverse proxy does not open tunnels to arbitrary hosts.
                raise ProtocolError(501, "CONNECT is not supported")
            if req.framing == LENGTH and srv.max_body_bytes and req.length > srv.max_body_bytes:
                raise ProtocolError(413, "Content-Length %d over max_body_bytes" % req.length)
        except ProtocolError as exc:
            self._reject(exc)
            return
        self.req = req
        self.resp_started = False
        self.close_after = not req.keep_alive or srv.draining
        self.tried = None
        self.timeouts = 0
        self.addr_retries = 0
        now = self.reactor.now
        if req.framing == NO_BODY or (req.framing == LENGTH and req.length == 0):
            self._to(C_WAIT)
        else:
            self._to(C_BODY)
            self.body_left = req.length
            self.last_read = now
            when = now + srv.body_timeout
            if self.timer_when > when:
                self._arm(when)
            self.decoder = (ChunkedDecoder(srv.max_body_bytes, srv.max_header_bytes, 400)
                            if req.framing == CHUNKED else None)
        pool = srv.pool
        backend = pool.choose(req, self.client_ip) if pool.limited else pool.strategy.choose(req, self.client_ip)
        if backend is None:
            if pool.limited and pool.all_full():
                self._enqueue()
            else:
                # No backend is up (health checks, ejections, or none configured).
                self._reply_error(503)
            return
        self._dispatch(backend)

    def _dispatch(self, backend: Backend) -> None:
        """Send the request to ``backend``: over an idle pooled connection if it has one."""
        req = self.req
        assert req is not None
        self.req_bytes = data = upstream_request_head(req, self.client_ip_b, self.suffix, backend.host_header)
        # An idle pooled connection (most recently used first), or a new one.
        up = _take_idle(backend)
        if up is not None:
            self.upstream = up
            up.send_request(self, data)
        else:
            self._send_to(backend, data, len(data), True)
        if self.state == C_BODY and self.inbuf.buf:
            self._body_data(self.inbuf.take())

    def _enqueue(self) -> None:
        """Every eligible backend is at max_connections: wait for a slot (FIFO), up to queue_timeout.
        Reading pauses meanwhile: a body stays in the kernel's buffers, not ours."""
        srv = self.srv
        now = self.queued_at = self.reactor.now
        srv.pool.queue.append(self)
        self._pause_reading()
        self._arm(now + srv.queue_timeout)

    def dequeue(self) -> bool:
        """Called by the balancer when a backend slot may be free: take it if so. Returns False when
        this request must keep waiting."""
        req = self.req
        if req is None or not self.queued_at:
            return True
        backend = self.srv.pool.choose(req, self.client_ip)
        if backend is None:
            return False
        self.queued_at = 0.0
        self._dispatch(backend)
        if self.state == C_BODY:
            self.resume_for_upstream()
        return True

    def _leave_queue(self) -> None:
        if self.queued_at:
            self.queued_at = 0.0
            try:
                self.srv.pool.queue.remove(self)
            except ValueError:
                pass

    def _send_to(self, backend: Backend, pending: Union[bytes, Deque[Chunk]], nbytes: int, fresh: bool) -> None:
        """Hand the request (its bytes so far) to a connection to ``backend``: a new one if ``fresh``,
        else an idle pooled one if there is one."""
        if not fresh:
            idle_up = _take_idle(backend)
            if idle_up is not None:
                self.upstream = idle_up
                idle_up.send_request(self, pending if isinstance(pending, bytes) else b"".join(pending))
                return
        try:
            up = UpstreamConn(self.srv, backend)
        except OSError as exc:
            # No socket for it (EMFILE...): nothing was sent; answer now.
            log.error("backend %s: cannot open a connection: %s", backend.name, exc)
            self._reply_error(502)
            return
        self.upstream = up
        up.attach(self, pending, nbytes)

    def _body_data(self, data: bytes) -> None:
        """Request body bytes from the client: frame them for upstream; keep what follows the body."""
        up = self.upstream
        decoder = self.decoder
        if decoder is None:
            left = self.body_left
            if len(data) <= left:
                piece = data
                rest = b""
            else:
                piece = data[:left]
                rest = data[left:]
            self.body_left = left - len(piece)
            if up is not None:
                up.write_body(piece)
                if self.state != C_BODY:
                    return
            if self.body_left:
                return
        else:
            pieces: List[bytes] = []
            try:
                used = decoder.feed(data, pieces)
            except ProtocolError as exc:
                self._request_body_error(exc)
                return
            out: List[Chunk] = []
            for p in pieces:
                out.append(chunk_header(len(p)))
                out.append(p)
                out.append(CRLF)
            if decoder.done:
                out.append(b"0\r\n%s\r\n" % decoder.trailers)
            if up is not None and out:
                up.write_body(b"".join(out) if len(out) > 1 else out[0])
                if self.state != C_BODY:
                    return
            if not decoder.done:
                return
            rest = data[used:]
        # The request is complete: from now on a response is due (backend_timeout).
        if rest:
            self.inbuf.buf += rest
        self.decoder = None
        self._to(C_WAIT)
        if up is not None:
            up.request_sent()
        if up is None:
            # The response already came and went (the backend answered early): no keep-alive.
            self.close_after = True
        if len(self.inbuf.buf) > self.srv.pipeline_limit:
            self.paused_for_pipeline = True
            self._pause_reading()

    def _request_body_error(self, exc: ProtocolError) -> None:
        """The client's chunked body is malformed (or too large) mid-stream."""
        log.debug("client %s: bad request body: %s", self.client_ip, exc)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        if self.resp_started:
            self.abort()
        else:
            self._write_error(exc.status)

    # ---- responses (called by the upstream connection) --------------------------------------------
    def response_head(self, resp: ResponseHead) -> "tuple[bytes, int]":
        """The client-side head for a final response, and the framing of the body sent to the client."""
        req = self.req
        assert req is not None
        framing = resp.framing
        if framing == CHUNKED or framing == CLOSE_DELIMITED:
            if req.minor == 1:
                framing = CHUNKED
            else:
                # RFC 9112 §7: no chunked to an HTTP/1.0 client; the close marks the end.
                framing = CLOSE_DELIMITED
                self.close_after = True
        if self.state == C_BODY or self.srv.draining:
            # A final answer before the whole request arrived: the connection cannot be reused.
            self.close_after = True
        self.resp_started = True
        self.srv.status_counts[resp.status] += 1
        return client_response_head(resp, framing, self.close_after, req.minor), framing

    def interim_response(self, head: bytes) -> None:
        """A 1xx other than 101: RFC 9110 §15.2 has proxies forward it, except to HTTP/1.0 clients."""
        req = self.req
        if req is not None and req.minor == 1:
            self.write(head)

    def response_done(self) -> None:
        """The upstream wrote the last byte of the response into our queue (and let go of us)."""
        self.upstream = None
        self.req = None
        if self.state == C_CLOSED:
            return
        if self.state == C_BODY:
            # The request body is still coming: nothing can follow on this connection.
            self._finish(True)
            return
        if self.close_after or (self.eof and not self.inbuf.buf):
            self._finish(False)
            return
        self.state = C_IDLE  # C_WAIT -> C_IDLE (the only way here)
        now = self.idle_since = self.reactor.now
        when = now + self.srv.client_timeout
        if self.timer_when > when:
            self._arm(when)
        if self.paused_for_pipeline:
            self.paused_for_pipeline = False
            self._resume_reading()
        if self.inbuf.buf:
            self._process_input()

    def start_tunnel(self, up: UpstreamConn, head_and_data: bytes) -> None:
        """The backend switched protocols: from now on bytes flow both ways untouched."""
        self._to(C_TUNNEL)
        self.resp_started = True
        self.srv.status_counts[101] += 1
        self.last_read = self.reactor.now
        self.write(head_and_data)
        if self.inbuf.buf:
            up.write(self.inbuf.take())
        if self.paused_for_pipeline:
            self.paused_for_pipeline = False
            self._resume_reading()
        self._arm(self.reactor.now + self.srv.tunnel_timeout)

    def upstream_failed(self, up: UpstreamConn, why: int, pending: Optional[Deque[Chunk]],
                        nbytes: int) -> None:
        """The upstream connection failed (it has closed itself and released its backend slot)."""
        self.upstream = None
        srv = self.srv
        backend = up.backend
        if self.resp_started:
            # The head is out: the only honest signal left is to close without completing the body.
            self.abort_after_flush()
            return
        req = self.req
        if req is None or self.state >= C_TUNNEL:
            self.abort()
            return
        if why == F_CONNECT_REFUSED or why == F_CONNECT_TIMEOUT:
            if pending is not None and self.addr_retries < len(backend.addrs) - 1 and backend.next_address():
                # A host name with several addresses: the next one first (it does not count as a retry).
                self.addr_retries += 1
                log.info("backend %s: trying its next address %s", backend.name, backend.sockaddr[0])
                self._send_to(backend, pending, nbytes, True)
                return
            # Nothing reached a backend: the unsent bytes can go to another one.
            tried = self.tried
            if tried is None:
                tried = self.tried = []
            tried.append(backend)
            if why == F_CONNECT_TIMEOUT:
                self.timeouts += 1
            if len(tried) <= srv.retries:
                other = srv.pool.choose(req, self.client_ip, tried)
                if other is not None and pending is not None:
                    log.info("connect to %s failed, retrying on %s", backend.name, other.name)
                    self._send_to(other, pending, nbytes, False)
                    return
            # RFC 9110 §15.6.5: every try timed out -> 504; otherwise nothing could be connected -> 502.
            self._reply_error(504 if self.timeouts == len(tried) else 502)
        elif why == F_STALE and req.idempotent and req.framing == NO_BODY:
            # A pooled connection the backend had already closed: resend on a fresh one.
            self._send_to(backend, self.req_bytes, len(self.req_bytes), True)
        elif why == F_TIMEOUT:
            self._reply_error(504)
        elif why == F_INTERNAL:
            self._reply_error(500)
        else:
            self._reply_error(502)

    # ---- answers balrs makes itself ---------------------------------------------------------------
    def _reject(self, exc: ProtocolError) -> None:
        """A request balrs refuses before it goes anywhere: answer and close (its framing is unknown)."""
        log.debug("client %s: %s", self.client_ip, exc)
        self._write_error(exc.status)

    def _write_error(self, status: int) -> None:
        req = self.req
        self.srv.status_counts[status] += 1
        self.write(error_response(status, True, req is not None and req.method == b"HEAD"))
        self.req = None
        self._finish(True)

    def _reply_error(self, status: int) -> None:
        """An error answer to a parsed request (no backend, 502, 504). The connection stays usable when
        the whole request was read and the client wants keep-alive."""
        req = self.req
        assert req is not None
        if self.state == C_BODY:
            self.close_after = True
        self.srv.status_counts[status] += 1
        self.resp_started = True
        self.write(error_response(status, self.close_after, req.method == b"HEAD"))
        self.response_done()

    # ---- flow control --------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._set_events(self.events & ~EVENT_READ)

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.paused_for_pipeline and self.state != C_CLOSED:
            self.reading = True
            self._set_events(self.events | EVENT_READ)

    def _queue_started(self) -> None:
        now = self.last_write = self.reactor.now
        when = now + self.srv.send_timeout
        if self.timer_when > when:
            self._arm(when)

    def pause_for_upstream(self) -> None:
        """The upstream's queue is full: stop reading body (or tunnel) bytes from the client."""
        self._pause_reading()

    def resume_for_upstream(self) -> None:
        state = self.state
        if (state == C_BODY or state == C_TUNNEL) and not self.reading:
            # Not reading was our choice, not the client's silence: its clock restarts now.
            now = self.last_read = self.reactor.now
            self._resume_reading()
            if state == C_BODY:
                self._arm(now + self.srv.body_timeout)

    def _high_water(self) -> None:
        up = self.upstream
        if up is not None:
            up.pause_reading()

    def _low_water(self) -> None:
        up = self.upstream
        if up is not None:
            up.resume_reading()

    def _drained(self) -> None:
        state = self.state
        if state == C_LINGER:
            self._shutdown_write()
        elif state == C_TUNNEL:
            self.tunnel_progress()
        else:
            self._low_water()

    def _write_failed(self, exc: OSError) -> None:
        # EPIPE/ECONNRESET: the client is gone; nothing more can be delivered. The close happens from
        # the loop, not inside the write: the code that wrote (often the upstream side, in the middle of
        # its own bookkeeping) finishes its step on a connection that is still whole (asyncio's
        # transports defer connection_lost the same way).
        if not self.broken:
            self.broken = True
            self.out.clear()
            self.out_bytes = 0
            self._set_events(0)
            self.reading = False
            self.reactor.call_soon(self.abort)

    # ---- timers --------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.timer = None
        try:
            self._timer_fired()
        except Exception:
            self.internal_error()

    def _timer_fired(self) -> None:
        srv = self.srv
        now = self.reactor.now
        state = self.state
        if self.queued_at:
            deadline = self.queued_at + srv.queue_timeout
            if now >= deadline:
                # HAProxy answers 503 when `timeout queue` expires.
                self._leave_queue()
                self._reply_error(503)
                return
            self._arm(deadline)
            return
        if state == C_IDLE:
            deadline = self.idle_since + srv.client_timeout
            if now >= deadline:
                # RFC 9112 §9.3: an idle connection may be closed at any time; silently.
                self.close()
                return
        elif state == C_HEAD:
            deadline = self.head_start + srv.header_timeout
            if now >= deadline:
                self._write_error(408)
                return
        elif state == C_BODY:
            if self.reading:
                # The client went quiet in the middle of its request body (nginx client_body_timeout).
                deadline = self.last_read + srv.body_timeout
                if now >= deadline:
                    if self.resp_started:
                        self.abort()
                    else:
                        up = self.upstream
                        if up is not None:
                            self.upstream = None
                            up.close()
                        self._write_error(408)
                    return
            else:
                # Paused by backpressure: the upstream's timer watches the backend meanwhile.
                deadline = now + srv.check_interval
        elif state == C_WAIT:
            if self.out_bytes:
                # The client stopped reading its response (nginx send_timeout).
                deadline = self.last_write + srv.send_timeout
                if now >= deadline:
                    self.abort()
                    return
            else:
                deadline = now + srv.check_interval
        elif state == C_TUNNEL:
            last = max(self.last_read, self.last_write)
            up = self.upstream
            if up is not None:
                last = max(last, up.last_active)
            deadline = last + srv.tunnel_timeout
            if now >= deadline:
                self.abort()
                return
        elif state == C_LINGER:
            if self.out_bytes:
                deadline = self.last_write + srv.send_timeout
            else:
                deadline = self.linger_start + LINGER_TIMEOUT
            if now >= deadline:
                self.close()
                return
        else:
            return
        self._arm(deadline)

    # ---- closing -------------------------------------------------------------------------------
    def _finish(self, linger: bool) -> None:
        """Close once the queued bytes are out. With ``linger``, half-close first and keep discarding
        what the client still sends for a while, so our answer is not lost to a reset."""
        if self.state == C_CLOSED:
            return
        self._to(C_LINGER)
        self.linger = linger
        self.linger_start = self.reactor.now
        self.paused_for_pipeline = False
        if linger and not self.reading and not self.eof:
            self.reading = True
            self._set_events(self.events | EVENT_READ)
        if not self.out:
            self._shutdown_write()
        else:
            self._arm(self.reactor.now + self.srv.client_timeout)

    def _shutdown_write(self) -> None:
        """The last byte is out: close, or half-close and linger."""
        if not self.linger or self.eof:
            self.close()
            return
        self._shutdown_wr()
        self.linger_start = self.reactor.now
        self._arm(self.linger_start + LINGER_TIMEOUT)

    def abort_after_flush(self) -> None:
        """Stop everything; deliver what is queued, then close (a truncated response stays visibly
        truncated: no more bytes, no final chunk)."""
        if self.state == C_CLOSED:
            return
        if self.state != C_LINGER:
            self._to(C_LINGER)
        self.linger_start = self.reactor.now
        self.linger = False
        if not self.out:
            self.close()
        else:
            self._pause_reading()
            self._arm(self.reactor.now + self.srv.client_timeout)

    def tunnel_progress(self) -> None:
        """After an end-of-stream or a drained queue in a tunnel: pass each side's FIN on once what it
        sent is delivered (half-close), and close both when both are done."""
        up = self.upstream
        if up is None:
            self.abort_after_flush()
            return
        if up.peer_eof and not self.out:
            self._shutdown_wr()
        if self.eof and not up.out:
            up._shutdown_wr()
        if self.eof and up.peer_eof and not self.out and not up.out:
            self.close()
        else:
            self._low_water()

    def drain(self) -> None:
        """Graceful stop: an idle connection closes now; one with a request in progress closes after
        its response (which says ``Connection: close`` if its head is not out yet)."""
        state = self.state
        if state == C_IDLE or state == C_HEAD:
            self.close()
        elif state == C_BODY or state == C_WAIT:
            self.close_after = True

    def abort(self) -> None:
        """Close both sides now (one fatal-error path: STYLE habit 9)."""
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        self.close()

    def close(self) -> None:
        if self.state == C_CLOSED:
            return
        self._leave_queue()
        self.state = C_CLOSED
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()
        self.reading = False
        self._close_socket()
        self.srv.client_closed(self)


def _readable_poll(fd: int) -> select.poll:
    """A poll object watching ``fd`` for anything to read (bytes, FIN or reset), for a no-wait check."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p


def _take_idle(backend: Backend) -> Optional[UpstreamConn]:
    """An idle pooled connection to ``backend`` (most recently used first) that is safe to reuse, or
    None. One that holds unread bytes (a backend that sent more than its response said) or that the
    backend closed is closed instead: the next request on it would be answered with those bytes."""
    idle = backend.idle
    while idle:
        up, _ = idle.popitem()
        if up.state == U_IDLE:
            if not up.peek_poll.poll(0):  # up.clean(), inlined: this runs for every pooled request
                return up
            log.debug("backend %s: idle connection not reused: unread bytes or closed by the backend",
                      backend.name)
            up.close()
    return None


class UpstreamConn(_Stream):
    """One connection to a backend: sends a request, relays the response, then goes back to its
    backend's idle pool (or closes)."""

    __slots__ = (
        "backend", "client", "hbuf", "framing", "out_framing", "body_left", "decoder", "keep", "reused",
        "got_bytes", "last_active", "connect_start", "head_request", "idle_since", "reading", "peer_eof",
        "connect_error", "sent_at", "read_full", "peek_poll",
    )

    def __init__(self, srv: Balancer, backend: Backend) -> None:
        sock = socket.socket(backend.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        self._init_stream(srv, sock)
        now = self.reactor.now
        self.backend = backend
        self.client: Optional[ClientConn] = None
        self.hbuf = HeadBuffer(srv.max_response_head, RESPONSE)
        self.framing = NO_BODY
        self.out_framing = NO_BODY
        self.body_left = 0
        self.decoder: Optional[ChunkedDecoder] = None
        self.keep = True
        self.reused = False
        self.got_bytes = False
        self.last_active = now
        self.connect_start = now
        self.head_request = False
        self.idle_since = now
        self.reading = True
        self.peer_eof = False
        self.connect_error = 0
        self.sent_at = now
        self.read_full = False   # the last recv() filled its buffer: more bytes may be waiting
        self.peek_poll = _readable_poll(self.fd)  # see clean()
        self.state = U_CONNECTING
        err = sock.connect_ex(backend.sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            # Refused at once (loopback usually is): report it from the loop, like a late failure, so
            # the caller never sees a failure inside attach().
            self.connect_error = err
            srv.reactor.call_soon(self._connect_failed_now)
            return
        self._set_events(EVENT_WRITE)
        self._arm(now + srv.connect_timeout)

    def __repr__(self) -> str:
        return "<UpstreamConn %s state=%d>" % (self.backend.name, self.state)

    def _to(self, state: int) -> None:
        if state not in _UPSTREAM_NEXT[self.state]:
            raise AssertionError("upstream connection: no transition %d -> %d" % (self.state, state))
        self.state = state

    # ---- attaching a request -----------------------------------------------------------------------
    def attach(self, client: ClientConn, pending: Union[bytes, Deque[Chunk]], nbytes: int) -> None:
        """Take on a client's request while connecting: ``pending`` holds its bytes so far (the head,
        or after a failed connect everything that connection did not send)."""
        self.client = client
        backend = self.backend
        backend.active += 1
        backend.requests += 1
        req = client.req
        self.head_request = req is not None and req.method == b"HEAD"
        self.last_active = self.sent_at = self.reactor.now
        if isinstance(pending, bytes):
            self.out.append(pending)
        else:
            self.out = pending
        self.out_bytes = nbytes

    def send_request(self, client: ClientConn, data: bytes) -> None:
        """Take on a client's request on this idle pooled connection, and send its head now."""
        self.client = client
        backend = self.backend
        backend.active += 1
        backend.requests += 1
        req = client.req
        self.head_request = req is not None and req.method == b"HEAD"
        self.got_bytes = False
        self.keep = True
        self.framing = NO_BODY
        self.reused = True
        self.state = U_HEAD  # U_IDLE -> U_HEAD
        now = self.last_active = self.sent_at = self.reactor.now
        when = now + self.srv.backend_timeout
        if self.timer_when > when:
            self._arm(when)
        self.write(data)

    def write_body(self, data: Chunk) -> None:
        """Request body bytes; they also count as activity on this exchange."""
        self.last_active = self.reactor.now
        if self.state == U_CONNECTING:
            self.out.append(data)
            self.out_bytes += len(data)
            if self.out_bytes > HIGH_WATER:
                self._high_water()
        elif (self.state == U_HEAD or self.state == U_BODY) and not self.wr_closed:
            self.write(data)
        # After the response (or a failure) further body bytes have nowhere to go.

    def _detach(self) -> Optional[ClientConn]:
        client = self.client
        if client is not None:
            self.client = None
            backend = self.backend
            backend.active -= 1
            if backend.max_connections and self.srv.pool.queue:
                self.srv.pump_queue()
        return client

    # ---- events --------------------------------------------------------------------------------
    def _on_io(self, mask: int) -> None:
        try:
            if self.state == U_CONNECTING:
                self._on_connect_event()
                return
            if mask & EVENT_WRITE and self.out:
                if not self._flush():
                    return
            if mask & EVENT_READ and self.events & EVENT_READ:
                self._on_readable()
        except Exception:
            self.internal_error()

    def internal_error(self) -> None:
        """A bug in balrs surfaced as an exception in this connection's callback: fail this exchange
        (500 to the client if nothing was sent yet) without charging the backend, and keep serving."""
        log.exception("internal error on a connection to backend %s", self.backend.name)
        try:
            self._fail(F_INTERNAL, None)
        except Exception:
            log.exception("internal error while closing a connection to backend %s", self.backend.name)
            client = self.client
            self.client = None
            self.state = U_CLOSED
            self._close_socket()
            if client is not None:
                client.internal_error()

    def _on_connect_event(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(F_CONNECT_REFUSED, err)
            return
        self._to(U_HEAD)
        now = self.reactor.now
        self.last_active = now
        self._arm(now + self.srv.backend_timeout)
        self._set_events((EVENT_READ if self.reading else 0) | (EVENT_WRITE if self.out else 0))
        if self.out:
            self._flush()

    def _connect_failed_now(self) -> None:
        if self.state == U_CONNECTING:
            self._connect_failed(F_CONNECT_REFUSED, self.connect_error)

    def _connect_failed(self, why: int, err: int) -> None:
        backend = self.backend
        backend.failures += 1
        self.srv.health.failure(backend, "connect")
        log.warning("backend %s (%s): connect failed: %s", backend.name, backend.config.address,
                    "timed out" if why == F_CONNECT_TIMEOUT else errno.errorcode.get(err, str(err)))
        client = self._detach()
        # The unsent bytes go back with the failure, so that they can go to another backend.
        pending, nbytes = self.out, self.out_bytes
        self.out = deque()
        self.out_bytes = 0
        self.state = U_CLOSED
        self._close_socket()
        if client is not None:
            client.upstream_failed(self, why, pending, nbytes)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(UPSTREAM_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._on_eof(True)
            return
        if not data:
            self._on_eof(False)
            return
        self.read_full = len(data) == UPSTREAM_RECV_SIZE
        state = self.state
        self.last_active = self.reactor.now
        if state == U_BODY:
            parts: List[Chunk] = []
            try:
                done = self._relay(data, parts)
            except ProtocolError as exc:
                self._broken_body(exc)
                return
            client = self.client
            if client is not None and parts:
                client.write_parts(parts)
            if done:
                self._response_complete()
        elif state == U_HEAD:
            self._head_data(data)
        elif state == U_TUNNEL:
            client = self.client
            if client is not None:
                client.write(data)
        else:
            # Bytes on an idle pooled connection: the backend broke the protocol. Never reuse it.
            self.close()

    def _head_data(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()
            return
        self.got_bytes = True
        while True:
            try:
                split = self.hbuf.split(data)
                if split is None:
                    return
                head, rest = split
                resp = parse_response_head(head, self.head_request)
            except ProtocolError as exc:
                self._broken_head(str(exc))
                return
            status = resp.status
            if status >= 200:
                break
            if status == 101:
                req = client.req
                if req is None or req.upgrade is None or client.state != C_WAIT:
                    self._broken_head("101 Switching Protocols to a request that did not ask to upgrade")
                    return
                self._start_tunnel(client, resp, rest)
                return
            client.interim_response(head)
            if not rest:
                return
            data = rest
        backend = self.backend
        now = self.reactor.now
        backend.observe(now - self.sent_at, now, status)
        if backend.consecutive_errors:
            self.srv.health.success(backend)
        left = resp.length - len(rest)
        if (resp.framing == LENGTH and not resp.rewrite and left >= 0 and client.state == C_WAIT
                and not client.close_after and len(head) + len(rest) == len(data) and not self.srv.draining):
            req = client.req
            if req is not None and req.minor == 1:
                # The common case, kept to a minimum of work: an HTTP/1.1 Content-Length response with
                # nothing to rewrite, for a keep-alive HTTP/1.1 client. The head goes out as received,
                # together with the body bytes of this read, in one send.
                client.resp_started = True
                self.srv.status_counts[status] += 1
                self.framing = LENGTH
                if not resp.keep_alive:
                    self.keep = False
                client.write(data)
                if left:
                    self.body_left = left
                    self.state = U_BODY  # U_HEAD -> U_BODY
                else:
                    self._response_complete()
                return
        self._response_head(client, resp, head, rest, data)

    def _response_head(self, client: ClientConn, resp: ResponseHead, head: bytes, rest: bytes,
                       data: bytes) -> None:
        client_head, out_framing = client.response_head(resp)
        self.framing = framing = resp.framing
        self.out_framing = out_framing
        if not resp.keep_alive:
            self.keep = False
        if framing == NO_BODY:
            if rest:
                self.keep = False  # bytes after a bodiless response: the backend is confused
            client.write(client_head)
            self._response_complete()
            return
        if framing == LENGTH:
            left = resp.length - len(rest)
            if client_head is head and left >= 0 and len(head) + len(rest) == len(data):
                # The common case: forward what the backend sent as is, head and body in one send.
                client.write(data)
                if left:
                    self.body_left = left
                    self._to(U_BODY)
                else:
                    self._response_complete()
                return
            self.body_left = resp.length
        self._to(U_BODY)
        if framing == CHUNKED:
            self.decoder = ChunkedDecoder(0, self.srv.max_response_head, 502)
        parts: List[Chunk] = [client_head]
        done = False
        if rest:
            try:
                done = self._relay(rest, parts)
            except ProtocolError as exc:
                client.write(client_head)
                self._broken_body(exc)
                return
        elif framing == LENGTH and not self.body_left:
            done = True
        client.write_parts(parts)
        if done:
            self._response_complete()

    def _relay(self, data: bytes, parts: List[Chunk]) -> bool:
        """Frame response body bytes for the client into ``parts``; True when the body is complete."""
        framing = self.framing
        if framing == LENGTH:
            left = self.body_left
            if len(data) < left:
                parts.append(data)
                self.body_left = left - len(data)
                return False
            if len(data) > left:
                self.keep = False  # more bytes than Content-Length: do not trust this connection again
                data = data[:left]
            parts.append(data)
            self.body_left = 0
            return True
        if framing == CHUNKED:
            decoder = self.decoder
            assert decoder is not None
            pieces: List[bytes] = []
            used = decoder.feed(data, pieces)
            if self.out_framing == CHUNKED:
                for p in pieces:
                    parts.append(chunk_header(len(p)))
                    parts.append(p)
                    parts.append(CRLF)
                if decoder.done:
                    parts.append(b"0\r\n%s\r\n" % decoder.trailers)
            else:
                parts.extend(pieces)
            if decoder.done:
                if used < len(data):
                    self.keep = False
                return True
            return False
        # CLOSE_DELIMITED: everything until the backend closes.
        if self.out_framing == CHUNKED:
            parts.append(chunk_header(len(data)))
            parts.append(data)
            parts.append(CRLF)
        else:
            parts.append(data)
        return False

    def _response_complete(self) -> None:
        client = self.client
        backend = self.backend
        if client is not None:
            self.client = None
            backend.active -= 1
            if backend.max_connections and self.srv.pool.queue:
                self.srv.pump_queue()
        self.decoder = None
        idle = backend.idle
        if (self.keep and client is not None and client.state == C_WAIT and not self.out
                and self.framing != CLOSE_DELIMITED and len(idle) < POOL_MAX_IDLE and not self.srv.draining
                and not backend.draining and (not self.read_full or self.clean())):
            # Back to the pool: the request went out whole and the response came in whole. (A read that
            # did not fill its buffer took everything the kernel had, so bytes after the response would
            # have been in it; after a full one, look: a response may end exactly on a read boundary.)
            self.state = U_IDLE  # U_HEAD/U_BODY -> U_IDLE
            now = self.idle_since = self.reactor.now
            idle[self] = None
            if not self.reading:
                self._resume_reading()
            when = now + POOL_IDLE_TIMEOUT
            if self.timer_when > when:
                self._arm(when)
        else:
            self.close()
        if client is not None:
            client.response_done()

    # ---- failures ------------------------------------------------------------------------------
    def _on_eof(self, reset: bool) -> None:
        state = self.state
        if state == U_BODY and self.framing == CLOSE_DELIMITED and not reset:
            # RFC 9112 §6.3 step 8: the close ends the body.
            client = self.client
            if client is not None and self.out_framing == CHUNKED:
                client.write(b"0\r\n\r\n")
            self.keep = False
            self._response_complete()
            return
        if state == U_HEAD:
            if self.reused and not self.got_bytes:
                self._fail(F_STALE, None)
            else:
                self._fail(F_BROKEN, "closed before a complete response head")
            return
        if state == U_BODY:
            self._fail(F_BROKEN, "closed in the middle of the response body")
            return
        if state == U_TUNNEL:
            self.peer_eof = True
            self.pause_reading()
            client = self.client
            if client is None:
                self.close()
            elif reset:
                client.abort_after_flush()
            else:
                client.tunnel_progress()
            return
        self.close()

    def _broken_head(self, why: str) -> None:
        self._fail(F_BROKEN, why)

    def _broken_body(self, exc: ProtocolError) -> None:
        self._fail(F_BROKEN, "bad response body: %s" % exc.message)

    def _fail(self, why: int, message: Optional[str]) -> None:
        backend = self.backend
        if self.state == U_CLOSED:
            return
        if why != F_STALE and why != F_INTERNAL:
            backend.failures += 1
            self.srv.health.failure(backend, "timeout" if why == F_TIMEOUT else "reset")
            log.warning("backend %s: %s", backend.name,
                        message or ("timed out after %gs" % self.srv.backend_timeout))
        client = self._detach()
        self.state = U_CLOSED
        self._close_socket()
        if client is not None:
            client.upstream_failed(self, why, None, 0)

    def _write_failed(self, exc: OSError) -> None:
        # The backend stopped reading (it may have answered early and closed): keep reading what it
        # sent; the read side decides how the exchange ends. Anything that ends the exchange runs from
        # the loop, not inside the write: the client code that wrote finishes its step first.
        self.out.clear()
        self.out_bytes = 0
        self.wr_closed = True
        self._set_events(self.events & ~EVENT_WRITE)
        state = self.state
        if state == U_CONNECTING:
            # Only reached from the connect event itself, where failing at once is safe.
            self._connect_failed(F_CONNECT_REFUSED, exc.errno or errno.ECONNREFUSED)
            return
        if state == U_TUNNEL:
            self.reactor.call_soon(self._tunnel_broken)
        elif state == U_HEAD and self.reused and not self.got_bytes:
            # The pooled connection was already closed by the backend (RST): resend elsewhere.
            self.reactor.call_soon(self._stale_write)
        self._low_water()

    def _tunnel_broken(self) -> None:
        client = self.client
        if client is not None:
            client.abort_after_flush()
        else:
            self.close()

    def _stale_write(self) -> None:
        if self.state == U_HEAD and not self.got_bytes:
            self._fail(F_STALE, None)

    def clean(self) -> bool:
        """True when nothing waits to be read on this connection: no surplus bytes after the response,
        no FIN or reset from the backend. One poll(2) with no timeout on a poll object of this
        connection's own (a MSG_PEEK recv would raise BlockingIOError, several times the cost)."""
        return not self.peek_poll.poll(0)

    # ---- flow control --------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            if self.state != U_CONNECTING:
                self._set_events(self.events & ~EVENT_READ)

    def resume_reading(self) -> None:
        if not self.reading and not self.peer_eof:
            # The pause was ours (a slow client), not the backend's silence: its clock restarts now.
            now = self.last_active = self.reactor.now
            self._resume_reading()
            if self.state == U_HEAD or self.state == U_BODY:
                self._arm(now + self.srv.backend_timeout)

    def _resume_reading(self) -> None:
        self.reading = True
        if self.state != U_CONNECTING and self.state != U_CLOSED:
            self._set_events(self.events | EVENT_READ)

    def request_sent(self) -> None:
        """The client's request is complete: a response is due from now on (backend_timeout)."""
        now = self.last_active = self.reactor.now
        self._arm(now + self.srv.backend_timeout)

    def _queue_started(self) -> None:
        now = self.last_write = self.reactor.now
        self._arm(now + self.srv.backend_timeout)

    def _high_water(self) -> None:
        client = self.client
        if client is not None:
            client.pause_for_upstream()

    def _low_water(self) -> None:
        client = self.client
        if client is not None:
            client.resume_for_upstream()

    def _drained(self) -> None:
        client = self.client
        if self.state == U_TUNNEL and client is not None:
            client.tunnel_progress()
        else:
            self._low_water()

    # ---- tunnels -------------------------------------------------------------------------------
    def _start_tunnel(self, client: ClientConn, resp: ResponseHead, rest: bytes) -> None:
        self._to(U_TUNNEL)
        self.keep = False
        head = client_response_head(resp, NO_BODY, False, 1, keep_upgrade=True)
        self._disarm()  # the client's timer watches the tunnel (tunnel_timeout)
        client.start_tunnel(self, head + rest)

    # ---- timers --------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.timer = None
        try:
            self._timer_fired()
        except Exception:
            self.internal_error()

    def _timer_fired(self) -> None:
        srv = self.srv
        now = self.reactor.now
        state = self.state
        if state == U_CONNECTING:
            deadline = self.connect_start + srv.connect_timeout
            if now >= deadline:
                self._connect_failed(F_CONNECT_TIMEOUT, errno.ETIMEDOUT)
                return
        elif state == U_HEAD or state == U_BODY:
            client = self.client
            if self.out_bytes:
                # The backend does not take the request bytes we have for it.
                deadline = self.last_write + srv.backend_timeout
            elif not self.reading or (client is not None and client.state == C_BODY and state == U_HEAD):
                # Paused because the client is slow to read, or waiting for the rest of the client's
                # request: neither is the backend's silence (the client's timer watches those).
                deadline = now + srv.check_interval
            else:
                deadline = self.last_active + srv.backend_timeout
            if now >= deadline:
                self._fail(F_TIMEOUT, None)
                return
        elif state == U_IDLE:
            deadline = self.idle_since + POOL_IDLE_TIMEOUT
            if now >= deadline:
                self.close()
                return
        else:
            return
        self._arm(deadline)

    def close(self) -> None:
        if self.state == U_CLOSED:
            return
        if self.state == U_IDLE:
            self.backend.idle.pop(self, None)
        self.state = U_CLOSED
        self._detach()
        self._close_socket()
