"""balrs.simulate: the real pools and strategies on a virtual clock, checked against what can be worked
out by hand (exact round-robin shares, key movement of a consistent hash ring, queue throughput, a
health check's detection delay), the starvation of traefik#12306 and how least_response_time avoids
it, the synthetic generator's determinism, and the command line (errors, --json, --plot, access logs).

Every run is in-process and small; nothing here opens a socket or sleeps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
from support import REPO_ROOT

from balrs.accesslog import RECORD_FIELDS, make_formatter
from balrs.config import Config, parse_text
from balrs.simulate import Result, load_trace, main, parse_model, simulate, synthetic_trace

SVG = "{http://www.w3.org/2000/svg}"


def config(*backends: str, balancer: str = "", extra: str = "") -> Config:
    """lb.ini with these backends (``name`` or ``name weight=2 ...`` as key=value pairs)."""
    parts = ["[balancer]\nlisten = 127.0.0.1:8080\n%s\n" % balancer]
    for i, spec in enumerate(backends):
        name, *keys = spec.split()
        parts.append("[backend %s]\naddress = 127.0.0.1:%d\n%s\n"
                     % (name, 9001 + i, "".join("%s = %s\n" % tuple(k.split("=", 1)) for k in keys)))
    return parse_text("".join(parts) + extra, "lb.ini")


def trace(**spec: Any) -> Any:
    spec.setdefault("seed", 5)
    spec.setdefault("clients", 50)
    return synthetic_trace(spec)


def by_name(result: Result) -> Dict[str, Any]:
    return {b.name: b for b in result.backends}


def requests_between(result: Result, name: str, t0: float, t1: float) -> int:
    """Requests sent to ``name`` between virtual times t0 and t1 (from the sampled counts)."""
    series = result.requests_series[name]
    dt = result.sample_interval
    return series[min(len(series) - 1, int(t1 / dt))] - series[int(t0 / dt)]


# ---------------------------------------------------------------------------------------------- shares


def test_round_robin_shares_are_exact() -> None:
    (r,) = simulate(config("a", "b", "c"), trace(rate=500, count=3000), ["round_robin"])
    assert [b.requests for b in r.backends] == [1000, 1000, 1000]
    assert r.to_backends == 3000 and r.requests == 3000
    assert [round(b.share, 6) for b in r.backends] == [round(1 / 3, 6)] * 3


def test_weighted_round_robin_shares_follow_the_weights() -> None:
    cfg = config("a weight=1", "b weight=2", "c weight=3")
    (r,) = simulate(cfg, trace(rate=500, count=6000), ["weighted_round_robin"])
    assert [b.requests for b in r.backends] == [1000, 2000, 3000]


def test_the_config_strategy_runs_without_strategy_option() -> None:
    cfg = config("a", "b", balancer="strategy = wrr")
    (r,) = simulate(cfg, trace(rate=100, count=10))
    assert r.strategy == "weighted_round_robin"
    assert [b.requests for b in r.backends] == [5, 5]


# ---------------------------------------------------------------------------------------------- least_connections


def test_least_connections_holds_a_slow_backend_back() -> None:
    """One backend 5x slower. Round robin gives it 5x the in-flight requests of the others (Little's law:
    the same arrival rate times 5x the time). Least connections sends the next request to the backend with
    the fewest in flight, so the slow one's count never runs ahead: its peak is no higher than the fast
    ones', and its mean stays close to theirs (it is not below: a pick sees equal counts, and between picks
    the fast backends' counts fall sooner)."""
    model = parse_model({"default": {"latency": "lognormal:10,0.3"}, "slow": {"latency": "lognormal:50,0.3"}})
    lc, rr = simulate(config("slow", "f1", "f2"), trace(rate=600, duration=20), ["least_connections", "round_robin"],
                      model)
    slow, f1, f2 = lc.backends
    assert slow.in_flight_peak <= max(f1.in_flight_peak, f2.in_flight_peak)
    assert slow.in_flight_mean <= 1.5 * min(f1.in_flight_mean, f2.in_flight_mean)
    assert slow.requests < 0.5 * f1.requests and slow.requests < 0.5 * f2.requests
    rr_slow, rr_f1, _ = rr.backends
    assert rr_slow.in_flight_mean > 4 * rr_f1.in_flight_mean
    assert slow.in_flight_mean < 0.5 * rr_slow.in_flight_mean
    assert lc.latency_ms["p99"] < rr.latency_ms["p99"]


