"""Tests for balrs.http.build: what goes upstream for a request, what goes to the client for a response,
and balrs' own error responses. The writer shares the reader's case tables (tests/http_cases.py): every
head it writes is read back with the real parser, through a HeadBuffer, and must be exactly one head.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balrs.http.build import (
    REASONS, VIA, client_response_head, error_response, forwarded_suffix, upstream_request_head,
)
from balrs.http.errors import ProtocolError
from balrs.http.heads import (
    CHUNKED, CLOSE_DELIMITED, LENGTH, NO_BODY, HeadBuffer, RequestHead, ResponseHead, parse_request_head,
    parse_response_head,
)
from http_cases import VALID_REQUESTS, VALID_RESPONSES

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CLIENT_IP = b"192.0.2.7"
SUFFIX = forwarded_suffix(CLIENT_IP)
DEFAULT_HOST = b"backend.internal:8080"
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}


def one_head(data: bytes) -> bytes:
    """``data`` is exactly one complete head: nothing before, nothing after, no earlier end."""
    hb = HeadBuffer(len(data) + 1)
    got = hb.split(data)
    assert got is not None, data
    assert got == (data, b""), data
    assert data.count(b"\r\n\r\n") == 1 and data.endswith(b"\r\n\r\n")
    assert b"\n\n" not in data
    return got[0]


def upstream(raw: bytes) -> Tuple[RequestHead, bytes, RequestHead]:
    req = parse_request_head(raw)
    out = upstream_request_head(req, CLIENT_IP, SUFFIX, DEFAULT_HOST)
    return req, out, parse_request_head(one_head(out))


def fields(r: RequestHead) -> List[Tuple[bytes, bytes]]:
    return list(zip(r.lnames, r.values))


# ---- upstream_request_head -----------------------------------------------------------------------------
def test_forwarded_suffix():
    assert SUFFIX == b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nVia: 1.1 balrs\r\n"
    assert VIA == b"1.1 balrs"


def test_fast_path_forwards_head_byte_for_byte():
    raw = b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept:  */* \r\nX-Mixed-CASE: v\xff\r\n\r\n"
    req, out, again = upstream(raw)
    assert not req.rewrite
    assert out == raw[:-2] + b"X-Forwarded-Host: example.com\r\n" + SUFFIX + b"\r\n"
    assert again.header(b"x-forwarded-for") == CLIENT_IP
    assert again.header(b"x-forwarded-proto") == b"http"
    assert again.header(b"x-forwarded-host") == b"example.com"
    assert again.header(b"via") == VIA


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
])
def test_fast_path_with_body(raw):
    req, out, again = upstream(raw)
    assert not req.rewrite
    assert out.startswith(raw[:-2])
    assert (again.framing, again.length) == (req.framing, req.length)


def test_hop_by_hop_fields_removed():
    raw = (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret, Close\r\nKeep-Alive: 300\r\n"
           b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Sum\r\nUpgrade: websocket\r\n"
           b"X-Secret: s\r\nx-secret: t\r\nX-Kept: k\r\nAccept: a\r\n\r\n")
    req, out, again = upstream(raw)
    assert req.upgrade is None
    names = set(again.lnames)
    assert not names & (HOP_BY_HOP | {b"x-secret"})
    assert fields(again)[:3] == [(b"host", b"h"), (b"x-kept", b"k"), (b"accept", b"a")]
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: h\r\nX-Kept: k\r\nAccept: a\r\n")


def test_upgrade_kept_when_tunnelling():
    raw = (b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: k==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    req, out, again = upstream(raw)
    assert req.upgrade == b"websocket"
    assert again.upgrade == b"websocket"
    assert again.connection_tokens == [b"upgrade"]
    assert again.lnames.count(b"upgrade") == 1 and again.lnames.count(b"connection") == 1
    assert again.header(b"sec-websocket-key") == b"k=="


def test_x_forwarded_for_appended_proto_and_host_replaced_via_appended():
    raw = (b"GET / HTTP/1.1\r\nHost: public.example\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n"
           b"X-Forwarded-For: 10.0.0.3\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
           b"Via: 1.0 fred, 1.1 p.example\r\n\r\n")
    _req, _out, again = upstream(raw)
    assert again.lnames.count(b"x-forwarded-for") == 1
    assert again.header(b"x-forwarded-for") == b"10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"
    assert again.header(b"x-forwarded-proto") == b"http"
    assert again.header(b"x-forwarded-host") == b"public.example"
    assert again.header(b"via") == b"1.0 fred, 1.1 p.example, 1.1 balrs"
    for name in (b"x-forwarded-proto", b"x-forwarded-host", b"via"):
        assert again.lnames.count(name) == 1


def test_empty_forwarded_values_add_no_empty_element():
    raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For:\r\nVia: \r\n\r\n"
    _req, _out, again = upstream(raw)
    assert again.header(b"x-forwarded-for") == CLIENT_IP
    assert again.header(b"via") == VIA


def test_http10_without_host_gets_default_host():
    req, out, again = upstream(b"GET /x HTTP/1.0\r\nAccept: a\r\n\r\n")
    assert req.host is None
    assert out.startswith(b"GET /x HTTP/1.1\r\n")
    assert again.host == DEFAULT_HOST and again.minor == 1
    assert again.header(b"x-forwarded-host") is None


@pytest.mark.parametrize("raw, target, host", [
    (b"GET http://evil.example/admin HTTP/1.1\r\nHost: good.example\r\n\r\n", b"/admin", b"evil.example"),
    (b"GET http://evil.example/admin HTTP/1.1\r\nHost: good.example\r\nConnection: host\r\n\r\n",
     b"/admin", b"evil.example"),
    (b"GET HTTP://A.example:81?q HTTP/1.1\r\nHost: b\r\n\r\n", b"/?q", b"A.example:81"),
    (b"GET http://example.com:80/abs?q HTTP/1.0\r\n\r\n", b"/abs?q", b"example.com:80"),
    (b"OPTIONS http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", b"*", b"example.com"),
])
def test_absolute_form_goes_upstream_in_origin_form_with_its_authority_as_host(raw, target, host):
    """RFC 9112 §3.2.2: the backend sees one host, the target's, never the received Host or an invented one."""
    req, out, again = upstream(raw)
    assert req.absolute and req.target == target and req.host == host
    assert out.startswith(req.method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n")
    assert again.lnames.count(b"host") == 1 and again.host == host and not again.absolute
    assert again.target == target
    assert again.header(b"x-forwarded-host") == host
    assert b"good.example" not in out and DEFAULT_HOST not in out


def test_http10_with_host_keeps_it_and_upgrades_version():
    req, out, again = upstream(b"POST /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n")
    assert out.startswith(b"POST /x HTTP/1.1\r\nHost: h\r\n")
    assert again.host == b"h" and again.header(b"x-forwarded-host") == b"h"
    assert (again.framing, again.length) == (LENGTH, 2)
    assert again.header(b"connection") is None and again.keep_alive


def test_http12_goes_upstream_as_http11():
    _req, out, again = upstream(b"GET / HTTP/1.2\r\nHost: h\r\n\r\n")
    assert out.startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("cl", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n", b"Content-Length: 5, 5\r\n", b"Content-Length: 005\r\n",
    b"content-length: 5\r\nX: y\r\nCONTENT-LENGTH: 5,5\r\n",
])
def test_content_length_collapses_to_one(cl):
    _req, out, again = upstream(b"POST / HTTP/1.1\r\nHost: h\r\n" + cl + b"\r\n")
    assert again.lnames.count(b"content-length") == 1
    assert again.header(b"content-length") == b"5"
    assert b"Content-Length: 5\r\n" in out


