"""Opening and migrating the database, and the request log's buffer, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from aioproxy.config import ConfigError, SpendConfig
from aioproxy.control import schema
from aioproxy.control.cache import KeyCache
from aioproxy.control.engine import (
    _MIGRATION_LOCK,
    SCHEMA_HEAD,
    _head,
    check_server,
    mask_url,
    open_engine,
)
from aioproxy.control.requestlog import LogRecord, RequestLog
from aioproxy.testing import eventually
from tests.control.conftest import ended, lock_requests, waiting_on


def row(n: int, when: float = 1_900_000_000.0) -> dict[str, Any]:
    return {
        "request_id": f"r{n}",
        "time": when,
        "day": "2030-03-17",
        "key_id": None,
        "key_name": "k",
        "team_id": None,
        "end_user": None,
        "model": "m",
        "deployment": "d",
        "provider": "p",
        "kind": "chat_completions",
        "status": 200,
        "error_code": None,
        "stream": False,
        "input_tokens": 1,
        "output_tokens": 2,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": False,
        "cost": 0.5,
        "ttft": 0.1,
        "duration": 0.2,
    }


async def count_rows(engine: Any) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(sa.select(sa.func.count()).select_from(schema.requests))
            ).scalar()
        )


@pytest.mark.empty_database  # opening it migrates it
async def test_migrates_a_new_database_then_finds_it_current(db_url: str) -> None:
    engine = await open_engine(db_url)
    try:
        async with engine.connect() as connection:
            version = (
                await connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).scalar()
            tables = await connection.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        assert version == _head()  # the newest shipped migration
        assert {"keys", "teams", "requests", "control_state"} <= tables
    finally:
        await engine.dispose()
    again = await open_engine(db_url)  # already current: nothing to do
    await again.dispose()


def test_the_schema_head_is_the_newest_shipped_migration() -> None:
    assert SCHEMA_HEAD == _head()


def test_a_new_or_current_database_opens_without_alembic(tmp_path: Path) -> None:
    """Alembic is loaded only to upgrade an older database: a process creating a new one, or
    opening a current one, never imports it (~10 MiB it would hold for good)."""
    url = f"sqlite:///{tmp_path / 'current.sqlite3'}"
    probe = (
        "import asyncio, sys\n"
        "from aioproxy.control.engine import open_engine\n"
        "async def main():\n"
        f"    await (await open_engine({url!r})).dispose()\n"
        "asyncio.run(main())\n"
        "print('alembic' in sys.modules)\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert [run.stdout.strip() for run in runs] == ["False", "False"]  # created, then current


def test_mask_url() -> None:
    assert mask_url("postgresql://bob:hunter2@db/x") == "postgresql://bob:***@db/x"
    assert "hunter2" not in mask_url("postgresql+asyncpg://bob:hunter2@db:5432/x")
    assert mask_url("sqlite:///aioproxy.sqlite3") == "sqlite:///aioproxy.sqlite3"
    # Each showed some of the password before: a parameter asyncpg takes, characters the
    # operator did not encode (SQLAlchemy ends the password at the first '@'), a port that is
    # no number (no parse at all: a traceback).
    assert mask_url("postgresql://db/x?sslmode=require&password=hunter2") == (
        "postgresql://db/x?sslmode=require&password=***"
    )
    assert mask_url("postgresql://bob:hun@ter2@db/x") == "postgresql://bob:***@db/x"
    assert mask_url("postgresql://bob:hu/n?ter2@db/x") == "postgresql://bob:***@db/x"
    assert mask_url("postgresql://bob:hunter2@db:port/x") == "postgresql://bob:***@db:port/x"
    assert mask_url("sqlite:////data/a@b.sqlite3") == "sqlite:////data/a@b.sqlite3"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob:hunter2@127.0.0.1:1/nowhere",
        "mysql://bob:hunter2@127.0.0.1/x",
        "sqlite:////nonexistent-dir/deeper/aioproxy.sqlite3",
        "postgresql://bob:hunter2@127.0.0.1:port/x",  # a ValueError, not a ConfigError, before
        "postgresql://127.0.0.1:1/x?password=hunter2",
    ],
)
async def test_an_unopenable_database_names_the_setting(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        await open_engine(url)
    assert "[database] url" in str(refused.value) and "hunter2" not in str(refused.value)


def test_start_up_stops_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "aioproxy.toml"
    config.write_text('[database]\nurl = "postgresql://bob:${DB_PASSWORD}@127.0.0.1:1/x"\n')
    done = subprocess.run(
        [sys.executable, "-m", "aioproxy", "--config", str(config), "--port", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={"DB_PASSWORD": "hunter2", "PATH": ""},
    )
    assert done.returncode == 2, done.stderr
    assert "[database] url postgresql://bob:***@127.0.0.1:1/x" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


async def test_python_run_py_needs_no_setup(tmp_path: Path) -> None:
    """No config at all: the default SQLite file appears in the working directory."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parents[2] / "run.py"),
        "--port",
        "0",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(120):  # safety net
            line = await process.stdout.readline()
        assert b"aioproxy serving" in line
        assert (tmp_path / "aioproxy.sqlite3").exists()
    finally:
        process.terminate()
        await process.wait()


