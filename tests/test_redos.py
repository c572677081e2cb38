"""Every regular expression balrs runs on what a client, a backend or an admin user sends is linear in its
input (issue: one 224-byte request froze the event loop for 14 s by catastrophic backtracking).

Each test builds adversarial inputs of many shapes, up to the size limits, and parses them; a linear parse
of 64 KiB takes a few milliseconds, the super-linear ones it replaced took seconds to minutes, so the
bound of 0.1 s per parse cannot flake yet catches any super-linear case. ``test_every_pattern_is_audited``
fails when a new regular expression appears without being added here (and reasoned about where it is
defined).
"""

from __future__ import annotations

import importlib
import re
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

import balrs
from balrs.http.chunked import MAX_CHUNK_LINE, ChunkedDecoder
from balrs.http.errors import ProtocolError
from balrs.http.heads import REQUEST, RESPONSE, HeadBuffer, parse_request_head, parse_response_head

# max_header_bytes' default (64k) and the largest response head balrs reads (server.MAX_RESPONSE_HEAD).
LIMIT = 65536
BOUND = 0.5  # seconds for one parse of one input: linear parses take a few milliseconds (more on a busy
# machine), a quadratic one of 64 KiB takes billions of steps (tens of seconds)


def _timed(fn: Callable[[bytes], object], data: bytes) -> float:
    start = time.perf_counter()
    try:
        fn(data)
    except ProtocolError:
        pass
    return time.perf_counter() - start


def _worst(fn: Callable[[bytes], object], inputs: Iterator[bytes]) -> Tuple[float, bytes]:
    worst = (0.0, b"")
    n = 0
    for data in inputs:
        n += 1
        took = _timed(fn, data)
        if took > worst[0]:
            worst = (took, data)
    assert n, "no input generated"
    return worst


def _assert_linear(fn: Callable[[bytes], object], inputs: Iterator[bytes]) -> None:
    took, data = _worst(fn, inputs)
    assert took < BOUND, "%.3fs for %d bytes: %r..." % (took, len(data), data[:120])


# Names that have a branch of their own in the head patterns (in several spellings), near misses of them,
# and ordinary names.
NAMES = [
    b"Host", b"host", b"HOST", b"Via", b"TE", b"Trailer", b"Keep-Alive", b"Connection", b"Content-Length",
    b"Transfer-Encoding", b"Upgrade", b"Expect", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host",
    b"Proxy-Connection", b"Hostx", b"Content-Lengthx", b"T", b"X", b"C", b"Connectio", b"X-Forwarded-",
    b"Cookie", b"Accept", b"a",
]
VALUES = [b" a", b"", b" ", b" \t ", b"1", b" chunked", b" close, keep-alive", b":"]
# What makes the head fail after the repeated lines (or, for the last ones, makes it valid or incomplete).
TAILS = [b"bad\r\n\r\n", b"\x01\r\n\r\n", b"X : y\r\n\r\n", b" fold\r\n\r\n", b"\r\r\n", b"\r\n", b""]
BLANKS = [b" ", b"\t", b" \t"]


