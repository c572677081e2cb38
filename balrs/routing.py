"""The route table: ``[route NAME]`` sections compiled once per (re)load into a small decision structure.

A request is matched in two steps. First a table lookup: the candidates for its (host, first path
segment) pair, the file-ordered routes that *can* match it, are computed once and cached (a bounded
dict, cleared when full, so a flood of random hosts costs misses, never memory). A route's host key
(exact names, and ``*.suffix`` wildcards looked up by walking the host's label suffixes) and its
literal path (``path_prefix = /api/`` or ``path = /ping`` can only match paths whose first segment is
``api`` or ``ping``) decide whether it is a candidate. Then the candidates are checked in order, each
on only the keys it has, cheapest first, regex last: no regex runs for a route whose host cannot match.
First match wins (HAProxy ``use_backend`` order, Traefik without priorities, nginx's order for
prefix locations is longest-first: here it is file order, as the contract says).

Sans-IO: the proxy gives the parsed head, the normalised path, the client address and the scheme.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from .config import RouteConfig
from .http.build import REASONS
from .http.heads import RequestHead

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["ACT_POOL", "ACT_REDIRECT", "ACT_RETURN", "Route", "RouteTable", "match_host"]

ACT_POOL = 0
ACT_REDIRECT = 1
ACT_RETURN = 2

# Cached candidate tuples per (host, first segment), and parsed client addresses.
CANDIDATE_CACHE_SIZE = 4096
ADDRESS_CACHE_SIZE = 4096

_REDIRECT_REASONS = {301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 307: b"Temporary Redirect",
                     308: b"Permanent Redirect"}
_PLACEHOLDER = re.compile(r"\{(scheme|host|port|path|query)\}")

_IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def match_host(raw: Optional[bytes]) -> bytes:
    """The host a route sees: lowercased, without its port and one trailing dot (``[v6]`` kept)."""
    if not raw:
        return b""
    host = raw.lower()
    if host[:1] == b"[":
        end = host.find(b"]")
        return host[:end + 1] if end > 0 else host
    colon = host.rfind(b":")
    if colon >= 0:
        host = host[:colon]
    if host[-1:] == b".":
        host = host[:-1]
    return host


def _show(value: bytes) -> str:
    return value.decode("latin-1")


def _first_segment(path: bytes) -> bytes:
    end = path.find(b"/", 1)
    return path[1:] if end < 0 else path[1:end]


class Route:
    """One compiled route (see RouteConfig for what each key means)."""

    __slots__ = (
        "name", "index", "kind", "requests", "config", "hosts", "wildcards", "any_host", "segment",
        "prefix", "exact", "regex", "methods", "headers", "networks", "scheme", "status",
        "_pools", "_weights", "_current", "_total", "strip", "add", "request_extra", "request_remove",
        "response_extra", "response_remove", "modifies_request", "modifies_response", "_body", "simple",
        "target", "plain",
    )

    def __init__(self, config: RouteConfig, index: int) -> None:
        self.name = config.name
        self.index = index
        self.config = config
        self.requests = 0
        # Host: exact names and wildcard suffixes (".example.com"); neither = any host.
        self.hosts = frozenset(h.encode("idna" if not h.isascii() else "ascii")
                               for h in config.hosts if not h.startswith("*."))
        self.wildcards = frozenset(h[1:].encode("ascii") for h in config.hosts if h.startswith("*."))
        self.any_host = not config.hosts
        self.prefix = config.path_prefix.encode("ascii") if config.path_prefix is not None else None
        self.exact = config.path.encode("ascii") if config.path is not None else None
        # The first path segment every path this route matches has (None: it cannot tell).
        self.segment: Optional[bytes] = None
        if self.exact is not None:
            self.segment = _first_segment(self.exact)
        elif self.prefix is not None and self.prefix.find(b"/", 1) > 0:
            self.segment = _first_segment(self.prefix)
        self.regex = re.compile(config.path_regex.encode("utf-8")) if config.path_regex is not None else None
        self.methods: Optional[FrozenSet[bytes]] = (
            frozenset(m.encode("ascii") for m in config.methods) if config.methods else None)
        self.headers: Tuple[Tuple[bytes, Optional[bytes]], ...] = tuple(
            (n.encode("ascii"), v.encode("utf-8") if v is not None else None) for n, v in config.headers)
        self.networks: Tuple[_IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in config.client_ip)
        self.scheme = config.scheme.encode("ascii") if config.scheme is not None else None
        # Nothing to check beyond the host and a path prefix (the table does those inline).
        self.simple = (self.exact is None and self.regex is None and self.methods is None and not self.headers
                       and not self.networks and self.scheme is None)
        # Action.
        self._pools = [p for p, _w in config.pools]
        self._weights = [w for _p, w in config.pools]
        self._current = [0] * len(self._pools)
        self._total = sum(self._weights)
        self._body = b""
        if config.pools:
            self.kind = ACT_POOL
            self.status = 0
        elif config.redirect is not None:
            self.kind = ACT_REDIRECT
            self.status = config.redirect_code
        else:
            self.kind = ACT_RETURN
            self.status = config.return_status or 200
            self._body = (config.return_body.encode("utf-8") + b"\n" if config.return_body
                          else b"%d %s\n" % (self.status, REASONS.get(self.status, b"")))
        # Modifiers.
        self.strip = config.strip_prefix.encode("ascii").rstrip(b"/") if config.strip_prefix else None
        self.add = config.add_prefix.encode("ascii").rstrip(b"/") if config.add_prefix else None
        self.request_extra = b"".join(b"%s: %s\r\n" % (n.encode("ascii"), v.encode("utf-8"))
                                      for n, v in config.set_request_headers)
        self.request_remove = frozenset([n.encode("ascii") for n in config.remove_request_headers]
                                        + [n.lower().encode("ascii") for n, _v in config.set_request_headers])
        self.response_extra = b"".join(b"%s: %s\r\n" % (n.encode("ascii"), v.encode("utf-8"))
                                       for n, v in config.set_response_headers)
        self.response_remove = frozenset([n.encode("ascii") for n in config.remove_response_headers]
                                         + [n.lower().encode("ascii") for n, _v in config.set_response_headers])
        self.modifies_request = bool(self.strip or self.add or self.request_extra or self.request_remove)
        self.modifies_response = bool(self.response_extra or self.response_remove)
        # The pool object of a one-pool route (bound by RouteTable when it is given the pools), and
        # whether the route is "plain": it sends to that pool and changes nothing, so a request it
        # takes needs no more than the pool (the proxy's fast path).
        self.target: Optional[Pool] = None
        self.plain = False

    def __repr__(self) -> str:
        return "<Route %s>" % self.name

    # ---- matching ----
    def host_can_match(self, host: bytes) -> bool:
        if self.any_host or host in self.hosts:
            return True
        if self.wildcards:
            i = host.find(b".")
            while i > 0:  # ".example.com" needs at least one label before it
                if host[i:] in self.wildcards:
                    return True
                i = host.find(b".", i + 1)
        return False

    def segment_can_match(self, segment: bytes) -> bool:
        return self.segment is None or self.segment == segment

    def matches(self, req: RequestHead, path: bytes, client_ip: str, scheme: bytes,
                addresses: Dict[str, object]) -> bool:
        """Every key but the host (the table checked it) matches."""
        prefix = self.prefix
        if prefix is not None and not path.startswith(prefix):
            return False
        if self.exact is not None and path != self.exact:
            return False
        if self.methods is not None and req.method not in self.methods:
            return False
        if self.scheme is not None and scheme != self.scheme:
            return False
        for name, value in self.headers:
            got = req.find_field(name)
            if got is None:
                return False
            if value is not None and got != value:
                if req.low.count(b"\r\n" + name + b":") < 2:
                    return False
                if value not in [v for n, v in zip(req.lnames, req.values) if n == name]:
                    return False
        if self.networks:
            addr = addresses.get(client_ip)
            if addr is None:
                try:
                    addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
                except ValueError:
                    return False
                if len(addresses) >= ADDRESS_CACHE_SIZE:
                    addresses.clear()
                addresses[client_ip] = addr
            if not any(addr in net for net in self.networks):
                return False
        if self.regex is not None and self.regex.search(path) is None:
            return False
        return True

    def mismatch(self, req: RequestHead, host: bytes, path: bytes, client_ip: str, scheme: bytes) -> Optional[str]:
        """For ``explain``: the first key of this route that the request does not match, said in words
        (None: every key matches). The keys in the order :meth:`matches` checks them, the host first.
        ``host`` is :func:`match_host` of the request's Host, ``path`` the normalised path."""
        show = _show
        if not self.host_can_match(host):
            return "host: %s is not %s" % (show(host) or "(none)", " or ".join(self.config.hosts))
        if self.prefix is not None and not path.startswith(self.prefix):
            return "path_prefix: %s does not start with %s" % (show(path), show(self.prefix))
        if self.exact is not None and path != self.exact:
            return "path: %s is not %s" % (show(path), show(self.exact))
        if self.methods is not None and req.method not in self.methods:
            return "methods: %s is not one of %s" % (show(req.method), " ".join(self.config.methods))
        if self.scheme is not None and scheme != self.scheme:
            return "scheme: %s is not %s" % (show(scheme), show(self.scheme))
        for name, value in self.headers:
            got = req.find_field(name)
            if got is None:
                return "header %s: absent" % show(name)
            if value is not None and got != value and value not in [
                    v for n, v in zip(req.lnames, req.values) if n == name]:
                return "header %s: %s is not %s" % (show(name), show(got), show(value))
        if self.networks:
            try:
                addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
            except ValueError:
                return "client_ip: %s is not an IP address" % client_ip
            if not any(addr in net for net in self.networks):
                return "client_ip: %s is not in %s" % (client_ip, " ".join(self.config.client_ip))
        if self.regex is not None and self.regex.search(path) is None:
            return "path_regex: %s does not match %s" % (show(path), self.config.path_regex)
        return None

    # ---- actions ----
    def pool(self) -> str:
        """The pool for this request: smooth weighted round robin over a split (nginx's)."""
        pools = self._pools
        if len(pools) == 1:
            return pools[0]
        current = self._current
        weights = self._weights
        best = 0
        for i in range(len(pools)):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return pools[best]

    def forward_path(self, path: bytes) -> bytes:
        """strip_prefix at a segment boundary, then add_prefix."""
        strip = self.strip
        if strip and path.startswith(strip) and (len(path) == len(strip) or path[len(strip)] == 47):
            path = path[len(strip):] or b"/"
        add = self.add
        if add:
            path = add + path
        return path

    def location(self, scheme: bytes, host: bytes, port: int, path: bytes, query: bytes) -> bytes:
        template = self.config.redirect or ""
        values = {"scheme": scheme.decode("ascii"), "host": host.decode("ascii", "replace"), "port": str(port),
                  "path": path.decode("ascii", "replace"), "query": query.decode("ascii", "replace")}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template).encode("ascii", "replace")

    def local_response(self, scheme: bytes, host: bytes, port: int, path: bytes, query: bytes, close: bool,
                       head_only: bool) -> bytes:
        """The complete response of a ``redirect`` or ``return`` route."""
        status = self.status
        conn = b"Connection: close\r\n" if close else b""
        if self.kind == ACT_REDIRECT:
            reason = _REDIRECT_REASONS.get(status, b"Redirect")
            return b"HTTP/1.1 %d %s\r\nLocation: %s\r\nContent-Length: 0\r\n%s\r\n" % (
                status, reason, self.location(scheme, host, port, path, query), conn)
        body = self._body
        return b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, REASONS.get(status, b"Status"), len(body), conn, b"" if head_only else body)

    def describe(self) -> str:
        """What the startup log says the route does."""
        c = self.config
        if self.kind == ACT_POOL:
            return "pool " + ", ".join("%s %d" % pw if len(c.pools) > 1 else pw[0] for pw in c.pools)
        if self.kind == ACT_REDIRECT:
            return "redirect %d %s" % (self.status, c.redirect)
        return "return %d" % self.status


