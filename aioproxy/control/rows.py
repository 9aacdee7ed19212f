"""A finished request's request-log row, built by the log's writer, off the request's task.

The request path queues only what it already has (``Finished``: references to the caller, the
deployment, the outcome, and a few values); reading the usage, pricing, the end user and the
row's values are done here, a batch at a time, in the writer's task. The record holds neither
the aiohttp request nor the call: a second's worth of those kept alive would cost the garbage
collector more than the row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from ..context import RETRIES, Call, Deployment, Principal
from ..outcome import Outcome, Usage
from ..routes import Kind
from . import schema
from .cache import KeyCache
from .meters import KeyLimits
from .pricing import Pricing
from .requestlog import LogRecord

__all__ = [
    "COUNTED",
    "ESTIMATED",
    "FAILED",
    "Finished",
    "RowBuilder",
    "estimate_prompt",
    "estimate_usage",
]

# call.state keys: the error code of a failed request; that the limits plugin added the
# request's cost to its key's and team's meters (the writer then moves it into their figures).
FAILED = "aioproxy.control.failed"
COUNTED = "aioproxy.control.counted"
# call.state key: the usage the limits plugin estimated for an answer that reported none (the
# row then takes it, estimated once).
ESTIMATED = "aioproxy.control.estimated"
_COUNTING = Kind.COUNT_TOKENS.value
_NONE_RETRIED = (0, 0)  # retries, fallbacks of a request answered at its first attempt


class Finished(NamedTuple):
    """What the request path hands the writer: nothing computed, only references."""

    principal: Principal
    deployment: Deployment | None
    model: str
    kind: str
    request_id: str
    end_user: msgspec.Raw | None  # the body's user/safety_identifier, undecoded
    prompt_bytes: int  # the body's size, for an estimate when the upstream reports no usage
    state: dict[str, Any]  # the call's (the limits plugin marks COUNTED there after the queueing)
    outcome: Outcome
    wall: float  # the time it finished (the control plane's clock)
    failed: bool = False

    @classmethod
    def of(cls, call: Call, outcome: Outcome, wall: float, failed: bool = False) -> Finished:
        fields = call.fields
        end_user = fields.get("user") or fields.get("safety_identifier")
        if end_user is not None:
            # A Raw is a view of the request's body: queued as is, it would keep it all alive.
            end_user = end_user.copy()
        # tuple.__new__: the named tuple made in C, not by its Python __new__; ``_value_``:
        # the kind's value as the enum stores it, not through its ``value`` descriptor.
        return tuple.__new__(
            cls,
            (
                call.principal,
                call.routed_to,
                call.model,
                call.kind._value_,
                call.request_id,
                end_user,
                call.body_size(),
                call.state,
                outcome,
                wall,
                failed,
            ),
        )


def estimate_prompt(call: Call) -> int:
    """About four bytes a token, the body's fields all counted."""
    return call.body_size() // 4


def estimate_usage(prompt_bytes: int, outcome: Outcome) -> Usage:
    """Tokens when the upstream said nothing: the prompt at four bytes a token, the answer at
    one token an event (a stream) or four bytes."""
    prompt = prompt_bytes // 4
    answer = outcome.events if outcome.stream else len(outcome.body or b"") // 4
    return Usage(prompt, answer, prompt + answer)


def _length(column: str) -> int:
    length = getattr(schema.requests.c[column].type, "length", None)
    assert isinstance(length, int), column
    return length


# What a row's text columns hold at most: text a client (or an upstream) chose is cut to it.
_NAME, _END_USER, _MODEL, _CODE = map(_length, ("key_name", "end_user", "model", "error_code"))


def _storable(text: str | None, limit: int) -> str | None:
    """Text as its column can store it: at most ``limit`` characters, and no NUL (PostgreSQL
    refuses one in text, and with it the row's whole batch)."""
    if text is None or (len(text) <= limit and "\x00" not in text):
        return text
    return text.replace("\x00", "")[:limit]


