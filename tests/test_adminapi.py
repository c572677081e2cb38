"""balrs.adminapi without sockets: the bearer check, parsing write requests into actions, and applying
actions to a runtime (a real Pools with real Backends)."""

from __future__ import annotations

from typing import List, Optional

import pytest

from balrs.adminapi import apply_action, check_auth, describe, is_api_path, parse_write
from balrs.config import Address, BackendConfig, parse_text
from balrs.pool import Backend, Pools
from balrs.strategies import make_strategy


@pytest.mark.parametrize("header, expected", [
    (None, 401), (b"", 401), (b"Bearer", 401), (b"Bearer   ", 401), (b"Basic dG9rOmVu", 401),
    (b"Bearer wrong", 403), (b"Bearer tok3n", 0), (b"bearer tok3n", 0), (b"  Bearer  tok3n  ", 0),
    (b"Bearer tok3nX", 403), (b"Bearer tok", 403),
])
def test_check_auth(header: Optional[bytes], expected: int) -> None:
    assert check_auth("tok3n", header) == expected


def test_no_token_configured_refuses_everything() -> None:
    assert check_auth("", b"Bearer ") == 403
    assert check_auth("", b"Bearer anything") == 403


def test_parse_write_actions() -> None:
    assert parse_write(b"POST", b"/api/backends/web-1/drain", b"") == {"op": "drain", "name": "web-1"}
    assert parse_write(b"POST", b"/api/backends/a.b:c_d/maint", b"") == {"op": "maint", "name": "a.b:c_d"}
    assert parse_write(b"POST", b"/api/backends/x/ready/", b"") == {"op": "ready", "name": "x"}
    assert parse_write(b"PUT", b"/api/backends/x/weight", b" 12\n") == {"op": "weight", "name": "x", "weight": 12}
    assert parse_write(b"PUT", b"/api/backends/x/weight", b'{"weight": 256}')["weight"] == 256  # type: ignore[index]
    assert parse_write(b"DELETE", b"/api/backends/x", b"") == {"op": "delete", "name": "x"}
    add = parse_write(b"POST", b"/api/backends", b'{"name": "n", "address": "[::1]:80", "max_connections": 4}')
    assert add == {"op": "add", "name": "n", "address": "[::1]:80", "pool": "default", "weight": 1,
                   "max_connections": 4}


@pytest.mark.parametrize("method, path, body, status", [
    (b"POST", b"/api/backends/x/frob", b"", 404),
    (b"POST", b"/api/backends/bad name/drain", b"", 404),
    (b"POST", b"/api/nope", b"", 404),
    (b"GET", b"/api/backends/x/drain", b"", 405),
    (b"PUT", b"/api/backends", b"{}", 405),
    (b"POST", b"/api/backends/x", b"", 405),
    (b"PUT", b"/api/backends/x/weight", b"0", 400),
    (b"PUT", b"/api/backends/x/weight", b"257", 400),
    (b"PUT", b"/api/backends/x/weight", b"0012", 400),
    (b"PUT", b"/api/backends/x/weight", b"\xff", 400),
    (b"PUT", b"/api/backends/x/weight", b'{"weight": 3, "more": 1}', 400),
    (b"POST", b"/api/backends", b'{"name": "n", "address": "h:99999"}', 400),
    (b"POST", b"/api/backends", b'{"name": "n", "address": "h:1", "max_connections": -1}', 400),
    (b"POST", b"/api/backends", b'{"name": "n", "address": "h:1", "weight": "2"}', 400),
    (b"POST", b"/api/backends", b'{"name": "n", "address": "h:1", "pool": ""}', 400),
])
def test_parse_write_errors(method: bytes, path: bytes, body: bytes, status: int) -> None:
    got = parse_write(method, path, body)
    assert isinstance(got, tuple) and got[0] == status, got
    assert "error" in got[1]
    if status == 405:
        assert got[1]["allow"] in ("POST", "PUT", "DELETE")


