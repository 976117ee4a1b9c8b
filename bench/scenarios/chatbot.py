"""`chatbot`: BE only, held-out ShareGPT prompts with their real response lengths, to compare the router's BE
orders (docs/benchmarks.md, "Scenario chatbot")."""

from __future__ import annotations

from bench.policies import BE_ORDERS
from bench.scenarios.base import Scenario
from bench.workload import BE, ChatbotConfig, build_chatbot_workload


class Chatbot(Scenario):
    name = "chatbot"
    summary = "BE only, held-out ShareGPT prompts with their real response lengths (BE orders)"
    policies = ",".join(BE_ORDERS)
    # Overloads one worker moderately, so that a queue forms (where the orders differ) and drains.
    default_be_rate = 2.0
    default_drain_cap_s = 90.0

    def classes(self, args):
        return (BE,)

    def floor_class(self, args):
        return BE

    def worker_args(self, args):
        # The router releases BE only up to the worker's --max-num-seqs, so the rest waits in its BE order.
        if args.chatbot_max_num_seqs > 0:
            return ["--max-num-seqs", str(args.chatbot_max_num_seqs), *args.worker_arg]
        return list(args.worker_arg)

    def config(self, args, sweep: dict | None) -> ChatbotConfig:
        rates = {"be-rate": self.be_rate(args), "rate": args.rate}
        rates.update(sweep or {})
        if "ls-rate" in rates:
            raise ValueError("--sweep ls-rate: the chatbot scenario has no LS class (sweep be-rate or rate)")
        return ChatbotConfig(duration_s=args.duration, rate=rates["be-rate"] * rates["rate"], seed=args.seed,
                             trace=args.chatbot_trace, max_prompt_tokens=args.chatbot_prompt_tokens,
                             output_range=args.chatbot_output_tokens, output_scale=args.chatbot_output_scale,
                             context_tokens=args.context_tokens, split_seed=args.split_seed,
                             time_scale=args.time_scale)

    def build(self, args, sweep, tokenizer):
        return build_chatbot_workload(self.config(args, sweep), tokenizer)


SCENARIO = Chatbot()
