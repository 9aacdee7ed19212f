"""aioproxy.relay over real HTTP (a one-route app on 127.0.0.1): JSON and streamed answers, the
whole-stream shortcut, late errors as one event, the keep-alive switch-over, and the answer's
lease released once, before ``after_response`` runs, on every way out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient

from aioproxy.config import parse_config
from aioproxy.context import Call, Deployment, Principal
from aioproxy.dispatch import Answer, Lease
from aioproxy.errors import BadGateway, error_middleware
from aioproxy.hookspecs import hookimpl
from aioproxy.keepalive import KeepAliveClock
from aioproxy.outcome import Outcome
from aioproxy.payloads import decode_request
from aioproxy.plugins import Hooks, make_plugin_manager
from aioproxy.providers import JSONReply, Reply, StreamReply
from aioproxy.relay import send, send_with_keepalive
from aioproxy.router import Router
from aioproxy.routes import Kind
from aioproxy.testing import FakeClock

CAPPED = Deployment(name="m", provider="p", model="a", id="m#0", tpm=10_000)
Client = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


class Watcher:
    """Records each outcome and the deployment's in-flight count when ``after_response`` ran."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.outcomes: list[Outcome] = []
        self.in_flight_then: list[int] = []
        self.errors: list[str] = []  # messages: an exception kept would keep its frames alive
        self.reported = asyncio.Event()

    @hookimpl
    def after_response(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.reported.set()
        self.in_flight_then.append(self.router.health(CAPPED).in_flight)

    @hookimpl
    def on_error(self, error: BaseException) -> None:
        self.errors.append(str(error))


class Relay:
    """An app whose one route sends a reply (or awaits a future one) through relay.

    The reply is taken out of ``replies`` by the request: nothing of a request stays reachable
    from the app afterwards (tests/e2e/test_fault_load.py counts the replies and Calls alive).
    """

    def __init__(self) -> None:
        config = parse_config({})
        self.router = Router(config.router, FakeClock())
        self.watcher = Watcher(self.router)
        self.hooks = Hooks(make_plugin_manager(config, [self.watcher], load_entrypoints=False))
        self.lease: Lease | None = None
        self.replies: list[Reply | asyncio.Future[Reply]] = []

    def app(self, reply: Reply | asyncio.Future[Reply], keepalive: float = 0) -> web.Application:
        self.replies.append(reply)
        del reply

        async def handle(request: web.Request) -> web.StreamResponse:
            reply = self.replies.pop()
            fields, model, stream = decode_request(await request.read())
            call = Call(Kind.CHAT_COMPLETIONS, request, Principal("p"), model, fields, stream)
            call.route_to(CAPPED)
            self.lease = Lease(self.router, CAPPED)
            if isinstance(reply, asyncio.Future):
                pending = self._answer(reply, self.lease)
                return await send_with_keepalive(
                    request, call, pending, KeepAliveClock(keepalive), self.hooks
                )
            return await send(
                request, call, Answer(reply, await _first(reply), self.lease), self.hooks
            )

        app = web.Application(middlewares=[error_middleware])
        app.router.add_post("/v1/chat/completions", handle)
        return app

    @staticmethod
    async def _answer(future: asyncio.Future[Reply], lease: Lease) -> Answer:
        reply = await future
        return Answer(reply, await _first(reply), lease)

    @property
    def in_flight(self) -> int:
        return self.router.health(CAPPED).in_flight


async def _first(reply: Reply) -> bytes | None:
    return await anext(reply.events, None) if isinstance(reply, StreamReply) else None


def stream(
    *events: bytes | BaseException, finished: bool | None = None
) -> tuple[StreamReply, list[bool]]:
    """A reply sending ``events`` (raising an exception among them), and what records its close."""
    closed: list[bool] = []

    async def events_of() -> AsyncIterator[bytes]:
        for event in events:
            if isinstance(event, BaseException):
                raise event
            yield event

    async def close() -> None:
        closed.append(True)

    reply = StreamReply(
        events_of(), close=close, finished=None if finished is None else (lambda: finished)
    )
    return reply, closed


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}


async def test_json_is_sent_with_the_lease_released_before_after_response(
    aiohttp_client: Client,
) -> None:
    relay = Relay()
    client = await aiohttp_client(relay.app(JSONReply(b'{"id": "x", "usage": null}', 201)))
    response = await client.post("/v1/chat/completions", json=BODY)
    assert response.status == 201 and await response.json() == {"id": "x", "usage": None}
    assert relay.in_flight == 0 and relay.watcher.in_flight_then == [0]
    [outcome] = relay.watcher.outcomes
    assert outcome.status == 201 and not outcome.stream
    # No usage upstream: the tpm cap counts the estimate (prompt bytes / 4 + answer bytes / 4).
    assert relay.router.health(CAPPED).tokens.total(relay.router.clock.now()) > 0


