"""Micro-benchmarks of balrs' per-request hot path (pytest-benchmark).

Run:  python -m pytest bench/test_micro.py --benchmark-only
      (add --benchmark-columns=min,median,ops to shorten the table; --benchmark-autosave to keep a record)

Every benchmark also asserts on its result, so this file doubles as a quick "it still works" check
(`python -m pytest bench/test_micro.py --benchmark-disable` runs each body once, without timing).
"""

from __future__ import annotations

import pytest

from balrs.config import Address, BackendConfig
from balrs.http.build import forwarded_suffix, upstream_request_head
from balrs.http.chunked import ChunkedDecoder, chunk_header
from balrs.http.heads import LENGTH, NO_BODY, HeadBuffer, parse_request_head, parse_response_head
from balrs.pool import Backend
from balrs.strategies import RoundRobin
from balrs.timerwheel import TimerWheel

pytestmark = pytest.mark.bench

# A typical browser navigation request (Firefox-like): 13 header fields, ~600 bytes.
BROWSER_HEAD = (
    b"GET /articles/2024/load-balancing-in-python?utm_source=feed&page=2 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=4f9c2a7e1b8d4c3a9e6f0b1d2c3e4f5a; theme=dark; _ga=GA1.2.123456789.1700000000\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Sec-Fetch-User: ?1\r\n"
    b"Referer: https://www.example.com/articles/\r\n"
    b"\r\n"
)

# What wrk sends by default.
WRK_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"

# A typical response head from nginx serving a page.
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Mon, 01 Apr 2024 12:00:00 GMT\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: 13542\r\n"
    b"Last-Modified: Sun, 31 Mar 2024 08:15:42 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b"ETag: \"66091b9e-34e6\"\r\n"
    b"Cache-Control: max-age=600\r\n"
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
)


