"""What the router remembers about agent programs between their turns (pure; no gRPC).

Continuum's router-side ideas: a program's later turns are ordered by the program's *first* arrival
(program-level FCFS, so a program that has started is not overtaken by programs that came later), and a
turn goes to the worker that ran the previous one, where its KV may still be pinned (affinity). The gap
between a turn's end and the next turn's arrival is the tool call's duration, which the kvmanager learns.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass
class ProgramState:
    first_arrival: float
    turns: int = 0
    worker: str = ""                 # where the last turn ran
    last_end: float | None = None    # when the last turn finished (monotonic)


@dataclass
class TurnInfo:
    turn_index: int                  # 0 for the first turn
    order_arrival: float             # the program's first arrival: the order key within its class
    preferred_worker: str            # the worker that ran the previous turn ("" = none)
    prev_tool_duration_s: float      # previous turn's end to this arrival (0 = first turn)


class ProgramTracker:
    def __init__(self, max_programs: int = 100_000, clock=time.monotonic):
        self._programs: collections.OrderedDict[str, ProgramState] = collections.OrderedDict()
        self.max_programs = max_programs
        self.clock = clock

    def __len__(self) -> int:
        return len(self._programs)

    def turn_arrived(self, program_id: str, arrival: float | None = None) -> TurnInfo:
        now = self.clock() if arrival is None else arrival
        state = self._programs.get(program_id)
        if state is None:
            state = ProgramState(first_arrival=now)
            self._programs[program_id] = state
            while len(self._programs) > self.max_programs:  # forget the least recently active program
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(program_id)
        gap = max(0.0, now - state.last_end) if state.last_end is not None else 0.0
        info = TurnInfo(state.turns, state.first_arrival, state.worker, gap)
        state.turns += 1
        return info

    def turn_dispatched(self, program_id: str, worker: str) -> None:
        state = self._programs.get(program_id)
        if state is not None:
            state.worker = worker

    def turn_finished(self, program_id: str, last_turn: bool) -> None:
        if last_turn:
            self._programs.pop(program_id, None)
            return
        state = self._programs.get(program_id)
        if state is not None:
            state.last_end = self.clock()
