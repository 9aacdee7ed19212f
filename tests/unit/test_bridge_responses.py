"""The Responses bridge: request -> chat body, chat answer -> Response, chunks -> events."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy import (
    BadRequest,
    Call,
    Deployment,
    JSONReply,
    NotFound,
    Principal,
    ProxyError,
    StreamReply,
)
from aioproxy.bridges.response_request import ChatRequest
from aioproxy.bridges.response_request import chat_request as chat_request_of
from aioproxy.bridges.response_request import input_messages as input_messages_of
from aioproxy.bridges.responses import ResponseBuilder, make_responses_bridge, response_from_chat
from aioproxy.bridges.store import ResponseStore
from aioproxy.fields import raw_fields
from aioproxy.routes import Kind
from aioproxy.testing import text_response_event_types
from tests.schemas import validate
from tests.support import KEYED, FakeChat
from tests.support import UPSTREAM_KEY as KEY

DEPLOYMENT = Deployment(name="bridged", provider="chatonly", model="up-model")


def plain(value: Any) -> Any:
    """``value`` as JSON reads it back (the bridge passes fields it does not read on as bytes)."""
    return msgspec.json.decode(msgspec.json.encode(value))


def chat_request(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> ChatRequest:
    request = chat_request_of(raw_fields(body), history or [])
    return request._replace(body=plain(request.body), inputs=plain(request.inputs))


def input_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return plain(input_messages_of(msgspec.json.encode(items)))  # type: ignore[no-any-return]


def make_call(body: dict[str, Any], principal: str = "alice") -> Call:
    body = {"model": "bridged", **body}
    fields = {k: msgspec.Raw(msgspec.json.encode(v)) for k, v in body.items()}
    request = make_mocked_request("POST", "/v1/responses")
    caller = Principal(principal, id=f"key:{principal}")
    call = Call(Kind.RESPONSES, request, caller, "bridged", fields, bool(body.get("stream")))
    call.route_to(DEPLOYMENT)
    return call


def completion(content: str | None = "hi there", finish: str = "stop", **message: Any) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "up-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": [choice],
    }
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def usage_chunk() -> bytes:
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
TEXT_CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({}, "stop"),
    usage_chunk(),
    DONE,
]


def parse(events: list[bytes]) -> list[dict[str, Any]]:
    """Each SSE event's data, checking its ``event:`` line matches its type."""
    out = []
    for raw in events:
        lines = raw.decode().strip().split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        data = msgspec.json.decode(lines[1][6:])
        assert data["type"] == lines[0][7:]
        out.append(data)
    return out


async def collect(reply: StreamReply) -> list[dict[str, Any]]:
    try:
        return parse([event async for event in reply.events])
    finally:
        await reply.aclose()


def check_sequence(events: list[dict[str, Any]]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        validate("ResponseStreamEvent", event)


# -- request -> chat ---------------------------------------------------------------------


def test_string_input_is_one_user_message() -> None:
    request = chat_request({"input": "hello"})
    assert request.body == {"messages": [{"role": "user", "content": "hello"}]}
    assert request.inputs == [{"role": "user", "content": "hello"}]


def test_messages_roles_and_parts() -> None:
    items = [
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "sys"}]},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": "https://x/cat.png", "detail": "low"},
                {"type": "input_file", "file_id": "file-1"},
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "a ", "annotations": []},
                {"type": "output_text", "text": "cat", "annotations": []},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": []},  # dropped: chat cannot take it
    ]
    assert input_messages(items) == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
                {"type": "file", "file": {"file_id": "file-1"}},
            ],
        },
        {"role": "assistant", "content": "a cat"},
    ]


