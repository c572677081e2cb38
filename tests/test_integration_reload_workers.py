"""Integration: SIGHUP reload and ``workers = N``, against the real balrs process.

Reload must keep every established client connection (idle keep-alive, tunnels, requests in flight),
match backends by name and address, and keep the old configuration when the new file is invalid.
Workers share the port with SO_REUSEPORT under a supervisor that restarts a dead worker, forwards
signals and exits 0 once all have drained.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

from support import (
    BalrsProcess,
    Client,
    TestBackend,
    build,
    free_port,
    lb_ini,
    listens,
    request,
    wait_for,
)

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def served_by(r: Any) -> str:
    return r.header("x-backend") or "?"


def spread(lb: BalrsProcess, n: int) -> Dict[str, int]:
    cnt: Dict[str, int] = collections.Counter()
    for i in range(n):
        r = request(lb.addr, "GET", "/echo?i=%d" % i)
        assert r.status == 200, "request %d answered %s" % (i, r.status)
        cnt[served_by(r)] += 1
    return dict(cnt)


def rewrite(lb: BalrsProcess, backends: List[Any], **balancer: object) -> None:
    lb.config_path.write_text(lb_ini("127.0.0.1:%d" % lb.port, backends, **balancer))


def children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                data = f.read()
        except OSError:
            continue
        if int(data.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


# ---- reload ------------------------------------------------------------------------------------------------
def test_reload_adds_and_removes_backends(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2, b3 = make_backend("b1"), make_backend("b2"), make_backend("b3")
    lb = make_lb([b1, b2])
    assert set(spread(lb, 4)) == {"b1", "b2"}
    rewrite(lb, [b2, b3])
    lb.signal(signal.SIGHUP)
    assert wait_for(lambda: set(spread(lb, 4)) == {"b2", "b3"}, 5), lb.log_tail()
    assert "removed b1" in lb.log_text() and "added b3" in lb.log_text()


def test_reload_keeps_idle_keepalive_connection_and_in_flight_request(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = make_lb([b1], backend_timeout="10s")
    box: Dict[str, Any] = {}

    def slow() -> None:
        box["r"] = request(lb.addr, "GET", "/delay/1000?id=inflight", timeout=10)

    with Client(lb.addr) as idle:
        idle.send(build("GET", "/echo?id=first"))
        assert idle.read_response().status == 200
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        assert wait_for(lambda: any(r["target"] == "/delay/1000?id=inflight" for r in b1.reqs()), 3)
        # b1 is removed while a request is in flight on it and a keep-alive connection sits idle.
        rewrite(lb, [b2])
        mark = lb.log_mark()
        lb.signal(signal.SIGHUP)
        lb.wait_log("reloaded", since=mark)
        idle.send(build("GET", "/echo?id=after-reload"))
        r = idle.read_response()
        assert r.status == 200 and served_by(r) == "b2", "idle connection after reload: %s" % r.status
        t.join(5)
    r = box.get("r")
    assert r is not None and r.status == 200 and r.complete, "in-flight request: %r" % (r,)
    assert served_by(r) == "b1"


def test_reload_keeps_tunnels(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = make_lb([b1])
    with Client(lb.addr, timeout=5) as c:
        c.send(build("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                    ("Sec-WebSocket-Key", WS_KEY), ("Sec-WebSocket-Version", "13")]))
        assert c.read_response().status == 101
        greeting = c.read_exact(9, 3)
        assert greeting == b"srv-hello"
        rewrite(lb, [b2])
        mark = lb.log_mark()
        lb.signal(signal.SIGHUP)
        lb.wait_log("reloaded", since=mark)
        c.send(b"still-there")
        assert c.read_exact(11, 3) == b"still-there"


def test_reload_invalid_file_keeps_old_config(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = make_lb([b1, b2])
    lb.config_path.write_text(lb.config_path.read_text() + "\nthis line is not valid configuration\n")
    lb.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in lb.log_text(), 3), lb.log_tail()
    assert lb.alive()
    assert set(spread(lb, 4)) == {"b1", "b2"}
    log_line = [line for line in lb.log_text().splitlines() if "reload failed" in line][0]
    assert ":%d:" % (len(lb.config_path.read_text().splitlines()) - 1) in log_line or ".ini:" in log_line


def test_reload_changes_strategy_and_weights(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = make_lb([b1, b2])
    rewrite(lb, [(b1, 3), (b2, 1)])
    mark = lb.log_mark()
    lb.signal(signal.SIGHUP)
    lb.wait_log("reloaded", since=mark)
    cnt = spread(lb, 8)
    assert cnt == {"b1": 6, "b2": 2}, "weights 3/1 after reload gave %s" % cnt


def test_reload_adds_a_listen_address(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1 = make_backend("b1")
    lb = make_lb([b1])
    port2 = free_port()
    lb.config_path.write_text(lb_ini(["127.0.0.1:%d" % lb.port, "127.0.0.1:%d" % port2], [b1]))
    lb.signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in lb.log_text(), 3), lb.log_tail()
    assert request(("127.0.0.1", port2), "GET", "/echo").status == 200
    assert request(lb.addr, "GET", "/echo").status == 200


# ---- workers -----------------------------------------------------------------------------------------------
def test_workers_serve_restart_reload_and_stop(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1, b2 = make_backend("b1"), make_backend("b2")
    lb = make_lb([b1], workers=2, drain_timeout="3s")
    assert wait_for(lambda: len(children(lb.pid)) == 2, 5), "expected 2 workers"
    assert spread(lb, 10) == {"b1": 10}

    # A worker that dies is replaced.
    first = children(lb.pid)
    os.kill(first[0], signal.SIGKILL)
    assert wait_for(lambda: lb.log_text().count(" started") == 3, 5), lb.log_tail()
    assert wait_for(lambda: len(children(lb.pid)) == 2 and first[0] not in children(lb.pid), 5), lb.log_tail()
    # The new worker binds its listeners after installing its signal handlers: until then a SIGHUP
    # would kill it (it starts with the default dispositions).
    new = [pid for pid in children(lb.pid) if pid != first[1]]
    assert len(new) == 1 and wait_for(lambda: listens(new[0], lb.port), 5), "the new worker does not listen"
    assert spread(lb, 6) == {"b1": 6}

    # SIGHUP goes to every worker: all of them use the new backend list.
    rewrite(lb, [b2], workers=2, drain_timeout="3s")
    lb.signal(signal.SIGHUP)
    assert wait_for(lambda: lb.log_text().count("reloaded:") >= 2, 5), lb.log_tail()
    assert spread(lb, 10) == {"b2": 10}

    # SIGTERM: the supervisor drains every worker, exits 0, leaves nothing running.
    workers = children(lb.pid)
    lb.signal(signal.SIGTERM)
    assert lb.wait_exit(8) == 0, lb.log_tail()
    for pid in workers:
        assert not os.path.exists("/proc/%d" % pid) or _is_zombie(pid), "worker %d still running" % pid


def test_workers_stop_drains_in_flight_request(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1 = make_backend("b1")
    lb = make_lb([b1], workers=2, drain_timeout="5s")
    box: Dict[str, Any] = {}

    def slow() -> None:
        box["r"] = request(lb.addr, "GET", "/delay/1000?id=inflight", timeout=10)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    assert wait_for(lambda: b1.reqs(), 3)
    lb.signal(signal.SIGTERM)
    t.join(5)
    r = box.get("r")
    assert r is not None and r.status == 200 and r.complete
    assert lb.wait_exit(8) == 0


def test_workers_invalid_reload_is_reported_once(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1 = make_backend("b1")
    lb = make_lb([b1], workers=2)
    lb.config_path.write_text(lb.config_path.read_text() + "\n[frontend x]\n")
    lb.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in lb.log_text(), 3)
    time.sleep(0.3)
    assert lb.log_text().count("reload failed") == 1
    assert spread(lb, 4) == {"b1": 4}


def _is_zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---- workers: the port is ours alone -----------------------------------------------------------------------
def _reuseport_listener(port: int) -> socket.socket:
    """What a second balrs in workers mode (or any program of this user) would hold: SO_REUSEPORT."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


