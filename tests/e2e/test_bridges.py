"""Responses and legacy completions on a chat-only provider, through the official SDK."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import Provider, create_app, hookimpl
from aioproxy.hookspecs import RegisterProvider
from aioproxy.testing import FakeOpenAI, assert_openai_error
from aioproxy.testing.openai_upstream import TOOL_ARGUMENTS
from tests.schemas import validate
from tests.support import (
    ALICE,
    BOB,
    UPSTREAM_MODEL,
    alice_and_bob,
    sdk,
    upstream_model,
)

FORMS = pytest.mark.parametrize("prefix", ["/v1", ""], ids=["openai-form", "alias"])
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class ChatOnlyOpenAI(aioproxy_openai.OpenAIProvider):
    """The openai provider with chat completions only, as many OpenAI-compatible servers are."""

    responses = Provider.responses
    completions = Provider.completions
    embeddings = Provider.embeddings


class ChatOnlyEcho(aioproxy_echo.EchoProvider):
    responses = Provider.responses
    completions = Provider.completions
    embeddings = Provider.embeddings


class ChatOnlyPlugin:
    @hookimpl
    def register_providers(self, register: RegisterProvider) -> None:
        register(ChatOnlyOpenAI, "chatonly")
        register(ChatOnlyEcho, "chatonly-echo")


def bridged_config(api_base: str, store_path: Path, **responses: Any) -> dict[str, Any]:
    return {
        "auth": alice_and_bob(),
        "models": [
            upstream_model("bridged", api_base, "chatonly"),
            {"name": "bridged-echo", "provider": "chatonly-echo"},
            upstream_model("native", api_base),
        ],
        # Stored responses live in the control plane's database.
        "database": {"url": f"sqlite:///{store_path}"},
        "responses": responses,
    }


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "responses.sqlite3"


@pytest.fixture
def start(aiohttp_server: Any, upstream_base: str, store_path: Path) -> Any:
    async def start_bridged(**responses: Any) -> TestServer:
        app = create_app(
            bridged_config(upstream_base, store_path, **responses),
            plugins=[aioproxy_openai, aioproxy_echo, ChatOnlyPlugin()],
            load_entrypoints=False,
        )
        return await aiohttp_server(app)

    return start_bridged


@pytest.fixture
async def proxy(start: Any) -> TestServer:
    return await start()


def dump(model: Any) -> dict[str, Any]:
    return model.model_dump(exclude_unset=True, by_alias=True)


# -- responses ---------------------------------------------------------------------------


@FORMS
async def test_response(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, ALICE, prefix) as client:
        response = await client.responses.create(
            model="bridged",
            input="hello proxy world",
            instructions="be brief",
            max_output_tokens=50,
            temperature=0.5,
            metadata={"team": "a"},
        )
    validate("Response", dump(response))
    assert response.output_text == "fake reply to: hello proxy world"
    assert response.status == "completed" and response.model == "bridged"
    assert response.id.startswith("resp_") and response.store is True
    assert response.usage is not None and response.usage.total_tokens > 0
    assert response.instructions == "be brief" and response.metadata == {"team": "a"}
    seen = fake.last
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == UPSTREAM_MODEL
    assert seen.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello proxy world"},
    ]
    assert seen.body["max_completion_tokens"] == 50 and seen.body["temperature"] == 0.5
    assert "input" not in seen.body and "metadata" not in seen.body


@FORMS
async def test_response_stream(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, ALICE, prefix) as client:
        stream = await client.responses.create(model="bridged", input="hello there", stream=True)
        events = [event async for event in stream]
    for event in events:
        validate("ResponseStreamEvent", dump(event))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == fake.stream_chunks  # one per chat delta, none merged
    assert "".join(deltas) == "fake reply to: hello there"
    final = events[-1].response
    assert final.output_text == "fake reply to: hello there" and final.usage is not None
    assert fake.last.body["stream"] is True
    assert fake.last.body["stream_options"] == {"include_usage": True}


async def test_sdk_stream_helper_accumulates_the_response(proxy: TestServer) -> None:
    async with sdk(proxy, ALICE) as client:
        async with client.responses.stream(model="bridged", input="hi again") as stream:
            texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert "".join(texts) == final.output_text == "fake reply to: hi again"


async def test_tool_call_round_trip(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with sdk(proxy, ALICE) as client:
        first = await client.responses.create(
            model="bridged", input="weather in Paris?", tools=[WEATHER_TOOL], store=False
        )
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.arguments == TOOL_ARGUMENTS and call.id.startswith("fc_")
        validate("Response", dump(first))
        assert fake.last.body["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": WEATHER_TOOL["parameters"],
                },
            }
        ]
        second = await client.responses.create(
            model="bridged",
            input=[
                {"role": "user", "content": "weather in Paris?"},
                *[item.model_dump(exclude_none=True) for item in first.output],
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            ],
        )
    assert second.output_text == "fake reply to: weather in Paris?"
    assert fake.last.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]


async def test_tool_call_stream_and_chaining(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with sdk(proxy, ALICE) as client:
        stream = await client.responses.create(
            model="bridged", input="weather?", tools=[WEATHER_TOOL], stream=True
        )
        events = [event async for event in stream]
        for event in events:
            validate("ResponseStreamEvent", dump(event))
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert "".join(deltas) == TOOL_ARGUMENTS and len(deltas) > 1
        [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.name == "get_weather" and done.arguments == TOOL_ARGUMENTS
        first = events[-1].response
        [call] = first.output
        await client.responses.create(
            model="bridged",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}],
        )
    assert [m["role"] for m in fake.last.body["messages"]] == ["user", "assistant", "tool"]
    assert fake.last.body["messages"][1]["tool_calls"][0]["id"] == call.call_id


async def test_text_format_reaches_chat_as_response_format(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "point", "schema": schema, "strict": True}}
    async with sdk(proxy, ALICE) as client:
        response = await client.responses.create(model="bridged", input="a point", text=text)
    validate("Response", dump(response))
    assert response.text is not None and response.text.format.type == "json_schema"
    assert fake.last.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "point", "schema": schema, "strict": True},
    }


async def test_a_capped_answer_is_incomplete(proxy: TestServer) -> None:
    async with sdk(proxy, ALICE) as client:
        response = await client.responses.create(
            model="bridged-echo", input="one two three four five", max_output_tokens=2
        )
        stream = await client.responses.create(
            model="bridged-echo",
            input="one two three four five",
            max_output_tokens=2,
            stream=True,
        )
        events = [event async for event in stream]
    validate("Response", dump(response))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].type == "response.incomplete"


async def test_previous_response_id_across_a_restart(
    start: Any, fake: FakeOpenAI, store_path: Path
) -> None:
    first_proxy = await start()
    async with sdk(first_proxy, ALICE) as client:
        first = await client.responses.create(model="bridged", input="my name is Ada")
    await first_proxy.close()  # the app's cleanup closes the store

    second_proxy = await start()
    async with sdk(second_proxy, ALICE) as client:
        second = await client.responses.create(
            model="bridged", input="what is my name?", previous_response_id=first.id
        )
        again = await client.responses.retrieve(first.id)
    assert second.previous_response_id == first.id
    assert fake.last.body["messages"] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "fake reply to: my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]
    assert again.id == first.id and again.output_text == first.output_text
    assert store_path.exists()


@FORMS
async def test_retrieve_and_delete(
    proxy: TestServer, http: aiohttp.ClientSession, prefix: str
) -> None:
    async with sdk(proxy, ALICE, prefix) as client:
        created = await client.responses.create(model="bridged", input="keep me")
        fetched = await client.responses.retrieve(created.id)
        assert fetched.model_dump() == created.model_dump()
        validate("Response", dump(fetched))
        await client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
    # Again over plain HTTP, to see the bodies.
    async with sdk(proxy, ALICE, prefix) as client:
        kept = await client.responses.create(model="bridged", input="keep me too")
    url = proxy.make_url(f"{prefix}/responses/{kept.id}")
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    async with http.get(url, headers=bob) as response:
        await assert_openai_error(response, 404)  # another key's response is not there for it
    async with http.delete(url, headers=bob) as response:
        await assert_openai_error(response, 404)
    async with http.get(url) as response:
        await assert_openai_error(response, 401)
    async with http.delete(url, headers=alice) as response:
        assert response.status == 200
        assert await response.json() == {"id": kept.id, "object": "response", "deleted": True}
    async with http.delete(url, headers=alice) as response:
        error = await assert_openai_error(response, 404)
    assert kept.id in error["message"]


async def test_previous_response_of_another_key_is_not_found(
    proxy: TestServer, http: aiohttp.ClientSession
) -> None:
    async with sdk(proxy, ALICE) as client:
        first = await client.responses.create(model="bridged", input="secret")
    async with sdk(proxy, BOB) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(
                model="bridged", input="and?", previous_response_id=first.id
            )
    assert caught.value.code == "previous_response_not_found"
    body = {"model": "bridged", "input": "x", "previous_response_id": "resp_nope"}
    async with http.post(
        proxy.make_url("/v1/responses"), json=body, headers={"Authorization": f"Bearer {ALICE}"}
    ) as response:
        error = await assert_openai_error(response, 404, "previous_response_not_found")
    assert error["param"] == "previous_response_id"
    assert error["message"] == "Previous response with id 'resp_nope' not found."


async def test_store_disabled(start: Any, store_path: Path) -> None:
    proxy = await start(store=False)
    async with sdk(proxy, ALICE) as client:
        response = await client.responses.create(model="bridged", input="x")
        assert response.store is False
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(
                model="bridged", input="y", previous_response_id=response.id
            )
    assert caught.value.param == "previous_response_id"  # type: ignore[attr-defined]
    with sqlite3.connect(store_path) as db:  # the database is the control plane's: it exists
        assert db.execute("SELECT count(*) FROM stored_responses").fetchone() == (0,)
    db.close()


async def test_unsupported_tools_are_refused(proxy: TestServer) -> None:
    async with sdk(proxy, ALICE) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(
                model="bridged", input="x", tools=[{"type": "web_search"}]
            )
    assert caught.value.code == "unsupported_parameter"


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_keep_their_status_and_are_retried(
    proxy: TestServer, fake: FakeOpenAI, stream: bool
) -> None:
    fake.faults.append("status:400")
    async with sdk(proxy, ALICE) as client:
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="bridged", input="x", stream=stream)
        fake.faults.append("status:429")  # retryable: the router tries again, through the bridge
        response = await client.responses.create(model="bridged", input="x", stream=stream)
        if stream:
            response = [event async for event in response][-1].response
    assert response.status == "completed"
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 3


async def test_a_cut_chat_stream_ends_in_response_failed(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    fake.faults.append("cut_stream")
    async with sdk(proxy, ALICE) as client:
        stream = await client.responses.create(model="bridged", input="x", stream=True)
        events = [event async for event in stream]
    for event in events:
        validate("ResponseStreamEvent", dump(event))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"


async def test_a_client_that_leaves_releases_the_chat_stream(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    fake.stream_chunks = 50
    fake.stream_delay = 0.05
    async with sdk(proxy, ALICE) as client:
        stream = await client.responses.create(model="bridged", input="x", stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
    await fake.wait_idle()


async def test_native_responses_are_not_bridged(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with sdk(proxy, ALICE) as client:
        await client.responses.create(model="native", input="x")
        await client.completions.create(model="native", prompt="x")
    assert [r.path for r in fake.requests] == ["/v1/responses", "/v1/completions"]


# -- legacy completions ------------------------------------------------------------------


@FORMS
async def test_legacy_completion(proxy: TestServer, fake: FakeOpenAI, prefix: str) -> None:
    async with sdk(proxy, ALICE, prefix) as client:
        completion = await client.completions.create(
            model="bridged", prompt="say this", max_tokens=20, temperature=0.3, stop=["\n"]
        )
        seen = fake.last
        stream = await client.completions.create(
            model="bridged",
            prompt="say this",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    validate("CreateCompletionResponse", dump(completion))
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "fake reply to: say this"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert seen.path == "/v1/chat/completions"
    assert seen.body["messages"] == [{"role": "user", "content": "say this"}]
    assert seen.body["max_tokens"] == 20 and seen.body["stop"] == ["\n"]
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == completion.choices[0].text
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len([c for c in chunks if c.choices and c.choices[0].text]) == fake.stream_chunks


async def test_legacy_completion_echo_and_several_prompts(proxy: TestServer) -> None:
    async with sdk(proxy, ALICE) as client:
        completion = await client.completions.create(
            model="bridged", prompt=["first", "second"], echo=True
        )
    validate("CreateCompletionResponse", dump(completion))
    assert [(c.index, c.text) for c in completion.choices] == [
        (0, "firstfake reply to: first"),
        (1, "secondfake reply to: second"),
    ]


async def test_legacy_completion_suffix_is_refused(proxy: TestServer) -> None:
    async with sdk(proxy, ALICE) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="bridged", prompt="x", suffix="y")
    assert caught.value.param == "suffix"  # type: ignore[attr-defined]
