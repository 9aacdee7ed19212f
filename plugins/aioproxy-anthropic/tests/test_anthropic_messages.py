"""Anthropic's Messages API through the proxy to Anthropic (a fake): passed through, the body as
the client's bytes but ``model``, the stream relayed event by event, errors in Anthropic's shape,
usage read for after_response (what spend and limits use)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_anthropic
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import Call, Outcome, Usage, create_app, hookimpl
from aioproxy.testing import import_path

fake_anthropic = import_path(Path(__file__).with_name("fake_anthropic.py"))
FakeAnthropic = fake_anthropic.FakeAnthropic

CLIENT_KEY = fake_anthropic.CLIENT_KEY
UPSTREAM_KEY = fake_anthropic.UPSTREAM_KEY
UPSTREAM_MODEL = fake_anthropic.MODEL_ID
MODEL = fake_anthropic.MODEL
VERSION = {"anthropic-version": "2023-06-01"}


class _Usages:
    """Records each request's usage as after_response sees it."""

    def __init__(self) -> None:
        self.seen: list[Usage | None] = []

    @hookimpl
    def after_response(self, call: Call, outcome: Outcome) -> None:
        self.seen.append(outcome.usage())


@pytest.fixture
def fake() -> Any:
    return FakeAnthropic(api_key=UPSTREAM_KEY)


@pytest.fixture
def usages() -> _Usages:
    return _Usages()


@pytest.fixture
async def proxy(aiohttp_server: Any, fake: Any, usages: _Usages) -> TestServer:
    upstream = await aiohttp_server(fake.app())
    config = fake_anthropic.gateway_config(
        str(upstream.make_url("/")), headers={"anthropic-beta": "configured-beta"}
    )
    app = create_app(config, plugins=[aioproxy_anthropic, usages], load_entrypoints=False)
    return await aiohttp_server(app)


@pytest.fixture
async def claude(proxy: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=str(proxy.make_url("/")), api_key=CLIENT_KEY, max_retries=0
    )
    yield client
    await client.close()


async def _post(
    proxy: TestServer, data: bytes, path: str = "/v1/messages", **headers: str
) -> tuple[int, bytes]:
    sent = {"x-api-key": CLIENT_KEY, "content-type": "application/json", **VERSION, **headers}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url(path), data=data, headers=sent) as response:
            return response.status, await response.read()


# Anthropic-only features the translation to chat would not carry: passed through as they are.
_BODY = {
    "model": MODEL,
    "max_tokens": 64,
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi  there"}]}],
    "top_k": 3,
}


@pytest.mark.parametrize("stream", [False, True])
async def test_body_passes_as_the_clients_bytes_but_model(
    proxy: TestServer, fake: Any, stream: bool
) -> None:
    client_bytes = json.dumps({**_BODY, "stream": stream}, separators=(",", ":")).encode()
    status, _ = await _post(proxy, client_bytes, **{"anthropic-beta": "client-beta"})
    assert status == 200
    received = fake.last
    expected = client_bytes.replace(b'"model":"claude"', f'"model":"{UPSTREAM_MODEL}"'.encode())
    assert received.raw == expected
    assert received.headers["x-api-key"] == UPSTREAM_KEY  # never the client's
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["anthropic-beta"] == "configured-beta,client-beta"


async def test_stream_relayed_event_by_event(proxy: TestServer) -> None:
    data = json.dumps({**_BODY, "stream": True}).encode()
    status, body = await _post(proxy, data)
    assert status == 200
    names = [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]


async def test_sdk_messages_and_stream(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.content[0].text == "Hello! You said: hello"  # type: ignore[union-attr]
    async with claude.messages.stream(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "Hello! You said: hello"  # type: ignore[union-attr]


async def test_count_tokens_is_anthropics_exact_count(
    claude: anthropic.AsyncAnthropic, fake: Any
) -> None:
    counted = await claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}]
    )
    assert counted.input_tokens == 3  # the fake counts words
    assert fake.last.path == "/v1/messages/count_tokens"
    assert fake.last.body["model"] == UPSTREAM_MODEL


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_reaches_after_response(
    proxy: TestServer, fake: Any, usages: _Usages, stream: bool
) -> None:
    """Input tokens (message_start's, in a stream) plus what the cache read and wrote."""
    fake.cache_read_input_tokens = 5
    fake.cache_creation_input_tokens = 2
    status, _ = await _post(proxy, json.dumps({**_BODY, "stream": stream}).encode())
    assert status == 200
    usage = usages.seen[-1]
    assert usage is not None
    # "Be brief." + "hi  there": 4 words, plus 5 read from the cache and 2 written to it.
    assert usage.prompt_tokens == 4 + 5 + 2 and usage.cached_tokens == 5
    assert usage.completion_tokens == 5  # "Hello! You said: hi  there": 5 words
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("fault", fake_anthropic.FAULTS)
async def test_upstream_errors_in_anthropics_shape(
    proxy: TestServer, fake: Any, fault: str
) -> None:
    _, (status, kind) = fake_anthropic.FAULTS[fault]
    fake.faults = [fault]
    got, body = await _post(proxy, json.dumps(_BODY).encode())
    assert got == status
    error = json.loads(body)
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert UPSTREAM_KEY not in body.decode()


async def test_upstream_refusal_is_invalid_request(proxy: TestServer) -> None:
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    got, body = await _post(proxy, json.dumps({**_BODY, "messages": turns}).encode())
    assert got == 400
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "alternate" in error["message"]


async def test_stream_error_event_keeps_its_type(proxy: TestServer, fake: Any) -> None:
    fake.faults = ["stream_error"]
    got, body = await _post(proxy, json.dumps({**_BODY, "stream": True}).encode())
    assert got == 200
    last = body.decode().strip().split("\n\n")[-1]
    name, data = last.split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: "))["error"]["type"] == "overloaded_error"


async def test_sdk_sees_overloaded(claude: anthropic.AsyncAnthropic, fake: Any) -> None:
    fake.faults = ["status:529"]
    with pytest.raises(anthropic.InternalServerError) as raised:
        await claude.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.status_code == 529
