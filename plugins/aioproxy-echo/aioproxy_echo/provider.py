"""The ``echo`` provider: every endpoint kind, answered from the request alone.

It has no ``responses`` method: the core's Responses bridge serves ``/v1/responses`` on its chat,
storing each response, so that ``previous_response_id`` and ``GET /v1/responses/{id}`` behave
as they do for any chat-only provider.
"""

from __future__ import annotations

from aioproxy import Call, Provider, Reply

from . import chat, completions, embeddings
from .settings import EchoSettings

__all__ = ["EchoProvider"]


class EchoProvider(Provider):
    """Echoes the input back, word by word; no network, so it needs no ``api_base`` or key."""

    settings_type = EchoSettings  # checked by the core at start-up, decoded once per deployment

    async def chat_completions(self, call: Call) -> Reply:
        return await chat.answer(call, self._settings_for(call))

    async def completions(self, call: Call) -> Reply:
        return await completions.answer(call, self._settings_for(call))

    async def embeddings(self, call: Call) -> Reply:
        return await embeddings.answer(call, self._settings_for(call))

    def _settings_for(self, call: Call) -> EchoSettings:
        settings: EchoSettings = self.settings(call.deployment)
        return settings
