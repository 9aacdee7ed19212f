"""The things measured: the fake upstream (also the "direct" target) and the two proxies.
Peers (other gateways) live in bench/peers/."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import keys, payloads
from .payloads import Kind
from .procs import Proc, request, spawn, wait_until
from .redis_server import RedisProcess

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
# Debian's libnginx-mod-http-echo (a dependency of nginx-light on bookworm).
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


@dataclass
class Target:
    """Something wrk can hit: its process (for CPU/RSS), port, and how clients call it."""

    name: str
    proc: Proc
    port: int
    auth: str | None
    direct: bool = False
    # A peer (another gateway, e.g. LiteLLM) is measured in a steady-state window: see run.py.
    peer: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def path(self, kind: Kind) -> str:
        return kind.upstream_path if self.direct else kind.proxy_path

    def url(self, kind: Kind) -> str:
        return f"http://127.0.0.1:{self.port}{self.path(kind)}"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = f"Bearer {self.auth}"
        return headers

    def call(self, kind: Kind) -> tuple[int, str, bytes]:
        return request(self.port, "POST", self.path(kind), kind.body, self.headers())


def probe_chat(target: Target) -> tuple[int, bytes]:
    """One chat request: the readiness probe of a started proxy, for ``wait_until``."""
    status, _, body = target.call(payloads.KINDS["chat"])
    return status, body


def probe_get(port: int, path: str) -> tuple[int, bytes]:
    """A GET of a health path, for ``wait_until``."""
    status, _, body = request(port, "GET", path)
    return status, body


@contextmanager
def stopped_on_error(proc: Proc) -> Iterator[None]:
    """A server that fails to come up is stopped before the error propagates."""
    try:
        yield
    except BaseException:
        proc.stop()
        raise


# --- the fake upstream ---


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    return out.strip().removeprefix("nginx version: ")


def start_upstream(kind: str, workdir: Path, port: int, core: int | None) -> Target:
    """nginx (``kind="nginx"``) or the asyncio fallback, serving the canned responses."""
    root = workdir / "www"
    workdir.chmod(0o755)  # nginx workers run unprivileged (as nobody when started by root)
    payloads.write_docroot(root)
    if kind == "nginx":
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        echo = ECHO_MODULE.exists()
        values = {
            "@DIR@": str(workdir),
            "@PORT@": str(port),
            "@LOAD_ECHO@": f"load_module {ECHO_MODULE};" if echo else "",
            "@PACED@": payloads.nginx_paced_location() if echo else "",
            "@GAPPED@": payloads.nginx_gapped_location() if echo else "",
        }
        conf_text = (BENCH / "upstream" / "nginx.conf.in").read_text()
        for key, value in values.items():
            conf_text = conf_text.replace(key, value)
        conf = workdir / "nginx.conf"
        conf.write_text(conf_text)
        argv = [
            shutil.which("nginx") or "nginx",
            "-p",
            str(workdir),
            "-c",
            str(conf),
            "-e",
            str(workdir / "error.log"),
        ]
        name = f"nginx {nginx_version()}"
    else:
        argv = [
            sys.executable,
            str(BENCH / "upstream" / "fallback.py"),
            "--port",
            str(port),
            "--root",
            str(root),
        ]
        name = "asyncio fallback upstream"
    proc = spawn(name, argv, workdir / "upstream.log", core, workdir)
    target = Target("direct", proc, port, auth=None, direct=True)
    with stopped_on_error(proc):
        proc.first_ok_ms = wait_until(proc, lambda: probe_chat(target))
    return target


# --- the proxies ---


def _loop_flag(loop: str) -> list[str]:
    # Passed only when asked for, so a default run needs nothing of aioproxy's CLI but the basics.
    return [] if loop == "auto" else ["--loop", loop]


def start_reference(
    workdir: Path,
    port: int,
    upstream_port: int,
    core: int | None,
    loop: str = "auto",
    *,
    label: str = "reference",
    wrap: tuple[str, ...] = (),
    ready_timeout: float = 30.0,
) -> Target:
    """``label`` names the target and its log, so a second instance (the soak) has its own;
    ``wrap`` goes before its command line (valgrind's, say: then it needs a longer
    ``ready_timeout``)."""
    base = f"http://127.0.0.1:{upstream_port}"
    routes = [f"--route={name}={base}{path}" for name, path in payloads.API_BASES.items()]
    routes += [f"--route={name}={base}{path}/v1" for name, path in payloads.ANTHROPIC_BASES.items()]
    argv = [
        *wrap,
        sys.executable,
        str(BENCH / "passthrough.py"),
        "--port",
        str(port),
        "--upstream",
        f"{base}/v1",
        *routes,
        "--api-key",
        payloads.UPSTREAM_KEY,
        *_loop_flag(loop),
    ]
    proc = spawn(label, argv, workdir / f"{label}.log", core, REPO)
    target = Target(label, proc, port, auth=payloads.MASTER_KEY)
    # The reference has no /health: it is ready when it first proxies a request.
    with stopped_on_error(proc):
        proc.first_ok_ms = wait_until(proc, lambda: probe_chat(target), ready_timeout)
    return target


def aioproxy_config(upstream_port: int, database: Path) -> str:
    base = f"http://127.0.0.1:{upstream_port}"

    def model(name: str, api_base: str) -> str:
        return (
            f'[[models]]\nname = {json.dumps(name)}\nprovider = "openai"\n'
            f"model = {json.dumps(payloads.UPSTREAM_MODEL)}\napi_base = {json.dumps(api_base)}\n"
            f"api_key = {json.dumps(payloads.UPSTREAM_KEY)}\n"
        )

    models = [model(name, base + path) for name, path in payloads.API_BASES.items()]
    models += [
        model(name, base + path).replace('"openai"', '"anthropic"')
        for name, path in payloads.ANTHROPIC_BASES.items()
    ]
    return (
        f"[auth]\nmaster_key = {json.dumps(payloads.MASTER_KEY)}\n\n"
        # the control plane's database (spend logging on, as by default), in the run's temp dir
        f"[database]\nurl = {json.dumps(keys.database_url(database))}\n\n" + "\n".join(models)
    )


_REDIS: dict[Path, RedisProcess] = {}
Redis = Literal["limits", "cache"]
# What each use of Redis adds to the [state] table's redis_url: "limits", rate limits and
# budgets counted there (all [state] does); "cache", the response cache there, every request
# after the first a hit.
_REDIS_CONFIG: dict[Redis, str] = {
    "limits": "",
    "cache": '\n[cache]\nenabled = true\nscope = "global"\ncache_sampled = true\n',
}


def _redis_url(workdir: Path) -> str:
    """The run's redis-server, started at the first target that needs it."""
    if workdir not in _REDIS:
        _REDIS[workdir] = RedisProcess(workdir)
        atexit.register(_REDIS[workdir].stop)
    return _REDIS[workdir].url


