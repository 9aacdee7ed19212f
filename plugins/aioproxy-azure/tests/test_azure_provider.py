"""The azure provider through aioproxy, against the fake Azure resource of conftest.py: the kit's
checks, the official ``openai`` SDK, every error mapping, cancellation and the settings."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioproxy_azure
import openai
import pytest
from aioproxy_azure import AzureProvider

from aioproxy import ConfigError, RegisterProvider, hookimpl, testing

if TYPE_CHECKING:  # conftest is pytest's to import; its fixtures come in by name
    from conftest import FakeAzure, StartAzureProxy, StartUp

REPLY = "fake reply to: Say hello to the kit"
DEPLOYMENT = "gpt-4o-prod"
UPSTREAM_KEY = "azure-key-0123456789abcdef"
DEFAULT_API_VERSION = "2024-10-21"


# -- the kit's checks, on both kinds of route ------------------------------------------------


async def test_chat(proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    assert await testing.check_chat(proxy, "gpt") == REPLY
    last = azure.last
    assert last.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert last.query == f"api-version={DEFAULT_API_VERSION}"
    assert last.headers["api-key"] == UPSTREAM_KEY
    assert "authorization" not in last.headers  # never the client's key
    assert last.body == {"model": DEPLOYMENT, "messages": testing.HELLO}


async def test_chat_stream(proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    assert await testing.check_chat_stream(proxy, "gpt") == REPLY
    assert azure.last.headers["accept"] == "text/event-stream"


async def test_completion(proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    assert await testing.check_completion(proxy, "gpt") == REPLY
    assert azure.last.path == f"/openai/deployments/{DEPLOYMENT}/completions"


async def test_embeddings(proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    vectors = await testing.check_embeddings(proxy, "embed", inputs=["a", "b c"], dims=8)
    assert len(vectors) == 2
    assert azure.last.path == "/openai/deployments/embed-prod/embeddings"


async def test_the_v1_api(v1_proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    """``api_version = "v1"``: the /openai/v1/ routes, no api-version, the deployment as model."""
    assert await testing.check_chat(v1_proxy, "gpt") == REPLY
    assert (azure.last.path, azure.last.query) == ("/openai/v1/chat/completions", "")
    assert azure.last.body["model"] == DEPLOYMENT
    assert await testing.check_chat_stream(v1_proxy, "gpt") == REPLY
    assert await testing.check_responses(v1_proxy, "gpt") == REPLY
    assert azure.last.path == "/openai/v1/responses"
    assert len(await testing.check_embeddings(v1_proxy, "embed", dims=8)) == 2


async def test_responses_on_a_preview_api_version(
    start_azure_proxy: StartAzureProxy, azure: FakeAzure
) -> None:
    proxy = await start_azure_proxy(api_version="2025-04-01-preview")
    assert await testing.check_responses(proxy, "gpt") == REPLY
    assert azure.last.path == "/openai/responses"
    assert azure.last.query == "api-version=2025-04-01-preview"
    async with proxy.openai() as client:
        created = await client.responses.create(model="gpt", input="hello")
        again = await client.responses.retrieve(created.id)  # response_action, api-version kept
    assert again.id == created.id
    assert azure.last.path == f"/openai/responses/{created.id}"
    assert azure.last.query == "api-version=2025-04-01-preview"


# -- through the official SDK ------------------------------------------------------------------


async def test_content_filter_results_are_kept(proxy: testing.ProxyUnderTest) -> None:
    async with proxy.openai() as client:
        completion = await client.chat.completions.create(model="gpt", messages=testing.HELLO)
    extra = completion.model_extra or {}
    assert extra["prompt_filter_results"][0]["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    choice_extra = completion.choices[0].model_extra or {}
    assert choice_extra["content_filter_results"]["hate"] == {"filtered": False, "severity": "safe"}


async def test_content_filter_results_of_a_stream_are_kept(
    proxy: testing.ProxyUnderTest, azure: FakeAzure
) -> None:
    """Azure's stream opens with a chunk without choices that carries the prompt's results."""
    azure.recorded_stream = True
    async with proxy.openai() as client:
        stream = await client.chat.completions.create(
            model="gpt", messages=testing.HELLO, stream=True
        )
        chunks = [chunk async for chunk in stream]
    first = chunks[0]
    assert first.choices == []
    assert (first.model_extra or {})["prompt_filter_results"][0]["prompt_index"] == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    hello = chunks[2].choices[0].model_extra or {}
    assert hello["content_filter_results"]["violence"] == {"filtered": False, "severity": "safe"}


async def test_a_tool_round_trip(proxy: testing.ProxyUnderTest, azure: FakeAzure) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    async with proxy.openai() as client:
        first = await client.chat.completions.create(model="gpt", messages=messages, tools=tools)
        call = (first.choices[0].message.tool_calls or [])[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert call.type == "function" and call.function.name == "get_weather"
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        second = await client.chat.completions.create(model="gpt", messages=messages)
    assert second.choices[0].message.content == "fake reply to: Weather in Paris?"
    assert azure.last.body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": "sunny",
    }


async def test_a_streamed_tool_call(proxy: testing.ProxyUnderTest) -> None:
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with proxy.openai() as client:
        stream = await client.chat.completions.create(
            model="gpt", messages=testing.HELLO, tools=tools, stream=True
        )
        chunks = [chunk async for chunk in stream]
    names = [
        call.function.name
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
        if call.function is not None and call.function.name
    ]
    assert names == ["f"]


async def test_images_and_structured_output_pass_through(
    proxy: testing.ProxyUnderTest, azure: FakeAzure
) -> None:
    """A pass-through: the image parts and the JSON schema reach Azure as the client sent them."""
    image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGAAAAAFAAGq0X6hAAAAAElFTkSuQmCC"
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in it?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        }
    ]
    schema: Any = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"thing": {"type": "string"}},
                "required": ["thing"],
                "additionalProperties": False,
            },
        },
    }
    async with proxy.openai() as client:
        completion = await client.chat.completions.create(
            model="gpt", messages=messages, response_format=schema, seed=7
        )
    assert completion.choices[0].message.content == "fake reply to: What is in it?"
    assert azure.last.body == {
        "model": DEPLOYMENT,
        "messages": messages,
        "response_format": schema,
        "seed": 7,
    }


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("content_filter", 400, "content_filter"),
        ("bad_request", 400, "invalid_value"),
        ("rate_limit", 429, "rate_limit_exceeded"),
        ("server_error", 500, None),
        ("unavailable", 503, None),
        ("unauthorized", 502, "upstream_auth_failed"),  # the proxy's key, not the client's
        ("deployment_not_found", 502, "upstream_model_not_found"),  # the config's deployment
    ],
)
async def test_azure_errors(
    proxy: testing.ProxyUnderTest, azure: FakeAzure, fault: str, status: int, code: str | None
) -> None:
    await testing.check_error_mapping(
        proxy, "gpt", lambda: azure.azure_faults.append(fault), status, code=code
    )


@pytest.mark.parametrize(("fault", "status", "code"), testing.TRANSPORT_FAULTS)
async def test_transport_errors(
    proxy: testing.ProxyUnderTest, azure: FakeAzure, fault: str, status: int, code: str
) -> None:
    await testing.check_error_mapping(
        proxy, "gpt", lambda: azure.faults.append(fault), status, code=code
    )


async def test_a_content_filter_refusal_names_what_struck(
    proxy: testing.ProxyUnderTest, azure: FakeAzure
) -> None:
    azure.azure_faults.append("content_filter")
    async with proxy.openai() as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="gpt", messages=testing.HELLO)
    assert refused.value.code == "content_filter"
    assert refused.value.param == "prompt"
    assert "content management policy" in refused.value.message
    assert "(filtered: sexual, violence)" in refused.value.message


async def test_a_rate_limit_keeps_its_retry_after(
    proxy: testing.ProxyUnderTest, azure: FakeAzure
) -> None:
    azure.azure_faults.append("rate_limit")
    body = {"model": "gpt", "messages": testing.HELLO}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        await testing.assert_openai_error(response, 429, "rate_limit_exceeded")
        assert response.headers["Retry-After"] == "7"


async def test_a_wrong_key_deployment_name_or_api_version_is_a_502(
    start_azure_proxy: StartAzureProxy, azure_base: str, azure: FakeAzure
) -> None:
    """What Azure refuses for the config's fault is the gateway's 502, never the client's 4xx."""
    common = {"provider": "azure", "api_base": azure_base, "api_key": UPSTREAM_KEY}
    models = [
        {"name": "wrong-key", "model": DEPLOYMENT, **common, "api_key": "azure-key-wrong"},
        {"name": "wrong-deployment", "model": "no-such-deployment", **common},
        {
            "name": "wrong-version",
            "model": DEPLOYMENT,
            **common,
            "settings": {"api_version": "1999-01-01"},
        },
    ]
    proxy = await start_azure_proxy(models)
    expected = {
        "wrong-key": "upstream_auth_failed",
        "wrong-deployment": "upstream_model_not_found",
        "wrong-version": "upstream_not_found",
    }
    async with proxy.http() as http:
        for model, code in expected.items():
            body = {"model": model, "messages": testing.HELLO}
            async with http.post("/v1/chat/completions", json=body) as response:
                error = await testing.assert_openai_error(response, 502, code)
                assert "azure-key" not in json.dumps(error)
    assert [status for _, status in azure.refused] == [401, 404, 404]


