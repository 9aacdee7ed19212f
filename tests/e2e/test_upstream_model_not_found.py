"""An upstream that does not know a deployment's model: the proxy's configuration is at fault.

The client's model name was found (it is configured); the upstream model id it maps to was not.
So the client gets a 502 naming the deployment, not a 404 saying its model does not exist, and
the router tries another deployment of the model.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from aioproxy import Deployment
from aioproxy.failures import read_upstream_error
from aioproxy.testing import FakeOpenAI
from aioproxy.testing.openai_upstream import MISSING_MODEL
from tests.support import ServeProxy, gateway_config, sdk, upstream_model

MESSAGES = [{"role": "user", "content": "Hi"}]
DEPLOYMENT = Deployment(name="gpt-test", provider="openai", model="x")


def deployment(api_base: str, model: str) -> dict[str, Any]:
    return upstream_model("gpt-test", api_base, model=model)


async def test_an_unknown_upstream_model_is_a_502_naming_the_deployment(
    serve_proxy: ServeProxy, upstream_base: str
) -> None:
    config = gateway_config(
        upstream_base, models=[deployment(upstream_base, MISSING_MODEL)], router={"num_retries": 0}
    )
    proxy = await serve_proxy(config)
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_model_not_found"
    assert f"gpt-test (openai:{MISSING_MODEL})" in caught.value.message


async def test_another_deployment_answers_instead(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    models = [deployment(upstream_base, MISSING_MODEL), deployment(upstream_base, "gpt-4o-mini")]
    config = gateway_config(
        upstream_base,
        models=models,
        router={"num_retries": 1, "retry_backoff": 0, "strategy": "least-busy"},
    )
    proxy = await serve_proxy(config)
    async with sdk(proxy) as client:
        for _ in range(4):  # whichever deployment is picked first, the answer comes
            done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
            assert done.model == "gpt-4o-mini"


@pytest.mark.parametrize(
    "body",
    [
        (
            b'{"error": {"message": "The model `x` does not exist or you do not have access to it.",'
            b' "type": "invalid_request_error", "param": null, "code": "model_not_found"}}'
        ),  # OpenAI
        (
            b'{"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError",'
            b' "param": null, "code": 404}'
        ),  # vLLM
        (
            b'{"error": {"message": "model \\"x\\" not found, try pulling it first",'
            b' "type": "api_error", "param": null, "code": null}}'
        ),  # Ollama
    ],
    ids=["openai", "vllm", "ollama"],
)
def test_servers_saying_the_model_is_unknown(body: bytes) -> None:
    error = read_upstream_error(404, body, DEPLOYMENT)
    assert (error.status, error.code) == (502, "upstream_model_not_found")
    assert "gpt-test (openai:x)" in error.message


@pytest.mark.parametrize(
    "body", [b'{"error": {"message": "File Not Found"}}', b"404 page not found"]
)
def test_a_missing_route_stays_a_404(body: bytes) -> None:
    assert read_upstream_error(404, body, DEPLOYMENT).status == 404
