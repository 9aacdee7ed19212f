"""The dashboard's own reads of the request log: the overview's series and one request's row.

Each series is a handful of GROUP BY queries over the time range (the ``time`` index), so a page
costs the same whatever the number of rows outside it. Latency percentiles come from a histogram
counted in SQL (fixed bins, interpolated within one): exact percentiles need a sort that SQLite
cannot do in SQL, and a few hundred grouped rows travel instead of every row of the range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..control import schema
from ..control.cache import as_dict
from ..control.plane import ControlPlane

__all__ = ["RANGES", "Overview", "overview", "request_row"]

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
_log = schema.requests.c


@dataclass(slots=True)
class Overview:
    """The range's series (one value per point, oldest first), totals and top spenders."""

    start: float
    step: int
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


async def _histograms(
    connection: AsyncConnection, column: sa.ColumnElement[Any], point: Any, where: Any, n: int
) -> list[list[int]]:
    query = (
        sa.select(point.label("p"), _bin(column).label("b"), sa.func.count())
        .where(where, column.is_not(None))
        .group_by("p", "b")
    )
    counts = [[0] * (len(_EDGES) + 1) for _ in range(n)]
    for p, b, count in (await connection.execute(query)).all():
        if 0 <= p < n:
            counts[p][b] += count
    return counts


async def _top(
    connection: AsyncConnection, column: sa.ColumnElement[Any], where: Any
) -> list[dict[str, Any]]:
    query = (
        sa.select(
            column.label("group"),
            sa.func.count().label("requests"),
            sa.func.coalesce(sa.func.sum(_log.cost), 0.0).label("cost"),
        )
        .where(where)
        .group_by(column)
        .order_by(sa.desc("cost"), sa.desc("requests"))
        .limit(_TOP)
    )
    return [as_dict(row) for row in (await connection.execute(query)).all()]


async def overview(plane: ControlPlane, span: int, step: int) -> Overview:
    """The last ``span`` seconds in points of ``step`` seconds, the newest point ending now."""
    await plane.log.flush()  # what this instance served so far is shown
    now = plane.clock.time()
    n = -(-span // step)
    start = (now // step + 1) * step - n * step  # points on whole steps: stable as time goes
    where = _log.time >= start
    point = _point(plane, start, step)
    totals = (
        sa.select(
            point.label("p"),
            sa.func.count(),
            sa.func.sum(sa.case((_log.status >= 400, 1), else_=0)),
            sa.func.coalesce(sa.func.sum(_log.input_tokens), 0),
            sa.func.coalesce(sa.func.sum(_log.output_tokens), 0),
            sa.func.coalesce(sa.func.sum(_log.cost), 0.0),
        )
        .where(where)
        .group_by("p")
    )
    result = Overview(start, step, [start + i * step for i in range(n)])
    result.requests, result.errors = [0] * n, [0] * n
    result.input_tokens, result.output_tokens, result.cost = [0] * n, [0] * n, [0.0] * n
    async with plane.engine.connect() as connection:
        for p, requests, errors, tokens_in, tokens_out, cost in (
            await connection.execute(totals)
        ).all():
            if 0 <= p < n:
                result.requests[p], result.errors[p] = int(requests), int(errors or 0)
                result.input_tokens[p], result.output_tokens[p] = int(tokens_in), int(tokens_out)
                result.cost[p] = float(cost)
        durations = await _histograms(connection, _log.duration, point, where, n)
        ttfts = await _histograms(connection, _log.ttft, point, where, n)
        result.top_models = await _top(connection, _log.model, where)
        result.top_keys = await _top(connection, _log.key_id, where)
    for series, histograms in ((("latency_p50", "latency_p95"), durations),
                               (("ttft_p50", "ttft_p95"), ttfts)):  # fmt: skip
        for name, q in zip(series, (0.5, 0.95), strict=True):
            getattr(result, name).extend(_quantile(counts, q) for counts in histograms)
    whole_durations = [sum(column) for column in zip(*durations, strict=True)]
    whole_ttfts = [sum(column) for column in zip(*ttfts, strict=True)]
    result.totals = {
        "requests": sum(result.requests),
        "errors": sum(result.errors),
        "input_tokens": sum(result.input_tokens),
        "output_tokens": sum(result.output_tokens),
        "cost": sum(result.cost),
        "latency_p50": _quantile(whole_durations, 0.5),
        "latency_p95": _quantile(whole_durations, 0.95),
        "ttft_p50": _quantile(whole_ttfts, 0.5),
        "ttft_p95": _quantile(whole_ttfts, 0.95),
    }
    return result


async def request_row(plane: ControlPlane, request_id: str) -> dict[str, Any] | None:
    """The request log's row for ``request_id`` (the newest, should an id repeat)."""
    await plane.log.flush()
    query = (
        sa.select(schema.requests)
        .where(_log.request_id == request_id)
        .order_by(_log.seq.desc())
        .limit(1)
    )
    async with plane.engine.connect() as connection:
        row = (await connection.execute(query)).first()
    return None if row is None else as_dict(row)
