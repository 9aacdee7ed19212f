"""The built-in observer: metrics, the access log and the timing header, on the hook contract.

A middleware (the app's outermost) times each request and, once it is over, queues it: a
request pays for an append. The hooks leave what only they see (the call and its outcome, a
failure) in the request's own dict; the upstream attempts call none (unless the timing header
needs their time): the batch reads a call's failed ones (``FAILED_ATTEMPTS``, its retries
and fallbacks), and a scrape counts the answered ones from the router's count of the answers
each deployment began. ``BATCH_WINDOW`` after the
first of them (or before a scrape, or at shutdown) the requests over meanwhile are counted and
their access lines built and written, one batch: a busy gateway pays for a batch (its loop's
set-up, a write to the log) once every few dozen requests. Registered as the built-in plugin ``observer`` (``[plugins] disable
= ["observer"]`` removes it); with metrics, the access log and the timing header all off it
implements no hook at all, so the request path is as it would be without it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import AbstractRoute

from .._aiohttp import peername, request_state
from ..context import FAILED_ATTEMPTS, RETRIES
from ..deployments import deployments_from
from ..errors import (
    ANSWERED_ERROR,
    SENT_STATUS,
    STOPPED,
    ClientDisconnected,
    ProxyError,
    ServerShutdown,
)
from ..hookspecs import RegisterRoute, hookimpl
from ..masking import mask_client_text
from ..request_ids import REQUEST_ID, request_id
from ..routes import KINDS
from ..server import UNPARSED
from .access_log import ACCESS_LOG, AccessEntry, AccessLine, Clock, direct_handler
from .metrics import (
    CACHE_RESULTS,
    COUNT_AT,
    FLUSH_INTERVAL,
    RATE_LIMIT_SCOPES,
    Metrics,
    metrics_handler,
)

if TYPE_CHECKING:
    from ..config import Config
    from ..context import Call, Deployment
    from ..outcome import Outcome
    from ..router import Router
    from ..runtime import Runtime

__all__ = ["BATCH_WINDOW", "Observer", "observer"]

# Seconds a finished request waits for others to be counted and logged with: its access line
# and counts lag it by at most this (a scrape counts what waits first).
BATCH_WINDOW = 0.01

TIMING_HEADER = "x-aioproxy-overhead-ms"
# A request whose client went away: its status before its answer (nginx's 499), and the access
# line's error then or in the middle of a stream (whose status went out first).
_CLIENT_GONE, _CLIENT_GONE_CODE = ClientDisconnected.status, ClientDisconnected.default_code
# call.state's key for the response cache's result (aioproxy.cache.response_cache.CACHE, which
# imports this module's package).
_CACHE_STATE = "cache"
_MAX_LOGGED_NAME = 128  # a client's model name, as logged (names only: never a label)

_OTHER_HANDLERS = {
    "list_models": "models",
    "get_model": "model",
    "health": "health",
    "readiness": "health",
    "serve_metrics": "metrics",
}


class _Route(NamedTuple):
    kind: str
    path: str | None  # its template (/v1/models/{model}); None: not known
    method: str | None  # None: any (the request's own)


# A request aiohttp could not parse (run.py's server answered it): no method, no path.
_UNPARSED_ROUTE = _Route("other", None, None)
# A route the app did not have as it started (none serves a call): the request's own.
_UNNAMED_ROUTE = _Route("other", None, None)
_MAX_REMOTES = 4096


# Where the hooks leave what they learnt of a request, for its batch to read (the request's own
# dict, read and written in C; the batch pops each, which also lets go of the call).
_ANSWERED = "aioproxy.observer.answered"  # after_response: (call, outcome)
# on_error's failure and an eventful attempt's (or, timed, every attempt's) lessons: _Noted.
_NOTED = "aioproxy.observer.noted"
_STARTED = "aioproxy.observer.started"  # when it came (for the timing header only)
_UNPARSED = "aioproxy.observer.unparsed"  # never parsed: answered by run.py's server

# A request over, as the middleware hands it to its batch: the request, its duration (seconds,
# arrival to its end) and its response (or the status of its end without one).
_Over = tuple[web.Request, float, "web.StreamResponse | int"]


class _Noted(msgspec.Struct):
    """What a request's failure (``on_error``) taught, and with the timing header on its
    upstream attempts' time (a Struct: its defaults are filled in C)."""

    error: Exception | None = None  # the failure on_error heard last
    call: Call | None = None  # the call it came with (None: none, or refused before one)
    upstream_time: float = 0.0  # seconds the upstream attempts took (to their first byte)


# What a request without a failure reads (never written to).
_NOTHING_NOTED = _Noted()