# ---------------------------------------------------------------------------------------------- keys


def test_consistent_hash_moves_only_the_removed_backends_keys() -> None:
    cfg = config("b1", "b2", "b3", "b4")
    ring, ip, rr, rnd = simulate(cfg, trace(rate=1000, count=20000, clients=3000),
                                 ["consistent_hash", "ip_hash", "round_robin", "random"], remove="b2")
    assert ring.keys is not None and ring.keys.removed == "b2" and ring.keys.kind == "hash"
    assert ring.keys.keys > 2900
    assert ring.keys.share == pytest.approx(0.25, abs=0.07)
    assert ring.keys.moved == ring.keys.on_removed and ring.keys.moved_elsewhere == 0
    # ip_hash maps onto a table, not a ring: other keys move too.
    assert ip.keys is not None and ip.keys.moved_elsewhere > 0
    assert rr.keys is None and rnd.keys is None


def test_consistent_hash_on_a_path_key_and_the_default_removed_backend() -> None:
    cfg = config("b1", "b2", "b3", "b4", balancer="hash_key = path")
    (r,) = simulate(cfg, trace(rate=1000, count=5000, paths=2000), ["consistent_hash"])
    assert r.keys is not None and r.keys.removed == "b4"  # the last backend
    assert r.keys.keys > 1800  # distinct paths seen
    assert r.keys.share == pytest.approx(0.25, abs=0.07) and r.keys.moved_elsewhere == 0


def test_sticky_cookie_clients_move_only_from_the_removed_backend() -> None:
    cfg = config("a", "b", "c", balancer="sticky = cookie:SRV")
    (r,) = simulate(cfg, trace(rate=200, count=2000, clients=300), ["round_robin"], remove="c")
    k = r.keys
    assert k is not None and k.kind == "sticky" and k.keys == 300
    assert k.moved == k.on_removed and k.moved_elsewhere == 0
    assert k.share == pytest.approx(1 / 3, abs=0.05)
    # Once a client holds a cookie it keeps its backend: shares follow the clients, not the rotation.
    assert r.to_backends == 2000


# ---------------------------------------------------------------------------------------------- starvation


class LowestAverage:
    """traefik#12306's pattern: the backend with the lowest average response time gets the request, every
    time. The others get no request, so their averages are never measured again: a backend that was slow
    once stays at its old average for good."""

    def __init__(self) -> None:
        self.backends: List[Any] = []

    def update(self, backends: List[Any]) -> None:
        self.backends = list(backends)

    def pick(self, request: Any, client_ip: str) -> Optional[Any]:
        best = None
        for b in self.backends:
            rt = b.response_time
            if rt is None:
                return b  # measure each once
            if best is None or rt < best.response_time:
                best = b
        return best


def test_lowest_average_starves_a_backend_that_was_slow_once() -> None:
    """b1 is 5x slower for the first 10 s, then as fast as the others. The naive strategy never sends it
    another request; least_response_time does: a backend's average halves for every DECAY_HALF_LIFE
    (10 s) without a sample, and the score multiplies it by the requests in flight plus one, so b1 is
    re-measured soon after the window and then takes its third."""
    model = parse_model({"default": {"latency": "lognormal:10,0.3"}, "b1": {"slow": [0, 10, 5]}})
    naive, lrt = simulate(config("b1", "b2", "b3"), trace(rate=100, duration=90), [LowestAverage,
                                                                                   "least_response_time"], model)
    assert naive.strategy == "LowestAverage"
    assert by_name(naive)["b1"].requests < 10  # its first measurements, in the slow window
    assert requests_between(naive, "b1", 10, 90) == 0
    after = {n: requests_between(lrt, n, 40, 90) for n in ("b1", "b2", "b3")}
    total = sum(after.values())
    assert total > 4500
    for n, count in after.items():
        assert count / total == pytest.approx(1 / 3, abs=0.05), (n, after)
    assert requests_between(lrt, "b1", 10, 40) > 0.15 * sum(requests_between(lrt, n, 10, 40)
                                                            for n in ("b1", "b2", "b3"))


# ---------------------------------------------------------------------------------------------- model


