"""The gemini provider's translators as pure functions: examples, then any input (hypothesis)."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import msgspec
import pytest
from aioproxy_gemini.answer import (
    ErrorStatus,
    StreamTranslator,
    decode_answer,
    finish_reason,
    to_chat_completion,
    to_usage,
)
from aioproxy_gemini.errors import STATUS_OF, error_from, retry_after, stream_error
from aioproxy_gemini.provider import model_url
from aioproxy_gemini.schema import GEMINI_TYPES, to_gemini_schema
from aioproxy_gemini.translate import SIGNATURE_MARK, to_gemini
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aioproxy import BadRequest, Deployment, ProxyError, raw_fields

KEY = "AIzaSy-unit-secret"
DEPLOYMENT = Deployment(name="g", provider="gemini", model="gemini-2.5-flash", api_key=KEY)
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, small; and objects with the keys a translator looks for, to reach further in.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def gemini(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``body`` translated, as the JSON Gemini is sent."""
    out: dict[str, Any] = json.loads(msgspec.json.encode(to_gemini(raw_fields(body), **options)))
    return out


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


# -- requests --------------------------------------------------------------------------------


def test_a_tool_call_id_carries_the_thought_signature_back() -> None:
    call = {
        "id": f"call_1{SIGNATURE_MARK}c2ln",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    messages = [
        *user("go"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        {"role": "tool", "tool_call_id": call["id"], "content": [{"type": "text", "text": "{}"}]},
    ]
    assert gemini({"messages": messages})["contents"][1:] == [
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln"}],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "f", "response": {"output": "sunny"}}},
                {"functionResponse": {"name": "f", "response": {}}},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "system", "content": "only a system prompt"}], "messages"),
        ([{"role": "critic", "content": "x"}], "messages[0].role"),
        (
            user([{"type": "input_audio", "input_audio": {"data": "AA", "format": "ogg"}}]),
            "messages[0].content[0].input_audio",
        ),
        (
            user([{"type": "file", "file": {"file_id": "file-abc"}}]),
            "messages[0].content[0].file.file_id",
        ),
        (
            [
                *user("x"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_what_gemini_cannot_take_is_a_400_naming_it(messages: list[Any], param: str) -> None:
    with pytest.raises(BadRequest) as raised:
        to_gemini(raw_fields({"messages": messages}))
    assert raised.value.param == param


def test_files_audio_and_tool_choices() -> None:
    content = [
        {"type": "file", "file": {"file_data": "JVBERi0="}},
        {"type": "file", "file": {"file_id": "gs://bucket/report.pdf"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]
    body = gemini(
        {
            "messages": user(content),
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
        }
    )
    assert body["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://bucket/report.pdf"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
    ]
    assert body["tools"] == [{"functionDeclarations": [{"name": "f"}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}
    required = gemini(
        {
            "messages": user("x"),
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
        }
    )
    assert required["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


def test_json_object_and_schemas_as_json_schema() -> None:
    body = gemini({"messages": user("x"), "response_format": {"type": "json_object"}})
    assert body["generationConfig"] == {"responseMimeType": "application/json"}
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "$defs": {}}},
    }
    body = gemini({"messages": user("x"), "tools": [tool]}, schemas="json_schema")
    assert body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == {
        "type": "object",
        "$defs": {},
    }


def test_schema_refs_are_inlined_and_recursion_refused() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/A"},
            "b": {"type": ["integer", "string"]},
            "c": {"const": "x"},
        },
        "$defs": {"A": {"type": "array", "items": {"type": "number"}, "minItems": 1}},
    }
    assert to_gemini_schema(schema, "p") == {
        "type": "OBJECT",
        "properties": {
            "a": {"type": "ARRAY", "items": {"type": "NUMBER"}, "minItems": 1},
            "b": {"anyOf": [{"type": "INTEGER"}, {"type": "STRING"}]},
            "c": {"type": "STRING", "enum": ["x"]},
        },
    }
    loop = {
        "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}},
        "$ref": "#/$defs/N",
    }
    with pytest.raises(BadRequest, match="json_schema"):
        to_gemini_schema(loop, "response_format.json_schema.schema")


@pytest.mark.parametrize(
    ("effort", "thinking", "config"),
    [
        ("low", "level", {"thinkingLevel": "low"}),
        ("none", "level", {"thinkingLevel": "minimal"}),
        ("high", "budget", {"thinkingBudget": 24576}),
        ("none", "budget", {"thinkingBudget": 0}),
    ],
)
def test_reasoning_effort_as_thinking_config(
    effort: str, thinking: str, config: dict[str, Any]
) -> None:
    body = gemini({"messages": user("x"), "reasoning_effort": effort}, thinking=thinking)
    assert body["generationConfig"] == {"thinkingConfig": config}


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "called", "expected"),
    [
        ("STOP", False, "stop"),
        ("STOP", True, "tool_calls"),
        ("MAX_TOKENS", False, "length"),
        ("SAFETY", False, "content_filter"),
        ("RECITATION", False, "content_filter"),
        ("PROHIBITED_CONTENT", False, "content_filter"),
        ("MALFORMED_FUNCTION_CALL", False, "stop"),
        ("A_REASON_FROM_NEXT_YEAR", False, "stop"),
        (None, False, "stop"),
    ],
)
def test_finish_reasons(reason: str | None, called: bool, expected: str) -> None:
    assert finish_reason(reason, called) == expected


def test_usage_in_openai_terms() -> None:
    usage = decode_answer(
        b'{"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 4, "cachedContentTokenCount": 6,'
        b' "thoughtsTokenCount": 20, "toolUsePromptTokenCount": 2, "totalTokenCount": 36}}'
    ).usage_metadata
    assert to_usage(usage) == {
        "prompt_tokens": 12,
        "completion_tokens": 24,
        "total_tokens": 36,
        "prompt_tokens_details": {"cached_tokens": 6},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }


def test_thoughts_are_not_content() -> None:
    answer = decode_answer(
        b'{"candidates": [{"content": {"parts": [{"text": "hmm", "thought": true}, {"text": "Hi"}]},'
        b' "finishReason": "STOP"}]}'
    )
    done = to_chat_completion(answer, model="g", created=1, n=1)
    assert done["choices"][0]["message"]["content"] == "Hi"


@pytest.mark.parametrize(
    ("delay", "expected"),
    [("6.2s", "7"), ("0.001s", "1"), ("30s", "30"), ("soon", None), ("nans", None)],
)
def test_retry_delay_as_retry_after(delay: str, expected: str | None) -> None:
    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
    assert retry_after(ErrorStatus(details=[info])) == expected


def test_a_stream_error_takes_its_status_from_its_code_or_name() -> None:
    assert (
        stream_error(ErrorStatus(code=429, status="RESOURCE_EXHAUSTED"), DEPLOYMENT).status == 429
    )
    assert stream_error(ErrorStatus(status="UNAVAILABLE"), DEPLOYMENT).status == 503
    assert stream_error(ErrorStatus(), DEPLOYMENT).status == 502


def test_a_too_long_prompt_says_context_length_exceeded() -> None:
    said = b'{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "The input token count (2000001) exceeds the maximum number of tokens allowed (1048576)."}}'
    assert error_from(400, said, DEPLOYMENT, {}).code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("api_base", "model", "url"),
    [
        (
            None,
            "gemini-2.5-flash",
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        ("http://h/", "models/gemini-pro", "http://h/v1beta/models/gemini-pro:generateContent"),
        ("http://h/v1", "tunedModels/mine", "http://h/v1/tunedModels/mine:generateContent"),
    ],
)
def test_model_urls(api_base: str | None, model: str, url: str) -> None:
    assert model_url(api_base, model, "generateContent") == url


# -- any input (hypothesis) ------------------------------------------------------------------

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"])},
    optional={
        "content": st.one_of(
            st.text(max_size=6),
            st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(
                            ["text", "image_url", "file", "input_audio", "refusal"]
                        )
                    },
                    optional={"text": JSON, "image_url": JSON, "file": JSON, "input_audio": JSON},
                ),
                max_size=3,
            ),
            JSON,
        ),
        "tool_calls": st.one_of(
            JSON,
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.sampled_from(["a", "b", f"c{SIGNATURE_MARK}s"]),
                        "type": st.just("function"),
                    },
                    optional={
                        "function": st.fixed_dictionaries(
                            {
                                "name": st.sampled_from(["f", "g"]),
                                "arguments": st.sampled_from(["{}", '{"a":1}', "", "[", "5"]),
                            }
                        )
                    },
                ),
                max_size=2,
            ),
        ),
        "tool_call_id": st.sampled_from(["a", "b", "zz"]),
    },
)
# Mostly well-formed turns, so that the rest of the body is reached too.
GOOD_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.text(min_size=1, max_size=6),
    }
)
SCHEMA = st.recursive(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.one_of(
                st.sampled_from(["string", "object", "array", "null", "integer", "bogus"]),
                st.lists(st.sampled_from(["string", "null", "number"]), max_size=3),
                JSON,
            ),
            "enum": JSON,
            "const": JSON,
            "required": JSON,
            "$ref": st.sampled_from(["#/$defs/A", "#/$defs/B", "#/nope"]),
            "minItems": JSON,
            "description": JSON,
        },
    ),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            "properties": st.dictionaries(st.text(max_size=3), inner, max_size=3),
            "items": st.one_of(inner, st.lists(inner, max_size=2), JSON),
            "anyOf": st.lists(inner, max_size=2),
            "allOf": st.lists(inner, max_size=2),
            "$defs": st.fixed_dictionaries({}, optional={"A": inner, "B": inner}),
            "type": st.just("object"),
        },
    ),
    max_leaves=12,
)
BODY = st.fixed_dictionaries(
    {"messages": st.lists(st.one_of(GOOD_MESSAGE, GOOD_MESSAGE, MESSAGE), max_size=5)},
    optional={
        "tools": st.one_of(
            JSON,
            st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries(
                            {"name": st.sampled_from(["f", "g"])},
                            optional={"parameters": st.one_of(SCHEMA, JSON)},
                        ),
                    }
                ),
                max_size=2,
            ),
        ),
        "tool_choice": st.one_of(JSON, st.sampled_from(["auto", "none", "required"])),
        "response_format": st.one_of(
            JSON,
            st.fixed_dictionaries(
                {"type": st.sampled_from(["json_schema", "json_object", "text", "xml"])},
                optional={
                    "json_schema": st.fixed_dictionaries(
                        {}, optional={"schema": st.one_of(SCHEMA, JSON)}
                    )
                },
            ),
        ),
        "n": JSON,
        "stop": JSON,
        "temperature": JSON,
        "max_tokens": JSON,
        "seed": JSON,
        "reasoning_effort": st.one_of(JSON, st.sampled_from(["low", "none", "ultra"])),
    },
)
_DATA_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse"}


