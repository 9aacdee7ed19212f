"""Any JSON in any field the request translators read is translated or refused with a 400 that
names the field, never another exception (issue #9.4): the anthropic provider's translator and
the Responses bridge's, and what they make of Anthropic's answers (a broken answer: a DecodeError,
which the provider turns into a 502)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request
from aioproxy_anthropic.translate import (
    _READ_EVENTS,
    StreamTranslator,
    decode_answer,
    parse_event,
    to_anthropic,
    to_chat_completion,
)
from aioproxy_echo import inputs as echo_inputs
from aioproxy_echo.inputs import chat_input, completion_prompts, response_input
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aioproxy import Call, Principal, ProxyError
from aioproxy.bridges.response_events import response_from_chat
from aioproxy.bridges.response_request import chat_request
from aioproxy.fields import MAX_MESSAGES, raw_fields
from aioproxy.routes import Kind
from tests.hostile import RESPONSES_FIELDS, nested

# Names the translators read (or pass on), at any depth, and values they branch on.
KEYS = [
    "type",
    "role",
    "content",
    "text",
    "refusal",
    "name",
    "id",
    "call_id",
    "output",
    "arguments",
    "function",
    "tool_calls",
    "tool_call_id",
    "image_url",
    "url",
    "detail",
    "file",
    "file_data",
    "file_id",
    "file_url",
    "filename",
    "input_audio",
    "format",
    "schema",
    "strict",
    "description",
    "parameters",
    "tools",
    "mode",
    "effort",
    "verbosity",
    "index",
    "message",
    "content_block",
    "delta",
    "usage",
    "error",
    "input",
    "partial_json",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
]
WORDS = [
    "function",
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "text",
    "refusal",
    "image_url",
    "file",
    "input_audio",
    "input_text",
    "output_text",
    "input_image",
    "input_file",
    "json_schema",
    "json_object",
    "allowed_tools",
    "auto",
    "none",
    "required",
    "{}",
    '{"a": 1}',
    "[1]",
    "data:image/png;base64,AAAA",
    "https://x/y.png",
    *sorted(_READ_EVENTS),  # the Anthropic event types its translation reads
    "tool_use",
    "text_delta",
    "input_json_delta",
    "ping",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(WORDS),
)


JSON = st.recursive(
    SCALARS,
    nested(st.one_of(st.sampled_from(KEYS), st.text(max_size=3)), items=4, members=5),
    max_leaves=20,
)
# An object made mostly of the keys the translators look at, so that deep fields get reached.
OBJECTS = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6)
ITEMS = st.lists(st.one_of(OBJECTS, JSON), max_size=4)

CHAT_FIELDS = [
    "messages",
    "n",
    "functions",
    "function_call",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "user",
    "safety_identifier",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "stream_options",
]


def bodies(names: list[str], lists: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies of those fields: any JSON, and for the array fields mostly arrays of objects."""
    value = st.one_of(JSON, ITEMS, OBJECTS)
    return st.dictionaries(st.sampled_from(names), value, max_size=6).flatmap(
        lambda body: st.fixed_dictionaries({name: ITEMS for name in lists if name not in body}).map(
            lambda items: {**items, **body}
        )
    )


def assert_400(exc: ProxyError, body: dict[str, Any]) -> None:
    """A 400 naming a field the body has (or one it lacks and needs)."""
    assert exc.status == 400, exc.message
    assert exc.param is not None
    field = exc.param.split("[")[0].split(".")[0]
    assert field in body or exc.code == "missing_required_parameter", exc.param


_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(body=bodies(CHAT_FIELDS, ["messages", "tools"]))
@example(body={"messages": [{"role": "user", "content": "hi"}], "stop": 5})
@example(body={"messages": [{"role": "user", "content": "hi"}], "tools": 5})
@example(body={"messages": [{"role": "assistant", "tool_calls": 5}]})
@example(body={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]})
@example(body={"messages": [{"role": "tool", "content": [5]}]})
@example(body={"messages": [], "tools": [{"type": "function", "function": 5}]})
def test_the_anthropic_translator(body: dict[str, Any]) -> None:
    try:
        out = to_anthropic(raw_fields({"model": "m", **body}))
    except ProxyError as exc:
        assert_400(exc, body)
        return
    msgspec.json.encode(out)  # what Anthropic is sent can be sent


@_SETTINGS
@given(body=bodies(RESPONSES_FIELDS, ["input"]))
@example(body={"input": "x", "stop": 5, "tools": 5})
@example(body={"input": "x", "tools": [], "tool_choice": {"type": "allowed_tools", "tools": 5}})
@example(body={"input": [{"type": "function_call_output", "call_id": "c", "output": [5]}]})
@example(body={"input": "x", "text": {"format": 5}})
@example(body={"input": "x", "previous_response_id": 5})
def test_the_responses_bridge(body: dict[str, Any]) -> None:
    try:
        request = chat_request(raw_fields(body))
    except ProxyError as exc:
        assert_400(exc, body)
        return
    msgspec.json.encode(request.body)  # what chat is sent can be sent
    response_from_chat({"choices": []}, request.echo, "m")  # what was read can be echoed


