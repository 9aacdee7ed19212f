"""What a provider answers with: a whole JSON answer or a stream of SSE events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec

__all__ = ["ClosedAtOnce", "JSONReply", "Reply", "StreamReply"]

_encode = msgspec.json.Encoder().encode


class JSONReply:
    """A whole JSON answer: encoded ``body`` bytes, sent with ``status``."""

    __slots__ = ("body", "headers", "status")

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


class ClosedAtOnce:
    """Events whose ``aclose`` has nothing to await: ``close()`` does it all, and
    :meth:`StreamReply.aclose` calls it, with no coroutine (the core's SSE readers)."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError


class StreamReply:
    """A streamed answer: ``events`` yields complete SSE events (bytes ending in a blank line).

    An item may hold several events (a relay passes on what each network read completed, in
    one write); use ``aioproxy.streaming.split_events`` to take one apart.

    The proxy pulls the first event before it sends the response headers, so a provider that
    raises a ProxyError before its first event still answers with a proper status. ``close`` (if
    given) runs once the stream is over, also when the client went away: release upstream
    connections there. ``finished`` (if given) says whether the upstream's answer has ended:
    after the final event the proxy waits (up to 5 s) for the rest of ``events`` unless it says
    so, to let the upstream connection go back to its pool whole.
    """

    __slots__ = ("close", "events", "finished", "headers")

    def __init__(
        self,
        events: AsyncIterator[bytes],
        close: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
        finished: Callable[[], bool] | None = None,
    ) -> None:
        self.events = events
        self.close = close
        self.headers = headers
        self.finished = finished

    async def aclose(self) -> None:
        events = self.events
        try:
            if isinstance(events, ClosedAtOnce):
                events.close()
            elif (aclose := getattr(events, "aclose", None)) is not None:
                await aclose()
        finally:
            if self.close is not None:
                result = self.close()
                if result is not None and isinstance(result, Awaitable):
                    await result


Reply = JSONReply | StreamReply
