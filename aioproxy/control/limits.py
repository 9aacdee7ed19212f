"""The ``limits`` plugin: rpm, tpm, max_parallel and budget for database keys and their teams.

Reserve, then reconcile: ``before_request`` admits a request only if every scope (the key, its
team) has room, and counts it at once (one request, its in-flight slot, its tokens: the
``max_tokens``-like field plus an estimate of the prompt), with no await in between, so
concurrent requests cannot overshoot. ``after_response`` replaces the reserved tokens by the
real usage and adds the cost to the budget. The in-flight slot is freed when the request's task
ends, whatever ended it. Rates and slots are counted per instance; spend is shared through the
database (``requestlog``, ``cache``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, NoReturn

from aiohttp import web

from .._aiohttp import request_state
from ..config import Config
from ..context import Call
from ..errors import RateLimited
from ..hookspecs import hookimpl
from ..outcome import Outcome
from .clock import ControlClock
from .database import RATE_LIMIT_HEADERS
from .meters import KeyLimits, Scope, spend_in
from .plane import plane_key
from .rows import COUNTED, ESTIMATED, estimate_prompt, estimate_usage

if TYPE_CHECKING:
    from ..state.counters import SharedReservation

__all__ = ["Limits", "Reservation"]

RESERVATION = "aioproxy.control.reservation"
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _reserve(call: Call) -> int:
    fields = call.fields
    cap = 0
    for name in _OUTPUT_CAPS:
        if name in fields:
            value = call.get(name)
            if value.__class__ is int and value > 0:  # not a bool, nor a float
                cap = value
                break
    return estimate_prompt(call) + cap


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


# A window's reset is at most a minute away: each whole second's text, made once.
_RESETS = tuple(_duration(second) for second in range(61))
_A_MINUTE = _RESETS[60]


def _reset(seconds: float) -> str:
    return _duration(seconds) if seconds < 1 else _RESETS[min(60, math.ceil(seconds))]


class Reservation:
    __slots__ = ("limits", "released", "tokens")

    def __init__(self, limits: KeyLimits, tokens: int) -> None:
        self.limits = limits
        self.tokens = tokens  # counted toward tpm now: the reservation, then the usage
        self.released = False

    def release(self, _task: object = None) -> None:
        if not self.released:
            self.released = True
            for scope in self.limits.checks:
                scope.meter.in_flight -= 1

    def settle(self, tokens: int, cost: float | None, now: float, wall: float) -> None:
        """The usage's ``tokens`` for those reserved, and the ``cost`` added to the spend, in
        one pass over the scopes."""
        delta = tokens - self.tokens  # 0: the reservation was the usage, nothing to move
        self.tokens = tokens
        if delta or cost:
            for scope in self.limits.checks:
                scope.settle(delta, cost, now, wall)

    def count_tokens(self, tokens: int, now: float) -> None:
        """A failed request: its request stays counted, its reserved tokens become ``tokens``."""
        self.settle(tokens, None, now, 0.0)


def _headers(limits: KeyLimits, now: float, granted: bool = False) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the scope with the least room left, read from the
    windows as last moved (to this second: every scope's, by ``Scope.admits``). ``granted``:
    right after this request was counted, so a window holding anything holds some of this
    second's, and empties in a minute ("1m0s") without asking it when."""
    headers: dict[str, str] = {}
    for (limit_name, remaining_name, reset_name), first, others in limits.rate_headers:
        limit, text, window = first
        remaining = limit - window.count
        for other_limit, other_text, other_window in others:
            other = other_limit - other_window.count
            if other < remaining:
                limit, text, window, remaining = other_limit, other_text, other_window, other
        headers[limit_name] = text
        headers[remaining_name] = str(remaining) if remaining > 0 else "0"
        headers[reset_name] = (
            _A_MINUTE if granted and remaining < limit else _reset(window.clear_in(now))
        )
    return headers


def _refuse(message: str, code: str, retry_after: float, scope: str) -> RateLimited:
    """A 429 from this gateway's limits; ``scope`` (key, team, budget) is what
    aioproxy_rate_limited_total counts it under."""
    refused = RateLimited(
        message, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after)))}
    )
    refused.caused_by_upstream = False
    refused.scope = scope
    return refused


