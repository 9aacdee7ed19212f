"""The translators, as pure functions: requests to Converse, answers and stream events back,
Bedrock's errors; hypothesis for the ones that take arbitrary input."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import msgspec
import pytest
from aioproxy_bedrock.embeddings import batches, family_of, request, vectors
from aioproxy_bedrock.errors import error_from, error_type, stream_error
from aioproxy_bedrock.translate import (
    StreamTranslator,
    decode_answer,
    decode_event,
    document_name,
    to_chat_completion,
    to_converse,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy import BadRequest, Deployment, ProxyError
from aioproxy.fields import raw_fields

SECRET = "bedrock-secret-access-key-0123456789abcdef"
DEPLOYMENT = Deployment(name="c", provider="bedrock", model="m", api_key=SECRET)


def converse(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` translated, as the JSON Bedrock is sent."""
    out: dict[str, Any] = json.loads(msgspec.json.encode(to_converse(raw_fields(body))))
    return out


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- requests ----------------------------------------------------------------------------------

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
texts = st.text(min_size=0, max_size=12)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages = []
    for role, text in draw(st.lists(st.tuples(roles, texts), min_size=1, max_size=12)):
        if role == "tool":
            messages.append({"role": "tool", "tool_call_id": "t1", "content": text})
        elif draw(st.booleans()):
            messages.append({"role": role, "content": text})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    return messages


@given(conversations())
@settings(max_examples=100, deadline=None)
def test_turns_alternate_and_keep_every_word_in_order(messages: list[dict[str, Any]]) -> None:
    out = converse({"model": "m", "messages": messages, "tools": [_tool("f")]})
    turns = out["messages"]
    assert all(a["role"] != b["role"] for a, b in itertools.pairwise(turns))
    assert all(turn["content"] for turn in turns)  # Converse refuses empty turns
    said = [
        m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
        for m in messages
        if m["role"] in ("user", "assistant")
    ]
    sent = [b["text"] for t in turns for b in t["content"] if "text" in b]
    assert sent == [s for s in said if s]
    system = [m for m in messages if m["role"] in ("system", "developer")]
    expected_system = [
        m["content"] if isinstance(m["content"], str) else m["content"][0]["text"] for m in system
    ]
    assert [b["text"] for b in out.get("system", [])] == [s for s in expected_system if s]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, json_values, json_values)
@settings(max_examples=150, deadline=None)
def test_any_json_is_translated_or_refused_with_a_400(
    messages: Any, tools: Any, tool_choice: Any
) -> None:
    body = {"model": "m", "messages": messages, "tools": tools, "tool_choice": tool_choice}
    try:
        converse(body)
    except BadRequest:
        pass


@given(st.text(max_size=300))
def test_a_document_name_is_one_converse_takes(filename: str) -> None:
    name = document_name(filename, 3)
    assert re.fullmatch(r"[A-Za-z0-9\-()\[\] ]{1,200}", name)
    assert "  " not in name


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", {"auto": {}}),
        ("required", {"any": {}}),
        ({"type": "function", "function": {"name": "f"}}, {"tool": {"name": "f"}}),
    ],
)
def test_tool_choice(choice: Any, expected: Any) -> None:
    body = {"model": "m", "messages": [user("hi")], "tools": [_tool("f")]}
    if choice is not None:
        body["tool_choice"] = choice
    config = converse(body)["toolConfig"]
    assert config.get("toolChoice") == expected
    assert config["tools"] == [
        {"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}
    ]


def test_tool_choice_none_leaves_the_tools_out_unless_turns_use_them() -> None:
    body = {"model": "m", "messages": [user("hi")], "tools": [_tool("f")], "tool_choice": "none"}
    assert "toolConfig" not in converse(body)
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body["messages"] = [
        user("hi"),
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "t1", "content": "ok"},
    ]
    assert "toolConfig" in converse(body)  # Converse refuses toolUse blocks without it


@pytest.mark.parametrize(
    ("url", "block"),
    [
        ("data:image/jpeg;base64,AAAA", {"format": "jpeg", "source": {"bytes": "AAAA"}}),
        ("data:image/webp;base64,AAAA", {"format": "webp", "source": {"bytes": "AAAA"}}),
        (
            "s3://bucket/cat.gif",
            {"format": "gif", "source": {"s3Location": {"uri": "s3://bucket/cat.gif"}}},
        ),
    ],
)
def test_images(url: str, block: dict[str, Any]) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    assert converse({"model": "m", "messages": [user(content)]})["messages"][0]["content"] == [
        {"image": block}
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        (
            {
                "messages": [
                    user([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}])
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [user([{"type": "input_audio", "input_audio": {}}])]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "t",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0]",
        ),
    ],
)
def test_what_converse_cannot_express_is_a_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        converse({"model": "m", "messages": [user("hi")], **body})
    assert raised.value.param == param


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("model_context_window_exceeded", "length"),
        ("something_new", "stop"),
    ],
)
def test_stop_reasons(stop: str, finish: str) -> None:
    answer = decode_answer(
        json.dumps({"output": {"message": {"content": [{"text": "x"}]}}, "stopReason": stop})
    )
    completion = to_chat_completion(answer, id="i", model="m", created=1)
    assert completion["choices"][0]["finish_reason"] == finish


