"""balrs.certnames: the DNS names of real certificates made by the ``openssl`` command line (EC, RSA, key and
certificate in one file, chains), hand-built DER for the corner cases openssl will not produce (commonName
string types, duplicate or empty subjectAltName, odd tags and lengths), malformed and fuzzed input (which must
only ever raise CertError), and the RFC 6125 matching table.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balrs.certnames import CertError, cert_names, first_cert_der, name_matches

OPENSSL = shutil.which("openssl")
if OPENSSL is None:
    pytest.skip("the openssl command line is not installed", allow_module_level=True)


# ---- making certificates with openssl ----------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    env = dict(os.environ, OPENSSL_CONF=os.devnull)  # no site config: only what the command line says
    proc = subprocess.run(
        [OPENSSL, *args], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError("openssl %s failed: %s" % (" ".join(args), proc.stderr.decode(errors="replace")))


_KEY_OPTS = {
    "ec": ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
    "rsa": ("-newkey", "rsa:2048"),
}


def _self_signed(directory: Path, stem: str, subj: str, san: Optional[str] = None, kind: str = "ec") -> Path:
    """A self-signed certificate ``<stem>.pem`` (its key in ``<stem>.key``); returns the certificate's path."""
    args = ["req", "-x509", *_KEY_OPTS[kind], "-nodes", "-keyout", stem + ".key", "-out", stem + ".pem"]
    args += ["-days", "2", "-subj", subj]
    if san is not None:
        args += ["-addext", "subjectAltName=" + san]
    _openssl(*args, cwd=directory)
    return directory / (stem + ".pem")


def _signed_by(directory: Path, stem: str, ca: str, subj: str, san: str) -> Path:
    """A leaf ``<stem>.pem`` signed by the CA ``<ca>.pem``/``<ca>.key``, with a subjectAltName."""
    _openssl("req", "-new", *_KEY_OPTS["ec"], "-nodes", "-keyout", stem + ".key", "-out", stem + ".csr",
             "-subj", subj, cwd=directory)  # fmt: skip
    (directory / (stem + ".ext")).write_text("subjectAltName=%s\n" % san)
    _openssl("x509", "-req", "-in", stem + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key", "-set_serial", "7",
             "-days", "2", "-extfile", stem + ".ext", "-out", stem + ".pem", cwd=directory)  # fmt: skip
    return directory / (stem + ".pem")


