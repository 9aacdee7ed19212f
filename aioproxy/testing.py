"""Test kit for provider plugins: aioproxy before your fake upstream, checked as clients see it.

Each ``check_*`` sends real HTTP through the proxy, over the raw wire and with the ``openai`` SDK
(a test-time dependency), and asserts the OpenAI shapes; each ``assert_*`` checks one answer::

    from aioproxy.testing import (
        check_cancellation, check_chat, check_chat_stream, check_error_mapping, start_proxy,
    )

    async def test_my_provider(aiohttp_server, fake):  # fake: your fake upstream
        upstream = await aiohttp_server(fake.app())
        model = {"name": "m", "provider": "mine", "api_base": str(upstream.make_url("/"))}
        proxy = await start_proxy(aiohttp_server, {"models": [model]}, [aioproxy_mine])
        assert await check_chat(proxy, "m") == "the fake's answer"
        await check_chat_stream(proxy, "m")
        await check_error_mapping(proxy, "m", lambda: fake.fail_next(429), 429)
        await check_cancellation(proxy, "m", lambda: fake.in_flight)

Registered as a pytest plugin (entry point ``pytest11``), it also gives the ``aioproxy_server``
fixture: ``proxy = await aioproxy_server(config, [plugin])``, and runs ``async def`` tests and
fixtures with pytest-asyncio in auto mode unless the project chose a mode. ``pip install
'aioproxy[testing]'`` brings what it needs (pytest, pytest-aiohttp, pytest-asyncio, openai).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import importlib
import inspect
import math
import shutil
import struct
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .app import create_app
from .config import Config, parse_config
from .keys import gateway_key

if TYPE_CHECKING:
    import openai

__all__ = [
    "DONE_DATA",
    "HELLO",
    "KIT_KEY",
    "ProxyUnderTest",
    "StartProxy",
    "aioproxy_server",
    "assert_chat_chunks",
    "assert_chat_completion",
    "assert_completion",
    "assert_completion_chunks",
    "assert_embeddings",
    "assert_error_object",
    "assert_openai_error",
    "assert_response",
    "assert_response_events",
    "check_cancellation",
    "check_chat",
    "check_chat_stream",
    "check_completion",
    "check_embeddings",
    "check_error_mapping",
    "check_responses",
    "first_event",
    "parse_sse",
    "read_sse",
    "start_proxy",
]

KIT_KEY = "sk-aioproxy-testing"
DONE_DATA = "[DONE]"  # how read_sse gives the stream's closing `data: [DONE]`
HELLO: list[dict[str, Any]] = [{"role": "user", "content": "Say hello to the kit"}]

# What start_proxy adds under a config mapping's own values: a key to present, and no retries or
# cooldown, so that each client request makes exactly one upstream call and sees its error.
_KIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "auth": {"master_key": KIT_KEY},
    "router": {"num_retries": 0, "cooldown_seconds": 0},
}
_CHAT = "/v1/chat/completions"
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_FINAL_RESPONSE_STATUS = {"response.completed": "completed", "response.incomplete": "incomplete"}
_decode = msgspec.json.decode
_TIMEOUT = aiohttp.ClientTimeout(total=10)  # a hung provider fails its test instead of hanging it
_INSTALL = "pip install 'aioproxy[testing]'"  # what the kit needs, beyond aioproxy

Trigger = Callable[[], object]
"""Makes the fake upstream fail its next request; may return an awaitable."""


# -- the proxy under test ------------------------------------------------------------------------


class ProxyUnderTest:
    """A running proxy: its URLs, clients for it, and what it holds in flight."""

    def __init__(self, server: TestServer, api_key: str | None) -> None:
        self.server = server
        self.api_key = api_key

    @property
    def app(self) -> web.Application:
        """The aioproxy app being served."""
        return self.server.app

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header the proxy accepts (none when it is open)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str = "/v1") -> str:
        """The absolute URL of ``path`` on the proxy."""
        return str(self.server.make_url(path))

    def answer_models(self, model: str) -> frozenset[str]:
        """What an answer to ``model`` may name as its ``model``: that name, or the upstream id
        of one of its configured deployments."""
        table = self.app[gateway_key].table
        return frozenset({model, *(d.model for d in table.get(model, ()))})

    def openai(self, **options: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` on ``/v1`` that never retries; use it with ``async with``."""
        openai = _needs("openai")

        options = {"max_retries": 0, "timeout": 10.0, **options}
        return openai.AsyncOpenAI(base_url=self.url(), api_key=self.api_key or "unused", **options)

    def http(self) -> aiohttp.ClientSession:
        """A raw aiohttp session on the proxy's origin that sends the key; use ``async with``."""
        return aiohttp.ClientSession(base_url=self.url("/"), headers=self.headers, timeout=_TIMEOUT)

    def in_flight(self, model: str) -> int:
        """How many requests the proxy counts in flight on ``model``'s configured deployments."""
        gateway = self.app[gateway_key]
        return sum(gateway.router.health(d).in_flight for d in gateway.table.get(model, ()))


