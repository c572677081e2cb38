"""What watching balrs costs it: the small keep-alive benchmark with and without admin pollers.

    python bench/admin_load.py [--duration 5] [--pollers 50] [--interval 0.1] [--rounds 2]

balrs (pinned to one CPU) serves wrk's small keep-alive requests (bench/load.py's ``small`` scenario)
while N pollers, each on its own keep-alive connection like a dashboard, fetch ``/`` and ``/status``
from the admin endpoint every ``--interval`` seconds (alternating; 50 pollers at 100 ms is 500
requests a second). wrk, the backends and the pollers share the other CPU, so in the rounds "without"
the same pollers poll a backend instead: both rounds take the same CPU from wrk, and only balrs' work
for the admin requests differs. Rounds alternate, and the report is the ratio of balrs' req/s (and of
proxied requests per balrs CPU-second) with to without, from the same run (this machine is noisy;
only ratios mean anything).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import subprocess
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402  (bench/load.py: backends, pinning, wrk)

POLLER_FLAG = "--poll"


def poll_main(port: int, n: int, interval: float, seconds: float, only_root: bool = False) -> int:
    """The pollers, in one process: ``n`` keep-alive connections, each sending its next request
    ``interval`` seconds after the previous one was sent (alternately / and /status)."""
    sel = selectors.DefaultSelector()
    conns = []
    start = time.monotonic()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), 5)
        s.setblocking(False)
        conns.append({"sock": s, "next": start + interval * i / n, "buf": b"", "want": 0, "k": i, "busy": False})
        sel.register(s, selectors.EVENT_READ, conns[-1])
    reqs = (b"GET / HTTP/1.1\r\nHost: admin\r\n\r\n",
            b"GET %s HTTP/1.1\r\nHost: admin\r\n\r\n" % (b"/" if only_root else b"/status"))
    done = errors = 0
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for c in conns:
            if not c["busy"] and now >= c["next"]:
                c["busy"] = True
                c["next"] += interval
                c["k"] += 1
                try:
                    c["sock"].send(reqs[c["k"] % 2])
                except OSError:
                    errors += 1
        wait = max(0.0, min(c["next"] for c in conns) - time.monotonic())
        for key, _ev in sel.select(min(wait, 0.05)):
            c = key.data
            try:
                data = c["sock"].recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                sel.unregister(c["sock"])
                c["busy"] = True
                c["next"] = float("inf")
                continue
            c["buf"] += data
            while True:
                buf = c["buf"]
                if not c["want"]:
                    end_head = buf.find(b"\r\n\r\n")
                    if end_head < 0:
                        break
                    length = 0
                    for line in buf[:end_head].lower().split(b"\r\n"):
                        if line.startswith(b"content-length:"):
                            length = int(line[15:])
                    c["want"] = end_head + 4 + length
                if len(buf) < c["want"]:
                    break
                c["buf"] = buf[c["want"]:]
                c["want"] = 0
                c["busy"] = False
                done += 1
    print("pollers: %d answers, %d errors, %.0f/s" % (done, errors, done / seconds))
    return 0 if not errors else 1


def cpu_busy(cpu: Optional[int]) -> float:
    """Busy CPU seconds (user, nice, system, irq, softirq) of one CPU so far, from /proc/stat."""
    if cpu is None:
        return 0.0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu%d " % cpu):
                v = [int(x) for x in line.split()[1:8]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    ap.add_argument("--pollers", type=int, default=50, help="admin pollers (default 50)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between a poller's requests (0.1)")
    ap.add_argument("--rounds", type=int, default=2, help="without/with pairs (default 2)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument(POLLER_FLAG, nargs=5, metavar=("PORT", "N", "INTERVAL", "SECONDS", "ROOT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.poll:
        port, n, interval, seconds, root = args.poll
        return poll_main(int(port), int(n), float(interval), float(seconds), root == "1")

    ns = argparse.Namespace(backend="auto", routes=0)
    bench = load.Bench(ns)
    try:
        bench.start_backends()
        admin_port = load.free_port()
        port = load.free_port()
        backends = "\n".join("[backend b%d]\naddress = 127.0.0.1:%d\n" % (i + 1, p)
                             for i, p in enumerate(bench.backend_ports))
        ini = os.path.join(bench.tmp, "lb-admin.ini")
        with open(ini, "w") as f:
            f.write(load.BALRS_INI.format(port=port, backends=backends, workers=1, strategy="round_robin",
                                          routes="", tls_flag="", tls="")
                    + "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin_port)
        log = os.path.join(bench.tmp, "balrs-admin.log")
        p = bench.procs.start(load.pin(bench.proxy_cpu, [sys.executable, "-m", "balrs", ini]), log, cwd=load.ROOT)
        load.wait_listening(port, p)
        load.wait_listening(admin_port, p)
        path = load.SCENARIOS["small"][0]
        load.run_wrk(port, path, [], 2, args.connections, bench.load_cpu)  # warm-up
        results = {"without": [], "with": []}  # type: dict
        # "without": the same pollers, polling one of the backends instead, so wrk and the backends
        # lose the same CPU to them in both runs and only balrs' work for the admin requests differs.
        for _ in range(args.rounds):
            for kind in ("without", "with"):
                target, root = (admin_port, "0") if kind == "with" else (bench.backend_ports[0], "1")
                poller = subprocess.Popen(load.pin(bench.load_cpu, [
                    sys.executable, os.path.abspath(__file__), POLLER_FLAG, str(target), str(args.pollers),
                    str(args.interval), str(args.duration + 1.5), root]), stdout=subprocess.PIPE, text=True)
                time.sleep(0.5)  # connected and polling
                cpu0 = load.cpu_seconds(p.pid) or 0.0
                other0 = cpu_busy(bench.load_cpu)
                res, _out = load.run_wrk(port, path, [], args.duration, args.connections, bench.load_cpu)
                cpu = (load.cpu_seconds(p.pid) or 0.0) - cpu0
                other = (cpu_busy(bench.load_cpu) - other0) / args.duration
                out, _ = poller.communicate(timeout=30)
                print("  " + out.strip())
                rps = res.get("requests_per_s") or 0.0
                requests = res.get("requests") or 0
                results[kind].append((rps, requests / cpu if cpu else 0.0, cpu / args.duration, other))
                print("  %-7s admin pollers: %9.0f req/s, balrs CPU %3.0f%%, %9.0f proxied requests per balrs "
                      "CPU-second; the load CPU %3.0f%% busy" % (kind, rps, 100 * cpu / args.duration,
                                                               results[kind][-1][1], 100 * other), flush=True)

        def mean(kind: str, i: int) -> float:
            return sum(r[i] for r in results[kind]) / len(results[kind])

        print("balrs small keep-alive with %d admin pollers every %gs (%s):" % (args.pollers, args.interval,
                                                                             bench.pin_note))
        print("  req/s: %.3f of without (%.0f vs %.0f); balrs CPU %.0f%% vs %.0f%%; the load CPU %.0f%% vs %.0f%% busy"
              % (mean("with", 0) / mean("without", 0), mean("with", 0), mean("without", 0),
                 100 * mean("with", 2), 100 * mean("without", 2), 100 * mean("with", 3), 100 * mean("without", 3)))
        print("  proxied requests per balrs CPU-second: %.3f of without (the cost of answering the pollers; "
              "the req/s ratio also moves when the pollers take CPU from wrk and the backends)"
              % (mean("with", 1) / mean("without", 1)))
        return 0
    finally:
        bench.procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
