"""Upstream credentials never come back: an upstream echoing what it was sent, in every form,
through the openai and anthropic providers, streamed and not (issue #9.6); an upstream's error
event ends a stream as exactly one error event (#10.8); an SSE error body is read (#10.7)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

import aioproxy_anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aioproxy.config import Secret
from aioproxy.context import Deployment
from aioproxy.failures import read_upstream_error
from aioproxy.testing import assert_openai_error
from tests.support import AUTH, MASTER_KEY, ServeProxy, sdk

SHORT_KEY = "k3Y9z"  # shorter than 8 characters
LONG_KEY = "sk-proj-Abc/def+ghi_jkl-0123456789"  # base64 alphabet characters, and a "/"
HEADER_TOKEN = "org-t0ken-xyz"
USER, PASSWORD = "svc", "p@ss:w0rd"  # in the api_base as svc:p%40ss%3Aw0rd@
SECRETS = [SHORT_KEY, LONG_KEY, HEADER_TOKEN, PASSWORD, f"{USER}:{PASSWORD}"]


def echoes(headers: Mapping[str, str]) -> str:
    """Every header value the upstream got, as sent and in every encoding an upstream may use:
    base64 alone and inside a larger base64 value (each alignment), URL- and JSON-encoded."""
    parts = []
    for name, value in headers.items():
        for shown in (value, value.split(" ", 1)[-1]):
            raw = shown.encode()
            parts += [shown, quote(shown, safe=""), json.dumps(shown)[1:-1]]
            for prefix in (b"", b"a", b"ab", f"{name}: ".encode()):
                parts.append(base64.b64encode(prefix + raw).decode())
                parts.append(base64.urlsafe_b64encode(prefix + raw).decode())
    return " | ".join(parts)


def recoverable(text: str, secret: str) -> bool:
    """Whether ``secret`` can be read back from ``text``: as it is, URL-decoded, or by decoding
    any run of base64 characters at any alignment."""
    if secret in text or secret in unquote(text):
        return True
    wanted = secret.encode()
    for run in re.findall(r"[A-Za-z0-9+/_-]{4,}", text):
        run = run.replace("-", "+").replace("_", "/")
        for shift in range(4):
            piece = run[shift:]
            piece = piece[: len(piece) - 1] if len(piece) % 4 == 1 else piece
            piece += "=" * (-len(piece) % 4)  # the end of a value: its padding is not needed
            try:
                if wanted in base64.b64decode(piece):
                    return True
            except ValueError:
                continue
    return False


def assert_masked(text: str) -> None:
    for secret in SECRETS:
        assert not recoverable(text, secret), f"{secret!r} is readable in {text[:300]!r}"


def test_recoverable_finds_every_echo() -> None:
    """The check itself: every echoed form of a secret is readable before masking."""
    text = echoes({"Authorization": f"Bearer {SHORT_KEY}", "X-Org": HEADER_TOKEN})
    assert recoverable(text, SHORT_KEY) and recoverable(text, HEADER_TOKEN)


CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
}


def openai_upstream(mode: str) -> web.Application:
    """An OpenAI-compatible upstream that fails, echoing its credentials: ``json`` a 500,
    ``sse-body`` a 500 whose body is an event stream, ``midstream`` an error event after a
    chunk (then it hangs up), ``first`` an error event first, with status 200."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        error = {
            "error": {
                "message": f"bad credentials: {echoes(request.headers)}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        if mode in ("json", "json-200"):
            return web.json_response(error, status=500 if mode == "json" else 200)
        if mode == "sse-body":
            body = f"data: {json.dumps(error)}\n\n".encode()
            return web.Response(body=body, status=500, content_type="text/event-stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if mode in ("midstream", "named"):
            await response.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
        if mode == "named":  # an event named "error", its data plain text
            await response.write(f"event: error\ndata: {error['error']['message']}\n\n".encode())
        else:
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        return response  # ends without [DONE]

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def models(base: str, provider: str = "openai") -> list[dict[str, Any]]:
    host = base.split("://", 1)[1]
    return [
        {
            "name": "keyed",
            "provider": provider,
            "model": "m",
            "api_base": f"http://{host}",
            "api_key": SHORT_KEY,
            "headers": {"X-Org-Token": HEADER_TOKEN},
        },
        {
            "name": "long",
            "provider": provider,
            "model": "m",
            "api_base": f"http://{host}",
            "api_key": LONG_KEY,
        },
        {
            "name": "basic",
            "provider": provider,
            "model": "m",
            "api_base": f"http://{USER}:{quote(PASSWORD, safe='')}@{host}",
        },
    ]


async def start(
    aiohttp_server: Any,
    serve_proxy: ServeProxy,
    upstream: web.Application,
    provider: str = "openai",
    plugins: tuple[object, ...] = (),
) -> TestServer:
    server = await aiohttp_server(upstream)
    config = {
        "auth": {"master_key": MASTER_KEY},
        "models": models(str(server.make_url("/v1")), provider),
        "router": {"num_retries": 0},
    }
    return await serve_proxy(config, plugins)


def sdk_error_text(exc: openai.APIError) -> str:
    return f"{exc} {exc.message} {json.dumps(exc.body)}"


@pytest.mark.parametrize("model", ["keyed", "long", "basic"])
@pytest.mark.parametrize("mode", ["json", "json-200", "sse-body", "midstream", "first", "named"])
async def test_openai_sdk_never_sees_a_credential(
    aiohttp_server: Any, serve_proxy: ServeProxy, model: str, mode: str
) -> None:
    proxy = await start(aiohttp_server, serve_proxy, openai_upstream(mode))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIError) as caught:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                stream=not mode.startswith("json"),
            )
            async for _ in stream:  # type: ignore[union-attr]
                pass
    text = sdk_error_text(caught.value)
    assert "bad credentials" in text  # the upstream's words are there, masked
    assert_masked(text)


