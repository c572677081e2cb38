"""Backends, their state and live counters, and the choice among them. No I/O here: the proxy owns
the sockets, ``health.py`` the probes; a backend only holds its idle pooled connections
(``connpool.IdlePool``) so the proxy can reuse them.

A backend is *eligible* for new requests when it is up (by health checks), not ejected (by passive
outlier detection) and not draining (removed by a reload). The strategy is told the eligible set
whenever it changes, and picks among it per request; the pool then applies per-backend
``max_connections`` (a full backend is skipped; when every eligible backend is full the request waits
in a FIFO queue for a slot, up to ``queue_timeout``, and the pool wakes the queue when a slot frees).

A backend's state changes only through its own methods; the pool's queue only through the pool's.
"""

from __future__ import annotations

import logging
import socket
from bisect import bisect_left
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Collection, Deque, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from .config import (DEFAULT_POOL, DEFAULT_QUEUE_TIMEOUT, DEFAULT_RETRIES, BackendConfig, Config, HealthConfig,
                     PoolConfig)
from .connpool import IdlePool
from .limits import RETRY_CONNECT, RetryBudget, retry_mask
from .sticky import Sticky, sticky_key

if TYPE_CHECKING:
    from .http.heads import RequestHead

__all__ = ["Backend", "Pool", "Pools", "Waiter", "Ticket", "Chooser", "StrategyFactory", "resolve", "LATENCY_BUCKETS",
           "ADMIN_READY", "ADMIN_DRAIN", "ADMIN_MAINT"]

log = logging.getLogger("balrs")

SockAddr = Tuple[Any, ...]

# Upper bounds (seconds) of the per-backend latency histogram, time to response head (Prometheus
# client default buckets).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Weight of a new sample in the response-time moving average (nginx Plus least_time and Envoy use
# similar short windows): 0.3 follows a change within a few requests without jumping on one outlier.
# Admin states of a backend (the admin API's drain, maint and ready).
ADMIN_READY = ""
ADMIN_DRAIN = "drain"
ADMIN_MAINT = "maint"

EWMA_ALPHA = 0.3
# After this long without a sample, the next one weighs more (half of the old average is forgotten per
# half-life of silence), matching the strategies' decay of old samples (strategies.DECAY_HALF_LIFE).
EWMA_GAP = 1.0
EWMA_GAP_HALF_LIFE = 10.0


