"""NativeResponses: native response ids recorded off the hot path, and what counts as a missing
route."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp.test_utils import make_mocked_request

from aioproxy import Call, Deployment, JSONReply, Principal, Reply
from aioproxy.bridges.native import NativeResponses, Owner, route_missing
from aioproxy.errors import BadGateway, ModelNotFound, NotFound, ProxyError
from aioproxy.routes import Kind

DEPLOYMENT = Deployment(name="m", provider="openai", model="up", id="m#0")


class SlowStore:
    """A store whose writes wait until the test lets them through."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.rows: dict[str, tuple[str, str]] = {}

    async def remember_native(self, response_id: str, deployment: str, principal: str) -> None:
        await self.release.wait()
        self.rows[response_id] = (deployment, principal)

    async def lookup_native(self, response_id: str) -> tuple[str, str] | None:
        return self.rows.get(response_id)


def make_call() -> Call:
    fields = {"model": msgspec.Raw(b'"m"'), "input": msgspec.Raw(b'"hi"')}
    request = make_mocked_request("POST", "/v1/responses")
    call = Call(Kind.RESPONSES, request, Principal("alice", id="alice-id"), "m", fields, False)
    call.route_to(DEPLOYMENT)
    return call


async def native(call: Call) -> Reply:
    return JSONReply.of({"id": "resp_1", "object": "response", "store": True})


def never_fall_back(*_: Any) -> None:
    raise AssertionError("no fallback expected")


async def test_an_id_is_found_while_its_write_is_still_pending() -> None:
    store = SlowStore()
    natives = NativeResponses(store, [DEPLOYMENT])  # type: ignore[arg-type]
    responses = natives.wrap(native, None, never_fall_back)
    await responses(make_call())
    assert store.rows == {}  # the write waits; the answer did not
    assert await natives.owner("resp_1") == Owner(DEPLOYMENT, "m#0", "alice-id")
    store.release.set()
    await natives.drain()
    assert store.rows == {"resp_1": ("m#0", "alice-id")}
    assert await natives.owner("resp_1") == Owner(DEPLOYMENT, "m#0", "alice-id")


def test_route_missing() -> None:
    assert route_missing(ProxyError("Invalid URL (POST /v1/responses)", status=404))
    assert route_missing(ProxyError("Method Not Allowed", status=405))
    assert route_missing(ProxyError("Not Found", status=404, code="404"))
    assert not route_missing(ModelNotFound("no such model", param="model"))
    assert not route_missing(
        NotFound("Previous response with id 'x' not found.", param="previous_response_id")
    )
    assert not route_missing(BadGateway("upstream down"))
