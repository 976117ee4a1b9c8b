"""Robustness of the serving path, in-process on free ports: bad requests, cancel freeing KV, memory after
10,000 requests, drain on stop. The measurements are qllm/testing's (scripts/measure_fleet.py prints the same);
what each must come out as is stated here."""

import math

import pytest

from qllm.testing import drain, load, malformed
from qllm.testing.fleet import Fleet
from qllm.testing.malformed import base_request
from qllm.v1 import router_pb2

# A KV budget below the context, so that "too large for this worker" (RESOURCE_EXHAUSTED) is reachable.
SMALL_KV = {"workers": 1, "engine": {"kv_budget_tokens": 2048}}

# The contract (README, "Errors"), one field at a time: the fields changed from base_request(), the status,
# and the field the message starts with ("" for OK). The embedded default's context is 4096 tokens, and
# "hello " is two of its tokens.
CASES = [
    ({"prompt": ""}, "INVALID_ARGUMENT", "prompt"),
    ({"prompt": " \t\n\u3000"}, "INVALID_ARGUMENT", "prompt"),
    ({"prompt": "x" * (2**20 + 1)}, "INVALID_ARGUMENT", "prompt"),  # over the default --max-prompt-bytes
    ({"prompt": "hello " * 4150, "max_tokens": 1}, "INVALID_ARGUMENT", "max_tokens"),  # over the context
    ({"prompt": "hello " * 1100}, "RESOURCE_EXHAUSTED", "max_tokens"),  # within the context, over the KV budget
    ({"prompt": "\x00"}, "OK", ""),
    ({"prompt": "<|endoftext|>"}, "OK", ""),
    ({"max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens"),
    ({"max_tokens": 4096}, "INVALID_ARGUMENT", "max_tokens"),
    ({"max_tokens": 2**32 - 1}, "INVALID_ARGUMENT", "max_tokens"),
    ({"max_tokens": 4095}, "RESOURCE_EXHAUSTED", "max_tokens"),
    ({"temperature": math.nan}, "INVALID_ARGUMENT", "temperature"),
    ({"temperature": math.inf}, "INVALID_ARGUMENT", "temperature"),
    ({"temperature": -1.0}, "INVALID_ARGUMENT", "temperature"),
    ({"temperature": 1e-45}, "OK", ""),
    ({"temperature": 3e38}, "OK", ""),
    ({"top_p": 0.0}, "INVALID_ARGUMENT", "top_p"),
    ({"top_p": 1.0000001}, "INVALID_ARGUMENT", "top_p"),
    ({"top_p": math.nan}, "INVALID_ARGUMENT", "top_p"),
    ({"temperature": 1.0, "top_p": 1e-45}, "OK", ""),
    ({"priority": 3}, "INVALID_ARGUMENT", "priority"),
    ({"priority": -1}, "INVALID_ARGUMENT", "priority"),
    ({"num_beams": 9}, "INVALID_ARGUMENT", "num_beams"),
    ({"num_beams": 2, "temperature": 0.8}, "INVALID_ARGUMENT", "temperature"),
    ({"last_turn": True}, "INVALID_ARGUMENT", "last_turn"),
    ({"request_id": "r" * 257}, "INVALID_ARGUMENT", "request_id"),
    ({"program_id": "p" * 257}, "INVALID_ARGUMENT", "program_id"),
    ({"request_id": "r" * 256}, "OK", ""),
]
# Beam search with extreme patience or length_penalty: these once overflowed gen_len ** length_penalty inside a
# shared step; they are refused up front (qllm/contract.py), so neither the request nor its neighbours fail.
BEAM_CASES = [
    ({"num_beams": 2, "length_penalty": 3e38}, "INVALID_ARGUMENT", "length_penalty"),
    ({"num_beams": 2, "length_penalty": -3e38}, "INVALID_ARGUMENT", "length_penalty"),
    ({"num_beams": 2, "length_penalty": 1000.0}, "INVALID_ARGUMENT", "length_penalty"),
    ({"num_beams": 2, "length_penalty": -1000.0}, "INVALID_ARGUMENT", "length_penalty"),
    ({"num_beams": 2, "length_penalty": math.nan}, "INVALID_ARGUMENT", "length_penalty"),
    ({"num_beams": 2, "length_penalty": 100.0}, "OK", ""),
    ({"num_beams": 8, "patience": 3e38}, "INVALID_ARGUMENT", "patience"),
    ({"num_beams": 2, "patience": 0.0}, "INVALID_ARGUMENT", "patience"),
    ({"num_beams": 2, "patience": math.nan}, "INVALID_ARGUMENT", "patience"),
    ({"num_beams": 8, "patience": 1e-45}, "OK", ""),
]
# Any request gets one of these; every refusal's message starts with the name of a request field.
CLEAR_STATUSES = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}
REQUEST_FIELDS = set(router_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)


