"""The names a PEM certificate is valid for, read with a tiny DER reader, and RFC 6125 name matching.

Used to pick the certificate for a TLS SNI server name: :func:`cert_names` lists the DNS names of the first
certificate in a PEM file and :func:`name_matches` says whether one of them covers a server name. Python's
``ssl`` module can decode a *peer's* certificate but has no public API for a certificate file, so this module
reads just enough of the X.509 structure (RFC 5280) itself:

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE, signatureValue BIT STRING }
    TBSCertificate ::= SEQUENCE {
        version [0] EXPLICIT OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
        validity SEQUENCE, subject SEQUENCE (RDNSequence), subjectPublicKeyInfo SEQUENCE,
        issuerUniqueID [1] OPTIONAL, subjectUniqueID [2] OPTIONAL, extensions [3] EXPLICIT OPTIONAL }
    Extension ::= SEQUENCE { extnID OID, critical BOOLEAN OPTIONAL, extnValue OCTET STRING }

The reader accepts definite lengths only (short form, or long form with 1 to 4 length bytes), rejects
high-tag-number tags, and checks every element against the bounds of the element that encloses it, so any
malformed input ends in :class:`CertError` (a ``ValueError``) naming the offset in the DER, never in an
``IndexError`` or a ``UnicodeDecodeError``. Nothing here verifies signatures, validity dates or chains: that
is the TLS library's job once the certificate is loaded.
"""

from __future__ import annotations

import base64
import binascii
from typing import List, Optional, Tuple

__all__ = ["CertError", "cert_names", "first_cert_der", "name_matches"]

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"

# DER tags (universal, constructed where the type is).
_BOOLEAN = 0x01
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_SEQUENCE = 0x30
_SET = 0x31
_VERSION = 0xA0  # [0] EXPLICIT
_ISSUER_UID = (0x81, 0xA1)  # [1] IMPLICIT BIT STRING (primitive; constructed is BER, tolerated)
_SUBJECT_UID = (0x82, 0xA2)  # [2]
_EXTENSIONS = 0xA3  # [3] EXPLICIT
_DNS_NAME = 0x82  # GeneralName dNSName: [2] IMPLICIT IA5String

# Content octets of the OIDs we look for.
_OID_SUBJECT_ALT_NAME = b"\x55\x1d\x11"  # 2.5.29.17
_OID_COMMON_NAME = b"\x55\x04\x03"  # 2.5.4.3

# commonName string types -> codec.
_CN_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x14: "latin-1",  # TeletexString (T.61; latin-1 is what everyone uses in practice)
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


class CertError(ValueError):
    """The PEM data holds no certificate, or the certificate is not well-formed DER X.509."""


class _Tlv:
    """One DER element in ``data``: its tag, where it starts, and where its content starts and ends."""

    __slots__ = ("tag", "start", "body", "end")

    def __init__(self, tag: int, start: int, body: int, end: int) -> None:
        self.tag = tag
        self.start = start
        self.body = body
        self.end = end


def _malformed(offset: int, what: str) -> CertError:
    return CertError("malformed DER at offset %d: %s" % (offset, what))


def _read(data: bytes, pos: int, limit: int, what: str = "an element") -> _Tlv:
    """The element at ``pos``, which must lie wholly before ``limit`` (the end of the enclosing element)."""
    if pos >= limit:
        raise _malformed(pos, "expected %s, found the end of the enclosing element" % what)
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _malformed(pos, "high-tag-number form (tag byte 0x%02x) is not supported" % tag)
    if pos + 1 >= limit:
        raise _malformed(pos, "truncated element: no length byte")
    first = data[pos + 1]
    body = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _malformed(pos, "indefinite length is not allowed in DER")
    else:
        count = first & 0x7F
        if count > 4:
            raise _malformed(pos, "length of %d bytes is too long" % count)
        if body + count > limit:
            raise _malformed(pos, "truncated element: length bytes run past the end of the enclosing element")
        length = int.from_bytes(data[body : body + count], "big")
        body += count
    end = body + length
    if end > limit:
        raise _malformed(
            pos, "length %d runs past the end of the enclosing element (%d bytes left)" % (length, limit - body)
        )
    return _Tlv(tag, pos, body, end)


def _expect(data: bytes, pos: int, limit: int, tag: int, what: str) -> _Tlv:
    tlv = _read(data, pos, limit, what)
    if tlv.tag != tag:
        raise _malformed(pos, "expected %s (tag 0x%02x), found tag 0x%02x" % (what, tag, tlv.tag))
    return tlv


