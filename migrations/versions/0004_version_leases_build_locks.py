"""version leases of running servers and build locks

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-12 09:30:00.000000

``version_leases``: what each running server serves, renewed every poll, so that a
version still served cannot be deleted. ``build_locks``: who runs the build of
(name, fingerprint), so that two identical builds do the work once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "version_leases",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("server_id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["index_versions.id"],
            name=op.f("fk_version_leases_version_id_index_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "server_id", name=op.f("pk_version_leases")),
    )
    op.create_index("ix_version_leases_server_id", "version_leases", ["server_id"])
    op.create_table(
        "build_locks",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", "fingerprint", name=op.f("pk_build_locks")),
    )


def downgrade() -> None:
    op.drop_table("build_locks")
    op.drop_index("ix_version_leases_server_id", table_name="version_leases")
    op.drop_table("version_leases")
