"""The memory-pressure scenario and its KV policies: both run the same worker policy and admission, and differ
only in --kv-policy."""

from bench import policies
from bench.scenarios import SCENARIOS
from bench.scenarios.memory_pressure import WORKER_ARGS
from qllm.up import StackConfig


def test_kv_policies_differ_only_in_the_kv_flag():
    base = StackConfig(worker_args=list(WORKER_ARGS))
    recompute, alise = policies.apply("recompute", base), policies.apply("alise", base)
    assert recompute.policy == alise.policy == "priority-evict"
    assert recompute.worker_args[-2:] == ["--kv-policy", "recompute"]
    assert alise.worker_args[-2:] == ["--kv-policy", "alise"]
    assert recompute.worker_args[:-2] == alise.worker_args[:-2] == list(WORKER_ARGS)
    assert recompute.router_args == alise.router_args


def test_scenario_defaults():
    assert "memory-pressure" in SCENARIOS
    assert policies.parse_list(SCENARIOS["memory-pressure"].policies) == ["recompute", "alise"]
    args = dict(zip(WORKER_ARGS[::2], WORKER_ARGS[1::2]))
    assert args["--admission-output-fraction"] == "0"  # vLLM V1's optimistic admission, for both policies
    assert policies.apply("qllm+alise", StackConfig()).policy == "qllm"  # another part may set the worker policy
