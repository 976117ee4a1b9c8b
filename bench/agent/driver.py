"""Runs agent programs through the router: each program's turns one after another (await the turn's stream,
sleep the tool gap, send the next turn with the same program_id; last_turn on the final one, tool_name on the
others), and samples the KV the workers hold for pins meanwhile. Per turn it records TTFT/E2E and
cached_prompt_tokens; per program the JCT = first turn sent -> last turn finished.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from bench.agent.programs import ProgramSpec, TurnSpec
from bench.client import CHANNEL_OPTIONS, Clock, consume_generate, progress_bar, wait_then_cancel
from bench.stats import RequestRecord
from bench.tokens import Tokenizer
from bench.workload import BE, LS
from qllm.client import Client
from qllm.v1 import common_pb2, router_pb2, worker_pb2, worker_pb2_grpc


@dataclass
class TurnRecord(RequestRecord):
    program_index: int = 0
    turn_index: int = 0
    cached_prompt_tokens: int | None = None
    tool_name: str = ""
    last_turn: bool = False


@dataclass
class ProgramRecord:
    index: int
    program_id: str
    arrival_s: float
    source: str
    n_turns: int
    turns: list[TurnRecord] = field(default_factory=list)
    ended: str = ""       # "" = all turns completed; else why the program stopped

    @property
    def completed(self) -> bool:
        return not self.ended and len(self.turns) == self.n_turns and all(t.completed for t in self.turns)

    @property
    def jct_s(self) -> float | None:
        """First turn sent -> last turn finished, for a program whose every turn completed."""
        if not self.completed or self.turns[0].sent_s is None:
            return None
        return self.turns[-1].finished_s - self.turns[0].sent_s

    def to_dict(self) -> dict:
        return {"index": self.index, "program_id": self.program_id, "arrival_s": self.arrival_s,
                "source": self.source, "n_turns": self.n_turns, "ended": self.ended, "completed": self.completed,
                "jct_s": self.jct_s}


class AgentSender:
    """qllm.v1.Router/Generate for program turns: program_id, last_turn, tool_name; returns the generated text."""

    def __init__(self, address: str, *, request_id_prefix: str = "agent", priority: str = BE,
                 timeout_s: float | None = None):
        self.label = address
        self.prefix = request_id_prefix
        self.timeout_s = timeout_s
        if priority not in (LS, BE):
            raise ValueError(f"agent: priority {priority!r}: expected {LS} or {BE}")
        self.cls = priority
        self.priority = {LS: common_pb2.PRIORITY_LATENCY_SENSITIVE, BE: common_pb2.PRIORITY_BEST_EFFORT}[priority]
        self._client = Client(address, timeout_s=timeout_s, channel_options=CHANNEL_OPTIONS)

    async def send_turn(self, program: ProgramSpec, turn: TurnSpec, prompt: str, max_tokens: int,
                        rec: TurnRecord, now: Clock) -> str:
        last = turn.index == len(program.turns) - 1
        request = router_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, priority=self.priority, ignore_eos=True, temperature=0.0,
            request_id=f"{self.prefix}-{program.index}-{turn.index}", program_id=program.program_id,
            last_turn=last, tool_name="" if last else turn.tool_name)
        parts = await consume_generate(self._client.generate_raw(request), rec, now)
        return "".join(parts)

    async def close(self) -> None:
        await self._client.close()


async def run_program(sender: AgentSender, program: ProgramSpec, rec: ProgramRecord, now: Clock,
                      tokenizer: Tokenizer | None = None, context_tokens: int = 4096,
                      sleep=asyncio.sleep) -> None:
    """Runs one program's turns in order (the caller waits for its arrival). Stops at the first turn that
    fails; `rec.ended` says why."""
    prompt = ""
    for turn in program.turns:
        prompt += turn.append_text
        max_tokens = turn.max_tokens
        if tokenizer is not None:
            # the generated text re-encodes to about max_tokens tokens; where it grew, the output shrinks
            room = context_tokens - len(tokenizer.encode(prompt))
            if room < 1:
                rec.ended = f"context overflow at turn {turn.index}"
                return
            max_tokens = min(max_tokens, room)
        tr = TurnRecord(index=program.index * 1000 + turn.index, cls=sender.cls, arrival_s=now(), prompt_tokens=0,
                        max_tokens=max_tokens, program_index=program.index, turn_index=turn.index,
                        tool_name=turn.tool_name, last_turn=turn.index == len(program.turns) - 1)
        if tokenizer is not None:
            tr.prompt_tokens = len(tokenizer.encode(prompt))
        rec.turns.append(tr)
        tr.sent_s = now()
        try:
            text = await sender.send_turn(program, turn, prompt, max_tokens, tr, now)
        except asyncio.CancelledError:
            tr.cancelled = True
            tr.finished_s = now()
            tr.finish_reason = tr.finish_reason or "cancelled-by-bench"
            rec.ended = "cancelled at the drain cap"
            raise
        except Exception as exc:  # a transport failure of this turn only
            tr.error = tr.error or f"{type(exc).__name__}: {exc}"
            tr.finished_s = tr.finished_s or now()
            text = ""
        if tr.error:
            rec.ended = f"turn {turn.index}: {tr.error}"
            return
        prompt += text
        if turn.index < len(program.turns) - 1 and turn.tool_gap_s > 0:
            await sleep(turn.tool_gap_s)


async def run_programs(sender: AgentSender, programs: Sequence[ProgramSpec], *, duration_s: float,
                       drain_cap_s: float, tokenizer: Tokenizer | None = None, context_tokens: int = 4096,
                       progress: bool = True, label: str = "",
                       ) -> list[ProgramRecord]:
    """Open loop over programs: each starts at its arrival offset whatever the server does; its turns then
    follow one another. Everything still running at max(duration, last arrival) + drain_cap is cancelled."""
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    records = [ProgramRecord(p.index, p.program_id, p.arrival_s, p.source, len(p.turns)) for p in programs]
    bar = progress_bar(len(programs), label or sender.label, progress)
    bar.unit = "prog"

    async def one(spec: ProgramSpec, rec: ProgramRecord) -> None:
        delay = spec.arrival_s - now()
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                rec.ended = "not sent before the drain cap"
                raise
        await run_program(sender, spec, rec, now, tokenizer, context_tokens)
        bar.update(1)
        bar.set_postfix(t=f"{now():.0f}s", refresh=False)

    tasks = [asyncio.create_task(one(s, r)) for s, r in zip(programs, records)]
    try:
        deadline = max(duration_s, max((p.arrival_s for p in programs), default=0.0)) + drain_cap_s
        await wait_then_cancel(tasks, deadline - now())
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return records




class PinSampler:
    """Polls the workers' Describe every `interval_s`: KV held by pins (and in use) over time."""

    def __init__(self, addresses: Sequence[str], interval_s: float = 0.5, interceptors: Sequence[object] = ()):
        self.addresses = list(addresses)
        self.interceptors = list(interceptors)  # the internal token: Describe is an internal RPC
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._task: asyncio.Task | None = None
        self.errors = 0

    async def _run(self) -> None:
        channels = [grpc.aio.insecure_channel(a, interceptors=self.interceptors or None) for a in self.addresses]
        stubs = [worker_pb2_grpc.WorkerStub(ch) for ch in channels]
        t0 = time.perf_counter()
        try:
            while True:
                t = time.perf_counter() - t0
                pinned = pins = used = capacity = 0
                ok = False
                for stub in stubs:
                    try:
                        info = await stub.Describe(worker_pb2.DescribeRequest(), timeout=2.0)
                    except grpc.aio.AioRpcError:
                        self.errors += 1
                        continue
                    ok = True
                    pinned += info.kv_pinned_tokens
                    pins += info.num_pins
                    capacity += info.kv_capacity_tokens
                    used += info.kv_capacity_tokens - info.kv_free_tokens
                if ok:
                    self.samples.append({"t_s": round(t, 3), "pinned_tokens": pinned, "pins": pins,
                                         "used_tokens": used, "capacity_tokens": capacity})
                await asyncio.sleep(max(0.0, self.interval_s - (time.perf_counter() - t0 - t)))
        finally:
            for ch in channels:
                await ch.close()

    def start(self) -> None:
        if self.addresses and self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[dict]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        return self.samples