async def start_proxy(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    config: Mapping[str, Any] | Config,
    plugins: Iterable[object] = (),
) -> ProxyUnderTest:
    """Serve ``config`` with ``plugins`` on 127.0.0.1 (installed plugins are not loaded).

    A mapping (the TOML's shape) gets the kit's defaults under its own values: master key
    ``KIT_KEY``, no retries, no cooldown, and the Responses store in a temporary folder of its
    own, removed when the server closes. A :class:`~aioproxy.config.Config` is used as it is.
    """
    scratch: Path | None = None
    if not isinstance(config, Config):
        scratch = Path(tempfile.gettempdir(), f"aioproxy-testing-{uuid.uuid4().hex}")
        store = {"store_path": str(scratch / "responses.sqlite3")}  # made on first use
        merged = dict(config)
        for table, defaults in {**_KIT_DEFAULTS, "responses": store}.items():
            merged[table] = {**defaults, **config.get(table, {})}
        config = parse_config(merged, "<aioproxy.testing>")
    app = create_app(config, plugins=plugins, load_entrypoints=False)
    if scratch is not None:  # on_cleanup runs after cleanup_ctx, so after the store has closed
        app.on_cleanup.append(functools.partial(_remove_folder, scratch))
    return ProxyUnderTest(await aiohttp_server(app), config.auth.master_key)


async def _remove_folder(folder: Path, _app: web.Application) -> None:
    shutil.rmtree(folder, ignore_errors=True)


StartProxy = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
def aioproxy_server(aiohttp_server: Any) -> StartProxy:
    """``await aioproxy_server(config, plugins)``: :func:`start_proxy` on pytest-aiohttp."""

    async def start(
        config: Mapping[str, Any] | Config, plugins: Iterable[object] = ()
    ) -> ProxyUnderTest:
        return await start_proxy(aiohttp_server, config, plugins)

    return start


# -- reading streams -----------------------------------------------------------------------------

_COMMENT = object()


def _parse_event(block: str) -> Any:
    name, data = None, []
    for line in block.split("\n"):
        if line.startswith(":"):
            continue  # a comment, e.g. the proxy's keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        else:
            assert field in ("id", "retry"), f"unknown SSE line {line!r} in event {block!r}"
    if not data:
        assert name is None, f"event {name!r} has no data line"
        return _COMMENT
    payload = "\n".join(data)
    if payload == DONE_DATA:
        return DONE_DATA
    try:
        obj = _decode(payload)
    except msgspec.DecodeError:
        raise AssertionError(f"event data is not JSON: {payload[:300]!r}") from None
    if name is not None:
        kind = obj.get("type") if isinstance(obj, dict) else None
        assert kind == name, f"event named {name!r} carries data of type {kind!r}"
    return obj


def parse_sse(body: bytes) -> list[Any]:
    """Each event's data in an SSE body: decoded JSON, or ``DONE_DATA``; comments are skipped."""
    text = body.decode("utf-8")
    ended = not text or text.endswith("\n\n")
    assert ended, f"the stream does not end with a blank line: {text[-200:]!r}"
    events = (_parse_event(block) for block in text.split("\n\n")[:-1] if block)
    return [event for event in events if event is not _COMMENT]


