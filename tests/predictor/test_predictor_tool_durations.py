import math
import random

import pytest

from predictor.limits import InvalidInput, check_levels, check_observations, check_times, check_tool_name
from qllm.estimators.tool_durations import DEFAULT_LEVELS, Empirical, LogNormal, ToolDurationModel


def test_lognormal_prior():
    p = LogNormal(2.0, 1.5)
    assert p.quantile(0.5) == pytest.approx(2.0)
    assert p.cdf(2.0) == pytest.approx(0.5)
    assert p.cdf(0) == 0 and p.cdf(math.inf) == 1
    assert p.mean() == pytest.approx(2.0 * math.exp(1.5 ** 2 / 2))
    # E[min(D, t)] against a numeric integral of P(D > s) over [0, t]
    t, steps = 5.0, 20000
    integral = sum(1 - p.cdf((i + 0.5) * t / steps) for i in range(steps)) * t / steps
    assert p.expected_min(t) == pytest.approx(integral, rel=1e-3)
    assert p.expected_min(math.inf) == pytest.approx(p.mean())


def test_empirical_window_cdf_quantile_expected_min():
    e = Empirical(window=4)
    for x in (5.0, 1.0, 2.0, 3.0, 4.0):  # 5.0 falls out of the window
        e.add(x)
    assert len(e) == 4 and e.mean() == pytest.approx(2.5)
    assert e.cdf(2.0) == 0.5 and e.cdf(0.5) == 0 and e.cdf(4.0) == 1
    assert e.quantile(0.5) == 2.0 and e.quantile(0.51) == 3.0 and e.quantile(0.99) == 4.0
    assert e.expected_min(2.5) == pytest.approx((1 + 2 + 2.5 + 2.5) / 4)


def test_unknown_tool_starts_from_the_fixed_prior_then_the_pooled_distribution():
    model = ToolDurationModel()
    d = model.predict("never-seen")
    assert d.prior and d.samples == 0 and d.pooled_samples == 0
    assert d.quantile(0.5) == pytest.approx(2.0, rel=1e-4)
    for _ in range(200):
        model.observe("grep", 0.3)
    d = model.predict("never-seen")
    assert d.prior and d.pooled_samples == 200
    # shrunk to what all tools did: the median is grep's 0.3 s, a little prior mass sits in the tail
    assert d.quantile(0.5) == pytest.approx(0.3, rel=1e-4)
    assert 0.3 < d.mean() < 0.5


def test_a_tool_learns_its_own_distribution_with_the_pooled_tail_behind_it():
    rng = random.Random(0)
    model = ToolDurationModel(window=256)
    for _ in range(500):
        model.observe("pytest", rng.uniform(20.0, 40.0))
        model.observe("ls", rng.uniform(0.1, 0.2))
    ls, pytest_ = model.predict("ls"), model.predict("pytest")
    assert not ls.prior and ls.samples == 256 and pytest_.samples == 256
    assert 0.1 <= ls.quantile(0.5) <= 0.2 and 20 <= pytest_.quantile(0.5) <= 40
    assert ls.quantile(0.99) <= 0.2 + 1e-6  # 1/257 of mass elsewhere: the 0.99 quantile is its own
    assert 0.15 == pytest.approx(ls.observed_mean_s, abs=0.01)
    assert ls.cdf(0.2) > 0.99 and pytest_.cdf(0.2) < 0.01
    # few samples: the tool's own durations dominate the body, the pooled distribution shows in the tail
    model.observe("cat", 1.0)
    model.observe("cat", 1.0)
    cat = model.predict("cat")
    assert cat.quantile(0.5) == pytest.approx(1.0, rel=1e-4)
    assert cat.cdf(1.0) == pytest.approx(2 / 3 + 1 / 3 * 0.5, abs=0.01)  # half the pooled mass is ls
    assert cat.quantile(0.95) > 10


def test_quantiles_are_monotone_and_consistent_with_the_cdf():
    rng = random.Random(1)
    model = ToolDurationModel()
    for _ in range(300):
        model.observe(rng.choice("abc"), rng.lognormvariate(0, 1))
    for tool in ("a", "b", "zzz"):
        d = model.predict(tool)
        qs = d.quantiles(DEFAULT_LEVELS)
        assert qs == sorted(qs)
        for level, value in zip(DEFAULT_LEVELS, qs):
            assert d.cdf(value) >= level - 1e-9
            assert d.cdf(value * (1 - 1e-3)) <= level + 1e-9
        assert d.expected_min(math.inf) == pytest.approx(d.mean())
        assert d.expected_min(1.0) <= min(1.0, d.mean())


def test_memory_is_bounded():
    model = ToolDurationModel(window=8, max_tools=3, pooled_window=10)
    for i in range(100):
        model.observe(f"t{i // 20}", float(i))
    model.observe("t2", 1.0)
    assert model.tools() == ["t3", "t4", "t2"]  # the least recently seen are forgotten
    assert all(model.count(t) == 8 for t in model.tools())
    assert model.pooled_count == 10 and model.count("t0") == 0


def test_bad_observations_are_ignored_by_the_model():
    model = ToolDurationModel()
    assert not model.observe("", 1.0)
    assert not model.observe("ls", -1.0)
    assert not model.observe("ls", math.nan)
    assert not model.observe("ls", math.inf)
    assert model.observe("ls", 0.0)
    assert model.count("ls") == 1


@pytest.mark.parametrize("call,field", [
    (lambda: check_observations([("ls", 1.0), ("", 1.0)]), "calls[1].tool_name"),
    (lambda: check_observations([("ls", -1.0)]), "calls[0].duration_s"),
    (lambda: check_observations([("ls", math.nan)]), "calls[0].duration_s"),
    (lambda: check_observations([("ls", 1.0)] * 5000), "calls"),
    (lambda: check_tool_name("x" * 300), "tool_name"),
    (lambda: check_levels([0.5, 1.0]), "quantiles[1]"),
    (lambda: check_levels([math.nan]), "quantiles[0]"),
    (lambda: check_levels([0.5] * 65), "quantiles"),
    (lambda: check_times([-1.0]), "within_s[0]"),
])
def test_checks_name_the_field(call, field):
    with pytest.raises(InvalidInput) as err:
        call()
    assert err.value.field == field
