"""Hostile and malformed input (issue #4, item 8): every answer is a clear OpenAI error or a valid
answer, nothing crashes, nothing a client sends redirects or re-keys the upstream call, and the
proxy keeps serving afterwards. Ends with property-based tests over arbitrary bodies and headers."""

from __future__ import annotations

import asyncio
import json
import string
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aioproxy.testing import FakeOpenAI, assert_openai_error
from tests.support import (
    AUTH,
    CHAT,
    MASTER_KEY,
    MESSAGES,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    ServeProxy,
    gateway_config,
    sdk,
)

BODY = b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}'

# Endpoint path -> (required input field and a good value, the object a JSON answer has).
KINDS: dict[str, tuple[str, Any, str]] = {
    "/v1/chat/completions": ("messages", MESSAGES, "chat.completion"),
    "/v1/completions": ("prompt", "hi", "text_completion"),
    "/v1/embeddings": ("input", "hi", "list"),
    "/v1/responses": ("input", "hi", "response"),
}


@pytest.fixture
async def proxy(serve_proxy: ServeProxy, upstream_base: str) -> TestServer:
    """No retries (so one upstream request per call) and small limits, to reach them quickly.

    Keep-alive comments are off the table here (5 s): with them, whether a slow answer comes
    as JSON or as SSE depends on timing (see test_reliability's keep-alive tests)."""
    return await serve_proxy(
        gateway_config(
            upstream_base,
            router={"num_retries": 0},
            server={"max_body_size": 64 * 1024, "body_timeout": 0.3, "keepalive_interval": 5},
        )
    )


async def post(
    proxy: TestServer, data: bytes, path: str = CHAT, headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url(path),
            data=data,
            headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
        ) as response:
            return response, await response.read()


def error_of(status: int, content_type: str, raw: bytes) -> dict[str, Any]:
    """The OpenAI error object of an answer, checking its shape."""
    assert 400 <= status < 600, (status, raw[:300])
    assert content_type == "application/json", (status, content_type, raw[:300])
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert (status, error["code"]) != (500, "internal_error"), f"the proxy crashed: {error}"
    return error


def check_answer(path: str, status: int, content_type: str, raw: bytes) -> str:
    """Every answer is a valid success for its endpoint, or a valid OpenAI error: which one."""
    if status != 200:
        error_of(status, content_type, raw)
        return "error"
    expected = KINDS[path][2]
    if content_type == "application/json":
        body = json.loads(raw)
        assert isinstance(body, dict) and body.get("object") == expected, body
        return "json"
    assert content_type == "text/event-stream", content_type
    assert raw.endswith(b"\n\n"), raw[-200:]
    data = []
    for block in raw.decode().split("\n\n")[:-1]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keep-alive comment
        payloads = [line[6:] for line in lines if line.startswith("data: ")]
        assert len(payloads) == 1 and all(
            line.startswith(("data: ", "event: ")) for line in lines
        ), block
        data.append(payloads[0])
    assert data, raw
    last = data[-1]
    if last != "[DONE]":
        decoded = json.loads(last)
        if set(decoded) == {"error"}:  # an error event after the headers went out
            error_of(400, "application/json", last.encode())
            return "stream-error"
        assert path == "/v1/responses", last
        assert decoded["type"] in (
            "response.completed",
            "response.incomplete",
            "response.failed",
            "error",
        ), decoded
    for payload in data[:-1] if last == "[DONE]" else data:
        assert isinstance(json.loads(payload), dict)
    return "stream"


