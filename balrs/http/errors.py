"""The one exception the HTTP layer raises."""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """A message broke HTTP/1.1 framing or syntax.

    ``status`` is the answer a server gives for it (400, 413, 414, 431, 501, 505, ...); for a backend's
    response the proxy answers 502 whatever the status says. ``message`` is for the log, never the wire.
    """

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return "%d %s" % (self.status, self.message)
