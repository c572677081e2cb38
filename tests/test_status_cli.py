"""``python -m balrs status``: the backend table from a running balrs's admin endpoint.

Run as the real command (``sys.executable -m balrs status ...``) against a real balrs process with an
``[admin]`` section, plus unit tests of the address parsing and the table.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import support
from support import (
    HOST,
    REPO_ROOT,
    BalrsProcess,
    StartError,
    TestBackend,
    balrs_command,
    child_env,
    free_port,
    lb_ini,
    request,
    run_balrs,
    wait_for,
)

from balrs.status import CLEAR, admin_url, format_table, main


class LB:
    def __init__(self, proc: BalrsProcess, admin: Tuple[str, int], backends: List[TestBackend]) -> None:
        self.proc = proc
        self.addr = proc.addr
        self.admin = admin
        self.admin_s = "%s:%d" % admin
        self.backends = backends
        self.config_path = proc.config_path


@pytest.fixture
def make_lb_admin(tmp_path: Path) -> Iterator[Callable[..., LB]]:
    made: List[LB] = []

    def make(weights: Sequence[int] = (1, 2)) -> LB:
        bs = [TestBackend("app%d" % (i + 1)) for i in range(len(weights))]
        last: Exception = StartError("not started")
        for attempt in range(3):
            port, aport = free_port(), free_port()
            text = lb_ini("127.0.0.1:%d" % port, list(zip(bs, weights)))
            text += "\n[admin]\nlisten = 127.0.0.1:%d\n" % aport
            proc = BalrsProcess(tmp_path, text, port, name="slb%d-%d" % (len(made), attempt))
            try:
                proc.start(wait_addr=(HOST, aport))
                proc.wait_listening(5.0)
            except StartError as exc:
                proc.kill()
                last = exc
                if "in use" in str(exc).lower():
                    continue
                break
            lb = LB(proc, (HOST, aport), bs)
            made.append(lb)
            return lb
        for b in bs:
            b.stop()
        raise last

    yield make
    for lb in made:
        lb.proc.stop()
        for b in lb.backends:
            b.stop()


def _rows(out: str) -> Dict[str, List[str]]:
    """Table rows by backend name (the lines after the NAME header)."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:3] == ["NAME", "ADDRESS", "STATE"])
    return {line.split()[0]: line.split() for line in lines[i + 1 :] if line.strip() and not line.startswith("(")}