def test_function_calls_join_the_assistant_message_and_outputs_become_tool_messages() -> None:
    items = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_a",
            "name": "weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "type": "function_call",
            "call_id": "call_b",
            "name": "weather",
            "arguments": '{"city":"Rome"}',
        },
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "rain"}],
        },
    ]
    messages = input_messages(items)
    assert messages[1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
    ]
    lone = input_messages(
        [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
    )
    assert lone == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


def test_instructions_lead_then_history_then_input() -> None:
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    request = chat_request({"instructions": "count", "input": "two"}, history)
    assert request.body["messages"] == [
        {"role": "system", "content": "count"},
        *history,
        {"role": "user", "content": "two"},
    ]
    assert request.history == history
    assert request.inputs == [{"role": "user", "content": "two"}]


def test_options_tools_and_tool_choice() -> None:
    body = {
        "input": "hi",
        "tools": [
            {
                "type": "function",
                "name": "f",
                "description": "does f",
                "parameters": {"type": "object"},
                "strict": True,
            }
        ],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
        "max_output_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u1",
        "metadata": {"k": "v"},  # chat's metadata means stored completions: dropped
        "store": True,
        "truncation": "auto",
        "include": ["message.output_text.logprobs"],
        "reasoning": {"effort": "low"},
    }
    chat = chat_request(body).body
    assert chat == {
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u1",
        "max_completion_tokens": 50,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "description": "does f",
                    "parameters": {"type": "object"},
                    "strict": True,
                },
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "reasoning_effort": "low",
    }
    allowed = chat_request(
        {
            "input": "x",
            "tools": body["tools"],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "f"}],
            },
        }
    )
    assert allowed.body["tool_choice"] == {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    }


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (
            {"type": "json_schema", "name": "point", "schema": {"type": "object"}, "strict": True},
            {
                "type": "json_schema",
                "json_schema": {"name": "point", "schema": {"type": "object"}, "strict": True},
            },
        ),
        ({"type": "json_object"}, {"type": "json_object"}),
        ({"type": "text"}, None),
    ],
)
def test_text_format_becomes_response_format(fmt: dict, expected: dict | None) -> None:
    chat = chat_request({"input": "x", "text": {"format": fmt, "verbosity": "low"}}).body
    assert chat.get("response_format") == expected
    assert chat["verbosity"] == "low"


def test_stream_asks_chat_for_usage() -> None:
    chat = chat_request({"input": "x", "stream": True}).body
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({}, "input"),
    ],
)
def test_what_chat_cannot_do_is_refused(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        chat_request(body)
    assert caught.value.param == param
    assert caught.value.status == 400


# -- chat answer -> Response -------------------------------------------------------------


def test_text_answer_becomes_a_response() -> None:
    body = {
        "input": "x",
        "instructions": "be kind",
        "temperature": 0.5,
        "metadata": {"k": "v"},
        "tools": [{"type": "function", "name": "f"}],
    }
    response = response_from_chat(completion("Hello!"), body, "bridged", store=True)
    validate("Response", response)
    assert response["id"].startswith("resp_")
    assert response["object"] == "response"
    assert response["status"] == "completed" and response["model"] == "bridged"
    [message] = response["output"]
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}
    ]
    assert response["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 10,
    }
    assert response["instructions"] == "be kind" and response["temperature"] == 0.5
    assert response["metadata"] == {"k": "v"} and response["store"] is True
    assert response["tools"] == [
        {"type": "function", "name": "f", "parameters": None, "strict": None}
    ]
    assert response["tool_choice"] == "auto" and response["top_p"] == 1.0
    assert response["text"] == {"format": {"type": "text"}}


