"""A fake Azure OpenAI resource on 127.0.0.1, and proxies in front of it.

The fake checks what Azure checks, in Azure's order and with Azure's answers (from its REST API
reference): the route, the key (``api-key``) or the Entra ID token (``Authorization: Bearer``),
the ``api-version`` (required on the deployment routes, none on ``/openai/v1``), and the
deployment. Past those it answers as OpenAI does (aioproxy.testing's FakeOpenAI) with Azure's
content-filter results added to chat completions, and it fails on demand with Azure's own error
answers (``azure_faults``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import aioproxy_azure
import msgspec
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from aioproxy import create_app
from aioproxy.testing import FakeOpenAI, ProxyUnderTest, start_proxy

UPSTREAM_KEY = "azure-key-0123456789abcdef"
DEPLOYMENT = "gpt-4o-prod"  # the Azure deployment name: a model's upstream id in the config
EMBEDDING_DEPLOYMENT = "embed-prod"
API_VERSIONS = ("2024-10-21", "2025-04-01-preview")
_DEPLOYMENT_ROUTE = re.compile(
    r"/openai/deployments/([^/]+)/(?:chat/completions|completions|embeddings)"
)

_SAFE = {"filtered": False, "severity": "safe"}
# Azure's annotations on every chat answer when its default content filter is on.
CONTENT_FILTER_RESULTS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
PROMPT_FILTER_RESULTS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **CONTENT_FILTER_RESULTS,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]

# Azure's error answers: (status, body, headers), as its reference and real answers have them.
AZURE_FAULTS: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    "content_filter": (
        400,
        {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure "
                "OpenAI's content management policy. Please modify your prompt and retry.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {
                        "hate": {"filtered": False, "severity": "safe"},
                        "jailbreak": {"filtered": False, "detected": False},
                        "self_harm": {"filtered": False, "severity": "safe"},
                        "sexual": {"filtered": True, "severity": "medium"},
                        "violence": {"filtered": True, "severity": "high"},
                    },
                },
            }
        },
        {},
    ),
    "bad_request": (
        400,
        {
            "error": {
                "message": "Invalid value for 'temperature': must be at most 2.",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_value",
            }
        },
        {},
    ),
    "rate_limit": (
        429,
        {
            "error": {
                "code": "429",
                "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI "
                "API version 2024-10-21 have exceeded token rate limit of your current OpenAI "
                "S0 pricing tier. Please retry after 7 seconds.",
            }
        },
        {"Retry-After": "7", "retry-after-ms": "7000"},
    ),
    "deployment_not_found": (
        404,
        {
            "error": {
                "code": "DeploymentNotFound",
                "message": "The API deployment for this resource does not exist. If you "
                "created the deployment within the last 5 minutes, please wait a moment and "
                "try again.",
            }
        },
        {},
    ),
    "unauthorized": (
        401,
        {
            "error": {
                "code": "401",
                "message": "Access denied due to invalid subscription key or wrong API "
                "endpoint. Make sure to provide a valid key for an active subscription and "
                "use a correct regional API endpoint for your resource.",
            }
        },
        {},
    ),
    "server_error": (
        500,
        {
            "error": {
                "code": "InternalServerError",
                "message": "The server had an error while processing your request.",
            }
        },
        {},
    ),
    "unavailable": (
        503,
        {
            "error": {
                "code": "ServiceUnavailable",
                "message": "The service is temporarily unable to process your request.",
            }
        },
        {},
    ),
}


def _azure_error(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class FakeAzure(FakeOpenAI):
    """An Azure OpenAI resource: Azure's checks, then FakeOpenAI's answers."""

    def __init__(self) -> None:
        super().__init__(prefix="/openai/deployments/{deployment}")
        self.deployments = {DEPLOYMENT, EMBEDDING_DEPLOYMENT}
        self.tokens: set[str] = set()  # Entra ID tokens it takes as Bearer
        self.azure_faults: list[str] = []  # names in AZURE_FAULTS, for the next requests
        self.refused: list[tuple[str, int]] = []  # (path, status) of requests Azure refused
        self.recorded_stream = False  # answer chat with RECORDED_STREAM, as Azure streams
        self.echo_status = 0  # answer with this status, quoting the credentials it was sent

    def routes(self) -> list[web.RouteDef]:
        routes: list[web.RouteDef] = []
        for prefix in ("/openai/deployments/{deployment}", "/openai/v1", "/openai"):
            self.prefix = prefix  # FakeOpenAI's routes, under each of Azure's prefixes
            routes += super().routes()
        return routes

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._azure)
        return app

    @web.middleware
    async def _azure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            self.refused.append((request.path, refusal.status))
            return refusal
        if self.echo_status:  # as a debugging upstream may: what it got, credentials and all
            said = f"Bad request: {dict(request.headers)}"
            return _azure_error(self.echo_status, {"error": {"code": "Bad", "message": said}})
        if self.azure_faults:
            status, body, headers = AZURE_FAULTS[self.azure_faults.pop(0)]
            await request.read()
            return _azure_error(status, body, headers)
        if self.recorded_stream:
            return await _recorded_stream(await self.record(request), request)
        response = await handler(request)
        if request.path.endswith("/chat/completions") and isinstance(response, web.Response):
            _annotate(response)
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Azure's answer to a request it does not serve, checked in Azure's order."""
        path = request.path
        deployment_route = _DEPLOYMENT_ROUTE.fullmatch(path)
        v1 = path.startswith("/openai/v1/")
        if not (deployment_route or v1 or path.startswith("/openai/responses")):
            return _azure_error(404, {"error": {"code": "404", "message": "Resource not found"}})
        key, authorization = request.headers.get("api-key"), request.headers.get("Authorization")
        bearer = authorization.removeprefix("Bearer ") if authorization else None
        if key != UPSTREAM_KEY and bearer not in self.tokens:
            return _azure_error(*AZURE_FAULTS["unauthorized"][:2])
        version = request.query.get("api-version")
        if (v1 and version not in (None, "preview")) or (not v1 and version not in API_VERSIONS):
            return _azure_error(404, {"error": {"code": "404", "message": "Resource not found"}})
        if deployment_route and deployment_route.group(1) not in self.deployments:
            return _azure_error(*AZURE_FAULTS["deployment_not_found"][:2])
        return None


