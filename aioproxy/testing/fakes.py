"""``FakeUpstream``: the skeleton every fake upstream API shares.

A subclass lists its routes; the base records each request, counts the ones in flight (what
``check_cancellation`` watches), holds a FIFO of faults for the next requests, and waits for the
fake to be idle::

    class FakeToy(FakeUpstream):
        def routes(self) -> list[web.RouteDef]:
            return [web.post("/generate", self.generate)]

        async def generate(self, request: web.Request) -> web.StreamResponse:
            record = await self.record(request)
            fault = self.next_fault()
            ...

    upstream = await aiohttp_server(fake.app())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from .waiting import eventually

_MAX_BODY = 64 * 1024 * 1024  # way above aiohttp's 1 MiB default: a fake never limits a proxy


@dataclass
class Recorded:
    """One request a fake received."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: Any  # parsed JSON, None if there was no body or it was not JSON
    raw: bytes = b""
    query: str = ""  # the query string, as sent
    received: float = field(default_factory=time.monotonic)  # when it arrived (monotonic clock)
    fault: Any = None  # the fault it got, if any


class FakeUpstream:
    """A fake upstream API; its state is shared by every app built from one instance."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.in_flight = 0  # requests being answered, streams until their last byte
        self.max_in_flight = 0  # the most requests it has had in flight at once
        self.faults: list[Any] = []  # what the next requests are to do wrong, first first
        self.delay = 0.0  # seconds to wait where the fake says (e.g. between stream events)

    def routes(self) -> list[web.RouteDef]:
        """The fake's routes; a subclass lists them."""
        raise NotImplementedError

    def app(self) -> web.Application:
        """An aiohttp app serving :meth:`routes`, counting requests in flight."""
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._count])
        app.add_routes(self.routes())
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def record(self, request: web.Request) -> Recorded:
        """Read ``request`` (its JSON body if it has one), append it to ``requests``, return it."""
        raw = await request.read()
        record = Recorded(
            request.method, request.path, joined_headers(request), _json(raw), raw,
            request.query_string,
        )  # fmt: skip
        self.requests.append(record)
        return record

    def next_fault(self) -> Any:
        """The next queued fault, or None."""
        return self.faults.pop(0) if self.faults else None

    @property
    def last(self) -> Recorded:
        """The last request received."""
        if not self.requests:
            raise LookupError(f"the {type(self).__name__} has not received any request")
        return self.requests[-1]

    async def wait_idle(self, within: float = 2.0) -> None:
        """Wait until no request is in flight, e.g. after the proxy's client went away."""
        what = f"{type(self).__name__} idle ({self.in_flight} request(s) in flight)"
        await eventually(lambda: self.in_flight == 0, within=within, what=what)


def joined_headers(request: web.Request) -> dict[str, str]:
    """The request's headers by lower-cased name, repeated ones joined with ", "."""
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
