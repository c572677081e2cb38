"""An in-process proxy rig on a fake clock: a real ``Balancer`` on a ``Reactor(FakeClock())`` whose loop the
test turns by hand, real sockets on 127.0.0.1, and scripted backends on threads.

Time inside balrs comes only from the fake clock: a timeout fires when the test calls
:meth:`Rig.advance`, never because real time passed. Real time is spent only waiting for sockets to
deliver bytes, always bounded by a deadline of a few seconds.

- :class:`ScriptedBackend`: a blocking HTTP/1.1 backend on a thread. For each request it runs
  ``script(request)``, a list of steps: bytes to send, a :class:`Gate` to wait on (the test opens it),
  :data:`CLOSE` (half-close and stop) or :data:`RESET` (close with RST).
- :class:`RefusedPort`: a bound port that is not listening (connects are refused at once).
- :class:`BlackholePort`: a listening port whose accept queue is full, so a SYN is dropped and a
  connect hangs (for ``connect_timeout``).
- :class:`Rig`: the balancer, clients (:class:`Client`) and the loop: :meth:`Rig.turn`,
  :meth:`Rig.turn_until`, :meth:`Rig.advance` / :meth:`Rig.advance_to` (move the fake clock and fire
  what is due; then check that every open connection still has a timer), :meth:`Rig.read_response`,
  :meth:`Rig.read_until_closed`, :meth:`Rig.assert_quiet`.

Typical use (``RigFactory`` stops everything after the test)::

    gate = Gate()
    be = make.backend(lambda req: [gate, ok(b"late")])
    rig = make.rig(be, backend_timeout=10.0)
    c = rig.connect()
    c.send(get("/slow"))
    rig.turn_until(lambda: be.paths == ["/slow"])
    rig.advance_to(rig.upstream_of(c).last_active + 10.0)
    assert rig.read_response(c).status == 504
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from balrs.config import Address, BackendConfig, Config
from balrs.pool import Backend
from balrs.proxy import ClientConn, UpstreamConn
from balrs.proxy.client import C_CLOSED
from balrs.proxy.upstream import U_CLOSED, U_TUNNEL
from balrs.reactor import Reactor
from balrs.server import Balancer

__all__ = [
    "HOST", "FakeClock", "Gate", "CLOSE", "RESET", "Request", "ScriptedBackend", "RefusedPort", "BlackholePort",
    "Client", "Response", "Rig", "RigFactory", "ok", "sized_response", "get", "send_buffer_max",
]

HOST = "127.0.0.1"
# Real-time bound on any wait for bytes in the rig (a loaded 2-core box needs some slack).
REAL_TIMEOUT = 5.0
# How long a backend step may block at most (a gate nobody opens is released by stop()).
BACKEND_STEP_LIMIT = 30.0


def send_buffer_max() -> int:
    """The most a TCP socket's send buffer can grow to (net.ipv4.tcp_wmem max): a transfer must be
    larger than this (and what the windows hold) before balrs itself has to queue and pause."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


class FakeClock:
    """Monotonic time that moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# ---- responses and requests -------------------------------------------------------------------------
def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A whole 200 response with a Content-Length body (``extra``: more header lines, CRLF-terminated)."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def sized_response(total: int, fill: bytes = b"a") -> bytes:
    """A 200 response of exactly ``total`` bytes, head included."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
    n = total - len(head % 0)
    while len(head % n) + n != total:
        n -= 1
    return head % n + fill * n


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n%s\r\n" % (path.encode(), extra)


# ---- backends ---------------------------------------------------------------------------------------
class Gate(threading.Event):
    """A step that blocks the backend until the test opens it (``set()``), or the backend stops."""


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLOSE = _Marker("CLOSE")   # half-close (FIN) and stop serving this connection
RESET = _Marker("RESET")   # close with SO_LINGER 0: the peer sees a reset

Step = Union[bytes, Gate, _Marker]


class Request:
    """One request as a backend received it."""

    __slots__ = ("cid", "method", "path", "headers", "body", "head")

    def __init__(self, cid: int, head: bytes, body: bytes) -> None:
        lines = head.split(b"\r\n")
        method, path, _version = lines[0].split(b" ", 2)
        self.cid = cid
        self.head = head
        self.method = method.decode()
        self.path = path.decode()
        self.headers: Dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            self.headers[k.strip().lower().decode()] = v.strip().decode()
        self.body = body

    def __repr__(self) -> str:
        return "<Request %d %s %s>" % (self.cid, self.method, self.path)


Script = Callable[[Request], Iterable[Step]]


