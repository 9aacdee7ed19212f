"""The anthropic provider: translation units, then end to end with the official SDK.

The proxy and a fake Anthropic (tests/fake_anthropic.py) both run on 127.0.0.1; the tests assert
what the client gets and what Anthropic received.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import io
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import aioproxy_anthropic
import msgspec
import openai
import pytest
from aiohttp.test_utils import TestServer
from aioproxy_anthropic.errors import error_from, stream_error
from aioproxy_anthropic.translate import (
    Event,
    StreamTranslator,
    Usage,
    decode_answer,
    finish_reason,
    image_block,
    messages_url,
    parse_event,
    to_anthropic,
    to_chat_completion,
    to_usage,
)

from aioproxy import BadRequest, Call, ConfigError, Deployment, Outcome, create_app, hookimpl
from aioproxy.fields import raw_fields
from aioproxy.testing import import_path, weather_tool

fake_anthropic = import_path(Path(__file__).with_name("fake_anthropic.py"))
FakeAnthropic = fake_anthropic.FakeAnthropic
validate = fake_anthropic.validate  # the OpenAI shapes, checked by the kit
TOOL_INPUT = fake_anthropic.TOOL_INPUT
TOOL_PREAMBLE = fake_anthropic.TOOL_PREAMBLE
VERSION = fake_anthropic.VERSION

CLIENT_KEY = fake_anthropic.CLIENT_KEY
UPSTREAM_KEY = fake_anthropic.UPSTREAM_KEY
UPSTREAM_MODEL = fake_anthropic.MODEL_ID
MODEL = fake_anthropic.MODEL
PNG = (  # a 1x1 pixel
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)
WEATHER_TOOL = weather_tool(
    properties={"city": {"type": "string"}, "unit": {"type": "string"}}, required=["city"]
)

StartProxy = Callable[..., Awaitable[TestServer]]


def translate(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` translated, as the JSON Anthropic is sent."""
    out: dict[str, Any] = json.loads(msgspec.json.encode(to_anthropic(raw_fields(body))))
    return out


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def function_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def deployment(**overrides: Any) -> Deployment:
    fields: dict[str, Any] = {
        "name": MODEL,
        "provider": "anthropic",
        "model": UPSTREAM_MODEL,
        "api_key": UPSTREAM_KEY,
    }
    return Deployment(**{**fields, **overrides})


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Any:
    return FakeAnthropic(api_key=UPSTREAM_KEY)


@pytest.fixture
async def upstream(aiohttp_server: Any, fake: Any) -> TestServer:
    return await aiohttp_server(fake.app())


def gateway_config(api_base: str, **settings: Any) -> dict[str, Any]:
    return fake_anthropic.gateway_config(api_base, settings=settings)


@pytest.fixture
def start_proxy(aiohttp_server: Any, upstream: TestServer) -> StartProxy:
    async def start(api_base: str | None = None, **settings: Any) -> TestServer:
        base = api_base if api_base is not None else str(upstream.make_url("/"))
        app = create_app(
            gateway_config(base, **settings), plugins=[aioproxy_anthropic], load_entrypoints=False
        )
        return await aiohttp_server(app)

    return start


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> TestServer:
    return await start_proxy()


@pytest.fixture
async def sdk(proxy: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key=CLIENT_KEY, max_retries=0
    )
    async with client:
        yield client


async def post(
    proxy: TestServer, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[int, bytes, Any]:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.make_url(path), json=body, headers=headers) as response:
            return response.status, await response.read(), response.headers


def sse_data(body: bytes) -> list[str]:
    blocks = body.decode().split("\n\n")
    return [block.removeprefix("data: ") for block in blocks if block.startswith("data: ")]


# -- translation: requests -------------------------------------------------------------------------


def test_system_and_developer_messages_join_the_top_level_system() -> None:
    body = {
        "model": UPSTREAM_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
        ],
    }
    out = translate(body)

    assert out["system"] == "Be brief.\n\nAnswer in French."
    assert out["messages"] == [{"role": "user", "content": "Hi"}]


