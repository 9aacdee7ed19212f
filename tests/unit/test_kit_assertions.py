"""The kit itself: its assertions pass sound answers and fail broken ones; its fixture serves."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import aioproxy_openai
import pytest

from aioproxy.testing import (
    DONE_DATA,
    HELLO,
    KIT_KEY,
    StartProxy,
    assert_chat_chunks,
    assert_chat_completion,
    assert_completion,
    assert_embeddings,
    assert_error_object,
    assert_openai_error,
    assert_response_events,
    parse_sse,
)

USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def chat_stream(usage: bool = False) -> list[Any]:
    chunks: list[Any] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hi"}),
        chunk({"content": " there"}),
        chunk({}, "stop"),
    ]
    if usage:
        chunks.append({**HEAD, "choices": [], "usage": USAGE})
    return [*chunks, DONE_DATA]


def test_a_sound_chat_stream_passes() -> None:
    assert assert_chat_chunks(chat_stream()) == "Hi there"
    assert assert_chat_chunks(chat_stream(usage=True), usage=True) == "Hi there"


def _without(items: list[Any], i: int) -> list[Any]:
    return items[:i] + items[i + 1 :]


BROKEN_CHAT_STREAMS: dict[str, tuple[Callable[[], list[Any]], bool]] = {
    "no [DONE]": (lambda: chat_stream()[:-1], False),
    "[DONE] twice": (lambda: [*chat_stream(), DONE_DATA], False),
    "no role": (lambda: _without(chat_stream(), 0), False),
    "role twice": (lambda: [chat_stream()[0], *chat_stream()], False),
    "no finish_reason": (lambda: _without(chat_stream(), 3), False),
    "content after finish": (
        lambda: [*chat_stream()[:4], chunk({"content": "!"}), DONE_DATA],
        False,
    ),
    "two finish_reasons": (lambda: [*chat_stream()[:4], chunk({}, "stop"), DONE_DATA], False),
    "an error event": (lambda: [*chat_stream()[:2], {"error": {"message": "x"}}, DONE_DATA], False),
    "no usage chunk": (lambda: chat_stream(), True),
    "usage not asked for": (lambda: chat_stream(usage=True), False),
    "usage chunk with choices": (
        lambda: [*chat_stream()[:3], {**chunk({}, "stop"), "usage": USAGE}, DONE_DATA],
        True,
    ),
    "usage that does not add up": (
        lambda: [
            *chat_stream()[:4],
            {**HEAD, "choices": [], "usage": {**USAGE, "total_tokens": 9}},
            DONE_DATA,
        ],
        True,
    ),
    "ids differ": (
        lambda: [*chat_stream()[:2], {**chunk({"content": "x"}), "id": "c2"}, *chat_stream()[2:]],
        False,
    ),
}


@pytest.mark.parametrize("name", BROKEN_CHAT_STREAMS)
def test_a_broken_chat_stream_fails(name: str) -> None:
    make, usage = BROKEN_CHAT_STREAMS[name]
    with pytest.raises(AssertionError):
        assert_chat_chunks(make(), usage=usage)


COMPLETION = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ],
    "usage": USAGE,
}


def test_chat_completion() -> None:
    assert assert_chat_completion(COMPLETION) == "Hi"
    for path, value in [
        (("object",), "chat.completion.chunk"),
        (("created",), "1"),
        (("choices", 0, "finish_reason"), None),
        (("choices", 0, "message", "role"), "user"),
        (("usage", "total_tokens"), 4),
    ]:
        broken = copy.deepcopy(COMPLETION)
        target: Any = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(AssertionError):
            assert_chat_completion(broken)


def test_completion_is_not_a_chat_completion() -> None:
    with pytest.raises(AssertionError, match="object"):
        assert_completion(COMPLETION)


def test_embeddings_count_and_size() -> None:
    data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.5]} for i in range(2)]
    body = {
        "object": "list",
        "model": "m",
        "data": data,
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    assert assert_embeddings(body, 2, 2) == [[0.5, -0.5], [0.5, -0.5]]
    with pytest.raises(AssertionError):
        assert_embeddings(body, 3, 2)
    with pytest.raises(AssertionError):
        assert_embeddings(body, 2, 3)
    body["data"][1]["index"] = 0
    with pytest.raises(AssertionError):
        assert_embeddings(body, 2, 2)


def response_events(final: str = "response.completed") -> list[dict[str, Any]]:
    def response(status: str) -> dict[str, Any]:
        done = status != "in_progress"
        part = {"type": "output_text", "text": "Hi there"}
        item = {"id": "m1", "type": "message", "role": "assistant", "content": [part]}
        usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
        head = {"id": "r1", "object": "response", "created_at": 1, "model": "m", "status": status}
        return {**head, "output": [item], "usage": usage} if done else {**head, "output": []}

    where = {"item_id": "m1", "content_index": 0}
    events = [
        {"type": "response.created", "response": response("in_progress")},
        {"type": "response.output_text.delta", **where, "delta": "Hi"},
        {"type": "response.output_text.delta", **where, "delta": " there"},
        {"type": "response.output_text.done", **where, "text": "Hi there"},
        {"type": final, "response": response(final.removeprefix("response."))},
    ]
    return renumber(events)


def renumber(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def test_response_events() -> None:
    assert assert_response_events(response_events()) == "Hi there"
    assert (
        assert_response_events(response_events("response.incomplete"), final="response.incomplete")
        == "Hi there"
    )
    broken = response_events()
    broken[2]["sequence_number"] = 1
    for events in (
        broken,
        renumber(response_events()[1:]),  # no response.created
        response_events()[:-1],  # no response.completed
        renumber([*response_events()[:-1], *response_events()[-1:] * 2]),  # completed twice
        [*response_events(), DONE_DATA],
        [{**e, "sequence_number": e["sequence_number"] + 1} for e in response_events()],
        [e for e in response_events() if e.get("delta") != "Hi"],  # deltas short of the text
    ):
        with pytest.raises(AssertionError):
            assert_response_events(events)


def test_error_object() -> None:
    error = {"message": "no", "type": "invalid_request_error", "param": None, "code": "x"}
    assert assert_error_object({"error": error}, code="x") == error
    with pytest.raises(AssertionError):
        assert_error_object({"error": error}, code="y")
    with pytest.raises(AssertionError):
        assert_error_object({"error": {"message": "no", "type": "t"}})  # param and code missing
    with pytest.raises(AssertionError):
        assert_error_object({"detail": "no"})


def test_sse_framing() -> None:
    body = (
        b': keepalive\n\nevent: response.created\ndata: {"type": "response.created"}\n\n'
        b"data: [DONE]\n\n"
    )
    assert parse_sse(body) == [{"type": "response.created"}, DONE_DATA]
    for broken in (
        b'data: {"a": 1}\n',  # no blank line at the end
        b"data: {not json}\n\n",
        b'event: response.done\ndata: {"type": "response.created"}\n\n',  # name and type differ
    ):
        with pytest.raises(AssertionError):
            parse_sse(broken)


async def test_the_aioproxy_server_fixture(aioproxy_server: StartProxy, upstream_base: str) -> None:
    model = {"name": "gpt", "provider": "openai", "api_base": upstream_base, "api_key": "sk-up"}
    proxy = await aioproxy_server({"models": [model]}, [aioproxy_openai])
    assert proxy.headers == {"Authorization": f"Bearer {KIT_KEY}"}
    async with proxy.http() as http:
        async with http.get("/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["gpt"]
        async with http.post(
            "/v1/chat/completions",
            json={"model": "gpt", "messages": HELLO},
            headers={"Authorization": "Bearer wrong"},
        ) as response:
            await assert_openai_error(response, 401, "invalid_api_key")
