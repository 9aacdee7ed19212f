"""aioproxy provider for OpenAI and any OpenAI-compatible upstream.

Bodies pass through as the client sent them, bar ``model``; streams pass through event by event.
"""

from __future__ import annotations

from aioproxy import Call, Provider, Reply, hookimpl
from aioproxy.hookspecs import RegisterProvider
from aioproxy.upstream import deployment_timeout, forward

__all__ = ["OpenAIProvider", "register_providers"]

DEFAULT_API_BASE = "https://api.openai.com/v1"


class OpenAIProvider(Provider):
    """Forwards every endpoint kind to ``{api_base}/<path>`` with the deployment's key."""

    name = "openai"

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
        """The upstream's headers, built afresh: the client's own key never travels upstream."""
        deployment = call.deployment
        assert deployment is not None
        headers = {"Content-Type": "application/json"}
        client_headers = call.request.headers
        for name in self.config.upstream.forward_headers:
            value = client_headers.get(name)
            if value is not None:
                headers[name] = value
        headers.update(deployment.headers)
        if deployment.api_key:
            headers["Authorization"] = "Bearer " + deployment.api_key
        if call.stream:
            headers["Accept"] = "text/event-stream"
        return headers


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("openai", OpenAIProvider)
