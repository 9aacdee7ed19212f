"""Keys and teams as the cache holds them, and the arithmetic of budget periods."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "COUNTED",
    "KeyEntry",
    "TeamEntry",
    "digest_of",
    "parse_duration",
    "period_end",
    "rfc3339",
]

# A key's or team's settings that are counted for each request (each process counts its own
# unless [state] redis_url is set): what the limits plugin enforces, what run.py --workers and
# the admin API refuse without Redis.
COUNTED = ("rpm", "tpm", "max_parallel", "max_budget")

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([hd])$")
_UNIT = {"h": 3600.0, "d": 86400.0}


def digest_of(secret: str) -> str:
    """What is stored of a key: its sha256, hex.

    A plain (unsalted, fast) hash is enough for secrets of 190+ random bits: no dictionary or
    brute force reaches them, and unlike bcrypt/argon2 it costs ~1 µs, so the digest can be
    the cache's dict key, computed on every request.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


@functools.lru_cache(maxsize=256)  # a few distinct values, read on every request
def parse_duration(text: str) -> float | None:
    """Seconds of ``"<n>h"`` / ``"<n>d"``; None when it is not that."""
    match = _DURATION.match(text)
    return int(match.group(1)) * _UNIT[match.group(2)] if match else None


def period_end(created_at: float, duration: float | None, now: float) -> float | None:
    """The end of the budget period holding ``now``: periods of ``duration`` follow each other
    from ``created_at``, so every instance computes the same one. None: one period for ever."""
    if duration is None:
        return None
    periods = max(1, math.floor((now - created_at) / duration) + 1)
    return created_at + periods * duration


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


class Limited(msgspec.Struct, kw_only=True):
    """What keys and teams share: a name, limits, and the spend of budget period
    ``budget_resets_at`` as the database has it."""

    id: str
    name: str
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    budget_resets_at: float | None = None
    spend: float = 0.0
    total_spend: float = 0.0
    metadata: dict[str, Any] | None = None
    created_at: float = 0.0

    @property
    def duration(self) -> float | None:
        return parse_duration(self.budget_duration) if self.budget_duration else None


class TeamEntry(Limited, kw_only=True):
    """A team row."""


class KeyEntry(Limited, kw_only=True):
    """A key row (never its secret: ``digest``)."""

    digest: str
    key_prefix: str
    team_id: str | None = None
    expires_at: float | None = None
    disabled: bool = False
    role: str = "user"
    last_used_at: float | None = None
