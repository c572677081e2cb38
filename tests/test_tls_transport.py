"""TLSTransport on a real socket pair and a hand-turned loop: plaintext that OpenSSL has decrypted but
not yet handed over (``SSLSocket.pending()``) gets no readiness event of its own, so the transport must
read it on, and must deliver it after a pause when reading resumes.

The server side is the transport under test (``ServerTLS.accept`` with a tiny ``read_size``, so one
TLS record is many reads); the client is a blocking ``ssl`` socket in a thread.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from balrs.config import TLSConfig
from balrs.tls import ServerTLS

from pki import PKI, have_openssl
from test_transport_users import REAL_TIMEOUT, Loop, Rec

pytestmark = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command line")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.reactor.close()


class Client(threading.Thread):
    """Handshakes, then sends each message as one TLS record (one sendall each)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, messages: List[bytes]) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.ctx = ctx
        self.messages = messages
        self.error: List[BaseException] = []
        self.tls: "ssl.SSLSocket | None" = None

    def run(self) -> None:
        try:
            self.tls = self.ctx.wrap_socket(self.sock, server_hostname="a.test")
            for m in self.messages:
                self.tls.sendall(m)
        except BaseException as exc:  # reported by the test
            self.error.append(exc)


def _setup(pki: PKI, loop: Loop, messages: List[bytes], read_size: int) -> Tuple[Rec, object, Client]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(REAL_TIMEOUT)
    server = ServerTLS(TLSConfig(certs=(str(pki.crt("a.test")),), keys=(str(pki.key("a.test")),)), "lb.ini")
    rec = Rec()
    tr = server.accept(loop.reactor, ours, rec, read_size=read_size)
    rec.tr = tr  # type: ignore[attr-defined]
    client = Client(theirs, pki.client_ctx(), messages)
    client.start()
    return rec, tr, client


def test_a_record_larger_than_read_size_is_read_whole_without_further_events(pki: PKI, loop: Loop) -> None:
    # Three pipelined requests in one record: after the first 64-byte read the rest sits in OpenSSL,
    # the kernel buffer is empty, and no poll would ever report it.
    msg = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\nX-Pad: %s\r\n\r\n" % (i, b"p" * 900) for i in range(3))
    rec, tr, client = _setup(pki, loop, [msg], read_size=64)
    assert loop.spin(lambda: len(rec.data) >= len(msg)), (len(rec.data), client.error)
    assert bytes(rec.data) == msg
    assert rec.calls.count("data") >= len(msg) // 64
    client.join(REAL_TIMEOUT)
    assert not client.error
    tr.close()  # type: ignore[attr-defined]


def test_pending_plaintext_is_delivered_when_reading_resumes(pki: PKI, loop: Loop) -> None:
    msg = b"x" * 8000
    rec, tr, client = _setup(pki, loop, [msg], read_size=512)

    # Pause after the first piece: the rest of the record stays decrypted inside OpenSSL.
    def first(data: bytes) -> None:
        rec.data += data
        rec.calls.append("data")
        if len(rec.data) >= 512:
            tr.pause_reading()  # type: ignore[attr-defined]

    rec.data_received = first  # type: ignore[method-assign]
    assert loop.spin(lambda: len(rec.data) >= 512)
    loop.settle(0.1)
    got = len(rec.data)
    assert got < len(msg)  # paused: nothing more arrived
    assert tr.sock.pending() > 0  # type: ignore[attr-defined]

    rec.data_received = lambda data: rec.data.extend(data)  # type: ignore[method-assign]
    tr.resume_reading()  # type: ignore[attr-defined]
    # No new bytes reach the kernel: only the deferred pending read can deliver the rest.
    assert loop.spin(lambda: len(rec.data) >= len(msg)), len(rec.data)
    assert bytes(rec.data) == msg
    client.join(REAL_TIMEOUT)
    assert not client.error
    tr.close()  # type: ignore[attr-defined]


def test_plaintext_on_a_tls_transport_ends_the_stream(loop: Loop, pki: PKI) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(REAL_TIMEOUT)
    server = ServerTLS(TLSConfig(certs=(str(pki.crt("a.test")),), keys=(str(pki.key("a.test")),)), "lb.ini")
    rec = Rec()
    tr = server.accept(loop.reactor, ours, rec, read_size=4096)
    theirs.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    # Not a TLS record: the handshake fails, and the stream ends as reset (nothing to answer on).
    assert loop.spin(lambda: rec.calls), rec.calls
    assert rec.calls == ["reset"]
    assert not rec.data
    tr.close()
    theirs.close()


def test_handshake_deadline_closes_a_silent_client(loop: Loop, pki: PKI, tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = ServerTLS(TLSConfig(certs=(str(pki.crt("a.test")),), keys=(str(pki.key("a.test")),),
                                 handshake_timeout=2.0), "lb.ini")
    rec = Rec()
    tr = server.accept(loop.reactor, ours, rec, read_size=4096)
    loop.advance(1.9)
    assert not rec.calls
    loop.advance(0.2)
    assert rec.calls, "no callback after the handshake deadline"
    tr.close()
    theirs.close()


def test_half_close_sends_the_corked_answer_before_close_notify(pki: PKI, loop: Loop) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(REAL_TIMEOUT)
    server = ServerTLS(TLSConfig(certs=(str(pki.crt("a.test")),), keys=(str(pki.key("a.test")),)), "lb.ini")
    rec = Rec()
    tr = server.accept(loop.reactor, ours, rec, read_size=4096)
    got = bytearray()
    errors: List[BaseException] = []

    def client() -> None:
        try:
            tls = pki.client_ctx().wrap_socket(theirs, server_hostname="a.test")
            tls.sendall(b"question")
            while True:
                piece = tls.recv(100)   # b"" at the close_notify
                if not piece:
                    break
                got.extend(piece)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def answer(data: bytes) -> None:
        rec.data += data
        tr.write(b"the answer")   # corked: after the turn's work...
        assert tr.corked
        tr.shutdown_write()       # ...unless the stream ends first: the bytes go before the alert

    rec.data_received = answer  # type: ignore[method-assign]
    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert loop.spin(lambda: rec.data == b"question"), (rec.calls, errors)
    t.join(REAL_TIMEOUT)
    assert not t.is_alive() and not errors, errors
    assert bytes(got) == b"the answer"
    tr.close()
    theirs.close()
