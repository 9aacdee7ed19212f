"""Stored Responses API answers, for ``previous_response_id`` and ``GET /v1/responses/{id}``.

SQLite in WAL mode, so that several worker processes can share one file. Every query runs on the
store's single worker thread: the event loop never waits on the disk, and the one connection is
only ever used from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from ..errors import ProxyError

if TYPE_CHECKING:
    import sqlite3

    from ..context import Principal

__all__ = ["BrokenChain", "ResponseStore", "StoreUnavailable", "owner_of"]

# How the store waits for its next cleanup: loop.call_later's signature (tests pass their own).
Schedule = Callable[[float, Callable[[], None]], asyncio.Handle]

_R = TypeVar("_R")  # what a store call run in the executor returns

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(dict[str, Any]).decode
_decode_turn = msgspec.json.Decoder(list[dict[str, Any]]).decode

# Version 1 (no user_version) owned rows by key *name* and kept the whole history in each row.
# Its rows are dropped, not converted: a name says nothing of which credential wrote the row.
_VERSION = 2
_SCHEMA = (
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,       -- Principal.id: a digest of the key, never its name
        previous_id TEXT,          -- the response this one continues (previous_response_id)
        touched_at INTEGER NOT NULL,  -- creation, or a later response chaining onto it
        size INTEGER NOT NULL,     -- bytes of response and turn, for the size bound
        response BLOB NOT NULL,    -- the Response object
        turn BLOB NOT NULL         -- this request's input and the answer, as chat messages
    )
    """,
    "CREATE INDEX responses_touched ON responses (touched_at)",
)
# Responses an upstream created natively: which deployment holds each, and whose it is (a
# Principal.id). Only the ids: the responses themselves stay upstream.
_NATIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS native_responses (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    deployment TEXT NOT NULL,
    created_at INTEGER NOT NULL
)
"""
_BUSY_TIMEOUT_MS = 5000  # another worker process holding the write lock: wait, do not fail
MAX_CHAIN = 10_000  # chained responses read back for one request; the walk stops there


class BrokenChain(Exception):
    """A response chains onto one that was deleted or has expired (``missing``)."""

    def __init__(self, missing: str) -> None:
        super().__init__(missing)
        self.missing = missing


def owner_of(principal: Principal) -> str:
    """Who owns what ``principal`` stores: its credential's ``id``. A principal from a plugin
    that sets none falls back to its name, never to an owner shared by every such principal."""
    return principal.id or "name:" + principal.name


class StoreUnavailable(ProxyError):
    """The store could not be read or written (logged where it happened)."""

    status = 503
    default_code = "response_store_unavailable"
    caused_by_upstream = False  # the gateway's own trouble: no cooldown, no paid retry


class ResponseStore:
    """Responses kept by id, each readable only by the credential (``Principal.id``) that made it.

    Each row holds its own turn only (the request's input and the answer, as chat messages) and
    the id of the response it continues: the conversation is read back by walking that chain,
    so storage grows with each turn, not with the history. A response chained onto is touched,
    together with every response before it, so a chain expires (``ttl``) or is evicted (the
    oldest first, beyond ``max_bytes``) from its end, never from its middle.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float | None = None,
        max_bytes: int | None = None,
        cleanup_interval: float = 300.0,
        clock: Callable[[], float] = time.time,
        schedule: Schedule | None = None,
    ) -> None:
        self.path = str(path)
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.cleanup_interval = cleanup_interval
        self._clock = clock
        self._schedule = schedule  # None: the running loop's call_later
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._opening: asyncio.Future[None] | None = None
        # Between two cleanups only a timer waits, no task: the store holds no task while idle.
        self._timer: asyncio.Handle | None = None
        self._cleaning: asyncio.Future[None] | None = None
        self._closed = False

    def check(self) -> None:
        """Fail now, at start-up, if the database could not be opened for writing (its folder
        is made here).

        The database itself is opened by its first use: an app that never stores a response
        never loads SQLite (~1.2 MiB of RSS), starts the store's thread or creates the file.
        """
        if self._in_memory():
            return
        path = Path(self.path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
                raise PermissionError(f"the response store {path} is not a writable file")
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"the response store's folder {path.parent} is not writable")

    def start(self) -> None:
        """Start the periodic cleanup (expiry and size bound), off the request path."""
        if self._timer is None and (self.ttl is not None or self.max_bytes is not None):
            if self._schedule is None:
                self._schedule = asyncio.get_running_loop().call_later
            self._plan_cleanup()

    async def open(self) -> None:
        """Open (creating if need be) the database file and its table; done once, whoever
        asks first, and not undone if that caller is cancelled (the others still wait on it)."""
        if self._closed:
            raise RuntimeError("the response store is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aioproxy-store")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open_db)
        except BaseException:
            executor.shutdown(wait=False)
            self._opening = None  # a later call tries again (the file may be fixed by then)
            raise
        self._executor = executor

    async def close(self) -> None:
        self._closed = True
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        cleaning, self._cleaning = self._cleaning, None
        if cleaning is not None and not cleaning.done():
            with contextlib.suppress(Exception):
                await cleaning  # let a cleanup in flight finish its statement
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            with contextlib.suppress(Exception):
                await opening  # an open in flight: let it finish, then close what it opened
        executor, self._executor = self._executor, None
        if executor is None:
            return
        db, self._db = self._db, None
        try:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(executor, db.close)
        finally:
            executor.shutdown(wait=True)  # idle by now: returns at once

    async def save(
        self,
        response_id: str,
        owner: str,
        response: dict[str, Any],
        turn: list[dict[str, Any]],
        previous_id: str | None = None,
    ) -> None:
        """Keep ``response`` and its ``turn`` (this request's input and the answer, as chat
        messages), continuing ``previous_id``, which is touched with the chain before it."""
        encoded, encoded_turn = _encode(response), _encode(turn)
        row = (
            response_id,
            owner,
            previous_id,
            int(self._clock()),
            len(encoded) + len(encoded_turn),
            encoded,
            encoded_turn,
        )
        await self._run(self._save, row)

    async def get(
        self, response_id: str, owner: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The response and its whole conversation, or None if absent, expired or another
        owner's; raises BrokenChain if a response before it is gone."""
        found = await self._run(self._chain, response_id, owner, self._cutoff())
        if found is None:
            return None
        response, turns = found
        conversation = [m for turn in turns for m in _decoded(_decode_turn, response_id, turn)]
        return _decoded(_decode_response, response_id, response), conversation

    async def response(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The Response object alone (no walk of the chain), or None if absent, expired or
        another owner's."""
        row = await self._run(self._column, "response", response_id, owner, self._cutoff())
        return None if row is None else _decoded(_decode_response, response_id, row)

    async def input_messages(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The response's own input (not its chain's), as the chat messages the bridge sent,
        or None if absent, expired or another owner's (for ``input_items``)."""
        row = await self._run(self._column, "turn", response_id, owner, self._cutoff())
        if row is None:
            return None
        return _decoded(_decode_turn, response_id, row)[:-1]  # the last message is the answer

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete the response; False if absent or another owner's. Responses that chain onto
        it can no longer be chained onto (``get`` raises BrokenChain)."""
        return await self._run(self._delete, response_id, owner)

    async def cleanup(self) -> int:
        """Delete expired responses, then the least recently used beyond ``max_bytes``; the
        number deleted."""
        return await self._run(self._cleanup, self._cutoff(), self.max_bytes)

    def _plan_cleanup(self) -> None:
        if not self._closed and self._schedule is not None:
            self._timer = self._schedule(self.cleanup_interval, self._cleanup_due)

    def _cleanup_due(self) -> None:
        self._timer = None
        self._cleaning = asyncio.ensure_future(self._clean_then_plan())

    async def _clean_then_plan(self) -> None:
        try:
            if self._executor is None and (self._in_memory() or not Path(self.path).exists()):
                return  # nothing stored yet: do not load SQLite for nothing
            deleted = await self.cleanup()
            if deleted:
                log.info("response store: %d expired or evicted responses deleted", deleted)
        except StoreUnavailable:
            pass  # logged; the next run tries again
        finally:
            self._cleaning = None
            self._plan_cleanup()

    def _cutoff(self) -> int:
        """Rows touched before this are expired."""
        return int(self._clock() - self.ttl) if self.ttl is not None else -(2**62)

    def _in_memory(self) -> bool:
        return self.path == ":memory:" or self.path.startswith("file:")

    # -- on the worker thread ------------------------------------------------------------

    async def _run(self, fn: Callable[..., _R], *args: Any) -> _R:
        """``fn(*args)`` on the worker thread; a failure of the database is StoreUnavailable."""
        try:
            if self._executor is None:
                await self.open()  # the first use opens it
            if self._executor is None:  # closed meanwhile
                raise RuntimeError("the response store is closed")
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except BrokenChain:
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, OSError (the disk), closed
            raise _unavailable("The response store is unavailable", exc) from None

    def _open_db(self) -> None:
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if not self._in_memory():
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: each statement is its own transaction, so no lock outlives a call.
        import sqlite3  # here, not at the top: ~1 MiB of RSS that apps without the store never use

        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # Lets cleanup give freed pages back; takes effect only on a new file, so first.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps it consistent on a crash
            _migrate(db, self.path)
            db.execute(_NATIVE_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the response store is not open")
        return self._db

    def _save(self, row: tuple[Any, ...]) -> None:
        db = self._conn()
        _, owner, previous_id, now = row[:4]
        with _transaction(db):
            db.execute(
                "INSERT INTO responses (id, owner, previous_id, touched_at, size, response, turn)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if previous_id is not None:  # the chain lives as long as its newest response
                db.execute(
                    "WITH RECURSIVE chain(id, depth) AS (SELECT ?, 0 UNION ALL"
                    " SELECT r.previous_id, chain.depth + 1 FROM responses r JOIN chain"
                    " ON r.id = chain.id WHERE r.previous_id IS NOT NULL AND chain.depth < ?)"
                    " UPDATE responses SET touched_at = ?"
                    " WHERE id IN (SELECT id FROM chain) AND owner = ?",
                    (previous_id, MAX_CHAIN, now, owner),
                )

    def _column(self, column: str, response_id: str, owner: str, cutoff: int) -> bytes | None:
        """One column (``response`` or ``turn``) of one row."""
        row = (
            self._conn()
            .execute(
                f"SELECT {column} FROM responses WHERE id = ? AND owner = ? AND touched_at >= ?",
                (response_id, owner, cutoff),
            )
            .fetchone()
        )
        return None if row is None else row[0]

    def _chain(self, response_id: str, owner: str, cutoff: int) -> tuple[bytes, list[bytes]] | None:
        """The response and the turns of its chain, oldest first; a bounded walk, in one read
        transaction so that a concurrent delete cannot tear it."""
        db = self._conn()
        query = (
            "SELECT response, previous_id, turn FROM responses"
            " WHERE id = ? AND owner = ? AND touched_at >= ?"
        )
        with _transaction(db, "BEGIN"):
            row = db.execute(query, (response_id, owner, cutoff)).fetchone()
            if row is None:
                return None
            response, previous_id, turn = row
            turns = [turn]
            while previous_id is not None and len(turns) < MAX_CHAIN:
                row = db.execute(query, (previous_id, owner, cutoff)).fetchone()
                if row is None:
                    raise BrokenChain(previous_id)
                _, next_id, turn = row
                turns.append(turn)
                previous_id = next_id
        turns.reverse()
        return response, turns

    def _delete(self, response_id: str, owner: str) -> bool:
        cursor = self._conn().execute(
            "DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
        )
        return cursor.rowcount > 0

    # -- native responses: ids an upstream created, with their deployment and owner ------

    async def remember_native(self, response_id: str, deployment: str, principal: str) -> None:
        """Note that ``deployment`` (its key) created ``response_id`` for ``principal``."""
        row = (response_id, principal, deployment, int(self._clock()))
        await self._run(self._remember_native, row)

    async def lookup_native(self, response_id: str) -> tuple[str, str] | None:
        """The deployment key and owner of a natively created response, or None if unknown."""
        return await self._run(self._lookup_native, response_id)

    def _remember_native(self, row: tuple[str, str, str, int]) -> None:
        self._conn().execute(
            "INSERT OR REPLACE INTO native_responses (id, principal, deployment, created_at)"
            " VALUES (?, ?, ?, ?)",
            row,
        )

    def _lookup_native(self, response_id: str) -> tuple[str, str] | None:
        cursor = self._conn().execute(
            "SELECT deployment, principal FROM native_responses WHERE id = ?", (response_id,)
        )
        row: tuple[str, str] | None = cursor.fetchone()
        return row

    def _cleanup(self, cutoff: int, max_bytes: int | None) -> int:
        db = self._conn()
        deleted = db.execute("DELETE FROM responses WHERE touched_at < ?", (cutoff,)).rowcount
        # A native response's id is kept as long as a stored one would be.
        deleted += db.execute(
            "DELETE FROM native_responses WHERE created_at < ?", (cutoff,)
        ).rowcount
        if max_bytes is not None:
            # Keep the most recently touched while they fit; at equal times an earlier row
            # (one a later row may chain onto) is kept first, so no chain loses its middle.
            deleted += db.execute(
                "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM (SELECT rowid,"
                " SUM(size) OVER (ORDER BY touched_at DESC, rowid ASC) AS kept FROM responses)"
                " WHERE kept > ?)",
                (max_bytes,),
            ).rowcount
        if deleted:
            # Gives the freed pages back to the disk. executescript, as execute() would run one
            # step of it, which frees one page.
            db.executescript("PRAGMA incremental_vacuum")
        return deleted


def _decoded(decode: Callable[[bytes], _R], response_id: str, raw: bytes) -> _R:
    """``decode(raw)``; a row that cannot be read is StoreUnavailable (logged), not a 500."""
    try:
        return decode(raw)
    except msgspec.DecodeError as exc:
        raise _unavailable(f"The stored response '{response_id}' cannot be read", exc) from None


def _unavailable(what: str, exc: Exception) -> StoreUnavailable:
    """The client's error for a failure of the store; the cause goes to the log only."""
    log.error("%s: %r", what, exc)
    return StoreUnavailable(what)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Any:
    db.execute(begin)
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the file to ``_VERSION``, once, whichever worker process gets there first."""
    if db.execute("PRAGMA user_version").fetchone()[0] == _VERSION:
        return
    with _transaction(db):  # the write lock: another process migrating waits here
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == _VERSION:
            return
        if version > _VERSION:
            raise RuntimeError(
                f"the response store {path} was written by a newer aioproxy (schema {version})"
            )
        old = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'responses'"
        ).fetchone()
        if old is not None:
            count = db.execute("SELECT count(*) FROM responses").fetchone()[0]
            db.execute("DROP TABLE responses")
            log.warning(
                "response store %s: dropped %d responses of an older format, which were owned"
                " by key names rather than keys",
                path,
                count,
            )
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {_VERSION}")
