from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnReport(_message.Message):
    __slots__ = ("program_id", "worker", "context_tokens", "last_turn", "tool_name", "turn_index", "prev_tool_duration_s", "cached_prompt_tokens")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    TURN_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_TOOL_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    worker: str
    context_tokens: int
    last_turn: bool
    tool_name: str
    turn_index: int
    prev_tool_duration_s: float
    cached_prompt_tokens: int
    def __init__(self, program_id: _Optional[str] = ..., worker: _Optional[str] = ..., context_tokens: _Optional[int] = ..., last_turn: _Optional[bool] = ..., tool_name: _Optional[str] = ..., turn_index: _Optional[int] = ..., prev_tool_duration_s: _Optional[float] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class PinDecision(_message.Message):
    __slots__ = ("pin", "ttl_s", "reason", "expires_at_unix_s", "keep_score")
    PIN_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_SCORE_FIELD_NUMBER: _ClassVar[int]
    pin: bool
    ttl_s: float
    reason: str
    expires_at_unix_s: float
    keep_score: float
    def __init__(self, pin: _Optional[bool] = ..., ttl_s: _Optional[float] = ..., reason: _Optional[str] = ..., expires_at_unix_s: _Optional[float] = ..., keep_score: _Optional[float] = ...) -> None: ...

class ListPinsRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: str
    def __init__(self, worker: _Optional[str] = ...) -> None: ...

class Pin(_message.Message):
    __slots__ = ("program_id", "worker", "tokens", "expires_at_unix_s", "keep_score")
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_SCORE_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    worker: str
    tokens: int
    expires_at_unix_s: float
    keep_score: float
    def __init__(self, program_id: _Optional[str] = ..., worker: _Optional[str] = ..., tokens: _Optional[int] = ..., expires_at_unix_s: _Optional[float] = ..., keep_score: _Optional[float] = ...) -> None: ...

class ListPinsResponse(_message.Message):
    __slots__ = ("pins",)
    PINS_FIELD_NUMBER: _ClassVar[int]
    pins: _containers.RepeatedCompositeFieldContainer[Pin]
    def __init__(self, pins: _Optional[_Iterable[_Union[Pin, _Mapping]]] = ...) -> None: ...

class ReleasePinRequest(_message.Message):
    __slots__ = ("program_id",)
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    program_id: str
    def __init__(self, program_id: _Optional[str] = ...) -> None: ...

class ReleasePinResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