def _check_schema(schema: Any) -> None:
    """Only Gemini's Schema keywords, and its type names."""
    assert isinstance(schema, dict)
    if "type" in schema:
        assert schema["type"] in GEMINI_TYPES
    for nested in schema.get("properties", {}).values():
        _check_schema(nested)
    for nested in schema.get("anyOf", []):
        _check_schema(nested)
    if "items" in schema:
        _check_schema(schema["items"])
    assert not {"$ref", "$defs", "additionalProperties", "const", "allOf", "oneOf"} & set(schema)


@_SETTINGS
@given(
    body=BODY,
    schemas=st.sampled_from(["openapi", "json_schema"]),
    thinking=st.sampled_from(["level", "budget"]),
)
@example(
    body={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"schema": {"required": [{}], "properties": {}}},
        },
    },
    schemas="openapi",
    thinking="level",
)
def test_the_request_translator_takes_any_body(
    body: dict[str, Any], schemas: str, thinking: str
) -> None:
    """Any body is a 400 naming one of its fields, or a request Gemini can take: alternating
    user/model turns of parts holding one kind of data each, schemas of Gemini's keywords."""
    try:
        out = gemini(body, schemas=schemas, thinking=thinking)
    except ProxyError as exc:
        assert exc.status == 400 and exc.param is not None, exc.message
        assert exc.param.split("[")[0].split(".")[0] in body, exc.param
        return
    roles = [content["role"] for content in out["contents"]]
    assert (
        roles
        and all(a != b for a, b in itertools.pairwise(roles))
        and set(roles) <= {"user", "model"}
    )
    for content in out["contents"]:
        assert content["parts"] and all(len(_DATA_KEYS & set(p)) == 1 for p in content["parts"])
    if schemas == "openapi":
        config = out.get("generationConfig", {})
        if "responseSchema" in config:
            _check_schema(config["responseSchema"])
        for tool in out.get("tools", []):
            for declaration in tool["functionDeclarations"]:
                _check_schema(declaration.get("parameters", {}))


