"""The proxy's rooms: the client side (``client``), the upstream side (``upstream``) and the exchange
they share (``exchange``). See docs/architecture.md for how a request flows through them."""

from __future__ import annotations

from .client import ClientConn, OverLimitClient
from .exchange import Exchange, ProxyContext
from .upstream import UPSTREAM_RECV_SIZE, UpstreamConn

__all__ = ["ClientConn", "OverLimitClient", "UpstreamConn", "Exchange", "ProxyContext", "UPSTREAM_RECV_SIZE"]
