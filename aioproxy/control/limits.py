"""The ``limits`` plugin: rpm, tpm, max_parallel and budget for database keys and their teams.

Reserve, then reconcile: ``before_request`` admits a request only if every scope (the key, its
team) has room, and counts it at once (one request, its in-flight slot, its tokens: an
estimate of the prompt plus the ``max_tokens``-like field, else the key's running average of
its answers' output tokens; and for a scope with a budget its estimated cost), with no await
in between, so concurrent requests cannot overshoot.
``after_response`` replaces the reserved tokens by the real usage and the reserved cost by the
real cost, in one step. The in-flight slot is freed when the request's task ends, whatever
ended it; the reserved cost then too, or on an error. Rates and slots are counted per instance;
spend is shared through the database (``requestlog``, ``cache``). A request refused for what it
asked (its body, a model it may not use or that is not served: ``before_refusal``) counts one
request toward rpm alone: no upstream sees it.

Budgets under concurrency: a scope admits a request while its spend plus the cost reserved by
its requests in flight is under ``max_budget`` (the request's own estimate is not added: a key
under its budget with nothing in flight is always served). Each estimate is the prompt (about
four bytes a token) at the input price plus the output cap (``max_tokens``,
``max_completion_tokens``, ``max_output_tokens``; else ``[database] budget_output_tokens``) at
the output price of the deployment the request was routed to. So when the last request is
admitted, spend + reserved < max_budget, and after every request in flight has settled:

    spend < max_budget + (the last admitted request's cost)
                       + (the cost beyond its estimate of each other request then in flight)

With an output cap and a prompt not underestimated, a request costs at most its estimate, and
the spend overshoots the budget by less than one request's cost however many run at once
(without the reservation, every request in flight could overshoot it: 20 concurrent requests
against a budget worth 2 spent 10 times it).
"""

from __future__ import annotations

import asyncio
import math
import sys
from asyncio import get_running_loop
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from .._aiohttp import request_state
from ..config import Config
from ..context import CACHE_ANSWERS, Call
from ..errors import RateLimited
from ..hookspecs import hookimpl
from ..outcome import Outcome
from ..routes import Kind
from .clock import ControlClock
from .database import RATE_LIMIT_HEADERS
from .meters import NANO_USD, KeyLimits, Scope, spend_in
from .plane import plane_key
from .pricing import Pricing
from .rows import COUNTED, ESTIMATED, estimate_usage

if TYPE_CHECKING:
    from ..state.counters import SharedReservation

__all__ = [
    "MOST_TOKENS",
    "REQUEST_ONLY",
    "CostEstimates",
    "Limits",
    "Reservation",
    "ReserveHere",
    "task_of",
    "unless_cached",
]

RESERVATION = "aioproxy.control.reservation"
# The reserved cost (``held``) of a request counted toward rpm alone: one refused for what it
# asked, which no upstream sees (no slot, no tokens, no cost; held to no other limit).
REQUEST_ONLY = -1
_OUTPUT_CAP_ORDER = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_OUTPUT_CAPS = frozenset(_OUTPUT_CAP_ORDER)
# The most tokens a request counts, asked (a client's max_tokens) or reported (an upstream's
# usage): Redis's counters script clamps to the same, and a count past 2**64 could not even be
# packed for it (one client's max_tokens of 10**20 would fail its batch's every request).
MOST_TOKENS = 10**12

# Counts a request on this process's counters, given the tokens and nano-USD it reserves:
# None once counted, or an awaitable (a refusal the response cache may yet lift).
ReserveHere = Callable[[Call, KeyLimits, int, int], Awaitable[None] | None]


