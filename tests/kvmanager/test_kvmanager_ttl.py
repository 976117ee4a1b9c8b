import math

import pytest

from kvmanager.ttl import FixedTTL, NoPin, ToolDurations, Turn, make_policy


def turn(tool="ls", last=False):
    return Turn(program_id="p", worker="w0", context_tokens=100, last_turn=last, tool_name=tool, turn_index=1)


def test_tool_durations_mean_window_and_quantile():
    tools = ToolDurations(window=3)
    assert tools.mean("ls") is None
    for d in (1.0, 2.0, 3.0, 10.0):
        tools.observe("ls", d)
    assert tools.count("ls") == 3
    assert tools.mean("ls") == pytest.approx(5.0)  # the oldest sample (1.0) fell out of the window
    assert tools.quantile("ls", 0.5) == 3.0
    tools.observe("ls", -1.0)
    tools.observe("ls", math.nan)
    tools.observe("", 1.0)
    assert tools.count("ls") == 3 and tools.tools() == ["ls"]


def test_tool_durations_forget_least_recent_tool():
    tools = ToolDurations(max_tools=2)
    tools.observe("a", 1)
    tools.observe("b", 1)
    tools.observe("a", 1)
    tools.observe("c", 1)
    assert sorted(tools.tools()) == ["a", "c"]


def test_no_pin_never_pins():
    assert not NoPin().decide(turn(), ToolDurations()).pin
    assert NoPin().decide(turn(last=True), ToolDurations()).reason == "last_turn"


def test_fixed_ttl_pins_short_tools_only():
    policy = FixedTTL()
    tools = ToolDurations()
    tools.observe("ls", 0.5)
    tools.observe("ls", 2.0)
    tools.observe("pytest", 30.0)
    d = policy.decide(turn("ls"), tools)
    assert d.pin and d.ttl_s == 2.0
    assert policy.decide(turn("pytest"), tools) .pin is False
    assert policy.decide(turn("pytest"), tools).reason == "tool_too_slow"
    assert not policy.decide(turn("ls", last=True), tools).pin


def test_fixed_ttl_unknown_tool():
    tools = ToolDurations()
    assert FixedTTL().decide(turn("new"), tools).pin
    assert FixedTTL().decide(turn(""), tools).pin
    assert not FixedTTL(pin_unknown=False).decide(turn("new"), tools).pin


def test_make_policy():
    assert make_policy("no-pin", ttl_s=5).name == "no-pin"
    p = make_policy("fixed-ttl", ttl_s=5)
    assert p.ttl_s == 5 and p.max_tool_s == 5
    with pytest.raises(ValueError, match="unknown pin policy"):
        make_policy("nope")
    with pytest.raises(ValueError):
        FixedTTL(ttl_s=0)