def _start_expecting_refusal(tmp_path: Any, text: str, port: int, name: str) -> str:
    """Start balrs and expect it to exit 2 at once (a start-up error); its stderr. (A balrs that starts
    anyway is stopped.)"""
    proc = BalrsProcess(tmp_path, text, port, name=name).start(wait=False)
    try:
        rc = proc.wait_exit(15)
        err = proc.log_text()
        assert rc == 2, "balrs did not refuse (exit status %s); stderr:\n%s" % (rc, err[-2000:])
        return err
    finally:
        proc.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_with_so_reuseport_is_refused_like_a_single_process(
    tmp_path: Any, make_backend: Callable[..., TestBackend], workers: int
) -> None:
    """The kernel would let a SO_REUSEPORT bind share the port and take half the connections: balrs
    refuses at start, with the same error in workers mode as in a single process."""
    b1 = make_backend("b1")
    port = free_port()
    holder = _reuseport_listener(port)
    try:
        err = _start_expecting_refusal(tmp_path, lb_ini("127.0.0.1:%d" % port, [b1], workers=workers), port,
                                       "taken-%d" % workers)
        assert "cannot listen on 127.0.0.1:%d: Address already in use" % port in err, err
        assert "Traceback" not in err
        # Nothing of balrs is left on the port: every connection still reaches the holder.
        holder.settimeout(2)
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                conn, _ = holder.accept()
                conn.close()
    finally:
        holder.close()


def test_a_second_balrs_with_workers_on_the_same_port_refuses(
    tmp_path: Any, make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1 = make_backend("b1")
    lb = make_lb([b1], workers=2)
    assert wait_for(lambda: len(children(lb.pid)) == 2, 5)
    assert "listening on 127.0.0.1:%d with 2 workers" % lb.port in lb.log_text(), lb.log_tail()
    err = _start_expecting_refusal(tmp_path, lb.config_path.read_text(), lb.port, "second")
    assert "Address already in use" in err, err
    # The first one still serves everything (its workers were alone on the port all along).
    assert spread(lb, 10) == {"b1": 10}
    assert len(b1.reqs()) == 10


def test_workers_reload_adding_a_taken_address_is_refused(
    make_backend: Callable[..., TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    b1 = make_backend("b1")
    lb = make_lb([b1], workers=2)
    port2 = free_port()
    holder = _reuseport_listener(port2)
    try:
        lb.config_path.write_text(lb_ini(["127.0.0.1:%d" % lb.port, "127.0.0.1:%d" % port2], [b1], workers=2))
        lb.signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in lb.log_text(), 5), lb.log_tail()
        assert "127.0.0.1:%d" % port2 in lb.log_text()
        holder.settimeout(2)
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", port2), timeout=2):
                conn, _ = holder.accept()
                conn.close()
        assert spread(lb, 4) == {"b1": 4}
    finally:
        holder.close()
