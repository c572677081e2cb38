"""``python -m balrs explain lb.ini "GET /path"``: why a request goes where it goes.

The answer comes from the code that decides for real, run on the request: the request parser and path
normalisation (``http/``), the route table (``routing.py``: its ``match`` decides, ``Route.mismatch``
says in words why each earlier route did not), the pools and their backends (``pool.py``), the
strategy (its ``view`` for what it weighs, then its pick) and the head builder of the client side
(``proxy/client.upstream_head``: what the backend would receive). Nothing here decides on its own.

Two sources of state:

- the file alone (``explain lb.ini ...``): the pools built from the configuration, every backend up and
  idle, as they are when balrs starts;
- a running balancer (``--admin ADDR``, or the admin endpoint's ``GET /api/explain``): its own pools,
  with health, ejections, drain and maint states, in-flight counts, slow start and response times.

The pick is made on a copy of the strategy's state, so asking a running balancer moves no round-robin
cursor and takes no slot (a Python strategy is asked itself: it is the user's code and may not copy).
Sans-IO apart from :func:`main` (which reads the file, or asks ``--admin`` over HTTP).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .accesslog import valid_request_id
from .config import Config, ConfigError, load
from .http.build import XF_APPEND, XF_KEEP, XF_REPLACE, forwarded_suffix
from .http.errors import ProtocolError
from .http.heads import LENGTH, RequestHead, parse_request_head
from .http.paths import needs_normalising, normalise_target
from .edge import real_client
from .pool import ADMIN_DRAIN, ADMIN_MAINT, Backend, Chooser, Pool, Pools
from .proxy.client import upstream_head
from .pystrategy import check_strategies
from .proxy.exchange import Exchange
from .routing import ACT_POOL, ACT_REDIRECT, RouteTable, match_host
from .settings import Settings
from .strategies import PythonStrategy, Strategy, make_strategy

__all__ = ["Question", "explain", "explain_config", "render", "main", "question_from_query", "ask_admin"]


class Question:
    """The request to explain: a method and target, the Host, other fields, the client's address."""

    def __init__(self, method: str = "GET", target: str = "/", host: Optional[str] = None,
                 headers: Sequence[Tuple[str, str]] = (), client_ip: str = "127.0.0.1",
                 cookie: Optional[str] = None, scheme: Optional[str] = None) -> None:
        self.method = method
        self.target = target
        self.host = host
        self.headers = list(headers)
        self.client_ip = client_ip
        self.cookie = cookie
        self.scheme = scheme

    def head(self, default_host: str) -> bytes:
        """The request head as a client would send it."""
        lines = ["%s %s HTTP/1.1" % (self.method, self.target),
                 "Host: %s" % (self.host if self.host is not None else default_host)]
        lines += ["%s: %s" % (k, v) for k, v in self.headers]
        if self.cookie is not None:
            lines.append("Cookie: %s" % self.cookie)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def query(self) -> str:
        """As the query string of ``GET /api/explain``."""
        items: List[Tuple[str, str]] = [("method", self.method), ("target", self.target),
                                        ("client_ip", self.client_ip)]
        if self.host is not None:
            items.append(("host", self.host))
        if self.cookie is not None:
            items.append(("cookie", self.cookie))
        if self.scheme is not None:
            items.append(("scheme", self.scheme))
        items += [("header", "%s:%s" % kv) for kv in self.headers]
        return urllib.parse.urlencode(items)


def _headers(items: Sequence[str]) -> List[Tuple[str, str]]:
    """``NAME:VALUE`` strings as (name, value); ValueError names the first that is not one."""
    out = []
    for h in items:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError("header %r: expected NAME:VALUE" % h)
        out.append((name.strip(), value.strip()))
    return out


