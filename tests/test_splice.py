"""Transport.splice_from on its own: real sockets (socket pairs), a real reactor, no balancer. What each
return value means, and that bytes queued in the pipe go out in order with later writes."""

from __future__ import annotations

import socket
from typing import Iterator, List, Tuple

import pytest

import balrs.transport as transport_mod
from balrs.reactor import Reactor
from balrs.transport import SPLICE, SPLICE_FULL, SPLICE_OFF, SPLICE_WAIT, Protocol, Transport

pytestmark = pytest.mark.skipif(not SPLICE, reason="no os.splice here (Linux, Python 3.10+)")


class Recorder(Protocol):
    def __init__(self) -> None:
        self.events: List[str] = []

    def write_queued(self) -> None:
        self.events.append("queued")

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


@pytest.fixture
def rig() -> Iterator[Tuple[Reactor, socket.socket, socket.socket, Transport, socket.socket, Recorder]]:
    """A source socket pair (we write into ``src_peer``, the transport splices from ``src``) and a
    destination pair (the transport writes to ``dst``; the test reads ``dst_peer``)."""
    reactor = Reactor()
    src, src_peer = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    for s in (src, dst, dst_peer):
        s.setblocking(False)
    proto = Recorder()
    tr = Transport(reactor, dst, proto, reading=False)
    yield reactor, src, src_peer, tr, dst_peer, proto
    tr.close()
    for s in (src, src_peer, dst_peer):
        s.close()
    reactor.close()


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def test_bytes_go_through_and_each_answer_means_what_it_says(rig) -> None:
    reactor, src, src_peer, tr, dst_peer, _proto = rig
    assert tr.splice_from(src.fileno(), 1000) == SPLICE_WAIT  # nothing to read yet
    src_peer.sendall(b"x" * 5000)
    assert tr.splice_from(src.fileno(), 3000) == 3000  # no more than asked
    assert tr.splice_from(src.fileno(), 3000) == 2000
    assert read_all(dst_peer) == b"x" * 5000
    tr.write(b"after")
    assert read_all(dst_peer) == b""  # corked until the end of the loop turn
    reactor.uncork()
    assert read_all(dst_peer) == b"after"
    src_peer.shutdown(socket.SHUT_WR)
    assert tr.splice_from(src.fileno(), 3000) == 0  # the source's end of stream
    tr.splice_done()
    assert tr.pipe is None


def test_a_corked_head_goes_out_before_the_spliced_body(rig) -> None:
    reactor, src, src_peer, tr, dst_peer, _proto = rig
    tr.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")
    assert tr.corked
    src_peer.sendall(b"y" * 5000)
    assert tr.splice_from(src.fileno(), 5000) == 5000
    assert not tr.corked
    assert read_all(dst_peer) == b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"y" * 5000
    reactor.uncork()  # nothing left to send
    assert read_all(dst_peer) == b""


def test_what_the_peer_does_not_take_waits_in_order(rig) -> None:
    _reactor, src, src_peer, tr, dst_peer, proto = rig
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
    src_peer.setblocking(False)
    sent = got = 0
    received = b""
    saw_piped = tail = False
    for _ in range(100000):
        if sent < len(payload):
            try:
                sent += src_peer.send(payload[sent:sent + 65536])
            except BlockingIOError:
                pass
        full = False
        if got < len(payload):
            n = tr.splice_from(src.fileno(), len(payload) - got)
            assert n > 0 or n in (SPLICE_FULL, SPLICE_WAIT), n
            if n > 0:
                got += n
            full = n == SPLICE_FULL
            assert tr.pipe is not None and tr.out_bytes <= tr.pipe.size
        elif not tail:
            tr.write(b"TAIL")  # after whatever the pipe still holds
            tail = True
        saw_piped = saw_piped or any(isinstance(x, transport_mod.Piped) for x in tr.out)
        if full or tail:
            # The peer reads only now and then (a slow client): the pipe fills meanwhile.
            received += read_all(dst_peer)
            if tr.out:
                tr._flush()  # what the loop does when the socket is writable
        if tail and not tr.out:
            break
    received += read_all(dst_peer)
    assert received == payload + b"TAIL"
    assert saw_piped and "queued" in proto.events
    tr.splice_done()
    assert tr.pipe is None


def test_a_pipe_without_a_free_slot_pauses_instead_of_spinning(rig, monkeypatch) -> None:
    _reactor, src, src_peer, tr, _dst_peer, _proto = rig
    src_peer.sendall(b"y" * 100)
    assert tr.splice_from(src.fileno(), 50) == 50
    assert tr.pipe is not None
    tr.pipe.held = 10  # as if 10 bytes still waited in it for the peer

    def again(*args, **kw):
        raise BlockingIOError()
    monkeypatch.setattr(transport_mod, "_splice", again)
    assert tr.splice_from(src.fileno(), 50) == SPLICE_FULL
    tr.pipe.held = 0
    assert tr.splice_from(src.fileno(), 50) == SPLICE_WAIT


def test_no_splicing_into_a_transport_closed_for_writing(rig) -> None:
    _reactor, src, src_peer, tr, _dst_peer, _proto = rig
    src_peer.sendall(b"z" * 10)
    tr.shutdown_write()
    assert tr.splice_from(src.fileno(), 10) == SPLICE_OFF
    assert src.recv(10) == b"z" * 10  # the bytes were left where they were
