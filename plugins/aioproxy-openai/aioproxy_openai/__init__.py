"""aioproxy provider for OpenAI and any OpenAI-compatible upstream.

Bodies pass through as the client sent them, bar ``model``; streams pass through event by event.
"""

from __future__ import annotations

import aiohttp

from aioproxy import Call, Config, Provider, Reply, hookimpl
from aioproxy.headers import forwarded_names
from aioproxy.hookspecs import RegisterProvider
from aioproxy.upstream import deployment_timeout, forward

__all__ = ["OpenAIProvider", "register_providers"]

DEFAULT_API_BASE = "https://api.openai.com/v1"


class OpenAIProvider(Provider):
    """Forwards every endpoint kind to ``{api_base}/<path>`` with the deployment's key."""

    name = "openai"

    def __init__(self, session: aiohttp.ClientSession, config: Config) -> None:
        super().__init__(session, config)
        # Lower-cased once: each name is sent once, whatever case the config and client use.
        self._forwarded = forwarded_names(config.upstream.forward_headers)

    async def chat_completions(self, call: Call) -> Reply:
        return await self._forward(call, "/chat/completions")

    async def responses(self, call: Call) -> Reply:
        return await self._forward(call, "/responses")

    async def completions(self, call: Call) -> Reply:
        return await self._forward(call, "/completions")

    async def embeddings(self, call: Call) -> Reply:
        return await self._forward(call, "/embeddings")

    async def _forward(self, call: Call, path: str) -> Reply:
        deployment = call.deployment
        assert deployment is not None
        base = (deployment.api_base or DEFAULT_API_BASE).rstrip("/")
        return await forward(
            call,
            self.session,
            base + path,
            self._headers(call),
            deployment_timeout(call, self.config),
            pool=self.pool,
        )

    def _headers(self, call: Call) -> dict[str, str]:
        """The upstream's headers, built afresh: the client's own key never travels upstream.

        Names are lower case, so that a later one replaces an earlier one of any case: the
        deployment's headers win over the client's, and its key over both.
        """
        deployment = call.deployment
        assert deployment is not None
        headers = {"content-type": "application/json"}
        client_headers = call.request.headers
        for name in self._forwarded:
            value = client_headers.get(name)
            if value is not None:
                headers[name] = value
        for name, value in deployment.headers.items():
            headers[name.lower()] = value
        if deployment.api_key:
            headers["authorization"] = "Bearer " + deployment.api_key
        if call.stream:
            headers["accept"] = "text/event-stream"
        return headers


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("openai", OpenAIProvider)
