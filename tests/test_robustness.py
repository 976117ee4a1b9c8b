"""Robustness of the serving path, in-process on free ports: malformed requests, cancel freeing KV, memory
after 10,000 requests, drain on stop. The measurements live in scripts/measure_fleet.py (same figures)."""

import measure_fleet as mf  # scripts/, on the path from tests/conftest.py
import pytest


# A KV budget below the context, so that "too large for this worker" (RESOURCE_EXHAUSTED) is reachable.
FUZZ_FLEET = {"workers": 1, "engine": {"kv_budget_tokens": 2048}}


@pytest.mark.slow
@pytest.mark.parametrize("fleet", [FUZZ_FLEET], indirect=True)
def test_malformed_requests_get_clear_statuses_and_the_server_keeps_serving(lt, fleet):
    r = mf.measure_malformed(lt, fleet, n=1000, check=True)
    print({k: v for k, v in r.items() if k != "surprises"})
    assert r["failure"] is None, r["failure"]
    assert r["examples"] >= 1000
    # Both kinds are exercised in numbers: refused (naming the field) and served.
    assert r["by_status"].get("INVALID_ARGUMENT", 0) >= 300 and r["by_status"].get("OK", 0) >= 200, r["by_status"]
    assert r["health_serving_after"] and r["normal_request_after"]
    # Bytes that are not UTF-8 in the prompt never reach the servicer: refused naming the field (qllm/decoding.py).
    assert r["invalid_utf8_prompt"].startswith("INVALID_ARGUMENT: prompt: invalid UTF-8"), r["invalid_utf8_prompt"]


# Extreme beam parameters once overflowed gen_len ** length_penalty inside a shared step; they are now
# refused up front (qllm/limits.py), so neither the request nor its neighbours fail.


@pytest.mark.parametrize("fleet", [FUZZ_FLEET], indirect=True)
def test_extreme_beam_parameters_get_a_clear_answer(lt, fleet):
    r = mf.measure_malformed(lt, fleet, n=1, check=True, timeout=10.0, explicit=mf.BEAM_EDGE_EXAMPLES)
    assert r["health_serving_after"] and r["normal_request_after"]
    assert r["failure"] is None, r["failure"]


@pytest.mark.parametrize("fleet", [FUZZ_FLEET], indirect=True)
def test_a_bad_request_does_not_take_down_a_request_beside_it(lt, fleet):
    r = lt.run(mf.measure_bystander(fleet, mf.base_request(num_beams=2, length_penalty=3e38)))
    print(r)
    assert r["bystander"]["code"] == "OK" and r["bystander"]["finish_reason"] == "length", r
    assert r["bystander"]["tokens"] == r["bystander"]["max_tokens"], r


@pytest.mark.parametrize("companion", [False, True], ids=["idle", "beside-another-request"])
def test_cancelled_stream_frees_its_kv_within_one_engine_step(lt, fleet, companion):
    r = lt.run(mf.measure_cancel(fleet, with_companion=companion))
    print(r)
    assert r["kv_free_while_streaming"] < r["kv_capacity_tokens"]
    assert r["released"] and r["finish_reason"] == "cancelled", r
    # From the cancel reaching the engine: freed at the next inbox drain, i.e. after at most the step that
    # was running (the request was part of it); from the client's cancel, at most one more step in transit.
    assert r["steps_cancel_reached_engine_to_release"] <= 1, r
    assert r["steps_client_cancel_to_release"] <= 2, r
    assert r["kv_free_after"] == r["kv_capacity_tokens"] and r["num_running_after"] == 0, r


@pytest.mark.slow
def test_memory_returns_near_baseline_after_10k_requests(lt, fleet):
    r = lt.run(mf.measure_memory(fleet, n=10_000), 600)
    print(r)
    assert r["completed"] == 10_000 and r["errors"] == 0, r
    assert all(v == 0 for v in r["leftovers"].values()), r["leftovers"]
    assert r["rss_growth_mib"] <= 48, r


@pytest.mark.parametrize("fleet", [{"workers": 1, "drain_grace_s": 10.0}], indirect=True)
def test_drain_on_stop_finishes_inflight_and_refuses_new(lt, fleet):
    r = lt.run(mf.measure_drain(fleet, grace_s=10.0, max_tokens=64))
    print(r)
    assert r["health_statuses_seen"][-1] == "NOT_SERVING", r
    assert r["inflight_tokens_at_stop"] < 64 and r["inflight_completed"] and r["inflight_error"] is None, r
    assert r["new_request_fresh_connection"] == "UNAVAILABLE", r
    assert r["new_request_same_connection"] == "UNAVAILABLE", r
    assert r["inflight_still_streaming_when_new_refused"], r
    # The server stops as soon as the in-flight request is done, not at the end of the grace period.
    assert r["s_to_server_stopped"] < 10.0, r


@pytest.mark.parametrize("grace_s", [3.0, 0.3], ids=["requests-fit-the-grace", "grace-shorter-than-requests"])
@pytest.mark.parametrize("fleet", [{"workers": 2}], indirect=True)
def test_worker_drain_loses_nothing(lt, fleet, grace_s):
    """One of two workers stopped (SIGTERM's path) while it streams and new requests arrive: whatever the grace
    cuts is re-queued and replayed on the other worker; nothing is lost or failed."""
    r = lt.run(mf.measure_worker_drain(fleet, grace_s=grace_s, max_tokens=48, new_requests=6))
    print(r)
    assert r["inflight_completed"] and r["new_completed"] == r["new_requests"], r
    assert r["errors"] == [] and r["lost"] == 0, r
    assert r["s_to_worker_stopped"] <= grace_s + 2.0, r