@pytest.fixture(scope="module")
def small_kv_fleet(lt):
    """One fleet for the module's one-request cases."""
    f = lt.run(Fleet(**SMALL_KV).start())
    yield f
    lt.run(f.stop())


def _case_id(case):
    fields, code, _ = case
    shown = ",".join(f"{k}={v if not isinstance(v, str) or len(v) < 16 else f'<{len(v)} chars>'!r}"
                     for k, v in fields.items())
    return f"{shown}->{code}"


@pytest.mark.parametrize("case", CASES + BEAM_CASES, ids=[_case_id(c) for c in CASES + BEAM_CASES])
def test_each_field_value_gets_the_status_the_contract_gives(lt, small_kv_fleet, case):
    fields, code, named = case
    got, details = lt.run(malformed.send_request(small_kv_fleet, base_request(**fields)), 30)
    assert got == code, details
    if named:
        assert details.startswith(f"{named}: "), details


def test_the_fleet_still_serves_after_those_cases(lt, small_kv_fleet):
    healthy, served = lt.run(malformed.still_serving(small_kv_fleet))
    assert healthy and served


@pytest.mark.slow
@pytest.mark.parametrize("fleet", [SMALL_KV], indirect=True)
def test_generated_bad_requests_get_clear_statuses_and_the_server_keeps_serving(lt, fleet):
    r = malformed.measure_malformed(lt, fleet, n=1000)
    print({k: v for k, v in r.items() if k != "outcomes"})
    assert r["wedged"] is None, r["wedged"]
    assert r["examples"] >= 1000
    unclear = [o for o in r["outcomes"] if o["code"] not in CLEAR_STATUSES
               or (o["code"] != "OK" and o["details"].split(":", 1)[0] not in REQUEST_FIELDS)]
    assert unclear == [], unclear[:5]
    # Both kinds are exercised in numbers: refused (naming the field) and served.
    assert r["by_status"].get("INVALID_ARGUMENT", 0) >= 300 and r["by_status"].get("OK", 0) >= 200, r["by_status"]
    assert r["health_serving_after"] and r["normal_request_after"]
    # Bytes that are not UTF-8 in the prompt never reach the servicer: refused naming the field (qllm/decoding.py).
    assert r["invalid_utf8_prompt"].startswith("INVALID_ARGUMENT: prompt: invalid UTF-8"), r["invalid_utf8_prompt"]


@pytest.mark.parametrize("fleet", [SMALL_KV], indirect=True)
def test_a_bad_request_does_not_take_down_a_request_beside_it(lt, fleet):
    r = lt.run(malformed.measure_bystander(fleet, base_request(num_beams=2, length_penalty=3e38)))
    print(r)
    assert r["bystander"]["code"] == "OK" and r["bystander"]["finish_reason"] == "length", r
    assert r["bystander"]["tokens"] == r["bystander"]["max_tokens"], r


@pytest.mark.parametrize("companion", [False, True], ids=["idle", "beside-another-request"])
def test_cancelled_stream_frees_its_kv_within_one_engine_step(lt, fleet, companion):
    r = lt.run(load.measure_cancel(fleet, with_companion=companion))
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
    r = lt.run(load.measure_memory(fleet, n=10_000), 600)
    print(r)
    assert r["completed"] == 10_000 and r["errors"] == 0, r
    assert all(v == 0 for v in r["leftovers"].values()), r["leftovers"]
    assert r["rss_growth_mib"] <= 48, r


@pytest.mark.parametrize("fleet", [{"workers": 1, "drain_grace_s": 10.0}], indirect=True)
def test_drain_on_stop_finishes_inflight_and_refuses_new(lt, fleet):
    r = lt.run(drain.measure_drain(fleet, grace_s=10.0, max_tokens=64))
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
    r = lt.run(drain.measure_worker_drain(fleet, grace_s=grace_s, max_tokens=48, new_requests=6))
    print(r)
    assert r["inflight_completed"] and r["new_completed"] == r["new_requests"], r
    assert r["errors"] == [] and r["lost"] == 0, r
    assert r["s_to_worker_stopped"] <= grace_s + 2.0, r
