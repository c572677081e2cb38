"""balrs: a Layer-7 (HTTP/1.1) load balancer in pure Python, standard library only.

Run it with ``python -m balrs lb.ini``. The package has no import-time side effects and
uses relative imports only, so it can be vendored as is.

This module and ``__main__.py`` parse on any Python down to 2.7 (no f-strings, no annotations,
no ``from __future__ import annotations``): on a Python older than 3.8 the import stops here,
before any other module of the package is read, with one line instead of a SyntaxError:

- run as a program (``python -m balrs``, ``python -m vendored.balrs``, a zipapp, or
  ``runpy.run_module``), it writes ``balrs needs Python 3.8 or newer (this is X.Y.Z)`` to stderr
  and exits 2, the status of every other start-up error;
- imported as a library, it raises ImportError with that line, which the importer can handle.
"""

import sys

__version__ = "0.1.0"
__all__ = ["__version__", "serve"]

MIN_PYTHON = (3, 8)


def too_old_message():
    # type: () -> str
    """The line balrs refuses an old Python with (the running version in it)."""
    return "balrs needs Python %d.%d or newer (this is %d.%d.%d)" % (MIN_PYTHON + tuple(sys.version_info[:3]))


def _run_as_program():
    # type: () -> bool
    """Whether this import is balrs being started as a program rather than imported as a library.

    ``python -m balrs`` and ``runpy.run_module("balrs")`` (the zipapp stub) import the package from
    runpy with ``mod_name`` naming it; a zipapp with a generated ``__main__.py`` is run by
    ``runpy._run_module_as_main("__main__")``. Anything else (``import balrs``) is a library import.
    """
    getframe = getattr(sys, "_getframe", None)
    frame = getframe(1) if getframe is not None else None
    while frame is not None:
        code = frame.f_code
        if "runpy" in code.co_filename and code.co_name in ("_run_module_as_main", "run_module"):
            target = frame.f_locals.get("mod_name")
            if target in (__name__, __name__ + ".__main__"):
                return True
            if code.co_name == "_run_module_as_main" and target == "__main__":
                return True
        frame = frame.f_back
    return False


if sys.version_info < (3, 8):  # MIN_PYTHON, written out so that type checkers see the floor
    if _run_as_program():
        sys.stderr.write(too_old_message() + "\n")
        raise SystemExit(2)
    raise ImportError(too_old_message())


def __getattr__(name):  # type: ignore[no-untyped-def]  # (untyped: this file parses on 2.7, see above)
    """``balrs.serve`` (PEP 562): the embedding API, ``embed.py``, is imported on first use, so that
    ``import balrs`` reads no other module and starts nothing (docs/embedding.md)."""
    if name == "serve":
        import importlib
        return importlib.import_module(__name__ + ".embed").serve
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
