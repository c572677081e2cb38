"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO: a header reader fed the
first bytes of a connection, and the builders for the header balrs sends a backend.

The reader is incremental and bounded. It keeps what it was fed in one buffer and a position: every byte
is examined once, when it arrives, so feeding one byte at a time stays O(n) (nothing is rescanned). It
raises :class:`ProxyHeaderError` as soon as the bytes so far cannot start a valid header: the first byte
decides the version (``P`` v1, ``CR`` v2, anything else is refused at once, so a client that sends an
HTTP request to a ``proxy`` listen address is refused on its first byte, not after a timeout). A v1 line
is checked character by character: its keyword, protocol, IPv4 addresses and ports completely, an IPv6
address by what can be told cheaply (characters, length, group sizes, one "::") and in full when its
field ends. A v2 header is refused on its first wrong signature byte, on a bad version, command, family
or protocol nibble when that byte arrives, and on an oversized length when the length field arrives.

After ``feed`` returned a header or raised, the reader is done: every further ``feed`` raises
``ProxyHeaderError("already done")`` (the bytes after the header were handed back as ``rest``; the caller
reads the connection itself from then on).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Optional, Tuple, Union

__all__ = ["ProxyHeaderError", "ProxyInfo", "ProxyHeaderReader", "build_v1", "build_v2", "V1_MAX", "V2_MAX",
           "V2_SIGNATURE"]

# Section 2.2: the v2 signature, 12 bytes no v1 line or HTTP request can start with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Section 2.1: the worst case line is 107 characters with the CRLF, and "If the CRLF sequence is not
# found in the first 107 characters, the receiver should declare the line invalid."
V1_MAX = 107
# Section 2.2: the fixed part: signature, ver_cmd, fam, and the 2-byte length of the rest.
_V2_FIXED = 16
# Our bound on a whole v2 header: the fixed part and an address block with TLVs. The spec lets the
# length run to 65535; HAProxy caps it by its buffer. 2 KiB holds every TLV a cloud balancer sends (AWS's
# VPC endpoint id, Azure's link id, the TLS details of section 2.2.5).
V2_MAX = _V2_FIXED + 2048

# ---- version 1 (section 2.1) ----
_V1_PREFIX = b"PROXY "
_V1_TCP4 = b"TCP4"
_V1_TCP6 = b"TCP6"
_V1_UNKNOWN = b"UNKNOWN"
_V1_PROTOS = (_V1_TCP4, _V1_TCP6, _V1_UNKNOWN)
_CR = 0x0D
_LF = 0x0A
_SP = 0x20
_DOT = 0x2E
_COLON = 0x3A
_ZERO = 0x30
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# The line's fields, in order, after "PROXY ". _TAIL: what follows "UNKNOWN ", which "the receiver must
# ignore" (section 2.1).
_F_PROTO = 1
_F_SRC = 2
_F_DST = 3
_F_SPORT = 4
_F_DPORT = 5
_F_TAIL = 6
_FIELD_NAMES = {_F_SRC: "source address", _F_DST: "destination address", _F_SPORT: "source port",
                _F_DPORT: "destination port"}
# TCP4 addresses (section 2.1: "in its canonical format"): dotted decimal, four octets of one to three
# digits, 0..255 each, no heading zero (the octal confusion the ports' rule avoids; ipaddress before
# Python 3.9.5 accepted "010.0.0.1", so the reader checks it itself).
_IPV4_DOTS = 3
_IPV4_OCTET_DIGITS = 3
_IPV4_OCTET_MAX = 255
# TCP6 addresses: the longest text form, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", is 45
# characters; a group is at most 4 hex digits.
_IPV6_TEXT_MAX = 45
_IPV6_GROUP_DIGITS = 4
# Flags of an IPv6 field read so far: its "::" was seen (a second one is invalid); its dotted IPv4 tail
# began (no ':' or hex letter may follow).
_V6_DOUBLE_COLON = 1
_V6_DOTTED = 2
# Ports (section 2.1): "a decimal integer in the range [0..65535] inclusive. Heading zeroes are not
# permitted in front of numbers in order to avoid any possible confusion with octal numbers."
_PORT_DIGITS = 5
_PORT_MAX = 65535

