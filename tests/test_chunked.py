"""Tests for balrs.http.chunked: ChunkedDecoder fed whole, byte by byte, in halves and with the next
request behind the body; the table in tests/http_cases.py; cost counted, never timed; fuzz."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balrs.http.chunked import CRLF, LAST_CHUNK, MAX_CHUNK_LINE, ChunkedDecoder, chunk_header
from balrs.http.errors import ProtocolError
from balrs.http.heads import CHUNKED, HeadBuffer, parse_request_head, parse_response_head
from http_cases import INVALID_CHUNKED, LIMIT, NEXT_REQUEST, VALID_CHUNKED, chunkings

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRAILING = [b"", b"GET /ne", NEXT_REQUEST, b"0\r\n\r\n", b"\r\n"]

# (data, trailers, rest) when the body is complete; ("error", status); ("incomplete", data so far).
Outcome = Union[Tuple[bytes, bytes, bytes], Tuple[str, int], Tuple[str, bytes]]


def decode(chunks: List[bytes], max_body: int = 0, trailer_limit: int = 65536,
           error_status: int = 400) -> Outcome:
    """Feed ``chunks`` to a fresh decoder the way the proxy does: stop at ``done``; what the decoder did
    not consume is the rest."""
    d = ChunkedDecoder(max_body, trailer_limit, error_status)
    out: List[bytes] = []
    for i, chunk in enumerate(chunks):
        before = len(out)
        try:
            used = d.feed(chunk, out)
        except ProtocolError as exc:
            return ("error", exc.status)
        assert 0 <= used <= len(chunk)
        assert all(isinstance(p, bytes) and p for p in out[before:]), "no empty pieces"
        if d.done:
            rest = chunk[used:] + b"".join(chunks[i + 1:])
            # Once done, the decoder takes nothing more.
            assert d.feed(b"more", out) == 0 and len(out) == len(out)
            return (b"".join(out), d.trailers, rest)
        assert used == len(chunk), "bytes held back before the end of the body"
    return ("incomplete", b"".join(out))


@pytest.mark.parametrize("case", VALID_CHUNKED, ids=lambda c: c.id)
def test_valid_chunked(case):
    for trailing in TRAILING:
        for way, chunks in chunkings(case.raw, trailing).items():
            assert decode(chunks) == (case.data, case.trailers, trailing), way


@pytest.mark.parametrize("case", VALID_CHUNKED, ids=lambda c: c.id)
def test_valid_chunked_consumed_points_at_the_end(case):
    for trailing in TRAILING:
        d = ChunkedDecoder()
        out: List[bytes] = []
        assert d.feed(case.raw + trailing, out) == len(case.raw)
        assert d.done
        assert b"".join(out) == case.data
        assert d.trailers == case.trailers
        assert d.total == len(case.data)


@pytest.mark.parametrize("case", VALID_CHUNKED, ids=lambda c: c.id)
def test_truncated_valid_chunked_is_incomplete(case):
    """Every proper prefix of a valid body is accepted and waits for more."""
    for cut in range(len(case.raw)):
        got = decode([case.raw[:cut]])
        assert got[0] == "incomplete", cut
        assert case.data.startswith(got[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("error_status", [400, 502])
@pytest.mark.parametrize("case", INVALID_CHUNKED, ids=lambda c: c[0])
def test_invalid_chunked(case, error_status):
    _id, raw = case
    for trailing in (b"", NEXT_REQUEST):
        for way, chunks in chunkings(raw, trailing).items():
            assert decode(chunks, error_status=error_status) == ("error", error_status), way


def test_max_body_413():
    raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    for error_status in (400, 502):
        for way, chunks in chunkings(raw, NEXT_REQUEST).items():
            assert decode(chunks, max_body=11, error_status=error_status)[0] == b"hello world"
            assert decode(chunks, max_body=10, error_status=error_status) == ("error", 413), way
    # Refused as soon as the declared size passes the limit, before any of its data arrives.
    d = ChunkedDecoder(max_body=1000)
    out: List[bytes] = []
    d.feed(b"3e8\r\n" + b"x" * 1000 + b"\r\n", out)
    with pytest.raises(ProtocolError) as exc:
        d.feed(b"1\r\n", out)
    assert exc.value.status == 413
    # A huge declared size is refused at once, not after the bytes.
    with pytest.raises(ProtocolError) as exc:
        ChunkedDecoder(max_body=1 << 20).feed(b"ffffffffffffffff\r\n", [])
    assert exc.value.status == 413


def test_largest_chunk_size_accepted_without_limit():
    d = ChunkedDecoder()
    out: List[bytes] = []
    assert d.feed(b"ffffffffffffffff\r\nabc", out) == 21
    assert out == [b"abc"] and not d.done and d.total == 2**64 - 1


def test_chunk_line_length_limit():
    ok = b"5;" + b"x" * (MAX_CHUNK_LINE - 4) + b"\r\n"
    assert len(ok) == MAX_CHUNK_LINE
    too_long = b"5;" + b"x" * (MAX_CHUNK_LINE - 3) + b"\r\n"
    for way, chunks in chunkings(ok + b"hello\r\n0\r\n\r\n").items():
        assert decode(chunks)[0] == b"hello", way
    for way, chunks in chunkings(too_long + b"hello\r\n0\r\n\r\n").items():
        assert decode(chunks) == ("error", 400), way
    # A size line that never ends is refused once it is too long, not buffered forever.
    d = ChunkedDecoder()
    with pytest.raises(ProtocolError):
        for _ in range(MAX_CHUNK_LINE + 1):
            d.feed(b"0", [])


def test_trailer_limit():
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(20))
    raw = b"0\r\n" + trailers + b"\r\n"
    for way, chunks in chunkings(raw, NEXT_REQUEST).items():
        assert decode(chunks, trailer_limit=len(trailers)) == (b"", trailers, NEXT_REQUEST), way
        assert decode(chunks, trailer_limit=len(trailers) - 1) == ("error", 400), way
        assert decode(chunks, trailer_limit=len(trailers) - 1, error_status=502) == ("error", 502), way
    # One endless trailer line is refused too.
    d = ChunkedDecoder(trailer_limit=100)
    d.feed(b"0\r\n", [])
    with pytest.raises(ProtocolError):
        for _ in range(101):
            d.feed(b"a", [])


def test_encoder_helpers_round_trip():
    assert chunk_header(0) == b"0\r\n"
    assert chunk_header(255) == b"ff\r\n"
    assert LAST_CHUNK == b"0\r\n" and CRLF == b"\r\n"
    pieces = [b"a", b"bc" * 100, b"\r\n0\r\n\r\n", bytes(range(256))]
    encoded = b"".join(chunk_header(len(p)) + p + CRLF for p in pieces) + LAST_CHUNK + b"X: y\r\n" + CRLF
    for way, chunks in chunkings(encoded, NEXT_REQUEST).items():
        assert decode(chunks) == (b"".join(pieces), b"X: y\r\n", NEXT_REQUEST), way


def test_request_head_body_and_pipelined_next():
    """The whole client path: head through HeadBuffer.split, body through the decoder, then the next
    request from what the decoder did not consume."""
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n"
    stream = head + body + NEXT_REQUEST
    for way, chunks in chunkings(stream).items():
        hb = HeadBuffer(LIMIT)
        d: Optional[ChunkedDecoder] = None
        out: List[bytes] = []
        heads: List[bytes] = []
        for chunk in chunks:
            data = chunk
            while data:
                if d is None:
                    got = hb.split(data)
                    if got is None:
                        break
                    h, data = got
                    heads.append(h)
                    req = parse_request_head(h)
                    if req.framing == CHUNKED:
                        d = ChunkedDecoder()
                    continue
                used = d.feed(data, out)
                data = data[used:]
                if d.done:
                    assert b"".join(out) == b"Wikipedia in\r\n\r\nchunks."
                    assert d.trailers == b"Expires: never\r\n"
                    d = None
        assert heads == [head, NEXT_REQUEST], way


def test_response_chunked_body_502():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_response_head(head).framing == CHUNKED
    for way, chunks in chunkings(b"5\r\nhello\r\nzz\r\n").items():
        assert decode(chunks, trailer_limit=LIMIT, error_status=502) == ("error", 502), way


# ---- O(n): counted, not timed --------------------------------------------------------------------------
class CountingBytes(bytes):
    """bytes whose ``find`` charges the bytes it looks at to a shared counter."""

    scanned = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        stop = len(self) if end is None else end
        at = super().find(sub, start, stop)
        CountingBytes.scanned += (at + len(sub) - start) if at >= 0 else max(0, stop - start)
        return at


class TrailerWatch(ChunkedDecoder):
    """Counts the bytes stored into ``trailers``: rebuilding it on each line would be quadratic."""

    __slots__ = ()
    stored = 0

    @property  # type: ignore[override]
    def trailers(self) -> bytes:
        return ChunkedDecoder.trailers.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @trailers.setter
    def trailers(self, value: bytes) -> None:
        TrailerWatch.stored += len(value)
        ChunkedDecoder.trailers.__set__(self, value)  # type: ignore[attr-defined]


def _big_body(chunks: int, trailer_lines: int) -> Tuple[bytes, bytes, bytes]:
    data = [bytes([65 + i % 26]) * (1 + i % 300) for i in range(chunks)]
    trailers = b"".join(b"X-T-%d: %d\r\n" % (i, i) for i in range(trailer_lines))
    raw = b"".join(chunk_header(len(p)) + p + CRLF for p in data) + b"0\r\n" + trailers + CRLF
    return raw, b"".join(data), trailers


def _bytewise_cost(raw: bytes) -> Tuple[int, int, int, bytes, bytes]:
    CountingBytes.scanned = 0
    TrailerWatch.stored = 0
    d = TrailerWatch(trailer_limit=1 << 20)
    out: List[bytes] = []
    longest_line = 0
    for i in range(len(raw)):
        assert d.feed(CountingBytes(raw[i:i + 1]), out) == 1
        longest_line = max(longest_line, len(d._line))
    assert d.done
    return CountingBytes.scanned, TrailerWatch.stored, longest_line, b"".join(out), d.trailers


def test_chunked_bytewise_is_linear():
    raw, data, trailers = _big_body(200, 1000)
    scanned, stored, longest, got, got_trailers = _bytewise_cost(raw)
    assert got == data and got_trailers == trailers
    assert scanned <= len(raw)
    # The partial line held never outgrows the longest line of the input.
    assert longest <= max(len(x) for x in raw.split(b"\n"))
    assert stored <= 2 * len(trailers)
    raw2, data2, trailers2 = _big_body(400, 2000)
    scanned2, stored2, _, got2, _ = _bytewise_cost(raw2)
    assert got2 == data2
    assert scanned2 <= 2.2 * scanned and stored2 <= 2.2 * stored


def test_chunked_whole_is_linear():
    """Fed at once, each byte is looked at by find at most once; chunk data is not searched at all."""
    raw, data, trailers = _big_body(2000, 2000)
    CountingBytes.scanned = 0
    TrailerWatch.stored = 0
    d = TrailerWatch(trailer_limit=1 << 20)
    out: List[bytes] = []
    assert d.feed(CountingBytes(raw + NEXT_REQUEST), out) == len(raw)
    assert b"".join(out) == data and d.trailers == trailers
    assert CountingBytes.scanned <= len(raw) - len(data)
    assert TrailerWatch.stored <= 2 * len(trailers)


# ---- fuzz ----------------------------------------------------------------------------------------------
SPECIAL = list(b"\r\n \t;=\"\\:0123456789abcdefABCDEFxX-\x00\x7f\xff")
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


SEEDS = [c.raw for c in VALID_CHUNKED] + [c[1] for c in INVALID_CHUNKED if len(c[1]) < 500]


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(mutation, max_size=5), st.sampled_from([0, 3, 20]),
       st.sampled_from([400, 502]), st.sampled_from([8, 65536]))
def test_fuzz_mutated_chunked_consistent(seed, ops, max_body, error_status, trailer_limit):
    raw = mutate(seed, ops)
    results = {way: decode(chunks, max_body, trailer_limit, error_status)
               for way, chunks in chunkings(raw, NEXT_REQUEST).items()}
    base = results["whole"]
    for way, got in results.items():
        assert got == base, way
    if base[0] == "error":
        assert base[1] in (error_status, 413)
        assert base[1] != 413 or max_body
    elif base[0] != "incomplete":
        data, trailers, rest = base  # type: ignore[misc]
        assert rest.endswith(NEXT_REQUEST)
        assert max_body == 0 or len(data) <= max_body
        assert trailers == b"" or trailers.endswith(b"\r\n")
        # Re-encoding what was decoded decodes to the same thing (what the proxy forwards).
        again = chunk_header(len(data)) + data + CRLF if data else b""
        assert decode([again + b"0\r\n" + trailers + b"\r\n"]) == (data, trailers, b"")


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_fuzz_random_bytes_only_protocol_error(data, cuts):
    for prefix in (b"", b"5\r\nhello\r\n", b"0\r\n"):
        stream = prefix + data
        points = sorted(set([0, len(stream)] + [c % (len(stream) + 1) for c in cuts]))
        d = ChunkedDecoder(max_body=50, trailer_limit=64)
        out: List[bytes] = []
        try:
            for a, b in zip(points, points[1:]):
                used = d.feed(stream[a:b], out)
                assert 0 <= used <= b - a
                if d.done:
                    break
        except ProtocolError as exc:
            assert exc.status in (400, 413)
