"""Figures marks: which keys' and teams' spend figures moved since a poll last read them.

The request log's writer sets ``figures_mark`` on every key and team row whose spend or
``last_used_at`` it moves; the key cache's poll reads only the rows marked above what it has
seen (an indexed range, empty when nothing moved) instead of every row. A mark must never let
an update slip past a poll: one committed after the poll that a smaller mark would place
before it (a plain ``updated_at``, or a sequence value taken before its transaction commits,
both can) would be missed for good, and a budget no longer enforced across instances.

What each database guarantees decides the mark:

* **PostgreSQL** (several instances writing at once): the mark is the writer's transaction id
  (``pg_current_xact_id()``, 64 bits, never wraps). The poll notes its snapshot's ``xmin``, the
  oldest transaction still running: every transaction below it has ended, committed and visible
  or rolled back. The next poll reads rows marked at or above the ``xmin`` noted before, so a
  transaction running at one poll, however late it commits, is read by a later one. No lock
  is shared: writers wait for each other no more than they did. The price: a long transaction
  anywhere on the cluster holds ``xmin`` back, and the polls meanwhile re-read the rows marked
  since (more rows read, none missed); so does a database restored into another cluster, whose
  transaction ids start lower, for the rows marked before until they are written again. Chosen
  over a counter row that writers update under its lock (each instance's writer would wait
  for the others' commits) and over a lookback window (safe only for transactions shorter
  than the window, and every row written within it read again at each poll).
* **SQLite** (one writer at a time, processes or ``--workers`` sharing the file): the mark is a
  counter (``control_state.figures_mark``) that each writing transaction moves before it marks
  its rows: the file's write lock orders the transactions, so the counters commit in order, and
  a poll that read the counter at ``n`` has seen every write marked up to ``n``. A counter that
  did not move means nothing moved: the poll reads no row at all.

Admin API changes move the change watermark instead (``control_state.version``): a full reload,
which notes the mark before it reads the rows. Rows an older release writes (during a rolling
upgrade) are not marked: their spend is read at the next reload.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema

__all__ = ["Marks"]

_state = schema.state.c


def _as_bigint(xid: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """A PostgreSQL ``xid8`` as a bigint (no direct cast exists; text holds its decimal)."""
    return sa.cast(sa.cast(xid, sa.Text), sa.BigInteger)


class Marks:
    """One database's marks: what a writer sets, and the mark a poll has seen up to."""

    def __init__(self, dialect: str) -> None:
        # SQLite's counter: a mark that did not move means nothing moved.
        self.counter = dialect == "sqlite"
        # Every write marked at or below it is visible to the rows read after it.
        seen: sa.ColumnElement[int]
        if self.counter:
            seen = _state.figures_mark
            self._written: sa.ColumnElement[int] = sa.select(_state.figures_mark).scalar_subquery()
        else:
            seen = _as_bigint(sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot())) - 1
            self._written = _as_bigint(sa.func.pg_current_xact_id())
        # The poll's first read: the change watermark and the mark, in one statement.
        self.head = sa.select(_state.version, seen.label("seen"))

    async def take(self, connection: AsyncConnection) -> sa.ColumnElement[int]:
        """The mark the writes in ``connection``'s transaction set (SQLite: moved first)."""
        if self.counter:
            await connection.execute(_MOVE_COUNTER)
        return self._written


_MOVE_COUNTER = sa.update(schema.state).values(figures_mark=_state.figures_mark + 1)
