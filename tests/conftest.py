"""Fixtures for the integration tests (tests/test_integration_*.py): test backends and real balrs processes.

Processes are started from the repository root with ``sys.executable -m balrs`` and killed by PID in
teardown (SIGTERM, then SIGKILL). A session-wide balancer with three backends serves the tests that only
read; tests that need their own settings or fresh counters get their own processes from ``make_lb``.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import pytest
from support import BackendSpec, BalrsProcess, Blackhole, DeadPort, TestBackend, start_balrs

# A hard bound per integration test on top of every socket deadline: if one ever hangs, dump the
# stacks and exit (child processes die with us through PR_SET_PDEATHSIG).
INTEGRATION_TEST_LIMIT = 60.0


@pytest.fixture(autouse=True)
def _integration_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    if not request.node.module.__name__.startswith("test_integration_"):
        yield
        return
    faulthandler.dump_traceback_later(INTEGRATION_TEST_LIMIT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# ---- session-wide: three backends and one balancer with the default settings -------------------------------
@pytest.fixture(scope="session")
def shared_backends() -> Iterator[list[TestBackend]]:
    bs = [TestBackend("b%d" % i) for i in (1, 2, 3)]
    yield bs
    for b in bs:
        b.stop()


@pytest.fixture(scope="session")
def _shared_lb(
    shared_backends: list[TestBackend], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[BalrsProcess]]:
    holder = [start_balrs(tmp_path_factory.mktemp("shared-lb"), shared_backends)]
    yield holder
    for lb in holder:
        lb.stop()


@pytest.fixture
def lb(
    _shared_lb: list[BalrsProcess],
    shared_backends: list[TestBackend],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BalrsProcess]:
    """The shared balancer (round robin over ``shared_backends``), with the backends' records cleared.
    Restarted if an earlier test killed it; a test during which it dies fails in teardown."""
    if not _shared_lb[-1].alive():
        _shared_lb.append(start_balrs(tmp_path_factory.mktemp("shared-lb"), shared_backends))
    for b in shared_backends:
        b.reset()
    proc = _shared_lb[-1]
    yield proc
    assert proc.alive(), "balrs exited (status %s) during this test; stderr:\n%s" % (
        proc.returncode,
        proc.log_tail(),
    )


@pytest.fixture
def backends(shared_backends: list[TestBackend]) -> list[TestBackend]:
    return shared_backends


# ---- per test ---------------------------------------------------------------------------------------------
@pytest.fixture
def make_backend() -> Iterator[Callable[..., TestBackend]]:
    made: list[Any] = []

    def make(name: str, kind: str = "live", **opts: Any) -> Any:
        if kind == "live":
            b: Any = TestBackend(name, **opts)
        elif kind == "dead":
            b = DeadPort(name)
        elif kind == "blackhole":
            b = Blackhole(name)
        else:
            raise ValueError(kind)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def make_lb(tmp_path: Path) -> Iterator[Callable[..., BalrsProcess]]:
    """``make_lb(backends, args=(), wait_addr=None, extra_listen=(), **balancer_keys)``: a balrs process of
    this test's own, stopped (SIGTERM, then SIGKILL, by PID) in teardown."""
    made: list[BalrsProcess] = []
    counter = [0]

    def make(
        backends: Sequence[BackendSpec],
        args: Sequence[str] = (),
        wait_addr: tuple[str, int] | None = None,
        extra_listen: Sequence[str] = (),
        **balancer: object,
    ) -> BalrsProcess:
        counter[0] += 1
        lb = start_balrs(
            tmp_path,
            backends,
            args,
            "lb%d" % counter[0],
            wait_addr=wait_addr,
            extra_listen=extra_listen,
            **balancer,
        )
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


@pytest.fixture
def three(make_backend: Callable[..., TestBackend]) -> list[TestBackend]:
    """Three fresh backends (fresh counters) for one test."""
    return [make_backend("b%d" % i) for i in (1, 2, 3)]