@pytest.mark.parametrize("te", [
    b"Transfer-Encoding: Chunked\r\n", b"Transfer-Encoding: , chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n",
])
def test_transfer_encoding_canonical(te):
    _req, out, again = upstream(b"POST / HTTP/1.1\r\nHost: h\r\n" + te + b"\r\n")
    assert again.lnames.count(b"transfer-encoding") == 1
    assert again.header(b"transfer-encoding") == b"chunked"


@pytest.mark.parametrize("framing_field,framing,length", [
    (b"Content-Length: 12", LENGTH, 12), (b"Transfer-Encoding: chunked", CHUNKED, 0),
])
@pytest.mark.parametrize("named", [b"content-length", b"transfer-encoding", b"host", b"Host, Content-Length"])
def test_connection_cannot_name_away_framing_or_host(framing_field, framing, length, named):
    """Connection may name any field, but dropping the framing field would let the backend read the body
    as the next request (smuggling), and HTTP/1.1 needs Host."""
    raw = b"POST / HTTP/1.1\r\nHost: h\r\nConnection: " + named + b"\r\n" + framing_field + b"\r\n\r\n"
    _req, _out, again = upstream(raw)
    assert (again.framing, again.length) == (framing, length)
    assert again.host == b"h"


@pytest.mark.parametrize("case", VALID_REQUESTS, ids=lambda c: c.id)
def test_table_requests_round_trip(case):
    """The reader's table, written upstream and read back: same request, one head, HTTP/1.1."""
    req, out, again = upstream(case.head)
    assert (again.method, again.target, again.framing, again.length) == (req.method, req.target,
                                                                           req.framing, req.length)
    assert again.minor == 1
    assert again.host == (req.host if req.host is not None else DEFAULT_HOST)
    assert again.upgrade == req.upgrade
    if req.minor == 1:
        assert again.expect_continue == req.expect_continue
    _check_forwarded(req, again)


