"""The ``spend`` plugin: what each request cost, and its row in the request log.

``after_response`` (tryfirst) sets ``outcome.cost`` from the upstream's usage and the
deployment's price, so the other ``after_response`` implementations can read it, then queues
the request's log row. A reply without usage is priced on an estimate, marked ``estimated``.
Failed requests are logged too, from ``on_error``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from aiohttp import web

from ..config import Config
from ..context import STREAM_FILTER, Call
from ..errors import ProxyError
from ..hookspecs import hookimpl
from ..outcome import Outcome, Usage
from ..routes import Kind
from .limits import ESTIMATED_TOKENS, estimate_prompt
from .meters import KeyLimits
from .plane import ControlPlane, plane_key
from .records import period_end
from .requestlog import LogRecord
from .usage_tap import TAPPED_KINDS, UsageTap, asks_usage

__all__ = ["Spend"]

_LOGGED = "aioproxy.control.logged"
_FAILED = "aioproxy.control.failed"  # the error code of a failed request


def _estimate(call: Call, outcome: Outcome) -> Usage:
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


class Spend:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._day_number = -1
        self._day_text = ""

    @hookimpl
    def before_request(self, call: Call) -> None:
        # Only a database key's spend is counted (its budget, its spend figures), so only its
        # streams are tapped: a config key's stream goes through untouched, logged with the
        # usage its client asked for, else an estimate (marked so).
        if (
            call.stream
            and call.principal.limits.__class__ is KeyLimits
            and call.kind in TAPPED_KINDS
            and STREAM_FILTER not in call.state
            and not asks_usage(call)
            and isinstance(call.get("stream_options", {}), dict)  # else the provider refuses it
        ):
            call.state[STREAM_FILTER] = UsageTap(call)

    @hookimpl(tryfirst=True)
    def after_response(self, call: Call, outcome: Outcome) -> None:
        plane = call.request.app.get(plane_key)
        if plane is None:
            return
        tap = call.state.get(STREAM_FILTER)
        if isinstance(tap, UsageTap) and (usage := tap.usage()) is not None:
            # The tap read it on its way (the client may not have seen it): other hooks get it
            # without the stream's last events being parsed again.
            outcome.record_usage(usage)
        else:
            usage = outcome.usage()
        estimated = usage is None and call.kind is not Kind.COUNT_TOKENS  # counting is free
        if estimated:
            usage = _estimate(call, outcome)
            call.state[ESTIMATED_TOKENS] = usage.total_tokens
        elif usage is None:
            usage = Usage()
        outcome.cost = plane.pricing.cost(usage, call.deployment)
        duration = outcome.elapsed or time.monotonic() - call.started
        # A whole JSON answer's first token came with the rest of it.
        ttft = outcome.ttfb if outcome.ttfb is not None else duration
        self._log(
            plane,
            call,
            outcome.status,
            outcome.stream,
            usage,
            estimated,
            outcome.cost,
            ttft,
            duration,
        )

    @hookimpl
    def on_error(self, request: web.Request, error: Exception, call: Call | None) -> None:
        """Log a failed request. A stream that fails midway still gets ``after_response``,
        which logs it with its usage: so the row is written when the request's task ends, by
        whichever comes last."""
        plane = request.app.get(plane_key)
        if plane is None or call is None or _FAILED in call.state:
            return
        status = error.status if isinstance(error, ProxyError) else 500
        code = (error.code or error.type) if isinstance(error, ProxyError) else "internal_error"
        call.state[_FAILED] = code

        def log_failure(_task: object = None) -> None:
            if _LOGGED not in call.state:
                self._log(
                    plane,
                    call,
                    status,
                    call.stream,
                    Usage(),
                    False,
                    None,
                    None,
                    time.monotonic() - call.started,
                )

        task = asyncio.current_task()
        if task is None:  # pragma: no cover - hooks run in the request's task
            log_failure()
        else:
            task.add_done_callback(log_failure)

    def _log(
        self,
        plane: ControlPlane,
        call: Call,
        status: int,
        stream: bool,
        usage: Usage,
        estimated: bool,
        cost: float | None,
        ttft: float | None,
        duration: float,
    ) -> None:
        wall = plane.clock.time()
        principal = call.principal
        limits = principal.limits if isinstance(principal.limits, KeyLimits) else None
        deployment = call.deployment
        values = (  # schema.REQUEST_COLUMNS' order
            plane.request_id(),
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
            status,
            call.state.get(_FAILED),
            stream,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            estimated,
            cost,
            ttft,
            duration,
        )
        record = LogRecord(
            values,
            principal.id or None,
            principal.team,
            wall,
            cost or 0.0,
            key_period=period_end(limits.key.created_at, limits.key.duration, wall)
            if limits
            else None,
            team_period=(
                period_end(limits.team.created_at, limits.team.duration, wall)
                if limits and limits.team
                else None
            ),
            spend_only=not self.config.spend.log,
        )
        call.state[_LOGGED] = True
        plane.log.add(record)

    def _day(self, wall: float) -> str:
        """The UTC date of ``wall``, formatted once a day."""
        day = int(wall // 86400)
        if day != self._day_number:
            self._day_number = day
            self._day_text = datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")
        return self._day_text
