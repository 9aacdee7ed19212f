"""``create_app``: an aiohttp Application serving the OpenAI API through aioproxy's hooks."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import observability
from .bridges.routes import response_routes
from .budget import BufferBudget
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, parse_config
from .errors import ON_ERROR, error_middleware
from .h1client import H1Pool
from .handlers import health, make_deployment_handlers, make_handlers, readiness
from .ingress import Ingress
from .keys import (
    config_key,
    database_key,
    plugin_manager_key,
    pool_key,
    runtime_key,
    secrets_key,
    session_key,
)
from .plugins import make_plugin_manager
from .providers import ProviderFactory, check_settings, registrar
from .request_ids import secrets_pattern
from .routes import ALIASES, AZURE_ALIASES, DEPLOYMENT_ALIASES, merge_aliases, route_table
from .runtime import Runtime
from .upstream import Upstream, make_session

__all__ = ["create_app", "is_open", "resolve_config"]

log = logging.getLogger("aioproxy")

ConfigLike = Config | Mapping[str, Any] | str | os.PathLike[str] | None


def resolve_config(config: ConfigLike) -> Config:
    """A Config from a Config, a mapping shaped like the TOML, a path, or ``None`` (the default)."""
    if config is None:
        return load_config(DEFAULT_CONFIG_PATH)
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return parse_config(config)
    return load_config(config)


def create_app(
    config: ConfigLike = None,
    *,
    plugins: Iterable[object] = (),
    load_entrypoints: bool = True,
    strict_plugins: bool | None = None,
) -> web.Application:
    """Build an aioproxy app, to run on its own or mount with ``parent.add_subapp(prefix, app)``.

    Args:
        config: a Config, a mapping shaped like the TOML, a TOML path, or None for the default.
        plugins: plugins to register besides the built-ins (modules, classes or instances).
        load_entrypoints: also load the installed plugins of entry-point group ``aioproxy``.
        strict_plugins: fail if an installed plugin cannot be imported (default: the config's).

    Raises:
        ConfigError: the config is invalid or names a provider no plugin registers.
    """
    config = resolve_config(config)
    pm = make_plugin_manager(
        config, plugins, load_entrypoints=load_entrypoints, strict=strict_plugins
    )
    factories: dict[str, ProviderFactory] = {}

    pm.hook.register_providers(register=registrar(factories), config=config)
    _check_providers(config, factories)
    check_settings(config, factories)

    runtime = Runtime(config, pm, factories)
    open_mode = is_open(runtime)
    app = web.Application(
        client_max_size=config.server.max_body_size,
        middlewares=[error_middleware],
        # The server aiohttp builds for this app (run.py, run_app, the test server) leaves
        # request bodies as sent: a compressed one is refused unread (Ingress), never inflated,
        # not even while aiohttp drains a refused request's body. A host app mounting this one
        # makes its own server: it should pass the same.
        handler_args={"auto_decompress": False},
    )
    Ingress(config.server, open_mode).install(app)
    app[config_key] = config
    app[plugin_manager_key] = pm
    app[runtime_key] = runtime
    app[secrets_key] = secrets_pattern(config)
    if runtime.hooks.on_error:  # told of the 404s and 405s no handler hears
        app[ON_ERROR] = runtime.hooks.on_error.logged

    aliases = merge_aliases(merge_aliases(ALIASES, AZURE_ALIASES), config.aliases)
    app.router.add_routes(route_table(aliases, make_handlers(runtime)))
    app.router.add_routes(route_table(DEPLOYMENT_ALIASES, make_deployment_handlers(runtime)))
    app.router.add_get("/health", health)
    app.router.add_get("/health/readiness", readiness)
    app.router.add_routes(response_routes())

    def register_route(method: str, path: str, handler: Handler) -> None:
        app.router.add_route(method, path, handler)

    pm.hook.register_routes(register=register_route, config=config)
    observability.install(app, pm, runtime)  # after every route: it names their kinds
    pm.hook.register_contexts(register=app.cleanup_ctx.append, app=app, config=config)
    app.cleanup_ctx.append(_upstream_context)
    if open_mode:
        log.warning(
            "NO AUTHENTICATION: no master key or virtual keys are configured, so anyone who can "
            "reach this proxy can use every model. Set [auth] master_key in the config. "
            "(Meanwhile it answers only requests addressed to a loopback name, [server] host "
            "or [server] allowed_hosts, and no other site's web pages.)"
        )
        if "*" in config.server.cors_origins:
            log.warning("[server] cors_origins allows every origin: any web page can use it")
    return app


async def _upstream_context(app: web.Application) -> AsyncIterator[None]:
    """The upstream connections (a pooled ClientSession for plugins, the lean pool for
    pass-through calls) and the providers, for the app's life."""
    runtime = app[runtime_key]
    config = app[config_key]
    session = make_session(config)
    pool = H1Pool(
        asyncio.get_running_loop(),
        config.upstream.max_connections,
        BufferBudget(config.upstream.max_buffered_bytes),
    )
    app[session_key] = session
    app[pool_key] = pool
    try:
        await runtime.start(Upstream(pool, config, session), app.get(database_key))
        yield
    finally:
        await runtime.close()
        await pool.close()
        await session.close()


def _check_providers(config: Config, factories: Mapping[str, ProviderFactory]) -> None:
    for i, entry in enumerate(config.models):
        if entry.provider not in factories:
            installed = ", ".join(sorted(factories)) or "none"
            raise ConfigError(
                f"model '{entry.name}' names provider '{entry.provider}', which no plugin "
                f"registers (installed: {installed}) - at `$.models[{i}].provider`"
            )


def is_open(runtime: Runtime) -> bool:
    """No key is needed: only the built-in authentication runs (the config's keys and the
    database's, which has keys only once the master key made some), and the config has none."""
    auth = runtime.config.auth
    builtin_only = all(
        getattr(function, "__module__", "").startswith("aioproxy.")
        for function in runtime.hooks.authenticate.functions
    )
    return builtin_only and not auth.master_key and not auth.keys
