"""Start-up and shutdown messages: a listen address that cannot be bound names its file, line and key;
a misspelt required key is reported as the unknown key it is; a reload logs what it changed; a second
SIGINT that cuts requests off exits non-zero and says so; ``--help`` lists the subcommands."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from support import HOST, Client, TestBackend, child_env, free_port, run_balrs, start_config, wait_for

from balrs.config import ConfigError, describe_changes, parse_text

ROOT = Path(__file__).resolve().parent.parent


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = child_env()
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "balrs", *args], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("section", ["balancer", "admin"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_listen_address_names_file_line_and_key(tmp_path: Path, section: str, workers: int) -> None:
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    other = free_port()
    listen, admin = (port, other) if section == "balancer" else (other, port)
    text = ("# lb.ini\n[balancer]\nlisten = 127.0.0.1:%d\nworkers = %d\n\n[backend a]\naddress = 127.0.0.1:1\n\n"
            "[admin]\nlisten = 127.0.0.1:%d\n" % (listen, workers, admin))
    (tmp_path / "lb.ini").write_text(text)
    try:
        out = run_in(tmp_path, "lb.ini")
    finally:
        taken.close()
    line = 3 if section == "balancer" else 10
    assert text.splitlines()[line - 1] == "listen = 127.0.0.1:%d" % port
    assert out.returncode == 2, out
    assert out.stderr == "lb.ini:%d: [%s] listen: cannot listen on 127.0.0.1:%d: Address already in use\n" % (
        line, section, port), out


def test_a_taken_listen_override_names_the_option(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    (tmp_path / "lb.ini").write_text("[balancer]\nlisten = 127.0.0.1:%d\n\n[backend a]\naddress = 127.0.0.1:1\n"
                                     % free_port())
    try:
        out = run_in(tmp_path, "--listen", "127.0.0.1:%d" % port, "lb.ini")
    finally:
        taken.close()
    assert (out.returncode, out.stderr) == (
        2, "balrs: --listen: cannot listen on 127.0.0.1:%d: Address already in use\n" % port), out


def test_a_misspelt_required_key_is_reported_as_unknown_first() -> None:
    text = "[balancer]\nlisten = 127.0.0.1:8080\n\n[backend a]\nadress = 127.0.0.1:9000\n"
    with pytest.raises(ConfigError) as info:
        parse_text(text, "lb.ini")
    assert str(info.value) == "lb.ini:5: [backend a] adress: unknown key (did you mean 'address'?)"
    # Without a near miss the missing key is still reported, at the section header.
    with pytest.raises(ConfigError) as info:
        parse_text(text.replace("adress", "weight"), "lb.ini")
    assert str(info.value) == "lb.ini:4: [backend a] address: required key is missing"


def test_config_remembers_key_lines() -> None:
    cfg = parse_text("[balancer]\n\nlisten = 127.0.0.1:8080\n[backend a]\naddress = 127.0.0.1:9000\n"
                     "[admin]\nlisten = 127.0.0.1:9100\n", "lb.ini")
    assert (cfg.line_of("balancer", "listen"), cfg.line_of("admin", "listen"), cfg.line_of("backend a", "address"),
            cfg.line_of("balancer", "strategy")) == (3, 7, 5, 0)
    assert str(cfg.error("admin", "listen", "boom")) == "lb.ini:7: [admin] listen: boom"


RELOAD_BEFORE = """[balancer]
listen = 127.0.0.1:{port}
strategy = round_robin

[pool api]
strategy = random

[pool web]

[backend b1]
address = 127.0.0.1:1

[backend b2]
address = 127.0.0.1:2
weight = 1

[backend b4]
address = 127.0.0.1:4
pool = api

[backend b5]
address = 127.0.0.1:5
pool = web
"""

RELOAD_AFTER = """[balancer]
listen = 127.0.0.1:{port}
strategy = least_connections

[pool api]
strategy = ip_hash

[pool web]

[backend b2]
address = 127.0.0.1:2
weight = 3

[backend b3]
address = 127.0.0.1:3

[backend b4]
address = 127.0.0.1:4
pool = api

[backend b5]
address = 127.0.0.1:5
pool = web
"""


def test_describe_changes() -> None:
    old = parse_text(RELOAD_BEFORE.format(port=8080), "lb.ini")
    new = parse_text(RELOAD_AFTER.format(port=8080), "lb.ini")
    assert describe_changes(old, new) == ["weight b2 1 -> 3", "strategy round_robin -> least_connections",
                                          "pool api strategy random -> ip_hash"]
    assert describe_changes(new, new) == ["strategy least_connections"]


def test_reload_logs_what_changed(tmp_path: Path) -> None:
    lb = start_config(tmp_path, lambda port, _admin: RELOAD_BEFORE.format(port=port))
    try:
        mark = lb.log_mark()
        lb.config_path.write_text(RELOAD_AFTER.format(port=lb.port))
        lb.signal(signal.SIGHUP)
        lb.wait_log("reloaded:", since=mark)
        line = next(ln for ln in lb.log_text()[mark:].splitlines() if "reloaded:" in ln)
        assert line.endswith("reloaded: 4 backend(s); added b3; removed b1; weight b2 1 -> 3; strategy round_robin "
                             "-> least_connections; pool api strategy random -> ip_hash"), line
    finally:
        lb.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_second_sigint_cuts_off_and_exits_non_zero(
    tmp_path: Path, make_backend: Callable[..., TestBackend], workers: int
) -> None:
    b = make_backend("b1")
    text = ("[balancer]\nlisten = 127.0.0.1:%d\ndrain_timeout = 30s\nworkers = {workers}\nbackend_timeout = 30s\n\n"
            "[backend b1]\naddress = {address}\n").format(workers=workers, address=b.address)
    lb = start_config(tmp_path, lambda port, _admin: text % port)
    try:
        with Client(lb.addr) as c:
            c.send(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_for(lambda: b.reqs(), 5), "the request never reached the backend"
            lb.signal(signal.SIGINT)
            # (with workers, the one that has the request; the other may not have installed its handlers yet)
            lb.wait_log("SIGTERM: draining" if workers > 1 else "SIGINT: draining")
            assert lb.alive(), lb.log_tail()
            lb.signal(signal.SIGINT)
            rc = lb.wait_exit(5)
        log = lb.log_text()
        assert rc == 1, log[-2000:]
        assert "second SIGINT: stopping now, cutting off 1 connection(s) still open; exit status 1" in log, log
        if workers > 1:
            assert "supervisor: second SIGINT: workers stop now, cutting off requests in flight; exit status 1" in log
    finally:
        lb.stop()


def test_graceful_stop_still_exits_0(tmp_path: Path) -> None:
    lb = start_config(tmp_path, lambda port, _admin: "[balancer]\nlisten = 127.0.0.1:%d\n\n[backend a]\n"
                      "address = 127.0.0.1:1\n" % port)
    lb.signal(signal.SIGINT)
    assert lb.wait_exit(5) == 0, lb.log_tail()


def test_help_lists_the_subcommands() -> None:
    rc, out, _err = run_balrs("--help")
    assert rc == 0
    commands = out[out.index("commands:"):]
    for name in ("status", "demo", "zipapp"):
        assert "balrs %s" % name in commands, out
