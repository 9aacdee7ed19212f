"""The aioproxy.access log (one line per finished request, JSON or text) and the timing header."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from aioproxy import Call, Outcome, Principal, create_app, hookimpl
from aioproxy.observability import observer
from aioproxy.observability.access_log import ACCESS_LOG
from aioproxy.testing import FakeOpenAI, eventually
from tests.support import (
    AUTH,
    ROOT,
    ServeProxy,
    clean_env,
    free_port,
    gateway_config,
    sdk,
    wait_healthy,
)

MESSAGES = [{"role": "user", "content": "hi"}]
FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "kind",
    "status",
    "error",
    "key",
    "team",
    "model",
    "deployment",
    "stream",
    "input_tokens",
    "output_tokens",
    "cost",
    "ttft_ms",
    "duration_ms",
    "retries",
    "fallbacks",
    "cache",
    "client",
    "upstream_request_id",
}


@pytest.fixture(autouse=True)
def no_batch_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request's line written as soon as the loop turns (not BATCH_WINDOW later), so a
    test reads it right after its answer."""
    monkeypatch.setattr(observer, "BATCH_WINDOW", 0.0)


def lines_of(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


class Priced:
    """What the spend plugin does: price the request first (tryfirst)."""

    @hookimpl(tryfirst=True)
    def after_response(self, outcome: Outcome) -> None:
        outcome.cost = 0.25


async def test_one_json_line_per_request(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI, access_lines: io.StringIO
) -> None:
    config = gateway_config(
        upstream_base, router={"retry_backoff": 0}, logging={"access_log": True}
    )
    proxy = await serve_proxy(config, plugins=[Priced()])
    async with sdk(proxy) as client:
        done = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, extra_headers={"x-request-id": "log-1"}
        )
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)
        fake.faults = ["status:500"]
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/v1/nowhere"), headers=AUTH) as response:
            assert response.status == 404
    lines = lines_of(access_lines)
    assert len(lines) == 5
    assert all(set(line) == FIELDS for line in lines)
    plain, streamed, unknown, retried, route = lines
    usage = done.parse().usage
    assert plain["request_id"] == "log-1" == done.headers["x-request-id"]
    assert plain | {
        "time": None,
        "duration_ms": None,
        "upstream_request_id": None,
        "client": None,
    } == {
        "time": None,
        "request_id": "log-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "kind": "chat_completions",
        "status": 200,
        "error": None,
        "key": "master",
        "team": None,
        "model": "gpt-test",
        "deployment": "gpt-test#0",
        "stream": False,
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cost": 0.25,
        "ttft_ms": None,
        "duration_ms": None,
        "retries": 0,
        "fallbacks": 0,
        "cache": None,
        "client": None,
        "upstream_request_id": None,
    }
    assert plain["upstream_request_id"].startswith("req_") and plain["client"] == "127.0.0.1"
    assert plain["time"].endswith("Z") and plain["duration_ms"] > 0
    assert streamed["stream"] is True and streamed["ttft_ms"] > 0 and streamed["input_tokens"] > 0
    assert (unknown["status"], unknown["error"], unknown["model"]) == (
        404,
        "model_not_found",
        "nope",
    )
    assert unknown["deployment"] is None
    assert (retried["status"], retried["retries"]) == (200, 1)
    assert (route["status"], route["kind"], route["path"], route["key"]) == (
        404,
        "other",
        "/v1/nowhere",
        None,
    )


