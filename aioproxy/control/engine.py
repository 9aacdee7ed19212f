"""Opening the control plane's database and migrating it to the shipped schema."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import ConfigError, DatabaseConfig
from .schema import metadata, state
from .store_tables import store_metadata

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

__all__ = [
    "CLOSE_WAIT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "SCHEMA_HEAD",
    "delete_oldest",
    "dialect_insert",
    "driver_message",
    "mask_url",
    "open_engine",
    "tune_sqlite_connection",
]

# The newest shipped migration (tests/control/test_control_database.py checks it is Alembic's
# head). A database already there, the common start-up, is seen current without importing Alembic
# (~10 MiB and ~0.3 s that every process would otherwise carry for nothing), and a new one is
# created without it too: only an upgrade of an older database runs Alembic.
SCHEMA_HEAD = "0007"

log = logging.getLogger("aioproxy")
# Alembic tells of each plugin and context at INFO: start-up logs say "migrating" once instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

# Any constant: the PostgreSQL advisory lock that instances starting together migrate under.
_MIGRATION_LOCK = 0x616970726F7879
_BUSY_WAIT_MS = 5000  # a statement waits this long for another instance's write (SQLite)
_MIGRATION_WAIT_MS = 120_000  # start-up waits this long for another instance's migration
_SQLITE_CACHE_KIB = 1024  # each SQLite connection's page cache (see tune_sqlite_connection)
# Seconds a stop waits for a database call still running (a connect, a query whose task was
# cancelled) before it goes on without it, logged: a stuck database delays it, not for ever.
CLOSE_WAIT = 10.0
_MIGRATIONS = str(Path(__file__).with_name("migrations"))
# Every table the migrations create: the control plane's and the Responses store's.
_OURS = (metadata, store_metadata)
# A password given as a query parameter (asyncpg takes ``?password=``), masked by mask_url.
_PASSWORD_PARAMETER = re.compile(r"([?&](?:password|passwd|pwd|sslpassword)=)[^&]*", re.IGNORECASE)
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def mask_url(url: str) -> str:
    """The URL as it may be shown: its password replaced by ``***`` wherever it stands, read
    as the drivers read it or not: in the user info up to the last ``@`` (a password may hold
    an ``@``, ``/`` or ``?`` the operator did not encode), and in a ``password`` parameter."""
    scheme, found, rest = url.partition("://")
    if not found:
        return "<not a database URL>"
    at = rest.rfind("@")
    user, colon, _password = rest[: max(at, 0)].partition(":")
    if at >= 0 and colon:
        rest = f"{user}:***{rest[at:]}"
    return f"{scheme}://" + _PASSWORD_PARAMETER.sub(r"\g<1>***", rest)


def driver_message(exc: BaseException) -> str:
    """A database error's first line: the driver's own words, without SQLAlchemy's echo of the
    statement and its parameters. An error without words (a bare TimeoutError) is named."""
    lines = str(getattr(exc, "orig", None) or exc).splitlines()
    return lines[0] if lines and lines[0] else type(exc).__name__


def dialect_insert(dialect: str) -> Any:
    """``dialect``'s own ``insert`` (the one with ON CONFLICT): ``sqlite`` or ``postgresql``. The
    engine imported that dialect already; a process on SQLite never imports PostgreSQL's (~2 MiB)."""
    return importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert


def delete_oldest(table: sa.Table, key: sa.Column[Any], time: sa.Column[Any]) -> sa.Delete:
    """A DELETE of the ``most`` oldest rows of ``table`` (by ``time``) from before ``cutoff``
    (both bound when it runs), found by ``key``: a backlog goes a batch a statement, so that
    none runs past ``[database] statement_timeout`` (the request log's retention, the
    Responses store's cleanup)."""
    oldest = (
        sa.select(key)
        .where(time < sa.bindparam("cutoff"))
        .order_by(time)
        .limit(sa.bindparam("most"))
    )
    return table.delete().where(key.in_(oldest.scalar_subquery()))


def _async_url(url: str) -> sa.URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError(
            f"[database] url {mask_url(url)}: not a database URL ({driver_message(exc)})"
        ) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigError(
            f"[database] url {mask_url(url)}: expected sqlite:///... or postgresql://..."
        )
    return parsed.set(drivername=driver)


def _alembic_config(connection: sa.Connection | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", _MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def _head() -> str | None:
    """The newest revision among the shipped migration scripts, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _current_revision(connection: sa.Connection) -> str | None:
    """The database's schema revision (Alembic's table), read with plain SQL."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _is_new(connection: sa.Connection) -> bool:
    """No revision and none of our tables: a database never migrated (the first start-up)."""
    if _current_revision(connection) is not None:
        return False
    present = set(sa.inspect(connection).get_table_names())
    return not any(present.intersection(tables.tables) for tables in _OURS)


