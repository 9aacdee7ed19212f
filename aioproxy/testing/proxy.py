"""The proxy under test: ``start_proxy`` serves an aioproxy app on 127.0.0.1 with the kit's
defaults, and ``ProxyUnderTest`` gives its URLs, clients and what it holds in flight."""

from __future__ import annotations

import functools
import importlib
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from ..app import create_app
from ..config import Config, parse_config
from ..keys import runtime_key

if TYPE_CHECKING:
    import openai


KIT_KEY = "sk-aioproxy-testing"

# What start_proxy adds under a config mapping's own values: a key to present, and no retries or
# cooldown, so that each client request makes exactly one upstream call and sees its error.
_KIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "auth": {"master_key": KIT_KEY},
    "router": {"num_retries": 0, "cooldown_seconds": 0},
}
_TIMEOUT = aiohttp.ClientTimeout(total=10)  # a hung provider fails its test instead of hanging it
INSTALL = "pip install 'aioproxy[testing]'"  # what the kit needs, beyond aioproxy


def needs(module: str) -> Any:
    """Import a test-time dependency, saying how to install it when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"aioproxy.testing needs {module}: {INSTALL}") from exc


class ProxyUnderTest:
    """A running proxy: its URLs, clients for it, and what it holds in flight."""

    def __init__(self, server: TestServer, api_key: str | None) -> None:
        self.server = server
        self.api_key = api_key

    @property
    def app(self) -> web.Application:
        """The aioproxy app being served."""
        return self.server.app

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header the proxy accepts (none when it is open)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str = "/v1") -> str:
        """The absolute URL of ``path`` on the proxy."""
        return str(self.server.make_url(path))

    def answer_models(self, model: str) -> frozenset[str]:
        """What an answer to ``model`` may name as its ``model``: that name, or the upstream id
        of one of its configured deployments."""
        deployments = self.app[runtime_key].deployments
        return frozenset({model, *(d.model for d in deployments.get(model, ()))})

    def openai(self, **options: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` on ``/v1`` that never retries; use it with ``async with``."""
        sdk = needs("openai")

        options = {"max_retries": 0, "timeout": 10.0, **options}
        key = self.api_key or "unused"
        client: openai.AsyncOpenAI = sdk.AsyncOpenAI(base_url=self.url(), api_key=key, **options)
        return client

    def http(self) -> aiohttp.ClientSession:
        """A raw aiohttp session on the proxy's origin that sends the key; use ``async with``."""
        return aiohttp.ClientSession(base_url=self.url("/"), headers=self.headers, timeout=_TIMEOUT)

    def in_flight(self, model: str) -> int:
        """How many requests the proxy counts in flight on ``model``'s configured deployments."""
        return self.app[runtime_key].in_flight(model)


async def start_proxy(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    config: Mapping[str, Any] | Config,
    plugins: Iterable[object] = (),
) -> ProxyUnderTest:
    """Serve ``config`` with ``plugins`` on 127.0.0.1 (installed plugins are not loaded).

    A mapping (the TOML's shape) gets the kit's defaults under its own values: master key
    ``KIT_KEY``, no retries, no cooldown, and the Responses store and the control plane's
    database in a temporary folder of its own, removed when the server closes. A :class:`~aioproxy.config.Config` is used as it is.
    """
    scratch: Path | None = None
    if not isinstance(config, Config):
        scratch = Path(tempfile.gettempdir(), f"aioproxy-testing-{uuid.uuid4().hex}")
        scratch.mkdir()  # the control plane's database is opened at start-up
        own = {
            "database": {"url": f"sqlite:///{scratch / 'control.sqlite3'}"},
        }
        merged = dict(config)
        for table, defaults in {**_KIT_DEFAULTS, **own}.items():
            merged[table] = {**defaults, **config.get(table, {})}
        config = parse_config(merged, "<aioproxy.testing>")
    app = create_app(config, plugins=plugins, load_entrypoints=False)
    if scratch is not None:  # on_cleanup runs after cleanup_ctx, so after the store has closed
        app.on_cleanup.append(functools.partial(_remove_folder, scratch))
    return ProxyUnderTest(await aiohttp_server(app), config.auth.master_key)


async def _remove_folder(folder: Path, _app: web.Application) -> None:
    shutil.rmtree(folder, ignore_errors=True)


StartProxy = Callable[..., Awaitable[ProxyUnderTest]]
