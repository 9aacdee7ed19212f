"""ResponseStore in the control plane's database (SQLite and PostgreSQL): it survives restarts,
one principal's responses are hidden from others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from aioproxy.bridges.store import BrokenChain, HistoryTooLarge, ResponseStore, StoreUnavailable
from aioproxy.config import ConfigError
from aioproxy.control.engine import SCHEMA_HEAD, open_engine
from tests.control.conftest import db_url, postgres_port  # noqa: F401 - both databases

RESPONSE = {"id": "resp_1", "object": "response", "output": [], "model": "m"}
CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    """The control plane's engine on a fresh database, migrated (as the app opens it)."""
    engine = await open_engine(db_url)
    yield engine
    await engine.dispose()


async def execute(engine: AsyncEngine, statement: str) -> Any:
    async with engine.begin() as connection:
        result = await connection.exec_driver_sql(statement)
        return result.all() if result.returns_rows else None


@asynccontextmanager
async def on_a_fake_clock(
    engine: AsyncEngine, **options: Any
) -> AsyncIterator[tuple[ResponseStore, FakeClock]]:
    """A store with these options on a fake clock, closed afterwards."""
    clock = FakeClock()
    store = ResponseStore(engine, clock=clock, **options)
    try:
        yield store, clock
    finally:
        await store.close()


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[ResponseStore]:
    store = ResponseStore(engine)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def saved(store: ResponseStore) -> ResponseStore:
    """The store, alice's ``resp_1`` (RESPONSE, CONVERSATION) saved in it."""
    await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    return store


async def test_save_then_get(saved: ResponseStore) -> None:
    assert await saved.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    assert await saved.get("resp_2", "alice") is None


async def test_only_the_creator_reads_or_deletes(saved: ResponseStore) -> None:
    assert await saved.get("resp_1", "bob") is None
    assert await saved.delete("resp_1", "bob") is False
    assert await saved.get("resp_1", "alice") is not None


async def test_delete(saved: ResponseStore) -> None:
    assert await saved.delete("resp_1", "alice") is True
    assert await saved.get("resp_1", "alice") is None
    assert await saved.delete("resp_1", "alice") is False


@pytest.mark.empty_database  # opening it migrates it
async def test_survives_a_restart(db_url: str) -> None:  # noqa: F811
    """A store given the URL opens (and migrates) its own engine, and disposes of it."""
    first = ResponseStore(db_url)
    await first.open()
    await first.save("resp_1", "alice", RESPONSE, CONVERSATION)
    await first.close()
    second = ResponseStore(db_url)
    await second.open()
    try:
        assert await second.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
    finally:
        await second.close()


async def test_the_rows_live_in_the_control_plane_s_tables(
    saved: ResponseStore, engine: AsyncEngine
) -> None:
    await saved.remember_native("resp_up", "deployment-1", "alice")
    assert await execute(engine, "SELECT id, owner FROM stored_responses") == [("resp_1", "alice")]
    assert await execute(engine, "SELECT id FROM native_responses") == [("resp_up",)]
    version = await execute(engine, "SELECT version_num FROM alembic_version")
    assert version == [(SCHEMA_HEAD,)]


async def test_two_stores_share_one_database(db_url: str, store: ResponseStore) -> None:  # noqa: F811
    """As two worker processes or instances would."""
    other = ResponseStore(db_url)
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


@pytest.mark.empty_database  # opening it migrates it
async def test_first_use_opens_it_and_a_closed_store_refuses(db_url: str) -> None:  # noqa: F811
    store = ResponseStore(db_url)
    assert await store.get("resp_1", "alice") is None
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable) as caught:
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert caught.value.status == 503


@pytest.mark.empty_database  # opening it migrates it
async def test_concurrent_first_uses_open_it_once(db_url: str) -> None:  # noqa: F811
    store = ResponseStore(db_url)
    try:
        await asyncio.gather(
            *(store.save(f"resp_{i}", "alice", RESPONSE, CONVERSATION) for i in range(5))
        )
        assert all([await store.get(f"resp_{i}", "alice") for i in range(5)])
    finally:
        await store.close()


async def test_a_database_that_cannot_be_opened_names_the_setting(tmp_path: Any) -> None:
    store = ResponseStore(f"sqlite:///{tmp_path / 'missing' / 'control.sqlite3'}")
    with pytest.raises(ConfigError, match=r"\[database\] url"):
        await store.open()
    await store.close()


@pytest.mark.empty_database  # opening it migrates it
async def test_a_cancelled_first_use_leaves_the_open_to_the_next(db_url: str) -> None:  # noqa: F811
    """The first caller gives up (its client left) while the store opens: the open goes on,
    once, and the next caller uses it."""
    store = ResponseStore(db_url)
    try:
        first = asyncio.ensure_future(store.get("resp_1", "alice"))
        await asyncio.sleep(0)  # the open has started
        first.cancel()
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
        assert await store.get("resp_1", "alice") == (RESPONSE, CONVERSATION)
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


async def stored_bytes(engine: AsyncEngine) -> int:
    """Every byte the store's rows hold."""
    rows = await execute(
        engine, "SELECT coalesce(sum(length(response) + length(turn)), 0) FROM stored_responses"
    )
    return int(rows[0][0])


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


async def test_chained_turns_are_stored_once(store: ResponseStore, engine: AsyncEngine) -> None:
    """40 turns of 100 KB each: the store holds about 4 MB, not the 82 MB of every history."""
    await save_chain(store, "alice", 40, size=100_000)
    assert await stored_bytes(engine) < 40 * 100_000 * 1.2
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


