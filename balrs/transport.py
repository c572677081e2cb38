"""One non-blocking stream over the reactor: what every socket balrs talks on shares.

A ``Transport`` owns one connected (or connecting) stream socket, its one selector registration and
one lazily re-armed deadline timer, and tells its *protocol* what happens, with plain method calls on
the reactor thread (asyncio's transport/protocol split, without the futures):

- ``data_received(data)`` for each read, ``eof_received(reset)`` when the peer closed (FIN) or reset;
- ``connection_made()`` / ``connect_failed(err)`` for an outgoing connection;
- ``write_queued()`` when a write did not go out whole (the peer is slow: a stall clock starts),
  ``pause_writing()`` above ``HIGH_WATER`` queued bytes and ``resume_writing()`` below ``LOW_WATER``
  (stop and restart reading whatever feeds this stream), ``write_drained()`` when the queue is empty;
- ``connection_lost(exc)`` after a send failed (EPIPE, ECONNRESET): the transport has dropped its queue
  and stopped writing, and the protocol hears of it from the loop, never inside the ``write`` that
  failed, so the code that wrote finishes its step on a connection that is still whole (asyncio's
  ``_fatal_error`` defers ``connection_lost`` the same way). This is the one fatal-close path;
- ``timer_fired()`` when the deadline set with :meth:`Transport.arm` passes (the protocol works out
  which deadline of its state that was; the transport fires no later than asked, maybe earlier);
- ``internal_error()`` when one of its callbacks raised: a bug in balrs costs that stream, never the
  loop.

Writes try ``send`` first and only queue (and register for EVENT_WRITE) what the socket did not take;
the queue is written with ``sendmsg`` (gather, up to ``MAX_IOV`` buffers per call). Nothing else in
balrs registers stream sockets with the selector. A TLS transport offers the same interface.

On Linux (Python 3.10+) a plain transport can also take bytes straight from another socket:
``splice_from(fd, n)`` moves them with ``splice(2)`` into a pipe of its own and on to its peer; what
the peer does not take at once stays in the pipe as a ``Piped`` entry of the write queue (counted in
``out_bytes``, written in order with the rest). The reading side stops reading with ``raw_reads(True)``
and is told ``readable()`` instead. The bytes never enter Python.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Tuple, Type, Union
from typing import Protocol as TypingProtocol

from .reactor import EVENT_READ, EVENT_WRITE, IOCallback, Reactor

if TYPE_CHECKING:
    from .timerwheel import Timer

__all__ = ["Transport", "Protocol", "Chunk", "HIGH_WATER", "LOW_WATER", "MAX_IOV", "connect", "Connector", "Acceptor",
           "SPLICE", "SPLICE_WAIT", "SPLICE_FULL", "SPLICE_OFF", "PIPE_SIZE", "Piped"]

Chunk = Union[bytes, memoryview]

# ---- limits (STYLE habit 4) -----------------------------------------------------------------------
# Write queue above which the other side stops being read, and below which it resumes (asyncio's
# transports use 64 KiB / 16 KiB; larger marks keep big transfers at full speed).
HIGH_WATER = 262144
LOW_WATER = 65536
# sendmsg() gathers at most this many queued buffers per call (IOV_MAX is 1024 on Linux).
MAX_IOV = 64
# Writes smaller than this, to an idle stream, wait for the end of the loop turn (corking): what one
# turn writes to a stream goes out in one send, after the turn's other work, so the peers sleeping on
# those sockets are woken once per turn. Larger writes (bodies) go out at once.
CORK_LIMIT = 16384

# timer_when while no timer is set.
_NEVER = float("inf")

# ---- splice (Linux, Python 3.10+): bytes from one socket to another through a pipe, never copied into
# Python. A transport that takes spliced bytes keeps them as a ``Piped`` entry of its write queue, in
# order with the rest.
_splice = getattr(os, "splice", None)
SPLICE = _splice is not None and hasattr(os, "pipe2")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# The pipe's capacity, asked with F_SETPIPE_SZ (the kernel's default is 64 KiB; a user's pipes may hold
# pipe-user-pages-soft pages in all, 64 MiB by default, past which the kernel gives the default).
PIPE_SIZE = 262144
# What splice_from returns besides a byte count (> 0) and 0 (the source's end of stream).
SPLICE_WAIT = -1  # the source has nothing to read now
SPLICE_FULL = -2  # the pipe is full (or may be): call again after the protocol's resume_writing
SPLICE_OFF = -3   # this transport takes no spliced bytes now (closed for writing, or no pipe to be had)


class _Pipe:
    """A non-blocking pipe and how many bytes it holds."""

    __slots__ = ("r", "w", "held", "size")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.held = 0
        size = 65536
        import fcntl
        setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
        if setsz is not None:
            try:
                size = fcntl.fcntl(self.w, setsz, PIPE_SIZE)
            except OSError:
                pass
        self.size = size

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Piped:
    """``n`` bytes at the head of a transport's pipe, in its write queue: they go out with splice."""

    __slots__ = ("pipe", "n")

    def __init__(self, pipe: _Pipe, n: int) -> None:
        self.pipe = pipe
        self.n = n

    def __len__(self) -> int:
        return self.n

