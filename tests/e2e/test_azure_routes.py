"""Azure OpenAI's routes inbound: the official ``AzureOpenAI`` client through the proxy, unchanged.

Its deployment routes (``/openai/deployments/{deployment}/...?api-version=``) name the model in
the path; its v1 API is OpenAI's under ``/openai/v1``.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy.testing import FakeOpenAI, assert_openai_error
from tests.support import MASTER_KEY, UPSTREAM_MODEL, ServeProxy, gateway_config

MESSAGES = [{"role": "user", "content": "hello azure"}]
REPLY = "fake reply to: hello azure"
API_VERSION = "2024-10-21"


def azure(proxy: TestServer, **auth: str) -> openai.AsyncAzureOpenAI:
    """The SDK's Azure client on the proxy, as an application written for Azure builds it."""
    credentials = auth or {"api_key": MASTER_KEY}
    return openai.AsyncAzureOpenAI(
        azure_endpoint=str(proxy.make_url("")),
        api_version=API_VERSION,
        max_retries=0,
        **credentials,  # type: ignore[arg-type]
    )


async def test_chat(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with azure(proxy) as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY
    assert fake.last.path == "/v1/chat/completions"
    assert fake.last.body["model"] == UPSTREAM_MODEL


async def test_chat_stream(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with azure(proxy) as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == REPLY
    assert fake.last.body["stream"] is True


async def test_completions(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with azure(proxy) as client:
        completion = await client.completions.create(model="gpt-test", prompt="hello azure")
        stream = await client.completions.create(
            model="gpt-test", prompt="hello azure", stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    assert completion.choices[0].text == streamed == REPLY
    assert fake.last.path == "/v1/completions"


async def test_embeddings(proxy: TestServer, fake: FakeOpenAI) -> None:
    async with azure(proxy) as client:
        embedded = await client.embeddings.create(model="gpt-test", input=["a", "b"])
    assert [len(item.embedding) for item in embedded.data] == [8, 8]
    assert fake.last.path == "/v1/embeddings"


async def test_a_bearer_token_is_a_key_too(proxy: TestServer) -> None:
    """``azure_ad_token`` (Entra ID) goes as ``Authorization: Bearer``, ``api_key`` as ``api-key``."""
    async with azure(proxy, azure_ad_token=MASTER_KEY) as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == REPLY


async def test_a_wrong_key_is_refused_in_openai_shape(proxy: TestServer) -> None:
    async with azure(proxy, api_key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert refused.value.code == "invalid_api_key"


async def test_an_unknown_deployment_is_a_404_in_openai_shape(proxy: TestServer) -> None:
    async with azure(proxy) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    assert "no-such-deployment" in missing.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES},
        {"model": "echo", "messages": MESSAGES},
        {"model": 7, "messages": MESSAGES},
    ],
    ids=["no-model", "another-model", "not-a-string"],
)
async def test_the_path_names_the_model(
    proxy: TestServer, fake: FakeOpenAI, http: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    """The deployment in the path wins over whatever the body says, or does not say."""
    url = proxy.make_url("/openai/deployments/gpt-test/chat/completions?api-version=any")
    async with http.post(url, json=body, headers={"api-key": MASTER_KEY}) as response:
        answer = await response.json()
    assert response.status == 200, answer
    assert answer["choices"][0]["message"]["content"] == REPLY
    assert fake.last.body["model"] == UPSTREAM_MODEL


async def test_a_deployment_route_checks_the_body_as_any_route(
    proxy: TestServer, http: aiohttp.ClientSession
) -> None:
    url = proxy.make_url("/openai/deployments/gpt-test/embeddings")
    async with http.post(url, json={"input": 5}, headers={"api-key": MASTER_KEY}) as response:
        await assert_openai_error(response, 400, "invalid_type")


async def test_an_unserved_deployment_route_is_a_404_in_openai_shape(
    proxy: TestServer, http: aiohttp.ClientSession
) -> None:
    url = proxy.make_url("/openai/deployments/gpt-test/images/generations?api-version=x")
    async with http.post(url, json={"prompt": "a cat"}, headers={"api-key": MASTER_KEY}) as answer:
        await assert_openai_error(answer, 404)


async def test_responses_on_the_v1_api(proxy: TestServer, fake: FakeOpenAI) -> None:
    """Azure's v1 API is OpenAI's under /openai/v1: its clients use the plain ``OpenAI`` class."""
    v1 = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/openai/v1/")), api_key=MASTER_KEY, max_retries=0
    )
    async with v1 as client:
        response = await client.responses.create(model="gpt-test", input="hello azure")
        again = await client.responses.retrieve(response.id)
        stream = await client.responses.create(model="gpt-test", input="hello azure", stream=True)
        events = [event async for event in stream]
        chat = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        models = await client.models.list()
    assert response.output_text == again.output_text == REPLY
    assert events[-1].type == "response.completed"
    assert chat.choices[0].message.content == REPLY
    assert "gpt-test" in [model.id for model in models.data]
    assert fake.last.path == "/v1/chat/completions"


async def test_responses_of_the_azure_client(proxy: TestServer) -> None:
    """``AzureOpenAI``'s own Responses call goes to ``/openai/responses?api-version=``."""
    async with azure(proxy) as client:
        response = await client.responses.create(model="gpt-test", input="hello azure")
    assert response.output_text == REPLY


async def test_a_configured_alias_may_name_an_azure_path(
    serve_proxy: ServeProxy, upstream_base: str
) -> None:
    """Configs that added Azure's v1 paths as [aliases] before they were built in still start."""
    aliases = {"chat_completions": ["/openai/v1/chat/completions"]}
    proxy = await serve_proxy(gateway_config(upstream_base, aliases=aliases))
    v1 = openai.AsyncOpenAI(
        base_url=str(proxy.make_url("/openai/v1/")), api_key=MASTER_KEY, max_retries=0
    )
    async with v1 as client:
        chat = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert chat.choices[0].message.content == REPLY
