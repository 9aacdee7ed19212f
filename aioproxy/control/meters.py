"""In-memory counters behind the limits: rates over a sliding minute, requests in flight, the
cost they reserve and the spend not yet written, per key and per team. Counted per instance;
the spend is shared through the database."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from multidict import istr

from .records import COUNTED, KeyEntry, TeamEntry, period_end

if TYPE_CHECKING:
    from .plane import ControlPlane

__all__ = [
    "A_MINUTE",
    "HEADER_NAMES",
    "NANO_USD",
    "KeyLimits",
    "Meter",
    "RateWindow",
    "Scope",
    "reset_text",
]

_SECONDS = 60
# The cost reserved by requests in flight is counted in whole nano-USD (here and in Redis):
# integers add and take back exactly, however many requests come and go.
NANO_USD = 1e-9

# OpenAI's x-ratelimit-* header names, per kind of limit: the limit, what remains, the reset.
# As ``istr``, the case-insensitive names aiohttp's headers keep: a response's update takes
# them as they are (a ``str`` is made into one per header and response, 3x the update's time).
HEADER_NAMES = {
    kind: (
        istr(f"x-ratelimit-limit-{kind}"),
        istr(f"x-ratelimit-remaining-{kind}"),
        istr(f"x-ratelimit-reset-{kind}"),
    )
    for kind in ("requests", "tokens")
}


class RateWindow:
    """A sliding one-minute total in one-second buckets, with when it next goes down.

    ``second`` is the last second it moved to and ``count`` its total then: the limits
    plugin moves both of a scope's windows once (``Scope.take``) and reads them directly."""

    __slots__ = ("buckets", "count", "second")

    def __init__(self) -> None:
        self.buckets = [0] * _SECONDS
        self.second = 0
        self.count = 0

    def advance(self, second: int) -> None:
        """Move to ``second``, emptying the buckets of the seconds that left the window."""
        gone = second - self.second
        if gone <= 0:
            return
        if gone >= _SECONDS:
            self.buckets = [0] * _SECONDS
            self.count = 0
        else:
            buckets = self.buckets
            for past in range(self.second + 1, second + 1):
                slot = past % _SECONDS
                self.count -= buckets[slot]
                buckets[slot] = 0
        self.second = second

    def add(self, amount: int, now: float) -> None:
        if int(now) != self.second:  # checked here: most calls are within the same second
            self.advance(int(now))
        self.buckets[self.second % _SECONDS] += amount
        self.count += amount

    def total(self, now: float) -> int:
        if int(now) != self.second:
            self.advance(int(now))
        return self.count

    def clear_in(self, now: float) -> float:
        """Seconds until everything counted now has left the window (O(1)): when the full
        limit is available again, what OpenAI's x-ratelimit-reset-* headers say."""
        return max(0.0, self.second + _SECONDS - now) if self.count > 0 else 0.0

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest counted second leaves the window (0: nothing counted)."""
        self.advance(int(now))
        if self.count <= 0:
            return 0.0
        for age in range(_SECONDS - 1, -1, -1):  # oldest first
            if self.buckets[(self.second - age) % _SECONDS]:
                return max(0.0, self.second - age + _SECONDS - now)
        return 0.0


class Meter:
    """One key's or team's counters; kept across cache reloads, by id."""

    __slots__ = ("held", "in_flight", "output", "period", "requests", "spend", "tokens")

    def __init__(self) -> None:
        self.requests = RateWindow()
        self.tokens = RateWindow()
        self.in_flight = 0
        # The output tokens its answers have had, a running average: what a request that caps
        # none reserves toward tpm (0 until an answer has taught it).
        self.output = 0.0
        self.held = 0  # nano-USD: the cost its requests in flight reserved (budget scopes)
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
    return stored + (meter.spend if meter.period == end else 0.0)  # meter.local_spend(end)


_NO_LIMIT = math.inf  # a limit not set, as ``Scope.take`` compares it


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


# A window's reset is at most a minute away: each whole second's text, made once.
_RESETS = tuple(_duration(second) for second in range(61))
A_MINUTE = _RESETS[60]


def reset_text(seconds: float) -> str:
    """The x-ratelimit-reset-* text for ``seconds``."""
    return _duration(seconds) if seconds < 1 else _RESETS[min(60, math.ceil(seconds))]


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
        "parallel_cap",
        "requests",
        "rpm",
        "rpm_cap",
        "tokens",
        "tpm",
        "tpm_cap",
    )

    def __init__(self, name: str, entry: KeyEntry | TeamEntry, meter: Meter) -> None:
        self.name = name
        self.entry = entry
        self.meter = meter
        self.requests = meter.requests
        self.tokens = meter.tokens
        self.rpm = entry.rpm
        self.tpm = entry.tpm
        self.max_parallel = entry.max_parallel
        # The limits as numbers to compare, unset ones infinite: no test of None per request.
        self.rpm_cap = _NO_LIMIT if entry.rpm is None else entry.rpm
        self.tpm_cap = _NO_LIMIT if entry.tpm is None else entry.tpm
        self.parallel_cap = _NO_LIMIT if entry.max_parallel is None else entry.max_parallel
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

    def take(self, tokens: int, held: int, second: int, wall: float) -> bool:
        """Count one more request reserving ``tokens`` and ``held`` nano-USD (kept by a scope
        with a budget) if it fits every limit, its windows moved to ``second`` (``int`` of the
        monotonic clock) first; False, counting nothing, if it does not. A request reserving
        no tokens (a cached answer) is not held to the tpm. The budget admits while the spend
        plus the cost reserved in flight is under it (not counting this request's own). Check
        and count are one step (one frame a request and scope; ``untake`` undoes it)."""
        requests, used = self.requests, self.tokens
        if requests.second != second:
            requests.advance(second)
        if used.second != second:
            used.advance(second)
        meter = self.meter
        if (
            requests.count >= self.rpm_cap
            or (tokens and used.count + tokens > self.tpm_cap)
            or meter.in_flight >= self.parallel_cap
        ):
            return False
        budget = self.max_budget
        if budget is not None:
            ends = self._ends if self._begins <= wall < self._ends else self.period(wall)
            entry = self.entry  # spend_in(entry, meter, ends), inlined
            stored = entry.spend if entry.budget_resets_at == ends else 0.0
            spent = stored + (meter.spend if meter.period == ends else 0.0)
            if spent + meter.held * NANO_USD >= budget:
                return False
            meter.held += held
        meter.in_flight += 1
        slot = second % _SECONDS
        requests.buckets[slot] += 1
        requests.count += 1
        used.buckets[slot] += tokens
        used.count += tokens
        return True

    def settle(
        self, delta: int, cost: float | None, now: float, wall: float, held: int = 0
    ) -> None:
        """Move ``delta`` tokens (the usage less the reservation) into the token window and add
        ``cost`` to the spend of the budget period holding ``wall`` in place of the ``held``
        nano-USD reserved, in one step (``RateWindow.add`` and ``Meter.add_spend``, inlined:
        once per request and scope)."""
        if held and self.max_budget is not None:  # ``unhold``, inlined
            self.meter.held -= held
        if delta:
            used = self.tokens
            if int(now) != used.second:
                used.advance(int(now))
            used.buckets[used.second % _SECONDS] += delta
            used.count += delta
        if cost:
            ends = self._ends if self._begins <= wall < self._ends else self.period(wall)
            meter = self.meter
            if meter.period != ends:
                meter.period, meter.spend = ends, 0.0
            meter.spend += cost

    def unhold(self, held: int) -> None:
        """Take back the ``held`` nano-USD a request of this scope's reserved."""
        if self.max_budget is not None:
            self.meter.held -= held

    def untake(self, tokens: int, held: int) -> None:
        """Take back a request ``take`` just counted (another scope of its key refused it), in
        the same second, before anything else ran."""
        meter = self.meter
        meter.in_flight -= 1
        if self.max_budget is not None:
            meter.held -= held
        requests, used = self.requests, self.tokens
        slot = requests.second % _SECONDS
        requests.buckets[slot] -= 1
        requests.count -= 1
        used.buckets[slot] -= tokens
        used.count -= tokens


class KeyLimits:
    """What ``Principal.limits`` holds for a database key: its entry and team, their meters.
    Built when the cache loads, so the request path only reads it."""

    __slots__ = (
        "budgeted",
        "checks",
        "enforced",
        "granted_headers",
        "key",
        "key_meter",
        "limited",
        "plane",
        "rate_headers",
        "request_limits",
        "scopes",
        "solo",
        "solo_requests",
        "solo_tokens",
        "team",
        "team_meter",
        "token_limits",
        "tpm_least",
    )

    def __init__(
        self,
        key: KeyEntry,
        key_meter: Meter,
        team: TeamEntry | None,
        team_meter: Meter | None,
        plane: ControlPlane | None = None,
    ) -> None:
        self.plane = plane  # the control plane whose cache made it (None: made apart, in tests)
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
        # The smallest tpm of its scopes (None: no tpm): what a learnt output estimate is held
        # under, so that it never refuses a request whose own prompt fits an empty window.
        self.tpm_least = min((limit for limit, _ in self.token_limits), default=None)
        self.limited = bool(self.request_limits or self.token_limits)
        self.checks = tuple(Scope(name, entry, meter) for name, entry, meter in self.scopes)
        # The x-ratelimit-* headers' parts made once, per kind: its three header names, then
        # per scope the limit, its text and its window (the first scope's apart).
        self.rate_headers = tuple(
            (
                HEADER_NAMES[kind],
                (scopes[0][0], str(scopes[0][0]), scopes[0][1]),
                tuple((limit, str(limit), window) for limit, window in scopes[1:]),
            )
            for kind, scopes in (("requests", self.request_limits), ("tokens", self.token_limits))
            if scopes
        )
        # A key with no team has one scope: reserved by ``Scope.take``, its headers read from
        # its own windows with no search for the scope with the least room: a copy of
        # ``granted_headers`` (the limits, a reset a minute away), and per kind the names of
        # what moves, the limit and its window (``solo_requests``, ``solo_tokens``).
        solo = self.solo = self.checks[0] if len(self.checks) == 1 else None
        solo_kinds = self.rate_headers if solo is not None else ()
        self.granted_headers: dict[str, str] = {
            name: text
            for (limit_name, _, reset_name), (_, limit_text, _), _ in solo_kinds
            for name, text in ((limit_name, limit_text), (reset_name, A_MINUTE))
        }
        self.solo_requests = None
        if solo is not None and solo.rpm is not None:
            self.solo_requests = (HEADER_NAMES["requests"][1], solo.rpm, solo.requests)
        self.solo_tokens = None
        if solo is not None and solo.tpm is not None:
            self.solo_tokens = (*HEADER_NAMES["tokens"][1:], solo.tpm, solo.tokens)
        # Whether anything is counted for it (reserve, reconcile): a key with no limit and no
        # budget (nor its team) costs its requests nothing but their log row.
        self.enforced = any(
            getattr(e, name) is not None for _, e, _ in self.scopes for name in COUNTED
        )
        # Whether its requests reserve their estimated cost: only a key or team with a budget
        # pays for the estimate.
        self.budgeted = any(e.max_budget is not None for _, e, _ in self.scopes)

    def granted(self, now: float) -> dict[str, str]:
        """The x-ratelimit-* headers right after a request was counted (``headers(now,
        granted=True)``). A key with no team reads its one scope's windows over a copy of the
        texts that do not move (the limits, a reset a minute away): ~70 bytecodes a request
        fewer than the search for the scope with the least room."""
        if self.solo is None:
            return self.headers(now, granted=True)
        headers = self.granted_headers.copy()
        requests = self.solo_requests
        if requests is not None:  # it holds this request, within its limit (``Scope.take``)
            remaining_name, limit, window = requests
            headers[remaining_name] = str(limit - window.count)
        tokens = self.solo_tokens
        if tokens is not None:
            remaining_name, reset_name, limit, window = tokens
            remaining = limit - window.count
            if remaining < limit:  # this request is counted in it: it empties in a minute
                headers[remaining_name] = str(remaining) if remaining > 0 else "0"
            else:  # nothing counted (a request reserving no tokens)
                headers[remaining_name] = str(remaining)
                headers[reset_name] = reset_text(window.clear_in(now))
        return headers

    def headers(self, now: float, granted: bool = False) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, from the scope with the least room left, read from
        the windows as last moved (to this second: every scope's, by ``Scope.take``).
        ``granted``: right after this request was counted, so a window holding anything holds
        some of this second's, and empties in a minute ("1m0s") without asking it when."""
        headers: dict[str, str] = {}
        for (limit_name, remaining_name, reset_name), first, others in self.rate_headers:
            limit, text, window = first
            remaining = limit - window.count
            for other_limit, other_text, other_window in others:
                other = other_limit - other_window.count
                if other < remaining:
                    limit, text, window, remaining = other_limit, other_text, other_window, other
            headers[limit_name] = text
            headers[remaining_name] = str(remaining) if remaining > 0 else "0"
            headers[reset_name] = (
                A_MINUTE if granted and remaining < limit else reset_text(window.clear_in(now))
            )
        return headers

    def headers_now(self) -> dict[str, str] | None:
        """The headers of a response the limits did not count (an error before them, a route
        they do not limit, such as the model list): the windows as they are now, this request
        not in them. None where this process's windows are not the key's (counted in Redis)."""
        plane = self.plane
        if plane is not None and plane.shared is not None:
            return None
        now = plane.clock.monotonic() if plane is not None else time.monotonic()
        self.move_to(now)
        return self.headers(now)

    def move_to(self, now: float) -> None:
        """Move every scope's windows to ``now`` (what left them goes): for a check, or for
        headers read from them outside ``Scope.take``."""
        for scope in self.checks:
            scope.requests.total(now)
            scope.tokens.total(now)
