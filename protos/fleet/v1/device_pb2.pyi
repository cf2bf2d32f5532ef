from edgefleet.protos.fleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Repository(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPOSITORY_UNSPECIFIED: _ClassVar[Repository]
    REPOSITORY_IMAGE: _ClassVar[Repository]
    REPOSITORY_DIRECTOR: _ClassVar[Repository]
REPOSITORY_UNSPECIFIED: Repository
REPOSITORY_IMAGE: Repository
REPOSITORY_DIRECTOR: Repository

class FetchMetadataRequest(_message.Message):
    __slots__ = ("repository", "name")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    repository: Repository
    name: str
    def __init__(self, repository: _Optional[_Union[Repository, str]] = ..., name: _Optional[str] = ...) -> None: ...

class MetadataFile(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("bootstrap_token", "hostname", "labels", "csr")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BOOTSTRAP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    bootstrap_token: str
    hostname: str
    labels: _containers.ScalarMap[str, str]
    csr: bytes
    def __init__(self, bootstrap_token: _Optional[str] = ..., hostname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., csr: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "mqtt_topic_prefix", "mqtt_url", "certificate", "device_endpoint")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MQTT_TOPIC_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MQTT_URL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    mqtt_topic_prefix: str
    mqtt_url: str
    certificate: bytes
    device_endpoint: str
    def __init__(self, device_id: _Optional[str] = ..., mqtt_topic_prefix: _Optional[str] = ..., mqtt_url: _Optional[str] = ..., certificate: _Optional[bytes] = ..., device_endpoint: _Optional[str] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate",)
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    def __init__(self, certificate: _Optional[bytes] = ...) -> None: ...

class WatchDesiredStateRequest(_message.Message):
    __slots__ = ("known_generation",)
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    known_generation: int
    def __init__(self, known_generation: _Optional[int] = ...) -> None: ...

class GetDesiredStateRequest(_message.Message):
    __slots__ = ("known_generation",)
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    known_generation: int
    def __init__(self, known_generation: _Optional[int] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("generation", "bundle")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    bundle: _common_pb2.BundleRef
    def __init__(self, generation: _Optional[int] = ..., bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("state", "generation", "active_bundle", "api_url", "error", "error_kind", "variant", "detail", "selection", "models")
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    API_URL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.DeviceState
    generation: int
    active_bundle: _common_pb2.BundleRef
    api_url: str
    error: str
    error_kind: str
    variant: str
    detail: str
    selection: _common_pb2.VariantSelection
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.InstalledModel]
    def __init__(self, state: _Optional[_Union[_common_pb2.DeviceState, str]] = ..., generation: _Optional[int] = ..., active_bundle: _Optional[_Union[_common_pb2.BundleRef, _Mapping]] = ..., api_url: _Optional[str] = ..., error: _Optional[str] = ..., error_kind: _Optional[str] = ..., variant: _Optional[str] = ..., detail: _Optional[str] = ..., selection: _Optional[_Union[_common_pb2.VariantSelection, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.InstalledModel, _Mapping]]] = ...) -> None: ...

class StatusAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("sha256", "offset", "length")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    length: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_length: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_length: _Optional[int] = ...) -> None: ...