def _check_forwarded(req: RequestHead, again: RequestHead) -> None:
    tunnel = req.upgrade is not None
    for name in again.lnames:
        if name in (b"connection", b"upgrade"):
            assert tunnel, name
        else:
            assert name not in HOP_BY_HOP, name
        if name in req.connection_tokens and name not in (b"host", b"content-length", b"transfer-encoding"):
            assert tunnel and name in (b"upgrade", b"connection"), name
    xff = again.header(b"x-forwarded-for")
    assert xff is not None and xff.split(b", ")[-1] == CLIENT_IP
    assert again.header(b"x-forwarded-proto") == b"http"
    via = again.header(b"via")
    assert via is not None and via.endswith(VIA)
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"host"):
        assert again.lnames.count(name) <= 1


# ---- the smuggling property ----------------------------------------------------------------------------
FIELD_NAMES = [
    b"Host", b"host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Upgrade",
    b"Expect", b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Connection", b"X-Forwarded-For", b"X-Forwarded-Host",
    b"X-Forwarded-Proto", b"Via", b"X-Foo", b"Accept",
]
FIELD_VALUES = [
    b"", b"h", b"example.com:80", b"0", b"5", b"005", b"5, 5", b"5,", b" 7 ", b"chunked", b"Chunked",
    b"chunked, chunked", b"gzip", b", chunked", b"close", b"keep-alive", b"upgrade", b"Upgrade, close",
    b"content-length", b"transfer-encoding", b"host", b"x-foo, te", b"websocket", b"100-continue",
    b"1.2.3.4", b"1.0 a", b"\x80\xff", b"a\tb",
]
# Random field values with every CTL mapped to a letter (so they stay valid field values).
_PRINTABLE = bytes((0x61 + i % 26) if i < 0x20 or i == 0x7F else i for i in range(256))
request_fields = st.lists(st.tuples(st.sampled_from(FIELD_NAMES),
                                    st.one_of(st.sampled_from(FIELD_VALUES),
                                              st.binary(max_size=8).map(lambda b: b.translate(_PRINTABLE)))),
                          max_size=7)


@st.composite
def structured_requests(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS"]))
    target = draw(st.sampled_from([b"/", b"/a?b", b"*", b"http://h/x"]))
    version = draw(st.sampled_from([b"1.0", b"1.1", b"1.2"]))
    lines = [b"%s: %s\r\n" % nv for nv in draw(request_fields)]
    if version != b"1.0" and draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"Host: h\r\n")
    return b"%s %s HTTP/%s\r\n%s\r\n" % (method, target, version, b"".join(lines))


def _mutate(data: bytes, ops: List[Tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, byte in ops:
        at = pos % (len(buf) + 1)
        buf[at:at] = bytes([byte])
    return bytes(buf)


mutated_requests = st.builds(
    _mutate, st.sampled_from([c.head for c in VALID_REQUESTS if len(c.head) < 400]),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.sampled_from(list(b"\r\n :,;\t0a"))), max_size=3))