def test_consecutive_same_role_messages_merge_into_one_turn() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "three"},
        {"role": "assistant", "content": ""},  # empty: dropped, Anthropic refuses empty text
        {"role": "assistant", "content": "four"},
    ]
    out = translate({"model": "m", "messages": messages})

    assert out["messages"] == [
        {"role": "user", "content": [text("one"), text("two")]},
        {"role": "assistant", "content": [text("three"), text("four")]},
    ]


def test_tool_calls_and_results_become_tool_use_and_one_tool_result_turn() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                function_call("call_1", "w", '{"city":"Paris"}'),
                function_call("call_2", "w", ""),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [text("21C")]},
        {"role": "user", "content": "Thanks"},
    ]
    out = translate({"model": "m", "messages": messages})

    assert out["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "w", "input": {}},
        ],
    }
    assert out["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [text("21C")]},
            text("Thanks"),
        ],
    }


def test_image_urls_become_base64_or_url_sources() -> None:
    assert image_block(f"data:image/png;base64,{PNG}") == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    assert image_block("https://example.com/cat.jpg") == {
        "type": "image",
        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
    }
    with pytest.raises(BadRequest):
        image_block("data:image/png,not-base64")
    with pytest.raises(BadRequest):
        image_block("ftp://example.com/cat.jpg")


