"""Trace-replay benchmark harness."""
