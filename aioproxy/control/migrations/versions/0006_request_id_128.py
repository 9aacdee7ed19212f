"""The request log's ``request_id`` widened to 128 characters: a client's own ``x-request-id``
is kept when sane, up to 128 printable characters (aioproxy.request_ids), and PostgreSQL refused
a longer one than the column's 64, failing its whole batch.

Revision ID: 0006
Revises: 0005

On SQLite the table is copied (Alembic's batch mode): once, at the upgrade.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("request_id", type_=sa.String(128), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("request_id", type_=sa.String(64), existing_nullable=False)