def _smuggling_property(raw: bytes) -> None:
    try:
        req = parse_request_head(raw)
    except ProtocolError:
        return
    out = upstream_request_head(req, CLIENT_IP, SUFFIX, DEFAULT_HOST)
    again = parse_request_head(one_head(out))
    assert (again.method, again.target, again.framing, again.length) == (req.method, req.target,
                                                                           req.framing, req.length)
    assert again.host == (req.host if req.host is not None else DEFAULT_HOST)
    assert again.upgrade == req.upgrade
    # What the backend sees is exactly one message: with its body (framed as balrs frames it) the
    # stream parses as one request and nothing more.
    if again.framing == LENGTH:
        body = b"x" * min(again.length, 64)
    elif again.framing == CHUNKED:
        body = b"3\r\nabc\r\n0\r\n\r\n"
    else:
        body = b""
    hb = HeadBuffer(len(out) + 1)
    got = hb.split(out + body)
    assert got == (out, body)
    _check_forwarded(req, again)
    # Writing the forwarded head again changes nothing that matters.
    twice = upstream_request_head(again, CLIENT_IP, SUFFIX, DEFAULT_HOST)
    third = parse_request_head(one_head(twice))
    assert (third.method, third.target, third.framing, third.length, third.host) == (
        again.method, again.target, again.framing, again.length, again.host)


@FUZZ
@given(structured_requests())
def test_fuzz_smuggling_structured(raw):
    _smuggling_property(raw)


@FUZZ
@given(mutated_requests)
def test_fuzz_smuggling_mutated(raw):
    _smuggling_property(raw)


# ---- client_response_head ------------------------------------------------------------------------------
def client_framing(resp: ResponseHead, client_minor: int) -> int:
    """How the proxy frames the body it sends (proxy.ClientConn.response_head)."""
    if resp.framing in (CHUNKED, CLOSE_DELIMITED):
        return CHUNKED if client_minor == 1 else CLOSE_DELIMITED
    return resp.framing


def to_client(raw: bytes, client_minor: int = 1, close: bool = False, head_request: bool = False,
              keep_upgrade: bool = False) -> Tuple[ResponseHead, bytes, ResponseHead, int]:
    resp = parse_response_head(raw, head_request)
    framing = NO_BODY if keep_upgrade else client_framing(resp, client_minor)
    if framing == CLOSE_DELIMITED:
        close = True  # the proxy closes after a close-delimited body
    out = client_response_head(resp, framing, close, client_minor, keep_upgrade)
    return resp, out, parse_response_head(one_head(out), head_request), framing


def test_response_fast_path_returns_raw():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\n"
    resp, out, _again, _ = to_client(raw)
    assert out is resp.raw
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp, out, again, framing = to_client(raw)
    assert out is resp.raw and framing == CHUNKED == again.framing


def test_connection_close_added_when_closing():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    _resp, out, again, _ = to_client(raw, close=True)
    assert out == raw[:-2] + b"Connection: close\r\n\r\n"
    assert not again.keep_alive and again.connection_tokens == [b"close"]


def test_keep_alive_for_http10_client():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    _resp, out, again, _ = to_client(raw, client_minor=0)
    assert out == raw[:-2] + b"Connection: keep-alive\r\n\r\n"
    assert again.connection_tokens == [b"keep-alive"]


def test_response_hop_by_hop_removed():
    raw = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: X-Internal, keep-alive\r\nKeep-Alive: timeout=5\r\n"
           b"Proxy-Connection: close\r\nTE: trailers\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\nX-Internal: secret\r\n"
           b"Server: s\r\n\r\n")
    for minor, close in ((1, False), (1, True), (0, False), (0, True)):
        _resp, out, again, _ = to_client(raw, minor, close)
        assert not set(again.lnames) & {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                                          b"x-internal"}
        assert again.header(b"server") == b"s" and again.length == 5
        want = [b"close"] if close else [b"keep-alive"] if minor == 0 else []
        assert again.connection_tokens == want


