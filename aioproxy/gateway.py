"""One app's gateway: its hooks, providers and session, and the request pipeline through them."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import aiohttp
import msgspec
import pluggy
from aiohttp import web

from .config import Config
from .context import Call, Deployment, Principal
from .errors import (
    AuthenticationError,
    BadRequest,
    ModelNotFound,
    PermissionDenied,
    ProxyError,
)
from .outcome import Outcome
from .plugins import Hooks
from .providers import Provider, ProviderFactory, ProviderMethod
from .routes import Kind
from .upstream import failure_from

__all__ = ["Gateway", "decode_request"]

log = logging.getLogger("aioproxy")

_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_model = msgspec.json.Decoder(str).decode
_decode_stream = msgspec.json.Decoder(bool | None).decode


def decode_request(body: bytes) -> tuple[dict[str, msgspec.Raw], str, bool]:
    """Split a request body into its raw top-level fields, and read ``model`` and ``stream``.

    Only what the core needs is decoded; every other field stays as the bytes the client sent.
    """
    if not body:
        raise BadRequest("The request body is empty; expected a JSON object")
    try:
        body.decode("utf-8")  # msgspec skips over fields it keeps raw; check them all here
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    try:
        fields = _decode_fields(body)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply", code="invalid_json") from None
    except msgspec.ValidationError:
        raise BadRequest("The request body must be a JSON object", code="invalid_body") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    raw_model = fields.get("model")
    if raw_model is None:
        raise BadRequest(
            "Missing required parameter: 'model'", param="model", code="missing_required_parameter"
        )
    try:
        model = _decode_model(raw_model)
    except msgspec.DecodeError:
        raise BadRequest("'model' must be a string", param="model", code="invalid_type") from None
    if not model:
        raise BadRequest("'model' must not be empty", param="model", code="invalid_value")
    raw_stream = fields.get("stream")
    stream = False
    if raw_stream is not None:
        try:
            stream = bool(_decode_stream(raw_stream))
        except msgspec.DecodeError:
            raise BadRequest(
                "'stream' must be a boolean", param="stream", code="invalid_type"
            ) from None
    return fields, model, stream


class Gateway:
    """Everything one app needs per request, resolved at start-up (providers once the session is open)."""

    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        factories: Mapping[str, ProviderFactory],
    ) -> None:
        self.config = config
        self.pm = pm
        self.hooks = Hooks(pm)
        self.factories = dict(factories)
        self.providers: dict[str, Provider] = {}
        self.serving: dict[str, dict[Kind, ProviderMethod]] = {}
        self.created = int(time.time())

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Create and start one instance of every registered provider."""
        for name, factory in self.factories.items():
            provider = factory(session, self.config)
            await provider.start()
            self.providers[name] = provider
            self.serving[name] = provider.methods()

    async def close(self) -> None:
        for name, provider in self.providers.items():
            try:
                await provider.close()
            except Exception:
                log.exception("provider %r failed to close", name)
        self.providers.clear()
        self.serving.clear()

    async def authenticate(self, request: web.Request, kind: Kind) -> Principal:
        principal = await self.hooks.authenticate.first(request=request, kind=kind)
        if principal is None:
            raise AuthenticationError("No plugin accepted the request's credentials")
        return principal

    async def read_call(self, kind: Kind, request: web.Request, principal: Principal) -> Call:
        """Read the body into a Call, refusing a model the principal may not use."""
        fields, model, stream = decode_request(await request.read())
        if not principal.allows(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'", param="model"
            )
        return Call(kind, request, principal, model, fields, stream)

    async def route(self, call: Call) -> None:
        """Map the call's model to a deployment (``map_model``), then run ``before_request``."""
        principal, model = call.principal, call.model
        deployment: Deployment | None = await self.hooks.map_model.first(
            principal=principal, model=model, kind=call.kind, call=call
        )
        if deployment is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or is not served here", param="model"
            )
        call.route_to(deployment)
        if self.hooks.before_request:
            await self.hooks.before_request.each(call=call)

    def method_for(self, call: Call) -> ProviderMethod:
        deployment = call.deployment
        assert deployment is not None
        methods = self.serving.get(deployment.provider)
        if methods is None:
            raise ProxyError(
                f"Deployment {deployment.describe()} names provider '{deployment.provider}', "
                "which is not installed",
                code="provider_not_found",
            )
        method = methods.get(call.kind)
        if method is None:
            raise BadRequest(
                f"Provider '{deployment.provider}' does not serve {call.kind.value} "
                f"(model '{call.model}')",
                code="unsupported_endpoint",
            )
        return method

    async def call_provider(self, call: Call) -> object:
        method = self.method_for(call)
        try:
            return await method(call)
        except ProxyError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise failure_from(exc, call.deployment) from exc

    async def report(self, call: Call, outcome: Outcome) -> None:
        """Run ``after_response``; the answer is already sent, so failures are only logged."""
        try:
            await self.hooks.after_response.each(call=call, outcome=outcome)
        except Exception:
            log.exception("an after_response hook failed")

    async def observe_error(
        self, request: web.Request, error: BaseException, call: Call | None
    ) -> None:
        try:
            await self.hooks.on_error.each(request=request, error=error, call=call)
        except Exception:
            log.exception("an on_error hook failed")

    def model_names(self, principal: Principal) -> list[str]:
        """The model names ``principal`` may use, as ``list_models`` implementations give them."""
        names: dict[str, None] = {}
        for result in self.hooks.list_models.each_sync(principal=principal):
            for name in result:
                if principal.allows(name):
                    names[name] = None
        return list(names)