async def still_serving(proxy: TestServer) -> None:
    async with sdk(proxy) as client:
        done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert done.choices[0].message.content == "fake reply to: hi"


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"model": "gpt-\xff", "messages": []}',
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\xc3"}]}',
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\xf4\x90\x80\x80"}]}',
        b'{"model": "gpt-test", "\xfe\xff": 1, "messages": []}',
        rb'{"model": "gpt-test", "messages": [{"role": "user", "content": "\ud800"}]}',
        rb'{"model": "\udc00x", "messages": []}',
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "a\x00b"}]}',
        b"\xef\xbb\xbf" + BODY,  # a byte order mark
        b"\xff\xfe" + BODY.decode().encode("utf-16-le"),
    ],
    ids=[
        "model",
        "truncated",
        "overlong",
        "utf8-surrogate",
        "above-max",
        "key",
        "escaped-lone-high",
        "escaped-lone-low",
        "raw-nul",
        "bom",
        "utf-16",
    ],
)
async def test_invalid_text_is_a_400(proxy: TestServer, fake: FakeOpenAI, data: bytes) -> None:
    response, raw = await post(proxy, data)
    error = error_of(response.status, response.content_type, raw)
    assert response.status == 400 and error["code"] in ("invalid_encoding", "invalid_json"), error
    assert fake.requests == []
    await still_serving(proxy)


@pytest.mark.parametrize(
    "nested",
    [
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        b"[" * 50_000,  # and never closed
        b'[{"a":' * 3_000 + b"[]" + b"}]" * 3_000,
    ],
    ids=["arrays", "objects", "unclosed", "mixed"],
)
@pytest.mark.parametrize("field", ["messages", "metadata", "model"])
async def test_absurd_nesting_is_a_400(
    proxy: TestServer, fake: FakeOpenAI, nested: bytes, field: str
) -> None:
    body = b'{"model": "gpt-test", "messages": [], "' + field.encode() + b'": ' + nested + b"}"
    response, raw = await post(proxy, body)
    assert response.status == 400
    error_of(response.status, response.content_type, raw)
    assert fake.requests == []


async def test_nesting_near_the_limit_never_crashes_a_provider(proxy: TestServer) -> None:
    statuses = {}
    async with aiohttp.ClientSession() as http:
        for depth in range(880, 1000):
            body = b'{"model": "echo", "messages": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
            async with http.post(proxy.make_url(CHAT), data=body, headers=AUTH) as response:
                raw = await response.read()
                statuses[depth] = response.status
                assert response.status == 400, (depth, raw)
                error_of(response.status, response.content_type, raw)


async def test_reasonable_nesting_passes_through_untouched(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    nested = b'{"a":' * 200 + b"[1, 2.50, 1e3]" + b"}" * 200
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "metadata": '
    response, raw = await post(proxy, body + nested + b"}")
    assert response.status == 200, raw
    assert nested in fake.last.raw, "pass-through fields keep the client's exact bytes"


HUGE = [
    ("max_tokens", b"1e999999", None, None),
    ("max_tokens", b"1" + b"0" * 5000, None, None),
    ("temperature", b"-1e308", None, None),
    ("n", b"1e400", None, None),
    ("seed", b"-" + b"9" * 400, None, None),
    ("stream", b"1e999", 400, "stream"),
    ("model", b"1e999", 400, "model"),
]


@pytest.mark.parametrize(
    ("model", "field", "value", "status", "param"),
    [("gpt-test", *case) for case in HUGE] + [pytest.param("echo", *case) for case in HUGE],
)
async def test_huge_numbers(
    proxy: TestServer,
    fake: FakeOpenAI,
    field: str,
    value: bytes,
    status: int | None,
    param: str | None,
    model: str,
) -> None:
    body = (
        b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "hi"}]'
        b', "' + field.encode() + b'": ' + value + b"}"
    )
    if field == "model":
        body = b'{"messages": [], "model": ' + value + b"}"
    response, raw = await post(proxy, body)
    kind = check_answer(CHAT, response.status, response.content_type, raw)
    if status is not None:
        assert response.status == status and json.loads(raw)["error"]["param"] == param
        assert fake.requests == []
    elif model == "echo":
        # The echo reads max_tokens and n: a number it cannot use is a 400 naming it.
        assert kind == "json" or json.loads(raw)["error"]["param"] == field
    else:
        # Fields the proxy does not read go upstream as sent; the upstream judges them.
        assert value in fake.last.raw
    await still_serving(proxy)


WRONG_TYPES = [b'"yes"', b"1", b"0", b"[]", b"{}", b'"true"']


