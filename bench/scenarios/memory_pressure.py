"""`memory-pressure`: BE-heavy load with an LS stream under a small KV budget, to compare what a preempted
request's KV becomes (docs/benchmarks.md, "Scenario memory-pressure")."""

from __future__ import annotations

from bench.scenarios.base import Scenario

# The same KV budget (a few BE requests' worth, small against the load) and vLLM V1's optimistic admission
# (nothing reserved beyond this step) for every policy, so the policies differ only in the KV policy.
WORKER_ARGS = ("--kv-budget-tokens", "8192", "--admission-output-fraction", "0")


class MemoryPressure(Scenario):
    name = "memory-pressure"
    summary = "BE-heavy with an LS stream under a small KV budget (KV policies)"
    policies = "recompute,alise"
    default_be_rate = 2.0

    def worker_args(self, args):
        return [*WORKER_ARGS, *args.worker_arg]


SCENARIO = MemoryPressure()
