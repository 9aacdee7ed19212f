"""Assertions on one answer (a dict from the raw wire or an ``openai`` SDK object): the OpenAI
shapes of chat completions, completions, embeddings, Responses and errors."""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import pairwise
from typing import Any

import aiohttp
import msgspec

from .sse import DONE_DATA

_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_FINAL_RESPONSE_STATUS = {"response.completed": "completed", "response.incomplete": "incomplete"}
_decode = msgspec.json.decode


def _as_dict(obj: Any) -> Any:
    """An openai SDK object as the JSON it was parsed from; dicts and DONE_DATA as they are."""
    to_dict = getattr(obj, "to_dict", None)
    return _integral(to_dict(mode="json", warnings=False)) if to_dict is not None else obj


def _integral(value: Any) -> Any:
    # The SDK turns ints into floats where its models say float (Response.created_at): undo it.
    # The raw wire is checked as it is.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def no_error(obj: Any, where: str) -> None:
    assert isinstance(obj, Mapping), f"{where} is {obj!r}, not a JSON object"
    assert set(obj) != {"error"}, f"{where} is an error: {obj['error']}"
    assert obj.get("type") != "error", f"{where} is an error event: {obj}"


def _expect(obj: Mapping[str, Any], where: str, **fields: Any) -> None:
    """Each field is there and is of the given type (a class) or equal to the given value."""
    for name, expected in fields.items():
        assert name in obj, f"{where} has no {name!r}: {obj}"
        value = obj[name]
        if isinstance(expected, type):
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            assert ok, f"{where}: {name} is {value!r}, expected a {expected.__name__}"
        else:
            assert value == expected, f"{where}: {name} is {value!r}, expected {expected!r}"


Models = str | Collection[str] | None
"""What an answer may name as its ``model`` (see :meth:`ProxyUnderTest.answer_models`); None:
any string."""


def _check_model(obj: Mapping[str, Any], where: str, model: Models) -> None:
    if model is None:
        return
    allowed = {model} if isinstance(model, str) else set(model)
    assert obj.get("model") in allowed, (
        f"{where}: model is {obj.get('model')!r}, expected the requested name or a deployment's "
        f"upstream id: {sorted(allowed)}"
    )


def _check_usage(usage: Any, where: str, input_key: str, output_key: str) -> None:
    assert isinstance(usage, Mapping), f"{where}: usage is {usage!r}, expected an object"
    for key in (input_key, output_key, "total_tokens"):
        value = usage.get(key)
        assert isinstance(value, int) and value >= 0, f"{where}: usage.{key} is {value!r}"
    total = usage[input_key] + usage[output_key]
    assert usage["total_tokens"] == total, f"{where}: total_tokens is not {input_key}+{output_key}"