class ScriptedBackend:
    """A blocking HTTP/1.1 backend on threads (one per connection). Reads request heads and
    Content-Length bodies; for each request runs the steps ``script(request)`` returns, then reads the
    next request on the same connection (keep-alive) unless a step ended it. Records every request
    (``heads`` as they arrive, ``requests`` once whole) and counts connections (``conns``)."""

    def __init__(self, script: Script, on_head: Optional[Script] = None, rcvbuf: int = 0,
                 backlog: int = 64) -> None:
        self.script = script
        # Steps to run when a request head has arrived, before its body is read (``req.body`` is
        # empty then): a Gate holds the body back (upload backpressure), bytes answer early
        # (``100 Continue``).
        self.on_head = on_head
        self.requests: List[Request] = []   # whole requests (head and body), in arrival order
        self.heads: List[Request] = []      # request heads, as soon as they arrive (no body)
        self.conns = 0
        self.lsock = socket.socket()
        if rcvbuf:
            # Inherited by accepted sockets: a small window, so a backend that does not read holds
            # back little in the kernel (upload backpressure shows at once).
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.lsock.bind((HOST, 0))
        self.lsock.listen(backlog)
        self.lsock.settimeout(0.1)
        self.port: int = self.lsock.getsockname()[1]
        self.stopped = threading.Event()
        self.socks: List[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def paths(self) -> List[str]:
        return [r.path for r in self.requests]

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.conns += 1
                cid = self.conns
                self.socks.append(s)
            threading.Thread(target=self._serve, args=(s, cid), daemon=True).start()

    def _serve(self, s: socket.socket, cid: int) -> None:
        s.settimeout(BACKEND_STEP_LIMIT)
        buf = b""
        try:
            while not self.stopped.is_set():
                while b"\r\n\r\n" not in buf:
                    data = s.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                chunked = False
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        length = int(v)
                    elif k == b"transfer-encoding" and b"chunked" in v.lower():
                        chunked = True
                early = Request(cid, head, b"")
                with self.lock:
                    self.heads.append(early)
                if self.on_head is not None and not self._run(s, self.on_head(early)):
                    return
                if chunked:
                    body, buf = _read_chunked(s, buf)
                else:
                    while len(buf) < length:
                        data = s.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                req = Request(cid, head, body)
                with self.lock:
                    self.requests.append(req)
                if not self._run(s, self.script(req)):
                    return
        except OSError:
            return
        finally:
            try:
                s.close()
            except OSError:
                pass

    def _run(self, s: socket.socket, steps: Iterable[Step]) -> bool:
        """Run one script's steps; False when the connection is over."""
        for step in steps:
            if isinstance(step, Gate):
                end = time.monotonic() + BACKEND_STEP_LIMIT
                while not step.wait(0.02):
                    if self.stopped.is_set() or time.monotonic() > end:
                        return False
            elif step is CLOSE:
                s.shutdown(socket.SHUT_WR)
                return False
            elif step is RESET:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                return False
            else:
                assert isinstance(step, bytes), step
                s.sendall(step)
        return True

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        except OSError:
            pass
        self.lsock.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in sendall or recv
            except OSError:
                pass
        self.thread.join(2)


def _read_chunked(s: socket.socket, buf: bytes) -> Tuple[bytes, bytes]:
    """Read a chunked body from ``s`` (``buf``: bytes already read): (decoded body, what follows it)."""
    body = b""

    def need(cond: Callable[[bytes], bool]) -> bytes:
        nonlocal buf
        while not cond(buf):
            data = s.recv(65536)
            if not data:
                raise OSError("closed in a chunked body")
            buf += data
        return buf

    while True:
        need(lambda b: b"\r\n" in b)
        line, buf = buf.split(b"\r\n", 1)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            need(lambda b: b.startswith(b"\r\n") or b"\r\n\r\n" in b)
            if buf.startswith(b"\r\n"):
                return body, buf[2:]
            return body, buf.split(b"\r\n\r\n", 1)[1]
        need(lambda b: len(b) >= size + 2)
        body += buf[:size]
        buf = buf[size + 2:]


class RefusedPort:
    """A port bound but not listening: a connect to it is refused at once (RST), and nothing else can
    take the port while this holds it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]

    def stop(self) -> None:
        self.sock.close()


class BlackholePort:
    """A listening port that never completes another handshake: its accept queue (backlog 0) is filled
    by one connection of our own that is never accepted, and Linux drops SYNs to a listener whose
    accept queue is full (tcp_abort_on_overflow = 0), so a connect stays in progress."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port: int = self.sock.getsockname()[1]
        self.filler = socket.create_connection((HOST, self.port), timeout=REAL_TIMEOUT)

    def stop(self) -> None:
        self.filler.close()
        self.sock.close()


# ---- clients ------------------------------------------------------------------------------------------
class Response:
    __slots__ = ("status", "head", "headers", "body")

    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.split(b"\r\n")
        self.head = head
        self.status = int(lines[0].split(b" ")[1])
        self.headers: Dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            self.headers[k.strip().lower().decode()] = v.strip().decode()
        self.body = body

    @property
    def closes(self) -> bool:
        """The response says ``Connection: close``."""
        return "close" in self.headers.get("connection", "").lower()

    def __repr__(self) -> str:
        return "<Response %d %r>" % (self.status, self.body[:40])


class Client:
    """A client socket (non-blocking) with its unread bytes; ``conn`` is balrs' ClientConn for it."""

    def __init__(self, sock: socket.socket, conn: ClientConn) -> None:
        self.sock = sock
        self.conn = conn
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def send(self, data: bytes) -> None:
        """Send a small amount (what the kernel takes at once; see :meth:`Rig.send` for large data)."""
        self.sock.settimeout(REAL_TIMEOUT)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def pull(self, limit: int = 1 << 20) -> int:
        """Read what is there without blocking; returns how many bytes arrived."""
        if self.eof:
            return 0
        try:
            data = self.sock.recv(limit)
        except (BlockingIOError, InterruptedError):
            return 0
        except ConnectionResetError:
            self.eof = self.reset = True
            return 0
        if not data:
            self.eof = True
            return 0
        self.buf += data
        return len(data)

    def take(self, n: Optional[int] = None) -> bytes:
        n = len(self.buf) if n is None else n
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self) -> None:
        self.sock.close()


