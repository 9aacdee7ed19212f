"""The aioproxy-keys target's database: 1,000 virtual keys, the caller's holding limits."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import sqlalchemy as sa

from aioproxy.control import schema
from aioproxy.control.engine import open_engine
from aioproxy.control.records import digest_of

KEYS = 1000
# The caller's limits: enforced on every request (counted, headers sent), never reached.
CALLER_LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_budget": 10**6, "budget_duration": "30d"}
_OTHERS_LIMITS = {"rpm": 60, "tpm": 100_000, "max_budget": None, "budget_duration": None}


def database_url(path: Path) -> str:
    return f"sqlite:///{path}"


async def _seed(url: str, count: int) -> str:
    engine = await open_engine(url)
    now = time.time()
    caller = "sk-" + secrets.token_urlsafe(32)
    rows = []
    for i in range(count):
        secret = caller if i == count - 1 else "sk-" + secrets.token_urlsafe(32)
        # Every row names the same columns: one INSERT of many rows takes its columns from the
        # first row's, so the caller's budget (the last row's) would be dropped otherwise.
        limits = CALLER_LIMITS if secret == caller else _OTHERS_LIMITS
        rows.append(
            {
                "id": f"key_bench{i:04d}",
                "digest": digest_of(secret),
                "key_prefix": secret[:7],
                "name": f"bench-{i}",
                "created_at": now,
                **limits,
            }
        )
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.insert(schema.keys), rows)
            await connection.execute(
                sa.update(schema.state).values(version=schema.state.c.version + 1)
            )
    finally:
        await engine.dispose()
    return caller


def seed(path: Path, count: int = KEYS) -> str:
    """Create the database at ``path`` with ``count`` keys; the caller's key secret."""
    path.unlink(missing_ok=True)
    return asyncio.run(_seed(database_url(path), count))
