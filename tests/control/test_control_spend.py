"""Spend and the request log, end to end with the official SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from typing import Any

import httpx2
import openai
import pytest

from aioproxy import hookimpl
from aioproxy.context import Call, Deployment
from aioproxy.control.pricing import Pricing
from aioproxy.keys import plugin_manager_key
from aioproxy.providers import JSONReply, Provider
from tests.control.conftest import CHAT, PRICE, Control, chat, metric_counts
from tests.support import MASTER_KEY, sdk


def priced(prompt: int, completion: int, cached: int = 0) -> float:
    return (
        (prompt - cached) * PRICE["input"]
        + cached * PRICE["cached_input"]
        + completion * PRICE["output"]
    ) / 1e6


async def log_rows(control: Control, query: str = "") -> list[dict[str, Any]]:
    await control.settle()
    return (await control.admin("GET", f"/admin/requests?limit=1000{query}"))["data"]


async def post_chat(control: Control, key: str, **overrides: Any) -> int:
    """One chat completion with aiohttp (for answers the SDK would raise on); its status."""
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, **overrides},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status


async def test_cost_is_usage_times_price(control: Control) -> None:
    created = await control.new_key(name="payer")
    reply = await chat(control.server, created["key"], user="end-user-7")
    cost = priced(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    (row,) = await log_rows(control, f"&key={created['id']}")
    assert row["cost"] == pytest.approx(cost)
    assert row["input_tokens"] == reply.usage.prompt_tokens
    assert row["output_tokens"] == reply.usage.completion_tokens
    assert row | {"request_id": None, "time": None, "ttft": None, "duration": None} == row | {
        "request_id": None,
        "time": None,
        "ttft": None,
        "duration": None,
        "key_id": created["id"],
        "key_name": "payer",
        "team_id": None,
        "end_user": "end-user-7",
        "model": "gpt-test",
        "deployment": "gpt-test#0",
        "provider": "openai",
        "kind": "chat_completions",
        "status": 200,
        "error_code": None,
        "stream": False,
        "estimated": False,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert row["request_id"] and row["duration"] >= 0 and row["ttft"] >= 0
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == pytest.approx(cost) and shown["last_used_at"] is not None


async def test_cost_reaches_after_response_hooks(start_control: Any) -> None:
    seen: list[float | None] = []

    class Reader:
        @hookimpl
        def after_response(self, outcome: Any) -> None:
            seen.append(outcome.cost)

    control = await start_control(plugins=(Reader(),))
    reply = await chat(control.server, (await control.new_key())["key"])
    assert seen == [pytest.approx(priced(reply.usage.prompt_tokens, reply.usage.completion_tokens))]


async def _stream(control: Control, key: str) -> tuple[str, list[dict[str, Any]]]:
    """A streamed chat completion with ``key``: the body as text, and its JSON chunks."""
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        raw = (await response.read()).decode()
    chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]
    return raw, chunks


async def test_usage_chunk_is_asked_for_and_removed(control: Control, fake: Any) -> None:
    raw, chunks = await _stream(control, (await control.new_key())["key"])
    assert fake.last.body["stream_options"] == {"include_usage": True}
    assert chunks and all(chunk["choices"] for chunk in chunks)  # no usage-only chunk
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert raw.endswith("data: [DONE]\n\n")
    (row,) = await log_rows(control)
    assert not row["estimated"] and row["output_tokens"] > 0 and row["stream"] is True
    assert row["cost"] == pytest.approx(priced(row["input_tokens"], row["output_tokens"]))


async def test_config_key_stream_is_tapped_for_its_row(control: Control, fake: Any) -> None:
    """A config key's stream is logged with the upstream's own usage too (issue 12: ask the
    upstream for it), not an estimate; the client sees the chunks it would have seen."""
    raw, chunks = await _stream(control, MASTER_KEY)
    assert fake.last.body["stream_options"] == {"include_usage": True}
    assert chunks and all(chunk["choices"] for chunk in chunks)  # no usage-only chunk
    assert raw.endswith("data: [DONE]\n\n")
    (row,) = await log_rows(control)
    assert not row["estimated"] and row["stream"] is True and row["output_tokens"] > 0
    assert row["cost"] == pytest.approx(priced(row["input_tokens"], row["output_tokens"]))


async def test_config_key_stream_is_untouched_without_the_log(
    start_control: Any, fake: Any
) -> None:
    """With the request log off, nothing is counted for a config key: its stream goes as the
    upstream sends it."""
    control = await start_control(spend={"log": False})
    _, chunks = await _stream(control, MASTER_KEY)
    assert "stream_options" not in fake.last.body
    assert chunks and all("usage" not in chunk for chunk in chunks)


async def test_usage_chunk_stays_when_asked_for(control: Control) -> None:
    key = (await control.new_key())["key"]
    async with sdk(control.server, key) as client:
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    (row,) = await log_rows(control)
    assert row["output_tokens"] == chunks[-1].usage.completion_tokens


async def test_legacy_completions_stream_too(control: Control) -> None:
    key = (await control.new_key())["key"]
    async with sdk(control.server, key) as client:
        stream = await client.completions.create(model="gpt-test", prompt="one two", stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    (row,) = await log_rows(control)
    assert row["kind"] == "completions" and not row["estimated"] and row["cost"] > 0


async def test_embeddings_and_responses_are_priced(control: Control) -> None:
    key = (await control.new_key())["key"]
    async with sdk(control.server, key) as client:
        embedded = await client.embeddings.create(model="embed", input=["a b c", "d e"])
        response = await client.responses.create(model="gpt-test", input="say something")
    rows = {row["kind"]: row for row in await log_rows(control)}
    assert rows["embeddings"]["cost"] == pytest.approx(embedded.usage.prompt_tokens * 0.02 / 1e6)
    assert rows["responses"]["cost"] == pytest.approx(
        priced(response.usage.input_tokens, response.usage.output_tokens)
    )


async def test_no_usage_is_estimated(start_control: Any) -> None:
    class Silent(Provider):
        name = "echo"

        async def chat_completions(self, call: Call) -> JSONReply:
            return JSONReply.of(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": call.model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "logprobs": None,
                            "message": {"role": "assistant", "content": "a reply of words"},
                        }
                    ],
                }
            )

    class Plugin:
        @hookimpl(trylast=True)  # registers last: its "echo" wins
        def register_providers(self, register: Any) -> None:
            register(Silent)  # named "echo": model "echo" is served by it

    control = await start_control(plugins=(Plugin(),))
    key = (await control.new_key())["key"]
    assert await post_chat(control, key, model="echo") == 200
    (row,) = await log_rows(control)
    assert row["estimated"] is True and row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["cost"] == pytest.approx(priced(row["input_tokens"], row["output_tokens"]))


async def test_failures_are_logged(control: Control, fake: Any) -> None:
    key = (await control.new_key())["key"]
    fake.faults = ["status:400"]
    assert await post_chat(control, key) == 400
    (row,) = await log_rows(control)
    assert row["status"] == 400 and row["error_code"] and row["cost"] is None


async def test_a_stream_cut_after_its_200_is_logged_200_with_the_cuts_code(
    start_control: Any, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream breaks off a stream whose 200 and first events reached the client: the
    access line, aioproxy_requests_total and the request log's row all say 200, the status the
    client got, and the code of what cut it; none says 502."""
    control = await start_control(logging={"access_log": True}, metrics={"enabled": True})
    caplog.set_level(logging.INFO, logger="aioproxy.access")
    key = (await control.new_key(name="cut"))["key"]
    fake.faults = ["cut_stream"]
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
        body = await response.read()
    events = [e for e in body.decode().split("\n\n") if e.startswith("data: ")]
    told = json.loads(events[-1].removeprefix("data: "))["error"]["code"]
    assert len(events) > 1 and told == "upstream_disconnected"  # events came, then the error
    (row,) = await log_rows(control)
    assert (row["status"], row["error_code"]) == (200, told)
    observer = control.server.app[plugin_manager_key].get_plugin("aioproxy.observer")
    observer.observe_pending()  # what its batch would write within BATCH_WINDOW
    [line] = [r.getMessage() for r in caplog.records if "kind=chat_completions" in r.getMessage()]
    fields = dict(item.split("=", 1) for item in line.split())
    assert (fields["status"], fields["error"], fields["key"]) == ("200", told, "cut")
    counted = await metric_counts(
        control, "aioproxy_requests_total", "status", kind="chat_completions"
    )
    assert counted == {"200": 1.0}