class RouteTable:
    """The compiled routes of one configuration (see the module docstring)."""

    __slots__ = ("routes", "_cache", "_addresses", "_by_segment", "decided")

    def __init__(self, routes: Sequence[RouteConfig], previous: Optional[RouteTable] = None,
                 pools: Optional[Mapping[str, Pool]] = None) -> None:
        self.routes: List[Route] = [Route(c, i) for i, c in enumerate(routes)]
        if pools is not None:
            for r in self.routes:
                if r.kind == ACT_POOL and len(r._pools) == 1:
                    r.target = pools.get(r._pools[0])
                    r.plain = r.target is not None and not r.modifies_request and not r.modifies_response
        if previous is not None:
            # A reload keeps each route's counter by name.
            counts = {r.name: r.requests for r in previous.routes}
            for r in self.routes:
                r.requests = counts.get(r.name, 0)
        # Candidates by raw Host field (or by (Host, first segment) when some route has a segment):
        # keyed by the field as received, so a hit costs no host normalisation either.
        self._by_segment = any(r.segment is not None for r in self.routes)
        self._cache: Dict[object, Tuple[Route, ...]] = {}
        self._addresses: Dict[str, object] = {}
        # Raw Host field -> the route (and its pool) every origin-form request with that Host takes, whatever its path,
        # method, fields or client: the first candidate for the host has no key but the host (and
        # at most ``path_prefix = /``) and is plain. Filled by match(), bounded like the candidates.
        self.decided: Dict[Optional[bytes], Tuple[Route, Pool]] = {}

    def candidates(self, host: bytes, segment: Optional[bytes]) -> Tuple[Route, ...]:
        """The file-ordered routes that can match a request to ``host`` (from :func:`match_host`)
        whose path's first segment is ``segment`` (None: any)."""
        return tuple(r for r in self.routes
                     if r.host_can_match(host) and (segment is None or r.segment_can_match(segment)))

    def match(self, req: RequestHead, raw_host: Optional[bytes], path: bytes, client_ip: str,
              scheme: bytes) -> Optional[Route]:
        """The first route whose every key matches (None: none). ``raw_host``: the request's host as
        received (``req.host``), ``path`` the normalised path without its query."""
        segment: Optional[bytes] = None
        key: object = raw_host
        if self._by_segment:
            end = path.find(b"/", 1)
            segment = path[1:] if end < 0 else path[1:end]
            key = (raw_host, segment)
        cache = self._cache
        found = cache.get(key)
        if found is None:
            host = match_host(raw_host)
            found = self.candidates(host, segment)
            if len(cache) >= CANDIDATE_CACHE_SIZE:
                cache.clear()
                self.decided.clear()
            cache[key] = found
            first = (found if segment is None else self.candidates(host, None))[:1]
            if first:
                r = first[0]
                if r.plain and r.target is not None and r.simple and r.prefix in (None, b"/"):
                    self.decided[raw_host] = (r, r.target)
        for route in found:
            if route.simple:
                prefix = route.prefix
                if prefix is None or path.startswith(prefix):
                    return route
            elif route.matches(req, path, client_ip, scheme, self._addresses):
                return route
        return None
