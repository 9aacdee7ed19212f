"""Any JSON a client sends the bridges is translated or refused with a 400, never a crash."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aioproxy import BadRequest
from aioproxy.bridges.completions import CompletionRequest, prompts_of
from aioproxy.bridges.response_events import response_from_chat
from aioproxy.bridges.response_request import chat_request
from aioproxy.fields import raw_fields
from tests.hostile import RESPONSES_FIELDS, nested

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.sampled_from(
        [
            "function",
            "message",
            "function_call",
            "function_call_output",
            "user",
            "assistant",
            "developer",
            "input_text",
            "input_image",
            "json_schema",
            "allowed_tools",
            "text",
        ]
    ),
)


_KEYS = [
    "type",
    "role",
    "content",
    "text",
    "name",
    "call_id",
    "output",
    "arguments",
    "image_url",
    "file_id",
    "format",
    "tools",
    "mode",
    "schema",
    "id",
    "detail",
    "effort",
]


JSON = st.recursive(
    SCALARS,
    nested(st.sampled_from(_KEYS), items=3, members=4),
    max_leaves=12,
)
COMPLETIONS_KEYS = [
    "prompt",
    "suffix",
    "n",
    "best_of",
    "logprobs",
    "echo",
    "stream",
    "stream_options",
    "max_tokens",
]


def bodies(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), st.one_of(SCALARS, JSON), max_size=5)


@settings(max_examples=1500, deadline=None)
@given(body=bodies(RESPONSES_FIELDS), with_input=st.booleans())
@example(body={"tools": 0}, with_input=True)
@example(body={"input": [{"role": ["user"]}]}, with_input=False)
def test_responses_requests(body: dict[str, Any], with_input: bool) -> None:
    if with_input:
        body.setdefault("input", "hi")  # most random inputs are refused: get past them too
    try:
        request = chat_request(raw_fields(body))
    except BadRequest:
        return
    assert request.body["messages"]
    response_from_chat({"choices": []}, request.echo, "m")  # whatever was accepted can be echoed


@settings(max_examples=1500, deadline=None)
@given(body=bodies(COMPLETIONS_KEYS), with_prompt=st.booleans())
@example(body={"n": "2"}, with_prompt=True)
def test_completions_requests(body: dict[str, Any], with_prompt: bool) -> None:
    if with_prompt:
        body.setdefault("prompt", "hi")
    try:
        prompts_of(body)
        request = CompletionRequest(raw_fields(body))
        assert all(isinstance(raw, msgspec.Raw) for raw in request.shared.values())
    except BadRequest:
        return
