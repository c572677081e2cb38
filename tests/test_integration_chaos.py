"""Integration: random abuse from clients and backends never produces a traceback, a hang or a
mixed-up response, and balrs keeps serving well-formed requests correctly throughout."""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Callable, List

from support import BalrsProcess, Client, Closed, TestBackend, Timeout, build, request

PIECES = [
    b"GET / HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n", b"Connection: close\r\n", b"Connection: upgrade\r\nUpgrade: x\r\n",
    b"Expect: 100-continue\r\n", b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"5\r\nhello\r\n",
    b"0\r\n\r\n", b"zz\r\n", b"GET /pipelined HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n",
    b"X-A: " + b"a" * 3000 + b"\r\n", b"\xff\xfe", b"GET /delay/50 HTTP/1.0\r\n\r\n",
]


def _abuse(addr: tuple, rng: random.Random, rounds: int) -> None:
    for _ in range(rounds):
        try:
            with socket.create_connection(addr, timeout=2) as s:
                s.settimeout(0.3)
                for _ in range(rng.randint(1, 8)):
                    s.sendall(b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))))
                    if rng.random() < 0.3:
                        break
                if rng.random() < 0.5:
                    try:
                        s.recv(65536)
                    except OSError:
                        pass
                if rng.random() < 0.3:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass


def test_random_client_abuse_never_breaks_balrs(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    backends = [make_backend("b1"), make_backend("b2")]
    lb = make_lb(backends, header_timeout="1s", client_timeout="2s", backend_timeout="2s", body_timeout="1s",
                 max_body_bytes="64k")
    threads: List[threading.Thread] = [
        threading.Thread(target=_abuse, args=(lb.addr, random.Random(seed), 60), daemon=True) for seed in range(4)
    ]
    for t in threads:
        t.start()
    # Meanwhile well-formed traffic gets exactly its own answers.
    deadline = time.monotonic() + 8
    i = 0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        with Client(lb.addr, timeout=5) as c:
            for j in range(5):
                tag = "good-%d-%d" % (i, j)
                c.send(build("GET", "/echo?id=%s" % tag))
                r = c.read_response()
                assert r.status == 200 and r.json()["target"] == "/echo?id=%s" % tag
        i += 1
    for t in threads:
        t.join(10)
    assert lb.alive()
    assert request(lb.addr, "GET", "/echo?id=after").status == 200
    log = lb.log_text()
    assert "Traceback" not in log and "unhandled" not in log, log[-3000:]
    # (Random pieces can form valid pipelined requests, so what the backends saw is not judged here; the
    # smuggling vectors have their own tests.)


def test_backends_that_misbehave_at_random(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    # Paths that make the test backend close, hang, send garbage or break off mid-body.
    lb = make_lb([make_backend("b1")], backend_timeout="500ms", retries=0)
    rng = random.Random(11)
    paths = ["/close-now", "/garbage", "/close-mid", "/close-mid-chunked", "/no-length", "/hang",
             "/chunked", "/big/200000", "/echo", "/status/204", "/status/304"]
    for k in range(40):
        path = rng.choice(paths)
        with Client(lb.addr, timeout=5) as c:
            c.send(build("GET", path))
            try:
                r = c.read_response(timeout=5)
            except Exception:
                continue  # a broken-off response may end the connection: that is the honest signal
            assert r.status in (200, 204, 304, 502, 504), (path, r.status)
    assert request(lb.addr, "GET", "/echo").status == 200
    log = lb.log_text()
    assert "Traceback" not in log and "unhandled" not in log, log[-3000:]


# Responses a broken backend may send, glued together and cut short at random.
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nbody", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", b"garbage\r\n\r\n",
    b"\r\n", b"\x00\xff", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", b"5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nzz\r\n",
    b"HTTP/1.1 304 Not Modified\r\n\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 70000,
    b"HTTP/1.1 200 OK\r\nTrailer: X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n\r\n",
]


class ChaosBackend:
    """Answers every request with random (often broken) responses, then maybe resets or lingers."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.name = "chaos%d" % seed
        self.address = "127.0.0.1:%d" % self.port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, random.Random(self.rng.random())), daemon=True).start()

    def _serve(self, c: socket.socket, rng: random.Random) -> None:
        c.settimeout(3)
        try:
            for _ in range(rng.randint(1, 4)):
                if not c.recv(65536):
                    return
                out = b"".join(rng.choice(RESPONSES) for _ in range(rng.randint(1, 3)))
                if rng.random() < 0.3:
                    out = out[:rng.randint(0, len(out))]
                c.sendall(out)
                r = rng.random()
                if r < 0.2:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                if r < 0.4:
                    return
        except OSError:
            pass
        finally:
            c.close()

    def reqs(self) -> list:
        return []

    def stop(self) -> None:
        self.listener.close()


def test_random_backend_garbage_never_breaks_balrs(make_lb: Callable[..., BalrsProcess]) -> None:
    backends = [ChaosBackend(seed) for seed in range(3)]
    try:
        lb = make_lb(backends, backend_timeout="300ms", retries=1)
        seen: dict = {}
        errors: List[str] = []

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(40):
                try:
                    with Client(lb.addr, timeout=3) as c:
                        for _ in range(rng.randint(1, 3)):
                            method = rng.choice(["GET", "HEAD", "POST"])
                            c.send(build(method, "/x%d" % i, body=b"abc" if method == "POST" else None))
                            r = c.read_response(method=method)
                            seen[r.status] = seen.get(r.status, 0) + 1
                except (Closed, Timeout):
                    pass  # a broken response ends the connection: the honest signal
                except Exception as exc:  # a malformed answer from balrs itself
                    errors.append("%s: %s" % (type(exc).__name__, exc))
        ts = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(40)
        assert not errors, errors[:5]
        assert set(seen) <= {200, 204, 304, 502, 504}, seen
        assert lb.alive()
        log = lb.log_text()
        assert "Traceback" not in log and "unhandled" not in log, log[-3000:]
    finally:
        for b in backends:
            b.stop()
