"""Where a call goes and until when: the plan (model, retries, fallbacks), the lease that counts a
deployment in flight, and the dispatcher that tries deployments until an answer begins.

Every wait (backoff) and every time read goes through ``router.clock``: tests drive it with a
fake clock, and nothing here reads the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import aiohttp

from .config import Config
from .context import (
    FAILED_ATTEMPTS,
    RETRIES,
    STOPPED_ATTEMPT,
    STREAM_FILTER,
    STREAM_RECORDER,
    Call,
    Deployment,
)
from .errors import (
    ModelNotFound,
    PermissionDenied,
    ProxyError,
    RateLimited,
    ServerShutdown,
    cut_short,
)
from .failures import as_proxy_error
from .outcome import Outcome
from .plugins import Hooks
from .providers import JSONReply, Reply, StreamReply
from .registry import Registry
from .router import Router, is_context_window_error, is_retryable
from .streaming import first_event

__all__ = ["Answer", "Candidates", "Dispatcher", "Lease", "Plan", "tokens_spent"]

log = logging.getLogger("aioproxy")

# The deployments a call may use for a model name (empty: none, or not for this caller).
Candidates = Callable[[Call, str], Awaitable[tuple[Deployment, ...]]]


class Lease:
    """One deployment counted in flight (and toward its rpm cap) from the moment it is taken.

    ``release`` un-counts it exactly once, whichever of the paths that end a request (answer
    sent, failure, retry, re-route, cancellation) reaches it first; later calls do nothing.
    """

    __slots__ = ("_router", "deployment", "health")

    def __init__(self, router: Router, deployment: Deployment) -> None:
        self.health = router.acquire(deployment)  # the deployment's, looked up once
        self.deployment = deployment
        self._router: Router | None = router

    @property
    def released(self) -> bool:
        return self._router is None

    def release(self, tokens: int = 0) -> None:
        """No longer in flight; ``tokens`` (what the answer spent) count toward the tpm cap."""
        router, self._router = self._router, None
        if router is not None:
            router.release(self.deployment, tokens, health=self.health)

    def withdraw(self) -> None:
        """Never sent (re-routed before the upstream call): un-counted from the rpm cap too."""
        router, self._router = self._router, None
        if router is not None:
            router.withdraw(self.deployment)


class Answer(NamedTuple):
    """An answer that has begun: the reply, a stream's first event (None for a JSON reply or an
    empty stream), and the lease of the deployment giving it, to release once it is sent."""

    reply: Reply
    first: bytes | None
    lease: Lease


class Plan:
    """Where a call may go: the model (or fallback) being tried, its candidates and the attempts
    left on it, then fallback names.

    Cooldown only orders the plan, it never costs a request an attempt: a model passed over
    because all its deployments are cooling down is kept in ``skipped``, and once the rest of the
    plan is spent it is tried after all, cooldown ignored (``panic``, as Envoy does when too few
    hosts are healthy), with the attempts it had left.
    """

    __slots__ = ("attempts", "candidates", "fallbacks", "model", "panic", "skipped", "visited")

    def __init__(
        self,
        model: str,
        candidates: tuple[Deployment, ...],
        fallbacks: Iterable[str],
        attempts: int,
    ) -> None:
        self.model = model  # the one being tried
        self.candidates = candidates
        self.attempts = attempts  # left on ``model``: its num_retries + 1 at first
        self.fallbacks = list(fallbacks)
        self.visited = {model}  # each model is tried once, whatever cycles the config has
        self.panic = False  # True: cooldown is ignored for the rest of the plan
        self.skipped: list[tuple[str, tuple[Deployment, ...], int]] = []

    async def advance(
        self, call: Call, candidates: Candidates, attempts: Callable[[str], int]
    ) -> bool:
        """Move on to the next fallback model that ``candidates`` offers deployments of (it
        offers none of a model the caller may not use), else back to the models skipped while
        cooling down; False when none is left. ``attempts`` gives a model's tries."""
        while self.fallbacks:
            name = self.fallbacks.pop(0)
            if name in self.visited:
                continue
            self.visited.add(name)
            found = await candidates(call, name)
            if found:
                self.model, self.candidates = name, found
                self.attempts = attempts(name)
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


def tokens_spent(call: Call, outcome: Outcome | None, deployment: Deployment) -> int:
    """What an answer spent, for ``deployment``'s tpm cap (0 without one): the upstream's usage,
    else about four bytes a token for the prompt and one token an event (or four bytes) for the
    answer (a stream without include_usage)."""
    if deployment.tpm is None or outcome is None:
        return 0
    usage = outcome.usage()
    if usage:
        return usage.total_tokens
    answer = outcome.events if outcome.stream else len(outcome.body or b"") // 4
    return call.body_size() // 4 + answer


