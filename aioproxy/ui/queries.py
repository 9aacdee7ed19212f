"""The dashboard's own reads of the request log: the overview's series and one request's row.

The overview is a chart of points (5 minutes, an hour or a day each). Each point is read with a
handful of GROUP BY queries over its time range, from one covering index (migration 0002), and
a point that ended more than ``SETTLE`` seconds (an hour) ago is kept in memory: it no longer changes, so
the 30-day page reads only its newest point once it has been shown. Latency percentiles come
from a histogram counted in SQL (fixed bins, interpolated within one): exact percentiles need a
sort SQLite cannot do in SQL, and a few hundred grouped rows travel instead of every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..control import schema
from ..control.cache import as_dict
from ..control.plane import ControlPlane

__all__ = ["RANGES", "Overview", "PointCache", "overview", "request_row"]

# Range name -> (seconds covered, seconds per chart point).
RANGES: dict[str, tuple[int, int]] = {
    "1h": (3600, 300),
    "24h": (86400, 3600),
    "30d": (30 * 86400, 86400),
}
# Upper edges (seconds) of the latency histogram's bins; the last bin is open.
_EDGES = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
)  # fmt: skip
_TOP = 5
# Seconds after a point ends before it is kept: every instance's request log batches (flushed
# each second, held while the database is unreachable) have landed by then. A row written later
# still (after an outage over an hour) shows in the overview after a restart; the Spend and
# Requests pages always read the database.
SETTLE = 3600.0
_log = schema.requests.c


def _histogram() -> list[int]:
    return [0] * (len(_EDGES) + 1)


@dataclass(slots=True)
class Point:
    """One chart point's figures, and its spend by model and by key: ``[requests, cost]``."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    durations: list[int] = field(default_factory=_histogram)
    ttfts: list[int] = field(default_factory=_histogram)
    models: dict[str, list[float]] = field(default_factory=dict)
    keys: dict[str, list[float]] = field(default_factory=dict)


class PointCache:
    """Settled points by (step, start): one app's, so every page view after the first reads
    only the newest points."""

    def __init__(self) -> None:
        self.points: dict[tuple[int, float], Point] = {}

    def keep(self, step: int, start: float, point: Point) -> None:
        self.points[(step, start)] = point

    def prune(self, step: int, oldest: float) -> None:
        for key in [key for key in self.points if key[0] == step and key[1] < oldest]:
            del self.points[key]


@dataclass(slots=True)
class Overview:
    """The range's series (one value per point, oldest first), totals and top spenders."""

    times: list[float]
    requests: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    input_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    latency_p50: list[float | None] = field(default_factory=list)
    latency_p95: list[float | None] = field(default_factory=list)
    ttft_p50: list[float | None] = field(default_factory=list)
    ttft_p95: list[float | None] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    top_models: list[dict[str, Any]] = field(default_factory=list)
    top_keys: list[dict[str, Any]] = field(default_factory=list)