def test_http10_client_gets_chunked_body_unframed():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n"
    _resp, out, again, framing = to_client(raw, client_minor=0)
    assert framing == CLOSE_DELIMITED
    assert out == b"HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n"
    assert again.framing == CLOSE_DELIMITED


def test_http10_client_never_sees_transfer_encoding():
    for te in (b"chunked", b"gzip", b"gzip, chunked", b"chunked, gzip"):
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\nContent-Length: 3\r\n\r\n"
        _resp, _out, again, framing = to_client(raw, client_minor=0)
        assert framing == CLOSE_DELIMITED
        assert b"transfer-encoding" not in again.lnames and b"content-length" not in again.lnames


def test_close_delimited_transfer_coding_kept_when_rechunked():
    """A coding balrs does not decode stays listed, with chunked added after it (RFC 9112 §6.1)."""
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n"
    _resp, out, again, framing = to_client(raw)
    assert framing == CHUNKED == again.framing
    assert again.header(b"transfer-encoding") == b"gzip, chunked"
    assert b"content-length" not in again.lnames
    # chunked already inside the codings: adding it again would be invalid, so the field goes.
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
    _resp, out, again, framing = to_client(raw)
    assert again.header(b"transfer-encoding") == b"chunked" and again.framing == CHUNKED


def test_content_length_dropped_when_transfer_encoding_present():
    for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"):
        resp, out, again, framing = to_client(raw)
        assert not resp.keep_alive  # the upstream connection is not reused after this
        assert framing == CHUNKED == again.framing
        assert b"content-length" not in again.lnames
        assert out == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_close_delimited_response_chunked_for_http11_client():
    raw = b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n"
    _resp, out, again, framing = to_client(raw)
    assert framing == CHUNKED == again.framing
    assert out == b"HTTP/1.1 200 OK\r\nServer: old\r\nTransfer-Encoding: chunked\r\n\r\n"
    _resp, out, again, _ = to_client(raw, close=True)
    assert out == b"HTTP/1.1 200 OK\r\nServer: old\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_101_keeps_upgrade_and_connection():
    raw = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Drop\r\nUpgrade: websocket\r\n"
           b"Keep-Alive: 1\r\nX-Drop: 1\r\nSec-WebSocket-Accept: abc\r\n\r\n")
    _resp, out, again, _ = to_client(raw, keep_upgrade=True)
    assert again.status == 101 and again.framing == NO_BODY
    assert again.header(b"upgrade") == b"websocket"
    assert b"upgrade" in again.connection_tokens
    assert again.header(b"sec-websocket-accept") == b"abc"
    assert b"keep-alive" not in again.lnames and b"x-drop" not in again.lnames
    plain = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert to_client(plain, keep_upgrade=True)[1] == plain


@pytest.mark.parametrize("raw,line", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
    (b"HTTP/1.0 404\r\nContent-Length: 5\r\n\r\n", b"HTTP/1.1 404\r\n"),
    (b"HTTP/1.0 500 \r\nContent-Length: 5\r\n\r\n", b"HTTP/1.1 500 \r\n"),
    (b"HTTP/1.2 200 Fine\r\nContent-Length: 5\r\n\r\n", b"HTTP/1.1 200 Fine\r\n"),
])
def test_status_line_rewritten_to_http11(raw, line):
    for minor in (0, 1):
        _resp, out, again, _ = to_client(raw, minor)
        assert out.startswith(line)
        assert again.minor == 1 and again.length == 5


def test_response_duplicate_content_length_collapses():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\ncontent-length: 5, 5\r\n\r\n"
    _resp, out, again, _ = to_client(raw)
    assert again.lnames.count(b"content-length") == 1 and again.header(b"content-length") == b"5"


