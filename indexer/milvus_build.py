"""The build stage that fills a version's Milvus collection (``--dictionary-store milvus:URI``).

It takes the place of the FAISS stage: the dictionary's ids, texts and vectors are
inserted block by block, then Milvus builds the vector index and loads the collection.
The blocks are inserted by the build's executor: with ``--backend ray`` every Ray worker
reads its rows from the (shared) workspace and inserts them into Milvus in parallel.
milvus-lite serves one process, so a lite file is always filled from the driver.
The stage is redone whole when a killed build resumes (the collection is dropped and
refilled): a half-filled collection cannot say which rows it holds without reading
them all back.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from bliss.errors import StoreError
from bliss.indexer.executors import Executor, LocalExecutor
from bliss.indexer.workspace import BuildWorkspace, Provenance, digest
from bliss.milvus_dictionary import (
    INSERT_BATCH,
    MilvusDictionaryOptions,
    MilvusDictionaryWriter,
    collection_name,
)
from bliss.npy_files import read_rows
from bliss.store import Store, VersionRecord

logger = logging.getLogger(__name__)

MILVUS_STAGE = "milvus collection"


@dataclass(frozen=True)
class InsertBlock:
    """Entries ``start:start + len(texts)``: a unit of work for any executor."""

    options: MilvusDictionaryOptions
    start: int
    texts: list[str]
    dictionary_file: Path


def insert_block(block: InsertBlock) -> int:
    stop = block.start + len(block.texts)
    vectors = read_rows(block.dictionary_file, block.start, stop)
    MilvusDictionaryWriter(block.options, len(vectors[0])).insert(block.start, block.texts, vectors)
    return len(block.texts)


def write_milvus_collection(
    executor: Executor,
    store: Store,
    workspace: BuildWorkspace,
    version: VersionRecord,
    options: MilvusDictionaryOptions,
    texts: Iterator[str],
    dictionary_file: Path,
    lineage: Provenance,
) -> str:
    """Fill (or find filled) the version's collection; returns its identity for lineage."""
    options = replace(
        options, collection=collection_name(version.name, version.id, version.version)
    )
    produced_by = {**lineage, "milvus": asdict(options)}
    if workspace.matches(MILVUS_STAGE, produced_by):
        logger.info("Milvus collection %s already filled", options.collection)
        return digest(options.to_json())
    writer = MilvusDictionaryWriter(options, version.embedding_dim)
    writer.create()
    rows = version.dictionary_size
    blocks = (
        InsertBlock(options, start, list(itertools.islice(texts, INSERT_BATCH)), dictionary_file)
        for start in range(0, rows, INSERT_BATCH)
    )
    inserter = LocalExecutor() if options.is_lite else executor
    with tqdm(total=rows, desc="fill Milvus", unit="entry") as bar:
        for inserted in inserter.map(insert_block, blocks):
            bar.update(inserted)
    filled = writer.finish()
    if filled != rows:
        raise StoreError(
            f"Milvus collection {options.collection} holds {filled} rows, expected {rows}: "
            "run the build again (the collection is refilled)"
        )
    store.set_dictionary_store(version.id, "milvus", options.to_json())
    workspace.mark(MILVUS_STAGE, produced_by)
    logger.info(
        "Milvus collection %s at %s: %d entries, %s index",
        options.collection, options.uri, rows, options.index_type,
    )  # fmt: skip
    return digest(options.to_json())
