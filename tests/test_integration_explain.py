"""Integration: ``explain --admin`` and ``GET /api/explain`` against the real balrs process: the answer
is the running balancer's own (a backend its health checks took down, one drained through the admin
API, the live pick), alone and with ``workers = 2``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from support import BalrsProcess, TestBackend, lb_ini, request, start_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "explain-token-0123456789"
HEALTH = "\n[health]\npath = /health\ninterval = 100ms\ntimeout = 500ms\nrise = 1\nfall = 2\n"


@pytest.fixture
def started(tmp_path: Path) -> Iterator[List[BalrsProcess]]:
    made: List[BalrsProcess] = []
    yield made
    for lb in made:
        lb.stop()


def launch(tmp_path: Path, made: List[BalrsProcess], backends: List[Any], **balancer: object) -> BalrsProcess:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")

    def text_for(port: int, admin_port: Any) -> str:
        return (lb_ini("127.0.0.1:%d" % port, backends, **balancer) + HEALTH
                + "\n[admin]\nlisten = 127.0.0.1:%d\ntoken_file = %s\n" % (admin_port, token))

    lb = start_config(tmp_path, text_for, admin=True)
    made.append(lb)
    return lb


def explain_cli(lb: BalrsProcess, *args: str) -> Dict[str, Any]:
    assert lb.admin_addr is not None
    p = subprocess.run([sys.executable, "-m", "balrs", "explain", str(lb.config_path), "GET /x", "--json",
                        "--admin", "%s:%d" % lb.admin_addr] + list(args),
                       cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict)
    return doc


def by_name(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {b["name"]: b for b in doc["pools"][0]["backends"]}


def drain(lb: BalrsProcess, name: str) -> None:
    assert lb.admin_addr is not None
    r = request(lb.admin_addr, "POST", "/api/backends/%s/drain" % name, [("Authorization", "Bearer " + TOKEN)])
    assert r.status == 200, r.body


def test_explain_takes_live_state(tmp_path: Path, started: List[BalrsProcess],
                                  make_backend: Callable[..., TestBackend]) -> None:
    live, dead, drained = make_backend("b1"), make_backend("b2", "dead"), make_backend("b3")
    lb = launch(tmp_path, started, [live, dead, drained])
    drain(lb, "b3")
    doc = wait_for(lambda: (lambda d: d if by_name(d)["b2"]["state"] == "down" else None)(explain_cli(lb)), 10)
    assert doc, "b2 (nothing listening) never showed as down"
    got = by_name(doc)
    assert doc["source"] == "live"
    assert "down by health checks" in got["b2"]["reason"] and "failed:" in got["b2"]["reason"]
    assert got["b3"]["state"] == "drain" and "draining (set by the admin API)" in got["b3"]["reason"]
    assert got["b1"]["eligible"] and doc["pick"] == "b1"
    # The text form, from the same endpoint.
    assert lb.admin_addr is not None
    p = subprocess.run([sys.executable, "-m", "balrs", "explain", str(lb.config_path), "GET /x", "--admin",
                        "%s:%d" % lb.admin_addr], cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "live, from the running balancer" in p.stdout and "pick      b1" in p.stdout
    r = request(lb.addr, "GET", "/x")
    assert r.status == 200 and r.header("X-Backend") == "b1"


def test_api_explain_answers_and_refuses(tmp_path: Path, started: List[BalrsProcess],
                                         make_backend: Callable[..., TestBackend]) -> None:
    a, b = make_backend("b1"), make_backend("b2")
    lb = launch(tmp_path, started, [a, b])
    assert lb.admin_addr is not None
    r = request(lb.admin_addr, "GET", "/api/explain?target=/p&host=h.test&header=X-A:1")
    assert r.status == 200
    doc = r.json()
    assert doc["request"]["host"] == "h.test" and doc["pick"] in ("b1", "b2") and "X-A: 1" in doc["forwarded"]
    # The pick on a copy: the real next request goes where explain said.
    said = doc["pick"]
    assert request(lb.addr, "GET", "/p").header("X-Backend") == said
    assert request(lb.admin_addr, "POST", "/api/explain").status == 405
    assert request(lb.admin_addr, "GET", "/api/explain?header=nocolon").status == 400
    r = request(lb.admin_addr, "GET", "/api/explain?target=/p&header=Bad%20Name:1")
    assert r.status == 200 and r.json()["outcome"]["status"] == 400
    assert lb.alive()


def test_explain_with_workers(tmp_path: Path, started: List[BalrsProcess],
                              make_backend: Callable[..., TestBackend]) -> None:
    a, b = make_backend("b1"), make_backend("b2")
    lb = launch(tmp_path, started, [a, b], workers="2")
    assert lb.admin_addr is not None
    assert wait_for(lambda: request(lb.admin_addr, "GET", "/status").json().get("workers_answered") == 2, 10)
    drain(lb, "b2")
    doc = explain_cli(lb)
    assert isinstance(doc.get("worker"), int), doc.keys()
    assert by_name(doc)["b2"]["state"] == "drain" and doc["pick"] == "b1"
