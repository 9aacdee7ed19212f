"""The keys and teams in memory: the request path looks keys up here, never in the database.

The cache reloads (in the background) when the change watermark (``control_state.version``)
moved, so a change made through another instance's admin API applies here within
``[database] poll_interval``; this instance's own changes reload it before the admin API answers.
Each poll also refreshes the spend figures, which other instances' request logs move.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..config import Secret
from ..context import Principal
from . import schema
from .meters import KeyLimits, Meter
from .records import KeyEntry, TeamEntry, digest_of

__all__ = ["KeyCache", "as_dict"]

log = logging.getLogger("aioproxy")


_VERSION = sa.select(schema.state.c.version)
# What other instances' request logs move: one statement a table, made once.
_FIGURES = ("id", "spend", "total_spend", "budget_resets_at")
_KEY_FIGURES = sa.select(*(schema.keys.c[name] for name in (*_FIGURES, "last_used_at")))
_TEAM_FIGURES = sa.select(*(schema.teams.c[name] for name in _FIGURES))


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
        self.keys: dict[str, KeyEntry] = {}  # by id
        self.teams: dict[str, TeamEntry] = {}  # by id
        self.principals: dict[str, Principal] = {}  # by digest
        # The keys presented since the last load, by secret (held as Secret: no repr shows
        # one): a known key costs a dict lookup, not a sha256 a request. Only keys that are in
        # the cache are kept, so it grows no larger than ``principals``, guesses or not.
        self._by_secret: dict[str, Principal] = {}
        self.key_meters: dict[str, Meter] = {}
        self.team_meters: dict[str, Meter] = {}
        self.version: int | None = None
        self.lock = asyncio.Lock()  # a reload and a spend write do not interleave

    async def reload(self) -> None:
        async with self.lock, self.engine.connect() as connection:
            await self._load(connection)

    async def refresh(self) -> None:
        """Reload if the watermark moved, else take the newest spend figures. Under the lock,
        so that a spend write is either in the figures read or still counted locally."""
        async with self.lock, self.engine.connect() as connection:
            version = (await connection.execute(_VERSION)).scalar()
            if version != self.version:
                await self._load(connection)
                return
            keys = self.keys
            for id_, spend, total, resets_at, used in await connection.execute(_KEY_FIGURES):
                if (key := keys.get(id_)) is not None:
                    key.spend, key.total_spend, key.budget_resets_at = spend, total, resets_at
                    if used is not None:
                        key.last_used_at = used
            teams = self.teams
            for id_, spend, total, resets_at in await connection.execute(_TEAM_FIGURES):
                if (team := teams.get(id_)) is not None:
                    team.spend, team.total_spend, team.budget_resets_at = spend, total, resets_at

    async def _load(self, connection: AsyncConnection) -> None:
        version = (await connection.execute(_VERSION)).scalar()
        teams = (await connection.execute(sa.select(schema.teams))).all()
        keys = (await connection.execute(sa.select(schema.keys))).all()
        self._install(
            [msgspec.convert(as_dict(row), TeamEntry) for row in teams],
            [msgspec.convert(as_dict(row), KeyEntry) for row in keys],
        )
        self.version = version

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
                limits=KeyLimits(key, key_meter, team, team_meter),
            )
        # Swapped whole: a request sees the old keys or the new ones, never a mix.
        self.principals, self._by_secret = principals, {}

    def principal_of(self, secret: str) -> Principal | None:
        """The Principal a presented secret authenticates as (None: not a database key)."""
        principal = self._by_secret.get(secret)
        if principal is None:
            principal = self.principals.get(digest_of(secret))
            if principal is not None:
                self._by_secret[Secret(secret)] = principal
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