class Flaky:
    """An engine that fails while ``down``, else is the real one."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.down = True

    def begin(self) -> Any:
        if self.down:
            raise ConnectionError("database unreachable")
        return self.engine.begin()


async def test_rows_wait_while_the_database_is_down(db_url: str) -> None:
    engine = await open_engine(db_url)
    try:
        flaky = Flaky(engine)
        log = RequestLog(flaky, KeyCache(engine), SpendConfig(buffer_rows=5))  # type: ignore[arg-type]
        for n in range(7):
            log.add(LogRecord.of(row(n), 0.5))
        with pytest.raises(ConnectionError):
            await log.flush()
        assert len(log.buffer) == 5 and log.dropped == 2  # the oldest two, counted
        flaky.down = False
        await log.flush()
        assert await count_rows(engine) == 5 and not log.buffer
        async with engine.connect() as connection:
            ids = (await connection.execute(sa.select(schema.requests.c.request_id))).scalars()
            assert sorted(ids) == ["r2", "r3", "r4", "r5", "r6"]
    finally:
        await engine.dispose()


async def test_a_row_the_database_refuses_is_dropped_alone_and_its_spend_kept(
    db_url: str,
) -> None:
    """A batch refused for its data (here a NOT NULL column left null) is not retried whole
    for ever: it is written row by row, the refused row dropped (counted) and its record
    written without it, so its key's spend still counts."""
    engine = await open_engine(db_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                schema.keys.insert().values(
                    id="key_1", digest="d" * 64, key_prefix="sk-abcd", name="k", created_at=1.0
                )
            )
        cache = KeyCache(engine)
        await cache.reload()
        log = RequestLog(engine, cache, SpendConfig())
        bad = {**row(1), "kind": None, "key_id": "key_1"}
        for fields in (row(0), bad, row(2)):
            log.add(LogRecord.of(fields, 0.25))
        await log.flush()
        assert log.refused == 1 and not log.buffer
        assert await count_rows(engine) == 2
        async with engine.connect() as connection:
            spend = (
                await connection.execute(
                    sa.select(schema.keys.c.total_spend).where(schema.keys.c.id == "key_1")
                )
            ).scalar()
        assert spend == 0.25
    finally:
        await engine.dispose()


class DownAfter:
    """An engine whose database goes away after ``begins`` transactions."""

    def __init__(self, engine: Any, begins: int) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.left = begins

    def begin(self) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ConnectionError("database unreachable")
        return self.engine.begin()


async def test_a_refused_batch_cut_short_by_an_outage_writes_no_row_twice(db_url: str) -> None:
    """A refused batch is written a record at a time; if the database goes away midway, the
    records already written have left the buffer, so the retry writes only the rest."""
    engine = await open_engine(db_url)
    try:
        # The batch (refused), the first row, the refused row, its spend alone: then down.
        flaky = DownAfter(engine, 4)
        log = RequestLog(flaky, KeyCache(engine), SpendConfig())  # type: ignore[arg-type]
        for fields in (row(0), {**row(1), "kind": None}, row(2)):
            log.add(LogRecord.of(fields, 0.25))
        with pytest.raises(ConnectionError):
            await log.flush()
        assert [record.values[0] for record in log.buffer] == ["r2"]
        flaky.left = 10
        await log.flush()
        async with engine.connect() as connection:
            ids = (await connection.execute(sa.select(schema.requests.c.request_id))).scalars()
            assert sorted(ids) == ["r0", "r2"] and log.refused == 1
    finally:
        await engine.dispose()


class Wordless(Flaky):
    """Down with an error that has no words (a connect timeout's bare TimeoutError)."""

    tries = 0

    def begin(self) -> Any:
        self.tries += 1
        if self.down:
            raise TimeoutError()
        return self.engine.begin()


