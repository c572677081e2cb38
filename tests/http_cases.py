"""Case tables shared by the reader tests (heads, chunked) and the writer tests (build), and the drivers
that feed a case whole, byte by byte, in two halves and with trailing bytes (STYLE habit 12, after h11's
``tests/test_io.py``).

Every table row is plain data; the test modules decide what to do with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from balrs.http.errors import ProtocolError
from balrs.http.heads import (
    CHUNKED, CLOSE_DELIMITED, LENGTH, NO_BODY, REQUEST, RESPONSE, HeadBuffer, RequestHead, ResponseHead,
    parse_request_head, parse_response_head,
)

# The HeadBuffer limit (max_header_bytes) used unless a case says otherwise.
LIMIT = 4096

# What may follow a head: nothing, the start of a pipelined request, a whole pipelined request, body bytes.
NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: next.example\r\n\r\n"
TRAILING = {
    "none": b"",
    "partial-next": b"GET /ne",
    "next": NEXT_REQUEST,
    "body": b"hello world\r\n\r\n",
    "crlf-next": b"\r\n" + NEXT_REQUEST,
}
NEXT_RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"
RESPONSE_TRAILING = {
    "none": b"",
    "body": b"hello",
    "partial-next": b"HTTP/1.1 2",
    "next": NEXT_RESPONSE,
}


# ---- requests ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    """A valid request head and what parse_request_head must make of it."""

    id: str
    raw: bytes
    method: bytes = b"GET"
    target: bytes = b"/"
    minor: int = 1
    host: Optional[bytes] = b"example.com"
    absolute: bool = False
    framing: int = NO_BODY
    length: int = 0
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: Optional[bytes] = None
    rewrite: bool = False
    connection_tokens: Tuple[bytes, ...] = ()
    limit: int = LIMIT

    @property
    def head(self) -> bytes:
        """The head HeadBuffer hands out: empty lines before the request line are dropped."""
        return self.raw.lstrip(b"\r\n")

    def expected(self) -> Dict[str, object]:
        return {
            "method": self.method, "target": self.target, "minor": self.minor, "host": self.host,
            "absolute": self.absolute, "framing": self.framing, "length": self.length, "keep_alive": self.keep_alive,
            "expect_continue": self.expect_continue, "upgrade": self.upgrade, "rewrite": self.rewrite,
            "connection_tokens": list(self.connection_tokens),
        }


def request_summary(r: RequestHead) -> Dict[str, object]:
    return {
        "method": r.method, "target": r.target, "minor": r.minor, "host": r.host, "absolute": r.absolute,
        "framing": r.framing,
        "length": r.length, "keep_alive": r.keep_alive, "expect_continue": r.expect_continue,
        "upgrade": r.upgrade, "rewrite": r.rewrite, "connection_tokens": list(r.connection_tokens),
    }


H = b"Host: example.com\r\n"


def _exact_size(size: int) -> bytes:
    """A valid head of exactly ``size`` bytes."""
    base = b"GET / HTTP/1.1\r\n" + H + b"X-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))


VALID_REQUESTS: List[Req] = [
    Req("get", b"GET / HTTP/1.1\r\n" + H + b"\r\n"),
    Req("get-fields", b"GET /a/b?c=d&e HTTP/1.1\r\n" + H + b"Accept: */*\r\nUser-Agent: t/1.0\r\n\r\n",
        target=b"/a/b?c=d&e"),
    Req("host-last-field", b"GET / HTTP/1.1\r\nAccept: */*\r\nhOsT: example.com\r\n\r\n"),
    Req("host-with-port", b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", host=b"example.com:8080"),
    Req("host-ipv6", b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", host=b"[::1]:80"),
    Req("host-empty", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", host=b""),
    Req("ows-around-value", b"GET / HTTP/1.1\r\nHost: \t example.com \t\r\n\r\n"),
    Req("post-length", b"POST /submit HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n",
        method=b"POST", target=b"/submit", framing=LENGTH, length=5),
    Req("post-length-zero", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        method=b"POST", framing=LENGTH, length=0),
    Req("length-18-digits", b"PUT / HTTP/1.1\r\n" + H + b"Content-Length: 999999999999999999\r\n\r\n",
        method=b"PUT", framing=LENGTH, length=999999999999999999),
    Req("length-leading-zeros", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0005\r\n\r\n",
        method=b"POST", framing=LENGTH, length=5, rewrite=True),
    Req("length-repeated", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n",
        method=b"POST", framing=LENGTH, length=5, rewrite=True),
    Req("length-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\n",
        method=b"POST", framing=LENGTH, length=5, rewrite=True),
    Req("chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n",
        method=b"POST", framing=CHUNKED),
    Req("chunked-case", b"POST / HTTP/1.1\r\n" + H + b"transfer-encoding: Chunked\r\n\r\n",
        method=b"POST", framing=CHUNKED, rewrite=True),
    Req("chunked-empty-elements", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: , chunked ,\r\n\r\n",
        method=b"POST", framing=CHUNKED, rewrite=True),
    Req("chunked-trailer-announced", b"POST / HTTP/1.1\r\n" + H
        + b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nTE: trailers\r\n\r\n",
        method=b"POST", framing=CHUNKED, rewrite=True),
    Req("http10", b"GET / HTTP/1.0\r\n\r\n", minor=0, host=None, keep_alive=False, rewrite=True),
    Req("http10-host", b"GET / HTTP/1.0\r\n" + H + b"\r\n", minor=0, keep_alive=False, rewrite=True),
    Req("http10-keep-alive", b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", minor=0, host=None,
        keep_alive=True, rewrite=True, connection_tokens=(b"keep-alive",)),
    Req("http10-length", b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n", method=b"POST", minor=0,
        host=None, keep_alive=False, rewrite=True, framing=LENGTH, length=3),
    Req("http10-expect-ignored", b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        method=b"POST", minor=0, host=None, keep_alive=False, rewrite=True, framing=LENGTH, length=3),
    Req("http10-upgrade-ignored", b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        minor=0, host=None, keep_alive=False, rewrite=True, connection_tokens=(b"upgrade",)),
    Req("http12-is-11", b"GET / HTTP/1.2\r\n" + H + b"\r\n", rewrite=True),
    Req("http19-is-11", b"GET / HTTP/1.9\r\n" + H + b"\r\n", rewrite=True),
    # RFC 9112 §3.2.2: an absolute-form target goes on in origin-form, its authority replacing Host.
    Req("absolute-form", b"GET http://example.com/x?y HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/x?y", absolute=True, rewrite=True),
    Req("absolute-form-other-host", b"GET http://evil.example/admin HTTP/1.1\r\nHost: good.example\r\n\r\n",
        target=b"/admin", host=b"evil.example", absolute=True, rewrite=True),
    Req("absolute-form-case", b"GET HTTPS://Example.COM:8443/P?Q HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/P?Q", host=b"Example.COM:8443", absolute=True, rewrite=True),
    Req("absolute-form-empty-path", b"GET http://example.com HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/", absolute=True, rewrite=True),
    Req("absolute-form-query-only", b"GET http://example.com?q=1 HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/?q=1", absolute=True, rewrite=True),
    Req("absolute-form-ipv6", b"GET http://[::1]:8080/x HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/x", host=b"[::1]:8080", absolute=True, rewrite=True),
    Req("absolute-form-options-empty-path", b"OPTIONS http://example.com:8001 HTTP/1.1\r\n" + H + b"\r\n",
        method=b"OPTIONS", target=b"*", host=b"example.com:8001", absolute=True, rewrite=True),
    Req("absolute-form-http10-no-host", b"GET http://example.com:80/abs?q HTTP/1.0\r\n\r\n",
        target=b"/abs?q", minor=0, host=b"example.com:80", absolute=True, keep_alive=False, rewrite=True),
    Req("options-star", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", method=b"OPTIONS", target=b"*"),
    Req("custom-method", b"M-SEARCH! /x HTTP/1.1\r\n" + H + b"\r\n", method=b"M-SEARCH!", target=b"/x"),
    Req("connect-authority-form", b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", method=b"CONNECT",
        target=b"example.com:443"),
    Req("target-odd-but-valid", b"GET /a;b=c/%7e~!$&'()*+,=:@?x=/?y HTTP/1.1\r\n" + H + b"\r\n",
        target=b"/a;b=c/%7e~!$&'()*+,=:@?x=/?y"),
    Req("leading-crlf", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n"),
    Req("leading-bare-lf", b"\n\nGET / HTTP/1.1\r\n" + H + b"\r\n"),
    Req("connection-close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", keep_alive=False,
        rewrite=True, connection_tokens=(b"close",)),
    Req("connection-tokens", b"GET / HTTP/1.1\r\n" + H
        + b"Connection: Keep-Alive, X-Foo\r\nConnection: ,close\r\nX-Foo: bar\r\n\r\n", keep_alive=False,
        rewrite=True, connection_tokens=(b"keep-alive", b"x-foo", b"close")),
    Req("upgrade", b"GET /ws HTTP/1.1\r\n" + H
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target=b"/ws", upgrade=b"websocket", rewrite=True, connection_tokens=(b"upgrade",)),
    Req("upgrade-among-tokens", b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, upgrade\r\n"
        b"Upgrade: h2c\r\n\r\n", upgrade=b"h2c", rewrite=True, connection_tokens=(b"keep-alive", b"upgrade")),
    Req("upgrade-not-in-connection", b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\n\r\n",
        rewrite=True),
    Req("expect-100", b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-Continue\r\nContent-Length: 10\r\n\r\n",
        method=b"PUT", framing=LENGTH, length=10, expect_continue=True),
    # RFC 9110 §5.6.1: empty list elements are ignored; an Expect with none expects nothing.
    Req("expect-empty", b"PUT / HTTP/1.1\r\n" + H + b"Expect:\r\nContent-Length: 1\r\n\r\n",
        method=b"PUT", framing=LENGTH, length=1),
    Req("expect-empty-elements", b"PUT / HTTP/1.1\r\n" + H + b"Expect: , ,\r\nContent-Length: 1\r\n\r\n",
        method=b"PUT", framing=LENGTH, length=1),
    Req("expect-100-with-empty-elements", b"PUT / HTTP/1.1\r\n" + H
        + b"Expect: ,100-continue,\r\nExpect:\r\nContent-Length: 1\r\n\r\n",
        method=b"PUT", framing=LENGTH, length=1, expect_continue=True),
    Req("host-trailing-ows", b"GET / HTTP/1.1\r\nHost:example.com \t \r\n\r\n"),
    Req("host-only-ows", b"GET / HTTP/1.1\r\nHost: \t \r\n\r\n", host=b""),
    Req("obs-text-value", b"GET / HTTP/1.1\r\n" + H + b"X-Name: caf\xc3\xa9 \x80\xff\r\n\r\n"),
    Req("empty-value", b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\nX-Blank:   \r\n\r\n"),
    Req("value-with-colons", b"GET / HTTP/1.1\r\n" + H + b"X-Time: 12:34:56\r\n\r\n"),
    Req("tab-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-T: a\tb\r\n\r\n"),
    Req("hop-by-hop", b"GET / HTTP/1.1\r\n" + H + b"Keep-Alive: timeout=5\r\nProxy-Connection: x\r\n\r\n",
        rewrite=True),
    Req("forwarded-fields", b"GET / HTTP/1.1\r\n" + H
        + b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nVia: 1.0 fred\r\n\r\n", rewrite=True),
    Req("exactly-at-limit", _exact_size(LIMIT)),
]

# Invalid requests: (id, raw, status, limit).
BadReq = Tuple[str, bytes, int, int]


def _bad(id: str, raw: bytes, status: int = 400, limit: int = LIMIT) -> BadReq:
    return (id, raw, status, limit)


def _fields(*lines: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\n" + H + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


INVALID_REQUESTS: List[BadReq] = [
    # Request smuggling (CONTRACT "Request smuggling"): CL + TE in both orders, differing lengths.
    _bad("cl-then-te", _fields(b"Content-Length: 5", b"Transfer-Encoding: chunked")),
    _bad("te-then-cl", _fields(b"Transfer-Encoding: chunked", b"Content-Length: 5")),
    _bad("cl-zero-and-te", _fields(b"Content-Length: 0", b"Transfer-Encoding: chunked")),
    _bad("cl-differing-lines", _fields(b"Content-Length: 5", b"Content-Length: 6")),
    _bad("cl-differing-list", _fields(b"Content-Length: 5, 6")),
    _bad("cl-differing-zero", _fields(b"Content-Length: 0", b"Content-Length: 00, 1")),
    _bad("cl-empty", _fields(b"Content-Length:")),
    _bad("cl-empty-element", _fields(b"Content-Length: 5,")),
    _bad("cl-negative", _fields(b"Content-Length: -5")),
    _bad("cl-plus", _fields(b"Content-Length: +5")),
    _bad("cl-hex", _fields(b"Content-Length: 0x5")),
    _bad("cl-space-inside", _fields(b"Content-Length: 5 5")),
    _bad("cl-decimal-point", _fields(b"Content-Length: 5.0")),
    _bad("cl-unicode-digit", _fields(b"Content-Length: \xd9\xa5")),
    _bad("cl-19-digits", _fields(b"Content-Length: 1000000000000000000")),
    _bad("obs-fold", _fields(b"X-A: a", b" folded")),
    _bad("obs-fold-tab", _fields(b"X-A: a", b"\tfolded: x")),
    _bad("obs-fold-first-line", b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n"),
    _bad("obs-fold-transfer-encoding", _fields(b"Transfer-Encoding:", b" chunked")),
    _bad("space-before-colon", _fields(b"Content-Length : 5")),
    _bad("tab-before-colon", _fields(b"Transfer-Encoding\t: chunked")),
    _bad("space-in-name", _fields(b"X Y: z")),
    _bad("empty-name", _fields(b": value")),
    _bad("no-colon", _fields(b"just text")),
    _bad("non-token-name", _fields(b"X(y): z")),
    _bad("obs-text-name", _fields(b"X-\xe9: z")),
    _bad("nul-in-value", _fields(b"X-A: a\x00b")),
    _bad("del-in-value", _fields(b"X-A: a\x7fb")),
    _bad("ctl-in-value", _fields(b"X-A: a\x01b")),
    _bad("esc-in-value", _fields(b"X-A: a\x1bb")),
    _bad("vt-in-value", _fields(b"X-A: a\x0bb")),
    _bad("ff-in-value", _fields(b"X-A: a\x0cb")),
    _bad("bare-cr-in-value", _fields(b"X-A: a\rb")),
    _bad("bare-cr-line-end", _fields(b"X-A: a\rX-B: b")),
    _bad("bare-cr-before-crlf", _fields(b"X-A: a\r")),
    _bad("bare-cr-in-name", _fields(b"X-\rA: b")),
    _bad("nul-in-name", _fields(b"X-\x00A: b")),
    _bad("bare-cr-request-line", b"GET / HTTP/1.1\rHost: example.com\r\n\r\n"),
    _bad("bare-lf-request-line", b"GET / HTTP/1.1\nHost: example.com\r\n\r\n"),
    _bad("bare-lf-field-line", b"GET / HTTP/1.1\r\nHost: example.com\nX-A: b\r\n\r\n"),
    _bad("bare-lf-smuggled-te", b"POST / HTTP/1.1\r\nHost: example.com\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: 5\r\n\r\n"),
    _bad("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: example.com\r\n\n"),
    _bad("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: example.com\n\n"),
    _bad("bare-lf-then-crlf", b"GET / HTTP/1.1\r\nHost: example.com\n\r\n"),
    _bad("lf-cr-lf-last", b"GET / HTTP/1.1\r\nHost: example.com\r\nX: y\n\r\n"),
    # Transfer-Encoding.
    _bad("te-gzip", _fields(b"Transfer-Encoding: gzip"), 501),
    _bad("te-gzip-chunked", _fields(b"Transfer-Encoding: gzip, chunked"), 501),
    _bad("te-chunked-gzip", _fields(b"Transfer-Encoding: chunked, gzip"), 501),
    _bad("te-identity", _fields(b"Transfer-Encoding: identity"), 501),
    _bad("te-chunked-params", _fields(b"Transfer-Encoding: chunked;q=1"), 501),
    _bad("te-two-lines-gzip", _fields(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"), 501),
    _bad("te-xchunked", _fields(b"Transfer-Encoding: xchunked"), 501),
    _bad("te-chunked-twice", _fields(b"Transfer-Encoding: chunked, chunked")),
    _bad("te-chunked-two-lines", _fields(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")),
    _bad("te-empty", _fields(b"Transfer-Encoding:")),
    _bad("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    _bad("te-in-http10-with-cl", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
    # Host (RFC 9112 §3.2).
    _bad("no-host", b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
    _bad("no-fields-at-all", b"GET / HTTP/1.1\r\n\r\n"),
    _bad("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
    _bad("two-hosts-http10", b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"),
    _bad("host-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    _bad("host-at", b"GET / HTTP/1.1\r\nHost: user@evil\r\n\r\n"),
    _bad("host-slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
    _bad("host-obs-text", b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n"),
    _bad("host-tab-inside", b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n"),
    # The request line (RFC 9112 §3).
    _bad("two-spaces", b"GET  / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("two-spaces-before-version", b"GET /  HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("leading-space", b" GET / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("trailing-space", b"GET / HTTP/1.1 \r\n" + H + b"\r\n"),
    _bad("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n"),
    _bad("missing-version", b"GET /\r\n" + H + b"\r\n"),
    _bad("missing-target", b"GET HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("only-method", b"GET\r\n" + H + b"\r\n"),
    _bad("tab-separators", b"GET\t/\tHTTP/1.1\r\n" + H + b"\r\n"),
    _bad("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("obs-text-target", b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("nul-target", b"GET /a\x00 HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("del-target", b"GET /a\x7f HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("non-token-method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("version-two-digits", b"GET / HTTP/1.10\r\n" + H + b"\r\n"),
    _bad("version-no-minor", b"GET / HTTP/1\r\n" + H + b"\r\n"),
    _bad("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    _bad("status-line-as-request", b"HTTP/1.1 200 OK\r\n" + H + b"\r\n"),
    # Request targets in none of the forms of RFC 9112 §3.2 (HAProxy answers 400 too).
    _bad("target-fragment", b"GET /item/7#frag HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-fragment-in-query", b"GET /a?b#c HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-fragment-only", b"GET /# HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-relative", b"GET rel/path HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-query-only", b"GET ?q=1 HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-dot-relative", b"GET ../admin HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-asterisk-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-asterisk-custom-method", b"M-SEARCH * HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-authority-not-connect", b"GET example.com:80 HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-ftp", b"GET ftp://example.com/x HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-no-slashes", b"GET http:/x HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-empty-host", b"GET http:///x HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-userinfo", b"GET http://user@evil.example/x HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-bad-host", b"GET http://ex<ample/x HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-fragment", b"GET http://example.com/x#y HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("target-absolute-no-host-field", b"GET http://example.com/x HTTP/1.1\r\n\r\n"),
    _bad("target-connect-bad-authority", b"CONNECT a@b:443 HTTP/1.1\r\n" + H + b"\r\n"),
    # A bare CR is not an empty line (RFC 9112 §2.2): before the request line it is rejected too.
    _bad("bare-cr-before-request-line", b"\rGET / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("cr-cr-lf-before-request-line", b"\r\r\nGET / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("crlf-then-bare-cr", b"\r\n\rGET / HTTP/1.1\r\n" + H + b"\r\n"),
    _bad("cr-cr-after-request-line", b"GET /x HTTP/1.0\r\r\n\r\n"),
    _bad("ctl-in-final-empty-line", b"GET / HTTP/1.1\r\n" + H + b"\x01\r\n\r\n"),
    # Versions (RFC 9110 §15.6.6).
    _bad("http2", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    _bad("http3", b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    _bad("http09", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    _bad("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    # Expect (RFC 9110 §10.1.1).
    _bad("expect-unknown", _fields(b"Expect: the-unexpected"), 417),
    _bad("expect-extra", _fields(b"Expect: 100-continue, foo"), 417),
    _bad("expect-params", _fields(b"Expect: 100-continue; x=y"), 417),
    _bad("expect-empty-and-other", _fields(b"Expect:", b"Expect: foo"), 417),
    # Limits.
    _bad("head-over-limit", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * LIMIT + b"\r\n\r\n", 431),
    _bad("head-one-over-limit", _exact_size(LIMIT + 1), 431),
    _bad("request-line-over-limit", b"GET /" + b"a" * LIMIT + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    _bad("many-small-fields", b"GET / HTTP/1.1\r\n" + H + b"X: y\r\n" * (LIMIT // 6) + b"\r\n", 431),
    _bad("small-limit", b"GET / HTTP/1.1\r\n" + H + b"\r\n", 431, 20),
    _bad("small-limit-request-line", b"GET /" + b"a" * 40 + b" HTTP/1.1\r\n" + H + b"\r\n", 414, 20),
    _bad("bare-lf-head-then-crlf-far-away", b"GET / HTTP/1.1\r\nHost: a\n\n" + b"x" * LIMIT + b"\r\n\r\n"),
]


# ---- responses -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resp:
    id: str
    raw: bytes
    status: int = 200
    minor: int = 1
    framing: int = LENGTH
    length: int = 0
    keep_alive: bool = True
    head_request: bool = False
    connection_tokens: Tuple[bytes, ...] = ()

    def expected(self) -> Dict[str, object]:
        return {"status": self.status, "minor": self.minor, "framing": self.framing, "length": self.length,
                "keep_alive": self.keep_alive, "connection_tokens": list(self.connection_tokens)}


def response_summary(r: ResponseHead) -> Dict[str, object]:
    return {"status": r.status, "minor": r.minor, "framing": r.framing, "length": r.length,
            "keep_alive": r.keep_alive, "connection_tokens": list(r.connection_tokens)}


CL5 = b"Content-Length: 5\r\n"

VALID_RESPONSES: List[Resp] = [
    Resp("ok-length", b"HTTP/1.1 200 OK\r\n" + CL5 + b"\r\n", length=5),
    Resp("length-zero", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    Resp("no-reason", b"HTTP/1.1 404 \r\n" + CL5 + b"\r\n", status=404, length=5),
    Resp("no-reason-no-sp", b"HTTP/1.1 500\r\n" + CL5 + b"\r\n", status=500, length=5),
    Resp("reason-with-spaces", b"HTTP/1.1 200 Very  OK\tindeed\xff\r\n" + CL5 + b"\r\n", length=5),
    Resp("unknown-status", b"HTTP/1.1 299 Whatever\r\n" + CL5 + b"\r\n", status=299, length=5),
    Resp("http12-is-11", b"HTTP/1.2 200 OK\r\n" + CL5 + b"\r\n", length=5),
    Resp("100-continue", b"HTTP/1.1 100 Continue\r\n\r\n", status=100, framing=NO_BODY),
    Resp("101-switching", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
         status=101, framing=NO_BODY, connection_tokens=(b"upgrade",)),
    Resp("103-early-hints", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", status=103,
         framing=NO_BODY),
    Resp("204-ignores-length", b"HTTP/1.1 204 No Content\r\n" + CL5 + b"\r\n", status=204, framing=NO_BODY),
    Resp("204-ignores-te", b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", status=204,
         framing=NO_BODY),
    Resp("304-ignores-length", b"HTTP/1.1 304 Not Modified\r\n" + CL5 + b"\r\n", status=304, framing=NO_BODY),
    Resp("head-keeps-length", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", framing=NO_BODY,
         head_request=True),
    Resp("head-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", framing=NO_BODY,
         head_request=True),
    Resp("head-no-framing", b"HTTP/1.1 200 OK\r\n\r\n", framing=NO_BODY, head_request=True),
    Resp("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", framing=CHUNKED),
    Resp("gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", framing=CHUNKED),
    Resp("gzip-then-chunked-lines", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n",
         framing=CHUNKED),
    Resp("te-gzip-close-delimited", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
         framing=CLOSE_DELIMITED, keep_alive=False),
    Resp("te-chunked-not-last", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
         framing=CLOSE_DELIMITED, keep_alive=False),
    Resp("cl-and-te", b"HTTP/1.1 200 OK\r\n" + CL5 + b"Transfer-Encoding: chunked\r\n\r\n", framing=CHUNKED,
         keep_alive=False),
    Resp("te-and-cl", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + CL5 + b"\r\n", framing=CHUNKED,
         keep_alive=False),
    Resp("no-framing", b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", framing=CLOSE_DELIMITED, keep_alive=False),
    Resp("no-fields", b"HTTP/1.1 200 OK\r\n\r\n", framing=CLOSE_DELIMITED, keep_alive=False),
    Resp("length-repeated", b"HTTP/1.1 200 OK\r\n" + CL5 + CL5 + b"\r\n", length=5),
    Resp("length-list", b"HTTP/1.1 200 OK\r\nContent-Length: 5,5\r\n\r\n", length=5),
    Resp("connection-close", b"HTTP/1.1 200 OK\r\n" + CL5 + b"Connection: close\r\n\r\n", length=5,
         keep_alive=False, connection_tokens=(b"close",)),
    Resp("connection-tokens", b"HTTP/1.1 200 OK\r\n" + CL5 + b"Connection: X-A, Close\r\nX-A: 1\r\n\r\n",
         length=5, keep_alive=False, connection_tokens=(b"x-a", b"close")),
    Resp("http10", b"HTTP/1.0 200 OK\r\n" + CL5 + b"\r\n", minor=0, length=5, keep_alive=False),
    Resp("http10-keep-alive", b"HTTP/1.0 200 OK\r\n" + CL5 + b"Connection: keep-alive\r\n\r\n", minor=0,
         length=5, keep_alive=True, connection_tokens=(b"keep-alive",)),
    Resp("http10-close-delimited", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", minor=0,
         framing=CLOSE_DELIMITED, keep_alive=False, connection_tokens=(b"keep-alive",)),
    Resp("http10-te-faulty-framing", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
         minor=0, framing=CHUNKED, keep_alive=False, connection_tokens=(b"keep-alive",)),
    Resp("leading-crlf", b"\r\nHTTP/1.1 200 OK\r\n" + CL5 + b"\r\n", length=5),
    Resp("obs-text-value", b"HTTP/1.1 200 OK\r\n" + CL5 + b"X-N: \x80\xfe\r\n\r\n", length=5),
]

BadResp = Tuple[str, bytes, int, int]  # id, raw, status, limit

INVALID_RESPONSES: List[BadResp] = [
    ("cl-differing-lines", b"HTTP/1.1 200 OK\r\n" + CL5 + b"Content-Length: 6\r\n\r\n", 502, LIMIT),
    ("cl-differing-list", b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n", 502, LIMIT),
    ("cl-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", 502, LIMIT),
    ("cl-hex", b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n", 502, LIMIT),
    ("chunked-twice", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 502, LIMIT),
    ("garbage", b"\x00\x01garbage\r\n\r\n", 502, LIMIT),
    ("html", b"<html><body>oops</body></html>\r\n\r\n", 502, LIMIT),
    ("lowercase-http", b"http/1.1 200 OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("http2", b"HTTP/2 200\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("http20", b"HTTP/2.0 200 OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("two-digit-status", b"HTTP/1.1 20 OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("four-digit-status", b"HTTP/1.1 2000 OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("status-below-100", b"HTTP/1.1 099 Odd\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("status-letters", b"HTTP/1.1 2OO OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("missing-status", b"HTTP/1.1\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("double-space", b"HTTP/1.1  200 OK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("nul-in-reason", b"HTTP/1.1 200 O\x00K\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("bare-cr-in-reason", b"HTTP/1.1 200 O\rK\r\n" + CL5 + b"\r\n", 502, LIMIT),
    ("bare-lf-status-line", b"HTTP/1.1 200 OK\n" + CL5 + b"\r\n", 502, LIMIT),
    ("bare-lf-end", b"HTTP/1.1 200 OK\r\n" + b"Content-Length: 5\n\n", 502, LIMIT),
    ("obs-fold", b"HTTP/1.1 200 OK\r\n" + CL5 + b"X-A: a\r\n b\r\n\r\n", 502, LIMIT),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n", 502, LIMIT),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\n" + CL5 + b"X-A: \x00\r\n\r\n", 502, LIMIT),
    ("no-colon", b"HTTP/1.1 200 OK\r\n" + CL5 + b"nonsense\r\n\r\n", 502, LIMIT),
    ("over-limit", b"HTTP/1.1 200 OK\r\n" + CL5 + b"X-Big: " + b"b" * LIMIT + b"\r\n\r\n", 431, LIMIT),
]


# ---- chunked bodies ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunked:
    id: str
    raw: bytes
    data: bytes
    trailers: bytes = b""


VALID_CHUNKED: List[Chunked] = [
    Chunked("empty", b"0\r\n\r\n", b""),
    Chunked("one", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    Chunked("two", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    Chunked("hex-cases", b"a\r\n0123456789\r\nB\r\n0123456789a\r\n0\r\n\r\n", b"0123456789" * 2 + b"a"),
    Chunked("leading-zeros", b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
    Chunked("sixteen-digits", b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),
    Chunked("crlf-in-data", b"7\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n", b"\r\n0\r\n\r\n"),
    Chunked("request-in-data", b"1e\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n",
            b"GET /admin HTTP/1.1\r\nHost: x\r\n"),
    Chunked("binary-data", b"4\r\n\x00\xff\n\r\r\n0\r\n\r\n", b"\x00\xff\n\r"),
    Chunked("extension", b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    Chunked("extensions-bws", b"5 ; a = b ;c\t;d=\"q\"\r\nhello\r\n0\r\n\r\n", b"hello"),
    Chunked("extension-quoted", b"5;q=\"a \\\" ; \\\\ \xff\"\r\nhello\r\n0\r\n\r\n", b"hello"),
    Chunked("trailing-ows", b"5 \t\r\nhello\r\n0 \r\n\r\n", b"hello"),
    Chunked("trailers", b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Other:\t d \r\n\r\n", b"hello",
            b"X-Checksum: abc\r\nX-Other:\t d \r\n"),
    Chunked("trailer-empty-value", b"0\r\nX-E:\r\n\r\n", b"", b"X-E:\r\n"),
    Chunked("many-chunks", b"".join(b"1\r\n%c\r\n" % c for c in b"abcdefghij") + b"0\r\n\r\n", b"abcdefghij"),
]

BadChunked = Tuple[str, bytes]  # all are 400 (or error_status)

_LONG_EXT = b"5" + b";a=b" * 1100 + b"\r\nhello\r\n0\r\n\r\n"

INVALID_CHUNKED: List[BadChunked] = [
    ("hex-overflow", b"10000000000000000\r\n"),
    ("hex-overflow-leading-zeros", b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n"),
    ("two-numbers", b"5 5\r\nhello\r\n0\r\n\r\n"),
    ("leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("not-hex", b"g\r\nhello\r\n0\r\n\r\n"),
    ("underscore", b"1_0\r\n"),
    ("bare-lf-size", b"5\nhello\r\n0\r\n\r\n"),
    ("bare-cr-size", b"5\rhello\r\n0\r\n\r\n"),
    ("cr-cr-lf", b"5\r\r\nhello\r\n0\r\n\r\n"),
    ("nul-in-size-line", b"5\x00\r\nhello\r\n0\r\n\r\n"),
    ("data-too-long", b"5\r\nhello!\r\n0\r\n\r\n"),
    ("data-too-short", b"5\r\nhell\r\n0\r\n\r\n"),
    ("data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    ("data-no-crlf", b"5\r\nhello0\r\n\r\n"),
    ("empty-extension", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("extension-no-name", b"5;=x\r\nhello\r\n0\r\n\r\n"),
    ("extension-no-value", b"5;a=\r\nhello\r\n0\r\n\r\n"),
    ("extension-unterminated-quote", b"5;a=\"x\r\nhello\r\n0\r\n\r\n"),
    ("extension-space-in-name", b"5;a b\r\nhello\r\n0\r\n\r\n"),
    ("extension-ctl", b"5;a=\x01\r\nhello\r\n0\r\n\r\n"),
    ("size-line-too-long", _LONG_EXT),
    ("last-chunk-bare-lf", b"0\n\r\n"),
    ("last-chunk-no-final-crlf", b"0\r\nX\r\n"),
    ("trailer-bare-lf", b"0\r\nX: y\n\r\n"),
    ("trailer-final-bare-lf", b"0\r\nX: y\r\n\n"),
    ("trailer-obs-fold", b"0\r\nX: y\r\n z\r\n\r\n"),
    ("trailer-space-before-colon", b"0\r\nX : y\r\n\r\n"),
    ("trailer-no-colon", b"0\r\nnonsense\r\n\r\n"),
    ("trailer-empty-name", b"0\r\n: y\r\n\r\n"),
    ("trailer-nul", b"0\r\nX: a\x00b\r\n\r\n"),
    ("trailer-bare-cr", b"0\r\nX: a\rb\r\n\r\n"),
    ("trailer-del", b"0\r\nX: a\x7fb\r\n\r\n"),
]


# ---- drivers -------------------------------------------------------------------------------------------
def chunkings(data: bytes, trailing: bytes = b"") -> Dict[str, List[bytes]]:
    """The ways a message (followed by ``trailing``) can arrive."""
    both = data + trailing
    half = len(data) // 2
    ways = {
        "whole": [both],
        "bytewise": [both[i:i + 1] for i in range(len(both))],
        "halves": [data[:half], data[half:] + trailing],
        "pairs": [both[i:i + 2] for i in range(0, len(both), 2)],
    }
    if trailing:
        ways["message-then-trailing"] = [data, trailing]
    return ways


@dataclass
class HeadResult:
    """What a HeadBuffer made of a byte stream: a head and the bytes after it, an error status, or
    nothing yet (``head`` None, ``rest`` what it holds)."""

    head: Optional[bytes] = None
    rest: bytes = b""
    error: Optional[int] = None
    max_held: int = 0
    held_after_none: List[int] = field(default_factory=list)


def run_head_buffer(chunks: List[bytes], limit: int, how: str, kind: int = REQUEST) -> HeadResult:
    """Feed ``chunks`` to a fresh HeadBuffer with ``feed`` or ``split`` until a head comes out."""
    hb = HeadBuffer(limit, kind)
    res = HeadResult()
    for i, chunk in enumerate(chunks):
        try:
            if how == "feed":
                head = hb.feed(chunk)
                rest = bytes(hb.buf) if head is not None else b""
            else:
                got = hb.split(chunk)
                head, rest = got if got is not None else (None, b"")
                if got is not None:
                    assert len(hb) == 0, "split must leave nothing buffered"
        except ProtocolError as exc:
            res.error = exc.status
            return res
        res.max_held = max(res.max_held, len(hb))
        if head is not None:
            res.head = head
            res.rest = rest + b"".join(chunks[i + 1:])
            return res
        res.held_after_none.append(len(hb))
    res.rest = bytes(hb.buf)
    return res


Parsed = Union[Tuple[str, Dict[str, object], bytes, bytes], Tuple[str, int], Tuple[str, bytes]]


def parse_stream(chunks: List[bytes], limit: int, how: str,
                 parse: Callable[[bytes], Union[RequestHead, ResponseHead]],
                 summary: Callable[..., Dict[str, object]], kind: int = REQUEST) -> Parsed:
    """HeadBuffer then the parser: ("ok", summary, head, rest), ("error", status) or ("incomplete", held)."""
    res = run_head_buffer(chunks, limit, how, kind)
    if res.error is not None:
        return ("error", res.error)
    if res.head is None:
        return ("incomplete", res.rest)
    try:
        parsed = parse(res.head)
    except ProtocolError as exc:
        return ("error", exc.status)
    return ("ok", summary(parsed), res.head, res.rest)


def all_ways(data: bytes, trailing: bytes, limit: int,
             parse: Callable[[bytes], Union[RequestHead, ResponseHead]],
             summary: Callable[..., Dict[str, object]]) -> Iterator[Tuple[str, Parsed]]:
    kind = RESPONSE if summary is response_summary else REQUEST
    for name, chunks in chunkings(data, trailing).items():
        for how in ("feed", "split"):
            yield "%s/%s" % (name, how), parse_stream(chunks, limit, how, parse, summary, kind)


def parse_request(head: bytes) -> RequestHead:
    return parse_request_head(head)


def response_parser(head_request: bool) -> Callable[[bytes], ResponseHead]:
    def parse(head: bytes) -> ResponseHead:
        return parse_response_head(head, head_request)
    return parse