def resolve(host: str, port: int) -> List[Tuple[int, SockAddr]]:
    """Every (family, sockaddr) of a backend address, in getaddrinfo's order. Blocking: called at
    start-up and from the resolver thread, never from the event loop's request path."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    out: List[Tuple[int, SockAddr]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if (family, sockaddr) not in out:
            out.append((int(family), sockaddr))
    if not out:
        raise OSError("no address for %s" % host)
    return out


class Backend:
    """One backend server: its address, weight, state and counters.

    Strategies read ``eff_weight`` (the configured weight, ramped down during slow start), ``active``
    and ``ewma``; health checks and passive outlier detection write ``up``/``ejected_until``;
    the proxy updates the counters.
    """

    __slots__ = (
        "name", "config", "family", "sockaddr", "addrs", "host_header", "resolved",
        "weight", "eff_weight", "max_connections",
        "active", "requests", "failures", "responses", "latency", "latency_sum",
        "up", "health_successes", "health_failures", "transitions", "last_check", "last_check_ok", "last_check_why",
        "ejected_until", "ejections", "consecutive_errors", "up_since", "draining", "admin_state",
        "ewma", "ewma_at", "idle", "pool", "owner", "tls", "send_proxy",
    )

    def __init__(self, config: BackendConfig, now: float = 0.0, resolve_now: bool = True) -> None:
        self.name = config.name
        self.config = config
        # Address: resolved at start-up; host names are re-resolved off the loop (resolver thread).
        self.family: int = socket.AF_INET
        self.sockaddr: SockAddr = ("0.0.0.0", 0)
        self.addrs: List[Tuple[int, SockAddr]] = []   # every address of a host name; sockaddr is one
        self.resolved = False
        if resolve_now:
            self.resolve()
        # Host field for requests that come without one (HTTP/1.0 clients).
        self.host_header = str(config.address).encode("ascii", "replace")
        self.weight = config.weight
        self.eff_weight: float = config.weight  # fractional during slow start
        self.max_connections = config.max_connections
        # Counters.
        self.active = 0          # requests in flight on this backend
        self.requests = 0        # requests sent to it, ever
        self.failures = 0        # connect failures, broken or timed-out responses
        # By status // 100: index 1..5 = 1xx..5xx; 6..9 count the codes 600..999 that RFC 9110 §15 calls
        # invalid but a proxy forwards (HAProxy does), reported as 5xx (§15: a client "SHOULD process the
        # response as if it had a 5xx status code"). A status is always 100..999 (three digits, checked
        # by the parser), so the index is always in range.
        self.responses = [0] * 10
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # histogram counts, last = +Inf
        self.latency_sum = 0.0
        # Health (active checks) and passive outlier detection.
        self.up = True
        self.health_successes = 0    # consecutive passing probes
        self.health_failures = 0     # consecutive failing probes
        self.transitions = 0         # up <-> down changes
        self.last_check = 0.0        # when the last probe finished
        self.last_check_ok = True
        self.last_check_why = ""     # what the last failing probe saw
        self.ejected_until = 0.0     # passive: out of rotation until then
        self.ejections = 0           # consecutive ejections (the cooldown grows with them)
        self.consecutive_errors = 0  # live-traffic failures in a row
        self.up_since = now          # when it (re)entered service, for slow start
        self.draining = False        # removed by a reload; finishing its requests in flight
        self.admin_state = ADMIN_READY  # set by the admin API: drain or maint
        # Response time: moving average of time to response head; -1.0 = never measured.
        self.ewma = -1.0
        self.ewma_at = 0.0
        # Idle keep-alive connections.
        self.idle = IdlePool(self.name)
        # The pool it belongs to (by name, and the object, set by Pools): whose queue a freed slot wakes.
        self.pool = config.pool
        self.owner: Optional[Pool] = None
        # How connections to it are made: a TLS connector (set by the server from tls.load_tls; None =
        # plain TCP), and the PROXY protocol header version each new connection starts with ("off").
        self.tls: Optional[Any] = None
        self.send_proxy = config.send_proxy

    def resolve(self) -> bool:
        """Resolve the address now (blocking). Returns True on success."""
        try:
            self.set_addresses(resolve(self.config.address.host, self.config.address.port))
        except OSError as exc:
            log.error("backend %s: cannot resolve %s: %s", self.name, self.config.address.host, exc)
            return False
        self.resolved = True
        return True

    def set_addresses(self, addrs: List[Tuple[int, SockAddr]]) -> bool:
        """Adopt a (new) address list; keep using the current address if it is still in it. Returns
        True if the address connections go to changed."""
        current = (self.family, self.sockaddr)
        self.addrs = list(addrs)
        if self.resolved and current in self.addrs:
            return False
        self.family, self.sockaddr = self.addrs[0]
        return True

    def next_address(self) -> bool:
        """Connect to the next address of a host name from now on (the current one failed). Returns
        False when there is no other address."""
        addrs = self.addrs
        if len(addrs) < 2:
            return False
        try:
            i = addrs.index((self.family, self.sockaddr))
        except ValueError:
            i = -1
        self.family, self.sockaddr = addrs[(i + 1) % len(addrs)]
        return True

    @property
    def address(self) -> str:
        return str(self.config.address)

    @property
    def eligible(self) -> bool:
        """Up, resolved, not ejected, not draining and not set aside by the admin API (ejection expiry
        is applied by the pool)."""
        return self.up and self.resolved and not self.draining and not self.ejected_until and not self.admin_state

    @property
    def state(self) -> str:
        """``up``, ``down``, ``drain`` or ``maint`` (as /status reports it)."""
        if self.draining or self.admin_state == ADMIN_DRAIN:
            return "drain"
        if self.admin_state == ADMIN_MAINT:
            return "maint"
        return "up" if self.up and self.resolved and not self.ejected_until else "down"

    def set_admin_state(self, state: str) -> None:
        """The admin API's word: ``ADMIN_DRAIN`` (no new requests; those in flight finish),
        ``ADMIN_MAINT`` (no traffic, no health probes) or ``ADMIN_READY`` (back to normal). It survives a
        reload that keeps this backend (same name and address)."""
        self.admin_state = state

    def set_weight(self, weight: int) -> None:
        """A weight set at runtime (the admin API), until the next reload."""
        self.weight = weight
        self.eff_weight = weight

    @property
    def full(self) -> bool:
        return bool(self.max_connections) and self.active >= self.max_connections

    # ---- live traffic (the proxy, through the exchange) ----
    def take_slot(self) -> None:
        """A request goes in flight on this backend."""
        self.active += 1
        self.requests += 1

    def release_slot(self) -> bool:
        """A request in flight here ended. True when this backend has a slot limit (a request waiting
        in the queue may now fit)."""
        self.active -= 1
        return bool(self.max_connections)

    def record_failure(self) -> None:
        """A connect failure, or a broken or timed-out response (counted; the health side decides)."""
        self.failures += 1

    def apply_config(self, config: BackendConfig) -> None:
        """A reload kept this backend (same name and address): take its new weight, limits and pool."""
        old = self.config
        self.config = config
        self.pool = config.pool
        self.weight = config.weight
        self.eff_weight = config.weight
        self.max_connections = config.max_connections
        self.send_proxy = config.send_proxy
        if (old.tls, old.send_proxy) != (config.tls, config.send_proxy):
            # Pooled connections were made the old way (plain vs TLS, with or without a PROXY header).
            self.idle.close_all()

    def set_effective_weight(self, weight: float) -> None:
        """Slow start ramps the weight strategies see (health.py)."""
        self.eff_weight = weight

    def observe(self, seconds: float, now: float, status: int = 0) -> None:
        """A response head (``status``) arrived ``seconds`` after the request was sent."""
        ewma = self.ewma
        if ewma >= 0.0 and now - self.ewma_at < EWMA_GAP:
            self.ewma = ewma + EWMA_ALPHA * (seconds - ewma)
        elif ewma < 0.0:
            self.ewma = seconds
        else:
            # A sample after a long quiet gap counts for more: the old average describes a backend that
            # may have recovered (or degraded) since, so a re-tried backend is judged on what it does now.
            alpha = max(EWMA_ALPHA, 1.0 - 0.5 ** ((now - self.ewma_at) / EWMA_GAP_HALF_LIFE))
            self.ewma = ewma + alpha * (seconds - ewma)
        self.ewma_at = now
        self.latency_sum += seconds
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.responses[status // 100] += 1

    # ---- health (health.py decides when) ----
    def probe_passed(self, now: float) -> int:
        """An active probe passed: consecutive passes so far."""
        self.last_check = now
        self.last_check_ok = True
        self.health_successes += 1
        self.health_failures = 0
        return self.health_successes

    def probe_failed(self, now: float, why: str = "") -> int:
        """An active probe failed (``why``: what it saw): consecutive failures so far."""
        self.last_check = now
        self.last_check_ok = False
        self.last_check_why = why
        self.health_failures += 1
        self.health_successes = 0
        return self.health_failures

    def mark_down(self) -> None:
        self.up = False
        self.transitions += 1

    def mark_up(self, now: float) -> None:
        """Back in service (it re-enters slow start from ``now``)."""
        self.up = True
        self.transitions += 1
        self.up_since = now

    def reset_probes(self) -> None:
        """Active checks were turned off: their counts mean nothing now."""
        self.health_successes = self.health_failures = 0

    def live_failure(self) -> int:
        """A live request failed here: consecutive live failures so far."""
        self.consecutive_errors += 1
        return self.consecutive_errors

    def live_success(self) -> None:
        """A live request succeeded after failures; out of probation when not ejected."""
        self.consecutive_errors = 0
        if not self.ejected_until:
            self.ejections = 0

    def eject(self, until: float) -> None:
        """Passive outlier detection takes it out of rotation until ``until``."""
        self.ejected_until = until
        self.ejections += 1

    def clear_ejection(self) -> None:
        self.ejected_until = 0.0

    def start_probation(self, now: float, errors: int) -> None:
        """Back in rotation at ``now`` after an ejection, counted as ``errors`` consecutive live failures
        already (one more failure ejects it again)."""
        self.up_since = now
        self.consecutive_errors = errors

    def mark_resolved(self, now: float) -> bool:
        """The resolver found a first address: the backend can enter service. True if it was new."""
        if self.resolved:
            return False
        self.resolved = True
        self.up_since = now
        return True

    def retire(self) -> None:
        """A reload removed this backend: no new requests; those in flight finish."""
        self.draining = True

    def __repr__(self) -> str:
        return "<Backend %s %s %s>" % (self.name, self.config.address, self.state)


class Waiter(Protocol):
    """A request waiting in the queue for a backend slot."""

    def dequeue(self) -> bool:
        """Try again: True when the request got a backend (or no longer waits), False to keep waiting."""


class Chooser(Protocol):
    """A strategy as the pool uses it (``strategies.Strategy``): told the eligible set, picks one."""

    backends: List[Backend]

    def update(self, backends: Sequence[Backend]) -> None: ...

    def choose(self, req: RequestHead, client_ip: str) -> Optional[Backend]: ...

    def choose_excluding(self, req: RequestHead, client_ip: str,
                         exclude: Collection[Backend]) -> Optional[Backend]: ...

    def view(self, req: RequestHead, client_ip: str) -> Dict[str, object]: ...


# make(name, eligible backends, hash_key, clock): a strategy instance (strategies.make_strategy).
StrategyFactory = Callable[[str, Sequence[Backend], str, Callable[[], float]], Chooser]


class Ticket:
    """A place in the queue; ``waiter`` is None once the request left it."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: Waiter) -> None:
        self.waiter: Optional[Waiter] = waiter