async def test_an_sse_error_body_gives_its_message(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any
) -> None:
    """A 5xx whose body is an event stream: the client reads the error event's message, not
    the raw ``data: ...`` text (#10.7)."""
    proxy = await start(aiohttp_server, serve_proxy, openai_upstream("sse-body"))
    response = await http.post(
        proxy.make_url("/v1/chat/completions"), headers=AUTH, json={"model": "long", "messages": []}
    )
    error = await assert_openai_error(response, 500)
    assert error["message"].startswith("Deployment long (openai:m) answered 500: bad credentials")
    assert "data:" not in error["message"]


def test_read_upstream_error_of_an_sse_body() -> None:
    deployment = Deployment(name="d", provider="openai", model="m", api_key=Secret(LONG_KEY))
    body = (
        b'event: message\r\ndata: {"choices": []}\r\n\r\n'
        b'data: {"error": {"message": "overloaded", "code": "busy"}}\r\n\r\n'
    )
    error = read_upstream_error(503, body, deployment)
    assert (error.status, error.message, error.code) == (
        503,
        "Deployment d (openai:m) answered 503: overloaded",
        "busy",
    )


async def read_events(proxy: TestServer, http: Any, model: str) -> tuple[int, list[bytes]]:
    response = await http.post(
        proxy.make_url("/v1/chat/completions"),
        headers=AUTH,
        json={"model": model, "messages": [], "stream": True},
    )
    body = await response.read()
    return response.status, [event for event in body.split(b"\n\n") if event.strip()]


@pytest.mark.parametrize("mode", ["midstream", "named"])
async def test_a_mid_stream_error_event_is_the_one_last_event(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any, mode: str
) -> None:
    """The upstream's error event, then its hang-up: the client gets the chunk, one error
    event (masked), and nothing after it (#10.8)."""
    proxy = await start(aiohttp_server, serve_proxy, openai_upstream(mode))
    status, events = await read_events(proxy, http, "keyed")
    assert status == 200
    assert len(events) == 2, events
    assert json.loads(events[0][len(b"data: ") :]) == CHUNK
    error = json.loads(events[1][len(b"data: ") :])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith("Deployment keyed (openai:m) sent an error: bad credentials")
    assert_masked(events[1].decode())


async def test_an_error_event_first_is_an_error_status(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any
) -> None:
    """Before any event went out, the upstream's error event is an error answer with a status
    (so the router may retry it), not a 200 stream."""
    proxy = await start(aiohttp_server, serve_proxy, openai_upstream("first"))
    response = await http.post(
        proxy.make_url("/v1/chat/completions"),
        headers=AUTH,
        json={"model": "basic", "messages": [], "stream": True},
    )
    error = await assert_openai_error(response, 502)
    assert_masked(error["message"])


