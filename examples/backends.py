"""Three tiny demo backends for examples/lb.ini (standard library only).

    python examples/backends.py [PORT ...]      # default: 9001 9002 9003

Each answers every GET/POST with a short text naming itself, so repeated requests through balrs show
the balancing. Stop with Ctrl-C.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(name: str) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = ("hello from %s: %s %s (X-Forwarded-For: %s)\n" % (
                name, self.command, self.path, self.headers.get("X-Forwarded-For"))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list) -> None:
    ports = [int(p) for p in argv] or [9001, 9002, 9003]
    servers = []
    for i, port in enumerate(ports, 1):
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler("app%d" % i))
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print("app%d listening on 127.0.0.1:%d" % (i, port))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        for server in servers:
            server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