async def test_client_leaving_closes_the_upstream(
    proxy: testing.ProxyUnderTest, azure: FakeAzure
) -> None:
    azure.stream_delay = 0.02
    azure.stream_chunks = 100  # two seconds of stream, were it left to run
    await testing.check_cancellation(proxy, "gpt", lambda: azure.in_flight)


# -- credentials -------------------------------------------------------------------------------


async def test_an_azure_ad_token_is_sent_as_bearer(
    start_azure_proxy: StartAzureProxy, azure: FakeAzure
) -> None:
    azure.tokens.add("entra-token-1")
    proxy = await start_azure_proxy(azure_ad_token="entra-token-1")
    assert await testing.check_chat(proxy, "gpt") == REPLY
    assert azure.last.headers["authorization"] == "Bearer entra-token-1"
    assert "api-key" not in azure.last.headers


# A token as Entra ID issues them (a JWT): nothing key-like about it to a pattern.
ENTRA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJjb2duaXRpdmUifQ.c2lnbmF0dXJlLW9mLWVudHJh"


@pytest.mark.parametrize("status", [400, 500])
async def test_an_azure_ad_token_an_upstream_echoes_is_masked(
    start_azure_proxy: StartAzureProxy,
    azure: FakeAzure,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    azure.tokens.add(ENTRA_TOKEN)
    proxy = await start_azure_proxy(azure_ad_token=ENTRA_TOKEN)
    azure.echo_status = status
    for stream in (False, True):
        body = {"model": "gpt", "messages": testing.HELLO, "stream": stream}
        async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
            said = await response.text()
            await testing.assert_openai_error(response, status)
        assert "Bad request" in said and "Bearer ***" in said  # the upstream's words, masked
        assert ENTRA_TOKEN not in said
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert ENTRA_TOKEN not in logged


def _token_script(tmp_path: Path) -> list[str]:
    """A token command: prints token-1, token-2, ... on successive runs (a counter file)."""
    counter = tmp_path / "runs"
    counter.write_text("0")
    script = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) + 1; "
        "p.write_text(str(n)); print(f'token-{n}')"
    )
    return [sys.executable, "-c", script, str(counter)]


