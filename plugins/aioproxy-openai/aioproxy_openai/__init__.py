"""aioproxy provider for OpenAI and any OpenAI-compatible upstream.

Bodies pass through as the client sent them, bar ``model``; streams pass through event by event.
"""

from __future__ import annotations

from aioproxy import Call, Deployment, JSONReply, Provider, RegisterProvider, Reply, hookimpl

__all__ = ["OpenAIProvider", "register_providers"]

DEFAULT_API_BASE = "https://api.openai.com/v1"


class OpenAIProvider(Provider):
    """Forwards every endpoint kind to ``{api_base}/<path>`` with the deployment's key."""

    async def chat_completions(self, call: Call) -> Reply:
        return await self._forward(call, "/chat/completions")

    async def responses(self, call: Call) -> Reply:
        return await self._forward(call, "/responses")

    async def completions(self, call: Call) -> Reply:
        return await self._forward(call, "/completions")

    async def embeddings(self, call: Call) -> Reply:
        return await self._forward(call, "/embeddings")

    async def response_action(self, deployment: Deployment, method: str, path: str) -> JSONReply:
        """``method`` on ``{api_base}{path}`` for a response ``deployment`` created: the core's
        ``GET``/``DELETE /v1/responses/{id}``, ``GET .../input_items`` and ``POST .../cancel``.

        ``path`` starts at the API base (``/responses/resp_1/input_items?limit=5``). The
        upstream's JSON answer comes back as it is; its errors as the client's (a 404 stays a
        404), with the deployment's key, never the client's.
        """
        return await self.request(
            deployment, method, _base(deployment) + path, _deployment_headers(deployment)
        )

    async def _forward(self, call: Call, path: str) -> Reply:
        return await self.upstream.forward(call, _base(call.deployment) + path, self._headers(call))

    def _headers(self, call: Call) -> dict[str, str]:
        """The upstream's headers, built afresh: the client's own key never travels upstream.

        Names are lower case, so that a later one replaces an earlier one of any case: the
        deployment's headers win over the client's, and its key over both.
        """
        forwarded = self.upstream.client_headers(call)
        forwarded.update(call.upstream_headers)  # the gateway's request id replaces the client's
        headers = _deployment_headers(call.deployment, forwarded)
        if call.stream:
            headers["accept"] = "text/event-stream"
        return headers


def _deployment_headers(
    deployment: Deployment, forwarded: dict[str, str] | None = None
) -> dict[str, str]:
    """JSON, then the client's ``forwarded`` headers, the deployment's and its key, in that
    order of precedence from weakest; lower case, so that each name is sent once."""
    headers = {"content-type": "application/json", **(forwarded or {})}
    for name, value in deployment.headers.items():
        headers[name.lower()] = value
    if deployment.api_key:
        headers["authorization"] = "Bearer " + deployment.api_key
    return headers


def _base(deployment: Deployment) -> str:
    return (deployment.api_base or DEFAULT_API_BASE).rstrip("/")


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(OpenAIProvider)
