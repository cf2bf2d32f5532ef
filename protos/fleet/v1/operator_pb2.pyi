import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from edgefleet.protos.fleet.v1 import common_pb2 as _common_pb2
from edgefleet.protos.fleet.v1 import bundle_pb2 as _bundle_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_RUNNING: _ClassVar[RolloutState]
    ROLLOUT_STATE_PAUSED: _ClassVar[RolloutState]
    ROLLOUT_STATE_COMPLETED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]

class RolloutDeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_DEVICE_STATE_UNSPECIFIED: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_PENDING: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_UPDATING: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_UPDATED: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_HEALTHY: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_FAILED: _ClassVar[RolloutDeviceState]
    ROLLOUT_DEVICE_STATE_ROLLED_BACK: _ClassVar[RolloutDeviceState]

class RolloutAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_ACTION_UNSPECIFIED: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_PAUSE: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_RESUME: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_ABORT: _ClassVar[RolloutAction]
    ROLLOUT_ACTION_ROLLBACK: _ClassVar[RolloutAction]
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_RUNNING: RolloutState
ROLLOUT_STATE_PAUSED: RolloutState
ROLLOUT_STATE_COMPLETED: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState
ROLLOUT_DEVICE_STATE_UNSPECIFIED: RolloutDeviceState
ROLLOUT_DEVICE_STATE_PENDING: RolloutDeviceState
ROLLOUT_DEVICE_STATE_UPDATING: RolloutDeviceState
ROLLOUT_DEVICE_STATE_UPDATED: RolloutDeviceState
ROLLOUT_DEVICE_STATE_HEALTHY: RolloutDeviceState
ROLLOUT_DEVICE_STATE_FAILED: RolloutDeviceState
ROLLOUT_DEVICE_STATE_ROLLED_BACK: RolloutDeviceState
ROLLOUT_ACTION_UNSPECIFIED: RolloutAction
ROLLOUT_ACTION_PAUSE: RolloutAction
ROLLOUT_ACTION_RESUME: RolloutAction
ROLLOUT_ACTION_ABORT: RolloutAction
ROLLOUT_ACTION_ROLLBACK: RolloutAction

