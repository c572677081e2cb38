"""The event loop: one selector (epoll on Linux), one timer wheel, signal wake-ups.

It knows nothing of HTTP. Connections register a file descriptor once with a callback taking the
ready mask, and change the mask only when it really changes (STYLE habit 8). Each loop turn costs
O(ready events + due timers), never O(connections): the select timeout is the time to the wheel's next
occupied slot, so an idle balancer sleeps. Signal handlers only record: ``signal.set_wakeup_fd`` writes
the signal number to a socket the loop watches, and the loop calls the handler between events
(STYLE habit 11, like gunicorn's arbiter).

Writes are corked for the turn: a transport's small writes wait in ``corked`` and go out, one send per
transport, before the loop polls again (``uncork``), so what one turn writes to a peer wakes it once.
"""

from __future__ import annotations

import logging
import math
import select
import selectors
import signal
import socket
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from .timerwheel import Timer, TimerWheel

__all__ = ["Reactor", "EVENT_READ", "EVENT_WRITE", "IOCallback"]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

IOCallback = Callable[[int], None]

log = logging.getLogger("balrs")


_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)
# At most this many ready descriptors per epoll_wait; the rest stay ready for the next turn.
_MAX_EVENTS = 256
# Longest single poll (a day): epoll takes an int of milliseconds, timers may be years away.
_MAX_TIMEOUT = 86400.0


def _from_epoll(ev: int) -> int:
    """epoll's event bits -> the selectors mask, as selectors.EpollSelector computes it (an error or
    hang-up makes a descriptor both readable and writable, so whichever side is registered hears of it)."""
    return (EVENT_WRITE if ev & ~_EPOLLIN else 0) | (EVENT_READ if ev & ~_EPOLLOUT else 0)


# The same for every combination of the bits epoll reports for balrs' registrations (IN, PRI, OUT,
# ERR, HUP): one dict lookup per event on the loop.
_FROM_EPOLL = {ev: _from_epoll(ev) for ev in range(32)}


