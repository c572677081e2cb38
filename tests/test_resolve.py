"""Host names: several addresses per backend, and re-resolution on the resolver thread.

A real Balancer runs its reactor on a background thread here (signals are the main thread's business
and not needed); requests go through real sockets on 127.0.0.1 to a real backend.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator, List, Tuple

import pytest
from support import TestBackend, free_port, request, wait_for

import balrs.resolver
from balrs.config import Address, BackendConfig, Config
from balrs.pool import resolve
from balrs.server import Balancer


class Running:
    """A Balancer whose loop runs on a thread until stopped."""

    def __init__(self, config: Config) -> None:
        self.bal = Balancer(config)
        self.bal.listen()
        self.addr = self.bal.listeners[0][0].getsockname()[:2]
        self.bal.reactor.enable_threadsafe()
        self.bal.start()
        self.thread = threading.Thread(target=self.bal.run, daemon=True)
        self.thread.start()

    def call(self, fn: Any) -> Any:
        """Run ``fn`` on the loop thread and return its result."""
        box: List[Any] = []
        done = threading.Event()

        def run() -> None:
            box.append(fn())
            done.set()
        self.bal.reactor.call_soon_threadsafe(run)
        assert done.wait(5), "the loop did not run the callback"
        return box[0]

    def stop(self) -> None:
        self.bal.reactor.call_soon_threadsafe(self.bal.stop)
        self.thread.join(5)
        self.bal.reactor.close()


def config(backends: List[Tuple[str, str, int]], **keys: Any) -> Config:
    return Config(path="test.ini", listen=(Address("127.0.0.1", free_port()),),
                  backends=tuple(BackendConfig(n, Address(h, p)) for n, h, p in backends), **keys)


@pytest.fixture
def running() -> Iterator[Any]:
    made: List[Running] = []

    def make(cfg: Config) -> Running:
        r = Running(cfg)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def test_resolve_lists_every_address_once() -> None:
    addrs = resolve("localhost", 80)
    assert addrs and len(addrs) == len(set(addrs))
    assert all(port == 80 for _fam, (_host, port, *_rest) in addrs)


def test_next_address_of_a_host_name_is_tried_before_giving_up(running: Any) -> None:
    b = TestBackend("b1")
    dead = free_port()
    try:
        r = running(config([("b1", "127.0.0.1", dead)], retries=0))
        backend = r.bal.pool.backends[0]
        # As if the name resolved to a dead address first and a live one second.
        r.call(lambda: backend.set_addresses([(socket.AF_INET, ("127.0.0.1", dead)),
                                              (socket.AF_INET, ("127.0.0.1", b.port))]))
        resp = request(tuple(r.addr), "GET", "/echo?id=fallback")
        assert resp.status == 200, "retries = 0, yet the backend's second address should be tried"
        assert backend.sockaddr == ("127.0.0.1", b.port), "later connections go to the working address"
        assert request(tuple(r.addr), "GET", "/echo").status == 200
    finally:
        b.stop()


def test_every_address_refused_gives_502(running: Any) -> None:
    d1, d2 = free_port(), free_port()
    r = running(config([("b1", "127.0.0.1", d1)], retries=0))
    backend = r.bal.pool.backends[0]
    r.call(lambda: backend.set_addresses([(socket.AF_INET, ("127.0.0.1", d1)),
                                          (socket.AF_INET, ("127.0.0.1", d2))]))
    assert request(tuple(r.addr), "GET", "/echo").status == 502


def test_resolver_thread_follows_a_changed_name(running: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = TestBackend("old"), TestBackend("new")
    try:
        answer = [[(socket.AF_INET, ("127.0.0.1", old.port))]]
        calls: List[str] = []

        def fake_resolve(host: str, port: int) -> List[Tuple[int, Any]]:
            calls.append(host)
            if host == "app.internal":
                return answer[0]
            return resolve(host, port)
        monkeypatch.setattr(balrs.resolver, "resolve", fake_resolve)
        # Start-up resolves in the foreground; use a real name there, then let the thread take over.
        r = running(config([("b1", "localhost", old.port)], resolve_interval=0.1))
        backend = r.bal.pool.backends[0]
        assert request(tuple(r.addr), "GET", "/echo").header("x-backend") == "old"
        # The name now points elsewhere: the resolver thread notices within resolve_interval.
        r.call(lambda: setattr(backend, "config", BackendConfig("b1", Address("app.internal", old.port))))
        answer[0] = [(socket.AF_INET, ("127.0.0.1", new.port))]
        assert wait_for(lambda: "app.internal" in calls, 3), "the resolver thread never looked the name up"
        assert wait_for(lambda: request(tuple(r.addr), "GET", "/echo").header("x-backend") == "new", 3)
        # A failing lookup keeps the last good address.
        answer[0] = []
        time.sleep(0.3)
        assert request(tuple(r.addr), "GET", "/echo").header("x-backend") == "new"
    finally:
        old.stop()
        new.stop()


def test_unresolvable_backend_is_out_until_it_resolves(running: Any) -> None:
    good = TestBackend("good")
    try:
        r = running(config([("good", "127.0.0.1", good.port), ("bad", "no-such-host.invalid", 80)]))
        names = {request(tuple(r.addr), "GET", "/echo?i=%d" % i).header("x-backend") for i in range(6)}
        assert names == {"good"}
        assert r.call(lambda: [b.state for b in r.bal.pool.backends]) == ["up", "down"]
    finally:
        good.stop()