async def read_sse(response: aiohttp.ClientResponse) -> list[Any]:
    """Read a 200 ``text/event-stream`` answer to its end, as :func:`parse_sse` gives it."""
    if response.status != 200:
        text = await response.text()
        raise AssertionError(f"expected a 200 stream, got {response.status}: {text}")
    assert response.content_type == "text/event-stream", f"stream sent as {response.content_type}"
    return parse_sse(await response.read())


async def first_event(response: aiohttp.ClientResponse) -> Any:
    """The data of a stream's first event (skipping comments), without waiting for the rest."""
    while True:
        block = await response.content.readuntil(b"\n\n")
        assert block.endswith(b"\n\n"), f"the stream ended before its first event: {block!r}"
        event = _parse_event(block.decode("utf-8")[:-2])
        if event is not _COMMENT:
            return event


# -- assertions ----------------------------------------------------------------------------------


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


def _no_error(obj: Any, where: str) -> None:
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


def assert_chat_completion(obj: Any, *, usage: bool = True, model: Models = None) -> str:
    """A whole ``chat.completion`` (dict or SDK object); returns choice 0's content.

    ``model`` (a name or names), if given, is what the answer's ``model`` must be.
    """
    body = _as_dict(obj)
    where = "the chat completion"
    _no_error(body, where)
    _expect(body, where, id=str, object="chat.completion", created=int, model=str)
    _check_model(body, where, model)
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
    body = _as_dict(obj)
    where = "the completion"
    _no_error(body, where)
    _expect(body, where, id=str, object="text_completion", created=int, model=str)
    _check_model(body, where, model)
    for i, choice in enumerate(_choices(body, where)):
        _expect(choice, f"{where} choices[{i}]", text=str)
    if usage:
        _check_usage(body.get("usage"), where, "prompt_tokens", "completion_tokens")
    return body["choices"][0]["text"]


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
        _no_error(last, where)
        _expect(last, where, choices=[], id=items[0].get("id"))
        _check_usage(last.get("usage"), where, "prompt_tokens", "completion_tokens")
    for n, chunk in enumerate(items):
        _no_error(chunk, f"chunk {n}")
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
    _no_error(body, where)
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
    _no_error(body, where)
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
        _no_error(event, f"event {n}")
        _expect(event, f"event {n}", type=str, sequence_number=int)
    numbers = [event["sequence_number"] for event in items]
    rising = numbers[0] == 0 and all(a < b for a, b in zip(numbers, numbers[1:]))
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


# -- checks: scenarios run through the proxy -----------------------------------------------------


async def _json_answer(response: aiohttp.ClientResponse) -> Any:
    text = await response.text()
    assert response.status == 200, f"status {response.status}: {text}"
    assert response.content_type == "application/json", f"answer sent as {response.content_type}"
    return _decode(text)


async def _post(proxy: ProxyUnderTest, path: str, body: dict[str, Any], stream: bool) -> Any:
    async with proxy.http() as http, http.post(path, json=body) as response:
        return await (read_sse(response) if stream else _json_answer(response))


async def check_chat(
    proxy: ProxyUnderTest, model: str, *, messages: list[dict[str, Any]] = HELLO, **params: Any
) -> str:
    """A chat completion, raw and through the SDK; returns the raw answer's content."""
    body = {"model": model, "messages": messages, **params}
    names = proxy.answer_models(model)
    text = assert_chat_completion(await _post(proxy, _CHAT, body, stream=False), model=names)
    async with proxy.openai() as client:
        assert_chat_completion(await client.chat.completions.create(**body), model=names)
    return text


async def check_chat_stream(
    proxy: ProxyUnderTest, model: str, *, messages: list[dict[str, Any]] = HELLO, **params: Any
) -> str:
    """A streamed chat completion, raw (with and without usage) and through the SDK.

    On the raw wire the stream must end with ``data: [DONE]``; with ``stream_options.include_usage``
    the usage chunk comes last. Returns the text of the raw stream without usage.
    """
    body = {"model": model, "messages": messages, "stream": True, **params}
    names = proxy.answer_models(model)
    text = assert_chat_chunks(await _post(proxy, _CHAT, body, stream=True), model=names)
    with_usage = {**body, "stream_options": {"include_usage": True}}
    chunks = await _post(proxy, _CHAT, with_usage, stream=True)
    assert_chat_chunks(chunks, usage=True, model=names)
    async with proxy.openai() as client:
        stream = await client.chat.completions.create(**body)
        assert_chat_chunks([chunk async for chunk in stream], done=False, model=names)
    return text


