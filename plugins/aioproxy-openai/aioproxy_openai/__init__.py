"""aioproxy provider for OpenAI and any OpenAI-compatible upstream.

Bodies pass through as the client sent them, bar ``model``; streams pass through event by event.
"""

from __future__ import annotations

from aioproxy import Call, Deployment, JSONReply, Provider, Reply, hookimpl
from aioproxy.hookspecs import RegisterProvider
from aioproxy.upstream import (
    answer_of,
    closed_on_failure,
    deployment_timeout,
    forward,
    read_capped,
    timeout_for,
    timeouts_of,
)

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

    async def response_action(self, deployment: Deployment, method: str, path: str) -> JSONReply:
        """``method`` on ``{api_base}{path}`` for a response ``deployment`` created: the core's
        ``GET``/``DELETE /v1/responses/{id}``, ``GET .../input_items`` and ``POST .../cancel``.

        ``path`` starts at the API base (``/responses/resp_1/input_items?limit=5``). The
        upstream's JSON answer comes back as it is; its errors as the client's (a 404 stays a
        404), with the deployment's key, never the client's.
        """
        headers = {"Content-Type": "application/json", **deployment.headers}
        if deployment.api_key:
            headers["Authorization"] = "Bearer " + deployment.api_key
        sending = self.session.request(
            method,
            _base(deployment) + path,
            headers=headers,
            timeout=timeout_for(timeouts_of(deployment, self.config)),
            allow_redirects=False,
        )
        response = await answer_of(sending, deployment)
        with closed_on_failure(response, deployment):
            body = await read_capped(response, deployment)
        response.release()
        return JSONReply(body, response.status)

    async def _forward(self, call: Call, path: str) -> Reply:
        deployment = call.deployment
        assert deployment is not None
        return await forward(
            call,
            self.session,
            _base(deployment) + path,
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


def _base(deployment: Deployment) -> str:
    return (deployment.api_base or DEFAULT_API_BASE).rstrip("/")


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("openai", OpenAIProvider)
