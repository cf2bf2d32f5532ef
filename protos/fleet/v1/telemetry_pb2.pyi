import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from protos.fleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TelemetrySchema(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TELEMETRY_SCHEMA_UNSPECIFIED: _ClassVar[TelemetrySchema]
    TELEMETRY_SCHEMA_V1: _ClassVar[TelemetrySchema]
TELEMETRY_SCHEMA_UNSPECIFIED: TelemetrySchema
TELEMETRY_SCHEMA_V1: TelemetrySchema

class Heartbeat(_message.Message):
    __slots__ = ("schema_version", "device_id", "seq", "time", "state", "active_bundle", "api_url", "rss_bytes", "uptime_seconds", "requests_total", "variant")
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
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.DeviceState, str]] = ..., active_bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., api_url: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., requests_total: _Optional[int] = ..., variant: _Optional[str] = ...) -> None: ...

class InferenceRecord(_message.Message):
    __slots__ = ("schema_version", "device_id", "seq", "time", "model", "endpoint", "prompt_tokens", "completion_tokens", "latency_ms", "time_to_first_token_ms", "tokens_per_second", "stream", "error")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    device_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float
    tokens_per_second: float
    stream: bool
    error: str
    def __init__(self, schema_version: _Optional[int] = ..., device_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., endpoint: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., latency_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., stream: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

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
