"""input_items / item_page: a bridged response's stored conversation as OpenAI's item list."""

from __future__ import annotations

import pytest

from aioproxy.bridges.input_items import input_items, item_page
from aioproxy.errors import BadRequest

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "weather?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},  # the response's own answer: left out
]


def test_messages_tool_calls_and_outputs_become_items() -> None:
    items = input_items(CONVERSATION, "resp_abc")
    assert [item["type"] for item in items] == [
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert items[0]["content"] == [{"type": "input_text", "text": "be brief"}]
    assert items[1]["content"][1] == {
        "type": "input_image",
        "image_url": "data:image/png;base64,AA",
        "detail": "auto",
    }
    assert items[2] == {
        "id": "fc_abc_2_0",
        "type": "function_call",
        "call_id": "call_1",
        "name": "w",
        "arguments": "{}",
        "status": "completed",
    }
    assert items[3]["output"] == "sunny" and items[3]["call_id"] == "call_1"
    assert len({item["id"] for item in items}) == 4


def test_pages() -> None:
    items = input_items(CONVERSATION, "resp_abc")
    first = item_page(items, {"limit": "3", "order": "asc"})
    assert [i["id"] for i in first["data"]] == [i["id"] for i in items[:3]]
    assert first["has_more"] and first["last_id"] == items[2]["id"]
    rest = item_page(items, {"order": "asc", "after": first["last_id"]})
    assert rest["data"] == items[3:] and not rest["has_more"]
    assert item_page(items, {})["data"] == items[::-1]  # newest first by default
    for query in ({"limit": "101"}, {"limit": "²"}, {"order": "up"}, {"after": "msg_nope"}):
        with pytest.raises(BadRequest):
            item_page(items, query)
