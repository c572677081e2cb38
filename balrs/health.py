"""Backend health: active probes, passive outlier detection and slow start.

Everything runs on the balancer's reactor, driven by its timer wheel and its clock (``reactor.now``,
STYLE habit 13), so tests run it on fake time.

*Active probes* (only with a [health] section). Each backend has one :class:`_Probe`, a small state
machine (``_PROBE_NEXT`` below): IDLE -> CONNECTING -> (TCP: pass) | SENDING -> READING -> IDLE. A probe
holds at most one timer: while idle, the one that starts the next probe; while in flight, its deadline
(``timeout``). The next probe is scheduled only when one finishes, so there is never more than one in
flight per backend and never a backlog: a probe that overran its next turn skips it (Tornado's
``PeriodicCallback``), and every interval gets +-``PROBE_JITTER`` so that probes to many backends
spread out (HAProxy ``spread-checks``). A backend starts up; ``fall`` consecutive failures take it
down and ``rise`` consecutive passes bring it back (HAProxy's rise/fall).

*Passive outlier detection* (unless ``eject_after = 0``). The proxy reports live-traffic failures
(connect, reset, timeout) and the first success after failures. ``eject_after`` failures in a row
eject the backend for ``eject_cooldown``, doubled with each ejection in a row up to
``MAX_EJECT_COOLDOWN`` (Envoy outlier detection; nginx ``max_fails``/``fail_timeout``).

*Slow start* (``slow_start > 0``). A backend that comes back (or is added by a reload) has its
effective weight ramped from a tenth of its weight to all of it, by a timer that runs only while some
backend is ramping (no per-request work).

Nothing here is O(backends) per loop turn: each probe, ejection and the ramp has its own timer.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import socket
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, Optional, Union

from .edge import probe_proxy_header
from .http.errors import ProtocolError
from .http.heads import RESPONSE, HeadBuffer, parse_response_head
from .pool import ADMIN_MAINT
from .transport import Protocol, Transport, connect

if TYPE_CHECKING:
    from .config import Config, HealthConfig
    from .pool import Backend, Pool, Pools
    from .reactor import Reactor
    from .timerwheel import Timer

__all__ = [
    "Health", "PROBE_JITTER", "MAX_PROBE_HEAD", "MAX_EJECT_COOLDOWN", "SLOW_START_STEP",
    "SLOW_START_MIN_FRACTION", "slow_start_weight", "probe_request",
]

log = logging.getLogger("balrs")

# Each probe interval is drawn from interval * (1 +- PROBE_JITTER), so probes to many backends (and
# from many balrs processes) do not fire in lockstep (HAProxy `spread-checks`, 0-50%; Envoy
# `interval_jitter_percent`). The first probe of a backend comes at a random point of its first interval.
PROBE_JITTER = 0.1
# The longest probe response head read (HAProxy's check buffer, `tune.bufsize`, is 16 KiB); a longer
# head fails the probe.
MAX_PROBE_HEAD = 16384
# Bytes per probe recv(): a status line and a few fields fit.
PROBE_READ_SIZE = 4096
# The longest ejection, however often a backend was ejected in a row (Envoy `max_ejection_time` 300s).
MAX_EJECT_COOLDOWN = 300.0
# How often an effective weight is updated while a backend is in slow start: a few steps a second are
# smooth enough for a ramp of seconds to minutes (nginx Plus and HAProxy ramp in similar steps).
SLOW_START_STEP = 0.25
# A backend in slow start begins at this fraction of its weight, at least 1 (Envoy slow start
# `min_weight_percent` defaults to 10%).
SLOW_START_MIN_FRACTION = 0.1
WEIGHT_SCALE = 16  # slow-start weights move in sixteenths (HAProxy's BE_WEIGHT_SCALE)
# Doubling stops here so that 2**n stays a small float; the cooldown is capped long before.
_MAX_DOUBLINGS = 30

# Probe states and the transitions allowed between them (STYLE habit 2).
P_IDLE = 0        # not in flight; `timer` starts the next probe
P_CONNECTING = 1  # non-blocking connect in progress; `timer` is the probe's deadline
P_SENDING = 2     # HTTP: the request is partly sent
P_READING = 3     # HTTP: waiting for the response head
_PROBE_NEXT: Dict[int, FrozenSet[int]] = {
    P_IDLE: frozenset([P_CONNECTING]),
    P_CONNECTING: frozenset([P_IDLE, P_SENDING]),
    P_SENDING: frozenset([P_IDLE, P_READING]),
    P_READING: frozenset([P_IDLE]),
}

# connect() errors that are our own trouble (out of descriptors or memory), not the backend's.
_LOCAL_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def probe_request(path: str, host_header: bytes) -> bytes:
    """The bytes of an HTTP probe (HAProxy `option httpchk GET`)."""
    return (b"GET " + path.encode("ascii") + b" HTTP/1.1\r\nHost: " + host_header
            + b"\r\nConnection: close\r\nUser-Agent: balrs-health\r\n\r\n")


def slow_start_weight(weight: int, elapsed: float, slow_start: float) -> float:
    """The effective weight ``elapsed`` seconds into a slow start of ``slow_start`` seconds: linear from
    a tenth of ``weight`` to ``weight``. Fractional, so that a backend of weight 1 ramps too; rounded
    down to sixteenths (HAProxy's weight scale), so the strategy is re-told only on a visible step."""
    if slow_start <= 0.0 or elapsed >= slow_start:
        return weight
    low = weight * SLOW_START_MIN_FRACTION
    w = low if elapsed <= 0.0 else low + (weight - low) * elapsed / slow_start
    return max(1.0 / WEIGHT_SCALE, math.floor(w * WEIGHT_SCALE) / WEIGHT_SCALE)


class _Probe(Protocol):
    """The active health check of one backend (see the module docstring), a protocol on the
    :class:`~balrs.transport.Transport` of the probe in flight. Every way a probe in flight can end
    (refused, reset, timed out, a bad or unexpected answer, a bug) goes through :meth:`finish` once,
    which closes the transport first."""

    __slots__ = ("health", "backend", "cfg", "state", "tr", "timer", "started_at", "heads")

    def __init__(self, health: Health, backend: Backend, cfg: Optional[HealthConfig] = None) -> None:
        self.health = health
        self.backend = backend
        if cfg is None:
            cfg = health.health_of(backend)
            assert cfg is not None, "a probe needs a health section"
        self.cfg = cfg  # the [health] (or its pool's [health NAME]) section it probes with
        self.state = P_IDLE
        self.tr: Optional[Transport] = None  # the probe in flight's connection
        # The one timer: while idle, the one that starts the next probe; in flight, the deadline.
        self.timer: Optional[Timer] = None
        self.started_at = 0.0
        self.heads: Optional[HeadBuffer] = None

    @property
    def sock(self) -> Optional[socket.socket]:
        """The socket of the probe in flight (None while idle)."""
        tr = self.tr
        return tr.sock if tr is not None else None

    @property
    def events(self) -> int:
        """The event mask of the probe in flight's transport (0 while idle: no socket watched)."""
        tr = self.tr
        return tr.events if tr is not None else 0

    def _to(self, state: int) -> None:
        assert state in _PROBE_NEXT[self.state], "probe %d -> %d" % (self.state, state)
        self.state = state

    def schedule(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.health.reactor.call_at(when, self.begin)

    # ---- one probe ------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The timer fired: start a probe (unless this backend is gone)."""
        self.timer = None
        health = self.health
        backend = self.backend
        cfg = self.cfg
        if health.probes.get(backend) is not self or backend.draining:
            # Removed by a reload (reload() normally stops it first): probe no more.
            self.close()
            if health.probes.get(backend) is self:
                del health.probes[backend]
            return
        now = health.now
        self.started_at = now
        if not backend.resolved or backend.admin_state == ADMIN_MAINT:
            # Nothing to connect to yet (the resolver marks it down meanwhile), or in maintenance (no
            # probes: HAProxy's maint): try next interval.
            self._next()
            return
        try:
            # Refusals and other connect errors come back from the loop, as connect_failed.
            self.tr = connect(health.reactor, backend.family, backend.sockaddr, self, PROBE_READ_SIZE,
                              nodelay=False, tls=backend.tls,
                              preamble=probe_proxy_header(backend.send_proxy) if backend.send_proxy != "off" else b"")
        except OSError as exc:
            if exc.errno in _LOCAL_ERRNOS:
                # Our own trouble (EMFILE...) says nothing about the backend: no result this cycle.
                log.warning("backend %s: cannot create a probe socket: %s", backend.name, exc)
                self._next()
            else:
                self.finish(False, "connect: %s" % (exc.strerror or exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must cost this probe, not the timer wheel
            log.exception("backend %s: cannot start a probe", backend.name)
            self.finish(False, "error: %s" % exc)
            return
        self._to(P_CONNECTING)
        self.timer = health.reactor.call_at(now + cfg.timeout, self._timed_out)

    # ---- transport events ----
    def connection_made(self) -> None:
        cfg = self.cfg
        tr = self.tr
        assert tr is not None
        if cfg.path == "tcp":
            # Connect-only probe: never send a byte.
            self.finish(True, "connected")
            return
        self._to(P_SENDING)
        self.heads = HeadBuffer(MAX_PROBE_HEAD, RESPONSE)
        tr.write(probe_request(cfg.path, self.backend.host_header))
        # A failed send ends in connection_lost (from the loop); a partial one in write_drained.
        if not tr.queued and not tr.broken:
            self._to(P_READING)

    def connect_failed(self, err: int, reason: str = "") -> None:
        self.finish(False, "connect: %s" % (reason or os.strerror(err)))

    def write_drained(self) -> None:
        if self.state == P_SENDING:
            self._to(P_READING)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        self.finish(False, "send: %s" % why)

    def eof_received(self, reset: bool) -> None:
        self.finish(False, "reset before a response head" if reset else "closed before a response head")

    def data_received(self, data: bytes) -> None:
        heads = self.heads
        if heads is None or self.state not in (P_SENDING, P_READING):
            return
        try:
            head = heads.feed(data)
            while head is not None:
                resp = parse_response_head(head)
                if 100 <= resp.status < 200 and resp.status != 101:
                    # RFC 9110 §15.2: an interim response; the final one follows.
                    head = heads.pop_head()
                    continue
                lo, hi = self.cfg.expect
                self.finish(lo <= resp.status <= hi, "status %d" % resp.status)
                return
        except ProtocolError as exc:
            self.finish(False, "bad response: %s" % exc.message)

    def internal_error(self) -> None:
        # A bug in a callback: the one fatal path still reports and never leaks the socket.
        log.exception("backend %s: probe failed unexpectedly", self.backend.name)
        if self.tr is not None:
            self.finish(False, "internal error")

    def _timed_out(self) -> None:
        self.timer = None
        self.finish(False, "timed out after %gs" % self.cfg.timeout)

    def finish(self, ok: bool, why: str) -> None:
        """The one way a probe in flight ends: close everything, report, schedule the next."""
        self.close()
        health = self.health
        if health.probes.get(self.backend) is not self:
            return
        try:
            health._probe_result(self, ok, why)
        except Exception:  # noqa: BLE001 - a bug in reporting must not stop this backend's probes
            log.exception("backend %s: cannot record a probe result", self.backend.name)
        self._next()

    def _next(self) -> None:
        """Schedule the next probe one (jittered) interval after this one started; if that time has
        already passed, the missed turn is skipped and the next comes one interval from now."""
        health = self.health
        cfg = self.cfg
        if health.probes.get(self.backend) is not self:
            return
        now = health.now
        when = self.started_at + health.jittered(cfg.interval)
        if when <= now:
            when = now + health.jittered(cfg.interval)
        self.schedule(when)

    def close(self) -> None:
        """Cancel the timer and close the transport; back to idle. Idempotent."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        tr = self.tr
        if tr is not None:
            self.tr = None
            tr.close()
        self.heads = None
        self.state = P_IDLE


class Health:
    """Owns every backend's up/down state. The proxy reports live-traffic outcomes to it."""

    def __init__(self, reactor: Reactor, pool: Union[Pool, Pools], config: Callable[[], Config],
                 rng: Optional[random.Random] = None,
                 health_of: Optional[Callable[[Backend], Optional[HealthConfig]]] = None) -> None:
        self.reactor = reactor
        self.pool = pool
        # The running configuration (it changes on reload): [health], eject_after, slow_start.
        self.config = config
        # The health section probing a backend (its pool's [health NAME], or [health]; None: none).
        self.health_of: Callable[[Backend], Optional[HealthConfig]] = (
            health_of if health_of is not None else lambda b: self.config().health)
        self.rng = rng if rng is not None else random.Random()
        self.probes: Dict[Backend, _Probe] = {}
        self.running = False
        # Passive ejections in progress: their return timers and when they began.
        self._eject_timers: Dict[Backend, Timer] = {}
        self._ejected_at: Dict[Backend, float] = {}
        # Backends in slow start, and the one timer that ramps them all.
        self.ramping: Dict[Backend, None] = {}
        self._ramp_timer: Optional[Timer] = None
        # The backends this module has seen (a reload's new ones are the others).
        self._known: Dict[Backend, None] = {}

    @property
    def now(self) -> float:
        return self.reactor.now

    def jittered(self, interval: float) -> float:
        return interval * (1.0 + self.rng.uniform(-PROBE_JITTER, PROBE_JITTER))

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin probing (if [health] is configured)."""
        self.running = True
        backends = [b for b in self.pool.backends if not b.draining]
        self._known = dict.fromkeys(backends)
        for b in backends:
            # Backends present at start-up take their full weight at once (HAProxy applies slowstart
            # only to a server coming back up).
            b.set_effective_weight(b.weight)
            self._add_probe(b)
        self.pool.refresh()

    def stop(self) -> None:
        """Stop probing and cancel every timer (drain, stop)."""
        self.running = False
        for probe in self.probes.values():
            probe.close()
        self.probes.clear()
        for timer in self._eject_timers.values():
            timer.cancel()
        self._eject_timers.clear()
        self._ejected_at.clear()
        self._stop_ramp()

    def reload(self) -> None:
        """The pool's membership or the configuration changed: probe the new set."""
        if not self.running:
            return
        config = self.config()
        pool = self.pool
        current = [b for b in pool.backends if not b.draining]
        kept = dict.fromkeys(current)
        # Removed backends (gone, or draining their requests in flight): forget them.
        for b in [b for b in self.probes if b not in kept]:
            self.probes.pop(b).close()
        for b in [b for b in self._eject_timers if b not in kept]:
            self._eject_timers.pop(b).cancel()
            self._ejected_at.pop(b, None)
        for b in [b for b in self.ramping if b not in kept]:
            del self.ramping[b]
        # A changed health section applies to its backends, from a fresh first probe.
        for b in current:
            cfg = self.health_of(b)
            probe = self.probes.get(b)
            if probe is not None and probe.cfg != cfg:
                self.probes.pop(b).close()
            if cfg is None:
                # Without active checks nothing would ever bring a backend marked down back.
                b.reset_probes()
                if not b.up:
                    b.mark_up(self.now)
                    log.info("backend %s is UP again: health checks are off", b.name)
                    self._start_ramp(b)
        for b in current:
            if b not in self._known and b.up and not b.ejected_until:
                # Added by this reload: slow start from its creation (its up_since).
                self._start_ramp(b)
            if b not in self.probes:
                self._add_probe(b)
        self._known = kept
        if config.eject_after == 0:
            for b in list(self._eject_timers):
                self._end_ejection(b, "outlier detection is off")
        if config.slow_start <= 0.0:
            self._stop_ramp()
        now = self.now
        for b in current:
            # A changed weight takes effect now: at once, or as the ramp's share of it (the pool's
            # reload may have reset eff_weight to the new weight).
            if b in self.ramping:
                b.set_effective_weight(slow_start_weight(b.weight, now - b.up_since, config.slow_start))
            else:
                b.set_effective_weight(b.weight)
        self._ramp()
        pool.refresh()
        self.pool.wake()

    # ---- active probes ------------------------------------------------------------------------------
    def _add_probe(self, backend: Backend) -> None:
        cfg = self.health_of(backend)
        if cfg is None or backend in self.probes:
            return
        probe = _Probe(self, backend, cfg)
        self.probes[backend] = probe
        # The first probe at a random point of the first interval (HAProxy spreads its first checks).
        probe.schedule(self.now + self.rng.uniform(0.0, cfg.interval))

    def _probe_result(self, probe: _Probe, ok: bool, why: str) -> None:
        backend = probe.backend
        cfg = probe.cfg
        if ok:
            backend.probe_passed(self.now)
            if (backend.ejected_until and self.config().eject_after
                    and probe.started_at >= self._ejected_at.get(backend, probe.started_at)):
                # A probe begun after the ejection passed: the backend answers again, end it early.
                self._end_ejection(backend, "a health probe passed")
            if not backend.up and backend.health_successes >= cfg.rise:
                self._mark_up(backend, "%d consecutive probe passes" % backend.health_successes)
        else:
            backend.probe_failed(self.now, why)
            log.debug("backend %s: probe failed: %s", backend.name, why)
            if backend.up and backend.health_failures >= cfg.fall:
                self._mark_down(backend, "%d consecutive probe failures (last: %s)"
                                % (backend.health_failures, why))

    def _mark_down(self, backend: Backend, why: str) -> None:
        backend.mark_down()
        self.ramping.pop(backend, None)
        log.warning("backend %s is DOWN: %s", backend.name, why)
        self.pool.refresh()

    def _mark_up(self, backend: Backend, why: str) -> None:
        backend.mark_up(self.now)
        log.warning("backend %s is UP again: %s", backend.name, why)
        if not backend.ejected_until:
            self._start_ramp(backend)
            self._ramp()
        self.pool.refresh()
        self.pool.wake()

    # ---- passive outlier detection -------------------------------------------------------------------
    def failure(self, backend: Backend, kind: str) -> None:
        """A live request failed on ``backend``: ``kind`` is connect, reset or timeout."""
        backend.live_failure()
        after = self.config().eject_after
        if (not after or backend.consecutive_errors < after or backend.ejected_until
                or backend.draining or not self.running):
            return
        if backend.eligible and not self._may_eject(backend):
            if backend.consecutive_errors == after:
                log.warning("backend %s: %d consecutive failures (last: %s), but not ejected: that would "
                            "leave fewer than half of the backends in service", backend.name, after, kind)
            return
        self._eject(backend, "%d consecutive failures (last: %s)" % (backend.consecutive_errors, kind))

    def success(self, backend: Backend) -> None:
        """A live request succeeded on ``backend`` after failures (consecutive_errors > 0)."""
        # It served a request after coming back: the next ejection starts from the base cooldown.
        backend.live_success()

    def _may_eject(self, backend: Backend) -> bool:
        """Would ejecting one more eligible backend of ``backend``'s pool keep at least half of its
        backends (rounded up, at least one) eligible? Envoy's ``max_ejection_percent`` idea (here 50%):
        when many backends fail
        at once the cause is more likely shared (a database, the network) than the backends, and
        ejecting them all would only turn errors into 503s. Runs only when a backend reaches the
        ejection threshold, never per request."""
        total = eligible = 0
        owner = backend.owner
        for b in (owner.backends if owner is not None else self.pool.backends):
            if not b.draining:
                total += 1
                if b.eligible:
                    eligible += 1
        return eligible - 1 >= max(1, (total + 1) // 2)

    def _eject(self, backend: Backend, why: str) -> None:
        config = self.config()
        cooldown = min(config.eject_cooldown * 2.0 ** min(backend.ejections, _MAX_DOUBLINGS),
                       MAX_EJECT_COOLDOWN)
        now = self.now
        backend.eject(now + cooldown)
        self._ejected_at[backend] = now
        old = self._eject_timers.pop(backend, None)
        if old is not None:
            old.cancel()
        self._eject_timers[backend] = self.reactor.call_at(backend.ejected_until,
                                                           partial(self._eject_expired, backend))
        self.ramping.pop(backend, None)
        log.warning("backend %s ejected for %gs: %s", backend.name, cooldown, why)
        self.pool.refresh()

    def _eject_expired(self, backend: Backend) -> None:
        self._eject_timers.pop(backend, None)
        self._end_ejection(backend, "cooldown over")

    def _end_ejection(self, backend: Backend, why: str) -> None:
        timer = self._eject_timers.pop(backend, None)
        if timer is not None:
            timer.cancel()
        self._ejected_at.pop(backend, None)
        if not backend.ejected_until:
            return
        backend.clear_ejection()
        if backend.draining or backend not in self._known:
            return
        # On probation (nginx tries a server once after fail_timeout): one more failure ejects it again,
        # with a doubled cooldown; its first success (the proxy reports it, as consecutive_errors > 0)
        # ends the probation and resets the ejection count.
        backend.start_probation(self.now, max(1, self.config().eject_after - 1))
        log.info("backend %s is back from ejection: %s", backend.name, why)
        if backend.up:
            self._start_ramp(backend)
            self._ramp()
        self.pool.refresh()
        self.pool.wake()

    # ---- slow start ------------------------------------------------------------------------------------
    def _start_ramp(self, backend: Backend) -> None:
        """Put ``backend`` in slow start from its ``up_since`` (the caller refreshes the pool)."""
        slow_start = self.config().slow_start
        if slow_start <= 0.0:
            backend.set_effective_weight(backend.weight)
            return
        backend.set_effective_weight(slow_start_weight(backend.weight, self.now - backend.up_since, slow_start))
        if backend.eff_weight < backend.weight:
            self.ramping[backend] = None

    def _ramp(self) -> None:
        """Arm the ramp timer if some backend is ramping and it is not armed yet."""
        if self.ramping and self._ramp_timer is None:
            self._ramp_timer = self.reactor.call_at(self.now + SLOW_START_STEP, self._ramp_step)

    def _ramp_step(self) -> None:
        self._ramp_timer = None
        slow_start = self.config().slow_start
        now = self.now
        changed = False
        for b in list(self.ramping):
            w = slow_start_weight(b.weight, now - b.up_since, slow_start)
            if w != b.eff_weight:
                b.set_effective_weight(w)
                changed = True
            if w >= b.weight:
                del self.ramping[b]
        if changed:
            self.pool.refresh()
        self._ramp()

    def _stop_ramp(self) -> None:
        for b in self.ramping:
            b.set_effective_weight(b.weight)
        self.ramping.clear()
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None
