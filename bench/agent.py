"""The `agent` scenario: multi-turn agent programs built from real agent traces, and the driver that runs them.

A program is a sequence of turns. Turn 0's prompt is the agent's first real prompt; the prompt of turn k+1 is
the prompt of turn k + the text the model generated in turn k + the result text of the tool the agent called
after turn k. So each turn's prompt textually extends the previous turn's prompt and output, which is what
lets a worker that kept (pinned) turn k's KV compute only the new suffix (Continuum's mechanism).

Building (pure, seeded; `build_agent_workload`), from `shared/data/agent/lmcache_agent_trace_calls.jsonl`
(the LMCache agent trace: real wall-clock inter-call gaps and real prompt deltas):
- Templates: one trace session per program. `miniswe` (mini-swe-agent on terminal tasks: SWE-style, every call
  extends the previous one with a shell command's output) and `magagent` (Magentic-One orchestrator: web,
  code and terminal sub-agents, long tool calls). Turns = the session's first `max_turns` calls.
- Tool name of turn k = the tool the agent calls after it, read from the trace's output of call k:
  miniswe: `bash:<first word of the command in the reply's last ```bash block>` (leading `cd DIR &&` dropped);
  magagent: `magentic:<next_speaker>` from the orchestrator's JSON ledger (`WebSurfer`, `Coder`,
  `FileSurfer`, `ComputerTerminal`), `magentic:plan` for its planning calls (no ledger).
- Tool gap after turn k = dt_prev_s of call k+1 (the trace's timestamps mark call starts: the gap correlates
  with the previous call's output length, 0.57 miniswe / 0.89 magagent, not with the next one's) minus an
  estimate of the traced LLM's own time for call k: output chars / the agent's fast decode rate (the 90th
  percentile over the agent's calls of previous output chars / gap, i.e. the gaps where the tool took ~0).
  Clipped to [min_gap_s, max_gap_s], then multiplied by gap_scale (1 = the real seconds). On the real data,
  miniswe's bash tools are short (p50 0.17 s, 0.5% over 2 s) and magagent's are long (WebSurfer mean 7.1 s,
  Coder 1.3 s, plan 3.0 s bimodal): Continuum's fixed 2 s TTL pins the first kind only.
- Text: turn 0 = the head of call 0's input; the tool result after turn k = the head of call k+1's
  input_delta (the real text the trace appended: a command's output, an orchestrator ledger prompt). Where a
  magagent delta is empty (the orchestrator re-sent the same prompt; the sub-agent's observation is not in
  the trace) the next non-empty delta of the same agent, in a seeded walk, stands in. Sizes in the served
  model's tokens: each real piece x context_scale, capped at max_piece_tokens; when the program's final
  context (all pieces + all outputs) exceeds max_context_tokens, every piece shrinks by one factor (at least
  min_piece_tokens each), so the program keeps its turns, its gaps and its shape of growth.
- Outputs: max_tokens of turn k = the real output of call k in tokens x output_scale, clipped to
  output_range; sent with ignore_eos and greedy, so lengths are deterministic.
- Arrivals: Poisson at `rate` programs/s over `duration_s` (seeded); templates drawn round-robin over the
  sources in `mix` and a seeded shuffle of each source's sessions.

The driver (`run_programs`) sends each program's turns through the router, one after another: await the
turn's stream, sleep the tool gap, send the next turn with the same program_id (last_turn on the final one,
tool_name on the others). Per turn it records TTFT/E2E and cached_prompt_tokens; per program the JCT =
first turn sent -> last turn finished.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import grpc

from bench.stats import RequestRecord, distribution_ms, measured_window_s
from bench.tokens import Tokenizer
from bench.workload import BE, LS, RequestSpec, data_dir

TRACE_FILE = "lmcache_agent_trace_calls.jsonl"
SOURCES = ("miniswe", "magagent")


# ----------------------------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class TraceCall:
    call_idx: int
    dt_prev_s: float | None
    input_delta: str
    output: str


@dataclass(frozen=True)
class TraceSession:
    agent: str
    session_id: str
    calls: tuple[TraceCall, ...]


@lru_cache(maxsize=4)
def load_agent_trace(root: str | None = None) -> dict[str, tuple[TraceSession, ...]]:
    """agent -> its sessions (sorted by id), calls in order."""
    path = Path(root or data_dir()) / "agent" / TRACE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"agent: {path} not found (set QLLM_SHARED_DATA to the shared data folder)")
    sessions: dict[tuple[str, str], list[TraceCall]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            sessions.setdefault((r["agent"], r["session_id"]), []).append(
                TraceCall(int(r["call_idx"]), r.get("dt_prev_s"), r.get("input_delta") or "", r.get("output") or ""))
    out: dict[str, list[TraceSession]] = {}
    for (agent, sid), calls in sorted(sessions.items()):
        calls.sort(key=lambda c: c.call_idx)
        out.setdefault(agent, []).append(TraceSession(agent, sid, tuple(calls)))
    return {a: tuple(s) for a, s in out.items()}


_BASH_BLOCK = re.compile(r"```bash\s*\n(.*?)```", re.S)
_CD_PREFIX = re.compile(r"^(cd\s+\S+\s*&&\s*)+")
_NEXT_SPEAKER = re.compile(r'"next_speaker"\s*:\s*\{[^}]*?"answer"\s*:\s*"([^"]+)"', re.S)


def tool_name(agent: str, output: str) -> str:
    """The tool the agent calls after a turn, from the turn's real output (see the module doc)."""
    if agent == "miniswe":
        blocks = _BASH_BLOCK.findall(output)
        cmd = _CD_PREFIX.sub("", blocks[-1].strip()) if blocks else ""
        word = cmd.split()[0] if cmd.split() else "none"
        return f"bash:{word}"
    if agent == "magagent":
        m = _NEXT_SPEAKER.search(output)
        return f"magentic:{m.group(1).strip() if m else 'plan'}"
    return f"{agent}:call"


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def llm_chars_per_s(sessions: Sequence[TraceSession], q: float = 0.9) -> float:
    """The traced LLM's fast output rate (chars/s): the q-quantile of previous output chars / gap, i.e. what
    the gaps imply where the tool took almost no time."""
    rates = [p.output.__len__() / c.dt_prev_s for s in sessions for p, c in zip(s.calls, s.calls[1:])
             if c.dt_prev_s and c.dt_prev_s > 0 and p.output]
    if not rates:
        raise ValueError("agent trace: no gaps to estimate the LLM's rate from")
    return _quantile(rates, q)


