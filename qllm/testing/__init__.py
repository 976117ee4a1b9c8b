"""In-process fleets (router + workers as grpc.aio servers on free ports) and the measurements taken on them.

The tests (tests/test_fleet.py, tests/test_robustness.py) assert on these measurements; scripts/measure_fleet.py
prints the same ones for the notes. Each measurement returns what it observed and leaves the verdict to its
caller.
"""
