"""The Messages <-> chat translators, property-tested: any Messages request gives a valid chat
request or a 400 naming its field; any chat stream gives a valid Anthropic event sequence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy import BadRequest, Call, Deployment, Kind, Principal, Reply, StreamReply
from aioproxy.bridges.messages import make_messages_bridge
from aioproxy.bridges.messages_events import MessageStream, decode_chunk, message_events
from aioproxy.bridges.messages_request import chat_request
from aioproxy.errors import ProxyError, anthropic_error
from aioproxy.fields import raw_fields

_DEPLOYMENT = Deployment(name="m", provider="openai", model="up")
_text = st.text(max_size=12)
_b64 = st.sampled_from(["aGk=", "iVBORw0KGgo="])


def _call(body: dict[str, Any], stream: bool = False) -> Call:
    request = make_mocked_request("POST", "/v1/messages")
    call = Call(Kind.MESSAGES, request, Principal("t"), "m", raw_fields(body), stream)
    call.route_to(_DEPLOYMENT)
    return call


# -- requests ------------------------------------------------------------------------------------

_source = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("base64"), "media_type": st.just("image/png"), "data": _b64}
    ),
    st.fixed_dictionaries({"type": st.just("url"), "url": st.just("https://x/a.png")}),
    st.fixed_dictionaries({"type": st.just("file"), "file_id": st.just("file_1")}),  # refused
)
_doc_source = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("base64"),
            "media_type": st.sampled_from(["application/pdf", "image/gif"]),
            "data": _b64,
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("text"), "media_type": st.just("text/plain"), "data": _text}
    ),
    st.fixed_dictionaries({"type": st.just("url"), "url": st.just("https://x/a.pdf")}),  # refused
)
_cache = st.one_of(st.just({}), st.just({"cache_control": {"type": "ephemeral"}}))
_text_block = st.builds(lambda t, c: {"type": "text", "text": t, **c}, _text, _cache)
_user_block = st.one_of(
    _text_block,
    st.builds(lambda s: {"type": "image", "source": s}, _source),
    st.builds(lambda s: {"type": "document", "source": s}, _doc_source),
    st.builds(
        lambda i, c, e: {"type": "tool_result", "tool_use_id": i, "content": c, "is_error": e},
        st.sampled_from(["t1", "t2"]),
        st.one_of(_text, st.lists(_text_block, max_size=2)),
        st.booleans(),
    ),
    st.just({"type": "search_result", "source": "x", "title": "t", "content": []}),  # refused
    st.just({"type": "thinking", "thinking": "hm", "signature": "s"}),
)
_assistant_block = st.one_of(
    _text_block,
    st.builds(
        lambda i, n, a: {"type": "tool_use", "id": i, "name": n, "input": a},
        st.sampled_from(["t1", "t2"]),
        st.sampled_from(["f", "g"]),
        st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
    ),
    st.just({"type": "redacted_thinking", "data": "xx"}),
    st.just({"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}),  # refused
)
_turn = st.one_of(
    st.builds(
        lambda c: {"role": "user", "content": c},
        st.one_of(_text, st.lists(_user_block, max_size=3)),
    ),
    st.builds(
        lambda c: {"role": "assistant", "content": c}, st.lists(_assistant_block, max_size=3)
    ),
)
_tool = st.one_of(
    st.builds(
        lambda n, c: {"name": n, "description": "d", "input_schema": {"type": "object"}, **c},
        st.sampled_from(["f", "g"]),
        _cache,
    ),
    st.just({"type": "web_search_20250305", "name": "web_search"}),  # refused
)
_request = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(_turn, min_size=1, max_size=4)},
    optional={
        "max_tokens": st.integers(min_value=0, max_value=10_000),
        "system": st.one_of(_text, st.lists(_text_block, max_size=2)),
        "tools": st.lists(_tool, max_size=3),
        "tool_choice": st.sampled_from(
            [{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": "f"}]
        ),
        "stop_sequences": st.lists(_text, max_size=3),
        "temperature": st.floats(0, 1),
        "top_k": st.integers(1, 5),
        "thinking": st.one_of(
            st.just({"type": "disabled"}),
            st.builds(lambda b: {"type": "enabled", "budget_tokens": b}, st.integers(1024, 64000)),
        ),
        "metadata": st.builds(lambda u: {"user_id": u}, _text),
    },
)

_ROLES = {"system", "user", "assistant", "tool"}


def _field_exists(body: dict[str, Any], path: str) -> bool:
    """Whether a dotted path (``messages.0.content.1.source``) names a field of ``body``."""
    node: Any = body
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return part == "content" and isinstance(node, dict)  # string content's one block
    return True


@settings(max_examples=300, deadline=None)
@given(_request, st.booleans())
def test_any_messages_request_is_a_chat_request_or_a_400_naming_its_field(
    body: dict[str, Any], stream: bool
) -> None:
    try:
        chat = chat_request(_call(body, stream))
    except BadRequest as exc:
        assert exc.status == 400 and exc.param
        assert exc.message.startswith(exc.param)
        assert _field_exists(body, exc.param) or exc.param == "max_tokens", exc.param
        return
    json.dumps(chat)  # plain JSON
    assert chat["max_tokens"] == body["max_tokens"] >= 1
    messages = chat["messages"]
    assert all(m["role"] in _ROLES for m in messages)
    assert "cache_control" not in json.dumps(chat)  # a hint: never sent to a chat model
    for m in messages:
        if m["role"] == "tool":
            assert isinstance(m["content"], str) and m["tool_call_id"] in ("t1", "t2")
        for call in m.get("tool_calls") or ():
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
    if "tools" in chat:
        assert all(t["type"] == "function" for t in chat["tools"])
    elif "tool_choice" in chat:
        raise AssertionError("tool_choice without tools")
    assert chat.get("stream", False) is stream


# -- streams -------------------------------------------------------------------------------------

_tool_piece = st.builds(
    lambda i, new, name, args: {
        "index": i,
        **({"id": f"call_{i}", "type": "function"} if new else {}),
        "function": {**({"name": name} if new else {}), "arguments": args},
    },
    st.integers(0, 2),
    st.booleans(),
    st.sampled_from(["f", "g"]),
    st.sampled_from(["", "{", '"a"', ":1", "}"]),
)
_delta = st.one_of(
    st.builds(lambda t: {"content": t}, _text),
    st.builds(lambda p: {"tool_calls": [p]}, _tool_piece),
    st.just({"role": "assistant", "content": None}),
)
_chunk = st.builds(
    lambda d, f: {"choices": [{"index": 0, "delta": d, "finish_reason": f}]},
    _delta,
    st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
)
_usage_chunk = st.builds(
    lambda p, c: {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}},
    st.integers(0, 100),
    st.integers(0, 100),
)


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in data.decode().split("\n\n"):
        if not event:
            continue
        name, payload = event.split("\n")
        parsed = json.loads(payload.removeprefix("data: "))
        assert name == f"event: {parsed['type']}"
        out.append((parsed["type"], parsed))
    return out


def _check_sequence(events: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """Anthropic's grammar: message_start, (ping), blocks opened, filled and closed in order,
    message_delta, message_stop. Returns each block's type."""
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks: dict[int, str] = {}
    open_index: int | None = None
    for name, event in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and event["index"] == len(blocks)
            open_index = event["index"]
            blocks[open_index] = event["content_block"]["type"]
        elif name == "content_block_delta":
            assert event["index"] == open_index
            expected = "text_delta" if blocks[open_index] == "text" else "input_json_delta"
            assert event["delta"]["type"] == expected
        elif name == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
        else:
            assert name == "ping"
    assert open_index is None
    return blocks


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_chunk, _usage_chunk), max_size=12))
def test_any_chat_stream_gives_a_valid_anthropic_event_sequence(
    chunks: list[dict[str, Any]],
) -> None:
    stream = MessageStream("m")
    out = [stream.start()]
    for chunk in chunks:
        stream.feed(decode_chunk(msgspec.json.encode(chunk)), out)
    out.append(stream.finish())
    events = _events(b"".join(out))
    _check_sequence(events)
    text = "".join(
        e["delta"]["text"] for n, e in events if n == "content_block_delta" and "text" in e["delta"]
    )
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == sent  # every piece of text, in order, none lost
    usage = events[-2][1]["usage"]
    assert set(usage) >= {"input_tokens", "output_tokens"}