# ----------------------------------------------------------------------------------------------- programs


@dataclass
class TurnSpec:
    index: int
    append_text: str      # appended before this turn is sent: turn 0 the first prompt, later the tool result
    append_tokens: int
    max_tokens: int
    tool_name: str        # the tool called after this turn ("" on the last turn)
    tool_gap_s: float     # seconds between this turn's end and the next turn's send (0 on the last)
    trace_gap_s: float    # the trace's dt_prev_s of the next call (0 on the last)


@dataclass
class ProgramSpec:
    index: int
    program_id: str
    arrival_s: float
    source: str           # agent/session of the trace
    turns: list[TurnSpec]

    @property
    def planned_context_tokens(self) -> int:
        """The final turn's prompt + output if every output is max_tokens tokens long (what the build fits)."""
        return sum(t.append_tokens + t.max_tokens for t in self.turns)

    def to_dict(self) -> dict:
        d = asdict(self)
        for t in d["turns"]:
            t.pop("append_text")
        d["planned_context_tokens"] = self.planned_context_tokens
        return d


@dataclass
class AgentConfig:
    duration_s: float
    rate: float = 0.35                   # programs/s (Poisson)
    seed: int = 0
    mix: tuple[str, ...] = SOURCES       # round-robin over these trace agents
    max_turns: int = 8
    context_scale: float = 0.5           # tokens of each real text piece x this
    max_piece_tokens: int = 640          # cap of one piece (the first prompt, a tool result)
    min_piece_tokens: int = 8
    max_context_tokens: int = 3584       # the final turn's prompt + output fits this
    output_scale: float = 0.15
    output_range: tuple[int, int] = (8, 32)
    gap_scale: float = 0.5               # multiplies the real tool gaps (the scenario default: half)
    min_gap_s: float = 0.05
    max_gap_s: float = 20.0
    context_tokens: int = 4096           # the model's window
    data_root: str | None = None


