"""The step trace (`--step-trace`, worker/step_trace.py) and what scripts/analyze_step_trace.py reads from it."""

import importlib.util
import json
import random
import time
from pathlib import Path

from worker.engine_core import EngineConfig, EngineCore
from worker.request import Priority, Request, SamplingParams

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("analyze_step_trace", REPO / "scripts" / "analyze_step_trace.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


def test_every_step_segment_is_traced_with_its_parks(make_runner, tmp_path):
    runner = make_runner()
    path = tmp_path / "steps.jsonl"
    done = []
    core = EngineCore(runner, EngineConfig(policy="qllm", max_num_batched_tokens=64, step_trace_path=str(path)),
                      done.extend)
    rng = random.Random(0)
    core.scheduler.should_park = lambda plan: rng.random() < 0.4
    reqs = [Request(f"r{i}", list(range(1, 90 + 10 * i)), SamplingParams(max_tokens=6, ignore_eos=True),
                    Priority.LATENCY_SENSITIVE if i == 0 else Priority.BEST_EFFORT) for i in range(3)]
    for r in reqs:
        core.submit(r)
    core.start()
    try:
        for _ in range(600):
            if sum(o.finished for o in done) == len(reqs):
                break
            time.sleep(0.05)
    finally:
        core.stop()
    assert sum(o.finished for o in done) == len(reqs)
    segments = analyze.load(str(path))
    last = 2 * runner.num_layers
    assert any(s["parked"] for s in segments)
    for s in segments:
        assert s["t"] == sorted(s["t"])
        first, end = s["stages"]
        assert 0 <= first <= end <= last
        assert (end < last) == s["parked"]
        assert all(not rid.startswith("warmup-") for rid, *_ in s["rows"])  # the warm-up is not traced
    for r in reqs:  # every token came out of a segment that ran the step to its end
        ends = [s for s in segments if not s["parked"] and any(rid == r.request_id for rid, *_ in s["rows"])]
        assert len(ends) >= len(r.output_token_ids) == 6
        assert {p for s in ends for rid, p, *_ in s["rows"] if rid == r.request_id} == {"LS" if r.is_ls else "BE"}


def test_an_ls_token_gap_splits_into_ls_steps_be_work_and_the_rest(tmp_path):
    def seg(start, end, rows, parked=False):
        return {"t": [start, start, start, end, end], "stages": [0, 4 if not parked else 2], "parked": parked,
                "resumed": False, "rows": rows}
    ls, be = ["a", "LS", 1], ["b", "BE", 1]
    segments = [seg(0.000, 0.010, [["a", "LS", 40]]),     # prefill: its gap is TTFT's, not counted
                seg(0.011, 0.016, [ls]),                  # first decode
                seg(0.017, 0.027, [be], parked=True),     # BE work the next token waits out
                seg(0.029, 0.034, [ls]),                  # second decode: a gap of 18 ms
                seg(0.034, 0.039, [ls])]                  # third: 5 ms, all its own step
    gaps = analyze.ls_token_gaps(segments)
    assert [round(g["gap"] * 1000) for g in gaps] == [18, 5]
    assert [round(g["be"] * 1000) for g in gaps] == [10, 0]
    assert [round(g["ls"] * 1000) for g in gaps] == [5, 5]
    assert [round(g["other"] * 1000) for g in gaps] == [3, 0]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in reversed(segments)))
    assert analyze.load(str(path)) == segments  # in time order whatever the file's


def test_an_ls_first_token_splits_into_the_wait_and_its_step():
    def seg(start, end, rows, parked=False):
        return {"t": [start, start, start, end, end], "stages": [0, 4 if not parked else 2], "parked": parked,
                "resumed": False, "rows": rows}
    segments = [seg(0.000, 0.010, [["b", "BE", 30, -1.0]]),
                seg(0.010, 0.014, [["b", "BE", 30, -1.0]], parked=True),  # the LS request arrived at 0.012
                seg(0.015, 0.020, [["c", "LS", 1, -0.5]]),                # a stream from before the trace
                seg(0.021, 0.040, [["a", "LS", 64, 0.012]], parked=True),  # its prefill, parked for a later LS
                seg(0.040, 0.045, [["d", "LS", 8, 0.039]]),
                seg(0.045, 0.050, [["a", "LS", 64, 0.012]])]              # resumed: the first token
    other, first = analyze.ls_first_tokens(segments)  # in the order the first tokens came
    assert round(other["ttft"] * 1000) == 6 and round(other["wait"] * 1000) == 1
    assert round(first["ttft"] * 1000) == 38
    assert round(first["wait"] * 1000) == 9
    assert round(first["wait_be"] * 1000) == 2 and round(first["wait_ls"] * 1000) == 5
    assert round(first["step"] * 1000) == 29
    assert analyze.ls_first_tokens([seg(0, 1, [["a", "LS", 64]])]) == []  # traces from before arrival times
