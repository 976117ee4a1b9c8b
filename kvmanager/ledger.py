"""The pin ledger: which agent program has its KV pinned on which worker, how many tokens, until when.

Pure bookkeeping with the clock passed in (`now`, seconds on any one clock: the server uses wall-clock
time so `expires_at` can go on the wire). One pin per program: a new turn's pin replaces the previous one.
Each worker has a token budget for pins (`budget(worker)`: the flag when set, else what the manager learned
from the worker's KV capacity, 0 = unlimited); the ledger only counts, the manager decides what to evict.

The ledger also remembers, per live program, the tool called after its latest turn and that turn's index,
so the duration the router reports with the next turn can be attributed to that tool and the manager can
learn whether programs continue; programs are forgotten on their last turn, on release, or after
`program_idle_s` without a report (those that went idle are kept in `abandoned` until the manager takes
them).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PinEntry:
    program_id: str
    worker: str
    tokens: int
    expires_at: float
    turn_index: int = 0
    tool_name: str = ""
    keep_score: float = 0.0
    pinned_at: float = 0.0
    p_continue: float = 1.0
    # The predicted duration of the tool the pin waits for (kvmanager.ttl.DurationQuantiles), if any.
    durations: Any = field(default=None, compare=False, repr=False)
    seq: int = 0  # tells this pin from a later pin of the same program


@dataclass
class ProgramTurn:
    tool: str  # the tool called after the turn
    turn_index: int
    last_seen: float


class Ledger:
    def __init__(self, max_tokens_per_worker: int = 0, program_idle_s: float = 3600.0, max_programs: int = 100_000):
        self.max_tokens_per_worker = max_tokens_per_worker  # 0 = learn per worker (or unlimited)
        self.learned_budgets: dict[str, int] = {}
        self.program_idle_s = program_idle_s
        self.max_programs = max_programs
        self.abandoned: list[ProgramTurn] = []  # programs that went idle after a non-final turn
        self._pins: dict[str, PinEntry] = {}
        self._tokens: dict[str, int] = {}
        self._programs: OrderedDict[str, ProgramTurn] = OrderedDict()
        self._seq = itertools.count(1)

    # --- pins -------------------------------------------------------------------------------------------
    def budget(self, worker: str) -> int:
        """Tokens the worker may hold in pins (0 = unlimited)."""
        return self.max_tokens_per_worker or self.learned_budgets.get(worker, 0)

    def fits(self, worker: str, tokens: int, program_id: str = "") -> bool:
        budget = self.budget(worker)
        mine = self._pins.get(program_id)
        freed = mine.tokens if mine is not None and mine.worker == worker else 0
        return not budget or self._tokens.get(worker, 0) - freed + tokens <= budget

    def pin(self, program_id: str, worker: str, tokens: int, ttl_s: float, now: float, *, turn_index: int = 0,
            tool_name: str = "", keep_score: float = 0.0, p_continue: float = 1.0, durations: Any = None,
            enforce_budget: bool = True) -> PinEntry | None:
        """Pins (replacing the program's previous pin); None when the worker's budget has no room."""
        self.expire(now)
        if enforce_budget and not self.fits(worker, tokens, program_id):
            return None
        self.release(program_id)
        entry = PinEntry(program_id, worker, int(tokens), now + ttl_s, turn_index, tool_name, keep_score, now,
                         p_continue, durations, next(self._seq))
        self._pins[program_id] = entry
        self._tokens[worker] = self._tokens.get(worker, 0) + entry.tokens
        return entry

    def release(self, program_id: str, seq: int = 0) -> PinEntry | None:
        """Drops the program's pin (only if it is pin `seq`, when given)."""
        entry = self._pins.get(program_id)
        if entry is None or (seq and entry.seq != seq):
            return None
        del self._pins[program_id]
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

    def peek(self, program_id: str) -> PinEntry | None:
        """The program's pin as recorded, expired or not."""
        return self._pins.get(program_id)

    def list(self, now: float, worker: str | None = None) -> list[PinEntry]:
        """Live pins, soonest expiry first (of one worker when given)."""
        self.expire(now)
        pins = [e for e in self._pins.values() if not worker or e.worker == worker]
        return sorted(pins, key=lambda e: (e.expires_at, e.program_id))

    def workers(self) -> list[str]:
        return list(self._tokens)

    def pinned_tokens(self, worker: str | None = None) -> int:
        if worker is None:
            return sum(self._tokens.values())
        return self._tokens.get(worker, 0)

    def __len__(self) -> int:
        return len(self._pins)

    # --- programs ---------------------------------------------------------------------------------------
    def turn_ended(self, program_id: str, tool_name: str, last_turn: bool, now: float,
                   turn_index: int = 0) -> ProgramTurn | None:
        """Records that a turn ended; returns what the ledger knew of the program's previous turn (its tool
        is the one whose duration the router reports now), None for a program it did not know."""
        self._forget_idle(now)
        previous = self._programs.pop(program_id, None)
        if not last_turn:
            self._programs[program_id] = ProgramTurn(tool_name, turn_index, now)
            while len(self._programs) > self.max_programs:
                self._programs.popitem(last=False)
        return previous

    def forget(self, program_id: str) -> ProgramTurn | None:
        return self._programs.pop(program_id, None)

    def programs(self) -> int:
        return len(self._programs)

    def take_abandoned(self) -> list[ProgramTurn]:
        out, self.abandoned = self.abandoned, []
        return out

    def _forget_idle(self, now: float) -> None:
        while self._programs:
            pid, prog = next(iter(self._programs.items()))
            if now - prog.last_seen < self.program_idle_s:
                break
            del self._programs[pid]
            if len(self.abandoned) < 10_000:
                self.abandoned.append(prog)