async def check_completion(
    proxy: ProxyUnderTest, model: str, *, prompt: str = "Say hello to the kit", **params: Any
) -> str:
    """A legacy completion, whole and streamed with usage; returns the whole answer's text."""
    body = {"model": model, "prompt": prompt, **params}
    names = proxy.answer_models(model)
    text = assert_completion(await _post(proxy, "/v1/completions", body, False), model=names)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = await _post(proxy, "/v1/completions", streamed, True)
    assert_completion_chunks(chunks, usage=True, model=names)
    return text


async def check_responses(
    proxy: ProxyUnderTest, model: str, *, input: Any = "Say hello to the kit", **params: Any
) -> str:
    """A Responses API call, whole and streamed, raw and through the SDK; returns the raw text."""
    body = {"model": model, "input": input, **params}
    names = proxy.answer_models(model)
    text = assert_response(await _post(proxy, "/v1/responses", body, False), model=names)
    events = await _post(proxy, "/v1/responses", {**body, "stream": True}, True)
    assert_response_events(events, model=names)
    async with proxy.openai() as client:
        assert_response(await client.responses.create(**body), model=names)
        stream = await client.responses.create(**body, stream=True)
        assert_response_events([event async for event in stream], model=names)
    return text


async def check_embeddings(
    proxy: ProxyUnderTest,
    model: str,
    *,
    inputs: Sequence[str] = ("hello", "kit"),
    dims: int | None = None,
) -> list[list[float]]:
    """Embeddings of ``inputs``: raw (floats, base64) and through the SDK; returns the vectors.

    The base64 answer must carry the float answer's vectors, as little-endian float32s.
    """
    body = {"model": model, "input": list(inputs)}
    n, names = len(inputs), proxy.answer_models(model)
    answer = await _post(proxy, "/v1/embeddings", body, False)
    vectors = assert_embeddings(answer, n, dims, model=names)
    dims = len(vectors[0]) if vectors else dims
    as_base64 = {**body, "encoding_format": "base64"}
    answer = await _post(proxy, "/v1/embeddings", as_base64, False)
    packed = assert_embeddings(answer, n, dims, base64=True, model=names)
    # Close, not equal: float32s, and an upstream need not give the same bits twice.
    same = all(
        math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)
        for vector, decoded in zip(vectors, packed)
        for a, b in zip(vector, decoded)
    )
    assert same, "the base64 answer's vectors are not the float answer's"
    async with proxy.openai() as client:  # asks for base64 and decodes it
        assert_embeddings(await client.embeddings.create(**body), n, dims, model=names)
    return vectors


async def _fire(trigger: Trigger) -> None:
    result = trigger()
    if inspect.isawaitable(result):
        await result


async def check_error_mapping(
    proxy: ProxyUnderTest,
    model: str,
    trigger: Trigger,
    status: int,
    *,
    code: str | None = None,
    stream: bool = True,
) -> dict[str, Any]:
    """Make the upstream fail and check that a chat client gets ``status`` as an OpenAI error.

    ``trigger()`` runs before each request (one each: plain, streamed, SDK). The streamed one
    fails before its first event, so it too gets ``status`` and a JSON error, not a 200 stream.
    Nothing may stay in flight. Returns the plain request's error object.
    """
    openai = _needs("openai")
    body = {"model": model, "messages": HELLO}
    async with proxy.http() as http:
        await _fire(trigger)
        async with http.post(_CHAT, json=body) as response:
            error = await assert_openai_error(response, status, code)
        if stream:
            await _fire(trigger)
            async with http.post(_CHAT, json={**body, "stream": True}) as response:
                await assert_openai_error(response, status, code)
    await _fire(trigger)
    async with proxy.openai() as client:
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(**body)
    await assert_openai_error(raised.value, status, code)
    assert proxy.in_flight(model) == 0, f"{proxy.in_flight(model)} request(s) left in flight"
    return error


