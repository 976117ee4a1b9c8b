"""What every bench scenario provides, with the defaults most share: the mixed LS/BE workload from two traces,
replayed open-loop, and summarised per class by the runner (bench/runner.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from bench.client import Sender, replay
from bench.stats import RequestRecord
from bench.tokens import Tokenizer
from bench.workload import BE, LS, ClassSpec, WorkloadConfig, build_workload
from qllm.up import Stack

DEFAULT_POLICIES = "fcfs,priority,qllm"


@dataclass
class Target:
    """Where one run (one policy, one sweep point) sends its requests."""
    label: str
    sender: Sender
    address: str | None               # the qllm router's (stack or --target); None against an OpenAI peer
    stack: Stack | None = None        # in stack mode
    worker_addresses: list[str] = field(default_factory=list)


@dataclass
class Driven:
    """One run's outcome: the request records the runner summarises per class, what the scenario adds to the
    run's document, and what it keeps for its own files (scenario.write_files)."""
    records: list[RequestRecord]
    run_doc: dict = field(default_factory=dict)
    kept: Any = None


def per_request_cap_s(args: argparse.Namespace) -> float:
    """The per-request cap of the closed-loop parts (warm-up, floor, idle-ls)."""
    return max(30.0, args.drain_cap)


class Scenario:
    """One `qllm bench --scenario`. Subclasses override what differs from these defaults."""

    name: str = ""
    summary: str = ""                 # one line, for --help
    policies: str = DEFAULT_POLICIES  # the bench policies run in stack mode when --policies is not given
    default_be_rate: float = 1.0      # BE requests/s when --be-rate is not given
    default_drain_cap_s: float = 30.0
    floor_by_default: bool = False    # measure the idle floor first unless --with-floor/--no-with-floor says
    run_is_floor: bool = False        # the measured run is itself the floor the LS SLO comes from
    openai_refusal: str | None = None  # why --openai-url cannot run this scenario, if it cannot

    def be_rate(self, args: argparse.Namespace) -> float:
        return self.default_be_rate if args.be_rate is None else args.be_rate

    def drain_cap(self, args: argparse.Namespace) -> float:
        return self.default_drain_cap_s if args.drain_cap is None else args.drain_cap

    def classes(self, args: argparse.Namespace) -> tuple[str, ...]:
        """The request classes the workload has (and the report summarises)."""
        return (LS, BE)

    def floor_class(self, args: argparse.Namespace) -> str:
        """The class the idle floor measures."""
        return LS

    def with_floor(self, args: argparse.Namespace) -> bool:
        if self.run_is_floor:
            return False
        return self.floor_by_default if args.with_floor is None else args.with_floor

    def worker_args(self, args: argparse.Namespace) -> list[str]:
        """The stack's worker flags; --worker-arg comes last, so it wins."""
        return list(args.worker_arg)

    def build(self, args: argparse.Namespace, sweep: dict | None, tokenizer: Tokenizer):
        """The workload at one sweep point ({key: value} or None): has .requests, .of_class(cls), .info."""
        rates = {"ls-rate": args.ls_rate, "be-rate": self.be_rate(args), "rate": args.rate}
        rates.update(sweep or {})
        classes = self.classes(args)
        specs = []
        if LS in classes:
            specs.append(ClassSpec(LS, args.ls_trace, rates["ls-rate"] * rates["rate"], args.ls_prompt_tokens,
                                   args.ls_output_tokens, args.prompts))
        if BE in classes:
            specs.append(ClassSpec(BE, args.be_trace, rates["be-rate"] * rates["rate"], args.be_prompt_tokens,
                                   args.be_output_tokens, args.prompts))
        config = WorkloadConfig(specs, duration_s=args.duration, seed=args.seed, context_tokens=args.context_tokens,
                                time_scale=args.time_scale)
        return build_workload(config, tokenizer)

    async def drive(self, args: argparse.Namespace, target: Target, workload, tokenizer: Tokenizer) -> Driven:
        """Sends the measured workload: open loop, each request at its arrival offset."""
        records = await replay(target.sender, workload.requests, duration_s=args.duration,
                               drain_cap_s=args.drain_cap, progress=args.progress, label=target.label)
        return Driven(records)

    def finish_document(self, doc: dict) -> None:
        """Adds the scenario's own figures across runs to the result document."""

    def write_files(self, out_dir, name: str, kept: dict[str, Any]) -> list:
        """Writes the scenario's own files from what each run kept (by run label); returns their paths."""
        return []