def test_usage_counts_cached_tokens_as_prompt_tokens() -> None:
    usage = {
        "inputTokens": 5,
        "outputTokens": 2,
        "cacheReadInputTokens": 10,
        "cacheWriteInputTokens": 3,
    }
    answer = decode_answer(json.dumps({"output": {"message": {"content": []}}, "usage": usage}))
    assert to_chat_completion(answer, id="i", model="m", created=1)["usage"] == {
        "prompt_tokens": 18,
        "completion_tokens": 2,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 3},
    }


@given(
    st.lists(st.text(min_size=1, max_size=6), max_size=10),
    st.lists(st.text(min_size=1, max_size=6), max_size=6),
)
def test_stream_deltas_join_back(pieces: list[str], arguments: list[str]) -> None:
    translator = StreamTranslator(id="i", model="m", created=1)
    events = [("messageStart", {"role": "assistant"})]
    events += [
        ("contentBlockDelta", {"delta": {"text": p}, "contentBlockIndex": 0}) for p in pieces
    ]
    events.append(
        (
            "contentBlockStart",
            {"start": {"toolUse": {"toolUseId": "t", "name": "f"}}, "contentBlockIndex": 1},
        )
    )
    events += [
        ("contentBlockDelta", {"delta": {"toolUse": {"input": a}}, "contentBlockIndex": 1})
        for a in arguments
    ]
    events += [("messageStop", {"stopReason": "tool_use"}), ("metadata", {"usage": {}})]
    chunks = [
        c for kind, body in events for c in translator.feed(kind, decode_event(json.dumps(body)))
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "".join(pieces)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert "".join(c["function"]["arguments"] for c in calls) == "".join(arguments)
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("tool_calls") == 1
    assert translator.finished


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/",
        "com.amazon.coral.validate#ValidationException",
        "validationException",
    ],
)
def test_error_types_in_every_spelling(raw: str) -> None:
    assert error_type(raw) == "validationexception"


@given(
    st.integers(min_value=400, max_value=599),
    st.sampled_from(
        [
            "ThrottlingException",
            "ValidationException",
            "AccessDeniedException",
            "ModelNotReadyException",
            "ServiceUnavailableException",
            "Whatever",
            "",
        ]
    ),
    st.text(max_size=40),
)
def test_every_error_is_an_openai_error_without_the_key(status: int, kind: str, words: str) -> None:
    body = json.dumps({"message": f"{words} {SECRET}"}).encode()
    error = error_from(status, body, DEPLOYMENT, {"x-amzn-errortype": kind})
    assert isinstance(error, ProxyError)
    assert 400 <= error.status <= 599
    assert SECRET not in str(error)


def test_a_non_json_error_body_is_shown_scrubbed() -> None:
    error = error_from(502, f"<html>bad gateway {SECRET}</html>".encode(), DEPLOYMENT, {})
    assert error.status == 502 and "bad gateway" in str(error) and SECRET not in str(error)


def test_a_context_overflow_is_flagged() -> None:
    body = b'{"message": "Input is too long for requested model."}'
    error = error_from(400, body, DEPLOYMENT, {"x-amzn-errortype": "ValidationException"})
    assert error.code == "context_length_exceeded"


def test_an_unknown_stream_exception_is_a_502() -> None:
    assert stream_error("somethingNewException", "x", DEPLOYMENT).status == 502


# -- embeddings --------------------------------------------------------------------------------


def test_embedding_families() -> None:
    assert family_of("amazon.titan-embed-text-v2:0", None) == "titan"
    assert family_of("us.cohere.embed-v4:0", None) == "cohere"
    assert family_of("my-custom-model", None) is None
    assert family_of("my-custom-model", "cohere") == "cohere"
    assert batches("titan", ["a", "b"]) == [["a"], ["b"]]
    assert [len(b) for b in batches("cohere", ["x"] * 100)] == [96, 4]
    assert json.loads(request("titan", ["a"], 256, "search_query")) == {
        "inputText": "a",
        "dimensions": 256,
    }
    assert vectors("cohere", b'{"embeddings": [[1.0, 2.0]]}') == ([[1.0, 2.0]], None)