async def test_refused_before_routing_is_logged(control: Control) -> None:
    """An unknown model fails before any deployment is chosen: its row has none."""
    key = (await control.new_key(name="lost"))["key"]
    assert await post_chat(control, key, model="no-such-model") == 404
    (row,) = await log_rows(control)
    assert row["status"] == 404 and row["error_code"] == "model_not_found"
    assert row["key_name"] == "lost" and row["model"] == "no-such-model"
    assert row["deployment"] is None and row["provider"] is None and row["cost"] is None


async def test_spend_grouped(control: Control, clock: Any) -> None:
    team = await control.admin("POST", "/admin/teams", {"name": "t"}, status=201)
    first = await control.new_key(team=team["id"])
    second = await control.new_key()
    await chat(control.server, first["key"])
    await chat(control.server, first["key"], model="gpt-other")
    clock.advance(86400)
    await chat(control.server, second["key"])
    await control.settle()
    by_key = (await control.admin("GET", "/admin/spend?group_by=key"))["data"]
    assert {row["group"]: row["requests"] for row in by_key} == {first["id"]: 2, second["id"]: 1}
    assert all(
        set(row) == {"group", "requests", "input_tokens", "output_tokens", "cost"} for row in by_key
    )
    by_team = (await control.admin("GET", "/admin/spend?group_by=team"))["data"]
    assert {row["group"]: row["requests"] for row in by_team} == {team["id"]: 2, None: 1}
    by_model = (await control.admin("GET", "/admin/spend?group_by=model"))["data"]
    assert {row["group"] for row in by_model} == {"gpt-test", "gpt-other"}
    by_day = (await control.admin("GET", "/admin/spend?group_by=day"))["data"]
    assert [row["requests"] for row in by_day] == [2, 1]
    later = await control.admin("GET", f"/admin/spend?group_by=key&start={by_day[1]['group']}")
    assert [row["group"] for row in later["data"]] == [second["id"]]
    assert sum(row["cost"] for row in by_key) == pytest.approx(sum(row["cost"] for row in by_model))


