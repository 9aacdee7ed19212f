"""The instructions part: what a request costs in instructions, counted by callgrind.

CPU time a request on a shared 2-core VM moves by 30% from one run to the next (the same cell
measured 335 and 414 µs minutes apart); the instructions it executes move by a few percent
(595-621 k for the pass-through's chat in five runs: fewer requests spread a run's fixed costs
over fewer), and the ratio of two targets by less (aioproxy's 1.05-1.08). So the
ratios the issues set (aioproxy-keys within 5% of aioproxy, metrics and logs within 5% of them
off) and the CI gate's are read here too, beside the matrix's CPU time.

Each target runs under valgrind's callgrind with counting off. After a warm-up, counting is on
for an idle spell (the background's rate: the database poll, the request log's timer; the
warm-up's rows written before it) and then
for a wrk run of ``CONNECTIONS`` connections (or those asked: ``--instruction-connections``); a request's figure is the run's instructions, net
of the background's rate over it, divided by the requests wrk completed. The run ends
``SETTLE_S`` after wrk, so the request log's writer (once a second) has written its rows: their
cost is part of a request's. Counted in user space only: the kernel's share (system calls) is
the matrix's to show.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import payloads
from .loadgen import run_wrk
from .procs import Cores
from .report import _table
from .servers import Target

__all__ = [
    "CONNECTIONS",
    "ISSUE_CONNECTIONS",
    "READY_TIMEOUT",
    "TOOLS",
    "Count",
    "callgrind",
    "measure",
    "ratio",
    "section",
]

TOOLS = ("valgrind", "callgrind_control")  # Debian's valgrind package brings both
# Under callgrind a target serves ~100 requests/s: a few connections keep it busy. More (the
# issues' 16 and 64) fill the batches a feature amortises its work over (a Redis round trip,
# the metrics' and access log's pass) as they fill at those counts at full speed: the proxy is
# the bottleneck either way.
CONNECTIONS = 4  # the smoke gate's
ISSUE_CONNECTIONS = (16, 64)  # a full run's: the issues' req/s criteria are set there
READY_TIMEOUT = 600.0  # seconds: Python starts ~50x slower under valgrind
WARM_UP = "2s"
IDLE_S = 6.0  # long enough to average the database poll's ticks
SETTLE_S = 2.0
_DUMP_WAIT_S = 120.0
_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)  # at the end: the dump is whole


@dataclass(frozen=True)
class Count:
    target: str
    kind: str
    requests: int
    per_request: float  # instructions, net of the background's
    background: float  # instructions a second while idle
    connections: int = CONNECTIONS


def callgrind(out: Path) -> tuple[str, ...]:
    """The command line to put before a target's: callgrind, counting off until told."""
    return (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
    )


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=False)


def _counted(pid: int, out: Path) -> int:
    """Dump the counts since the last zeroing; the instructions in that dump."""
    before = set(out.parent.glob(f"{out.name}.{pid}.*"))
    _control(pid, "--dump")
    deadline = time.monotonic() + _DUMP_WAIT_S
    while time.monotonic() < deadline:
        new = set(out.parent.glob(f"{out.name}.{pid}.*")) - before
        for dump in new:
            match = _TOTALS.search(dump.read_bytes())
            if match is not None:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump for {pid} in {_DUMP_WAIT_S:.0f} s")


def _counting(pid: int, out: Path, work: Callable[[], int]) -> tuple[int, float, int]:
    """Instructions executed while ``work`` runs, its seconds, and what it returned."""
    _control(pid, "--zero")
    _control(pid, "--instr=on")
    started = time.monotonic()
    result = work()
    _control(pid, "--instr=off")
    return _counted(pid, out), time.monotonic() - started, result


def _idle() -> int:
    time.sleep(IDLE_S)
    return 0


def _load(target: Target, kind: str, duration: str, cores: Cores, connections: int) -> int:
    """A wrk run of ``duration`` on ``kind``: the requests it completed."""
    spec = payloads.KINDS[kind]
    return run_wrk(
        target.url(spec), spec.body, target.auth, connections, duration, cores.load, timeout="60s"
    ).requests


def _busy(target: Target, kind: str, seconds: str, cores: Cores, connections: int) -> int:
    requests = _load(target, kind, seconds, cores, connections)
    time.sleep(SETTLE_S)  # the request log's writer writes the run's rows
    return requests


def measure(
    target: Target,
    kinds: Iterable[str],
    out: Path,
    seconds: str,
    cores: Cores,
    connections: Iterable[int] = (CONNECTIONS,),
) -> list[Count]:
    """``target`` (started under :func:`callgrind` ``(out)``) on each kind, at each count of
    connections."""
    counts = []
    for kind in kinds:
        for conns in connections:
            _load(target, kind, WARM_UP, cores, conns)
            time.sleep(SETTLE_S)  # the warm-up's rows written: not the background's
            idle, idle_s, _ = _counting(target.pid, out, _idle)
            total, busy_s, requests = _counting(
                target.pid, out, functools.partial(_busy, target, kind, seconds, cores, conns)
            )
            if requests <= 0:
                raise RuntimeError(f"{target.name}: no request completed under callgrind")
            rate = idle / idle_s
            per_request = (total - rate * busy_s) / requests
            counts.append(Count(target.name, kind, requests, per_request, rate, conns))
    return counts


def ratio(
    counts: Iterable[Count], kind: str, a: str, b: str, connections: int = CONNECTIONS
) -> float | None:
    by = {(c.kind, c.target): c.per_request for c in counts if c.connections == connections}
    if (kind, a) not in by or (kind, b) not in by:
        return None
    return by[kind, a] / by[kind, b]


def section(
    counts: list[Count], baselines: tuple[str, ...] = ("reference", "aioproxy")
) -> list[str]:
    """The report's tables, one per count of connections: each target's thousands of
    instructions a request, and its ratio to each baseline measured."""
    lines = []
    for connections in sorted({c.connections for c in counts}):
        lines += _section([c for c in counts if c.connections == connections], baselines)
    return lines


def _section(counts: list[Count], baselines: tuple[str, ...]) -> list[str]:
    if not counts:
        return []
    connections = counts[0].connections
    present = [b for b in baselines if any(c.target == b for c in counts)]
    rows = []
    for c in counts:
        cells = []
        for base in present:
            value = ratio(counts, c.kind, c.target, base, connections)
            cells.append("–" if value is None else f"{value:.2f}")
        rows.append(
            [
                c.kind,
                c.target,
                f"{c.per_request / 1000:,.1f}",
                *cells,
                f"{c.requests:,}",
                f"{c.background / 1e6:.1f}",
            ]
        )
    header = [
        "kind",
        "target",
        "k instr/req",
        *(f"÷ {b}" for b in present),
        "requests",
        "background M instr/s",
    ]
    return [
        "",
        f"### Instructions per request (callgrind, {connections} connections)",
        "",
        (
            "User-space instructions a request costs, net of the idle background's rate "
            "(callgrind; counts move by a few percent between runs and ratios by less, where CPU "
            "time on this machine moves by 30%). "
            "Below 1 is cheaper than the baseline."
        ),
        "",
        *_table(header, rows, text_columns=2),
    ]
