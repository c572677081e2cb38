"""The Python floor (3.8): older interpreters get one line and exit 2, down to 2.7.

Runs each interpreter pyenv has (``$PYENV_ROOT/versions/X.Y.*/bin/python``) and skips those that are
missing, so a machine with only the system Python runs the current-interpreter cases alone.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipapp
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYENV = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
TOO_OLD = ["2.7", "3.6", "3.7"]
SUPPORTED = ["3.8", "3.13"]


def interpreter(version: str) -> Optional[str]:
    found = sorted(glob.glob(str(PYENV / "versions" / (version + ".*") / "bin" / "python")))
    return found[-1] if found else None


def need(version: str) -> str:
    python = interpreter(version)
    if python is None:
        pytest.skip("no Python %s under %s" % (version, PYENV))
    return python


def run(python: str, args: List[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # Python 2.7 would leave .pyc files beside the sources
    return subprocess.run([python] + args, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=30)


def full_version(python: str) -> str:
    out = run(python, ["-c", "import sys; sys.stdout.write('%d.%d.%d' % sys.version_info[:3])"], ROOT)
    return out.stdout


def copy_package(dest: Path) -> None:
    shutil.copytree(ROOT / "balrs", dest / "balrs", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zipapp (entry ``balrs.__main__:main``) and a vendored copy (``vendor/balrs``) of the package."""
    base = tmp_path_factory.mktemp("layouts")
    copy_package(base / "src")
    zipapp.create_archive(base / "src", base / "balrs.pyz", main="balrs.__main__:main")
    (base / "app" / "vendor").mkdir(parents=True)
    (base / "app" / "vendor" / "__init__.py").write_text("")  # a package on Python 2.7 too
    copy_package(base / "app" / "vendor")
    return base


def entry_points(layouts: Path) -> List[tuple]:
    return [
        (["-m", "balrs", "--version"], ROOT),
        ([str(layouts / "balrs.pyz"), "--version"], layouts),
        (["-m", "vendor.balrs", "--version"], layouts / "app"),
        (["-c", "import runpy; runpy.run_module('balrs', run_name='__main__')", "--version"], ROOT),
    ]


@pytest.mark.parametrize("version", TOO_OLD)
def test_too_old_python_gets_one_line_and_exit_2(version: str, layouts: Path) -> None:
    python = need(version)
    line = "balrs needs Python 3.8 or newer (this is %s)\n" % full_version(python)
    for args, cwd in entry_points(layouts):
        out = run(python, args, cwd)
        assert (out.returncode, out.stderr, out.stdout) == (2, line, ""), (args, out)


@pytest.mark.parametrize("version", TOO_OLD)
def test_too_old_python_import_raises_import_error(version: str) -> None:
    python = need(version)
    out = run(python, ["-c", "import balrs"], ROOT)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last == "ImportError: balrs needs Python 3.8 or newer (this is %s)" % (
        full_version(python)), out
    caught = run(python, ["-c", "try:\n import balrs\nexcept ImportError as e:\n print(e)"], ROOT)
    assert caught.returncode == 0 and caught.stdout.startswith("balrs needs Python 3.8 or newer"), caught


@pytest.mark.parametrize("version", SUPPORTED + ["current"])
def test_supported_python_runs(version: str, layouts: Path) -> None:
    python = sys.executable if version == "current" else need(version)
    for args, cwd in entry_points(layouts):
        out = run(python, args, cwd)
        assert out.returncode == 0 and out.stdout.startswith("balrs "), (args, out)
    check = run(python, ["-m", "balrs", "--check", str(ROOT / "examples" / "lb.ini")], ROOT)
    assert check.returncode == 0, check
    imported = run(python, ["-c", "import balrs, balrs.config; print(balrs.__version__)"], ROOT)
    assert imported.returncode == 0 and imported.stdout.strip(), imported