@given(
    st.lists(
        st.one_of(
            st.builds(lambda t: {"type": "text", "text": t}, _text),
            st.builds(
                lambda a: {"type": "tool_use", "id": "t", "name": "f", "input": a},
                st.dictionaries(_text, st.integers(), max_size=2),
            ),
        ),
        max_size=3,
    )
)
def test_a_whole_message_as_events_rebuilds_it(content: list[dict[str, Any]]) -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": content,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    events = _events(message_events(message))
    blocks = _check_sequence(events)
    assert [blocks[i] for i in range(len(content))] == [b["type"] for b in content]


# -- error shape ---------------------------------------------------------------------------------


def test_anthropic_error_types_by_status() -> None:
    expected = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        502: "api_error",
        529: "overloaded_error",
    }
    for status, kind in expected.items():
        got_status, body = anthropic_error(ProxyError("boom", status=status))
        assert got_status == status
        assert json.loads(body) == {"type": "error", "error": {"type": kind, "message": "boom"}}
    # An upstream's overload (aioproxy's 503 "overloaded") is Anthropic's 529 again.
    status, body = anthropic_error(ProxyError("busy", status=503, code="overloaded"))
    assert status == 529 and json.loads(body)["error"]["type"] == "overloaded_error"


async def test_an_empty_chat_stream_still_gives_a_whole_event_sequence() -> None:
    """A chat stream that ends before any event: message_start goes out with the closing
    events (it was lost, the client seeing message_delta first)."""

    async def nothing() -> AsyncIterator[bytes]:
        for event in ():
            yield event

    async def chat(call: Call) -> Reply:
        return StreamReply(nothing())

    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    reply = await make_messages_bridge(chat)(_call(body, stream=True))
    assert isinstance(reply, StreamReply)
    sent = b"".join([block async for block in reply.events])
    assert _check_sequence(_events(sent)) == {}
