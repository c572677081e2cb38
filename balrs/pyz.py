"""``python -m balrs zipapp [-o balrs.pyz]``: balrs as one reproducible, runnable file.

The archive is built entry by entry with ``zipfile`` rather than with ``zipapp.create_archive``, so
that nothing about the build machine or the moment leaks into its bytes (the same source gives the
same sha256, the idea of reproducible-builds.org):

- the entries are ``balrs/**/*.py`` and ``balrs/py.typed`` (no ``__pycache__``, nothing else), their
  directories, and a root ``__main__.py``, in sorted order;
- every entry has the same timestamp: ``SOURCE_DATE_EPOCH`` when it is set (the reproducible-builds
  convention, clamped to 1980, the earliest a zip can hold), else 1980-01-01 00:00;
- every file entry has mode 0644 (directories 0755) made on "Unix", whatever the file system says;
- entries are stored, not deflated, by default: deflate output depends on the zlib build (zlib-ng
  and zlib differ), storing does not. ``--compress`` deflates (smaller; reproducible with the same zlib).

The root ``__main__.py`` is a stub any Python parses (2.7 included) that runs ``balrs/__main__.py``, so a
too-old interpreter gets balrs' own version message rather than a SyntaxError. The archive starts with
``#!/usr/bin/env python3`` and is written executable, through a temporary file and a rename.

Run from a zipapp, the command rebuilds it from the archive it runs from (same bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from typing import IO, List, Optional, Sequence, Tuple

__all__ = ["main", "build", "sources", "MAIN_STUB", "SHEBANG"]

SHEBANG = b"#!/usr/bin/env python3\n"
# The archive's entry point. No syntax newer than Python 2.7: balrs/__main__.py checks the version.
MAIN_STUB = (
    b'"""balrs zipapp entry point: runs balrs/__main__.py, which checks the Python version first."""\n'
    b"import runpy\n"
    b'runpy.run_module("balrs", run_name="__main__")\n'
)
# The earliest timestamp a zip entry can hold (MS-DOS dates start in 1980).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Entries are regular files, rw-r--r-- (the high 16 bits of external_attr are the Unix mode).
ENTRY_MODE = 0o100644
DIR_MODE = 0o40755  # and directories rwxr-xr-x
_UNIX = 3  # ZipInfo.create_system: "made on Unix", so the mode bits above are read

# The package's own name inside the archive (and the directory it is read from).
PACKAGE = "balrs"


def _timestamp(env: Optional[str]) -> Tuple[int, int, int, int, int, int]:
    """SOURCE_DATE_EPOCH (seconds, UTC) as a zip date, clamped to 1980..2107; ZIP_EPOCH without it."""
    if not env:
        return ZIP_EPOCH
    try:
        seconds = int(env)
    except ValueError:
        raise ValueError("SOURCE_DATE_EPOCH=%r is not a whole number of seconds" % env) from None
    t = time.gmtime(min(max(seconds, 315532800), 4354819199))  # 1980-01-01 .. 2107-12-31 (the zip limits)
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec - t.tm_sec % 2)


def _wanted(relpath: str) -> bool:
    """A package file the zipapp carries: Python sources and the PEP 561 marker."""
    parts = relpath.split("/")
    if any(p == "__pycache__" or p.startswith(".") for p in parts):
        return False
    return relpath.endswith(".py") or relpath == "py.typed"


def sources(package_dir: Optional[str] = None) -> List[Tuple[str, bytes]]:
    """(archive name, bytes) of every package file, sorted by name. Read from ``package_dir`` (default:
    this package's directory), or from the zipapp this module was imported from."""
    here = package_dir if package_dir is not None else os.path.dirname(os.path.abspath(__file__))
    out: List[Tuple[str, bytes]] = []
    if os.path.isdir(here):
        for root, dirs, files in os.walk(here):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, here).replace(os.sep, "/")
                if _wanted(rel) and os.path.isfile(path):
                    with open(path, "rb") as f:
                        out.append(("%s/%s" % (PACKAGE, rel), f.read()))
    else:
        archive = getattr(globals().get("__loader__"), "archive", None)  # zipimport's loader
        if not archive:
            raise OSError("cannot find the balrs sources (%s is neither a directory nor in a zip)" % here)
        prefix = PACKAGE + "/"
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(prefix) and _wanted(name[len(prefix):]):
                    out.append((name, z.read(name)))
    if not any(name == PACKAGE + "/__main__.py" for name, _ in out):
        raise OSError("no %s/__main__.py among the sources in %s" % (PACKAGE, here))
    out.sort()
    return out


def build(out: IO[bytes], files: Sequence[Tuple[str, bytes]], compress: bool = False,
          date_time: Tuple[int, int, int, int, int, int] = ZIP_EPOCH) -> None:
    """Write the zipapp (shebang, then the zip of ``files`` and the root __main__.py) to ``out``."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    entries = list(files) + [("__main__.py", MAIN_STUB)]
    # zipimport finds a namespace package (a directory without __init__.py, like balrs/http) only by
    # its directory entry ("balrs/http/"), so every directory gets one.
    dirs = {name[:i + 1] for name, _ in entries for i in range(len(name)) if name[i] == "/"}
    out.write(SHEBANG)
    with zipfile.ZipFile(out, "w") as z:
        for name, data in sorted(entries + [(d, b"") for d in dirs]):
            info = zipfile.ZipInfo(name, date_time)
            info.create_system = _UNIX
            is_dir = name.endswith("/")
            info.external_attr = (DIR_MODE << 16) | 0x10 if is_dir else ENTRY_MODE << 16  # 0x10: MS-DOS directory
            info.compress_type = zipfile.ZIP_STORED if is_dir else method
            # Level 9 whatever the zipfile default of the running Python (only used when compressing).
            z.writestr(info, data, compress_type=info.compress_type, compresslevel=9 if compress else None)


def write(path: str, compress: bool = False, package_dir: Optional[str] = None) -> str:
    """Build the zipapp into ``path`` (atomically: a temporary file, then a rename); mode 0755.
    Returns the sha256 of the file."""
    import hashlib
    import tempfile
    files = sources(package_dir)
    date_time = _timestamp(os.environ.get("SOURCE_DATE_EPOCH"))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".balrs-pyz-", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            build(f, files, compress, date_time)
            f.flush()
            f.seek(0)
            digest = hashlib.sha256(f.read()).hexdigest()
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return digest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="balrs zipapp",
        description="Write balrs as a single-file zipapp (run it with `python3 balrs.pyz lb.ini`). The "
                    "same source gives the same bytes: fixed timestamps (SOURCE_DATE_EPOCH if set), "
                    "sorted entries, fixed modes.",
    )
    p.add_argument("-o", "--output", default="balrs.pyz", metavar="PATH",
                   help="where to write the zipapp (default: balrs.pyz)")
    p.add_argument("--compress", action="store_true",
                   help="deflate the entries (smaller; the bytes then also depend on the zlib build)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        digest = write(args.output, args.compress)
    except (OSError, ValueError) as exc:
        sys.stderr.write("balrs zipapp: %s\n" % (getattr(exc, "strerror", None) or exc))
        return 1
    sys.stdout.write("%s  %s\n" % (digest, args.output))
    return 0