class _Tried(NamedTuple):
    """What a request's upstream attempts come to, for its access line."""

    deployment: Deployment | None  # the last one tried (None: none)
    retries: int
    fallbacks: int
    upstream_429: bool  # one was answered 429 (a 429 of the request is then the upstream's)


def observer(config: Config) -> object:
    """The built-in plugin for ``config``: an :class:`Observer` (one that times the upstream
    attempts for the timing header), or nothing to call when off."""
    if config.server.timing_header:
        return _TimedObserver(config)
    if config.metrics.enabled or config.logging.access_log:
        return Observer(config)
    return _Off()


class _Off:
    """The observer when everything it does is off: no hooks, no middleware."""


class Observer:
    """Metrics, access log and timing header for one app."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.access_log = config.logging.access_log
        self.timing_header = config.server.timing_header
        self.metrics: Metrics | None = None
        self.runtime: Runtime | None = None
        # Each route's kind, template and method, for the access log and requests without a call.
        self.routes: dict[AbstractRoute, _Route] = {}
        # Each connection's client address as logged, by its peer (request.remote makes the
        # text anew on every read): at most _MAX_REMOTES, then begun afresh.
        self.remotes: dict[Any, str | None] = {}
        # Where a batch's access lines go (None: no access log): run.py's handler, written
        # to directly, or the logging API.
        self.write: Callable[[list[AccessLine]], None] | None = None
        self.clock = Clock()  # a batch's lines' time, made once a batch
        # Requests over since the batch's window opened, counted and logged as it closes (a
        # request pays for an append), or before a scrape or at shutdown.
        self.pending: list[_Over] = []
        # Upstream attempts by deployment id and status, as counted (None: no metrics): the
        # failed ones by the batch (FAILED_ATTEMPTS), the answered ones from the router's count.
        self.attempts_counted: dict[tuple[Any, ...], float] | None = None
        self.served_counted: dict[str, int] = {}  # the router's answers begun, as counted
        if config.metrics.enabled:
            table = deployments_from(config)
            self.metrics = Metrics(config, (d.id for ds in table.values() for d in ds))
            self.attempts_counted = self.metrics.upstream.pending

    # -- start-up ---------------------------------------------------------------------------

    def install(self, app: web.Application, runtime: Runtime) -> None:
        """Put the middleware first (it sees every answer, rendered errors included) and the
        timing header on every answer; name each route's kind as the app starts."""
        self.runtime = runtime
        if self.access_log:
            writer = direct_handler()
            if writer is None:
                self.write = _log_entries
            elif ACCESS_LOG.isEnabledFor(logging.INFO):  # run.py set the level already
                self.write = writer.write_all
        if self.metrics is not None:
            # Other workers' scrapes read this one's shared values: they must keep up. One
            # process alone moves its counts on its own scrapes (and as they gather).
            if self.metrics.multiprocess:
                app.cleanup_ctx.append(self._flushing)
            if self.config.metrics.port is not None:
                app.cleanup_ctx.append(self._metrics_port)
        app.on_startup.append(self._name_routes)
        app.setdefault(UNPARSED, []).append(self.unparsed)
        app.middlewares.insert(0, self._middleware())
        app.on_cleanup.append(self._observe_at_cleanup)
        if self.timing_header:
            app.on_response_prepare.append(self._add_timing)

    async def _name_routes(self, app: web.Application) -> None:
        """Each route's kind, template and method, once its paths are final (a host app
        mounting this one prefixes them)."""
        for route in app.router.routes():
            name = getattr(route.handler, "__name__", "")
            kind = name.removeprefix("handle_")
            resource = route.resource
            self.routes[route] = _Route(
                kind if kind in KINDS else _OTHER_HANDLERS.get(name, "other"),
                resource.canonical if resource is not None else "",
                None if route.method == "*" else route.method,
            )

    def _metrics_handler(self, public: bool, counted: bool = True) -> Handler:
        assert self.metrics is not None
        return metrics_handler(
            self.metrics, self.refresh, self.config.auth.master_key, public, counted
        )

    @hookimpl
    def register_routes(self, register: RegisterRoute, config: Config) -> None:
        if self.metrics is not None and config.metrics.port is None:
            register("GET", "/metrics", self._metrics_handler(config.metrics.public))

    async def _flushing(self, app: web.Application) -> AsyncIterator[None]:
        """Under ``--workers``, each process moves its counts into the shared values once a
        second (a scrape in this process does so first anyway)."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            self.refresh()
            handle = loop.call_later(FLUSH_INTERVAL, tick)

        handle = loop.call_later(FLUSH_INTERVAL, tick)
        try:
            yield
        finally:
            handle.cancel()
            self.refresh()

    async def _metrics_port(self, app: web.Application) -> AsyncIterator[None]:
        """``/metrics`` alone on ``[metrics] port`` (no key there: keep that port private)."""
        metrics_app = web.Application()
        # Its own app: no observer middleware counts the scrape in flight.
        metrics_app.router.add_get("/metrics", self._metrics_handler(public=True, counted=False))
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        metrics = self.config.metrics
        # reuse_port: each worker of run.py --workers binds it; any of them sums them all.
        await web.TCPSite(runner, metrics.host, metrics.port, reuse_port=True).start()
        try:
            yield
        finally:
            await runner.cleanup()

    def refresh(self) -> None:
        """Flush this process's counts (the requests over but not yet counted first), and set
        what is read rather than counted (cooldown) from its router."""
        metrics = self.metrics
        if metrics is None:
            return
        self.observe_pending()
        if self.runtime is not None:
            router = self.runtime.router
            self._count_served(router)
            now = router.clock.now()
            for deployments in self.runtime.deployments.values():
                for deployment in deployments:
                    metrics.cooling(deployment.id, router.health(deployment).cooldown_until > now)
        metrics.flush()

    # -- per request ----------------------------------------------------------------------------

    def _middleware(self) -> Any:
        metrics = self.metrics
        pending = self.pending
        observe_pending = self.observe_pending
        monotonic = time.monotonic
        timing = self.timing_header

        @web.middleware
        async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = monotonic()
            if timing:
                request_state(request)[_STARTED] = started
            if metrics is not None:
                metrics.active += 1  # its batch takes it off again
            ended: web.StreamResponse | int = 500
            try:
                ended = await handler(request)
                return ended
            except asyncio.CancelledError:  # its client went away, or the gateway stopped
                ended = request.get(SENT_STATUS) or (  # a stream's keep-alive had sent its 200
                    ServerShutdown.status if request.get(STOPPED) else _CLIENT_GONE
                )
                raise
            except web.HTTPException as exc:  # a redirect a plugin's route raised
                ended = exc.status
                raise
            finally:
                # Over (its last byte sent, or its client gone): counted and logged with the
                # others over within the window its batch's first opened.
                if not pending:
                    asyncio.get_running_loop().call_later(BATCH_WINDOW, observe_pending)
                pending.append((request, monotonic() - started, ended))

        return observe

    def unparsed(self, request: web.BaseRequest, response: web.StreamResponse, code: str) -> None:
        """A request aiohttp could not parse, answered by run.py's server: the middleware never
        saw it, so it joins the pending batch here (no time of arrival is known: none is
        counted)."""
        state = request_state(request)
        state[_UNPARSED] = True
        state[_NOTED] = _Noted(ProxyError("", code=code))
        if self.metrics is not None:
            self.metrics.active += 1  # the batch takes it off again
        if not self.pending:
            asyncio.get_running_loop().call_later(BATCH_WINDOW, self.observe_pending)
        self.pending.append((request, 0.0, response))  # type: ignore[arg-type]

    async def _observe_at_cleanup(self, app: web.Application) -> None:
        self.observe_pending()

    async def _add_timing(self, request: web.Request, response: web.StreamResponse) -> None:
        state = request_state(request)
        started = state.get(_STARTED)
        if started is not None:
            noted = state.get(_NOTED)
            upstream_time = noted.upstream_time if noted is not None else 0.0
            overhead = time.monotonic() - started - upstream_time
            response.headers[TIMING_HEADER] = f"{max(overhead, 0.0) * 1000:.3f}"

    @hookimpl(trylast=True)  # after the spend plugin (tryfirst) has priced it
    def after_response(self, call: Call, outcome: Outcome) -> None:
        request_state(call.request)[_ANSWERED] = (call, outcome)

    @hookimpl
    def on_error(self, request: web.Request, error: Exception, call: Call | None) -> None:
        noted = self._noted(request_state(request))
        noted.error = error
        if call is not None:  # (a later error without one keeps the call heard before)
            noted.call = call

    @staticmethod
    def _noted(state: dict[Any, Any]) -> _Noted:
        noted = state.get(_NOTED)
        if noted is None:
            noted = state[_NOTED] = _Noted()
        return noted

    def _count_served(self, router: Router) -> None:
        """Count the upstream attempts answered since the last time (status 200) from the
        router's count of the answers each deployment began: no hook call an attempt."""
        counted = self.attempts_counted
        if counted is None:
            return
        served_counted = self.served_counted
        for key, served in router.served().items():
            new = served - served_counted.get(key, 0)
            if new:
                served_counted[key] = served
                counted_key = (key, 200)  # a key is the deployment's id: made a label when flushed
                counted[counted_key] = counted.get(counted_key, 0) + new

    def _tried(self, call: Call, failed: list[tuple[Deployment, int | str]]) -> _Tried:
        """Count a request's failed attempts (its FAILED_ATTEMPTS) and the retries and
        fallbacks they led to; the deployment tried last."""
        counts = call.state.get(RETRIES)
        retries, fallbacks = counts if counts is not None else (0, 0)
        tried = [deployment for deployment, _ in failed]
        if 1 + retries + fallbacks > len(tried):  # one more attempt: it answered
            tried.append(call.deployment)
        upstream_429 = any(status == 429 for _, status in failed)
        metrics, counted = self.metrics, self.attempts_counted
        if metrics is not None and counted is not None:
            for deployment, status in failed:
                key = (deployment.id, status)  # made labels when flushed
                counted[key] = counted.get(key, 0) + 1
                if status == 429:
                    metrics.rate_limited.add(("upstream",))
            # Each attempt after the first: a retry of the model tried before, or a fallback.
            for before, after in itertools.pairwise(tried):
                if after.name == before.name:
                    metrics.retries.add((metrics.model(after.name),))
                else:
                    metrics.fallbacks.add((metrics.model(call.model),))
        return _Tried(tried[-1], retries, fallbacks, upstream_429)

    def observe_pending(self) -> None:
        """Count and log the requests over since the last batch: one loop, its lookups bound
        once, is each request's share of observing. A request with a call (the usual one) is
        observed inline; one without (refused before its body, a route of the gateway's own)
        by :meth:`_observe_without_call`."""
        pending = self.pending
        if not pending:
            return
        batch = pending.copy()
        pending.clear()
        write = self.write
        when = self.clock.iso(time.time()) if write is not None else None
        lines: list[AccessLine] = []
        metrics = self.metrics
        routes = self.routes
        remotes = self.remotes
        for request, elapsed, end in batch:
            try:
                state = request_state(request)
                # Popped: the request lets go of its call (request -> call -> request would be
                # cyclic garbage, freed only by the collector's full passes).
                answered = state.pop(_ANSWERED, None)
                noted: _Noted = state.pop(_NOTED, _NOTHING_NOTED)
                error = noted.error
                call = noted.call
                if answered is not None:
                    call, outcome = answered
                    status = outcome.status
                    usage = outcome.usage()
                    cost = outcome.cost
                    ttft = outcome.ttfb if outcome.stream else None
                    gone = outcome.disconnected
                else:
                    status = end if type(end) is int else end.status  # type: ignore[union-attr]
                    usage = cost = ttft = None
                    gone = False
                if status >= 400:  # the error the client got (a hook's may be its cause)
                    error = state.get(ANSWERED_ERROR, error)
                if call is None:
                    self._observe_without_call(request, state, status, elapsed, error, when, lines)
                    continue
                routed = call.routed_to  # (the attribute: routed and deployment are properties)
                failed = call.state.get(FAILED_ATTEMPTS)
                if failed is None:  # the usual request: its one attempt, if any, answered
                    deployment = routed
                    retries = fallbacks = 0
                    upstream_429 = False
                else:
                    deployment, retries, fallbacks, upstream_429 = self._tried(call, failed)
                kind = call.kind._value_  # Kind.value is a Python property: the attribute
                cache = call.state.get(_CACHE_STATE)
                if gone or status == _CLIENT_GONE:
                    code = _CLIENT_GONE_CODE
                else:  # (the usual request has no error: no isinstance() for it)
                    code = None if error is None else _code(error)
                if metrics is not None:
                    counted_usage = usage  # the tokens the upstreams reported
                    if cache is not None:
                        metrics.cache.add((cache if cache in CACHE_RESULTS else "other",))
                        if cache == "hit":
                            counted_usage = None
                    metrics.finished.append(
                        (
                            kind,
                            call.model,
                            deployment.name if deployment is not None else None,
                            status,
                            elapsed,
                            counted_usage,
                            cost,
                            ttft,
                        )
                    )
                    if status == 429 and not upstream_429:
                        metrics.rate_limited.add((_scope(error),))
                    if code is not None and status < 400:  # a stream cut after its 200
                        metrics.stream_error(call.model, code)
                if write is None:
                    continue
                # (A call's route is one of the app's: named as it started.)
                route = routes.get(request.match_info.route, _UNNAMED_ROUTE)
                # A name no deployment has is the client's text: masked where it holds a key.
                model = call.model[:_MAX_LOGGED_NAME]
                if routed is None:
                    model = mask_client_text(request, model)
                principal = call.principal
                lines.append(
                    AccessLine(  # positionally, in AccessLine's order
                        when,
                        call._request_id,  # (Call.request_id is a Python property)
                        route.method or request.method,
                        route.path if route.path is not None else _logged_path(request),
                        kind,
                        status,
                        code,
                        principal.name,
                        principal.team_name,
                        model or None,
                        (deployment.id or deployment.describe())
                        if deployment is not None
                        else None,
                        call.stream,
                        usage.prompt_tokens if usage is not None else None,
                        usage.completion_tokens if usage is not None else None,
                        cost,
                        # Milliseconds to the µs (int() and a division: round() goes through text).
                        int(ttft * 1e6 + 0.5) / 1000 if ttft is not None else None,
                        int(elapsed * 1e6 + 0.5) / 1000,
                        retries,
                        fallbacks,
                        cache,
                        remotes.get(peername(request)) or self._remote(request),
                        call.upstream_request_id,
                    )
                )
            except Exception:  # the answers are out: a bug here must not lose the others
                logging.getLogger("aioproxy").exception("observing a request failed")
        if metrics is not None:
            metrics.active -= len(batch)
            if len(metrics.finished) >= COUNT_AT:
                metrics.count_finished()
        if lines:
            assert write is not None
            write(lines)

    def _remote(self, request: web.BaseRequest) -> str | None:
        """The client address of ``request``'s connection, as logged: made once a connection
        (None, for a peer aiohttp does not know, each time)."""
        remotes = self.remotes
        if len(remotes) >= _MAX_REMOTES:  # connections come and go: forget the old ones
            remotes.clear()
        remote = remotes[peername(request)] = request.remote
        return remote

    def _observe_without_call(
        self,
        request: web.Request,
        state: dict[Any, Any],
        status: int,
        elapsed: float,
        error: Exception | None,
        when: str | None,
        lines: list[AccessLine],
    ) -> None:
        """Count and log a request that had no call (and so no upstream attempt): refused
        before its body was read, a route of the gateway's own (models, health, metrics), or
        one never parsed."""
        unparsed = _UNPARSED in state
        route = _UNPARSED_ROUTE if unparsed else self.routes.get(request.match_info.route)
        kind = route.kind if route is not None else "other"
        metrics = self.metrics
        if metrics is not None:
            metrics.finished.append(
                (
                    kind,
                    None,
                    None,
                    status,
                    elapsed,
                    None,
                    None,
                    None,
                )
            )
            if status == 429:
                metrics.rate_limited.add((_scope(error),))
        if self.write is None:
            return
        if route is None:
            method: str | None = request.method
        else:
            method = None if unparsed else (route.method or request.method)
        lines.append(
            AccessLine(  # positionally, in AccessLine's order
                when,
                state.get(REQUEST_ID) or request_id(request),
                method,
                route.path if route is not None else _logged_path(request),
                kind,
                status,
                _CLIENT_GONE_CODE if status == _CLIENT_GONE else _code(error),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                int(elapsed * 1e6 + 0.5) / 1000,
                0,
                0,
                None,
                request.remote,
                None,
            )
        )