class _Finished(logging.Handler):
    """Sets an event at each access line: the observer is done with the request."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.done.set()


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("gc_off")
@pytest.mark.parametrize("stream", [False, True])
async def test_an_observed_request_is_freed_without_the_garbage_collector(
    serve_proxy: ServeProxy, upstream_base: str, stream: bool
) -> None:
    """The observer holds a request's call only while it is served: a reference cycle
    (request -> its record -> call -> request) would leave every request to the cyclic garbage
    collector, whose full passes over the heap cost more than all the rest of observing."""
    config = gateway_config(upstream_base, metrics={"enabled": True}, logging={"access_log": True})
    proxy = await serve_proxy(config)
    # Calls that earlier tests keep (a recording plugin's list) are theirs, not this request's.
    kept = {id(obj) for obj in gc.get_objects() if type(obj) is Call}
    finished = _Finished()
    ACCESS_LOG.addHandler(finished)
    level = ACCESS_LOG.level
    ACCESS_LOG.setLevel(logging.INFO)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": stream}
            async with http.post(
                proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH
            ) as response:
                await response.read()
                assert response.status == 200
            await finished.done.wait()
            await asyncio.sleep(0)  # the request's task ends
            assert not [o for o in gc.get_objects() if type(o) is Call and id(o) not in kept]
    finally:
        ACCESS_LOG.removeHandler(finished)
        ACCESS_LOG.setLevel(level)


async def test_text_lines_and_off(
    serve_proxy: ServeProxy, upstream_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioproxy.access")
    proxy = await serve_proxy(gateway_config(upstream_base, logging={"access_log": True}))
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    [record] = [r for r in caplog.records if r.name == "aioproxy.access"]
    text = record.getMessage()
    assert "status=200" in text and "model=gpt-test" in text and "key=master" in text
    caplog.clear()
    off = await serve_proxy(gateway_config(upstream_base))  # off unless configured
    async with sdk(off) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert [r for r in caplog.records if r.name == "aioproxy.access"] == []


async def test_timing_header(serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI) -> None:
    """The gateway's own time: the answer's total minus the upstream's, so a slow upstream
    does not show in it."""
    fake.response_delay = 0.2
    proxy = await serve_proxy(gateway_config(upstream_base, server={"timing_header": True}))
    seen: list[float] = []
    async with aiohttp.ClientSession() as http:
        for body in (
            {"model": "gpt-test", "messages": MESSAGES},
            {"model": "gpt-test", "messages": MESSAGES, "stream": True},
            {"model": "nope", "messages": MESSAGES},
        ):
            async with http.post(
                proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH
            ) as r:
                await r.read()
                seen.append(float(r.headers["x-aioproxy-overhead-ms"]))
    assert all(value >= 0 for value in seen)
    assert seen[0] < 200 and seen[1] < 200  # the 200 ms the upstream took are not counted


async def test_no_timing_header_by_default(proxy: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/v1/models"), headers=AUTH) as response:
            assert response.status == 200
    assert "x-aioproxy-overhead-ms" not in response.headers


async def test_run_py_log_format_json(tmp_path: Path) -> None:
    """run.py --log-format json: each stderr line is a JSON object, the access line among them."""
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[logging]\naccess_log = true\n\n[[models]]\nname = "echo"\nprovider = "echo"\n',
        encoding="utf-8",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        "--config",
        str(config),
        "--port",
        str(port),
        "--log-format",
        "json",
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_healthy(port)
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
        ) as client:
            await client.chat.completions.create(model="echo", messages=MESSAGES)
    finally:
        process.terminate()
        _, err = await process.communicate()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    access = [line for line in lines if line.get("kind") == "chat_completions"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["model"] == "echo"
    assert any(line.get("level") == "WARNING" for line in lines)  # the open-mode warning


async def test_a_mounted_apps_lines_name_its_routes_under_the_prefix(
    aiohttp_server: Any, upstream_base: str, access_lines: io.StringIO
) -> None:
    """Routes are named as the app starts: a host app's prefix is part of their paths by then."""
    import aioproxy_echo
    import aioproxy_openai

    parent = web.Application()
    config = gateway_config(upstream_base, logging={"access_log": True})
    plugins = [aioproxy_openai, aioproxy_echo]
    parent.add_subapp("/llm", create_app(config, plugins=plugins, load_entrypoints=False))
    server = await aiohttp_server(parent)
    async with aiohttp.ClientSession() as http:
        body = {"model": "gpt-test", "messages": MESSAGES}
        url = server.make_url("/llm/v1/chat/completions")
        async with http.post(url, json=body, headers=AUTH) as response:
            assert response.status == 200
        async with http.get(server.make_url("/llm/v1/models"), headers=AUTH) as response:
            assert response.status == 200
    [chat, models] = lines_of(access_lines)
    assert (chat["method"], chat["path"], chat["kind"]) == (
        "POST",
        "/llm/v1/chat/completions",
        "chat_completions",
    )
    assert (models["method"], models["path"], models["kind"]) == ("GET", "/llm/v1/models", "models")