async def test_burst_of_500_logs_500_rows(control: Control) -> None:
    key = (await control.new_key())["key"]
    # 500 requests at once, over at most 100 connections (the test server's listen backlog
    # would refuse some of 500 connections opened at once)
    http = openai.DefaultAsyncHttpx2Client(limits=httpx2.Limits(max_connections=100))
    async with openai.AsyncOpenAI(
        base_url=str(control.server.make_url("/v1")), api_key=key, max_retries=0, http_client=http
    ) as client:
        replies = await asyncio.gather(
            *(client.chat.completions.create(**CHAT) for _ in range(500))
        )
    assert len(replies) == 500
    await control.settle()
    total = (await control.admin("GET", "/admin/spend?group_by=key"))["data"]
    assert total[0]["requests"] == 500 and control.plane.log.dropped == 0


async def test_spend_survives_a_restart(start_control: Any) -> None:
    first = await start_control()
    created = await first.new_key(max_budget=100)
    reply = await chat(first.server, created["key"])
    await first.server.close()  # graceful: the log is flushed
    second = await start_control()
    shown = await second.admin("GET", f"/admin/keys/{created['id']}")
    cost = priced(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert shown["spend"] == pytest.approx(cost)
    assert len(await log_rows(second)) == 1


def test_prices_are_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("genai-prices tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pricing = Pricing()
    pricing.warm()
    deployment = Deployment(name="x", provider="openai", model="gpt-4o-mini")
    price = pricing.price_of(deployment)
    assert price is not None and price.input == pytest.approx(0.15)
    assert pricing.price_of(Deployment(name="y", provider="echo", model="echo")) is None


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-4o-mini"),
        ("azure", "gpt-4o"),
        ("anthropic", "claude-3-5-sonnet-latest"),
        ("gemini", "gemini-2.0-flash"),
        # Unpriced before (genai-prices names it "aws"): a Bedrock key's requests were logged
        # without cost, and its budget never moved.
        ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0"),
        ("bedrock", "amazon.nova-lite-v1:0"),
    ],
)
def test_each_shipped_provider_is_priced(provider: str, model: str) -> None:
    price = Pricing().price_of(Deployment(name="x", provider=provider, model=model))
    assert price is not None and price.input > 0 and price.output > 0


