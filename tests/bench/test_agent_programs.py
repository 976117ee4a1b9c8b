"""Agent programs built from the LMCache agent trace (bench/agent/): deterministic, well-formed, sized to the
model's window; tool names and tool gaps as documented."""

import json
import random

import pytest

from bench.agent.programs import AgentConfig, _Pieces, _program_turns, build_agent_workload
from bench.agent.trace import TraceCall, TraceSession, llm_chars_per_s, load_agent_trace, tool_name
from bench.tokens import load_tokenizer
from bench.workload import data_dir


@pytest.fixture(scope="module")
def real():
    if not (data_dir() / "agent" / "lmcache_agent_trace_calls.jsonl").is_file():
        pytest.skip("shared/data/agent not here")
    return load_tokenizer()  # the embedded default's tokenizer: what the worker counts


def _dump(w):
    return json.dumps([{**p.to_dict(), "texts": [t.append_text for t in p.turns]} for p in w.programs])


def test_tool_names_from_the_outputs():
    out = "THOUGHT: look\n\n```bash\nls\n```\nthen\n```bash\ncd /repo && cd src && grep -rn foo .\n```"
    assert tool_name("miniswe", out) == "bash:grep"
    assert tool_name("miniswe", "no block here") == "bash:none"
    ledger = '{"is_request_satisfied": {"answer": false},\n "next_speaker": {"reason": "web",\n  "answer": "WebSurfer"}}'
    assert tool_name("magagent", ledger) == "magentic:WebSurfer"
    assert tool_name("magagent", "1. GIVEN OR VERIFIED FACTS ...") == "magentic:plan"


def test_gap_is_trace_gap_minus_llm_time_clipped_and_scaled(tiny_tokenizer):
    # outputs of 100 chars at 100 chars/s take 1 s of the traced LLM's time
    calls = (TraceCall(0, None, "first prompt " * 30, "a" * 100),
             TraceCall(1, 3.5, "tool result one", "b" * 100),   # tool 2.5 s
             TraceCall(2, 0.5, "", "c" * 100),                  # would be -0.5 s: clipped to min_gap_s
             TraceCall(3, 90.0, "tool result three", "d" * 100))  # 89 s: clipped to max_gap_s
    session = TraceSession("miniswe", "s", calls)
    assert llm_chars_per_s([session], q=0.0) == pytest.approx(100 / 90.0)
    cfg = AgentConfig(duration_s=1, gap_scale=0.5, min_gap_s=0.05, max_gap_s=20.0, max_context_tokens=2000)
    pieces = _Pieces(tiny_tokenizer, [session], random.Random(0))
    turns = _program_turns(session, cfg, pieces, chars_per_s=100.0)
    assert [t.tool_gap_s for t in turns] == pytest.approx([1.25, 0.025, 10.0, 0.0])
    assert [t.trace_gap_s for t in turns] == [3.5, 0.5, 90.0, 0.0]
    # the empty delta of call 2 got real text from another call of the agent, not nothing
    assert turns[2].append_text.strip() and turns[2].append_tokens > 0


def test_deterministic_and_seeded(real):
    cfg = AgentConfig(duration_s=60, rate=0.3, seed=3)
    a, b = build_agent_workload(cfg, real), build_agent_workload(cfg, real)
    assert _dump(a) == _dump(b) and a.info == b.info
    c = build_agent_workload(AgentConfig(duration_s=60, rate=0.3, seed=4), real)
    assert _dump(a) != _dump(c)


@pytest.mark.parametrize("gap_scale", [1.0, 0.5])
def test_programs_well_formed_from_the_real_trace(real, gap_scale):
    cfg = AgentConfig(duration_s=120, rate=0.3, seed=0, gap_scale=gap_scale)
    w = build_agent_workload(cfg, real)
    assert len(w.programs) > 10
    arrivals = [p.arrival_s for p in w.programs]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < cfg.duration_s
    assert len({p.program_id for p in w.programs}) == len(w.programs)
    assert {p.source.split("/")[0] for p in w.programs} == {"miniswe", "magagent"}
    gaps = []
    for p in w.programs:
        assert 2 <= len(p.turns) <= cfg.max_turns
        assert [t.index for t in p.turns] == list(range(len(p.turns)))
        for t in p.turns[:-1]:
            assert t.tool_name and ":" in t.tool_name
            assert t.tool_gap_s >= 0 and t.tool_gap_s <= cfg.max_gap_s * gap_scale
            gaps.append(t.tool_gap_s)
        assert p.turns[-1].tool_name == "" and p.turns[-1].tool_gap_s == 0
        assert all(cfg.output_range[0] <= t.max_tokens <= cfg.output_range[1] for t in p.turns[:-1])
        assert all(t.max_tokens >= 1 for t in p.turns)
        assert p.turns[0].append_text.strip()
        assert all(t.append_text.startswith("\n") for t in p.turns[1:])  # a tool result starts a new line
        # the final context fits the window, counted as the worker counts: the whole text re-encoded, plus
        # every output at its max_tokens
        assert p.planned_context_tokens <= cfg.max_context_tokens <= cfg.context_tokens
        text = "".join(t.append_text for t in p.turns)
        assert len(real.encode(text)) + sum(t.max_tokens for t in p.turns) <= cfg.context_tokens
    # both kinds of tool calls: shorter and longer than the fixed-ttl baseline's 2 s
    over = sum(g > 2.0 for g in gaps) / len(gaps)
    assert 0.1 < over < 0.6
    tools = w.info["classes"]["BE"]["tools"]
    assert "magentic:WebSurfer" in tools and any(t.startswith("bash:") for t in tools)
    # no-pin recomputes every prompt; a pin that always holds prefills only the new text
    ci = w.info["classes"]["BE"]
    assert ci["offered_prompt_tok_s"] > 3 * ci["offered_new_prompt_tok_s"]


def test_context_budget_shrinks_pieces_not_turns(real):
    big = build_agent_workload(AgentConfig(duration_s=60, rate=0.3, max_context_tokens=3584), real)
    small = build_agent_workload(AgentConfig(duration_s=60, rate=0.3, max_context_tokens=1500), real)
    assert [len(p.turns) for p in big.programs] == [len(p.turns) for p in small.programs]
    assert [[t.tool_gap_s for t in p.turns] for p in big.programs] == [[t.tool_gap_s for t in p.turns]
                                                                       for p in small.programs]
    assert all(p.planned_context_tokens <= 1500 for p in small.programs)
    assert max(p.planned_context_tokens for p in big.programs) > 1500


def test_bad_configs(real):
    with pytest.raises(ValueError, match="unknown trace agent"):
        build_agent_workload(AgentConfig(duration_s=10, mix=("nope",)), real)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        build_agent_workload(AgentConfig(duration_s=10, max_context_tokens=5000), real)
    assert build_agent_workload(AgentConfig(duration_s=10, rate=0.0), real).programs == []


def test_trace_sessions_in_call_order(real):
    trace = load_agent_trace()
    for agent in ("miniswe", "magagent"):
        for s in trace[agent]:
            assert [c.call_idx for c in s.calls] == sorted(c.call_idx for c in s.calls)
            assert s.calls[0].dt_prev_s is None or s.calls[0].dt_prev_s == 0