def _output_cap(call: Call) -> int:
    """The request's cap on its output tokens (0: none), for a body that names one."""
    fields = call.fields
    for name in _OUTPUT_CAP_ORDER:
        raw = fields.get(name)
        if raw is not None:
            try:  # in C, not through Call.get's two frames (~20 bytecodes a request)
                value = _decode_value(raw)
            except (msgspec.DecodeError, ValueError, RecursionError):
                value = call.get(name)  # raises the client's 400, as Call.get words it
            if value.__class__ is int and value > 0:  # not a bool, nor a float
                return min(value, MOST_TOKENS)
    return 0


_decode_value = msgspec.json.Decoder().decode
# A loop's running task, in C (``asyncio.current_task`` is a Python function until 3.12,
# ~13 bytecodes a request): 3.11's dict of them, read by its ``get``.
task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    asyncio.current_task if sys.version_info >= (3, 12) else asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
)


_PER_TOKEN = 1000.0  # USD per million tokens -> nano-USD per token
# Kinds whose answers have no output tokens: none reserved (cost or tpm), none learnt.
_NO_OUTPUT_TOKENS = frozenset({Kind.EMBEDDINGS, Kind.COUNT_TOKENS})
_LEARNING_RATE = 0.2  # the weight of each answer in a key's running average of output tokens


class CostEstimates:
    """A request's cost before its call, in nano-USD, at the price ``Pricing`` has for its
    deployment (configured, else the bundled table's, each looked up once there)."""

    def __init__(self, output_tokens: int) -> None:
        self.output_tokens = output_tokens  # assumed for a request with no output cap

    def held(self, call: Call, prompt: int, cap: int, pricing: Pricing) -> int:
        """Nano-USD for ``prompt`` tokens in and ``cap`` out (none: the configured estimate)
        at the price of the deployment the call is routed to (0: counting tokens is free)."""
        kind = call.kind
        if kind is Kind.COUNT_TOKENS:
            return 0
        deployment = call.routed_to
        found = pricing.known.get(id(deployment))  # a dict lookup, not price_of's frames
        if found is None or found[0] is not deployment:
            found = pricing.find(call.deployment)  # (raises for a call routed nowhere)
        _, _, input_price, output_price = found
        output = 0 if kind in _NO_OUTPUT_TOKENS else (cap or self.output_tokens)
        return math.ceil(prompt * input_price * _PER_TOKEN + output * output_price * _PER_TOKEN)


def _learnt_output(call: Call, limits: KeyLimits, prompt: int) -> int:
    """The output tokens a request with no cap reserves toward tpm: the key's running average
    of its answers', held under what its smallest tpm leaves beside the prompt. An estimate
    never refuses a request an empty window would take: refused, the request would teach
    nothing, and the average would stay too high for good."""
    if call.kind in _NO_OUTPUT_TOKENS:
        return 0
    learnt = round(limits.key_meter.output)
    least = limits.tpm_least
    if least is not None and learnt > least - prompt:
        return max(0, least - prompt)
    return learnt


class Reservation:
    """What one request counted on this process's meters, settled once and released once."""

    __slots__ = ("checks", "held", "released", "tokens")

    def __init__(self, checks: tuple[Scope, ...], tokens: int, held: int) -> None:
        self.checks = checks  # its key's scopes (``KeyLimits.checks``)
        self.tokens = tokens  # counted toward tpm now: the reservation, then the usage
        self.held = held  # nano-USD reserved toward the budgets until the cost replaces it
        self.released = False

    def release(self, _task: object = None) -> None:
        if self.released:
            return
        self.released = True
        held, self.held = self.held, 0  # none once settled (the usual end)
        for scope in self.checks:
            scope.meter.in_flight -= 1
            if held:
                scope.unhold(held)

    def settle(self, tokens: int, cost: float | None, now: float, wall: float) -> None:
        """The usage's ``tokens`` for those reserved, and the ``cost`` added to the spend in
        place of the cost reserved, in one pass over the scopes."""
        delta = tokens - self.tokens  # 0: the reservation was the usage, nothing to move
        self.tokens = tokens
        held, self.held = self.held, 0
        if delta or cost or held:
            for scope in self.checks:
                scope.settle(delta, cost, now, wall, held)

    def count_tokens(self, tokens: int, now: float) -> None:
        """A failed request: its request stays counted, its reserved tokens become ``tokens``
        and its reserved cost is released (a failure is not charged)."""
        self.settle(tokens, None, now, 0.0)


