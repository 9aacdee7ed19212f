"""Failed sign-ins counted per client address, in memory: past ``[ui] signin_attempts`` in
``signin_window`` seconds, the address is refused (429) until its oldest failure leaves the
window, the right key included, so guessing keys through the sign-in form goes nowhere.

Per process (each ``--workers`` worker counts its own) and by the connection's address: a
gateway behind a reverse proxy sees the proxy's, which then throttles every user together.
"""

from __future__ import annotations

import collections
import math

from aiohttp import web

from ..errors import RateLimited

__all__ = ["SignInThrottle", "throttle_key"]

_MAX_ADDRESSES = 10_000  # addresses tracked at most: a flood of new ones cannot grow memory


class SignInThrottle:
    def __init__(self, attempts: int, window: float) -> None:
        self.attempts = attempts
        self.window = window
        self.failures: dict[str, collections.deque[float]] = {}

    def check(self, address: str, now: float) -> None:
        """Refuse ``address`` (RateLimited, with Retry-After) while it has failed too often."""
        times = self._recent(address, now)
        if times is not None and len(times) >= self.attempts:
            wait = max(1, math.ceil(times[0] + self.window - now))
            refused = RateLimited(
                f"Too many failed sign-ins from your address: try again in {wait} seconds",
                headers={"Retry-After": str(wait)},
            )
            refused.caused_by_upstream = False
            refused.scope = "gateway"  # aioproxy_rate_limited_total's: the gateway's own guard
            raise refused

    def failed(self, address: str, now: float) -> None:
        times = self._recent(address, now)
        if times is None:
            if len(self.failures) >= _MAX_ADDRESSES:
                self._forget(now)
            times = self.failures[address] = collections.deque()
        times.append(now)

    def _recent(self, address: str, now: float) -> collections.deque[float] | None:
        """``address``'s failures still in the window (None: none)."""
        times = self.failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self.failures[address]
            return None
        return times

    def _forget(self, now: float) -> None:
        """Drop the addresses whose failures all left the window; if that is not enough, the
        ones tracked longest."""
        for address in list(self.failures):
            self._recent(address, now)
        while len(self.failures) >= _MAX_ADDRESSES:
            del self.failures[next(iter(self.failures))]


throttle_key = web.AppKey("aioproxy.ui.signin_throttle", SignInThrottle)