def test_a_pdf_file_part_becomes_a_document_block() -> None:
    file = {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBER"}
    part = {"type": "file", "file": file}
    out = translate({"model": "m", "messages": user([part])})

    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"},
        }
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "w"}}, None, {"type": "tool", "name": "w"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice(choice: Any, parallel: Any, expected: Any) -> None:
    body = {"model": "m", "messages": user("hi"), "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected


def test_tools_and_sampling_fields_translate_and_openai_only_fields_go() -> None:
    body = {
        "model": "m",
        "messages": user("hi"),
        "max_tokens": 10,
        "max_completion_tokens": 20,  # the newer name wins
        "stop": "END",
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "user-42",
        "tools": [{"type": "function", "function": {"name": "noargs"}}],
        "parallel_tool_calls": False,
        "n": 1,
        "seed": 7,
        "logprobs": True,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "response_format": {"type": "json_object"},
        "stream_options": {"include_usage": True},
        "store": True,
        "metadata": {"k": "v"},
        "service_tier": "auto",
    }
    assert translate(body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
        "tools": [{"name": "noargs", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": user([{"type": "input_audio"}])}, "messages[0].content[0]"),
        (
            {"messages": user([{"type": "file", "file": {"file_id": "file-1"}}])},
            "messages[0].content[0].file",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [function_call("c", "f", "[1]")]}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ],
)
def test_requests_anthropic_cannot_express_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        translate({"model": "m", "messages": user("hi"), **body})
    assert raised.value.param == param


@pytest.mark.parametrize(
    ("api_base", "url"),
    [
        (None, "https://api.anthropic.com/v1/messages"),
        ("https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("https://api.anthropic.com/", "https://api.anthropic.com/v1/messages"),
        ("https://gw.example/anthropic/v1", "https://gw.example/anthropic/v1/messages"),
        ("https://gw.example/anthropic/v1/", "https://gw.example/anthropic/v1/messages"),
    ],
)
def test_messages_url(api_base: str | None, url: str) -> None:
    assert messages_url(api_base) == url


# -- translation: answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reason(stop_reason: str | None, finish: str) -> None:
    assert finish_reason(stop_reason) == finish


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    usage = {
        "input_tokens": 10,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 5,
        "output_tokens": 7,
    }

    assert to_usage(msgspec.convert(usage, Usage)) == {
        "prompt_tokens": 115,
        "completion_tokens": 7,
        "total_tokens": 122,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 5},
    }


def test_a_message_with_text_and_tool_use_becomes_one_choice() -> None:
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": UPSTREAM_MODEL,
        "content": [
            {"type": "text", "text": "Let me "},
            {"type": "text", "text": "check."},
            {"type": "tool_use", "id": "toolu_01", "name": "w", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    out = to_chat_completion(
        decode_answer(msgspec.json.encode(message)), model=MODEL, created=1700000000
    )

    validate("CreateChatCompletionResponse", out)
    assert out["id"] == "chatcmpl-msg_01" and out["model"] == MODEL
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [function_call("toolu_01", "w", '{"city":"Paris"}')]


def test_the_stream_translator_numbers_tool_calls_apart_from_blocks() -> None:
    t = StreamTranslator(model=MODEL, created=1, include_usage=True)

    def block(kind: str, index: int, **fields: Any) -> dict[str, Any]:
        return {"type": f"content_block_{kind}", "index": index, **fields}

    def json_delta(fragment: str) -> dict[str, Any]:
        return block("delta", 1, delta={"type": "input_json_delta", "partial_json": fragment})

    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}
    start = {"id": "msg_1", "usage": {"input_tokens": 5, "output_tokens": 1}}
    usage = {"output_tokens": 9}
    events = [
        {"type": "message_start", "message": start},
        block("start", 0, content_block={"type": "thinking", "thinking": ""}),
        block("delta", 0, delta={"type": "thinking_delta", "thinking": "hmm"}),
        block("stop", 0),
        {"type": "ping"},
        block("start", 1, content_block=tool_use),
        json_delta(""),
        json_delta('{"a":'),
        json_delta("1}"),
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": usage},
        {"type": "message_stop"},
    ]
    chunks = [t.feed(msgspec.json.decode(msgspec.json.encode(e), type=Event)) for e in events]

    assert [len(c) for c in chunks] == [1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1]
    assert chunks[5][0]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, **function_call("toolu_1", "w", "")}
    ]
    fragment = {"index": 0, "function": {"arguments": '{"a":'}}
    assert chunks[7][0]["choices"][0]["delta"]["tool_calls"] == [fragment]
    assert chunks[9][0]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[10][0]["choices"] == [] and chunks[10][0]["usage"]["total_tokens"] == 14
    assert t.finished and {c[0]["id"] for c in chunks if c} == {"chatcmpl-msg_1"}
    for chunk in (c[0] for c in chunks if c):
        validate("CreateChatCompletionStreamResponse", chunk)


def test_parse_event_reads_the_data_line() -> None:
    assert parse_event(b'event: ping\ndata: {"type": "ping"}\n\n') == Event(type="ping")
    assert parse_event(b": comment\n\n") is None


# -- errors ----------------------------------------------------------------------------------------


def test_an_error_answer_never_shows_the_key() -> None:
    said = {"type": "invalid_request_error", "message": f"bad key {UPSTREAM_KEY}"}
    error = error_from(400, json.dumps({"type": "error", "error": said}).encode(), deployment(), {})

    assert UPSTREAM_KEY not in error.message and error.status == 400


def test_a_too_long_prompt_is_a_context_window_error() -> None:
    message = "prompt is too long: 200001 tokens > 200000 maximum"
    said = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    error = error_from(400, json.dumps(said).encode(), deployment(), {})
    assert error.code == "context_length_exceeded"


def test_an_sse_error_body_shows_its_error_events_message() -> None:
    said = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    body = b"event: ping\r\ndata: {}\r\n\r\nevent: error\r\ndata: " + json.dumps(said).encode()
    error = error_from(429, body + b"\r\n\r\n", deployment(), {})

    assert error.message == "slow down" and error.status == 429
    assert "event:" not in error.message


@pytest.mark.parametrize(
    ("error", "status", "type_"),
    [
        ({"type": "rate_limit_error", "message": "slow down"}, 429, "rate_limit_error"),
        ({"type": "something_new"}, 502, "upstream_error"),
        ({}, 502, "upstream_error"),
    ],
)
def test_a_stream_error_event_maps_by_its_type(
    error: dict[str, Any], status: int, type_: str
) -> None:
    event = {"type": "error", "error": error}
    mapped = stream_error(msgspec.convert(event, Event).error, deployment())
    assert (mapped.status, mapped.type) == (status, type_)


# -- end to end: plain chat ------------------------------------------------------------------------


async def test_plain_chat_sends_anthropic_exactly_what_it_takes(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    completion = await sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        stop=["STOP", "HALT"],
        temperature=0.3,
        seed=1,
        logprobs=False,
        presence_penalty=0.5,
        user="end-user-1",
    )

    sent = fake.last
    assert sent.path == "/v1/messages"
    assert sent.body == {
        "model": UPSTREAM_MODEL,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 4096,
        "stop_sequences": ["STOP", "HALT"],
        "temperature": 0.3,
        "metadata": {"user_id": "end-user-1"},
    }
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert sent.headers["anthropic-version"] == VERSION
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers  # the client's key stays at the proxy
    assert CLIENT_KEY not in json.dumps(sent.headers)

    choice = completion.choices[0]
    assert choice.message.content == "Hello! You said: Hello there"
    assert choice.finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.id.startswith("chatcmpl-msg_")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 5)
    validate("CreateChatCompletionResponse", completion.model_dump(mode="json", exclude_unset=True))


async def test_raw_answer_matches_the_schema(proxy: TestServer) -> None:
    status, raw, _ = await post(proxy, {"model": MODEL, "messages": user("Hi")})

    assert status == 200
    validate("CreateChatCompletionResponse", json.loads(raw))


async def test_stop_sequence_and_max_tokens_finish_as_openai_says(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    stopped = await sdk.chat.completions.create(model=MODEL, messages=user("a b c"), stop="said")
    capped = await sdk.chat.completions.create(
        model=MODEL, messages=user("a b c"), max_completion_tokens=2
    )

    choice, capped_choice = stopped.choices[0], capped.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Hello! You ", "stop")
    assert (capped_choice.message.content, capped_choice.finish_reason) == ("Hello! You", "length")
    assert fake.last.body["max_tokens"] == 2


async def test_settings_set_the_version_header_and_default_max_tokens(
    start_proxy: StartProxy, fake: Any, upstream: TestServer
) -> None:
    proxy = await start_proxy(
        str(upstream.make_url("/v1/")), anthropic_version="2024-01-01", default_max_tokens="512"
    )
    status, _, _ = await post(proxy, {"model": MODEL, "messages": user("Hi")})

    assert status == 200
    assert fake.last.headers["anthropic-version"] == "2024-01-01"
    assert fake.last.body["max_tokens"] == 512


async def test_bad_settings_refuse_to_start(start_proxy: StartProxy) -> None:
    with pytest.raises(ConfigError, match=r"at `\$\.models\[0\]\.settings\.default_max_tokens`"):
        await start_proxy(default_max_tokens=0)


async def test_usage_counts_cached_prompt_tokens(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    fake.cache_read_input_tokens = 1000
    fake.cache_creation_input_tokens = 24
    completion = await sdk.chat.completions.create(model=MODEL, messages=user("Hi"))

    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens == 1 + 1000 + 24
    assert usage.prompt_tokens_details.cached_tokens == 1000
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_multi_turn_alternates_for_anthropic(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    messages = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "user", "content": "Remember it."},
        {"role": "assistant", "content": "Noted, Ada."},
        {"role": "system", "content": "Be kind."},  # mid-conversation: still the system prompt
        {"role": "user", "content": "What is my name?"},
    ]
    completion = await sdk.chat.completions.create(model=MODEL, messages=messages)

    assert completion.choices[0].message.content == "Hello! You said: What is my name?"
    assert fake.last.body["system"] == "Be kind."
    assert [m["role"] for m in fake.last.body["messages"]] == ["user", "assistant", "user"]
    assert fake.last.body["messages"][0]["content"] == [
        {"type": "text", "text": "My name is Ada."},
        {"type": "text", "text": "Remember it."},
    ]


async def test_images_by_data_url_and_by_http_url(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    content = [
        {"type": "text", "text": "Compare these"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    completion = await sdk.chat.completions.create(model=MODEL, messages=user(content))

    assert completion.choices[0].message.content == "Hello! You said: Compare these"
    assert fake.last.body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_a_request_anthropic_cannot_express_is_a_400_before_any_upstream_call(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk.chat.completions.create(model=MODEL, messages=user("hi"), n=2)

    assert raised.value.param == "n"
    assert fake.requests == []


# -- end to end: tools -----------------------------------------------------------------------------


async def test_tools_round_trip(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )

    assert fake.last.body["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert fake.last.body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TOOL_PREAMBLE
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("toolu_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == TOOL_INPUT
    validate("CreateChatCompletionResponse", first.model_dump(mode="json", exclude_unset=True))

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    second = await sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])

    assert second.choices[0].message.content == "The tool said: 18C and sunny"
    assert second.choices[0].finish_reason == "stop"
    assert fake.last.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": TOOL_PREAMBLE},
                {"type": "tool_use", "id": call.id, "name": "get_weather", "input": TOOL_INPUT},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}
            ],
        },
    ]
    assert "tool_choice" not in fake.last.body


async def test_tool_choice_none_keeps_the_tools_defined(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    completion = await sdk.chat.completions.create(
        model=MODEL, messages=user("Hi"), tools=[WEATHER_TOOL], tool_choice="none"
    )

    assert completion.choices[0].message.tool_calls is None
    assert fake.last.body["tool_choice"] == {"type": "none"}


# -- end to end: streams ---------------------------------------------------------------------------


async def test_streamed_text_arrives_delta_by_delta(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=user("Stream me please"), stream=True
    )
    chunks = [chunk async for chunk in stream]

    assert fake.last.body["stream"] is True
    assert fake.last.headers["accept"] == "text/event-stream"
    first, texts, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in texts] == [
        "Hello!",
        " You",
        " said:",
        " Stream",
        " me",
        " please",
    ]
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-msg_")
    assert {c.model for c in chunks} == {MODEL}
    assert all(c.usage is None for c in chunks)


async def test_streamed_tool_call_arguments_join_to_the_json(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=[WEATHER_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or ()]
    start, *fragments = calls
    assert text == TOOL_PREAMBLE
    assert (start.index, start.type, start.function.name, start.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert start.id is not None and start.id.startswith("toolu_")
    assert len(fragments) == 2 and all(f.index == 0 and f.id is None for f in fragments)
    assert json.loads("".join(f.function.arguments for f in fragments)) == TOOL_INPUT
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_include_usage_adds_a_last_usage_chunk_and_all_match_the_schema(
    proxy: TestServer,
) -> None:
    body = {
        "model": MODEL,
        "messages": user("Count me"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw, headers = await post(proxy, body)

    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = sse_data(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 2
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["total_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_an_error_event_mid_stream_ends_the_stream_with_an_error(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    fake.faults.append("stream_error")
    stream = await sdk.chat.completions.create(model=MODEL, messages=user("Hi"), stream=True)
    received = []
    with pytest.raises(openai.APIError, match="overloaded") as raised:
        async for chunk in stream:
            received.append(chunk)

    assert [c.choices[0].delta.content for c in received] == ["", "Hello!"]
    assert raised.value.code == "overloaded"


async def test_an_error_event_before_any_output_keeps_its_status(
    proxy: TestServer, fake: Any
) -> None:
    fake.faults.append("error_first")
    status, raw, _ = await post(proxy, {"model": MODEL, "messages": user("Hi"), "stream": True})

    assert status == 503
    assert json.loads(raw)["error"]["code"] == "overloaded"


@pytest.mark.parametrize(
    ("fault", "code"),
    [("cut_stream", "upstream_disconnected"), ("malformed_later", "upstream_invalid_response")],
)
async def test_a_broken_stream_ends_with_an_error_event(
    proxy: TestServer, fake: Any, fault: str, code: str
) -> None:
    fake.faults.append(fault)
    status, raw, _ = await post(proxy, {"model": MODEL, "messages": user("Hi"), "stream": True})

    assert status == 200
    error = json.loads(sse_data(raw)[-1])["error"]
    assert (error["type"], error["code"]) == ("upstream_error", code)
    assert MODEL in error["message"]


async def test_a_stream_whose_event_never_ends_times_out_at_the_read_timeout(
    aiohttp_server: Any, upstream: TestServer, fake: Any
) -> None:
    """The provider reads its stream through upstream.events, which counts progress in events:
    bytes that complete no event for the deployment's ``read`` timeout end the stream."""
    fake.faults.append("trickle")  # a byte every 50 ms: the socket never goes quiet
    config = gateway_config(str(upstream.make_url("/")))
    config["models"][0]["timeouts"] = {"read": 0.5, "first_byte": 120, "total": 120}
    app = create_app(config, plugins=[aioproxy_anthropic], load_entrypoints=False)
    proxy = await aiohttp_server(app)
    body = {"model": MODEL, "messages": user("Hi"), "stream": True}
    # A safety net only: without the event-progress timeout the trickle lasts a minute.
    status, raw, _ = await asyncio.wait_for(post(proxy, body), 30)

    assert status == 200  # the role chunk went out: the failure is the stream's last event
    error = json.loads(sse_data(raw)[-1])["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "upstream_timeout")
    assert "no complete event in 0.5 s" in error["message"]
    assert MODEL in error["message"]


@pytest.mark.parametrize(
    ("fault", "stream", "code"),
    [
        ("malformed", False, "upstream_invalid_response"),
        ("malformed", True, "upstream_invalid_response"),
        ("huge_event", True, "upstream_too_large"),
    ],
)
async def test_an_answer_anthropic_broke_is_a_502(
    proxy: TestServer, fake: Any, fault: str, stream: bool, code: str
) -> None:
    """Anthropic's fault, not the proxy's: a 502 with a code that says so, never a 500."""
    fake.faults.append(fault)
    body = {"model": MODEL, "messages": user("Hi"), "stream": stream}
    status, raw, _ = await post(proxy, body)

    assert status == 502
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", code)
    assert MODEL in error["message"]


# -- end to end: requests of the wrong shape -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"stop": 5}, "stop"),
        ("/v1/chat/completions", {"tools": 5}, "tools"),
        (
            "/v1/chat/completions",
            {"messages": [*user("Hi"), {"role": "assistant", "tool_calls": 5}]},
            "messages[1].tool_calls",
        ),
        ("/v1/responses", {"input": "Hi", "tools": 5}, "tools"),
        (
            "/v1/responses",
            {
                "input": "Hi",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "allowed_tools", "tools": 5},
            },
            "tool_choice.tools",
        ),
    ],
)
async def test_a_wrongly_typed_field_is_a_400_naming_it(
    proxy: TestServer, fake: Any, path: str, fields: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": user("Hi"), **fields}
    status, raw, _ = await post(proxy, body, path)

    assert status == 400
    error = json.loads(raw)["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert fake.requests == []  # refused before Anthropic was asked


@pytest.mark.parametrize(
    ("path", "field"), [("/v1/chat/completions", "messages"), ("/v1/responses", "input")]
)
async def test_a_huge_array_of_tiny_items_is_refused_without_building_it(
    proxy: TestServer, fake: Any, path: str, field: str
) -> None:
    """30 MB of ``[{},{},...]`` once took the proxy's memory from 44 to 847 MiB (issue #9.5)."""
    count = 10_000_000
    body = b'{"model": "%s", "%s": [' % (MODEL.encode(), field.encode()) + b"{}," * count + b"{}]}"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        tracemalloc.start()
        try:
            sent = io.BytesIO(body)  # aiohttp warns of a large bytes body, which blocks its loop
            async with http.post(proxy.make_url(path), data=sent, headers=headers) as response:
                status, raw = response.status, await response.read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert status == 400
    error = json.loads(raw)["error"]
    assert (error["param"], error["code"]) == (field, "array_above_max_length")
    assert peak < 4 * len(body)  # the body as read, not dozens of times it as objects
    assert fake.requests == []


# -- end to end: errors ----------------------------------------------------------------------------

ERROR_CASES = [
    # fault, status the client gets, type, code
    ("status:400", 400, "invalid_request_error", None),
    ("status:401", 502, "upstream_error", "upstream_auth_failed"),
    ("status:403", 502, "upstream_error", "upstream_auth_failed"),
    ("status:404", 502, "upstream_error", "upstream_model_not_found"),
    ("status:413", 413, "invalid_request_error", "request_too_large"),
    ("status:429", 429, "rate_limit_error", "rate_limit_exceeded"),
    ("status:500", 500, "api_error", "api_error"),
    ("status:529", 503, "server_error", "overloaded"),
    ("status:502:text", 502, "upstream_error", "upstream_error"),
    ("status:503:text", 503, "upstream_error", "upstream_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("fault", "status", "type_", "code"), ERROR_CASES)
async def test_anthropic_errors_become_openai_errors(
    proxy: TestServer,
    fake: Any,
    fault: str,
    status: int,
    type_: str,
    code: str | None,
    stream: bool,
) -> None:
    fake.faults.append(fault)
    body = {"model": MODEL, "messages": user("Hi"), "stream": stream}
    got, raw, headers = await post(proxy, body)

    assert got == status
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    assert UPSTREAM_KEY not in error["message"] and CLIENT_KEY not in error["message"]
    if status >= 500:  # the upstream's trouble (or the proxy's config): say which deployment
        assert f"{MODEL} (anthropic:{UPSTREAM_MODEL})" in error["message"]
    if fault in ("status:401", "status:403"):
        assert "x-api-key" not in error["message"] and "permission" not in error["message"]
    if status == 429:
        assert headers["Retry-After"] == "7"
    assert len(fake.requests) == 1


async def test_the_sdk_sees_a_rate_limit_with_its_retry_after(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    fake.faults.append("status:429")
    with pytest.raises(openai.RateLimitError) as raised:
        await sdk.chat.completions.create(model=MODEL, messages=user("Hi"))

    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.code == "rate_limit_exceeded"


async def test_a_refused_request_passes_anthropics_words_on(
    sdk: openai.AsyncOpenAI, fake: Any
) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_use_id"):
        await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]
        )


async def test_a_wrong_deployment_key_is_a_502(start_proxy: StartProxy, fake: Any) -> None:
    fake.api_key = "sk-ant-other"
    proxy = await start_proxy()
    status, raw, _ = await post(proxy, {"model": MODEL, "messages": user("Hi")})

    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_auth_failed"


async def test_an_unreachable_anthropic_is_a_502(start_proxy: StartProxy) -> None:
    proxy = await start_proxy("http://127.0.0.1:1")
    status, raw, _ = await post(proxy, {"model": MODEL, "messages": user("Hi")})

    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_unreachable"


async def test_embeddings_are_not_served(sdk: openai.AsyncOpenAI, fake: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings") as raised:
        await sdk.embeddings.create(model=MODEL, input="hello")

    assert raised.value.code == "unsupported_endpoint"
    assert fake.requests == []


# -- end to end: the other endpoint kinds ----------------------------------------------------------


def _completion_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["text"])


def _response_text(answer: dict[str, Any]) -> str:
    messages = [item for item in answer["output"] if item["type"] == "message"]
    return "".join(p["text"] for m in messages for p in m["content"] if p["type"] == "output_text")


@pytest.mark.parametrize(
    ("path", "body", "schema", "text_of"),
    [
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "Say hi"},
            "CreateCompletionResponse",
            _completion_text,
        ),
        ("/v1/responses", {"model": MODEL, "input": "Say hi"}, "Response", _response_text),
    ],
)
async def test_the_core_bridges_reach_anthropic_through_chat(
    proxy: TestServer,
    fake: Any,
    path: str,
    body: dict[str, Any],
    schema: str,
    text_of: Callable[[dict[str, Any]], str],
) -> None:
    status, raw, _ = await post(proxy, body, path)
    answer = json.loads(raw)
    if status == 400 and answer["error"]["code"] == "unsupported_endpoint":
        pytest.skip(f"the core does not bridge {path} onto chat completions yet")

    assert status == 200, answer
    validate(schema, answer)
    assert text_of(answer) == "Hello! You said: Say hi"
    assert fake.last.body["messages"] == [{"role": "user", "content": "Say hi"}]


# -- the provider authors' kit (aioproxy.testing) --------------------------------------------------


@pytest.fixture
def testing() -> ModuleType:
    return pytest.importorskip("aioproxy.testing")


@pytest.fixture
async def kit_proxy(aiohttp_server: Any, upstream: TestServer, testing: ModuleType) -> Any:
    model = fake_anthropic.model_entry(str(upstream.make_url("/v1")))
    return await testing.start_proxy(aiohttp_server, {"models": [model]}, [aioproxy_anthropic])


async def test_the_kit_passes_chat_and_streams(kit_proxy: Any, testing: ModuleType) -> None:
    expected = "Hello! You said: " + testing.HELLO[0]["content"]

    assert await testing.check_chat(kit_proxy, MODEL) == expected
    assert await testing.check_chat_stream(kit_proxy, MODEL) == expected


@pytest.mark.parametrize("fault", fake_anthropic.FAULTS)
async def test_the_kit_passes_error_mapping(
    kit_proxy: Any, testing: ModuleType, fake: Any, fault: str
) -> None:
    (status, code), _ = fake_anthropic.FAULTS[fault]
    await testing.check_error_mapping(
        kit_proxy, MODEL, lambda: fake.faults.append(fault), status, code=code
    )


async def test_the_kit_passes_a_client_leaving_mid_stream(
    kit_proxy: Any, testing: ModuleType, fake: Any
) -> None:
    fake.stream_delay = 0.05  # so the stream is still running when the client leaves
    await testing.check_cancellation(kit_proxy, MODEL, lambda: fake.in_flight)


# -- packaging -------------------------------------------------------------------------------------


def test_the_entry_point_names_the_plugin() -> None:
    (entry_point,) = importlib.metadata.entry_points(group="aioproxy", name="anthropic")

    assert entry_point.load() is aioproxy_anthropic


# -- request ids -----------------------------------------------------------------------------------


async def test_the_request_id_goes_upstream_and_anthropics_own_is_kept(
    aiohttp_server: Any, upstream: TestServer, fake: Any
) -> None:
    """The gateway's x-request-id reaches Anthropic; Anthropic's ``request-id`` is kept on the
    call as ``upstream_request_id`` (for logs and traces); the client's answer keeps ours."""
    kept: list[str | None] = []

    class Log:
        @hookimpl
        def after_response(self, call: Call, outcome: Outcome) -> None:
            kept.append(call.upstream_request_id)

    app = create_app(
        gateway_config(str(upstream.make_url("/"))),
        plugins=[aioproxy_anthropic, Log()],
        load_entrypoints=False,
    )
    proxy = await aiohttp_server(app)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": "client-7"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url("/v1/chat/completions"), json=body, headers=headers
        ) as response:
            assert response.status == 200
    assert response.headers["x-request-id"] == "client-7"
    assert fake.last.headers["x-request-id"] == "client-7"
    [theirs] = kept
    assert theirs is not None and theirs.startswith("req_")