# A chat stream as Azure sends it: the prompt's filter results first, in a chunk without choices
# (and empty id and model), then each choice's filter results with its content.
RECORDED_STREAM = [
    {"choices": [], "created": 0, "id": "", "model": "", "object": "",
     "prompt_filter_results": PROMPT_FILTER_RESULTS},
    {"choices": [{"content_filter_results": {}, "delta": {"content": "", "role": "assistant"},
                  "finish_reason": None, "index": 0, "logprobs": None}],
     "created": 1733480000, "id": "chatcmpl-az1", "model": "gpt-4o-2024-08-06",
     "object": "chat.completion.chunk", "system_fingerprint": "fp_az"},
    {"choices": [{"content_filter_results": CONTENT_FILTER_RESULTS, "delta": {"content": "Hello"},
                  "finish_reason": None, "index": 0, "logprobs": None}],
     "created": 1733480000, "id": "chatcmpl-az1", "model": "gpt-4o-2024-08-06",
     "object": "chat.completion.chunk", "system_fingerprint": "fp_az"},
    {"choices": [{"content_filter_results": {}, "delta": {}, "finish_reason": "stop", "index": 0,
                  "logprobs": None}],
     "created": 1733480000, "id": "chatcmpl-az1", "model": "gpt-4o-2024-08-06",
     "object": "chat.completion.chunk", "system_fingerprint": "fp_az"},
]  # fmt: skip


async def _recorded_stream(_record: Any, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    for chunk in RECORDED_STREAM:
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _annotate(response: web.Response) -> None:
    """A chat completion as Azure sends it: with its prompt's and each choice's filter results."""
    if response.content_type != "application/json" or not isinstance(response.body, bytes):
        return  # a fault's page, a stream
    try:
        answer = msgspec.json.decode(response.body)
    except msgspec.DecodeError:  # the "garbage" fault
        return
    if not isinstance(answer, dict) or "choices" not in answer:
        return
    answer["prompt_filter_results"] = PROMPT_FILTER_RESULTS
    for choice in answer.get("choices", []):
        choice["content_filter_results"] = CONTENT_FILTER_RESULTS
    response.body = msgspec.json.encode(answer)


def azure_models(api_base: str, **settings: Any) -> list[dict[str, Any]]:
    """The config's models on the fake: chat, instruct and embeddings deployments."""
    common = {"provider": "azure", "api_base": api_base, "api_key": UPSTREAM_KEY}
    if settings:
        common["settings"] = settings
    return [
        {"name": "gpt", "model": DEPLOYMENT, **common},
        {"name": "embed", "model": EMBEDDING_DEPLOYMENT, **common},
    ]


StartAzureProxy = Callable[..., Awaitable[ProxyUnderTest]]
StartUp = Callable[[list[dict[str, Any]]], Awaitable[None]]


@pytest.fixture
def azure() -> FakeAzure:
    return FakeAzure()


@pytest.fixture
async def azure_base(aiohttp_server: Any, azure: FakeAzure) -> str:
    """The fake resource's endpoint, as an Azure resource's is given (no path)."""
    return str((await aiohttp_server(azure.app())).make_url("")).rstrip("/")


@pytest.fixture
def start_azure_proxy(aiohttp_server: Any, azure_base: str) -> StartAzureProxy:
    """``await start_azure_proxy(models=None, plugins=None, **settings)``: a proxy in front of
    the fake (by default its two deployments with ``settings``)."""

    async def start(
        models: list[dict[str, Any]] | None = None,
        plugins: list[object] | None = None,
        **settings: Any,
    ) -> ProxyUnderTest:
        config = {"models": models if models is not None else azure_models(azure_base, **settings)}
        return await start_proxy(aiohttp_server, config, plugins or [aioproxy_azure])

    return start


@pytest.fixture
async def proxy(start_azure_proxy: StartAzureProxy) -> ProxyUnderTest:
    return await start_azure_proxy()


@pytest.fixture
async def v1_proxy(start_azure_proxy: StartAzureProxy) -> ProxyUnderTest:
    return await start_azure_proxy(api_version="v1")


@pytest.fixture
def start_up() -> StartUp:
    """``await start_up(models)``: start an app serving ``models`` (then clean it up), for what
    ``AzureProvider.start`` refuses. No server: a failed start-up leaves none to close."""

    async def start(models: list[dict[str, Any]]) -> None:
        app = create_app({"models": models}, plugins=[aioproxy_azure], load_entrypoints=False)
        app.on_startup.freeze()  # as aiohttp's runner does before start-up
        app.on_cleanup.freeze()
        try:
            await app.startup()
        finally:
            await app.cleanup()

    return start