# -- the anthropic provider ------------------------------------------------------------------


def anthropic_upstream(stream: bool) -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        said = f"bad credentials: {echoes(request.headers)}"
        error = {"type": "error", "error": {"type": "api_error", "message": said}}
        if not stream:
            return web.json_response(error, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 1, "output_tokens": 0},
            },
        }
        await response.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
        await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


@pytest.mark.parametrize("model", ["keyed", "long", "basic"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_provider_never_passes_a_credential_on(
    aiohttp_server: Any, serve_proxy: ServeProxy, model: str, stream: bool
) -> None:
    proxy = await start(
        aiohttp_server,
        serve_proxy,
        anthropic_upstream(stream),
        provider="anthropic",
        plugins=(aioproxy_anthropic,),
    )
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIError) as caught:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=stream
            )
            if stream:
                async for _ in answer:  # type: ignore[union-attr]
                    pass
    text = sdk_error_text(caught.value)
    assert "bad credentials" in text
    assert_masked(text)


def test_mask_covers_every_form_and_spares_other_text() -> None:
    """The unit under the end-to-end tests: each secret of a deployment, in each form, masked
    wherever it stands; ordinary text (and a header value too short to be a secret) left as is."""
    deployment = Deployment(
        name="d",
        provider="openai",
        model="m",
        api_key=Secret(SHORT_KEY),
        api_base=f"https://{USER}:{quote(PASSWORD, safe='')}@example.test/v1",
        headers={"X-Org-Token": Secret(HEADER_TOKEN), "X-Flag": Secret("1")},
    )
    from aioproxy.failures import scrub, scrub_bytes

    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    text = echoes(
        {
            "Authorization": f"Bearer {SHORT_KEY}",
            "X-Org-Token": HEADER_TOKEN,
            "X-Basic": f"Basic {basic}",
            "X-Password": PASSWORD,
        }
    )
    assert_masked(scrub(text, deployment))
    assert_masked(scrub_bytes(text.encode(), deployment).decode())
    ordinary = "The model answered 1 + 1 = 2 in 0.5 s; retry later."
    assert scrub(ordinary, deployment) == ordinary


def passing_upstream(events: list[bytes], path: str) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(events))
        return response

    app = web.Application()
    app.router.add_post(path, handler)
    return app


async def test_events_that_only_mention_error_pass_untouched(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any
) -> None:
    """Model text about errors (and key-like words) is the answer: relayed byte for byte."""
    chunk = json.loads(json.dumps(CHUNK))
    chunk["choices"][0]["delta"]["content"] = 'raise KeyError("key_value_store error: sk-example")'
    events = [f"data: {json.dumps(chunk)}\n\n".encode(), b"data: [DONE]\n\n"]
    proxy = await start(
        aiohttp_server, serve_proxy, passing_upstream(events, "/v1/chat/completions")
    )
    status, got = await read_events(proxy, http, "long")
    assert status == 200
    assert [event + b"\n\n" for event in got] == events


async def test_a_responses_failure_is_relayed_masked(
    aiohttp_server: Any, serve_proxy: ServeProxy, http: Any
) -> None:
    """In the Responses API ``response.failed`` is the stream's own final event: it goes out as
    such (masked), and nothing follows it."""
    created = {
        "type": "response.created",
        "response": {"id": "r1", "status": "in_progress", "error": None},
    }
    failed = {
        "type": "response.failed",
        "response": {
            "id": "r1",
            "status": "failed",
            "error": {"code": "server_error", "message": f"upstream key {LONG_KEY} refused"},
        },
    }
    events = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (created, failed)]
    proxy = await start(aiohttp_server, serve_proxy, passing_upstream(events, "/v1/responses"))
    response = await http.post(
        proxy.make_url("/v1/responses"),
        headers=AUTH,
        json={"model": "long", "input": "hi", "stream": True},
    )
    body = await response.read()
    got = [event for event in body.split(b"\n\n") if event.strip()]
    assert got[0] + b"\n\n" == events[0]  # "error": null is no error
    assert len(got) == 2 and got[1].startswith(b"event: response.failed\n")
    message = json.loads(got[1].partition(b"data: ")[2])["response"]["error"]["message"]
    assert message == "upstream key *** refused"
