"""Entry statistics: the eq. 8 mean and std of every (class, dictionary entry) pair."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete, func, select

from bliss.errors import InvalidInputError, NotFoundError
from bliss.store import bulk_load
from bliss.store.models import EntryStatistic, IndexVersion, NormalClass
from bliss.store.rows import (
    building_row,
    checked_positions,
    int32_values,
    quote_positions,
    version_label,
    version_row,
)
from bliss.store.sessions import StoreSessions


class EntryStatistics(StoreSessions):
    """The entry-statistics queries of :class:`bliss.store.Store`."""

    def write_entry_statistics(
        self, version_id: int, start: int, mean: np.ndarray, std: np.ndarray
    ) -> None:
        """Replace the eq. 8 rows of entries start..start+b-1 for every class, from
        ``mean``/``std`` float64 [N, b] (N = the version's classes, written first).

        Writing blocks of entries in order keeps the inserts in key order, so a
        million-row block is an append and a huge dictionary one pass over the table.
        """
        with self._writing() as session:
            row = building_row(session, version_id, "writing entry statistics")
            classes = session.scalar(
                select(func.count())
                .select_from(NormalClass)
                .where(NormalClass.version_id == version_id)
            )
            assert classes is not None, "COUNT(*) returns one row"
            mean_values = _statistics_block("mean", mean, row, classes, start)
            std_values = _statistics_block("std", std, row, classes, start)
            if (std_values < 0).any():
                row_index, column = np.argwhere(std_values < 0)[0]
                raise InvalidInputError(
                    f"std has negative values (first: class {row_index}, entry "
                    f"{start + column}); a standard deviation is >= 0"
                )
            session.execute(
                delete(EntryStatistic).where(
                    EntryStatistic.version_id == version_id,
                    EntryStatistic.entry_position >= start,
                    EntryStatistic.entry_position < start + mean_values.shape[1],
                )
            )
            bulk_load.insert_entry_statistics(
                session.connection(), version_id, start, mean_values, std_values
            )

    def count_entry_statistics(self, version_id: int, class_position: int | None = None) -> int:
        """How many statistics rows the version has (of one class when given)."""
        query = (
            select(func.count())
            .select_from(EntryStatistic)
            .where(EntryStatistic.version_id == version_id)
        )
        if class_position is not None:
            query = query.where(EntryStatistic.class_position == class_position)
        with self._reading() as session:
            count = session.scalar(query)
            assert count is not None, "COUNT(*) returns one row"
            return count

    def entry_statistics(
        self, version_id: int, positions: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gather eq. 8 for entries ``positions`` (any order, repeats allowed).

        Returns mean and std float64 [n_classes, len(positions)], columns in the order
        asked. NotFoundError when some (class, entry) row is missing.
        """
        wanted = checked_positions(positions)
        unique, inverse = np.unique(wanted, return_inverse=True)
        with self._reading() as session:
            entries, classes, means, stds = bulk_load.gather_entry_statistics(
                session.connection(), version_id, int32_values(unique)
            )
            wanted_class = classes < n_classes
            entries, classes = entries[wanted_class], classes[wanted_class]
            columns = np.searchsorted(unique, entries)
            mean = np.zeros((n_classes, len(unique)), dtype=np.float64)
            std = np.zeros((n_classes, len(unique)), dtype=np.float64)
            found = np.zeros((n_classes, len(unique)), dtype=bool)
            mean[classes, columns] = means[wanted_class]
            std[classes, columns] = stds[wanted_class]
            found[classes, columns] = True
            if not found.all():
                missing = unique[~found.all(axis=0)].tolist()
                row = version_row(session, version_id)
                raise NotFoundError(
                    f"index {version_label(row)} has no entry statistics for all {n_classes} "
                    f"classes at dictionary positions {quote_positions(missing)}; its "
                    f"positions are 0..{row.dictionary_size - 1} and a complete version has "
                    "every class"
                )
        columns = inverse.ravel()
        return mean[:, columns], std[:, columns]

    def all_entry_statistics(
        self, version_id: int, n_classes: int, n_entries: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every eq. 8 row of the version: mean and std float64 [n_classes, n_entries]."""
        with self._reading() as session:
            row = version_row(session, version_id)
            mean, std, count = bulk_load.read_entry_statistics(
                session.connection(), version_id, n_classes, n_entries
            )
        if count != n_classes * n_entries:
            raise NotFoundError(
                f"index {version_label(row)} has {count} of the {n_classes * n_entries} entry "
                f"statistics of {n_classes} classes x {n_entries} entries; the version is "
                "incomplete (or has fewer classes or entries than asked for)"
            )
        return mean, std


def _statistics_block(
    what: str, values: np.ndarray, version: IndexVersion, classes: int, start: int
) -> np.ndarray:
    array = np.asarray(values)
    if classes == 0:
        raise InvalidInputError(
            f"index {version_label(version)} has no classes yet: write the classes before "
            "their statistics"
        )
    if array.ndim != 2 or array.shape[0] != classes or array.shape[1] == 0:
        raise InvalidInputError(
            f"{what} must have shape [{classes}, b] (one row per class of index "
            f"{version_label(version)}), got {array.shape}"
        )
    if start < 0 or start + array.shape[1] > version.dictionary_size:
        raise InvalidInputError(
            f"entries {start}..{start + array.shape[1] - 1} are outside the dictionary of "
            f"index {version_label(version)} (0..{version.dictionary_size - 1})"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"{what} must be floats, got {array.dtype}")
    finite = np.isfinite(array)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise InvalidInputError(
            f"{what} has {int((~finite).sum())} non-finite values "
            f"(first: class {row}, entry {start + column})"
        )
    return array.astype(np.float64, copy=False)