def _run_now(callback: Callable[[], object]) -> None:
    callback()


class Pool:
    """The backends of a balancer, the strategy that picks among the eligible ones, and the queue of
    requests waiting for a backend slot. ``call_soon`` schedules the queue's wake-up after the current
    step (the reactor's), so a slot freed inside connection code is handed on from the loop."""

    def __init__(self, configs: Sequence[BackendConfig], strategy: str, hash_key: str = "client_ip",
                 clock: Callable[[], float] = time.monotonic,
                 call_soon: Callable[[Callable[[], object]], None] = _run_now, *,
                 make_strategy: StrategyFactory, name: str = DEFAULT_POOL,
                 backends: Optional[List[Backend]] = None) -> None:
        self.name = name
        self.clock = clock
        self.make_strategy = make_strategy
        self.call_soon = call_soon
        now = clock()
        self.backends: List[Backend] = (list(backends) if backends is not None
                                        else [Backend(c, now) for c in configs])
        for b in self.backends:
            b.owner = self
        self.strategy_name = strategy
        self.hash_key = hash_key
        self.strategy: Chooser = make_strategy(strategy, self.eligible(), hash_key, clock)
        # Requests waiting for a backend slot (every eligible backend at max_connections), FIFO. One
        # that gives up voids its ticket (O(1)); the pump skips void tickets.
        self.queue: Deque[Ticket] = deque()
        self.queued = 0   # live tickets in the queue
        self._wake_scheduled = False
        self.limited = any(b.max_connections for b in self.backends)
        self.direct = not self.limited  # see _set_direct (sticky is set later, by set_policy)
        # Backends a reload removed while they still had requests in flight (reported as "drain").
        self.retired: List[Backend] = []
        # Pool policy ([pool NAME] over [balancer]; Pools sets them), and the pool used while none of
        # this one's backends is eligible.
        self.retries = DEFAULT_RETRIES
        self.queue_timeout = DEFAULT_QUEUE_TIMEOUT
        self.backup: Optional[Pool] = None
        self.health = ""  # the [health NAME] section probing it ("": [health])
        # Traffic policy (limits.py, sticky.py): retry_on as bits; the retry budget, fed with the count
        # of first attempts (``requests``, one addition per request) once a second (``sync_budget``,
        # from the server's timer); the panic threshold (a share of backends up; 0 = off) and
        # whether the pool is in panic now; the sticky cookie (None = off).
        self.retry_on = RETRY_CONNECT
        self.budget = RetryBudget(0.2)
        self.requests = 0
        self._budget_synced = 0
        self.retries_total = 0        # every retry (connect failures included)
        self.panic_threshold = 0.0
        self.panicking = False
        self.sticky: Optional[Sticky[Backend]] = None
        # With sticky on: the backends in rotation now, for an O(1) check of a cookie's backend.
        self.rotation: Set[Backend] = set()

    def set_backends(self, backends: List[Backend], strategy: str, hash_key: str) -> None:
        """A reload gave this pool these backends (kept ones keep their state): tell the strategy."""
        self.backends = list(backends)
        for b in backends:
            b.owner = self
        self.limited = any(b.max_connections for b in backends)
        self._set_direct()
        if strategy != self.strategy_name or hash_key != self.hash_key:
            self.strategy_name = strategy
            self.hash_key = hash_key
            self.strategy = self.make_strategy(strategy, self._in_rotation(), hash_key, self.clock)
            if self.sticky is not None:
                self.sticky.members(self.backends)
                self.rotation = set(self.strategy.backends)
        else:
            self.refresh()

    def has_eligible(self) -> bool:
        return bool(self.strategy.backends)

    def reload(self, configs: Sequence[BackendConfig], strategy: str, hash_key: str,
               resolve_now: Callable[[BackendConfig], bool]) -> Tuple[List[Backend], List[Backend]]:
        """Adopt a new backend list. A backend whose name and address are unchanged keeps its object,
        so its health state and counters carry over; a new one starts fresh (resolved now only if
        ``resolve_now(config)``; host names go to the resolver thread); a removed one drains: it gets
        no new requests and finishes those in flight. Returns (added, removed)."""
        backends, added, removed = match_backends(self.backends, configs, self.clock(), resolve_now)
        self.retired = [b for b in self.retired + removed if b.active]
        self.set_backends(backends, strategy, hash_key)
        return added, removed

    def eligible(self) -> List[Backend]:
        return [b for b in self.backends if b.eligible]

    def refresh(self) -> None:
        """Tell the strategy that health, weights or membership changed."""
        backends = self._in_rotation()
        self.strategy.update(backends)
        sticky = self.sticky
        if sticky is not None:
            sticky.members(self.backends)
            self.rotation = set(backends)

    def _in_rotation(self) -> List[Backend]:
        """The backends the strategy picks among: the eligible ones, or in panic every one of them."""
        eligible = self.eligible()
        threshold = self.panic_threshold
        if not threshold:
            if self.panicking:  # a reload turned panic mode off in the middle of an episode
                self.panicking = False
                log.warning("pool %s: out of panic: panic_threshold is now 0", self.name)
            return eligible
        candidates = [b for b in self.backends if b.resolved and not b.draining]
        # Below the threshold, but not when none is up and a backup pool can serve instead.
        panic = (bool(candidates) and len(eligible) < threshold * len(candidates)
                 and (bool(eligible) or self.backup is None))
        if panic != self.panicking:
            self.panicking = panic
            if panic:
                log.warning("pool %s: panic: %d of %d backends up, below panic_threshold %g%%; balancing "
                            "over all of them", self.name, len(eligible), len(candidates), threshold * 100)
            else:
                log.warning("pool %s: out of panic: %d of %d backends up", self.name, len(eligible),
                            len(candidates))
        return candidates if panic else eligible

    def set_policy(self, retry_on: Tuple[str, ...], budget: float, panic_threshold: float,
                   sticky: Optional[Sticky[Backend]]) -> None:
        """The pool's traffic policy ([pool] over [balancer]), at start and on every reload. The
        budget's window carries over a reload."""
        self.retry_on = retry_mask(retry_on)
        self.budget.ratio = budget
        self.panic_threshold = panic_threshold
        old = self.sticky
        if sticky is None or old is None or (sticky.name, sticky.key) != (old.name, old.key):
            self.sticky = sticky
        if sticky is None:
            self.rotation = set()
        self._set_direct()
        self.refresh()

    def _set_direct(self) -> None:
        """The strategy's pick is the choice when there is no slot limit and no sticky cookie: the request
        path then asks the strategy directly."""
        self.direct = not self.limited and self.sticky is None

    def sync_budget(self, now: float) -> None:
        """Hand the requests counted since the last call to the retry budget (the server's timer
        calls this once a second, and every retry before it asks the budget)."""
        n = self.requests - self._budget_synced
        if n:
            self._budget_synced = self.requests
            self.budget.request(now, n)

    def try_retry(self, now: float) -> bool:
        """Whether the retry budget allows one more retry now (counted if so)."""
        self.sync_budget(now)
        return self.budget.try_retry(now)

    def choose_sticky(self, req: RequestHead, client_ip: str) -> Tuple[Optional[Backend], bool]:
        """With a sticky cookie: the backend the request's cookie names while it is in rotation and not
        full, else the strategy's pick. Returns (backend, whether the response must set the cookie)."""
        sticky = self.sticky
        assert sticky is not None
        b = sticky.wanted(req)
        if b is not None and b in self.rotation and not b.full:
            return b, False
        return self.choose(req, client_ip), True

    def by_name(self, name: str) -> Optional[Backend]:
        for b in self.backends:
            if b.name == name:
                return b
        return None

    # ---- choosing ----------------------------------------------------------------------------------
    def choose(self, req: RequestHead, client_ip: str,
               exclude: Optional[Collection[Backend]] = None) -> Optional[Backend]:
        """A backend for this request, or None (none eligible, or all eligible ones full: see
        :meth:`all_full`). Retries pass the backends already tried in ``exclude``."""
        strategy = self.strategy
        b = (strategy.choose_excluding(req, client_ip, exclude) if exclude
             else strategy.choose(req, client_ip))
        if b is None or not self.limited or not b.full:
            return b
        # The strategy's pick is at max_connections: its choice among those with a free slot (one
        # pass to find the full ones, one more pick: O(backends), not a pick per full backend).
        skip: Set[Backend] = {x for x in strategy.backends if x.full}
        if exclude:
            skip.update(exclude)
        return strategy.choose_excluding(req, client_ip, skip)

    def all_full(self) -> bool:
        """True when there are eligible backends but every one of them is at max_connections."""
        if not self.limited:
            return False
        backends = self.strategy.backends
        return bool(backends) and all(b.full for b in backends)

    # ---- the queue ---------------------------------------------------------------------------------
    def enqueue(self, waiter: Waiter) -> Ticket:
        """Queue ``waiter`` (FIFO); keep the ticket to leave the queue in O(1)."""
        ticket = Ticket(waiter)
        self.queue.append(ticket)
        self.queued += 1
        return ticket

    def leave_queue(self, ticket: Ticket) -> None:
        """The request stops waiting (answered, or gone): its ticket is void, skipped by the pump."""
        if ticket.waiter is not None:
            ticket.waiter = None
            self.queued -= 1

    def wake(self) -> None:
        """A backend slot may have freed up (or a backend came back): let waiting requests try again,
        in order, from the loop (not from inside the connection code that freed the slot)."""
        if not self._wake_scheduled and self.queued:
            self._wake_scheduled = True
            self.call_soon(self._pump)

    def _pump(self) -> None:
        self._wake_scheduled = False
        queue = self.queue
        while queue:
            ticket = queue.popleft()
            waiter = ticket.waiter
            if waiter is None:
                continue
            ticket.waiter = None
            self.queued -= 1
            if not waiter.dequeue():
                # Still no slot: back to the head of the queue (it keeps its place).
                ticket.waiter = waiter
                self.queued += 1
                queue.appendleft(ticket)
                break


