"""A version's dictionary held in a Milvus collection instead of a FAISS file.

One collection per version (``id`` = dictionary position, ``text``, ``vector``; inner
product metric) answers the eq. 7 top-K search with the hits' texts and vectors in one
call, so the scorer re-scores them exactly in float64 as it does for FAISS: with a FLAT
collection the scores equal the FAISS flat path's. Milvus is a server (any number of
bliss servers share one, sharded and replicated) or ``milvus-lite``, the same engine in
a local file, which serves one process at a time.

Connections are made from the version's recorded URI plus the environment (never from
the store, which must not hold secrets): ``BLISS_MILVUS_TOKEN`` (``user:password`` or an
API key) and ``BLISS_MILVUS_CA_CERT`` (a PEM file: TLS with that CA).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bliss.dictionary_index import check_search, most_similar_first
from bliss.errors import InvalidInputError, StoreError
from bliss.logger_levels import logger_level

MILVUS_PREFIX = "milvus:"
INSTALL_HINT = "pip install 'bliss-anomaly[milvus]'"
# Queries per Milvus search call: the reply carries K vectors per query, and Milvus caps
# a reply at 64 MiB (1,024 queries x K=10 x D=512 float32 is 20 MiB).
SEARCH_BATCH = 256
# Rows per insert call: about 20 MiB of float32 at D = 512.
INSERT_BATCH = 10_000
# Milvus's default upper bound of a VARCHAR field, in bytes.
MAX_TEXT_BYTES = 65_535
# A health check's wait for Milvus: longer means down, for the server's callers.
CHECK_TIMEOUT_S = 3.0
_TEXT_FIELDS = ["text"]
_HIT_FIELDS = ["text", "vector"]


@dataclass(frozen=True)
class MilvusDictionaryOptions:
    """Where a version's dictionary lives in Milvus and how it is indexed and searched.

    Recorded with the version (``dictionary_options``): servers connect from it.
    """

    uri: str  # milvus-lite file (absolute path) or http(s)://host:port
    collection: str = ""  # set when the version's collection is created
    index_type: str = "FLAT"  # FLAT, IVF_FLAT, HNSW, GPU_CAGRA, ... passed through
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str, **options: Any) -> MilvusDictionaryOptions:
        """``milvus:URI``: a local milvus-lite file or a Milvus server's address."""
        uri = spec.removeprefix(MILVUS_PREFIX).strip()
        if not spec.startswith(MILVUS_PREFIX) or not uri:
            raise InvalidInputError(
                f"--dictionary-store {spec!r}: expected faiss, or milvus:URI with URI a "
                "milvus-lite file (milvus:/data/dictionaries.db) or a server "
                "(milvus:http://milvus:19530)"
            )
        if _is_lite(uri):
            uri = str(Path(uri).expanduser().resolve())
        return cls(uri=uri, **options)

    @property
    def is_lite(self) -> bool:
        return _is_lite(self.uri)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MilvusDictionaryOptions:
        return cls(**json.loads(text))


def _is_lite(uri: str) -> bool:
    """A milvus-lite file, not a server address (scheme://...)."""
    return not re.match(r"^[a-z]+://", uri)


def collection_name(index_name: str, version_id: int, version: int) -> str:
    """A collection name Milvus accepts (letters, digits, _), unique per store row."""
    return f"bliss_{version_id}_{re.sub(r'[^A-Za-z0-9_]', '_', index_name)}_v{version}"


class MilvusClients:
    """One client per URI per process: milvus-lite refuses a second open of its file."""

    _lock = threading.Lock()
    _clients: ClassVar[dict[str, Any]] = {}

    @classmethod
    def get(cls, uri: str) -> Any:
        with cls._lock:
            if uri not in cls._clients:
                cls._clients[uri] = _connect(uri)
            return cls._clients[uri]

    @classmethod
    def close_all(cls) -> None:
        """Release every connection (and milvus-lite files, for other processes)."""
        with cls._lock:
            for uri, client in cls._clients.items():
                client.close()
                if _is_lite(uri):
                    # milvus-lite serves its file from a thread of this process, which a
                    # closed client leaves running (and the file locked) until exit.
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(uri)
            cls._clients.clear()


