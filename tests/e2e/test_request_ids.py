"""x-request-id: on every answer (success, error, stream, unknown route, ingress refusal), the
client's own when sane, forwarded upstream once, and the upstream's own kept."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import Call, Outcome, hookimpl
from aioproxy.request_ids import HEADER, is_sane, new_request_id
from aioproxy.testing import FakeOpenAI
from tests.support import AUTH, ServeProxy, gateway_config, running

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def post(
    proxy: TestServer, body: Any, **headers: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.make_url("/v1/chat/completions"), json=body, headers={**AUTH, **headers}
        ) as response:
            return response, await response.read()


def test_sane_ids() -> None:
    assert is_sane("abc-123_XYZ.:/ =")
    assert is_sane("x" * 128)
    assert not is_sane("x" * 129)
    assert not is_sane("")
    assert not is_sane("é")
    assert not is_sane("a\tb")
    assert not is_sane("trace sk-live-0123456789")  # key-like: never logged
    first, second = new_request_id(), new_request_id()
    assert first != second and is_sane(first) and first.startswith("req_")


async def test_a_sane_client_id_is_kept_and_forwarded_once(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    response, _ = await post(proxy, CHAT, **{"X-Request-Id": "client-id-42"})
    assert response.status == 200
    assert response.headers["x-request-id"] == "client-id-42"
    # Repeated headers would be recorded joined by ", ": the id went once, and ours.
    assert fake.last.headers["x-request-id"] == "client-id-42"


# A key pasted into the header (a client's mistake) would be logged, traced and sent upstream.
@pytest.mark.parametrize(
    "given", ["x" * 129, "caf\u00e9", " ", "sk-proj-abcdef123456", "eyJhbGciOi.eyJzdWIiOi.sig"]
)
async def test_an_insane_client_id_is_replaced(
    proxy: TestServer, fake: FakeOpenAI, given: str
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.make_url("/v1/chat/completions"),
            json=CHAT,
            headers={**AUTH, "x-request-id": given.encode("utf-8").decode("latin-1")},
        ) as response:
            await response.read()
    rid = response.headers["x-request-id"]
    assert rid.startswith("req_") and rid != given
    assert fake.last.headers["x-request-id"] == rid


_GATEWAY_PASSWORD = "hunter2-prod-gateway-password"  # a master key not shaped like a key
_UPSTREAM_PASSWORD = "upstream-password-123"  # an upstream's key, likewise
_API_VERSION = "2023-06-01"  # a deployment's header value: no secret


def _configured(upstream_base: str) -> dict[str, Any]:
    config = gateway_config(upstream_base)
    config["auth"] = {"master_key": _GATEWAY_PASSWORD}
    config["models"][0] |= {
        "api_key": _UPSTREAM_PASSWORD,
        "headers": {"X-Api-Version": _API_VERSION},
    }
    return config


@pytest.mark.parametrize(
    "given",
    [_GATEWAY_PASSWORD, f"trace {_UPSTREAM_PASSWORD}", "team-hunter2-prod-gateway-password-x"],
)
async def test_an_id_holding_a_configured_secret_is_replaced(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI, given: str
) -> None:
    """A key of the config pasted into the header, shaped like a key or not (the master key,
    an upstream's key), is never told back, logged nor sent upstream."""
    proxy = await serve_proxy(_configured(upstream_base))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.make_url("/v1/chat/completions"),
            json=CHAT,
            headers={"Authorization": f"Bearer {_GATEWAY_PASSWORD}", "x-request-id": given},
        ) as response:
            assert response.status == 200
            await response.read()
    rid = response.headers["x-request-id"]
    assert rid.startswith("req_") and fake.last.headers["x-request-id"] == rid


async def test_an_id_holding_a_header_value_is_kept(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """A deployment's header values are no keys (an API version): an id holding one is kept."""
    proxy = await serve_proxy(_configured(upstream_base))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.make_url("/v1/chat/completions"),
            json=CHAT,
            headers={
                "Authorization": f"Bearer {_GATEWAY_PASSWORD}",
                "x-request-id": "req-2023-06-01-7",
            },
        ) as response:
            assert response.status == 200
    assert response.headers["x-request-id"] == "req-2023-06-01-7"


async def test_a_new_id_when_none_is_given(proxy: TestServer, fake: FakeOpenAI) -> None:
    first, _ = await post(proxy, CHAT)
    second, _ = await post(proxy, CHAT)
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert ids[0] != ids[1]
    assert [r.headers["x-request-id"] for r in fake.requests] == ids


async def test_streams_carry_it(proxy: TestServer) -> None:
    response, body = await post(proxy, {**CHAT, "stream": True}, **{"x-request-id": "s-1"})
    assert body.endswith(b"data: [DONE]\n\n")
    assert response.headers["x-request-id"] == "s-1"