async def test_each_error_lines_code_is_the_one_its_client_got(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI, access_lines: io.StringIO
) -> None:
    """Failures from every layer (no route, wrong method, a body too large or not JSON, the
    ingress checks, auth, /metrics, a model, a rate cap, the upstream): each line's ``error``
    is the ``code`` of the error body its client got."""
    config = gateway_config(
        upstream_base,
        logging={"access_log": True},
        metrics={"enabled": True},
        server={"max_body_size": 2048},
        router={"num_retries": 0},
    )
    config["models"].append({**config["models"][0], "name": "capped", "rpm": 1})
    proxy = await serve_proxy(config)
    json_type = {"Content-Type": "application/json"}
    chat = {"model": "gpt-test", "messages": MESSAGES}
    capped = json.dumps({**chat, "model": "capped"}).encode()
    asked = [
        ("GET", "/v1/nowhere", AUTH, None),
        ("GET", "/v1/chat/completions", AUTH, None),
        ("POST", "/v1/chat/completions", AUTH, b"{" + b" " * 4096 + b"}"),
        ("POST", "/v1/chat/completions", AUTH, b"{not json"),
        ("POST", "/v1/chat/completions", {**AUTH, "Content-Type": "text/plain"}, b"{}"),
        ("POST", "/v1/chat/completions", json_type, json.dumps(chat).encode()),
        ("GET", "/metrics", {}, None),
        ("POST", "/v1/chat/completions", AUTH, json.dumps({**chat, "model": "nope"}).encode()),
        ("POST", "/v1/chat/completions", AUTH, capped),
        ("POST", "/v1/chat/completions", AUTH, capped),
        ("POST", "/v1/chat/completions", AUTH, json.dumps(chat).encode()),
    ]
    codes: list[str | None] = []
    async with aiohttp.ClientSession() as http:
        for method, path, headers, body in asked:
            fake.faults = ["status:503"] if body is asked[-1][3] else []
            async with http.request(
                method, proxy.make_url(path), headers=headers, data=body
            ) as response:
                answer = await response.json()
                codes.append(answer["error"]["code"] if response.status >= 400 else None)
    lines = lines_of(access_lines)
    assert len(lines) == len(asked)
    statuses = [line["status"] for line in lines]
    assert statuses == [404, 405, 413, 400, 415, 401, 401, 404, 200, 429, 503]
    assert [line["error"] for line in lines] == codes
    assert None not in codes[:8]  # each layer's refusal has its code


@pytest.mark.parametrize("case", ["answer", "stream", "keepalive"])
async def test_a_client_that_leaves_has_a_line_that_says_so(
    aiohttp_server: Any,
    upstream_base: str,
    fake: FakeOpenAI,
    access_lines: io.StringIO,
    case: str,
) -> None:
    """A client gone before its answer (499), in the middle of its stream, or while keep-alive
    comments wait for its first event (either way its 200 went out): its line says
    ``client_disconnected``."""
    import aioproxy_echo
    import aioproxy_openai

    stream = case != "answer"
    fake.faults = ["stall_stream" if case == "stream" else "hang"]
    server = {"keepalive_interval": 0.01} if case == "keepalive" else {}
    app = create_app(
        gateway_config(upstream_base, logging={"access_log": True}, server=server),
        plugins=[aioproxy_openai, aioproxy_echo],
        load_entrypoints=False,
    )
    proxy = await aiohttp_server(app)  # which cancels a handler whose client left, as run.py
    finished = _Finished()
    ACCESS_LOG.addHandler(finished)
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "gpt-test", "messages": MESSAGES, "stream": stream}
            url = proxy.make_url("/v1/chat/completions")

            async def ask() -> None:
                async with http.post(url, json=body, headers=AUTH) as response:
                    assert response.status == 200
                    await response.content.readline()  # the first event (or comment) came
                    response.close()

            asking = asyncio.create_task(ask())
            if stream:
                await asking
            else:  # gone while the upstream keeps it waiting
                await eventually(lambda: bool(fake.requests), within=30, what="the upstream called")
                asking.cancel()
            await finished.done.wait()
    finally:
        ACCESS_LOG.removeHandler(finished)
    [line] = lines_of(access_lines)
    assert (line["status"], line["error"]) == (200 if stream else 499, "client_disconnected")


