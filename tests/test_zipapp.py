"""balrs ships as a single-file zipapp: ``python -m balrs zipapp`` builds one reproducibly, and it runs
isolated (``python -I balrs.pyz``) on the interpreters balrs supports."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from support import REPO_ROOT, TestBackend, child_env, free_port, lb_ini, listens, request, wait_for

from balrs import pyz

PYENV = Path("/root/.pyenv/versions")
# Interpreters to run the zipapp with, besides the one running the tests (skipped when absent).
OTHER_PYTHONS = [PYENV / v / "bin" / "python" for v in ("3.9.18", "3.13.0")]


def _build(out: Path, *extra: str, cwd: Path = REPO_ROOT, python: str = sys.executable,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([python, "-m", "balrs", "zipapp", "-o", str(out), *extra], capture_output=True,
                       text=True, timeout=60, cwd=str(cwd), env=env or child_env())
    assert p.returncode == 0, p
    return p


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pyz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pyz") / "balrs.pyz"
    _build(out)
    return out


def test_two_builds_are_the_same_bytes(pyz_file: Path, tmp_path: Path) -> None:
    time.sleep(1.1)  # a timestamp would show
    second = tmp_path / "again.pyz"
    p = _build(second)
    assert _sha(second) == _sha(pyz_file)
    assert p.stdout.split() == [_sha(second), str(second)]  # it prints the sha256 it wrote


def test_source_date_epoch_sets_every_timestamp(tmp_path: Path) -> None:
    env = dict(child_env(), SOURCE_DATE_EPOCH="1700000000")  # 2023-11-14 22:13:20 UTC
    out = tmp_path / "dated.pyz"
    _build(out, env=env)
    with zipfile.ZipFile(out) as z:
        assert {i.date_time for i in z.infolist()} == {(2023, 11, 14, 22, 13, 20)}
    again = tmp_path / "dated2.pyz"
    _build(again, env=env)
    assert _sha(out) == _sha(again)


def test_archive_layout(pyz_file: Path) -> None:
    data = pyz_file.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(pyz_file).st_mode & 0o777 == 0o755
    with zipfile.ZipFile(pyz_file) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == sorted(i.filename for i in infos)
        assert infos[0].filename == "__main__.py"
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        files = [i for i in infos if not i.is_dir()]
        dirs = [i.filename for i in infos if i.is_dir()]
        assert {i.external_attr >> 16 for i in files} == {0o100644}
        assert {i.external_attr >> 16 for i in infos if i.is_dir()} == {0o40755}
        expected = sorted("balrs/%s" % p.relative_to(REPO_ROOT / "balrs").as_posix()
                          for p in (REPO_ROOT / "balrs").rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts
                          and (p.suffix == ".py" or p.name == "py.typed"))
        assert [i.filename for i in files[1:]] == expected
        # zipimport needs a directory entry to import a namespace package such as balrs/http
        assert "balrs/" in dirs and "balrs/http/" in dirs and "balrs/proxy/" in dirs
        for name in expected:
            assert z.read(name) == (REPO_ROOT / name).read_bytes()
        stub = z.read("__main__.py")
    assert stub == pyz.MAIN_STUB
    # Python 2.7 must be able to parse the stub, so that it reaches balrs' own version message: no
    # syntax, and no name, that 2.7 lacks.
    code = stub.decode("ascii")
    assert "runpy.run_module(\"balrs\", run_name=\"__main__\")" in code
    for newer in ("f\"", "f'", ":=", "->", "async", "nonlocal", "print("):
        assert newer not in code


def test_rebuilt_from_the_zipapp_itself(pyz_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-pyz.pyz"
    p = subprocess.run([sys.executable, "-I", str(pyz_file), "zipapp", "-o", str(out)], capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path))
    assert p.returncode == 0, p
    assert _sha(out) == _sha(pyz_file)


def test_compressed_build(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pyz", tmp_path / "b.pyz"
    _build(a, "--compress")
    _build(b, "--compress")
    assert _sha(a) == _sha(b)
    with zipfile.ZipFile(a) as z:
        assert {i.compress_type for i in z.infolist() if not i.is_dir()} == {zipfile.ZIP_DEFLATED}
    p = subprocess.run([sys.executable, "-I", str(a), "--version"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("balrs "), p


def test_build_in_memory_is_deterministic() -> None:
    files = [("balrs/b.py", b"b"), ("balrs/__main__.py", b"m"), ("balrs/a.py", b"a")]
    one, two = io.BytesIO(), io.BytesIO()
    pyz.build(one, files)
    pyz.build(two, list(reversed(files)))
    assert one.getvalue() == two.getvalue()
    with zipfile.ZipFile(io.BytesIO(one.getvalue()[len(pyz.SHEBANG):])) as z:
        assert z.namelist() == ["__main__.py", "balrs/", "balrs/__main__.py", "balrs/a.py", "balrs/b.py"]


def test_source_date_epoch_parsing() -> None:
    assert pyz._timestamp(None) == pyz.ZIP_EPOCH
    assert pyz._timestamp("0") == pyz.ZIP_EPOCH  # clamped to 1980
    assert pyz._timestamp("1700000001") == (2023, 11, 14, 22, 13, 20)  # zip seconds are even
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH"):
        pyz._timestamp("yesterday")


def test_help_and_bad_output(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "balrs", "zipapp", "--help"], capture_output=True, text=True,
                       timeout=30, cwd=str(REPO_ROOT), env=child_env())
    assert p.returncode == 0 and "balrs zipapp" in p.stdout and "-o" in p.stdout, p
    p = subprocess.run([sys.executable, "-m", "balrs", "zipapp", "-o", str(tmp_path / "no" / "such" / "x.pyz")],
                       capture_output=True, text=True, timeout=30, cwd=str(REPO_ROOT), env=child_env())
    assert p.returncode == 1 and p.stderr.startswith("balrs zipapp: "), p


@pytest.mark.parametrize("python", [Path(sys.executable)] + OTHER_PYTHONS, ids=lambda p: p.parent.parent.name)
def test_runs_isolated(pyz_file: Path, tmp_path: Path, python: Path) -> None:
    if not python.exists():
        pytest.skip("%s is not installed" % python)
    run = [str(python), "-I", str(pyz_file)]
    out = subprocess.run(run + ["--version"], capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("balrs "), out
    good = subprocess.run(run + ["--check", str(REPO_ROOT / "examples" / "lb.ini")], capture_output=True,
                          text=True, timeout=30, cwd=str(tmp_path))
    assert good.returncode == 0 and "configuration OK" in good.stdout, good
    bad_ini = tmp_path / "bad.ini"
    bad_ini.write_text("[balancer]\nlisten = 127.0.0.1:1\nfrobnicate = 1\n[backend a]\naddress = 127.0.0.1:2\n")
    bad = subprocess.run(run + ["--check", str(bad_ini)], capture_output=True, text=True, timeout=30,
                         cwd=str(tmp_path))
    assert bad.returncode == 2 and "bad.ini:3: [balancer] frobnicate" in bad.stderr, bad


def test_too_old_pythons_get_the_version_message(pyz_file: Path) -> None:
    """The root __main__.py and balrs/__init__.py parse on 2.7: an old interpreter says why it stops."""
    ran = 0
    for version in ("2.7.18", "3.6.15"):
        python = PYENV / version / "bin" / "python"
        if not python.exists():
            continue
        p = subprocess.run([str(python), "-E", "-s", str(pyz_file), "--version"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, p
        assert p.stderr.strip() == "balrs needs Python 3.8 or newer (this is %s)" % version, p
        ran += 1
    if not ran:
        pytest.skip("no Python 2.7 or 3.6 installed")


def test_serves_a_request(pyz_file: Path, tmp_path: Path) -> None:
    """The real thing: ``python -I balrs.pyz lb.ini`` in front of a test backend, stopped by SIGTERM."""
    backend = TestBackend("z1")
    proc = None
    try:
        for _attempt in range(3):
            port = free_port()
            ini = tmp_path / "lb.ini"
            ini.write_text(lb_ini("127.0.0.1:%d" % port, [backend]))
            log = open(tmp_path / "lb.stderr", "wb")
            proc = subprocess.Popen([sys.executable, "-I", str(pyz_file), str(ini)], cwd=str(tmp_path),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            pid = proc.pid
            if wait_for(lambda: proc is not None and (proc.poll() is not None or listens(pid, port)), 15):
                if proc.poll() is None:
                    break
            proc = None
        assert proc is not None, (tmp_path / "lb.stderr").read_text()
        r = request(("127.0.0.1", port), target="/hello")
        assert r.status == 200 and r.json()["backend"] == "z1" and r.json()["target"] == "/hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        backend.stop()
