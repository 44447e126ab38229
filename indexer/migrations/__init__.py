"""Alembic migrations of the catalog schema (``indexer.catalog``), applied by ``open_catalog``.

Every schema change is a new revision in ``versions/`` (``alembic -c indexer/migrations/alembic.ini
revision -m "what"`` writes one; fill in upgrade/downgrade by hand, for SQLite and PostgreSQL).
Catalogs created before Alembic (the 0001 schema, without an ``alembic_version`` table) are stamped
0001 on open, then upgraded like any other.
"""
