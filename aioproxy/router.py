"""Choosing a deployment: strategies, health (in flight, latency, cooldown) and rpm/tpm caps."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import RouterConfig, Strategy
from .context import Deployment
from .errors import ProxyError

__all__ = [
    "Clock",
    "ModelPolicy",
    "Router",
    "counts_toward_cooldown",
    "is_context_window_error",
    "is_retryable",
]

_LATENCY_SMOOTHING = 0.3  # weight of the newest sample in the moving average


class _MinuteCounter:
    """A sliding one-minute total in one-second buckets, kept as a running sum: reading it and
    adding to it cost O(1), bar clearing the seconds that left the window since the last call."""

    __slots__ = ("_buckets", "_latest", "_total")

    def __init__(self) -> None:
        self._buckets = [0] * 60
        self._latest = 0  # the newest second seen; the buckets hold the 60 up to it
        self._total = 0

    def _advance(self, now: float) -> int:
        second = int(now)
        gone = second - self._latest
        if gone >= 60:
            self._buckets = [0] * 60
            self._total = 0
        else:
            for past in range(self._latest + 1, second + 1):  # usually none or one
                slot = past % 60
                self._total -= self._buckets[slot]
                self._buckets[slot] = 0
        if gone > 0:
            self._latest = second
        return self._latest  # a clock reading from just before the last one counts as it

    def add(self, amount: int, now: float) -> None:
        slot = self._advance(now) % 60  # first: advancing may replace the bucket list
        self._buckets[slot] += amount
        self._total += amount

    def total(self, now: float) -> int:
        self._advance(now)
        return self._total


class Health:
    """What the router knows of one deployment."""

    __slots__ = (
        "cooldown_until",
        "failed",
        "failures",
        "in_flight",
        "latency",
        "observed",
        "requests",
        "served",
        "shared_in_flight",
        "shared_requests",
        "shared_tokens",
        "tokens",
        "upstream",
    )

    def __init__(self, upstream: bool = True) -> None:
        # Whether it calls an upstream (False: the response cache's replay of a hit).
        self.upstream = upstream
        self.in_flight = 0
        self.latency: float | None = None  # moving average of time to first byte, seconds
        self.failures: deque[float] = deque()  # recent failure times, within the window
        self.cooldown_until = 0.0
        self.requests = _MinuteCounter()
        self.tokens = _MinuteCounter()
        self.served = 0
        self.failed = 0
        # Whether the router's ``on_count`` is told its counts: until it answers that it does
        # not count them (a deployment whose counts are not shared: no call a count).
        self.observed = True
        # Other instances' share, mirrored from Redis ([state] redis_url; aioproxy.state).
        self.shared_requests = 0
        self.shared_tokens = 0
        self.shared_in_flight = 0


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """The routing settings of one model name, defaults and overrides merged."""

    strategy: Strategy
    num_retries: int
    fallbacks: tuple[str, ...]
    context_window_fallbacks: tuple[str, ...]


class Clock:
    """Time as a dependency: what routing reads (``now``) and what retries wait with (``sleep``).

    Real time by default; tests pass a fake one and drive retries and cooldown without sleeping.
    """

    __slots__ = ("now", "sleep")

    def __init__(
        self,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.now = now
        self.sleep = sleep


def counts_toward_cooldown(error: BaseException) -> bool:
    """Only failures the upstream caused cool a deployment down: never the request's own fault
    (a 4xx) nor a bug of ours (any exception that is not a ProxyError, an internal_error)."""
    return isinstance(error, ProxyError) and error.upstream_fault


def is_retryable(error: BaseException) -> bool:
    """Worth another try: rate limits, timeouts and upstream (5xx) failures; never other 4xx."""
    return isinstance(error, ProxyError) and error.retryable


_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
)


def is_context_window_error(error: BaseException) -> bool:
    """The request does not fit the model's context window (OpenAI's code, or the usual words)."""
    if not isinstance(error, ProxyError) or error.status != 400:
        return False
    if error.code == "context_length_exceeded":
        return True
    message = error.message.lower()
    return any(marker in message for marker in _CONTEXT_MARKERS)


class Router:
    """Per-app routing state; single-threaded (the event loop), so no locks."""

    def __init__(self, config: RouterConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self._health: dict[str, Health] = {}
        self._policies: dict[str, ModelPolicy] = {}
        # Told (deployment key, seconds) when a deployment starts cooling down here: the state
        # plugin passes it on to the other instances, which call ``cool_down``.
        self.on_cooldown: Callable[[str, float], None] | None = None
        # Told (deployment, requests, tokens, in-flight change) as it counts one: the state
        # plugin sums every instance's counts in Redis, and mirrors the others' back. It
        # answers whether it counts that deployment's: if not, it is not told them again.
        self.on_count: Callable[[Deployment, int, int, int], bool] | None = None

    def policy(self, model: str) -> ModelPolicy:
        policy = self._policies.get(model)
        if policy is None:
            config = self.config
            override = config.models.get(model)

            def pick(name: str, default: Any) -> Any:
                value = getattr(override, name, None) if override is not None else None
                return default if value is None else value

            policy = ModelPolicy(
                strategy=pick("strategy", config.strategy),
                num_retries=pick("num_retries", config.num_retries),
                fallbacks=tuple(pick("fallbacks", config.fallbacks.get(model, ()))),
                context_window_fallbacks=tuple(
                    pick("context_window_fallbacks", config.context_window_fallbacks.get(model, ()))
                ),
            )
            self._policies[model] = policy
        return policy

    def health(self, deployment: Deployment) -> Health:
        key = deployment.key
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = Health(deployment.upstream)
        return health

    def _available(self, deployment: Deployment, now: float, ignore_cooldown: bool) -> bool:
        health = self.health(deployment)
        if not ignore_cooldown and health.cooldown_until > now:
            return False
        if (
            deployment.rpm is not None
            and health.requests.total(now) + health.shared_requests >= deployment.rpm
        ):
            return False
        return (
            deployment.tpm is None
            or health.tokens.total(now) + health.shared_tokens < deployment.tpm
        )

    def pick(
        self,
        model: str,
        candidates: Sequence[Deployment],
        tried: set[str] | frozenset[str] = frozenset(),
        *,
        ignore_cooldown: bool = False,
    ) -> Deployment | None:
        """A deployment of ``model`` by its strategy, preferring ones not ``tried``; None if none is
        available (all cooling down or over their caps)."""
        now = self.clock.now()
        if len(candidates) == 1:
            only = candidates[0]
            return only if self._available(only, now, ignore_cooldown) else None
        available = [d for d in candidates if self._available(d, now, ignore_cooldown)]
        fresh = [d for d in available if d.key not in tried]
        choices = fresh or available
        if not choices:
            return None
        if len(choices) == 1:
            return choices[0]
        strategy = self.policy(model).strategy
        if strategy == "least-busy":
            return min(choices, key=lambda d: self._busy(d))
        if strategy == "latency":
            # Unmeasured deployments count as fastest, so that each gets measured.
            return min(choices, key=lambda d: self.health(d).latency or 0.0)
        weights = [d.weight for d in choices]
        if not any(weights):
            return choices[0]
        return random.choices(choices, weights)[0]

    def within_caps(self, deployment: Deployment) -> bool:
        """Whether ``deployment`` may take one more request now by its rpm/tpm caps (cooldown
        aside: for the further upstream calls of a call already routed to it)."""
        return self._available(deployment, self.clock.now(), True)

    def _busy(self, deployment: Deployment) -> int:
        health = self.health(deployment)
        return health.in_flight + health.shared_in_flight

    def acquire(self, deployment: Deployment) -> Health:
        """Count a request in flight on ``deployment``; its Health, for ``release`` and
        ``succeeded`` to be handed (a Lease keeps it: two lookups a request less)."""
        health = self.health(deployment)
        health.in_flight += 1
        if deployment.rpm is not None:
            health.requests.add(1, self.clock.now())
        if health.observed and self.on_count is not None:
            health.observed = self.on_count(deployment, 1, 0, 1)
        return health

    def release(
        self, deployment: Deployment, tokens: int = 0, *, health: Health | None = None
    ) -> None:
        """No longer in flight; ``health``: the deployment's, as ``acquire`` returned it."""
        if health is None:
            health = self.health(deployment)
        health.in_flight -= 1
        if tokens and deployment.tpm is not None:
            health.tokens.add(tokens, self.clock.now())
        if health.observed and self.on_count is not None:
            health.observed = self.on_count(deployment, 0, tokens, -1)

    def withdraw(self, deployment: Deployment) -> None:
        """Un-count what ``acquire`` counted of a request that never went to ``deployment``
        (a hook re-routed it, e.g. to the response cache): in flight, and its rpm cap's."""
        health = self.health(deployment)
        health.in_flight -= 1
        if deployment.rpm is not None:
            health.requests.add(-1, self.clock.now())
        if health.observed and self.on_count is not None:
            health.observed = self.on_count(deployment, -1, 0, -1)

    def health_keys(self) -> list[str]:
        return list(self._health)

    def served(self) -> dict[str, int]:
        """The answers each deployment that calls an upstream began since the start, by key:
        the observer counts the successful attempts from it, not one by one."""
        return {key: health.served for key, health in self._health.items() if health.upstream}

    def mirror(self, key: str, requests: int, tokens: int, others_in_flight: int) -> None:
        """Every instance's requests and tokens over the last minute, and the other
        instances' requests in flight, for the deployment ``key``: the others' share is
        what this instance did not count itself."""
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = Health()
        now = self.clock.now()
        health.shared_requests = max(0, requests - health.requests.total(now))
        health.shared_tokens = max(0, tokens - health.tokens.total(now))
        health.shared_in_flight = max(0, others_in_flight)

    def succeeded(
        self, deployment: Deployment, ttfb: float, *, health: Health | None = None
    ) -> None:
        """An answer began after ``ttfb`` seconds; ``health``: as for ``release``."""
        if health is None:
            health = self.health(deployment)
        health.served += 1
        health.latency = (
            ttfb
            if health.latency is None
            else health.latency + _LATENCY_SMOOTHING * (ttfb - health.latency)
        )

    def failed(self, deployment: Deployment, error: BaseException) -> None:
        """Count a failure; enough of them within the window cool the deployment down, and so
        does a 429's Retry-After, for as long as it asks (at most ``cooldown_seconds``): other
        deployments serve meanwhile, rather than requests waiting for this one."""
        if not counts_toward_cooldown(error):
            return
        health = self.health(deployment)
        health.failed += 1
        now = self.clock.now()
        failures = health.failures
        failures.append(now)
        window_start = now - self.config.cooldown_window
        while failures and failures[0] < window_start:
            failures.popleft()
        cooldown = self.config.cooldown_seconds
        until = health.cooldown_until
        if len(failures) >= self.config.cooldown_failures and cooldown > 0:
            health.cooldown_until = now + cooldown
            failures.clear()
        elif (retry_after := _retry_after(error)) and cooldown > 0:
            health.cooldown_until = max(health.cooldown_until, now + min(retry_after, cooldown))
        if self.on_cooldown is not None and health.cooldown_until != until:
            self.on_cooldown(deployment.key, health.cooldown_until - now)

    def cool_down(self, key: str, seconds: float) -> None:
        """Another instance cooled the deployment ``key`` down for ``seconds``: skip it too."""
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = Health()
        health.cooldown_until = max(health.cooldown_until, self.clock.now() + seconds)

    def backoff(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before retry ``attempt`` (1-based); None: the upstream asked for longer
        than ``retry_after_max``, so do not retry that deployment now."""
        retry_after = _retry_after(error)
        if retry_after is not None:
            return retry_after if retry_after <= self.config.retry_after_max else None
        base = min(self.config.retry_backoff_max, self.config.retry_backoff * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)  # jitter: retries from many clients spread out

    def snapshot(self, deployments: Mapping[str, Sequence[Deployment]]) -> list[dict[str, Any]]:
        """Each deployment's state, for ``/health/readiness``: no keys, no addresses."""
        now = self.clock.now()
        rows = []
        for model, candidates in deployments.items():
            for deployment in candidates:
                health = self.health(deployment)
                cooling = max(0.0, health.cooldown_until - now)
                rows.append(
                    {
                        "model": model,
                        "deployment": deployment.key if deployment.id else deployment.describe(),
                        "provider": deployment.provider,
                        "upstream_model": deployment.model,
                        "available": self._available(deployment, now, False),
                        "cooldown_remaining": round(cooling, 3),
                        "in_flight": health.in_flight,
                        "served": health.served,
                        "failed": health.failed,
                        "latency_ms": None
                        if health.latency is None
                        else round(health.latency * 1000, 3),
                    }
                )
        return rows


def _retry_after(error: BaseException) -> float | None:
    headers = getattr(error, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