def _create_schema(connection: sa.Connection) -> None:
    """A new database gets the newest schema straight from the tables' definitions, stamped
    ``SCHEMA_HEAD`` as Alembic would: what the migrations build (tests/control/
    test_schema_creation.py compares the two, rows included, on both databases), without
    importing Alembic into the serving process for good (~10 MiB of RSS). A migration that
    seeds rows seeds them here too."""
    for tables in _OURS:
        tables.create_all(connection)
    connection.execute(state.insert().values(id=1, version=0))  # migration 0001's seed row
    # Alembic's own version table (alembic.ddl.impl.DefaultImpl.version_table_impl).
    version = sa.Table(
        "alembic_version",
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(connection)
    connection.execute(version.insert().values(version_num=SCHEMA_HEAD))


def _upgrade(connection: sa.Connection) -> None:
    """Alembic's upgrade to the newest revision (a database made by an older release)."""
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


# The oldest PostgreSQL served: the key cache's marks read transaction ids with
# pg_current_xact_id() and pg_current_snapshot() (aioproxy.control.marks), new in 13.
OLDEST_POSTGRESQL = (13,)


def check_server(dialect: str, version: tuple[int | str, ...] | None) -> None:
    """Refuse a database server too old for the schema's queries, saying so plainly (rather
    than with the first query that fails, at the first poll)."""
    if (
        dialect == "postgresql"
        and version
        and isinstance(version[0], int)
        and (version[0] < OLDEST_POSTGRESQL[0])
    ):
        raise RuntimeError(
            f"PostgreSQL {'.'.join(map(str, version))} is too old: aioproxy needs "
            f"{'.'.join(map(str, OLDEST_POSTGRESQL))} or newer"
        )


def _migrate(connection: sa.Connection) -> None:
    """Migrate under a lock held to the end of the transaction: workers or instances starting
    together on a new database take turns, and the later ones find it current."""
    check_server(connection.dialect.name, connection.dialect.server_version_info)
    # Read first, unlocked: a current database (the common start-up) takes no lock, and an
    # upgrade imports Alembic before it holds the lock, not while the others wait on it.
    if _current_revision(connection) == SCHEMA_HEAD:
        return
    if not _is_new(connection):
        importlib.import_module("alembic.command")

    if connection.dialect.name == "sqlite":
        # Another instance may be migrating this new file: wait as long as a migration may take.
        connection.exec_driver_sql(f"PRAGMA busy_timeout={_MIGRATION_WAIT_MS}")
        connection.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    current = _current_revision(connection)
    if _is_new(connection):
        log.info("creating the database's schema (%s)", SCHEMA_HEAD)
        _create_schema(connection)
    elif current != SCHEMA_HEAD:
        log.info("migrating the database from %s to %s", current or "nothing", SCHEMA_HEAD)
        _upgrade(connection)
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql(f"PRAGMA busy_timeout={_BUSY_WAIT_MS}")


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers (the admin API, the key poller) do not wait for the log writer; the busy
    # timeout lets instances sharing the file take turns instead of failing.
    cursor = dbapi_connection.cursor()
    # First: switching to WAL waits too, while another instance migrates a new file.
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_WAIT_MS}")
    _switch_to_wal(cursor)
    cursor.close()
    tune_sqlite_connection(dbapi_connection)


