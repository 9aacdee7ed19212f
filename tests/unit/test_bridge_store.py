"""ResponseStore: SQLite that survives restarts, one principal's responses hidden from others."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aioproxy.bridges.store import BrokenChain, HistoryTooLarge, ResponseStore, StoreUnavailable

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


# -- each turn once, expiry and the size bound (#9.8), deletion inside a chain (#9.17) ----------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def turn(i: int, size: int = 10) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"q{i} " + "x" * size},
        {"role": "assistant", "content": f"a{i}"},
    ]


def stored_bytes(path: Path) -> int:
    """Every byte the rows of every table hold, whatever the schema."""
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        total = 0
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                total += sum(len(v) for v in row if isinstance(v, (bytes, str)))
    db.close()
    return total


async def save_chain(store: ResponseStore, owner: str, n: int, size: int = 10) -> None:
    for i in range(n):
        previous = f"resp_{i - 1}" if i else None
        response = {**RESPONSE, "id": f"resp_{i}"}
        await store.save(f"resp_{i}", owner, response, turn(i, size), previous)


async def test_a_chain_is_read_back_whole_in_order(store: ResponseStore) -> None:
    await save_chain(store, "alice", 5)
    found = await store.get("resp_4", "alice")
    assert found is not None
    assert found[0]["id"] == "resp_4"
    assert found[1] == [message for i in range(5) for message in turn(i)]
    assert await store.get("resp_4", "bob") is None


async def test_chained_turns_are_stored_once(store: ResponseStore, path: Path) -> None:
    """40 turns of 100 KB each: the store holds about 4 MB, not the 82 MB of every history."""
    await save_chain(store, "alice", 40, size=100_000)
    assert stored_bytes(path) < 40 * 100_000 * 1.2
    found = await store.get("resp_39", "alice")
    assert found is not None and len(found[1]) == 80


async def test_a_deleted_link_breaks_the_chain_after_it(store: ResponseStore) -> None:
    await save_chain(store, "alice", 3)
    assert await store.delete("resp_1", "alice")
    with pytest.raises(BrokenChain) as caught:
        await store.get("resp_2", "alice")
    assert caught.value.missing == "resp_1"
    assert await store.response("resp_2", "alice") is not None  # still there to read alone
    found = await store.get("resp_0", "alice")
    assert found is not None and found[1] == turn(0)


async def test_expired_responses_are_gone_after_cleanup(path: Path) -> None:
    clock = FakeClock()
    store = ResponseStore(path, ttl=100, clock=clock)
    try:
        await store.save("resp_old", "alice", RESPONSE, turn(0))
        clock.now += 60
        await store.save("resp_new", "alice", RESPONSE, turn(1))
        clock.now += 50  # resp_old is 110 s old, resp_new 50 s
        assert await store.response("resp_old", "alice") is None  # expired, even before cleanup
        assert await store.cleanup() == 1
        assert stored_bytes(path) < 2 * len(str(RESPONSE)) + 200
        assert await store.get("resp_new", "alice") is not None
    finally:
        await store.close()


async def test_chaining_onto_a_response_keeps_its_chain_alive(path: Path) -> None:
    clock = FakeClock()
    store = ResponseStore(path, ttl=100, clock=clock)
    try:
        await save_chain(store, "alice", 2)
        clock.now += 90
        await store.save("resp_2", "alice", RESPONSE, turn(2), "resp_1")
        clock.now += 90  # resp_0 and resp_1 were created 180 s ago, chained onto 90 s ago
        assert await store.cleanup() == 0
        found = await store.get("resp_2", "alice")
        assert found is not None and len(found[1]) == 6
    finally:
        await store.close()


async def test_the_size_bound_evicts_the_least_recently_used(path: Path) -> None:
    clock = FakeClock()
    store = ResponseStore(path, max_bytes=25_000, clock=clock)
    try:
        for i in range(3):  # three of ~10 KB: the oldest must go
            await store.save(f"resp_{i}", "alice", RESPONSE, turn(i, 10_000))
            clock.now += 1
        assert await store.cleanup() == 1
        assert await store.get("resp_0", "alice") is None
        assert await store.get("resp_1", "alice") is not None
        assert await store.get("resp_2", "alice") is not None
    finally:
        await store.close()


async def test_the_size_bound_never_cuts_a_chain_in_its_middle(path: Path) -> None:
    clock = FakeClock()
    store = ResponseStore(path, max_bytes=25_000, clock=clock)
    try:
        await save_chain(store, "alice", 3, size=10_000)  # one second, one chain
        assert await store.cleanup() == 1
        assert await store.response("resp_2", "alice") is None  # its end went, not its start
        found = await store.get("resp_1", "alice")
        assert found is not None and len(found[1]) == 4
    finally:
        await store.close()


async def test_the_periodic_cleanup_runs_off_the_request_path(path: Path) -> None:
    """A timer (here a fake one, run by hand) starts each cleanup, which plans the next."""
    clock = FakeClock()
    planned: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    def schedule(delay: float, callback: Any) -> asyncio.Handle:
        planned.put_nowait((delay, callback))
        return asyncio.get_running_loop().call_soon(lambda: None)  # a handle close can cancel

    store = ResponseStore(path, ttl=100, cleanup_interval=60, clock=clock, schedule=schedule)
    try:
        await store.save("resp_1", "alice", RESPONSE, turn(1))
        store.start()
        delay, due = planned.get_nowait()
        assert delay == 60
        clock.now += 101
        due()
        await asyncio.wait_for(planned.get(), 10)  # the next one is planned: this one is done
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM responses").fetchone()[0] == 0
        db.close()
    finally:
        await store.close()


# -- ownership (#9.7) and the old schema ------------------------------------------------------


def write_version_1(path: Path) -> None:
    """A store as the aioproxy before #9.7 left it: rows owned by key *names*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, principal TEXT NOT NULL,"
            " created_at INTEGER NOT NULL, response BLOB NOT NULL, conversation BLOB NOT NULL)"
        )
        db.execute(
            "INSERT INTO responses VALUES ('resp_old', 'master', 0, ?, ?)",
            (b'{"id": "resp_old"}', b'[{"role": "user", "content": "secret"}]'),
        )
    db.close()


