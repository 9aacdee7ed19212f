"""The ``spend`` plugin: what each request cost, and its row in the request log.

``after_response`` (tryfirst) hands ``outcome`` the deployment's pricer, so that ``outcome.cost``
is the usage priced the moment an ``after_response`` implementation reads it, and queues the
finished request for the log's writer, which reads its usage, prices it and builds its row in
its own batch (``rows``): a request pays for a list append, not for its row. A reply without
usage is priced on an estimate, marked ``estimated``. Failed requests are logged too, from
``on_error``: every one whose key is known, refused ones included.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ..config import Config
from ..context import STREAM_FILTER, Call
from ..errors import ProxyError
from ..hookspecs import hookimpl
from ..outcome import Outcome
from .meters import KeyLimits
from .plane import ControlPlane, plane_key
from .rows import FAILED, Finished
from .usage_tap import UsageTap, tap_unasked_usage

__all__ = ["Spend"]

_LOGGED = "aioproxy.control.logged"


class Spend:
    def __init__(self, config: Config) -> None:
        self.config = config
        # With the log off, only database keys' requests are queued (their spend is written).
        self.log_rows = config.spend.log
        # The app's control plane, once a request found it there (an instance serves the one
        # app its plugin manager was made for): no request.app lookup a request after that,
        # until it is closed (the same app started again has a new one).
        self._plane: ControlPlane | None = None

    @hookimpl
    def before_request(self, call: Call) -> None:
        # A stream whose client did not ask for its usage is asked for it, so that its row
        # (and a database key's spend) has the upstream's own counts, not an estimate; the
        # usage chunk is taken out of what the client gets. Every stream logged, or counted.
        if call.stream and (self.log_rows or call.principal.limits.__class__ is KeyLimits):
            tap_unasked_usage(call)

    @hookimpl(tryfirst=True)
    def after_response(self, call: Call, outcome: Outcome) -> None:
        # Every request passes here: a few lookups and one append (``Finished``), nothing more.
        plane = self._plane
        if plane is None or plane.closed:  # closed: the app was started again
            plane = call.request.app.get(plane_key)
            if plane is None:  # no control plane (yet)
                return
            self._plane = plane
        state = call.state
        if call.stream:
            tap = state.get(STREAM_FILTER)
            if tap.__class__ is UsageTap and (usage := tap.found) is not None:
                # The tap read it on its way (the client may not have seen it); ``found``,
                # what ``usage()`` returns, with no call.
                outcome.record_usage(usage)
        if (deployment := call.routed_to) is not None:
            outcome.pricer = plane.pricing.pricer(deployment)
        if self.log_rows or call.principal.limits.__class__ is KeyLimits:
            state[_LOGGED] = True
            plane.log.add_finished(Finished.of(call, outcome, plane.clock.time()))

    @hookimpl
    def on_error(self, request: web.Request, error: Exception, call: Call | None) -> None:
        """Log a failed request, refused ones too (the call exists once its key is known:
        a body refused as it is read is logged with the key, ``model`` if the body named it).

        A failed authentication (``call`` None: an unknown, disabled or expired key, or none)
        is not: no key owns it, and rows an unauthenticated flood could write at no cost would
        grow the database without bound and crowd the keys' rows out of the writer's bounded
        buffer. It is counted (``aioproxy_requests_total{status="401"}``) and has its access
        log line; nothing presented as a key is written anywhere.

        A stream that fails midway still gets ``after_response``, which logs it with its
        usage: so the row is queued when the request's task ends, by whichever comes last."""
        plane = request.app.get(plane_key)
        if plane is None or call is None or FAILED in call.state:
            return
        if not self.log_rows and call.principal.limits.__class__ is not KeyLimits:
            return
        status, code = _status_and_code(error)
        call.state[FAILED] = code

        def log_failure(_task: object = None) -> None:
            if _LOGGED not in call.state:
                outcome = Outcome(status, stream=call.stream)
                outcome.elapsed = time.monotonic() - call.started
                plane.log.add_finished(Finished.of(call, outcome, plane.clock.time(), failed=True))

        task = asyncio.current_task()
        if task is None:  # pragma: no cover - hooks run in the request's task
            log_failure()
        else:
            task.add_done_callback(log_failure)


def _status_and_code(error: Exception) -> tuple[int, str]:
    """The status and error code the client got for ``error`` (the handler hands aiohttp's
    own refusals on as the ProxyError the error middleware answers with; a stream cut after
    its 200 keeps that status)."""
    if isinstance(error, ProxyError):
        return error.sent_status or error.status, error.code or error.type
    return 500, "internal_error"
