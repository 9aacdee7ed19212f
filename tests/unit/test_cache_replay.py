"""A cached Responses answer kept as JSON, replayed as the events of its stream."""

from __future__ import annotations

import json
from typing import Any

from aioproxy.cache.replay import response_as_events

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [
        {"type": "output_text", "text": "Hello", "annotations": []},
        {"type": "refusal", "refusal": "No"},
    ],
}
CALL = {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}


def events(response: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = response_as_events(json.dumps(response).encode()).split(b"\n\n")
    return [json.loads(block.split(b"\ndata: ", 1)[1]) for block in blocks if block]


def test_each_item_and_part_gets_its_events_in_order() -> None:
    response = {"id": "resp_1", "object": "response", "status": "completed"}
    got = events({**response, "output": [MESSAGE, CALL], "usage": {"total_tokens": 3}})

    def part(kind: str) -> list[str]:
        return ["content_part.added", f"{kind}.delta", f"{kind}.done", "content_part.done"]

    arguments = ["function_call_arguments.delta", "function_call_arguments.done"]
    message = ["output_item.added", *part("output_text"), *part("refusal"), "output_item.done"]
    call = ["output_item.added", *arguments, "output_item.done"]
    expected = ["created", "in_progress", *message, *call, "completed"]
    assert [e["type"] for e in got] == ["response." + name for name in expected]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert got[0]["response"]["output"] == [] and got[0]["response"]["status"] == "in_progress"
    assert got[2]["item"]["content"] == [] and got[12]["item"]["arguments"] == ""
    assert got[4]["delta"] == "Hello" and got[8]["delta"] == "No"
    assert got[-1]["response"]["output"] == [MESSAGE, CALL]


def test_an_incomplete_response_ends_with_its_own_event() -> None:
    got = events({"id": "resp_2", "status": "incomplete", "output": []})
    assert [e["type"] for e in got][-1] == "response.incomplete"
