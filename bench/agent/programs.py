"""Agent programs built from the agent trace (pure, seeded; `build_agent_workload`).

A program is a sequence of turns. Turn 0's prompt is the agent's first real prompt; the prompt of turn k+1 is
the prompt of turn k + the text the model generated in turn k + the result text of the tool the agent called
after turn k. So each turn's prompt textually extends the previous turn's prompt and output, which is what
lets a worker that kept (pinned) turn k's KV compute only the new suffix (Continuum's mechanism).

- Templates: one trace session per program; turns = the session's first `max_turns` calls.
- Tool name of turn k = the tool the agent calls after it (bench/agent/trace.py).
- Tool gap after turn k = dt_prev_s of call k+1 (the trace's timestamps mark call starts, so the gap follows
  the previous call's output length) minus an estimate of the traced LLM's own time for call k: output chars /
  the agent's fast decode rate (a high quantile over the agent's calls of previous output chars / gap, i.e.
  the gaps where the tool took ~0). Clipped to [min_gap_s, max_gap_s], then multiplied by gap_scale (1 = the
  real seconds). How the real gaps fall against a fixed TTL: docs/benchmarks.md, "Scenario `agent`".
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
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

from bench.agent.trace import SOURCES, TraceSession, llm_chars_per_s, load_agent_trace, quantile, tool_name
from bench.tokens import Tokenizer
from bench.workload import BE, RequestSpec


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
        "tool_gap_s": {"p50": quantile(gaps, 0.5) if gaps else None, "p90": quantile(gaps, 0.9) if gaps else None,
                       "mean": sum(gaps) / len(gaps) if gaps else None,
                       "share_over_2s": sum(g > 2.0 for g in gaps) / len(gaps) if gaps else None},
        "tools": dict(sorted(tools.items(), key=lambda kv: -kv[1])),
    }
