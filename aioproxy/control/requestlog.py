"""The request log and spend writer: finished requests queued on the request path (references
only), turned into rows and written in batches by a background task, so a request never waits
for the database nor pays for its row.

Each batch is one transaction: the log rows plus each key's and team's added spend, so a batch
that fails is retried whole and nothing is counted twice. While the database is unreachable the
rows wait in a bounded buffer; past ``[spend] buffer_rows`` the oldest are dropped, counted and
logged. A batch the database refuses for its data (a value it cannot store), not for being
unreachable, is written row by row: a refused row is dropped, counted and logged, and its spend
still written, so one bad row never holds the log up. Stopping writes what is left (graceful
shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..config import SpendConfig
from . import rollup, schema
from .cache import KeyCache
from .engine import CLOSE_WAIT, delete_oldest, driver_message

__all__ = ["LogRecord", "RequestLog"]

log = logging.getLogger("aioproxy")

_RETRY_MAX = 30.0  # seconds between two tries at most, while the database is down
_RETENTION_EVERY = 3600.0  # seconds between two deletions of rows past retention
# Rows past retention one delete removes at most, one delete a turn of the writer: a day's log
# of a busy gateway (millions of rows) deleted at once held the writer for minutes and failed
# [database] statement_timeout for ever; a batch takes a fraction of a second.
EXPIRED_A_TURN = 10_000
# What a database raises for a row it cannot store (too long, a NUL, a constraint), rather than
# for being unreachable or busy: retrying the batch whole would fail for ever.
_REFUSED_DATA = (sa.exc.DataError, sa.exc.IntegrityError)


class LogRecord(NamedTuple):
    """One request: its row's values (``schema.REQUEST_COLUMNS``' order), and who pays what
    in which budget periods. A named tuple: rows.RowBuilder makes one a row in C, where a
    dataclass ran a Python ``__init__`` (with keywords: ~3 kIr a row)."""

    values: tuple[Any, ...]
    key_id: str | None
    team_id: str | None
    time: float
    cost: float
    key_period: float | None = None
    team_period: float | None = None
    spend_only: bool = False  # the log is off: only the spend is written
    counted: bool = False  # its cost is in its key's and team's meters (the limits plugin's)

    @classmethod
    def of(cls, row: dict[str, Any], cost: float = 0.0) -> LogRecord:
        """From a row as a dict (by column name)."""
        values = tuple(row.get(name) for name in schema.REQUEST_COLUMNS)
        return cls(values, row["key_id"], row["team_id"], row["time"], cost)


_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
# Rows an INSERT statement carries: the driver binds the same parameters, but SQLite steps (and
# its thread hands the GIL back and forth) once a statement, not once a row. 40 rows of 24
# columns is 960 parameters, well within both databases' limits.
ROWS_A_STATEMENT = 40
# A record's payers (key_id, team_id, key_period, team_period, counted), its time and its cost,
# as ``LogRecord``'s fields are ordered: read in C by the writer.
_PAYERS = operator.itemgetter(1, 2, 5, 6, 8)
_TIME = operator.itemgetter(3)
_COST = operator.itemgetter(4)


def insert_sql(paramstyle: str, rows: int = 1) -> str:
    """The request log's INSERT of ``rows`` rows, in the driver's own parameter style."""

    def mark(i: int) -> str:
        if paramstyle == "numeric_dollar":
            return f"${i}"
        if paramstyle == "numeric":
            return f":{i}"
        return _MARKS[paramstyle]

    columns = schema.REQUEST_COLUMNS
    width = len(columns)
    values = ", ".join(
        "(" + ", ".join(mark(row * width + i) for i in range(1, width + 1)) + ")"
        for row in range(rows)
    )
    return f"INSERT INTO requests ({', '.join(columns)}) VALUES {values}"


async def insert_rows(
    connection: AsyncConnection, statements: tuple[str, str], rows: list[tuple[Any, ...]]
) -> None:
    """Insert request log rows: ``ROWS_A_STATEMENT`` at a time by ``statements[1]``, the rest
    one at a time by ``statements[0]``."""
    single, many = statements
    whole = len(rows) - len(rows) % ROWS_A_STATEMENT
    if whole:
        await connection.exec_driver_sql(
            many,
            [_flattened(rows, i, i + ROWS_A_STATEMENT) for i in range(0, whole, ROWS_A_STATEMENT)],
        )
    if whole < len(rows):
        await connection.exec_driver_sql(single, rows[whole:])


def _flattened(rows: list[tuple[Any, ...]], start: int, stop: int) -> tuple[Any, ...]:
    """The values of ``rows[start:stop]`` in one tuple: one statement's parameters. A list
    extended a row at a time copies each row in C; ``tuple(chain(...))`` took a call a value
    and regrew its tuple (~2 kIr a row against ~1)."""
    flat: list[Any] = []
    extend = flat.extend
    for row in rows[start:stop]:
        extend(row)
    return tuple(flat)


class RequestLog:
    def __init__(
        self,
        engine: AsyncEngine,
        cache: KeyCache,
        settings: SpendConfig,
        now: Any = time.time,
        build: Callable[[Any], LogRecord] | None = None,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.settings = settings
        self.now = now
        self.buffer: collections.deque[LogRecord] = collections.deque()
        # Finished requests not yet made rows (``build``, e.g. rows.RowBuilder, makes them).
        self.finished: list[Any] = []
        self.build = build
        self.dropped = 0  # rows lost to a full buffer, since the start
        self.refused = 0  # rows the database refused (their spend written without them)
        self.written = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_retention = 0.0
        self._expiring = False  # a deletion of rows past retention under way (more to delete)
        self.expired_a_turn = EXPIRED_A_TURN
        paramstyle = engine.dialect.paramstyle
        self._inserts = (insert_sql(paramstyle), insert_sql(paramstyle, ROWS_A_STATEMENT))

    def add_finished(self, finished: Any) -> None:
        """Queue a finished request (no work: its row is built in the writer's batch)."""
        queue = self.finished
        queue.append(finished)
        if len(queue) >= self.settings.batch_size:
            self._wake.set()

    def _build_rows(self) -> None:
        """Turn the finished requests into rows; one that cannot be is logged and skipped."""
        finished, self.finished = self.finished, []
        build = self.build
        if build is None or not finished:
            return
        records: list[LogRecord] = []
        append = records.append
        for item in finished:
            try:
                append(build(item))
            except Exception:
                log.exception("request log: cannot make a request's row")
        self._queue(records)

    def add(self, record: LogRecord) -> None:
        """Queue a row (no I/O). A full buffer drops its oldest row, counted."""
        self._queue((record,))

    def _queue(self, records: Sequence[LogRecord]) -> None:
        """Queue rows, a batch at a time (no I/O). A full buffer drops its oldest rows, counted."""
        buffer = self.buffer
        buffer.extend(records)
        over = len(buffer) - self.settings.buffer_rows
        if over > 0:
            for _ in range(over):
                buffer.popleft()
            before, self.dropped = self.dropped, self.dropped + over
            # Logged at the first drop and at each thousand (not once a row).
            if before == 0 or before // 1000 != self.dropped // 1000:
                log.error(
                    "request log: buffer full (database unreachable?): %d rows dropped so far",
                    self.dropped,
                )
        if len(buffer) >= self.settings.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="aioproxy request log")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the writer once it has written what is queued (graceful shutdown). It is not
        cancelled mid-write while the database answers: a cut COMMIT the server then made
        would count its rows as not written. ``timeout`` (None: none): when a write has moved
        nothing on for that long (a server gone silent, a COMMIT stalled, which no bound of
        the server's ends), it is cancelled and what it held is reported not written."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wake.set()
            if timeout is None:
                await task
            else:
                await self._stop_within(task, timeout)
        self._build_rows()  # requests the writer had yet to make rows of: counted below
        if self.buffer:
            log.error("request log: %d rows not written at shutdown", len(self.buffer))
        if self.dropped:
            log.error("request log: %d rows were dropped in all", self.dropped)
        if self.refused:
            log.error("request log: the database refused %d rows in all", self.refused)

    async def _stop_within(self, task: asyncio.Task[None], timeout: float) -> None:
        """Wait for the stopping writer while each ``timeout`` sees it write something (a
        backlog after an outage takes as long as it takes), else abandon its write."""
        written = -1
        while self.written != written:
            written = self.written
            if (await asyncio.wait({task}, timeout=timeout))[0]:
                task.result()  # a failure of its own is raised, as when awaited
                return
        log.error(
            "request log: the database did not answer within %g s at shutdown: "
            "its write was abandoned",
            timeout,
        )
        task.cancel()
        # Its rollback may wait on the silent server too: not for long.
        if not (await asyncio.wait({task}, timeout=CLOSE_WAIT))[0]:
            log.error("request log: its writer still runs %g s after it was cancelled", CLOSE_WAIT)

    async def flush_shielded(self) -> None:
        """``flush`` for a reader of the log (the admin API, the dashboard): its caller's
        cancellation (a client gone, a shutdown's) does not cut the write, which goes on to its
        end. Cut mid-COMMIT, a write the server made anyway would stay queued, written again."""
        await asyncio.shield(self.flush())

    async def _run(self) -> None:
        delay = self.settings.flush_interval
        tries_left = 2  # once stopping: a database that is down is not waited for
        while True:
            if not self._stopping:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                await self.flush()
                if not self._stopping:  # a shutdown's turns write, they delete nothing
                    await self._expire()
                delay = self.settings.flush_interval
            except Exception as exc:  # noqa: BLE001 - any driver error: kept and retried
                delay = min(max(delay * 2, 1.0), _RETRY_MAX)
                if self._stopping:
                    tries_left -= 1
                    then = "at shutdown: " + ("trying once more" if tries_left else "giving up")
                else:
                    then = f"retrying in {delay:.0f} s"
                log.warning(
                    "request log: cannot write %d rows (%s): %s",
                    len(self.buffer),
                    then,
                    driver_message(exc),
                )
            if self._stopping and (not self.buffer or tries_left == 0):
                return

    async def flush(self) -> None:
        """Write the queued rows now, batch by batch; on failure the batch stays queued.
        One flush at a time (the writer's, the admin API's), so no batch is written twice."""
        async with self._flushing:
            self._build_rows()  # even while the database is down: rows hold no request
            # The rows queued now, not those that come meanwhile: under steady traffic a flush
            # would never end, writing a few rows at a time.
            left = len(self.buffer)
            while left > 0 and self.buffer:
                size = min(len(self.buffer), left, self.settings.batch_size)
                left -= size
                batch = list(itertools.islice(self.buffer, size))  # no deque index walk a row
                try:
                    await self._write(batch)
                except _REFUSED_DATA:
                    await self._write_apart(batch)
                for record in batch:  # unless a full buffer dropped it meanwhile (the oldest)
                    if self.buffer and self.buffer[0] is record:
                        self.buffer.popleft()
                self.written += len(batch)

    async def _write_apart(self, batch: list[LogRecord]) -> None:
        """A refused batch, one record at a time: a row the database refuses again is dropped
        (counted, logged) and its record written without it, so its spend still counts. Each
        record leaves the buffer once written: should the database go away midway, the retry
        writes only the rest, none twice."""
        for record in batch:
            try:
                await self._write([record])
            except _REFUSED_DATA as exc:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.error(
                        "request log: the database refused a row (%d so far), written without "
                        "it: %s",
                        self.refused,
                        driver_message(exc),
                    )
                if not record.spend_only:
                    try:
                        await self._write([record._replace(spend_only=True)])
                    except _REFUSED_DATA as again:
                        log.error(
                            "request log: a refused row's spend was refused too: %s",
                            driver_message(again),
                        )
            if self.buffer and self.buffer[0] is record:
                self.buffer.popleft()

    async def _write(self, batch: list[LogRecord]) -> None:
        rows = [record.values for record in batch if not record.spend_only]
        keys: dict[tuple[str, float | None], float] = collections.defaultdict(float)
        teams: dict[tuple[str, float | None], float] = collections.defaultdict(float)
        # The part of it the meters counted locally (limited keys and teams).
        keys_counted: dict[tuple[str, float | None], float] = collections.defaultdict(float)
        teams_counted: dict[tuple[str, float | None], float] = collections.defaultdict(float)
        used: dict[str, float] = {}
        cached_keys, cached_teams = self.cache.keys, self.cache.teams
        # Per run of records with the same payers (a batch is mostly runs of one key's), their
        # cost summed and their last use found in C: no Python work a record (~50 bytecodes).
        for payers, run in itertools.groupby(batch, _PAYERS):
            key_id, team_id, key_period, team_period, counted = payers
            records = list(run)
            cost = sum(map(_COST, records))
            if key_id is not None and key_id in cached_keys:
                when, last = max(map(_TIME, records)), used.get(key_id)
                if last is None or last < when:
                    used[key_id] = when
                if cost:
                    keys[(key_id, key_period)] += cost
                    if counted:
                        keys_counted[(key_id, key_period)] += cost
            if cost and team_id is not None and team_id in cached_teams:
                teams[(team_id, team_period)] += cost
                if counted:
                    teams_counted[(team_id, team_period)] += cost
        async with self.cache.lock:  # the cache's spend figures and local counts move together
            async with self.engine.begin() as connection:
                if rows:
                    await insert_rows(connection, self._inserts, rows)
                    await rollup.add_rows(connection, rows)
                if used or teams:  # each key spent in is in ``used``
                    await self._add_figures(connection, keys, teams, used)
            for key_id, when in used.items():
                if (entry := self.cache.keys.get(key_id)) is not None:
                    entry.last_used_at = max(entry.last_used_at or 0.0, when)
            self._written(keys, keys_counted, self.cache.keys, self.cache.key_meters)
            self._written(teams, teams_counted, self.cache.teams, self.cache.team_meters)

    async def _add_figures(
        self,
        connection: AsyncConnection,
        keys: dict[tuple[str, float | None], float],
        teams: dict[tuple[str, float | None], float],
        used: dict[str, float],
    ) -> None:
        """Add the spend to keys and teams, and the keys' last use, marked for the other
        instances' polls (marks.py)."""
        mark = await self.cache.marks.take(connection)
        for (key_id, period), cost in keys.items():
            # A key that spent is in ``used``: its last use goes in the same update.
            figures = {"row_id": key_id, "period": period, "cost": cost, "used": used[key_id]}
            await connection.execute(_spend_update(schema.keys, period is not None, mark), figures)
        for (team_id, period), cost in teams.items():
            figures = {"row_id": team_id, "period": period, "cost": cost}
            await connection.execute(_spend_update(schema.teams, period is not None, mark), figures)
        spent = {key_id for key_id, _ in keys}
        for key_id, when in used.items():
            if key_id not in spent:  # used at no cost: its last use alone
                await connection.execute(_use_update(mark), {"row_id": key_id, "used": when})

    @staticmethod
    def _written(
        spent: dict[tuple[str, float | None], float],
        counted: dict[tuple[str, float | None], float],
        entries: dict[str, Any],
        meters: dict[str, Any],
    ) -> None:
        """The spend just written goes into the cached figures, and what the meters counted of
        it leaves their local counts."""
        for (id_, period), cost in spent.items():
            entry = entries.get(id_)
            if entry is None:
                continue
            if entry.budget_resets_at == period:
                entry.spend += cost
            elif period is not None and (entry.budget_resets_at or 0) < period:
                entry.budget_resets_at, entry.spend = period, cost
            entry.total_spend += cost
        for (id_, period), cost in counted.items():
            if (meter := meters.get(id_)) is not None:
                meter.written(cost, period)

    async def _expire(self) -> None:
        """Delete the rows past retention, the oldest ``expired_a_turn`` a turn of the writer
        (between its writes) until none is left, then the roll-up's days past it."""
        days = self.settings.retention_days
        now = self.now()
        if days is None or (not self._expiring and now - self._last_retention < _RETENTION_EVERY):
            return
        # At whole UTC days (up to a day more than ``retention_days``), the roll-up's days
        # with them: whole-day spend then equals the rows' however old the range (the roll-up
        # keeps its days until their last rows are gone).
        cutoff = rollup.day_start(now - days * rollup.DAY)
        # At least a batch of writes (batch_size may be larger): retention keeps up with a
        # log that grows by a batch a turn or more.
        most = max(self.expired_a_turn, self.settings.batch_size)
        try:
            async with self.engine.begin() as connection:
                bound = {"cutoff": cutoff, "most": most}
                deleted = (await connection.execute(_EXPIRED_ROWS, bound)).rowcount
                if deleted < most:
                    # Unless another instance's deletion still has rows to go (its batches and
                    # this one's can overlap): the roll-up keeps a day as long as its rows.
                    await connection.execute(
                        _EXPIRED_DAYS, {"cutoff": cutoff, "day": rollup.date_of(cutoff)}
                    )
        except Exception as exc:  # noqa: BLE001 - the log's writes go on; tried again later
            log.warning(
                "request log: cannot delete the rows past retention (trying again in %.0f s): %s",
                _RETENTION_EVERY,
                driver_message(exc),
            )
            self._expiring, self._last_retention = False, now
            return
        self._expiring = deleted >= most
        if not self._expiring:
            self._last_retention = now


# Retention's statements, made once (``_expire``): a batch of the oldest rows past it, then
# the roll-up's days past it once none of their rows is left.
_EXPIRED_ROWS = delete_oldest(schema.requests, schema.requests.c.seq, schema.requests.c.time)
_EXPIRED_DAYS = schema.spend_days.delete().where(
    schema.spend_days.c.day < sa.bindparam("day"),
    ~sa.exists().where(schema.requests.c.time < sa.bindparam("cutoff")),
)

# An update's values, bound per row (each statement is made once: SQLAlchemy then builds no
# expression per batch, and finds the statement's compiled form in its cache by identity).
_BOUND_ID = sa.bindparam("row_id", type_=sa.String)
_BOUND_PERIOD = sa.bindparam("period", type_=sa.Float)
_BOUND_COST = sa.bindparam("cost", type_=sa.Float)
_BOUND_USED = sa.bindparam("used", type_=sa.Float)


@functools.lru_cache(maxsize=64)  # per table, kind and mark (one mark per database's cache)
def _spend_update(table: sa.Table, periodic: bool, mark: sa.ColumnElement[int]) -> sa.Update:
    """Add ``cost`` to the spend of budget period ``period`` (``periodic``: one that has begun
    since the stored one starts from ``cost``; a late row of an older period counts in
    total_spend only), and set the row's figures ``mark`` (a key's: its last use too)."""
    update = sa.update(table).where(table.c.id == _BOUND_ID).values(figures_mark=mark)
    if table is schema.keys:
        update = update.values(last_used_at=_BOUND_USED)
    if not periodic:
        return update.values(
            spend=table.c.spend + _BOUND_COST, total_spend=table.c.total_spend + _BOUND_COST
        )
    stored = table.c.budget_resets_at
    newer = sa.or_(stored.is_(None), stored < _BOUND_PERIOD)
    return update.values(
        spend=sa.case(
            (stored == _BOUND_PERIOD, table.c.spend + _BOUND_COST),
            (newer, _BOUND_COST),
            else_=table.c.spend,
        ),
        budget_resets_at=sa.case((newer, _BOUND_PERIOD), else_=stored),
        total_spend=table.c.total_spend + _BOUND_COST,
    )


@functools.lru_cache(maxsize=16)
def _use_update(mark: sa.ColumnElement[int]) -> sa.Update:
    """A key's last use alone (used at no cost), with its figures ``mark``."""
    keys = schema.keys
    return (
        keys.update()
        .where(keys.c.id == _BOUND_ID)
        .values(last_used_at=_BOUND_USED, figures_mark=mark)
    )