def _choices(body: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    choices = body.get("choices")
    assert isinstance(choices, list) and choices, f"{where}: choices is {choices!r}"
    for i, choice in enumerate(choices):
        _expect(choice, f"{where} choices[{i}]", index=i)
        finish = choice.get("finish_reason")
        assert finish in _FINISH_REASONS, f"{where} choices[{i}]: finish_reason is {finish!r}"
    return choices


def _answer(obj: Any, where: str, kind: str, model: Models) -> Any:
    """A whole answer of ``object`` ``kind``, as a dict: no error, its id, created and model."""
    body = _as_dict(obj)
    no_error(body, where)
    _expect(body, where, id=str, object=kind, created=int, model=str)
    _check_model(body, where, model)
    return body


def assert_chat_completion(obj: Any, *, usage: bool = True, model: Models = None) -> str:
    """A whole ``chat.completion`` (dict or SDK object); returns choice 0's content.

    ``model`` (a name or names), if given, is what the answer's ``model`` must be.
    """
    where = "the chat completion"
    body = _answer(obj, where, "chat.completion", model)
    for i, choice in enumerate(_choices(body, where)):
        message = choice.get("message")
        assert isinstance(message, Mapping), f"{where} choices[{i}]: message is {message!r}"
        _expect(message, f"{where} choices[{i}].message", role="assistant")
        content = message.get("content")
        if content is None:
            assert message.get("tool_calls") or message.get("refusal"), f"{where}: empty message"
        else:
            assert isinstance(content, str), f"{where} choices[{i}]: content is {content!r}"
    if usage:
        _check_usage(body.get("usage"), where, "prompt_tokens", "completion_tokens")
    return body["choices"][0]["message"].get("content") or ""


def assert_completion(obj: Any, *, usage: bool = True, model: Models = None) -> str:
    """A whole legacy ``text_completion``; returns choice 0's text."""
    where = "the completion"
    body = _answer(obj, where, "text_completion", model)
    for i, choice in enumerate(_choices(body, where)):
        _expect(choice, f"{where} choices[{i}]", text=str)
    if usage:
        _check_usage(body.get("usage"), where, "prompt_tokens", "completion_tokens")
    text: str = body["choices"][0]["text"]
    return text


def _chunks(chunks: Sequence[Any], usage: bool, done: bool) -> list[Any]:
    """The content chunks of a stream, having checked its [DONE] and its usage chunk."""
    items = [_as_dict(chunk) for chunk in chunks]
    if done:
        assert items and items[-1] == DONE_DATA, f"the stream's end is not [DONE]: {items[-1:]}"
        items.pop()
    assert DONE_DATA not in items, "[DONE] comes before the end of the stream"
    last = items.pop() if usage and items else None
    assert items, "the stream has no chunks"
    if usage:
        where = "the last chunk (usage was asked for)"
        assert last is not None
        no_error(last, where)
        _expect(last, where, choices=[], id=items[0].get("id"))
        _check_usage(last.get("usage"), where, "prompt_tokens", "completion_tokens")
    for n, chunk in enumerate(items):
        no_error(chunk, f"chunk {n}")
        assert chunk.get("usage") is None, f"chunk {n} has usage; only a last usage chunk may"
        assert chunk.get("choices"), f"chunk {n} has no choices; only a last usage chunk may"
        assert chunk.get("id") == items[0].get("id"), f"chunk {n} has another id than chunk 0"
    return items


def _assemble(chunks: list[Any], text_of: Callable[[Mapping[str, Any], str], Any]) -> str:
    """Per choice index: its text, checking that exactly one finish_reason ends it."""
    texts: dict[int, str] = {}
    finished: set[int] = set()
    for n, chunk in enumerate(chunks):
        for choice in chunk["choices"]:
            index = choice.get("index")
            where = f"chunk {n} choice {index}"
            assert isinstance(index, int), f"chunk {n}: a choice has index {index!r}"
            assert index not in finished, f"{where} comes after that choice's finish_reason"
            text = text_of(choice, where)
            assert text is None or isinstance(text, str), f"{where}: text is {text!r}"
            texts[index] = texts.get(index, "") + (text or "")
            finish = choice.get("finish_reason")
            if finish is not None:
                assert finish in _FINISH_REASONS, f"{where}: finish_reason is {finish!r}"
                finished.add(index)
    assert sorted(texts) == list(range(len(texts))), f"choice indexes {sorted(texts)}"
    missing = set(texts) - finished
    assert not missing, f"choice(s) {sorted(missing)} never got a finish_reason"
    return texts[0]


def assert_chat_chunk(obj: Any, *, model: Models = None) -> None:
    """One ``chat.completion.chunk`` on its own (:func:`assert_chat_chunks` checks a stream): its
    fields, each choice's index and delta, or ``choices: []`` and the usage of a usage chunk."""
    chunk = _as_dict(obj)
    no_error(chunk, "the chunk")
    _expect(chunk, "the chunk", id=str, object="chat.completion.chunk", created=int, model=str)
    _check_model(chunk, "the chunk", model)
    choices = chunk.get("choices")
    assert isinstance(choices, list), f"the chunk: choices is {choices!r}"
    if not choices:
        _check_usage(chunk.get("usage"), "the usage chunk", "prompt_tokens", "completion_tokens")
    for i, choice in enumerate(choices):
        where = f"the chunk's choices[{i}]"
        _expect(choice, where, index=int)
        assert isinstance(choice.get("delta"), Mapping), (
            f"{where}: delta is {choice.get('delta')!r}"
        )
        finish = choice.get("finish_reason")
        assert finish is None or finish in _FINISH_REASONS, f"{where}: finish_reason is {finish!r}"


def assert_chat_chunks(
    chunks: Sequence[Any], *, usage: bool = False, done: bool = True, model: Models = None
) -> str:
    """A ``chat.completion.chunk`` stream; returns choice 0's text.

    Each choice's first chunk alone has ``role: "assistant"``, then content deltas, and exactly
    one ``finish_reason``. With ``usage`` the last chunk has ``choices: []`` and the usage (no
    other chunk has usage). ``chunks`` as :func:`read_sse` gives them end with ``DONE_DATA``; pass
    ``done=False`` for the SDK's chunk objects (it drops [DONE]). ``model``: as
    :func:`assert_chat_completion`, for every chunk.
    """
    items = _chunks(chunks, usage, done)
    roles: set[int] = set()

    def text_of(choice: Mapping[str, Any], where: str) -> Any:
        delta = choice.get("delta")
        assert isinstance(delta, Mapping), f"{where}: delta is {delta!r}"
        if delta.get("role") is not None:
            assert delta["role"] == "assistant", f"{where}: role is {delta['role']!r}"
            assert choice["index"] not in roles, f"{where} sends the role again"
            roles.add(choice["index"])
        assert choice["index"] in roles, f"{where} comes before that choice's role"
        return delta.get("content")

    for n, chunk in enumerate(items):
        _expect(chunk, f"chunk {n}", id=str, object="chat.completion.chunk", created=int, model=str)
        _check_model(chunk, f"chunk {n}", model)
    return _assemble(items, text_of)


def assert_completion_chunks(
    chunks: Sequence[Any], *, usage: bool = False, done: bool = True, model: Models = None
) -> str:
    """A legacy ``text_completion`` stream, as :func:`assert_chat_chunks` (without roles)."""
    items = _chunks(chunks, usage, done)
    for n, chunk in enumerate(items):
        _expect(chunk, f"chunk {n}", id=str, object="text_completion", created=int, model=str)
        _check_model(chunk, f"chunk {n}", model)
    return _assemble(items, lambda choice, where: choice.get("text"))


def _float32s(text: str, where: str) -> list[float]:
    """A base64 embedding as OpenAI sends it: packed little-endian float32s."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AssertionError(f"{where}: embedding is not base64: {text[:60]!r}") from None
    assert raw and len(raw) % 4 == 0, f"{where}: {len(raw)} bytes is not a whole number of float32s"
    values = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert all(map(math.isfinite, values)), f"{where}: not little-endian float32s (NaN or inf)"
    return values


def assert_embeddings(
    obj: Any, n: int, dims: int | None, *, base64: bool = False, model: Models = None
) -> list[list[float]]:
    """An embeddings ``list`` of ``n`` vectors of ``dims`` floats (any one size if None).

    Each vector is a list of numbers, or with ``base64`` (the request's ``encoding_format:
    "base64"``, which the ``openai`` SDK sends by default and decodes itself) a base64 string
    of little-endian float32s. ``model``: as :func:`assert_chat_completion`.
    """
    body = _as_dict(obj)
    where = "the embeddings"
    no_error(body, where)
    _expect(body, where, object="list", model=str, data=list)
    _check_model(body, where, model)
    assert len(body["data"]) == n, f"{where}: {len(body['data'])} vectors, expected {n}"
    vectors = []
    for i, item in enumerate(body["data"]):
        at = f"{where} data[{i}]"
        _expect(item, at, object="embedding", index=i)
        vector = item.get("embedding")
        if base64:
            assert isinstance(vector, str), f"{at}: embedding is not a base64 string (asked for)"
            vector = _float32s(vector, at)
        assert isinstance(vector, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
        ), f"{at}: embedding is not a list of numbers"
        vectors.append(vector)
    sizes = {len(vector) for vector in vectors}
    expected = {dims} if dims is not None else set(list(sizes)[:1])
    assert sizes <= expected, f"{where}: vectors of {sorted(sizes)} floats, expected {dims}"
    usage = body.get("usage")
    assert isinstance(usage, Mapping), f"{where}: usage is {usage!r}"
    for key in ("prompt_tokens", "total_tokens"):
        assert isinstance(usage.get(key), int), f"{where}: usage.{key} is {usage.get(key)!r}"
    return vectors


def assert_response(obj: Any, *, status: str = "completed", model: Models = None) -> str:
    """A Responses API ``response`` with ``status``; returns its output text."""
    body = _as_dict(obj)
    where = "the response"
    no_error(body, where)
    _expect(body, where, id=str, object="response", created_at=int, model=str, status=status)
    _check_model(body, where, model)
    output = body.get("output")
    assert isinstance(output, list), f"{where}: output is {output!r}"
    texts = []
    for i, item in enumerate(output):
        _expect(item, f"{where} output[{i}]", type=str)
        if item["type"] != "message":
            continue
        _expect(item, f"{where} output[{i}]", id=str, role="assistant", content=list)
        for j, part in enumerate(item["content"]):
            _expect(part, f"{where} output[{i}].content[{j}]", type=str)
            if part["type"] == "output_text":
                _expect(part, f"{where} output[{i}].content[{j}]", text=str)
                texts.append(part["text"])
    if status in ("completed", "incomplete"):
        _check_usage(body.get("usage"), where, "input_tokens", "output_tokens")
    return "".join(texts)


def assert_response_events(
    events: Sequence[Any], *, final: str = "response.completed", model: Models = None
) -> str:
    """A Responses API event stream; returns the text its deltas add up to.

    ``sequence_number`` rises from 0; ``response.created`` comes first and ``final`` last, whose
    response passes :func:`assert_response`; each text part's deltas add up to its ``done`` text.
    There is no [DONE] in this API.
    """
    items = [_as_dict(event) for event in events]
    assert items, "the stream has no events"
    assert DONE_DATA not in items, "a Responses API stream ends with its final event, not [DONE]"
    for n, event in enumerate(items):
        no_error(event, f"event {n}")
        _expect(event, f"event {n}", type=str, sequence_number=int)
    numbers = [event["sequence_number"] for event in items]
    rising = numbers[0] == 0 and all(a < b for a, b in pairwise(numbers))
    assert rising, f"sequence numbers do not rise from 0: {numbers}"
    types = [event["type"] for event in items]
    assert types[0] == "response.created", f"the first event is {types[0]}"
    assert types[-1] == final and types.count(final) == 1, f"{final} is not last, once: {types}"
    deltas: dict[tuple[Any, Any], str] = {}
    for event in items:
        key = (event.get("item_id"), event.get("content_index"))
        if event["type"] == "response.output_text.delta":
            deltas[key] = deltas.get(key, "") + event["delta"]
        elif event["type"] == "response.output_text.done":
            assert event["text"] == deltas.get(key, ""), f"{key}: deltas do not add up to the text"
    created, last = items[0]["response"], items[-1]["response"]
    assert created["id"] == last["id"], "response.created and the final event differ in id"
    text = "".join(deltas.values())
    status = _FINAL_RESPONSE_STATUS.get(final, last.get("status"))
    final_text = assert_response(last, status=status, model=model)
    _check_model(created, "response.created", model)
    assert final_text == text, f"the final response's text {final_text!r} is not {text!r}"
    return text


def text_response_event_types(deltas: int, final: str = "response.completed") -> list[str]:
    """The event types, in order, of a Responses stream answering one text message in ``deltas``
    text deltas: what a check of the exact sequence compares against."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]


def assert_error_object(body: Any, code: str | None = None) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}`` (with ``code`` if given); returns the error."""
    assert isinstance(body, Mapping) and set(body) == {"error"}, f"not an error object: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], f"no message: {error}"
    assert isinstance(error["type"], str) and error["type"], f"no type: {error}"
    assert error["param"] is None or isinstance(error["param"], str), f"param: {error}"
    assert error["code"] is None or isinstance(error["code"], str), f"code: {error}"
    if code is not None:
        assert error["code"] == code, f"error code is {error['code']!r}, expected {code!r}: {error}"
    return error


async def assert_openai_error(
    response: Any, status: int, code: str | None = None
) -> dict[str, Any]:
    """An aiohttp response or ``openai.APIStatusError`` is an OpenAI error with ``status``."""
    if isinstance(response, aiohttp.ClientResponse):
        text = await response.text()
        assert response.status == status, f"status {response.status}, expected {status}: {text}"
        assert response.content_type == "application/json", f"error sent as {response.content_type}"
        body = _decode(text)
    else:
        assert response.status_code == status, f"status {response.status_code}, expected {status}"
        body = response.response.json()
    return assert_error_object(body, code)
