"""Message heads: finding where one ends, and parsing request and response heads (RFC 9112).

Sans-IO: bytes in, objects out; nothing here owns a socket or a clock. Every malformed input raises
:class:`ProtocolError` and nothing else.

Parsing is built for the hot path (STYLE habits 3, 5): one split of the head into lines, C-level
``bytes.translate`` passes for character validation, and a per-line loop that only does a
``partition``. Header names and values are kept as received, so the proxy can forward a head
unchanged when no hop-by-hop field needs removing (the common case) and rebuild it otherwise.
"""

from __future__ import annotations

import re
from typing import List, Optional

from .errors import ProtocolError

__all__ = [
    "NO_BODY", "LENGTH", "CHUNKED", "CLOSE_DELIMITED",
    "HeadBuffer", "RequestHead", "ResponseHead",
    "parse_request_head", "parse_response_head",
    "IDEMPOTENT_METHODS", "TCHARS",
]

# Body framing kinds (RFC 9112 §6.3).
NO_BODY = 0
LENGTH = 1
CHUNKED = 2
CLOSE_DELIMITED = 3  # responses only: the body runs until the backend closes

# RFC 9110 §5.6.2: token = 1*tchar.
TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5: field-value octets are HTAB, SP, VCHAR and obs-text. CR, LF, NUL and every other CTL
# are rejected, which also rejects bare CR and bare LF line endings inside the head (RFC 9112 §2.2 lets
# a recipient reject them; normalising them is how smuggling starts).
_FIELD_OCTETS = bytes([0x09]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_DIGITS = b"0123456789"
_CRLF_OCTETS = b"\r\n"
# RFC 9110 §7.2 / RFC 3986 §3.2.2: uri-host [ ":" port ]; reg-name, IPv4 and IP-literal characters.
_HOST_OCTETS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:[]"

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version CRLF. One SP each, nothing else;
# the target is VCHAR only (h11's request_target), so no whitespace or control byte can hide in it.
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]. Servers that omit the
# SP after the code are common enough to tolerate.
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

# RFC 9112 §2.2: empty lines before a request-line are ignored; a C-level match finds where they end.
_LEADING_EMPTY_LINES = re.compile(rb"[\r\n]*")

# A Content-Length needs at most 18 digits to stay below 2**63 (what nginx and HAProxy accept).
_MAX_CONTENT_LENGTH_DIGITS = 18


