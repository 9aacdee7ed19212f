"""The gemini provider end to end: the official SDK and raw HTTP through aioproxy, against the
fake Gemini API of fake_gemini.py, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import aioproxy_gemini
import openai
import pytest

from aioproxy import ConfigError, testing

fake_gemini = testing.import_path(Path(__file__).with_name("fake_gemini.py"))
FakeGemini = fake_gemini.FakeGemini
API_KEY = fake_gemini.API_KEY
TOOL_ARGS = fake_gemini.TOOL_ARGS
MODEL = "gemini"  # what clients call it
WEATHER_TOOL = testing.weather_tool(
    properties={"city": {"type": "string"}, "unit": {"type": ["string", "null"]}},
    required=["city"],
    additionalProperties=False,
)
CHAT = "/v1/chat/completions"


@pytest.fixture
def fake() -> Any:
    return FakeGemini()


@pytest.fixture
async def start(aiohttp_server: Any, fake: Any) -> Any:
    upstream = await aiohttp_server(fake.app())

    async def start(**settings: Any) -> testing.ProxyUnderTest:
        model = {
            "name": MODEL,
            "provider": "gemini",
            "model": fake_gemini.MODEL_ID,
            "api_base": str(upstream.make_url("/")),
            "api_key": API_KEY,
            "settings": settings,
        }
        return await testing.start_proxy(aiohttp_server, {"models": [model]}, [aioproxy_gemini])

    return start


@pytest.fixture
async def proxy(start: Any) -> testing.ProxyUnderTest:
    proxy: testing.ProxyUnderTest = await start()
    return proxy


async def post(proxy: testing.ProxyUnderTest, body: dict[str, Any], path: str = CHAT) -> Any:
    async with proxy.http() as http, http.post(path, json=body) as response:
        assert response.status == 200, await response.text()
        return await (testing.read_sse(response) if body.get("stream") else response.json())


# -- the kit's checks ------------------------------------------------------------------------


async def test_chat(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    assert await testing.check_chat(proxy, MODEL) == "Hello! You said: Say hello to the kit"
    sent = fake.last
    assert sent.path == f"/v1beta/models/{fake_gemini.MODEL_ID}:generateContent"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert "authorization" not in sent.headers  # the client's key never goes upstream
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": testing.HELLO[0]["content"]}]}]
    }


async def test_chat_stream(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    assert await testing.check_chat_stream(proxy, MODEL) == "Hello! You said: Say hello to the kit"
    assert fake.last.path.endswith(":streamGenerateContent") and fake.last.query == "alt=sse"


async def test_a_stream_is_relayed_as_it_comes(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    """The first chunk reaches the client while Gemini still holds back the second."""
    fake.gate = asyncio.Event()
    body = {"model": MODEL, "messages": testing.HELLO, "stream": True}
    async with proxy.http() as http, http.post(CHAT, json=body) as response:
        first = await testing.first_event(response)
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hello!"}
        assert fake.in_flight == 1  # Gemini has not finished: nothing was buffered
        fake.gate.set()
        rest = await testing.read_sse(response)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in rest[:-1]) == (
        " You said: Say hello to the kit"
    )


async def test_completions_and_responses_through_the_bridges(proxy: testing.ProxyUnderTest) -> None:
    assert await testing.check_completion(proxy, MODEL) == "Hello! You said: Say hello to the kit"
    assert await testing.check_responses(proxy, MODEL) == "Hello! You said: Say hello to the kit"


async def test_reasoning_effort_through_the_responses_bridge(start: Any, fake: Any) -> None:
    proxy = await start(thinking="budget")  # a Gemini 2.5 model: budgets, not levels
    body = {"model": MODEL, "input": "Think", "reasoning": {"effort": "medium"}}
    answer = await post(proxy, body, "/v1/responses")
    assert answer["status"] == "completed"
    assert fake.last.body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 8192}}


async def test_embeddings(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    vectors = await testing.check_embeddings(proxy, MODEL, inputs=["hello", "gemini kit"], dims=3)
    assert vectors == [[5.0, 1.0, 0.5], [10.0, 2.0, 0.5]]
    model = f"models/{fake_gemini.MODEL_ID}"
    assert fake.last.path == f"/v1beta/{model}:batchEmbedContents"
    assert fake.last.body == {
        "requests": [
            {"model": model, "content": {"parts": [{"text": "hello"}]}},
            {"model": model, "content": {"parts": [{"text": "gemini kit"}]}},
        ]
    }


async def test_one_embedding_uses_embed_content_with_dimensions(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    async with proxy.openai() as client:
        answer = await client.embeddings.create(model=MODEL, input="hello", dimensions=2)
    assert answer.data[0].embedding == [5.0, 1.0]
    assert fake.last.path.endswith(":embedContent")
    assert fake.last.body == {"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 2}


async def test_many_embeddings_go_in_batches(start: Any, fake: Any) -> None:
    proxy = await start(embedding_batch_size=2, embedding_task_type="RETRIEVAL_DOCUMENT")
    answer = await post(proxy, {"model": MODEL, "input": ["a", "bb", "ccc"]}, "/v1/embeddings")
    assert [d["embedding"][0] for d in answer["data"]] == [1.0, 2.0, 3.0]
    assert [r.path.rsplit(":", 1)[1] for r in fake.requests] == [
        "batchEmbedContents",
        "embedContent",
    ]
    assert fake.requests[1].body["taskType"] == "RETRIEVAL_DOCUMENT"


async def test_token_ids_are_a_400(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    body = {"model": MODEL, "input": [[1, 2, 3]]}
    async with proxy.http() as http, http.post("/v1/embeddings", json=body) as response:
        error = await testing.assert_openai_error(response, 400)
    assert error["param"] == "input" and fake.requests == []


# -- chat features ---------------------------------------------------------------------------


async def test_system_multi_turn_and_sampling(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "How are you today my friend"},
    ]
    async with proxy.openai() as client:
        done = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            temperature=0.2,
            top_p=0.9,
            max_tokens=5,
            stop=["friend"],
            seed=7,
        )
    assert done.choices[0].message.content == "Hello! You said: How are"
    assert done.choices[0].finish_reason == "length"
    assert fake.last.body == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello."}]},
            {"role": "user", "parts": [{"text": "How are you today my friend"}]},
        ],
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.9,
            "seed": 7,
            "maxOutputTokens": 5,
            "stopSequences": ["friend"],
        },
    }


async def test_n_is_candidate_count(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    async with proxy.openai() as client:
        done = await client.chat.completions.create(model=MODEL, messages=testing.HELLO, n=2)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=testing.HELLO,  # type: ignore[arg-type]
            n=2,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    assert [c.index for c in done.choices] == [0, 1]
    assert fake.last.body["generationConfig"] == {"candidateCount": 2}
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["Hello! You said: Say hello to the kit"] * 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["stop", "stop"]


async def test_usage_counts_cached_and_thinking_tokens(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    fake.cached_tokens, fake.thoughts_tokens = 3, 11
    done = await post(proxy, {"model": MODEL, "messages": testing.HELLO})
    body = {"model": MODEL, "messages": testing.HELLO, "stream": True}
    chunks = await post(proxy, {**body, "stream_options": {"include_usage": True}})
    expected = {
        "prompt_tokens": 5,
        "completion_tokens": 8 + 11,  # the answer's words, and the thoughts
        "total_tokens": 5 + 8 + 11,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 11},
    }
    assert done["usage"] == expected
    assert chunks[-2]["usage"] == expected and chunks[-2]["choices"] == []


async def test_a_tool_round_trip(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    fake.signature = "c2lnbmF0dXJl"  # a thinking model's thoughtSignature on its call
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    async with proxy.openai() as client:
        first = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls or []
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == TOOL_ARGS  # type: ignore[union-attr]
        declared = fake.last.body
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ]
        second = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    assert second.choices[0].message.content == 'The tool said: {"temp": 21}'
    assert declared["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "OBJECT",
                        "properties": {
                            "city": {"type": "STRING"},
                            "unit": {"type": "STRING", "nullable": True},
                        },
                        "required": ["city"],
                    },
                }
            ]
        }
    ]
    assert declared["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert fake.last.body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": TOOL_ARGS},
                    "thoughtSignature": "c2lnbmF0dXJl",
                }
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}],
        },
    ]


async def test_a_streamed_tool_call(proxy: testing.ProxyUnderTest) -> None:
    body = {"model": MODEL, "messages": testing.HELLO, "tools": [WEATHER_TOOL], "stream": True}
    chunks = await post(proxy, body)
    assert testing.assert_chat_chunks(chunks) == ""
    calls = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks[:-1]
        if c["choices"][0]["delta"].get("tool_calls")
    ]
    assert len(calls) == 1 and calls[0][0]["index"] == 0
    assert json.loads(calls[0][0]["function"]["arguments"]) == TOOL_ARGS
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_images_inline_and_by_url(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{testing.PNG_PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    async with proxy.openai() as client:
        done = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        )
    assert done.choices[0].message.content == (
        "Hello! You said: What is this? (with image/png, image/jpeg)"
    )
    assert fake.last.body["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/png", "data": testing.PNG_PIXEL}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
    ]


async def test_an_image_url_gemini_cannot_fetch_is_a_400(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/cat.jpg"}}]
    async with proxy.openai() as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            )
    error = await testing.assert_openai_error(raised.value, 400)
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert "https://" in error["message"] and fake.requests == []


@pytest.mark.parametrize(
    ("schemas", "field", "sent"),
    [
        (
            "openapi",
            "responseSchema",
            {"type": "OBJECT", "properties": {"echo": {"type": "STRING"}}, "required": ["echo"]},
        ),
        (
            "json_schema",
            "responseJsonSchema",
            {
                "type": "object",
                "properties": {"echo": {"type": "string"}},
                "required": ["echo"],
                "additionalProperties": False,
            },
        ),
    ],
)
async def test_structured_output(
    start: Any, fake: Any, schemas: str, field: str, sent: dict[str, Any]
) -> None:
    proxy = await start(schemas=schemas)
    schema = {
        "type": "object",
        "properties": {"echo": {"type": "string"}},
        "required": ["echo"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "echo", "schema": schema, "strict": True},
    }
    async with proxy.openai() as client:
        done = await client.chat.completions.create(
            model=MODEL,
            messages=testing.HELLO,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
        )
    assert json.loads(done.choices[0].message.content or "") == {"echo": "Say hello to the kit"}
    assert fake.last.body["generationConfig"] == {
        "responseMimeType": "application/json",
        field: sent,
    }


@pytest.mark.parametrize(
    ("fault", "reason"), [("safety", "content_filter"), ("blocked", "content_filter")]
)
async def test_blocked_answers_finish_as_content_filter(
    proxy: testing.ProxyUnderTest, fake: Any, fault: str, reason: str
) -> None:
    fake.faults += [fault, fault]
    done = await post(proxy, {"model": MODEL, "messages": testing.HELLO})
    assert done["choices"][0]["finish_reason"] == reason
    chunks = await post(proxy, {"model": MODEL, "messages": testing.HELLO, "stream": True})
    assert chunks[-2]["choices"][0]["finish_reason"] == reason


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("status:INVALID_ARGUMENT", 400, None),
        ("status:FAILED_PRECONDITION", 400, None),
        ("status:PERMISSION_DENIED", 403, "permission_denied"),
        ("status:NOT_FOUND", 404, "not_found"),
        ("status:RESOURCE_EXHAUSTED", 429, "rate_limit_exceeded"),
        ("status:INTERNAL", 500, "upstream_error"),
        ("status:UNAVAILABLE", 503, "upstream_error"),
        ("status:DEADLINE_EXCEEDED", 504, "upstream_error"),
        ("key", 502, "upstream_auth_failed"),
        ("unknown_model", 502, "upstream_model_not_found"),
        ("text:502", 502, "upstream_error"),
    ],
)
async def test_errors(
    proxy: testing.ProxyUnderTest, fake: Any, fault: str, status: int, code: str | None
) -> None:
    error = await testing.check_error_mapping(
        proxy, MODEL, lambda: fake.faults.append(fault), status, code=code
    )
    assert API_KEY not in json.dumps(error)


async def test_a_rate_limit_passes_its_retry_delay_on(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    fake.faults.append("status:RESOURCE_EXHAUSTED")
    async with (
        proxy.http() as http,
        http.post(CHAT, json={"model": MODEL, "messages": testing.HELLO}) as r,
    ):
        error = await testing.assert_openai_error(r, 429, "rate_limit_exceeded")
        assert r.headers["Retry-After"] == "7"  # RetryInfo's 6.2s, in whole seconds up
    assert "exceeded your current quota" in error["message"]


async def test_a_refused_key_says_nothing_of_it(
    proxy: testing.ProxyUnderTest, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.faults.append("key")
    async with (
        proxy.http() as http,
        http.post(CHAT, json={"model": MODEL, "messages": testing.HELLO}) as r,
    ):
        error = await testing.assert_openai_error(r, 502, "upstream_auth_failed")
    assert "API key not valid" not in error["message"]
    assert API_KEY not in caplog.text and API_KEY not in json.dumps(error)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("stream_error", None),
        ("cut", "upstream_disconnected"),
        ("unfinished", "upstream_stream_incomplete"),
    ],
)
async def test_a_stream_failing_midway_ends_with_an_error_event(
    proxy: testing.ProxyUnderTest, fake: Any, fault: str, code: str | None
) -> None:
    fake.faults.append(fault)
    events = await post(proxy, {"model": MODEL, "messages": testing.HELLO, "stream": True})
    error = testing.assert_error_object(events[-1], code=code)
    if fault == "stream_error":
        assert "overloaded" in error["message"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("fault", ["malformed", "empty"])
async def test_a_malformed_answer_is_a_502(
    proxy: testing.ProxyUnderTest, fake: Any, fault: str
) -> None:
    fake.faults.append(fault)
    async with (
        proxy.http() as http,
        http.post(CHAT, json={"model": MODEL, "messages": testing.HELLO}) as r,
    ):
        await testing.assert_openai_error(r, 502, "upstream_invalid_response")


async def test_client_leaving_closes_the_upstream(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    fake.delay = 0.05
    long = [{"role": "user", "content": "word " * 100}]
    await testing.check_cancellation(proxy, MODEL, lambda: fake.in_flight, messages=long)


# -- settings and packaging ------------------------------------------------------------------


async def test_safety_settings_go_with_every_chat_request(start: Any, fake: Any) -> None:
    setting = {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}
    proxy = await start(safety_settings=[setting])
    await post(proxy, {"model": MODEL, "messages": testing.HELLO})
    assert fake.last.body["safetySettings"] == [setting]


async def test_a_misspelt_setting_stops_start_up(start: Any) -> None:
    with pytest.raises(ConfigError, match=r"invalid gemini settings: .*did you mean `schemas`"):
        await start(schema="openapi")


def test_installed_under_the_aioproxy_entry_point_group() -> None:
    (entry,) = importlib.metadata.entry_points(group="aioproxy", name="gemini")
    assert entry.load() is aioproxy_gemini
