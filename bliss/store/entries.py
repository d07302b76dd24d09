"""Dictionary entries: the texts of a version's dictionary, by position."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import delete, func, select

from bliss.errors import InvalidInputError, NotFoundError
from bliss.store import bulk_load
from bliss.store.models import DictionaryEntry
from bliss.store.rows import (
    building_row,
    checked_positions,
    int32_values,
    quote_positions,
    version_label,
    version_row,
)
from bliss.store.sessions import StoreSessions


class DictionaryEntries(StoreSessions):
    """The dictionary-entry queries of :class:`bliss.store.Store`."""

    def write_entries(
        self, version_id: int, texts: Iterable[str], *, batch_size: int = 50_000
    ) -> int:
        """Replace the version's dictionary entries with ``texts`` (positions 0..t-1).

        ``texts`` is streamed, never held whole; t must equal the version's
        dictionary_size. Returns t.
        """
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        with self._writing() as session:
            row = building_row(session, version_id, "writing dictionary entries")
            if session.get(DictionaryEntry, (version_id, 0)) is not None:
                session.execute(
                    delete(DictionaryEntry).where(DictionaryEntry.version_id == version_id)
                )
            count = bulk_load.insert_entries(
                session.connection(), version_id, _checked_texts(texts), batch_size
            )
            if count != row.dictionary_size:
                raise InvalidInputError(
                    f"got {count} dictionary entries for index {version_label(row)}, but its "
                    f"dictionary_size is {row.dictionary_size}; nothing was written"
                )
            return count

    def count_entries(self, version_id: int) -> int:
        """How many dictionary entries the version has."""
        with self._reading() as session:
            count = session.scalar(
                select(func.count())
                .select_from(DictionaryEntry)
                .where(DictionaryEntry.version_id == version_id)
            )
            assert count is not None, "COUNT(*) returns one row"
            return count

    def entry_texts(self, version_id: int, positions: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the entries at ``positions``, in the order asked (repeats allowed)."""
        wanted = checked_positions(positions)
        unique, inverse = np.unique(wanted, return_inverse=True)
        with self._reading() as session:
            texts = bulk_load.gather_entry_texts(
                session.connection(), version_id, int32_values(unique)
            )
            missing = [int(p) for p in unique if int(p) not in texts]
            if missing:
                row = version_row(session, version_id)
                raise NotFoundError(
                    f"index {version_label(row)} has no dictionary entries at positions "
                    f"{quote_positions(missing)}; its positions are 0..{row.dictionary_size - 1}"
                )
        ordered = [texts[int(p)] for p in unique]
        return [ordered[i] for i in inverse.ravel()]

    def iter_entry_texts(self, version_id: int, *, batch_size: int = 50_000) -> Iterator[str]:
        """All entry texts by position, fetched ``batch_size`` at a time."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        with self._reading() as session:
            version_row(session, version_id)  # NotFoundError now, not at the first next()
        return self._entry_text_batches(version_id, batch_size)

    def _entry_text_batches(self, version_id: int, batch_size: int) -> Iterator[str]:
        # Keyset pagination: no connection is held while the caller consumes a batch.
        start = 0
        while True:
            with self._reading() as session:
                batch = session.execute(
                    select(DictionaryEntry.position, DictionaryEntry.text)
                    .where(
                        DictionaryEntry.version_id == version_id,
                        DictionaryEntry.position >= start,
                    )
                    .order_by(DictionaryEntry.position)
                    .limit(batch_size)
                ).all()
            if not batch:
                return
            for _position, entry_text in batch:
                yield entry_text
            start = batch[-1][0] + 1


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for position, entry_text in enumerate(texts):
        if not isinstance(entry_text, str):
            raise InvalidInputError(
                f"dictionary entry {position} is a {type(entry_text).__name__}, not a string"
            )
        if "\x00" in entry_text:
            raise InvalidInputError(f"dictionary entry {position} contains a NUL character")
        yield entry_text
