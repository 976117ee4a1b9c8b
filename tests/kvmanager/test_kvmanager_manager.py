import math

import pytest

from kvmanager.continuation import ContinuationModel
from kvmanager.estimates import LocalEstimator
from kvmanager.ledger import Ledger
from kvmanager.manager import InvalidReport, PinManager
from kvmanager.ttl import FixedTTL, NoPin, PinForever, PredictedTTL, Turn


def t(pid="p", tool="ls", last=False, tokens=2000, worker="w0", idx=0):
    return Turn(program_id=pid, worker=worker, context_tokens=tokens, last_turn=last, tool_name=tool, turn_index=idx)


def warm(est: LocalEstimator, tool="ls", duration=0.5, n=50):
    for _ in range(n):
        est.observe(tool, duration)
    return est


def test_program_lifecycle_fixed_ttl():
    m, est = PinManager(FixedTTL()), LocalEstimator()
    out = m.report(t(tool="ls", idx=0), 0.0, 0.0, est)
    assert out.decision.pin and out.expires_at == 2.0  # unknown tool: pinned
    # the tool "ls" took 0.5 s; the program now calls "pytest"
    out = m.report(t(tool="pytest", idx=1), 0.5, 1.0, est)
    assert est.model.count("ls") == 1 and est.model.predict("ls").observed_mean_s == 0.5
    assert out.decision.pin  # pytest is unknown still
    out = m.report(t(tool="pytest", idx=2), 30.0, 40.0, est)
    assert not out.decision.pin and out.decision.reason == "tool_too_slow"
    assert m.pins(now=40.0) == []
    out = m.report(t(tool="ls", idx=3), 30.0, 80.0, est)
    assert out.decision.pin
    out = m.report(t(tool="", last=True, idx=4), 0.3, 81.0, est)
    assert not out.decision.pin and out.decision.reason == "last_turn"
    assert m.pins(now=81.0) == [] and m.ledger.programs() == 0
    assert m.continuation.observations(0) == 1 and m.continuation.observations(3) == 1


def test_no_pin_policy():
    m = PinManager(NoPin())
    assert not m.report(t(), 0.0, 0.0, LocalEstimator()).decision.pin
    assert m.pins(now=0.0) == []


def test_a_program_that_moves_worker_releases_its_old_pin_there():
    m, est = PinManager(PredictedTTL()), warm(LocalEstimator())
    first = m.report(t(worker="w0", idx=0), 0.0, 0.0, est)
    assert first.entry is not None and first.releases == []
    same = m.report(t(worker="w0", idx=1), 0.5, 1.0, est)
    assert same.releases == []  # same worker: its pin now holds the new turn
    moved = m.report(t(worker="w1", idx=2), 0.5, 2.0, est)
    assert [(e.program_id, e.worker) for e in moved.releases] == [("p", "w0")]
    assert m.ledger.pinned_tokens("w0") == 0 and m.ledger.pinned_tokens("w1") == 2000


def test_budget_evicts_pins_less_likely_to_return_and_refuses_otherwise():
    m = PinManager(PredictedTTL(), Ledger(max_tokens_per_worker=5000))
    est = warm(warm(LocalEstimator(), "ls", 0.5), "search", 0.0)
    for i in range(100):  # a search takes anywhere from 1 s to 100 s
        est.observe("search", 1.0 + i)
    a = m.report(t("a", tool="search"), 0.0, 0.0, est)
    b = m.report(t("b", tool="ls"), 0.0, 0.0, est)
    assert a.entry and b.entry and a.decision.keep_score < b.decision.keep_score
    c = m.report(t("c", tool="ls"), 0.0, 0.0, est)  # over budget: the search's pin goes
    assert c.entry is not None and [e.program_id for e in c.releases] == ["a"]
    d = m.report(t("d", tool="search"), 0.0, 0.0, est)  # nothing less likely to return than it
    assert d.entry is None and d.decision.reason == "over_budget" and d.releases == []
    assert m.ledger.pinned_tokens("w0") == 4000


