"""The keys and teams in memory: the request path looks keys up here, never in the database.

The cache reloads (in the background) when the change watermark (``control_state.version``)
moved, so a change made through another instance's admin API applies here within
``[database] poll_interval``; this instance's own changes reload it before the admin API answers.
Each poll also takes the spend figures other instances' request logs moved: only those of the
keys and teams marked since the last poll (``aioproxy.control.marks``), so a poll costs the
same at 100,000 keys as at 10, and reads no row when nothing was spent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..config import Secret
from ..context import Principal
from . import schema
from .marks import Marks
from .meters import KeyLimits, Meter
from .records import KeyEntry, TeamEntry, digest_of

if TYPE_CHECKING:
    from .plane import ControlPlane

__all__ = ["KeyCache", "as_dict"]

log = logging.getLogger("aioproxy")


def _marked_since() -> sa.CompoundSelect[Any]:
    """What other instances' request logs move, of the keys and teams marked above ``seen``:
    one statement for both tables (``is_key`` tells them apart), made once."""
    columns = ("id", "spend", "total_spend", "budget_resets_at")
    seen = sa.bindparam("seen", type_=sa.BigInteger)
    keys, teams = schema.keys.c, schema.teams.c
    return sa.union_all(
        sa.select(
            sa.true().label("is_key"), *(keys[name] for name in columns), keys.last_used_at
        ).where(keys.figures_mark > seen),
        sa.select(sa.false(), *(teams[name] for name in columns), sa.null()).where(
            teams.figures_mark > seen
        ),
    )


_MARKED_SINCE = _marked_since()


def _allowed(key: list[str] | None, team: list[str] | None) -> frozenset[str] | None:
    """The models a key may use: those both its own list and its team's allow."""
    if key is None and team is None:
        return None
    if key is None:
        return frozenset(team or ())
    if team is None:
        return frozenset(key)
    return frozenset(key) & frozenset(team)


class KeyCache:
    """Keys by digest, with the Principal each one authenticates as."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # The plane that owns it (set by ControlPlane): each key's KeyLimits points at it, so the
        # limits plugin finds its clock and prices without the request's app lookup.
        self.plane: ControlPlane | None = None
        self.keys: dict[str, KeyEntry] = {}  # by id
        self.teams: dict[str, TeamEntry] = {}  # by id
        self.principals: dict[str, Principal] = {}  # by digest
        # The keys presented since the last load, by secret (held as Secret: no repr shows
        # one): a known key costs a dict lookup, not a sha256 a request. Only keys that are in
        # the cache are kept, so it grows no larger than ``principals``, guesses or not.
        # Read here first by keyauth (a key presented before: no call of ``principal_of``).
        self.by_secret: dict[str, Principal] = {}
        self.key_meters: dict[str, Meter] = {}
        self.team_meters: dict[str, Meter] = {}
        self.version: int | None = None
        self.marks = Marks(engine.dialect.name)
        self.seen = 0  # every spend write marked up to it is in the figures (marks.py)
        self.figures_read = 0  # rows the polls read for spend figures, since the start
        self.lock = asyncio.Lock()  # a reload and a spend write do not interleave

    async def reload(self) -> None:
        async with self.lock, self.engine.connect() as connection:
            await self._load(connection)

    async def refresh(self) -> None:
        """Reload if the watermark moved, else take the spend figures written since the last
        poll. Under the lock, so that a spend write is either in the figures read or still
        counted locally."""
        async with self.lock, self.engine.connect() as connection:
            version, seen = (await connection.execute(self.marks.head)).one()
            if version != self.version:
                await self._load(connection)
                return
            if seen == self.seen and self.marks.counter:
                return  # SQLite's counter did not move: nothing was spent
            # Above the mark the last poll saw, not this one's: a write marked below this one
            # may have committed only since the last read. Rows written meanwhile are read
            # again next poll, to no harm.
            rows = (await connection.execute(_MARKED_SINCE, {"seen": self.seen})).all()
            self.seen = seen
            self.figures_read += len(rows)
            keys, teams = self.keys, self.teams
            for is_key, id_, spend, total, resets_at, used in rows:
                entry = keys.get(id_) if is_key else teams.get(id_)
                if entry is not None:
                    entry.spend, entry.total_spend, entry.budget_resets_at = spend, total, resets_at
                    if used is not None:  # a key's (a team has no last use)
                        keys[id_].last_used_at = used

    async def _load(self, connection: AsyncConnection) -> None:
        # The mark before the rows: a write the rows miss is marked above it, read next poll.
        version, seen = (await connection.execute(self.marks.head)).one()
        teams = (await connection.execute(sa.select(schema.teams))).all()
        keys = (await connection.execute(sa.select(schema.keys))).all()
        self._install(
            [msgspec.convert(as_dict(row), TeamEntry) for row in teams],
            [msgspec.convert(as_dict(row), KeyEntry) for row in keys],
        )
        self.version, self.seen = version, seen

    def _install(self, teams: list[TeamEntry], keys: list[KeyEntry]) -> None:
        self.teams = {team.id: team for team in teams}
        self.keys = {key.id: key for key in keys}
        principals = {}
        for key in keys:
            team = self.teams.get(key.team_id) if key.team_id else None
            key_meter = self.key_meters.setdefault(key.id, Meter())
            team_meter = self.team_meters.setdefault(team.id, Meter()) if team else None
            principals[key.digest] = Principal(
                key.name,
                _allowed(key.models, team.models if team else None),
                id=key.id,
                team=key.team_id,
                team_name=team.name if team else None,
                limits=KeyLimits(key, key_meter, team, team_meter, self.plane),
            )
        # Swapped whole: a request sees the old keys or the new ones, never a mix.
        self.principals, self.by_secret = principals, {}

    def principal_of(self, secret: str) -> Principal | None:
        """The Principal a presented secret authenticates as (None: not a database key)."""
        principal = self.by_secret.get(secret)
        if principal is None:
            principal = self.principals.get(digest_of(secret))
            if principal is not None:
                self.by_secret[Secret(secret)] = principal
        return principal

    async def poll(self, interval: float) -> None:
        """Refresh every ``interval`` seconds until cancelled; failures are logged and retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - any driver error: retried next poll
                log.warning("control plane: cannot refresh the key cache: %s", exc)


def as_dict(row: sa.Row[Any]) -> dict[str, Any]:
    """A row as a dict with plain str keys (SQLAlchemy's are a str subclass msgspec refuses)."""
    return {str(name): value for name, value in zip(row._fields, row, strict=True)}
