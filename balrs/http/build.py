"""Serialising heads: what goes upstream for a request, what goes to the client for a response, and
the error responses balrs generates itself.

A head without hop-by-hop fields is forwarded byte for byte, with balrs' own fields appended before
its empty line; only a head that needs fields removed is rebuilt from its parsed fields.
"""

from __future__ import annotations

from typing import AbstractSet, Collection, Dict, List, Optional, Tuple

from .heads import CHUNKED, CLOSE_DELIMITED, LENGTH, RequestHead, ResponseHead

__all__ = [
    "REASONS", "VIA", "edit_head", "error_response", "upstream_request_head", "client_response_head",
    "forwarded_suffix", "XF_APPEND", "XF_REPLACE", "XF_KEEP",
]

# RFC 9110 §7.6.3: a gateway sends Via in each request it forwards; "balrs" is our pseudonym.
VIA = b"1.1 balrs"

REASONS: Dict[int, bytes] = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK",
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

# RFC 9110 §7.6.1: hop-by-hop fields, never forwarded (plus whatever Connection names).
_REQUEST_DROP = frozenset([
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via",
])
_RESPONSE_DROP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"])
# Fields that Connection may name but that are never dropped for it: without its framing field a message's
# body would be read as the next message (smuggling), and an HTTP/1.1 request needs its Host.
_REQUEST_KEEP = frozenset([b"host", b"content-length", b"transfer-encoding"])
_RESPONSE_KEEP = frozenset([b"content-length", b"transfer-encoding"])

_error_cache: Dict[Tuple[int, bool, bool], bytes] = {}


def error_response(status: int, close: bool = True, head_only: bool = False) -> bytes:
    """A complete response balrs sends itself (a small text body naming the status)."""
    key = (status, close, head_only)
    data = _error_cache.get(key)
    if data is None:
        reason = REASONS.get(status, b"Error")
        body = b"%d %s\n" % (status, reason)
        data = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, reason, len(body), b"Connection: close\r\n" if close else b"", b"" if head_only else body)
        _error_cache[key] = data
    return data


# How the X-Forwarded-* fields a request arrives with are treated (edge.py decides per connection).
XF_APPEND = 0   # X-Forwarded-For appended to; X-Forwarded-Proto/Host replaced (trusted_proxies unset)
XF_REPLACE = 1  # X-Forwarded-For replaced too (a peer outside trusted_proxies)
XF_KEEP = 2     # X-Forwarded-For appended to; X-Forwarded-Proto/Host kept when present (a trusted peer)


def forwarded_suffix(client_ip: bytes, proto: bytes = b"http") -> bytes:
    """The fields balrs adds to every request of a client connection, except X-Forwarded-Host, which
    depends on the request. Computed once per connection (``proto``: http, or https over TLS)."""
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nVia: %s\r\n" % (client_ip, proto, VIA)


def upstream_request_head(req: RequestHead, client_ip: bytes, suffix: bytes, default_host: bytes,
                          extra: bytes = b"", remove: Optional[Collection[bytes]] = None,
                          target: Optional[bytes] = None, xf: int = XF_APPEND, proto: bytes = b"http") -> bytes:
    """The request head sent to a backend: HTTP/1.1, hop-by-hop fields removed, X-Forwarded-For appended
    to (``xf``: or replaced), X-Forwarded-Proto/Host replaced (or kept), Via appended to, Upgrade kept only
    when tunnelling. ``extra`` (complete field lines, such as a request id or a route's set fields) is
    appended; the fields named in ``remove`` (lowercase) are dropped (an invalid request id the new one
    replaces, a route's removed or replaced fields); ``target`` replaces the request target (a route's
    path rewrite). ``suffix`` is :func:`forwarded_suffix` for ``client_ip`` and ``proto``."""
    host = req.host
    if not req.rewrite and host is not None and remove is None and target is None:
        # Fast path: an HTTP/1.1 head with nothing to remove or merge.
        return b"%sX-Forwarded-Host: %s\r\n%s%s\r\n" % (req.raw[:-2], host, suffix, extra)

    drop = _REQUEST_DROP
    if remove is not None:
        drop = drop.union(remove)
    if req.connection_tokens:
        drop = drop.union(req.connection_tokens).difference(_REQUEST_KEEP)
    if req.absolute:
        # RFC 9112 §3.2.2: the target's authority replaces any Host field (the target goes in origin-form).
        drop = drop.union((b"host",))
    out: List[bytes] = [b"%s %s HTTP/1.1\r\n" % (req.method, req.target if target is None else target)]
    if req.absolute and host is not None:
        out.append(b"Host: %s\r\n" % host)
    xff: List[bytes] = []
    via: List[bytes] = []
    seen_framing = False
    kept_proto = kept_host = False
    for name, lname, value in zip(req.names, req.lnames, req.values):
        if lname in drop:
            if xf == XF_KEEP and (lname == b"x-forwarded-proto" or lname == b"x-forwarded-host") and (
                    remove is None or lname not in remove):
                # A trusted front-end's scheme and host survive (a TLS terminator's "https"); the first
                # of each only.
                if lname == b"x-forwarded-proto":
                    if kept_proto:
                        continue
                    kept_proto = True
                else:
                    if kept_host:
                        continue
                    kept_host = True
                out.append(b"%s: %s\r\n" % (name, value))
                continue
            # An empty value would start the list with an empty element.
            if lname == b"x-forwarded-for":
                if value and xf != XF_REPLACE:
                    xff.append(value)
            elif lname == b"via":
                if value:
                    via.append(value)
            continue
        if lname == b"content-length" or lname == b"transfer-encoding":
            # One canonical framing field (duplicates were validated as identical).
            if not seen_framing:
                seen_framing = True
                if req.framing == LENGTH:
                    out.append(b"Content-Length: %d\r\n" % req.length)
                elif req.framing == CHUNKED:
                    out.append(b"Transfer-Encoding: chunked\r\n")
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if host is None:
        # An HTTP/1.0 request may lack Host; HTTP/1.1 upstream needs one (RFC 9112 §3.2).
        out.append(b"Host: %s\r\n" % default_host)
    if req.upgrade is not None:
        out.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % req.upgrade)
    xff.append(client_ip)
    out.append(b"X-Forwarded-For: %s\r\n" % b", ".join(xff))
    if not kept_proto:
        out.append(b"X-Forwarded-Proto: %s\r\n" % proto)
    if host is not None and not kept_host:
        out.append(b"X-Forwarded-Host: %s\r\n" % host)
    via.append(VIA)
    out.append(b"Via: %s\r\n%s\r\n" % (b", ".join(via), extra))
    return b"".join(out)


