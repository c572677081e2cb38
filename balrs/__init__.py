"""balrs: a Layer-7 (HTTP/1.1) load balancer in pure Python, standard library only.

Run it with ``python -m balrs lb.ini``. The package has no import-time side effects and
uses relative imports only, so it can be vendored as is.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
