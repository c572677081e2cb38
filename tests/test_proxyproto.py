"""Tests for balrs.http.proxyproto: the PROXY protocol header reader fed whole, byte by byte, in two halves
at every split point and with the connection's bytes behind the header; refused on the first byte that
cannot belong to a header; the builders round-trip; the cost is counted, never timed; fuzz against a
plain whole-input reference parser."""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterator, List, Optional, Tuple, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balrs.http import proxyproto
from balrs.http.proxyproto import (
    V1_MAX, V2_MAX, V2_SIGNATURE, ProxyHeaderError, ProxyHeaderReader, ProxyInfo, build_v1, build_v2,
)

FUZZ = settings(max_examples=200, deadline=None)

NEXT = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
TRAILING = [b"", NEXT, b"\r\n"]

SIG = V2_SIGNATURE


def v2(ver_cmd: int, fam: int, block: bytes, length: Optional[int] = None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block) if length is None else length) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def canon(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def tcp(version: int, src: str, sport: int, dst: str, dport: int) -> ProxyInfo:
    family = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    return ProxyInfo(version, False, family, canon(src), sport, canon(dst), dport)


LOCAL1 = ProxyInfo(1, True, "UNKNOWN")
LOCAL2 = ProxyInfo(2, True, "UNKNOWN")

V4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 443)
V4_INFO = ProxyInfo(2, False, "TCP4", "192.0.2.1", 56324, "198.51.100.7", 443)
V6_SRC = ipaddress.IPv6Address("2001:db8::1")
V6_DST = ipaddress.IPv6Address("2001:db8:0:1::ff")
V6_BLOCK = V6_SRC.packed + V6_DST.packed + struct.pack("!HH", 0, 65535)
V6_INFO = ProxyInfo(2, False, "TCP6", "2001:db8::1", 0, "2001:db8:0:1::ff", 65535)
FFFF = ":".join(["ffff"] * 8)
# Section 2.1's worst case: exactly V1_MAX bytes with the CRLF.
WORST_V1 = b"PROXY UNKNOWN %s %s 65535 65535\r\n" % (FFFF.encode(), FFFF.encode())
# TLVs as AWS and section 2.2.5 send them: ALPN, authority, a NOOP, and an SSL TLV with sub-TLVs.
TLVS = (tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xEA, b"\x01vpce-0123456789abcdef")
        + tlv(0x20, b"\x07" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")))
# A TLV that fills the header up to V2_MAX exactly.
FILL = tlv(0x04, b"\x00" * (V2_MAX - 16 - 12 - 3))

# (id, raw header, what it says).
VALID: List[Tuple[str, bytes, ProxyInfo]] = [
    ("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n", ProxyInfo(1, False, "TCP4", "192.0.2.1", 56324,
                                                                             "198.51.100.7", 443)),
    ("v1-tcp4-extremes", b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
     tcp(1, "0.0.0.0", 0, "255.255.255.255", 65535)),
    ("v1-tcp4-one-digit-ports", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 9\r\n", tcp(1, "10.0.0.1", 1, "10.0.0.2", 9)),
    ("v1-tcp6-loopback", b"PROXY TCP6 ::1 ::1 1 2\r\n", tcp(1, "::1", 1, "::1", 2)),
    ("v1-tcp6-any", b"PROXY TCP6 :: :: 0 0\r\n", tcp(1, "::", 0, "::", 0)),
    ("v1-tcp6-full", b"PROXY TCP6 %s %s 65535 65535\r\n" % (FFFF.encode(), FFFF.encode()),
     tcp(1, FFFF, 65535, FFFF, 65535)),
    ("v1-tcp6-uppercase-canonicalised", b"PROXY TCP6 2001:DB8::A 2001:0db8:0000::000b 80 443\r\n",
     tcp(1, "2001:db8::a", 80, "2001:db8::b", 443)),
    ("v1-tcp6-dotted-tail", b"PROXY TCP6 ::ffff:192.0.2.1 64:ff9b::198.51.100.7 1 2\r\n",
     tcp(1, "::ffff:192.0.2.1", 1, "64:ff9b::198.51.100.7", 2)),
    ("v1-tcp6-trailing-double-colon", b"PROXY TCP6 2001:db8:: fe80:: 3 4\r\n", tcp(1, "2001:db8::", 3, "fe80::", 4)),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", LOCAL1),
    ("v1-unknown-space", b"PROXY UNKNOWN \r\n", LOCAL1),
    ("v1-unknown-anything", b"PROXY UNKNOWN whatever\x00 follows  here\r\n", LOCAL1),
    ("v1-unknown-worst-case-107", WORST_V1, LOCAL1),
    ("v2-tcp4", v2(0x21, 0x11, V4_BLOCK), V4_INFO),
    ("v2-tcp6", v2(0x21, 0x21, V6_BLOCK), V6_INFO),
    ("v2-tcp4-tlvs", v2(0x21, 0x11, V4_BLOCK + TLVS), V4_INFO),
    ("v2-tcp6-tlvs", v2(0x21, 0x21, V6_BLOCK + TLVS), V6_INFO),
    ("v2-tcp4-empty-tlv-last", v2(0x21, 0x11, V4_BLOCK + tlv(0x04, b"")), V4_INFO),
    ("v2-tcp4-at-v2-max", v2(0x21, 0x11, V4_BLOCK + FILL), V4_INFO),
    ("v2-local-unspec", v2(0x20, 0x00, b""), LOCAL2),
    ("v2-local-inet-block-ignored", v2(0x20, 0x11, V4_BLOCK), LOCAL2),
    ("v2-local-short-block-ignored", v2(0x20, 0x21, b"\x01\x02\x03"), LOCAL2),
    ("v2-local-garbage-ignored", v2(0x20, 0x12, b"\xff" * 40), LOCAL2),
    ("v2-proxy-unspec", v2(0x21, 0x00, b""), LOCAL2),
    ("v2-proxy-inet-unspec-protocol", v2(0x21, 0x10, V4_BLOCK), LOCAL2),
    ("v2-proxy-udp4", v2(0x21, 0x12, V4_BLOCK), LOCAL2),
    ("v2-proxy-udp6", v2(0x21, 0x22, V6_BLOCK), LOCAL2),
    ("v2-proxy-unix-stream", v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\x00") + b"/run/b".ljust(108, b"\x00")),
     LOCAL2),
    ("v2-proxy-unix-dgram", v2(0x21, 0x32, b"\x00" * 216), LOCAL2),
]

# (id, good, bad): ``good`` is the longest prefix that can still start a header (the reader must wait), and
# the first byte of ``bad`` is the one the reader must refuse, at once.
INVALID: List[Tuple[str, bytes, bytes]] = [
    # The first byte decides.
    ("http-request", b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("lowercase-proxy", b"", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("leading-space", b"", b" PROXY UNKNOWN\r\n"),
    ("leading-lf", b"", b"\nPROXY UNKNOWN\r\n"),
    ("tls-client-hello", b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("nul", b"", b"\x00"),
    # v1 keyword and protocol.
    ("v1-proxy-no-space", b"PROXY", b"\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-proxy-cr", b"PROX", b"\r\n"),
    ("v1-proxy-mixed-case", b"PRO", b"xy TCP4\r\n"),
    ("v1-double-space", b"PROXY ", b" TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-lowercase-protocol", b"PROXY ", b"tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-tcp5", b"PROXY TCP", b"5 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-tcp-short", b"PROXY TCP", b" 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-udp4", b"PROXY U", b"DP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ("v1-no-protocol", b"PROXY ", b"\r\n"),
    ("v1-unknownx", b"PROXY UNKNOWN", b"X\r\n"),
    ("v1-unknown-prefix", b"PROXY UNKNOW", b"\r\n"),
    ("v1-tcp4-alone", b"PROXY TCP4", b"\r\n"),
    ("v1-tcp6-alone", b"PROXY TCP6", b"\r\n"),
    # TCP4 addresses.
    ("v1-v4-leading-zero", b"PROXY TCP4 0", b"10.0.0.1 5.6.7.8 1 2\r\n"),
    ("v1-v4-leading-zero-later", b"PROXY TCP4 10.0", b"0.0.1 5.6.7.8 1 2\r\n"),
    ("v1-v4-octet-256", b"PROXY TCP4 25", b"6.0.0.1 5.6.7.8 1 2\r\n"),
    ("v1-v4-octet-four-digits", b"PROXY TCP4 100", b"0.1.1.1 5.6.7.8 1 2\r\n"),
    ("v1-v4-three-octets", b"PROXY TCP4 1.2.3", b" 5.6.7.8 1 2\r\n"),
    ("v1-v4-five-octets", b"PROXY TCP4 1.2.3.4", b".5 5.6.7.8 1 2\r\n"),
    ("v1-v4-empty-octet", b"PROXY TCP4 1.", b".3.4 5.6.7.8 1 2\r\n"),
    ("v1-v4-leading-dot", b"PROXY TCP4 ", b".1.2.3 5.6.7.8 1 2\r\n"),
    ("v1-v4-trailing-dot", b"PROXY TCP4 1.2.3.", b" 5.6.7.8 1 2\r\n"),
    ("v1-v4-hex", b"PROXY TCP4 1.2.3.", b"a 5.6.7.8 1 2\r\n"),
    ("v1-v4-integer", b"PROXY TCP4 169", b"09060 5.6.7.8 1 2\r\n"),
    ("v1-v6-in-tcp4", b"PROXY TCP4 ", b"::1 ::1 1 2\r\n"),
    ("v1-v4-bad-destination", b"PROXY TCP4 1.2.3.4 5.6.7", b" 1 2\r\n"),
    ("v1-v4-nul", b"PROXY TCP4 1.2.3.4", b"\x00 5.6.7.8 1 2\r\n"),
    ("v1-v4-tab", b"PROXY TCP4 1.2.3.4", b"\t5.6.7.8 1 2\r\n"),
    # TCP6 addresses.
    ("v1-v4-in-tcp6", b"PROXY TCP6 1.2.3.4", b" ::1 1 2\r\n"),
    ("v1-v6-zone", b"PROXY TCP6 fe80::1", b"%eth0 ::1 1 2\r\n"),
    ("v1-v6-brackets", b"PROXY TCP6 ", b"[::1] ::1 1 2\r\n"),
    ("v1-v6-triple-colon", b"PROXY TCP6 ::", b": ::1 1 2\r\n"),
    ("v1-v6-two-double-colons", b"PROXY TCP6 1::2:", b":3 ::1 1 2\r\n"),
    ("v1-v6-five-hex-digits", b"PROXY TCP6 1234", b"5::1 ::1 1 2\r\n"),
    ("v1-v6-colon-after-dotted", b"PROXY TCP6 ::1.2", b":3 ::1 1 2\r\n"),
    ("v1-v6-hex-after-dotted", b"PROXY TCP6 ::1.", b"a.3.4 ::1 1 2\r\n"),
    ("v1-v6-dot-after-colon", b"PROXY TCP6 ::", b".1.2.3 ::1 1 2\r\n"),
    ("v1-v6-too-few-groups", b"PROXY TCP6 1:2:3", b" ::1 1 2\r\n"),
    ("v1-v6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9", b" ::1 1 2\r\n"),
    ("v1-v6-bad-dotted-tail", b"PROXY TCP6 ::ffff:1.2.3", b" ::1 1 2\r\n"),
    ("v1-v6-over-45", b"PROXY TCP6 0000:0000:0000:0000:0000:0000:255.255.255.255", b"5 ::1 1 2\r\n"),
    ("v1-v6-g", b"PROXY TCP6 ::", b"g ::1 1 2\r\n"),
    # Ports.
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 0", b"1 2\r\n"),
    ("v1-port-00", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0", b"0\r\n"),
    ("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 6553", b"6 2\r\n"),
    ("v1-port-99999", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 9999", b"9\r\n"),
    ("v1-port-six-digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 10000", b"0 2\r\n"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 ", b"+1 2\r\n"),
    ("v1-port-minus", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ", b"-2\r\n"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0", b"x1 2\r\n"),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ", b" 2\r\n"),
    ("v1-missing-dport", b"PROXY TCP4 1.2.3.4 5.6.7.8 1", b"\r\n"),
    ("v1-missing-ports", b"PROXY TCP6 ::1 ::1", b"\r\n"),
    ("v1-empty-dport", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ", b"\r\n"),
    ("v1-space-before-crlf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b" \r\n"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b" 3\r\n"),
    # Line ends.
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"\n"),
    ("v1-bare-lf-unknown", b"PROXY UNKNOWN", b"\nGET / HTTP/1.1\r\n"),
    ("v1-bare-cr", b"PROXY UNKNOWN\r", b"GET / HTTP/1.1\r\n"),
    ("v1-cr-cr-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"\r\n"),
    ("v1-cr-inside-unknown", b"PROXY UNKNOWN a\r", b"b\r\n"),
    ("v1-lf-cr", b"PROXY UNKNOWN", b"\n\r"),
    # Length (section 2.1: 107 bytes with the CRLF).
    ("v1-no-crlf-in-107", b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15), b"x" * 200),
    ("v1-108-with-crlf", b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15), b"x\r\n"),
    ("v1-cr-at-107", b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15), b"\r\n"),
    # v2 signature, version, command, family, protocol: refused on the byte.
    ("v2-signature-lf", b"\r", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"),
    ("v2-signature-nul", b"\r\n\r\n", b"\x01\r\nQUIT\n\x21\x11\x00\x0c"),
    ("v2-signature-quit-lowercase", b"\r\n\r\n\x00\r\n", b"quit\n\x21\x11\x00\x0c"),
    ("v2-signature-last", SIG[:-1], b"\r\x21\x11\x00\x0c"),
    ("v2-version-1", SIG, b"\x11\x11\x00\x0c" + V4_BLOCK),
    ("v2-version-3", SIG, b"\x31\x11\x00\x0c" + V4_BLOCK),
    ("v2-version-0", SIG, b"\x01\x11\x00\x0c" + V4_BLOCK),
    ("v2-command-2", SIG, b"\x22\x11\x00\x0c" + V4_BLOCK),
    ("v2-command-f", SIG, b"\x2f\x00\x00\x00"),
    ("v2-family-4", SIG + b"\x21", b"\x41\x00\x0c" + V4_BLOCK),
    ("v2-family-f", SIG + b"\x21", b"\xf1\x00\x0c" + V4_BLOCK),
    ("v2-protocol-3", SIG + b"\x21", b"\x13\x00\x0c" + V4_BLOCK),
    ("v2-local-family-4", SIG + b"\x20", b"\x40\x00\x00"),
    ("v2-local-protocol-3", SIG + b"\x20", b"\x03\x00\x00"),
    # v2 length: refused when the length field arrives.
    ("v2-over-v2-max", SIG + b"\x21\x11" + bytes([(V2_MAX - 15) >> 8]), bytes([(V2_MAX - 15) & 0xFF])),
    ("v2-length-ffff", SIG + b"\x21\x11\xff", b"\xff" + V4_BLOCK),
    ("v2-local-over-v2-max", SIG + b"\x20\x00\xff", b"\xff"),
    ("v2-unix-over-v2-max", SIG + b"\x21\x31\x10", b"\x00"),
    # v2 address block and TLVs: refused when the header is complete.
    ("v2-tcp4-no-block", v2(0x21, 0x11, b"")[:-1], v2(0x21, 0x11, b"")[-1:]),
    ("v2-tcp4-short-block", v2(0x21, 0x11, V4_BLOCK[:-1])[:-1], V4_BLOCK[-2:-1]),
    ("v2-tcp6-inet-sized-block", v2(0x21, 0x21, V4_BLOCK)[:-1], V4_BLOCK[-1:]),
    ("v2-tcp6-short-block", v2(0x21, 0x21, V6_BLOCK[:-1])[:-1], V6_BLOCK[-2:-1]),
    ("v2-tlv-truncated-head", v2(0x21, 0x11, V4_BLOCK + b"\x01\x00")[:-1], b"\x00"),
    ("v2-tlv-one-byte", v2(0x21, 0x11, V4_BLOCK + b"\x04")[:-1], b"\x04"),
    ("v2-tlv-past-end", v2(0x21, 0x11, V4_BLOCK + tlv(0x01, b"h2")[:-1])[:-1], b"2"),
    ("v2-second-tlv-past-end", v2(0x21, 0x21, V6_BLOCK + tlv(0x04, b"") + b"\x01\x00\x09abc")[:-1], b"c"),
    ("v2-tlv-length-ffff", v2(0x21, 0x11, V4_BLOCK + b"\x01\xff\xff" + b"x" * 20)[:-1], b"x"),
]


# ---- drivers -------------------------------------------------------------------------------------------
# ("ok", info, rest) | ("error", message) | ("incomplete",)
Outcome = Union[Tuple[str, ProxyInfo, bytes], Tuple[str, str], Tuple[str]]


def run(chunks: List[bytes]) -> Outcome:
    """Feed ``chunks`` to a fresh reader until it answers; what followed the header is the rest."""
    r = ProxyHeaderReader()
    for i, chunk in enumerate(chunks):
        try:
            got = r.feed(chunk)
        except ProxyHeaderError as exc:
            assert str(exc)
            with pytest.raises(ProxyHeaderError, match="already done"):
                r.feed(b"")
            return ("error", str(exc))
        if got is not None:
            info, rest = got
            assert type(rest) is bytes and isinstance(info, ProxyInfo)
            with pytest.raises(ProxyHeaderError, match="already done"):
                r.feed(b"more")
            return ("ok", info, rest + b"".join(chunks[i + 1:]))
    return ("incomplete",)


def ways(data: bytes, trailing: bytes = b"") -> Iterator[Tuple[str, List[bytes]]]:
    """Whole, byte by byte, in two halves at every split point of ``data``, the header then the rest."""
    both = data + trailing
    yield "whole", [both]
    yield "bytewise", [both[i:i + 1] for i in range(len(both))]
    for k in range(len(data) + 1):
        yield "split@%d" % k, [both[:k], both[k:]]
    if trailing:
        yield "then-trailing", [data, trailing]


def outcome(data: bytes) -> Outcome:
    return run([data])


@pytest.mark.parametrize("case", VALID, ids=lambda c: c[0])
def test_valid(case):
    _id, raw, info = case
    for trailing in TRAILING:
        for way, chunks in ways(raw, trailing):
            assert run(chunks) == ("ok", info, trailing), way


@pytest.mark.parametrize("case", VALID, ids=lambda c: c[0])
def test_valid_proper_prefixes_wait(case):
    """Every proper prefix of a header may still become it: the reader waits (and keeps nothing back)."""
    _id, raw, _info = case
    r = ProxyHeaderReader()
    for i in range(len(raw) - 1):
        assert r.feed(raw[i:i + 1]) is None, i
    for cut in range(len(raw)):
        assert outcome(raw[:cut]) == ("incomplete",), cut


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c[0])
def test_invalid(case):
    _id, good, bad = case
    raw = good + bad
    for trailing in TRAILING:
        for way, chunks in ways(raw, trailing):
            assert run(chunks)[0] == "error", way


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c[0])
def test_invalid_refused_on_the_first_wrong_byte(case):
    """Not a byte later, and not a byte sooner: ``good`` may still start a header."""
    _id, good, bad = case
    for way, chunks in ways(good):
        assert run(chunks) == ("incomplete",), way
    r = ProxyHeaderReader()
    for i in range(len(good)):
        assert r.feed(good[i:i + 1]) is None
    with pytest.raises(ProxyHeaderError):
        r.feed(bad[:1])
    assert outcome(good + bad[:1])[0] == "error"


def test_invalid_first_byte_raises_on_the_first_byte():
    for first in range(256):
        if first in b"P\r":
            assert outcome(bytes([first])) == ("incomplete",)
        else:
            with pytest.raises(ProxyHeaderError):
                ProxyHeaderReader().feed(bytes([first]))
    r = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError, match="no PROXY protocol header"):
        r.feed(b"G")


def test_error_messages_say_what_was_wrong():
    def message(data: bytes) -> str:
        got = outcome(data)
        assert got[0] == "error", got
        return got[1]  # type: ignore[misc]

    assert message(b"PROXY TCP4 1.2.3.4 5.6.7.8 x") == "PROXY v1: bad source port"
    assert message(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x") == "PROXY v1: bad destination port"
    assert message(b"PROXY TCP4 1.2.3.x") == "PROXY v1: bad source address"
    assert message(b"PROXY TCP6 ::1 ::x") == "PROXY v1: bad destination address"
    assert "107" in message(b"PROXY UNKNOWN " + b"x" * 200)
    assert "bare LF" in message(b"PROXY UNKNOWN\n")
    assert "CR not followed by LF" in message(b"PROXY UNKNOWN\rx")
    assert "signature" in message(SIG[:5] + b"x")
    assert "version" in message(SIG + b"\x11")
    assert "command" in message(SIG + b"\x22")
    assert "family" in message(SIG + b"\x21\x51")
    assert "limit" in message(v2(0x21, 0x11, b"", length=0xFFFF))
    assert "TLV" in message(v2(0x21, 0x11, V4_BLOCK + b"\x01\x00"))
    assert "address block" in message(v2(0x21, 0x21, V4_BLOCK))


# ---- limits -------------------------------------------------------------------------------------------
def test_constants():
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n" and len(V2_SIGNATURE) == 12
    assert V1_MAX == 107
    assert V2_MAX == 16 + 2048
    assert len(WORST_V1) == V1_MAX
    assert set(proxyproto.__all__) == {"ProxyHeaderError", "ProxyInfo", "ProxyHeaderReader", "build_v1",
                                       "build_v2", "V1_MAX", "V2_MAX", "V2_SIGNATURE"}
    assert issubclass(ProxyHeaderError, ValueError)


def test_v1_line_of_107_bytes_is_the_longest():
    ok = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(ok) == V1_MAX
    assert outcome(ok + NEXT) == ("ok", LOCAL1, NEXT)
    too_long = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n"
    for way, chunks in ways(too_long, NEXT):
        assert run(chunks)[0] == "error", way


def test_oversized_v1_refused_at_107_bytes_not_buffered_forever():
    r = ProxyHeaderReader()
    line = b"PROXY UNKNOWN " + b"x" * 1000
    for i in range(V1_MAX - 1):
        assert r.feed(line[i:i + 1]) is None
    with pytest.raises(ProxyHeaderError, match="107"):
        r.feed(line[V1_MAX - 1:V1_MAX])
    # A TCP6 line with two 45-character addresses is longer than the spec allows.
    six = "0000:0000:0000:0000:0000:ffff:255.255.255.255"
    assert ipaddress.IPv6Address(six)
    long6 = b"PROXY TCP6 %s %s 65535 65535\r\n" % (six.encode(), six.encode())
    assert len(long6) > V1_MAX
    assert outcome(long6)[0] == "error"
    short6 = b"PROXY TCP6 %s ::1 1 2\r\n" % six.encode()
    assert outcome(short6) == ("ok", tcp(1, six, 1, "::1", 2), b"")


def test_oversized_v2_refused_when_the_length_arrives():
    for length in (V2_MAX - 16 + 1, 4096, 0xFFFF):
        head = SIG + b"\x21\x11" + struct.pack("!H", length)
        r = ProxyHeaderReader()
        assert r.feed(head[:15]) is None
        with pytest.raises(ProxyHeaderError, match="limit"):
            r.feed(head[15:16])
    # One byte under: waits for the block, then reads it.
    head = SIG + b"\x21\x11" + struct.pack("!H", V2_MAX - 16)
    assert outcome(head) == ("incomplete",)
    assert outcome(head + V4_BLOCK + FILL + NEXT) == ("ok", V4_INFO, NEXT)


# ---- builders -----------------------------------------------------------------------------------------
def test_build_v1_exact():
    assert build_v1("192.0.2.1", 56324, "198.51.100.7", 443) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    assert build_v1("2001:DB8::1", 0, "::1", 65535) == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    assert build_v1("1.2.3.4", 1, "::1", 2) == b"PROXY UNKNOWN\r\n"
    assert build_v1("::ffff:1.2.3.4", 1, "5.6.7.8", 2) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    assert build_v1("5.6.7.8", 1, "::ffff:1.2.3.4", 2) == b"PROXY TCP4 5.6.7.8 1.2.3.4 1 2\r\n"
    assert build_v1("fe80::1%eth0", 1, "fe80::2", 2) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


def test_build_v2_exact():
    assert build_v2("192.0.2.1", 56324, "198.51.100.7", 443) == v2(0x21, 0x11, V4_BLOCK)
    assert build_v2("2001:db8::1", 0, "2001:db8:0:1::ff", 65535) == v2(0x21, 0x21, V6_BLOCK)
    assert build_v2("1.2.3.4", 1, "::1", 2) == SIG + b"\x20\x00\x00\x00"
    assert build_v2("::ffff:1.2.3.4", 1, "5.6.7.8", 2) == build_v2("1.2.3.4", 1, "5.6.7.8", 2)


@pytest.mark.parametrize("bad", [("1.2.3.4", -1, "5.6.7.8", 2), ("1.2.3.4", 1, "5.6.7.8", 65536),
                                 ("1.2.3", 1, "5.6.7.8", 2), ("1.2.3.4", 1, "nope", 2), ("", 1, "::1", 2)])
def test_builders_refuse_bad_arguments(bad):
    for build in (build_v1, build_v2):
        with pytest.raises(ValueError):
            build(*bad)


ROUND_TRIP = [
    ("127.0.0.1", 0, "127.0.0.1", 65535),
    ("0.0.0.0", 65535, "255.255.255.255", 0),
    ("10.1.2.3", 443, "192.168.0.1", 8080),
    ("::1", 0, "::1", 65535),
    ("::", 65535, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0),
    ("2001:db8::8a2e:370:7334", 50000, "fe80::1", 80),
    ("::ffff:192.0.2.1", 1, "::ffff:198.51.100.7", 2),
]


@pytest.mark.parametrize("addrs", ROUND_TRIP, ids=lambda a: "%s-%s" % (a[0], a[2]))
@pytest.mark.parametrize("version", [1, 2])
def test_builders_round_trip(addrs, version):
    build = build_v1 if version == 1 else build_v2
    raw = build(*addrs)
    src, sport, dst, dport = addrs
    want = tcp(version, src, sport, dst, dport)
    for trailing in TRAILING:
        for way, chunks in ways(raw, trailing):
            assert run(chunks) == ("ok", want, trailing), way
    assert outcome(raw + b"GET / HTTP/1.1\r\n") == ("ok", want, b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("version", [1, 2])
def test_builders_mixed_families(version):
    build = build_v1 if version == 1 else build_v2
    want = ("ok", ProxyInfo(version, True, "UNKNOWN"), NEXT)
    assert outcome(build("1.2.3.4", 1, "2001:db8::1", 2) + NEXT) == want
    assert outcome(build("2001:db8::1", 1, "1.2.3.4", 2) + NEXT) == want
    # An IPv4-mapped address beside an IPv4 one is IPv4.
    assert outcome(build("::ffff:1.2.3.4", 1, "5.6.7.8", 2) + NEXT) == ("ok", tcp(version, "1.2.3.4", 1,
                                                                                  "5.6.7.8", 2), NEXT)


# ---- ProxyInfo and the reader's life --------------------------------------------------------------------
def test_proxy_info():
    info = ProxyInfo(1, False, "TCP4", "1.2.3.4", 1, "5.6.7.8", 2)
    assert repr(info) == ("ProxyInfo(version=1, local=False, family='TCP4', src_ip='1.2.3.4', src_port=1, "
                          "dst_ip='5.6.7.8', dst_port=2)")
    assert repr(LOCAL2) == "ProxyInfo(version=2, local=True, family='UNKNOWN')"
    assert LOCAL2.src_ip is None and LOCAL2.src_port is None and LOCAL2.dst_ip is None and LOCAL2.dst_port is None
    assert info == ProxyInfo(1, False, "TCP4", "1.2.3.4", 1, "5.6.7.8", 2) and info != LOCAL1
    assert info != "PROXY"
    with pytest.raises(AttributeError):
        info.other = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        ProxyHeaderReader().other = 1  # type: ignore[attr-defined]


def test_empty_feeds_wait():
    r = ProxyHeaderReader()
    assert r.feed(b"") is None
    assert r.feed(b"PROXY") is None
    assert r.feed(b"") is None
    assert r.feed(b" UNKNOWN\r") is None
    assert r.feed(b"") is None
    got = r.feed(b"\n")
    assert got is not None and got[0] == LOCAL1 and got[1] == b""


def test_done_after_result_and_after_error():
    r = ProxyHeaderReader()
    assert r.feed(b"PROXY UNKNOWN\r\nGET") == (LOCAL1, b"GET")
    for more in (b"", b"PROXY UNKNOWN\r\n"):
        with pytest.raises(ProxyHeaderError, match="already done"):
            r.feed(more)
    r = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        r.feed(b"GET")
    with pytest.raises(ProxyHeaderError, match="already done"):
        r.feed(b"PROXY UNKNOWN\r\n")


def test_rest_is_everything_after_the_header_even_a_lot():
    big = NEXT + b"x" * 100000
    assert outcome(b"PROXY UNKNOWN\r\n" + big) == ("ok", LOCAL1, big)
    assert outcome(v2(0x21, 0x11, V4_BLOCK) + big) == ("ok", V4_INFO, big)
    # Another header behind the first is the connection's business, not the reader's.
    assert outcome(WORST_V1 + WORST_V1) == ("ok", LOCAL1, WORST_V1)


# ---- O(n): counted, not timed ---------------------------------------------------------------------------
@pytest.fixture
def v1_bytes_examined(monkeypatch):
    """How many times the reader looked at a v1 byte after "PROXY " (each must be looked at once)."""
    seen: List[int] = []
    original = ProxyHeaderReader._v1_byte

    def counting(self, i, c):
        seen.append(i)
        return original(self, i, c)

    monkeypatch.setattr(ProxyHeaderReader, "_v1_byte", counting)
    return seen


LONG_V1 = [
    WORST_V1,
    b"PROXY TCP6 %s %s 65535 65535\r\n" % (FFFF.encode(), FFFF.encode()),
    b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
]


@pytest.mark.parametrize("line", LONG_V1, ids=["unknown", "tcp6", "tcp4"])
def test_v1_bytewise_examines_each_byte_once(line, v1_bytes_examined):
    r = ProxyHeaderReader()
    got = None
    for i in range(len(line)):
        got = r.feed(line[i:i + 1])
        if got is None:
            # The search position follows the input: nothing fed is looked at again.
            assert r._pos == i + 1
    assert got is not None and got[1] == b""
    # The bytes after "PROXY " except the CR and LF, each once, in order.
    assert v1_bytes_examined == [i for i in range(6, len(line) - 2) if line[i] != 0x0D]
    del v1_bytes_examined[:]
    assert outcome(line + NEXT)[0] == "ok"
    assert len(v1_bytes_examined) == len(line) - 8


def test_v1_without_crlf_examines_at_most_107_bytes(v1_bytes_examined):
    r = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        r.feed(b"PROXY UNKNOWN " + b"x" * 1000000)
    assert len(v1_bytes_examined) <= V1_MAX
    r = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError):
        for _ in range(10000):
            r.feed(b"PROXY UNKNOWN x")
    assert len(v1_bytes_examined) <= 2 * V1_MAX


def test_v2_bytewise_keeps_its_position():
    raw = v2(0x21, 0x11, V4_BLOCK + FILL)
    r = ProxyHeaderReader()
    for i in range(len(raw) - 1):
        assert r.feed(raw[i:i + 1]) is None
        # The fixed part is checked once, byte by byte; then only the length is waited for.
        assert r._pos == min(i + 1, 16)
    assert r.feed(raw[-1:]) == (V4_INFO, b"")


# ---- fuzz ---------------------------------------------------------------------------------------------
def reference(data: bytes) -> Outcome:
    """A plain whole-input parser for complete headers: what the reader must say once a header (or its
    end) is there. ("incomplete",) where the reader may wait or refuse early."""
    if not data:
        return ("incomplete",)
    if data[:1] == b"P":
        lf = data.find(b"\n", 0, V1_MAX)
        if lf < 0:
            return ("error", "length") if len(data) >= V1_MAX else ("incomplete",)
        if data[lf - 1:lf] != b"\r" or b"\r" in data[:lf - 1]:
            return ("error", "line end")
        rest = data[lf + 1:]
        parts = data[:lf - 1].split(b" ")
        if parts[0] != b"PROXY" or len(parts) < 2:
            return ("error", "keyword")
        if parts[1] == b"UNKNOWN":
            return ("ok", LOCAL1, rest)
        if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
            return ("error", "fields")
        try:
            ips = [ref_address(p, parts[1]) for p in parts[2:4]]
            ports = [ref_port(p) for p in parts[4:6]]
        except ValueError:
            return ("error", "value")
        return ("ok", ProxyInfo(1, False, parts[1].decode(), ips[0], ports[0], ips[1], ports[1]), rest)
    if data[:1] == b"\r":
        if len(data) < 16:
            return ("incomplete",)
        ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
        if data[:12] != SIG or ver_cmd not in (0x20, 0x21) or fam >> 4 > 3 or fam & 15 > 2 or 16 + length > V2_MAX:
            return ("error", "fixed part")
        if len(data) < 16 + length:
            return ("incomplete",)
        block, rest = data[16:16 + length], data[16 + length:]
        if ver_cmd == 0x20 or fam not in (0x11, 0x21):
            return ("ok", LOCAL2, rest)
        size = 12 if fam == 0x11 else 36
        if len(block) < size:
            return ("error", "block")
        pos = size
        while pos < len(block):
            if pos + 3 > len(block):
                return ("error", "tlv")
            pos += 3 + struct.unpack("!H", block[pos + 1:pos + 3])[0]
        if pos != len(block):
            return ("error", "tlv")
        half = (size - 4) // 2
        make = ipaddress.IPv4Address if fam == 0x11 else ipaddress.IPv6Address
        sport, dport = struct.unpack("!HH", block[size - 4:size])
        return ("ok", ProxyInfo(2, False, "TCP4" if fam == 0x11 else "TCP6", str(make(block[:half])), sport,
                                str(make(block[half:2 * half])), dport), rest)
    return ("error", "first byte")


def ref_address(text: bytes, proto: bytes) -> str:
    s = text.decode("latin-1")
    if proto == b"TCP4":
        octets = s.split(".")
        if len(octets) != 4 or any(not o.isdigit() or not o.isascii() or (len(o) > 1 and o[0] == "0")
                                   for o in octets):
            raise ValueError(s)
        return str(ipaddress.IPv4Address(s))
    if "%" in s or not s or not all(c in "0123456789abcdefABCDEF:." for c in s):
        raise ValueError(s)
    return str(ipaddress.IPv6Address(s))


def ref_port(text: bytes) -> int:
    if not text or len(text) > 5 or not all(48 <= c <= 57 for c in text) or (len(text) > 1 and text[0] == 48):
        raise ValueError(text)
    if int(text) > 65535:
        raise ValueError(text)
    return int(text)


def check_against_reference(data: bytes, cuts: List[int]) -> None:
    points = sorted(set([0, len(data)] + [c % (len(data) + 1) for c in cuts]))
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    got = run(chunks)
    # The same whatever the split.
    assert run([data]) == got
    assert run([data[i:i + 1] for i in range(len(data))]) == got
    if got[0] == "ok":
        assert data.endswith(got[2])  # type: ignore[misc]
        # Every proper prefix of the header was waited for, not refused.
        header = data[:len(data) - len(got[2])]  # type: ignore[misc]
        for cut in range(len(header)):
            assert run([header[:cut]]) == ("incomplete",)
    want = reference(data)
    if want[0] == "ok":
        assert got == want
    elif want[0] == "error":
        assert got[0] == "error", (want, got)
    else:
        assert got[0] in ("incomplete", "error")


SPECIAL = list(b"\r\n :.%0123456789abcdefABCDEFPROXYTCP46UNKW\x00\x01\x02\x10\x11\x12\x20\x21\x22\x31\xff")
any_byte = st.one_of(st.sampled_from(SPECIAL), st.integers(0, 255))
mutation = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 1 << 16), any_byte)


def mutate(data: bytes, ops: List[Tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        at = pos % (len(buf) + 1)
        if op == "insert":
            buf[at:at] = bytes([byte])
        elif buf and at < len(buf):
            if op == "delete":
                del buf[at]
            else:
                buf[at] = byte
    return bytes(buf)


SEEDS = ([raw for _id, raw, _info in VALID if len(raw) < 400] + [good + bad for _id, good, bad in INVALID
                                                                   if len(good + bad) < 400]
         + [build_v1(*a) for a in ROUND_TRIP] + [build_v2(*a) for a in ROUND_TRIP])
PREFIXES = [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG, SIG + b"\x21\x11",
            SIG + b"\x21\x11\x00\x0c", SIG + b"\x21\x21\x00"]


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(mutation, max_size=4), st.sampled_from(TRAILING),
       st.lists(st.integers(0, 1 << 12), max_size=4))
def test_fuzz_mutated_headers(seed, ops, trailing, cuts):
    check_against_reference(mutate(seed, ops) + trailing, cuts)


@FUZZ
@given(st.sampled_from(PREFIXES), st.binary(max_size=150), st.lists(st.integers(0, 1 << 12), max_size=4))
def test_fuzz_random_bytes(prefix, data, cuts):
    check_against_reference(prefix + data, cuts)


def v6_texts(addr: ipaddress.IPv6Address) -> List[str]:
    """Ways to write one IPv6 address: compressed, exploded, upper case, with a dotted IPv4 tail."""
    groups = addr.exploded.split(":")
    low = int(addr) & 0xFFFFFFFF
    dotted = ":".join(g.lstrip("0") or "0" for g in groups[:6]) + ":" + str(ipaddress.IPv4Address(low))
    return [addr.compressed, addr.exploded, addr.compressed.upper(), addr.exploded.upper(), dotted]


@FUZZ
@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535),
       st.sampled_from(TRAILING), st.data())
def test_fuzz_v1_tcp6_text_forms(src, dst, sport, dport, trailing, data):
    s = data.draw(st.sampled_from(v6_texts(src)))
    d = data.draw(st.sampled_from(v6_texts(dst)))
    line = b"PROXY TCP6 %s %s %d %d\r\n" % (s.encode(), d.encode(), sport, dport)
    got = outcome(line + trailing)
    if len(line) > V1_MAX:
        assert got[0] == "error"
    else:
        assert got == ("ok", ProxyInfo(1, False, "TCP6", str(src), sport, str(dst), dport), trailing)
    check_against_reference(line + trailing, [len(line) // 2])


@FUZZ
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
       st.integers(0, 65535), st.integers(0, 65535), st.sampled_from([1, 2]), st.sampled_from(TRAILING),
       st.lists(st.integers(0, 1 << 8), max_size=3))
def test_fuzz_builders_round_trip(src, dst, sport, dport, version, trailing, cuts):
    raw = (build_v1 if version == 1 else build_v2)(str(src), sport, str(dst), dport)
    data = raw + trailing
    points = sorted(set([0, len(data)] + [c % (len(data) + 1) for c in cuts]))
    got = run([data[a:b] for a, b in zip(points, points[1:])])
    check_against_reference(data, cuts)
    a, b = src, dst
    if a.version != b.version:
        a = getattr(a, "ipv4_mapped", None) or a
        b = getattr(b, "ipv4_mapped", None) or b
    if a.version != b.version:
        assert got == ("ok", ProxyInfo(version, True, "UNKNOWN"), trailing)
    else:
        family = "TCP4" if a.version == 4 else "TCP6"
        assert got == ("ok", ProxyInfo(version, False, family, str(a), sport, str(b), dport), trailing)
