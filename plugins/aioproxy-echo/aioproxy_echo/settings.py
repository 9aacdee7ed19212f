"""A deployment's ``settings`` as the echo reads them."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from msgspec import Meta

from .inputs import MAX_DIMENSIONS

__all__ = ["EchoSettings", "pace"]


class EchoSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``delay``: seconds per generated token; ``dimensions``: the default embedding size.

    Keys the echo does not know are left alone: other plugins may keep their own settings there.
    """

    delay: Annotated[float, Meta(ge=0, le=60)] = 0.0
    dimensions: Annotated[int, Meta(ge=1, le=MAX_DIMENSIONS)] = 16


async def pace(delay: float, tokens: int = 1) -> None:
    """Take ``delay`` seconds per token, as a model would; no await at all without a delay."""
    if delay and tokens:
        await asyncio.sleep(delay * tokens)