class SetDeviceLabelsRequest(_message.Message):
    __slots__ = ("device_id", "set", "remove")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class SetDeviceLabelsResponse(_message.Message):
    __slots__ = ("labels",)
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WaveSpec(_message.Message):
    __slots__ = ("percent", "count")
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    percent: float
    count: int
    def __init__(self, percent: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class HealthGates(_message.Message):
    __slots__ = ("max_load_failure_rate", "max_error_rate", "max_p95_latency_ratio", "min_tokens_per_second_ratio", "min_requests")
    MAX_LOAD_FAILURE_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_P95_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_PER_SECOND_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_load_failure_rate: float
    max_error_rate: float
    max_p95_latency_ratio: float
    min_tokens_per_second_ratio: float
    min_requests: int
    def __init__(self, max_load_failure_rate: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_p95_latency_ratio: _Optional[float] = ..., min_tokens_per_second_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ...) -> None: ...

class CreateRolloutRequest(_message.Message):
    __slots__ = ("name", "bundle", "config", "selector", "waves", "soak_seconds", "max_concurrent", "gates")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    bundle: _common_pb2.BundleRef
    config: _common_pb2.DeviceConfig
    selector: _containers.ScalarMap[str, str]
    waves: _containers.RepeatedCompositeFieldContainer[WaveSpec]
    soak_seconds: int
    max_concurrent: int
    gates: HealthGates
    def __init__(self, name: _Optional[str] = ..., bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., config: _Optional[_Union[_common_pb2.DeviceConfig, _Mapping]] = ..., selector: _Optional[_Mapping[str, str]] = ..., waves: _Optional[_Iterable[_Union[WaveSpec, _Mapping]]] = ..., soak_seconds: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., gates: _Optional[_Union[HealthGates, _Mapping]] = ...) -> None: ...

class RolloutDevice(_message.Message):
    __slots__ = ("device_id", "wave", "state", "reason", "generation", "previous_bundle")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    wave: int
    state: RolloutDeviceState
    reason: str
    generation: int
    previous_bundle: _common_pb2.BundleRef
    def __init__(self, device_id: _Optional[str] = ..., wave: _Optional[int] = ..., state: _Optional[_Union[RolloutDeviceState, str]] = ..., reason: _Optional[str] = ..., generation: _Optional[int] = ..., previous_bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ...) -> None: ...

class WaveStatus(_message.Message):
    __slots__ = ("index", "devices", "updated", "healthy", "failed", "soak_until", "gate_result")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SOAK_UNTIL_FIELD_NUMBER: _ClassVar[int]
    GATE_RESULT_FIELD_NUMBER: _ClassVar[int]
    index: int
    devices: int
    updated: int
    healthy: int
    failed: int
    soak_until: _timestamp_pb2.Timestamp
    gate_result: str
    def __init__(self, index: _Optional[int] = ..., devices: _Optional[int] = ..., updated: _Optional[int] = ..., healthy: _Optional[int] = ..., failed: _Optional[int] = ..., soak_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gate_result: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("id", "name", "state", "bundle", "config", "selector", "waves", "soak_seconds", "max_concurrent", "gates", "current_wave", "wave_status", "devices", "reason", "created", "updated", "created_by", "devices_omitted")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_WAVE_FIELD_NUMBER: _ClassVar[int]
    WAVE_STATUS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    DEVICES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    state: RolloutState
    bundle: _common_pb2.BundleRef
    config: _common_pb2.DeviceConfig
    selector: _containers.ScalarMap[str, str]
    waves: _containers.RepeatedCompositeFieldContainer[WaveSpec]
    soak_seconds: int
    max_concurrent: int
    gates: HealthGates
    current_wave: int
    wave_status: _containers.RepeatedCompositeFieldContainer[WaveStatus]
    devices: _containers.RepeatedCompositeFieldContainer[RolloutDevice]
    reason: str
    created: _timestamp_pb2.Timestamp
    updated: _timestamp_pb2.Timestamp
    created_by: str
    devices_omitted: int
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., state: _Optional[_Union[RolloutState, str]] = ..., bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., config: _Optional[_Union[_common_pb2.DeviceConfig, _Mapping]] = ..., selector: _Optional[_Mapping[str, str]] = ..., waves: _Optional[_Iterable[_Union[WaveSpec, _Mapping]]] = ..., soak_seconds: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., gates: _Optional[_Union[HealthGates, _Mapping]] = ..., current_wave: _Optional[int] = ..., wave_status: _Optional[_Iterable[_Union[WaveStatus, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[RolloutDevice, _Mapping]]] = ..., reason: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., devices_omitted: _Optional[int] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts", "next_page_token")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    next_page_token: str
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ControlRolloutRequest(_message.Message):
    __slots__ = ("rollout", "action")
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    rollout: GetRolloutRequest
    action: RolloutAction
    def __init__(self, rollout: _Optional[_Union[GetRolloutRequest, _Mapping]] = ..., action: _Optional[_Union[RolloutAction, str]] = ...) -> None: ...

class SetVariantPinRequest(_message.Message):
    __slots__ = ("device_id", "selector", "variant_id", "format", "clear")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    selector: _containers.ScalarMap[str, str]
    variant_id: str
    format: _common_pb2.ModelFormat
    clear: bool
    def __init__(self, device_id: _Optional[str] = ..., selector: _Optional[_Mapping[str, str]] = ..., variant_id: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ModelFormat, str]] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetVariantPinResponse(_message.Message):
    __slots__ = ("device_ids", "max_generation", "changed")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    max_generation: int
    changed: bool
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ..., max_generation: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class CreateOperatorRequest(_message.Message):
    __slots__ = ("name", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class CreateOperatorResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class ListOperatorsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class OperatorInfo(_message.Message):
    __slots__ = ("name", "role", "created", "revoked")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    created: _timestamp_pb2.Timestamp
    revoked: bool
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked: _Optional[bool] = ...) -> None: ...

class ListOperatorsResponse(_message.Message):
    __slots__ = ("operators", "next_page_token")
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[OperatorInfo]
    next_page_token: str
    def __init__(self, operators: _Optional[_Iterable[_Union[OperatorInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeOperatorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeOperatorResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("actor", "action", "target", "since", "limit", "page_size", "page_token")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    actor: str
    action: str
    target: str
    since: _timestamp_pb2.Timestamp
    limit: int
    page_size: int
    page_token: str
    def __init__(self, actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("seq", "time", "actor", "action", "target", "outcome", "detail_json", "hash", "detail_truncated")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    DETAIL_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    outcome: str
    detail_json: str
    hash: str
    detail_truncated: bool
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., detail_json: _Optional[str] = ..., hash: _Optional[str] = ..., detail_truncated: _Optional[bool] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "entries", "head", "broken_at", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    BROKEN_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries: int
    head: str
    broken_at: int
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., entries: _Optional[int] = ..., head: _Optional[str] = ..., broken_at: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GetImageTargetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetImageTargetsResponse(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: bytes
    def __init__(self, targets: _Optional[bytes] = ...) -> None: ...

class PushRootRequest(_message.Message):
    __slots__ = ("repository", "root")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    repository: str
    root: bytes
    def __init__(self, repository: _Optional[str] = ..., root: _Optional[bytes] = ...) -> None: ...

class PushRootResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PushBundleRequest(_message.Message):
    __slots__ = ("header", "artifact")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    artifact: ArtifactData
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., artifact: _Optional[_Union[ArtifactData, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("release_metadata", "image_targets")
    RELEASE_METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TARGETS_FIELD_NUMBER: _ClassVar[int]
    release_metadata: bytes
    image_targets: bytes
    def __init__(self, release_metadata: _Optional[bytes] = ..., image_targets: _Optional[bytes] = ...) -> None: ...

class ArtifactData(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushBundleResponse(_message.Message):
    __slots__ = ("bundle", "already_present")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    bundle: _common_pb2.BundleRef
    already_present: bool
    def __init__(self, bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., already_present: _Optional[bool] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("manifest", "created", "expires", "total_bytes")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    manifest: _bundle_pb2.BundleManifest
    created: _timestamp_pb2.Timestamp
    expires: _timestamp_pb2.Timestamp
    total_bytes: int
    def __init__(self, manifest: _Optional[_Union[_bundle_pb2.BundleManifest, _Mapping]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ListBundlesResponse(_message.Message):
    __slots__ = ("bundles", "next_page_token")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    next_page_token: str
    def __init__(self, bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("uses", "ttl_seconds", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    USES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    uses: int
    ttl_seconds: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, uses: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "expires", "uses")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires: _timestamp_pb2.Timestamp
    uses: int
    def __init__(self, token: _Optional[str] = ..., expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uses: _Optional[int] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("bundle", "all_devices", "device_ids")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ALL_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    bundle: _common_pb2.BundleRef
    all_devices: bool
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., all_devices: _Optional[bool] = ..., device_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("device_ids", "max_generation")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    max_generation: int
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ..., max_generation: _Optional[int] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("name", "all_devices", "device_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALL_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    all_devices: bool
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., all_devices: _Optional[bool] = ..., device_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UndeployResponse(_message.Message):
    __slots__ = ("device_ids", "max_generation")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    max_generation: int
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ..., max_generation: _Optional[int] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceSummary]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[_common_pb2.DeviceSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class QueryTelemetryRequest(_message.Message):
    __slots__ = ("device_id", "kind", "limit", "page_size", "page_token")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: str
    limit: int
    page_size: int
    page_token: str
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[str] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TelemetryRow(_message.Message):
    __slots__ = ("device_id", "kind", "seq", "time", "payload_json", "payload_truncated", "payload_bytes")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: str
    seq: int
    time: _timestamp_pb2.Timestamp
    payload_json: str
    payload_truncated: bool
    payload_bytes: int
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload_json: _Optional[str] = ..., payload_truncated: _Optional[bool] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class QueryTelemetryResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TelemetryRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[TelemetryRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TailTelemetryRequest(_message.Message):
    __slots__ = ("device_id", "kind", "backlog")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: str
    backlog: int
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[str] = ..., backlog: _Optional[int] = ...) -> None: ...

class PublishImageTargetsRequest(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: bytes
    def __init__(self, targets: _Optional[bytes] = ...) -> None: ...

class PublishImageTargetsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...