# A whole stream, as chat completions and Anthropic's Messages API send it: its usage, then its
# final event.
_WHOLE_STREAMS = {
    "chat": (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
        b"data: [DONE]\n\n"
    ),
    "messages": (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","content":[],"model":"claude","stop_reason":null,'
        b'"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":3}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ),
}


@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_a_client_that_leaves_after_the_final_event_is_counted_whole(
    aiohttp_server: Any, access_lines: io.StringIO, api: str
) -> None:
    """A stream whose client got every event, its usage and the final event ([DONE],
    message_stop), and left while the upstream had yet to end its body: its usage is counted
    and its line names no disconnect (the bill and the metrics are the answer's, not an
    estimate's)."""
    import aioproxy_anthropic
    import aioproxy_echo
    import aioproxy_openai

    body_ends = asyncio.Event()
    path = "/v1/chat/completions" if api == "chat" else "/v1/messages"

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_WHOLE_STREAMS[api])
        await body_ends.wait()  # the end of its chunked body comes late
        await response.write_eof()
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post(path, answer)
    upstream = await aiohttp_server(upstream_app)
    config = gateway_config(str(upstream.make_url("/v1")), logging={"access_log": True})
    if api == "messages":
        config["models"][0] |= {"provider": "anthropic", "api_base": str(upstream.make_url(""))}
    app = create_app(
        config, plugins=[aioproxy_openai, aioproxy_anthropic, aioproxy_echo], load_entrypoints=False
    )
    proxy = await aiohttp_server(app)  # which cancels a handler whose client left, as run.py
    finished = _Finished()
    ACCESS_LOG.addHandler(finished)
    body: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES, "stream": True}
    if api == "messages":
        body["max_tokens"] = 16
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.make_url(path), json=body, headers=AUTH) as response:
                assert response.status == 200
                got = await response.read()  # the whole answer, its end included
            await http.close()  # and gone, while the upstream's body is still open
            await finished.done.wait()
    finally:
        ACCESS_LOG.removeHandler(finished)
        body_ends.set()
    assert got.endswith(b"data: [DONE]\n\n" if api == "chat" else b'"message_stop"}\n\n')
    [line] = lines_of(access_lines)
    assert (line["status"], line["error"]) == (200, None)
    assert (line["input_tokens"], line["output_tokens"]) == (7, 3)


async def test_a_key_sent_as_the_model_is_not_logged(
    serve_proxy: ServeProxy, upstream_base: str, access_lines: io.StringIO
) -> None:
    """A model name no deployment has is the client's text, logged masked where it looks like
    a key (one pasted in the wrong field); a served model's name is logged as it is."""
    proxy = await serve_proxy(gateway_config(upstream_base, logging={"access_log": True}))
    async with sdk(proxy) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="sk-proj-PASTEDKEY0123456789", messages=MESSAGES
            )
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert [line["model"] for line in lines_of(access_lines)] == ["***", "gpt-test"]
    assert "PASTEDKEY" not in access_lines.getvalue()


async def test_a_plugins_principal_that_sets_only_its_team_has_it_logged(
    serve_proxy: ServeProxy, upstream_base: str, access_lines: io.StringIO
) -> None:
    """An authenticate plugin's Principal with ``team=`` and no ``team_name`` (all a plugin
    could set before teams had names) has its team in the line, not null."""

    class HeaderAuth:
        @hookimpl
        def authenticate(self, request: web.Request) -> Principal | None:
            if request.headers.get("X-Team") == "blue":
                return Principal("blue-user", frozenset({"gpt-test"}), team="blue-team")
            return None

    config = gateway_config(upstream_base, logging={"access_log": True})
    proxy = await serve_proxy(config, plugins=[HeaderAuth()])
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.make_url("/v1/chat/completions"),
            json={"model": "gpt-test", "messages": MESSAGES},
            headers={"X-Team": "blue"},
        ) as response:
            assert response.status == 200
    [line] = lines_of(access_lines)
    assert (line["key"], line["team"]) == ("blue-user", "blue-team")


async def test_a_configured_key_pasted_in_a_path_or_model_is_not_logged(
    serve_proxy: ServeProxy, upstream_base: str, access_lines: io.StringIO
) -> None:
    """A key of the config that looks like no key (a master key chosen by hand), pasted in a
    path no route has or as the model: masked in the line, as what is shaped like a key is."""
    master = "letmein-please-0123"
    config = gateway_config(
        upstream_base, auth={"master_key": master}, logging={"access_log": True}
    )
    proxy = await serve_proxy(config)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {master}"}) as http:
        async with http.get(proxy.make_url(f"/v1/nowhere/{master}")) as response:
            assert response.status == 404
        body = {"model": master, "messages": MESSAGES}
        async with http.post(proxy.make_url("/v1/chat/completions"), json=body) as response:
            assert response.status == 404
    lines = lines_of(access_lines)
    assert [(line["path"], line["model"]) for line in lines] == [
        ("/v1/nowhere/***", None),
        ("/v1/chat/completions", "***"),
    ]
    assert master not in access_lines.getvalue()
