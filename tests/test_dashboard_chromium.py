"""The admin dashboard (``GET /``) in a real headless Chromium against a running balancer: the page loads
with no external asset, fills its live table from /status, shows a backend that health checks took
down as down, and a screenshot of it is saved.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it). Without it the test is skipped,
unless ``BALRS_REQUIRE_CHROMIUM=1`` (set by CI), which makes a missing browser a failure.
``BALRS_SCREENSHOT_DIR=DIR`` also copies the screenshot there (how docs/dashboard.png is made).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, List, Optional

import pytest
from support import TestBackend, lb_ini, request, start_config, wait_for


def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
if CHROMIUM is None and os.environ.get("BALRS_REQUIRE_CHROMIUM") == "1":
    raise RuntimeError("BALRS_REQUIRE_CHROMIUM=1 but no chromium on PATH")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--user-data-dir=%s" % profile, *args]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, cwd=str(tmp_path))


def test_dashboard_live_table_shows_a_down_backend(tmp_path: Path,
                                                   make_backend: Callable[..., TestBackend]) -> None:
    bs: List[TestBackend] = [make_backend("web-1"), make_backend("web-2"), make_backend("web-3")]

    def text_for(port: int, admin_port: Optional[int]) -> str:
        return (lb_ini("127.0.0.1:%d" % port, bs)
                + "\n[health]\npath = /health\ninterval = 200ms\ntimeout = 500ms\nrise = 1\nfall = 1\n"
                + "\n[admin]\nlisten = 127.0.0.1:%d\n" % admin_port)

    lb = start_config(tmp_path, text_for, name="dash", admin=True)
    try:
        assert lb.admin_addr is not None
        for i in range(30):
            assert request(lb.addr, "GET", "/echo?i=%d" % i).status == 200
        bs[1].stop()  # web-2 refuses connections from now on: the probes take it down

        def down() -> bool:
            assert lb.admin_addr is not None
            doc = request(lb.admin_addr, "GET", "/status").json()
            return any(b["name"] == "web-2" and b["state"] == "down" for b in doc["backends"])

        assert wait_for(down, 10), "health checks did not take web-2 down"
        url = "http://%s:%d/" % lb.admin_addr
        # The DOM after the page's scripts ran for 3 s of (virtual) time: the live table.
        out = _headless(tmp_path, "--virtual-time-budget=3000", "--dump-dom", url)
        dom = out.stdout.decode("utf-8", "replace")
        assert 'data-ready="1"' in dom, "the live table never rendered: %s" % out.stderr.decode()[-2000:]
        states = dict(re.findall(r'data-backend="([^"]+)" data-state="([^"]+)"', dom))
        assert states == {"web-1": "up", "web-2": "down", "web-3": "up"}, states
        assert 'class="state down"' in dom
        shot = tmp_path / "dashboard.png"
        out = _headless(tmp_path, "--virtual-time-budget=4000", "--window-size=1400,560",
                        "--hide-scrollbars", "--screenshot=%s" % shot, url)
        assert shot.is_file() and shot.stat().st_size > 10000, out.stderr.decode()[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        dest = os.environ.get("BALRS_SCREENSHOT_DIR")
        if dest:
            shutil.copy(shot, Path(dest) / "dashboard.png")
    finally:
        lb.stop()
