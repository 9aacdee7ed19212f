"""A finished request's request-log row, built by the log's writer, off the request's task.

The request path queues only what it already has (``Finished``: the call, its outcome, the wall
time, whether it failed); reading the usage, pricing, the end user and the row's values are done
here, a batch at a time, in the writer's task.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from ..context import Call
from ..outcome import Outcome, Usage
from .cache import KeyCache
from .meters import KeyLimits
from .pricing import Pricing
from .records import period_end
from .requestlog import LogRecord

__all__ = ["COUNTED", "FAILED", "Finished", "RowBuilder", "estimate_prompt", "estimate_usage"]

# call.state keys: the error code of a failed request; that the limits plugin added the
# request's cost to its key's and team's meters (the writer then moves it into their figures).
FAILED = "aioproxy.control.failed"
COUNTED = "aioproxy.control.counted"


class Finished(NamedTuple):
    """What the request path hands the writer: nothing computed, only references."""

    call: Call
    outcome: Outcome
    wall: float  # the time it finished (the control plane's clock)
    failed: bool = False


def estimate_prompt(call: Call) -> int:
    """About four bytes a token, the body's fields all counted."""
    return call.body_size() // 4


def estimate_usage(call: Call, outcome: Outcome) -> Usage:
    """Tokens when the upstream said nothing: the prompt at four bytes a token, the answer at
    one token an event (a stream) or four bytes."""
    prompt = estimate_prompt(call)
    answer = outcome.events if outcome.stream else len(outcome.body or b"") // 4
    return Usage(prompt, answer, prompt + answer)


def _end_user(call: Call) -> str | None:
    for name in ("user", "safety_identifier"):
        if name in call.fields:
            value = call.get(name)
            if isinstance(value, str):
                return value[:200]
    return None


class RowBuilder:
    def __init__(self, pricing: Pricing, cache: KeyCache, log_rows: bool) -> None:
        self.pricing = pricing
        self.cache = cache
        self.log_rows = log_rows
        self._day_number = -1
        self._day_text = ""

    def __call__(self, finished: Finished) -> LogRecord:
        call, outcome, wall, failed = finished
        principal = call.principal
        limits = principal.limits if principal.limits.__class__ is KeyLimits else None
        deployment = call.deployment if call.routed else None
        duration = outcome.elapsed
        if failed:
            usage, estimated, cost, ttft = Usage(), False, None, None
        else:
            found = outcome.usage()
            estimated = found is None
            usage = estimate_usage(call, outcome) if found is None else found
            cost = outcome.cost
            if cost is None and estimated:
                cost = self.pricing.cost(usage, deployment)
            # A whole JSON answer's first token came with the rest of it.
            ttft = outcome.ttfb if outcome.ttfb is not None else duration
        values = (  # schema.REQUEST_COLUMNS' order
            call.request_id,
            wall,
            self._day(wall),
            principal.id or None,
            principal.name,
            principal.team,
            _end_user(call),
            call.model,
            deployment.key if deployment else None,
            deployment.provider if deployment else None,
            call.kind.value,
            outcome.status,
            call.state.get(FAILED),
            outcome.stream,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            estimated,
            cost,
            ttft,
            duration,
        )
        key, team = (limits.key, limits.team) if limits else (None, None)
        return LogRecord(
            values,
            principal.id or None,
            principal.team,
            wall,
            cost or 0.0,
            key_period=period_end(key.created_at, key.duration, wall) if key else None,
            team_period=period_end(team.created_at, team.duration, wall) if team else None,
            spend_only=not self.log_rows,
            counted=COUNTED in call.state,
        )

    def _day(self, wall: float) -> str:
        """The UTC date of ``wall``, formatted once a day."""
        day = int(wall // 86400)
        if day != self._day_number:
            self._day_number = day
            self._day_text = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
        return self._day_text
