"""Alembic's environment: runs the migrations on the connection indexer.catalog.open_catalog hands it."""

from alembic import context

from indexer.catalog import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("catalog migrations run through indexer.catalog.open_catalog (it passes the connection)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
