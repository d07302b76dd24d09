"""What identifies a build (its options and model) and what a build returns.

The fingerprint of the options and the inputs is a build's identity: rerunning a build
with the same one finds its version instead of building another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from bliss.class_statistics import StatisticsPath
from bliss.dictionary_index import IndexOptions
from bliss.milvus_dictionary import MilvusDictionaryOptions
from bliss.scoring import DEFAULT_EPS, DEFAULT_K, DEFAULT_LAMBDA
from bliss.store import StatisticsMode, VersionRecord


@dataclass(frozen=True)
class ModelIdentity:
    """What the store records about the model that produced the embeddings."""

    name: str
    weights: str = ""
    checksum: str | None = None


@dataclass(frozen=True)
class BuildOptions:
    name: str
    model: ModelIdentity
    dictionary_source: str
    prompt_template: str
    index: IndexOptions = field(default_factory=IndexOptions)
    statistics_path: StatisticsPath = StatisticsPath.AUTO
    statistics_mode: StatisticsMode = StatisticsMode.TABLE
    target_recall: float | None = None  # tune approximate search to this recall@K
    default_k: int = DEFAULT_K
    default_lambda: float = DEFAULT_LAMBDA
    eps: float = DEFAULT_EPS
    calibration_fraction: float = 0.0
    encode_precision: str = "fp32"  # of the model encoding images and texts
    dictionary_store: MilvusDictionaryOptions | None = None  # None: a FAISS file

    def fingerprint(self, inputs_fingerprint: str) -> str:
        """Everything that changes the result; the statistics path does not (both exact)."""
        identity = asdict(self)
        identity.pop("statistics_path")
        if self.dictionary_store is None:  # as before Milvus: FAISS builds keep their identity
            identity.pop("dictionary_store")
        identity["inputs"] = inputs_fingerprint
        return hashlib.sha256(
            json.dumps(identity, sort_keys=True, default=str).encode()
        ).hexdigest()


@dataclass(frozen=True)
class BuildOutcome:
    version: VersionRecord
    built: bool  # False when an identical finished version already existed
    stage_seconds: dict[str, float]
