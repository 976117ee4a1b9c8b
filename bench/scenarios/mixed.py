"""`mixed`: LS requests over a BE background that overloads the worker with long work, both from real traces;
the idle LS floor is measured first, and the LS TTFT SLO is a multiple of it."""

from bench.scenarios.base import Scenario


class Mixed(Scenario):
    name = "mixed"
    summary = "LS over an overloading BE background"
    floor_by_default = True


SCENARIO = Mixed()
