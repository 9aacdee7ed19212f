"""aioproxy provider for Azure OpenAI.

A pass-through like the ``openai`` plugin: bodies go as the client sent them, bar ``model``, and
streams event by event, so Azure's content-filter results reach the client as Azure sent them.
What differs is where (a deployment's routes with ``?api-version=``, or the v1 API), how it
authenticates (``api-key``, or an Entra ID bearer token, fixed or from a command) and its errors.
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

import msgspec

from aioproxy import (
    BadGateway,
    Call,
    ConfigError,
    Deployment,
    JSONReply,
    Kind,
    Provider,
    ProviderConfig,
    RegisterProvider,
    Reply,
    Secret,
    Upstream,
    hookimpl,
)

from .errors import azure_error
from .tokens import Clock, RunCommand, TokenError, TokenSource, run_command

__all__ = ["AzureProvider", "Settings", "azure_error", "register_providers"]

DEFAULT_API_VERSION = "2024-10-21"  # the latest GA version of the data-plane API
V1 = "v1"  # api_version for the /openai/v1/ API, which takes no api-version
_MAX_TARGETS = 1024  # deployments made per request (by a plugin) must not pile up


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings``; a key it does not name stops start-up (a typo, say)."""

    # The data-plane API version sent as ?api-version= on the deployment routes; "v1": the
    # /openai/v1/ routes instead (the model in the body is the deployment name).
    api_version: str = DEFAULT_API_VERSION
    # A Microsoft Entra ID token, sent as Authorization: Bearer instead of the api-key. A
    # Secret: masked, as api_key is, in whatever an upstream says (errors, logs).
    azure_ad_token: Secret | None = None
    # A command printing a token (az's JSON or the bare token), run at start-up and again
    # token_refresh_margin seconds before the token expires, e.g. ["az", "account",
    # "get-access-token", "--resource", "https://cognitiveservices.azure.com", "-o", "json"].
    token_command: list[str] | None = None
    token_refresh_margin: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    # How long a token lasts when the command does not say (a bare token).
    token_lifetime: Annotated[float, msgspec.Meta(gt=0)] = 3600.0

    def __post_init__(self) -> None:
        if self.azure_ad_token and self.token_command:
            raise ValueError("set azure_ad_token or token_command, not both")
        if self.token_command is not None and not self.token_command:
            raise ValueError("token_command must name a command")


class _Target:
    """Where and how one deployment is called, worked out once: its URL per endpoint kind, its
    fixed headers (its own and its key) and its token source, if it has one."""

    __slots__ = ("base", "deployment", "headers", "query", "tokens", "urls")

    def __init__(
        self, deployment: Deployment, settings: Settings, tokens: TokenSource | None
    ) -> None:
        self.deployment = deployment  # the one it was made for (the cache checks it)
        if not deployment.api_base:
            raise ConfigError(
                f"model '{deployment.name}': the azure provider needs api_base, the resource "
                "endpoint (https://<resource>.openai.azure.com)"
            )
        endpoint = deployment.api_base.rstrip("/").removesuffix("/openai/v1")
        endpoint = endpoint.removesuffix("/openai")
        if settings.api_version == V1:
            self.base, self.query = f"{endpoint}/openai/v1", ""
            routes = f"{endpoint}/openai/v1"
            responses = f"{self.base}/responses"
        else:
            self.base, self.query = (
                f"{endpoint}/openai",
                "api-version=" + quote(settings.api_version),
            )
            routes = f"{endpoint}/openai/deployments/{quote(deployment.model, safe='')}"
            responses = f"{self.base}/responses?{self.query}"
        suffix = f"?{self.query}" if self.query else ""
        self.urls = {
            Kind.CHAT_COMPLETIONS: f"{routes}/chat/completions{suffix}",
            Kind.COMPLETIONS: f"{routes}/completions{suffix}",
            Kind.EMBEDDINGS: f"{routes}/embeddings{suffix}",
            Kind.RESPONSES: responses,
        }
        self.headers = {"content-type": "application/json"}
        for name, value in deployment.headers.items():
            self.headers[name.lower()] = value
        self.tokens = tokens
        if settings.azure_ad_token:
            self.headers["authorization"] = "Bearer " + settings.azure_ad_token
        elif tokens is None:
            if not deployment.api_key:
                raise ConfigError(
                    f"model '{deployment.name}': the azure provider needs api_key, "
                    "settings.azure_ad_token or settings.token_command"
                )
            self.headers["api-key"] = deployment.api_key

    def url(self, path: str) -> str:
        """``path`` (from the API base, with or without a query) with the api-version."""
        if not self.query:
            return self.base + path
        return f"{self.base}{path}{'&' if '?' in path else '?'}{self.query}"


