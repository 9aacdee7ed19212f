"""The RSS soak: a fresh proxy's idle RSS, then N requests (chat and streaming chat
alternating), then its RSS right after and once settled.  Issue #5 wants aioproxy at most 45 MiB
idle and flat within ±5 MiB after 200,000 requests."""

from __future__ import annotations

import math
import time

from . import payloads, procs
from .loadgen import run_wrk
from .report import SoakRow
from .servers import Target, check_response

CONNECTIONS = 64
FIRST_RUN_S = 2  # measures the rate; the later runs are sized from it
CHECKPOINTS = 10  # about this many wrk runs, each followed by an RSS reading
MAX_RUN_S = 30
SETTLE_S = 2.0


def _run_seconds(remaining: int, total: int, rate: float) -> int:
    """Whole seconds (wrk's unit) for the next run: about a tenth of the total, not beyond it."""
    step = min(remaining, max(total / CHECKPOINTS, 1))
    return max(1, min(MAX_RUN_S, math.ceil(step / rate)))


def soak(target: Target, requests: int, core: int | None) -> SoakRow:
    chat, stream = payloads.KINDS["chat"], payloads.KINDS["stream"]
    for spec in (chat, stream):  # the first request of each kind imports and caches things
        check_response(target, spec)
    idle = procs.memory_kib(target.pid)
    done, seconds, trace = 0, 0.0, []
    while done < requests:
        length = (
            FIRST_RUN_S if not done else _run_seconds(requests - done, requests, done / seconds)
        )
        # Both kinds go to the same path: the body's model picks the upstream route.
        result = run_wrk(
            target.url(chat),
            chat.body,
            target.auth,
            CONNECTIONS,
            f"{length}s",
            core,
            alt_body=stream.body,
        )
        target.proc.check_alive()
        done, seconds = done + result.requests, seconds + result.seconds
        trace.append((done, procs.memory_kib(target.pid)))
        print(
            f"  soak {target.name:<16} {done:>9,} requests  {result.rps:>7,.0f} req/s  "
            f"RSS {trace[-1][1] / 1024:6.1f} MiB",
            flush=True,
        )
    time.sleep(SETTLE_S)  # let closed connections and their buffers go
    return SoakRow(
        target=target.name,
        requests=done,
        seconds=seconds,
        rss_idle_kib=idle,
        rss_after_kib=trace[-1][1],
        rss_settled_kib=procs.memory_kib(target.pid),
        rss_peak_kib=procs.memory_kib(target.pid, "VmHWM"),
        trace=tuple(trace),
    )