class EpollSelector:
    """The part of ``selectors`` balrs uses, over ``select.epoll`` directly: the loop takes the raw
    (fd, events) pairs and calls each callback, without a SelectorKey per event or the per-call
    bookkeeping of ``selectors.EpollSelector`` (measured: about a tenth of the instructions of a small
    proxied request). ``select()`` and ``get_map()`` keep the ``selectors`` shape for tests and tools."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.epoll_poll = self._epoll.poll  # the reactor's loop calls it directly (see Reactor.run)
        # fd -> (callback, selectors mask registered)
        self.keys: Dict[int, Tuple[IOCallback, int]] = {}

    def register(self, fd: int, events: int, callback: IOCallback) -> None:
        if fd in self.keys:
            raise KeyError("%d is already registered" % fd)
        self._epoll.register(fd, (_EPOLLIN if events & EVENT_READ else 0) | (_EPOLLOUT if events & EVENT_WRITE else 0))
        self.keys[fd] = (callback, events)

    def modify(self, fd: int, events: int, callback: IOCallback) -> None:
        old = self.keys.get(fd)
        if old is None:
            raise KeyError("%d is not registered" % fd)
        if old[1] != events:  # a new callback alone is no business of the kernel's (selectors does the same)
            self._epoll.modify(fd, (_EPOLLIN if events & EVENT_READ else 0)
                               | (_EPOLLOUT if events & EVENT_WRITE else 0))
        self.keys[fd] = (callback, events)

    def unregister(self, fd: int) -> None:
        del self.keys[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped it (selectors ignores this too)

    def poll(self, timeout: Optional[float]) -> List[Tuple[int, int]]:
        """Raw (fd, epoll events) pairs; ``timeout`` None blocks, 0 polls."""
        if timeout is None:
            t = -1.0
        elif timeout <= 0:
            t = 0.0
        else:
            # epoll has millisecond resolution: round up, so a timer is never polled for too early.
            t = math.ceil(timeout * 1e3) * 1e-3
        try:
            return self._epoll.poll(t, max(len(self.keys), 1))
        except InterruptedError:
            return []

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        out = []
        for fd, ev in self.poll(timeout):
            key = self.keys.get(fd)
            if key is not None:
                out.append((selectors.SelectorKey(fd, fd, key[1], key[0]), _from_epoll(ev) & key[1]))
        return out

    def get_map(self) -> Mapping[int, Any]:
        return {fd: selectors.SelectorKey(fd, fd, ev, cb) for fd, (cb, ev) in self.keys.items()}

    def close(self) -> None:
        self._epoll.close()
        self.keys.clear()


class Reactor:
    """A single-threaded selectors reactor with an injected clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.selector: Any = EpollSelector() if hasattr(select, "epoll") else selectors.DefaultSelector()
        self.clock = clock
        self.now = clock()
        self.wheel = TimerWheel(clock)
        self._running = False
        self._signal_handlers: Dict[int, Callable[[int], None]] = {}
        self._wakeup_r: Optional[socket.socket] = None
        self._wakeup_w: Optional[socket.socket] = None
        self._old_wakeup_fd = -1
        self._soon: List[Callable[[], object]] = []
        # Transports whose writes wait for the end of the turn (transport.Transport.write, corking):
        # each has an ``uncork()`` method.
        self.corked: List[Any] = []
        # Callbacks handed over by other threads (the resolver): a deque append is atomic, and a byte
        # on a socket pair wakes the loop up.
        self._threadsafe: Deque[Callable[[], object]] = deque()
        self._thread_r: Optional[socket.socket] = None
        self._thread_w: Optional[socket.socket] = None

    # ---- file descriptors ------------------------------------------------------------------------
    def register(self, fd: int, events: int, callback: IOCallback) -> None:
        self.selector.register(fd, events, callback)

    def modify(self, fd: int, events: int, callback: IOCallback) -> None:
        self.selector.modify(fd, events, callback)

    def unregister(self, fd: int) -> None:
        self.selector.unregister(fd)

    # ---- time ------------------------------------------------------------------------------------
    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        return self.wheel.call_at(when, callback)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return self.wheel.call_at(self.now + delay, callback)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after the current batch of events (used to break re-entrancy)."""
        self._soon.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop thread soon; callable from any thread."""
        self._threadsafe.append(callback)
        w = self._thread_w
        if w is not None:
            try:
                w.send(b"\0")
            except (BlockingIOError, InterruptedError):
                pass  # the socket buffer is full of wake-ups already
            except OSError:
                pass  # closed during shutdown

    def enable_threadsafe(self) -> None:
        """Create the wake-up socket pair for :meth:`call_soon_threadsafe` (call on the loop thread)."""
        if self._thread_r is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._thread_r, self._thread_w = r, w
            self.register(r.fileno(), EVENT_READ, self._on_thread_wakeup)

    def _on_thread_wakeup(self, mask: int) -> None:
        r = self._thread_r
        if r is not None:
            try:
                r.recv(4096)
            except (BlockingIOError, InterruptedError):
                pass
        pending = self._threadsafe
        while pending:
            cb = pending.popleft()
            try:
                cb()
            except Exception:
                log.exception("unhandled error in a callback from another thread")

    # ---- signals ---------------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(signum)`` from the loop when the signal arrives. Main thread only."""
        if self._wakeup_r is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._wakeup_r, self._wakeup_w = r, w
            self._old_wakeup_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self.register(r.fileno(), EVENT_READ, self._on_wakeup)
        self._signal_handlers[signum] = handler
        # The Python-level handler does nothing: the C handler has already written the signal number to
        # the wake-up socket, and the loop dispatches it (handlers only record).
        signal.signal(signum, _record_only)

    def remove_signal_handlers(self) -> None:
        for signum in list(self._signal_handlers):
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        if self._wakeup_r is not None and self._wakeup_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self.unregister(self._wakeup_r.fileno())
            self._wakeup_r.close()
            self._wakeup_w.close()
            self._wakeup_r = self._wakeup_w = None

    def _on_wakeup(self, mask: int) -> None:
        assert self._wakeup_r is not None
        try:
            data = self._wakeup_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # ---- running ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """Run until :meth:`stop`. Each turn: select until the next timer is due, dispatch ready file
        descriptors, fire due timers, then send what the turn wrote (corked transports)."""
        self._running = True
        sel = self.selector
        if not isinstance(sel, EpollSelector):
            self._run_selectors()
            return
        epoll_poll = sel.epoll_poll
        keys = sel.keys
        from_epoll = _FROM_EPOLL
        wheel = self.wheel
        clock = self.clock
        soon = self._soon
        now = self.now
        if self.corked:
            self.uncork()  # written before the loop started
        while self._running:
            # The poll timeout, from the wheel's cached wake-up when it is known (most turns): epoll
            # rounds it up to whole milliseconds itself, so a timer is never polled for too early.
            wake = wheel.wake_at
            if soon or self.corked:
                timeout = 0.0
            elif now < wake < now + _MAX_TIMEOUT:
                timeout = wake - now
            else:
                t = wheel.next_timeout(now)
                timeout = -1.0 if t is None else min(t, _MAX_TIMEOUT)
            try:
                events = epoll_poll(timeout, _MAX_EVENTS)
            except InterruptedError:
                events = []
            self.now = now = clock()
            for fd, ev in events:
                key = keys.get(fd)
                if key is None:
                    continue  # unregistered by an earlier callback of this batch
                try:
                    mask = from_epoll[ev]
                except KeyError:
                    mask = _from_epoll(ev)
                try:
                    key[0](mask & key[1])
                except Exception:
                    # Connections handle their own errors; this is the backstop that keeps the loop alive.
                    log.exception("unhandled error in an I/O callback")
            if soon:
                self._run_soon()
            if now >= wheel.wake_at:
                # Before wake_at nothing is due: the wheel's cursor may lag, which run() jumps over.
                wheel.run(now)
            if self.corked:
                # The end of the turn: what it wrote goes out (before the loop may stop or sleep).
                self.uncork()
            now = self.now
        if self.corked:
            self.uncork()  # written by the last uncork's callbacks

    def uncork(self) -> None:
        """The end of a turn: send what each corked transport was given during it."""
        batch = self.corked
        self.corked = []
        for t in batch:
            t.uncork()

    def _run_soon(self) -> None:
        """The callbacks deferred during this turn (call_soon), in order; those they defer wait a turn."""
        soon = self._soon
        batch = soon[:]
        del soon[:]
        for cb in batch:
            try:
                cb()
            except Exception:
                log.exception("unhandled error in a deferred callback")

    def _run_selectors(self) -> None:
        """The same loop over a ``selectors`` selector (platforms without epoll)."""
        select = self.selector.select
        wheel = self.wheel
        clock = self.clock
        soon = self._soon
        if self.corked:
            self.uncork()
        while self._running:
            timeout = 0.0 if soon or self.corked else wheel.next_timeout(self.now)
            events = select(timeout)
            self.now = now = clock()
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    log.exception("unhandled error in an I/O callback")
            if soon:
                self._run_soon()
            wheel.run(now)
            if self.corked:
                self.uncork()
        if self.corked:
            self.uncork()

    def close(self) -> None:
        self.remove_signal_handlers()
        if self._thread_r is not None and self._thread_w is not None:
            try:
                self.unregister(self._thread_r.fileno())
            except (KeyError, ValueError):
                pass
            self._thread_r.close()
            self._thread_w.close()
            self._thread_r = self._thread_w = None
        self.selector.close()


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing to do here; set_wakeup_fd already told the loop."""