@dataclass
class AgentWorkload:
    programs: list[ProgramSpec]
    info: dict = field(default_factory=dict)

    @property
    def requests(self) -> list[RequestSpec]:
        """The first turns as standalone requests (warm-up, emptiness checks)."""
        return [RequestSpec(p.index, BE, p.arrival_s, p.turns[0].append_text, p.turns[0].append_tokens,
                            p.turns[0].max_tokens, p.turns[0].append_tokens, p.turns[0].max_tokens)
                for p in self.programs]

    def of_class(self, cls: str) -> list[RequestSpec]:
        return [r for r in self.requests if r.cls == cls]


def _head(tokenizer: Tokenizer, ids: list[int], n: int) -> tuple[str, int]:
    """The text of the first n tokens and its re-encoded count (shortened while a re-encode grows it)."""
    n = max(1, min(n, len(ids)))
    text = tokenizer.decode(ids[:n])
    count = len(tokenizer.encode(text))
    for _ in range(8):
        if count <= n or n <= 1:
            break
        n = max(1, n - (count - n))
        text = tokenizer.decode(ids[:n])
        count = len(tokenizer.encode(text))
    return text, count


class _Pieces:
    """Token ids of trace texts, cached; and the seeded walk over an agent's non-empty deltas."""

    def __init__(self, tokenizer: Tokenizer, sessions: Sequence[TraceSession], rng: random.Random):
        self.tok = tokenizer
        self._ids: dict[str, list[int]] = {}
        self.fillers = [c.input_delta for s in sessions for c in s.calls[1:] if c.input_delta.strip()]
        rng.shuffle(self.fillers)
        self.pos = 0

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok.encode(text)
        return self._ids[text]

    def filler(self) -> str:
        if not self.fillers:
            return "(no output)"
        text = self.fillers[self.pos % len(self.fillers)]
        self.pos += 1
        return text


def _program_turns(session: TraceSession, cfg: AgentConfig, pieces: _Pieces, chars_per_s: float) -> list[TurnSpec]:
    calls = session.calls[:cfg.max_turns]
    texts = [calls[0].input_delta] + [c.input_delta if c.input_delta.strip() else pieces.filler() for c in calls[1:]]
    ids = [pieces.ids(t) for t in texts]
    lo, hi = cfg.output_range
    outs = [int(min(hi, max(lo, round(len(pieces.ids(c.output)) * cfg.output_scale)))) for c in calls]
    want = [max(cfg.min_piece_tokens, min(cfg.max_piece_tokens, round(len(x) * cfg.context_scale))) for x in ids]
    budget = cfg.max_context_tokens - sum(outs)
    if budget < cfg.min_piece_tokens * len(want):
        raise ValueError(f"agent: {session.agent}/{session.session_id}: {len(calls)} turns with outputs of "
                         f"{sum(outs)} tokens leave no room in {cfg.max_context_tokens} context tokens")
    if sum(want) > budget:
        # one factor on every piece above the floor, so the final context fits the budget
        floor = cfg.min_piece_tokens * len(want)
        factor = (budget - floor) / max(1, sum(w - cfg.min_piece_tokens for w in want))
        want = [cfg.min_piece_tokens + int((w - cfg.min_piece_tokens) * factor) for w in want]
    turns = []
    for k, c in enumerate(calls):
        text, n = _head(pieces.tok, ids[k], want[k])
        last = k == len(calls) - 1
        gap = trace_gap = 0.0
        if not last:
            trace_gap = float(calls[k + 1].dt_prev_s or 0.0)
            tool_s = trace_gap - len(c.output) / chars_per_s
            gap = min(cfg.max_gap_s, max(cfg.min_gap_s, tool_s)) * cfg.gap_scale
        # a piece after the first starts on a new line, as a tool result in a transcript does
        if k and not text.startswith("\n"):
            text = "\n" + text
            n = len(pieces.tok.encode(text))
        turns.append(TurnSpec(k, text, n, outs[k], "" if last else tool_name(session.agent, c.output), gap,
                              trace_gap))
    # the newline prefixes can add a token each: take it back from the outputs of the longest turns
    over = sum(t.append_tokens + t.max_tokens for t in turns) - cfg.max_context_tokens
    for t in sorted(turns, key=lambda t: -t.max_tokens):
        if over <= 0:
            break
        cut = min(over, t.max_tokens - 1)
        t.max_tokens -= cut
        over -= cut
    return turns


