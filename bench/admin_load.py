"""What watching balrs costs it: the small keep-alive benchmark with and without admin pollers.

    python bench/admin_load.py [--duration 5] [--pollers 50] [--interval 0.1] [--rounds 2]

balrs (pinned to one CPU) serves wrk's small keep-alive requests (bench/load.py's ``small`` scenario)
while N pollers, each on its own keep-alive connection like a dashboard, fetch ``/`` and ``/status``
from the admin endpoint every ``--interval`` seconds (alternating; 50 pollers at 100 ms is 500
requests a second). Rounds alternate without and with the pollers, and the report is the ratio of
balrs' req/s with pollers to without, from the same run (this machine is noisy; only ratios mean
anything). wrk, the backends and the pollers share the other CPU.
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


def poll_main(port: int, n: int, interval: float, seconds: float) -> int:
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
    reqs = (b"GET / HTTP/1.1\r\nHost: admin\r\n\r\n", b"GET /status HTTP/1.1\r\nHost: admin\r\n\r\n")
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    ap.add_argument("--pollers", type=int, default=50, help="admin pollers (default 50)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between a poller's requests (0.1)")
    ap.add_argument("--rounds", type=int, default=2, help="without/with pairs (default 2)")
    ap.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument(POLLER_FLAG, nargs=4, metavar=("PORT", "N", "INTERVAL", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.poll:
        port, n, interval, seconds = args.poll
        return poll_main(int(port), int(n), float(interval), float(seconds))

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
        for _ in range(args.rounds):
            for kind in ("without", "with"):
                poller = None
                if kind == "with":
                    poller = subprocess.Popen(load.pin(bench.load_cpu, [
                        sys.executable, os.path.abspath(__file__), POLLER_FLAG, str(admin_port), str(args.pollers),
                        str(args.interval), str(args.duration + 1.5)]), stdout=subprocess.PIPE, text=True)
                    time.sleep(0.5)  # connected and polling
                res, _out = load.run_wrk(port, path, [], args.duration, args.connections, bench.load_cpu)
                if poller is not None:
                    out, _ = poller.communicate(timeout=30)
                    print("  " + out.strip())
                rps = res.get("requests_per_s") or 0.0
                results[kind].append(rps)
                print("  %-7s pollers: %9.0f req/s" % (kind, rps), flush=True)
        without = sum(results["without"]) / len(results["without"])
        with_ = sum(results["with"]) / len(results["with"])
        print("balrs small keep-alive with %d admin pollers every %gs: %.3f of its req/s without them "
              "(%.0f vs %.0f; %s)" % (args.pollers, args.interval, with_ / without if without else 0.0,
                                      with_, without, bench.pin_note))
        return 0
    finally:
        bench.procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
