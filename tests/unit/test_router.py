"""The router on a fake clock: what counts toward cooldown, Retry-After as a cooldown, caps."""

from __future__ import annotations

import pytest

from aioproxy.config import RouterConfig
from aioproxy.context import Deployment
from aioproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    ProxyError,
    RateLimited,
)
from aioproxy.router import Router, counts_toward_cooldown
from aioproxy.testing import FakeClock

A = Deployment(name="m", provider="p", model="a", id="m#0", rpm=2)


def router(**config: object) -> tuple[Router, FakeClock]:
    clock = FakeClock()
    return Router(RouterConfig(**config), clock), clock  # type: ignore[arg-type]


def ours() -> RateLimited:
    refused = RateLimited("at its cap")
    refused.caused_by_upstream = False
    return refused


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (BadGateway("unreachable", code="upstream_unreachable"), True),
        (GatewayTimeout("too slow"), True),
        (ProxyError("upstream 503", status=503), True),
        (ProxyError("upstream 429", status=429), True),
        (RateLimited("upstream 429"), True),
        (BadRequest("'stop' must be a string", param="stop"), False),  # the request's fault
        (ProxyError("context", status=400, code="context_length_exceeded"), False),
        (ProxyError("a bug", code="internal_error"), False),
        (TypeError("'int' object is not iterable"), False),  # a bug of ours, not a ProxyError
        (KeyError("choices"), False),
        (ours(), False),  # our own cap, though a 429
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_only_upstream_failures_count_toward_cooldown(error: BaseException, counts: bool) -> None:
    assert counts_toward_cooldown(error) is counts
    routing, _ = router(cooldown_failures=1)
    routing.failed(A, error)
    assert routing.health(A).failed == int(counts)
    assert (routing.pick("m", [A]) is None) is counts


def test_cooldown_ends_on_the_clock() -> None:
    routing, clock = router(cooldown_failures=2, cooldown_seconds=5)
    routing.failed(A, BadGateway("x"))
    assert routing.pick("m", [A]) is A
    routing.failed(A, BadGateway("x"))
    assert routing.pick("m", [A]) is None
    assert routing.pick("m", [A], ignore_cooldown=True) is A
    clock.advance(5.01)
    assert routing.pick("m", [A]) is A


def test_retry_after_cools_the_deployment_that_asked_for_it() -> None:
    routing, clock = router(cooldown_failures=3, cooldown_seconds=30)
    routing.failed(A, RateLimited("slow down", headers={"Retry-After": "4"}))
    assert routing.pick("m", [A]) is None
    clock.advance(4.01)
    assert routing.pick("m", [A]) is A
    routing.failed(A, RateLimited("slow down", headers={"Retry-After": "3600"}))
    clock.advance(30.01)  # no longer than cooldown_seconds, whatever the upstream asks
    assert routing.pick("m", [A]) is A


def test_within_caps_ignores_cooldown_but_not_rpm() -> None:
    routing, clock = router(cooldown_failures=1)
    routing.failed(A, BadGateway("x"))
    assert routing.within_caps(A)
    routing.acquire(A)
    routing.acquire(A)
    assert not routing.within_caps(A)  # rpm = 2
    clock.advance(61)
    assert routing.within_caps(A)