class SoloReservation(Reservation):
    """A reservation in one scope (a key with no team): the same, with no loop."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope, tokens: int, held: int) -> None:
        self.scope = scope
        self.checks = (scope,)  # as a Reservation's, for a reader of either
        self.tokens = tokens
        self.held = held
        self.released = False

    def release(self, _task: object = None) -> None:
        if self.released:
            return
        self.released = True
        scope = self.scope
        scope.meter.in_flight -= 1
        if self.held:  # none once settled (the usual end)
            scope.unhold(self.held)
            self.held = 0

    def settle(self, tokens: int, cost: float | None, now: float, wall: float) -> None:
        held, self.held = self.held, 0
        self.scope.settle(tokens - self.tokens, cost, now, wall, held)
        self.tokens = tokens


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
        self.costs = CostEstimates(config.database.budget_output_tokens)

    @hookimpl
    def before_request(self, call: Call) -> Awaitable[None] | None:
        limits = call.principal.limits
        # Keys without limits (config keys, unlimited database keys) are not counted at all.
        if limits.__class__ is not KeyLimits or not limits.enforced or RESERVATION in call.state:
            return None
        plane = limits.plane or call.request.app[plane_key]
        fields = call.fields
        prompt = sum(map(len, fields.values())) // 4  # ``estimate_prompt``, two frames fewer
        # In C: most bodies name one cap or none (a frame fewer for those that name none).
        cap = 0 if _OUTPUT_CAPS.isdisjoint(fields) else _output_cap(call)
        # Toward tpm: the prompt and the output cap, else the output the key's answers have had.
        tokens = prompt + (cap or _learnt_output(call, limits, prompt))
        # Only a key or team with a budget pays for its cost's estimate.
        held = self.costs.held(call, prompt, cap, plane.pricing) if limits.budgeted else 0
        shared = plane.shared
        if shared is not None:  # [state] redis_url: counted in Redis (aioproxy.state)
            # Its ``before_request``'s test, a frame fewer a request.
            if shared.link.up:
                return shared.reserve(call, limits, tokens, held, self.reserve_here)
            return shared.fall_back(call, limits, tokens, held, self.reserve_here)
        return _reserve_on(call, limits, plane.clock, tokens, held)

    def reserve_here(
        self, call: Call, limits: KeyLimits, tokens: int, held: int
    ) -> Awaitable[None] | None:
        """Reserve on this process's counters (the fallback while Redis is away)."""
        return _reserve_on(call, limits, call.request.app[plane_key].clock, tokens, held)

    @hookimpl
    def after_response(self, call: Call, outcome: Outcome) -> Awaitable[None] | None:
        state = call.state
        reservation: Reservation | SharedReservation | None = state.get(RESERVATION)
        if reservation is None:
            return None
        limits = call.principal.limits  # a KeyLimits: it reserved
        plane = limits.plane or call.request.app[plane_key]
        usage = outcome.usage()
        cached = state.get("cache") == "hit"
        if usage is None:  # priced on an estimate, which its log row takes (``rows``)
            usage = state[ESTIMATED] = estimate_usage(call.body_size(), outcome)
            if outcome.cost is None and call.routed:
                outcome.cost = plane.pricing.cost(usage, call.deployment)
        elif not cached and call.kind not in _NO_OUTPUT_TOKENS:  # the upstream's own count
            meter = limits.key_meter
            learnt = min(usage.completion_tokens, MOST_TOKENS)  # a provider's own Usage too
            meter.output += (learnt - meter.output) * _LEARNING_RATE
        # A cached answer counts toward rpm, not tpm.
        tokens = 0 if cached else min(usage.total_tokens, MOST_TOKENS)
        clock = plane.clock
        cost = outcome.cost
        if not isinstance(reservation, Reservation):  # counted in Redis: one settling script
            reservation.settle(tokens, cost, clock.time())
            return None
        reservation.settle(tokens, cost, clock.monotonic(), clock.time())
        if cost:
            state[COUNTED] = True  # the writer moves it from the meters to the figures
        return None

    @hookimpl
    def before_refusal(self, call: Call) -> Awaitable[None] | None:
        """A request refused for what it asked (its body, its model) counts one request
        toward its key's and team's rpm (a client over its limit cannot keep the gateway busy
        with bad requests): a 429 in its place when a window is already full."""
        limits = call.principal.limits
        if limits.__class__ is not KeyLimits or not limits.request_limits:
            return None
        plane = limits.plane or call.request.app[plane_key]
        if plane.shared is not None:  # in Redis, on this process's counters while it is away
            return plane.shared.before_request(call, limits, 0, REQUEST_ONLY, self.count_here)
        _count_request_on(call, limits, plane.clock)
        return None

    def count_here(self, call: Call, limits: KeyLimits, _tokens: int, _held: int) -> None:
        """Count a request refused for what it asked on this process's counters (the fallback
        while Redis is away)."""
        _count_request_on(call, limits, call.request.app[plane_key].clock)

    @hookimpl
    def on_error(self, request: web.Request, call: Call | None) -> None:
        """A failed request keeps its request counted, not its reserved tokens nor cost."""
        reservation: Reservation | None = call.state.get(RESERVATION) if call else None
        if reservation is not None:
            reservation.count_tokens(0, request.app[plane_key].clock.monotonic())


