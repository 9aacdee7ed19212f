"""Alembic's entry point for aioproxy's control-plane schema.

aioproxy runs the migrations itself at start-up (``aioproxy.control.database``), on the
connection it opened, handed over in ``config.attributes["connection"]``.
"""

from alembic import context

from aioproxy.control.schema import metadata

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it, which Alembic's batch mode does.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
