"""A step trace: one JSON line per engine step segment (a step run to its end, or to the layer boundary where it
parked), written by the core thread when the worker runs with `--step-trace PATH`.

It answers what a latency histogram cannot: where an LS stream's time between two tokens went (its own steps,
the BE work it waited out, the engine's bookkeeping between steps). scripts/analyze_step_trace.py reads it.

Each line: {"t": [scheduled, begun, layers_started, layers_ended, ended] (time.monotonic seconds; `ended` is
after the LM head, sampling and the scheduler's update, or the park), "stages": [from, to] (half-layers run),
"parked": bool, "resumed": bool, "rows": [[request_id, "LS" | "BE", tokens, arrived], ...]} (arrived: the
request's arrival at the worker, on the same clock).
"""

from __future__ import annotations

import json
import threading


class StepTrace:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: a crash loses one line
        self._lock = threading.Lock()

    def record(self, plan, times: list[float], stages: tuple[int, int], parked: bool) -> None:
        rows = [[s.request.request_id, "LS" if s.request.is_ls else "BE", s.num_tokens,
                 round(s.request.arrival_time, 6)] for s in plan.scheduled]
        line = json.dumps({"t": [round(t, 6) for t in times], "stages": list(stages), "parked": parked,
                           "resumed": plan.resumed, "rows": rows})
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