def _reserve_on(
    call: Call, limits: KeyLimits, clock: ControlClock, tokens: int, held: int
) -> Awaitable[None] | None:
    """Count the request in every scope that has room (``Scope.take``), taken back from all
    if one has none, then its headers."""
    now = clock.monotonic()
    wall = clock.time()
    solo = limits.solo
    reservation: Reservation
    if solo is not None:  # one scope (no team): nothing to take back, no loop
        if not solo.take(tokens, held, int(now), wall):
            return _refused(call, limits, solo, clock, tokens, now, wall)
        reservation = SoloReservation(solo, tokens, held)
    else:
        checks = limits.checks
        for scope in checks:
            if not scope.take(tokens, held, int(now), wall):
                for taken in checks[: checks.index(scope)]:  # counted by the scopes before it
                    taken.untake(tokens, held)
                return _refused(call, limits, scope, clock, tokens, now, wall)
        reservation = Reservation(checks, tokens, held)
    call.state[RESERVATION] = reservation
    task = task_of(get_running_loop())
    if task is not None:
        task.add_done_callback(reservation.release)
    else:  # pragma: no cover - hooks always run in the request's task
        reservation.release()
    if limits.limited:
        request_state(call.request)[RATE_LIMIT_HEADERS] = limits.granted(now)
    return None


def _count_request_on(call: Call, limits: KeyLimits, clock: ControlClock) -> None:
    """Count a request toward every scope's rpm alone (no slot, no tokens, no cost), or refuse
    it (429) if one has no room left, counting nothing; its headers either way."""
    now = clock.monotonic()
    checks = limits.checks
    limits.move_to(now)  # for the check and the headers
    full = next((scope for scope in checks if scope.requests.count >= scope.rpm_cap), None)
    if full is None:
        for scope in checks:
            scope.requests.add(1, now)
    request_state(call.request)[RATE_LIMIT_HEADERS] = limits.headers(now)
    if full is not None:
        raise _over_rpm(full, now)


