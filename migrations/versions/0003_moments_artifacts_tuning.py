"""moments mode, serving artifacts, extend lineage and recall tuning; centred moments

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:10:00.000000

Normal classes kept raw moments (sum z, sum z z'); the covariance derived from them
cancels badly, so they become mean and centred covariance (converted in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _version_columns() -> list[sa.Column]:
    return [
        sa.Column("statistics_mode", sa.String(length=16), server_default="table", nullable=False),
        sa.Column("artifacts_checksum", sa.String(length=64), nullable=True),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("search_parameter", sa.String(length=32), nullable=True),
        sa.Column("search_value", sa.Integer(), nullable=True),
        sa.Column("target_recall", sa.Double(), nullable=True),
        sa.Column("measured_recall", sa.Double(), nullable=True),
        sa.Column("max_score_change", sa.Double(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("index_versions") as batch:
        for column in _version_columns():
            batch.add_column(column)
        batch.create_check_constraint("statistics_mode", "statistics_mode IN ('table', 'moments')")
        batch.create_foreign_key(
            op.f("fk_index_versions_parent_version_id_index_versions"),
            "index_versions",
            ["parent_version_id"],
            ["id"],
            ondelete="SET NULL",
        )
    _convert_moments("moment_sum", "moment_outer", "moment_mean", "moment_covariance", _centre)


def downgrade() -> None:
    _convert_moments("moment_mean", "moment_covariance", "moment_sum", "moment_outer", _raw)
    with op.batch_alter_table("index_versions") as batch:
        batch.drop_constraint(
            op.f("fk_index_versions_parent_version_id_index_versions"), type_="foreignkey"
        )
        batch.drop_constraint(op.f("ck_index_versions_statistics_mode"), type_="check")
        for column in reversed(_version_columns()):
            batch.drop_column(column.name)


def _convert_moments(
    old_first: str, old_second: str, first: str, second: str, convert: Callable
) -> None:
    with op.batch_alter_table("normal_classes") as batch:
        batch.add_column(sa.Column(first, sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column(second, sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(f"SELECT id, sample_count, {old_first}, {old_second} FROM normal_classes")
    ).all()
    for row_id, count, stored_first, stored_second in rows:
        vector = np.frombuffer(stored_first, dtype="<f8")
        matrix = np.frombuffer(stored_second, dtype="<f8").reshape(len(vector), len(vector))
        new_vector, new_matrix = convert(count, vector, matrix)
        connection.execute(
            sa.text(f"UPDATE normal_classes SET {first} = :a, {second} = :b WHERE id = :id"),
            {"a": new_vector.astype("<f8").tobytes(), "b": new_matrix.astype("<f8").tobytes(),
             "id": row_id},
        )  # fmt: skip
    with op.batch_alter_table("normal_classes") as batch:
        batch.alter_column(first, existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column(second, existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column(old_first)
        batch.drop_column(old_second)


def _centre(count: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = total / count
    return mean, outer / count - np.outer(mean, mean)


def _raw(count: int, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mean * count, (covariance + np.outer(mean, mean)) * count
