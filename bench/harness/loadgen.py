"""wrk as the load generator: one thread pinned to its own core, results parsed from post.lua."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class LoadError(RuntimeError):
    """wrk failed or saw errors: numbers measured on errors are worthless."""


def run_wrk(
    url: str, body: bytes, auth: str | None, connections: int, duration: str, core: int | None
) -> WrkResult:
    # One thread: wrk is event-driven and cheap, and a second thread would steal the
    # core under test.  The timeout is generous so slowness shows as latency, not errors.
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}",
        "--timeout",
        "10s",
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
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({proc.returncode}) on {url}:\n{proc.stdout}\n{proc.stderr}")
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
    )
    if result.error_count or result.requests == 0:
        raise LoadError(
            f"wrk saw errors on {url} with {connections} connections: {result.errors}, "
            f"{result.requests} requests completed\n{proc.stdout}"
        )
    return result