async def test_a_wordless_failure_is_retried_too(db_url: str) -> None:
    """The writer's warning names an error without words by its type: reading its first line
    raised IndexError there, which ended the writer, so nothing was written again."""
    engine = await open_engine(db_url)
    try:
        flaky = Wordless(engine)
        log = RequestLog(
            flaky,  # type: ignore[arg-type]
            KeyCache(engine),
            SpendConfig(flush_interval=0.01, batch_size=1),
        )
        log.start()
        log.add(LogRecord.of(row(0), 0.5))
        task = log._task
        assert task is not None
        await eventually(lambda: flaky.tries >= 2 or task.done(), within=30.0)
        assert not task.done(), task  # the first failure's warning did not end the writer
        flaky.down = False
        await log.stop()
        assert await count_rows(engine) == 1
    finally:
        await engine.dispose()


async def test_the_writer_retries_and_stop_flushes(db_url: str) -> None:
    engine = await open_engine(db_url)
    try:
        flaky = Flaky(engine)
        log = RequestLog(
            flaky,
            KeyCache(engine),  # type: ignore[arg-type]
            SpendConfig(flush_interval=0.01, batch_size=2),
        )
        log.start()
        for n in range(3):
            log.add(LogRecord.of(row(n), 0.5))
        flaky.down = False
        await log.stop()  # graceful shutdown: what is queued is written
        assert await count_rows(engine) == 3
    finally:
        await engine.dispose()