async def test_a_whole_stream_goes_out_as_one_body(aiohttp_client: Client) -> None:
    relay = Relay()
    whole = b'data: {"n": 1}\n\ndata: [DONE]\n\n'
    reply, closed = stream(whole, finished=True)
    client = await aiohttp_client(relay.app(reply))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Content-Length"] == str(len(whole))
    assert await response.read() == whole
    assert closed == [True] and relay.in_flight == 0
    assert relay.watcher.outcomes[0].events == 2


async def test_a_whole_anthropic_stream_goes_out_as_one_body_too(aiohttp_client: Client) -> None:
    relay = Relay()
    whole = (
        b'event: message_start\ndata: {"type":"message_start"}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    reply, _ = stream(whole, finished=True)
    client = await aiohttp_client(relay.app(reply))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert response.headers["Content-Length"] == str(len(whole))
    assert await response.read() == whole


async def test_events_are_relayed_one_by_one_and_counted(aiohttp_client: Client) -> None:
    relay = Relay()
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    client = await aiohttp_client(relay.app(stream(*events, finished=False)[0]))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert "Content-Length" not in response.headers
    assert await response.read() == b"".join(events)
    [outcome] = relay.watcher.outcomes
    assert outcome.events == 3 and outcome.last_events == (events[1], events[2])
    assert relay.in_flight == 0 and relay.watcher.in_flight_then == [0]


async def test_a_failure_after_the_headers_is_one_error_event(aiohttp_client: Client) -> None:
    relay = Relay()
    failure = BadGateway("Deployment m (p:a) failed", code="upstream_error")
    reply, closed = stream(b'data: {"n": 1}\n\n', failure)
    client = await aiohttp_client(relay.app(reply))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert response.status == 200  # fixed once the first event went out
    text = (await response.read()).decode()
    first, error = text.split("\n\n")[:2]
    assert first == 'data: {"n": 1}'
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "upstream_error"
    # The request keeps the status its client got; the error's code says how it was cut.
    [outcome] = relay.watcher.outcomes
    assert relay.watcher.errors == [str(failure)] and outcome.status == 200
    assert outcome.error_code == "upstream_error" and failure.sent_status == 200
    assert closed == [True] and relay.in_flight == 0


async def test_a_client_that_leaves_mid_stream_closes_the_reply_and_releases_once(
    aiohttp_client: Client,
) -> None:
    relay = Relay()
    stalled = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        yield b'data: {"n": 1}\n\n'
        stalled.set()
        await asyncio.Event().wait()  # until the relay closes it
        yield b""

    gen = events()
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)
        await gen.aclose()

    client = await aiohttp_client(relay.app(StreamReply(gen, close=close)))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert await response.content.readuntil(b"\n\n") == b'data: {"n": 1}\n\n'
    await stalled.wait()
    response.close()  # the client goes away
    await asyncio.wait_for(relay.watcher.reported.wait(), 10)  # a safety net, not a bound
    [outcome] = relay.watcher.outcomes
    assert outcome.disconnected and closed == [True]
    assert relay.in_flight == 0 and relay.lease is not None and relay.lease.released


async def test_keepalive_switches_a_late_json_answer_to_an_event(aiohttp_client: Client) -> None:
    relay = Relay()
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    client = await aiohttp_client(relay.app(answer, keepalive=0.01))
    async with client.post("/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200  # committed by the first comment
        assert await response.content.readuntil(b"\n\n") == b": keepalive\n\n"
        answer.set_result(
            JSONReply(
                json.dumps(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "a",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "hi"},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ).encode()
            )
        )
        text = (await response.read()).decode()
    events = [e for e in text.split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
    assert relay.in_flight == 0 and relay.watcher.in_flight_then == [0]


async def test_keepalive_keeps_an_early_failure_its_own_status(aiohttp_client: Client) -> None:
    relay = Relay()
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    answer.set_exception(BadGateway("down"))
    client = await aiohttp_client(relay.app(answer, keepalive=60))
    response = await client.post("/v1/chat/completions", json=STREAM)
    assert response.status == 502  # no comment went out yet: the failure keeps its status
    assert (await response.json())["error"]["message"] == "down"
    assert relay.watcher.outcomes == []


async def test_a_failure_after_a_keepalive_comment_keeps_the_status_sent(
    aiohttp_client: Client,
) -> None:
    """The first comment sent the 200; the dispatch then fails: one error event, and on_error
    hears the error with the status its client got (no answer began: no after_response)."""
    relay = Relay()
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    client = await aiohttp_client(relay.app(answer, keepalive=0.01))
    failure = BadGateway("down", code="upstream_error")
    async with client.post("/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200
        assert await response.content.readuntil(b"\n\n") == b": keepalive\n\n"
        answer.set_exception(failure)
        text = (await response.read()).decode()
    events = [e for e in text.split("\n\n") if e and not e.startswith(":")]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_error"
    assert relay.watcher.errors == ["down"] and failure.sent_status == 200
    assert relay.watcher.outcomes == []