def _only_child(data: bytes, parent: _Tlv, tag: int, what: str) -> _Tlv:
    """The single element that makes up ``parent``'s whole content."""
    child = _expect(data, parent.body, parent.end, tag, what)
    if child.end != parent.end:
        raise _malformed(child.end, "unexpected data after %s" % what)
    return child


def first_cert_der(pem: bytes) -> bytes:
    """The DER bytes of the first '-----BEGIN CERTIFICATE-----' block (ssl.PEM_cert_to_DER_cert semantics, but
    tolerant of other PEM blocks before/after it, e.g. a private key in the same file, and CRLF line ends)."""
    begin = pem.find(_PEM_BEGIN)
    if begin < 0:
        raise CertError("no certificate in the PEM data")
    body_start = begin + len(_PEM_BEGIN)
    end = pem.find(_PEM_END, body_start)
    if end < 0:
        raise CertError("certificate PEM block has no '-----END CERTIFICATE-----' line")
    body = b"".join(pem[body_start:end].split())  # drop all whitespace: LF, CRLF, indentation
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertError("invalid base64 in the certificate PEM block: %s" % exc) from None
    if not der:
        raise CertError("empty certificate PEM block")
    return der


def _subject_common_names(data: bytes, subject: _Tlv) -> List[Tuple[int, int, int]]:
    """(string tag, start, end) of every commonName value in the RDNSequence ``subject``, in order."""
    found: List[Tuple[int, int, int]] = []
    pos = subject.body
    while pos < subject.end:
        rdn = _expect(data, pos, subject.end, _SET, "a RelativeDistinguishedName SET")
        apos = rdn.body
        while apos < rdn.end:
            atv = _expect(data, apos, rdn.end, _SEQUENCE, "an AttributeTypeAndValue SEQUENCE")
            oid = _expect(data, atv.body, atv.end, _OID, "an attribute type OID")
            value = _read(data, oid.end, atv.end)
            if value.end != atv.end:
                raise _malformed(value.end, "unexpected data after an attribute value")
            if data[oid.body : oid.end] == _OID_COMMON_NAME:
                found.append((value.tag, value.body, value.end))
            apos = atv.end
        pos = rdn.end
    return found


def _decode_common_name(data: bytes, tag: int, start: int, end: int) -> str:
    codec = _CN_CODECS.get(tag)
    if codec is None:
        raise _malformed(start, "unsupported string type (tag 0x%02x) for commonName" % tag)
    try:
        return data[start:end].decode(codec)
    except UnicodeDecodeError as exc:
        raise _malformed(start, "commonName is not valid %s: %s" % (codec, exc.reason)) from None


def _san_dns_names(data: bytes, value: _Tlv) -> List[str]:
    """The dNSName entries of the GeneralNames inside the subjectAltName extnValue OCTET STRING ``value``."""
    names = _expect(data, value.body, value.end, _SEQUENCE, "a GeneralNames SEQUENCE")
    if names.end != value.end:
        raise _malformed(names.end, "unexpected data after the subjectAltName GeneralNames")
    out: List[str] = []
    pos = names.body
    while pos < names.end:
        name = _read(data, pos, names.end)  # any GeneralName; only dNSName is kept (not IP, URI, email...)
        if name.tag == _DNS_NAME:
            try:
                text = data[name.body : name.end].decode("ascii")
            except UnicodeDecodeError:
                raise _malformed(name.body, "dNSName is not ASCII") from None
            if text:  # an empty dNSName names nothing
                out.append(text.lower())
        pos = name.end
    return out


def _extensions_san(data: bytes, wrapper: _Tlv) -> Optional[List[str]]:
    """The SAN dNSNames from the ``[3]`` extensions wrapper, or None if there is no subjectAltName extension."""
    exts = _only_child(data, wrapper, _SEQUENCE, "the Extensions SEQUENCE")
    san: Optional[List[str]] = None
    pos = exts.body
    while pos < exts.end:
        ext = _expect(data, pos, exts.end, _SEQUENCE, "an Extension SEQUENCE")
        oid = _expect(data, ext.body, ext.end, _OID, "an extnID OID")
        nxt = _read(data, oid.end, ext.end)
        if nxt.tag == _BOOLEAN:
            if nxt.end - nxt.body != 1:
                raise _malformed(nxt.start, "the critical BOOLEAN must be one byte long")
            nxt = _read(data, nxt.end, ext.end)
        if nxt.tag != _OCTET_STRING:
            raise _malformed(nxt.start, "expected the extnValue OCTET STRING, found tag 0x%02x" % nxt.tag)
        if nxt.end != ext.end:
            raise _malformed(nxt.end, "unexpected data after an extnValue")
        if data[oid.body : oid.end] == _OID_SUBJECT_ALT_NAME:
            if san is not None:
                raise _malformed(ext.start, "more than one subjectAltName extension")
            san = _san_dns_names(data, nxt)
        pos = ext.end
    return san


