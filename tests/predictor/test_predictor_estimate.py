import math

import numpy as np
import pytest

from predictor.calibration import DEFAULT, Calibration, isotonic
from predictor.estimate import estimate, remaining_tokens
from predictor.metrics import kendall_tau, mean_batch_tau
from qllm.estimators.latency_model import EwmaLine, LatencyModel


def test_isotonic_is_monotone_and_pools():
    assert isotonic(np.array([1.0, 3.0, 2.0, 4.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    y = np.random.default_rng(0).normal(size=200).cumsum()
    fit = isotonic(y)
    assert np.all(np.diff(fit) >= -1e-12)


def test_calibration_fit_is_monotone_and_tracks_medians():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=2000)
    tokens = np.exp(5 + scores + rng.normal(scale=0.3, size=2000))
    cal = Calibration.fit(scores, tokens)
    assert len(cal.scores) <= 48
    grid = np.linspace(-3, 3, 50)
    assert np.all(np.diff(cal(grid)) >= 0)
    assert cal(0.0) == pytest.approx(math.exp(5), rel=0.2)
    assert cal(-10) == cal.tokens[0] and cal(10) == cal.tokens[-1]
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    with pytest.raises(ValueError):
        Calibration((0.0, 1.0), (5.0, 4.0))
    assert DEFAULT(123.0) == pytest.approx(178 * 1.3)


def test_remaining_tokens():
    assert remaining_tokens(100, 0) == 100
    assert remaining_tokens(100, 40) == 60
    assert remaining_tokens(100, 150) == 150  # past the prediction: as long again as so far
    assert remaining_tokens(100, 40, max_tokens=50) == 10
    assert remaining_tokens(100, 50, max_tokens=50) == 0
    assert remaining_tokens(0.2, 0) == 1


def test_ewma_line_follows_measurements_and_keeps_slope():
    line = EwmaLine(1.0, 0.5, (1.0, 32.0), alpha=0.2)
    assert line(10) == pytest.approx(6.0)
    for _ in range(200):
        for x in (1.0, 8.0, 16.0):
            line.observe(x, 2.0 + 0.1 * x)
    assert line.a == pytest.approx(2.0, rel=0.05) and line.b == pytest.approx(0.1, rel=0.05)
    # one x value only, many times: the line goes through it and the slope stays defined and non-negative
    single = EwmaLine(1.0, 0.5, (1.0, 32.0), alpha=0.2)
    for _ in range(500):
        single.observe(4.0, 3.0)
    assert single(4.0) == pytest.approx(3.0, rel=0.02) and single.b >= 0
    single.observe(math.nan, 1.0)
    single.observe(-1, 1.0)
    assert single.samples == 500
    with pytest.raises(ValueError):
        EwmaLine(0, 0, (1, 2), alpha=0)


def test_latency_model_defaults_and_updates():
    lm = LatencyModel()
    assert lm.decode_step_s(1) == pytest.approx(0.005, rel=0.05)
    assert lm.decode_step_s(32) == pytest.approx(0.033, rel=0.05)
    assert lm.prefill_s(512) == pytest.approx(0.058, rel=0.1)
    assert lm.prefill_s(0) == 0.0
    assert lm.remaining_s(512, 100, 1) == pytest.approx(lm.prefill_s(512) + 100 * lm.decode_step_s(1))
    assert lm.remaining_s(512, 100, 1, prefill_done=True) == pytest.approx(100 * lm.decode_step_s(1))
    for _ in range(300):  # the worker is twice as slow as the default
        lm.observe_decode_step(1, 0.010)
        lm.observe_decode_step(32, 0.066)
        lm.observe_prefill(256, 0.060)
    assert lm.decode_step_s(1) == pytest.approx(0.010, rel=0.05)
    assert lm.decode_step_s(32) == pytest.approx(0.066, rel=0.05)
    st = lm.state()
    assert st.decode_samples == 600 and st.prefill_samples == 300


def test_estimate_combines_calibration_and_latency():
    cal = Calibration((0.0, 1.0), (100.0, 300.0))
    lm = LatencyModel()
    e = estimate(0.5, cal, lm, prompt_tokens=100)
    assert e.predicted_output_tokens == 200 and e.remaining_tokens == 200
    assert e.remaining_s == pytest.approx(lm.prefill_s(100) + 200 * lm.decode_step_s(1))
    e = estimate(0.5, cal, lm, prompt_tokens=100, generated_so_far=150, batch_size=8)
    assert e.remaining_tokens == 50
    assert e.remaining_s == pytest.approx(50 * lm.decode_step_s(8))  # prefill is done once generating
    e = estimate(1.0, cal, lm, prompt_tokens=10, max_tokens=64)
    assert e.predicted_output_tokens == 64 and e.remaining_tokens == 64
    # a longer predicted output is a longer estimate
    assert estimate(0.9, cal, lm, prompt_tokens=10).remaining_s > estimate(0.1, cal, lm, prompt_tokens=10).remaining_s


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.8164965, rel=1e-5)  # tau-b with ties
    assert math.isnan(kendall_tau([1, 1], [1, 2]))
    x = np.arange(256)
    assert mean_batch_tau(x, x) == pytest.approx(1.0)
