"""where a version's dictionary is searched: its FAISS file, or a Milvus collection

Revision ID: 0005
Revises: 0004
Create Date: 2027-01-12 12:00:00.000000

``dictionary_store`` is ``faiss`` (the version's FAISS file and serving artifacts) or
``milvus``; ``dictionary_options`` then holds the JSON of
``bliss.milvus_dictionary.MilvusDictionaryOptions`` (URI, collection, index and search
parameters; never credentials).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("index_versions") as batch:
        batch.add_column(
            sa.Column(
                "dictionary_store", sa.String(length=16), server_default="faiss", nullable=False
            )
        )
        batch.add_column(sa.Column("dictionary_options", sa.Text(), nullable=True))
        batch.create_check_constraint("dictionary_store", "dictionary_store IN ('faiss', 'milvus')")


def downgrade() -> None:
    with op.batch_alter_table("index_versions") as batch:
        batch.drop_constraint(op.f("ck_index_versions_dictionary_store"), type_="check")
        batch.drop_column("dictionary_options")
        batch.drop_column("dictionary_store")