def _chunked(payload: bytes, chunk: int) -> bytes:
    parts = []
    for i in range(0, len(payload), chunk):
        piece = payload[i:i + chunk]
        parts.append(chunk_header(len(piece)) + piece + b"\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


BIG_PAYLOAD = bytes(range(256)) * 256          # 64 KiB
BIG_CHUNKED = _chunked(BIG_PAYLOAD, 4096)      # 16 chunks of 4 KiB
SMALL_CHUNKED = b"5\r\nHello\r\n7\r\n, world\r\n1\r\n\n\r\n0\r\n\r\n"


# ----------------------------------------------------------------------------------------- heads


def test_parse_browser_request_head(benchmark):
    assert 450 <= len(BROWSER_HEAD) <= 700
    req = benchmark(parse_request_head, BROWSER_HEAD)
    assert req.method == b"GET"
    assert req.target.startswith(b"/articles/")
    assert req.host == b"www.example.com"
    assert req.keep_alive and req.framing == NO_BODY
    assert len(req.names) == 13
    assert req.rewrite  # "Connection: keep-alive" must be removed when forwarding


def test_parse_wrk_request_head(benchmark):
    req = benchmark(parse_request_head, WRK_HEAD)
    assert req.method == b"GET" and req.target == b"/"
    assert req.host == b"127.0.0.1:8080"
    assert req.keep_alive and not req.rewrite


def test_headbuffer_feed_and_parse(benchmark):
    def run():
        head = HeadBuffer(65536).feed(BROWSER_HEAD)
        return parse_request_head(head)

    req = benchmark(run)
    assert req.raw == BROWSER_HEAD and req.host == b"www.example.com"


def test_headbuffer_feed_and_parse_wrk(benchmark):
    def run():
        head = HeadBuffer(65536).feed(WRK_HEAD)
        return parse_request_head(head)

    req = benchmark(run)
    assert req.raw == WRK_HEAD


def test_upstream_head_browser(benchmark):
    req = parse_request_head(BROWSER_HEAD)
    suffix = forwarded_suffix(b"127.0.0.1")
    out = benchmark(upstream_request_head, req, b"127.0.0.1", suffix, b"backend:80")
    assert out.startswith(b"GET /articles/2024/")
    assert out.endswith(b"\r\n\r\n")
    assert b"\r\nConnection:" not in out  # hop-by-hop removed
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in out
    assert b"\r\nX-Forwarded-Host: www.example.com\r\n" in out
    assert b"\r\nCookie: session=" in out


def test_upstream_head_wrk(benchmark):
    req = parse_request_head(WRK_HEAD)
    suffix = forwarded_suffix(b"127.0.0.1")
    out = benchmark(upstream_request_head, req, b"127.0.0.1", suffix, b"backend:80")
    assert out.startswith(WRK_HEAD[:-2])
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in out and out.endswith(b"\r\n\r\n")


def test_parse_response_head(benchmark):
    resp = benchmark(parse_response_head, RESPONSE_HEAD)
    assert resp.status == 200
    assert resp.framing == LENGTH and resp.length == 13542
    assert resp.keep_alive


# --------------------------------------------------------------------------------------- chunked


def _decode(data: bytes):
    out = []
    dec = ChunkedDecoder()
    used = dec.feed(data, out)
    return dec, used, out


def test_chunked_decode_64k_in_4k_chunks(benchmark):
    dec, used, out = benchmark(_decode, BIG_CHUNKED)
    assert dec.done and used == len(BIG_CHUNKED)
    assert b"".join(out) == BIG_PAYLOAD and dec.total == len(BIG_PAYLOAD)


def test_chunked_decode_small(benchmark):
    dec, used, out = benchmark(_decode, SMALL_CHUNKED)
    assert dec.done and used == len(SMALL_CHUNKED)
    assert b"".join(out) == b"Hello, world\n"


def test_chunked_decode_64k_split_in_16k_reads(benchmark):
    """The same body arriving in 16 KiB socket reads (chunk lines straddle reads)."""
    reads = [BIG_CHUNKED[i:i + 16384] for i in range(0, len(BIG_CHUNKED), 16384)]

    def run():
        out = []
        dec = ChunkedDecoder()
        used = 0
        for r in reads:
            used += dec.feed(r, out)
        return dec, used, out

    dec, used, out = benchmark(run)
    assert dec.done and used == len(BIG_CHUNKED) and b"".join(out) == BIG_PAYLOAD


# ------------------------------------------------------------------------------------ strategies


def _backends(n: int):
    return [Backend(BackendConfig("b%d" % i, Address("127.0.0.1", 9000 + i), 1)) for i in range(n)]


@pytest.mark.parametrize("n", [3, 50])
def test_round_robin_choose(benchmark, n):
    backends = _backends(n)
    rr = RoundRobin(backends)
    req = parse_request_head(WRK_HEAD)
    choose = rr.choose

    def run():
        # 100 picks per round so the per-call overhead of the harness does not dominate.
        b = None
        for _ in range(100):
            b = choose(req, "127.0.0.1")
        return b

    benchmark(run)
    # Round robin must visit every backend once per cycle.
    seen = [rr.choose(req, "127.0.0.1").name for _ in range(n)]
    assert sorted(seen) == sorted(b.name for b in backends)


def test_weighted_round_robin_choose_smooth(benchmark):
    backends = [Backend(BackendConfig(name, Address("127.0.0.1", 9000 + i), w))
                for i, (name, w) in enumerate([("a", 5), ("b", 1), ("c", 1)])]
    rr = RoundRobin(backends)
    req = parse_request_head(WRK_HEAD)
    b = benchmark(rr.choose, req, "127.0.0.1")
    assert b is not None
    seq = "".join(rr.choose(req, "127.0.0.1").name for _ in range(14))
    assert "aaaaa" not in seq and seq.count("a") == 10


# ---------------------------------------------------------------------------------------- timers


def test_timerwheel_schedule_cancel(benchmark):
    now = [1000.0]
    wheel = TimerWheel(clock=lambda: now[0])

    def cb():
        raise AssertionError("a cancelled timer fired")

    def run():
        # What a keep-alive request does: arm a timeout (30 s), then cancel it when the response is in.
        t = wheel.call_later(30.0, cb)
        t.cancel()
        return t

    t = benchmark(run)
    assert not t.active and len(wheel) == 0
    now[0] += 60.0
    assert wheel.run() == 0


def test_timerwheel_schedule_cancel_with_many_live(benchmark):
    """The same with 10 000 other timers pending (10 000 idle keep-alive connections)."""
    now = [1000.0]
    wheel = TimerWheel(clock=lambda: now[0])
    for i in range(10000):
        wheel.call_later(1.0 + i * 0.006, lambda: None)

    def run():
        t = wheel.call_later(30.0, lambda: None)
        t.cancel()
        return t

    t = benchmark(run)
    assert not t.active and len(wheel) == 10000
