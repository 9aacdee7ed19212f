"""Checks: scenarios run through the proxy, over the raw wire and with the ``openai`` SDK."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import msgspec
import pytest

from .assertions import (
    assert_chat_chunks,
    assert_chat_completion,
    assert_completion,
    assert_completion_chunks,
    assert_embeddings,
    assert_openai_error,
    assert_response,
    assert_response_events,
    no_error,
)
from .proxy import ProxyUnderTest, needs
from .sse import first_event, read_sse
from .waiting import eventually

HELLO: list[dict[str, Any]] = [{"role": "user", "content": "Say hello to the kit"}]


def weather_tool(**schema: Any) -> dict[str, Any]:
    """A chat ``tools`` entry, ``get_weather`` of a ``city``, for tests of tool translation;
    ``schema`` adds JSON Schema keywords to its parameters' (or replaces them: ``properties``)."""
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, **schema}
    function = {"name": "get_weather", "description": "The weather in a city"}
    return {"type": "function", "function": {**function, "parameters": parameters}}


# A real image (a 1x1 PNG) in base64, for a test of image parts: "data:image/png;base64," + it.
PNG_PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)
_CHAT = "/v1/chat/completions"
_decode = msgspec.json.decode

Trigger = Callable[[], object]
"""Makes the fake upstream fail its next request; may return an awaitable."""


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


async def _whole_and_streamed(
    proxy: ProxyUnderTest,
    path: str,
    body: dict[str, Any],
    assert_whole: Callable[..., str],
    assert_stream: Callable[..., object],
    **stream_fields: Any,
) -> str:
    """``body`` answered whole and streamed (with ``stream_fields``), each checked; the whole
    answer's text."""
    names = proxy.answer_models(body["model"])
    text = assert_whole(await _post(proxy, path, body, stream=False), model=names)
    streamed = {**body, "stream": True, **stream_fields}
    assert_stream(await _post(proxy, path, streamed, stream=True), model=names)
    return text


async def check_completion(
    proxy: ProxyUnderTest, model: str, *, prompt: str = "Say hello to the kit", **params: Any
) -> str:
    """A legacy completion, whole and streamed with usage; returns the whole answer's text."""
    body = {"model": model, "prompt": prompt, **params}
    with_usage = functools.partial(assert_completion_chunks, usage=True)
    include_usage = {"include_usage": True}
    return await _whole_and_streamed(
        proxy, "/v1/completions", body, assert_completion, with_usage, stream_options=include_usage
    )


async def check_responses(
    proxy: ProxyUnderTest, model: str, *, input: Any = "Say hello to the kit", **params: Any
) -> str:
    """A Responses API call, whole and streamed, raw and through the SDK; returns the raw text."""
    body = {"model": model, "input": input, **params}
    path = "/v1/responses"
    text = await _whole_and_streamed(proxy, path, body, assert_response, assert_response_events)
    names = proxy.answer_models(model)
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
    body: dict[str, Any] = {"model": model, "input": list(inputs)}
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
    openai = needs("openai")
    body: dict[str, Any] = {"model": model, "messages": HELLO}
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
            no_error(await first_event(response), "the first event")
            assert count() > 0, "the stream ended before the client left: make the upstream slower"
        finally:
            response.close()  # the client goes away mid-stream
    left = f"in flight {timeout} s after the client left"
    await eventually(lambda: count() == 0, within=timeout, what=f"upstream request(s) {left}")
    await eventually(
        lambda: proxy.in_flight(model) == 0, within=timeout, what=f"proxy request(s) {left}"
    )
