"""The echo provider, served by a real aioproxy app over HTTP and driven with the official SDK."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aioproxy_echo
import openai
import pytest
from aiohttp.test_utils import TestClient
from aioproxy_echo.embeddings import embed
from aioproxy_echo.text import EMPTY_REPLY, count_words, echo, split_tokens

from aioproxy import ConfigError, Outcome, Usage, create_app, hookimpl
from aioproxy.testing import import_path, text_response_event_types

Client = TestClient[Any, Any]
MakeProxy = Callable[..., Awaitable[Client]]


def config(**settings: Any) -> dict[str, Any]:
    return {
        "models": [
            {"name": "echo", "provider": "echo", "model": "echo-upstream", "settings": settings}
        ]
    }


@pytest.fixture
def make_proxy(aiohttp_client: Any, tmp_path: Path) -> MakeProxy:
    async def make(**settings: Any) -> Client:
        # Responses go through the core's bridge, which stores them: not in the working directory.
        store = {"database": {"url": f"sqlite:///{tmp_path / 'control.sqlite3'}"}}
        app = create_app(
            config(**settings) | store, plugins=[aioproxy_echo], load_entrypoints=False
        )
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Client:
    return await make_proxy()


def sdk_for(proxy: Client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="x", max_retries=0)


@pytest.fixture
async def sdk(proxy: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk_for(proxy) as client:
        yield client


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


async def post(proxy: Client, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with proxy.post(path, json=body) as response:
        return response.status, await response.read()


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of every event in an SSE body."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


# -- tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["hello world", "  lead and trail  ", "a\n\nb\tc", "one", "x\u00a0y\u2003z ", ""]
)
def test_tokens_join_back_and_count_words(text: str) -> None:
    tokens = split_tokens(text)
    assert "".join(tokens) == (text if text.strip() else "")
    assert len(tokens) == count_words(text)


def test_tokens_keep_the_whitespace_before_each_word() -> None:
    assert split_tokens("hello big world") == ["hello", " big", " world"]


def test_echo_caps_and_never_answers_nothing() -> None:
    assert echo("a b c", 2) == (["a", " b"], "length")
    assert echo("a b", 2) == (["a", " b"], "stop")
    assert echo("   ").text == EMPTY_REPLY


# -- chat completions ------------------------------------------------------------------------------


async def test_chat_echoes_the_last_user_message(sdk: openai.AsyncOpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "Hello there, echo!"},
    ]
    completion = await sdk.chat.completions.create(model="echo", messages=messages)

    choice = completion.choices[0]
    assert choice.message.content == "Hello there, echo!"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.model == "echo"  # the client's name, not the deployment's model id
    assert completion.id.startswith("chatcmpl-echo-")
    assert abs(completion.created - time.time()) < 5
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 3, 12)


async def test_chat_reads_the_text_parts_of_list_content(sdk: openai.AsyncOpenAI) -> None:
    content = [
        {"type": "text", "text": "hello"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "big world"},
    ]
    completion = await sdk.chat.completions.create(model="echo", messages=user(content))

    assert completion.choices[0].message.content == "hello\nbig world"
    assert completion.usage is not None and completion.usage.prompt_tokens == 3


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
async def test_chat_caps_the_reply_in_words(sdk: openai.AsyncOpenAI, cap: str) -> None:
    completion = await sdk.chat.completions.create(
        model="echo", messages=user("one two three four"), **{cap: 2}
    )

    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


async def test_chat_with_nothing_to_echo_gives_the_fixed_reply(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="echo", messages=[{"role": "system", "content": "no user here"}]
    )

    assert completion.choices[0].message.content == EMPTY_REPLY
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == count_words(EMPTY_REPLY)


async def test_chat_answers_n_choices(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="echo", messages=user("hi you"), n=3)

    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"hi you"}
    assert completion.usage is not None and completion.usage.completion_tokens == 6


async def test_the_same_request_gets_the_same_id(sdk: openai.AsyncOpenAI) -> None:
    first = await sdk.chat.completions.create(model="echo", messages=user("same"))
    second = await sdk.chat.completions.create(model="echo", messages=user("same"))
    other = await sdk.chat.completions.create(model="echo", messages=user("other"))

    assert first.id == second.id != other.id


async def test_chat_stream_deltas_join_to_the_whole_answer(sdk: openai.AsyncOpenAI) -> None:
    messages = user("  The quick\nbrown fox  jumps ")
    whole = await sdk.chat.completions.create(model="echo", messages=messages)
    stream = await sdk.chat.completions.create(
        model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    first, tokens, finish, last = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in tokens] == [
        "  The",
        " quick",
        "\nbrown",
        " fox",
        "  jumps ",
    ]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        == whole.choices[0].message.content
    )
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.choices == []
    assert last.usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


async def test_chat_stream_is_sse_ending_in_done(proxy: Client) -> None:
    body = {"model": "echo", "messages": user("a b"), "stream": True, "max_tokens": 1}
    async with proxy.post("/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        raw = await response.read()

    events = sse_events(raw)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # No usage chunk: the client did not ask (the gateway asks for its request log and takes
    # it out; the "usage": null the chunks then carry may stay, as issue 12 allows).
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "a", None]


async def test_chat_stream_with_n_choices_interleaves_them(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model="echo", messages=user("x y"), n=2, stream=True)
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""

    assert texts == {0: "x y", 1: "x y"}


# -- completions -----------------------------------------------------------------------------------


async def test_completion_echoes_the_prompt(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(model="echo", prompt="say this back")

    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-echo-")
    assert completion.model == "echo"
    assert completion.choices[0].text == "say this back"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)


async def test_completion_answers_n_choices_per_prompt(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(
        model="echo", prompt=["one two three", "four"], n=2, max_tokens=2
    )

    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "one two", "length"),
        (1, "one two", "length"),
        (2, "four", "stop"),
        (3, "four", "stop"),
    ]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 10


async def test_completion_echoes_token_ids_as_numbers(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(model="echo", prompt=[[15496, 995], [42]])

    assert [c.text for c in completion.choices] == ["15496 995", "42"]
    assert completion.usage is not None and completion.usage.prompt_tokens == 3


async def test_completion_stream(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.completions.create(
        model="echo",
        prompt=["a b c", "d"],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "a b c", 1: "d"}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 4)
    assert {c.object for c in chunks} == {"text_completion"}


# -- embeddings ------------------------------------------------------------------------------------


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


async def test_embeddings_are_deterministic_unit_vectors(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.embeddings.create(
        model="echo", input=["hello world", "hello world", "other"], encoding_format="float"
    )

    a, b, c = (item.embedding for item in result.data)
    assert [item.index for item in result.data] == [0, 1, 2]
    assert len(a) == 16
    assert a == b != c
    assert norm(a) == pytest.approx(1.0, abs=1e-6)
    assert result.model == "echo"
    assert result.usage.prompt_tokens == result.usage.total_tokens == 5
    again = await sdk.embeddings.create(model="echo", input="hello world", encoding_format="float")
    assert again.data[0].embedding == a


async def test_embeddings_in_base64_decode_to_the_same_floats(sdk: openai.AsyncOpenAI) -> None:
    floats = await sdk.embeddings.create(model="echo", input="text", encoding_format="float")
    default = await sdk.embeddings.create(model="echo", input="text")  # the SDK asks for base64

    assert default.data[0].embedding == floats.data[0].embedding


async def test_embeddings_base64_on_the_wire(proxy: Client) -> None:
    status, raw = await post(
        proxy, "/v1/embeddings", {"model": "echo", "input": "text", "encoding_format": "base64"}
    )

    assert status == 200
    encoded = json.loads(raw)["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert struct.unpack("<16f", base64.b64decode(encoded)) == embed("text", 16)


async def test_embeddings_dimensions_from_request_then_settings(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(dimensions=8)
    async with sdk_for(proxy) as sdk:
        by_settings = await sdk.embeddings.create(model="echo", input="x")
        by_request = await sdk.embeddings.create(model="echo", input="x", dimensions=32)

    assert len(by_settings.data[0].embedding) == 8
    assert len(by_request.data[0].embedding) == 32
    assert norm(by_request.data[0].embedding) == pytest.approx(1.0, abs=1e-6)


async def test_embeddings_of_token_ids(sdk: openai.AsyncOpenAI) -> None:
    result = await sdk.embeddings.create(
        model="echo", input=[[1, 2, 3], [4]], encoding_format="float"
    )

    assert [item.embedding for item in result.data] == [
        list(embed([1, 2, 3], 16)),
        list(embed([4], 16)),
    ]
    assert embed([1, 2], 16) != embed("1,2", 16)
    assert result.usage.prompt_tokens == 4


# -- responses -------------------------------------------------------------------------------------


async def test_response_echoes_a_string_input(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="echo", input="Tell me a story", instructions="Be kind."
    )

    assert response.output_text == "Tell me a story"
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.store is True  # through the core's bridge, which keeps it
    assert (await sdk.responses.retrieve(response.id)).output_text == "Tell me a story"
    assert response.model == "echo"
    assert response.instructions == "Be kind."
    assert response.incomplete_details is None
    message = response.output[0]
    assert message.type == "message" and message.status == "completed"
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (6, 4, 10)
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


async def test_response_echoes_the_last_user_item(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(
        model="echo",
        input=[
            {"role": "user", "content": "earlier"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "ok"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look at"},
                    {
                        "type": "input_image",
                        "image_url": "https://example.com/a.png",
                        "detail": "auto",
                    },
                    {"type": "input_text", "text": "this"},
                ],
            },
            {"type": "function_call_output", "call_id": "c1", "output": "ignored words here"},
        ],
    )

    assert response.output_text == "look at\nthis"
    # The bridge's chat request: every message's words count, the tool output's too.
    assert response.usage is not None and response.usage.input_tokens == 8


async def test_response_capped_is_incomplete(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="echo", input="a b c d e", max_output_tokens=3)

    assert response.output_text == "a b c"
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


RESPONSE_EVENTS = text_response_event_types(3)


async def test_response_stream_sends_the_event_sequence(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="echo", input="one two three", stream=True)
    events = [event async for event in stream]

    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["one", " two", " three"]
    done = events[-1].response
    assert done.status == "completed"
    assert done.output_text == "one two three"
    assert done.usage is not None and done.usage.output_tokens == 3
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


async def test_response_stream_capped_ends_incomplete(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(
        model="echo", input="one two three", stream=True, max_output_tokens=1
    )
    events = [event async for event in stream]

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


async def test_response_stream_names_each_event(proxy: Client) -> None:
    status, raw = await post(
        proxy, "/v1/responses", {"model": "echo", "input": "one two three", "stream": True}
    )

    assert status == 200
    events = sse_events(raw)
    assert [name for name, _ in events] == RESPONSE_EVENTS
    assert all(json.loads(data)["type"] == name for name, data in events)


async def test_sdk_stream_helper_gets_the_final_response(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.responses.stream(model="echo", input="hi there") as stream:
        final = await stream.get_final_response()

    assert final.output_text == "hi there"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": user(5)}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": user([{"type": "text"}])},
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", {"messages": user("x"), "max_tokens": "3"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user("x"), "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": user("x"), "n": True}, "n"),
        (
            "/v1/chat/completions",
            {"messages": user("x"), "stream": True, "stream_options": 1},
            "stream_options",
        ),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
        ("/v1/embeddings", {}, "input"),
        ("/v1/embeddings", {"input": [[1], "a"]}, "input"),
        ("/v1/embeddings", {"input": "a", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/responses", {}, "input"),
        ("/v1/responses", {"input": 3}, "input"),
        ("/v1/responses", {"input": [{"role": "user", "content": {}}]}, "input[0].content"),
        ("/v1/responses", {"input": "x", "instructions": ["no"]}, "instructions[0]"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    proxy: Client, path: str, body: dict[str, Any], param: str
) -> None:
    status, raw = await post(proxy, path, {"model": "echo", **body})

    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]


async def test_sdk_raises_bad_request(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="echo", messages="nope")

    assert caught.value.status_code == 400
    assert caught.value.param == "messages"


async def test_bad_settings_stop_the_app_from_starting() -> None:
    # The core checks settings against EchoProvider.settings_type when the app is created.
    with pytest.raises(ConfigError, match=r"models\[0\]\.settings\.delay"):
        create_app(config(delay="soon"), plugins=[aioproxy_echo], load_entrypoints=False)


# -- settings --------------------------------------------------------------------------------------


async def test_delay_paces_a_stream(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(delay=0.01)
    async with sdk_for(proxy) as sdk:
        started = time.perf_counter()
        stream = await sdk.chat.completions.create(
            model="echo", messages=user("one two three four five"), stream=True
        )
        arrivals = [time.perf_counter() async for _ in stream]

    assert arrivals[-1] - started >= 0.04
    assert arrivals[1] - started < arrivals[-1] - started  # sent as made, not all at the end


async def test_delay_paces_a_whole_answer(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(delay="0.01")  # a string, as ${VAR} in a TOML config gives
    async with sdk_for(proxy) as sdk:
        started = time.perf_counter()
        await sdk.responses.create(model="echo", input="one two three four five")

    assert time.perf_counter() - started >= 0.04


async def test_no_delay_is_quick(sdk: openai.AsyncOpenAI) -> None:
    started = time.perf_counter()
    stream = await sdk.chat.completions.create(
        model="echo", messages=user("word " * 200), stream=True
    )
    count = len([chunk async for chunk in stream])

    assert count == 202
    assert time.perf_counter() - started < 2


# -- usage as the proxy's hooks see it ------------------------------------------------------------


class UsageRecorder:
    """An after_response plugin that keeps the usage aioproxy read from each answer."""

    def __init__(self) -> None:
        self.usages: list[Usage | None] = []

    @hookimpl
    def after_response(self, outcome: Outcome) -> None:
        self.usages.append(outcome.usage())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": user("a b c")}),
        (
            "/v1/chat/completions",
            {"messages": user("a b c"), "stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            "/v1/completions",
            {"prompt": "a b c", "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/responses", {"input": "a b c", "stream": True}),
        ("/v1/responses", {"input": "a b c"}),
    ],
)
async def test_the_proxy_reads_the_usage(
    aiohttp_client: Any, path: str, body: dict[str, Any]
) -> None:
    recorder = UsageRecorder()
    app = create_app(config(), plugins=[aioproxy_echo, recorder], load_entrypoints=False)
    proxy = await aiohttp_client(app)

    status, _ = await post(proxy, path, {"model": "echo", **body})

    assert status == 200
    assert recorder.usages == [Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6)]


# -- the plugin ------------------------------------------------------------------------------------


def test_the_entry_point_names_the_plugin() -> None:
    (entry_point,) = importlib.metadata.entry_points(group="aioproxy", name="echo")

    assert entry_point.load() is aioproxy_echo


# -- OpenAI's schemas ------------------------------------------------------------------------------


def openai_schemas() -> ModuleType:
    """The repository's validator for OpenAI's published schemas (tests/schemas)."""
    path = Path(__file__).resolve().parents[3] / "tests" / "schemas" / "__init__.py"
    if not path.exists():
        pytest.skip("the repository's tests/schemas is not here")
    return import_path(path)


CHAT = {"model": "echo", "messages": user("check the shape"), "max_tokens": 2}
SCHEMA_CASES = [
    ("/v1/chat/completions", CHAT, "CreateChatCompletionResponse"),
    ("/v1/completions", {"model": "echo", "prompt": ["a b", "c"]}, "CreateCompletionResponse"),
    ("/v1/embeddings", {"model": "echo", "input": ["a", "b"]}, "CreateEmbeddingResponse"),
    ("/v1/responses", {"model": "echo", "input": "a b c"}, "Response"),
    ("/v1/responses", {"model": "echo", "input": "a b c", "max_output_tokens": 1}, "Response"),
]
STREAM_CASES = [
    (
        "/v1/chat/completions",
        {**CHAT, "stream_options": {"include_usage": True}},
        "CreateChatCompletionStreamResponse",
    ),
    (
        "/v1/completions",
        {"model": "echo", "prompt": "a b", "stream_options": {"include_usage": True}},
        "CreateCompletionResponse",
    ),
    ("/v1/responses", {"model": "echo", "input": "a b c"}, "ResponseStreamEvent"),
    (
        "/v1/responses",
        {"model": "echo", "input": "a b c", "max_output_tokens": 1},
        "ResponseStreamEvent",
    ),
]


@pytest.mark.parametrize(("path", "body", "schema"), SCHEMA_CASES)
async def test_answers_match_openai_schemas(
    proxy: Client, path: str, body: dict[str, Any], schema: str
) -> None:
    schemas = openai_schemas()
    status, raw = await post(proxy, path, body)

    assert status == 200
    schemas.validate(schema, json.loads(raw))


@pytest.mark.parametrize(("path", "body", "schema"), STREAM_CASES)
async def test_stream_events_match_openai_schemas(
    proxy: Client, path: str, body: dict[str, Any], schema: str
) -> None:
    schemas = openai_schemas()
    status, raw = await post(proxy, path, {**body, "stream": True})

    assert status == 200
    for _, data in sse_events(raw):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        # Streamed text_completion chunks have finish_reason null until the last, as OpenAI's do,
        # which the (non-streamed) schema they share does not allow.
        if schema == "CreateCompletionResponse" and any(
            choice["finish_reason"] is None for choice in event["choices"]
        ):
            continue
        schemas.validate(schema, event)
