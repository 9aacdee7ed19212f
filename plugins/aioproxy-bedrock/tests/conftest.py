"""A fake Bedrock on 127.0.0.1 that checks SigV4 signatures, and a proxy in front of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aioproxy_bedrock
import pytest
from aiohttp.test_utils import TestServer

from aioproxy.testing import ProxyUnderTest, import_path, start_proxy

ACCESS_KEY_ID = "AKIDBEDROCKTEST"
SECRET_KEY = "bedrock/secret+access/KEY0123456789abcdef"
API_KEY = "ABSKbedrock-api-key-secret-0123456789"
REGION = "us-east-1"
CHAT_MODEL_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"  # ':' must be encoded in the path


fake_bedrock = import_path(Path(__file__).with_name("fake_bedrock.py"))


def model(name: str, model_id: str, api_base: str, **fields: Any) -> dict[str, Any]:
    """A deployment of ``model_id`` on the fake, with static SigV4 keys unless told otherwise."""
    settings = {"region": REGION, "aws_access_key_id": ACCESS_KEY_ID, **fields.pop("settings", {})}
    entry = {"api_key": SECRET_KEY, **fields}
    return {
        "name": name,
        "provider": "bedrock",
        "model": model_id,
        "api_base": api_base,
        "settings": {k: v for k, v in settings.items() if v is not None},
        **entry,
    }


@pytest.fixture
def fake() -> Any:
    return fake_bedrock.FakeBedrock(
        region=REGION, credentials={ACCESS_KEY_ID: (SECRET_KEY, None)}, api_keys=(API_KEY,)
    )


@pytest.fixture
async def api_base(aiohttp_server: Any, fake: Any) -> str:
    server: TestServer = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def proxy(aiohttp_server: Any, api_base: str) -> ProxyUnderTest:
    """Models ``claude`` (chat), ``titan`` and ``cohere`` (embeddings), ``keyed`` (an API key)."""
    models = [
        model("claude", CHAT_MODEL_ID, api_base),
        model("titan", "amazon.titan-embed-text-v2:0", api_base),
        model("cohere", "cohere.embed-english-v3", api_base),
        model(
            "keyed",
            CHAT_MODEL_ID,
            api_base,
            api_key=API_KEY,
            settings={"aws_access_key_id": None},
        ),
    ]
    return await start_proxy(aiohttp_server, {"models": models}, [aioproxy_bedrock])
