"""The Python API (``balrs.serve``): a balancer on a background thread, port 0, status, reload, close;
no import side effects, no absolute self-imports, a vendored copy, and the docs' pytest fixture."""

from __future__ import annotations

import ast
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from support import REPO_ROOT, TestBackend, child_env, request

import balrs
from balrs.config import ConfigError, load, parse_text
from balrs.embed import Server

BALRS = REPO_ROOT / "balrs"


@pytest.fixture
def backends() -> Iterator[List[TestBackend]]:
    bs = [TestBackend("e1"), TestBackend("e2")]
    yield bs
    for b in bs:
        b.stop()


def ini(backends: List[TestBackend], listen: str = "127.0.0.1:0", extra: str = "") -> str:
    text = "[balancer]\nlisten = %s\ndrain_timeout = 2s\n%s\n" % (listen, extra)
    for b in backends:
        text += "[backend %s]\naddress = %s\n" % (b.name, b.address)
    return text


def refused(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_serve_text_port_zero_status_reload_close(backends: List[TestBackend]) -> None:
    before = threading.active_count()
    lb = balrs.serve(ini(backends, extra="[admin]\nlisten = 127.0.0.1:0\n"))
    try:
        host, port = lb.address
        assert host == "127.0.0.1" and port > 0 and lb.addresses == [lb.address]
        assert lb.url == "http://127.0.0.1:%d/" % port and lb.running
        assert lb.admin_address is not None and lb.admin_address[1] not in (0, port)
        names = [request(lb.address, target="/r%d" % i).json()["backend"] for i in range(4)]
        assert sorted(names) == ["e1", "e1", "e2", "e2"]
        st = lb.status()
        assert isinstance(st, dict) and json.loads(json.dumps(st)) == st
        assert st["listen"] == ["127.0.0.1:%d" % port]
        assert {b["name"]: b["requests"] for b in st["backends"]} == {"e1": 2, "e2": 2}
        assert request(lb.admin_address, target="/status").json()["backends"][0]["name"] == "e1"
        # reload: one backend fewer, same (port 0) listener kept
        lb.reload(ini(backends[:1], extra="[admin]\nlisten = 127.0.0.1:0\n"))
        assert lb.address == (host, port)
        assert {request(lb.address).json()["backend"] for _ in range(3)} == {"e1"}
        assert [b["name"] for b in lb.status()["backends"]] == ["e1"]
        # a bad reload raises in the caller and changes nothing
        with pytest.raises(ConfigError, match=r"^<balrs.serve>:3: \[balancer\] frobnicate: unknown key"):
            lb.reload("[balancer]\nlisten = 127.0.0.1:0\nfrobnicate = 1\n[backend x]\naddress = 127.0.0.1:1\n")
        assert request(lb.address).json()["backend"] == "e1"
    finally:
        lb.close()
    assert not lb.running and refused((host, port))
    lb.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        lb.status()
    assert wait_threads(before)


def wait_threads(count: int) -> bool:
    end = time.monotonic() + 5
    while threading.active_count() > count and time.monotonic() < end:
        time.sleep(0.01)
    return threading.active_count() <= count


def test_path_and_config_and_reload_from_the_file(backends: List[TestBackend], tmp_path: Path) -> None:
    path = tmp_path / "lb.ini"
    path.write_text(ini(backends))
    with balrs.serve(str(path)) as lb:
        assert {request(lb.address).json()["backend"] for _ in range(2)} == {"e1", "e2"}
        path.write_text(ini(backends[1:]))
        lb.reload()
        assert {request(lb.address).json()["backend"] for _ in range(2)} == {"e2"}
    with balrs.serve(path) as lb:  # a Path
        assert request(lb.address).json()["backend"] == "e2"
    with balrs.serve(load(str(path))) as lb:  # a parsed Config
        assert request(lb.address).json()["backend"] == "e2"
        lb.reload()  # the Config came from a file: re-read it
    with balrs.serve(parse_text(ini(backends), "<mine>")) as lb:
        with pytest.raises(ValueError, match="not given a file"):
            lb.reload()


def test_errors_are_raised_in_the_caller(backends: List[TestBackend]) -> None:
    with pytest.raises(ConfigError, match=r"^<balrs.serve>:2: \[balancer\] listen"):
        balrs.serve("[balancer]\nlisten = nowhere\n[backend a]\naddress = 127.0.0.1:1\n")
    with pytest.raises(ValueError, match="workers = 2"):
        balrs.serve(ini(backends, listen="127.0.0.1:%d" % backends[0].port, extra="workers = 2"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1:%d" % taken.getsockname()[1]):
            balrs.serve(ini(backends, listen="127.0.0.1:%d" % taken.getsockname()[1]))
    finally:
        taken.close()
    with pytest.raises(ConfigError, match="cannot read file"):
        balrs.serve("no/such/lb.ini")


def test_port_zero_in_the_config() -> None:
    cfg = parse_text("[balancer]\nlisten = 127.0.0.1:0, [::1]:0\n[admin]\nlisten = 127.0.0.1:0\n"
                     "[backend a]\naddress = 127.0.0.1:1\n", "x.ini")
    assert [a.port for a in cfg.listen] == [0, 0]
    with pytest.raises(ConfigError, match=r"x.ini:4: \[backend a\] address: port 0 is out of range 1..65535"):
        parse_text("[balancer]\nlisten = 127.0.0.1:0\n[backend a]\naddress = 127.0.0.1:0\n", "x.ini")
    with pytest.raises(ConfigError, match=r"x.ini:2: \[balancer\] listen: 127.0.0.1:0: port 0 \(any free port\) "
                                          r"needs workers = 1"):
        parse_text("[balancer]\nlisten = 127.0.0.1:0\nworkers = 2\n[backend a]\naddress = 127.0.0.1:1\n", "x.ini")


def test_port_zero_from_the_command_line(tmp_path: Path, backends: List[TestBackend]) -> None:
    """``python -m balrs`` with port 0 logs the ports it got, and /status reports them."""
    path = tmp_path / "lb.ini"
    path.write_text(ini(backends, extra="[admin]\nlisten = 127.0.0.1:0\n"))
    log_path = tmp_path / "lb.stderr"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "balrs", str(path)], cwd=str(REPO_ROOT), env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        found: List[Any] = []

        def ports() -> bool:
            text = log_path.read_text()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+);", text)
            a = re.search(r"admin endpoint on 127\.0\.0\.1:(\d+) ", text)
            if m and a:
                found[:] = [int(m.group(1)), int(a.group(1))]
            return bool(found) or proc.poll() is not None

        deadline = time.monotonic() + 15
        while not ports() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found and 0 not in found, log_path.read_text()
        port, admin_port = found
        assert request(("127.0.0.1", port)).json()["backend"] in ("e1", "e2")
        assert request(("127.0.0.1", admin_port), target="/status").json()["listen"] == ["127.0.0.1:%d" % port]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_no_signal_handlers_and_runs_from_any_thread(backends: List[TestBackend]) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    out: List[Any] = []

    def in_a_thread() -> None:
        with balrs.serve(ini(backends)) as lb:
            out.append(request(lb.address).json()["backend"])
            out.append({s: signal.getsignal(s) for s in handlers})

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join(20)
    assert out and out[0] in ("e1", "e2") and out[1] == handlers
    with balrs.serve(ini(backends)) as lb:  # and from the main thread
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert signal.set_wakeup_fd(wakeup) == wakeup  # untouched
        request(lb.address)


def test_two_servers_and_status_from_many_threads(backends: List[TestBackend]) -> None:
    with balrs.serve(ini(backends[:1])) as one, balrs.serve(ini(backends[1:])) as two:
        assert one.address != two.address
        docs: List[Any] = []
        threads = [threading.Thread(target=lambda: docs.append((one.status(), two.status()))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(docs) == 8
        assert all([b["name"] for b in d1["backends"]] == ["e1"] and [b["name"] for b in d2["backends"]] == ["e2"]
                   for d1, d2 in docs)


def test_close_drains_a_request_in_flight(backends: List[TestBackend]) -> None:
    lb = balrs.serve(ini(backends))
    got: List[Any] = []
    t = threading.Thread(target=lambda: got.append(request(lb.address, target="/delay/400")))
    t.start()
    time.sleep(0.15)
    t0 = time.monotonic()
    lb.close()
    t.join(5)
    assert got and got[0].status == 200  # finished, not cut
    assert 0.1 < time.monotonic() - t0 < 2.5
    assert refused(lb.address)


def test_close_without_drain_is_immediate(backends: List[TestBackend]) -> None:
    lb = balrs.serve(ini(backends))
    got: List[Any] = []

    def slow() -> None:
        try:
            got.append(request(lb.address, target="/delay/3000"))
        except Exception as exc:  # cut: closed without a response
            got.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.15)
    t0 = time.monotonic()
    lb.close(drain=False)
    assert time.monotonic() - t0 < 1.0 and not lb.running
    t.join(5)
    assert got and isinstance(got[0], Exception)


def test_server_repr_and_type(backends: List[TestBackend]) -> None:
    with balrs.serve(ini(backends)) as lb:
        assert isinstance(lb, Server) and repr(lb) == "<balrs.Server %s>" % lb.url
    assert repr(lb).endswith("(stopped)>")


# ---- import hygiene ----------------------------------------------------------------------------------------
def test_no_absolute_self_imports() -> None:
    """The package names itself only relatively, so a copy under another name imports its own modules."""
    offenders = []
    for path in sorted(BALRS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "balrs" or n.startswith("balrs.") for n in names):
                offenders.append("%s:%d" % (path.relative_to(REPO_ROOT), node.lineno))
        # import_module / __import__ with a literal "balrs" would dodge the AST check
        for m in re.finditer(r"(import_module|__import__)\(\s*['\"]balrs", path.read_text(encoding="utf-8")):
            offenders.append("%s: %s" % (path.relative_to(REPO_ROOT), m.group(0)))
    assert offenders == []


IMPORT_EVERYTHING = r'''
import logging, os, pkgutil, signal, sys, threading, importlib
path0 = list(sys.path)
before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
import balrs
assert sorted(m for m in sys.modules if m.startswith("balrs")) == ["balrs"], sorted(sys.modules)
names = ["balrs"] + [m.name for m in pkgutil.walk_packages(balrs.__path__, "balrs.")]
for name in names:
    importlib.import_module(name)
assert "balrs.embed" in sys.modules and "balrs.__main__" in names
balrs.serve  # the lazy attribute
after = {s: signal.getsignal(s) for s in before}
print(len(names), threading.active_count(), len(logging.getLogger().handlers),
      len(logging.getLogger("balrs").handlers), after == before, signal.set_wakeup_fd(-1), sys.path == path0)
'''


def test_imports_have_no_side_effects() -> None:
    p = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=60,
                       cwd=str(REPO_ROOT), env=child_env())
    assert p.returncode == 0, p.stderr
    count, threads, root_handlers, balrs_handlers, same_signals, wakeup, same_path = p.stdout.split()
    assert int(count) > 30
    assert (threads, root_handlers, balrs_handlers, same_signals, wakeup, same_path) == (
        "1", "0", "0", "True", "-1", "True"), p.stdout


VENDORED_SCRIPT = r'''
import json, sys, urllib.request
sys.path.insert(0, sys.argv[1])
from vendored_pkg._vendor import balrs
ini = "[balancer]\nlisten = 127.0.0.1:0\n[backend v1]\naddress = %s\n" % sys.argv[2]
with balrs.serve(ini) as lb:
    with urllib.request.urlopen(lb.url + "through/the/copy", timeout=5) as r:
        body = json.loads(r.read())
    st = lb.status()
mods = sorted(m for m in sys.modules if m == "balrs" or m.startswith("balrs."))
print(json.dumps({"backend": body["backend"], "target": body["target"], "status": st["backends"][0]["name"],
                  "stray": mods, "file": balrs.__file__, "running": lb.running}))
'''


def test_vendored_copy(tmp_path: Path, backends: List[TestBackend]) -> None:
    vendor = tmp_path / "vendored_pkg" / "_vendor"
    shutil.copytree(BALRS, vendor / "balrs", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "vendored_pkg" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    script = tmp_path / "use_vendored.py"
    script.write_text(VENDORED_SCRIPT)
    p = subprocess.run([sys.executable, "-I", str(script), str(tmp_path), backends[0].address], capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out == {"backend": "e1", "target": "/through/the/copy", "status": "v1", "stray": [],
                   "file": str(vendor / "balrs" / "__init__.py"), "running": False}


# ---- the documented example ------------------------------------------------------------------------------
def docs_example(name: str) -> str:
    text = (REPO_ROOT / "docs" / "embedding.md").read_text()
    m = re.search(r"<!-- example: %s -->\n```python\n(.*?)```" % re.escape(name), text, re.S)
    assert m is not None, "no example %r in docs/embedding.md" % name
    return m.group(1)


def test_the_docs_pytest_fixture_runs(tmp_path: Path) -> None:
    """docs/embedding.md's fixture example, exactly as printed, run by pytest in a subprocess."""
    (tmp_path / "test_docs_example.py").write_text(docs_example("pytest-fixture"))
    env = dict(child_env(), PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_docs_example.py"],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout


def test_python_strategy_through_serve(tmp_path: Path, backends: List[TestBackend]) -> None:
    (tmp_path / "bt_embed_strategy.py").write_text(textwrap.dedent("""
        class Second:
            def update(self, backends):
                self.backends = backends
            def pick(self, request, client_ip):
                return self.backends[-1]
        """))
    path = tmp_path / "lb.ini"
    path.write_text(ini(backends, extra="strategy = bt_embed_strategy:Second"))
    try:
        with balrs.serve(path) as lb:  # found next to the file
            assert {request(lb.address).json()["backend"] for _ in range(3)} == {"e2"}
            assert lb.status()["strategy"] == "bt_embed_strategy:Second"
    finally:
        sys.modules.pop("bt_embed_strategy", None)
