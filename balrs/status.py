"""``python -m balrs status [ADMIN_ADDR] [--watch]``: a table of backends from the admin endpoint's /status.

The live report of the Bal.rs seed (its ``-r`` flag), as a separate command: it asks a running balrs
over HTTP, so it works against any process with an ``[admin]`` section, local or not. Exit status: 0
after a report (or Ctrl-C in ``--watch``), 1 if the endpoint cannot be reached or answers nonsense,
2 for bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Any, Dict, List, Optional, Sequence

from .config import ConfigError, load, parse_address

__all__ = ["main", "format_table", "admin_url", "fetch_status"]

# The contract's example [admin] listen address.
DEFAULT_ADMIN_ADDR = "127.0.0.1:9100"
# How long one fetch may take (connect + answer); the admin endpoint answers from memory at once.
DEFAULT_TIMEOUT = 3.0
# --watch refresh period (like `watch`'s 2 s).
DEFAULT_INTERVAL = 2.0

# ANSI: cursor home, clear the screen (what `watch` and `top` do between frames).
CLEAR = "\x1b[H\x1b[2J"

COLUMNS = ("NAME", "ADDRESS", "STATE", "WEIGHT", "ACTIVE", "REQUESTS", "FAILURES", "RESP_MS")
_NUMERIC = frozenset(["WEIGHT", "ACTIVE", "REQUESTS", "FAILURES", "RESP_MS"])


class StatusError(Exception):
    """The endpoint cannot be reached or did not answer a /status document. ``str()`` is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balrs status",
        description="Show the backends of a running balrs, from its admin endpoint's /status.",
    )
    p.add_argument("addr", nargs="?", metavar="ADMIN_ADDR",
                   help="HOST:PORT (or PORT, or http://HOST:PORT) of the admin endpoint "
                        "(default: the first [admin] listen of --config, else %s)" % DEFAULT_ADMIN_ADDR)
    p.add_argument("--config", "-c", metavar="lb.ini", help="take the address from this file's [admin] listen")
    p.add_argument("--watch", "-w", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", "-n", type=_positive, default=DEFAULT_INTERVAL, metavar="S",
                   help="seconds between refreshes with --watch (default: %g)" % DEFAULT_INTERVAL)
    p.add_argument("--count", type=_count, default=0, metavar="N",
                   help="with --watch, stop after N reports (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print the /status document as JSON")
    p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for the endpoint (default: %g)" % DEFAULT_TIMEOUT)
    return p


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds: %r" % text)
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more: %r" % text)
    return v


def admin_url(addr: str) -> str:
    """The base URL (no trailing slash) for an ADMIN_ADDR. Raises ValueError with a message."""
    addr = addr.strip()
    if addr.startswith(("http://", "https://")):
        return addr.rstrip("/")
    if addr.isdigit():
        addr = "127.0.0.1:" + addr
    elif addr.startswith(":"):
        addr = "127.0.0.1" + addr
    a = parse_address(addr)
    # A wildcard listen address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(a.host, a.host)
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, a.port)


def fetch_status(base_url: str, timeout: float) -> Dict[str, Any]:
    """GET {base_url}/status and return the document. Raises StatusError."""
    url = base_url + "/status"
    # No proxy: an http_proxy from the environment must not intercept a (usually loopback) admin address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "balrs-status"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            data = resp.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        raise StatusError("%s answered %d %s" % (url, exc.code, exc.reason)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        raise StatusError("cannot reach %s: %s" % (url, text)) from None
    except (OSError, ValueError) as exc:
        # socket timeouts, resets mid-answer, malformed URLs
        raise StatusError("cannot reach %s: %s" % (url, getattr(exc, "strerror", None) or exc or
                                                     type(exc).__name__)) from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:
        raise StatusError("%s did not answer JSON" % url) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("backends"), list):
        raise StatusError("%s did not answer a balrs status document" % url)
    return doc


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "%.2f" % v if v < 100 else "%.0f" % v
    return str(v)