class HeadBuffer:
    """Collects received bytes until a complete message head is there.

    The search resumes where the last one stopped (h11's ReceiveBuffer), so a head fed one byte at a
    time costs O(n). A head ends at its first empty line; a bare-LF empty line also ends it, so that
    such a head is rejected at once rather than waited on. ``limit`` bounds the head (``max_header_bytes``):
    past it :meth:`pop_head` raises 431, or 414 while the request line itself is still unfinished.
    """

    __slots__ = ("buf", "_scanned", "limit")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self._scanned = 0
        self.limit = limit

    def __len__(self) -> int:
        return len(self.buf)

    def feed(self, data: bytes) -> Optional[bytes]:
        """Add received bytes; return a complete head (and keep what follows it) or None."""
        buf = self.buf
        # (data[0] compared as an int: `bytes in bytes` first tries the operand as an integer and
        # builds a TypeError it then discards, on every call.)
        if not buf and data and data[0] != 13 and data[0] != 10:
            # Fast path: nothing buffered and the head starts right away. Most requests arrive in one
            # segment, so the head is sliced out of the received bytes without a copy into the buffer.
            end = data.find(b"\n\r\n") + 3
            if end > 2 and end <= self.limit:
                if end == len(data):
                    return data
                buf += memoryview(data)[end:]
                return data[:end]
        buf += data
        return self.pop_head()

    def pop_head(self) -> Optional[bytes]:
        """Return the next complete head from the buffer, or None if it is not complete yet."""
        buf = self.buf
        if buf and buf[0] in _CRLF_OCTETS:
            # RFC 9112 §2.2: ignore empty lines received before the request-line. (Not lstrip: that
            # copies the whole buffer, pipelined requests included, once per head.)
            m = _LEADING_EMPTY_LINES.match(buf)
            assert m is not None  # the pattern matches the empty string
            del buf[:m.end()]
            self._scanned = 0
            if not buf:
                return None
        start = self._scanned
        end = buf.find(b"\n\r\n", start) + 3
        if end < 3:
            end = buf.find(b"\n\n", start) + 2
            if end < 2:
                if len(buf) > self.limit:
                    raise self._too_large()
                self._scanned = max(0, len(buf) - 2)
                return None
        if end > self.limit:
            # A bare-LF empty line before the CRLF one ends the head first, as it does when the bytes
            # come one at a time: return that (malformed, so rejected) head, not 431, whatever the
            # segmentation.
            end = buf.find(b"\n\n", start, end) + 2
            if end < 2 or end > self.limit:
                raise self._too_large()
        head = bytes(buf[:end])
        del buf[:end]
        self._scanned = 0
        return head

    def split(self, data: bytes) -> Optional["tuple[bytes, bytes]"]:
        """Like :meth:`feed`, but hand back what follows the head instead of keeping it:
        (head, rest), or None while the head is incomplete (then everything is buffered)."""
        if not self.buf and data and data[0] != 13 and data[0] != 10:
            end = data.find(b"\n\r\n") + 3
            if end > 2 and end <= self.limit:
                return data[:end], data[end:]
        self.buf += data
        head = self.pop_head()
        if head is None:
            return None
        return head, self.take()

    def take(self) -> bytes:
        """Remove and return everything buffered (body bytes or tunnel bytes after a head)."""
        data = bytes(self.buf)
        self.buf.clear()
        self._scanned = 0
        return data

    def _too_large(self) -> ProtocolError:
        limit = self.limit
        first_line_end = self.buf.find(b"\n", 0, limit + 1)
        if first_line_end < 0:
            return ProtocolError(414, "request line longer than %d bytes" % limit)
        return ProtocolError(431, "message head longer than %d bytes" % limit)


# RFC 9110 §5 / RFC 9112 §5: field-line = field-name ":" OWS field-value OWS CRLF, with a token name and
# field octets only. One fullmatch validates a whole field block in C: it rejects control characters,
# bare CR or LF, obs-fold (a line starting with SP/HTAB), whitespace before the colon and empty names.
_FIELD_BLOCK = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# The same validation over the lowercased head, capturing on the way the values of the fields a proxy
# acts on (a repeated group keeps its last capture; repeats are counted separately, only when present).
_V = rb"[\t\x20-\x7e\x80-\xff]*"
_T = rb"[-!#$%&'*+.^_`|~0-9a-z]+"
_REQUEST_FIELD_BLOCK = re.compile(
    rb"(?:(?:host:[ \t]*(" + _V + rb")|content-length:[ \t]*(" + _V + rb")|transfer-encoding:[ \t]*(" + _V
    + rb")|connection:[ \t]*(" + _V + rb")|upgrade:[ \t]*(" + _V + rb")|expect:[ \t]*(" + _V
    + rb")|(keep-alive|proxy-connection|te|trailer|x-forwarded-for|x-forwarded-proto|x-forwarded-host|via):"
    + _V + rb"|" + _T + rb":" + _V + rb")\r\n)*")
_RESPONSE_FIELD_BLOCK = re.compile(
    rb"(?:(?:content-length:[ \t]*(" + _V + rb")|transfer-encoding:[ \t]*(" + _V + rb")|connection:[ \t]*("
    + _V + rb")|(keep-alive|proxy-connection|te|trailer|upgrade):" + _V + rb"|" + _T + rb":" + _V
    + rb")\r\n)*")


# Whole heads, start line included, matched over the lowercased head in one C pass (the start line's
# case-sensitive parts are checked or taken from the original bytes by position).
_REQUEST_HEAD = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-z]+ [\x21-\x7e]+ http/([0-9])\.([0-9])\r\n" + _REQUEST_FIELD_BLOCK.pattern
    + rb"\r\n")
_RESPONSE_HEAD = re.compile(
    rb"http/([0-9])\.([0-9]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?\r\n" + _RESPONSE_FIELD_BLOCK.pattern
    + rb"\r\n")


