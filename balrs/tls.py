"""TLS: the contexts the configuration asks for, and a TLS transport with :class:`Transport`'s interface.

- :class:`ServerTLS`: the certificates of the ``tls`` listen addresses (``[tls]``), one ``SSLContext``
  each; the first is the default and SNI picks another whose names match (``sni_callback``). Only
  HTTP/1.1 is offered by ALPN. Built at start-up and on every reload; a certificate that cannot be
  loaded is a :class:`~balrs.config.ConfigError` naming the ``cert`` line, so a reload is refused and the
  old contexts stay.
- :class:`ClientTLS`: a backend's (``tls = yes``): verification on by default (``tls_ca`` or the
  system's store), the SNI name, an optional client certificate.
- :class:`TLSTransport`: a :class:`~balrs.transport.Transport` over an ``ssl.SSLSocket`` in
  non-blocking mode. The handshake runs on the reactor (``do_handshake`` until it stops raising
  ``SSLWantReadError``/``SSLWantWriteError``, never a blocking call); until it is done the transport
  counts as connecting (writes queue). The protocol hears ``connection_made`` after the handshake, and
  ``connect_failed(err, reason)`` when the TCP connect or the handshake fails (a verification failure
  too), so a backend's TLS failure is a connect failure to the upstream side and to health probes. A
  TLS read can leave decrypted bytes inside OpenSSL that no readiness event will announce
  (``SSLSocket.pending()``): they are delivered before the read returns, and when reading resumes after
  a pause.

The connection state machines do not know whether their transport is TLS: the listener's entry and the
backend hand them a transport factory (``make_transport``), the seam this module plugs into.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from typing import Any, Dict, List, Optional, Tuple

from .certnames import CertError, cert_names
from .config import BackendConfig, Config, ConfigError, TLSConfig
from .reactor import EVENT_READ, EVENT_WRITE, Reactor
from .transport import _NEVER, LOW_WATER, Protocol, Transport

__all__ = ["ServerTLS", "ClientTLS", "TLSTransport", "EdgeTLS", "load_tls", "TLS_WRITE_COALESCE"]

log = logging.getLogger("balrs")

# Queued writes smaller than this are joined before SSL_write: each call makes at least one TLS record
# (16 KiB of plaintext at most), so many small pieces would cost a record (and ~22 bytes) each.
TLS_WRITE_COALESCE = 16384

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_ALPN = ["http/1.1"]
# errno reported to the protocol for a failed TLS handshake (the reason goes with it as text).
_HANDSHAKE_ERRNO = errno.ECONNABORTED

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


def _base_options(ctx: ssl.SSLContext) -> None:
    ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME; Python's default, said again
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a CPU DoS (TLS 1.2)
    ctx.set_alpn_protocols(_ALPN)


class ServerTLS:
    """The certificates of the tls listen addresses, with SNI selection (see the module docstring)."""

    __slots__ = ("default", "exact", "wildcard", "handshake_timeout", "names")

    def __init__(self, cfg: TLSConfig, path: str) -> None:
        contexts: List[Tuple[ssl.SSLContext, Tuple[str, ...]]] = []
        for i, cert in enumerate(cfg.certs):
            key = cfg.keys[i] if cfg.keys else None
            contexts.append(self._context(cfg, cert, key, path))
        self.default = contexts[0][0]
        self.default.sni_callback = self._on_sni
        # Server name -> context: exact names first, then "*.example.com" by its parent domain; the first
        # certificate listing a name wins (nginx and HAProxy pick the first match too).
        self.exact: Dict[str, ssl.SSLContext] = {}
        self.wildcard: Dict[str, ssl.SSLContext] = {}
        for ctx, names in contexts:
            for name in names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ctx)
                else:
                    self.exact.setdefault(name, ctx)
        self.names = [names for _ctx, names in contexts]
        self.handshake_timeout = cfg.handshake_timeout

    @staticmethod
    def _context(cfg: TLSConfig, cert: str, key: Optional[str], path: str) -> Tuple[ssl.SSLContext, Tuple[str, ...]]:
        def error(message: str) -> ConfigError:
            return ConfigError(path, cfg.line, message, "tls", "cert")

        try:
            with open(cert, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise error(f"cannot read {cert}: {exc.strerror or exc}") from None
        try:
            names = cert_names(pem)
        except CertError as exc:
            raise error(f"{cert}: {exc}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            what = f"{cert} with key {key}" if key else f"{cert} (no key file: the key must be inside it)"
            raise error(f"cannot load {what}: {getattr(exc, 'reason', None) or exc}") from None
        ctx.minimum_version = _VERSIONS[cfg.min_version]
        if cfg.ciphers:
            try:
                ctx.set_ciphers(cfg.ciphers)
            except ssl.SSLError:
                raise ConfigError(path, cfg.line, f"no cipher matches {cfg.ciphers!r}", "tls", "ciphers") from None
        _base_options(ctx)
        return ctx, names

    def select(self, server_name: Optional[str]) -> ssl.SSLContext:
        """The context for an SNI server name (the default when none matches, or no name was sent)."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            dot = name.find(".")
            if dot > 0:
                ctx = self.wildcard.get(name[dot + 1:])
        return ctx if ctx is not None else self.default

    def _on_sni(self, sock: Any, server_name: Optional[str], _ctx: ssl.SSLContext) -> None:
        ctx = self.select(server_name)
        if ctx is not self.default:
            sock.context = ctx

    def accept(self, reactor: Reactor, sock: socket.socket, protocol: Protocol, read_size: int = 65536) -> Transport:
        """The transport of an accepted connection on a tls listen address: the handshake starts at once,
        and a client that has not finished it within ``handshake_timeout`` is closed."""
        ssock = self.default.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return TLSTransport(reactor, ssock, protocol, read_size, server_side=True,
                            deadline=reactor.now + self.handshake_timeout)


