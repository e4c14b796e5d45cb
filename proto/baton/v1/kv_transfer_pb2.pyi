from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVChunk(_message.Message):
    __slots__ = ("request_id", "attempt", "layer", "offset", "layer_bytes", "data", "block_crc32", "dtype", "shape", "num_layers")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CRC32_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    layer: int
    offset: int
    layer_bytes: int
    data: bytes
    block_crc32: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    num_layers: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., layer: _Optional[int] = ..., offset: _Optional[int] = ..., layer_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., block_crc32: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("request_id", "ok", "corrupt_layers", "bytes_received", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ok: bool
    corrupt_layers: _containers.RepeatedScalarFieldContainer[int]
    bytes_received: int
    error: str
    def __init__(self, request_id: _Optional[str] = ..., ok: _Optional[bool] = ..., corrupt_layers: _Optional[_Iterable[int]] = ..., bytes_received: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...
