"""Metrics and the access log are off unless configured: the default request path pays nothing
for them (no observer hooks, no middleware, no /metrics), while request ids stay on."""

from __future__ import annotations

from typing import Any

import aioproxy_echo
import aioproxy_openai
from aiohttp import web

from aioproxy import create_app
from aioproxy.keys import plugin_manager_key
from aioproxy.observability.observer import Observer
from aioproxy.request_ids import set_header
from tests.support import gateway_config

API_BASE = "http://127.0.0.1:9/v1"  # never called: these tests only build the app


def build(**overrides: Any) -> tuple[web.Application, object]:
    config = gateway_config(API_BASE, **overrides)
    app = create_app(config, plugins=[aioproxy_openai, aioproxy_echo], load_entrypoints=False)
    return app, app[plugin_manager_key].get_plugin("aioproxy.observer")


def middleware_names(app: web.Application) -> list[str]:
    return [getattr(m, "__name__", "") for m in app.middlewares]


def test_off_by_default_no_hooks_no_middleware_no_route() -> None:
    app, observer = build()
    assert not isinstance(observer, Observer)
    assert not app[plugin_manager_key].get_hookcallers(observer)
    assert "observe" not in middleware_names(app)
    assert all(r.resource.canonical != "/metrics" for r in app.router.routes())
    assert set_header in app.on_response_prepare  # request ids stay on


def test_metrics_on_when_configured() -> None:
    app, observer = build(metrics={"enabled": True})
    assert isinstance(observer, Observer)
    assert "observe" in middleware_names(app)
    assert any(r.resource.canonical == "/metrics" for r in app.router.routes())


def test_access_log_on_when_configured() -> None:
    app, observer = build(logging={"access_log": True})
    assert isinstance(observer, Observer) and observer.metrics is None
    assert "observe" in middleware_names(app)
    assert all(r.resource.canonical != "/metrics" for r in app.router.routes())
