"""The ``state`` plugin: with ``[state] redis_url``, the app's Redis link, its shared
counters (handed to the control plane's limits) and the change channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import Config
from ..control.plane import plane_key
from ..hookspecs import RegisterContext, hookimpl
from ..keys import plugin_manager_key, runtime_key
from ..observability.observer import Observer

if TYPE_CHECKING:  # imported in the context, with a redis_url: the Redis client is heavy
    from .changes import Changes
    from .deployments import SharedDeployments
    from .link import RedisLink

__all__ = ["SharedState", "link_key"]

link_key: web.AppKey[RedisLink] = web.AppKey("aioproxy.state.link")
changes_key: web.AppKey[Changes] = web.AppKey("aioproxy.state.changes")
deployments_key: web.AppKey[SharedDeployments] = web.AppKey("aioproxy.state.deployments")


class SharedState:
    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl(trylast=True)  # after the control plane's context: it hands its counters over
    def register_contexts(self, register: RegisterContext, app: web.Application) -> None:
        if self.config.state.redis_url is None:
            return
        state = self.config.state

        async def shared_state(app: web.Application) -> AsyncIterator[None]:
            from .changes import Changes
            from .counters import SharedCounters
            from .deployments import SharedDeployments
            from .link import RedisLink

            link = RedisLink(state)
            link.on_lost, link.on_unusable = _failure_counters(app)
            await link.start()
            app[link_key] = link
            router = app[runtime_key].router
            plane = app.get(plane_key)  # the control plane's context ran first
            reload_keys = plane.cache.reload if plane is not None else _nothing
            changes = Changes(link, reload_keys, router.cool_down)
            app[changes_key] = changes
            router.on_cooldown = changes.announce_cooldown
            counters = SharedCounters(link, plane.clock) if plane is not None else None
            if plane is not None:
                link.monotonic = plane.clock.monotonic  # what it logs once a minute
                plane.shared = counters
                plane.announce_change = changes.announce_keys
            runtime = app[runtime_key]
            configured = [d for group in runtime.deployments.values() for d in group]
            deployments = SharedDeployments(link, router, configured)
            app[deployments_key] = deployments
            scripts = [deployments.script] + ([counters.script] if counters is not None else [])
            await link.preload(*scripts)
            await changes.start()  # before serving: no change missed
            deployments.start()
            try:
                yield
            finally:
                router.on_cooldown = None
                await deployments.close()
                if counters is not None:
                    await counters.close()
                await changes.close()
                await link.close()

        register(shared_state)


async def _nothing() -> None:
    return None


def _failure_counters(
    app: web.Application,
) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
    """``aioproxy_state_redis_lost_total`` and ``aioproxy_state_redis_unusable_keys_total``
    in the app's metrics, when they are on."""
    observer = app[plugin_manager_key].get_plugin("aioproxy.observer")
    metrics = observer.metrics if isinstance(observer, Observer) else None
    if metrics is None:
        return None, None
    from prometheus_client import Counter  # with metrics on only

    registry = None if metrics.multiprocess else metrics.registry
    lost = Counter(
        "aioproxy_state_redis_lost_total",
        "Times Redis became unreachable ([state]): limits fell back to per-process counters.",
        registry=registry,
    )
    unusable = Counter(
        "aioproxy_state_redis_unusable_keys_total",
        "Times a call met a key under [state] prefix it cannot use (of another type, or not "
        "holding counts): the limits of that key's scope fell back to per-process counters, "
        "or the response cache missed.",
        registry=registry,
    )
    return lost.inc, unusable.inc
