"""The providers of one app: factories made into started instances, and what serves each endpoint
kind for each deployment (a provider's own method, a bridge, or a deployment's own table)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .bridges import NativeResponses, ResponseStore, bridge_methods
from .bridges.completions import Admission
from .config import Config
from .context import Call, Deployment
from .errors import BadRequest, ProxyError
from .providers import Provider, ProviderConfig, ProviderFactory, ProviderMethod, make_provider
from .routes import Kind
from .upstream import Upstream

__all__ = ["Registry"]

log = logging.getLogger("aioproxy")


class Registry:
    """Every registered provider, started once per app, and the method serving each call."""

    def __init__(
        self,
        factories: Mapping[str, ProviderFactory],
        config: Config,
        deployments: Mapping[str, tuple[Deployment, ...]],
    ) -> None:
        self.factories = dict(factories)
        self.config = config
        self.deployments = deployments
        self.providers: dict[str, Provider] = {}
        self.native: dict[str, dict[Kind, ProviderMethod]] = {}  # each provider's own methods
        self.serving: dict[str, dict[Kind, ProviderMethod]] = {}  # ... with the bridges
        # By deployment key: the deployments that serve otherwise than their provider (their
        # ``endpoints``, or a native route found missing). Empty in the common case.
        self.overrides: dict[str, dict[Kind, ProviderMethod]] = {}
        self.natives = NativeResponses(None, ())  # native response ids; the store's, once started
        self._admission: Admission | None = None

    async def start(
        self, upstream: Upstream, store: ResponseStore | None, admission: Admission
    ) -> None:
        """Create and start one instance of every registered provider.

        A provider that serves chat completions but not responses or legacy completions gets
        them through the bridges (``aioproxy.bridges``); so does a deployment whose
        ``endpoints`` leave them out, or whose upstream turns out to lack ``/v1/responses``.
        ``admission`` counts the completions bridge's further chat calls.
        """
        configured = [d for deployments in self.deployments.values() for d in deployments]
        self.natives = NativeResponses(store, configured)
        self._admission = admission
        for name, factory in self.factories.items():
            config = ProviderConfig.of(name, self.config, self.deployments)
            provider = make_provider(factory, upstream, config)
            await provider.start()
            self.providers[name] = provider
            self.native[name] = provider.methods()
            self.serving[name] = self._serving_of(name, None)
        for deployment in configured:
            if deployment.endpoints is not None and deployment.provider in self.native:
                self.overrides[deployment.key] = self._serving_of(
                    deployment.provider, deployment.endpoints
                )
                if unknown := deployment.endpoints - self.native[deployment.provider].keys():
                    log.warning(
                        "%s lists endpoints its provider does not implement: %s",
                        deployment.describe(),
                        ", ".join(sorted(unknown)),
                    )

    def serves(self, kind: Kind) -> bool:
        """Whether some provider serves ``kind``, natively or bridged."""
        return any(kind in methods for methods in self.serving.values())

    async def close(self) -> None:
        for name, provider in self.providers.items():
            try:
                await provider.close()
            except Exception:
                log.exception("provider %r failed to close", name)
        self.providers.clear()
        self.native.clear()
        self.serving.clear()
        self.overrides.clear()
        await self.natives.drain()

    def method_for(self, call: Call) -> ProviderMethod:
        """What serves ``call`` on its deployment: 404 ``provider_not_found`` if its provider
        is not installed, 400 ``unsupported_endpoint`` if nothing serves its kind there."""
        deployment = call.deployment
        methods = self.serving.get(deployment.provider)
        if methods is None:
            raise ProxyError(
                f"Deployment {deployment.describe()} names provider '{deployment.provider}', "
                "which is not installed",
                code="provider_not_found",
            )
        if self.overrides or deployment.endpoints is not None:
            methods = self._deployment_methods(deployment, methods)
        method = methods.get(call.kind)
        if method is None:
            raise BadRequest(
                f"Provider '{deployment.provider}' does not serve {call.kind.value} "
                f"(model '{call.model}')",
                code="unsupported_endpoint",
            )
        return method

    def _serving_of(
        self, provider: str, endpoints: frozenset[Kind] | None
    ) -> dict[Kind, ProviderMethod]:
        """What serves each kind for ``provider``'s deployments (limited to ``endpoints``)."""
        return bridge_methods(
            self.native[provider],
            self.natives.store,
            self.config.completions,
            self._admission,
            endpoints=endpoints,
            natives=self.natives,
            fall_back=self._bridge_from_now_on,
            max_body_size=self.config.server.max_body_size,
        )

    def _bridge_from_now_on(self, deployment: Deployment, bridge: ProviderMethod) -> None:
        """Serve ``deployment``'s responses through ``bridge``: its upstream lacks the route."""
        key = deployment.key
        methods = self.overrides.get(key) or self.serving[deployment.provider]
        if methods.get(Kind.RESPONSES) is bridge:
            return  # a request that was in flight when it was found out
        log.warning(
            "%s has no /responses route upstream; bridging its Responses API onto chat "
            "completions from now on",
            deployment.describe(),
        )
        self.overrides[key] = {**methods, Kind.RESPONSES: bridge}

    def _deployment_methods(
        self, deployment: Deployment, methods: dict[Kind, ProviderMethod]
    ) -> dict[Kind, ProviderMethod]:
        """The deployment's own serving table, if it has one (made now for a deployment a
        plugin made with ``endpoints``)."""
        key = deployment.key
        own = self.overrides.get(key)
        if own is None and deployment.endpoints is not None:
            own = self.overrides[key] = self._serving_of(deployment.provider, deployment.endpoints)
        return methods if own is None else own
