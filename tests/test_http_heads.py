"""Tests for balrs.http.heads: HeadBuffer and the request/response head parsers.

Every case of the shared tables (tests/http_cases.py) is fed whole, byte by byte, in halves, in pairs and
with trailing bytes, through both ``HeadBuffer.feed`` and ``HeadBuffer.split``, and must come out the same
(STYLE habit 12; h11's ``tests/test_io.py``). Cost is checked by counting the bytes ``find`` is asked to
scan, never with a timer. The fuzz tests assert that only ProtocolError escapes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balrs.http.errors import ProtocolError
from balrs.http.heads import (
    CHUNKED, LENGTH, NO_BODY, RESPONSE, HeadBuffer, RequestHead, ResponseHead, match_response_head,
    parse_request_head, parse_response_head, response_from_match, simple_response,
)
from http_cases import (
    INVALID_REQUESTS, INVALID_RESPONSES, LIMIT, NEXT_REQUEST, RESPONSE_TRAILING, TRAILING, VALID_REQUESTS,
    VALID_RESPONSES, BadResp, Parsed, Resp, all_ways, chunkings, parse_request, parse_stream, request_summary,
    response_parser, response_summary, run_head_buffer,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the request table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VALID_REQUESTS, ids=lambda c: c.id)
def test_valid_request(case):
    for trailing, after in TRAILING.items():
        want = ("ok", case.expected(), case.head, after)
        for way, got in all_ways(case.raw, after, case.limit, parse_request, request_summary):
            assert got == want, (trailing, way)


@pytest.mark.parametrize("case", INVALID_REQUESTS, ids=lambda c: c[0])
def test_invalid_request(case):
    _id, raw, status, limit = case
    for trailing in ("none", "partial-next", "next"):
        for way, got in all_ways(raw, TRAILING[trailing], limit, parse_request, request_summary):
            assert got == ("error", status), (trailing, way)


def test_case_ids_unique():
    for table in (VALID_REQUESTS, VALID_RESPONSES):
        ids = [c.id for c in table]
        assert len(ids) == len(set(ids))
    for bad in (INVALID_REQUESTS, INVALID_RESPONSES):
        ids = [c[0] for c in bad]
        assert len(ids) == len(set(ids))


def test_parse_request_head_directly_matches_table():
    """The parser alone (no HeadBuffer) agrees with the table for every head it is handed."""
    for case in VALID_REQUESTS:
        assert request_summary(parse_request_head(case.head)) == case.expected(), case.id


@pytest.mark.parametrize("case", VALID_REQUESTS, ids=lambda c: c.id)
def test_request_fields_kept_as_received(case):
    r = parse_request_head(case.head)
    assert r.raw == case.head
    assert len(r.names) == len(r.values) == len(r.lnames)
    assert r.lnames == [n.lower() for n in r.names]
    for name, value in zip(r.names, r.values):
        # Names are as received; values have their surrounding OWS removed and appear in the head.
        assert name + b":" in r.raw
        assert value == value.strip(b" \t")
        assert value in r.raw
    if r.host is not None and not r.absolute:
        assert r.header(b"host") == r.host
    assert r.header(b"no-such-field") is None
    assert repr(r).startswith("<RequestHead ")
    assert r.idempotent == (r.method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def test_header_combines_repeated_fields():
    r = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\nX: 1\r\naccept: b\r\n\r\n")
    assert r.header(b"accept") == b"a, b"
    assert r.header(b"x") == b"1"


def test_pipelined_requests_all_ways():
    """All bodiless table requests back to back come out one by one, in order, whatever the segmentation."""
    cases = [c for c in VALID_REQUESTS if c.framing == NO_BODY and c.limit == LIMIT and len(c.raw) < 1000]
    stream = b"".join(c.raw for c in cases)
    want = [c.head for c in cases]
    for name, chunks in chunkings(stream, NEXT_REQUEST[:10]).items():
        hb = HeadBuffer(LIMIT)
        heads: List[bytes] = []
        for chunk in chunks:
            head = hb.feed(chunk)
            while head is not None:
                heads.append(head)
                head = hb.pop_head()
        assert heads == want, name
        assert bytes(hb.buf) == NEXT_REQUEST[:10], name
        assert [request_summary(parse_request_head(h)) for h in heads] == [c.expected() for c in cases]


def test_request_then_body_stays_in_buffer():
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"
    body = bytes(range(256)) * 400
    hb = HeadBuffer(LIMIT)
    assert hb.feed(head + body) == head
    assert hb.take() == body
    assert len(hb) == 0 and hb._scanned == 0
    hb2 = HeadBuffer(LIMIT)
    assert hb2.split(head + body) == (head, body)
    assert len(hb2) == 0


# ---- the response table --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VALID_RESPONSES, ids=lambda c: c.id)
def test_valid_response(case):
    parse = response_parser(case.head_request)
    for trailing, after in RESPONSE_TRAILING.items():
        want = ("ok", case.expected(), case.raw.lstrip(b"\r\n"), after)
        for way, got in all_ways(case.raw, after, LIMIT, parse, response_summary):
            assert got == want, (trailing, way)


FRAMING_ONLY = {"cl-differing-lines", "cl-differing-list", "cl-negative", "cl-hex", "chunked-twice"}


@pytest.mark.parametrize("case", INVALID_RESPONSES, ids=lambda c: c[0])
def test_invalid_response(case):
    id_, raw, status, limit = case
    # A response to HEAD has no body whatever its framing fields say (RFC 9112 §6.3 step 1).
    for head_request in (False,) if id_ in FRAMING_ONLY else (False, True):
        parse = response_parser(head_request)
        for trailing in ("none", "body", "next"):
            for way, got in all_ways(raw, RESPONSE_TRAILING[trailing], limit, parse, response_summary):
                assert got == ("error", status), (trailing, way)


@pytest.mark.parametrize("case", VALID_RESPONSES, ids=lambda c: c.id)
def test_response_fields(case):
    r = parse_response_head(case.raw.lstrip(b"\r\n"), case.head_request)
    assert r.raw[r.line_end - 2:r.line_end] == b"\r\n"
    assert r.raw[:r.line_end].count(b"\r\n") == 1
    assert r.lnames == [n.lower() for n in r.names]
    assert repr(r) == "<ResponseHead %d HTTP/1.%d>" % (r.status, r.minor)


@pytest.mark.parametrize("id_", sorted(FRAMING_ONLY))
def test_bodiless_responses_ignore_framing_fields(id_):
    raw = dict((c[0], c[1]) for c in INVALID_RESPONSES)[id_]
    assert parse_response_head(raw, head_request=True).framing == NO_BODY
    for status in (b"204 No Content", b"304 Not Modified", b"101 Switching Protocols", b"103 Early Hints"):
        r = parse_response_head(raw.replace(b"200 OK", status))
        assert r.framing == NO_BODY and r.length == 0


def test_response_head_request_flag_only_changes_framing():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"
    assert parse_response_head(raw).framing == LENGTH
    assert parse_response_head(raw, True).framing == NO_BODY
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_response_head(raw).framing == CHUNKED
    assert parse_response_head(raw, head_request=True).framing == NO_BODY


# ---- HeadBuffer details --------------------------------------------------------------------------------
def test_empty_and_crlf_only_input():
    hb = HeadBuffer(LIMIT)
    assert hb.feed(b"") is None
    assert hb.split(b"") is None
    assert hb.pop_head() is None
    # RFC 9112 §2.2: empty lines before a request line are ignored, and never count against the limit.
    for _ in range(3 * LIMIT):
        assert hb.feed(b"\r\n") is None
    assert len(hb) == 0
    assert hb.feed(b"\r\n" * LIMIT + b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def test_incomplete_head_is_held_and_completed_later():
    hb = HeadBuffer(LIMIT)
    assert hb.feed(b"GET / HTTP/1.1\r\nHost: h\r\n") is None
    assert bytes(hb.buf) == b"GET / HTTP/1.1\r\nHost: h\r\n"
    assert hb.feed(b"\r") is None
    assert hb.feed(b"\nrest") == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert bytes(hb.buf) == b"rest"
    assert hb.take() == b"rest"
    assert hb.take() == b""


def test_split_incomplete_buffers_everything():
    hb = HeadBuffer(LIMIT)
    assert hb.split(b"GET / HTTP/1.1\r\nHo") is None
    assert bytes(hb.buf) == b"GET / HTTP/1.1\r\nHo"
    assert hb.split(b"st: h\r\n\r\nBODY") == (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"BODY")
    assert len(hb) == 0


def test_terminator_split_across_feeds_at_every_point():
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    for cut in range(len(raw) - 4, len(raw)):
        hb = HeadBuffer(LIMIT)
        assert hb.feed(raw[:cut]) is None
        assert hb.feed(raw[cut:] + b"X") == raw
        assert bytes(hb.buf) == b"X"


@pytest.mark.parametrize("limit", [16, 17, 40, 41, 100])
def test_limit_boundaries(limit):
    """A head of exactly ``limit`` bytes passes; one byte more is 431 (414 while the request line is
    still unfinished), however the bytes arrive."""
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    n = len(raw)
    for name, chunks in chunkings(raw, b"GET").items():
        for how in ("feed", "split"):
            res = run_head_buffer(chunks, limit, how)
            if n <= limit:
                assert (res.head, res.rest, res.error) == (raw, b"GET", None), (name, how)
            else:
                want = 414 if limit < len(b"GET / HTTP/1.1\r\n") else 431
                assert res.error == want, (name, how)


def test_414_versus_431():
    for limit in (64, 1000):
        line = b"GET /" + b"a" * limit + b" HTTP/1.1\r\n"
        assert run_head_buffer([line], limit, "feed").error == 414
        # Still 414 while the line is unfinished and the buffer is already too big.
        assert run_head_buffer([line[:limit + 1]], limit, "feed").error == 414
        fields = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * limit
        assert run_head_buffer([fields], limit, "feed").error == 431
        assert run_head_buffer([fields], limit, "split").error == 431


def test_buffer_never_holds_more_than_limit_plus_one_feed():
    endless = b"GET / HTTP/1.1\r\n" + b"X-Field: value\r\n" * 1000
    for size in (1, 7, 100, 3000):
        chunks = [endless[i:i + size] for i in range(0, len(endless), size)]
        for how in ("feed", "split"):
            res = run_head_buffer(chunks, 1024, how)
            assert res.error == 431
            assert all(held <= 1024 for held in res.held_after_none)
            assert res.max_held <= 1024 + size


def test_bare_lf_head_before_limit_is_400_not_431():
    """A bare LF far before the limit makes the head 400, never 431, however the bytes arrive: whole, the
    head ends at its bare-LF empty line and the parser rejects it; bit by bit, the bare LF is rejected as
    soon as it is there."""
    data = b"GET / HTTP/1.1\r\nHost: a\n\n" + b"x" * 200 + b"\r\n\r\n"
    for name, chunks in chunkings(data).items():
        for how in ("feed", "split"):
            res = run_head_buffer(chunks, 100, how)
            if res.error is None:
                assert res.head == b"GET / HTTP/1.1\r\nHost: a\n\n", (name, how)
                with pytest.raises(ProtocolError) as exc:
                    parse_request_head(res.head)
                assert exc.value.status == 400
            else:
                assert res.error == 400, (name, how)


def test_response_heads_through_split_with_interim():
    """An interim response, then the final one and its body, in one segment (the upstream loop)."""
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    for name, chunks in chunkings(data).items():
        hb = HeadBuffer(LIMIT, RESPONSE)
        got: List[Tuple[bytes, bytes]] = []
        for chunk in chunks:
            data_in = chunk
            while True:
                res = hb.split(data_in)
                if res is None:
                    break
                got.append(res)
                if parse_response_head(res[0]).status >= 200:
                    break
                data_in = res[1]
            if got and parse_response_head(got[-1][0]).status >= 200:
                break
        heads = [h for h, _ in got]
        assert heads == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"], name


# ---- O(n): counted, not timed --------------------------------------------------------------------------
class CountingBytearray(bytearray):
    """A bytearray that counts how many bytes searches and copies of the whole buffer touch."""

    def __init__(self) -> None:
        super().__init__()
        self.scanned = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        stop = len(self) if end is None else min(end, len(self))
        at = super().find(sub, start, stop)
        # A search stops at its first hit: charge the bytes up to there, or the whole range.
        self.scanned += (at + len(sub) - start) if at >= 0 else max(0, stop - start)
        return at

    def lstrip(self, chars=None):  # type: ignore[override]
        self.scanned += len(self)
        return super().lstrip(chars)


def _big_head(size: int) -> bytes:
    line = b"X-Field-%05d: some value here\r\n"
    out = [b"GET / HTTP/1.1\r\nHost: h\r\n"]
    i = 0
    total = len(out[0]) + 2
    while total < size:
        ln = line % i
        out.append(ln)
        total += len(ln)
        i += 1
    out.append(b"\r\n")
    return b"".join(out)


def _bytewise_scan_cost(head: bytes, how: str) -> int:
    hb = HeadBuffer(len(head) + 10)
    counting = CountingBytearray()
    hb.buf = counting
    result = None
    for i in range(len(head)):
        if how == "feed":
            result = hb.feed(head[i:i + 1])
        else:
            got = hb.split(head[i:i + 1])
            result = None if got is None else got[0]
        if result is None:
            # The search resumes where it stopped: never more than two bytes are looked at again.
            assert hb._scanned >= len(hb.buf) - 2
    assert result == head
    return counting.scanned


@pytest.mark.parametrize("how", ["feed", "split"])
def test_head_fed_bytewise_is_linear(how):
    head = _big_head(60_000)
    assert 60_000 <= len(head) < 60_100
    cost = _bytewise_scan_cost(head, how)
    # Two searches per byte, each over the last few bytes: a rescan from the start would be ~n*n/2.
    assert cost <= 8 * len(head)
    # Twice the head costs twice as much, not four times.
    half = _big_head(30_000)
    assert cost <= 2.2 * _bytewise_scan_cost(half, how)
    # And the parser accepts what came out.
    assert len(parse_request_head(head).names) > 1000


def test_pipelined_heads_are_not_rescanned():
    """Many pipelined requests (each after empty lines, which the buffer drops) in one buffer: popping
    them all touches each byte a bounded number of times."""
    one = b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"
    hb = HeadBuffer(LIMIT)
    counting = CountingBytearray()
    hb.buf = counting
    counting += one * 3000
    heads = 0
    while hb.pop_head() is not None:
        heads += 1
    assert heads == 3000
    assert counting.scanned <= 3 * len(one) * 3000


# ---- fuzz ----------------------------------------------------------------------------------------------
SPECIAL_BYTES = list(b"\r\n \t:,\x00;0123456789\x7f\x80\xff\x0b\"=")
any_byte = st.one_of(st.sampled_from(SPECIAL_BYTES), st.integers(0, 255))
mutation = st.tuples(st.sampled_from(["insert", "delete", "replace", "insert-crlf", "duplicate"]),
                     st.integers(0, 1 << 16), any_byte)


def mutate(data: bytes, ops: List[Tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        at = pos % (len(buf) + 1)
        if op == "insert":
            buf[at:at] = bytes([byte])
        elif op == "insert-crlf":
            buf[at:at] = b"\r\n"
        elif op == "duplicate" and buf:
            end = min(len(buf), at + byte % 40)
            buf[at:at] = buf[at:end]
        elif buf and at < len(buf):
            if op == "delete":
                del buf[at]
            else:
                buf[at] = byte
    return bytes(buf)


REQUEST_SEEDS = [c.raw for c in VALID_REQUESTS if len(c.raw) < 400] + [c[1] for c in INVALID_REQUESTS
                                                                        if len(c[1]) < 400]
RESPONSE_SEEDS = [c.raw for c in VALID_RESPONSES] + [c[1] for c in INVALID_RESPONSES if len(c[1]) < 400]


@st.composite
def mutated(draw, seeds: List[bytes]) -> bytes:
    return mutate(draw(st.sampled_from(seeds)), draw(st.lists(mutation, max_size=5)))


@st.composite
def splits(draw, data: bytes) -> List[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    points = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def _consistent(results: Dict[str, Parsed]) -> None:
    """Every way of feeding the same bytes gives what feeding them whole gives: the same head, fields and
    rest, the same error status, or the same incomplete buffer."""
    base = results["whole/feed"]
    for way, got in results.items():
        assert got == base, way
        if got[0] == "error":
            assert isinstance(got[1], int) and 400 <= got[1] <= 599


def _check_all_ways(data: bytes, limit: int, parse, summary) -> None:
    results: Dict[str, Parsed] = {}
    for way, got in all_ways(data, b"", limit, parse, summary):
        results[way] = got
    _consistent(results)


@FUZZ
@given(mutated(REQUEST_SEEDS), st.sampled_from([LIMIT, 64, 200]))
def test_fuzz_mutated_requests(data, limit):
    _check_all_ways(data, limit, parse_request, request_summary)


@FUZZ
@given(mutated(RESPONSE_SEEDS), st.booleans(), st.sampled_from([LIMIT, 64]))
def test_fuzz_mutated_responses(data, head_request, limit):
    _check_all_ways(data, limit, response_parser(head_request), response_summary)


@FUZZ
@given(st.data())
def test_fuzz_random_segmentation_of_valid_requests(data):
    case = data.draw(st.sampled_from(VALID_REQUESTS))
    trailing = data.draw(st.sampled_from(sorted(TRAILING.values())))
    chunks = data.draw(splits(case.raw + trailing))
    for how in ("feed", "split"):
        got = parse_stream(chunks, case.limit, how, parse_request, request_summary)
        assert got == ("ok", case.expected(), case.head, trailing)


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes_only_protocol_error(data, head_request):
    for parse in (parse_request_head, lambda h: parse_response_head(h, head_request)):
        try:
            parse(data)
        except ProtocolError as exc:
            assert 400 <= exc.status <= 599
    # With a valid-looking start so the field parsing is reached.
    for prefix in (b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"HTTP/1.1 200 OK\r\n"):
        for parse in (parse_request_head, lambda h: parse_response_head(h, head_request)):
            for tail in (b"", b"\r\n\r\n"):
                try:
                    parse(prefix + data + tail)
                except ProtocolError as exc:
                    assert 400 <= exc.status <= 599


@FUZZ
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=30), st.sampled_from([16, 64, 256]),
       st.sampled_from(["feed", "split"]))
def test_fuzz_head_buffer_bounded(chunks, limit, how):
    """Random segments: only ProtocolError (431/414 for size, 400/505 for what can never become a valid
    head) escapes, and the buffer holds at most the limit between feeds (plus the feed in progress)."""
    hb = HeadBuffer(limit)
    for chunk in chunks:
        try:
            got = hb.feed(chunk) if how == "feed" else hb.split(chunk)
        except ProtocolError as exc:
            assert exc.status in (400, 414, 431, 505)
            return
        if got is None:
            assert len(hb) <= limit
        else:
            head = got if isinstance(got, bytes) else got[0]
            assert head.endswith(b"\n\n") or head.endswith(b"\n\r\n")
            assert len(head) <= limit
            hb.take()


def _valid_request_or_none(data: bytes) -> Optional[RequestHead]:
    try:
        return parse_request_head(data)
    except ProtocolError:
        return None


@FUZZ
@given(mutated([c.raw.lstrip(b"\r\n") for c in VALID_REQUESTS if len(c.raw) < 400]))
def test_fuzz_parsed_requests_are_sane(data):
    """Whatever parses is internally consistent: framing fields agree with what the head says."""
    r = _valid_request_or_none(data)
    if r is None:
        return
    assert r.minor in (0, 1)
    assert r.raw.endswith(b"\r\n\r\n")
    te = r.header(b"transfer-encoding")
    cl = r.header(b"content-length")
    assert not (te is not None and cl is not None)
    if r.framing == CHUNKED:
        assert te is not None and r.minor == 1
    elif r.framing == LENGTH:
        assert cl is not None and r.length == int(cl.split(b",")[0])
    else:
        assert te is None and cl is None and r.length == 0
    if r.minor == 1:
        assert r.host is not None and r.lnames.count(b"host") == 1
    if r.upgrade is not None:
        assert b"upgrade" in r.connection_tokens and r.minor == 1


# ---- the simple-response fast path agrees with the full parser -------------------------------------------
def _full_or_error(head: bytes, head_request: bool) -> object:
    try:
        return parse_response_head(head, head_request)
    except ProtocolError as exc:
        return exc.status


def _takes_fast_path(r: object) -> bool:
    """What the proxy's fast path needs of a parsed head (proxy/upstream.py)."""
    return (isinstance(r, ResponseHead) and r.framing == LENGTH and not r.rewrite and r.keep_alive
            and r.minor == 1)


