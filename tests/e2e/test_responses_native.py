"""The Responses API through the ``openai`` provider: bridged where the upstream lacks it
(``endpoints``, or a 404 found out), and native responses read back from the deployment that
created them, by their owner only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_openai
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import Deployment, create_app, hookimpl
from aioproxy.config import ConfigError, parse_config
from aioproxy.routes import Kind
from aioproxy.testing import FakeOpenAI, assert_openai_error
from aioproxy.testing.openai_upstream import MISSING_MODEL
from tests.schemas import validate
from tests.support import (
    ALICE,
    BOB,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    alice_and_bob,
    sdk,
    upstream_model,
)

HEADERS = {"alice": {"Authorization": f"Bearer {ALICE}"}, "bob": {"Authorization": f"Bearer {BOB}"}}


def config(api_base: str, store_path: Path, **entry: Any) -> dict[str, Any]:
    return {
        "auth": alice_and_bob(),
        "models": [upstream_model("m", api_base, **entry)],
        "database": {"url": f"sqlite:///{store_path}"},  # where stored responses live
    }


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "responses.sqlite3"


@pytest.fixture
def start(aiohttp_server: Any, store_path: Path) -> Any:
    async def serve_proxy(fake: FakeOpenAI, **entry: Any) -> TestServer:
        upstream = await aiohttp_server(fake.app())
        app = create_app(
            config(str(upstream.make_url("/v1")), store_path, **entry),
            plugins=[aioproxy_openai],
            load_entrypoints=False,
        )
        return await aiohttp_server(app)

    return serve_proxy


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def paths(fake: FakeOpenAI) -> list[str]:
    return [f"{r.method} {r.path}" for r in fake.requests]


# -- 10.4: bridged where the upstream has no /responses -------------------------------------

CHAT_ONLY = {"endpoints": ["chat_completions", "completions"]}
WAYS = pytest.mark.parametrize("entry", [CHAT_ONLY, {}], ids=["endpoints", "404-fallback"])


@WAYS
async def test_responses_bridged_for_an_upstream_without_them(
    start: Any, entry: dict[str, Any]
) -> None:
    fake = FakeOpenAI(responses_route=False)
    proxy = await start(fake, **entry)
    async with sdk(proxy, ALICE) as client:
        first = await client.responses.create(model="m", input="hello")
        assert first.output_text == "fake reply to: hello"
        validate("Response", first.model_dump(exclude_unset=True, by_alias=True))
        second = await client.responses.create(
            model="m", input="and again", previous_response_id=first.id
        )
        assert second.output_text == "fake reply to: and again"
        # The chained request carried the first turn to chat.
        messages = fake.last.body["messages"]
        assert [m["content"] for m in messages] == ["hello", first.output_text, "and again"]
        async with client.responses.stream(model="m", input="streamed") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.output_text == "fake reply to: streamed"
        assert (await client.responses.retrieve(second.id)).id == second.id
    native_tries = paths(fake).count("POST /v1/responses")
    assert native_tries == (0 if entry else 1)  # the fallback asked once, then never again
    assert paths(fake).count("POST /v1/chat/completions") == 3


async def test_the_fallback_serves_a_first_stream_and_is_logged_once(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeOpenAI(responses_route=False)
    proxy = await start(fake)
    caplog.set_level(logging.WARNING, logger="aioproxy")
    async with sdk(proxy, ALICE) as client:
        stream = await client.responses.create(model="m", input="hi", stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == "fake reply to: hi"
        await client.responses.create(model="m", input="again")
    assert paths(fake) == [
        "POST /v1/responses",
        "POST /v1/chat/completions",
        "POST /v1/chat/completions",
    ]
    fallbacks = [r for r in caplog.records if "no /responses route" in r.getMessage()]
    assert len(fallbacks) == 1 and "m (openai:gpt-4o-mini)" in fallbacks[0].getMessage()


@pytest.mark.parametrize("fault", ["status:405", "status:404:text"])
async def test_a_405_or_a_bare_404_falls_back_too(start: Any, fault: str) -> None:
    fake = FakeOpenAI()
    fake.faults.append(fault)  # a server whose 404 is not OpenAI's JSON (FastAPI's, nginx's)
    proxy = await start(fake)
    async with sdk(proxy, ALICE) as client:
        response = await client.responses.create(model="m", input="hi")
        assert response.output_text == "fake reply to: hi"
        await client.responses.create(model="m", input="again")
    assert paths(fake) == [
        "POST /v1/responses",
        "POST /v1/chat/completions",
        "POST /v1/chat/completions",
    ]


async def test_a_missing_model_is_not_taken_for_a_missing_route(
    start: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake, model=MISSING_MODEL)
    body = {"model": "m", "input": "hi"}
    url = proxy.make_url("/v1/responses")
    async with http.post(url, json=body, headers=HEADERS["alice"]) as response:
        # The deployment's own misconfiguration (a 502 the router may retry elsewhere), never
        # a missing route: no bridge behind its back.
        await assert_openai_error(response, 502, "upstream_model_not_found")
    assert set(paths(fake)) == {"POST /v1/responses"}


async def test_endpoints_leave_out_what_the_upstream_lacks(
    start: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake, endpoints=["chat_completions"])
    async with http.post(
        proxy.make_url("/v1/embeddings"),
        json={"model": "m", "input": "x"},
        headers=HEADERS["alice"],
    ) as response:
        await assert_openai_error(response, 400, "unsupported_endpoint")
    async with sdk(proxy, ALICE) as client:  # completions: bridged onto chat
        completion = await client.completions.create(model="m", prompt="say")
    assert completion.choices[0].text == "fake reply to: say"
    assert paths(fake) == ["POST /v1/chat/completions"]


class PluginDeployment:
    """Maps ``plugin-m`` to a deployment made here, not in the config, with ``endpoints``."""

    def __init__(self, api_base: str) -> None:
        self.deployment = Deployment(
            id="plugin-m",
            name="plugin-m",
            provider="openai",
            model=UPSTREAM_MODEL,
            api_base=api_base,
            endpoints=frozenset({Kind.CHAT_COMPLETIONS}),
        )

    @hookimpl
    def map_model(self, model: str) -> Deployment | None:
        return self.deployment if model == "plugin-m" else None


async def test_endpoints_of_a_deployment_a_plugin_made(
    aiohttp_server: Any, store_path: Path
) -> None:
    fake = FakeOpenAI(responses_route=False)
    upstream = await aiohttp_server(fake.app())
    api_base = str(upstream.make_url("/v1"))
    app = create_app(
        config(api_base, store_path),
        plugins=[aioproxy_openai, PluginDeployment(api_base)],
        load_entrypoints=False,
    )
    proxy = await aiohttp_server(app)
    async with sdk(proxy) as client:
        for _ in range(2):
            response = await client.responses.create(model="plugin-m", input="hi")
            assert response.output_text == "fake reply to: hi"
    assert paths(fake) == ["POST /v1/chat/completions"] * 2


def test_endpoints_are_checked_at_load() -> None:
    entry = {"name": "m", "provider": "openai", "endpoints": ["chat_completions", "chat"]}
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [entry]})
    assert "`$.models[0].endpoints[1]`" in str(caught.value) and "'chat'" in str(caught.value)
    with pytest.raises(ConfigError, match=r"\$\.models\[0\]\.endpoints"):
        parse_config({"models": [{**entry, "endpoints": []}]})


# -- 10.5: native responses, read back through the deployment that made them ---------------


async def test_native_responses_are_read_back_from_their_upstream(
    start: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake)
    async with sdk(proxy, ALICE) as client:
        created = await client.responses.create(model="m", input="keep me")
        stream = await client.responses.create(model="m", input="s", stream=True)
        streamed = [event async for event in stream]
        stream_id = streamed[0].response.id
        assert (await client.responses.retrieve(created.id)).output_text == created.output_text
        assert (await client.responses.retrieve(stream_id)).id == stream_id
        items = await client.responses.input_items.list(created.id)
        texts = [item.content[0].text for item in items.data]  # type: ignore[union-attr]
        assert texts == ["keep me"]
        with pytest.raises(openai.BadRequestError, match="synchronous"):
            await client.responses.cancel(created.id)
        chained = await client.responses.create(
            model="m", input="next", previous_response_id=created.id
        )
        assert fake.last.body["previous_response_id"] == created.id
        await client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)  # the upstream's own 404
    assert chained.previous_response_id == created.id
    url = proxy.make_url(f"/v1/responses/{stream_id}?stream=true")
    async with http.get(url, headers=HEADERS["alice"]) as response:
        await assert_openai_error(response, 400, "unsupported_parameter")
    assert fake.last.path == f"/v1/responses/{created.id}"
    assert fake.last.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_another_keys_native_responses_are_not_there(
    start: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake)
    async with sdk(proxy, ALICE) as client:
        created = await client.responses.create(model="m", input="secret")
    seen = len(fake.requests)
    one = f"/v1/responses/{created.id}"
    bob = HEADERS["bob"]
    for method, path in (
        ("GET", one),
        ("DELETE", one),
        ("GET", one + "/input_items"),
        ("POST", one + "/cancel"),
        ("GET", "/v1/responses/resp_never_seen"),
        ("GET", "/responses/resp_never_seen/input_items"),
    ):
        async with http.request(method, proxy.make_url(path), headers=bob) as response:
            await assert_openai_error(response, 404)
    for previous in (created.id, "resp_never_seen"):
        body = {"model": "m", "input": "tell me", "previous_response_id": previous}
        async with http.post(proxy.make_url("/v1/responses"), json=body, headers=bob) as response:
            error = await assert_openai_error(response, 404, "previous_response_not_found")
        assert error["param"] == "previous_response_id"
    assert len(fake.requests) == seen  # bob's requests never reached the upstream
    async with sdk(proxy, ALICE) as client:  # and alice's response is still there for her
        assert (await client.responses.retrieve(created.id)).id == created.id


async def test_native_ids_survive_a_restart(start: Any) -> None:
    fake = FakeOpenAI()
    first = await start(fake)
    async with sdk(first, ALICE) as client:
        created = await client.responses.create(model="m", input="remember me")
    await first.close()
    again = await start(fake)
    async with sdk(again, ALICE) as client:
        assert (await client.responses.retrieve(created.id)).id == created.id
    async with sdk(again, BOB) as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)


async def test_stored_false_is_not_remembered(start: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake)
    async with sdk(proxy, ALICE) as client:
        created = await client.responses.create(model="m", input="forget me", store=False)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
    assert paths(fake) == ["POST /v1/responses"]


async def test_previous_response_needs_the_store(
    aiohttp_server: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())
    cfg = config(str(upstream.make_url("/v1")), tmp_path / "s.sqlite3")
    cfg["responses"] = {"store": False}
    proxy = await aiohttp_server(create_app(cfg, plugins=[aioproxy_openai], load_entrypoints=False))
    body = {"model": "m", "input": "x", "previous_response_id": "resp_anything"}
    async with http.post(
        proxy.make_url("/v1/responses"), json=body, headers=HEADERS["alice"]
    ) as response:
        await assert_openai_error(response, 400, "unsupported_parameter")
    assert fake.requests == []


# -- bridged responses: input_items and cancel from the store ------------------------------


async def test_bridged_input_items_and_cancel(start: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeOpenAI()
    proxy = await start(fake, **CHAT_ONLY)
    async with sdk(proxy, ALICE) as client:
        first = await client.responses.create(model="m", input="one")
        second = await client.responses.create(
            model="m",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "two"}]}],
            previous_response_id=first.id,
        )
        items = await client.responses.input_items.list(second.id, order="asc")
        texts = [
            (item.role, item.content[0].text)  # type: ignore[union-attr]
            for item in items.data
        ]
        assert texts == [("user", "one"), ("assistant", first.output_text), ("user", "two")]
        assert items.has_more is False and items.first_id == items.data[0].id
        page = await client.responses.input_items.list(second.id, limit=1)  # newest first
        assert [item.id for item in page.data] == [items.data[-1].id] and page.has_more
        rest = await client.responses.input_items.list(second.id, limit=5, after=page.data[0].id)
        assert [item.id for item in rest.data] == [i.id for i in items.data[-2::-1]]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.cancel(first.id)
    assert caught.value.message.endswith("Cannot cancel a synchronous response.")
    for method, suffix in (("GET", "/input_items"), ("POST", "/cancel")):
        url = proxy.make_url(f"/v1/responses/{first.id}{suffix}")
        async with http.request(method, url, headers=HEADERS["bob"]) as response:
            await assert_openai_error(response, 404)
    async with http.get(
        proxy.make_url(f"/v1/responses/{first.id}/input_items?limit=0"), headers=HEADERS["alice"]
    ) as response:
        await assert_openai_error(response, 400, "invalid_value")
    assert not any("/v1/responses" in p for p in paths(fake))