def edit_head(head: bytes, remove: AbstractSet[bytes], extra: bytes) -> bytes:
    """A complete head without its fields named in ``remove`` (lowercase), with ``extra`` (complete
    field lines) added before its empty line: a route's response-field edits."""
    if remove:
        lines = head[:-4].split(b"\r\n")
        kept = [lines[0]]
        for line in lines[1:]:
            colon = line.find(b":")
            if line[:colon].lower() not in remove:
                kept.append(line)
        head = b"\r\n".join(kept) + b"\r\n\r\n"
    if extra:
        head = head[:-2] + extra + b"\r\n"
    return head


def client_response_head(resp: ResponseHead, framing: int, close: bool, client_minor: int,
                         keep_upgrade: bool = False) -> bytes:
    """The response head sent to the client.

    ``framing`` is how balrs frames the body it sends (LENGTH, CHUNKED for a chunked or close-delimited
    response to an HTTP/1.1 client, CLOSE_DELIMITED for HTTP/1.0 clients, NO_BODY). ``close``: balrs
    closes the client connection after this response, so it says ``Connection: close``.
    """
    raw = resp.raw
    extra: Optional[bytes] = None
    if close:
        extra = b"Connection: close\r\n"
    elif client_minor == 0:
        # RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only when told so.
        extra = b"Connection: keep-alive\r\n"
    if framing == CHUNKED and resp.framing == CLOSE_DELIMITED:
        extra = (extra or b"") + b"Transfer-Encoding: chunked\r\n"

    if not resp.rewrite and framing == resp.framing and not (extra is not None and resp.has_connection):
        if extra is None:
            return raw
        return b"%s%s\r\n" % (raw[:-2], extra)

    drop = _RESPONSE_DROP
    if keep_upgrade:
        drop = drop.difference((b"upgrade", b"connection"))
    if resp.connection_tokens:
        drop = drop.union(t for t in resp.connection_tokens
                          if (t != b"upgrade" or not keep_upgrade) and t not in _RESPONSE_KEEP)
    if framing != CHUNKED or resp.framing != CHUNKED:
        # The body is re-framed (de-chunked for HTTP/1.0, or chunked for a close-delimited body). A coding
        # balrs does not decode ("gzip") must stay listed when chunked is added after it (RFC 9112 §6.1);
        # only an HTTP/1.0 client, which cannot be sent Transfer-Encoding, goes without.
        te = resp.header(b"transfer-encoding") if framing == CHUNKED else None
        if te is None or b"chunked" in te.lower():
            drop = drop.union((b"transfer-encoding",))
    if resp.framing in (CHUNKED, CLOSE_DELIMITED) or resp.has_te:
        # RFC 9112 §6.3 step 3: Transfer-Encoding overrides a Content-Length, which must not be forwarded.
        drop = drop.union((b"content-length",))
    # RFC 9110 §8.6: repeated identical Content-Length values ("5, 5" or several lines) go out as one.
    length_line: Optional[bytes] = None
    if resp.framing == LENGTH and framing == LENGTH:
        length_line = b"Content-Length: %d\r\n" % resp.length
    out: List[bytes] = [b"HTTP/1.1 %s" % raw[9:resp.line_end]]
    for name, lname, value in zip(resp.names, resp.lnames, resp.values):
        if lname not in drop:
            if length_line is not None and lname == b"content-length":
                out.append(length_line)
                length_line = b""
                continue
            out.append(b"%s: %s\r\n" % (name, value))
    if extra is not None:
        out.append(extra)
    out.append(b"\r\n")
    return b"".join(out)
