"""The memory-pressure scenario and its KV policies: both run the same worker policy and admission, and differ
only in --kv-policy."""

import argparse

import pytest

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


def test_alise_prices_victims_by_the_predictor_and_the_oracle_is_its_own_labelled_policy():
    base = StackConfig(worker_args=list(WORKER_ARGS))
    alise, oracle = policies.apply("alise", base), policies.apply("alise-oracle", base)
    # BE carries the predictor's estimate (without one the worker would use max_tokens: exact under ignore_eos)
    assert alise.router_args == ["--be-length-estimates", "predictor"]
    assert policies.apply("recompute", base).router_args == alise.router_args  # the same waiting-BE order
    assert oracle.router_args == ["--be-length-estimates", "oracle"]
    assert oracle.worker_args == alise.worker_args and oracle.policy == alise.policy == "priority-evict"
    assert "upper bound" in policies.POLICIES["alise-oracle"].help
    assert policies.parse_list("recompute,alise,alise-oracle") == ["recompute", "alise", "alise-oracle"]
    with pytest.raises(policies.UnknownPolicy, match="--be-length-estimates twice"):
        policies.apply("alise+alise-oracle", base)


def test_the_router_parses_the_flag_the_policies_give_it():
    from router.server import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    for name in ("recompute", "alise", "alise-oracle"):
        router_args = policies.apply(name, StackConfig()).router_args
        assert parser.parse_args(router_args).be_length_estimates == router_args[1]
    assert parser.parse_args([]).be_length_estimates == "order"  # plain routers send no estimate
