"""Fleet and robustness figures for the notes, all on CPU with the embedded default: a command line over
qllm/testing, whose measurements tests/test_fleet.py and tests/test_robustness.py assert on.

  .venv/bin/python scripts/measure_fleet.py [--only loss,streams,fuzz,cancel,memory,drain,worker-drain,beam-edge]
                                            [--json OUT]

Every service runs in this process (qllm.testing.fleet.Fleet); each measurement prints a JSON object.

  loss          router + 2 workers, one stopped with grace 0 while requests stream (qllm/testing/loss.py)
  streams       concurrent Generate streams held by the router (qllm/testing/load.py)
  fuzz          hypothesis-generated requests, valid and malformed: the status each gets (qllm/testing/malformed.py)
  cancel        a cancelled stream's KV: engine steps until it is freed (qllm/testing/load.py)
  memory        process RSS across many tiny requests, and the state left behind (qllm/testing/load.py)
  drain         serving.stop on the router while a request streams (qllm/testing/drain.py)
  worker-drain  the same on one of two workers while new requests keep coming (qllm/testing/drain.py)
  beam-edge     a request beside one with an extreme length_penalty (qllm/testing/malformed.py)
  sigkill       only when asked: the loss measurement against subprocesses, worker0 SIGKILLed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from qllm.testing import drain, load, loss, malformed
from qllm.testing.fleet import Fleet, LoopThread, quiet_logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="loss,streams,fuzz,cancel,memory,drain,worker-drain,beam-edge")
    parser.add_argument("--fuzz-examples", type=int, default=1000)
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    figures: dict[str, Any] = {}

    def show(name, result, seconds):
        figures[name] = result
        print(f"== {name} ({seconds:.1f} s)\n{json.dumps(result, indent=2, default=str)}", flush=True)

    with quiet_logs(), LoopThread() as lt:
        def timed(name, fleet_kwargs, fn):
            started = time.monotonic()
            fleet = lt.run(Fleet(**fleet_kwargs).start())
            try:
                result = fn(fleet)
            finally:
                lt.run(fleet.stop())
            show(name, result, time.monotonic() - started)

        def fuzz(fleet):
            result = malformed.measure_malformed(lt, fleet, args.fuzz_examples)
            refused = {}
            for o in result.pop("outcomes"):
                if o["code"] != "OK":
                    key = f"{o['code']} {o['details'].split(':', 1)[0]}"
                    refused[key] = refused.get(key, 0) + 1
            return {**result, "refused_by_status_and_field": dict(sorted(refused.items()))}

        if "loss" in wanted:
            timed("loss", {"workers": 2}, lambda f: lt.run(loss.measure_worker_loss(f)))
        if "streams" in wanted:
            timed("streams", {"workers": 1}, lambda f: lt.run(load.measure_concurrent_streams(f, args.streams)))
        if "fuzz" in wanted:
            timed("fuzz", {"workers": 1, "engine": {"kv_budget_tokens": 2048}}, fuzz)
        if "cancel" in wanted:
            timed("cancel", {"workers": 1},
                  lambda f: [lt.run(load.measure_cancel(f)), lt.run(load.measure_cancel(f, with_companion=True))])
        if "memory" in wanted:
            timed("memory", {"workers": 1}, lambda f: lt.run(load.measure_memory(f, args.memory_requests), 1200))
        if "drain" in wanted:
            timed("drain", {"workers": 1, "drain_grace_s": 10.0}, lambda f: lt.run(drain.measure_drain(f)))
        if "worker-drain" in wanted:
            for grace in (3.0, 0.3):
                timed(f"worker-drain-grace-{grace}", {"workers": 2},
                      lambda f: lt.run(drain.measure_worker_drain(f, grace)))
        if "beam-edge" in wanted:
            timed("beam-edge-bystander", {"workers": 1}, lambda f: lt.run(malformed.measure_bystander(
                f, malformed.base_request(num_beams=2, length_penalty=3e38))))
    if "sigkill" in wanted:  # its own event loop, after the in-process one is gone
        started = time.monotonic()
        show("sigkill", loss.measure_sigkill(), time.monotonic() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
