"""The data path's settings: a frozen, flat copy of what connections read per request.

Built from a :class:`~balrs.config.Config` at start-up and on every reload (connections take the
current one when a request starts, so a reload applies to the next request, never half-way through
one). The data path reads plain attributes, never the config tree, and nothing here refers back to
the balancer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .edge import Trusted

__all__ = ["Settings", "MAX_RESPONSE_HEAD", "CLIENT_RECV_SIZE"]

# The largest response head balrs accepts from a backend (HAProxy bufsize is 16 KiB; nginx
# proxy_buffer_size 4-8 KiB); past it the answer is 502.
MAX_RESPONSE_HEAD = 65536
# Bytes read per recv() from a client: nginx reads request bodies in 8-16 KiB buffers, HAProxy uses a
# 16 KiB bufsize; 64 KiB keeps uploads at few syscalls while bounding memory.
CLIENT_RECV_SIZE = 65536


@dataclass(frozen=True)
class Settings:
    connect_timeout: float
    header_timeout: float
    client_timeout: float
    backend_timeout: float
    tunnel_timeout: float
    body_timeout: float
    send_timeout: float
    queue_timeout: float
    drain_timeout: float
    retries: int
    max_connections: int
    max_header_bytes: int
    max_body_bytes: int
    max_response_head: int
    # Pipelined requests buffered while one is answered: one full head plus one read.
    pipeline_limit: int
    # How often a connection in a state with no deadline of its own looks at its state again (every
    # transition into a state with a deadline arms the timer for it; this is the safety net).
    check_interval: float
    # The request-id field as configured (b"" for none), and lowercased for finding it in a head.
    request_id_field: bytes
    request_id: bytes
    # The edge: trusted_proxies (empty: v1 behaviour) and RFC 7239 Forwarded on or off.
    trusted: Trusted
    forwarded: bool

    @classmethod
    def from_config(cls, c: Config) -> "Settings":
        rid = c.log.request_id
        return cls(
            connect_timeout=c.connect_timeout,
            header_timeout=c.header_timeout,
            client_timeout=c.client_timeout,
            backend_timeout=c.backend_timeout,
            tunnel_timeout=c.tunnel_timeout,
            body_timeout=c.body_timeout,
            send_timeout=c.send_timeout,
            queue_timeout=c.queue_timeout,
            drain_timeout=c.drain_timeout,
            retries=c.retries,
            max_connections=c.max_connections,
            max_header_bytes=c.max_header_bytes,
            max_body_bytes=c.max_body_bytes,
            max_response_head=max(MAX_RESPONSE_HEAD, c.max_header_bytes),
            pipeline_limit=c.max_header_bytes + CLIENT_RECV_SIZE,
            check_interval=max(0.05, min(c.client_timeout, c.header_timeout, c.backend_timeout,
                                         c.body_timeout, c.send_timeout)),
            request_id_field=rid.encode("ascii"),
            request_id=rid.lower().encode("ascii"),
            trusted=Trusted(c.trusted_proxies),
            forwarded=c.forwarded,
        )
