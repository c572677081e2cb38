"""Instructions per proxied request, counted by callgrind: deterministic where req/s is not.

    python bench/callgrind.py                 # small keep-alive requests, round robin, 3 backends
    python bench/callgrind.py --requests 2000 --connections 10 --strategy least_connections
    python bench/callgrind.py --checkout /path/to/other/checkout   # the same run against another tree

balrs runs under ``valgrind --tool=callgrind`` (user-space instructions only: the kernel's share of
each syscall is not counted), with ``PYTHONHASHSEED=0``. The backends (nginx-like response heads) and the
client run in this process, outside valgrind. Two runs, with N and 2N requests over the same connections,
and the difference of their totals divided by N cancels start-up and shutdown: what remains is the cost
of one request. Needs valgrind; every socket is on 127.0.0.1; everything stops by itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
# What nginx answers for a small static response (the load benchmark's `small` scenario).
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Apr 2024 12:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nHello, world\n")
# What wrk sends.
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"


class Backends:
    """Threaded keep-alive backends answering every request head with RESPONSE."""

    def __init__(self, n: int) -> None:
        self.socks = []
        self.stopped = threading.Event()
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            s.settimeout(0.2)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    @property
    def ports(self) -> List[int]:
        return [s.getsockname()[1] for s in self.socks]

    def _accept(self, lsock: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(300)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _head, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(RESPONSE)
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        for s in self.socks:
            s.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _read_response(sock: socket.socket) -> None:
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("balrs closed a client connection")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"\r\n[Cc]ontent-[Ll]ength: ([0-9]+)", buf[:end + 2])
            if m is not None and len(buf) >= end + 4 + int(m.group(1)):
                return


def run_once(checkout: Path, requests: int, connections: int, strategy: str, work: Path,
             concurrent: bool = False, access_log: str = "", routes: int = 0,
             settings: Sequence[str] = ()) -> int:
    """Total instructions of a balrs process that served ``requests`` requests."""
    backends = Backends(3)
    port = _free_port()
    ini = work / "lb.ini"
    lines = ["[balancer]", "listen = 127.0.0.1:%d" % port, "strategy = %s" % strategy,
             "backend_timeout = 300s", "client_timeout = 300s", "header_timeout = 300s"]
    lines += ["%s = %s" % tuple(kv.split("=", 1)) for kv in settings] + [""]
    for i, p in enumerate(backends.ports):
        lines += ["[backend b%d]" % (i + 1), "address = 127.0.0.1:%d" % p, ""]
    if access_log:
        lines += ["[log]", "access = %s" % (work / "access.log"), "format = %s" % access_log, ""]
    # Routes that the request (GET / with Host 127.0.0.1) does not match, by host and by path, then one
    # that it does: the table has to rule out the others.
    for i in range(routes - 1):
        key = "host = svc%d.example.com" % i if i % 2 else "path_prefix = /svc%d/" % i
        lines += ["[route r%d]" % i, key, "pool = default", ""]
    if routes:
        lines += ["[route all]", "path_prefix = /", "pool = default", ""]
    ini.write_text("\n".join(lines))
    out = work / ("callgrind.%d.out" % requests)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(checkout))
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % out, sys.executable, "-m", "balrs",
         "--log-level", "warning", str(ini)],
        cwd=str(checkout), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    clients: List[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("balrs did not start: %s" % proc.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
                time.sleep(0.2)
        for _ in range(connections - 1):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=60))
        for c in clients:
            c.settimeout(60)
        req = REQUEST % port
        if concurrent:
            # Like wrk: a request in flight on every connection at once, so loop turns see many events.
            for _ in range(requests // connections):
                for c in clients:
                    c.sendall(req)
                for c in clients:
                    _read_response(c)
        else:
            for i in range(requests):
                c = clients[i % connections]
                c.sendall(req)
                _read_response(c)
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        backends.stop()
    text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if m is None:
        raise RuntimeError("no totals in %s" % out)
    return int(m.group(1))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="N (the second run serves 2N)")
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--strategy", default="round_robin")
    p.add_argument("--checkout", type=Path, default=ROOT, help="the balrs tree to measure")
    p.add_argument("--concurrent", action="store_true",
                   help="one request in flight on every connection at once (like wrk), not one at a time")
    p.add_argument("--access-log", choices=["common", "combined", "json"], default="",
                   help="with [log] access = a file in this format")
    p.add_argument("--routes", type=int, default=0,
                   help="with N [route] sections; the request matches the last one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [balancer] key, e.g. --set client_rate=1000000 (repeatable)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="leave the two callgrind outputs in DIR (for callgrind_annotate --diff)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.stderr.write("valgrind is not installed (apt-get install valgrind)\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="balrs-callgrind-") as tmp:
        work = Path(tmp)
        if args.keep is not None:
            work = args.keep.resolve()
            work.mkdir(parents=True, exist_ok=True)
        a = run_once(args.checkout.resolve(), args.requests, args.connections, args.strategy, work, args.concurrent,
                     args.access_log, args.routes, args.set)
        b = run_once(args.checkout.resolve(), 2 * args.requests, args.connections, args.strategy, work,
                     args.concurrent, args.access_log, args.routes, args.set)
    print("%s: %d instructions per request (%s, %d connections%s%s%s%s; totals %d and %d)"
          % (args.checkout, (b - a) // args.requests, args.strategy, args.connections,
             ", concurrent" if args.concurrent else "",
             ", %s access log" % args.access_log if args.access_log else "",
             ", %d routes" % args.routes if args.routes else "",
             "".join(", " + kv for kv in args.set), a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
