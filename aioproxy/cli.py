"""``python run.py``: serve aioproxy from a TOML config, or the embedded default one."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

import msgspec
from aiohttp import web

from ._aiohttp import write_large_bodies_unjoined
from .app import create_app
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, ModelEntry, Secret, load_config
from .control import cli as control_cli
from .keys import workers_key
from .observability.access_log import configure_logging
from .observability.metrics import (
    MULTIPROC_ENV,
    mark_process_dead,
    prepare_multiprocess,
    remove_multiprocess,
)
from .plugins import PluginLoadError
from .server import run
from .state.preflight import per_process_limits as _per_process_limits

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
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or as one JSON object each (default: config, else text)",
    )
    parser.add_argument(
        "--strict-plugins",
        action="store_true",
        default=None,
        help="refuse to start when an installed plugin fails to import",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port through SO_REUSEPORT, each with its own loop",
    )
    parser.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="event loop: uvloop when installed (auto), or the standard asyncio loop",
    )
    return parser.parse_args(argv)


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """uvloop when asked for or (``auto``) installed; else the standard loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    "aioproxy: --loop uvloop needs uvloop: pip install 'aioproxy[uvloop]'"
                )
        else:
            write_large_bodies_unjoined()  # uvloop's writelines copies nothing
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve(
    app: web.Application,
    config: Config,
    host: str,
    port: int,
    loop: str,
    reuse_port: bool,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    # handler_cancellation: a client that goes away cancels its upstream call at once, even while
    # the upstream is still silent (a model thinking before its first token).
    # shutdown_timeout: on SIGTERM/SIGINT stop accepting, give in-flight requests and streams
    # this long to finish, then close.
    run(
        app,
        new_event_loop(loop),
        host,
        port,
        reuse_port=reuse_port,
        on_ready=on_ready,
        access_log=None,
        handler_cancellation=True,
        # aiohttp's keep-alive timer also runs from a connection's start until its first
        # request is complete, so it is the header timeout too.
        keepalive_timeout=config.server.header_timeout,
        # aiohttp takes a timeout <= 0 as none at all: a grace of 0 must still end.
        shutdown_timeout=max(config.server.shutdown_grace, 0.001),
    )


def run_workers(
    count: int, start: Callable[[], None], on_exit: Callable[[int], None] | None = None
) -> int:
    """Fork ``count`` workers running ``start``; pass SIGTERM/SIGINT on and wait for them all."""
    children: list[int] = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                start()
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        if on_exit is not None:
            on_exit(child)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in control_cli.COMMANDS:  # keys, teams, spend: the admin API's client
        return control_cli.main(argv)
    args = parse_args(argv)
    source = args.config or "the default config"
    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        print(f"aioproxy: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format or config.logging.format)
    if config.metrics.enabled and (args.workers > 1 or os.environ.get(MULTIPROC_ENV)):
        # Before the app (and so any metric) exists: every worker's counts go to one folder,
        # emptied of an earlier run's (one process given the folder counts there too).
        metrics_dir, made_dir = prepare_multiprocess()
        if made_dir:
            atexit.register(remove_multiprocess, metrics_dir)
    if args.host:  # the address served is the config's, for the Host check of open mode
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, host=args.host)
        )
    try:
        app = create_app(config, strict_plugins=args.strict_plugins)
    except (ConfigError, PluginLoadError) as exc:
        print(f"aioproxy: {source}: {exc}", file=sys.stderr)
        return 2
    host = config.server.host
    port = config.server.port if args.port is None else args.port
    names = list(dict.fromkeys(entry.name for entry in config.models))

    def announce(bound: int = port) -> None:
        """Printed once serving: the port bound (``--port 0`` binds a free one)."""
        url = f"http://{host}:{bound}"
        print(f"aioproxy serving on {url}  (OpenAI base URL: {url}/v1)")
        print(f"models: {', '.join(names) if names else '(none configured)'}", flush=True)
        if config.ui.enabled:
            print(f"dashboard: {url}/ui", flush=True)

    try:
        limited = _per_process_limits(config) if args.workers > 1 else None
    except ConfigError as exc:  # the database cannot be opened
        print(f"aioproxy: {source}: {exc}", file=sys.stderr)
        return 2
    if limited:
        print(
            f"aioproxy: {source}: --workers {args.workers} with {limited} needs "
            "[state] redis_url: each worker would count on its own, so every limit would "
            f"hold {args.workers} times over",
            file=sys.stderr,
        )
        return 2
    if args.workers > 1:
        app[workers_key] = args.workers  # the admin API refuses limits each would count alone
        announce()
        # Each worker forks before any loop or socket exists, then binds the port itself.
        return run_workers(
            args.workers,
            lambda: serve(app, config, host, port, args.loop, reuse_port=True),
            on_exit=mark_process_dead,
        )
    try:
        serve(app, config, host, port, args.loop, reuse_port=False, on_ready=announce)
    except ConfigError as exc:  # refused by a provider as the app started
        print(f"aioproxy: {source}: {exc}", file=sys.stderr)
        return 2
    return 0
