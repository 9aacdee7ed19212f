"""A SQLite database keeps one connection open between uses: each is a thread of its own
(aiosqlite) with its own page cache, so those a burst opened are closed again, not kept."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import sqlalchemy as sa

from aioproxy.bridges.store import ResponseStore
from aioproxy.control.engine import open_engine
from aioproxy.testing import eventually


async def test_a_burst_of_connections_leaves_one_open(tmp_path: Path) -> None:
    engine = await open_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        threads = threading.active_count()  # with the one connection migration used
        opened = 0
        all_open = asyncio.Event()

        async def use() -> None:
            nonlocal opened
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
                opened += 1
                if opened == 4:
                    all_open.set()
                await all_open.wait()  # four in use at once

        await asyncio.wait_for(asyncio.gather(*(use() for _ in range(4))), 60)  # a safety net
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        # The others' threads end once their connections are closed (within a safety net).
        await eventually(lambda: threading.active_count() == threads, within=30)
    finally:
        await engine.dispose()


async def test_each_connection_caches_at_most_a_mebibyte_of_pages(tmp_path: Path) -> None:
    """SQLite's page cache fills for good in each connection's thread: 1 MiB, not 2, in the
    control plane's connections and in the Responses store's own."""
    engine = await open_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    store = ResponseStore(engine)
    try:
        async with engine.connect() as connection:
            size = (await connection.exec_driver_sql("PRAGMA cache_size")).scalar()
        in_store = await store._run(lambda c: c.exec_driver_sql("PRAGMA cache_size").scalar())
        assert size == in_store == -1024  # negative: KiB
    finally:
        await store.close()
        await engine.dispose()
