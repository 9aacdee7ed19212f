"""``python run.py``: serve aioproxy from a TOML config, or the embedded default one."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import msgspec
from aiohttp import web

from .app import create_app
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, ModelEntry, Secret, load_config
from .plugins import PluginLoadError

__all__ = ["default_config", "main"]

log = logging.getLogger("aioproxy")

# Served next to the echo models when OPENAI_API_KEY is set and no --config is given.
OPENAI_DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small")


def default_config(env: Mapping[str, str] = os.environ) -> Config:
    """The embedded config: echo models always, OpenAI models too when OPENAI_API_KEY is set."""
    config = load_config(DEFAULT_CONFIG_PATH)
    api_key = env.get("OPENAI_API_KEY")
    if not api_key:
        return config
    api_base = env.get("OPENAI_BASE_URL") or None
    openai_models = [
        ModelEntry(name=name, provider="openai", api_key=Secret(api_key), api_base=api_base)
        for name in OPENAI_DEFAULT_MODELS
    ]
    return msgspec.structs.replace(config, models=[*config.models, *openai_models])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aioproxy", description=__doc__)
    parser.add_argument("--config", help="TOML config file (default: the embedded echo config)")
    parser.add_argument("--host", help="address to listen on (default: config, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: config, else 4000)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        help="logging level (default: info)",
    )
    parser.add_argument(
        "--strict-plugins",
        action="store_true",
        default=None,
        help="refuse to start when an installed plugin fails to import",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    source = args.config or "the default config"
    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        print(f"aioproxy: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(config, strict_plugins=args.strict_plugins)
    except (ConfigError, PluginLoadError) as exc:
        print(f"aioproxy: {source}: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    names = list(dict.fromkeys(entry.name for entry in config.models))
    print(f"aioproxy serving on http://{host}:{port}  (OpenAI base URL: http://{host}:{port}/v1)")
    print(f"models: {', '.join(names) if names else '(none configured)'}", flush=True)
    # handler_cancellation: a client that goes away cancels its upstream call at once, even while
    # the upstream is still silent (a model thinking before its first token).
    # shutdown_timeout: on SIGTERM/SIGINT stop accepting, give in-flight requests and streams
    # this long to finish, then close.
    web.run_app(
        app,
        host=host,
        port=port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=config.server.shutdown_grace,
    )
    return 0