def _bin(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    whens = [(column < edge, i) for i, edge in enumerate(_EDGES)]
    return sa.case(*whens, else_=len(_EDGES))


def _point(plane: ControlPlane, start: float, step: int) -> sa.ColumnElement[Any]:
    """The chart point a row falls in: whole steps since ``start`` (rows are never before it)."""
    offset = (_log.time - start) / step
    if plane.engine.dialect.name == "sqlite":
        return sa.cast(offset, sa.Integer)  # truncates, and offset >= 0
    return sa.cast(sa.func.floor(offset), sa.Integer)  # PostgreSQL's cast rounds


def _quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram over ``_EDGES``, linear within its bin."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = _EDGES[i - 1] if i > 0 else 0.0
            high = _EDGES[i] if i < len(_EDGES) else _EDGES[-1] * 2
            return low + (high - low) * (rank - seen) / count
        seen += count
    return None


async def _read_points(
    connection: AsyncConnection, plane: ControlPlane, start: float, step: int, n: int
) -> list[Point]:
    """Points ``start``, ``start + step``, ... (``n`` of them), read from the request log."""
    points = [Point() for _ in range(n)]
    point = _point(plane, start, step).label("p")
    where = _log.time >= start
    # An error: refused or failed (4xx, 5xx), or a stream cut short after its 200 went out.
    failed = sa.or_(_log.status >= 400, _log.error_code.is_not(None))
    totals = (
        sa.select(
            point,
            sa.func.count(),
            sa.func.sum(sa.case((failed, 1), else_=0)),
            sa.func.coalesce(sa.func.sum(_log.input_tokens), 0),
            sa.func.coalesce(sa.func.sum(_log.output_tokens), 0),
            sa.func.coalesce(sa.func.sum(_log.cost), 0.0),
        )
        .where(where)
        .group_by("p")
    )
    for p, requests, errors, tokens_in, tokens_out, cost in await _rows(connection, totals, n):
        points[p].requests, points[p].errors = int(requests), int(errors or 0)
        points[p].input_tokens, points[p].output_tokens = int(tokens_in), int(tokens_out)
        points[p].cost = float(cost)
    for column, name in ((_log.duration, "durations"), (_log.ttft, "ttfts")):
        query = (
            sa.select(point, _bin(column).label("b"), sa.func.count())
            .where(where, column.is_not(None))
            .group_by("p", "b")
        )
        for p, b, count in await _rows(connection, query, n):
            getattr(points[p], name)[b] += count
    for column, name in ((_log.model, "models"), (_log.key_id, "keys")):
        # Grouped by an expression, not the column: SQLite would otherwise walk the column's
        # own index to skip a sort, reading every row instead of the range's.
        group = sa.func.coalesce(column, "")
        query = (
            sa.select(point, group, sa.func.count(), sa.func.coalesce(sa.func.sum(_log.cost), 0.0))
            .where(where)
            .group_by("p", group)
        )
        for p, value, requests, cost in await _rows(connection, query, n):
            getattr(points[p], name)[value] = [int(requests), float(cost)]
    return points


async def _rows(connection: AsyncConnection, query: sa.Select[Any], n: int) -> list[Any]:
    """The query's rows whose point (first column) is in the range."""
    return [row for row in (await connection.execute(query)).all() if 0 <= row[0] < n]


def _top(points: list[Point], name: str) -> list[dict[str, Any]]:
    merged: dict[str, list[float]] = {}
    for point in points:
        for group, (requests, cost) in getattr(point, name).items():
            sums = merged.setdefault(group, [0, 0.0])
            sums[0] += requests
            sums[1] += cost
    ranked = sorted(merged.items(), key=lambda item: (item[1][1], item[1][0]), reverse=True)
    return [
        {"group": group or None, "requests": int(requests), "cost": cost}
        for group, (requests, cost) in ranked[:_TOP]
    ]


async def overview(plane: ControlPlane, cache: PointCache, span: int, step: int) -> Overview:
    """The last ``span`` seconds in points of ``step`` seconds, the newest point ending now."""
    await plane.log.flush_shielded()  # what this instance served so far is shown
    now = plane.clock.time()
    n = -(-span // step)
    start = (now // step + 1) * step - n * step  # points on whole steps: stable as time goes
    times = [start + i * step for i in range(n)]
    cache.prune(step, start)
    points: list[Point | None] = [cache.points.get((step, t)) for t in times]
    first = next((i for i, point in enumerate(points) if point is None), n)
    if first < n:  # read from the first point not kept (usually only the newest)
        async with plane.engine.connect() as connection:
            points[first:] = await _read_points(connection, plane, times[first], step, n - first)
        for t, point in zip(times[first:], points[first:], strict=True):
            if point is not None and t + step <= now - SETTLE:
                cache.keep(step, t, point)
    settled = [point for point in points if point is not None]
    result = Overview(times)
    for point in settled:
        result.requests.append(point.requests)
        result.errors.append(point.errors)
        result.input_tokens.append(point.input_tokens)
        result.output_tokens.append(point.output_tokens)
        result.cost.append(point.cost)
        result.latency_p50.append(_quantile(point.durations, 0.5))
        result.latency_p95.append(_quantile(point.durations, 0.95))
        result.ttft_p50.append(_quantile(point.ttfts, 0.5))
        result.ttft_p95.append(_quantile(point.ttfts, 0.95))
    durations = [sum(bins) for bins in zip(*(p.durations for p in settled), strict=True)]
    ttfts = [sum(bins) for bins in zip(*(p.ttfts for p in settled), strict=True)]
    result.totals = {
        "requests": sum(result.requests),
        "errors": sum(result.errors),
        "input_tokens": sum(result.input_tokens),
        "output_tokens": sum(result.output_tokens),
        "cost": sum(result.cost),
        "latency_p50": _quantile(durations, 0.5),
        "latency_p95": _quantile(durations, 0.95),
        "ttft_p50": _quantile(ttfts, 0.5),
        "ttft_p95": _quantile(ttfts, 0.95),
    }
    result.top_models = _top(settled, "models")
    result.top_keys = _top(settled, "keys")
    return result


async def request_row(plane: ControlPlane, request_id: str) -> dict[str, Any] | None:
    """The request log's row for ``request_id`` (the newest, should an id repeat)."""
    await plane.log.flush_shielded()
    query = (
        sa.select(schema.requests)
        .where(_log.request_id == request_id)
        .order_by(_log.seq.desc())
        .limit(1)
    )
    async with plane.engine.connect() as connection:
        row = (await connection.execute(query)).first()
    return None if row is None else as_dict(row)
