"""The asyncio side of the engine: checks a request's invariants (the request contract, qllm/contract.py, and
this worker's own limits), submits it to the engine core (worker/engine_core.py), streams each request's
outputs from the core thread back to its consumer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from worker import beam
from worker.engine_core import EngineConfig, EngineCore
from worker.model_runner import ModelRunner
from worker.outputs import EngineOutput
from worker.request import FinishReason, Priority, Request, SamplingParams
from qllm.contract import InvalidField, check_sampling


class RequestRejected(Exception):
    """A request the engine cannot take; `code` names the gRPC status (e.g. INVALID_ARGUMENT)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Stream:
    """One running request on the asyncio side: its outputs as they come, and how its consumer ended it on
    purpose (a stop string in its text), if it did."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ending: FinishReason | None = None


class AsyncEngine:
    """The asyncio side: checks a request's invariants, submits it to the core, streams its outputs."""

    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: list[int], max_context: int,
                 config: EngineConfig):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.config = config
        self.core = EngineCore(runner, config, self._on_outputs)
        self.vocab_size = runner.model.config.vocab_size
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def _on_outputs(self, outputs: list[EngineOutput]) -> None:
        # Called on the core thread: hand the batch to the event loop in one go.
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def check(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        """Invariants of a request reaching this worker: the contract's field rules, then what only this worker
        knows (its model's context, its KV budget)."""
        self.check_fields(sampling, self.config.max_num_beams, self.vocab_size)
        total = num_prompt_tokens + sampling.max_tokens
        if total > self.max_context:
            raise RequestRejected("INVALID_ARGUMENT",
                                  f"max_tokens: prompt ({num_prompt_tokens} tokens) + max_tokens "
                                  f"({sampling.max_tokens}) exceeds the model context ({self.max_context})")
        capacity = self.core.allocator.capacity_tokens
        if total > capacity:
            raise RequestRejected("RESOURCE_EXHAUSTED",
                                  f"max_tokens: prompt + max_tokens ({total} tokens) exceeds the worker's KV "
                                  f"budget ({capacity} tokens)")
        if sampling.num_beams > 1:
            need = beam.kv_tokens(num_prompt_tokens, sampling.max_tokens, sampling.num_beams, self.config.block_size)
            if need > capacity:
                raise RequestRejected("RESOURCE_EXHAUSTED",
                                      f"num_beams: {sampling.num_beams} beams of prompt + max_tokens need {need} KV "
                                      f"tokens, more than the worker's KV budget ({capacity} tokens)")

    @staticmethod
    def check_fields(sampling: SamplingParams, max_beams: int, vocab_size: int | None) -> None:
        """The request contract's rules on the sampling fields (qllm/contract.py), as INVALID_ARGUMENT."""
        try:
            check_sampling(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                           num_beams=sampling.num_beams, max_beams=max_beams, patience=sampling.patience,
                           length_penalty=sampling.length_penalty, stop=sampling.stop,
                           stop_token_ids=sorted(sampling.stop_token_ids), logprobs=sampling.logprobs,
                           top_logprobs=sampling.top_logprobs, vocab_size=vocab_size)
        except InvalidField as exc:
            raise RequestRejected("INVALID_ARGUMENT", str(exc)) from None

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       priority: Priority = Priority.BEST_EFFORT, order_key: float = 0.0, program_id: str = "",
                       last_turn: bool = False, predicted_output_tokens: int = 0) -> AsyncIterator[EngineOutput]:
        """Streams outputs of one request; closing the iterator early cancels it and frees its KV."""
        if not prompt_token_ids:
            raise RequestRejected("INVALID_ARGUMENT", "prompt: the prompt has no tokens")
        self.check(len(prompt_token_ids), sampling)
        if request_id in self._streams:
            raise RequestRejected("ALREADY_EXISTS", f"request_id: {request_id!r} is already running")
        req = Request(request_id, list(prompt_token_ids), sampling, priority, self.eos_token_ids,
                      order_key=order_key, program_id=program_id, last_turn=last_turn,
                      predicted_output_tokens=predicted_output_tokens)
        if sampling.num_beams > 1:
            req.beam = self.new_beam_search(req)
        stream = self._streams[request_id] = _Stream()
        finished = False
        self.core.submit(req)
        try:
            while True:
                out = await stream.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                if stream.ending is None:
                    self.core.cancel(request_id)
                else:
                    self.core.end(request_id, stream.ending)

    def end_early(self, request_id: str, reason: FinishReason = FinishReason.STOP) -> None:
        """Marks a running request as ended by its consumer for `reason` (a stop string found in its text, as
        vLLM's output processor aborts one): when the consumer then closes its generate() stream, the core ends
        it with that reason, not as cancelled, at the end of its current step (KV freed, or pinned for an agent
        program's next turn)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.ending = reason

    def new_beam_search(self, req: Request) -> beam.BeamSearch:
        """The search state of a beam request; with ignore_eos no candidate ever finishes early, except at a stop
        token (those end a hypothesis as EOS does)."""
        s = req.sampling
        ends = (frozenset() if s.ignore_eos else req.eos_token_ids) | s.stop_token_ids
        return beam.BeamSearch(s.num_beams, s.patience, s.length_penalty, s.max_tokens, req.num_prompt_tokens,
                               self.config.block_size, ends, logprobs=s.logprobs, top_logprobs=s.top_logprobs)

    # --- agent-program pins (worker/kv_pins.py), applied on the core thread ------------------------------
    async def set_pin(self, program_id: str, ttl_s: float, keep_score: float) -> tuple[bool, int]:
        """Keeps the program's pinned KV for ttl_s from now (<= 0 frees it): (held, tokens)."""
        def apply():
            pin = self.core.scheduler.pins.set(program_id, ttl_s, keep_score)
            return (pin is not None, pin.tokens if pin is not None else 0)
        return await asyncio.wrap_future(self.core.call(apply))

    async def release_pins(self, program_ids: list[str]) -> tuple[int, int]:
        """Frees the programs' pins now: (pins released, tokens freed)."""
        def apply():
            pins = self.core.scheduler.pins
            freed = [pins.release(pid, "released") for pid in program_ids]
            return (sum(1 for t in freed if t), sum(freed))
        return await asyncio.wrap_future(self.core.call(apply))

    async def list_pins(self) -> list[tuple[str, int, float, float]]:
        """(program id, tokens, seconds until expiry, keep score) of every pin."""
        def apply():
            pins = self.core.scheduler.pins
            now = pins.clock()
            return [(p.program_id, p.tokens, p.expires_at - now, p.keep_score) for p in pins.pins()]
        return await asyncio.wrap_future(self.core.call(apply))

    def stats(self) -> dict:
        sched = self.core.scheduler
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "kv_capacity_tokens": self.core.allocator.capacity_tokens,
                "kv_free_tokens": self.core.allocator.free_tokens,
                "kv_pinned_tokens": sched.pins.pinned_tokens, "num_pins": len(sched.pins)}
