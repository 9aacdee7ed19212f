"""How bytes reach an upstream: the ``Transport`` and ``UpstreamResponse`` Protocols, and a
ClientSession as a Transport. The lean pool (``h1client.H1Pool``) is the other Transport."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Protocol, runtime_checkable

import aiohttp
import attr
from multidict import CIMultiDictProxy

from .config import Config, Timeouts

__all__ = [
    "SessionTransport",
    "StreamTimeout",
    "Transport",
    "UpstreamResponse",
    "client_timeout",
    "make_session",
]


@runtime_checkable
class UpstreamResponse(Protocol):
    """An upstream's answer once its head is in: what a relay reads. Release or close it on
    every path."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> aiohttp.StreamReader: ...
    async def read(self) -> bytes: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """How bytes reach an upstream: one POST method, redirects never followed."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts
    ) -> UpstreamResponse: ...
    async def close(self) -> None: ...


@attr.s(auto_attribs=True, frozen=True, slots=True)  # as aiohttp's own (attrs: its dependency)
class StreamTimeout(aiohttp.ClientTimeout):
    """aiohttp's timeouts, plus ``event``: the longest a stream may go without a complete event
    (``read``). Before the answer's body begins, the upstream may stay silent until
    ``first_byte`` when that is longer (``sock_read``), for models that think for minutes
    before their first token; the lean pool bounds later silences by ``event``."""

    event: float | None = None


@lru_cache(maxsize=256)
def client_timeout(timeouts: Timeouts) -> StreamTimeout:
    """``timeouts`` as aiohttp's (cached: a handful of distinct values per app)."""
    return StreamTimeout(
        total=timeouts.total,
        connect=timeouts.connect,
        sock_read=max(timeouts.read, timeouts.first_byte or 0),
        event=timeouts.read,
    )


class SessionTransport:
    """A ClientSession as a Transport: for providers made outside an app, and for what needs
    the session's features (proxies, cookies)."""

    __slots__ = ("session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts
    ) -> UpstreamResponse:
        return await self.session.post(
            url, data=body, headers=headers, timeout=client_timeout(timeouts), allow_redirects=False
        )

    async def close(self) -> None:
        await self.session.close()


def make_session(config: Config) -> aiohttp.ClientSession:
    """The app's one pooled session; per-call timeouts come from the deployment."""
    connector = aiohttp.TCPConnector(
        limit=config.upstream.max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=client_timeout(config.upstream.timeouts),
        # A gateway serves many callers: never carry one caller's cookies into another's call.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        raise_for_status=False,
    )
