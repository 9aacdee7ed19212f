"""Failed sign-ins are counted per client address: past ``[ui] signin_attempts`` in
``signin_window`` seconds the sign-in answers 429 (the right key included) until the oldest
failure leaves the window. Time is the app's injected clock."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from aioproxy import create_app
from aioproxy.control.plane import clock_key
from aioproxy.errors import RateLimited
from aioproxy.testing import assert_openai_error
from aioproxy.ui.throttle import SignInThrottle
from tests.control.conftest import FakeControlClock
from tests.support import MASTER_KEY
from tests.ui.conftest import ui_config
from tests.ui.support import csrf_in


async def _try_sign_in(ui: TestClient, key: str) -> aiohttp.ClientResponse:
    token = csrf_in(await (await ui.get("/ui/signin")).text())
    return await ui.post("/ui/signin", json={"key": key}, headers={"X-CSRF-Token": token})


async def test_repeated_failures_are_refused_until_the_window_moves(
    aiohttp_client: Any, upstream_base: str, sqlite_url: str, clock: FakeControlClock
) -> None:
    config = ui_config(upstream_base, sqlite_url)
    config["ui"].update(signin_attempts=3, signin_window=60)
    app = create_app(config, load_entrypoints=True)
    app[clock_key] = clock
    ui: TestClient = await aiohttp_client(app)
    for _ in range(3):
        await assert_openai_error(await _try_sign_in(ui, "sk-guess"), 401, "invalid_api_key")
        clock.advance(10)
    refused = await _try_sign_in(ui, MASTER_KEY)  # the right key, from the same address
    error = await assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert error["message"] == (
        "Too many failed sign-ins from your address: try again in 30 seconds"
    )
    assert refused.headers["Retry-After"] == "30"
    clock.advance(29)
    assert (await _try_sign_in(ui, MASTER_KEY)).status == 429
    clock.advance(1)  # the first failure has left the window: one more try
    assert (await _try_sign_in(ui, MASTER_KEY)).status == 200


def test_addresses_are_counted_apart_and_forgotten() -> None:
    throttle = SignInThrottle(attempts=2, window=60)
    throttle.failed("10.0.0.1", 0)
    throttle.failed("10.0.0.1", 1)
    with pytest.raises(RateLimited) as refused:
        throttle.check("10.0.0.1", 2)
    # Counted as the gateway's own refusal by aioproxy_rate_limited_total, not a deployment's.
    assert getattr(refused.value, "scope", None) == "gateway"
    throttle.check("10.0.0.2", 2)  # another address signs in
    throttle.check("10.0.0.1", 61)  # both failures have left the window
    assert throttle.failures == {}
