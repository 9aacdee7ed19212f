"""One app's gateway: its hooks, providers and session, and the request pipeline through them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

import aiohttp
import pluggy
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from .bridges import NativeResponses, ResponseStore, bridge_methods
from .bridges.common import first_event
from .builtins.config_models import deployments_from
from .config import Config
from .context import STREAM_FILTER, Call, Deployment, Principal
from .errors import (
    AuthenticationError,
    BadRequest,
    ModelNotFound,
    PermissionDenied,
    ProxyError,
    RateLimited,
)
from .h1client import H1Pool
from .keepalive import KeepAliveClock
from .outcome import Outcome
from .payloads import decode_request
from .plugins import Hooks
from .providers import Provider, ProviderFactory, ProviderMethod, Reply, StreamReply
from .router import Clock, Router, is_context_window_error, is_retryable
from .routes import Kind
from .upstream import failure_from, timeouts_of

__all__ = ["Gateway", "Plan"]

log = logging.getLogger("aioproxy")



class Plan:
    """Where a call may go: the model (or fallback) being tried, its candidates and the attempts
    left on it, then fallback names.

    Cooldown only orders the plan, it never costs a request an attempt: a model passed over
    because all its deployments are cooling down is kept in ``skipped``, and once the rest of the
    plan is spent it is tried after all, cooldown ignored (``panic``, as Envoy does when too few
    hosts are healthy), with the attempts it had left.
    """

    __slots__ = ("model", "candidates", "attempts", "fallbacks", "visited", "panic", "skipped")

    def __init__(
        self, model: str, candidates: tuple[Deployment, ...], fallbacks: Iterable[str],
        attempts: int,
    ) -> None:
        self.model = model  # the one being tried
        self.candidates = candidates
        self.attempts = attempts  # left on ``model``: its num_retries + 1 at first
        self.fallbacks = list(fallbacks)
        self.visited = {model}  # each model is tried once, whatever cycles the config has
        self.panic = False  # True: cooldown is ignored for the rest of the plan
        self.skipped: list[tuple[str, tuple[Deployment, ...], int]] = []

    async def advance(self, gateway: Gateway, call: Call) -> bool:
        """Move on to the next fallback model the caller may use that has deployments, else back
        to the models skipped while cooling down; False when none is left."""
        while self.fallbacks:
            name = self.fallbacks.pop(0)
            if name in self.visited:
                continue
            self.visited.add(name)
            if not gateway.allows(call, name):  # never served what it may not ask for
                continue
            candidates = await gateway.candidates(call, name)
            if candidates:
                self.model, self.candidates = name, candidates
                self.attempts = gateway.router.policy(name).num_retries + 1
                return True
        if self.skipped:
            self.model, self.candidates, self.attempts = self.skipped.pop(0)
            self.panic = True
            return True
        return False

    def skip(self) -> None:
        """Pass over the current model (nothing available), to come back to it in panic."""
        if not self.panic:
            self.skipped.append((self.model, self.candidates, self.attempts))


# Errors that say a deployment is misconfigured (its key refused, a redirect): another
# deployment may serve, the same one will not.
_MISCONFIGURED = frozenset({"upstream_auth_failed", "upstream_redirect"})


def _move_on_only(error: BaseException | None) -> bool:
    return isinstance(error, ProxyError) and error.code in _MISCONFIGURED


def _estimate_tokens(call: Call, outcome: Outcome) -> int:
    """Tokens spent when the upstream did not say (a stream without include_usage): about four
    bytes a token for the prompt, one token an event (or four bytes) for the answer."""
    prompt = sum(len(raw) for raw in call.fields.values()) // 4
    answer = outcome.events if outcome.stream else len(outcome.body or b"") // 4
    return prompt + answer


def _brief(error: BaseException) -> str:
    return error.message if isinstance(error, ProxyError) else type(error).__name__


class Gateway:
    """Everything one app needs per request, resolved at start-up (providers once the session is open)."""

    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        factories: Mapping[str, ProviderFactory],
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.hooks = Hooks(pm)
        self.factories = dict(factories)
        self.providers: dict[str, Provider] = {}
        self.native: dict[str, dict[Kind, ProviderMethod]] = {}  # each provider's own methods
        self.serving: dict[str, dict[Kind, ProviderMethod]] = {}  # ... with the bridges
        # By deployment key: the deployments that serve otherwise than their provider (their
        # ``endpoints``, or a native route found missing). Empty in the common case.
        self.overrides: dict[str, dict[Kind, ProviderMethod]] = {}
        self.natives = NativeResponses(None, ())  # native response ids; the store's, once started
        self.created = int(time.time())
        self.router = Router(config.router, clock)  # its clock times retries too
        self.table = deployments_from(config)  # for /health/readiness
        self.store: ResponseStore | None = None  # stored responses, for the responses bridge
        interval = config.server.keepalive_interval
        self.keepalive = KeepAliveClock(interval) if interval else None

    async def start(self, session: aiohttp.ClientSession, pool: H1Pool | None = None) -> None:
        """Create and start one instance of every registered provider; open the response store.

        A provider that serves chat completions but not responses or legacy completions gets
        them through the bridges (``aioproxy.bridges``); so does a deployment whose
        ``endpoints`` leave them out, or whose upstream turns out to lack ``/v1/responses``.
        """
        settings = self.config.responses
        store = (
            ResponseStore(
                settings.store_path,
                ttl=settings.ttl,
                max_bytes=settings.max_bytes,
                cleanup_interval=settings.cleanup_interval,
            )
            if settings.store
            else None
        )
        configured = [d for deployments in self.table.values() for d in deployments]
        self.natives = NativeResponses(store, configured)
        for name, factory in self.factories.items():
            provider = factory(session, self.config)
            if isinstance(provider, Provider):
                provider.pool = pool
            await provider.start()
            self.providers[name] = provider
            self.native[name] = provider.methods()
            self.serving[name] = self._serving_of(name, None)
        for deployment in configured:
            if deployment.endpoints is not None and deployment.provider in self.native:
                self.overrides[deployment.key] = self._serving_of(
                    deployment.provider, deployment.endpoints
                )
                if unknown := deployment.endpoints - self.native[deployment.provider].keys():
                    log.warning(
                        "%s lists endpoints its provider does not implement: %s",
                        deployment.describe(), ", ".join(sorted(unknown)),
                    )
        if store is not None and any(Kind.RESPONSES in m for m in self.serving.values()):
            store.check()  # opened by its first use
            store.start()  # its periodic cleanup
            self.store = store
        else:  # nothing serves responses: nothing to keep
            self.natives.store = None

    def _serving_of(
        self, provider: str, endpoints: frozenset[Kind] | None
    ) -> dict[Kind, ProviderMethod]:
        """What serves each kind for ``provider``'s deployments (limited to ``endpoints``)."""
        return bridge_methods(
            self.native[provider],
            self.natives.store,
            self.config.completions,
            self,
            endpoints=endpoints,
            natives=self.natives,
            fall_back=self._bridge_from_now_on,
        )

    def _bridge_from_now_on(self, deployment: Deployment, bridge: ProviderMethod) -> None:
        """Serve ``deployment``'s responses through ``bridge``: its upstream lacks the route."""
        key = deployment.key
        methods = self.overrides.get(key) or self.serving[deployment.provider]
        if methods.get(Kind.RESPONSES) is bridge:
            return  # a request that was in flight when it was found out
        log.warning(
            "%s has no /responses route upstream; bridging its Responses API onto chat "
            "completions from now on", deployment.describe(),
        )
        self.overrides[key] = {**methods, Kind.RESPONSES: bridge}

    async def close(self) -> None:
        for name, provider in self.providers.items():
            try:
                await provider.close()
            except Exception:
                log.exception("provider %r failed to close", name)
        self.providers.clear()
        self.native.clear()
        self.serving.clear()
        self.overrides.clear()
        await self.natives.drain()
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def authenticate(self, request: web.Request, kind: Kind) -> Principal:
        principal = await self.hooks.authenticate.first(request=request, kind=kind)
        if principal is None:
            raise AuthenticationError("No plugin accepted the request's credentials")
        return principal

    async def read_call(self, kind: Kind, request: web.Request, principal: Principal) -> Call:
        """Read the body into a Call, refusing a model the principal may not use."""
        try:
            if request.content.is_eof():  # all of it came with the headers: nothing to wait for
                body = await request.read()
            else:
                async with asyncio.timeout(self.config.server.body_timeout):
                    body = await request.read()
        except TimeoutError:
            raise ProxyError(
                "The request body did not arrive in time", status=408,
                type="invalid_request_error", code="request_timeout",
            ) from None
        except (BadHttpMessage, RequestPayloadError):  # e.g. broken chunked framing (a
            # compressed body never gets here: aioproxy.ingress refuses it unread)
            raise BadRequest(
                "The request body could not be read (its framing is broken)",
                code="invalid_encoding",
            ) from None
        fields, model, stream = decode_request(body, kind)
        call = Call(kind, request, principal, model, fields, stream)
        if not self.allows(call, model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'", param="model"
            )
        return call

    async def candidates(self, call: Call, model: str) -> tuple[Deployment, ...]:
        """The deployments ``map_model`` offers for ``model`` (empty: the model is unknown)."""
        mapped = await self.hooks.map_model.first(
            principal=call.principal, model=model, kind=call.kind, call=call
        )
        if mapped is None:
            return ()
        if isinstance(mapped, Deployment):
            return (mapped,)
        return tuple(mapped)

    def allows(self, call: Call, model: str) -> bool:
        """May ``call`` use ``model``: the model asked for and every model it may reach
        (fallbacks, context-window fallbacks, whatever cooldown leads to) pass this one check,
        where key and team limits belong as they come."""
        return call.principal.allows(model)

    async def route(self, call: Call) -> Plan:
        """Choose the call's first deployment and run ``before_request``; the plan to dispatch.

        The first deployment comes from the model, else (all cooling down or over their caps)
        from its fallbacks, else from the same plan with cooldown ignored (``Plan.panic``).
        """
        candidates = await self.candidates(call, call.model)
        if not candidates:
            raise ModelNotFound(
                f"The model '{call.model}' does not exist or is not served here", param="model"
            )
        policy = self.router.policy(call.model)
        plan = Plan(call.model, candidates, policy.fallbacks, policy.num_retries + 1)
        router = self.router
        while (
            deployment := router.pick(plan.model, plan.candidates, ignore_cooldown=plan.panic)
        ) is None:
            plan.skip()
            if not await plan.advance(self, call):
                raise RateLimited(
                    f"Every deployment of '{call.model}' is at its rpm/tpm limit; "
                    "try again shortly",
                    headers={"Retry-After": "1"},
                )
        self._take(call, deployment)
        if self.hooks.before_request:
            await self.hooks.before_request.each(call=call)
            if call.deployment is not call.lease:  # a hook re-routed the call: count that one
                self._release(call)
                assert call.deployment is not None
                self._take(call, call.deployment)
                plan.candidates = (call.deployment,)
        return plan

    def admit(self, call: Call) -> None:
        """Count a further upstream call of a request (a bridge's next chat call) on its
        deployment as the request itself was counted; 429 when the deployment is at a cap."""
        deployment = call.deployment
        assert deployment is not None
        if not self.router.within_caps(deployment):
            refused = RateLimited(
                f"Deployment {deployment.describe()} is at its rpm/tpm limit; try again shortly",
                headers={"Retry-After": "1"},
            )
            refused.caused_by_upstream = False  # our limit, not the upstream's: no cooldown
            raise refused
        self._take(call, deployment)

    def dismiss(self, call: Call) -> None:
        self._release(call)

    def _release(self, call: Call, tokens: int = 0) -> None:
        if call.lease is not None:
            self.router.release(call.lease, tokens)
            call.lease = None

    def _take(self, call: Call, deployment: Deployment) -> None:
        """Route the call to ``deployment``, counted (in flight, rpm) from this moment: picking
        and counting with no await between them is what keeps concurrent requests within caps."""
        self.router.acquire(deployment)
        call.lease = deployment
        call.route_to(deployment)

    async def dispatch(self, call: Call, plan: Plan) -> tuple[Reply, bytes | None]:
        """Call the provider, retrying and falling back as the plan says, until an answer starts.

        Returns the reply and, for a stream, its first event (None for an empty stream): once that
        exists the answer has begun, and nothing is retried after it. The deployment that answers
        stays taken (counted in flight) until ``finish``.
        """
        router = self.router
        error: BaseException | None = None
        deployment: Deployment | None = call.deployment
        tried: set[str] = set()  # a model come back to in panic remembers what it tried
        made = 0  # attempts so far: what the backoff doubles with
        while True:
            model, candidates = plan.model, plan.candidates
            while plan.attempts:
                if deployment is None:
                    deployment = router.pick(model, candidates, tried, ignore_cooldown=plan.panic)
                    if deployment is not None and deployment.key in tried:  # the same again
                        if _move_on_only(error):
                            break
                        delay = router.backoff(made, error) if error else 0
                        if delay is None:
                            break
                        if delay:
                            await router.clock.sleep(delay)
                            deployment = router.pick(  # may have changed meanwhile
                                model, candidates, tried, ignore_cooldown=plan.panic
                            )
                    if deployment is None:
                        plan.skip()  # all cooling down (or capped): after the rest of the plan
                        break
                    self._take(call, deployment)
                plan.attempts -= 1
                made += 1
                tried.add(deployment.key)
                try:
                    return await self._attempt(call, deployment)
                except Exception as exc:
                    error = exc
                    if is_context_window_error(exc):
                        plan.attempts = 0  # it will not fit this model however often it is tried
                        windows = router.policy(model).context_window_fallbacks
                        if windows:
                            plan.fallbacks = [*windows, *plan.fallbacks]
                            break
                    if not is_retryable(exc):
                        raise
                    log.warning("%s failed (%s); retrying", deployment.describe(), _brief(exc))
                finally:
                    deployment = None
            if not await plan.advance(self, call):
                break
        if error is None:
            raise RateLimited(
                f"No deployment of '{call.model}' or its fallbacks is available now",
                headers={"Retry-After": "1"},
            )
        raise error

    async def _attempt(self, call: Call, deployment: Deployment) -> tuple[Reply, bytes | None]:
        """One try on the taken deployment: the reply and a stream's first event, or an exception
        (the deployment released)."""
        router = self.router
        started = router.clock.now()
        first_byte = timeouts_of(deployment, self.config).first_byte
        try:
            if first_byte is None:  # the upstream client's read timeout bounds it
                reply, first = await self._answer(call, deployment)
            else:
                async with asyncio.timeout(first_byte):
                    reply, first = await self._answer(call, deployment)
        except BaseException as exc:
            self._release(call)
            error = failure_from(exc, deployment) if isinstance(exc, TimeoutError) else exc
            if isinstance(error, Exception):
                router.failed(deployment, error)
            if error is exc:
                raise
            raise error from exc
        router.succeeded(deployment, router.clock.now() - started)
        return reply, first

    async def _answer(self, call: Call, deployment: Deployment) -> tuple[Reply, bytes | None]:
        """The provider's reply and, for a stream, its first event (the stream closed if that
        fails)."""
        reply = await self.call_provider(call)
        if isinstance(reply, StreamReply):
            if (stream_filter := call.state.get(STREAM_FILTER)) is not None:
                reply = stream_filter(reply)  # a plugin's (e.g. the spend's usage tap)
            return reply, await first_event(reply, deployment)
        return reply, None

    def finish(self, call: Call, outcome: Outcome | None) -> None:
        """Release the answering deployment, counting the tokens it spent (for tpm caps)."""
        deployment = call.lease
        if deployment is None:
            return
        tokens = 0
        if deployment.tpm is not None and outcome is not None:
            usage = outcome.usage()
            tokens = usage.total_tokens if usage else _estimate_tokens(call, outcome)
        self._release(call, tokens)

    def method_for(self, call: Call) -> ProviderMethod:
        deployment = call.deployment
        assert deployment is not None
        methods = self.serving.get(deployment.provider)
        if methods is None:
            raise ProxyError(
                f"Deployment {deployment.describe()} names provider '{deployment.provider}', "
                "which is not installed",
                code="provider_not_found",
            )
        if self.overrides or deployment.endpoints is not None:
            methods = self._deployment_methods(deployment, methods)
        method = methods.get(call.kind)
        if method is None:
            raise BadRequest(
                f"Provider '{deployment.provider}' does not serve {call.kind.value} "
                f"(model '{call.model}')",
                code="unsupported_endpoint",
            )
        return method

    def _deployment_methods(
        self, deployment: Deployment, methods: dict[Kind, ProviderMethod]
    ) -> dict[Kind, ProviderMethod]:
        """The deployment's own serving table, if it has one (made now for a deployment a
        plugin made with ``endpoints``)."""
        key = deployment.key
        own = self.overrides.get(key)
        if own is None and deployment.endpoints is not None:
            own = self.overrides[key] = self._serving_of(deployment.provider, deployment.endpoints)
        return methods if own is None else own

    async def call_provider(self, call: Call) -> Reply:
        method = self.method_for(call)
        try:
            return await method(call)
        except ProxyError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise failure_from(exc, call.deployment) from exc

    async def report(self, call: Call, outcome: Outcome) -> None:
        """Run ``after_response``; the answer is already sent, so failures are only logged."""
        await self.hooks.after_response.each_logged(call=call, outcome=outcome)

    async def observe_error(
        self, request: web.Request, error: BaseException, call: Call | None
    ) -> None:
        await self.hooks.on_error.each_logged(request=request, error=error, call=call)

    def model_names(self, principal: Principal) -> list[str]:
        """The model names ``principal`` may use, as ``list_models`` implementations give them."""
        names: dict[str, None] = {}
        for result in self.hooks.list_models.each_sync(principal=principal):
            for name in result:
                if principal.allows(name):
                    names[name] = None
        return list(names)
