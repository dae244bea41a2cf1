from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class BackendStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_STATUS_UNSPECIFIED: _ClassVar[BackendStatus]
    BACKEND_STATUS_READY: _ClassVar[BackendStatus]
    BACKEND_STATUS_LOADING: _ClassVar[BackendStatus]
    BACKEND_STATUS_UNAVAILABLE: _ClassVar[BackendStatus]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_CANCELLED: FinishReason
BACKEND_STATUS_UNSPECIFIED: BackendStatus
BACKEND_STATUS_READY: BackendStatus
BACKEND_STATUS_LOADING: BackendStatus
BACKEND_STATUS_UNAVAILABLE: BackendStatus

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class RoutingKnobs(_message.Message):
    __slots__ = ("cost_weight", "min_quality", "max_cost", "allowed_backends", "denied_backends", "budget_per_request", "budget_key", "max_queue_ms")
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    DENIED_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BUDGET_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    cost_weight: float
    min_quality: float
    max_cost: float
    allowed_backends: _containers.RepeatedScalarFieldContainer[str]
    denied_backends: _containers.RepeatedScalarFieldContainer[str]
    budget_per_request: float
    budget_key: str
    max_queue_ms: float
    def __init__(self, cost_weight: _Optional[float] = ..., min_quality: _Optional[float] = ..., max_cost: _Optional[float] = ..., allowed_backends: _Optional[_Iterable[str]] = ..., denied_backends: _Optional[_Iterable[str]] = ..., budget_per_request: _Optional[float] = ..., budget_key: _Optional[str] = ..., max_queue_ms: _Optional[float] = ...) -> None: ...

