"""Session affinity by an inserted cookie (``sticky = cookie:NAME``), sans-IO.

The first response to a client gets ``Set-Cookie: NAME=<id>; Path=/; HttpOnly; SameSite=Lax``
naming the backend that served it; a later request carrying a valid id goes to that backend while it
is in rotation and has a free slot, otherwise the strategy picks and the cookie is reset (HAProxy
``cookie NAME insert indirect nocache``; Traefik's sticky cookie).

The id is the first 128 bits of HMAC-SHA256(key, backend name), in hex: it reveals neither the
backend's address nor its name, and without the key it cannot be turned into another backend's id.
The key is ``[balancer] sticky_secret`` when given, else one derived from the names of all backends,
so every worker and every instance with the same configuration agrees (a backend added or removed then
changes every id, which moves every session once: set ``sticky_secret`` to keep them across such
changes). An id that names no backend of the pool is ignored, like no cookie at all.

Looking an id up is one dict access; the table is rebuilt when the pool's membership changes.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Dict, Generic, Iterable, Optional, Protocol, TypeVar

from .http.heads import cookie_value

if TYPE_CHECKING:
    from .http.heads import RequestHead


class Named(Protocol):
    """What a sticky cookie needs of a backend (``pool.Backend``): its name, and to be hashable."""

    @property
    def name(self) -> str: ...

    def __hash__(self) -> int: ...


Backend = TypeVar("Backend", bound=Named)

__all__ = ["Sticky", "Named", "sticky_key", "COOKIE_ATTRIBUTES"]

COOKIE_ATTRIBUTES = b"Path=/; HttpOnly; SameSite=Lax"


def sticky_key(secret: str, backend_names: Iterable[str]) -> bytes:
    """The HMAC key of the ids: ``secret`` if set, else one derived from every backend name (sorted, so
    the order of the file does not matter)."""
    if secret:
        return hashlib.sha256(b"balrs sticky secret\0" + secret.encode("utf-8")).digest()
    names = sorted(set(backend_names))
    return hashlib.sha256(b"balrs sticky names\0" + "\0".join(names).encode("utf-8")).digest()


class Sticky(Generic[Backend]):
    """One pool's sticky cookie: ids of its backends, and the Set-Cookie line for each."""

    __slots__ = ("name", "key", "marker", "by_id", "set_cookie", "_ids")

    def __init__(self, name: str, key: bytes) -> None:
        self.name = name.encode("ascii")
        self.key = key
        self.marker = self.name + b"="
        self.by_id: Dict[bytes, Backend] = {}
        # The complete field line that makes a client stick to a backend.
        self.set_cookie: Dict[Backend, bytes] = {}
        self._ids: Dict[str, bytes] = {}

    def id_of(self, backend_name: str) -> bytes:
        got = self._ids.get(backend_name)
        if got is None:
            mac = hmac.new(self.key, b"balrs sticky\0" + backend_name.encode("utf-8"), hashlib.sha256)
            got = self._ids[backend_name] = mac.hexdigest()[:32].encode("ascii")
        return got

    def members(self, backends: Iterable[Backend]) -> None:
        """The pool's backends now (a reload or a new pool)."""
        by_id: Dict[bytes, Backend] = {}
        lines: Dict[Backend, bytes] = {}
        for b in backends:
            bid = self.id_of(b.name)
            by_id[bid] = b
            lines[b] = b"Set-Cookie: %s%s; %s\r\n" % (self.marker, bid, COOKIE_ATTRIBUTES)
        self.by_id = by_id
        self.set_cookie = lines

    def wanted(self, req: RequestHead) -> Optional[Backend]:
        """The backend the request's cookie names, or None (no cookie, or an id of no backend here)."""
        if b"\r\ncookie:" not in req.low or self.marker not in req.raw:
            return None
        value = cookie_value(req, self.name)
        if not value:
            return None
        if value[:1] == b'"' and value[-1:] == b'"':
            value = value[1:-1]
        return self.by_id.get(value)
