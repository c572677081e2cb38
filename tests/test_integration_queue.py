"""Integration: per-backend max_connections (in-flight requests) and the FIFO queue bounded by
queue_timeout, against the real balrs process."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
from support import BalrsProcess, TestBackend, free_port, request, wait_for


def _ini(port: int, backends: Sequence[Tuple[TestBackend, int]], **balancer: object) -> str:
    lines = ["[balancer]", "listen = 127.0.0.1:%d" % port, "backend_timeout = 10s"]
    lines += ["%s = %s" % kv for kv in balancer.items()]
    for b, limit in backends:
        lines += ["", "[backend %s]" % b.name, "address = %s" % b.address, "max_connections = %d" % limit]
    return "\n".join(lines) + "\n"


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Any]:
    made: List[BalrsProcess] = []

    def start(backends: Sequence[Tuple[TestBackend, int]], **balancer: object) -> BalrsProcess:
        port = free_port()
        lb = BalrsProcess(tmp_path, _ini(port, backends, **balancer), port, name="q%d" % len(made))
        made.append(lb)
        return lb.start()
    yield start
    for lb in made:
        lb.stop()


def _concurrently(lb: BalrsProcess, targets: List[str], stagger: float = 0.05) -> List[Tuple[Any, float]]:
    out: List[Any] = [None] * len(targets)
    t0 = time.monotonic()

    def run(i: int) -> None:
        r = request(lb.addr, "GET", targets[i], timeout=10)
        out[i] = (r, time.monotonic() - t0)
    threads = []
    for i in range(len(targets)):
        t = threading.Thread(target=run, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(stagger)
    for t in threads:
        t.join(15)
    return out


def test_full_backend_queues_requests_in_order(make_backend: Any, limited: Any) -> None:
    b = make_backend("b1")
    lb = limited([(b, 1)], queue_timeout="5s")
    res = _concurrently(lb, ["/delay/250?id=q%d" % i for i in range(3)])
    assert all(r.status == 200 for r, _t in res), [r.status for r, _t in res]
    times = [t for _r, t in res]
    # One at a time: each waits for the one before it.
    assert times[0] < times[1] < times[2]
    assert times[2] >= 0.7, "three 250 ms requests on a backend limited to one took only %.2fs" % times[2]
    order = [r["target"] for r in b.reqs()]
    assert order == ["/delay/250?id=q0", "/delay/250?id=q1", "/delay/250?id=q2"], order


def test_queue_timeout_gives_503(make_backend: Any, limited: Any) -> None:
    b = make_backend("b1")
    lb = limited([(b, 1)], queue_timeout="300ms")
    # The first holds the backend longer than the 503 may take (1.2 s): a queue that never times out
    # would serve the second one after it, with a 200.
    res = _concurrently(lb, ["/delay/1300?id=long", "/echo?id=waits"])
    (first, _t1), (second, t2) = res
    assert first.status == 200
    assert second.status == 503, "a request that waited longer than queue_timeout got %s" % second.status
    assert 0.25 <= t2 <= 1.2, "503 after %.2fs with queue_timeout 300ms" % t2
    assert [r["target"] for r in b.reqs()] == ["/delay/1300?id=long"], "the queued request reached the backend"
    # The connection that got 503 was not broken: the next request on a fresh one is served.
    assert request(lb.addr, "GET", "/echo").status == 200


def test_full_backend_is_skipped_for_one_with_room(make_backend: Any, limited: Any) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = limited([(b1, 1), (b2, 0)], queue_timeout="5s")
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", request(lb.addr, "GET", "/delay/700?id=busy",
                                                                         timeout=10)), daemon=True)
    t.start()
    assert wait_for(lambda: b1.reqs() or b2.reqs(), 3)
    busy = "b1" if b1.reqs() else "b2"
    # Round robin would alternate; while b1 is full (limit 1) every other request goes to b2.
    names = [request(lb.addr, "GET", "/echo?i=%d" % i).header("x-backend") for i in range(4)]
    t.join(5)
    assert box["r"].status == 200
    if busy == "b1":
        assert names == ["b2"] * 4, names
    else:
        assert "b1" in names and "b2" in names


def test_pooled_idle_connections_do_not_count(make_backend: Any, limited: Any) -> None:
    # max_connections counts requests in flight, not idle keep-alive connections in the pool.
    b = make_backend("b1")
    lb = limited([(b, 1)], queue_timeout="200ms")
    for i in range(5):
        assert request(lb.addr, "GET", "/echo?i=%d" % i).status == 200