def start_aioproxy(
    workdir: Path,
    port: int,
    upstream_port: int,
    core: int | None,
    loop: str = "auto",
    *,
    label: str = "aioproxy",
    workers: int | None = None,
    extra_config: str = "",
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    virtual_keys: bool = False,
    redis: Redis | None = None,
    wrap: tuple[str, ...] = (),
    ready_timeout: float = 30.0,
) -> Target:
    """``label`` names the target, its config, database and log; ``workers`` passes
    `--workers N`; ``extra_config`` is appended to the TOML, ``extra_args`` to the command line,
    and ``env`` is added to the environment; ``virtual_keys``: the caller uses one of 1,000
    database keys (rpm, tpm and a budget enforced) instead of the config's master key;
    ``redis``: what the run's redis-server holds (see _REDIS_CONFIG); ``wrap`` and
    ``ready_timeout``: as for the reference."""
    config = workdir / f"{label}.toml"
    database = workdir / f"{label}.sqlite3"
    database.unlink(missing_ok=True)
    auth = keys.seed(database) if virtual_keys else payloads.MASTER_KEY
    if redis is not None:
        state = f'\n[state]\nredis_url = "{_redis_url(workdir)}"\n'
        extra_config = state + _REDIS_CONFIG[redis] + extra_config
    config.write_text(aioproxy_config(upstream_port, database) + extra_config)
    argv = [
        *wrap,
        sys.executable,
        str(REPO / "run.py"),
        *serving(config, port),
        *_loop_flag(loop),
        *([] if workers is None else ["--workers", str(workers)]),
        *extra_args,
    ]
    environ = None if env is None else {**os.environ, **env}
    proc = spawn(label, argv, workdir / f"{label}.log", core, REPO, environ)
    target = Target(label, proc, port, auth=auth)
    wait_ready(target, "/health", ready_timeout)
    return target


