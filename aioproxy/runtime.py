"""One app's per-request state, resolved at start-up: hooks, router, providers, dispatcher,
keep-alive clock and response store."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pluggy
from aiohttp import web

from .bridges import ResponseStore
from .config import Config
from .context import Principal
from .deployments import deployments_from
from .dispatch import Dispatcher
from .errors import AuthenticationError
from .keepalive import KeepAliveClock
from .plugins import Hooks
from .providers import ProviderFactory
from .registry import Registry
from .router import Clock, Router
from .routes import Kind
from .upstream import Upstream

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Runtime"]

log = logging.getLogger("aioproxy")


class Runtime:
    """Everything one app needs per request; the providers and the store once ``start``ed."""

    def __init__(
        self,
        config: Config,
        pm: pluggy.PluginManager,
        factories: Mapping[str, ProviderFactory],
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.hooks = Hooks(pm)
        self.created = int(time.time())
        self.router = Router(config.router, clock)  # its clock times retries too
        self.deployments = deployments_from(config)  # the configured ones, for /health/readiness
        self.registry = Registry(factories, config, self.deployments)
        self.dispatcher = Dispatcher(self.router, self.registry, self.hooks, config)
        self.store: ResponseStore | None = None  # stored responses, for the responses bridge
        interval = config.server.keepalive_interval
        self.keepalive = KeepAliveClock(interval) if interval else None

    async def start(self, upstream: Upstream, database: AsyncEngine | None = None) -> None:
        """Start the providers on ``upstream``; keep the response store if something serves
        responses, in the control plane's ``database`` (without one: its own engine on
        ``[database] url``, opened now, so that a database that cannot be opened stops start-up)."""
        settings = self.config.responses
        if settings.store_path is not None:
            log.warning(
                "[responses] store_path is deprecated and ignored: stored responses live in"
                " [database] url; those kept in %s are not carried over",
                settings.store_path,
            )
        store = (
            ResponseStore(
                self.config.database.url if database is None else database,
                ttl=settings.ttl,
                max_bytes=settings.max_bytes,
                cleanup_interval=settings.cleanup_interval,
                statement_timeout=self.config.database.statement_timeout,
            )
            if settings.store
            else None
        )
        await self.registry.start(upstream, store, self.dispatcher)
        if store is not None and self.registry.serves(Kind.RESPONSES):
            await store.open()
            store.start()  # its periodic cleanup
            self.store = store
        else:  # nothing serves responses: nothing to keep
            self.registry.natives.store = None

    async def close(self) -> None:
        await self.registry.close()
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def authenticate(self, request: web.Request, kind: Kind) -> Principal:
        hook = self.hooks.authenticate
        principal: Principal | None = await hook.first(request=request, kind=kind)
        if principal is None:
            raise AuthenticationError("No plugin accepted the request's credentials")
        return principal

    def model_names(self, principal: Principal) -> list[str]:
        """The model names ``principal`` may use, as ``list_models`` implementations give them."""
        names: dict[str, None] = {}
        for result in self.hooks.list_models.each_sync(principal=principal):
            for name in result:
                if principal.allows(name):
                    names[name] = None
        return list(names)

    def in_flight(self, model: str) -> int:
        """How many requests are counted in flight on ``model``'s configured deployments."""
        return sum(self.router.health(d).in_flight for d in self.deployments.get(model, ()))
