"""The exchange: one request and its response, from the first byte of the head to the last of the body.

The client connection makes an ``Exchange`` when a request head arrives (or is refused) and finishes it
exactly once, with an ``end`` reason, when the last response byte is queued or the exchange dies. It
records what an access log line and the counters need (backend, retries, status, bytes each way,
timestamps, how it ended), and it holds the backend slot: taken with :meth:`Exchange.take` when a
connection to a backend takes the request on, released with :meth:`Exchange.release` exactly once per
take. The two connection state machines share the exchange instead of reaching into each other: the
upstream side reads the request and the client side's wishes from it, and calls the client side only
through the small :class:`Downstream` interface.

``ProxyContext`` is what connections need from the process they run in (the reactor, the settings, the
pool, the passive health hooks, the counters, the access log), passed in by the server; nothing here
knows the server.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, AbstractSet, Callable, Deque, Dict, List, Optional, Protocol, Tuple

from ..http.heads import RequestHead, ResponseHead
from ..transport import Chunk, Transport

if TYPE_CHECKING:
    from ..pool import Backend, Pool, Pools
    from ..routing import Route, RouteTable
    from ..reactor import Reactor
    from ..limits import ClientBuckets, ClientConnections
    from ..settings import Settings

__all__ = [
    "Exchange", "ProxyContext", "Downstream", "Outliers", "ResponseEdit", "HeadEdit",
    "F_CONNECT_REFUSED", "F_CONNECT_TIMEOUT", "F_STALE", "F_BROKEN", "F_TIMEOUT", "F_INTERNAL", "F_EMPTY",
    "REPLAY_MAX",
]

log = logging.getLogger("balrs")

# Why an upstream attempt failed (passed to Downstream.upstream_failed).
F_CONNECT_REFUSED = 1   # connect refused or unreachable: retried on another backend
F_CONNECT_TIMEOUT = 2   # connect_timeout expired: retried on another backend
F_STALE = 3             # a reused pooled connection was closed before any response byte
F_BROKEN = 4            # the backend closed, reset or sent garbage before a complete head
F_TIMEOUT = 5           # backend_timeout expired
F_INTERNAL = 6          # a bug in balrs on this exchange (an exception in a callback): 500, not the backend's fault
F_EMPTY = 7             # a new connection closed (or reset) before any response byte (retry_on empty-response)

# A request body up to this size is kept while the request is in flight, so that a retry (retry_on
# conditions other than connect-failure) can send it again (nginx keeps the body it buffered; Envoy's
# per-request buffer limit for retries is 16 KiB by default).
REPLAY_MAX = 65536

# How an exchange ended (the access log's ``end``).
END_OK = "ok"                         # the whole response went to the client
END_CLIENT_ABORT = "client-abort"     # the client closed or reset before the response was complete
END_CLIENT_TIMEOUT = "client-timeout"  # the client was too slow sending its request or reading the answer
END_BACKEND_TIMEOUT = "backend-timeout"  # backend_timeout expired (504, or a truncated body)
END_BACKEND_ERROR = "backend-error"   # no backend could be connected, or it broke the response (502)
END_REJECTED = "rejected"             # balrs refused the request (4xx/5xx of its own, never forwarded)
END_NO_BACKEND = "no-backend"         # no backend is up (503)
END_NO_ROUTE = "no-route"           # no route matched and there is no default pool (404)
END_QUEUE_TIMEOUT = "queue-timeout"   # every backend stayed full for queue_timeout (503)
END_INTERNAL = "internal-error"       # a bug in balrs (500)
END_SHUTDOWN = "shutdown"             # the balancer stopped before the exchange finished
END_TUNNEL = "tunnel"                 # a 101 tunnel, ended by either side
END_LIMITED = "limited"               # over client_rate or client_connections (429)


class ResponseEdit(Protocol):
    """Changes to a response head on its way to the client: fields removed (lowercased names) and
    complete field lines added (a route's set/remove_response_header, a sticky cookie)."""

    @property
    def response_remove(self) -> AbstractSet[bytes]: ...

    @property
    def response_extra(self) -> bytes: ...


class HeadEdit:
    """A :class:`ResponseEdit` made for one exchange (a route's edits plus a Set-Cookie line)."""

    __slots__ = ("response_remove", "response_extra")

    def __init__(self, remove: AbstractSet[bytes], extra: bytes) -> None:
        self.response_remove = remove
        self.response_extra = extra


class Outliers(Protocol):
    """Passive health: live traffic reports backend failures and successes (``health.Health``)."""

    def failure(self, backend: Backend, kind: str) -> None: ...

    def success(self, backend: Backend) -> None: ...


class Downstream(Protocol):
    """What the upstream side may ask of the client side of an exchange."""

    close_after: bool
    # The settings the exchange runs with (taken when its request started).
    settings: Settings
    # The client's transport: the upstream side writes response bytes straight into it (counting them
    # in the exchange's bytes_out).
    tr: Transport

    def write(self, data: Chunk) -> None: ...

    def write_parts(self, parts: List[Chunk]) -> None: ...

    def response_head(self, resp: ResponseHead) -> Tuple[bytes, int]: ...

    def interim_response(self, head: bytes) -> None: ...

    def response_done(self) -> None: ...

    def upstream_failed(self, why: int, pending: Optional[Deque[Chunk]], nbytes: int) -> None: ...

    def retry_target(self, condition: int) -> Optional[Backend]: ...

    def resend(self, backend: Backend) -> None: ...

    def start_tunnel(self, data: bytes) -> None: ...

    def pause_for_upstream(self) -> None: ...

    def resume_for_upstream(self) -> None: ...

    def abort_after_flush(self) -> None: ...

    def tunnel_progress(self) -> None: ...


class ProxyContext:
    """What the proxy's connections share in one process (see the module docstring)."""

    __slots__ = ("reactor", "settings", "pools", "default_pool", "router", "outliers", "status_counts",
                 "draining", "client_closed", "log_line", "log_format", "request_ids", "buckets", "conn_limit",
                 "limited")

    def __init__(self, reactor: Reactor, settings: Settings, pools: Pools, outliers: Outliers,
                 client_closed: Callable[[object], None], router: Optional[RouteTable] = None) -> None:
        self.reactor = reactor
        self.settings = settings
        # The pools by name, the one a request no route matches goes to (None: such a request is
        # answered 404), and the route table (None: no [route] sections). Replaced on reload.
        self.pools = pools
        self.default_pool: Optional[Pool] = pools.default
        self.router = router
        self.outliers = outliers
        # Responses by status code, indexed directly (a status is always 100..999).
        self.status_counts: List[int] = [0] * 1000
        self.draining = False
        self.client_closed = client_closed
        # The access log: format an exchange, write a line (never blocking); None when off.
        self.log_line: Optional[Callable[[bytes], None]] = None
        self.log_format: Optional[Callable[[Exchange], bytes]] = None
        # Makes a new request id (bytes) when request ids are on.
        self.request_ids: Optional[Callable[[], bytes]] = None
        # Per-client limits (limits.py): client_rate's token buckets and client_connections' counts
        # (None: off), and the requests each refused (429), for /metrics.
        self.buckets: Optional[ClientBuckets] = None
        self.conn_limit: Optional[ClientConnections] = None
        self.limited = [0, 0]  # [over client_rate, over client_connections]

    def finish(self, ex: Exchange, end: str) -> None:
        """The one place an exchange ends: counted, and logged."""
        if ex.end is not None:
            return
        ex.end = end
        ex.t_done = self.reactor.now
        if ex.status:
            self.status_counts[ex.status] += 1
        if ex.slot:
            ex.release()  # the exchange's end is where its last attempt's slot frees
        write = self.log_line
        if write is not None:
            fmt = self.log_format
            assert fmt is not None
            try:
                write(fmt(ex))
            except Exception:
                log.exception("access log: cannot format a line")

    def responses(self) -> Dict[int, int]:
        return {code: n for code, n in enumerate(self.status_counts) if n}


class Attempts:
    """What failed attempts of an exchange leave behind (most exchanges have none)."""

    __slots__ = ("tried", "retries", "timeouts", "addr_retries")

    def __init__(self) -> None:
        self.tried: List[Backend] = []  # backends a connect failed on, in order
        self.retries = 0                # other backends tried
        self.timeouts = 0               # connect tries that timed out
        self.addr_retries = 0           # other addresses of a backend's host name tried


class Exchange:
    """One request/response (see the module docstring)."""

    __slots__ = (
        "req", "client", "pool_ref", "be", "slot", "failed", "status", "bytes_in", "bytes_out", "t_start",
        "t_connected", "t_response", "t_done", "wall_start", "end", "request_id", "request_done",
        "resp_started", "refused_line", "route_ref", "fwd_target", "edit", "kept", "kept_bytes",
    )

    t_done: float

    def __init__(self, req: Optional[RequestHead], client: str, now: float, wall: float, bytes_in: int) -> None:
        self.req = req
        self.client = client
        self.pool_ref: Optional[Pool] = None
        self.be: Optional[Backend] = None  # the backend of the current (last) attempt
        self.slot = False             # holds a slot of ``be`` (one in-flight request)
        self.failed: Optional[Attempts] = None  # made at the first failed attempt (rare)
        self.status = 0               # the status sent to the client (0: none yet)
        self.bytes_in = bytes_in      # request bytes read from the client (head and body)
        self.bytes_out = 0            # response bytes queued for the client (head and body)
        self.t_start = now            # the request head was complete
        self.t_connected = 0.0        # a backend connection took the request
        self.t_response = 0.0         # the response head arrived
        # t_done: set by ProxyContext.finish (nothing reads it before).
        self.wall_start = wall        # time.time() then (only when an access log needs it)
        self.end: Optional[str] = None
        self.request_id: Optional[bytes] = None
        self.request_done = False     # the whole request (head and body) was read from the client
        self.resp_started = False     # a final response head went to the client
        # For a refused request whose head did not parse: its request line, if it has that shape
        # (method, target, minor), so the log shows what was refused (nginx logs it too).
        self.refused_line: Optional[Tuple[bytes, bytes, int]] = None
        # The route that matched (None: none, or no routes), the target it forwards when it rewrites
        # the path, and itself again when it edits the response head (kept apart for the hot path).
        self.route_ref: Optional[Route] = None
        self.fwd_target: Optional[bytes] = None
        self.edit: Optional[ResponseEdit] = None
        # The request body as sent upstream, kept for a retry while it stays within REPLAY_MAX (None:
        # not kept; a request without a body needs none). kept_bytes is set with it.
        self.kept: Optional[List[Chunk]]  # set by the client side only for a request with a body
        self.kept_bytes: int

    def __repr__(self) -> str:
        return "<Exchange %r status=%d end=%s>" % (self.req, self.status, self.end)

    # ---- the backend slot ----
    def take(self, backend: Backend) -> None:
        """A connection to ``backend`` takes this request on: one in-flight request on it."""
        if self.slot:
            self.release()
        self.be = backend
        self.slot = True
        backend.take_slot()

    def release(self) -> None:
        """The attempt on ``backend`` is over (answered, or failed): its slot frees, and a request
        waiting for one may go."""
        if self.slot:
            self.slot = False
            backend = self.be
            assert backend is not None
            if backend.release_slot():
                # A request waiting in its pool's queue may go now.
                pool = backend.owner
                if pool is not None:
                    pool.wake()

    # ---- what an access log line shows ----
    def refused(self, head: bytes) -> None:
        """Keep the request line of a head that did not parse, when it looks like one."""
        line = head[:head.find(b"\n")].rstrip(b"\r")[:8192]
        parts = line.split(b" ")
        if len(parts) == 3 and parts[2] in (b"HTTP/1.1", b"HTTP/1.0") and parts[0] and parts[1]:
            self.refused_line = (parts[0], parts[1], 1 if parts[2] == b"HTTP/1.1" else 0)

    @property
    def method(self) -> bytes:
        if self.req is not None:
            return self.req.method
        return self.refused_line[0] if self.refused_line is not None else b"-"

    @property
    def target(self) -> bytes:
        if self.req is not None:
            return self.req.target
        return self.refused_line[1] if self.refused_line is not None else b"-"

    @property
    def minor(self) -> int:
        if self.req is not None:
            return self.req.minor
        return self.refused_line[2] if self.refused_line is not None else -1

    @property
    def host(self) -> Optional[bytes]:
        return self.req.host if self.req is not None else None

    @property
    def user_agent(self) -> Optional[bytes]:
        return self.req.find_field(b"user-agent") if self.req is not None else None

    @property
    def referer(self) -> Optional[bytes]:
        return self.req.find_field(b"referer") if self.req is not None else None

    @property
    def retries(self) -> int:
        failed = self.failed
        return failed.retries if failed is not None else 0

    @property
    def route(self) -> Optional[str]:
        """The route that matched (None: none)."""
        route = self.route_ref
        return route.name if route is not None else None

    @property
    def backend(self) -> Optional[str]:
        return self.be.name if self.be is not None else None

    @property
    def pool(self) -> Optional[str]:
        """The pool of the backend that served (or of the request, before one did)."""
        be = self.be
        if be is not None:
            return be.pool
        pool = self.pool_ref
        return pool.name if pool is not None else None
