import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from edgefleet.protos.fleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TelemetrySchema(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TELEMETRY_SCHEMA_UNSPECIFIED: _ClassVar[TelemetrySchema]
    TELEMETRY_SCHEMA_V1: _ClassVar[TelemetrySchema]
TELEMETRY_SCHEMA_UNSPECIFIED: TelemetrySchema
TELEMETRY_SCHEMA_V1: TelemetrySchema

class Heartbeat(_message.Message):
    __slots__ = ("schema_version", "device_id", "seq", "time", "state", "active_bundle", "api_url", "rss_bytes", "uptime_seconds", "requests_total", "variant", "cpu_percent", "memory_available_bytes", "disk_free_bytes", "records_produced", "records_dropped", "outbox_pending", "models")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    API_URL_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PRODUCED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_PENDING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    state: _common_pb2.DeviceState
    active_bundle: _common_pb2.BundleRef
    api_url: str
    rss_bytes: int
    uptime_seconds: float
    requests_total: int
    variant: str
    cpu_percent: float
    memory_available_bytes: int
    disk_free_bytes: int
    records_produced: int
    records_dropped: int
    outbox_pending: int
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.InstalledModel]
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.DeviceState, str]] = ..., active_bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., api_url: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., requests_total: _Optional[int] = ..., variant: _Optional[str] = ..., cpu_percent: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., records_produced: _Optional[int] = ..., records_dropped: _Optional[int] = ..., outbox_pending: _Optional[int] = ..., models: _Optional[_Iterable[_Union[_common_pb2.InstalledModel, _Mapping]]] = ...) -> None: ...

class InferenceSummary(_message.Message):
    __slots__ = ("schema_version", "device_id", "seq", "time", "window_start", "model", "bundle", "variant", "requests", "errors", "errors_by_code", "requests_by_endpoint", "prompt_tokens", "completion_tokens", "latency_ms_p50", "latency_ms_p95", "latency_ms_max", "time_to_first_token_ms_p50", "time_to_first_token_ms_p95", "tokens_per_second", "decode_tokens", "decode_seconds")
    class ErrorsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RequestsByEndpointEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_MAX_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_P50_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_P95_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    window_start: _timestamp_pb2.Timestamp
    model: str
    bundle: _common_pb2.BundleRef
    variant: str
    requests: int
    errors: int
    errors_by_code: _containers.ScalarMap[str, int]
    requests_by_endpoint: _containers.ScalarMap[str, int]
    prompt_tokens: int
    completion_tokens: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_max: float
    time_to_first_token_ms_p50: float
    time_to_first_token_ms_p95: float
    tokens_per_second: float
    decode_tokens: int
    decode_seconds: float
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., variant: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., errors_by_code: _Optional[_Mapping[str, int]] = ..., requests_by_endpoint: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., latency_ms_p50: _Optional[float] = ..., latency_ms_p95: _Optional[float] = ..., latency_ms_max: _Optional[float] = ..., time_to_first_token_ms_p50: _Optional[float] = ..., time_to_first_token_ms_p95: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., decode_tokens: _Optional[int] = ..., decode_seconds: _Optional[float] = ...) -> None: ...

class DeploymentEvent(_message.Message):
    __slots__ = ("schema_version", "device_id", "seq", "time", "generation", "bundle", "state", "detail", "selection")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    generation: int
    bundle: _common_pb2.BundleRef
    state: _common_pb2.DeviceState
    detail: str
    selection: _common_pb2.VariantSelection
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation: _Optional[int] = ..., bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.DeviceState, str]] = ..., detail: _Optional[str] = ..., selection: _Optional[_Union[_common_pb2.VariantSelection, _Mapping]] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("schema_version", "device_id", "online", "time", "reason")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    online: bool
    time: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., online: _Optional[bool] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("schema_version", "device_id", "time", "state", "desired_generation", "applied_generation", "models", "api_url", "last_error", "selection_reason")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    API_URL_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SELECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    time: _timestamp_pb2.Timestamp
    state: _common_pb2.DeviceState
    desired_generation: int
    applied_generation: int
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.InstalledModel]
    api_url: str
    last_error: str
    selection_reason: str
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.DeviceState, str]] = ..., desired_generation: _Optional[int] = ..., applied_generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[_common_pb2.InstalledModel, _Mapping]]] = ..., api_url: _Optional[str] = ..., last_error: _Optional[str] = ..., selection_reason: _Optional[str] = ...) -> None: ...
