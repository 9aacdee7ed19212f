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

from .bridges import ResponseStore, bridge_methods
from .bridges.common import first_event
from .builtins.config_models import deployments_from
from .config import Config
from .context import Call, Deployment, Principal
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
from .router import Router, is_context_window_error, is_retryable
from .routes import Kind
from .upstream import failure_from, timeouts_of

__all__ = ["Gateway", "Plan"]

log = logging.getLogger("aioproxy")



class Plan:
    """Where a call may go: the model (or fallback) being tried first, then fallback names."""

    __slots__ = ("model", "candidates", "fallbacks", "visited")

    def __init__(self, model: str, candidates: tuple[Deployment, ...], fallbacks: Iterable[str]):
        self.model = model  # the one being tried
        self.candidates = candidates
        self.fallbacks = list(fallbacks)
        self.visited = {model}  # each model is tried once, whatever cycles the config has

    async def advance(self, gateway: Gateway, call: Call) -> bool:
        """Move on to the next fallback model that has deployments; False when none is left."""
        while self.fallbacks:
            name = self.fallbacks.pop(0)
            if name in self.visited:
                continue
            self.visited.add(name)
            candidates = await gateway.candidates(call, name)
            if candidates:
                self.model, self.candidates = name, candidates
                return True
        return False


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
    ) -> None:
        self.config = config
        self.hooks = Hooks(pm)
        self.factories = dict(factories)
        self.providers: dict[str, Provider] = {}
        self.serving: dict[str, dict[Kind, ProviderMethod]] = {}
        self.created = int(time.time())
        self.router = Router(config.router)
        self.table = deployments_from(config)  # for /health/readiness
        self.store: ResponseStore | None = None  # stored responses, for the responses bridge
        interval = config.server.keepalive_interval
        self.keepalive = KeepAliveClock(interval) if interval else None

    async def start(self, session: aiohttp.ClientSession, pool: H1Pool | None = None) -> None:
        """Create and start one instance of every registered provider; open the response store.

        A provider that serves chat completions but not responses or legacy completions gets
        them through the bridges (``aioproxy.bridges``).
        """
        store = ResponseStore(self.config.responses.store_path) if self.config.responses.store else None
        bridged = False
        for name, factory in self.factories.items():
            provider = factory(session, self.config)
            if isinstance(provider, Provider):
                provider.pool = pool
            await provider.start()
            self.providers[name] = provider
            native = provider.methods()
            self.serving[name] = bridge_methods(native, store)
            bridged |= Kind.RESPONSES not in native and Kind.CHAT_COMPLETIONS in native
        if store is not None and bridged:  # only the responses bridge keeps responses
            store.check()  # opened by its first use
            self.store = store

    async def close(self) -> None:
        for name, provider in self.providers.items():
            try:
                await provider.close()
            except Exception:
                log.exception("provider %r failed to close", name)
        self.providers.clear()
        self.serving.clear()
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
        if not principal.allows(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'", param="model"
            )
        return Call(kind, request, principal, model, fields, stream)

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

    async def route(self, call: Call) -> Plan:
        """Choose the call's first deployment and run ``before_request``; the plan to dispatch.

        The first deployment comes from the model, else (all cooling down or over their caps)
        from its fallbacks, else, as a last resort, from the model ignoring cooldown.
        """
        candidates = await self.candidates(call, call.model)
        if not candidates:
            raise ModelNotFound(
                f"The model '{call.model}' does not exist or is not served here", param="model"
            )
        plan = Plan(call.model, candidates, self.router.policy(call.model).fallbacks)
        while (deployment := self.router.pick(plan.model, plan.candidates)) is None:
            if not await plan.advance(self, call):
                plan = Plan(call.model, candidates, ())
                deployment = self.router.pick(call.model, candidates, ignore_cooldown=True)
                if deployment is None:
                    raise RateLimited(
                        f"Every deployment of '{call.model}' is at its rpm/tpm limit; "
                        "try again shortly",
                        headers={"Retry-After": "1"},
                    )
                break
        self._take(call, deployment)
        if self.hooks.before_request:
            await self.hooks.before_request.each(call=call)
            if call.deployment is not call.lease:  # a hook re-routed the call: count that one
                self._release(call)
                assert call.deployment is not None
                self._take(call, call.deployment)
                plan.candidates = (call.deployment,)
        return plan

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
        while True:
            model, candidates = plan.model, plan.candidates
            policy = router.policy(model)
            tried: set[str] = set()
            for attempt in range(policy.num_retries + 1):
                if deployment is None:
                    deployment = router.pick(model, candidates, tried)
                    if deployment is not None and deployment.key in tried:  # the same again
                        if _move_on_only(error):
                            break
                        delay = router.backoff(attempt, error) if error else 0
                        if delay is None:
                            break
                        if delay:
                            await asyncio.sleep(delay)
                            deployment = router.pick(model, candidates, tried)  # may have changed
                    if deployment is None:
                        break  # all cooling down or capped: on to the fallbacks
                    self._take(call, deployment)
                tried.add(deployment.key)
                try:
                    return await self._attempt(call, deployment)
                except Exception as exc:
                    error = exc
                    if is_context_window_error(exc) and policy.context_window_fallbacks:
                        plan.fallbacks = [*policy.context_window_fallbacks, *plan.fallbacks]
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
        started = time.monotonic()
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
        router.succeeded(deployment, time.monotonic() - started)
        return reply, first

    async def _answer(self, call: Call, deployment: Deployment) -> tuple[Reply, bytes | None]:
        """The provider's reply and, for a stream, its first event (the stream closed if that
        fails)."""
        reply = await self.call_provider(call)
        if isinstance(reply, StreamReply):
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
        method = methods.get(call.kind)
        if method is None:
            raise BadRequest(
                f"Provider '{deployment.provider}' does not serve {call.kind.value} "
                f"(model '{call.model}')",
                code="unsupported_endpoint",
            )
        return method

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