def _all_values(r: "_Fields", lname: bytes) -> List[bytes]:
    """Every value of a field that occurs more than once (the rare path)."""
    return [v for n, v in zip(r.lnames, r.values) if n == lname]


def _request_problem(head: bytes) -> ProtocolError:
    """The error for a request head that failed the one-pass match (error path only)."""
    m = _REQUEST_LINE.match(head)
    if m is None:
        return ProtocolError(400, "malformed request line")
    major, minor = m.group(3), m.group(4)
    if major != b"1":
        return ProtocolError(505, "HTTP version %s.%s not supported" % (major.decode(), minor.decode()))
    return ProtocolError(400, _field_problem(head, m.end()))


def _response_problem(head: bytes) -> ProtocolError:
    """The error for a response head that failed the one-pass match (error path only)."""
    m = _STATUS_LINE.match(head)
    if m is None:
        return ProtocolError(502, "malformed status line")
    if m.group(1) != b"1":
        return ProtocolError(502, "backend answered in HTTP version %s" % m.group(1).decode())
    return ProtocolError(502, _field_problem(head, m.end()))


def _field_problem(head: bytes, start: int) -> str:
    """Say what is wrong with a field block that failed validation (error path only)."""
    if not head.endswith(b"\r\n\r\n"):
        return "head does not end with CRLF CRLF"
    for line in head[start:-4].split(b"\r\n"):
        if line.translate(None, _FIELD_OCTETS):
            return "control character or bare CR/LF in the head"
        name, colon, _value = line.partition(b":")
        if not colon:
            return "field line without a colon"
        if not name or name.translate(None, TCHARS):
            return "invalid field name (whitespace before colon, obs-fold or non-token)"
    return "malformed field block"


def _split_fields(head: bytes, start: int) -> "tuple[List[bytes], List[bytes], List[bytes]]":
    """Names, values (OWS stripped) and lowercased names of an already validated field block."""
    if start >= len(head) - 2:
        return [], [], []
    parts = [line.partition(b":") for line in head[start:-4].split(b"\r\n")]
    names = [p[0] for p in parts]
    values = [p[2].strip(b" \t") for p in parts]
    return names, values, b"\n".join(names).lower().split(b"\n")


class _Fields:
    """Lazily split fields: the hot path never needs them (it forwards heads as they are and finds
    the fields it acts on by one regex pass); rebuilding a head and the hash strategies do."""

    __slots__ = ("raw", "fields_start", "_fields")

    raw: bytes
    fields_start: int
    _fields: Optional["tuple[List[bytes], List[bytes], List[bytes]]"]

    def _split(self) -> "tuple[List[bytes], List[bytes], List[bytes]]":
        f = self._fields
        if f is None:
            f = self._fields = _split_fields(self.raw, self.fields_start)
        return f

    @property
    def names(self) -> List[bytes]:
        """Field names in order, as received."""
        return self._split()[0]

    @property
    def values(self) -> List[bytes]:
        """Field values in order, without surrounding whitespace."""
        return self._split()[1]

    @property
    def lnames(self) -> List[bytes]:
        """Field names in order, lowercased."""
        return self._split()[2]

    def header(self, lname: bytes) -> Optional[bytes]:
        """The combined value of a field (by lowercased name), or None."""
        names, values, lnames = self._split()
        vals = [v for n, v in zip(lnames, values) if n == lname]
        return b", ".join(vals) if vals else None


def _comma_list(values: List[bytes]) -> List[bytes]:
    """RFC 9110 §5.6.1: the lowercased, non-empty elements of a list-based field's lines."""
    out = []
    for v in values:
        for item in v.split(b","):
            item = item.strip(b" \t")
            if item:
                out.append(item.lower())
    return out


