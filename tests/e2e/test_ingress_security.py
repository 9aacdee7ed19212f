"""What a request must be before the proxy reads it (issue #9, items 2, 9 and 10).

Compressed bodies are refused unread and never inflated, not even while aiohttp drains a refused
request; bodies must be JSON (a web page can send text/plain or a form without a preflight); an
open proxy answers only its own host names (DNS rebinding); cross-site browser requests are
refused unless ``[server] cors_origins`` allows them; and ``forward_headers`` never sends a
header twice, nor a credential or a hop-by-hop header.
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.compression_utils import ZLibDecompressor
from aiohttp.test_utils import TestServer

from aioproxy import ConfigError, create_app
from aioproxy.config import parse_config
from aioproxy.testing import FakeOpenAI, assert_openai_error
from tests.support import (
    AUTH,
    CHAT,
    MASTER_KEY,
    MESSAGES,
    UPSTREAM_KEY,
    ServeProxy,
    gateway_config,
    running,
    sdk,
)

BODY = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
KEY_ONLY = {"Authorization": f"Bearer {MASTER_KEY}"}
JSON = {"Content-Type": "application/json"}
# Every body-carrying route, in both forms.
POST_ROUTES = [
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/v1/responses",
    "/responses",
]
BOMB_INFLATED = 256 * 1024 * 1024


@functools.cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 256 MiB of zeros, compressed a MiB at a time."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(BOMB_INFLATED // len(block))]
    return b"".join([*parts, compressor.flush()])


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes aiohttp's zlib decompressor inflates in this process while the test runs."""
    count = [0]
    original = ZLibDecompressor.decompress_sync

    def counting(self: ZLibDecompressor, data: Any, *args: Any, **kwargs: Any) -> bytes:
        out = original(self, data, *args, **kwargs)
        count[0] += len(out)
        return out

    monkeypatch.setattr(ZLibDecompressor, "decompress_sync", counting)
    return count