def match_backends(current: Sequence[Backend], configs: Sequence[BackendConfig], now: float,
                   resolve_now: Callable[[BackendConfig], bool]
                   ) -> Tuple[List[Backend], List[Backend], List[Backend]]:
    """A reload's backends: one whose name and address are unchanged keeps its object (health state and
    counters carry over) and takes its new config; a new one starts fresh (resolved now only if
    ``resolve_now(config)``); a removed one retires (drains). Returns (backends, added, removed)."""
    old = {(b.name, str(b.config.address)): b for b in current}
    backends: List[Backend] = []
    added: List[Backend] = []
    for c in configs:
        b = old.pop((c.name, str(c.address)), None)
        if b is None:
            b = Backend(c, now, resolve_now(c))
            added.append(b)
        else:
            b.apply_config(c)
        backends.append(b)
    removed = list(old.values())
    for b in removed:
        b.retire()
    return backends, added, removed


def _pool_configs(config: Config) -> List[PoolConfig]:
    """The pools of ``config``: its [pool] sections and implicit ones (named by a backend's ``pool``),
    whether or not the parser listed the implicit ones (a Config built in code may not)."""
    out = list(config.pools)
    names = {p.name for p in out}
    for c in config.backends:
        if c.pool not in names:
            names.add(c.pool)
            out.append(PoolConfig(c.pool))
    return out