class AzureProvider(Provider):
    """Forwards every endpoint kind to an Azure OpenAI resource, as the deployment says."""

    settings_type = Settings  # the core checks every deployment's settings at start-up

    def __init__(
        self,
        upstream: Upstream,
        config: ProviderConfig,
        *,
        clock: Clock = time.time,
        run: RunCommand = run_command,
    ) -> None:
        super().__init__(upstream, config)
        self._clock = clock
        self._run = run
        self._targets: dict[str, _Target] = {}
        self._token_sources: dict[tuple[str, ...], TokenSource] = {}

    async def start(self) -> None:
        """Check every deployment and read each token command's first token: a missing
        api_base or credential, or a failing command, stops start-up."""
        first_users: dict[TokenSource, Deployment] = {}
        for deployment in self.config.deployments:  # only the ones naming this provider
            tokens = self._target(deployment).tokens
            if tokens is not None:
                first_users.setdefault(tokens, deployment)
        for tokens, deployment in first_users.items():  # each command once
            try:
                await tokens.refresh()
            except TokenError as exc:
                raise ConfigError(f"model '{deployment.name}': {exc}") from None

    async def close(self) -> None:
        for source in self._token_sources.values():
            await source.close()

    async def chat_completions(self, call: Call) -> Reply:
        return await self._forward(call, Kind.CHAT_COMPLETIONS)

    async def responses(self, call: Call) -> Reply:
        return await self._forward(call, Kind.RESPONSES)

    async def completions(self, call: Call) -> Reply:
        return await self._forward(call, Kind.COMPLETIONS)

    async def embeddings(self, call: Call) -> Reply:
        return await self._forward(call, Kind.EMBEDDINGS)

    async def response_action(self, deployment: Deployment, method: str, path: str) -> JSONReply:
        """``method`` on a response the deployment created (the core's ``GET``/``DELETE
        /v1/responses/{id}``, its ``input_items`` and ``cancel``), with the api-version."""
        target = self._target(deployment)
        headers = await self._auth(target, deployment, dict(target.headers))
        return await self.request(deployment, method, target.url(path), headers)

    async def _forward(self, call: Call, kind: Kind) -> Reply:
        deployment = call.deployment
        target = self._target(deployment)
        # Lower-case names, weakest first: the client's forwarded headers, the gateway's (the
        # request id), the deployment's own and its credential.
        headers = self.upstream.client_headers(call)
        headers.update(call.upstream_headers)
        headers.update(target.headers)
        if target.tokens is not None:
            await self._auth(target, deployment, headers)
        if call.stream:
            headers["accept"] = "text/event-stream"
        return await self.upstream.forward(call, target.urls[kind], headers, read_error=azure_error)

    async def _auth(
        self, target: _Target, deployment: Deployment, headers: dict[str, str]
    ) -> dict[str, str]:
        """``headers`` with the token source's current token, if the deployment has one."""
        if target.tokens is not None:
            try:
                headers["authorization"] = "Bearer " + await target.tokens.token()
            except TokenError as exc:
                raise BadGateway(
                    f"Deployment {deployment.describe()} has no Entra ID token: {exc}",
                    code="upstream_auth_failed",
                ) from None
        return headers

    def _target(self, deployment: Deployment) -> _Target:
        """The deployment's target, worked out on its first call (at start-up for the config's)."""
        target = self._targets.get(deployment.key)
        if target is not None and target.deployment is deployment:
            return target
        settings: Settings = self.settings(deployment)
        tokens = None
        if settings.token_command:
            tokens = self._token_source(settings)
        target = _Target(deployment, settings, tokens)
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[deployment.key] = target
        return target

    def _token_source(self, settings: Settings) -> TokenSource:
        """One source per command: deployments sharing a command share its token."""
        command = tuple(settings.token_command or ())
        source = self._token_sources.get(command)
        if source is None:
            source = self._token_sources[command] = TokenSource(
                command,
                margin=settings.token_refresh_margin,
                lifetime=settings.token_lifetime,
                clock=self._clock,
                run=self._run,
            )
        return source


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(AzureProvider)
