"""Traffic-policy state, sans-IO, on a clock the caller passes in (``now`` in seconds, monotonic):

- :class:`RetryBudget`: Envoy's retry budget. Retries are allowed while they stay within ``ratio`` of
  the requests of the last ``window`` seconds (counted in one-second slots, so a check is O(1)), and
  at least ``floor`` per second whatever the traffic, so a quiet service can still retry.
- :class:`ClientBuckets`: a token bucket per client address (``client_rate`` tokens per second, at
  most ``client_burst``), in an LRU of at most ``max_clients`` entries. A bucket that has refilled is
  the same as no bucket, so eviction takes only full ones; when every tracked client is active the new
  one is admitted untracked (counted in ``untracked``) rather than evicting a client that is being
  limited, which would hand it a fresh burst.
- :class:`ClientConnections`: concurrent connections per client address; an entry lives only while the
  client has a connection, so the table is bounded by the connections themselves.

Each operation is O(1), and none keeps a timer: the state moves on when it is next used.

The retry conditions of ``retry_on`` are bits (``RETRY_*``) so that a pool's set is one integer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

__all__ = ["RetryBudget", "ClientBuckets", "ClientConnections", "MAX_CLIENTS", "retry_mask",
           "RETRY_CONNECT", "RETRY_EMPTY", "RETRY_TIMEOUT", "RETRY_502", "RETRY_503", "RETRY_504", "RETRY_STATUS"]

MAX_CLIENTS = 100_000

# retry_on conditions as bits.
RETRY_CONNECT = 1   # connect refused, unreachable or timed out (nothing reached the backend)
RETRY_EMPTY = 2     # the backend closed (or reset) before sending any byte of a response
RETRY_TIMEOUT = 4   # backend_timeout expired before the response head
RETRY_502 = 8
RETRY_503 = 16
RETRY_504 = 32
# The bit of a response status (index status - 502), for 502..504.
RETRY_STATUS = (RETRY_502, RETRY_503, RETRY_504)
_RETRY_BITS = {"connect-failure": RETRY_CONNECT, "empty-response": RETRY_EMPTY, "timeout": RETRY_TIMEOUT,
               "502": RETRY_502, "503": RETRY_503, "504": RETRY_504}


def retry_mask(conditions: "tuple[str, ...]") -> int:
    """The bits of a ``retry_on`` list (config.RETRY_CONDITIONS names)."""
    mask = 0
    for c in conditions:
        mask |= _RETRY_BITS[c]
    return mask


class RetryBudget:
    """Retries as a share of requests over a sliding window, with a per-second floor."""

    __slots__ = ("ratio", "floor", "window", "_req", "_ret", "_sec", "requests", "retries", "exhausted",
                 "_req_sum", "_ret_sum")

    def __init__(self, ratio: float, window: int = 10, floor: int = 3) -> None:
        if not 0.0 <= ratio:
            raise ValueError("ratio must be >= 0")
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self._req: List[int] = [0] * window  # per one-second slot
        self._ret: List[int] = [0] * window
        self._sec = 0  # the second the newest slot counts (int(now)); 0 before the first call
        self._req_sum = 0
        self._ret_sum = 0
        self.requests = 0  # totals, for /metrics
        self.retries = 0
        self.exhausted = 0

    def _advance(self, now: float) -> int:
        sec = int(now)
        gap = sec - self._sec
        if gap > 0:
            w = self.window
            if gap >= w:
                self._req = [0] * w
                self._ret = [0] * w
                self._req_sum = self._ret_sum = 0
            else:
                req, ret = self._req, self._ret
                for s in range(self._sec + 1, sec + 1):
                    i = s % w
                    self._req_sum -= req[i]
                    self._ret_sum -= ret[i]
                    req[i] = ret[i] = 0
            self._sec = sec
        return sec % self.window

    def request(self, now: float, n: int = 1) -> None:
        """Count ``n`` requests (first attempts) at ``now``. The data path counts requests in a plain
        integer and hands them over about once a second (``Pool.sync_budget``), so a request costs one
        addition, not a call."""
        i = self._advance(now)
        self._req[i] += n
        self._req_sum += n
        self.requests += n

    def try_retry(self, now: float) -> bool:
        """Whether one more retry may go now; if so it is counted."""
        i = self._advance(now)
        if self._ret[i] >= self.floor and self._ret_sum >= self.ratio * self._req_sum:
            self.exhausted += 1
            return False
        self._ret[i] += 1
        self._ret_sum += 1
        self.retries += 1
        return True


class ClientBuckets:
    """A token bucket per client address, bounded (see the module docstring)."""

    __slots__ = ("rate", "burst", "max_clients", "_b", "untracked")

    def __init__(self, rate: float, burst: float = 0.0, max_clients: int = MAX_CLIENTS) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = self._burst(rate, burst)
        self.max_clients = max_clients
        # address -> [tokens, time of that count]; least recently used first
        self._b: "OrderedDict[str, List[float]]" = OrderedDict()
        self.untracked = 0

    @staticmethod
    def _burst(rate: float, burst: float) -> float:
        # At least one token: a bucket that can never hold a whole one would refuse every request.
        return max(1.0, float(burst) if burst > 0 else float(rate))

    def same(self, rate: float, burst: float = 0.0) -> bool:
        """Whether ``ClientBuckets(rate, burst)`` would limit as this one does (a reload keeps it then)."""
        return self.rate == float(rate) and self.burst == self._burst(rate, burst)

    def __len__(self) -> int:
        return len(self._b)

    def take(self, client: str, now: float) -> float:
        """Take a token for one request: 0.0 if allowed, else the seconds until one will be there."""
        b = self._b
        entry = b.get(client)
        if entry is None:
            if len(b) >= self.max_clients and not self._evict(now):
                self.untracked += 1
                return 0.0
            b[client] = [self.burst - 1.0, now]
            return 0.0
        b.move_to_end(client)
        tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        entry[1] = now
        if tokens >= 1.0:
            entry[0] = tokens - 1.0
            return 0.0
        entry[0] = tokens
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> bool:
        """Drop the least recently used bucket if it has refilled (it then means nothing)."""
        client, entry = next(iter(self._b.items()))
        if entry[0] + (now - entry[1]) * self.rate >= self.burst:
            del self._b[client]
            return True
        return False


class ClientConnections:
    """Open connections per client address, against a limit."""

    __slots__ = ("limit", "_n")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._n: Dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._n)

    def open(self, client: str) -> bool:
        """Count a new connection: False (and not counted) when the client is at its limit."""
        n = self._n.get(client, 0)
        if n >= self.limit:
            return False
        self._n[client] = n + 1
        return True

    def close(self, client: str) -> None:
        n = self._n.get(client, 0)
        if n <= 1:
            self._n.pop(client, None)
        else:
            self._n[client] = n - 1

    def count(self, client: str) -> int:
        return self._n.get(client, 0)
