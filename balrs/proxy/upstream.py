"""The upstream side: one connection to a backend, as a protocol on a :class:`~balrs.transport.Transport`.

It sends a request (head, then body bytes as the client side hands them over), parses the response,
frames its body for the client (``http.framing``), then goes back to its backend's idle pool or
closes. One state variable, changed only through ``_to`` and the ``_UPSTREAM_NEXT`` table; one timer
(the transport's), re-armed lazily: the timer works out which deadline of the current state passed.
It knows the client side only as the exchange's :class:`~balrs.proxy.exchange.Downstream`.
"""

from __future__ import annotations

import errno
import logging
import select
from typing import TYPE_CHECKING, Deque, List, Optional, Union

from ..http.build import client_response_head
from ..http.chunked import ChunkedDecoder
from ..http.errors import ProtocolError
from ..http.framing import BodyRelay
from ..http.heads import (
    CHUNKED, CLOSE_DELIMITED, LENGTH, NO_BODY, RESPONSE, HeadBuffer, ResponseHead, match_response_head,
    response_from_match, simple_response,
)
from ..transport import SPLICE_FULL, SPLICE_OFF, Chunk, Protocol, connect
from ..limits import RETRY_STATUS
from .exchange import (
    F_BROKEN, F_CONNECT_REFUSED, F_CONNECT_TIMEOUT, F_EMPTY, F_INTERNAL, F_STALE, F_TIMEOUT, Downstream, Exchange,
    ProxyContext,
)

if TYPE_CHECKING:
    from ..pool import Backend
    from ..settings import Settings

__all__ = ["UpstreamConn", "UPSTREAM_RECV_SIZE", "POOL_IDLE_TIMEOUT", "readable_poll"]

log = logging.getLogger("balrs")

# Bytes read per recv() from a backend. recv(n) allocates n bytes first; at 128 KiB and above glibc's
# malloc maps and unmaps fresh pages for every read (measured: ~30 us per recv instead of ~5), so reads
# stay below its mmap threshold.
UPSTREAM_RECV_SIZE = 65536
# A Content-Length body with at least this much left after the response head's read is spliced
# (backend -> pipe -> client in the kernel, Linux): below it, the recv/send pair costs no more.
SPLICE_MIN = 65536
# Idle pooled connections are closed after this long unused (nginx keepalive_timeout 60s; HAProxy
# pool-purge-delay 5s). How many a backend keeps: connpool.POOL_MAX_IDLE.
POOL_IDLE_TIMEOUT = 30.0

# ---- states --------------------------------------------------------------------------------------
U_CONNECTING = 0  # non-blocking connect in progress: connect_timeout
U_HEAD = 1        # request (being) sent, waiting for the response head: backend_timeout of silence
U_BODY = 2        # relaying the response body: backend_timeout of silence
U_IDLE = 3        # in its backend's idle pool
U_TUNNEL = 4      # after a 101
U_CLOSED = 5

_UPSTREAM_NEXT = {
    U_CONNECTING: frozenset([U_HEAD, U_CLOSED]),
    U_HEAD: frozenset([U_BODY, U_IDLE, U_TUNNEL, U_CLOSED]),
    U_BODY: frozenset([U_IDLE, U_CLOSED]),
    U_IDLE: frozenset([U_HEAD, U_CLOSED]),
    U_TUNNEL: frozenset([U_CLOSED]),
    U_CLOSED: frozenset(),
}

# Transitions the hot path makes by assignment, from a source state it knows: each is checked
# against the table here, once, instead of on every request.
_HOT_TRANSITIONS = ((U_IDLE, U_HEAD), (U_HEAD, U_IDLE), (U_BODY, U_IDLE))
for _a, _b in _HOT_TRANSITIONS:
    if _b not in _UPSTREAM_NEXT[_a]:
        raise AssertionError("upstream connection: no transition %d -> %d" % (_a, _b))


