"""Stored Responses API answers, for ``previous_response_id`` and ``GET /v1/responses/{id}``.

They live in the control plane's database (``[database] url``: SQLite or PostgreSQL), in the
tables of ``aioproxy.control.store_tables``, which the database's migrations create. The store
uses the control plane's engine when the app has one, else opens its own on the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..control.engine import (
    DEFAULT_STATEMENT_TIMEOUT,
    delete_oldest,
    dialect_insert,
    open_engine,
    tune_sqlite_connection,
)
from ..control.store_tables import native_responses, stored_responses
from ..errors import ProxyError

if TYPE_CHECKING:
    from ..context import Principal

__all__ = ["BrokenChain", "HistoryTooLarge", "ResponseStore", "StoreUnavailable", "owner_of"]

# How the store waits for its next cleanup: loop.call_later's signature (tests pass their own).
Schedule = Callable[[float, Callable[[], None]], asyncio.Handle]

_R = TypeVar("_R")  # what a store call returns

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(dict[str, Any]).decode
_decode_turn = msgspec.json.Decoder(list[dict[str, Any]]).decode

MAX_CHAIN = 10_000  # chained responses read back for one request; the walk stops there
_IDS_PER_QUERY = 500  # ids in one ``IN (...)``: well under SQLite's bound on parameters

# Rows a statement of the cleanup deletes at most (each its own transaction).
CLEANUP_BATCH = 10_000
_T = stored_responses
_N = native_responses


class BrokenChain(Exception):
    """A response chains onto one that was deleted or has expired (``missing``)."""

    def __init__(self, missing: str) -> None:
        super().__init__(missing)
        self.missing = missing


def owner_of(principal: Principal) -> str:
    """Who owns what ``principal`` stores: its credential's ``id``. A principal from a plugin
    that sets none falls back to its name, never to an owner shared by every such principal."""
    return principal.id or "name:" + principal.name


class HistoryTooLarge(Exception):
    """A chain's turns come to more than the bytes a caller would read back (``limit``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


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

    ``database`` is the control plane's engine (shared, not disposed here) or a database URL
    (``[database] url``; the store opens, migrates and disposes an engine of its own).
    """

    def __init__(
        self,
        database: str | AsyncEngine,
        *,
        ttl: float | None = None,
        max_bytes: int | None = None,
        cleanup_interval: float = 300.0,
        clock: Callable[[], float] = time.time,
        schedule: Schedule | None = None,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    ) -> None:
        self.url = database if isinstance(database, str) else None
        self.statement_timeout = statement_timeout  # of the engine it opens ([database]'s)
        self.cleanup_batch = CLEANUP_BATCH
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.cleanup_interval = cleanup_interval
        self._clock = clock
        self._schedule = schedule  # None: the running loop's call_later
        self._engine: AsyncEngine | None = None if isinstance(database, str) else database
        self._sqlite: _SQLiteThread | None = None  # on SQLite: the store's thread and connection
        self._opening: asyncio.Future[None] | None = None
        # Between two cleanups only a timer waits, no task: the store holds no task while idle.
        self._timer: asyncio.Handle | None = None
        self._cleaning: asyncio.Future[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the periodic cleanup (expiry and size bound), off the request path."""
        if self._timer is None and (self.ttl is not None or self.max_bytes is not None):
            if self._schedule is None:
                self._schedule = asyncio.get_running_loop().call_later
            self._plan_cleanup()

    async def open(self) -> None:
        """Open (and migrate) the database of a store given a URL; done once, whoever asks
        first, and not undone if that caller is cancelled (the others still wait on it).
        Raises ConfigError (naming ``[database] url``) when the database cannot be opened."""
        if self._closed:
            raise RuntimeError("the response store is closed")
        if self._engine is not None:
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        assert self.url is not None
        try:
            self._engine = await open_engine(self.url, self.statement_timeout)
        except BaseException:
            self._opening = None  # a later call tries again (the database may be up by then)
            raise

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
        sqlite_thread, self._sqlite = self._sqlite, None
        if sqlite_thread is not None:
            await sqlite_thread.close()
        if opening is not None and self._engine is not None:  # the store's own engine
            await self._engine.dispose()
        self._engine = None

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
        now = int(self._clock())
        row = {
            "id": response_id,
            "owner": owner,
            "previous_id": previous_id,
            "touched_at": now,
            "size": len(encoded) + len(encoded_turn),
            "response": encoded,
            "turn": encoded_turn,
        }

        def save(connection: sa.Connection) -> None:
            connection.execute(_INSERT, row)
            if previous_id is not None:  # the chain lives as long as its newest response
                touch = {"chain_start": previous_id, "chain_owner": owner, "touch_time": now}
                connection.execute(_TOUCH_CHAIN, touch)

        await self._run(save, write=True)

    async def get(
        self, response_id: str, owner: str, max_bytes: int | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The response and its whole conversation, or None if absent, expired or another
        owner's; raises BrokenChain if a response before it is gone, HistoryTooLarge if its
        turns come to more than ``max_bytes`` (counted before any is read)."""
        cutoff = self._cutoff()

        def read(connection: sa.Connection) -> tuple[bytes, list[bytes]] | None:
            return _chain(connection, response_id, owner, cutoff, max_bytes)

        found = await self._run(read)
        if found is None:
            return None
        response, turns = found
        conversation = [m for turn in turns for m in _decoded(_decode_turn, response_id, turn)]
        return _decoded(_decode_response, response_id, response), conversation

    async def response(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The Response object alone (no walk of the chain), or None if absent, expired or
        another owner's."""
        raw = await self._column(_T.c.response, response_id, owner)
        return None if raw is None else _decoded(_decode_response, response_id, raw)

    async def input_messages(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The response's own input (not its chain's), as the chat messages the bridge sent,
        or None if absent, expired or another owner's (for ``input_items``)."""
        raw = await self._column(_T.c.turn, response_id, owner)
        if raw is None:
            return None
        return _decoded(_decode_turn, response_id, raw)[:-1]  # the last message is the answer

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete the response; False if absent or another owner's. Responses that chain onto
        it can no longer be chained onto (``get`` raises BrokenChain)."""
        statement = _T.delete().where(_T.c.id == response_id, _T.c.owner == owner)

        def delete(connection: sa.Connection) -> bool:
            return connection.execute(statement).rowcount > 0

        return await self._run(delete, write=True)

    async def cleanup(self) -> int:
        """Delete expired responses, then the least recently used beyond ``max_bytes``; the
        number deleted. A ``cleanup_batch`` of rows a statement, each in a transaction of its
        own: a backlog (a long outage's expired responses) is never one statement past
        ``[database] statement_timeout``, failing each cleanup for good."""
        cutoff, most = self._cutoff(), self.cleanup_batch
        params: dict[str, Any] = {"cutoff": cutoff, "most": most, "max_bytes": self.max_bytes}
        # A native response's id is kept as long as a stored one would be.
        statements = [_EXPIRED, _EXPIRED_NATIVE] + ([_EVICT] if self.max_bytes is not None else [])
        deleted = 0
        for statement in statements:
            while True:
                count = await self._run(functools.partial(_rowcount, statement, params), write=True)
                deleted += count
                if count < most:
                    break
        return deleted

    # -- native responses: ids an upstream created, with their deployment and owner ------

    async def remember_native(self, response_id: str, deployment: str, principal: str) -> None:
        """Note that ``deployment`` (its key) created ``response_id`` for ``principal``."""
        row = {
            "id": response_id,
            "principal": principal,
            "deployment": deployment,
            "created_at": int(self._clock()),
        }

        def remember(connection: sa.Connection) -> None:
            statement = dialect_insert(connection.dialect.name)(_N).values(row)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[_N.c.id],
                    set_={
                        k: statement.excluded[k] for k in ("principal", "deployment", "created_at")
                    },
                )
            )

        await self._run(remember, write=True)

    async def lookup_native(self, response_id: str) -> tuple[str, str] | None:
        """The deployment key and owner of a natively created response, or None if unknown."""
        statement = sa.select(_N.c.deployment, _N.c.principal).where(_N.c.id == response_id)

        def lookup(connection: sa.Connection) -> tuple[str, str] | None:
            row = connection.execute(statement).first()
            return None if row is None else (row[0], row[1])

        return await self._run(lookup)

    # -- helpers -------------------------------------------------------------------------

    async def _column(self, column: sa.Column[bytes], response_id: str, owner: str) -> bytes | None:
        """One column (``response`` or ``turn``) of one live row."""
        statement = sa.select(column).where(
            _T.c.id == response_id, _T.c.owner == owner, _T.c.touched_at >= self._cutoff()
        )

        def read(connection: sa.Connection) -> bytes | None:
            raw: bytes | None = connection.execute(statement).scalar()
            return raw

        return await self._run(read)

    def _plan_cleanup(self) -> None:
        if not self._closed and self._schedule is not None:
            self._timer = self._schedule(self.cleanup_interval, self._cleanup_due)

    def _cleanup_due(self) -> None:
        self._timer = None
        self._cleaning = asyncio.ensure_future(self._clean_then_plan())

    async def _clean_then_plan(self) -> None:
        try:
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

    async def _run(self, fn: Callable[[sa.Connection], _R], *, write: bool = False) -> _R:
        """``fn`` in one transaction (committed if ``write``); a failure of the database is
        StoreUnavailable.

        On SQLite, ``fn`` runs whole on the store's one thread, on a connection of its own to
        the database file: one hop off the event loop per call, where the async driver would
        take several per statement. On PostgreSQL, on the engine's connection."""
        try:
            if self._engine is None:
                await self.open()  # the first use opens it
            engine = self._engine
            if engine is None:  # closed meanwhile
                raise RuntimeError("the response store is closed")
            if engine.dialect.name == "sqlite":
                if self._sqlite is None:
                    self._sqlite = _SQLiteThread(engine.url)
                return await self._sqlite.run(fn, write)
            async with engine.connect() as connection:
                return await connection.run_sync(_in_transaction, fn, write)
        except (BrokenChain, HistoryTooLarge):
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors, the disk, a closed store
            raise _unavailable("The response store is unavailable", exc) from None


def _in_transaction(
    connection: sa.Connection, fn: Callable[[sa.Connection], _R], write: bool
) -> _R:
    with connection.begin() as transaction:
        result = fn(connection)
        if not write:
            transaction.rollback()  # nothing to keep: ends the read at once
        return result


class _SQLiteThread:
    """A synchronous engine on the SQLite file the async engine opened, used from one thread."""

    def __init__(self, url: sa.URL) -> None:
        self._engine = sa.create_engine(
            url.set(drivername="sqlite+pysqlite"), poolclass=sa.pool.SingletonThreadPool
        )
        # The file is in WAL mode already (the control plane's engine set it).
        sa.event.listen(
            self._engine, "connect", lambda dbapi, _record: tune_sqlite_connection(dbapi)
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aioproxy-store")

    async def run(self, fn: Callable[[sa.Connection], _R], write: bool) -> _R:
        def call() -> _R:
            with self._engine.connect() as connection:
                return _in_transaction(connection, fn, write)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)  # idle by now: returns at once


def _touch_chain() -> sa.Update:
    """Set ``touched_at`` of ``previous_id`` and every response before it (one statement)."""
    older = _T.alias("older")
    chain = sa.select(
        sa.bindparam("chain_start", type_=sa.Text).label("id"),
        sa.literal(0, sa.Integer).label("depth"),
    ).cte("chain", recursive=True)
    chain = chain.union_all(
        sa.select(older.c.previous_id, chain.c.depth + 1).where(
            older.c.id == chain.c.id, older.c.previous_id.is_not(None), chain.c.depth < MAX_CHAIN
        )
    )
    return (
        _T.update()
        .where(_T.c.id.in_(sa.select(chain.c.id)), _T.c.owner == sa.bindparam("chain_owner"))
        .values(touched_at=sa.bindparam("touch_time"))
    )


def _rowcount(statement: sa.Delete, params: dict[str, Any], connection: sa.Connection) -> int:
    """The rows ``statement`` deleted (with ``params``) on ``connection``."""
    return int(connection.execute(statement, params).rowcount)


def _evict() -> sa.Delete:
    """Keep the most recently touched while they fit (``max_bytes``); at equal times an earlier
    row (one a later row may chain onto) is kept first, so no chain loses its middle. At most
    ``most`` rows, those kept least first: what a newer row keeps of the bound does not move
    when an older one goes, so the next batch finds the rest."""
    kept = sa.func.sum(_T.c.size).over(order_by=(_T.c.touched_at.desc(), _T.c.seq.asc()))
    running = sa.select(_T.c.seq, kept.label("kept")).subquery("running")
    over = (
        sa.select(running.c.seq)
        .where(running.c.kept > sa.bindparam("max_bytes"))
        .order_by(running.c.kept.desc())
        .limit(sa.bindparam("most"))
    )
    return _T.delete().where(_T.c.seq.in_(over.scalar_subquery()))


def _links() -> sa.Select[Any]:
    """The ids, previous ids and turn sizes of ``response_id``'s chain, newest first, at most
    ``MAX_CHAIN``: the walk reads no turn."""
    owner = sa.bindparam("owner", type_=sa.Text)
    cutoff = sa.bindparam("cutoff", type_=sa.BigInteger)
    links = (
        sa.select(
            _T.c.id,
            _T.c.previous_id,
            sa.func.length(_T.c.turn).label("size"),
            sa.literal(0, sa.Integer).label("depth"),
        )
        .where(
            _T.c.id == sa.bindparam("response_id"), _T.c.owner == owner, _T.c.touched_at >= cutoff
        )
        .cte("links", recursive=True)
    )
    older = _T.alias("older")
    links = links.union_all(
        sa.select(
            older.c.id, older.c.previous_id, sa.func.length(older.c.turn), links.c.depth + 1
        ).where(
            older.c.id == links.c.previous_id,
            older.c.owner == owner,
            older.c.touched_at >= cutoff,
            links.c.depth < MAX_CHAIN - 1,
        )
    )
    return sa.select(links.c.id, links.c.previous_id, links.c.size).order_by(links.c.depth)


# The turns of some of a chain's ``ids``, and the Response object of ``response_id`` alone.
_TURNS = sa.select(
    _T.c.id,
    _T.c.turn,
    sa.case((_T.c.id == sa.bindparam("response_id"), _T.c.response), else_=sa.null()),
).where(
    _T.c.id.in_(sa.bindparam("ids", expanding=True)),
    _T.c.owner == sa.bindparam("owner"),
    _T.c.touched_at >= sa.bindparam("cutoff"),
)
# Built once: SQLAlchemy caches their SQL, and nothing is rebuilt per call.
_INSERT = _T.insert()
_TOUCH_CHAIN = _touch_chain()
_EVICT = _evict()
_EXPIRED = delete_oldest(_T, _T.c.seq, _T.c.touched_at)
_EXPIRED_NATIVE = delete_oldest(_N, _N.c.id, _N.c.created_at)
_LINKS = _links()


def _chain(
    connection: sa.Connection,
    response_id: str,
    owner: str,
    cutoff: int,
    max_bytes: int | None,
) -> tuple[bytes, list[bytes]] | None:
    """The response and the turns of its chain, oldest first: a bounded walk (``MAX_CHAIN``
    turns, ``max_bytes`` of them) of ids and sizes first, then the turns themselves."""
    params = {"response_id": response_id, "owner": owner, "cutoff": cutoff}
    walk: list[tuple[str, str | None, int]] = [
        (row[0], row[1], row[2]) for row in connection.execute(_LINKS, params)
    ]
    if not walk:
        return None
    size = 0
    for _, _, turn_size in walk:
        if max_bytes is not None and size > max_bytes:
            raise HistoryTooLarge(max_bytes)
        size += turn_size
    if max_bytes is not None and size > max_bytes:
        raise HistoryTooLarge(max_bytes)
    missing = walk[-1][1]
    if missing is not None and len(walk) < MAX_CHAIN:
        raise BrokenChain(missing)
    ids = [row[0] for row in walk]
    turns: dict[str, bytes] = {}
    response: bytes | None = None
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = {**params, "ids": ids[start : start + _IDS_PER_QUERY]}
        for link, turn, its_response in connection.execute(_TURNS, chunk):
            turns[link] = turn
            response = its_response if link == response_id else response
    for link in ids:  # deleted between the walk and the read
        if link not in turns:
            raise BrokenChain(link)
    if response is None:
        return None
    return response, [turns[link] for link in reversed(ids)]


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
