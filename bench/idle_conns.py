"""What an idle keep-alive client connection costs balrs in memory.

    python bench/idle_conns.py [--connections 10000]

Starts balrs (one process) in front of one threaded backend, opens N client connections from
127.0.0.x source addresses, sends one small request on each and reads its answer, so that every
connection is an idle keep-alive connection that has served a request (its buffers, its timer, its
place in the server's tables). Reports balrs' RSS (VmRSS from /proc) with one connection and with N, and
the difference per connection in KiB. Every socket is on 127.0.0.x; everything stops by itself.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import callgrind  # noqa: E402  (its threaded keep-alive backends and helpers)
import load  # noqa: E402  (process groups, /proc reading)


def rss_kib(pid: int) -> int:
    return load.read_status_kib(pid, "VmRSS") or 0


def open_idle(port: int, n: int, timeout: float = 120.0) -> List[socket.socket]:
    """N connections that each sent a request and read its whole answer (kept open)."""
    sel = selectors.DefaultSelector()
    req = callgrind.REQUEST % port
    socks: List[socket.socket] = []
    pending: Dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    batch = 200
    made = 0
    while made < n or pending:
        if time.monotonic() > deadline:
            raise RuntimeError("timed out with %d of %d connections answered" % (len(socks) - len(pending), n))
        while made < n and len(pending) < batch:
            # Source addresses 127.0.0.2..: the ephemeral ports of one address would not be enough.
            s = socket.socket()
            s.bind(("127.0.0.%d" % (2 + made // 20000), 0))
            s.connect(("127.0.0.1", port))
            s.sendall(req)
            s.setblocking(False)
            socks.append(s)
            pending[s] = b""
            sel.register(s, selectors.EVENT_READ)
            made += 1
        for key, _ in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(65536)  # type: ignore[attr-defined]
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("balrs closed a connection")
            buf = pending[s] + data  # type: ignore[index]
            if b"\r\n\r\n" in buf and buf.endswith(callgrind.RESPONSE[-13:]):
                del pending[s]  # type: ignore[arg-type]
                sel.unregister(s)
            else:
                pending[s] = buf  # type: ignore[index]
    sel.close()
    return socks


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--checkout", type=Path, default=ROOT)
    args = p.parse_args(argv)
    backends = callgrind.Backends(1)
    port = callgrind._free_port()
    work = Path(tempfile.mkdtemp(prefix="balrs-idle-"))
    ini = work / "lb.ini"
    ini.write_text("[balancer]\nlisten = 127.0.0.1:%d\nclient_timeout = 600s\nmax_connections = %d\n\n"
                   "[backend b1]\naddress = 127.0.0.1:%d\n" % (port, args.connections + 100, backends.ports[0]))
    procs = load.Procs()
    proc = procs.start([sys.executable, "-m", "balrs", "--log-level", "warning", str(ini)], str(work / "balrs.log"),
                       cwd=str(args.checkout))
    socks: List[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socks = open_idle(port, 1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("balrs did not start")
                time.sleep(0.1)
        time.sleep(0.5)
        base = rss_kib(proc.pid)
        t0 = time.monotonic()
        socks += open_idle(port, args.connections - 1)
        took = time.monotonic() - t0
        time.sleep(1.0)  # let the balancer settle (its last answers written, buffers released)
        full = rss_kib(proc.pid)
        per = (full - base) / max(1, args.connections - 1)
        print("balrs RSS: %.1f MiB with 1 idle keep-alive connection, %.1f MiB with %d (%.2f KiB per "
              "connection; opened and answered in %.1fs)" % (base / 1024, full / 1024, args.connections, per, took))
        return 0
    finally:
        for s in socks:
            s.close()
        procs.stop_all()
        backends.stop()


if __name__ == "__main__":
    sys.exit(main())