def test_tool_calls_become_function_call_items() -> None:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    response = response_from_chat(completion(None, "tool_calls", tool_calls=calls), {}, "m")
    validate("Response", response)
    assert response["status"] == "completed"
    assert [(i["type"], i["call_id"], i["name"], i["arguments"]) for i in response["output"]] == [
        ("function_call", "call_a", "f", '{"a":1}'),
        ("function_call", "call_b", "g", "{}"),
    ]
    assert all(item["id"].startswith("fc_") for item in response["output"])


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_answer_is_incomplete(finish: str, reason: str) -> None:
    response = response_from_chat(completion("Hel", finish), {"max_output_tokens": 1}, "m")
    validate("Response", response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": reason}
    assert response["output"][0]["status"] == "incomplete"
    assert response["completed_at"] is None


def test_a_refusal_is_a_refusal_part() -> None:
    response = response_from_chat(completion(None, refusal="I can't."), {}, "m")
    validate("Response", response)
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't."}]


# -- chunks -> events --------------------------------------------------------------------


def feed_all(builder: ResponseBuilder, chunks: list[bytes]) -> list[dict[str, Any]]:
    from aioproxy.bridges.response_events import decode_chat_answer

    events = builder.start()
    for raw in chunks:
        data = raw[6:].strip()
        if data != b"[DONE]":
            events += builder.feed(decode_chat_answer(data))
    events += builder.finish()
    return parse(events)


def test_text_chunks_become_the_event_sequence() -> None:
    events = feed_all(ResponseBuilder({"input": "x"}, "bridged", store=False), TEXT_CHUNKS)
    check_sequence(events)
    assert [e["type"] for e in events] == text_response_event_types(2)
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
        "Hel",
        "lo",
    ]
    assert events[6]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 7
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert events[0]["response"]["status"] == "in_progress" and "usage" not in events[0]["response"]


