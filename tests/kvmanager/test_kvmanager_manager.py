import math

import pytest

from kvmanager.ledger import Ledger
from kvmanager.manager import InvalidReport, PinManager
from kvmanager.ttl import FixedTTL, NoPin, Turn


def t(pid="p", tool="ls", last=False, tokens=100, worker="w0", idx=0):
    return Turn(program_id=pid, worker=worker, context_tokens=tokens, last_turn=last, tool_name=tool, turn_index=idx)


def test_program_lifecycle_fixed_ttl():
    m = PinManager(FixedTTL())
    out = m.report(t(tool="ls", idx=0), 0.0, now=0.0)
    assert out.decision.pin and out.expires_at == 2.0  # unknown tool: pinned
    # the tool "ls" took 0.5 s; the program now calls "pytest"
    out = m.report(t(tool="pytest", idx=1), 0.5, now=1.0)
    assert m.tools.mean("ls") == 0.5
    assert out.decision.pin  # pytest is unknown still
    out = m.report(t(tool="pytest", idx=2), 30.0, now=40.0)
    assert m.tools.mean("pytest") == 30.0
    assert not out.decision.pin and out.decision.reason == "tool_too_slow"
    assert m.pins(now=40.0) == []
    out = m.report(t(tool="ls", idx=3), 30.0, now=80.0)
    assert out.decision.pin
    out = m.report(t(tool="", last=True, idx=4), 0.3, now=81.0)
    assert not out.decision.pin and out.decision.reason == "last_turn"
    assert m.pins(now=81.0) == [] and m.ledger.programs() == 0


def test_no_pin_policy():
    m = PinManager(NoPin())
    assert not m.report(t(), 0.0, now=0.0).decision.pin
    assert m.pins(now=0.0) == []


def test_over_budget():
    m = PinManager(FixedTTL(), Ledger(max_tokens_per_worker=150))
    assert m.report(t("a"), 0.0, now=0.0).decision.pin
    out = m.report(t("b"), 0.0, now=0.0)
    assert not out.decision.pin and out.decision.reason == "over_budget"


def test_release():
    m = PinManager(FixedTTL())
    m.report(t("a"), 0.0, now=0.0)
    assert m.release("a") and not m.release("a")


@pytest.mark.parametrize("turn,dur,field", [
    (t(pid=""), 0.0, "program_id"),
    (t(pid="x" * 300), 0.0, "program_id"),
    (t(worker=""), 0.0, "worker"),
    (t(tool="x" * 300), 0.0, "tool_name"),
    (t(), -1.0, "prev_tool_duration_s"),
    (t(), math.inf, "prev_tool_duration_s"),
])
def test_invalid_reports_name_the_field(turn, dur, field):
    with pytest.raises(InvalidReport) as err:
        PinManager(FixedTTL()).report(turn, dur, now=0.0)
    assert err.value.field == field and field in str(err.value)
