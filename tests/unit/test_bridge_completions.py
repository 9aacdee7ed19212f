"""The legacy completions bridge: prompts -> chat calls, chat answers -> text_completion."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy import BadGateway, BadRequest, Call, Deployment, JSONReply, Principal, StreamReply
from aioproxy.bridges.completions import (
    CompletionRequest,
    chat_call_for,
    completion_from_chat,
    make_completions_bridge,
    prompts_of,
)
from aioproxy.fields import raw_fields
from aioproxy.routes import Kind
from tests.schemas import validate
from tests.support import KEYED, FakeChat
from tests.support import UPSTREAM_KEY as KEY

DEPLOYMENT = Deployment(name="bridged", provider="chatonly", model="up-model")


def make_call(body: dict[str, Any]) -> Call:
    body = {"model": "bridged", **body}
    fields = {k: msgspec.Raw(msgspec.json.encode(v)) for k, v in body.items()}
    request = make_mocked_request("POST", "/v1/completions")
    call = Call(
        Kind.COMPLETIONS, request, Principal("alice"), "bridged", fields, bool(body.get("stream"))
    )
    call.route_to(DEPLOYMENT)
    return call


def completion(*texts: str, finish: str = "stop", logprobs: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "up-model",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            for i, text in enumerate(texts)
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }


def chunk(
    content: str | None = None, finish: str | None = None, index: int = 0, role: bool = False
) -> bytes:
    delta: dict[str, Any] = {"content": content} if content is not None else {}
    if role:
        delta["role"] = "assistant"
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up-model",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


USAGE = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up-model",'
    b'"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def datas(events: list[bytes]) -> list[Any]:
    out = []
    for event in events:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n"), event
        payload = event[6:-2]
        out.append("[DONE]" if payload == b"[DONE]" else msgspec.json.decode(payload))
    return out


async def collect(reply: StreamReply) -> list[Any]:
    try:
        return datas([event async for event in reply.events])
    finally:
        await reply.aclose()


# -- request -----------------------------------------------------------------------------


def test_prompts() -> None:
    assert prompts_of({"prompt": "once"}) == ["once"]
    assert prompts_of({"prompt": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(BadRequest, match="token ids"):
        prompts_of({"prompt": [1, 2, 3]})
    with pytest.raises(BadRequest, match="empty"):
        prompts_of({"prompt": []})


def test_chat_body_passes_the_sampling_options() -> None:
    body = {
        "prompt": "p",
        "max_tokens": 9,
        "temperature": 0.1,
        "top_p": 0.5,
        "n": 2,
        "stop": ["\n"],
        "presence_penalty": 0.3,
        "frequency_penalty": 0.4,
        "logit_bias": {"50256": -100},
        "user": "u",
        "seed": 7,
        "echo": True,
        "best_of": 2,
        "logprobs": None,
    }
    # Everything but the prompt and the completions-only options goes to chat as it came.
    passed = {k: v for k, v in body.items() if k not in ("prompt", "echo", "best_of", "logprobs")}
    assert sent(body, "Say hi") == {
        "messages": [{"role": "user", "content": "Say hi"}],
        "model": "up-model",
        **passed,
    }
    logprobs = sent({"prompt": "p", "logprobs": 3}, "p")
    assert logprobs["logprobs"] is True and logprobs["top_logprobs"] == 3
    streamed = sent({"prompt": "p", "stream": True, "stream_options": {"include_usage": True}}, "p")
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert "stream_options" not in sent({"prompt": "p", "stream": True}, "p")


def request_of(body: dict[str, Any]) -> CompletionRequest:
    return CompletionRequest(raw_fields(body))


def sent(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    """What the chat call for ``prompt`` of a request with ``body`` carries."""
    return chat_call_for(make_call(body), request_of(body), prompt).json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2, "echo": True}, "logprobs"),
    ],
)
def test_what_chat_cannot_do_is_refused(body: dict, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        request_of({"prompt": "p", **body})
    assert caught.value.param == param and caught.value.status == 400


# -- answer ------------------------------------------------------------------------------


def test_completion_from_chat() -> None:
    result = completion_from_chat([completion("Hello")], ["Say hi"], request_of({}), "bridged")
    validate("CreateCompletionResponse", result)
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "up-model" and result["created"] == 1700000000
    assert result["choices"] == [
        {"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_echo_and_several_prompts_number_their_choices_in_order() -> None:
    answers = [completion("a1", "a2"), completion("b1", "b2", finish="tool_calls")]
    result = completion_from_chat(
        answers, ["A:", "B:"], request_of({"n": 2, "echo": True}), "bridged"
    )
    validate("CreateCompletionResponse", result)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in result["choices"]] == [
        (0, "A:a1", "stop"),
        (1, "A:a2", "stop"),
        (2, "B:b1", "stop"),
        (3, "B:b2", "stop"),
    ]
    assert result["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}


def test_logprobs_take_the_legacy_shape() -> None:
    chat_logprobs = {
        "content": [
            {
                "token": "Hel",
                "logprob": -0.1,
                "top_logprobs": [
                    {"token": "Hel", "logprob": -0.1},
                    {"token": "He", "logprob": -2.0},
                ],
            },
            {"token": "lo", "logprob": -0.2, "top_logprobs": [{"token": "lo", "logprob": -0.2}]},
        ]
    }
    result = completion_from_chat(
        [completion("Hello", logprobs=chat_logprobs)], ["p"], request_of({}), "m"
    )
    validate("CreateCompletionResponse", result)
    assert result["choices"][0]["logprobs"] == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"Hel": -0.1, "He": -2.0}, {"lo": -0.2}],
        "text_offset": [0, 3],
    }


# -- the bridge, with a fake chat method ---------------------------------------------------


async def test_bridge_answers_each_prompt() -> None:
    chat = FakeChat(lambda call: completion("to " + call.json()["messages"][0]["content"]))
    bridge = make_completions_bridge(chat)
    reply = await bridge(make_call({"prompt": ["x", "y"], "max_tokens": 5}))
    assert isinstance(reply, JSONReply)
    result = msgspec.json.decode(reply.body)
    validate("CreateCompletionResponse", result)
    assert [c["text"] for c in result["choices"]] == ["to x", "to y"]
    assert [c.kind for c in chat.calls] == [Kind.CHAT_COMPLETIONS] * 2
    assert all(c.json()["model"] == "up-model" and c.json()["max_tokens"] == 5 for c in chat.calls)
    assert "prompt" not in chat.calls[0].json()


async def test_bridge_passes_a_chat_error_answer_on() -> None:
    error = JSONReply.of(
        {"error": {"message": "no", "type": "x", "param": None, "code": None}}, 429
    )
    reply = await make_completions_bridge(FakeChat(lambda call: error))(make_call({"prompt": "p"}))
    assert isinstance(reply, JSONReply)
    assert (reply.status, reply.body) == (error.status, error.body)


async def test_bridge_streams_text_completion_chunks_as_they_arrive() -> None:
    gate = asyncio.Event()
    chat = FakeChat(
        lambda call: [
            chunk("", role=True),
            chunk("Hel"),
            gate,
            chunk("lo"),
            chunk(finish="stop"),
            USAGE,
            DONE,
        ]
    )
    body = {
        "prompt": "Say: ",
        "stream": True,
        "echo": True,
        "stream_options": {"include_usage": True},
    }
    reply = await make_completions_bridge(chat)(make_call(body))
    assert isinstance(reply, StreamReply)
    events = []
    async for event in reply.events:
        events.append(event)
        if b"Hel" in event:
            gate.set()  # "Hel" is out while chat is still held at the gate
    await reply.aclose()
    chunks = datas(events)
    assert chunks[-1] == "[DONE]"
    assert [c["choices"][0]["text"] for c in chunks[:-2]] == ["Say: ", "Hel", "lo", ""]
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["total_tokens"] == 6
    for c in chunks[:-1]:
        assert c["object"] == "text_completion"
    validate("CreateCompletionResponse", chunks[-3])
    assert chat.closed == 1


async def test_bridge_streams_several_prompts_one_after_the_other() -> None:
    def answer(call: Call) -> list[bytes]:
        text = call.json()["messages"][0]["content"]
        return [chunk(text.upper()), chunk(finish="length"), DONE]

    reply = await make_completions_bridge(FakeChat(answer))(
        make_call({"prompt": ["a", "b"], "stream": True})
    )
    chunks = await collect(reply)  # type: ignore[arg-type]
    texts = [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:-1]]
    assert texts == [(0, "A"), (0, ""), (1, "B"), (1, "")]
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1])  # not asked for


async def test_bridge_closes_the_chat_stream_when_the_client_stops_early() -> None:
    chat = FakeChat(lambda call: [chunk("a"), chunk("b"), chunk(finish="stop"), DONE])
    reply = await make_completions_bridge(chat)(make_call({"prompt": "p", "stream": True}))
    assert isinstance(reply, StreamReply)
    await anext(reply.events)
    await reply.aclose()
    assert chat.closed == 1


async def test_bridge_relays_a_chat_error_event() -> None:
    error = b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
    chat = FakeChat(lambda call: [chunk("a"), error])
    reply = await make_completions_bridge(chat)(make_call({"prompt": "p", "stream": True}))
    chunks = await collect(reply)  # type: ignore[arg-type]
    assert chunks[-1] == {"error": {"message": "boom", "type": "server_error"}}


def keyed_call(body: dict[str, Any]) -> Call:
    call = make_call(body)
    call.route_to(KEYED)
    return call


async def test_a_chat_error_answer_is_passed_on_scrubbed() -> None:
    error = JSONReply.of({"error": {"message": f"bad key {KEY}", "type": "x"}}, 400)
    for stream in (False, True):
        reply = await make_completions_bridge(FakeChat(lambda call: error))(
            keyed_call({"prompt": "p", "stream": stream})
        )
        assert isinstance(reply, JSONReply) and reply.status == 400
        assert KEY.encode() not in reply.body and b"bad key" in reply.body


async def test_a_chat_error_event_is_relayed_scrubbed() -> None:
    event = b'data: {"error": {"message": "boom ' + KEY.encode() + b'"}}\n\n'
    chat = FakeChat(lambda call: [chunk("x"), event])
    reply = await make_completions_bridge(chat)(keyed_call({"prompt": "a", "stream": True}))
    chunks = await collect(reply)  # type: ignore[arg-type]
    assert chunks[-1]["error"]["message"].startswith("boom ")
    assert KEY not in msgspec.json.encode(chunks).decode()


async def test_a_later_prompts_error_answer_is_relayed_scrubbed() -> None:
    error = JSONReply.of({"error": {"message": f"bad key {KEY}"}}, 500)
    chat = FakeChat(lambda call: [chunk("x"), DONE] if len(chat.calls) == 1 else error)
    reply = await make_completions_bridge(chat)(keyed_call({"prompt": ["a", "b"], "stream": True}))
    chunks = await collect(reply)  # type: ignore[arg-type]
    assert chunks[-1]["error"]["message"].startswith("bad key ")
    assert KEY not in msgspec.json.encode(chunks).decode()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("user", [{}] * 1000),  # decoded untyped, it built a dict per item
        ("max_tokens", "9"),
        ("logit_bias", {"1": "high"}),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stream_options", 5),
        ("echo", "yes"),
    ],
)
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(field: str, value: Any) -> None:
    chat = FakeChat(lambda call: completion("x"))
    with pytest.raises(BadRequest) as caught:
        await make_completions_bridge(chat)(make_call({"prompt": "p", field: value}))
    assert caught.value.param.startswith(field) and not chat.calls


async def test_the_shared_fields_are_sent_as_the_client_sent_them_once_encoded() -> None:
    chat = FakeChat(lambda call: completion("x"))
    await make_completions_bridge(chat)(make_call({"prompt": ["a", "b"], "user": "u" * 100}))
    first, second = chat.calls
    assert first.fields["user"] is second.fields["user"]  # the client's bytes, not re-encoded


async def test_shared_fields_times_prompts_over_the_body_limit_is_a_400() -> None:
    chat = FakeChat(lambda call: completion("x"))
    bridge = make_completions_bridge(chat, max_body_size=4096)
    body = {"prompt": ["p"] * 8, "user": "u" * 600}
    with pytest.raises(BadRequest) as caught:
        await bridge(make_call(body))
    assert caught.value.param == "prompt" and caught.value.status == 400 and not chat.calls
    await bridge(make_call({**body, "prompt": ["p"] * 4}))  # 4 x ~600 bytes: within
    assert len(chat.calls) == 4


@pytest.mark.parametrize("n", [0, 129, True])
async def test_n_is_bounded_as_openai_bounds_it(n: Any) -> None:
    chat = FakeChat(lambda call: completion("x"))
    with pytest.raises(BadRequest) as caught:
        await make_completions_bridge(chat)(make_call({"prompt": "p", "n": n}))
    assert caught.value.param == "n" and not chat.calls


@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_chat_logprobs_are_the_upstreams_error(stream: bool) -> None:
    bad = completion("x", logprobs={"content": 5})
    answer: Any = [b"data: " + msgspec.json.encode(bad) + b"\n\n", DONE] if stream else bad
    bridge = make_completions_bridge(FakeChat(lambda call: answer))
    with pytest.raises(BadGateway) as caught:
        reply = await bridge(make_call({"prompt": "p", "logprobs": 1, "stream": stream}))
        await collect(reply)  # type: ignore[arg-type]
    assert caught.value.code == "upstream_invalid_response"
