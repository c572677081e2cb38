"""The traffic policy without sockets: sticky cookie ids (balrs.sticky), the retry budget fed in batches
(RetryBudget.request(now, n), Pool.sync_budget / try_retry), the config keys of the policy and their
errors, and a pool's panic mode (Pool._in_rotation through refresh / set_policy / Pools.reload).

tests/test_limits.py covers the budget's floor, share and window one request at a time; this file does
not repeat it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from typing import List, Optional, Sequence

import pytest

from balrs import config as C
from balrs.config import Address, BackendConfig, ConfigError, parse_text
from balrs.http.heads import parse_request_head
from balrs.limits import (RETRY_502, RETRY_503, RETRY_504, RETRY_CONNECT, RETRY_EMPTY, RETRY_TIMEOUT, RetryBudget,
                          retry_mask)
from balrs.pool import Backend, Pool, Pools
from balrs.sticky import COOKIE_ATTRIBUTES, Sticky, sticky_key
from balrs.strategies import make_strategy

# ------------------------------------------------------------------------------------------------ helpers

BAL = "[balancer]\nlisten = 127.0.0.1:8080\n"
B1 = "[backend b1]\naddress = 127.0.0.1:9001\n"


def parse(text: str) -> C.Config:
    return parse_text(text, "lb.ini")


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "lb.ini")
    return info.value


def backend(name: str, port: int = 9000, pool: str = "default", max_connections: int = 0) -> Backend:
    return Backend(BackendConfig(name, Address("127.0.0.1", port), max_connections=max_connections, pool=pool))


def head(*fields: str) -> "object":
    raw = "GET /x HTTP/1.1\r\nHost: lb.test\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
    return parse_request_head(raw.encode("latin-1"))


def backends_ini(names: Sequence[str], pool: Optional[str] = None, first_port: int = 9001) -> str:
    out = ""
    for i, n in enumerate(names):
        out += "[backend %s]\naddress = 127.0.0.1:%d\n" % (n, first_port + i)
        if pool:
            out += "pool = %s\n" % pool
    return out


def pools_of(text: str) -> Pools:
    return Pools(parse(text), clock=lambda: 1000.0, make_strategy=make_strategy)


def rotation(pool: Pool) -> List[str]:
    return sorted(b.name for b in pool.strategy.backends)


# ------------------------------------------------------------------------------------------------ sticky ids

NAMES = ["web1", "web2", "web3"]


def test_id_is_a_truncated_hmac_of_the_backend_name() -> None:
    key = sticky_key("", NAMES)
    s = Sticky("SRV", key)
    for n in NAMES:
        want = hmac.new(key, b"balrs sticky\0" + n.encode(), hashlib.sha256).hexdigest()[:32]
        got = s.id_of(n)
        assert got == want.encode()
        assert re.fullmatch(rb"[0-9a-f]{32}", got)
        assert n.encode() not in got
    assert len({s.id_of(n) for n in NAMES}) == 3


def test_ids_deterministic_across_instances_and_cookie_names() -> None:
    a = Sticky("SRV", sticky_key("", NAMES))
    b = Sticky("OTHER", sticky_key("", list(NAMES)))
    assert [a.id_of(n) for n in NAMES] == [b.id_of(n) for n in NAMES]
    # Cached value equals a fresh computation.
    assert a.id_of("web1") == a.id_of("web1") == Sticky("SRV", a.key).id_of("web1")


def test_key_from_names_ignores_order_and_duplicates_but_not_membership() -> None:
    k = sticky_key("", NAMES)
    assert sticky_key("", list(reversed(NAMES))) == k
    assert sticky_key("", NAMES + ["web1"]) == k
    assert sticky_key("", iter(NAMES)) == k  # any iterable (Pools passes a generator)
    assert sticky_key("", NAMES + ["web4"]) != k
    assert sticky_key("", NAMES[:2]) != k
    assert sticky_key("", ["web1", "web2", "web33"]) != k
    # Names are joined with a separator: ("ab", "c") and ("a", "bc") do not collide.
    assert sticky_key("", ["ab", "c"]) != sticky_key("", ["a", "bc"])
    assert len(k) == 32


def test_key_from_secret_ignores_names() -> None:
    secret = "0123456789abcdef-secret"
    k = sticky_key(secret, NAMES)
    assert sticky_key(secret, ["x", "y"]) == k
    assert sticky_key(secret, []) == k
    assert sticky_key(secret + "!", NAMES) != k
    assert k != sticky_key("", NAMES)
    # Domain separation: a secret spelled like the joined names is not the names' key.
    assert sticky_key("web1\0web2\0web3", ["q"]) != sticky_key("", NAMES)
    ids_secret = [Sticky("SRV", k).id_of(n) for n in NAMES]
    ids_names = [Sticky("SRV", sticky_key("", NAMES)).id_of(n) for n in NAMES]
    assert not set(ids_secret) & set(ids_names)


def test_members_builds_lookup_and_set_cookie_lines() -> None:
    bs = [backend(n, 9001 + i) for i, n in enumerate(NAMES)]
    s = Sticky("SRV", sticky_key("", NAMES))
    s.members(bs)
    assert COOKIE_ATTRIBUTES == b"Path=/; HttpOnly; SameSite=Lax"
    for b in bs:
        bid = s.id_of(b.name)
        assert s.by_id[bid] is b
        assert s.set_cookie[b] == b"Set-Cookie: SRV=" + bid + b"; Path=/; HttpOnly; SameSite=Lax\r\n"
        assert b"127.0.0.1" not in s.set_cookie[b] and b.name.encode() not in s.set_cookie[b]
    # Membership rebuilt: a removed backend's id no longer resolves.
    s.members(bs[:2])
    assert s.id_of("web3") not in s.by_id
    assert bs[2] not in s.set_cookie


@pytest.fixture
def sticky3() -> "tuple[Sticky, List[Backend]]":
    bs = [backend(n, 9001 + i) for i, n in enumerate(NAMES)]
    s = Sticky("SRV", sticky_key("", NAMES))
    s.members(bs)
    return s, bs


def test_wanted_valid_ids(sticky3: "tuple[Sticky, List[Backend]]") -> None:
    s, bs = sticky3
    i1, i2 = s.id_of("web1").decode(), s.id_of("web2").decode()
    assert s.wanted(head("Cookie: SRV=" + i1)) is bs[0]
    assert s.wanted(head("Cookie: a=1; SRV=%s; b=2" % i2)) is bs[1]
    assert s.wanted(head("cookie:SRV=" + i1)) is bs[0]
    assert s.wanted(head("COOKIE:  a=1;SRV=%s ;" % i1)) is bs[0]
    assert s.wanted(head('Cookie: SRV="%s"' % i2)) is bs[1]  # a quoted cookie-value (RFC 6265 grammar)
    assert s.wanted(head("Cookie: a=1", "Cookie: SRV=" + i2)) is bs[1]  # in a second Cookie field
    # The first occurrence wins.
    assert s.wanted(head("Cookie: SRV=%s; SRV=%s" % (i1, i2))) is bs[0]


def test_wanted_ignores_missing_invalid_and_forged(sticky3: "tuple[Sticky, List[Backend]]") -> None:
    s, bs = sticky3
    i1 = s.id_of("web1").decode()
    forged = Sticky("SRV", sticky_key("a guessed secret value", NAMES)).id_of("web1").decode()
    for fields in (
        (),
        ("X-Cookie: SRV=" + i1,),
        ("Cookie: other=" + i1,),
        ("Cookie: XSRV=" + i1,),
        ("Cookie: srv=" + i1,),  # cookie names are case-sensitive
        ("Cookie: SRV=",),
        ("Cookie: SRV",),
        ("Cookie: SRV=" + i1.upper(),),
        ("Cookie: SRV=" + i1[:-1],),
        ("Cookie: SRV=" + i1 + "0",),
        ("Cookie: SRV=web1",),
        ("Cookie: SRV=127.0.0.1:9001",),
        ("Cookie: SRV=" + "0" * 32,),
        ("Cookie: SRV=" + forged,),
        ('Cookie: SRV="' + i1,),
    ):
        assert s.wanted(head(*fields)) is None, fields


def test_wanted_hex_of_name_or_address_is_not_an_id(sticky3: "tuple[Sticky, List[Backend]]") -> None:
    s, _ = sticky3
    for guess in (b"web1".hex(), b"127.0.0.1:9001".hex(), hashlib.sha256(b"web1").hexdigest()[:32]):
        assert s.wanted(head("Cookie: SRV=" + guess)) is None


# ------------------------------------------------------------------------------------------------ budget: n at once


def test_budget_request_counts_n_at_once_like_n_calls() -> None:
    one, batch = RetryBudget(0.2), RetryBudget(0.2)
    t = 500.25
    for _ in range(50):
        one.request(t)
    batch.request(t, 50)
    assert batch.requests == one.requests == 50
    a = [one.try_retry(t) for _ in range(15)]
    b = [batch.try_retry(t) for _ in range(15)]
    assert a == b
    assert sum(b) == 10 and batch.exhausted == 5


def test_budget_batches_slide_out_of_the_window_by_their_second() -> None:
    b = RetryBudget(0.5, window=10)
    b.request(100.0, 40)
    b.request(104.9, 0)  # zero moves the clock only
    assert b.requests == 40
    assert sum(b.try_retry(109.5) for _ in range(30)) == 20  # 50% of 40, still in the window
    # At 110 the slot of second 100 leaves the window; the retries of second 109 are still in it.
    b.request(110.0, 4)
    assert sum(b.try_retry(110.2) for _ in range(10)) == 3  # only the floor: 20 retries vs 4 requests
    assert b.requests == 44 and b.retries == 23


def test_budget_batches_in_different_slots_add_up() -> None:
    b = RetryBudget(0.1)
    for i in range(10):
        b.request(1000.0 + i, 10)  # 100 requests over 10 slots
    assert sum(b.try_retry(1009.0) for _ in range(20)) == 10


def test_pool_sync_budget_hands_over_the_plain_counter() -> None:
    pool = Pool([BackendConfig("a", Address("127.0.0.1", 1))], "round_robin", make_strategy=make_strategy)
    pool.requests += 7
    pool.sync_budget(10.4)
    assert pool.budget.requests == 7
    pool.sync_budget(10.9)  # nothing new
    assert pool.budget.requests == 7
    pool.requests += 3
    pool.sync_budget(12.0)
    assert pool.budget.requests == 10


def test_pools_sync_budgets_only_where_retry_on_charges_them() -> None:
    text = BAL + "retry_on = 503\n\n" + B1 + "\n[pool quiet]\nretry_on = connect-failure\n\n" \
        "[backend q1]\naddress = 127.0.0.1:9009\npool = quiet\n"
    pools = pools_of(text)
    charged, quiet = pools.named["default"], pools.named["quiet"]
    charged.requests, quiet.requests = 5, 9
    assert pools.sync_budgets(20.0)
    assert charged.budget.requests == 5 and quiet.budget.requests == 0
    only_quiet = pools_of(BAL + "retry_on = connect-failure\n\n" + B1)
    assert not only_quiet.sync_budgets(20.0)  # the server's timer stops


def test_pool_try_retry_syncs_first() -> None:
    pool = Pool([BackendConfig("a", Address("127.0.0.1", 1))], "round_robin", make_strategy=make_strategy)
    pool.budget.ratio = 0.1
    pool.requests = 80  # counted by the data path, not yet handed to the budget
    allowed = sum(pool.try_retry(50.0) for _ in range(12))
    assert allowed == 8
    assert pool.budget.requests == 80 and pool.budget.exhausted == 4


# ------------------------------------------------------------------------------------------------ config keys


def test_policy_defaults() -> None:
    cfg = parse(BAL + B1)
    assert cfg.retry_on == ("connect-failure",)
    assert cfg.retry_budget == pytest.approx(0.2)
    assert cfg.panic_threshold == 0.0
    assert cfg.sticky == "" and cfg.sticky_secret == ""
    assert (cfg.client_rate, cfg.client_burst, cfg.client_connections) == (0.0, 0, 0)
    assert cfg.pools[0].name == "default"
    p = cfg.pools[0]
    assert (p.retry_on, p.retry_budget, p.panic_threshold, p.sticky) == (None, None, None, None)


@pytest.mark.parametrize("text, want", [
    ("connect-failure", ("connect-failure",)),
    ("503", ("503",)),
    ("504, 503,502 , timeout,Empty-Response,CONNECT-FAILURE",
     ("connect-failure", "empty-response", "timeout", "502", "503", "504")),
    ("503, 503", ("503",)),
    ("none", ()),
    ("None", ()),
    ("off", ()),
])
def test_retry_on_values(text: str, want: "tuple[str, ...]") -> None:
    assert parse(BAL + "retry_on = %s\n" % text + B1).retry_on == want


def test_retry_mask_bits() -> None:
    assert retry_mask(()) == 0
    assert retry_mask(("connect-failure",)) == RETRY_CONNECT
    assert retry_mask(C.RETRY_CONDITIONS) == (RETRY_CONNECT | RETRY_EMPTY | RETRY_TIMEOUT | RETRY_502 | RETRY_503
                                              | RETRY_504)
    assert len({RETRY_CONNECT, RETRY_EMPTY, RETRY_TIMEOUT, RETRY_502, RETRY_503, RETRY_504}) == 6


@pytest.mark.parametrize("percent, share", [("20%", 0.2), ("20", 0.2), ("0%", 0.0), ("100%", 1.0),
                                            ("12.5%", 0.125), (" 7 % ", 0.07)])
def test_percent_values(percent: str, share: float) -> None:
    cfg = parse(BAL + "retry_budget = %s\npanic_threshold = %s\n" % (percent, percent) + B1)
    assert cfg.retry_budget == pytest.approx(share)
    assert cfg.panic_threshold == pytest.approx(share)


@pytest.mark.parametrize("text, want", [("off", ""), ("OFF", ""), ("none", ""), ("cookie:SRV", "SRV"),
                                        ("Cookie: SRV_id-1 ", "SRV_id-1")])
def test_sticky_values(text: str, want: str) -> None:
    assert parse(BAL + "sticky = %s\n" % text + B1).sticky == want


def test_limits_and_secret_values() -> None:
    cfg = parse(BAL + "client_rate = 0.5\nclient_burst = 7\nclient_connections = 3\n"
                "sticky_secret = 0123456789abcdef\n" + B1)
    assert cfg.client_rate == 0.5 and cfg.client_burst == 7 and cfg.client_connections == 3
    assert cfg.sticky_secret == "0123456789abcdef"


POOLS_TEXT = (BAL + "retry_on = 502\nretry_budget = 30%\n"
              + "[pool api]\nretry_on = 503, timeout\nretry_budget = 0%\npanic_threshold = 50%\n"
              + "sticky = cookie:API\n"
              + "[pool web]\nstrategy = round_robin\n"
              + backends_ini(["a1", "a2"], "api") + backends_ini(["w1"], "web", 9101)
              + "[route api]\npath_prefix = /api/\npool = api\n[route web]\npool = web\n")


def test_pool_overrides_parse() -> None:
    cfg = parse(POOLS_TEXT)
    by = {p.name: p for p in cfg.pools}
    api, web = by["api"], by["web"]
    assert api.retry_on == ("timeout", "503")
    assert api.retry_budget == 0.0 and api.panic_threshold == 0.5 and api.sticky == "API"
    assert (web.retry_on, web.retry_budget, web.panic_threshold, web.sticky) == (None, None, None, None)
    assert cfg.retry_on == ("502",) and cfg.retry_budget == pytest.approx(0.3)


def test_pool_overrides_reach_the_pools() -> None:
    pools = pools_of(POOLS_TEXT)
    api, web = pools.named["api"], pools.named["web"]
    assert api.retry_on == RETRY_503 | RETRY_TIMEOUT
    assert web.retry_on == RETRY_502  # [balancer]'s
    assert api.budget.ratio == 0.0 and web.budget.ratio == pytest.approx(0.3)
    assert api.panic_threshold == 0.5 and web.panic_threshold == 0.0
    assert api.sticky is not None and api.sticky.name == b"API" and web.sticky is None
    assert not api.direct and web.direct
    # The key is derived from every backend of the file (not only the pool's), sorted.
    assert api.sticky.key == sticky_key("", ["w1", "a2", "a1"])


# (name, text, line, section, key, fragment)
POLICY_INVALID = [
    ("retry_on unknown", BAL + "retry_on = 500\n" + B1, 3, "balancer", "retry_on",
     "unknown retry condition '500' (expected a comma list of connect-failure, empty-response, timeout, "
     "502, 503, 504, or none)"),
    ("retry_on typo", BAL + "retry_on = connect_failure\n" + B1, 3, "balancer", "retry_on", "connect-failure"),
    ("retry_on empty item", BAL + "retry_on = 503,\n" + B1, 3, "balancer", "retry_on", "empty item"),
    ("retry_on empty", BAL + "retry_on =\n" + B1, 3, "balancer", "retry_on", ""),
    ("retry_on none mixed", BAL + "retry_on = none, 503\n" + B1, 3, "balancer", "retry_on", "'none'"),
    ("retry_budget 101", BAL + "retry_budget = 101%\n" + B1, 3, "balancer", "retry_budget", "0%..100%"),
    ("retry_budget negative", BAL + "retry_budget = -5%\n" + B1, 3, "balancer", "retry_budget", "percentage"),
    ("retry_budget text", BAL + "retry_budget = lots\n" + B1, 3, "balancer", "retry_budget", "percentage"),
    ("retry_budget ratio", BAL + "retry_budget = 0.2.1\n" + B1, 3, "balancer", "retry_budget", "percentage"),
    ("panic 150", BAL + "panic_threshold = 150%\n" + B1, 3, "balancer", "panic_threshold", "0%..100%"),
    ("sticky without cookie:", BAL + "sticky = SRV\n" + B1, 3, "balancer", "sticky", "cookie:NAME"),
    ("sticky header", BAL + "sticky = header:X\n" + B1, 3, "balancer", "sticky", "cookie:NAME"),
    ("sticky no name", BAL + "sticky = cookie:\n" + B1, 3, "balancer", "sticky", "needs a name"),
    ("sticky bad token", BAL + "sticky = cookie:a b\n" + B1, 3, "balancer", "sticky", "not a valid token"),
    ("sticky_secret short", BAL + "sticky_secret = fifteen-chars!!\n" + B1, 3, "balancer", "sticky_secret",
     "at least 16 characters"),
    ("client_rate negative", BAL + "client_rate = -1\n" + B1, 3, "balancer", "client_rate", "requests per second"),
    ("client_rate text", BAL + "client_rate = fast\n" + B1, 3, "balancer", "client_rate", "requests per second"),
    ("client_burst negative", BAL + "client_burst = -1\n" + B1, 3, "balancer", "client_burst", ""),
    ("client_connections text", BAL + "client_connections = two\n" + B1, 3, "balancer", "client_connections",
     "not a whole number"),
    ("pool retry_on", BAL + B1 + "[pool api]\nretry_on = 503, 418\n" + backends_ini(["a1"], "api"), 6,
     "pool api", "retry_on", "unknown retry condition '418'"),
    ("pool retry_budget", BAL + B1 + "[pool api]\nstrategy = rr\nretry_budget = 200%\n"
     + backends_ini(["a1"], "api"), 7, "pool api", "retry_budget", "0%..100%"),
    ("pool sticky", BAL + B1 + "[pool api]\nsticky = on\n" + backends_ini(["a1"], "api"), 6, "pool api", "sticky",
     "cookie:NAME"),
    ("pool sticky_secret", BAL + B1 + "[pool api]\nsticky_secret = 0123456789abcdef\n"
     + backends_ini(["a1"], "api"), 6, "pool api", "sticky_secret", "unknown key"),
    ("pool client_rate", BAL + B1 + "[pool api]\nclient_rate = 5\n" + backends_ini(["a1"], "api"), 6, "pool api",
     "client_rate", "unknown key"),
]


@pytest.mark.parametrize("text, line, section, key, fragment", [c[1:] for c in POLICY_INVALID],
                         ids=[c[0] for c in POLICY_INVALID])
def test_policy_config_errors(text: str, line: int, section: str, key: str, fragment: str) -> None:
    err = parse_error(text)
    assert (err.line, err.section, err.key) == (line, section, key), str(err)
    assert fragment in err.message, str(err)
    assert str(err).startswith("lb.ini:%d: [%s] %s: " % (line, section, key))
    assert "\n" not in str(err)


def test_retry_on_error_names_every_condition() -> None:
    msg = parse_error(BAL + "retry_on = 503, empty_response\n" + B1).message
    for cond in C.RETRY_CONDITIONS:
        assert cond in msg
    assert "none" in msg and "'empty_response'" in msg


def test_sticky_secret_of_sixteen_is_enough() -> None:
    assert parse(BAL + "sticky_secret = 16-characters!!!\n" + B1).sticky_secret == "16-characters!!!"


# ------------------------------------------------------------------------------------------------ panic


def panic_pools(threshold: str, n: int = 4, extra: str = "") -> Pools:
    return pools_of(BAL + "panic_threshold = %s\n" % threshold + extra + backends_ini(["b%d" % i for i in
                                                                                        range(1, n + 1)]))


def down(pools: Pools, *names: str) -> None:
    for n in names:
        b = pools.by_name(n)
        assert b is not None
        b.mark_down()
    pools.refresh()


def up(pools: Pools, *names: str) -> None:
    for n in names:
        b = pools.by_name(n)
        assert b is not None
        b.mark_up(1000.0)
    pools.refresh()


def panic_lines(caplog: pytest.LogCaptureFixture) -> "tuple[List[str], List[str]]":
    msgs = [r.getMessage() for r in caplog.records if r.name == "balrs"]
    return ([m for m in msgs if "panic:" in m and "out of panic" not in m], [m for m in msgs if "out of panic" in m])


def test_panic_over_all_backends_below_threshold_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="balrs")
    pools = panic_pools("50%")
    pool = pools.named["default"]
    down(pools, "b1")
    assert not pool.panicking and rotation(pool) == ["b2", "b3", "b4"]
    down(pools, "b2")  # 2 of 4 up: not below 50%
    assert not pool.panicking and rotation(pool) == ["b3", "b4"]
    down(pools, "b3")  # 1 of 4
    assert pool.panicking and rotation(pool) == ["b1", "b2", "b3", "b4"]
    pools.refresh()
    pools.refresh()
    entered, left = panic_lines(caplog)
    assert len(entered) == 1 and not left
    assert "1 of 4" in entered[0] and "pool default" in entered[0]
    down(pools, "b4")  # none up: still panic (no backup pool), still one line
    assert pool.panicking and rotation(pool) == ["b1", "b2", "b3", "b4"]
    up(pools, "b1", "b2")
    assert not pool.panicking and rotation(pool) == ["b1", "b2"]
    up(pools, "b3")
    entered, left = panic_lines(caplog)
    assert len(entered) == 1 and len(left) == 1 and "2 of 4" in left[0]


def test_no_panic_with_threshold_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="balrs")
    pools = panic_pools("0%")
    pool = pools.named["default"]
    down(pools, "b1", "b2", "b3")
    assert not pool.panicking and rotation(pool) == ["b4"]
    down(pools, "b4")
    assert not pool.panicking and rotation(pool) == []
    assert panic_lines(caplog) == ([], [])


def test_panic_counts_ejected_backends_as_not_up() -> None:
    pools = panic_pools("50%")
    pool = pools.named["default"]
    for n in ("b1", "b2", "b3"):
        b = pools.by_name(n)
        assert b is not None
        b.eject(2000.0)
    pools.refresh()
    assert pool.panicking and len(rotation(pool)) == 4


def test_panic_threshold_100_percent_panics_on_one_down() -> None:
    pools = panic_pools("100%", n=3)
    pool = pools.named["default"]
    down(pools, "b2")
    assert pool.panicking and rotation(pool) == ["b1", "b2", "b3"]


def test_panic_ignores_draining_backends() -> None:
    pools = panic_pools("50%")
    pool = pools.named["default"]
    for n in ("b1", "b2"):
        b = pools.by_name(n)
        assert b is not None
        b.retire()
    down(pools, "b3")  # of the 2 non-draining backends, 1 is up: not below 50%
    assert not pool.panicking and rotation(pool) == ["b4"]
    down(pools, "b4")
    assert pool.panicking and rotation(pool) == ["b3", "b4"]  # never the draining ones


def test_no_panic_when_none_up_and_a_backup_pool_serves() -> None:
    text = (BAL + "panic_threshold = 50%\n[pool api]\nbackup = spare\n" + backends_ini(["a1", "a2", "a3"], "api")
            + backends_ini(["s1"], "spare", 9201) + "[route r]\npool = api\n")
    pools = pools_of(text)
    api = pools.named["api"]
    down(pools, "a1", "a2")  # 1 of 3 up: panic
    assert api.panicking and rotation(api) == ["a1", "a2", "a3"]
    down(pools, "a3")  # none up: the backup serves instead of the down backends
    assert not api.panicking and rotation(api) == []


def test_panic_threshold_per_pool() -> None:
    text = (BAL + "[pool p]\npanic_threshold = 50%\n[pool s]\nstrategy = rr\n"
            + backends_ini(["p1", "p2", "p3", "p4"], "p") + backends_ini(["s1", "s2", "s3", "s4"], "s", 9101)
            + "[route p]\npath_prefix = /p/\npool = p\n[route s]\npool = s\n")
    pools = pools_of(text)
    down(pools, "p1", "p2", "p3", "s1", "s2", "s3")
    assert pools.named["p"].panicking and len(rotation(pools.named["p"])) == 4
    assert not pools.named["s"].panicking and rotation(pools.named["s"]) == ["s4"]


def test_turning_panic_off_while_panicking_ends_the_panic() -> None:
    text = BAL + "panic_threshold = 50%\n" + backends_ini(["b1", "b2", "b3", "b4"])
    pools = pools_of(text)
    pool = pools.named["default"]
    down(pools, "b1", "b2", "b3")
    assert pool.panicking
    pools.reload(parse(text.replace("panic_threshold = 50%", "panic_threshold = 0%")), lambda c: True)
    assert rotation(pool) == ["b4"]  # the threshold is off: only the eligible backend
    assert not pool.panicking


# ------------------------------------------------------------------------------------------------ sticky in the pool


def sticky_pools(extra: str = "", secret: str = "") -> Pools:
    bal = BAL + "sticky = cookie:SRV\n" + ("sticky_secret = %s\n" % secret if secret else "") + extra
    return pools_of(bal + backends_ini(["s1", "s2", "s3"]))


def test_pools_sticky_ids_from_names_or_secret() -> None:
    plain = sticky_pools().named["default"].sticky
    assert plain is not None
    assert plain.key == sticky_key("", ["s1", "s2", "s3"])
    secret = "a-long-enough-secret"
    keyed = sticky_pools(secret=secret).named["default"].sticky
    assert keyed is not None and keyed.key == sticky_key(secret, [])
    assert plain.id_of("s1") != keyed.id_of("s1")


def test_choose_sticky_follows_cookie_while_eligible() -> None:
    pools = sticky_pools()
    pool = pools.named["default"]
    sticky = pool.sticky
    assert sticky is not None
    req = head("Cookie: SRV=" + sticky.id_of("s2").decode())
    assert pool.choose_sticky(req, "10.0.0.1") == (pools.by_name("s2"), False)
    # No cookie: the strategy picks, and the cookie is to be set.
    b, reset = pool.choose_sticky(head(), "10.0.0.1")
    assert b is not None and reset
    # s2 down: another backend, cookie reset; back up: sticks again.
    down(pools, "s2")
    b, reset = pool.choose_sticky(req, "10.0.0.1")
    assert b is not None and b.name != "s2" and reset
    up(pools, "s2")
    assert pool.choose_sticky(req, "10.0.0.1") == (pools.by_name("s2"), False)


def test_choose_sticky_skips_a_full_backend() -> None:
    pools = pools_of(BAL + "sticky = cookie:SRV\n"
                     + "[backend s1]\naddress = 127.0.0.1:9001\nmax_connections = 1\n"
                     + "[backend s2]\naddress = 127.0.0.1:9002\n")
    pool = pools.named["default"]
    s1 = pools.by_name("s1")
    assert pool.sticky is not None and s1 is not None
    req = head("Cookie: SRV=" + pool.sticky.id_of("s1").decode())
    assert pool.choose_sticky(req, "10.0.0.1") == (s1, False)
    s1.take_slot()
    b, reset = pool.choose_sticky(req, "10.0.0.1")
    assert b is not None and b.name == "s2" and reset


def test_reload_keeps_an_unchanged_sticky_and_rekeys_on_membership_change() -> None:
    text = BAL + "sticky = cookie:SRV\n" + backends_ini(["s1", "s2", "s3"])
    pools = pools_of(text)
    pool = pools.named["default"]
    old = pool.sticky
    assert old is not None
    id1 = old.id_of("s1")
    pools.reload(parse(text), lambda c: True)
    assert pool.sticky is old
    # A backend added: every id changes (the key is derived from the names).
    pools.reload(parse(text + backends_ini(["s4"], first_port=9104)), lambda c: True)
    assert pool.sticky is not None and pool.sticky is not old
    assert pool.sticky.id_of("s1") != id1
    assert pool.sticky.wanted(head("Cookie: SRV=" + id1.decode())) is None
    # Sticky off by reload: the pool goes back to the direct path.
    pools.reload(parse(BAL + backends_ini(["s1", "s2", "s3"])), lambda c: True)
    assert pool.sticky is None and pool.direct and pool.rotation == set()
