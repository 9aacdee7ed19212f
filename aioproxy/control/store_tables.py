"""The Responses store's tables (SQLAlchemy Core), in the control plane's database.

``aioproxy.bridges.store`` queries them; migration ``0003`` creates them. Times are whole
seconds since the epoch, sizes bytes.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["native_responses", "store_metadata", "stored_responses"]

store_metadata = sa.MetaData()

# SQLite's INTEGER PRIMARY KEY is its rowid (numbered by itself); BIGINT is not.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

stored_responses = sa.Table(
    "stored_responses",
    store_metadata,
    # The order rows were written in: the size bound keeps an earlier row (one a later row may
    # chain onto) before a later one touched at the same second.
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("id", sa.Text, nullable=False, unique=True),
    sa.Column("owner", sa.Text, nullable=False),  # Principal.id: a digest, never a name
    sa.Column("previous_id", sa.Text, nullable=True),  # the response it continues
    sa.Column("touched_at", sa.BigInteger, nullable=False),  # created, or last chained onto
    sa.Column("size", sa.BigInteger, nullable=False),  # bytes of response and turn
    sa.Column("response", sa.LargeBinary, nullable=False),  # the Response object (JSON)
    sa.Column("turn", sa.LargeBinary, nullable=False),  # input and answer, as chat messages
    sa.Index("ix_stored_responses_touched", "touched_at"),
)

# Responses an upstream created natively: only which deployment holds each, and whose it is.
native_responses = sa.Table(
    "native_responses",
    store_metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("principal", sa.Text, nullable=False),
    sa.Column("deployment", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("ix_native_responses_created", "created_at"),
)