@pytest.fixture
async def one_connection() -> AsyncIterator[aiohttp.ClientSession]:
    """A client on a single kept-alive connection: its next request is served only once the
    server is done with the previous one, unread body included."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        yield http


async def post(
    http: aiohttp.ClientSession, url: Any, data: bytes = BODY, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    # A large body goes as a stream: aiohttp warns about sending it in one piece.
    payload = io.BytesIO(data) if len(data) > 64 * 1024 else data
    response = await http.post(url, data=payload, headers=headers)
    await response.read()
    return response


async def assert_refused(
    url: Any, body: bytes, cases: list[tuple[dict[str, str], int, str]]
) -> None:
    """POST ``body`` once per case, with its headers: each is refused with its status and code."""
    async with aiohttp.ClientSession() as http:
        for headers, status, code in cases:
            await assert_openai_error(await post(http, url, body, headers), status, code)


async def assert_healthy(http: aiohttp.ClientSession, server: TestServer) -> None:
    async with http.get(server.make_url("/health")) as response:
        assert response.status == 200


# -- 9.2: compressed request bodies ----------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, KEY_ONLY], ids=["no-key", "master-key"])
async def test_gzip_bomb_is_refused_and_never_inflated(
    proxy: TestServer,
    fake: FakeOpenAI,
    inflated: list[int],
    one_connection: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    bomb = gzip_bomb()
    response = await post(
        one_connection, proxy.make_url(CHAT), bomb, {**headers, **JSON, "Content-Encoding": "gzip"}
    )
    await assert_openai_error(response, 415, "unsupported_content_encoding")
    # Served on the same connection: aiohttp has drained the bomb's body by now.
    await assert_healthy(one_connection, proxy)
    assert inflated == [0]
    assert fake.requests == []


async def test_a_bomb_to_an_unknown_route_is_never_inflated(
    proxy: TestServer, inflated: list[int], one_connection: aiohttp.ClientSession
) -> None:
    """A 404 leaves the body unread, for aiohttp to drain; draining must not inflate it."""
    response = await post(
        one_connection,
        proxy.make_url("/v1/nowhere"),
        gzip_bomb(),
        {**AUTH, "Content-Encoding": "gzip"},
    )
    await assert_openai_error(response, 404, "not_found")
    await assert_healthy(one_connection, proxy)
    assert inflated == [0]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "GZIP", "x-custom"])
async def test_every_content_encoding_but_identity_is_a_415(
    proxy: TestServer, http: aiohttp.ClientSession, fake: FakeOpenAI, encoding: str
) -> None:
    response = await post(
        http, proxy.make_url(CHAT), zlib.compress(BODY), {**AUTH, "Content-Encoding": encoding}
    )
    error = await assert_openai_error(response, 415, "unsupported_content_encoding")
    assert encoding in error["message"]
    assert fake.requests == []


async def test_identity_encoding_is_served(proxy: TestServer, http: aiohttp.ClientSession) -> None:
    response = await post(
        http, proxy.make_url(CHAT), BODY, {**AUTH, "Content-Encoding": "identity"}
    )
    assert response.status == 200, await response.text()


async def test_run_py_refuses_a_gzip_bomb_before_authentication(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[auth]\nmaster_key = "{MASTER_KEY}"\n\n[[models]]\nname = "echo"\nprovider = "echo"\n',
        encoding="utf-8",
    )
    async with running("--config", str(config)) as (port, _):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            for headers in ({}, KEY_ONLY):
                response = await post(
                    http, base + CHAT, gzip_bomb(), {**headers, **JSON, "Content-Encoding": "gzip"}
                )
                await assert_openai_error(response, 415, "unsupported_content_encoding")
                async with http.get(base + "/health") as health:
                    assert health.status == 200
            body = b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}'
            response = await post(http, base + CHAT, body, AUTH)
            assert response.status == 200


# -- 9.9: content types ----------------------------------------------------------------------


@pytest.mark.parametrize("path", POST_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/jsonx",
        "text/json",
    ],
)
async def test_bodies_that_are_not_json_are_a_415(
    proxy: TestServer, http: aiohttp.ClientSession, fake: FakeOpenAI, path: str, content_type: str
) -> None:
    response = await post(
        http, proxy.make_url(path), BODY, {**KEY_ONLY, "Content-Type": content_type}
    )
    await assert_openai_error(response, 415, "unsupported_media_type")
    assert fake.requests == []


async def test_a_body_without_content_type_is_a_415(
    proxy: TestServer, http: aiohttp.ClientSession
) -> None:
    # skip_auto_headers: aiohttp would otherwise add application/octet-stream itself.
    async with http.post(
        proxy.make_url(CHAT), data=BODY, headers=KEY_ONLY, skip_auto_headers=["Content-Type"]
    ) as response:
        assert "Content-Type" not in response.request_info.headers
        await assert_openai_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; charset=UTF-8",
    ],
)
async def test_json_with_parameters_is_served(
    proxy: TestServer, http: aiohttp.ClientSession, content_type: str
) -> None:
    response = await post(
        http, proxy.make_url(CHAT), BODY, {**KEY_ONLY, "Content-Type": content_type}
    )
    assert response.status == 200, await response.text()


async def test_the_sdk_is_served_on_every_kind_and_bodyless_routes_still_work(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession
) -> None:
    """Open mode, where every check applies: the SDK's requests all pass."""
    config = gateway_config(upstream_base)
    del config["auth"]
    proxy = await serve_proxy(config)
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        await client.completions.create(model="gpt-test", prompt="hi")
        await client.embeddings.create(model="gpt-test", input="hi")
        await client.responses.create(model="gpt-test", input="hi")
        assert "gpt-test" in {m.id for m in (await client.models.list()).data}
        assert (await client.models.retrieve("echo")).id == "echo"
    for method in ("GET", "DELETE"):  # reach their handler: not refused for want of a body
        async with http.request(method, proxy.make_url("/v1/responses/resp_1")) as response:
            error = await assert_openai_error(response, 404, "not_found")
            assert "resp_1" in error["message"]


# -- 9.9: Host in open mode ------------------------------------------------------------------


async def open_proxy(serve_proxy: ServeProxy, upstream_base: str, **server: Any) -> TestServer:
    config = gateway_config(upstream_base, server=server)
    del config["auth"]
    return await serve_proxy(config)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.nip.io",
        "192.168.1.20:{port}",
        "localhost.evil.example",
    ],
)
async def test_open_mode_refuses_other_host_names(
    serve_proxy: ServeProxy,
    upstream_base: str,
    http: aiohttp.ClientSession,
    fake: FakeOpenAI,
    host: str,
) -> None:
    proxy = await open_proxy(serve_proxy, upstream_base)
    for method, path in (("POST", CHAT), ("GET", "/v1/models")):
        async with http.request(
            method,
            proxy.make_url(path),
            data=BODY,
            headers={**JSON, "Host": host.format(port=proxy.port)},
        ) as response:
            await assert_openai_error(response, 403, "host_not_allowed")
    assert fake.requests == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST",
        "[::1]:{port}",
        "localhost.",
        "proxy.internal:{port}",
    ],
)
async def test_open_mode_serves_loopback_and_allowed_names(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession, host: str
) -> None:
    proxy = await open_proxy(serve_proxy, upstream_base, allowed_hosts=["Proxy.Internal"])
    response = await post(
        http, proxy.make_url(CHAT), BODY, {**JSON, "Host": host.format(port=proxy.port)}
    )
    assert response.status == 200, await response.text()