def build_agent_workload(cfg: AgentConfig, tokenizer: Tokenizer) -> AgentWorkload:
    """The same config, seed and tokenizer give the same programs, byte for byte."""
    if cfg.max_turns < 1 or not cfg.mix:
        raise ValueError("agent: max_turns must be >= 1 and mix non-empty")
    if not 1 <= cfg.output_range[0] <= cfg.output_range[1]:
        raise ValueError(f"agent: bad output range {cfg.output_range}")
    if cfg.max_context_tokens > cfg.context_tokens:
        raise ValueError(f"agent: max_context_tokens {cfg.max_context_tokens} exceeds the model's context "
                         f"({cfg.context_tokens} tokens)")
    if cfg.gap_scale < 0 or cfg.context_scale <= 0 or cfg.output_scale <= 0:
        raise ValueError("agent: gap_scale must be >= 0, context_scale and output_scale > 0")
    trace = load_agent_trace(cfg.data_root)
    unknown = [a for a in cfg.mix if a not in trace]
    if unknown:
        raise ValueError(f"agent: unknown trace agent(s) {', '.join(unknown)}; known: {', '.join(sorted(trace))}")
    info: dict = {"seed": cfg.seed, "duration_s": cfg.duration_s, "context_tokens": cfg.context_tokens,
                  "tokenizer": getattr(tokenizer, "name", "?"), "classes": {},
                  "agent": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                            if k not in ("data_root",)}}
    if cfg.rate <= 0:
        return AgentWorkload([], info)
    rng = random.Random(f"{cfg.seed}/agent/arrivals")
    arrivals = []
    t = rng.expovariate(cfg.rate)
    while t < cfg.duration_s:
        arrivals.append(t)
        t += rng.expovariate(cfg.rate)
    orders, pieces, rates = {}, {}, {}
    for agent in dict.fromkeys(cfg.mix):
        sessions = [s for s in trace[agent] if len(s.calls) >= 2]
        random.Random(f"{cfg.seed}/agent/{agent}/sessions").shuffle(sessions)
        orders[agent] = sessions
        pieces[agent] = _Pieces(tokenizer, trace[agent], random.Random(f"{cfg.seed}/agent/{agent}/fillers"))
        rates[agent] = llm_chars_per_s(trace[agent])
    used = {a: 0 for a in orders}
    programs = []
    for i, at in enumerate(arrivals):
        agent = cfg.mix[i % len(cfg.mix)]
        session = orders[agent][used[agent] % len(orders[agent])]
        used[agent] += 1
        turns = _program_turns(session, cfg, pieces[agent], rates[agent])
        programs.append(ProgramSpec(i, f"prog-{cfg.seed}-{i}", at, f"{agent}/{session.session_id}", turns))
    info["agent"]["llm_chars_per_s"] = rates
    info["classes"][BE] = _summary(programs, cfg)
    return AgentWorkload(programs, info)


def _summary(programs: Sequence[ProgramSpec], cfg: AgentConfig) -> dict:
    turns = [t for p in programs for t in p.turns]
    gaps = [t.tool_gap_s for p in programs for t in p.turns[:-1]]
    prompt_tokens = 0
    for p in programs:  # the prompt each turn is sent with, if every output has its max_tokens
        ctx = 0
        for t in p.turns:
            ctx += t.append_tokens
            prompt_tokens += ctx
            ctx += t.max_tokens
    n = len(programs)
    tools: dict[str, int] = {}
    for p in programs:
        for t in p.turns[:-1]:
            tools[t.tool_name] = tools.get(t.tool_name, 0) + 1
    return {
        "trace": f"lmcache agent trace ({', '.join(dict.fromkeys(cfg.mix))})", "prompt_source": "agent trace deltas",
        "target_rate": cfg.rate, "realized_rate": n / cfg.duration_s if cfg.duration_s > 0 else 0.0,
        "count": len(turns), "programs": n, "turns_per_program_mean": len(turns) / n if n else 0.0,
        "time_multiplier": cfg.gap_scale, "prompt_range": [1, cfg.max_context_tokens],
        "output_range": list(cfg.output_range),
        "prompt_tokens_mean": prompt_tokens / len(turns) if turns else 0.0,
        "max_tokens_mean": sum(t.max_tokens for t in turns) / len(turns) if turns else 0.0,
        "final_context_tokens_mean": sum(p.planned_context_tokens for p in programs) / n if n else 0.0,
        "final_context_tokens_max": max((p.planned_context_tokens for p in programs), default=0),
        # every turn recomputed (no-pin) vs only the new text (a pin that always holds)
        "offered_prompt_tok_s": prompt_tokens / cfg.duration_s,
        "offered_new_prompt_tok_s": sum(t.append_tokens for t in turns) / cfg.duration_s,
        "offered_output_tok_s": sum(t.max_tokens for t in turns) / cfg.duration_s,
        "tool_gap_s": {"p50": _quantile(gaps, 0.5) if gaps else None, "p90": _quantile(gaps, 0.9) if gaps else None,
                       "mean": sum(gaps) / len(gaps) if gaps else None,
                       "share_over_2s": sum(g > 2.0 for g in gaps) / len(gaps) if gaps else None},
        "tools": dict(sorted(tools.items(), key=lambda kv: -kv[1])),
    }