class _ClockedAzure:
    """Registers the azure provider on a fake clock, for the token command's expiry."""

    def __init__(self, clock: testing.FakeClock) -> None:
        self.clock = clock

    @hookimpl
    def register_providers(self, register: RegisterProvider) -> None:
        register(functools.partial(AzureProvider, clock=self.clock.now), "azure")


async def test_a_token_command_is_read_at_start_up_and_refreshed_on_expiry(
    start_azure_proxy: StartAzureProxy, azure: FakeAzure, tmp_path: Path
) -> None:
    azure.tokens |= {"token-1", "token-2"}
    clock = testing.FakeClock()
    proxy = await start_azure_proxy(
        plugins=[_ClockedAzure(clock)],
        token_command=_token_script(tmp_path),
        token_lifetime=3600,
    )
    assert (tmp_path / "runs").read_text() == "1"  # at start-up, before any request
    assert await testing.check_chat(proxy, "gpt") == REPLY
    assert azure.last.headers["authorization"] == "Bearer token-1"
    clock.advance(3600)  # expired: the next request waits for a fresh one
    assert await testing.check_chat(proxy, "gpt") == REPLY
    assert azure.last.headers["authorization"] == "Bearer token-2"
    assert (tmp_path / "runs").read_text() == "2"


async def test_a_token_commands_token_an_upstream_echoes_is_masked(
    start_azure_proxy: StartAzureProxy, azure: FakeAzure, caplog: pytest.LogCaptureFixture
) -> None:
    """A token read at run time is in no config: masked as the JWT it is."""
    caplog.set_level(logging.DEBUG)
    azure.tokens.add(ENTRA_TOKEN)
    proxy = await start_azure_proxy(token_command=[sys.executable, "-c", f"print({ENTRA_TOKEN!r})"])
    azure.echo_status = 500
    body = {"model": "gpt", "messages": testing.HELLO}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        said = await response.text()
        await testing.assert_openai_error(response, 500)
    assert "Bearer ***" in said and ENTRA_TOKEN not in said
    assert ENTRA_TOKEN not in "\n".join(record.getMessage() for record in caplog.records)


