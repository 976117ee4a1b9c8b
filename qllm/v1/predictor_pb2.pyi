from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class EstimateItem(_message.Message):
    __slots__ = ("prompt", "score", "prompt_tokens", "generated_so_far", "max_tokens", "prefill_done")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_SO_FAR_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DONE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    score: float
    prompt_tokens: int
    generated_so_far: int
    max_tokens: int
    prefill_done: bool
    def __init__(self, prompt: _Optional[str] = ..., score: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., generated_so_far: _Optional[int] = ..., max_tokens: _Optional[int] = ..., prefill_done: _Optional[bool] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("items", "batch_size")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EstimateItem]
    batch_size: int
    def __init__(self, items: _Optional[_Iterable[_Union[EstimateItem, _Mapping]]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Estimate(_message.Message):
    __slots__ = ("predicted_output_tokens", "remaining_tokens", "remaining_s", "score")
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    predicted_output_tokens: int
    remaining_tokens: int
    remaining_s: float
    score: float
    def __init__(self, predicted_output_tokens: _Optional[int] = ..., remaining_tokens: _Optional[int] = ..., remaining_s: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("estimates",)
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    estimates: _containers.RepeatedCompositeFieldContainer[Estimate]
    def __init__(self, estimates: _Optional[_Iterable[_Union[Estimate, _Mapping]]] = ...) -> None: ...

class LatencySample(_message.Message):
    __slots__ = ("prefill_tokens", "prefill_s", "decode_batch_size", "decode_step_s")
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_S_FIELD_NUMBER: _ClassVar[int]
    prefill_tokens: int
    prefill_s: float
    decode_batch_size: int
    decode_step_s: float
    def __init__(self, prefill_tokens: _Optional[int] = ..., prefill_s: _Optional[float] = ..., decode_batch_size: _Optional[int] = ..., decode_step_s: _Optional[float] = ...) -> None: ...

class LatencyReport(_message.Message):
    __slots__ = ("worker", "samples")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    worker: str
    samples: _containers.RepeatedCompositeFieldContainer[LatencySample]
    def __init__(self, worker: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[LatencySample, _Mapping]]] = ...) -> None: ...

class LatencyModelState(_message.Message):
    __slots__ = ("prefill_fixed_s", "prefill_s_per_token", "decode_base_s", "decode_per_seq_s", "prefill_samples", "decode_samples")
    PREFILL_FIXED_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DECODE_BASE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PER_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DECODE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    prefill_fixed_s: float
    prefill_s_per_token: float
    decode_base_s: float
    decode_per_seq_s: float
    prefill_samples: int
    decode_samples: int
    def __init__(self, prefill_fixed_s: _Optional[float] = ..., prefill_s_per_token: _Optional[float] = ..., decode_base_s: _Optional[float] = ..., decode_per_seq_s: _Optional[float] = ..., prefill_samples: _Optional[int] = ..., decode_samples: _Optional[int] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("tool_name", "duration_s")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    duration_s: float
    def __init__(self, tool_name: _Optional[str] = ..., duration_s: _Optional[float] = ...) -> None: ...

class ToolCallReport(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ...) -> None: ...

class ToolCallReportResponse(_message.Message):
    __slots__ = ("accepted", "tools")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    tools: int
    def __init__(self, accepted: _Optional[int] = ..., tools: _Optional[int] = ...) -> None: ...

class ToolDurationRequest(_message.Message):
    __slots__ = ("tool_name", "quantiles", "within_s", "context_tokens")
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tool_name: str
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    within_s: _containers.RepeatedScalarFieldContainer[float]
    context_tokens: int
    def __init__(self, tool_name: _Optional[str] = ..., quantiles: _Optional[_Iterable[float]] = ..., within_s: _Optional[_Iterable[float]] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class ToolDurationPrediction(_message.Message):
    __slots__ = ("quantiles", "durations_s", "mean_s", "samples", "prior", "observed_mean_s", "p_within", "recompute_s", "pooled_samples")
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    DURATIONS_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_MEAN_S_FIELD_NUMBER: _ClassVar[int]
    P_WITHIN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    POOLED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    durations_s: _containers.RepeatedScalarFieldContainer[float]
    mean_s: float
    samples: int
    prior: bool
    observed_mean_s: float
    p_within: _containers.RepeatedScalarFieldContainer[float]
    recompute_s: float
    pooled_samples: int
    def __init__(self, quantiles: _Optional[_Iterable[float]] = ..., durations_s: _Optional[_Iterable[float]] = ..., mean_s: _Optional[float] = ..., samples: _Optional[int] = ..., prior: _Optional[bool] = ..., observed_mean_s: _Optional[float] = ..., p_within: _Optional[_Iterable[float]] = ..., recompute_s: _Optional[float] = ..., pooled_samples: _Optional[int] = ...) -> None: ...