def test_tool_call_chunks_become_function_call_events() -> None:
    chunks = [
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
        DONE,
    ]
    events = feed_all(ResponseBuilder({"input": "x"}, "m", store=False), chunks)
    check_sequence(events)
    assert [e["type"] for e in events] == [
        *text_response_event_types(1)[:-1],  # the message, then a call item after it
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[8]["item"]["type"] == "function_call" and events[8]["output_index"] == 1
    assert events[11]["arguments"] == '{"city":"Paris"}' and events[11]["name"] == "weather"
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call", "function_call"]
    assert output[2]["call_id"] == "call_b"


def test_a_length_stop_ends_incomplete() -> None:
    chunks = [chunk({"content": "Hel"}), chunk({}, "length"), DONE]
    events = feed_all(ResponseBuilder({"input": "x"}, "m", store=False), chunks)
    check_sequence(events)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# -- the bridge, with a fake chat method ---------------------------------------------------


async def test_bridge_answers_from_chat() -> None:
    chat = FakeChat(lambda call: completion("Hi!"))
    bridge = make_responses_bridge(chat, None)
    reply = await bridge(make_call({"input": "hello", "text": {"format": {"type": "json_object"}}}))
    assert isinstance(reply, JSONReply)
    response = msgspec.json.decode(reply.body)
    validate("Response", response)
    assert response["output"][0]["content"][0]["text"] == "Hi!"
    assert response["store"] is False  # no store: nothing kept
    [sent] = chat.calls
    assert sent.kind is Kind.CHAT_COMPLETIONS and sent.deployment == DEPLOYMENT
    assert sent.json()["model"] == "up-model" and sent.model == "bridged"
    assert sent.json()["response_format"] == {"type": "json_object"}
    assert "input" not in sent.json() and "text" not in sent.json()


async def test_bridge_passes_a_chat_error_answer_on() -> None:
    error = JSONReply.of(
        {"error": {"message": "bad", "type": "x", "param": None, "code": None}}, 400
    )
    reply = await make_responses_bridge(FakeChat(lambda call: error), None)(
        make_call({"input": "x"})
    )
    assert isinstance(reply, JSONReply)
    assert (reply.status, reply.body) == (error.status, error.body)


def keyed_call(body: dict[str, Any]) -> Call:
    call = make_call(body)
    call.route_to(KEYED)
    return call


def _same(answer: Any, call: Call) -> Any:
    return answer


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_error_never_shows_the_deployment_key(stream: bool) -> None:
    said = {"message": f"bad key {KEY}", "param": KEY, "code": KEY}
    answers: list[Any] = [
        JSONReply.of({"error": said}, 401),
        JSONReply.of({"error": said}),  # an error inside a 200 answer
        [chunk({"content": "a"}), b"data: " + msgspec.json.encode({"error": said}) + b"\n\n"],
    ]
    for answer in answers:
        chat = FakeChat(functools.partial(_same, answer))
        try:
            reply = await make_responses_bridge(chat, None)(
                keyed_call({"input": "x", "stream": stream})
            )
            if isinstance(reply, JSONReply):
                text = reply.body.decode()
            else:
                text = msgspec.json.encode(await collect(reply)).decode()
        except ProxyError as error:
            text = f"{error.message} {error.param} {error.code}"
        assert KEY not in text and "bad key" in text


async def test_bridge_streams_each_delta_as_it_arrives() -> None:
    gate = asyncio.Event()
    chat = FakeChat(
        lambda call: [
            chunk({"content": "Hel"}),
            gate,
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            usage_chunk(),
            DONE,
        ]
    )
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x", "stream": True}))
    assert isinstance(reply, StreamReply)
    assert chat.body["stream"] is True and chat.body["stream_options"] == {"include_usage": True}
    seen = []
    async for event in reply.events:
        seen.append(parse([event])[0]["type"])
        if seen[-1] == "response.output_text.delta" and not gate.is_set():
            gate.set()  # the first delta is out while chat is still held at the gate
    await reply.aclose()
    assert seen.count("response.output_text.delta") == 2 and seen[-1] == "response.completed"
    assert chat.closed == 1


async def test_bridge_closes_the_chat_stream_when_the_client_stops_early() -> None:
    chat = FakeChat(lambda call: TEXT_CHUNKS)
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x", "stream": True}))
    assert isinstance(reply, StreamReply)
    await anext(reply.events)
    await reply.aclose()
    assert chat.closed == 1


async def test_bridge_turns_a_chat_error_event_into_response_failed() -> None:
    error = (
        b'data: {"error": {"message": "overloaded", "type": "server_error", "code": "busy"}}\n\n'
    )
    chat = FakeChat(lambda call: [chunk({"content": "Hel"}), error])
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x", "stream": True}))
    events = await collect(reply)
    check_sequence(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "overloaded" and events[-2]["code"] == "busy"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "overloaded"


@pytest.mark.parametrize("tail", [[ConnectionResetError("gone")], []], ids=["raises", "cut-short"])
async def test_bridge_reports_a_broken_chat_stream_as_failed(tail: list[Any]) -> None:
    chat = FakeChat(lambda call: [chunk({"content": "Hel"}), *tail])
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x", "stream": True}))
    events = await collect(reply)
    check_sequence(events)
    assert events[-1]["type"] == "response.failed"
    assert chat.closed == 1


async def test_bridge_streams_a_whole_chat_answer_too() -> None:
    chat = FakeChat(lambda call: completion("Whole."))
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x", "stream": True}))
    assert isinstance(reply, StreamReply)
    events = await collect(reply)
    check_sequence(events)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Whole."


async def test_bridge_reads_a_stream_for_a_plain_request() -> None:
    chat = FakeChat(lambda call: TEXT_CHUNKS)
    reply = await make_responses_bridge(chat, None)(make_call({"input": "x"}))
    assert isinstance(reply, JSONReply)
    assert msgspec.json.decode(reply.body)["output"][0]["content"][0]["text"] == "Hello"
    assert chat.closed == 1


# -- the bridge with a store ---------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ResponseStore]:
    store = ResponseStore(f"sqlite:///{tmp_path / 'control.sqlite3'}")
    await store.open()
    yield store
    await store.close()


async def test_previous_response_id_prepends_the_stored_conversation(
    store: ResponseStore,
) -> None:
    chat = FakeChat(lambda call: completion(f"answer {len(chat.calls)}"))
    bridge = make_responses_bridge(chat, store)
    first = msgspec.json.decode(
        (await bridge(make_call({"input": "one", "instructions": "old rules"}))).body
    )
    assert first["store"] is True
    stored = await store.get(first["id"], "key:alice")
    assert stored is not None and stored[0] == first
    second = msgspec.json.decode(
        (
            await bridge(
                make_call(
                    {
                        "input": "two",
                        "instructions": "new rules",
                        "previous_response_id": first["id"],
                    }
                )
            )
        ).body
    )
    assert second["previous_response_id"] == first["id"]
    assert chat.body["messages"] == [
        {"role": "system", "content": "new rules"},  # instructions are not carried over
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "two"},
    ]
    await bridge(make_call({"input": "three", "previous_response_id": second["id"]}))
    assert [m["content"] for m in chat.body["messages"]] == [
        "one",
        "answer 1",
        "two",
        "answer 2",
        "three",
    ]


async def test_a_streamed_response_is_stored_before_its_last_event(store: ResponseStore) -> None:
    chat = FakeChat(lambda call: TEXT_CHUNKS)
    reply = await make_responses_bridge(chat, store)(make_call({"input": "x", "stream": True}))
    assert isinstance(reply, StreamReply)
    async for raw in reply.events:
        event = parse([raw])[0]
        if event["type"] == "response.completed":
            stored = await store.get(event["response"]["id"], "key:alice")
            assert stored is not None and stored[0] == event["response"]
            assert stored[1][-1] == {"role": "assistant", "content": "Hello"}
    await reply.aclose()


async def test_previous_response_of_another_principal_is_not_found(store: ResponseStore) -> None:
    bridge = make_responses_bridge(FakeChat(lambda call: completion()), store)
    first = msgspec.json.decode((await bridge(make_call({"input": "one"}))).body)
    with pytest.raises(NotFound) as caught:
        await bridge(make_call({"input": "two", "previous_response_id": first["id"]}, "mallory"))
    assert caught.value.param == "previous_response_id"
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.message == f"Previous response with id '{first['id']}' not found."


async def test_store_false_keeps_nothing(store: ResponseStore) -> None:
    bridge = make_responses_bridge(FakeChat(lambda call: completion()), store)
    response = msgspec.json.decode((await bridge(make_call({"input": "x", "store": False}))).body)
    assert response["store"] is False
    assert await store.get(response["id"], "key:alice") is None


async def test_previous_response_id_without_a_store_is_refused() -> None:
    bridge = make_responses_bridge(FakeChat(lambda call: completion()), None)
    with pytest.raises(BadRequest) as caught:
        await bridge(make_call({"input": "x", "previous_response_id": "resp_1"}))
    assert caught.value.param == "previous_response_id"


async def test_a_history_past_the_bound_is_a_400_naming_previous_response_id(
    store: ResponseStore,
) -> None:
    chat = FakeChat(lambda call: completion("answer"))
    bridge = make_responses_bridge(chat, store, max_history=4096)
    first = msgspec.json.decode((await bridge(make_call({"input": "x" * 3000}))).body)
    second = msgspec.json.decode(
        (await bridge(make_call({"input": "y" * 3000, "previous_response_id": first["id"]}))).body
    )
    with pytest.raises(BadRequest) as caught:
        await bridge(make_call({"input": "z", "previous_response_id": second["id"]}))
    assert caught.value.param == "previous_response_id" and len(chat.calls) == 2


async def test_history_and_input_together_are_counted_against_max_messages(
    store: ResponseStore,
) -> None:
    chat = FakeChat(lambda call: completion("answer"))
    bridge = make_responses_bridge(chat, store)
    many = [{"role": "user", "content": "m"}] * 1500
    first = msgspec.json.decode((await bridge(make_call({"input": many}))).body)
    with pytest.raises(BadRequest) as caught:
        await bridge(make_call({"input": many, "previous_response_id": first["id"]}))
    assert caught.value.param == "previous_response_id" and len(chat.calls) == 1