async def test_log_off_still_counts_spend(start_control: Any) -> None:
    """``[spend] log = false``: no rows, but a database key's spend is still written."""
    control = await start_control(spend={"log": False})
    created = await control.new_key(name="counted")
    reply = await chat(control.server, created["key"])
    await chat(control.server, MASTER_KEY)
    assert await log_rows(control) == []
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == pytest.approx(
        priced(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    )


async def test_a_plugins_own_cost_is_logged(start_control: Any) -> None:
    """``outcome.cost`` set by a plugin ahead of the spend plugin is the cost logged and
    counted; a key without limits is logged with the price of its usage."""

    class Flat:
        @hookimpl(tryfirst=True)
        def after_response(self, call: Call, outcome: Any) -> None:
            if call.principal.name == "flat":
                outcome.cost = 0.25

    control = await start_control(plugins=(Flat(),))
    flat = await control.new_key(name="flat", max_budget=10)
    usual = await control.new_key(name="usual")
    await chat(control.server, flat["key"])
    reply = await chat(control.server, usual["key"])
    rows = {row["key_name"]: row for row in await log_rows(control)}
    assert rows["flat"]["cost"] == 0.25
    assert (await control.admin("GET", f"/admin/keys/{flat['id']}"))["spend"] == 0.25
    assert rows["usual"]["cost"] == pytest.approx(
        priced(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    )


def test_a_serving_process_reads_prices_from_a_child() -> None:
    """The price table (~26 MiB) is read by a child at start-up, never imported by the server."""
    probe = (
        "import asyncio, sys\n"
        "from aioproxy.context import Deployment\n"
        "from aioproxy.control.pricing import Pricing\n"
        "pricing = Pricing()\n"
        "mini = Deployment(name='x', provider='openai', model='gpt-4o-mini')\n"
        "echo = Deployment(name='y', provider='echo', model='echo')\n"
        "asyncio.run(pricing.preload([mini, echo]))\n"
        "price = pricing.price_of(mini)\n"
        "print(price.input, price.output, pricing.price_of(echo), 'genai_prices' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0.15", "0.6", "None", "False"]


async def test_a_model_refused_to_a_key_is_logged(control: Control) -> None:
    """A key asking for a model it may not use gets 403; its request log row says so, with
    the key and the model asked for (the refusal comes once the request's call exists)."""
    created = await control.new_key(models=["gpt-test"])
    assert await post_chat(control, created["key"], model="gpt-other") == 403
    (row,) = await log_rows(control, f"&key={created['id']}")
    assert row["status"] == 403 and row["error_code"] == "model_not_allowed"
    assert row["model"] == "gpt-other" and row["key_name"] == "k"
