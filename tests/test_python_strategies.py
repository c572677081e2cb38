"""Python strategies (``strategy = package.module:Name``): loading and its config errors, the views a
user's class sees, the wrapper's fallback to round robin (and its once-a-second error line), the
examples in examples/strategies.py, and a real ``python -m balrs`` process using them."""

from __future__ import annotations

import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import pytest
from support import REPO_ROOT, TestBackend, lb_ini, request, run_balrs, start_config

from balrs.config import Address, BackendConfig, ConfigError, parse_text
from balrs.http.heads import RequestHead, parse_request_head
from balrs.pool import Backend, Pool
from balrs.pystrategy import BackendView, RequestView, check_strategies, load_class
from balrs.strategies import ERROR_LOG_INTERVAL, PythonStrategy, make_strategy

EXAMPLES = REPO_ROOT / "examples"


def backends(*names: str) -> List[Backend]:
    return [Backend(BackendConfig(n, Address("127.0.0.1", 9000 + i))) for i, n in enumerate(names)]


def req(target: str = "/", *headers: str, method: str = "GET") -> RequestHead:
    lines = "".join("%s\r\n" % h for h in headers)
    return parse_request_head(("%s %s HTTP/1.1\r\nHost: Example.test:8080\r\n%s\r\n"
                               % (method, target, lines)).encode("latin-1"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A directory for strategy modules of a test (imported under unique names, forgotten after)."""
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("bt_"):
            del sys.modules[name]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / ("%s.py" % name)).write_text(textwrap.dedent(source))


# ---- loading ---------------------------------------------------------------------------------------------
def test_load_from_the_config_directory_only_while_importing(modules: Path) -> None:
    write_module(modules, "bt_dir", """
        class S:
            def update(self, backends): pass
            def pick(self, request, client_ip): return None
        """)
    with pytest.raises(ValueError, match="No module named 'bt_dir'"):
        load_class("bt_dir:S")
    cls = load_class("bt_dir:S", str(modules))
    assert cls.__name__ == "S"
    assert str(modules) not in sys.path
    assert load_class("bt_dir:S") is cls  # imported once: later loads need no directory


@pytest.mark.parametrize("spec, source, message", [
    ("bt_a:Missing", "x = 1\n", "cannot load bt_a:Missing: module 'bt_a' has no attribute 'Missing'"),
    ("bt_b:f", "def f(): pass\n", "cannot load bt_b:f: f is not a class (it is a function)"),
    ("bt_c:n", "n = 3\n", "cannot load bt_c:n: n is not a class (it is an int)"),
    ("bt_d:S", "class S:\n    def update(self, b): pass\n", "class S has no pick method"),
    ("bt_e:S", "class S:\n    pick = 1\n", "class S has no update or pick method"),
    ("bt_f:S", "x = (\n", "cannot load bt_f:S: SyntaxError: "),
    ("bt_g:S", "raise RuntimeError('no config for me')\n", "cannot load bt_g:S: RuntimeError: no config for me"),
    ("bt_h:S", "import sys\nsys.exit(3)\n", "cannot load bt_h:S: SystemExit: 3"),
    ("bt_i.sub:S", "x = 1\n", "cannot load bt_i.sub:S: ModuleNotFoundError: No module named 'bt_i.sub'"),
])
def test_load_errors(modules: Path, spec: str, source: str, message: str) -> None:
    write_module(modules, spec.partition(":")[0].partition(".")[0], source)
    with pytest.raises(ValueError) as info:
        load_class(spec, str(modules))
    assert message in str(info.value)
    assert str(modules) not in sys.path


def test_dotted_class_name(modules: Path) -> None:
    write_module(modules, "bt_nested", """
        class Outer:
            class Inner:
                def update(self, backends): pass
                def pick(self, request, client_ip): return None
        """)
    assert load_class("bt_nested:Outer.Inner", str(modules)).__name__ == "Inner"


def test_check_strategies_names_file_line_section_key(modules: Path) -> None:
    ini = modules / "lb.ini"
    text = ("[balancer]\nlisten = 127.0.0.1:8080\nstrategy = bt_nope:S\n[backend a]\naddress = 127.0.0.1:9001\n")
    ini.write_text(text)
    with pytest.raises(ConfigError) as info:
        check_strategies(parse_text(text, str(ini)))
    assert str(info.value) == ("%s:3: [balancer] strategy: cannot load bt_nope:S: ModuleNotFoundError: "
                               "No module named 'bt_nope'" % ini)
    text = ("[balancer]\nlisten = 127.0.0.1:8080\n[pool p]\nretries = 1\nstrategy = bt_nope2:S\n"
            "[backend a]\naddress = 127.0.0.1:9001\npool = p\n")
    with pytest.raises(ConfigError) as info:
        check_strategies(parse_text(text, str(ini)))
    assert str(info.value).startswith("%s:5: [pool p] strategy: cannot load bt_nope2:S: " % ini)


@pytest.mark.parametrize("value, message", [
    ("a.b:", "is not a Python strategy (expected package.module:ClassName)"),
    (":Name", "is not a Python strategy"),
    ("a-b:C", "is not a Python strategy"),
    ("a.b:C:D", "is not a Python strategy"),
    ("nonsense", "unknown strategy 'nonsense' (expected one of round_robin, "),
])
def test_strategy_spelling_is_checked_by_config(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text("[balancer]\nlisten = 127.0.0.1:8080\nstrategy = %s\n[backend a]\naddress = 127.0.0.1:9001\n"
                   % value, "x.ini")
    assert str(info.value).startswith("x.ini:3: [balancer] strategy: ") and message in str(info.value)


def test_check_exit_status_and_message(tmp_path: Path) -> None:
    ini = tmp_path / "lb.ini"
    ini.write_text("[balancer]\nlisten = 127.0.0.1:8080\n\nstrategy = bt_cli_missing:Pick\n"
                   "[backend a]\naddress = 127.0.0.1:9001\n")
    rc, out, err = run_balrs("--check", str(ini))
    assert rc == 2, (out, err)
    assert err.strip() == ("%s:4: [balancer] strategy: cannot load bt_cli_missing:Pick: ModuleNotFoundError: "
                           "No module named 'bt_cli_missing'" % ini)
    shutil.copy(EXAMPLES / "strategies.py", tmp_path / "strategies.py")
    ini.write_text("[balancer]\nlisten = 127.0.0.1:8080\nstrategy = strategies:FastestTwo\n"
                   "[backend a]\naddress = 127.0.0.1:9001\n")
    rc, out, err = run_balrs("--check", str(ini))
    assert rc == 0 and "strategy strategies:FastestTwo" in out, (out, err)


# ---- the views -------------------------------------------------------------------------------------------
def test_request_view() -> None:
    head = req("/api/users?id=7&x=%20", "X-User: alice", "x-user: bob", "Cookie: a=1; session=s3", "X-Lat: caf\xe9",
               method="POST")
    v = RequestView(head)
    assert (v.method, v.target, v.path, v.query) == ("POST", "/api/users?id=7&x=%20", "/api/users", "id=7&x=%20")
    assert v.host is not None and v.host.lower() == "example.test:8080"
    assert v.version == "HTTP/1.1"
    assert v.header("X-USER") == "alice, bob" and v.header("x-missing") is None
    assert v.header("x-lat") == "caf\xe9"
    assert v.cookie("session") == "s3" and v.cookie("nope") is None
    assert ("X-User", "alice") in v.headers and v.headers[0][0] == "Host"
    assert "POST /api/users" in repr(v)
    assert RequestView(req("/plain")).query == ""


def test_backend_view_is_live() -> None:
    b = Backend(BackendConfig("b1", Address("127.0.0.1", 9001), weight=3, max_connections=2))
    v = BackendView(b)
    assert (v.name, v.address, v.weight, v.in_flight, v.response_time, v.requests) == ("b1", "127.0.0.1:9001", 3, 0,
                                                                                        None, 0)
    assert v.max_connections == 2 and not v.full
    b.take_slot()
    b.take_slot()
    b.observe(0.25, 1.0)
    assert v.in_flight == 2 and v.full and v.response_time == 0.25
    with pytest.raises(AttributeError):
        v.name = "x"  # type: ignore[misc]


# ---- the wrapper -----------------------------------------------------------------------------------------
class Scripted:
    """A user strategy whose answers the test sets."""

    made: List["Scripted"] = []

    def __init__(self) -> None:
        self.told: List[List[str]] = []
        self.views: Sequence[Any] = []
        self.answer: Any = None
        self.fail: Optional[BaseException] = None
        self.fail_update = False
        self.asked: List[tuple[str, str]] = []
        Scripted.made.append(self)

    def update(self, backends: Sequence[Any]) -> None:
        if self.fail_update:
            raise KeyError("stale")
        self.told.append([b.name for b in backends])
        self.views = backends

    def pick(self, request: Any, client_ip: str) -> Any:
        self.asked.append((request.path, client_ip))
        if self.fail is not None:
            raise self.fail
        if isinstance(self.answer, str):
            return next(v for v in self.views if v.name == self.answer)
        return self.answer


def make(names: Sequence[str] = ("b1", "b2", "b3")) -> tuple[PythonStrategy, Scripted, List[Backend], FakeClock]:
    bs = backends(*names)
    clock = FakeClock()
    s = PythonStrategy(Scripted, "tests:Scripted", bs, clock=clock)
    user = s.user
    assert isinstance(user, Scripted)
    return s, user, bs, clock


def test_told_the_eligible_set_and_asked_per_request() -> None:
    s, user, bs, _ = make()
    assert user.told == [["b1", "b2", "b3"]]
    user.answer = "b2"
    assert [s.choose(req("/x"), "10.0.0.1") for _ in range(3)] == [bs[1]] * 3
    assert user.asked == [("/x", "10.0.0.1")] * 3
    s.update(bs[::2])
    assert user.told[-1] == ["b1", "b3"]
    first = user.views[0]
    s.update(bs)
    assert user.views[0] is first  # a backend keeps its view while eligible


def test_none_means_round_robin(caplog: pytest.LogCaptureFixture) -> None:
    s, user, bs, _ = make()
    user.answer = None
    assert [b.name for b in (s.choose(req(), "ip") for _ in range(6))] == ["b1", "b2", "b3"] * 2  # type: ignore
    assert not caplog.records


def test_no_eligible_backend_is_none_without_asking() -> None:
    s, user, _bs, _ = make()
    s.update([])
    assert s.choose(req(), "ip") is None and s.choose_excluding(req(), "ip", ()) is None
    assert user.asked == [] and user.told[-1] == []


def test_exception_falls_back_and_logs_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "balrs")
    s, user, bs, clock = make()
    user.fail = ZeroDivisionError("division by zero")
    got = [s.choose(req(), "ip") for _ in range(30)]
    assert [b.name for b in got if b is not None] == ["b1", "b2", "b3"] * 10  # round robin over the same set
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("strategy tests:Scripted: pick: ZeroDivisionError: division by zero (at ")
    assert "in pick)" in lines[0] and lines[0].endswith("; round robin instead")
    clock.now += ERROR_LOG_INTERVAL / 2
    s.choose(req(), "ip")
    assert len(caplog.records) == 1
    clock.now += ERROR_LOG_INTERVAL
    s.choose(req(), "ip")
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage().endswith("(and 30 more failures since the last report)")
    assert s.errors == 32
    user.fail = None
    user.answer = "b3"
    assert s.choose(req(), "ip") is bs[2]  # recovers at once


def test_a_pick_that_is_not_an_eligible_backend(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "balrs")
    s, user, bs, clock = make()
    user.answer = "b3"
    old_view = user.views[2]
    s.update(bs[:2])              # b3 is no longer eligible, the strategy keeps its old view
    user.answer = old_view
    assert s.choose(req(), "ip") in bs[:2]
    clock.now += 5
    user.answer = ["b2"]          # not a backend at all
    assert s.choose(req(), "ip") in bs[:2]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "which is not one of the eligible backends it was given" in messages[0]
    assert "returned ['b2']" in messages[1]


def test_failed_update_means_round_robin_until_one_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "balrs")
    s, user, bs, _ = make()
    user.answer = "b1"
    user.fail_update = True
    s.update(bs[1:])
    assert "update: KeyError: 'stale'" in caplog.records[0].getMessage()
    assert {s.choose(req(), "ip") for _ in range(4)} == {bs[1], bs[2]}
    assert user.asked == []
    user.fail_update = False
    s.update(bs)
    assert s.choose(req(), "ip") is bs[0]


def test_constructor_failure_is_round_robin(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "balrs")

    class Broken:
        def __init__(self) -> None:
            raise OSError("no model file")

        def update(self, backends: Any) -> None: ...

        def pick(self, request: Any, client_ip: str) -> Any: ...

    bs = backends("b1", "b2")
    s = PythonStrategy(Broken, "m:Broken", bs)
    assert [s.choose(req(), "ip") for _ in range(2)] == bs
    assert "strategy m:Broken: Broken(): OSError: no model file" in caplog.records[0].getMessage()


def test_choose_excluding_takes_the_pick_unless_excluded() -> None:
    s, user, bs, _ = make()
    user.answer = "b2"
    assert s.choose_excluding(req(), "ip", {bs[0]}) is bs[1]
    assert s.choose_excluding(req(), "ip", {bs[1]}) in (bs[0], bs[2])
    assert s.choose_excluding(req(), "ip", set(bs)) is None


def test_through_the_pool_and_make_strategy(modules: Path) -> None:
    write_module(modules, "bt_pool", """
        class Last:
            def update(self, backends):
                self.backends = backends
            def pick(self, request, client_ip):
                return self.backends[-1]
        """)
    load_class("bt_pool:Last", str(modules))
    configs = [BackendConfig(n, Address("127.0.0.1", 9000 + i), max_connections=1)
               for i, n in enumerate(("b1", "b2", "b3"))]
    pool = Pool(configs, "bt_pool:Last", make_strategy=make_strategy)
    assert pool.strategy_name == "bt_pool:Last"
    first = pool.choose(req(), "ip")
    assert first is not None and first.name == "b3"
    first.take_slot()  # b3 is full now: the pool asks again, round robin among the others
    second = pool.choose(req(), "ip")
    assert second is not None and second.name in ("b1", "b2")


# ---- the examples ----------------------------------------------------------------------------------------
@pytest.fixture
def examples_module() -> Any:
    load_class("strategies:FastestTwo", str(EXAMPLES))
    return sys.modules["strategies"]


def test_example_fastest_two(examples_module: Any) -> None:
    bs = backends("slow", "fast", "medium", "new")
    s = PythonStrategy(examples_module.FastestTwo, "strategies:FastestTwo", bs)
    for b, t in zip(bs, (0.5, 0.01, 0.05)):
        b.observe(t, 1.0)
    # "new" was never measured: it and "fast" are the two; both idle, the first of them
    assert s.choose(req(), "ip") is bs[3]
    bs[3].take_slot()
    assert s.choose(req(), "ip") is bs[1]
    bs[3].observe(1.0, 2.0)  # now "new" is the slowest: fast and medium
    bs[1].take_slot()
    assert s.choose(req(), "ip") is bs[2]
    bs[2].take_slot()
    bs[2].take_slot()
    assert s.choose(req(), "ip") is bs[1]  # fast has 1 in flight, medium 2
    s.update(bs[:1])
    assert s.choose(req(), "ip") is bs[0]


def test_example_prefer_header(examples_module: Any) -> None:
    bs = backends("a", "b", "c")
    s = PythonStrategy(examples_module.PreferHeader, "strategies:PreferHeader", bs)
    assert [s.choose(req("/", "X-Backend: c"), "ip") for _ in range(3)] == [bs[2]] * 3
    assert [s.choose(req(), "ip") for _ in range(3)] == bs                       # no field: round robin
    assert s.choose(req("/", "X-Backend: zz"), "ip") in bs                        # unknown: round robin
    s.update(bs[:2])
    assert s.choose(req("/", "X-Backend: c"), "ip") in bs[:2]                     # not eligible: round robin


# ---- a real process ----------------------------------------------------------------------------------
def test_real_process_with_the_example_strategies(tmp_path: Path) -> None:
    """``python -m balrs lb.ini`` with strategies.py next to lb.ini (found through the config's directory),
    one pool pinned by X-Backend, one whose strategy raises on every pick: every request is answered."""
    shutil.copy(EXAMPLES / "strategies.py", tmp_path / "strategies.py")
    write_module(tmp_path, "bt_failing", """
        class Failing:
            def update(self, backends):
                pass
            def pick(self, request, client_ip):
                return 1 / 0
        """)
    b1, b2, b3 = TestBackend("b1"), TestBackend("b2"), TestBackend("b3")
    try:
        def text_for(port: int, _admin: Optional[int]) -> str:
            text = lb_ini("127.0.0.1:%d" % port, [b1, b2], strategy="strategies:PreferHeader")
            return text + ("\n[pool bad]\nstrategy = bt_failing:Failing\n[route bad]\npath_prefix = /bad/\n"
                           "pool = bad\n[backend b3]\naddress = %s\npool = bad\n" % b3.address)
        lb = start_config(tmp_path, text_for)
        try:
            pinned = [request(lb.addr, headers=[("X-Backend", "b2")]).json()["backend"] for _ in range(4)]
            assert pinned == ["b2"] * 4
            spread = {request(lb.addr).json()["backend"] for _ in range(4)}
            assert spread == {"b1", "b2"}
            t0 = time.monotonic()
            answers = [request(lb.addr, target="/bad/%d" % i) for i in range(20)]
            assert all(r.status == 200 and r.json()["backend"] == "b3" for r in answers)
            elapsed = time.monotonic() - t0
        finally:
            lb.stop()
        log = lb.log_path.read_text()
        errors = [line for line in log.splitlines() if "strategy bt_failing:Failing: pick: ZeroDivisionError" in line]
        assert 1 <= len(errors) <= int(elapsed / ERROR_LOG_INTERVAL) + 1, log
        assert "(at bt_failing.py:6 in pick)" in errors[0]
    finally:
        for b in (b1, b2, b3):
            b.stop()
