from edgefleet.protos.fleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BundleManifest(_message.Message):
    __slots__ = ("schema_version", "name", "version", "variants", "description", "adapter_base")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BASE_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    name: str
    version: int
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    description: str
    adapter_base: AdapterBase
    def __init__(self, schema_version: _Optional[int] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., description: _Optional[str] = ..., adapter_base: _Optional[_Union[AdapterBase, _Mapping]] = ...) -> None: ...

class AdapterBase(_message.Message):
    __slots__ = ("name", "version", "artifact_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    artifact_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("id", "format", "quantization", "artifact", "size_bytes", "min_ram_bytes", "context_length", "has_chat_template", "perplexity_milli", "perplexity_increase_bp", "tokens_per_second_milli", "quality_gate")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_MILLI_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_INCREASE_BP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_MILLI_FIELD_NUMBER: _ClassVar[int]
    QUALITY_GATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    format: _common_pb2.ModelFormat
    quantization: str
    artifact: str
    size_bytes: int
    min_ram_bytes: int
    context_length: int
    has_chat_template: bool
    perplexity_milli: int
    perplexity_increase_bp: int
    tokens_per_second_milli: int
    quality_gate: str
    def __init__(self, id: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ModelFormat, str]] = ..., quantization: _Optional[str] = ..., artifact: _Optional[str] = ..., size_bytes: _Optional[int] = ..., min_ram_bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., perplexity_milli: _Optional[int] = ..., perplexity_increase_bp: _Optional[int] = ..., tokens_per_second_milli: _Optional[int] = ..., quality_gate: _Optional[str] = ...) -> None: ...
