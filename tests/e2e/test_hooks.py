"""Each hook, driven by a throwaway plugin through real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from aioproxy import (
    BadRequest,
    Call,
    Deployment,
    JSONReply,
    Outcome,
    Principal,
    Provider,
    ProxyError,
    RateLimited,
    assistant_choice,
    chat_completion,
    completion_usage,
    hookimpl,
)
from aioproxy.hookspecs import HOOK_NAMES
from aioproxy.testing import FakeOpenAI, eventually
from tests.support import AUTH, MESSAGES, ServeProxy, gateway_config, sdk


def test_every_hook_has_a_test() -> None:
    tested = {
        name.removeprefix("test_hook_") for name in globals() if name.startswith("test_hook_")
    }
    assert set(HOOK_NAMES) <= tested, set(HOOK_NAMES) - tested


async def test_hook_authenticate(serve_proxy: ServeProxy, upstream_base: str) -> None:
    class HeaderAuth:
        @hookimpl
        async def authenticate(self, request: web.Request) -> Principal | None:
            await asyncio.sleep(0)  # async impls are awaited
            if request.headers.get("X-Team") == "blue":
                return Principal("blue-team", frozenset({"echo"}))
            return None  # defer to the config keys

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[HeaderAuth()])
    async with aiohttp.ClientSession(headers={"X-Team": "blue"}) as http:
        async with http.get(proxy.make_url("/v1/models")) as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["echo"]
    async with sdk(proxy) as client:  # the master key still works through the built-in
        assert len((await client.models.list()).data) == 2


async def test_hook_map_model(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    class Prefixed:
        @hookimpl
        def map_model(self, model: str) -> Deployment | None:
            if model.startswith("up/"):
                return Deployment(
                    name=model, provider="openai", model=model[3:], api_base=upstream_base
                )
            return None

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Prefixed()])
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="up/gpt-4o", messages=MESSAGES)
    assert fake.last.body["model"] == "gpt-4o"
    assert "authorization" not in fake.last.headers  # that deployment has no key


async def test_hook_list_models(serve_proxy: ServeProxy, upstream_base: str) -> None:
    class Extra:
        @hookimpl
        def list_models(self) -> list[str]:
            return ["extra-model"]

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Extra()])
    async with sdk(proxy) as client:
        assert {m.id for m in (await client.models.list()).data} == {
            "gpt-test",
            "echo",
            "extra-model",
        }


async def test_hook_before_request(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    class Guard:
        @hookimpl
        async def before_request(self, call: Call) -> None:
            if call.get("user") == "banned":
                raise RateLimited("You are out of quota")
            call.set("temperature", 0.0)
            call.pop("seed")

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Guard()])
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES, seed=3)
        assert fake.last.body["temperature"] == 0.0 and "seed" not in fake.last.body
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES, user="banned")


async def test_hook_before_attempt(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """Once per try, retries included; a header it adds goes upstream on that try only."""
    seen: list[tuple[str, int]] = []

    class Tracer:
        @hookimpl
        def before_attempt(self, call: Call, deployment: Deployment, attempt: int) -> None:
            seen.append((deployment.name, attempt))
            call.upstream_headers["x-attempt"] = str(attempt)

    config = gateway_config(upstream_base, router={"retry_backoff": 0})
    proxy = await serve_proxy(config, plugins=[Tracer()])
    fake.faults = ["status:500"]
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert seen == [("gpt-test", 1), ("gpt-test", 2)]
    assert [r.headers.get("x-attempt") for r in fake.requests] == ["1", "2"]


async def test_hook_after_attempt(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """Each try's status, error and the upstream's own request id."""
    seen: list[tuple[int, int, str | None, str | None]] = []

    class Meter:
        @hookimpl
        def after_attempt(
            self, call: Call, attempt: int, status: int, error: Exception | None, elapsed: float
        ) -> None:
            assert elapsed >= 0
            seen.append(
                (attempt, status, type(error).__name__ if error else None, call.upstream_request_id)
            )

    config = gateway_config(upstream_base, router={"retry_backoff": 0})
    proxy = await serve_proxy(config, plugins=[Meter()])
    fake.faults = ["status:500"]
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert [(a, s, e) for a, s, e, _ in seen] == [(1, 500, "ProxyError"), (2, 200, None)]
    assert all(rid is not None and rid.startswith("req_") for *_, rid in seen)


async def test_hook_after_attempt_hears_an_attempt_its_client_cut_short(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """An attempt under way when the client leaves ends with it: after_attempt runs once per
    before_attempt, with status 499 and a ClientDisconnected (the attempt counted, its span
    ended, whatever a plugin started in before_attempt released)."""
    began: list[int] = []
    ended: list[tuple[int, int, str]] = []
    over = asyncio.Event()

    class Meter:
        @hookimpl
        def before_attempt(self, attempt: int) -> None:
            began.append(attempt)

        @hookimpl
        def after_attempt(self, attempt: int, status: int, error: Exception | None) -> None:
            ended.append((attempt, status, type(error).__name__))

        @hookimpl
        def on_error(self) -> None:
            over.set()

    fake.faults = ["hang"]
    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Meter()])
    async with aiohttp.ClientSession() as http:
        body = {"model": "gpt-test", "messages": MESSAGES}
        asking = asyncio.create_task(
            http.post(proxy.make_url("/v1/chat/completions"), json=body, headers=AUTH)
        )
        await eventually(lambda: bool(fake.requests), within=30, what="the upstream called")
        asking.cancel()  # the client leaves while the upstream keeps it waiting
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await asyncio.wait_for(over.wait(), 30)  # a safety net: the handler's end is the event
    assert began == [1]
    assert ended == [(1, 499, "ClientDisconnected")]


async def test_hook_after_response(serve_proxy: ServeProxy, upstream_base: str) -> None:
    seen: list[tuple[str, Outcome]] = []

    class Meter:
        @hookimpl
        def after_response(self, call: Call, outcome: Outcome) -> None:
            seen.append((call.model, outcome))

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Meter()])
    async with sdk(proxy) as client:
        done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _ in stream:
            pass
    await asyncio.sleep(0.05)  # the stream's hook runs after its last byte
    assert [model for model, _ in seen] == ["gpt-test", "gpt-test"]
    plain, streamed = seen[0][1], seen[1][1]
    assert plain.status == 200 and not plain.stream
    assert done.usage is not None
    assert plain.usage() is not None and plain.usage().total_tokens == done.usage.total_tokens  # type: ignore[union-attr]
    assert streamed.stream and streamed.events >= 5 and streamed.ttfb is not None
    assert streamed.usage() is not None and streamed.usage().total_tokens > 0  # type: ignore[union-attr]


async def test_hook_on_error(serve_proxy: ServeProxy, upstream_base: str) -> None:
    errors: list[tuple[Exception, Call | None]] = []

    class Watcher:
        @hookimpl
        def on_error(self, error: Exception, call: Call | None) -> None:
            errors.append((error, call))

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Watcher()])
    async with sdk(proxy) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)
    async with sdk(proxy, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert [type(e).__name__ for e, _ in errors] == ["ModelNotFound", "AuthenticationError"]
    assert errors[0][1] is not None and errors[0][1].model == "nope"
    assert errors[1][1] is None


async def test_hook_before_refusal(serve_proxy: ServeProxy, upstream_base: str) -> None:
    """Heard for a request refused for what it asked (its body: a 400, aiohttp's 413 as a
    ProxyError; a model not served: 404), not for one served; what an implementation raises is
    the answer, and what on_error hears."""
    heard: list[tuple[int, str]] = []
    errors: list[Exception] = []

    class Refusals:
        @hookimpl
        async def before_refusal(self, call: Call, error: Exception) -> None:
            await asyncio.sleep(0)  # async impls are awaited
            assert isinstance(error, ProxyError)
            heard.append((error.status, call.model))
            if call.request.headers.get("X-Refuse") == "yes":
                raise RateLimited("refused in its place", code="rate_limit_exceeded")

        @hookimpl
        def on_error(self, error: Exception) -> None:
            errors.append(error)

    config = gateway_config(upstream_base, server={"max_body_size": 1024})
    proxy = await serve_proxy(config, plugins=[Refusals()])
    path = proxy.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(path, data=b'{"model": "gpt-test", "messages": 1}') as response:
            assert response.status == 400
        too_large = b'{"model": "gpt-test", "pad": "' + b"x" * 2048 + b'"}'
        async with http.post(path, data=too_large) as response:
            assert response.status == 413
        async with http.post(path, data=b"{", headers={"X-Refuse": "yes"}) as response:
            assert response.status == 429
            assert (await response.json())["error"]["message"] == "refused in its place"
        async with http.post(path, json={"model": "nope", "messages": MESSAGES}) as response:
            assert response.status == 404
        async with http.post(path, json={"model": "gpt-test", "messages": MESSAGES}) as response:
            assert response.status == 200
    assert heard == [(400, "gpt-test"), (413, ""), (400, ""), (404, "nope")]
    assert [getattr(e, "status", None) for e in errors] == [400, 413, 429, 404]


async def test_hook_register_routes(serve_proxy: ServeProxy, upstream_base: str) -> None:
    async def usage(request: web.Request) -> web.Response:
        raise BadRequest("no usage yet", param="day")

    class Routes:
        @hookimpl
        def register_routes(self, register: Any) -> None:
            register("GET", "/v1/usage", usage)

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Routes()])
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.make_url("/v1/usage"), headers=AUTH) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "day"


async def test_hook_register_contexts(serve_proxy: ServeProxy, upstream_base: str) -> None:
    events: list[str] = []

    class Lifespan:
        @hookimpl
        def register_contexts(self, register: Any, app: web.Application) -> None:
            async def context(started: web.Application) -> Any:
                assert started is app
                events.append("start")
                yield
                events.append("stop")

            register(context)

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Lifespan()])
    assert events == ["start"]  # before the first request could come
    await proxy.close()
    assert events == ["start", "stop"]


async def test_hook_register_providers(serve_proxy: ServeProxy, upstream_base: str) -> None:
    class Constant(Provider):
        name = "constant"

        async def chat_completions(self, call: Call) -> JSONReply:
            choice = assistant_choice(0, "constant", [], "stop")
            usage = completion_usage(1, 1)
            answer = chat_completion(
                "c1", model=call.model, created=0, choices=[choice], usage=usage
            )
            return JSONReply.of(answer)

    class Plugin:
        @hookimpl
        def register_providers(self, register: Any) -> None:
            register(Constant)

    config = gateway_config(upstream_base)
    config["models"].append({"name": "const", "provider": "constant"})
    proxy = await serve_proxy(config, plugins=[Plugin()])
    async with sdk(proxy) as client:
        done = await client.chat.completions.create(model="const", messages=MESSAGES)
        assert done.choices[0].message.content == "constant"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="const", input="x")
    assert "does not serve embeddings" in caught.value.message


async def test_hook_tryfirst_plugin_replaces_builtin(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    class Everything:
        @hookimpl(tryfirst=True)
        def map_model(self) -> Deployment:
            return Deployment(name="all", provider="openai", model="forced", api_base=upstream_base)

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Everything()])
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="echo", messages=MESSAGES)
    assert fake.last.body["model"] == "forced"


async def test_a_failing_after_response_hook_does_not_stop_the_others(
    serve_proxy: ServeProxy, upstream_base: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    class Broken:
        @hookimpl(tryfirst=True)
        def after_response(self) -> None:
            raise RuntimeError("logging plugin bug")

    class Billing:
        @hookimpl
        def after_response(self, call: Call) -> None:
            seen.append(call.model)

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Broken(), Billing()])
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert seen == ["gpt-test"]
    assert any("after_response" in r.getMessage() for r in caplog.records)
