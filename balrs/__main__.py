"""``python -m balrs``, and the entry point of a zipapp or vendored copy: ``balrs.__main__:main``.

Like ``__init__.py`` this module parses on Python 2.7 (no f-strings, no annotations, no ``from
__future__ import annotations``): an interpreter older than 3.8 has already been refused by the
package's ``__init__`` (one line on stderr, exit 2) before anything here runs.
"""

# main(argv=None): run the command line (default sys.argv[1:]) and exit with its status.
from .cli import _main_entry as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
