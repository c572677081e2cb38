"""Integration: the edge (the contract's "TLS and the client's real address") against the real
``python -m balrs``: TLS termination with SNI, reload and bad handshakes, TLS to backends, PROXY protocol
in and out, trusted_proxies and X-Forwarded-For, RFC 7239 Forwarded.

Certificates come from tests/pki.py (the openssl command line); clients are the stdlib ``ssl`` module
over support.Client; backends are support.TestBackend, optionally speaking TLS or expecting a PROXY
header first. Every wait is on an event (a response, a log line, a closed socket).
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from pki import PKI, have_openssl
from support import HOST, BalrsProcess, Client, TestBackend, build, free_port, wait_for

pytestmark = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command line")


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


class EdgeBackend(TestBackend):
    """TestBackend that may speak TLS (``tls_ctx``) and/or expect a PROXY protocol header first."""

    def __init__(self, name: str, tls_ctx: Optional[ssl.SSLContext] = None, proxy_in: bool = False) -> None:
        self.tls_ctx = tls_ctx
        self.proxy_in = proxy_in
        self.proxy_seen: List[bytes] = []
        self.tls_errors: List[str] = []
        self.sni_seen: List[Optional[str]] = []
        if tls_ctx is not None:
            tls_ctx.sni_callback = lambda s, n, c: self.sni_seen.append(n)  # type: ignore[assignment,misc]
        super().__init__(name)

    def _serve(self, sock: socket.socket, cid: int) -> None:
        sock.settimeout(10)
        try:
            if self.proxy_in:
                self.proxy_seen.append(_read_proxy_header(sock))
            if self.tls_ctx is not None:
                sock = self.tls_ctx.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:
            self.tls_errors.append(repr(exc))
            sock.close()
            return
        super()._serve(sock, cid)


def _read_proxy_header(sock: socket.socket) -> bytes:
    """Byte-exact: a v1 line up to CRLF, or a v2 header by its length (what follows stays unread)."""
    first = _recv_exact(sock, 5)
    if first == b"PROXY":
        line = first
        while not line.endswith(b"\r\n"):
            line += _recv_exact(sock, 1)
            if len(line) > 107:
                raise ValueError("PROXY v1 line too long")
        return line
    fixed = first + _recv_exact(sock, 11)
    if not fixed.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
        raise ValueError("no PROXY header: %r" % fixed)
    (length,) = struct.unpack("!H", fixed[14:16])
    return fixed + _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ValueError("closed after %d bytes" % len(data))
        data += more
    return data


class Edge:
    """One balrs process with a plain listener (``plain``) and optionally a tls one (``tls``) and a
    proxy one (``proxy``)."""

    def __init__(self, tmp: Path, backends: Sequence[TestBackend], pki: Optional[PKI] = None,
                 tls: bool = False, proxy: Optional[str] = None, balancer: str = "", tls_section: str = "",
                 backend_extra: str = "", log: str = "") -> None:
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.proxy_port = free_port() if proxy is not None else 0
        listen = ["127.0.0.1:%d" % self.port]
        if tls:
            listen.append("127.0.0.1:%d tls" % self.tls_port)
        if proxy is not None:
            listen.append("127.0.0.1:%d %s" % (self.proxy_port, proxy))
        text = "[balancer]\nlisten = %s\nconnect_timeout = 2s\nbackend_timeout = 5s\nretries = 1\n%s\n" % (
            ", ".join(listen), balancer)
        if tls or tls_section:
            assert pki is not None
            text += tls_section or "[tls]\ncert = %s, %s\nkey = %s, %s\nhandshake_timeout = 1s\n" % (
                pki.crt("a.test"), pki.crt("b.test"), pki.key("a.test"), pki.key("b.test"))
        if log:
            text += "\n[log]\n%s\n" % log
        for b in backends:
            text += "\n[backend %s]\naddress = %s\n%s\n" % (b.name, b.address, backend_extra)
        self.text = text
        self.lb = BalrsProcess(tmp, text, self.port)
        self.lb.start()
        if tls:
            self.lb.wait_listening(5.0, (HOST, self.tls_port))
        if proxy is not None:
            self.lb.wait_listening(5.0, (HOST, self.proxy_port))

    def stop(self) -> None:
        self.lb.stop()


@pytest.fixture
def backend() -> Iterator[TestBackend]:
    b = TestBackend("b1")
    yield b
    b.stop()


def tls_client(port: int, pki: PKI, sni: Optional[str] = "a.test", **versions: ssl.TLSVersion) -> Client:
    c = Client((HOST, port))
    c.sock = pki.client_ctx(**versions).wrap_socket(c.sock, server_hostname=sni)
    return c


def tls_get(port: int, pki: PKI, target: str = "/echo", sni: Optional[str] = "a.test",
            headers: Sequence[Tuple[str, str]] = ()) -> Any:
    with tls_client(port, pki, sni) as c:
        c.send(build("GET", target, [("Host", "lb.test"), ("Connection", "close"), *headers]))
        return c.read_response()


def peer_serial(port: int, pki: PKI, sni: Optional[str]) -> int:
    with tls_client(port, pki, sni) as c:
        cert = c.sock.getpeercert()  # type: ignore[attr-defined]
        return int(cert["serialNumber"], 16)


def echo_headers(r: Any) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for name, value in r.json()["headers"]:
        key = name.lower()
        out[key] = out[key] + ", " + value if key in out else value
    return out


# ---------------------------------------------------------------------------------------------- TLS termination
def test_tls_get_sni_alpn_and_forwarded_proto(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    e = Edge(tmp_path, [backend], pki, tls=True)
    try:
        r = tls_get(e.tls_port, pki, "/echo?via=tls", headers=[("X-Forwarded-Proto", "http")])
        assert r.status == 200
        assert echo_headers(r)["x-forwarded-proto"] == "https"
        assert r.json()["target"] == "/echo?via=tls"
        plain = Client((HOST, e.port))
        plain.send(build("GET", "/echo", [("Host", "lb.test"), ("Connection", "close")]))
        assert echo_headers(plain.read_response())["x-forwarded-proto"] == "http"
        plain.close()
        # SNI picks the certificate; no SNI (or an unknown name) gets the first one.
        assert peer_serial(e.tls_port, pki, "a.test") == pki.serials["a.test"]
        assert peer_serial(e.tls_port, pki, "b.test") == pki.serials["b.test"]
        c = Client((HOST, e.tls_port))
        ctx = pki.client_ctx(verify=False)
        c.sock = ctx.wrap_socket(c.sock)
        assert c.sock.selected_alpn_protocol() == "http/1.1"  # type: ignore[attr-defined]
        c.close()
    finally:
        e.stop()


def test_tls_min_version_13(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    section = "[tls]\ncert = %s\nkey = %s\nmin_version = 1.3\n" % (pki.crt("a.test"), pki.key("a.test"))
    e = Edge(tmp_path, [backend], pki, tls=True, tls_section=section)
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            c = tls_client(e.tls_port, pki, max_version=ssl.TLSVersion.TLSv1_2)
            c.send(build("GET", "/", [("Host", "x")]))
            c.read_response()
        with tls_client(e.tls_port, pki, min_version=ssl.TLSVersion.TLSv1_3) as c:
            assert c.sock.version() == "TLSv1.3"  # type: ignore[attr-defined]
            c.send(build("GET", "/echo", [("Host", "x"), ("Connection", "close")]))
            assert c.read_response().status == 200
    finally:
        e.stop()


def test_plain_http_on_tls_port_is_closed_not_hung(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    e = Edge(tmp_path, [backend], pki, tls=True)
    try:
        with Client((HOST, e.tls_port)) as c:
            c.send(build("GET", "/echo", [("Host", "lb.test")]))
            closed, data, _ = c.wait_closed(5)
            assert closed
            assert not data.startswith(b"HTTP/")
        assert not backend.reqs()
    finally:
        e.stop()


def test_stalled_handshake_does_not_delay_others_and_times_out(tmp_path: Path, backend: TestBackend,
                                                                pki: PKI) -> None:
    e = Edge(tmp_path, [backend], pki, tls=True)
    try:
        # One client sends half a ClientHello and stalls; another connects nothing at all.
        stall = socket.create_connection((HOST, e.tls_port))
        stall.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        idle = socket.create_connection((HOST, e.tls_port))
        t0 = time.monotonic()
        for i in range(5):
            assert tls_get(e.tls_port, pki, "/echo?i=%d" % i).status == 200
        assert time.monotonic() - t0 < 5
        # handshake_timeout = 1s closes both.
        for s in (stall, idle):
            s.settimeout(5)
            assert s.recv(100) == b""
            s.close()
    finally:
        e.stop()


def test_pipelined_requests_and_large_upload_over_tls(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    """TLS records decrypted inside OpenSSL get no readiness event: pending() bytes must not be stranded
    (pipelined requests in one record; a body in many)."""
    e = Edge(tmp_path, [backend], pki, tls=True)
    try:
        with tls_client(e.tls_port, pki) as c:
            n = 30
            c.send(b"".join(build("GET", "/echo?n=%d" % i, [("Host", "lb.test")]) for i in range(n)))
            for i in range(n):
                r = c.read_response()
                assert r.status == 200 and r.json()["target"] == "/echo?n=%d" % i
            body = bytes(range(256)) * (8 * 1024 * 3)  # 6 MiB
            c.send(build("POST", "/echo", [("Host", "lb.test"), ("Content-Length", str(len(body)))]) + body)
            r = c.read_response(timeout=30)
            assert r.status == 200
            assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
            # And a large response back.
            c.send(build("GET", "/big/3000000", [("Host", "lb.test")]))
            r = c.read_response(timeout=30)
            assert r.status == 200 and len(r.body) == 3000000
    finally:
        e.stop()


def test_sighup_reloads_certificates_and_refuses_a_broken_one(tmp_path: Path, backend: TestBackend,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    pki = PKI(tmp_path_factory.mktemp("pki-reload"))
    e = Edge(tmp_path, [backend], pki, tls=True)
    try:
        assert peer_serial(e.tls_port, pki, "a.test") == 1000
        pki.leaf("a.test", 2000)
        mark = e.lb.log_mark()
        e.lb.signal(signal.SIGHUP)
        e.lb.wait_log("reloaded", since=mark)
        assert peer_serial(e.tls_port, pki, "a.test") == 2000
        assert peer_serial(e.tls_port, pki, "b.test") == pki.serials["b.test"]
        # A certificate that cannot be loaded: the reload is refused, the old one stays.
        pki.crt("a.test").write_text("not a certificate\n")
        mark = e.lb.log_mark()
        e.lb.signal(signal.SIGHUP)
        line = e.lb.wait_log("reload failed", since=mark)
        assert "[tls] cert" in line
        assert peer_serial(e.tls_port, pki, "a.test") == 2000
        assert tls_get(e.tls_port, pki).status == 200
    finally:
        e.stop()


def test_bad_certificate_is_a_config_error(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    from support import run_balrs
    ini = tmp_path / "bad.ini"
    ini.write_text("[balancer]\nlisten = 127.0.0.1:%d tls\n\n[tls]\ncert = %s\nkey = %s\n\n[backend b]\naddress = %s\n"
                   % (free_port(), tmp_path / "missing.pem", pki.key("a.test"), backend.address))
    rc, out, err = run_balrs("--check", str(ini))
    assert rc == 2
    assert "bad.ini:5: [tls] cert: cannot read" in err
    ini.write_text("[balancer]\nlisten = 127.0.0.1:%d tls\n\n[tls]\ncert = %s\nkey = %s\n\n[backend b]\naddress = %s\n"
                   % (free_port(), pki.crt("a.test"), pki.key("b.test"), backend.address))
    rc, out, err = run_balrs("--check", str(ini))
    assert rc == 2 and "[tls] cert: cannot load" in err


# ---------------------------------------------------------------------------------------------- TLS to backends
def test_backend_tls_verified_pooled_and_probed(tmp_path: Path, pki: PKI) -> None:
    b = EdgeBackend("tb", tls_ctx=pki.server_ctx("a.test"))
    try:
        e = Edge(tmp_path, [b], balancer="", backend_extra="tls = yes\ntls_ca = %s\ntls_sni = a.test\n" % pki.ca)
        try:
            with Client((HOST, e.port)) as c:
                for i in range(3):
                    c.send(build("GET", "/echo?i=%d" % i, [("Host", "lb.test")]))
                    assert c.read_response().status == 200
            assert len(b.reqs()) == 3
            assert len({r["conn"] for r in b.reqs()}) == 1, "the TLS connection is reused"
            assert b.sni_seen and b.sni_seen[0] == "a.test"
            assert not b.tls_errors
        finally:
            e.stop()
    finally:
        b.stop()


def test_backend_tls_verification_failure_is_a_connect_failure(tmp_path: Path, pki: PKI) -> None:
    rogue = EdgeBackend("rogue", tls_ctx=pki.server_ctx("rogue"))
    good = EdgeBackend("good", tls_ctx=pki.server_ctx("a.test"))
    try:
        extra = "tls = yes\ntls_ca = %s\ntls_sni = a.test\n" % pki.ca
        e = Edge(tmp_path, [rogue, good], backend_extra=extra, balancer="strategy = round_robin")
        try:
            for i in range(4):
                r = Client((HOST, e.port))
                r.send(build("GET", "/echo?i=%d" % i, [("Host", "lb.test"), ("Connection", "close")]))
                resp = r.read_response()
                r.close()
                assert resp.status == 200 and resp.header("X-Backend") == "good"
            assert not rogue.reqs()
            e.lb.wait_log("certificate verification failed")
        finally:
            e.stop()
        # Only the rogue one: 502.
        e = Edge(tmp_path, [rogue], backend_extra=extra)
        try:
            r = Client((HOST, e.port))
            r.send(build("GET", "/echo", [("Host", "lb.test"), ("Connection", "close")]))
            assert r.read_response().status == 502
            r.close()
        finally:
            e.stop()
    finally:
        rogue.stop()
        good.stop()


def test_backend_tls_health_probes_and_send_proxy(tmp_path: Path, pki: PKI) -> None:
    """Probes go over TLS too (and with send_proxy they start with a LOCAL / UNKNOWN header); a request's
    PROXY header names its client and the address it connected to, ahead of the TLS handshake."""
    b = EdgeBackend("tp", tls_ctx=pki.server_ctx("a.test"), proxy_in=True)
    try:
        extra = "tls = yes\ntls_verify = no\nsend_proxy = v2\n"
        e = Edge(tmp_path, [b], backend_extra=extra,
                 balancer="\n[health]\npath = /health\ninterval = 200ms\ntimeout = 1s\nrise = 1\nfall = 1\n")
        try:
            assert wait_for(lambda: any(r["target"] == "/health" for r in b.reqs()), 5)
            probe = b.proxy_seen[0]
            assert probe[12] == 0x20, "a probe's v2 header is LOCAL"
            with Client((HOST, e.port)) as c:
                src = c.sock.getsockname()
                c.send(build("GET", "/echo", [("Host", "lb.test"), ("Connection", "close")]))
                assert c.read_response().status == 200
            proxied = [h for h in b.proxy_seen if h[12] == 0x21]
            assert proxied, b.proxy_seen
            h = proxied[-1]
            assert h[13] == 0x11  # TCP over IPv4
            assert socket.inet_ntoa(h[16:20]) == src[0]
            assert struct.unpack("!HH", h[24:28]) == (src[1], e.port)
            assert not b.tls_errors
        finally:
            e.stop()
    finally:
        b.stop()


# ---------------------------------------------------------------------------------------------- PROXY protocol in
def _v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode()


def _v2(src: str, dst: str, sport: int, dport: int, tlv: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(body)) + body


def _bind_client(port: int, src: str = HOST) -> Client:
    c = Client.__new__(Client)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((src, 0))
    sock.settimeout(3)
    sock.connect((HOST, port))
    c.sock, c.timeout, c.buf, c.eof, c.reset = sock, 5.0, b"", False, False
    return c


def test_proxy_v1_v2_from_trusted_peer(tmp_path: Path, backend: TestBackend) -> None:
    e = Edge(tmp_path, [backend], proxy="proxy", balancer="trusted_proxies = 127.0.0.1",
             log="access = %s\nformat = json" % (tmp_path / "access.log"))
    try:
        for header, ip in ((_v1("192.0.2.7", "127.0.0.1", 5555, e.proxy_port), "192.0.2.7"),
                           (_v2("198.51.100.9", "127.0.0.1", 6666, e.proxy_port, b"\x04\x00\x02ab"), "198.51.100.9")):
            with Client((HOST, e.proxy_port)) as c:
                # The header and the request in separate writes and together.
                c.send(header)
                c.send(build("GET", "/echo?a", [("Host", "lb.test")]))
                assert echo_headers(c.read_response())["x-forwarded-for"] == ip
                c.send(build("GET", "/echo?b", [("Host", "lb.test"), ("Connection", "close")]))
                assert echo_headers(c.read_response())["x-forwarded-for"] == ip
            with Client((HOST, e.proxy_port)) as c:
                c.send(header + build("GET", "/echo?c", [("Host", "lb.test"), ("Connection", "close")]))
                assert echo_headers(c.read_response())["x-forwarded-for"] == ip
        log = tmp_path / "access.log"
        assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 6, 5)
        clients = [json.loads(line)["client"] for line in log.read_text().splitlines()]
        assert clients == ["192.0.2.7"] * 3 + ["198.51.100.9"] * 3
    finally:
        e.stop()


@pytest.mark.parametrize("header", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                # no header at all
    b"PROXY TCP4 192.0.2.7 127.0.0.1 5555\r\n",         # a field missing
    b"PROXY TCP4 999.0.2.7 127.0.0.1 5555 80\r\n",      # not an address
    b"PROXY " + b"x" * 200,                             # oversized, no CRLF
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",            # v2 length past the bound
], ids=["none", "short", "bad-address", "oversized", "v2-too-long"])
def test_proxy_bad_header_closed_without_response(tmp_path: Path, backend: TestBackend, header: bytes) -> None:
    e = Edge(tmp_path, [backend], proxy="proxy", balancer="trusted_proxies = 127.0.0.1")
    try:
        with Client((HOST, e.proxy_port)) as c:
            try:
                c.send(header + build("GET", "/echo", [("Host", "lb.test")]))
            except OSError:
                pass
            closed, data, _ = c.wait_closed(5)
            assert closed and not data.startswith(b"HTTP/")
        assert not backend.reqs()
    finally:
        e.stop()


def test_proxy_untrusted_peer_closed_and_header_timeout(tmp_path: Path, backend: TestBackend) -> None:
    e = Edge(tmp_path, [backend], proxy="proxy", balancer="trusted_proxies = 127.0.0.2\nheader_timeout = 1s")
    try:
        with Client((HOST, e.proxy_port)) as c:  # from 127.0.0.1: not trusted
            try:
                c.send(_v1("192.0.2.7", "127.0.0.1", 5555, e.proxy_port) + build("GET", "/", [("Host", "x")]))
            except OSError:
                pass
            closed, data, _ = c.wait_closed(5)
            assert closed and not data
        with _bind_client(e.proxy_port, "127.0.0.2") as c:
            c.send(_v1("192.0.2.8", "127.0.0.1", 5556, e.proxy_port))
            c.send(build("GET", "/echo", [("Host", "lb.test"), ("Connection", "close")]))
            assert echo_headers(c.read_response())["x-forwarded-for"] == "192.0.2.8"
        with _bind_client(e.proxy_port, "127.0.0.2") as c:  # trusted, but never sends a header
            closed, data, waited = c.wait_closed(5)
            assert closed and not data and waited >= 0.5
        assert len(backend.reqs()) == 1
    finally:
        e.stop()


def test_proxy_and_tls_on_one_listener(tmp_path: Path, backend: TestBackend, pki: PKI) -> None:
    """The PROXY header comes first, in the clear, then the TLS handshake (what an NLB in front sends)."""
    e = Edge(tmp_path, [backend], pki, tls=True, proxy="tls proxy", balancer="trusted_proxies = 127.0.0.1")
    try:
        c = Client((HOST, e.proxy_port))
        c.sock.sendall(_v2("203.0.113.5", "127.0.0.1", 4444, e.proxy_port))
        c.sock = pki.client_ctx().wrap_socket(c.sock, server_hostname="b.test")
        c.send(build("GET", "/echo", [("Host", "lb.test"), ("Connection", "close")]))
        r = c.read_response()
        c.close()
        h = echo_headers(r)
        assert h["x-forwarded-for"] == "203.0.113.5" and h["x-forwarded-proto"] == "https"
    finally:
        e.stop()


# ---------------------------------------------------------------------------------------------- trusted_proxies
def test_trusted_xff_chain_and_untrusted_replacement(tmp_path: Path, backend: TestBackend) -> None:
    e = Edge(tmp_path, [backend], balancer="trusted_proxies = 127.0.0.2, 10.0.0.0/8",
             log="access = %s\nformat = json" % (tmp_path / "access.log"))
    try:
        # From an untrusted peer: incoming X-Forwarded-For and Forwarded replaced; proto/host ours.
        with Client((HOST, e.port)) as c:
            c.send(build("GET", "/echo?u", [("Host", "lb.test"), ("X-Forwarded-For", "6.6.6.6"),
                                             ("Forwarded", "for=6.6.6.6"), ("X-Forwarded-Proto", "https"),
                                             ("Connection", "close")]))
            h = echo_headers(c.read_response())
            assert h["x-forwarded-for"] == "127.0.0.1"
            assert "forwarded" not in h
            assert h["x-forwarded-proto"] == "http"
        # From a trusted peer: appended to; the client is the right-most untrusted entry; proto/host kept.
        with _bind_client(e.port, "127.0.0.2") as c:
            chain = "198.51.100.1, 192.0.2.9, 10.1.1.1"
            c.send(build("GET", "/echo?t", [("Host", "lb.test"), ("X-Forwarded-For", chain),
                                             ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "www.example"),
                                             ("Connection", "close")]))
            h = echo_headers(c.read_response())
            assert h["x-forwarded-for"] == "198.51.100.1, 192.0.2.9, 10.1.1.1, 127.0.0.2"
            assert h["x-forwarded-proto"] == "https"
            assert h["x-forwarded-host"] == "www.example"
        log = tmp_path / "access.log"
        assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, 5)
        clients = [json.loads(line)["client"] for line in log.read_text().splitlines()]
        assert clients == ["127.0.0.1", "192.0.2.9"]
    finally:
        e.stop()


def test_forwarded_rfc7239(tmp_path: Path, backend: TestBackend) -> None:
    e = Edge(tmp_path, [backend], balancer="forwarded = yes")
    try:
        with Client((HOST, e.port)) as c:
            c.send(build("GET", "/echo", [("Host", "lb.test:8080"), ("Forwarded", 'for="[2001:db8::1]"'),
                                           ("Connection", "close")]))
            h = echo_headers(c.read_response())
        assert h["forwarded"] == 'for="[2001:db8::1]", for=127.0.0.1;proto=http;host="lb.test:8080"'
    finally:
        e.stop()
