from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_FORMAT_FLOAT_LIST: _ClassVar[VectorFormat]
    VECTOR_FORMAT_FLOAT32_BYTES: _ClassVar[VectorFormat]
    VECTOR_FORMAT_FLOAT16_BYTES: _ClassVar[VectorFormat]
    VECTOR_FORMAT_INT8: _ClassVar[VectorFormat]
    VECTOR_FORMAT_UINT8: _ClassVar[VectorFormat]
    VECTOR_FORMAT_BINARY: _ClassVar[VectorFormat]
    VECTOR_FORMAT_UBINARY: _ClassVar[VectorFormat]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BULK: _ClassVar[Priority]
VECTOR_FORMAT_FLOAT_LIST: VectorFormat
VECTOR_FORMAT_FLOAT32_BYTES: VectorFormat
VECTOR_FORMAT_FLOAT16_BYTES: VectorFormat
VECTOR_FORMAT_INT8: VectorFormat
VECTOR_FORMAT_UINT8: VectorFormat
VECTOR_FORMAT_BINARY: VectorFormat
VECTOR_FORMAT_UBINARY: VectorFormat
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BULK: Priority

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts", "format", "model", "language", "priority")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    format: VectorFormat
    model: str
    language: str
    priority: Priority
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[VectorFormat, str]] = ..., model: _Optional[str] = ..., language: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class EmbedImageRequest(_message.Message):
    __slots__ = ("images", "pixels", "format", "model", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    pixels: _containers.RepeatedScalarFieldContainer[bytes]
    format: VectorFormat
    model: str
    priority: Priority
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., pixels: _Optional[_Iterable[bytes]] = ..., format: _Optional[_Union[VectorFormat, str]] = ..., model: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "packed", "truncated", "cached", "dim", "format")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    packed: bytes
    truncated: bool
    cached: bool
    dim: int
    format: VectorFormat
    def __init__(self, values: _Optional[_Iterable[float]] = ..., packed: _Optional[bytes] = ..., truncated: _Optional[bool] = ..., cached: _Optional[bool] = ..., dim: _Optional[int] = ..., format: _Optional[_Union[VectorFormat, str]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    model: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("text", "image", "pixels")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    pixels: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., pixels: _Optional[bytes] = ...) -> None: ...

class SimilarityRequest(_message.Message):
    __slots__ = ("queries", "candidates", "model", "language", "priority")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Item]
    candidates: _containers.RepeatedCompositeFieldContainer[Item]
    model: str
    language: str
    priority: Priority
    def __init__(self, queries: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., model: _Optional[str] = ..., language: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("scores", "probabilities")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class SimilarityResponse(_message.Message):
    __slots__ = ("rows", "model")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    model: str
    def __init__(self, rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "pixels", "labels", "templates", "top_k", "model", "language", "priority")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    pixels: _containers.RepeatedScalarFieldContainer[bytes]
    labels: _containers.RepeatedScalarFieldContainer[str]
    templates: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    model: str
    language: str
    priority: Priority
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., pixels: _Optional[_Iterable[bytes]] = ..., labels: _Optional[_Iterable[str]] = ..., templates: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ..., language: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    score: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelScore]
    def __init__(self, labels: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "pretrained", "embedding_dim", "image_size", "context_length", "logit_scale", "backend", "model_id", "weights_sha256", "logit_bias", "score_function", "languages", "default_language", "tokenizer", "name", "accepts_pixels", "image_interpolation", "exif_transpose", "catalog_accepts_pixels")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PIXELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    EXIF_TRANSPOSE_FIELD_NUMBER: _ClassVar[int]
    CATALOG_ACCEPTS_PIXELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    pretrained: str
    embedding_dim: int
    image_size: int
    context_length: int
    logit_scale: float
    backend: str
    model_id: str
    weights_sha256: str
    logit_bias: float
    score_function: str
    languages: _containers.RepeatedScalarFieldContainer[str]
    default_language: str
    tokenizer: str
    name: str
    accepts_pixels: bool
    image_interpolation: str
    exif_transpose: bool
    catalog_accepts_pixels: bool
    def __init__(self, model_name: _Optional[str] = ..., pretrained: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., context_length: _Optional[int] = ..., logit_scale: _Optional[float] = ..., backend: _Optional[str] = ..., model_id: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., logit_bias: _Optional[float] = ..., score_function: _Optional[str] = ..., languages: _Optional[_Iterable[str]] = ..., default_language: _Optional[str] = ..., tokenizer: _Optional[str] = ..., name: _Optional[str] = ..., accepts_pixels: _Optional[bool] = ..., image_interpolation: _Optional[str] = ..., exif_transpose: _Optional[bool] = ..., catalog_accepts_pixels: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("id", "text", "image", "pixels", "format", "model", "language", "priority")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    image: bytes
    pixels: bytes
    format: VectorFormat
    model: str
    language: str
    priority: Priority
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., pixels: _Optional[bytes] = ..., format: _Optional[_Union[VectorFormat, str]] = ..., model: _Optional[str] = ..., language: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("id", "embedding", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    embedding: Embedding
    error: StreamError
    def __init__(self, id: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class CatalogItem(_message.Message):
    __slots__ = ("id", "text", "image", "pixels", "source_sha256", "metadata_json", "model", "language")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    image: bytes
    pixels: bytes
    source_sha256: str
    metadata_json: str
    model: str
    language: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., pixels: _Optional[bytes] = ..., source_sha256: _Optional[str] = ..., metadata_json: _Optional[str] = ..., model: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class CatalogAddResult(_message.Message):
    __slots__ = ("id", "error", "content_sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    error: StreamError
    content_sha256: str
    def __init__(self, id: _Optional[str] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class CatalogDeleteRequest(_message.Message):
    __slots__ = ("ids", "model")
    IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class CatalogDeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class CatalogGetRequest(_message.Message):
    __slots__ = ("ids", "model")
    IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class CatalogEntry(_message.Message):
    __slots__ = ("id", "metadata_json", "content_sha256")
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata_json: str
    content_sha256: str
    def __init__(self, id: _Optional[str] = ..., metadata_json: _Optional[str] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class CatalogGetResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ...) -> None: ...

class QueryVector(_message.Message):
    __slots__ = ("values", "model_id")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    model_id: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., model_id: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "image", "vector", "pixels", "item_id", "top_k", "filter_json", "model", "language")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    vector: QueryVector
    pixels: bytes
    item_id: str
    top_k: int
    filter_json: str
    model: str
    language: str
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[QueryVector, _Mapping]] = ..., pixels: _Optional[bytes] = ..., item_id: _Optional[str] = ..., top_k: _Optional[int] = ..., filter_json: _Optional[str] = ..., model: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    model: str
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...
