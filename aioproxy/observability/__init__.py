"""Observability: request ids, Prometheus metrics, the access log and the timing header.

The request id is core (every answer carries one); the rest is the built-in plugin
``observer`` (:mod:`aioproxy.observability.observer`). Traces are a plugin of their own
(``plugins/aioproxy-otel``), on the same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy
from aiohttp import web

from ..request_ids import set_header
from .observer import Observer

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["install"]


def install(app: web.Application, pm: pluggy.PluginManager, runtime: Runtime) -> None:
    """Request ids on every answer of ``app``; the observer's middleware, when it is on."""
    app.on_response_prepare.append(set_header)
    observer = pm.get_plugin("aioproxy.observer")
    if isinstance(observer, Observer):
        observer.install(app, runtime)
