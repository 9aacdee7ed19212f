"""Anthropic's Messages API through the proxy, with the official ``anthropic`` SDK, onto chat
models: the echo provider and an OpenAI-compatible upstream (aioproxy.testing.FakeOpenAI).

The pass-through to Anthropic itself is tested with the anthropic plugin
(plugins/aioproxy-anthropic/tests/test_messages_passthrough.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import Call, JSONReply, Provider, Reply, hookimpl
from aioproxy.testing import FakeOpenAI
from tests.support import MASTER_KEY, UPSTREAM_MODEL, ServeProxy, gateway_config

PNG = (  # a 1x1 pixel
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)
LIMITED_KEY = "sk-echo-only"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def _config(upstream_base: str, **server: Any) -> dict[str, Any]:
    config = gateway_config(upstream_base, router={"num_retries": 0})
    config["auth"]["keys"] = [{"key": LIMITED_KEY, "models": ["echo"]}]
    if server:
        config["server"] = server
    return config


@pytest.fixture
async def proxy(serve_proxy: ServeProxy, upstream_base: str) -> TestServer:
    return await serve_proxy(_config(upstream_base))


def _client(proxy: TestServer, key: str = MASTER_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(proxy.make_url("/")), api_key=key, max_retries=0)


@pytest.fixture
async def claude(proxy: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = _client(proxy)
    yield client
    await client.close()


# -- onto chat models ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["echo", "gpt-test"])
async def test_message_onto_chat(claude: anthropic.AsyncAnthropic, model: str) -> None:
    message = await claude.messages.create(
        model=model, max_tokens=50, messages=[{"role": "user", "content": "hello there"}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == model
    assert message.content[0].type == "text" and "hello there" in message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["echo", "gpt-test"])
async def test_stream_onto_chat(claude: anthropic.AsyncAnthropic, model: str) -> None:
    async with claude.messages.stream(
        model=model, max_tokens=50, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_delta" in types and "message_delta" in types
    assert "hello there" in final.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0 and final.stop_reason == "end_turn"


async def test_stream_is_anthropic_events_with_ping(proxy: TestServer) -> None:
    """The raw wire: named events in Anthropic's order, ping included."""
    body = {"model": "gpt-test", "max_tokens": 20, "stream": True, "messages": _HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=_KEY) as resp:
            assert resp.status == 200
            text = await resp.text()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_short_alias(proxy: TestServer) -> None:
    body = {"model": "echo", "max_tokens": 20, "messages": _HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/messages"), json=body, headers=_KEY) as resp:
            assert resp.status == 200
            assert (await resp.json())["content"][0]["text"] == "hi"


async def test_bearer_key_accepted(proxy: TestServer) -> None:
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "anthropic-version": "2023-06-01"}
    body = {"model": "echo", "max_tokens": 20, "messages": _HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=headers) as resp:
            assert resp.status == 200


async def test_system_images_and_stop_sequences_translated(
    claude: anthropic.AsyncAnthropic, fake: FakeOpenAI
) -> None:
    await claude.messages.create(
        model="gpt-test",
        max_tokens=30,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        stop_sequences=["END"],
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},  # not in the 2.x SDK's signature
        metadata={"user_id": "u-1"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.png"},
                    },
                ],
            }
        ],
    )
    sent = fake.last.body
    assert sent["model"] == UPSTREAM_MODEL
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = sent["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parts[1]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert parts[2]["image_url"]["url"] == "https://example.com/a.png"
    assert sent["stop"] == ["END"] and sent["max_tokens"] == 30
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9 and sent["user"] == "u-1"
    assert "top_k" not in sent  # a hint chat has no equivalent for: ignored


async def test_tool_round_trip(claude: anthropic.AsyncAnthropic, fake: FakeOpenAI) -> None:
    question = {"role": "user", "content": "Weather in Paris?"}
    first = await claude.messages.create(
        model="gpt-test",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[question],  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"x": 1}
    sent = fake.last.body
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    second = await claude.messages.create(
        model="gpt-test",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    turns = fake.last.body["messages"]
    assert turns[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(turns[1]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert turns[2] == {"role": "tool", "tool_call_id": use.id, "content": "Sunny"}


async def test_streamed_tool_call(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="gpt-test",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather?"}],
    ) as stream:
        final = await stream.get_final_message()
    use = final.content[-1]
    assert use.type == "tool_use" and use.input == {"x": 1}
    assert final.stop_reason == "tool_use"


# Claude Code's request shape: system blocks with cache_control, thinking, many tools, a
# tool_result turn, the beta header.
_CLAUDE_CODE_TOOLS = [
    {
        "name": name,
        "description": f"The {name} tool",
        "input_schema": {
            "type": "object",
            "properties": {"arg": {"type": "string"}},
            "required": ["arg"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
        **({"cache_control": {"type": "ephemeral"}} if name == "WebFetch" else {}),
    }
    for name in ("Task", "Bash", "Glob", "Grep", "LS", "Read", "Edit", "Write", "WebFetch")
]


def _claude_code_body(stream: bool) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "max_tokens": 32000,
        "stream": stream,
        "temperature": 1,
        "thinking": {"type": "enabled", "budget_tokens": 8000},
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}},
        ],
        "tools": _CLAUDE_CODE_TOOLS,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "List the files"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should use LS.", "signature": "sig"},
                    {"type": "tool_use", "id": "toolu_1", "name": "LS", "input": {"arg": "."}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a.py b.py"}],
                        "cache_control": {"type": "ephemeral"},
                    },
                    {"type": "text", "text": "Thanks", "cache_control": {"type": "ephemeral"}},
                ],
            },
        ],
    }


