"""Message body framing, sans-IO: reading a body framed one way and writing it framed another.

RFC 9112 §6 gives a body three framings: Content-Length (``LENGTH``), chunked (``CHUNKED``) and, for
responses only, the connection's close (``CLOSE_DELIMITED``). A proxy re-frames when the two sides
differ: a chunked or close-delimited response goes to an HTTP/1.1 client chunked, to an HTTP/1.0 client
close-delimited (it cannot be sent chunked, RFC 9112 §7); a chunked request goes upstream chunked, its
chunks re-encoded from what was decoded (so the backend never sees the client's chunk extensions or
sizes, which is where chunked smuggling lives).

A :class:`BodyRelay` takes the bytes of one body as they arrive and appends what the other side
should get to a list of parts; it knows where the body ends (and so what bytes follow it). No I/O.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from .chunked import CRLF, ChunkedDecoder, chunk_header
from .heads import CHUNKED, CLOSE_DELIMITED, LENGTH, NO_BODY

__all__ = ["BodyRelay", "client_framing", "LAST_CHUNK"]

Chunk = Union[bytes, memoryview]

# The last chunk of a chunked body with no trailer fields.
LAST_CHUNK = b"0\r\n\r\n"


def client_framing(framing: int, client_minor: int) -> Tuple[int, bool]:
    """How a response body framed ``framing`` goes to a client speaking HTTP/1.``client_minor``, and
    whether the client connection must close after it (the close is then what ends the body)."""
    if framing == CHUNKED or framing == CLOSE_DELIMITED:
        if client_minor == 1:
            return CHUNKED, False
        return CLOSE_DELIMITED, True
    return framing, False


class BodyRelay:
    """One message body in transit: ``framing`` is how it arrives, ``out_framing`` how it leaves.

    ``feed(data, parts)`` appends the outgoing bytes to ``parts`` and returns how many bytes of
    ``data`` belonged to the body (the rest is the next message, or surplus a backend should not have
    sent); ``done`` tells when the body is complete. ``end_of_stream(parts)`` is the peer's close: it
    completes a close-delimited body (True) and breaks any other (False).
    """

    __slots__ = ("framing", "out_framing", "left", "decoder", "done")

    def __init__(self, framing: int, out_framing: int, length: int = 0,
                 decoder: Optional[ChunkedDecoder] = None) -> None:
        self.framing = framing
        self.out_framing = out_framing
        self.left = length
        self.decoder = decoder
        self.done = framing == NO_BODY or (framing == LENGTH and length == 0)

    def feed(self, data: bytes, parts: List[Chunk]) -> int:
        """Frame ``data`` into ``parts``; raises ProtocolError for a malformed chunked body."""
        framing = self.framing
        if framing == LENGTH:
            left = self.left
            n = len(data)
            if n < left:
                parts.append(data)
                self.left = left - n
                return n
            parts.append(data if n == left else data[:left])
            self.left = 0
            self.done = True
            return left
        if framing == CHUNKED:
            decoder = self.decoder
            assert decoder is not None
            pieces: List[bytes] = []
            used = decoder.feed(data, pieces)
            if self.out_framing == CHUNKED:
                for p in pieces:
                    parts.append(chunk_header(len(p)))
                    parts.append(p)
                    parts.append(CRLF)
                if decoder.done:
                    parts.append(b"0\r\n%s\r\n" % decoder.trailers)
            else:
                parts.extend(pieces)
            if decoder.done:
                self.done = True
            return used
        # CLOSE_DELIMITED: everything until the peer closes.
        if self.out_framing == CHUNKED:
            parts.append(chunk_header(len(data)))
            parts.append(data)
            parts.append(CRLF)
        else:
            parts.append(data)
        return len(data)

    def end_of_stream(self, parts: List[Chunk]) -> bool:
        """The peer closed: True when that ends the body properly (RFC 9112 §6.3 step 8)."""
        if self.framing != CLOSE_DELIMITED:
            return self.done
        if self.out_framing == CHUNKED:
            parts.append(LAST_CHUNK)
        self.done = True
        return True
