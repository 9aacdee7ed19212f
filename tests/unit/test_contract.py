"""The issue-11 contract names (Upstream, the transport Protocols, ProviderConfig, make_provider,
Call.deployment/routed/for_chat/body_size) work over today's code, through both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import aioproxy
from aioproxy import (
    BadGateway,
    Call,
    Deployment,
    JSONReply,
    Principal,
    Provider,
    ProviderConfig,
    ProxyError,
    StreamReply,
    Upstream,
    UpstreamResponse,
)
from aioproxy.config import Config, Secret, parse_config
from aioproxy.h1client import H1Pool, H1Response
from aioproxy.providers import make_provider
from aioproxy.routes import Kind
from aioproxy.transport import SessionTransport, Transport

if TYPE_CHECKING:  # checked by mypy: both answers and both transports fit the Protocols

    def _fits(h1: H1Response, client: aiohttp.ClientResponse, pool: H1Pool) -> None:
        answers: list[UpstreamResponse] = [h1, client]
        transports: list[Transport] = [pool, SessionTransport(aiohttp.ClientSession())]
        del answers, transports


CONFIG = parse_config(
    {
        "upstream": {"forward_headers": ["openai-beta"]},
        "models": [
            {"name": "m", "provider": "openai", "model": "up-m", "api_base": "http://x/v1"},
            {"name": "e", "provider": "echo", "model": "echo-1"},
        ],
    }
)
DEPLOYMENT = Deployment(
    name="m", provider="openai", model="up-m", api_key=Secret("sk-secret-key-123")
)
SSE = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'


@pytest.fixture
async def server(aiohttp_server: Any) -> Any:
    seen: list[dict[str, str]] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"echo": await request.json()})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def failing(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy", "type": "x"}}, status=503)

    async def events(request: web.Request) -> web.Response:
        return web.Response(body=SSE, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/moved", moved)
    app.router.add_post("/fail", failing)
    app.router.add_post("/events", events)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


@pytest.fixture(params=["h1", "session"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    """An Upstream over the lean pool or over a ClientSession: the same behaviour."""
    async with aiohttp.ClientSession() as session:
        transport: Transport
        if request.param == "h1":
            transport = H1Pool(asyncio.get_running_loop())
        else:
            transport = SessionTransport(session)
        yield Upstream(transport, CONFIG, session)
        if request.param == "h1":
            await transport.close()


def routed_call(body: dict[str, Any], headers: dict[str, str] | None = None) -> Call:
    fields = {name: msgspec.Raw(msgspec.json.encode(value)) for name, value in body.items()}
    request = make_mocked_request("POST", "/v1/chat/completions", headers=headers or {})
    call = Call(Kind.CHAT_COMPLETIONS, request, Principal("t"), "m", fields, stream=False)
    call.route_to(DEPLOYMENT)
    return call


async def test_post_guard_read(server: Any, upstream: Upstream) -> None:
    call = routed_call({"model": "m", "a": 1})
    response = await upstream.post(call, str(server.make_url("/ok")), call.body(), {"x-k": "v"})
    assert isinstance(response, UpstreamResponse)
    with upstream.guard(response, call):
        body = await upstream.read(response, call)
    response.release()
    assert msgspec.json.decode(body) == {"echo": {"model": "up-m", "a": 1}}
    assert server.seen[-1]["x-k"] == "v"


async def test_post_maps_redirects_and_error_answers(server: Any, upstream: Upstream) -> None:
    call = routed_call({"model": "m"})
    with pytest.raises(BadGateway) as moved:
        await upstream.post(call, str(server.make_url("/moved")), b"{}", {})
    assert moved.value.code == "upstream_redirect" and server.seen == []  # not followed
    with pytest.raises(ProxyError) as failed:
        await upstream.post(call, str(server.make_url("/fail")), b"{}", {})
    assert failed.value.status == 503 and "busy" in failed.value.message


async def test_post_maps_connect_errors(unused_tcp_port: int, upstream: Upstream) -> None:
    call = routed_call({"model": "m"})
    with pytest.raises(BadGateway) as caught:
        await upstream.post(call, f"http://127.0.0.1:{unused_tcp_port}/x", b"{}", {})
    assert caught.value.code == "upstream_unreachable"


async def test_events_one_by_one(server: Any, upstream: Upstream) -> None:
    call = routed_call({"model": "m"})
    response = await upstream.post(call, str(server.make_url("/events")), b"{}", {})
    events = [event async for event in upstream.events(response, call)]
    response.release()
    assert events == [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


async def test_forward_relays_json_and_streams(server: Any, upstream: Upstream) -> None:
    call = routed_call({"model": "m", "a": 2})
    reply = await upstream.forward(call, str(server.make_url("/ok")), {})
    assert isinstance(reply, JSONReply)
    assert msgspec.json.decode(reply.body) == {"echo": {"model": "up-m", "a": 2}}
    streamed = await upstream.forward(call, str(server.make_url("/events")), {})
    assert isinstance(streamed, StreamReply)
    assert b"".join([block async for block in streamed.events]) == SSE
    await streamed.aclose()


def test_client_headers_are_the_configured_ones_only() -> None:
    upstream = Upstream(SessionTransport(None), CONFIG)  # type: ignore[arg-type]
    call = routed_call(
        {"model": "m"},
        {"OpenAI-Beta": "assistants=v2", "Authorization": "Bearer client", "X-o": "1"},
    )
    assert upstream.client_headers(call) == {"openai-beta": "assistants=v2"}


async def test_both_transports_fit_the_protocol() -> None:
    pool = H1Pool(asyncio.get_running_loop())
    async with aiohttp.ClientSession() as session:
        assert isinstance(pool, Transport) and isinstance(SessionTransport(session), Transport)
    await pool.close()


def test_call_deployment_is_never_none() -> None:
    fields = {"model": msgspec.Raw(b'"m"'), "x": msgspec.Raw(b"[1,2]")}
    call = Call(Kind.RESPONSES, make_mocked_request("POST", "/"), Principal("t"), "m", fields, True)
    assert not call.routed
    with pytest.raises(RuntimeError, match="not routed"):
        call.deployment  # noqa: B018 - the read is the test
    assert call.body_size() == len(b'"m"') + len(b"[1,2]")
    call.route_to(DEPLOYMENT)
    assert call.routed and call.deployment is DEPLOYMENT
    chat = call.for_chat({"messages": []})
    assert chat.kind is Kind.CHAT_COMPLETIONS and chat.deployment is DEPLOYMENT
    assert chat.state is call.state and chat.stream is True
    assert msgspec.json.decode(chat.body()) == {"messages": [], "model": "up-m"}


async def test_make_provider_gives_the_provider_its_upstream() -> None:
    made: list[tuple[aiohttp.ClientSession, Config]] = []

    def factory(session: aiohttp.ClientSession, config: Config) -> Provider:
        made.append((session, config))
        return Provider(session, config)

    pool = H1Pool(asyncio.get_running_loop())
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(pool, CONFIG, session)
        table = {"m": (DEPLOYMENT,), "e": (Deployment(name="e", provider="echo", model="e1"),)}
        config = ProviderConfig.of("openai", CONFIG, table)
        with pytest.warns(DeprecationWarning):  # (session, config) factories: deprecated (WP3)
            provider = make_provider(factory, upstream, config)
        assert made == [(session, CONFIG)]
        assert provider.upstream is upstream and provider.pool is pool
        assert config.deployments == (DEPLOYMENT,) and config.forward_headers == ("openai-beta",)
        assert config.timeouts == CONFIG.upstream.timeouts
    await pool.close()


def test_a_provider_made_outside_an_app_has_a_session_upstream() -> None:
    with pytest.warns(DeprecationWarning):  # Provider(session, config): deprecated (WP3)
        provider = Provider(None, CONFIG)  # type: ignore[arg-type]
    assert isinstance(provider.upstream.transport, SessionTransport)
    assert provider.upstream is provider.upstream  # made once


def test_the_public_names_resolve() -> None:
    assert all(getattr(aioproxy, name, None) is not None for name in aioproxy.__all__)
