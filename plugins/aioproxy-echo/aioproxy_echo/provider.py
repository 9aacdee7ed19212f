"""The ``echo`` provider: every endpoint kind, answered from the request alone."""

from __future__ import annotations

import msgspec

from aioproxy import Call, ConfigError, Provider, Reply

from . import chat, completions, embeddings, responses
from .settings import parse_settings, settings_of

__all__ = ["EchoProvider"]


class EchoProvider(Provider):
    """Echoes the input back, word by word; no network, so it needs no ``api_base`` or key."""

    name = "echo"

    async def start(self) -> None:
        """Refuse to start on bad settings, rather than failing each request later."""
        for i, entry in enumerate(self.config.models):
            if entry.provider != self.name:
                continue
            try:
                parse_settings(entry.settings)
            except msgspec.ValidationError as exc:
                raise ConfigError(_settings_error(entry.name, i, str(exc))) from None

    async def chat_completions(self, call: Call) -> Reply:
        return await chat.answer(call, settings_of(call))

    async def completions(self, call: Call) -> Reply:
        return await completions.answer(call, settings_of(call))

    async def responses(self, call: Call) -> Reply:
        return await responses.answer(call, settings_of(call))

    async def embeddings(self, call: Call) -> Reply:
        return await embeddings.answer(call, settings_of(call))


def _settings_error(name: str, index: int, message: str) -> str:
    """msgspec's message, its ``$.field`` path made a path in the config, as core's errors have."""
    path = f"$.models[{index}].settings"
    located = message.replace("`$", f"`{path}") if "`$" in message else f"{message} - at `{path}`"
    return f"model '{name}': invalid echo settings: {located}"
