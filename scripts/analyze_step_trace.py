"""Where the engine's time went, from a step trace (`qllm worker --step-trace PATH`, worker/step_trace.py).

  .venv/bin/python scripts/analyze_step_trace.py TRACE [--start-s S] [--end-s S]

Prints, per kind of step segment (LS-only or with BE rows; run to its end or parked), how many there were and
the p50, mean and p99 of each part (scheduling and building the step, the layers, finishing it); the time between
segments; and, for LS streams, each gap between two tokens after the first decode split into LS steps, BE work
and the rest (the engine's bookkeeping between steps, idle time). `--start-s` and `--end-s` keep the segments
that began in that window, in seconds from the first one: a bench run warms the stack up and measures its idle
floor first, on the same worker, and the time between the floor's requests is idle time, not overhead.

Under `qllm bench` the trace is written by passing `--worker-arg=--step-trace=PATH`; each stack appends to it,
so give each run its own path.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda s: s["t"][0])


def has_be(segment: dict) -> bool:
    return any(priority == "BE" for _, priority, *_ in segment["rows"])


def kind(segment: dict) -> str:
    return ("BE" if has_be(segment) else "LS-only") + (" parked" if segment["parked"] else " to its end")


def parts(segments: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per kind: seconds in each part of a segment, and from its end to the next segment's start."""
    out: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, s in enumerate(segments):
        scheduled, begun, started, ended_layers, ended = s["t"]
        times = out[kind(s)]
        times["schedule+begin"].append(begun - scheduled)
        times["layers"].append(ended_layers - started)
        times["finish+update"].append(ended - ended_layers)
        if i + 1 < len(segments):
            times["until next"].append(segments[i + 1]["t"][0] - ended)
    return out


def ls_token_gaps(segments: list[dict]) -> list[dict]:
    """Each gap between two tokens of an LS stream, after its first decode: its length and the seconds of
    LS-only segments, of segments with BE rows, and the rest, in it."""
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    for i, s in enumerate(segments):
        if not s["parked"]:
            for request_id, priority, *_ in s["rows"]:
                if priority == "LS":
                    tokens[request_id].append(i)
    gaps = []
    for indices in tokens.values():
        for a, b in zip(indices[1:], indices[2:]):  # from the first decode on: the prefill's gap is TTFT's
            span = segments[b]["t"][4] - segments[a]["t"][4]
            be = ls = 0.0
            for s in segments[a + 1:b + 1]:
                took = s["t"][4] - s["t"][0]
                if has_be(s):
                    be += took
                else:
                    ls += took
            gaps.append({"gap": span, "ls": ls, "be": be, "other": span - ls - be})
    return gaps


def ls_first_tokens(segments: list[dict]) -> list[dict]:
    """Each LS request's first token at the worker (rows that carry their arrival time): from its arrival to the
    end of the step that made the token, split into the wait before that step was scheduled (and, of the wait,
    the seconds of segments with BE rows and of LS-only ones that overlap it) and the step itself (with any
    parks inside it). Requests that arrived before the first segment are left out: their prefill is not in it."""
    start = segments[0]["t"][0] if segments else 0.0
    # request id -> (arrival, scheduled of its first segment), None once its first token is counted
    first_seen: dict[str, tuple[float, float] | None] = {}
    out = []
    for s in segments:
        for request_id, priority, _, *arrived in s["rows"]:
            if priority != "LS" or not arrived or arrived[0] < start:
                continue
            if request_id not in first_seen:
                first_seen[request_id] = (arrived[0], s["t"][0])
            if not s["parked"] and first_seen[request_id] is not None:
                arrival, scheduled = first_seen[request_id]
                first_seen[request_id] = None
                be = ls = 0.0
                for o in segments:
                    overlap = min(o["t"][4], scheduled) - max(o["t"][0], arrival)
                    if overlap > 0:
                        if has_be(o):
                            be += overlap
                        else:
                            ls += overlap
                out.append({"ttft": s["t"][4] - arrival, "wait": scheduled - arrival, "wait_be": be,
                            "wait_ls": ls, "step": s["t"][4] - scheduled})
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (f"p50 {1000 * statistics.median(values):7.2f}  mean {1000 * statistics.mean(values):7.2f}  "
            f"p99 {1000 * p99:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--start-s", type=float, default=0.0, help="seconds after the first segment to start at")
    parser.add_argument("--end-s", type=float, default=float("inf"), help="seconds after the first segment to end at")
    args = parser.parse_args()
    segments = load(args.trace)
    if segments:
        origin = segments[0]["t"][0]
        segments = [s for s in segments if args.start_s <= s["t"][0] - origin < args.end_s]
    if not segments:
        raise SystemExit(f"{args.trace}: no step segments")
    span = segments[-1]["t"][4] - segments[0]["t"][0]
    print(f"{len(segments)} step segments over {span:.1f} s (ms below)")
    for name, times in sorted(parts(segments).items()):
        print(f"\n{name}: {len(times['layers'])}")
        for part, values in times.items():
            print(f"  {part:15s} {_ms(values)}")
    gaps = ls_token_gaps(segments)
    if gaps:
        print(f"\nLS token gaps after the first decode: {len(gaps)}")
        for part in ("gap", "ls", "be", "other"):
            print(f"  {part:15s} {_ms([g[part] for g in gaps])}")
    firsts = ls_first_tokens(segments)
    if firsts:
        print(f"\nLS first tokens at the worker (arrival to the end of the step that made it): {len(firsts)}")
        for part in ("ttft", "wait", "wait_be", "wait_ls", "step"):
            print(f"  {part:15s} {_ms([f[part] for f in firsts])}")


if __name__ == "__main__":
    main()