async def _settle(count: Callable[[], int], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := count()) > 0:
        assert loop.time() < deadline, f"{left} {what} in flight {timeout} s after the client left"
        await asyncio.sleep(0.01)


async def check_cancellation(
    proxy: ProxyUnderTest,
    model: str,
    in_flight: Callable[[], int] | None = None,
    *,
    messages: list[dict[str, Any]] = HELLO,
    timeout: float = 1.0,
) -> None:
    """Leave a chat stream after its first event; ``in_flight()`` must reach 0 within ``timeout``.

    ``in_flight`` counts the fake upstream's open requests; without one (a provider with no
    upstream) the proxy's own count is watched. The stream must still be running when the client
    leaves, so make the fake upstream stream slowly (the check fails if it is already over).
    """
    count = in_flight or (lambda: proxy.in_flight(model))
    body = {"model": model, "messages": messages, "stream": True}
    async with proxy.http() as http:
        response = await http.post(_CHAT, json=body)
        try:
            assert response.status == 200, f"status {response.status}: {await response.text()}"
            _no_error(await first_event(response), "the first event")
            assert count() > 0, "the stream ended before the client left: make the upstream slower"
        finally:
            response.close()  # the client goes away mid-stream
    await _settle(count, timeout, "upstream request(s)")
    await _settle(lambda: proxy.in_flight(model), timeout, "proxy request(s)")


# -- pytest set-up -------------------------------------------------------------------------------


def _needs(module: str) -> Any:
    """Import a test-time dependency, saying how to install it when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"aioproxy.testing needs {module}: {_INSTALL}") from exc


def _configured(config: pytest.Config, name: str) -> bool:
    """Whether a configuration file or ``-o`` sets the ini value ``name``."""
    # pytest has no public way to ask: 9.x keeps file values and -o overrides in _inicfg (its
    # inicfg is deprecated), 8.x in inicfg and _override_ini.
    values = getattr(config, "_inicfg", None)
    if values is not None:
        return name in values
    overrides = getattr(config, "_override_ini", ())
    return name in config.inicfg or any(o.partition("=")[0] == name for o in overrides)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Run ``async def`` tests and fixtures with pytest-asyncio, on a loop per test.

    A project that set ``asyncio_mode`` (``--asyncio-mode``, ``-o`` or its configuration file)
    or ``asyncio_default_fixture_loop_scope`` keeps its choice; otherwise the kit picks ``auto``
    and ``function``, so that a plugin needs no pytest set-up of its own.
    """
    if not config.pluginmanager.hasplugin("asyncio"):
        return  # pytest-asyncio is not installed: pytest_runtest_setup says what to do
    if config.getoption("asyncio_mode", None) is None and not _configured(config, "asyncio_mode"):
        config.option.asyncio_mode = "auto"
    if not _configured(config, "asyncio_default_fixture_loop_scope"):
        # No public setter for an ini value: getini answers from this cache first.
        config._inicache["asyncio_default_fixture_loop_scope"] = "function"


# The fixtures that mark a test as one of the kit's (aiohttp_server under every kit proxy).
_KIT_FIXTURES = frozenset({"aioproxy_server", "aiohttp_server", "aiohttp_client"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a kit test that nothing will run as a coroutine with the fix, not pytest's riddle."""
    function = getattr(item, "obj", None)
    if not inspect.iscoroutinefunction(function):
        return
    fixtures = set(getattr(item, "fixturenames", ()))
    if not fixtures & _KIT_FIXTURES:
        return  # another project's async test, perhaps run by anyio or trio: not the kit's
    try:
        from pytest_asyncio import is_async_test
    except ImportError:
        pytest.fail(f"{item.nodeid}: pytest-asyncio is not installed: {_INSTALL}", pytrace=False)
    if not is_async_test(item):
        pytest.fail(
            f"{item.nodeid} is async but pytest-asyncio does not run it: asyncio_mode is "
            "'strict' here. aioproxy.testing picks 'auto' unless a project sets it; remove "
            "asyncio_mode from your pytest configuration (or set it to \"auto\"), or mark the "
            "test @pytest.mark.asyncio and its async fixtures @pytest_asyncio.fixture.",
            pytrace=False,
        )