_CLAUDE_CODE_HEADERS = {
    "x-api-key": MASTER_KEY,
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
}


@pytest.mark.parametrize("stream", [False, True])
async def test_claude_code_request_onto_openai_model(
    proxy: TestServer, fake: FakeOpenAI, stream: bool
) -> None:
    body = _claude_code_body(stream)
    client = _client(proxy)
    try:
        raw = client.messages.with_raw_response
        kwargs = {k: v for k, v in body.items() if k not in ("stream", "temperature")}
        kwargs["extra_body"] = {"temperature": body["temperature"]}  # not in the 2.x signature
        headers = {"anthropic-beta": _CLAUDE_CODE_HEADERS["anthropic-beta"]}
        if stream:
            async with client.messages.stream(**kwargs, extra_headers=headers) as events:
                message = await events.get_final_message()
        else:
            # An explicit timeout: the SDK refuses a long max_tokens without stream otherwise.
            answer = await raw.create(**kwargs, extra_headers=headers, timeout=60)
            message = await answer.parse()
    finally:
        await client.close()
    # The fake model calls the first tool: the tools went through, and so did the answer.
    assert message.stop_reason == "tool_use"
    assert message.content[-1].type == "tool_use" and message.content[-1].name == "Task"
    sent = fake.last.body
    assert sent["messages"][0] == {
        "role": "system",
        "content": "You are Claude Code.\nAnswer briefly.",
    }
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert sent["messages"][3] == {
        "role": "tool",
        "tool_call_id": "toolu_1",
        "content": "a.py b.py",
    }
    assert sent["messages"][4] == {"role": "user", "content": "Thanks"}
    assert len(sent["tools"]) == len(_CLAUDE_CODE_TOOLS)
    assert "reasoning_effort" not in sent  # gpt-test is not marked `reasoning`: thinking ignored
    assert "cache_control" not in json.dumps(sent)


async def test_thinking_becomes_reasoning_effort(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    config = _config(upstream_base)
    config["models"][0]["reasoning"] = True
    proxy = await serve_proxy(config)
    body = _claude_code_body(False)
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=_KEY) as resp:
            assert resp.status == 200
    sent = fake.last.body
    assert sent["reasoning_effort"] == "medium"  # a budget of 8,000 tokens
    assert sent["max_completion_tokens"] == 32000 and "max_tokens" not in sent


