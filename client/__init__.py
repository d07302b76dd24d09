"""The bliss client: a Python SDK (sync and asyncio) and the command-line client.

from bliss.client import BlissClient

with BlissClient("127.0.0.1:50051") as client:
    for item in client.score(images=["cam7/0012.jpg"]):
        print(item.id, item.score, item.nearest_class)

``pip install bliss-anomaly`` (no extra) installs this client alone: numpy, grpcio and
protobuf with grpc's health and status helpers. So nothing here may import torch,
open_clip, faiss, SQLAlchemy or pydantic, even indirectly (tests/test_packaging.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bliss.client.async_client import AsyncBlissClient
    from bliss.client.connection import USE_CLIENT_DEFAULT, TlsConfig
    from bliss.client.messages import Batch, FieldViolation, ScoringServiceError
    from bliss.client.sync_client import BlissClient
    from bliss.index_version_info import IndexInfo
    from bliss.scored_item import ScoredItem, TopEntry

# Imported on first use: `bliss <any command>` imports bliss.client.commands, and grpc plus
# numpy would add 0.4 s to every command line.
_EXPORTS = {
    "AsyncBlissClient": "bliss.client.async_client",
    "Batch": "bliss.client.messages",
    "BlissClient": "bliss.client.sync_client",
    "FieldViolation": "bliss.client.messages",
    "IndexInfo": "bliss.index_version_info",
    "ScoredItem": "bliss.scored_item",
    "ScoringServiceError": "bliss.client.messages",
    "TlsConfig": "bliss.client.connection",
    "TopEntry": "bliss.scored_item",
    "USE_CLIENT_DEFAULT": "bliss.client.connection",
}

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncBlissClient",
    "Batch",
    "BlissClient",
    "FieldViolation",
    "IndexInfo",
    "ScoredItem",
    "ScoringServiceError",
    "TlsConfig",
    "TopEntry",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bliss.client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
