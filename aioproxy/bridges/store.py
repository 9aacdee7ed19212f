"""Stored Responses API answers, for ``previous_response_id`` and ``GET /v1/responses/{id}``.

They live in the control plane's database (``[database] url``: SQLite or PostgreSQL), in the
tables of ``aioproxy.control.store_tables``, which the database's migrations create. The store
uses the control plane's engine when the app has one, else opens its own on the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
    ) -> None:
        self.url = database if isinstance(database, str) else None
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.cleanup_interval = cleanup_interval
        self._clock = clock
        self._schedule = schedule  # None: the running loop's call_later
        self._engine: AsyncEngine | None = None if isinstance(database, str) else database
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
        from ..control.engine import open_engine  # Alembic: loaded only by a store of its own

        assert self.url is not None
        try:
            self._engine = await open_engine(self.url)
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

        async def save(connection: AsyncConnection) -> None:
            await connection.execute(_T.insert().values(row))
            if previous_id is not None:  # the chain lives as long as its newest response
                await connection.execute(_touch_chain(previous_id, owner, now))

        await self._run(save, write=True)

    async def get(
        self, response_id: str, owner: str, max_bytes: int | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The response and its whole conversation, or None if absent, expired or another
        owner's; raises BrokenChain if a response before it is gone, HistoryTooLarge if its
        turns come to more than ``max_bytes`` (counted before any is read)."""
        cutoff = self._cutoff()

        async def read(connection: AsyncConnection) -> tuple[bytes, list[bytes]] | None:
            return await _chain(connection, response_id, owner, cutoff, max_bytes)

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

        async def delete(connection: AsyncConnection) -> bool:
            return (await connection.execute(statement)).rowcount > 0

        return await self._run(delete, write=True)

    async def cleanup(self) -> int:
        """Delete expired responses, then the least recently used beyond ``max_bytes``; the
        number deleted."""
        cutoff, max_bytes = self._cutoff(), self.max_bytes

        async def cleanup(connection: AsyncConnection) -> int:
            deleted = (
                await connection.execute(_T.delete().where(_T.c.touched_at < cutoff))
            ).rowcount
            # A native response's id is kept as long as a stored one would be.
            deleted += (
                await connection.execute(_N.delete().where(_N.c.created_at < cutoff))
            ).rowcount
            if max_bytes is not None:
                deleted += (await connection.execute(_evict_beyond(max_bytes))).rowcount
            return deleted

        return await self._run(cleanup, write=True)

    # -- native responses: ids an upstream created, with their deployment and owner ------

    async def remember_native(self, response_id: str, deployment: str, principal: str) -> None:
        """Note that ``deployment`` (its key) created ``response_id`` for ``principal``."""
        row = {
            "id": response_id,
            "principal": principal,
            "deployment": deployment,
            "created_at": int(self._clock()),
        }

        async def remember(connection: AsyncConnection) -> None:
            insert = (postgresql if connection.dialect.name == "postgresql" else sqlite).insert
            statement = insert(_N).values(row)
            await connection.execute(
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

        async def lookup(connection: AsyncConnection) -> tuple[str, str] | None:
            row = (await connection.execute(statement)).first()
            return None if row is None else (row[0], row[1])

        return await self._run(lookup)

    # -- helpers -------------------------------------------------------------------------

    async def _column(self, column: sa.Column[bytes], response_id: str, owner: str) -> bytes | None:
        """One column (``response`` or ``turn``) of one live row."""
        statement = sa.select(column).where(
            _T.c.id == response_id, _T.c.owner == owner, _T.c.touched_at >= self._cutoff()
        )

        async def read(connection: AsyncConnection) -> bytes | None:
            raw: bytes | None = (await connection.execute(statement)).scalar()
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

    async def _run(
        self, fn: Callable[[AsyncConnection], Awaitable[_R]], *, write: bool = False
    ) -> _R:
        """``fn`` in one transaction (committed if ``write``); a failure of the database is
        StoreUnavailable."""
        try:
            if self._engine is None:
                await self.open()  # the first use opens it
            engine = self._engine
            if engine is None:  # closed meanwhile
                raise RuntimeError("the response store is closed")
            async with engine.connect() as connection, connection.begin() as transaction:
                result = await fn(connection)
                if not write:
                    await transaction.rollback()  # nothing to keep: ends the read at once
                return result
        except (BrokenChain, HistoryTooLarge):
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors, the disk, a closed store
            raise _unavailable("The response store is unavailable", exc) from None


def _touch_chain(previous_id: str, owner: str, now: int) -> sa.Update:
    """Set ``touched_at`` of ``previous_id`` and every response before it (one statement)."""
    older = _T.alias("older")
    chain = sa.select(
        sa.literal(previous_id, sa.Text).label("id"), sa.literal(0, sa.Integer).label("depth")
    ).cte("chain", recursive=True)
    chain = chain.union_all(
        sa.select(older.c.previous_id, chain.c.depth + 1).where(
            older.c.id == chain.c.id, older.c.previous_id.is_not(None), chain.c.depth < MAX_CHAIN
        )
    )
    return (
        _T.update()
        .where(_T.c.id.in_(sa.select(chain.c.id)), _T.c.owner == owner)
        .values(touched_at=now)
    )


def _evict_beyond(max_bytes: int) -> sa.Delete:
    """Keep the most recently touched while they fit; at equal times an earlier row (one a
    later row may chain onto) is kept first, so no chain loses its middle."""
    kept = sa.func.sum(_T.c.size).over(order_by=(_T.c.touched_at.desc(), _T.c.seq.asc()))
    running = sa.select(_T.c.seq, kept.label("kept")).subquery("running")
    return _T.delete().where(
        _T.c.seq.in_(sa.select(running.c.seq).where(running.c.kept > max_bytes))
    )


async def _chain(
    connection: AsyncConnection,
    response_id: str,
    owner: str,
    cutoff: int,
    max_bytes: int | None,
) -> tuple[bytes, list[bytes]] | None:
    """The response and the turns of its chain, oldest first: a bounded walk (``MAX_CHAIN``
    turns, ``max_bytes`` of them) of ids and sizes first, then the turns themselves."""
    live = (_T.c.owner == owner, _T.c.touched_at >= cutoff)
    links = (
        sa.select(
            _T.c.id,
            _T.c.previous_id,
            sa.func.length(_T.c.turn).label("size"),
            sa.literal(0, sa.Integer).label("depth"),
        )
        .where(_T.c.id == response_id, *live)
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
    walk = (
        await connection.execute(
            sa.select(links.c.id, links.c.previous_id, links.c.size).order_by(links.c.depth)
        )
    ).all()
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
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        rows = await connection.execute(
            sa.select(_T.c.id, _T.c.turn).where(_T.c.id.in_(chunk), *live)
        )
        turns.update((row[0], row[1]) for row in rows)
    response = (
        await connection.execute(sa.select(_T.c.response).where(_T.c.id == response_id, *live))
    ).scalar()
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
