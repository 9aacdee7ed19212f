"""A deployment's ``settings`` as the echo reads them."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from aioproxy import Call, ProxyError

from .inputs import MAX_DIMENSIONS

__all__ = ["EchoSettings", "pace", "parse_settings", "settings_of"]


class EchoSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``delay``: seconds per generated token; ``dimensions``: the default embedding size.

    Keys the echo does not know are left alone: other plugins may keep their own settings there.
    """

    delay: Annotated[float, Meta(ge=0, le=60)] = 0.0
    dimensions: Annotated[int, Meta(ge=1, le=MAX_DIMENSIONS)] = 16


def parse_settings(settings: dict[str, Any]) -> EchoSettings:
    """Raises msgspec.ValidationError. Lax, as ``${VAR}`` in the config gives strings ("0.05")."""
    return msgspec.convert(settings, EchoSettings, strict=False)


def settings_of(call: Call) -> EchoSettings:
    """The deployment's settings; a bad value (from a plugin's deployment, say) is a 500."""
    assert call.deployment is not None
    try:
        return parse_settings(call.deployment.settings)
    except msgspec.ValidationError as exc:
        raise ProxyError(
            f"Deployment {call.deployment.describe()} has invalid echo settings: {exc}",
            code="invalid_settings",
        ) from None


async def pace(delay: float, tokens: int = 1) -> None:
    """Take ``delay`` seconds per token, as a model would; no await at all without a delay."""
    if delay and tokens:
        await asyncio.sleep(delay * tokens)