def serving(config: Path, port: int) -> list[str]:
    """The arguments that give a proxy (aioproxy's CLI, LiteLLM's) its config and address."""
    return ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


def wait_ready(target: Target, health: str, timeout: float = 30.0) -> None:
    """Wait for ``target``'s ``health`` path to answer 200, then for it to proxy a chat
    completion; the two times are kept on its process (stopped if either never comes)."""
    proc = target.proc
    with stopped_on_error(proc):
        proc.ready_ms = wait_until(proc, lambda: probe_get(target.port, health), timeout)
        proc.first_ok_ms = wait_until(proc, lambda: probe_chat(target), timeout)


# What starts a proxy: (workdir, port, upstream_port, core, loop, *, label, ...) -> its Target.
Starter = Callable[..., Target]
# The variants of aioproxy the matrix runs beside it.
start_aioproxy_keys = functools.partial(start_aioproxy, label="aioproxy-keys", virtual_keys=True)
start_aioproxy_redis = functools.partial(  # aioproxy-keys, its limits counted in Redis (issue 13)
    start_aioproxy, label="aioproxy-redis", virtual_keys=True, redis="limits"
)
start_aioproxy_cache = functools.partial(start_aioproxy, label="aioproxy-cache", redis="cache")


# --- one checked call per kind before any load: a benchmark of wrong answers is worthless ---


def check_response(target: Target, kind: Kind) -> None:
    status, ctype, body = target.call(kind)
    problem = None
    if status != 200:
        problem = f"status {status}"
    elif kind.name.startswith("messages"):
        problem = _messages_problem(target, kind, ctype, body)
    elif kind.name.startswith("stream"):
        events = [ln for ln in body.split(b"\n") if ln.startswith(b"data:")]
        if not ctype.startswith("text/event-stream"):
            problem = f"content-type {ctype!r}"
        elif not events or events[-1].strip() != b"data: [DONE]":
            problem = "no closing `data: [DONE]`"
        elif len(events) < payloads.STREAM_EVENTS + 1:  # a gateway may add events, not drop them
            problem = f"{len(events)} events, expected {payloads.STREAM_EVENTS + 1}"
    else:
        try:
            data = json.loads(body)
            if kind.name == "chat":
                ok = bool(data["choices"][0]["message"]["content"])
            else:
                ok = len(data["data"][0]["embedding"]) == payloads.EMBED_DIM
        except (ValueError, KeyError, IndexError, TypeError):
            ok = False
        if not ok:
            problem = "unexpected JSON"
    if problem:
        raise RuntimeError(
            f"{target.name} answered {kind.name} wrongly ({problem}): {body[:500]!r}\n"
            f"log {target.proc.log}"
        )


def _messages_problem(target: Target, kind: Kind, ctype: str, body: bytes) -> str | None:
    """What is wrong with a Messages answer: Anthropic's event sequence or a Message (from
    a bare hop on the translated kinds, the chat bytes it relays)."""
    if kind.name.endswith("stream"):
        if not ctype.startswith("text/event-stream"):
            return f"content-type {ctype!r}"
        if target.name == "aioproxy" and not body.rstrip().endswith(b'{"type":"message_stop"}'):
            return "no closing message_stop"
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return "not JSON"
    if target.name == "aioproxy" and data.get("type") != "message":
        return "not a Message"
    return None
