"""The admin API's write side, sans-IO: who may write (a bearer token), what a request asks for (an
*action*, plain data that also travels to the workers over the control channel), and applying an
action to a balancer's :class:`Runtime`.

    POST   /api/backends/NAME/drain    no new requests; those in flight finish      200
    POST   /api/backends/NAME/maint    no traffic and no health probes (state maint) 200
    POST   /api/backends/NAME/ready    back to normal                                200
    PUT    /api/backends/NAME/weight   body: an integer 1..256                       200
    POST   /api/backends               JSON {"name", "address", "pool", "weight", "max_connections"}  201
    DELETE /api/backends/NAME          drain, then remove                            202

Writes need ``Authorization: Bearer TOKEN`` with the token of ``[admin] token_file``, compared in
constant time (``hmac.compare_digest``): 401 without credentials, 403 with a wrong token or when no
token is configured. Unknown backend 404, bad body 400, an existing name 409. Every change is logged
with who asked (the admin client's address) and what changed.

A reload (SIGHUP) makes the file the truth again: backends added here go, deleted ones come back,
weights are the file's; only a drain or maint state set here on a backend whose name and address are
unchanged is kept (it lives on the backend object, which the reload keeps).
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, Callable, Dict, Optional, Protocol, Tuple, Union

from .config import DEFAULT_POOL, MAX_WEIGHT, BackendConfig, parse_address
from .pool import ADMIN_DRAIN, ADMIN_MAINT, ADMIN_READY, Backend

__all__ = ["Action", "Result", "Runtime", "Writer", "check_auth", "parse_write", "apply_action", "describe",
           "ADMIN_BODY_LIMIT", "is_api_path"]

# An action: {"op": "drain" | "maint" | "ready" | "weight" | "add" | "delete", "name": ..., ...}.
Action = Dict[str, Any]
# An answer: (HTTP status, JSON document). A 405's document carries "allow".
Result = Tuple[int, Dict[str, Any]]
# How the admin endpoint applies an action: now (one balancer) or once every worker answered.
Writer = Callable[[Action, Callable[[int, Dict[str, Any]], None]], None]

# The largest write body accepted (a JSON backend is a hundred bytes).
ADMIN_BODY_LIMIT = 16384

_PATH = re.compile(rb"/api/backends(?:/([A-Za-z0-9_.:-]+)(?:/(drain|maint|ready|weight))?)?/?")
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_STATES = {"drain": ADMIN_DRAIN, "maint": ADMIN_MAINT, "ready": ADMIN_READY}
_ADD_KEYS = ("name", "address", "pool", "weight", "max_connections")


def is_api_path(path: bytes) -> bool:
    return path == b"/api" or path.startswith(b"/api/")


def check_auth(token: str, authorization: Optional[bytes]) -> int:
    """0 when ``authorization`` (the field's value, or None) carries ``token``; else 401 (no bearer
    credentials) or 403 (a wrong token, or writes disabled: no token configured)."""
    if not token:
        return 403
    if authorization is None:
        return 401
    scheme, _, cred = authorization.strip().partition(b" ")
    cred = cred.strip()
    if scheme.lower() != b"bearer" or not cred:
        return 401
    return 0 if hmac.compare_digest(cred, token.encode("utf-8")) else 403


def _error(status: int, message: str, **more: Any) -> Result:
    doc: Dict[str, Any] = {"error": message}
    doc.update(more)
    return status, doc


def parse_write(method: bytes, path: bytes, body: bytes) -> Union[Action, Result]:
    """The action a write request asks for, or the error answer (404 unknown endpoint, 405 wrong
    method with ``allow``, 400 bad body)."""
    m = _PATH.fullmatch(path)
    if m is None:
        return _error(404, "no such endpoint")
    raw_name, verb = m.group(1), m.group(2)
    if raw_name is None:
        if method != b"POST":
            return _error(405, "use POST to add a backend", allow="POST")
        return _parse_add(body)
    name = raw_name.decode("ascii")
    if verb is None:
        if method != b"DELETE":
            return _error(405, "use DELETE to remove a backend", allow="DELETE")
        return {"op": "delete", "name": name}
    op = verb.decode("ascii")
    if op == "weight":
        if method != b"PUT":
            return _error(405, "use PUT to set a weight", allow="PUT")
        weight = _parse_weight(body)
        if weight is None:
            return _error(400, "the body must be an integer weight from 1 to %d" % MAX_WEIGHT)
        return {"op": "weight", "name": name, "weight": weight}
    if method != b"POST":
        return _error(405, "use POST to %s a backend" % op, allow="POST")
    return {"op": op, "name": name}


def _parse_weight(body: bytes) -> Optional[int]:
    """An integer 1..MAX_WEIGHT: the body as plain digits, a JSON number, or {"weight": N}."""
    text = body.strip()
    try:
        value = json.loads(text.decode("utf-8")) if text[:1] == b"{" else text.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(value, dict):
        value = value.get("weight") if len(value) == 1 else None
    if isinstance(value, str):
        if not value.isdigit() or len(value) > 3:
            return None
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        return None
    return value


def _parse_add(body: bytes) -> Union[Action, Result]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return _error(400, "the body must be a JSON object: %s" % exc)
    if not isinstance(doc, dict):
        return _error(400, "the body must be a JSON object")
    unknown = sorted(set(doc) - set(_ADD_KEYS))
    if unknown:
        return _error(400, "unknown key %r (expected %s)" % (unknown[0], ", ".join(_ADD_KEYS)))
    name, address = doc.get("name"), doc.get("address")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return _error(400, "name: letters, digits and _ . : - required")
    if not isinstance(address, str):
        return _error(400, "address: host:port required")
    try:
        parse_address(address)
    except ValueError as exc:
        return _error(400, "address: %s" % exc)
    pool = doc.get("pool", DEFAULT_POOL)
    if not isinstance(pool, str) or not _NAME.fullmatch(pool):
        return _error(400, "pool: a pool name required")
    weight = doc.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        return _error(400, "weight: an integer from 1 to %d" % MAX_WEIGHT)
    maxc = doc.get("max_connections", 0)
    if isinstance(maxc, bool) or not isinstance(maxc, int) or maxc < 0:
        return _error(400, "max_connections: an integer >= 0")
    return {"op": "add", "name": name, "address": address, "pool": pool, "weight": weight,
            "max_connections": maxc}


class Runtime(Protocol):
    """What :func:`apply_action` changes (``server.Balancer``)."""

    def backend_named(self, name: str) -> Optional[Backend]: ...

    def pool_exists(self, name: str) -> bool: ...

    def set_backend_state(self, backend: Backend, state: str) -> None: ...

    def set_backend_weight(self, backend: Backend, weight: int) -> None: ...

    def add_backend(self, config: BackendConfig) -> None: ...

    def remove_backend(self, backend: Backend) -> None: ...


def apply_action(rt: Runtime, action: Action) -> Result:
    """Apply ``action`` (from :func:`parse_write`, possibly through the control channel) to ``rt``."""
    op = action.get("op")
    name = action.get("name")
    if not isinstance(name, str):
        return _error(400, "no backend name")
    if op == "add":
        if rt.backend_named(name) is not None:
            return _error(409, "a backend named %s exists" % name)
        pool = action.get("pool", DEFAULT_POOL)
        if not rt.pool_exists(pool):
            return _error(400, "pool: no pool named %s" % pool)
        try:
            address = parse_address(action["address"])
            config = BackendConfig(name, address, weight=int(action.get("weight", 1)),
                                   max_connections=int(action.get("max_connections", 0)), pool=pool)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, "bad backend: %s" % exc)
        rt.add_backend(config)
        return 201, {"backend": name, "added": True, "address": str(address), "pool": pool}
    backend = rt.backend_named(name)
    if backend is None:
        return _error(404, "no backend named %s" % name)
    if op in _STATES:
        was = backend.state
        rt.set_backend_state(backend, _STATES[op])
        return 200, {"backend": name, "state": backend.state, "was": was}
    if op == "weight":
        weight = action.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            return _error(400, "weight: an integer from 1 to %d" % MAX_WEIGHT)
        was_weight = backend.weight
        rt.set_backend_weight(backend, weight)
        return 200, {"backend": name, "weight": weight, "was": was_weight}
    if op == "delete":
        rt.remove_backend(backend)
        return 202, {"backend": name, "removed": True, "in_flight": backend.active}
    return _error(400, "unknown operation %r" % (op,))


def describe(action: Action) -> str:
    """One line for the log: what was asked."""
    op = action.get("op")
    if op == "weight":
        return "weight %s -> %s" % (action.get("name"), action.get("weight"))
    if op == "add":
        return "add %s %s (pool %s, weight %s, max_connections %s)" % (
            action.get("name"), action.get("address"), action.get("pool"), action.get("weight"),
            action.get("max_connections"))
    return "%s %s" % (op, action.get("name"))