def question_from_query(query: str) -> Question:
    """The question of ``GET /api/explain?method=GET&target=/x&host=...&header=K:V&client_ip=...``.
    Raises ValueError with a message."""
    q = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=256)

    def one(name: str, default: Optional[str] = None) -> Optional[str]:
        values = q.get(name)
        return values[-1] if values else default

    request = one("request")
    method, target = (request.split(" ", 1) + ["/"])[:2] if request else (one("method", "GET"), one("target", "/"))
    headers = _headers(q.get("header", []))
    return Question(method or "GET", target or "/", one("host"), headers, one("client_ip", "127.0.0.1") or "127.0.0.1",
                    one("cookie"), one("scheme"))


def _text(value: Optional[bytes]) -> Optional[str]:
    return None if value is None else value.decode("latin-1")


def _clone_strategy(s: Chooser) -> Chooser:
    """A copy whose picks leave ``s`` as it was: its lists and counters copied, the backends and the
    clock shared (a Python strategy is itself: the user's object may not copy)."""
    if isinstance(s, PythonStrategy) or not isinstance(s, Strategy):
        return s
    c = copy.copy(s)
    for k, v in vars(s).items():
        if isinstance(v, list):
            setattr(c, k, list(v))
        elif isinstance(v, dict):
            setattr(c, k, dict(v))
        elif isinstance(v, Strategy):
            setattr(c, k, _clone_strategy(v))
        elif isinstance(v, random.Random):
            r = random.Random()
            r.setstate(v.getstate())
            setattr(c, k, r)
            if "_random" in vars(s):
                setattr(c, "_random", r.random)
    return c


def _pick(pool: Pool, req: RequestHead, client_ip: str) -> Tuple[Optional[Backend], Optional[bool]]:
    """The pool's choice, as the client side makes it (``ClientConn._start_request``), on a copy of the
    strategy: (backend, whether a sticky cookie would be set; None without sticky)."""
    twin = copy.copy(pool)
    twin.strategy = _clone_strategy(pool.strategy)
    if pool.direct:
        return twin.strategy.choose(req, client_ip), None
    if pool.sticky is None:
        return twin.choose(req, client_ip), None
    backend, reset = twin.choose_sticky(req, client_ip)
    return backend, reset if backend is not None else None


def _exclusion(b: Backend, pool: Pool, pools: Pools, now: float) -> Tuple[bool, str]:
    """(in rotation, why not / notes) for one backend of the pool."""
    if b.draining:
        return False, "draining: removed from the configuration by a reload, finishing %d request(s)" % b.active
    if b.admin_state == ADMIN_MAINT:
        return False, "maint (set by the admin API): no traffic, no health probes"
    if b.admin_state == ADMIN_DRAIN:
        return False, "draining (set by the admin API): no new requests, %d in flight" % b.active
    if not b.resolved:
        return False, "unresolved: no address for %s yet" % b.config.address.host
    if not b.up:
        health = pools.health_of(b)
        why = "down by health checks: %d consecutive probe failure(s)" % b.health_failures
        if health is not None:
            why += " (fall %d, rise %d)" % (health.fall, health.rise)
        if b.last_check:
            why += "; last probe %.1fs ago %s" % (max(0.0, now - b.last_check),
                                                   "passed" if b.last_check_ok else "failed: %s" % (
                                                       b.last_check_why or "?"))
            if b.health_successes:
                why += " (%d of %d passes to come back)" % (b.health_successes, health.rise if health else 0)
        return False, why
    if b.ejected_until:
        return False, "ejected by passive health checks for another %.1fs (ejection %d, %d consecutive failures)" % (
            max(0.0, b.ejected_until - now), b.ejections, b.consecutive_errors)
    if b.full:
        return True, "at max_connections (%d in flight of %d): skipped while full" % (b.active, b.max_connections)
    return True, ""


def _members(pool: Pool, pools: Pools) -> List[Backend]:
    """The pool's backends, and those a reload removed that still finish requests (draining)."""
    out = list(pool.backends)
    for b in pool.retired + pools.retired:
        if b.pool == pool.name and b not in out:
            out.append(b)
    return out