@pytest.mark.parametrize("value", WRONG_TYPES + [b"null"])
async def test_wrong_type_for_stream(proxy: TestServer, fake: FakeOpenAI, value: bytes) -> None:
    response, raw = await post(proxy, BODY[:-1] + b', "stream": ' + value + b"}")
    if value == b"null":  # null is "not set": a plain answer
        assert response.status == 200 and json.loads(raw)["object"] == "chat.completion"
        return
    error = error_of(response.status, response.content_type, raw)
    assert (response.status, error["param"], error["code"]) == (400, "stream", "invalid_type")
    assert fake.requests == []


@pytest.mark.parametrize("path", list(KINDS))
@pytest.mark.parametrize("value", [b"1", b"true", b"null", b"{}", b"1.5", b'{"role": "user"}'])
async def test_wrong_type_for_the_input(
    proxy: TestServer, fake: FakeOpenAI, path: str, value: bytes
) -> None:
    field = KINDS[path][0]
    body = b'{"model": "gpt-test", "' + field.encode() + b'": ' + value + b"}"
    response, raw = await post(proxy, body, path=path)
    error = error_of(response.status, response.content_type, raw)
    assert (response.status, error["param"], error["code"]) == (400, field, "invalid_type")
    assert fake.requests == []


@pytest.mark.parametrize("path", list(KINDS))
async def test_wrong_type_for_the_model(proxy: TestServer, path: str) -> None:
    for value in (b"1", b"[]", b"{}", b"null", b"true", b'""'):
        response, raw = await post(proxy, b'{"model": ' + value + b', "messages": []}', path=path)
        error = error_of(response.status, response.content_type, raw)
        assert (response.status, error["param"]) == (400, "model")


async def test_bodies_that_are_not_objects(proxy: TestServer, fake: FakeOpenAI) -> None:
    for data in (b"[]", b"null", b"1", b'"x"', b"true", b"{}", b"{", b"}", b" ", b"\n\n"):
        response, raw = await post(proxy, data)
        assert response.status == 400, data
        error_of(response.status, response.content_type, raw)
    assert fake.requests == []


