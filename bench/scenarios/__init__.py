"""The `qllm bench` scenarios by name, one module each (defaults, workload, driver, what it adds to the
result); the runner (bench/runner.py) does what they share."""

from bench.scenarios import agent, chatbot, idle_ls, memory_pressure, mixed
from bench.scenarios.base import Scenario

# In --help's order.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (mixed.SCENARIO, idle_ls.SCENARIO, chatbot.SCENARIO,
                                                      agent.SCENARIO, memory_pressure.SCENARIO)}