async def test_count_tokens_estimated(claude: anthropic.AsyncAnthropic) -> None:
    short = await claude.messages.count_tokens(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    long = await claude.messages.count_tokens(
        model="gpt-test", messages=[{"role": "user", "content": "hi " * 400}]
    )
    assert 0 < short.input_tokens < long.input_tokens


# -- errors in Anthropic's shape -----------------------------------------------------------------

_HI = [{"role": "user", "content": "hi"}]
_KEY = {"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"}


async def _error_of(
    proxy: TestServer,
    body: bytes | dict[str, Any],
    key: str = MASTER_KEY,
    path: str = "/v1/messages",
) -> tuple[int, dict[str, Any]]:
    headers = {**_KEY, "x-api-key": key, "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url(path), data=data, headers=headers) as resp:
            return resp.status, await resp.json()


def _assert_anthropic_error(answer: tuple[int, dict[str, Any]], status: int, kind: str) -> str:
    got_status, body = answer
    assert got_status == status, body
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == kind and body["error"]["message"]
    return str(body["error"]["message"])


async def test_error_shapes(proxy: TestServer, fake: FakeOpenAI) -> None:
    ok = {"model": "gpt-test", "max_tokens": 5, "messages": _HI}
    _assert_anthropic_error(await _error_of(proxy, b"{not json"), 400, "invalid_request_error")
    _assert_anthropic_error(
        await _error_of(proxy, {"model": "gpt-test", "messages": _HI}), 400, "invalid_request_error"
    )
    _assert_anthropic_error(await _error_of(proxy, ok, key="wrong"), 401, "authentication_error")
    _assert_anthropic_error(await _error_of(proxy, ok, key=LIMITED_KEY), 403, "permission_error")
    _assert_anthropic_error(await _error_of(proxy, {**ok, "model": "nope"}), 404, "not_found_error")
    fake.faults = ["status:429"]
    _assert_anthropic_error(await _error_of(proxy, ok), 429, "rate_limit_error")
    fake.faults = ["status:500"]
    _assert_anthropic_error(await _error_of(proxy, ok), 500, "api_error")
    _assert_anthropic_error(
        await _error_of(
            proxy, {"model": "gpt-test", "messages": "x"}, path="/v1/messages/count_tokens"
        ),
        400,
        "invalid_request_error",
    )


async def test_body_too_large_is_anthropic_413(serve_proxy: ServeProxy, upstream_base: str) -> None:
    proxy = await serve_proxy(_config(upstream_base, max_body_size=2048))
    body = {"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 4096}]}
    _assert_anthropic_error(await _error_of(proxy, body), 413, "request_too_large")


async def test_sdk_raises_its_own_error_classes(proxy: TestServer) -> None:
    wrong = _client(proxy, key="wrong")
    try:
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.create(model="echo", max_tokens=5, messages=_HI)  # type: ignore[arg-type]
    finally:
        await wrong.close()
    client = _client(proxy)
    try:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="nope", max_tokens=5, messages=_HI)  # type: ignore[arg-type]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("block", "field"),
    [
        (
            {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
            "messages.0.content.0.source",
        ),
        (
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
            "messages.0.content.0.source",
        ),
        (
            {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}},
            "messages.0.content.0.type",
        ),
    ],
)
async def test_untranslatable_content_refused_naming_field(
    proxy: TestServer, block: dict[str, Any], field: str
) -> None:
    body = {
        "model": "gpt-test",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [block]}],
    }
    message = _assert_anthropic_error(await _error_of(proxy, body), 400, "invalid_request_error")
    assert message.startswith(field)


async def test_server_tool_refused_naming_field(proxy: TestServer) -> None:
    tools = [{"type": "web_search_20250305", "name": "web_search"}]
    body = {"model": "gpt-test", "max_tokens": 5, "messages": _HI, "tools": tools}
    message = _assert_anthropic_error(await _error_of(proxy, body), 400, "invalid_request_error")
    assert message.startswith("tools.0.type")


async def test_openai_routes_keep_openai_errors(proxy: TestServer) -> None:
    """The per-route rendering: chat completions' errors stay OpenAI's."""
    status, body = await _error_of(
        proxy, {"model": "nope", "messages": _HI}, path="/v1/chat/completions"
    )
    assert status == 404 and body["error"]["code"] == "model_not_found" and "type" not in body


async def test_stream_failure_is_an_anthropic_error_event(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    fake.faults = ["cut_stream"]
    body = {"model": "gpt-test", "max_tokens": 20, "stream": True, "messages": _HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=_KEY) as resp:
            assert resp.status == 200
            text = await resp.text()
    last = text.strip().split("\n\n")[-1]
    name, data = last.split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"


class _SlowWholeMessage:
    """A provider whose Messages answer is a whole Message, given only once the client has
    seen a keep-alive comment (so the stream's headers are out by then)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    @hookimpl
    def register_providers(self, register: Any) -> None:
        outer = self

        class SlowProvider(Provider):
            name = "slow"

            async def messages(self, call: Call) -> Reply:
                await outer.go.wait()
                message = {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": call.model,
                    "content": [{"type": "text", "text": "late"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                }
                return JSONReply.of(message)

        register(SlowProvider)


async def test_whole_message_after_keepalive_goes_out_as_anthropic_events(
    serve_proxy: ServeProxy, upstream_base: str
) -> None:
    slow = _SlowWholeMessage()
    config = _config(upstream_base, keepalive_interval=0.01)
    config["models"].append({"name": "slow", "provider": "slow"})
    proxy = await serve_proxy(config, [slow])
    body = {"model": "slow", "max_tokens": 5, "stream": True, "messages": _HI}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=_KEY) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b":")  # a keep-alive comment: the headers are out
            slow.go.set()
            rest = (await resp.read()).decode()
    names = [line[7:] for line in rest.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert '"text_delta","text":"late"' in rest
