"""Every AppKey of an aioproxy app, in one place: state lives here, never in module globals."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import aiohttp
import pluggy
from aiohttp import web

from .config import Config
from .h1client import H1Pool

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .runtime import Runtime

__all__ = [
    "config_key",
    "database_key",
    "plugin_manager_key",
    "pool_key",
    "runtime_key",
    "secrets_key",
    "session_key",
    "workers_key",
]

config_key = web.AppKey("aioproxy.config", Config)
plugin_manager_key = web.AppKey("aioproxy.plugin_manager", pluggy.PluginManager)
runtime_key: web.AppKey[Runtime] = web.AppKey("aioproxy.runtime")
# The control plane's database, once opened (the Responses store shares it).
database_key: web.AppKey[AsyncEngine] = web.AppKey("aioproxy.database")
session_key = web.AppKey("aioproxy.session", aiohttp.ClientSession)
pool_key = web.AppKey("aioproxy.pool", H1Pool)
# run.py --workers N (N > 1): how many processes serve the app, each counting on its own unless
# [state] redis_url is set (the admin API then refuses a limit that would hold N times over).
workers_key = web.AppKey("aioproxy.workers", int)
# The config's keys as one pattern (request_ids.secrets_pattern; None: none to look for): a
# client's x-request-id holding one, key-shaped or not, is replaced, never logged nor sent on.
secrets_key: web.AppKey[re.Pattern[str] | None] = web.AppKey("aioproxy.secrets")
