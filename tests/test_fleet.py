"""A local fleet (router + in-process workers on free ports): a worker lost mid-load, and 1,000 concurrent
streams. The measurements are qllm/testing's (scripts/measure_fleet.py prints the same)."""

import pytest

from qllm.testing import load, loss


@pytest.mark.slow
@pytest.mark.parametrize("fleet", [{"workers": 2}], indirect=True)
def test_worker_killed_mid_load_requeues_and_replays_exactly(lt, fleet):
    n, max_tokens = 48, 24
    r = lt.run(loss.measure_worker_loss(fleet, n=n, max_tokens=max_tokens, kill_after_tokens=4), 240)
    print(r)
    assert r["on_killed_worker"] >= 8, r
    assert r["tokens_streamed_before_kill"]["min"] >= 4, r   # every replayed stream had tokens to skip
    assert r["lost"] == 0, r                                  # each ended with a status or finished
    assert r["completed"] == n and r["unavailable"] == 0 and not r["other_errors"], r
    assert r["requeued"] == r["on_killed_worker"], r
    # Replays on the surviving worker are exact: same tokens as a clean run, none twice, none missing.
    assert r["replayed_completed"] == r["replayed_exact"] == r["on_killed_worker"], r
    assert r["mismatched_vs_clean_run"] == [] and r["wrong_length"] == [], r
    assert r["served_after_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("fleet", [{"workers": 1}], indirect=True)
def test_thousand_concurrent_streams_without_errors(lt, fleet):
    n = 1000
    r = lt.run(load.measure_concurrent_streams(fleet, n=n, max_tokens=4), 300)
    print(r)
    assert r["errors"] == {} and r["completed"] == n, r
    assert r["peak_open_client_streams"] == n, r
    # The router held (nearly) all of them at once, queueing BE beyond the worker's window.
    assert r["peak_router_held"] >= 0.9 * n, r
    assert r["peak_router_queued"] >= 0.9 * n - r["worker_window"], r


@pytest.mark.slow
def test_worker_sigkilled_in_a_subprocess_fleet_loses_nothing(tmp_path):
    """The same against real processes (qllm.up.Stack: predictor, kvmanager, 2 workers, router), worker0
    SIGKILLed once every request has streamed a few tokens."""
    n = 48
    # 96 tokens: the kill comes once the slowest request has 4, and worker0's must still be mid-stream then
    # (at 24 a fast worker had finished its share first: nothing to re-queue).
    r = loss.measure_sigkill(n=n, max_tokens=96, port_offset=1300, log_dir=str(tmp_path))
    print(r)
    assert r["lost"] == 0 and r["errors"] == [] and r["completed"] == n, r
    assert r["requeued"] >= 1, r
    assert r["exact_vs_clean_run"] == n, r
