"""Time as a dependency of the control plane, so tests move it instead of waiting."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ControlClock"]


class ControlClock:
    """``time``: wall-clock seconds (expiry, budget periods, log rows); ``monotonic``: rate
    windows and timings."""

    __slots__ = ("monotonic", "time")

    def __init__(
        self,
        time: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.time = time
        self.monotonic = monotonic
