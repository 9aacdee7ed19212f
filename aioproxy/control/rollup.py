"""Spend by key, team, model or day: from the request log rolled up by UTC day, key, team and
model (``schema.spend_days``) over whole days, else from the rows.

The log's writer adds each batch's rows to it in the batch's own transaction, so it always
holds exactly the sums of the rows written, and whole-day spend (``GET /admin/spend`` with
``start``/``end`` at midnight UTC, the dashboard's Spend page) reads a few rows a day instead of
every request. Retention deletes rows at whole UTC days and the same days here, so the roll-up
and the rows never disagree. Costs are sums of floats: equal to the rows' sums up to rounding.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema
from .engine import dialect_insert

__all__ = [
    "DAY",
    "GROUPS",
    "add_rows",
    "date_of",
    "day_start",
    "rollup_query",
    "rows_query",
    "spend_query",
    "whole_days",
]

DAY = 86400.0
_AT = {name: i for i, name in enumerate(schema.REQUEST_COLUMNS)}
_group_of = operator.itemgetter(_AT["day"], _AT["key_id"], _AT["team_id"], _AT["model"])
_input_of, _output_of, _cost_of = (
    operator.itemgetter(_AT[name]) for name in ("input_tokens", "output_tokens", "cost")
)
_table = schema.spend_days
_log = schema.requests.c
# ``group_by`` -> the request log's column and the roll-up's.
GROUPS = {
    "key": (_log.key_id, _table.c.key_id),
    "team": (_log.team_id, _table.c.team_id),
    "model": (_log.model, _table.c.model),
    "day": (_log.day, _table.c.day),
}


def whole_days(*moments: float | None) -> bool:
    """Whether each of ``moments`` is a UTC midnight or open (None)."""
    return all(moment is None or moment % DAY == 0 for moment in moments)


def day_start(moment: float) -> float:
    """The UTC midnight that begins ``moment``'s day."""
    return moment - moment % DAY


async def add_rows(connection: AsyncConnection, rows: Iterable[tuple[Any, ...]]) -> None:
    """Add request log rows (``schema.REQUEST_COLUMNS``' order) to the roll-up: one upsert
    statement, executed for each group in a fixed order (instances sharing the database lock
    them alike: no deadlock)."""
    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for row in rows:  # the writer's per-row work: its group's list, summed in C below
        group = _group_of(row)
        found = groups.get(group)
        if found is None:
            groups[group] = [row]
        else:
            found.append(row)
    if not groups:
        return
    # One group (a batch of one key and model, the usual batch under light load) needs no sort.
    ordered = sorted(groups.items(), key=_sort_key) if len(groups) > 1 else groups.items()
    values = [
        {
            "day": day,
            "key_id": key_id or "",
            "team_id": team_id or "",
            "model": model or "",
            "requests": len(grouped),
            "input_tokens": sum(map(_input_of, grouped)),
            "output_tokens": sum(map(_output_of, grouped)),
            "cost": sum(filter(None, map(_cost_of, grouped)), 0.0),  # None: not priced
        }
        for (day, key_id, team_id, model), grouped in ordered
    ]
    await connection.execute(_upsert(connection.dialect.name), values)


def _sort_key(item: tuple[tuple[Any, ...], list[tuple[Any, ...]]]) -> tuple[str, ...]:
    return tuple(part or "" for part in item[0])


_UPSERTS: dict[str, Any] = {}


def _upsert(dialect: str) -> Any:
    """The roll-up's upsert for ``dialect``, built once (its compiled form is then cached)."""
    statement = _UPSERTS.get(dialect)
    if statement is None:
        insert = dialect_insert(dialect)(_table)
        added = insert.excluded
        statement = _UPSERTS[dialect] = insert.on_conflict_do_update(
            index_elements=["day", "key_id", "team_id", "model"],
            set_={
                name: _table.c[name] + added[name]
                for name in ("requests", "input_tokens", "output_tokens", "cost")
            },
        )
    return statement


def spend_query(group_by: str, start: float | None, end: float | None) -> sa.Select[Any]:
    """Spend grouped by ``group_by`` from ``start`` to ``end`` (None: open): from the roll-up
    when both are whole days, else from the rows."""
    if whole_days(start, end):
        return rollup_query(group_by, start, end)
    return rows_query(group_by, start, end)


def rows_query(group_by: str, start: float | None, end: float | None) -> sa.Select[Any]:
    """Spend from the request log's rows."""
    column = GROUPS[group_by][0]
    # Over a range, grouped by an expression, not the bare column: SQLite would walk the
    # column's own index to skip a sort, reading every row instead of the range's (the
    # covering index of migration 0002 serves the range).
    group: sa.ColumnElement[Any] = column if start is None else sa.func.coalesce(column, None)
    query = _summed(
        group,
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(_log.input_tokens), 0),
        sa.func.coalesce(sa.func.sum(_log.output_tokens), 0),
        sa.func.coalesce(sa.func.sum(_log.cost), 0.0),
    )
    if start is not None:
        query = query.where(_log.time >= start)
    if end is not None:
        query = query.where(_log.time < end)
    return query


def rollup_query(group_by: str, start: float | None, end: float | None) -> sa.Select[Any]:
    """Spend from the roll-up: ``start`` and ``end`` are whole days (or None)."""
    column = GROUPS[group_by][1]
    group = column if group_by == "day" else sa.func.nullif(column, "")
    query = _summed(
        group,
        *(sa.func.sum(_table.c[name]) for name in ("requests", "input_tokens", "output_tokens")),
        sa.func.sum(_table.c.cost),
    )
    if start is not None:
        query = query.where(_table.c.day >= date_of(start))
    if end is not None:
        query = query.where(_table.c.day < date_of(end))
    return query


def _summed(group: sa.ColumnElement[Any], *sums: sa.ColumnElement[Any]) -> sa.Select[Any]:
    names = ("requests", "input_tokens", "output_tokens", "cost")
    columns = [total.label(name) for total, name in zip(sums, names, strict=True)]
    return sa.select(group.label("group"), *columns).group_by(group).order_by(group)


def date_of(midnight: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(midnight))
