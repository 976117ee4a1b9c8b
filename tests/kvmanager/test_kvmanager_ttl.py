import math
import random

import pytest

from kvmanager.ttl import (DurationQuantiles, FixedTTL, NoPin, PinForever, PredictedTTL, TTLParams, Turn,
                           TurnContext, make_policy)
from qllm.estimators.latency_model import LatencyModel
from qllm.estimators.tool_durations import DEFAULT_LEVELS, ToolDurationModel

LATENCY = LatencyModel()  # the default profile


def turn(tool="ls", last=False, tokens=2000):
    return Turn(program_id="p", worker="w0", context_tokens=tokens, last_turn=last, tool_name=tool, turn_index=1)


def quantiles(model: ToolDurationModel, tool: str) -> DurationQuantiles:
    d = model.predict(tool)
    return DurationQuantiles(DEFAULT_LEVELS, tuple(d.quantiles(DEFAULT_LEVELS)), d.mean(), d.samples, d.prior,
                             d.observed_mean_s)


def ctx(model, tool, tokens=2000, p=1.0, pressure=0.0):
    return TurnContext(quantiles(model, tool), LATENCY.prefill_s(tokens), p, pressure)


def trained(seed=0) -> ToolDurationModel:
    """Tools like the agent traces': quick shell calls, a slow-but-steady test run, a short tool with a tail,
    and a web search that takes anywhere from seconds to minutes."""
    rng = random.Random(seed)
    model = ToolDurationModel()
    for _ in range(200):
        model.observe("ls", rng.uniform(0.1, 0.4))
        model.observe("pytest", rng.uniform(7.5, 8.5))
        model.observe("edit", rng.choice([0.5, 0.8, 1.0, 3.0]))  # mean 1.3 s, a quarter at 3 s
        model.observe("browse", rng.lognormvariate(math.log(20), 1.5))
    return model


def test_duration_quantiles_as_a_distribution():
    d = DurationQuantiles((0.25, 0.5, 0.9), (1.0, 2.0, 4.0), mean_s=2.0)
    assert d.cdf(0.5) == 0 and d.cdf(1.0) == 0.25 and d.cdf(3.9) == 0.5 and d.cdf(100) == 0.9
    # 0.25 at 1, 0.25 at 2, 0.4 at 4, the last 0.1 beyond any TTL: E[min(D, 3)] = .25 + .5 + .4*3 + .1*3
    assert d.expected_min(3.0) == pytest.approx(0.25 + 0.5 + 1.2 + 0.3)
    assert d.expected_min(0.0) == 0.0
    with pytest.raises(ValueError):
        DurationQuantiles((0.5, 0.4), (1.0, 2.0), 1.0)
    with pytest.raises(ValueError):
        DurationQuantiles((0.4, 0.5), (2.0, 1.0), 1.0)


def test_no_pin_and_pin_forever():
    c = ctx(trained(), "ls")
    assert not NoPin().decide(turn(), c).pin
    assert NoPin().decide(turn(last=True), c).reason == "last_turn"
    d = PinForever().decide(turn("browse"), c)
    assert d.pin and math.isinf(d.ttl_s) and not PinForever.bounded
    assert not PinForever().decide(turn(last=True), c).pin


def test_fixed_ttl_pins_tools_whose_observed_mean_is_short():
    model, policy = trained(), FixedTTL()
    d = policy.decide(turn("ls"), ctx(model, "ls"))
    assert d.pin and d.ttl_s == 2.0
    assert policy.decide(turn("edit"), ctx(model, "edit")).pin  # mean 1.3 s
    assert policy.decide(turn("pytest"), ctx(model, "pytest")).reason == "tool_too_slow"
    assert not policy.decide(turn("ls", last=True), ctx(model, "ls")).pin
    assert policy.decide(turn("new"), ctx(model, "new")).reason == "unknown_tool"
    assert policy.decide(turn(""), ctx(model, "")).pin
    assert not FixedTTL(pin_unknown=False).decide(turn("new"), ctx(model, "new")).pin


def test_ttl_pins_long_but_predictable_tools_that_fixed_ttl_drops():
    model, ours = trained(), PredictedTTL()
    c = ctx(model, "pytest")
    d = ours.decide(turn("pytest"), c)
    assert d.pin and d.reason == "ttl"
    assert 8.5 <= d.ttl_s <= 10.0  # just past the tool's 8.5 s upper end, slack included
    assert d.keep_score > 0.95
    gain, _ = ours.gain(d.ttl_s, turn("pytest"), c)
    assert gain > 0.9 * c.recompute_s  # nearly the whole recompute saved; fixed-ttl saves nothing here
    assert not FixedTTL().decide(turn("pytest"), c).pin


