"""ResponseStore: SQLite that survives restarts, one principal's responses hidden from others."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioproxy.bridges.store import BrokenChain, ResponseStore, StoreUnavailable

RESPONSE = {"id": "resp_1", "object": "response", "output": [], "model": "m"}
CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "responses.sqlite3"  # its folder is created on open


@pytest.fixture
async def store(path: Path) -> AsyncIterator[ResponseStore]:
    store = ResponseStore(path)
    await store.open()
    yield store
    await store.close()


async def test_save_then_get(store: ResponseStore) -> None:
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert await store.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    assert await store.get("resp_2", "alice") is None


async def test_only_the_creator_reads_or_deletes(store: ResponseStore) -> None:
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert await store.get("resp_1", "bob") is None
    assert await store.delete("resp_1", "bob") is False
    assert await store.get("resp_1", "alice") is not None


async def test_delete(store: ResponseStore) -> None:
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert await store.delete("resp_1", "alice") is True
    assert await store.get("resp_1", "alice") is None
    assert await store.delete("resp_1", "alice") is False


async def test_survives_a_restart(path: Path) -> None:
    first = ResponseStore(path)
    await first.open()
    await first.save("resp_1", "alice", RESPONSE, CONVERSATION)
    await first.close()
    second = ResponseStore(path)
    await second.open()
    try:
        assert await second.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    finally:
        await second.close()


async def test_wal_mode(store: ResponseStore, path: Path) -> None:
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_two_stores_share_one_file(path: Path, store: ResponseStore) -> None:
    """As two worker processes would."""
    other = ResponseStore(path)
    await other.open()
    try:
        await asyncio.gather(
            *(
                s.save(f"resp_{i}", "alice", RESPONSE, CONVERSATION)
                for i, s in enumerate([store, other] * 10)
            )
        )
        assert await other.get("resp_0", "alice") is not None
        assert await store.get("resp_19", "alice") is not None
    finally:
        await other.close()


async def test_queries_run_off_the_event_loop(store: ResponseStore) -> None:
    loop_thread = threading.get_ident()
    threads = []
    original = store._save

    def spy(row: tuple) -> None:
        threads.append(threading.get_ident())
        original(row)

    store._save = spy  # type: ignore[method-assign]
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert threads and threads[0] != loop_thread


async def test_first_use_opens_it_and_a_closed_store_refuses(path: Path) -> None:
    store = ResponseStore(path)
    store.check()  # start-up: makes the folder, opens nothing
    assert path.parent.is_dir() and not path.exists()
    assert await store.get("resp_1", "alice") is None
    assert path.exists()
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable) as caught:
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert caught.value.status == 503


async def test_concurrent_first_uses_open_it_once(path: Path) -> None:
    store = ResponseStore(path)
    try:
        await asyncio.gather(
            *(store.save(f"resp_{i}", "alice", RESPONSE, CONVERSATION) for i in range(5))
        )
        assert all([await store.get(f"resp_{i}", "alice") for i in range(5)])
    finally:
        await store.close()


def test_check_refuses_a_folder_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        ResponseStore(blocker / "responses.sqlite3").check()


async def test_in_memory() -> None:
    store = ResponseStore(":memory:")
    await store.open()
    try:
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
        assert await store.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    finally:
        await store.close()


def test_check_refuses_a_folder_where_the_file_should_be(tmp_path: Path) -> None:
    (tmp_path / "responses.sqlite3").mkdir()
    with pytest.raises(PermissionError):
        ResponseStore(tmp_path / "responses.sqlite3").check()


async def test_a_cancelled_first_use_leaves_the_open_to_the_next(path: Path) -> None:
    """The first caller gives up (its client left) while the store opens: the open goes on,
    once, and the next caller uses it."""
    store = ResponseStore(path)
    try:
        first = asyncio.ensure_future(store.get("resp_1", "alice"))
        await asyncio.sleep(0)  # the open has started
        first.cancel()
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
        assert await store.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
        assert sum(t.name.startswith("aioproxy-store") for t in threading.enumerate()) == 1
    finally:
        await store.close()
