import pytest

from kvmanager.continuation import ContinuationModel


def test_starts_at_the_prior_and_learns_per_turn_index():
    m = ContinuationModel(max_turn=4, prior_continue=0.9)
    assert m.p_continue(0) == pytest.approx(0.9) and m.p_continue(100) == pytest.approx(0.9)
    for _ in range(200):
        m.observe(0, True)  # programs nearly always go on after their first turn...
        m.observe(3, False)  # ...and stop after their fourth
    assert m.p_continue(0) > 0.95 and m.p_continue(3) < 0.1
    assert 0.4 < m.p_continue(2) < 0.6  # never seen: the pooled rate
    m.observe(9, True)
    assert m.observations(4) == 1 == m.observations(50)  # indices past max_turn share a bucket


def test_counts_are_halved_to_follow_drift():
    m = ContinuationModel(max_count=100)
    for _ in range(1000):
        m.observe(1, False)
    assert m.observations(1) <= 100
    for _ in range(300):
        m.observe(1, True)
    assert m.p_continue(1) > 0.7


def test_bad_prior():
    with pytest.raises(ValueError):
        ContinuationModel(prior_continue=0)