def _backend_entry(b: Backend, pool: Pool, pools: Pools, rotation: Sequence[Backend], now: float) -> Dict[str, Any]:
    eligible, why = _exclusion(b, pool, pools, now)
    in_rotation = b in rotation
    notes: List[str] = []
    if why:
        notes.append(why)
    if b.eff_weight < b.weight and in_rotation:
        notes.append("slow start: weight %.2f of %d" % (b.eff_weight, b.weight))
    if not eligible and in_rotation:
        notes.append("in rotation anyway: the pool is in panic mode")
    return {
        "name": b.name, "address": b.address, "state": b.state,
        "eligible": eligible and in_rotation and not b.full,
        "in_rotation": in_rotation,
        "weight": b.weight, "effective_weight": round(b.eff_weight, 3),
        "in_flight": b.active, "max_connections": b.max_connections,
        "response_time_ms": round(b.ewma * 1000, 3) if b.ewma >= 0.0 else None,
        "reason": "; ".join(notes),
    }


def explain(q: Question, config: Config, pools: Pools, router: Optional[RouteTable], settings: Settings,
            now: float, live: bool) -> Dict[str, Any]:
    """Explain ``q`` against these pools and routes (a running balancer's, or built from ``config``)."""
    default_host = str(config.listen[0]) if config.listen else "localhost"
    tls_only = bool(config.listen) and all(a.tls for a in config.listen)
    scheme = (q.scheme or ("https" if tls_only else "http")).encode("ascii", "replace")
    out: Dict[str, Any] = {
        "source": "live" if live else "file",
        "request": {"method": q.method, "target": q.target, "host": q.host if q.host is not None else default_host,
                    "headers": ["%s: %s" % kv for kv in q.headers], "client_ip": q.client_ip,
                    "cookie": q.cookie, "scheme": scheme.decode("ascii")},
    }
    # 1. The head, as the client side parses it.
    try:
        head = q.head(default_host)
        req = parse_request_head(head)
        if req.method == b"CONNECT":
            raise ProtocolError(501, "CONNECT is not supported")
        if req.framing == LENGTH and req.length > config.max_body_bytes > 0:
            raise ProtocolError(413, "Content-Length %d over max_body_bytes" % req.length)
    except (ProtocolError, UnicodeError) as exc:
        status = exc.status if isinstance(exc, ProtocolError) else 400
        message = exc.message if isinstance(exc, ProtocolError) else str(exc)
        out["outcome"] = {"status": status, "why": "the request is refused: %s" % message}
        return out
    target = req.target
    match_path = b""
    if target[:1] == b"/" and needs_normalising(target) is not None:
        path, match_path, query = normalise_target(target)
        if path + query != target:
            req.target = path + query
            req.rewrite = True
    q_at = req.target.find(b"?")
    path, query = (req.target, b"") if q_at < 0 else (req.target[:q_at], req.target[q_at:])
    out["path"] = _text(path)
    out["query"] = _text(query)
    if match_path and match_path != path:
        out["match_path"] = _text(match_path)
    client_ip = q.client_ip
    trusted = bool(settings.trusted) and client_ip in settings.trusted
    xf = XF_APPEND if not settings.trusted else XF_KEEP if trusted else XF_REPLACE
    if trusted and req.rewrite:
        real = real_client(req.header(b"x-forwarded-for"), client_ip, settings.trusted)
        if real != client_ip:
            out["client"] = "%s (from X-Forwarded-For: %s is a trusted proxy)" % (real, client_ip)
            client_ip = real
    # 2. Routes.
    ex = Exchange(req, client_ip, now, 0.0, len(head))
    pool: Optional[Pool]
    if router is None:
        pool = pools.default
        out["routes"] = []
        out["route"] = None
        if pool is None:
            out["outcome"] = {"status": 404, "why": "no [route] sections and no default pool"}
            return out
        out["pool_why"] = "no [route] sections: the default pool"
    else:
        host = match_host(req.host)
        chosen = router.match(req, req.host, match_path or path, client_ip, scheme)
        tried: List[Dict[str, Any]] = []
        for route in router.routes:
            why = route.mismatch(req, host, match_path or path, client_ip, scheme)
            tried.append({"name": route.name, "line": route.config.line, "matched": route is chosen,
                          "mismatch": why})
            if route is chosen:
                break
        out["routes"] = tried
        out["route"] = chosen.name if chosen is not None else None
        if chosen is None:
            pool = pools.default
            if pool is None:
                out["outcome"] = {"status": 404, "why": "no route matched and there is no default pool"}
                return out
            out["pool_why"] = "no route matched: the default pool"
        else:
            out["action"] = chosen.describe()
            ex.route_ref = chosen
            if chosen.kind != ACT_POOL:
                if chosen.kind == ACT_REDIRECT:
                    location = chosen.location(scheme, match_host(req.host), config.listen[0].port if config.listen
                                               else 0, path, query)
                    out["outcome"] = {"status": chosen.status, "why": "route %s redirects" % chosen.name,
                                      "location": _text(location)}
                else:
                    out["outcome"] = {"status": chosen.status, "why": "route %s answers itself" % chosen.name}
                return out
            saved = list(chosen._current)
            try:
                name = chosen.pool()  # a split's next pool; its state is put back below
            finally:
                chosen._current[:] = saved
            if chosen.modifies_request:
                ex.fwd_target = chosen.forward_path(path) + query
            if chosen.modifies_response:
                ex.edit = chosen
            pool = pools.named[name]
            out["pool_why"] = ("route %s" % chosen.name if len(chosen.config.pools) == 1 else
                               "route %s splits %s: this request's turn" % (
                                   chosen.name, ", ".join("%s %d" % pw for pw in chosen.config.pools)))
    # 3. The pool, its backup while it has no backend in rotation, and every backend.
    out["pool"] = pool.name
    pools_seen: List[Dict[str, Any]] = []
    current: Optional[Pool] = pool
    backend: Optional[Backend] = None
    reset: Optional[bool] = None
    while current is not None:
        rotation = current.strategy.backends
        entry: Dict[str, Any] = {
            "name": current.name, "strategy": current.strategy_name, "hash_key": current.hash_key,
            "panic": current.panicking, "sticky": current.sticky.name.decode("ascii") if current.sticky else None,
            "backup": current.backup.name if current.backup is not None else None,
            "backends": [_backend_entry(b, current, pools, rotation, now) for b in _members(current, pools)],
        }
        try:
            entry["view"] = current.strategy.view(req, client_ip)
        except Exception as exc:  # a user's strategy: its view is the class name, nothing it runs
            entry["view"] = {"error": "%s: %s" % (type(exc).__name__, exc)}
        sticky = current.sticky
        if sticky is not None:
            wanted = sticky.wanted(req)
            entry["cookie"] = ("names %s" % wanted.name if wanted is not None else
                               "none" if q.cookie is None or sticky.marker not in req.raw else "not a valid id here")
        pools_seen.append(entry)
        backend, reset = _pick(current, req, client_ip)
        if backend is not None or current.all_full():
            break
        nxt = current.backup
        if nxt is None or nxt is pool or any(p["name"] == nxt.name for p in pools_seen):
            break
        entry["note"] = "no backend in rotation: its backup pool %s serves" % nxt.name
        current = nxt
    out["pools"] = pools_seen
    ex.pool_ref = current
    if backend is None:
        if current is not None and current.all_full():
            out["outcome"] = {"status": None, "why": "every backend in rotation is at max_connections: the request "
                              "waits in pool %s's queue (up to %gs, then 503)" % (current.name, current.queue_timeout)}
        else:
            out["outcome"] = {"status": 503, "why": "no backend of pool %s is in rotation" % pool.name
                              + (" (nor of its backup pools)" if pool.backup is not None else "")}
        return out
    out["pick"] = backend.name
    out["outcome"] = {"status": None, "why": "sent to %s (%s) in pool %s" % (backend.name, backend.address, current.name
                                                                            if current is not None else pool.name)}
    if reset:
        out["sticky_set"] = "the response sets the %s cookie for %s" % (
            current.sticky.name.decode("ascii") if current is not None and current.sticky else "", backend.name)
    # 4. What the backend receives.
    if settings.request_id:
        got = req.find_field(settings.request_id)
        if got is not None and valid_request_id(got):
            ex.request_id = got
            out["request_id"] = "kept: %s" % _text(got)
        else:
            ex.request_id = b"<generated>"
            out["request_id"] = "generated (the client sent %s)" % ("none" if got is None else "an invalid one")
    client_b = q.client_ip.encode("ascii", "replace")  # the peer, as the connection appends it
    upstream = upstream_head(settings, ex, req, backend.host_header, xf, client_b,
                             forwarded_suffix(client_b, scheme), scheme)
    out["forwarded"] = upstream.decode("latin-1").rstrip("\r\n").split("\r\n")
    return out