def _repeated_lines(start: bytes) -> Iterator[bytes]:
    """The exponential shape: N lines that more than one branch could take, then a bad line. 48 lines are
    2**48 ways for an exponential pattern; the same up to the size limit catches a quadratic one."""
    for name in NAMES:
        for value in VALUES:
            line = name + b":" + value + b"\r\n"
            for tail in TAILS:
                yield start + b"Host: a\r\n" + line * 48 + tail
            yield start + b"Host: a\r\n" + line * ((LIMIT - 200) // len(line)) + TAILS[len(value) % 3]


def _blank_runs(start: bytes) -> Iterator[bytes]:
    """The quadratic shape: long runs of blanks around a value that a repetition could split many ways."""
    for name in NAMES:
        for ws in BLANKS:
            run = ws * (LIMIT // 3 // len(ws))
            for middle in (b"", b"a", b"a" + ws * 500 + b"b", b"a:b"):
                for tail in (b"\x01\r\n\r\n", b"\r\n", b"\rx\r\n\r\n", b"\r\n\r\n", b"\r\nbad\r\n\r\n"):
                    yield start + name + b":" + run + middle + run + tail


def _odd_lines(start: bytes) -> Iterator[bytes]:
    yield start + b"a" * LIMIT + b"\r\n\r\n"
    yield start + b"a:" * (LIMIT // 2) + b"\r\n\r\n"
    yield start + b":" * LIMIT + b"\r\n\r\n"
    yield start + b"a: b\r\n" * (LIMIT // 6) + b"\r\n\r\n\x01"
    yield start + b"a:\r\n" * (LIMIT // 4) + b"\r\n"
    yield start + b"\r\n" * (LIMIT // 2) + b"x"
    yield start + b" " * LIMIT + b"\r\n\r\n"
    yield start + (b"Host: a\r\nVia: a\r\n" + b"Via: \t\r\n" * 3) * (LIMIT // 50) + b"bad\r\n\r\n"


REQUEST_STARTS = [b"GET / HTTP/1.1\r\n", b"GET http://a/ HTTP/1.0\r\n"]
RESPONSE_STARTS = [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 599 \r\n"]


def test_the_reported_heads_parse_at_once():
    """The issue's cases: 24 Via lines then a bad one (14 s before), Host with 60,000 blanks then a
    control byte (34 s), a response with 24 Keep-Alive lines (3.5 s)."""
    cases = [
        (parse_request_head, b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Via: a\r\n" * 24 + b"bad\r\n\r\n"),
        (parse_request_head, b"GET / HTTP/1.1\r\nHost:" + b" " * 60000 + b"\x01\r\n\r\n"),
        (parse_response_head, b"HTTP/1.1 200 OK\r\n" + b"Keep-Alive: a\r\n" * 24 + b"bad\r\n\r\n"),
        (parse_request_head, b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Content-Length: 1\r\n" * 30 + b"bad\r\n\r\n"),
    ]
    for fn, data in cases:
        took = _timed(fn, data)
        assert took < BOUND, (took, data[:60])
        with pytest.raises(ProtocolError) as exc:
            fn(data)
        assert exc.value.status in (400, 502)


@pytest.mark.parametrize("start", REQUEST_STARTS)
def test_request_heads_repeated_lines(start):
    _assert_linear(parse_request_head, _repeated_lines(start))


@pytest.mark.parametrize("start", RESPONSE_STARTS)
def test_response_heads_repeated_lines(start):
    _assert_linear(parse_response_head, _repeated_lines(start))


@pytest.mark.parametrize("start", REQUEST_STARTS)
def test_request_heads_blank_runs(start):
    _assert_linear(parse_request_head, _blank_runs(start))


@pytest.mark.parametrize("start", RESPONSE_STARTS)
def test_response_heads_blank_runs(start):
    _assert_linear(parse_response_head, _blank_runs(start))


def test_odd_lines_and_start_lines():
    for start in REQUEST_STARTS:
        _assert_linear(parse_request_head, _odd_lines(start))
    for start in RESPONSE_STARTS:
        _assert_linear(parse_response_head, _odd_lines(start))

    def request_lines() -> Iterator[bytes]:
        for target in (b"/" * LIMIT, b"/a " * (LIMIT // 3), b"http://" + b"a" * LIMIT,
                       b"http://a" + b"/" * LIMIT + b"#", b"*" * LIMIT, b"%" * LIMIT, b"h" * LIMIT + b"://",
                       b"http:" + b"/" * LIMIT, b"#" * LIMIT, b"http://" + b"@" * LIMIT + b"/"):
            for rest in (b" HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1\r\nHost: a\r\n\r\n", b" HTTP/1.1 \r\n\r\n"):
                yield b"GET " + target + rest
        yield b"G" * LIMIT + b" / HTTP/1.1\r\n\r\n"
        yield b"GET" + b" " * LIMIT + b"/ HTTP/1.1\r\n\r\n"

    def status_lines() -> Iterator[bytes]:
        yield b"HTTP/1.1 200 " + b" " * LIMIT + b"\x01\r\n\r\n"
        yield b"HTTP/1.1 200" + b" " * LIMIT + b"\r\n\r\n"
        yield b"HTTP/1.1 " + b"2" * LIMIT + b"\r\n\r\n"

    _assert_linear(parse_request_head, request_lines())
    _assert_linear(parse_response_head, status_lines())


@pytest.mark.parametrize("kind", [REQUEST, RESPONSE])
def test_head_buffer_checks_are_linear(kind):
    """A head arriving in pieces is checked as it arrives (early rejection): each byte a bounded number
    of times, so the whole head costs what one parse does, whatever the piece size."""
    start = REQUEST_STARTS[0] if kind == REQUEST else RESPONSE_STARTS[0]
    shapes = [
        start + b"Via: a\r\n" * (LIMIT // 9),
        start + b"Host:" + b" " * (LIMIT - 40),
        start + b"X: " + b"a" * (LIMIT - 40),
        start + b"X: a\ra" + b"a" * (LIMIT - 40),
        b"\r\n" * (LIMIT // 2),
    ]
    for data in shapes:
        for piece in (1024, 4096):
            hb = HeadBuffer(LIMIT, kind)
            took = 0.0
            for i in range(0, len(data), piece):
                t0 = time.perf_counter()
                try:
                    hb.feed(data[i:i + piece])
                except ProtocolError:
                    break
                took += time.perf_counter() - t0
            assert took < BOUND, (took, piece, data[:60])


def test_chunk_size_lines():
    def feed(data: bytes) -> None:
        ChunkedDecoder().feed(data, [])

    def lines() -> Iterator[bytes]:
        for ext in (b";a", b";a=b", b" ;a", b"; a = b", b';a="' + b'\\"' * 10 + b'"', b";a=", b" \t", b";",
                    b"; \t", b';a=" \\', b"=", b";a ;b=c \t"):
            line = b"5" + ext * ((MAX_CHUNK_LINE - 10) // len(ext))
            for tail in (b"\r\n", b"\x01\r\n", b" x\r\n", b"=\r\n", b'"\r\n', b"\r\r\n"):
                yield line + tail
        yield b"5;a=\"" + b"\\a" * (MAX_CHUNK_LINE // 2 - 8) + b"\r\n"
        yield b"5" + b" " * (MAX_CHUNK_LINE - 10) + b"\x01\r\n"
        yield b"0" * (MAX_CHUNK_LINE - 2) + b"\r\n"
        # Trailer sections up to their limit.
        yield b"0\r\n" + b"X: y\r\n" * (LIMIT // 6) + b"\x01\r\n"
        yield b"0\r\n" + b"X:" + b" " * LIMIT + b"\r\n\r\n"

    _assert_linear(feed, lines())


def test_config_patterns():
    """Not reachable from the network, but an operator's file (or --listen) deserves no surprise either."""
    from balrs import config

    probes = [b"1" * 5000 + b"x", b"." * 5000, b"1." * 2500 + b"x", b"1" + b" " * 5000 + b"-" + b" " * 5000 + b"x",
              b" " * 10000 + b";", b"a" * 10000 + b"\x00", b"-" * 10000]
    for name in ("_DURATION_RE", "_SIZE_RE", "_DIGITS_RE", "_TOKEN_RE", "_HOST_LABEL_RE", "_BACKEND_NAME_RE",
                 "_EXPECT_RE", "_INLINE_COMMENT_RE"):
        pattern = getattr(config, name)
        for probe in probes:
            text = probe.decode()
            for op in (pattern.fullmatch, pattern.match, pattern.search):
                t0 = time.perf_counter()
                op(text)
                assert time.perf_counter() - t0 < BOUND, (name, text[:40])


def test_python_strategy_pattern():
    """``strategy = package.module:Name``, checked with fullmatch (never searched)."""
    from balrs import config

    for text in ("a" * 60000 + "!", "a." * 30000 + "!", "a:" + "b." * 30000 + "!", "a" * 30000 + ":" + "b" * 30000
                 + ":", "_" * 60000, ".:" * 30000, "a.a:" * 15000):
        for op in (config._PYTHON_STRATEGY_RE.fullmatch, config._PYTHON_STRATEGY_RE.match):
            t0 = time.perf_counter()
            op(text)
            assert time.perf_counter() - t0 < BOUND, text[:40]


# Every compiled pattern in balrs, by module and name, and the test above that covers it.
AUDITED = {
    ("balrs.http.heads", "_REQUEST_LINE"): "test_odd_lines_and_start_lines (error path, early checks)",
    ("balrs.http.heads", "_STATUS_LINE"): "test_odd_lines_and_start_lines",
    ("balrs.http.heads", "_FIELD_NAME"): "test_head_buffer_checks_are_linear",
    ("balrs.http.heads", "_ABSOLUTE_FORM"): "test_odd_lines_and_start_lines",
    ("balrs.http.heads", "_LEADING_EMPTY_LINES"): "test_head_buffer_checks_are_linear",
    ("balrs.http.heads", "_BARE_CR"): "test_head_buffer_checks_are_linear",
    ("balrs.http.heads", "_BARE_LF"): "test_head_buffer_checks_are_linear",
    ("balrs.http.heads", "_REQUEST_HEAD"): "test_request_heads_*",
    ("balrs.http.heads", "_RESPONSE_HEAD"): "test_response_heads_*",
    ("balrs.http.chunked", "_CHUNK_LINE"): "test_chunk_size_lines",
    ("balrs.config", "_DURATION_RE"): "test_config_patterns",
    ("balrs.config", "_SIZE_RE"): "test_config_patterns",
    ("balrs.config", "_DIGITS_RE"): "test_config_patterns",
    ("balrs.config", "_TOKEN_RE"): "test_config_patterns",
    ("balrs.config", "_HOST_LABEL_RE"): "test_config_patterns",
    ("balrs.config", "_BACKEND_NAME_RE"): "test_config_patterns",
    ("balrs.config", "_EXPECT_RE"): "test_config_patterns",
    ("balrs.config", "_INLINE_COMMENT_RE"): "test_config_patterns",
    # Linear under fullmatch (its only use): each repeated group starts with "." or ":", which the
    # identifier class excludes, so there is one way to match.
    ("balrs.config", "_PYTHON_STRATEGY_RE"): "test_python_strategy_pattern",
    # Linear: one fixed octet, then a bounded or single-class repetition each.
    ("balrs.config", "_PERCENT_RE"): "test_route_patterns",
    ("balrs.config", "_PLACEHOLDER_RE"): "test_route_patterns",
    ("balrs.config", "_URL_SCHEME_RE"): "test_route_patterns",
    ("balrs.config", "_STATUS_RE"): "test_route_patterns",
    # Linear: alternatives of one or two fixed octets.
    ("balrs.http.paths", "_SUSPECT"): "test_route_patterns",
    # Linear: "{", one of five fixed words, "}".
    ("balrs.routing", "_PLACEHOLDER"): "test_route_patterns",
    # Linear under fullmatch (their only use): one character class repeated; the path's optional groups
    # each start with "/", which the name class excludes, then a fixed word.
    ("balrs.adminapi", "_NAME"): "test_admin_api_patterns",
    ("balrs.adminapi", "_PATH"): "test_admin_api_patterns",
}


def test_admin_api_patterns():
    """The admin API's path and name patterns on long hostile input (a write's path and JSON name)."""
    import balrs.adminapi as A
    for text in ("a" * 60000, "a" * 60000 + " ", "a:" * 30000 + "/"):
        t0 = time.perf_counter()
        A._NAME.fullmatch(text)
        assert time.perf_counter() - t0 < BOUND
    for raw in (b"/api/backends/" + b"a" * 60000 + b"/drai", b"/api/backends/" + b"a/" * 30000,
                b"/api/backends" + b"/" * 60000, b"/api/backends/" + b"a" * 60000 + b"/weight/x"):
        t0 = time.perf_counter()
        A._PATH.fullmatch(raw)
        assert time.perf_counter() - t0 < BOUND, raw[:30]


def test_route_patterns():
    """The patterns of [route] values, path normalisation and redirect templates, on long hostile text."""
    import balrs.config as C
    import balrs.http.paths as P
    import balrs.routing as R
    texts = ["%" * 60000, "%4" * 30000, "{" * 60000, "{" * 30000 + "}" * 30000, "{host" * 12000,
             "a" * 60000 + ":", "a+" * 30000, "9" * 60000]
    # How balrs uses each: the scanning ones with finditer/sub, the anchored ones with match/fullmatch
    # (a search of "[A-Za-z][A-Za-z0-9+.-]*:" would be quadratic, and is never made).
    scanning = (C._PERCENT_RE, C._PLACEHOLDER_RE, R._PLACEHOLDER)
    anchored = (C._URL_SCHEME_RE, C._STATUS_RE)
    for pattern in scanning + anchored:
        for text in texts:
            t0 = time.perf_counter()
            pattern.fullmatch(text)
            pattern.match(text)
            if pattern in scanning:
                list(pattern.finditer(text))
            assert time.perf_counter() - t0 < BOUND, (pattern.pattern, text[:20])
    for raw in (b"/" * 60000, b"/." * 30000, b"%" * 60000, b"/%2e%2e" * 8000, b"\\" * 60000):
        t0 = time.perf_counter()
        P._SUSPECT.search(raw)
        try:
            P.normalise_target(b"/a" + raw)
        except Exception:
            pass
        assert time.perf_counter() - t0 < BOUND, raw[:20]


def _balrs_modules() -> List[str]:
    """Every module of the package, found by path (balrs.http has no __init__.py)."""
    root = Path(balrs.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def test_every_pattern_is_audited():
    found = set()
    for name in _balrs_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, re.Pattern):
                found.add((name, attr))
    assert found == set(AUDITED), "audit these patterns for linearity: %s" % sorted(found ^ set(AUDITED))