def test_queue_timeout_when_every_backend_is_full() -> None:
    """Two backends with one slot each, 100 ms per request: 20 answers a second at most. Arrivals at
    100/s queue in the pool (FIFO) and leave with a 503 after queue_timeout."""
    cfg = config("a max_connections=1", "b max_connections=1", balancer="queue_timeout = 300ms")
    model = parse_model({"default": {"latency": "const:100"}})
    (r,) = simulate(cfg, trace(rate=100, duration=10), ["round_robin"], model)
    assert all(b.in_flight_peak == 1 for b in r.backends)
    assert r.queued > 0 and r.queue_timeouts > 0
    assert r.to_backends + r.queue_timeouts == r.requests
    most = 2 * (10 + 0.3) / 0.1 + 2
    assert 0.95 * most <= r.to_backends <= most
    assert r.queue_ms_max <= 300.0 + 1e-6
    assert r.latency_ms["max"] <= 300.0 + 100.0 + 1e-6


def test_capacity_makes_requests_wait_inside_the_backend() -> None:
    model = parse_model({"default": {"latency": "const:100", "capacity": 2}})
    (r,) = simulate(config("a"), trace(rate=40, duration=5), ["round_robin"], model)
    (a,) = r.backends
    assert a.waited > 0 and a.wait_ms_mean > 100
    assert r.queued == 0  # balrs itself did not queue: the backend has no max_connections


def test_failure_window_until_the_health_check_notices() -> None:
    """c answers 503 from 10 s to 20 s. Probes every 1 s, fall 3, rise 2: it is out of rotation from 13 s
    to 22 s; before that round robin keeps giving it a third of the requests (all 503s)."""
    health = "[health]\ninterval = 1s\nfall = 3\nrise = 2\n"
    model = parse_model({"default": {"latency": "const:10"}, "c": {"fail": [10, 20]}})
    cfg = config("a", "b", "c", extra=health)
    (r,) = simulate(cfg, trace(rate=300, duration=30), ["round_robin"], model)
    c = by_name(r)["c"]
    assert requests_between(r, "c", 13.2, 21.8) == 0
    assert c.errors == pytest.approx(300 * 3 / 3, rel=0.15)
    assert requests_between(r, "c", 23, 30) > 0.3 * 7 * 300 * 0.9
    # Without active health checks nothing takes it out: 503s for the whole window.
    (r2,) = simulate(config("a", "b", "c"), trace(rate=300, duration=30), ["round_robin"], model)
    assert by_name(r2)["c"].errors == pytest.approx(300 * 10 / 3, rel=0.1)


def test_runs_are_reproducible() -> None:
    cfg = config("a", "b", "c")
    model = parse_model({"seed": 3, "default": {"latency": "exp:10"}})
    one = simulate(cfg, trace(rate=300, count=2000), ["random", "power_of_two", "least_response_time"], model)
    two = simulate(cfg, trace(rate=300, count=2000), ["random", "power_of_two", "least_response_time"], model)
    for x, y in zip(one, two):
        assert [b.requests for b in x.backends] == [b.requests for b in y.backends]
        assert x.latency_ms == y.latency_ms


def test_synthetic_generator_is_deterministic_with_a_seed() -> None:
    spec = {"rate": 1000, "count": 5000, "clients": 200, "client_distribution": "zipf:1.2", "paths": 50,
            "path_distribution": "zipf:1.0", "seed": 11}
    a, b = synthetic_trace(spec), synthetic_trace(spec)
    assert a.times == b.times and a.client_index == b.client_index and a.head_index == b.head_index
    assert len(a) == 5000 and a.times[0] == 0.0 and a.times == sorted(a.times)
    c = synthetic_trace(dict(spec, seed=12))
    assert c.times != a.times and c.client_index != a.client_index
    # Zipf: the first rank is the most frequent; Poisson: about rate x duration arrivals.
    counts = [a.client_index.count(k) for k in range(3)]
    assert counts[0] > counts[1] > counts[2]
    d = synthetic_trace({"rate": 1000, "duration": 10, "seed": 1})
    assert 9700 < len(d) < 10300 and d.duration <= 10


