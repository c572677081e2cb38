"""The systemd unit and the logrotate stanza in examples/ are the ones docs/operations.md shows, and
they pass the tools' own checks where the tools exist (systemd-analyze verify, logrotate -d)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "examples" / "systemd" / "balrs.service"
LOGROTATE = ROOT / "examples" / "logrotate" / "balrs"


def test_docs_show_the_files_verbatim() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert UNIT.read_text() in doc
    assert LOGROTATE.read_text() in doc


def test_unit_reloads_with_sighup_after_a_check() -> None:
    lines = UNIT.read_text().splitlines()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert any(line.startswith("ExecReload=") and "--check" in line for line in lines)
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"):
        assert option in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "balrs.service" not in out.stderr, out.stderr  # no warning about our unit


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_debug_run(tmp_path: Path) -> None:
    conf = tmp_path / "balrs"
    conf.write_text(LOGROTATE.read_text())
    conf.chmod(0o644)
    out = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "error" not in (out.stderr + out.stdout).lower(), out.stderr + out.stdout
