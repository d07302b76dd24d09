"""A version's normal classes and its calibration (held-out normal scores per mode)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import delete, select

from bliss.calibration import Calibration
from bliss.scoring import ScoringMode
from bliss.store.models import CalibrationScores, NormalClass
from bliss.store.records import ClassRecord, class_record, class_rows
from bliss.store.rows import building_row, version_row
from bliss.store.sessions import StoreSessions


class ClassesAndCalibration(StoreSessions):
    """The class and calibration queries of :class:`bliss.store.Store`."""

    def write_classes(self, version_id: int, classes: Sequence[ClassRecord]) -> None:
        """Replace the version's normal classes (positions must be 0..n-1)."""
        with self._writing() as session:
            row = building_row(session, version_id, "writing classes")
            new_rows = class_rows(row, classes)
            session.execute(delete(NormalClass).where(NormalClass.version_id == version_id))
            session.add_all(new_rows)

    def load_classes(self, version_id: int) -> list[ClassRecord]:
        """The version's normal classes, by position."""
        with self._reading() as session:
            version_row(session, version_id)
            rows = session.scalars(
                select(NormalClass)
                .where(NormalClass.version_id == version_id)
                .order_by(NormalClass.position)
            )
            return [class_record(row) for row in rows]

    def write_calibration(self, version_id: int, calibration: Calibration) -> None:
        """Replace the version's held-out normal scores (one row per scoring mode)."""
        with self._writing() as session:
            building_row(session, version_id, "writing calibration scores")
            session.execute(
                delete(CalibrationScores).where(CalibrationScores.version_id == version_id)
            )
            session.add_all(
                CalibrationScores(
                    version_id=version_id,
                    mode=mode.value,
                    k=calibration.k,
                    lam=calibration.lam,
                    sample_count=len(scores),
                    sorted_scores=np.sort(scores).astype("<f8").tobytes(),
                )
                for mode, scores in calibration.sorted_scores.items()
            )

    def load_calibration(self, version_id: int) -> Calibration | None:
        """The version's calibration, or None when it was built without one."""
        with self._reading() as session:
            rows = session.scalars(
                select(CalibrationScores).where(CalibrationScores.version_id == version_id)
            ).all()
            if not rows:
                return None
            return Calibration(
                k=rows[0].k,
                lam=rows[0].lam,
                sorted_scores={
                    ScoringMode(row.mode): np.frombuffer(row.sorted_scores, dtype="<f8")
                    for row in rows
                },
            )