ECHO_FIELDS = [
    "messages",
    "input",
    "instructions",
    "prompt",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream_options",
    "dimensions",
    "encoding_format",
]
ECHO_READERS: list[Callable[[Call], Any]] = [
    echo_inputs.chat_input,
    echo_inputs.response_input,
    echo_inputs.completion_prompts,
    echo_inputs.embedding_inputs,
    echo_inputs.choice_count,
    echo_inputs.include_usage,
    echo_inputs.embedding_dimensions,
    echo_inputs.wants_base64,
    lambda call: echo_inputs.token_cap(call, "max_completion_tokens", "max_tokens"),
]


@_SETTINGS
@given(body=bodies(ECHO_FIELDS, ["messages", "input"]))
def test_the_echo_inputs(body: dict[str, Any]) -> None:
    call = echo_call(raw_fields(body))
    for read in ECHO_READERS:
        try:
            read(call)
        except ProxyError as exc:
            assert_400(exc, body)


@_SETTINGS
@given(answer=st.one_of(OBJECTS, JSON), events=st.lists(st.one_of(OBJECTS, JSON), max_size=6))
def test_anthropic_answers_of_any_shape(answer: Any, events: list[Any]) -> None:
    """A whole answer or a stream event of another shape is a DecodeError (the provider's 502)."""
    try:
        to_chat_completion(decode_answer(msgspec.json.encode(answer)), model="m", created=1)
    except msgspec.DecodeError:
        pass
    translator = StreamTranslator(model="m", created=1, include_usage=True)
    for event in events:
        try:
            parsed = parse_event(b"data: " + msgspec.json.encode(event))
        except msgspec.DecodeError:
            continue
        if parsed is not None:
            for chunk in translator.feed(parsed):
                msgspec.json.encode(chunk)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stop": 5}, "stop"),
        ({"tools": 5}, "tools"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": 5},
                ]
            },
            "messages[1].tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 5},
            "tool_choice",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_a_wrongly_typed_chat_field_is_a_400_naming_its_path(
    body: dict[str, Any], param: str
) -> None:
    fields = raw_fields({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(ProxyError) as raised:
        to_anthropic(fields)
    assert (raised.value.status, raised.value.param) == (400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": 5}, "tools"),
        (
            {
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "allowed_tools", "tools": 5},
            },
            "tool_choice.tools",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
            "input[0].content[0].text",
        ),
        ({"text": {"format": 5}}, "text.format"),
        ({"reasoning": 5}, "reasoning"),
    ],
)
def test_a_wrongly_typed_responses_field_is_a_400_naming_its_path(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(ProxyError) as raised:
        chat_request(raw_fields({"input": "x", **body}))
    assert (raised.value.status, raised.value.param) == (400, param)


def echo_call(fields: dict[str, msgspec.Raw]) -> Call:
    request = make_mocked_request("POST", "/v1/chat/completions")
    return Call(Kind.CHAT_COMPLETIONS, request, Principal("p"), "m", fields, False)


# Each reader, given the raw fields of a body, and the field that holds the array.
READERS: list[tuple[str, str, Callable[[dict[str, msgspec.Raw]], Any]]] = [
    ("anthropic", "messages", to_anthropic),
    ("responses", "input", chat_request),
    ("responses instructions", "instructions", lambda f: chat_request({**f, "input": f["model"]})),
    ("echo chat", "messages", lambda f: chat_input(echo_call(f))),
    ("echo responses", "input", lambda f: response_input(echo_call(f))),
    ("echo prompts", "prompt", lambda f: completion_prompts(echo_call(f))),
]


@pytest.mark.parametrize(("field", "read"), [r[1:] for r in READERS], ids=[r[0] for r in READERS])
@pytest.mark.parametrize("item", [b"{}", b"0", b'""'], ids=["objects", "numbers", "strings"])
def test_a_huge_array_of_tiny_items_is_refused_before_it_is_built(
    field: str, read: Callable[[dict[str, msgspec.Raw]], Any], item: bytes
) -> None:
    """30 MB of ``[{},{},...]`` once cost 800 MiB as Python objects (issue #9.5)."""
    raw = b"[" + b",".join([item] * 10_000_000) + b"]"
    fields = {"model": msgspec.Raw(b'"m"'), field: msgspec.Raw(raw)}
    tracemalloc.start()
    try:
        with pytest.raises(ProxyError) as raised:
            read(fields)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (raised.value.status, raised.value.param) == (400, field)
    assert raised.value.code == "array_above_max_length"
    assert peak < len(raw) // 10  # next to nothing: the array was counted, not built


@pytest.mark.parametrize("content", ["x", "x" * 100], ids=["small array", "large array"])
def test_an_array_at_the_limit_is_read_and_one_over_it_refused(content: str) -> None:
    messages = [{"role": "user", "content": content}] * MAX_MESSAGES
    assert to_anthropic(raw_fields({"model": "m", "messages": messages}))["messages"]
    with pytest.raises(ProxyError) as raised:
        to_anthropic(raw_fields({"model": "m", "messages": [*messages, {"role": "user"}]}))
    assert (raised.value.param, raised.value.code) == ("messages", "array_above_max_length")


def test_stop_takes_four_sequences_at_most() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": list("abcd")}
    assert to_anthropic(raw_fields(body))["stop_sequences"] == list("abcd")
    with pytest.raises(ProxyError) as raised:
        to_anthropic(raw_fields({**body, "stop": list("abcde")}))
    assert (raised.value.param, raised.value.code) == ("stop", "array_above_max_length")
