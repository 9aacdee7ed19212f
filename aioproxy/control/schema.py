"""The control plane's tables (SQLAlchemy Core): one schema for SQLite and PostgreSQL.

Times are seconds since the epoch (floats): both databases compare and sort them alike, and
nothing converts time zones. Money is USD, as floats. ``alembic`` migrations in
``migrations/versions`` create and change these tables; this module is what the code queries.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

__all__ = [
    "COVERED",
    "MOST_INTEGER",
    "REQUEST_COLUMNS",
    "keys",
    "metadata",
    "requests",
    "spend_days",
    "state",
    "teams",
]

# The most an INTEGER column holds (PostgreSQL's 32 bits): the limits and token counts stored
# in one are held to it (validation, rows): more fails the INSERT there.
MOST_INTEGER = 2**31 - 1

metadata = sa.MetaData()


def _limits() -> list[sa.Column[Any]]:
    """The columns keys and teams share: model access, limits, and the spend of the budget
    period ending at ``budget_resets_at``."""
    return [
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("max_parallel", sa.Integer, nullable=True),
        sa.Column("max_budget", sa.Float, nullable=True),
        sa.Column("budget_duration", sa.String(20), nullable=True),
        sa.Column("budget_resets_at", sa.Float, nullable=True),
        sa.Column("spend", sa.Float, nullable=False, server_default="0"),
        sa.Column("total_spend", sa.Float, nullable=False, server_default="0"),
    ]


def _figures_mark(table: str) -> list[sa.schema.SchemaItem]:
    """Moved by the request log's writer with the spend (or last use): the key cache's poll
    reads only the rows marked since its last (aioproxy.control.marks). Last: migration 0007
    added it."""
    return [
        sa.Column("figures_mark", sa.BigInteger, nullable=False, server_default="0"),
        sa.Index(f"ix_{table}_figures_mark", "figures_mark"),
    ]


teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    *_limits(),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    *_figures_mark("teams"),
)

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    # sha256 of the secret, hex: the secret itself is never stored
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("key_prefix", sa.String(8), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("team_id", sa.String(40), sa.ForeignKey("teams.id"), nullable=True, index=True),
    *_limits(),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("role", sa.String(20), nullable=False, server_default="user"),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=True),
    *_figures_mark("keys"),
)

# One row: ``version`` goes up with every change made through the admin API, so that each
# instance reloads its key cache when it sees a new value (the change watermark).
state = sa.Table(
    "control_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    # SQLite's figures mark: moved by each spend write (aioproxy.control.marks; migration
    # 0007). PostgreSQL marks rows with transaction ids instead and leaves it at 0.
    sa.Column("figures_mark", sa.BigInteger, nullable=False, server_default="0"),
)

# The columns the dashboard's covering index holds, ``time`` first (migration 0002).
COVERED = (
    "time", "status", "duration", "ttft", "input_tokens", "output_tokens", "cost",
    "model", "key_id", "team_id", "day",
)  # fmt: skip

requests = sa.Table(
    "requests",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("request_id", sa.String(128), nullable=False),  # a sane client id: 128 (0006)
    sa.Column("time", sa.Float, nullable=False),  # read by ix_requests_time_cover (0005)
    sa.Column("day", sa.String(10), nullable=False),  # UTC date, for group_by=day on both databases
    sa.Column("key_id", sa.String(80), nullable=True, index=True),
    sa.Column("key_name", sa.String(200), nullable=True),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("end_user", sa.String(200), nullable=True),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("deployment", sa.String(200), nullable=True),
    sa.Column("provider", sa.String(100), nullable=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error_code", sa.String(100), nullable=True),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False),
    sa.Column("estimated", sa.Boolean, nullable=False),  # tokens estimated: no usage reported
    sa.Column("cost", sa.Float, nullable=True),  # USD; None: no price known
    sa.Column("ttft", sa.Float, nullable=True),  # seconds to the first byte
    sa.Column("duration", sa.Float, nullable=False),
    # Upstream attempts past the first, on the same model and on fallbacks (migration 0004;
    # None: a row written before, not recorded).
    sa.Column("retries", sa.Integer, nullable=True),
    sa.Column("fallbacks", sa.Integer, nullable=True),
    # The dashboard's reads (migration 0002): a covering index for ranges, one for details.
    sa.Index("ix_requests_time_cover", *COVERED),
    sa.Index("ix_requests_request_id", "request_id"),
    # The request log filtered by status, newest first (migration 0004): errors are rare, so
    # walking the time index for them reads most of the log.
    sa.Index("ix_requests_status_time", "status", "time"),
)

# A request log row's values, in this order (``LogRecord.values``): written with one prepared
# INSERT per batch, bypassing SQLAlchemy's per-row processing (a third of the cost).
REQUEST_COLUMNS: tuple[str, ...] = tuple(c.name for c in requests.c if c.name != "seq")

# The request log rolled up by UTC day, key, team and model (migration 0004): kept by the log's
# writer in each batch's transaction, so whole-day spend reads a few rows a day, not every
# request. No key, team or model is stored as "" (a unique index holds no NULL to compare).
spend_days = sa.Table(
    "spend_days",
    metadata,
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("key_id", sa.String(80), nullable=False),
    sa.Column("team_id", sa.String(40), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost", sa.Float, nullable=False),
    sa.Index("ux_spend_days", "day", "key_id", "team_id", "model", unique=True),
)
