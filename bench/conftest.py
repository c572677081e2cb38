"""pytest configuration for the benchmarks in bench/ (not collected by the default `tests` run)."""

import os
import sys

# `python -m pytest bench/...` from the repo root already has it via pyproject's pythonpath; this also
# makes `cd bench && pytest test_micro.py` work.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a micro-benchmark of a balrs hot-path function")
