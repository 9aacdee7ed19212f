"""The Provider base class, what a provider answers with, and the per-app provider registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import msgspec

from .config import Config
from .context import Call
from .routes import PROVIDER_KINDS, Kind

__all__ = ["JSONReply", "Provider", "ProviderFactory", "Reply", "StreamReply"]

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode


class JSONReply:
    """A whole JSON answer: encoded ``body`` bytes, sent with ``status``."""

    __slots__ = ("body", "status", "headers")

    def __init__(
        self, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers

    @classmethod
    def of(cls, obj: object, status: int = 200) -> JSONReply:
        """Encode ``obj`` (dict, list, msgspec Struct, ...) as the answer."""
        return cls(_encode(obj), status)


class StreamReply:
    """A streamed answer: ``events`` yields complete SSE events (bytes ending in a blank line).

    An item may hold several events (a relay passes on what each network read completed, in
    one write); use ``aioproxy.streaming.split_events`` to take one apart.

    The proxy pulls the first event before it sends the response headers, so a provider that
    raises a ProxyError before its first event still answers with a proper status. ``close`` (if
    given) runs once the stream is over, also when the client went away: release upstream
    connections there.
    """

    __slots__ = ("events", "close", "headers")

    def __init__(
        self,
        events: AsyncIterator[bytes],
        close: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.events = events
        self.close = close
        self.headers = headers

    async def aclose(self) -> None:
        aclose = getattr(self.events, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            if self.close is not None:
                result = self.close()
                if isinstance(result, Awaitable):
                    await result


Reply = JSONReply | StreamReply
ProviderMethod = Callable[[Call], Awaitable[Reply]]


class Provider:
    """Serves deployments of one provider name.

    Subclass it and implement the endpoint kinds the provider supports, each an ``async def`` that
    takes the :class:`~aioproxy.context.Call` and returns a :class:`JSONReply` or (when
    ``call.stream``) a :class:`StreamReply`. Raise :class:`~aioproxy.errors.ProxyError` subclasses
    for failures; aiohttp client errors and timeouts are turned into 502/504 for you.

    One instance per app, created at start-up with the app's pooled ``session``; ``start`` and
    ``close`` bracket its life. Keep per-app state on the instance, never in module globals.
    """

    name: ClassVar[str] = ""

    def __init__(self, session: aiohttp.ClientSession, config: Config) -> None:
        self.session = session
        self.config = config

    async def start(self) -> None:
        """Called once at app start-up, after ``__init__``."""

    async def close(self) -> None:
        """Called once at app clean-up."""

    async def chat_completions(self, call: Call) -> Reply:
        raise NotImplementedError

    async def responses(self, call: Call) -> Reply:
        raise NotImplementedError

    async def completions(self, call: Call) -> Reply:
        raise NotImplementedError

    async def embeddings(self, call: Call) -> Reply:
        raise NotImplementedError

    def methods(self) -> dict[Kind, ProviderMethod]:
        """The endpoint kinds this provider implements, each with its bound method."""
        served: dict[Kind, ProviderMethod] = {}
        for kind in PROVIDER_KINDS:
            if getattr(type(self), kind.value) is not getattr(Provider, kind.value):
                served[kind] = getattr(self, kind.value)
        return served


ProviderFactory = Callable[[aiohttp.ClientSession, Config], Provider]
