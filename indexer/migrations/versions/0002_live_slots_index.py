"""A covering index for a collection's (id, slot) table: read whole at open, and past the last id
when images were added (Collection.appended), from the index alone.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_images_live_slots", "images", ["collection_id", "status", "id", "store_slot"])


def downgrade() -> None:
    op.drop_index("ix_images_live_slots", table_name="images")
