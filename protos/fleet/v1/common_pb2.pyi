import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    DEVICE_STATE_IDLE: _ClassVar[DeviceState]
    DEVICE_STATE_FETCHING: _ClassVar[DeviceState]
    DEVICE_STATE_VERIFYING: _ClassVar[DeviceState]
    DEVICE_STATE_INSTALLING: _ClassVar[DeviceState]
    DEVICE_STATE_TESTING: _ClassVar[DeviceState]
    DEVICE_STATE_ACTIVE: _ClassVar[DeviceState]
    DEVICE_STATE_FAILED: _ClassVar[DeviceState]
    DEVICE_STATE_ROLLED_BACK: _ClassVar[DeviceState]

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_GGUF: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
    MODEL_FORMAT_MLX: _ClassVar[ModelFormat]
DEVICE_STATE_UNSPECIFIED: DeviceState
DEVICE_STATE_IDLE: DeviceState
DEVICE_STATE_FETCHING: DeviceState
DEVICE_STATE_VERIFYING: DeviceState
DEVICE_STATE_INSTALLING: DeviceState
DEVICE_STATE_TESTING: DeviceState
DEVICE_STATE_ACTIVE: DeviceState
DEVICE_STATE_FAILED: DeviceState
DEVICE_STATE_ROLLED_BACK: DeviceState
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_GGUF: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat
MODEL_FORMAT_MLX: ModelFormat

class BundleRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeviceSummary(_message.Message):
    __slots__ = ("device_id", "state", "active_bundle", "desired_bundle", "api_url", "last_seen", "last_error", "last_tokens_per_second", "last_latency_ms", "requests_total", "desired_generation", "applied_generation", "labels", "variant", "revoked", "selection_reason", "pin", "desired_models", "models", "online", "presence_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    API_URL_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LAST_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    DESIRED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_AT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    state: DeviceState
    active_bundle: BundleRef
    desired_bundle: BundleRef
    api_url: str
    last_seen: _timestamp_pb2.Timestamp
    last_error: str
    last_tokens_per_second: float
    last_latency_ms: float
    requests_total: int
    desired_generation: int
    applied_generation: int
    labels: _containers.ScalarMap[str, str]
    variant: str
    revoked: bool
    selection_reason: str
    pin: VariantPin
    desired_models: _containers.RepeatedCompositeFieldContainer[BundleRef]
    models: _containers.RepeatedCompositeFieldContainer[InstalledModel]
    online: bool
    presence_at: _timestamp_pb2.Timestamp
    def __init__(self, device_id: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., active_bundle: _Optional[_Union[BundleRef, _Mapping]] = ..., desired_bundle: _Optional[_Union[BundleRef, _Mapping]] = ..., api_url: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., last_tokens_per_second: _Optional[float] = ..., last_latency_ms: _Optional[float] = ..., requests_total: _Optional[int] = ..., desired_generation: _Optional[int] = ..., applied_generation: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., variant: _Optional[str] = ..., revoked: _Optional[bool] = ..., selection_reason: _Optional[str] = ..., pin: _Optional[_Union[VariantPin, _Mapping]] = ..., desired_models: _Optional[_Iterable[_Union[BundleRef, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[InstalledModel, _Mapping]]] = ..., online: _Optional[bool] = ..., presence_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InstalledModel(_message.Message):
    __slots__ = ("bundle", "variant", "loaded")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    bundle: BundleRef
    variant: str
    loaded: bool
    def __init__(self, bundle: _Optional[_Union[BundleRef, _Mapping]] = ..., variant: _Optional[str] = ..., loaded: _Optional[bool] = ...) -> None: ...

class VariantPin(_message.Message):
    __slots__ = ("variant_id", "format", "scope")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    format: ModelFormat
    scope: str
    def __init__(self, variant_id: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., scope: _Optional[str] = ...) -> None: ...

class DeviceConfig(_message.Message):
    __slots__ = ("n_threads", "n_ctx", "max_running", "max_waiting", "telemetry_interval_seconds", "keep_alive_seconds", "pin", "mirrors", "max_download_rate")
    N_THREADS_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    MIRRORS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOWNLOAD_RATE_FIELD_NUMBER: _ClassVar[int]
    n_threads: int
    n_ctx: int
    max_running: int
    max_waiting: int
    telemetry_interval_seconds: float
    keep_alive_seconds: float
    pin: VariantPin
    mirrors: _containers.RepeatedScalarFieldContainer[str]
    max_download_rate: int
    def __init__(self, n_threads: _Optional[int] = ..., n_ctx: _Optional[int] = ..., max_running: _Optional[int] = ..., max_waiting: _Optional[int] = ..., telemetry_interval_seconds: _Optional[float] = ..., keep_alive_seconds: _Optional[float] = ..., pin: _Optional[_Union[VariantPin, _Mapping]] = ..., mirrors: _Optional[_Iterable[str]] = ..., max_download_rate: _Optional[int] = ...) -> None: ...

class VariantRejection(_message.Message):
    __slots__ = ("variant", "reason")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    variant: str
    reason: str
    def __init__(self, variant: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class VariantSelection(_message.Message):
    __slots__ = ("variant", "format", "accelerator", "reason", "rejections", "pin")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    variant: str
    format: ModelFormat
    accelerator: str
    reason: str
    rejections: _containers.RepeatedCompositeFieldContainer[VariantRejection]
    pin: VariantPin
    def __init__(self, variant: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., accelerator: _Optional[str] = ..., reason: _Optional[str] = ..., rejections: _Optional[_Iterable[_Union[VariantRejection, _Mapping]]] = ..., pin: _Optional[_Union[VariantPin, _Mapping]] = ...) -> None: ...
