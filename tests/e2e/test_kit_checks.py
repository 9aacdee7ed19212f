"""aioproxy.testing's checks against real proxies: what they refuse, and what they leave behind."""

from __future__ import annotations

import base64
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from aioproxy import Call, JSONReply, Provider, Reply, hookimpl
from aioproxy.keys import config_key
from aioproxy.testing import check_embeddings, check_responses, start_proxy

VECTOR = [0.5, -0.25, 0.125]


class Sloppy(Provider):
    """Chat and embeddings; ``flaw`` names what it gets wrong."""

    name = "sloppy"
    flaw = ""

    async def chat_completions(self, call: Call) -> Reply:
        message = {"role": "assistant", "content": "hi"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return JSONReply.of(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def embeddings(self, call: Call) -> Reply:
        packed = base64.b64encode(struct.pack(f"<{len(VECTOR)}f", *VECTOR)).decode()
        wanted = call.get("encoding_format") == "base64"
        if self.flaw == "floats for base64":
            wanted = False
        elif self.flaw == "big-endian base64" and wanted:
            packed = base64.b64encode(struct.pack(f">{len(VECTOR)}f", *VECTOR)).decode()
        vector: Any = packed if wanted else VECTOR
        model = "someone-else" if self.flaw == "another model" else call.model
        return JSONReply.of(
            {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )


def plugin(flaw: str = "") -> object:
    provider = type("SloppyProvider", (Sloppy,), {"flaw": flaw})

    class Registers:
        @hookimpl
        def register_providers(self, register: Any) -> None:
            register(provider, "sloppy")

    return Registers()


def config(upstream_model: str | None = None) -> dict[str, Any]:
    model = {"name": "m", "provider": "sloppy"}
    return {"models": [{**model, "model": upstream_model} if upstream_model else model]}


async def test_sound_embeddings_pass(aiohttp_server: Any) -> None:
    proxy = await start_proxy(aiohttp_server, config(), [plugin()])
    assert await check_embeddings(proxy, "m", inputs=["x"], dims=3) == [VECTOR]


@pytest.mark.parametrize(
    ("flaw", "complaint"),
    [
        ("floats for base64", "not a base64 string"),
        ("big-endian base64", "vectors are not the float answer's"),
        ("another model", "model is 'someone-else'"),
    ],
)
async def test_flawed_embeddings_fail(aiohttp_server: Any, flaw: str, complaint: str) -> None:
    proxy = await start_proxy(aiohttp_server, config(), [plugin(flaw)])
    with pytest.raises(AssertionError, match=complaint):
        await check_embeddings(proxy, "m", inputs=["x"])


async def test_an_answer_may_name_the_upstream_model(aiohttp_server: Any) -> None:
    proxy = await start_proxy(aiohttp_server, config("up-1"), [plugin()])
    assert proxy.answer_models("m") == {"m", "up-1"}


async def test_the_responses_store_is_a_temporary_database_of_its_own(
    aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    proxy = await start_proxy(aiohttp_server, config(), [plugin()])
    other = await start_proxy(aiohttp_server, config(), [plugin()])
    await check_responses(proxy, "m")  # through the bridge, which stores each response
    # Stored responses live in the control plane's database, which the kit puts in a scratch folder.
    store = Path(make_url(proxy.app[config_key].database.url).database or "")
    other_store = Path(make_url(other.app[config_key].database.url).database or "")
    assert store.exists() and store.parent != other_store.parent
    assert list(tmp_path.iterdir()) == []  # nothing in the working directory
    await proxy.server.close()
    assert not store.parent.exists()  # removed with the server