def _content_length(values: List[bytes], status: int) -> int:
    """RFC 9110 §8.6 / RFC 9112 §6.3 step 5: one decimal value; identical repeats are one value,
    differing ones (a smuggling vector) are an error."""
    if len(values) == 1:
        v = values[0]
        if v.isdigit() and len(v) <= _MAX_CONTENT_LENGTH_DIGITS:
            return int(v)
    found = -1
    for v in values:
        for item in v.split(b","):
            item = item.strip(b" \t")
            if not item or item.translate(None, _DIGITS) or len(item) > _MAX_CONTENT_LENGTH_DIGITS:
                raise ProtocolError(status, "invalid Content-Length %r" % item[:40])
            n = int(item)
            if found >= 0 and n != found:
                raise ProtocolError(status, "differing Content-Length values")
            found = n
    return found


def _framing_length(values: List[bytes], status: int) -> "tuple[int, bool]":
    """The body length a message's Content-Length gives, and whether the field is already in canonical
    form (one value, no leading zeros). Otherwise (duplicates like "5, 5", leading zeros) it is validated
    and the head is forwarded with one canonical value."""
    v = values[0]
    if len(values) == 1 and v.isdigit() and len(v) <= _MAX_CONTENT_LENGTH_DIGITS and (v[0] != 48 or len(v) == 1):
        return int(v), True
    return _content_length(values, status), False


