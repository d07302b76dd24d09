"""A served index version described as the protobuf IndexInfo."""

from __future__ import annotations

from dataclasses import asdict

from bliss.index_version_info import IndexInfo
from bliss.server.index_registry import ServedIndex
from bliss.v1 import scorer_pb2


def index_info(served: ServedIndex) -> scorer_pb2.IndexInfo:
    scorer = served.scorer
    return IndexInfo(
        **asdict(served.version.info()),
        classes=tuple(scorer.classes.names),
        accepts_images=served.images is not None,
        images_unavailable_reason=served.images_unavailable_reason,
        calibrated=scorer.calibration is not None,
        statistics_source=served.statistics_source,
        loaded_at=served.loaded_at,
    ).to_proto()