def _refused(
    call: Call,
    limits: KeyLimits,
    scope: Scope,
    clock: ControlClock,
    tokens: int,
    now: float,
    wall: float,
) -> Awaitable[None]:
    """``scope`` has no room: the 429, unless it is for tokens alone and the response cache
    answers the request (``unless_cached``)."""
    reason, refused = _refusal_by(call, limits, scope, tokens, now, wall)
    if reason == "tpm" and CACHE_ANSWERS in call.state:
        return unless_cached(call, refused, lambda: _reserve_on(call, limits, clock, 0, 0))
    raise refused


async def unless_cached(
    call: Call, refused: RateLimited, admit: Callable[[], Awaitable[None] | None]
) -> None:
    """A request refused for its tokens (tpm) alone is admitted, reserving no tokens nor cost,
    if the response cache answers it (a cached answer spends none: it counts toward rpm, not
    tpm); otherwise it stays refused. ``admit`` checks the other limits again: they may have
    moved while the lookup was awaited."""
    answers = call.state.get(CACHE_ANSWERS)
    if answers is None or not await answers(call):
        raise refused
    admitting = admit()
    if admitting is not None:
        await admitting


def _refusal_by(
    call: Call, limits: KeyLimits, scope: Scope, tokens: int, now: float, wall: float
) -> tuple[str, RateLimited]:
    """The refusal of ``scope`` (which has no room) and its reason, with the headers."""
    found = _check(scope, tokens, now, wall)
    if found is None:  # pragma: no cover
        raise AssertionError("a scope without room passed its check")
    if limits.limited:  # also on a 429: the client learns when to come back
        limits.move_to(now)  # for the headers
        request_state(call.request)[RATE_LIMIT_HEADERS] = limits.headers(now)
    return found


def _check(scope: Scope, tokens: int, now: float, wall: float) -> tuple[str, RateLimited] | None:
    """Why ``scope`` refuses a request reserving ``tokens`` ("parallel", "rpm", "tpm" or
    "budget") and its 429; None: it does not."""
    meter = scope.meter
    if scope.max_parallel is not None and meter.in_flight >= scope.max_parallel:
        return "parallel", _refuse(
            f"{_whose(scope)} has {scope.max_parallel} requests in flight, its max_parallel",
            "rate_limit_exceeded",
            1,
            scope.name,
        )
    if scope.rpm is not None and meter.requests.total(now) >= scope.rpm:
        return "rpm", _over_rpm(scope, now)
    if scope.tpm is not None and tokens and meter.tokens.total(now) + tokens > scope.tpm:
        return "tpm", _refuse(
            f"{_whose(scope)} is over its rate limit of {scope.tpm} tokens a minute",
            "rate_limit_exceeded",
            meter.tokens.reset_in(now) or 60,
            scope.name,
        )
    if scope.max_budget is not None:
        ends = scope.period(wall)
        spent = spend_in(scope.entry, meter, ends)
        if spent >= scope.max_budget:
            return "budget", _refuse(
                f"{_whose(scope)} has spent its budget of ${scope.max_budget:g}"
                + (" for this period" if ends is not None else ""),
                "insufficient_quota",
                (ends - wall) if ends is not None else 3600,
                "budget",
            )
        if spent + meter.held * NANO_USD >= scope.max_budget:
            # What is left is reserved by the requests in flight: it may be free once they end.
            return "budget", _refuse(
                f"{_whose(scope)} has the rest of its budget of ${scope.max_budget:g} "
                "reserved by its requests in flight",
                "insufficient_quota",
                1,
                "budget",
            )
    return None


def _over_rpm(scope: Scope, now: float) -> RateLimited:
    """The 429 of a scope whose rpm window is full."""
    return _refuse(
        f"{_whose(scope)} is over its rate limit of {scope.rpm} requests a minute",
        "rate_limit_exceeded",
        scope.requests.reset_in(now),
        scope.name,
    )


def _whose(scope: Scope) -> str:
    return "This API key" if scope.name == "key" else "This API key's team"
