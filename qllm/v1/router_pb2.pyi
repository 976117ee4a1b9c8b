from qllm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "priority", "ignore_eos", "temperature", "request_id", "program_id", "last_turn", "num_beams", "patience", "top_p", "seed", "length_penalty", "tool_name", "messages", "prompt_token_ids", "stop", "stop_token_ids", "logprobs", "top_logprobs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_FIELD_NUMBER: _ClassVar[int]
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    priority: _common_pb2.Priority
    ignore_eos: bool
    temperature: float
    request_id: str
    program_id: str
    last_turn: bool
    num_beams: int
    patience: float
    top_p: float
    seed: int
    length_penalty: float
    tool_name: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    top_logprobs: int
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., ignore_eos: _Optional[bool] = ..., temperature: _Optional[float] = ..., request_id: _Optional[str] = ..., program_id: _Optional[str] = ..., last_turn: _Optional[bool] = ..., num_beams: _Optional[int] = ..., patience: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., length_penalty: _Optional[float] = ..., tool_name: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finished", "finish_reason", "request_id", "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "logprobs", "stop_string", "stop_token_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    stop_string: str
    stop_token_id: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., stop_string: _Optional[str] = ..., stop_token_id: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "max_context", "vocab_size", "has_chat_template", "eos_token_ids", "workers", "limits")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    max_context: int
    vocab_size: int
    has_chat_template: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerSummary]
    limits: RequestLimits
    def __init__(self, model_name: _Optional[str] = ..., max_context: _Optional[int] = ..., vocab_size: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., workers: _Optional[_Iterable[_Union[WorkerSummary, _Mapping]]] = ..., limits: _Optional[_Union[RequestLimits, _Mapping]] = ...) -> None: ...

class WorkerSummary(_message.Message):
    __slots__ = ("address", "healthy", "policy", "device", "num_layers", "max_num_seqs", "kv_capacity_tokens", "in_flight")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    policy: str
    device: str
    num_layers: int
    max_num_seqs: int
    kv_capacity_tokens: int
    in_flight: int
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., policy: _Optional[str] = ..., device: _Optional[str] = ..., num_layers: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_prompt_bytes", "max_messages", "max_beams", "max_patience", "max_abs_length_penalty", "max_stop_strings", "max_stop_string_chars", "max_stop_token_ids", "max_top_logprobs", "default_priority", "max_be_queue", "tenant_priorities", "tenant_requests_per_s", "tenant_burst")
    MAX_PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRING_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_BE_QUEUE_FIELD_NUMBER: _ClassVar[int]
    TENANT_PRIORITIES_FIELD_NUMBER: _ClassVar[int]
    TENANT_REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TENANT_BURST_FIELD_NUMBER: _ClassVar[int]
    max_prompt_bytes: int
    max_messages: int
    max_beams: int
    max_patience: float
    max_abs_length_penalty: float
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_top_logprobs: int
    default_priority: _common_pb2.Priority
    max_be_queue: int
    tenant_priorities: _containers.RepeatedScalarFieldContainer[_common_pb2.Priority]
    tenant_requests_per_s: float
    tenant_burst: float
    def __init__(self, max_prompt_bytes: _Optional[int] = ..., max_messages: _Optional[int] = ..., max_beams: _Optional[int] = ..., max_patience: _Optional[float] = ..., max_abs_length_penalty: _Optional[float] = ..., max_stop_strings: _Optional[int] = ..., max_stop_string_chars: _Optional[int] = ..., max_stop_token_ids: _Optional[int] = ..., max_top_logprobs: _Optional[int] = ..., default_priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_be_queue: _Optional[int] = ..., tenant_priorities: _Optional[_Iterable[_Union[_common_pb2.Priority, str]]] = ..., tenant_requests_per_s: _Optional[float] = ..., tenant_burst: _Optional[float] = ...) -> None: ...
