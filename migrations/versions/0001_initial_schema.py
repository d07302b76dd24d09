"""initial schema: index versions, normal classes, dictionary entries, entry statistics

Revision ID: 0001
Revises:
Create Date: 2026-11-29 01:31:22.271020
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state = 'active'")


def upgrade() -> None:
    op.create_table(
        "index_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("model_weights", sa.Text(), nullable=False),
        sa.Column("model_checksum", sa.String(length=64), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=False),
        sa.Column("prompt_template", sa.Text(), nullable=False),
        sa.Column("dictionary_source", sa.Text(), nullable=False),
        sa.Column("dictionary_size", sa.Integer(), nullable=False),
        sa.Column("faiss_path", sa.Text(), nullable=False),
        sa.Column("faiss_kind", sa.String(length=200), nullable=False),
        sa.Column("faiss_checksum", sa.String(length=64), nullable=True),
        sa.Column("default_k", sa.Integer(), nullable=False),
        sa.Column("default_lambda", sa.Double(), nullable=False),
        sa.Column("eps", sa.Double(), nullable=False),
        sa.Column("build_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('building', 'ready', 'active', 'retired')",
            name=op.f("ck_index_versions_state"),
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_index_versions_version_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_versions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_index_versions_name_version")),
    )
    op.create_index(
        "ux_index_versions_active_name",
        "index_versions",
        ["name"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )
    op.create_table(
        "normal_classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("label_embedding", sa.LargeBinary(), nullable=False),
        sa.Column("label_mean", sa.Double(), nullable=False),
        sa.Column("label_std", sa.Double(), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("moment_sum", sa.LargeBinary(), nullable=False),
        sa.Column("moment_outer", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["index_versions.id"],
            name=op.f("fk_normal_classes_version_id_index_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_normal_classes")),
        sa.UniqueConstraint("version_id", "name", name=op.f("uq_normal_classes_version_id_name")),
        sa.UniqueConstraint(
            "version_id", "position", name=op.f("uq_normal_classes_version_id_position")
        ),
    )
    op.create_table(
        "dictionary_entries",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["index_versions.id"],
            name=op.f("fk_dictionary_entries_version_id_index_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "position", name=op.f("pk_dictionary_entries")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "entry_statistics",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("entry_position", sa.Integer(), nullable=False),
        sa.Column("class_position", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Double(), nullable=False),
        sa.Column("std", sa.Double(), nullable=False),
        # No foreign key to index_versions: PostgreSQL would check it once per bulk-loaded
        # row (about 10 of 16 s for a million rows); Store.delete_version removes the rows.
        sa.PrimaryKeyConstraint(
            "version_id", "entry_position", "class_position", name=op.f("pk_entry_statistics")
        ),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("entry_statistics")
    op.drop_table("dictionary_entries")
    op.drop_table("normal_classes")
    op.drop_index("ux_index_versions_active_name", table_name="index_versions")
    op.drop_table("index_versions")
