"""The ``cache`` plugin (``[cache] enabled``): answers looked up before the upstream and kept
after it.

A hit re-routes the call to the ``aioproxy-cache`` deployment, whose provider replays the
entry: routing, limits (a hit counts toward the key's rpm, not its tpm), hooks and the spend
log (provider ``aioproxy-cache``, price 0: a hit costs nothing) treat it as any answer, and no
upstream is called. ``Cache-Control: no-cache`` skips the lookup, ``no-store`` the write; the
answer says ``x-aioproxy-cache: hit|miss``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..config import Config, Price
from ..context import CACHE_ANSWERS, STREAM_FILTER, STREAM_RECORDER, Call, Deployment
from ..control.usage_tap import UsageTap, asks_usage, tap_unasked_usage
from ..hookspecs import RegisterContext, RegisterProvider, hookimpl
from ..outcome import Outcome
from ..providers import Provider, Reply
from ..state.shared import link_key
from .coalescing import InFlight
from .lookup import cache_key, cacheable
from .replay import Recorder, replay, split_usage
from .stores import Entry, MemoryStore, Store

__all__ = [
    "CACHE",
    "CacheProvider",
    "ResponseCache",
    "in_flight_key",
    "response_cache",
    "store_key",
]

CACHE = "cache"  # call.state: "hit", "miss" or "bypass" (what metrics and the access log read)
_HIT = "aioproxy.cache.hit"  # call.state: the Entry a hit replays
_KEY = "aioproxy.cache.key"  # call.state: the request's cache key (it is cacheable)
_LOOKUP = "aioproxy.cache.lookup"  # call.state: the lookup under way
_FOUND = "aioproxy.cache.found"  # call.state: what the lookup found (None: a miss)
_RECORD = "aioproxy.cache.record"  # call.state: the key to keep the answer under
_FIRST = "aioproxy.cache.first"  # call.state: the first miss's answer, for its waiters
PROVIDER = "aioproxy-cache"
_HEADER = web.RequestKey("aioproxy.cache.header", str)

store_key = web.AppKey("aioproxy.cache.store", Store)
in_flight_key = web.AppKey("aioproxy.cache.in_flight", InFlight)


class CacheProvider(Provider):
    """Replays the entry the lookup found, in the form the request asks for."""

    name = PROVIDER

    async def _replay(self, call: Call) -> Reply:
        entry: Entry = call.state[_HIT]
        return replay(call.kind, entry, call.stream, asks_usage(call))

    async def chat_completions(self, call: Call) -> Reply:
        return await self._replay(call)

    async def completions(self, call: Call) -> Reply:
        return await self._replay(call)

    async def embeddings(self, call: Call) -> Reply:
        return await self._replay(call)

    async def responses(self, call: Call) -> Reply:
        return await self._replay(call)


async def _add_header(request: web.Request, response: web.StreamResponse) -> None:
    if (result := request.get(_HEADER)) is not None:
        response.headers["x-aioproxy-cache"] = result


def response_cache(config: Config) -> object:
    """The built-in plugin for ``config``: a :class:`ResponseCache`, or nothing to call when
    ``[cache]`` is off (no hook on any request's path)."""
    return ResponseCache(config) if config.cache.enabled else _Off()


class _Off:
    """The cache when off: no hooks."""


class ResponseCache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cache = config.cache
        self.enabled = config.cache.enabled
        self.store: Store | None = None
        self.in_flight = InFlight()
        self._hit_deployments: dict[str, Deployment] = {}

    @hookimpl
    def register_providers(self, register: RegisterProvider) -> None:
        if self.enabled:
            register(CacheProvider)

    # trylast, like the state plugin's, and registered after it: its context runs after the
    # state's, whose Redis link a Redis store shares (one batch for a request's calls).
    @hookimpl(trylast=True)
    def register_contexts(self, register: RegisterContext, app: web.Application) -> None:
        app.on_response_prepare.append(_add_header)

        async def response_cache(app: web.Application) -> AsyncIterator[None]:
            app[in_flight_key] = self.in_flight
            link = app.get(link_key)
            if link is None:
                self.store = app[store_key] = MemoryStore(self.cache)
            else:
                from .redis_store import RedisStore  # only with Redis: the client is heavy

                store = self.store = app[store_key] = RedisStore(link, self.cache)
                await link.preload(store.script)
            yield

        register(response_cache)

    def _deployment(self, model: str) -> Deployment:
        """The pseudo-deployment hits are routed to (one per model name, made once)."""
        found = self._hit_deployments.get(model)
        if found is None:
            found = self._hit_deployments[model] = Deployment(
                name=model,
                provider=PROVIDER,
                model=PROVIDER,
                price=Price(input=0.0),
                id=PROVIDER,
                upstream=False,
            )
        return found

    def _scope(self, call: Call) -> str:
        principal = call.principal
        if self.cache.scope == "global":
            return "*"
        if self.cache.scope == "team" and principal.team is not None:
            return "team:" + principal.team
        return "key:" + (principal.id or principal.name)

    @hookimpl(tryfirst=True)
    def map_model(self, call: Call) -> None:
        """Start the lookup as soon as the request is known: it goes to Redis in the same
        batch as the limits' reservation (one round trip before the upstream). Defers the
        routing itself (returns None)."""
        store = self.store
        if store is None or _KEY in call.state or not cacheable(call, self.cache):
            return
        call.state[_KEY] = key = cache_key(call, self._scope(call))
        if "no-cache" not in call.request.headers.get("Cache-Control", "").lower():
            call.state[_LOOKUP] = store.lookup(key)
            call.state[CACHE_ANSWERS] = self._answers  # a key over its tpm may still be served

    async def _entry(self, call: Call) -> Entry | None:
        """The entry the lookup found (None: a miss), read once: the limits may ask first."""
        if _FOUND not in call.state:
            lookup = call.state.pop(_LOOKUP, None)
            store = self.store
            found = None if lookup is None or store is None else await store.entry_of(lookup)
            call.state[_FOUND] = found
        entry: Entry | None = call.state[_FOUND]
        return entry

    async def _answers(self, call: Call) -> bool:
        return await self._entry(call) is not None

    @hookimpl(trylast=True)  # after the limits: a refused request is never answered from it
    async def before_request(self, call: Call) -> None:
        key = call.state.get(_KEY)
        if key is None:
            return
        looked_up = _LOOKUP in call.state or _FOUND in call.state
        entry = await self._entry(call)
        if entry is None and looked_up and (first := self.in_flight.first(key)):
            entry = await self.in_flight.wait(key, first, self._wait_bound(call))
        if entry is not None:
            call.state[CACHE] = "hit"
            call.state[_HIT] = entry
            call.request[_HEADER] = "hit"
            call.route_to(self._deployment(call.model))
            return
        call.state[CACHE] = "miss" if looked_up else "bypass"
        call.request[_HEADER] = "miss"
        if "no-store" not in call.request.headers.get("Cache-Control", "").lower():
            call.state[_RECORD] = key
            if (first := self.in_flight.lead(key)) is not None:
                call.state[_FIRST] = first
            if call.stream:
                call.state[STREAM_RECORDER] = Recorder(self.cache.max_entry_bytes)
                # The entry keeps the usage chunk for the requests that will ask for it: the
                # upstream is asked for it, and the client that did not sees none (the spend
                # plugin's tap, when it set one first, is the same one).
                tap_unasked_usage(call)

    def _wait_bound(self, call: Call) -> float:
        """How long a miss waits for the first one's answer: its route's timeout (the whole
        call's, else the longest silence a read may take)."""
        timeouts = call.deployment.timeouts or self.config.upstream.timeouts
        return timeouts.total if timeouts.total is not None else timeouts.read

    @hookimpl(tryfirst=True)  # its write joins the limits' settlement in one batch
    def after_response(self, call: Call, outcome: Outcome) -> None:
        key = call.state.get(_RECORD)
        if key is None or self.store is None:
            return
        entry = self._kept(call, outcome)
        if entry is not None:
            self.store.keep(key, entry, self.cache.ttl_per_model.get(call.model, self.cache.ttl))
        if (first := call.state.get(_FIRST)) is not None:
            self.in_flight.settle(key, first, entry)

    @hookimpl
    def on_error(self, call: Call | None) -> None:
        """The first miss failed (or its client left): its waiters go upstream themselves."""
        if call is not None and (first := call.state.get(_FIRST)) is not None:
            self.in_flight.settle(call.state[_RECORD], first, None)

    def _kept(self, call: Call, outcome: Outcome) -> Entry | None:
        """The answer as it is kept, or None when it is not (failed, cut, too big)."""
        if outcome.status != 200 or outcome.disconnected or outcome.error_code is not None:
            return None
        recorder = call.state.get(STREAM_RECORDER)
        if isinstance(recorder, Recorder):
            events = recorder.events()
            if not events:
                return None
            tap = call.state.get(STREAM_FILTER)
            if isinstance(tap, UsageTap):  # the client did not ask: the tap took it out
                usage = b"" if tap.usage_event is None else b"data: " + tap.usage_event + b"\n\n"
            else:
                events, usage = split_usage(events)
            return Entry("stream", events, usage)
        if outcome.body is not None and len(outcome.body) <= self.cache.max_entry_bytes:
            return Entry("json", bytes(outcome.body))
        return None
