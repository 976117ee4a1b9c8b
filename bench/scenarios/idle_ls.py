"""`idle-ls`: LS requests alone, one at a time: the floor itself, from which the LS TTFT SLO comes."""

from __future__ import annotations

from bench.client import replay_sequential
from bench.scenarios.base import Driven, Scenario, Target, per_request_cap_s
from bench.workload import LS


class IdleLS(Scenario):
    name = "idle-ls"
    summary = "LS alone, one at a time (the floor)"
    run_is_floor = True

    def classes(self, args):
        return (LS,)

    async def drive(self, args, target: Target, workload, tokenizer) -> Driven:
        records = await replay_sequential(target.sender, workload.requests, duration_s=args.duration,
                                          per_request_cap_s=per_request_cap_s(args), progress=args.progress,
                                          label=target.label)
        return Driven(records)


SCENARIO = IdleLS()
