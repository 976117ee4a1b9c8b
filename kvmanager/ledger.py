"""The pin ledger: which agent program has its KV pinned on which worker, how many tokens, until when.

Pure bookkeeping with the clock passed in (`now`, seconds on any one clock: the server uses wall-clock
time so `expires_at` can go on the wire). One pin per program: a new turn's pin replaces the previous one.
An optional per-worker token budget refuses pins that would go over it.

The ledger also remembers, per live program, the tool called after its latest turn, so the duration the
router reports with the next turn can be attributed to that tool; programs are forgotten on their last
turn, on release, or after `program_idle_s` without a report.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class PinEntry:
    program_id: str
    worker: str
    tokens: int
    expires_at: float
    turn_index: int = 0
    tool_name: str = ""


@dataclass
class _Program:
    last_tool: str
    last_seen: float


class Ledger:
    def __init__(self, max_tokens_per_worker: int = 0, program_idle_s: float = 3600.0, max_programs: int = 100_000):
        self.max_tokens_per_worker = max_tokens_per_worker  # 0 = unlimited
        self.program_idle_s = program_idle_s
        self.max_programs = max_programs
        self._pins: dict[str, PinEntry] = {}
        self._tokens: dict[str, int] = {}
        self._programs: OrderedDict[str, _Program] = OrderedDict()

    # --- pins -------------------------------------------------------------------------------------------
    def pin(self, program_id: str, worker: str, tokens: int, ttl_s: float, now: float, *, turn_index: int = 0,
            tool_name: str = "") -> PinEntry | None:
        """Pins (replacing the program's previous pin); None when the worker's budget has no room."""
        self.expire(now)
        self.release(program_id)
        if self.max_tokens_per_worker and self._tokens.get(worker, 0) + tokens > self.max_tokens_per_worker:
            return None
        entry = PinEntry(program_id, worker, int(tokens), now + ttl_s, turn_index, tool_name)
        self._pins[program_id] = entry
        self._tokens[worker] = self._tokens.get(worker, 0) + entry.tokens
        return entry

    def release(self, program_id: str) -> PinEntry | None:
        entry = self._pins.pop(program_id, None)
        if entry is not None:
            left = self._tokens.get(entry.worker, 0) - entry.tokens
            if left > 0:
                self._tokens[entry.worker] = left
            else:
                self._tokens.pop(entry.worker, None)
        return entry

    def expire(self, now: float) -> list[PinEntry]:
        """Drops and returns the pins whose time is up (expires_at <= now)."""
        gone = [e for e in self._pins.values() if e.expires_at <= now]
        for entry in gone:
            self.release(entry.program_id)
        self._forget_idle(now)
        return gone

    def get(self, program_id: str, now: float) -> PinEntry | None:
        self.expire(now)
        return self._pins.get(program_id)

    def list(self, now: float, worker: str | None = None) -> list[PinEntry]:
        """Live pins, soonest expiry first (of one worker when given)."""
        self.expire(now)
        pins = [e for e in self._pins.values() if not worker or e.worker == worker]
        return sorted(pins, key=lambda e: (e.expires_at, e.program_id))

    def pinned_tokens(self, worker: str | None = None) -> int:
        if worker is None:
            return sum(self._tokens.values())
        return self._tokens.get(worker, 0)

    def __len__(self) -> int:
        return len(self._pins)

    # --- programs ---------------------------------------------------------------------------------------
    def turn_ended(self, program_id: str, tool_name: str, last_turn: bool, now: float) -> str:
        """Records that a turn ended; returns the tool the program called before this turn ("" if unknown)."""
        prog = self._programs.pop(program_id, None)
        previous_tool = prog.last_tool if prog else ""
        if last_turn:
            self.release(program_id)
        else:
            self._programs[program_id] = _Program(tool_name, now)
            while len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)
        return previous_tool

    def forget(self, program_id: str) -> None:
        self._programs.pop(program_id, None)

    def programs(self) -> int:
        return len(self._programs)

    def _forget_idle(self, now: float) -> None:
        while self._programs:
            pid, prog = next(iter(self._programs.items()))
            if now - prog.last_seen < self.program_idle_s:
                break
            del self._programs[pid]