def _count_retry(call: Call, same_model: bool) -> None:
    """Count one more attempt on ``call``: a retry of the same model, else a fallback."""
    counts = call.state.get(RETRIES)
    if counts is None:
        counts = call.state[RETRIES] = [0, 0]
    counts[0 if same_model else 1] += 1


def _note_failed(call: Call, deployment: Deployment, status: int | str) -> None:
    """Note a failed upstream attempt of ``call`` (FAILED_ATTEMPTS), for the observer."""
    failed = call.state.get(FAILED_ATTEMPTS)
    if failed is None:
        failed = call.state[FAILED_ATTEMPTS] = []
    failed.append((deployment, status))


def _brief(error: BaseException) -> str:
    return error.message if isinstance(error, ProxyError) else type(error).__name__


class Dispatcher:
    """Routes calls and calls providers: map_model, pick, take, ``before_request``, then tries,
    retries and fallbacks until an answer begins. Also the completions bridge's ``Admission``."""

    def __init__(self, router: Router, registry: Registry, hooks: Hooks, config: Config) -> None:
        self.router = router
        self.registry = registry
        self.hooks = hooks
        self.config = config
        # The completions bridge's further chat calls in flight, by the sub-call's identity
        # (each lives from ``admit`` to ``dismiss``).
        self._admitted: dict[int, Lease] = {}

    def allows(self, call: Call, model: str) -> bool:
        """May ``call`` use ``model``: the model asked for and every model it may reach
        (fallbacks, context-window fallbacks, whatever cooldown leads to) pass this one check,
        where key and team limits belong as they come."""
        return call.principal.allows(model)

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

    async def _reachable(self, call: Call, model: str) -> tuple[Deployment, ...]:
        """A fallback's candidates: none for a model the caller may not use (never served what
        it may not ask for)."""
        return await self.candidates(call, model) if self.allows(call, model) else ()

    def _attempts(self, model: str) -> int:
        return self.router.policy(model).num_retries + 1

    def take(self, call: Call, deployment: Deployment) -> Lease:
        """Route the call to ``deployment``, counted (in flight, rpm) from this moment: picking
        and counting with no await between them is what keeps concurrent requests within caps."""
        lease = Lease(self.router, deployment)
        call.route_to(deployment)
        return lease

    async def plan(self, call: Call) -> tuple[Plan, Lease]:
        """Choose the call's first deployment, take it and run ``before_request``.

        The first deployment comes from the model, else (all cooling down or over their caps)
        from its fallbacks, else from the same plan with cooldown ignored (``Plan.panic``). A
        hook that re-routes the call moves the lease to its deployment.
        """
        candidates = await self.candidates(call, call.model)
        if not candidates:
            raise ModelNotFound(
                f"The model '{call.model}' does not exist or is not served here", param="model"
            )
        router = self.router
        policy = router.policy(call.model)
        plan = Plan(call.model, candidates, policy.fallbacks, policy.num_retries + 1)
        while (
            deployment := router.pick(plan.model, plan.candidates, ignore_cooldown=plan.panic)
        ) is None:
            plan.skip()
            if not await plan.advance(call, self._reachable, self._attempts):
                raise RateLimited(
                    f"Every deployment of '{call.model}' is at its rpm/tpm limit; "
                    "try again shortly",
                    headers={"Retry-After": "1"},
                )
        lease = self.take(call, deployment)
        if self.hooks.before_request.implemented:
            try:
                await self.hooks.before_request.each(call=call)
            except BaseException:
                lease.release()
                raise
            if call.routed_to is not lease.deployment:  # re-routed: count that one instead
                lease.withdraw()
                if not self.allows(call, call.deployment.name):
                    # A routing plugin cannot take a key where it may not go; the model is
                    # not named: the caller did not ask for it.
                    raise PermissionDenied(
                        "This API key may not use the model this request was routed to"
                    )
                lease = self.take(call, call.deployment)
                plan.candidates = (call.deployment,)
        return plan, lease

    def admit(self, call: Call) -> None:
        """Count a further upstream call of a request (a bridge's next chat call) on its
        deployment as the request itself was counted; 429 when the deployment is at a cap."""
        deployment = call.deployment
        if not self.router.within_caps(deployment):
            refused = RateLimited(
                f"Deployment {deployment.describe()} is at its rpm/tpm limit; try again shortly",
                headers={"Retry-After": "1"},
            )
            refused.caused_by_upstream = False  # our limit, not the upstream's: no cooldown
            raise refused
        self._admitted[id(call)] = self.take(call, deployment)

    def dismiss(self, call: Call) -> None:
        lease = self._admitted.pop(id(call), None)
        if lease is not None:
            lease.release()

    async def dispatch(self, call: Call, plan: Plan, lease: Lease) -> Answer:
        """Call the provider on ``lease``'s deployment, retrying and falling back as the plan
        says, until an answer starts.

        Returns once a JSON reply or a stream's first event exists: the answer has begun, and
        nothing is retried after it. The answering deployment's lease comes with it; every
        other lease taken here is released here, whatever happens (cancellation included).
        """
        router = self.router
        error: BaseException | None = None
        current: Lease | None = lease
        tried: set[str] = set()  # a model come back to in panic remembers what it tried
        made = 0  # attempts so far: what the backoff doubles with
        last_model = plan.model  # the model of the attempt before: a retry, else a fallback
        while True:
            model, candidates = plan.model, plan.candidates
            while plan.attempts:
                if current is None:
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
                    current = self.take(call, deployment)
                plan.attempts -= 1
                made += 1
                if made > 1:
                    _count_retry(call, model == last_model)
                last_model = model
                tried.add(current.deployment.key)
                try:
                    return await self._attempt(call, current, made)
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
                    log.warning(
                        "%s failed (%s)%s",
                        current.deployment.describe(),
                        _brief(exc),
                        "; trying again" if plan.attempts or plan.fallbacks else "",
                    )
                finally:
                    current = None
            if not await plan.advance(call, self._reachable, self._attempts):
                break
        if error is None:
            raise RateLimited(
                f"No deployment of '{call.model}' or its fallbacks is available now",
                headers={"Retry-After": "1"},
            )
        raise error

    async def _attempt(self, call: Call, lease: Lease, attempt: int = 1) -> Answer:
        """One try (the request's ``attempt``-th) on the leased deployment: the answer, or an
        exception (the lease released)."""
        router = self.router
        hooks = self.hooks
        deployment = lease.deployment
        # A cache hit's replay is no upstream attempt: no attempt hook hears of it.
        observed = deployment.upstream
        if (
            observed
            and hooks.before_attempt.implemented
            and (rest := hooks.before_attempt.logged(call, deployment, attempt))
        ):
            await rest
        started = router.clock.now()
        first_byte = (deployment.timeouts or self.config.upstream.timeouts).first_byte
        try:
            if first_byte is None:  # the upstream client's read timeout bounds it
                reply, first = await self._answer(call, deployment)
            else:
                async with asyncio.timeout(first_byte):
                    reply, first = await self._answer(call, deployment)
        except BaseException as exc:
            lease.release()
            error = as_proxy_error(exc, deployment) if isinstance(exc, TimeoutError) else exc
            ended: Exception | None = None  # how the attempt ended, for after_attempt
            if isinstance(error, Exception):
                router.failed(deployment, error)
                ended = error
            elif isinstance(error, asyncio.CancelledError):  # its client left, or we stop
                ended = cut_short(call.request)  # not the upstream's fault
            if ended is not None and observed:
                status = ended.status if isinstance(ended, ProxyError) else 500
                stopped = isinstance(ended, ServerShutdown)  # no upstream's 503: counted apart
                _note_failed(call, deployment, STOPPED_ATTEMPT if stopped else status)
                if hooks.after_attempt.implemented:
                    rest = hooks.after_attempt.logged(
                        call, deployment, attempt, status, ended, router.clock.now() - started
                    )
                    if rest is not None:
                        await rest
            if error is exc:
                raise
            raise error from exc
        elapsed = router.clock.now() - started
        router.succeeded(deployment, elapsed, health=lease.health)
        if observed and hooks.after_attempt.implemented:
            status = reply.status if isinstance(reply, JSONReply) else 200
            rest = hooks.after_attempt.logged(call, deployment, attempt, status, None, elapsed)
            if rest is not None:
                await rest
        return tuple.__new__(Answer, (reply, first, lease))  # made in C, not by its __new__

    async def _answer(self, call: Call, deployment: Deployment) -> tuple[Reply, bytes | None]:
        """The provider's reply and, for a stream, its first event (the stream closed if that
        fails)."""
        method = self.registry.method_for(call)
        try:
            reply = await method(call)
            if isinstance(reply, StreamReply):
                if (stream_filter := call.state.get(STREAM_FILTER)) is not None:
                    reply = stream_filter(reply)  # a plugin's (e.g. the spend's usage tap)
                if (recorder := call.state.get(STREAM_RECORDER)) is not None:
                    reply = recorder(reply)  # a plugin's copy of what the client gets (the cache)
                first = await first_event(reply)
            else:
                first = None
        except ProxyError:
            raise
        except (aiohttp.ClientError, OSError) as exc:  # a transport error the provider let out
            raise as_proxy_error(exc, deployment) from exc
        return reply, first
