"""How long ``python -m balrs simulate`` takes on a million requests and three strategies.

    python bench/simulate_1m.py [--count 1000000] [--strategy round_robin,least_connections,least_response_time]

Four backends (one slower, one with an exponential tail), a synthetic trace of ``--count`` Poisson
arrivals at 10,000 req/s from 5,000 clients (Zipf 1.1) over 1,000 paths, and the model below. It runs
the real command in a child process (``python -m balrs simulate ...``), so the time includes start-up,
generating the trace and the model's draws, every strategy's run and the table, and prints the wall
seconds, the simulator's own figure (the sum of the runs), and the child's CPU seconds. The bar of
issue 12 is under 60 s on a 2-core machine with CPython 3.11.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LB_INI = """\
[balancer]
listen = 127.0.0.1:8080
strategy = round_robin

[backend a]
address = 127.0.0.1:9001

[backend b]
address = 127.0.0.1:9002

[backend c]
address = 127.0.0.1:9003

[backend d]
address = 127.0.0.1:9004
"""

MODEL = {
    "seed": 1,
    "default": {"latency": "lognormal:10,0.5", "capacity": 64},
    "backends": {"b": {"latency": "lognormal:20,0.5"}, "c": {"latency": "exp:12"}},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--strategy", default="round_robin,least_connections,least_response_time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lb = os.path.join(tmp, "lb.ini")
        spec = os.path.join(tmp, "spec.json")
        model = os.path.join(tmp, "model.json")
        with open(lb, "w") as f:
            f.write(LB_INI)
        with open(spec, "w") as f:
            json.dump({"rate": 10000, "count": args.count, "clients": 5000, "client_distribution": "zipf:1.1",
                       "paths": 1000, "seed": 3}, f)
        with open(model, "w") as f:
            json.dump(MODEL, f)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "balrs", "simulate", lb, spec, "--backends-model", model,
                               "--strategy", args.strategy], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        return 1
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.write(proc.stdout)
    sys.stdout.write("\n%s" % proc.stderr)
    sys.stdout.write("%d requests x %d strategies: %.1f s wall, %.1f s CPU (python %s)\n"
                     % (args.count, len(args.strategy.split(",")), wall, usage.ru_utime + usage.ru_stime,
                        sys.version.split()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