async def test_open_mode_serves_its_configured_host_and_any_with_a_star(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession
) -> None:
    named = await open_proxy(serve_proxy, upstream_base, host="gateway.lan")
    starred = await open_proxy(serve_proxy, upstream_base, allowed_hosts=["*"])
    for proxy, host in ((named, "gateway.lan:4000"), (starred, "anything.example")):
        response = await post(http, proxy.make_url(CHAT), BODY, {**JSON, "Host": host})
        assert response.status == 200, await response.text()


async def test_with_keys_any_host_is_served(proxy: TestServer, http: aiohttp.ClientSession) -> None:
    response = await post(http, proxy.make_url(CHAT), BODY, {**AUTH, "Host": "gateway.example"})
    assert response.status == 200, await response.text()


# -- 9.9: Origin and CORS --------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [True, False], ids=["keys", "open"])
@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1"])
async def test_cross_site_origins_are_refused(
    serve_proxy: ServeProxy,
    upstream_base: str,
    http: aiohttp.ClientSession,
    fake: FakeOpenAI,
    keyed: bool,
    origin: str,
) -> None:
    proxy = (
        await serve_proxy(gateway_config(upstream_base))
        if keyed
        else await open_proxy(serve_proxy, upstream_base)
    )
    response = await post(http, proxy.make_url(CHAT), BODY, {**AUTH, "Origin": origin})
    await assert_openai_error(response, 403, "origin_not_allowed")
    assert fake.requests == []


async def test_a_same_origin_request_is_served(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession
) -> None:
    proxy = await open_proxy(serve_proxy, upstream_base)
    origin = f"http://127.0.0.1:{proxy.port}"
    response = await post(http, proxy.make_url(CHAT), BODY, {**JSON, "Origin": origin})
    assert response.status == 200, await response.text()


async def test_cors_origins_get_cors_answers_and_preflights(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession
) -> None:
    allowed = "https://app.example"
    proxy = await serve_proxy(gateway_config(upstream_base, server={"cors_origins": [allowed]}))
    async with http.options(
        proxy.make_url(CHAT),
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == allowed
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    for stream in (False, True):
        body = BODY[:-1] + (b', "stream": true}' if stream else b"}")
        response = await post(http, proxy.make_url(CHAT), body, {**AUTH, "Origin": allowed})
        assert response.status == 200, await response.text()
        assert response.headers["Access-Control-Allow-Origin"] == allowed
        assert "Origin" in response.headers.getall("Vary")
    # Errors too, so that the page can read them.
    response = await post(http, proxy.make_url(CHAT), BODY, {**JSON, "Origin": allowed})
    await assert_openai_error(response, 401)
    assert response.headers["Access-Control-Allow-Origin"] == allowed
    # Another origin gets neither.
    async with http.options(
        proxy.make_url(CHAT),
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
        },
    ) as preflight:
        await assert_openai_error(preflight, 403, "origin_not_allowed")
        assert "Access-Control-Allow-Origin" not in preflight.headers
    # No Origin (the SDK, curl): no CORS headers.
    response = await post(http, proxy.make_url(CHAT), BODY, AUTH)
    assert "Access-Control-Allow-Origin" not in response.headers


# -- 9.9: the checks hold in an embedding app ------------------------------------------------


async def test_the_checks_hold_when_mounted(aiohttp_server: Any, upstream_base: str) -> None:
    import aioproxy_echo
    import aioproxy_openai

    config = gateway_config(upstream_base)
    del config["auth"]
    parent = web.Application()
    parent.add_subapp(
        "/llm", create_app(config, plugins=[aioproxy_openai, aioproxy_echo], load_entrypoints=False)
    )
    server = await aiohttp_server(parent)
    url = server.make_url("/llm" + CHAT)
    await assert_refused(
        url,
        BODY,
        [
            ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ({**JSON, "Origin": "https://e.x"}, 403, "origin_not_allowed"),
            ({**JSON, "Host": "evil.example"}, 403, "host_not_allowed"),
            ({**JSON, "Content-Encoding": "gzip"}, 415, "unsupported_content_encoding"),
        ],
    )
    async with sdk(server, prefix="/llm/v1") as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)


