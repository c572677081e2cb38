"""Integration: the process's life: command line, configuration errors, startup failures, graceful stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from support import (
    REPO_ROOT,
    BalrsProcess,
    Client,
    Closed,
    TestBackend,
    Timeout,
    build,
    can_connect,
    free_port,
    lb_ini,
    request,
    run_balrs,
    wait_for,
)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, "expected exactly one line on stderr, got %d:\n%s" % (len(lines), err)
    return lines[0]


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, "a Python traceback was printed:\n%s" % text


# ---- --check, --version ------------------------------------------------------------------------------------
def test_check_accepts_a_valid_file(tmp_path: Path, three: list[TestBackend]) -> None:
    cfg = tmp_path / "lb.ini"
    cfg.write_text(lb_ini("127.0.0.1:%d" % free_port(), three))
    rc, out, err = run_balrs("--check", str(cfg))
    assert rc == 0, "valid file rejected (exit %s): %s" % (rc, err + out)
    no_traceback(out + err)
    assert not can_connect(("127.0.0.1", int(cfg.read_text().split("127.0.0.1:")[1].split()[0])), 0.2)


def _insert_after(text: str, prefix: str, new: str) -> tuple[str, int]:
    lines = text.split("\n")
    i = next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
    lines.insert(i + 1, new)
    return "\n".join(lines), i + 2


def _replace(text: str, prefix: str, new: str) -> tuple[str, int]:
    lines = text.split("\n")
    i = next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
    lines[i] = new
    return "\n".join(lines), i + 1


def _append(text: str, *new: str) -> tuple[str, int]:
    lines = text.rstrip("\n").split("\n")
    n = len(lines) + 1
    return "\n".join(lines + list(new)) + "\n", n


BAD_FILES: dict[str, Callable[[str], tuple[str, int]]] = {
    "unknown_key": lambda t: _insert_after(t, "retries", "frobnicate = yes"),
    "unknown_strategy": lambda t: _replace(t, "strategy", "strategy = fastest_first"),
    "bad_duration": lambda t: _replace(t, "connect_timeout", "connect_timeout = soon"),
    "bad_port": lambda t: _replace(t, "address", "address = 127.0.0.1:notaport"),
    "weight_zero": lambda t: _replace(t, "weight", "weight = 0"),
    "unknown_section": lambda t: _append(t, "[frontend web]", "bind = 1"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_check_rejects_a_bad_file_with_path_and_line(tmp_path: Path, name: str) -> None:
    text, lineno = BAD_FILES[name](
        lb_ini("127.0.0.1:%d" % free_port(), [_FakeBackend("b1"), _FakeBackend("b2")])
    )
    cfg = tmp_path / "lb.ini"
    cfg.write_text(text)
    # PATH as given on the command line: here relative to the working directory (the repository root).
    given = os.path.relpath(str(cfg), str(REPO_ROOT))
    rc, out, err = run_balrs("--check", given)
    no_traceback(out + err)
    assert rc == 2, "exit %s for an invalid file; output: %s" % (rc, out + err)
    line = one_line(err)
    m = re.match(r"^(.*):(\d+): \S", line)
    assert m, "not `PATH:LINE: message`: %r" % line
    assert m.group(1) == given, "path %r, given on the command line as %r" % (m.group(1), given)
    assert int(m.group(2)) == lineno, "blames line %s, the offending line is %d: %r" % (
        m.group(2),
        lineno,
        line,
    )


class _FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.address = "127.0.0.1:%d" % free_port()


def test_version() -> None:
    rc, out, err = run_balrs("--version")
    assert rc == 0
    assert re.search(r"\bbalrs\b.*\d+\.\d+", out + err), (out, err)


# ---- startup errors ----------------------------------------------------------------------------------------
def test_config_error_at_startup_exit_2_one_line(tmp_path: Path) -> None:
    text, lineno = _insert_after(
        lb_ini("127.0.0.1:%d" % free_port(), [_FakeBackend("b1")]), "retries", "retries = 1"
    )
    cfg = tmp_path / "dup.ini"
    cfg.write_text(text)
    rc, out, err = run_balrs(str(cfg))
    no_traceback(out + err)
    assert rc == 2
    line = one_line(err)
    assert line.startswith("%s:%d: " % (cfg, lineno)), line


def test_missing_config_file_exit_2_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.ini"
    rc, out, err = run_balrs(str(cfg))
    no_traceback(out + err)
    assert rc == 2
    assert one_line(err).startswith(str(cfg)), err


def test_port_already_in_use_clear_error(tmp_path: Path, three: list[TestBackend]) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen(5)
        cfg = tmp_path / "lb.ini"
        cfg.write_text(lb_ini("127.0.0.1:%d" % port, three))
        t0 = time.monotonic()
        rc, out, err = run_balrs(str(cfg), timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        taken.close()
    no_traceback(out + err)
    assert rc != 0
    assert str(port) in err and ("in use" in err.lower() or "cannot listen" in err.lower()), err


def test_invalid_strategy_override_exit_2(tmp_path: Path, three: list[TestBackend]) -> None:
    cfg = tmp_path / "lb.ini"
    cfg.write_text(lb_ini("127.0.0.1:%d" % free_port(), three))
    rc, out, err = run_balrs("--strategy", "fastest_first", str(cfg))
    no_traceback(out + err)
    assert rc == 2
    assert "fastest_first" in one_line(err)


# ---- command-line overrides --------------------------------------------------------------------------------
def test_listen_override(three: list[TestBackend], make_lb: Callable[..., BalrsProcess]) -> None:
    other = free_port()
    lb = make_lb(three, args=("--listen", "127.0.0.1:%d" % other), wait_addr=("127.0.0.1", other))
    assert request(("127.0.0.1", other), "GET", "/echo").status == 200
    assert not can_connect(lb.addr, 0.3)


def test_strategy_override_round_robin(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three, args=("--strategy", "rr"), strategy="ip_hash")
    seq = [request(lb.addr, "GET", "/echo?i=%d" % i).header("x-backend") for i in range(6)]
    assert sorted(seq[:3]) == ["b1", "b2", "b3"] and seq == seq[:3] * 2, seq


def test_sighup_reload_keeps_serving_and_keeps_connections(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three)
    with Client(lb.addr) as c:
        c.send(build("GET", "/echo?id=before"))
        assert c.read_response().status == 200
        mark = lb.log_mark()
        lb.signal(signal.SIGHUP)  # the file is unchanged: a reload changes nothing
        lb.wait_log("reloaded", since=mark)
        assert lb.alive(), "balrs exited on SIGHUP (status %s)" % lb.returncode
        c.send(build("GET", "/echo?id=after"))
        r = c.read_response()
        assert r.status == 200 and r.json()["target"] == "/echo?id=after"
    assert request(lb.addr, "GET", "/echo").status == 200


# ---- graceful stop -----------------------------------------------------------------------------------------
def _new_connection_outcome(addr: tuple[str, int]) -> str:
    try:
        c = Client(addr, timeout=2)
    except OSError:
        return "refused"
    try:
        c.send(build("GET", "/echo?id=after-stop", [("Connection", "close")]))
        r = c.read_response(timeout=2)
        return "served %d" % r.status
    except (Closed, OSError):
        return "closed"
    except Timeout:
        return "hung"
    finally:
        c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_drains_in_flight_request(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess], sig: int
) -> None:
    lb = make_lb(three, drain_timeout="5s")
    box: dict[str, Any] = {}

    def in_flight() -> None:
        try:
            box["r"] = request(lb.addr, "GET", "/delay/1200?id=inflight", timeout=8)
        except Exception as exc:  # reported below
            box["r"] = exc

    t = threading.Thread(target=in_flight, daemon=True)
    t.start()
    idle = Client(lb.addr, timeout=3)  # an idle keep-alive connection: closed at once by the drain
    idle.send(build("GET", "/echo?id=idle"))
    assert idle.read_response().status == 200
    assert wait_for(lambda: any(r["target"] == "/delay/1200?id=inflight" for b in three for r in b.reqs()), 2)
    t_sig = time.monotonic()
    mark = lb.log_mark()
    lb.signal(sig)
    lb.wait_log("draining", since=mark)  # written in the loop turn that closes the listener
    newconn = _new_connection_outcome(lb.addr)
    idle_closed, _, _ = idle.wait_closed(1.5)
    idle.close()
    t.join(6)
    rc = lb.wait_exit(6)
    took = time.monotonic() - t_sig
    r = box.get("r")
    assert not isinstance(r, Exception) and r is not None, "in-flight request failed during the drain: %r" % r
    assert r.status == 200 and r.complete and r.json()["target"] == "/delay/1200?id=inflight"
    assert newconn in ("refused", "closed"), "a new connection during the drain was %s" % newconn
    assert idle_closed, "idle keep-alive connection kept open during the drain"
    assert rc == 0, "exit status %s after %s; stderr:\n%s" % (rc, signal.Signals(sig).name, lb.log_tail())
    assert 0.7 <= took <= 3.0, "exited %.2fs after the signal (in-flight request needed ~0.9s more)" % took
    no_traceback(lb.log_text())


def test_sigterm_with_no_connections_exits_at_once(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three)
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    rc = lb.wait_exit(5)
    assert rc == 0 and time.monotonic() - t0 < 1.0, (rc, time.monotonic() - t0)


def test_drain_timeout_bounds_the_drain(
    three: list[TestBackend], make_lb: Callable[..., BalrsProcess]
) -> None:
    lb = make_lb(three, drain_timeout="500ms")
    box: dict[str, Any] = {}

    def in_flight() -> None:
        try:
            box["r"] = request(lb.addr, "GET", "/delay/4000?id=slow", timeout=8)
        except Exception as exc:
            box["r"] = exc

    t = threading.Thread(target=in_flight, daemon=True)
    t.start()
    assert wait_for(lambda: any(r["target"] == "/delay/4000?id=slow" for b in three for r in b.reqs()), 2)
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    rc = lb.wait_exit(4)
    took = time.monotonic() - t0
    t.join(3)
    assert rc == 0, "exit status %s when drain_timeout expired" % rc
    assert 0.4 <= took <= 2.0, "exited %.2fs after SIGTERM with drain_timeout 500ms" % took
    r: Any | None = box.get("r")
    assert isinstance(r, Exception) or not r.complete, "request outliving drain_timeout presented as complete"