def _connect(uri: str) -> Any:
    pymilvus = _pymilvus()
    options: dict[str, Any] = {"token": os.environ.get("BLISS_MILVUS_TOKEN", "")}
    if ca_cert := os.environ.get("BLISS_MILVUS_CA_CERT"):
        options |= {"secure": True, "server_pem_path": ca_cert}
    try:
        return pymilvus.MilvusClient(uri=uri, **options)
    except pymilvus.exceptions.MilvusException as error:
        hint = (
            "milvus-lite serves one process at a time: stop the process that has it open "
            "(a server, another build), or use a Milvus server"
            if _is_lite(uri)
            else "check the address, BLISS_MILVUS_TOKEN and BLISS_MILVUS_CA_CERT"
        )
        raise StoreError(f"cannot open Milvus at {uri} ({error.message}): {hint}") from None


class MilvusDictionary:
    """The eq. 7 search over a version's collection (``DictionarySearch``), with exact
    float64 similarities, plus the hits' vectors (moments mode) and texts."""

    def __init__(self, options: MilvusDictionaryOptions, dim: int, ntotal: int) -> None:
        self.options = options
        self.client = MilvusClients.get(options.uri)
        self._dim = dim
        self._ntotal = ntotal
        # The last search's hits, per thread: the scorer asks for their vectors (moments
        # mode) and texts right after it, which then need no second round trip.
        self._hits = threading.local()
        self.check()
        with _milvus_errors(options):
            # Idempotent, and needed: milvus-lite forgets loaded collections between processes.
            self.client.load_collection(options.collection)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def check(self) -> None:
        """Raise StoreError when Milvus does not answer within :data:`CHECK_TIMEOUT_S`, or
        has no such collection (server start-up, health checks)."""
        with _milvus_errors(self.options):
            found = self.client.has_collection(self.options.collection, timeout=CHECK_TIMEOUT_S)
        if not found:
            raise StoreError(
                f"Milvus collection {self.options.collection} does not exist at "
                f"{self.options.uri}: rebuild the version"
            )

    def row_count(self) -> int:
        with _milvus_errors(self.options):
            return int(self.client.get_collection_stats(self.options.collection)["row_count"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities float64 [B, k] (recomputed from the hits' vectors) and ids [B, k]."""
        check_search(queries, k, self.dim, self.ntotal)
        ids = np.empty((len(queries), k), dtype=np.int64)
        vectors = np.empty((len(queries), k, self.dim), dtype=np.float32)
        texts: dict[int, str] = {}
        for start in range(0, len(queries), SEARCH_BATCH):
            block = queries[start : start + SEARCH_BATCH]
            for row, hits in enumerate(self._search_block(block, k), start=start):
                if len(hits) < k:
                    raise InvalidInputError(
                        f"Milvus found {len(hits)} entries for an input, fewer than K={k}: "
                        "lower K, or search with larger --milvus-search-params"
                    )
                for column, hit in enumerate(hits):
                    ids[row, column] = hit["id"]
                    vectors[row, column] = hit["entity"]["vector"]
                    texts[int(hit["id"])] = hit["entity"]["text"]
        self._hits.vectors = dict(
            zip(ids.ravel().tolist(), vectors.reshape(-1, self.dim), strict=True)
        )
        self._hits.texts = texts
        similarities = np.einsum(
            "bd,bkd->bk", queries.astype(np.float64), vectors.astype(np.float64)
        )
        return most_similar_first(similarities, ids)

    def vectors_at(self, ids: np.ndarray) -> np.ndarray:
        """float32 [u, D] vectors of ``ids`` (the last search's hits, else fetched)."""
        known = getattr(self._hits, "vectors", {})
        missing = [int(i) for i in ids if int(i) not in known]
        fetched = dict(known)
        for row in self._get(missing, ["vector"]):
            fetched[int(row["id"])] = np.asarray(row["vector"], dtype=np.float32)
        return np.stack([fetched[int(i)] for i in ids]).astype(np.float32)

    def texts(self, entry_ids: np.ndarray) -> list[str]:
        """``EntryTextSource``: the texts of ``entry_ids`` (the last hits', else fetched)."""
        known = getattr(self._hits, "texts", {})
        fetched = dict(known)
        for row in self._get([int(i) for i in entry_ids if int(i) not in known], _TEXT_FIELDS):
            fetched[int(row["id"])] = row["text"]
        return [fetched[int(i)] for i in entry_ids]

    def _search_block(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        with _milvus_errors(self.options):
            return self.client.search(
                self.options.collection,
                data=np.ascontiguousarray(queries, dtype=np.float32).tolist(),
                limit=k,
                output_fields=_HIT_FIELDS,
                search_params={"metric_type": "IP", "params": self.options.search_params},
            )

    def _get(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        with _milvus_errors(self.options):
            rows = self.client.get(self.options.collection, ids=ids, output_fields=fields)
        if len(rows) != len(set(ids)):
            raise StoreError(
                f"Milvus collection {self.options.collection} lacks some of entries "
                f"{ids[:5]}: rebuild the version"
            )
        return rows


class MilvusDictionaryWriter:
    """Creates a version's collection and fills it from the build's embeddings."""

    def __init__(self, options: MilvusDictionaryOptions, dim: int) -> None:
        self.options = options
        self.dim = dim
        self.client = MilvusClients.get(options.uri)

    def create(self) -> None:
        """A new empty collection (any earlier partial one is dropped first)."""
        pymilvus = _pymilvus()
        self.drop()
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("text", pymilvus.DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=self.dim)
        with _milvus_errors(self.options):
            self.client.create_collection(self.options.collection, schema=schema)

    def insert(self, start: int, texts: list[str], vectors: np.ndarray) -> None:
        for text in texts:
            if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidInputError(
                    f"dictionary entry {text[:40]!r}... is over Milvus's {MAX_TEXT_BYTES} "
                    "bytes per text: shorten it"
                )
        rows = [
            {"id": start + offset, "text": text, "vector": vector}
            for offset, (text, vector) in enumerate(zip(texts, vectors, strict=True))
        ]
        with _milvus_errors(self.options):
            self.client.insert(self.options.collection, rows)

    def finish(self) -> int:
        """Flush, build the vector index, load the collection; returns its row count."""
        index = self.client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type=self.options.index_type,
            metric_type="IP",
            params=self.options.index_params,
        )
        # milvus-lite's in-process gRPC server logs an ERROR traceback for a timestamp call it
        # does not implement while building an index, which then succeeds.
        with _milvus_errors(self.options), logger_level("grpc._server", logging.CRITICAL):
            self.client.flush(self.options.collection)
            self.client.create_index(self.options.collection, index)
            self.client.load_collection(self.options.collection)
            stats = self.client.get_collection_stats(self.options.collection)
        return int(stats["row_count"])

    def drop(self) -> None:
        with _milvus_errors(self.options):
            if self.client.has_collection(self.options.collection):
                self.client.drop_collection(self.options.collection)


def drop_collection(options_json: str) -> None:
    """Drop a deleted version's collection (nothing when it is already gone)."""
    options = MilvusDictionaryOptions.from_json(options_json)
    MilvusDictionaryWriter(options, dim=0).drop()


@contextmanager
def _milvus_errors(options: MilvusDictionaryOptions) -> Iterator[None]:
    """Milvus failures as one StoreError line naming the collection and the server."""
    import grpc

    pymilvus = _pymilvus()
    try:
        yield
    except (pymilvus.exceptions.MilvusException, grpc.RpcError) as error:
        # An unreachable or stalled server surfaces as a raw gRPC error (deadline exceeded).
        reason = error.message if hasattr(error, "message") else _rpc_reason(error)
        raise StoreError(
            f"Milvus at {options.uri} failed on collection {options.collection or '(none)'}: "
            f"{reason}"
        ) from None


def _rpc_reason(error: Exception) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(error).splitlines()[0]


def _pymilvus() -> Any:
    try:
        import pymilvus

        # pymilvus logs every failed call at ERROR with a full traceback; bliss reports each
        # failure as one StoreError line, and a server logs Milvus going down once.
        logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
    except ImportError:
        raise InvalidInputError(
            f"the Milvus dictionary store needs pymilvus: {INSTALL_HINT}"
        ) from None
    return pymilvus
