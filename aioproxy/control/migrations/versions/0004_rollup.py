"""The request log's roll-up by day, key, team and model, and each request's retries (issue 17).

Revision ID: 0004
Revises: 0003

* ``spend_days``: the request log summed by UTC day, key, team and model, kept by the log's
  writer (``aioproxy.control.rollup``); filled here from the rows already written.
* ``requests.retries`` / ``requests.fallbacks``: upstream attempts past the first (NULL in the
  rows written before: not recorded).
* ``ix_requests_status_time``: the request log filtered by status, newest first (errors are
  rare: the time index walked for them reads most of the log). Nothing groups by status, so
  SQLite is never led to walk it for a grouping.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_GROUP = ["day", "key_id", "team_id", "model"]


def upgrade() -> None:
    op.create_table(
        "spend_days",
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("key_id", sa.String(80), nullable=False),
        sa.Column("team_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
    )
    op.create_index("ux_spend_days", "spend_days", _GROUP, unique=True)
    op.execute(
        "INSERT INTO spend_days (day, key_id, team_id, model, requests, input_tokens,"
        " output_tokens, cost)"
        " SELECT day, COALESCE(key_id, ''), COALESCE(team_id, ''), COALESCE(model, ''),"
        " COUNT(*), SUM(input_tokens), SUM(output_tokens), COALESCE(SUM(cost), 0)"
        " FROM requests"
        " GROUP BY day, COALESCE(key_id, ''), COALESCE(team_id, ''), COALESCE(model, '')"
    )
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("retries", sa.Integer, nullable=True))
        batch.add_column(sa.Column("fallbacks", sa.Integer, nullable=True))
    op.create_index("ix_requests_status_time", "requests", ["status", "time"])


def downgrade() -> None:
    op.drop_index("ix_requests_status_time", table_name="requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("fallbacks")
        batch.drop_column("retries")
    op.drop_index("ux_spend_days", table_name="spend_days")
    op.drop_table("spend_days")
