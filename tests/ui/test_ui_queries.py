"""The dashboard's own queries (the overview's points, one request's row) on SQLite and
PostgreSQL, with rows written at known times."""

from __future__ import annotations

from typing import Any

import aioproxy_echo
import aioproxy_openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import create_app
from aioproxy.control import schema
from aioproxy.control.plane import ControlPlane, clock_key, plane_key
from aioproxy.ui.pages import points_key
from aioproxy.ui.queries import RANGES, SETTLE, PointCache, overview, request_row
from aioproxy.ui.site import _warming_key
from tests.control.conftest import FakeControlClock
from tests.ui.conftest import ui_config

HOUR = 3600


@pytest.fixture
async def server(
    aiohttp_server: Any, upstream_base: str, db_url: str, clock: FakeControlClock
) -> TestServer:
    app = create_app(
        ui_config(upstream_base, db_url),
        plugins=[aioproxy_openai, aioproxy_echo],
        load_entrypoints=False,
    )
    app[clock_key] = clock
    started: TestServer = await aiohttp_server(app)
    return started


@pytest.fixture
def plane(server: TestServer) -> ControlPlane:
    return server.app[plane_key]


async def _log(plane: ControlPlane, *rows: dict[str, Any]) -> None:
    defaults = {
        "request_id": "req",
        "day": "2030-03-17",
        "key_id": "key_a",
        "key_name": "a",
        "team_id": None,
        "end_user": None,
        "model": "m",
        "deployment": "m#0",
        "provider": "echo",
        "kind": "chat_completions",
        "status": 200,
        "error_code": None,
        "stream": False,
        "input_tokens": 10,
        "output_tokens": 5,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": False,
        "cost": 0.5,
        "ttft": 0.1,
        "duration": 1.0,
    }
    async with plane.engine.begin() as connection:
        await connection.execute(schema.requests.insert(), [{**defaults, **row} for row in rows])


async def test_points_totals_percentiles_and_top_spenders(
    plane: ControlPlane, clock: FakeControlClock
) -> None:
    now = clock.now
    await _log(
        plane,
        *({"time": now - 30, "duration": 0.3 + i / 1000} for i in range(18)),  # this hour
        {"time": now - 32, "duration": 50.0},
        {"time": now - 31, "duration": 50.0, "status": 500, "model": "big", "cost": 9.0},
        {"time": now - 5 * HOUR, "key_id": "key_b", "cost": 2.0},
        {"time": now - 2 * 86400},  # outside the day
    )
    data = await overview(plane, PointCache(), 86400, HOUR)
    assert len(data.times) == 24 and data.times[-1] <= now < data.times[-1] + HOUR
    assert data.requests[-1] == 20 and data.errors[-1] == 1 and data.requests[-6] == 1
    assert data.totals["requests"] == 21 and data.totals["errors"] == 1
    assert data.totals["cost"] == pytest.approx(0.5 * 19 + 9.0 + 2.0)
    assert data.input_tokens[-1] == 200 and data.output_tokens[-1] == 100
    assert 0.3 <= (data.latency_p50[-1] or 0) <= 0.4  # the 0.3-0.4 s bin
    assert (data.latency_p95[-1] or 0) > 30  # the slowest tenth took 50 s
    assert data.latency_p50[0] is None  # no traffic then
    assert [row["group"] for row in data.top_models] == ["m", "big"]
    assert data.top_models[0]["requests"] == 20 and data.top_keys[0]["group"] == "key_a"


async def test_a_stream_cut_after_its_200_is_an_error(
    plane: ControlPlane, clock: FakeControlClock
) -> None:
    """A stream the upstream or the stop cut after its 200 went out keeps status 200 with an
    error_code: the error series counts it, as it counts a 4xx or 5xx."""
    now = clock.now
    await _log(
        plane,
        {"time": now - 30},
        {"time": now - 30, "stream": True, "error_code": "upstream_disconnected"},
        {"time": now - 30, "stream": True, "error_code": "server_shutdown"},
        {"time": now - 30, "status": 502, "error_code": "bad_gateway"},
    )
    data = await overview(plane, PointCache(), 86400, HOUR)
    assert (data.requests[-1], data.errors[-1]) == (4, 3)
    assert data.totals["errors"] == 3


async def test_settled_points_are_kept_and_the_newest_reread(
    plane: ControlPlane, clock: FakeControlClock
) -> None:
    cache = PointCache()
    await _log(plane, {"time": clock.now - 3 * HOUR})
    first = await overview(plane, cache, 86400, HOUR)
    assert first.totals["requests"] == 1
    # A row the database gets later inside a settled point is not read again ...
    await _log(plane, {"time": clock.now - 3 * HOUR}, {"time": clock.now - 1})
    kept = await overview(plane, cache, 86400, HOUR)
    assert kept.totals["requests"] == 2  # ... but the newest point is
    assert (await overview(plane, PointCache(), 86400, HOUR)).totals["requests"] == 3
    # Once the newest point has settled, it is kept too; the range moves on.
    clock.advance(HOUR + SETTLE)
    moved = await overview(plane, cache, 86400, HOUR)
    assert moved.totals["requests"] == 2 and len(moved.times) == 24


@pytest.mark.parametrize("span, step", [(3600, 300), (30 * 86400, 86400)])
async def test_every_range_has_whole_points(
    plane: ControlPlane, clock: FakeControlClock, span: int, step: int
) -> None:
    await _log(plane, {"time": clock.now - span + step + 1}, {"time": clock.now})
    data = await overview(plane, PointCache(), span, step)
    assert len(data.times) == span // step
    assert all(t % step == 0 for t in data.times)
    assert data.totals["requests"] == 2 and data.requests[-1] >= 1


async def test_request_row(plane: ControlPlane, clock: FakeControlClock) -> None:
    await _log(plane, {"time": clock.now, "request_id": "req_1", "model": "one"})
    row = await request_row(plane, "req_1")
    assert row is not None and row["model"] == "one"
    assert await request_row(plane, "req_2") is None


async def test_settled_points_are_read_ahead_at_start(server: TestServer) -> None:
    """The app reads the settled points once it started, so the first view is quick too."""
    app = server.app
    await app[_warming_key]
    steps = {step for step, _ in app[points_key].points}
    assert steps == {step for span, step in RANGES.values() if span > SETTLE + step}
    assert steps  # the day's and the month's
