"""What the KVManager service decides, without grpc: ledger + tool-duration stats + pin policy.

`PinManager.report(turn, prev_tool_duration_s, now)` handles one finished turn:
1. attributes the reported duration of the previous tool call to the tool the program named last turn;
2. asks the policy whether to pin this turn's KV and for how long;
3. records the pin in the ledger (or releases the program on its last turn), within the worker's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvmanager.ledger import Ledger, PinEntry
from kvmanager.ttl import Decision, PinPolicy, ToolDurations, Turn

MAX_ID_CHARS = 256


class InvalidReport(ValueError):
    """Bad input; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    entry: PinEntry | None  # the pin recorded, if any

    @property
    def expires_at(self) -> float:
        return self.entry.expires_at if self.entry else 0.0


def validate(turn: Turn, prev_tool_duration_s: float) -> None:
    if not turn.program_id:
        raise InvalidReport("program_id", "must not be empty")
    if len(turn.program_id) > MAX_ID_CHARS:
        raise InvalidReport("program_id", f"longer than {MAX_ID_CHARS} characters")
    if not turn.worker:
        raise InvalidReport("worker", "must not be empty")
    if len(turn.worker) > MAX_ID_CHARS:
        raise InvalidReport("worker", f"longer than {MAX_ID_CHARS} characters")
    if len(turn.tool_name) > MAX_ID_CHARS:
        raise InvalidReport("tool_name", f"longer than {MAX_ID_CHARS} characters")
    if not math.isfinite(prev_tool_duration_s) or prev_tool_duration_s < 0:
        raise InvalidReport("prev_tool_duration_s", "must be a finite number >= 0")


class PinManager:
    def __init__(self, policy: PinPolicy, ledger: Ledger | None = None, tools: ToolDurations | None = None):
        self.policy = policy
        self.ledger = ledger if ledger is not None else Ledger()
        self.tools = tools if tools is not None else ToolDurations()

    def report(self, turn: Turn, prev_tool_duration_s: float, now: float) -> Outcome:
        validate(turn, prev_tool_duration_s)
        previous_tool = self.ledger.turn_ended(turn.program_id, turn.tool_name, turn.last_turn, now)
        if previous_tool and prev_tool_duration_s > 0:
            self.tools.observe(previous_tool, prev_tool_duration_s)
        decision = self.policy.decide(turn, self.tools)
        if not decision.pin or decision.ttl_s <= 0:
            self.ledger.release(turn.program_id)
            return Outcome(Decision(False, 0.0, decision.reason), None)
        entry = self.ledger.pin(turn.program_id, turn.worker, turn.context_tokens, decision.ttl_s, now,
                                turn_index=turn.turn_index, tool_name=turn.tool_name)
        if entry is None:
            return Outcome(Decision(False, 0.0, "over_budget"), None)
        return Outcome(decision, entry)

    def release(self, program_id: str) -> bool:
        self.ledger.forget(program_id)
        return self.ledger.release(program_id) is not None

    def pins(self, now: float, worker: str | None = None) -> list[PinEntry]:
        return self.ledger.list(now, worker)