def test_is_api_path() -> None:
    assert is_api_path(b"/api") and is_api_path(b"/api/backends")
    assert not is_api_path(b"/apix") and not is_api_path(b"/status")


class Rt:
    """A runtime over a real Pools (what server.Balancer does, minus the sockets)."""

    def __init__(self) -> None:
        self.pools = Pools(parse_text("[balancer]\nlisten = 127.0.0.1:1\n[backend a]\naddress = 127.0.0.1:2\n"
                                      "[backend b]\naddress = 127.0.0.1:3\n", "lb.ini"),
                           clock=lambda: 100.0, make_strategy=make_strategy)
        for b in self.pools.backends:
            b.resolved = True
        self.pools.refresh()
        self.added: List[BackendConfig] = []
        self.removed: List[str] = []

    def backend_named(self, name: str) -> Optional[Backend]:
        return next((b for b in self.pools.backends if b.name == name), None)

    def pool_exists(self, name: str) -> bool:
        return name in self.pools.named

    def set_backend_state(self, backend: Backend, state: str) -> None:
        backend.set_admin_state(state)
        self.pools.refresh()

    def set_backend_weight(self, backend: Backend, weight: int) -> None:
        backend.set_weight(weight)
        self.pools.refresh()

    def add_backend(self, config: BackendConfig) -> None:
        self.added.append(config)

    def remove_backend(self, backend: Backend) -> None:
        self.removed.append(backend.name)


def test_apply_states_take_backends_out_of_rotation_and_back() -> None:
    rt = Rt()
    pool = rt.pools.named["default"]
    assert apply_action(rt, {"op": "drain", "name": "a"}) == (200, {"backend": "a", "state": "drain", "was": "up"})
    assert [b.name for b in pool.strategy.backends] == ["b"]
    assert apply_action(rt, {"op": "maint", "name": "b"})[1]["state"] == "maint"
    assert pool.strategy.backends == []
    assert apply_action(rt, {"op": "ready", "name": "a"})[1] == {"backend": "a", "state": "up", "was": "drain"}
    assert apply_action(rt, {"op": "ready", "name": "b"})[1]["was"] == "maint"
    assert [b.name for b in pool.strategy.backends] == ["a", "b"]


def test_apply_weight_add_delete_and_errors() -> None:
    rt = Rt()
    assert apply_action(rt, {"op": "weight", "name": "b", "weight": 9}) == (200, {"backend": "b", "weight": 9,
                                                                               "was": 1})
    assert rt.backend_named("b").eff_weight == 9  # type: ignore[union-attr]
    assert apply_action(rt, {"op": "weight", "name": "b", "weight": 0})[0] == 400
    assert apply_action(rt, {"op": "drain", "name": "zz"})[0] == 404
    assert apply_action(rt, {"op": "add", "name": "a", "address": "127.0.0.1:9"})[0] == 409
    assert apply_action(rt, {"op": "add", "name": "c", "address": "127.0.0.1:9", "pool": "other"})[0] == 400
    st, doc = apply_action(rt, {"op": "add", "name": "c", "address": "127.0.0.1:9", "weight": 2,
                                "max_connections": 3})
    assert st == 201 and doc["address"] == "127.0.0.1:9"
    assert rt.added == [BackendConfig("c", Address("127.0.0.1", 9), weight=2, max_connections=3)]
    assert apply_action(rt, {"op": "delete", "name": "a"})[0] == 202 and rt.removed == ["a"]
    assert apply_action(rt, {"op": "frob", "name": "a"})[0] == 400
    assert apply_action(rt, {"op": "drain"})[0] == 400


def test_describe() -> None:
    assert describe({"op": "drain", "name": "a"}) == "drain a"
    assert describe({"op": "weight", "name": "a", "weight": 3}) == "weight a -> 3"
    assert describe({"op": "add", "name": "c", "address": "h:1", "pool": "p", "weight": 1,
                     "max_connections": 0}).startswith("add c h:1 (pool p")