@pytest.mark.parametrize("spec, message", [
    ({"rate": 10}, "exactly one of duration"),
    ({"rate": -1, "count": 3}, "rate"),
    ({"rate": 10, "count": 3, "client_distribution": "zipf"}, "client_distribution"),
    ({"rate": 10, "count": 3, "colour": 1}, "unknown key 'colour'"),
    ({"rate": 10, "count": 3, "paths": ["nope"]}, "paths"),
])
def test_bad_synthetic_specs(spec: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_trace(spec)


@pytest.mark.parametrize("model, message", [
    ({"a": {"latency": "gauss:3"}}, "backend a: latency"),
    ({"a": {"capacity": 0}}, "capacity"),
    ({"a": {"slow": [5, 2, 3]}}, "slow"),
    ({"a": {"fail": [1]}}, "fail"),
    ({"default": {"colour": 1}}, "unknown key 'colour'"),
])
def test_bad_models(model: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model(model)


# ---------------------------------------------------------------------------------------------- command line


LB_INI = """\
[balancer]
listen = 127.0.0.1:8080
strategy = round_robin

[backend app1]
address = 127.0.0.1:9001

[backend app2]
address = 127.0.0.1:9002

[backend app3]
address = 127.0.0.1:9003
"""


@pytest.fixture
def files(tmp_path: Path) -> Dict[str, Path]:
    lb = tmp_path / "lb.ini"
    lb.write_text(LB_INI)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rate": 200, "duration": 10, "clients": 100, "seed": 2}))
    return {"lb": lb, "spec": spec, "dir": tmp_path}


def run(args: Sequence[Any], capsys: pytest.CaptureFixture[str]) -> Any:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([files["lb"], files["spec"], "--strategy", "rr,least_connections,consistent_hash"], capsys)
    assert code == 0, err
    header = [line for line in out.splitlines() if "round_robin" in line and "least_connections" in line][0]
    assert header.split() == ["round_robin", "least_connections", "consistent_hash"]
    assert "keys moved when app3 is removed" in out
    share = [line for line in out.splitlines() if line.strip().startswith("share moved")][0]
    assert share.split()[2:4] == ["n/a", "n/a"] and "of 100 keys" in share
    assert "p99.9" in out and "simulated" in err


def test_cli_json(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([files["lb"], files["spec"], "--strategy", "consistent_hash,random", "--json",
                          "--remove", "app1"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["remove"] == "app1" and d["trace"]["kind"] == "synthetic"
    ring, rnd = d["strategies"]
    assert ring["strategy"] == "consistent_hash" and ring["keys"]["removed"] == "app1"
    assert 0 < ring["keys"]["share"] < 1 and rnd["keys"] is None
    assert [b["name"] for b in ring["backends"]] == ["app1", "app2", "app3"]
    assert sum(b["requests"] for b in ring["backends"]) == d["trace"]["requests"]
    assert set(ring["latency_ms"]) == {"p50", "p99", "p99.9", "mean", "max"}


def test_cli_plot_is_an_svg_with_a_line_per_backend(files: Dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_svg = files["dir"] / "out.svg"
    code, _, err = run([files["lb"], files["spec"], "--strategy", "rr,lc", "--plot", out_svg], capsys)
    assert code == 0, err
    root = ET.parse(out_svg).getroot()
    assert root.tag == SVG + "svg"
    panels = root.findall(SVG + "g")
    assert [p.get("data-strategy") for p in panels] == ["round_robin", "least_connections"]
    for panel in panels:
        lines = panel.findall(SVG + "polyline")
        assert [p.get("data-backend") for p in lines] == ["app1", "app2", "app3"]
        assert all(len(p.get("points", "").split()) > 100 for p in lines)
        texts = [t.text for t in panel.iter(SVG + "text")]
        assert {"app1", "app2", "app3", "virtual time (s)", "in flight"} <= set(texts)


class Rec:
    """A finished exchange as balrs' access log formatter reads it."""

    __slots__ = RECORD_FIELDS
    req = None

    def __init__(self, **values: Any) -> None:
        base: Dict[str, Any] = dict(
            client="192.0.2.1", method=b"GET", target=b"/", minor=1, host=b"shop.test", user_agent=b"ua/1",
            referer=None, status=200, bytes_in=80, bytes_out=300, t_start=10.0, t_connected=10.001,
            t_response=10.01, t_done=10.011, wall_start=1796303101.25, pool="default", backend="app1",
            route=None, retries=0, request_id=None, end="ok")
        base.update(values)
        for name in RECORD_FIELDS:
            setattr(self, name, base[name])


def test_cli_reads_a_balrs_json_access_log(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    fmt = make_formatter("json")
    recs = [Rec(wall_start=1796303101.25 + dt, client=c, target=t)
            for dt, c, t in ((0.5, "192.0.2.2", b"/b"), (0.0, "192.0.2.1", b"/a?x=1"), (1.0, "192.0.2.1", b"/c"))]
    lines = [fmt(r) for r in recs]
    # balrs' own line for a request it could not parse (no protocol): skipped.
    lines.append(fmt(Rec(method=b"-", target=b"-", minor=-1, status=400, backend=None, end="rejected")))
    # A hand-written line with the time only, and a headers object.
    lines.append(json.dumps({"time": "2026-12-03T13:05:03.000+00:00", "client": "192.0.2.3", "method": "GET",
                             "host": "shop.test", "path": "/d", "headers": {"X-User": "u1"}}).encode() + b"\n")
    log = files["dir"] / "access.log"
    log.write_bytes(b"".join(lines))
    t = load_trace(str(log))
    assert len(t) == 4 and t.skipped == 1 and t.kind == "access log"
    assert t.times == pytest.approx([0.0, 0.5, 1.0, 1.75])
    assert [t.heads[h].target for h in t.head_index] == [b"/a?x=1", b"/b", b"/c", b"/d"]
    assert t.heads[t.head_index[3]].header(b"x-user") == b"u1"
    assert [t.clients[c] for c in t.client_index] == ["192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.3"]
    code, out, err = run([files["lb"], log, "--strategy", "ip_hash", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["trace"]["requests"] == 4 and d["strategies"][0]["keys"]["keys"] == 3


def test_a_one_line_spec_is_not_an_access_log(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rate": 10, "count": 5, "method": "POST", "paths": ["/api/x"]}) + "\n")
    t = load_trace(str(spec))
    assert t.kind == "synthetic" and len(t) == 5
    assert t.heads[0].method == b"POST" and t.heads[0].target == b"/api/x"


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_cli_unknown_strategy(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([files["lb"], files["spec"], "--strategy", "rr,fastest"], capsys)
    one_line_error(code, err, "--strategy", "unknown strategy 'fastest'")
    assert out == ""


def test_cli_bad_trace_line(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    log = files["dir"] / "bad.log"
    good = {"ts": 1.0, "client": "192.0.2.1", "method": "GET", "host": "h", "path": "/"}
    log.write_text(json.dumps(good) + "\n" + json.dumps(good)[:-3] + "\n")
    code, _, err = run([files["lb"], log], capsys)
    one_line_error(code, err, "%s:2:" % log)
    log.write_text(json.dumps(good) + "\n\n" + json.dumps(dict(good, path=None)) + "\n")
    code, _, err = run([files["lb"], log], capsys)
    one_line_error(code, err, "%s:3:" % log, '"path"')


def test_cli_config_error(files: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["lb"].write_text(LB_INI.replace("strategy = round_robin", "strategy = round_robin\nretries = lots"))
    code, _, err = run([files["lb"], files["spec"]], capsys)
    one_line_error(code, err, "%s:4:" % files["lb"], "retries")


@pytest.mark.parametrize("extra, needle", [
    (["--remove", "app9"], "--remove app9"),
    (["--backends-model", "MISSING"], "cannot read"),
    (["--backends-model", "MODEL"], "backend app7: not a backend"),
])
def test_cli_other_errors(files: Dict[str, Path], capsys: pytest.CaptureFixture[str], extra: List[str],
                          needle: str) -> None:
    model = files["dir"] / "model.json"
    model.write_text(json.dumps({"app7": {"latency": "const:5"}}))
    args = [a.replace("MODEL", str(model)).replace("MISSING", str(files["dir"] / "nope.json")) for a in extra]
    code, _, err = run([files["lb"], files["spec"]] + args, capsys)
    one_line_error(code, err, needle)


def test_cli_loads_a_python_strategy_next_to_the_config(files: Dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (files["dir"] / "sim_naive_strategy.py").write_text(textwrap.dedent("""\
        class First:
            def update(self, backends):
                self.backends = backends
            def pick(self, request, client_ip):
                return self.backends[0]
    """))
    code, out, err = run([files["lb"], files["spec"], "--strategy", "sim_naive_strategy:First", "--json"], capsys)
    assert code == 0, err
    (r,) = json.loads(out)["strategies"]
    assert [b["share"] for b in r["backends"]] == [1.0, 0.0, 0.0]
    code, _, err = run([files["lb"], files["spec"], "--strategy", "sim_naive_strategy:Second"], capsys)
    one_line_error(code, err, "--strategy: cannot load sim_naive_strategy:Second")


def test_python_m_balrs_simulate_runs_the_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "balrs", "simulate", "examples/lb.ini", "examples/simulate/spec.json",
         "--backends-model", "examples/simulate/model.json", "--strategy", "round_robin,least_connections"],
        cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "least_connections" in proc.stdout and "Traceback" not in proc.stderr