async def test_keepalive_streams_carry_it(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    fake.response_delay = 0.3  # longer than the interval: comments go out before the answer
    proxy = await serve_proxy(gateway_config(upstream_base, server={"keepalive_interval": 0.05}))
    response, body = await post(proxy, {**CHAT, "stream": True}, **{"x-request-id": "k-1"})
    assert body.startswith(b":")
    assert response.headers["x-request-id"] == "k-1"


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/chat/completions", {"Authorization": "Bearer wrong"}, 401),  # auth
        ("/v1/nowhere", AUTH, 404),  # no such route
        ("/v1/chat/completions", {**AUTH, "Content-Type": "text/plain"}, 415),  # ingress
    ],
)
async def test_errors_carry_it(
    proxy: TestServer, path: str, headers: dict[str, str], status: int
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.make_url(path),
            data=b"{}",
            headers={"Content-Type": "application/json", **headers, "x-request-id": "e-1"},
        ) as response:
            assert response.status == status
            assert (await response.json())["error"]["message"]
    assert response.headers["x-request-id"] == "e-1"


async def test_model_errors_and_upstream_errors_carry_it(
    proxy: TestServer, fake: FakeOpenAI
) -> None:
    response, _ = await post(proxy, {**CHAT, "model": "nope"})
    assert response.status == 404 and response.headers["x-request-id"].startswith("req_")
    fake.faults = ["status:400"]
    response, _ = await post(proxy, CHAT, **{"x-request-id": "u-1"})
    assert response.status == 400 and response.headers["x-request-id"] == "u-1"


async def test_the_upstream_id_is_kept(serve_proxy: ServeProxy, upstream_base: str) -> None:
    seen: list[tuple[str, str | None]] = []

    class Log:
        @hookimpl
        def after_response(self, call: Call, outcome: Outcome) -> None:
            seen.append((call.request_id, call.upstream_request_id))

    proxy = await serve_proxy(gateway_config(upstream_base), plugins=[Log()])
    _, _ = await post(proxy, CHAT, **{"x-request-id": "mine"})
    [(ours, theirs)] = seen
    assert ours == "mine"
    assert theirs is not None and theirs.startswith("req_") and theirs != "mine"


async def test_every_layers_refusal_carries_it(
    serve_proxy: ServeProxy, upstream_base: str, fake: FakeOpenAI
) -> None:
    """The client's id comes back on each layer's refusal: a wrong method, a body too large or
    not JSON, a rate cap, an upstream error after a retry, and a stream that fails midway."""
    config = gateway_config(
        upstream_base, server={"max_body_size": 2048}, router={"retry_backoff": 0}
    )
    config["models"].append({**config["models"][0], "name": "capped", "rpm": 1})
    proxy = await serve_proxy(config)
    chat = json.dumps(CHAT).encode()
    capped = json.dumps({**CHAT, "model": "capped"}).encode()
    asked: list[tuple[str, bytes | None, list[str], int]] = [
        ("GET", None, [], 405),
        ("POST", b"{" + b" " * 4096 + b"}", [], 413),
        ("POST", b"{not json", [], 400),
        ("POST", capped, [], 200),
        ("POST", capped, [], 429),
        ("POST", chat, ["status:500", "status:400"], 400),  # retried, then refused
        ("POST", json.dumps({**CHAT, "stream": True}).encode(), ["cut_stream"], 200),
    ]
    async with aiohttp.ClientSession() as session:
        for i, (method, body, faults, status) in enumerate(asked):
            fake.faults = list(faults)
            headers = {**AUTH, "x-request-id": f"layer-{i}"}
            async with session.request(
                method, proxy.make_url("/v1/chat/completions"), data=body, headers=headers
            ) as response:
                text = await response.read()
                assert response.status == status, text
                assert response.headers["x-request-id"] == f"layer-{i}"
    assert b'"error"' in text  # the stream's failure came as its last event
    # Forwarded on each upstream attempt, the retry's too.
    forwarded = [r.headers["x-request-id"] for r in fake.requests]
    assert forwarded == ["layer-3", "layer-5", "layer-5", "layer-6"]


async def test_a_request_too_malformed_to_parse_gets_one(tmp_path: Path) -> None:
    """run.py answers what aiohttp cannot parse itself (before any app sees it): that answer
    carries a new id too."""
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "echo"\nprovider = "echo"\n', encoding="utf-8")
    async with running("--config", str(config)) as (port, _):
        for request in (
            b"NOT-HTTP at all\r\n\r\n",
            b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            raw = await reader.read()  # the answer, then the connection closes
            writer.close()
            head = raw.partition(b"\r\n\r\n")[0].decode().lower().splitlines()
            assert head[0].split()[1].startswith("4")
            [rid] = [line.split(":", 1)[1].strip() for line in head if line.startswith(HEADER)]
            assert is_sane(rid) and rid.startswith("req_")
