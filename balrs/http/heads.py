"""Message heads: finding where one ends, and parsing request and response heads (RFC 9112).

Sans-IO: bytes in, objects out; nothing here owns a socket or a clock. Every malformed input raises
:class:`ProtocolError` and nothing else.

Parsing is built for the hot path (STYLE habits 3, 5): one compiled regular expression, matched once over
the lowercased head, validates the start line and every field line and captures, in the same C pass, the
values of the fields a proxy acts on. Header names and values are kept as received, so the proxy can
forward a head unchanged when no hop-by-hop field needs removing (the common case) and rebuild it
otherwise.

balrs runs one event loop for every connection, so a parse that is slow on some input stalls them all.
Every regular expression here is therefore linear in its input *by construction*, never by luck: the
alternatives of an alternation can never match the same text (a field line has exactly one branch that can
take its name), and no repetition can split the same text two ways (each is followed by something it
cannot match itself, e.g. ``[ \t]*`` before a value that must start with a non-blank). The engine then has
at most one way to match any prefix, so a failing match backtracks over each byte a bounded number of
times. ``tests/test_redos.py`` checks that with adversarial heads up to the size limits.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from .errors import ProtocolError

__all__ = [
    "NO_BODY", "LENGTH", "CHUNKED", "CLOSE_DELIMITED",
    "HeadBuffer", "RequestHead", "ResponseHead", "REQUEST", "RESPONSE",
    "parse_request_head", "parse_response_head", "match_response_head", "simple_response", "response_from_match",
    "ResponseMatch",
    "IDEMPOTENT_METHODS", "TCHARS", "cookie_value",
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
# What may appear anywhere in a head: the field octets and the CR LF that end its lines.
_HEAD_OCTETS = _FIELD_OCTETS + b"\r\n"
_DIGITS = b"0123456789"
_CRLF_OCTETS = b"\r\n"
# RFC 9110 §7.2 / RFC 3986 §3.2.2: uri-host [ ":" port ]; reg-name, IPv4 and IP-literal characters.
_HOST_OCTETS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=:[]"

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version CRLF. One SP each, nothing else;
# the target is VCHAR only (h11's request_target), so no whitespace or control byte can hide in it.
# Linear: the method's class excludes SP, the target's excludes SP, so each field ends at the one SP.
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]. Servers that omit the
# SP after the code are common enough to tolerate. Linear: the reason's class excludes CR.
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
# One field line, as HeadBuffer checks the lines of a head still arriving (its octets are already known
# to be field octets): a token, then the colon. Linear: tchar excludes ":".
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:")

# RFC 9112 §3.2.2: absolute-form = absolute-URI, here scheme "://" authority path-abempty [ "?" query ]
# (RFC 3986 §3). Linear: the scheme's class excludes ":", the authority's excludes the "/" or "?" that
# must start what follows it.
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][-+.0-9A-Za-z]*)://([^/?#]*)((?:[/?][^#]*)?)")
_SCHEMES = frozenset([b"http", b"https"])

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

# RFC 9112 §2.2: empty lines (CRLF, or a bare LF: §2.2 lets a recipient take LF for a line end) before a
# request-line are ignored; a bare CR is not an empty line, and is rejected like a bare CR anywhere else.
# Linear: each repetition ends at its LF.
_LEADING_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
# A CR not followed by LF, and an LF not preceded by CR (RFC 9112 §2.2): a head with either can never
# become valid. Linear: each alternative is one octet and a one-octet assertion.
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")

# A Content-Length needs at most 18 digits to stay below 2**63 (what nginx and HAProxy accept).
_MAX_CONTENT_LENGTH_DIGITS = 18
# A response's three status digits -> the status (1,000 small entries).
_STATUS_CODES = {b"%03d" % i: i for i in range(1000)}

# Head kinds, for HeadBuffer: what a start line looks like, and what a malformed head is answered with
# (a client's malformed request is 400; a backend's malformed response is 502 for the client).
REQUEST = 0
RESPONSE = 1


class HeadBuffer:
    """Collects received bytes until a complete message head is there.

    The search resumes where the last one stopped (h11's ReceiveBuffer), so a head fed one byte at a
    time costs O(n). A head ends at its first empty line; a bare-LF empty line also ends it, so that
    such a head is rejected at once rather than waited on. ``limit`` bounds the head (``max_header_bytes``):
    past it :meth:`pop_head` raises 431, or 414 while the request line itself is still unfinished.

    While a head is incomplete, what has arrived is checked as it arrives (each byte once): a byte that
    can never be in a head, a bare CR or LF, a malformed start line or a field line that is not
    ``token ":" ...`` raise ProtocolError at once (400, or 505 for an unsupported HTTP version; 502 for a
    ``RESPONSE`` head), as HAProxy does, instead of holding the connection until ``header_timeout``. A
    head that arrives whole skips this: the parser validates it anyway.
    """

    __slots__ = ("buf", "_scanned", "limit", "kind", "_checked", "_line")

    def __init__(self, limit: int, kind: int = REQUEST) -> None:
        self.buf = bytearray()
        self._scanned = 0
        self.limit = limit
        self.kind = kind
        # Early checks of an incomplete head: bytes before _checked passed the octet checks; _line is
        # where the first line not yet checked whole starts (0: the start line is still to check).
        self._checked = 0
        self._line = 0

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
            if m.end():
                del buf[:m.end()]
                self._scanned = self._checked = self._line = 0
            if not buf:
                return None
        start = self._scanned
        end = buf.find(b"\n\r\n", start) + 3
        if end < 3:
            end = buf.find(b"\n\n", start) + 2
            if end < 2:
                limit = self.limit
                if len(buf) > limit:
                    self._check(limit)
                    raise self._too_large()
                self._check(len(buf))
                self._scanned = max(0, len(buf) - 2)
                return None
        if end > self.limit:
            # A bare-LF empty line before the CRLF one ends the head first, as it does when the bytes
            # come one at a time: return that (malformed, so rejected) head, not 431, whatever the
            # segmentation.
            end = buf.find(b"\n\n", start, end) + 2
            if end < 2 or end > self.limit:
                self._check(self.limit)
                raise self._too_large()
        head = bytes(buf[:end])
        del buf[:end]
        self._scanned = self._checked = self._line = 0
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
        self._scanned = self._checked = self._line = 0
        return data

    def _check(self, upto: int) -> None:
        """Raise if the first ``upto`` bytes of the (incomplete) head can never begin a valid head.

        Each byte is looked at a bounded number of times over all calls: octets and line ends from
        ``_checked`` on, each completed line once. The start line is judged as soon as it is complete:
        a valid one with an unsupported version is 505 whatever follows, as for a complete head.
        """
        buf = self.buf
        pos = self._checked
        stop = upto
        if stop == len(buf) and stop and buf[stop - 1] == 13:
            stop -= 1  # a CR at the very end may still be followed by its LF
        if stop <= pos:
            return
        line = self._line
        if line == 0:
            nl = buf.find(b"\n", pos, stop)
            if nl >= 0:
                problem = _start_line_problem(bytes(buf[:nl + 1]), self.kind)
                if problem is not None:
                    raise problem
                line = nl + 1
        status = 502 if self.kind == RESPONSE else 400
        if buf[pos:stop].translate(None, _HEAD_OCTETS):
            raise ProtocolError(status, "control character in the head")
        m = _BARE_CR.search(buf, pos, min(stop + 1, len(buf)))
        if m is not None and m.start() < stop:
            raise ProtocolError(status, "bare CR in the head")
        if _BARE_LF.search(buf, pos, stop) is not None:
            raise ProtocolError(status, "bare LF in the head")
        if line:
            # Field lines completed by the new bytes: each must be token ":" (obs-fold, whitespace
            # before the colon and lines without one can never become valid).
            find = buf.find
            nl = find(b"\n", max(pos, line), stop)
            while nl >= 0:
                if _FIELD_NAME.match(buf, line, nl) is None:
                    raise ProtocolError(status, "invalid field line (obs-fold, no colon or non-token name)")
                line = nl + 1
                nl = find(b"\n", line, stop)
        self._line = line
        self._checked = stop

    def _too_large(self) -> ProtocolError:
        limit = self.limit
        first_line_end = self.buf.find(b"\n", 0, limit + 1)
        if first_line_end < 0:
            return ProtocolError(414, "request line longer than %d bytes" % limit)
        return ProtocolError(431, "message head longer than %d bytes" % limit)


# ---- the one-pass patterns --------------------------------------------------------------------------
# RFC 9110 §5 / RFC 9112 §5: field-line = field-name ":" OWS field-value OWS CRLF, with a token name and
# field octets only. One fullmatch validates a whole head in C: it rejects control characters, bare CR
# or LF, obs-fold (a line starting with SP/HTAB), whitespace before the colon and empty names, and
# captures on the way the values of the fields a proxy acts on (a repeated group keeps its last capture;
# repeats are counted separately, only when present). The head is lowercased first.
#
# Why the patterns are linear (see the module docstring):
# - A field line has exactly one branch that can take it. The branches start with distinct octets: one
#   per first letter of the names of interest, and one for every other token octet (the engine skips a
#   branch whose first octet does not match without entering it, which is also what makes this layout
#   fast). Inside a letter's branch, the named fields are distinct names each followed by ":", and the
#   generic line refuses, by a negative lookahead, exactly those names with their colon. (Before, "via:"
#   matched both its own branch and the generic one: 2**N ways to fail on N such lines.)
# - Within a line every repetition is followed by what it cannot match: a token by ":", a value by CR,
#   and the OWS before a captured value by a lookahead that the value does not start with a blank (before,
#   "[ \t]*(value)" could split a run of blanks in any of N places: quadratic).
# - A line always ends in CRLF and the next starts with a token octet or the final CRLF, so the outer
#   repetition can only split the head at its line ends.
_V = rb"[\t\x20-\x7e\x80-\xff]*"              # field-value octets, OWS included (never CR or LF)
_TOKEN_OCTETS = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"   # lowercased tchar
# A captured value: the OWS before it is outside the group, which starts at a non-blank octet (or is
# empty at the CR), so there is one way to split them. Trailing OWS stays in the capture (stripped later).
_CAPTURED = rb"[ \t]*(?![ \t])(" + _V + rb")"
# Host is captured already validated (RFC 3986 §3.2.2 octets, lowercased), with OWS on either side.
_HOST_VALUE = rb"[ \t]*(?![ \t])([-a-z0-9._~%!$&'()*+,;=:\[\]]*)[ \t]*"


def _field_block(named: "List[tuple[bytes, bytes]]", flagged: List[bytes]) -> "tuple[bytes, List[bytes]]":
    """A pattern for a block of field lines that captures the value of each ``named`` field (name, value
    pattern with one group) and marks with a group (capturing its colon) each first letter of the
    ``flagged`` names that occurs. Returns the pattern and what each of its groups is, in order: a name,
    or b"" for a flag."""
    by_letter: "dict[int, tuple[List[tuple[bytes, bytes]], List[bytes]]]" = {}
    for name, value in named:
        by_letter.setdefault(name[0], ([], []))[0].append((name, value))
    for name in flagged:
        by_letter.setdefault(name[0], ([], []))[1].append(name)
    others = bytes(c for c in _TOKEN_OCTETS if c not in by_letter)
    branches = [b"[" + re.escape(others) + b"][" + re.escape(_TOKEN_OCTETS) + b"]*:" + _V]
    groups: List[bytes] = []
    for letter, (names, flags) in by_letter.items():
        alternatives = []
        for name, value in names:
            alternatives.append(re.escape(name[1:]) + b":" + value)
            groups.append(name)
        if flags:
            alternatives.append(b"(?:" + b"|".join(re.escape(n[1:]) for n in flags) + b")(:)" + _V)
            groups.append(b"")
        taken = b"|".join(re.escape(n[1:]) for n in [n for n, _v in names] + flags)
        alternatives.append(b"(?!(?:" + taken + b"):)[" + re.escape(_TOKEN_OCTETS) + b"]*:" + _V)
        branches.append(re.escape(bytes([letter])) + b"(?:" + b"|".join(alternatives) + b")")
    return b"(?:(?:" + b"|".join(branches) + b")\r\n)*", groups


# Requests: the framing and connection fields; hop-by-hop fields and X-Forwarded-*/Via are only flagged
# (their presence makes the head be rebuilt). Most frequent first: low group numbers cost least.
_REQUEST_FIELD_BLOCK, _REQUEST_GROUPS = _field_block(
    [(b"host", _HOST_VALUE), (b"content-length", _CAPTURED), (b"connection", _CAPTURED),
     (b"transfer-encoding", _CAPTURED), (b"upgrade", _CAPTURED), (b"expect", _CAPTURED)],
    [b"keep-alive", b"proxy-connection", b"te", b"trailer", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"via"])
_RESPONSE_FIELD_BLOCK, _RESPONSE_GROUPS = _field_block(
    [(b"content-length", _CAPTURED), (b"connection", _CAPTURED), (b"transfer-encoding", _CAPTURED)],
    [b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"])
# What f.groups() holds after the start line's groups, in order: the parsers unpack it so (a flag is b"":
# the first letter "t", "k", "p", "x", "v" or "u" of a flagged field).
assert _REQUEST_GROUPS == [b"host", b"content-length", b"connection", b"transfer-encoding", b"", b"upgrade",
                           b"expect", b"", b"", b"", b""], _REQUEST_GROUPS
assert _RESPONSE_GROUPS == [b"content-length", b"connection", b"transfer-encoding", b"", b"", b"", b""]

# Whole heads, start line included, matched over the lowercased head in one C pass (the start line's
# case-sensitive parts are checked or taken from the original bytes by position). The request target is
# VCHAR without "#": a fragment is in none of the forms of RFC 9112 §3.2.
_REQUEST_HEAD = re.compile(
    rb"[-!#$%&'*+.^_`|~0-9a-z]+ [\x21\x22\x24-\x7e]+ http/([0-9])\.([0-9])\r\n" + _REQUEST_FIELD_BLOCK
    + rb"\r\n")
_RESPONSE_HEAD = re.compile(
    rb"http/([0-9])\.([0-9]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?\r\n" + _RESPONSE_FIELD_BLOCK + rb"\r\n")


def _all_values(r: "_Fields", lname: bytes) -> List[bytes]:
    """Every value of a field that occurs more than once (the rare path)."""
    return [v for n, v in zip(r.lnames, r.values) if n == lname]


def _start_line_problem(line: bytes, kind: int) -> Optional[ProtocolError]:
    """The error for a malformed start line (through its LF), or None if it is well formed."""
    if kind == RESPONSE:
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            return ProtocolError(502, "malformed status line")
        if m.group(1) != b"1":
            return ProtocolError(502, "backend answered in HTTP version %s" % m.group(1).decode())
        return None
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        return ProtocolError(400, "malformed request line")
    major, minor = m.group(3), m.group(4)
    if major != b"1":
        # RFC 9110 §15.6.6; HTTP/2 prior knowledge ("PRI * HTTP/2.0") lands here too.
        return ProtocolError(505, "HTTP version %s.%s not supported" % (major.decode(), minor.decode()))
    problem = _target_problem(m.group(1), m.group(2))
    if problem is not None:
        return ProtocolError(400, problem)
    return None


def _target_problem(method: bytes, target: bytes) -> Optional[str]:
    """Why a request target is in none of the forms RFC 9112 §3.2 allows this request, or None.

    origin-form ("/path?query"), absolute-form ("http://host/path", the scheme http or https), the
    authority-form ("host:port") for CONNECT only and the asterisk-form ("*") for OPTIONS only. A
    fragment, a relative path or anything else is refused: a backend could read it differently from
    balrs' routing and hashing.
    """
    if target.find(b"#") >= 0:
        return "fragment in the request target"
    if target[0] == 47:  # "/"
        return None
    if target == b"*":
        return None if method == b"OPTIONS" else "asterisk-form target with a method other than OPTIONS"
    m = _ABSOLUTE_FORM.fullmatch(target)
    if m is not None:
        if m.group(1).lower() not in _SCHEMES:
            return "absolute-form target with a scheme other than http or https"
        return _authority_problem(m.group(2))
    if method == b"CONNECT":
        return _authority_problem(target)
    return "request target in none of the forms of RFC 9112 section 3.2"


def _authority_problem(authority: bytes) -> Optional[str]:
    """RFC 9110 §4.2.1: a non-empty host, no userinfo (§4.2.4: treat it as an error), host characters."""
    if not authority:
        return "empty host in the request target"
    if authority.translate(None, _HOST_OCTETS):
        return "invalid authority in the request target"
    return None


def _head_problem(head: bytes, kind: int) -> ProtocolError:
    """The error for a head that failed the one-pass match (error path only): its start line's, or its
    field block's (400 for a request, 502 for a response)."""
    nl = head.find(b"\n") + 1  # (0: no line end at all, and the empty start line is malformed)
    problem = _start_line_problem(head[:nl], kind)
    if problem is not None:
        return problem
    return ProtocolError(502 if kind == RESPONSE else 400, _field_problem(head, nl))


def _field_problem(head: bytes, start: int) -> str:
    """Say what is wrong with a field block that failed validation (error path only)."""
    if not head.endswith(b"\r\n\r\n"):
        return "head does not end with CRLF CRLF"
    for line in head[start:-4].split(b"\r\n"):
        if line.translate(None, _FIELD_OCTETS):
            return "control character or bare CR/LF in the head"
        name, colon, value = line.partition(b":")
        if not colon:
            return "field line without a colon"
        if not name or name.translate(None, TCHARS):
            return "invalid field name (whitespace before colon, obs-fold or non-token)"
        if name.lower() == b"host" and value.strip(b" \t").translate(None, _HOST_OCTETS):
            return "invalid Host value"
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

    __slots__ = ("raw", "low", "fields_start", "_fields")

    raw: bytes
    low: bytes  # raw, lowercased (the parser makes it anyway)
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

    def find_field(self, lname: bytes) -> Optional[bytes]:
        """The value of the first field named ``lname`` (lowercase), found with one substring search of
        the lowercased head (linear, in C), without splitting it into fields (for the access log and
        request ids, per request)."""
        low = self.low
        i = low.find(b"\r\n" + lname + b":", self.fields_start - 2)
        if i < 0:
            return None
        start = i + len(lname) + 3
        return self.raw[start:low.index(b"\r\n", start)].strip(b" \t")


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
    fields the proxy appends (no hop-by-hop field, no X-Forwarded-*/Via to merge, HTTP/1.1).
    ``absolute``: the target came in absolute-form; ``target`` is then its origin-form and ``host`` its
    authority, which replaces any Host field (RFC 9112 §3.2.2)."""

    __slots__ = (
        "method", "target", "minor", "host", "absolute", "framing", "length",
        "keep_alive", "expect_continue", "upgrade", "rewrite", "connection_tokens",
    )

    method: bytes
    target: bytes
    minor: int
    raw: bytes
    fields_start: int
    _fields: Optional["tuple[List[bytes], List[bytes], List[bytes]]"]
    host: Optional[bytes]
    absolute: bool
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
        raise _head_problem(head, REQUEST)
    (major, minor_b, host_v, cl_v, conn_v, te_v, flag_t, upgrade_v, expect_v, flag_k, flag_p, flag_x,
     flag_v) = f.groups()
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
    r.low = low
    r.method = head[:sp1]
    r.target = head[sp1 + 1:sp2]
    r.minor = minor
    r.raw = head
    r.fields_start = f.end(2) + 2
    r._fields = None
    r.host = None
    r.absolute = False
    r.framing = NO_BODY
    r.length = 0
    r.keep_alive = minor == 1
    r.expect_continue = False
    r.upgrade = None
    # Forwarded as HTTP/1.1: a 1.0 (or 1.2, ...) request line is rewritten; hop-by-hop fields,
    # X-Forwarded-* and Via make the head be rebuilt.
    r.rewrite = (minor_b != b"1" or flag_t is not None or flag_k is not None or flag_p is not None
                 or flag_x is not None or flag_v is not None)
    r.connection_tokens = []
    count = low.count

    if host_v is not None:
        # RFC 9112 §3.2: exactly one Host (its value was validated by the match).
        if count(b"\nhost:") > 1:
            raise ProtocolError(400, "more than one Host field")
        a, b = f.span(3)
        r.host = head[a:b]
    elif minor == 1:
        raise ProtocolError(400, "HTTP/1.1 request without Host")
    if r.target[0] != 47:  # not origin-form ("/...")
        _other_target_form(r)
    if cl_v is None and te_v is None and conn_v is None and upgrade_v is None and expect_v is None:
        return r  # no body, and nothing about the connection: most requests (framing NO_BODY, as set)
    # Lists only for the fields that are there.
    cl_values: Optional[List[bytes]] = None
    te_values: Optional[List[bytes]] = None
    upgrade_values: Optional[List[bytes]] = None
    expect_values: Optional[List[bytes]] = None
    conn_values: Optional[List[bytes]] = None
    if cl_v is not None:
        cl_values = [cl_v.rstrip(b" \t")] if count(b"\ncontent-length:") == 1 else _all_values(r, b"content-length")
    if te_v is not None:
        a, b = f.span(6)  # original case: "Chunked" is forwarded rewritten
        te_values = ([head[a:b].rstrip(b" \t")] if count(b"\ntransfer-encoding:") == 1
                     else _all_values(r, b"transfer-encoding"))
    if conn_v is not None:
        r.rewrite = True
        conn_values = [conn_v] if count(b"\nconnection:") == 1 else _all_values(r, b"connection")
    if upgrade_v is not None:
        r.rewrite = True
        a, b = f.span(8)
        upgrade_values = ([head[a:b].rstrip(b" \t")] if count(b"\nupgrade:") == 1
                          else _all_values(r, b"upgrade"))
    if expect_v is not None:
        expect_values = [expect_v] if count(b"\nexpect:") == 1 else _all_values(r, b"expect")

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
        # RFC 9110 §5.6.1: empty list elements are ignored, so "Expect:" (or ", ,") expects nothing.
        expectations = _comma_list(expect_values)
        if any(e != b"100-continue" for e in expectations):
            # RFC 9110 §10.1.1: 417 for an expectation we cannot meet.
            raise ProtocolError(417, "unsupported expectation")
        # RFC 9110 §10.1.1: a 100-continue received in HTTP/1.0 is ignored.
        r.expect_continue = minor == 1 and bool(expectations)

    if upgrade_values and minor == 1 and b"upgrade" in r.connection_tokens:
        # RFC 9110 §7.8: Upgrade only counts when Connection names it, and never in HTTP/1.0.
        r.upgrade = b", ".join(upgrade_values)
    return r


def _other_target_form(r: RequestHead) -> None:
    """A target that is not origin-form (RFC 9112 §3.2): check its form; an absolute-form target is
    forwarded in origin-form, with its authority as the Host (§3.2.2: a proxy "MUST ignore the received
    Host header field (if any) and instead replace it with the host information of the request-target"),
    so that routing, hashing and the backend all see one host and one path."""
    target = r.target
    problem = _target_problem(r.method, target)
    if problem is not None:
        raise ProtocolError(400, problem)
    m = _ABSOLUTE_FORM.fullmatch(target)
    if m is None:
        return  # "*" for OPTIONS, or "host:port" for CONNECT
    rest = m.group(3)
    if not rest[:1] == b"/":
        # RFC 9110 §4.2.3: an empty path is "/"; RFC 9112 §3.2.4: for OPTIONS, "*".
        rest = b"*" if not rest and r.method == b"OPTIONS" else b"/" + rest
    r.target = rest
    r.host = m.group(2)
    r.absolute = True
    r.rewrite = True


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


# What match_response_head gives: the head lowercased, and the groups of its match.
ResponseMatch = Tuple[bytes, Tuple[Optional[bytes], ...]]


def parse_response_head(head: bytes, head_request: bool = False) -> ResponseHead:
    """Parse a complete response head. ``head_request``: it answers a HEAD request (no body).
    Raises ProtocolError(502, ...) for anything a proxy must not pass on."""
    return response_from_match(head, match_response_head(head), head_request)


def match_response_head(head: bytes) -> ResponseMatch:
    """The one pass over a response head that validates it (see the patterns above); raises
    ProtocolError(502, ...) when it is malformed. Then :func:`simple_response` or
    :func:`response_from_match` read the result."""
    low = head.lower()
    f = _RESPONSE_HEAD.fullmatch(low)
    if f is None or head[:5] != b"HTTP/":
        raise _head_problem(head, RESPONSE)
    return low, f.groups()


def simple_response(m: ResponseMatch, head_request: bool) -> Optional[Tuple[int, int]]:
    """(status, Content-Length) when the response is the common kind that goes to an HTTP/1.1
    keep-alive client exactly as received: HTTP/1.1, a final status with a body (not 204 or 304, not
    to HEAD), one canonical Content-Length, no Transfer-Encoding, no hop-by-hop field but at most
    ``Connection: keep-alive``. None for anything else (:func:`response_from_match` then says what it
    is, errors included). Such a response is what :func:`response_from_match` would make with
    framing LENGTH, keep_alive true and rewrite false; the proxy's fast path needs no more of it."""
    low, g = m
    major, minor_b, status_b, cl_v, conn_v, te_v, flag_t, flag_k, flag_p, flag_u = g
    if (cl_v is None or te_v is not None or minor_b != b"1" or major != b"1" or head_request
            or flag_t is not None or flag_k is not None or flag_p is not None or flag_u is not None):
        return None
    status = _STATUS_CODES[status_b]  # type: ignore[index]
    if status < 200 or status == 204 or status == 304:
        return None
    count = low.count
    if conn_v is not None and (conn_v.rstrip(b" \t") != b"keep-alive" or count(b"\nconnection:") != 1):
        return None
    v = cl_v.rstrip(b" \t")
    if (not v.isdigit() or len(v) > _MAX_CONTENT_LENGTH_DIGITS or (v[0] == 48 and len(v) > 1)
            or count(b"\ncontent-length:") != 1):
        return None
    return status, int(v)


def response_from_match(head: bytes, m: ResponseMatch, head_request: bool = False) -> ResponseHead:
    """The parsed response head of ``head`` from its :func:`match_response_head`. Raises
    ProtocolError(502, ...) for anything a proxy must not pass on."""
    low, g = m
    major, minor_b, status_b, cl_v, conn_v, te_v, flag_t, flag_k, flag_p, flag_u = g
    assert major is not None and minor_b is not None and status_b is not None
    if major != b"1":
        raise ProtocolError(502, "backend answered in HTTP version %s" % major.decode())
    status = _STATUS_CODES[status_b]  # three digits, by the match (a table: int() of bytes costs more)
    if status < 100:
        raise ProtocolError(502, "status code %d" % status)
    minor = 0 if minor_b == b"0" else 1

    r = ResponseHead()
    r.status = status
    r.minor = minor
    r.raw = head
    r.low = low
    r.fields_start = head.find(b"\n") + 1
    r._fields = None
    r.framing = NO_BODY
    r.length = 0
    r.keep_alive = minor == 1
    # The status line goes out as HTTP/1.1; hop-by-hop fields are removed.
    r.rewrite = (minor_b != b"1" or flag_t is not None or flag_k is not None or flag_p is not None
                 or flag_u is not None)
    r.connection_tokens = []
    r.has_connection = False
    # RFC 9112 §6.3 step 3: never forward both Transfer-Encoding and Content-Length, whatever the
    # status (an answer to HEAD too).
    r.has_te = te_v is not None
    if r.has_te and cl_v is not None:
        r.rewrite = True
    count = low.count

    cl_values: Optional[List[bytes]] = None
    te_values: Optional[List[bytes]] = None
    if cl_v is not None:
        cl_values = [cl_v.rstrip(b" \t")] if count(b"\ncontent-length:") == 1 else _all_values(r, b"content-length")
    if te_v is not None:
        te_values = ([te_v.rstrip(b" \t")] if count(b"\ntransfer-encoding:") == 1
                     else [v.lower() for v in _all_values(r, b"transfer-encoding")])
    if conn_v is not None:
        r.has_connection = True
        values = [conn_v.rstrip(b" \t")] if count(b"\nconnection:") == 1 else [
            v.lower() for v in _all_values(r, b"connection")]
        if len(values) == 1 and values[0] == b"keep-alive":
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
        v = cl_values[0]
        if len(cl_values) == 1 and v.isdigit() and len(v) <= _MAX_CONTENT_LENGTH_DIGITS and (
                v[0] != 48 or len(v) == 1):
            r.length = int(v)  # _framing_length's canonical case, inlined (the common one)
        else:
            r.length = _content_length(cl_values, 502)
            r.rewrite = True
        return r
    # Step 8: read until the server closes.
    r.framing = CLOSE_DELIMITED
    r.keep_alive = False
    return r


def cookie_value(req: RequestHead, name: bytes) -> Optional[bytes]:
    """The value of cookie ``name`` from the request's Cookie field(s) (``a=1; b=2``, RFC 6265 §4.2),
    the first if repeated; None when absent. Names are case-sensitive; whitespace around names and
    values is dropped; pairs without ``=`` are skipped."""
    lnames = req.lnames
    if b"cookie" not in lnames:
        return None
    for lname, value in zip(lnames, req.values):
        if lname != b"cookie" or name not in value:
            continue
        for pair in value.split(b";"):
            n, eq, v = pair.partition(b"=")
            if eq and n.strip(b" \t") == name:
                return v.strip(b" \t")
    return None
