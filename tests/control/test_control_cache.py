"""The key cache's poll: other instances' spend reaches it, and a poll reads only the keys and
teams spent in since the last one (``aioproxy.control.marks``), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aioproxy.config import SpendConfig
from aioproxy.control import schema
from aioproxy.control.cache import KeyCache
from aioproxy.control.engine import _alembic_config, _async_url, open_engine
from aioproxy.control.requestlog import LogRecord, RequestLog
from aioproxy.testing import eventually
from tests.control.conftest import chat
from tests.control.test_control_database import row

KEYS = 50  # keys that are not spent in: the poll reads none of them


async def test_refresh_takes_spend_and_last_use_in_one_read(start_control: Any) -> None:
    first, second = await start_control(), await start_control()
    created = await first.new_key(name="shared", max_budget=10)
    await second.plane.cache.refresh()  # the key reaches the second instance
    await chat(first.server, created["key"])
    await first.settle()  # the first instance's writer stored the spend and the last use
    stored = await first.admin("GET", f"/admin/keys/{created['id']}")
    assert stored["spend"] > 0

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not _is_bounds(statement):
            statements.append(statement)

    sa.event.listen(second.plane.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await second.plane.cache.refresh()
    finally:
        sa.event.remove(second.plane.engine.sync_engine, "before_cursor_execute", seen)

    entry = second.plane.cache.keys[created["id"]]
    assert entry.spend == pytest.approx(stored["spend"])
    assert entry.total_spend == pytest.approx(stored["total_spend"])
    assert entry.last_used_at is not None
    # the watermark and the mark, then the keys' and teams' figures marked since, in one
    # statement (the poller may refresh meanwhile: the same statements again; on SQLite it
    # may have read the figures already, leaving only the first)
    assert 1 <= len(set(statements)) <= 2, statements


async def _seed(engine: AsyncEngine, keys: int = KEYS) -> None:
    """A team, ``keys`` keys (``key_0`` in the team), as the admin API stores them."""
    async with engine.begin() as connection:
        await connection.execute(schema.teams.insert().values(id="team_1", name="t", created_at=1))
        await connection.execute(
            schema.keys.insert(),
            [
                {
                    "id": f"key_{n}",
                    "digest": f"{n:064d}",
                    "key_prefix": "sk-abcd",
                    "name": f"k{n}",
                    "team_id": "team_1" if n == 0 else None,
                    "created_at": 1.0,
                }
                for n in range(keys)
            ],
        )


class Instance:
    """One instance's control plane, without its HTTP side: a key cache and a request log on
    an engine of its own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.cache = KeyCache(engine)
        self.log = RequestLog(engine, self.cache, SpendConfig())

    async def spend(self, n: int, key: str, cost: float, team: str | None = None) -> None:
        self.log.add(LogRecord.of({**row(n), "key_id": key, "team_id": team}, cost))
        await self.log.flush()


@pytest.fixture
async def instances(db_url: str) -> AsyncIterator[list[Instance]]:
    """Three instances on one database, its keys seeded and loaded; nothing polls but the test."""
    engines = [await open_engine(db_url) for _ in range(3)]
    await _seed(engines[0])
    made = [Instance(engine) for engine in engines]
    for instance in made:
        await instance.cache.reload()
    yield made
    for engine in engines:
        await engine.dispose()


def _is_bounds(statement: str) -> bool:
    """Whether ``statement`` sets a PostgreSQL transaction's bounds (``[database]
    statement_timeout``), as every transaction begins: not one of the poll's reads."""
    return statement.startswith("SELECT set_config('statement_timeout'")


def _statements(engine: AsyncEngine) -> list[str]:
    """The statements ``engine`` runs from now on (its transactions' bounds aside)."""
    run: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not _is_bounds(statement):
            run.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", seen)
    return run


async def test_a_poll_reads_only_the_keys_and_teams_spent_in(instances: list[Instance]) -> None:
    writer, reader, _ = instances
    cache = reader.cache
    run = _statements(reader.engine)
    await cache.refresh()
    assert cache.figures_read == 0  # nothing spent: no row read (SQLite: not even queried)
    assert len(run) == (1 if reader.engine.dialect.name == "sqlite" else 2)

    await writer.spend(1, "key_0", 0.25, team="team_1")
    await writer.spend(2, "key_7", 0.0)  # no cost: its last use alone moves
    await cache.refresh()
    assert cache.figures_read == 3  # key_0, its team, key_7: not the other 48 keys
    assert (cache.keys["key_0"].spend, cache.keys["key_0"].total_spend) == (0.25, 0.25)
    assert cache.teams["team_1"].spend == 0.25
    assert cache.keys["key_7"].last_used_at == row(2)["time"]
    assert cache.keys["key_1"].last_used_at is None

    await cache.refresh()
    assert cache.figures_read == 3  # nothing since

    await writer.spend(3, "key_0", 0.5, team="team_1")
    await cache.refresh()
    assert cache.figures_read == 5
    assert cache.keys["key_0"].spend == cache.teams["team_1"].total_spend == 0.75


