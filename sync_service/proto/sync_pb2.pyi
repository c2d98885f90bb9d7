# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_COLLECTING: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_PUBLISHED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_TRAIN: _ClassVar[Action]
    ACTION_WAIT: _ClassVar[Action]
    ACTION_DONE: _ClassVar[Action]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_INT8: Encoding
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_COLLECTING: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_PUBLISHED: RoundState
ROUND_STATE_FAILED: RoundState
ACTION_UNSPECIFIED: Action
ACTION_TRAIN: Action
ACTION_WAIT: Action
ACTION_DONE: Action

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class DeviceCapabilities(_message.Message):
    __slots__ = ("num_experts", "num_generalists", "lora_rank", "memory_budget_bytes", "runtime", "runtime_version", "platform")
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERALISTS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    num_experts: int
    num_generalists: int
    lora_rank: int
    memory_budget_bytes: int
    runtime: str
    runtime_version: str
    platform: str
    def __init__(self, num_experts: _Optional[int] = ..., num_generalists: _Optional[int] = ..., lora_rank: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., runtime: _Optional[str] = ..., runtime_version: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class RegisterDeviceRequest(_message.Message):
    __slots__ = ("device_id", "capabilities")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    capabilities: DeviceCapabilities
    def __init__(self, device_id: _Optional[str] = ..., capabilities: _Optional[_Union[DeviceCapabilities, _Mapping]] = ...) -> None: ...

class RegisterDeviceResponse(_message.Message):
    __slots__ = ("device_id", "generalist_version", "manifest", "server_time_unix_ms")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERALIST_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    generalist_version: int
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    server_time_unix_ms: int
    def __init__(self, device_id: _Optional[str] = ..., generalist_version: _Optional[int] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., server_time_unix_ms: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class LocalTrainingConfig(_message.Message):
    __slots__ = ("local_steps", "router_every", "router_steps", "expert_lr", "router_lr", "batch_size", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_EVERY_FIELD_NUMBER: _ClassVar[int]
    ROUTER_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LR_FIELD_NUMBER: _ClassVar[int]
    ROUTER_LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    router_every: int
    router_steps: int
    expert_lr: float
    router_lr: float
    batch_size: int
    extra: _containers.ScalarMap[str, str]
    def __init__(self, local_steps: _Optional[int] = ..., router_every: _Optional[int] = ..., router_steps: _Optional[int] = ..., expert_lr: _Optional[float] = ..., router_lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("action", "round_id", "round_state", "deadline_unix_ms", "generalist_version", "local_config", "manifest", "accepted_encodings", "max_upload_bytes", "retry_after_ms", "already_uploaded", "message", "min_devices", "uploads_received", "server_time_unix_ms")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GENERALIST_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_UPLOADED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MIN_DEVICES_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    action: Action
    round_id: int
    round_state: RoundState
    deadline_unix_ms: int
    generalist_version: int
    local_config: LocalTrainingConfig
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    accepted_encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    max_upload_bytes: int
    retry_after_ms: int
    already_uploaded: bool
    message: str
    min_devices: int
    uploads_received: int
    server_time_unix_ms: int
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., round_id: _Optional[int] = ..., round_state: _Optional[_Union[RoundState, str]] = ..., deadline_unix_ms: _Optional[int] = ..., generalist_version: _Optional[int] = ..., local_config: _Optional[_Union[LocalTrainingConfig, _Mapping]] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., accepted_encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., max_upload_bytes: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., already_uploaded: _Optional[bool] = ..., message: _Optional[str] = ..., min_devices: _Optional[int] = ..., uploads_received: _Optional[int] = ..., server_time_unix_ms: _Optional[int] = ...) -> None: ...

class DownloadGeneralistRequest(_message.Message):
    __slots__ = ("version", "offset")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class GeneralistInfo(_message.Message):
    __slots__ = ("version", "total_bytes", "payload_sha256", "encoding", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    total_bytes: int
    payload_sha256: bytes
    encoding: Encoding
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "offset", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    offset: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadGeneralistResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: GeneralistInfo
    chunk: Chunk
    def __init__(self, info: _Optional[_Union[GeneralistInfo, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class AcquireUploadSlotRequest(_message.Message):
    __slots__ = ("device_id", "round_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round_id: int
    def __init__(self, device_id: _Optional[str] = ..., round_id: _Optional[int] = ...) -> None: ...

class AcquireUploadSlotResponse(_message.Message):
    __slots__ = ("granted", "retry_after_ms", "queue_position", "slots")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    retry_after_ms: int
    queue_position: int
    slots: int
    def __init__(self, granted: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., queue_position: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("device_id", "round_id", "base_version", "num_samples", "encoding", "idempotency_key", "total_bytes", "payload_sha256")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round_id: int
    base_version: int
    num_samples: int
    encoding: Encoding
    idempotency_key: str
    total_bytes: int
    payload_sha256: bytes
    def __init__(self, device_id: _Optional[str] = ..., round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., idempotency_key: _Optional[str] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ...) -> None: ...

class UploadDeltaRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadDeltaResponse(_message.Message):
    __slots__ = ("round_id", "upload_id", "duplicate", "accepted_bytes", "round_uploads", "update_norm", "clipped")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    upload_id: str
    duplicate: bool
    accepted_bytes: int
    round_uploads: int
    update_norm: float
    clipped: bool
    def __init__(self, round_id: _Optional[int] = ..., upload_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., accepted_bytes: _Optional[int] = ..., round_uploads: _Optional[int] = ..., update_norm: _Optional[float] = ..., clipped: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("device_id", "round_id", "train_loss", "valid_loss", "perplexity", "step_time_s", "peak_memory_bytes", "local_steps", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALID_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round_id: int
    train_loss: float
    valid_loss: float
    perplexity: float
    step_time_s: float
    peak_memory_bytes: int
    local_steps: int
    extra: _containers.ScalarMap[str, float]
    def __init__(self, device_id: _Optional[str] = ..., round_id: _Optional[int] = ..., train_loss: _Optional[float] = ..., valid_loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., step_time_s: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., local_steps: _Optional[int] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