async def test_expired_responses_are_gone_after_cleanup(engine: AsyncEngine) -> None:
    async with on_a_fake_clock(engine, ttl=100) as (store, clock):
        await store.save("resp_old", "alice", RESPONSE, turn(0))
        clock.now += 60
        await store.save("resp_new", "alice", RESPONSE, turn(1))
        clock.now += 50  # resp_old is 110 s old, resp_new 50 s
        assert await store.response("resp_old", "alice") is None  # expired, even before cleanup
        assert await store.cleanup() == 1
        assert await stored_bytes(engine) < 2 * len(str(RESPONSE)) + 200
        assert await store.get("resp_new", "alice") is not None


async def test_chaining_onto_a_response_keeps_its_chain_alive(engine: AsyncEngine) -> None:
    async with on_a_fake_clock(engine, ttl=100) as (store, clock):
        await save_chain(store, "alice", 2)
        clock.now += 90
        await store.save("resp_2", "alice", RESPONSE, turn(2), "resp_1")
        clock.now += 90  # resp_0 and resp_1 were created 180 s ago, chained onto 90 s ago
        assert await store.cleanup() == 0
        found = await store.get("resp_2", "alice")
        assert found is not None and len(found[1]) == 6


async def test_the_size_bound_evicts_the_least_recently_used(engine: AsyncEngine) -> None:
    async with on_a_fake_clock(engine, max_bytes=25_000) as (store, clock):
        for i in range(3):  # three of ~10 KB: the oldest must go
            await store.save(f"resp_{i}", "alice", RESPONSE, turn(i, 10_000))
            clock.now += 1
        assert await store.cleanup() == 1
        assert await store.get("resp_0", "alice") is None
        assert await store.get("resp_1", "alice") is not None
        assert await store.get("resp_2", "alice") is not None


async def test_the_size_bound_never_cuts_a_chain_in_its_middle(engine: AsyncEngine) -> None:
    async with on_a_fake_clock(engine, max_bytes=25_000) as (store, _):
        await save_chain(store, "alice", 3, size=10_000)  # one second, one chain
        assert await store.cleanup() == 1
        assert await store.response("resp_2", "alice") is None  # its end went, not its start
        found = await store.get("resp_1", "alice")
        assert found is not None and len(found[1]) == 4


async def test_a_backlog_is_cleaned_a_batch_a_statement(engine: AsyncEngine) -> None:
    """A backlog of expired responses and of responses over the size bound goes a batch
    (``cleanup_batch`` rows) a statement, each in its own transaction, to the same end as one
    statement: no statement holds more than a batch (none then runs past ``[database]
    statement_timeout`` however long the outage was). Eviction takes the least recently used
    first, so the next batch still finds the rest over the bound."""
    async with on_a_fake_clock(engine, ttl=100, max_bytes=25_000) as (store, clock):
        store.cleanup_batch = 2
        for i in range(5):
            await store.save(f"old_{i}", "alice", RESPONSE, turn(i))
            await store.remember_native(f"native_{i}", "d", "alice")
        clock.now += 200  # all ten expired
        for i in range(5):  # five of ~10 KB, a second apart: the three oldest are over the bound
            await store.save(f"resp_{i}", "alice", RESPONSE, turn(i, 10_000))
            clock.now += 1
        assert await store.cleanup() == 5 + 5 + 3
        assert all([await store.response(f"old_{i}", "alice") is None for i in range(5)])
        assert all([await store.lookup_native(f"native_{i}") is None for i in range(5)])
        kept = [await store.response(f"resp_{i}", "alice") is not None for i in range(5)]
        assert kept == [False, False, False, True, True]
        assert await store.cleanup() == 0


async def test_the_periodic_cleanup_runs_off_the_request_path(engine: AsyncEngine) -> None:
    """A timer (here a fake one, run by hand) starts each cleanup, which plans the next."""
    clock = FakeClock()
    planned: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    def schedule(delay: float, callback: Any) -> asyncio.Handle:
        planned.put_nowait((delay, callback))
        return asyncio.get_running_loop().call_soon(lambda: None)  # a handle close can cancel

    store = ResponseStore(engine, ttl=100, cleanup_interval=60, clock=clock, schedule=schedule)
    try:
        await store.save("resp_1", "alice", RESPONSE, turn(1))
        store.start()
        delay, due = planned.get_nowait()
        assert delay == 60
        clock.now += 101
        due()
        await asyncio.wait_for(planned.get(), 10)  # the next one is planned: this one is done
        assert await execute(engine, "SELECT count(*) FROM stored_responses") == [(0,)]
    finally:
        await store.close()


# -- failures of the store (#9.16) ------------------------------------------------------------


async def test_an_unreadable_row_is_a_503_not_a_crash(
    saved: ResponseStore, engine: AsyncEngine
) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            sa.text("UPDATE stored_responses SET response = :bad"), {"bad": b"\x00\xff"}
        )
    for read in (saved.get, saved.response):
        with pytest.raises(StoreUnavailable) as caught:
            await read("resp_1", "alice")
        assert caught.value.status == 503 and "resp_1" in caught.value.message


async def test_a_failed_write_is_store_unavailable(
    store: ResponseStore, engine: AsyncEngine
) -> None:
    await execute(engine, "DROP TABLE stored_responses")
    with pytest.raises(StoreUnavailable) as caught:
        await store.save("resp_1", "alice", RESPONSE, CONVERSATION)
    assert caught.value.code == "response_store_unavailable"
    assert "stored_responses" not in caught.value.message  # the cause goes to the log only


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
