"""The control channel between the supervisor and each worker (``workers = N``), and what runs on it.

The supervisor makes one ``socket.socketpair()`` per worker before forking it; each side runs its end
on its own reactor, as a :class:`~balrs.transport.Transport`. Messages are JSON objects framed by a
4-byte big-endian length (like multiprocessing's ``Connection``), read with a sans-IO ``FrameReader``
and written with the same transport as the proxy's (try ``send``, wait for writability only after a
partial send; STYLE habit 7), so neither side ever blocks on the other.

The admin API's writes travel the same way: ``{"id": "wN", "op": "admin", "action": {...}}``, answered
``{"id": "wN", "status": 200, "result": {...}}`` (see :meth:`SnapshotCollector.write`).

For snapshots, the supervisor asks ``{"id": N, "op": "snapshot"}`` and the worker answers
``{"id": N, "snapshot": {...}}`` (``metrics.snapshot`` of its balancer). ``SnapshotCollector`` runs the
supervisor's side: an admin request starts a *round* that asks every live worker and ends when all
answered, or after ``COLLECT_TIMEOUT`` with what arrived; admin requests that come meanwhile join the
round. A worker has at most one question outstanding, so a stuck worker costs one small frame, not a
growing queue; its late answer to an old round is dropped and the current question asked instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .adminapi import Action, Writer

from .metrics import Snapshot, merge
from .reactor import Reactor
from .timerwheel import Timer
from .transport import Protocol, Transport

__all__ = [
    "COLLECT_TIMEOUT", "Channel", "ControlError", "FrameReader", "SnapshotCollector", "WorkerControl",
    "encode_frame",
]

log = logging.getLogger("balrs")

# ---- limits (STYLE habit 4) -----------------------------------------------------------------------
# The largest frame either side accepts. A snapshot takes about 350 bytes per backend, so this allows
# some 100000 backends; a larger length prefix means a corrupt stream, and the channel is closed.
CONTROL_MAX_FRAME = 64 * 1024 * 1024
# Bytes read per readiness event (a big snapshot arrives over several events, other work in between).
CONTROL_RECV_SIZE = 256 * 1024
# How long an admin request waits for the workers' snapshots before it is answered with those that
# arrived (Prometheus' default scrape_timeout is 10s; a worker answers within one loop turn, so 500 ms
# only runs out for a worker that is stuck or still starting).
COLLECT_TIMEOUT = 0.5
# How long an admin API write waits for every worker to apply it (a worker answers within a loop turn).
WRITE_TIMEOUT = 2.0
# Runtime changes remembered for workers started later (oldest dropped first).
JOURNAL_MAX = 10000

_HEADER = struct.Struct(">I")


class ControlError(Exception):
    """The peer sent something that is not a frame of a JSON object (the channel cannot continue)."""


def encode_frame(msg: Dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode("utf-8")
    if len(data) > CONTROL_MAX_FRAME:
        raise ControlError("message of %d bytes is over the %d-byte frame limit" % (len(data), CONTROL_MAX_FRAME))
    return _HEADER.pack(len(data)) + data


class FrameReader:
    """Sans-IO: fed bytes, returns the complete messages. Only the 4-byte length of the frame in
    progress is looked at until its body is complete, so feeding one byte at a time stays O(n)."""

    __slots__ = ("buf", "max_frame")

    def __init__(self, max_frame: int = CONTROL_MAX_FRAME) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        """The messages completed by ``data``. Raises ControlError on an oversized frame or a body that
        is not a JSON object."""
        buf = self.buf
        buf += data
        out: List[Dict[str, Any]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                raise ControlError("frame of %d bytes is over the %d-byte limit" % (length, self.max_frame))
            if end - pos - 4 < length:
                break
            body = bytes(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            try:
                msg = json.loads(body.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                raise ControlError("frame is not JSON: %s" % exc) from None
            if not isinstance(msg, dict):
                raise ControlError("frame is not a JSON object")
            out.append(msg)
        if pos:
            del buf[:pos]
        return out

    def __len__(self) -> int:
        return len(self.buf)


class Channel(Protocol):
    """One end of a control socket pair on a reactor: framed messages in and out over a
    :class:`~balrs.transport.Transport`, never blocking.

    ``on_message(msg)`` is called for each message; ``on_close()`` once when the channel ends (the peer
    closed or broke it, a bug in a callback, or :meth:`close`)."""

    __slots__ = ("reactor", "tr", "reader", "closed", "on_message", "on_close", "name")

    def __init__(self, reactor: Reactor, sock: socket.socket, on_message: Callable[[Dict[str, Any]], None],
                 on_close: Callable[[], None] = lambda: None, name: str = "control") -> None:
        self.reactor = reactor
        sock.setblocking(False)
        self.reader = FrameReader()
        self.on_message = on_message
        self.on_close = on_close
        self.name = name
        self.closed = False
        self.tr = Transport(reactor, sock, self, CONTROL_RECV_SIZE)

    def __repr__(self) -> str:
        return "<Channel %s fd=%d>" % (self.name, self.tr.fd)

    @property
    def sock(self) -> socket.socket:
        return self.tr.sock

    def send(self, msg: Dict[str, Any]) -> bool:
        """Queue ``msg``; it goes out at the end of the loop turn (the transport corks small writes).
        False if the channel is closed, or broken (a failed send closes it from the loop)."""
        if self.closed:
            return False
        tr = self.tr
        tr.write(encode_frame(msg))
        return not (self.closed or tr.broken)

    # ---- transport events ----
    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except ControlError as exc:
            self._fail(str(exc))
            return
        for msg in messages:
            if self.closed:
                return
            self.on_message(msg)

    def eof_received(self, reset: bool) -> None:
        if reset:
            self._fail("recv: connection reset")
            return
        if len(self.reader):
            log.warning("%s: peer closed in the middle of a message", self.name)
        self.close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        self._fail("send: %s" % why)

    def internal_error(self) -> None:
        log.exception("%s: internal error; closing the channel", self.name)
        self.close()

    def _fail(self, why: str) -> None:
        log.error("%s: %s; closing the channel", self.name, why)
        self.close()

    def close(self) -> None:
        """Close the transport (idempotent); calls ``on_close`` once."""
        if self.closed:
            return
        self.closed = True
        self.tr.close()
        self.on_close()


# ---- the worker's side -------------------------------------------------------------------------------
class WorkerControl:
    """In a worker: answers the supervisor's questions on the control channel with ``snapshot()``,
    and applies the admin API's writes with ``write`` (``Balancer.admin_write``)."""

    def __init__(self, reactor: Reactor, sock: socket.socket, snapshot: Callable[[], Snapshot],
                 write: Optional[Writer] = None) -> None:
        self.snapshot = snapshot
        self.write = write
        self.channel = Channel(reactor, sock, self._on_message, name="control channel")

    def _on_message(self, msg: Dict[str, Any]) -> None:
        op = msg.get("op")
        reply: Dict[str, Any] = {"id": msg.get("id")}
        if op == "admin" and self.write is not None and isinstance(msg.get("action"), dict):
            def deliver(status: int, doc: Dict[str, Any]) -> None:
                self.channel.send({"id": msg.get("id"), "status": status, "result": doc})
            try:
                self.write(msg["action"], deliver)
            except Exception as exc:  # a bug in a write must cost one answer, not the worker's loop
                log.exception("control: cannot apply an admin action")
                deliver(500, {"error": "%s: %s" % (type(exc).__name__, exc)})
            return
        if op == "snapshot":
            try:
                reply["snapshot"] = self.snapshot()
            except Exception as exc:  # a bug in a snapshot must cost one answer, not the worker's loop
                log.exception("control: cannot take a snapshot")
                reply["error"] = "%s: %s" % (type(exc).__name__, exc)
        else:
            reply["error"] = "unknown op %r" % (op,)
        self.channel.send(reply)

    def close(self) -> None:
        self.channel.close()


