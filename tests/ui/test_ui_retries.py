"""Each request's retries and fallbacks: counted by the dispatcher, written in its request log
row, and shown on its details page."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from aioproxy.testing import FakeOpenAI
from tests.support import AUTH, MASTER_KEY, UPSTREAM_MODEL, ServeProxy, sdk
from tests.ui.conftest import ui_config
from tests.ui.support import sign_in

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_retries_and_fallbacks_reach_the_request_details(
    serve_proxy: ServeProxy,
    upstream_base: str,
    sqlite_url: str,
    fake: FakeOpenAI,
    aiohttp_client: Any,
) -> None:
    config = ui_config(upstream_base, sqlite_url)
    config["models"].append(
        {
            "name": "primary",
            "provider": "openai",
            "model": UPSTREAM_MODEL,
            "api_base": upstream_base,
            "api_key": "sk-up",
        }
    )
    config["router"] = {
        "retry_backoff": 0,
        "models": {
            "gpt-test": {"num_retries": 2},
            "primary": {"num_retries": 0, "fallbacks": ["gpt-test"]},
        },
    }
    server: TestServer = await serve_proxy(config)
    async with sdk(server) as client:
        await client.chat.completions.create(model="echo", messages=MESSAGES, user="plain")
        fake.faults = ["status:500"]  # gpt-test answers at its second attempt
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES, user="retried")
        fake.faults = ["status:500"]  # primary fails and has no retries: gpt-test answers
        await client.chat.completions.create(model="primary", messages=MESSAGES, user="fell")
    ui: TestClient = await aiohttp_client(server)
    await sign_in(ui, MASTER_KEY)
    rows = (await (await ui.get("/admin/requests", headers=AUTH)).json())["data"]
    counts = {row["end_user"]: (row["retries"], row["fallbacks"]) for row in rows}
    assert counts == {"plain": (0, 0), "retried": (1, 0), "fell": (0, 1)}
    ids = {row["end_user"]: row["request_id"] for row in rows}
    shown = {
        user: await (await ui.get(f"/ui/requests/{request_id}")).text()
        for user, request_id in ids.items()
    }
    assert "1 on the same model, 0 on fallbacks" in shown["retried"]
    assert "0 on the same model, 1 on fallbacks" in shown["fell"]
    assert "0 on the same model, 0 on fallbacks" in shown["plain"]
