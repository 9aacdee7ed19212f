"""`run.py --workers 1` against `--workers 2`: CPU per request of the whole process tree, and
the 2-core throughput it projects.

On a 2-core machine wrk and nginx share the cores with the workers, so raw req/s cannot show
how the workers scale; CPU per request can, and the projection divides the cores by it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

from . import payloads, procs
from .loadgen import run_wrk
from .report import WorkersRow, cleanest, has_clean_run
from .servers import Starter, Target, start_aioproxy, start_aioproxy_redis

COUNTS = (1, 2)
CONNECTIONS = 64
KIND = "chat"


class Snapshot(NamedTuple):
    wall: float
    busy: float  # the whole machine
    each: dict[int, float]  # CPU seconds of each process of the proxy's tree
    nginx: float
    wrk: float  # our reaped children: wrk


def _snapshot(target: Target, upstream: Target) -> Snapshot:
    return Snapshot(
        wall=time.perf_counter(),
        busy=procs.system_busy_seconds(),
        each=procs.cpu_seconds_each(target.pid),
        nginx=procs.cpu_seconds(upstream.pid),
        wrk=procs.children_cpu_seconds(),
    )


def _wait_listening(target: Target, workers: int, timeout: float = 10.0) -> None:
    """/health answers once one worker listens; wait for all, or wrk's connections (spread
    when they connect) would all go to the first."""
    deadline = time.perf_counter() + timeout
    while procs.listeners(target.port) < workers:
        target.proc.check_alive()
        if time.perf_counter() > deadline:
            found = procs.listeners(target.port)
            raise RuntimeError(f"{target.name}: {found} of {workers} workers listening")
        time.sleep(0.05)


STARTERS: dict[str, Starter] = {"aioproxy": start_aioproxy, "aioproxy-redis": start_aioproxy_redis}


@contextmanager
def started(
    workdir: Path, upstream: Target, loop: str, names: tuple[str, ...]
) -> Iterator[dict[tuple[str, int], Target]]:
    """One proxy per (target, worker count), unpinned: the kernel places the workers."""
    with ExitStack() as stack:
        targets = {}
        for name in names:
            for n in COUNTS:
                print(f"bench: starting {name} --workers {n}", flush=True)
                target = STARTERS[name](
                    workdir,
                    procs.free_port(),
                    upstream.port,
                    None,
                    loop,
                    label=f"{name}-workers{n}",
                    workers=n,
                )
                stack.callback(target.proc.stop)
                _wait_listening(target, n)
                targets[name, n] = target
        yield targets


def measure(
    target: Target,
    upstream: Target,
    workers: int,
    duration: str,
    warmup: str | None,
    name: str = "aioproxy",
) -> WorkersRow:
    spec = payloads.KINDS[KIND]
    url = target.url(spec)
    if warmup:
        run_wrk(url, spec.body, target.auth, CONNECTIONS, warmup, None)
    before = _snapshot(target, upstream)
    result = run_wrk(url, spec.body, target.auth, CONNECTIONS, duration, None)
    after = _snapshot(target, upstream)
    target.proc.check_alive()
    grew = {pid: cpu - before.each.get(pid, 0.0) for pid, cpu in after.each.items()}
    proxy = sum(grew.values())
    children = [cpu for pid, cpu in grew.items() if pid != target.pid]  # the forked workers
    nginx, wrk = after.nginx - before.nginx, after.wrk - before.wrk
    wall = after.wall - before.wall
    row = WorkersRow(
        workers=workers,
        rps=result.rps,
        p99_us=result.p99_us,
        requests=result.requests,
        cpu_us_per_req=proxy / result.requests * 1e6,
        proxy_cpu_pct=proxy / wall * 100,
        wrk_cpu_pct=wrk / wall * 100,
        nginx_cpu_pct=nginx / wall * 100,
        other_cpu_pct=max(0.0, (after.busy - before.busy - proxy - nginx - wrk) / wall * 100),
        shares=tuple(c / sum(children) for c in children) if sum(children) > 0 else (),
        target=name,
    )
    shares = " / ".join(f"{s * 100:.0f}%" for s in row.shares) or "–"
    print(
        f"  {name} workers={workers}  {row.rps:>9,.0f} req/s  CPU {row.cpu_us_per_req:6,.0f} µs/req  "
        f"proxy {row.proxy_cpu_pct:3.0f}%  wrk {row.wrk_cpu_pct:3.0f}%  "
        f"nginx {row.nginx_cpu_pct:3.0f}%  other {row.other_cpu_pct:3.0f}%  shares {shares}",
        flush=True,
    )
    return row


def compare(
    workdir: Path,
    upstream: Target,
    loop: str,
    duration: str,
    warmup: str,
    repeat: int,
    max_repeat: int,
    names: tuple[str, ...] = ("aioproxy",),
) -> list[WorkersRow]:
    """Interleaved rounds over the targets and worker counts, like the matrix's cells; the
    cleanest each."""
    procs.unpin(upstream.pid)  # nginx too may use either core; the matrix re-pins it per run
    cells = [(name, n) for name in names for n in COUNTS]
    runs: dict[tuple[str, int], list[WorkersRow]] = {cell: [] for cell in cells}
    with started(workdir, upstream, loop, names) as targets:
        for round_ in range(max_repeat):
            clean = all(has_clean_run(runs[cell]) for cell in cells)
            if round_ >= repeat and clean:
                break
            for name, n in cells:
                warm = warmup if round_ == 0 else None
                row = measure(targets[name, n], upstream, n, duration, warm, name)
                runs[name, n].append(row)
    return [min(runs[cell], key=cleanest) for cell in cells]
