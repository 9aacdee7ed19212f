"""The translating providers' kit (aioproxy.translating), as plugins import it from aioproxy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy import (
    CONTENT_PARTS,
    MAX_MESSAGES,
    MESSAGES,
    RESPONSE_FORMAT,
    TOOL_CHOICE,
    TOOLS,
    BadGateway,
    BadRequest,
    Call,
    ChunkMaker,
    ContentPart,
    Deployment,
    InputFile,
    Kind,
    Message,
    Principal,
    RawMessage,
    ToolCall,
    ToolChoice,
    TurnTranslator,
    UpstreamResponse,
    assistant_choice,
    chat_completion,
    chat_messages,
    completion_usage,
    decode_upstream,
    error_text,
    expect_content_type,
    function_tool,
    get_field,
    image_url_of,
    include_usage,
    inline_file,
    is_empty_schema,
    json_object,
    max_tokens_of,
    part_text,
    raw_fields,
    split_data_url,
    stop_sequences,
    stream_incomplete,
    text_or_array,
    token_count,
    tool_call,
    upstream_headers,
    usage_with_cache,
)

DEPLOYMENT = Deployment(name="m", provider="p", model="up-1")


def test_small_message_arrays_are_decoded_whole_and_large_ones_raw() -> None:
    small = MESSAGES.decode(msgspec.json.encode([{"role": "user", "content": "hi"}]), "messages")
    assert small == [Message(role="user", content="hi")]
    big = [{"role": "user", "content": "x" * 100}] * 1000  # past the small size: items raw
    messages = MESSAGES.decode(msgspec.json.encode(big), "messages")
    assert messages is not None and isinstance(messages[0], RawMessage)
    assert text_or_array(messages[0].content, CONTENT_PARTS, "messages[0].content") == "x" * 100


def test_too_many_messages_is_a_400_naming_the_field() -> None:
    too_many = msgspec.json.encode([{}] * (MAX_MESSAGES + 1))
    with pytest.raises(BadRequest) as caught:
        MESSAGES.decode(too_many, "messages")
    assert caught.value.param == "messages"


def test_tool_choice_and_response_format() -> None:
    fields = raw_fields(
        {
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        }
    )
    choice = get_field(fields, "tool_choice", TOOL_CHOICE)
    assert isinstance(choice, ToolChoice) and choice.function and choice.function.name == "f"
    fmt = get_field(fields, "response_format", RESPONSE_FORMAT)
    assert fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None
    assert bytes(fmt.json_schema.schema) == b"{}"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, False),
        ({"stream_options": None}, False),
        ({"stream_options": {}}, False),
        ({"stream_options": {"include_usage": False}}, False),
        ({"stream_options": {"include_usage": True}}, True),
    ],
)
def test_include_usage(body: dict[str, Any], expected: bool) -> None:
    assert include_usage(raw_fields(body)) is expected


def test_include_usage_of_the_wrong_type_is_a_400() -> None:
    with pytest.raises(BadRequest) as caught:
        include_usage(raw_fields({"stream_options": {"include_usage": "yes"}}))
    assert caught.value.param == "stream_options.include_usage"


def test_parts() -> None:
    assert part_text(ContentPart(type="refusal", refusal="no"), "p") == "no"
    with pytest.raises(BadRequest) as caught:
        part_text(ContentPart(type="text"), "messages[0].content[1]")
    assert caught.value.param == "messages[0].content[1].text"
    assert image_url_of(ContentPart(type="image_url", image_url="https://x/i.png"), "p") == (
        "https://x/i.png"
    )
    with pytest.raises(BadRequest) as caught:
        image_url_of(ContentPart(type="image_url"), "m[0]")
    assert caught.value.param == "m[0].image_url"


def test_split_data_url() -> None:
    assert split_data_url("data:image/png;base64,AAAA", "u") == ("image/png", "AAAA")
    for bad in ("data:image/png,AAAA", "data:;base64,AAAA", "data:image/png;base64", "x"):
        with pytest.raises(BadRequest) as caught:
            split_data_url(bad, "messages[0].content[0].image_url.url")
        assert caught.value.param == "messages[0].content[0].image_url.url"


def test_json_object_keeps_the_clients_bytes() -> None:
    assert bytes(json_object('{"a": [1, 2]}', "args", "as X takes")) == b'{"a": [1, 2]}'
    assert bytes(json_object("", "args", "as X takes")) == b"{}"
    assert bytes(json_object(None, "args", "as X takes")) == b"{}"
    for bad in ("[1]", "{", '"s"', "[" * 100_000):
        with pytest.raises(BadRequest) as caught:
            json_object(bad, "tool_calls[0].function.arguments", "as X takes tool input")
        assert caught.value.param == "tool_calls[0].function.arguments"
        assert "as X takes tool input" in caught.value.message


def test_is_empty_schema() -> None:
    assert is_empty_schema(msgspec.Raw())
    assert is_empty_schema(msgspec.Raw(b"null"))
    assert is_empty_schema(msgspec.Raw(b"{}"))
    assert not is_empty_schema(msgspec.Raw(b'{"type": "object"}'))


def test_function_tool_checks_a_named_function_and_keeps_its_schema_raw() -> None:
    raw = b'[{"type": "function", "function": {"name": "f", "description": "d", "parameters":'
    raw += b' {"type":"object"}}}, {"type": "function", "function": {"name": "g"}}]'
    described, bare = TOOLS.decode(msgspec.Raw(raw), "tools")
    declaration, schema = function_tool(described, 0, "X")
    assert (
        declaration == {"name": "f", "description": "d"} and bytes(schema) == b'{"type":"object"}'
    )
    declaration, schema = function_tool(bare, 1, "X")
    assert declaration == {"name": "g"} and is_empty_schema(schema)
    for i, bad in enumerate((b'{"type": "function"}', b'{"type": "x", "function": {"name": "f"}}')):
        (tool,) = TOOLS.decode(msgspec.Raw(b"[" + bad + b"]"), "tools")
        with pytest.raises(BadRequest, match="function tool with a name for X") as caught:
            function_tool(tool, i, "X")
        assert caught.value.param == f"tools[{i}]"


def test_completion_usage_has_the_details_openai_always_sends() -> None:
    usage = completion_usage(3, 4)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (3, 4, 7)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert set(usage["completion_tokens_details"].values()) == {0}


class _Shape(msgspec.Struct):
    n: int


def test_decode_upstream_refuses_what_is_not_of_its_shape_with_a_502() -> None:
    decode = msgspec.json.Decoder(_Shape).decode
    assert decode_upstream(decode, b'{"n": 1}', DEPLOYMENT, "junk") == _Shape(1)
    for bad in (b"not json", b'{"n": "one"}', b"[" * 100_000):
        with pytest.raises(BadGateway) as caught:
            decode_upstream(decode, bad, DEPLOYMENT, "an answer that is not X's")
        assert caught.value.code == "upstream_invalid_response"
        assert caught.value.message == "Deployment m (p:up-1) sent an answer that is not X's"


def test_expect_content_type() -> None:
    stream = cast(UpstreamResponse, SimpleNamespace(content_type="text/event-stream"))
    expect_content_type(stream, "text/event-stream", DEPLOYMENT)
    json_answer = cast(UpstreamResponse, SimpleNamespace(content_type="application/json"))
    with pytest.raises(BadGateway) as caught:
        expect_content_type(json_answer, "text/event-stream", DEPLOYMENT)
    assert caught.value.code == "upstream_invalid_response"
    assert "application/json, not text/event-stream" in caught.value.message


def test_stream_incomplete_names_the_deployment_and_the_missing_event() -> None:
    error = stream_incomplete(DEPLOYMENT, "message_stop")
    assert isinstance(error, BadGateway) and error.code == "upstream_stream_incomplete"
    assert error.message == "Deployment m (p:up-1) ended its stream before message_stop"


def test_error_text_is_the_start_of_a_body_that_is_not_json() -> None:
    assert error_text(b"  <html>Bad gateway</html>\n") == "<html>Bad gateway</html>"
    assert error_text(b" \r\n") is None
    assert error_text(b"\xff" + b"x" * 1000) == "\ufffd" + "x" * 299


def test_upstream_headers_let_neither_the_gateways_nor_the_deployments_replace_the_fixed() -> None:
    deployment = Deployment(
        name="m",
        provider="p",
        model="up-1",
        headers={"X-Extra": "yes", "X-API-Key": "deployment's", "X-Request-Id": "deployment's"},
    )
    request = make_mocked_request("POST", "/v1/chat/completions", headers={"X-Api-Key": "client"})
    call = Call(Kind.CHAT_COMPLETIONS, request, Principal("alice"), "m", {}, False)
    call.route_to(deployment)
    call.upstream_headers["traceparent"] = "00-1-2-01"
    headers = upstream_headers(call, {"x-api-key": "upstream-key", "content-type": "x/y"})
    assert headers.getall("x-api-key") == ["upstream-key"]  # the client's never, nor the others
    assert headers["X-Request-Id"] == "deployment's"  # the deployment's replace the gateway's
    assert headers["traceparent"] == "00-1-2-01" and headers["x-extra"] == "yes"
    assert headers["content-type"] == "x/y"
    assert call.upstream_headers.keys() == {"x-request-id", "traceparent"}  # left as it was


def test_the_clients_answer_in_openai_shapes() -> None:
    call = tool_call("call_1", "f", msgspec.Raw(b'{"a":1}'))
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a":1}'},
    }
    assert tool_call("c", "f", msgspec.Raw())["function"]["arguments"] == "{}"
    assert tool_call("c", "f", msgspec.Raw(b"null"))["function"]["arguments"] == "{}"
    choice = assistant_choice(0, "", [call], "tool_calls")
    assert choice["message"]["content"] is None  # null beside tool calls, as OpenAI sends it
    assert choice["message"]["tool_calls"] == [call]
    said = assistant_choice(1, "", [], "stop")
    assert said["message"]["content"] == "" and "tool_calls" not in said["message"]
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    completion = chat_completion("id1", model="m", created=5, choices=[said], usage=usage)
    assert completion["object"] == "chat.completion" and completion["usage"] == usage
    chunks = ChunkMaker("id1", model="m", created=5)
    chunk = chunks.chunk({"content": "x"}, index=2)
    assert chunk["choices"] == [
        {"index": 2, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in chunk
    with_usage = ChunkMaker("id1", model="m", created=5, include_usage=True)
    assert with_usage.chunk({}, "stop")["usage"] is None
    last = with_usage.usage_chunk_of(usage)
    assert last["choices"] == [] and last["usage"] == usage and last["id"] == "id1"
    assert [token_count(n) for n in (None, -3, 0, 7)] == [0, 0, 0, 7]


# -- what every translator shared: the request's messages, caps and turns ------------------------


def test_chat_messages_refuses_legacy_functions_and_needs_an_array() -> None:
    fields = raw_fields({"messages": [{"role": "user", "content": "hi"}]})
    assert [m.content for m in chat_messages(fields, "Mine")] == ["hi"]
    with pytest.raises(BadRequest) as raised:
        chat_messages(raw_fields({"messages": [], "functions": [{}]}), "Mine")
    assert raised.value.param == "functions" and "for Mine" in raised.value.message
    assert chat_messages(raw_fields({"messages": [], "function_call": None}), "Mine") == []
    with pytest.raises(BadRequest) as raised:
        chat_messages(raw_fields({"messages": "hi"}), "Mine")
    assert raised.value.param == "messages"


@pytest.mark.parametrize(
    ("body", "max_tokens", "stop"),
    [
        ({}, None, None),
        ({"max_tokens": 5, "stop": "x"}, 5, ["x"]),
        ({"max_completion_tokens": 7, "max_tokens": 5, "stop": ["a", "b"]}, 7, ["a", "b"]),
    ],
)
def test_max_tokens_of_and_stop_sequences(
    body: dict[str, Any], max_tokens: int | None, stop: list[str] | None
) -> None:
    fields = raw_fields(body)
    assert max_tokens_of(fields) == max_tokens
    assert stop_sequences(fields) == stop


def test_inline_file() -> None:
    assert inline_file(InputFile(file_data="data:text/csv;base64,YQ=="), "f", "M") == (
        "text/csv",
        "YQ==",
    )
    assert inline_file(InputFile(file_data="JVBERi0="), "f", "M") == ("application/pdf", "JVBERi0=")
    with pytest.raises(BadRequest) as raised:
        inline_file(InputFile(file_id="file-1"), "f", "Mine")
    assert raised.value.param == "f" and "nothing to Mine" in raised.value.message


def test_usage_with_cache_counts_cache_reads_and_writes_in_the_prompt() -> None:
    usage = usage_with_cache(10, 3, None, -1)
    assert usage == {
        "prompt_tokens": 13,
        "completion_tokens": 0,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
    }


class _Turns(TurnTranslator):
    """A toy upstream's turns: blocks are (kind, value) dicts."""

    service = "Toy"

    def text_block(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def image_block(self, url: str, where: str) -> dict[str, Any]:
        return {"image": url}

    def tool_use(self, call: ToolCall, where: str) -> dict[str, Any]:
        return {"call": call.id}

    def tool_result(self, message: Any, where: str) -> dict[str, Any]:
        return {"result": message.tool_call_id}


def _split(messages: list[dict[str, Any]]) -> tuple[list[Any], list[dict[str, Any]]]:
    decoded = MESSAGES.decode(raw_fields({"m": messages})["m"], "messages")
    assert decoded is not None
    return _Turns().split(decoded)


def test_turn_translator_walks_roles_merges_neighbours_and_keeps_system_apart() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    system, turns = _split(
        [
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": "hi"},
            {"role": "user", "content": ""},  # empty: no turn of its own, nothing merged
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
        ]
    )
    assert system == [{"text": "be brief"}]
    assert turns == [
        {"role": "user", "content": [{"text": "hi"}]},
        {"role": "assistant", "content": [{"call": "c1"}]},
        {"role": "user", "content": [{"result": "c1"}, {"image": "u"}]},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "robot", "content": "hi"}, "messages[0].role"),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": "u"}]},
            "messages[0].content",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages[0].content[0]",
        ),
        ({"role": "user", "content": [{"type": "video"}]}, "messages[0].content[0].type"),
    ],
)
def test_turn_translator_refuses_what_the_upstream_cannot_take(
    message: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as raised:
        _split([message])
    assert raised.value.param == param


def test_chunk_maker_numbers_tool_calls_apart_from_the_upstreams_blocks() -> None:
    maker = ChunkMaker("c", model="m", created=1)
    start = maker.tool_call_start(3, "call_1", "f")
    assert start["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
    more = maker.tool_call_arguments(3, '{"a"')
    assert more is not None
    assert more["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": '{"a"'}}
    ]
    assert maker.tool_call_arguments(1, "{}") is None  # block 1 opened no tool call
