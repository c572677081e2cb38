"""Integration: faults on both sides, timeouts, limits and request smuggling, against the real balrs process.

Backends that refuse, black-hole, hang, break off or send garbage; clients that are slow, idle or
malicious. Every smuggling case checks the status balrs answers with and that no backend parsed a hidden
second request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Callable, Dict, List, Tuple

import pytest
from support import (
    CLOSE_MID_HALF,
    STALL_BODY_PART,
    BalrsProcess,
    Client,
    Closed,
    TestBackend,
    Timeout,
    all_reqs,
    big_body,
    build,
    chunk_encode,
    hget,
    request,
    saw_fragment,
    sha,
    start_balrs,
    wait_for,
)

MiB = 1024 * 1024


# ---- balancers with tight timeouts and limits, shared by this module's tests -------------------------------
# TIGHT: 1 s timeouts, for the tests whose peers pause 400 ms at a time and must not be cut off (and for
# the limits). QUICK: 400 ms timeouts, for the tests that wait for a timeout to fire.
TIGHT = {
    "header_timeout": "1s",
    "client_timeout": "1s",
    "backend_timeout": "1s",
    "max_body_bytes": "1000",
    "max_header_bytes": "8k",
}
QUICK = {"header_timeout": "400ms", "client_timeout": "400ms", "backend_timeout": "400ms"}
# How late a timeout may fire on this loaded machine and still count as firing "at" its configured time.
LATE = 1.1

Shared = Tuple[List[BalrsProcess], List[TestBackend], Dict[str, str]]


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str, keys: dict[str, str]) -> Iterator[Shared]:
    bs = [TestBackend("t%d" % i) for i in (1, 2)]
    holder = [start_balrs(tmp_path_factory.mktemp(name), bs, **keys)]
    yield holder, bs, keys
    for lb in holder:
        lb.stop()
    for b in bs:
        b.stop()


def _fresh(
    shared: Shared, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BalrsProcess, list[TestBackend]]]:
    holder, bs, keys = shared
    if not holder[-1].alive():
        holder.append(start_balrs(tmp_path_factory.mktemp("restarted"), bs, **keys))
    for b in bs:
        b.reset()
    yield holder[-1], bs
    assert holder[-1].alive(), "balrs exited during this test; stderr:\n%s" % holder[-1].log_tail()


@pytest.fixture(scope="module")
def _tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    yield from _shared(tmp_path_factory, "tight", TIGHT)


@pytest.fixture(scope="module")
def _quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    yield from _shared(tmp_path_factory, "quick", QUICK)


@pytest.fixture
def tight(_tight: Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BalrsProcess, list[TestBackend]]]:
    """(balancer, backends): header/client/backend timeouts 1s, max_body_bytes 1000, max_header_bytes 8k."""
    yield from _fresh(_tight, tmp_path_factory)


@pytest.fixture
def quick(_quick: Shared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BalrsProcess, list[TestBackend]]]:
    """(balancer, backends): header/client/backend timeouts 400ms."""
    yield from _fresh(_quick, tmp_path_factory)


# ---- connecting to backends --------------------------------------------------------------------------------
def test_connect_refused_is_retried_on_another_backend(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    bs = [make_backend("b1"), make_backend("d2", "dead"), make_backend("b3")]
    lb = make_lb(bs, retries=1)
    statuses = [request(lb.addr, "GET", "/echo?i=%d" % i).status for i in range(6)]
    with Client(lb.addr) as c:
        for i in range(6):
            c.send(build("GET", "/echo?ka=%d" % i))
            statuses.append(c.read_response().status)
    assert statuses == [200] * 12, "with retries=1 and two live backends clients saw %s" % statuses
    assert len(bs[0].reqs()) + len(bs[2].reqs()) == 12


def test_all_backends_refused_502_quickly(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb([make_backend("d%d" % i, "dead") for i in (1, 2, 3)], retries=2)
    t0 = time.monotonic()
    r = request(lb.addr, "GET", "/echo")
    took = time.monotonic() - t0
    assert r.status == 502, "every backend refused: expected 502, got %s" % r.status
    assert took < 1.0, "502 took %.2fs" % took


def test_blackholed_backends_504_after_connect_timeout_with_retries(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(
        [make_backend("h%d" % i, "blackhole") for i in (1, 2, 3)], connect_timeout="400ms", retries=1
    )
    t0 = time.monotonic()
    r = request(lb.addr, "GET", "/echo", timeout=6)
    took = time.monotonic() - t0
    # Contract: a connect that times out on every try gives 504; two tries of 400 ms each.
    assert r.status == 504, "status %s after %.2fs" % (r.status, took)
    assert 0.75 <= took <= 2.5, "answered after %.2fs (connect_timeout 400ms, retries 1)" % took


def test_blackholed_backend_retried_on_a_live_one(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    live = make_backend("b2")
    lb = make_lb([make_backend("h1", "blackhole"), live], connect_timeout="300ms", retries=1)
    times = []
    for i in range(4):
        t0 = time.monotonic()
        r = request(lb.addr, "GET", "/echo?i=%d" % i, timeout=5)
        times.append(time.monotonic() - t0)
        assert r.status == 200 and r.header("x-backend") == "b2", (i, r.status)
    assert max(times) >= 0.25, "no request waited for the black-holed backend's connect_timeout: %s" % times
    assert len(live.reqs()) == 4


# ---- backend misbehaviour ----------------------------------------------------------------------------------
def test_backend_timeout_504_and_request_sent_once(quick: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = quick
    t0 = time.monotonic()
    r = request(lb.addr, "GET", "/hang", timeout=6)
    took = time.monotonic() - t0
    assert r.status == 504 and r.header("x-backend") is None
    assert 0.35 <= took <= 0.4 + LATE, "504 after %.2fs with backend_timeout 400ms" % took
    time.sleep(0.2)
    n = len([x for x in all_reqs(bs) if x["path"] == "/hang"])
    assert n == 1, "/hang reached a backend %d times (never retried after backend_timeout)" % n


def test_backend_silent_after_head_closes_client_connection(
    quick: tuple[BalrsProcess, list[TestBackend]],
) -> None:
    lb, _ = quick
    with Client(lb.addr, timeout=6) as c:
        c.send(build("GET", "/stall-body"))
        t0 = time.monotonic()
        r = c.read_response(timeout=6)
        took = time.monotonic() - t0
        assert r.status == 200 and not r.complete, r
        assert r.body == STALL_BODY_PART
        assert c.eof, "connection left open after a truncated body"
    assert 0.3 <= took <= 0.4 + LATE, "client connection closed %.2fs after the backend fell silent" % took


def test_backend_closes_mid_body_content_length(lb: BalrsProcess) -> None:
    # The head arrived complete, so it is relayed; the cut must stay visible: fewer bytes, then close.
    with Client(lb.addr, timeout=5) as c:
        c.send(build("GET", "/close-mid"))
        r = c.read_response(timeout=5)
        assert r.status == 200 and r.header("content-length") == "1000", r
        assert not r.complete and r.body == CLOSE_MID_HALF, "truncated body presented as complete: %r" % r
        assert c.eof, "client connection not closed after a truncated body"


def test_backend_closes_mid_body_chunked_no_final_chunk(lb: BalrsProcess) -> None:
    with Client(lb.addr, timeout=5) as c:
        c.send(build("GET", "/close-mid-chunked"))
        raw = c.read_available(3)
        closed = c.eof
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:60]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    assert body.startswith(b"5\r\nhello\r\n6\r\n world\r\n"), body
    assert b"0\r\n\r\n" not in body, "final chunk sent after the backend broke off: %r" % body
    assert closed, "client connection not closed after a truncated chunked body"


def test_garbage_from_backend_502(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/garbage"))
        r = c.read_response()
    assert r.status == 502 and r.header("x-backend") is None


def test_backend_closes_without_response_502(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    r = request(lb.addr, "GET", "/close-now")
    assert r.status == 502
    assert 1 <= len(all_reqs(backends)) <= 2  # retries = 1


# ---- unusual or broken response heads and bodies from the backend ------------------------------------------
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
@pytest.mark.parametrize("name", ["cl-differing", "cl-bad", "head-too-large", "unsolicited-101"])
def test_malformed_response_head_502(lb: BalrsProcess, name: str, version: str) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/" + name, version=version))
        r = c.read_response()
    assert r.status == 502 and r.header("x-backend") is None, r


@pytest.mark.parametrize("name", ["bare-lf", "obs-fold"])
def test_lax_response_head_rejected_or_cleaned(lb: BalrsProcess, name: str) -> None:
    # RFC 9112 sections 2.2 and 5.2: a recipient may accept bare LF / replace obs-fold with SP; the client
    # must still get a well-formed response (the strict client raises otherwise).
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/" + name))
        r = c.read_response()
    assert r.status == 502 or (r.status == 200 and r.body == b"ok" and r.complete), r


def test_response_with_cl_and_te_is_reframed_or_rejected(lb: BalrsProcess) -> None:
    # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length; never pass both on.
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/cl-and-te"))
        r = c.read_response()  # raises on both headers
        assert r.status == 502 or (r.status == 200 and r.complete and r.body == b"hello!"), r
        c.send(build("GET", "/echo?id=next"))
        assert c.read_response().json()["target"] == "/echo?id=next"


def test_invalid_chunk_in_response_truncates_visibly(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/bad-chunk"))
        r = c.read_response()
        assert r.status == 502 or (not r.complete and c.eof), r


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_response_trailer_section(lb: BalrsProcess, version: str) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/trailer", version=version))
        r = c.read_response()
    assert r.status == 200 and r.complete and r.body == b"hello"
    assert version == "HTTP/1.1" or r.framing != "chunked"


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_early_hints_relayed_only_to_http11(lb: BalrsProcess, version: str) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/early-hints", version=version))
        r = c.read_response()
    assert r.status == 200 and r.body == b"ok"
    if version == "HTTP/1.0":
        assert not r.interim, "1xx sent to an HTTP/1.0 client"
    else:
        assert all(st == 103 for st, _ in r.interim)


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_http10_backend_close_delimited_response(lb: BalrsProcess, version: str) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/http10-close", version=version))
        r = c.read_response()
        assert r.status == 200 and r.complete and r.body == b"old-style-body"
        assert r.framing == ("chunked" if version == "HTTP/1.1" else "close"), r.framing


def test_304_with_content_length_has_no_body(lb: BalrsProcess) -> None:
    # RFC 9110 section 8.6: a 304's Content-Length describes the selected representation, not a body.
    with Client(lb.addr) as c:
        c.send(build("GET", "/resp/304-with-cl"))
        r = c.read_response()
        assert r.status == 304 and r.body == b""
        c.send(build("GET", "/echo?id=after-304"))
        r2 = c.read_response(timeout=3)
    assert r2.status == 200 and r2.json()["target"] == "/echo?id=after-304"


def test_pipelined_request_after_a_502(lb: BalrsProcess) -> None:
    with Client(lb.addr) as c:
        c.send(build("GET", "/garbage") + build("GET", "/echo?id=after-502"))
        r = c.read_response()
        assert r.status == 502
        if r.has_token("connection", "close"):
            assert c.wait_closed(2)[0]
        else:
            r2 = c.read_response(timeout=3)
            assert r2.status == 200 and r2.json()["target"] == "/echo?id=after-502"


@pytest.mark.parametrize(
    "first",
    [
        build("GET", "/echo?id=first", [("Connection", "close")]),
        b"GET /echo?id=first HTTP/1.0\r\n\r\n",
    ],
)
def test_no_request_processed_after_connection_close(
    lb: BalrsProcess, backends: list[TestBackend], first: bytes
) -> None:
    # RFC 9112 section 9.6: after a request with "close" the server processes no further requests.
    with Client(lb.addr) as c:
        c.send(first + build("GET", "/echo?id=second"))
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?id=first"
        closed, extra, _ = c.wait_closed(2)
    assert closed and extra == b""
    time.sleep(0.1)
    assert [x["target"] for x in all_reqs(backends)] == ["/echo?id=first"]


# ---- slow but live peers: no timeout may cut them off ------------------------------------------------------
def test_slow_upload_with_gaps_below_every_timeout(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, _ = tight
    with Client(lb.addr) as c:  # 1.6 s in all: longer than each 1 s timeout, but never silent for 1 s
        c.send(build("POST", "/echo", [("Content-Length", "400")]))
        for _ in range(4):
            time.sleep(0.4)
            c.send(b"u" * 100)
        r = c.read_response()
    assert r.status == 200 and r.json()["body_sha256"] == sha(b"u" * 400)


def test_slow_response_with_gaps_below_backend_timeout(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, _ = tight
    with Client(lb.addr) as c:
        c.send(build("GET", "/slow-body"))
        r = c.read_response()
    assert r.status == 200 and r.complete and r.body_len == 400


# The two tests below hunt a race, so they repeat: header_timeout 1ms makes balrs re-check a paused
# connection every millisecond (its check interval is the smallest timeout), so one of those checks usually
# lands in the loop turn that resumes reading; eight tries make a miss very unlikely (about 0.1%).
RACE_TRIES = 8


def test_backpressure_pause_is_not_backend_silence(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # balrs stops reading the backend while the client does not read: that is not the backend's silence
    # (contract: backend_timeout is the longest silence from a backend while a response is due).
    n = 8 * MiB
    lb = make_lb([make_backend("b1", sndbuf=262144)], backend_timeout="300ms", header_timeout="1ms")
    for attempt in range(RACE_TRIES):
        with Client(lb.addr, timeout=20, rcvbuf=65536) as c:
            c.send(build("GET", "/big/%d" % n))
            time.sleep(0.5)  # longer than backend_timeout: balrs has paused reading the backend meanwhile
            r = c.read_response(keep_body=False, timeout=20)
        assert r.status == 200 and r.complete and r.body_len == n, "attempt %d: %r" % (attempt, r)


def test_backpressure_pause_is_not_client_silence(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    n = 8 * MiB  # more than the kernel buffers hold, so balrs must pause reading the client
    body = big_body(n)
    # body_timeout is the client's longest silence mid-body (client_timeout covers no request in progress).
    lb = make_lb(
        [make_backend("b1", rcvbuf=65536)], client_timeout="250ms", body_timeout="250ms", header_timeout="1ms"
    )
    for attempt in range(RACE_TRIES):
        with Client(lb.addr, timeout=20) as c:
            # The backend waits 450 ms before reading: balrs stops reading the (always sending) client.
            t = threading.Thread(
                target=_send_quietly,
                args=(c, build("POST", "/echo?readdelay=450", [("Content-Length", str(n))]) + body),
                daemon=True,
            )
            t.start()
            r = c.read_response(timeout=20)
            t.join(5)
        assert r.status == 200 and r.json()["body_len"] == n, "attempt %d: %s %r" % (
            attempt,
            r.status,
            r.body[:40],
        )


def _send_quietly(c: Client, data: bytes) -> None:
    try:
        c.send(data)
    except OSError:
        pass


def test_client_timeout_does_not_cut_a_response_in_progress(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # Contract: client_timeout covers a connection with no request in progress.
    n = 8 * MiB
    lb = make_lb([make_backend("b1")], client_timeout="300ms", backend_timeout="10s")
    with Client(lb.addr, timeout=20, rcvbuf=65536) as c:
        c.send(build("GET", "/big/%d" % n))
        time.sleep(0.7)  # longer than client_timeout, with the response in progress throughout
        r = c.read_response(keep_body=False, timeout=20)
    assert r.status == 200 and r.complete and r.body_len == n, "got %d of %d bytes" % (r.body_len, n)


def test_client_timeout_does_not_cut_a_request_body_in_progress(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb([make_backend("b1")], client_timeout="300ms", backend_timeout="10s")
    with Client(lb.addr) as c:
        c.send(build("POST", "/echo?id=paused", [("Content-Length", "200")]) + b"a" * 100)
        time.sleep(0.7)  # longer than client_timeout, with the request in progress throughout
        _send_quietly(c, b"b" * 100)
        r = c.read_response()
    assert r.status == 200, "paused upload answered %s" % r.status
    assert r.json()["body_sha256"] == sha(b"a" * 100 + b"b" * 100)


def test_backend_timeout_does_not_run_while_the_client_sends_the_body(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # Contract: backend_timeout is the longest silence from a backend while a response is due; no
    # response is due before the request is complete.
    lb = make_lb([make_backend("b1")], client_timeout="10s", backend_timeout="300ms")
    with Client(lb.addr) as c:
        c.send(build("POST", "/echo?id=paused", [("Content-Length", "200")]) + b"a" * 100)
        time.sleep(0.7)  # longer than backend_timeout, with the request body still coming
        _send_quietly(c, b"b" * 100)
        r = c.read_response()
    assert r.status == 200, "paused upload answered %s" % r.status
    assert r.json()["body_sha256"] == sha(b"a" * 100 + b"b" * 100)


def test_response_after_a_slow_backend_not_cut_by_a_stale_write_clock(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    n = 8 * MiB
    lb = make_lb(
        [make_backend("b1", sndbuf=262144)],
        client_timeout="500ms",
        header_timeout="100ms",
        backend_timeout="5s",
    )
    with Client(lb.addr, timeout=20, rcvbuf=65536) as c:
        c.send(build("GET", "/big/%d?delay=700" % n))  # the head comes after 700 ms, then 8 MiB at once
        time.sleep(1.0)  # the client reads 300 ms after the response started: less than client_timeout
        r = c.read_response(keep_body=False, timeout=20)
    assert r.status == 200 and r.complete and r.body_len == n, "got %d of %d bytes" % (r.body_len, n)


# ---- client timeouts ---------------------------------------------------------------------------------------
def test_header_timeout_408_then_close(quick: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = quick
    with Client(lb.addr, timeout=5) as c:
        t0 = time.monotonic()
        c.send(b"GET /echo HTTP/1.1\r\nHost: lb.test\r\nX-Partial: ")
        r = c.read_response(timeout=5)
        took = time.monotonic() - t0
        assert r.status == 408, r
        assert r.has_token("connection", "close")
        closed, extra, _ = c.wait_closed(2)
    assert closed and extra == b""
    assert 0.35 <= took <= 0.4 + LATE, "408 after %.2fs with header_timeout 400ms" % took
    assert not all_reqs(bs), "an incomplete head was forwarded"


def test_header_timeout_counts_from_first_byte_slowloris(
    quick: tuple[BalrsProcess, list[TestBackend]],
) -> None:
    lb, bs = quick
    with Client(lb.addr, timeout=5) as c:
        t0 = time.monotonic()
        c.send(b"GET /echo HTTP/1.1\r\nHost: lb.test\r\nX-Slow: ")
        closed_at = None
        while time.monotonic() - t0 < 3:
            time.sleep(0.15)
            if c.peer_closed():
                closed_at = time.monotonic() - t0
                break
            try:
                c.send(b"a")
            except OSError:
                closed_at = time.monotonic() - t0
                break
        data = c.buf
    assert closed_at is not None, "a head trickling in one byte per 150 ms was never cut off"
    assert 0.35 <= closed_at <= 0.4 + LATE, "cut off after %.2fs (header_timeout 400ms)" % closed_at
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:40]
    assert not all_reqs(bs)


def test_client_timeout_closes_idle_keepalive_silently(quick: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, _ = quick
    with Client(lb.addr, timeout=5) as c:
        c.send(build("GET", "/echo"))
        assert c.read_response().status == 200
        closed, data, took = c.wait_closed(3)
    assert closed, "idle keep-alive connection still open 3s after the response (client_timeout 400ms)"
    assert data == b"", "sent %r when closing an idle connection" % data[:40]
    assert 0.3 <= took <= 0.4 + LATE, "closed %.2fs after the response (client_timeout 400ms)" % took


def test_client_timeout_closes_new_silent_connection(quick: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, _ = quick
    with Client(lb.addr, timeout=5) as c:
        closed, data, took = c.wait_closed(3)
    assert closed and data == b""
    assert 0.3 <= took <= 0.4 + LATE, "closed %.2fs after connecting (client_timeout 400ms)" % took


def test_retries_zero_means_no_retry(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    live = make_backend("b2")
    lb = make_lb([make_backend("d1", "dead"), live], retries=0)
    statuses = sorted(request(lb.addr, "GET", "/echo?i=%d" % i).status for i in range(4))
    assert statuses == [200, 200, 502, 502], statuses


def test_max_connections_extra_clients_wait_in_backlog(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb([make_backend("b1")], max_connections=2)
    a, b = Client(lb.addr), Client(lb.addr)
    try:
        a.send(build("GET", "/echo?id=a"))
        assert a.read_response().status == 200
        with Client(lb.addr) as third:  # the kernel completes the handshake; balrs does not accept yet
            third.send(build("GET", "/echo?id=third"))
            with pytest.raises(Timeout):
                third.read_response(timeout=0.7)
            a.close()
            r = third.read_response(timeout=3)
            assert r.status == 200 and r.json()["target"] == "/echo?id=third"
    finally:
        a.close()
        b.close()


# ---- limits ------------------------------------------------------------------------------------------------
def test_content_length_over_max_body_413(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = tight
    with Client(lb.addr, timeout=4) as c:
        c.send(build("POST", "/echo?id=big", [("Content-Length", "5000")]))
        r = c.read_response(timeout=3)  # before any body byte was sent
        assert r.status == 413 and r.header("x-backend") is None
        if r.has_token("connection", "close") or c.wait_closed(0.3)[0]:
            closed, _, _ = c.wait_closed(2)
            assert closed, "said Connection: close but kept the connection open"
        else:
            # Kept open: it must skip the announced body and read what follows as the next request.
            c.send(b"z" * 5000 + build("GET", "/echo?id=next"))
            r2 = c.read_response()
            assert r2.status == 200 and r2.json()["target"] == "/echo?id=next"
    assert not [x for x in all_reqs(bs) if x["target"] == "/echo?id=big"], "over-limit request forwarded"


def test_chunked_body_over_max_body_413(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = tight
    with Client(lb.addr, timeout=4) as c:
        c.send(build("POST", "/echo?id=bigchunked", [("Transfer-Encoding", "chunked")]))
        try:
            for _ in range(4):
                c.send(b"258\r\n" + b"q" * 600 + b"\r\n")
                time.sleep(0.02)
            c.send(b"0\r\n\r\n")
        except OSError:
            pass
        r = c.read_response(timeout=3)
        assert r.status == 413, r
        closed, _, _ = c.wait_closed(2)
        assert closed, "connection kept open in the middle of a rejected chunked body"
    assert not [x for x in all_reqs(bs) if x["complete"]], "the over-limit body reached a backend in full"


@pytest.mark.parametrize("size,expect", [(1000, 200), (999, 200)])
def test_bodies_within_max_body_pass(
    tight: tuple[BalrsProcess, list[TestBackend]], size: int, expect: int
) -> None:
    lb, _ = tight
    body = b"k" * size
    r = request(lb.addr, "POST", "/echo", body=body)
    assert r.status == expect and r.json()["body_sha256"] == sha(body)
    with Client(lb.addr) as c:
        c.send(
            build("POST", "/echo", [("Transfer-Encoding", "chunked")])
            + chunk_encode([body[i : i + 100] for i in range(0, size, 100)])
        )
        r = c.read_response()
    assert r.status == expect and r.json()["body_sha256"] == sha(body)


def test_header_block_over_max_header_bytes_431(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = tight
    hs = [("X-H%03d" % i, "v" * 200) for i in range(100)]
    with Client(lb.addr) as c:
        try:
            c.send(build("GET", "/echo", hs))
        except OSError:
            pass
        r = c.read_response(timeout=3)
    assert r.status == 431, r
    assert not all_reqs(bs)


def test_long_request_target_414_or_431(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = tight
    with Client(lb.addr) as c:
        try:
            c.send(build("GET", "/echo?q=" + "u" * 10000))
        except OSError:
            pass
        r = c.read_response(timeout=3)
    assert r.status in (414, 431), r
    assert not all_reqs(bs)


def test_headers_within_limit_pass(tight: tuple[BalrsProcess, list[TestBackend]]) -> None:
    lb, bs = tight
    r = request(lb.addr, "GET", "/echo", [("X-H%02d" % i, "v" * 200) for i in range(25)])
    assert r.status == 200
    assert len([n for n, _ in all_reqs(bs)[0]["headers"] if n.startswith("X-H")]) == 25


def test_early_response_before_upload_is_read(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    n = 8 * MiB
    errors: list[BaseException] = []
    with Client(lb.addr, timeout=6) as c:

        def sender() -> None:
            try:
                c.send(build("POST", "/early-413", [("Content-Length", str(n))]) + b"u" * n)
            except OSError as exc:
                errors.append(exc)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        r = c.read_response(timeout=5)
        assert r.status == 413 and r.header("x-backend") is not None and r.body == b"too large"
        closed, extra, _ = c.wait_closed(4)
        t.join(5)
    assert closed, "connection left open after an early response to an unfinished upload"
    assert extra == b""
    assert not t.is_alive()
    recs = all_reqs(backends)
    assert len(recs) == 1 and recs[0].get("early")


# ---- request smuggling and malformed requests --------------------------------------------------------------
SMUG = b"GET /smuggled HTTP/1.1\r\nHost: lb.test\r\n\r\n"
BODY0 = b"0\r\n\r\n" + SMUG


def head(
    method: bytes = b"POST",
    target: bytes = b"/echo?id=first",
    lines: tuple[bytes, ...] = (),
    version: bytes = b"HTTP/1.1",
    host: bool = True,
) -> bytes:
    out = b"%s %s %s\r\n" % (method, target, version)
    if host:
        out += b"Host: lb.test\r\n"
    return out + b"".join(ln + b"\r\n" for ln in lines) + b"\r\n"


CL_BODY0 = b"Content-Length: %d" % len(BODY0)
TE_CHUNKED = b"Transfer-Encoding: chunked"

# name: (payload, statuses balrs may answer with, must the connection close,
#        may it forward CL+TE as chunked)
SMUGGLING: dict[str, tuple[bytes, tuple[int, ...], bool, bool]] = {
    "cl_then_te": (head(lines=(CL_BODY0, TE_CHUNKED)) + BODY0, (400,), True, True),
    "te_then_cl": (head(lines=(TE_CHUNKED, CL_BODY0)) + BODY0, (400,), True, True),
    "cl_differing_duplicates": (
        head(lines=(b"Content-Length: 5", b"Content-Length: %d" % (5 + len(SMUG)))) + b"hello" + SMUG,
        (400,),
        True,
        False,
    ),
    "cl_differing_list": (
        head(lines=(b"Content-Length: 5, %d" % (5 + len(SMUG)),)) + b"hello" + SMUG,
        (400,),
        True,
        False,
    ),
    "cl_plus_sign": (head(lines=(b"Content-Length: +%d" % len(SMUG),)) + SMUG, (400,), True, False),
    "cl_negative": (head(lines=(b"Content-Length: -1",)) + SMUG, (400,), True, False),
    "cl_hex": (head(lines=(b"Content-Length: 0x%x" % len(SMUG),)) + SMUG, (400,), True, False),
    "chunk_size_not_hex": (
        head(lines=(TE_CHUNKED,)) + b"zz\r\nhello\r\n0\r\n\r\n" + SMUG,
        (400,),
        True,
        False,
    ),
    "chunk_size_0x_prefix": (
        head(lines=(TE_CHUNKED,)) + b"0x5\r\nhello\r\n0\r\n\r\n" + SMUG,
        (400,),
        True,
        False,
    ),
    "chunk_size_overflow": (
        head(lines=(TE_CHUNKED,)) + b"fffffffffffffffff1\r\n" + b"a" * 17 + b"\r\n0\r\n\r\n" + SMUG,
        (400, 413),
        True,
        False,
    ),
    "chunk_size_negative": (
        head(lines=(TE_CHUNKED,)) + b"-5\r\nhello\r\n0\r\n\r\n" + SMUG,
        (400,),
        True,
        False,
    ),
    "chunk_data_longer_than_size": (
        head(lines=(TE_CHUNKED,)) + b"3\r\nhello\r\n0\r\n\r\n" + SMUG,
        (400,),
        True,
        False,
    ),
    "te_gzip_only": (
        head(lines=(b"Transfer-Encoding: gzip",)) + b"\x1f\x8bjunk" + SMUG,
        (501, 400),
        True,
        False,
    ),
    "te_chunked_not_last": (
        head(lines=(b"Transfer-Encoding: chunked, gzip",)) + BODY0,
        (400, 501),
        True,
        False,
    ),
    "te_chunked_twice": (
        head(lines=(b"Transfer-Encoding: chunked, chunked",)) + BODY0,
        (400, 501),
        True,
        False,
    ),
    "te_unknown_token": (
        head(lines=(b"Transfer-Encoding: xchunked", CL_BODY0)) + BODY0,
        (400, 501),
        True,
        False,
    ),
    "te_obs_fold_with_cl": (
        head(lines=(CL_BODY0, b"Transfer-Encoding:", b" chunked")) + BODY0,
        (400,),
        True,
        False,
    ),
    "te_space_before_colon": (
        head(lines=(CL_BODY0, b"Transfer-Encoding : chunked")) + BODY0,
        (400,),
        True,
        False,
    ),
    "cl_space_before_colon": (head(lines=(b"Content-Length : %d" % len(SMUG),)) + SMUG, (400,), True, False),
    "te_vertical_tab": (
        head(lines=(CL_BODY0, b"Transfer-Encoding: \x0bchunked")) + BODY0,
        (400, 501),
        True,
        False,
    ),
    "obs_fold_plain_header": (head(b"GET", b"/echo", (b"X-Fold: a", b"  b")), (400,), False, False),
    "nul_in_header_value": (head(b"GET", b"/echo", (b"X-Ctl: a\x00b",)), (400,), False, False),
    "bare_cr_in_header_value": (head(b"GET", b"/echo", (b"X-Ctl: a\rb",)), (400,), False, False),
    "ctl_in_header_name": (head(b"GET", b"/echo", (b"X-C\x01tl: a",)), (400,), False, False),
    "space_in_header_name": (head(b"GET", b"/echo", (b"X Foo: a",)), (400,), False, False),
    "empty_header_name": (head(b"GET", b"/echo", (b": a",)), (400,), False, False),
    "missing_host": (head(b"GET", b"/echo", host=False), (400,), False, False),
    "two_host_headers": (head(b"GET", b"/echo", (b"Host: other.test",)), (400,), False, False),
    "space_in_target": (b"GET /echo smuggled HTTP/1.1\r\nHost: lb.test\r\n\r\n", (400,), False, False),
    "bad_version": (b"GET /echo HTTP/1.x\r\nHost: lb.test\r\n\r\n", (400, 505), False, False),
}


def _judge(
    lb: BalrsProcess,
    backends: list[TestBackend],
    payload: bytes,
    allowed: tuple[int, ...],
    must_close: bool,
    chunked_forward_ok: bool,
    split: bool = False,
) -> None:
    r = None
    with Client(lb.addr, timeout=4) as c:
        try:
            if split:
                # The head alone first: balrs forwards it before it sees the bad body (the body
                # follows once a backend has parsed the head, or after 1 s if it never does).
                end = payload.index(b"\r\n\r\n") + 4
                c.send(payload[:end])
                target = payload.split(b" ", 2)[1].decode("latin-1")
                wait_for(lambda: any(x["target"] == target for x in all_reqs(backends)), 1.0)
                c.send(payload[end:])
            else:
                c.send(payload)
        except OSError:
            pass
        try:
            r = c.read_response(timeout=3)
        except Closed:
            pass
        except Timeout:
            pytest.fail("no response and the connection still open after 3s")
        extra = b"" if c.eof else c.read_available(0.5)
        closed = c.eof
    time.sleep(0.1)
    assert not saw_fragment(backends, b"/smuggled"), "SMUGGLED: a backend parsed the hidden request"
    recs = all_reqs(backends)
    assert r is not None, "connection closed without a response (expected %s)" % (allowed,)
    if chunked_forward_ok and 200 <= r.status < 300:
        # CL+TE may be forwarded as chunked without Content-Length, then the client connection closed.
        assert len(recs) == 1 and recs[0]["framing"] == "chunked"
        assert hget(recs[0]["headers"], "content-length") is None
        assert closed, "client connection not closed after forwarding a CL+TE request"
        return
    assert r.status in allowed, "status %s (expected %s); backends saw %s" % (
        r.status,
        allowed,
        [x["target"] for x in recs],
    )
    assert r.header("x-backend") is None, "the %d came from a backend: the request was forwarded" % r.status
    assert not [x for x in recs if x["complete"]], "rejected, but a backend received the complete request"
    assert b"HTTP/1." not in extra, "after the %d balrs kept parsing the rest as a request: %r" % (
        r.status,
        extra,
    )
    if must_close:
        assert closed, "connection left open after a request with unknowable framing (%d)" % r.status


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_vector_rejected(lb: BalrsProcess, backends: list[TestBackend], name: str) -> None:
    payload, allowed, must_close, chunked_forward_ok = SMUGGLING[name]
    _judge(lb, backends, payload, allowed, must_close, chunked_forward_ok)


@pytest.mark.parametrize("name", [n for n in SMUGGLING if n.startswith("chunk_")])
def test_smuggling_in_chunked_body_after_head_was_forwarded(
    lb: BalrsProcess, backends: list[TestBackend], name: str
) -> None:
    payload, allowed, must_close, chunked_forward_ok = SMUGGLING[name]
    _judge(lb, backends, payload, allowed, must_close, chunked_forward_ok, split=True)


def test_cl_and_te_in_http10_request_never_smuggled(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; close after the message.
    payload = head(version=b"HTTP/1.0", lines=(CL_BODY0, TE_CHUNKED)) + BODY0
    _judge(lb, backends, payload, (400,), True, True)


def test_bare_lf_rejected_or_normalised(lb: BalrsProcess, backends: list[TestBackend]) -> None:
    with Client(lb.addr, timeout=4) as c:
        c.send(b"GET /echo?id=lf HTTP/1.1\nHost: lb.test\nX-A: 1\n\n")
        r = c.read_response(timeout=3)
    assert r.status in (200, 400)
    recs = all_reqs(backends)
    if r.status == 400:
        assert r.header("x-backend") is None and not recs
    else:
        assert len(recs) == 1
        raw = recs[0]["raw_head"]
        assert raw.count(b"\n") == raw.count(b"\r\n"), "bare LF forwarded: %r" % raw


def test_identical_duplicate_content_length_not_smuggled(
    lb: BalrsProcess, backends: list[TestBackend]
) -> None:
    # RFC 9110 section 8.6: identical values may be accepted as one, or the message rejected.
    payload = head(lines=(b"Content-Length: 5", b"Content-Length: 5")) + b"hello" + SMUG
    with Client(lb.addr, timeout=4) as c:
        c.send(payload)
        r = c.read_response(timeout=3)
        second = None
        if r.status == 200 and not c.peer_closed():
            second = c.read_response(timeout=3)
    time.sleep(0.1)
    assert r.status in (200, 400)
    if r.status == 200:
        assert r.json()["body_sha256"] == sha(b"hello")
        # The bytes after the body are a real (pipelined) request here: it may be served, as its own request.
        assert second is None or second.json()["target"] == "/smuggled"


def test_body_timeout_answers_408_to_a_stalled_upload(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # body_timeout (nginx client_body_timeout): a client silent mid-body gets 408 and the connection closes.
    b = make_backend("b1")
    lb = make_lb([b], body_timeout="500ms", client_timeout="10s", backend_timeout="10s")
    with Client(lb.addr, timeout=5) as c:
        c.send(build("POST", "/echo?id=stalled", [("Content-Length", "200")]) + b"a" * 100)
        t0 = time.monotonic()
        r = c.read_response(timeout=5)
        elapsed = time.monotonic() - t0
        closed, _data, _t = c.wait_closed(3)
    assert r.status == 408, "stalled upload answered %s" % r.status
    assert 0.4 <= elapsed <= 2.5, "408 after %.2fs with body_timeout 500ms" % elapsed
    assert closed, "connection left open after 408 mid-body"


def test_send_timeout_cuts_a_client_that_stops_reading(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # send_timeout (nginx send_timeout): a client that stops reading its response is disconnected; the
    # response is visibly incomplete and balrs keeps serving others.
    n = 16 * MiB
    b = make_backend("b1")
    lb = make_lb([b], send_timeout="500ms", client_timeout="10s", backend_timeout="10s")
    with Client(lb.addr, timeout=10, rcvbuf=65536) as c:
        c.send(build("GET", "/big/%d" % n))
        # Never read while balrs' queue is full: until balrs gives up on this client, which also ends
        # its connection to the backend (mid-body, so it cannot be pooled). Bounded by the fixed 2 s
        # this used to sleep; reading too early would let the response complete (and fail below).
        assert wait_for(lambda: b.conns_total == 1, 5), "the request never reached the backend"
        wait_for(lambda: b.open_conns() == 0, 2.0)
        r = c.read_response(keep_body=False, timeout=10)
    assert r.status == 200 and not r.complete and r.body_len < n, "got %d of %d bytes, complete=%s" % (
        r.body_len, n, r.complete)
    ok = request(lb.addr, "GET", "/echo?id=after")
    assert ok.status == 200