# connect_ex() results that mean "in progress" (EAGAIN: a Unix socket's backlog, or loopback under load).
_CONNECT_PENDING = (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)


class Protocol:
    """What a transport calls. Every method has a default that does nothing useful, so a protocol only
    writes the ones its stream needs (a probe never pauses; the admin endpoint never connects out)."""

    __slots__ = ()

    # After a failed send, keep reading what the peer still sends (a backend that answered early and
    # closed its reading side), or stop at once (a client that is gone).
    read_after_write_error = False

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self, reset: bool) -> None:
        pass

    def readable(self) -> None:
        """The socket is readable while the transport's ``raw_reads`` is on (the protocol reads it)."""
        pass

    def connection_made(self) -> None:
        pass

    def connect_failed(self, err: int, reason: str = "") -> None:
        """An outgoing connection failed: ``err`` is an errno; ``reason`` says more when the failure was
        not the socket's (a TLS handshake or certificate verification)."""
        pass

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        pass

    def write_queued(self) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def write_drained(self) -> None:
        self.resume_writing()

    def timer_fired(self) -> None:
        pass

    def internal_error(self) -> None:
        pass


class Transport:
    """A non-blocking stream socket on a reactor (see the module docstring)."""

    __slots__ = ("reactor", "sock", "fd", "protocol", "events", "out", "out_bytes", "read_size", "reading",
                 "connecting", "wr_closed", "closed", "broken", "corked", "last_write", "timer", "timer_when",
                 "preamble", "_io", "_timer_cb", "_reader", "pipe", "pipe_keep", "__weakref__")

    # Whether bytes can be spliced into or out of this transport's socket (not through TLS).
    can_splice = SPLICE

    reactor: Reactor
    sock: socket.socket
    fd: int
    protocol: Protocol
    events: int
    out: Deque[Any]  # Chunk, or Piped (bytes waiting in the pipe)
    out_bytes: int
    timer: Optional[Timer]

    # What a send that would block raises (a TLS transport adds OpenSSL's "want read/write"); looked up
    # only when a send raises.
    _WOULD_BLOCK: Tuple[Type[BaseException], ...] = (BlockingIOError, InterruptedError)

    def __init__(self, reactor: Reactor, sock: socket.socket, protocol: Protocol, read_size: int = 65536,
                 connecting: bool = False, reading: bool = True) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.events = 0
        self.out = deque()
        self.out_bytes = 0
        self.read_size = read_size
        self.reading = reading        # the protocol wants reads (applied once connected)
        self.connecting = connecting  # an outgoing connect in progress: only EVENT_WRITE until it ends
        self.wr_closed = False        # our FIN is sent, or sending failed: writes are dropped
        self.closed = False
        self.broken = False           # a send failed; connection_lost is on its way
        self.corked = False           # ``out`` holds writes waiting for the end of the turn (uncork)
        self.last_write = reactor.now  # the last time the peer took bytes (the send-stall clock)
        self.timer = None
        self.timer_when = _NEVER  # when the timer fires; _NEVER while none is set
        self.preamble = b""  # sent first, as soon as an outgoing connect succeeds (a PROXY protocol header)
        # While connecting the selector calls _on_connect_io, then _on_io (no per-event test).
        self._io = self._on_connect_io if connecting else self._on_io
        self._timer_cb = self._on_timer
        # What a read event calls: _on_read (recv, data_received), or _on_raw_read (the protocol reads
        # the socket itself: it splices) while raw_reads(True).
        self._reader: IOCallback = self._on_read
        self.pipe: Optional[_Pipe] = None  # made by the first splice_from
        self.pipe_keep = False  # a splice is under way: keep the pipe when it runs empty
        if connecting:
            self._set_events(EVENT_WRITE)
        elif reading:
            self._set_events(EVENT_READ)

    def __repr__(self) -> str:
        return "<Transport fd=%d events=%d queued=%d>" % (self.fd, self.events, self.out_bytes)

    # ---- selector ----
    def _set_events(self, events: int) -> None:
        old = self.events
        if events == old:
            return
        reactor = self.reactor
        if old == 0:
            reactor.register(self.fd, events, self._callback(events))
        elif events == 0:
            reactor.unregister(self.fd)
        else:
            reactor.modify(self.fd, events, self._callback(events))
        self.events = events

    def _callback(self, events: int) -> IOCallback:
        """What the reactor calls for ``events``: while only reading (most of a connection's life), the
        read path itself, without the write test of _on_io."""
        if events == EVENT_READ and not self.connecting:
            return self._reader
        return self._io

    def _on_io(self, mask: int) -> None:
        try:
            if mask & EVENT_WRITE and self.out:
                self._flush()
        except Exception:
            self.protocol.internal_error()
            return
        if mask & EVENT_READ and self.events & EVENT_READ:
            self._reader(mask)

    def _on_read(self, mask: int) -> None:
        try:
            try:
                data = self.sock.recv(self.read_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.protocol.eof_received(True)
                return
            if data:
                self.protocol.data_received(data)
            else:
                self.protocol.eof_received(False)
        except Exception:
            self.protocol.internal_error()

    def _on_raw_read(self, mask: int) -> None:
        try:
            self.protocol.readable()
        except Exception:
            self.protocol.internal_error()

    def raw_reads(self, on: bool) -> None:
        """While on, a read event calls the protocol's ``readable()`` and reads nothing: the protocol
        takes the bytes itself (``splice_from`` on another transport)."""
        reader = self._on_raw_read if on else self._on_read
        if reader == self._reader:
            return
        self._reader = reader
        events = self.events
        if events and not self.connecting:
            self.reactor.modify(self.fd, events, self._callback(events))

    # ---- connecting ----
    def _on_connect_io(self, mask: int) -> None:
        try:
            self._connect_event()
        except Exception:
            self.protocol.internal_error()

    def _connect_event(self) -> None:
        if self.closed:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            # Stop watching it: reading SO_ERROR cleared it, so another event would look like success.
            self._set_events(0)
            self.protocol.connect_failed(err)
            return
        if self.preamble and not self._send_preamble():
            return
        self.connecting = False
        self._io = self._on_io
        # Registered for EVENT_WRITE while connecting: the new mask and callback in one modify.
        events = (EVENT_READ if self.reading else 0) | (EVENT_WRITE if self.out else 0)
        if events:
            self.reactor.modify(self.fd, events, self._callback(events))
        else:
            self.reactor.unregister(self.fd)
        self.events = events
        self.protocol.connection_made()
        if self.out and not self.closed:
            self._flush()

    def _send_preamble(self) -> bool:
        """Send the preamble on the newly connected socket, ahead of everything queued (and of a TLS
        handshake). A new socket's send buffer is empty, so these few bytes go out whole; if not, the
        connect counts as failed (False)."""
        preamble = self.preamble
        self.preamble = b""
        try:
            n = socket.socket.send(self.sock, preamble)
        except OSError as exc:
            n = -(exc.errno or errno.EPIPE)
        if n == len(preamble):
            return True
        self._set_events(0)
        self.protocol.connect_failed(-n if n < 0 else errno.EAGAIN, "cannot send the PROXY header")
        return False

    def _connect_failed_now(self, err: int) -> None:
        if self.connecting and not self.closed:
            self.protocol.connect_failed(err)

    # ---- reading ----
    def pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            if not self.connecting:
                self._set_events(self.events & ~EVENT_READ)

    def resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            if not self.connecting:
                self._set_events(self.events | EVENT_READ)

    # ---- timer ----
    def arm(self, when: float) -> None:
        """Make sure ``timer_fired`` runs no later than ``when`` (it may run earlier; the protocol then
        re-arms for the deadline it really has: lazy re-arm, STYLE habit 10). A deadline that moved
        later costs nothing: hot paths test ``when < transport.timer_when`` before calling."""
        if when >= self.timer_when:
            return
        t = self.timer
        if t is not None:
            t.cancel()
        self.timer = self.reactor.wheel.call_at(when, self._timer_cb)
        self.timer_when = when

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_when = _NEVER

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_when = _NEVER
        if self.closed:
            return
        try:
            self.protocol.timer_fired()
        except Exception:
            self.protocol.internal_error()

    # ---- writing ----
    def write(self, data: Chunk) -> None:
        """Queue what the socket does not take. A small write to an idle stream waits for the end of
        the turn (corked: see :meth:`uncork`); anything else is sent now if nothing is queued."""
        if self.wr_closed:
            return
        if self.out_bytes or self.connecting:
            self.out.append(data)
            self.out_bytes += len(data)
            if self.corked and self.out_bytes >= CORK_LIMIT:
                self._push_cork(False)
        elif len(data) < CORK_LIMIT:
            self.out.append(data)
            self.out_bytes = len(data)
            self.corked = True
            self.last_write = self.reactor.now
            self.reactor.corked.append(self)
            return
        else:
            try:
                n = self.sock.send(data)
            except self._WOULD_BLOCK:
                n = 0
            except OSError as exc:
                self._send_failed(exc)
                return
            left = len(data) - n
            if not left:
                return
            self._start_queue(memoryview(data)[n:] if n else data, left)
        if self.out_bytes > HIGH_WATER:
            self.protocol.pause_writing()

    def uncork(self) -> None:
        """End of the loop turn (the reactor calls it): send what this turn wrote. The protocol hears
        ``write_drained`` when it all went, ``write_queued`` when the peer did not take it all."""
        if not self.corked:
            return
        try:
            self._push_cork(False)
            if not self.out and not self.closed and not self.broken:
                self.protocol.write_drained()
        except Exception:
            self.protocol.internal_error()

    def _push_cork(self, quiet: bool) -> None:
        """Send the corked bytes (only Chunks, not registered for EVENT_WRITE) in one call; queue the
        rest. ``quiet``: the stream is closing, so tell the protocol nothing and queue nothing."""
        self.corked = False
        out = self.out
        try:
            if len(out) == 1:
                data = out[0]
                n = self.sock.send(data)
            else:
                data = b"".join(out)
                n = self.sock.send(data)
        except self._WOULD_BLOCK:
            n = 0
        except OSError as exc:
            if not quiet:
                self._send_failed(exc)
            return
        out.clear()
        left = self.out_bytes - n
        self.out_bytes = 0
        if left and not quiet:
            self._start_queue(memoryview(data)[n:] if n else data, left)

    def _start_queue(self, rest: Any, left: int) -> None:
        """A send left ``left`` bytes (``rest``, a Chunk or Piped) on an empty queue: queue them and
        wait for the socket to be writable."""
        self.out.append(rest)
        self.out_bytes = left
        self._set_events(self.events | EVENT_WRITE)
        self.last_write = self.reactor.now
        self.protocol.write_queued()

    def write_parts(self, parts: List[Chunk]) -> None:
        if len(parts) == 1:
            self.write(parts[0])
        elif parts:
            self.write(b"".join(parts))

    def queue(self, pending: Union[bytes, Deque[Chunk]], nbytes: int) -> None:
        """Queue bytes to send once connected (the head, or what a failed connection did not send)."""
        if isinstance(pending, bytes):
            self.out.append(pending)
        elif self.out:
            self.out.extend(pending)
        else:
            self.out = pending
        self.out_bytes += nbytes

    def take_queue(self) -> Tuple[Deque[Chunk], int]:
        """The unsent bytes, removed from this transport (to go out on another connection)."""
        out, n = self.out, self.out_bytes
        self.corked = False
        self.out = deque()
        self.out_bytes = 0
        return out, n

    def _flush(self) -> None:
        out = self.out
        sock = self.sock
        # Piped entries exist only while the transport has a pipe: without one, no test per entry.
        piping = self.pipe is not None
        while out:
            first = out[0]
            if piping and isinstance(first, Piped):
                if not self._flush_piped(first):
                    return
                if out and out[0] is first:
                    break  # the socket is full
                continue
            try:
                if len(out) == 1:
                    want = len(first)
                    n = sock.send(first)
                else:
                    bufs = list(islice(out, MAX_IOV))
                    if piping:
                        for i, b in enumerate(bufs):
                            if isinstance(b, Piped):
                                del bufs[i:]  # gather only up to the bytes waiting in the pipe
                                break
                    want = sum(len(b) for b in bufs)
                    n = sock.sendmsg(bufs) if len(bufs) > 1 else sock.send(bufs[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._send_failed(exc)
                return
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
            self.protocol.write_drained()
        elif self.out_bytes < LOW_WATER:
            self.protocol.resume_writing()

    def _flush_piped(self, piped: Piped) -> bool:
        """Splice a queued ``Piped`` entry out (popped when it went whole). False after a failure."""
        pipe = piped.pipe
        try:
            n: int = _splice(pipe.r, self.fd, piped.n, flags=_SPLICE_FLAGS)  # type: ignore[misc]
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            self._send_failed(exc)
            return False
        self.out_bytes -= n
        pipe.held -= n
        piped.n -= n
        self.last_write = self.reactor.now
        if not piped.n:
            self.out.popleft()
            if not pipe.held and not self.pipe_keep:
                self._drop_pipe()
        return True

    # ---- splicing ----
    def splice_from(self, src: int, limit: int) -> int:
        """Move up to ``limit`` bytes from the socket ``src`` to this transport's peer through its pipe,
        after anything queued: they never enter Python. Returns the bytes taken from ``src`` (> 0), 0 at
        its end of stream, ``SPLICE_WAIT`` when it has nothing now, ``SPLICE_FULL`` when the pipe is full
        (try again after ``resume_writing``), ``SPLICE_OFF`` when this transport takes no spliced bytes
        now (read ``src`` as usual). Raises OSError for an error of ``src``. The caller says when it is
        done with :meth:`splice_done`."""
        if self.wr_closed or self.closed:
            return SPLICE_OFF
        if self.corked:
            self._push_cork(False)  # the queue holds no Piped entry while corked
            if self.broken:
                return SPLICE_OFF
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = _Pipe()
            except OSError:  # no file descriptor to spare (EMFILE): no splicing
                return SPLICE_OFF
        self.pipe_keep = True
        room = pipe.size - pipe.held
        if room <= 0:
            return SPLICE_FULL
        try:
            n: int = _splice(src, pipe.w, limit if limit < room else room, flags=_SPLICE_FLAGS)  # type: ignore[misc]
        except (BlockingIOError, InterruptedError):
            # The source is empty, or the pipe has no free slot although it holds fewer bytes than its
            # size (each slot is a page or less of what the socket had): with bytes in the pipe, wait
            # for them to go out (the caller pauses), never spin on a readable source.
            return SPLICE_FULL if pipe.held else SPLICE_WAIT
        if not n:
            return 0
        pipe.held += n
        out = self.out
        if self.out_bytes or self.connecting:
            last = out[-1] if out else None
            if isinstance(last, Piped):
                last.n += n
            else:
                out.append(Piped(pipe, n))
            self.out_bytes += n
        else:
            try:
                m: int = _splice(pipe.r, self.fd, n, flags=_SPLICE_FLAGS)  # type: ignore[misc]
            except (BlockingIOError, InterruptedError):
                m = 0
            except OSError as exc:
                self._send_failed(exc)
                return n
            pipe.held -= m
            left = n - m
            if left:
                self._start_queue(Piped(pipe, left), left)
        if self.out_bytes > HIGH_WATER:
            self.protocol.pause_writing()
        return n

    def splice_done(self) -> None:
        """The body being spliced is all in: the pipe is closed once it has gone out (file descriptors
        are not kept per idle connection)."""
        self.pipe_keep = False
        pipe = self.pipe
        if pipe is not None and not pipe.held:
            self._drop_pipe()

    def _drop_pipe(self) -> None:
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            pipe.close()

    def _send_failed(self, exc: OSError) -> None:
        """The peer cannot take more (EPIPE, ECONNRESET): drop the queue, stop writing, and tell the
        protocol from the loop."""
        if self.broken:
            return
        self.broken = True
        self.wr_closed = True
        self.corked = False
        self.out.clear()
        self.out_bytes = 0
        self._drop_pipe()  # what it holds will never go out
        events = self.events & ~EVENT_WRITE
        if not self.protocol.read_after_write_error:
            self.reading = False
            events = 0
        self._set_events(events)
        self.reactor.call_soon(lambda: self._lost(exc))

    def _lost(self, exc: OSError) -> None:
        if not self.closed:
            try:
                self.protocol.connection_lost(exc)
            except Exception:
                self.protocol.internal_error()

    @property
    def queued(self) -> int:
        return self.out_bytes

    # ---- closing ----
    def shutdown_write(self) -> None:
        """Send our FIN (once), after this turn's writes; the read side stays open (half-close)."""
        if self.corked:
            self._push_cork(False)
        if not self.wr_closed:
            self.wr_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        """Unregister, cancel the timer, close the socket, drop the queue. Idempotent."""
        if self.closed:
            return
        if self.corked:
            self._push_cork(True)  # this turn's writes go out as they would have before the close
        self.closed = True
        self.reading = False
        self.disarm()
        if self.events:
            try:
                self.reactor.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            self.events = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.out.clear()
        self.out_bytes = 0
        self._drop_pipe()


def connect(reactor: Reactor, family: int, sockaddr: Tuple[Any, ...], protocol: Protocol,
            read_size: int = 65536, nodelay: bool = True, tls: Optional[Connector] = None,
            preamble: bytes = b"") -> Transport:
    """Start a non-blocking connect; the protocol hears ``connection_made`` or ``connect_failed(errno)``
    from the loop (an immediate refusal too, so the caller never handles a failure inside this call).
    ``tls``: the transport is made by it (a TLS transport: the handshake follows the connect, and
    ``connection_made`` the handshake). ``preamble`` goes out first once connected (a PROXY header).
    Raises OSError only when no socket can be made (EMFILE...)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if nodelay and family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sockaddr)
    except OSError:
        sock.close()
        raise
    if tls is not None:
        tr = tls.make_connecting(reactor, sock, protocol, read_size)
    else:
        tr = Transport(reactor, sock, protocol, read_size, connecting=True)
    tr.preamble = preamble
    if err not in _CONNECT_PENDING:
        tr._set_events(0)
        reactor.call_soon(lambda: tr._connect_failed_now(err))
    return tr


class Connector(TypingProtocol):
    """What makes the transport of an outgoing connection other than a plain one (``tls.ClientTLS``)."""

    def make_connecting(self, reactor: Reactor, sock: socket.socket, protocol: Protocol,
                        read_size: int) -> Transport: ...


class Acceptor(TypingProtocol):
    """What makes the transport of an accepted connection (``Transport`` itself, or ``tls.ServerTLS``)."""

    def __call__(self, reactor: Reactor, sock: socket.socket, protocol: Protocol, read_size: int) -> Transport: ...