@_SETTINGS
@given(schema=SCHEMA)
def test_the_schema_converter_takes_any_schema(schema: dict[str, Any]) -> None:
    try:
        converted = to_gemini_schema(schema, "p")
    except BadRequest as exc:
        assert exc.param == "p"
        return
    _check_schema(converted)


@_SETTINGS
@given(answer=JSON, chunks=st.lists(JSON, max_size=5))
@example(
    answer={"candidates": [{"index": -1}, {"index": 10**9}]},
    chunks=[{"candidates": [{"index": 5}]}],
)
def test_answers_of_any_shape(answer: Any, chunks: list[Any]) -> None:
    """An answer of another shape is a DecodeError (the provider's 502), never another crash."""
    try:
        msgspec.json.encode(
            to_chat_completion(
                decode_answer(msgspec.json.encode(answer)), model="g", created=1, n=2
            )
        )
    except msgspec.DecodeError:
        pass
    translator = StreamTranslator(model="g", created=1, n=2, include_usage=True)
    for chunk in chunks:
        try:
            parsed = decode_answer(msgspec.json.encode(chunk))
        except msgspec.DecodeError:
            continue
        for out in translator.feed(parsed):
            msgspec.json.encode(out)
    msgspec.json.encode(translator.usage_chunk())


@_SETTINGS
@given(
    text=st.text(min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    n=st.integers(1, 3),
)
def test_a_stream_split_anywhere_gives_the_text_and_one_finish_per_choice(
    text: str, cuts: list[int], n: int
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    translator = StreamTranslator(model="g", created=1, n=n)
    chunks = []
    for index in range(n):
        for piece in pieces:
            candidate = {"content": {"parts": [{"text": piece}]}, "index": index}
            chunks += translator.feed(
                decode_answer(msgspec.json.encode({"candidates": [candidate]}))
            )
    last = [{"content": {"parts": []}, "finishReason": "STOP", "index": i} for i in range(n)]
    chunks += translator.feed(decode_answer(msgspec.json.encode({"candidates": last})))
    assert translator.finished
    for index in range(n):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]


@_SETTINGS
@given(
    status=st.integers(300, 700),
    body=st.one_of(st.binary(max_size=40), JSON.map(msgspec.json.encode)),
    name=st.sampled_from([*STATUS_OF, "X"]),
)
def test_any_error_answer_is_an_openai_error_without_the_key(
    status: int, body: bytes, name: str
) -> None:
    said = msgspec.json.encode(
        {"error": {"code": status, "status": name, "message": f"bad key {KEY}"}}
    )
    for raw in (body, said):
        error = error_from(status, raw, DEPLOYMENT, {})
        assert 400 <= error.status < 600
        assert KEY not in error.message
        assert math.isfinite(float(error.headers.get("Retry-After", "0") if error.headers else 0))


def test_a_schema_nested_too_deep_is_a_400_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(BadRequest, match="nested over"):
        to_gemini_schema(schema, "p")
