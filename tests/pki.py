"""A throwaway PKI for the TLS tests, made with the ``openssl`` command line (installed by .ci/run):
a CA, ECDSA P-256 leaf certificates signed by it (SANs DNS:NAME and IP:127.0.0.1), and a self-signed
"rogue" certificate for the same names that no one trusts. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["PKI", "have_openssl"]


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(args: List[str], cwd: Path) -> None:
    p = subprocess.run(["openssl"] + args, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, timeout=30)
    if p.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (args[0], p.stderr.decode("utf-8", "replace")[-400:]))


class PKI:
    def __init__(self, workdir: Path, names: tuple = ("a.test", "b.test")) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = workdir / "ca.crt"
        self.ca_key = workdir / "ca.key"
        _run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
              "-subj", "/CN=balrs test CA", "-keyout", str(self.ca_key), "-out", str(self.ca),
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             workdir)
        self.serials: Dict[str, int] = {}
        for i, name in enumerate(names):
            self.leaf(name, 1000 + i)
        self.rogue()

    def crt(self, name: str) -> Path:
        return self.dir / (name + ".crt")

    def key(self, name: str) -> Path:
        return self.dir / (name + ".key")

    def pem(self, name: str) -> Path:
        """Certificate and key in one file."""
        return self.dir / (name + ".pem")

    def leaf(self, name: str, serial: int, sans: Optional[str] = None) -> None:
        """(Re)issue NAME's certificate; files are replaced atomically (a reload never sees half)."""
        csr, ext = self.dir / (name + ".csr"), self.dir / (name + ".ext")
        ext.write_text("subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                       % (sans or "DNS:%s,IP:127.0.0.1" % name))
        key_new, crt_new = Path(str(self.key(name)) + ".new"), Path(str(self.crt(name)) + ".new")
        _run(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj",
              "/CN=%s" % name, "-keyout", str(key_new), "-out", str(csr)], self.dir)
        _run(["x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key), "-set_serial",
              str(serial), "-days", "2", "-extfile", str(ext), "-out", str(crt_new)], self.dir)
        self._install(name, crt_new, key_new)
        self.serials[name] = serial

    def rogue(self) -> None:
        key_new, crt_new = Path(str(self.key("rogue")) + ".new"), Path(str(self.crt("rogue")) + ".new")
        _run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
              "-subj", "/CN=a.test", "-addext", "subjectAltName=DNS:a.test,DNS:b.test,IP:127.0.0.1",
              "-keyout", str(key_new), "-out", str(crt_new)], self.dir)
        self._install("rogue", crt_new, key_new)

    def _install(self, name: str, crt: Path, key: Path) -> None:
        pem_new = Path(str(self.pem(name)) + ".new")
        pem_new.write_bytes(crt.read_bytes() + key.read_bytes())
        os.replace(str(crt), str(self.crt(name)))
        os.replace(str(key), str(self.key(name)))
        os.replace(str(pem_new), str(self.pem(name)))

    # ---- contexts ----
    def client_ctx(self, verify: bool = True, **versions: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca)) if verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if "min_version" in versions:
            ctx.minimum_version = versions["min_version"]
        if "max_version" in versions:
            ctx.maximum_version = versions["max_version"]
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def server_ctx(self, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.crt(name)), str(self.key(name)))
        return ctx
