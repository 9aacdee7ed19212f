"""aioproxy.payloads.decode_request: every 400 a body can earn, and the fields kept as sent."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy.errors import BadRequest
from aioproxy.payloads import decode_request
from aioproxy.routes import Kind

CHAT = Kind.CHAT_COMPLETIONS
# Each provider kind's input field, and a valid value for it.
INPUTS = {
    Kind.CHAT_COMPLETIONS: ("messages", [{"role": "user", "content": "hi"}]),
    Kind.COMPLETIONS: ("prompt", "Say this is a test"),
    Kind.EMBEDDINGS: ("input", ["a", "b"]),
    Kind.RESPONSES: ("input", "hi"),
}
DROPPED = ("api_base", "base_url", "api_key", "api_version", "organization", "extra_headers")


def bad(body: bytes, kind: Kind = CHAT) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        decode_request(body, kind)
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    return caught.value


M = b'"messages": []'


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"", None, None),
        (b"{not json", "invalid_json", None),
        (b'{"model": "m", ' + M + b",}", "invalid_json", None),
        (b'{"model": "m", ' + M + b"} trailing", "invalid_json", None),
        (b'{"model": "m", ' + M + b', "x": "\xff"}', "invalid_encoding", None),
        (b'{"model": "\xc3\x28", ' + M + b"}", "invalid_encoding", None),
        (b'{"model": "m", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json", None),
        (
            b'{"model": "m", "x": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}",
            "invalid_json",
            None,
        ),
        (b"[1, 2]", "invalid_body", None),
        (b'"a string"', "invalid_body", None),
        (b"null", "invalid_body", None),
        (b"42", "invalid_body", None),
        (b"{" + M + b"}", "missing_required_parameter", "model"),
        (b"{}", "missing_required_parameter", "model"),
        (b'{"model": 4, ' + M + b"}", "invalid_type", "model"),
        (b'{"model": null, ' + M + b"}", "invalid_type", "model"),
        (b'{"model": ["m"], ' + M + b"}", "invalid_type", "model"),
        (b'{"model": {"name": "m"}, ' + M + b"}", "invalid_type", "model"),
        (b'{"model": "", ' + M + b"}", "invalid_value", "model"),
        (b'{"model": "m", "stream": "yes", ' + M + b"}", "invalid_type", "stream"),
        (b'{"model": "m", "stream": 1, ' + M + b"}", "invalid_type", "stream"),
        (b'{"model": "m", "stream": {}, ' + M + b"}", "invalid_type", "stream"),
    ],
    ids=[
        "empty",
        "malformed",
        "trailing-comma",
        "trailing-garbage",
        "bad-utf8-field",
        "bad-utf8-model",
        "deep-arrays",
        "deep-objects",
        "array",
        "string",
        "null",
        "number",
        "no-model",
        "empty-object",
        "int-model",
        "null-model",
        "list-model",
        "object-model",
        "empty-model",
        "string-stream",
        "int-stream",
        "object-stream",
    ],
)
def test_bad_bodies(body: bytes, code: str | None, param: str | None) -> None:
    error = bad(body)
    assert (error.code, error.param) == (code, param)
    assert error.message


@pytest.mark.parametrize(
    ("kind", "field"),
    [(Kind.CHAT_COMPLETIONS, "messages"), (Kind.COMPLETIONS, "prompt"), (Kind.EMBEDDINGS, "input")],
)
def test_required_input_missing(kind: Kind, field: str) -> None:
    error = bad(b'{"model": "m"}', kind)
    assert (error.code, error.param) == ("missing_required_parameter", field)
    assert f"'{field}'" in error.message


def test_responses_input_is_optional() -> None:
    fields, model, _ = decode_request(
        b'{"model": "m", "previous_response_id": "r"}', Kind.RESPONSES
    )
    assert model == "m" and "input" not in fields


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (Kind.CHAT_COMPLETIONS, "messages", b'"hi"'),
        (Kind.CHAT_COMPLETIONS, "messages", b'{"role": "user"}'),
        (Kind.CHAT_COMPLETIONS, "messages", b"null"),
        (Kind.COMPLETIONS, "prompt", b"42"),
        (Kind.EMBEDDINGS, "input", b'{"text": "a"}'),
        (Kind.EMBEDDINGS, "input", b"true"),
        (Kind.RESPONSES, "input", b"7"),
    ],
)
def test_input_of_wrong_type(kind: Kind, field: str, value: bytes) -> None:
    error = bad(b'{"model": "m", "' + field.encode() + b'": ' + value + b"}", kind)
    assert (error.code, error.param) == ("invalid_type", field)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (Kind.CHAT_COMPLETIONS, b"[]"),
        (Kind.COMPLETIONS, b'"p"'),
        (Kind.COMPLETIONS, b"[1, 2]"),
        (Kind.EMBEDDINGS, b'"x"'),
        (Kind.EMBEDDINGS, b"[[1, 2]]"),
        (Kind.RESPONSES, b"[]"),
    ],
)
def test_input_of_right_type(kind: Kind, value: bytes) -> None:
    field = INPUTS[kind][0]
    fields, _, _ = decode_request(b'{"model": "m", "' + field.encode() + b'":' + value + b"}", kind)
    assert bytes(fields[field]) == value


def test_fields_that_could_redirect_the_upstream_are_dropped() -> None:
    body = {
        "model": "m",
        "messages": [],
        **{name: "http://evil.test" for name in DROPPED},
        "user": "u",
    }
    fields, _, _ = decode_request(json.dumps(body).encode())
    assert list(fields) == ["model", "messages", "user"]


def test_messages_are_specific() -> None:
    assert "empty" in bad(b"").message
    assert "UTF-8" in bad(b'{"model": "m", "x": "ab\xff"}').message
    assert "(byte 23)" in bad(b'{"model": "m", "x": "ab\xff"}').message
    assert "nested too deeply" in bad(b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}").message
    assert "JSON object" in bad(b"[]").message
    assert "'model'" in bad(b"{}").message


def test_minimal_body() -> None:
    fields, model, stream = decode_request(b'{"model":"gpt","messages":[]}')
    assert model == "gpt" and stream is False
    assert list(fields) == ["model", "messages"] and bytes(fields["model"]) == b'"gpt"'


@pytest.mark.parametrize(
    ("raw_stream", "expected"), [(b"true", True), (b"false", False), (b"null", False)]
)
def test_stream(raw_stream: bytes, expected: bool) -> None:
    _, _, stream = decode_request(b'{"model": "m", ' + M + b', "stream": ' + raw_stream + b"}")
    assert stream is expected


def test_fields_kept_as_sent() -> None:
    body = b'{ "model" : "m\\u00e9" , "messages" : [ {"role":"user"} ], "t": 1.50 }'
    fields, model, _ = decode_request(body)
    assert model == "mé"
    assert {k: bytes(v) for k, v in fields.items()} == {
        "model": b'"m\\u00e9"',
        "messages": b'[ {"role":"user"} ]',
        "t": b"1.50",
    }


def test_utf8_bom_is_not_json() -> None:
    bad(b'\xef\xbb\xbf{"model": "m", "messages": []}')


def test_surrounding_whitespace_is_fine() -> None:
    assert decode_request(b' \n\t{"model": "m", "messages": []}\r\n ')[1] == "m"


def test_duplicate_keys_last_wins() -> None:
    fields, model, _ = decode_request(b'{"model": "a", "messages": [], "model": "b"}')
    assert model == "b" and list(fields) == ["model", "messages"]


# --- property ------------------------------------------------------------------------------------


def _nested(
    children: st.SearchStrategy[Any],
) -> st.SearchStrategy[Any]:
    """Lists and objects of ``children``: a named function, whose source hypothesis reads to
    check that it recurses (a lambda's can be misread: HypothesisDeprecationWarning)."""
    return st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    _nested,
    max_leaves=10,
)
RESERVED = {"model", "stream", "messages", "prompt", "input", *DROPPED}


@st.composite
def requests(draw: st.DrawFn) -> tuple[Kind, dict[str, Any]]:
    kind = draw(st.sampled_from(list(INPUTS)))
    obj = draw(st.dictionaries(st.text().filter(lambda k: k not in RESERVED), JSON, max_size=6))
    obj["model"] = draw(st.text(min_size=1))
    field, value = INPUTS[kind]
    obj[field] = value
    if draw(st.booleans()):
        obj["stream"] = draw(st.none() | st.booleans())
    order = draw(st.permutations(list(obj)))
    return kind, {key: obj[key] for key in order}


@settings(max_examples=100, deadline=None, database=None)
@given(request=requests(), ensure_ascii=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_any_object_with_a_string_model(
    request: tuple[Kind, dict[str, Any]], ensure_ascii: bool, indent: int | None
) -> None:
    kind, obj = request
    body = json.dumps(obj, ensure_ascii=ensure_ascii, indent=indent).encode()
    fields, model, stream = decode_request(body, kind)
    assert model == obj["model"]
    # Embeddings never stream, whatever the body says.
    assert stream is (bool(obj.get("stream")) and kind is not Kind.EMBEDDINGS)
    assert list(fields) == list(obj)
    assert json.loads(msgspec.json.encode(fields)) == obj