def _split_response(buf: bytearray, eof: bool, head_request: bool = False) -> Optional[Tuple[bytes, bytes, int]]:
    """A whole response at the start of ``buf``: (head, body, bytes used), or None if incomplete.
    Content-Length, chunked (body returned decoded) and close-delimited bodies; none after HEAD."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end])
    start = end + 4
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        fields[k.strip().lower()] = v.strip().lower()
    if head_request or 100 <= status < 200 or status in (204, 304):
        return head, b"", start
    if b"chunked" in fields.get(b"transfer-encoding", b""):
        pos = start
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # No trailer: the empty line follows at once; else the trailer ends with one.
                if buf[pos:pos + 2] == b"\r\n":
                    return head, bytes(body), pos + 2
                tend = buf.find(b"\r\n\r\n", pos)
                return None if tend < 0 else (head, bytes(body), tend + 4)
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            pos += size + 2
    if b"content-length" in fields:
        n = int(fields[b"content-length"])
        if len(buf) < start + n:
            return None
        return head, bytes(buf[start:start + n]), start + n
    if not eof:
        return None
    return head, bytes(buf[start:]), len(buf)


# ---- the rig ----------------------------------------------------------------------------------------
BackendSpec = Union[int, BackendConfig, Any]   # a port, a config, or anything with ``.port``


class Rig:
    """A Balancer on a fake clock whose loop the test turns; clients are plain sockets on 127.0.0.1.

    ``backends``: ports, objects with ``.port`` (named b1, b2... with weight 1 and
    ``backend_max_connections``), or whole ``BackendConfig`` objects. ``keys``: any other ``Config``
    field (``header_timeout=2.0``, ``retries=0``, ``strategy="least_connections"``...)."""

    def __init__(self, backends: Sequence[BackendSpec], backend_max_connections: int = 0, **keys: Any) -> None:
        configs = []
        for i, spec in enumerate(backends):
            if isinstance(spec, BackendConfig):
                configs.append(spec)
                continue
            port = spec if isinstance(spec, int) else spec.port
            configs.append(BackendConfig("b%d" % (i + 1), Address(HOST, port), 1,
                                         max_connections=backend_max_connections))
        self.clock = FakeClock()
        self.reactor = Reactor(self.clock)
        self.config = Config(path="test.ini", listen=(Address(HOST, 0),), backends=tuple(configs), **keys)
        self.bal = Balancer(self.config, reactor=self.reactor)
        self.bal.listen()
        self.addr = self.bal.listeners[0][0].getsockname()
        self.clients: List[Client] = []

    # ---- what the test looks at ----
    @property
    def backends(self) -> List[Backend]:
        return self.bal.pool.backends

    @property
    def backend(self) -> Backend:
        return self.bal.pool.backends[0]

    @property
    def settings(self) -> Any:
        return self.bal.settings

    def responses(self) -> Dict[int, int]:
        """Responses counted by status (rig.bal.status_counts, the nonzero entries)."""
        return {code: n for code, n in enumerate(self.bal.status_counts) if n}

    def upstream_of(self, client: Client) -> Optional[UpstreamConn]:
        return client.conn.upstream

    def idle_upstreams(self, i: int = 0) -> List[UpstreamConn]:
        return list(self.backends[i].idle)

    # ---- clients ----
    def connect(self, rcvbuf: int = 0, sndbuf: int = 0) -> Client:
        """A new client, accepted by the balancer before this returns. ``rcvbuf``/``sndbuf``: a small
        SO_RCVBUF/SO_SNDBUF (set before connecting; fixed sizes turn autotuning off) so the kernel cannot
        absorb much for a client that is slow to read, or for a pushed upload."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.settimeout(REAL_TIMEOUT)
        sock.connect(self.addr)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        found: List[ClientConn] = []

        def accepted() -> bool:
            for conn in self.bal.clients:
                if conn.tr.sock.getpeername()[1] == port:
                    found.append(conn)
                    return True
            return False

        self.turn_until(accepted)
        client = Client(sock, found[0])
        self.clients.append(client)
        return client

    def send(self, client: Client, data: bytes, real_timeout: float = REAL_TIMEOUT) -> None:
        """Send ``data`` whole, turning the loop meanwhile (for more than the kernel buffers hold)."""
        view = memoryview(data)
        end = time.monotonic() + real_timeout
        while view:
            assert time.monotonic() < end, "could not send; %d bytes left" % len(view)
            try:
                n = client.sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            view = view[n:]
            if view:
                self.turn(0.001)

    def push(self, client: Client, data: memoryview, until: Callable[[], Any],
             real_timeout: float = REAL_TIMEOUT) -> memoryview:
        """Send from ``data`` (non-blocking), turning the loop, until ``until()`` holds and the kernel
        takes no more; returns what is left unsent."""
        end = time.monotonic() + real_timeout
        while data:
            assert time.monotonic() < end, "push: condition not reached"
            try:
                n = client.sock.send(data[:65536])
            except (BlockingIOError, InterruptedError):
                n = 0
            data = data[n:]
            self.turn(0.001 if n else 0.005)
            if not n and until():
                break
        return data

    # ---- the loop ----
    def turn(self, timeout: float = 0.01) -> int:
        """One loop turn as ``Reactor.run`` does it: select (at most ``timeout`` real seconds, none if
        something is due), dispatch ready fds, run deferred callbacks, fire due timers. Exceptions
        propagate (a test should see them). Returns how many fds were ready."""
        reactor = self.reactor
        now = reactor.now = self.clock.now
        if reactor._soon or reactor.corked or reactor.wheel.next_timeout(now) == 0.0:
            timeout = 0.0
        selector = reactor.selector
        events = selector.select(timeout)
        # Dispatch as the loop does: an fd an earlier callback of this batch unregistered is skipped,
        # and the mask is what the fd is registered for now.
        live = getattr(selector, "keys", None)
        registrations = None if isinstance(live, dict) else selector.get_map()
        for key, mask in events:
            if registrations is None:
                current = live.get(key.fd)
                if current is None:
                    continue
                callback, registered = current
            else:
                k = registrations.get(key.fd)
                if k is None:
                    continue
                callback, registered = k.data, k.events
            callback(mask & registered)
        soon = reactor._soon
        while soon:
            batch = soon[:]
            del soon[:]
            for cb in batch:
                cb()
        reactor.wheel.run(now)
        reactor.uncork()  # the end of the turn: corked writes go out
        return len(events)

    def turn_until(self, cond: Callable[[], Any], real_timeout: float = REAL_TIMEOUT, what: str = "") -> None:
        end = time.monotonic() + real_timeout
        while not cond():
            assert time.monotonic() < end, "condition not reached: %s" % (what or cond)
            self.turn()

    def settle(self, turns: int = 5, timeout: float = 0.005) -> None:
        """A few turns with a short real wait each, for bytes in flight to arrive and be handled."""
        for _ in range(turns):
            self.turn(timeout)

    def advance(self, seconds: float) -> None:
        """Move the fake clock ``seconds`` ahead and turn the loop until no timer is due (timers that
        re-arm for a time already passed fire too), then let the I/O they caused go through."""
        assert seconds >= 0
        self.clock.now += seconds
        wheel = self.reactor.wheel
        for _ in range(1000):
            self.turn(0.0)
            if not self.reactor._soon and wheel.next_timeout(self.clock.now) != 0.0:
                break
        else:
            raise AssertionError("timers keep firing at %r" % self.clock.now)
        self.settle(3, 0.002)
        self.assert_timers()

    def advance_to(self, when: float) -> None:
        """:meth:`advance` to the fake time ``when`` exactly (``t0 + timeout``: no float drift from
        adding up steps)."""
        assert when >= self.clock.now, "the fake clock never goes back"
        self.clock.now = when
        self.advance(0.0)

    def assert_timers(self) -> None:
        """Every open connection has a deadline (one timer each; STYLE habit 10): a client connection
        in any state short of closed, an upstream connection unless it tunnels (the client's timer
        watches a tunnel). A connection without one would never time out."""
        for conn in self.bal.clients:
            if conn.state != C_CLOSED:
                assert conn.tr.timer is not None, "client connection without a timer: %r" % conn
            up = conn.upstream
            if up is not None and up.state not in (U_CLOSED, U_TUNNEL):
                assert up.tr.timer is not None, "upstream connection without a timer: %r" % up
        for b in self.backends:
            for up in b.idle:
                assert up.tr.timer is not None, "idle pooled connection without a timer: %r" % up


    # ---- reading ----
    def read_response(self, client: Client, real_timeout: float = REAL_TIMEOUT,
                      head_request: bool = False) -> Response:
        """Turn the loop until one whole response is in ``client``'s buffer; take it out.
        ``head_request``: it answers a HEAD (no body, whatever its Content-Length says)."""
        end = time.monotonic() + real_timeout
        while True:
            got = _split_response(client.buf, client.eof, head_request)
            if got is not None:
                head, body, used = got
                del client.buf[:used]
                return Response(head, body)
            assert not client.eof, "connection closed; got %r" % bytes(client.buf[:300])
            assert time.monotonic() < end, "no complete response; got %r" % bytes(client.buf[:300])
            self.turn()
            while client.pull():
                pass

    def read_at_least(self, client: Client, n: int, real_timeout: float = REAL_TIMEOUT) -> None:
        """Turn the loop until ``client`` holds at least ``n`` unread bytes (they stay in its buffer)."""
        end = time.monotonic() + real_timeout
        while len(client.buf) < n:
            assert not client.eof, "connection closed; got %r" % bytes(client.buf[:300])
            assert time.monotonic() < end, "only %d of %d bytes arrived" % (len(client.buf), n)
            self.turn()
            while client.pull():
                pass

    def read_until_closed(self, client: Client, real_timeout: float = REAL_TIMEOUT) -> bytes:
        """Turn the loop until the balancer closed (or half-closed) the connection; everything unread."""
        end = time.monotonic() + real_timeout
        while not client.eof:
            assert time.monotonic() < end, "connection still open; got %r" % bytes(client.buf[:300])
            self.turn()
            while client.pull():
                pass
        return client.take()

    def assert_quiet(self, client: Client, turns: int = 5) -> None:
        """No new bytes arrive on ``client`` and its connection stays open while the loop turns a few
        times (real time only; the fake clock stands still)."""
        before = len(client.buf)
        self.settle(turns)
        while client.pull():
            pass
        assert len(client.buf) == before, "unexpected bytes: %r" % bytes(client.buf[before:before + 300])
        assert not client.eof, "connection closed"

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.bal.stop()
        self.reactor.close()


class RigFactory:
    """Makes backends and rigs for one test and stops them all afterwards (use from a fixture)."""

    def __init__(self) -> None:
        self.things: List[Any] = []

    def backend(self, script: Script, on_head: Optional[Script] = None, rcvbuf: int = 0) -> ScriptedBackend:
        b = ScriptedBackend(script, on_head, rcvbuf)
        self.things.append(b)
        return b

    def refused(self) -> RefusedPort:
        p = RefusedPort()
        self.things.append(p)
        return p

    def blackhole(self) -> BlackholePort:
        p = BlackholePort()
        self.things.append(p)
        return p

    def rig(self, *backends: BackendSpec, **keys: Any) -> Rig:
        r = Rig(backends, **keys)
        self.things.append(r)
        return r

    def close_all(self) -> None:
        # Rigs first (they close their sockets), then the backends whose threads may be blocked on them.
        for thing in sorted(self.things, key=lambda t: not isinstance(t, Rig)):
            if isinstance(thing, Rig):
                thing.close()
            else:
                thing.stop()
        self.things.clear()
