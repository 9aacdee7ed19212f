"""The Responses store moves into the control plane's database (issue 12, item 1).

Revision ID: 0003
Revises: 0002

Responses kept in the old ``aioproxy-responses.sqlite3`` file are not carried over.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out, not imported from store_tables: a migration stays as it was shipped.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("previous_id", sa.Text, nullable=True),
        sa.Column("touched_at", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("turn", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_stored_responses_touched", "stored_responses", ["touched_at"])
    op.create_table(
        "native_responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("deployment", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_native_responses_created", "native_responses", ["created_at"])


def downgrade() -> None:
    op.drop_table("native_responses")
    op.drop_table("stored_responses")
