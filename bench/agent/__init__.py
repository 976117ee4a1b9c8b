"""The `agent` scenario's parts, one module a job: the agent trace (trace.py), the programs built from it
(programs.py), the driver that runs them through the router (driver.py), and what a run adds to the result
document and report (summary.py)."""