async def test_a_lock_held_elsewhere_fails_the_write_and_holds_no_shutdown(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: a statement waiting on a lock another session holds (or on a server gone
    silent) fails after ``[database] statement_timeout`` instead of waiting for ever. The
    request log keeps its rows and writes them once the lock is gone; a shutdown while it is
    still held ends, saying what it could not write (before, both waited as long as the lock).
    SQLite waits for a lock its busy timeout (5 s) as before: not this setting's."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's lock waits are its busy timeout's")
    engine = await open_engine(db_url, 1.0)
    holder = await asyncpg.connect(db_url)
    caplog.set_level("WARNING", "aioproxy")
    try:
        locking = await lock_requests(holder)
        log = RequestLog(engine, KeyCache(engine), SpendConfig(flush_interval=0.01))
        log.add(LogRecord.of(row(0), 0.5))
        failed = (await ended(log.flush(), "the write still waits on the lock")).exception()
        assert isinstance(failed, sa.exc.DBAPIError) and "timeout" in str(failed), failed
        assert len(log.buffer) == 1 and log.written == 0  # kept for the next try
        log.start()
        await eventually(lambda: "request log: cannot write 1 rows" in caplog.text, within=30.0)
        await locking.rollback()  # the lock is gone: the writer's next try writes the row
        await eventually(lambda: log.written == 1, within=30.0)
        assert await count_rows(engine) == 1

        locking = await lock_requests(holder)
        log.add(LogRecord.of(row(1), 0.5))
        (await ended(log.stop(60.0), "the shutdown still waits on the lock")).result()
        assert "request log: 1 rows not written at shutdown" in caplog.text
        await locking.rollback()
        assert await count_rows(engine) == 1  # the pool's connections still work
    finally:
        await holder.close()
        await engine.dispose()


class _SilentRelay:
    """A TCP relay to PostgreSQL that can fall silent, as a server behind a network partition:
    while ``silent``, what the client sends still reaches the server but no reply comes back,
    and no connection is reset."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silent = False
        self.held = asyncio.Event()  # set once a reply was held back
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        for source, sink, replies in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.ensure_future(self._pump(source, sink, replies))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if replies and self.silent:
                    self.held.set()
                    continue  # dropped: the client waits for a reply that never comes
                sink.write(data)
                await sink.drain()
        sink.close()  # one side closed (a client's close, the server's end): so is the other

    async def close(self) -> None:
        for writer in self._writers:  # the client's connections reset: nothing waits on them
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


async def test_a_silent_database_holds_a_shutdown_no_longer_than_statement_timeout(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server gone silent mid-write (no reply and no reset: a network partition) is past
    what the server's own bounds can end, and the writer waits on it. A shutdown waits for
    the writer ``[database] statement_timeout`` at most, then abandons its write and reports
    the rows it held as not written (before, it waited for as long as the silence)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("a SQLite file does not fall silent")
    url = make_url(db_url)
    assert url.port is not None
    relay = _SilentRelay(url.port)
    engine = await open_engine(url.set(port=await relay.start()).render_as_string(False), 1.0)
    caplog.set_level("WARNING", "aioproxy")
    try:
        settings = SpendConfig(flush_interval=0.01)
        log = RequestLog(engine, KeyCache(engine), settings, build=lambda record: record)
        log.start()
        log.add(LogRecord.of(row(0), 0.5))
        await eventually(lambda: log.written == 1, within=30.0)  # through the relay
        relay.silent = True
        log.add(LogRecord.of(row(1), 0.5))
        await asyncio.wait_for(relay.held.wait(), 60.0)  # the write went; its answer held
        # A request finished meanwhile, its row not made yet: reported too.
        log.add_finished(LogRecord.of(row(2), 0.5))
        (await ended(log.stop(1.0), "the shutdown still waits on the silent database")).result()
        assert "the database did not answer within 1 s at shutdown" in caplog.text
        assert "request log: 2 rows not written at shutdown" in caplog.text
    finally:
        await relay.close()
        await engine.dispose()


async def test_a_reader_s_flush_cancelled_mid_write_still_ends_its_write(db_url: str) -> None:
    """The admin API and the dashboard write the queued rows before they read. A reader
    cancelled meanwhile (its client gone) does not cut the write: cut mid-COMMIT, a batch the
    server made anyway would stay queued and be written again. Here the write waits on a lock
    when its reader is cancelled, and ends once the lock goes, with no flush after it."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's lock waits are its busy timeout's")
    engine = await open_engine(db_url)
    holder = await asyncpg.connect(db_url)
    try:
        locking = await lock_requests(holder)
        log = RequestLog(engine, KeyCache(engine), SpendConfig())  # no writer: the reader's
        log.add(LogRecord.of(row(0), 0.5))
        reading = asyncio.ensure_future(log.flush_shielded())
        # The write is under way, on the lock.
        await eventually(lambda: waiting_on(holder, "relation"), within=30.0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await locking.rollback()
        await eventually(lambda: log.written == 1, within=30.0)
        assert not log.buffer
        assert await count_rows(engine) == 1
    finally:
        await holder.close()
        await engine.dispose()


@pytest.mark.empty_database  # a new database: opening it takes the migration's lock
async def test_start_up_waits_for_another_instance_s_migration_past_statement_timeout(
    db_url: str,
) -> None:
    """PostgreSQL: an instance starting while another migrates waits for the migration's lock
    however long it takes (a migration may build an index on a large log): ``[database]
    statement_timeout`` bounds the gateway's statements, not its migration."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's migration waits are its own busy timeout's")
    holder = await asyncpg.connect(db_url)
    try:
        migrating = holder.transaction()  # another instance's migration, under way
        await migrating.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        opening = asyncio.ensure_future(open_engine(db_url, 0.2))
        await eventually(lambda: waiting_on(holder, "advisory"), within=30.0)
        # Past the statement bound: a bounded wait would have failed by now (no bound on the
        # right answer: however slow the machine, the wait goes on until the lock is let go).
        await asyncio.sleep(1.0)
        assert not opening.done(), opening
        assert await waiting_on(holder, "advisory")  # still on the lock, not past it otherwise
        await migrating.rollback()
        engine = await opening
        await engine.dispose()
    finally:
        await holder.close()


async def test_retention_deletes_old_rows(db_url: str) -> None:
    engine = await open_engine(db_url)
    now = 1_900_000_000.0
    try:
        log = RequestLog(engine, KeyCache(engine), SpendConfig(retention_days=1), lambda: now)
        log.add(LogRecord.of(row(1, now - 2 * 86400)))
        log.add(LogRecord.of(row(2, now - 3600)))
        await log.flush()
        await log._expire()
        async with engine.connect() as connection:
            ids = (await connection.execute(sa.select(schema.requests.c.request_id))).scalars()
            assert list(ids) == ["r2"]
    finally:
        await engine.dispose()


async def test_retention_deletes_a_backlog_a_batch_a_turn(db_url: str) -> None:
    """A backlog past retention (a busy day is millions of rows) is deleted the oldest
    ``expired_a_turn`` rows at a time, one delete a turn of the writer, so that none holds
    the writer long nor runs past ``[database] statement_timeout``; the roll-up's days past
    retention go with the last batch (whole-day spend meanwhile still reads them)."""
    engine = await open_engine(db_url)
    now = 1_900_000_000.0  # 2030-03-17 17:46 UTC; retention of a day: rows before the 16th go
    try:
        settings = SpendConfig(retention_days=1, batch_size=1)
        log = RequestLog(engine, KeyCache(engine), settings, lambda: now)
        log.expired_a_turn = 2
        for n in range(5):
            log.add(LogRecord.of({**row(n, now - 3 * 86400 + n), "day": "2030-03-14"}, 0.5))
        log.add(LogRecord.of(row(9, now - 3600), 0.5))
        await log.flush()

        async def left() -> tuple[list[str], list[str]]:
            async with engine.connect() as connection:
                ids = await connection.execute(
                    sa.select(schema.requests.c.request_id).order_by(schema.requests.c.seq)
                )
                days = await connection.execute(
                    sa.select(schema.spend_days.c.day).order_by(schema.spend_days.c.day)
                )
                return list(ids.scalars()), list(days.scalars())

        turns = []
        for _ in range(4):  # the fourth, within the hour, finds the deletion over
            await log._expire()
            turns.append(await left())
        assert turns == [
            (["r2", "r3", "r4", "r9"], ["2030-03-14", "2030-03-17"]),
            (["r4", "r9"], ["2030-03-14", "2030-03-17"]),
            (["r9"], ["2030-03-17"]),
            (["r9"], ["2030-03-17"]),
        ]
    finally:
        await engine.dispose()


async def test_a_failed_retention_delete_is_logged_and_tried_again_later(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A delete of rows past retention that fails (the database away) is logged as such and
    tried again at the next retention time; the writer's writes are not held for it."""
    engine = await open_engine(db_url)
    clock = [1_900_000_000.0]
    try:
        log = RequestLog(engine, KeyCache(engine), SpendConfig(retention_days=1), lambda: clock[0])
        log.add(LogRecord.of(row(1, clock[0] - 2 * 86400), 0.5))
        await log.flush()
        flaky = Flaky(engine)
        log.engine = flaky  # type: ignore[assignment]
        await log._expire()  # does not raise: the writer goes on
        assert "request log: cannot delete the rows past retention" in caplog.text
        flaky.down = False
        await log._expire()  # not yet: within the hour
        assert await count_rows(engine) == 1
        clock[0] += 3600
        await log._expire()
        assert await count_rows(engine) == 0
    finally:
        await engine.dispose()


@pytest.mark.empty_database  # opening it migrates it
async def test_instances_starting_together_share_one_schema(db_url: str) -> None:
    """Workers forked from one app migrate a new database at the same moment."""
    engines = await asyncio.gather(*(open_engine(db_url) for _ in range(3)))
    try:
        async with engines[0].connect() as connection:
            version = (
                await connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            ).all()
        assert version == [(_head(),)]
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_new_sqlite_file_another_connection_writes_is_switched_to_wal(
    tmp_path: Path,
) -> None:
    """SQLite answers a switch to WAL "database is locked" at once, without the busy wait, while
    another connection holds a write lock on the file (as an instance starting on the same new
    file may): the switch is tried again until the lock is gone, not reported as fatal."""
    path = tmp_path / "control.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other VALUES (1)")
    release = threading.Timer(0.3, holder.execute, ("COMMIT",))
    release.start()
    try:
        engine = await open_engine(f"sqlite:///{path}")
    finally:
        release.join()
        holder.close()
    try:
        async with engine.connect() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
        assert mode == "wal"
    finally:
        await engine.dispose()


async def test_sqlite_keeps_statement_journals_in_memory(tmp_path: Path) -> None:
    """Each multi-row INSERT of the request log's writer opens a statement journal: on disk
    that was a temporary file and two writes a page, about one a logged request."""
    engine = await open_engine(f"sqlite:///{tmp_path / 'control.sqlite3'}")
    try:
        async with engine.connect() as connection:
            store = (await connection.exec_driver_sql("PRAGMA temp_store")).scalar()
        assert store == 2  # MEMORY
    finally:
        await engine.dispose()


def test_a_postgresql_too_old_is_named() -> None:
    """PostgreSQL before 13 lacks the functions the key cache's marks use: refused at
    start-up, by name (the message goes into the ``[database] url`` ConfigError)."""
    with pytest.raises(RuntimeError, match="PostgreSQL 12.9 is too old: aioproxy needs 13"):
        check_server("postgresql", (12, 9))
    check_server("postgresql", (13, 0))
    check_server("postgresql", None)
    check_server("sqlite", (3, 7))