def readable_poll(fd: int) -> select.poll:
    """A poll object watching ``fd`` for anything to read (bytes, FIN or reset), for a no-wait check."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return p


class UpstreamConn(Protocol):
    """One connection to a backend (see the module docstring)."""

    __slots__ = (
        "ctx", "settings", "tr", "backend", "ex", "down", "hbuf", "body", "keep", "reused", "got_bytes", "last_active",
        "connect_start", "head_request", "idle_since", "peer_eof", "sent_at", "read_full", "peek_poll",
        "state", "splicing", "__weakref__",
    )

    # A backend may answer early and close its reading side: keep reading what it sent.
    read_after_write_error = True

    def __init__(self, ctx: ProxyContext, backend: Backend, settings: Settings, preamble: bytes = b"") -> None:
        """Start connecting to ``backend`` (over TLS if it has a connector; ``preamble``, a PROXY protocol
        header, first). Raises OSError when no socket can be made (EMFILE)."""
        self.ctx = ctx
        # The settings of the exchange it serves (the client side's: a reload applies from the next
        # request on).
        self.settings = settings
        now = ctx.reactor.now
        self.backend = backend
        self.ex: Optional[Exchange] = None
        self.down: Optional[Downstream] = None
        self.hbuf = HeadBuffer(settings.max_response_head, RESPONSE)
        self.body: Optional[BodyRelay] = None
        # A connection that began with a PROXY header names one client: it is never pooled for another
        # (HAProxy keeps such connections private to their client session).
        self.keep = not preamble
        self.reused = False
        self.got_bytes = False
        self.last_active = now
        self.connect_start = now
        self.head_request = False
        self.idle_since = now
        self.peer_eof = False
        self.sent_at = now
        self.read_full = False   # the last recv() filled its buffer: more bytes may be waiting
        self.splicing = False    # the body goes backend -> pipe -> client in the kernel (readable())
        self.state = U_CONNECTING
        self.tr = tr = connect(ctx.reactor, backend.family, backend.sockaddr, self, UPSTREAM_RECV_SIZE,
                               tls=backend.tls, preamble=preamble)
        self.peek_poll = readable_poll(tr.fd)  # the idle pool looks with it before reuse
        tr.arm(now + settings.connect_timeout)

    def __repr__(self) -> str:
        return "<UpstreamConn %s state=%d>" % (self.backend.name, self.state)

    def _to(self, state: int) -> None:
        if state not in _UPSTREAM_NEXT[self.state]:
            raise AssertionError("upstream connection: no transition %d -> %d" % (self.state, state))
        self.state = state

    # ---- taking a request on -------------------------------------------------------------------------
    def attach(self, ex: Exchange, down: Downstream, pending: Union[bytes, Deque[Chunk]], nbytes: int) -> None:
        """Take on a request while connecting: ``pending`` holds its bytes so far (the head, or after a
        failed connect everything that connection did not send)."""
        self.ex = ex
        self.down = down
        self.settings = down.settings
        ex.take(self.backend)
        req = ex.req
        self.head_request = req is not None and req.method == b"HEAD"
        self.last_active = self.sent_at = self.ctx.reactor.now
        self.tr.queue(pending, nbytes)

    def send_request(self, ex: Exchange, down: Downstream, data: bytes) -> None:
        """Take on a request on this idle pooled connection, and send its head now."""
        self.ex = ex
        self.down = down
        self.settings = settings = down.settings
        ex.take(self.backend)
        req = ex.req
        self.head_request = req is not None and req.method == b"HEAD"
        now = self.last_active = self.sent_at = ex.t_connected = self.ctx.reactor.now
        self.got_bytes = False
        self.keep = True
        self.body = None
        self.reused = True
        self.state = U_HEAD  # U_IDLE -> U_HEAD (an idle pooled connection): in _HOT_TRANSITIONS
        tr = self.tr
        when = now + settings.backend_timeout
        if when < tr.timer_when:
            tr.arm(when)
        tr.write(data)

    def write_body(self, data: Chunk) -> None:
        """Request body bytes; they also count as activity on this exchange."""
        self.last_active = self.ctx.reactor.now
        state = self.state
        if state == U_CONNECTING or state == U_HEAD or state == U_BODY:
            self.tr.write(data)
        # After the response (or a failure) further body bytes have nowhere to go.

    def request_sent(self) -> None:
        """The client's request is complete: a response is due from now on (backend_timeout)."""
        now = self.last_active = self.ctx.reactor.now
        self.tr.arm(now + self.settings.backend_timeout)

    def _detach(self) -> Optional[Downstream]:
        """Let go of the exchange (its backend slot frees)."""
        down = self.down
        ex = self.ex
        if self.splicing:
            self._stop_splicing()
        if ex is not None:
            self.ex = None
            self.down = None
            ex.release()
        return down

    # ---- connecting ------------------------------------------------------------------------------
    def connection_made(self) -> None:
        self._to(U_HEAD)
        now = self.last_active = self.ctx.reactor.now
        ex = self.ex
        if ex is not None:
            ex.t_connected = now
        self.tr.arm(now + self.settings.backend_timeout)

    def connect_failed(self, err: int, reason: str = "") -> None:
        self._connect_failed(F_CONNECT_REFUSED, err, reason)

    def _connect_failed(self, why: int, err: int, reason: str = "") -> None:
        backend = self.backend
        backend.record_failure()
        self.ctx.outliers.failure(backend, "connect")
        log.warning("backend %s (%s): connect failed: %s", backend.name, backend.config.address,
                    "timed out" if why == F_CONNECT_TIMEOUT else reason or errno.errorcode.get(err, str(err)))
        down = self._detach()
        # The unsent bytes go back with the failure, so that they can go to another backend.
        pending, nbytes = self.tr.take_queue()
        self._to(U_CLOSED)
        self.tr.close()
        if down is not None:
            down.upstream_failed(why, pending, nbytes)

    # ---- reading -----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.read_full = len(data) == UPSTREAM_RECV_SIZE
        state = self.state
        self.last_active = self.ctx.reactor.now
        if state == U_BODY:
            parts: List[Chunk] = []
            body = self.body
            assert body is not None
            try:
                used = body.feed(data, parts)
            except ProtocolError as exc:
                self._broken_body(exc)
                return
            down = self.down
            if down is not None and parts:
                out = parts[0] if len(parts) == 1 else b"".join(parts)
                ex = self.ex
                if ex is not None:
                    ex.bytes_out += len(out)
                down.tr.write(out)
            if body.done:
                if used < len(data):
                    self.keep = False  # more bytes than the body: do not trust this connection again
                self._response_complete()
        elif state == U_HEAD:
            self._head_data(data)
        elif state == U_TUNNEL:
            down = self.down
            if down is not None:
                down.write(data)
        else:
            # Bytes on an idle pooled connection: the backend broke the protocol. Never reuse it.
            self.close()

    def _head_data(self, data: bytes) -> None:
        down = self.down
        ex = self.ex
        if down is None or ex is None:
            self.close()
            return
        self.got_bytes = True
        head_request = self.head_request
        resp: Optional[ResponseHead]
        while True:
            try:
                split = self.hbuf.split(data)
                if split is None:
                    return
                head, rest = split
                m = match_response_head(head)
                simple = simple_response(m, head_request)
                if simple is not None:
                    # The common kind (HTTP/1.1, one Content-Length, nothing hop-by-hop): no
                    # ResponseHead is made unless the fast path below cannot take it.
                    status, length = simple
                    resp = None
                    break
                resp = response_from_match(head, m, head_request)
            except ProtocolError as exc:
                self._fail(F_BROKEN, str(exc))
                return
            status = resp.status
            if status >= 200:
                length = resp.length
                break
            if status == 101:
                req = ex.req
                if req is None or req.upgrade is None or not ex.request_done:
                    self._fail(F_BROKEN, "101 Switching Protocols to a request that did not ask to upgrade")
                    return
                self._start_tunnel(ex, down, resp, rest)
                return
            down.interim_response(head)
            if not rest:
                return
            data = rest
        backend = self.backend
        now = ex.t_response = self.ctx.reactor.now
        backend.observe(now - self.sent_at, now, status)
        if 502 <= status <= 504 and self._bad_answer(ex, down, status):
            if self.state == U_CLOSED:
                return  # discarded: the request went to another backend
        elif backend.consecutive_errors:
            self.ctx.outliers.success(backend)
        if resp is not None and not resp.keep_alive:
            self.keep = False
        left = length - len(rest)
        if ((resp is None or (resp.framing == LENGTH and not resp.rewrite)) and left >= 0 and ex.request_done
                and not down.close_after and len(head) + len(rest) == len(data) and not self.ctx.draining):
            req = ex.req
            if req is not None and req.minor == 1 and ex.request_id is None and ex.edit is None:
                # The common case, kept to a minimum of work: an HTTP/1.1 Content-Length response with
                # nothing to rewrite, for a keep-alive HTTP/1.1 client. The head goes out as received,
                # together with the body bytes of this read, in one send.
                ex.resp_started = True
                ex.status = status
                ex.bytes_out += len(data)
                down.tr.write(data)
                if left:
                    self.body = BodyRelay(LENGTH, LENGTH, left)
                    self._to(U_BODY)
                    if left >= SPLICE_MIN and self.tr.can_splice and down.tr.can_splice:
                        self._start_splicing()
                else:
                    self._response_complete()
                return
        if resp is None:
            resp = response_from_match(head, m, head_request)  # a simple response the fast path could not take
        client_head, out_framing = down.response_head(resp)
        framing = resp.framing
        if framing == NO_BODY:
            if rest:
                self.keep = False  # bytes after a bodiless response: the backend is confused
            down.write(client_head)
            self._response_complete()
            return
        self._to(U_BODY)
        self.body = body = BodyRelay(
            framing, out_framing, resp.length,
            ChunkedDecoder(0, self.settings.max_response_head, 502) if framing == CHUNKED else None)
        parts: List[Chunk] = [client_head]
        if rest:
            try:
                used = body.feed(rest, parts)
            except ProtocolError as exc:
                down.write(client_head)
                self._broken_body(exc)
                return
            if body.done and used < len(rest):
                self.keep = False
        down.write_parts(parts)
        if body.done:
            self._response_complete()
        elif (body.left >= SPLICE_MIN and framing == LENGTH and out_framing == LENGTH and self.tr.can_splice
              and down.tr.can_splice):
            self._start_splicing()

    # ---- splicing: a large Content-Length body that nothing needs to see ---------------------------
    def _start_splicing(self) -> None:
        """From now on the body moves backend -> pipe -> client with splice(2), never copied into
        Python (Linux; both sides plain TCP): the transport calls readable() instead of reading."""
        self.splicing = True
        self.tr.raw_reads(True)

    def _stop_splicing(self) -> None:
        self.splicing = False
        self.tr.raw_reads(False)
        down = self.down
        if down is not None:
            down.tr.splice_done()

    def readable(self) -> None:
        """The backend's socket is readable while splicing: move what it has (up to the body's end) to
        the client's transport."""
        down = self.down
        body = self.body
        ex = self.ex
        if down is None or body is None or ex is None or self.state != U_BODY:
            self._stop_splicing()
            return
        try:
            n = down.tr.splice_from(self.tr.fd, body.left)
        except OSError:  # the backend reset the connection
            self._stop_splicing()
            self.eof_received(True)
            return
        if n > 0:
            self.last_active = self.ctx.reactor.now
            ex.bytes_out += n
            left = body.left = body.left - n
            if not left:
                body.done = True
                # Exactly the body was taken: bytes past it, if the backend sent any, are still in the
                # socket, where the idle pool's poll sees them before reuse.
                self.read_full = False
                self._stop_splicing()
                self._response_complete()
        elif n == 0:
            self._stop_splicing()
            self.eof_received(False)
        elif n == SPLICE_FULL:
            self.tr.pause_reading()  # the client's transport resumes us as it drains (resume_writing)
        elif n == SPLICE_OFF:
            self._stop_splicing()  # the client cannot take spliced bytes: read and write as usual

    def _bad_answer(self, ex: Exchange, down: Downstream, status: int) -> bool:
        """A 502, 503 or 504 from the backend. When the pool's retry_on lists it, it counts as a failure
        of the backend (passive health; True is returned), and if the exchange may be retried the
        response is discarded whole (this connection closes, nothing of it reaches the client) and the
        request goes to another backend."""
        pool = ex.pool_ref
        bit = RETRY_STATUS[status - 502]
        if pool is None or not pool.retry_on & bit:
            return False
        backend = self.backend
        backend.record_failure()
        self.ctx.outliers.failure(backend, str(status))
        other = down.retry_target(bit)
        if other is not None:
            log.debug("backend %s answered %d; retrying on %s", backend.name, status, other.name)
            self.close()
            down.resend(other)
        return True

    def _response_complete(self) -> None:
        ex = self.ex
        down = self.down
        request_done = False
        if ex is not None:
            # Let go of the exchange; its backend slot frees when the client side finishes it, next.
            request_done = ex.request_done
            self.ex = None
            self.down = None
        self.body = None
        backend = self.backend
        ctx = self.ctx
        tr = self.tr
        if (self.keep and request_done and not tr.out_bytes and self.state != U_CLOSED
                and not ctx.draining and not backend.draining
                and not self.read_full and backend.idle.put(self, self.peek_poll)):
            # Back to the pool: the request went out whole and the response came in whole. (A read that
            # did not fill its buffer took everything the kernel had, so bytes after the response would
            # have been in it. After a full one, bytes the backend sent past the response may still be
            # on their way, where no poll sees them yet: such a connection is not reused.)
            self.state = U_IDLE  # U_HEAD/U_BODY -> U_IDLE: in _HOT_TRANSITIONS
            now = self.idle_since = ctx.reactor.now
            if not tr.reading:
                tr.resume_reading()
            when = now + POOL_IDLE_TIMEOUT
            if when < tr.timer_when:
                tr.arm(when)
        else:
            self.close()
        if down is not None:
            down.response_done()

    def clean(self) -> bool:
        """True when nothing waits to be read on this connection: no surplus bytes after the response,
        no FIN or reset from the backend. One poll(2) with no timeout on a poll object of this
        connection's own (a MSG_PEEK recv would raise BlockingIOError, several times the cost)."""
        return not self.peek_poll.poll(0)

    # ---- failures ------------------------------------------------------------------------------
    def eof_received(self, reset: bool) -> None:
        state = self.state
        body = self.body
        if state == U_BODY and body is not None and body.framing == CLOSE_DELIMITED and not reset:
            # RFC 9112 §6.3 step 8: the close ends the body.
            parts: List[Chunk] = []
            body.end_of_stream(parts)
            down = self.down
            if down is not None and parts:
                down.write_parts(parts)
            self.keep = False
            self._response_complete()
            return
        if state == U_HEAD:
            if self.reused and not self.got_bytes:
                self._fail(F_STALE, None)
            elif not self.got_bytes:
                self._fail(F_EMPTY, "closed without sending a response")
            else:
                self._fail(F_BROKEN, "closed before a complete response head")
            return
        if state == U_BODY:
            self._fail(F_BROKEN, "closed in the middle of the response body")
            return
        if state == U_TUNNEL:
            self.peer_eof = True
            self.tr.pause_reading()
            down = self.down
            if down is None:
                self.close()
            elif reset:
                down.abort_after_flush()
            else:
                down.tunnel_progress()
            return
        self.close()

    def _broken_body(self, exc: ProtocolError) -> None:
        self._fail(F_BROKEN, "bad response body: %s" % exc.message)

    def _fail(self, why: int, message: Optional[str]) -> None:
        if self.state == U_CLOSED:
            return
        backend = self.backend
        if why != F_STALE and why != F_INTERNAL:
            backend.record_failure()
            self.ctx.outliers.failure(backend, "timeout" if why == F_TIMEOUT else "reset")
            log.warning("backend %s: %s", backend.name,
                        message or ("timed out after %gs" % self.settings.backend_timeout))
        down = self._detach()
        self._to(U_CLOSED)
        self.tr.close()
        if down is not None:
            down.upstream_failed(why, None, 0)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        """A send failed (the backend stopped reading: it may have answered early and closed). Reading
        goes on; the read side decides how the exchange ends, except in two cases."""
        state = self.state
        if state == U_CONNECTING:
            self._connect_failed(F_CONNECT_REFUSED, getattr(exc, "errno", None) or errno.ECONNREFUSED)
        elif state == U_TUNNEL:
            down = self.down
            if down is not None:
                down.abort_after_flush()
            else:
                self.close()
        elif state == U_HEAD and self.reused and not self.got_bytes:
            # The pooled connection was already closed by the backend (RST): resend elsewhere.
            self._fail(F_STALE, None)
        else:
            self.resume_writing()

    def internal_error(self) -> None:
        """A bug in balrs surfaced as an exception in this connection's callback: fail this exchange
        (500 to the client if nothing was sent yet) without charging the backend, and keep serving."""
        log.exception("internal error on a connection to backend %s", self.backend.name)
        try:
            self._fail(F_INTERNAL, None)
        except Exception:
            log.exception("internal error while closing a connection to backend %s", self.backend.name)
            down = self.down
            self.down = None
            self.ex = None
            if self.state != U_CLOSED:
                self._to(U_CLOSED)
            self.tr.close()
            if down is not None:
                down.abort_after_flush()

    # ---- flow control --------------------------------------------------------------------------
    def pause_reading(self) -> None:
        self.tr.pause_reading()

    def resume_reading(self) -> None:
        tr = self.tr
        if not tr.reading and not self.peer_eof:
            # The pause was ours (a slow client), not the backend's silence: its clock restarts now.
            now = self.last_active = self.ctx.reactor.now
            tr.resume_reading()
            if self.state == U_HEAD or self.state == U_BODY:
                tr.arm(now + self.settings.backend_timeout)

    def write_queued(self) -> None:
        self.tr.arm(self.ctx.reactor.now + self.settings.backend_timeout)

    def pause_writing(self) -> None:
        down = self.down
        if down is not None:
            down.pause_for_upstream()

    def resume_writing(self) -> None:
        down = self.down
        if down is not None:
            down.resume_for_upstream()

    def write_drained(self) -> None:
        down = self.down
        if self.state == U_TUNNEL and down is not None:
            down.tunnel_progress()
        else:
            self.resume_writing()

    @property
    def queued(self) -> int:
        return self.tr.out_bytes

    def shutdown_write(self) -> None:
        self.tr.shutdown_write()

    def write(self, data: Chunk) -> None:
        """Tunnel bytes from the client."""
        self.tr.write(data)

    # ---- tunnels -------------------------------------------------------------------------------
    def _start_tunnel(self, ex: Exchange, down: Downstream, resp: ResponseHead, rest: bytes) -> None:
        self._to(U_TUNNEL)
        self.keep = False
        head = client_response_head(resp, NO_BODY, False, 1, keep_upgrade=True)
        self.tr.disarm()  # the client's timer watches the tunnel (tunnel_timeout)
        ex.resp_started = True
        ex.status = 101
        down.start_tunnel(head + rest)

    # ---- timers --------------------------------------------------------------------------------
    def timer_fired(self) -> None:
        settings = self.settings
        now = self.ctx.reactor.now
        state = self.state
        tr = self.tr
        if state == U_CONNECTING:
            deadline = self.connect_start + settings.connect_timeout
            if now >= deadline:
                self._connect_failed(F_CONNECT_TIMEOUT, errno.ETIMEDOUT)
                return
        elif state == U_HEAD or state == U_BODY:
            ex = self.ex
            if tr.out_bytes:
                # The backend does not take the request bytes we have for it.
                deadline = tr.last_write + settings.backend_timeout
            elif not tr.reading or (ex is not None and not ex.request_done and state == U_HEAD):
                # Paused because the client is slow to read, or waiting for the rest of the client's
                # request: neither is the backend's silence (the client's timer watches those).
                deadline = now + settings.check_interval
            else:
                deadline = self.last_active + settings.backend_timeout
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
        tr.arm(deadline)

    def close(self) -> None:
        if self.state == U_CLOSED:
            return
        if self.state == U_IDLE:
            self.backend.idle.remove(self)
        self._to(U_CLOSED)
        self._detach()
        self.tr.close()

