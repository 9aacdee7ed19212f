"""``run.py --workers N > 1`` without ``[state] redis_url``: refused when anything is limited,
since each worker would count on its own and every limit would hold N times over."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from ..config import Config
from ..control import schema
from ..control.engine import open_engine
from ..control.records import COUNTED

__all__ = ["per_process_limits"]


def per_process_limits(config: Config) -> str | None:
    """What would be counted per process (None: nothing): checked once, before the fork."""
    if config.state.redis_url is not None:
        return None
    capped = [entry.name for entry in config.models if entry.rpm or entry.tpm]
    if capped:
        return f"rpm/tpm caps on the deployments of {', '.join(sorted(set(capped)))}"
    if config.cache.enabled:
        return "[cache] enabled"
    found = asyncio.run(
        _limited_in_database(config.database.url, config.database.statement_timeout)
    )
    return f"{found} in the database with rpm, tpm, max_parallel or a budget" if found else None


async def _limited_in_database(url: str, statement_timeout: float) -> str | None:
    engine = await open_engine(url, statement_timeout)
    try:
        async with engine.connect() as connection:
            for table, what in ((schema.keys, "keys"), (schema.teams, "teams")):
                limited = sa.or_(*(table.c[name].is_not(None) for name in COUNTED))
                query = sa.select(sa.func.count()).select_from(table).where(limited)
                if (await connection.execute(query)).scalar():
                    return what
    finally:
        await engine.dispose()
    return None