def _open_sqlite_whole(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
    """The ``do_connect`` event: each SQLite connection opened by ``_open_sqlite``."""
    params["async_creator_fn"] = _open_sqlite  # the aiosqlite dialect's connect calls it


async def _open_sqlite(*args: Any, **kwargs: Any) -> Any:
    """aiosqlite's connect, not abandoned when the task opening it is cancelled (a pool
    checkout of the key cache's poll stopped at close, say). Abandoned, aiosqlite stops the
    connection's thread without waiting, and the thread posts the connect's result later, to
    a loop that may have closed meanwhile: RuntimeError "Event loop is closed", raised in
    the thread. Cancelled, it waits for the connect, closes what it opened, then goes on."""
    import aiosqlite

    connection = aiosqlite.connect(*args, **kwargs)
    connection._thread.daemon = True  # as the dialect's own connect: no thread holds the exit
    opening = asyncio.ensure_future(_opened(connection))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        await _finish(opening)
        if opening.done() and not opening.cancelled() and opening.exception() is None:
            await _finish(asyncio.ensure_future(connection.close()))
        raise


async def _opened(connection: Any) -> Any:
    return await connection


async def _finish(task: asyncio.Future[Any]) -> None:
    """Wait for ``task`` to end, ``CLOSE_WAIT`` seconds at most, through the cancellations of
    the waiter meanwhile (such as the event loop's close cancelling every task): its caller
    raises its own cancellation after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_WAIT
    while not task.done() and (left := deadline - loop.time()) > 0:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=left)
    if not task.done():
        log.warning("database: a cancelled SQLite connect still running after %g s", CLOSE_WAIT)


def tune_sqlite_connection(dbapi_connection: Any) -> None:
    """The settings of every SQLite connection aioproxy opens on a file already in WAL mode
    (the control plane's, and the Responses store's own thread's)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_WAIT_MS}")  # another writer: wait, do not fail
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL's usual pairing: no fsync per commit
    cursor.execute("PRAGMA foreign_keys=ON")
    # A page cache of 1 MiB, not SQLite's 2: it fills for good in each connection's thread. The
    # log's writer appends at the right edge of each tree; measured on a 55 MiB log of random
    # request ids, a batch costs the same CPU as with 2 MiB (with 512 KiB, ~15% more).
    cursor.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
    # Statement journals (each multi-row INSERT of the request log's writer opens one) in
    # memory: on disk each was a temporary file and two write(2)s a page, about one a request.
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def _bind_none_and_bools_directly() -> None:
    """Adapters that bind None and bools as sqlite3 would anyway (NULL, 1, 0), found at the
    first lookup: without them each such parameter (about ten a request-log row) goes through
    sqlite3's whole adaptation protocol, whose failed ``__adapt__`` lookup on a type formats
    and clears an AttributeError; measured, a row's insert costs half as much with them."""
    sqlite3.register_adapter(bool, int)
    sqlite3.register_adapter(type(None), _NONE_TO_NULL)


# None -> None by an empty dict's ``get``: a call in C (a lambda would cost a Python frame).
_NONE_TO_NULL = dict[None, None]().get


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``. Instances opening a new file together race to switch it,
    and SQLite answers the loser "database is locked" at once, without the busy wait (which
    could deadlock there): it tries again, within the busy timeout. Only at a connection's
    start, and only on that race, does this sleep."""
    deadline = time.monotonic() + _BUSY_WAIT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError, through SQLAlchemy's adapter
            if "database is locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


DEFAULT_STATEMENT_TIMEOUT = DatabaseConfig().statement_timeout  # [database]'s default


def _bounds(seconds: float) -> Callable[[sa.Connection], None]:
    """The ``begin`` event that bounds each transaction's statements and lock waits on
    PostgreSQL: the server cancels one past ``seconds`` and rolls its transaction back, so a
    retry writes nothing twice. Set per transaction (``set_config(..., true)``, as ``SET
    LOCAL``), so a pooler's shared server connections keep none of it. (asyncpg's client-side
    ``command_timeout`` also cut a COMMIT short that the server then made: the request log
    wrote its batch again.)"""
    ms = max(1, round(seconds * 1000))
    sql = (
        f"SELECT set_config('statement_timeout', '{ms}', true),"
        f" set_config('lock_timeout', '{ms}', true)"
    )

    def bound(connection: sa.Connection) -> None:
        try:
            connection.exec_driver_sql(sql)
        except BaseException:
            # SQLAlchemy runs this listener outside the begin's own clean-up: a connection
            # whose bounds failed would never begin again. Closed instead, the error raised.
            connection.invalidate()
            raise

    return bound


async def open_engine(
    url: str, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
) -> AsyncEngine:
    """An engine on ``url`` with the schema migrated to the newest; ConfigError when the
    database cannot be opened (its message names ``[database] url``, the password masked).
    On PostgreSQL a statement or lock wait past ``statement_timeout`` seconds fails (0: none)."""
    parsed = _async_url(url)
    # A pooled connection to a server may have been dropped meanwhile: pinged at each checkout.
    # A SQLite file's never is: no ping (a statement and three driver-thread round trips each
    # time the log's writer, the admin API or the key cache's poll takes the connection).
    pool: dict[str, Any] = {"pool_pre_ping": parsed.get_backend_name() != "sqlite"}
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).parent
        if not folder.is_dir():  # said plainly, before a driver thread starts for nothing
            raise ConfigError(
                f"[database] url {mask_url(url)}: cannot open the database: "
                f"the folder {folder} does not exist"
            )
        # One connection kept: each is a thread of its own (aiosqlite) with its own page cache
        # and malloc arena, ~3-4 MiB that stayed for good once a burst had opened five. More
        # open while needed (one writer at a time anyway) and close after.
        pool["pool_size"] = 1
    engine = create_async_engine(parsed, **pool)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine.sync_engine, "do_connect", _open_sqlite_whole)
        sa.event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        _bind_none_and_bools_directly()
    migrating = engine
    if engine.dialect.name == "postgresql" and statement_timeout > 0:
        sa.event.listen(engine.sync_engine, "begin", _bounds(statement_timeout))
        # Migrating waits for another instance's migration and may itself take long (an index
        # made on a large log): on a connection of its own, unbounded.
        migrating = create_async_engine(parsed, poolclass=sa.pool.NullPool)
    try:
        try:
            async with migrating.begin() as connection:
                await connection.run_sync(_migrate)
        finally:
            if migrating is not engine:
                await migrating.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error stops start-up, told once
        await engine.dispose()
        raise ConfigError(
            f"[database] url {mask_url(url)}: cannot open the database: {driver_message(exc)}"
        ) from None
    return engine
