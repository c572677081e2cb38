"""Integration: proxying through the real ``python -m balrs`` process, over real sockets on 127.0.0.1.

Framing (Content-Length, chunked, close-delimited; both directions), keep-alive and pipelining, 1xx,
upgrades, forwarding headers, hop-by-hop removal, round robin, the upstream pool, backpressure.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import pytest
from support import (
    CHUNKED_BODY,
    HOP_RESP_BODY,
    NO_LENGTH_BODY,
    WS_ACCEPT,
    WS_GREETING,
    WS_KEY,
    BalrsProcess,
    Client,
    RssSampler,
    TestBackend,
    all_reqs,
    big_body,
    big_sha,
    build,
    chunk_encode,
    hget,
    hnames,
    request,
    sha,
    wait_for,
)

MiB = 1024 * 1024


def only_req(backends: list[TestBackend]) -> dict:
    rs = all_reqs(backends)
    assert len(rs) == 1, "backends saw %d requests, expected exactly 1: %s" % (
        len(rs),
        [r["target"] for r in rs],
    )
    return rs[0]


# ---- bodies and framing ------------------------------------------------------------------------------------
def test_get_basic(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    r = request(lb.addr, "GET", "/echo?id=get1")
    assert r.status == 200 and r.complete
    j = r.json()
    assert (j["method"], j["target"], j["version"]) == ("GET", "/echo?id=get1", "HTTP/1.1")
    assert r.header("x-backend") == j["backend"]
    rec = only_req(backends)
    assert rec["complete"] and rec["framing"] == "none"


@pytest.mark.parametrize("method,size", [("POST", 100000), ("PUT", 1500), ("GET", 10), ("POST", 0)])
def test_content_length_body_forwarded_exactly(
    lb: BalrsProcess, backends: list[TestBackend], method: str, size: int
) -> None:
    body = os.urandom(size)
    r = request(lb.addr, method, "/echo?id=body", body=body, timeout=10)
    assert r.status == 200
    j = r.json()
    assert j["method"] == method
    assert (j["body_len"], j["body_sha256"]) == (size, sha(body)), "backend got %d bytes" % j["body_len"]
    rec = only_req(backends)
    cl = hget(rec["headers"], "content-length")
    assert cl in ((str(size),) if size else ("0", None)), "forwarded Content-Length %r for %d bytes" % (
        cl,
        size,
    )
    assert hget(rec["headers"], "transfer-encoding") is None


def test_chunked_request_body_reframed(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    pieces = [b"a", b"b" * 100, bytes(range(256)) * 16, b"c" * 10000, b"d" * 3]
    body = b"".join(pieces)
    with Client(lb.addr) as c:
        first = chunk_encode(pieces[:2], ext=b";name=value")[:-5]  # without the last chunk
        c.send(build("POST", "/echo?id=chunked", [("Transfer-Encoding", "chunked")]) + first[:7])
        time.sleep(0.05)
        c.send(first[7:])
        time.sleep(0.05)
        c.send(chunk_encode(pieces[2:]))
        r = c.read_response()
    assert r.status == 200
    j = r.json()
    assert (j["body_len"], j["body_sha256"]) == (len(body), sha(body))
    rec = only_req(backends)
    te, cl = hget(rec["headers"], "transfer-encoding"), hget(rec["headers"], "content-length")
    assert not (te and cl), "forwarded both Transfer-Encoding and Content-Length"
    assert rec["framing"] == "chunked" or cl == str(len(body)), (te, cl)


def test_chunked_request_with_trailer_section(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    # RFC 9112 section 7.1.2: a trailer section after the last chunk is legal; the body must arrive intact.
    with Client(lb.addr) as c:
        c.send(
            build("POST", "/echo?id=trailer", [("Transfer-Encoding", "chunked")])
            + chunk_encode([b"hello ", b"world"], trailer=b"X-Checksum: 42\r\n")
        )
        r = c.read_response()
        assert r.status == 200
        assert r.json()["body_sha256"] == sha(b"hello world")
        c.send(build("GET", "/echo?id=after-trailer"))
        r2 = c.read_response()
    assert r2.status == 200 and r2.json()["target"] == "/echo?id=after-trailer"


def test_chunked_response_relayed(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/chunked"))
        r = c.read_response()
        assert r.status == 200 and r.complete
        assert r.body == CHUNKED_BODY
        assert r.framing in ("chunked", "cl")
        c.send(build("GET", "/echo?id=after-chunked"))
        assert c.read_response().json()["target"] == "/echo?id=after-chunked"


def test_close_delimited_response_to_http11_client_is_chunked_and_kept_alive(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/no-length"))
        r = c.read_response()
        assert r.status == 200
        assert r.framing == "chunked", "close-delimited body relayed as %s to an HTTP/1.1 client" % r.framing
        assert r.complete and r.body == NO_LENGTH_BODY
        assert not r.has_token("connection", "close")
        c.send(build("GET", "/echo?id=after-no-length"))
        r2 = c.read_response()
    assert r2.status == 200 and r2.json()["target"] == "/echo?id=after-no-length"


def test_close_delimited_response_to_http10_client(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(b"GET /no-length HTTP/1.0\r\nHost: lb.test\r\n\r\n")
        r = c.read_response()
        assert r.status == 200
        assert r.framing == "close", "framing %s to an HTTP/1.0 client" % r.framing
        assert r.complete and r.body == NO_LENGTH_BODY
        closed, _, _ = c.wait_closed(3)
        assert closed


def test_chunked_response_to_http10_client_is_not_chunked(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(b"GET /chunked HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.framing != "chunked"
        assert r.complete and r.body == CHUNKED_BODY


@pytest.mark.parametrize(
    "method,target,status",
    [
        ("HEAD", "/big/1000", 200),
        ("GET", "/status/204", 204),
        ("GET", "/status/304", 304),
        ("HEAD", "/chunked", 200),
    ],
)
def test_bodiless_responses_then_next_request(
    lb: BalrsProcess, method: str, target: str, status: int
) -> None:
    with Client(lb.addr) as c:
        c.send(build(method, target))
        r = c.read_response(method)
        assert r.status == status
        if target.startswith("/big"):
            assert r.header("content-length") in (None, "1000")
        if status in (204, 304):
            assert r.header("transfer-encoding") is None and r.header("content-length") in (None, "0")
        if status == 304:
            assert r.header("etag") == '"v1"'
        c.send(build("GET", "/echo?id=after"))
        r2 = c.read_response(timeout=3)
        # A stray body byte would have been parsed as the start of this response.
    assert r2.status == 200 and r2.json()["target"] == "/echo?id=after", r2


def test_status_codes_relayed_on_keepalive(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        for st in (418, 500, 503, 404, 201):
            c.send(build("GET", "/status/%d" % st))
            r = c.read_response()
            assert r.status == st and r.header("x-backend") is not None
            assert r.body == b"status %d\n" % st


# ---- connections -------------------------------------------------------------------------------------------
def test_keepalive_100_requests_reuse_upstream_connections(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three)
    with Client(lb.addr) as c:
        for i in range(100):
            c.send(build("GET", "/echo?id=ka%d" % i))
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/echo?id=ka%d" % i
            assert not r.has_token("connection", "close"), (
                "closed the keep-alive connection at request %d" % i
            )
    assert len(all_reqs(three)) == 100
    opened = [b.conns_total for b in three]
    assert sum(opened) <= 3, "backend connections opened for 100 sequential requests: %s" % opened
    assert [len(b.reqs()) for b in three] in ([34, 33, 33], [33, 34, 33], [33, 33, 34])


def test_upstream_connections_reused_across_client_connections(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three)
    for i in range(30):  # each on its own client connection, with Connection: close
        r = request(lb.addr, "GET", "/echo?id=c%d" % i)
        assert r.status == 200 and r.json()["target"] == "/echo?id=c%d" % i
    opened = [b.conns_total for b in three]
    assert sum(opened) <= 3, "backend connections opened for 30 sequential requests: %s" % opened


def test_pipelining_five_requests_in_one_write(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    reqs = [
        build("GET", "/echo?id=p1"),
        build("GET", "/delay/300?id=p2"),
        build("POST", "/echo?id=p3", body=b"third-body"),
        build("GET", "/status/404?id=p4"),
        build("GET", "/echo?id=p5"),
    ]
    with Client(lb.addr, timeout=6) as c:
        c.send(b"".join(reqs))
        rs = [c.read_response() for _ in range(5)]
    assert [r.status for r in rs] == [200, 200, 200, 404, 200]
    got = [rs[i].json()["target"] for i in (0, 1, 2, 4)]
    assert got == ["/echo?id=p1", "/delay/300?id=p2", "/echo?id=p3", "/echo?id=p5"]
    assert rs[2].json()["body_sha256"] == sha(b"third-body")
    assert rs[3].body == b"status 404\n"
    assert len(all_reqs(backends)) == 5


def test_pipelined_burst_of_300_posts_answered_in_order(lb: BalrsProcess) -> None:
    # 300 kB of pipelined requests in one go: more than balrs buffers, so it must pause and resume reading.
    n = 300
    payload = b"".join(build("POST", "/echo?i=%d" % i, body=b"%04d" % i + b"x" * 996) for i in range(n))
    errors: list[BaseException] = []
    with Client(lb.addr, timeout=10) as c:

        def sender() -> None:
            try:
                c.send(payload)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        for i in range(n):
            r = c.read_response(timeout=10)
            j = r.json()
            assert r.status == 200 and j["target"] == "/echo?i=%d" % i, (i, r.status, j["target"])
            assert j["body_sha256"] == sha(b"%04d" % i + b"x" * 996)
        t.join(5)
    assert not errors


def test_pipelined_chunked_post_then_get(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(
            build("POST", "/echo?id=pc", [("Transfer-Encoding", "chunked")])
            + chunk_encode([b"ab", b"cd"])
            + build("GET", "/chunked")
            + build("HEAD", "/big/10")
            + build("GET", "/echo?id=last")
        )
        r1, r2, r3, r4 = (c.read_response(), c.read_response(), c.read_response("HEAD"), c.read_response())
    assert r1.json()["body_sha256"] == sha(b"abcd")
    assert r2.body == CHUNKED_BODY and r3.status == 200 and r3.body == b""
    assert r4.json()["target"] == "/echo?id=last"


def test_expect_100_continue(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    body = os.urandom(2000)
    with Client(lb.addr) as c:
        c.send(build("POST", "/echo?id=expect", [("Expect", "100-continue"), ("Content-Length", "2000")]))
        interim = c.read_response(stop_at_interim=True, timeout=3)
        assert interim.status == 100, "got final status %s before the body was sent" % interim.status
        c.send(body)
        r = c.read_response()
    assert r.status == 200
    assert r.json()["body_sha256"] == sha(body)
    assert all(st == 100 for st, _ in r.interim)
    assert only_req(backends)["complete"]


def test_expect_100_continue_body_sent_without_waiting(lb: BalrsProcess) -> None:
    # RFC 9110 section 10.1.1: a client need not wait for the 100; the interim answer may still come.
    body = os.urandom(3000)
    with Client(lb.addr) as c:
        c.send(build("POST", "/echo?id=expect-eager", [("Expect", "100-continue")], body=body))
        r = c.read_response()
        assert r.status == 200 and r.json()["body_sha256"] == sha(body)
        assert all(st == 100 for st, _ in r.interim)
        c.send(build("GET", "/echo?id=after-expect"))
        assert c.read_response().json()["target"] == "/echo?id=after-expect"


def test_expect_100_continue_not_sent_to_http10_client(lb: BalrsProcess) -> None:
    # RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client (the backend here does answer 100).
    with Client(lb.addr) as c:
        c.send(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        r = c.read_response()
    assert r.status == 200 and not r.interim and r.json()["body_sha256"] == sha(b"hello")


def test_websocket_upgrade_tunnel_200k_both_ways(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    with Client(lb.addr, timeout=5) as c:
        c.send(
            build(
                "GET",
                "/ws",
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", WS_KEY),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        r = c.read_response()
        assert r.status == 101
        assert (r.header("upgrade") or "").lower() == "websocket"
        assert r.has_token("connection", "upgrade")
        assert r.header("sec-websocket-accept") == WS_ACCEPT
        assert c.read_exact(len(WS_GREETING), 3) == WS_GREETING
        blob = os.urandom(200 * 1024)
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                for i in range(0, len(blob), 16384):
                    c.send(blob[i : i + 16384])
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        back = c.read_exact(len(blob), 10)
        t.join(5)
        assert not errors
        assert len(back) == len(blob) and back == blob, "echo differs (%d bytes back)" % len(back)
    rec = only_req(backends)
    assert "websocket" in (hget(rec["headers"], "upgrade") or "").lower()
    assert "upgrade" in (hget(rec["headers"], "connection") or "").lower()


def test_http10_without_keepalive_closes(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    with Client(lb.addr) as c:
        c.send(b"GET /echo?id=h10 HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.complete and r.framing != "chunked"
        assert r.json()["target"] == "/echo?id=h10"
        assert not r.has_token("connection", "keep-alive")
        closed, extra, _ = c.wait_closed(3)
    assert closed and extra == b"", "HTTP/1.0 connection without keep-alive not closed"
    only_req(backends)


def test_http10_with_keepalive(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(b"GET /echo?id=a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.framing == "cl" and r.complete
        assert r.json()["target"] == "/echo?id=a"
        # RFC 9112 section 9.3: the connection persists only if the response says keep-alive.
        if not r.has_token("connection", "keep-alive"):
            closed, _, _ = c.wait_closed(3)
            assert closed, "HTTP/1.0 keep-alive not confirmed, yet the connection stayed open"
            return
        c.send(b"GET /echo?id=b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?id=b"
        assert r2.has_token("connection", "keep-alive")
        c.send(b"GET /echo?id=c HTTP/1.0\r\n\r\n")
        r3 = c.read_response()
        assert r3.status == 200 and r3.json()["target"] == "/echo?id=c"
        closed, _, _ = c.wait_closed(3)
        assert closed, "HTTP/1.0 request without keep-alive: connection not closed after the response"


# ---- headers -----------------------------------------------------------------------------------------------
def test_forwarding_headers_appended_and_replaced(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    r = request(
        lb.addr,
        "GET",
        "/echo",
        [
            ("Host", "front.example:8443"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Via", "1.0 upstream-proxy"),
        ],
    )
    assert r.status == 200
    hs = only_req(backends)["headers"]
    xff = [x.strip() for x in (hget(hs, "x-forwarded-for") or "").split(",")]
    assert xff == ["203.0.113.7", "127.0.0.1"], "X-Forwarded-For %r" % hget(hs, "x-forwarded-for")
    assert [v for n, v in hs if n.lower() == "x-forwarded-proto"] == ["http"]
    assert [v for n, v in hs if n.lower() == "x-forwarded-host"] == ["front.example:8443"]
    assert [v for n, v in hs if n.lower() == "host"] == ["front.example:8443"]
    # RFC 9110 section 7.6.3: a gateway sends Via in each request it forwards, after the existing entries.
    via = [x.strip() for x in (hget(hs, "via") or "").split(",")]
    assert len(via) == 2 and via[0] == "1.0 upstream-proxy" and via[1].startswith("1.1 "), via


def test_forwarding_headers_set_when_absent(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    request(lb.addr, "GET", "/echo", [("Host", "Example.Test:8123")])
    hs = only_req(backends)["headers"]
    assert hget(hs, "x-forwarded-for") == "127.0.0.1"
    assert hget(hs, "x-forwarded-proto") == "http"
    assert hget(hs, "x-forwarded-host") == "Example.Test:8123"
    assert (hget(hs, "via") or "").startswith("1.1 ")


def test_hop_by_hop_request_headers_removed(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    r = request(
        lb.addr,
        "GET",
        "/echo",
        [
            ("Connection", "keep-alive, X-Hop-A, x-hop-b"),
            ("Keep-Alive", "timeout=5, max=9"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Foo"),
            ("Upgrade", "foo/1"),
            ("X-Hop-A", "1"),
            ("X-Hop-B", "2"),
            ("X-Keep", "yes"),
        ],
    )
    assert r.status == 200
    hs = only_req(backends)["headers"]
    leaked = [
        n
        for n in hnames(hs)
        if n in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-hop-a", "x-hop-b")
    ]
    assert not leaked, "hop-by-hop headers forwarded: %s" % leaked
    assert "x-hop" not in (hget(hs, "connection") or "").lower()
    assert hget(hs, "x-keep") == "yes"


def test_hop_by_hop_response_headers_removed(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/hop-resp"))
        r = c.read_response()
        assert r.status == 200 and r.body == HOP_RESP_BODY
        leaked = [
            n for n in hnames(r.headers) if n in ("x-resp-hop", "keep-alive", "proxy-connection", "trailer")
        ]
        assert not leaked, "hop-by-hop response headers reached the client: %s" % leaked
        assert "x-resp-hop" not in (r.header("connection") or "").lower()
        assert r.header("x-end-to-end") == "kept"
        c.send(build("GET", "/echo?id=after-hop"))
        assert c.read_response().json()["target"] == "/echo?id=after-hop"


# ---- balancing ---------------------------------------------------------------------------------------------
def test_round_robin_cycles_per_request_on_one_connection(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        seq = []
        for i in range(12):
            c.send(build("GET", "/echo?i=%d" % i))
            seq.append(c.read_response().header("x-backend"))
    assert sorted(seq[:3]) == ["b1", "b2", "b3"], seq
    assert seq == seq[:3] * 4, "round robin did not cycle exactly: %s" % seq


def test_round_robin_across_connections(lb: BalrsProcess) -> None:
    seq = [request(lb.addr, "GET", "/echo?i=%d" % i).header("x-backend") for i in range(9)]
    assert sorted(seq[:3]) == ["b1", "b2", "b3"] and seq == seq[:3] * 3, seq


def test_smooth_weights_5_1_1(three: list[TestBackend], make_lb: Callable[..., BalrsProcess]) -> None:
    lb = make_lb([(three[0], 5), (three[1], 1), (three[2], 1)], strategy="weighted_round_robin")
    with Client(lb.addr) as c:
        seq = []
        for i in range(70):
            c.send(build("GET", "/echo?i=%d" % i))
            seq.append(c.read_response().header("x-backend"))
    counts = {b: seq.count(b) for b in ("b1", "b2", "b3")}
    assert counts == {"b1": 50, "b2": 10, "b3": 10}, counts
    longest = max(len(run) for run in "".join("x" if b == "b1" else "." for b in seq).split("."))
    assert longest < 5, "b1 got %d in a row (smooth weighted round robin never gives five): %s" % (
        longest,
        seq,
    )


# ---- the upstream pool: a pooled connection the backend closed --------------------------------------------
def test_idle_pooled_connection_closed_by_backend_get_succeeds(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b = make_backend("b1")
    lb = make_lb([b])
    with Client(lb.addr) as c:
        c.send(build("GET", "/close-after/50"))
        assert c.read_response().status == 200
        # The backend closes the idle connection balrs keeps in its pool (50 ms after the response).
        assert wait_for(lambda: b.open_conns() == 0, 3), "the backend did not close its connection"
        c.send(build("GET", "/echo?id=after-idle-close"))
        r = c.read_response()
    assert r.status == 200, "GET after the backend closed a pooled connection: %s %r" % (
        r.status,
        r.body[:80],
    )
    assert r.json()["target"] == "/echo?id=after-idle-close"


def test_idle_pooled_connection_closed_by_backend_post_never_twice(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b = make_backend("b1")
    lb = make_lb([b])
    with Client(lb.addr) as c:
        c.send(build("GET", "/close-after/50"))
        assert c.read_response().status == 200
        assert wait_for(lambda: b.open_conns() == 0, 3), "the backend did not close its connection"
        c.send(build("POST", "/echo?id=post-after-idle-close", body=b"once"))
        r = c.read_response()
    assert r.status in (200, 502)
    n = len([x for x in b.reqs() if x["target"] == "/echo?id=post-after-idle-close"])
    assert n <= 1, "POST reached the backend %d times" % n
    if r.status == 200:
        assert n == 1 and r.json()["body_sha256"] == sha(b"once")


def test_stale_pooled_connection_race_get_retried_on_fresh_connection(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b = make_backend("b1")
    lb = make_lb([b])
    with Client(lb.addr) as c:
        c.send(build("GET", "/drop-next"))
        first = c.read_response()
        assert first.status == 200
        c.send(build("GET", "/echo?id=race"))
        r = c.read_response()
    recs = [x for x in b.reqs() if x["target"] == "/echo?id=race"]
    assert recs and recs[0]["conn"] == first.json()["conn"] and recs[0]["dropped"], (
        "precondition: balrs should have reused the pooled connection (records %s)" % recs
    )
    assert r.status == 200, "idempotent GET on a stale pooled connection not retried: %s" % r.status
    assert r.json()["conn"] != first.json()["conn"]
    assert len(recs) == 2


def test_stale_pooled_connection_race_post_not_sent_twice(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b = make_backend("b1")
    lb = make_lb([b])
    with Client(lb.addr) as c:
        c.send(build("GET", "/drop-next"))
        assert c.read_response().status == 200
        c.send(build("POST", "/echo?id=race-post", body=b"payload"))
        r = c.read_response()
    time.sleep(0.1)
    recs = [x for x in b.reqs() if x["target"] == "/echo?id=race-post"]
    assert len(recs) == 1, "POST reached the backend %d times (non-idempotent: never retried)" % len(recs)
    assert r.status == 502 if recs[0]["dropped"] else r.status == 200


# ---- memory: backpressure in both directions ---------------------------------------------------------------
def test_slow_reader_of_20mib_response_bounded_memory(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    n = 20 * MiB
    b = make_backend("b1", sndbuf=262144)
    lb = make_lb([b])
    assert request(lb.addr, "GET", "/big/%d" % MiB, keep_body=False, timeout=10).status == 200  # warm up
    time.sleep(0.1)
    base = lb.rss_kb()
    with RssSampler(lb.pid) as sampler, Client(lb.addr, timeout=30, rcvbuf=65536) as c:
        c.send(build("GET", "/big/%d" % n, [("Connection", "close")]))
        time.sleep(1.0)  # slow reader: without backpressure balrs would buffer the body meanwhile
        r = c.read_response(keep_body=False, timeout=30)
    assert r.status == 200 and r.body_len == n and r.body_sha == big_sha(n)
    growth = (sampler.peak - base) / 1024.0
    assert growth < 8.0, "balrs RSS grew by %.1f MiB streaming 20 MiB to a slow reader" % growth


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upload_20mib_to_slow_backend_bounded_memory(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess], framing: str
) -> None:
    n = 20 * MiB
    body = big_body(n)
    b = make_backend("b1", rcvbuf=65536)
    lb = make_lb([b])
    assert request(lb.addr, "POST", "/echo", body=body[:MiB], timeout=10).status == 200  # warm up
    time.sleep(0.1)
    base = lb.rss_kb()
    errors: list[BaseException] = []
    with RssSampler(lb.pid) as sampler, Client(lb.addr, timeout=30) as c:

        def sender() -> None:
            try:
                if framing == "chunked":
                    c.send(build("POST", "/echo?id=up&readdelay=1000", [("Transfer-Encoding", "chunked")]))
                    for i in range(0, n, 256 * 1024):
                        c.send(b"%x\r\n" % len(body[i : i + 256 * 1024]) + body[i : i + 256 * 1024] + b"\r\n")
                    c.send(b"0\r\n\r\n")
                else:
                    c.send(build("POST", "/echo?id=up&readdelay=1000", [("Content-Length", str(n))]) + body)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        r = c.read_response(timeout=30)
        t.join(5)
    assert not errors
    assert r.status == 200
    j = r.json()
    assert (j["body_len"], j["body_sha256"]) == (n, big_sha(n))
    growth = (sampler.peak - base) / 1024.0
    assert growth < 8.0, "balrs RSS grew by %.1f MiB while a slow backend read a 20 MiB upload" % growth


# ---- many idle connections ---------------------------------------------------------------------------------
def test_500_idle_connections_do_not_slow_a_fresh_request(lb: BalrsProcess) -> None:
    t0 = time.monotonic()
    assert request(lb.addr, "GET", "/echo?id=baseline").status == 200
    baseline = time.monotonic() - t0
    idle: list[Client] = []
    try:
        for i in range(400):
            idle.append(Client(lb.addr, timeout=3))
        for i in range(100):  # idle between keep-alive requests
            c = Client(lb.addr, timeout=3)
            idle.append(c)
            c.send(build("GET", "/echo?id=idle%d" % i))
            assert c.read_response().status == 200
        time.sleep(0.2)
        t0 = time.monotonic()
        r = request(lb.addr, "GET", "/echo?id=fresh", timeout=3)
        took = time.monotonic() - t0
        assert r.status == 200 and r.json()["target"] == "/echo?id=fresh"
        assert took < 0.5, "fresh request took %.3fs with 500 idle connections (baseline %.3fs)" % (
            took,
            baseline,
        )
        assert not any(c.peer_closed() for c in idle[:400:50]), "idle connections were closed early"
    finally:
        for c in idle:
            c.close()


def test_half_close_after_pipelined_requests_answers_all(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    # `printf 'GET ...GET ...' | nc host port`: the client sends its requests and half-closes; every
    # complete request is still answered, in order, then balrs closes.
    import socket as _socket

    s = _socket.create_connection(lb.addr, timeout=5)
    try:
        s.sendall(b"".join(build("GET", "/echo?id=hc%d" % i) for i in range(3)))
        s.shutdown(_socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data.count(b"HTTP/1.1 200") == 3, data[:300]
    positions = [data.find(b"id=hc%d" % i) for i in range(3)]
    assert -1 not in positions and positions == sorted(positions), "answers missing or out of order"
