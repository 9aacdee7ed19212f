"""The cost a request reserves against a budget before its call: its prompt at the input price
and its output cap (else the configured estimate) at the output price, in nano-USD."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import make_mocked_request

from aioproxy.config import Price
from aioproxy.context import ANONYMOUS, Call, Deployment
from aioproxy.control.limits import CostEstimates
from aioproxy.control.pricing import Pricing
from aioproxy.control.rows import estimate_prompt
from aioproxy.fields import raw_fields
from aioproxy.routes import Kind

DEPLOYMENT = Deployment(name="m", provider="openai", model="m", price=Price(input=2.0, output=8.0))


def routed(kind: Kind, body: dict[str, Any]) -> Call:
    request = make_mocked_request("POST", "/")
    call = Call(kind, request, ANONYMOUS, "m", raw_fields({"model": "m", **body}), False)
    call.route_to(DEPLOYMENT)
    return call


def test_the_output_cap_else_the_configured_output_at_the_deployment_s_prices() -> None:
    estimates, pricing = CostEstimates(output_tokens=1000), Pricing()
    call = routed(Kind.CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": "hi"}]})
    prompt = estimate_prompt(call)
    assert prompt > 0
    # USD per million tokens = thousands of nano-USD per token
    assert estimates.held(call, prompt, 0, pricing) == prompt * 2000 + 1000 * 8000
    assert estimates.held(call, prompt, 50, pricing) == prompt * 2000 + 50 * 8000


def test_embeddings_have_no_output_and_counting_tokens_is_free() -> None:
    estimates, pricing = CostEstimates(output_tokens=1000), Pricing()
    embeddings = routed(Kind.EMBEDDINGS, {"input": "some text"})
    prompt = estimate_prompt(embeddings)
    assert estimates.held(embeddings, prompt, 0, pricing) == prompt * 2000
    counting = routed(Kind.COUNT_TOKENS, {"messages": []})
    assert estimates.held(counting, estimate_prompt(counting), 0, pricing) == 0


def test_each_deployment_is_priced_at_its_own_price_each_time() -> None:
    """The estimates keep each deployment's prices: seen again, it is priced the same; another
    deployment at its own."""
    estimates, pricing = CostEstimates(output_tokens=1000), Pricing()
    for input_price in (1.0, 3.0, 5.0):
        deployment = Deployment(
            name="m", provider="openai", model="m", price=Price(input=input_price, output=0.0)
        )
        call = routed(Kind.EMBEDDINGS, {"input": "some text"})
        call.route_to(deployment)
        prompt = estimate_prompt(call)
        for _ in range(2):
            assert estimates.held(call, prompt, 0, pricing) == prompt * input_price * 1000
