"""In-memory counters behind the limits: rates over a sliding minute, requests in flight and
the spend not yet written, per key and per team. Counted per instance; the spend is shared
through the database."""

from __future__ import annotations

from .records import KeyEntry, TeamEntry, period_end

__all__ = ["KeyLimits", "Meter", "RateWindow", "Scope"]

_SECONDS = 60


class RateWindow:
    """A sliding one-minute total in one-second buckets, with when it next goes down."""

    __slots__ = ("_buckets", "_latest", "_total")

    def __init__(self) -> None:
        self._buckets = [0] * _SECONDS
        self._latest = 0
        self._total = 0

    def _advance(self, now: float) -> None:
        second = int(now)
        if second == self._latest:  # the common case: within the second last counted
            return
        gone = second - self._latest
        if gone >= _SECONDS:
            self._buckets = [0] * _SECONDS
            self._total = 0
        else:
            for past in range(self._latest + 1, second + 1):
                slot = past % _SECONDS
                self._total -= self._buckets[slot]
                self._buckets[slot] = 0
        if gone > 0:
            self._latest = second

    def add(self, amount: int, now: float) -> None:
        if int(now) != self._latest:  # checked here: most calls are within the same second
            self._advance(now)
        self._buckets[self._latest % _SECONDS] += amount
        self._total += amount

    def total(self, now: float) -> int:
        if int(now) != self._latest:
            self._advance(now)
        return self._total

    def clear_in(self, now: float) -> float:
        """Seconds until everything counted now has left the window (O(1)): when the full
        limit is available again, what OpenAI's x-ratelimit-reset-* headers say."""
        return max(0.0, self._latest + _SECONDS - now) if self._total > 0 else 0.0

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest counted second leaves the window (0: nothing counted)."""
        self._advance(now)
        if self._total <= 0:
            return 0.0
        for age in range(_SECONDS - 1, -1, -1):  # oldest first
            if self._buckets[(self._latest - age) % _SECONDS]:
                return max(0.0, self._latest - age + _SECONDS - now)
        return 0.0


class Meter:
    """One key's or team's counters; kept across cache reloads, by id."""

    __slots__ = ("in_flight", "period", "requests", "spend", "tokens")

    def __init__(self) -> None:
        self.requests = RateWindow()
        self.tokens = RateWindow()
        self.in_flight = 0
        self.period: float | None = None  # the budget period ``spend`` belongs to
        self.spend = 0.0  # USD spent here in ``period`` and not yet in the database's figure

    def local_spend(self, period: float | None) -> float:
        return self.spend if self.period == period else 0.0

    def add_spend(self, cost: float, period: float | None) -> None:
        if self.period != period:
            self.period, self.spend = period, 0.0
        self.spend += cost

    def written(self, cost: float, period: float | None) -> None:
        """``cost`` of ``period`` is now in the database's figure."""
        if self.period == period:
            self.spend = max(0.0, self.spend - cost)


def spend_now(entry: KeyEntry | TeamEntry, meter: Meter, now: float) -> tuple[float, float | None]:
    """The spend of the current budget period, and when it ends (None: never)."""
    end = period_end(entry.created_at, entry.duration, now)
    return spend_in(entry, meter, end), end


def spend_in(entry: KeyEntry | TeamEntry, meter: Meter, end: float | None) -> float:
    """The spend of the budget period ending at ``end``: the database's and this process's."""
    stored = entry.spend if entry.budget_resets_at == end else 0.0
    return stored + meter.local_spend(end)


class Scope:
    """One scope's limits (the key, its team) as the request path checks them: the entry's
    values read once when the cache loads, not from the entry each request."""

    __slots__ = (
        "_begins",
        "_ends",
        "budget_duration",
        "created_at",
        "entry",
        "max_budget",
        "max_parallel",
        "meter",
        "name",
        "rpm",
        "tpm",
    )

    def __init__(self, name: str, entry: KeyEntry | TeamEntry, meter: Meter) -> None:
        self.name = name
        self.entry = entry
        self.meter = meter
        self.rpm = entry.rpm
        self.tpm = entry.tpm
        self.max_parallel = entry.max_parallel
        self.max_budget = entry.max_budget
        self.created_at = entry.created_at
        self.budget_duration = entry.duration
        self._begins = self._ends = 0.0  # the period ``period`` last found

    def period(self, wall: float) -> float | None:
        """The end of the budget period holding ``wall`` (``period_end``'s): the last one
        found while ``wall`` stays in it."""
        if self._begins <= wall < self._ends:
            return self._ends
        duration = self.budget_duration
        ends = period_end(self.created_at, duration, wall)
        if ends is not None and duration is not None:
            self._begins, self._ends = ends - duration, ends
        return ends


class KeyLimits:
    """What ``Principal.limits`` holds for a database key: its entry and team, their meters.
    Built when the cache loads, so the request path only reads it."""

    __slots__ = (
        "checks",
        "enforced",
        "key",
        "key_meter",
        "limited",
        "rate_headers",
        "request_limits",
        "scopes",
        "team",
        "team_meter",
        "token_limits",
    )

    def __init__(
        self, key: KeyEntry, key_meter: Meter, team: TeamEntry | None, team_meter: Meter | None
    ) -> None:
        self.key = key
        self.key_meter = key_meter
        self.team = team
        self.team_meter = team_meter
        self.scopes: list[tuple[str, KeyEntry | TeamEntry, Meter]] = [("key", key, key_meter)]
        if team is not None and team_meter is not None:
            self.scopes.append(("team", team, team_meter))
        # The rate limits, for the x-ratelimit-* headers: (limit, its window) per scope.
        self.request_limits = [(e.rpm, m.requests) for _, e, m in self.scopes if e.rpm is not None]
        self.token_limits = [(e.tpm, m.tokens) for _, e, m in self.scopes if e.tpm is not None]
        self.limited = bool(self.request_limits or self.token_limits)
        self.checks = tuple(Scope(name, entry, meter) for name, entry, meter in self.scopes)
        # The x-ratelimit-* headers' parts made once: per kind, its names and, per scope, the
        # limit, its text and its window.
        self.rate_headers = tuple(
            (kind, tuple((limit, str(limit), window) for limit, window in scopes))
            for kind, scopes in (("requests", self.request_limits), ("tokens", self.token_limits))
            if scopes
        )
        # Whether anything is counted for it (reserve, reconcile): a key with no limit and no
        # budget (nor its team) costs its requests nothing but their log row.
        self.enforced = any(
            e.rpm is not None
            or e.tpm is not None
            or e.max_parallel is not None
            or e.max_budget is not None
            for _, e, _ in self.scopes
        )
