"""``python -m balrs demo`` for real: it prints its URLs, proxies to its demo backends, serves the
dashboard and the write API with the token it printed, stops on SIGINT, and reports a busy port in one
line instead of a traceback."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from support import REPO_ROOT, balrs_command, child_env, free_port, request


def _start(tmp_path: Path, *args: str) -> "subprocess.Popen[bytes]":
    out = open(tmp_path / "demo.out", "wb")
    err = open(tmp_path / "demo.err", "wb")
    return subprocess.Popen(balrs_command("demo", *args), stdout=out, stderr=err, cwd=str(REPO_ROOT),
                            env=child_env())


def test_demo_serves_balancer_dashboard_and_writes(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    p = _start(tmp_path, "--port", str(port), "--admin-port", str(admin), "--traffic", "0")
    try:
        deadline = time.monotonic() + 15
        text = ""
        while "Ctrl-C stops everything" not in text:
            assert p.poll() is None, (tmp_path / "demo.err").read_text()
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
            text = (tmp_path / "demo.out").read_text()
        assert "http://127.0.0.1:%d/" % port in text and "http://127.0.0.1:%d/" % admin in text
        token = re.search(r"Bearer ([A-Za-z0-9_-]+)'", text)
        assert token, text
        served = set()
        for i in range(12):
            r = request(("127.0.0.1", port), "GET", "/hello/%d" % i)
            assert r.status in (200, 503), r
            served.add(r.body.split(b":")[0])
        assert {b"hello from web-1", b"hello from web-2"} <= served
        page = request(("127.0.0.1", admin), "GET", "/")
        assert page.status == 200 and b"/status" in page.body
        r = request(("127.0.0.1", admin), "POST", "/api/backends/web-2/drain",
                    [("Authorization", "Bearer %s" % token.group(1))])
        assert r.status == 200 and r.json()["state"] == "drain"
        p.send_signal(signal.SIGINT)
        assert p.wait(15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_demo_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run(balrs_command("demo", "--port", str(port), "--admin-port", str(free_port())),
                             capture_output=True, text=True, timeout=30, cwd=str(REPO_ROOT), env=child_env())
    assert out.returncode == 2
    assert out.stderr.strip() == ("balrs demo: 127.0.0.1:%d is busy (another program listens there); "
                                  "choose another with --port N" % port), out.stderr