class Pools:
    """Every pool of a balancer, by name, over one list of backends (names are unique across pools).
    A reload matches backends by name and address across all pools (a backend may change pool and
    keep its state), keeps a pool's object (and its queue) by name, and builds new ones. With
    ``resolve=False`` no address is looked up and every backend counts as resolved (a model of the
    pools for ``explain`` and ``simulate``)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 call_soon: Callable[[Callable[[], object]], None] = _run_now, *,
                 make_strategy: StrategyFactory, resolve: bool = True) -> None:
        self.clock = clock
        self.call_soon = call_soon
        self.make_strategy = make_strategy
        now = clock()
        self.backends: List[Backend] = [Backend(c, now, resolve) for c in config.backends]
        if not resolve:
            # A model of the pools (explain, simulate): every backend counts as resolved, no DNS asked.
            for b in self.backends:
                b.mark_resolved(now)
        self.named: Dict[str, Pool] = {}
        self.order: List[Pool] = []
        self.default: Optional[Pool] = None
        self.retired: List[Backend] = []
        self.config = config
        self._assign(config)

    def _assign(self, config: Config) -> None:
        self.config = config
        members: Dict[str, List[Backend]] = {}
        configs = _pool_configs(config)
        for pc in configs:
            members[pc.name] = []
        for b in self.backends:
            members[b.pool].append(b)
        by_name: Dict[str, Pool] = {}
        for pc in configs:
            strategy = pc.strategy if pc.strategy is not None else config.strategy
            hash_key = pc.hash_key if pc.hash_key is not None else config.hash_key
            pool = self.named.get(pc.name)
            if pool is None:
                pool = Pool((), strategy, hash_key, self.clock, self.call_soon,
                            make_strategy=self.make_strategy, name=pc.name, backends=members[pc.name])
            else:
                pool.set_backends(members[pc.name], strategy, hash_key)
            pool.retries = pc.retries if pc.retries is not None else config.retries
            pool.queue_timeout = pc.queue_timeout if pc.queue_timeout is not None else config.queue_timeout
            pool.health = pc.health
            by_name[pc.name] = pool
        for pc in configs:
            by_name[pc.name].backup = by_name.get(pc.backup) if pc.backup else None
        key: Optional[bytes] = None
        for pc in configs:
            cookie = pc.sticky if pc.sticky is not None else config.sticky
            sticky: Optional[Sticky[Backend]] = None
            if cookie:
                if key is None:
                    key = sticky_key(config.sticky_secret, (b.name for b in config.backends))
                sticky = Sticky(cookie, key)
            by_name[pc.name].set_policy(
                pc.retry_on if pc.retry_on is not None else config.retry_on,
                pc.retry_budget if pc.retry_budget is not None else config.retry_budget,
                pc.panic_threshold if pc.panic_threshold is not None else config.panic_threshold,
                sticky)
        for name, pool in self.named.items():
            if name not in by_name:
                # A removed pool: no backends; its waiting requests try again and time out.
                pool.set_backends([], pool.strategy_name, pool.hash_key)
                pool.backup = None
                pool.wake()
        self.named = by_name
        self.order = [by_name[pc.name] for pc in configs]
        self.default = by_name.get(DEFAULT_POOL)

    def reload(self, config: Config,
               resolve_now: Callable[[BackendConfig], bool]) -> Tuple[List[Backend], List[Backend]]:
        """Adopt ``config``'s pools and backends. A backend whose name and address are unchanged keeps
        its object, so its health state and counters carry over; a new one starts fresh (resolved now
        only if ``resolve_now(config)``: host names go to the resolver thread); a removed one drains.
        Returns (added, removed)."""
        backends, added, removed = match_backends(self.backends, config.backends, self.clock(), resolve_now)
        self.retired = [b for b in self.retired + removed if b.active]
        self.backends = backends
        self._assign(config)
        return added, removed

    def sync_budgets(self, now: float) -> bool:
        """Hand each pool's request count of the last second to its retry budget (``Pool.sync_budget``),
        for the pools whose retry_on charges it. False when no pool does (the caller's once-a-second
        timer can stop)."""
        any_charged = False
        for pool in self.order:
            if pool.retry_on & ~RETRY_CONNECT:
                pool.sync_budget(now)
                any_charged = True
        return any_charged

    @property
    def queued(self) -> int:
        """Requests waiting for a backend slot, in every pool."""
        return sum(pool.queued for pool in self.order)

    @property
    def strategy_name(self) -> str:
        """The default pool's strategy (the balancer's, when there is no default pool)."""
        pool = self.default
        return pool.strategy_name if pool is not None else self.config.strategy

    def refresh(self) -> None:
        """Health, weights or membership changed: every pool tells its strategy."""
        for pool in self.order:
            pool.refresh()

    def wake(self) -> None:
        for pool in self.order:
            pool.wake()

    @property
    def strategy(self) -> Chooser:
        """The default pool's strategy (the first pool's when there is no default pool)."""
        pool = self.default if self.default is not None else self.order[0]
        return pool.strategy

    def by_name(self, name: str) -> Optional[Backend]:
        """The backend of that name, in any pool."""
        return self.by_backend(name)

    def by_backend(self, name: str) -> Optional[Backend]:
        for b in self.backends:
            if b.name == name:
                return b
        return None

    def health_of(self, backend: Backend, config: Optional[Config] = None) -> Optional[HealthConfig]:
        """The health-check settings probing ``backend`` (its pool's [health NAME], else [health]) in
        ``config`` (default: the one the pools were built from)."""
        if config is None:
            config = self.config
        pool = self.named.get(backend.pool)
        name = pool.health if pool is not None else ""
        if not name:
            return config.health
        for n, h in config.healths:
            if n == name:
                return h
        return config.health
