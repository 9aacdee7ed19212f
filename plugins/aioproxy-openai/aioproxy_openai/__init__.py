"""aioproxy provider for OpenAI and any OpenAI-compatible upstream.

Bodies pass through as the client sent them, bar ``model``; streams pass through event by event.
"""

from __future__ import annotations

import aiohttp

from aioproxy import Call, Config, Deployment, JSONReply, Provider, Reply, hookimpl
from aioproxy.headers import forwarded_names
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

    async def response_action(self, deployment: Deployment, method: str, path: str) -> JSONReply:
        """``method`` on ``{api_base}{path}`` for a response ``deployment`` created: the core's
        ``GET``/``DELETE /v1/responses/{id}``, ``GET .../input_items`` and ``POST .../cancel``.

        ``path`` starts at the API base (``/responses/resp_1/input_items?limit=5``). The
        upstream's JSON answer comes back as it is; its errors as the client's (a 404 stays a
        404), with the deployment's key, never the client's.
        """
        headers = _deployment_headers(deployment)
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
        """The upstream's headers, built afresh: the client's own key never travels upstream.

        Names are lower case, so that a later one replaces an earlier one of any case: the
        deployment's headers win over the client's, and its key over both.
        """
        deployment = call.deployment
        assert deployment is not None
        client_headers = call.request.headers
        forwarded = {n: v for n in self._forwarded if (v := client_headers.get(n)) is not None}
        forwarded.update(call.upstream_headers)  # the gateway's request id replaces the client's
        headers = _deployment_headers(deployment, forwarded)
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
    register("openai", OpenAIProvider)
