"""The catalog as it was before migrations: collections and images.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ImageId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("storage_key", sa.String(32), nullable=False, unique=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=False),
        sa.Column("grid_rows", sa.Integer(), nullable=False),
        sa.Column("grid_cols", sa.Integer(), nullable=False),
        sa.Column("index_policy", sa.String(16), nullable=False),
        sa.Column("flat_threshold", sa.Integer(), nullable=False),
        sa.Column("index_type", sa.String(16), nullable=False),
        sa.Column("index_params", sa.JSON(), nullable=False),
        sa.Column("store_layout", sa.JSON(), nullable=False),
        sa.Column("next_slot", sa.BigInteger(), nullable=False),
        sa.Column("images_indexed", sa.BigInteger(), nullable=False),
        sa.Column("images_failed", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", ImageId, primary_key=True, autoincrement=True),
        sa.Column("collection_id", sa.Integer(), sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("store_slot", sa.BigInteger()),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.CheckConstraint("status IN ('indexed', 'failed')", name="ck_images_status"),
        sa.CheckConstraint("(status = 'indexed') = (store_slot IS NOT NULL)", name="ck_images_slot_iff_indexed"),
    )
    op.create_index(
        "uq_images_collection_hash_indexed", "images", ["collection_id", "content_hash"], unique=True,
        sqlite_where=sa.text("status = 'indexed'"), postgresql_where=sa.text("status = 'indexed'"),
    )
    op.create_index("ix_images_collection_uri", "images", ["collection_id", "uri"])
    op.create_index("ix_images_collection_status", "images", ["collection_id", "status"])


def downgrade() -> None:
    op.drop_table("images")
    op.drop_table("collections")