def format_table(doc: Dict[str, Any], source: str = "") -> str:
    """The report: one summary line, then one row per backend."""
    backends: List[Dict[str, Any]] = [b for b in doc.get("backends", []) if isinstance(b, dict)]
    up = sum(1 for b in backends if b.get("state") == "up")
    summary = ["balrs %s" % doc.get("version", "?")]
    if source:
        summary.append("at %s" % source)
    summary.append("strategy %s" % doc.get("strategy", "?"))
    summary.append("backends %d/%d up" % (up, len(backends)))
    if "client_connections" in doc:
        summary.append("clients %s" % doc["client_connections"])
    if "queue_length" in doc:
        summary.append("queued %s" % doc["queue_length"])
    if doc.get("draining"):
        summary.append("DRAINING")
    rows = [list(COLUMNS)]
    for b in backends:
        rows.append([_cell(b.get(k)) for k in ("name", "address", "state", "weight", "active", "requests",
                                                "failures", "response_time_ms")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(summary), ""]
    for r in rows:
        cells = [r[i].rjust(widths[i]) if COLUMNS[i] in _NUMERIC else r[i].ljust(widths[i])
                 for i in range(len(COLUMNS))]
        lines.append("  ".join(cells).rstrip())
    if not backends:
        lines.append("(no backends)")
    return "\n".join(lines) + "\n"


def _render(doc: Dict[str, Any], source: str, as_json: bool) -> str:
    if as_json:
        return json.dumps(doc, indent=2) + "\n"
    return format_table(doc, source)


def main(argv: Optional[Sequence[str]] = None, out: Optional[IO[str]] = None,
         err: Optional[IO[str]] = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.addr is not None and args.config is not None:
        err.write("balrs status: give ADMIN_ADDR or --config, not both\n")
        return 2
    addr = args.addr
    if args.config is not None:
        try:
            config = load(args.config)
        except ConfigError as exc:
            err.write("%s\n" % exc)
            return 2
        if config.admin is None or not config.admin.listen:
            err.write("balrs status: %s has no [admin] listen\n" % args.config)
            return 2
        addr = str(config.admin.listen[0])
    try:
        base = admin_url(addr if addr is not None else DEFAULT_ADMIN_ADDR)
    except ValueError as exc:
        err.write("balrs status: bad ADMIN_ADDR %r: %s\n" % (addr, exc))
        return 2
    source = base[len("http://"):] if base.startswith("http://") else base

    try:
        doc = fetch_status(base, args.timeout)
    except StatusError as exc:
        err.write("balrs status: %s\n" % exc)
        return 1
    except KeyboardInterrupt:
        return 0 if args.watch else 130
    if not args.watch:
        out.write(_render(doc, source, args.json))
        out.flush()
        return 0
    return _watch(args, base, source, doc, out, err)


def _watch(args: argparse.Namespace, base: str, source: str, doc: Dict[str, Any], out: IO[str],
           err: IO[str]) -> int:
    """Refresh every interval until Ctrl-C (or ``--count`` reports). A fetch that fails after the first
    is reported and retried: the balancer may be restarting.

    On a terminal each report replaces the last (cursor home, clear screen; the error, if any, under the
    last good report). Into a pipe or file: reports one after another without escape codes (with
    ``--json``, one compact document per line), errors on stderr."""
    tty = out.isatty()
    shown = 0
    problem = ""
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            if tty:
                footer = ("%s  error: %s" % (stamp, problem) if problem
                          else "%s  every %gs, Ctrl-C to quit" % (stamp, args.interval))
                out.write(CLEAR + _render(doc, source, args.json) + "\n" + footer + "\n")
            elif problem:
                err.write("balrs status: %s %s\n" % (stamp, problem))
                err.flush()
            elif args.json:
                out.write(json.dumps(doc) + "\n")
            else:
                out.write(("\n" if shown else "") + _render(doc, source, False) + stamp + "\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
            try:
                doc = fetch_status(base, args.timeout)
                problem = ""
            except StatusError as exc:
                problem = str(exc)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
            out.flush()
        return 0
