import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoringMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_MODE_UNSPECIFIED: _ClassVar[ScoringMode]
    SCORING_MODE_BLISS: _ClassVar[ScoringMode]
    SCORING_MODE_IC: _ClassVar[ScoringMode]
    SCORING_MODE_IC_RAW: _ClassVar[ScoringMode]
SCORING_MODE_UNSPECIFIED: ScoringMode
SCORING_MODE_BLISS: ScoringMode
SCORING_MODE_IC: ScoringMode
SCORING_MODE_IC_RAW: ScoringMode

class Embedding(_message.Message):
    __slots__ = ("values", "dim")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    dim: int
    def __init__(self, values: _Optional[bytes] = ..., dim: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "embedding")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    embedding: Embedding
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("index", "mode", "k", "lambda_weight", "return_class_scores", "return_top_entries")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RETURN_CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOP_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    index: str
    mode: ScoringMode
    k: int
    lambda_weight: float
    return_class_scores: bool
    return_top_entries: bool
    def __init__(self, index: _Optional[str] = ..., mode: _Optional[_Union[ScoringMode, str]] = ..., k: _Optional[int] = ..., lambda_weight: _Optional[float] = ..., return_class_scores: _Optional[bool] = ..., return_top_entries: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "options")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    options: ScoreOptions
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class TopEntry(_message.Message):
    __slots__ = ("text", "similarity")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    text: str
    similarity: float
    def __init__(self, text: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "score", "internal_class_score", "external_text_score", "nearest_class", "index_version", "class_scores", "top_entries", "normal_quantile")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_CLASS_SCORE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_TEXT_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEAREST_CLASS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NORMAL_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    internal_class_score: float
    external_text_score: float
    nearest_class: str
    index_version: str
    class_scores: _containers.RepeatedScalarFieldContainer[float]
    top_entries: _containers.RepeatedCompositeFieldContainer[TopEntry]
    normal_quantile: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., internal_class_score: _Optional[float] = ..., external_text_score: _Optional[float] = ..., nearest_class: _Optional[str] = ..., index_version: _Optional[str] = ..., class_scores: _Optional[_Iterable[float]] = ..., top_entries: _Optional[_Iterable[_Union[TopEntry, _Mapping]]] = ..., normal_quantile: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "class_names")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes",)
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ...) -> None: ...

class ScoringDefaults(_message.Message):
    __slots__ = ("k", "lambda_weight", "eps")
    K_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    k: int
    lambda_weight: float
    eps: float
    def __init__(self, k: _Optional[int] = ..., lambda_weight: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "version", "label", "model_name", "model_weights", "embedding_dim", "prompt_template", "dictionary_source", "dictionary_size", "faiss_kind", "classes", "defaults", "accepts_images", "images_unavailable_reason", "calibrated", "statistics_source", "created_at", "activated_at", "loaded_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAISS_KIND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    label: str
    model_name: str
    model_weights: str
    embedding_dim: int
    prompt_template: str
    dictionary_source: str
    dictionary_size: int
    faiss_kind: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    defaults: ScoringDefaults
    accepts_images: bool
    images_unavailable_reason: str
    calibrated: bool
    statistics_source: str
    created_at: _timestamp_pb2.Timestamp
    activated_at: _timestamp_pb2.Timestamp
    loaded_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., label: _Optional[str] = ..., model_name: _Optional[str] = ..., model_weights: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., prompt_template: _Optional[str] = ..., dictionary_source: _Optional[str] = ..., dictionary_size: _Optional[int] = ..., faiss_kind: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., defaults: _Optional[_Union[ScoringDefaults, _Mapping]] = ..., accepts_images: _Optional[bool] = ..., images_unavailable_reason: _Optional[str] = ..., calibrated: _Optional[bool] = ..., statistics_source: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
