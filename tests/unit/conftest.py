"""Fixtures shared by the unit tests."""

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from aioproxy.h1client import H1Pool
from aioproxy.transport import SessionTransport, Transport


@pytest.fixture(params=["h1", "session"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    """Either Transport: the behaviour tests take this and run against both, so the lean pool
    is checked against ClientSession's answers (tests of the pool's own workings take ``pool``)."""
    made: Transport
    if request.param == "h1":
        made = H1Pool(asyncio.get_running_loop())
    else:
        made = SessionTransport(aiohttp.ClientSession())
    yield made
    await made.close()