async def test_an_admin_change_reloads_and_the_poll_goes_on_from_there(
    instances: list[Instance],
) -> None:
    """A moved watermark reloads every row; the marks the reload noted carry the next poll."""
    writer, reader, _ = instances
    await writer.spend(1, "key_3", 0.5)
    async with writer.engine.begin() as connection:  # what the admin API's change does
        await connection.execute(sa.update(schema.keys).values(name="renamed"))
        await connection.execute(sa.update(schema.state).values(version=schema.state.c.version + 1))
    await reader.cache.refresh()
    assert reader.cache.keys["key_9"].name == "renamed"
    assert reader.cache.keys["key_3"].spend == 0.5
    read = reader.cache.figures_read
    await reader.cache.refresh()
    assert reader.cache.figures_read == read  # the reload read it: not again
    await writer.spend(2, "key_4", 0.25)
    await reader.cache.refresh()
    assert reader.cache.figures_read == read + 1
    assert reader.cache.keys["key_4"].spend == 0.25


async def test_a_write_that_commits_after_a_later_one_is_not_missed(
    instances: list[Instance],
) -> None:
    """Several writers at once (PostgreSQL): the first marks its key, then waits (here for a
    lock on its team) while the second marks and commits its own, and a poll reads that one.
    The first commits last, with the smaller mark: the next poll still reads it."""
    first, second, reader = instances
    if reader.engine.dialect.name != "postgresql":
        pytest.skip("SQLite writes one transaction at a time")
    async with reader.engine.connect() as locker:
        await locker.execute(
            sa.select(schema.teams.c.id).where(schema.teams.c.id == "team_1").with_for_update()
        )
        blocked = asyncio.create_task(first.spend(1, "key_0", 0.5, team="team_1"))

        async def waiting_for_the_team() -> bool:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            return bool((await locker.exec_driver_sql(waiting)).scalar())

        await eventually(waiting_for_the_team, within=30, what="the first writer waits")
        await second.spend(2, "key_1", 0.25)
        await reader.cache.refresh()
        assert reader.cache.keys["key_1"].spend == 0.25
        assert reader.cache.keys["key_0"].spend == 0.0  # not committed yet
        await locker.rollback()  # the team's lock goes: the first writer commits
    await blocked
    await reader.cache.refresh()
    assert reader.cache.keys["key_0"].spend == reader.cache.teams["team_1"].spend == 0.5

    async with reader.engine.connect() as connection:
        query = sa.select(schema.keys.c.id, schema.keys.c.figures_mark)
        marks = {id_: mark for id_, mark in await connection.execute(query)}
    assert marks["key_0"] < marks["key_1"]  # the smaller mark committed last


@pytest.mark.empty_database
async def test_rows_written_before_the_marks_are_loaded_then_marked(db_url: str) -> None:
    """A database at 0006 with keys and a team: migrated, they hold mark 0, load whole, and
    their spend reaches the other instances once written."""
    old = create_async_engine(_async_url(db_url))
    async with old.begin() as connection:
        await connection.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "0006"))
    await _seed(old, keys=3)
    await old.dispose()
    writer, reader = Instance(await open_engine(db_url)), Instance(await open_engine(db_url))
    try:
        async with writer.engine.connect() as connection:
            marks = await connection.execute(sa.select(schema.keys.c.figures_mark))
            assert set(marks.scalars()) == {0}
        await writer.cache.reload()
        await reader.cache.reload()
        assert set(reader.cache.keys) == {"key_0", "key_1", "key_2"}
        await writer.spend(1, "key_0", 0.5, team="team_1")
        await reader.cache.refresh()
        assert reader.cache.figures_read == 2
        assert reader.cache.keys["key_0"].spend == reader.cache.teams["team_1"].spend == 0.5
    finally:
        await writer.engine.dispose()
        await reader.engine.dispose()
