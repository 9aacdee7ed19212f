"""wrk as the load generator: one thread pinned to its own core, results parsed from post.lua."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec

P = ParamSpec("P")

LUA = Path(__file__).resolve().parent.parent / "wrk" / "post.lua"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    counted: int = -1  # responses from BENCH_COUNT_FROM on; -1 when not asked for

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class LoadError(RuntimeError):
    """wrk failed or saw errors: numbers measured on errors are worthless."""


@dataclass(frozen=True)
class Wrk:
    """A wrk run under way: its process, and the URL and connections its errors name."""

    proc: subprocess.Popen[str]
    url: str
    connections: int


def start_wrk(
    url: str,
    body: bytes,
    auth: str | None,
    connections: int,
    duration: str,
    core: int | None,
    timeout: str = "10s",
    count_from: int | None = None,
    alt_body: bytes | None = None,
) -> Wrk:
    """Start wrk; ``count_from`` (a Unix second) also counts the responses from then on, and
    with ``alt_body`` the requests alternate between ``body`` and it (same URL and headers)."""
    # One thread: wrk is event-driven and cheap, and a second thread would steal the
    # core under test.  The timeout is generous so slowness shows as latency, not errors.
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}",
        "--timeout",
        timeout,
        "-s",
        str(LUA),
        url,
    ]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    env = {
        **os.environ,
        "BENCH_BODY": body.decode(),
        "BENCH_AUTH": f"Bearer {auth}" if auth else "",
    }
    if count_from is not None:
        env["BENCH_COUNT_FROM"] = str(count_from)
    if alt_body is not None:
        env["BENCH_BODY_ALT"] = alt_body.decode()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return Wrk(proc, url, connections)


def finish_wrk(wrk: Wrk) -> WrkResult:
    """Wait for wrk and parse its result; any error raises LoadError."""
    proc, url, connections = wrk.proc, wrk.url, wrk.connections
    stdout, stderr = proc.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({proc.returncode}) on {url}:\n{stdout}\n{stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    lat = data["latency_us"]
    result = WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        p50_us=lat["p50"],
        p90_us=lat["p90"],
        p99_us=lat["p99"],
        max_us=lat["max"],
        counted=data.get("counted", -1),
    )
    if result.error_count or result.requests == 0:
        raise LoadError(
            f"wrk saw errors on {url} with {connections} connections: {result.errors}, "
            f"{result.requests} requests completed\n{stdout}"
        )
    return result


def _to_the_end(start: Callable[P, Wrk]) -> Callable[P, WrkResult]:
    def run(*args: P.args, **kwargs: P.kwargs) -> WrkResult:
        return finish_wrk(start(*args, **kwargs))

    return run


# wrk run to its end: start_wrk's arguments, finish_wrk's result.
run_wrk = _to_the_end(start_wrk)