async def test_a_failing_token_command_stops_start_up(start_up: StartUp, azure_base: str) -> None:
    failing = [sys.executable, "-c", "import sys; sys.exit('please run az login')"]
    model = {"name": "gpt", "provider": "azure", "model": DEPLOYMENT, "api_base": azure_base}
    with pytest.raises(ConfigError, match="please run az login") as failed:
        await start_up([{**model, "settings": {"token_command": failing}}])
    assert "model 'gpt'" in str(failed.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_verison": "v1"}, "did you mean `api_version`"),
        ({"token_refresh_margin": -1}, "token_refresh_margin"),
        ({"azure_ad_token": "t", "token_command": ["az"]}, "not both"),
    ],
)
async def test_bad_settings_stop_start_up(
    start_azure_proxy: StartAzureProxy, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        await start_azure_proxy(**settings)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"api_base": None}, "needs api_base"),
        ({"api_key": None}, "needs api_key"),
    ],
)
async def test_a_deployment_without_endpoint_or_credential_stops_start_up(
    start_up: StartUp, azure_base: str, entry: dict[str, Any], message: str
) -> None:
    model = {"name": "gpt", "provider": "azure", "model": DEPLOYMENT, "api_base": azure_base}
    model |= {"api_key": UPSTREAM_KEY} | entry
    with pytest.raises(ConfigError, match=message):
        await start_up([{k: v for k, v in model.items() if v is not None}])


def test_installed_under_the_aioproxy_entry_point_group() -> None:
    (entry,) = importlib.metadata.entry_points(group="aioproxy", name="azure")
    assert entry.load() is aioproxy_azure
    registered: list[Any] = []
    aioproxy_azure.register_providers(registered.append)
    assert registered == [AzureProvider] and AzureProvider.name == "azure"
