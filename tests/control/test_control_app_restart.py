"""The same app object stopped and started again (an embedder's runner torn down and set up
anew): its plugins find the new run's control plane, not the closed one they kept."""

from __future__ import annotations

import warnings
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
from aiohttp.test_utils import TestServer

from aioproxy import create_app
from aioproxy.control.plane import clock_key, plane_key
from tests.control.conftest import CHAT, FakeControlClock, control_config
from tests.support import MASTER_KEY


async def _call(
    session: aiohttp.ClientSession, server: TestServer, method: str, path: str, key: str, body: Any
) -> tuple[int, Any]:
    async with session.request(
        method, str(server.make_url(path)), json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


async def test_keys_and_spend_of_a_second_run(
    upstream_base: str, db_url: str, clock: FakeControlClock
) -> None:
    app = create_app(
        control_config(upstream_base, db_url),
        plugins=[aioproxy_openai, aioproxy_echo],
        load_entrypoints=False,
    )
    app[clock_key] = clock
    async with aiohttp.ClientSession() as session:
        server = TestServer(app)
        await server.start_server()
        _, first = await _call(session, server, "POST", "/admin/keys", MASTER_KEY, {"name": "a"})
        assert (await _call(session, server, "POST", "/v1/chat/completions", first["key"], CHAT))[
            0
        ] == 200
        await server.close()

        with warnings.catch_warnings():  # aiohttp deprecates changing a started app's state
            warnings.simplefilter("ignore", DeprecationWarning)
            server = TestServer(app)
            await server.start_server()
        try:
            status, second = await _call(
                session, server, "POST", "/admin/keys", MASTER_KEY, {"name": "b"}
            )
            assert status == 201
            status, answer = await _call(
                session, server, "POST", "/v1/chat/completions", second["key"], CHAT
            )
            assert status == 200, answer  # a key made in this run authenticates
            await _call(
                session, server, "PATCH", f"/admin/keys/{first['id']}", MASTER_KEY,
                {"disabled": True},
            )  # fmt: skip
            status, _ = await _call(
                session, server, "POST", "/v1/chat/completions", first["key"], CHAT
            )
            assert status == 401  # and a key disabled in this run does not
            await app[plane_key].log.flush()
            _, row = await _call(
                session, server, "GET", f"/admin/keys/{second['id']}", MASTER_KEY, None
            )
            assert row["spend"] > 0  # the second run's spend is written, by its own plane
        finally:
            await server.close()
