"""`agent`: multi-turn agent programs from the LMCache agent trace, to compare KV pin policies by job
completion time (bench/agent/; docs/benchmarks.md, "Scenario agent"). Needs the qllm router: the turns carry
program_id, last_turn and tool_name."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.agent.driver import AgentSender, PinSampler, run_programs
from bench.agent.programs import AgentConfig, build_agent_workload
from bench.agent.summary import finish_document, summarize_programs, write_programs
from bench.policies import PIN_POLICIES
from bench.scenarios.base import Driven, Scenario, Target
from qllm import internal_auth


class Agent(Scenario):
    name = "agent"
    summary = "multi-turn agent programs from the LMCache agent trace (KV pin policies)"
    policies = ",".join(PIN_POLICIES)
    default_drain_cap_s = 120.0
    openai_refusal = ("the agent scenario needs the qllm router (program_id, last_turn, tool_name); "
                      "--openai-url is not supported")

    def classes(self, args):
        return (args.agent_priority,)

    def floor_class(self, args):
        return args.agent_priority

    def config(self, args, sweep: dict | None) -> AgentConfig:
        rates = {"rate": args.rate}
        rates.update(sweep or {})
        if set(rates) - {"rate"}:
            raise ValueError("--sweep: the agent scenario sweeps rate only (programs/s = --agent-rate x rate)")
        return AgentConfig(
            duration_s=args.duration, rate=args.agent_rate * rates["rate"], seed=args.seed,
            mix=tuple(a.strip() for a in args.agent_mix.split(",") if a.strip()), max_turns=args.agent_max_turns,
            context_scale=args.agent_context_scale, max_piece_tokens=args.agent_max_piece_tokens,
            max_context_tokens=args.agent_max_context_tokens, output_scale=args.agent_output_scale,
            output_range=args.agent_output_tokens, gap_scale=args.agent_gap_scale, max_gap_s=args.agent_max_gap_s,
            context_tokens=args.context_tokens)

    def build(self, args, sweep, tokenizer):
        return build_agent_workload(self.config(args, sweep), tokenizer)

    async def drive(self, args, target: Target, workload, tokenizer) -> Driven:
        """The programs open loop, with the workers' pinned KV sampled meanwhile; keeps the program records."""
        sender = AgentSender(target.address, request_id_prefix=f"agent-{target.label.replace(' ', '-')}",
                             priority=args.agent_priority)
        # Describe is internal: a stack's own token (with --target, QLLM_INTERNAL_TOKEN_FILE's).
        token = target.stack.internal_token if target.stack is not None else internal_auth.from_args(
            argparse.Namespace(internal_token_file=os.environ.get("QLLM_INTERNAL_TOKEN_FILE")))
        sampler = PinSampler(target.worker_addresses, args.pin_sample_s,
                             interceptors=internal_auth.client_interceptors(token))
        sampler.start()
        try:
            programs = await run_programs(sender, workload.programs, duration_s=args.duration,
                                          drain_cap_s=args.drain_cap, tokenizer=tokenizer,
                                          context_tokens=args.context_tokens, progress=args.progress,
                                          label=target.label)
        finally:
            samples = await sampler.stop()
            await sender.close()
        return Driven([t for p in programs for t in p.turns], summarize_programs(programs, samples), programs)

    def finish_document(self, doc: dict) -> None:
        finish_document(doc)

    def write_files(self, out_dir, name: str, kept: dict) -> list:
        if not kept:
            return []
        path = Path(out_dir) / f"{name}.programs.jsonl"
        write_programs(path, kept)
        return [path]


SCENARIO = Agent()
