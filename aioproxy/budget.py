"""A gateway-wide bound on the bytes of upstream answers held in memory at once."""

from __future__ import annotations

from .errors import ProxyError

__all__ = ["BufferBudget", "BufferFull"]


class BufferFull(ProxyError):
    """Holding more of this answer would take the gateway past its buffer budget."""

    status = 503
    type = "server_error"
    default_code = "gateway_buffers_full"
    caused_by_upstream = False  # the gateway's own trouble: no cooldown, no paid retry


class BufferBudget:
    """Bytes of upstream answers buffered at once (whole bodies being read, unfinished stream
    events), across every request of one app: a request that would go past ``limit`` fails
    while the others go on. Single-threaded (the event loop): no locks.

    Whoever takes bytes gives them back when it lets go of them, on every path.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no bound
        self.used = 0

    def take(self, size: int) -> None:
        """Count ``size`` more bytes held, or raise BufferFull (counting nothing)."""
        if self.limit and self.used + size > self.limit:
            raise BufferFull(
                "The gateway is holding too much of upstream answers right now; try again shortly",
                headers={"Retry-After": "1"},
            )
        self.used += size

    def give(self, size: int) -> None:
        """``size`` bytes taken before are no longer held."""
        self.used -= size
