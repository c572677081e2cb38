"""balrs ships as a single-file zipapp: build one from the package and run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_zipapp_runs_check_and_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "balrs", src / "balrs", ignore=shutil.ignore_patterns("__pycache__"))
    pyz = tmp_path / "balrs.pyz"
    zipapp.create_archive(src, pyz, main="balrs.cli:_main_entry")
    out = subprocess.run([sys.executable, str(pyz), "--version"], capture_output=True, text=True, timeout=30,
                         cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("balrs "), out
    good = subprocess.run([sys.executable, str(pyz), "--check", str(ROOT / "examples" / "lb.ini")],
                          capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert good.returncode == 0, good
    bad_ini = tmp_path / "bad.ini"
    bad_ini.write_text("[balancer]\nlisten = 127.0.0.1:1\nfrobnicate = 1\n[backend a]\naddress = 127.0.0.1:2\n")
    bad = subprocess.run([sys.executable, str(pyz), "--check", str(bad_ini)], capture_output=True, text=True,
                         timeout=30, cwd=str(tmp_path))
    assert bad.returncode == 2 and "bad.ini:3: [balancer] frobnicate" in bad.stderr, bad
