"""Request-path normalisation (RFC 3986 §6.2.2), before routing and in what is forwarded. Sans-IO.

- Percent-encoded unreserved characters (ALPHA DIGIT - . _ ~) are decoded; every other
  percent-encoding stays encoded, with uppercase hex digits (§6.2.2.1). Decoding is done once
  (``%252e`` stays ``%252E``) and before dot-segment removal, so ``%2e%2e`` is a ``..``.
- Dot-segments are removed (§5.2.4); a path that would climb above ``/`` is refused (400), not
  clamped: it is an attack or a bug, never a request a client means.
- Refused too (400): an invalid percent-encoding, a ``#`` in the path, and a dot-segment
  with parameters (``..;x``, ``.;x``: Tomcat and Spring read those as dot-segments, the classic
  ``/x/..;/admin`` bypass).
- Routes match ``match_path``: the normalised path, except that when it holds ``//`` or an encoded
  slash or backslash (``%2F``, ``%5C``, or a raw backslash, which Windows servers and some frameworks read as
  ``/``) those are decoded to ``/``, dot-segments removed again and runs
  of ``/`` merged (HAProxy ``normalize-uri path-merge-slashes``, nginx ``merge_slashes``, Envoy
  ``merge_slashes`` and ``path_with_escaped_slashes_action``): a backend that merges slashes or decodes
  ``%2F`` cannot see a path the router did not. What is forwarded keeps them (the contract: "nothing
  else is rewritten").

The common path has none of ``%``, ``/.``, ``//``, ``\\``, ``#`` or ``;.`` and costs one regex search.
"""

from __future__ import annotations

import re
from typing import List, Tuple

from .errors import ProtocolError

__all__ = ["normalise_target", "needs_normalising"]

# Anything that may need work: a percent-encoding, a dot right after a slash (a possible dot-segment),
# a doubled slash, a backslash, a fragment. Linear: every alternative is one or two fixed octets.
_SUSPECT = re.compile(rb"%|/\.|//|\\|#")
# For the proxy's hot path: None when a target (path and query) certainly needs no normalisation.
needs_normalising = _SUSPECT.search
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Encoded slash and backslash, any case (uppercased by the time they are looked for).
_ENCODED_SLASHES = (b"%2F", b"%5C")


def _decode_unreserved(path: bytes) -> bytes:
    parts = path.split(b"%")
    out: List[bytes] = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise ProtocolError(400, "invalid percent-encoding in the request path")
        c = int(part[:2], 16)
        if c in _UNRESERVED:
            out.append(bytes((c,)))
            out.append(part[2:])
        else:
            out.append(b"%" + part[:2].upper() + part[2:])
    return b"".join(out)


def _remove_dots(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 on an absolute path, refusing to climb above the root."""
    segments = path.split(b"/")[1:]
    out: List[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if not out:
                raise ProtocolError(400, "the request path climbs above the root")
            out.pop()
            if i == last:
                out.append(b"")
        else:
            if seg[:3] == b"..;" or seg[:2] == b".;":
                raise ProtocolError(400, "a dot-segment with parameters in the request path")
            out.append(seg)
    return b"/" + b"/".join(out)


def _merged(path: bytes) -> bytes:
    path = path.replace(b"\\", b"/")
    for enc in _ENCODED_SLASHES:
        if path.find(enc) >= 0:
            path = path.replace(enc, b"/")
    while path.find(b"//") >= 0:
        path = re.sub(rb"/{2,}", b"/", path)
    return _remove_dots(path)


def normalise_target(target: bytes) -> Tuple[bytes, bytes, bytes]:
    """An origin-form target -> (path, match_path, query); see the module docstring. ``path`` is the
    normalised path (forwarded), ``match_path`` what routes see (``path`` itself unless it holds
    ``//`` or an encoded slash), ``query`` ``b""`` or ``b"?..."`` as received. Raises ProtocolError(400)."""
    q = target.find(b"?")
    if q < 0:
        path, query = target, b""
    else:
        path, query = target[:q], target[q:]
    if _SUSPECT.search(path) is None:
        # (A dot-segment with parameters, "/.;" or "/..;", holds "/." too.)
        return path, path, query
    if path.find(b"#") >= 0:
        raise ProtocolError(400, "fragment in the request target")
    if path.find(b"%") >= 0:
        path = _decode_unreserved(path)
    decoded = path
    if path.find(b"/.") >= 0 or path.find(b";") >= 0:
        path = _remove_dots(path)
    match_path = path
    if (decoded.find(b"//") >= 0 or decoded.find(b"%2F") >= 0 or decoded.find(b"%5C") >= 0
            or decoded.find(b"\\") >= 0):
        # Merged before the dot-segments go, as a backend that merges slashes first would see it
        # ("/x//..//admin/" is "/admin/" there).
        match_path = _merged(decoded)
    return path, match_path, query