def _end_user(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        value = _decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    return _storable(value, _END_USER) if isinstance(value, str) else None


_decode = msgspec.json.Decoder().decode
# The most a row's token column holds: a larger count would refuse the row's whole batch, and
# the writer would retry it for ever (no row, no spend after it).
_MOST_COUNT = schema.MOST_INTEGER


def _bounded(usage: Usage) -> Usage:
    """``usage`` with each count at most ``_MOST_COUNT``."""
    return Usage(*(min(count, _MOST_COUNT) for count in msgspec.structs.astuple(usage)))


_BOOLS = (False, True)
_NO_USAGE = Usage()


class RowBuilder:
    def __init__(self, pricing: Pricing, cache: KeyCache, log_rows: bool) -> None:
        self.pricing = pricing
        self.cache = cache
        self.log_rows = log_rows
        # The row's booleans as the driver binds them cheapest: sqlite3 passes ints to SQLite
        # as they are, but adapts each bool (~1.2 kIr); asyncpg wants bools.
        self._flags: tuple[Any, Any] = (0, 1) if cache.engine.dialect.name == "sqlite" else _BOOLS
        self._day_number = -1
        self._day_text = ""

    def __call__(self, finished: Finished) -> LogRecord:
        principal, deployment, outcome, wall = (
            finished.principal,
            finished.deployment,
            finished.outcome,
            finished.wall,
        )
        limits = principal.limits if principal.limits.__class__ is KeyLimits else None
        duration = outcome.elapsed
        if finished.failed:
            usage, estimated, cost, ttft = _NO_USAGE, False, None, None
        elif finished.kind == _COUNTING:  # counting tokens is free: never charged nor estimated
            usage, estimated, cost, ttft = _NO_USAGE, False, 0.0, outcome.ttfb
        else:
            found = outcome.usage()
            estimated = found is None
            if found is not None:
                usage = found
            else:
                usage = finished.state.get(ESTIMATED) or estimate_usage(
                    finished.prompt_bytes, outcome
                )
            cost = outcome.cost
            if cost is None and estimated:
                cost = self.pricing.cost(usage, deployment)
            # A whole JSON answer's first token came with the rest of it.
            ttft = outcome.ttfb if outcome.ttfb is not None else duration
            if usage.total_tokens > _MOST_COUNT or usage.prompt_tokens > _MOST_COUNT:
                usage = _bounded(usage)  # a provider's own Usage of absurd counts
        state, flags, key_id = finished.state, self._flags, principal.id or None
        model, code = finished.model or None, state.get(FAILED)
        values = (  # schema.REQUEST_COLUMNS' order
            finished.request_id,
            wall,
            self._day_text if wall // 86400 == self._day_number else self._day(wall),
            key_id,
            _storable(principal.name, _NAME),
            principal.team,
            None if finished.end_user is None else _end_user(finished.end_user),
            _storable(model, _MODEL),  # None for '': a body that named none
            deployment.key if deployment else None,
            deployment.provider if deployment else None,
            finished.kind,
            outcome.status,
            None if code is None else _storable(code, _CODE),
            flags[outcome.stream],
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            flags[estimated],
            cost,
            ttft,
            duration,
            *state.get(RETRIES, _NONE_RETRIED),
        )
        key_period = team_period = None
        if limits is not None:  # each scope's budget period, as its limits last found it
            checks = limits.checks
            key_period = checks[0].period(wall)
            team_period = checks[1].period(wall) if len(checks) > 1 else None
        # tuple.__new__: the named tuple made in C (its own __new__ is a Python call, ~2 kIr).
        return tuple.__new__(
            LogRecord,
            (
                values, key_id, principal.team, wall, cost or 0.0, key_period, team_period,
                not self.log_rows, COUNTED in state,
            ),
        )  # fmt: skip

    def _day(self, wall: float) -> str:
        """The UTC date of ``wall``, formatted once a day."""
        day = int(wall // 86400)
        if day != self._day_number:
            self._day_number = day
            self._day_text = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
        return self._day_text
