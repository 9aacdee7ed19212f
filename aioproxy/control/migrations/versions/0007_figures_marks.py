"""Figures marks: the key cache's poll reads only the keys and teams whose spend moved.

Revision ID: 0007
Revises: 0006

* ``keys.figures_mark`` / ``teams.figures_mark``, indexed: set by the request log's writer with
  each spend (or last use) it writes (aioproxy.control.marks). The rows already there get 0:
  every instance loads them whole at start-up, and a poll reads them again once written to.
* ``control_state.figures_mark``: SQLite's counter of spend writes (0 on PostgreSQL, unused).

Columns added with a constant default: no table is copied or rewritten, on either database.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_MARKED = ("teams", "keys")


def _mark() -> sa.Column[int]:
    return sa.Column("figures_mark", sa.BigInteger, nullable=False, server_default="0")


def upgrade() -> None:
    for table in _MARKED:
        op.add_column(table, _mark())
        op.create_index(f"ix_{table}_figures_mark", table, ["figures_mark"])
    op.add_column("control_state", _mark())


def downgrade() -> None:
    with op.batch_alter_table("control_state") as batch:
        batch.drop_column("figures_mark")
    for table in _MARKED:
        op.drop_index(f"ix_{table}_figures_mark", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("figures_mark")