def explain_config(q: Question, config: Config) -> Dict[str, Any]:
    """Explain ``q`` against the pools and routes built from ``config`` alone (no live state)."""
    pools = Pools(config, clock=lambda: 0.0, make_strategy=make_strategy, resolve=False)
    router = RouteTable(config.routes, None, pools.named) if config.routes else None
    return explain(q, config, pools, router, Settings.from_config(config), 0.0, False)


def render(doc: Dict[str, Any]) -> str:
    """The human-readable answer."""
    lines: List[str] = []
    r = doc.get("request", {})
    lines.append("request   %s %s  Host: %s  from %s%s" % (r.get("method"), r.get("target"), r.get("host"),
                                                       r.get("client_ip"), "  (%s)" % r["scheme"] if r.get("scheme")
                                                       and r.get("scheme") != "http" else ""))
    for h in r.get("headers") or []:
        lines.append("          %s" % h)
    lines.append("state     %s" % ("live, from the running balancer" if doc.get("source") == "live"
                                   else "from the file: every backend up and idle (--admin ADDR for live state)"))
    if "path" in doc:
        lines.append("path      %s%s%s" % (doc["path"], doc.get("query") or "",
                                          "  (matched as %s)" % doc["match_path"] if doc.get("match_path") else ""))
    if doc.get("client"):
        lines.append("client    %s" % doc["client"])
    routes = doc.get("routes")
    if routes:
        lines.append("routes")
        for t in routes:
            mark = "match" if t["matched"] else "no   "
            lines.append("  %s  %-16s line %-4s %s" % (mark, t["name"], t["line"],
                                                      t["mismatch"] or "every key matches"))
        if doc.get("route") is None:
            lines.append("  no route matched")
    if doc.get("route"):
        lines.append("route     %s -> %s" % (doc["route"], doc.get("action", "")))
    if doc.get("pool"):
        lines.append("pool      %s (%s)" % (doc["pool"], doc.get("pool_why", "")))
    for p in doc.get("pools", []):
        lines.append("pool %s: strategy %s%s%s%s" % (
            p["name"], p["strategy"],
            " (hash_key %s)" % p["hash_key"] if p["strategy"] == "consistent_hash" else "",
            ", sticky cookie %s (%s)" % (p["sticky"], p.get("cookie")) if p.get("sticky") else "",
            ", PANIC: balancing over every backend" if p.get("panic") else ""))
        for b in p["backends"]:
            lines.append(("  %-3s %-14s %-22s %-5s weight %-6s in flight %-3s%s%s" % (
                "yes" if b["eligible"] else "no", b["name"], b["address"], b["state"],
                b["effective_weight"] if b["effective_weight"] != b["weight"] else b["weight"], b["in_flight"],
                " rt %.1fms" % b["response_time_ms"] if b.get("response_time_ms") is not None else "",
                "  " + b["reason"] if b["reason"] else "")).rstrip())
        view = p.get("view")
        if view:
            lines.append("  strategy view: %s" % json.dumps(view, sort_keys=True))
        if p.get("note"):
            lines.append("  %s" % p["note"])
    if doc.get("pick"):
        lines.append("pick      %s" % doc["pick"])
    if doc.get("sticky_set"):
        lines.append("sticky    %s" % doc["sticky_set"])
    o = doc.get("outcome", {})
    lines.append("outcome   %s%s" % ("%s: " % o["status"] if o.get("status") else "", o.get("why", "")))
    if o.get("location"):
        lines.append("          Location: %s" % o["location"])
    if doc.get("request_id"):
        lines.append("request id %s" % doc["request_id"])
    if doc.get("forwarded"):
        lines.append("forwarded")
        lines.extend("  " + line for line in doc["forwarded"])
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="balrs explain",
                                description="Why a request goes where it goes: the routes tried, the pool, each "
                                            "backend's eligibility, the strategy's view and the pick.")
    p.add_argument("config", metavar="lb.ini")
    p.add_argument("request", metavar='"METHOD /path"', help='the request line, e.g. "GET /api/users?id=1"')
    p.add_argument("--host", help="the Host field (default: the first listen address)")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="a field (repeatable)")
    p.add_argument("--client-ip", default="127.0.0.1", help="the client's address (default 127.0.0.1)")
    p.add_argument("--cookie", help="the Cookie field (e.g. a sticky cookie: NAME=ID)")
    p.add_argument("--scheme", choices=["http", "https"], help="the listener's scheme (default: http, or https "
                                                                 "when every listen address is tls)")
    p.add_argument("--admin", metavar="ADDR", help="ask the running balancer's admin endpoint (live state)")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    method, _, target = args.request.strip().partition(" ")
    target = target.strip() or "/"
    if not method or " " in target or not target.startswith(("/", "http://", "https://", "*")):
        sys.stderr.write('balrs explain: %r: expected "METHOD /path"\n' % args.request)
        return 2
    try:
        headers = _headers(args.header)
    except ValueError as exc:
        sys.stderr.write("balrs explain: --%s\n" % exc)
        return 2
    q = Question(method.upper(), target, args.host, headers, args.client_ip, args.cookie, args.scheme)
    try:
        config = load(args.config)
        if not args.admin:
            check_strategies(config)  # Python strategies, found next to the file as balrs finds them
    except ConfigError as exc:
        sys.stderr.write("%s\n" % exc)
        return 2
    if args.admin:
        try:
            doc = ask_admin(args.admin, q)
        except (OSError, ValueError) as exc:
            sys.stderr.write("balrs explain: --admin %s: %s\n" % (args.admin, exc))
            return 1
    else:
        try:
            doc = explain_config(q, config)
        except ValueError as exc:  # a strategy that cannot be built from the file
            sys.stderr.write("balrs explain: %s\n" % exc)
            return 2
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n" if args.json else render(doc))
    return 0


def ask_admin(addr: str, q: Question, timeout: float = 5.0) -> Dict[str, Any]:
    """``GET /api/explain`` of the admin endpoint at ``addr`` (HOST:PORT or a URL)."""
    base = addr if "://" in addr else "http://" + addr
    url = base.rstrip("/") + "/api/explain?" + q.query()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (an operator's own address)
            body = resp.read(1 << 22)
    except urllib.error.HTTPError as exc:
        detail = exc.read(4096).decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise ValueError("%d %s" % (exc.code, detail)) from None
    doc = json.loads(body.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not an explain answer")
    return doc

