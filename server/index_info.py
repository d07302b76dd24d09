"""A served index version described as the protobuf IndexInfo."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from bliss.server.index_registry import ServedIndex
from bliss.v1 import scorer_pb2


def index_info(served: ServedIndex) -> scorer_pb2.IndexInfo:
    version = served.version
    scorer = served.scorer
    info = scorer_pb2.IndexInfo(
        name=version.name,
        version=version.version,
        label=version.label,
        model_name=version.model_name,
        model_weights=version.model_weights,
        embedding_dim=scorer.dim,
        prompt_template=version.prompt_template,
        dictionary_source=version.dictionary_source,
        dictionary_size=scorer.dictionary_size,
        faiss_kind=version.faiss_kind,
        classes=list(scorer.classes.names),
        defaults=scorer_pb2.ScoringDefaults(
            k=scorer.defaults.k, lambda_weight=scorer.defaults.lam, eps=scorer.defaults.eps
        ),
        accepts_images=served.images is not None,
        images_unavailable_reason=served.images_unavailable_reason,
        calibrated=scorer.calibration is not None,
        statistics_source=served.statistics_source,
        created_at=_timestamp(version.created_at),
        loaded_at=_timestamp(served.loaded_at),
    )
    if version.activated_at is not None:
        info.activated_at.CopyFrom(_timestamp(version.activated_at))
    return info


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
