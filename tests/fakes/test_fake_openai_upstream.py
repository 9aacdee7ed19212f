"""Self-tests of the fake upstream: the official SDK must accept it, and every fault must bite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aioproxy.testing import FakeOpenAI, text_response_event_types
from aioproxy.testing.openai_upstream import MODELS, REDIRECT_LOCATION
from tests.schemas import validate

USER = [{"role": "user", "content": "hello there world"}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]
RESPONSE_EVENTS = text_response_event_types(5)


# `fake` and `upstream` (the fake served on 127.0.0.1) are tests/conftest.py's fixtures.


@pytest.fixture
async def raw(upstream: TestServer, aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(upstream)


@pytest.fixture
async def sdk(upstream: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=str(upstream.make_url("/v1")), api_key="x", max_retries=0)
    yield client
    await client.close()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE block of a fully read body."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


# -- happy paths through the official SDK -----------------------------------------------


async def test_chat_plain(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    done = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}],
    )
    assert done.object == "chat.completion"
    assert done.model == "gpt-4o-mini"
    choice = done.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("fake reply to: hello world", "stop")
    usage = done.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 5, 9)
    assert (fake.last.method, fake.last.path) == ("POST", "/v1/chat/completions")
    assert fake.last.headers["authorization"] == "Bearer x"
    assert fake.last.body["messages"][1]["content"] == parts
    assert json.loads(fake.last.raw) == fake.last.body


async def test_chat_tools(sdk: openai.AsyncOpenAI) -> None:
    done = await sdk.chat.completions.create(model="m", messages=USER, tools=TOOLS)
    call = done.choices[0].message.tool_calls[0]
    assert done.choices[0].finish_reason == "tool_calls"
    assert done.choices[0].message.content is None
    assert (call.type, call.function.name) == ("function", "lookup")
    assert json.loads(call.function.arguments) == {"x": 1}

    named = {"type": "function", "function": {"name": "other"}}
    done = await sdk.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice=named
    )
    assert done.choices[0].message.tool_calls[0].function.name == "other"

    done = await sdk.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="none"
    )
    assert done.choices[0].message.content == "fake reply to: hello there world"


async def test_chat_stream_with_usage(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    first, *content, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert len(content) == fake.stream_chunks
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == "fake reply to: hello there world"
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None and usage.usage.total_tokens == 9
    assert len({c.id for c in chunks}) == 1


async def test_chat_stream_tool_call(sdk: openai.AsyncOpenAI) -> None:
    # The SDK's stream helper accumulates deltas: a realistic id/name-then-arguments sequence.
    async with sdk.chat.completions.stream(model="m", messages=USER, tools=TOOLS) as stream:
        done = await stream.get_final_completion()
    call = done.choices[0].message.tool_calls[0]
    assert done.choices[0].finish_reason == "tool_calls"
    assert call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"x": 1})


async def test_completions(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    done = await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert (done.object, done.choices[0].text) == ("text_completion", "fake reply to: say hi")

    fake.stream_chunks = 3
    stream = await sdk.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="say hi",
        stream=True,
        stream_options={"include_usage": True},
    )
    *content, finish, usage = [c async for c in stream]
    assert len(content) == 3
    assert "".join(c.choices[0].text for c in content) == "fake reply to: say hi"
    assert finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage is not None


async def test_embeddings(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    floats = await sdk.embeddings.create(model="e", input=["a", "b"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in floats.data)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 2

    # By default the SDK asks for base64 and decodes it: the numbers must be identical.
    decoded = await sdk.embeddings.create(model="e", input=["a", "b"])
    assert fake.last.body["encoding_format"] == "base64"
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]

    tokens = await sdk.embeddings.create(
        model="e", input=[[1, 2], [3]], dimensions=16, encoding_format="float"
    )
    assert [len(d.embedding) for d in tokens.data] == [16, 16]
    single = await sdk.embeddings.create(model="e", input=[1, 2, 3], encoding_format="float")
    assert len(single.data) == 1 and single.usage.total_tokens == 3


async def test_responses(sdk: openai.AsyncOpenAI) -> None:
    done = await sdk.responses.create(model="gpt-4o", input="hi", instructions="be nice")
    assert done.id.startswith("resp_")
    assert (done.status, done.instructions) == ("completed", "be nice")
    assert done.output_text == "fake reply to: hi"
    assert done.usage is not None and done.usage.total_tokens == done.usage.input_tokens + 4


async def test_responses_stream(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "one two"}]}]
    stream = await sdk.responses.create(model="gpt-4o", input=items, stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "fake reply to: one two" == events[-1].response.output_text

    # The SDK's accumulating helper agrees.
    async with sdk.responses.stream(model="gpt-4o", input="x") as helper:
        final = await helper.get_final_response()
    assert final.output_text == "fake reply to: x"


async def test_models(sdk: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in sdk.models.list()]
    assert listed == list(MODELS)
    one = await sdk.models.retrieve("ft:gpt-4o:org/x")
    assert (one.id, one.object) == ("ft:gpt-4o:org/x", "model")


async def test_missing_model(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.chat.completions.create(model="missing-model", messages=USER, stream=True)
    assert err.value.code == "model_not_found" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("missing-model")


# -- raw HTTP: exact bytes and schemas ------------------------------------------------


SCHEMA_CASES = [
    ("/v1/chat/completions", {"messages": USER}, "CreateChatCompletionResponse"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS}, "CreateChatCompletionResponse"),
    ("/v1/completions", {"prompt": "p"}, "CreateCompletionResponse"),
    ("/v1/embeddings", {"input": "a"}, "CreateEmbeddingResponse"),
    ("/v1/responses", {"input": "a"}, "Response"),
]


@pytest.mark.parametrize(("path", "body", "schema"), SCHEMA_CASES)
async def test_bodies_match_openai_schema(
    raw: TestClient, path: str, body: dict, schema: str
) -> None:
    resp = await raw.post(path, json={"model": "m", **body})
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["x-request-id"].startswith("req_")
    validate(schema, await resp.json())


async def test_models_match_openai_schema(raw: TestClient) -> None:
    validate("ListModelsResponse", await (await raw.get("/v1/models")).json())
    validate("Model", await (await raw.get("/v1/models/gpt-4o")).json())


@pytest.mark.parametrize(
    "extra", [{}, {"tools": TOOLS}, {"stream_options": {"include_usage": True}}]
)
async def test_chat_stream_framing(raw: TestClient, extra: dict) -> None:
    resp = await raw.post(
        "/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True, **extra}
    )
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(await resp.text())
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        validate("CreateChatCompletionStreamResponse", json.loads(data))


async def test_responses_stream_framing(raw: TestClient) -> None:
    resp = await raw.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    events = sse_events(await resp.text())
    assert [name for name, _ in events] == RESPONSE_EVENTS  # no [DONE] for the Responses API
    for name, data in events:
        body = json.loads(data)
        assert body["type"] == name
        validate("ResponseStreamEvent", body)


async def test_completions_stream_last_chunk_matches_schema(raw: TestClient) -> None:
    # Only the finishing chunk: earlier ones carry finish_reason null (as the real API
    # does), which the published CreateCompletionResponse schema does not allow.
    resp = await raw.post("/v1/completions", json={"model": "m", "prompt": "p", "stream": True})
    *_, (_, finish), done = sse_events(await resp.text())
    assert done == (None, "[DONE]")
    validate("CreateCompletionResponse", json.loads(finish))


async def test_bad_requests(raw: TestClient, fake: FakeOpenAI) -> None:
    resp = await raw.post(
        "/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status == 400
    validate("ErrorResponse", await resp.json())
    assert fake.last.body is None and fake.last.raw == b"{not json"

    resp = await raw.post("/v1/chat/completions", json={"model": "missing-model", "messages": USER})
    error = (await resp.json())["error"]
    assert resp.status == 404
    assert (error["code"], error["param"]) == ("model_not_found", None)

    resp = await raw.get("/v1/chat/completions")
    assert resp.status == 404 and "Invalid URL" in (await resp.json())["error"]["message"]


# -- faults ------------------------------------------------------------------------------


async def test_status_faults_are_fifo(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.faults = ["status:429", "status:500", "status:502:text"]
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk.models.list()
    assert limited.value.response.headers["retry-after"] == "0"
    assert limited.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as failed:
        await sdk.chat.completions.create(model="m", messages=USER)
    assert failed.value.type == "server_error"
    with pytest.raises(openai.APIStatusError) as text:
        await sdk.embeddings.create(model="e", input="a")
    assert text.value.status_code == 502
    assert text.value.response.text == "502 Bad Gateway"
    assert text.value.response.headers["content-type"].startswith("text/plain")
    assert fake.faults == []
    assert len(fake.requests) == 3  # faulted requests are recorded too
    assert (await sdk.models.list()).data  # queue drained: back to normal


async def test_garbage(raw: TestClient, fake: FakeOpenAI) -> None:
    fake.faults.append("garbage")
    resp = await raw.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert (resp.status, resp.content_type) == (200, "application/json")
    assert await resp.read() == b"not json at all"


async def test_reset(raw: TestClient, sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.faults.append("reset")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await raw.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    fake.faults.append("reset")
    with pytest.raises(openai.APIConnectionError):
        await sdk.chat.completions.create(model="m", messages=USER)
    assert fake.in_flight == 0 and len(fake.requests) == 2


async def test_hang_ends_when_client_gives_up(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.faults.append("hang")
    with pytest.raises(openai.APITimeoutError):
        await sdk.chat.completions.create(model="m", messages=USER, timeout=0.1)
    await fake.wait_idle(within=1)


async def test_cut_stream(sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.faults.append("cut_stream")
    stream = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2  # the role chunk and one content chunk, then the line drops
    await fake.wait_idle(within=1)


async def test_cut_stream_without_stream_resets(raw: TestClient, fake: FakeOpenAI) -> None:
    fake.faults.append("cut_stream")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await raw.post("/v1/responses", json={"model": "m", "input": "x"})


async def test_stall_stream_ends_when_client_leaves(raw: TestClient, fake: FakeOpenAI) -> None:
    fake.faults.append("stall_stream")
    resp = await raw.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    first = await resp.content.readuntil(b"\n\n")
    second = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"event: response.created")
    assert second.startswith(b"event: response.in_progress")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 0.1)
    assert fake.in_flight == 1
    resp.close()  # drops the connection, as a proxy does when its own client goes away
    await fake.wait_idle(within=1)


async def test_slow_stream_counts_as_in_flight(raw: TestClient, fake: FakeOpenAI) -> None:
    fake.stream_delay = 0.05
    resp = await raw.post(
        "/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True}
    )
    await resp.content.readuntil(b"\n\n")
    assert fake.in_flight == 1
    resp.close()
    await fake.wait_idle(within=1)


async def test_redirect(raw: TestClient, sdk: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.faults.append("redirect")
    resp = await raw.post(
        "/v1/chat/completions", json={"model": "m", "messages": USER}, allow_redirects=False
    )
    assert (resp.status, resp.headers["location"]) == (307, REDIRECT_LOCATION)
    # The SDK follows redirects by default, so it ends up at the dead port.
    fake.faults.append("redirect")
    with pytest.raises(openai.APIConnectionError):
        await sdk.chat.completions.create(model="m", messages=USER)


async def test_prefix(aiohttp_client: Any) -> None:
    fake = FakeOpenAI(prefix="/openai/v1/")
    client = await aiohttp_client(fake.app())
    resp = await client.get("/openai/v1/models")
    assert resp.status == 200 and fake.last.path == "/openai/v1/models"
    assert (await client.get("/v1/models")).status == 404


async def test_shutdown_hangs_up_on_hung_requests(
    raw: TestClient, upstream: TestServer, fake: FakeOpenAI
) -> None:
    # Otherwise aiohttp's graceful shutdown would wait a minute for the hung handler.
    fake.faults.append("hang")
    pending = asyncio.create_task(raw.post("/v1/embeddings", json={"model": "e", "input": "a"}))
    while not fake.in_flight:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(upstream.close(), 1)
    assert fake.in_flight == 0
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await pending


# -- fault rates, response delay, retry-after, context-length errors ---------------------


async def _statuses(raw: TestClient, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        resp = await raw.post("/v1/embeddings", json={"model": "e", "input": "a"})
        await resp.read()
        statuses.append(resp.status)
    return statuses


async def test_fault_rates_are_drawn_per_request_reproducibly(aiohttp_client: Any) -> None:
    rates = {"status:500": 0.25, "status:503": 0.15}
    fake = FakeOpenAI(fault_rates=rates, seed=7)
    raw = await aiohttp_client(fake.app())
    statuses = await _statuses(raw, 400)
    assert 60 <= statuses.count(500) <= 140  # ~100 expected
    assert 25 <= statuses.count(503) <= 95  # ~60 expected
    assert set(statuses) == {200, 500, 503}
    assert fake.faulted == {"status:500": statuses.count(500), "status:503": statuses.count(503)}
    assert [r.fault for r in fake.requests] == [
        {500: "status:500", 503: "status:503"}.get(status) for status in statuses
    ]

    # The same seed draws the same faults, in the same order.
    again = FakeOpenAI(fault_rates=rates, seed=7)
    assert await _statuses(await aiohttp_client(again.app()), 400) == statuses

    # A queued fault takes precedence over the rates, and is counted too.
    fake.fault_rates = {}
    fake.faults = ["status:404"]
    assert await _statuses(raw, 2) == [404, 200]
    assert fake.faulted["status:404"] == 1


def test_fault_rates_must_be_probabilities() -> None:
    with pytest.raises(ValueError):
        FakeOpenAI(fault_rates={"reset": 0.7, "hang": 0.4})
    with pytest.raises(ValueError):
        FakeOpenAI(fault_rates={"reset": -0.1})


async def test_stream_fault_rates_only_bite_streams(raw: TestClient, fake: FakeOpenAI) -> None:
    fake.fault_rates = {"cut_stream": 1.0}
    resp = await raw.post(
        "/v1/chat/completions", json={"model": "m", "messages": USER, "stream": True}
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    with pytest.raises(aiohttp.ServerDisconnectedError):  # without a stream, a reset
        await raw.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert fake.faulted == {"cut_stream": 2}


async def test_response_delay_retry_after_and_context_length(
    raw: TestClient, fake: FakeOpenAI
) -> None:
    fake.response_delay = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await raw.post("/v1/embeddings", json={"model": "e", "input": "a"})
    assert resp.status == 200 and loop.time() - started >= 0.2
    assert fake.last.received >= started and fake.last.query == ""
    fake.response_delay = 0

    fake.retry_after = "1.5"
    fake.faults = ["status:429", "context_length_exceeded"]
    resp = await raw.post("/v1/embeddings?api-version=x", json={"model": "e", "input": "a"})
    assert (resp.status, resp.headers["retry-after"]) == (429, "1.5")
    assert fake.last.query == "api-version=x"
    resp = await raw.post("/v1/chat/completions", json={"model": "m", "messages": USER})
    assert resp.status == 400
    body = await resp.json()
    validate("ErrorResponse", body)
    error = body["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
