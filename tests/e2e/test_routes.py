"""Every route, in its OpenAI form and its alias, through the official SDK, streaming and not."""

from __future__ import annotations

import itertools

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy.routes import ALIASES, ANTHROPIC_KINDS, Kind
from aioproxy.testing import FakeOpenAI
from tests.schemas import validate
from tests.support import AUTH, UPSTREAM_KEY, UPSTREAM_MODEL, sdk

# The SDK's base URL for each form: "/v1" reaches /v1/chat/completions, "" reaches /chat/completions.
FORMS = pytest.mark.parametrize("prefix", ["/v1", ""], ids=["openai-form", "alias"])
MESSAGES = [{"role": "user", "content": "hello proxy world"}]


@FORMS
async def test_chat_completion(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == "fake reply to: hello proxy world"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    assert fake.last.path == "/v1/chat/completions"
    assert fake.last.body["model"] == UPSTREAM_MODEL


@FORMS
async def test_chat_completion_stream(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fake reply to: hello proxy world"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk, as sent
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    assert fake.last.body["stream"] is True


@FORMS
async def test_legacy_completion(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        completion = await client.completions.create(model="gpt-test", prompt="say this")
        stream = await client.completions.create(model="gpt-test", prompt="say this", stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    assert completion.choices[0].text
    assert streamed == completion.choices[0].text
    validate("CreateCompletionResponse", completion.model_dump(exclude_unset=True))
    assert fake.last.path == "/v1/completions"


@FORMS
async def test_embeddings(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        floats = await client.embeddings.create(
            model="gpt-test", input=["a", "b"], encoding_format="float"
        )
        base64 = await client.embeddings.create(model="gpt-test", input=["a", "b"])
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 8
    for decoded, plain in zip(base64.data, floats.data, strict=True):
        assert decoded.embedding == pytest.approx(plain.embedding)
    validate("CreateEmbeddingResponse", floats.model_dump(exclude_unset=True))
    assert fake.last.path == "/v1/embeddings"


@FORMS
async def test_responses(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        response = await client.responses.create(model="gpt-test", input="hello there")
        stream = await client.responses.create(model="gpt-test", input="hello there", stream=True)
        events = [event async for event in stream]
    assert response.output_text == "fake reply to: hello there"
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text
    assert [e.sequence_number for e in events] == sorted(e.sequence_number for e in events)
    assert fake.last.path == "/v1/responses"


@FORMS
async def test_models(proxy: TestServer, prefix: str) -> None:
    async with sdk(proxy, prefix=prefix) as client:
        listed = await client.models.list()
        one = await client.models.retrieve("gpt-test")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
    assert sorted(m.id for m in listed.data) == ["echo", "gpt-test"]
    validate("ListModelsResponse", listed.model_dump(exclude_unset=True))
    assert one.id == "gpt-test" and one.object == "model"
    assert missing.value.code == "model_not_found"


async def test_every_alias_path_is_routed(proxy: TestServer, http: aiohttp.ClientSession) -> None:
    """Each path of the alias map answers with its kind's handler, not 404/405."""
    for kind, paths in ALIASES.items():
        for path in paths:
            url = proxy.make_url(path.replace("{model}", "gpt-test"))
            if kind in (Kind.MODELS, Kind.MODEL):
                async with http.get(url, headers=AUTH) as response:
                    assert response.status == 200, path
            else:
                async with http.post(url, json={}, headers=AUTH) as response:
                    body = await response.json()
                    assert response.status == 400, path
                    if kind in ANTHROPIC_KINDS:  # Anthropic's error shape, which has no param
                        assert body["error"]["type"] == "invalid_request_error", path
                        assert "'model'" in body["error"]["message"]
                    else:
                        assert body["error"]["param"] == "model"


async def test_upstream_sees_configured_key_and_model_never_the_clients(
    proxy: TestServer, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    for key_header in (
        {"Authorization": "Bearer sk-master-test"},
        {"api-key": "sk-master-test"},
        {"x-api-key": "sk-master-test"},
    ):
        body = {"model": "gpt-test", "messages": MESSAGES, "api_key": "sk-evil"}
        async with http.post(
            proxy.make_url("/v1/chat/completions"),
            json=body,
            headers={**key_header, "X-Custom": "1"},
        ) as response:
            assert response.status == 200
        seen = fake.last
        assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "sk-master-test" not in repr(seen.headers) and b"sk-master-test" not in seen.raw
        assert "api-key" not in seen.headers and "x-api-key" not in seen.headers
        assert "x-custom" not in seen.headers
        assert seen.body["model"] == UPSTREAM_MODEL


async def test_unknown_fields_reach_upstream_untouched(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    extra = {
        "response_format": {"type": "json_object"},
        "seed": 7,
        "metadata": {"team": "a"},
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "logit_bias": {"50256": -100},
    }
    await client.chat.completions.create(model="gpt-test", messages=MESSAGES, **extra)  # type: ignore[arg-type]
    sent = dict(fake.last.body)
    assert sent.pop("model") == UPSTREAM_MODEL
    assert sent == {"messages": MESSAGES, **extra}


async def test_stream_events_pass_through_one_by_one(
    proxy: TestServer, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    """With a gap between upstream events, each reaches the client before the next is sent."""
    fake.stream_delay = 0.2
    fake.stream_chunks = 3
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    async with http.post(proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        loop = __import__("asyncio").get_running_loop()
        arrivals = []
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(loop.time())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 5
    assert all(gap > 0.1 for gap in gaps), gaps  # never coalesced into one late burst


async def test_tool_calls_round_trip(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_x", "parameters": {"type": "object"}}}]
    completion = await client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        tools=tools,  # type: ignore[arg-type]
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_x" and completion.choices[0].finish_reason == "tool_calls"
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        tools=tools,
        stream=True,  # type: ignore[arg-type]
    )
    arguments = "".join(
        [
            d.function.arguments or ""
            async for c in stream
            if c.choices
            for d in (c.choices[0].delta.tool_calls or [])
        ]
    )
    assert arguments == '{"x": 1}'