class Certs:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ec_san = _self_signed(directory, "ec_san", "/CN=Ignored.Example", "DNS:a.test,DNS:*.b.test,IP:127.0.0.1")
        self.cn_only = _self_signed(directory, "cn_only", "/CN=Only.Example")
        self.two_cns = _self_signed(directory, "two_cns", "/O=Org/CN=One.Example/CN=two.example")
        self.ip_only = _self_signed(directory, "ip_only", "/CN=cn.example", "IP:10.0.0.1")
        self.rsa = _self_signed(directory, "rsa", "/CN=rsa.example", "DNS:RSA.Example,DNS:www.rsa.example", "rsa")
        self.mixed_case = _self_signed(directory, "mixed", "/CN=x", "DNS:MiXeD.Test,email:a@b.test,URI:https://u.test/")
        self.ca = _self_signed(directory, "ca", "/CN=Test CA")
        self.leaf = _signed_by(directory, "leaf", "ca", "/CN=leaf.example", "DNS:leaf.test,DNS:alt.leaf.test")
        # key first, then the certificate, as many deployments keep them
        self.key_then_cert = directory / "combined.pem"
        self.key_then_cert.write_bytes((directory / "ec_san.key").read_bytes() + self.ec_san.read_bytes())
        # leaf then CA
        self.chain = directory / "chain.pem"
        self.chain.write_bytes(self.leaf.read_bytes() + self.ca.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certnames"))


# ---- a tiny DER encoder for the hand-built cases -----------------------------------------------------------
def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def seq(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


OID_CN = b"\x06\x03\x55\x04\x03"
OID_O = b"\x06\x03\x55\x04\x0a"
OID_SAN = b"\x06\x03\x55\x1d\x11"
OID_BASIC_CONSTRAINTS = b"\x06\x03\x55\x1d\x13"
ALG = seq(b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02")  # ecdsa-with-SHA256
VALIDITY = seq(tlv(0x17, b"250101000000Z"), tlv(0x17, b"350101000000Z"))
SPKI = seq(seq(b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"), tlv(0x03, b"\x00\x04" + b"\x11" * 64))


def name(*attrs: Tuple[bytes, int, bytes]) -> bytes:
    """An RDNSequence, one attribute per RDN: (type OID TLV, string tag, value bytes)."""
    return seq(*(tlv(0x31, seq(oid, tlv(tag, value))) for oid, tag, value in attrs))


def ext(oid: bytes, value: bytes, critical: Optional[bool] = None) -> bytes:
    crit = b"" if critical is None else tlv(0x01, b"\xff" if critical else b"\x00")
    return seq(oid, crit, tlv(0x04, value))


def san(*general_names: bytes) -> bytes:
    return ext(OID_SAN, seq(*general_names))


def dns(text: bytes) -> bytes:
    return tlv(0x82, text)


def build_cert(
    subject: Optional[bytes] = None,
    extensions: Optional[Sequence[bytes]] = None,
    version: bool = True,
    tail: bytes = b"",
    tbs_extra: bytes = b"",
) -> bytes:
    """The DER of a structurally complete (unsigned) certificate."""
    if subject is None:
        subject = name((OID_CN, 0x0C, b"built.example"))
    parts = [tlv(0xA0, tlv(0x02, b"\x02"))] if version else []
    parts += [tlv(0x02, b"\x01"), ALG, name((OID_CN, 0x0C, b"Issuer")), VALIDITY, subject, SPKI, tbs_extra]
    if extensions is not None:
        parts.append(tlv(0xA3, seq(*extensions)))
    return seq(seq(*parts), ALG, tlv(0x03, b"\x00" + b"\x22" * 8)) + tail


def pem_of(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def names_of(der: bytes) -> Tuple[str, ...]:
    return cert_names(pem_of(der))


# ---- real certificates -------------------------------------------------------------------------------------
def test_ec_certificate_with_san(certs: Certs) -> None:
    # DNS entries in order, IP entry left out, the commonName ignored because there is a subjectAltName
    assert cert_names(certs.ec_san.read_bytes()) == ("a.test", "*.b.test")


def test_common_name_only_when_there_is_no_san(certs: Certs) -> None:
    assert cert_names(certs.cn_only.read_bytes()) == ("only.example",)


def test_several_common_names_in_order(certs: Certs) -> None:
    assert cert_names(certs.two_cns.read_bytes()) == ("one.example", "two.example")


def test_san_with_only_an_ip_address_has_no_names_and_no_cn_fallback(certs: Certs) -> None:
    assert cert_names(certs.ip_only.read_bytes()) == ()


def test_rsa_certificate(certs: Certs) -> None:
    assert cert_names(certs.rsa.read_bytes()) == ("rsa.example", "www.rsa.example")


def test_other_general_names_are_skipped_and_names_lowercased(certs: Certs) -> None:
    assert cert_names(certs.mixed_case.read_bytes()) == ("mixed.test",)


def test_key_before_certificate(certs: Certs) -> None:
    data = certs.key_then_cert.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert cert_names(data) == ("a.test", "*.b.test")
    assert first_cert_der(data) == ssl.PEM_cert_to_DER_cert(certs.ec_san.read_text())


def test_chain_gives_the_leaf(certs: Certs) -> None:
    assert cert_names(certs.chain.read_bytes()) == ("leaf.test", "alt.leaf.test")
    assert cert_names(certs.ca.read_bytes()) == ("test ca",)


@pytest.mark.parametrize("stem", ["ec_san", "cn_only", "rsa", "leaf", "ca", "chain"])
def test_first_cert_der_agrees_with_ssl(certs: Certs, stem: str) -> None:
    text = (certs.dir / (stem + ".pem")).read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n"
    assert first_cert_der(text.encode()) == ssl.PEM_cert_to_DER_cert(first)


def test_crlf_line_ends_and_surrounding_text(certs: Certs) -> None:
    data = certs.ec_san.read_bytes().replace(b"\n", b"\r\n")
    data = b"Bag Attributes\r\n    friendlyName: x\r\n" + data + b"trailing junk\r\n"
    assert first_cert_der(data) == ssl.PEM_cert_to_DER_cert(certs.ec_san.read_text())
    assert cert_names(data) == ("a.test", "*.b.test")


_test_decode_cert: Optional[Callable[[str], Dict[str, Any]]] = getattr(
    getattr(ssl, "_ssl", None), "_test_decode_cert", None
)


@pytest.mark.skipif(_test_decode_cert is None, reason="ssl._ssl._test_decode_cert is not available")
@pytest.mark.parametrize("stem", ["ec_san", "cn_only", "two_cns", "ip_only", "rsa", "mixed", "leaf", "ca"])
def test_san_dns_names_agree_with_python_ssl(certs: Certs, stem: str) -> None:
    assert _test_decode_cert is not None
    decoded = _test_decode_cert(str(certs.dir / (stem + ".pem")))
    sans = decoded.get("subjectAltName")
    if sans is None:
        cns = [value for rdn in decoded["subject"] for key, value in rdn if key == "commonName"]
        expected = tuple(cn.lower() for cn in cns)
    else:
        expected = tuple(value.lower() for kind, value in sans if kind == "DNS")
    assert cert_names((certs.dir / (stem + ".pem")).read_bytes()) == expected


# ---- hand-built DER: what openssl will not make ------------------------------------------------------------
def test_built_certificate_baseline() -> None:
    assert names_of(build_cert()) == ("built.example",)
    assert names_of(build_cert(version=False)) == ("built.example",)
    assert names_of(build_cert(extensions=[san(dns(b"x.test"))])) == ("x.test",)


@pytest.mark.parametrize(
    "tag, raw, expected",
    [
        (0x0C, "Ünï.Example".encode("utf-8"), "ünï.example"),
        (0x13, b"Printable.Example", "printable.example"),
        (0x16, b"IA5.Example", "ia5.example"),
        (0x14, "Tél.Example".encode("latin-1"), "tél.example"),
        (0x1E, "Bmp.Exämple".encode("utf-16-be"), "bmp.exämple"),
        (0x1C, "Univ.Example".encode("utf-32-be"), "univ.example"),
    ],
)
def test_common_name_string_types(tag: int, raw: bytes, expected: str) -> None:
    assert names_of(build_cert(subject=name((OID_O, 0x0C, b"Org"), (OID_CN, tag, raw)))) == (expected,)


def test_multi_valued_rdn() -> None:
    subject = seq(tlv(0x31, seq(OID_O, tlv(0x13, b"Org")) + seq(OID_CN, tlv(0x13, b"Multi.Example"))))
    assert names_of(build_cert(subject=subject)) == ("multi.example",)


def test_no_common_name_and_no_san() -> None:
    assert names_of(build_cert(subject=name((OID_O, 0x0C, b"Org")))) == ()
    assert names_of(build_cert(subject=seq())) == ()


@pytest.mark.parametrize(
    "tag, raw",
    [(0x0C, b"\xff\xfe"), (0x13, b"caf\xe9"), (0x1E, b"\x00a\x00"), (0x1C, b"\x00\x00\x00"), (0x04, b"octets")],
)
def test_undecodable_common_name(tag: int, raw: bytes) -> None:
    with pytest.raises(CertError, match="malformed DER at offset"):
        names_of(build_cert(subject=name((OID_CN, tag, raw))))


def test_undecodable_common_name_does_not_matter_when_there_is_a_san() -> None:
    cert = build_cert(subject=name((OID_CN, 0x0C, b"\xff")), extensions=[san(dns(b"ok.test"))])
    assert names_of(cert) == ("ok.test",)


def test_san_extension_details() -> None:
    other = [ext(OID_BASIC_CONSTRAINTS, seq(), critical=True)]
    ip = tlv(0x87, b"\x7f\x00\x00\x01")
    email = tlv(0x81, b"a@b.test")
    other_name = tlv(0xA0, b"\x06\x01\x01" + tlv(0xA0, tlv(0x0C, b"x")))
    cert = build_cert(extensions=other + [san(ip, email, dns(b"One.Test"), other_name, dns(b""), dns(b"two.test"))])
    assert names_of(cert) == ("one.test", "two.test")
    assert names_of(build_cert(extensions=[ext(OID_SAN, seq(dns(b"c.test")), critical=False)])) == ("c.test",)


def test_empty_san_means_no_names_and_no_cn_fallback() -> None:
    assert names_of(build_cert(extensions=[ext(OID_SAN, seq())])) == ()
    assert names_of(build_cert(extensions=[san(tlv(0x87, b"\x0a\x00\x00\x01"))])) == ()


def test_other_extensions_only_falls_back_to_cn() -> None:
    assert names_of(build_cert(extensions=[ext(OID_BASIC_CONSTRAINTS, seq())])) == ("built.example",)
    assert names_of(build_cert(extensions=[])) == ("built.example",)


def test_unique_ids_before_extensions() -> None:
    uids = tlv(0x81, b"\x00\x01") + tlv(0x82, b"\x00\x02")
    assert names_of(build_cert(tbs_extra=uids, extensions=[san(dns(b"u.test"))])) == ("u.test",)
    assert names_of(build_cert(tbs_extra=tlv(0xA2, b""), extensions=[san(dns(b"u.test"))])) == ("u.test",)


def test_long_form_lengths() -> None:
    long_name = b"l" * 60 + b"." + b"m" * 60 + b"." + b"n" * 60 + b".test"  # > 127 bytes: long-form lengths
    assert names_of(build_cert(extensions=[san(dns(long_name))])) == (long_name.decode(),)
    # a non-minimal (but definite) long-form length is tolerated
    cert = build_cert(extensions=[san(b"\x82\x81\x06" + b"w.test")])
    assert names_of(cert) == ("w.test",)


@pytest.mark.parametrize(
    "der, match",
    [
        (build_cert(extensions=[san(dns(b"a.test")), san(dns(b"b.test"))]), "more than one subjectAltName"),
        (build_cert(extensions=[san(dns("é.test".encode()))]), "dNSName is not ASCII"),
        (build_cert(tail=b"\x00"), "trailing data after the Certificate"),
        (build_cert(tbs_extra=tlv(0x02, b"\x01")), "unexpected element"),
        (build_cert(tbs_extra=tlv(0x82, b"") + tlv(0x81, b"")), "unexpected element"),
        (build_cert(tbs_extra=tlv(0xA3, seq()), extensions=[]), "unexpected element"),  # two [3]
        (build_cert(extensions=[seq(OID_SAN, tlv(0x01, b"\xff\xff"), tlv(0x04, seq()))]), "BOOLEAN"),
        (build_cert(extensions=[seq(OID_SAN, tlv(0x02, b"\x01"))]), "extnValue"),
        (build_cert(extensions=[seq(OID_SAN, tlv(0x04, seq()), tlv(0x05, b""))]), "after an extnValue"),
        (build_cert(extensions=[ext(OID_SAN, seq() + b"\x05\x00")]), "after the subjectAltName"),
        (build_cert(extensions=[ext(OID_SAN, b"\x04\x00")]), "GeneralNames"),
        (build_cert(subject=seq(tlv(0x30, b""))), "RelativeDistinguishedName"),
        (build_cert(subject=seq(tlv(0x31, seq(OID_CN)))), "expected an element, found the end"),
        (build_cert(subject=seq(tlv(0x31, seq(OID_CN, tlv(0x0C, b"a"), tlv(0x0C, b"b"))))), "attribute value"),
        (build_cert(extensions=[san(b"\x9f\x22\x01x")]), "high-tag-number"),
        (build_cert(extensions=[san(b"\x82\x80" + b"a.test\x00\x00")]), "indefinite length"),
        (build_cert(extensions=[san(b"\x82\x85\x00\x00\x00\x00\x06a.test")]), "too long"),
        (seq(seq(), ALG, tlv(0x03, b"\x00")), "expected the serialNumber INTEGER, found the end"),
        (seq(seq(tlv(0x02, b"\x01"))), "signatureAlgorithm"),
        (tlv(0x31, b""), "Certificate SEQUENCE"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_built_certificates(der: bytes, match: str) -> None:
    with pytest.raises(CertError, match="malformed DER at offset [0-9]+: .*" + match):
        names_of(der)


# ---- malformed input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
     b"-----BEGIN TRUSTED CERTIFICATE-----\nAAAA\n-----END TRUSTED CERTIFICATE-----\n"],
)  # fmt: skip
def test_no_certificate(data: bytes) -> None:
    with pytest.raises(CertError, match="no certificate in the PEM data"):
        first_cert_der(data)
    with pytest.raises(CertError, match="no certificate in the PEM data"):
        cert_names(data)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "no '-----END CERTIFICATE-----'"),
        (b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "empty"),
        (b"-----BEGIN CERTIFICATE-----\nMII*\n-----END CERTIFICATE-----\n", "invalid base64"),
        (b"-----BEGIN CERTIFICATE-----\nMIIBx\n-----END CERTIFICATE-----\n", "invalid base64"),
        (b"-----BEGIN CERTIFICATE-----\nMI\xc3\xa9B\n-----END CERTIFICATE-----\n", "invalid base64"),
    ],
)
def test_bad_pem_block(data: bytes, match: str) -> None:
    with pytest.raises(CertError, match=match):
        cert_names(data)


def test_cert_error_is_a_value_error() -> None:
    assert issubclass(CertError, ValueError)


def test_every_truncation_is_rejected(certs: Certs) -> None:
    der = first_cert_der(certs.ec_san.read_bytes())
    for n in range(1, len(der)):  # (zero bytes is the empty PEM block, tested above)
        with pytest.raises(CertError, match="malformed DER at offset"):
            names_of(der[:n])


def test_length_pointing_past_the_end(certs: Certs) -> None:
    der = bytearray(first_cert_der(certs.ec_san.read_bytes()))
    assert der[0] == 0x30 and der[1] == 0x82  # Certificate SEQUENCE, two length bytes
    der[2:4] = (int.from_bytes(der[2:4], "big") + 1).to_bytes(2, "big")
    with pytest.raises(CertError, match="malformed DER at offset 0: length .* runs past the end"):
        names_of(bytes(der))
    # the same inside: make the tbsCertificate claim one byte more than the Certificate holds
    der = bytearray(first_cert_der(certs.ec_san.read_bytes()))
    assert der[4] == 0x30 and der[5] == 0x82
    der[6:8] = (int.from_bytes(der[6:8], "big") + 500).to_bytes(2, "big")
    with pytest.raises(CertError, match="malformed DER at offset 4: length .* runs past the end"):
        names_of(bytes(der))


def _names_or_cert_error(der: bytes) -> None:
    try:
        result = names_of(der)
    except CertError as exc:
        assert str(exc)
    else:
        assert isinstance(result, tuple) and all(isinstance(n, str) for n in result)


@pytest.mark.parametrize("value", [0x00, 0x01, 0x1F, 0x30, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xFF])
def test_every_byte_overwritten(certs: Certs, value: int) -> None:
    for cert in (certs.ec_san, certs.cn_only):
        der = first_cert_der(cert.read_bytes())
        for i in range(len(der)):
            _names_or_cert_error(der[:i] + bytes([value]) + der[i + 1 :])


_BUILT_BASE: List[bytes] = []


def _built_base() -> bytes:
    """A hand-built certificate with what openssl's do not have (several CN string types, a critical extension,
    a unique id, an IP entry in the SAN), so mutations reach every branch of the reader. Made once."""
    if not _BUILT_BASE:
        subject = name((OID_O, 0x13, b"Org"), (OID_CN, 0x1E, "x.test".encode("utf-16-be")), (OID_CN, 0x14, b"y"))
        exts = [ext(OID_BASIC_CONSTRAINTS, seq(), True), san(dns(b"a.test"), tlv(0x87, b"\x01\x02\x03\x04"))]
        _BUILT_BASE.append(build_cert(subject=subject, extensions=exts, tbs_extra=tlv(0x81, b"\x00")))
    return _BUILT_BASE[0]


def _fuzz_base(certs: Certs, base: str) -> bytes:
    # (hypothesis does not mix with function-scoped fixtures; ``certs`` is module-scoped)
    if base == "built":
        return _built_base()
    return first_cert_der((certs.dir / (base + ".pem")).read_bytes())


@pytest.mark.parametrize("base", ["ec_san", "rsa", "built"])
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=6))
def test_fuzz_mutated_der(certs: Certs, base: str, mutations: List[Tuple[int, int]]) -> None:
    der = bytearray(_fuzz_base(certs, base))
    for pos, value in mutations:
        der[pos % len(der)] = value
    _names_or_cert_error(bytes(der))


@pytest.mark.parametrize("base", ["ec_san", "built"])
@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.binary(min_size=0, max_size=8), st.integers(min_value=0, max_value=8))
def test_fuzz_inserted_and_deleted_bytes(certs: Certs, base: str, pos: int, inserted: bytes, deleted: int) -> None:
    der = _fuzz_base(certs, base)
    at = pos % len(der)
    mutated = der[:at] + inserted + der[at + deleted :]
    if mutated:
        _names_or_cert_error(mutated)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _names_or_cert_error(data)
    _names_or_cert_error(b"\x30" + bytes([min(len(data), 0x7F)]) + data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_pem_text(data: bytes) -> None:
    for blob in (data, b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n"):
        try:
            result = cert_names(blob)
        except CertError:
            pass
        else:
            assert isinstance(result, tuple)


# ---- name matching -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern, server_name, expected",
    [
        # exact
        ("example.com", "example.com", True),
        ("a.test", "a.test", True),
        ("example.com", "example.org", False),
        ("example.com", "www.example.com", False),
        ("www.example.com", "example.com", False),
        # case
        ("Example.COM", "example.com", True),
        ("example.com", "EXAMPLE.com", True),
        ("*.Example.com", "WWW.example.COM", True),
        # wildcard covers exactly one label
        ("*.example.com", "a.example.com", True),
        ("*.b.test", "x.b.test", True),
        ("*.b.test", "xn--bcher-kva.b.test", True),
        # ... not two
        ("*.example.com", "a.b.example.com", False),
        # ... not the bare domain
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        # partial wildcards are not supported
        ("f*.example.com", "foo.example.com", False),
        ("*o.example.com", "foo.example.com", False),
        ("f*o.example.com", "foo.example.com", False),
        ("xn--*.example.com", "xn--a.example.com", False),
        # wildcard only as the left-most label
        ("www.*.com", "www.example.com", False),
        ("*.*.example.com", "a.b.example.com", False),
        ("a.example.*", "a.example.com", False),
        # no wildcard over a top-level domain
        ("*.com", "example.com", False),
        ("*", "localhost", False),
        # trailing dot
        ("example.com", "example.com.", True),
        ("*.example.com", "a.example.com.", True),
        ("example.com.", "example.com", True),
        ("example.com", "example.com..", False),
        # degenerate names
        ("", "", False),
        ("example.com", "", False),
        ("", "example.com", False),
        ("a..example.com", "a..example.com", False),
        ("*.example.com", "*.example.com", False),
        (".", ".", False),
    ],
)
def test_name_matches(pattern: str, server_name: str, expected: bool) -> None:
    assert name_matches(pattern, server_name) is expected


def test_names_from_a_certificate_match(certs: Certs) -> None:
    names = cert_names(certs.ec_san.read_bytes())
    assert any(name_matches(n, "A.Test") for n in names)
    assert any(name_matches(n, "www.b.test.") for n in names)
    assert not any(name_matches(n, "b.test") for n in names)
    assert not any(name_matches(n, "127.0.0.1") for n in names)
    assert not any(name_matches(n, "ignored.example") for n in names)
