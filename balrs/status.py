"""``python -m balrs status [ADMIN_ADDR]``: a table of backends from the admin endpoint's /status.

(Lands with the admin change.)
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    sys.stderr.write("balrs status: not available yet\n")
    return 2
