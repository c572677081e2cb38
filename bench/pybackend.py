"""A small HTTP/1.1 backend for bench/load.py, used only when nginx is not installed.

    python bench/pybackend.py PORT [PORT...]

Serves GET / ("Hello, world\\n"), /64k and /1m (64 KiB and 1 MiB of bytes) with keep-alive, on 127.0.0.1 only.
It is asyncio and one process: with it the backends, not the proxy, are usually the bottleneck, so
numbers measured with it understate what a proxy can do. Install nginx for real measurements.
Request bodies are not supported (the benchmark only sends GETs). Exits on SIGTERM/SIGINT, or after
--max-seconds (default 600) as a safety bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODIES = {
    b"/": b"Hello, world\n",
    b"/64k": b"x" * (64 * 1024),
    b"/1m": b"x" * (1024 * 1024),
}


def _response(body: bytes, close: bool) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: pybackend\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"Connection: close\r\n" if close else b"")) + body


RESPONSES = {(path, close): _response(body, close) for path, body in BODIES.items() for close in (False, True)}
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Handler(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            buf = buf[end + 4:]
            line_end = head.find(b"\r\n")
            line = head if line_end < 0 else head[:line_end]
            parts = line.split(b" ")
            path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
            lower = head.lower()
            close = b"\r\nconnection: close" in lower or line.endswith(b"HTTP/1.0")
            resp = RESPONSES.get((path, close))
            if resp is None:
                self.transport.write(NOT_FOUND)
                self.transport.close()
                return
            self.transport.write(resp)
            if close:
                self.transport.close()
                return
        self.buf = buf


async def main(ports: "list[int]", max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    servers = [await loop.create_server(Handler, "127.0.0.1", p, backlog=1024, reuse_address=True) for p in ports]
    try:
        await asyncio.wait_for(stop, max_seconds)
    except asyncio.TimeoutError:
        pass
    for s in servers:
        s.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ports", type=int, nargs="+")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    args = ap.parse_args()
    asyncio.run(main(args.ports, args.max_seconds))