class TestAgainstRealBalrs:
    def test_table(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1, 2))
        for _ in range(6):
            assert request(lb.addr, "GET", "/echo").status == 200
        rc, out, err = run_balrs("status", lb.admin_s)
        assert rc == 0, err
        assert err == ""
        header = next(line for line in out.splitlines() if line.startswith("NAME"))
        assert header.split() == ["NAME", "ADDRESS", "STATE", "WEIGHT", "ACTIVE", "REQUESTS", "FAILURES", "RESP_MS"]
        assert "strategy round_robin" in out and "backends 2/2 up" in out
        rows = _rows(out)
        assert sorted(rows) == ["app1", "app2"]
        for b, weight in zip(lb.backends, (1, 2)):
            name, address, state, w, active, requests, failures, resp_ms = rows[b.name]
            assert address == b.address and state == "up"
            assert (int(w), int(active), int(requests), int(failures)) == (weight, 0, len(b.reqs()), 0)
            assert float(resp_ms) >= 0
        assert sum(len(b.reqs()) for b in lb.backends) == 6
        assert "\x1b" not in out  # no escape codes outside --watch

    def test_json(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        rc, out, err = run_balrs("status", "--json", lb.admin_s)
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["strategy"] == "round_robin"
        assert [(d["name"], d["address"], d["state"]) for d in doc["backends"]] == [
            ("app1", lb.backends[0].address, "up")]

    def test_address_forms_and_config(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        port = str(lb.admin[1])
        for args in ([port], [":" + port], ["http://%s/" % lb.admin_s], ["--config", str(lb.config_path)]):
            rc, out, err = run_balrs("status", *args)
            assert rc == 0, (args, err)
            assert "app1" in _rows(out), args

    def test_watch_refreshes_until_count(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        t0 = time.monotonic()
        rc, out, err = run_balrs("status", lb.admin_s, "--watch", "--interval", "0.2", "--count", "3")
        assert rc == 0, err
        assert out.count("NAME ") == 3
        assert time.monotonic() - t0 >= 0.4
        assert "\x1b" not in out  # stdout is not a terminal: frames one after another

    def test_watch_json_lines(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        rc, out, err = run_balrs("status", lb.admin_s, "--watch", "--json", "--interval", "0.1", "--count", "2")
        assert rc == 0, err
        docs = [json.loads(line) for line in out.splitlines()]
        assert len(docs) == 2 and all(d["backends"][0]["name"] == "app1" for d in docs)

    def test_watch_ctrl_c_exits_0(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        pdeathsig = getattr(support, "_PREEXEC", None)

        def preexec() -> None:
            if pdeathsig is not None:
                pdeathsig()
            # A shell starts background jobs with SIGINT ignored, and Python then installs no
            # KeyboardInterrupt handler: give the child the default, as a terminal would.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        p = subprocess.Popen(balrs_command("status", lb.admin_s, "--watch", "--interval", "0.2"),
                             cwd=str(REPO_ROOT), env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=preexec)
        try:
            assert p.stdout is not None
            first = p.stdout.readline()
            assert first.startswith(b"balrs "), first
            time.sleep(0.1)  # scenario: Ctrl-C while it waits out its interval
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=5)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        assert p.returncode == 0, err
        assert b"Traceback" not in err and b"KeyboardInterrupt" not in err

    def test_watch_survives_the_balancer_going_away(self, make_lb_admin: Callable[..., LB]) -> None:
        lb = make_lb_admin((1,))
        out = io.StringIO()
        err = io.StringIO()
        import threading

        def stop_soon() -> None:
            # Once the first frame is out (or after 5 s: then the count may run out before the stop).
            wait_for(lambda: "NAME " in out.getvalue(), 5)
            lb.proc.stop()

        t = threading.Thread(target=stop_soon)
        t.start()
        rc = main([lb.admin_s, "--watch", "--interval", "0.2", "--count", "5", "--timeout", "1"], out, err)
        t.join()
        assert rc == 0
        assert out.getvalue().count("NAME ") >= 1
        errors = err.getvalue().splitlines()
        assert errors and all("cannot reach" in line for line in errors), errors

    def test_wrong_endpoint(self, make_lb_admin: Callable[..., LB]) -> None:
        """Pointed at the proxy port instead: the backend's answer is not a status document."""
        lb = make_lb_admin((1,))
        rc, out, err = run_balrs("status", "%s:%d" % lb.addr)
        assert rc == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and "status document" in err


class TestErrors:
    def test_unreachable(self) -> None:
        port = free_port()
        rc, out, err = run_balrs("status", "127.0.0.1:%d" % port)
        assert rc == 1
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("balrs status: cannot reach http://127.0.0.1:%d/status" % port), err
        assert "refused" in lines[0].lower()

    def test_unreachable_watch_exits_1(self) -> None:
        rc, out, err = run_balrs("status", "127.0.0.1:%d" % free_port(), "--watch")
        assert rc == 1 and len(err.strip().splitlines()) == 1

    @pytest.mark.parametrize(
        "args",
        [
            ["--interval", "0"],
            ["--interval", "x"],
            ["--count", "-1"],
            ["--bogus"],
            ["a", "b"],
            ["no-port-here"],
            ["127.0.0.1:99999"],
            ["127.0.0.1:9100", "--config", "lb.ini"],
        ],
    )
    def test_bad_arguments_exit_2(self, args: List[str]) -> None:
        out, err = io.StringIO(), io.StringIO()
        rc = main(args, out, err)
        assert rc == 2, args
        assert out.getvalue() == ""

    def test_bad_arguments_via_cli(self) -> None:
        rc, out, err = run_balrs("status", "--interval", "-3")
        assert rc == 2 and "usage:" in err and "Traceback" not in err

    def test_config_errors_exit_2(self, tmp_path: Path) -> None:
        b = TestBackend("x")
        try:
            no_admin = tmp_path / "noadmin.ini"
            no_admin.write_text(lb_ini("127.0.0.1:%d" % free_port(), [b]))
            out, err = io.StringIO(), io.StringIO()
            assert main(["--config", str(no_admin)], out, err) == 2
            assert "no [admin] listen" in err.getvalue()
            err = io.StringIO()
            assert main(["--config", str(tmp_path / "missing.ini")], out, err) == 2
            assert "missing.ini:0" in err.getvalue()
        finally:
            b.stop()

    def test_help(self) -> None:
        rc, out, err = run_balrs("status", "--help")
        assert rc == 0 and "ADMIN_ADDR" in out and "--watch" in out


class TestUnits:
    @pytest.mark.parametrize(
        "addr,url",
        [
            ("127.0.0.1:9100", "http://127.0.0.1:9100"),
            ("9100", "http://127.0.0.1:9100"),
            (":9100", "http://127.0.0.1:9100"),
            ("0.0.0.0:9100", "http://127.0.0.1:9100"),
            ("[::1]:9100", "http://[::1]:9100"),
            ("[::]:9100", "http://[::1]:9100"),
            ("localhost:9100", "http://localhost:9100"),
            ("http://example.test:80/", "http://example.test:80"),
        ],
    )
    def test_admin_url(self, addr: str, url: str) -> None:
        assert admin_url(addr) == url

    def test_format_table(self) -> None:
        doc: Dict[str, Any] = {
            "version": "9.9", "strategy": "least_connections", "client_connections": 4, "queue_length": 1,
            "draining": True,
            "backends": [
                {"name": "a", "address": "10.0.0.1:80", "state": "up", "weight": 1, "active": 3,
                 "requests": 12345, "failures": 2, "response_time_ms": 1.23456},
                {"name": "long-backend-name", "address": "[::1]:8080", "state": "down", "weight": 10,
                 "active": 0, "requests": 0, "failures": 0, "response_time_ms": None},
                {"name": "c", "address": "h:1", "state": "drain", "weight": 1, "active": 0, "requests": 7,
                 "failures": 0, "response_time_ms": 250.0},
            ],
        }
        out = format_table(doc, "127.0.0.1:9100")
        lines = out.splitlines()
        assert lines[0].split("  ") == ["balrs 9.9", "at 127.0.0.1:9100", "strategy least_connections",
                                        "backends 1/3 up", "clients 4", "queued 1", "DRAINING"]
        rows = _rows(out)
        assert rows["a"] == ["a", "10.0.0.1:80", "up", "1", "3", "12345", "2", "1.23"]
        assert rows["long-backend-name"][-1] == "-"
        assert rows["c"][-1] == "250"
        # Columns line up: every row as long as the header (right-aligned numbers end together).
        table = lines[2:]
        assert len({len(line) for line in table}) == 1, table
        assert format_table({"backends": []}).rstrip().endswith("(no backends)")

    def test_watch_on_a_terminal_clears(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import balrs.status as st

        docs = [{"strategy": "rr", "backends": []}] * 3
        monkeypatch.setattr(st, "fetch_status", lambda base, timeout: docs[0])

        class TTY(io.StringIO):
            def isatty(self) -> bool:
                return True

        out = TTY()
        assert main(["127.0.0.1:1", "--watch", "--interval", "0.01", "--count", "2"], out, io.StringIO()) == 0
        assert out.getvalue().count(CLEAR) == 2

    def test_ctrl_c_in_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import balrs.status as st

        monkeypatch.setattr(st, "fetch_status", lambda base, timeout: {"backends": []})

        def interrupt(_s: float) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(st.time, "sleep", interrupt)
        assert main(["127.0.0.1:1", "--watch"], io.StringIO(), io.StringIO()) == 0
