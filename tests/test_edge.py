"""The edge's pure parts: whom to trust, the client a trusted chain names, our Forwarded element, the
PROXY headers balrs sends, and the forwarding mode a peer gets."""

from __future__ import annotations

import pytest

from balrs import edge
from balrs.edge import Trusted, forwarded_element, make_peer, probe_proxy_header, proxy_header, real_client
from balrs.http.build import XF_APPEND, XF_KEEP, XF_REPLACE
from balrs.http.proxyproto import ProxyHeaderReader
from balrs.transport import Transport


def test_trusted_networks_and_single_addresses() -> None:
    t = Trusted(["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"])
    assert t
    assert "10.1.2.3" in t
    assert "127.0.0.1" in t
    assert "127.0.0.2" not in t
    assert "2001:db8::5" in t
    assert "2001:db9::5" not in t
    assert "11.0.0.1" not in t


def test_trusted_ipv4_mapped_and_garbage() -> None:
    t = Trusted(["10.0.0.0/8"])
    assert "::ffff:10.0.0.1" in t
    assert "not-an-ip" not in t
    assert "" not in t
    assert not Trusted([])


def test_trusted_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "TRUST_CACHE_SIZE", 8)
    t = Trusted(["10.0.0.0/8"])
    for i in range(100):
        assert ("10.0.0.%d" % i) in t
        assert len(t._cache) <= 8
    assert "10.0.0.1" in t  # still right after the cache started again


TRUST = Trusted(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize("xff, peer, want", [
    (None, "127.0.0.1", "127.0.0.1"),                         # no header: the peer
    (b"", "127.0.0.1", "127.0.0.1"),
    (b"203.0.113.7", "127.0.0.1", "203.0.113.7"),             # one hop
    (b"203.0.113.7, 10.0.0.2", "127.0.0.1", "203.0.113.7"),   # through two trusted proxies
    (b"1.1.1.1, 203.0.113.7, 10.0.0.2", "127.0.0.1", "203.0.113.7"),  # a client's forged entry on the left
    (b"10.0.0.3, 10.0.0.2", "127.0.0.1", "10.0.0.3"),         # all trusted: the left-most
    (b"garbage, 10.0.0.2", "127.0.0.1", "10.0.0.2"),          # a non-address ends the walk
    (b"203.0.113.7, unknown", "127.0.0.1", "127.0.0.1"),      # nothing believable at all
    (b"203.0.113.7:5555", "127.0.0.1", "203.0.113.7"),        # a port in the entry
    (b"[2001:db8::1]:443", "127.0.0.1", "2001:db8::1"),       # bracketed IPv6 with a port
    (b"2001:db8::1", "127.0.0.1", "2001:db8::1"),
    (b" 203.0.113.7 ,10.0.0.2 ", "127.0.0.1", "203.0.113.7"),  # spaces
    (b"::ffff:203.0.113.7", "127.0.0.1", "203.0.113.7"),      # mapped: as IPv4
])
def test_real_client(xff: bytes, peer: str, want: str) -> None:
    assert real_client(xff, peer, TRUST) == want


@pytest.mark.parametrize("ip, proto, host, want", [
    (b"192.0.2.1", b"http", b"example.com", b"for=192.0.2.1;proto=http;host=example.com"),
    (b"2001:db8::1", b"https", b"example.com", b'for="[2001:db8::1]";proto=https;host=example.com'),
    (b"192.0.2.1", b"http", b"example.com:8080", b'for=192.0.2.1;proto=http;host="example.com:8080"'),
    (b"192.0.2.1", b"http", None, b"for=192.0.2.1;proto=http"),
    (b"192.0.2.1", b"http", b"", b"for=192.0.2.1;proto=http"),
    (b"192.0.2.1", b"http", b'a"b\\c', b'for=192.0.2.1;proto=http;host="a\\"b\\\\c"'),
])
def test_forwarded_element(ip: bytes, proto: bytes, host: bytes, want: bytes) -> None:
    assert forwarded_element(ip, proto, host) == want


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("src, dst", [
    (("203.0.113.7", 51000), ("192.0.2.10", 443)),
    (("2001:db8::7", 51000), ("2001:db8::10", 443)),
])
def test_proxy_header_reads_back(version: str, src: tuple, dst: tuple) -> None:
    got = ProxyHeaderReader().feed(proxy_header(version, src, dst) + b"GET / HTTP/1.1\r\n")
    assert got is not None
    info, rest = got
    assert rest == b"GET / HTTP/1.1\r\n"
    assert not info.local
    assert (info.src_ip, info.src_port, info.dst_ip, info.dst_port) == (src[0], src[1], dst[0], dst[1])
    assert info.version == int(version[1])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_probe_proxy_header_is_local(version: str) -> None:
    got = ProxyHeaderReader().feed(probe_proxy_header(version))
    assert got is not None
    assert got[0].local
    assert got[1] == b""


def test_make_peer_forwarding_modes() -> None:
    assert make_peer("192.0.2.1", 1, b"http", Transport, Trusted([])).xf == XF_APPEND
    p = make_peer("10.0.0.1", 1, b"https", Transport, TRUST)
    assert (p.trusted, p.xf, p.scheme) == (True, XF_KEEP, b"https")
    p = make_peer("192.0.2.1", 1, b"http", Transport, TRUST)
    assert (p.trusted, p.xf) == (False, XF_REPLACE)


def test_peer_destination_without_socket() -> None:
    p = make_peer("192.0.2.1", 1, b"http", Transport, TRUST, local=("192.0.2.10", 443))
    assert p.destination() == ("192.0.2.10", 443)
    assert make_peer("192.0.2.1", 1, b"http", Transport, TRUST).destination() == ("0.0.0.0", 0)
