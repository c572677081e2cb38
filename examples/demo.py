"""See balrs balance: start three demo backends and balrs on examples/lb.ini, send a few requests,
then keep serving on http://127.0.0.1:8080/ until Ctrl-C.

    python examples/demo.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from http.server import ThreadingHTTPServer
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from backends import make_handler  # noqa: E402


def wait_listening(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("balrs did not start listening on port %d" % port)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # run the cleanup below
    for i, port in enumerate((9001, 9002, 9003), 1):
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler("app%d" % i))
        threading.Thread(target=server.serve_forever, daemon=True).start()
    balrs = subprocess.Popen([sys.executable, "-m", "balrs", os.path.join(HERE, "lb.ini")], cwd=ROOT)
    try:
        wait_listening(8080)
        print("\nbalrs is up on http://127.0.0.1:8080/ - eight requests (app3 has weight 2):")
        for n in range(8):
            with urllib.request.urlopen("http://127.0.0.1:8080/demo/%d" % n, timeout=5) as resp:
                print("  ", resp.read().decode().strip())
        print("\nStill serving; try `curl http://127.0.0.1:8080/`, or `python -m balrs status --watch` for a")
        print("live table of the backends (admin endpoint on 127.0.0.1:9100). Ctrl-C stops everything.")
        balrs.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if balrs.poll() is None:
            balrs.send_signal(signal.SIGTERM)
            try:
                balrs.wait(10)
            except subprocess.TimeoutExpired:
                balrs.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