# ----------------------------------------------------------------------------------------------- records


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


# ----------------------------------------------------------------------------------------------- driver

Clock = Callable[[], float]


class AgentSender:
    """qllm.v1.Router/Generate for program turns: program_id, last_turn, tool_name; returns the generated text."""

    def __init__(self, address: str, *, request_id_prefix: str = "agent", priority: str = BE,
                 timeout_s: float | None = None):
        from bench.client import CHANNEL_OPTIONS
        from qllm.client import Client
        from qllm.v1 import common_pb2, router_pb2

        self._pb = router_pb2
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
        from bench.client import consume_generate

        last = turn.index == len(program.turns) - 1
        request = self._pb.GenerateRequest(
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
    from bench.client import _progress, wait_then_cancel

    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    records = [ProgramRecord(p.index, p.program_id, p.arrival_s, p.source, len(p.turns)) for p in programs]
    bar = _progress(len(programs), label or sender.label, progress)
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


# ----------------------------------------------------------------------------------------------- pinned KV samples


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
        from qllm.v1 import worker_pb2, worker_pb2_grpc

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


# ----------------------------------------------------------------------------------------------- figures


def summarize_programs(programs: Sequence[ProgramRecord], samples: Sequence[dict] | None = None) -> dict:
    """What an agent run adds to the usual per-class figures: JCT over completed programs, programs/s, the
    share of prompt tokens served from pinned KV, and the pinned KV over time."""
    turns = [t for p in programs for t in p.turns]
    jct = [p.jct_s for p in programs if p.jct_s is not None]
    window = measured_window_s(turns)
    prompt = sum(t.server_prompt_tokens or 0 for t in turns if t.completed)
    cached = sum(t.cached_prompt_tokens or 0 for t in turns if t.completed)
    ended: dict[str, int] = {}
    for p in programs:
        if not p.completed:
            key = p.ended.split(":")[0] if p.ended else "incomplete"
            ended[key] = ended.get(key, 0) + 1
    pinned = [s["pinned_tokens"] for s in samples or ()]
    return {
        "jct_ms": distribution_ms(jct),
        "programs": {"count": len(programs), "completed": len(jct), "incomplete": len(programs) - len(jct),
                     "ended": ended},
        "programs_per_s": len(jct) / window if window > 0 else 0.0,
        "turns_completed": sum(t.completed for t in turns),
        "prompt_tokens": prompt, "cached_prompt_tokens": cached,
        "prefix_hit_share": cached / prompt if prompt else None,
        "pinned_kv": {"samples": list(samples or ()),
                      "max_tokens": max(pinned) if pinned else None,
                      "mean_tokens": sum(pinned) / len(pinned) if pinned else None},
    }


#: the ratios the report shows: (numerator policy, denominator policy)
RATIOS = (("no-pin", "ttl"), ("ttl", "pin-forever"), ("fixed-ttl", "ttl"))


def ratios(runs: Sequence[dict]) -> list[dict]:
    """Mean and p99 JCT of one policy over another's, for the pairs in RATIOS present in this run."""
    by = {r["policy"]: r for r in runs if r.get("jct_ms") and not r.get("sweep")}
    out = []
    for a, b in RATIOS:
        if a in by and b in by:
            row = {"ratio": f"{a} / {b}"}
            for q in ("mean", "p50", "p99"):
                x, y = by[a]["jct_ms"].get(q), by[b]["jct_ms"].get(q)
                row[f"jct_{q}"] = x / y if x is not None and y else None
            out.append(row)
    return out


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(doc: dict) -> str:
    """The agent section of the report (empty when no run carries jct_ms)."""
    runs = [r for r in doc.get("runs", []) if r.get("jct_ms")]
    if not runs:
        return ""
    lines = ["", "Agent programs (JCT = first turn sent to last turn finished; s; hit share = prompt tokens served "
             "from pinned KV / prompt tokens):", "",
             "| policy | programs | done | JCT p50 | JCT p99 | JCT mean | turn TTFT p50 (ms) | turn TTFT p99 (ms) "
             "| hit share | pinned KV mean | pinned KV max | programs/s | out tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        j = r["jct_ms"]
        cls = next(iter(r.get("classes", {}).values()), {})
        ttft = cls.get("ttft_ms", {})
        pk = r.get("pinned_kv", {})
        hit = r.get("prefix_hit_share")
        lines.append(
            f"| {r['policy']}{(' ' + json.dumps(r['sweep'])) if r.get('sweep') else ''} | {r['programs']['count']} "
            f"| {r['programs']['completed']} | {_f(_s(j['p50']))} | {_f(_s(j['p99']))} | {_f(_s(j['mean']))} "
            f"| {_f(ttft.get('p50'), 0)} | {_f(ttft.get('p99'), 0)} | {'–' if hit is None else f'{100 * hit:.0f}%'} "
            f"| {_f(pk.get('mean_tokens'), 0)} | {_f(pk.get('max_tokens'))} | {_f(r.get('programs_per_s'), 3)} "
            f"| {_f(r.get('total_output_tok_s'))} |")
    rows = ratios(doc["runs"])
    if rows:
        lines += ["", "| JCT ratio | mean | p50 | p99 |", "|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['ratio']} | {_f(row['jct_mean'], 2)} | {_f(row['jct_p50'], 2)} "
                         f"| {_f(row['jct_p99'], 2)} |")
    return "\n".join(lines) + "\n"


def _s(ms):
    return None if ms is None else ms / 1000.0


def plot_pinned(path, doc: dict) -> bool:
    """Memory held by pins over time, one line per run; False (nothing written) when no run has samples."""
    runs = [r for r in doc.get("runs", []) if (r.get("pinned_kv") or {}).get("samples")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    capacity = 0
    for r in runs:
        s = r["pinned_kv"]["samples"]
        ax.plot([x["t_s"] for x in s], [x["pinned_tokens"] for x in s], label=r["policy"], linewidth=1.2)
        capacity = max(capacity, max(x.get("capacity_tokens", 0) for x in s))
    if capacity:
        ax.axhline(capacity, color="grey", linestyle=":", linewidth=0.8, label=f"KV capacity {capacity}")
    ax.set_xlabel("time since the first program (s)")
    ax.set_ylabel("KV tokens held by pins")
    ax.set_title(f"{doc.get('scenario', 'agent')}: memory held by pins")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def validate_run(run: dict, where: str, error=ValueError) -> None:
    """The agent fields of one run (report.validate calls this for runs that carry jct_ms)."""
    j = run.get("jct_ms")
    if not isinstance(j, dict):
        raise error(f"{where}.jct_ms: expected an object")
    for k in ("p50", "p99", "mean"):
        if k not in j:
            raise error(f"{where}.jct_ms.{k}: missing")
        v = j[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise error(f"{where}.jct_ms.{k}: expected a number >= 0 or null, got {v!r}")
    p = run.get("programs")
    if not isinstance(p, dict) or not all(isinstance(p.get(k), int) for k in ("count", "completed", "incomplete")):
        raise error(f"{where}.programs: expected count, completed, incomplete")
    hit = run.get("prefix_hit_share")
    if hit is not None and not (isinstance(hit, (int, float)) and 0 <= hit <= 1):
        raise error(f"{where}.prefix_hit_share: expected a share in [0, 1] or null, got {hit!r}")
    if not isinstance((run.get("pinned_kv") or {}).get("samples"), list):
        raise error(f"{where}.pinned_kv.samples: expected a list")


def write_programs(path, records: dict[str, Sequence[ProgramRecord]]) -> None:
    """One line per program and run (JCT, how it ended), for figures not computed here."""
    with open(path, "w") as f:
        for label, recs in records.items():
            for r in recs:
                f.write(json.dumps({"run": label, **r.to_dict()}) + "\n")


def describe(workload: AgentWorkload, out=sys.stderr) -> None:
    ci = workload.info["classes"].get(BE, {})
    print(f"agent workload: {ci.get('programs')} programs, {ci.get('count')} turns, final context mean "
          f"{ci.get('final_context_tokens_mean', 0):.0f} tokens", file=out)