async def test_duplicate_keys_last_one_wins_at_the_top_level(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    """Documented behaviour: the proxy splits the top level into fields, so a repeated key
    keeps its last value and reaches the upstream once; nested objects go upstream as sent."""
    response, raw = await post(
        proxy,
        b'{"model": "nope", "model": "gpt-test", '
        b'"messages": "not a list", '
        b'"messages": [{"role": "user", "content": "hi"}], '
        b'"stream": true, "stream": false, '
        b'"api_base": "http://evil.example", "api_base": "x", '
        b'"metadata": {"k": "1", "k": "2"}}',
    )
    assert response.status == 200 and json.loads(raw)["object"] == "chat.completion"
    sent = fake.last.raw
    assert sent.count(b'"model"') == 1 and fake.last.body["model"] == UPSTREAM_MODEL
    assert sent.count(b'"messages"') == 1 and fake.last.body["messages"] == MESSAGES
    assert sent.count(b'"stream"') == 1 and fake.last.body["stream"] is False
    assert b"api_base" not in sent and b"evil" not in sent
    assert b'{"k": "1", "k": "2"}' in sent

    # And the first value is never what counts.
    response, raw = await post(proxy, b'{"model": "gpt-test", "model": "nope", "messages": []}')
    assert response.status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    response, raw = await post(proxy, b'{"model": "gpt-test", "messages": [], "messages": 1}')
    assert response.status == 400 and json.loads(raw)["error"]["param"] == "messages"


async def test_escaped_dropped_fields_never_reach_the_upstream(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    # The deployment's upstream model is the name asked for, so nothing else forces a re-encode.
    config = gateway_config(upstream_base)
    config["models"][0].update(name="gpt-4o-mini", model=None)
    proxy = await serve_proxy(config)
    body = (
        rb'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
        rb'"api\u005fbase": "http://127.0.0.1:1/v1", "api\u005fkey": "sk-attacker", '
        rb'"base\u005furl": "http://127.0.0.1:1/v1", "extra\u005fheaders": {"x": "y"}}'
    )
    async with aiohttp.ClientSession() as http:
        url = str(proxy.make_url(CHAT))
        async with http.post(url, data=body, headers=AUTH) as response:
            assert response.status == 200, await response.text()
    for name in ("api_base", "api_key", "base_url", "extra_headers"):
        assert name not in fake.last.body, f"{name} reached the upstream"


async def test_escaped_duplicate_model_never_reaches_the_upstream(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    config = gateway_config(
        upstream_base, auth={"keys": [{"key": "sk-mini-only", "models": ["gpt-4o-mini"]}]}
    )
    config["models"][0].update(name="gpt-4o-mini", model=None)
    proxy = await serve_proxy(config)
    # The proxy authorises the last "model" (gpt-4o-mini); an upstream that keeps the first of
    # two keys would serve o1-pro on the proxy's key.
    body = (
        rb'{"model": "o1-pro", "mod\u0065l": "gpt-4o-mini", '
        rb'"messages": [{"role": "user", "content": "hi"}]}'
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url(CHAT),
            data=body,
            headers={"Authorization": "Bearer sk-mini-only", "Content-Type": "application/json"},
        ) as response:
            assert response.status == 200, await response.text()
    assert b"o1-pro" not in fake.last.raw, fake.last.raw


# -- sizes and speeds ------------------------------------------------------------------------


async def raw_request(proxy: TestServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; the first whole response (head and body)."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            while head.startswith(b"HTTP/1.1 1"):  # an interim 1xx answer
                head = await reader.readuntil(b"\r\n\r\n")
            lowered = head.lower()
            if b"content-length:" in lowered:
                length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            elif b"transfer-encoding: chunked" in lowered:
                body = await reader.readuntil(b"\r\n0\r\n\r\n")
            else:
                body = await reader.read()
            return head + body
    finally:
        writer.close()


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return int(status_line.split()[1]), headers, body


def request_bytes(
    headers: list[tuple[bytes, bytes]],
    body: bytes = BODY,
    path: bytes = b"/v1/chat/completions",
    method: bytes = b"POST",
) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Connection: close"]
    if not any(name.lower() == b"content-type" for name, _ in headers):
        lines.append(b"Content-Type: application/json")
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


HOST = (b"Host", b"proxy.test")
BEARER = (b"Authorization", b"Bearer " + MASTER_KEY.encode())


async def test_body_over_the_limit_is_413(proxy: TestServer, fake: FakeOpenAI) -> None:
    big = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "' + b"x" * 70_000
    response, raw = await post(proxy, big + b'"}]}')
    assert error_of(response.status, response.content_type, raw)["code"] == "request_too_large"
    assert response.status == 413

    # Chunked, with no length announced: the same, once the limit is crossed.
    chunks = b"".join(b"%x\r\n" % 8000 + b"x" * 8000 + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    answer = await raw_request(
        proxy,
        head
        + b"Authorization: Bearer "
        + MASTER_KEY.encode()
        + b"\r\nContent-Type: application/json"
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks,
    )
    status, headers, body = parse_response(answer)
    assert status == 413 and error_of(status, headers["content-type"], body)
    # Compressed bodies are refused unread: tests/e2e/test_ingress_security.py.
    assert fake.requests == []
    await still_serving(proxy)


async def test_slow_body_is_408_and_others_are_served_meanwhile(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:10]
    )

    async def dribble() -> None:
        for byte in BODY[10:]:
            await asyncio.sleep(0.05)  # the whole body would take 2.7 s
            writer.write(bytes([byte]))

    started = time.monotonic()
    dribbler = asyncio.create_task(dribble())
    try:
        await still_serving(proxy)  # the slow client holds nobody else up
        status_line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        elapsed = time.monotonic() - started
        length = int(status_line.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    finally:
        dribbler.cancel()
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408 "), status_line
    # A 408 is the body timeout's answer (a whole body gets a 200); not before body_timeout, a
    # lower bound that load cannot break.
    assert elapsed >= 0.25
    assert error_of(408, "application/json", body)["code"] == "request_timeout"
    assert len(fake.requests) == 1  # only the other client's
    await still_serving(proxy)


async def test_slow_body_before_authentication_is_a_401_at_once(proxy: TestServer) -> None:
    # The body never ends: had the proxy waited for it, the answer would be body_timeout's 408.
    answer = await raw_request(proxy, request_bytes([HOST], body=BODY)[:-20], timeout=30)
    status, headers, body = parse_response(answer)
    assert status == 401 and error_of(status, headers["content-type"], body)


# -- routes and methods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1",
        "/v1/",
        "/v2/chat/completions",
        "/v1/chat/completions/extra",
        "/v1/chat%2Fcompletions",
        "/v1/engines/davinci/completions",
        "/v1/models/",
        "/v1/../v1/secret",
        "/%00",
        "/" + "a" * 4000,
        "/v1/fine_tuning/jobs",
        "/admin",
    ],
)
async def test_unknown_routes_are_openai_404s(proxy: TestServer, path: str) -> None:
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "POST"):
            async with http.request(
                method, str(proxy.make_url("/")).rstrip("/") + path, headers=AUTH, data=BODY
            ) as response:
                error = await assert_openai_error(response, 404, "not_found")
                assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("PATCH", "/v1/embeddings", "POST"),
        ("OPTIONS", "/v1/responses", "POST"),
        ("GET", "/completions", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/v1/models/gpt-test", "GET"),
        ("POST", "/health", "GET"),
        ("PUT", "/health/readiness", "GET"),
    ],
)
async def test_wrong_methods_are_openai_405s(
    proxy: TestServer, method: str, path: str, allowed: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, proxy.make_url(path), headers=AUTH) as response:
            error = await assert_openai_error(response, 405, "method_not_allowed")
            assert allowed in response.headers["Allow"] and method in error["message"]


async def test_malformed_http_gets_a_400_and_the_proxy_keeps_serving(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    """Requests aiohttp's parser refuses never reach the app: aiohttp answers a plain-text 400
    itself (a known weakness: not the OpenAI error shape). What matters here: no crash."""
    cases = [
        request_bytes([HOST, BEARER, (b"X-Bad", b"a\x01b")]),
        request_bytes([HOST, BEARER, (b"Bad Name", b"x")]),
        request_bytes([HOST, BEARER, (b"X-Long", b"a" * 9000)]),
        request_bytes([HOST, BEARER], path=b"/" + b"a" * 9000),
        b"\x00\x01\x02garbage\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/chat/completions HTTP/9.9\r\n\r\n",
    ]
    for data in cases:
        status, _headers, body = parse_response(await raw_request(proxy, data))
        assert status == 400, (data[:60], status, body)
    assert fake.requests == []
    await still_serving(proxy)


# -- nothing the client sends redirects or re-keys the upstream call -----------------------


@pytest.fixture
async def attacker(aiohttp_server: Any) -> tuple[FakeOpenAI, str]:
    """Where a client would like the proxy's requests (and key) to go."""
    evil = FakeOpenAI()
    server = await aiohttp_server(evil.app())
    return evil, str(server.make_url("/v1"))


HOSTILE_HEADERS = {
    "Host": "evil.example",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Proto": "gopher",
    "X-Forwarded-Port": "1",
    "X-Real-IP": "6.6.6.6",
    "Forwarded": "for=6.6.6.6;host=evil.example;proto=http",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "api-key": "sk-attacker-header",
    "x-api-key": "sk-attacker-header",
    "OpenAI-Organization": "org-attacker",
    "OpenAI-Project": "proj-attacker",
    "X-Upstream-Base": "http://evil.example",
    "Proxy-Authorization": "Basic ZXZpbDpldmls",
    "Cookie": "session=attacker",
}


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        (path, stream)
        for path in KINDS
        for stream in (False, True)
        if not (stream and path == "/v1/embeddings")  # embeddings do not stream
    ],
)
async def test_client_cannot_redirect_or_rekey_the_upstream(
    proxy: TestServer,
    fake: FakeOpenAI,
    upstream: TestServer,
    attacker: tuple[FakeOpenAI, str],
    path: str,
    stream: bool,
) -> None:
    evil, evil_base = attacker
    field, value, _ = KINDS[path]
    body = {
        "model": "gpt-test",
        field: value,
        "api_base": evil_base,
        "base_url": evil_base,
        "api_key": "sk-attacker-body",
        "api_version": "2099-01-01",
        "organization": "org-attacker",
        "extra_headers": {"Authorization": "Bearer sk-attacker-body", "Host": "evil.example"},
    }
    if stream:
        body["stream"] = True
    headers = {**HOSTILE_HEADERS, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        url = str(proxy.make_url(path)) + "?api_base=" + evil_base + "&api-version=x&key=sk-q"
        async with http.post(url, data=json.dumps(body), headers={**AUTH, **headers}) as response:
            raw = await response.read()
            assert check_answer(path, response.status, response.content_type, raw) in (
                "json",
                "stream",
            )
    assert evil.requests == []
    (sent,) = fake.requests
    assert sent.path == path and sent.query == ""
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.headers["host"] == f"{upstream.host}:{upstream.port}"
    for name in HOSTILE_HEADERS:
        if name.lower() != "host":
            assert name.lower() not in sent.headers, name
    for name in ("api_base", "base_url", "api_key", "api_version", "organization", "extra_headers"):
        assert name not in sent.body, name
    everything = json.dumps(sent.headers) + sent.raw.decode()
    for word in ("attacker", "evil", MASTER_KEY, "6.6.6.6"):
        assert word not in everything, word


async def test_client_key_in_other_headers_is_never_forwarded(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """With virtual keys, the key a client presents (any of its three headers) stays here."""
    proxy = await serve_proxy(
        gateway_config(
            upstream_base,
            auth={"master_key": MASTER_KEY, "keys": [{"key": "sk-virtual-one", "name": "one"}]},
        )
    )
    async with aiohttp.ClientSession() as http:
        for header in (
            {"Authorization": "Bearer sk-virtual-one"},
            {"api-key": "sk-virtual-one"},
            {"x-api-key": "sk-virtual-one"},
        ):
            headers = {**header, "Content-Type": "application/json"}
            async with http.post(proxy.make_url(CHAT), data=BODY, headers=headers) as response:
                assert response.status == 200, await response.text()
            assert "sk-virtual-one" not in json.dumps(fake.last.headers)
            assert fake.last.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


# -- property-based --------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)


def _nested(
    inner: st.SearchStrategy[Any],
) -> st.SearchStrategy[Any]:
    """Lists and objects of ``inner``: a named function, whose source hypothesis reads to
    check that it recurses (a lambda's can be misread: HypothesisDeprecationWarning)."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON = st.recursive(
    SCALARS,
    _nested,
    max_leaves=12,
)
TEXT = st.text(min_size=1, max_size=30)
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "input_text", "image_url"]), "text": TEXT}
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer"]),
        "content": st.one_of(TEXT, TEXT, st.lists(PART, min_size=1, max_size=2)),
    },
    optional={"name": st.text(max_size=8)},
)
# Per input field: values that are mostly right, so that bodies get past validation.
INPUTS = {
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "prompt": TEXT
    | st.lists(TEXT, min_size=1, max_size=3)
    | st.lists(st.integers(0, 50000), min_size=1, max_size=5),
    "input": TEXT
    | st.lists(TEXT, min_size=1, max_size=3)
    | st.lists(MESSAGE, min_size=1, max_size=2),
}
# Optional fields, with values in range and out of it.
OPTIONAL = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(-2, 40),
    "max_completion_tokens": st.integers(-2, 40),
    "max_output_tokens": st.integers(-2, 40),
    "n": st.integers(0, 130),
    "dimensions": st.integers(0, 70000),
    "encoding_format": st.sampled_from(["float", "base64", "x"]),
    "temperature": st.floats(-1, 3, allow_nan=False),
    "user": st.text(max_size=10),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    "api_base": st.just("http://127.0.0.1:1/v1"),
    "api_key": st.just("sk-client"),
}
WILD_NAMES = st.sampled_from(
    [
        *INPUTS,
        *OPTIONAL,
        "model",
        "tools",
        "tool_choice",
        "instructions",
        "previous_response_id",
        "store",
    ]
) | st.text(max_size=8)


@st.composite
def plausible(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """A body for ``path`` that is nearly right, with at most one wild field."""
    field = KINDS[path][0]
    body: dict[str, Any] = {"model": draw(st.sampled_from(["gpt-test", "gpt-test", "echo"]))}
    body[field] = draw(INPUTS[field])
    if draw(st.booleans()):
        body["stream"] = True
    for name in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), max_size=3, unique=True)):
        body[name] = draw(OPTIONAL[name])
    if draw(st.booleans()):
        body[draw(WILD_NAMES)] = draw(JSON)
    return body


@pytest.fixture
async def served(proxy: TestServer) -> Any:
    """The proxy for a property test, checked to still serve once every example has run."""
    yield proxy
    await still_serving(proxy)


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(data=st.data(), path=st.sampled_from(list(KINDS)))
async def test_any_json_body_gets_a_valid_answer(
    served: TestServer, fake: FakeOpenAI, data: st.DataObject, path: str
) -> None:
    body = data.draw(st.one_of(plausible(path), plausible(path), plausible(path), JSON), "body")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            served.make_url(path),
            data=json.dumps(body),
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            raw = await response.read()
            event(
                f"{check_answer(path, response.status, response.content_type, raw)} "
                f"{response.status}"
            )
    assert fake.in_flight == 0


@PROPERTY
@given(
    data=st.binary(max_size=400)
    | st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            [
                b'{"model": "gpt-test", "messages": [',
                b'{"model": "echo", "prompt": ',
                b'{"model": "gpt-test", "stream": true, "input": "',
                b"{",
                b"[",
            ]
        ),
        st.binary(max_size=200),
    ),
    path=st.sampled_from(list(KINDS)),
)
async def test_any_bytes_get_a_valid_answer(served: TestServer, data: bytes, path: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            served.make_url(path), data=data, headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            raw = await response.read()
            check_answer(path, response.status, response.content_type, raw)


# What a header value may hold on the wire (RFC 9110 field-vchar, obs-text, SP and HTAB).
VALUE_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Framing headers are left out: a wrong Content-Length or Transfer-Encoding makes another request.
# So are Content-Type and Origin, which decide before the key does (test_ingress_security.py).
NAMES = st.sampled_from(
    [
        b"Authorization",
        b"Host",
        b"Accept",
        b"Accept-Encoding",
        b"api-key",
        b"x-api-key",
        b"x-request-id",
        b"openai-beta",
        b"X-Forwarded-Host",
        b"Forwarded",
        b"User-Agent",
        b"Cookie",
        b"Range",
        b"If-None-Match",
        b"Upgrade",
        b"TE",
    ]
) | st.text(TOKEN, min_size=1, max_size=20).map(str.encode).filter(
    lambda n: (
        n.lower()
        not in (
            b"content-length",
            b"transfer-encoding",
            b"connection",
            b"expect",
            b"content-encoding",
            b"content-type",
            b"origin",
        )
    )
)
VALUES = st.lists(st.sampled_from(VALUE_BYTES), max_size=60).map(bytes)


@PROPERTY
@given(
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6, unique_by=lambda h: h[0].lower()),
    keyed=st.booleans(),
)
async def test_any_header_values_get_a_valid_answer(
    served: TestServer, fake: FakeOpenAI, headers: list[tuple[bytes, bytes]], keyed: bool
) -> None:
    names = {name.lower() for name, _ in headers}
    sent = ([HOST] if b"host" not in names else []) + ([BEARER] if keyed else []) + headers
    answer = await raw_request(served, request_bytes(sent), timeout=10)
    status, response_headers, body = parse_response(answer)
    # Whatever else came along, the key decides (the first Authorization header is ours).
    assert status == (200 if keyed else 401), (status, body)
    if status == 200:
        assert json.loads(body)["choices"][0]["message"]["content"] == "fake reply to: hi"
        assert fake.last.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    else:
        error_of(status, response_headers.get("content-type", ""), body)