# ---- the supervisor's side ---------------------------------------------------------------------------
Deliver = Callable[[Optional[Snapshot]], None]


class _Worker:
    """The supervisor's view of one worker's channel."""

    __slots__ = ("pid", "channel", "asked")

    def __init__(self, pid: int, channel: Channel) -> None:
        self.pid = pid
        self.channel = channel
        self.asked: Optional[int] = None   # id of the question not yet answered


class _Round:
    __slots__ = ("id", "waiting", "answers", "asked", "deliver", "timer")

    def __init__(self, round_id: int, waiting: Sequence[int]) -> None:
        self.id = round_id
        self.waiting = set(waiting)        # pids still to answer
        self.asked = len(waiting)
        self.answers: Dict[int, Snapshot] = {}
        self.deliver: List[Deliver] = []
        self.timer: Optional[Timer] = None


class _Write:
    """An admin API write on its way to every worker."""

    __slots__ = ("id", "action", "waiting", "answers", "asked", "deliver", "timer", "read_only")

    def __init__(self, write_id: str, action: Action, waiting: Sequence[int],
                 deliver: Callable[[int, Dict[str, Any]], None], read_only: bool = False) -> None:
        self.id = write_id
        self.action = action
        self.read_only = read_only  # a question (explain), not a change: never journaled
        self.waiting = set(waiting)
        self.asked = sorted(waiting)
        self.answers: Dict[int, Tuple[int, Dict[str, Any]]] = {}
        self.deliver = deliver
        self.timer: Optional[Timer] = None


