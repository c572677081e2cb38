"""The chunked transfer coding (RFC 9112 §7.1): an incremental, strict decoder and the encoder helpers.

The proxy never forwards chunk framing it did not write itself: it decodes what it receives and
re-encodes the data with canonical chunk sizes, so a backend (or client) can only ever read the message
boundaries balrs saw. Chunk extensions are dropped (§7.1.1 lets a recipient ignore them); trailer fields
are validated and passed on.
"""

from __future__ import annotations

import re
from typing import List

from .errors import ProtocolError
from .heads import TCHARS

__all__ = ["ChunkedDecoder", "chunk_header", "LAST_CHUNK", "CRLF"]

# One chunk-size line (size and extensions) may be this long: nginx and HAProxy use a few kB too.
MAX_CHUNK_LINE = 4096
# 16 hex digits = 2**64 - 1: anything longer is an overflow attempt (§7.1 warns about it).
_MAX_SIZE_DIGITS = 16

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
# Trailing OWS before the CRLF is tolerated, as h11 does.
# Linear by construction (heads.py explains why that matters): every run of blanks is taken by the one
# ``[ \t]*`` right after the digit, token or value it follows, and what comes next (";", "=", CR) is
# never a blank; the token's class excludes blanks, ";", "=" and '"'; the quoted string's two
# alternatives start with different octets and neither matches its closing quote.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)[ \t]*(?:;[ \t]*" + _TOKEN + rb"[ \t]*(?:=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED
    + rb")[ \t]*)?)*\r\n"
)
_FIELD_OCTETS = bytes([0x09]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))

LAST_CHUNK = b"0\r\n"
CRLF = b"\r\n"

_SIZE = 0        # reading a chunk-size line
_DATA = 1        # inside chunk data
_DATA_END = 2    # expecting the CRLF after chunk data
_TRAILER = 3     # reading trailer field lines
_DONE = 4


def chunk_header(size: int) -> bytes:
    """The chunk-size line for ``size`` bytes of data."""
    return b"%x\r\n" % size


class ChunkedDecoder:
    """Feed it the bytes after a head; it appends the data pieces to a list and says how many input
    bytes belong to the message, so what follows (a pipelined request) stays with the caller.

    Errors raise ProtocolError(``error_status``): 400 for a client's body, 502 for a backend's.
    ``max_body`` (0 = none) raises 413 as soon as the declared chunk sizes pass it.
    """

    __slots__ = ("_state", "_remaining", "_line", "total", "max_body", "trailers", "_trailer_buf",
                 "_trailer_limit", "_error_status")

    def __init__(self, max_body: int = 0, trailer_limit: int = 65536, error_status: int = 400) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()
        self.total = 0
        self.max_body = max_body
        self.trailers = b""          # validated trailer field lines, each ending in CRLF (set when done)
        # Collected here: ``bytes +=`` per line would copy the whole section each time (quadratic).
        self._trailer_buf = bytearray()
        self._trailer_limit = trailer_limit
        self._error_status = error_status

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes, out: List[bytes]) -> int:
        """Decode ``data``, appending data pieces to ``out``. Returns the number of bytes of ``data``
        that belong to this body: all of it, or less once the message ends inside it."""
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = self._remaining
                if take >= n - pos:
                    take = n - pos
                    out.append(data if pos == 0 else data[pos:])
                else:
                    out.append(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            if state == _DONE:
                break
            # The other states read one line at a time.
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += memoryview(data)[pos:]
                self._check_line_length()
                return n
            if self._line:
                self._line += memoryview(data)[pos:nl + 1]
                self._check_line_length()
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[pos:nl + 1]
                if len(line) > MAX_CHUNK_LINE and state != _TRAILER:
                    raise self._error("chunk-size line too long")
            pos = nl + 1
            if state == _SIZE:
                self._size_line(line)
            elif state == _DATA_END:
                if line != b"\r\n":
                    raise self._error("chunk data not followed by CRLF")
                self._state = _SIZE
            else:
                self._trailer_line(line)
        return pos

    def _check_line_length(self) -> None:
        limit = self._trailer_limit if self._state == _TRAILER else MAX_CHUNK_LINE
        if len(self._line) > limit:
            raise self._error("chunk-size or trailer line too long")

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            raise self._error("invalid chunk-size line %r" % line[:40])
        digits = m.group(1)
        if len(digits) > _MAX_SIZE_DIGITS:
            raise self._error("chunk size overflows")
        size = int(digits, 16)
        if size == 0:
            self._state = _TRAILER
            return
        self.total += size
        if self.max_body and self.total > self.max_body:
            raise ProtocolError(413, "chunked body larger than %d bytes" % self.max_body)
        self._remaining = size
        self._state = _DATA

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _DONE
            if self._trailer_buf:
                self.trailers = bytes(self._trailer_buf)
            return
        if not line.endswith(b"\r\n"):
            raise self._error("trailer line without CRLF")
        name, colon, value = line[:-2].partition(b":")
        if not colon or not name or name.translate(None, TCHARS) or value.translate(None, _FIELD_OCTETS):
            raise self._error("invalid trailer field")
        if len(self._trailer_buf) + len(line) > self._trailer_limit:
            raise self._error("trailer section too large")
        self._trailer_buf += line

    def _error(self, message: str) -> ProtocolError:
        return ProtocolError(self._error_status, message)
