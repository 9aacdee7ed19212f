"""The router on a fake clock: what counts toward cooldown, Retry-After as a cooldown, caps."""

from __future__ import annotations

import pytest

from aioproxy.bridges.store import StoreUnavailable
from aioproxy.budget import BufferFull
from aioproxy.config import RouterConfig
from aioproxy.context import Deployment
from aioproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    ProxyError,
    RateLimited,
)
from aioproxy.failures import read_upstream_error
from aioproxy.router import Router, counts_toward_cooldown, is_retryable
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
        # The gateway's own troubles, though 5xx: its buffers, its store, its configuration.
        (BufferFull("buffers full", headers={"Retry-After": "1"}), False),
        (StoreUnavailable("store down"), False),
        (ProxyError("provider 'x' is not installed", code="provider_not_found"), False),
        (ProxyError("invalid settings", code="invalid_settings"), False),
        # An upstream's own 500 counts whatever code it chose, even ours.
        (
            read_upstream_error(500, b'{"error": {"message": "x", "code": "internal_error"}}', A),
            True,
        ),
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


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (
            read_upstream_error(500, b'{"error": {"message": "x", "code": "internal_error"}}', A),
            True,
        ),
        (read_upstream_error(503, b"busy", A), True),
        (read_upstream_error(400, b'{"error": {"message": "bad"}}', A), False),
        (BufferFull("buffers full", headers={"Retry-After": "1"}), False),  # a paid call again
        (StoreUnavailable("store down"), False),
        (ProxyError("a bug", code="internal_error"), False),
        (ours(), True),  # our cap on one deployment: another may have room
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_what_is_retried(error: ProxyError, retried: bool) -> None:
    assert is_retryable(error) is retried


def test_the_gateways_own_503_never_cools_a_deployment() -> None:
    routing, _ = router(cooldown_failures=1, cooldown_seconds=30)
    routing.failed(A, BufferFull("buffers full", headers={"Retry-After": "1"}))
    assert routing.pick("m", [A]) is A


def test_served_counts_the_answers_of_upstream_deployments_only() -> None:
    """What the observer counts the answered attempts from: the answers each deployment began,
    by key; a response-cache hit's replay (no upstream) is none of them."""
    r, _ = router()
    replay = Deployment(name="m", provider="cache", model="cache", id="cache", upstream=False)
    for deployment, ttfb in ((A, 0.1), (A, 0.2), (replay, 0.0)):
        r.succeeded(deployment, ttfb)
    assert r.served() == {"m#0": 2}