class SnapshotCollector:
    """In the supervisor: the workers' channels, collection rounds for the admin endpoint, and the
    admin API's writes.

    :meth:`collect` is an ``AdminServer`` snapshot source: it calls ``deliver`` with the merged
    snapshot once every worker answered or ``timeout`` passed (None if no worker answered).
    :meth:`write` is its writer: the action goes to every live worker and is answered once all of them
    applied it (their common answer), or, when some did not (an error, or no answer within
    ``WRITE_TIMEOUT``), 500 saying which. Successful writes are kept in a journal that a worker started
    later (a restart, or more workers after a reload) gets first; a reload keeps only the drain / maint /
    ready entries, as a worker's own reload keeps only those states."""

    def __init__(self, reactor: Reactor, workers_configured: Callable[[], int],
                 start_time: Callable[[], Optional[float]] = lambda: None,
                 timeout: float = COLLECT_TIMEOUT) -> None:
        self.reactor = reactor
        self.workers_configured = workers_configured
        self.start_time = start_time
        self.timeout = timeout
        self.workers: Dict[int, _Worker] = {}
        self.round: Optional[_Round] = None
        self._next_id = 1
        self.writes: Dict[str, _Write] = {}
        self.journal: List[Action] = []

    # ---- channels ----
    def add(self, pid: int, sock: socket.socket) -> None:
        """Watch the supervisor's end of a new worker's channel."""
        self.remove(pid)
        channel = Channel(self.reactor, sock, lambda msg: self._on_reply(pid, msg),
                          lambda: self._on_channel_closed(pid), name="worker %d control channel" % pid)
        self.workers[pid] = _Worker(pid, channel)
        for action in self.journal:
            # Replayed before anything else reaches it; the answers are not waited for.
            channel.send({"id": "journal", "op": "admin", "action": action})

    def remove(self, pid: int) -> None:
        """The worker exited (or will not be asked again): close its channel."""
        w = self.workers.get(pid)
        if w is not None:
            w.channel.close()   # calls _on_channel_closed

    def sockets(self) -> List[socket.socket]:
        return [w.channel.sock for w in self.workers.values()]

    def close(self) -> None:
        for pid in list(self.workers):
            self.remove(pid)

    def _on_channel_closed(self, pid: int) -> None:
        self.workers.pop(pid, None)
        for wr in list(self.writes.values()):
            if pid in wr.waiting:
                wr.waiting.discard(pid)
                self._write_maybe_done(wr)
        r = self.round
        if r is not None and pid in r.waiting:
            r.waiting.discard(pid)
            self._maybe_finish()

    # ---- rounds ----
    def collect(self, deliver: Deliver) -> None:
        r = self.round
        if r is None:
            r = self.round = _Round(self._next_id, list(self.workers))
            self._next_id += 1
            for pid in list(r.waiting):
                w = self.workers.get(pid)
                if w is not None and w.asked is None:
                    self._ask(w, r.id)
            r.timer = self.reactor.call_later(self.timeout, self._expired)
        r.deliver.append(deliver)
        self._maybe_finish()

    def _ask(self, w: _Worker, round_id: int) -> None:
        w.asked = round_id
        w.channel.send({"id": round_id, "op": "snapshot"})   # a failure closes the channel

    def _on_reply(self, pid: int, msg: Dict[str, Any]) -> None:
        w = self.workers.get(pid)
        if w is None:
            return
        if isinstance(msg.get("id"), str):
            self._write_reply(pid, msg)
            return
        w.asked = None
        r = self.round
        if r is None or pid not in r.waiting:
            return
        if msg.get("id") != r.id:
            # An answer to an earlier round that timed out: too old for this one; ask again.
            self._ask(w, r.id)
            return
        snap = msg.get("snapshot")
        if isinstance(snap, dict):
            r.answers[pid] = snap
        else:
            log.error("supervisor: worker %d could not answer a snapshot: %s", pid, msg.get("error"))
        r.waiting.discard(pid)
        self._maybe_finish()

    def _expired(self) -> None:
        r = self.round
        if r is None:
            return
        r.timer = None
        log.warning("supervisor: admin: no snapshot from worker(s) %s within %gs; answering with %d of %d",
                    ", ".join(str(p) for p in sorted(r.waiting)), self.timeout, len(r.answers), r.asked)
        r.waiting.clear()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        r = self.round
        if r is None or r.waiting or not r.deliver:
            return
        self.round = None
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        result: Optional[Snapshot] = None
        if r.answers:
            snaps = [r.answers[pid] for pid in sorted(r.answers)]
            try:
                result = merge(snaps, os.getpid(), self.start_time(), r.asked, self.workers_configured())
            except Exception:  # a malformed answer must cost one admin answer, not the supervisor's loop
                log.exception("supervisor: cannot merge the workers' snapshots")
        for deliver in r.deliver:
            try:
                deliver(result)
            except Exception:
                log.exception("supervisor: admin: cannot answer")

    # ---- writes ----
    def write(self, action: Action, deliver: Callable[[int, Dict[str, Any]], None]) -> None:
        """An ``AdminServer`` writer: apply ``action`` in every worker (see the class docstring)."""
        self._send(action, deliver, False)

    def ask(self, action: Action, deliver: Callable[[int, Dict[str, Any]], None]) -> None:
        """A read-only question (``{"op": "explain", ...}``) for one worker, the oldest: its answer is
        that worker's view (each keeps its own in-flight counts and health state)."""
        self._send(action, deliver, True)

    def _send(self, action: Action, deliver: Callable[[int, Dict[str, Any]], None], read_only: bool) -> None:
        if not self.workers:
            deliver(503, {"error": "no worker is running"})
            return
        waiting = [min(self.workers)] if read_only else list(self.workers)
        wr = _Write("w%d" % self._next_id, action, waiting, deliver, read_only)
        self._next_id += 1
        self.writes[wr.id] = wr
        for pid in list(wr.waiting):
            w = self.workers.get(pid)
            if w is not None:
                w.channel.send({"id": wr.id, "op": "admin", "action": action})  # a failure closes it
        if wr.id in self.writes:
            wr.timer = self.reactor.call_later(WRITE_TIMEOUT, lambda: self._write_expired(wr))

    def _write_reply(self, pid: int, msg: Dict[str, Any]) -> None:
        wr = self.writes.get(msg["id"])
        if wr is None or pid not in wr.waiting:
            return  # a journal replay's answer, or one that came too late
        status = msg.get("status")
        result = msg.get("result")
        wr.answers[pid] = (status if isinstance(status, int) else 500,
                           result if isinstance(result, dict) else {"error": "malformed answer"})
        wr.waiting.discard(pid)
        self._write_maybe_done(wr)

    def _write_expired(self, wr: _Write) -> None:
        wr.timer = None
        if wr.waiting:
            log.warning("supervisor: admin: worker(s) %s did not apply the change within %gs",
                        ", ".join(str(p) for p in sorted(wr.waiting)), WRITE_TIMEOUT)
            wr.waiting.clear()
            self._write_maybe_done(wr)

    def _write_maybe_done(self, wr: _Write) -> None:
        if wr.waiting or self.writes.get(wr.id) is not wr:
            return
        del self.writes[wr.id]
        if wr.timer is not None:
            wr.timer.cancel()
            wr.timer = None
        answers = wr.answers
        statuses = {status for status, _doc in answers.values()}
        if len(answers) == len(wr.asked) and len(statuses) == 1:
            status = statuses.pop()
            doc = dict(next(iter(answers.values()))[1])
            if wr.read_only:
                doc["worker"] = wr.asked[0]
            else:
                doc["workers"] = len(answers)
            if status < 300 and not wr.read_only:
                self._journal(wr.action)
        else:
            applied = sorted(pid for pid, (st, _d) in answers.items() if st < 300)
            failed = {str(pid): ("%d %s" % (answers[pid][0], answers[pid][1].get("error", "")) if pid in answers
                                 else "no answer") for pid in wr.asked if pid not in applied}
            status, doc = 500, {"error": "applied by %d of %d workers" % (len(applied), len(wr.asked)),
                                "applied": applied, "failed": failed}
            if applied and not wr.read_only:
                self._journal(wr.action)
        try:
            wr.deliver(status, doc)
        except Exception:
            log.exception("supervisor: admin: cannot answer")

    def _journal(self, action: Action) -> None:
        self.journal.append(action)
        if len(self.journal) > JOURNAL_MAX:
            del self.journal[:len(self.journal) - JOURNAL_MAX]

    def reloaded(self) -> None:
        """The workers reload their file: of the runtime changes only the backend states stay."""
        self.journal = [a for a in self.journal if a.get("op") in ("drain", "maint", "ready")]
