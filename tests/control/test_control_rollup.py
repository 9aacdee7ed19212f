"""The spend roll-up (``spend_days``) answers exactly what the request log's rows answer, on
SQLite and PostgreSQL: batch after batch, over any whole-day range, and after retention."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine

from aioproxy.config import SpendConfig
from aioproxy.control import rollup, schema
from aioproxy.control.cache import KeyCache
from aioproxy.control.engine import _alembic_config, open_engine
from aioproxy.control.requestlog import LogRecord, RequestLog
from tests.control.test_control_database import row

DAY = 86400.0
NOW = 1_900_000_000.0  # 2030-03-17 17:46:40 UTC
TODAY = NOW - NOW % DAY


def rows(count: int, days: int) -> list[dict[str, Any]]:
    """Rows over the last ``days`` days: some keys, teams and models missing, some unpriced,
    some on a midnight exactly."""
    rng = random.Random(12)
    made = []
    for n in range(count):
        when = TODAY - rng.randrange(days) * DAY + (0.0 if n % 17 == 0 else rng.random() * DAY)
        when = min(when, NOW)
        made.append(
            {
                **row(n, when),
                "day": time.strftime("%Y-%m-%d", time.gmtime(when)),
                "key_id": rng.choice([None, "key_a", "key_b"]),
                "team_id": rng.choice([None, "team_x"]),
                "model": rng.choice([None, "m1", "m2"]),
                "input_tokens": rng.randrange(1000),
                "output_tokens": rng.randrange(1000),
                "cost": None if n % 11 == 0 else rng.random(),
            }
        )
    return made


async def answers(engine: AsyncEngine, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        found = (await connection.execute(query)).all()
    return [(group, int(n), int(i), int(o), pytest.approx(float(c))) for group, n, i, o, c in found]


async def assert_same(engine: AsyncEngine, start: float | None, end: float | None) -> None:
    for group_by in rollup.GROUPS:
        from_rows = await answers(engine, rollup.rows_query(group_by, start, end))
        from_rollup = await answers(engine, rollup.rollup_query(group_by, start, end))
        assert from_rollup == from_rows, (group_by, start, end)


async def test_the_rollup_answers_what_the_rows_answer(db_url: str) -> None:
    engine = await open_engine(db_url)
    now = NOW
    try:
        log = RequestLog(
            engine, KeyCache(engine), SpendConfig(batch_size=50, retention_days=3), lambda: now
        )
        for record in rows(600, 8):
            log.add(LogRecord.of(record))
        await log.flush()  # twelve batches: groups met again add up
        assert rollup.whole_days(TODAY - 3 * DAY, TODAY) and not rollup.whole_days(NOW)
        for start, end in [
            (None, None),
            (TODAY - 3 * DAY, None),
            (TODAY - 5 * DAY, TODAY - DAY),
            (None, TODAY - 2 * DAY),
            (TODAY, TODAY + DAY),
        ]:
            await assert_same(engine, start, end)
        await log._expire()
        # Retention deletes whole UTC days, the roll-up's with the rows: older than three
        # days before midnight of the day three days ago.
        async with engine.connect() as connection:
            oldest = await connection.execute(sa.select(sa.func.min(schema.requests.c.time)))
            assert oldest.scalar_one() == TODAY - 3 * DAY
            days = await connection.execute(sa.select(sa.func.min(schema.spend_days.c.day)))
            assert days.scalar_one() == rollup.date_of(TODAY - 3 * DAY)
        for start, end in [(None, None), (TODAY - 5 * DAY, TODAY - 2 * DAY)]:
            await assert_same(engine, start, end)
    finally:
        await engine.dispose()


async def test_a_batch_of_many_groups_is_upserted_in_parts(db_url: str) -> None:
    engine = await open_engine(db_url)
    try:
        log = RequestLog(engine, KeyCache(engine), SpendConfig(batch_size=5000))
        for n, record in enumerate(rows(1200, 2)):
            log.add(LogRecord.of({**record, "key_id": f"key_{n}"}))
        await log.flush()  # one batch, 1200 groups
        await assert_same(engine, None, None)
    finally:
        await engine.dispose()


async def test_whole_days_are_read_from_the_rollup(db_url: str) -> None:
    """Only the log's writer keeps the roll-up: a row inserted past it shows in a range that is
    not whole days (read from the rows), not in a whole-day one (read from the roll-up)."""
    engine = await open_engine(db_url)
    try:
        log = RequestLog(engine, KeyCache(engine), SpendConfig())
        written, inserted = rows(2, 1)
        log.add(LogRecord.of(written))
        await log.flush()
        async with engine.begin() as connection:
            await connection.execute(schema.requests.insert(), [inserted])
        whole = await answers(engine, rollup.spend_query("day", TODAY, None))
        assert [n for _, n, *_ in whole] == [1]
        part = await answers(engine, rollup.spend_query("day", TODAY - 1, None))
        assert [n for _, n, *_ in part] == [2]
    finally:
        await engine.dispose()


async def test_the_migration_rolls_up_the_rows_already_written(tmp_path: Path) -> None:
    """A database at 0002 with rows gets them rolled up by 0004, and their retries unknown."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = sa.create_engine(url)
    with old.begin() as connection:
        command.upgrade(_alembic_config(connection), "0002")
        columns = [c for c in schema.REQUEST_COLUMNS if c not in ("retries", "fallbacks")]
        written = [{name: record[name] for name in columns} for record in rows(300, 4)]
        connection.execute(sa.table("requests", *map(sa.column, columns)).insert(), written)
    old.dispose()
    engine = await open_engine(url)
    try:
        await assert_same(engine, None, None)
        await assert_same(engine, TODAY - DAY, TODAY)
        async with engine.connect() as connection:
            retries = await connection.execute(sa.select(schema.requests.c.retries).distinct())
            assert retries.all() == [(None,)]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("batch", [1, 39, 40, 41, 85])
async def test_each_row_is_written_once_whatever_the_batch(db_url: str, batch: int) -> None:
    """Rows go ``ROWS_A_STATEMENT`` to an INSERT and the rest one by one: every row lands
    once, with its own values in its own columns."""
    engine = await open_engine(db_url)
    try:
        log = RequestLog(engine, KeyCache(engine), SpendConfig(batch_size=1000), lambda: NOW)
        written = rows(batch, 2)
        for n, record in enumerate(written):
            record["input_tokens"], record["duration"] = n, n / 8
            log.add(LogRecord.of(record))
        await log.flush()
        async with engine.connect() as connection:
            found = (
                await connection.execute(
                    sa.select(
                        schema.requests.c.request_id,
                        schema.requests.c.input_tokens,
                        schema.requests.c.duration,
                        schema.requests.c.model,
                    ).order_by(schema.requests.c.seq)
                )
            ).all()
        assert [tuple(r) for r in found] == [
            (r["request_id"], r["input_tokens"], r["duration"], r["model"]) for r in written
        ]
    finally:
        await engine.dispose()
