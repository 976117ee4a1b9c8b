"""The LMCache agent trace (`shared/data/agent/lmcache_agent_trace_calls.jsonl`): real wall-clock gaps between
an agent's LLM calls and the real text each call appended. Two agents: `miniswe` (mini-swe-agent on terminal
tasks: every call extends the previous one with a shell command's output) and `magagent` (the Magentic-One
orchestrator: web, code and terminal sub-agents).

Tool name after a call, read from the call's real output: miniswe: `bash:<first word of the command in the
reply's last ```bash block>` (leading `cd DIR &&` dropped); magagent: `magentic:<next_speaker>` from the
orchestrator's JSON ledger (`WebSurfer`, `Coder`, `FileSurfer`, `ComputerTerminal`), `magentic:plan` for its
planning calls (no ledger).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from bench.workload import data_dir

TRACE_FILE = "lmcache_agent_trace_calls.jsonl"
SOURCES = ("miniswe", "magagent")


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


def quantile(xs: Sequence[float], q: float) -> float:
    """The smallest x with at least a share q of xs at or below it."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def llm_chars_per_s(sessions: Sequence[TraceSession], q: float = 0.9) -> float:
    """The traced LLM's fast output rate (chars/s): the q-quantile of previous output chars / gap, i.e. what
    the gaps imply where the tool took almost no time."""
    rates = [len(p.output) / c.dt_prev_s for s in sessions for p, c in zip(s.calls, s.calls[1:])
             if c.dt_prev_s and c.dt_prev_s > 0 and p.output]
    if not rates:
        raise ValueError("agent trace: no gaps to estimate the LLM's rate from")
    return quantile(rates, q)