# ---- version 2 (section 2.2) ----
_V2_VER_CMD_AT = 12
_V2_FAM_AT = 13
_V2_LEN_AT = 14
_V2_VERSION = 0x2
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_AF_UNSPEC = 0x0
_AF_INET = 0x1
_AF_INET6 = 0x2
_AF_UNIX = 0x3
_PROTO_UNSPEC = 0x0
_PROTO_STREAM = 0x1
_PROTO_DGRAM = 0x2
# Section 2.2: the address block of TCP over IPv4 (src, dst, sport, dport) and over IPv6.
_V2_INET_BLOCK = 4 + 4 + 2 + 2
_V2_INET6_BLOCK = 16 + 16 + 2 + 2
# Section 2.2 (the TLV vectors after the addresses): a TLV's type (1 byte) and length (2 bytes,
# big-endian) before its value.
_TLV_HEAD = 3


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header (the message says what was wrong)."""


class ProxyInfo:
    """What a header said.

    ``local``: the proxy's own connection or one balrs cannot use (v2 LOCAL, v1 UNKNOWN, a v2 family
    other than TCP over IPv4/IPv6): the addresses are None and the socket's stand. ``family``: "TCP4",
    "TCP6" or "UNKNOWN". The addresses are in ``ipaddress``'s canonical text form.
    """

    __slots__ = ("version", "local", "family", "src_ip", "src_port", "dst_ip", "dst_port")

    def __init__(self, version: int, local: bool, family: str, src_ip: Optional[str] = None,
                 src_port: Optional[int] = None, dst_ip: Optional[str] = None, dst_port: Optional[int] = None) -> None:
        self.version = version
        self.local = local
        self.family = family
        self.src_ip = src_ip
        self.src_port = src_port
        self.dst_ip = dst_ip
        self.dst_port = dst_port

    def __repr__(self) -> str:
        if self.local:
            return "ProxyInfo(version=%d, local=True, family=%r)" % (self.version, self.family)
        return "ProxyInfo(version=%d, local=False, family=%r, src_ip=%r, src_port=%r, dst_ip=%r, dst_port=%r)" % (
            self.version, self.family, self.src_ip, self.src_port, self.dst_ip, self.dst_port)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProxyInfo):
            return NotImplemented
        # Compared by value (and so, defining __eq__ alone, not hashable: it is mutable).
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


def _local(version: int) -> ProxyInfo:
    return ProxyInfo(version, True, "UNKNOWN")


class ProxyHeaderReader:
    """Fed the first bytes of a connection; incremental and bounded (see the module docstring)."""

    __slots__ = ("_buf", "_pos", "_done", "_field", "_start", "_aux", "_proto", "_src", "_dst", "_sport",
                 "_pending")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # the next byte to examine: everything before it was checked once already
        self._done = False
        # v1 only: the field being read, where it starts, per-field state (IPv4 dots, IPv6 flags), what the
        # finished fields said, and the header parsed at the CR while its LF has not arrived.
        self._field = _F_PROTO
        self._start = len(_V1_PREFIX)
        self._aux = 0
        self._proto = b""
        self._src = ""
        self._dst = ""
        self._sport = 0
        self._pending: Optional[ProxyInfo] = None

    def feed(self, data: bytes) -> Optional[Tuple[ProxyInfo, bytes]]:
        """None: more bytes needed. ``(info, rest)``: the header is complete and ``rest`` is whatever
        followed it in the bytes fed so far (the start of the HTTP request). Raises ProxyHeaderError as
        soon as the bytes cannot be a valid header, and on any call after a result or an error."""
        if self._done:
            raise ProxyHeaderError("already done")
        buf = self._buf
        buf += data
        try:
            if not buf:
                return None
            first = buf[0]
            if first == _V1_PREFIX[0]:
                got = self._v1()
            elif first == V2_SIGNATURE[0]:
                got = self._v2()
            else:
                raise ProxyHeaderError("no PROXY protocol header (the connection starts with %r)" % bytes(buf[:1]))
        except ProxyHeaderError:
            self._finish()
            raise
        if got is not None:
            self._finish()
        return got

    def _finish(self) -> None:
        self._done = True
        self._buf = bytearray()  # what follows the header went back to the caller as ``rest``

    # ---- version 1 (section 2.1) ----
    def _v1(self) -> Optional[Tuple[ProxyInfo, bytes]]:
        buf = self._buf
        # Only the first V1_MAX bytes can hold the line; its LF is looked for no further.
        stop = min(len(buf), V1_MAX)
        prefix_len = len(_V1_PREFIX)
        for i in range(self._pos, stop):
            c = buf[i]
            if self._pending is not None:
                # The previous byte was the CR, and the line could end there.
                if c != _LF:
                    raise ProxyHeaderError("PROXY v1: a CR not followed by LF")
                return self._pending, bytes(buf[i + 1:])
            if c == _LF:
                # Section 2.1: "The receiver must not tolerate a single CR or LF character to end the line
                # when a complete CRLF sequence is expected."
                raise ProxyHeaderError("PROXY v1: a bare LF ends the line")
            if i < prefix_len:
                if c != _V1_PREFIX[i]:
                    raise ProxyHeaderError("PROXY v1: the line must start with 'PROXY '")
            elif c == _CR:
                # Parse the line now, not when the LF comes: a line that cannot end here is refused at once.
                self._pending = self._line_end(i)
            else:
                self._v1_byte(i, c)
        self._pos = stop
        if stop >= V1_MAX:
            raise ProxyHeaderError("PROXY v1: no CRLF within %d bytes" % V1_MAX)
        return None

    def _v1_byte(self, i: int, c: int) -> None:
        """Check byte ``c`` at ``i`` (after "PROXY ", not CR or LF) against the field it is in; O(1)."""
        field = self._field
        if field == _F_TAIL:
            return
        if c == _SP:
            self._end_field(i)
            return
        buf = self._buf
        start = self._start
        if field == _F_PROTO:
            so_far = bytes(buf[start:i + 1])
            if not any(p.startswith(so_far) for p in _V1_PROTOS):
                raise ProxyHeaderError("PROXY v1: unknown protocol (TCP4, TCP6 or UNKNOWN)")
        elif field == _F_SRC or field == _F_DST:
            if self._proto == _V1_TCP4:
                self._ipv4_byte(i, c)
            else:
                self._ipv6_byte(i, c)
        else:
            # _F_SPORT or _F_DPORT (a space after the destination port was refused by _end_field).
            n = i - start + 1
            if (c not in _DIGITS or (n > 1 and buf[start] == _ZERO) or n > _PORT_DIGITS
                    or (n == _PORT_DIGITS and int(buf[start:i + 1]) > _PORT_MAX)):
                raise self._bad()

    def _ipv4_byte(self, i: int, c: int) -> None:
        buf = self._buf
        start = self._start
        if c == _DOT:
            if i == start or buf[i - 1] == _DOT or self._aux == _IPV4_DOTS:
                raise self._bad()
            self._aux += 1
        elif c in _DIGITS:
            # The octet's start: at most _IPV4_OCTET_DIGITS back, as a longer octet was refused already.
            j = i
            while j > start and buf[j - 1] != _DOT:
                j -= 1
            n = i - j + 1
            if n > _IPV4_OCTET_DIGITS or (n > 1 and buf[j] == _ZERO) or int(buf[j:i + 1]) > _IPV4_OCTET_MAX:
                raise self._bad()
        else:
            raise self._bad()

    def _ipv6_byte(self, i: int, c: int) -> None:
        buf = self._buf
        start = self._start
        n = i - start + 1
        if n > _IPV6_TEXT_MAX:
            raise self._bad()
        if c == _COLON:
            if self._aux & _V6_DOTTED:
                raise self._bad()
            if i > start and buf[i - 1] == _COLON:
                if self._aux & _V6_DOUBLE_COLON:  # ":::" or a second "::"
                    raise self._bad()
                self._aux |= _V6_DOUBLE_COLON
        elif c == _DOT:
            if i == start or buf[i - 1] not in _DIGITS:
                raise self._bad()
            self._aux |= _V6_DOTTED
        elif c in _HEX:
            if self._aux & _V6_DOTTED and c not in _DIGITS:
                raise self._bad()
            # The group's start: at most _IPV6_GROUP_DIGITS back, as a longer group was refused already.
            j = i
            while j > start and buf[j - 1] != _COLON and buf[j - 1] != _DOT:
                j -= 1
            if i - j + 1 > _IPV6_GROUP_DIGITS:
                raise self._bad()
        else:
            # Includes '%': "no zone id" (section 2.1 names addresses, not interfaces).
            raise self._bad()

    def _bad(self) -> ProxyHeaderError:
        return ProxyHeaderError("PROXY v1: bad %s" % _FIELD_NAMES.get(self._field, "field"))

    def _end_field(self, i: int) -> None:
        """A space at ``i`` ends the current field: check it whole, start the next one."""
        field = self._field
        start = self._start
        if i == start:
            raise ProxyHeaderError("PROXY v1: an empty field (fields are separated by single spaces)")
        following = field + 1
        if field == _F_PROTO:
            proto = bytes(self._buf[start:i])
            if proto == _V1_UNKNOWN:
                following = _F_TAIL
            elif proto == _V1_TCP4 or proto == _V1_TCP6:
                self._proto = proto
            else:
                raise ProxyHeaderError("PROXY v1: unknown protocol (TCP4, TCP6 or UNKNOWN)")
        elif field == _F_SRC:
            self._src = self._address(i)
        elif field == _F_DST:
            self._dst = self._address(i)
        elif field == _F_SPORT:
            self._sport = int(self._buf[start:i])
        else:
            raise ProxyHeaderError("PROXY v1: more fields than 'PROXY %s SRC DST SPORT DPORT'" % self._proto.decode())
        self._field = following
        self._start = i + 1
        self._aux = 0

    def _address(self, end: int) -> str:
        """The finished address field before ``end`` in canonical form (its bytes were checked already)."""
        text = self._buf[self._start:end].decode("ascii")
        try:
            if self._proto == _V1_TCP4:
                if self._aux != _IPV4_DOTS or self._buf[end - 1] == _DOT:
                    raise ValueError(text)
                return str(ipaddress.IPv4Address(text))
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise self._bad() from None

    def _line_end(self, i: int) -> ProxyInfo:
        """The line ends at ``i`` (its CR): the header it makes, or ProxyHeaderError."""
        field = self._field
        start = self._start
        if field == _F_TAIL:
            # "PROXY UNKNOWN ...": "the receiver must ignore anything presented before the CRLF".
            return _local(1)
        if field == _F_PROTO:
            proto = bytes(self._buf[start:i])
            if proto == _V1_UNKNOWN:
                return _local(1)
            if proto == _V1_TCP4 or proto == _V1_TCP6:
                raise ProxyHeaderError("PROXY v1: expected 'PROXY %s SRC DST SPORT DPORT'" % proto.decode())
            raise ProxyHeaderError("PROXY v1: unknown protocol (TCP4, TCP6 or UNKNOWN)")
        if field != _F_DPORT:
            raise ProxyHeaderError("PROXY v1: expected 'PROXY %s SRC DST SPORT DPORT'" % self._proto.decode())
        if i == start:
            raise self._bad()
        return ProxyInfo(1, False, self._proto.decode(), self._src, self._sport, self._dst,
                         int(self._buf[start:i]))

    # ---- version 2 (section 2.2) ----
    def _v2(self) -> Optional[Tuple[ProxyInfo, bytes]]:
        buf = self._buf
        have = len(buf)
        sig_len = len(V2_SIGNATURE)
        for i in range(self._pos, min(have, _V2_LEN_AT)):
            c = buf[i]
            if i < sig_len:
                if c != V2_SIGNATURE[i]:
                    raise ProxyHeaderError("PROXY v2: bad signature")
            elif i == _V2_VER_CMD_AT:
                # "The highest four bits contains the version [...] must always be sent as \x2"; the lowest
                # four bits are the command, LOCAL or PROXY, "other values are unassigned and must not be
                # emitted by senders. Receivers must drop connections presenting unexpected values here."
                if c >> 4 != _V2_VERSION:
                    raise ProxyHeaderError("PROXY v2: version %d (expected 2)" % (c >> 4))
                if c & 0x0F not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
                    raise ProxyHeaderError("PROXY v2: unknown command %d" % (c & 0x0F))
            else:
                # Family and protocol: "Other values are unspecified and must not be emitted in version 2
                # of this protocol and must be rejected as invalid by receivers." (whatever the command)
                if c >> 4 > _AF_UNIX or c & 0x0F > _PROTO_DGRAM:
                    raise ProxyHeaderError("PROXY v2: unknown family/protocol 0x%02x" % c)
        if have < _V2_FIXED:
            self._pos = have
            return None
        self._pos = _V2_FIXED
        (length,) = struct.unpack_from("!H", buf, _V2_LEN_AT)
        total = _V2_FIXED + length
        if total > V2_MAX:
            raise ProxyHeaderError("PROXY v2: a %d-byte header is over the %d-byte limit" % (total, V2_MAX))
        if have < total:
            return None
        info = _parse_v2(buf[_V2_VER_CMD_AT] & 0x0F, buf[_V2_FAM_AT], bytes(buf[_V2_FIXED:total]))
        return info, bytes(buf[total:])


def _parse_v2(command: int, fam: int, block: bytes) -> ProxyInfo:
    if command == _V2_CMD_LOCAL:
        # Section 2.2: "the receiver must accept this connection as valid and must use the real connection
        # endpoints and discard the protocol block including the family which is ignored."
        return _local(2)
    family, transport = fam >> 4, fam & 0x0F
    if transport == _PROTO_STREAM and family == _AF_INET:
        size, name = _V2_INET_BLOCK, "TCP4"
    elif transport == _PROTO_STREAM and family == _AF_INET6:
        size, name = _V2_INET6_BLOCK, "TCP6"
    else:
        # UNSPEC, UNIX or UDP: nothing an HTTP connection's client address can be; the socket's addresses
        # stand, as HAProxy does for the families it does not support ("the receiver is free to accept
        # the connection anyway and use the real endpoint addresses"). Its block is not parsed.
        return _local(2)
    if len(block) < size:
        raise ProxyHeaderError("PROXY v2: %s address block of %d bytes (needs %d)" % (name, len(block), size))
    _check_tlvs(block, size)
    if name == "TCP4":
        src = str(ipaddress.IPv4Address(block[0:4]))
        dst = str(ipaddress.IPv4Address(block[4:8]))
    else:
        src = str(ipaddress.IPv6Address(block[0:16]))
        dst = str(ipaddress.IPv6Address(block[16:32]))
    sport, dport = struct.unpack_from("!HH", block, size - 4)
    return ProxyInfo(2, False, name, src, sport, dst, dport)


def _check_tlvs(block: bytes, pos: int) -> None:
    """Section 2.2: after the addresses, TLVs: type (1 byte), length (2 bytes), value. They are skipped,
    but the chain must be well formed and end exactly at the end of the header."""
    end = len(block)
    while pos < end:
        if pos + _TLV_HEAD > end:
            raise ProxyHeaderError("PROXY v2: truncated TLV at offset %d" % pos)
        (length,) = struct.unpack_from("!H", block, pos + 1)
        pos += _TLV_HEAD + length
        if pos > end:
            raise ProxyHeaderError("PROXY v2: a TLV runs past the end of the header")


# ---- builders -------------------------------------------------------------------------------------
_Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _address_of(text: str) -> _Addr:
    # A socket's IPv6 peer may carry a zone ("fe80::1%eth0"): the header has no room for it (section 2.1's
    # text form and 2.2's 16 bytes), so it is dropped.
    return ipaddress.ip_address(text.split("%", 1)[0])


def _pair(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> Optional[Tuple[_Addr, _Addr]]:
    """Both addresses in one family (an IPv4-mapped IPv6 address counts as IPv4 beside an IPv4 one), or
    None. ValueError for a bad address or a port outside 0..65535."""
    for port in (src_port, dst_port):
        if not 0 <= port <= _PORT_MAX:
            raise ValueError("port %r out of range" % (port,))
    a, b = _address_of(src_ip), _address_of(dst_ip)
    if a.version != b.version:
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
            b = b.ipv4_mapped
        if a.version != b.version:
            return None
    return a, b


def build_v1(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (section 2.1); ``PROXY UNKNOWN\\r\\n`` if the two
    addresses are of different families. ValueError for a bad address or port."""
    pair = _pair(src_ip, src_port, dst_ip, dst_port)
    if pair is None:
        return _V1_PREFIX + _V1_UNKNOWN + b"\r\n"
    a, b = pair
    proto = _V1_TCP4 if a.version == 4 else _V1_TCP6
    return b"%s%s %s %s %d %d\r\n" % (_V1_PREFIX, proto, str(a).encode(), str(b).encode(), src_port, dst_port)


def build_v2(src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
    """A v2 PROXY header for a TCP stream over IPv4 or IPv6, without TLVs (section 2.2); a LOCAL one with
    the UNSPEC family and no address block if the two addresses are of different families. ValueError for
    a bad address or port."""
    pair = _pair(src_ip, src_port, dst_ip, dst_port)
    if pair is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION << 4 | _V2_CMD_LOCAL, _AF_UNSPEC << 4 | _PROTO_UNSPEC, 0)
    a, b = pair
    family = _AF_INET if a.version == 4 else _AF_INET6
    block = a.packed + b.packed + struct.pack("!HH", src_port, dst_port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION << 4 | _V2_CMD_PROXY, family << 4 | _PROTO_STREAM,
                                      len(block)) + block