class _TimedObserver(Observer):
    """The observer with the timing header on: each upstream attempt's time is noted (the
    header is the request's time less theirs), so each pays for an ``after_attempt`` call."""

    @hookimpl
    def after_attempt(self, call: Call, elapsed: float) -> None:
        self._noted(request_state(call.request)).upstream_time += elapsed


def _code(error: BaseException | None) -> str | None:
    """The access line's error: the code of the error the client got, if one of ours (one that
    cut a stream after its status went out is named by its type when it has no code: the
    line's status is the client's 200, and only this says the stream failed)."""
    if not isinstance(error, ProxyError):
        return None
    return error.code or (error.type if error.sent_status else None)


def _logged_path(request: web.BaseRequest) -> str:
    """A path no route has, as logged: cut short, a secret pasted in masked."""
    return mask_client_text(request, request.path)[:_MAX_LOGGED_NAME]


def _scope(error: BaseException | None) -> str:
    """Who refused: a plugin's error may say (``scope = "key"``); the gateway's own caps else."""
    scope = getattr(error, "scope", None)
    return scope if scope in RATE_LIMIT_SCOPES else "deployment"


def _log_entries(lines: list[AccessLine]) -> None:
    """Access lines through the logging API (an app embedded elsewhere)."""
    if ACCESS_LOG.isEnabledFor(logging.INFO):
        for fields in lines:
            ACCESS_LOG.info(AccessEntry(fields))