def test_ttl_covers_the_tail_of_a_short_tool_where_the_fixed_2s_misses():
    model, ours = trained(), PredictedTTL()
    for pressure in (0.0, 0.9):
        c = ctx(model, "edit", pressure=pressure)
        d = ours.decide(turn("edit"), c)
        assert d.pin and d.ttl_s >= 3.0 and d.keep_score > 0.95
        fixed_gain, fixed_hit = ours.gain(2.0, turn("edit"), c)
        ours_gain, _ = ours.gain(d.ttl_s, turn("edit"), c)
        assert fixed_hit < 0.8 and ours_gain > fixed_gain
    assert d.ttl_s <= 4.0  # under pressure, just past the 3 s calls (the pooled tail is not worth it)


def test_ttl_is_short_for_quick_tools_once_memory_is_in_demand():
    d = PredictedTTL().decide(turn("ls"), ctx(trained(), "ls", pressure=0.9))
    assert d.pin and 0.4 <= d.ttl_s <= 0.6 and d.keep_score > 0.98


def test_cheap_contexts_are_not_pinned():
    model = trained()
    d = PredictedTTL().decide(turn("ls", tokens=40), ctx(model, "ls", tokens=40))
    assert not d.pin and d.reason == "cheap_context"
    assert FixedTTL().decide(turn("ls", tokens=40), ctx(model, "ls", tokens=40)).pin  # the baseline does


def test_pressure_shortens_ttls_and_then_drops_pins():
    model, ours = trained(), PredictedTTL()
    ttls = [ours.decide(turn("browse"), ctx(model, "browse", pressure=rho)) for rho in (0.0, 0.3, 0.6, 0.9)]
    pinned = [d.ttl_s for d in ttls if d.pin]
    assert pinned == sorted(pinned, reverse=True) and len(set(pinned)) == len(pinned)
    assert ttls[0].pin and ttls[0].ttl_s > 60  # free memory: wait for most of the search's long tail
    assert not ttls[-1].pin and ttls[-1].reason == "not_worth_it"
    # where the search is not worth its memory any more, a predictable tool still is
    assert not ttls[2].pin and ours.decide(turn("pytest"), ctx(model, "pytest", pressure=0.6)).pin


def test_programs_likely_to_end_get_shorter_or_no_pins():
    model, ours = trained(), PredictedTTL()
    sure = ours.decide(turn("browse"), ctx(model, "browse", p=1.0, pressure=0.3))
    unsure = ours.decide(turn("browse"), ctx(model, "browse", p=0.3, pressure=0.3))
    assert sure.pin and (not unsure.pin or unsure.ttl_s < sure.ttl_s)
    assert unsure.keep_score < sure.keep_score


def test_keep_score_falls_as_a_pin_waits_past_its_tools_usual_duration():
    model, ours = trained(), PredictedTTL()
    c = ctx(model, "edit")
    d = ours.decide(turn("edit"), c)
    fresh = ours.keep_score_now(d.keep_score, c.durations, 1.0, d.ttl_s, 0.0)
    late = ours.keep_score_now(d.keep_score, c.durations, 1.0, d.ttl_s, 2.0)  # past 0.5/0.8/1.0: only the 3 s left
    assert fresh == pytest.approx(d.keep_score) and late < fresh
    unsure = ours.keep_score_now(d.keep_score, c.durations, 0.5, d.ttl_s, 2.0)
    assert unsure < late  # "did not return yet" says more about a program that may have ended
    assert FixedTTL().keep_score_now(0.5, c.durations, 1.0, 2.0, 1.9) == 0.5


def test_make_policy():
    assert make_policy("no-pin", ttl_s=5).name == "no-pin"
    p = make_policy("fixed-ttl", ttl_s=5)
    assert p.ttl_s == 5 and p.max_tool_s == 5
    assert make_policy("ttl", params=TTLParams(min_recompute_s=1.0)).params.min_recompute_s == 1.0
    assert make_policy("pin-forever").name == "pin-forever"
    with pytest.raises(ValueError, match="unknown pin policy"):
        make_policy("nope")
    with pytest.raises(ValueError):
        FixedTTL(ttl_s=0)