def test_pressure_from_the_learned_budget_and_the_workers_memory():
    m = PinManager(PredictedTTL(), budget_fraction=0.5)
    assert m.pressure("w0", 100) == 0.0  # nothing known: unlimited
    m.observe_worker("w0", capacity_tokens=10_000, free_tokens=9000)
    assert m.ledger.budget("w0") == 5000
    assert m.pressure("w0", 2500) == pytest.approx(0.5)
    m.observe_worker("w0", capacity_tokens=10_000, free_tokens=2000)
    assert m.pressure("w0", 2500) == pytest.approx(0.8)  # the worker is mostly full


def test_maintain_expires_and_unpins_over_budget_least_likely_first():
    m = PinManager(PredictedTTL())
    est = warm(warm(LocalEstimator(), "ls", 0.5), "slow", 20.0)
    for i in range(40):
        est.observe("slow", 5.0 + i)
    m.report(t("quick", tool="ls"), 0.0, 0.0, est)
    m.report(t("slow", tool="slow"), 0.0, 0.0, est)
    m.report(t("other", tool="ls", worker="w1"), 0.0, 0.0, est)
    assert {e.program_id for e in m.maintain(0.1)["expired"]} == set()
    m.observe_worker("w0", capacity_tokens=4000, free_tokens=2000)  # budget 0.9 x 4000 = 3600 < 4000 pinned
    # 10 s on, "quick" would be back if it were coming (its tool takes 0.5 s); "slow" may well still come
    dropped = m.maintain(10.0)
    assert [e.program_id for e in dropped["pressure"]] == ["quick"]
    assert {e.program_id for e in m.maintain(1000.0)["expired"]} == {"slow", "other"}
    assert len(m.ledger) == 0


def test_min_free_fraction_unpins_when_the_worker_runs_short():
    m = PinManager(PredictedTTL(), min_free_fraction=0.2)
    est = warm(LocalEstimator())
    m.report(t("a"), 0.0, 0.0, est)
    m.report(t("b"), 0.0, 0.0, est)
    m.observe_worker("w0", capacity_tokens=100_000, free_tokens=18_500)  # 1500 short of 20 %
    assert len(m.maintain(0.1)["pressure"]) == 1 and len(m.ledger) == 1


def test_pin_forever_has_no_budget():
    m = PinManager(PinForever(), Ledger(max_tokens_per_worker=1000))
    out = [m.report(t(str(i)), 0.0, 0.0, LocalEstimator()) for i in range(3)]
    assert all(o.entry is not None and math.isinf(o.expires_at) for o in out)
    assert m.maintain(1e9) == {"expired": [], "pressure": []} and m.ledger.pinned_tokens("w0") == 6000


def test_continuation_is_learned_from_returns_idles_and_releases():
    m = PinManager(PredictedTTL(), Ledger(program_idle_s=100.0), ContinuationModel(prior_weight=1, turn_weight=1))
    est = LocalEstimator()
    m.report(t("a", idx=0), 0.0, 0.0, est)
    m.report(t("a", idx=1), 1.0, 1.0, est)  # a continued past turn 0
    m.report(t("b", idx=0), 0.0, 1.0, est)
    m.report(t("c", idx=0), 0.0, 1.0, est)
    assert m.release("c") is not None  # c was cancelled after turn 0
    m.maintain(500.0)  # a and b went idle
    assert m.continuation.observations(0) == 3 and m.continuation.observations(1) == 1
    assert m.continuation.p_continue(0) < 0.5 < ContinuationModel().p_continue(0)


def test_drop_if_current_keeps_a_newer_pin():
    m, est = PinManager(PredictedTTL()), warm(LocalEstimator())
    old = m.report(t(idx=0), 0.0, 0.0, est).entry
    new = m.report(t(idx=1), 0.5, 1.0, est).entry
    assert not m.drop_if_current(old) and m.drop_if_current(new) and len(m.ledger) == 0


@pytest.mark.parametrize("turn,dur,field", [
    (t(pid=""), 0.0, "program_id"),
    (t(pid="x" * 600), 0.0, "program_id"),
    (t(worker=""), 0.0, "worker"),
    (t(tool="x" * 300), 0.0, "tool_name"),
    (t(), -1.0, "prev_tool_duration_s"),
    (t(), math.inf, "prev_tool_duration_s"),
])
def test_invalid_reports_name_the_field(turn, dur, field):
    with pytest.raises(InvalidReport) as err:
        PinManager(FixedTTL()).report(turn, dur, 0.0, LocalEstimator())
    assert err.value.field == field and field in str(err.value)