class RequestHead(_Fields):
    """A parsed request head. ``names``/``values``/``lnames`` give the fields in order, as received
    (``lnames`` lowercased). ``rewrite`` is False when the head can be forwarded as is, apart from the
    fields the proxy appends (no hop-by-hop field, no X-Forwarded-*/Via to merge, HTTP/1.1)."""

    __slots__ = (
        "method", "target", "minor", "host", "framing", "length",
        "keep_alive", "expect_continue", "upgrade", "rewrite", "connection_tokens",
    )

    method: bytes
    target: bytes
    minor: int
    raw: bytes
    fields_start: int
    _fields: Optional["tuple[List[bytes], List[bytes], List[bytes]]"]
    host: Optional[bytes]
    framing: int
    length: int
    keep_alive: bool
    expect_continue: bool
    upgrade: Optional[bytes]
    rewrite: bool
    connection_tokens: List[bytes]

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    def __repr__(self) -> str:
        return "<RequestHead %s %s HTTP/1.%d>" % (self.method.decode("ascii"), self.target[:60].decode("ascii"),
                                                 self.minor)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (through its empty line). Raises ProtocolError with the status
    a server answers: 400 malformed, 501 unsupported transfer coding, 505 HTTP version, 417 expectation."""
    low = head.lower()
    f = _REQUEST_HEAD.fullmatch(low)
    if f is None:
        raise _request_problem(head)
    major, minor_b, host_v, cl_v, te_v, conn_v, upgrade_v, expect_v, hop = f.groups()
    # The request line: method and target as received (both case-sensitive), "HTTP/" in capitals.
    sp2 = f.start(1) - 6
    sp1 = head.find(b" ")
    if head[sp2 + 1:sp2 + 6] != b"HTTP/":
        raise ProtocolError(400, "malformed request line")
    if major != b"1":
        # RFC 9110 §15.6.6; HTTP/2 prior knowledge ("PRI * HTTP/2.0") lands here too.
        raise ProtocolError(505, "HTTP version %s.%s not supported" % (major.decode(), minor_b.decode()))
    # RFC 9110 §2.5: a 1.x recipient treats a higher minor version as the highest it supports.
    minor = 0 if minor_b == b"0" else 1

    r = RequestHead()
    r.method = head[:sp1]
    r.target = head[sp1 + 1:sp2]
    r.minor = minor
    r.raw = head
    r.fields_start = f.end(2) + 2
    r._fields = None
    r.host = None
    r.framing = NO_BODY
    r.length = 0
    r.keep_alive = minor == 1
    r.expect_continue = False
    r.upgrade = None
    # Forwarded as HTTP/1.1: a 1.0 (or 1.2, ...) request line is rewritten; hop-by-hop fields,
    # X-Forwarded-* and Via make the head be rebuilt.
    r.rewrite = minor_b != b"1" or hop is not None
    r.connection_tokens = []
    count = low.count

    cl_values: List[bytes] = []
    te_values: List[bytes] = []
    upgrade_values: List[bytes] = []
    expect_values: List[bytes] = []
    conn_values: List[bytes] = []
    hosts = 0
    if host_v is not None:
        hosts = count(b"\nhost:")
        a, b = f.span(3)
        r.host = head[a:b].rstrip(b" \t")
    if cl_v is not None:
        cl_values = [cl_v.rstrip(b" \t")] if count(b"\ncontent-length:") == 1 else _all_values(r, b"content-length")
    if te_v is not None:
        a, b = f.span(5)  # original case: "Chunked" is forwarded rewritten
        te_values = ([head[a:b].rstrip(b" \t")] if count(b"\ntransfer-encoding:") == 1
                     else _all_values(r, b"transfer-encoding"))
    if conn_v is not None:
        r.rewrite = True
        conn_values = [conn_v] if count(b"\nconnection:") == 1 else _all_values(r, b"connection")
    if upgrade_v is not None:
        r.rewrite = True
        a, b = f.span(7)
        upgrade_values = ([head[a:b].rstrip(b" \t")] if count(b"\nupgrade:") == 1
                          else _all_values(r, b"upgrade"))
    if expect_v is not None:
        expect_values = [expect_v] if count(b"\nexpect:") == 1 else _all_values(r, b"expect")

    # RFC 9112 §3.2: exactly one Host in HTTP/1.1, with a valid value.
    if hosts > 1:
        raise ProtocolError(400, "more than one Host field")
    if r.host is None:
        if minor == 1:
            raise ProtocolError(400, "HTTP/1.1 request without Host")
    elif r.host.translate(None, _HOST_OCTETS):
        raise ProtocolError(400, "invalid Host value")

    if conn_values:
        tokens = _comma_list(conn_values)
        r.connection_tokens = tokens
        if b"close" in tokens:
            r.keep_alive = False
        elif minor == 0 and b"keep-alive" in tokens:
            r.keep_alive = True

    # Framing, RFC 9112 §6.3 (requests).
    if te_values:
        if minor == 0:
            # §6.1: Transfer-Encoding in an HTTP/1.0 message means its framing is faulty.
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl_values:
            # §6.3 step 3: TE and CL together look like smuggling; reject (the contract allows it).
            raise ProtocolError(400, "both Transfer-Encoding and Content-Length")
        codings = _comma_list(te_values)
        if any(c != b"chunked" for c in codings):
            # §6.1: a coding we do not understand -> 501 (this includes "gzip, chunked").
            raise ProtocolError(501, "unsupported transfer coding")
        if len(codings) != 1:
            # §6.1: chunked applied more than once, or an empty field value.
            raise ProtocolError(400, "invalid Transfer-Encoding")
        r.framing = CHUNKED
        if len(te_values) > 1 or te_values[0] != b"chunked":
            # Forward one canonical "chunked": a backend may not read "Chunked" or ", chunked" as we do.
            r.rewrite = True
    elif cl_values:
        r.framing = LENGTH
        r.length, canonical = _framing_length(cl_values, 400)
        if not canonical:
            r.rewrite = True

    if expect_values:
        expectations = _comma_list(expect_values)
        if expectations != [b"100-continue"]:
            # RFC 9110 §10.1.1: 417 for an expectation we cannot meet.
            raise ProtocolError(417, "unsupported expectation")
        # RFC 9110 §10.1.1: a 100-continue received in HTTP/1.0 is ignored.
        r.expect_continue = minor == 1

    if upgrade_values and minor == 1 and b"upgrade" in r.connection_tokens:
        # RFC 9110 §7.8: Upgrade only counts when Connection names it, and never in HTTP/1.0.
        r.upgrade = b", ".join(upgrade_values)
    return r


class ResponseHead(_Fields):
    """A parsed response head; ``framing`` follows RFC 9112 §6.3 for the request it answers."""

    __slots__ = (
        "status", "minor", "framing", "length", "keep_alive",
        "rewrite", "connection_tokens", "has_connection", "has_te",
    )

    status: int
    minor: int
    raw: bytes
    fields_start: int
    _fields: Optional["tuple[List[bytes], List[bytes], List[bytes]]"]
    framing: int
    length: int
    keep_alive: bool
    rewrite: bool
    connection_tokens: List[bytes]
    has_connection: bool
    has_te: bool

    @property
    def line_end(self) -> int:
        """Where the status line ends (its CRLF included)."""
        return self.fields_start

    def __repr__(self) -> str:
        return "<ResponseHead %d HTTP/1.%d>" % (self.status, self.minor)


def parse_response_head(head: bytes, head_request: bool = False) -> ResponseHead:
    """Parse a complete response head. ``head_request``: it answers a HEAD request (no body).
    Raises ProtocolError(502, ...) for anything a proxy must not pass on."""
    low = head.lower()
    f = _RESPONSE_HEAD.fullmatch(low)
    if f is None or head[:5] != b"HTTP/":
        raise _response_problem(head)
    major, minor_b, status_b, cl_v, te_v, conn_v, hop = f.groups()
    if major != b"1":
        raise ProtocolError(502, "backend answered in HTTP version %s" % major.decode())
    status = int(status_b)
    if status < 100:
        raise ProtocolError(502, "status code %d" % status)
    minor = 0 if minor_b == b"0" else 1

    r = ResponseHead()
    r.status = status
    r.minor = minor
    r.raw = head
    r.fields_start = head.find(b"\n") + 1
    r._fields = None
    r.framing = NO_BODY
    r.length = 0
    r.keep_alive = minor == 1
    # The status line goes out as HTTP/1.1; hop-by-hop fields are removed.
    r.rewrite = minor_b != b"1" or hop is not None
    r.connection_tokens = []
    r.has_connection = False
    # RFC 9112 §6.3 step 3: never forward both Transfer-Encoding and Content-Length, whatever the
    # status (an answer to HEAD too).
    r.has_te = te_v is not None
    if r.has_te and cl_v is not None:
        r.rewrite = True
    count = low.count

    cl_values: List[bytes] = []
    te_values: List[bytes] = []
    if cl_v is not None:
        cl_values = [cl_v.rstrip(b" \t")] if count(b"\ncontent-length:") == 1 else _all_values(r, b"content-length")
    if te_v is not None:
        te_values = ([te_v.rstrip(b" \t")] if count(b"\ntransfer-encoding:") == 1
                     else [v.lower() for v in _all_values(r, b"transfer-encoding")])
    if conn_v is not None:
        r.has_connection = True
        values = [conn_v.rstrip(b" \t")] if count(b"\nconnection:") == 1 else [
            v.lower() for v in _all_values(r, b"connection")]
        if values == [b"keep-alive"]:
            # What balrs says itself to a client it keeps: "replace it with the intermediary's own
            # control options" (RFC 9110 §7.6.1) needs no rewrite then.
            r.connection_tokens = values
        else:
            r.connection_tokens = _comma_list(values)
            r.rewrite = True
    tokens = r.connection_tokens
    if tokens:
        if b"close" in tokens:
            r.keep_alive = False
        elif minor == 0 and b"keep-alive" in tokens:
            r.keep_alive = True

    # Framing, RFC 9112 §6.3 (responses).
    if head_request or status < 200 or status == 204 or status == 304:
        # Step 1: no content whatever the fields say (a response to HEAD keeps its Content-Length).
        return r
    if te_values:
        # Step 3/4: TE overrides CL; chunked last means chunked, anything else reads until close.
        codings = _comma_list(te_values)
        if codings and codings[-1] == b"chunked":
            if codings.count(b"chunked") != 1:
                raise ProtocolError(502, "chunked applied more than once")
            r.framing = CHUNKED
        else:
            r.framing = CLOSE_DELIMITED
            r.keep_alive = False
            r.rewrite = True  # an HTTP/1.0 client must not see Transfer-Encoding (§6.1)
        if cl_values:
            # Step 3: the Content-Length must be removed before forwarding, and the connection is not
            # reused after such a message (§6.1).
            r.rewrite = True
            r.keep_alive = False
        elif minor == 0:
            # §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing: close after this message.
            r.keep_alive = False
        return r
    if cl_values:
        r.framing = LENGTH
        r.length, canonical = _framing_length(cl_values, 502)
        if not canonical:
            r.rewrite = True
        return r
    # Step 8: read until the server closes.
    r.framing = CLOSE_DELIMITED
    r.keep_alive = False
    return r
