"""The edge: what an accepted connection is before it is a client connection, and whom to believe about
the client's address.

- :class:`Trusted`: ``trusted_proxies`` as a matcher (the peers whose PROXY header and X-Forwarded-For
  are believed), with a small bounded cache so a connection costs one dict lookup.
- :class:`Peer`: one connection's view of the client, made once at accept: the address the client
  connection reports everywhere (X-Forwarded-For, ip_hash, route ``client_ip``, limits, the access log)
  as the socket or the PROXY header gives it, the scheme (``https`` on a tls listen address), whether
  the peer is trusted, the addresses a backend's ``send_proxy`` header names, and the transport
  factory of the listen address (plain, or TLS).
- :func:`real_client`: for a request from a trusted peer, the right-most X-Forwarded-For entry that is
  not itself trusted (nginx ``real_ip_recursive on``).
- :class:`ProxyHeaderPhase`: a ``proxy`` listen address reads the PROXY protocol header first
  (``http.proxyproto``), consuming exactly its bytes (the socket is peeked, then read up to the header's
  end), so whatever follows, a TLS ClientHello or an HTTP request, is still in the kernel for the
  transport that takes the socket over. A peer outside ``trusted_proxies``, or a missing, malformed,
  oversized or late header, is closed without a response.

The derivation follows the contract's "TLS and the client's real address": with ``trusted_proxies``
unset, v1 behaviour (an incoming X-Forwarded-For is appended to); set, an untrusted peer's incoming
X-Forwarded-For and Forwarded are replaced, a trusted peer's appended to, and its X-Forwarded-Proto and
X-Forwarded-Host kept.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from .http.build import XF_APPEND, XF_KEEP, XF_REPLACE
from .http.proxyproto import V2_MAX, ProxyHeaderError, ProxyHeaderReader, build_v1, build_v2
from .reactor import Reactor
from .transport import Acceptor, Protocol, Transport

__all__ = [
    "Trusted", "Peer", "real_client", "forwarded_element", "ProxyHeaderPhase", "XF_APPEND", "XF_REPLACE",
    "XF_KEEP", "proxy_header", "probe_proxy_header", "make_peer",
]

log = logging.getLogger("balrs")

# Addresses whose trust is remembered (each connection from a known peer then costs one dict lookup);
# past it the cache starts again, so memory stays bounded whatever the number of clients.
TRUST_CACHE_SIZE = 4096

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Trusted:
    """``trusted_proxies``: networks whose PROXY headers and X-Forwarded-For are believed."""

    __slots__ = ("networks", "_cache")

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = [ipaddress.ip_network(n) for n in networks]
        self._cache: Dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: str) -> bool:
        cache = self._cache
        got = cache.get(ip)
        if got is None:
            addr = _ip(ip)
            got = addr is not None and any(addr in n for n in self.networks)
            if len(cache) >= TRUST_CACHE_SIZE:
                cache.clear()
            cache[ip] = got
        return got


def _ip(text: str) -> Optional[IPAddress]:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 for trust and for logs
    return addr


def _xff_entry(item: bytes) -> Optional[str]:
    """One X-Forwarded-For element as an address, or None (garbage, "unknown", an obfuscated name).
    Tolerates the forms seen in the wild: "[2001:db8::1]:443", "192.0.2.1:8080"."""
    s = item.strip().decode("latin-1")
    if s.startswith("["):
        end = s.find("]")
        s = s[1:end] if end > 0 else ""
    elif s.count(":") == 1:
        s = s.split(":", 1)[0]
    addr = _ip(s)
    return str(addr) if addr is not None else None


def real_client(xff: Optional[bytes], peer_ip: str, trusted: Trusted) -> str:
    """The client of a request from a trusted peer: walking X-Forwarded-For from the right, the first
    entry that is not trusted (nginx real_ip_recursive); every entry trusted: the left-most; an entry
    that is not an address ends the walk at the last good one (nothing left of it can be believed)."""
    if not xff:
        return peer_ip
    client = peer_ip
    for item in reversed(xff.split(b",")):
        ip = _xff_entry(item)
        if ip is None:
            break
        client = ip
        if ip not in trusted:
            break
    return client


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def forwarded_element(client_ip: bytes, proto: bytes, host: Optional[bytes]) -> bytes:
    """Our RFC 7239 element: ``for=`` (an IPv6 address in brackets and quotes, §6), ``proto=`` and
    ``host=`` (quoted unless a token: a port's ":" is not a tchar)."""
    node = b'"[%s]"' % client_ip if b":" in client_ip else client_ip
    out = b"for=%s;proto=%s" % (node, proto)
    if host:
        out += b";host=" + (host if all(c in _TCHAR for c in host) else _quoted(host))
    return out


def proxy_header(version: str, src: Tuple[str, int], dst: Tuple[str, int]) -> bytes:
    """The PROXY protocol header a backend with ``send_proxy`` gets first on a new connection."""
    if version == "v1":
        return build_v1(src[0], src[1], dst[0], dst[1])
    return build_v2(src[0], src[1], dst[0], dst[1])


def probe_proxy_header(version: str) -> bytes:
    """A health probe's: it relays no client, so v1 says UNKNOWN and v2 LOCAL (the spec's words for a
    connection the proxy made itself; HAProxy's check-send-proxy does the same with v2)."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


class Peer:
    """One connection's client side as the edge saw it (see the module docstring)."""

    __slots__ = ("ip", "port", "local", "scheme", "trusted", "xf", "accept", "_sock")

    def __init__(self, ip: str, port: int, scheme: bytes = b"http", trusted: bool = False, xf: int = XF_APPEND,
                 accept: Acceptor = Transport, local: Optional[Tuple[str, int]] = None,
                 sock: Optional[socket.socket] = None) -> None:
        self.ip = ip
        self.port = port
        self.scheme = scheme
        self.trusted = trusted
        self.xf = xf
        self.accept = accept
        self.local = local  # the address the client connected to (from a PROXY header, or the socket's)
        self._sock = sock

    def destination(self) -> Tuple[str, int]:
        """The address the client connected to (asked of the socket once, only when a send_proxy
        backend needs it)."""
        local = self.local
        if local is None:
            try:
                name = self._sock.getsockname() if self._sock is not None else ("0.0.0.0", 0)
                local = (str(name[0]), int(name[1]))
            except OSError:
                local = ("0.0.0.0", 0)
            self.local = local
            self._sock = None
        return local


def make_peer(ip: str, port: int, scheme: bytes, accept: Acceptor, trusted: Trusted,
              local: Optional[Tuple[str, int]] = None, sock: Optional[socket.socket] = None) -> Peer:
    if not trusted:
        return Peer(ip, port, scheme, False, XF_APPEND, accept, local, sock)
    ok = ip in trusted
    return Peer(ip, port, scheme, ok, XF_KEEP if ok else XF_REPLACE, accept, local, sock)


class _PeekTransport(Transport):
    """A transport that peeks: the PROXY header phase consumes only the header's bytes."""

    __slots__ = ()

    def _on_read(self, mask: int) -> None:
        try:
            try:
                data = self.sock.recv(V2_MAX, socket.MSG_PEEK)
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

    def detach(self) -> socket.socket:
        """Stop watching the socket and hand it on, open, with nothing read past the header."""
        self.closed = True
        self.reading = False
        self.disarm()
        if self.events:
            self.reactor.unregister(self.fd)
            self.events = 0
        return self.sock


class ProxyHeaderPhase(Protocol):
    """Reads the PROXY protocol header of one connection on a ``proxy`` listen address, then hands the
    socket to ``proceed(sock, ip, port, local)``; ``closed(self)`` when it ends without doing so."""

    __slots__ = ("tr", "reader", "peer_ip", "proceed", "closed_cb", "done")

    def __init__(self, reactor: Reactor, sock: socket.socket, peer_ip: str, timeout: float,
                 proceed: Callable[[socket.socket, str, int, Optional[Tuple[str, int]]], None],
                 closed: Callable[[Any], None]) -> None:
        self.reader = ProxyHeaderReader()
        self.peer_ip = peer_ip
        self.proceed = proceed
        self.closed_cb = closed
        self.done = False
        self.tr = _PeekTransport(reactor, sock, self, V2_MAX)
        self.tr.arm(reactor.now + timeout)

    def data_received(self, data: bytes) -> None:
        try:
            got = self.reader.feed(data)
        except ProxyHeaderError as exc:
            log.info("PROXY header from %s refused: %s", self.peer_ip, exc)
            self.close()
            return
        sock = self.tr.sock
        # Consume what was the header: all of it while incomplete, up to its end once complete.
        want = len(data) if got is None else len(data) - len(got[1])
        try:
            n = len(sock.recv(want)) if want else 0
        except OSError:
            n = -1
        if n != want:
            self.close()
            return
        if got is None:
            return
        info = got[0]
        sock = self.tr.detach()
        self.done = True
        self.closed_cb(self)
        if info.local or info.src_ip is None:
            # LOCAL / UNKNOWN: the proxy's own connection (a health check): the socket's addresses stand.
            self.proceed(sock, self.peer_ip, 0, None)
        else:
            dst = (info.dst_ip, info.dst_port or 0) if info.dst_ip is not None else None
            self.proceed(sock, info.src_ip, info.src_port or 0, dst)

    def eof_received(self, reset: bool) -> None:
        self.close()

    def timer_fired(self) -> None:
        log.info("PROXY header from %s: none within the header timeout", self.peer_ip)
        self.close()

    def internal_error(self) -> None:
        log.exception("internal error reading the PROXY header from %s", self.peer_ip)
        self.close()

    # What the balancer asks of every connection it tracks.
    def drain(self) -> None:
        self.close()

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.tr.close()
            self.closed_cb(self)