def _der_names(der: bytes) -> Tuple[str, ...]:
    cert = _expect(der, 0, len(der), _SEQUENCE, "the Certificate SEQUENCE")
    if cert.end != len(der):
        raise _malformed(cert.end, "trailing data after the Certificate")
    tbs = _expect(der, cert.body, cert.end, _SEQUENCE, "the tbsCertificate SEQUENCE")
    alg = _expect(der, tbs.end, cert.end, _SEQUENCE, "the signatureAlgorithm SEQUENCE")
    sig = _expect(der, alg.end, cert.end, _BIT_STRING, "the signatureValue BIT STRING")
    if sig.end != cert.end:
        raise _malformed(sig.end, "unexpected data after the signatureValue")

    pos = tbs.body
    first = _read(der, pos, tbs.end, "the serialNumber INTEGER")
    if first.tag == _VERSION:
        _only_child(der, first, _INTEGER, "the version INTEGER")
        pos = first.end
    serial = _expect(der, pos, tbs.end, _INTEGER, "the serialNumber INTEGER")
    signature = _expect(der, serial.end, tbs.end, _SEQUENCE, "the signature AlgorithmIdentifier SEQUENCE")
    issuer = _expect(der, signature.end, tbs.end, _SEQUENCE, "the issuer Name SEQUENCE")
    validity = _expect(der, issuer.end, tbs.end, _SEQUENCE, "the validity SEQUENCE")
    subject = _expect(der, validity.end, tbs.end, _SEQUENCE, "the subject Name SEQUENCE")
    spki = _expect(der, subject.end, tbs.end, _SEQUENCE, "the subjectPublicKeyInfo SEQUENCE")
    common_names = _subject_common_names(der, subject)

    # The optional tail, each at most once and in this order: [1] issuerUniqueID, [2] subjectUniqueID,
    # [3] extensions.
    san: Optional[List[str]] = None
    stage = 0
    pos = spki.end
    while pos < tbs.end:
        item = _read(der, pos, tbs.end)
        if item.tag in _ISSUER_UID and stage < 1:
            stage = 1
        elif item.tag in _SUBJECT_UID and stage < 2:
            stage = 2
        elif item.tag == _EXTENSIONS and stage < 3:
            stage = 3
            san = _extensions_san(der, item)
        else:
            raise _malformed(pos, "unexpected element (tag 0x%02x) in tbsCertificate" % item.tag)
        pos = item.end

    if san is not None:
        return tuple(san)
    return tuple(_decode_common_name(der, tag, start, end).lower() for tag, start, end in common_names)


def cert_names(pem: bytes) -> Tuple[str, ...]:
    """The DNS names of the first certificate: its subjectAltName dNSName entries (lowercased, in order), or,
    only if it has no subjectAltName extension at all, its subject commonName(s) (lowercased). IP address SAN
    entries are NOT included (SNI carries host names only). Raises CertError on anything malformed.

    Empty dNSName entries are skipped. A certificate whose subjectAltName holds no dNSName (only IP addresses,
    say) has no DNS names: the commonName is not consulted then (RFC 6125 section 6.4.4).
    """
    return _der_names(first_cert_der(pem))


def _labels(name: str) -> Optional[List[str]]:
    """The lowercased labels of ``name`` without one trailing dot, or None if it is empty or has an empty label."""
    if name.endswith("."):
        name = name[:-1]
    labels = name.lower().split(".")
    if not all(labels):
        return None
    return labels


def name_matches(pattern: str, server_name: str) -> bool:
    """RFC 6125 section 6.4.3 matching, the way browsers do it: case-insensitive; a wildcard only as the whole
    left-most label ("*.example.com" matches "a.example.com", not "example.com" nor "a.b.example.com";
    "f*.example.com" partial wildcards are not supported: treat as no match); a trailing dot on server_name is
    ignored.

    Also, as browsers do: a trailing dot on ``pattern`` is ignored too; a wildcard needs at least two labels after
    it ("*.com" matches nothing); names with empty labels ("a..b", "") match nothing, and a server name that
    itself contains "*" matches nothing.
    """
    want = _labels(pattern)
    have = _labels(server_name)
    if want is None or have is None or "*" in server_name:
        return False
    if "*" not in pattern:
        return want == have
    if want[0] != "*" or any("*" in label for label in want[1:]) or len(want) < 3:
        return False
    return len(have) == len(want) and have[1:] == want[1:]
