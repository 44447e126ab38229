"""The catalog: the source of truth for what a collection holds (SQLAlchemy 2, SQLite or PostgreSQL).

Two tables. ``collections``: one row per collection with the model it was built with, the stage-1
index choice and the feature-store layout, its counters and a ``generation`` that every committed
change bumps (the FAISS file names the generation it reflects; a mismatch means "rebuild it").
``images``: one row per image file seen, ``indexed`` (with its slot in the feature store) or
``failed`` (with the reason). Image ids are the ids of the FAISS stage-1 index.

The schema is versioned with Alembic (``indexer/migrations``): :func:`open_catalog` upgrades any
catalog to the newest revision in place, stamping catalogs made before migrations existed as 0001.

Content hashes are unique per collection among *indexed* images (a partial unique index, which both
SQLite and PostgreSQL support): two different corrupt files may share bytes (two empty files) and
must both be reported, but the same picture is indexed only once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

STATUS_INDEXED = "indexed"
STATUS_FAILED = "failed"

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
ImageId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of the catalog tables."""

    type_annotation_map = {dt.datetime: DateTime(timezone=True)}


class CollectionRow(Base):
    """One collection: what built it, how its files are laid out, and its counters."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Names the collection's folder under <data dir>/collections; never reused, unlike ids.
    storage_key: Mapped[str] = mapped_column(String(32), unique=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))
    embed_dim: Mapped[int]
    grid_rows: Mapped[int]
    grid_cols: Mapped[int]
    # "auto" re-decides the index type by size on every rebuild; "flat" | "ivf" | "hnsw" pin it.
    index_policy: Mapped[str] = mapped_column(String(16))
    flat_threshold: Mapped[int]
    index_type: Mapped[str] = mapped_column(String(16))
    index_params: Mapped[dict[str, Any]] = mapped_column(JSON)
    store_layout: Mapped[dict[str, Any]] = mapped_column(JSON)
    next_slot: Mapped[int] = mapped_column(BigInteger, default=0)
    images_indexed: Mapped[int] = mapped_column(BigInteger, default=0)
    images_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ImageRow(Base):
    """One image file of a collection: indexed (with its feature-store slot) or failed (with why)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(ImageId, primary_key=True, autoincrement=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    uri: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None]
    height: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(8))
    error: Mapped[str | None] = mapped_column(Text)
    store_slot: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(f"status IN ('{STATUS_INDEXED}', '{STATUS_FAILED}')", name="ck_images_status"),
        CheckConstraint(
            f"(status = '{STATUS_INDEXED}') = (store_slot IS NOT NULL)", name="ck_images_slot_iff_indexed"
        ),
        Index(
            "uq_images_collection_hash_indexed",
            "collection_id",
            "content_hash",
            unique=True,
            sqlite_where=text(f"status = '{STATUS_INDEXED}'"),
            postgresql_where=text(f"status = '{STATUS_INDEXED}'"),
        ),
        Index("ix_images_collection_uri", "collection_id", "uri"),
        Index("ix_images_collection_status", "collection_id", "status"),
        Index("ix_images_live_slots", "collection_id", "status", "id", "store_slot"),  # migration 0002
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets a server read while an indexer writes; FULL sync makes a committed batch survive a crash.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE_REVISION = "0001"  # the schema of catalogs made before migrations existed
log = logging.getLogger(__name__)
# Alembic logs its plugins (when imported) and its DDL mode (on every open) at INFO; only an actual
# upgrade is news (upgrade_catalog logs it).
logging.getLogger("alembic").setLevel(logging.WARNING)


def upgrade_catalog(engine: Engine) -> None:
    """Bring the catalog's schema to the newest migration, in place (tables created on an empty database)."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "collections" in tables and "alembic_version" not in tables:
            command.stamp(config, BASELINE_REVISION)  # made before migrations: it has the baseline schema
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(config, "head")
        after = MigrationContext.configure(connection).get_current_revision()
    if before is not None and before != after:
        log.info("catalog schema upgraded in place from revision %s to %s", before, after)


def open_catalog(db_url: str) -> tuple[Engine, sessionmaker[Session]]:
    """Connect to the catalog at ``db_url`` and create or upgrade its tables (:func:`upgrade_catalog`).

    Raises ``RuntimeError`` naming the URL (password hidden) when the database cannot be reached.
    """
    engine = create_engine(db_url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        upgrade_catalog(engine)
    except Exception as exc:  # driver errors differ per database; all mean "cannot use this catalog"
        engine.dispose()
        shown = engine.url.render_as_string(hide_password=True)
        raise RuntimeError(f"cannot open the catalog database {shown}: {exc}") from exc
    return engine, sessionmaker(engine, expire_on_commit=False)


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def catalog_bytes(engine: Engine) -> int:
    """Bytes the whole catalog occupies: the SQLite file(s), or PostgreSQL's size of the two tables."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            return 0
        return sum(os.path.getsize(p) for p in (database, database + "-wal") if os.path.exists(p))
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            total = connection.execute(
                text(
                    "SELECT COALESCE(pg_total_relation_size(to_regclass('images')), 0)"
                    " + COALESCE(pg_total_relation_size(to_regclass('collections')), 0)"
                )
            ).scalar_one()
        return int(total)
    return 0


def total_image_rows(session: Session) -> int:
    """Number of image rows over all collections (to apportion the catalog's bytes)."""
    return int(session.execute(select(func.count()).select_from(ImageRow)).scalar_one())
