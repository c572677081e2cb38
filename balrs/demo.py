"""``python -m balrs demo``: balrs in one command, everything on 127.0.0.1.

Three built-in demo backends (``web-1`` quick, ``web-2`` slower, ``web-3`` slow and answering 503 now
and then), the balancer in front of them with health checks, weights 3/2/1 and retries on 503,
the admin endpoint with its dashboard and a write token made for this run, and a little background
traffic so the dashboard has something to show. It prints the URLs and a curl line; Ctrl-C stops it all.

The backends are threads of this process (``http.server``) and the balancer runs on the main thread,
exactly as ``python -m balrs lb.ini`` runs it; only the configuration is written here instead of read
from a file.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "demo_config", "DemoBackend"]

log = logging.getLogger("balrs")

# name, (lowest, highest) response time in seconds, share of requests answered 503
BACKENDS: Sequence[Tuple[str, Tuple[float, float], float]] = (
    ("web-1", (0.002, 0.010), 0.0),
    ("web-2", (0.010, 0.040), 0.0),
    ("web-3", (0.040, 0.120), 0.08),
)


# The quick backend takes the most (smooth weighted round robin: web-1 web-2 web-1 web-3 web-2 web-1 ...).
WEIGHTS = (3, 2, 1)


class DemoBackend:
    """One demo backend: answers every path with a line naming itself, after its latency; some share of
    requests get 503. ``/health`` always answers 200 quickly."""

    def __init__(self, name: str, latency: Tuple[float, float], fail: float, port: int = 0) -> None:
        self.name = name
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "balrs-demo"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/health":
                    self._answer(200, b"ok\n")
                    return
                time.sleep(random.uniform(*latency))
                if fail and random.random() < fail:
                    self._answer(503, b"%s is busy, try again\n" % backend.name.encode())
                    return
                self._answer(200, b"hello from %s: %s %s\n" % (backend.name.encode(), self.command.encode(),
                                                                 self.path.encode("utf-8", "replace")))

            do_HEAD = do_GET

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the balancer's log is the one to read

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="demo-%s" % name, daemon=True)
        self.started = False

    def start(self) -> None:
        self.started = True
        self.thread.start()

    def stop(self) -> None:
        if self.started:
            self.server.shutdown()  # waits for serve_forever to return
        self.server.server_close()


def demo_config(port: int, admin_port: int, backends: Sequence[DemoBackend], token_file: str) -> str:
    """The lb.ini of the demo (printed with ``--print-config``)."""
    lines = [
        "[balancer]",
        "listen = 127.0.0.1:%d" % port,
        "strategy = weighted_round_robin",
        "retry_on = connect-failure, 503",
        "retries = 1",
        "",
        "[health]",
        "path = /health",
        "interval = 1s",
        "",
        "[admin]",
        "listen = 127.0.0.1:%d" % admin_port,
        "token_file = %s" % token_file,
        "",
    ]
    for b, weight in zip(backends, WEIGHTS):
        lines += ["[backend %s]" % b.name, "address = 127.0.0.1:%d" % b.port, "weight = %d" % weight, ""]
    return "\n".join(lines)


def _traffic(port: int, rate: float, stop: threading.Event) -> None:
    """About ``rate`` GETs a second through the balancer, so the dashboard moves."""
    paths = ["/", "/shop", "/shop/cart", "/api/items", "/about"]
    while not stop.wait(random.expovariate(rate)):
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as s:
                s.settimeout(5)
                s.sendall(b"GET %s HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
                          % random.choice(paths).encode())
                while s.recv(65536):
                    pass
        except OSError:
            pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="balrs demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, default=8080, help="the balancer's port on 127.0.0.1 (default 8080)")
    ap.add_argument("--admin-port", type=int, default=9100, help="the dashboard's port (default 9100)")
    ap.add_argument("--traffic", type=float, default=20.0,
                    help="background requests per second for the dashboard to show (0 = none; default 20)")
    ap.add_argument("--print-config", action="store_true", help="print the demo's lb.ini and exit")
    args = ap.parse_args(list(sys.argv[2:] if argv is None else argv))
    for what, port in (("--port", args.port), ("--admin-port", args.admin_port)):
        if not 0 < port < 65536:
            sys.stderr.write("balrs demo: %s %d is not a port\n" % (what, port))
            return 2
        if not args.print_config and not _port_free(port):
            sys.stderr.write("balrs demo: 127.0.0.1:%d is busy (%s); choose another with %s N\n"
                             % (port, "another program listens there", what))
            return 2
    if args.port == args.admin_port:
        sys.stderr.write("balrs demo: --port and --admin-port must differ\n")
        return 2

    from .config import ConfigError, parse_text
    from .server import Balancer

    tmp = tempfile.mkdtemp(prefix="balrs-demo-")
    backends: List[DemoBackend] = []
    stop = threading.Event()
    try:
        token = secrets.token_urlsafe(18)
        token_file = os.path.join(tmp, "admin.token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        backends = [DemoBackend(name, latency, fail) for name, latency, fail in BACKENDS]
        text = demo_config(args.port, args.admin_port, backends, token_file)
        if args.print_config:
            sys.stdout.write(text)
            return 0
        config = parse_text(text, os.path.join(tmp, "demo.ini"))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s balrs[%(process)d] %(levelname)s: %(message)s",
                            stream=sys.stderr)
        for b in backends:
            b.start()
        balancer = Balancer(config)
        balancer.install_signal_handlers()
        try:
            balancer.listen()
            balancer.start()
        except OSError as exc:
            sys.stderr.write("balrs demo: %s; choose other ports with --port and --admin-port\n"
                             % (exc.strerror or exc))
            return 2
        url, admin = "http://127.0.0.1:%d/" % args.port, "http://127.0.0.1:%d/" % args.admin_port
        sys.stdout.write(
            "\nbalrs demo: three backends (web-3 is slow and answers 503 now and then) behind balrs.\n\n"
            "  balancer    %s\n"
            "  dashboard   %s\n"
            "  try         curl -i %s\n"
            "  drain one   curl -X POST -H 'Authorization: Bearer %s' %sapi/backends/web-2/drain\n"
            "  metrics     %smetrics   status: %sstatus   or: python -m balrs status --watch 127.0.0.1:%d\n\n"
            "Ctrl-C stops everything.\n\n" % (url, admin, url, token, admin, admin, admin, args.admin_port))
        sys.stdout.flush()
        if args.traffic > 0:
            threading.Thread(target=_traffic, args=(args.port, args.traffic, stop), name="demo-traffic",
                             daemon=True).start()
        return balancer.run()
    except ConfigError as exc:  # a bug in demo_config: say so plainly
        sys.stderr.write("balrs demo: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        stop.set()
        for b in backends:
            try:
                b.stop()
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
