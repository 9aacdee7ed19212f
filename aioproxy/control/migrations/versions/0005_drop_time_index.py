"""The request log's plain time index dropped: ``ix_requests_time_cover`` leads with ``time``.

Revision ID: 0005
Revises: 0004

Every read by time (ranges, the newest first, retention's deletions) is served by the covering
index of 0002, so ``ix_requests_time`` only cost each request's row one more index to update
(about a fifth of the log writer's time per row on SQLite).
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_requests_time", table_name="requests")


def downgrade() -> None:
    op.create_index("ix_requests_time", "requests", ["time"])
