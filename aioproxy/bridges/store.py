"""Stored Responses API answers, for ``previous_response_id`` and ``GET /v1/responses/{id}``.

SQLite in WAL mode, so that several worker processes can share one file. Every query runs on the
store's single worker thread: the event loop never waits on the disk, and the one connection is
only ever used from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import sqlite3

__all__ = ["ResponseStore"]


_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(dict[str, Any]).decode
_decode_conversation = msgspec.json.Decoder(list[dict[str, Any]]).decode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response BLOB NOT NULL,
    conversation BLOB NOT NULL
)
"""
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


class ResponseStore:
    """Responses kept by id, each readable only by the principal that created it.

    ``conversation`` is the whole exchange up to and including the response, as chat messages
    (the previous responses' already flattened in), so chaining never walks a list of ids.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closed = False

    def check(self) -> None:
        """Fail now, at start-up, if the database could not be opened for writing (its folder
        is made here).

        The database itself is opened by its first use: an app that never stores a response
        never loads SQLite (~1.2 MiB of RSS), starts the store's thread or creates the file.
        """
        if self.path == ":memory:" or self.path.startswith("file:"):
            return
        path = Path(self.path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
                raise PermissionError(f"the response store {path} is not a writable file")
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"the response store's folder {path.parent} is not writable")

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
        principal: str,
        response: dict[str, Any],
        conversation: list[dict[str, Any]],
    ) -> None:
        row = (
            response_id,
            principal,
            int(time.time()),
            _encode(response),
            _encode(conversation),
        )
        await self._run(self._save, row)

    async def get(
        self, response_id: str, principal: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The response and its conversation, or None if absent or another principal's."""
        row = await self._run(self._get, response_id, principal)
        if row is None:
            return None
        return _decode_response(row[0]), _decode_conversation(row[1])

    async def delete(self, response_id: str, principal: str) -> bool:
        """Delete the response; False if absent or another principal's."""
        return await self._run(self._delete, response_id, principal)

    # -- on the worker thread ------------------------------------------------------------

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            await self.open()  # the first use opens it
        if self._executor is None:  # closed meanwhile
            raise RuntimeError("the response store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open_db(self) -> None:
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not self.path.startswith("file:"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: each statement is its own transaction, so no lock outlives a call.
        import sqlite3  # here, not at the top: ~1 MiB of RSS that apps without the store never use

        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL keeps it consistent on a crash
            db.execute(_SCHEMA)
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
        self._conn().execute(
            "INSERT OR REPLACE INTO responses (id, principal, created_at, response, conversation)"
            " VALUES (?, ?, ?, ?, ?)",
            row,
        )

    def _get(self, response_id: str, principal: str) -> tuple[bytes, bytes] | None:
        cursor = self._conn().execute(
            "SELECT response, conversation FROM responses WHERE id = ? AND principal = ?",
            (response_id, principal),
        )
        return cursor.fetchone()

    def _delete(self, response_id: str, principal: str) -> bool:
        cursor = self._conn().execute(
            "DELETE FROM responses WHERE id = ? AND principal = ?", (response_id, principal)
        )
        return cursor.rowcount > 0


    # -- native responses: ids an upstream created, with their deployment and owner ------

    async def remember_native(self, response_id: str, deployment: str, principal: str) -> None:
        """Note that ``deployment`` (its key) created ``response_id`` for ``principal``."""
        row = (response_id, principal, deployment, int(time.time()))
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
        return cursor.fetchone()
