"""Chaos soak for the traffic policy: retries on 503 with a retry budget, against the real balrs.

    python bench/soak_policy.py [--rate 1000] [--cycles 2] [--period 30] [--bad 10] [--budget 20%]

Three backends behind ``python -m balrs`` with ``retry_on = connect-failure, 503`` and a retry budget.
Backend b1 answers 503 for ``--bad`` seconds out of every ``--period`` (``--cycles`` times); then every
backend answers 503 for ``--bad`` seconds. Meanwhile a client sends GETs at ``--rate`` per second over
keep-alive connections (open loop: each connection keeps its own schedule).

It reports, per phase, what the client saw and what the backends saw, and checks the two claims of the
policy (exit 1 if either fails):

- while one backend is bad, the client sees no failure (the 503s are retried on the others, and passive
  ejection soon takes the bad one out);
- while every backend is bad, the retries (backend requests beyond the client's) stay within the budget:
  at most ``budget`` of the requests of the sliding 10 s window, plus the floor of 3 per second.

Everything runs on 127.0.0.1 and stops by itself (every process is bounded by the run's duration plus a
margin). The balancer is pinned to one CPU, the backends and the client to the other (when there are two).
Numbers are for this machine and this run only; the check is the claim, not the speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import load  # noqa: E402  (bench/load.py: free ports, pinning, waiting for a port)


# ---- backends (a child process each) -------------------------------------------------------------
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
BAD = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n"


def backend_main(port: int, t0: float, windows: List[Tuple[float, float]], until: float, out: str) -> None:
    """Answer GETs on ``port``: 503 while ``time.time() - t0`` is inside one of ``windows``, else 200.
    Counts requests per second of the run (and 503s) and writes them to ``out`` as JSON at the end."""
    counts: Dict[int, List[int]] = {}

    def bad_now() -> Tuple[bool, int]:
        rel = time.time() - t0
        sec = int(rel) if rel >= 0 else -1
        return any(a <= rel < b for a, b in windows), sec

    class Handler(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tr: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            out = []
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                buf = buf[end + 4:]
                bad, sec = bad_now()
                c = counts.setdefault(sec, [0, 0])
                c[0] += 1
                if bad:
                    c[1] += 1
                out.append(BAD if bad else OK)
            self.buf = buf
            if out:
                self.tr.write(b"".join(out))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Handler, "127.0.0.1", port, backlog=1024, reuse_address=True)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        try:
            await asyncio.wait_for(stop, max(1.0, until - time.time()))
        except asyncio.TimeoutError:
            pass
        server.close()

    asyncio.run(serve())
    with open(out, "w") as f:
        json.dump({str(k): v for k, v in sorted(counts.items())}, f)


# ---- the client -----------------------------------------------------------------------------------
async def client_main(port: int, t0: float, duration: float, rate: float, conns: int
                      ) -> List[Tuple[float, int]]:
    """GETs at ``rate`` per second over ``conns`` keep-alive connections from ``t0`` for ``duration``
    seconds. Returns (send time relative to t0, status) per request; status 0 = the connection failed."""
    results: List[Tuple[float, int]] = []
    interval = conns / rate
    req = b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"

    async def one(k: int) -> None:
        reader: Optional[asyncio.StreamReader] = None
        writer: Optional[asyncio.StreamWriter] = None
        i = 0
        while True:
            when = t0 + k * interval / conns + i * interval
            i += 1
            if when - t0 >= duration:
                break
            delay = when - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.time() - t0
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await asyncio.wait_for(reader.readexactly(length), 10.0)
                results.append((sent, status))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
                results.append((sent, 0))
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one(k) for k in range(conns)))
    return results


# ---- the run --------------------------------------------------------------------------------------
def metric(admin_port: int, name: str) -> float:
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin_port, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="client GETs per second (default 1000)")
    ap.add_argument("--connections", type=int, default=32, help="client keep-alive connections (default 32)")
    ap.add_argument("--period", type=float, default=30.0, help="seconds per cycle (default 30)")
    ap.add_argument("--bad", type=float, default=10.0, help="seconds b1 answers 503 per cycle (default 10)")
    ap.add_argument("--cycles", type=int, default=2, help="cycles with one bad backend (default 2)")
    ap.add_argument("--budget", default="20%", help="retry_budget (default 20%%)")
    ap.add_argument("--retries", type=int, default=2, help="retries (default 2)")
    ap.add_argument("--json", default="", help="write the results here as JSON")
    ap.add_argument(BACKEND_FLAG, nargs=5, metavar=("PORT", "T0", "WINDOWS", "UNTIL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.backend:
        port, t0, windows, until, out = args.backend
        wins = [(float(a), float(b)) for a, b in (w.split("-") for w in windows.split(",") if w)]
        backend_main(int(port), float(t0), wins, float(until), out)
        return 0

    ratio = float(args.budget.rstrip("%")) / 100.0
    period, bad, cycles = args.period, args.bad, args.cycles
    # Phases (seconds from t0): b1 bad in [k*period + (period-bad)/2, ... + bad) per cycle; then all bad.
    one_bad = [(k * period + (period - bad) / 2, k * period + (period - bad) / 2 + bad) for k in range(cycles)]
    all_bad = (cycles * period, cycles * period + bad)
    duration = all_bad[1] + 2.0
    lb_cpu, rest_cpu, _note = load.choose_cpus()

    tmp = tempfile.mkdtemp(prefix="balrs-soak-")
    ports = [load.free_port() for _ in range(3)]
    lb_port, admin_port = load.free_port(), load.free_port()
    t0 = time.time() + 3.0  # time for everything to start
    until = t0 + duration + 15.0
    procs: List["subprocess.Popen[bytes]"] = []
    outs = []
    try:
        for i, p in enumerate(ports):
            wins = list(one_bad) if i == 0 else []
            wins.append(all_bad)
            out = os.path.join(tmp, "b%d.json" % (i + 1))
            outs.append(out)
            procs.append(subprocess.Popen(load.pin(rest_cpu, [
                sys.executable, os.path.abspath(__file__), BACKEND_FLAG, str(p), repr(t0),
                ",".join("%r-%r" % w for w in wins), repr(until), out])))
        ini = os.path.join(tmp, "lb.ini")
        with open(ini, "w") as f:
            f.write("[balancer]\nlisten = 127.0.0.1:%d\nstrategy = round_robin\nretries = %d\n"
                    "retry_on = connect-failure, 503\nretry_budget = %s\n\n[admin]\nlisten = 127.0.0.1:%d\n\n"
                    % (lb_port, args.retries, args.budget, admin_port))
            for i, p in enumerate(ports):
                f.write("[backend b%d]\naddress = 127.0.0.1:%d\n\n" % (i + 1, p))
        log_path = os.path.join(tmp, "balrs.log")
        log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=ROOT)
        lb = subprocess.Popen(load.pin(lb_cpu, [sys.executable, "-m", "balrs", ini]), stderr=log, env=env, cwd=tmp)
        procs.append(lb)
        for p, proc in zip(ports, procs):
            load.wait_listening(p, proc)
        load.wait_listening(lb_port, lb)
        load.wait_listening(admin_port, lb)
        if time.time() > t0:
            raise SystemExit("start-up took longer than 3 s")
        print("soak: %.0f s at %.0f GET/s; b1 bad during %s; all bad during %s; retry_budget %s, retries %d"
              % (duration, args.rate, ", ".join("%g-%gs" % w for w in one_bad), "%g-%gs" % all_bad,
                 args.budget, args.retries), flush=True)
        results = asyncio.run(client_main(lb_port, t0, duration, args.rate, args.connections))
        retries_total = metric(admin_port, "balrs_retries_total")
        exhausted = metric(admin_port, "balrs_retries_budget_exhausted_total")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # Backend requests per second of the run, all backends.
    per_sec: Dict[int, int] = {}
    for out in outs:
        with open(out) as f:
            for sec, (n, _bad) in json.load(f).items():
                per_sec[int(sec)] = per_sec.get(int(sec), 0) + n

    def client_in(a: float, b: float) -> List[int]:
        return [st for t, st in results if a <= t < b]

    def backend_in(a: float, b: float) -> int:
        # Whole seconds inside [a, b) (the backends count per second; a phase starts on a second here
        # when period and bad are whole numbers: (30 - 10) / 2 = 10).
        return sum(n for s, n in per_sec.items() if a <= s and s + 1 <= b)

    failed = 0
    lines = []
    one_bad_sent = 0
    for a, b in one_bad:
        sts = client_in(a, b)
        bad_n = sum(1 for s in sts if s != 200)
        failed += bad_n
        one_bad_sent += len(sts)
        extra = backend_in(a, b) - len(client_in(float(int(a)), float(int(b))))
        lines.append("one backend bad %5.1f-%5.1fs: client %6d requests, %d failed; backends %d extra"
                     % (a, b, len(sts), bad_n, extra))
    a, b = all_bad
    sts = client_in(a, b)
    window_before = len(client_in(a - 10.0, a))
    extra_all = backend_in(a, b) - len(client_in(float(int(a)), float(int(b))))
    # Retries in any 10 s window: at most ratio x the requests of that window, and at least the floor
    # of 3 per second is allowed. Over the bad phase the window covers at most 10 s before it as well.
    allowed = ratio * (len(sts) + window_before) + 3 * (b - a + 1)
    lines.append("every backend bad %5.1f-%5.1fs: client %6d requests, %d got the 503; backends %d extra "
                 "(%.1f%% of the client's; budget allows at most %d)"
                 % (a, b, len(sts), sum(1 for s in sts if s != 200), extra_all,
                    100.0 * extra_all / max(1, len(sts)), allowed))
    total = len(results)
    span = max(t for t, _ in results) if results else 0.0
    lines.append("client: %d requests in %.1f s (%.0f/s), %d non-200 overall; balrs_retries_total %d, "
                 "balrs_retries_budget_exhausted_total %d" % (total, span, total / max(span, 1e-9),
                                                             sum(1 for _, s in results if s != 200),
                                                             retries_total, exhausted))
    ok_one = failed == 0
    ok_all = extra_all <= allowed
    lines.append("one bad backend: %s (0 client failures expected)" % ("PASS" if ok_one else "FAIL"))
    lines.append("every backend bad: %s (extra requests within the budget)" % ("PASS" if ok_all else "FAIL"))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lines": lines, "one_bad_failures": failed, "one_bad_requests": one_bad_sent,
                       "all_bad_extra": extra_all, "all_bad_requests": len(sts), "allowed": allowed,
                       "retries_total": retries_total, "budget_exhausted": exhausted}, f, indent=1)
    return 0 if ok_one and ok_all else 1


BACKEND_FLAG = "--backend"

if __name__ == "__main__":
    sys.exit(main())