class Limits:
    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def before_request(self, call: Call) -> Awaitable[None] | None:
        limits = call.principal.limits
        # Keys without limits (config keys, unlimited database keys) are not counted at all.
        if limits.__class__ is not KeyLimits or not limits.enforced or RESERVATION in call.state:
            return None
        plane = call.request.app[plane_key]
        if plane.shared is not None:  # [state] redis_url: counted in Redis (aioproxy.state)
            return plane.shared.before_request(call, limits, self.reserve_here)
        _reserve_on(call, limits, plane.clock)
        return None

    def reserve_here(self, call: Call, limits: KeyLimits) -> None:
        """Reserve on this process's counters (the fallback while Redis is away)."""
        _reserve_on(call, limits, call.request.app[plane_key].clock)

    @hookimpl
    def after_response(self, call: Call, outcome: Outcome) -> Awaitable[None] | None:
        reservation: Reservation | SharedReservation | None = call.state.get(RESERVATION)
        if reservation is None:
            return None
        plane = call.request.app[plane_key]
        usage = outcome.usage()
        if usage is None:  # priced on an estimate, which its log row takes (``rows``)
            usage = call.state[ESTIMATED] = estimate_usage(call.body_size(), outcome)
            if outcome.cost is None and call.routed:
                outcome.cost = plane.pricing.cost(usage, call.deployment)
        # A cached answer counts toward rpm, not tpm.
        tokens = 0 if call.state.get("cache") == "hit" else usage.total_tokens
        clock = plane.clock
        cost = outcome.cost
        if not isinstance(reservation, Reservation):  # counted in Redis: one settling script
            reservation.settle(tokens, cost, clock.time())
            return None
        reservation.settle(tokens, cost, clock.monotonic(), clock.time())
        if cost:
            call.state[COUNTED] = True  # the writer moves it from the meters to the figures
        return None

    @hookimpl
    def on_error(self, request: web.Request, call: Call | None) -> None:
        """A failed request keeps its request counted, not its reserved tokens."""
        reservation: Reservation | None = call.state.get(RESERVATION) if call else None
        if reservation is not None:
            reservation.count_tokens(0, request.app[plane_key].clock.monotonic())


def _reserve_on(call: Call, limits: KeyLimits, clock: ControlClock) -> None:
    """Check every scope, then count the request in each, then its headers: one pass each."""
    now = clock.monotonic()
    second = int(now)
    tokens = _reserve(call)
    wall = clock.time()
    checks = limits.checks
    for scope in checks:
        if not scope.admits(tokens, second, wall):
            _refuse_by(call, limits, scope, tokens, now, wall)
    for scope in checks:
        scope.count(tokens)
    reservation = call.state[RESERVATION] = Reservation(limits, tokens)
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(reservation.release)
    else:  # pragma: no cover - hooks always run in the request's task
        reservation.release()
    if limits.limited:
        request_state(call.request)[RATE_LIMIT_HEADERS] = _headers(limits, now, granted=True)


def _refuse_by(
    call: Call, limits: KeyLimits, scope: Scope, tokens: int, now: float, wall: float
) -> NoReturn:
    """Raise the refusal of ``scope`` (which has no room), with the headers."""
    try:
        _check(scope, tokens, now, wall)
        raise AssertionError("a scope without room passed its check")  # pragma: no cover
    except RateLimited:
        if limits.limited:  # also on a 429: the client learns when to come back
            for other in limits.checks:  # every window moved to now, for the headers
                other.requests.total(now)
                other.tokens.total(now)
            request_state(call.request)[RATE_LIMIT_HEADERS] = _headers(limits, now)
        raise


def _check(scope: Scope, tokens: int, now: float, wall: float) -> None:
    meter = scope.meter
    if scope.max_parallel is not None and meter.in_flight >= scope.max_parallel:
        raise _refuse(
            f"{_whose(scope)} has {scope.max_parallel} requests in flight, its max_parallel",
            "rate_limit_exceeded",
            1,
            scope.name,
        )
    if scope.rpm is not None and meter.requests.total(now) >= scope.rpm:
        raise _refuse(
            f"{_whose(scope)} is over its rate limit of {scope.rpm} requests a minute",
            "rate_limit_exceeded",
            meter.requests.reset_in(now),
            scope.name,
        )
    if scope.tpm is not None and meter.tokens.total(now) + tokens > scope.tpm:
        raise _refuse(
            f"{_whose(scope)} is over its rate limit of {scope.tpm} tokens a minute",
            "rate_limit_exceeded",
            meter.tokens.reset_in(now) or 60,
            scope.name,
        )
    if scope.max_budget is not None:
        ends = scope.period(wall)
        if spend_in(scope.entry, meter, ends) >= scope.max_budget:
            raise _refuse(
                f"{_whose(scope)} has spent its budget of ${scope.max_budget:g}"
                + (" for this period" if ends is not None else ""),
                "insufficient_quota",
                (ends - wall) if ends is not None else 3600,
                "budget",
            )


def _whose(scope: Scope) -> str:
    return "This API key" if scope.name == "key" else "This API key's team"
