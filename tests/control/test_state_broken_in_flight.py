"""Review 12b: a deployment whose hash the sync cannot use has its change since the last sync
dropped (s12-sync). For requests and tokens (windows of a minute) that is a loss that passes;
the in-flight change is a level kept by deltas: one dropped stays in this instance's field of
``<prefix>:d:<deployment>:f`` for good once the key is fixed (its EXPIRE renewed by every
sync, its field dropped only when this instance's lease runs out), and every other instance
counts it in its "others' requests in flight" (least-busy's figure off for as long).
Drop into tests/control/ (it uses test_state_script_writes' fixtures and helpers)."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from aioproxy.state import deployments as deployments_module
from aioproxy.state.shared import deployments_key, link_key
from tests.control.conftest import Control
from tests.control.test_state_script_writes import PREFIX, client, deployment
from tests.redis_server import redis_server, redis_url
from tests.support import upstream_model

__all__ = ["client", "redis_server", "redis_url"]  # the fixtures, used here


async def test_an_in_flight_change_met_by_a_broken_hash_is_not_lost_for_good(
    start_control: Any,
    redis_url: str,
    upstream_base: str,
    client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deployments_module, "SYNC_INTERVAL", 3600.0)  # only the test's syncs
    models = [upstream_model("gpt-test", upstream_base, rpm=100)]
    control: Control = await start_control(
        state={"redis_url": redis_url, "prefix": PREFIX}, models=models
    )
    link, deployments = control.server.app[link_key], control.server.app[deployments_key]
    key = deployment(control, "gpt-test").key
    base = f"{PREFIX}:d:{key}"
    await client.set(f"{base}:r", "not a hash")  # broken while a request starts
    deployments._add(key, 1, 0, 1)  # what the router's count of a request that starts does
    await deployments.sync()
    assert link.unusable == 1
    await client.delete(f"{base}:r")  # deleted, as the log asks
    deployments._add(key, 0, 10, -1)  # the request ends
    await deployments.sync()
    # Nothing is in flight on this instance: its share of the in-flight hash is 0, not -1
    # (which the other instances would add to their figure until this one stops).
    assert int(await client.hget(f"{base}:f", link.instance) or 0) == 0