class ClientTLS:
    """TLS towards one backend: a context and the SNI name (see the module docstring)."""

    __slots__ = ("context", "server_hostname", "key")

    def __init__(self, context: ssl.SSLContext, server_hostname: Optional[str], key: Tuple[Any, ...]) -> None:
        self.context = context
        self.server_hostname = server_hostname
        self.key = key  # what it was built from: a reload with the same key keeps pooled connections

    @classmethod
    def for_backend(cls, b: BackendConfig, path: str) -> "ClientTLS":
        def error(message: str) -> ConfigError:
            return ConfigError(path, b.line, message, f"backend {b.name}", None)

        if b.tls_verify:
            try:
                ctx = ssl.create_default_context(cafile=b.tls_ca or None)
            except (ssl.SSLError, OSError) as exc:
                raise error(f"tls_ca: cannot load {b.tls_ca}: {getattr(exc, 'strerror', None) or exc}") from None
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if b.tls_cert:
            try:
                ctx.load_cert_chain(b.tls_cert, b.tls_key or None)
            except (ssl.SSLError, OSError) as exc:
                raise error(f"tls_cert: cannot load {b.tls_cert}: {getattr(exc, 'reason', None) or exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _base_options(ctx)
        host = b.address.host
        # tls_sni unset: the address's host (Python sends no SNI for an IP literal, but still checks the
        # certificate's IP addresses against it); tls_sni = "" sends none and checks no name.
        if b.tls_sni is None:
            server_hostname: Optional[str] = host
        else:
            server_hostname = b.tls_sni or None
            if server_hostname is None and b.tls_verify:
                ctx.check_hostname = False
        key = (b.tls_verify, b.tls_ca, b.tls_sni, b.tls_cert, b.tls_key, host)
        return cls(ctx, server_hostname, key)

    def make_connecting(self, reactor: Reactor, sock: socket.socket, protocol: Protocol,
                        read_size: int = 65536) -> Transport:
        """The transport of a connection being made (``transport.connect``): TLS starts once TCP is
        connected, after the transport's preamble (a PROXY protocol header) has gone out in the clear."""
        return TLSTransport(reactor, sock, protocol, read_size, server_side=False, client=self)


class EdgeTLS:
    """Every TLS context one configuration needs, built (and checked) before any of it is used."""

    __slots__ = ("server", "backends")

    def __init__(self, server: Optional[ServerTLS], backends: Dict[str, ClientTLS]) -> None:
        self.server = server
        self.backends = backends


def load_tls(config: Config, previous: Optional[EdgeTLS] = None) -> EdgeTLS:
    """The contexts of ``config``: raises ConfigError (a certificate or CA that cannot be loaded), before
    anything changes. A backend whose TLS settings are unchanged keeps its context (and its pooled
    connections, whose sessions belong to it)."""
    server = ServerTLS(config.tls, config.path) if config.tls is not None and any(
        a.tls for a in config.listen) else None
    backends: Dict[str, ClientTLS] = {}
    for b in config.backends:
        if not b.tls:
            continue
        old = previous.backends.get(b.name) if previous is not None else None
        key = (b.tls_verify, b.tls_ca, b.tls_sni, b.tls_cert, b.tls_key, b.address.host)
        backends[b.name] = old if old is not None and old.key == key else ClientTLS.for_backend(b, config.path)
    return EdgeTLS(server, backends)


class TLSTransport(Transport):
    """A :class:`Transport` over TLS (see the module docstring)."""

    __slots__ = ("server_side", "client", "handshaking", "hs_deadline", "established")

    can_splice = False  # the bytes on the socket are records, not the stream

    sock: Any  # an ssl.SSLSocket once wrapped (a plain socket while an outgoing TCP connect is under way)

    def __init__(self, reactor: Reactor, sock: socket.socket, protocol: Protocol, read_size: int = 65536,
                 server_side: bool = True, deadline: float = _NEVER, client: Optional[ClientTLS] = None) -> None:
        self.server_side = server_side
        self.client = client
        self.established = False
        self.hs_deadline = deadline
        # Server side: the socket is wrapped and the handshake starts now. Client side: TCP connects first.
        self.handshaking = server_side
        super().__init__(reactor, sock, protocol, read_size, connecting=not server_side)
        if server_side:
            # Not established until the handshake is done: writes queue meanwhile.
            self.connecting = True
            self.arm(deadline)

    def __repr__(self) -> str:
        return "<TLSTransport fd=%d events=%d queued=%d%s>" % (
            self.fd, self.events, self.out_bytes, " handshaking" if self.handshaking else "")

    # ---- selector ----
    def _callback(self, events: int) -> Any:
        if self.handshaking:
            return self._on_handshake_io
        return super()._callback(events)

    def _bind(self, events: int) -> None:
        """Register for ``events`` with the callback of the current phase (even when only the phase
        changed, not the events)."""
        reactor = self.reactor
        if self.events == 0:
            if events:
                reactor.register(self.fd, events, self._callback(events))
        elif events == 0:
            reactor.unregister(self.fd)
        else:
            reactor.modify(self.fd, events, self._callback(events))
        self.events = events

    # ---- connecting and the handshake ----
    def _connect_event(self) -> None:
        if self.closed:
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._set_events(0)
            self.protocol.connect_failed(err)
            return
        if self.preamble and not self._send_preamble():
            # A PROXY protocol header goes first, in the clear (HAProxy's send-proxy with ssl).
            return
        client = self.client
        assert client is not None
        try:
            self.sock = client.context.wrap_socket(self.sock, server_side=False, do_handshake_on_connect=False,
                                                   server_hostname=client.server_hostname)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._set_events(0)
            self.protocol.connect_failed(_HANDSHAKE_ERRNO, "TLS: %s" % exc)
            return
        self.handshaking = True
        self._handshake()

    def _on_handshake_io(self, mask: int) -> None:
        try:
            self._handshake()
        except Exception:
            self.protocol.internal_error()

    def _handshake(self) -> None:
        if self.closed:
            return
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._bind(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._bind(EVENT_WRITE)
            return
        except ssl.SSLCertVerificationError as exc:
            self._handshake_failed("certificate verification failed: %s" % (exc.verify_message or exc.reason))
            return
        except ssl.SSLError as exc:
            self._handshake_failed(exc.reason or str(exc))
            return
        except OSError as exc:
            self._handshake_failed(exc.strerror or str(exc))
            return
        self.handshaking = False
        self.connecting = False
        self.established = True
        self._io = self._on_io
        self._bind((EVENT_READ if self.reading else 0) | (EVENT_WRITE if self.out else 0))
        self.protocol.connection_made()
        if self.closed:
            return
        if self.out:
            self._flush()
        if self.reading and not self.closed and self.sock.pending():
            self.reactor.call_soon(self._read_pending)

    def _handshake_failed(self, reason: str) -> None:
        self._bind(0)
        if self.server_side:
            # A client that cannot complete a handshake (plain HTTP on a TLS port, no shared version or
            # cipher, a scanner) is closed without a word: there is no channel to answer on.
            log.debug("TLS handshake with fd %d failed: %s", self.fd, reason)
            self.protocol.eof_received(True)
        else:
            self.protocol.connect_failed(_HANDSHAKE_ERRNO, "TLS handshake: %s" % reason)

    def _on_timer(self) -> None:
        if self.handshaking and not self.closed and self.reactor.now >= self.hs_deadline:
            self.timer = None
            self.timer_when = _NEVER
            if self.server_side:
                self._handshake_failed("handshake timed out")
                return
        super()._on_timer()
        if self.handshaking and not self.closed and self.hs_deadline < _NEVER:
            self.arm(self.hs_deadline)

    # ---- reading ----
    def _on_read(self, mask: int) -> None:
        try:
            sock = self.sock
            while True:
                try:
                    data = sock.recv(self.read_size)
                except _WANT:
                    return
                except OSError:
                    # A reset, or a TLS protocol error (a bad record, a forged alert): the stream is over.
                    self.protocol.eof_received(True)
                    return
                if not data:
                    self.protocol.eof_received(False)
                    return
                self.protocol.data_received(data)
                # Decrypted bytes OpenSSL still holds (the rest of a record) get no readiness event of
                # their own: read on while there are some (bytes still in the kernel do get one).
                if not sock.pending() or not self.reading or self.closed:
                    return
        except Exception:
            self.protocol.internal_error()

    def _read_pending(self) -> None:
        if self.reading and not self.closed and not self.connecting:
            self._on_read(EVENT_READ)

    def resume_reading(self) -> None:
        was = self.reading
        super().resume_reading()
        if not was and self.reading and not self.connecting and self.sock.pending():
            # Bytes decrypted before the pause wait inside OpenSSL: no event will say so.
            self.reactor.call_soon(self._read_pending)

    # ---- writing ----
    # Transport.write as is: after a WANT, OpenSSL expects the same bytes again, and the queue's head
    # keeps them (the rest of the piece, or the piece itself when nothing was taken).
    _WOULD_BLOCK = _WANT

    def _flush(self) -> None:
        out = self.out
        sock = self.sock
        while out:
            first = out[0]
            if len(out) > 1 and len(first) < TLS_WRITE_COALESCE:
                # Join small pieces into one record; the joined bytes start with the old head, so a
                # write OpenSSL is retrying sees the same bytes (and more).
                parts = [out.popleft()]
                size = len(first)
                while out and size < TLS_WRITE_COALESCE:
                    piece = out.popleft()
                    parts.append(piece)
                    size += len(piece)
                first = b"".join(parts)
                out.appendleft(first)
            try:
                n = sock.send(first)
            except _WANT:
                break
            except OSError as exc:
                self._send_failed(exc)
                return
            self.out_bytes -= n
            self.last_write = self.reactor.now
            if n >= len(first):
                out.popleft()
            else:
                out[0] = memoryview(first)[n:]
                break
        if not out:
            self._set_events(self.events & ~EVENT_WRITE)
            self.protocol.write_drained()
        elif self.out_bytes < LOW_WATER:
            self.protocol.resume_writing()

    # ---- closing ----
    def _close_notify(self) -> None:
        """Send a close_notify alert (best effort, never waiting): the peer can tell our end of the
        stream from a truncation."""
        if self.established and not self.broken:
            self.established = False
            try:
                self.sock.unwrap()
            except (OSError, ValueError):
                pass  # SSLWantReadError: sent, the peer's reply is not awaited

    def shutdown_write(self) -> None:
        if self.corked:
            self._push_cork(False)
        if not self.wr_closed:
            self.wr_closed = True
            self._close_notify()
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        if self.corked:
            self._push_cork(True)
        if not self.closed and not self.out:
            self._close_notify()
        super().close()