class ResponseMetadata(_message.Message):
    __slots__ = ("request_id", "server_version", "api_version", "embedder", "datastore_records", "served_at_unix_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SERVED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    server_version: str
    api_version: str
    embedder: str
    datastore_records: int
    served_at_unix_ms: int
    def __init__(self, request_id: _Optional[str] = ..., server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., embedder: _Optional[str] = ..., datastore_records: _Optional[int] = ..., served_at_unix_ms: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("embedding_ms", "prediction_ms", "total_ms")
    EMBEDDING_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    embedding_ms: float
    prediction_ms: float
    total_ms: float
    def __init__(self, embedding_ms: _Optional[float] = ..., prediction_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("backend", "predicted_quality", "predicted_cost", "utility", "rank", "support")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COST_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    backend: str
    predicted_quality: float
    predicted_cost: float
    utility: float
    rank: int
    support: float
    def __init__(self, backend: _Optional[str] = ..., predicted_quality: _Optional[float] = ..., predicted_cost: _Optional[float] = ..., utility: _Optional[float] = ..., rank: _Optional[int] = ..., support: _Optional[float] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("backend", "reason")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    backend: str
    reason: str
    def __init__(self, backend: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("prompt", "messages", "knobs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    knobs: RoutingKnobs
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., knobs: _Optional[_Union[RoutingKnobs, _Mapping]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("metadata", "decision_id", "backend", "candidates", "excluded", "timings", "cost_unit", "cost_weight")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COST_UNIT_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    decision_id: str
    backend: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    timings: Timings
    cost_unit: str
    cost_weight: float
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., decision_id: _Optional[str] = ..., backend: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., cost_unit: _Optional[str] = ..., cost_weight: _Optional[float] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("prompt", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class RouteBatchRequest(_message.Message):
    __slots__ = ("items", "knobs")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    knobs: RoutingKnobs
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., knobs: _Optional[_Union[RoutingKnobs, _Mapping]] = ...) -> None: ...

class RouteBatchResponse(_message.Message):
    __slots__ = ("metadata", "decisions", "cost_weight", "predicted_mean_cost", "predicted_mean_quality", "cost_unit")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MEAN_COST_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MEAN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    COST_UNIT_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    decisions: _containers.RepeatedCompositeFieldContainer[RouteResponse]
    cost_weight: float
    predicted_mean_cost: float
    predicted_mean_quality: float
    cost_unit: str
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[RouteResponse, _Mapping]]] = ..., cost_weight: _Optional[float] = ..., predicted_mean_cost: _Optional[float] = ..., predicted_mean_quality: _Optional[float] = ..., cost_unit: _Optional[str] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "stop", "seed", "cache")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    cache: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., cache: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "knobs", "params")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    knobs: RoutingKnobs
    params: GenerationParams
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., knobs: _Optional[_Union[RoutingKnobs, _Mapping]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class FallbackAttempt(_message.Message):
    __slots__ = ("backend", "error")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    backend: str
    error: str
    def __init__(self, backend: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateStart(_message.Message):
    __slots__ = ("decision_id", "backend", "candidates", "excluded", "timings", "fallbacks", "cost_unit", "cost_weight", "cache", "cache_similarity")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    COST_UNIT_FIELD_NUMBER: _ClassVar[int]
    COST_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    CACHE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    backend: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    timings: Timings
    fallbacks: _containers.RepeatedCompositeFieldContainer[FallbackAttempt]
    cost_unit: str
    cost_weight: float
    cache: str
    cache_similarity: float
    def __init__(self, decision_id: _Optional[str] = ..., backend: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., fallbacks: _Optional[_Iterable[_Union[FallbackAttempt, _Mapping]]] = ..., cost_unit: _Optional[str] = ..., cost_weight: _Optional[float] = ..., cache: _Optional[str] = ..., cache_similarity: _Optional[float] = ...) -> None: ...

class GenerateEnd(_message.Message):
    __slots__ = ("finish_reason", "usage", "latency_ms", "time_to_first_token_ms", "tokens_per_second", "backend")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    latency_ms: float
    time_to_first_token_ms: float
    tokens_per_second: float
    backend: str
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., latency_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., backend: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("metadata", "start", "text", "end")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    start: GenerateStart
    text: str
    end: GenerateEnd
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., start: _Optional[_Union[GenerateStart, _Mapping]] = ..., text: _Optional[str] = ..., end: _Optional[_Union[GenerateEnd, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("decision_id", "prompt", "messages", "backend", "score", "cost")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    backend: str
    score: float
    cost: float
    def __init__(self, decision_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., backend: _Optional[str] = ..., score: _Optional[float] = ..., cost: _Optional[float] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("metadata", "record_id", "backend")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    record_id: str
    backend: str
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., record_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CostModel(_message.Message):
    __slots__ = ("kind", "unit", "per_request", "input_per_million_tokens", "output_per_million_tokens", "active_parameters", "expected_output_tokens", "summary", "price_per_gflop")
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MILLION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MILLION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GFLOP_FIELD_NUMBER: _ClassVar[int]
    kind: str
    unit: str
    per_request: float
    input_per_million_tokens: float
    output_per_million_tokens: float
    active_parameters: int
    expected_output_tokens: int
    summary: str
    price_per_gflop: float
    def __init__(self, kind: _Optional[str] = ..., unit: _Optional[str] = ..., per_request: _Optional[float] = ..., input_per_million_tokens: _Optional[float] = ..., output_per_million_tokens: _Optional[float] = ..., active_parameters: _Optional[int] = ..., expected_output_tokens: _Optional[int] = ..., summary: _Optional[str] = ..., price_per_gflop: _Optional[float] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("name", "kind", "cost_model", "status", "description", "status_detail", "prior_quality", "outcomes", "queue", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    PRIOR_QUALITY_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    cost_model: CostModel
    status: BackendStatus
    description: str
    status_detail: str
    prior_quality: float
    outcomes: int
    queue: QueueInfo
    capabilities: Capabilities
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., cost_model: _Optional[_Union[CostModel, _Mapping]] = ..., status: _Optional[_Union[BackendStatus, str]] = ..., description: _Optional[str] = ..., status_detail: _Optional[str] = ..., prior_quality: _Optional[float] = ..., outcomes: _Optional[int] = ..., queue: _Optional[_Union[QueueInfo, _Mapping]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("context_window", "max_output_tokens", "tools", "json_mode", "params")
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    JSON_MODE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    context_window: int
    max_output_tokens: int
    tools: bool
    json_mode: bool
    params: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, context_window: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., tools: _Optional[bool] = ..., json_mode: _Optional[bool] = ..., params: _Optional[_Iterable[str]] = ...) -> None: ...

class QueueInfo(_message.Message):
    __slots__ = ("running", "waiting", "max_batch", "max_queue", "expected_wait_ms")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    max_batch: int
    max_queue: int
    expected_wait_ms: float
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., expected_wait_ms: _Optional[float] = ...) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("metadata", "backends")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ...) -> None: ...

class AptitudeResult(_message.Message):
    __slots__ = ("item_id", "prompt", "score", "cost")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    prompt: str
    score: float
    cost: float
    def __init__(self, item_id: _Optional[str] = ..., prompt: _Optional[str] = ..., score: _Optional[float] = ..., cost: _Optional[float] = ...) -> None: ...

class OnboardRequest(_message.Message):
    __slots__ = ("backend", "description", "cost_model", "results")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    description: str
    cost_model: CostModel
    results: _containers.RepeatedCompositeFieldContainer[AptitudeResult]
    def __init__(self, backend: _Optional[str] = ..., description: _Optional[str] = ..., cost_model: _Optional[_Union[CostModel, _Mapping]] = ..., results: _Optional[_Iterable[_Union[AptitudeResult, _Mapping]]] = ...) -> None: ...

class OnboardResponse(_message.Message):
    __slots__ = ("metadata", "backend", "created", "results_used", "mean_score", "capability_fitted")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_USED_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FITTED_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    backend: BackendInfo
    created: bool
    results_used: int
    mean_score: float
    capability_fitted: bool
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., backend: _Optional[_Union[BackendInfo, _Mapping]] = ..., created: _Optional[bool] = ..., results_used: _Optional[int] = ..., mean_score: _Optional[float] = ..., capability_fitted: _Optional[bool] = ...) -> None: ...

class RetractFeedbackRequest(_message.Message):
    __slots__ = ("key", "since_unix")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    key: str
    since_unix: float
    def __init__(self, key: _Optional[str] = ..., since_unix: _Optional[float] = ...) -> None: ...

class RetractFeedbackResponse(_message.Message):
    __slots__ = ("metadata", "retracted")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    RETRACTED_FIELD_NUMBER: _ClassVar[int]
    metadata: ResponseMetadata
    retracted: int
    def __init__(self, metadata: _Optional[_Union[ResponseMetadata, _Mapping]] = ..., retracted: _Optional[int] = ...) -> None: ...