def test_response_connection_cannot_name_away_framing():
    for raw, framing in ((b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n", LENGTH),
                         (b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
                          CHUNKED)):
        _resp, _out, again, out_framing = to_client(raw)
        assert out_framing == framing == again.framing


def test_head_response_keeps_content_length():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    resp, out, again, framing = to_client(raw, head_request=True)
    assert framing == NO_BODY and out is resp.raw
    assert again.header(b"content-length") == b"1234"


@pytest.mark.parametrize("case", [c for c in VALID_RESPONSES if c.status >= 200], ids=lambda c: c.id)
def test_table_responses_round_trip(case):
    for minor in (0, 1):
        for close in (False, True):
            _response_property(case.raw.lstrip(b"\r\n"), minor, close, case.head_request)


def _response_property(raw: bytes, minor: int, close: bool, head_request: bool) -> None:
    try:
        resp = parse_response_head(raw, head_request)
    except ProtocolError:
        return
    if resp.status < 200:
        return
    resp, out, again, framing = to_client(raw, minor, close, head_request)
    if framing == CLOSE_DELIMITED:
        close = True
    # The client reads the body exactly as balrs frames it.
    assert again.status == resp.status
    assert again.minor == 1
    assert again.framing == framing
    if framing == LENGTH:
        assert again.length == resp.length
        assert again.lnames.count(b"content-length") == 1
    if framing in (CHUNKED, CLOSE_DELIMITED):
        assert b"content-length" not in again.lnames
    if framing == CLOSE_DELIMITED or (minor == 0 and framing != NO_BODY):
        assert b"transfer-encoding" not in again.lnames
    # Connection says what balrs does with the client connection, and nothing else.
    assert set(again.connection_tokens) <= {b"close", b"keep-alive"}
    assert again.lnames.count(b"connection") <= 1
    if close:
        assert again.connection_tokens == [b"close"]
    elif minor == 0:
        assert again.connection_tokens == [b"keep-alive"]
    assert not set(again.lnames) & {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
    for token in resp.connection_tokens:
        if token not in (b"content-length", b"transfer-encoding", b"connection"):
            assert token not in again.lnames


RESPONSE_NAMES = [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"Upgrade", b"TE",
                  b"Trailer", b"Proxy-Connection", b"Server", b"X-A"]
RESPONSE_VALUES = [b"", b"5", b"0", b"5, 5", b"chunked", b"gzip", b"gzip, chunked", b"chunked, gzip", b"close",
                   b"keep-alive", b"Keep-Alive", b"upgrade", b"x-a", b"content-length", b"transfer-encoding",
                   b"close, x-a", b"s"]


@st.composite
def structured_responses(draw) -> bytes:
    version = draw(st.sampled_from([b"1.0", b"1.1", b"1.2"]))
    status = draw(st.sampled_from([b"200 OK", b"204 No Content", b"304 Not Modified", b"404", b"500 Oops"]))
    lines = [b"%s: %s\r\n" % nv for nv in draw(st.lists(st.tuples(st.sampled_from(RESPONSE_NAMES),
                                                                   st.sampled_from(RESPONSE_VALUES)),
                                                         max_size=6))]
    return b"HTTP/%s %s\r\n%s\r\n" % (version, status, b"".join(lines))


@FUZZ
@given(structured_responses(), st.sampled_from([0, 1]), st.booleans(), st.booleans())
def test_fuzz_client_response_framing(raw, minor, close, head_request):
    _response_property(raw, minor, close, head_request)


# ---- error_response ------------------------------------------------------------------------------------
# balrs answers with final statuses only.
STATUSES = sorted(s for s in set(REASONS) | {418, 599} if s >= 200)


@pytest.mark.parametrize("status", STATUSES)
def test_error_response_consistent(status):
    for close in (False, True):
        full = error_response(status, close)
        assert error_response(status, close, False) is full  # cached
        hb = HeadBuffer(4096)
        got = hb.split(full)
        assert got is not None
        head, body = got
        resp = parse_response_head(head)
        assert resp.status == status and resp.minor == 1
        assert resp.framing == LENGTH and resp.length == len(body) > 0
        assert body == b"%d %s\n" % (status, REASONS.get(status, b"Error"))
        assert resp.header(b"content-type") == b"text/plain"
        assert resp.keep_alive is not close
        assert (resp.connection_tokens == [b"close"]) is close
        head_only = error_response(status, close, head_only=True)
        assert head_only == head
        r2 = parse_response_head(one_head(head_only), head_request=True)
        assert r2.framing == NO_BODY and r2.header(b"content-length") == b"%d" % len(body)


def test_error_response_unknown_status_has_generic_reason():
    assert error_response(599).startswith(b"HTTP/1.1 599 Error\r\n")
