"""aioproxy-otel against a fake OTLP/HTTP collector (an aiohttp server decoding the protobuf
with opentelemetry-proto): span structure across a retry, GenAI attributes, the client's
traceparent continued to the upstream, TTFT, errors, and what is never recorded."""

from __future__ import annotations

import asyncio
import gzip
import importlib
import io
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import aioproxy_otel
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioproxy_otel import OTelPlugin
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from aioproxy import create_app
from aioproxy.keys import plugin_manager_key
from aioproxy.observability.access_log import JSONFormatter
from aioproxy.testing import FakeOpenAI

MASTER_KEY = "sk-otel-master-key-0001"
VIRTUAL_KEY = "sk-otel-virtual-key-0002"
UPSTREAM_KEY = "sk-otel-upstream-key-0003"
PROMPT = "the-secret-prompt-text-4242"
MESSAGES = [{"role": "user", "content": PROMPT}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT


class Collector:
    """A fake OTLP/HTTP traces endpoint: every span it receives, and an event per export."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        return app

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(self, count: int) -> list[Span]:
        """Wait for at least ``count`` spans (30 s safety net, never the assertion)."""
        async with asyncio.timeout(30):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.spans


def attributes(span: Span) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in span.attributes}


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind)


@pytest.fixture
async def collector(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> Collector:
    """The collector, and the standard variables pointing the exporter at it."""
    collector = Collector()
    server = await aiohttp_server(collector.app())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", str(server.make_url("/v1/traces")))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "aioproxy-test")
    return collector


@pytest.fixture
async def plugin(collector: Collector) -> AsyncIterator[OTelPlugin]:
    plugin = OTelPlugin()  # configured from the environment, as installed
    yield plugin
    await asyncio.to_thread(plugin.shutdown)


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


async def start(
    aiohttp_server: Any, fake: FakeOpenAI, *plugins: object, **overrides: Any
) -> TestServer:
    upstream = await aiohttp_server(fake.app())
    config: dict[str, Any] = {
        "auth": {"master_key": MASTER_KEY, "keys": [{"key": VIRTUAL_KEY, "name": "team-a-app"}]},
        "router": {"retry_backoff": 0},
        "models": [
            {
                "name": "gpt-test",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "api_base": str(upstream.make_url("/v1")),
                "api_key": UPSTREAM_KEY,
            }
        ],
        "responses": {"store": False},
        "metrics": {"enabled": True},
        "logging": {"access_log": True},
        **overrides,
    }
    app = create_app(
        config, plugins=[aioproxy_openai, aioproxy_echo, *plugins], load_entrypoints=False
    )
    return await aiohttp_server(app)


def sdk(proxy: TestServer, key: str = MASTER_KEY, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key=key, max_retries=0, default_headers=headers
    )


def post_stream(
    http: aiohttp.ClientSession, proxy: TestServer
) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
    """A streamed chat completion with the master key (``async with`` the result)."""
    return http.post(
        proxy.make_url("/v1/chat/completions"),
        json={"model": "gpt-test", "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    )


async def flushed(plugin: OTelPlugin, collector: Collector, count: int) -> list[Span]:
    await asyncio.to_thread(plugin.force_flush)  # the exporter's thread posts to our loop
    return await collector.wait_for(count)


async def test_a_retry_is_two_attempt_spans_under_the_client_trace(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    proxy = await start(aiohttp_server, fake, plugin)
    fake.faults = ["status:500"]
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    async with sdk(proxy, traceparent=traceparent) as client:
        done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    spans = await flushed(plugin, collector, 3)
    assert len(spans) == 3
    [root] = [s for s in spans if s.kind == SERVER]
    first, second = sorted(
        (s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano
    )
    # The client's trace continues: its span is the request span's parent.
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    assert root.parent_span_id.hex() == CLIENT_SPAN
    assert first.parent_span_id == second.parent_span_id == root.span_id
    # Each attempt's own traceparent reached the upstream.
    assert [r.headers["traceparent"] for r in fake.requests] == [
        f"00-{TRACE_ID}-{first.span_id.hex()}-01",
        f"00-{TRACE_ID}-{second.span_id.hex()}-01",
    ]
    assert done.usage is not None
    assert root.name == "chat gpt-test"
    assert attributes(root) | {"aioproxy.request_id": None} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": done.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": done.usage.completion_tokens,
        "gen_ai.response.finish_reasons": ["stop"],
        "http.response.status_code": 200,
        "aioproxy.request_id": None,
        "aioproxy.key": "master",
    }
    failed, answered = attributes(first), attributes(second)
    assert failed["http.response.status_code"] == 500 and failed["error.type"] == "500"
    assert first.status.code == Status.STATUS_CODE_ERROR
    assert "error.type" not in answered and answered["http.response.status_code"] == 200
    for attempt, attrs in ((1, failed), (2, answered)):
        assert attrs["aioproxy.attempt"] == attempt
        assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] > 0
        assert attrs["aioproxy.upstream_request_id"].startswith("req_")


async def test_a_stream_has_its_first_token_event(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    proxy = await start(aiohttp_server, fake, plugin)
    async with sdk(proxy) as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
    spans = await flushed(plugin, collector, 2)
    [root] = [s for s in spans if s.kind == SERVER]
    [event] = root.events
    assert event.name == "gen_ai.first_token"
    assert [kv.key for kv in event.attributes] == ["gen_ai.response.time_to_first_chunk"]
    assert root.start_time_unix_nano <= event.time_unix_nano <= root.end_time_unix_nano
    attrs = attributes(root)
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert len(root.trace_id) == 16 and root.parent_span_id == b""  # a new trace


async def test_refused_requests_have_error_spans(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    proxy = await start(aiohttp_server, fake, plugin)
    for key, model, refusal in (
        (MASTER_KEY, "nope", openai.NotFoundError),
        ("sk-wrong", "gpt-test", openai.AuthenticationError),
        (MASTER_KEY, "sk-proj-PASTEDKEY0123456789", openai.NotFoundError),
    ):
        async with sdk(proxy, key=key) as client:
            with pytest.raises(refusal):
                await client.chat.completions.create(model=model, messages=MESSAGES)
    spans = await flushed(plugin, collector, 3)
    assert len(spans) == 3
    unknown = [s for s in spans if attributes(s)["error.type"] == "model_not_found"]
    # A name no deployment has is the client's text: masked where key-like, never the span's
    # name (each new name would be a new span name to the backend).
    assert sorted(attributes(s)["gen_ai.request.model"] for s in unknown) == ["***", "nope"]
    assert {s.name for s in unknown} == {"chat"}
    by_error = {attributes(s)["error.type"]: s for s in spans}
    assert set(by_error) == {"model_not_found", "invalid_api_key"}
    assert attributes(by_error["model_not_found"])["http.response.status_code"] == 404
    assert by_error["invalid_api_key"].name == "aioproxy /v1/chat/completions"
    assert all(s.status.code == Status.STATUS_CODE_ERROR for s in spans)


async def test_a_body_refused_as_it_is_read_has_its_status_and_no_empty_model(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """A body over the size limit is aiohttp's 413, and a body that names no model leaves the
    call's model empty: the span says 413 (not 500) and is named by its operation alone."""
    proxy = await start(aiohttp_server, fake, plugin, server={"max_body_size": 1024})
    url = proxy.make_url("/v1/chat/completions")
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for body, status in ((b"{" + b" " * 4096 + b"}", 413), (b"{]", 400)):
            async with http.post(url, data=body, headers=headers) as response:
                assert response.status == status
    spans = await flushed(plugin, collector, 2)
    statuses = sorted(attributes(s)["http.response.status_code"] for s in spans)
    assert statuses == [400, 413]
    for span in spans:
        assert span.name == "chat" and "gen_ai.request.model" not in attributes(span)
    too_large = next(s for s in spans if attributes(s)["http.response.status_code"] == 413)
    assert attributes(too_large)["error.type"] != "HTTPRequestEntityTooLarge"


async def test_content_is_captured_only_when_asked(
    aiohttp_server: Any, fake: FakeOpenAI, collector: Collector
) -> None:
    plugin = OTelPlugin(capture_content=True)
    try:
        proxy = await start(aiohttp_server, fake, plugin)
        async with sdk(proxy) as client:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        spans = await flushed(plugin, collector, 2)
    finally:
        await asyncio.to_thread(plugin.shutdown)
    [root] = [s for s in spans if s.kind == SERVER]
    attrs = attributes(root)
    assert PROMPT in attrs["gen_ai.input.messages"]
    assert PROMPT in attrs["gen_ai.output.messages"]  # the fake's answer quotes it


def test_the_installed_plugin_is_inactive_without_an_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not isinstance(importlib.reload(aioproxy_otel).plugin, OTelPlugin)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert isinstance(importlib.reload(aioproxy_otel).plugin, OTelPlugin)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not isinstance(importlib.reload(aioproxy_otel).plugin, OTelPlugin)


async def test_no_key_or_prompt_in_any_log_metric_or_span(
    aiohttp_server: Any,
    fake: FakeOpenAI,
    plugin: OTelPlugin,
    collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every log line (access log included, both forms), the whole /metrics text and every
    span, after successes, a stream, a retry and refusals, hold no key and no prompt text
    (the fake's completions quote the prompt, so no completion either)."""
    caplog.set_level(logging.DEBUG)
    json_lines = io.StringIO()
    handler = logging.StreamHandler(json_lines)
    handler.setFormatter(JSONFormatter())
    logging.getLogger().addHandler(handler)
    try:
        proxy = await start(aiohttp_server, fake, plugin)
        for key in (MASTER_KEY, VIRTUAL_KEY):
            async with sdk(proxy, key=key) as client:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=MESSAGES, stream=True
                )
                async for _ in stream:
                    pass
                fake.faults = ["status:500"]
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
                with pytest.raises(openai.NotFoundError):
                    await client.chat.completions.create(model="nope", messages=MESSAGES)
        async with sdk(proxy, key=f"sk-wrong-{PROMPT}") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {MASTER_KEY}"}
            async with http.get(proxy.make_url("/metrics"), headers=headers) as response:
                metrics = await response.text()
        spans = await flushed(plugin, collector, 11)
        # The last lines (the /metrics request's) may still wait for their batch's window.
        proxy.app[plugin_manager_key].get_plugin("aioproxy.observer").observe_pending()
    finally:
        logging.getLogger().removeHandler(handler)
    access = [r for r in caplog.records if r.name == "aioproxy.access"]
    assert len(access) == 10
    assert any("team-a-app" in r.getMessage() for r in access)  # the key's name, not the key
    texts = {
        "log lines": "\n".join(r.getMessage() for r in caplog.records),
        "JSON log lines": json_lines.getvalue(),
        "metrics": metrics,
        "spans": "\n".join(str(span) for span in spans),
    }
    assert "aioproxy_requests_total" in metrics and "chat gpt-test" in texts["spans"]
    for where, text in texts.items():
        for secret in (MASTER_KEY, VIRTUAL_KEY, UPSTREAM_KEY, PROMPT):
            assert secret not in text, f"{secret!r} in the {where}"


@pytest.mark.parametrize(
    ("variables", "service"),
    [
        ({}, "aioproxy"),
        ({"OTEL_SERVICE_NAME": "gw"}, "gw"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=gw-eu,deployment.environment=prod"}, "gw-eu"),
    ],
)
def test_the_service_is_named_by_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], service: str
) -> None:
    """OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES' service.name, else aioproxy."""
    from aioproxy_otel.tracing import _build_provider

    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1/v1/traces")
    provider = _build_provider()
    try:
        assert provider.resource.attributes["service.name"] == service
    finally:
        provider.shutdown()


async def test_a_request_whose_client_left_has_its_spans_ended(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """A client gone while the upstream keeps it waiting: no hook ends the request (nor its
    attempt), yet both spans end and are exported, saying so."""
    proxy = await start(aiohttp_server, fake, plugin)  # its server cancels the handler
    fake.faults = ["hang"]
    async with aiohttp.ClientSession() as http:
        asking = asyncio.create_task(
            http.post(
                proxy.make_url("/v1/chat/completions"),
                json={"model": "gpt-test", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
            )
        )
        async with asyncio.timeout(30):  # a safety net
            while not fake.requests:
                await asyncio.sleep(0.01)
        asking.cancel()
    spans = await flushed(plugin, collector, 2)
    [root] = [s for s in spans if s.kind == SERVER]
    [attempt] = [s for s in spans if s.kind == CLIENT]
    assert attempt.parent_span_id == root.span_id
    for span in (root, attempt):
        assert attributes(span)["error.type"] == "client_disconnected"
    assert attributes(root)["http.response.status_code"] == 499


async def test_a_stream_whose_client_left_midway_says_so(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """Its 200 went out, then the client went away: the span says so, as the access log."""
    proxy = await start(aiohttp_server, fake, plugin)
    fake.faults = ["stall_stream"]
    async with aiohttp.ClientSession() as http:
        async with post_stream(http, proxy) as response:
            await response.content.readline()  # the first event came
            response.close()
    spans = await flushed(plugin, collector, 2)
    [root] = [s for s in spans if s.kind == SERVER]
    attrs = attributes(root)
    assert (attrs["http.response.status_code"], attrs["error.type"]) == (
        200,
        "client_disconnected",
    )


async def test_an_app_that_stops_exports_what_it_traced(
    aiohttp_server: Any,
    fake: FakeOpenAI,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spans wait in the batch (here a minute) until exported: an app that stops exports them
    (run.py's workers end with os._exit, which skips the SDK's exit handler)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    plugin = OTelPlugin()
    try:
        proxy = await start(aiohttp_server, fake, plugin)
        async with sdk(proxy) as client:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert collector.spans == []  # still in the batch
        await proxy.close()  # the app's cleanup
        spans = await collector.wait_for(2)  # no force_flush here
        assert {s.kind for s in spans} == {SERVER, CLIENT}
    finally:
        await asyncio.to_thread(plugin.shutdown)


async def test_messages_are_chat_and_a_cache_hit_calls_no_provider(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector, tmp_path: Any
) -> None:
    """Anthropic's Messages API is the conventions' ``chat``; a response-cache hit calls no
    provider: no attempt span, and no provider named on its request span."""
    proxy = await start(
        aiohttp_server,
        fake,
        plugin,
        database={"url": f"sqlite:///{tmp_path / 'db.sqlite3'}"},
        cache={"enabled": True},
    )
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    async with aiohttp.ClientSession() as http:
        body = {"model": "gpt-test", "max_tokens": 16, "messages": MESSAGES}
        async with http.post(proxy.make_url("/v1/messages"), json=body, headers=headers) as r:
            assert r.status == 200
    async with sdk(proxy) as client:
        for _ in range(2):  # a miss, then a hit
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES, temperature=0)
    spans = await flushed(plugin, collector, 5)
    assert len(spans) == 5
    servers = sorted((s for s in spans if s.kind == SERVER), key=lambda s: s.start_time_unix_nano)
    assert [attributes(s)["gen_ai.operation.name"] for s in servers] == ["chat"] * 3
    hit = servers[2]
    assert "gen_ai.provider.name" not in attributes(hit)
    assert not [s for s in spans if s.kind == CLIENT and s.parent_span_id == hit.span_id]
    assert {attributes(s)["gen_ai.provider.name"] for s in spans if s is not hit} == {"openai"}


def test_providers_are_named_as_the_conventions_name_them() -> None:
    from types import SimpleNamespace

    from aioproxy_otel.tracing import _provider_name

    names = {
        provider: _provider_name(SimpleNamespace(provider=provider))  # type: ignore[arg-type]
        for provider in ("openai", "anthropic", "azure", "bedrock", "gemini", "example")
    }
    assert names == {
        "openai": "openai",
        "anthropic": "anthropic",
        "azure": "azure.ai.openai",
        "bedrock": "aws.bedrock",
        "gemini": "gcp.gemini",
        "example": "example",
    }


async def test_a_request_no_route_or_method_took_has_its_span(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """An unknown path's 404 and a wrong method's 405 (the router's, before any handler) end
    in a SERVER span like any refusal: method, path, status, error.type and the request id its
    answer carried; no model or operation made up from what the client sent."""
    proxy = await start(aiohttp_server, fake, plugin)
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    asked = [
        ("GET", "/v1/nowhere/sk-proj-PASTEDKEY0123456789", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PURGE", "/v1/chat/completions", 405),
    ]
    ids = []
    async with aiohttp.ClientSession() as http:
        for method, path, status in asked:
            async with http.request(method, proxy.make_url(path), headers=headers) as response:
                assert response.status == status
                ids.append(response.headers["x-request-id"])
    spans = await flushed(plugin, collector, 3)
    assert len(spans) == 3
    by_id = {attributes(s)["aioproxy.request_id"]: s for s in spans}
    assert set(by_id) == set(ids)
    seen = [attributes(by_id[rid]) for rid in ids]
    assert [(a["http.request.method"], a["url.path"]) for a in seen] == [
        ("GET", "/v1/nowhere/***"),
        ("GET", "/v1/chat/completions"),
        ("_OTHER", "/v1/chat/completions"),
    ]
    assert [(a["http.response.status_code"], a["error.type"]) for a in seen] == [
        (404, "not_found"),
        (405, "method_not_allowed"),
        (405, "method_not_allowed"),
    ]
    for span in spans:
        assert span.kind == SERVER and span.status.code == Status.STATUS_CODE_ERROR
        assert span.name == "aioproxy request"
        assert not [key for key in attributes(span) if key.startswith("gen_ai.")]
    assert "PASTEDKEY" not in "\n".join(str(span) for span in spans)


async def test_a_refused_key_has_the_request_id_its_answer_carried(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """A 401's span names the request by the x-request-id of its answer: the client's own
    when it sent a sane one, else the one made for it."""
    proxy = await start(aiohttp_server, fake, plugin)
    url = proxy.make_url("/v1/chat/completions")
    body = {"model": "gpt-test", "messages": MESSAGES}
    ids = []
    async with aiohttp.ClientSession() as http:
        for given in ({"x-request-id": "client-id-401"}, {}):
            headers = {"Authorization": "Bearer sk-wrong", **given}
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 401
                ids.append(response.headers["x-request-id"])
    assert ids[0] == "client-id-401"
    spans = await flushed(plugin, collector, 2)
    assert sorted(attributes(s)["aioproxy.request_id"] for s in spans) == sorted(ids)
    for span in spans:
        attrs = attributes(span)
        assert attrs["error.type"] == "invalid_api_key"
        assert (attrs["http.request.method"], attrs["http.route"]) == (
            "POST",
            "/v1/chat/completions",
        )


async def test_a_stream_cut_after_its_200_keeps_that_status(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """The upstream breaks off a stream whose 200 went out: the span says 200, the status the
    client got, and names the cut by its code (status ERROR), as the access log does; and it
    has what the stream had before the cut, as a whole stream's span does (its first token's
    event)."""
    proxy = await start(aiohttp_server, fake, plugin)
    fake.faults = ["cut_stream"]
    async with aiohttp.ClientSession() as http:
        async with post_stream(http, proxy) as response:
            assert response.status == 200
            assert b'"upstream_disconnected"' in await response.read()
    spans = await flushed(plugin, collector, 2)
    [root] = [s for s in spans if s.kind == SERVER]
    attrs = attributes(root)
    assert (attrs["http.response.status_code"], attrs["error.type"]) == (
        200,
        "upstream_disconnected",
    )
    assert root.status.code == Status.STATUS_CODE_ERROR
    assert [event.name for event in root.events] == ["gen_ai.first_token"]


async def test_the_ingress_and_model_routes_refusals_have_spans(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """The refusals no provider handler hears end in a SERVER span too, as the router's do: a
    401 on the model routes, their unknown model's 404, and the ingress checks' 415s and 403."""
    proxy = await start(aiohttp_server, fake, plugin)
    master = {"Authorization": f"Bearer {MASTER_KEY}"}
    wrong = {"Authorization": "Bearer sk-wrong"}
    asked: list[tuple[str, str, dict[str, str], int, str]] = [
        ("GET", "/v1/models", wrong, 401, "invalid_api_key"),
        ("GET", "/v1/models/gpt-test", wrong, 401, "invalid_api_key"),
        ("GET", "/v1/models/nope", master, 404, "model_not_found"),
        (
            "POST",
            "/v1/chat/completions",
            {**master, "Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {**master, "Content-Type": "application/json", "Content-Encoding": "gzip"},
            415,
            "unsupported_content_encoding",
        ),
        (
            "GET",
            "/v1/models",
            {**master, "Origin": "https://elsewhere.example"},
            403,
            "origin_not_allowed",
        ),
    ]
    ids = []
    async with aiohttp.ClientSession() as http:
        for method, path, headers, status, _ in asked:
            url = proxy.make_url(path)
            async with http.request(method, url, headers=headers, data=b"{}") as response:
                assert response.status == status
                ids.append(response.headers["x-request-id"])
    spans = await flushed(plugin, collector, len(asked))
    assert len(spans) == len(asked)
    by_id = {attributes(s)["aioproxy.request_id"]: s for s in spans}
    seen = [attributes(by_id[rid]) for rid in ids]
    assert [(a["http.request.method"], a["http.route"]) for a in seen] == [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model}"),
        ("GET", "/v1/models/{model}"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]
    assert [(a["http.response.status_code"], a["error.type"]) for a in seen] == [
        (status, code) for *_, status, code in asked
    ]
    for span in spans:
        assert span.kind == SERVER and span.status.code == Status.STATUS_CODE_ERROR
        assert span.name == f"aioproxy {attributes(span)['http.route']}"
        assert not [key for key in attributes(span) if key.startswith("gen_ai.")]


async def test_a_host_not_allowed_has_its_span(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """A gateway without keys answers its own host names only: another's 403 has its span,
    unknown path or not (the ingress refuses before the router's 404)."""
    proxy = await start(aiohttp_server, fake, plugin, auth={})
    headers = {"Host": "rebound.example"}
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/models", "/v1/nowhere"):
            async with http.get(proxy.make_url(path), headers=headers) as response:
                assert response.status == 403
    spans = await flushed(plugin, collector, 2)
    assert sorted(attributes(s)["url.path"] for s in spans) == ["/v1/models", "/v1/nowhere"]
    for span in spans:
        attrs = attributes(span)
        assert (attrs["http.response.status_code"], attrs["error.type"]) == (
            403,
            "host_not_allowed",
        )


async def test_a_configured_key_a_client_pasted_is_masked_as_the_access_log_masks_it(
    aiohttp_server: Any, fake: FakeOpenAI, plugin: OTelPlugin, collector: Collector
) -> None:
    """A key of the config that looks like no key (a master key chosen by hand), pasted in a
    path or as the model: masked in the span's ``url.path`` and ``gen_ai.request.model``, not
    only what is shaped like a key."""
    master = "letmein-please-0123"
    auth = {"master_key": master}
    proxy = await start(aiohttp_server, fake, plugin, auth=auth)
    headers = {"Authorization": f"Bearer {master}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(proxy.make_url(f"/v1/nowhere/{master}")) as response:
            assert response.status == 404
        body = {"model": master, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.make_url("/v1/chat/completions"), json=body) as response:
            assert response.status == 404
    spans = await flushed(plugin, collector, 2)
    seen = [attributes(span) for span in spans]
    assert sorted(a["url.path"] for a in seen if "url.path" in a) == ["/v1/nowhere/***"]
    assert [a["gen_ai.request.model"] for a in seen if "gen_ai.request.model" in a] == ["***"]
    assert master not in repr(seen)