def _check_simple(head: bytes, head_request: bool) -> None:
    full = _full_or_error(head, head_request)
    try:
        m = match_response_head(head)
    except ProtocolError as exc:
        assert full == exc.status, head
        return
    simple = simple_response(m, head_request)
    if simple is None:
        # The full parser, from the same match, says the same as parsing from scratch.
        try:
            again: object = response_from_match(head, m, head_request)
        except ProtocolError as exc:
            again = exc.status
        if isinstance(full, ResponseHead):
            assert isinstance(again, ResponseHead) and response_summary(again) == response_summary(full), head
            assert again.rewrite == full.rewrite
            # Nothing the fast path could take is left to the slow one.
            assert not _takes_fast_path(full), head
        else:
            assert again == full, head
    else:
        assert _takes_fast_path(full), head
        assert isinstance(full, ResponseHead) and simple == (full.status, full.length), head


@pytest.mark.parametrize("case", VALID_RESPONSES, ids=lambda c: c.id)
def test_simple_response_agrees_on_the_cases(case: Resp) -> None:
    raw = case.raw[2:] if case.raw.startswith(b"\r\n") else case.raw
    _check_simple(raw, case.head_request)


@pytest.mark.parametrize("case", INVALID_RESPONSES, ids=lambda c: c[0])
def test_simple_response_refuses_what_the_parser_refuses(case: BadResp) -> None:
    _check_simple(case[1], False)


def test_simple_response_agrees_over_a_grid() -> None:
    import itertools
    fields = [b"Content-Length: 5\r\n", b"Content-Length: 05\r\n", b"Content-Length: 5 \r\n",
              b"Content-length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: keep-alive\r\n",
              b"Connection: Keep-Alive\r\n", b"Connection: close\r\n", b"Keep-Alive: timeout=5\r\n",
              b"Proxy-Connection: x\r\n", b"Upgrade: h2c\r\n", b"Trailer: x\r\n", b"TE: trailers\r\n",
              b"X-A: 1\r\n"]
    seen_simple = 0
    for status in (b"100", b"101", b"200", b"204", b"299", b"304", b"404", b"502", b"999"):
        for version in (b"1.0", b"1.1", b"1.2"):
            for n in (0, 1, 2):
                for combo in itertools.combinations(fields, n):
                    head = b"HTTP/" + version + b" " + status + b" X\r\n" + b"".join(combo) + b"\r\n"
                    for head_request in (False, True):
                        _check_simple(head, head_request)
                        m = match_response_head(head) if _full_or_error(head, head_request) != 502 else None
                        if m is not None and simple_response(m, head_request) is not None:
                            seen_simple += 1
    assert seen_simple > 20  # the grid does reach the fast path
