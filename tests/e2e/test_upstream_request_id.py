"""The upstream's own request id is kept only when sane (the client id's rule: 1-128 printable
ASCII characters) and not a key: an upstream's header bytes, sent raw by a fake on 127.0.0.1,
never reach the access log, traces or hooks as sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest

from aioproxy import Call, Outcome, hookimpl
from aioproxy.testing import assert_openai_error
from tests.support import ServeProxy, gateway_config, sdk

_ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
AZURE_LIKE_KEY = "0123456789abcdef0123456789abcdef"  # an upstream key that looks like no key


class RawUpstream:
    """Answers every request with one chat completion and the header lines it is given, as bytes."""

    def __init__(self) -> None:
        self.header: bytes = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n" % len(_ANSWER)
            + self.header
            + b"\r\n\r\n"
            + _ANSWER
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, str]]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"x-request-id: req_0123abc", "req_0123abc"),
        (b"request-id: req_011CV", "req_011CV"),  # Anthropic's
        (b"x-amzn-RequestId: 5f1e-42", "5f1e-42"),  # AWS's
        (b"x-request-id: " + b"x" * 128, "x" * 128),
        (b"x-request-id: " + b"x" * 129, None),
        (b"x-request-id: " + b"y" * 8000, None),
        (b"x-request-id: a\x01b", None),  # a control character
        (b"x-request-id: a\x1b[31mred", None),  # a terminal escape, for whoever reads the log
        (b"x-request-id: caf\xc3\xa9", None),  # not ASCII
        (b"x-request-id: sk-proj-0123456789abcdef", None),  # key-like
        (b"x-request-id: eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", None),  # a JWT
        (b"x-request-id: req-" + AZURE_LIKE_KEY.encode(), None),  # the deployment's own key
    ],
    ids=[
        "sane",
        "anthropic",
        "aws",
        "128",
        "129",
        "8000",
        "control",
        "escape",
        "non-ascii",
        "key-like",
        "jwt",
        "deployment-key",
    ],
)
async def test_only_a_sane_upstream_id_is_kept(
    serve_proxy: ServeProxy,
    raw_upstream: tuple[RawUpstream, str],
    header: bytes,
    kept: str | None,
) -> None:
    upstream, base = raw_upstream
    upstream.header = header
    seen: list[str | None] = []

    class Record:
        @hookimpl
        def after_response(self, call: Call, outcome: Outcome) -> None:
            seen.append(call.upstream_request_id)

    config = gateway_config(base)
    config["models"][0]["api_key"] = AZURE_LIKE_KEY
    proxy = await serve_proxy(config, plugins=[Record()])
    async with sdk(proxy) as client:
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content == "hi"
    assert seen == [kept]


async def test_a_megabyte_id_is_a_bad_gateway_and_the_proxy_serves_on(
    serve_proxy: ServeProxy, raw_upstream: tuple[RawUpstream, str]
) -> None:
    """Header fields past the HTTP parser's limit make no answer at all: a 502, not a crash."""
    upstream, base = raw_upstream
    upstream.header = b"x-request-id: " + b"z" * 1_000_000
    proxy = await serve_proxy(gateway_config(base))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}]
            )
        await assert_openai_error(caught.value, 502)
        upstream.header = b"x-request-id: req_1"
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert reply.choices[0].message.content == "hi"