async def test_a_host_app_that_leaves_bodies_compressed_never_inflates_a_bomb(
    aiohttp_server: Any, inflated: list[int], one_connection: aiohttp.ClientSession
) -> None:
    """The server is the host app's: with the handler_args the README gives, nothing inflates."""
    import aioproxy_echo

    parent = web.Application(handler_args={"auto_decompress": False})
    parent.add_subapp(
        "/llm",
        create_app(
            {"models": [{"name": "echo", "provider": "echo"}]},
            plugins=[aioproxy_echo],
            load_entrypoints=False,
        ),
    )
    server = await aiohttp_server(parent)
    response = await post(
        one_connection,
        server.make_url("/llm" + CHAT),
        gzip_bomb(),
        {**JSON, "Content-Encoding": "gzip"},
    )
    await assert_openai_error(response, 415, "unsupported_content_encoding")
    async with one_connection.get(server.make_url("/llm/health")) as health:
        assert health.status == 200
    assert inflated == [0]


async def test_run_py_in_open_mode_refuses_pages_and_rebinding() -> None:
    async with running() as (port, _):
        url = f"http://127.0.0.1:{port}{CHAT}"
        body = b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}'
        await assert_refused(
            url,
            body,
            [
                ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
                ({**JSON, "Host": f"evil.example:{port}"}, 403, "host_not_allowed"),
                ({**JSON, "Origin": "https://evil.example"}, 403, "origin_not_allowed"),
            ],
        )
        async with openai.AsyncOpenAI(
            base_url=f"http://localhost:{port}/v1", api_key="x", max_retries=0
        ) as client:
            await client.chat.completions.create(model="echo", messages=MESSAGES)


# -- 9.10: forward_headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "api-key",
        "X-Api-Key",
        "cookie",
        "Proxy-Authorization",
        "x-auth-token",
        "x-goog-api-key",
        "Connection",
        "keep-alive",
        "TE",
        "trailer",
        "Transfer-Encoding",
        "upgrade",
        "Host",
        "content-length",
        "proxy-connection",
        "Content-Encoding",
    ],
)
def test_credentials_and_hop_by_hop_headers_cannot_be_forwarded(name: str) -> None:
    raw = {"upstream": {"forward_headers": ["openai-beta", name]}}
    with pytest.raises(ConfigError, match=r"\$\.upstream\.forward_headers\[1\]") as caught:
        parse_config(raw)
    assert f"'{name}'" in str(caught.value)


async def test_forward_headers_ignore_case_and_send_each_header_once(
    serve_proxy: ServeProxy, upstream_base: str, http: aiohttp.ClientSession, fake: FakeOpenAI
) -> None:
    config = gateway_config(
        upstream_base, upstream={"forward_headers": ["X-Request-ID", "x-request-id", "OpenAI-Beta"]}
    )
    config["models"][0]["headers"] = {
        "AUTHORIZATION": "Bearer wrong",
        "content-type": "application/json; charset=utf-8",
    }
    proxy = await serve_proxy(config)
    response = await post(
        http,
        proxy.make_url(CHAT),
        BODY,
        {**AUTH, "x-request-id": "req-1", "openai-beta": "assistants=v2"},
    )
    assert response.status == 200, await response.text()
    sent = fake.last.headers  # repeated headers would come joined with ", "
    assert sent["x-request-id"] == "req-1"
    assert sent["openai-beta"] == "assistants=v2"
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the deployment's key wins
    assert sent["content-type"] == "application/json; charset=utf-8"  # the deployment's, once


async def test_a_config_built_in_python_never_forwards_credentials(
    serve_proxy: ServeProxy,
    upstream_base: str,
    http: aiohttp.ClientSession,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a loaded config is checked; the provider drops such names whatever the source."""
    config = parse_config(gateway_config(upstream_base))
    upstream = msgspec.structs.replace(
        config.upstream, forward_headers=["Cookie", "x-api-key", "x-request-id"]
    )
    proxy = await serve_proxy(msgspec.structs.replace(config, upstream=upstream))
    assert "'Cookie' is a credential" in caplog.text
    response = await post(
        http,
        proxy.make_url(CHAT),
        BODY,
        {**AUTH, "Cookie": "session=1", "x-api-key": "k", "x-request-id": "r"},
    )
    assert response.status == 200, await response.text()
    assert "cookie" not in fake.last.headers and "x-api-key" not in fake.last.headers
    assert fake.last.headers["x-request-id"] == "r"