async def test_rows_owned_by_a_name_are_dropped_with_a_log_line(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_version_1(path)
    store = ResponseStore(path)
    try:
        for owner in ("master", "name:master"):
            assert await store.get("resp_old", owner) is None
            assert await store.response("resp_old", owner) is None
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
        assert await store.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    finally:
        await store.close()
    assert "dropped 1 responses of an older format" in caplog.text
    assert "secret" not in path.read_bytes().decode("latin-1")  # dropped, not only hidden


# -- failures of the store (#9.16) ------------------------------------------------------------


async def test_an_unreadable_row_is_a_503_not_a_crash(store: ResponseStore, path: Path) -> None:
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE responses SET response = x'00ff'")
    db.close()
    for read in (store.get, store.response):
        with pytest.raises(StoreUnavailable) as caught:
            await read("resp_1", "alice")
        assert caught.value.status == 503 and "resp_1" in caught.value.message


async def test_a_failed_write_is_store_unavailable(store: ResponseStore, path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON responses"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    db.close()
    with pytest.raises(StoreUnavailable) as caught:
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert caught.value.code == "response_store_unavailable"
    assert "disk" not in caught.value.message  # the cause goes to the log, not to clients


async def test_cleanup_gives_the_space_back_to_the_disk(path: Path) -> None:
    store = ResponseStore(path, max_bytes=1)
    try:
        for i in range(100):
            await store.save(f"resp_{i}", "alice", RESPONSE, turn(i, 10_000))
        assert await store.cleanup() == 100
    finally:
        await store.close()  # checkpoints the WAL into the file
    assert path.stat().st_size < 100_000  # not the ~1 MB the rows took


async def test_input_messages_are_the_response_s_own(store: ResponseStore) -> None:
    await save_chain(store, "alice", 2)
    assert await store.input_messages("resp_1", "alice") == turn(1)[:-1]
    assert await store.input_messages("resp_1", "bob") is None


async def test_a_chain_past_max_bytes_is_refused_before_it_is_decoded(
    store: ResponseStore,
) -> None:
    await save_chain(store, "alice", 5, size=1000)  # each turn ~1 KB
    assert await store.get("resp_4", "alice", max_bytes=6000) is not None
    with pytest.raises(HistoryTooLarge):
        await store.get("resp_4", "alice", max_bytes=3000)
